"""`gaelle import-released`: the authors' released checkpoint as one of our checkpoint folders.

A released `.pth` (method.md section 9) holds the weights and the epoch, not the settings
they were trained with. Everything but the head-group count H is read from the weights:

- arch: from the backbone's blocks per stage (`infer_arch`), or given and then checked;
- hidden width, d, K, K_l: from the head and prototype shapes (`infer_model_sizes`);
- H: not in any shape (see `weights.check_heads`); the caller gives it (the released
  script's default is 8, the published runs used 4) and it is refused when the weights
  contradict it (H must divide d and the backbone width C).

The folder written is the format pretraining writes (storage.py): `state.pt` with
{"worker": {"model": GaelleModel state dict}} and `meta.json` with the epoch and the config
the model is rebuilt from, plus an "imported" entry saying where the weights came from (the
evaluation's leakage guard reads it: the pretraining data of a released file is unknown).
It holds no optimiser, queues or history: it is a starting point (linear-eval, semisup,
show-attention, `train.init_from`), not a run to resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gaelle_ray import storage
from gaelle_ray.config import Config
from gaelle_ray.model.gaelle import build_model
from gaelle_ray.model.weights import (
    backbone_state, check_heads, import_released_checkpoint, infer_arch, infer_model_sizes, load_state_strict,
)

# what makes a state dict GAELLE rather than SwAV (which has only the global head and prototypes)
GAELLE_KEYS = ("projection_head.0.weight", "prototypes.weight", "local_projection_head.0.weight",
               "local_prototypes.weight", "l2g_prototypes.weight")


def released_config(state: dict[str, Any], heads: int, arch: str | None = None, source: str = "<checkpoint>", *,
                    recorded_heads: int | None = None) -> Config:
    """The Config that rebuilds the model of a (renamed) released state dict: arch and sizes
    from the weights, H = `heads` (checked against them), every other key the default.
    ValueError naming `source` when the weights are not GAELLE's or contradict arch / heads."""
    missing = [k for k in GAELLE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{source}: not a GAELLE checkpoint: no {', '.join(missing)} (a SwAV checkpoint has no "
                         "local branch; linear-eval and semisup read its backbone directly)")
    found = infer_arch(backbone_state(state, source), source)
    if arch and arch != found:
        raise ValueError(f"{source}: --arch {arch} contradicts the weights, whose backbone is a {found}")
    check_heads(state, heads, source, recorded=recorded_heads, name="--heads")
    raw = {"model": {"arch": found, "nmb_groups_heads": heads, **infer_model_sizes(state)}}
    return Config.from_dict(raw, source=source)


def import_released(path: str | os.PathLike, heads: int, out: str | os.PathLike,
                    arch: str | None = None) -> dict[str, Any]:
    """Write the released checkpoint `path` as a gaelle checkpoint folder `out` (local,
    created; refused when it exists and is not empty).

    The file is read with the safe loader (weights_only, read_checkpoint_file); the model is
    rebuilt from `released_config` and every weight loads strictly before anything is
    written. Returns {"folder": Path, "config": Config, "epoch": the file's epoch or None}.
    """
    source = os.fspath(path)
    out_path = Path(os.fspath(out))
    if storage.is_remote(os.fspath(out)):
        raise ValueError(f"--out {out}: import-released writes a local folder (copy it to remote storage after)")
    if out_path.exists() and (not out_path.is_dir() or any(out_path.iterdir())):
        raise ValueError(f"--out {out_path}: already exists and is not an empty folder; choose a new folder")
    released = import_released_checkpoint(path)
    state = released["model"]
    config = released_config(state, heads, arch, source, recorded_heads=released["recorded_heads"])
    model = build_model(config)
    load_state_strict(model, state, source)
    epoch = released["epoch"]
    epoch = int(epoch) if isinstance(epoch, (int, float)) and not isinstance(epoch, bool) else None
    meta = {"epoch": epoch, "config": config.to_dict(),
            "imported": {"source": storage.normalise(source), "format": "released GAELLE script (method.md section 9)",
                         "epoch": epoch, "nmb_groups_heads": heads,
                         "note": "nmb_groups_heads was given to import-released; the weights do not record it"}}
    weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    storage.save_checkpoint(out_path, {"worker": {"model": weights}}, meta)
    return {"folder": out_path.resolve(), "config": config, "epoch": epoch}
