"""Online evaluation during pretraining: a multi-label probe that the training workers run
on the backbone they are training, every `eval.online_every_epochs` epochs and once before
the first step (the random-initialisation baseline of the same run).

- Data: a labelled memory bank (the first `eval.online_bank_images` images of the training
  split, `eval.online_bank_split`) and queries from a held-out split
  (`eval.online_query_split`) that is not in the pretraining data (the driver runs the
  leakage guard on it before training starts).
- Features: the backbone's pooled features of centre crops (eval.image_size /
  eval.resize_size), in eval mode and without gradient. Worker r of W extracts rows
  r, r + W, ... of the bank and of the queries; rank 0 gathers them once. Each worker
  decodes its images once and keeps them in memory (up to eval.online_cache_mb).
- Scores: a weighted k-NN multi-label classifier (`knn_multilabel`): cosine similarity,
  the k most similar bank images, each weighted exp(sim / T), each class scored by the
  weighted vote of the neighbours' multi-hot labels. Its mAP over the queries is
  `online_map`. With `eval.online_linear`, the fast linear probe is also fitted on the
  same features (bank = train, queries = test): `online_linear_map`.

No second Ray job and no second copy of the model: the probe runs inside the training
workers on `model.backbone`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gaelle_ray.eval.features import EvalTransform, ShardImages, make_loader
from gaelle_ray.eval.metrics import mean_average_precision
from gaelle_ray.eval.probe import ProbeSettings
from gaelle_ray.precision import autocast, autocast_dtype

log = logging.getLogger(__name__)

BANK, QUERY = 0, 1


@dataclass(frozen=True)
class OnlineSettings:
    """What the online probe reads and how it scores (from the config's eval section)."""

    every_epochs: int
    data: str
    bank_split: str
    bank_images: int
    query_split: str
    query_images: int
    k: int
    temperature: float
    image_size: int
    resize_size: int
    batch_size: int
    linear: bool
    cache_mb: int
    probe: ProbeSettings  # the fast linear probe's settings (eval.*), with eval.online_linear

    @classmethod
    def from_config(cls, config) -> "OnlineSettings | None":
        """The settings of a validated Config, or None when online evaluation is off."""
        ev = config.eval
        if ev.online_every_epochs <= 0:
            return None
        return cls(every_epochs=ev.online_every_epochs, data=ev.online_data or ev.data or config.data.shards,
                   bank_split=ev.online_bank_split or ev.train_split, bank_images=ev.online_bank_images,
                   query_split=ev.online_query_split or ev.test_split, query_images=ev.online_query_images,
                   k=ev.online_knn_k, temperature=ev.online_knn_temperature, image_size=ev.image_size,
                   resize_size=ev.resize_size, batch_size=ev.batch_size, linear=ev.online_linear,
                   cache_mb=ev.online_cache_mb, probe=ProbeSettings.from_config(config))

    def due(self, epoch: int, total_epochs: int) -> bool:
        """Whether the probe runs at the end of `epoch` (0-based): every N epochs and after the last."""
        return (epoch + 1) % self.every_epochs == 0 or epoch + 1 == total_epochs


def knn_multilabel(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor, k: int,
                   temperature: float, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-NN multi-label scores.

    bank_feats: (M, F); bank_labels: (M, C) multi-hot (1 = positive; 0 and 255, "ignore",
    count as not positive); query_feats: (Q, F). Cosine
    similarity of each query to every bank row, the k most similar rows (k capped at M),
    weights w = exp(sim / temperature); class c scores sum_j w_j y_jc / sum_j w_j.
    Returns (Q, C) float32 in [0, 1]. Queries are scored `chunk` at a time.
    """
    if bank_feats.shape[0] == 0:
        raise ValueError("knn_multilabel: the memory bank is empty")
    bank = F.normalize(bank_feats.float(), dim=1)  # (M, F)
    labels = (bank_labels == 1).float()  # (M, C)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start:start + chunk].float(), dim=1)  # (q, F)
        sims, idx = (q @ bank.t()).topk(k, dim=1)  # (q, k), (q, k)
        # exp((sim - 1) / T): the same ratios as exp(sim / T), no overflow for a small T
        w = torch.exp((sims - 1.0) / temperature)  # (q, k)
        votes = torch.einsum("qk,qkc->qc", w, labels[idx])  # (q, C)
        out.append(votes / w.sum(dim=1, keepdim=True))
    return torch.cat(out) if out else torch.zeros(0, labels.shape[1])


class OnlineProbe:
    """One training worker's part of the online evaluation.

    settings: OnlineSettings; rank / world: this worker's place among the training workers.
    The worker's rows of the bank and of the queries are decoded once (on the first
    `evaluate`) and kept as float16 tensors when they fit in settings.cache_mb.
    """

    def __init__(self, settings: OnlineSettings, rank: int = 0, world: int = 1):
        self.settings = settings
        self.rank, self.world = rank, world
        transform = EvalTransform(False, settings.image_size, settings.resize_size)
        parts = []
        for which, split, limit in ((BANK, settings.bank_split, settings.bank_images),
                                    (QUERY, settings.query_split, settings.query_images)):
            full = ShardImages(settings.data, split, transform)
            n = len(full) if limit <= 0 else min(limit, len(full))
            if n == 0:
                raise ValueError(f"online evaluation: split {split!r} of {settings.data} has no images")
            parts.append(full.select(np.arange(n)))
        self.bank, self.query = parts
        self.class_names = self.bank.class_names
        if self.query.class_names != self.class_names:
            raise ValueError(f"online evaluation: splits {settings.bank_split!r} and {settings.query_split!r} of "
                             f"{settings.data} have different classes")
        # this worker's rows of each set
        self.mine = [ds.select(np.arange(rank, len(ds), world)) for ds in (self.bank, self.query)]
        self._images: list[torch.Tensor] | None = None  # decoded, per set: (n, 3, S, S) float16

    @property
    def sizes(self) -> tuple[int, int]:
        """(bank images, query images) over all workers."""
        return len(self.bank), len(self.query)

    def _decoded(self) -> list[torch.Tensor] | None:
        if self._images is None:
            s = self.settings
            n = sum(len(ds) for ds in self.mine)
            if n * 3 * s.image_size ** 2 * 2 > s.cache_mb * 2 ** 20:
                return None
            images = []
            for ds in self.mine:
                batches = [x.to(torch.float16) for x, _, _ in make_loader(ds, s.batch_size)]
                images.append(torch.cat(batches) if batches else torch.zeros(0, 3, s.image_size, s.image_size,
                                                                             dtype=torch.float16))
            self._images = images
        return self._images

    @torch.no_grad()
    def _features(self, backbone: nn.Module, device: torch.device) -> list[torch.Tensor]:
        """Pooled features (n_i, F) of this worker's rows of each set, float32 on the CPU."""
        s = self.settings
        dtype = autocast_dtype(s.probe.precision, device)
        decoded = self._decoded()
        feats = []
        for i, ds in enumerate(self.mine):
            out = []
            if decoded is not None:
                chunks = (decoded[i][j:j + s.batch_size] for j in range(0, len(decoded[i]), s.batch_size))
            else:
                chunks = (x for x, _, _ in make_loader(ds, s.batch_size))
            for x in chunks:
                with autocast(dtype, device):
                    out.append(backbone(x.to(device, dtype=torch.float32, non_blocking=True)).float().cpu())  # (b, F)
            feats.append(torch.cat(out) if out else torch.zeros(0, backbone.num_features))
        return feats

    def evaluate(self, backbone: nn.Module, device: torch.device, group=None) -> dict[str, float]:
        """Score `backbone` (called in eval mode, its mode restored). Every worker of `group`
        must call this (a collective). Returns the same {"online_map", and
        "online_linear_map" with eval.online_linear} on every worker. The random streams
        are left as they were: a run trains the same with or without online evaluation."""
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            return self._evaluate(backbone, device, group)

    def _evaluate(self, backbone: nn.Module, device: torch.device, group) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        try:
            feats = self._features(backbone, device)
        finally:
            backbone.train(was_training)
        mine = (feats, [torch.from_numpy(ds.labels) for ds in self.mine], [ds.rows for ds in self.mine])
        if group is None or dist.get_world_size(group) == 1:
            parts = [mine]
        else:
            parts = [None] * dist.get_world_size(group) if self.rank == 0 else None
            dist.gather_object(mine, parts, dst=dist.get_global_rank(group, 0), group=group)
        result = self._score(parts) if self.rank == 0 else None
        if group is not None and dist.get_world_size(group) > 1:
            box = [result]
            dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
            result = box[0]
        return result

    def _score(self, parts) -> dict[str, float]:
        """Rank 0: the gathered features in dataset order, then the k-NN (and linear) mAP."""
        sets = []
        for i in (BANK, QUERY):
            feats = torch.cat([p[0][i] for p in parts])
            labels = torch.cat([p[1][i] for p in parts])
            rows = np.concatenate([np.asarray(p[2][i]) for p in parts])
            order = torch.from_numpy(np.argsort(rows, kind="stable"))
            sets.append((feats[order], labels[order]))
        (bank_f, bank_y), (query_f, query_y) = sets
        s = self.settings
        scores = knn_multilabel(bank_f, bank_y, query_f, s.k, s.temperature)  # (Q, C)
        result = {"online_map": _finite_map(scores, query_y, self.class_names)}
        if s.linear:
            result["online_linear_map"] = self._linear_map(bank_f, bank_y, query_f, query_y)
        return result

    def _linear_map(self, bank_f, bank_y, query_f, query_y) -> float:
        from gaelle_ray.eval.linear import fit_linear_on_features

        probe = dataclasses.replace(self.settings.probe, eval_every=self.settings.probe.epochs)  # the last epoch only
        result = fit_linear_on_features(bank_f, bank_y, query_f, query_y, probe, self.class_names,
                                        name="online-linear-probe", log_epochs=False)
        return float(result.map_final)


def _finite_map(scores: torch.Tensor, targets: torch.Tensor, class_names) -> float:
    value = float(mean_average_precision(scores.numpy(), targets.numpy(), class_names)[0])
    return value if math.isfinite(value) else 0.0
