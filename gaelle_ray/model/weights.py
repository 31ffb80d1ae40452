"""Loading and converting GAELLE weights: strict loads, the released script's checkpoints,
and a plain torchvision backbone export.

`strict=False` silently loads nothing when key prefixes differ (method.md section 8), so
every load here is strict and a mismatch is a ValueError listing the keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gaelle_ray.model.backbone import export_torchvision_state

HEAD_PREFIXES = ("projection_head.", "local_projection_head.", "prototypes.", "local_prototypes.",
                 "l2g_prototypes.")
_SHOW = 12  # keys listed per kind in an error message


def _key_list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    more = f" ... and {len(keys) - _SHOW} more" if len(keys) > _SHOW else ""
    return f"{shown}{more}"


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
    """Load `state` into `module`; any missing, unexpected or mis-shaped key is a ValueError.

    The message names `source` (a file, usually) and lists the offending keys.
    """
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        parts = [f"{source}: weights do not match the model ({type(module).__name__})"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_key_list(shapes)}")
        raise ValueError("; ".join(parts))
    module.load_state_dict(state, strict=True)


def _released_allowlist() -> tuple:
    """The few non-tensor types a released SwAV/GAELLE checkpoint may hold besides tensors
    and plain containers: the training script's argparse.Namespace and numpy scalars. Each
    only holds data; unpickling it runs no code of the file's choosing."""
    import argparse

    import numpy as np

    allowed = [argparse.Namespace, np.dtype]
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 renamed numpy.core
    allowed.append(core.multiarray.scalar)
    allowed += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType") if hasattr(np, "dtypes")]
    return tuple(allowed)


def read_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file onto the CPU, tensors and plain containers only (plus the
    released checkpoints' few data-only types): no code in the file can run. Errors name
    the file."""
    from gaelle_ray.storage import load_tensors_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: checkpoint file not found")
    try:
        obj = load_tensors_file(path, _released_allowlist())
    except ValueError:
        raise
    except Exception as exc:  # torch raises many kinds for a corrupt file
        raise ValueError(f"{path}: cannot read checkpoint: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict")
    return obj


def released_to_gaelle(state: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Rename a released-script `state_dict` (method.md section 9) to GaelleModel names.

    Strips DistributedDataParallel's `module.` prefix, keeps head and prototype names, puts
    every other key under `backbone.`. A released checkpoint has no `fc`; one that does is
    refused (that is a classifier, not a GAELLE checkpoint).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key[len("module."):] if key.startswith("module.") else key
        if name.startswith("fc."):
            raise ValueError(f"{source}: key {key!r} is a classifier layer; not a GAELLE/SwAV pretraining checkpoint")
        if not name.startswith(HEAD_PREFIXES):
            name = "backbone." + name
        out[name] = value
    return out


def import_released_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint saved by the authors' released training script.

    Returns {"model": GaelleModel state dict, "epoch": int | None, "source": str}. Load it
    with `load_state_strict(model, result["model"], ...)`; the model must have been built
    with the checkpoint's sizes (K, K_l, d, hidden width), which `infer_model_sizes` reads.
    """
    raw = read_checkpoint_file(path)
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path}: no 'state_dict' mapping in the checkpoint (keys: {sorted(raw)[:10]})")
    return {"model": released_to_gaelle(state, str(path)), "epoch": raw.get("epoch"), "source": str(path)}


def infer_model_sizes(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Model sizes implied by a GaelleModel state dict: hidden_mlp, feat_dim, prototype counts."""
    sizes = {}
    if "projection_head.0.weight" in state:
        sizes["hidden_mlp"] = int(state["projection_head.0.weight"].shape[0])
    if "prototypes.weight" in state:
        sizes["nmb_prototypes"], sizes["feat_dim"] = map(int, state["prototypes.weight"].shape)
    if "local_prototypes.weight" in state:
        sizes["nmb_local_prototypes"] = int(state["local_prototypes.weight"].shape[0])
    return sizes


def backbone_state(state: Mapping[str, torch.Tensor], source: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """The `backbone.*` part of a GaelleModel state dict, with the prefix removed."""
    out = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not out:
        raise ValueError(f"{source}: no backbone.* keys in the state dict")
    return out


def export_backbone(model: nn.Module, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """The model's backbone as a torchvision ResNet state dict (zero `fc`), loadable strictly
    by `torchvision.models.<arch>()`."""
    return export_torchvision_state(model.backbone, num_classes)
