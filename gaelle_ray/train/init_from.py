"""`train.init_from`: start pretraining from existing weights instead of a random init.

The source may be
- a gaelle checkpoint folder (epoch_NNNNN/ with state.pt and meta.json), including a folder
  written by `gaelle import-released`;
- a run folder (train.run_dir, or its train/ folder): its newest complete checkpoint;
- a `.pth` file: the authors' released checkpoint (method.md section 9), a GaelleModel state
  dict (`backbone.*` keys) or a gaelle state.pt.
Local paths or URIs (s3://, gs://, ...).

Only the model's weights are taken, the whole GaelleModel state, strictly (every key, every
shape; a mismatch is a ValueError naming the file and the keys). The optimiser, the scaler,
the queues and the schedule start fresh: epoch 0, iteration 0 (so the learning-rate warm-up
and the prototype freezing run again). A run that resumes from its own checkpoint ignores
init_from: the resume wins.

`check_init_from` runs on the driver before Ray starts (a bad path or mismatching weights
fail there, once, instead of in every worker after Ray's retries); `apply_init_from` runs
in every worker, on the model as it is built.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping

import pyarrow.fs as pafs
import torch
from torch import nn

from gaelle_ray import storage
from gaelle_ray.model.weights import load_state_strict, read_checkpoint_file, recorded_heads, released_to_gaelle

log = logging.getLogger(__name__)

KEY = "train.init_from"


def _exists(path: str) -> bool:
    if storage.is_remote(path):
        fs, inner = storage.resolve(path)
        return fs.get_file_info(inner).type != pafs.FileType.NotFound
    return os.path.exists(path.removeprefix("file://"))


def _remote_folder(path: str) -> str | None:
    """The checkpoint folder a remote folder URI stands for: itself (it has meta.json), else
    the newest epoch_* directly under it or under its train/ folder; None when none."""
    if storage.is_checkpoint_folder(path):
        return path
    for run in (path, storage.join(path, "train")):
        epoch = storage.latest_epoch(run)
        if epoch is not None:
            return storage.join(run, storage.checkpoint_name(epoch))
    return None


def _state_from_file_dict(obj: Mapping[str, Any], source: str) -> tuple[Mapping[str, torch.Tensor], int | None]:
    """(GaelleModel state dict, recorded head groups) from the dict inside a .pth/.pt file."""
    if storage.holds_worker_state(obj):
        return storage.worker_model_state(obj, source), None
    inner = obj.get("state_dict", obj)
    if not isinstance(inner, Mapping) or not inner or not all(isinstance(k, str) for k in inner):
        raise ValueError(f"{source}: no model state dict in the file (keys: {sorted(map(str, obj))[:10]})")
    if any(k.startswith("module.") for k in inner):
        return released_to_gaelle(inner, source), recorded_heads(obj)
    return inner, recorded_heads(obj)


def read_init_state(path: str) -> dict[str, Any]:
    """The GaelleModel weights `path` holds (see the module docstring for what it may be).

    Returns {"model": state dict, "source": the file or folder read, "config": the model
    section of its meta.json config (folders) or None, "recorded_heads": H the file records,
    or None}. ValueError when there is nothing to read (the caller names the key).
    """
    if not _exists(path):
        raise ValueError("no such file or folder")
    if storage.is_remote(path):
        folder = _remote_folder(path)
        if folder is None and storage.file_exists(path):
            with storage.local_copy(path) as local:
                obj = read_checkpoint_file(local)
            state, heads = _state_from_file_dict(obj, path)
            return {"model": state, "source": path, "config": None, "recorded_heads": heads}
        if folder is None:
            raise ValueError(f"no gaelle checkpoint here (an epoch_NNNNN folder with {storage.META_FILE}, or a run "
                             "folder holding some)")
        with storage.local_copy(folder, (storage.STATE_FILE, storage.META_FILE)) as local:
            return _from_local_folder(local, folder)
    local = path.removeprefix("file://")
    if os.path.isdir(local):
        return _from_local_folder(storage.find_checkpoint_folder(local), None)
    state, heads = _state_from_file_dict(read_checkpoint_file(local), path)
    return {"model": state, "source": path, "config": None, "recorded_heads": heads}


def _from_local_folder(folder, name: str | None) -> dict[str, Any]:
    """Weights and model config of a local checkpoint folder (`name`: the URI it was copied from)."""
    state, meta = storage.load_checkpoint(folder)
    source = f"{name or folder}/{storage.STATE_FILE}"
    model_config = (meta.get("config") or {}).get("model")
    return {"model": storage.worker_model_state(state, source), "source": source, "config": model_config,
            "recorded_heads": None}


def load_init_weights(model: nn.Module, config) -> str:
    """Load `config.train.init_from` into `model` (a GaelleModel, unwrapped), strictly.

    The head-group count of the source, when it records one (a folder's config, a file's
    saved arguments), must be the run's model.nmb_groups_heads: H leaves no trace in the
    shapes, so a strict load alone would not notice. Returns the source read.
    """
    path = config.train.init_from
    try:
        found = read_init_state(path)
    except ValueError as exc:
        raise ValueError(f"{KEY} = {path!r}: {exc}") from None
    source = found["source"]
    heads = config.model.nmb_groups_heads
    theirs = (found["config"] or {}).get("nmb_groups_heads", found["recorded_heads"])
    if theirs is not None and int(theirs) != heads:
        raise ValueError(f"{KEY} = {path!r}: {source} was trained with nmb_groups_heads = {theirs}, this run has "
                         f"model.nmb_groups_heads = {heads}; set it to {theirs} (the weights' shapes are the same "
                         "for any H, so they would load, but the attention would group the maps differently)")
    try:
        load_state_strict(model, found["model"], source)
    except ValueError as exc:
        raise ValueError(f"{KEY} = {path!r}: {exc} (init_from needs a model of the same arch and sizes: "
                         "model.arch, hidden_mlp, feat_dim, nmb_prototypes, nmb_local_prototypes)") from None
    return source


def check_init_from(config, resuming: bool = False) -> None:
    """On the driver, before Ray starts: the init_from path exists and its weights load into
    the model this config builds (ValueError naming the key and the path otherwise). When
    the run resumes from its own checkpoint, init_from is ignored, and a warning says so."""
    path = config.train.init_from
    if not path:
        return
    if resuming:
        log.warning("%s = %s is ignored: the run resumes from its own newest checkpoint (resume wins)", KEY, path)
        return
    from gaelle_ray.model import build_model

    source = load_init_weights(build_model(config), config)
    log.info("%s: pretraining starts from the weights of %s (new optimiser and schedule)", KEY, source)


def apply_init_from(model: nn.Module, config, resuming: bool, say: Callable[[str], None] | None = None) -> str | None:
    """In a training worker, on the model as built (before the first step): load
    train.init_from unless the run resumes from its own checkpoint (`resuming`). `say` (rank
    0's progress line) reports what happened. Returns the source loaded, or None."""
    path = config.train.init_from
    if not path:
        return None
    if resuming:
        if say is not None:
            say(f"{KEY} = {path} ignored: resuming from the run's own checkpoint")
        return None
    source = load_init_weights(model, config)
    if say is not None:
        say(f"initialised from {source} ({KEY}); new optimiser and schedule: epoch 0, iteration 0")
    return source
