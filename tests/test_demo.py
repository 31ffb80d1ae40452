"""A shortened `gaelle demo` end to end: toy set, shards, Ray Train pretraining with online
evaluation, fast linear probes of the pretrained and the random backbone, the printed
table. Long enough (300 steps) that pretraining must show: the pretrained backbone probes
above the random one, and the online linear mAP ends above its own random-init baseline."""

import math

import pytest

from gaelle_ray.demo import run_demo

pytestmark = pytest.mark.slow

# measured on this config (2-core machine, 2026-11-30): fast-probe margin +3.7 and +5.0
# points, online linear mAP +5.1 over its baseline; the k-NN mAP moved -0.4 to +0.3 (on
# this toy set it dips over the first epochs and rises later: +2.3 at epoch 10 of the
# full demo), so it is checked for being measured, not for a gain
MARGIN = 0.02


def test_short_demo_end_to_end(tmp_path, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        result = run_demo(tmp_path / "demo", n_train=1600, n_val=256, image_size=64,
                          overrides=["train.epochs=6", "train.batch_size_per_worker=32", "eval.epochs=5",
                                     "augmentation.size_crops=[48, 24]", "eval.image_size=48", "eval.resize_size=56",
                                     "eval.online_every_epochs=3", "eval.online_bank_images=512"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    for row in ("GAELLE pretrained", "random init", "margin", "online k-NN mAP", "online linear mAP"):
        assert row in out, row
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert (tmp_path / "demo" / "run" / "mlflow.db").is_file()
    assert result.map_pretrained - result.map_random >= MARGIN, (result.map_pretrained, result.map_random)
    online = result.online
    assert online["online_linear_map"] - online["online_linear_map_baseline"] >= MARGIN, online
    assert 0.0 < online["online_map"] <= 1.0 and 0.0 < online["online_map_baseline"] <= 1.0
    assert math.isclose(online["online_map_gain"], online["online_map"] - online["online_map_baseline"])
    assert (tmp_path / "demo" / "run" / "pictures" / "online_map.png").is_file()
