"""Linear probe (full, fast, distributed), leakage guard, MLflow logging, semi-supervised."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gaelle_ray.eval.features import EvalTransform, ShardImages, extract_features
from gaelle_ray.eval.leakage import check_overlap, overlap_report
from gaelle_ray.eval.linear import (
    ProbeSettings, cosine_lr, fast_linear_probe, linear_probe, make_classifier, masked_bce, probe_datasets,
    run_linear_eval,
)
from gaelle_ray.eval.semisup import SemisupSettings, label_subset, semisup_finetune
from gaelle_ray.model import build_model
from gaelle_ray.train.checkpoint import checkpoint_name, save_checkpoint


class ForwardCounter:
    """Counts images that go through a module."""

    def __init__(self, module):
        self.calls, self.images = 0, 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.calls += 1
        self.images += inputs[0].shape[0]


# ----------------------------------------------------------------------------- pieces


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


# ----------------------------------------------------------------------------- leakage


def _relabelled_copy(src, dst, id_offset, dataset_name, extra_byte=False):
    """A copy of the shards with image ids shifted by id_offset, another dataset name, and
    (extra_byte) every JPEG's bytes changed by one trailing byte."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["dataset"] = dataset_name
    (dst / "manifest.json").write_text(json.dumps(manifest))
    for shard in manifest["shards"]:
        path = dst / shard["path"]
        table = pq.read_table(path)
        ids = table.column("image_id").to_numpy() + id_offset
        table = table.set_column(table.schema.get_field_index("image_id"), "image_id", pa.array(ids, pa.int64()))
        if extra_byte:
            jpegs = [b + b"\0" for b in table.column("jpeg").to_pylist()]
            table = table.set_column(table.schema.get_field_index("jpeg"), "jpeg", pa.array(jpegs, pa.binary()))
        pq.write_table(table, path)
    return dst


def test_leakage_guard(toy_shards, tmp_path):
    assert check_overlap(toy_shards, toy_shards, "val", False, pretrain_splits=["train"]) == 0
    with pytest.raises(ValueError, match=r"leakage: 16 of the 16 'val' images .* e\.g\. image ids \["):
        check_overlap(toy_shards, toy_shards, "val", False, pretrain_splits=["val"])
    assert check_overlap(toy_shards, toy_shards, "val", True, pretrain_splits=["val"], cache_dir=tmp_path) == 16
    assert list(tmp_path.glob("hashes-*.npz"))  # pretraining hashes cached per shard
    # unknown pretraining split -> every split is checked
    assert overlap_report(toy_shards, toy_shards, "val")["overlap"] == 16
    # same bytes under other ids and another dataset name: found by content only
    other = _relabelled_copy(Path(toy_shards), tmp_path / "other", 100000, "other")
    r = overlap_report(str(other), toy_shards, "val", ["val"])
    assert (r["overlap"], r["by_id"], r["by_content"], r["ids_compared"]) == (16, 0, 16, False)
    with pytest.raises(ValueError, match="16 by JPEG content"):
        check_overlap(str(other), toy_shards, "val", False, pretrain_splits=["val"])
    # other bytes, same ids, same dataset family (like coco2017 vs coco2014): found by id
    recoded = _relabelled_copy(Path(toy_shards), tmp_path / "recoded", 0, "toy2017", extra_byte=True)
    r = overlap_report(str(recoded), toy_shards, "val", ["val"])
    assert (r["overlap"], r["by_id"], r["by_content"], r["ids_compared"]) == (16, 16, 0, True)


# ----------------------------------------------------------------------------- entry point + MLflow


def test_run_linear_eval_guard_and_mlflow(toy_shards, tmp_path, make_config):
    from mlflow.tracking import MlflowClient

    torch.manual_seed(0)
    pre_config = make_config(toy_shards, split="val")  # pretrained on the evaluation images
    run_dir = tmp_path / "run"
    folder = run_dir / "train" / checkpoint_name(0)
    save_checkpoint(folder, {"worker": {"model": build_model(pre_config).state_dict()}},
                    {"epoch": 0, "config": pre_config.to_dict()})
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": "pretrain-run-1"}))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(toy_shards).replace({"tracking.tracking_uri": uri, "tracking.experiment": "eval-test"})

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
    assert run.data.tags["mlflow.parentRunId"] == "pretrain-run-1"
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


# ----------------------------------------------------------------------------- semi-supervised


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


# ----------------------------------------------------------------------------- distributed


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
    assert trained["leakage_check"] == "unknown" and trained["num_test"] == 16
    with pytest.raises(ValueError, match="divisible"):
        linear_probe_distributed(backbone, "resnet18", toy_shards, "train", "val",
                                 ProbeSettings(batch_size=7), num_workers=2)


def test_run_semisup_entry_point(toy_shards, make_config):
    from gaelle_ray.eval.semisup import run_semisup

    config = make_config(toy_shards)
    a = run_semisup("random", 25, None, config, epochs=1, batch_size=4, track=False)
    b = run_semisup("random", 25, None, config, epochs=1, batch_size=4, track=False)
    assert a["subset_size"] == 8 and a["subset_ids_sha1"] == b["subset_ids_sha1"]
    assert a["map_final"] == pytest.approx(b["map_final"])  # seeded: same run twice
    assert a["mode"] == "semisup" and a["percent"] == 25 and a["leakage_check"] == "unknown"
    c = run_semisup("random", 25, None, config, epochs=1, batch_size=4, seed=1, track=False)
    assert c["subset_ids_sha1"] != a["subset_ids_sha1"]
