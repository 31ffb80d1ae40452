"""Progress bars on a terminal, progress lines elsewhere (gaelle_ray.progress).

The decision is tested on fake streams; the bars for real: `gaelle make-toy` run under a
pseudo-terminal draws a tqdm bar, the same command through a pipe draws none, and (slow) a
bar of a Ray worker is drawn by the driver when the driver is on a terminal.
"""

from __future__ import annotations

import builtins
import fcntl
import io
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from gaelle_ray import progress
from gaelle_ray.progress import ENV, bar, bars_wanted, worker_bar

GAELLE = Path(sys.executable).with_name("gaelle")
TOY = ["make-toy", "--n-train", "300", "--n-val", "20", "--image-size", "32", "--workers", "1"]


class Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")
        return self.tty


def test_bars_on_terminals_only():
    tty, pipe = Stream(True), Stream(False)
    assert bars_wanted([tty, tty], env={}) is True
    assert bars_wanted([tty, pipe], env={}) is False  # stdout into a file keeps its lines
    assert bars_wanted([pipe, tty], env={}) is False
    assert bars_wanted([pipe, pipe], env={}) is False
    assert bars_wanted([None], env={}) is False
    closed = Stream(True)
    closed.close()
    assert bars_wanted([closed], env={}) is False  # isatty on a closed stream raises


def test_env_override():
    tty, pipe = Stream(True), Stream(False)
    assert bars_wanted([pipe], env={ENV: "1"}) is True
    assert bars_wanted([tty], env={ENV: "0"}) is False
    assert bars_wanted([tty], env={ENV: ""}) is True
    with pytest.raises(ValueError, match=ENV):
        bars_wanted([tty], env={ENV: "yes"})


def test_default_streams_are_stdout_and_stderr(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(sys, "stdout", Stream(True))
    monkeypatch.setattr(sys, "stderr", Stream(True))
    assert bars_wanted() is True
    monkeypatch.setattr(sys, "stdout", Stream(False))
    assert bars_wanted() is False


def test_never_in_a_ray_worker(monkeypatch):
    monkeypatch.setattr(progress, "in_ray_worker", lambda: True)
    assert bars_wanted([Stream(True)], env={ENV: "1"}) is False


def test_not_a_ray_worker_here():
    assert progress.in_ray_worker() is False


def test_bar_draws_or_stays_silent(capsys):
    for _ in bar(range(5), desc="work", unit="img", enabled=False):
        pass
    assert capsys.readouterr().err == ""
    for _ in bar(range(5), desc="work", unit="img", enabled=True):
        pass
    err = capsys.readouterr().err
    assert "work: 100%" in err and "5/5" in err and "img/s" in err


def test_worker_bar_writes_ray_tqdm_state_to_stdout(capsys, monkeypatch):
    """The worker side of Ray's distributed tqdm, written straight to stdout: Ray Train's
    patched print (here: a print that fails) is not used."""
    from ray.experimental.tqdm_ray import RAY_TQDM_MAGIC

    def no_print(*args, **kwargs):
        raise AssertionError("print used")

    monkeypatch.setattr(builtins, "print", no_print)
    b = worker_bar(10, "epoch 1/2", unit="step")
    b.update(3)
    b.set_description("epoch 1/2 loss 1.0")
    b.close()
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all(s["__magic_token__"] == RAY_TQDM_MAGIC for s in lines)
    assert lines[-1]["closed"] and lines[-1]["x"] == 3 and lines[-1]["total"] == 10
    assert lines[-1]["desc"] == "epoch 1/2 loss 1.0" and lines[-1]["unit"] == "step"


# ----------------------------------------------------------------------------- real terminals


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "RAY_ADDRESS")}
    return {**env, "RAY_USAGE_STATS_ENABLED": "0", **extra}


def run_in_pty(argv: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run argv with stdout and stderr on a pseudo-terminal (120 columns); all it wrote."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, env=env,
                            close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 1.0)
            if ready:
                try:
                    data = os.read(leader, 65536)
                except OSError:  # EIO: every writer has closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
            pytest.fail(f"{argv} still running after {timeout}s")
    finally:
        os.close(leader)
    assert proc.wait(timeout=30) == 0, b"".join(chunks).decode(errors="replace")
    return b"".join(chunks).decode(errors="replace")


def test_make_toy_draws_a_bar_on_a_terminal(tmp_path):
    out = run_in_pty([str(GAELLE), *TOY, "--out", str(tmp_path / "toy")], _env())
    assert "\r" in out, out
    assert "toy train: 100%" in out and "300/300" in out and "img/s" in out, out
    assert "toy set in" in out


def test_make_toy_through_a_pipe_draws_none(tmp_path):
    done = subprocess.run([str(GAELLE), *TOY, "--out", str(tmp_path / "toy")], env=_env(), capture_output=True,
                          text=True, timeout=240, check=True)
    assert "toy set in" in done.stdout
    for text in (done.stdout, done.stderr):
        assert "\r" not in text and "%|" not in text and "img/s" not in text, text


def test_prepare_toy_draws_bars_on_a_terminal(tmp_path):
    out = run_in_pty([str(GAELLE), "prepare", "toy", "--out", str(tmp_path / "shards"), "--n-train", "120",
                      "--n-val", "20", "--image-size", "32", "--shard-size", "50"], _env())
    assert "toy train: 100%" in out and "toy val: 100%" in out, out
    assert "shards: 100%" in out and "4/4" in out, out  # 120 train in 3 shards of 50, 20 val in 1
    assert "shards and manifest.json written to" in out


WORKER_SCRIPT = """
import time, ray
from gaelle_ray.progress import worker_bar

@ray.remote(num_cpus=1)
def work():
    b = worker_bar(6, "remote epoch", unit="step")
    for _ in range(6):
        time.sleep(0.4)
        b.update(1)
    b.close()
    return 1

ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=1, include_dashboard=False)
assert ray.get(work.remote()) == 1
time.sleep(2)  # the driver's log monitor forwards the last state
ray.shutdown()
"""


@pytest.mark.slow
def test_a_ray_worker_bar_is_drawn_by_the_driver_on_a_terminal():
    out = run_in_pty([sys.executable, "-c", WORKER_SCRIPT], _env(RAY_AUTH_MODE="disabled"))
    # Ray draws it with unit_scale: 6.00/6.00
    assert "remote epoch: 100%" in out and "6.00/6.00" in out and "step/s" in out and "\r" in out, out
    assert "__ray_tqdm_magic_token__" not in out, out  # the state lines became a bar


TRAIN_SCRIPT = """
import os, sys, tempfile, time
import ray, ray.train
from gaelle_ray.progress import bars_wanted, worker_bar
from gaelle_ray.ray_setup import build_torch_trainer, init_ray, quiet_train_worker_console

def loop(config):
    quiet_train_worker_console()
    assert os.environ["RAY_ADDRESS"] == ray.get_runtime_context().gcs_address  # set by the worker hook
    bar = worker_bar(5, "train epoch 1/1", unit="step") if config["bars"] else None
    for step in range(5):
        time.sleep(0.3)
        if bar is None:
            sys.stdout.write(f"[gaelle] step {step + 1}/5\\n")
            sys.stdout.flush()
        else:
            bar.update(1)
    if bar is not None:
        bar.close()
    with tempfile.TemporaryDirectory() as tmp:  # Ray logs "Checkpoint successfully created" and
        open(os.path.join(tmp, "x"), "w").write("x")  # "Reporting training result" at INFO
        ray.train.report({"step": 5}, checkpoint=ray.train.Checkpoint.from_directory(tmp))

if __name__ == "__main__":
    init_ray(num_cpus=2)
    build_torch_trainer(loop, {"bars": bars_wanted()}, name="t", storage_path=sys.argv[1], num_workers=1,
                        use_gpu=False, cpus_per_worker=1.0).fit()
    time.sleep(2)  # the last forwarded lines
    ray.shutdown()
"""


@pytest.mark.slow
def test_a_ray_train_worker_bar_on_a_terminal_and_a_quiet_console(tmp_path):
    """The pretraining set-up in small: init_ray, build_torch_trainer, a loop with the bar the
    driver decided on. The bar of the Ray Train worker is drawn by the driver; Ray Train's own
    lines stay in Ray's logs."""
    script = tmp_path / "train_bar.py"
    script.write_text(TRAIN_SCRIPT)
    out = run_in_pty([sys.executable, str(script), str(tmp_path / "run")], _env(RAY_AUTH_MODE="disabled"))
    assert "train epoch 1/1: 100%" in out and "5.00/5.00" in out and "step/s" in out, out
    assert "[gaelle] step" not in out and "__ray_tqdm_magic_token__" not in out, out
    assert "[gaelle] local Ray instance" in out and "Ray's own logs in" in out, out
    for ray_line in ("Reporting training result", "Checkpoint successfully created", "Started training worker group",
                     "Started a local Ray instance", "Setting up process group"):
        assert ray_line not in out, (ray_line, out)
