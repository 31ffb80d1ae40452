"""mAP against a naive loop written from the definition, and against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from gaelle_ray.eval.metrics import average_precision, mean_average_precision


def naive_ap(scores, targets):
    """sklearn's definition, one class, loop over distinct thresholds; 255 left out; the
    score used is score - 1e-5 * target."""
    kept = [(float(s) - 1e-5 * float(t == 1), int(t)) for s, t in zip(scores, targets) if t != 255]
    n_pos = sum(t for _, t in kept)
    if n_pos == 0:
        return float("nan")
    ap, prev_recall = 0.0, 0.0
    for threshold in sorted({s for s, _ in kept}, reverse=True):
        above = [t for s, t in kept if s >= threshold]
        precision = sum(above) / len(above)
        recall = sum(above) / n_pos
        ap += (recall - prev_recall) * precision
        prev_recall = recall
    return ap


def _data(rng, n=120, c=6, p=0.3, ignore=0.0):
    scores = rng.normal(size=(n, c))
    targets = (rng.random((n, c)) < p).astype(np.uint8)
    targets[rng.random((n, c)) < ignore] = 255
    return scores, targets


@pytest.mark.parametrize("seed", range(5))
def test_matches_naive_loop(seed):
    rng = np.random.default_rng(seed)
    scores, targets = _data(rng, ignore=0.15)
    scores[:40] = np.round(scores[:40])  # plenty of exact ties
    m, ap, info = mean_average_precision(scores, targets)
    ref = np.array([naive_ap(scores[:, c], targets[:, c]) for c in range(scores.shape[1])])
    np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)
    assert m == pytest.approx(np.nanmean(ref), abs=1e-12)
    assert info["num_samples"] == 120


@pytest.mark.parametrize("seed", range(5))
def test_matches_sklearn_on_untied_scores(seed):
    rng = np.random.default_rng(seed)
    n, c = 150, 5
    # distinct scores at least 1e-3 apart: the 1e-5 tie rule cannot reorder anything
    scores = np.stack([rng.permutation(n) * 1e-3 for _ in range(c)], axis=1)
    targets = (rng.random((n, c)) < 0.3).astype(int)
    m, ap, _ = mean_average_precision(scores, targets)
    ref = [average_precision_score(targets[:, j], scores[:, j]) for j in range(c)]
    np.testing.assert_allclose(ap, ref, rtol=0, atol=1e-12)
    assert m == pytest.approx(np.mean(ref), abs=1e-12)
    # torch tensors are accepted
    m_t, _, _ = mean_average_precision(torch.from_numpy(scores).float(), torch.from_numpy(targets))
    assert m_t == pytest.approx(m, abs=1e-6)


def test_tie_rule():
    # Exact ties: sklearn already scores a tie group at its end (pessimistic), so the rule
    # changes nothing there and we equal sklearn on the raw scores...
    scores, targets = np.ones(4), np.array([1, 0, 1, 0])
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores))
    # ...and everything equals sklearn on the shifted scores.
    rng = np.random.default_rng(0)
    s, t = _data(rng, n=200, c=4)
    s = np.round(s * 2) / 2
    _, ap, _ = mean_average_precision(s, t)
    np.testing.assert_allclose(ap, [average_precision_score(t[:, j], s[:, j] - 1e-5 * t[:, j]) for j in range(4)])
    # Near-ties (a positive less than 1e-5 above a negative) are where the rule matters:
    scores = np.array([0.9, 0.5 + 4e-6, 0.5, 0.1])
    targets = np.array([1, 1, 0, 0])
    raw = average_precision_score(targets, scores)  # positive ranked above the negative: 1.0
    assert raw == pytest.approx(1.0)
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)  # ranked below it
    assert average_precision(scores, targets) == pytest.approx(average_precision_score(targets, scores - 1e-5 * targets))


def test_masked_entries_are_left_out():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 0])
    masked = np.array([1, 255, 1, 0, 0])  # the negative at 0.8 is "difficult"
    assert average_precision(scores, targets) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(scores, masked) == pytest.approx(1.0)
    # a masked positive counts for nothing either
    assert average_precision(scores, np.array([255, 0, 1, 0, 0])) == pytest.approx(0.5)
    # same as dropping the rows
    keep = masked != 255
    assert average_precision(scores, masked) == pytest.approx(average_precision_score(masked[keep], scores[keep]))


def test_classes_without_positive_are_excluded():
    rng = np.random.default_rng(1)
    scores, targets = _data(rng, n=50, c=4)
    targets[:, 1] = 0
    targets[:, 3] = np.where(targets[:, 3] == 1, 255, targets[:, 3])  # positives all masked
    m, ap, info = mean_average_precision(scores, targets, ["a", "b", "c", "d"])
    assert np.isnan(ap[1]) and np.isnan(ap[3])
    assert info["excluded"] == [1, 3] and info["excluded_names"] == ["b", "d"]
    assert info["num_classes_used"] == 2
    assert m == pytest.approx((ap[0] + ap[2]) / 2)
    assert list(info["positives"][[1, 3]]) == [0, 0]
    m0, _, _ = mean_average_precision(scores, np.zeros_like(targets))
    assert np.isnan(m0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        mean_average_precision(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        mean_average_precision(np.array([[np.nan], [0.0]]), np.array([[1], [0]]))
    with pytest.raises(ValueError, match="0, 1 or 255"):
        mean_average_precision(np.zeros((2, 1)), np.array([[2], [0]]))
    with pytest.raises(ValueError, match="class names"):
        mean_average_precision(np.zeros((2, 2)), np.zeros((2, 2)), ["only one"])
