"""Training checkpoints: one folder per saved epoch, written by rank 0.

    epoch_00007/
      state.pt    model, optimiser, scaler, every rank's queues, iteration, RNG, history
      meta.json   epoch, iteration, world size, config (written last: a folder without it
                  is incomplete and ignored)

Ray Train uploads the folder to the run's storage and keeps the newest
`train.keep_checkpoints`; `latest_epoch` finds the newest complete one from the storage
side (the data stream starts there after a restart).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from gaelle_ray.losses.queue import resplit_queue_states

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
META_FILE = "meta.json"
PREFIX = "epoch_"


def checkpoint_name(epoch: int) -> str:
    return f"{PREFIX}{epoch:05d}"


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write state.pt then meta.json into `directory` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint folder; ValueError naming the folder when incomplete."""
    directory = Path(directory)
    meta_path, state_path = directory / META_FILE, directory / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise ValueError(f"{directory}: not a complete gaelle checkpoint (needs {STATE_FILE} and {META_FILE})")
    meta = json.loads(meta_path.read_text())
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    return state, meta


def latest_epoch(run_uri: str) -> int | None:
    """Epoch of the newest complete checkpoint under a run's storage folder (local or URI)."""
    try:
        fs, path = storage_fs(run_uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return None
    epochs = []
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
            if fs.get_file_info(f"{info.path}/{META_FILE}").type == pafs.FileType.File:
                epochs.append(int(name[len(PREFIX):]))
    return max(epochs) if epochs else None


STOP_FILE = "STOPPED.json"


def storage_fs(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) for a local path or any URI pyarrow understands (s3://, gs://, file://)."""
    if "://" in uri:
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def write_json(uri: str, name: str, payload: dict) -> None:
    """Write `name` (JSON) into the folder `uri`, local or remote."""
    fs, path = storage_fs(uri)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as out:
        out.write(json.dumps(payload).encode())


def read_json(uri: str, name: str) -> dict | None:
    """The JSON file `name` in the folder `uri`, or None when it is not there."""
    fs, path = storage_fs(uri)
    try:
        with fs.open_input_stream(f"{path}/{name}") as src:
            return json.loads(src.read().decode())
    except (FileNotFoundError, OSError):
        return None


def write_stop_reason(run_uri: str, reason: str, epoch: int, iteration: int) -> None:
    """Record why a run stopped itself (Ray's result carries only checkpointed metrics)."""
    write_json(run_uri, STOP_FILE, {"reason": reason, "epoch": epoch, "iteration": iteration})


def read_stop_reason(run_uri: str) -> dict | None:
    return read_json(run_uri, STOP_FILE)


def clear_stop_reason(run_uri: str) -> None:
    fs, path = storage_fs(run_uri)
    if fs.get_file_info(f"{path}/{STOP_FILE}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{STOP_FILE}")


def queues_for_rank(saved: list[dict | None] | None, rank: int, world_size: int, lengths: dict[str, int],
                    name: str) -> dict | None:
    """This rank's queue state from every old rank's saved queue states.

    Same world size: the rank's own queue. Different world size: re-split across the new
    ranks (resplit_queue_states), or None (start empty, with a warning) when it cannot be.
    """
    if not saved or any(s is None for s in saved):
        return None
    if len(saved) == world_size:
        return saved[rank]
    log.warning("%s: checkpoint was written by %d workers, resuming with %d: re-splitting the queue",
                name, len(saved), world_size)
    parts = resplit_queue_states(saved, world_size, lengths.get(name, 0))
    return None if parts is None else parts[rank]
