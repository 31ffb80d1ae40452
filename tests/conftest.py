"""Shared test set-up: a local Ray instance bound to loopback, one per test module.

Environment decided here for every test: no usage stats, token authentication off for the
loopback-only local instances the tests start (the job-submission test sets its own).
"""

import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def ray_local():
    """A fresh local Ray instance (4 logical CPUs on 2 cores: two 1-CPU train workers plus
    the data stream need more than 2), shut down after the module."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


# ----------------------------------------------------------------------------- our own processes
# A test stops or kills only the processes it started: never by name across the machine
# (someone may run a real Ray job next to the suite).


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="ignore").strip()
    except OSError:
        return ""


def descendants(roots) -> list[int]:
    """Every living process below the pids `roots` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            parent = _parent_pid(int(name))
            if parent is not None:
                children.setdefault(parent, []).append(int(name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


def processes_mentioning(text: str) -> list[int]:
    """Processes whose command line contains `text` (e.g. the --temp-dir of a Ray head)."""
    return sorted(int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != os.getpid()
                  and text in cmdline(int(n)))


def stop_processes(pids, grace_s: float = 10.0) -> None:
    """SIGTERM `pids`, then SIGKILL whatever is left after `grace_s`."""
    import signal
    import time

    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") and cmdline(p) for p in pids):
            time.sleep(0.2)


@pytest.fixture
def own_processes():
    """What a test may signal: the processes below it, or those naming a path it owns."""
    from types import SimpleNamespace

    return SimpleNamespace(cmdline=cmdline, descendants=descendants, mentioning=processes_mentioning,
                           stop=stop_processes)


def _free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS's pick)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port():
    """free_port() -> a TCP port free on 127.0.0.1 (e.g. the gloo rendezvous of spawned workers)."""
    return _free_port
