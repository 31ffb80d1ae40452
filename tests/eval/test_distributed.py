"""The full linear probe on Ray Train workers: the same mAP as in one process."""

import numpy as np
import pytest

from gaelle_ray.eval.linear import linear_probe, run_linear_eval
from gaelle_ray.eval.probe import ProbeSettings, probe_datasets


@pytest.mark.slow
def test_distributed_probe_gathers_scores_once(toy_shards, tmp_path, ray_local, make_backbone, make_config):
    from gaelle_ray.eval.distributed import linear_probe_distributed, worker_rows

    order = np.arange(10)
    parts = [worker_rows(order, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 4] and set(np.concatenate(parts)) == set(range(10))

    # lr = 0: the classifier keeps its (seeded) initial weights, so the distributed test mAP
    # must equal the single-process one, computed over all 16 gathered test scores.
    frozen = ProbeSettings(epochs=1, batch_size=8, lr=0.0, image_size=40, resize_size=48)
    backbone = make_backbone()
    dist_result = linear_probe_distributed(backbone, "resnet18", toy_shards, "train", "val", frozen, num_workers=2)
    train, test = probe_datasets(toy_shards, "train", "val", frozen)
    single = linear_probe(make_backbone(), train, test, frozen)
    assert dist_result.num_test == 16 and dist_result.extra["num_workers"] == 2
    assert dist_result.map_final == pytest.approx(single.map_final, abs=1e-6)
    np.testing.assert_allclose(dist_result.ap_final, single.ap_final, atol=1e-6)

    # the CLI path: run_linear_eval with 2 workers (full protocol, eval.* of the config)
    config = make_config(toy_shards).replace({"train.run_dir": str(tmp_path / "run")})
    trained = run_linear_eval("random", "toy", toy_shards, config, fast=False, allow_overlap=False,
                              num_workers=2, track=False)
    assert trained["mode"] == "full" and trained["num_workers"] == 2 and trained["batch_per_worker"] == 4
    assert len(trained["history"]) == 2 and trained["map_best"] >= trained["map_final"]
    assert trained["leakage_check"] == "random init" and trained["num_test"] == 16
    with pytest.raises(ValueError, match="divisible"):
        linear_probe_distributed(backbone, "resnet18", toy_shards, "train", "val",
                                 ProbeSettings(batch_size=7), num_workers=2)
