"""Ray set-up: starting or joining an instance, the CPU budget, and the TorchTrainer.

Used by pretraining (train/trainer.py), the distributed linear probe (eval/distributed.py)
and sweeps (tune.py), so that each of them starts Ray, checks the CPUs and assembles a
TorchTrainer the same way.

The console: Ray's own informational lines stay in Ray's log files (the session folder's
``logs/``, e.g. /tmp/ray/session_latest/logs: ``train/`` for Ray Train, ``ray-data*.log``
for Ray Data, ``worker-*.out/err`` for each process); the console gets our progress lines,
warnings and errors. How: `init_ray` runs `quiet_worker` in every Ray worker process
(runtime_env ``worker_process_setup_hook``) and `quiet_console` on the driver; the
TorchTrainer logs Ray Train's own lines at WARNING and above on the console
(`ray.train.LoggingConfig`); a Ray Train worker calls `quiet_train_worker_console` once
Ray Train has set up its logging.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Any, Callable, Sequence

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

log = logging.getLogger(__name__)


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to Ray: a running cluster ("auto" or ray://...), or a new local instance bound
    to loopback. A local instance started here has token authentication off unless
    RAY_AUTH_MODE says otherwise; clusters keep their own setting (see README: clusters and
    tokens). Does nothing when Ray is already up.

    Loopback is what we ask for, not all Ray does (Ray 2.60, checked with `ss -ltnp`): its
    node address becomes the machine's own IP, and the GCS, raylet and worker gRPC servers
    listen on every interface; only the dashboard stays on 127.0.0.1. Without a token, a
    machine that can reach this one can reach those ports. RAY_AUTH_MODE=token with
    RAY_AUTH_TOKEN set protects them (RAY_AUTH_MODE=token alone makes the GCS abort: no
    token is generated for it here)."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    quiet_console()
    quiet = {"logging_level": logging.WARNING, "runtime_env": {"worker_process_setup_hook": WORKER_SETUP_HOOK}}
    if address:
        ray.init(address=address, log_to_driver=True, **quiet)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray Train's preemption watcher follows node drains on clusters; a local instance has
    # none, and the watcher's start logs a spurious core_worker error line
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    context = ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=True,
                       dashboard_host="127.0.0.1", **quiet)
    session = context.address_info.get("session_dir") or ""
    dashboard = f"dashboard http://{context.dashboard_url}, " if context.dashboard_url else ""
    sys.stdout.write(f"[gaelle] local Ray instance: {dashboard}Ray's own logs in {os.path.join(session, 'logs')}\n")
    sys.stdout.flush()


# ----------------------------------------------------------------------------- a quiet console

WORKER_SETUP_HOOK = "gaelle_ray.ray_setup.quiet_worker"

# Ray Data's DatasetManager builds its ExecutionOptions with the deprecated argument itself
_RAY_DEPRECATION_MESSAGE = r"`ExecutionOptions\.exclude_resources` is deprecated"


def quiet_console() -> None:
    """This process's console without Ray's and MLflow's informational lines (they stay in
    Ray's log files); warnings and errors still show. Idempotent.

    - the RayDeprecationWarning Ray Train's own DatasetManager triggers (that one only);
    - Ray Data: its console handler at WARNING (its log file keeps everything), and its
      progress in its log file rather than as bars forwarded to the driver
      (``DataContext.use_ray_tqdm = False``: a worker's stdout is no terminal, so Ray Data
      logs its progress instead);
    - MLflow's "Creating initial MLflow database tables..." lines (mlflow.store.db.utils).
    """
    from ray.util.annotations import RayDeprecationWarning

    warnings.filterwarnings("ignore", message=_RAY_DEPRECATION_MESSAGE, category=RayDeprecationWarning)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    import ray.data

    ray.data.DataContext.get_current().use_ray_tqdm = False
    for handler in logging.getLogger("ray.data").handlers:
        if _is_console(handler):
            handler.setLevel(max(handler.level, logging.WARNING))


def _is_console(handler: logging.Handler) -> bool:
    """A handler writing to a stream (Ray's console handlers), not to a file."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def quiet_worker() -> None:
    """Ray's ``worker_process_setup_hook`` of the jobs `init_ray` starts: runs once in every
    Ray worker process before its first task. `quiet_console`, and RAY_ADDRESS set to this
    worker's own cluster (Ray Train's placement-group cleaner looks the cluster up by
    itself and fails with "Found multiple active Ray instances" when another Ray instance
    runs on the same machine). Never raises: a failing hook would stop the worker."""
    try:
        quiet_console()
        os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    except Exception as exc:  # noqa: BLE001 - a noisier console, not a failed worker
        log.warning("gaelle worker set-up hook: %s", exc)


class _RayInfoFilter(logging.Filter):
    """Drops records below WARNING logged from inside the ray package."""

    def __init__(self) -> None:
        super().__init__()
        self.ray_dir = os.path.dirname(os.path.abspath(ray.__file__)) + os.sep

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not os.path.abspath(record.pathname).startswith(self.ray_dir)


def quiet_train_worker_console() -> None:
    """In a Ray Train worker, once Ray Train has configured its logging (in the training
    loop): Ray's own informational lines that reach the root logger ("Reporting training
    result N: TrainingReport(...)", logged under the name of a file) leave the console and
    stay in Ray Train's application log file. Idempotent."""
    for handler in logging.getLogger().handlers:
        if _is_console(handler) and not any(isinstance(f, _RayInfoFilter) for f in handler.filters):
            handler.addFilter(_RayInfoFilter())


def wait_for_cpus(wanted: float, timeout_s: float) -> float:
    """The cluster's CPU count, waiting up to timeout_s for `wanted` (nodes of a fresh
    cluster join over a minute or two)."""
    deadline = time.monotonic() + timeout_s
    while True:
        total = ray.cluster_resources().get("CPU", 0)
        if total >= wanted or time.monotonic() >= deadline:
            return total
        time.sleep(5)


def check_cpu_budget(total_cpus: float, num_workers: int, cpus_per_worker: float,
                     crop_cpus: float) -> float:
    """Raise ValueError if the train workers would leave no CPU for a crop task.

    Rule: ``total_cpus >= num_workers * cpus_per_worker + crop_cpus`` (otherwise Ray Data
    waits forever for a CPU while the workers wait for data). Returns the CPUs left to the
    stream (``total_cpus - num_workers * cpus_per_worker``); logs a warning when they hold a
    single crop task only.
    """
    for name, value in (("total_cpus", total_cpus), ("cpus_per_worker", cpus_per_worker)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if crop_cpus <= 0:
        raise ValueError(f"data.crop_cpus must be > 0, got {crop_cpus}")
    train_cpus = num_workers * cpus_per_worker
    free = total_cpus - train_cpus
    if free < crop_cpus:
        raise ValueError(
            f"CPU budget: the cluster has {total_cpus:g} CPUs, the {num_workers} train workers "
            f"take {num_workers} x ray.num_cpus_per_worker {cpus_per_worker:g} = {train_cpus:g}, "
            f"leaving {max(free, 0):g} for the data stream, less than one crop task "
            f"(data.crop_cpus = {crop_cpus:g}). Ray Data would wait forever for a CPU while the "
            f"workers wait for data (deadlock). Need total CPUs >= {train_cpus + crop_cpus:g}: "
            "add CPUs, use fewer workers or lower ray.num_cpus_per_worker / data.crop_cpus.")
    if free < 2 * crop_cpus:
        log.warning("only %g CPUs left for the data stream: a single crop task at a time "
                    "(data.crop_cpus = %g); data loading will likely be the bottleneck",
                    free, crop_cpus)
    return free


def build_torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], *, name: str,
                        storage_path: str, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                        keep_checkpoints: int | None = None, max_failures: int = 0,
                        callbacks: Sequence[Any] = (), datasets: dict[str, Any] | None = None,
                        dataset_config: Any = None, placement_strategy: str = "PACK") -> TorchTrainer:
    """A TorchTrainer running `loop(loop_config)` on `num_workers` workers of
    `cpus_per_worker` CPUs (and one GPU each when use_gpu; nccl then, gloo otherwise),
    placed by Ray's `placement_strategy` (ray.placement_strategy: PACK, SPREAD, STRICT_*).

    name / storage_path: Ray Train's run folder (<storage_path>/<name>), where checkpoints
    go; keep_checkpoints: how many Ray keeps (None = all); max_failures: worker-group
    restarts from the newest checkpoint; datasets: Ray Data datasets (or factories) for
    `ray.train.get_dataset_shard`; dataset_config: their ray.train.DataConfig (None = Ray's).
    """
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker},
                                               placement_strategy=placement_strategy),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks),
            # Ray Train's own lines at INFO ("Checkpoint successfully created at ...", worker
            # group start) go to its log files only
            logging_config=ray.train.LoggingConfig(log_level="WARNING")),
        datasets=datasets,
        **({"dataset_config": dataset_config} if dataset_config is not None else {}),
    )
