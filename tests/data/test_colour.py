"""The colour half of the augmentation (method.md 1): the batched ops (colour_ops) against
torchvision applied one sample at a time, the CPU path (colour_cpu) against the batched
ops, and ColourAugment's dispatch between them (colour)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from gaelle_ray.config import MEAN, STD, AugmentationConfig
from gaelle_ray.data import colour_cpu
from gaelle_ray.data import colour_ops as A
from gaelle_ray.data.colour import ColourAugment
from gaelle_ray.data.colour_ops import (BRIGHTNESS, CONTRAST, HUE, SATURATION, ColourParams,
                                        blur_kernel_size, factor_range)

ATOL = 1e-5
TV_JITTER = {BRIGHTNESS: TF.adjust_brightness, CONTRAST: TF.adjust_contrast,
             SATURATION: TF.adjust_saturation, HUE: TF.adjust_hue}


def _images(n: int = 6, h: int = 20, w: int = 28, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) float images in [0, 1] with exact 0/1 values and grey pixels mixed in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[:, :, 0, :4] = torch.tensor([0.0, 1.0, 0.5, 0.0]).view(1, 1, 4)  # grey, white, black
    x[:, 0, 1, 0], x[:, 1, 1, 0], x[:, 2, 1, 0] = 1.0, 0.0, 0.0  # pure red
    x[:, 0, 1, 1], x[:, 1, 1, 1], x[:, 2, 1, 1] = 1.0, 1.0, 0.0  # yellow: tie between max channels
    return x


def _params(n: int, seed: int = 0, cfg: AugmentationConfig | None = None) -> ColourParams:
    return A.sample_colour_params(n, torch.Generator().manual_seed(seed), cfg=cfg)


def _naive(img: torch.Tensor, params: ColourParams, i: int, cfg: AugmentationConfig) -> torch.Tensor:
    """Sample i of the pipeline written straight from method.md with torchvision ops.

    img: (3, H, W) float in [0, 1] -> (3, H, W) normalised.
    """
    x = img.clone()
    if params.jitter[i]:
        for op in params.order[i].tolist():
            x = TV_JITTER[op](x, float(params.factor(op)[i]))
    if params.grayscale[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[i]:
        k = blur_kernel_size(cfg)
        x = TF.gaussian_blur(x, [k, k], [float(params.sigma[i])] * 2)
    return TF.normalize(x, list(cfg.mean), list(cfg.std))


# ---------------------------------------------------------------------- single ops


@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE])
def test_jitter_op_matches_torchvision_per_sample(op):
    x = _images()
    lo, hi = factor_range(AugmentationConfig(), op)
    factor = torch.linspace(lo, hi, x.shape[0])
    fn = {BRIGHTNESS: A.adjust_brightness, CONTRAST: A.adjust_contrast,
          SATURATION: A.adjust_saturation, HUE: A.adjust_hue}[op]
    got = fn(x, factor)
    for i in range(x.shape[0]):
        ref = TV_JITTER[op](x[i], float(factor[i]))
        torch.testing.assert_close(got[i], ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("shift", [-0.5, -0.2, -1e-3, 0.0, 0.1, 0.2, 0.5])
def test_hue_edge_shifts_match_torchvision(shift):
    x = _images(n=2, seed=3)
    got = A.adjust_hue(x, torch.full((2,), shift))
    for i in range(2):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], shift), atol=ATOL, rtol=0)


def test_hue_keeps_grey_and_zero_shift_is_identity():
    grey = torch.full((1, 3, 4, 4), 0.37)
    torch.testing.assert_close(A.adjust_hue(grey, torch.tensor([0.3])), grey)
    x = _images(n=2)
    torch.testing.assert_close(A.adjust_hue(x, torch.zeros(2)), x, atol=1e-6, rtol=0)


def test_grayscale_matches_torchvision():
    x = _images()
    got = A.rgb_to_grayscale(x)
    assert got.shape == x.shape
    ref = TF.rgb_to_grayscale(x, num_output_channels=3)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel_size", [13, 7])
def test_blur_matches_torchvision_per_sample(kernel_size):
    x = _images(n=5, h=17, w=23)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    got = A.gaussian_blur(x, sigma, kernel_size)
    for i in range(x.shape[0]):
        ref = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], ref, atol=ATOL, rtol=0)


def test_blur_rejects_images_smaller_than_padding():
    with pytest.raises(ValueError, match="reflect padding"):
        A.gaussian_blur(torch.rand(1, 3, 6, 30), torch.tensor([1.0]), 13)


def test_normalize_matches_torchvision():
    x = _images()
    ref = TF.normalize(x, list(MEAN), list(STD))
    torch.testing.assert_close(A.normalize(x.clone()), ref, atol=ATOL, rtol=0)
    assert STD[0] == 0.228 and AugmentationConfig().std == STD and AugmentationConfig().mean == MEAN


# ---------------------------------------------------------------------- whole pipeline


def test_apply_colour_matches_naive_per_sample_loop():
    """Every sample (random order, grayscale, blur, normalise) against torchvision one by one."""
    cfg = AugmentationConfig()
    x = _images(n=48, h=16, w=16, seed=1)
    params = _params(48, seed=2)
    assert params.jitter.any() and (~params.jitter).any() and params.blur.any()
    got = A.apply_colour(x, params, cfg)
    for i in range(x.shape[0]):
        torch.testing.assert_close(got[i], _naive(x[i], params, i, cfg), atol=ATOL, rtol=0)


def test_random_order_is_honoured():
    """Same factors, different orders: each sample equals its own order applied sequentially."""
    cfg = AugmentationConfig(grayscale_p=0.0, blur_p=0.0)
    orders = torch.tensor(list(itertools.permutations(range(4))))  # (24, 4)
    n = orders.shape[0]
    x = _images(n=1, h=12, w=12, seed=4).expand(n, -1, -1, -1).contiguous()
    params = _params(n, seed=5, cfg=cfg)
    for name in ("brightness", "contrast", "saturation", "hue"):  # same factors everywhere
        setattr(params, name, getattr(params, name)[:1].expand(n).clone())
    params.jitter = torch.ones(n, dtype=torch.bool)
    params.order = orders
    params.hue = torch.full((n,), 0.15)
    params.saturation = torch.full((n,), 1.7)
    params.brightness = torch.full((n,), 1.6)
    got = A.apply_colour(x, params, cfg)
    for i in range(n):
        torch.testing.assert_close(got[i], _naive(x[i], params, i, cfg), atol=ATOL, rtol=0)
    # the order matters: not all 24 results are equal
    assert (got - got[:1]).abs().amax(dim=(1, 2, 3)).gt(1e-3).sum() > 12


def test_uint8_input_equals_float_input():
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=g)
    params = _params(8)
    torch.testing.assert_close(A.apply_colour(x8, params), A.apply_colour(x8.float() / 255, params),
                               atol=ATOL, rtol=0)


def test_apply_colour_does_not_modify_input():
    x = _images(n=4)
    before = x.clone()
    A.apply_colour(x, _params(4))
    torch.testing.assert_close(x, before, atol=0, rtol=0)


def test_samples_in_a_batch_get_different_parameters():
    params = _params(64)
    for name in ("brightness", "contrast", "saturation", "hue", "sigma"):
        assert torch.unique(getattr(params, name)).numel() == 64, name
    same = _images(n=1, h=16, w=16).expand(64, -1, -1, -1)
    out = A.apply_colour(same, params)  # (64, 3, 16, 16)
    distinct = torch.unique(out.reshape(64, -1).round(decimals=4), dim=0).shape[0]
    assert distinct > 50


def test_apply_colour_validates_inputs():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        A.apply_colour(torch.rand(2, 1, 8, 8), _params(2))
    with pytest.raises(ValueError, match="parameter sets"):
        A.apply_colour(torch.rand(3, 3, 16, 16), _params(2))
    with pytest.raises(ValueError, match="uint8 or floating"):
        A.apply_colour(torch.ones(2, 3, 16, 16, dtype=torch.int32), _params(2))


# ---------------------------------------------------------------------- parameter distribution


def test_parameter_distribution_matches_method():
    n = 20000
    p = _params(n, seed=7)
    tol = lambda q: 4.5 * math.sqrt(q * (1 - q) / n)  # noqa: E731 - ~4.5 sigma binomial bound
    for flag, prob in ((p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, 0.5)):
        assert flag.dtype == torch.bool
        assert abs(flag.float().mean().item() - prob) < tol(prob)
    # flags are independent of each other
    both = (p.jitter & p.grayscale).float().mean().item()
    assert abs(both - 0.16) < tol(0.16)
    for name, (lo, hi) in (("brightness", (0.2, 1.8)), ("contrast", (0.2, 1.8)),
                           ("saturation", (0.2, 1.8)), ("hue", (-0.2, 0.2)),
                           ("sigma", (0.1, 2.0))):
        v = getattr(p, name)
        assert v.min() >= lo and v.max() <= hi, name
        assert v.min() < lo + 0.01 * (hi - lo) and v.max() > hi - 0.01 * (hi - lo), name
        # uniform: mean and variance of U(lo, hi)
        assert abs(v.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo), name
        assert abs(v.var().item() - (hi - lo) ** 2 / 12) < 0.05 * (hi - lo) ** 2 / 12, name


def test_jitter_orders_are_uniform_permutations():
    n = 24000
    order = _params(n, seed=8).order
    assert order.shape == (n, 4) and order.dtype == torch.int64
    assert torch.equal(order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    codes = order @ torch.tensor([64, 16, 4, 1])
    counts = torch.bincount(codes, minlength=256)
    seen = counts[counts > 0]
    assert seen.numel() == 24  # all 24 orders appear
    assert (seen - n / 24).abs().max() < 5 * math.sqrt(n / 24)
    # every op is equally likely at every step
    for step in range(4):
        frac = torch.bincount(order[:, step], minlength=4).float() / n
        assert (frac - 0.25).abs().max() < 0.015


def test_custom_config_ranges_and_validation():
    cfg = AugmentationConfig(brightness=0.4, hue=0.1, jitter_p=1.0, grayscale_p=0.0, blur_p=1.0,
                             blur_sigma=(0.5, 1.0))
    p = _params(2000, cfg=cfg)
    assert p.jitter.all() and not p.grayscale.any() and p.blur.all()
    assert p.brightness.min() >= 0.6 and p.brightness.max() <= 1.4
    assert p.hue.abs().max() <= 0.1 and p.sigma.min() >= 0.5 and p.sigma.max() <= 1.0
    assert blur_kernel_size(AugmentationConfig()) == 13 and blur_kernel_size(cfg) == 7
    assert factor_range(AugmentationConfig(brightness=1.5), BRIGHTNESS) == (0.0, 2.5)
    for bad in (dict(hue=0.6), dict(jitter_p=1.2), dict(brightness=-1.0),
                dict(blur_sigma=(2.0, 1.0)), dict(std=(0.2, 0.0, 0.2)), dict(mean=(0.5, 0.5))):
        with pytest.raises(ValueError, match=f"augmentation.{next(iter(bad))}"):
            AugmentationConfig(**bad)


# ---------------------------------------------------------------------- ColourAugment


def test_colour_augment_shapes_dtypes_and_determinism():
    g = torch.Generator().manual_seed(1)
    crops = torch.randint(0, 256, (3, 2, 3, 16, 16), dtype=torch.uint8, generator=g)
    out = ColourAugment(seed=5)(crops)
    assert out.shape == crops.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ColourAugment(seed=5)(crops), atol=0, rtol=0)
    assert not torch.allclose(out, ColourAugment(seed=6)(crops))
    # crops of the same image get different parameters
    twins = ColourAugment(seed=5)(crops[:1, :1].expand(1, 2, -1, -1, -1))  # (1, 2, 3, 16, 16)
    assert not torch.allclose(twins[0, 0], twins[0, 1])
    # explicit params reproduce the call; state_dict restores the stream
    aug = ColourAugment(seed=9)
    state = aug.state_dict()
    first = aug(crops)
    aug.load_state_dict(state)
    torch.testing.assert_close(aug(crops), first, atol=0, rtol=0)
    params = ColourAugment(seed=9).sample(6)
    torch.testing.assert_close(ColourAugment(seed=0)(crops, params), first, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_colour_augment_low_precision_output(dtype):
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    ref = ColourAugment(seed=2)(crops)
    out = ColourAugment(seed=2, out_dtype=dtype)(crops)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.01)
    computed = ColourAugment(seed=2, compute_dtype=torch.bfloat16)(crops)
    assert computed.dtype == torch.float32
    assert (computed - ref).abs().mean() < 0.05


def test_colour_augment_validates():
    with pytest.raises(ValueError, match="floating"):
        ColourAugment(out_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, H, W\)"):
        ColourAugment()(torch.zeros(2, 4, 8, 8, dtype=torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_colour_augment_cuda_matches_cpu():
    crops = torch.randint(0, 256, (4, 2, 3, 32, 32), dtype=torch.uint8)
    params = ColourAugment(seed=3).sample(8)
    cpu = ColourAugment(seed=0)(crops, params)
    gpu = ColourAugment(seed=0, device="cuda")(crops, params)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------- fast CPU path


def _crops_uint8(n: int, h: int = 20, w: int = 28, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) uint8 with saturated, grey and tied pixels mixed in."""
    return (_images(n, h, w, seed) * 255).round().to(torch.uint8)


@pytest.mark.parametrize("seed,compiled", [(0, True), (1, True), (2, False)])
def test_apply_colour_cpu_equals_batched_path(seed, compiled):
    """Same parameters, same function: within float32 rounding (<1e-4 normalised, i.e.
    < 0.01 grey level), for uint8 and float inputs, every programme of ops represented;
    with the torch.compile'd jitter kernels and with the eager ones."""
    cfg = AugmentationConfig(compile_cpu_colour=compiled)
    x = _crops_uint8(64, seed=seed)
    params = _params(64, seed=seed)
    assert len(set(map(tuple, params.order[params.jitter].tolist()))) > 15  # many orders
    ref = A.apply_colour(x, params, cfg)
    fast = colour_cpu.apply_colour_cpu(x, params, cfg)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)
    fast_float = colour_cpu.apply_colour_cpu(x.float() / 255.0, params, cfg)
    torch.testing.assert_close(fast_float, ref, atol=1e-4, rtol=0)
    half = colour_cpu.apply_colour_cpu(x, params, cfg, out_dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), ref, atol=3e-3, rtol=1e-3)


def test_apply_colour_cpu_matches_torchvision_per_sample():
    cfg = AugmentationConfig()
    x = _crops_uint8(12, seed=4)
    params = _params(12, seed=4)
    fast = colour_cpu.apply_colour_cpu(x, params, cfg)
    for i in range(12):
        ref = _naive(x[i].float() / 255.0, params, i, cfg)
        torch.testing.assert_close(fast[i], ref, atol=1e-4, rtol=0)


def test_apply_colour_cpu_edge_parameters():
    """Extreme factors and hue shifts (both signs, wrap-around), every op forced on."""
    n = 8
    x = _crops_uint8(n, seed=5)
    lo_hi = torch.tensor([0.0, 1.8, 0.2, 1.0, 1.8, 0.0, 0.5, 1.3])
    params = ColourParams(jitter=torch.ones(n, dtype=torch.bool), brightness=lo_hi,
                          contrast=lo_hi.flip(0), saturation=lo_hi.roll(3),
                          hue=torch.tensor([-0.5, -0.2, -0.01, 0.0, 0.01, 0.2, 0.49, 0.5]),
                          order=torch.stack([torch.randperm(4, generator=torch.Generator()
                                                            .manual_seed(i)) for i in range(n)]),
                          grayscale=torch.tensor([True, False] * 4),
                          blur=torch.tensor([True, True, False, False] * 2),
                          sigma=torch.linspace(0.1, 2.0, n))
    ref = A.apply_colour(x, params)
    for compiled in (True, False):
        out = colour_cpu.apply_colour_cpu(x, params, AugmentationConfig(compile_cpu_colour=compiled))
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)


def test_compiled_kernels_are_used_and_match_the_eager_path():
    """The compiled path (one kernel per hue-step group, a compiled blur) against the eager
    one, at two crop sizes, with groups and blur subsets of one sample and a lone image."""
    from gaelle_ray.data.colour_cpu import compiled_kernels_status

    for n, h, w, seed in ((40, 20, 28, 8), (9, 33, 17, 9), (1, 24, 24, 10), (3, 16, 16, 11)):
        x = _crops_uint8(n, h, w, seed=seed)
        params = _params(n, seed=seed)
        if n == 3:  # one sample in each of three groups, one of them blurred
            params.jitter[:] = torch.tensor([True, True, False])
            params.order[:2] = torch.tensor([[3, 0, 1, 2], [0, 3, 2, 1]])
            params.blur[:] = torch.tensor([False, True, False])
        fast = colour_cpu.apply_colour_cpu(x, params, AugmentationConfig(compile_cpu_colour=True))
        slow = colour_cpu.apply_colour_cpu(x, params, AugmentationConfig(compile_cpu_colour=False))
        torch.testing.assert_close(fast, slow, atol=1e-4, rtol=0)
    assert set(compiled_kernels_status().values()) == {"compiled"}


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch, caplog):
    from gaelle_ray.data import colour_cpu as C

    def broken_compile(fn, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore lines")

    # fresh kernels, so that this process's compiled ones are left alone
    groups = {k: C._CompiledKernel(v.name, v.fn) for k, v in C._GROUP_KERNELS.items()}
    blur = C._CompiledKernel("blur", C._blur_taps)
    monkeypatch.setattr(C, "_GROUP_KERNELS", groups)
    monkeypatch.setattr(C, "_BLUR_KERNEL", blur)
    monkeypatch.setattr(C, "_ALL_KERNELS", (*groups.values(), blur))
    monkeypatch.setattr(C.torch, "compile", broken_compile)
    x = _crops_uint8(12, seed=7)
    params = _params(12, seed=7)
    ref = C.apply_colour_cpu(x, params, AugmentationConfig(compile_cpu_colour=False))
    with caplog.at_level("WARNING", logger=C.__name__):
        out = C.apply_colour_cpu(x, params, AugmentationConfig(compile_cpu_colour=True))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    failed = [s for s in C.compiled_kernels_status().values() if s.startswith("eager")]
    assert failed == ["eager: RuntimeError: no C++ compiler found"]  # the first one tried
    assert caplog.text.count("failed") == 1 and "no C++ compiler found" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=C.__name__):  # later calls: eager, no new attempt
        again = C.apply_colour_cpu(x, params, AugmentationConfig(compile_cpu_colour=True))
    torch.testing.assert_close(again, ref, atol=0, rtol=0)
    assert "failed" not in caplog.text


@pytest.mark.parametrize("compiled", [True, False])
def test_apply_colour_cpu_small_crops_fail_only_when_blurred(compiled):
    """Crops smaller than the blur's reflect padding: an error naming it if one is blurred,
    the normal result otherwise (both CPU paths)."""
    x = _crops_uint8(4, 6, 30, seed=12)
    params = _params(4, seed=12)
    cfg = AugmentationConfig(compile_cpu_colour=compiled)
    params.blur[:] = False
    torch.testing.assert_close(colour_cpu.apply_colour_cpu(x, params, cfg),
                               A.apply_colour(x, params, cfg), atol=1e-4, rtol=0)
    params.blur[2] = True
    with pytest.raises(ValueError, match="reflect padding"):
        colour_cpu.apply_colour_cpu(x, params, cfg)


def test_apply_colour_cpu_gives_samples_different_parameters():
    x = _crops_uint8(1).expand(16, -1, -1, -1)  # 16 copies of one crop
    out = colour_cpu.apply_colour_cpu(x, _params(16, seed=3))
    flat = out.reshape(16, -1)
    distinct = {tuple(row[:64].tolist()) for row in flat}
    assert len(distinct) >= 14  # only samples with no jitter, grayscale or blur coincide


def test_apply_colour_cpu_validates():
    params = _params(2)
    with pytest.raises(ValueError, match="parameter sets"):
        colour_cpu.apply_colour_cpu(_crops_uint8(3), params)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        colour_cpu.apply_colour_cpu(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), params)
    with pytest.raises(ValueError, match="uint8 or floating"):
        colour_cpu.apply_colour_cpu(torch.zeros(2, 3, 8, 8, dtype=torch.int32), params)


def test_colour_augment_backends_agree():
    crops = _crops_uint8(6).view(2, 3, 3, 20, 28)
    params = ColourAugment(seed=1).sample(6)
    auto = ColourAugment(seed=0)(crops, params)
    cpu = ColourAugment(seed=0, backend="cpu")(crops, params)
    batched = ColourAugment(seed=0, backend="batched")(crops, params)
    torch.testing.assert_close(auto, cpu, atol=0, rtol=0)
    torch.testing.assert_close(auto, batched, atol=1e-4, rtol=0)
    # bfloat16 compute keeps the batched path
    low = ColourAugment(seed=0, compute_dtype=torch.bfloat16)
    assert not low._cpu_path(crops)
    with pytest.raises(ValueError, match="backend"):
        ColourAugment(backend="pil")
