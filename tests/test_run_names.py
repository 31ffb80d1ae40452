"""MLflow run names that tell runs apart, and the backbone logged as an MLflow PyTorch model,
against real sqlite stores (no Ray: the pretraining driver's Ray steps are stubbed)."""

import json
from pathlib import Path

import pytest
import torch

from gaelle_ray import tracking
from gaelle_ray.config import load_config
from gaelle_ray.eval.report import eval_run_name

ROOT = Path(__file__).resolve().parents[1]
CPU_DEMO = ROOT / "experiments" / "cpu_demo.yaml"


# ----------------------------------------------------------------------------- names


def test_override_summary_keeps_what_changes_the_run():
    overrides = ["data.shards=/data/toy/shards", "train.run_dir=/runs/x", "optim.base_lr=0.3",
                 "tracking.experiment=e", "eval.data=s3://b/shards", "train.num_workers=2",
                 "augmentation.min_scale_crops=[0.3, 0.1]", "ray.address=auto", "optim.base_lr=0.25"]
    assert tracking.describe_overrides(overrides) == (
        "optim.base_lr=0.25 train.num_workers=2 augmentation.min_scale_crops=[0.3,0.1]")
    assert tracking.describe_overrides({"optim.base_lr": 0.123456789, "train.use_gpu": True}) == (
        "optim.base_lr=0.1235 train.use_gpu=true")


def test_pretraining_run_names(tmp_path):
    overrides = [f"data.shards={tmp_path / 'shards'}", f"train.run_dir={tmp_path / 'run'}", "optim.base_lr=0.3"]
    config = load_config(CPU_DEMO, overrides)
    assert tracking.pretrain_run_name(config, CPU_DEMO, overrides) == "cpu_demo optim.base_lr=0.3"
    assert tracking.pretrain_run_name(config, str(CPU_DEMO)) == "cpu_demo"
    assert tracking.pretrain_run_name(config) == "run"  # no file known: the run directory's name
    named = load_config(CPU_DEMO, [*overrides, "tracking.run_name=my baseline"])
    assert tracking.pretrain_run_name(named, CPU_DEMO, overrides) == "my baseline"
    many = [f"loss.epsilon=0.0{i}" for i in range(1, 4)] + ["optim.final_lr=0.0001", "optim.warmup_epochs=3",
                                                          "queue.queue_length=3840", "train.epochs=100"]
    name = tracking.pretrain_run_name(config, CPU_DEMO, many)
    assert len(name) <= tracking.MAX_RUN_NAME and name.startswith("cpu_demo loss.epsilon=0.03 optim.final_lr")
    assert name.endswith("...")


def test_sweep_trial_names():
    from gaelle_ray.tune import trial_run_name

    assert trial_run_name({"optim.base_lr": 0.31234567, "queue.queue_length": 1920}, "4f2e1_00003") == (
        "optim.base_lr=0.3123 queue.queue_length=1920 #3")
    long = trial_run_name({f"augmentation.min_scale_crops_{i}": [0.3, 0.1] for i in range(5)}, "a_00012")
    assert len(long) <= tracking.MAX_RUN_NAME and long.endswith("... #12")


def test_evaluation_names_say_what_was_evaluated(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = load_config(CPU_DEMO, [f"tracking.tracking_uri={uri}"])
    pretrain_run = tracking.start_run(uri, "gaelle", "cpu_demo optim.base_lr=0.3", {}, {})
    folder = "/somewhere/demo/run/train/epoch_00019"
    info = {"kind": "folder", "arch": "resnet18", "epoch": 19}
    assert eval_run_name("linear-eval fast toy", folder, info, config, pretrain_run) == (
        "linear-eval fast toy: cpu_demo optim.base_lr=0.3/epoch_00019")
    # the store does not know the run (or none given): the run directory names it
    assert eval_run_name("linear-eval fast toy", folder, info, config, "0" * 32) == (
        "linear-eval fast toy: run/epoch_00019")
    assert eval_run_name("linear-eval toy", "s3://b/exp7/train/epoch_00003/", {**info, "epoch": 3}) == (
        "linear-eval toy: exp7/epoch_00003")
    random = eval_run_name("linear-eval fast toy", "random", {"kind": "random", "arch": "resnet18", "epoch": None},
                           config, pretrain_run)
    assert random == "linear-eval fast toy: random init resnet18"
    assert eval_run_name("semisup 10% coco", "/x/backbone_resnet50.pth",
                         {"kind": "torchvision", "arch": "resnet50", "epoch": None}) == (
        "semisup 10% coco: backbone_resnet50.pth")
    long_run = tracking.start_run(uri, "gaelle", "coco2017_400ep " + "optim.base_lr=0.3 " * 5, {}, {})
    name = eval_run_name("linear-eval coco", "/r/train/epoch_00399", {**info, "epoch": 399}, config, long_run)
    assert len(name) <= tracking.MAX_RUN_NAME and name.startswith("linear-eval coco: coco2017_400ep")
    assert name.endswith(".../epoch_00399")


class _FitCalled(Exception):
    pass


def test_pretrain_names_a_new_run_and_a_resumed_run_keeps_it(tmp_path, monkeypatch):
    """pretrain() with its Ray steps stubbed: the MLflow run it creates, then --resume."""
    from gaelle_ray.train import trainer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name in ("init_ray", "check_cpu_budget", "check_online_data", "check_init_from", "check_pretrain_inputs"):
        monkeypatch.setattr(trainer, name, lambda *a, **k: None, raising=False)
    monkeypatch.setattr(trainer, "wait_for_cpus", lambda *a, **k: 64)
    seen = []

    class Trainer:
        def fit(self):
            raise _FitCalled

    def build_trainer(config, tracking_uri="", run_id="", callbacks=()):
        seen.append((tracking_uri, run_id))
        return Trainer()

    monkeypatch.setattr(trainer, "build_trainer", build_trainer)
    overrides = [f"data.shards={tmp_path / 'shards'}", f"train.run_dir={tmp_path / 'run'}", "optim.base_lr=0.3",
                 "train.num_workers=2"]
    with pytest.raises(_FitCalled):
        trainer.pretrain(load_config(CPU_DEMO, overrides), config_file=CPU_DEMO, overrides=overrides)
    uri, run_id = seen[0]
    saved = json.loads((tmp_path / "run" / "mlflow_run.json").read_text())["run_id"]
    assert run_id == saved
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "cpu_demo optim.base_lr=0.3 train.num_workers=2"
    assert run.data.tags["mlflow.runName"] == run.info.run_name
    assert run.data.tags["config_file"] == str(CPU_DEMO)
    # resumed with other overrides: the same run, its name unchanged
    more = [*overrides, "optim.base_lr=0.5"]
    with pytest.raises(_FitCalled):
        trainer.pretrain(load_config(CPU_DEMO, more), resume=True, config_file=CPU_DEMO, overrides=more)
    assert seen[1] == (uri, run_id)
    runs = client.search_runs([run.info.experiment_id])
    assert [r.info.run_name for r in runs] == ["cpu_demo optim.base_lr=0.3 train.num_workers=2"]


# ----------------------------------------------------------------------------- the backbone as a model


def test_backbone_logged_as_mlflow_pytorch_model(tmp_path, monkeypatch):
    import mlflow
    import torchvision
    from mlflow.tracking import MlflowClient

    from gaelle_ray.model import build_model
    from gaelle_ray.model.weights import export_backbone
    from gaelle_ray.train.trainer import BACKBONE_MODEL, log_backbone_model

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # must be neither used nor lost
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    run_id = tracking.start_run(uri, "gaelle", "cpu_demo", {"model.arch": "resnet18"}, {})
    tracking.RunLogger(uri, run_id).log_metrics({"epoch_loss": 3.5}, step=1)
    torch.manual_seed(0)
    model = build_model(load_config(CPU_DEMO))
    exported = export_backbone(model)

    model_uri = log_backbone_model("resnet18", exported, uri, run_id, epoch=1)
    assert model_uri and model_uri.startswith("models:/")
    import os
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"

    loaded = tracking.load_torch_model(uri, model_uri)
    assert isinstance(loaded, torchvision.models.ResNet)
    state = loaded.state_dict()
    expected = {k: v for k, v in exported.items() if not k.startswith("fc.")}  # fc = Identity: features out
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():
        assert loaded.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 512)

    client = MlflowClient(uri)
    logged = client.get_logged_model(model_uri.removeprefix("models:/"))
    run = client.get_run(run_id)
    assert logged.name == BACKBONE_MODEL and logged.source_run_id == run_id and logged.status.name == "READY"
    assert logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    assert [o.model_id for o in run.outputs.model_outputs] == [logged.model_id]
    assert {(m.key, m.step) for m in logged.metrics} == {("epoch_loss", 1)}  # the run's metrics at that epoch
    requirements = (Path(logged.artifact_location.removeprefix("file://")) / "requirements.txt").read_text()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements and "torchvision==" in requirements
    with tracking._global_tracking_uri(uri):
        version = mlflow.register_model(model_uri, "gaelle-backbone")
    assert str(version.version) == "1" and os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:9"
    # the file artifact's path is not touched by this: logging a model adds no run artifact
    assert not client.list_artifacts(run_id)
