"""MLflow tracking: where runs go, an unreachable server reported up front, no duplicate points."""

import time
from pathlib import Path

import pytest

from gaelle_ray import tracking
from gaelle_ray.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _config(*overrides):
    return load_config(ROOT / "experiments" / "cpu_demo.yaml", list(overrides))


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    c = _config(f"train.run_dir={tmp_path / 'run'}")
    assert tracking.resolve_tracking_uri(c) == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(c) == "http://127.0.0.1:5999"
    c2 = _config("tracking.tracking_uri=sqlite:///x.db")
    assert tracking.resolve_tracking_uri(c2) == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ValueError, match="remote.*tracking.tracking_uri"):
        tracking.resolve_tracking_uri(_config("train.run_dir=s3://bucket/run"))


def test_unreachable_server_is_reported_with_its_uri():
    t0 = time.time()
    with pytest.raises(ValueError, match=r"http://127\.0\.0\.1:9.*not reachable"):
        tracking.check_reachable("http://127.0.0.1:9", timeout_s=3)
    assert time.time() - t0 < 60


def test_run_params_tags_and_no_duplicate_points(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    c = _config()
    run_id = tracking.start_run(uri, "exp", "r1", c.flat(), {"git_commit": "abc"})
    logger = tracking.RunLogger(uri, run_id)
    logger.log_metrics({"loss": 2.0}, step=0)
    logger.log_metrics({"loss": 1.5}, step=1)
    again = tracking.RunLogger(uri, run_id)  # e.g. a restarted worker
    again.log_metrics({"loss": 9.9}, step=1)  # already there: skipped
    again.log_metrics({"loss": 1.0}, step=2)
    assert tracking.metric_history(uri, run_id, "loss") == [(0, 2.0), (1, 1.5), (2, 1.0)]
    from mlflow.tracking import MlflowClient
    run = MlflowClient(uri).get_run(run_id)
    assert len(run.data.params) == len(c.flat())
    assert run.data.tags["git_commit"] == "abc"
    exp = MlflowClient(uri).get_experiment(run.info.experiment_id)
    assert exp.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())


def test_params_go_in_batches(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = _config()
    run_id = tracking.start_run(uri, "exp", "r", {}, {})
    tracking.log_params(uri, run_id, c.flat(), batch=10)
    from mlflow.tracking import MlflowClient
    assert MlflowClient(uri).get_run(run_id).data.params == {k: str(v) for k, v in c.flat().items()}


def test_experiments_are_marked_as_model_training_unless_someone_chose(tmp_path):
    """MLflow 3's UI opens an experiment without `mlflow.experimentKind` on its GenAI traces
    page; every experiment we create or use says it holds model training runs."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = tracking.start_run(uri, "fresh", "r", {}, {})
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made-before")  # e.g. by an older version of this package
    tracking.start_run(uri, "made-before", "r", {}, {})
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    tracking.start_run(uri, "chosen", "r", {}, {})
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"
