"""Multi-crop input pipeline on this CPU: the reference per-crop PIL pipeline against ours,
then our function through the Ray Data stream against a plain loop on the same cores.

    python benchmarks/pipeline_cpu.py                      # everything, ~3 min on 2 cores
    python benchmarks/pipeline_cpu.py --skip-ray           # single-process part only
    python benchmarks/pipeline_cpu.py --images 1000        # Ray part with the 1k stream only

Images: photo-like 640x480 JPEGs (smooth multi-scale colour noise, flat shapes, sensor-like
noise; ~100 KB at quality 90) generated in a temporary directory, ``--files`` of them. The
toy generator only makes square scenes, so it is not used. Crops: method.md section 1
(2 x 224 + 6 x 96). Every timing runs with torch threads = 1.

Part 1, one process: images per CPU second of the process (= per core, and insensitive to
other work on the machine) and per wall second:
  (a) the reference (benchmarks/pipeline_reference.py) in a torch DataLoader, num_workers
      0 (and 1, wall clock only: the work happens in the worker process);
  (b) ours, every augmentation on the CPU (``multicrop_images(colour=True)``, the
      colour ops as torch.compile'd kernels, compiled in a warm-up call first);
  (c) ours, the CPU part only (the colour half is left to the training device);
  (d) JPEG decode alone: PIL to RGB, and (d') torchvision.io.decode_jpeg, the decoder
      (b) and (c) use; d'/a is the ceiling for them.
The variants take turns for ``--reps`` rounds and each reports its median round. Then the
colour half alone on (c)'s crops of 32 images: the compiled CPU path, its eager ops and the
batched float32 ops, ms per image.
Part 2, Ray Data, (c)'s work through ``build_pretrain_stream`` on a local Ray instance with
2 CPUs, a single consumer reading ``epoch_batches``:
  - steady-state images/s over the middle epochs (1 .. ``--epochs`` - 2: no start-up, no
    drain) and images per CPU second of the whole Ray session over the same window, also
    from the first batch to the end, against ``crop_item`` on the same work items in a
    plain 2-process multiprocessing pool;
  - time to the first batch of each of ``--epochs`` epochs of ONE stream, and how much
    longer than the steady rate predicts each later epoch took;
  - peak memory of a one-epoch stream for each ``--images`` count, each on a fresh Ray
    instance: the peak PSS of the driver and every process of its Ray session (workers
    included), sampled every 0.5 s, and Ray's plasma usage. The rows come from the same
    files: the shard is listed many times in the manifest to reach N images. Sampling
    costs CPU on the same cores, so the throughput figures come from a separate run
    without it.
The last lines are the ratios and the targets of the issue, each marked met or NOT met.
Other work on the machine skews the wall-clock figures: the load average is printed next
to them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_reference import reference_dataset  # noqa: E402

from gaelle_ray.config import AugmentationConfig, Config  # noqa: E402
from gaelle_ray.data.crops import decode_jpeg_torchvision, multicrop_images  # noqa: E402
from gaelle_ray.data.shards import SHARD_SCHEMA  # noqa: E402

TARGETS = {"b/a": 3.0, "c/a": 8.0, "ray/loop": 0.70, "epoch_s": 2.0, "mem": 0.20}


# ----------------------------------------------------------------------------- images


def photo_like_jpeg(seed: int, width: int = 640, height: int = 480) -> bytes:
    """A 640x480 JPEG with photo-like statistics: multi-scale smooth colour noise, a few
    flat shapes with hard edges, and per-pixel noise; quality 90."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((3, 90), (8, 45), (24, 30), (80, 25), (240, 20)):
        field = rng.normal(0, 1, (cells * height // width + 2, cells + 2, 3))
        field = ((field - field.min()) / (np.ptp(field) + 1e-6) * 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), np.float32)
        img += (up - 128) * amp / 128
    img += rng.uniform(60, 190, 3)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = (x0, y0, x0 + int(rng.integers(30, 250)), y0 + int(rng.integers(30, 200)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    arr = np.asarray(pil, np.float32) + rng.normal(0, 9, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(root: Path, jpegs: list[bytes], images: int) -> str:
    """One shard with the JPEGs, listed ceil(images / len) times in a gaelle manifest; the
    last listing is cut so that the split has exactly ``images`` rows. Returns the URI."""
    out = root / f"shards_{images}"
    (out / "train").mkdir(parents=True, exist_ok=True)
    n = len(jpegs)
    table = pa.Table.from_pylist(
        [{"jpeg": j, "image_id": i, "file_name": f"{i:06d}.jpg", "labels": [], "split": "train",
          "height": 480, "width": 640} for i, j in enumerate(jpegs)], schema=SHARD_SCHEMA)
    pq.write_table(table, out / "train" / "part-00000.parquet", row_group_size=128)
    shards, left = [], images
    while left > 0:
        shards.append({"path": "train/part-00000.parquet", "split": "train",
                       "num_rows": min(n, left), "sha256": "", "plan": ""})
        left -= n
    manifest = {"format": "gaelle-shards", "version": 1, "dataset": "photo-like",
                "class_names": [], "num_classes": 0, "counts": {"train": {"rows": images}},
                "shards": shards, "skipped": [], "converted": [], "source": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return str(out)


# ----------------------------------------------------------------------------- part 1


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def _load() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    with open("/proc/loadavg") as f:
        return f"load {f.read().split()[0]}"


def timed(fn, *args) -> tuple[float, float]:
    """Run ``fn(*args) -> images`` and return (images per wall second, images per CPU second
    of this process). The second is the per-core rate even when other work shares the
    machine (for a single process with one thread)."""
    c0, t0 = time.process_time(), time.perf_counter()
    n = fn(*args)
    return _rate(n, time.perf_counter() - t0), _rate(n, time.process_time() - c0)


def image_rngs(first: int, n: int) -> list[np.random.Generator]:
    """One numpy generator per image, as the stream gives each image its own."""
    return [np.random.default_rng((0, first + i)) for i in range(n)]


def bench_reference(jpegs: list[bytes], aug: AugmentationConfig, workers: int, batch: int) -> int:
    ds = reference_dataset(jpegs, aug)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers,
                                         worker_init_fn=lambda _: torch.set_num_threads(1))
    return sum(len(b[0]) for b in loader)


def bench_ours(jpegs: list[bytes], aug: AugmentationConfig, colour_on_cpu: bool, batch: int) -> int:
    n = 0
    for i in range(0, len(jpegs), batch):
        chunk = jpegs[i:i + batch]
        _, kept = multicrop_images(chunk, aug, image_rngs(i, len(chunk)), colour=colour_on_cpu)
        n += int(kept.sum())
    return n


def bench_decode(jpegs: list[bytes]) -> int:
    for j in jpegs:
        with Image.open(io.BytesIO(j)) as img:
            img.convert("RGB")
    return len(jpegs)


def bench_decode_torchvision(jpegs: list[bytes]) -> int:
    for j in jpegs:
        if decode_jpeg_torchvision(j) is None:
            raise RuntimeError("torchvision could not decode a benchmark JPEG")
    return len(jpegs)


# ----------------------------------------------------------------------------- memory


def _session_pids(root_pid: int) -> list[int]:
    """root_pid and all its descendants (a local Ray session's processes hang below it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def session_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process and every process below it
    that is still alive (a local Ray session, a multiprocessing pool)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in _session_pids(os.getpid()):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total / tick


def session_pss() -> int:
    """Proportional set size of this process and every process below it (shared pages,
    e.g. the plasma store, counted once in total)."""
    return sum(_pss_bytes(p) for p in _session_pids(os.getpid()))


class PeakSampler:
    """Samples session_pss() every ``interval`` s in a thread; ``peak`` is the maximum."""

    def __init__(self, interval: float = 0.5):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, session_pss())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, session_pss())


def plasma_used_mb(ray) -> float:
    """Plasma (object store) memory in use now, from Ray's memory summary; NaN if unknown."""
    try:
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    except Exception:  # private API: report "unknown" rather than fail the benchmark
        return float("nan")
    for line in text.splitlines():
        if "Plasma memory usage" in line:
            return float(line.split("Plasma memory usage")[1].split("MiB")[0].strip())
    return float("nan")


# ----------------------------------------------------------------------------- part 2


def _config(shards: str, epochs: int, batch: int) -> Config:
    return Config.from_dict({"data": {"shards": shards, "split": "train", "crop_cpus": 1.0},
                             "train": {"epochs": epochs, "batch_size_per_worker": batch,
                                       "num_workers": 1, "seed": 0}})


def run_stream(shards: str, epochs: int, batch: int, rows_per_item: int, ray,
               sample_memory: bool) -> dict:
    """One stream over ``epochs`` epochs, read with epoch_batches by a single consumer.

    With ``sample_memory`` a thread samples the PSS of every process of the session every
    0.5 s and Ray's plasma usage every 20 batches: that costs CPU on the same cores (reading
    smaps_rollup of ~10 big processes), so the throughput figures come from runs without it.
    """
    from gaelle_ray.data import pipeline

    config = _config(shards, epochs, batch)
    rows = pipeline.count_rows(config)
    steps = pipeline.steps_per_epoch(config, rows, 1)
    base = session_pss()
    plasma_peak = 0.0
    t_start = time.perf_counter()
    ds = pipeline.build_pretrain_stream(config, rows_per_item=rows_per_item)
    first_waits, epoch_end, epoch_cpu = {}, {}, {}
    t_first = None
    sampler = PeakSampler() if sample_memory else contextlib.nullcontext()
    with sampler:
        for b in pipeline.epoch_batches(ds, batch, steps, epochs, "cpu", prefetch_batches=2):
            now = time.perf_counter()
            if t_first is None:
                t_first, cpu_first = now, session_cpu_s()
            if b.step == 0:
                first_waits[b.epoch] = now - t_start if b.epoch == 0 else b.wait_s
            if sample_memory and b.step % 20 == 0:
                plasma_peak = max(plasma_peak, plasma_used_mb(ray))
            epoch_end[b.epoch] = now
            if b.step == steps - 1:
                epoch_cpu[b.epoch] = session_cpu_s()
    t_end, cpu_end = time.perf_counter(), session_cpu_s()
    served = steps * epochs * batch
    after_first = _rate(served - batch, t_end - t_first)
    per_cpu_after_first = _rate(served - batch, cpu_end - cpu_first)
    if epochs >= 3:  # steady state: the middle epochs, without start-up and drain
        mid = steps * batch * (epochs - 2)
        steady = _rate(mid, epoch_end[epochs - 2] - epoch_end[0])
        per_cpu = _rate(mid, epoch_cpu[epochs - 2] - epoch_cpu[0])
    else:
        steady, per_cpu = after_first, per_cpu_after_first
    epoch_times = [epoch_end[e] - (epoch_end[e - 1] if e else t_start) for e in range(epochs)]
    peak = sampler.peak if sample_memory else float("nan")
    return {"rows": rows, "steps": steps, "first_waits": first_waits, "steady": steady,
            "per_cpu": per_cpu, "after_first": after_first,
            "per_cpu_after_first": per_cpu_after_first,
            "epoch_times": epoch_times, "pss_base_mb": base / 2**20,
            "pss_peak_mb": peak / 2**20, "pss_stream_mb": (peak - base) / 2**20,
            "plasma_peak_mb": plasma_peak, "total_s": t_end - t_start}


def _pool_init() -> None:
    torch.set_num_threads(1)


def _pool_task(args):
    from gaelle_ray.data import pipeline

    plan, epoch, item = args
    return len(pipeline.crop_item(plan, epoch, item)["image_id"])


def run_plain_loop(shards: str, rows_per_item: int, processes: int) -> tuple[float, float]:
    """crop_item over one epoch's items in a plain multiprocessing pool: (images per wall
    second, images per CPU second of the parent and its pool)."""
    from gaelle_ray.data import pipeline

    plan = pipeline.StreamPlan.from_config(_config(shards, 1, 64), rows_per_item)
    order = pipeline.epoch_item_order(len(plan.items), plan.seed, 0)
    work = [(plan, 0, plan.items[i]) for i in order]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes, initializer=_pool_init) as pool:
        pool.map(_pool_task, work[:processes], chunksize=1)  # warm-up: imports, footers
        t0, c0 = time.perf_counter(), session_cpu_s()
        n = sum(pool.imap_unordered(_pool_task, work, chunksize=1))
        return _rate(n, time.perf_counter() - t0), _rate(n, session_cpu_s() - c0)


# ----------------------------------------------------------------------------- main


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=240, help="distinct JPEGs generated")
    parser.add_argument("--micro-images", type=int, default=160,
                        help="images timed in part 1 (per variant)")
    parser.add_argument("--images", type=int, nargs="*", default=[1000, 10000],
                        help="stream sizes for the Ray part (the first also gives the "
                             "per-epoch first-batch times)")
    parser.add_argument("--reps", type=int, default=3,
                        help="interleaved rounds of part 1 (each variant reports its median)")
    parser.add_argument("--epochs", type=int, default=4,
                        help="epochs of the throughput stream (>= 3: the steady state is "
                             "measured over epochs 1 .. epochs-2)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rows-per-item", type=int, default=128)
    parser.add_argument("--skip-ray", action="store_true")
    parser.add_argument("--skip-micro", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    aug = AugmentationConfig()
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread; crops "
          f"{list(aug.nmb_crops)} x {list(aug.size_crops)} px")
    with tempfile.TemporaryDirectory(prefix="gaelle-bench-") as tmp:
        t0 = time.perf_counter()
        jpegs = [photo_like_jpeg(i) for i in range(args.files)]
        print(f"{len(jpegs)} photo-like 640x480 JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f}"
              f" KB, generated in {time.perf_counter() - t0:.1f}s")
        ratios: list[str] = []
        if not args.skip_micro:
            ratios += part1(jpegs[:args.micro_images], aug, args.reps)
        if not args.skip_ray:
            ratios += part2(Path(tmp), jpegs, args)
    print("---- ratios and targets")
    for line in ratios:
        print(line)


def part1(jpegs: list[bytes], aug: AugmentationConfig, reps: int) -> list[str]:
    n = len(jpegs)
    print(f"---- part 1: one process, {n} images per variant; images per CPU second (= per "
          "core, robust to other load) and per wall second")
    bench_decode(jpegs[:8])  # warm-up
    # (b)'s first call compiles its colour kernels (once per process, ~50 s, ~10 s from
    # torch's on-disk cache): a one-off cost, kept out of the steady-state figure
    t0 = time.perf_counter()
    bench_ours(jpegs[:32], aug, True, 32)
    from gaelle_ray.data.colour_cpu import compiled_kernels_status

    print(f"(b) warm-up on 32 images: {time.perf_counter() - t0:.1f} s wall (compiles the colour "
          f"kernels); kernels: {compiled_kernels_status()}")
    rows = [("(a) reference, DataLoader num_workers=0", bench_reference, (jpegs, aug, 0, 32)),
            ("(b) ours, all augmentations on CPU", bench_ours, (jpegs, aug, True, 32)),
            ("(c) ours, colour left to the device", bench_ours, (jpegs, aug, False, 32)),
            ("(d) JPEG decode alone, PIL", bench_decode, (jpegs,)),
            ("(d') JPEG decode alone, torchvision", bench_decode_torchvision, (jpegs,))]
    # the variants take turns, `reps` rounds, and each reports its median round: a slow
    # moment of the machine then hits every variant alike instead of one of them
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in rows}
    for _ in range(reps):
        for name, fn, fn_args in rows:
            runs[name].append(timed(fn, *fn_args))
    per_cpu = {}
    for name, _, _ in rows:
        cpu = float(np.median([c for _, c in runs[name]]))
        wall = float(np.median([w for w, _ in runs[name]]))
        spread = ", ".join(f"{c:.1f}" for _, c in runs[name])
        per_cpu[name.split()[0]] = cpu
        print(f"{name:41s} {cpu:7.1f} img/CPU-s  {wall:7.1f} img/s wall  (rounds: {spread})")
    wall, _ = timed(bench_reference, jpegs, aug, 1, 32)
    print(f"{'(a) reference, DataLoader num_workers=1':41s} {'':19s}{wall:7.1f} img/s wall "
          f"(1 worker process)  [{_load()}]")
    colour_half(jpegs[:32], aug, reps)
    a, b, c, d = (per_cpu[k] for k in ("(a)", "(b)", "(c)", "(d')"))
    return [f"b/a = {b / a:5.2f}x  (target >= {TARGETS['b/a']:.0f}x: {_verdict(b / a >= TARGETS['b/a'])})",
            f"c/a = {c / a:5.2f}x  (target >= {TARGETS['c/a']:.0f}x: {_verdict(c / a >= TARGETS['c/a'])})",
            f"d'/a = {d / a:5.2f}x  (our decoder alone: the ceiling for (b) and (c))"]


def colour_half(jpegs: list[bytes], aug: AugmentationConfig, reps: int) -> None:
    """The colour half alone on (c)'s crops of ``jpegs``: ms per image (CPU time, median of
    ``reps`` interleaved rounds) of the compiled CPU path, its eager ops and the batched
    float32 ops, same parameters, float16 output as in the stream."""
    from gaelle_ray.data.colour import ColourAugment

    out, _ = multicrop_images(jpegs, aug, image_rngs(1000, len(jpegs)))
    crops = [torch.from_numpy(out[f"crops_{r}"]) for r in range(len(aug.size_crops))]
    params = [ColourAugment(seed=r).sample(x.shape[0] * x.shape[1]) for r, x in enumerate(crops)]
    paths = {"compiled": ColourAugment(aug, out_dtype=torch.float16),
             "eager": ColourAugment(dataclasses.replace(aug, compile_cpu_colour=False),
                                    out_dtype=torch.float16),
             "batched": ColourAugment(out_dtype=torch.float16, backend="batched")}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(reps):
        for name, augment in paths.items():
            c0 = time.process_time()
            for x, p in zip(crops, params):
                augment(x, p)
            times[name].append((time.process_time() - c0) / len(jpegs) * 1e3)
    ms = {name: float(np.median(t)) for name, t in times.items()}
    print(f"colour half alone ({len(jpegs)} images of (c)'s crops, ms per image, median of "
          f"{reps}): " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
          + f"; eager / compiled = {ms['eager'] / ms['compiled']:.2f}x")


def part2(root: Path, jpegs: list[bytes], args) -> list[str]:
    import ray

    print(f"---- part 2: Ray Data, local instance with 2 CPUs, crop_cpus=1, B={args.batch_size}, "
          f"{args.rows_per_item} rows per item")
    def stream(images: int, epochs: int, sample_memory: bool) -> dict:
        # a fresh Ray instance per stream, so that every peak includes the same start-up
        ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2,
                 include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        try:
            shards = write_shards(root, jpegs, images)
            return run_stream(shards, epochs, args.batch_size, args.rows_per_item, ray,
                              sample_memory)
        finally:
            ray.shutdown()

    # throughput and per-epoch start-up: the first size, no memory sampling
    first = stream(args.images[0], args.epochs, False)
    waits = ", ".join(f"epoch {e}: {w:.2f}s" for e, w in sorted(first["first_waits"].items()))
    window = f"epochs 1-{args.epochs - 2}" if args.epochs >= 3 else "from the first batch"
    print(f"stream {args.images[0]} images x {args.epochs} epochs: steady ({window}) "
          f"{first['steady']:.1f} img/s ({first['per_cpu']:.1f} img/CPU-s of "
          f"the whole session); from the first batch to the end {first['after_first']:.1f} img/s "
          f"({first['per_cpu_after_first']:.1f} img/CPU-s); first batch "
          f"{waits}; epoch times {', '.join(f'{t:.1f}s' for t in first['epoch_times'])}; "
          f"total {first['total_s']:.1f}s  [{_load()}]")
    # memory: one epoch of every size, sampled
    results = {}
    for images in args.images:
        r = results[images] = stream(images, 1, True)
        print(f"stream {images} images x 1 epoch, memory sampled: steady {r['steady']:.1f} img/s; "
              f"session PSS after ray.init {r['pss_base_mb']:.0f} MB, peak "
              f"{r['pss_peak_mb']:.0f} MB (+{r['pss_stream_mb']:.0f} MB); plasma peak "
              f"{r['plasma_peak_mb']:.0f} MiB  [{_load()}]")
    loop, loop_cpu = run_plain_loop(write_shards(root, jpegs, args.images[0]),
                                    args.rows_per_item, 2)
    print(f"plain loop, 2 processes, crop_item over {args.images[0]} images: {loop:.1f} img/s "
          f"({loop_cpu:.1f} img/CPU-s)  [{_load()}]")
    lines = []
    ratio = first["steady"] / loop
    cpu_ratio = first["per_cpu"] / loop_cpu
    lines.append(f"ray/loop steady state = {ratio:5.2f} wall, {cpu_ratio:5.2f} per CPU second "
                 f"(target >= {TARGETS['ray/loop']:.2f}: wall {_verdict(ratio >= TARGETS['ray/loop'])}, "
                 f"per CPU {_verdict(cpu_ratio >= TARGETS['ray/loop'])})")
    if len(first["epoch_times"]) > 1:
        expected = first["steps"] * args.batch_size / first["steady"]
        extra = max(t - expected for t in first["epoch_times"][1:])
        worst_wait = max(w for e, w in first["first_waits"].items() if e > 0)
        lines.append(f"epochs after the first: first-batch wait <= {worst_wait:.2f}s, epoch time "
                     f"- steady-state time <= {extra:+.2f}s (target <= {TARGETS['epoch_s']:.0f}s: "
                     f"{_verdict(max(worst_wait, extra) <= TARGETS['epoch_s'])}); first epoch's "
                     f"first batch {first['first_waits'][0]:.1f}s")
    if len(results) > 1:
        small, large = (results[n] for n in (args.images[0], args.images[-1]))
        growth = large["pss_peak_mb"] / small["pss_peak_mb"] - 1
        lines.append(f"peak memory {args.images[-1]} vs {args.images[0]} images: "
                     f"{large['pss_peak_mb']:.0f} vs {small['pss_peak_mb']:.0f} MB ({growth:+.0%}; "
                     f"target within {TARGETS['mem']:.0%}: {_verdict(abs(growth) <= TARGETS['mem'])})")
    return lines


if __name__ == "__main__":
    main()
