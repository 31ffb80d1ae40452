"""An interrupted sweep (issue 15, point 5): the sweep's driver is killed (SIGKILL, with its
local Ray instance: a lost laptop, a dead ssh session) after one trial has finished and while
another runs; `gaelle sweep --resume` finishes it: the finished trial is not rerun, the
running one continues from its newest checkpoint in the same MLflow run, under the same
MLflow parent run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from gaelle_ray import tracking
from gaelle_ray.config import load_config
from gaelle_ray.storage import latest_epoch, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "experiments" / "cpu_demo.yaml"
N_TRAIN, BATCH = 64, 16  # 4 steps an epoch (one worker)


def _sweep_file(tmp_path: Path, shards: str) -> Path:
    raw = {"name": "interrupted", "base": str(BASE),
           "set": {"data.shards": shards, "eval.data": shards, "augmentation.size_crops": [48, 24],
                   "model.hidden_mlp": 64, "model.feat_dim": 32, "model.nmb_prototypes": 20,
                   "model.nmb_local_prototypes": 20, "train.num_workers": 1, "ray.num_cpus_per_worker": 1,
                   "train.batch_size_per_worker": BATCH, "train.log_every_steps": 2, "optim.warmup_epochs": 0,
                   "optim.freeze_prototypes_niters": 2, "eval.online_every_epochs": 0, "eval.epochs": 2,
                   "eval.image_size": 48, "eval.resize_size": 56, "eval.batch_size": 32,
                   "tracking.experiment": "interrupted"},
           "space": {"train.epochs": {"grid": [1, 3]}},  # run in this order: trial _00000, then _00001
           "max_concurrent": 1, "storage": str(tmp_path / "sweeps")}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_finished_trial_reports_its_record_instead_of_training(tmp_path, monkeypatch):
    """A trial Tune runs again (its end came after Tune's last save of the experiment) reports
    the final result it wrote, and trains nothing."""
    import ray.tune
    import ray.tune.integration.ray_train as tune_train

    import gaelle_ray.train.trainer as trainer
    from gaelle_ray import tune as sweep

    reported = []
    monkeypatch.setattr(ray.tune, "report", reported.append)
    monkeypatch.setattr(ray.tune, "get_context", lambda: type("Ctx", (), {"get_trial_id": lambda self: "ab_00000"})())
    monkeypatch.setattr(tune_train, "TuneReportCallback", lambda: None)
    monkeypatch.setattr(trainer, "pretrain", lambda *a, **k: pytest.fail("a finished trial was trained again"))
    trial_dir = tmp_path / "trials" / "ab_00000"
    final = {"map": 0.5, "collapsed": False, "epoch": 1}
    sweep._report_final(str(trial_dir), final)
    assert reported == [final] and sorted(p.name for p in trial_dir.iterdir()) == [sweep.FINAL_RECORD]
    meta = {"base": load_config(BASE).to_dict(), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
            "parent_run_id": "p", "trials_dir": str(tmp_path / "trials")}
    sweep.run_trial({"train.epochs": 1, "__sweep__": meta})
    assert reported == [final, final]


def _alive(pid: int, own) -> bool:
    return os.path.exists(f"/proc/{pid}") and bool(own.cmdline(pid))  # a zombie has no command line


def _kill_hard(proc: subprocess.Popen, ray_tmp: str, own) -> None:
    """SIGKILL the driver, its process group and every process below it or of its Ray
    instance (their command lines name its RAY_TMPDIR); no process gets to clean up."""
    pids = set(own.descendants([proc.pid])) | set(own.mentioning(ray_tmp))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 60
    while True:
        for pid in pids | {proc.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()
        pids = {p for p in pids | set(own.mentioning(ray_tmp)) if _alive(p, own)}
        if not pids or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    proc.wait(timeout=30)
    assert not pids, f"still alive after SIGKILL: {[own.cmdline(p) for p in pids]}"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _recorded_epoch(run: Path) -> int | None:
    """The newest checkpoint Ray Train's own record (its snapshot) lists; restores start there."""
    try:
        names = [r["checkpoint_dir_name"] for r in
                 json.loads((run / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"]]
    except (OSError, ValueError, KeyError):  # not there yet, or being rewritten
        return None
    return max((int(n.split("_")[-1]) for n in names), default=None)


def _run_id(trial: Path) -> str:
    return json.loads((trial / "mlflow_run.json").read_text())["run_id"]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_killed_sweep_resumes_without_rerunning(tmp_path, own_processes):
    from gaelle_ray.data.prepare import prepare_toy

    shards = str(tmp_path / "shards")
    prepare_toy(shards, n_train=N_TRAIN, n_val=16, image_size=64, seed=0)
    sweep_yaml = _sweep_file(tmp_path, shards)
    experiment = tmp_path / "sweeps" / "interrupted"
    ray_tmp = tempfile.mkdtemp(prefix="gs-", dir="/tmp")  # short (Ray's socket paths), ours alone
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_TMPDIR=ray_tmp,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gaelle = str(Path(sys.executable).parent / "gaelle")
    log = tmp_path / "first.log"
    try:
        with open(log, "w") as out:
            proc = subprocess.Popen([gaelle, "sweep", "--config", str(sweep_yaml)], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        # wait: trial 1 (1 epoch) finished, trial 2 (3 epochs) checkpointed its first epoch (or
        # its second) and Ray Train recorded it
        deadline = time.monotonic() + 1200
        while True:
            assert proc.poll() is None, f"the sweep ended before it could be interrupted:\n{log.read_text()[-6000:]}"
            assert time.monotonic() < deadline, f"no interruptible moment:\n{log.read_text()[-6000:]}"
            first = next((experiment / "trials").glob("*_00000"), None)
            second = next((experiment / "trials").glob("*_00001"), None)
            newest = latest_epoch(str(second / "train")) if second else None
            if (first and (first / "trial_result.json").is_file() and newest in (0, 1)
                    and _recorded_epoch(second / "train") == newest):
                break
            time.sleep(0.2)
        _kill_hard(proc, ray_tmp, own_processes)
        assert not (second / "trial_result.json").exists()
        assert latest_epoch(str(second / "train")) == _recorded_epoch(second / "train") == newest, \
            "killed between a checkpoint and Ray Train's record of it (rare: rerun)"

        parent_id = json.loads((experiment / "mlflow_parent.json").read_text())["run_id"]
        first_files, first_id = _files(first), _run_id(first)
        second_done, second_id = _files(second / "train"), _run_id(second)
        second_done = {k: v for k, v in second_done.items() if k.startswith("epoch_")}
        uri = f"sqlite:///{experiment / 'mlflow.db'}"
        first_losses = tracking.metric_history(uri, first_id, "epoch_loss")
        assert [s for s, _ in first_losses] == [0]

        resumed = subprocess.run([gaelle, "sweep", "--config", str(sweep_yaml), "--resume"], env=env,
                                 capture_output=True, text=True, timeout=1200)
        output = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, output[-6000:]
    finally:  # whatever of ours is left (the command lines of our Ray instance name ray_tmp)
        left = own_processes.mentioning(ray_tmp)
        own_processes.stop(sorted(set(left) | set(own_processes.descendants(left))))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # the finished trial was not rerun: its files untouched, one probe, its MLflow run as it was
    assert _files(first) == first_files
    assert tracking.metric_history(uri, first_id, "epoch_loss") == first_losses
    # the running one continued from its newest checkpoint, in the same MLflow run
    assert _run_id(second) == second_id
    assert f"resumed from epoch_{newest:05d}: epoch {newest + 1}" in output, output[-6000:]
    after = _files(second / "train")
    assert {k: after.get(k) for k in second_done} == second_done  # its checkpoints untouched
    assert latest_epoch(str(second / "train")) == 2
    state, _ = load_checkpoint(second / "train" / "epoch_00002")
    assert state["worker"]["iteration"] == 3 * N_TRAIN // BATCH
    assert [s for s, _ in tracking.metric_history(uri, second_id, "epoch_loss")] == [0, 1, 2]
    # the same parent run, and one run per trial under it
    assert json.loads((experiment / "mlflow_parent.json").read_text())["run_id"] == parent_id
    assert f"MLflow parent run {parent_id} in" in output
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_id).info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment_id], "tags.job = 'sweep'")] == [parent_id]
    assert client.get_run(parent_id).info.status == "FINISHED"
    pretrain_runs = client.search_runs([experiment_id], "tags.job = 'pretrain'")
    assert {r.info.run_id: r.data.params["train.epochs"] for r in pretrain_runs} == {first_id: "1", second_id: "3"}
    assert all(r.data.tags["mlflow.parentRunId"] == parent_id and r.info.status == "FINISHED" for r in pretrain_runs)
    probes = client.search_runs([experiment_id], "tags.job = 'linear_eval'")
    assert sorted(r.data.tags["mlflow.parentRunId"] for r in probes) == sorted([first_id, second_id])
    # the sweep's result
    assert "2 trials:" in output and output.count("mAP") >= 2
    assert load_config(experiment / "best_config.yaml").train.epochs in (1, 3)
