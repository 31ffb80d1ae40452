"""The reference implementation: plain-loop GAELLE written straight from method.md, the
oracle that the tests compare the vectorised code with and the reference-style baseline
of the benchmarks. Never on the training path.

Each function loops the way the text (and the released script) reads: the projection
head called once per spatial position, the losses summed pair by pair, Sinkhorn with the
plain exponential.

This module must never import the code it checks (anything in gaelle_ray: the model,
the losses, Sinkhorn, the data ops): an oracle that shares code with what it checks
shares its bugs. It uses torch and the torchvision ResNet's own layers only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F



def _last_feature_map(backbone, x: torch.Tensor) -> torch.Tensor:
    """x: (N, 3, H, W) -> (N, C, h, w), a torchvision ResNet's layers up to layer4."""
    for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
        x = getattr(backbone, name)(x)
    return x


def naive_semantic_attention(fmap: torch.Tensor, head, n_groups: int, temperature: float = 1.0) -> torch.Tensor:
    """fmap: (N, C, h, w) -> (N*S, C) local descriptors, row = n*S + j.

    The head (a module, in whatever mode it is) is called once per position p.
    """
    n, c, h, w = fmap.shape
    feats = fmap.flatten(2)  # (N, C, P)
    per_position = [head(feats[:, :, p]) for p in range(h * w)]  # P x (N, d)
    a = torch.stack(per_position, dim=2)  # (N, d, P)
    d = a.shape[1]
    s = d // n_groups
    a = F.normalize(a, dim=1) / temperature
    a = a.softmax(dim=2)  # softmax over positions
    cg = c // n_groups
    groups = []
    for k in range(n_groups):  # group k's channels pooled with group k's S maps
        maps = a[:, k * s:(k + 1) * s]  # (N, S, P)
        groups.append(torch.bmm(feats[:, k * cg:(k + 1) * cg], maps.transpose(1, 2)))  # (N, C/H, S)
    pooled = torch.cat(groups, dim=1)  # (N, C, S)
    return pooled.transpose(1, 2).reshape(n * s, c)  # (N*S, C) row = n*S + j


def naive_sinkhorn(scores: torch.Tensor, epsilon: float, n_iters: int = 3,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """SwAV's single-process Sinkhorn with the plain exponential. scores: (N, K) -> (N, K).

    float64 by default (a reference that does not overflow at eps 0.01); the published
    script computes in float32.
    """
    q = torch.exp(scores.to(dtype) / epsilon).t()  # (K, N)
    k, n = q.shape
    q = q / q.sum()
    for _ in range(n_iters):
        q = q / q.sum(dim=1, keepdim=True) / k
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).t().float()


def naive_ce(q: torch.Tensor, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE(q, x) = -mean_rows sum_k q[k] log_softmax(x / tau)[k]. q, x: (N, K)."""
    return -(q * F.log_softmax(x / temperature, dim=1)).sum(dim=1).mean()


def naive_codes(scores: torch.Tensor, queue: torch.Tensor | None, epsilon: float, n_iters: int,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Codes of one crop's scores (N, K) with optional queue scores (L, K) stacked before."""
    n = scores.shape[0]
    if queue is not None:
        scores = torch.cat([queue, scores])
    return naive_sinkhorn(scores, epsilon, n_iters, dtype)[-n:]


def naive_global_loss(scores: torch.Tensor, codes: dict[int, torch.Tensor], batch_size: int,
                      temperature: float) -> torch.Tensor:
    """scores: (V*B, K) crop-major; codes: {crop i: (B, K)}. Loop over i and v != i."""
    n_crops = scores.shape[0] // batch_size
    loss = 0.0
    for i, q in codes.items():
        sub = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            sub = sub + naive_ce(q, scores[v * batch_size:(v + 1) * batch_size], temperature)
        loss = loss + sub / (n_crops - 1)
    return loss / len(codes)


def naive_local_loss(local_scores: torch.Tensor, local_codes: dict[int, torch.Tensor], batch_size: int,
                     n_global: int, n_slots: int, temperature: float,
                     slot_perms: dict[tuple[int, int], Sequence[int]] | None) -> torch.Tensor:
    """local_scores: (Vg*B*S, K_l); local_codes: {crop i: (B*S, K_l)}; the other global crops predict.

    slot_perms: {(code crop i, predicting crop v): permutation of the S slots}, one drawn
    per pair as the released script does, or None (slot j with slot j)."""
    rows = batch_size * n_slots
    loss = 0.0
    for i, q in local_codes.items():
        sub = 0.0
        for v in range(n_global):
            if v == i:
                continue
            r = local_scores[v * rows:(v + 1) * rows]  # (B*S, K_l)
            if slot_perms is not None:  # slot j of every image takes slot perm[j] of this pair's perm
                perm = slot_perms[(i, v)]
                rows_of = [b * n_slots + int(perm[j]) for b in range(batch_size) for j in range(n_slots)]
                r = r[rows_of]
            sub = sub + naive_ce(q, r, temperature)
        loss = loss + sub / (n_global - 1)
    return loss / len(local_codes)


def naive_l2g_loss(l2g_scores: torch.Tensor, codes: dict[int, torch.Tensor], batch_size: int,
                   n_global: int, temperature: float) -> torch.Tensor:
    """l2g_scores: (Vg*B, K); each global crop v predicts every global code."""
    loss = 0.0
    for v in range(n_global):
        t = l2g_scores[v * batch_size:(v + 1) * batch_size]
        loss = loss + sum(naive_ce(q, t, temperature) for q in codes.values()) / len(codes)
    return loss / n_global


def naive_forward(model, crops: Sequence[torch.Tensor], batch_size: int | None = None):
    """The released script's forward: backbone per resolution, the head once per position,
    local pooling per head group, the mean-local embedding per crop.

    batch_size: when given, every crop (B rows) goes through the backbone on its own, the
    slowest reading of the method (its BatchNorm statistics are then per crop).
    Returns the same fields as GaelleModel.forward, as a dict.
    """
    def backbone_maps(x: torch.Tensor) -> torch.Tensor:
        if batch_size is None:
            return _last_feature_map(model.backbone, x)
        return torch.cat([_last_feature_map(model.backbone, x[i:i + batch_size])
                          for i in range(0, len(x), batch_size)])

    fmap = backbone_maps(crops[0])  # (Vg*B, C, h, w)
    pooled = [torch.flatten(F.adaptive_avg_pool2d(fmap, 1), 1)]
    for batch in crops[1:]:
        pooled.append(torch.flatten(F.adaptive_avg_pool2d(backbone_maps(batch), 1), 1))
    e = F.normalize(model.projection_head(torch.cat(pooled)), dim=1)
    local = naive_semantic_attention(fmap, model.projection_head, model.n_groups, model.attention_temperature)
    l = F.normalize(model.local_projection_head(local), dim=1)
    n_global_rows = fmap.shape[0]
    means = []
    for row in range(n_global_rows):
        slots = l[row * model.n_slots:(row + 1) * model.n_slots]
        if model.l2g_detach:
            slots = slots.detach()
        means.append(F.normalize(slots.mean(dim=0), dim=0))
    m = torch.stack(means)
    return {"embeddings": e, "scores": model.prototypes(e), "local_embeddings": l,
            "local_scores": model.local_prototypes(l), "l2g_scores": model.l2g_prototypes(m)}


def naive_losses(out: dict, batch_size: int, n_global: int, n_slots: int, crops_for_assign: Sequence[int],
                 temperature: float, epsilon: float, n_iters: int, slot_perms=None,
                 queue_scores=None, local_queue_scores=None, weights=(1 / 3, 1 / 3, 1 / 3),
                 sinkhorn_dtype: torch.dtype = torch.float64) -> dict:
    """All terms from a naive_forward output, one crop pair at a time.

    slot_perms: {(i, v): permutation of the slots} or None (see naive_local_loss).
    queue_scores / local_queue_scores: {crop i: (L, K)} or None.
    """
    rows = batch_size * n_slots
    codes = {i: naive_codes(out["scores"][i * batch_size:(i + 1) * batch_size].detach(),
                            None if queue_scores is None else queue_scores[i], epsilon, n_iters, sinkhorn_dtype)
             for i in crops_for_assign}
    local_codes = {i: naive_codes(out["local_scores"][i * rows:(i + 1) * rows].detach(),
                                  None if local_queue_scores is None else local_queue_scores[i], epsilon, n_iters,
                                  sinkhorn_dtype)
                   for i in crops_for_assign}
    g = naive_global_loss(out["scores"], codes, batch_size, temperature)
    loc = naive_local_loss(out["local_scores"], local_codes, batch_size, n_global, n_slots, temperature, slot_perms)
    t = naive_l2g_loss(out["l2g_scores"], codes, batch_size, n_global, temperature)
    total = weights[0] * g + weights[1] * loc + weights[2] * t
    return {"total": total, "global": g, "local": loc, "l2g": t, "codes": codes}


def naive_knn_multilabel(bank_feats: torch.Tensor, bank_labels: torch.Tensor, query_feats: torch.Tensor,
                         k: int, temperature: float) -> torch.Tensor:
    """Weighted k-NN multi-label scores, one query and one neighbour at a time.

    bank_feats: (M, F), bank_labels: (M, C) multi-hot, query_feats: (Q, F). For each query:
    cosine similarity to every bank row, the k most similar rows, weight exp(sim / T) each;
    class c scores the weighted vote sum_j w_j y_jc / sum_j w_j. Returns (Q, C) float64.
    """
    out = torch.zeros(query_feats.shape[0], bank_labels.shape[1], dtype=torch.float64)
    for qi in range(query_feats.shape[0]):
        q = query_feats[qi].double()
        sims = []
        for m in range(bank_feats.shape[0]):
            b = bank_feats[m].double()
            sims.append((float(q @ b / (q.norm() * b.norm())), m))
        sims.sort(key=lambda t: -t[0])
        total = 0.0
        for sim, m in sims[:k]:
            w = math.exp(sim / temperature)
            total += w
            for c in range(bank_labels.shape[1]):
                out[qi, c] += w * float(bank_labels[m, c])
        out[qi] /= total
    return out
