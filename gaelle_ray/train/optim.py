"""Optimisation of method.md section 6: LARC over SGD, the per-iteration learning rate,
prototype freezing. Plain torch, no Ray.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn


class LARC:
    """Layer-wise adaptive rate control around an SGD optimiser (trust coefficient, no clipping).

    For every parameter with a gradient, before the inner step:
        local_lr = trust * ||w|| / (||g|| + wd * ||w||)
        g <- (g + wd * w) * local_lr
    and the inner SGD (whose weight decay must be 0) takes its momentum step with the
    group's learning rate. When ||w|| or ||g|| is 0 the gradient is left as it is (no
    weight decay, no scaling). Norms of all parameters are computed in one foreach call.
    """

    def __init__(self, optimizer: torch.optim.SGD, trust_coefficient: float = 0.001, weight_decay: float = 1e-6):
        for group in optimizer.param_groups:
            if group.get("weight_decay", 0) != 0:
                raise ValueError("LARC applies the weight decay itself: build the inner SGD with weight_decay=0")
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.weight_decay = weight_decay

    @property
    def param_groups(self):
        return self.optim.param_groups

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def adapt_gradients(self) -> torch.Tensor:
        """Rescale every gradient in place by its layer's trust ratio (the LARC rule).
        Returns a 0-dim bool tensor: every gradient was finite (read it only when needed:
        on a GPU reading it waits for the backward)."""
        params = [p for g in self.optim.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return torch.tensor(True)
        grads = [p.grad for p in params]
        w_norms = torch.stack(torch._foreach_norm(params))  # (n_params,)
        g_norms = torch.stack(torch._foreach_norm(grads))  # (n_params,)
        wd = self.weight_decay
        active = (w_norms > 0) & (g_norms > 0)
        local_lr = torch.where(active, self.trust_coefficient * w_norms / (g_norms + wd * w_norms),
                               torch.zeros_like(w_norms))
        scale = torch.where(active, local_lr, torch.ones_like(local_lr))  # (n_params,)
        decay = torch.where(active, local_lr * wd, torch.zeros_like(local_lr))  # (n_params,)
        # g <- g * scale + w * decay, i.e. (g + wd w) * local_lr where active, g otherwise
        torch._foreach_mul_(grads, list(scale.unbind()))
        torch._foreach_add_(grads, torch._foreach_mul(params, list(decay.unbind())))
        return torch.isfinite(g_norms).all()

    def step(self) -> None:
        self.adapt_gradients()
        self.optim.step()


def build_optimizer(model: nn.Module, optim_config) -> LARC:
    """SGD(momentum, weight decay 0) over all parameters, wrapped in LARC."""
    sgd = torch.optim.SGD(model.parameters(), lr=optim_config.base_lr, momentum=optim_config.momentum,
                          weight_decay=0.0)
    return LARC(sgd, optim_config.larc_trust_coefficient, optim_config.weight_decay)


def learning_rate(iteration: int, iters_per_epoch: int, epochs: int, optim_config) -> float:
    """Learning rate of one iteration: linear warm-up from start_warmup to base_lr over
    warmup_epochs, then cosine from base_lr to final_lr over the remaining iterations."""
    oc = optim_config
    warmup = oc.warmup_epochs * iters_per_epoch
    total = epochs * iters_per_epoch
    if iteration < warmup:
        return oc.start_warmup + (oc.base_lr - oc.start_warmup) * iteration / warmup
    t = iteration - warmup
    span = max(total - warmup, 1)
    return oc.final_lr + 0.5 * (oc.base_lr - oc.final_lr) * (1 + math.cos(math.pi * t / span))


def set_learning_rate(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def drop_prototype_gradients(model: nn.Module, iteration: int, freeze_niters: int) -> bool:
    """For the first `freeze_niters` iterations, drop the gradient of every parameter whose
    name contains "prototypes". Returns whether anything was frozen."""
    if iteration >= freeze_niters:
        return False
    for name, p in model.named_parameters():
        if "prototypes" in name:
            p.grad = None
    return True


def trainable_parameters(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]
