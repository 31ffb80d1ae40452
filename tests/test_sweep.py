"""Sweep files: validation, the search space, the ASHA metric. The toy sweep itself runs end
to end, through the CLI as the README writes it, in tests/test_readme_commands.py."""

from pathlib import Path

import pytest
import yaml

from gaelle_ray.config import ConfigError
from gaelle_ray.tune import load_sweep, param_space

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


def test_a_sweep_with_a_failed_trial_exits_non_zero_and_says_how_to_rerun_it(monkeypatch, capsys):
    """The best of the finished trials is reported, but `ray job submit` and shell scripts
    must see that the sweep is incomplete."""
    import gaelle_ray.preflight as preflight
    import gaelle_ray.tune as sweep
    from gaelle_ray import cli

    trials = [{"params": {"optim.base_lr": 0.3}, "map": 0.41, "collapsed": False, "error": None},
              {"params": {"optim.base_lr": 0.6}, "map": None, "collapsed": None, "error": "WorkerGroupError: boom"}]
    monkeypatch.setattr(preflight, "check_pretrain_inputs", lambda *a, **k: None)
    monkeypatch.setattr(preflight, "check_location", lambda *a, **k: None)
    result = sweep.SweepResult("best.yaml", 0.41, trials, "parent", "sqlite:///x.db")
    monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: result)
    monkeypatch.setattr(sweep.tracking, "ui_hint", lambda *a, **k: "the MLflow link")
    config = str(ROOT / "experiments" / "sweeps" / "toy_tiny.yaml")
    assert cli.main(["sweep", "--config", config]) == 1
    out, err = capsys.readouterr()
    assert "error: WorkerGroupError: boom" in out and "mAP 0.4100" in out
    assert err.strip() == (f"gaelle sweep: 1 of 2 trials failed (above); `gaelle sweep --config {config} --resume` "
                           "runs them again")
    trials.pop()
    assert cli.main(["sweep", "--config", config]) == 0
