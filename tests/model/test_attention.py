"""Vectorised semantic attention against the per-position loop of the released script."""

import copy

import pytest
import torch

from gaelle_ray.model.gaelle import GaelleModel, ProjectionHead, semantic_attention
from gaelle_ray.reference import naive_semantic_attention


def _head_pair(c, hidden, d, seed=0):
    torch.manual_seed(seed)
    head = ProjectionHead(c, hidden, d)
    with torch.no_grad():  # non-trivial BN state and affine parameters
        head[1].running_mean.normal_()
        head[1].running_var.uniform_(0.5, 2.0)
        head[1].weight.uniform_(0.5, 1.5)
        head[1].bias.normal_(0, 0.1)
    return head, copy.deepcopy(head)


@pytest.mark.parametrize("n_groups", [1, 4, 8])
@pytest.mark.parametrize("train", [True, False])
def test_vectorised_attention_equals_per_position_loop(n_groups, train):
    n, c, h, w, hidden, d = 6, 64, 3, 4, 48, 32
    fast_head, slow_head = _head_pair(c, hidden, d)
    fast_head.train(train)
    slow_head.train(train)
    torch.manual_seed(1)
    fmap = torch.randn(n, c, h, w).relu()
    f1 = fmap.clone().requires_grad_(True)
    f2 = fmap.clone().requires_grad_(True)

    fast = semantic_attention(f1, fast_head, n_groups, temperature=0.7)
    slow = naive_semantic_attention(f2, slow_head, n_groups, temperature=0.7)
    assert fast.shape == (n * d // n_groups, c)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)

    weights = torch.randn_like(fast)
    (fast * weights).sum().backward()
    (slow * weights).sum().backward()
    torch.testing.assert_close(f1.grad, f2.grad, rtol=1e-4, atol=1e-6)
    for (name, p1), (_, p2) in zip(fast_head.named_parameters(), slow_head.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-5, msg=name)
    # running statistics move as P successive calls of the BatchNorm would move them
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast_head[1], key), getattr(slow_head[1], key), rtol=1e-5, atol=1e-6)
    if train:
        assert int(fast_head[1].num_batches_tracked) == h * w


def test_per_position_statistics_differ_from_one_batchnorm():
    """A single BatchNorm over all positions is a different function (method.md section 2)."""
    head, _ = _head_pair(16, 24, 8)
    head.train()
    fmap = torch.randn(4, 16, 2, 2) * torch.arange(1, 5).float().reshape(1, 1, 2, 2)
    vec = semantic_attention(fmap, head, 2)
    pooled_bn = head(fmap.flatten(2).transpose(1, 2).reshape(-1, 16))  # one BN over all N*P rows
    a = torch.nn.functional.normalize(pooled_bn.reshape(4, 4, 8), dim=-1).softmax(dim=1)
    other = torch.einsum("nhcp,nphs->nhcs", fmap.flatten(2).reshape(4, 2, 8, 4), a.reshape(4, 4, 2, 4))
    other = other.reshape(4, 16, 4).transpose(1, 2).reshape(16, 16)
    assert not torch.allclose(vec, other, atol=1e-4)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("n_groups", [1, 4, 8])
@pytest.mark.parametrize("sizes", [(224, 96), (64, 32)], ids=["224-96", "small"])
def test_model_output_shapes(batch, n_groups, sizes):
    torch.manual_seed(0)
    d, k, kl = 64, 30, 20
    model = GaelleModel("resnet18", hidden_mlp=128, feat_dim=d, nmb_prototypes=k, nmb_local_prototypes=kl,
                        nmb_groups_heads=n_groups)
    crops = [torch.randn(2 * batch, 3, sizes[0], sizes[0]), torch.randn(6 * batch, 3, sizes[1], sizes[1])]
    with torch.no_grad():
        out = model(crops)
    s = d // n_groups
    assert out.embeddings.shape == (8 * batch, d)
    assert out.scores.shape == (8 * batch, k)
    assert out.local_embeddings.shape == (2 * batch * s, d)
    assert out.local_scores.shape == (2 * batch * s, kl)
    assert out.l2g_scores.shape == (2 * batch, k)
    torch.testing.assert_close(out.local_embeddings.norm(dim=1), torch.ones(2 * batch * s))
    torch.testing.assert_close(out.embeddings.norm(dim=1), torch.ones(8 * batch))


def test_bad_sizes_raise_value_errors():
    with pytest.raises(ValueError, match="not divisible"):
        GaelleModel("resnet18", hidden_mlp=32, feat_dim=30, nmb_groups_heads=4)
    with pytest.raises(ValueError, match="unknown backbone"):
        GaelleModel("resnet5", hidden_mlp=32, feat_dim=32)
    with pytest.raises(ValueError, match="more than 1 value"):
        head, _ = _head_pair(8, 8, 4)
        semantic_attention(torch.randn(1, 8, 2, 2), head, 2)
