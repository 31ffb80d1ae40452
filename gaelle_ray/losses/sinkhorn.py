"""Sinkhorn-Knopp equipartition codes (method.md section 3), a pure function.

Distributed behaviour is explicit: pass a process group and the prototype (row) sums,
the total and the maximum are all-reduced across its workers; with `group=None` the same
arithmetic runs on this process's scores alone, so 1 process on the concatenated batch
equals W processes on its parts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=op, group=group)
    return t


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, n_iters: int = 3, group=None) -> torch.Tensor:
    """Codes Q for prototype scores.

    scores: (..., N, K) scores of N samples against K prototypes on this worker; leading
        dimensions are independent problems solved together (one collective for all).
    Returns (..., N, K) float32 codes; each row sums to 1 and, over all workers, each
    prototype column sums to N_total / K (N_total = N * world size).

    Q = exp(scores / eps)^T, normalised to sum 1, then `n_iters` times: rows (prototypes)
    divided by their sums over all workers and by K, columns (samples) divided by their
    sums and by N_total; finally times N_total. Each prototype's maximum score (over all
    workers) is subtracted before the exponential: the rows are rescaled by the first row
    normalisation anyway, so the codes are unchanged, and exp never overflows and never
    turns a whole prototype row into zeros. (A sample whose every score underflows gets a
    zero code instead of NaN.)
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn: epsilon must be > 0, got {epsilon}")
    if scores.dim() < 2:
        raise ValueError(f"sinkhorn: scores must be (..., N, K), got shape {tuple(scores.shape)}")
    world = dist.get_world_size(group) if group is not None else 1
    s = scores.detach().float().transpose(-1, -2)  # (..., K, N)
    k, n = s.shape[-2], s.shape[-1]
    n_total = n * world

    row_max = _all_reduce(s.amax(dim=-1, keepdim=True), group, dist.ReduceOp.MAX)  # (..., K, 1)
    q = torch.exp((s - row_max) / epsilon)  # (..., K, N)
    total = _all_reduce(q.sum(dim=(-2, -1), keepdim=True), group)  # (..., 1, 1)
    q = q / total
    for _ in range(n_iters):
        rows = _all_reduce(q.sum(dim=-1, keepdim=True), group)  # (..., K, 1)
        q = q / (rows * k)
        cols = q.sum(dim=-2, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)  # (..., 1, N): local
        q = q / (cols * n_total)
    q = q * n_total
    return q.transpose(-1, -2)  # (..., N, K)
