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
