"""A wrong input fails before Ray starts: one line naming the key or option, the path and
what to do; exit code 2; no traceback; `ray.init` never called."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gaelle_ray import cli
from gaelle_ray.data.prepare import prepare_toy

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "experiments" / "cpu_demo.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("pre") / "shards"
    prepare_toy(str(path), n_train=64, n_val=8, image_size=64, seed=0)
    return str(path)


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called: the input was not checked first")

    monkeypatch.setattr(ray, "init", refuse)


def _fails(capsys, argv, *expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for text in expected:
        assert text in err, err
    return err


def _train_only(tmp_path, shards):
    """shards whose manifest lists no val images."""
    path = tmp_path / "train_only"
    prepare_toy(str(path), n_train=16, n_val=0, image_size=64, seed=0)
    return str(path)


def test_pretrain_inputs(tmp_path, shards, capsys, no_ray):
    base = ["pretrain", "--config", DEMO, "--set", f"train.run_dir={tmp_path / 'run'}", "--set", f"eval.data={shards}"]
    _fails(capsys, [*base, "--set", "data.shards=/nonexistent/shards"],
           "data.shards = '/nonexistent/shards'", "no manifest.json there", "gaelle prepare")
    _fails(capsys, [*base, "--set", f"data.shards={shards}", "--set", "data.split=test"],
           "split 'test' has no images", "train (64 images)")
    _fails(capsys, [*base, "--set", f"data.shards={shards}", "--set", "train.batch_size_per_worker=128"],
           f"data.shards = {shards!r}", "do not fill one global batch")
    _fails(capsys, [*base, "--set", f"data.shards={shards}", "--set", "eval.data=/nowhere"],
           "eval.data = '/nowhere'", "no manifest.json")
    bad_manifest = tmp_path / "bad"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.json").write_text("{not json")
    _fails(capsys, [*base, "--set", f"data.shards={bad_manifest}"], "not valid JSON")
    _fails(capsys, [*base, "--set", f"data.shards={shards}", "--set", "eval.online_every_epochs=1",
                    "--set", f"eval.data={_train_only(tmp_path, shards)}"], "split 'val' has no images")
    _fails(capsys, [*base, "--set", f"data.shards={shards}", "--set", "train.init_from=/no/such.pth"],
           "train.init_from")
    _fails(capsys, [*base, "--set", f"data.shards={shards}", "--set", "train.run_dir=s3:///"],
           "train.run_dir = 's3:///'")


def test_pretrain_resume_of_a_foreign_folder(tmp_path, shards, capsys, no_ray):
    run = tmp_path / "run"
    (run / "train" / "epoch_00000").mkdir(parents=True)  # a crash before meta.json: not a checkpoint
    argv = ["pretrain", "--config", DEMO, "--set", f"train.run_dir={run}", "--set", "data.shards=/nope"]
    _fails(capsys, [*argv, "--resume"], "data.shards = '/nope'")


def test_evaluation_inputs(tmp_path, shards, capsys, no_ray):
    train_only = _train_only(tmp_path, shards)
    for command in (["linear-eval", "--fast"], ["semisup", "--percent", "10"]):
        _fails(capsys, [*command, "--checkpoint", str(tmp_path / "missing"), "--dataset", "toy", "--data", shards],
               f"--checkpoint {tmp_path / 'missing'}: no such file or folder")
        empty = tmp_path / "empty_run"
        empty.mkdir(exist_ok=True)
        _fails(capsys, [*command, "--checkpoint", str(empty), "--dataset", "toy", "--data", shards],
               "no gaelle checkpoint here")
        _fails(capsys, [*command, "--checkpoint", "random", "--dataset", "toy", "--data", "/no/shards"],
               "--data = '/no/shards'", "no manifest.json")
        _fails(capsys, [*command, "--checkpoint", "random", "--dataset", "toy", "--data", train_only],
               "split 'val' has no images")


def test_show_attention_inputs(tmp_path, capsys):
    _fails(capsys, ["show-attention", "--checkpoint", str(tmp_path / "nope"), "--images", "x.jpg", "--out", "o"],
           "--checkpoint", "no such file or folder")
    run = tmp_path / "run"
    run.mkdir()
    _fails(capsys, ["show-attention", "--checkpoint", str(run), "--images", "x.jpg", "--out", "o"],
           "no gaelle checkpoint here")


def test_sweep_inputs(tmp_path, capsys, no_ray):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({"name": "s", "base": DEMO, "set": {"data.shards": "/missing/shards"},
                                 "space": {"loss.epsilon": {"grid": [0.05]}}}))
    _fails(capsys, ["sweep", "--config", str(sweep)], "data.shards = '/missing/shards'", "no manifest.json")


def test_the_console_sees_one_line_and_no_ray(tmp_path):
    """As a user runs it: exit 2, one line on stderr, nothing on stdout, no Ray started."""
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.run([str(Path(sys.executable).parent / "gaelle"), "pretrain", "--config", DEMO,
                           "--set", "data.shards=/nonexistent", "--set", f"train.run_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "gaelle pretrain: error: data.shards = '/nonexistent': no manifest.json there (no shards, or their "
        "prepare did not finish); make shards with `gaelle prepare {coco,voc,folder,toy} --out DIR` and point "
        "data.shards at DIR"]
    assert not (tmp_path / "run").exists()  # nothing written either


def test_a_shard_deleted_after_prepare_is_named_before_ray_starts(tmp_path, capsys, no_ray):
    import shutil

    from gaelle_ray.config import load_config
    from gaelle_ray.preflight import check_pretrain_inputs

    src = tmp_path / "src"
    prepare_toy(str(src), n_train=64, n_val=8, image_size=64, seed=0, shard_size=16)  # 4 train shards
    copy = tmp_path / "shards"
    shutil.copytree(src, copy)
    gone = copy / "train" / "part-00002.parquet"
    gone.unlink()
    base = ["pretrain", "--config", DEMO, "--set", f"train.run_dir={tmp_path / 'run'}", "--set", f"data.shards={copy}"]
    _fails(capsys, base, f"shard {gone} of split 'train' is missing", "data.bad_shard_action=skip")
    assert not (tmp_path / "run").exists()
    # with skip, the stream leaves it out itself: the check lets the run start
    config = load_config(DEMO, [f"data.shards={copy}", "data.bad_shard_action=skip", "train.num_workers=1",
                                "train.batch_size_per_worker=8", f"train.run_dir={tmp_path / 'run'}",
                                "eval.online_every_epochs=0"])
    check_pretrain_inputs(config)
