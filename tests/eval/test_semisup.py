"""Semi-supervised fine-tuning: the label subset, the fine-tuning loop and `gaelle semisup`."""

import math

import numpy as np
import pytest
import torch

from gaelle_ray.eval.features import EvalTransform, ShardImages
from gaelle_ray.eval.semisup import SemisupSettings, label_subset, run_semisup, semisup_finetune


def test_label_subset_is_fixed_by_seed():
    ids = np.arange(1000, 1200)
    a = label_subset(ids, 10, seed=0)
    assert len(a) == 20 and np.array_equal(a, label_subset(ids, 10, seed=0))
    assert not np.array_equal(a, label_subset(ids, 10, seed=1))
    assert len(label_subset(ids, 1, seed=0)) == 2 and len(label_subset(ids[:10], 1, seed=0)) == 1
    # the same images whatever the row order
    perm = np.random.default_rng(3).permutation(len(ids))
    assert set(ids[perm][label_subset(ids[perm], 10, seed=0)]) == set(ids[a])
    with pytest.raises(ValueError, match="not unique"):
        label_subset([1, 1, 2], 50, 0)


def test_semisup_trains_the_backbone(toy_shards, make_backbone):
    backbone = make_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    full = ShardImages(toy_shards, "train", EvalTransform(True, 40, 48))
    rows = label_subset(full.image_ids, 25, seed=0)
    train = full.select(rows)
    test = ShardImages(toy_shards, "val", EvalTransform(False, 40, 48))
    settings = SemisupSettings(percent=25, epochs=2, batch_size=4, milestones=(1,), image_size=40, resize_size=48)
    result = semisup_finetune(backbone, train, test, settings)
    assert result.num_train == 8 and result.mode == "semisup"
    assert math.isfinite(result.map_final) and result.map_best >= result.map_final
    assert [h["lr_backbone"] for h in result.history] == pytest.approx([0.001, 0.0002])
    assert [h["lr_classifier"] for h in result.history] == pytest.approx([0.1, 0.02])
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v, before[k])]
    assert "conv1.weight" in changed and "layer4.1.conv2.weight" in changed and "bn1.running_mean" in changed


def test_run_semisup_entry_point(toy_shards, make_config):
    config = make_config(toy_shards)
    a = run_semisup("random", 25, None, config, epochs=1, batch_size=4, track=False)
    b = run_semisup("random", 25, None, config, epochs=1, batch_size=4, track=False)
    assert a["subset_size"] == 8 and a["subset_ids_sha1"] == b["subset_ids_sha1"]
    assert a["map_final"] == pytest.approx(b["map_final"])  # seeded: same run twice
    assert a["mode"] == "semisup" and a["percent"] == 25 and a["leakage_check"] == "random init"
    c = run_semisup("random", 25, None, config, epochs=1, batch_size=4, seed=1, track=False)
    assert c["subset_ids_sha1"] != a["subset_ids_sha1"]
