"""A lost node (issue 15, point 4): GAELLE pretraining on a multi-node Ray cluster started by
this module (`ray.cluster_utils.Cluster`: a head and two worker nodes, all processes of this
machine, all bound to the loopback address 127.0.0.2, in a temp dir of their own), a node
removed mid-epoch. (Not 127.0.0.1: `ray.init(address=...)` rewrites "127.0.0.1" and
"localhost" in an address to the machine's own IP, ray/_private/services.py
canonicalize_bootstrap_address -> resolve_ip_for_localhost, where nothing listens.)

Set-up: the head has no CPU (it hosts the driver and Ray's zero-CPU actors, Ray Train's
controller among them: the controller follows the driver's node), each worker node 3 CPUs;
`ray.placement_strategy: SPREAD` (default PACK would put both workers on one node)
puts the two 1-CPU training workers on the two worker nodes (asserted from Ray Train's own
record of the run attempt: rank, node, pid of each worker), the crop tasks take the CPUs
left on both nodes.

Once epoch 0's checkpoint is written and registered by Ray Train, ~1.5 s into epoch 1, the
node of rank 0 (the worker that logs to MLflow) is removed without grace (all its processes
SIGKILLed). No replacement node is added: the capacity left (one node of 3 CPUs) holds both
workers (SPREAD is best effort) and one crop task, and the run restarts there, from the
checkpoint of epoch 0, and finishes. Its epoch history in the checkpoint and in MLflow has no
gap and no duplicate, no step metric is logged twice, and epoch 0 was not trained again.
"""

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from gaelle_ray import tracking
from gaelle_ray.config import ConfigError, load_config
from gaelle_ray.storage import load_checkpoint
from gaelle_ray.train.trainer import pretrain

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, STEPS = 3, 8  # 128 toy images / (batch 8 x 2 workers)


# on top of the folder's small config (tests/train/conftest.py)
LOST = {"train.epochs": EPOCHS, "train.max_failures": 3, "ray.placement_strategy": "SPREAD",
        "eval.online_every_epochs": 0}


# ----------------------------------------------------------------------------- the config key (fast)


def test_placement_strategy_is_validated(small_config, tmp_path):
    config = small_config(str(tmp_path / "shards"), tmp_path / "run", **LOST)
    assert config.ray.placement_strategy == "SPREAD"
    assert load_config(ROOT / "experiments" / "cpu_demo.yaml").ray.placement_strategy == "PACK"  # Ray's default
    for good in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
        assert small_config("s", tmp_path, **{**LOST, "ray.placement_strategy": good}).ray.placement_strategy == good
    for bad in ("spread", "EVEN", "''"):
        with pytest.raises(ConfigError, match=r"ray\.placement_strategy: must be one of PACK, SPREAD, "
                                              r"STRICT_PACK, STRICT_SPREAD, got"):
            small_config("s", tmp_path, **{**LOST, "ray.placement_strategy": bad})


def test_placement_strategy_reaches_the_torch_trainer(small_config, tmp_path):
    from gaelle_ray.train.trainer import build_trainer

    trainer = build_trainer(small_config(str(tmp_path / "shards"), tmp_path / "run", **LOST))
    assert trainer.scaling_config.placement_strategy == "SPREAD"


# ----------------------------------------------------------------------------- the cluster (slow)


@pytest.fixture(scope="module")
def cluster():
    """A head (0 CPUs) and two worker nodes (3 CPUs each) on 127.0.0.2, with their own temp
    dir (RAY_TMPDIR: sessions, sockets and the "current cluster" address file stay out of
    /tmp/ray, which other Ray instances on this machine use); Ray Train's state tracking on
    (its record of each attempt's workers). Shut down, and the environment restored, at the
    module's end."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp = tempfile.mkdtemp(prefix="gln", dir="/tmp")  # short: socket paths have a length limit
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", "RAY_TRAIN_ENABLE_STATE_TRACKING")}
    os.environ["RAY_TMPDIR"] = temp
    os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"] = "1"
    node = {"node_ip_address": "127.0.0.2"}  # loopback (module docstring)
    made = None
    try:
        # the dashboard (Ray's State API, which Ray Train's placement-group cleaner and state
        # actor query) on our own address and a free port: the default, 127.0.0.1:8265, may
        # be another Ray instance's on this machine
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
            port = probe.getsockname()[1]
        made = Cluster(initialize_head=True, head_node_args={**node, "num_cpus": 0, "include_dashboard": True,
                                                             "dashboard_host": "127.0.0.2", "dashboard_port": port})
        for _ in range(2):
            made.add_node(**node, num_cpus=3)
        made.wait_for_nodes()
        yield made
    finally:
        ray.shutdown()
        if made is not None:
            made.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(temp, ignore_errors=True)


def _attempts():
    """Ray Train's record of this cluster's run attempts, oldest first (state tracking)."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    if actor is None:
        return []
    runs = ray.get(actor.get_train_run_attempts.remote(), timeout=60)
    return sorted((a for attempts in runs.values() for a in attempts.values()), key=lambda a: a.start_time_ns)


def _registered(run_dir: Path, name: str) -> bool:
    """Ray Train has registered checkpoint `name`: its checkpoint manager's snapshot names it
    (a restart gets that checkpoint; one only written to storage could be missed)."""
    snapshot = run_dir / "train" / "checkpoint_manager_snapshot.json"
    try:
        return name in snapshot.read_text()
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_node_lost_mid_epoch_restarts_from_newest_checkpoint(cluster, shards, small_config, tmp_path):
    run_dir = tmp_path / "run"
    config = small_config(shards, run_dir, **LOST)
    train = run_dir / "train"
    seen: dict = {}
    done = threading.Event()

    def remove_rank0_node():
        try:
            deadline = time.monotonic() + 900
            while not _registered(run_dir, "epoch_00000"):
                if done.is_set() or time.monotonic() > deadline:
                    return
                time.sleep(0.2)
            time.sleep(1.5)  # into epoch 1
            workers = _attempts()[-1].workers
            seen["workers"] = sorted((w.world_rank, w.node_id, w.pid) for w in workers)
            seen["epoch_1_written"] = (train / "epoch_00001").exists()
            seen["epoch_0_mtime"] = (train / "epoch_00000" / "meta.json").stat().st_mtime_ns
            rank0 = next(w for w in workers if w.world_rank == 0)
            node = next(n for n in cluster.worker_nodes if n.node_id == rank0.node_id)
            seen["removed_at"] = time.monotonic()
            cluster.remove_node(node, allow_graceful=False)
            seen["removed"] = node.node_id
        except Exception as exc:  # noqa: BLE001 - reported by the test below
            seen["error"] = repr(exc)

    started = time.monotonic()
    thread = threading.Thread(target=remove_rank0_node, daemon=True)
    thread.start()
    try:
        result = pretrain(config, address=cluster.address)
    finally:
        done.set()
        thread.join(timeout=120)
    wall = time.monotonic() - started
    print(f"\nlost-node run: {wall:.0f} s in all, {wall - (seen.get('removed_at', started) - started):.0f} s "
          f"after the node was removed")

    import ray
    assert "error" not in seen, seen.get("error")
    assert "removed" in seen, "no node was removed"
    head = cluster.head_node.node_id
    assert ray.get_runtime_context().get_node_id() == head  # the driver, hence the controller, on the head
    first = [node for _, node, _ in seen["workers"]]
    assert len(first) == 2 and len(set(first)) == 2 and head not in first  # two workers on two worker nodes
    assert seen["removed"] == first[0]  # rank 0's node
    assert not seen["epoch_1_written"]  # removed mid-epoch 1
    survivor = (set(first) - {seen["removed"]}).pop()

    attempts = _attempts()
    assert len(attempts) >= 2 and attempts[0].status.value == "ERRORED" and attempts[-1].status.value == "FINISHED"
    assert [w.node_id for w in attempts[-1].workers] == [survivor, survivor]  # restarted on the capacity left

    assert Path(result.checkpoint).name == f"epoch_{EPOCHS - 1:05d}"
    assert (train / "epoch_00000" / "meta.json").stat().st_mtime_ns == seen["epoch_0_mtime"]  # not trained again
    state, meta = load_checkpoint(result.checkpoint)
    assert meta["world_size"] == 2
    assert state["worker"]["iteration"] == EPOCHS * STEPS  # no step lost or repeated in the final state
    assert [h["epoch"] for h in state["history"]] == list(range(EPOCHS))
    history = [step for step, _ in tracking.metric_history(result.tracking_uri, result.mlflow_run_id, "epoch_loss")]
    assert history == list(range(EPOCHS))  # MLflow: each epoch once
    steps = [s for s, _ in tracking.metric_history(result.tracking_uri, result.mlflow_run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == EPOCHS * STEPS  # step metrics: no duplicates either
