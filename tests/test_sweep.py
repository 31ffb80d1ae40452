"""The tiny toy sweep of experiments/sweeps/toy_tiny.yaml on a local Ray instance (with the
dashboard, which Tune on Train V2 needs to release placement groups): both trials run, the
collapsed one is stopped and flagged, MLflow has the parent run and one child per trial,
and the best trial's config is written out ready to run."""

from pathlib import Path

import pytest
import yaml

from gaelle_ray.config import ConfigError, load_config
from gaelle_ray.data.prepare import prepare_toy
from gaelle_ray.tune import load_sweep, param_space, run_sweep

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = sorted((ROOT / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sweep_file_validates(path):
    spec = load_sweep(path)
    assert param_space(spec)


def test_bad_sweep_files_name_the_key(tmp_path):
    base = str(ROOT / "experiments" / "cpu_demo.yaml")
    cases = [({"name": "x", "base": base, "space": {"optim.bse_lr": {"grid": [0.1]}}}, "space.optim.bse_lr"),
             ({"name": "x", "base": base, "space": {"optim.base_lr": {"grids": [0.1]}}}, "space.optim.base_lr"),
             ({"name": "x", "base": base, "space": {"loss.epsilon": {"grid": [0.0]}}}, "loss.epsilon"),
             ({"name": "x", "base": base, "space": {"optim.base_lr": {"loguniform": [0, 1]}}}, "bounds"),
             ({"name": "x", "base": base, "spaces": {}}, "did you mean 'space'")]
    for raw, fragment in cases:
        path = tmp_path / "sweep.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
            load_sweep(path)


def _sweep_file(tmp_path, scheduler, space=None, **fixed):
    raw = {"name": "x", "base": str(ROOT / "experiments" / "cpu_demo.yaml"),
           "set": {"eval.online_every_epochs": 1, **fixed}, "space": space or {"loss.epsilon": {"grid": [0.03, 0.05]}},
           "scheduler": scheduler}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_asha_prunes_on_online_map_by_default(tmp_path):
    from ray.tune.schedulers import TrialScheduler

    from gaelle_ray.tune import _scheduler

    spec = load_sweep(_sweep_file(tmp_path, {"type": "asha", "grace_period": 1, "reduction_factor": 2}))
    asha = _scheduler(spec)

    class Trial:  # what ASHA reads of a trial
        def __init__(self, trial_id):
            self.trial_id = trial_id

    good, bad, better = Trial("good"), Trial("bad"), Trial("better")
    for t in (good, bad, better):
        asha.on_trial_add(None, t)
    # a loss would rank "bad" first (lowest); online_map (max) stops it at the first rung
    result = {"training_iteration": 1}
    assert asha.on_trial_result(None, good, {**result, "online_map": 0.40, "loss_global": 3.0}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {**result, "online_map": 0.10, "loss_global": 1.0}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, better, {**result, "online_map": 0.55, "loss_global": 2.0}) == TrialScheduler.CONTINUE


def test_pruning_on_a_loss_across_loss_scales_warns_and_online_needs_evaluation(tmp_path, caplog):
    space = {"loss.epsilon": {"grid": [0.03, 0.05]}, "queue.queue_length": {"grid": [0, 640]},
             "optim.base_lr": {"grid": [0.3, 0.6]}}
    with caplog.at_level("WARNING", logger="gaelle_ray.tune"):
        load_sweep(_sweep_file(tmp_path, {"type": "asha", "metric": "loss_global", "mode": "min"}, space))
    warned = [r.getMessage() for r in caplog.records if "not comparable" in r.getMessage()]
    assert warned and "loss.epsilon, queue.queue_length" in warned[0] and "optim.base_lr" not in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="gaelle_ray.tune"):
        load_sweep(_sweep_file(tmp_path, {"type": "asha", "metric": "loss_global"}, {"optim.base_lr": {"grid": [0.3]}}))
    assert not [r for r in caplog.records if "not comparable" in r.getMessage()]
    with pytest.raises(ConfigError, match="scheduler.metric: online_map is measured only with online evaluation"):
        load_sweep(_sweep_file(tmp_path, {"type": "asha"}, **{"eval.online_every_epochs": 0}))


@pytest.mark.slow
def test_toy_sweep_runs_stops_collapsed_trial_and_tracks_in_mlflow(tmp_path):
    import ray

    if ray.is_initialized():
        ray.shutdown()
    shards = tmp_path / "shards"
    prepare_toy(str(shards), n_train=128, n_val=64, image_size=64, seed=0)
    raw = yaml.safe_load((ROOT / "experiments" / "sweeps" / "toy_tiny.yaml").read_text())
    raw["base"] = str(ROOT / "experiments" / "cpu_demo.yaml")
    raw["set"].update({"data.shards": str(shards), "eval.data": str(shards)})
    raw["storage"] = str(tmp_path / "sweeps")
    path = tmp_path / "toy_tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    try:
        result = run_sweep(load_sweep(path))
        again = run_sweep(load_sweep(path), resume=True)  # a finished sweep: nothing reruns
    finally:
        ray.shutdown()

    by_eps = {t["params"]["loss.epsilon"]: t for t in result.trials}
    assert set(by_eps) == {0.05, 0.1, 1000.0}  # the third trial started: placement groups came back
    assert by_eps[1000.0]["collapsed"] is True  # uniform codes at ln K: stopped after its first epoch
    # the other two are not collapsed; ASHA (grace 1 epoch) may stop one early, without an mAP
    assert by_eps[0.05]["collapsed"] is False and by_eps[0.1]["collapsed"] is False
    finished = [e for e in (0.05, 0.1) if by_eps[e]["map"] is not None]
    assert finished and all(0.0 < by_eps[e]["map"] <= 1.0 for e in finished)
    assert all(by_eps[e]["epoch"] < 2 for e in (0.05, 0.1) if e not in finished)
    best = load_config(result.best_config_path)  # ready to run
    best_eps = max(finished, key=lambda e: by_eps[e]["map"])
    assert best.loss.epsilon == best_eps and result.best_map == pytest.approx(by_eps[best_eps]["map"])
    assert again.parent_run_id == result.parent_run_id and again.best_map == pytest.approx(result.best_map)

    from mlflow.tracking import MlflowClient
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    pretrain_runs = [r for r in children if r.data.tags.get("job") == "pretrain"]
    assert len(pretrain_runs) == 3  # the resumed sweep reran nothing
    eps = sorted(float(r.data.params["loss.epsilon"]) for r in pretrain_runs)
    assert eps == [0.05, 0.1, 1000.0]
    assert any("map" in r.data.metrics for r in pretrain_runs)
    for eps in (0.05, 0.1):  # ASHA ranked them on the online k-NN mAP, reported with every epoch
        assert 0.0 < by_eps[eps]["online_map"] <= 1.0
    assert "best_map" in parent.data.metrics
