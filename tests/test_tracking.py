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


def test_the_ui_link_opens_the_runs_table_with_the_map_columns(tmp_path):
    """MLflow 3.17's UI picks GenAI or model training from its own switch (the URL's
    workflowType), not from the kind tag; the link we print sets it and names our shared
    view, stored as the experiment tag the UI reads (its "Share" format)."""
    import json

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "r", {}, {})
    exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    view = json.loads(MlflowClient(uri).get_experiment(exp_id).tags["mlflow.sharedViewState.gaelle"])
    assert view["orderByKey"] == "metrics.`map_final`" and view["orderByAsc"] is False
    assert {"metrics.`map_final`", "metrics.`linear_fast_map_toy`", "metrics.`epoch_online_map`"} <= set(
        view["selectedColumns"])
    hint = tracking.ui_hint(uri, run_id)
    assert f"mlflow ui --backend-store-uri {uri}" in hint
    assert (f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
            "&viewStateShareKey=gaelle") in hint


# ----------------------------------------------------------------------------- system metrics


def _system_points(uri, run_id, key="system/cpu_utilization_percentage"):
    return tracking.metric_history(uri, run_id, key)


def _wait_for(predicate, timeout_s=60.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return predicate()


def test_system_metrics_stop_with_the_thread_that_started_them(tmp_path, capfd):
    """What rank 0's training thread does (open_run_logger): system metrics into the run
    until that thread ends. The interval is far longer than the section, so the only point
    is the one written when the thread's end stops the monitor; quietly, no INFO lines."""
    import threading

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "r", {}, {})
    logger = tracking.RunLogger(uri, run_id)
    started = []

    def training_thread():
        started.append(logger.monitor_system(600))
        sum(i * i for i in range(200_000))  # a little work

    t = threading.Thread(target=training_thread, name="TrainingThread(test)")
    t.start()
    t.join()
    assert started[0] is not None and started[0].interval_s == 600
    assert _wait_for(lambda: len(_system_points(uri, run_id)) == 1), "no system metrics after the thread ended"
    keys = set(tracking._client(uri).get_run(run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= keys
    assert _wait_for(lambda: not any(th.name == "SystemMetricsMonitor" for th in threading.enumerate()), 30)
    # a restarted worker (or a resumed run) continues the steps
    again = tracking.RunLogger(uri, run_id)
    again.monitor_system(600, until_caller_ends=False)
    again.close()
    again.close()  # idempotent
    assert [s for s, _ in _system_points(uri, run_id)] == [0, 1]
    out, err = capfd.readouterr()
    assert "monitoring system metrics" not in out + err and "Skip logging GPU" not in out + err


def test_system_metrics_sample_every_interval(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "r", {}, {})
    logger = tracking.RunLogger(uri, run_id)
    logger.monitor_system(0.2, until_caller_ends=False)
    try:
        assert _wait_for(lambda: len(_system_points(uri, run_id)) >= 2), "the monitor wrote no points by itself"
    finally:
        logger.close()
    steps = [s for s, _ in _system_points(uri, run_id)]
    assert steps == list(range(len(steps)))
    assert all(0 <= v <= 100 for _, v in _system_points(uri, run_id, "system/system_memory_usage_percentage"))
