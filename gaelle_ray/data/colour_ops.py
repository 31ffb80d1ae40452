"""The colour half of the multi-crop augmentation (method.md section 1) as batched tensor ops.

Per crop, independently: colour jitter (brightness, contrast, saturation, hue in a random
order) with probability ``jitter_p``, grayscale with ``grayscale_p``, Gaussian blur with
``blur_p``, then normalisation. The settings are those of
:class:`gaelle_ray.config.AugmentationConfig` (its defaults are method.md's).

:class:`ColourParams` holds one random parameter set per crop, drawn by
:func:`sample_colour_params`. Every op works on a whole batch (N, 3, H, W) with one
parameter per sample and no Python loop over samples. The random jitter order is applied in
four steps: at step ``s`` each sample applies the op at position ``s`` of its own
permutation; every op runs only on the samples that need it at that step (index, compute,
scatter back: :func:`apply_on_subset`), so the total work is that of applying each op once
per sample. Each op equals the torchvision tensor op (``torchvision.transforms.v2.functional``)
on a single float image with the same parameter.

Parameters are drawn on a CPU ``torch.Generator``, so computing the subsets needs no device
synchronisation even when the images live on a GPU. :mod:`gaelle_ray.data.colour_cpu` lays
the same function out for one CPU core; :class:`gaelle_ray.data.colour.ColourAugment`
chooses between the two.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from gaelle_ray.config import MEAN, STD, AugmentationConfig

__all__ = [
    "BRIGHTNESS",
    "CONTRAST",
    "ColourParams",
    "HUE",
    "JITTER_OPS",
    "LUMA",
    "SATURATION",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "apply_colour",
    "apply_jitter",
    "apply_on_subset",
    "blur_kernel_size",
    "check_blur_size",
    "factor_range",
    "gaussian_blur",
    "gaussian_kernels",
    "luminance",
    "normalize",
    "rgb_to_grayscale",
    "sample_colour_params",
    "to_unit_float",
]

# Jitter op ids, in torchvision ColorJitter's numbering (fn_idx).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")

LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma weights (R, G, B), as torchvision's rgb_to_grayscale


def factor_range(aug: AugmentationConfig, op: int) -> tuple[float, float]:
    """Range the factor of jitter op ``op`` (BRIGHTNESS..HUE) is drawn from.

    Brightness, contrast, saturation of strength s: ``[max(0, 1 - s), 1 + s]``; hue:
    ``[-hue, hue]`` (a shift, in turns).
    """
    if op == HUE:
        return -aug.hue, aug.hue
    s = getattr(aug, JITTER_OPS[op])
    return max(0.0, 1.0 - s), 1.0 + s


def blur_kernel_size(aug: AugmentationConfig) -> int:
    """Taps of the Gaussian blur kernel: ``2 * ceil(3 * max sigma) + 1`` (13 for sigma <= 2),
    which covers +-3 sigma as PIL's blur effectively does."""
    return 2 * math.ceil(3.0 * aug.blur_sigma[1]) + 1


@dataclass
class ColourParams:
    """Per-sample colour parameters of N crops (all tensors on one device).

    jitter: (N,) bool, jitter applied; brightness, contrast, saturation: (N,) float factors;
    hue: (N,) float shift; order: (N, 4) int64, ``order[i, s]`` is the op (BRIGHTNESS..HUE)
    sample i applies at step s; grayscale: (N,) bool; blur: (N,) bool; sigma: (N,) float.
    Factors are drawn for every sample and ignored where the op is not applied.
    """

    jitter: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    order: torch.Tensor
    grayscale: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    def __len__(self) -> int:
        return int(self.jitter.shape[0])

    def to(self, device: torch.device | str) -> "ColourParams":
        """A copy with every tensor on ``device``."""
        return ColourParams(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def factor(self, op: int) -> torch.Tensor:
        """(N,) factors of jitter op ``op``."""
        return getattr(self, JITTER_OPS[op])

    @classmethod
    def cat(cls, parts: Sequence["ColourParams"]) -> "ColourParams":
        """Parameter sets of N_1, N_2, ... crops -> one set of sum(N_i) crops, in order."""
        if not parts:
            raise ValueError("ColourParams.cat needs at least one parameter set")
        return cls(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def sample_colour_params(n: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None,
                         cfg: AugmentationConfig | None = None) -> ColourParams:
    """Draw the colour parameters of ``n`` crops (settings ``cfg``; method.md's by default).

    Drawn on ``generator``'s device (CPU when None, using the global RNG), returned on
    ``device`` (the generator's device when None).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cfg = AugmentationConfig() if cfg is None else cfg
    gdev = generator.device if generator is not None else torch.device("cpu")

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=gdev) * (hi - lo) + lo  # (n,)

    def bernoulli(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=gdev) < p  # (n,)

    params = ColourParams(
        jitter=bernoulli(cfg.jitter_p),
        brightness=uniform(*factor_range(cfg, BRIGHTNESS)),
        contrast=uniform(*factor_range(cfg, CONTRAST)),
        saturation=uniform(*factor_range(cfg, SATURATION)),
        hue=uniform(*factor_range(cfg, HUE)),
        # argsort of iid uniforms is a uniformly random permutation per row
        order=torch.rand(n, 4, generator=generator, device=gdev).argsort(dim=1),
        grayscale=bernoulli(cfg.grayscale_p),
        blur=bernoulli(cfg.blur_p),
        sigma=uniform(*cfg.blur_sigma),
    )
    return params if device is None else params.to(device)


# ----------------------------------------------------------------------------------------
# Batched ops. x: (N, 3, H, W) float in [0, 1]; factor: (N,) one value per sample.
# ----------------------------------------------------------------------------------------

def to_unit_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: (..., 3, H, W) uint8 in [0, 255] or float in [0, 1] -> new float tensor in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.to(dtype).div_(255.0)
    if not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, got {x.dtype}")
    return x.to(dtype, copy=True)


def _per_sample(factor: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """factor: (N,) -> (N, 1, 1, 1) on x's device and dtype, to broadcast over (N, 3, H, W)."""
    return factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)  # (N, 1, 1, 1)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1].

    x: (N, 3, H, W); other: broadcastable to x ((N, 1, H, W) or (N, 1, 1, 1)); ratio: (N, 1, 1, 1).
    """
    return x.mul(ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def luminance(x: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W) -> (N, 1, H, W) luma (0.2989 R + 0.587 G + 0.114 B)."""
    r, g, b = x.unbind(dim=1)
    return r.mul(LUMA[0]).add_(g, alpha=LUMA[1]).add_(b, alpha=LUMA[2]).unsqueeze(1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W); factor: (N,). Scale towards black."""
    return x.mul(_per_sample(factor, x)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W); factor: (N,). Blend with each image's mean luma."""
    mean = luminance(x).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
    return _blend(x, mean, _per_sample(factor, x))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W); factor: (N,). Blend with the grayscale image."""
    return _blend(x, luminance(x), _per_sample(factor, x))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W); shift: (N,) in [-0.5, 0.5] turns. Rotate hue in HSV space.

    Value (max) and chroma (max - min) are kept; the hue in sextants ``h6`` in [0, 6) is
    shifted by ``6 * shift`` and turned back into RGB with the trapezoid form of the
    hexcone: ``R = v - chroma * clamp(2 - |h6 - 3|, 0, 1)``,
    ``G = v - chroma * clamp(|h6 - 2| - 1, 0, 1)``, ``B = v - chroma * clamp(|h6 - 4| - 1, 0, 1)``.
    Same function as torchvision's RGB -> HSV -> RGB round trip, with fewer passes.
    """
    value, chroma, h6 = _rgb_to_vch6(x)  # each (N, H, W)
    turn = (shift * 6.0).to(device=x.device, dtype=x.dtype).view(-1, 1, 1)  # (N, 1, 1)
    h6.add_(turn).remainder_(6.0)
    return _vch6_to_rgb(value, chroma, h6)


def _rgb_to_vch6(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, 3, H, W) -> value (max), chroma (max - min), hue in sextants; each (N, H, W).

    The hue is in [-1, 5) (not wrapped); 0 for grey pixels (chroma 0 gives numerator 0).
    Ties between maximal channels give the same hue whichever branch is taken.
    """
    r, g, b = x.unbind(dim=1)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    numerator = torch.where(value == r, g - b,
                            torch.where(value == g, (b - r).add_(chroma, alpha=2.0),
                                        (r - g).add_(chroma, alpha=4.0)))
    return value, chroma, numerator.div_(chroma.clamp_min(torch.finfo(x.dtype).tiny))


def _vch6_to_rgb(value: torch.Tensor, chroma: torch.Tensor, h6: torch.Tensor) -> torch.Tensor:
    """value, chroma, h6 (hue in [0, 6)): (N, H, W) -> RGB (N, 3, H, W)."""
    n, h, w = value.shape
    out = torch.empty((n, 3, h, w), device=value.device, dtype=value.dtype)
    for channel, centre in ((0, 3.0), (1, 2.0), (2, 4.0)):
        weight = (h6 - centre).abs_()  # (N, H, W)
        weight = weight.neg_().add_(2.0) if channel == 0 else weight.sub_(1.0)
        torch.addcmul(value, chroma, weight.clamp_(0.0, 1.0), value=-1.0, out=out[:, channel])
    return out


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W) -> (N, 3, H, W) luma repeated on the 3 channels."""
    return luminance(x).expand(-1, 3, -1, -1).contiguous()


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """sigma: (N,) -> (N, kernel_size) normalised 1-D Gaussian kernels centred on the middle tap."""
    taps = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype)  # (kernel_size,)
    offsets = taps - (kernel_size - 1) / 2
    logits = -0.5 * (offsets.view(1, -1) / sigma.view(-1, 1)) ** 2  # (N, kernel_size)
    return torch.softmax(logits, dim=1)


def check_blur_size(h: int, w: int, kernel_size: int) -> None:
    """ValueError unless an h x w image can be reflect-padded by ``kernel_size // 2`` (what
    every blur of the package does, batched or on the CPU path)."""
    pad = kernel_size // 2
    if pad >= h or pad >= w:
        raise ValueError(f"blur kernel of {kernel_size} taps needs images larger than "
                         f"{pad} px for reflect padding, got {h}x{w}")


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """x: (N, C, H, W); sigma: (N,). Separable Gaussian blur, one sigma per sample.

    Reflect padding of ``kernel_size // 2``; one depthwise (grouped) convolution per axis
    with a kernel per (sample, channel).
    """
    n, c, h, w = x.shape
    pad = kernel_size // 2
    check_blur_size(h, w, kernel_size)
    if n == 0:
        return x
    kernels = gaussian_kernels(sigma.to(device=x.device, dtype=torch.float32), kernel_size)
    kernels = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # (N*C, k)
    y = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (N, C, H+2p, W+2p)
    y = y.reshape(1, n * c, h + 2 * pad, w + 2 * pad)  # (1, N*C, H+2p, W+2p)
    y = F.conv2d(y, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # (1, N*C, H+2p, W)
    y = F.conv2d(y, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # (1, N*C, H, W)
    return y.view(n, c, h, w)  # (N, C, H, W)


def normalize(x: torch.Tensor, mean: Sequence[float] = MEAN,
              std: Sequence[float] = STD) -> torch.Tensor:
    """x: (N, 3, H, W) in [0, 1] -> (x - mean) / std per channel (in place, returned)."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    return x.sub_(m).div_(s)


# ----------------------------------------------------------------------------------------
# Applying sampled parameters to a batch.
# ----------------------------------------------------------------------------------------

_JITTER_FNS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast,
               SATURATION: adjust_saturation, HUE: adjust_hue}


def apply_on_subset(x: torch.Tensor, mask: torch.Tensor, fn: Callable[..., torch.Tensor],
                    *per_sample: torch.Tensor) -> None:
    """x[i] = fn(x[i], per_sample[i]...) for the samples where mask is True, in place.

    x: (N, C, H, W); mask: (N,) bool; per_sample: tensors of shape (N,). ``fn`` takes a
    (M, C, H, W) batch and the M values of each per-sample tensor.

    ``mask`` and ``per_sample`` may live on another device than x (e.g. CPU parameters for
    CUDA images): the indices are computed there, so no device sync is needed. Only the
    selected samples are computed, which is what makes a per-sample random op cost its
    share of the batch.
    """
    idx = mask.nonzero().squeeze(1)  # (M,)
    m = idx.numel()
    if m == 0:
        return
    args = [p[idx].to(x.device, non_blocking=True) for p in per_sample]  # each (M,)
    if m == x.shape[0]:
        x.copy_(fn(x, *args))
        return
    idx = idx.to(x.device, non_blocking=True)
    x.index_copy_(0, idx, fn(x.index_select(0, idx), *args))


def apply_jitter(x: torch.Tensor, params: ColourParams) -> torch.Tensor:
    """x: (N, 3, H, W) float in [0, 1], modified in place: each sample's jitter in its order."""
    for step in range(4):
        for op, fn in _JITTER_FNS.items():
            mask = params.jitter & (params.order[:, step] == op)  # (N,)
            apply_on_subset(x, mask, fn, params.factor(op))
    return x


def apply_colour(x: torch.Tensor, params: ColourParams, cfg: AugmentationConfig | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x: (N, 3, H, W) uint8 or float in [0, 1] -> (N, 3, H, W) normalised ``dtype``.

    Jitter (per-sample order) -> grayscale -> Gaussian blur -> normalise with ``cfg``'s
    mean/std and blur kernel size. ``x`` is not modified; computation runs in ``dtype`` on
    x's device.
    """
    cfg = AugmentationConfig() if cfg is None else cfg
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if len(params) != x.shape[0]:
        raise ValueError(f"got {len(params)} parameter sets for {x.shape[0]} images")
    y = to_unit_float(x, dtype)  # (N, 3, H, W), a fresh tensor
    apply_jitter(y, params)
    apply_on_subset(y, params.grayscale, rgb_to_grayscale)
    ks = blur_kernel_size(cfg)
    apply_on_subset(y, params.blur, lambda t, s: gaussian_blur(t, s, ks), params.sigma)
    return normalize(y, cfg.mean, cfg.std)
