"""GPU acceptance check: the one command to run on the first GPU machine.

    python benchmarks/gpu_acceptance.py                        # every row, full shapes: ~4-6 min on one GPU, at most 8
    python benchmarks/gpu_acceptance.py --rows exact,colour    # some rows only (exact, ddp, speed, colour, stream)
    python benchmarks/gpu_acceptance.py --smoke                # tiny shapes on the GPU, ~1 min: a first try
    python benchmarks/gpu_acceptance.py --device cpu --smoke   # CI: every row's code on the CPU, ~40 s on 2 cores

Without a CUDA device (and without ``--device cpu``) it prints one line saying so and exits 0.
Otherwise it prints one table (stdout; progress on stderr), a line per check with what was
measured, the tolerance and the result: PASS or FAIL for tolerance rows, "info" for
measurements, "skipped (needs ...)" for what this machine cannot run. It exits 1 when any
tolerance row FAILs or any row raised (the row then shows the error), else 0.

Rows (``--rows`` keys in brackets)
----------------------------------
[exact] **The step on the GPU against a float64 step on the CPU.** A small GAELLE model
(ResNet-50, 2 x 96 + 4 x 64 px crops, B = 8, 256-wide heads, d = 64, K = 100, K_l = 80,
H = 4) in training mode, float32 initial weights, random normalised crops and fixed slot
permutations; one forward (``model(crops)``), the three losses (``gaelle_losses``) and
``backward()``. The oracle is the same in float64 on the CPU (``model.double()``; only
Sinkhorn is float32 there, as everywhere: method.md). Compared: the four loss terms (worst
relative difference), the gradients (relative L2 over all parameters together, and of the
worst parameter tensor, measured against at least 1e-4 of the total norm: a bias followed
by a BatchNorm has a zero gradient in exact arithmetic) and the BatchNorm running
statistics (worst buffer). Twice, three rows each:
  - float64 on the GPU: is it the same function? losses <= 1e-6, gradients all <= 1e-5 and
    worst <= 1e-4, running stats <= 1e-6. Correct code differs only by summation order
    (2e-13 measured between CPU thread counts and layouts) and by the odd last-bit flip in
    the float32 Sinkhorn (~1e-7, as tests/train/test_equivalence.py sees with gloo): 100x
    margin; a step computing in float32 differs by 2e-2 on the gradients (below).
  - float32 on the GPU, TF32 off for matmuls and cuDNN convolutions (TF32 keeps 10 mantissa
    bits: it would measure TF32, not the port): is float32 precision enough? losses <= 1e-4,
    gradients all <= 0.1 and worst <= 0.25, running stats <= 1e-4. Measured for this model
    on the CPU, float32 vs float64: losses 3e-7 to 2e-6, running stats 7e-6 to 9e-6, but
    gradients 2e-2 (all) and 3e-2 (worst): a randomly initialised ResNet-50 in training mode
    amplifies rounding through its ~50 BatchNorms in the backward (ResNet-18: 4e-3); the
    same in bf16 gives 1.8e-2 on the losses, 1.4 on the gradients and 6e-2 on the running
    stats, so each tolerance separates float32 noise from a bf16/TF32 leak or a wrong op.

[ddp] **2 x B on two GPUs (nccl) against 1 x 2B on one.** Needs 2 GPUs (else "skipped").
Two processes spawned with ``torch.multiprocessing`` (``init_process_group("nccl")`` on
127.0.0.1 and a free port), each building the small model of [exact] with
``build_model(config, position_group=group)``, converting its BatchNorms with
``convert_group_batchnorm(model, group)`` (the project's one synchronised BatchNorm on every
backend) and wrapping it in DistributedDataParallel as train/loop.py does; each gets B = 8
of the 16 images of every crop, and Sinkhorn runs over the group. The reference is one
process, one GPU, all 16 images, no group. Float64 on the GPUs, so that only the
collectives can make a difference: the mean of the two workers' losses against the
1-process losses <= 1e-5, every worker's gradients (DDP's average) worst tensor <= 1e-4,
running stats <= 1e-5. Correct code agrees to ~1e-7 (the float32 Sinkhorn); without the
synchronised BatchNorm the three rows read 6e-2, 1.6 and 1.0 (measured with gloo). With
``--device cpu --smoke`` the same code runs on two CPU processes with gloo.

[speed] **Images/s of the training step.** ``experiments/coco2017_400ep.yaml`` as one worker
runs it: ResNet-50, B = 64 (``--batch``), 2 x 224 + 6 x 96 crops, bf16 autocast,
channels-last, ``GaelleStepper.step`` on uint8 crops already on the GPU (colour ops on the
device, forward, losses, backward, LARC step), eager and ``torch.compile``'d (the model,
as train/loop.py does with train.compile). Median of ``--steps`` (20) steps after 3 warm-up
steps (4 with compile; the compile time is shown). The step's model FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` on one eager step (forward and backward:
~5.1 TFLOP at B = 64); MFU = achieved step FLOP/s / the FLOP/s of an 8192^3 bf16 matmul
measured in the same run (a measured ceiling, not the datasheet's). Info rows.

[colour] **Colour ops on the GPU against the CPU ones, same crops, same parameters.** Real
crops of toy images (the stream's own ``crop_item``: 64 images, 128 crops of 224 px and 384
of 96 px), one parameter set per crop drawn once with ``sample_colour_params`` (the coco
config: jitter 0.8/0.8/0.8/0.2 with p 0.8, grayscale p 0.2, blur p 0.5) and passed to both
``ColourAugment(backend="batched")`` on the GPU (what the training step runs) and
``ColourAugment(backend="cpu")`` on the CPU (what CPU workers and the stream run;
``torch.compile``'d kernels as configured). One row per crop size. Tolerance: the largest
difference over every pixel and channel <= 0.5 grey level (the difference in normalised
units times 255 x the channel's std), under half a step of the uint8 input. Both sides
compute in float32, the GPU with TF32 off: rounding only (CPU batched vs CPU path: ~1e-3
grey level), while a wrong parameter, op or op order shows as tens of grey levels. The
GPU side is also run as training runs it, cuDNN's blur convolutions in TF32 by default
(10 mantissa bits: estimated ~0.1-0.2 grey level at worst); that figure is shown, without
a tolerance.

[stream] **Data wait of a real stream.** A toy shard set (``prepare_toy``: 20 x B = 1280
images of 256 px, in a temporary directory, removed at the end), the project's Ray Data
stream (``build_pretrain_stream`` + ``epoch_batches``, the crops of [speed], 3 epochs = 60
batches) on a local Ray instance (127.0.0.1, this machine's CPUs less one for the driver):
first alone (images/s after the first batch, and the start-up to that batch), then feeding
the eager bf16 step of [speed]: images/s of the fed step, as a share of the step alone,
and the share of its time spent waiting for data (first batch and step excluded). Info
rows. Toy JPEGs are small: a COCO image (~640 x 480) decodes several times slower, so per
CPU the stream is slower on COCO than here.

Runtime on one H200 with 16 cores (estimated: not yet run on a GPU): exact ~15 s, ddp
~30 s, speed ~2-3 min (mostly inductor compiling), colour ~30 s (compiling the CPU colour
kernels), stream ~30 s; at most 8 minutes.

``--smoke``: ResNet-18 with tiny heads, crops 2 x 32 + 6 x 16 (2 x 32 + 2 x 16 in [exact]
and [ddp]), B = 4, 2 timed steps, 24 toy images of 64 px. With ``--device cpu`` the GPU side
of every comparison is the CPU (the figures then only show that the code runs), torch uses
one thread, the compile-on row uses the ``aot_eager`` backend (inductor's cold compile
takes minutes on 2 cores; ``--compile-backend`` picks another) and the CPU colour kernels run
eagerly. 35-45 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a loopback-only local instance

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from gaelle_ray.config import Config, load_config  # noqa: E402
from gaelle_ray.data.colour import ColourAugment  # noqa: E402
from gaelle_ray.data.colour_ops import sample_colour_params  # noqa: E402
from gaelle_ray.losses.gaelle import LossSettings, gaelle_losses, local_pairs  # noqa: E402
from gaelle_ray.model import build_model  # noqa: E402
from gaelle_ray.model.norm import convert_group_batchnorm  # noqa: E402
from gaelle_ray.train.step import GaelleStepper  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "experiments" / "coco2017_400ep.yaml"
ROW_KEYS = ("exact", "ddp", "speed", "colour", "stream")
NO_CUDA_LINE = ("gpu_acceptance: no CUDA device on this machine, nothing to check "
                "(`--device cpu --smoke` runs the script's code on the CPU)")

# tolerances (the module docstring says why)
EXACT_TOL = {"float64": {"loss": 1e-6, "grad_all": 1e-5, "grad_worst": 1e-4, "buffer": 1e-6},
             "fp32": {"loss": 1e-4, "grad_all": 1e-1, "grad_worst": 2.5e-1, "buffer": 1e-4}}
DDP_LOSS_RTOL = 1e-5
DDP_GRAD_RTOL = 1e-4
DDP_BUFFER_RTOL = 1e-5
COLOUR_GREY_TOL = 0.5

WORKER_ERRORS = (mp.ProcessRaisedException, mp.ProcessExitedException)  # a spawned worker failed


def log(msg: str) -> None:
    print(f"[gpu_acceptance] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Plan:
    """Every size the rows use; `full` for the GPU run, `smoke` for CI."""

    smoke: bool
    batch: int  # speed/stream rows: images per step
    steps: int  # timed steps per mode of the speed row
    warmup: int
    compile_backend: str
    matmul_n: int
    matmul_reps: int
    toy_images: int  # train images of the toy set (stream and colour rows)
    toy_size: int
    rows_per_item: int
    colour_images: int  # images whose crops the colour row compares
    stream_epochs: int  # passes over the toy set per stream measurement
    speed_overrides: dict = field(default_factory=dict)
    exact_overrides: dict = field(default_factory=dict)
    exact_batch: int = 8  # per worker in the ddp row; the whole batch of the exact row


def make_plan(args) -> Plan:
    if not args.smoke:
        batch = args.batch or 64
        return Plan(
            smoke=False, batch=batch, steps=args.steps or 20, warmup=3,
            compile_backend=args.compile_backend or "inductor", matmul_n=8192, matmul_reps=50,
            toy_images=20 * batch, toy_size=256, rows_per_item=64, colour_images=64, stream_epochs=3,
            speed_overrides={"train.batch_size_per_worker": batch},
            exact_overrides={"model.arch": "resnet50", "augmentation.size_crops": [96, 64],
                             "augmentation.nmb_crops": [2, 4], "model.hidden_mlp": 256,
                             "model.feat_dim": 64, "model.nmb_prototypes": 100,
                             "model.nmb_local_prototypes": 80},
            exact_batch=8)
    batch = args.batch or 4
    backend = args.compile_backend or ("aot_eager" if args.device == "cpu" else "inductor")
    tiny_model = {"model.arch": "resnet18", "model.hidden_mlp": 32, "model.feat_dim": 16,
                  "model.nmb_prototypes": 12, "model.nmb_local_prototypes": 10}
    return Plan(
        smoke=True, batch=batch, steps=args.steps or 2, warmup=1,
        compile_backend=backend, matmul_n=256, matmul_reps=3,
        toy_images=6 * batch, toy_size=64, rows_per_item=8, colour_images=8, stream_epochs=1,
        speed_overrides={**tiny_model, "train.batch_size_per_worker": batch,
                         "augmentation.size_crops": [32, 16], "augmentation.nmb_crops": [2, 6],
                         "augmentation.min_scale_crops": [0.3, 0.1],
                         "augmentation.max_scale_crops": [1.0, 0.3],
                         "augmentation.compile_cpu_colour": args.device != "cpu"},
        exact_overrides={**tiny_model, "augmentation.size_crops": [32, 16],
                         "augmentation.nmb_crops": [2, 2]},
        exact_batch=4)


def base_config(overrides: dict) -> Config:
    """coco2017_400ep.yaml as one worker, no queue, with `overrides` (dotted keys)."""
    fixed = {"train.num_workers": 1, "train.precision": "bf16", "queue.queue_length": 0,
             "queue.local_queue_length": 0, "eval.online_every_epochs": 0}
    return load_config(BASE_CONFIG).replace({**fixed, **overrides})


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    check: str
    measured: str
    tolerance: str = "-"
    result: str = "info"  # PASS | FAIL | info | skipped (needs ...)


def tol_row(check: str, measured: str, value: float, limit: float, tolerance: str | None = None) -> Row:
    ok = math.isfinite(value) and value <= limit
    return Row(check, measured, tolerance or f"<= {limit:g}", "PASS" if ok else "FAIL")


def print_table(header: str, rows: list[Row]) -> None:
    cols = ("check", "measured", "tolerance", "result")
    cells = [cols] + [(r.check, r.measured, r.tolerance, r.result) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    line = "  ".join("-" * w for w in widths)
    print(header)
    print(line)
    for i, c in enumerate(cells):
        print("  ".join(text.ljust(w) for text, w in zip(c, widths)).rstrip())
        if i == 0:
            print(line)
    print(line)


# ----------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def no_tf32():
    """Full float32 matmuls and cuDNN convolutions inside (TF32 rounds their inputs to 10
    mantissa bits), the previous flags restored after. torch's legacy flags, or its newer
    fp32_precision settings where something already set those (mixing the two is an error)."""
    b = torch.backends
    try:
        old = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    except RuntimeError:  # flags set through the newer API: use it
        old_new = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision)
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = "ieee", "ieee"
        try:
            yield
        finally:
            b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = old_new
        return
    b.cuda.matmul.allow_tf32 = False
    b.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = old


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (the absolute difference when b is 0)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())


def short_error(exc: BaseException) -> str:
    """One line naming an exception (a worker's own error for a failed spawned process)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = (lines[-1] if isinstance(exc, WORKER_ERRORS) else lines[0]) if lines else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exact_inputs(config: Config, batch: int):
    """(model in training mode, float32 CPU crops (n_r * batch, 3, S, S) crop-major, slot
    permutations (P, S)); the same in every process (seeded)."""
    torch.manual_seed(0)
    model = build_model(config).train()
    g = torch.Generator().manual_seed(1)
    aug = config.augmentation
    crops = [torch.randn(n * batch, 3, s, s, generator=g) for s, n in zip(aug.size_crops, aug.nmb_crops)]
    pairs = local_pairs(config.loss.crops_for_assign, aug.num_global_crops)
    perms = torch.stack([torch.randperm(config.num_slots, generator=g) for _ in pairs])  # (P, S)
    return model, crops, perms


def loss_and_grads(model, forward, crops, perms, settings, group=None) -> dict:
    """One forward, the three losses and backward; everything back on the CPU."""
    terms = gaelle_losses(forward(crops), settings, slot_perms=perms, group=group)
    terms.total.backward()
    return {"losses": {k: getattr(terms, k).detach().cpu() for k in ("total", "global_", "local", "l2g")},
            "grads": {n: (p.grad.detach().cpu() if p.grad is not None else None)
                      for n, p in model.named_parameters()},
            "buffers": {n: b.detach().cpu() for n, b in model.named_buffers() if b.is_floating_point()}}


GRAD_FLOOR = 1e-4  # a tensor's gradient error is measured against at least this share of the total norm


def compare(test: dict, ref: dict) -> dict:
    """Relative differences of losses, gradients and float buffers (test vs ref).

    A tensor's gradient error is ||t - g|| / max(||g||, GRAD_FLOOR * ||all of g||): the
    gradient of a bias followed by a BatchNorm is 0 in exact arithmetic, and its rounding
    noise relative to 0 means nothing."""
    loss = max(rel(test["losses"][k], ref["losses"][k]) for k in ref["losses"])
    missing = [n for n, g in ref["grads"].items() if (g is None) != (test["grads"].get(n) is None)]
    if missing:
        return {"loss": loss, "grad_all": math.inf, "grad_worst": math.inf,
                "grad_worst_name": f"{missing[0]}: a gradient on one side only", "buffer": math.inf,
                "buffer_name": "-"}
    pairs = [(n, t.double(), g.double()) for n, g in ref["grads"].items()
             if g is not None and (t := test["grads"][n]) is not None]
    num = math.sqrt(sum(float((t - g).pow(2).sum()) for _, t, g in pairs))
    den = math.sqrt(sum(float(g.pow(2).sum()) for _, _, g in pairs))
    floor = GRAD_FLOOR * den
    worst_grad, worst_name = -1.0, "-"
    for name, t, g in pairs:
        r = float((t - g).norm()) / max(float(g.norm()), floor, 1e-300)
        if r > worst_grad:
            worst_grad, worst_name = r, name
    worst_buf, buf_name = -1.0, "-"
    for name, b in ref["buffers"].items():
        r = rel(test["buffers"][name], b)
        if r > worst_buf:
            worst_buf, buf_name = r, name
    return {"loss": loss, "grad_all": num / den if den > 0 else num, "grad_worst": max(worst_grad, 0.0),
            "grad_worst_name": worst_name, "buffer": max(worst_buf, 0.0), "buffer_name": buf_name}


# ----------------------------------------------------------------------------- [exact]


def note(state: dict, line: str) -> None:
    """A line of the set-up printed under the table's header (once)."""
    if line not in state.setdefault("setup", []):
        state["setup"].append(line)


def shape_of(config: Config, b: int) -> str:
    aug = config.augmentation
    return f"{config.model.arch} B={b} {'+'.join(f'{n}x{s}' for s, n in zip(aug.size_crops, aug.nmb_crops))}"


def row_exact(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    config = base_config(plan.exact_overrides)
    b = plan.exact_batch
    model, crops, perms = exact_inputs(config, b)
    settings = LossSettings.from_config(config, batch_size=b)
    ref_model = copy.deepcopy(model).double()
    ref = loss_and_grads(ref_model, ref_model, [c.double() for c in crops], perms, settings)
    note(state, f"exact, ddp: {shape_of(config, b)} per process, small heads, random crops")
    rows = []
    for dtype, tol in ((torch.float64, EXACT_TOL["float64"]), (torch.float32, EXACT_TOL["fp32"])):
        test_model = copy.deepcopy(model).to(device, dtype)
        with no_tf32():
            test = loss_and_grads(test_model, test_model, [c.to(device, dtype) for c in crops], perms.to(device),
                                  settings)
        del test_model
        d = compare(test, ref)
        name = "float64" if dtype == torch.float64 else "fp32"
        what = f"{name} {device.type}{' (TF32 off)' if device.type == 'cuda' and name == 'fp32' else ''} vs float64 cpu"
        rows += [
            tol_row(f"{what}: losses", f"max rel {d['loss']:.1e} of 4 terms", d["loss"], tol["loss"]),
            tol_row(f"{what}: gradients",
                    f"all rel {d['grad_all']:.1e}; worst {d['grad_worst']:.1e} ({d['grad_worst_name']})",
                    max(d["grad_all"] / tol["grad_all"], d["grad_worst"] / tol["grad_worst"]), 1.0,
                    f"all <= {tol['grad_all']:g}, worst <= {tol['grad_worst']:g}"),
            tol_row(f"{what}: BN running stats", f"worst rel {d['buffer']:.1e} ({d['buffer_name']})",
                    d["buffer"], tol["buffer"]),
        ]
    return rows


# ----------------------------------------------------------------------------- [ddp]


def my_rows(crops: list[torch.Tensor], rank: int, b: int, world: int) -> list[torch.Tensor]:
    """Worker `rank` gets images [rank*b, (rank+1)*b) of every crop, crop-major."""
    out = []
    for c in crops:
        v = c.shape[0] // (world * b)
        out.append(c.reshape(v, world * b, *c.shape[1:])[:, rank * b:(rank + 1) * b].reshape(v * b, *c.shape[1:]))
    return out


def ddp_worker(rank: int, world: int, port: int, backend: str, config_dict: dict, b: int, out_dir: str) -> None:
    """One of the `world` processes of the [ddp] row: B = b images of every crop, float64."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        with no_tf32():
            config = Config.from_dict(config_dict)
            group = dist.group.WORLD
            _, crops, perms = exact_inputs(config, world * b)
            torch.manual_seed(0)  # the same initial weights as exact_inputs' model
            model = build_model(config, position_group=group).train()
            model = convert_group_batchnorm(model, group).to(device, torch.float64)
            ddp = DDP(model, device_ids=[rank] if device.type == "cuda" else None)  # as train/loop.py
            settings = LossSettings.from_config(config, batch_size=b)
            rows = [c.to(device, torch.float64) for c in my_rows(crops, rank, b, world)]
            result = loss_and_grads(model, ddp, rows, perms.to(device), settings, group=group)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_workers(world: int, backend: str, config: Config, b: int, out_dir: str, timeout_s: float = 300,
                attempts: int = 2) -> None:
    """Spawn the `world` workers and wait for them; a second try on a fresh port if they fail
    (the free port can be taken by another process between choosing it and binding it)."""
    for attempt in range(1, attempts + 1):
        ctx = mp.start_processes(ddp_worker, args=(world, free_port(), backend, config.to_dict(), b, out_dir),
                                 nprocs=world, start_method="spawn", join=False)
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=2):
                if time.monotonic() > deadline:
                    for p in ctx.processes:  # the processes started just above, by their handles
                        if p.is_alive():
                            p.kill()
                    raise TimeoutError(f"the {world} {backend} workers did not finish in {timeout_s:.0f} s")
            return
        except WORKER_ERRORS as exc:
            if attempt == attempts:
                raise
            log(f"the {backend} workers failed ({short_error(exc)}); trying again on another port")


def row_ddp(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    if device.type == "cuda":
        if torch.cuda.device_count() < 2:
            return [Row(f"2 x {plan.exact_batch} nccl vs 1 x {2 * plan.exact_batch}", "-", "-",
                        "skipped (needs 2 GPUs)")]
        backend = "nccl"
    else:
        backend = "gloo"  # --device cpu --smoke: the same code on two CPU processes
    config = base_config(plan.exact_overrides)
    b, world = plan.exact_batch, 2
    note(state, f"exact, ddp: {shape_of(config, b)} per process, small heads, random crops")
    with tempfile.TemporaryDirectory(prefix="gaelle-ddp-") as tmp:
        run_workers(world, backend, config, b, tmp)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(world)]
    model, crops, perms = exact_inputs(config, world * b)
    model = model.to(device, torch.float64)
    with no_tf32():
        ref = loss_and_grads(model, model, [c.to(device, torch.float64) for c in crops], perms.to(device),
                             LossSettings.from_config(config, batch_size=world * b))
    mean_losses = {k: sum(r["losses"][k] for r in results) / world for k in ref["losses"]}
    loss = max(rel(mean_losses[k], ref["losses"][k]) for k in ref["losses"])
    per_rank = [compare(r, ref) for r in results]
    grad = max(d["grad_worst"] for d in per_rank)
    grad_name = max(per_rank, key=lambda d: d["grad_worst"])["grad_worst_name"]
    buf = max(d["buffer"] for d in per_rank)
    buf_name = max(per_rank, key=lambda d: d["buffer"])["buffer_name"]
    what = f"{world} x {b} {backend} vs 1 x {world * b} (float64)"
    return [
        tol_row(f"{what}: losses", f"max rel {loss:.1e} of 4 terms (workers' mean)", loss, DDP_LOSS_RTOL),
        tol_row(f"{what}: gradients", f"worst rel {grad:.1e} ({grad_name}, any worker)", grad, DDP_GRAD_RTOL),
        tol_row(f"{what}: BN running stats", f"worst rel {buf:.1e} ({buf_name})", buf, DDP_BUFFER_RTOL),
    ]


# ----------------------------------------------------------------------------- [speed]


def matmul_rate(device: torch.device, n: int, reps: int) -> float:
    """Achieved FLOP/s of an n x n x n bf16 matmul on `device`."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def random_crops(config: Config, batch: int, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    aug = config.augmentation
    return [torch.randint(0, 256, (n * batch, 3, s, s), generator=g, dtype=torch.uint8).to(device)
            for s, n in zip(aug.size_crops, aug.nmb_crops)]


def make_stepper(config: Config, device: torch.device, compile_backend: str | None) -> GaelleStepper:
    """The model and step one training worker builds (train/loop.py), for one worker."""
    torch.manual_seed(0)
    model = build_model(config).to(device).train()
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    return GaelleStepper(model, config, device, iters_per_epoch=1000, forward_model=forward)


def step_flops(stepper: GaelleStepper, crops, epochs: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        stepper.step(crops, 0, epochs)
    return int(counter.get_total_flops())


def time_steps(stepper: GaelleStepper, crops, epochs: int, warmup: int, steps: int, device) -> tuple[float, float]:
    """(median seconds per step, seconds of the warm-up steps)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        stepper.step(crops, 0, epochs)
    sync(device)
    warm_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        stepper.step(crops, 0, epochs)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm_s


def speed_config(plan: Plan) -> Config:
    return base_config(plan.speed_overrides)


def flop_rate(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.1f} GFLOP/s"


def row_speed(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    config = speed_config(plan)
    b = plan.batch
    crops = random_crops(config, b, device)
    note(state, f"speed, stream: {shape_of(config, b)} {config.train.precision}, channels_last "
                f"{config.train.channels_last}, GaelleStepper.step on uint8 crops (colour on the device)")
    peak = matmul_rate(device, plan.matmul_n, plan.matmul_reps)
    eager = make_stepper(config, device, None)
    flops = step_flops(eager, crops, config.train.epochs)  # also the eager mode's first warm-up step
    state["eager_stepper"] = eager  # the stream row feeds this one
    rows = [Row(f"bf16 matmul {plan.matmul_n}^3 ({device.type})", f"{flop_rate(peak)} measured"),
            Row("step model FLOPs (FlopCounterMode)", f"{flops / 1e9:.1f} GFLOP per step (forward + backward)")]
    for mode in ("off", "on"):
        check = f"step, compile {mode}"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            stepper = eager if mode == "off" else make_stepper(config, device, plan.compile_backend)
            warmup = plan.warmup - 1 if mode == "off" else plan.warmup + 1  # compile: one more (recompiles)
            t, warm_s = time_steps(stepper, crops, config.train.epochs, warmup, plan.steps, device)
        except Exception as exc:  # noqa: BLE001 (a failed compile must not hide the eager figures)
            if mode == "off":
                raise
            traceback.print_exc(file=sys.stderr)
            rows.append(Row(f"{check} ({plan.compile_backend})", f"error: {short_error(exc)}", "-", "FAIL"))
            continue
        ips = b / t
        if mode == "off":
            state["step_ips"] = ips
        mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
        backend = "" if mode == "off" else f" ({plan.compile_backend}; warm-up {warm_s:.0f} s)"
        rows.append(Row(f"{check}{backend}",
                        f"{ips:.1f} img/s ({1e3 * t:.1f} ms/step), {flop_rate(flops / t)}, "
                        f"MFU {100 * flops / t / peak:.1f}%{mem}"))
        del stepper
    return rows


# ----------------------------------------------------------------------------- toy shards


def toy_shards(plan: Plan, state: dict) -> str:
    """The toy shard set of the colour and stream rows (made once, in a temporary directory)."""
    if "shards" not in state:
        from gaelle_ray.data.prepare import prepare_toy

        tmp = tempfile.mkdtemp(prefix="gaelle-acceptance-")
        state["tmp"] = tmp
        workers = max(1, min(16, os.cpu_count() or 1)) if plan.toy_images >= 256 else 1  # a pool costs seconds
        t0 = time.perf_counter()
        prepare_toy(os.path.join(tmp, "shards"), n_train=plan.toy_images, n_val=1, image_size=plan.toy_size,
                    seed=0, workers=workers, row_group_size=plan.rows_per_item)
        log(f"toy shards: {plan.toy_images} images of {plan.toy_size} px in {time.perf_counter() - t0:.1f} s")
        state["shards"] = os.path.join(tmp, "shards")
    return state["shards"]


def stream_config(plan: Plan, state: dict) -> Config:
    return speed_config(plan).replace({"data.shards": toy_shards(plan, state), "data.split": "train",
                                       "data.max_images": 0, "train.epochs": max(2, plan.stream_epochs)})


# ----------------------------------------------------------------------------- [colour]


def row_colour(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    from gaelle_ray.data.pipeline import StreamPlan, crop_item

    config = stream_config(plan, state)
    aug = config.augmentation
    splan = StreamPlan.from_config(config, rows_per_item=plan.colour_images)
    made = crop_item(splan, 0, splan.items[0])  # crops_r: (N, n_r, 3, S, S) uint8
    std = torch.tensor(aug.std, dtype=torch.float64).view(1, 3, 1, 1)
    side = f"{device.type} batched"
    cpu_kind = "compiled" if aug.compile_cpu_colour else "eager"
    rows = []
    for r, size in enumerate(aug.size_crops):
        crops = torch.from_numpy(made[f"crops_{r}"])
        crops = crops.reshape(-1, *crops.shape[2:])  # (N*n_r, 3, S, S)
        params = sample_colour_params(crops.shape[0], torch.Generator().manual_seed(7 + r), cfg=aug)
        on_cpu = ColourAugment(aug, device="cpu", backend="cpu")(crops, params=params)

        def grey_levels(tf32: bool) -> tuple[float, float]:
            """(max difference in grey levels, in normalised units) of the device side."""
            with contextlib.nullcontext() if tf32 else no_tf32():
                on_device = ColourAugment(aug, device=device, backend="batched")(crops.to(device), params=params)
            diff = (on_device.cpu().double() - on_cpu.double()).abs()  # (N, 3, S, S) normalised units
            return float((diff * 255.0 * std).max()), float(diff.max())

        grey, norm = grey_levels(tf32=False)
        tf32 = f"; {grey_levels(tf32=True)[0]:.2g} with TF32 (training's default)" if device.type == "cuda" else ""
        used = (f"jitter {int(params.jitter.sum())}, grey {int(params.grayscale.sum())}, "
                f"blur {int(params.blur.sum())} of {crops.shape[0]}")
        rows.append(tol_row(f"colour {side} vs cpu path ({cpu_kind}), {size} px",
                            f"max {grey:.2g} grey level ({norm:.1e} normalised){tf32}; {used}",
                            grey, COLOUR_GREY_TOL, f"<= {COLOUR_GREY_TOL} grey level"))
    return rows


# ----------------------------------------------------------------------------- [stream]


def row_stream(plan: Plan, device: torch.device, state: dict) -> list[Row]:
    import ray
    import ray.data

    from gaelle_ray.data.pipeline import build_pretrain_stream, count_rows, epoch_batches, steps_per_epoch

    config = stream_config(plan, state)
    b = plan.batch
    steps, epochs = steps_per_epoch(config, count_rows(config), 1), plan.stream_epochs
    cpus = max(2, (os.cpu_count() or 2) - (1 if device.type == "cuda" else 0))
    stepper = state.get("eager_stepper") or make_stepper(config, device, None)
    step_ips = state.get("step_ips")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=cpus, include_dashboard=False,
                 log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # no per-execution INFO lines
        cpus = int(ray.cluster_resources().get("CPU", cpus))

        def batches():
            ds = build_pretrain_stream(config, 0, epochs, rows_per_item=plan.rows_per_item)
            return epoch_batches(ds, b, steps, epochs, device, prefetch_batches=config.data.prefetch_batches)

        # the stream alone
        t0 = time.perf_counter()
        startup, t1, n = None, None, 0
        for batch in batches():
            sync(device)
            if startup is None:
                startup, t1 = time.perf_counter() - t0, time.perf_counter()
            else:
                n += 1
        alone_ips = n * b / (time.perf_counter() - t1) if n else float("nan")
        # the step fed by the stream (the first batch and step are the warm-up)
        waits, t1, n = [], None, 0
        for batch in batches():
            if t1 is not None:
                waits.append(batch.wait_s)
            stepper.step(batch.crops, 0, config.train.epochs)
            sync(device)
            if t1 is None:
                t1 = time.perf_counter()
            else:
                n += 1
        total = time.perf_counter() - t1 if n else float("nan")
    finally:
        if started_here:
            ray.shutdown()
    fed_ips = n * b / total if n else float("nan")
    share = sum(waits) / total if n else float("nan")
    vs = f" = {fed_ips / step_ips:.2f} of the step alone" if step_ips else ""
    note(state, f"stream: {plan.toy_images} toy images of {plan.toy_size} px x {epochs} epoch{'s' * (epochs > 1)} "
                f"= {epochs * steps} batches, local Ray with {cpus} CPUs")
    return [Row("Ray Data stream alone",
                f"{alone_ips:.1f} img/s after the first batch (first batch after {startup:.1f} s)"),
            Row("eager step fed by the stream",
                f"{fed_ips:.1f} img/s{vs}; data wait {100 * share:.0f}% of step time")]


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default; without one the script says so and exits 0) or cpu (needs --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and few steps (CI)")
    p.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma-separated subset of {','.join(ROW_KEYS)}")
    p.add_argument("--batch", type=int, default=0, help="images per step of the speed and stream rows "
                   "(default 64, smoke 4)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per compile mode (default 20, smoke 2)")
    p.add_argument("--compile-backend", default="", help="torch.compile backend of the compile-on row "
                   "(default inductor; aot_eager with --device cpu --smoke)")
    args = p.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROW_KEYS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {', '.join(ROW_KEYS)}")
    args.rows = rows
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu runs the tiny shapes only: add --smoke (full-size CPU figures: benchmarks/train_step.py)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(NO_CUDA_LINE)
        return 0
    plan = make_plan(args)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cpu":
        # the CPU smoke exercises code; one thread keeps it fast and steady on a shared
        # machine (OpenMP threads waiting on a busy core made steps 10x slower here)
        torch.set_num_threads(1)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        header = (f"GAELLE GPU acceptance: {torch.cuda.get_device_name(device)} x {torch.cuda.device_count()}, "
                  f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    else:
        header = f"GAELLE GPU acceptance on CPU ({os.cpu_count()} cores), torch {torch.__version__}"
    header += f", {'smoke (tiny shapes)' if plan.smoke else 'full shapes'}"
    funcs = {"exact": row_exact, "ddp": row_ddp, "speed": row_speed, "colour": row_colour, "stream": row_stream}
    state: dict = {}
    rows: list[Row] = []
    t_start = time.perf_counter()
    try:
        for key in ROW_KEYS:
            if key not in args.rows:
                continue
            log(f"{key} ...")
            t0 = time.perf_counter()
            try:
                rows += funcs[key](plan, device, state)
            except Exception as exc:  # noqa: BLE001 (a row that raises is a failed row)
                traceback.print_exc(file=sys.stderr)
                rows.append(Row(f"[{key}]", f"error: {short_error(exc)}", "-", "FAIL"))
            log(f"{key}: {time.perf_counter() - t0:.1f} s")
    finally:
        if "tmp" in state:
            shutil.rmtree(state["tmp"], ignore_errors=True)
    print_table("\n".join([header] + [f"  {line}" for line in state.get("setup", [])]), rows)
    counts = {k: sum(r.result.startswith(k) for r in rows) for k in ("PASS", "FAIL", "info", "skipped")}
    print(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['info']} measurements, "
          f"{counts['skipped']} skipped; {time.perf_counter() - t_start:.0f} s")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
