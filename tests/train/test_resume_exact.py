"""A resume continues the same run (issue 15.3), one process, no Ray.

N steps straight must equal N/2 steps, a checkpoint written and read the way the training
loop does it (loop.write_checkpoint -> storage.save_checkpoint (torch.save) ->
loop.restore -> storage.load_checkpoint (the weights_only loader)) into a FRESH model and
stepper, then N/2 more steps. Compared BITWISE (torch.equal; float32 on the CPU, one
process, the same kernels on the same inputs in the same order): every parameter, every
BatchNorm buffer, every optimiser buffer (SGD momentum under LARC) and its param groups,
the GradScaler state, both queues (buffer and in-use flag), the iteration and non-finite
counters, the colour augmentation's generator, the global torch RNG, and every loss of
the second half.

The run is set up so that every piece of state matters after the checkpoint (at the end
of epoch 2, iteration 6): the learning-rate warm-up (8 iterations) and the prototype
freezing (8 iterations) span it; the queues start at epoch 1 (iteration 2), the local
queue (2 pushes) is in use before the checkpoint and the global one (4 pushes) is full
but first used right after it; the colour augmentation runs in the stepper (its RNG
draws every crop's jitter). Removing the optimiser-state, colour-RNG or queue restore
from GaelleStepper.load_state_dict makes this test fail (checked by hand when written).
"""

from pathlib import Path

import ray.train
import torch

from gaelle_ray.config import load_config
from gaelle_ray.model import build_model
from gaelle_ray.train.loop import Worker, _gather_queues, restore, write_checkpoint
from gaelle_ray.train.step import GaelleStepper

ROOT = Path(__file__).resolve().parents[2]
ITERS_PER_EPOCH, EPOCHS = 2, 6
N = ITERS_PER_EPOCH * EPOCHS  # 12 steps
CHECKPOINT_EPOCH = 2  # the checkpoint is written at the end of epoch 2: after N / 2 steps


def _config(**overrides):
    base = {"augmentation.size_crops": "[32, 16]", "augmentation.colour_on_device": "true",
            "model.hidden_mlp": 32, "model.feat_dim": 16, "model.nmb_prototypes": 12,
            "model.nmb_local_prototypes": 10, "train.batch_size_per_worker": 4, "train.num_workers": 1,
            "train.epochs": EPOCHS, "train.precision": "fp32",
            "queue.queue_length": 16, "queue.local_queue_length": 32, "queue.epoch_queue_starts": 1,
            "optim.freeze_prototypes_niters": 8, "optim.warmup_epochs": 4}
    base.update(overrides)
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in base.items()])


def _crops(config, i):
    """The fixed uint8 batch of step i (the same in both runs)."""
    g = torch.Generator().manual_seed(1000 + i)
    b = config.train.batch_size_per_worker
    return [torch.randint(0, 256, (n * b, 3, s, s), generator=g, dtype=torch.uint8)
            for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]


def _worker(config, init_seed):
    """A one-worker loop.Worker around a new model (initialised with `init_seed`) and stepper."""
    torch.manual_seed(init_seed)
    model = build_model(config).train()
    stepper = GaelleStepper(model, config, torch.device("cpu"), iters_per_epoch=ITERS_PER_EPOCH)
    return Worker(config, rank=0, world=1, device=torch.device("cpu"), group=None, steps=ITERS_PER_EPOCH,
                  stepper=stepper)


def _run(stepper, config, steps):
    losses = []
    for i in steps:
        m = stepper.step(_crops(config, i), epoch=i // ITERS_PER_EPOCH, total_epochs=EPOCHS)
        assert not m.nonfinite, f"step {i} was skipped: the comparison would be void"
        losses.append(m.loss)
    return losses


def _snapshot(stepper):
    """Everything a resume must carry, as plain tensors/values."""
    opt = stepper.optimizer.state_dict()
    return {
        "model": {k: v.detach().clone() for k, v in stepper.model.state_dict().items()},
        "optimizer_state": {i: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                            for i, s in opt["state"].items()},
        "param_groups": opt["param_groups"],
        "scaler": stepper.scaler.state_dict(),
        "queue": stepper.queue and stepper.queue.state_dict(),
        "local_queue": stepper.local_queue and stepper.local_queue.state_dict(),
        "iteration": stepper.iteration,
        "nonfinite_total": stepper.nonfinite_total,
        "colour_rng": stepper.colour.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }


def _assert_same(a, b):
    """Bitwise equality of two snapshots."""
    assert a["model"].keys() == b["model"].keys()
    bn = [k for k in a["model"] if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn) > 20, "the model should have BatchNorm buffers"
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, f"{len(differ)} model tensors differ after the resume, e.g. {differ[:5]}"
    assert a["optimizer_state"].keys() == b["optimizer_state"].keys()
    assert len(a["optimizer_state"]) == sum(1 for _ in a["param_groups"][0]["params"])
    differ = [i for i, s in a["optimizer_state"].items()
              if not torch.equal(s["momentum_buffer"], b["optimizer_state"][i]["momentum_buffer"])]
    assert not differ, f"{len(differ)} momentum buffers differ after the resume, e.g. parameters {differ[:5]}"
    assert a["param_groups"] == b["param_groups"]
    assert a["scaler"] == b["scaler"]
    for name in ("queue", "local_queue"):
        assert a[name] is not None and b[name] is not None, name
        assert a[name]["in_use"] and b[name]["in_use"], name
        assert torch.equal(a[name]["buffer"], b[name]["buffer"]), name
    assert a["iteration"] == b["iteration"] == N
    assert a["nonfinite_total"] == b["nonfinite_total"] == 0
    assert torch.equal(a["colour_rng"], b["colour_rng"]), "colour augmentation RNG"
    assert torch.equal(a["torch_rng"], b["torch_rng"]), "torch RNG"


def test_resume_from_a_checkpoint_continues_the_same_run_bitwise(tmp_path):
    config = _config()
    # straight: N steps
    straight = _worker(config, init_seed=0)
    losses_straight = _run(straight.stepper, config, range(N))
    want = _snapshot(straight.stepper)

    # interrupted: N/2 steps, the checkpoint of epoch 2 through the real save/load, a fresh
    # model (another initialisation, so nothing survives but what the checkpoint carries)
    first = _worker(config, init_seed=0)
    _run(first.stepper, config, range(N // 2))
    half = first.stepper
    assert half.queue is not None and half.queue.is_full() and not half.queue.in_use  # first used after it
    assert half.local_queue is not None and half.local_queue.in_use
    assert half.iteration < config.optim.freeze_prototypes_niters
    assert half.iteration < config.optim.warmup_epochs * ITERS_PER_EPOCH
    folder = tmp_path / "epoch_00002"
    write_checkpoint(first, str(folder), CHECKPOINT_EPOCH, _gather_queues(first))
    del first, half

    second = _worker(config, init_seed=123)
    start_epoch = restore(second, ray.train.Checkpoint.from_directory(str(folder)))
    assert start_epoch == CHECKPOINT_EPOCH + 1 and second.stepper.iteration == N // 2
    losses_resumed = _run(second.stepper, config, range(N // 2, N))

    _assert_same(want, _snapshot(second.stepper))
    assert losses_resumed == losses_straight[N // 2:]



def test_the_newest_complete_checkpoint_is_restored_even_when_ray_knows_an_older_one(tmp_path):
    """A kill between Ray's upload of a checkpoint and Ray's record of it: Ray hands over the
    older one, but the stream starts after the newest complete folder (make_stream_factory),
    so the worker restores that one; a folder caught half uploaded does not count."""
    from gaelle_ray import storage
    from gaelle_ray.train.loop import checkpoint_to_restore

    config = _config()
    worker = _worker(config, init_seed=0)
    run = tmp_path / "train"
    for epoch in range(3):
        _run(worker.stepper, config, range(epoch * ITERS_PER_EPOCH, (epoch + 1) * ITERS_PER_EPOCH))
        write_checkpoint(worker, str(run / storage.checkpoint_name(epoch)), epoch, _gather_queues(worker))
    state = run / "epoch_00002" / storage.STATE_FILE
    with open(state, "r+b") as f:  # epoch 2 caught mid-upload: meta.json there, state.pt cut short
        f.truncate(state.stat().st_size // 2)
    assert storage.latest_epoch(str(run)) == 1

    older = ray.train.Checkpoint.from_directory(str(run / "epoch_00000"))
    chosen = checkpoint_to_restore(older, str(run))
    assert chosen == str(run / "epoch_00001")
    fresh = _worker(config, init_seed=5)
    assert restore(fresh, chosen) == 2 and fresh.stepper.iteration == 2 * ITERS_PER_EPOCH
    newest = ray.train.Checkpoint.from_directory(str(run / "epoch_00001"))
    assert checkpoint_to_restore(newest, str(run)) is newest
    assert checkpoint_to_restore(None, str(run)) == str(run / "epoch_00001")  # Ray knows none
    assert checkpoint_to_restore(older, "") is older
    assert checkpoint_to_restore(None, str(tmp_path / "empty")) is None
