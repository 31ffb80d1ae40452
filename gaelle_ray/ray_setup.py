"""Ray set-up: starting or joining an instance, the CPU budget, and the TorchTrainer.

Used by pretraining (train/trainer.py), the distributed linear probe (eval/distributed.py)
and sweeps (tune.py), so that each of them starts Ray, checks the CPUs and assembles a
TorchTrainer the same way.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Sequence

import ray
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

log = logging.getLogger(__name__)


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to Ray: a running cluster ("auto" or ray://...), or a new local instance bound
    to loopback. A local instance started here has token authentication off unless
    RAY_AUTH_MODE says otherwise (it only listens on 127.0.0.1); clusters keep their own
    setting (see README: clusters and tokens). Does nothing when Ray is already up."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=num_cpus, include_dashboard=True,
             dashboard_host="127.0.0.1")


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
                        callbacks: Sequence[Any] = (), datasets: dict[str, Any] | None = None) -> TorchTrainer:
    """A TorchTrainer running `loop(loop_config)` on `num_workers` workers of
    `cpus_per_worker` CPUs (and one GPU each when use_gpu; nccl then, gloo otherwise).

    name / storage_path: Ray Train's run folder (<storage_path>/<name>), where checkpoints
    go; keep_checkpoints: how many Ray keeps (None = all); max_failures: worker-group
    restarts from the newest checkpoint; datasets: Ray Data datasets (or factories) for
    `ray.train.get_dataset_shard`.
    """
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            callbacks=list(callbacks)),
        datasets=datasets,
    )
