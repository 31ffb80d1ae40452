"""`gaelle prepare {coco,voc,folder,toy}`: read a source of one kind and write it as shards.

:func:`prepare_from_source` picks the reader of :mod:`gaelle_ray.data.sources` for the kind
(or generates the toy set with :mod:`gaelle_ray.data.toy`) and hands the records to
:func:`gaelle_ray.data.shards.prepare_shards`, which knows nothing of where they came from.
On a terminal, progress bars follow the toy images rendered and the shards written
(:mod:`gaelle_ray.progress`).
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections import Counter
from typing import Any, Sequence

from gaelle_ray import storage
from gaelle_ray.data import sources, toy
from gaelle_ray.data.shards import PROGRESS_NAME, prepare_shards
from gaelle_ray.progress import bar, bars_wanted

__all__ = ["prepare_from_source", "prepare_toy"]


def prepare_toy(out_uri: str | os.PathLike, *, n_train: int = 2000, n_val: int = 500,
                image_size: int = 128, seed: int = 0, toy_dir: str | os.PathLike | None = None,
                dataset_name: str = "toy", shard_size: int = 1000, workers: int = 1,
                **prepare_kwargs: Any) -> dict[str, Any]:
    """Generate the toy COCO-format set (:func:`gaelle_ray.data.toy.make_toy`) and shard it.

    Args:
        out_uri: where the shards go (local path or URI).
        n_train, n_val, image_size, seed: passed to make_toy.
        toy_dir: where the JPEG/JSON toy set is written; None = a temporary directory that
            is removed afterwards.
        dataset_name, shard_size, workers, **prepare_kwargs: passed to prepare_shards.

    Returns:
        The manifest dict; manifest["source"] records the toy parameters.
    """
    if toy_dir is not None:
        return _prepare_toy_in(os.fspath(toy_dir), out_uri, n_train, n_val, image_size, seed,
                               dataset_name=dataset_name, shard_size=shard_size,
                               workers=workers, **prepare_kwargs)
    with tempfile.TemporaryDirectory(prefix="gaelle-toy-") as tmp:
        return _prepare_toy_in(tmp, out_uri, n_train, n_val, image_size, seed,
                               dataset_name=dataset_name, shard_size=shard_size,
                               workers=workers, **prepare_kwargs)


def _prepare_toy_in(toy_dir: str, out_uri, n_train: int, n_val: int, image_size: int, seed: int,
                    **prepare_kwargs: Any) -> dict[str, Any]:
    summary = toy.make_toy(toy_dir, n_train=n_train, n_val=n_val, image_size=image_size,
                           seed=seed, workers=prepare_kwargs.get("workers", 1))
    records, class_names = [], None
    for split, info in summary["splits"].items():
        recs, names, _ = sources.read_coco(info["ann_file"], info["image_dir"], split,
                                           strict=True)
        records += recs
        class_names = names
    source = {"kind": "toy", "n_train": n_train, "n_val": n_val, "image_size": image_size,
              "seed": seed}
    return _prepare_shards_with_bar(records, class_names, out_uri, source=source, **prepare_kwargs)


def _prepare_shards_with_bar(records: list[dict], class_names, out_uri, *, shard_size: int = 1000,
                             **kwargs: Any) -> dict[str, Any]:
    """prepare_shards, with a progress bar over the shards on a terminal.

    The bar follows the shards written so far as prepare_shards records them in its
    progress file (out_uri/_progress.json), read twice a second by a thread; shards kept
    from an earlier run count as done. Without a terminal: prepare_shards alone."""
    if not bars_wanted() or not records:
        return prepare_shards(records, class_names, out_uri, shard_size=shard_size, **kwargs)
    per_split = Counter(r.get("split") for r in records)
    total = sum(math.ceil(n / max(shard_size, 1)) for n in per_split.values())
    stop = threading.Event()
    with bar(total=total, desc="shards", unit="shard") as progress:
        def follow() -> None:
            while not stop.wait(0.5):
                try:
                    state = storage.read_json(os.fspath(out_uri), PROGRESS_NAME)
                except Exception:  # noqa: BLE001 - a bar that lags, never a failed prepare
                    continue
                done = min(len((state or {}).get("shards") or {}), total)
                if done > progress.n:
                    progress.update(done - progress.n)

        watcher = threading.Thread(target=follow, name="gaelle-shard-progress", daemon=True)
        watcher.start()
        try:
            manifest = prepare_shards(records, class_names, out_uri, shard_size=shard_size, **kwargs)
        finally:
            stop.set()
            watcher.join()
        progress.update(total - progress.n)
    return manifest


def _read_kind(kind: str, root: str | None, year: int | str, splits: Sequence[str] | None,
               strict: bool) -> tuple[list[dict], list[str], dict[str, Any]]:
    """Records of all requested splits of a coco / voc / folder source."""
    if root is None:
        raise ValueError(f"prepare {kind}: root is required")
    if kind == "folder":
        (split,) = splits or ("train",)
        records, names, stats = sources.read_folder(root, split=split)
        return records, names, {"kind": kind, "root": os.path.abspath(root), "stats": stats}
    default = ("train", "val") if kind == "coco" else ("trainval", "test")
    records, class_names, stats = [], None, {}
    for split in splits or default:
        if kind == "coco":
            ann_file, image_dir = sources.coco_paths(root, year, split)
            recs, names, st = sources.read_coco(ann_file, image_dir, split, strict=strict)
        else:
            recs, names, st = sources.read_voc(root, split)
        if class_names is not None and names != class_names:
            raise ValueError(f"prepare {kind}: split {split!r} has different classes")
        records, class_names, stats[split] = records + recs, names, st
    source = {"kind": kind, "root": os.path.abspath(root), "stats": stats}
    if kind == "coco":
        source["year"] = int(year)
    return records, class_names, source


def prepare_from_source(kind: str, out_uri: str | os.PathLike, *, root: str | None = None,
                        year: int | str = 2017, splits: Sequence[str] | None = None,
                        dataset_name: str | None = None, shard_size: int = 1000,
                        min_size: int = 0, strict: bool = False, jpeg_quality: int = 95,
                        workers: int = 1, n_train: int = 2000, n_val: int = 500,
                        image_size: int = 128, seed: int = 0,
                        toy_dir: str | None = None) -> dict[str, Any]:
    """One entry point for `gaelle prepare {coco,voc,folder,toy}`.

    Args:
        kind: "coco", "voc", "folder" or "toy".
        out_uri: output directory or URI for shards + manifest.json.
        root: source root (coco: folder with annotations/ and train2017/...; voc: VOC2007
            or VOCdevkit; folder: any image folder). Unused for toy.
        year: COCO year, 2014 or 2017 (coco only).
        splits: splits to read. Defaults: coco ("train", "val"); voc ("trainval", "test");
            folder: one name, default ("train",). Unused for toy (always train + val).
        dataset_name: default "coco{year}", "voc2007", the folder's name, or "toy".
        shard_size, min_size, strict, jpeg_quality, workers: see prepare_shards (strict also
            makes the COCO reader raise on annotations with unknown image/category ids).
        n_train, n_val, image_size, seed, toy_dir: toy only, see prepare_toy.

    Returns:
        The manifest dict.
    """
    common = {"shard_size": shard_size, "min_size": min_size, "strict": strict,
              "jpeg_quality": jpeg_quality, "workers": workers}
    if kind == "toy":
        return prepare_toy(out_uri, n_train=n_train, n_val=n_val, image_size=image_size,
                           seed=seed, toy_dir=toy_dir, dataset_name=dataset_name or "toy",
                           **common)
    if kind not in ("coco", "voc", "folder"):
        raise ValueError(f"unknown source kind {kind!r}; expected coco, voc, folder or toy")
    if kind == "folder" and splits is not None and len(splits) != 1:
        raise ValueError(f"prepare folder takes one split name, got {list(splits)!r}")
    records, class_names, source = _read_kind(kind, root, year, splits, strict)
    if dataset_name is None:
        dataset_name = {"coco": f"coco{year}", "voc": "voc2007"}.get(
            kind, os.path.basename(os.path.abspath(root or "")) or "folder")
    return _prepare_shards_with_bar(records, class_names, out_uri, dataset_name=dataset_name,
                                    source=source, **common)
