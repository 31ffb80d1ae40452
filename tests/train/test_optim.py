"""LARC, the learning-rate schedule and prototype freezing against method.md section 6."""

import math

import pytest
import torch
from torch import nn

from gaelle_ray.config import OptimConfig
from gaelle_ray.train.optim import LARC, drop_prototype_gradients, learning_rate


def _larc(params, lr=0.5, momentum=0.9, trust=0.001, wd=1e-6):
    return LARC(torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0), trust, wd)


def test_larc_equals_the_formula_on_hand_made_tensors():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # ||w|| = 5
    w.grad = torch.tensor([0.6, 0.8])  # ||g|| = 1
    trust, wd, lr = 0.001, 0.1, 0.5
    opt = _larc([w], lr=lr, momentum=0.0, trust=trust, wd=wd)
    local_lr = trust * 5.0 / (1.0 + wd * 5.0)
    expected_grad = (torch.tensor([0.6, 0.8]) + wd * torch.tensor([3.0, 4.0])) * local_lr
    opt.step()
    torch.testing.assert_close(w.grad, expected_grad)
    torch.testing.assert_close(w.data, torch.tensor([3.0, 4.0]) - lr * expected_grad)


def test_larc_momentum_uses_adapted_gradient():
    w = nn.Parameter(torch.tensor([1.0, 0.0]))
    opt = _larc([w], lr=1.0, momentum=0.9, trust=0.01, wd=0.0)
    updates = []
    for _ in range(2):
        w.grad = torch.tensor([0.0, 2.0])
        before = w.data.clone()
        opt.step()
        updates.append(before - w.data)
    # step 1: buf = g * 0.01 * ||w|| / ||g||; step 2: buf = 0.9 buf + new adapted grad
    g1 = torch.tensor([0.0, 2.0]) * 0.01 * 1.0 / 2.0
    torch.testing.assert_close(updates[0], g1)
    w_norm = math.sqrt(1.0 + 0.01 ** 2)
    g2 = torch.tensor([0.0, 2.0]) * 0.01 * w_norm / 2.0
    torch.testing.assert_close(updates[1], 0.9 * g1 + g2)


@pytest.mark.parametrize("case", ["zero_weight", "zero_grad"])
def test_larc_skips_when_a_norm_is_zero(case):
    w = nn.Parameter(torch.zeros(3) if case == "zero_weight" else torch.ones(3))
    g = torch.tensor([1.0, -2.0, 0.5]) if case == "zero_weight" else torch.zeros(3)
    w.grad = g.clone()
    before = w.data.clone()
    _larc([w], lr=0.1, momentum=0.0, wd=0.5).step()
    torch.testing.assert_close(w.grad, g)  # no scaling, no weight decay
    torch.testing.assert_close(w.data, before - 0.1 * g)


def test_larc_refuses_inner_weight_decay():
    with pytest.raises(ValueError, match="weight_decay=0"):
        LARC(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, weight_decay=1e-4))


def test_learning_rate_warmup_then_cosine():
    oc = OptimConfig(base_lr=0.6, final_lr=0.0006, start_warmup=0.1, warmup_epochs=2)
    ipe, epochs = 10, 12
    assert learning_rate(0, ipe, epochs, oc) == pytest.approx(0.1)
    assert learning_rate(10, ipe, epochs, oc) == pytest.approx(0.1 + 0.5 * 0.5)  # halfway through warm-up
    assert learning_rate(20, ipe, epochs, oc) == pytest.approx(0.6)  # cosine starts at base_lr
    assert learning_rate(20 + 50, ipe, epochs, oc) == pytest.approx(0.0006 + 0.5 * (0.6 - 0.0006))  # half way
    assert learning_rate(119, ipe, epochs, oc) == pytest.approx(
        0.0006 + 0.5 * (0.6 - 0.0006) * (1 + math.cos(math.pi * 99 / 100)))
    no_warm = OptimConfig(base_lr=0.6, final_lr=0.0006, warmup_epochs=0)
    assert learning_rate(0, ipe, epochs, no_warm) == pytest.approx(0.6)
    lrs = [learning_rate(i, ipe, epochs, no_warm) for i in range(ipe * epochs)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone cosine decay


def test_prototype_gradients_dropped_for_the_first_iterations():
    from gaelle_ray.model.gaelle import GaelleModel
    model = GaelleModel("resnet18", hidden_mlp=16, feat_dim=8, nmb_prototypes=5, nmb_local_prototypes=5,
                        nmb_groups_heads=2)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert drop_prototype_gradients(model, iteration=4, freeze_niters=5)
    frozen = {n for n, p in model.named_parameters() if p.grad is None}
    assert frozen == {"prototypes.weight", "local_prototypes.weight", "l2g_prototypes.weight"}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    assert not drop_prototype_gradients(model, iteration=5, freeze_niters=5)
    assert all(p.grad is not None for p in model.parameters())
