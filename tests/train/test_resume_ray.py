"""A resume through Ray continues the same run (issue 15.3): `pretrain()` for 2 epochs
straight (run A) and `pretrain()` for 1 epoch then `pretrain(..., resume=True)` to 2 epochs
(run B) end in the same state. One worker, 64 toy images, 8 steps per epoch.

The learning-rate warm-up is exactly epoch 0 (warmup_epochs 1): its learning rates do not
depend on train.epochs, so run B's first part (train.epochs 1) takes the same steps as run
A's epoch 0 (after warm-up the cosine spans train.epochs, which B changes on resume). The
queues start at epoch 0 and are in use before the checkpoint, the prototypes stay frozen
past it (12 iterations).

The batch order must be reproducible for this: `data.preserve_order: true` (Ray Data's
preserve_order for the training stream, pipeline.py "Order"). Without it (the default, for
throughput) the two runs differ from epoch 0 on: run A's stream delivered epoch 1's crop
task before epoch 0's, and two batches of one task swapped.
"""

from pathlib import Path

import pytest
import torch

from gaelle_ray.data.prepare import prepare_toy
from gaelle_ray.storage import load_checkpoint
from gaelle_ray.train.trainer import pretrain

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "shards"
    prepare_toy(str(out), n_train=64, n_val=16, image_size=64, seed=0)
    return str(out)


# on top of the folder's small config (tests/train/conftest.py): one worker, every piece of
# state in use across the checkpoint, and the ordered stream
EXACT = {"augmentation.size_crops": "[32, 16]", "augmentation.colour_on_device": "true", "train.num_workers": 1,
         "train.log_every_steps": 8, "queue.queue_length": 16, "queue.local_queue_length": 128,
         "queue.epoch_queue_starts": 0, "optim.freeze_prototypes_niters": 12, "optim.warmup_epochs": 1,
         "eval.online_every_epochs": 0, "data.preserve_order": "true"}


def _differences(a, b, path=""):
    """Paths where two nested checkpoint states differ (tensors bitwise)."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path} keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path} length {len(a)} != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]


def _compare(folder_a, folder_b):
    (state_a, _), (state_b, _) = load_checkpoint(folder_a), load_checkpoint(folder_b)
    return _differences(state_a["worker"], state_b["worker"], "worker") + \
        _differences(state_a["queues"], state_b["queues"], "queues")


def test_stopped_after_one_epoch_and_resumed_ends_like_two_epochs_straight(ray_local, shards, small_config, tmp_path):
    run_a = pretrain(small_config(shards, tmp_path / "a", **EXACT, **{"train.epochs": 2}), track=False)
    pretrain(small_config(shards, tmp_path / "b", **EXACT, **{"train.epochs": 1}), track=False)
    run_b = pretrain(small_config(shards, tmp_path / "b", **EXACT, **{"train.epochs": 2}), resume=True, track=False)

    # before the resume: run B's first part is run A's epoch 0
    differ = _compare(Path(run_a.checkpoint).parent / "epoch_00000", Path(run_b.checkpoint).parent / "epoch_00000")
    assert not differ, f"epoch 0: {len(differ)} entries differ, e.g. {differ[:8]}"
    (state_a, meta_a), (state_b, meta_b) = load_checkpoint(run_a.checkpoint), load_checkpoint(run_b.checkpoint)
    assert meta_a["epoch"] == meta_b["epoch"] == 1
    worker_a, worker_b = state_a["worker"], state_b["worker"]
    assert worker_a["iteration"] == worker_b["iteration"] == 16
    for state in (state_a, state_b):
        assert all(q["in_use"] for name in ("queue", "local_queue") for q in state["queues"][name])
    assert worker_a["optimizer"]["state"], "no optimiser state to compare"
    # bitwise: model (parameters and BatchNorm buffers), optimiser (momentum buffers, param
    # groups), scaler, queues (buffers, in-use flags), counters, colour and torch RNG
    differ = _compare(run_a.checkpoint, run_b.checkpoint)
    assert not differ, f"epoch 1 (after the resume): {len(differ)} entries differ, e.g. {differ[:8]}"
    # the epoch records agree too, apart from the timings
    timing = {"images_per_s", "data_wait_share"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in state_a["history"]] == \
           [{k: v for k, v in r.items() if k not in timing} for r in state_b["history"]]
