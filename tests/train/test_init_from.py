"""`train.init_from`: a new run starts from existing weights with a fresh optimiser and
schedule; checked on the driver before Ray starts; ignored on resume."""

from pathlib import Path

import pytest
import torch

from gaelle_ray.config import ConfigError, load_config
from gaelle_ray.model import build_model
from gaelle_ray.storage import checkpoint_name, save_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "experiments" / "cpu_demo.yaml"
SMALL = {"model.hidden_mlp": 32, "model.feat_dim": 16, "model.nmb_prototypes": 12, "model.nmb_local_prototypes": 10,
         "model.nmb_groups_heads": 4, "queue.queue_length": 0, "train.num_workers": 1, "train.use_gpu": "false",
         "augmentation.colour_on_device": "false", "eval.online_every_epochs": 0}


def _config(tmp_path, **overrides):
    values = {**SMALL, "train.run_dir": str(tmp_path / "new_run"), **overrides}
    return load_config(CPU, [f"{k}={v}" for k, v in values.items()])


def _model(config, seed):
    torch.manual_seed(seed)
    return build_model(config)


def _save_epoch(run_dir, epoch, model, config):
    folder = Path(run_dir) / "train" / checkpoint_name(epoch)
    momentum = {0: {"momentum_buffer": torch.ones(3)}}  # an optimiser state that must NOT be taken
    save_checkpoint(folder, {"worker": {"model": model.state_dict(), "optimizer": {"state": momentum, "param_groups": []},
                                        "iteration": 999}, "queues": {}, "history": []},
                    {"epoch": epoch, "iteration": 999, "world_size": 1, "config": config.to_dict()})
    return folder


def _released_file(path, model):
    """The authors' checkpoint layout (method.md section 9): `module.` prefix, no `backbone.`."""
    state = {"module." + (k[len("backbone."):] if k.startswith("backbone.") else k): v.clone()
             for k, v in model.state_dict().items()}
    torch.save({"epoch": 100, "state_dict": state, "optimizer": {}}, path)
    return path


class _Context:
    def get_world_rank(self):
        return 0

    def get_world_size(self):
        return 1


@pytest.fixture
def worker_of(monkeypatch):
    """set_up_worker, the function every Ray Train worker runs, outside Ray: one worker,
    no data to count; `checkpoint` is what Ray would hand over (None: a new run)."""
    from gaelle_ray.train import loop

    threads = torch.get_num_threads()
    lines = []
    monkeypatch.setattr(loop.ray.train, "get_context", lambda: _Context())
    monkeypatch.setattr(loop, "count_rows", lambda config: 64)
    monkeypatch.setattr(loop, "write_progress_line", lines.append)

    def make(config, checkpoint=None):
        monkeypatch.setattr(loop.ray.train, "get_checkpoint", lambda: checkpoint)
        try:
            return loop.set_up_worker(config), lines
        finally:
            torch.set_num_threads(threads)

    return make


def _assert_same_weights(model, source):
    got, want = model.state_dict(), source.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("kind", ["checkpoint folder", "run folder", "imported folder", "released file"])
def test_worker_starts_from_init_from_with_a_fresh_optimiser(tmp_path, worker_of, kind):
    base = _config(tmp_path)
    source = _model(base, seed=11)
    old_run = tmp_path / "old_run"
    if kind == "checkpoint folder":
        path = _save_epoch(old_run, 3, source, base)
    elif kind == "run folder":
        _save_epoch(old_run, 1, _model(base, seed=12), base)
        _save_epoch(old_run, 4, source, base)  # the newest is taken
        path = old_run
    else:
        from gaelle_ray.cli import main

        path = _released_file(tmp_path / "release.pth", source)
        if kind == "imported folder":
            assert main(["import-released", str(path), "--heads", "4", "--out", str(tmp_path / "imported")]) == 0
            path = tmp_path / "imported"
    config = _config(tmp_path, **{"train.init_from": str(path)})
    torch.manual_seed(0)
    assert not torch.equal(build_model(config).prototypes.weight, source.prototypes.weight)  # a random init differs

    worker, lines = worker_of(config)
    _assert_same_weights(worker.stepper.model, source)
    assert worker.stepper.iteration == 0 and worker.stepper.optimizer.state_dict()["state"] == {}
    assert any(line.startswith("initialised from") and "iteration 0" in line for line in lines)

    from gaelle_ray.train.init_from import check_init_from

    check_init_from(config)  # the driver's check accepts it too


def test_resume_wins_over_init_from(tmp_path, worker_of):
    base = _config(tmp_path)
    source = _model(base, seed=11)
    config = _config(tmp_path, **{"train.init_from": str(_save_epoch(tmp_path / "old_run", 3, source, base))})
    worker, lines = worker_of(config, checkpoint=object())  # Ray hands over the run's own checkpoint
    assert not torch.equal(worker.stepper.model.prototypes.weight, source.prototypes.weight)
    assert any("ignored: resuming" in line for line in lines)


def test_mismatching_weights_name_the_file_and_keys(tmp_path):
    from gaelle_ray.train.init_from import check_init_from

    base = _config(tmp_path)
    bigger = _config(tmp_path, **{"model.nmb_prototypes": 30})
    folder = _save_epoch(tmp_path / "old_run", 2, _model(bigger, seed=1), bigger)
    with pytest.raises(ValueError) as err:
        check_init_from(_config(tmp_path, **{"train.init_from": str(folder)}))
    msg = str(err.value)
    assert "train.init_from" in msg and f"{folder}/state.pt" in msg
    assert "prototypes.weight (30, 16) vs model (12, 16)" in msg and "l2g_prototypes.weight" in msg
    # same shapes, other head groups: the strict load would pass, the attention would not be the same
    h8 = _config(tmp_path, **{"model.nmb_groups_heads": 8})
    folder = _save_epoch(tmp_path / "h8_run", 2, _model(h8, seed=1), h8)
    with pytest.raises(ValueError, match="nmb_groups_heads = 8"):
        check_init_from(_config(tmp_path, **{"train.init_from": str(folder)}))
    del base


class _RayStarted(Exception):
    pass


def test_a_missing_init_from_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    from gaelle_ray.cli import main
    from gaelle_ray.train import trainer

    def no_ray(*args, **kwargs):
        raise _RayStarted

    monkeypatch.setattr(trainer, "init_ray", no_ray)
    monkeypatch.setattr(trainer, "check_pretrain_inputs", lambda *a, **k: None)  # no shards here (tests/test_preflight.py)
    missing = tmp_path / "nowhere" / "epoch_00009"
    config = _config(tmp_path, **{"train.init_from": str(missing)})
    with pytest.raises(ValueError, match=f"train.init_from = '{missing}': no such file or folder"):
        trainer.pretrain(config, track=False)
    # through the command line: exit 2, one line naming the key and the path
    assert main(["pretrain", "--config", str(CPU), "--cpu", "--set", f"train.run_dir={tmp_path / 'cli_run'}",
                 "--set", "eval.online_every_epochs=0", "--set", f"train.init_from={missing}"]) == 2
    err = capsys.readouterr().err
    assert "train.init_from" in err and str(missing) in err

    # a resumed run ignores init_from: it gets as far as starting Ray
    _save_epoch(config.train.run_dir, 0, _model(config, seed=0), config)
    with pytest.raises(_RayStarted):
        trainer.pretrain(config, resume=True, track=False)


def test_config_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config(CPU).train.init_from == ""
    assert load_config(CPU, ["train.init_from=runs/old/train"]).train.init_from == str(tmp_path / "runs/old/train")
    assert load_config(CPU, ["train.init_from=s3://bucket/x.pth"]).train.init_from == "s3://bucket/x.pth"
    assert load_config(CPU, ["train.init_from=null"]).train.init_from == ""
    with pytest.raises(ConfigError, match="train.init_from: expected a string"):
        load_config(CPU, ["train.init_from=3"])
