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

Run names tell runs apart (`pretrain_run_name`, `describe_overrides`): a pretraining run is
named after its config file and the overrides that matter (`cpu_demo optim.base_lr=0.3`),
an evaluation after what it evaluates (see gaelle_ray.eval.report.eval_run_name). Rank 0
also records MLflow's system metrics (`system/...`: CPU, memory, disk, network, GPUs when
nvidia-ml-py is installed) into the pretraining run (`SystemMetrics`), and the driver logs
the exported backbone as an MLflow PyTorch model (`log_torch_model`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

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


# The runs table as we want it opened: a view the UI loads from an experiment tag named
# mlflow.sharedViewState.<key> when the URL says ?viewStateShareKey=<key> (what its "Share"
# button writes): the downstream mAPs and the online mAP as columns, best mAP first.
RUNS_VIEW = "gaelle"
VIEW_METRICS = ("map_final", "linear_fast_map_toy", "linear_fast_map_coco", "linear_full_map_coco",
                "linear_full_map_voc", "epoch_online_map", "epoch_loss")


def runs_view_state() -> dict[str, Any]:
    """The UI state of our runs view (MLflow 3.17's shared-view format: search facets and
    ui state; a column key is the word metrics, a dot and the name in backquotes)."""
    return {"orderByKey": "metrics.`map_final`", "orderByAsc": False,
            "selectedColumns": [f"metrics.`{m}`" for m in VIEW_METRICS]}


def mark_experiment(uri: str, experiment_id: str) -> None:
    """Tag an experiment so the UI shows it as model training, with our runs view.

    A kind someone set by hand is kept. The kind tag alone does not choose the page MLflow
    3.17's UI opens (its GenAI/model-training switch does; `ui_url` sets it in the URL)."""
    client = _client(uri)
    tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
    view = json.dumps(runs_view_state(), sort_keys=True)
    if tags.get(f"mlflow.sharedViewState.{RUNS_VIEW}") != view:
        client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{RUNS_VIEW}", view)


def ui_url(server: str, experiment_id: str) -> str:
    """The address of an experiment's runs table in the MLflow UI at `server` (e.g.
    http://127.0.0.1:5000): the model-training view (not the GenAI overview) with our
    columns."""
    return (f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?workflowType=machine_learning&viewStateShareKey={RUNS_VIEW}")


def ui_hint(uri: str, run_id: str, server: str = "http://127.0.0.1:5000") -> str:
    """How to look at a run: the `mlflow ui` command for a sqlite store, then the page."""
    experiment_id = _client(uri).get_run(run_id).info.experiment_id
    command = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:///") else None
    page = ui_url(server if command else uri, experiment_id)
    return f"open the MLflow UI with: {command}\n  then: {page}" if command else f"MLflow UI: {page}"


def start_run(uri: str, experiment: str, run_name: str, params: Mapping[str, Any],
              tags: Mapping[str, str], parent_run_id: str | None = None) -> str:
    """Create a run with its params and tags; returns the run id."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_root(uri))
    mark_experiment(uri, exp_id)
    all_tags = dict(tags)
    if run_name:
        all_tags["mlflow.runName"] = run_name
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, tags=all_tags)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


# ----------------------------------------------------------------------------- run names

MAX_RUN_NAME = 80
# overrides that say where things live, not what the run does: left out of run names
WHERE_KEYS = ("data.shards", "eval.data", "eval.online_data", "train.run_dir", "ray.storage_path", "ray.address")


def shorten(text: str, limit: int = MAX_RUN_NAME) -> str:
    """`text` cut to at most `limit` characters, "..." marking a cut."""
    return text if len(text) <= limit else text[:max(limit - 3, 1)].rstrip() + "..."


def fit_name(prefix: str, head: str, tail: str = "", limit: int = MAX_RUN_NAME) -> str:
    """prefix + head + tail in at most `limit` characters, cutting `head` (e.g. a long run
    name) before anything else."""
    room = limit - len(prefix) - len(tail)
    if len(head) > room:
        head = shorten(head, max(room, 12))
    return shorten(prefix + head + tail, limit)


def format_value(value: Any) -> str:
    """A config value as short text: 0.3, 1.234e-05, [0.3,0.1], true; a path as its last part."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if value is None:
        return "null"
    text = str(value)
    if "/" in text.rstrip("/"):
        text = PurePosixPath(text.rstrip("/").split("://", 1)[-1]).name
    return text


def describe_overrides(overrides: Iterable[str] | Mapping[str, Any]) -> str:
    """The overrides that change what a run does, as `key=value` words: `--set` strings
    ("optim.base_lr=0.3") or a {key: value} mapping (a sweep trial's params). Where things
    live (WHERE_KEYS, tracking.*) is left out; a key set twice shows its last value."""
    if isinstance(overrides, Mapping):
        items = list(overrides.items())
    else:
        from gaelle_ray.config import parse_override

        items = [parse_override(item) for item in overrides]
    values: dict[str, Any] = {}
    for key, value in items:
        values[key] = value
    return " ".join(f"{key}={format_value(value)}" for key, value in values.items()
                    if key not in WHERE_KEYS and not key.startswith("tracking."))


def pretrain_run_name(config, config_file: str | os.PathLike | None = None,
                      overrides: Iterable[str] | Mapping[str, Any] = ()) -> str:
    """The name of a new pretraining run: `tracking.run_name` when set, else the config
    file's name and the overrides that matter (`cpu_demo optim.base_lr=0.3`), else (no file
    known) the run directory's name. At most MAX_RUN_NAME characters."""
    if config.tracking.run_name:
        return config.tracking.run_name
    if not config_file:
        return PurePosixPath(str(config.train.run_dir).rstrip("/")).name or "pretrain"
    stem = Path(config_file).stem
    return shorten(f"{stem} {describe_overrides(overrides)}".strip())


def run_name(uri: str, run_id: str) -> str | None:
    """The name of run `run_id`, or None when the store does not know it."""
    try:
        return _client(uri).get_run(run_id).info.run_name or None
    except Exception:  # unknown id, another store: the caller falls back to the path
        return None


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


# ----------------------------------------------------------------------------- rank 0's logger

CALL_TIMEOUT_S = 5.0  # the longest one log call waits for the store before training goes on without it
CLOSE_TIMEOUT_S = 30.0  # the longest close() waits for the store to take what is left
RETRY_FIRST_S, RETRY_MAX_S = 2.0, 60.0  # pause before the next try while the store is down, doubling
MAX_PENDING_POINTS = 50_000  # points kept in memory while the store is down; older ones go to the unsent file
MAX_STUCK_REQUESTS = 8  # requests left waiting on a store that does not answer, before tries stop until one ends
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call
UNSENT_FILE = "unsent.jsonl"
SENDER_THREAD = "RunLoggerSend"


def default_unsent_dir(uri: str) -> Path:
    """Where a RunLogger of store `uri` keeps what it could not send (a folder per run):
    beside a sqlite store (the run directory), else ~/.cache/gaelle_ray/mlflow_unsent."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).parent / "mlflow_unsent"
    return Path.home() / ".cache" / "gaelle_ray" / "mlflow_unsent"


def _refused(exc: BaseException) -> bool:
    """The store answered and refused (a bad value, a deleted run): sending again won't help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return exc.error_code == "INVALID_STATE" or (400 <= status < 500 and status not in (408, 429))


class _NotFromSender(logging.Filter):
    """urllib3 warns at each retry of a request ("Retrying (Retry(total=6...))"): from
    RunLogger's sender threads, whose outage RunLogger reports once, those lines are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.threadName.startswith(SENDER_THREAD)


def _quiet_sender_retries() -> None:
    logger = logging.getLogger("urllib3.connectionpool")
    if not any(isinstance(f, _NotFromSender) for f in logger.filters):
        logger.addFilter(_NotFromSender())


def _metric_record(m) -> dict:
    return {"metric": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}


class _Artifact:
    """An artifact waiting to be sent: the caller's file, and our copy of it once the caller
    may have deleted it (it was not sent before log_artifact returned)."""

    def __init__(self, path: str, artifact_path: str | None, copy: str | None = None):
        self.path, self.artifact_path, self.copy, self.sent = path, artifact_path, copy, False

    def record(self) -> dict:
        return {"artifact": self.copy or self.path, "artifact_path": self.artifact_path, "copy": bool(self.copy)}


class _Sender:
    """One sender thread: the job it is on and since when its current request runs. A
    sender whose request hangs is given up (`stuck`): its job goes back to be sent again
    and whatever it does after that changes nothing."""

    def __init__(self) -> None:
        self.job: tuple[str, Any] | None = None
        self.since: float | None = None
        self.stuck = False


class RunLogger:
    """Metric writer for rank 0: batches points, never writes a (key, step) twice, and lets
    training go on through an outage of the tracking store.

    Writes go to the store from a sender thread; a log call waits for it about
    `call_timeout_s` (CALL_TIMEOUT_S) at most (twice that for a backlog of slow answers).
    When the store fails, or a request gets no answer in call_timeout_s,
    one warning says so (one per outage) and log calls stop waiting: points, tags and
    artifacts are kept, in memory (at most MAX_PENDING_POINTS points; older ones beyond that
    go to the unsent file), and sent, in order, by a log call once a pause has passed
    (RETRY_FIRST_S doubling up to RETRY_MAX_S), or by flush()/close(), which try every
    second. MLflow retries a request itself (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7,
    backoff up to 120 s: ~4 minutes; read from the environment at every request, it cannot
    be set per client): a request still hanging after call_timeout_s is given up (its thread
    runs on, at most MAX_STUCK_REQUESTS of them) and its job sent again by a new one. Points
    the store refuses outright (a bad value, a deleted run) are dropped with a warning.

    close() sends what is left, waiting at most CLOSE_TIMEOUT_S; what still cannot be sent
    is written to <unsent_dir>/<run_id>/unsent.jsonl (artifacts copied beside it), with one
    warning, and the next RunLogger of that run (a resumed run) sends it. A logger never
    closed writes that file at interpreter exit when it holds anything unsent.

    No duplicates: before sending points of a key the logger reads the run's history of that
    key from the store, and reads it again after a failed or given-up send (which may have
    reached the store), dropping the steps the store already holds. A given-up request that
    lands after that re-read sends the very points (same timestamp) the new one sends, which
    a SQL-backed store (sqlite, PostgreSQL, MySQL; an `mlflow server` on one) stores once."""

    def __init__(self, uri: str, run_id: str, *, unsent_dir: str | Path | None = None,
                 call_timeout_s: float = CALL_TIMEOUT_S, max_pending_points: int = MAX_PENDING_POINTS):
        import collections

        self.uri = uri
        self.run_id = run_id
        self.client = _client(uri)
        self.system_metrics: SystemMetrics | None = None
        self.call_timeout_s = call_timeout_s
        self.max_pending_points = max_pending_points
        self.unsent_path = Path(unsent_dir or default_unsent_dir(uri)) / run_id / UNSENT_FILE
        self._cond = threading.Condition()
        self._metrics: collections.deque = collections.deque()  # Metric, waiting to be sent
        self._tags: dict[str, str] = {}
        self._artifacts: list[_Artifact] = []
        self._taken: dict[str, set[int]] = {}  # steps this logger holds or sent, per key
        self._stored: dict[str, set[int]] = {}  # steps the store holds, per key (absent: read it first)
        self._sender: _Sender | None = None  # the sender at work
        self._stuck: list[_Sender] = []  # given-up senders whose thread still runs
        self._down = False  # in an outage (warned)
        self._failures = 0
        self._next_try = 0.0
        self._last_end = 0.0
        self._last_error = ""
        self._file_loaded = False  # the unsent file's records are in memory...
        self._file_has_more = False  # ...but for points spilled to it since
        self._closed = False
        self._at_exit = False
        _quiet_sender_retries()
        with self._cond:
            self._load_unsent()

    # ------------------------------------------------------------------ what callers use

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._cond:
            for key, value in metrics.items():
                taken = self._taken.setdefault(key, set())
                if value is None or step in taken or step in self._stored.get(key, ()):
                    continue
                taken.add(step)
                self._metrics.append(Metric(key, float(value), now, int(step)))
            self._spill_overflow()
            self._push()

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        with self._cond:
            self._tags.update({k: str(v) for k, v in tags.items()})
            self._push()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file; when it is not in the store by the time this returns, a copy is kept
        (the caller may delete the file) and sent later."""
        job = _Artifact(str(path), artifact_path)
        with self._cond:
            self._artifacts.append(job)
            self._push()
            if not job.sent:
                job.copy = self._keep_copy(job.path)

    def flush(self, timeout_s: float = CLOSE_TIMEOUT_S) -> int:
        """Send everything kept (the unsent file's records too), waiting at most `timeout_s`
        (a try a second at most while the store is down); returns how many points, tags and
        artifacts are still unsent."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._load_unsent()
            while self._pending() or self._sender is not None:
                now = time.monotonic()
                if now >= deadline:
                    break
                self._give_up_hanging(now)
                if self._sender is None:
                    pause = max(min(self._next_try, self._last_end + 1.0) - now, 0.0) if self._down else 0.0
                    if pause > 0 or len(self._stuck) >= MAX_STUCK_REQUESTS:
                        self._cond.wait(min(pause or 1.0, deadline - now))
                        continue
                    self._start_sender()
                self._cond.wait(max(min(self._wake_time(now), deadline) - now, 0.01))
            return sum(self._counts())

    def monitor_system(self, interval_s: float | None = None, *, until_caller_ends: bool = True) -> "SystemMetrics | None":
        """Start recording system metrics into this run (see SystemMetrics). With
        until_caller_ends, they stop by themselves when the calling thread ends: in a Ray
        Train worker that is the training thread, so the end (or crash) of the training loop
        stops them. None (and a warning) when they cannot be recorded; training goes on."""
        until = threading.current_thread() if until_caller_ends else None
        try:
            self.system_metrics = SystemMetrics(self.uri, self.run_id, interval_s).start(until=until)
        except Exception as exc:  # psutil missing, store hiccup: not worth stopping a run for
            log.warning("system metrics are not recorded for run %s: %s: %s", self.run_id, type(exc).__name__, exc)
            self.system_metrics = None
        return self.system_metrics

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop the system metrics, send what is kept (waiting at most about `timeout_s` in
        all), and write what could not be sent to the unsent file, with a warning saying how
        much and where. Idempotent; never raises for the store."""
        deadline = time.monotonic() + timeout_s
        if self.system_metrics is not None:  # its last points may wait on a store that is down
            stopper = threading.Thread(target=self.system_metrics.stop, daemon=True, name="SystemMetricsStop")
            stopper.start()
            stopper.join(min(10.0, timeout_s / 2))
        with self._cond:
            if self._closed and not self._pending():
                return
        unsent = self.flush(max(deadline - time.monotonic(), 0.0))
        with self._cond:
            self._closed = True
            if self._at_exit:
                import atexit

                atexit.unregister(self._write_at_exit)
                self._at_exit = False
            if not unsent:
                return
            counts = self._counts()
            try:
                self._write_unsent()
                where = f"they are kept in {self.unsent_path} (the next RunLogger of this run sends them)"
            except OSError as exc:
                where = f"they are lost: they could not be written to {self.unsent_path} ({exc})"
        log.warning("MLflow store %s still does not take run %s (%s): %d points, %d tags and %d artifacts were "
                    "not sent; %s", self.uri, self.run_id, self._last_error or "no answer", *counts, where)

    # ------------------------------------------------------------------ the callers' side (holding _cond)

    def _pending(self) -> bool:
        return bool(self._metrics or self._tags or self._artifacts)

    def _counts(self) -> tuple[int, int, int]:
        """(points, tags, artifacts) not known to be in the store: kept, or in a request."""
        points, tags, artifacts = len(self._metrics), len(self._tags), len(self._artifacts)
        if self._sender is not None and self._sender.job is not None:
            kind, job = self._sender.job
            points += len(job) if kind == "metrics" else 0
            tags += len(job) if kind == "tags" else 0
            artifacts += kind == "artifact"
        return points, tags, artifacts

    def _push(self) -> None:
        """Start a sender when there is something to send (while the store is down: once the
        pause has passed) and, unless the store is down, wait for it: until it is done, or
        its request has run call_timeout_s (then it is given up, and the outage starts), or
        2 * call_timeout_s have passed (a backlog of slow answers)."""
        now = time.monotonic()
        self._give_up_hanging(now)
        if (self._sender is None and self._pending() and len(self._stuck) < MAX_STUCK_REQUESTS
                and (not self._down or now >= self._next_try)):
            self._start_sender()
        limit = now + 2 * self.call_timeout_s  # a backlog of slow answers holds a call at most this long
        while self._sender is not None and not self._down and now < limit:
            self._cond.wait(max(min(self._wake_time(now), limit) - now, 0.01))
            now = time.monotonic()
            self._give_up_hanging(now)

    def _wake_time(self, now: float) -> float:
        """When the sender's request, if it is still running then, is to be given up (a
        tenth of a second on, between its requests)."""
        since = self._sender.since if self._sender is not None else None
        return now + 0.1 if since is None else since + self.call_timeout_s

    def _give_up_hanging(self, now: float) -> None:
        """A request of the sender at work running call_timeout_s or longer: an outage; the
        sender is given up and its job goes back, to be sent again."""
        sender = self._sender
        if sender is None or sender.since is None or now - sender.since < self.call_timeout_s:
            return
        sender.stuck = True
        if sender.job is not None:
            self._give_back(*sender.job)
            sender.job = None
        self._stuck.append(sender)
        self._sender = None
        self._failed(f"no answer in {self.call_timeout_s:g} s")

    def _failed(self, reason: str) -> None:
        self._failures += 1
        self._next_try = time.monotonic() + min(RETRY_FIRST_S * 2 ** (self._failures - 1), RETRY_MAX_S)
        self._last_error = reason
        if self._down:
            return
        self._down = True
        if not self._at_exit:
            import atexit

            atexit.register(self._write_at_exit)
            self._at_exit = True
        log.warning("MLflow store %s does not take run %s's points (%s): training goes on; points, tags and "
                    "artifacts are kept (up to %d points in memory, older ones in %s) and sent when it answers "
                    "again", self.uri, self.run_id, reason, self.max_pending_points, self.unsent_path)

    def _spill_overflow(self) -> None:
        """Beyond max_pending_points kept points, the oldest go to the unsent file."""
        over = len(self._metrics) - self.max_pending_points
        if over <= 0:
            return
        spilled = [self._metrics.popleft() for _ in range(over)]
        try:
            self._append_unsent([_metric_record(m) for m in spilled])
            self._file_has_more = True
        except OSError as exc:
            log.warning("MLflow store %s is down and %d points of run %s could not be kept in %s (%s): they are "
                        "lost", self.uri, len(spilled), self.run_id, self.unsent_path, exc)

    def _keep_copy(self, path: str) -> str | None:
        """A copy of an artifact the caller may delete before it is sent."""
        import shutil

        folder = self.unsent_path.parent / "artifacts" / str(time.time_ns())
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return str(shutil.copy2(path, folder / Path(path).name))
        except OSError as exc:
            log.warning("artifact %s of run %s is not in MLflow yet and could not be copied to %s (%s): it is sent "
                        "only if the file is still there", path, self.run_id, folder, exc)
            return None

    # ------------------------------------------------------------------ the unsent file (holding _cond)

    def _append_unsent(self, records: list[dict]) -> None:
        self.unsent_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.unsent_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)

    def _load_unsent(self) -> None:
        """Take into memory what the unsent file holds (an earlier logger's, or points this
        one spilled), leaving the file in place until it is all sent (see _drain)."""
        from mlflow.entities import Metric

        if not self.unsent_path.is_file():
            return
        try:
            lines = self.unsent_path.read_text().splitlines()
        except OSError as exc:
            log.warning("the unsent MLflow records of run %s in %s cannot be read: %s", self.run_id,
                        self.unsent_path, exc)
            return
        kept = {a.copy or a.path for a in self._artifacts}
        for line in lines:
            try:
                r = json.loads(line)
                if "metric" in r:
                    taken, step = self._taken.setdefault(r["metric"], set()), int(r["step"])
                    if step not in taken:
                        taken.add(step)
                        self._metrics.append(Metric(r["metric"], float(r["value"]), int(r["timestamp"]), step))
                elif "tag" in r:
                    self._tags.setdefault(r["tag"], str(r["value"]))
                elif "artifact" in r and r["artifact"] not in kept:
                    if r.get("copy") and not Path(r["artifact"]).is_file():
                        continue  # sent: a copy goes once it is
                    kept.add(r["artifact"])
                    self._artifacts.append(_Artifact(r["artifact"], r.get("artifact_path"),
                                                     copy=r["artifact"] if r.get("copy") else None))
            except (ValueError, KeyError, TypeError):  # a line cut by a crash while writing
                log.warning("run %s: a bad line in %s is skipped: %.80s", self.run_id, self.unsent_path, line)
        self._file_loaded, self._file_has_more = True, False

    def _write_unsent(self) -> None:
        """Everything not known to be in the store, and only that, into the unsent file;
        what is kept in memory moves there (a later flush takes it back)."""
        self._load_unsent()
        records = [_metric_record(m) for m in self._metrics]
        records += [{"tag": k, "value": v} for k, v in self._tags.items()]
        records += [a.record() for a in self._artifacts if not a.sent]
        if self._sender is not None and self._sender.job is not None:  # in the store or not: the reader checks
            kind, job = self._sender.job
            if kind == "metrics":
                records += [_metric_record(m) for m in job]
            elif kind == "tags":
                records += [{"tag": k, "value": v} for k, v in job.items() if k not in self._tags]
            else:
                records.append(job.record())
        self.unsent_path.unlink(missing_ok=True)
        if records:
            self._append_unsent(records)
        for m in self._metrics:
            self._taken[m.key].discard(m.step)
        self._metrics.clear()
        self._tags.clear()
        self._artifacts.clear()
        self._file_loaded = False

    def _write_at_exit(self) -> None:
        with self._cond:
            counts = self._counts()
            if not sum(counts) and not self._file_has_more:
                return
            try:
                self._write_unsent()
            except OSError:
                return
        log.warning("MLflow store %s did not take %d points, %d tags and %d artifacts of run %s: they are kept in %s",
                    self.uri, *counts, self.run_id, self.unsent_path)

    # ------------------------------------------------------------------ the sender threads

    def _start_sender(self) -> None:
        self._sender = _Sender()
        threading.Thread(target=self._drain, args=(self._sender,), daemon=True, name=SENDER_THREAD).start()

    def _next_job(self) -> tuple[str, Any] | None:
        """Take the next job out of what is kept: the tags, then points, then artifacts."""
        if self._tags:
            job, self._tags = self._tags, {}
            return "tags", job
        if self._metrics:
            return "metrics", [self._metrics.popleft() for _ in range(min(len(self._metrics), MAX_METRICS_PER_BATCH))]
        while self._artifacts:
            job = self._artifacts.pop(0)
            if not job.sent:  # a given-up request may have sent it since
                return "artifact", job
        return None

    def _give_back(self, kind: str, job: Any) -> None:
        """A job that failed goes back in front of what is kept."""
        if kind == "tags":
            self._tags = {**job, **self._tags}  # a value set since wins
        elif kind == "metrics":
            self._metrics.extendleft(reversed(job))
            for key in {m.key for m in job}:  # the request may have reached the store: read it again
                self._stored.pop(key, None)
        else:
            self._artifacts.insert(0, job)

    def _request(self, sender: _Sender, call, *args, **kwargs):
        with self._cond:
            sender.since = time.monotonic()
        try:
            return call(*args, **kwargs)
        finally:
            with self._cond:
                sender.since = None

    def _send(self, sender: _Sender, kind: str, job: Any) -> None:
        from mlflow.entities import RunTag

        if kind == "tags":
            self._request(sender, self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in job.items()])
        elif kind == "metrics":
            for key in sorted({m.key for m in job}):
                with self._cond:
                    known = key in self._stored
                if not known:
                    steps = {m.step for m in self._request(sender, self.client.get_metric_history, self.run_id, key)}
                    with self._cond:
                        self._stored.setdefault(key, steps)
            with self._cond:
                new = [m for m in job if m.step not in self._stored.get(m.key, ())]
            if new:
                self._request(sender, self.client.log_batch, self.run_id, metrics=new)
            with self._cond:
                for m in new:
                    self._stored.get(m.key, set()).add(m.step)
        else:
            path = job.path if Path(job.path).is_file() or not job.copy else job.copy
            self._request(sender, self.client.log_artifact, self.run_id, path, job.artifact_path)
            with self._cond:
                job.sent, copy = True, job.copy
            if copy:
                Path(copy).unlink(missing_ok=True)

    def _drain(self, sender: _Sender) -> None:
        """A sender thread: send what is kept until nothing is left, a request fails, or the
        sender is given up."""
        try:
            while True:
                with self._cond:
                    if sender.stuck:
                        return
                    job = sender.job = self._next_job()
                    if job is None:
                        if self._file_loaded and not self._file_has_more:  # all it held is sent
                            self.unsent_path.unlink(missing_ok=True)
                            self._file_loaded = False
                        return
                kind, payload = job
                try:
                    self._send(sender, kind, payload)
                except Exception as exc:  # connection, timeout, server error, refusal: never the caller's
                    with self._cond:
                        if sender.stuck:  # its job went back when it was given up
                            self._last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
                            return
                        sender.job = None
                        if _refused(exc):
                            log.warning("MLflow store %s refused %s of run %s (dropped): %s: %s", self.uri,
                                        f"{len(payload)} points" if kind == "metrics" else kind, self.run_id,
                                        type(exc).__name__, exc)
                            continue
                        self._give_back(kind, payload)
                        self._failed(f"{type(exc).__name__}: {str(exc)[:300]}")
                    return
                with self._cond:
                    if sender.stuck:
                        return
                    sender.job = None
                    self._failures = 0
                    if self._down:
                        self._down = False
                        log.info("MLflow store %s answers again: run %s's kept points are being sent", self.uri,
                                 self.run_id)
        finally:
            with self._cond:
                if self._sender is sender:
                    self._sender = None
                elif sender in self._stuck:
                    self._stuck.remove(sender)
                sender.job = None
                self._last_end = time.monotonic()
                self._cond.notify_all()


# ----------------------------------------------------------------------------- system metrics

SYSTEM_METRICS_INTERVAL_S = 10.0  # seconds between samples; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides


class _OncePerMessage(logging.Filter):
    """Lets each distinct message through once (a warning MLflow repeats at every sample)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message in self._seen:
            return False
        self._seen.add(message)
        return True


def _quiet_system_metrics_logs() -> None:
    """MLflow's monitor says at INFO when it starts, stops or skips GPUs, and repeats a GPU
    read error at every sample: keep warnings only, each once."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    for name in ("mlflow.system_metrics.system_metrics_monitor", "mlflow.system_metrics.metrics.gpu_monitor",
                 "mlflow.system_metrics.metrics.rocm_monitor"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _OncePerMessage) for f in logger.filters):
            logger.addFilter(_OncePerMessage())


class SystemMetrics:
    """MLflow's own system-metrics monitor (mlflow.system_metrics.SystemMetricsMonitor) on one
    existing run, from any process: `system/cpu_utilization_percentage`,
    `system/system_memory_usage_megabytes` and `_percentage`, disk and network, and
    `system/gpu_<i>_utilization_percentage` / memory / power when nvidia-ml-py is installed.
    A point every `interval_s` seconds (default SYSTEM_METRICS_INTERVAL_S; the environment
    variable MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it), steps continuing those the
    run already holds (a resumed run). `stop()` ends the sampling thread and writes the
    sample taken since the last point, so even a section shorter than one interval leaves a
    point."""

    def __init__(self, uri: str, run_id: str, interval_s: float | None = None):
        import psutil
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        _quiet_system_metrics_logs()
        psutil.cpu_percent()  # the first reading of a process is 0.0: take it now, not as a sample
        self._monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s or SYSTEM_METRICS_INTERVAL_S,
                                             resume_logging=True, tracking_uri=uri)
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def interval_s(self) -> float:
        return float(self._monitor.sampling_interval)

    def start(self, until: threading.Thread | None = None) -> "SystemMetrics":
        """Start sampling; with `until` (not the main thread), stop when that thread ends."""
        self._monitor.start()
        if until is not None and until is not threading.main_thread():
            threading.Thread(target=self._stop_after, args=(until,), daemon=True,
                             name="SystemMetricsStop").start()
        return self

    def _stop_after(self, thread: threading.Thread) -> None:
        thread.join()
        self.stop()

    def stop(self) -> None:
        """Stop sampling and write what is pending (idempotent, never raises)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        monitor = self._monitor
        try:
            monitor.finish()  # joins the sampling thread, flushes its points
            if any(m.metrics for m in monitor.monitors):  # sampled since the last point
                monitor.publish_metrics(monitor.aggregate_metrics())
            monitor.mlflow_logger.flush()
        except Exception as exc:
            log.warning("system metrics of run %s: the last points were not written: %s", monitor._run_id, exc)


# ----------------------------------------------------------------------------- models


def torch_pip_requirements() -> list[str]:
    """torch, torchvision and cloudpickle pinned at the versions installed (local labels
    such as +cu130 dropped): what loading a pickled torchvision model needs. Given to MLflow
    explicitly, so it does not infer requirements by importing the model in a subprocess."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in ("torch", "torchvision", "cloudpickle")]


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's model logging and loading read the global tracking URI: set it for the
    block, then put back both the global and the MLFLOW_TRACKING_URI environment variable
    (mlflow.set_tracking_uri writes that variable too)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri, old_env = tracking_utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_uri)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env


class _NoPickleNotice(logging.Filter):
    """mlflow.pytorch warns that pickled models run code when loaded; we pickle on purpose
    (a torchvision ResNet that can be fine-tuned, not a traced graph) and say so in the README."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saving pytorch model by Pickle")


def log_torch_model(uri: str, run_id: str, module, *, name: str, step: int = 0, input_shape=(-1, 3, -1, -1),
                    output_dim: int | None = None, params: Mapping[str, Any] | None = None) -> str:
    """Log `module` as an MLflow PyTorch model (pickled with cloudpickle, explicit pip
    requirements, a tensor signature float32 `input_shape` -> (-1, output_dim)) produced by
    run `run_id`, in that run's experiment; the run's metrics at `step` are linked to it.
    Returns the model URI (models:/<model id>), which `load_torch_model` loads and
    `mlflow.register_model` registers."""
    import mlflow.pytorch
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    client = _client(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    # created here, not by log_model: that would put it in the "current" experiment (Default)
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id,
                                       params={k: str(v) for k, v in (params or {}).items()} or None)
    signature = None
    if output_dim:
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), tuple(input_shape))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(output_dim)))]))
    pytorch_log = logging.getLogger("mlflow.pytorch")
    notice = _NoPickleNotice()
    pytorch_log.addFilter(notice)
    try:
        with _global_tracking_uri(uri):
            info = mlflow.pytorch.log_model(module, name=name, model_id=model.model_id, run_id=run_id, step=step,
                                            signature=signature, serialization_format="pickle",
                                            pip_requirements=torch_pip_requirements())
    finally:
        pytorch_log.removeFilter(notice)
    return info.model_uri


def load_torch_model(uri: str, model_uri: str, map_location: str = "cpu"):
    """A model that log_torch_model logged (models:/<id>, runs:/..., or a path), as the module."""
    import mlflow.pytorch

    with _global_tracking_uri(uri):
        return mlflow.pytorch.load_model(model_uri, map_location=map_location)
