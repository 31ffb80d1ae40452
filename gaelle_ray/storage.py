"""Where things are kept: storage locations and the checkpoint format.

Locations. Every path the package reads or writes may be a local path or a URI that
pyarrow understands (file://, s3://, gs://, hdfs://...). `resolve` is the one place that
turns one into a (pyarrow filesystem, path inside it) pair; `normalise` is the one place
that makes a location absolute (local paths, file:// stripped) while leaving remote URIs
alone. `read_json` / `write_json` read and write small JSON files in a folder anywhere.

Checkpoints. One folder per saved epoch, written by rank 0 of the training workers:

    <run>/epoch_00007/
      state.pt    {"worker": {"model": ..., "optimizer": ..., ...}, "queues": ..., "history": ...}
      meta.json   epoch, iteration, world size, config (written last: a folder without it
                  is incomplete and ignored)

`save_checkpoint` / `load_checkpoint` write and read one folder; `latest_epoch` finds the
newest complete one under a run's folder and `find_checkpoint_folder` searches a local run
folder at any depth; `is_checkpoint_folder` tells a checkpoint folder from a file;
`local_copy` gives a local path for a checkpoint kept remotely; `worker_model_state` takes
the model's state dict out of a loaded state.pt.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import pyarrow.fs as pafs

STATE_FILE = "state.pt"
META_FILE = "meta.json"
STATE_BYTES = "state_bytes"  # meta.json key: the size of state.pt, to tell a complete copy
CHECKPOINT_PREFIX = "epoch_"
RUN_ID_FILE = "mlflow_run.json"  # the pretraining run's MLflow id, in train.run_dir


# ----------------------------------------------------------------------------- locations


def is_remote(uri: str | os.PathLike) -> bool:
    """True for a URI on a non-local filesystem (s3://, gs://, ...); False for a local path or file://."""
    uri = os.fspath(uri)
    return "://" in uri and not uri.startswith("file://")


def normalise(uri: str | os.PathLike) -> str:
    """A remote URI unchanged; a local path (or file:// URI) as an absolute local path."""
    uri = os.fspath(uri)
    if is_remote(uri):
        return uri
    return str(Path(uri.removeprefix("file://")).resolve())


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or any URI pyarrow understands.

    Local paths become absolute; the path has no trailing slash (except the root).
    """
    uri = os.fspath(uri)
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri)
    return fs, path.rstrip("/") or "/"


def join(uri: str, name: str) -> str:
    """`name` inside the folder `uri` (local path or URI)."""
    return f"{os.fspath(uri).rstrip('/')}/{name}"


def file_exists(uri: str | os.PathLike) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def write_json(uri: str, name: str, payload: Any) -> None:
    """Write `name` (JSON) into the folder `uri`, local or remote (the folder is created).
    Written whole or not at all: into a temporary name first, then moved over `name`, so a
    reader never sees half a file, even with several writers (e.g. every worker of a run)."""
    import uuid

    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    tmp = f"{path}/.{name}.{uuid.uuid4().hex}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(payload).encode())
    fs.move(tmp, f"{path}/{name}")


def read_json(uri: str, name: str) -> Any | None:
    """The JSON file `name` in the folder `uri`, or None when it is not there."""
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(f"{path}/{name}") as src:
            return json.loads(src.read().decode())
    except (FileNotFoundError, OSError):
        return None


def delete_file(uri: str, name: str) -> None:
    """Delete `name` in the folder `uri` if it is there."""
    fs, path = resolve(uri)
    if fs.get_file_info(f"{path}/{name}").type == pafs.FileType.File:
        fs.delete_file(f"{path}/{name}")


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_name(epoch: int) -> str:
    """The folder name of epoch `epoch`'s checkpoint: epoch_00007."""
    return f"{CHECKPOINT_PREFIX}{epoch:05d}"


def save_checkpoint(directory: str | Path, state: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write state.pt then meta.json into the local folder `directory` (created). meta.json
    also records state.pt's size (`state_bytes`): a copy of the folder (Ray's upload) is
    complete only when both are there and the sizes agree (checkpoint_epochs)."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / STATE_FILE)
    meta = {**meta, STATE_BYTES: (directory / STATE_FILE).stat().st_size}
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return directory


def load_checkpoint(directory: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a local checkpoint folder; ValueError naming the folder when incomplete."""
    directory = Path(directory)
    meta_path, state_path = directory / META_FILE, directory / STATE_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise ValueError(f"{directory}: not a complete gaelle checkpoint (needs {STATE_FILE} and {META_FILE})")
    meta = read_meta_file(meta_path)
    return load_tensors_file(state_path), meta


def load_tensors_file(path: str | Path, allowed: tuple = ()) -> Any:
    """torch.load onto the CPU with weights_only=True: tensors, numbers, strings and plain
    containers only, plus the `allowed` types. Nothing in the file can run code; a file
    that holds anything else (a crafted pickle, an arbitrary object) is refused with a
    ValueError naming the file and what it holds."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        objects = [line for line in lines if "GLOBAL" in line]  # torch names the refused object this way
        if not objects:  # not a pickle torch can read at all: a corrupt or foreign file
            raise ValueError(f"{path}: cannot read checkpoint: not a torch checkpoint file "
                             f"({lines[-2] if len(lines) > 1 else type(exc).__name__})") from None
        raise ValueError(f"{path}: refused: the file holds more than tensors and plain containers, and loading "
                         f"it could run code ({objects[0]}); gaelle loads checkpoints as tensors only and never "
                         "unpickles arbitrary objects") from None


def read_meta_file(path: str | Path) -> dict[str, Any]:
    """A checkpoint's meta.json; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None


def _complete(fs: pafs.FileSystem, folder: str) -> bool:
    """meta.json reads, and state.pt is there with the size meta.json records (when it does:
    checkpoints written before it did count when both files are there)."""
    try:
        with fs.open_input_stream(f"{folder}/{META_FILE}") as src:
            meta = json.loads(src.read().decode())
        state = fs.get_file_info(f"{folder}/{STATE_FILE}")
    except (OSError, ValueError):
        return False
    if state.type != pafs.FileType.File:
        return False
    return not isinstance(meta, dict) or STATE_BYTES not in meta or state.size == meta[STATE_BYTES]


def checkpoint_epochs(run_uri: str) -> list[int]:
    """Epochs of the complete checkpoint folders directly under a run's folder, ascending
    (complete: a folder caught half uploaded, e.g. by a kill, does not count)."""
    try:
        fs, path = resolve(run_uri)
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except (OSError, ValueError):
        return []
    epochs = []
    for info in infos:
        name, digits = info.base_name, info.base_name[len(CHECKPOINT_PREFIX):]
        if info.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX) and digits.isdigit():
            if _complete(fs, info.path):
                epochs.append(int(digits))
    return sorted(epochs)


def latest_epoch(run_uri: str) -> int | None:
    """Epoch of the newest complete checkpoint under a run's folder (local or URI), or None."""
    epochs = checkpoint_epochs(run_uri)
    return epochs[-1] if epochs else None


def find_checkpoint_folder(path: str | Path) -> Path:
    """A local checkpoint folder itself, or the newest complete epoch_* folder anywhere
    under a local run folder; ValueError naming the folder when there is none."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    prefix = CHECKPOINT_PREFIX
    candidates = sorted(p for p in path.glob(f"**/{prefix}*") if p.is_dir() and (p / META_FILE).is_file()
                        and p.name[len(prefix):].isdigit())
    if not candidates:
        raise ValueError(f"{path}: no gaelle checkpoint here (an {prefix}NNNNN folder with {META_FILE}, "
                         "or a run folder holding some)")
    return max(candidates, key=lambda p: int(p.name[len(prefix):]))


def is_checkpoint_folder(path: str) -> bool:
    """True when `path` is a folder (local) or holds a meta.json (remote): a checkpoint
    folder rather than a weights file."""
    if is_remote(path):
        fs, base = resolve(path)
        return fs.get_file_info(f"{base}/{META_FILE}").type == pafs.FileType.File
    return Path(path.removeprefix("file://")).is_dir()


@contextlib.contextmanager
def local_copy(path: str, names: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local path for `path`. A remote file is copied to a temporary folder first; of a
    remote folder, the listed `names` are. ValueError when a remote `path` does not exist."""
    if not is_remote(path):
        yield Path(path.removeprefix("file://"))
        return
    fs, base = resolve(path)
    local_fs = pafs.LocalFileSystem()
    with tempfile.TemporaryDirectory(prefix="gaelle-ckpt-") as tmp:
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.NotFound:
            raise ValueError(f"{path}: checkpoint not found")
        if info.type == pafs.FileType.File:
            target = Path(tmp) / Path(base).name
            pafs.copy_files(base, str(target), source_filesystem=fs, destination_filesystem=local_fs)
            yield target
            return
        for name in names:
            src = f"{base}/{name}"
            if fs.get_file_info(src).type == pafs.FileType.File:
                pafs.copy_files(src, str(Path(tmp) / name), source_filesystem=fs, destination_filesystem=local_fs)
        yield Path(tmp)


def worker_model_state(state: Mapping[str, Any], source: str) -> Mapping[str, Any]:
    """The GaelleModel state dict inside a loaded state.pt (state["worker"]["model"]);
    ValueError naming `source` when it is not there."""
    try:
        model_state = state["worker"]["model"]
    except (KeyError, TypeError):
        keys = sorted(state)[:10] if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"{source}: no worker.model entry (keys: {keys})") from None
    if not isinstance(model_state, Mapping):
        raise ValueError(f"{source}: worker.model is a {type(model_state).__name__}, not a state dict")
    return model_state


def holds_worker_state(obj: Any) -> bool:
    """True for a loaded gaelle state.pt (a dict with worker.model)."""
    return isinstance(obj, Mapping) and isinstance(obj.get("worker"), Mapping) and "model" in obj["worker"]
