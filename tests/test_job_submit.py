"""The local debugging flow, for real: `ray start --head` on loopback with token
authentication on, `ray job submit` of a one-epoch toy pretraining, SUCCEEDED, checkpoint
and MLflow run present. The head gets its own temp dir and ports, and the test stops only
the processes of that head (not `ray stop`, which stops every Ray instance on the host).

Token authentication is chosen explicitly: RAY_AUTH_MODE=token and a token in
RAY_AUTH_TOKEN for both the cluster and the job client (what the README tells users)."""

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from gaelle_ray import tracking
from gaelle_ray.data.prepare import prepare_toy

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, env, timeout=120, check=True):
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                          timeout=timeout, check=check)


def test_ray_start_then_job_submit_pretraining(tmp_path, own_processes):
    shards = tmp_path / "shards"
    prepare_toy(str(shards), n_train=64, n_val=16, image_size=64, seed=0)
    run_dir = tmp_path / "run"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, client, agent, agent_grpc, metrics = (_free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(prefix="gr-", dir="/tmp")  # short: Ray's socket paths live under it
    _run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
          "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
          f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
          f"--metrics-export-port={metrics}", f"--temp-dir={temp_dir}", "--disable-usage-stats"], env, timeout=180)
    address = f"http://127.0.0.1:{dash}"
    try:
        # without the token the job server refuses the client
        denied = _run(["ray", "job", "list", "--address", address], {**env, "RAY_AUTH_TOKEN": "wrong"},
                      check=False)
        assert denied.returncode != 0
        entry = (f"{BIN / 'gaelle'} pretrain --config {ROOT / 'experiments' / 'cpu_demo.yaml'} --address auto "
                 f"--num-workers 1 --set data.shards={shards} --set eval.data={shards} --set train.run_dir={run_dir} "
                 "--set train.epochs=1 "
                 "--set train.batch_size_per_worker=16 --set augmentation.size_crops=[48,24] "
                 "--set model.hidden_mlp=64 --set model.feat_dim=32 --set model.nmb_prototypes=20 "
                 "--set model.nmb_local_prototypes=20 --set train.log_every_steps=1")
        submit = _run(["ray", "job", "submit", "--address", address, "--submission-id", "gaelle-test",
                       "--no-wait", "--", *entry.split()], env, check=False)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "gaelle-test" in submit.stdout + submit.stderr
        deadline, status = time.time() + 600, ""
        while time.time() < deadline:
            out = _run(["ray", "job", "status", "--address", address, "gaelle-test"], env)
            status = out.stdout + out.stderr
            if any(s in status.lower() for s in ("succeeded", "failed", "stopped")):
                break
            time.sleep(3)
        logs = _run(["ray", "job", "logs", "--address", address, "gaelle-test"], env).stdout
        assert "succeeded" in status.lower(), f"job status: {status}\nlogs:\n{logs[-3000:]}"
        progress = [line for line in logs.splitlines() if "[gaelle] epoch 1/1 step" in line]
        assert len(progress) == 4 and "step 4/4" in progress[-1]  # one line per step, each once
        assert (run_dir / "train" / "epoch_00000" / "meta.json").is_file()
        run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
        uri = f"sqlite:///{run_dir.resolve()}/mlflow.db"
        assert [s for s, _ in tracking.metric_history(uri, run_id, "epoch_loss")] == [0]
    finally:  # this head's processes (their command lines name its temp dir) and what they started
        head = own_processes.mentioning(temp_dir)
        own_processes.stop(sorted(set(head) | set(own_processes.descendants(head))))
        assert not own_processes.mentioning(temp_dir)
