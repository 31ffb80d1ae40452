"""Forward + backward + loss of the whole GAELLE step on this CPU: the vectorised
implementation against the released script's loops (head once per position, losses pair
by pair, float32 Sinkhorn per crop), same weights and inputs.

    python benchmarks/step_cpu.py                       # ResNet-50, B=4, 2x224 + 6x96, and the CPU config
    python benchmarks/step_cpu.py --reps 5 --threads 2

Prints, per setting, the median time of the whole step and of the attention + heads +
loss part alone (the backbone's feature maps computed once beforehand), and the ratios
reference / vectorised, then the median whole-step ratio over the settings; last, the
loss terms at COCO sizes (B = 64 and 256 per worker) computed per row, as now, against the
one float32 contraction they replaced (old / new > 1: the exact form is not slower).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gaelle_ray.config import load_config
from gaelle_ray.losses.gaelle import LossSettings, cross_entropy_pairs, gaelle_losses, local_loss, local_pairs
from gaelle_ray.model.backbone import feature_map
from gaelle_ray.model.gaelle import GaelleModel, GaelleOutput, semantic_attention
from gaelle_ray.reference import naive_forward, naive_losses, naive_semantic_attention

ROOT = Path(__file__).resolve().parents[1]


def _settings():
    headline = load_config(ROOT / "experiments" / "coco2014_400ep.yaml")
    cpu = load_config(ROOT / "experiments" / "cpu_demo.yaml")
    return [("resnet50 B=4 2x224+6x96", headline, 4), ("cpu config (resnet18) B=32", cpu, 32)]


def _model(config) -> GaelleModel:
    m = config.model
    torch.manual_seed(0)
    return GaelleModel(m.arch, m.hidden_mlp, m.feat_dim, m.nmb_prototypes, m.nmb_local_prototypes,
                       m.nmb_groups_heads, m.attention_temperature, config.loss.l2g_detach).train()


def _crops(config, batch):
    aug = config.augmentation
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n * batch, 3, s, s, generator=g) for s, n in zip(aug.size_crops, aug.nmb_crops)]


def _time_pair(ref, fast, reps):
    """Median seconds of `ref` and `fast`, run alternately so both see the same machine load."""
    ref(), fast()  # warm-up
    times = {ref: [], fast: []}
    for _ in range(reps):
        for fn in (ref, fast):
            t0 = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - t0)
    return statistics.median(times[ref]), statistics.median(times[fast])


def bench(name, config, batch, reps):
    settings = LossSettings.from_config(config, batch_size=batch)
    lc = config.loss
    fast_model = _model(config)
    ref_model = copy.deepcopy(fast_model)
    crops = _crops(config, batch)
    pairs = local_pairs(settings.crops_for_assign, settings.n_global)
    perms = torch.stack([torch.randperm(settings.n_slots) for _ in pairs])  # (P, S)
    perm_dict = {(settings.crops_for_assign[a], v): p.tolist() for (a, v), p in zip(pairs, perms)}

    def fast_step():
        fast_model.zero_grad(set_to_none=True)
        gaelle_losses(fast_model(crops), settings, slot_perms=perms).total.backward()

    def ref_step():
        ref_model.zero_grad(set_to_none=True)
        out = naive_forward(ref_model, crops)
        naive_losses(out, batch, settings.n_global, settings.n_slots, lc.crops_for_assign, lc.temperature,
                     lc.epsilon, lc.sinkhorn_iterations, perm_dict, sinkhorn_dtype=torch.float32)["total"].backward()

    # the attention + heads + loss part alone, from fixed feature maps and pooled features
    with torch.no_grad():
        fmap = feature_map(fast_model.backbone, crops[0])  # (Vg*B, C, h, w)
        z = torch.cat([fmap.mean(dim=(2, 3))] + [feature_map(fast_model.backbone, c).mean(dim=(2, 3))
                                                  for c in crops[1:]])  # (V*B, C)

    def head_part(model, attention, loss_fn):
        model.zero_grad(set_to_none=True)
        f = fmap.clone().requires_grad_(True)
        e = F.normalize(model.projection_head(z), dim=1)
        local = attention(f, model.projection_head, model.n_groups, model.attention_temperature)
        l = F.normalize(model.local_projection_head(local), dim=1)
        m = F.normalize(l.detach().reshape(-1, model.n_slots, model.feat_dim).mean(1), dim=1)
        out = {"scores": model.prototypes(e), "local_scores": model.local_prototypes(l),
               "l2g_scores": model.l2g_prototypes(m)}
        loss_fn(out).backward()

    def as_output(d):
        return GaelleOutput(None, d["scores"], None, d["local_scores"], d["l2g_scores"])

    fast_part = lambda: head_part(fast_model, semantic_attention,
                                  lambda o: gaelle_losses(as_output(o), settings, slot_perms=perms).total)
    ref_part = lambda: head_part(ref_model, naive_semantic_attention, lambda o: naive_losses(
        o, batch, settings.n_global, settings.n_slots, lc.crops_for_assign, lc.temperature, lc.epsilon,
        lc.sinkhorn_iterations, perm_dict, sinkhorn_dtype=torch.float32)["total"])

    t_ref, t_fast = _time_pair(ref_step, fast_step, reps)
    p_ref, p_fast = _time_pair(ref_part, fast_part, reps * 3)
    print(f"{name}: step reference {t_ref:.3f}s vectorised {t_fast:.3f}s ratio {t_ref / t_fast:.2f}x | "
          f"attention+heads+loss reference {p_ref * 1e3:.1f}ms vectorised {p_fast * 1e3:.1f}ms "
          f"ratio {p_ref / p_fast:.2f}x", flush=True)
    return t_ref / t_fast, p_ref / p_fast


def bench_loss_sums(batch: int, reps: int, s: int = 32, k: int = 3000) -> float:
    """The loss terms at the COCO config's sizes (S slots, K prototypes, 2 global + 6 local
    crops), forward + backward from the scores: the per-row sums of the code (sum over K for
    each row, then the mean over rows) against the one float32 contraction over all N*K
    products that it replaced (same inputs, timed in turns). Returns old / new."""
    g = torch.Generator().manual_seed(0)
    scores = F.normalize(torch.randn(8, batch, k, generator=g), dim=-1)
    local = F.normalize(torch.randn(2, batch, s, k, generator=g), dim=-1)
    codes = torch.softmax(torch.randn(2, batch, k, generator=g) * 3, dim=-1)
    local_codes = torch.softmax(torch.randn(2, batch * s, k, generator=g) * 3, dim=-1)
    perms = torch.stack([torch.randperm(s, generator=g) for _ in range(2)])

    def one_contraction(q, x):  # the replaced formulation: (A, V) in one reduction over N*K
        return -torch.einsum("ank,vnk->av", q, F.log_softmax(x / 0.1, dim=-1)) / q.shape[1]

    def old():
        x, y = scores.clone().requires_grad_(True), local.clone().requires_grad_(True)
        shuffled = y[:, :, perms[0]].reshape(2, batch * s, k)
        (one_contraction(codes, x).sum() + one_contraction(local_codes, shuffled).sum()).backward()

    def new():
        x, y = scores.clone().requires_grad_(True), local.clone().requires_grad_(True)
        (cross_entropy_pairs(codes, x, 0.1).sum() + local_loss(y, local_codes, (0, 1), 0.1, perms)).backward()

    t_old, t_new = _time_pair(old, new, reps)
    print(f"loss terms B={batch} S={s} K={k}: one contraction {t_old * 1e3:.1f}ms, per-row sums "
          f"{t_new * 1e3:.1f}ms, ratio old / new {t_old / t_new:.2f}x", flush=True)
    return t_old / t_new


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.reps} reps (median)")
    ratios = [bench(name, config, batch, args.reps) for name, config, batch in _settings()]
    print(f"attention+heads+loss median ratio (reference / vectorised): "
          f"{statistics.median(r[1] for r in ratios):.2f}x")
    print(f"whole step median ratio (reference / vectorised): {statistics.median(r[0] for r in ratios):.2f}x")
    for batch in (64, 256):
        bench_loss_sums(batch, args.reps)


if __name__ == "__main__":
    main()
