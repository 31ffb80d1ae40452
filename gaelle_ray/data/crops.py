"""The multi-crop views of method.md section 1, on the CPU: decode, random resized crop, flip.

Everything here works on plain bytes, numpy arrays and CPU tensors so that it can run
inside a Ray Data task on any CPU of the cluster. :func:`multicrop_images` is the one path
from a batch of JPEG records to per-resolution crop arrays: the stream calls it, and so do
the tests and benchmarks. The colour half (jitter, grayscale, blur, normalise;
:mod:`gaelle_ray.data.colour`) normally runs batched on the train worker's device;
:func:`multicrop_images` can also run it here (``colour=True``).

The crop settings are those of :class:`gaelle_ray.config.AugmentationConfig`. Per image the
JPEG is decoded once (``torchvision.io.decode_jpeg`` straight into an (H, W, 3) tensor by
default, PIL otherwise; pixel-identical, see :class:`DecodeOptions`). All crop boxes are
drawn first (torchvision ``RandomResizedCrop.get_params`` semantics on a numpy
``Generator``), then every crop is cut and resized with antialiased bilinear interpolation
(torch's uint8 kernel by default, or PIL). Optionally (off by default) a JPEG whose crops are
all much larger than their output size is decoded at a reduced scale (libjpeg DCT scaling,
``Image.draft``), which is much cheaper for large photos but not bit-identical.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from gaelle_ray.config import AugmentationConfig
from gaelle_ray.data.colour import ColourAugment
from gaelle_ray.data.colour_ops import ColourParams, sample_colour_params

__all__ = [
    "CropBox",
    "DecodeError",
    "DecodeOptions",
    "decode_and_crop",
    "decode_jpeg_torchvision",
    "draft_scale",
    "load_rgb",
    "multicrop_images",
    "open_image",
    "render_crops",
    "sample_crop_plan",
    "sample_rrc_params",
]

logger = logging.getLogger(__name__)

# Errors PIL raises on bytes that are not a decodable image (unknown format, truncated
# stream, corrupt markers, decompression bomb, wrong argument type such as None).
_PIL_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError,
                      Image.DecompressionBombError)

_RRC_ATTEMPTS = 10

# torchvision 0.29 deprecates its image decoders in favour of TorchCodec and warns on every
# call; the pinned version has them, and DecodeOptions(decoder="pil") works without them.
# decode_jpeg_torchvision silences this one warning around its own call only.
_TORCHVISION_DEPRECATION = "The image decoding and encoding capabilities of TorchVision are deprecated"

# PIL modes of the JPEGs handed to torchvision's decoder (pixel-identical to PIL's decode and
# RGB conversion, tested); other modes (CMYK...) and formats decode with PIL.
_TORCHVISION_JPEG_MODES = ("RGB", "L")


class DecodeError(ValueError):
    """A record's bytes could not be decoded as an image (the stream skips and counts it)."""


@dataclass(frozen=True)
class CropBox:
    """One crop in source-image pixels: rows [top, top+height), columns [left, left+width)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool


def sample_rrc_params(height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                      rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Draw a RandomResizedCrop box exactly as torchvision's ``get_params`` does.

    Up to 10 attempts: area fraction uniform in ``scale``, aspect ratio (w/h) log-uniform in
    ``ratio``; the first box that fits is placed uniformly. Otherwise a centre crop of the
    whole image clamped to the ratio range. Returns ``(top, left, h, w)``.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(_RRC_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return _centre_crop_fallback(height, width, ratio)


def _centre_crop_fallback(height: int, width: int,
                          ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest centred box whose ratio is within ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_plan(height: int, width: int, aug: AugmentationConfig,
                     rng: np.random.Generator) -> list[CropBox]:
    """All crop boxes of one image, global crops first (boxes first, then the flip coins).

    One box per entry of ``aug.crop_scales()``, with aspect ratio range ``aug.ratio``.
    """
    boxes = [sample_rrc_params(height, width, scale, aug.ratio, rng)
             for scale in aug.crop_scales()]
    flips = rng.random(len(boxes)) < 0.5
    return [CropBox(t, l, h, w, bool(f)) for (t, l, h, w), f in zip(boxes, flips)]


def draft_scale(plan: Sequence[CropBox], sizes: Sequence[int], min_ratio: float) -> int:
    """Largest JPEG DCT reduction (1, 2, 4 or 8) that keeps every crop >= min_ratio x its output.

    A crop of ``h x w`` source pixels resized to ``s x s`` keeps at least ``min_ratio * s``
    pixels along its shorter side after the image is decoded at ``1/scale``.
    """
    if min_ratio <= 0:
        return 1
    worst = min(min(box.height, box.width) / size for box, size in zip(plan, sizes))
    scale = 1
    while scale < 8 and worst / (scale * 2) >= min_ratio:
        scale *= 2
    return scale


def open_image(jpeg_bytes: bytes) -> Image.Image:
    """Read an image header (pixels not decoded yet); :class:`DecodeError` if unreadable."""
    try:
        return Image.open(io.BytesIO(jpeg_bytes))
    except _PIL_DECODE_ERRORS as exc:
        raise DecodeError(f"undecodable image record ({type(exc).__name__}: {exc})") from exc


def load_rgb(img: Image.Image, reduce: int = 1) -> tuple[Image.Image, float, float]:
    """Decode the pixels as RGB, at ``1/reduce`` scale (JPEG DCT scaling) when reduce > 1.

    Returns ``(rgb, sx, sy)`` where ``sx, sy`` map full-resolution coordinates onto ``rgb``.
    Raises :class:`DecodeError` when the pixel data is corrupt or truncated.
    """
    width, height = img.size
    try:
        if reduce > 1 and img.format == "JPEG":
            # PIL picks the largest DCT scale k with size // k >= the requested size
            img.draft("RGB", (max(width // reduce, 1), max(height // reduce, 1)))
        img.load()  # decodes the pixels: corrupt or truncated data fails here
        rgb = img if img.mode == "RGB" else img.convert("RGB")
    except _PIL_DECODE_ERRORS as exc:
        raise DecodeError(f"undecodable image record ({type(exc).__name__}: {exc})") from exc
    return rgb, rgb.size[0] / width, rgb.size[1] / height


@dataclass(frozen=True)
class DecodeOptions:
    """How crops are decoded and resized (speed knobs; the sampled crops do not change).

    Timings of every choice below: docs/benchmarks.md.

    decoder: ``"torchvision"`` (default) decodes JPEGs with ``torchvision.io.decode_jpeg``
      (libjpeg-turbo) straight into an (H, W, 3) uint8 tensor: faster than PIL's decode,
      and no copy out of PIL's 4-bytes-per-pixel RGB storage; the pixels are identical to
      PIL's (tested).
      Used with the torch backend for JPEGs whose PIL mode is RGB or L and that are decoded
      at full scale; everything else (PNG, CMYK, ``draft_min_ratio`` reductions, any record
      torchvision refuses) goes through PIL, which also decides what is undecodable.
      ``"pil"``: always PIL. torchvision 0.29 deprecates its decoders (TorchCodec replaces
      them); without them the PIL path runs.
    backend: ``"torch"`` resizes with ``torch.nn.functional.interpolate(mode="bilinear",
      antialias=True)`` on a compact channels-last uint8 copy of each region (vectorised
      uint8 kernel, within 1 grey level of PIL); ``"pil"`` uses
      ``Image.crop(box).resize(size, BILINEAR)``, bit-identical to torchvision's
      RandomResizedCrop on a PIL image.
      Both cut the crop first, so border pixels only see pixels inside the crop, as in
      torchvision (PIL's ``resize(box=...)`` would also blend in pixels outside the box).
    draft_min_ratio: decode JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling,
      ``Image.draft``) when every crop still spans at least ``draft_min_ratio`` x its output
      size along its shorter side at that scale; 0 (default) disables. Opt-in for datasets
      of large photos only: the crops are no longer those of a full decode (a few grey
      levels apart, more for lower ratios), and 640x480 COCO images with 224/96 px crops
      never qualify anyway.
    reducing_gap: ``Image.resize(reducing_gap=...)`` for the PIL backend (None = exact).
    """

    backend: str = "torch"
    draft_min_ratio: float = 0.0
    reducing_gap: float | None = None
    decoder: str = "torchvision"

    def __post_init__(self) -> None:
        if self.backend not in ("torch", "pil"):
            raise ValueError(
                f"DecodeOptions.backend must be 'torch' or 'pil', got {self.backend!r}")
        if self.decoder not in ("torchvision", "pil"):
            raise ValueError(
                f"DecodeOptions.decoder must be 'torchvision' or 'pil', got {self.decoder!r}")
        if self.draft_min_ratio < 0:
            raise ValueError(
                f"DecodeOptions.draft_min_ratio must be >= 0, got {self.draft_min_ratio}")
        if self.reducing_gap is not None and self.reducing_gap < 1.0:
            raise ValueError(
                f"DecodeOptions.reducing_gap must be None or >= 1, got {self.reducing_gap}")


def decode_jpeg_torchvision(jpeg_bytes: bytes):
    """(H, W, 3) uint8 torch tensor of a JPEG via ``torchvision.io.decode_jpeg`` (RGB), or
    None where torchvision refuses the record or lacks the decoder (the caller falls back to
    PIL, which then decides whether the record is undecodable)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    data = torch.frombuffer(bytearray(jpeg_bytes), dtype=torch.uint8)  # a writable copy
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TORCHVISION_DEPRECATION,
                                    category=DeprecationWarning)
            chw = decode_jpeg(data, mode=ImageReadMode.RGB)  # (3, H, W) view of HWC memory
    except RuntimeError:
        return None
    return chw.permute(1, 2, 0).contiguous()  # (H, W, 3): no copy, already contiguous


def _scaled_box(box: CropBox, sx: float, sy: float, height: int,
                width: int) -> tuple[int, int, int, int]:
    """``box`` on an image decoded at scale (sx, sy): integer (top, left, bottom, right)."""
    if sx == 1.0 and sy == 1.0:
        return box.top, box.left, box.top + box.height, box.left + box.width
    top = min(int(round(box.top * sy)), height - 1)
    left = min(int(round(box.left * sx)), width - 1)
    bottom = max(min(int(round((box.top + box.height) * sy)), height), top + 1)
    right = max(min(int(round((box.left + box.width) * sx)), width), left + 1)
    return top, left, bottom, right


def render_crops(img, plan: Sequence[CropBox], sizes: Sequence[int],
                 sx: float = 1.0, sy: float = 1.0,
                 options: DecodeOptions | None = None) -> list[np.ndarray]:
    """Cut, resize (bilinear, antialiased) and flip every crop of ``plan`` from RGB ``img``.

    ``img``: an RGB PIL image, or (torch backend only) an (H, W, 3) uint8 torch tensor.
    ``sx, sy`` map the full-resolution boxes onto ``img`` when it was decoded reduced.
    Returns one uint8 array of shape (size, size, 3) per crop, C-contiguous.
    """
    options = DecodeOptions() if options is None else options
    if options.backend == "pil":
        return _render_pil(img, plan, sizes, sx, sy, options.reducing_gap)
    if isinstance(img, Image.Image):
        img = torch.from_numpy(np.array(img))  # (H, W, 3) uint8
    return _render_torch(img, plan, sizes, sx, sy)


def _render_pil(img: Image.Image, plan: Sequence[CropBox], sizes: Sequence[int],
                sx: float, sy: float, reducing_gap: float | None) -> list[np.ndarray]:
    """PIL crop + bilinear resize (torchvision's RandomResizedCrop on PIL, bit for bit)."""
    out = []
    for box, size in zip(plan, sizes):
        top, left, bottom, right = _scaled_box(box, sx, sy, img.height, img.width)
        crop = img.crop((left, top, right, bottom)).resize(
            (size, size), resample=Image.Resampling.BILINEAR, reducing_gap=reducing_gap)
        if box.flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(np.asarray(crop))  # (size, size, 3) uint8
    return out


def _render_torch(pixels, plan: Sequence[CropBox], sizes: Sequence[int],
                  sx: float, sy: float) -> list[np.ndarray]:
    """Antialiased bilinear ``F.interpolate`` on uint8 views of ``pixels`` (H, W, 3)."""
    height, width = int(pixels.shape[0]), int(pixels.shape[1])
    chw = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels-last view, no copy
    out = []
    for box, size in zip(plan, sizes):
        top, left, bottom, right = _scaled_box(box, sx, sy, height, width)
        # a compact channels-last copy of the region: the uint8 kernel runs faster on it
        # than on the strided view (same result)
        region = chw[:, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
        crop = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)  # (1, 3, S, S), channels-last
        hwc = crop[0].permute(1, 2, 0)  # (S, S, 3), contiguous (channels-last output)
        # torch's flip copies faster than numpy's reversed-stride copy of 3-byte pixels
        out.append((hwc.flip(1) if box.flip else hwc).numpy())
    return out


def decode_and_crop(jpeg_bytes: bytes, aug: AugmentationConfig, rng: np.random.Generator,
                    options: DecodeOptions | None = None) -> list[np.ndarray]:
    """Decode one image and return its crops in order (global crops first).

    Each crop: RandomResizedCrop (torchvision semantics, bilinear with antialiasing) then a
    horizontal flip with probability 0.5. Returns ``aug.num_crops`` uint8 arrays of shape
    (size, size, 3). The random draws depend only on ``rng`` and the image size, not on
    ``options``. Raises :class:`DecodeError` when the bytes are not a decodable image.
    """
    options = DecodeOptions() if options is None else options
    sizes = aug.crop_sizes()
    img = open_image(jpeg_bytes)  # the header only: size, format and mode
    width, height = img.size
    plan = sample_crop_plan(height, width, aug, rng)
    reduce = draft_scale(plan, sizes, options.draft_min_ratio)
    if (options.decoder == "torchvision" and options.backend == "torch" and reduce == 1
            and img.format == "JPEG" and img.mode in _TORCHVISION_JPEG_MODES):
        pixels = decode_jpeg_torchvision(jpeg_bytes)  # (H, W, 3) or None
        if pixels is not None and tuple(pixels.shape) == (height, width, 3):
            img.close()
            return _render_torch(pixels, plan, sizes, 1.0, 1.0)
    rgb, sx, sy = load_rgb(img, reduce)
    return render_crops(rgb, plan, sizes, sx, sy, options)


def multicrop_images(jpegs: Sequence[Any], aug: AugmentationConfig,
                     rngs: Sequence[np.random.Generator], *, colour: bool = False,
                     options: DecodeOptions | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Decode and crop B images into per-resolution crop arrays: the one multi-crop path.

    The Ray Data stream (:func:`gaelle_ray.data.pipeline.crop_item`), the tests and the
    benchmarks all call this function.

    ``jpegs``: B encoded images (bytes; anything else counts as undecodable). ``rngs``: B
    numpy generators, ``rngs[b]`` drives image b: first its crops
    (:func:`decode_and_crop`), then one draw that seeds its colour parameters; the draw is
    made whether or not ``colour`` is set, so an image's crops and its generator's final
    state never depend on ``colour``.

    Returns ``(crops, kept)``:
      - ``crops["crops_{r}"]`` for every resolution r: uint8 (N, n_r, 3, S_r, S_r),
        channel-first, crop k of the n-th decodable image at ``[n, k]``, images in input
        order. With ``colour=True`` the colour half (jitter, grayscale, blur, normalise with
        the settings of ``aug``) runs here on the CPU (:class:`~gaelle_ray.data.colour.
        ColourAugment`) and the arrays are float16 normalised crops of the same shape
        instead: image b's parameters come from a torch generator seeded by its colour
        draw, resolution after resolution, so they are as repeatable as its crops.
      - ``kept``: (B,) bool, False for the records that failed to decode (logged and
        skipped); N = ``kept.sum()``.
    """
    if len(rngs) != len(jpegs):
        raise ValueError(f"multicrop_images needs one rng per image, got {len(rngs)} rngs "
                         f"for {len(jpegs)} images")
    crops, colour_seeds = [], []
    kept = np.zeros(len(jpegs), dtype=bool)  # (B,)
    for b, (jpeg, rng) in enumerate(zip(jpegs, rngs)):
        try:
            image_crops = decode_and_crop(jpeg, aug, rng, options)
        except DecodeError as exc:
            logger.warning("skipping an undecodable record: %s", exc)
            continue
        crops.append(image_crops)
        colour_seeds.append(int(rng.integers(0, 2**63 - 1)))
        kept[b] = True
    out = _assemble(crops, aug)
    if colour:
        _colour(out, colour_seeds, aug)
    return out, kept


def _assemble(crops: list[list[np.ndarray]], aug: AugmentationConfig) -> dict[str, np.ndarray]:
    """Per-image HWC crops (global crops first) -> ``crops_{r}``: uint8 (N, n_r, 3, S_r, S_r) per
    resolution."""
    out, first = {}, 0
    for r, (size, count) in enumerate(zip(aug.size_crops, aug.nmb_crops)):
        arr = np.empty((len(crops), count, 3, size, size), dtype=np.uint8)  # (N, n_r, 3, S, S)
        for b, image_crops in enumerate(crops):
            for k in range(count):
                arr[b, k] = image_crops[first + k].transpose(2, 0, 1)  # (S, S, 3) -> (3, S, S)
        out[f"crops_{r}"] = arr
        first += count
    return out


def _colour(out: dict[str, np.ndarray], colour_seeds: list[int], aug: AugmentationConfig) -> None:
    """Colour half on the CPU, in place: ``crops_{r}`` become float16 normalised crops.

    Image b's parameters come from a torch generator seeded with ``colour_seeds[b]``,
    resolution after resolution; the work itself is batched over the images.
    """
    generators = []
    for s in colour_seeds:
        g = torch.Generator(device="cpu")
        g.manual_seed(s)
        generators.append(g)
    augment = ColourAugment(aug, out_dtype=torch.float16)
    for r, count in enumerate(aug.nmb_crops):
        x = torch.from_numpy(out[f"crops_{r}"])  # (N, n_r, 3, S, S) uint8
        if x.shape[0] == 0:
            out[f"crops_{r}"] = x.to(torch.float16).numpy()
            continue
        params = ColourParams.cat([sample_colour_params(count, g, cfg=aug)
                                   for g in generators])  # N * n_r samples, image-major
        out[f"crops_{r}"] = augment(x, params).numpy()  # (N, n_r, 3, S, S) float16
