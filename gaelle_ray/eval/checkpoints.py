"""Backbones for evaluation, from every kind of checkpoint people hand us.

`load_backbone(path_or_dir, arch)` returns a torchvision ResNet with `fc = Identity` (and
`num_features`) whose every weight came from the checkpoint. Accepted:

- "random": a randomly initialised backbone (baselines); `arch` is required.
- a gaelle checkpoint folder (state.pt + meta.json, what `gaelle pretrain` and
  `gaelle import-released` write, local or a pyarrow URI); the arch comes from meta.json's
  config when not given.
- a `.pth`/`.pt` file holding
  - a torchvision ResNet state dict (`conv1.weight`, ..., `fc.*`; `fc` is dropped), as
    `gaelle export` and the pretraining run's backbone artifact write it;
  - the authors' released GAELLE / SwAV checkpoint (keys prefixed `module.`, optionally
    under "state_dict"), read as `gaelle_ray.model.weights.import_released_checkpoint` does;
  - a GaelleModel state dict (`backbone.*` keys) or a gaelle state.pt (`worker.model`).
  The arch is inferred from the layer shapes when not given.

Loading is strict (method.md section 8): every backbone key must be present with the right
shape, and nothing else may be left over, or the load is a ValueError naming the file and
the keys. There is no path that silently returns a random backbone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gaelle_ray import storage
from gaelle_ray.model.backbone import build_backbone
from gaelle_ray.model.weights import (
    backbone_state, infer_arch, load_state_strict, read_checkpoint_file, released_to_gaelle,
)

log = logging.getLogger(__name__)

RANDOM = "random"



# ----------------------------------------------------------------------------- meta.json


def _meta_in(folder: Path, checkpoint: str) -> dict[str, Any]:
    """The meta.json in `folder`, the local copy of the checkpoint folder `checkpoint`;
    ValueError naming the checkpoint when it is missing or not valid JSON."""
    meta_path = folder / storage.META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{checkpoint}: folder is not a gaelle checkpoint (no {storage.META_FILE})")
    try:
        return storage.read_meta_file(meta_path)
    except ValueError as exc:
        if not storage.is_remote(checkpoint):
            raise
        raise ValueError(f"{checkpoint}: {exc}") from None  # exc names the temporary local copy


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """meta.json of a gaelle checkpoint folder, or None for any other kind of checkpoint."""
    checkpoint = os.fspath(checkpoint)
    if checkpoint == RANDOM or not storage.is_checkpoint_folder(checkpoint):
        return None
    with storage.local_copy(checkpoint, (storage.META_FILE,)) as folder:
        return _meta_in(folder, checkpoint)


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """What a user may name as a checkpoint, as the loaders take it: a local run folder (or
    any folder holding epoch_NNNNN checkpoints) becomes its newest complete checkpoint;
    'random', files, checkpoint folders and URIs are returned unchanged."""
    checkpoint = os.fspath(checkpoint)
    if checkpoint == RANDOM or storage.is_remote(checkpoint) or not os.path.isdir(checkpoint):
        return checkpoint
    return str(storage.find_checkpoint_folder(checkpoint))  # itself when it holds meta.json


# ----------------------------------------------------------------------------- reading


def _state_from_file(obj: Mapping[str, Any], source: str) -> tuple[dict[str, torch.Tensor], str, Any]:
    """(backbone state with torchvision names, kind, epoch) from the dict inside a file."""
    if storage.holds_worker_state(obj):
        return backbone_state(storage.worker_model_state(obj, source), source), "gaelle_state_file", None
    inner = obj.get("state_dict", obj)
    if not isinstance(inner, Mapping) or not inner:
        raise ValueError(f"{source}: no state dict in the checkpoint (keys: {sorted(obj)[:10]})")
    keys = [k for k in inner if isinstance(k, str)]
    if len(keys) != len(inner) or not all(torch.is_tensor(v) for v in inner.values()):
        raise ValueError(f"{source}: not a state dict of tensors (keys: {sorted(map(str, inner))[:10]})")
    if any(k.startswith("module.") for k in keys):
        gaelle = released_to_gaelle(inner, source)
        return backbone_state(gaelle, source), "released", obj.get("epoch")
    if any(k.startswith("backbone.") for k in keys):
        return backbone_state(inner, source), "gaelle_model_state", obj.get("epoch")
    state = {k: v for k, v in inner.items() if not k.startswith("fc.")}
    return state, "torchvision", None


def _state_from_folder(path: str, arch: str | None) -> tuple[dict[str, torch.Tensor], str, dict]:
    state_file, meta_file = storage.STATE_FILE, storage.META_FILE
    with storage.local_copy(path, (state_file, meta_file)) as folder:
        if not (folder / meta_file).is_file() or not (folder / state_file).is_file():
            raise ValueError(f"{path}: not a complete gaelle checkpoint folder (needs {state_file} and {meta_file})")
        meta = _meta_in(folder, path)
        raw = read_checkpoint_file(folder / state_file)
    source = f"{path}/{state_file}"
    model_state = storage.worker_model_state(raw, source)
    meta_arch = (meta.get("config") or {}).get("model", {}).get("arch")
    if arch and meta_arch and arch != meta_arch:
        raise ValueError(f"{path}: arch {arch!r} was asked for, but the checkpoint's config says "
                         f"model.arch = {meta_arch!r}")
    return backbone_state(model_state, source), meta_arch or "", meta


def load_backbone_info(path_or_dir: str | os.PathLike, arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Like `load_backbone`, also returning {"kind", "arch", "source", "epoch"}.

    kind: "random", "folder", "torchvision", "released", "gaelle_model_state" or
    "gaelle_state_file".
    """
    path = os.fspath(path_or_dir)
    if path == RANDOM:
        if not arch:
            raise ValueError("checkpoint 'random' needs an arch (e.g. resnet50)")
        return build_backbone(arch), {"kind": RANDOM, "arch": arch, "source": RANDOM, "epoch": None}
    if storage.is_checkpoint_folder(path):
        state, meta_arch, meta = _state_from_folder(path, arch)
        kind, epoch, source = "folder", meta.get("epoch"), f"{path}/{storage.STATE_FILE}"
        arch = arch or meta_arch or infer_arch(state, source)
    else:
        with storage.local_copy(path) as local:
            if not local.is_file():
                raise ValueError(f"{path}: checkpoint not found (expected 'random', a checkpoint folder or a .pth file)")
            obj = read_checkpoint_file(local)
        source = path
        state, kind, epoch = _state_from_file(obj, source)
        arch = arch or infer_arch(state, source)
    backbone = build_backbone(arch)
    load_state_strict(backbone, state, source)
    log.info("loaded %s backbone from %s (%s%s)", arch, path, kind, f", epoch {epoch}" if epoch is not None else "")
    return backbone, {"kind": kind, "arch": arch, "source": path, "epoch": epoch}


def load_backbone(path_or_dir: str | os.PathLike, arch: str | None = None) -> nn.Module:
    """A torchvision ResNet (fc = Identity, attribute `num_features`) with the checkpoint's
    backbone weights, every key loaded strictly.

    path_or_dir: "random", a gaelle checkpoint folder, or a .pth file (see the module
    docstring). arch: ResNet name; needed for "random", checked against a folder's config,
    inferred from a file's keys when None.

    Raises ValueError naming the file and the missing / unexpected / mis-shaped keys when
    the checkpoint's backbone does not load completely.
    """
    return load_backbone_info(path_or_dir, arch)[0]


# ----------------------------------------------------------------------------- provenance


def pretraining_data_of(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    """{"shards": URI, "split": name, "max_images": int} the checkpoint was pretrained on, from
    the `data` section of its meta.json config; None for checkpoints that do not say
    (released files, torchvision exports, "random", and folders `gaelle import-released`
    wrote: their meta.json has an "imported" entry and a config whose data section is the
    default, not what the weights were pretrained on)."""
    meta = read_meta(checkpoint)
    if meta is None or meta.get("imported"):
        return None
    data = (meta.get("config") or {}).get("data")
    if not data or not data.get("shards"):
        raise ValueError(f"{os.fspath(checkpoint)}/{storage.META_FILE}: config has no data.shards")
    return {"shards": data["shards"], "split": data.get("split", "train"), "max_images": data.get("max_images", 0)}


def pretraining_manifest_of(checkpoint: str | os.PathLike) -> str | None:
    """The shards URI (config data.shards) the checkpoint was pretrained on, or None when the
    checkpoint does not record it. Used by the leakage guard."""
    data = pretraining_data_of(checkpoint)
    return None if data is None else data["shards"]


def pretraining_run_id_of(checkpoint: str | os.PathLike) -> str | None:
    """The MLflow run id of the pretraining run that wrote a checkpoint folder, when the
    folder sits where `gaelle pretrain` puts it (<run_dir>/train/epoch_NNNNN, with
    <run_dir>/mlflow_run.json); else None."""
    path = os.fspath(checkpoint)
    if path == RANDOM or storage.is_remote(path):
        return None
    folder = Path(storage.normalise(path))
    if not folder.is_dir():
        return None
    run_dir = str(folder.parent.parent)
    try:
        payload = storage.read_json(run_dir, storage.RUN_ID_FILE)
    except ValueError:
        log.warning("%s: not valid JSON; pretraining run id unknown", storage.join(run_dir, storage.RUN_ID_FILE))
        return None
    return (payload or {}).get("run_id") or None
