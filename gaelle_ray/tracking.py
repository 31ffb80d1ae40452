"""The one module that talks to MLflow.

Where runs go: `tracking.tracking_uri` from the config, else MLFLOW_TRACKING_URI, else a
sqlite store in the run directory (`sqlite:///<run_dir>/mlflow.db`). The driver creates the
run (params = the whole flattened config, tags = versions and git commit) and checks the
store is reachable before any training starts; rank 0 of the training workers writes the
metrics and artifacts (`RunLogger`), and no other rank touches MLflow.

Metric history is kept free of gaps and duplicates across restarts: `RunLogger` skips
points at steps the run already holds for that key (after a restore the crashed attempt's
points stay, the rerun's are not written twice), and the loop re-logs from the checkpoint
any epoch that was checkpointed but never reached MLflow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping

from gaelle_ray import storage

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for one log_batch call


def resolve_tracking_uri(config) -> str:
    """The tracking URI for a config (see the module docstring)."""
    if config.tracking.tracking_uri:
        return config.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    run_dir = config.train.run_dir
    if storage.is_remote(run_dir):
        raise ValueError(f"train.run_dir = {run_dir!r} is remote, so the default sqlite store cannot live there: "
                         "set tracking.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server")
    return f"sqlite:///{Path(storage.normalise(run_dir)) / 'mlflow.db'}"


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail early, naming the URI, when the tracking store cannot be used."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:  # the client raises many kinds (connection, sqlalchemy, auth)
        raise ValueError(f"MLflow tracking store {uri!r} is not reachable: {type(exc).__name__}: {exc}") from None
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version_tags() -> dict[str, str]:
    import ray
    import torch

    return {"git_commit": git_commit(), "torch_version": torch.__version__, "ray_version": ray.__version__}


def artifact_root(uri: str) -> str | None:
    """Artifacts of a sqlite store live beside it (run_dir/mlartifacts), not in the cwd."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's "machine learning" kind (the other: genai_development)


def start_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
    """Create a run with its params and tags; returns the run id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root(uri))
    if exp is None or EXPERIMENT_KIND not in exp.tags:  # a kind someone set by hand is kept
        # MLflow 3's UI opens an experiment without this tag on its GenAI traces page
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND, MODEL_TRAINING)
    all_tags = dict(tags)
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def log_params(uri: str, run_id: str, params: Mapping[str, Any], batch: int = MAX_PARAMS_PER_BATCH) -> None:
    """All params, in batches of at most `batch` (MLflow's limit per call)."""
    from mlflow.entities import Param

    items = [Param(k, str(v)) for k, v in params.items()]
    client = _client(uri)
    for i in range(0, len(items), batch):
        client.log_batch(run_id, params=items[i:i + batch])


def set_tags(uri: str, run_id: str, tags: Mapping[str, Any]) -> None:
    client = _client(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """[(step, value), ...] of one metric, in step order."""
    return sorted((m.step, m.value) for m in _client(uri).get_metric_history(run_id, key))


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, str(path), artifact_path)


class RunLogger:
    """Metric writer for rank 0: batches points and never writes a (key, step) twice."""

    def __init__(self, uri: str, run_id: str):
        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
        self._seen: dict[str, set[int]] = {}

    def _steps(self, key: str) -> set[int]:
        if key not in self._seen:
            self._seen[key] = {m.step for m in self.client.get_metric_history(self.run_id, key)}
        return self._seen[key]

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = []
        for key, value in metrics.items():
            steps = self._steps(key)
            if step in steps or value is None:
                continue
            steps.add(step)
            points.append(Metric(key, float(value), now, step))
        if points:
            self.client.log_batch(self.run_id, metrics=points)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)
