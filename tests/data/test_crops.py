"""CPU multi-crop: crop settings, RandomResizedCrop sampling, decode, crop, flip, and the one
batch path (multicrop_images) with and without the colour half (method.md 1)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TVF
from PIL import Image

from gaelle_ray.config import AugmentationConfig
from gaelle_ray.data.crops import (CropBox, DecodeError, DecodeOptions, decode_and_crop,
                                   draft_scale, multicrop_images, render_crops, sample_crop_plan,
                                   sample_rrc_params)

SMALL = AugmentationConfig(size_crops=[48, 24], nmb_crops=[2, 3], min_scale_crops=[0.14, 0.05],
                           max_scale_crops=[1.0, 0.14])


def _pixels(width: int, height: int, seed: int = 0) -> np.ndarray:
    """(height, width, 3) uint8 smooth colour pattern plus noise (JPEG-friendly, not flat)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(xx / 9.0) * 90 + 128, np.cos(yy / 7.0) * 90 + 128,
                     (xx * 255.0 / width + yy) % 256], axis=-1)  # (H, W, 3)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _jpeg(width: int = 160, height: int = 120, seed: int = 0, mode: str = "RGB") -> bytes:
    img = Image.fromarray(_pixels(width, height, seed))
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [_jpeg(160 + 8 * i, 120 - 4 * i, seed=i) for i in range(6)]


# ---------------------------------------------------------------------- crop settings


def test_crop_settings_defaults_follow_method_and_validate():
    aug = AugmentationConfig()
    assert aug.crop_sizes() == [224, 224] + [96] * 6
    assert aug.crop_scales()[0] == (0.14, 1.0) and aug.crop_scales()[-1] == (0.05, 0.14)
    assert aug.num_crops == 8 and aug.num_global_crops == 2
    assert aug.ratio == pytest.approx((0.75, 4 / 3))
    assert isinstance(SMALL.size_crops, tuple)  # lists are stored as tuples (hashable)
    hash(SMALL)
    bad = [(dict(nmb_crops=[2]), "size_crops"), (dict(size_crops=[]), "size_crops"),
           (dict(size_crops=[224, 0]), "size_crops"), (dict(nmb_crops=[2, -1]), "nmb_crops"),
           (dict(min_scale_crops=[0.5, 0.05], max_scale_crops=[0.4, 0.14]), "min_scale_crops"),
           (dict(ratio=(1.5, 1.0)), "ratio"), (dict(size_crops=224), "size_crops"),
           (dict(size_crops=[224.0, 96]), r"size_crops\[0\]"), (dict(ratio=(1.0,)), "ratio")]
    for kwargs, key in bad:
        with pytest.raises(ValueError, match=f"augmentation.{key}"):
            AugmentationConfig(**kwargs)
    with pytest.raises(ValueError, match="same length"):
        AugmentationConfig(size_crops=[224, 96], nmb_crops=[2, 6], min_scale_crops=[0.1],
                           max_scale_crops=[1.0, 0.2])


# ---------------------------------------------------------------------- RandomResizedCrop params


@pytest.mark.parametrize("height,width", [(480, 640), (120, 100), (50, 400), (400, 50)])
def test_rrc_boxes_inside_image_and_within_bounds(height, width):
    rng = np.random.default_rng(0)
    scale, ratio = (0.05, 0.14), (3 / 4, 4 / 3)
    fallback = tuple(_fallback(height, width, ratio))
    for _ in range(500):
        top, left, h, w = box = sample_rrc_params(height, width, scale, ratio, rng)
        assert 0 <= top and 0 <= left and 0 < h and 0 < w
        assert top + h <= height and left + w <= width
        if box == fallback:  # all 10 attempts failed (rare for these sizes)
            continue
        # a sampled box: area and ratio within bounds up to the rounding of h and w
        area = h * w / (height * width)
        slack = (h + w + 1) / (height * width)
        assert scale[0] - slack <= area <= scale[1] + slack
        assert ratio[0] * (1 - 1.5 / h) <= w / h <= ratio[1] * (1 + 1.5 / h)


def _fallback(height, width, ratio):
    return T.RandomResizedCrop.get_params(torch.zeros(1, height, width), [9.0, 9.5], list(ratio))


@pytest.mark.parametrize("height,width", [(480, 640), (100, 100), (60, 400), (400, 60), (301, 77)])
def test_rrc_fallback_is_torchvision_centre_crop(height, width):
    ratio = (3 / 4, 4 / 3)  # impossible scale: all 10 attempts fail
    got = sample_rrc_params(height, width, (9.0, 9.5), ratio, np.random.default_rng(0))
    assert got == tuple(_fallback(height, width, ratio))


def test_rrc_distribution_matches_torchvision():
    """Statistics of the numpy sampler against torchvision's get_params (same semantics)."""
    height, width, n = 120, 160, 4000
    rng = np.random.default_rng(1)
    torch.manual_seed(1)
    img = torch.zeros(1, height, width)
    for scale in ((0.14, 1.0), (0.05, 0.14)):
        ours = np.array([sample_rrc_params(height, width, scale, (3 / 4, 4 / 3), rng)
                         for _ in range(n)])  # (n, 4): top, left, h, w
        ref = np.array([T.RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])
                        for _ in range(n)])  # (n, 4)
        for stat in (lambda b: b[:, 2] * b[:, 3] / (height * width),  # area fraction
                     lambda b: np.log(b[:, 3] / b[:, 2]),  # log aspect ratio
                     lambda b: (b[:, 0] + b[:, 2] / 2) / height,  # box centre row
                     lambda b: (b[:, 1] + b[:, 3] / 2) / width):  # box centre column
            a, r = stat(ours), stat(ref)
            assert abs(a.mean() - r.mean()) < 5 * math.sqrt((a.var() + r.var()) / n)
            assert abs(a.std() - r.std()) < 0.1 * r.std()
        area = ours[:, 2] * ours[:, 3] / (height * width)
        assert area.min() < scale[0] + 0.05 * (scale[1] - scale[0])
        assert area.max() > scale[1] - 0.1 * (scale[1] - scale[0])


def test_plan_flips_half_of_the_crops():
    rng = np.random.default_rng(2)
    flips = [box.flip for _ in range(1000) for box in sample_crop_plan(120, 160, SMALL, rng)]
    assert abs(np.mean(flips) - 0.5) < 4.5 * math.sqrt(0.25 / len(flips))


def test_plan_boxes_follow_each_resolution_scale_and_the_ratio():
    """Crop k of a plan is drawn from the scale range of its own resolution (global crops
    first) and the aspect-ratio range of the settings."""
    height, width = 120, 160
    aug = AugmentationConfig(size_crops=[48, 24], nmb_crops=[2, 3], min_scale_crops=[0.3, 0.05],
                             max_scale_crops=[1.0, 0.12], ratio=(0.5, 2.0))
    rng = np.random.default_rng(5)
    boxes = [sample_crop_plan(height, width, aug, rng) for _ in range(400)]
    area = np.array([[b.height * b.width for b in plan] for plan in boxes]) / (height * width)
    slack = (height + width + 1) / (height * width)  # rounding of h and w
    assert area.shape == (400, 5)
    (glo, ghi), (llo, lhi) = (0.3, 1.0), (0.05, 0.12)
    assert area[:, :2].min() >= glo - slack and area[:, :2].max() <= ghi + slack
    assert area[:, 2:].min() >= llo - slack and area[:, 2:].max() <= lhi + slack
    assert area[:, :2].min() < glo + 0.1 and area[:, :2].max() > ghi - 0.1  # the range is used
    assert area[:, 2:].min() < llo + 0.02 and area[:, 2:].max() > lhi - 0.02
    aspect = np.array([b.width / b.height for plan in boxes for b in plan])
    assert aspect.min() >= 0.5 * 0.9 and aspect.max() <= 2.0 * 1.1
    assert aspect.min() < 0.6 and aspect.max() > 1.6  # beyond the default (3/4, 4/3)


def test_image_size_errors():
    with pytest.raises(ValueError, match="positive"):
        sample_rrc_params(0, 10, (0.1, 1.0), (0.75, 1.33), np.random.default_rng(0))


# ---------------------------------------------------------------------- decode and crop


def test_decode_and_crop_shapes_and_order():
    crops = decode_and_crop(_jpeg(640, 480), AugmentationConfig(), np.random.default_rng(0))
    assert [c.shape for c in crops] == [(224, 224, 3)] * 2 + [(96, 96, 3)] * 6
    assert all(c.dtype == np.uint8 and c.flags["C_CONTIGUOUS"] for c in crops)
    assert all(c.std() > 5 for c in crops)  # real content, not blank


def test_same_seed_same_crops_other_seed_other_crops(jpegs):
    a = decode_and_crop(jpegs[0], SMALL, np.random.default_rng(7))
    b = decode_and_crop(jpegs[0], SMALL, np.random.default_rng(7))
    c = decode_and_crop(jpegs[0], SMALL, np.random.default_rng(8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _torchvision_crops(jpeg: bytes, aug: AugmentationConfig, seed: int) -> list[np.ndarray]:
    """The same boxes and flips, cut with torchvision on the PIL image (the reference)."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    plan = sample_crop_plan(img.height, img.width, aug, np.random.default_rng(seed))
    out = []
    for box, size in zip(plan, aug.crop_sizes()):
        crop = TVF.resized_crop(img, box.top, box.left, box.height, box.width, [size, size],
                                interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        out.append(np.asarray(TVF.hflip(crop) if box.flip else crop))
    return out


def test_pil_backend_is_exactly_torchvision_random_resized_crop(jpegs):
    opts = DecodeOptions(backend="pil", draft_min_ratio=0)
    for i, jpeg in enumerate(jpegs[:3]):
        got = decode_and_crop(jpeg, SMALL, np.random.default_rng(i), opts)
        for g, r in zip(got, _torchvision_crops(jpeg, SMALL, i)):
            np.testing.assert_array_equal(g, r)


def test_torch_backend_within_one_grey_level_of_torchvision(jpegs):
    opts = DecodeOptions(backend="torch", draft_min_ratio=0)
    for i, jpeg in enumerate(jpegs[:3]):
        got = decode_and_crop(jpeg, SMALL, np.random.default_rng(i), opts)
        for g, r in zip(got, _torchvision_crops(jpeg, SMALL, i)):
            diff = np.abs(g.astype(int) - r.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.5


def test_flip_mirrors_the_crop(jpegs):
    img = Image.open(io.BytesIO(jpegs[0])).convert("RGB")
    box = CropBox(top=10, left=20, height=60, width=70, flip=False)
    flipped = CropBox(top=10, left=20, height=60, width=70, flip=True)
    for backend in ("torch", "pil"):
        opts = DecodeOptions(backend=backend)
        plain, mirrored = render_crops(img, [box, flipped], [32, 32], options=opts)
        np.testing.assert_array_equal(mirrored, plain[:, ::-1])


def test_draft_scale_choice():
    big = CropBox(0, 0, 800, 900, False)
    small = CropBox(0, 0, 100, 120, False)
    assert draft_scale([big], [96], 2.0) == 4  # 800 / 96 = 8.3 -> 4 keeps 2.08x
    assert draft_scale([big, small], [96, 96], 2.0) == 1  # the small crop forbids it
    assert draft_scale([big], [96], 0.0) == 1  # disabled
    assert draft_scale([CropBox(0, 0, 4000, 4000, False)], [32], 1.0) == 8  # capped at 1/8


def test_draft_reduces_the_decode_size():
    from gaelle_ray.data.crops import load_rgb, open_image

    rgb, sx, sy = load_rgb(open_image(_jpeg(641, 427)), 2)
    assert rgb.size == (321, 214)
    assert sx == pytest.approx(321 / 641) and sy == pytest.approx(214 / 427)
    assert load_rgb(open_image(_jpeg(641, 427)), 1)[0].size == (641, 427)


def _smooth_jpeg(width: int, height: int) -> bytes:
    """A photo-like image: low-frequency colour fields plus mild noise."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(xx / 80.0) * 80 + 128, np.cos(yy / 60.0) * 80 + 128,
                     (xx + yy) * 200.0 / (width + height) + 20], axis=-1)  # (H, W, 3)
    pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_draft_decode_is_close_to_full_decode():
    jpeg = _smooth_jpeg(1200, 900)
    aug = AugmentationConfig(size_crops=[64], nmb_crops=[4], min_scale_crops=[0.3],
                             max_scale_crops=[1.0])
    plan = sample_crop_plan(900, 1200, aug, np.random.default_rng(0))
    assert draft_scale(plan, aug.crop_sizes(), 2.0) >= 2  # the reduced decode is exercised
    assert DecodeOptions().draft_min_ratio == 0  # off unless asked for
    for backend in ("torch", "pil"):
        full = decode_and_crop(jpeg, aug, np.random.default_rng(0), DecodeOptions(backend))
        draft = decode_and_crop(jpeg, aug, np.random.default_rng(0),
                                DecodeOptions(backend=backend, draft_min_ratio=2.0))
        for f, d in zip(full, draft):
            assert f.shape == d.shape
            assert np.abs(f.astype(int) - d.astype(int)).mean() < 2.5


def test_grayscale_and_png_records_decode_to_rgb():
    for data in (_jpeg(100, 80, mode="L"), _png(100, 80)):
        crops = decode_and_crop(data, SMALL, np.random.default_rng(0))
        assert [c.shape for c in crops] == [(48, 48, 3)] * 2 + [(24, 24, 3)] * 3


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pixels(width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("bad", [b"", b"not an image at all", None, "a string"])
def test_undecodable_records_raise_decode_error(bad):
    with pytest.raises(DecodeError):
        decode_and_crop(bad, SMALL, np.random.default_rng(0))


def test_truncated_jpeg_raises_decode_error(jpegs):
    with pytest.raises(DecodeError) as info:
        decode_and_crop(jpegs[0][: len(jpegs[0]) // 2], SMALL, np.random.default_rng(0))
    assert isinstance(info.value, ValueError)


def test_decode_options_validate():
    for kwargs in (dict(backend="cv2"), dict(draft_min_ratio=-1.0), dict(reducing_gap=0.5),
                   dict(decoder="cv2")):
        with pytest.raises(ValueError, match="DecodeOptions"):
            DecodeOptions(**kwargs)


# ---------------------------------------------------------------------- batches: multicrop_images


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One generator per image, as the stream gives each image its own."""
    return [np.random.default_rng((seed, b)) for b in range(n)]


def test_multicrop_images_shapes_and_consistency(jpegs):
    rngs = _rngs(3, 4)
    out, kept = multicrop_images(jpegs[:4], SMALL, rngs)
    assert sorted(out) == ["crops_0", "crops_1"]
    assert out["crops_0"].shape == (4, 2, 3, 48, 48) and out["crops_0"].dtype == np.uint8
    assert out["crops_1"].shape == (4, 3, 3, 24, 24) and out["crops_1"].dtype == np.uint8
    assert kept.dtype == bool and kept.tolist() == [True] * 4
    # row b, crop k is decode_and_crop's crop of image b with its own rng, channel-first;
    # then one more draw of that rng (the colour seed), colour or not
    for b, rng in enumerate(_rngs(3, 4)):
        ref = decode_and_crop(jpegs[b], SMALL, rng)
        for k in range(2):
            np.testing.assert_array_equal(out["crops_0"][b, k], ref[k].transpose(2, 0, 1))
        for k in range(3):
            np.testing.assert_array_equal(out["crops_1"][b, k], ref[2 + k].transpose(2, 0, 1))
        rng.integers(0, 2**63 - 1)
        assert rng.random() == rngs[b].random()


def test_multicrop_images_drops_undecodable_records(jpegs):
    records = [jpegs[0], b"garbage", jpegs[1], jpegs[2][:300], jpegs[3]]
    out, kept = multicrop_images(records, SMALL, _rngs(0, 5))
    assert kept.tolist() == [True, False, True, False, True]
    assert out["crops_0"].shape[0] == 3 and out["crops_1"].shape[0] == 3
    for n, b in enumerate((0, 2, 4)):  # the decodable images, in input order
        ref = decode_and_crop(records[b], SMALL, _rngs(0, 5)[b])
        np.testing.assert_array_equal(out["crops_1"][n, 2], ref[4].transpose(2, 0, 1))


def test_multicrop_images_all_bad_and_empty():
    out, kept = multicrop_images([b"x", b"y", None], SMALL, _rngs(0, 3))
    assert kept.tolist() == [False] * 3
    assert out["crops_0"].shape == (0, 2, 3, 48, 48) and out["crops_1"].shape == (0, 3, 3, 24, 24)
    empty, kept = multicrop_images([], SMALL, [], colour=True)
    assert kept.shape == (0,) and empty["crops_0"].shape == (0, 2, 3, 48, 48)
    assert empty["crops_0"].dtype == np.float16


def test_multicrop_images_needs_one_rng_per_image(jpegs):
    with pytest.raises(ValueError, match="one rng per image"):
        multicrop_images(jpegs[:2], SMALL, _rngs(0, 1))


def test_multicrop_images_accepts_any_sequence(jpegs):
    for records in (tuple(jpegs[:2]), np.array(jpegs[:2], dtype=object)):
        out, kept = multicrop_images(records, SMALL, _rngs(0, 2))
        assert out["crops_0"].shape[0] == 2 and kept.tolist() == [True, True]


def test_multicrop_images_colour_on_cpu(jpegs):
    records = jpegs[:3] + [b"bad"]
    out, kept = multicrop_images(records, SMALL, _rngs(4, 4), colour=True)
    assert out["crops_0"].dtype == np.float16 and out["crops_0"].shape == (3, 2, 3, 48, 48)
    assert out["crops_1"].dtype == np.float16 and out["crops_1"].shape == (3, 3, 3, 24, 24)
    x = out["crops_0"].astype(np.float32)
    assert np.isfinite(x).all() and x.min() >= -2.2 and x.max() <= 2.7  # normalised range
    assert kept.tolist() == [True, True, True, False]
    again, _ = multicrop_images(records, SMALL, _rngs(4, 4), colour=True)
    np.testing.assert_array_equal(out["crops_1"], again["crops_1"])


def test_reference_pipeline_produces_normalised_crops(jpegs):
    """benchmarks/pipeline_reference.py: the per-image torchvision pipeline it is compared to."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "pipeline_reference.py"
    module_spec = importlib.util.spec_from_file_location("pipeline_reference", path)
    reference = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(reference)
    dataset = reference.reference_dataset(jpegs[:2], SMALL)
    assert len(dataset) == 2
    crops = dataset[1]
    assert [tuple(c.shape) for c in crops] == [(3, 48, 48)] * 2 + [(3, 24, 24)] * 3
    assert all(c.dtype == torch.float32 and c.min() >= -2.2 and c.max() <= 2.7 for c in crops)


def test_multicrop_images_colour_is_the_batched_colour_of_its_crops(jpegs):
    """colour=True runs the fast CPU colour path: the batched float32 ops on the same uint8
    crops with the same parameters agree within float16 output rounding."""
    from gaelle_ray.data.colour import ColourAugment
    from gaelle_ray.data.colour_ops import ColourParams, sample_colour_params

    plain, _ = multicrop_images(jpegs[:3], SMALL, _rngs(11, 3))
    coloured, _ = multicrop_images(jpegs[:3], SMALL, _rngs(11, 3), colour=True)
    # image b's colour seed is the next draw of its rng after its crops (see multicrop_images)
    generators = []
    for b, rng in enumerate(_rngs(11, 3)):
        decode_and_crop(jpegs[b], SMALL, rng)
        generators.append(torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1))))
    reference = ColourAugment(SMALL, backend="batched")
    for r, count in enumerate(SMALL.nmb_crops):
        params = ColourParams.cat([sample_colour_params(count, g, cfg=SMALL) for g in generators])
        ref = reference(torch.from_numpy(plain[f"crops_{r}"]), params).numpy()
        got = coloured[f"crops_{r}"].astype(np.float32)
        np.testing.assert_allclose(got, ref, atol=1e-2, rtol=2e-3)


# ---------------------------------------------------------------------- the JPEG decoder


def _encode(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode,save", [("RGB", dict(quality=90)),
                                       ("RGB", dict(quality=95, subsampling=0)),  # 4:4:4
                                       ("RGB", dict(quality=85, subsampling=1)),  # 4:2:2
                                       ("RGB", dict(quality=90, progressive=True)),
                                       ("L", dict(quality=90))])
def test_torchvision_decoder_gives_pils_pixels(mode, save):
    """The default decoder (torchvision) and PIL's decode + RGB conversion agree pixel for
    pixel, for odd sizes, chroma subsamplings, progressive and grayscale JPEGs."""
    from gaelle_ray.data.crops import decode_jpeg_torchvision

    data = _encode(_pixels(333, 217, seed=3), mode, **save)
    got = decode_jpeg_torchvision(data)
    assert got is not None and got.dtype == torch.uint8 and got.shape == (217, 333, 3)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(got.numpy(), ref)


def test_both_decoders_give_the_same_crops(jpegs):
    aug = AugmentationConfig(size_crops=[64, 24], nmb_crops=[2, 4], min_scale_crops=[0.14, 0.05],
                             max_scale_crops=[1.0, 0.14])
    for i, jpeg in enumerate(jpegs[:3] + [_jpeg(130, 90, mode="L")]):
        tv = decode_and_crop(jpeg, aug, np.random.default_rng(i), DecodeOptions())
        pil = decode_and_crop(jpeg, aug, np.random.default_rng(i), DecodeOptions(decoder="pil"))
        for a, b in zip(tv, pil):
            np.testing.assert_array_equal(a, b)


def test_records_torchvision_does_not_take_go_through_pil(monkeypatch):
    """CMYK JPEGs are never handed to torchvision (PNGs: see
    test_grayscale_and_png_records_decode_to_rgb); a JPEG that torchvision refuses is
    decoded by PIL, with the same crops."""
    from gaelle_ray.data import crops as C

    calls = []
    real = C.decode_jpeg_torchvision
    monkeypatch.setattr(C, "decode_jpeg_torchvision",
                        lambda data: calls.append(len(data)) or real(data))
    cmyk = _encode(_pixels(90, 70), "CMYK", quality=90)
    crops = decode_and_crop(cmyk, SMALL, np.random.default_rng(0))
    assert [c.shape for c in crops] == [(48, 48, 3)] * 2 + [(24, 24, 3)] * 3
    assert calls == [] and max(c.std() for c in crops) > 5  # PIL's CMYK conversion, real data
    jpeg = _jpeg(100, 80)
    decode_and_crop(jpeg, SMALL, np.random.default_rng(1))
    assert calls == [len(jpeg)]  # an RGB JPEG does go to torchvision
    monkeypatch.setattr(C, "decode_jpeg_torchvision", lambda data: calls.append(0))  # refuses
    got = decode_and_crop(jpeg, SMALL, np.random.default_rng(1))
    want = decode_and_crop(jpeg, SMALL, np.random.default_rng(1), DecodeOptions(decoder="pil"))
    assert calls == [len(jpeg), 0]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
