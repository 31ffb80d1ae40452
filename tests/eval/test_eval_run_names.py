"""The demo's two probes are told apart by their MLflow run names: the pretrained checkpoint
by its pretraining run and epoch, the baseline as random init (fast probes, sqlite store)."""

import json

import torch

from gaelle_ray.eval.linear import run_linear_eval
from gaelle_ray.model import build_model
from gaelle_ray.storage import checkpoint_name, save_checkpoint


def test_probe_run_names_checkpoint_vs_random_init(toy_shards, tmp_path, make_config):
    from mlflow.tracking import MlflowClient

    from gaelle_ray import tracking

    torch.manual_seed(0)
    pre_config = make_config(toy_shards)
    run_dir = tmp_path / "run"
    folder = run_dir / "train" / checkpoint_name(3)
    save_checkpoint(folder, {"worker": {"model": build_model(pre_config).state_dict()}},
                    {"epoch": 3, "config": pre_config.to_dict()})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(toy_shards).replace({"tracking.tracking_uri": uri, "tracking.experiment": "names"})
    tracking.check_reachable(uri)
    pretrain_run = tracking.start_run(uri, "names", "cpu_demo optim.base_lr=0.3", {}, {"job": "pretrain"})
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": pretrain_run}))

    kwargs = dict(fast=True, allow_overlap=True, cache_dir=tmp_path / "cache")
    pretrained = run_linear_eval(str(folder), "toy", toy_shards, config, **kwargs)
    random = run_linear_eval("random", "toy", toy_shards, config, parent_run_id=pretrain_run, **kwargs)

    client = MlflowClient(uri)
    names = {out["checkpoint_kind"]: client.get_run(out["run_id"]).info.run_name for out in (pretrained, random)}
    assert names == {"folder": "linear-eval fast toy: cpu_demo optim.base_lr=0.3/epoch_00003",
                     "random": "linear-eval fast toy: random init resnet18"}
    assert client.get_run(random["run_id"]).data.tags["mlflow.parentRunId"] == pretrain_run
