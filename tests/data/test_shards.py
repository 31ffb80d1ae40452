"""Parquet shards: content, manifest, checksums, resume, idempotence, bad inputs, URIs."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile

from gaelle_ray.data import shards
from gaelle_ray.data.shards import (list_shards, prepare_shards, read_manifest, shard_uri,
                                    verify_shards)
from gaelle_ray.data.sources import read_coco


@pytest.fixture(scope="module")
def toy_records(tiny_toy):
    """Records of the tiny toy set, both splits (16 train + 6 val)."""
    records, names = [], None
    for split, info in tiny_toy["splits"].items():
        recs, names, _ = read_coco(info["ann_file"], info["image_dir"], split, strict=True)
        records += recs
    return records, names


def _prepare(records_and_names, out, **kwargs):
    records, names = records_and_names
    return prepare_shards(records, names, out, dataset_name="tiny", **kwargs)


def _read_all(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in list_shards(out)])


def _snapshot(root) -> dict[str, tuple[bytes, int]]:
    """relative path -> (bytes, mtime_ns) of every file under root."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


class _CountingWriter:
    """Wraps shards._write_shard: counts calls, optionally fails on call number `fail_on`."""

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on
        self.inner = shards._write_shard

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated interruption")
        return self.inner(*args, **kwargs)


# ----------------------------------------------------------------------------- content


def test_shards_hold_the_records(toy_records, tmp_path):
    out = tmp_path / "out"
    manifest = _prepare(toy_records, out, shard_size=5)
    records, names = toy_records
    assert manifest["dataset"] == "tiny" and manifest["class_names"] == names
    assert manifest["counts"]["train"] == {"records": 16, "rows": 16, "skipped": 0,
                                           "converted": 0, "shards": 4}
    assert manifest["counts"]["val"]["rows"] == 6 and manifest["counts"]["val"]["shards"] == 2
    assert [s["path"] for s in manifest["shards"]] == [
        "train/part-00000.parquet", "train/part-00001.parquet", "train/part-00002.parquet",
        "train/part-00003.parquet", "val/part-00000.parquet", "val/part-00001.parquet"]
    assert [s["num_rows"] for s in manifest["shards"]] == [5, 5, 5, 1, 5, 1]
    assert manifest["skipped"] == [] and manifest["converted"] == []
    assert read_manifest(out) == manifest

    table = _read_all(out)
    assert table.schema.field("jpeg").type == pa.binary()
    assert table.schema.field("image_id").type == pa.int64()
    assert table.schema.field("labels").type == pa.list_(pa.uint8())
    by_key = {(r["split"], r["image_id"]): r for r in records}
    rows = table.to_pylist()
    assert len(rows) == 22
    assert [(r["split"], r["image_id"]) for r in rows] == sorted(by_key)
    for row in rows:
        rec = by_key[(row["split"], row["image_id"])]
        assert row["labels"] == rec["labels"].tolist()
        assert row["file_name"] == rec["file_name"]
        with open(rec["path"], "rb") as f:
            assert row["jpeg"] == f.read(), "RGB JPEGs are stored byte for byte"
        img = Image.open(io.BytesIO(row["jpeg"]))
        assert img.format == "JPEG" and (row["width"], row["height"]) == img.size == (48, 48)


def test_manifest_checksums_and_verify(toy_records, tmp_path):
    out = tmp_path / "out"
    manifest = _prepare(toy_records, out, shard_size=8)
    for shard in manifest["shards"]:
        with open(out / shard["path"], "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == shard["sha256"]
    assert verify_shards(out) == {"shards": 3, "rows": 22}
    assert list_shards(out, "val") == [f"{out}/val/part-00000.parquet"]
    with pytest.raises(ValueError, match="test"):
        list_shards(out, "test")

    with open(out / "train" / "part-00001.parquet", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=r"train/part-00001\.parquet.*sha256"):
        verify_shards(out)
    os.remove(out / "train" / "part-00001.parquet")
    with pytest.raises(ValueError, match=r"train/part-00001\.parquet.*missing"):
        verify_shards(out)


def test_file_uri(toy_records, tmp_path):
    uri = "file://" + str(tmp_path / "viauri")
    manifest = _prepare(toy_records, uri, shard_size=10)
    assert os.path.isfile(tmp_path / "viauri" / "manifest.json")
    assert read_manifest(uri) == manifest
    assert read_manifest(uri + "/manifest.json") == manifest
    assert verify_shards(uri)["rows"] == 22
    paths = list_shards(uri, "train")
    assert paths[0] == uri + "/train/part-00000.parquet"
    table = pq.read_table(paths[0].removeprefix("file://"))
    assert table.num_rows == 10


def test_shard_uri_keeps_uris_and_makes_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = "train/part-00000.parquet"
    assert shard_uri("out", rel) == f"{tmp_path}/out/{rel}"
    assert shard_uri("out/manifest.json", rel) == f"{tmp_path}/out/{rel}"
    assert shard_uri("manifest.json", rel) == f"{tmp_path}/{rel}"
    assert shard_uri("s3://bucket/coco/", rel) == f"s3://bucket/coco/{rel}"
    assert shard_uri("gs://bucket/coco/manifest.json", rel) == f"gs://bucket/coco/{rel}"
    assert shard_uri("file:///data/coco", rel) == f"file:///data/coco/{rel}"


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a gaelle-shards manifest"):
        read_manifest(tmp_path)


# ----------------------------------------------------------------------------- resume / idempotence


def test_rerun_is_idempotent_and_rewrites_nothing(toy_records, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = _prepare(toy_records, out, shard_size=6)
    before = _snapshot(out)
    writer = _CountingWriter()
    monkeypatch.setattr(shards, "_write_shard", writer)
    second = _prepare(toy_records, out, shard_size=6)
    assert writer.calls == 0
    assert second == first
    after = _snapshot(out)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}
    assert all(after[k][1] == before[k][1] for k in after if k.endswith(".parquet"))
    assert not os.path.exists(out / "_progress.json")


def test_interrupted_prepare_resumes_without_redoing_shards(toy_records, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    _prepare(toy_records, reference, shard_size=4)

    out = tmp_path / "out"
    failing = _CountingWriter(fail_on=3)
    monkeypatch.setattr(shards, "_write_shard", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        _prepare(toy_records, out, shard_size=4)
    assert not os.path.exists(out / "manifest.json")
    assert os.path.exists(out / "_progress.json")
    written = sorted(os.listdir(out / "train"))
    assert written == ["part-00000.parquet", "part-00001.parquet"]
    mtimes = {n: os.stat(out / "train" / n).st_mtime_ns for n in written}

    resumed = _CountingWriter()
    monkeypatch.setattr(shards, "_write_shard", resumed)
    manifest = _prepare(toy_records, out, shard_size=4)
    assert resumed.calls == len(manifest["shards"]) - 2
    assert {n: os.stat(out / "train" / n).st_mtime_ns for n in written} == mtimes
    assert not os.path.exists(out / "_progress.json")
    ref, got = _snapshot(reference), _snapshot(out)
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in ref.items()}


def test_finished_shard_without_progress_entry_is_kept(toy_records, tmp_path, monkeypatch):
    """Interrupted between moving a shard into place and recording it: the file's own
    metadata says which plan it holds, so it is not rewritten."""
    out = tmp_path / "out"
    manifest = _prepare(toy_records, out, shard_size=4)
    os.remove(out / "manifest.json")
    writer = _CountingWriter()
    monkeypatch.setattr(shards, "_write_shard", writer)
    assert _prepare(toy_records, out, shard_size=4) == manifest
    assert writer.calls == 0


def test_corrupted_shard_is_rewritten(toy_records, tmp_path, monkeypatch):
    out = tmp_path / "out"
    manifest = _prepare(toy_records, out, shard_size=4)
    with open(out / "val" / "part-00001.parquet", "r+b") as f:
        f.write(b"garbage")
    writer = _CountingWriter()
    monkeypatch.setattr(shards, "_write_shard", writer)
    assert _prepare(toy_records, out, shard_size=4) == manifest
    assert writer.calls == 1
    verify_shards(out)


def test_new_layout_replaces_old_shards(toy_records, tmp_path):
    out = tmp_path / "out"
    _prepare(toy_records, out, shard_size=3)
    (out / "train" / "part-00000.parquet.tmp").write_bytes(b"left over")
    manifest = _prepare(toy_records, out, shard_size=100)
    assert sorted(os.listdir(out / "train")) == ["part-00000.parquet"]
    assert sorted(os.listdir(out / "val")) == ["part-00000.parquet"]
    assert verify_shards(out) == {"shards": 2, "rows": 22}
    assert manifest["settings"]["shard_size"] == 100


def test_only_our_own_leftovers_are_removed(toy_records, tmp_path):
    records, names = toy_records
    out = tmp_path / "out"
    prepare_shards(records, names, out, dataset_name="tiny", shard_size=4)
    (out / "notes.txt").write_text("keep me")
    (out / "other").mkdir()
    (out / "other" / "part-00000.parquet").write_bytes(b"not ours")
    (out / "manifest.json.tmp").write_bytes(b"half written")
    train_only = [r for r in records if r["split"] == "train"]
    manifest = prepare_shards(train_only, names, out, dataset_name="tiny", shard_size=4)
    assert list(manifest["counts"]) == ["train"]
    assert not os.path.exists(out / "val"), "shards of the dropped split are removed"
    assert sorted(os.listdir(out)) == ["manifest.json", "notes.txt", "other", "train"]
    assert (out / "other" / "part-00000.parquet").read_bytes() == b"not ours"


def test_worker_processes_give_the_same_output(toy_records, tmp_path):
    _prepare(toy_records, tmp_path / "one", shard_size=8, workers=1)
    _prepare(toy_records, tmp_path / "two", shard_size=8, workers=2)
    one, two = _snapshot(tmp_path / "one"), _snapshot(tmp_path / "two")
    assert {k: v[0] for k, v in one.items()} == {k: v[0] for k, v in two.items()}


# ----------------------------------------------------------------------------- bad inputs


def _bad_input_records(root, image_writer):
    """One record per kind of problem; returns (records, {kind: path})."""
    paths = {
        "good": image_writer(root / "good.jpg", seed=1),
        "zero_byte": str(root / "zero.jpg"),
        "truncated": str(root / "truncated.jpg"),
        "text_as_jpg": str(root / "text.jpg"),
        "missing": str(root / "missing.jpg"),
        "too_small": image_writer(root / "small.jpg", size=(12, 60)),
        "png_as_jpg": image_writer(root / "png_named.jpg", fmt="PNG"),
        "png": image_writer(root / "plain.png", fmt="PNG"),
        "cmyk": image_writer(root / "cmyk.jpg", mode="CMYK"),
        "gray": image_writer(root / "gray.jpg", mode="L"),
        "palette": image_writer(root / "palette.png", mode="P", fmt="PNG"),
        "rgba": image_writer(root / "rgba.png", mode="RGBA", fmt="PNG"),
    }
    open(paths["zero_byte"], "wb").close()
    with open(image_writer(root / "full.jpg", size=(64, 64), seed=2), "rb") as f:
        full = f.read()
    with open(paths["truncated"], "wb") as f:
        f.write(full[: len(full) // 2])
    with open(paths["text_as_jpg"], "w") as f:
        f.write("this is not a JPEG\n")
    records = [{"image_id": n, "file_name": os.path.basename(p), "path": p,
                "labels": np.array([n % 2, 1], np.uint8), "split": "train"}
               for n, p in enumerate(paths.values())]
    return records, paths


SKIPPED = {"zero_byte": "empty file", "truncated": "truncated", "text_as_jpg": "not an image",
           "missing": "missing file", "too_small": "too small"}
CONVERTED = {"png_as_jpg": "PNG/RGB", "png": "PNG/RGB", "cmyk": "JPEG/CMYK", "gray": "JPEG/L",
             "palette": "PNG/P", "rgba": "PNG/RGBA"}


def test_bad_inputs_are_converted_or_skipped_and_listed(tmp_path, image_writer):
    records, paths = _bad_input_records(tmp_path / "src", image_writer)
    out = tmp_path / "out"
    manifest = prepare_shards(records, ["a", "b"], out, dataset_name="bad", min_size=20)
    skipped = {e["file"]: e for e in manifest["skipped"]}
    converted = {e["file"]: e for e in manifest["converted"]}
    assert set(skipped) == {paths[k] for k in SKIPPED}
    for kind, reason in SKIPPED.items():
        assert reason in skipped[paths[kind]]["reason"], (kind, skipped[paths[kind]])
        assert skipped[paths[kind]]["shard"] == "train/part-00000.parquet"
    assert {e["file"]: e["from"] for e in manifest["converted"]} == {
        paths[k]: v for k, v in CONVERTED.items()}
    counts = manifest["counts"]["train"]
    assert counts == {"records": 12, "rows": 7, "skipped": 5, "converted": 6, "shards": 1}

    rows = {r["file_name"]: r for r in _read_all(out).to_pylist()}
    assert len(rows) == 7
    for name, row in rows.items():
        img = Image.open(io.BytesIO(row["jpeg"]))
        img.load()
        assert img.format == "JPEG" and img.mode == "RGB", name
    rgba = np.asarray(Image.open(io.BytesIO(rows["rgba.png"]["jpeg"])), np.float32)
    assert rgba[:, :15].mean() > 245, "transparent pixels are composited onto white"
    assert set(converted) | {paths["good"]} == {os.path.join(tmp_path, "src", n) for n in rows}


@pytest.mark.parametrize("kind", sorted(SKIPPED))
def test_strict_stops_on_the_bad_file(tmp_path, image_writer, kind):
    records, paths = _bad_input_records(tmp_path / "src", image_writer)
    chosen = [r for r in records if r["path"] in (paths["good"], paths[kind], paths["cmyk"])]
    with pytest.raises(ValueError, match=os.path.basename(paths[kind])):
        prepare_shards(chosen, ["a", "b"], tmp_path / "out", dataset_name="bad", min_size=20,
                       strict=True)
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_truncation_detected_even_when_pil_is_told_to_tolerate_it(tmp_path, image_writer,
                                                                   monkeypatch):
    records, paths = _bad_input_records(tmp_path / "src", image_writer)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    chosen = [r for r in records if r["path"] == paths["truncated"]]
    manifest = prepare_shards(chosen, ["a", "b"], tmp_path / "out", dataset_name="t")
    assert "truncated" in manifest["skipped"][0]["reason"]
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the global setting is restored"


@pytest.mark.parametrize("change, message", [
    ({"labels": np.array([1, 0, 1], np.uint8)}, "labels have shape"),
    ({"labels": np.array([1, 7], np.uint8)}, "labels must be 0, 1 or 255"),
    ({"split": "train/../x"}, "split name"),
    ({"image_id": 1}, "duplicate image_id 1"),
])
def test_invalid_records_raise(tmp_path, image_writer, change, message):
    records = [{"image_id": n, "file_name": f"{n}.jpg",
                "path": image_writer(tmp_path / f"{n}.jpg", seed=n),
                "labels": np.array([0, 1], np.uint8), "split": "train"} for n in range(3)]
    records[0].update(change)
    with pytest.raises(ValueError, match=message):
        prepare_shards(records, ["a", "b"], tmp_path / "out", dataset_name="x")


@pytest.mark.parametrize("kwargs, message", [
    ({"shard_size": 0}, "shard_size"), ({"min_size": -1}, "min_size"),
    ({"jpeg_quality": 101}, "jpeg_quality"), ({"dataset_name": ""}, "dataset_name"),
    ({"workers": 0}, "workers"),
])
def test_invalid_settings_raise(tmp_path, image_writer, kwargs, message):
    records = [{"image_id": 0, "file_name": "0.jpg", "path": image_writer(tmp_path / "0.jpg"),
                "labels": np.zeros(0, np.uint8), "split": "train"}]
    with pytest.raises(ValueError, match=message):
        prepare_shards(records, [], tmp_path / "out", **{"dataset_name": "x", **kwargs})
    with pytest.raises(ValueError, match="no records"):
        prepare_shards([], [], tmp_path / "out", dataset_name="x")
