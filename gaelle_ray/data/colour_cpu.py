"""The colour half of the augmentation on one CPU core: :func:`apply_colour_cpu`.

Same parameters and same function as the batched :func:`gaelle_ray.data.augment.apply_colour`
(tested equal within float32 rounding); what differs is how the work is laid out for a CPU
(see :func:`apply_colour_cpu`). The four jitter ops can run as ``torch.compile``'d kernels
(``ColourConfig.compile_cpu``, on by default): each op is then one fused pass over the
pixels instead of 2-25 eager passes, which makes the whole colour half ~20% faster on the
2-core development machine (3.8 against 4.8 ms per image of 2 x 224 + 6 x 96 crops;
docs/benchmarks.md): the blur, gathering and conversions are left as they were. Compiling
takes ~10-20 s per process the first time and ~5-7 s once torch's on-disk cache holds the
kernels (up to 4 graphs per op: dynamic shapes, with 0/1-specialised batch size and
storage offset); it needs a C++ compiler. Where compiling fails
(no compiler, unsupported platform) the eager ops run instead, with one warning naming the
reason: the result is the same, only slower.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from gaelle_ray.data.augment import (_LUMA, BRIGHTNESS, CONTRAST, HUE, SATURATION, ColourConfig,
                                     ColourParams, _apply_on_subset, gaussian_kernels, luminance,
                                     rgb_to_grayscale)

__all__ = ["apply_colour_cpu", "compiled_kernels_status"]

logger = logging.getLogger(__name__)

_CPU_CHUNK_PIXELS = 1 << 19  # pixels per chunk of the CPU path (6 MB of float32)


def _order_keys(params: ColourParams) -> torch.Tensor:
    """(N,) int64 id of each sample's jitter programme: its op order, or -1 without jitter."""
    o = params.order.cpu()
    key = ((o[:, 0] * 4 + o[:, 1]) * 4 + o[:, 2]) * 4 + o[:, 3]  # (N,) one id per permutation
    return torch.where(params.jitter.cpu(), key, torch.full_like(key, -1))


def _brightness_255(y: torch.Tensor, f: torch.Tensor) -> None:
    """y: (n, 3, H, W) float on the [0, 255] scale, in place; f: (n, 1, 1, 1)."""
    y.mul_(f).clamp_(0.0, 255.0)


def _contrast_255(y: torch.Tensor, f: torch.Tensor) -> None:
    """Blend with the mean luma; the mean of the luma is the luma of the channel means."""
    luma = torch.tensor(_LUMA, dtype=y.dtype)  # (3,)
    mean = (y.mean(dim=(2, 3)) @ luma).view(-1, 1, 1, 1)  # (n, 1, 1, 1)
    y.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 255.0)


def _saturation_255(y: torch.Tensor, f: torch.Tensor) -> None:
    """Blend with the per-pixel luma."""
    grey = luminance(y)  # (n, 1, H, W)
    y.mul_(f).add_(grey.mul_(1.0 - f)).clamp_(0.0, 255.0)


def _hue_255(y: torch.Tensor, shift: torch.Tensor) -> None:
    """``augment.adjust_hue`` without ``torch.where``/``remainder`` (slow on CPU), in place.

    The maximal channel is picked with float 0/1 masks and ``lerp`` (R wins ties, then G,
    as in ``augment._rgb_to_vch6``); the hue is wrapped to [0, 6) with ``floor``. Works on any
    value scale (here [0, 255]); shift: (n, 1, 1) in turns.
    """
    r, g, b = y.unbind(dim=1)  # each (n, H, W)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    is_r = torch.ge(r, value, out=torch.empty_like(r))  # 1.0 where R is maximal
    is_g = torch.ge(g, value, out=torch.empty_like(g))
    num = torch.sub(r, g).add_(chroma, alpha=4.0)  # B maximal: r - g + 4c
    num.lerp_(torch.sub(b, r).add_(chroma, alpha=2.0), is_g)  # G maximal: b - r + 2c
    num.lerp_(torch.sub(g, b), is_r)  # R maximal: g - b
    h6 = num.div_(chroma.clamp_min(torch.finfo(y.dtype).tiny))  # in [-1, 5)
    h6.add_(shift * 6.0)
    h6.sub_(torch.floor(h6 * (1.0 / 6.0)).mul_(6.0))  # wrapped to [0, 6)
    for channel, centre in ((0, 3.0), (1, 2.0), (2, 4.0)):
        weight = torch.sub(h6, centre).abs_()
        weight = weight.neg_().add_(2.0) if channel == 0 else weight.sub_(1.0)
        torch.addcmul(value, chroma, weight.clamp_(0.0, 1.0), value=-1.0, out=y[:, channel])


def _blur_channels_last(y: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``augment.gaussian_blur`` with the padded image in channels-last layout before the two
    depthwise convolutions (3-4x faster with oneDNN on CPU): same kernels and padding,
    except that taps below 1e-30 are set to 0 (denormals: no visible change, 5x faster)."""
    n, c, h, w = y.shape
    pad = kernel_size // 2
    if pad >= h or pad >= w:
        raise ValueError(f"blur kernel of {kernel_size} taps needs images larger than "
                         f"{pad} px for reflect padding, got {h}x{w}")
    kernels = gaussian_kernels(sigma.to(torch.float32), kernel_size).to(y.dtype)
    # taps below 1e-30 (e.g. exp(-200) at 6 px for sigma 0.3) are denormal or nearly so:
    # they change nothing visible but make every multiply-add ~10x slower on x86
    kernels = kernels.masked_fill(kernels < 1e-30, 0.0).repeat_interleave(c, dim=0)  # (n*c, k)
    z = F.pad(y, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    z = z.contiguous(memory_format=torch.channels_last)
    z = F.conv2d(z, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # (1, n*c, h+2p, w)
    z = F.conv2d(z, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # (1, n*c, h, w)
    return z.reshape(n, c, h, w)


_EAGER_JITTER = {BRIGHTNESS: _brightness_255, CONTRAST: _contrast_255,
                 SATURATION: _saturation_255, HUE: _hue_255}


# -- the same four ops as single expressions, for torch.compile (one fused pass each) -----
# y: (n, 3, H, W) float32 on the [0, 255] scale, written in place; f: (n, 1, 1, 1) factor,
# shift: (n, 1, 1) in turns. Same formulas as the eager ops above.

def _luma_255(y: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W)."""
    return (y[:, 0] * _LUMA[0] + y[:, 1] * _LUMA[1] + y[:, 2] * _LUMA[2]).unsqueeze(1)


def _fused_brightness(y: torch.Tensor, f: torch.Tensor) -> None:
    y.copy_((y * f).clamp(0.0, 255.0))


def _fused_contrast(y: torch.Tensor, f: torch.Tensor) -> None:
    mean = _luma_255(y.mean(dim=(2, 3), keepdim=True))  # (n, 1, 1, 1): luma of channel means
    y.copy_((y * f + mean * (1.0 - f)).clamp(0.0, 255.0))


def _fused_saturation(y: torch.Tensor, f: torch.Tensor) -> None:
    y.copy_((y * f + _luma_255(y) * (1.0 - f)).clamp(0.0, 255.0))


def _fused_hue(y: torch.Tensor, shift: torch.Tensor) -> None:
    r, g, b = y[:, 0], y[:, 1], y[:, 2]  # each (n, H, W)
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    num = torch.where(r >= value, g - b,  # R maximal (wins ties), then G, then B
                      torch.where(g >= value, b - r + 2.0 * chroma, r - g + 4.0 * chroma))
    h6 = num / chroma.clamp_min(torch.finfo(y.dtype).tiny) + shift * 6.0
    h6 = h6 - torch.floor(h6 * (1.0 / 6.0)) * 6.0  # wrapped to [0, 6)
    red = value - chroma * (2.0 - (h6 - 3.0).abs()).clamp(0.0, 1.0)
    green = value - chroma * ((h6 - 2.0).abs() - 1.0).clamp(0.0, 1.0)
    blue = value - chroma * ((h6 - 4.0).abs() - 1.0).clamp(0.0, 1.0)
    y.copy_(torch.stack((red, green, blue), dim=1))


class _CompiledOp:
    """One jitter op compiled on first use (dynamic shapes: any crop size and run length
    without recompiling beyond torch's 0/1 specialisations), falling back to its eager
    version, for good and with one warning, when the first compile fails."""

    def __init__(self, name: str, fused, eager) -> None:
        self.name, self.fused, self.eager = name, fused, eager
        self.kernel = None
        self.state = "not used yet"  # -> "compiled" or "eager: <reason>"

    def __call__(self, y: torch.Tensor, f: torch.Tensor) -> None:
        if self.state == "compiled":
            self.kernel(y, f)
            return
        if self.state == "not used yet":
            try:
                self.kernel = torch.compile(self.fused, dynamic=True)
                self.kernel(y, f)  # compiles here; the op is applied only if it succeeds
            except Exception as exc:  # noqa: BLE001 (no C++ compiler, unsupported platform...)
                self.state = f"eager: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                logger.warning("torch.compile of the CPU colour op %r failed, running it eagerly "
                               "(same result, slower): %s", self.name, self.state[7:])
            else:
                self.state = "compiled"
                return
        self.eager(y, f)


_COMPILED_JITTER = {BRIGHTNESS: _CompiledOp("brightness", _fused_brightness, _brightness_255),
                    CONTRAST: _CompiledOp("contrast", _fused_contrast, _contrast_255),
                    SATURATION: _CompiledOp("saturation", _fused_saturation, _saturation_255),
                    HUE: _CompiledOp("hue", _fused_hue, _hue_255)}


def compiled_kernels_status() -> dict[str, str]:
    """Per jitter op of this process: "not used yet", "compiled" or "eager: <why>"."""
    return {op.name: op.state for op in _COMPILED_JITTER.values()}


def _colour_chunk(x: torch.Tensor, params: ColourParams, idx: torch.Tensor, keys: list[int],
                  cfg: ColourConfig, scale: torch.Tensor, offset: torch.Tensor,
                  jitter_ops: dict) -> torch.Tensor:
    """Samples ``idx`` of x, sorted by jitter programme ``keys`` -> normalised float32."""
    y = x.index_select(0, idx).to(torch.float32)  # (n, 3, H, W) on the [0, 255] scale
    if x.dtype != torch.uint8:
        y.mul_(255.0)
    start = 0
    for stop in range(1, len(keys) + 1):  # runs of samples with the same programme
        if stop < len(keys) and keys[stop] == keys[start]:
            continue
        if keys[start] >= 0:
            run, members = y[start:stop], idx[start:stop]  # a view: ops run in place
            for op in params.order[members[0]].tolist():
                f = params.factor(op)[members].to(torch.float32)
                jitter_ops[op](run, f.view(-1, 1, 1) if op == HUE else f.view(-1, 1, 1, 1))
        start = stop
    _apply_on_subset(y, params.grayscale[idx], rgb_to_grayscale)
    ks = cfg.kernel_size
    _apply_on_subset(y, params.blur[idx], lambda t, s: _blur_channels_last(t, s, ks),
                     params.sigma[idx])
    return y.mul_(scale).sub_(offset)


def apply_colour_cpu(x: torch.Tensor, params: ColourParams, cfg: ColourConfig | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``augment.apply_colour`` restructured for one CPU core: same parameters, same function.

    x: (N, 3, H, W) uint8 (or float in [0, 1]) on the CPU -> (N, 3, H, W) normalised
    ``out_dtype``. What differs from the batched path is only how the work is laid out:

    - samples are sorted by jitter programme (their op order; no jitter is a programme of
      its own) and processed in chunks of ~2^19 pixels (working set near the L2 cache):
      a chunk is gathered and converted once, each run of samples with the same programme
      applies its ops in order on a slice (no masks, no scatter between ops), then the
      chunk's grayscale and blur subsets, and it is normalised straight into the output;
    - the arithmetic runs in float32 on the [0, 255] scale, in place (the division by 255
      is folded into the normalisation);
    - contrast takes the mean luma as the luma of the channel means (equal up to rounding);
    - hue is ``augment.adjust_hue``'s formula with 0/1 masks and ``lerp`` instead of
      ``torch.where`` and ``floor`` instead of ``remainder`` (several times cheaper on CPU);
    - the blur pads into a channels-last tensor before the same depthwise convolutions
      (3-4x faster with oneDNN on CPU) and zeroes kernel taps below 1e-30 (denormal
      arithmetic is ~10x slower on x86; the float32 path pays it for sigma < ~0.5);
    - with ``cfg.compile_cpu`` the four jitter ops are ``torch.compile``'d single
      expressions of the same formulas, one fused pass each (see the module docstring for
      the compile cost and the eager fallback).

    Tested equal to ``augment.apply_colour`` within float32 rounding (max abs difference
    < 1e-4 in normalised units, i.e. < 0.01 grey level) before the cast to ``out_dtype``.
    """
    cfg = ColourConfig() if cfg is None else cfg
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if len(params) != x.shape[0]:
        raise ValueError(f"got {len(params)} parameter sets for {x.shape[0]} images")
    if x.device.type != "cpu":
        raise ValueError(f"apply_colour_cpu runs on CPU tensors, got {x.device}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, got {x.dtype}")
    params = params.to("cpu")
    _, _, h, w = x.shape
    out = torch.empty(x.shape, dtype=out_dtype)
    std = torch.tensor(cfg.std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)  # (1, 3, 1, 1)
    offset = (torch.tensor(cfg.mean, dtype=torch.float32) / std).view(1, 3, 1, 1)
    jitter_ops = _COMPILED_JITTER if cfg.compile_cpu else _EAGER_JITTER
    keys = _order_keys(params)  # (N,)
    order = torch.argsort(keys, stable=True)  # samples grouped by programme
    sorted_keys = keys[order].tolist()
    chunk = max(1, _CPU_CHUNK_PIXELS // (h * w))
    for start in range(0, order.numel(), chunk):
        idx = order[start:start + chunk]
        y = _colour_chunk(x, params, idx, sorted_keys[start:start + chunk], cfg, scale, offset,
                          jitter_ops)
        for j, i in enumerate(idx.tolist()):  # per-sample copies (with the cast): index_copy_
            out[i].copy_(y[j])                 # is ~3x slower for float16 on CPU
    return out

