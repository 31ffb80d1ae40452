"""A command's inputs, checked on the driver before Ray starts.

A missing or wrong input (shards without a manifest or with an empty split, a checkpoint
that is not there, a storage location whose filesystem does not answer) is an `InputError`
(a ValueError) whose one-line message names the config key or option, the path, and what
to do; the CLI prints it and exits 2. Ray never starts for it, so the user does not read a
worker group's tracebacks to find the sentence that matters.

Each check only reads: a manifest, a folder listing, a file's existence.
"""

from __future__ import annotations

import os
from typing import Any

from gaelle_ray import storage

PREPARE_HINT = "make shards with `gaelle prepare {{coco,voc,folder,toy}} --out DIR` and point {key} at DIR"


class InputError(ValueError):
    """A command's input is missing or wrong; the message is the whole explanation."""


def check_shards(uri: str, key: str, split: str | None = None) -> dict[str, Any]:
    """The manifest of the shards at `uri` (config key or option `key`), and that `split`
    has images. InputError otherwise."""
    from gaelle_ray.data.shards import read_manifest

    if not uri:
        raise InputError(f"{key} is empty; {PREPARE_HINT.format(key=key)}")
    check_location(uri, key)
    try:
        manifest = read_manifest(uri)
    except FileNotFoundError:
        raise InputError(f"{key} = {uri!r}: no manifest.json there (no shards, or their prepare did not finish); "
                         f"{PREPARE_HINT.format(key=key)}") from None
    except ValueError as exc:
        raise InputError(f"{key} = {uri!r}: {exc}") from None
    if split is not None:
        counts = manifest.get("counts", {})
        rows = int((counts.get(split) or {}).get("rows", 0))
        if rows == 0:
            have = ", ".join(f"{s} ({c.get('rows', 0)} images)" for s, c in sorted(counts.items())) or "none"
            raise InputError(f"{key} = {uri!r}: split {split!r} has no images (splits: {have}); choose another "
                             "split or prepare that one")
    return manifest


def check_location(uri: str, key: str) -> None:
    """The filesystem of `uri` answers (a remote bucket is reachable and readable; a local
    path's parent folder exists or can be made). Does not require `uri` itself to exist."""
    if not storage.is_remote(uri):
        return  # a local path: its folder is made when written; a missing input is named by the caller
    try:
        import pyarrow.fs as pafs

        fs, inner = storage.resolve(uri)
        fs.get_file_info(inner)
        fs.get_file_info(pafs.FileSelector(inner.rsplit("/", 1)[0] or inner, allow_not_found=True))
    except Exception as exc:  # pyarrow raises OSError, ValueError or ArrowInvalid for a bad location
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{key} = {uri!r}: its storage does not answer ({first}); check the URI and the "
                         "credentials of this machine") from None


def check_checkpoint(path: str, key: str = "--checkpoint") -> None:
    """A checkpoint as the evaluation commands take it exists: 'random', a file, a
    checkpoint folder, or a run folder holding some."""
    if path == "random":
        return
    check_location(path, key)
    if storage.is_remote(path):
        if not storage.file_exists(path) and not storage.file_exists(storage.join(path, storage.META_FILE)) \
                and storage.latest_epoch(path) is None:
            raise InputError(f"{key} {path}: nothing there (expected a checkpoint file, an epoch_NNNNN folder or "
                             "a run folder)")
        return
    local = path.removeprefix("file://")
    if not os.path.exists(local):
        raise InputError(f"{key} {path}: no such file or folder (expected 'random', a checkpoint file, an "
                         "epoch_NNNNN folder or a run folder)")
    if os.path.isdir(local):
        try:
            storage.find_checkpoint_folder(local)
        except ValueError as exc:
            raise InputError(f"{key} {exc}") from None


def check_shard_files(config) -> None:
    """Every shard file of the pretraining split is there (one folder listing per folder):
    a shard deleted after `gaelle prepare` is named before Ray starts. InputError otherwise."""
    import pyarrow.fs as pafs

    from gaelle_ray.data.pipeline import split_shards

    missing = []
    folders: dict[str, set] = {}
    for path, _ in split_shards(config):
        folder, name = path.rsplit("/", 1)
        if folder not in folders:
            fs, inner = storage.resolve(folder)
            infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
            folders[folder] = {i.base_name for i in infos if i.type == pafs.FileType.File}
        if name not in folders[folder]:
            missing.append(path)
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(f"data.shards = {config.data.shards!r}: shard {missing[0]}{more} of split "
                         f"{config.data.split!r} is missing (deleted after `gaelle prepare`?); prepare the shards "
                         "again, or set data.bad_shard_action=skip to train without them")


def check_pretrain_inputs(config, resume: bool = False) -> None:
    """What `gaelle pretrain` reads before any worker starts: the pretraining shards and a
    split that fills at least one global batch, the online evaluation's shards, and the
    run and Ray storage locations. InputError naming the key otherwise."""
    from gaelle_ray.data.pipeline import count_rows, steps_per_epoch

    dc, tc = config.data, config.train
    check_shards(dc.shards, "data.shards", dc.split)
    if dc.bad_shard_action == "stop":  # with skip, the stream leaves them out itself (with a warning)
        check_shard_files(config)
    try:
        steps_per_epoch(config, count_rows(config), tc.num_workers)
    except (ValueError, FileNotFoundError) as exc:
        raise InputError(f"data.shards = {dc.shards!r}: {exc}") from None
    ev = config.eval
    if ev.online_every_epochs:
        key = "eval.online_data" if ev.online_data else ("eval.data" if ev.data else "data.shards")
        online = ev.online_data or ev.data or dc.shards
        check_shards(online, key, ev.online_bank_split or ev.train_split)
        check_shards(online, key, ev.online_query_split or ev.test_split)
    check_location(tc.run_dir, "train.run_dir")
    if config.ray.storage_path:
        check_location(config.ray.storage_path, "ray.storage_path")
