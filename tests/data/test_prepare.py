"""`gaelle prepare {coco,voc,folder,toy}`: each source kind read and written as shards."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gaelle_ray.data.prepare import prepare_from_source
from gaelle_ray.data.shards import list_shards, verify_shards
from gaelle_ray.data.sources import VOC_CLASSES


def test_prepare_from_source_coco(tiny_toy, tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split, info in tiny_toy["splits"].items():
        shutil.copy(info["ann_file"], root / "annotations" / f"instances_{split}2017.json")
        shutil.copytree(info["image_dir"], root / f"{split}2017")
    manifest = prepare_from_source("coco", tmp_path / "out", root=str(root), year=2017,
                                   shard_size=10)
    assert manifest["dataset"] == "coco2017"
    assert manifest["class_names"] == tiny_toy["class_names"]
    assert {s: c["rows"] for s, c in manifest["counts"].items()} == {"train": 16, "val": 6}
    assert manifest["source"]["kind"] == "coco" and manifest["source"]["year"] == 2017
    assert manifest["source"]["stats"]["train"]["no_annotation"] == 0
    only_val = prepare_from_source("coco", tmp_path / "out_val", root=str(root),
                                   splits=["val"])
    assert list(only_val["counts"]) == ["val"]


def test_prepare_from_source_voc_keeps_difficult(tmp_path, image_writer):
    base = tmp_path / "VOC2007"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True)
    ids = ["000001", "000002"]
    for split in ("trainval", "test"):
        (main / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for cls in VOC_CLASSES:
            value = {"dog": " 0", "cat": " 1"}.get(cls, "-1")
            (main / f"{cls}_{split}.txt").write_text("".join(f"{i} {value}\n" for i in ids))
    for n, i in enumerate(ids):
        image_writer(base / "JPEGImages" / f"{i}.jpg", seed=n)
    manifest = prepare_from_source("voc", tmp_path / "out", root=str(base))
    assert manifest["dataset"] == "voc2007" and manifest["num_classes"] == 20
    assert {s: c["rows"] for s, c in manifest["counts"].items()} == {"test": 2, "trainval": 2}
    labels = pq.read_table(list_shards(tmp_path / "out", "test")[0])["labels"].to_pylist()
    assert labels[0][VOC_CLASSES.index("dog")] == 255
    assert labels[0][VOC_CLASSES.index("cat")] == 1


def test_prepare_from_source_folder(tmp_path, image_writer):
    image_writer(tmp_path / "pics" / "a.jpg")
    image_writer(tmp_path / "pics" / "deep" / "b.png", fmt="PNG")
    manifest = prepare_from_source("folder", tmp_path / "out", root=str(tmp_path / "pics"))
    assert manifest["dataset"] == "pics" and manifest["class_names"] == []
    assert manifest["counts"]["train"]["rows"] == 2
    assert [c["from"] for c in manifest["converted"]] == ["PNG/RGB"]
    table = pa.concat_tables([pq.read_table(p) for p in list_shards(tmp_path / "out")])
    assert table["labels"].to_pylist() == [[], []]
    with pytest.raises(ValueError, match="one split"):
        prepare_from_source("folder", tmp_path / "o2", root=str(tmp_path / "pics"),
                            splits=["a", "b"])


def test_prepare_from_source_toy_is_reproducible(tmp_path):
    a = prepare_from_source("toy", tmp_path / "a", n_train=6, n_val=3, image_size=32,
                            shard_size=4)
    b = prepare_from_source("toy", tmp_path / "b", n_train=6, n_val=3, image_size=32,
                            shard_size=4)
    assert a == b and a["dataset"] == "toy" and len(a["class_names"]) >= 10
    assert a["source"] == {"kind": "toy", "n_train": 6, "n_val": 3, "image_size": 32,
                           "seed": 0}
    assert verify_shards(tmp_path / "a") == {"shards": 3, "rows": 9}


def test_prepare_from_source_rejects_unknown_kind(tmp_path):
    with pytest.raises(ValueError, match="unknown source kind 'imagenet'"):
        prepare_from_source("imagenet", tmp_path / "out", root=str(tmp_path))
    with pytest.raises(ValueError, match="root is required"):
        prepare_from_source("coco", tmp_path / "out")
