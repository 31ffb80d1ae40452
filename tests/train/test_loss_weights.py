"""A loss with weight 0 costs nothing: its branch is not computed (SwAV-only = no attention,
no local prototypes, no local Sinkhorn, no local queue), its parameters stay in the state
dict but frozen, the remaining terms are exactly what the full computation gives them, and
two DDP workers train it (no unused-parameter error)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gaelle_ray.model.gaelle as gaelle_model
from gaelle_ray.config import load_config
from gaelle_ray.losses.gaelle import LossSettings, gaelle_losses
from gaelle_ray.model import build_model
from gaelle_ray.train.loop import build_training_model
from gaelle_ray.train.step import GaelleStepper
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SWAV = {"loss.weight_local": 0, "loss.weight_l2g": 0}


def _config(**overrides):
    base = {"augmentation.size_crops": "[32, 24]", "augmentation.nmb_crops": "[2, 2]", "model.hidden_mlp": 32,
            "model.feat_dim": 16, "model.nmb_prototypes": 12, "model.nmb_local_prototypes": 10,
            "train.batch_size_per_worker": 4, "queue.queue_length": 0, "queue.local_queue_length": 0,
            "optim.freeze_prototypes_niters": 0, "optim.warmup_epochs": 0, "train.epochs": 3}
    base.update(overrides)
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", [f"{k}={v}" for k, v in base.items()])


def _crops(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = config.train.batch_size_per_worker
    return [torch.randint(0, 256, (n * b, 3, s, s), generator=g, dtype=torch.uint8)
            for s, n in zip(config.augmentation.size_crops, config.augmentation.nmb_crops)]


def _float_crops(config, seed=0):
    return [c.float() / 255 for c in _crops(config, seed)]


def test_swav_only_runs_no_attention_and_freezes_the_local_parts(monkeypatch):
    config = _config(**SWAV)
    torch.manual_seed(0)
    model = build_model(config).train()
    assert not model.attention_on

    def no_attention(*args, **kwargs):
        raise AssertionError("semantic attention ran in a SwAV-only model")

    monkeypatch.setattr(gaelle_model, "semantic_attention", no_attention)
    out = model(_float_crops(config))
    assert out.local_embeddings is None and out.local_scores is None and out.l2g_scores is None
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters()
                      if n.split(".")[0] in ("local_projection_head", "local_prototypes", "l2g_prototypes")}
    # the state dict keeps every parameter: a SwAV-only checkpoint loads into a GAELLE model
    assert set(model.state_dict()) == set(build_model(_config()).state_dict())


def test_zero_weight_terms_are_skipped_and_the_others_are_unchanged():
    full_config = _config(**{"loss.local_shuffle": "false"})
    torch.manual_seed(0)
    full = build_model(full_config).train()
    crops = _float_crops(full_config)
    settings = LossSettings.from_config(full_config)
    reference = gaelle_losses(full(crops), settings)
    w_g, w_l, w_t = settings.weights
    for overrides, kept in ((SWAV, ("global",)), ({"loss.weight_local": 0}, ("global", "l2g")),
                            ({"loss.weight_l2g": 0}, ("global", "local"))):
        config = _config(**{"loss.local_shuffle": "false", **overrides})
        model = build_model(config).train()
        model.load_state_dict(full.state_dict())
        for n, p in model.named_parameters():  # same weights; BatchNorm statistics reset by load
            p.data.copy_(dict(full.named_parameters())[n].data)
        torch.manual_seed(0)
        fresh_full = build_model(full_config).train()
        out = model(crops)
        terms = gaelle_losses(out, LossSettings.from_config(config))
        want = gaelle_losses(fresh_full(crops), settings)  # same BatchNorm state as `model`
        assert (out.local_scores is None) == ("local" not in kept)
        assert (out.l2g_scores is None) == ("l2g" not in kept)
        expected = w_g * want.global_
        torch.testing.assert_close(terms.global_, want.global_)
        for name, w, got, ref in (("local", w_l, terms.local, want.local), ("l2g", w_t, terms.l2g, want.l2g)):
            if name in kept:
                torch.testing.assert_close(got, ref)
                expected = expected + w * ref
            else:
                assert got is None
        torch.testing.assert_close(terms.total, expected)
    assert reference.local is not None and reference.l2g is not None


def test_swav_only_step_trains_without_the_local_branch_and_reports_no_local_terms():
    config = _config(**SWAV, **{"queue.local_queue_length": 16, "queue.queue_length": 16,
                                "queue.epoch_queue_starts": 0})
    torch.manual_seed(0)
    st = GaelleStepper(build_model(config).train(), config, torch.device("cpu"), iters_per_epoch=2)
    frozen_before = {n: p.detach().clone() for n, p in st.model.named_parameters() if not p.requires_grad}
    m = st.step(_crops(config), epoch=0, total_epochs=3)
    assert not m.nonfinite and m.loss_local is None and m.loss_l2g is None
    assert m.loss == pytest.approx(config.loss.weight_global * m.loss_global)
    assert st.queue is not None and st.local_queue is None  # no local queue without the local loss
    for n, p in st.model.named_parameters():
        if n in frozen_before and "prototypes" not in n:  # prototypes are re-normalised each step
            torch.testing.assert_close(p, frozen_before[n], rtol=0, atol=0)


def _ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        results = {}
        for name, overrides in (("swav", SWAV), ("no_l2g", {"loss.weight_l2g": 0}), ("no_local", {"loss.weight_local": 0})):
            config = _config(**overrides)
            torch.manual_seed(0)
            model, forward_model, group = build_training_model(config, torch.device("cpu"), 2)
            st = GaelleStepper(model, config, torch.device("cpu"), group, 2, rank, 2, forward_model)
            results[name] = [st.step(_crops(config, rank * 10 + i), 0, 3).loss for i in range(2)]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ddp_workers_train_with_a_branch_off(tmp_path, free_port):
    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for r in range(2):
        results = torch.load(tmp_path / f"rank{r}.pt")
        for name, losses in results.items():
            assert all(torch.isfinite(torch.tensor(losses))), (name, losses)
