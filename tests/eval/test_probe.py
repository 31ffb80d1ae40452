"""The probe core: classifier init, masked loss, schedule, final and best-over-epochs mAP."""

import math

import numpy as np
import pytest
import torch

from gaelle_ray.eval.probe import EpochMaps, cosine_lr, epoch_steps, make_classifier, masked_bce


def test_masked_bce_and_schedule():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1, 0, 255], [0, 255, 1]], dtype=torch.uint8)

    def bce(x, y):
        return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))

    want = (bce(2.0, 1) + bce(-1.0, 0) + bce(0.0, 0) + bce(-2.0, 1)) / 2  # summed over classes / batch
    assert masked_bce(logits, targets).item() == pytest.approx(want, rel=1e-6)
    assert cosine_lr(0.1, 0, 100) == pytest.approx(0.1)
    assert cosine_lr(0.1, 50, 100) == pytest.approx(0.05)
    assert cosine_lr(0.1, 100, 100) == pytest.approx(0.0, abs=1e-12)
    clf = make_classifier(2048, 80, torch.Generator().manual_seed(0))
    assert torch.all(clf.bias == 0.1)
    assert clf.weight.std().item() == pytest.approx(0.01, rel=0.05) and abs(clf.weight.mean().item()) < 1e-3


def test_epoch_maps_final_and_best():
    names = ["a", "b"]
    targets = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0]], dtype=torch.uint8)
    good = torch.tensor([[3.0, -1.0], [-2.0, 2.0], [1.0, 1.0], [-1.0, -3.0]])  # every positive above
    maps = EpochMaps(names)
    assert maps.add(0, -good, targets) < 1.0
    assert maps.add(1, good, targets) == pytest.approx(1.0)
    last = maps.add(2, -good, targets)
    result = maps.result(2, [{"epoch": e} for e in range(3)], num_train=10, seconds=1.5, mode="fast",
                         extra={"k": 1})
    assert result.map_final == last and result.map_best == pytest.approx(1.0) and result.best_epoch == 1
    np.testing.assert_allclose(result.ap_best, [1.0, 1.0])
    assert result.num_test == 4 and result.num_train == 10 and result.mode == "fast" and result.extra == {"k": 1}
    assert result.to_dict()["k"] == 1 and [r["class"] for r in result.per_class()] == names
    # no positive test label at all: every mAP is nan, the last epoch counts as the best
    empty = EpochMaps(names)
    empty.add(0, good, torch.zeros_like(targets))
    nan_result = empty.result(4, [], num_train=0, seconds=0.0)
    assert math.isnan(nan_result.map_final) and nan_result.best_epoch == 4 and nan_result.excluded == names
    with pytest.raises(RuntimeError, match="no epoch was scored"):
        EpochMaps(names).result(0, [], num_train=0, seconds=0.0)


def test_epoch_steps():
    assert [epoch_steps(n, 8) for n in (0, 1, 8, 9, 16)] == [1, 1, 1, 2, 2]
