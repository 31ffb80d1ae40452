"""Linear probe (full and fast, one process) and `gaelle linear-eval` with MLflow."""

import json
import math

import pytest
import torch

from gaelle_ray.eval.features import EvalTransform, extract_features
from gaelle_ray.eval.linear import fast_linear_probe, linear_probe, run_linear_eval
from gaelle_ray.eval.probe import ProbeSettings, probe_datasets
from gaelle_ray.model import build_model
from gaelle_ray.storage import checkpoint_name, save_checkpoint


class ForwardCounter:
    """Counts images that go through a module."""

    def __init__(self, module):
        self.calls, self.images = 0, 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1
        self.images += inputs[0].shape[0]


# ----------------------------------------------------------------------------- probes


def test_full_protocol_runs_backbone_on_crops_every_epoch(toy_shards, tiny_settings, make_backbone):
    backbone = make_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    counter = ForwardCounter(backbone)
    train, test = probe_datasets(toy_shards, "train", "val", tiny_settings)
    result = linear_probe(backbone, train, test, tiny_settings)
    # 2 epochs x 32 train crops, + the 16 test images once
    assert counter.images == 2 * 32 + 16
    assert math.isfinite(result.map_final) and result.map_best >= result.map_final
    assert 0 <= result.best_epoch < 2 and len(result.history) == 2
    assert [h["epoch"] for h in result.history] == [0, 1] and all("test_map" in h for h in result.history)
    assert result.mode == "full" and result.num_train == 32 and result.num_test == 16
    rows = result.per_class()
    assert len(rows) == 12 and {"class", "ap_final", "ap_best_epoch", "positives"} <= set(rows[0])
    # frozen: BatchNorm running statistics and weights untouched
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fast_mode_learns_and_hits_cache(toy_shards, tmp_path, make_backbone):
    settings = ProbeSettings(epochs=15, batch_size=8, lr=0.1, image_size=40, resize_size=48)
    backbone = make_backbone()
    counter = ForwardCounter(backbone)
    train, test = probe_datasets(toy_shards, "train", "val", settings)
    first = fast_linear_probe(backbone, train, test, settings, cache_dir=tmp_path)
    assert counter.images == 32 + 16  # centre crops, once
    assert len(list(tmp_path.glob("features-*.pt"))) == 2
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    second = fast_linear_probe(backbone, train, test, settings, cache_dir=tmp_path)
    assert counter.images == 32 + 16  # cache hit: the backbone did not run again
    assert second.map_final == first.map_final and second.map_best == first.map_best
    assert first.mode == "fast"
    # other weights -> other key -> recomputed
    with torch.no_grad():
        backbone.fc = torch.nn.Identity()
        backbone.conv1.weight.mul_(1.01)
    extract_features(backbone, test.with_transform(EvalTransform(False, 40, 48)), 8, cache_dir=tmp_path)
    assert counter.images == 32 + 16 + 16


# ----------------------------------------------------------------------------- entry point + MLflow


def test_run_linear_eval_guard_and_mlflow(toy_shards, tmp_path, make_config):
    from mlflow.tracking import MlflowClient

    torch.manual_seed(0)
    pre_config = make_config(toy_shards, split="val")  # pretrained on the evaluation images
    run_dir = tmp_path / "run"
    folder = run_dir / "train" / checkpoint_name(0)
    save_checkpoint(folder, {"worker": {"model": build_model(pre_config).state_dict()}},
                    {"epoch": 0, "config": pre_config.to_dict()})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(toy_shards).replace({"tracking.tracking_uri": uri, "tracking.experiment": "eval-test"})
    from gaelle_ray import tracking

    tracking.check_reachable(uri)
    pretrain_run = tracking.start_run(uri, "eval-test", "pretraining", {}, {"job": "pretrain"})
    tracking.end_run(uri, pretrain_run)
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": pretrain_run}))

    with pytest.raises(ValueError, match="leakage: 16 of the 16"):
        run_linear_eval(str(folder), "toy", toy_shards, config, fast=True, allow_overlap=False,
                        cache_dir=tmp_path / "cache")
    out = run_linear_eval(str(folder), "toy", toy_shards, config, fast=True, allow_overlap=True,
                          cache_dir=tmp_path / "cache")
    assert out["mode"] == "fast" and out["leakage_check"] == "overlap" and out["leakage_overlap"] == 16
    assert out["checkpoint_kind"] == "folder" and out["arch"] == "resnet18"
    assert len(out["per_class"]) == 12 and len(out["history"]) == 2

    client = MlflowClient(uri)
    run = client.get_run(out["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == pretrain_run
    # the pretraining run carries the downstream mAP too (sortable in the MLflow UI)
    pre = client.get_run(pretrain_run)
    assert pre.data.metrics["linear_fast_map_toy"] == pytest.approx(out["map_final"])
    assert run.data.tags["leakage_check"] == "overlap" and run.data.tags["leakage_overlap"] == "16"
    assert run.data.tags["job"] == "linear_eval" and run.data.tags["mode"] == "fast"
    assert run.data.metrics["map_final"] == pytest.approx(out["map_final"])
    assert run.data.metrics["map_best"] == pytest.approx(out["map_best"])
    assert "ap/circle" in run.data.metrics
    assert run.data.params["eval.batch_size"] == "8" and run.data.params["mode"] == "fast"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_map")] == [0, 1]
    assert "per_class_ap.csv" in [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "pictures/per_class_ap.png" in [a.path for a in client.list_artifacts(run.info.run_id, "pictures")]
    assert client.get_experiment(run.info.experiment_id).name == "eval-test"
