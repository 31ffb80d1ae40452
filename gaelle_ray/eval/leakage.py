"""Leakage guard: the evaluation test images must not be among the pretraining images.

COCO train2017 holds most of val2014 (method.md section 7), so "pretrain on train2017,
linear-probe on val2014" silently measures images the backbone has seen. `check_overlap`
compares the evaluation test split with the pretraining split(s) two ways:

- image ids, when both shard sets come from the same dataset family (the manifest's
  "dataset" less its trailing digits: coco2014 and coco2017 are both "coco", whose image
  ids are shared between the 2014 and 2017 splits); ids of unrelated datasets (VOC vs
  COCO) mean nothing to each other and are not compared. Toy sets are the exception
  within a family: their ids number the images of one generated set (train 1..n_train,
  val after), so two toy sets of different sizes give different pictures the same id, and
  toy sets are compared by content only (a picture drawn twice has the same bytes);
- content: sha1 of the stored JPEG bytes (`gaelle prepare` keeps a source's own bytes when
  it is an RGB JPEG, so the same file gives the same hash under any name or id).

An image matched either way counts once. Pretraining hashes can be cached per shard
(keyed by the shard's sha256 in the manifest), as reading COCO train2017 once takes time.

`leakage_guard` is the check as the evaluation entry points run it: against the
pretraining data that a checkpoint records in its config, returning the run's tags.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from gaelle_ray import storage
from gaelle_ray.data.shards import list_shards, read_manifest
from gaelle_ray.eval.checkpoints import RANDOM, pretraining_data_of

log = logging.getLogger(__name__)

_SHOW = 5


# families whose image ids only number the images of one generated set
_IDS_PER_SET = frozenset({"toy"})


def dataset_family(name: str) -> str:
    """'coco2017' -> 'coco', 'voc2007' -> 'voc', 'toy' -> 'toy'."""
    return re.sub(r"[\d_-]+$", "", name.strip().lower())


def ids_comparable(pretrain_dataset: str, eval_dataset: str) -> bool:
    """Whether image ids of the two shard sets name the same pictures: the same family, and
    not one whose ids are per generated set (toy)."""
    family = dataset_family(pretrain_dataset)
    return family == dataset_family(eval_dataset) and family not in _IDS_PER_SET


def _shard_hashes(path: str, sha256: str, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """(image ids (n,) int64, sha1 digests (n,) as 'S20' bytes) of one shard."""
    cached = cache_dir / f"hashes-{sha256}.npz" if cache_dir is not None and sha256 else None
    if cached is not None and cached.is_file():
        with np.load(cached) as z:
            return z["ids"], z["sha1"]
    fs, local = storage.resolve(path)
    ids, digests = [], []
    with fs.open_input_file(local) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=256, columns=["image_id", "jpeg"]):
            ids.append(batch.column(0).to_numpy())
            digests.extend(hashlib.sha1(b).digest() for b in batch.column(1).to_pylist())
    out = (np.concatenate(ids).astype(np.int64) if ids else np.zeros(0, np.int64),
           np.asarray(digests, dtype="S20"))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, ids=out[0], sha1=out[1])
        os.replace(tmp, cached)
    return out


def split_hashes(uri: str, splits: Sequence[str], cache_dir: str | os.PathLike | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(image ids (N,), sha1 digests (N,) 'S20') of every image of `splits` of a shard set."""
    manifest = read_manifest(uri)
    ids, digests = [np.zeros(0, np.int64)], [np.zeros(0, "S20")]
    cache = Path(cache_dir) if cache_dir is not None else None
    for split in splits:
        entries = [s for s in manifest["shards"] if s["split"] == split]
        for path, entry in zip(list_shards(uri, split), entries):
            i, d = _shard_hashes(path, entry.get("sha256", ""), cache)
            ids.append(i)
            digests.append(d)
    return np.concatenate(ids), np.concatenate(digests)


def overlap_report(pretrain_shards_uri: str, eval_shards_uri: str, eval_split: str,
                   pretrain_splits: Sequence[str] | None = None,
                   cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """How many images of the evaluation test split are in the pretraining data.

    pretrain_splits: the split(s) pretraining read (None = every split of that manifest,
    the conservative choice when it is unknown).

    Returns {"overlap": n, "by_id": n_id, "by_content": n_hash, "eval_images": N,
    "ids_compared": bool, "examples": first few overlapping eval image ids,
    "pretrain_splits": [...]}.
    """
    pre_manifest = read_manifest(pretrain_shards_uri)
    eval_manifest = read_manifest(eval_shards_uri)
    if pretrain_splits is None:
        pretrain_splits = sorted(pre_manifest["counts"])
    pretrain_splits = list(pretrain_splits)
    pre_ids, pre_hash = split_hashes(pretrain_shards_uri, pretrain_splits, cache_dir)
    ev_ids, ev_hash = split_hashes(eval_shards_uri, [eval_split], cache_dir)
    ids_compared = ids_comparable(pre_manifest.get("dataset", ""), eval_manifest.get("dataset", ""))
    by_id = np.isin(ev_ids, pre_ids) if ids_compared else np.zeros(len(ev_ids), bool)  # (N_eval,)
    by_content = np.isin(ev_hash, pre_hash)  # (N_eval,)
    hit = by_id | by_content
    if not ids_compared:
        log.info("leakage check: image ids of %r and %r do not name the same pictures, not compared "
                 "(content hashes are)",
                 pre_manifest.get("dataset"), eval_manifest.get("dataset"))
    return {"overlap": int(hit.sum()), "by_id": int(by_id.sum()), "by_content": int(by_content.sum()),
            "eval_images": int(len(ev_ids)), "ids_compared": ids_compared,
            "examples": [int(i) for i in np.sort(ev_ids[hit])[:_SHOW]], "pretrain_splits": pretrain_splits}


def check_overlap(pretrain_shards_uri: str, eval_shards_uri: str, eval_split: str, allow_overlap: bool,
                  *, pretrain_splits: Sequence[str] | None = None,
                  cache_dir: str | os.PathLike | None = None) -> int:
    """Refuse an evaluation whose test images were pretrained on.

    Compares image ids and JPEG sha1 of `eval_split` of `eval_shards_uri` with the
    pretraining split(s) of `pretrain_shards_uri` (see the module docstring).

    Returns the number of overlapping evaluation images (0 when clean). Raises ValueError
    naming the count and a few image ids when there is overlap and `allow_overlap` is
    false; with `allow_overlap` it logs a warning and returns the count, for the caller to
    tag the MLflow run.
    """
    r = overlap_report(pretrain_shards_uri, eval_shards_uri, eval_split, pretrain_splits, cache_dir)
    if r["overlap"] == 0:
        log.info("leakage check: none of the %d %s images of %s is in the pretraining data (%s, %s)",
                 r["eval_images"], eval_split, eval_shards_uri, pretrain_shards_uri, ", ".join(r["pretrain_splits"]))
        return 0
    message = (f"leakage: {r['overlap']} of the {r['eval_images']} {eval_split!r} images of {eval_shards_uri} "
               f"are in the pretraining data {pretrain_shards_uri} (split {', '.join(r['pretrain_splits'])}): "
               f"{r['by_id']} by image id, {r['by_content']} by JPEG content; e.g. image ids {r['examples']}")
    if not allow_overlap:
        raise ValueError(message + ". Evaluate on a split the backbone was not pretrained on, or pass "
                         "--allow-overlap (eval.allow_overlap) to run anyway; the run is then tagged.")
    log.warning("%s; evaluating anyway (allow_overlap): the mAP is NOT a clean held-out result", message)
    return r["overlap"]


def leakage_guard(checkpoint: str, data_uri: str, test_split: str, allow_overlap: bool,
                  cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run check_overlap against the checkpoint's pretraining data when the checkpoint
    records it. Returns tags: {"leakage_check": "clean" | "overlap" | "unknown" | "random init",
    "leakage_overlap": n}. A random backbone saw no data: nothing to check, nothing to say."""
    if checkpoint == RANDOM:
        return {"leakage_check": "random init", "leakage_overlap": 0}
    pre = pretraining_data_of(checkpoint)
    if pre is None:
        log.warning("leakage check skipped: %s does not record its pretraining data (not a gaelle checkpoint "
                    "folder); make sure it was not pretrained on the %r images of %s", checkpoint, test_split, data_uri)
        return {"leakage_check": "unknown"}
    try:
        n = check_overlap(pre["shards"], data_uri, test_split, allow_overlap, pretrain_splits=[pre["split"]],
                          cache_dir=cache_dir)
    except FileNotFoundError as exc:
        msg = (f"leakage check: cannot read the pretraining shards {pre['shards']!r} recorded in {checkpoint} "
               f"({exc})")
        if not allow_overlap:
            raise ValueError(msg + "; make them reachable, or pass --allow-overlap to evaluate unchecked") from None
        log.warning("%s; evaluating unchecked (allow_overlap)", msg)
        return {"leakage_check": "unknown"}
    return {"leakage_check": "overlap" if n else "clean", "leakage_overlap": n}
