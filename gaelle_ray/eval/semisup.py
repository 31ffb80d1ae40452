"""Semi-supervised evaluation: fine-tune backbone + classifier on 1% or 10% of the labels
(method.md section 7).

- label subset: `label_subset` picks round(percent / 100 * N) images (at least 1) of the
  train split by a seeded permutation of their sorted image ids, so the subset depends on
  (image ids, percent, seed) only: the same images every run, whatever the shard layout;
- the backbone trains (train mode, BatchNorm statistics update) together with a
  Linear(F, C) classifier initialised as in the linear probe (N(0, 0.01), bias 0.1);
- SGD momentum eval.momentum (0.9), weight decay eval.weight_decay (1e-6), lr 0.001 for
  the backbone and 0.1 for the classifier, multiplied by 0.2 at epochs 12 and 16, 20 epochs,
  batch 32; no gradient clipping unless `grad_clip` is given (the protocol names none);
- loss and metric as in the linear probe (masked BCE; mAP once over all test scores);
- train transform RandomResizedCrop + flip, test Resize + CenterCrop; the test set is
  scored after every epoch; final and best-over-epochs mAP are reported, labelled.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from gaelle_ray import storage
from gaelle_ray.eval.checkpoints import load_backbone_info, pretraining_run_id_of
from gaelle_ray.eval.features import (
    EvalTransform, ShardImages, default_loader_workers, extract_features, make_loader,
)
from gaelle_ray.eval.leakage import leakage_guard
from gaelle_ray.eval.probe import (
    EpochMaps, ProbeResult, check_classes, classifier_scores, make_classifier, masked_bce, sgd_step,
)
from gaelle_ray.eval.report import eval_run_name, log_eval_run
from gaelle_ray.precision import autocast, autocast_dtype, grad_scaler
from gaelle_ray.progress import bar

log = logging.getLogger(__name__)

PERCENTS = (1, 10)


@dataclass(frozen=True)
class SemisupSettings:
    """Fine-tuning hyper-parameters (defaults: the protocol)."""

    percent: float = 1
    epochs: int = 20
    batch_size: int = 32
    lr_backbone: float = 0.001
    lr_classifier: float = 0.1
    milestones: tuple[int, ...] = (12, 16)
    gamma: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 1e-6
    grad_clip: float = 0.0  # <= 0: none
    image_size: int = 224
    resize_size: int = 256
    seed: int = 0  # the label subset and the run's randomness
    precision: str = "fp32"  # autocast of the fine-tuning and test forwards (eval.precision); fp16 with a GradScaler

    def __post_init__(self) -> None:
        if not 0 < self.percent <= 100:
            raise ValueError(f"semisup: percent must be in (0, 100], got {self.percent}")
        if self.epochs <= 0 or self.batch_size <= 0:
            raise ValueError(f"semisup: epochs and batch_size must be > 0, got {self.epochs}, {self.batch_size}")


def label_subset(image_ids: Sequence[int], percent: float, seed: int) -> np.ndarray:
    """Row indices (sorted) of the labelled subset: round(percent% of N) images, at least 1.

    image_ids: (N,) ids of the train split's rows. The choice depends on the set of ids,
    percent and seed only (not on the row order)."""
    ids = np.asarray(image_ids, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("label_subset: image ids of the train split are not unique")
    k = max(1, int(round(len(ids) * percent / 100.0)))
    by_id = np.argsort(ids, kind="stable")  # rows in id order
    chosen = by_id[np.random.default_rng(seed).permutation(len(ids))[:k]]
    return np.sort(chosen)


def _step_lr(base: float, epoch: int, milestones: Sequence[int], gamma: float) -> float:
    return base * gamma ** sum(epoch >= m for m in milestones)


def semisup_finetune(backbone: nn.Module, train_set: ShardImages, test_set: ShardImages, settings: SemisupSettings,
                     *, device: str | torch.device = "cpu", loader_workers: int = 0) -> ProbeResult:
    """Fine-tune `backbone` (changed in place) and a new classifier on `train_set` (already
    the labelled subset, train transform); test on `test_set` (eval transform) every epoch.

    Returns a ProbeResult (mode "semisup") with final and best-over-epochs mAP.
    """
    check_classes(train_set, test_set)
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    backbone.to(device)
    for p in backbone.parameters():
        p.requires_grad_(True)
    clf = make_classifier(backbone.num_features, train_set.num_classes,
                          torch.Generator().manual_seed(settings.seed)).to(device)
    model = nn.Sequential(backbone, clf)
    groups = [{"params": list(backbone.parameters()), "lr": settings.lr_backbone, "base": settings.lr_backbone},
              {"params": list(clf.parameters()), "lr": settings.lr_classifier, "base": settings.lr_classifier}]
    opt = torch.optim.SGD(groups, lr=settings.lr_classifier, momentum=settings.momentum,
                          weight_decay=settings.weight_decay)
    params = [p for g in groups for p in g["params"]]
    return _fit(model, backbone, clf, opt, params, train_set, test_set, settings, device, loader_workers)


def _fit(model: nn.Module, backbone: nn.Module, clf: nn.Module, opt: torch.optim.Optimizer, params: list,
         train_set: ShardImages, test_set: ShardImages, settings: SemisupSettings, device: torch.device,
         loader_workers: int) -> ProbeResult:
    """Epoch loop: step-decayed lrs, train on train_set, mAP of test_set after every epoch."""
    t0 = time.perf_counter()
    history: list[dict[str, float]] = []
    maps = EpochMaps(train_set.class_names)
    dtype = autocast_dtype(settings.precision, device)
    scaler = grad_scaler(dtype, device)
    for epoch in range(settings.epochs):
        for g in opt.param_groups:
            g["lr"] = _step_lr(g["base"], epoch, settings.milestones, settings.gamma)
        model.train()
        loss_sum, n = 0.0, 0
        order = train_set.block_order(settings.seed, epoch)
        loader = make_loader(train_set, settings.batch_size, order=order, num_workers=loader_workers)
        # a progress bar over the epoch's batches on a terminal only
        for images, labels, _ in bar(loader, desc=f"semisup epoch {epoch + 1}/{settings.epochs}", unit="batch"):
            with autocast(dtype, device):
                logits = model(images.to(device, non_blocking=True))  # (B, C)
            loss = masked_bce(logits.float(), labels.to(device))
            sgd_step(opt, params, loss, settings.grad_clip, f"semisup epoch {epoch}", scaler)
            loss_sum += float(loss.detach())
            n += 1
        model.eval()
        feats, targets, _ = extract_features(backbone, test_set, settings.batch_size, device,
                                             num_workers=loader_workers, precision=settings.precision)
        m = maps.add(epoch, classifier_scores(clf, feats), targets)
        history.append({"epoch": epoch, "train_loss": loss_sum / max(n, 1), "test_map": m,
                        "lr_backbone": opt.param_groups[0]["lr"], "lr_classifier": opt.param_groups[1]["lr"]})
        log.info("semisup %g%% epoch %d/%d loss %.4f test mAP %.2f", settings.percent, epoch + 1, settings.epochs,
                 history[-1]["train_loss"], 100 * m)
    return maps.result(settings.epochs - 1, history, len(train_set), time.perf_counter() - t0, mode="semisup",
                       extra={"percent": settings.percent})


def run_semisup(checkpoint: str, percent: float, data_uri: str | None, config, *, dataset: str | None = None,
                epochs: int = 20, batch_size: int = 32, lr_backbone: float = 0.001, lr_classifier: float = 0.1,
                milestones: Sequence[int] = (12, 16), gamma: float = 0.2, seed: int = 0,
                allow_overlap: bool | None = None, parent_run_id: str | None = None, device: str | None = None,
                track: bool = True, loader_workers: int | None = None) -> dict[str, Any]:
    """`gaelle semisup`: fine-tune a checkpoint's backbone on percent% of the train labels.

    Args:
        checkpoint: as for load_backbone ("random", checkpoint folder, .pth).
        percent: 1 or 10 for the protocol (any value in (0, 100] is accepted, with a warning).
        data_uri / dataset: evaluation shards and dataset name (None = config eval.data /
            eval.dataset); splits, image sizes, momentum and weight decay from config.eval.
        epochs, batch_size, lr_backbone, lr_classifier, milestones, gamma: the protocol's
            20, 32, 0.001, 0.1, (12, 16), 0.2 by default.
        seed: fixes the label subset (and the run's randomness).
        allow_overlap, parent_run_id, device, track, loader_workers: as for run_linear_eval.

    Returns: run_linear_eval's dict plus "percent", "subset_size" and "subset_ids_sha1".
    """
    ev = config.eval
    checkpoint = os.fspath(checkpoint)
    dataset = dataset or ev.dataset
    data_uri = data_uri or ev.data
    if not data_uri:
        raise ValueError("semisup: no evaluation shards: pass the data URI or set eval.data")
    data_uri = storage.normalise(data_uri)  # the workers run elsewhere: absolute, on the driver
    if track:  # fail before the fine-tuning, not after
        from gaelle_ray import tracking

        tracking.check_reachable(tracking.resolve_tracking_uri(config))
    if percent not in PERCENTS:
        log.warning("semisup: the protocol uses 1%% or 10%% of the labels; running with %g%%", percent)
    allow = ev.allow_overlap if allow_overlap is None else allow_overlap
    settings = SemisupSettings(percent=percent, epochs=epochs, batch_size=batch_size, lr_backbone=lr_backbone,
                               lr_classifier=lr_classifier, milestones=tuple(milestones), gamma=gamma,
                               momentum=ev.momentum, weight_decay=ev.weight_decay, image_size=ev.image_size,
                               resize_size=ev.resize_size, seed=seed, precision=ev.precision)
    if checkpoint == "random":
        torch.manual_seed(config.train.seed)
    backbone, info = load_backbone_info(checkpoint, config.model.arch if checkpoint == "random" else None)
    guard = leakage_guard(checkpoint, data_uri, ev.test_split, allow)
    parent = parent_run_id or pretraining_run_id_of(checkpoint)
    full = ShardImages(data_uri, ev.train_split, EvalTransform(True, ev.image_size, ev.resize_size))
    rows = label_subset(full.image_ids, percent, seed)
    train_set = full.select(rows)
    test_set = ShardImages(data_uri, ev.test_split, EvalTransform(False, ev.image_size, ev.resize_size))
    subset_sha = hashlib.sha1(np.sort(train_set.image_ids).tobytes()).hexdigest()
    log.info("semisup: %d of %d train images labelled (%g%%, seed %d, ids sha1 %s)", len(rows), len(full), percent,
             seed, subset_sha[:12])
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaders = default_loader_workers(dev) if loader_workers is None else loader_workers
    result = semisup_finetune(backbone, train_set, test_set, settings, device=dev, loader_workers=loaders)
    out = result.to_dict()
    out.update(checkpoint=str(checkpoint), checkpoint_kind=info["kind"], arch=info["arch"], dataset=dataset,
               data=data_uri, leakage_check=guard["leakage_check"], leakage_overlap=guard.get("leakage_overlap"),
               subset_size=len(rows), subset_ids_sha1=subset_sha, run_id=None)
    log.info("semisup %g%% of %s on %s: final mAP %.2f, best mAP over epochs %.2f (epoch %d)", percent, checkpoint,
             dataset, 100 * result.map_final, 100 * result.map_best, result.best_epoch + 1)
    if track:
        params = {**{f"semisup.{k}": v for k, v in vars(settings).items()}, "checkpoint": checkpoint,
                  "checkpoint_kind": info["kind"], "arch": info["arch"], "dataset": dataset, "data": data_uri,
                  "train_split": ev.train_split, "test_split": ev.test_split, "subset_size": len(rows),
                  "subset_ids_sha1": subset_sha}
        tags = {"mode": "semisup", "checkpoint": checkpoint, **guard}
        name = eval_run_name(f"semisup {percent:g}% {dataset}", checkpoint, info, config, parent)
        out["run_id"] = log_eval_run(config, result, job="semisup", run_name=name,
                                     params=params, tags=tags, parent_run_id=parent)
    return out
