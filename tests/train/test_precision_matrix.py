"""The GPU path's switches, run on CPU: precision {fp32, bf16, fp16} x channels_last {off, on}
x torch.compile {off, on} x workers {1, 2}, each through the training code's own model
build (`build_training_model`: GroupBatchNorm over the workers, channels-last layout, DDP,
compile) and one `GaelleStepper` step on the same images.

For every case:
- every loss term is finite, and the step was taken (every weight with a gradient moved);
- each loss term within the precision's relative tolerance of the fp32 / contiguous /
  eager / 1-worker step, and the gradient (all-reduced, unscaled, before LARC: all
  parameters as one vector, ||g - g_ref|| / ||g_ref||) too;
- 2 workers x B images equal 1 worker x 2B images of the same case: the workers' mean
  loss, and every worker's gradient (same tolerances);
- a checkpoint round trip (state_dict -> fresh stepper) restores the GradScaler's state.

Tolerances (any loss term, gradient), with the worst this model measured (ResNet-18,
32/24 px crops, d = 16; 2026-11-30, all 24 cases): fp32 (1e-5, 1e-2): 1.8e-6 and 2.5e-3
(channels-last and compiled kernels sum in another order); bf16 (6e-2, 0.75): 3.8e-2 (the
local term; its Sinkhorn at eps 0.03 sharpens the rounding of the local scores) and 0.50
against fp32, 0.41 between 1 and 2 workers; fp16 (6e-3, 0.3): 3.3e-3 and 0.17. The
gradient tolerances are wide because at initialisation the codes are near uniform, so the
score gradients (p - q) / tau are small differences that bfloat16's 8-bit mantissa
perturbs by tens of percent; they still catch a missing all-reduce, a gradient summed
instead of averaged (relative error 1) or a skipped step.

fp16 starts its GradScaler at 2^8 here: the default 2^16 overflows on this model's first
step, which is then (correctly) skipped (tests/train/test_precision_step.py tests that).

The fast suite runs the eager cases (12); the slow tests run the compiled ones against
the same fp32 eager reference: together, the whole matrix. The compiled cases use the
`aot_eager` backend (train.compile_backend): Dynamo's graph capture of the model, its
graph breaks, AOTAutograd's forward/backward graphs and DDP's graph split at its buckets,
all of what torch.compile does to this code except generating kernels. Inductor's kernels
differ by device anyway (C++ here, Triton on a GPU) and compile cold at ~60-75 s per case
on 2 cores (all 12 cases: 15 min, measured 2026-11-30), so inductor runs for the GPU
configs' case alone (bf16, channels-last, 2 workers); benchmarks/gpu_acceptance.py
compiles with inductor on the GPU.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pathlib import Path

from gaelle_ray.config import load_config
from gaelle_ray.train.loop import build_training_model
from gaelle_ray.train.step import GaelleStepper

ROOT = Path(__file__).resolve().parents[2]
B = 4  # images per worker with 2 workers; 1 worker gets 2B
# (loss relative tolerance, update relative tolerance) against fp32 and between 1 and 2 workers
TOL = {"fp32": (1e-5, 1e-2), "bf16": (6e-2, 0.75), "fp16": (6e-3, 0.3)}

EAGER = [(p, cl, False) for p in ("fp32", "bf16", "fp16") for cl in (False, True)]
COMPILED = [(p, cl, "aot_eager") for p in ("fp32", "bf16", "fp16") for cl in (False, True)]
INDUCTOR = [("bf16", True, "inductor")]  # the GPU configs' choice, with inductor's generated code


def _config(precision: str, channels_last: bool, compile_, batch: int):
    """compile_: False, or the torch.compile backend."""
    sets = {"augmentation.size_crops": "[32, 24]", "augmentation.nmb_crops": "[2, 2]",
            "augmentation.min_scale_crops": "[0.4, 0.1]", "augmentation.max_scale_crops": "[1.0, 0.4]",
            "augmentation.colour_on_device": "false",  # the crops come coloured: same pixels on every worker
            "model.hidden_mlp": 32, "model.feat_dim": 16, "model.nmb_prototypes": 10,
            "model.nmb_local_prototypes": 8, "train.batch_size_per_worker": batch, "queue.queue_length": 0,
            "optim.freeze_prototypes_niters": 0, "optim.warmup_epochs": 0, "optim.base_lr": 0.5,
            "train.epochs": 1, "train.precision": precision, "train.channels_last": str(channels_last).lower(),
            "train.compile": str(bool(compile_)).lower(), "train.compile_backend": compile_ or "inductor"}
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in sets.items()])


def _images(config_2b):
    """The 2B images of every crop, crop-major: (n_r * 2B, 3, S_r, S_r) uint8."""
    g = torch.Generator().manual_seed(1)
    aug = config_2b.augmentation
    return [torch.randint(0, 256, (n * 2 * B, 3, s, s), generator=g, dtype=torch.uint8)
            for s, n in zip(aug.size_crops, aug.nmb_crops)]


def _rows(crops, rank: int, world: int):
    """Worker `rank`'s images of every crop (world 1: all 2B)."""
    if world == 1:
        return crops
    out = []
    for c in crops:
        v = c.shape[0] // (2 * B)
        out.append(c.reshape(v, 2 * B, *c.shape[1:])[:, rank * B:(rank + 1) * B].reshape(v * B, *c.shape[1:]))
    return out


def run_case(precision: str, channels_last: bool, compile_: str | bool, world: int, rank: int) -> dict:
    """One step of the case on this process (world 2: inside an initialised gloo group)."""
    config = _config(precision, channels_last, compile_, 2 * B // world)
    torch.manual_seed(0)  # the same initial weights in every case and on every worker
    model, forward_model, group = build_training_model(config, torch.device("cpu"), world)
    model.train()
    stepper = GaelleStepper(model, config, torch.device("cpu"), group, world, rank, 1, forward_model)
    if precision == "fp16":  # 2^16, the default, overflows on this model's first step (a skipped step)
        stepper.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    grads = []
    larc = stepper.optimizer.adapt_gradients

    def spy():  # the gradients as the step has them: all-reduced, unscaled, before LARC
        grads.append(torch.cat([p.grad.detach().flatten().clone() for p in model.parameters()]))
        return larc()

    stepper.optimizer.adapt_gradients = spy
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    crops = _rows(_images(_config(precision, channels_last, compile_, 2 * B)), rank, world)
    m = stepper.step(crops, 0, 1)
    after = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    fresh = GaelleStepper(model, config, torch.device("cpu"), group, world, rank, 1, forward_model)
    fresh.load_state_dict(stepper.state_dict())
    return {"terms": [m.loss, m.loss_global, m.loss_local, m.loss_l2g], "grad": grads[0],
            "moved": (after != before)[grads[0] != 0],  # of the weights with a gradient
            "scaler": stepper.scaler.state_dict(), "scaler_restored": fresh.scaler.state_dict(),
            "amp_dtype": str(stepper.amp_dtype), "compiled": hasattr(forward_model, "_orig_mod")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cases, world: int, out_dir: str) -> None:
    torch.set_num_threads(1 if world > 1 else 2)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {case: run_case(*case, world, rank) for case in cases}
    finally:
        if world > 1:
            dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"world{world}-rank{rank}.pt"))


def _run(cases, world: int, tmp_path) -> list[dict]:
    """Every case in one fresh process per worker (spawned: no state shared with pytest);
    per rank, {case: run_case's result}."""
    mp.start_processes(_worker, args=(_free_port(), cases, world, str(tmp_path)), nprocs=world,
                       start_method="spawn")
    return [torch.load(tmp_path / f"world{world}-rank{r}.pt", weights_only=False) for r in range(world)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _check(cases, reference, one, two) -> list[str]:
    """Every rule of the module docstring; the list of broken ones (empty: all hold)."""
    broken = []
    ref_terms, ref_grad = reference["terms"], reference["grad"]
    for case in cases:
        precision = case[0]
        loss_tol, grad_tol = TOL[precision]
        r1, r2 = one[0][case], [two[r][case] for r in range(2)]
        name = f"{precision} channels_last={case[1]} compile={case[2] or 'off'}"
        for label, res in (("1 worker", r1), ("2 workers rank 0", r2[0]), ("2 workers rank 1", r2[1])):
            if not all(torch.isfinite(torch.tensor(res["terms"]))):
                broken.append(f"{name} {label}: non-finite loss terms {res['terms']}")
            if float(res["moved"].double().mean()) < 0.99:
                broken.append(f"{name} {label}: the step moved only {float(res['moved'].double().mean()):.0%} "
                              "of the weights with a gradient (skipped?)")
            if res["scaler_restored"] != res["scaler"]:
                broken.append(f"{name} {label}: scaler state {res['scaler_restored']} after the round trip, "
                              f"{res['scaler']} before")
        # against fp32: each term; the update
        for i, (got, want) in enumerate(zip(r1["terms"], ref_terms)):
            if abs(got - want) > loss_tol * abs(want):
                broken.append(f"{name}: loss term {i} = {got:.6f}, fp32 {want:.6f} (rel tol {loss_tol})")
        if _rel(r1["grad"], ref_grad) > grad_tol:
            broken.append(f"{name}: gradient differs from fp32 by {_rel(r1['grad'], ref_grad):.3g} (tol {grad_tol})")
        # 2 workers x B == 1 worker x 2B: the mean of the workers' losses, every worker's update
        mean_loss = (r2[0]["terms"][0] + r2[1]["terms"][0]) / 2
        if abs(mean_loss - r1["terms"][0]) > loss_tol * abs(r1["terms"][0]):
            broken.append(f"{name}: 2-worker loss {mean_loss:.6f}, 1 worker {r1['terms'][0]:.6f}")
        for r in range(2):
            if _rel(r2[r]["grad"], r1["grad"]) > grad_tol:
                broken.append(f"{name}: rank {r}'s gradient differs from 1 worker's by "
                              f"{_rel(r2[r]['grad'], r1['grad']):.3g} (tol {grad_tol})")
    return broken


def _matrix(cases, tmp_path):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ref_case = ("fp32", False, False)
    one = _run(list(dict.fromkeys([ref_case, *cases])), 1, tmp_path / "one")
    two = _run(cases, 2, tmp_path / "two")
    reference = one[0][ref_case]
    for case in cases:  # autocast really ran in the case's dtype
        want = {"fp32": "None", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[case[0]]
        assert one[0][case]["amp_dtype"] == want
        assert one[0][case]["compiled"] == bool(case[2]) and two[0][case]["compiled"] == bool(case[2])
    broken = _check(cases, reference, one, two)
    assert not broken, "\n".join(broken)
    return one, two


def test_eager_cases_one_and_two_workers(tmp_path):
    _matrix(EAGER, tmp_path)


@pytest.mark.slow
def test_compiled_cases_one_and_two_workers(tmp_path):
    _matrix(COMPILED, tmp_path)


@pytest.mark.slow
def test_inductor_compiled_bf16_channels_last_two_workers(tmp_path):
    """Inductor's kernels with DDP on 2 gloo workers, against the eager 1-worker step of the
    same case (the 1-worker inductor compile would add ~100 s cold for little)."""
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    ref_case, eager = ("fp32", False, False), INDUCTOR[0][:2] + (False,)
    one = _run([ref_case, eager], 1, tmp_path / "one")
    two = _run(INDUCTOR, 2, tmp_path / "two")
    assert all(two[r][INDUCTOR[0]]["compiled"] for r in range(2))
    one[0][INDUCTOR[0]] = one[0][eager]  # the 1-worker side of the comparison: eager
    broken = _check(INDUCTOR, one[0][ref_case], one, two)
    assert not broken, "\n".join(broken)
