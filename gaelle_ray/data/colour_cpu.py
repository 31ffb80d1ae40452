"""The colour half of the augmentation on one CPU core: :func:`apply_colour_cpu`.

Same parameters and same function as the batched
:func:`gaelle_ray.data.colour_ops.apply_colour` (tested equal within float32 rounding); what
differs is how the work is laid out for a CPU (see :func:`apply_colour_cpu`). By default
(``augmentation.compile_cpu_colour``) it runs as six ``torch.compile``'d kernels: one per
group of crops that shift the hue at the same step of their random jitter order (or have no
jitter), each doing the whole programme (gather, four jitter steps, grayscale,
normalisation, scatter) in fused passes, and a separable blur. Fused passes are what make
it faster than the eager ops on a CPU (figures: docs/benchmarks.md). Each process compiles
the kernels on first use (torch's on-disk cache makes later processes cheaper; one graph per
kernel and input dtype: index tensors are never views or single, and shapes are traced
without duck sizing, so no recompiles); it needs a C++ compiler. Where compiling fails (no
compiler, unsupported platform) the eager ops run instead, with one warning naming the
reason: the result is the same, only slower.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from gaelle_ray.config import AugmentationConfig
from gaelle_ray.data.colour_ops import (BRIGHTNESS, CONTRAST, HUE, LUMA, SATURATION, ColourParams,
                                        apply_on_subset, blur_kernel_size, check_blur_size,
                                        gaussian_kernels, luminance, rgb_to_grayscale)

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
    luma = torch.tensor(LUMA, dtype=y.dtype)  # (3,)
    mean = (y.mean(dim=(2, 3)) @ luma).view(-1, 1, 1, 1)  # (n, 1, 1, 1)
    y.mul_(f).add_(mean * (1.0 - f)).clamp_(0.0, 255.0)


def _saturation_255(y: torch.Tensor, f: torch.Tensor) -> None:
    """Blend with the per-pixel luma."""
    grey = luminance(y)  # (n, 1, H, W)
    y.mul_(f).add_(grey.mul_(1.0 - f)).clamp_(0.0, 255.0)


def _hue_255(y: torch.Tensor, shift: torch.Tensor) -> None:
    """``colour_ops.adjust_hue`` without ``torch.where``/``remainder`` (slow on CPU), in place.

    The maximal channel is picked with float 0/1 masks and ``lerp`` (R wins ties, then G,
    as in ``colour_ops.adjust_hue``); the hue is wrapped to [0, 6) with ``floor``. Works on any
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
    """``colour_ops.gaussian_blur`` with the padded image in channels-last layout before the
    two depthwise convolutions (oneDNN's fast layout on CPU): same kernels and padding,
    except that taps below 1e-30 are set to 0 (denormals: no visible change, much faster)."""
    n, c, h, w = y.shape
    pad = kernel_size // 2
    check_blur_size(h, w, kernel_size)
    kernels = _blur_kernels(sigma, kernel_size).to(y.dtype).repeat_interleave(c, dim=0)  # (n*c, k)
    z = F.pad(y, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, w + 2 * pad)
    z = z.contiguous(memory_format=torch.channels_last)
    z = F.conv2d(z, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)  # (1, n*c, h+2p, w)
    z = F.conv2d(z, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)  # (1, n*c, h, w)
    return z.reshape(n, c, h, w)


_EAGER_JITTER = {BRIGHTNESS: _brightness_255, CONTRAST: _contrast_255,
                 SATURATION: _saturation_255, HUE: _hue_255}


# -- the compiled path: one kernel call per group of samples ----------------------------
# Samples are grouped by the step at which they shift the hue (0-3), or as "no jitter". In a
# group every other step is a blend ``y * f + other * (1 - f)`` whose ``other`` each sample
# picks by its op: 0 for brightness, its mean luma for contrast, its per-pixel luma for
# saturation (the formulas of the eager ops, same rounding); so a group is one compiled
# function of the whole programme (gather from the chunk, 4 steps, grayscale, normalisation,
# scatter into the chunk) instead of one call per op and run of equal programmes.

def _luma_255(y: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W)."""
    return (y[:, 0] * LUMA[0] + y[:, 1] * LUMA[1] + y[:, 2] * LUMA[2]).unsqueeze(1)


def _hue_expr(y: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``_hue_255`` as one expression: y (n, 3, H, W), shift (n, 1, 1) -> new (n, 3, H, W)."""
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
    return torch.stack((red, green, blue), dim=1)


def _group_programme(x: torch.Tensor, rows: torch.Tensor, y: torch.Tensor, idx: torch.Tensor,
                     ops: torch.Tensor, factors: torch.Tensor, grey: torch.Tensor,
                     scale: torch.Tensor, offset: torch.Tensor, hue_step: int) -> None:
    """y[idx] = normalise(grayscale(jitter(x[rows]))) for samples whose hue shift is at step
    ``hue_step`` (-1: samples without jitter).

    x: (N, 3, H, W) uint8 (or float in [0, 1]); rows: (m,) int64 samples of x;
    y: (n, 3, H, W) float32 chunk, written at idx: (m,) int64; ops: (m, 4) op at each step;
    factors: (m, 4) float32 its factor (the shift in turns for hue); grey: (m,) bool;
    scale, offset: (1, 3, 1, 1).
    """
    v = x[rows].to(torch.float32)  # (m, 3, H, W) on the [0, 255] scale
    if x.dtype != torch.uint8:
        v = v * 255.0
    if hue_step >= 0:
        for step in range(4):
            f = factors[:, step].view(-1, 1, 1, 1)
            if step == hue_step:
                v = _hue_expr(v, f.view(-1, 1, 1))
                continue
            op = ops[:, step].view(-1, 1, 1, 1)
            luma = _luma_255(v)  # (m, 1, H, W)
            mean = luma.mean(dim=(2, 3), keepdim=True)  # (m, 1, 1, 1)
            other = torch.where(op == CONTRAST, mean, torch.where(op == SATURATION, luma, 0.0))
            v = (v * f + other * (1.0 - f)).clamp(0.0, 255.0)  # brightness: other = 0
    v = torch.where(grey.view(-1, 1, 1, 1), _luma_255(v).expand_as(v), v)
    y[idx] = v * scale - offset


# one function (code object) per group: torch.compile keeps a cache per code object
def _group_no_jitter(x, rows, y, idx, ops, factors, grey, scale, offset) -> None:
    _group_programme(x, rows, y, idx, ops, factors, grey, scale, offset, -1)


def _group_hue_1st(x, rows, y, idx, ops, factors, grey, scale, offset) -> None:
    _group_programme(x, rows, y, idx, ops, factors, grey, scale, offset, 0)


def _group_hue_2nd(x, rows, y, idx, ops, factors, grey, scale, offset) -> None:
    _group_programme(x, rows, y, idx, ops, factors, grey, scale, offset, 1)


def _group_hue_3rd(x, rows, y, idx, ops, factors, grey, scale, offset) -> None:
    _group_programme(x, rows, y, idx, ops, factors, grey, scale, offset, 2)


def _group_hue_4th(x, rows, y, idx, ops, factors, grey, scale, offset) -> None:
    _group_programme(x, rows, y, idx, ops, factors, grey, scale, offset, 3)


def _blur_taps(z: torch.Tensor, kernels: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable blur of reflect-padded z (m, 3, H+2p, W+2p) with per-sample taps kernels
    (m, k) -> (m, 3, H, W), contiguous: k shifted multiply-adds per axis."""
    p = kernel_size // 2
    h, w = z.shape[2] - 2 * p, z.shape[3] - 2 * p
    taps = kernels.view(-1, 1, 1, 1, kernel_size)
    rows = z[..., 0:w] * taps[..., 0]  # (m, 3, H+2p, W)
    for i in range(1, kernel_size):
        rows = rows + z[..., i:i + w] * taps[..., i]
    out = rows[:, :, 0:h] * taps[..., 0]  # (m, 3, H, W)
    for i in range(1, kernel_size):
        out = out + rows[:, :, i:i + h] * taps[..., i]
    return out


def _no_duck_shapes():
    """Tracing without "duck" shapes: dims that happen to be equal at the first call (the
    chunk and the batch, both 10) get separate symbols instead of a guard that recompiles
    when they differ."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)


class _NotCompiled(RuntimeError):
    """A kernel of the compiled path could not be compiled: run the eager path instead."""


class _CompiledKernel:
    """A function compiled on first use (dynamic shapes). If that first compile fails, the
    kernel is marked eager for good (one warning naming the reason) and :class:`_NotCompiled`
    is raised, so that the caller runs the eager path."""

    def __init__(self, name: str, fn) -> None:
        self.name, self.fn = name, fn
        self.kernel = None
        self.state = "not used yet"  # -> "compiled" or "eager: <reason>"

    def __call__(self, *args):
        if self.state == "compiled":
            with _no_duck_shapes():
                return self.kernel(*args)
        if self.state != "not used yet":
            raise _NotCompiled(self.state)
        try:
            self.kernel = torch.compile(self.fn, dynamic=True)
            with _no_duck_shapes():
                result = self.kernel(*args)  # compiles here
        except Exception as exc:  # noqa: BLE001 (no C++ compiler, unsupported platform...)
            self.state = f"eager: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            logger.warning("torch.compile of the CPU colour kernel %r failed, the colour ops run "
                           "eagerly from now on (same result, slower): %s", self.name,
                           self.state[7:])
            raise _NotCompiled(self.state) from exc
        self.state = "compiled"
        return result


_GROUP_KERNELS = {-1: _CompiledKernel("no jitter", _group_no_jitter),
                  0: _CompiledKernel("hue at step 1", _group_hue_1st),
                  1: _CompiledKernel("hue at step 2", _group_hue_2nd),
                  2: _CompiledKernel("hue at step 3", _group_hue_3rd),
                  3: _CompiledKernel("hue at step 4", _group_hue_4th)}
_BLUR_KERNEL = _CompiledKernel("blur", _blur_taps)
_ALL_KERNELS = (*_GROUP_KERNELS.values(), _BLUR_KERNEL)


def compiled_kernels_status() -> dict[str, str]:
    """Per compiled kernel of this process: "not used yet", "compiled" or "eager: <why>"."""
    return {k.name: k.state for k in _ALL_KERNELS}


def _compiled_path_usable() -> bool:
    return not any(k.state.startswith("eager") for k in _ALL_KERNELS)


def _kernel_indices(idx: torch.Tensor) -> torch.Tensor:
    """(m,) int64 positions for a compiled kernel: never a view (torch.compile guards on a
    view's base, so views and fresh tensors would get separate graphs) and never a single
    one (a lone index is repeated, its values written twice: else a second graph
    specialised to m = 1)."""
    return idx.repeat(2) if idx.numel() == 1 else idx.clone()


def _blur_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(m,) -> (m, k) float32 taps, those below 1e-30 set to 0 (denormals: no visible change,
    but every multiply-add on them is much slower on x86)."""
    kernels = gaussian_kernels(sigma.to(torch.float32), kernel_size)
    return kernels.masked_fill(kernels < 1e-30, 0.0)


def _apply_compiled(x: torch.Tensor, params: ColourParams, cfg: AugmentationConfig,
                    out: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> None:
    """The compiled path of :func:`apply_colour_cpu`, writing ``out`` (N, 3, H, W).

    The blur runs on the normalised chunk: it is linear per channel, its taps sum to 1 and
    reflect padding keeps constants, so blurring before or after the per-channel affine
    normalisation is the same function (up to float32 rounding, tested against the
    batched path, which blurs first).
    """
    n, _, h, w = x.shape
    ks = blur_kernel_size(cfg)
    factors = torch.stack([params.factor(op) for op in range(4)], dim=1).to(torch.float32)
    factors = factors.gather(1, params.order)  # (N, 4): the factor of the op at each step
    hue_step = torch.where(params.jitter, (params.order == HUE).to(torch.int64).argmax(dim=1),
                           torch.full((n,), -1, dtype=torch.int64))  # (N,) group of each sample
    chunk = max(1, min(n, _CPU_CHUNK_PIXELS // (h * w)))
    y = torch.empty((chunk, 3, h, w), dtype=torch.float32)  # the same shape every chunk
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        for step, kernel in _GROUP_KERNELS.items():
            idx = _kernel_indices((hue_step[start:stop] == step).nonzero().view(-1))  # (m,)
            if idx.numel():
                rows = idx + start
                kernel(x, rows, y, idx, params.order[rows], factors[rows],
                       params.grayscale[rows], scale, offset)
        out[start:stop].copy_(y[:stop - start])  # cast to the output dtype
        blurred = params.blur[start:stop].nonzero().view(-1)  # (b,)
        if blurred.numel():
            check_blur_size(h, w, ks)
            idx = _kernel_indices(blurred)
            z = F.pad(y.index_select(0, idx), (ks // 2,) * 4, mode="reflect")
            smooth = _BLUR_KERNEL(z, _blur_kernels(params.sigma[idx + start], ks), ks)
            for j, i in enumerate(blurred.tolist()):
                out[start + i].copy_(smooth[j])


def _eager_chunk(x: torch.Tensor, params: ColourParams, idx: torch.Tensor, keys: list[int],
                 cfg: AugmentationConfig, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Eager path: samples ``idx`` of x, sorted by jitter programme ``keys`` -> normalised
    float32 (n, 3, H, W)."""
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
                _EAGER_JITTER[op](run, f.view(-1, 1, 1) if op == HUE else f.view(-1, 1, 1, 1))
        start = stop
    apply_on_subset(y, params.grayscale[idx], rgb_to_grayscale)
    ks = blur_kernel_size(cfg)
    apply_on_subset(y, params.blur[idx], lambda t, s: _blur_channels_last(t, s, ks),
                     params.sigma[idx])
    return y.mul_(scale).sub_(offset)


def _apply_eager(x: torch.Tensor, params: ColourParams, cfg: AugmentationConfig, out: torch.Tensor,
                 scale: torch.Tensor, offset: torch.Tensor) -> None:
    """The eager path of :func:`apply_colour_cpu`, writing ``out`` (N, 3, H, W)."""
    _, _, h, w = x.shape
    keys = _order_keys(params)  # (N,)
    order = torch.argsort(keys, stable=True)  # samples grouped by programme
    sorted_keys = keys[order].tolist()
    chunk = max(1, _CPU_CHUNK_PIXELS // (h * w))
    for start in range(0, order.numel(), chunk):
        idx = order[start:start + chunk]
        y = _eager_chunk(x, params, idx, sorted_keys[start:start + chunk], cfg, scale, offset)
        for j, i in enumerate(idx.tolist()):  # per-sample copies (with the cast): index_copy_
            out[i].copy_(y[j])                 # is slower for float16 on CPU


def apply_colour_cpu(x: torch.Tensor, params: ColourParams, cfg: AugmentationConfig | None = None,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``colour_ops.apply_colour`` restructured for one CPU core: same parameters, same function.

    x: (N, 3, H, W) uint8 (or float in [0, 1]) on the CPU -> (N, 3, H, W) normalised
    ``out_dtype``. What differs from the batched path is only how the work is laid out.
    Both paths below work in chunks of ~2^19 pixels, in float32 on the [0, 255] scale (the
    division by 255 is folded into the normalisation), take the contrast mean as the luma of
    the channel means (equal up to rounding) and zero the blur's kernel taps below 1e-30
    (denormal arithmetic is much slower on x86; the float32 path meets it for sigma < ~0.5).

    - Compiled (``cfg.compile_cpu_colour``, the default): per chunk, one ``torch.compile``'d
      call per group of samples that shift the hue at the same step (or have no jitter),
      doing the whole programme in fused passes (see ``_group_programme``), then one
      compiled separable blur (k shifted multiply-adds per axis) of the chunk's blurred
      samples.
    - Eager (``compile_cpu_colour=False``, or after a failed compile): samples sorted by
      jitter programme (op order; no jitter is a programme of its own); each run of samples
      with the same programme applies its ops in order on a slice, in place; hue is
      ``colour_ops.adjust_hue``'s formula with 0/1 masks and ``lerp`` instead of
      ``torch.where`` and ``floor`` instead of ``remainder`` (both slow on CPU); the blur
      pads into a channels-last tensor before the depthwise convolutions (oneDNN's fast
      layout).

    Tested equal to ``colour_ops.apply_colour`` within float32 rounding (max abs difference
    < 1e-4 in normalised units, i.e. < 0.01 grey level) before the cast to ``out_dtype``.
    """
    cfg = AugmentationConfig() if cfg is None else cfg
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(x.shape)}")
    if len(params) != x.shape[0]:
        raise ValueError(f"got {len(params)} parameter sets for {x.shape[0]} images")
    if x.device.type != "cpu":
        raise ValueError(f"apply_colour_cpu runs on CPU tensors, got {x.device}")
    if x.dtype != torch.uint8 and not x.is_floating_point():
        raise ValueError(f"expected uint8 or floating point images, got {x.dtype}")
    params = params.to("cpu")
    out = torch.empty(x.shape, dtype=out_dtype)
    if x.shape[0] == 0:
        return out
    std = torch.tensor(cfg.std, dtype=torch.float32)
    scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1).clone()  # (1, 3, 1, 1), not a view
    offset = (torch.tensor(cfg.mean, dtype=torch.float32) / std).view(1, 3, 1, 1).clone()
    if cfg.compile_cpu_colour and _compiled_path_usable():
        try:
            _apply_compiled(x, params, cfg, out, scale, offset)
            return out
        except _NotCompiled:
            pass  # warned once; the eager path below recomputes everything from x
    _apply_eager(x, params, cfg, out, scale, offset)
    return out
