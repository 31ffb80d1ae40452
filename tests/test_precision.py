"""gaelle_ray.precision: what each `precision` value means on each device."""

import pytest
import torch

from gaelle_ray.precision import autocast, autocast_dtype, grad_scaler, to_layout


def test_autocast_dtype_is_the_same_on_cpu_and_cuda(monkeypatch):
    for device in ("cpu", "cuda", torch.device("cuda", 1)):
        assert autocast_dtype("fp32", device) is None
        assert autocast_dtype("fp16", device) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    # a card without bfloat16 (e.g. a V100) gets float16; a CPU always has bfloat16 autocast
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype("bf16", "cuda") is torch.float16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="precision must be one of bf16, fp16, fp32, got 'fp8'"):
        autocast_dtype("fp8", "cpu")


def test_autocast_context_runs_matmuls_in_the_dtype_on_cpu():
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    for dtype in (torch.bfloat16, torch.float16):
        with autocast(dtype, "cpu"):
            assert (a @ b).dtype is dtype
    with autocast(None, "cpu"):
        assert (a @ b).dtype is torch.float32


def test_grad_scaler_only_for_float16_and_on_the_tensors_device():
    assert grad_scaler(torch.float16, "cpu").is_enabled()
    assert grad_scaler(torch.float16, "cpu")._device == "cpu"
    assert not grad_scaler(torch.bfloat16, "cpu").is_enabled()
    assert not grad_scaler(None, "cpu").is_enabled()


def test_to_layout():
    x = torch.randn(2, 3, 5, 5)
    y = to_layout(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert to_layout(x, False) is x
    v = torch.randn(4, 7)
    assert to_layout(v, True) is v  # not an image batch: unchanged
