"""Evaluation images from Parquet shards, and frozen-backbone features (method.md section 7).

`ShardImages` is a map-style torch Dataset over one split of a `gaelle prepare` output
(local path or pyarrow URI). Image ids and labels are read up front (small columns); JPEG
bytes are read lazily, one Parquet row group at a time, with a small LRU of row groups
per process. `block_order` gives a shuffled order that visits a few row groups at a time,
so a shuffled epoch over COCO reads each row group once instead of once per image.

Transforms (`EvalTransform`):
    train: RandomResizedCrop(image_size) + RandomHorizontalFlip
    eval:  Resize(resize_size) + CenterCrop(image_size)
    both:  ToTensor + Normalize(MEAN, STD) of gaelle_ray.config

An item is (image (3, S, S) float32, labels (C,) uint8 with 255 = ignore, image_id int).

`extract_features` runs the frozen backbone (eval mode, no gradient) over a dataset and
returns (features (N, F) float32, labels (N, C) uint8, ids (N,) int64). With `cache_dir`
the result is saved there, keyed by a digest of the backbone's weights, the shards (their
sha256 from the manifest), the split, the selected rows and the transform, so a second
call with the same inputs reads it back instead of running the backbone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gaelle_ray import storage
from gaelle_ray.config import MEAN, STD
from gaelle_ray.data.shards import list_shards, read_manifest
from gaelle_ray.precision import autocast, autocast_dtype
from gaelle_ray.progress import bar

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# ----------------------------------------------------------------------------- transforms


@dataclass(frozen=True)
class EvalTransform:
    """The image transform of the evaluation protocol.

    train=True: RandomResizedCrop(image_size) + flip; train=False: Resize(resize_size) +
    CenterCrop(image_size). Both end with ToTensor + Normalize(mean, std).
    """

    train: bool
    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.resize_size < self.image_size:
            raise ValueError(f"EvalTransform: need 0 < image_size <= resize_size, got image_size="
                             f"{self.image_size}, resize_size={self.resize_size}")

    def build(self):
        from torchvision import transforms as T

        if self.train:
            head = [T.RandomResizedCrop(self.image_size), T.RandomHorizontalFlip()]
        else:
            head = [T.Resize(self.resize_size), T.CenterCrop(self.image_size)]
        return T.Compose(head + [T.ToTensor(), T.Normalize(self.mean, self.std)])

    def key(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


# ----------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class _Shard:
    path: str  # full path or URI
    sha256: str
    group_rows: tuple[int, ...]  # rows per Parquet row group


class ShardImages(Dataset):
    """One split of a shard directory as (image, labels, image_id) items.

    uri: shard directory (local path or URI); split: e.g. "train", "val", "trainval",
    "test"; transform: an EvalTransform (None: items carry the raw JPEG bytes instead of an
    image tensor); rows: indices into the split to keep (None = all), in that order.
    cache_row_groups: row groups of JPEG bytes kept in memory per process.
    """

    def __init__(self, uri: str | os.PathLike, split: str, transform: EvalTransform | None,
                 rows: Sequence[int] | None = None, cache_row_groups: int = 8):
        self.uri = os.fspath(uri)
        self.split = split
        self.transform = transform
        self.cache_row_groups = max(1, cache_row_groups)
        manifest = read_manifest(self.uri)
        self.class_names: list[str] = list(manifest["class_names"])
        self.dataset_name: str = manifest.get("dataset", "")
        paths = list_shards(self.uri, split)  # ValueError naming the split when absent
        entries = [s for s in manifest["shards"] if s["split"] == split]
        shards, ids, labels = [], [], []
        for path, entry in zip(paths, entries):
            fs, local = storage.resolve(path)
            with fs.open_input_file(local) as f:
                pf = pq.ParquetFile(f)
                groups = tuple(pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups))
                table = pf.read(columns=["image_id", "labels"])
            shards.append(_Shard(path, entry.get("sha256", ""), groups))
            ids.append(np.asarray(table.column("image_id").to_numpy(), dtype=np.int64))
            labels.extend(table.column("labels").to_pylist())
        self._shards = shards
        # (shard, row group, row in group) of every row of the split, in shard order
        loc = [(s, g, r) for s, sh in enumerate(shards) for g, n in enumerate(sh.group_rows) for r in range(n)]
        self._loc_all = np.asarray(loc, dtype=np.int64).reshape(-1, 3)  # (N_split, 3)
        self._ids_all = np.concatenate(ids) if ids else np.zeros(0, np.int64)  # (N_split,)
        c = len(self.class_names)
        bad = [i for i, lab in enumerate(labels) if len(lab) != c]
        if bad:
            raise ValueError(f"{self.uri} split {split!r}: image {int(self._ids_all[bad[0]])} has "
                             f"{len(labels[bad[0]])} labels, the manifest names {c} classes")
        self._labels_all = (np.asarray(labels, dtype=np.uint8).reshape(-1, c))  # (N_split, C)
        n_all = len(self._ids_all)
        if rows is None:
            self.rows = np.arange(n_all, dtype=np.int64)
        else:
            self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            if len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= n_all):
                raise ValueError(f"{self.uri} split {split!r}: row indices must be in [0, {n_all}), "
                                 f"got {int(self.rows.min())}..{int(self.rows.max())}")
        self._cache: OrderedDict[tuple[int, int], list] = OrderedDict()
        self._tf = transform.build() if transform is not None else None

    # -- views ------------------------------------------------------------------------

    def select(self, rows: Sequence[int], transform: EvalTransform | None | str = "same") -> "ShardImages":
        """A dataset over `rows` (indices into this dataset), sharing the metadata."""
        new = object.__new__(ShardImages)
        new.__dict__.update(self.__dict__)
        new.rows = self.rows[np.asarray(rows, dtype=np.int64).reshape(-1)]
        new._cache = OrderedDict()
        if transform != "same":
            new.transform = transform
            new._tf = transform.build() if transform is not None else None
        return new

    def with_transform(self, transform: EvalTransform | None) -> "ShardImages":
        return self.select(np.arange(len(self)), transform)

    @property
    def num_split_rows(self) -> int:
        return len(self._ids_all)

    @property
    def image_ids(self) -> np.ndarray:
        """(N,) int64 image ids of the selected rows."""
        return self._ids_all[self.rows]

    @property
    def labels(self) -> np.ndarray:
        """(N, C) uint8 labels of the selected rows (255 = ignore)."""
        return self._labels_all[self.rows]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the data of this dataset (for cache keys)."""
        rows = hashlib.sha1(self.rows.tobytes()).hexdigest()
        return {"uri": self.uri, "split": self.split, "shards": [s.sha256 or s.path for s in self._shards],
                "rows": rows, "n": len(self.rows)}

    # -- Dataset ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = OrderedDict()  # no JPEG bytes through pickling (DataLoader workers)
        return state

    def _row_group(self, shard: int, group: int) -> list:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        path = self._shards[shard].path
        fs, local = storage.resolve(path)
        with fs.open_input_file(local) as f:
            jpegs = pq.ParquetFile(f).read_row_group(group, columns=["jpeg"]).column("jpeg").to_pylist()
        self._cache[key] = jpegs
        while len(self._cache) > self.cache_row_groups:
            self._cache.popitem(last=False)
        return jpegs

    def jpeg(self, index: int) -> bytes:
        """JPEG bytes of item `index`."""
        shard, group, row = self._loc_all[self.rows[index]]
        return self._row_group(int(shard), int(group))[int(row)]

    def __getitem__(self, index: int):
        row = self.rows[index]
        data = self.jpeg(index)
        labels = torch.from_numpy(self._labels_all[row].copy())  # (C,) uint8
        image_id = int(self._ids_all[row])
        if self._tf is None:
            return data, labels, image_id
        try:
            with Image.open(io.BytesIO(data)) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{self._shards[self._loc_all[row][0]].path}: image {image_id} cannot be "
                             f"decoded: {exc}") from None
        return self._tf(image), labels, image_id

    # -- orders -----------------------------------------------------------------------

    def block_order(self, seed: int, epoch: int, window: int = 4) -> np.ndarray:
        """A shuffled permutation of range(len(self)) that visits `window` row groups at a time.

        Row groups are shuffled, taken `window` at a time, and the dataset rows inside
        each window are shuffled together. Deterministic in (seed, epoch).
        """
        rng = np.random.default_rng([seed, epoch])
        loc = self._loc_all[self.rows]  # (N, 3)
        group_key = loc[:, 0] * (1 << 32) + loc[:, 1]  # (N,) one key per (shard, row group)
        groups, inverse = np.unique(group_key, return_inverse=True)
        rank = np.empty(len(groups), np.int64)
        rank[rng.permutation(len(groups))] = np.arange(len(groups))
        block = rank[inverse] // max(1, window)  # (N,) window of each item
        noise = rng.random(len(self.rows))  # (N,) shuffle inside a window
        return np.lexsort((noise, block)).astype(np.int64)


# ----------------------------------------------------------------------------- features


def state_digest(module: nn.Module) -> str:
    """sha1 of a module's state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha1()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def feature_cache_key(backbone: nn.Module, dataset: ShardImages, precision: str = "fp32") -> str:
    """Digest of (backbone weights, shards + split + rows, transform, precision)."""
    key = {"version": CACHE_VERSION, "backbone": state_digest(backbone), "data": dataset.fingerprint(),
           "transform": dataset.transform.key() if dataset.transform else None}
    if precision != "fp32":  # fp32 keys as before, so existing caches stay valid
        key["precision"] = precision
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    """$GAELLE_CACHE/features, else ~/.cache/gaelle/features."""
    return Path(os.environ.get("GAELLE_CACHE", "~/.cache/gaelle")).expanduser() / "features"


def default_loader_workers(device: str | torch.device) -> int:
    """DataLoader processes for one-process runs: 0 on CPU (the model needs the cores),
    min(8, CPUs - 1) on a GPU (JPEG decoding would starve it)."""
    if torch.device(device).type == "cpu":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _collate(batch):
    images, labels, ids = zip(*batch)
    return torch.stack(images), torch.stack(labels), torch.tensor(ids, dtype=torch.int64)


def make_loader(dataset: Dataset, batch_size: int, *, order: Sequence[int] | None = None,
                num_workers: int = 0) -> DataLoader:
    """A DataLoader yielding (images (B, 3, S, S), labels (B, C) uint8, ids (B,) int64)
    in `order` (indices into dataset; None = dataset order)."""
    sampler = list(map(int, order)) if order is not None else None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False, drop_last=False,
                      num_workers=num_workers, collate_fn=_collate, persistent_workers=False)


@torch.no_grad()
def _run_backbone(backbone: nn.Module, dataset: ShardImages, batch_size: int, device: torch.device,
                  num_workers: int, precision: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtype = autocast_dtype(precision, device)
    was_training = backbone.training
    backbone.eval()
    feats, labels, ids = [], [], []
    progress = bar(total=len(dataset), desc=f"features {dataset.split}", unit="img")  # on a terminal only
    try:
        for images, lab, idx in make_loader(dataset, batch_size, num_workers=num_workers):
            with autocast(dtype, device):
                out = backbone(images.to(device, non_blocking=True))  # (B, F)
            feats.append(out.float().cpu())
            labels.append(lab)
            ids.append(idx)
            progress.update(len(idx))
    finally:
        progress.close()
        backbone.train(was_training)
    width = getattr(backbone, "num_features", 0)
    if not feats:
        return torch.zeros(0, width), torch.zeros(0, dataset.num_classes, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    return torch.cat(feats), torch.cat(labels), torch.cat(ids)


def extract_features(backbone: nn.Module, dataset: ShardImages, batch_size: int,
                     device: str | torch.device = "cpu", *, cache_dir: str | os.PathLike | None = None,
                     num_workers: int = 0, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled features of the frozen backbone over `dataset`, in dataset order.

    backbone: module mapping (B, 3, S, S) -> (B, F); run in eval mode without gradient (its
    train/eval mode is restored afterwards). dataset: a ShardImages, normally with the eval
    transform (centre crops). cache_dir: folder for the on-disk cache (None = no cache).
    precision: the forward's autocast (gaelle_ray.precision); the features are float32 either way.

    Returns (features (N, F) float32 on CPU, labels (N, C) uint8, ids (N,) int64).
    """
    device = torch.device(device)
    path = None
    if cache_dir is not None:
        key = feature_cache_key(backbone, dataset, precision)
        path = Path(cache_dir) / f"features-{dataset.split}-{key[:24]}.pt"
        if path.is_file():
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved["features"].shape[0] == len(dataset) and torch.equal(
                        saved["ids"], torch.from_numpy(dataset.image_ids)):
                    log.info("feature cache hit: %s (%d x %d)", path, *saved["features"].shape)
                    return saved["features"], saved["labels"], saved["ids"]
                log.warning("feature cache %s does not match the dataset; recomputing", path)
            except Exception as exc:  # a damaged cache file is recomputed, never trusted
                log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
    t0 = time.perf_counter()
    feats, labels, ids = _run_backbone(backbone, dataset, batch_size, device, num_workers, precision)
    log.info("features of %d %s images in %.1fs", len(ids), dataset.split, time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"features": feats, "labels": labels, "ids": ids}, tmp)
        os.replace(tmp, path)
        log.info("feature cache written: %s", path)
    return feats, labels, ids
