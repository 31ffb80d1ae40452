"""The full linear-probe protocol on Ray Train workers (DDP over the linear layer).

Every worker holds the frozen backbone (weights shipped once through the object store)
and a copy of the classifier wrapped in DistributedDataParallel (DDP broadcasts rank 0's
initial weights and averages gradients):

- train: every epoch the shuffled order of the train split (`ShardImages.block_order`,
  the same on every worker) is padded by repeating its first rows to a multiple of the
  world size W and cut into W contiguous parts; worker r trains on part r with batches of
  batch_size / W, so a step sees batch_size images in all. The loss on each worker is
  summed over classes / its batch size; DDP's gradient mean makes it the protocol's loss
  over the global batch. Every worker runs the same number of steps.
- test: worker r scores test rows r, r + W, ...; the (scores, targets, ids) of all workers
  are gathered to rank 0, which computes mAP ONCE over all of them (never an average over
  workers or batches) and checks that every test image was scored exactly once.

Nothing else here differs from gaelle_ray.eval.linear.linear_probe: same classifier init,
loss, optimiser, cosine schedule, clipping and transforms (the probe core,
gaelle_ray.eval.probe, is shared). Ray is started and the TorchTrainer assembled by
gaelle_ray.ray_setup, as for pretraining.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gaelle_ray import ray_setup
from gaelle_ray.eval.features import extract_features, make_loader
from gaelle_ray.eval.probe import (
    ProbeResult, ProbeSettings, classifier_scores, epoch_steps, fit_classifier, freeze, make_classifier,
    probe_datasets,
)
from gaelle_ray.model.backbone import build_backbone
from gaelle_ray.model.weights import load_state_strict
from gaelle_ray.precision import autocast, autocast_dtype

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


def worker_rows(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Worker `rank`'s part of an epoch order (N,): padded (repeating the first rows) to a
    multiple of `world`, then cut into `world` contiguous parts of ceil(N / world)."""
    n = len(order)
    per = math.ceil(n / world)
    padded = np.concatenate([order, order[: per * world - n]]) if per * world > n else order
    return padded[rank * per:(rank + 1) * per]


def _gathered_scores(clf: nn.Module, feats: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
                     rank: int, world: int, expected: int):
    """(scores (N, C), targets (N, C)) of the whole test set on rank 0, None on the others."""
    mine = (classifier_scores(clf, feats).numpy(), labels.numpy(), ids.numpy())
    parts = [None] * world if rank == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if rank != 0:
        return None
    scores = np.concatenate([p[0] for p in parts])
    targets = np.concatenate([p[1] for p in parts])
    all_ids = np.concatenate([p[2] for p in parts])
    if len(all_ids) != expected or len(np.unique(all_ids)) != expected:
        raise RuntimeError(f"gathered {len(all_ids)} test scores ({len(np.unique(all_ids))} distinct images), "
                           f"expected each of the {expected} test images once")
    order = np.argsort(all_ids, kind="stable")  # a fixed order, whatever the world size
    return torch.from_numpy(scores[order]), torch.from_numpy(targets[order])


def _result_to_plain(result: ProbeResult) -> dict[str, Any]:
    d = dataclasses.asdict(result)
    for key in ("ap_final", "ap_best", "positives"):
        d[key] = np.asarray(d[key]).tolist()
    return d


def _result_from_plain(d: dict[str, Any]) -> ProbeResult:
    d = dict(d)
    d["ap_final"] = np.asarray(d["ap_final"], dtype=np.float64)
    d["ap_best"] = np.asarray(d["ap_best"], dtype=np.float64)
    d["positives"] = np.asarray(d["positives"], dtype=np.int64)
    return ProbeResult(**d)


def linear_probe_worker(cfg: dict) -> None:
    """Ray Train entry point. cfg: settings (dict), state (ObjectRef of the backbone state
    dict), arch, data_uri, train_split, test_split, use_gpu, cpus_per_worker."""
    ray_setup.quiet_train_worker_console()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = cfg["use_gpu"] and torch.cuda.is_available()
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg["cpus_per_worker"])))
    settings = ProbeSettings(**cfg["settings"])
    torch.manual_seed(settings.seed * 1000 + rank)  # different crops on every worker

    backbone = build_backbone(cfg["arch"])
    state = cfg["state"]
    load_state_strict(backbone, ray.get(state) if isinstance(state, ray.ObjectRef) else state, "backbone (driver)")
    backbone = freeze(backbone, device)
    train_set, test_set = probe_datasets(cfg["data_uri"], cfg["train_split"], cfg["test_split"], settings)

    my_test = test_set.select(np.arange(rank, len(test_set), world))
    loaders = max(0, int(cfg["cpus_per_worker"]) - 1)  # JPEG decoding processes of this worker
    test_feats, test_labels, test_ids = extract_features(backbone, my_test, settings.batch_size, device,
                                                         num_workers=loaders, precision=settings.precision)
    dtype = autocast_dtype(settings.precision, device)

    clf = make_classifier(backbone.num_features, train_set.num_classes,
                          torch.Generator().manual_seed(settings.seed)).to(device)
    ddp = DistributedDataParallel(clf, device_ids=[device.index] if device.type == "cuda" else None)
    local_batch = settings.batch_size // world
    per_worker = math.ceil(len(train_set) / world)
    steps = epoch_steps(per_worker, local_batch)

    def batches(epoch: int):
        rows = worker_rows(train_set.block_order(settings.seed, epoch), rank, world)
        for images, labels, _ in make_loader(train_set, local_batch, order=rows, num_workers=loaders):
            with torch.no_grad(), autocast(dtype, device):
                feats = backbone(images.to(device, non_blocking=True)).float()  # (b, F)
            yield feats, labels.to(device)

    result = fit_classifier(
        clf, ddp, batches, steps,
        lambda: _gathered_scores(clf, test_feats, test_labels, test_ids, rank, world, len(test_set)),
        settings, train_set.class_names, is_main=rank == 0, name=f"linear-probe[{rank}/{world}]",
        num_train=len(train_set))
    if result is not None:
        result.mode = "full"
        result.extra = {"num_workers": world, "batch_per_worker": local_batch}
    # Ray Train (v2) keeps only metrics that come with a checkpoint: rank 0 reports its
    # result with a one-file checkpoint (result.json), the other ranks report nothing new.
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if result is not None:
            plain = _result_to_plain(result)
            (Path(tmp) / RESULT_FILE).write_text(json.dumps(plain))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"done": True}, checkpoint=checkpoint)


def linear_probe_distributed(backbone: nn.Module, arch: str, data_uri: str, train_split: str, test_split: str,
                             settings: ProbeSettings, *, num_workers: int = 2, use_gpu: bool = False,
                             address: str = "", cpus_per_worker: float = 1.0,
                             storage_path: str | None = None) -> ProbeResult:
    """The full protocol on `num_workers` Ray Train workers; returns rank 0's ProbeResult.

    backbone: the loaded backbone (its weights go to the workers via the object store);
    arch: its torchvision name. settings.batch_size is the global batch and must be
    divisible by num_workers. Connects to Ray (`address`, "" = a new local instance) when
    not connected yet. storage_path: Ray Train's run storage, where rank 0's result.json
    checkpoint goes (None = a local temporary folder, fine on one machine; a cluster needs
    shared storage, e.g. the run directory's URI).
    """
    if num_workers < 1 or settings.batch_size % num_workers:
        raise ValueError(f"eval.batch_size = {settings.batch_size} must be divisible by the number of "
                         f"workers ({num_workers})")
    ray_setup.init_ray(address)
    state_ref = ray.put({k: v.detach().cpu() for k, v in backbone.state_dict().items()})
    cfg = {"settings": dataclasses.asdict(settings), "state": state_ref, "arch": arch, "data_uri": data_uri,
           "train_split": train_split, "test_split": test_split, "use_gpu": use_gpu,
           "cpus_per_worker": cpus_per_worker}
    with tempfile.TemporaryDirectory(prefix="gaelle-linear-") as tmp:
        trainer = ray_setup.build_torch_trainer(
            linear_probe_worker, cfg, name=f"linear_eval_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}",
            storage_path=storage_path or tmp, num_workers=num_workers, use_gpu=use_gpu,
            cpus_per_worker=cpus_per_worker)
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"distributed linear probe failed: {result.error}") from result.error
        if result.checkpoint is None:
            raise RuntimeError("distributed linear probe: rank 0 reported no result")
        with result.checkpoint.as_directory() as folder:
            plain = json.loads((Path(folder) / RESULT_FILE).read_text())
    return _result_from_plain(plain)
