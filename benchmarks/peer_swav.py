"""Throughput of `gaelle pretrain` (SwAV-only) against a plain PyTorch loop built on lightly.

What a user would run instead of this platform to pretrain SwAV on one machine: a single
training process with lightly's SwAV modules (``lightly.models.modules.SwaVProjectionHead``,
``SwaVPrototypes``, ``lightly.loss.SwaVLoss``, lightly's ``SwaVTransform`` for the crops and
``lightly.utils.lars.LARS``) and a torch ``DataLoader``. This script trains the same model on
the same images for the same number of steps both ways, in the same run, and prints one
table of images per second.

Ours: ``python -m gaelle_ray.cli pretrain --config experiments/cpu_demo.yaml --cpu`` with
``--set loss.weight_local=0 --set loss.weight_l2g=0`` (SwAV only), ``eval.online_every_epochs=0``
(no online evaluation), the config's ``queue.queue_length: 0`` (no queue), ``data.max_images``
= ``--images``, ``train.epochs`` = the steps in whole epochs, ``ray.num_cpus_per_worker`` =
``--threads``, a fresh ``train.run_dir`` in the work folder. Only the CLI is used, through a
subprocess, so the numbers follow whatever the package does today. One Ray Train worker on
a local Ray instance the command starts itself; checkpoints every epoch as the config says.

Lightly's loop (a subprocess of this script, so that it pays its own interpreter start and
imports as a user's script would): torchvision ResNet-18 (``fc`` = Identity, 512 pooled
features) -> ``SwaVProjectionHead(512, hidden_mlp=512, feat_dim=64)`` (Linear-BN-ReLU-Linear)
-> L2 normalise -> ``SwaVPrototypes(64, 30, n_steps_frozen_prototypes=50)``, prototypes
normalised before every step, ``SwaVLoss(temperature 0.1, 3 Sinkhorn iterations, eps 0.03)``
with both global crops assigning codes, ``LARS(momentum 0.9, weight decay 1e-6, trust 0.001)``
(the same rule as our LARC) with our schedule (linear warm-up from optim.start_warmup over
optim.warmup_epochs, then cosine from optim.base_lr to optim.final_lr). Every one of these
values, the crops (2 x 48 px at scale 0.4-1.0 + 4 x 24 px at 0.1-0.4, aspect 3/4-4/3, flip
0.5) and the colour (jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2, no blur, mean/std) is
read from ``gaelle config show`` of the same config and overrides, so both sides train the
same thing. Batch 64, shuffled each epoch, incomplete batches dropped (as ours). Like ours
(one backbone call per crop resolution), the loop concatenates the crops of each resolution
for the backbone and runs the head on all crops at once; ``--lightly-per-crop`` instead calls
the model once per crop, as lightly's SwAV tutorial does. Data: the JPEG bytes of the first
``--images`` images of the split are read once from the same Parquet shards (pyarrow) into
memory and decoded with PIL in the DataLoader's ``__getitem__`` every epoch (as ours decodes
every epoch, and as an image-folder dataset would), then cropped by ``SwaVTransform`` in
``--loader-workers`` DataLoader worker processes (persistent; default 1, which keeps up with
the training here: the loop's total wait for batches is printed after each run; ours' local
Ray instance has room for two crop tasks; 0 makes the crops in the training process).
``torch.set_num_threads(--threads)``.
At the end it saves the model and optimiser once (ours checkpoints every epoch).

The toy shards are made once with ``gaelle prepare toy`` in the work folder (not timed)
unless ``--shards`` names existing ones; then both read the first ``--images`` images of
the train split.

Command line (from the repository root; the default takes about 2-3 minutes per side on an
idle 2-core machine, plus a minute of set-up)::

    pip install -e .[bench]          # lightly==1.6.0 (resolves with torch 2.14.1 / torchvision 0.29.1)
    python benchmarks/peer_swav.py                       # 150 steps = 6 epochs of 1600 images
    python benchmarks/peer_swav.py --steps 300 --reps 3  # longer, three interleaved pairs, medians
    python benchmarks/peer_swav.py --steps 4 --images 128 --warmup-steps 2   # smoke run, ~1.5 min

Options: ``--steps`` (rounded up to whole epochs of ``--images // 64`` steps), ``--images``
(toy images per epoch), ``--threads`` (torch threads of the training process on both sides,
default 2), ``--loader-workers``, ``--lightly-per-crop``, ``--warmup-steps`` (start of the
steady-state window, and our ``train.log_every_steps``), ``--reps``, ``--config``, ``--shards``
(and ``--split``), ``--workdir``/``--keep`` (default: a temporary folder, removed at the end;
nothing is written into the repository), ``--quiet`` (do not echo our progress lines).

The table (one row per measure; columns: ours, lightly's loop, ours / lightly):

- images: steps x 64, the images trained by each side.
- wall clock: seconds from starting the command to its exit. Ours: the whole ``gaelle
  pretrain`` (Python start, Ray start-up, worker group, Ray Data stream, training, epoch
  checkpoints, Ray shut-down). Lightly: the whole script (Python start, imports, reading the
  shards, DataLoader workers, training, the final save).
- (a) img/s, start-up included: images / wall clock. The target is ours >= 1.2x lightly's;
  the line under the table says whether it is met.
- the wall clock in three parts (seconds; the last column is ours / lightly, so lower is
  better there): from the command's start to the end of step s0 (the first step our run
  logs at or after ``--warmup-steps``: start-up plus the first s0 steps); steps s0+1 to the
  last (the steady-state window); from the end of the last step to the command's exit
  (ours: last checkpoint, Ray Train's report, Ray shut-down; lightly: the final save).
- (b) img/s, steady state: (last step - s0) x 64 images / the wall time between the end of
  step s0 and the end of the last step, both sides over the same steps. For ours the times
  are the worker's own timestamps of its step metrics (MLflow ``images_per_s`` points, written
  synchronously by rank 0 the moment a logged step ends, every ``train.log_every_steps`` and
  at every epoch's end); for lightly's loop the time after every step. This is the honest
  measure because it excludes only the one-time costs (Ray start, worker group, the
  stream's first batch, the first s0 steps of torch warm-up) and keeps every recurring one
  on both sides: data waits, epoch boundaries, our per-epoch checkpoints and metric writes.
  (The img/s of our progress line and of MLflow ``images_per_s`` is cumulative from the
  start of each epoch and so includes the epoch's first-batch wait; ``epoch_images_per_s``
  leaves out the work between epochs. Neither is used.) If the MLflow points cannot be
  read, the arrival times of the ``[gaelle] epoch ... step`` progress lines on the
  command's output are used instead, and the output says so.
- SwAV loss at the last step: ours ``loss_global`` (the unweighted SwAV term), lightly's
  ``SwaVLoss``; a sanity check that both train the same objective, not a speed figure.

With ``--reps`` > 1 the two sides alternate (ours first, then lightly first, ...) and every
figure is the median over reps; the ratios are ratios of the medians.

Differences that remain (see also the printed notes): lightly's first head Linear has no
bias (BatchNorm follows) and its prototypes carry a bias, ours are the other way round
(a few hundred parameters); lightly freezes the prototypes by ``requires_grad_`` and ours
drops their gradients; ours makes the colour augmentation in the training process
(batched) and the crops in a Ray Data task, lightly's loop makes both in its DataLoader
workers (PIL); ours checkpoints every epoch. None of these changes the model's compute.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "experiments" / "cpu_demo.yaml"
BATCH = 64
TARGET = 1.2
SWAV_ONLY = ["loss.weight_local=0", "loss.weight_l2g=0", "eval.online_every_epochs=0"]
PROGRESS_RE = re.compile(r"\[gaelle\] epoch (\d+)/(\d+) step (\d+)/(\d+)")
RUN_RE = re.compile(r"MLflow run (\S+) in (\S+)")


# ----------------------------------------------------------------------------- helpers


def gaelle_cmd(*args: str) -> list[str]:
    """Our CLI through the interpreter running this script (the venv's `gaelle`)."""
    return [sys.executable, "-m", "gaelle_ray.cli", *args]


def run_checked(cmd: list[str], cwd: Path) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def resolved_config(config: Path, overrides: list[str], cwd: Path) -> dict:
    """`gaelle config show` of the config with the overrides: what ours will train."""
    import yaml

    cmd = gaelle_cmd("config", "show", "--config", str(config))
    for item in overrides:
        cmd += ["--set", item]
    return yaml.safe_load(run_checked(cmd, cwd))


def lr_schedule(step: int, steps_per_epoch: int, epochs: int, optim: dict) -> float:
    """Our learning-rate rule (method.md section 6), written out for the lightly loop."""
    warmup = int(optim["warmup_epochs"]) * steps_per_epoch
    total = epochs * steps_per_epoch
    base, final, start = float(optim["base_lr"]), float(optim["final_lr"]), float(optim["start_warmup"])
    if step < warmup:
        return start + (base - start) * step / warmup
    span = max(total - warmup, 1)
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (step - warmup) / span))


def train_jpegs(shards: Path, split: str, limit: int) -> list[bytes]:
    """JPEG bytes of the first `limit` images of `split`, shards in manifest order (the
    order our stream's `data.max_images` takes them in)."""
    import pyarrow.parquet as pq

    manifest = json.loads((shards / "manifest.json").read_text())
    out: list[bytes] = []
    for shard in manifest["shards"]:
        if shard["split"] != split or len(out) >= limit:
            continue
        column = pq.read_table(shards / shard["path"], columns=["jpeg"]).column("jpeg")
        out.extend(column.to_pylist()[: limit - len(out)])
    if len(out) < limit:
        sys.exit(f"{shards}: split {split!r} has {len(out)} images, fewer than --images {limit}")
    return out


# ----------------------------------------------------------------------------- lightly's loop (child process)


def lightly_child(spec_path: str) -> int:
    """The plain lightly training script: everything in here is inside its wall clock."""
    started = time.time()
    spec = json.loads(Path(spec_path).read_text())
    cfg = spec["config"]
    aug, model_cfg, loss_cfg, optim = cfg["augmentation"], cfg["model"], cfg["loss"], cfg["optim"]

    import io

    import torch
    import torch.nn.functional as F
    import torchvision
    from PIL import Image
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    from lightly.loss import SwaVLoss
    from lightly.models.modules import SwaVProjectionHead, SwaVPrototypes
    from lightly.transforms.swav_transform import SwaVTransform
    from lightly.utils.lars import LARS

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])

    t_read = time.time()
    jpegs = train_jpegs(Path(spec["shards"]), spec["split"], spec["images"])
    read_s = time.time() - t_read

    class JpegDataset(Dataset):
        def __init__(self, items: list[bytes], transform):
            self.items, self.transform = items, transform

        def __len__(self) -> int:
            return len(self.items)

        def __getitem__(self, i: int):
            image = Image.open(io.BytesIO(self.items[i])).convert("RGB")
            return self.transform(image)

    n_res = len(aug["size_crops"])
    transform = SwaVTransform(
        crop_sizes=tuple(aug["size_crops"]), crop_counts=tuple(aug["nmb_crops"]),
        crop_min_scales=tuple(aug["min_scale_crops"]), crop_max_scales=tuple(aug["max_scale_crops"]),
        hf_prob=0.5, cj_prob=aug["jitter_p"], cj_strength=1.0, cj_bright=aug["brightness"],
        cj_contrast=aug["contrast"], cj_sat=aug["saturation"], cj_hue=aug["hue"],
        random_gray_scale=aug["grayscale_p"], gaussian_blur=aug["blur_p"], sigmas=tuple(aug["blur_sigma"]),
        normalize={"mean": list(aug["mean"]), "std": list(aug["std"])})
    workers = spec["loader_workers"]
    loader = DataLoader(JpegDataset(jpegs, transform), batch_size=spec["batch"], shuffle=True, drop_last=True,
                        num_workers=workers, persistent_workers=workers > 0)

    class SwaV(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = getattr(torchvision.models, model_cfg["arch"])(weights=None)
            width = self.backbone.fc.in_features
            self.backbone.fc = nn.Identity()
            self.projection_head = SwaVProjectionHead(width, model_cfg["hidden_mlp"], model_cfg["feat_dim"])
            self.prototypes = SwaVPrototypes(model_cfg["feat_dim"], model_cfg["nmb_prototypes"],
                                             n_steps_frozen_prototypes=optim["freeze_prototypes_niters"])

        def scores(self, pooled: torch.Tensor, step: int) -> torch.Tensor:
            return self.prototypes(F.normalize(self.projection_head(pooled), dim=1), step)

        def forward(self, views: list[torch.Tensor], step: int) -> list[torch.Tensor]:
            if spec["per_crop"]:  # lightly's tutorial: the whole model once per crop
                return [self.scores(self.backbone(v), step) for v in views]
            # like ours: one backbone call per resolution, the head on all crops at once
            pooled, start = [], 0
            for count in aug["nmb_crops"]:
                pooled.append(self.backbone(torch.cat(views[start:start + count])))
                start += count
            return list(self.scores(torch.cat(pooled), step).chunk(len(views)))

    model = SwaV()
    model.train()
    criterion = SwaVLoss(temperature=loss_cfg["temperature"], sinkhorn_iterations=loss_cfg["sinkhorn_iterations"],
                         sinkhorn_epsilon=loss_cfg["epsilon"])
    optimizer = LARS(model.parameters(), lr=optim["base_lr"], momentum=optim["momentum"],
                     weight_decay=optim["weight_decay"], trust_coefficient=optim["larc_trust_coefficient"])
    n_global = aug["nmb_crops"][0]
    assert n_res >= 1 and list(loss_cfg["crops_for_assign"]) == list(range(n_global)), loss_cfg["crops_for_assign"]

    total, spe = spec["steps"], spec["steps_per_epoch"]
    epochs = total // spe
    step, wait_s, step_ends, losses = 0, 0.0, [], []
    for _epoch in range(epochs):
        t_wait = time.perf_counter()
        for views in loader:
            wait_s += time.perf_counter() - t_wait
            lr = lr_schedule(step, spe, epochs, optim)
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.prototypes.normalize()
            scores = model(views, step)
            loss = criterion(scores[:n_global], scores[n_global:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(float(loss.detach()))
            step_ends.append(time.time())
            if step >= total:
                break
            t_wait = time.perf_counter()
    out_dir = Path(spec["out_dir"])
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
               out_dir / "lightly_final.pt")
    result = {"started": started, "read_s": read_s, "images_read": len(jpegs), "steps": step,
              "step_ends": step_ends, "losses": losses, "wait_s": wait_s}
    (out_dir / "lightly_result.json").write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- the two runs


def run_streamed(cmd: list[str], cwd: Path, log_path: Path, echo: bool) -> tuple[float, float, int, list]:
    """Run `cmd`, its output to `log_path`; returns (start time, wall seconds, exit code,
    [(arrival time, epoch, step in epoch, steps per epoch) of each progress line])."""
    lines = []
    start = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            log.write(line)
            m = PROGRESS_RE.search(line)
            if m:
                lines.append((time.time(), int(m.group(1)), int(m.group(3)), int(m.group(4))))
            if echo and "[gaelle]" in line:
                print("    " + line[line.index("[gaelle]"):].rstrip(), flush=True)
        code = proc.wait()
    return start, time.perf_counter() - t0, code, lines


def run_ours(args, shards: Path, work: Path, rep: int, epochs: int, log_every: int) -> dict:
    run_dir = work / f"ours_{rep}"
    cmd = gaelle_cmd("pretrain", "--config", str(args.config), "--cpu")
    for item in ours_overrides(args, shards, run_dir, epochs, log_every):
        cmd += ["--set", item]
    log_path = work / f"ours_{rep}.log"
    start, wall, code, lines = run_streamed(cmd, work, log_path, args.echo)
    text = log_path.read_text()
    if code != 0:
        sys.exit(f"gaelle pretrain failed with exit code {code}; last output ({log_path}):\n{text[-4000:]}")
    points, loss, source = mlflow_points(text)
    if not points:  # fall back to the arrival of the progress lines on our pipe
        points = {(ep - 1) * spe + done: t for t, ep, done, spe in lines}
        source = "progress-line arrival times (MLflow points not readable)"
    return {"start": start, "wall": wall, "points": points, "loss": loss, "source": source, "log": str(log_path)}


def ours_overrides(args, shards: Path, run_dir: Path, epochs: int, log_every: int) -> list[str]:
    return [*SWAV_ONLY, f"data.shards={shards}", f"eval.data={shards}", f"data.split={args.split}",
            f"data.max_images={args.images}", f"train.epochs={epochs}",
            f"train.batch_size_per_worker={BATCH}", "train.num_workers=1",
            f"train.log_every_steps={log_every}", f"ray.num_cpus_per_worker={args.threads}",
            f"train.run_dir={run_dir}"]


def mlflow_points(output: str) -> tuple[dict[int, float], float | None, str]:
    """{global step: unix time its metrics were logged} and the last loss_global, from the
    run's MLflow store (the command prints the run id and the tracking URI)."""
    m = RUN_RE.search(output)
    if not m:
        return {}, None, ""
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=m.group(2))
        history = client.get_metric_history(m.group(1), "images_per_s")
        points = {int(p.step): p.timestamp / 1000.0 for p in history}
        losses = sorted((p.step, p.value) for p in client.get_metric_history(m.group(1), "loss_global"))
    except Exception as exc:  # the store's layout is not ours to rely on; fall back
        print(f"  (could not read MLflow metrics: {type(exc).__name__}: {exc})")
        return {}, None, ""
    return points, (losses[-1][1] if losses else None), "MLflow step-metric timestamps (worker clock)"


def run_lightly(args, cfg: dict, shards: Path, work: Path, rep: int, total: int, spe: int) -> dict:
    out_dir = work / f"lightly_{rep}"
    out_dir.mkdir()
    spec = {"config": cfg, "shards": str(shards), "split": args.split, "images": args.images, "batch": BATCH,
            "steps": total, "steps_per_epoch": spe, "threads": args.threads,
            "loader_workers": args.loader_workers, "per_crop": args.lightly_per_crop,
            "seed": int(cfg["train"]["seed"]), "out_dir": str(out_dir)}
    spec_path = out_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--lightly-child", str(spec_path)]
    log_path = work / f"lightly_{rep}.log"
    start, wall, code, _ = run_streamed(cmd, work, log_path, False)
    if code != 0:
        sys.exit(f"lightly loop failed with exit code {code}; last output ({log_path}):\n"
                 f"{log_path.read_text()[-4000:]}")
    res = json.loads((out_dir / "lightly_result.json").read_text())
    points = {i + 1: t for i, t in enumerate(res["step_ends"])}
    return {"start": start, "wall": wall, "points": points, "loss": res["losses"][-1] if res["losses"] else None,
            "read_s": res["read_s"], "wait_s": res["wait_s"], "steps": res["steps"], "log": str(log_path)}


# ----------------------------------------------------------------------------- measures and table


def measures(run: dict, s0: int, total: int) -> dict:
    images = total * BATCH
    out = {"images": images, "wall": run["wall"], "a": images / run["wall"], "before": None, "window": None,
           "after": None, "b": None, "loss": run["loss"]}
    pts = run["points"]
    if total in pts:
        out["after"] = run["start"] + run["wall"] - pts[total]
    if s0 in pts and total in pts and total > s0:
        out["before"] = pts[s0] - run["start"]
        out["window"] = span = pts[total] - pts[s0]
        out["b"] = (total - s0) * BATCH / span if span > 0 else None
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def ratio(a, b) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_table(ours: list[dict], lightly: list[dict], s0: int, total: int, reps: int) -> float | None:
    o = {k: median([m[k] for m in ours]) for k in ours[0]}
    l_ = {k: median([m[k] for m in lightly]) for k in lightly[0]}
    med = " (median of %d)" % reps if reps > 1 else ""
    rows = [
        ("images trained (steps x 64)", fmt(o["images"], ".0f"), fmt(l_["images"], ".0f"), ""),
        (f"wall clock of the whole command, s (lower is better){med}", fmt(o["wall"], ".1f"),
         fmt(l_["wall"], ".1f"), ratio(o["wall"], l_["wall"])),
        (f"(a) img/s, start-up included{med}", fmt(o["a"], ".1f"), fmt(l_["a"], ".1f"), ratio(o["a"], l_["a"])),
        (f"  start to the end of step {s0}, s{med}", fmt(o["before"], ".1f"), fmt(l_["before"], ".1f"),
         ratio(o["before"], l_["before"])),
        (f"  steps {s0 + 1}-{total}, s{med}", fmt(o["window"], ".1f"), fmt(l_["window"], ".1f"),
         ratio(o["window"], l_["window"])),
        (f"  end of the last step to exit, s{med}", fmt(o["after"], ".1f"), fmt(l_["after"], ".1f"),
         ratio(o["after"], l_["after"])),
        (f"(b) img/s, steady state, steps {s0 + 1}-{total}{med}", fmt(o["b"], ".1f"), fmt(l_["b"], ".1f"),
         ratio(o["b"], l_["b"])),
        ("SwAV loss at the last step (sanity)", fmt(o["loss"], ".3f"), fmt(l_["loss"], ".3f"), ""),
    ]
    head = ("measure", "ours (gaelle pretrain, Ray)", "lightly loop", "ours / lightly")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    line = lambda r: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    if o["a"] and l_["a"]:
        return o["a"] / l_["a"]
    return None


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150, help="training steps of 64 images, rounded up to whole "
                   "epochs (default 150: 6 epochs of 1600 images, ~2-3 min per side on 2 idle cores)")
    p.add_argument("--images", type=int, default=1600, help="toy images per epoch (default 1600)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process, both sides")
    p.add_argument("--loader-workers", type=int, default=1,
                   help="DataLoader worker processes of the lightly loop (default 1; 0: crops in the loop)")
    p.add_argument("--lightly-per-crop", action="store_true",
                   help="lightly loop calls the model once per crop (lightly's tutorial) instead of once per "
                        "resolution (ours)")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="steady state starts at the first step our run logs at or after this (also our "
                        "train.log_every_steps; default 10)")
    p.add_argument("--reps", type=int, default=1, help="interleaved pairs of runs; medians are reported")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="experiment config (default: the demo's)")
    p.add_argument("--shards", type=Path, help="existing shards to read (default: a toy set made in the work folder)")
    p.add_argument("--split", default="train", help="split of the shards to train on")
    p.add_argument("--workdir", type=Path, help="work folder (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, runs, checkpoints)")
    p.add_argument("--quiet", dest="echo", action="store_false", help="do not echo our progress lines")
    p.add_argument("--lightly-child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.lightly_child:
        return args
    for name in ("steps", "images", "threads", "reps", "warmup_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.loader_workers < 0:
        p.error("--loader-workers must be >= 0")
    if args.images < BATCH:
        p.error(f"--images must hold one batch of {BATCH}")
    args.config = args.config.resolve()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.lightly_child:
        return lightly_child(args.lightly_child)
    import importlib.util

    if importlib.util.find_spec("lightly") is None:  # used in the child; checked here
        sys.exit("lightly is not installed: pip install -e .[bench]")

    spe = args.images // BATCH
    epochs = math.ceil(args.steps / spe)
    total = epochs * spe
    log_every = args.warmup_steps
    logged = sorted({e * spe + k for e in range(epochs) for k in range(1, spe + 1) if k % log_every == 0 or k == spe})
    s0 = next((s for s in logged if s >= args.warmup_steps and s < total), None)
    if s0 is None:
        s0 = logged[0]

    made = args.workdir is None
    work = Path(tempfile.mkdtemp(prefix="peer_swav_")) if made else args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        shards = args.shards.resolve() if args.shards else work / "shards"
        if not args.shards:
            t = time.perf_counter()
            run_checked(gaelle_cmd("prepare", "toy", "--out", str(shards), "--n-train", str(args.images),
                                   "--n-val", "64"), work)
            print(f"toy shards: {args.images} train images in {shards} ({time.perf_counter() - t:.1f}s, not timed)")
        cfg = resolved_config(args.config, ours_overrides(args, shards, work / "config_check", epochs, log_every), work)
        if tuple(cfg["augmentation"]["ratio"]) != (0.75, 4 / 3):
            print(f"  note: augmentation.ratio {cfg['augmentation']['ratio']} but lightly's SwaVTransform always "
                  "uses 3/4-4/3")
        if total != args.steps:
            print(f"steps rounded up to whole epochs: {total} ({epochs} epochs x {spe} steps of {BATCH} images)")
        print(f"{total} steps x {BATCH} images, {epochs} epochs of {args.images} images, threads {args.threads}; "
              f"work folder {work}")

        ours, lightly_runs, sources = [], [], set()
        for rep in range(args.reps):
            order = ("ours", "lightly") if rep % 2 == 0 else ("lightly", "ours")
            for side in order:
                if side == "ours":
                    print(f"[rep {rep + 1}/{args.reps}] ours: gaelle pretrain ...", flush=True)
                    run = run_ours(args, shards, work, rep, epochs, log_every)
                    sources.add(run["source"])
                    ours.append(measures(run, s0, total))
                    print(f"  ours: {run['wall']:.1f}s", flush=True)
                else:
                    print(f"[rep {rep + 1}/{args.reps}] lightly loop ...", flush=True)
                    run = run_lightly(args, cfg, shards, work, rep, total, spe)
                    if run["steps"] != total:
                        sys.exit(f"lightly loop ran {run['steps']} steps, expected {total}")
                    lightly_runs.append(measures(run, s0, total))
                    print(f"  lightly: {run['wall']:.1f}s (shards read in {run['read_s']:.2f}s, "
                          f"data wait {run['wait_s']:.1f}s)", flush=True)

        print()
        print(f"SwAV-only, {Path(args.config).name}: ResNet-18, head 512-512-64, "
              f"{cfg['model']['nmb_prototypes']} prototypes, crops "
              f"{' + '.join(f'{n}x{s}' for n, s in zip(cfg['augmentation']['nmb_crops'], cfg['augmentation']['size_crops']))}"
              f" px, batch {BATCH}, {total} steps, {args.threads} threads, loader workers {args.loader_workers}")
        r = print_table(ours, lightly_runs, s0, total, args.reps)
        verdict = "n/a" if r is None else ("met" if r >= TARGET else "NOT met")
        print(f"\ntarget: ours >= {TARGET}x lightly's loop, start-up included (a): "
              f"{'n/a' if r is None else f'{r:.2f}x'}, {verdict}")
        print("\nnotes:")
        print("  ours: one Ray Train worker (--threads CPUs) on a local Ray instance, crops in a Ray Data "
              "task, colour on the worker; checkpoints every epoch.")
        print(f"  ours steady-state times from: {', '.join(sorted(sources))}.")
        print("  lightly: JPEG bytes read once from the same Parquet shards into memory (timed), decoded with PIL "
              f"every epoch in the DataLoader, crops and colour by lightly's SwaVTransform in {args.loader_workers} "
              f"DataLoader worker(s); model called once "
              f"{'per crop (tutorial style)' if args.lightly_per_crop else 'per resolution (as ours)'}; "
              "LARS; final save.")
        print("  (b) covers the same steps on both sides: from the end of step "
              f"{s0} to the end of step {total}, everything in between included.")
    finally:
        if made and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif made:
            print(f"work folder kept: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
