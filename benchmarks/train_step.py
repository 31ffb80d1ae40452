"""Images per second of the full GAELLE training step (forward, losses, backward, LARC step).

CPU (default): the CPU config (ResNet-18) with our step (GaelleStepper: one backbone call
per resolution, vectorised attention and losses) against a reference-style step that runs
every crop through the backbone separately, calls the projection head once per position
and sums the losses pair by pair, with the same weights, data and optimiser rules.

    python benchmarks/train_step.py                     # CPU, experiments/cpu_demo.yaml, B=32
    python benchmarks/train_step.py --device cuda       # ResNet-50, B=64, 2x224+6x96, bf16,
                                                        # eager and torch.compile, MFU

The last line is the median ratio ours / reference (CPU) or the MFU summary (CUDA).
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
    args = parser.parse_args()
    args.batch = args.batch or (32 if args.device == "cpu" else 64)
    (bench_cpu if args.device == "cpu" else bench_cuda)(args)


if __name__ == "__main__":
    main()
