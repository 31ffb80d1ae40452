"""The probe core shared by every evaluation (method.md section 7): settings, result,
classifier, loss, schedule and the training loop.

Used by the single-process and fast probes (gaelle_ray.eval.linear), the probe on Ray
Train workers (gaelle_ray.eval.distributed) and semi-supervised fine-tuning
(gaelle_ray.eval.semisup), so that all of them init the classifier, weigh the loss, step
the optimiser and score the test set the same way:

- classifier: Linear(F, C), weights N(0, 0.01), bias 0.1 (`make_classifier`);
- loss: BCE-with-logits summed over classes, divided by the batch size; targets equal to
  255 (VOC "difficult") contribute nothing (`masked_bce`);
- SGD step with the gradient norm clipped; a non-finite loss is an error (`sgd_step`);
- cosine learning rate to 0, updated every iteration (`cosine_lr`);
- mAP once over all test scores after an epoch; final and best-over-epochs mAP reported
  (`EpochMaps`, `fit_classifier`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gaelle_ray.eval.features import EvalTransform, ShardImages
from gaelle_ray.eval.metrics import mean_average_precision
from gaelle_ray.progress import bar

log = logging.getLogger(__name__)

__all__ = [
    "ProbeSettings", "ProbeResult", "EpochMaps", "make_classifier", "masked_bce", "sgd_step", "cosine_lr",
    "epoch_steps", "fit_classifier", "classifier_scores", "freeze", "check_classes", "probe_datasets",
]


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
    precision: str = "fp32"  # of the frozen backbone's forward (eval.precision): fp32 | bf16 | fp16

    @classmethod
    def from_config(cls, config, **overrides: Any) -> "ProbeSettings":
        ev = config.eval
        base = cls(epochs=ev.epochs, batch_size=ev.batch_size, lr=ev.lr, momentum=ev.momentum,
                   weight_decay=ev.weight_decay, grad_clip=ev.grad_clip, image_size=ev.image_size,
                   resize_size=ev.resize_size, seed=config.train.seed, precision=ev.precision)
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


class EpochMaps:
    """The test mAP of the evaluated epochs: the last one (final) and the best one.

    `add` scores one epoch; `result` makes the ProbeResult. When every evaluated mAP is nan
    (no positive test label at all), the best epoch is the last one.
    """

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.final: tuple[float, np.ndarray, dict[str, Any]] | None = None
        self.best: tuple[float, int, np.ndarray | None] = (-math.inf, -1, None)

    def add(self, epoch: int, scores: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
        """mAP of one epoch's test scores (N, C) against targets (N, C); returns it."""
        m, ap, info = mean_average_precision(scores, targets, self.class_names)
        self.final = (m, ap, info)
        if m > self.best[0]:
            self.best = (m, epoch, ap)
        return m

    def result(self, last_epoch: int, history: list[dict[str, float]], num_train: int, seconds: float,
               mode: str = "full", extra: dict[str, Any] | None = None) -> ProbeResult:
        """The ProbeResult; last_epoch: the run's last epoch (0-based)."""
        if self.final is None:
            raise RuntimeError("no epoch was scored on the test set")
        m_final, ap_final, info = self.final
        best = self.best if self.best[2] is not None else (m_final, last_epoch, ap_final)
        return ProbeResult(map_final=m_final, map_best=best[0], best_epoch=best[1], ap_final=ap_final,
                           ap_best=best[2], positives=info["positives"], class_names=list(self.class_names),
                           excluded=list(info["excluded_names"]), history=history, num_train=num_train,
                           num_test=info["num_samples"], seconds=seconds, mode=mode, extra=dict(extra or {}))


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
             where: str, scaler: torch.amp.GradScaler | None = None) -> None:
    """One optimiser step on `loss` (a scalar), gradient norm clipped at grad_clip (0 = off);
    a non-finite loss is a FloatingPointError naming `where`. scaler: an fp16 GradScaler
    (gradients scaled, unscaled before clipping; a step with overflowing gradients is
    skipped and the scale shrinks), or None."""
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} at {where}")
    opt.zero_grad(set_to_none=True)
    if scaler is None or not scaler.is_enabled():
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(params, grad_clip)
    scaler.step(opt)
    scaler.update()


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """base_lr * (1 + cos(pi * step / total_steps)) / 2: base_lr at step 0, -> 0 at the end."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def epoch_steps(n: int, batch: int) -> int:
    """Optimiser steps of an epoch over n samples in batches of `batch`, the last batch
    partial: ceil(n / batch), at least 1."""
    return max(1, math.ceil(n / batch))


@torch.no_grad()
def classifier_scores(clf: nn.Module, feats: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """The classifier's logits of features, `chunk` rows at a time on the classifier's device.

    feats: (N, F), any device. Returns (N, C) float32 on the CPU ((0, C) when N = 0).
    """
    dev = next(clf.parameters()).device
    return torch.cat([clf(feats[i:i + chunk].to(dev)).float().cpu() for i in range(0, len(feats), chunk)]) \
        if len(feats) else torch.zeros(0, clf.out_features)


def freeze(backbone: nn.Module, device: torch.device) -> nn.Module:
    """The backbone on `device`, in eval mode (BatchNorm uses its running statistics) and with
    requires_grad False on every parameter: the frozen backbone of a linear probe."""
    backbone.to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone


def check_classes(train_set: ShardImages, test_set: ShardImages) -> None:
    """ValueError unless both splits name the same classes (at least one) and hold images."""
    if train_set.class_names != test_set.class_names:
        raise ValueError(f"train split {train_set.split!r} and test split {test_set.split!r} name different "
                         f"classes ({len(train_set.class_names)} vs {len(test_set.class_names)})")
    if not train_set.class_names:
        raise ValueError(f"{train_set.uri}: the shards carry no labels (0 classes); a linear probe needs labels")
    for ds in (train_set, test_set):
        if len(ds) == 0:
            raise ValueError(f"{ds.uri}: split {ds.split!r} has no images")


def probe_datasets(data_uri: str, train_split: str, test_split: str, settings: ProbeSettings
                   ) -> tuple[ShardImages, ShardImages]:
    """(train set with the train transform, test set with the eval transform)."""
    train = ShardImages(data_uri, train_split, EvalTransform(True, settings.image_size, settings.resize_size))
    test = ShardImages(data_uri, test_split, EvalTransform(False, settings.image_size, settings.resize_size))
    check_classes(train, test)
    return train, test


# ----------------------------------------------------------------------------- loop


def fit_classifier(clf: nn.Module, forward: nn.Module, batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                   steps_per_epoch: int, score_test: Callable[[], tuple[torch.Tensor, torch.Tensor] | None],
                   settings: ProbeSettings, class_names: Sequence[str], *, is_main: bool = True,
                   name: str = "linear", num_train: int = 0, params: Sequence[nn.Parameter] | None = None,
                   log_epochs: bool = True) -> ProbeResult | None:
    """The training loop shared by every linear probe (single process, Ray workers, fast mode).

    clf: the classifier (its parameters are optimised); forward: the module called on a
    batch (clf itself, or clf wrapped in DDP); batches(epoch): (features (B, F), targets
    (B, C)) of one epoch, exactly `steps_per_epoch` of them; score_test(): (scores (N, C),
    targets (N, C)) of the whole test set on the main process, None elsewhere. log_epochs:
    one log line per epoch, and on a terminal a progress bar over the iterations (off for
    the online probe inside training).

    Returns the ProbeResult on the main process, None elsewhere.
    """
    params = list(params) if params is not None else list(clf.parameters())
    opt = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay)
    total = settings.epochs * steps_per_epoch
    it, t0 = 0, time.perf_counter()
    history: list[dict[str, float]] = []
    maps = EpochMaps(class_names)
    progress = bar(total=total, desc=name, unit="step", enabled=None if is_main and log_epochs else False)
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
            progress.update(1)
        if n_steps != steps_per_epoch:
            raise RuntimeError(f"{name}: epoch {epoch} had {n_steps} steps, expected {steps_per_epoch}")
        record = {"epoch": epoch, "train_loss": loss_sum / max(n_steps, 1), "lr": cosine_lr(settings.lr, it - 1, total)}
        if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == settings.epochs:
            clf.eval()
            out = score_test()
            if out is not None:
                record["test_map"] = maps.add(epoch, *out)
        if is_main:
            history.append(record)
        if is_main and log_epochs:
            log.info("%s epoch %d/%d loss %.4f%s", name, epoch + 1, settings.epochs, record["train_loss"],
                     f" test mAP {100 * record['test_map']:.2f}" if "test_map" in record else "")
            progress.set_description(f"{name} epoch {epoch + 1}/{settings.epochs} loss {record['train_loss']:.4f}"
                                     + (f" mAP {100 * record['test_map']:.1f}" if "test_map" in record else ""))
    progress.close()
    if not is_main:
        return None
    return maps.result(settings.epochs - 1, history, num_train, time.perf_counter() - t0)
