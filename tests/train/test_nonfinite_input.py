"""A batch holding a NaN image (issue 15.8): the step is skipped and names the image, it
changes nothing a checkpoint holds (weights, optimiser, queues, BatchNorm running
statistics), the epoch goes on, or the run stops after train.max_nonfinite_steps such
steps in a row, with the image named; two workers name the image of either.

The crops come as the stream makes them with the colour in the stream
(augmentation.colour_on_device: false): float16 normalised, where a NaN can occur.
"""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gaelle_ray.config import load_config
from gaelle_ray.data.pipeline import StreamBatch
from gaelle_ray.model import build_model
from gaelle_ray.train.loop import Worker, build_training_model, run_epoch
from gaelle_ray.train.step import GaelleStepper, TooManyNonFiniteSteps

ROOT = Path(__file__).resolve().parents[2]
B = 4


def _config(**overrides):
    base = {"augmentation.size_crops": "[32, 16]", "augmentation.colour_on_device": "false",
            "model.hidden_mlp": 32, "model.feat_dim": 16, "model.nmb_prototypes": 12,
            "model.nmb_local_prototypes": 10, "train.batch_size_per_worker": B, "train.num_workers": 1,
            "train.epochs": 3, "train.precision": "fp32", "queue.queue_length": 16, "queue.epoch_queue_starts": 0,
            "optim.freeze_prototypes_niters": 0, "optim.warmup_epochs": 0, "train.max_nonfinite_steps": 3}
    base.update(overrides)
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in base.items()])


def _crops(config, seed, nan_image=None, resolution=1):
    """Normalised float16 crops, crop-major (n_r*B, 3, S, S); image `nan_image` gets one NaN
    pixel in its last crop of `resolution`."""
    g = torch.Generator().manual_seed(seed)
    crops = [torch.randn((n * B, 3, s, s), generator=g).half()
             for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]
    if nan_image is not None:
        n = config.augmentation.nmb_crops[resolution]
        crops[resolution][(n - 1) * B + nan_image, 1, 2, 3] = float("nan")
    return crops


def _state(stepper):
    """What a checkpoint of this worker holds, cloned."""
    state = stepper.state_dict()
    return {"model": {k: v.clone() for k, v in state["model"].items()},
            "optimizer": [{k: v.clone() for k, v in s.items()} for s in stepper.optimizer.optim.state.values()],
            "queue": stepper.queue.state_dict()["buffer"].clone()}


def _stepper(config):
    torch.manual_seed(0)
    return GaelleStepper(build_model(config).train(), config, torch.device("cpu"), iters_per_epoch=4)


def test_a_nan_image_skips_the_step_names_the_image_and_changes_no_checkpointed_state():
    config = _config()
    st = _stepper(config)
    assert any("running_mean" in k for k in st.model.state_dict())  # the buffers at stake are there
    st.step(_crops(config, 0), 0, 3)  # a good step first: optimiser momentum and queue hold something
    before = _state(st)
    ids = torch.tensor([101, 202, 303, 404])
    m = st.step(_crops(config, 1, nan_image=2), 0, 3, image_ids=ids)
    assert m.nonfinite and st.iteration == 2 and st.nonfinite_total == 1
    assert "non-finite input in image 303" in m.skip_reason, m.skip_reason
    after = _state(st)
    for key, value in before["model"].items():  # BatchNorm running statistics included
        if "prototypes" in key:  # normalised at the start of every step, skipped or not
            torch.testing.assert_close(after["model"][key], torch.nn.functional.normalize(value, dim=1), msg=key)
        else:
            assert torch.equal(after["model"][key], value), key
    for old, new in zip(before["optimizer"], after["optimizer"]):
        for k in old:
            assert torch.equal(old[k], new[k]), k
    assert torch.equal(before["queue"], after["queue"])
    assert all(torch.isfinite(v).all() for v in after["model"].values() if v.is_floating_point())
    # the next good batch trains normally
    m = st.step(_crops(config, 2), 0, 3, image_ids=ids)
    assert not m.nonfinite and torch.isfinite(torch.tensor(m.loss)) and st.nonfinite_in_a_row == 0


def test_without_image_ids_the_batch_position_is_named():
    config = _config()
    m = _stepper(config).step(_crops(config, 1, nan_image=0, resolution=0), 0, 3)
    assert m.nonfinite and "non-finite input in image #0" in m.skip_reason


def _batches(config, nan_steps, steps=4, epoch=0):
    for step in range(steps):
        ids = torch.arange(B) + 10 * step
        crops = _crops(config, step, nan_image=1 if step in nan_steps else None)
        yield StreamBatch(epoch, step, crops, 0, 0.0, ids, torch.full((B,), epoch))


def _worker(config):
    st = _stepper(config)
    return Worker(config, rank=0, world=1, device=torch.device("cpu"), group=None, steps=4, stepper=st)


def test_an_epoch_skips_a_nan_batch_with_a_warning_naming_the_image(capsys):
    config = _config()
    worker = _worker(config)
    tally = run_epoch(worker, _batches(config, nan_steps={1}), epoch=0)
    assert tally.stop_reason is None and tally.finite_steps == 3 and worker.stepper.nonfinite_total == 1
    out = capsys.readouterr().out
    assert "WARNING epoch 1/3 iteration 1 skipped:" in out and "non-finite input in image 11" in out, out


def test_nan_batches_in_a_row_stop_the_run_naming_the_image():
    config = _config(**{"train.max_nonfinite_steps": 2})
    worker = _worker(config)
    tally = run_epoch(worker, _batches(config, nan_steps={1, 2}), epoch=0)
    assert tally.stop_reason is not None and tally.finite_steps == 1
    assert "2 non-finite steps in a row" in tally.stop_reason and "non-finite input in image 21" in tally.stop_reason


def test_stop_at_the_first_nan_batch_when_configured():
    config = _config(**{"train.max_nonfinite_steps": 1})
    st = _stepper(config)
    with pytest.raises(TooManyNonFiniteSteps, match="non-finite input in image 7"):
        st.step(_crops(config, 1, nan_image=3), 0, 3, image_ids=torch.tensor([4, 5, 6, 7]))


def _two_workers(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        config = _config(**{"train.num_workers": 2})
        torch.manual_seed(0)
        model, forward_model, group = build_training_model(config, torch.device("cpu"), 2)
        st = GaelleStepper(model, config, torch.device("cpu"), group, 2, rank, 4, forward_model)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ids = torch.arange(B) + 100 * rank
        m = st.step(_crops(config, rank, nan_image=1 if rank == 1 else None), 0, 3, image_ids=ids)
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if "prototypes" not in k)
        torch.save({"nonfinite": m.nonfinite, "reason": m.skip_reason, "unchanged": unchanged},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_workers_both_skip_and_both_name_the_other_workers_image(tmp_path, free_port):
    mp.start_processes(_two_workers, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["nonfinite"] and result["unchanged"], (rank, result)
        assert "non-finite input in image 101 (worker 1)" in result["reason"], (rank, result["reason"])
