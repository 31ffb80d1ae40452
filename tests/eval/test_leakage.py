"""Leakage guard: evaluation test images found among the pretraining images by id or content."""

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gaelle_ray.eval.leakage import check_overlap, leakage_guard, overlap_report


def _relabelled_copy(src, dst, id_offset, dataset_name, extra_byte=False):
    """A copy of the shards with image ids shifted by id_offset, another dataset name, and
    (extra_byte) every JPEG's bytes changed by one trailing byte."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["dataset"] = dataset_name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for shard in manifest["shards"]:
        path = dst / shard["path"]
        table = pq.read_table(path)
        ids = table.column("image_id").to_numpy() + id_offset
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.int64()))
        if extra_byte:
            jpegs = [b + b"\0" for b in table.column("jpeg").to_pylist()]
            table = table.set_column(table.schema.get_field_index("jpeg"), "jpeg", pa.array(jpegs, pa.binary()))
        pq.write_table(table, path)
    return dst


def test_leakage_guard(toy_shards, tmp_path):
    assert check_overlap(toy_shards, toy_shards, "val", False, pretrain_splits=["train"]) == 0
    with pytest.raises(ValueError, match=r"leakage: 16 of the 16 'val' images .* e\.g\. image ids \["):
        check_overlap(toy_shards, toy_shards, "val", False, pretrain_splits=["val"])
    assert check_overlap(toy_shards, toy_shards, "val", True, pretrain_splits=["val"], cache_dir=tmp_path) == 16
    assert list(tmp_path.glob("hashes-*.npz"))  # pretraining hashes cached per shard
    # unknown pretraining split -> every split is checked
    assert overlap_report(toy_shards, toy_shards, "val")["overlap"] == 16
    # same bytes under other ids and another dataset name: found by content only
    other = _relabelled_copy(Path(toy_shards), tmp_path / "other", 100000, "other")
    r = overlap_report(str(other), toy_shards, "val", ["val"])
    assert (r["overlap"], r["by_id"], r["by_content"], r["ids_compared"]) == (16, 0, 16, False)
    with pytest.raises(ValueError, match="16 by JPEG content"):
        check_overlap(str(other), toy_shards, "val", False, pretrain_splits=["val"])
    # other bytes, same ids, same dataset family (coco2017 vs coco2014): found by id
    coco14 = _relabelled_copy(Path(toy_shards), tmp_path / "coco14", 0, "coco2014")
    recoded = _relabelled_copy(Path(toy_shards), tmp_path / "recoded", 0, "coco2017", extra_byte=True)
    r = overlap_report(str(recoded), str(coco14), "val", ["val"])
    assert (r["overlap"], r["by_id"], r["by_content"], r["ids_compared"]) == (16, 16, 0, True)


def test_toy_sets_are_compared_by_content_only(tmp_path):
    """Toy ids number one generated set's images: a small set's val ids are a bigger set's
    train ids, different pictures; only the bytes say whether a picture was seen."""
    from gaelle_ray.data.prepare import prepare_toy

    big, small = tmp_path / "big", tmp_path / "small"
    prepare_toy(str(big), n_train=40, n_val=8, image_size=64, seed=0)
    prepare_toy(str(small), n_train=8, n_val=8, image_size=64, seed=0)
    r = overlap_report(str(big), str(small), "val", ["train"])  # small val ids 9..16 are big train ids
    assert (r["overlap"], r["by_id"], r["ids_compared"]) == (0, 0, False)
    assert check_overlap(str(big), str(small), "val", False, pretrain_splits=["train"]) == 0
    # the same generator draws val image i the same in both sets: that is real overlap, by content
    r = overlap_report(str(big), str(small), "val", ["val"])
    assert (r["overlap"], r["by_content"]) == (8, 8)


def test_random_backbone_needs_no_leakage_check_and_gets_no_notice(toy_shards, caplog):
    with caplog.at_level("INFO", logger="gaelle_ray.eval.leakage"):
        tags = leakage_guard("random", toy_shards, "val", False)
    assert tags == {"leakage_check": "random init", "leakage_overlap": 0}
    assert not caplog.records  # a random backbone saw no data: no "check skipped" warning
