"""A shortened `gaelle demo` end to end: toy set, shards, Ray Train pretraining, fast linear
probes of the pretrained and the random backbone, the printed table."""

import pytest

from gaelle_ray.demo import run_demo

pytestmark = pytest.mark.slow


def test_short_demo_end_to_end(tmp_path, capsys):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    try:
        result = run_demo(tmp_path / "demo", n_train=96, n_val=48, image_size=64,
                          overrides=["train.epochs=1", "train.batch_size_per_worker=16", "eval.epochs=3",
                                     "augmentation.size_crops=[48, 24]", "eval.image_size=48", "eval.resize_size=56"])
    finally:
        ray.shutdown()
    out = capsys.readouterr().out
    assert "GAELLE pretrained" in out and "random init" in out and "margin" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert 0.0 < result.map_pretrained <= 1.0 and 0.0 < result.map_random <= 1.0
    assert (tmp_path / "demo" / "run" / "mlflow.db").is_file()
