"""The training step's rules (method.md section 6), one process, no Ray."""

import copy
import math

import pytest
import torch

from gaelle_ray.config import load_config
from gaelle_ray.model import build_model
from gaelle_ray.train.step import GaelleStepper, TooManyNonFiniteSteps
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _config(**overrides):
    base = {"augmentation.size_crops": "[32, 16]", "model.hidden_mlp": 32, "model.feat_dim": 16,
            "model.nmb_prototypes": 12, "model.nmb_local_prototypes": 10, "train.batch_size_per_worker": 4,
            "train.num_workers": 1, "queue.queue_length": 0, "optim.freeze_prototypes_niters": 2,
            "optim.warmup_epochs": 0, "train.epochs": 3}
    base.update(overrides)
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in base.items()])


def _crops(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = config.train.batch_size_per_worker
    return [torch.randint(0, 256, (n * b, 3, s, s), generator=g, dtype=torch.uint8)
            for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]


def _stepper(config, iters_per_epoch=2):
    torch.manual_seed(0)
    model = build_model(config).train()
    return GaelleStepper(model, config, torch.device("cpu"), iters_per_epoch=iters_per_epoch)


PROTOTYPE_LAYERS = ("prototypes", "local_prototypes", "l2g_prototypes")


def test_prototypes_normalised_before_every_step_and_frozen_at_first():
    config = _config()
    st = _stepper(config)
    with torch.no_grad():
        for i, name in enumerate(PROTOTYPE_LAYERS):
            getattr(st.model, name).weight.mul_(5.0 + i)
    before = {name: getattr(st.model, name).weight.detach().clone() for name in PROTOTYPE_LAYERS}
    m = st.step(_crops(config), epoch=0, total_epochs=3)
    assert math.isfinite(m.loss) and st.iteration == 1
    for name in PROTOTYPE_LAYERS:
        w = getattr(st.model, name).weight.detach()
        # normalised at the start of the step, then not moved: the gradient was dropped
        torch.testing.assert_close(w, torch.nn.functional.normalize(before[name], dim=1), msg=name)
        torch.testing.assert_close(w.norm(dim=1), torch.ones(w.shape[0]), msg=name)
    st.step(_crops(config, 1), epoch=0, total_epochs=3)
    st.step(_crops(config, 2), epoch=1, total_epochs=3)  # iteration 2: no longer frozen
    for name in PROTOTYPE_LAYERS:
        after = getattr(st.model, name).weight
        assert not torch.allclose(after, torch.nn.functional.normalize(before[name], dim=1)), name


def test_learning_rate_follows_the_schedule_per_iteration():
    config = _config(**{"optim.warmup_epochs": 1, "optim.start_warmup": 0.01, "optim.base_lr": 0.3})
    st = _stepper(config, iters_per_epoch=2)
    lrs = [st.step(_crops(config, i), epoch=i // 2, total_epochs=3).lr for i in range(3)]
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[1] == pytest.approx(0.01 + (0.3 - 0.01) / 2)
    assert lrs[2] == pytest.approx(0.3)


def test_queue_starts_at_its_epoch_and_is_used_once_full():
    config = _config(**{"queue.queue_length": 8, "queue.epoch_queue_starts": 1})
    st = _stepper(config)
    st.step(_crops(config), epoch=0, total_epochs=3)
    assert st.queue is None
    st.step(_crops(config, 1), epoch=1, total_epochs=3)
    assert st.queue is not None and st.queue.length == 8 and not st.queue.in_use
    st.step(_crops(config, 2), epoch=1, total_epochs=3)  # 2 pushes of 4 rows: full after this
    assert st.queue.is_full()
    st.step(_crops(config, 3), epoch=2, total_epochs=3)
    assert st.queue.in_use


def test_full_local_queue_is_scored_with_the_local_prototypes(monkeypatch):
    """Once the local queue is full, its rows enter the local Sinkhorn scored with the LOCAL
    prototypes (method.md section 5 fixes the released script, which uses the global ones).
    K = K_l here, so only the values can tell the two apart."""
    import gaelle_ray.train.step as step_module

    config = _config(**{"queue.local_queue_length": 64, "queue.epoch_queue_starts": 0,
                        "model.nmb_prototypes": 10, "model.nmb_local_prototypes": 10})
    st = _stepper(config)
    seen = []
    real = step_module.gaelle_losses

    def spy(out, settings, **kwargs):
        seen.append({"local_queue_scores": kwargs.get("local_queue_scores"),
                     "buffer": None if st.local_queue is None else st.local_queue.buffer.clone(),
                     "local": st.model.local_prototypes.weight.detach().clone(),
                     "global": st.model.prototypes.weight.detach().clone()})
        return real(out, settings, **kwargs)

    monkeypatch.setattr(step_module, "gaelle_losses", spy)
    for i in range(6):  # 4 images x 4 slots = 16 rows per push: full after 4 steps, used from the 5th
        st.step(_crops(config, i), epoch=0, total_epochs=3)
    assert seen[0]["local_queue_scores"] is None  # empty queue: not used
    used = [s for s in seen if s["local_queue_scores"] is not None]
    assert used, "the full local queue was never used"
    for s in used:
        buf, got = s["buffer"], s["local_queue_scores"]  # (A, L, d), (A, L, K_l)
        assert got.shape == (2, 64, 10)
        want = torch.einsum("ald,kd->alk", buf, s["local"])
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, torch.einsum("ald,kd->alk", buf, s["global"]))


def test_slot_permutations_one_per_pair_same_on_every_worker():
    config = _config()
    a, b = _stepper(config), _stepper(config)
    b.rank = 1  # another worker: the permutations must not depend on the rank
    pa, pb = a.slot_perms(), b.slot_perms()
    assert pa.shape == (2, config.num_slots)  # pairs (0 -> 1) and (1 -> 0)
    assert torch.equal(pa, pb)
    for p in pa:
        assert sorted(p.tolist()) == list(range(config.num_slots))
    assert not torch.equal(pa[0], pa[1])  # drawn anew for each pair
    a.step(_crops(config), epoch=0, total_epochs=3)
    assert not torch.equal(a.slot_perms(), pa)  # and anew at each iteration
    assert _stepper(_config(**{"loss.local_shuffle": "false"})).slot_perms() is None


def test_non_finite_steps_are_skipped_counted_then_stop(monkeypatch):
    config = _config(**{"train.max_nonfinite_steps": 3})
    st = _stepper(config)
    st.step(_crops(config), epoch=0, total_epochs=3)
    good = {k: v.detach().clone() for k, v in st.model.named_parameters()}
    real_forward = st.model.forward

    def poisoned(crops):
        out = real_forward(crops)
        out.scores = out.scores * float("nan")
        return out

    monkeypatch.setattr(st.model, "forward", poisoned)
    st.forward_model = st.model
    for i in range(2):
        m = st.step(_crops(config, i), epoch=0, total_epochs=3)
        assert m.nonfinite and st.nonfinite_total == i + 1
    for k, v in st.model.named_parameters():  # skipped steps change no weight
        if "prototypes" not in k:  # (prototypes are re-normalised at every step start)
            torch.testing.assert_close(v, good[k], msg=k)
    with pytest.raises(TooManyNonFiniteSteps, match="3 non-finite steps in a row.*global loss"):
        st.step(_crops(config), epoch=0, total_epochs=3)


def test_state_dict_roundtrip_continues_identically():
    config = _config(**{"queue.queue_length": 8, "queue.epoch_queue_starts": 0})
    a = _stepper(config)
    for i in range(3):
        a.step(_crops(config, i), epoch=0, total_epochs=3)
    state = copy.deepcopy(a.state_dict())
    b = _stepper(config)
    b.load_state_dict(state)
    assert b.iteration == 3 and b.queue is not None
    torch.testing.assert_close(b.queue.buffer, a.queue.buffer)
    ma = a.step(_crops(config, 9), epoch=1, total_epochs=3)
    mb = b.step(_crops(config, 9), epoch=1, total_epochs=3)
    assert ma.lr == mb.lr
    assert ma.loss == pytest.approx(mb.loss, rel=1e-5)


def test_collapse_check():
    from gaelle_ray.train.collapse import collapse_check
    config = _config(**{"train.collapse_window_epochs": 2, "model.nmb_prototypes": 100})
    ln_k = math.log(100)
    collapsed = {"loss_global": ln_k * 0.995, "code_entropy": 0.995}
    assert collapse_check(collapsed, epoch=0, config=config) is None  # inside the warm window
    message = collapse_check(collapsed, epoch=1, config=config)
    assert message and "ln(K) = 4.6052" in message and "epsilon" in message
    assert collapse_check({"loss_global": ln_k * 0.8, "code_entropy": 0.995}, epoch=3, config=config) is None
    assert collapse_check({"loss_global": ln_k, "code_entropy": 0.6}, epoch=3, config=config) is None
