"""Loading and converting GAELLE weights: strict loads, the released script's checkpoints,
and a plain torchvision backbone export.

`strict=False` silently loads nothing when key prefixes differ (method.md section 8), so
every load here is strict and a mismatch is a ValueError listing the keys.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from gaelle_ray.model.backbone import export_torchvision_state

HEAD_PREFIXES = ("projection_head.", "local_projection_head.", "prototypes.", "local_prototypes.",
                 "l2g_prototypes.")
_SHOW = 12  # keys listed per kind in an error message

# (blocks per stage, bottleneck) -> arch; wide_resnet50_2 is told apart by its width.
_LAYOUTS = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
    ((3, 8, 36, 3), True): "resnet152",
}


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
    return {"model": released_to_gaelle(state, str(path)), "epoch": raw.get("epoch"), "source": str(path),
            "recorded_heads": recorded_heads(raw)}


def recorded_heads(raw: Mapping[str, Any]) -> int | None:
    """The head-group count a checkpoint file records next to its weights: the training
    script's arguments (`args`, an argparse.Namespace or a dict) with `nmb_groups_heads`.
    The released script's own files do not save them (method.md section 9): None then."""
    args = raw.get("args") if isinstance(raw, Mapping) else None
    value = args.get("nmb_groups_heads") if isinstance(args, Mapping) else getattr(args, "nmb_groups_heads", None)
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


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


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def check_heads(state: Mapping[str, torch.Tensor], heads: int, source: str = "<checkpoint>", *,
                recorded: int | None = None, name: str = "nmb_groups_heads") -> None:
    """Refuse a head-group count H that a GaelleModel state dict contradicts (ValueError
    naming `source`, the value, `name` and the reason).

    What the weights tell about H (method.md section 2): nothing exactly. H appears in no
    parameter shape: the attention splits the d outputs of the global head into H groups of
    S = d / H maps and the C feature-map channels into H groups of C / H, and the pooled
    groups are concatenated back to C channels before the local head, so every shape is the
    same for every H. The weights only bound it: H must divide d (`prototypes.weight` is
    (K, d)) and C (`projection_head.0.weight` is (hidden, C)). For d = 128 and C = 2048
    both 4 (the published runs) and 8 (the released script's default) pass, so the caller
    must say which. A count the file records itself (`recorded`, from saved training
    arguments; see `recorded_heads`) must be the same.
    """
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"{source}: {name} = {heads!r}: the number of head groups must be an integer >= 1")
    if recorded is not None and recorded != heads:
        raise ValueError(f"{source}: {name} = {heads} contradicts the checkpoint, whose saved training arguments "
                         f"say nmb_groups_heads = {recorded}")
    limits = []
    if "prototypes.weight" in state:
        limits.append(("feat_dim d", int(state["prototypes.weight"].shape[1]), "prototypes.weight",
                       "the d attention maps are split into H groups of S = d / H"))
    if "projection_head.0.weight" in state:
        limits.append(("backbone width C", int(state["projection_head.0.weight"].shape[1]), "projection_head.0.weight",
                       "the C feature-map channels are split into H groups of C / H"))
    if not limits:
        raise ValueError(f"{source}: no prototypes.weight or projection_head.0.weight: cannot check {name} "
                         "against the weights (not a GAELLE checkpoint?)")
    for what, size, key, why in limits:
        if size % heads:
            common = math.gcd(*(s for _, s, _, _ in limits))
            raise ValueError(f"{source}: {name} = {heads} contradicts the weights: {what} = {size} (from {key}) is "
                             f"not divisible by {heads} ({why}); possible values: "
                             f"{', '.join(map(str, _divisors(common)))}")


def infer_arch(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> str:
    """The torchvision ResNet name implied by a backbone state dict (torchvision key names)."""
    blocks = []
    for stage in range(1, 5):
        indices = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = "layer1.0.conv3.weight" in state
    arch = _LAYOUTS.get((tuple(blocks), bottleneck))
    if arch is None:
        sample = ", ".join(sorted(state)[:6])
        raise ValueError(f"{source}: cannot tell the ResNet arch from the keys (blocks per stage {blocks}, "
                         f"bottleneck {bottleneck}; first keys: {sample}); pass arch explicitly")
    if arch == "resnet50" and state["layer1.0.conv1.weight"].shape[0] == 128:
        arch = "wide_resnet50_2"
    return arch


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
