"""Sinkhorn-Knopp: marginals, the plain formula, stability at small epsilon."""

import pytest
import torch
import torch.nn.functional as F

from gaelle_ray.losses.sinkhorn import sinkhorn
from gaelle_ray.reference import naive_sinkhorn


def _scores(n, k, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    e = F.normalize(torch.randn(n, d, generator=g), dim=1)
    c = F.normalize(torch.randn(k, d, generator=g), dim=1)
    return e @ c.t()  # (N, K) cosine scores, as in training


def test_marginals():
    n, k = 64, 10
    q = sinkhorn(_scores(n, k), epsilon=0.05, n_iters=3)
    assert q.dtype == torch.float32 and q.shape == (n, k)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(n))  # each code sums to 1
    before = torch.softmax(_scores(n, k) / 0.05, dim=1).sum(dim=0)  # prototype mass without balancing
    assert (q.sum(dim=0) - n / k).abs().max() < 0.6 * (before - n / k).abs().max()  # 3 iterations balance
    q_many = sinkhorn(_scores(n, k), epsilon=0.05, n_iters=100)
    torch.testing.assert_close(q_many.sum(dim=0), torch.full((k,), n / k), rtol=1e-4, atol=1e-4)
    assert (q >= 0).all()


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_equals_plain_formula_where_finite(eps):
    s = _scores(40, 25, seed=2)
    torch.testing.assert_close(sinkhorn(s, eps, 3), naive_sinkhorn(s, eps, 3), rtol=1e-4, atol=1e-6)


def test_stable_where_the_plain_exponential_overflows():
    s = _scores(40, 25, seed=3)
    s[0, 0] = 1.0  # exp(1 / 0.01) = exp(100) overflows float32
    plain_fp32 = torch.exp(s / 0.01)
    assert not torch.isfinite(plain_fp32).all()
    q = sinkhorn(s, 0.01, 3)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q, naive_sinkhorn(s, 0.01, 3), rtol=1e-3, atol=1e-5)  # float64 reference


def test_batched_problems_are_independent():
    a, b = _scores(30, 12, seed=4), _scores(30, 12, seed=5)
    both = sinkhorn(torch.stack([a, b]), 0.05, 3)
    torch.testing.assert_close(both[0], sinkhorn(a, 0.05, 3))
    torch.testing.assert_close(both[1], sinkhorn(b, 0.05, 3))


def test_half_precision_scores_give_float32_codes_without_gradient():
    s = _scores(20, 8).half().requires_grad_(True)
    q = sinkhorn(s, 0.05, 3)
    assert q.dtype == torch.float32 and not q.requires_grad


def test_bad_arguments():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(_scores(4, 3), 0.0)
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.zeros(5), 0.05)
