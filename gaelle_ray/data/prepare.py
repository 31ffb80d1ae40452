"""`gaelle prepare {coco,voc,folder,toy}`: read a source of one kind and write it as shards.

:func:`prepare_from_source` picks the reader of :mod:`gaelle_ray.data.sources` for the kind
(or generates the toy set with :mod:`gaelle_ray.data.toy`) and hands the records to
:func:`gaelle_ray.data.shards.prepare_shards`, which knows nothing of where they came from.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Sequence

from gaelle_ray.data import sources, toy
from gaelle_ray.data.shards import prepare_shards

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
    return prepare_shards(records, class_names, out_uri, source=source, **prepare_kwargs)


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
    return prepare_shards(records, class_names, out_uri, dataset_name=dataset_name,
                          source=source, **common)
