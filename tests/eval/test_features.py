"""Evaluation images from shards and frozen-backbone features."""

import numpy as np
import pytest
import torch

from gaelle_ray.eval.features import EvalTransform, ShardImages, extract_features


def test_dataset_items_and_orders(toy_shards):
    ds = ShardImages(toy_shards, "train", EvalTransform(True, 40, 48))
    image, labels, image_id = ds[3]
    assert image.shape == (3, 40, 40) and image.dtype == torch.float32
    assert labels.shape == (12,) and labels.dtype == torch.uint8 and image_id == int(ds.image_ids[3])
    centre = ds.with_transform(EvalTransform(False, 40, 48))
    assert torch.equal(centre[3][0], centre[3][0])  # centre crops are deterministic
    order = ds.block_order(seed=0, epoch=1)
    assert sorted(order.tolist()) == list(range(len(ds)))
    assert np.array_equal(order, ds.block_order(seed=0, epoch=1))
    assert not np.array_equal(order, ds.block_order(seed=0, epoch=2))
    with pytest.raises(ValueError, match="split 'nope'"):
        ShardImages(toy_shards, "nope", None)


def test_features_with_loader_processes(toy_shards, make_backbone):
    backbone = make_backbone()
    test = ShardImages(toy_shards, "val", EvalTransform(False, 40, 48))
    f0, l0, i0 = extract_features(backbone, test, 8)
    f1, l1, i1 = extract_features(backbone, test, 8, num_workers=2)
    assert f0.shape == (16, 512) and f0.dtype == torch.float32 and l0.shape == (16, 12)
    torch.testing.assert_close(f0, f1)
    assert torch.equal(l0, l1) and torch.equal(i0, i1) and torch.equal(i0, torch.from_numpy(test.image_ids))
