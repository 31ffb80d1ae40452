"""The three GAELLE losses of method.md section 4, vectorised over crop pairs.

Rows are crop-major everywhere (row = v * B + b; local rows (v*B + b)*S + j).
A = len(crops_for_assign) crops give codes; V crops in all; Vg global crops.

CE(q, x) = -mean_rows sum_k q[k] log_softmax(x / tau)[k]: the sum over k for each row
first, then the mean over rows (method.md section 4), so that the logged values are exact
to float32 rounding at real batch sizes (one float32 contraction over all N*K products
drifts low by percents). Every (code crop, predicting crop) pair of the global and l2g
losses is one entry of an (A, V) matrix computed by a single einsum, with the pair rules as
masks; the local loss gathers each pair's predicting crop with that pair's slot permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from gaelle_ray.losses.sinkhorn import sinkhorn


class NonFiniteLossError(FloatingPointError):
    """A loss term or the scores it came from are NaN or infinite; the message names the term."""


@dataclass(frozen=True)
class LossSettings:
    """Everything the losses need besides tensors (built from a Config by `from_config`)."""

    batch_size: int  # B, images on this worker
    n_crops: int  # V
    n_global: int  # Vg
    n_slots: int  # S
    crops_for_assign: tuple[int, ...] = (0, 1)
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    weights: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)  # global, local, l2g

    @classmethod
    def from_config(cls, config, batch_size: int | None = None) -> "LossSettings":
        loss = config.loss
        return cls(batch_size=batch_size or config.train.batch_size_per_worker, n_crops=config.augmentation.num_crops,
                   n_global=config.augmentation.num_global_crops, n_slots=config.num_slots,
                   crops_for_assign=tuple(loss.crops_for_assign), temperature=loss.temperature,
                   epsilon=loss.epsilon, sinkhorn_iterations=loss.sinkhorn_iterations,
                   weights=(loss.weight_global, loss.weight_local, loss.weight_l2g))


@dataclass
class LossTerms:
    """total, global, local, l2g: scalar tensors; a term with weight 0 is not computed and is
    None. codes: (A, B, K) global codes (no grad)."""

    total: torch.Tensor
    global_: torch.Tensor
    local: torch.Tensor | None
    l2g: torch.Tensor | None
    codes: torch.Tensor


def cross_entropy_pairs(codes: torch.Tensor, scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE of every code set against every score set.

    codes: (A, N, K) targets (rows sum to 1); scores: (V, N, K) logits.
    Returns (A, V): entry [a, v] = -mean_n sum_k codes[a, n, k] log_softmax(scores[v, n] / tau)[k].
    """
    logp = F.log_softmax(scores.float() / temperature, dim=-1)  # (V, N, K)
    per_row = torch.einsum("ank,vnk->avn", codes.float(), logp)  # (A, V, N): sum over k per row
    return -per_row.mean(dim=-1)  # (A, V)


def local_pairs(crops_for_assign: Sequence[int], n_global: int) -> list[tuple[int, int]]:
    """The (a, v) pairs of the local loss, in the order their slot permutations come: for
    each assigned crop (a = its position in crops_for_assign) every other global crop v,
    ascending."""
    return [(a, v) for a, i in enumerate(crops_for_assign) for v in range(n_global) if v != i]


def codes_with_queue(scores: torch.Tensor, queue_scores: torch.Tensor | None, epsilon: float,
                     n_iters: int, group=None) -> torch.Tensor:
    """Sinkhorn codes of a batch, with the queue's scores stacked before it.

    scores: (A, N, K) batch scores of the assigned crops; queue_scores: (A, L, K) or None.
    Returns (A, N, K): the batch's rows of the codes.
    """
    n = scores.shape[1]
    if queue_scores is not None:
        scores = torch.cat([queue_scores.to(scores.dtype), scores.detach()], dim=1)  # (A, L+N, K)
    return sinkhorn(scores, epsilon, n_iters, group)[:, -n:]  # (A, N, K)


def global_loss(scores: torch.Tensor, codes: torch.Tensor, crops_for_assign: Sequence[int],
                temperature: float) -> torch.Tensor:
    """Swapped prediction: each assigned crop's code predicted by every other crop.

    scores: (V, B, K) global scores; codes: (A, B, K) codes of crops_for_assign.
    Returns mean over assigned i of mean over v != i of CE(q_i, s_v).
    """
    v = scores.shape[0]
    ce = cross_entropy_pairs(codes, scores, temperature)  # (A, V)
    keep = torch.ones_like(ce)
    keep[torch.arange(len(crops_for_assign)), list(crops_for_assign)] = 0.0
    return (ce * keep).sum() / (len(crops_for_assign) * (v - 1))


def local_loss(local_scores: torch.Tensor, local_codes: torch.Tensor, crops_for_assign: Sequence[int],
               temperature: float, slot_perms: torch.Tensor | None = None) -> torch.Tensor:
    """Local swapped prediction between global crops.

    local_scores: (Vg, B, S, K_l); local_codes: (A, B*S, K_l) codes of crops_for_assign.
    slot_perms: (P, S), one permutation of the predicting crop's slots per pair of
    `local_pairs(crops_for_assign, Vg)` (P pairs), shared by the whole batch: slot j of
    every image takes slot perm[j]; None pairs slot j with slot j. Returns mean over
    assigned i of mean over global crops v != i of CE(ql_i, r_v[:, perm_(i, v)]).
    """
    vg, b, s, k = local_scores.shape
    pairs = local_pairs(crops_for_assign, vg)
    device = local_scores.device
    code_of = torch.tensor([a for a, _ in pairs], device=device)  # (P,)
    crop_of = torch.tensor([v for _, v in pairs], device=device)  # (P,)
    if slot_perms is None:
        slot_perms = torch.arange(s, device=device).expand(len(pairs), s)  # (P, S)
    elif tuple(slot_perms.shape) != (len(pairs), s):
        raise ValueError(f"local_loss: slot_perms has shape {tuple(slot_perms.shape)}, expected "
                         f"({len(pairs)}, {s}): one permutation of the {s} slots per (code crop, predicting crop) pair")
    logp = F.log_softmax(local_scores.float() / temperature, dim=-1)  # (Vg, B, S, K_l)
    images = torch.arange(b, device=device)
    predicting = logp[crop_of[:, None, None], images[None, :, None], slot_perms.to(device)[:, None, :]]  # (P, B, S, K_l)
    codes = local_codes.float().reshape(len(crops_for_assign), b, s, k)[code_of]  # (P, B, S, K_l)
    per_row = torch.einsum("pbsk,pbsk->pbs", codes, predicting)  # (P, B, S): sum over k per row
    return -per_row.mean()


def l2g_loss(l2g_scores: torch.Tensor, codes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Local-to-global cross-view prediction.

    l2g_scores: (Vg, B, K) scores of each global crop's mean local embedding;
    codes: (A, B, K) global codes. Returns mean over v of mean over j of CE(q_j, t_v).
    """
    return cross_entropy_pairs(codes, l2g_scores, temperature).mean()


def gaelle_losses(out, settings: LossSettings, *, slot_perms: torch.Tensor | None = None,
                  queue_scores: torch.Tensor | None = None, local_queue_scores: torch.Tensor | None = None,
                  group=None) -> LossTerms:
    """All three losses and their weighted total from one forward pass.

    out: a GaelleOutput (scores (V*B, K), local_scores (Vg*B*S, K_l), l2g_scores (Vg*B, K)).
    slot_perms: (P, S) slot permutations of the local loss's pairs (see `local_loss`), or None.
    queue_scores: (A, L, K) / local_queue_scores: (A, L_l, K_l) scores of the queues' rows
    for the assigned crops, or None. group: process group for distributed Sinkhorn.
    A term whose weight is 0 is skipped, with its Sinkhorn (the local codes) and its scores
    (which the model then need not compute): SwAV-only costs what SwAV costs.
    Raises NonFiniteLossError naming the term when any term is not finite.
    """
    st = settings
    b, s = st.batch_size, st.n_slots
    assign = list(st.crops_for_assign)
    w_g, w_l, w_t = st.weights
    scores = out.scores.reshape(st.n_crops, b, -1)  # (V, B, K)
    codes = codes_with_queue(scores[assign], queue_scores, st.epsilon, st.sinkhorn_iterations, group)  # (A, B, K)

    terms = {"global": global_loss(scores, codes, assign, st.temperature)}
    total = w_g * terms["global"]
    if w_l != 0:
        local_scores = _branch(out.local_scores, "local_scores", "weight_local").reshape(st.n_global, b, s, -1)  # (Vg, B, S, K_l)
        local_codes = codes_with_queue(local_scores[assign].reshape(len(assign), b * s, -1),  # (A, B*S, K_l)
                                       local_queue_scores, st.epsilon, st.sinkhorn_iterations, group)
        terms["local"] = local_loss(local_scores, local_codes, assign, st.temperature, slot_perms)
        total = total + w_l * terms["local"]
    if w_t != 0:
        l2g_scores = _branch(out.l2g_scores, "l2g_scores", "weight_l2g").reshape(st.n_global, b, -1)  # (Vg, B, K)
        terms["l2g"] = l2g_loss(l2g_scores, codes, st.temperature)
        total = total + w_t * terms["l2g"]
    check_finite(total, terms, out)
    return LossTerms(total, terms["global"], terms.get("local"), terms.get("l2g"), codes)


def _branch(scores: torch.Tensor | None, field: str, weight_key: str) -> torch.Tensor:
    if scores is None:
        raise ValueError(f"loss.{weight_key} is not 0 but the model did not compute {field}: build the model "
                         "with that loss on (build_model(config) follows the config's loss weights)")
    return scores


def check_finite(total: torch.Tensor, terms: dict[str, torch.Tensor], out) -> None:
    """One device sync per step: inspect the terms only when the total is not finite."""
    if bool(torch.isfinite(total)):
        return
    source = {"global": ("scores", out.scores), "local": ("local_scores", out.local_scores),
              "l2g": ("l2g_scores", out.l2g_scores)}
    bad = []
    for name, value in terms.items():
        value = value.detach()
        if not math.isfinite(float(value)):
            field, tensor = source[name]
            why = "its scores are non-finite" if not bool(torch.isfinite(tensor.detach()).all()) else "its scores are finite"
            bad.append(f"{name} loss = {float(value)} ({field}: {why})")
    raise NonFiniteLossError("non-finite GAELLE loss: " + ("; ".join(bad) or f"total = {float(total.detach())}"))
