"""Every kind of checkpoint loads every backbone key, or fails naming the keys."""

import json

import pytest
import torch
import torchvision

from gaelle_ray.eval.checkpoints import (
    infer_arch, load_backbone, load_backbone_info, pretraining_data_of, pretraining_manifest_of,
    pretraining_run_id_of, resolve_checkpoint,
)
from gaelle_ray.model import build_model
from gaelle_ray.model.weights import export_backbone
from gaelle_ray.storage import checkpoint_name, save_checkpoint


@pytest.fixture
def model(make_config):
    torch.manual_seed(7)
    return build_model(make_config("/data/pretrain-shards", split="train2017")).eval()


def _same_backbone(loaded, model):
    want = model.backbone.state_dict()
    got = loaded.state_dict()
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _folder(tmp_path, model, config):
    run_dir = tmp_path / "run"
    folder = run_dir / "train" / checkpoint_name(3)
    save_checkpoint(folder, {"worker": {"model": model.state_dict()}, "queues": {}, "history": []},
                    {"epoch": 3, "iteration": 30, "world_size": 1, "config": config.to_dict()})
    return run_dir, folder


def test_checkpoint_folder(tmp_path, model, make_config):
    run_dir, folder = _folder(tmp_path, model, make_config("/data/pretrain-shards", split="train2017"))
    backbone, info = load_backbone_info(folder)
    _same_backbone(backbone, model)
    assert info == {"kind": "folder", "arch": "resnet18", "source": str(folder), "epoch": 3}
    assert backbone.num_features == 512
    assert pretraining_manifest_of(folder) == "/data/pretrain-shards"
    assert pretraining_data_of(folder)["split"] == "train2017"
    assert pretraining_run_id_of(folder) is None
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": "abc123"}))
    assert pretraining_run_id_of(folder) == "abc123"
    with pytest.raises(ValueError, match="model.arch = 'resnet18'"):
        load_backbone(folder, "resnet50")


def test_a_run_folder_means_its_newest_checkpoint(tmp_path, model, make_config):
    run_dir, folder = _folder(tmp_path, model, make_config("/data/pretrain-shards"))
    older = run_dir / "train" / checkpoint_name(2)
    save_checkpoint(older, {"worker": {"model": model.state_dict()}, "queues": {}, "history": []},
                    {"epoch": 2, "iteration": 20, "world_size": 1, "config": {}})
    assert resolve_checkpoint(str(run_dir)) == str(folder) == resolve_checkpoint(str(run_dir / "train"))
    assert resolve_checkpoint(str(folder)) == str(folder)
    assert resolve_checkpoint("random") == "random" and resolve_checkpoint("s3://b/run") == "s3://b/run"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no gaelle checkpoint here"):
        resolve_checkpoint(str(tmp_path / "empty"))


def test_torchvision_export(tmp_path, model):
    path = tmp_path / "backbone_resnet18.pth"
    torch.save(export_backbone(model), path)
    backbone, info = load_backbone_info(path)
    _same_backbone(backbone, model)
    assert info["kind"] == "torchvision" and info["arch"] == "resnet18"
    assert pretraining_manifest_of(path) is None and pretraining_run_id_of(path) is None
    # a plain torchvision model's state dict (1000-way fc) loads too
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "tv.pth")
    loaded = load_backbone(tmp_path / "tv.pth", "resnet18")
    assert torch.equal(loaded.conv1.weight, net.conv1.weight)


def test_released_checkpoint(tmp_path, model):
    state = {}
    for key, value in model.state_dict().items():
        name = key[len("backbone."):] if key.startswith("backbone.") else key
        state["module." + name] = value.clone()
    path = tmp_path / "gaelle_release.pth.tar"
    torch.save({"epoch": 400, "state_dict": state, "optimizer": {}}, path)
    backbone, info = load_backbone_info(path)
    _same_backbone(backbone, model)
    assert info["kind"] == "released" and info["epoch"] == 400
    # SwAV's releases are the bare state dict, backbone + projection_head + prototypes
    swav = {k: v for k, v in state.items() if not k.startswith(("module.local", "module.l2g"))}
    torch.save(swav, tmp_path / "swav.pth.tar")
    _same_backbone(load_backbone(tmp_path / "swav.pth.tar"), model)


def test_random_backbone():
    torch.manual_seed(0)
    a = load_backbone("random", "resnet18")
    assert a.num_features == 512 and isinstance(a.fc, torch.nn.Identity)
    with pytest.raises(ValueError, match="needs an arch"):
        load_backbone("random")


def test_wrong_checkpoints_fail_naming_keys(tmp_path, model):
    good = export_backbone(model)
    # prefix mismatch: nothing would load with strict=False; here it is an error
    torch.save({"encoder." + k: v for k, v in good.items()}, tmp_path / "prefixed.pth")
    with pytest.raises(ValueError, match=r"missing keys .*conv1\.weight.*unexpected keys .*encoder\.conv1\.weight"):
        load_backbone(tmp_path / "prefixed.pth", "resnet18")
    # one key missing
    partial = dict(good)
    del partial["layer4.1.bn2.running_var"]
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"partial\.pth.*missing keys \(1\): layer4\.1\.bn2\.running_var"):
        load_backbone(tmp_path / "partial.pth")
    # wrong arch asked for
    with pytest.raises(ValueError, match="missing keys"):
        load_backbone(tmp_path / "partial.pth", "resnet34")
    # a classifier checkpoint with module. prefix is not a pretraining checkpoint
    torch.save({"module." + k: v for k, v in good.items()}, tmp_path / "ddp_classifier.pth")
    with pytest.raises(ValueError, match="classifier layer"):
        load_backbone(tmp_path / "ddp_classifier.pth")
    # not a checkpoint at all
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="junk.pth"):
        load_backbone(tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="not found"):
        load_backbone(tmp_path / "missing.pth")
    # an incomplete checkpoint folder
    (tmp_path / "empty_folder").mkdir()
    with pytest.raises(ValueError, match="not a complete gaelle checkpoint"):
        load_backbone(tmp_path / "empty_folder")


def test_infer_arch():
    assert infer_arch(torchvision.models.resnet34().state_dict()) == "resnet34"
    assert infer_arch(torchvision.models.resnet50().state_dict()) == "resnet50"
    with pytest.raises(ValueError, match="pass arch explicitly"):
        infer_arch({"conv1.weight": torch.zeros(1)})
