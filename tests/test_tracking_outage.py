"""A tracking outage does not stop training (issue 15.6).

rank 0 logs through tracking.RunLogger as the training loop does (a point per step, tags,
close() at the end); here a real `mlflow server` on loopback is stopped under it and
started again on the same port and store: training goes on with one warning, every point
reaches the server once, and what cannot be sent by close() is kept in a file.
"""

import json
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from gaelle_ray import tracking

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`mlflow server` on loopback over a sqlite store in `folder`; stop() ends it and the
    processes it started (only those)."""

    def __init__(self, folder: Path, procs, port: int | None = None):
        self.folder, self.procs = folder, procs
        self.port = port or _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = folder / "mlflow.db"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.folder / "server.log", "ab")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.db}", "--default-artifact-root",
             str(self.folder / "art"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def up(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_up(self, timeout_s: float = 240.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.up():
            assert self.proc.poll() is None, (self.folder / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the MLflow server did not start"
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.procs.stop([self.proc.pid, *self.procs.descendants([self.proc.pid])])
        self.proc.wait(timeout=30)
        self.proc = None
        assert not self.up()


@pytest.fixture
def server(tmp_path, own_processes):
    s = _Server(tmp_path, own_processes)
    s.start()
    try:
        s.wait_up()
        yield s
    finally:
        s.stop()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.mark.slow
def test_training_goes_on_while_the_server_is_down_and_every_point_arrives_once(server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_id = tracking.start_run(server.uri, "outage", "r", {}, {})
    logger = tracking.RunLogger(server.uri, run_id, unsent_dir=tmp_path / "unsent")
    durations, step = [], 0

    def train_step():  # what _log_step does at each step of the training loop
        nonlocal step
        t0 = time.monotonic()
        logger.log_metrics({"loss": 1.0 / (step + 1), "lr": 0.1 * step}, step=step)
        durations.append(time.monotonic() - t0)
        step += 1
        time.sleep(0.05)

    for _ in range(10):
        train_step()
    server.stop()
    down_from = step
    for _ in range(20):
        train_step()
    logger.set_tags({"collapse_warning": "none"})  # a tag while it is down
    server.start()  # same port, same store; training goes on while it starts
    deadline = time.monotonic() + 240
    while not server.up():
        assert time.monotonic() < deadline, "the MLflow server did not start again"
        train_step()
    while_down = durations[down_from:]
    for _ in range(10):
        train_step()
    logger.close()

    assert step > down_from + 20
    for key in ("loss", "lr"):
        assert _steps(server.uri, run_id, key) == list(range(step)), key  # each step once, none missing
    values = {m.step: m.value for m in MlflowClient(server.uri).get_metric_history(run_id, "loss")}
    assert values[down_from + 5] == pytest.approx(1.0 / (down_from + 6))
    assert MlflowClient(server.uri).get_run(run_id).data.tags["collapse_warning"] == "none"
    warned = _warnings(caplog)
    assert len(warned) == 1, warned
    assert "does not take" in warned[0] and "training goes on" in warned[0]
    assert max(durations) < 10, max(durations)  # a bound on a hang, not a speed test
    assert sum(d > 2 for d in while_down) <= 1, sorted(while_down)[-5:]  # one wait, not one per point
    assert not logger.unsent_path.exists()


@pytest.mark.slow
def test_points_the_server_never_got_are_kept_in_a_file_and_sent_by_the_next_logger(server, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_id = tracking.start_run(server.uri, "outage", "r", {}, {})
    logger = tracking.RunLogger(server.uri, run_id, unsent_dir=tmp_path / "unsent")
    for step in range(10):
        logger.log_metrics({"loss": float(step), "lr": 0.5}, step=step)
    server.stop()
    durations = []
    for step in range(10, 20):
        t0 = time.monotonic()
        logger.log_metrics({"loss": float(step), "lr": 0.5}, step=step)
        durations.append(time.monotonic() - t0)
    logger.set_tags({"stopped": "no"})
    logger.close(timeout_s=4)
    assert max(durations) < 10 and sum(d > 2 for d in durations) <= 1, durations

    warned = _warnings(caplog)
    assert len(warned) == 2, warned
    assert "20 points, 1 tags and 0 artifacts were not sent" in warned[1], warned[1]
    assert str(logger.unsent_path) in warned[1]
    records = [json.loads(line) for line in logger.unsent_path.read_text().splitlines()]
    assert sorted((r["metric"], r["step"]) for r in records if "metric" in r) == sorted(
        (k, s) for k in ("loss", "lr") for s in range(10, 20))
    assert {"tag": "stopped", "value": "no"} in records

    # the next logger of the run (a resumed run; here straight on the server's store) sends them
    store = f"sqlite:///{server.db}"
    again = tracking.RunLogger(store, run_id, unsent_dir=tmp_path / "unsent")
    again.close()
    for key in ("loss", "lr"):
        assert _steps(store, run_id, key) == list(range(20)), key
    assert MlflowClient(store).get_run(run_id).data.tags["stopped"] == "no"
    assert not logger.unsent_path.exists()
    assert len(_warnings(caplog)) == 2


def test_a_send_that_reached_the_store_before_failing_is_not_sent_again(tmp_path, caplog):
    """A timeout after the store took the points: before sending again the logger reads the
    history back, and sends only what is not there."""
    caplog.set_level(logging.INFO)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "r", {}, {})
    logger = tracking.RunLogger(uri, run_id, unsent_dir=tmp_path / "unsent")
    real, sent = logger.client.log_batch, []

    def reaches_then_times_out(run_id, metrics=(), **kwargs):
        real(run_id, metrics=metrics, **kwargs)
        sent.extend((m.key, m.step) for m in metrics)
        if any(m.step == 1 for m in metrics) and sent.count(("loss", 1)) == 1:
            raise MlflowException("API request to /api/2.0/mlflow/runs/log-batch failed with timeout exception")

    logger.client.log_batch = reaches_then_times_out
    t0 = time.monotonic()
    for step in range(4):
        logger.log_metrics({"loss": 10.0 - step}, step=step)
    assert time.monotonic() - t0 < 5
    assert logger.flush(timeout_s=20) == 0
    assert tracking.metric_history(uri, run_id, "loss") == [(0, 10.0), (1, 9.0), (2, 8.0), (3, 7.0)]
    assert sorted(sent) == [("loss", s) for s in range(4)]  # step 1 was not sent a second time
    warned = _warnings(caplog)
    assert len(warned) == 1 and "TimeoutError" not in warned[0] and "timeout exception" in warned[0], warned


def test_a_hanging_request_does_not_hold_training_and_its_points_arrive_once(tmp_path, caplog):
    """A store that takes a request but answers late: the call returns after call_timeout_s,
    the next calls do not wait, the request is sent again by a new sender, and the point is
    stored once whichever lands first."""
    caplog.set_level(logging.INFO)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "exp", "r", {}, {})
    logger = tracking.RunLogger(uri, run_id, unsent_dir=tmp_path / "unsent", call_timeout_s=0.5)
    real, hang = logger.client.log_batch, [True]

    def slow_once(run_id, metrics=(), **kwargs):
        if hang and hang.pop():
            time.sleep(3)
        real(run_id, metrics=metrics, **kwargs)

    logger.client.log_batch = slow_once
    durations = []
    for step in range(6):
        t0 = time.monotonic()
        logger.log_metrics({"loss": float(step)}, step=step)
        durations.append(time.monotonic() - t0)
        time.sleep(0.1)
    logger.close(timeout_s=20)
    time.sleep(3.5)  # the hanging request lands too
    assert max(durations) < 2, durations
    assert sum(d > 0.3 for d in durations) == 1, durations
    assert tracking.metric_history(uri, run_id, "loss") == [(s, float(s)) for s in range(6)]
    warned = _warnings(caplog)
    assert len(warned) == 1 and "no answer in 0.5 s" in warned[0], warned
