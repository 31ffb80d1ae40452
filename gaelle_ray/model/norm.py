"""Batch normalisation whose statistics span a process group, in one collective.

Two uses:
- `batch_norm_positions`: the released GAELLE script calls the global projection head once
  per spatial position, so in training mode its BatchNorm1d computes statistics per
  position, over the Vg*B vectors of that position (and, under SyncBatchNorm, over every
  worker's vectors of that position). This reproduces that in one pass: statistics of
  shape (P, C), one all-reduce per call instead of one per position, and running
  statistics updated as if the P calls had happened one after another.
- `GroupBatchNorm`: synchronised BatchNorm for any backend. torch's SyncBatchNorm refuses
  CPU tensors, so the CPU/gloo path of multi-worker training converts every BatchNorm
  with `convert_group_batchnorm`. The statistics travel through a differentiable
  all-reduce, so gradients are those of one BatchNorm over the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


class _AllGather(torch.autograd.Function):
    """Differentiable all-gather: (*shape) on each worker -> (W, *shape) on every worker.
    The gradient of worker w's slice is summed over all workers and returned to w."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None


def batch_moments(x: torch.Tensor, dims: tuple[int, ...], group=None
                  ) -> tuple[torch.Tensor, torch.Tensor, int | torch.Tensor]:
    """Mean and biased variance of x over `dims` (kept as size-1 dims) and the number of
    values per statistic, over every worker of `group` or over this process alone (then a
    0-dim tensor: reading it would stall a GPU once per BatchNorm).

    Each worker computes its own two-pass mean and sum of squared deviations; one
    differentiable all-gather of [count, mean, M2] brings them together and they are merged
    exactly (M2 = sum_w M2_w + n_w (mean_w - mean)^2), which stays accurate where
    E[x^2] - mean^2 would cancel (deep layers, few values, large means).
    """
    local_count = 1
    for d in dims:
        local_count *= x.shape[d]
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
    count = local_count
    if group is not None and dist.get_world_size(group) > 1:
        n = mean.numel()
        count_t = torch.full((1,), float(local_count), device=x.device, dtype=x.dtype)
        packed = torch.cat([count_t, mean.flatten(), (var * local_count).flatten()])  # (1 + 2n,)
        gathered = _AllGather.apply(packed, group)  # (W, 1 + 2n)
        counts = gathered[:, :1].detach()  # (W, 1)
        means, m2 = gathered[:, 1:1 + n], gathered[:, 1 + n:]  # (W, n) each
        total = counts.sum()
        merged = (counts * means).sum(0) / total  # (n,)
        spread = (m2 + counts * (means - merged) ** 2).sum(0) / total  # (n,)
        count = total  # >= 2: two or more workers with at least one value each
        mean, var = merged.reshape(mean.shape), spread.reshape(var.shape)
    elif count < 2:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got {count} "
                         "(batch too small)")
    return mean, var, count


def _stats_dtype(x: torch.Tensor) -> torch.Tensor:
    """Half-precision activations get float32 statistics; float32/float64 keep their own."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _affine(y: torch.Tensor, bn: _BatchNorm, channel_dim: int) -> torch.Tensor:
    if not bn.affine:
        return y
    shape = [1] * y.dim()
    shape[channel_dim] = bn.num_features
    return y * bn.weight.to(y.dtype).reshape(shape) + bn.bias.to(y.dtype).reshape(shape)


def batch_norm_positions(x: torch.Tensor, bn: _BatchNorm, group=None) -> torch.Tensor:
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
    if not (bn.training or not bn.track_running_stats):
        y = F.batch_norm(x.reshape(n * p, c), bn.running_mean, bn.running_var,  # (N*P, C)
                         bn.weight, bn.bias, False, 0.0, bn.eps)
        return y.reshape(n, p, c)  # (N, P, C)

    xf = _stats_dtype(x)
    mean, var, count = batch_moments(xf, (0,), group)  # (1, P, C) each
    y = _affine((xf - mean) * torch.rsqrt(var + bn.eps), bn, channel_dim=2)  # (N, P, C)
    if bn.training and bn.track_running_stats:
        _update_running_stats(bn, mean[0].detach(), var[0].detach() * (count / (count - 1)))
    return y.to(x.dtype)


@torch.no_grad()
def _update_running_stats(bn: _BatchNorm, means: torch.Tensor, unbiased_vars: torch.Tensor) -> None:
    """Running stats after P successive momentum updates with means/vars (P, C), in closed form.

    r_P = (1 - m)^P r_0 + sum_p m (1 - m)^(P - 1 - p) mu_p
    """
    if bn.momentum is None:
        raise ValueError("GAELLE's BatchNorm needs a numeric momentum (got None)")
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


class GroupBatchNorm(_BatchNorm):
    """BatchNorm (1d, 2d or 3d input) with training statistics over all workers of a group.

    Same parameters, buffers and state-dict names as nn.BatchNorm*d. `group=None` (or a
    group of one worker) behaves exactly like the plain BatchNorm.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.group = group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GroupBatchNorm expects (N, C, ...), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, *spatial) -> same shape."""
        self._check_input_dim(x)
        synced = self.group is not None and dist.get_world_size(self.group) > 1
        if not synced or not (self.training or not self.track_running_stats):
            return super().forward(x)
        dims = (0,) + tuple(range(2, x.dim()))
        xf = _stats_dtype(x)
        mean, var, count = batch_moments(xf, dims, self.group)  # (1, C, 1, ...) each
        y = _affine((xf - mean) * torch.rsqrt(var + self.eps), self, channel_dim=1)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.data.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)
                self.running_mean.data.mul_(1 - m).add_(m * mean.flatten())
                self.running_var.data.mul_(1 - m).add_(m * var.flatten() * (count / (count - 1)))
        return y.to(x.dtype)


def convert_group_batchnorm(module: nn.Module, group) -> nn.Module:
    """Replace every BatchNorm in `module` by a GroupBatchNorm over `group`, keeping its
    parameters (with their requires_grad) and buffers (the module is changed in place and
    returned)."""
    if isinstance(module, _BatchNorm) and not isinstance(module, GroupBatchNorm):
        new = GroupBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                             module.track_running_stats, group)
        state = module.state_dict()
        new.load_state_dict(state)
        for name, param in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        new.train(module.training)
        return new.to(state["running_mean"].device if "running_mean" in state else "cpu")
    for name, child in module.named_children():
        setattr(module, name, convert_group_batchnorm(child, group))
    return module
