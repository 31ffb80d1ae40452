"""Mixed precision in the training step on a CPU, as on a GPU: bf16 autocast reaches the
forward, fp16 runs with a GradScaler whose skip-and-shrink after an overflow works, and a
non-finite gradient behind a finite loss (bf16/fp32 have no scaler to catch it) is
skipped before it reaches the weights."""

import pytest
import torch

from gaelle_ray.config import load_config
from gaelle_ray.model import build_model
from gaelle_ray.train.step import GaelleStepper, TooManyNonFiniteSteps
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config(**overrides):
    # 24 px local crops: 16 px ones reach layer4 as 1x1 maps, where torch's CPU bfloat16
    # convolution backward returns NaN weight gradients about half the time (torch 2.14)
    base = {"augmentation.size_crops": "[32, 24]", "augmentation.nmb_crops": "[2, 2]", "model.hidden_mlp": 32,
            "model.feat_dim": 16, "model.nmb_prototypes": 12, "model.nmb_local_prototypes": 10,
            "train.batch_size_per_worker": 4, "queue.queue_length": 0, "optim.freeze_prototypes_niters": 0,
            "optim.warmup_epochs": 0, "train.epochs": 3}
    base.update(overrides)
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in base.items()])


def _crops(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = config.train.batch_size_per_worker
    return [torch.randint(0, 256, (n * b, 3, s, s), generator=g, dtype=torch.uint8)
            for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]


def _stepper(config):
    torch.manual_seed(0)
    return GaelleStepper(build_model(config).train(), config, torch.device("cpu"), iters_per_epoch=2)


def _backbone(st):
    return {k: v.detach().clone() for k, v in st.model.backbone.named_parameters()}


@pytest.mark.parametrize("precision,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16),
                                             ("fp32", torch.float32)])
def test_the_forward_runs_in_the_configured_dtype_on_cpu(precision, dtype):
    st = _stepper(_config(**{"train.precision": precision}))
    seen = []
    st.model.projection_head[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    m = st.step(_crops(st.config), epoch=0, total_epochs=3)
    assert seen and set(seen) == {dtype}
    assert not m.nonfinite
    assert st.scaler.is_enabled() == (precision == "fp16")


def test_fp16_overflow_skips_the_step_and_halves_the_scale_then_training_goes_on():
    st = _stepper(_config(**{"train.precision": "fp16"}))
    st.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 40)  # every fp16 gradient overflows
    before = _backbone(st)
    m = st.step(_crops(st.config), epoch=0, total_epochs=3)
    assert st.scaler.get_scale() == 2.0 ** 39  # shrunk by the backoff factor
    for k, v in st.model.backbone.named_parameters():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)  # the optimiser did not step
    assert st.optimizer.optim.state == {} or all("momentum_buffer" not in s for s in st.optimizer.optim.state.values())
    assert not m.nonfinite and st.nonfinite_total == 0  # an overflow is the scaler's business, not a bad step
    assert st.iteration == 1

    st.scaler.update(256.0)  # as after a few more halvings
    st.step(_crops(st.config, 1), epoch=0, total_epochs=3)
    moved = [k for k, v in st.model.backbone.named_parameters() if not torch.equal(v, before[k])]
    assert len(moved) == len(before)  # this step was taken
    assert st.scaler.get_scale() == 256.0
    assert st.scaler.state_dict()["_growth_tracker"] == 1

    fresh = _stepper(st.config)
    fresh.load_state_dict(st.state_dict())
    assert fresh.scaler.state_dict() == st.scaler.state_dict()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_nan_gradient_behind_a_finite_loss_is_skipped_and_named(precision):
    st = _stepper(_config(**{"train.precision": precision, "train.max_nonfinite_steps": 2}))
    before = _backbone(st)
    hook = st.model.backbone.layer4[0].conv1.weight.register_hook(lambda g: g * float("nan"))
    m = st.step(_crops(st.config), epoch=0, total_epochs=3)
    assert m.nonfinite and st.nonfinite_total == 1
    for k, v in st.model.backbone.named_parameters():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    with pytest.raises(TooManyNonFiniteSteps, match="non-finite gradients in backbone.layer4.0.conv1.weight"):
        st.step(_crops(st.config, 1), epoch=0, total_epochs=3)
    hook.remove()
