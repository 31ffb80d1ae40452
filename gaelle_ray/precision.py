"""Mixed precision and memory layout, the same on every device.

`train.precision` (and `eval.precision`) mean the same on a CPU as on a GPU: `bf16` runs
the forward under bfloat16 autocast, `fp16` under float16 autocast with a GradScaler (its
skip-and-shrink after an overflow included), `fp32` runs without autocast. The only
device-dependent choice: a CUDA card without bfloat16 support gets float16 for `bf16`.
`channels_last` likewise applies to CPU and CUDA tensors alike.
"""

from __future__ import annotations

import contextlib

import torch

from gaelle_ray.config import PRECISIONS


def autocast_dtype(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype of `precision` on `device`: None for fp32, bfloat16 for bf16
    (float16 on a CUDA card without bfloat16), float16 for fp16."""
    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def autocast(dtype: torch.dtype | None, device: str | torch.device):
    """A context running under autocast to `dtype` on `device`'s type (no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None, device: str | torch.device) -> torch.amp.GradScaler:
    """A GradScaler for `device`, enabled only for float16 (bfloat16 and float32 have the
    float32 exponent range and need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)


def to_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """x: (N, C, H, W) in channels-last memory order when asked (values unchanged)."""
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x
