"""The config tree: every experiment YAML validates, and every kind of bad value is refused
with a message naming the file and the key."""

from pathlib import Path

import pytest
import yaml

from gaelle_ray.config import Config, ConfigError, dump_yaml, load_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_yaml_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)


def test_headline_configs_hold_the_paper_hyperparameters():
    for name in ("coco2014_400ep.yaml", "coco2017_400ep.yaml"):
        c = load_config(ROOT / "experiments" / name)
        assert c.train.num_workers == 2 and c.train.batch_size_per_worker == 64
        assert c.augmentation.size_crops == (224, 96) and c.augmentation.nmb_crops == (2, 6)
        assert c.augmentation.min_scale_crops == (0.14, 0.05) and c.augmentation.max_scale_crops == (1.0, 0.14)
        assert (c.optim.base_lr, c.optim.final_lr, c.optim.warmup_epochs) == (0.6, 0.0006, 0)
        assert c.train.epochs == 400
        assert (c.queue.queue_length, c.queue.epoch_queue_starts, c.queue.local_queue_length) == (3840, 7, 0)
        assert c.model.nmb_groups_heads == 4 and c.num_slots == 32
        assert c.optim.freeze_prototypes_niters == 5005
        assert c.train.precision == "bf16" and c.model.arch == "resnet50"
        assert (c.loss.epsilon, c.loss.temperature, c.model.nmb_prototypes) == (0.05, 0.1, 3000)


def test_cpu_config_is_small():
    c = load_config(ROOT / "experiments" / "cpu_demo.yaml")
    assert c.model.arch == "resnet18" and max(c.augmentation.size_crops) <= 128
    assert c.train.use_gpu is False and c.train.precision == "fp32"


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


BAD = [
    ({"optim": {"bse_lr": 0.1}}, ["optim.bse_lr", "did you mean 'optim.base_lr'"]),
    ({"optimisation": {}}, ["optimisation", "unknown section", "did you mean 'optim'"]),
    ({"optim": {"base_lr": "fast"}}, ["optim.base_lr", "expected a number"]),
    ({"train": {"epochs": 2.5}}, ["train.epochs", "expected an integer"]),
    ({"train": {"compile": "yes"}}, ["train.compile", "true or false"]),
    ({"augmentation": {"nmb_crops": [2, 6, 1]}}, ["augmentation.size_crops", "same length"]),
    ({"augmentation": {"min_scale_crops": [0.14]}}, ["same length"]),
    ({"model": {"feat_dim": 128, "nmb_groups_heads": 5}}, ["model.nmb_groups_heads", "not divisible"]),
    ({"loss": {"crops_for_assign": [0, 2]}}, ["loss.crops_for_assign", "out of range"]),
    ({"queue": {"queue_length": 100}}, ["queue.queue_length", "shorter than the global batch"]),
    ({"train": {"batch_size_per_worker": 0}}, ["train.batch_size_per_worker", "> 0"]),
    ({"augmentation": {"size_crops": [224, -96]}}, ["augmentation.size_crops", "> 0"]),
    ({"loss": {"epsilon": 0}}, ["loss.epsilon", "> 0"]),
    ({"loss": {"epsilon": -0.1}}, ["loss.epsilon"]),
    ({"optim": {"final_lr": 1.0}}, ["optim.final_lr", "larger than optim.base_lr"]),
    ({"augmentation": {"min_scale_crops": [0.5, 0.2], "max_scale_crops": [0.4, 0.3]}}, ["min_scale_crops"]),
    ({"augmentation": {"blur_p": 1.5}}, ["augmentation.blur_p", "probability"]),
    ({"model": {"arch": "resnet51"}}, ["model.arch", "resnet50"]),
    ({"train": {"precision": "fp8"}}, ["train.precision"]),
    ({"augmentation": {"ratio": [1.0]}}, ["augmentation.ratio", "list of 2"]),
    ({"augmentation": {"nmb_crops": [1, 6]}}, ["augmentation.nmb_crops", "2 global crops"]),
    ({"queue": {"local_queue_length": 10}}, ["queue.local_queue_length"]),
]


@pytest.mark.parametrize("data,fragments", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configs_name_file_and_key(tmp_path, data, fragments):
    path = _write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_overrides_apply_and_are_validated(tmp_path):
    path = _write(tmp_path, {"optim": {"base_lr": 0.6}})
    c = load_config(path, ["optim.base_lr=0.3", "augmentation.size_crops=[64, 32]", "loss.l2g_detach=false",
                           "loss.epsilon=3e-2"])
    assert c.loss.epsilon == 0.03  # YAML reads 3e-2 as a string; a float field accepts it
    assert c.optim.base_lr == 0.3 and c.augmentation.size_crops == (64, 32) and c.loss.l2g_detach is False
    with pytest.raises(ConfigError, match="optim.base_lrr"):
        load_config(path, ["optim.base_lrr=0.3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["optim.base_lr"])
    with pytest.raises(ConfigError, match="optim.final_lr"):
        load_config(path, ["optim.base_lr=0.0001"])


def test_malformed_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("optim: {base_lr: [0.1\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_dump_roundtrip_and_dict_boundary(tmp_path):
    c = load_config(ROOT / "experiments" / "cpu_demo.yaml", ["queue.queue_length=128"])
    again = load_config(_write(tmp_path, yaml.safe_load(dump_yaml(c))))
    assert again == c
    assert Config.from_dict(c.to_dict()) == c
    flat = c.flat()
    assert flat["queue.queue_length"] == 128
    assert flat["augmentation.size_crops"] == list(c.augmentation.size_crops)  # a list, not a tuple
    assert c.replace({"optim.base_lr": 0.1}).optim.base_lr == 0.1


def test_relative_paths_mean_the_directory_the_command_runs_in(tmp_path, monkeypatch, capsys):
    """Ray workers run in Ray's session directory, so a relative path in a config, a --set or
    an evaluation config is made absolute once, on the driver, against the current directory."""
    from gaelle_ray.cli import main
    from gaelle_ray.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    config = load_config(ROOT / "experiments" / "cpu_demo.yaml", ["eval.online_data=other/shards"])
    assert config.data.shards == str(tmp_path / "runs" / "toy" / "shards")  # from the file
    assert config.eval.data == str(tmp_path / "runs" / "toy" / "shards")
    assert config.train.run_dir == str(tmp_path / "runs" / "cpu_demo")
    assert config.eval.online_data == str(tmp_path / "other" / "shards")  # from the override
    remote = load_config(ROOT / "experiments" / "coco2017_400ep.yaml")
    assert remote.data.shards == "s3://bucket/coco2017" and remote.ray.storage_path == ""  # URIs, empties kept
    assert with_absolute_paths(config) == config  # once absolute, unchanged
    assert main(["config", "show", "--config", str(ROOT / "experiments" / "cpu_demo.yaml"),
                 "--set", "train.run_dir=runs/x"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["train"]["run_dir"] == str(tmp_path / "runs" / "x")
    assert shown["data"]["shards"] == str(tmp_path / "runs" / "toy" / "shards")
