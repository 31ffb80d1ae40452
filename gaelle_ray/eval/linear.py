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

The classifier, loss, schedule and training loop are the probe core (gaelle_ray.eval.probe);
the distributed full protocol (several Ray Train workers) is in gaelle_ray.eval.distributed.
`run_linear_eval` is the entry point of `gaelle linear-eval`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gaelle_ray import storage
from gaelle_ray.eval.checkpoints import load_backbone_info, pretraining_run_id_of
from gaelle_ray.eval.features import (
    EvalTransform, ShardImages, default_cache_dir, default_loader_workers, extract_features, make_loader,
)
from gaelle_ray.eval.leakage import leakage_guard
from gaelle_ray.eval.probe import (
    ProbeResult, ProbeSettings, check_classes, classifier_scores, epoch_steps, fit_classifier, freeze,
    make_classifier, probe_datasets,
)
from gaelle_ray.eval.report import eval_run_name, log_eval_run, log_on_pretraining_run
from gaelle_ray.precision import autocast, autocast_dtype

log = logging.getLogger(__name__)

__all__ = ["PROTOCOL", "linear_probe", "fast_linear_probe", "run_linear_eval"]

# The paper's settings per dataset (method.md 7); the config's eval.* values are used, and
# a mismatch with these is logged.
PROTOCOL = {"coco": {"batch_size": 128, "lr": 0.1}, "voc": {"batch_size": 32, "lr": 0.03}}


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
    check_classes(train_set, test_set)
    device = torch.device(device)
    torch.manual_seed(settings.seed)
    backbone = freeze(backbone, device)
    gen = torch.Generator().manual_seed(settings.seed)
    clf = make_classifier(backbone.num_features, train_set.num_classes, gen).to(device)
    test_feats, test_labels, _ = extract_features(backbone, test_set, settings.batch_size, device,
                                                  cache_dir=cache_dir, num_workers=loader_workers,
                                                  precision=settings.precision)
    dtype = autocast_dtype(settings.precision, device)
    steps = epoch_steps(len(train_set), settings.batch_size)

    def batches(epoch: int):
        order = train_set.block_order(settings.seed, epoch)
        for images, labels, _ in make_loader(train_set, settings.batch_size, order=order, num_workers=loader_workers):
            with torch.no_grad(), autocast(dtype, device):
                feats = backbone(images.to(device, non_blocking=True)).float()  # (B, F)
            yield feats, labels.to(device)

    result = fit_classifier(clf, clf, batches, steps, lambda: (classifier_scores(clf, test_feats), test_labels),
                            settings, train_set.class_names, name="linear-probe", num_train=len(train_set))
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
    check_classes(train_set, test_set)
    device = torch.device(device)
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    backbone = freeze(backbone, device)
    centre = EvalTransform(False, settings.image_size, settings.resize_size)
    train_feats, train_labels, _ = extract_features(backbone, train_set.with_transform(centre), settings.batch_size,
                                                    device, cache_dir=cache_dir, num_workers=loader_workers,
                                                    precision=settings.precision)
    test_feats, test_labels, _ = extract_features(backbone, test_set.with_transform(centre), settings.batch_size,
                                                  device, cache_dir=cache_dir, num_workers=loader_workers,
                                                  precision=settings.precision)
    return fit_linear_on_features(train_feats, train_labels, test_feats, test_labels, settings,
                                  train_set.class_names, device=device)


def fit_linear_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                           test_labels: torch.Tensor, settings: ProbeSettings, class_names: list[str], *,
                           device: str | torch.device = "cpu", name: str = "fast-linear-probe",
                           log_epochs: bool = True) -> ProbeResult:
    """The fast probe's classifier fit on features already computed.

    train_feats: (N, F), train_labels: (N, C) uint8, test_feats: (Q, F), test_labels:
    (Q, C). The protocol's classifier, loss, optimiser, schedule and batch size; the
    shuffling of each epoch is seeded by settings.seed. Returns the ProbeResult (mode "fast").
    """
    device = torch.device(device)
    gen = torch.Generator().manual_seed(settings.seed)
    clf = make_classifier(train_feats.shape[1], len(class_names), gen).to(device)
    n, b = len(train_feats), settings.batch_size
    train_feats, train_labels = train_feats.to(device), train_labels.to(device)

    def batches(epoch: int):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 100003 + epoch)).to(device)
        for i in range(0, n, b):
            idx = perm[i:i + b]
            yield train_feats[idx], train_labels[idx]

    result = fit_classifier(clf, clf, batches, epoch_steps(n, b),
                            lambda: (classifier_scores(clf, test_feats), test_labels),
                            settings, class_names, name=name, num_train=n, log_epochs=log_epochs)
    result.mode = "fast"
    return result


# ----------------------------------------------------------------------------- entry point


def _warn_protocol(dataset: str, settings: ProbeSettings) -> None:
    want = PROTOCOL.get(dataset)
    if want and (settings.batch_size, settings.lr) != (want["batch_size"], want["lr"]):
        log.warning("%s linear probe: the protocol uses batch %d and lr %g; this run uses batch %d and lr %g "
                    "(set eval.batch_size / eval.lr to reproduce the paper)", dataset, want["batch_size"],
                    want["lr"], settings.batch_size, settings.lr)


def _storage_path(config) -> str:
    """Ray Train storage for distributed probes: ray.storage_path, else train.run_dir
    (absolute when local)."""
    return storage.normalise(config.ray.storage_path or config.train.run_dir)


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
    data_uri = storage.normalise(data_uri)  # the workers run elsewhere: absolute, on the driver
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
        name = eval_run_name(f"linear-eval{' fast' if fast else ''} {dataset}", checkpoint, info, config, parent)
        out["run_id"] = log_eval_run(config, result, job="linear_eval", run_name=name, params=params, tags=tags,
                                     parent_run_id=parent)
        if parent and info["kind"] != "random":  # a random baseline is not the pretraining run's result
            try:
                log_on_pretraining_run(config, parent, result, dataset, info.get("epoch"))
            except Exception as exc:  # the evaluation's own run is logged: keep it, say what failed
                log.warning("could not log the mAP on the pretraining run %s (%s); it is on run %s", parent, exc,
                            out["run_id"])
    return out
