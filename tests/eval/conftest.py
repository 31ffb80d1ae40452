"""Fixtures for the evaluation tests: tiny toy shards and a small GAELLE config."""

from __future__ import annotations

import pytest
import torch

from gaelle_ray.config import Config
from gaelle_ray.data.prepare import prepare_toy
from gaelle_ray.eval.probe import ProbeSettings

N_TRAIN, N_VAL = 32, 16


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory) -> str:
    """A 32 + 16 image toy shard set (64 px, 12 classes), made once per session."""
    out = tmp_path_factory.mktemp("eval-toy") / "shards"
    prepare_toy(out, n_train=N_TRAIN, n_val=N_VAL, image_size=64, seed=5)
    return str(out)


@pytest.fixture
def tiny_settings() -> ProbeSettings:
    return ProbeSettings(epochs=2, batch_size=8, lr=0.1, image_size=40, resize_size=48, seed=0)


def small_config(shards: str = "runs/toy/shards", split: str = "train", **eval_overrides) -> Config:
    """A resnet18 config with small heads (fast to build) and a tiny eval section."""
    eval_section = {"dataset": "toy", "data": shards, "epochs": 2, "batch_size": 8, "lr": 0.1,
                    "image_size": 40, "resize_size": 48}
    eval_section.update(eval_overrides)
    return Config.from_dict({
        "data": {"shards": shards, "split": split},
        "model": {"arch": "resnet18", "hidden_mlp": 64, "feat_dim": 32, "nmb_prototypes": 20,
                  "nmb_local_prototypes": 12, "nmb_groups_heads": 4},
        "queue": {"queue_length": 0},
        "train": {"use_gpu": False, "seed": 3},
        "eval": eval_section,
    })


def random_backbone(seed: int = 0):
    from gaelle_ray.eval.checkpoints import load_backbone

    torch.manual_seed(seed)
    return load_backbone("random", "resnet18")


@pytest.fixture
def make_config():
    """small_config, as a fixture."""
    return small_config


@pytest.fixture
def make_backbone():
    """random_backbone, as a fixture."""
    return random_backbone
