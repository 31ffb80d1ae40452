"""A small multi-object image set in COCO format, generated on the spot (no download).

Every image is a scene of 1 to 5 flat-ish coloured shapes on a textured background. The
class of an object is its SHAPE; its colour, size, position and rotation are random, so a
model has to look at form, not colour, to tell classes apart. Objects may overlap partially
(at most a quarter of the smaller one is covered) and may be cut by the image border.

Backgrounds are textured (noise, stripes, gradient, checker) but calm: desaturated, with a
low-contrast pattern, and objects are large (radius 12-29% of the image side), so that the
content two views of an image share is mostly its shapes rather than its background: a
few minutes of self-supervised pretraining can only learn what is easiest (how this set
came to be: docs/benchmarks.md).

Layout written by :func:`make_toy` (the standard COCO names, so the COCO reader handles it)::

    out_dir/train/000000000001.jpg ...
    out_dir/val/000000002001.jpg ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json

Category ids are deliberately not contiguous (like COCO's 1..90 with gaps), so a reader has
to map category ids to label positions in ascending-id order.

Determinism: each image is drawn from its own generator seeded with ``(seed, split, index)``,
so the output does not depend on the number of worker processes; the JSON is written with a
fixed key order and separators. Same seed -> byte-identical JSON and identical JPEG files.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TOY_CATEGORIES", "TOY_SPLITS", "make_toy", "sample_scene", "render_scene"]

logger = logging.getLogger(__name__)

# (category id, name, supercategory). Ids skip values on purpose.
TOY_CATEGORIES: tuple[tuple[int, str, str], ...] = (
    (1, "circle", "round"),
    (2, "square", "polygon"),
    (4, "triangle", "polygon"),
    (5, "star", "symbol"),
    (7, "cross", "symbol"),
    (9, "ring", "round"),
    (10, "diamond", "polygon"),
    (13, "hexagon", "polygon"),
    (16, "bar", "round"),
    (17, "crescent", "round"),
    (20, "arrow", "symbol"),
    (23, "heart", "symbol"),
)

# Split name -> code mixed into the per-image seed.
TOY_SPLITS: dict[str, int] = {"train": 0, "val": 1}

_SUPERSAMPLE = 2  # masks are drawn at 2x and averaged down, for anti-aliased edges
_MAX_OBJECTS = 5
_MAX_OVERLAP = 0.25  # fraction of the smaller object that another one may cover
_JPEG_QUALITY = 90
_MIN_CONTRAST = 80.0  # RGB distance between an object and the ground under it
_MIN_IMAGE_SIZE = 32
_BACKGROUND_SATURATION = 0.4  # background colours are pulled this far towards their grey
_BACKGROUND_CONTRAST = 0.4  # and the pattern's second colour this far towards the first
_RADIUS = (0.12, 0.29)  # object radius, fraction of the image side
_IMAGE_NAME = re.compile(r"^\d{12}\.jpg$")

# Shapes whose rotation is limited so that they stay distinct (a square turned by 45 degrees
# would be a diamond; a cross turned by 45 degrees an "x").
_ROTATION_LIMIT_DEG = {"square": 20.0, "diamond": 25.0, "cross": 20.0, "heart": 25.0}


# ----------------------------------------------------------------------------- scene sampling


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    """A random saturated-ish RGB colour, float array (3,) in [0, 255]."""
    hue = rng.uniform(0.0, 1.0)
    sat = rng.uniform(0.35, 1.0)
    val = rng.uniform(0.3, 1.0)
    # HSV -> RGB by hand (colorsys works on scalars too, but this keeps it in numpy)
    k = (np.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    rgb = val - val * sat * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    return rgb * 255.0


def _sample_background(rng: np.random.Generator) -> dict[str, Any]:
    """Parameters of one textured background: kind, two colours, pattern geometry."""
    kind = str(rng.choice(["noise", "stripes", "gradient", "checker"]))
    c1 = _random_colour(rng) * rng.uniform(0.5, 1.0)
    target = _random_colour(rng)
    contrast = rng.uniform(0.25, 0.6)  # keep backgrounds calmer than the objects
    c2 = c1 + (target - c1) * contrast
    grey = c1.mean()
    calm1 = grey + (c1 - grey) * _BACKGROUND_SATURATION
    calm2 = calm1 + (c2 - calm1) * _BACKGROUND_CONTRAST
    return {
        "kind": kind,
        "c1": calm1.tolist(),
        "c2": calm2.tolist(),
        "angle": float(rng.uniform(0.0, math.pi)),
        "period": float(rng.uniform(0.05, 0.2)),  # fraction of the image size
        "blobs": int(rng.integers(3, 12)),
        "blob_seed": int(rng.integers(0, 2**31 - 1)),
        "noise": float(rng.uniform(3.0, 10.0)),
    }


def _sample_object(rng: np.random.Generator, image_size: int) -> dict[str, Any]:
    """One object: class index, centre, radius (pixels), rotation, colour, shading."""
    cls = int(rng.integers(0, len(TOY_CATEGORIES)))
    name = TOY_CATEGORIES[cls][1]
    radius = float(rng.uniform(*_RADIUS) * image_size)
    margin = 0.5 * radius
    limit = math.radians(_ROTATION_LIMIT_DEG.get(name, 180.0))
    return {
        "cls": cls,
        "cx": float(rng.uniform(margin, image_size - margin)),
        "cy": float(rng.uniform(margin, image_size - margin)),
        "r": radius,
        "angle": float(rng.uniform(-limit, limit)),
        "colour": _random_colour(rng).tolist(),
        "alt_colour": _random_colour(rng).tolist(),  # used if colour is too close to the ground
        "shade": float(rng.uniform(-40.0, 40.0)),  # brightness change across the object
        "shade_angle": float(rng.uniform(0.0, 2.0 * math.pi)),
    }


def sample_scene(rng: np.random.Generator, image_size: int) -> dict[str, Any]:
    """Draw the parameters of one scene (no pixels): background and 1..5 objects.

    Placement and overlap are decided at render time (:func:`render_scene`), which needs the
    object masks; this only samples what to draw.

    Returns:
        {"background": dict, "n_objects": int (1..5), "objects": list of dict with keys cls, cx, cy, r, angle,
        colour (3 floats), shade, shade_angle}. Candidates beyond the 1..5 target are spares
        used when a placement is rejected for overlapping too much.
    """
    n_objects = int(rng.integers(1, _MAX_OBJECTS + 1))
    candidates = [_sample_object(rng, image_size) for _ in range(3 * _MAX_OBJECTS)]
    return {"background": _sample_background(rng), "n_objects": n_objects, "objects": candidates}


# ----------------------------------------------------------------------------- shape geometry


def _rotate(points: np.ndarray, angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    """points: (N, 2) offsets around the origin -> rotated, translated list of (x, y)."""
    c, s = math.cos(angle), math.sin(angle)
    x = points[:, 0] * c - points[:, 1] * s + cx
    y = points[:, 0] * s + points[:, 1] * c + cy
    return list(zip(x.tolist(), y.tolist()))


def _regular_polygon(n: int, radius: float, start: float = -math.pi / 2) -> np.ndarray:
    t = start + 2.0 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(radius: float) -> np.ndarray:
    t = -math.pi / 2 + math.pi * np.arange(10) / 5
    rr = np.where(np.arange(10) % 2 == 0, radius, 0.42 * radius)
    return np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)


def _cross(radius: float) -> np.ndarray:
    a, w = radius, 0.3 * radius
    return np.array(
        [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w),
         (w, a), (-w, a), (-w, w), (-a, w), (-a, -w), (-w, -w)]
    )


def _arrow(radius: float) -> np.ndarray:
    r = radius
    return np.array(
        [(-r, -0.18 * r), (0.15 * r, -0.18 * r), (0.15 * r, -0.6 * r), (r, 0.0),
         (0.15 * r, 0.6 * r), (0.15 * r, 0.18 * r), (-r, 0.18 * r)]
    )


def _heart(radius: float) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 48, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) * (radius / 16.5)


def _ellipse(rx: float, ry: float) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, 40, endpoint=False)
    return np.stack([rx * np.cos(t), ry * np.sin(t)], axis=1)


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, r: float,
                angle: float) -> None:
    """Draw one shape with value 255 (holes with 0) on an "L" mask. Coordinates in mask pixels."""
    disk = (cx - r, cy - r, cx + r, cy + r)
    if name == "circle":
        draw.ellipse(disk, fill=255)
    elif name == "ring":
        draw.ellipse(disk, fill=255)
        q = 0.55 * r
        draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=0)
    elif name == "crescent":
        draw.ellipse(disk, fill=255)
        q, off = 0.85 * r, 0.5 * r
        ox, oy = cx + off * math.cos(angle), cy + off * math.sin(angle)
        draw.ellipse((ox - q, oy - q, ox + q, oy + q), fill=0)
    else:
        draw.polygon(_rotate(_polygon(name, r), angle, cx, cy), fill=255)


def _polygon(name: str, r: float) -> np.ndarray:
    """Outline of a polygonal shape around the origin, (N, 2)."""
    if name == "square":
        return np.array([(-0.8 * r, -0.8 * r), (0.8 * r, -0.8 * r), (0.8 * r, 0.8 * r),
                         (-0.8 * r, 0.8 * r)])
    if name == "triangle":
        return _regular_polygon(3, r)
    if name == "star":
        return _star(r)
    if name == "cross":
        return _cross(r)
    if name == "diamond":
        return np.array([(0.0, -r), (0.55 * r, 0.0), (0.0, r), (-0.55 * r, 0.0)])
    if name == "hexagon":
        return _regular_polygon(6, r, start=0.0)
    if name == "bar":
        return _ellipse(r, 0.3 * r)
    if name == "arrow":
        return _arrow(r)
    if name == "heart":
        return _heart(r)
    raise ValueError(f"unknown toy shape {name!r}")


def _object_mask(obj: dict[str, Any], image_size: int) -> np.ndarray:
    """Anti-aliased coverage of one object, float32 (H, W) in [0, 1]."""
    big = image_size * _SUPERSAMPLE
    mask = Image.new("L", (big, big), 0)
    name = TOY_CATEGORIES[obj["cls"]][1]
    s = _SUPERSAMPLE
    _draw_shape(ImageDraw.Draw(mask), name, obj["cx"] * s, obj["cy"] * s, obj["r"] * s,
                obj["angle"])
    small = mask.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------- rendering


@functools.lru_cache(maxsize=4)
def _grid(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (yy, xx), each float32 (H, W); cached, treat as read-only."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    return yy, xx


def _background(bg: dict[str, Any], image_size: int) -> np.ndarray:
    """Textured background, float32 (H, W, 3) in [0, 255]."""
    n = image_size
    yy, xx = (g / n for g in _grid(n))
    c1, c2 = np.asarray(bg["c1"], np.float32), np.asarray(bg["c2"], np.float32)
    proj = xx * math.cos(bg["angle"]) + yy * math.sin(bg["angle"])
    if bg["kind"] == "stripes":
        t = 0.5 + 0.5 * np.tanh(4.0 * np.sin(2.0 * math.pi * proj / bg["period"]))
    elif bg["kind"] == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    elif bg["kind"] == "checker":
        cell = max(1, int(bg["period"] * n))
        t = ((np.arange(n)[:, None] // cell + np.arange(n)[None, :] // cell) % 2).astype(np.float32)
    else:  # smooth random blobs
        blob_rng = np.random.default_rng(bg["blob_seed"])
        low = (blob_rng.uniform(0, 255, (bg["blobs"], bg["blobs"]))).astype(np.uint8)
        t = np.asarray(Image.fromarray(low).resize((n, n), Image.Resampling.BICUBIC),
                       np.float32) / 255.0
    return c1 + (c2 - c1) * t[..., None]


def _overlaps_too_much(mask: np.ndarray, placed: list[np.ndarray]) -> bool:
    """True if mask covers, or is covered by, more than _MAX_OVERLAP of a placed object."""
    area = float(mask.sum())
    for other in placed:
        inter = float(np.minimum(mask, other).sum())
        if inter > _MAX_OVERLAP * min(area, float(other.sum())):
            return True
    return False


def _visible_colour(obj: dict[str, Any], canvas: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The object's colour, or its alternative / complement if that stands out more.

    canvas: (H, W, 3) float32; mask: (H, W) float32. Returns (3,) float32. The choice depends
    only on the pixels under the object, so it does not tie a colour to a class.
    """
    under = (canvas * mask[..., None]).sum(axis=(0, 1)) / max(float(mask.sum()), 1e-6)
    colour = np.asarray(obj["colour"], np.float32)
    if float(np.linalg.norm(colour - under)) >= _MIN_CONTRAST:
        return colour
    options = [colour, np.asarray(obj["alt_colour"], np.float32), 255.0 - colour]
    return max(options, key=lambda c: float(np.linalg.norm(c - under)))


def _shaded_fill(obj: dict[str, Any], colour: np.ndarray, image_size: int) -> np.ndarray:
    """Object colour with a linear brightness ramp across it, float32 (H, W, 3)."""
    yy, xx = _grid(image_size)
    ramp = ((xx - obj["cx"]) * math.cos(obj["shade_angle"])
            + (yy - obj["cy"]) * math.sin(obj["shade_angle"])) / max(obj["r"], 1.0)
    ramp = np.clip(ramp, -1.0, 1.0) * obj["shade"]
    return colour + ramp[..., None]


def _bbox(mask: np.ndarray) -> list[float] | None:
    """COCO [x, y, w, h] of the pixels covered at least half, or None if too small."""
    ys, xs = np.nonzero(mask >= 0.5)
    if xs.size == 0:
        return None
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]


def render_scene(scene: dict[str, Any], image_size: int,
                 noise_rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Render a scene from :func:`sample_scene`.

    Candidates are placed in order; one that overlaps a placed object too much, or is too
    small once clipped by the border, is passed over, until ``n_objects`` are placed (at
    least one always is: the first candidate is never rejected for overlap).

    Returns:
        image: uint8 (H, W, 3) with H = W = image_size.
        objects: list of {"cls": int (index into TOY_CATEGORIES), "bbox": [x, y, w, h],
        "area": float (pixels covered)}, in drawing order.
    """
    canvas = _background(scene["background"], image_size)
    placed: list[np.ndarray] = []
    objects: list[dict[str, Any]] = []
    for obj in scene["objects"]:
        if len(objects) == scene["n_objects"]:
            break
        mask = _object_mask(obj, image_size)
        bbox = _bbox(mask)
        if bbox is None or _overlaps_too_much(mask, placed):
            continue
        alpha = mask[..., None]
        fill = _shaded_fill(obj, _visible_colour(obj, canvas, mask), image_size)
        canvas = canvas * (1.0 - alpha) + fill * alpha
        placed.append(mask)
        objects.append({"cls": obj["cls"], "bbox": bbox, "area": float(round(mask.sum(), 2))})
    grain = noise_rng.normal(0.0, scene["background"]["noise"], canvas.shape[:2])
    canvas = canvas + grain[..., None].astype(np.float32)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), objects


# ----------------------------------------------------------------------------- data set


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, TOY_SPLITS[split], index])


def _make_image(task: tuple[str, int, str, int, int]) -> list[dict[str, Any]]:
    """Render and save one image; task = (path, seed, split, index, image_size)."""
    path, seed, split, index, image_size = task
    rng = _image_rng(seed, split, index)
    scene = sample_scene(rng, image_size)
    pixels, objects = render_scene(scene, image_size, rng)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=_JPEG_QUALITY)
    return objects


def _image_id(split: str, index: int, n_train: int) -> int:
    """Image ids are unique across splits: train 1..n_train, val after that."""
    return index + 1 if split == "train" else n_train + index + 1


def _coco_json(split: str, n_train: int, image_size: int,
               per_image: list[list[dict[str, Any]]]) -> dict[str, Any]:
    images, annotations = [], []
    for index, objects in enumerate(per_image):
        image_id = _image_id(split, index, n_train)
        images.append({"id": image_id, "file_name": f"{image_id:012d}.jpg",
                       "width": image_size, "height": image_size})
        for obj in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id,
                "category_id": TOY_CATEGORIES[obj["cls"]][0], "bbox": obj["bbox"],
                "area": obj["area"], "iscrowd": 0,
            })
    categories = [{"id": cid, "name": name, "supercategory": sup}
                  for cid, name, sup in TOY_CATEGORIES]
    info = {"description": "gaelle-ray toy shapes (generated)", "version": "1.0",
            "contributor": "gaelle_ray.data.toy"}
    return {"info": info, "licenses": [], "images": images, "annotations": annotations,
            "categories": categories}


def _run_tasks(tasks: list[tuple], workers: int, desc: str = "") -> list[list[dict[str, Any]]]:
    """Render the images of `tasks`; a progress bar (gaelle_ray.progress) on a terminal."""
    from gaelle_ray.progress import bar

    if workers <= 1 or len(tasks) < 64:
        return [_make_image(t) for t in bar(tasks, desc=desc, unit="img")]
    # spawn, not fork: safe next to threaded libraries (pyarrow, torch). A broken worker
    # raises BrokenProcessPool instead of hanging, as multiprocessing.Pool would.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(bar(pool.map(_make_image, tasks, chunksize=32), total=len(tasks), desc=desc, unit="img"))


def _remove_stale_images(image_dir: str, keep: set[str]) -> None:
    """Delete toy images of an earlier, differently sized run (names this module writes)."""
    for name in os.listdir(image_dir):
        if _IMAGE_NAME.match(name) and name not in keep:
            os.remove(os.path.join(image_dir, name))


def _check_args(n_train: int, n_val: int, image_size: int, workers: int) -> None:
    for key, value in (("n_train", n_train), ("n_val", n_val)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {value!r}")
    if n_train + n_val == 0:
        raise ValueError("n_train + n_val must be > 0")
    if not isinstance(image_size, int) or image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {_MIN_IMAGE_SIZE}, got {image_size!r}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")


def make_toy(out_dir: str | os.PathLike, n_train: int = 2000, n_val: int = 500,
             image_size: int = 128, seed: int = 0, workers: int = 1) -> dict[str, Any]:
    """Generate the toy multi-object data set in COCO format under ``out_dir``.

    Args:
        out_dir: local directory (created; existing files of the same names are overwritten).
        n_train: number of training images (>= 0).
        n_val: number of validation images (>= 0).
        image_size: side of the square images in pixels (>= 32).
        seed: base seed; image i of split s is drawn from the seed (seed, s, i).
        workers: processes used to render (1 = in this process). The output does not
            depend on it.

    Returns:
        {"out_dir": str, "class_names": list[str] (ascending category id),
        "category_ids": list[int], "image_size": int, "seed": int,
        "splits": {split: {"images": int, "annotations": int, "image_dir": str,
        "ann_file": str}}} for the splits with at least one image.
    """
    _check_args(n_train, n_val, image_size, workers)
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    start = time.perf_counter()
    summary: dict[str, Any] = {
        "out_dir": out_dir,
        "class_names": [name for _, name, _ in TOY_CATEGORIES],
        "category_ids": [cid for cid, _, _ in TOY_CATEGORIES],
        "image_size": image_size, "seed": seed, "splits": {},
    }
    for split, count in (("train", n_train), ("val", n_val)):
        if count == 0:
            continue
        image_dir = os.path.join(out_dir, split)
        os.makedirs(image_dir, exist_ok=True)
        tasks = [(os.path.join(image_dir, f"{_image_id(split, i, n_train):012d}.jpg"),
                  seed, split, i, image_size) for i in range(count)]
        _remove_stale_images(image_dir, {os.path.basename(t[0]) for t in tasks})
        coco = _coco_json(split, n_train, image_size, _run_tasks(tasks, workers, desc=f"toy {split}"))
        ann_file = os.path.join(out_dir, "annotations", f"instances_{split}.json")
        with open(ann_file, "w", encoding="utf-8") as f:
            json.dump(coco, f, separators=(",", ":"), sort_keys=True)
        summary["splits"][split] = {"images": count, "annotations": len(coco["annotations"]),
                                    "image_dir": image_dir, "ann_file": ann_file}
    logger.info("toy data set: %d images in %.1f s under %s", n_train + n_val,
                time.perf_counter() - start, out_dir)
    return summary
