"""GAELLE pretraining on a real local Ray instance with toy data: two workers end to end,
MLflow contents, resume with fewer workers, a worker killed mid-epoch, non-finite stop."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torchvision

from gaelle_ray import tracking
from gaelle_ray.data.prepare import prepare_toy
from gaelle_ray.storage import load_checkpoint
from gaelle_ray.train.trainer import PretrainStopped, pretrain

pytestmark = pytest.mark.slow


def _online(shards):
    """Online evaluation every epoch, on the same toy shards."""
    return {"eval.data": shards, "eval.online_every_epochs": 1, "eval.online_bank_images": 32,
            "eval.image_size": 48, "eval.resize_size": 56}


def _epoch_history(result, key="epoch_loss"):
    return [step for step, _ in tracking.metric_history(result.tracking_uri, result.mlflow_run_id, key)]


def test_two_workers_end_to_end_then_resume_with_one(ray_local, shards, small_config, tmp_path):
    config = small_config(shards, tmp_path / "run", **_online(shards))
    result = pretrain(config)
    ckpt = Path(result.checkpoint)
    assert ckpt.name == "epoch_00001" and (ckpt.parent / "epoch_00000").is_dir()
    state, meta = load_checkpoint(ckpt)
    assert meta["world_size"] == 2 and meta["epoch"] == 1 and state["worker"]["iteration"] == 16
    assert len(state["queues"]["queue"]) == 2  # both ranks' queues are in the checkpoint
    assert state["queues"]["queue"][0]["buffer"].shape == (2, 16, 32)
    # online evaluation: the random-init baseline before the first step, then every epoch,
    # features sharded over the two workers; reported to Ray Train and kept in the checkpoint
    baseline = state["online"]["baselines"]["online_map"]
    assert 0.0 < baseline <= 1.0
    assert [r["online_map_epoch"] for r in state["history"]] == [0.0, 1.0]
    assert result.metrics["online_map"] == state["history"][-1]["online_map"]
    assert result.metrics["online_map_baseline"] == baseline
    assert result.metrics["online_map_gain"] == pytest.approx(result.metrics["online_map"] - baseline)

    # MLflow: params are the whole config, tags, epoch history, step metrics, artifacts
    from mlflow.tracking import MlflowClient
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.mlflow_run_id)
    assert result.tracking_uri == f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}"
    assert set(config.flat()) <= set(run.data.params)
    assert run.data.params["queue.queue_length"] == "32"
    for tag in ("git_commit", "torch_version", "ray_version", "world_size", "device_name"):
        assert tag in run.data.tags, tag
    assert run.data.tags["world_size"] == "2" and run.data.tags["device_name"] == "cpu"
    assert _epoch_history(result) == [0, 1]
    assert _epoch_history(result, "epoch_online_map") == [0, 1]
    assert [m.value for m in client.get_metric_history(result.mlflow_run_id, "online_map_baseline")] == [baseline]
    for key in ("loss", "loss_global", "loss_local", "loss_l2g", "lr", "images_per_s", "data_wait_share",
                "code_entropy", "prototypes_in_use", "skipped_records"):
        assert client.get_metric_history(result.mlflow_run_id, key), key
    artifacts = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"config.yaml", "backbone_resnet18.pth"} <= artifacts
    pictures = {a.path for a in client.list_artifacts(result.mlflow_run_id, "pictures")}
    assert pictures == {"pictures/loss_curves.png", "pictures/online_map.png", "pictures/attention_epoch_00001.png"}
    assert (tmp_path / "run" / "pictures" / "loss_curves.png").is_file()
    local = client.download_artifacts(result.mlflow_run_id, "backbone_resnet18.pth", str(tmp_path))
    torchvision.models.resnet18().load_state_dict(torch.load(local), strict=True)
    assert "system/cpu_utilization_percentage" in run.data.metrics  # rank 0's system metrics, up to the loop's end
    assert [o.step for o in client.get_run(result.mlflow_run_id).outputs.model_outputs] == [1]  # backbone model

    # a new run in the same directory is refused; --resume continues it with one worker
    with pytest.raises(ValueError, match="already holds a run"):
        pretrain(config)
    more = small_config(shards, tmp_path / "run", **{**_online(shards), "train.epochs": 3, "train.num_workers": 1})
    resumed = pretrain(more, resume=True)
    assert resumed.mlflow_run_id == result.mlflow_run_id
    assert _epoch_history(resumed) == [0, 1, 2]  # no gap, no duplicate
    state, meta = load_checkpoint(resumed.checkpoint)
    assert meta["world_size"] == 1 and state["worker"]["iteration"] == 16 + 16
    assert state["queues"]["queue"][0]["buffer"].shape == (2, 32, 32)  # re-split: 2 x 16 rows -> 1 x 32
    assert state["online"]["baselines"]["online_map"] == baseline  # the run's own baseline, not measured again
    assert _epoch_history(resumed, "epoch_online_map") == [0, 1, 2]


def _our_train_workers(own_processes):
    """The training workers of the Ray instance this test module started (below this
    process), never another Ray's on the same machine."""
    return [pid for pid in own_processes.descendants([os.getpid()])
            if own_processes.cmdline(pid).startswith("ray::RayTrainWorker")]


def test_worker_killed_mid_epoch_restarts_from_newest_checkpoint(ray_local, shards, small_config, tmp_path, own_processes):
    config = small_config(shards, tmp_path / "run", **{**_online(shards), "train.epochs": 3, "train.max_failures": 2})
    marker = tmp_path / "run" / "train" / "epoch_00000" / "meta.json"
    killed = []

    def killer():
        deadline = time.time() + 600
        while time.time() < deadline and not marker.exists():
            time.sleep(0.2)
        time.sleep(1.5)  # into epoch 1
        pids = _our_train_workers(own_processes)
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            killed.append(pids[-1])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = pretrain(config)
    thread.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert Path(result.checkpoint).name == "epoch_00002"
    state, meta = load_checkpoint(result.checkpoint)
    assert state["worker"]["iteration"] == 3 * 8  # no step lost or repeated in the final state
    assert [h["epoch"] for h in state["history"]] == [0, 1, 2]
    assert _epoch_history(result) == [0, 1, 2]
    steps = [s for s, _ in tracking.metric_history(result.tracking_uri, result.mlflow_run_id, "loss")]
    assert steps == sorted(set(steps))  # step metrics: no duplicates either


def test_non_finite_losses_stop_the_run_with_a_clear_error(ray_local, shards, small_config, tmp_path):
    config = small_config(shards, tmp_path / "run", **{**_online(shards), "loss.temperature": 1e-40, "train.max_nonfinite_steps": 2,
                                                  "train.num_workers": 1})
    with pytest.raises(PretrainStopped, match="non-finite loss.*2 non-finite steps in a row"):
        pretrain(config)


def test_a_shard_truncated_mid_run_stops_it_naming_the_shard_and_skip_trains_without_it(ray_local, small_config, tmp_path):
    """Issue 15.8 through Ray: a shard truncated after `prepare` (and after epoch 0's
    checkpoint) stops the two-worker run at once with a clear error naming it, keeps the
    checkpoint, and tags the MLflow run; with data.bad_shard_action=skip the resumed run
    leaves the shard out and finishes."""
    shards = tmp_path / "shards"
    prepare_toy(str(shards), n_train=128, n_val=16, image_size=64, seed=0, shard_size=32)  # 4 shards of 32
    run = tmp_path / "run"
    quick = {"eval.online_every_epochs": 0, "train.max_failures": 1}
    first = pretrain(small_config(str(shards), run, **{**quick, "train.epochs": 1}))
    kept = run / "train" / "epoch_00000" / "state.pt"
    saved = kept.read_bytes()
    bad = shards / "train" / "part-00001.parquet"
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)

    with pytest.raises(PretrainStopped) as info:
        pretrain(small_config(str(shards), run, **{**quick, "train.epochs": 2}), resume=True)
    message = str(info.value)
    assert f"shard {bad}, rows [0, 32) of epoch 1, cannot be read" in message and "epoch_00000" in message, message
    assert kept.read_bytes() == saved and not (run / "train" / "epoch_00001").exists()
    from mlflow.tracking import MlflowClient
    stopped = MlflowClient(first.tracking_uri).get_run(first.mlflow_run_id)
    assert stopped.info.status == "FAILED" and str(bad) in stopped.data.tags["stopped"]

    result = pretrain(small_config(str(shards), run, **{**quick, "train.epochs": 2, "data.bad_shard_action": "skip"}),
                      resume=True)
    state, meta = load_checkpoint(result.checkpoint)
    assert meta["epoch"] == 1 and [h["epoch"] for h in state["history"]] == [0, 1]
    assert state["worker"]["iteration"] == 8 + 6  # 128 images in epoch 0, 96 without the shard in epoch 1
    assert result.mlflow_run_id == first.mlflow_run_id and _epoch_history(result) == [0, 1]
