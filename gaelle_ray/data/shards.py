"""Parquet shards of JPEG bytes + labels, written through pyarrow.fs (local, file://, s3://, gs://).

Layout under ``out_uri``::

    manifest.json                  written last; its presence means "complete"
    _progress.json                 only while a prepare runs (resume information)
    {split}/part-00000.parquet     rows of one split, in (image_id, file_name) order

Shard columns (one row per image)::

    jpeg       binary        JPEG bytes (the source file's own bytes when it is an RGB JPEG,
                             otherwise a re-encoding at ``jpeg_quality``)
    image_id   int64
    file_name  string        relative to the source's image root
    labels     list<uint8>   (C,) 1 present, 0 absent, 255 difficult/ignore; C may be 0
    split      string
    height     int32         decoded size in pixels
    width      int32

Which records go into shard k of a split is fixed by the sorted record list and
``shard_size`` alone: shard k holds sorted records [k*shard_size, (k+1)*shard_size), less the
ones skipped. Each shard carries a "plan" digest (records, file sizes, settings) in its own
Parquet metadata and in the progress file, so an interrupted prepare resumes by keeping every
finished shard whose plan and sha256 still match, and a re-run over finished output rewrites
nothing and produces the same manifest byte for byte. Every file is written under a
temporary name and moved into place.

Bad inputs never vanish silently: each is converted (listed under "converted" with the mode it
came from), or skipped (listed under "skipped" with the reason), or, with ``strict=True``,
stops the run with ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image, ImageFile, UnidentifiedImageError

from gaelle_ray import storage

__all__ = [
    "MANIFEST_NAME",
    "SHARD_SCHEMA",
    "list_shards",
    "prepare_shards",
    "read_manifest",
    "shard_uri",
    "verify_shards",
]

logger = logging.getLogger(__name__)

SHARD_FORMAT = "gaelle-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = "_progress.json"
_META_KEY = b"gaelle_shard"
_TMP_SUFFIX = ".tmp"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_RE = re.compile(r"^[A-Za-z0-9_-]+/part-\d{5}\.parquet$")
_LABEL_VALUES = np.array([0, 1, 255], np.uint8)

SHARD_SCHEMA = pa.schema([
    ("jpeg", pa.binary()),
    ("image_id", pa.int64()),
    ("file_name", pa.string()),
    ("labels", pa.list_(pa.uint8())),
    ("split", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
])
# JPEG bytes do not compress; everything else is small. No min/max statistics on the bytes.
_COMPRESSION = {"jpeg": "none", "image_id": "zstd", "file_name": "zstd",
                "labels.list.element": "zstd", "split": "zstd", "height": "zstd",
                "width": "zstd"}
_STATISTICS = ["image_id", "file_name", "split", "height", "width"]


# ----------------------------------------------------------------------------- file system


@dataclass(frozen=True)
class _Location:
    """A directory on a pyarrow file system."""

    fs: pafs.FileSystem
    base: str  # path inside fs, without trailing slash

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base


def _resolve(uri: str | os.PathLike) -> _Location:
    """Local path or URI (file://, s3://, gs://, hdfs://...) -> file system + base path."""
    return _Location(*storage.resolve(uri))


def _exists(loc: _Location, rel: str) -> bool:
    return loc.fs.get_file_info(loc.path(rel)).type == pafs.FileType.File


def _read_bytes(loc: _Location, rel: str) -> bytes | None:
    """Whole file, or None when it does not exist."""
    if not _exists(loc, rel):
        return None
    with loc.fs.open_input_stream(loc.path(rel)) as f:
        return f.read()


def _write_atomic(loc: _Location, rel: str, data: bytes) -> None:
    """Write to '<rel>.tmp' and move it over '<rel>' (a rename locally, copy+delete on S3).

    The temporary name is fixed, so two prepares must not write to the same out_uri at once.
    """
    final = loc.path(rel)
    parent = final.rsplit("/", 1)[0]
    if parent:
        loc.fs.create_dir(parent, recursive=True)
    tmp = final + _TMP_SUFFIX
    with loc.fs.open_output_stream(tmp) as f:
        f.write(data)
    try:
        loc.fs.move(tmp, final)
    except NotImplementedError:  # a file system without rename: copy, then delete
        loc.fs.copy_file(tmp, final)
        loc.fs.delete_file(tmp)


def _delete(loc: _Location, rel: str) -> None:
    if _exists(loc, rel):
        loc.fs.delete_file(loc.path(rel))


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode("utf-8")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- source images


def _source_size(path: str) -> int:
    """Size in bytes of a source file, -1 when it does not exist."""
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    return int(info.size) if info.type == pafs.FileType.File else -1


def _read_source(path: str) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, reason)."""
    fs, p = storage.resolve(path)
    try:
        with fs.open_input_stream(p) as f:
            return f.read(), None
    except FileNotFoundError:
        return None, "missing file"
    except OSError as err:
        return None, f"cannot read file: {err}"


def _decode(data: bytes) -> tuple[Image.Image | None, str | None]:
    """Fully decode (not just verify) with truncated-image tolerance off: (image, None) or
    (None, reason)."""
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img, None
    except UnidentifiedImageError:
        return None, "not an image file (unidentified format)"
    except Image.DecompressionBombError as err:
        return None, f"image too large: {err}"
    except Exception as err:  # untrusted input: any decoder failure is a reason to skip
        return None, f"corrupt or truncated image: {type(err).__name__}: {err}"
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited onto white; 16-bit is scaled to 8."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (
        img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        scale = 255.0 / 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 1.0
        return Image.fromarray(np.clip(arr * scale, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


@dataclass
class _Loaded:
    """Outcome of loading one source image."""

    jpeg: bytes | None = None
    height: int = 0
    width: int = 0
    converted_from: str | None = None  # "<format>/<mode>" when re-encoded
    reason: str | None = None  # why it is skipped


def _load_image(path: str, min_size: int, jpeg_quality: int) -> _Loaded:
    """Read, validate and (if needed) convert one source image to RGB JPEG bytes."""
    data, reason = _read_source(path)
    if data is None:
        return _Loaded(reason=reason)
    if not data:
        return _Loaded(reason="empty file (0 bytes)")
    img, reason = _decode(data)
    if img is None:
        return _Loaded(reason=reason)
    width, height = img.size
    if min(width, height) < min_size:
        return _Loaded(reason=f"too small: {width}x{height}, short side < min_size {min_size}")
    if img.format == "JPEG" and img.mode == "RGB":
        return _Loaded(jpeg=data, height=height, width=width)
    origin = f"{img.format}/{img.mode}"
    buf = io.BytesIO()
    try:
        _to_rgb(img).save(buf, format="JPEG", quality=jpeg_quality)
    except (ValueError, OSError) as err:  # e.g. a mode PIL cannot turn into RGB
        return _Loaded(reason=f"cannot convert {origin} to an RGB JPEG: {err}")
    return _Loaded(jpeg=buf.getvalue(), height=height, width=width, converted_from=origin)


# ----------------------------------------------------------------------------- records


def _check_settings(dataset_name: str, class_names: Sequence[str], shard_size: int,
                    min_size: int, jpeg_quality: int, row_group_size: int, workers: int) -> None:
    if not isinstance(dataset_name, str) or not dataset_name:
        raise ValueError(f"dataset_name must be a non-empty string, got {dataset_name!r}")
    if not all(isinstance(c, str) for c in class_names):
        raise ValueError(f"class_names must be strings, got {list(class_names)!r}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class_names has duplicates: {list(class_names)!r}")
    for key, value, low in (("shard_size", shard_size, 1), ("min_size", min_size, 0),
                            ("row_group_size", row_group_size, 1), ("workers", workers, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
    if not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be an integer in [1, 100], got {jpeg_quality!r}")


def _normalise_record(record: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """Validate one reader record -> plain JSON-able item (labels as a list of ints)."""
    for key in ("image_id", "file_name", "path", "labels", "split"):
        if key not in record:
            raise ValueError(f"record {record!r} has no {key!r}")
    path = str(record["path"])
    split = str(record["split"])
    if not _SPLIT_RE.match(split):
        raise ValueError(f"{path}: split name {split!r} must match {_SPLIT_RE.pattern}")
    labels = np.asarray(record["labels"])
    if labels.shape != (num_classes,):
        raise ValueError(f"{path}: labels have shape {labels.shape}, expected ({num_classes},)")
    if not np.isin(labels, _LABEL_VALUES).all():
        raise ValueError(f"{path}: labels must be 0, 1 or 255, got {labels.tolist()}")
    return {"image_id": int(record["image_id"]), "file_name": str(record["file_name"]),
            "path": path, "labels": labels.astype(np.uint8).tolist(), "split": split}


def _sorted_items(records: Iterable[dict[str, Any]], num_classes: int) -> list[dict[str, Any]]:
    items = [_normalise_record(r, num_classes) for r in records]
    items.sort(key=lambda r: (r["split"], r["image_id"], r["file_name"]))
    for a, b in zip(items, items[1:]):
        if (a["split"], a["image_id"]) == (b["split"], b["image_id"]):
            raise ValueError(f"duplicate image_id {a['image_id']} in split {a['split']!r}: "
                             f"{a['path']} and {b['path']}")
    return items


# ----------------------------------------------------------------------------- shard plan


def _plan_digest(items: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """What a shard's content depends on: records, their file sizes, and the settings."""
    payload = {
        "version": FORMAT_VERSION,
        "settings": settings,
        "records": [[r["image_id"], r["file_name"], r["labels"], _source_size(r["path"])]
                    for r in items],
    }
    return _sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())


def _plan_shards(items: list[dict[str, Any]], shard_size: int,
                 settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Sorted items -> [{"path": "{split}/part-k.parquet", "split", "records", "plan"}]."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_split.setdefault(item["split"], []).append(item)
    plans = []
    for split in sorted(by_split):
        rows = by_split[split]
        for k, start in enumerate(range(0, len(rows), shard_size)):
            chunk = rows[start:start + shard_size]
            plans.append({"path": f"{split}/part-{k:05d}.parquet", "split": split,
                          "records": chunk, "plan": _plan_digest(chunk, settings)})
    return plans


# ----------------------------------------------------------------------------- writing one shard


def _parquet_bytes(table: pa.Table, row_group_size: int) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_size, compression=_COMPRESSION,
                   write_statistics=_STATISTICS)
    return sink.getvalue().to_pybytes()


def _shard_rows(plan: dict[str, Any], settings: dict[str, Any],
                strict: bool) -> tuple[list[dict], list[dict], list[dict]]:
    """Load every record of a shard: (rows, skipped, converted)."""
    rows, skipped, converted = [], [], []
    for item in plan["records"]:
        loaded = _load_image(item["path"], settings["min_size"], settings["jpeg_quality"])
        where = {"file": item["path"], "split": item["split"], "image_id": item["image_id"],
                 "shard": plan["path"]}
        if loaded.reason is not None:
            if strict:
                raise ValueError(f"{item['path']}: {loaded.reason}")
            skipped.append({**where, "reason": loaded.reason})
            continue
        if loaded.converted_from is not None:
            converted.append({**where, "from": loaded.converted_from})
        rows.append({"jpeg": loaded.jpeg, "image_id": item["image_id"],
                     "file_name": item["file_name"], "labels": item["labels"],
                     "split": item["split"], "height": loaded.height, "width": loaded.width})
    return rows, skipped, converted


def _write_shard(plan: dict[str, Any], out_uri: str, settings: dict[str, Any],
                 strict: bool) -> dict[str, Any]:
    """Build, write (atomically) and describe one shard. Runs in a worker process too.

    Returns the shard entry {"path", "split", "num_rows", "sha256", "plan", "skipped",
    "converted"}.
    """
    rows, skipped, converted = _shard_rows(plan, settings, strict)
    meta = {"plan": plan["plan"], "skipped": skipped, "converted": converted}
    table = pa.Table.from_pylist(rows, schema=SHARD_SCHEMA).replace_schema_metadata(
        {_META_KEY: json.dumps(meta, sort_keys=True).encode()})
    data = _parquet_bytes(table, settings["row_group_size"])
    _write_atomic(_resolve(out_uri), plan["path"], data)
    return {"path": plan["path"], "split": plan["split"], "num_rows": len(rows),
            "sha256": _sha256(data), **meta}


# ----------------------------------------------------------------------------- resume


def _of_shard(listing: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    return [e for e in listing if e.get("shard") == path]


def _previous_entries(loc: _Location) -> dict[str, dict[str, Any]]:
    """Shard entries of an earlier run (manifest, then progress file on top), by path."""
    entries: dict[str, dict[str, Any]] = {}
    manifest = _load_json(loc, MANIFEST_NAME)
    if manifest is not None:
        for shard in manifest.get("shards", []):
            entries[shard["path"]] = {
                **shard,
                "skipped": _of_shard(manifest.get("skipped", []), shard["path"]),
                "converted": _of_shard(manifest.get("converted", []), shard["path"]),
            }
    progress = _load_json(loc, PROGRESS_NAME)
    if progress is not None:
        entries.update(progress.get("shards", {}))
    return entries


def _load_json(loc: _Location, rel: str) -> dict[str, Any] | None:
    """A JSON state file, or None if absent or unreadable (it is then simply not used)."""
    data = _read_bytes(loc, rel)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError:
        logger.warning("ignoring unreadable %s", loc.path(rel))
        return None
    return obj if isinstance(obj, dict) and obj.get("format") == SHARD_FORMAT else None


def _reusable(loc: _Location, plan: dict[str, Any],
              previous: dict[str, Any] | None) -> dict[str, Any] | None:
    """The entry of an already written shard that matches plan, or None if it must be written.

    A shard is reused when its file exists and either the earlier entry's plan and sha256
    match, or (no entry: interrupted between the move and the progress update) the plan
    stored in the file's own Parquet metadata matches.
    """
    data = _read_bytes(loc, plan["path"])
    if data is None:
        return None
    digest = _sha256(data)
    if previous is not None and previous.get("plan") == plan["plan"]:
        return previous if previous.get("sha256") == digest else None
    try:
        md = pq.read_metadata(io.BytesIO(data))
        meta = json.loads((md.metadata or {}).get(_META_KEY, b"{}"))
    except (pa.ArrowException, ValueError):
        return None
    if meta.get("plan") != plan["plan"]:
        return None
    return {"path": plan["path"], "split": plan["split"], "num_rows": md.num_rows,
            "sha256": digest, "plan": meta["plan"], "skipped": meta.get("skipped", []),
            "converted": meta.get("converted", [])}


def _is_leftover(rel: str, keep: set[str]) -> bool:
    """A temporary file of ours, or a shard file (our naming) that the current plan lacks."""
    if rel.endswith(_TMP_SUFFIX):
        name = rel[: -len(_TMP_SUFFIX)]
        return bool(_SHARD_RE.match(name)) or name in (MANIFEST_NAME, PROGRESS_NAME)
    return bool(_SHARD_RE.match(rel)) and rel not in keep


def _remove_leftovers(loc: _Location, keep: set[str], splits: set[str]) -> None:
    """Delete leftovers (see _is_leftover). Only the base folder and the folders of known
    splits are listed, never the whole tree under out_uri."""
    for folder in [""] + sorted(splits):
        selector = pafs.FileSelector(loc.path(folder), recursive=False, allow_not_found=True)
        for info in loc.fs.get_file_info(selector):
            rel = info.path[len(loc.base):].lstrip("/")
            if info.type == pafs.FileType.File and _is_leftover(rel, keep):
                logger.info("removing leftover %s", info.path)
                loc.fs.delete_file(info.path)
    used = {rel.split("/", 1)[0] for rel in keep}
    for split in sorted(splits - used):  # folders of dropped splits, if now empty
        info = loc.fs.get_file_info(loc.path(split))
        selector = pafs.FileSelector(loc.path(split), allow_not_found=True)
        if info.type == pafs.FileType.Directory and not loc.fs.get_file_info(selector):
            loc.fs.delete_dir(loc.path(split))


# ----------------------------------------------------------------------------- prepare


def _write_pending(pending: list[dict[str, Any]], out_uri: str, settings: dict[str, Any],
                   strict: bool, workers: int, done: dict[str, dict[str, Any]],
                   save_progress) -> None:
    """Write the pending shards (in this process or a spawn pool), recording each when done."""
    if workers <= 1 or len(pending) <= 1:
        for plan in pending:
            done[plan["path"]] = _write_shard(plan, out_uri, settings, strict)
            save_progress()
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = {pool.submit(_write_shard, plan, out_uri, settings, strict)
                   for plan in pending}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.exception() is not None:
                    for other in futures:
                        other.cancel()
                    raise future.exception()
                entry = future.result()
                done[entry["path"]] = entry
            save_progress()


def _manifest(dataset_name: str, class_names: list[str], settings: dict[str, Any],
              plans: list[dict[str, Any]], done: dict[str, dict[str, Any]],
              source: dict[str, Any] | None) -> dict[str, Any]:
    shards, skipped, converted, counts = [], [], [], {}
    for plan in plans:
        entry = done[plan["path"]]
        shards.append({k: entry[k] for k in ("path", "split", "num_rows", "sha256", "plan")})
        skipped += entry["skipped"]
        converted += entry["converted"]
        c = counts.setdefault(plan["split"], {"records": 0, "rows": 0, "skipped": 0,
                                              "converted": 0, "shards": 0})
        c["records"] += len(plan["records"])
        c["rows"] += entry["num_rows"]
        c["skipped"] += len(entry["skipped"])
        c["converted"] += len(entry["converted"])
        c["shards"] += 1
    return {
        "format": SHARD_FORMAT, "version": FORMAT_VERSION, "dataset": dataset_name,
        "class_names": list(class_names), "num_classes": len(class_names),
        "columns": {f.name: str(f.type) for f in SHARD_SCHEMA},
        "settings": {k: v for k, v in settings.items() if k != "class_names"},
        "counts": counts, "shards": shards, "skipped": skipped, "converted": converted,
        "source": source or {},
    }


def prepare_shards(records: Iterable[dict[str, Any]], class_names: Sequence[str],
                   out_uri: str | os.PathLike, *, dataset_name: str, shard_size: int = 1000,
                   min_size: int = 0, strict: bool = False, jpeg_quality: int = 95,
                   row_group_size: int = 128, workers: int = 1,
                   source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write records (any mix of splits) as Parquet shards plus manifest.json under out_uri.

    Args:
        records: dicts {"image_id", "file_name", "path", "labels" (uint8 (C,)), "split"} as
            the readers of :mod:`gaelle_ray.data.sources` return them. (split, image_id)
            must be unique; split names match [A-Za-z0-9_-]+.
        class_names: the C class names in label order (may be empty for unlabeled data).
        out_uri: local directory or pyarrow URI (file://, s3://bucket/prefix, gs://...).
        dataset_name: stored in the manifest (e.g. "coco2017").
        shard_size: records per shard (before skipping), >= 1.
        min_size: images whose short side is below this are skipped (0 = keep all).
        strict: raise ValueError naming the file instead of skipping a bad image.
        jpeg_quality: quality of re-encoded (converted) images.
        row_group_size: Parquet row-group size (rows) inside a shard.
        workers: processes that write shards in parallel (1 = this process).
        source: JSON-able description of where the records came from, stored as is.

    Returns:
        The manifest dict (also written to out_uri/manifest.json): format, version, dataset,
        class_names, num_classes, columns, settings, counts {split: {records, rows, skipped,
        converted, shards}}, shards [{path, split, num_rows, sha256, plan}], skipped
        [{file, split, image_id, shard, reason}], converted [{file, split, image_id, shard,
        from}], source.

    Raises:
        ValueError: invalid settings or records, or (strict) a bad image.
    """
    class_names = list(class_names)
    _check_settings(dataset_name, class_names, shard_size, min_size, jpeg_quality,
                    row_group_size, workers)
    items = _sorted_items(records, len(class_names))
    if not items:
        raise ValueError(f"no records to write to {os.fspath(out_uri)}")
    settings = {"shard_size": shard_size, "min_size": min_size, "jpeg_quality": jpeg_quality,
                "row_group_size": row_group_size, "class_names": class_names}
    plans = _plan_shards(items, shard_size, settings)
    out_uri = os.fspath(out_uri)
    loc = _resolve(out_uri)
    loc.fs.create_dir(loc.base, recursive=True)

    previous = _previous_entries(loc)
    done: dict[str, dict[str, Any]] = {}
    for plan in plans:
        entry = _reusable(loc, plan, previous.get(plan["path"]))
        if entry is not None:
            done[plan["path"]] = entry
    pending = [p for p in plans if p["path"] not in done]
    logger.info("%s: %d shards, %d already written, %d to write", loc.path(""), len(plans),
                len(done), len(pending))

    def save_progress() -> None:
        _write_atomic(loc, PROGRESS_NAME, _json_bytes(
            {"format": SHARD_FORMAT, "version": FORMAT_VERSION, "shards": done}))

    if pending:
        _delete(loc, MANIFEST_NAME)  # the output is incomplete until the new manifest lands
        save_progress()
        _write_pending(pending, out_uri, settings, strict, workers, done, save_progress)
    known_splits = {p["split"] for p in plans} | {e.get("split", "") for e in previous.values()}
    _remove_leftovers(loc, {p["path"] for p in plans}, known_splits - {""})
    manifest = _manifest(dataset_name, class_names, settings, plans, done, source)
    _write_atomic(loc, MANIFEST_NAME, _json_bytes(manifest))
    _delete(loc, PROGRESS_NAME)
    for split, c in manifest["counts"].items():
        logger.info("%s: %d rows in %d shards, %d skipped, %d converted", split, c["rows"],
                    c["shards"], c["skipped"], c["converted"])
    return manifest


# ----------------------------------------------------------------------------- reading back


def _folder_and_manifest(uri: str | os.PathLike) -> tuple[str, str]:
    """A shard set given as its folder or as its manifest file -> (folder, manifest name)."""
    uri = os.fspath(uri).rstrip("/")
    if uri.endswith(".json"):
        return tuple(uri.rsplit("/", 1)) if "/" in uri else (".", uri)
    return uri, MANIFEST_NAME


def _manifest_location(uri: str | os.PathLike) -> tuple[_Location, str]:
    folder, name = _folder_and_manifest(uri)
    return _resolve(folder), name


def shard_uri(uri: str | os.PathLike, rel: str) -> str:
    """Full path or URI of the file ``rel`` (a manifest "path") of the shard set at ``uri``
    (its folder or its manifest file).

    A local folder gives an absolute local path; a URI gives a URI with the same scheme
    (file:// included), which pyarrow and Ray Data's readers take as they are.
    """
    folder, _ = _folder_and_manifest(uri)
    if "://" not in folder:
        folder = os.path.abspath(folder)
    return f"{folder}/{rel}"


def read_manifest(uri: str | os.PathLike) -> dict[str, Any]:
    """Load manifest.json of a shard directory (uri: the directory or the manifest itself).

    Raises:
        FileNotFoundError: no manifest (the prepare never finished, or wrong uri).
        ValueError: the manifest is not valid JSON or not a gaelle shard manifest.
    """
    loc, name = _manifest_location(uri)
    data = _read_bytes(loc, name)
    if data is None:
        raise FileNotFoundError(f"no {name} at {loc.path(name)} (prepare not finished?)")
    try:
        manifest = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{loc.path(name)}: not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{loc.path(name)}: not a {SHARD_FORMAT} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"{loc.path(name)}: manifest version {manifest.get('version')!r}, "
                         f"this code reads version {FORMAT_VERSION}")
    return manifest


def list_shards(uri: str | os.PathLike, split: str | None = None) -> list[str]:
    """Full paths/URIs of the shards listed in the manifest, optionally of one split only.

    Local inputs give local paths; URIs give URIs with the same scheme (for Ray Data's
    read_parquet). Raises ValueError if ``split`` is not in the manifest.
    """
    manifest = read_manifest(uri)
    if split is not None and split not in manifest["counts"]:
        raise ValueError(f"split {split!r} not in {os.fspath(uri)} "
                         f"(has {sorted(manifest['counts'])})")
    return [shard_uri(uri, s["path"]) for s in manifest["shards"]
            if split is None or s["split"] == split]


def verify_shards(uri: str | os.PathLike) -> dict[str, Any]:
    """Recompute every shard's sha256 and row count against the manifest.

    Returns:
        {"shards": int, "rows": int} on success.

    Raises:
        ValueError: a shard is missing, or its checksum or row count differs; the message
            names the shard.
    """
    manifest = read_manifest(uri)
    loc, _ = _manifest_location(uri)
    rows = 0
    for shard in manifest["shards"]:
        data = _read_bytes(loc, shard["path"])
        if data is None:
            raise ValueError(f"shard {loc.path(shard['path'])} listed in the manifest is missing")
        digest = _sha256(data)
        if digest != shard["sha256"]:
            raise ValueError(f"shard {loc.path(shard['path'])}: sha256 {digest} does not match "
                             f"the manifest's {shard['sha256']}")
        num_rows = pq.read_metadata(io.BytesIO(data)).num_rows
        if num_rows != shard["num_rows"]:
            raise ValueError(f"shard {loc.path(shard['path'])}: {num_rows} rows, manifest says "
                             f"{shard['num_rows']}")
        rows += num_rows
    return {"shards": len(manifest["shards"]), "rows": rows}
