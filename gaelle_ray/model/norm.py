"""Batch normalisation with per-position statistics, optionally across workers.

The released GAELLE script calls the global projection head once per spatial position,
so in training mode its BatchNorm1d computes statistics per position, over the Vg*B
vectors of that position (and, under SyncBatchNorm, over every worker's vectors of that
position). `batch_norm_positions` reproduces that in one pass: statistics of shape (P, C),
one all-reduce per call instead of one per position, and running statistics updated as if
the P calls had happened one after another.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """Differentiable sum over the workers of `group` (identity without a group)."""
    if group is None:
        return t
    return dist_fn.all_reduce(t, op=dist.ReduceOp.SUM, group=group)


def batch_norm_positions(x: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm, group=None) -> torch.Tensor:
    """Apply BatchNorm1d `bn` to every position separately.

    x: (N, P, C) -> (N, P, C). In training mode (or without running statistics), mean and
    variance are computed per (position, channel) over the N rows of every worker in
    `group` (None: this process only), with a single all-reduce. Running statistics move
    exactly as P successive calls of `bn` (positions 0..P-1) would move them.
    """
    if x.dim() != 3:
        raise ValueError(f"batch_norm_positions expects (N, P, C), got shape {tuple(x.shape)}")
    n, p, c = x.shape
    if c != bn.num_features:
        raise ValueError(f"batch_norm_positions: {c} channels but BatchNorm has {bn.num_features}")
    use_batch_stats = bn.training or not bn.track_running_stats
    if not use_batch_stats:
        y = F.batch_norm(x.reshape(n * p, c), bn.running_mean, bn.running_var,  # (N*P, C)
                         bn.weight, bn.bias, False, 0.0, bn.eps)
        return y.reshape(n, p, c)  # (N, P, C)

    xf = x.float()
    if group is None:
        count = n
        var, mean = torch.var_mean(xf, dim=0, unbiased=False)  # (P, C) each
    else:
        # one collective: [sum (P, C); sum of squares (P, C)] and the row count
        count_t = torch.tensor([float(n)], device=x.device)
        stats = torch.cat([xf.sum(0), (xf * xf).sum(0)], dim=0)  # (2P, C)
        stats = _all_reduce_sum(torch.cat([stats.flatten(), count_t]), group)
        count = int(stats[-1].item())
        sums, sqs = stats[:-1].reshape(2, p, c)  # (P, C) each
        mean = sums / count
        var = (sqs / count - mean * mean).clamp_min(0.0)
    if count < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got {count} rows "
                         "per position (batch too small)")
    y = (xf - mean) * torch.rsqrt(var + bn.eps)  # (N, P, C)
    if bn.affine:
        y = y * bn.weight.float() + bn.bias.float()

    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean.detach(), var.detach() * (count / (count - 1)))
    return y.to(x.dtype)


@torch.no_grad()
def _update_running_stats(bn: nn.modules.batchnorm._BatchNorm, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
    """Running stats after P successive momentum updates with means/vars (P, C), in closed form.

    r_P = (1 - m)^P r_0 + sum_p m (1 - m)^(P - 1 - p) mu_p
    """
    if bn.momentum is None:
        raise ValueError("batch_norm_positions needs a BatchNorm with a numeric momentum (got None)")
    p = means.shape[0]
    m = float(bn.momentum)
    powers = torch.arange(p - 1, -1, -1, device=means.device, dtype=torch.float64)  # (P,) P-1 .. 0
    weights = (m * (1.0 - m) ** powers).to(means.dtype)[:, None]  # (P, 1)
    keep = (1.0 - m) ** p
    # through .data, as BatchNorm's own kernel does: autograd saved these buffers for the
    # backward of the head's earlier (global) call and must not see a version bump
    bn.running_mean.data.mul_(keep).add_((weights * means).sum(0).to(bn.running_mean.dtype))
    bn.running_var.data.mul_(keep).add_((weights * unbiased_vars).sum(0).to(bn.running_var.dtype))
    bn.num_batches_tracked.data.add_(p)
