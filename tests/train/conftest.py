"""Set-up shared by the Ray Train tests of this folder: toy shards and a small pretraining
config (a ResNet-18 with small heads on 48/24-px crops, 2 workers of 1 CPU, batch 8)."""

from pathlib import Path

import pytest

from gaelle_ray.config import Config, load_config
from gaelle_ray.data.prepare import prepare_toy

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"augmentation.size_crops": "[48, 24]", "model.hidden_mlp": 64, "model.feat_dim": 32,
         "model.nmb_prototypes": 20, "model.nmb_local_prototypes": 20, "train.batch_size_per_worker": 8,
         "train.num_workers": 2, "train.epochs": 2, "train.log_every_steps": 4, "ray.num_cpus_per_worker": 1,
         "queue.queue_length": 32, "queue.epoch_queue_starts": 1, "optim.freeze_prototypes_niters": 4,
         "optim.warmup_epochs": 0, "tracking.experiment": "test"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """128 train and 16 val toy images of 64 px, in one shard per split."""
    out = tmp_path_factory.mktemp("toy") / "shards"
    prepare_toy(str(out), n_train=128, n_val=16, image_size=64, seed=0)
    return str(out)


@pytest.fixture(scope="session")
def small_config():
    """make(shards, run_dir, **overrides) -> the demo config made small (SMALL), reading
    `shards` and writing into `run_dir`; overrides are config keys with values."""
    def make(shards, run_dir, **overrides) -> Config:
        values = {"data.shards": shards, "train.run_dir": str(run_dir), **SMALL, **overrides}
        return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in values.items()])

    return make
