"""Readers that turn a data set on disk into records for the shard writer.

A record is a dict::

    {"image_id": int,
     "file_name": str,           # relative to the image root
     "path": str,                # absolute path of the image file
     "labels": np.ndarray,       # uint8 (C,): 1 present, 0 absent, 255 "difficult" (VOC)
     "split": str}

Every reader returns ``(records, class_names, stats)``: the records, the C class names in
label order, and a JSON-serialisable dict of counts and problems found while reading. The
readers only read annotations and list files; whether an image decodes is checked when the
shards are written (:mod:`gaelle_ray.data.shards`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any

import numpy as np

__all__ = [
    "IMAGE_EXTENSIONS",
    "VOC_CLASSES",
    "coco_paths",
    "read_coco",
    "read_folder",
    "read_voc",
]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

Record = dict[str, Any]

# VOC per-class files: 1 present, -1 absent, 0 present but only as "difficult".
_VOC_VALUES = {"1": 1, "-1": 0, "0": 255}


# ----------------------------------------------------------------------------- COCO


def coco_paths(root: str | os.PathLike, year: int | str, split: str) -> tuple[str, str]:
    """Standard locations inside a COCO download.

    Args:
        root: directory holding ``annotations/`` and the image folders.
        year: 2014 or 2017.
        split: "train" or "val".

    Returns:
        (annotation file, image directory), e.g.
        (root/annotations/instances_train2014.json, root/train2014).
    """
    year = str(year)
    if year not in ("2014", "2017"):
        raise ValueError(f"COCO year must be 2014 or 2017, got {year!r}")
    if split not in ("train", "val"):
        raise ValueError(f"COCO split must be 'train' or 'val', got {split!r}")
    root = os.path.abspath(os.fspath(root))
    ann_file = os.path.join(root, "annotations", f"instances_{split}{year}.json")
    return ann_file, os.path.join(root, f"{split}{year}")


def _load_coco(ann_file: str):
    """Parse an instances json with pycocotools (quietly); malformed files -> ValueError."""
    from pycocotools.coco import COCO

    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(ann_file)
    except json.JSONDecodeError as err:
        raise ValueError(f"{ann_file}: not valid JSON (truncated or corrupt?): {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{ann_file}: not a UTF-8 text file: {err}") from err
    except (AssertionError, KeyError, TypeError, AttributeError) as err:
        # pycocotools asserts the top level is a dict and indexes every entry by 'id',
        # 'image_id' and 'category_id'
        raise ValueError(
            f"{ann_file}: not a COCO instances file ({type(err).__name__}: {err})"
        ) from err


def _first_duplicate(entries: list[dict[str, Any]]) -> Any:
    seen = set()
    for entry in entries:
        if entry["id"] in seen:
            return entry["id"]
        seen.add(entry["id"])
    return None


def _check_coco_structure(coco, ann_file: str) -> None:
    """Required lists are present and ids are unique (pycocotools keeps the last duplicate)."""
    data = coco.dataset
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{ann_file}: missing or non-list key {key!r}")
    for key, index in (("images", coco.imgs), ("categories", coco.cats),
                       ("annotations", coco.anns)):
        if len(index) != len(data[key]):
            raise ValueError(
                f"{ann_file}: duplicate id {_first_duplicate(data[key])!r} in {key!r}")
    for img in data["images"]:
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise ValueError(f"{ann_file}: image id {img['id']!r} has no 'file_name'")


def _coco_labels(coco, ann_file: str, cat_index: dict[int, int],
                 strict: bool) -> tuple[dict[int, np.ndarray], list[dict[str, Any]]]:
    """Multi-hot label per image id; bad annotations listed (or raised when strict)."""
    labels = {img_id: np.zeros(len(cat_index), np.uint8) for img_id in coco.imgs}
    bad: list[dict[str, Any]] = []
    for ann in coco.dataset["annotations"]:
        img_id, cat_id = ann["image_id"], ann["category_id"]
        reason = None
        if img_id not in labels:
            reason = f"unknown image_id {img_id!r}"
        elif cat_id not in cat_index:
            reason = f"unknown category_id {cat_id!r}"
        if reason is None:
            labels[img_id][cat_index[cat_id]] = 1
            continue
        if strict:
            raise ValueError(f"{ann_file}: annotation id {ann['id']!r}: {reason}")
        bad.append({"annotation_id": ann["id"], "image_id": img_id, "category_id": cat_id,
                    "reason": reason})
    return labels, bad


def read_coco(ann_file: str | os.PathLike, image_dir: str | os.PathLike, split: str,
              strict: bool = False) -> tuple[list[Record], list[str], dict[str, Any]]:
    """Read a COCO instances file into multi-hot records (pycocotools does the parsing).

    Label position k is the k-th category in ascending category-id order (COCO's ids 1..90
    with gaps -> 80 positions). An image's label is 1 for every category with at least one
    annotation in it (crowd annotations included). Images without annotations are kept with
    an all-zero label.

    Args:
        ann_file: path of instances_*.json.
        image_dir: directory the images' file_name entries are relative to.
        split: split name stored in every record (e.g. "train").
        strict: raise ValueError on the first annotation that names an unknown image or
            category id, instead of listing it in stats["bad_annotations"].

    Returns:
        records sorted by image id, class names (C,), stats {"ann_file", "images",
        "annotations", "no_annotation": int, "bad_annotations": list of {"annotation_id",
        "image_id", "category_id", "reason"}}.

    Raises:
        FileNotFoundError: ann_file does not exist.
        ValueError: malformed / truncated JSON, duplicate ids, images without file_name, or
            (strict) a bad annotation; the message names the file.
    """
    ann_file = os.path.abspath(os.fspath(ann_file))
    image_dir = os.path.abspath(os.fspath(image_dir))
    coco = _load_coco(ann_file)
    _check_coco_structure(coco, ann_file)
    cat_ids = sorted(coco.getCatIds())
    if not cat_ids:
        raise ValueError(f"{ann_file}: no categories")
    cat_index = {cat_id: k for k, cat_id in enumerate(cat_ids)}
    class_names = [str(coco.cats[c]["name"]) for c in cat_ids]
    labels, bad = _coco_labels(coco, ann_file, cat_index, strict)
    records = []
    for img_id in sorted(coco.getImgIds()):
        file_name = coco.imgs[img_id]["file_name"]
        records.append({"image_id": int(img_id), "file_name": file_name,
                        "path": os.path.join(image_dir, file_name),
                        "labels": labels[img_id], "split": split})
    stats = {
        "ann_file": ann_file,
        "images": len(records),
        "annotations": len(coco.dataset["annotations"]),
        "no_annotation": sum(1 for r in records if not r["labels"].any()),
        "bad_annotations": bad,
    }
    return records, class_names, stats


# ----------------------------------------------------------------------------- VOC


def _voc_dir(root: str) -> str:
    """Accept the VOC2007 folder itself, or VOCdevkit, or the folder holding VOCdevkit."""
    for candidate in (root, os.path.join(root, "VOC2007"),
                      os.path.join(root, "VOCdevkit", "VOC2007")):
        if os.path.isdir(os.path.join(candidate, "ImageSets", "Main")):
            return candidate
    raise FileNotFoundError(
        f"no VOC2007 tree under {root} (looked for ImageSets/Main in it, in VOC2007/ and in "
        "VOCdevkit/VOC2007/)"
    )


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VOC list file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _voc_ids(path: str) -> list[str]:
    ids = _read_lines(path)
    for n, image_id in enumerate(ids, start=1):
        if not image_id.isdigit():
            raise ValueError(f"{path}:{n}: VOC image id must be digits, got {image_id!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: duplicate image ids")
    return ids


def _voc_class_values(path: str, ids: list[str]) -> dict[str, int]:
    """Parse '{cls}_{split}.txt': one '<id> <1|0|-1>' line per image of the split."""
    values: dict[str, int] = {}
    for n, line in enumerate(_read_lines(path), start=1):
        parts = line.split()
        if len(parts) != 2 or parts[1] not in _VOC_VALUES:
            raise ValueError(f"{path}:{n}: expected '<image id> <1|0|-1>', got {line!r}")
        values[parts[0]] = _VOC_VALUES[parts[1]]
    missing = [i for i in ids if i not in values]
    if missing:
        raise ValueError(f"{path}: no entry for image id {missing[0]!r} "
                         f"({len(missing)} ids of the split missing)")
    extra = sorted(set(values) - set(ids))
    if extra:
        raise ValueError(f"{path}: image id {extra[0]!r} is not in the split list")
    return values


def read_voc(root: str | os.PathLike,
             split: str) -> tuple[list[Record], list[str], dict[str, Any]]:
    """Read PASCAL VOC2007 image-level labels from the ImageSets/Main lists.

    Args:
        root: the VOC2007 folder (or VOCdevkit, or the folder holding VOCdevkit).
        split: "train", "val", "trainval" or "test" (any name with an
            ImageSets/Main/{split}.txt file).

    Returns:
        records in the order of {split}.txt with labels uint8 (20,) in VOC_CLASSES order
        (1 present, 0 absent, 255 difficult-only), the 20 class names, stats {"images",
        "positives", "difficult"}. image_id is int(id); file_name is "{id}.jpg", relative to
        the JPEGImages folder.

    Raises:
        FileNotFoundError: a list file is missing.
        ValueError: a malformed line, or a class file that disagrees with the split list;
            the message names the file (and line).
    """
    base = _voc_dir(os.path.abspath(os.fspath(root)))
    main = os.path.join(base, "ImageSets", "Main")
    ids = _voc_ids(os.path.join(main, f"{split}.txt"))
    labels = np.zeros((len(ids), len(VOC_CLASSES)), np.uint8)
    for k, cls in enumerate(VOC_CLASSES):
        values = _voc_class_values(os.path.join(main, f"{cls}_{split}.txt"), ids)
        labels[:, k] = [values[i] for i in ids]
    image_dir = os.path.join(base, "JPEGImages")
    records = [{"image_id": int(i), "file_name": f"{i}.jpg",
                "path": os.path.join(image_dir, f"{i}.jpg"), "labels": labels[n].copy(),
                "split": split} for n, i in enumerate(ids)]
    if len({r["image_id"] for r in records}) != len(records):
        raise ValueError(f"{os.path.join(main, split + '.txt')}: ids collide as integers")
    stats = {"images": len(records), "positives": int((labels == 1).sum()),
             "difficult": int((labels == 255).sum())}
    return records, list(VOC_CLASSES), stats


# ----------------------------------------------------------------------------- folder


def read_folder(root: str | os.PathLike,
                split: str = "train") -> tuple[list[Record], list[str], dict[str, Any]]:
    """Every .jpg / .jpeg / .png under root (recursive, case-insensitive), without labels.

    Args:
        root: directory to walk.
        split: split name stored in every record.

    Returns:
        records sorted by relative path, image_id = running index 0..N-1, labels uint8 (0,);
        class names [] ; stats {"images": N}.

    Raises:
        FileNotFoundError: root is not a directory.
        ValueError: no image found.
    """
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    rel_paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rel_paths.append(os.path.relpath(os.path.join(dirpath, name), root))
    rel_paths.sort(key=lambda p: p.replace(os.sep, "/"))
    if not rel_paths:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    records = [{"image_id": n, "file_name": rel.replace(os.sep, "/"),
                "path": os.path.join(root, rel), "labels": np.zeros(0, np.uint8),
                "split": split} for n, rel in enumerate(rel_paths)]
    return records, [], {"images": len(records)}
