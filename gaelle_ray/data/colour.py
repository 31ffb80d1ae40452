"""`ColourAugment`: the colour half of the augmentation as one callable, on any device.

It draws every crop's parameters from its own seeded CPU generator
(:func:`~gaelle_ray.data.colour_ops.sample_colour_params`) and runs them either through the
batched ops of :mod:`gaelle_ray.data.colour_ops` (any device, any compute dtype) or through
:mod:`gaelle_ray.data.colour_cpu` (the same function laid out for one CPU core, which is
what a Ray Data task or a CPU training worker wants). The two give the same result within
float32 rounding (tested).
"""

from __future__ import annotations

import torch

from gaelle_ray.config import AugmentationConfig
from gaelle_ray.data.colour_cpu import apply_colour_cpu
from gaelle_ray.data.colour_ops import ColourParams, apply_colour, sample_colour_params

__all__ = ["ColourAugment"]


class ColourAugment:
    """Callable colour half of the augmentation, with its own seeded CPU generator.

    ``crops``: (..., 3, H, W) uint8 (or float in [0, 1]) on any device, e.g. one resolution
    of a multi-crop batch (B, n_r, 3, S, S). Returns normalised crops of the same shape in
    ``out_dtype`` on ``device`` (the input's device when None); every crop gets its own
    parameters, drawn with the settings ``cfg`` (``config.augmentation``; method.md's when
    None). The arithmetic runs in ``compute_dtype`` (float32 by default; float16 or
    bfloat16 halve memory traffic on GPUs at a precision cost).

    ``backend``: ``"auto"`` (default) runs :func:`~gaelle_ray.data.colour_cpu.apply_colour_cpu`
    (same function, laid out for one CPU core, faster there) when the crops are on the CPU
    and ``compute_dtype`` is float32, else the batched
    :func:`~gaelle_ray.data.colour_ops.apply_colour`; ``"batched"`` always runs the batched
    ops; ``"cpu"`` always runs the CPU path.
    """

    def __init__(self, cfg: AugmentationConfig | None = None, seed: int = 0,
                 device: torch.device | str | None = None,
                 out_dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.float32, backend: str = "auto") -> None:
        for name, dt in (("out_dtype", out_dtype), ("compute_dtype", compute_dtype)):
            if not dt.is_floating_point:
                raise ValueError(f"ColourAugment.{name} must be a floating dtype, got {dt}")
        if backend not in ("auto", "batched", "cpu"):
            raise ValueError(f"ColourAugment.backend must be 'auto', 'batched' or 'cpu', "
                             f"got {backend!r}")
        if backend == "cpu" and compute_dtype != torch.float32:
            raise ValueError("ColourAugment.backend='cpu' computes in float32")
        self.backend = backend
        self.cfg = AugmentationConfig() if cfg is None else cfg
        self.device = None if device is None else torch.device(device)
        self.out_dtype = out_dtype
        self.compute_dtype = compute_dtype
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))

    def sample(self, n: int) -> ColourParams:
        """Parameters for ``n`` crops, on CPU (see :func:`sample_colour_params`)."""
        return sample_colour_params(n, self.generator, None, self.cfg)

    def __call__(self, crops: torch.Tensor, params: ColourParams | None = None) -> torch.Tensor:
        """crops: (..., 3, H, W) -> normalised (..., 3, H, W) in ``out_dtype``.

        ``params``: parameters for the prod(...) crops in row-major order (drawn from this
        object's generator when None).
        """
        if crops.ndim < 4 or crops.shape[-3] != 3:
            raise ValueError(f"expected crops of shape (..., 3, H, W), got {tuple(crops.shape)}")
        lead, (c, h, w) = crops.shape[:-3], crops.shape[-3:]
        if self.device is not None:
            crops = crops.to(self.device, non_blocking=True)
        flat = crops.reshape(-1, c, h, w)  # (N, 3, H, W), N = prod(leading dims)
        params = self.sample(flat.shape[0]) if params is None else params
        if self._cpu_path(flat):
            out = apply_colour_cpu(flat, params, self.cfg, self.out_dtype)
        else:
            out = apply_colour(flat, params, self.cfg, self.compute_dtype).to(self.out_dtype)
        return out.view(*lead, c, h, w)  # (..., 3, H, W)

    def _cpu_path(self, crops: torch.Tensor) -> bool:
        if self.backend == "cpu":
            return True
        return (self.backend == "auto" and crops.device.type == "cpu"
                and self.compute_dtype == torch.float32)

    def state_dict(self) -> dict:
        """RNG state, for checkpoints."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
