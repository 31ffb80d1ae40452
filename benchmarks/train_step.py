"""Images per second of the full GAELLE training step (forward, losses, backward, LARC step).

CPU (default): the CPU config (ResNet-18) with our step (GaelleStepper: one backbone call
per resolution, vectorised attention and losses) against a reference-style step that runs
every crop through the backbone separately, calls the projection head once per position
and sums the losses pair by pair, with the same weights, data and optimiser rules.

    python benchmarks/train_step.py                     # CPU, experiments/cpu_demo.yaml, B=32
    python benchmarks/train_step.py --switches          # CPU: precision x channels_last x compile
    python benchmarks/train_step.py --swav              # CPU: SwAV-only step vs GAELLE step
    python benchmarks/train_step.py --device cuda       # ResNet-50, B=64, 2x224+6x96, bf16,
                                                        # eager and torch.compile, MFU

The last line is the median ratio ours / reference (CPU) or the MFU summary (CUDA).

--switches times our step (GaelleStepper, the training code's model build) on this CPU
for every combination of train.precision {fp32, bf16}, train.channels_last and
train.compile, on the demo config (ResNet-18, B=64, 2x48 + 4x24) and the headline step
(ResNet-50, B=4, 2x224 + 6x96), each against fp32 / contiguous / eager measured in the
same run (cases interleaved rep by rep). fp16 is left out on a CPU: torch has no fast
float16 convolution there (a compiled ResNet-18 step: 11.3 s in fp16, 0.19 s in
fp32, 2026-11-30); it is exercised by the tests.

--swav times the step with loss.weight_local = loss.weight_l2g = 0 (SwAV-only: no
attention, no local prototypes, no local Sinkhorn) against the full GAELLE step at the
headline shapes (ResNet-50, B=4, 2x224 + 6x96) and on the demo config, interleaved.
On CUDA the script also measures the card's bf16 matmul rate to express model FLOPs
utilisation (MFU = model FLOPs per step / step time / measured matmul rate), and the share
of step time spent waiting for data when fed by the real Ray Data stream (--stream).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from gaelle_ray.config import load_config
from gaelle_ray.losses.gaelle import LossSettings
from gaelle_ray.model import build_model
from gaelle_ray.reference import naive_forward, naive_losses
from gaelle_ray.train.loop import build_training_model
from gaelle_ray.train.optim import drop_prototype_gradients, learning_rate, set_learning_rate
from gaelle_ray.train.step import GaelleStepper

ROOT = Path(__file__).resolve().parents[1]


def _crops(config, batch, device, dtype=torch.float32):
    aug = config.augmentation
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n * batch, 3, s, s, generator=g).to(device, dtype)
            for s, n in zip(aug.size_crops, aug.nmb_crops)]


class ReferenceStep:
    """The published script's step, read literally: per-crop backbone calls, per-position head,
    per-pair losses; same LARC optimiser, schedule and prototype rules as ours."""

    def __init__(self, model, config, batch):
        self.model, self.config, self.batch = model, config, batch
        self.stepper_like = GaelleStepper(model, config, torch.device("cpu"), iters_per_epoch=100)
        self.settings = LossSettings.from_config(config, batch_size=batch)

    def step(self, crops, iteration):
        c, st = self.config, self.settings
        opt = self.stepper_like.optimizer
        set_learning_rate(opt, learning_rate(iteration, 100, c.train.epochs, c.optim))
        self.model.normalize_prototypes()
        out = naive_forward(self.model, crops, batch_size=self.batch)
        perms = {(i, v): torch.randperm(st.n_slots).tolist()  # one per (code crop, predicting crop) pair
                 for i in st.crops_for_assign for v in range(st.n_global) if v != i}
        loss = naive_losses(out, self.batch, st.n_global, st.n_slots, st.crops_for_assign, st.temperature,
                            st.epsilon, st.sinkhorn_iterations, perms, sinkhorn_dtype=torch.float32)["total"]
        opt.zero_grad()
        loss.backward()
        drop_prototype_gradients(self.model, iteration, c.optim.freeze_prototypes_niters)
        opt.step()


def bench_cpu(args):
    config = load_config(ROOT / "experiments" / "cpu_demo.yaml",
                         ["augmentation.colour_on_device=false", f"train.batch_size_per_worker={args.batch}"])
    torch.manual_seed(0)
    model = build_model(config).train()
    ours = GaelleStepper(model, config, torch.device("cpu"), iters_per_epoch=100)
    ref = ReferenceStep(copy.deepcopy(model), config, args.batch)
    crops = _crops(config, args.batch, "cpu")
    ours.step(crops, 0, config.train.epochs)
    ref.step(crops, 0)  # warm-up
    t_ours, t_ref = [], []
    for i in range(args.reps):  # alternate so both see the same machine load
        t0 = time.perf_counter()
        ours.step(crops, 0, config.train.epochs)
        t_ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ref.step(crops, i + 1)
        t_ref.append(time.perf_counter() - t0)
    ips_ours = args.batch / statistics.median(t_ours)
    ips_ref = args.batch / statistics.median(t_ref)
    print(f"cpu config (resnet18 {list(config.augmentation.size_crops)} x {list(config.augmentation.nmb_crops)}) "
          f"B={args.batch}, {torch.get_num_threads()} threads, {args.reps} reps")
    print(f"reference-style step: {ips_ref:.2f} img/s (median {statistics.median(t_ref):.3f}s)")
    print(f"ours:                 {ips_ours:.2f} img/s (median {statistics.median(t_ours):.3f}s)")
    print(f"median ratio ours / reference: {ips_ours / ips_ref:.2f}x")


def _stepper(config):
    torch.manual_seed(0)
    model, forward_model, _ = build_training_model(config, torch.device("cpu"), 1)
    return GaelleStepper(model.train(), config, torch.device("cpu"), iters_per_epoch=100, forward_model=forward_model)


def _u8_crops(config, batch):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (n * batch, 3, s, s), generator=g, dtype=torch.uint8)
            for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]


def _interleaved(cases: dict, crops, epochs: int, reps: int, warmup: int) -> dict:
    """Median seconds per step of each stepper, the cases run one after another in each rep."""
    for name, st in cases.items():
        t0 = time.perf_counter()
        for _ in range(warmup):  # the first compiled call compiles
            st.step(crops, 0, epochs)
        print(f"  {name}: warm-up {time.perf_counter() - t0:.1f}s", flush=True)
    times = {name: [] for name in cases}
    for _ in range(reps):
        for name, st in cases.items():
            t0 = time.perf_counter()
            m = st.step(crops, 0, epochs)
            times[name].append(time.perf_counter() - t0)
            if m.nonfinite:
                raise SystemExit(f"{name}: non-finite step")
    return {name: statistics.median(t) for name, t in times.items()}


def _cpu_settings(args):
    demo = ("demo config (resnet18 B=64 2x48+4x24)", ROOT / "experiments" / "cpu_demo.yaml", 64)
    headline = ("headline step (resnet50 B=4 2x224+6x96)", ROOT / "experiments" / "coco2017_400ep.yaml", 4)
    return [s for s in (demo, headline) if args.only in ("", "demo" if s is demo else "headline")]


def bench_switches(args):
    for title, path, batch in _cpu_settings(args):
        base = ["augmentation.colour_on_device=true", f"train.batch_size_per_worker={batch}", "train.num_workers=1",
                "train.use_gpu=false"]
        cases = {}
        for precision in ("fp32", "bf16"):
            for cl in (False, True):
                for compile_ in (False,) if args.no_compile else (False, True):
                    c = load_config(path, base + [f"train.precision={precision}", f"train.channels_last={str(cl).lower()}",
                                                  f"train.compile={str(compile_).lower()}"])
                    cases[f"{precision} channels_last={'on ' if cl else 'off'} compile={'on ' if compile_ else 'off'}"] = \
                        _stepper(c)
        print(f"{title}, {torch.get_num_threads()} threads, {args.reps} reps", flush=True)
        crops = _u8_crops(c, batch)
        med = _interleaved(cases, crops, c.train.epochs, args.reps, warmup=3)
        base_name = next(iter(cases))
        for name, t in med.items():
            print(f"  {name}: {batch / t:7.2f} img/s  ({t:.3f} s/step)  {med[base_name] / t:.2f}x fp32 eager")
        best = min(med, key=med.get)
        print(f"fastest on {title}: {best}, {med[base_name] / med[best]:.2f}x fp32 eager", flush=True)


def bench_swav(args):
    for title, path, batch in _cpu_settings(args):
        base = ["augmentation.colour_on_device=true", f"train.batch_size_per_worker={batch}", "train.num_workers=1",
                "train.use_gpu=false", "train.precision=fp32", "train.channels_last=false"]
        gaelle = load_config(path, base)
        swav = load_config(path, base + ["loss.weight_local=0", "loss.weight_l2g=0"])
        print(f"{title}, {torch.get_num_threads()} threads, {args.reps} reps", flush=True)
        med = _interleaved({"GAELLE": _stepper(gaelle), "SwAV-only": _stepper(swav)}, _u8_crops(gaelle, batch),
                           gaelle.train.epochs, args.reps, warmup=1)
        for name, t in med.items():
            print(f"  {name:9s}: {batch / t:7.2f} img/s  ({t:.3f} s/step)")
        print(f"SwAV-only / GAELLE step time on {title}: {med['SwAV-only'] / med['GAELLE']:.3f} "
              f"(GAELLE costs {100 * (med['GAELLE'] / med['SwAV-only'] - 1):.1f}% more)", flush=True)


def _matmul_rate(device, dtype=torch.bfloat16, n=8192, reps=20):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def _step_flops(stepper, crops, epochs):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        stepper.step(crops, 0, epochs)
    return counter.get_total_flops()


def bench_cuda(args):
    device = torch.device("cuda")
    config = load_config(ROOT / "experiments" / "coco2017_400ep.yaml",
                         ["augmentation.colour_on_device=true", f"train.batch_size_per_worker={args.batch}",
                          "train.num_workers=1", "train.precision=bf16"])
    crops_u8 = [torch.randint(0, 256, (n * args.batch, 3, s, s), dtype=torch.uint8, device=device)
                for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]
    peak = _matmul_rate(device)
    print(f"{torch.cuda.get_device_name(device)}: measured bf16 matmul {peak / 1e12:.1f} TFLOP/s")
    for compile_ in (False, True):
        c = config.replace({"train.compile": compile_})
        torch.manual_seed(0)
        model = build_model(c).to(device).to(memory_format=torch.channels_last).train()
        forward = torch.compile(model) if compile_ else model
        stepper = GaelleStepper(model, c, device, iters_per_epoch=100, forward_model=forward)
        for _ in range(3 if not compile_ else 5):
            stepper.step(crops_u8, 0, c.train.epochs)
        flops = _step_flops(stepper, crops_u8, c.train.epochs)
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            stepper.step(crops_u8, 0, c.train.epochs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        print(f"resnet50 B={args.batch} 2x224+6x96 bf16 compile={compile_}: {args.batch / t:.1f} img/s, "
              f"{flops / t / 1e12:.1f} TFLOP/s model, MFU {100 * flops / t / peak:.1f}% of measured matmul")
    if args.stream:
        print("data wait share with the Ray Data stream: run `gaelle pretrain` with the same config on the "
              "GPU machine and read data_wait_share in MLflow / the progress line")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=0, help="images per step (default 32 CPU, 64 CUDA)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--stream", action="store_true", help="(cuda) note how to measure the data wait share")
    parser.add_argument("--switches", action="store_true", help="(cpu) precision x channels_last x compile")
    parser.add_argument("--swav", action="store_true", help="(cpu) SwAV-only step vs GAELLE step")
    parser.add_argument("--only", default="", choices=["", "demo", "headline"],
                        help="(--switches/--swav) one of the two settings")
    parser.add_argument("--no-compile", action="store_true", help="(--switches) eager cases only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.batch = args.batch or (32 if args.device == "cpu" else 64)
    if args.device == "cuda":
        bench_cuda(args)
    elif args.switches:
        bench_switches(args)
    elif args.swav:
        bench_swav(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
