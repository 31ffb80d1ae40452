"""Linear probe on a frozen backbone: the SS-PRL protocol that GAELLE reports (method.md 7).

Protocol (`linear_probe`, the full one):
- backbone frozen, in eval mode (BatchNorm uses its running statistics), no gradient;
- pooled features (F = 2048 for ResNet-50) -> Linear(F, C), weights N(0, 0.01), bias 0.1;
- loss: BCE-with-logits summed over classes, divided by the batch size; targets equal to
  255 (VOC "difficult") contribute nothing;
- SGD momentum 0.9, weight decay 1e-6 (eval.momentum, eval.weight_decay), gradient norm
  clipped at 10 (eval.grad_clip);
- learning rate eval.lr with a cosine schedule to 0, updated every iteration:
  lr_t = lr * (1 + cos(pi * t / T)) / 2, t = 0 .. T-1 over T = epochs * steps_per_epoch;
- batch eval.batch_size (COCO 128 / lr 0.1, VOC 32 / lr 0.03: see PROTOCOL), eval.epochs
  (100);
- train images: RandomResizedCrop(image_size) + flip, a new crop every epoch, so the
  backbone runs on every training image every epoch; test images: Resize(resize_size) +
  CenterCrop(image_size). As the backbone is frozen and in eval mode, the test features
  are the same every epoch and are computed once per run (this is exact, not a proxy);
- mAP (gaelle_ray.eval.metrics) once over all test scores after every epoch
  (`eval_every`); reported: the FINAL epoch's mAP and the BEST mAP over epochs (what the
  published protocol reports), each labelled, with per-class AP tables of both epochs.

`fast_linear_probe` is a proxy, not the protocol: the frozen backbone's features are
computed once on centre crops of the train and test images (cached on disk) and the same
classifier, loss and schedule are trained on those fixed features. No augmentation, so it
is typically a little off the full protocol (see the README for measured gaps); use it for
quick comparisons between checkpoints, and the full protocol for reported numbers.

The distributed full protocol (several Ray Train workers) is in gaelle_ray.eval.distributed.
`run_linear_eval` is the entry point of `gaelle linear-eval`.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaelle_ray.eval.checkpoints import (
    load_backbone_info, pretraining_data_of, pretraining_run_id_of,
)
from gaelle_ray.eval.features import (
    EvalTransform, ShardImages, default_cache_dir, extract_features, make_loader,
)
from gaelle_ray.eval.leakage import check_overlap
from gaelle_ray.eval.metrics import mean_average_precision

log = logging.getLogger(__name__)

__all__ = [
    "PROTOCOL", "ProbeSettings", "ProbeResult", "make_classifier", "masked_bce", "cosine_lr",
    "fit_classifier", "linear_probe", "fast_linear_probe", "probe_datasets", "check_overlap",
    "run_linear_eval", "log_eval_run",
]

# The paper's settings per dataset (method.md 7); the config's eval.* values are used, and
# a mismatch with these is logged.
PROTOCOL = {"coco": {"batch_size": 128, "lr": 0.1}, "voc": {"batch_size": 32, "lr": 0.03}}


@dataclass(frozen=True)
class ProbeSettings:
    """Hyper-parameters of a linear probe (defaults: COCO protocol)."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-6
    grad_clip: float = 10.0  # max gradient norm; <= 0 = no clipping
    image_size: int = 224
    resize_size: int = 256
    seed: int = 0
    eval_every: int = 1  # test mAP every k epochs (and always after the last)

    @classmethod
    def from_config(cls, config, **overrides: Any) -> "ProbeSettings":
        ev = config.eval
        base = cls(epochs=ev.epochs, batch_size=ev.batch_size, lr=ev.lr, momentum=ev.momentum,
                   weight_decay=ev.weight_decay, grad_clip=ev.grad_clip, image_size=ev.image_size,
                   resize_size=ev.resize_size, seed=config.train.seed)
        return replace(base, **overrides)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "image_size", "resize_size", "eval_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ProbeSettings.{name} must be > 0, got {getattr(self, name)}")
        if self.lr < 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"ProbeSettings: need lr >= 0, weight_decay >= 0, 0 <= momentum < 1; got "
                             f"lr={self.lr}, weight_decay={self.weight_decay}, momentum={self.momentum}")


@dataclass
class ProbeResult:
    """What a probe reports. map_final: test mAP after the last epoch; map_best: the best test
    mAP over the evaluated epochs (the published protocol's number), reached at best_epoch
    (0-based). ap_final / ap_best: (C,) per-class AP of those epochs (nan = class without a
    positive test image, left out of the mean)."""

    map_final: float
    map_best: float
    best_epoch: int
    ap_final: np.ndarray
    ap_best: np.ndarray
    positives: np.ndarray
    class_names: list[str]
    excluded: list[str]
    history: list[dict[str, float]]
    num_train: int
    num_test: int
    seconds: float
    mode: str = "full"
    extra: dict[str, Any] = field(default_factory=dict)

    def per_class(self) -> list[dict[str, Any]]:
        return [{"class": name, "ap_final": float(a), "ap_best_epoch": float(b), "positives": int(p)}
                for name, a, b, p in zip(self.class_names, self.ap_final, self.ap_best, self.positives)]

    def to_dict(self) -> dict[str, Any]:
        return {"map_final": self.map_final, "map_best": self.map_best, "best_epoch": self.best_epoch,
                "mode": self.mode, "per_class": self.per_class(), "excluded_classes": list(self.excluded),
                "history": list(self.history), "num_train": self.num_train, "num_test": self.num_test,
                "seconds": self.seconds, **self.extra}


# ----------------------------------------------------------------------------- pieces


def make_classifier(in_features: int, num_classes: int, generator: torch.Generator | None = None) -> nn.Linear:
    """Linear(F, C) with weights ~ N(0, 0.01) and bias 0.1."""
    clf = nn.Linear(in_features, num_classes)
    with torch.no_grad():
        clf.weight.normal_(0.0, 0.01, generator=generator)
        clf.bias.fill_(0.1)
    return clf


def masked_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits summed over classes and divided by the batch size, 255 masked out.

    logits: (B, C) float; targets: (B, C) uint8/int in {0, 1, 255}. Returns a scalar.
    """
    if logits.shape != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} differ in shape")
    valid = targets != 255  # (B, C)
    y = (targets == 1).to(logits.dtype)  # (B, C)
    per = F.binary_cross_entropy_with_logits(logits, y, reduction="none")  # (B, C)
    return (per * valid).sum() / max(logits.shape[0], 1)


def sgd_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], loss: torch.Tensor, grad_clip: float,
             where: str) -> None:
    """One optimiser step on `loss` (a scalar), gradient norm clipped at grad_clip (0 = off);
    a non-finite loss is a FloatingPointError naming `where`."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at {where}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """base_lr * (1 + cos(pi * step / total_steps)) / 2: base_lr at step 0, -> 0 at the end."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def _steps(n: int, batch: int) -> int:
    return max(1, math.ceil(n / batch))


def fit_classifier(clf: nn.Module, forward: nn.Module, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                   steps_per_epoch: int, score_test: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
                   settings: ProbeSettings, class_names: Sequence[str], *, is_main: bool = True,
                   name: str = "linear", num_train: int = 0, params: Sequence[nn.Parameter] | None = None
                   ) -> ProbeResult | None:
    """The training loop shared by every probe (single process, Ray workers, fast mode).

    clf: the classifier (its parameters are optimised); forward: the module called on a
    batch (clf itself, or clf wrapped in DDP); batches(epoch): (features (B, F), targets
    (B, C)) of one epoch, exactly `steps_per_epoch` of them; score_test(): (scores (N, C),
    targets (N, C)) of the whole test set on the main process, None elsewhere.

    Returns the ProbeResult on the main process, None elsewhere.
    """
    params = list(params) if params is not None else list(clf.parameters())
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    total = settings.epochs * steps_per_epoch
    it, t0 = 0, time.perf_counter()
    history: list[dict[str, float]] = []
    best = (-math.inf, -1, None)
    final = None
    for epoch in range(settings.epochs):
        clf.train()
        loss_sum, n_steps = 0.0, 0
        for x, y in batches(epoch):
            lr = cosine_lr(settings.lr, it, total)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = masked_bce(forward(x), y)
            sgd_step(opt, params, loss, settings.grad_clip, f"{name}: epoch {epoch}, iteration {it}")
            loss_sum += float(loss.detach())
            n_steps += 1
            it += 1
        if n_steps != steps_per_epoch:
            raise RuntimeError(f"{name}: epoch {epoch} had {n_steps} steps, expected {steps_per_epoch}")
        record = {"epoch": epoch, "train_loss": loss_sum / max(n_steps, 1), "lr": cosine_lr(settings.lr, it - 1, total)}
        if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
            clf.eval()
            out = score_test()
            if out is not None:
                scores, targets = out
                m, ap, info = mean_average_precision(scores, targets, class_names)
                record["test_map"] = m
                final = (m, ap, info)
                if m > best[0]:
                    best = (m, epoch, ap)
        if is_main:
            history.append(record)
            log.info("%s epoch %d/%d loss %.4f%s", name, epoch + 1, settings.epochs, record["train_loss"],
                     f" test mAP {100 * record['test_map']:.2f}" if "test_map" in record else "")
    if not is_main:
        return None
    m_final, ap_final, info = final
    if best[2] is None:  # every evaluated mAP was nan (no positive test label at all)
        best = (m_final, settings.epochs - 1, ap_final)
    return ProbeResult(map_final=m_final, map_best=best[0], best_epoch=best[1], ap_final=ap_final,
                       ap_best=best[2], positives=info["positives"], class_names=list(class_names),
                       excluded=list(info["excluded_names"]), history=history, num_train=num_train,
                       num_test=info["num_samples"], seconds=time.perf_counter() - t0)


@torch.no_grad()
def _scores(clf: nn.Module, feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """feats (N, F) -> clf logits (N, C), on CPU."""
    dev = next(clf.parameters()).device
    return torch.cat([clf(feats[i:i + chunk].to(dev)).float().cpu() for i in range(0, len(feats), chunk)]) \
        if len(feats) else torch.zeros(0, clf.out_features)


def _check_classes(train_set: ShardImages, test_set: ShardImages) -> None:
    if train_set.class_names != test_set.class_names:
        raise ValueError(f"train split {train_set.split!r} and test split {test_set.split!r} name different "
                         f"classes ({len(train_set.class_names)} vs {len(test_set.class_names)})")
    if not train_set.class_names:
        raise ValueError(f"{train_set.uri}: the shards carry no labels (0 classes); a linear probe needs labels")
    for ds in (train_set, test_set):
        if len(ds) == 0:
            raise ValueError(f"{ds.uri}: split {ds.split!r} has no images")


def _freeze(backbone: nn.Module, device: torch.device) -> nn.Module:
    backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def probe_datasets(data_uri: str, train_split: str, test_split: str, settings: ProbeSettings
                   ) -> tuple[ShardImages, ShardImages]:
    """(train set with the train transform, test set with the eval transform)."""
    train = ShardImages(data_uri, train_split, EvalTransform(True, settings.image_size, settings.resize_size))
    test = ShardImages(data_uri, test_split, EvalTransform(False, settings.image_size, settings.resize_size))
    _check_classes(train, test)
    return train, test


# ----------------------------------------------------------------------------- probes


def linear_probe(backbone: nn.Module, train_set: ShardImages, test_set: ShardImages, settings: ProbeSettings,
                 *, device: str | torch.device = "cpu", loader_workers: int = 0,
                 cache_dir: str | os.PathLike | None = None) -> ProbeResult:
    """The full protocol in one process (see the module docstring).

    backbone: (B, 3, S, S) -> (B, F) with attribute num_features; frozen here (eval mode,
    requires_grad False). train_set: train transform (RandomResizedCrop + flip); test_set:
    eval transform. Seeds torch's global RNG with settings.seed (crops and init).
    cache_dir: optional on-disk cache for the (deterministic) test features.
    """
    _check_classes(train_set, test_set)
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    backbone = _freeze(backbone, device)
    gen = torch.Generator().manual_seed(settings.seed)
    clf = make_classifier(backbone.num_features, train_set.num_classes, gen).to(device)
    test_feats, test_labels, _ = extract_features(backbone, test_set, settings.batch_size, device,
                                                  cache_dir=cache_dir, num_workers=loader_workers)
    steps = _steps(len(train_set), settings.batch_size)

    def batches(epoch: int):
        order = train_set.block_order(settings.seed, epoch)
        for images, labels, _ in make_loader(train_set, settings.batch_size, order=order, num_workers=loader_workers):
            with torch.no_grad():
                feats = backbone(images.to(device, non_blocking=True)).float()  # (B, F)
            yield feats, labels.to(device)

    result = fit_classifier(clf, clf, batches, steps, lambda: (_scores(clf, test_feats), test_labels), settings,
                            train_set.class_names, name="linear-probe", num_train=len(train_set))
    result.mode = "full"
    return result


def fast_linear_probe(backbone: nn.Module, train_set: ShardImages, test_set: ShardImages, settings: ProbeSettings,
                      *, device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                      loader_workers: int = 0) -> ProbeResult:
    """A proxy of the protocol: features of centre crops computed once and cached.

    The train set is read with the eval transform (whatever transform it came with);
    features of both splits go to `cache_dir` (None: default_cache_dir()), so a second call
    with the same backbone weights and data does not run the backbone. The classifier,
    loss, optimiser, schedule and batch size are the protocol's.
    """
    _check_classes(train_set, test_set)
    device = torch.device(device)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    backbone = _freeze(backbone, device)
    centre = EvalTransform(False, settings.image_size, settings.resize_size)
    train_feats, train_labels, _ = extract_features(backbone, train_set.with_transform(centre), settings.batch_size,
                                                    device, cache_dir=cache_dir, num_workers=loader_workers)
    test_feats, test_labels, _ = extract_features(backbone, test_set.with_transform(centre), settings.batch_size,
                                                  device, cache_dir=cache_dir, num_workers=loader_workers)
    gen = torch.Generator().manual_seed(settings.seed)
    clf = make_classifier(backbone.num_features, train_set.num_classes, gen).to(device)
    n, b = len(train_feats), settings.batch_size
    train_feats, train_labels = train_feats.to(device), train_labels.to(device)

    def batches(epoch: int):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch)).to(device)
        for i in range(0, n, b):
            idx = perm[i:i + b]
            yield train_feats[idx], train_labels[idx]

    result = fit_classifier(clf, clf, batches, _steps(n, b), lambda: (_scores(clf, test_feats), test_labels),
                            settings, train_set.class_names, name="fast-linear-probe", num_train=n)
    result.mode = "fast"
    return result


# ----------------------------------------------------------------------------- MLflow


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def write_per_class_csv(result: ProbeResult, path: str | os.PathLike) -> Path:
    """The per-class AP table (class, ap_final, ap_best_epoch, positives) as CSV."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "ap_final", "ap_best_epoch", "positives"])
        writer.writeheader()
        for row in result.per_class():
            writer.writerow(row)
    return path


def log_eval_run(config, result: ProbeResult, *, job: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, Any], parent_run_id: str | None = None) -> str:
    """One MLflow run (experiment config.tracking.experiment) holding an evaluation: params,
    tags (mlflow.parentRunId = the pretraining run when known), metrics map_final, map_best,
    best_epoch, ap/<class> (final epoch), per-epoch test_map / train_loss / lr, the
    per-class AP table as per_class_ap.csv and its bar chart pictures/per_class_ap.png.
    Returns the run id."""
    from gaelle_ray import tracking

    uri = tracking.resolve_tracking_uri(config)
    tracking.check_reachable(uri)
    run_id = tracking.start_run(uri, config.tracking.experiment, run_name, params,
                                {"job": job, **{k: str(v) for k, v in tags.items()}}, parent_run_id=parent_run_id)
    try:
        logger = tracking.RunLogger(uri, run_id)
        for rec in result.history:
            logger.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))
        final = {"map_final": result.map_final, "map_best": result.map_best, "best_epoch": result.best_epoch}
        for name, ap in zip(result.class_names, result.ap_final):
            if np.isfinite(ap):
                final[f"ap/{_metric_name(name)}"] = float(ap)
        logger.log_metrics(final, step=0)
        if result.excluded:
            logger.set_tags({"excluded_classes": ", ".join(result.excluded)[:4000]})
        with tempfile.TemporaryDirectory() as tmp:
            from gaelle_ray import viz

            logger.log_artifact(write_per_class_csv(result, Path(tmp) / "per_class_ap.csv"))
            chart = viz.plot_per_class_ap(result.class_names, result.ap_final,
                                          title=f"{run_name}: per-class AP (final epoch, mAP {100 * result.map_final:.1f})")
            logger.log_artifact(viz.save_figure(chart, Path(tmp) / "per_class_ap.png"), "pictures")
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    return run_id


# ----------------------------------------------------------------------------- entry point


def _warn_protocol(dataset: str, settings: ProbeSettings) -> None:
    want = PROTOCOL.get(dataset)
    if want and (settings.batch_size, settings.lr) != (want["batch_size"], want["lr"]):
        log.warning("%s linear probe: the protocol uses batch %d and lr %g; this run uses batch %d and lr %g "
                    "(set eval.batch_size / eval.lr to reproduce the paper)", dataset, want["batch_size"],
                    want["lr"], settings.batch_size, settings.lr)


def leakage_guard(checkpoint: str, data_uri: str, test_split: str, allow_overlap: bool,
                  cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run check_overlap against the checkpoint's pretraining data when the checkpoint
    records it. Returns tags: {"leakage_check": "clean" | "overlap" | "unknown",
    "leakage_overlap": n}."""
    pre = pretraining_data_of(checkpoint)
    if pre is None:
        log.warning("leakage check skipped: %s does not record its pretraining data (not a gaelle checkpoint "
                    "folder); make sure it was not pretrained on the %r images of %s", checkpoint, test_split, data_uri)
        return {"leakage_check": "unknown"}
    try:
        n = check_overlap(pre["shards"], data_uri, test_split, allow_overlap, pretrain_splits=[pre["split"]],
                          cache_dir=cache_dir)
    except FileNotFoundError as exc:
        msg = (f"leakage check: cannot read the pretraining shards {pre['shards']!r} recorded in {checkpoint} "
               f"({exc})")
        if not allow_overlap:
            raise ValueError(msg + "; make them reachable, or pass --allow-overlap to evaluate unchecked") from None
        log.warning("%s; evaluating unchecked (allow_overlap)", msg)
        return {"leakage_check": "unknown"}
    return {"leakage_check": "overlap" if n else "clean", "leakage_overlap": n}


def default_loader_workers(device: str | torch.device) -> int:
    """DataLoader processes for one-process runs: 0 on CPU (the model needs the cores),
    min(8, CPUs - 1) on a GPU (JPEG decoding would starve it)."""
    if torch.device(device).type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _storage_path(config) -> str:
    """Ray Train storage for distributed probes: ray.storage_path, else train.run_dir
    (absolute when local)."""
    path = config.ray.storage_path or config.train.run_dir
    if "://" in path and not path.startswith("file://"):
        return path
    return str(Path(path.removeprefix("file://")).resolve())


def run_linear_eval(checkpoint: str, dataset: str | None, data_uri: str | None, config, *, fast: bool,
                    allow_overlap: bool | None = None, parent_run_id: str | None = None,
                    num_workers: int | None = None, device: str | None = None,
                    cache_dir: str | os.PathLike | None = None, track: bool = True,
                    use_gpu: bool | None = None, loader_workers: int | None = None) -> dict[str, Any]:
    """`gaelle linear-eval`: load a backbone, guard against leakage, probe, log to MLflow.

    Args:
        checkpoint: "random", a gaelle checkpoint folder, or a .pth file (torchvision
            backbone export, or the authors' released GAELLE/SwAV checkpoint); see
            gaelle_ray.eval.checkpoints.load_backbone.
        dataset: "coco", "voc" or "toy" (None/"" = config eval.dataset); names the run and
            picks the protocol settings that mismatches are warned about.
        data_uri: evaluation shards (None/"" = config eval.data).
        config: a validated Config; eval.* gives the splits and hyper-parameters,
            model.arch the arch of "random", tracking.* where MLflow runs go.
        fast: True = `fast_linear_probe` (cached centre-crop features, a proxy);
            False = the full protocol.
        allow_overlap: evaluate even when the test images were pretrained on (None =
            config eval.allow_overlap); the run is tagged leakage_check=overlap.
        parent_run_id: MLflow run id of the pretraining run (tag mlflow.parentRunId);
            None = read from <run_dir>/mlflow_run.json next to a checkpoint folder.
        num_workers: Ray Train workers for the full protocol (None = config
            eval.num_workers; 1 = this process, no Ray). The fast mode always runs here.
        device: "cpu", "cuda", ... for single-process runs (None = cuda when available).
        cache_dir: feature / hash cache folder (None = $GAELLE_CACHE/features or
            ~/.cache/gaelle/features).
        track: log to MLflow (False: only return the results).
        use_gpu: GPUs for the Ray workers (None = config train.use_gpu and a GPU visible).
        loader_workers: DataLoader processes decoding JPEGs in a single-process run (None =
            0 on CPU, min(8, CPUs - 1) on a GPU); Ray workers use ray.num_cpus_per_worker - 1.

    Returns:
        {"map_final", "map_best", "best_epoch", "mode", "per_class" [{class, ap_final,
        ap_best_epoch, positives}], "excluded_classes", "history", "num_train", "num_test",
        "seconds", "checkpoint", "checkpoint_kind", "arch", "dataset", "data",
        "leakage_check", "leakage_overlap", "run_id" (None when not tracked)}.
    """
    ev = config.eval
    checkpoint = os.fspath(checkpoint)
    dataset = dataset or ev.dataset
    data_uri = data_uri or ev.data
    if not data_uri:
        raise ValueError("linear-eval: no evaluation shards: pass the data URI or set eval.data")
    if track:  # fail before hours of probing, not after
        from gaelle_ray import tracking

        tracking.check_reachable(tracking.resolve_tracking_uri(config))
    allow = ev.allow_overlap if allow_overlap is None else allow_overlap
    workers = ev.num_workers if num_workers is None else num_workers
    if workers < 1:
        raise ValueError(f"linear-eval: num_workers must be >= 1, got {workers}")
    settings = ProbeSettings.from_config(config)
    _warn_protocol(dataset, settings)
    cache = default_cache_dir() if cache_dir is None else Path(cache_dir)

    if checkpoint == "random":
        torch.manual_seed(config.train.seed)  # the same random baseline every time
    backbone, info = load_backbone_info(checkpoint, config.model.arch if checkpoint == "random" else None)
    guard = leakage_guard(checkpoint, data_uri, ev.test_split, allow, cache / "hashes")
    parent = parent_run_id or pretraining_run_id_of(checkpoint)
    train_set, test_set = probe_datasets(data_uri, ev.train_split, ev.test_split, settings)

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaders = default_loader_workers(dev) if loader_workers is None else loader_workers
    if fast:
        if workers > 1:
            log.info("fast mode runs in this process; num_workers=%d ignored", workers)
        result = fast_linear_probe(backbone, train_set, test_set, settings, device=dev, cache_dir=cache,
                                   loader_workers=loaders)
    elif workers == 1:
        result = linear_probe(backbone, train_set, test_set, settings, device=dev, cache_dir=cache,
                              loader_workers=loaders)
    else:
        from gaelle_ray.eval.distributed import linear_probe_distributed

        gpu = (config.train.use_gpu and torch.cuda.is_available()) if use_gpu is None else use_gpu
        result = linear_probe_distributed(backbone, info["arch"], data_uri, ev.train_split, ev.test_split,
                                          settings, num_workers=workers, use_gpu=gpu,
                                          address=config.ray.address,
                                          cpus_per_worker=config.ray.num_cpus_per_worker,
                                          storage_path=_storage_path(config))
    out = result.to_dict()
    out.update(checkpoint=str(checkpoint), checkpoint_kind=info["kind"], arch=info["arch"], dataset=dataset,
               data=data_uri, leakage_check=guard["leakage_check"], leakage_overlap=guard.get("leakage_overlap"),
               run_id=None)
    log.info("linear eval (%s) of %s on %s: final mAP %.2f, best mAP over epochs %.2f (epoch %d)", result.mode,
             checkpoint, dataset, 100 * result.map_final, 100 * result.map_best, result.best_epoch + 1)
    if track:
        params = {**{f"eval.{k}": v for k, v in vars(ev).items()}, **{f"probe.{k}": v for k, v in vars(settings).items()},
                  "checkpoint": checkpoint, "checkpoint_kind": info["kind"], "arch": info["arch"], "dataset": dataset,
                  "data": data_uri, "mode": result.mode, "num_workers": 1 if fast else workers,
                  "num_train": result.num_train, "num_test": result.num_test}
        tags = {"mode": result.mode, "checkpoint": checkpoint, **guard}
        name = f"linear-eval-{dataset}" + ("-fast" if fast else "")
        out["run_id"] = log_eval_run(config, result, job="linear_eval", run_name=name, params=params, tags=tags,
                                     parent_run_id=parent)
    return out
