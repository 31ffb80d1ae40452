"""Strict loading, the released-script importer and the torchvision exporter."""


import pytest
import torch
import torchvision

from gaelle_ray.model.gaelle import GaelleModel
from gaelle_ray.model.weights import (
    backbone_state, export_backbone, import_released_checkpoint, infer_model_sizes, load_state_strict,
)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden_mlp=64, feat_dim=32, nmb_prototypes=20, nmb_local_prototypes=12, nmb_groups_heads=4)
    args.update(kw)
    return GaelleModel("resnet18", **args).eval()


def _released_state(model):
    """What the authors' script saves: DDP `module.` prefix, backbone at top level."""
    out = {}
    for key, value in model.state_dict().items():
        name = key[len("backbone."):] if key.startswith("backbone.") else key
        out["module." + name] = value.clone()
    return out


def test_released_checkpoint_imports_strictly(tmp_path):
    src = _model(seed=1)
    state = _released_state(src)
    assert "module.conv1.weight" in state and "module.projection_head.1.running_mean" in state
    assert "module.layer4.1.bn2.num_batches_tracked" in state
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 400, "state_dict": state, "optimizer": {}, "scaler": {}}, path)

    imported = import_released_checkpoint(path)
    assert imported["epoch"] == 400
    assert infer_model_sizes(imported["model"]) == {"hidden_mlp": 64, "nmb_prototypes": 20, "feat_dim": 32,
                                                    "nmb_local_prototypes": 12}
    dst = _model(seed=2)
    load_state_strict(dst, imported["model"], str(path))
    crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        a, b = src(crops), dst(crops)
    torch.testing.assert_close(a.scores, b.scores)
    torch.testing.assert_close(a.l2g_scores, b.l2g_scores)


def test_strict_load_lists_missing_and_unexpected_keys(tmp_path):
    model = _model()
    state = model.state_dict()
    swav_like = {k: v for k, v in state.items() if not k.startswith(("local_", "l2g_"))}
    swav_like["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        load_state_strict(model, swav_like, "swav.pth")
    msg = str(err.value)
    assert "swav.pth" in msg and "missing keys" in msg and "local_prototypes.weight" in msg
    assert "unexpected keys (1): extra.weight" in msg

    other = _model(nmb_prototypes=30).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatches.*prototypes.weight \(30, 32\) vs model \(20, 32\)"):
        load_state_strict(model, other, "other.pth")

    # a prefix mismatch is a loud error, never a silent no-op
    prefixed = {"module." + k: v for k, v in state.items()}
    with pytest.raises(ValueError, match="missing keys"):
        load_state_strict(model, prefixed, "ddp.pth")


def test_importer_refuses_classifier_and_bad_files(tmp_path):
    bad = tmp_path / "classifier.pth"
    torch.save({"state_dict": {"module.fc.weight": torch.zeros(2, 2)}}, bad)
    with pytest.raises(ValueError, match="classifier"):
        import_released_checkpoint(bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth: cannot read checkpoint"):
        import_released_checkpoint(junk)
    with pytest.raises(ValueError, match="not found"):
        import_released_checkpoint(tmp_path / "missing.pth")


def test_exported_backbone_loads_into_plain_torchvision_strictly():
    model = _model(seed=3)
    exported = export_backbone(model)
    plain = torchvision.models.resnet18()
    plain.load_state_dict(exported, strict=True)
    plain.fc = torch.nn.Identity()
    plain.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.backbone(x))
    assert set(backbone_state(model.state_dict())) | {"fc.weight", "fc.bias"} == set(exported)


def test_exported_resnet50_loads_into_torchvision_resnet50():
    torch.manual_seed(0)
    model = GaelleModel("resnet50", hidden_mlp=64, feat_dim=32, nmb_prototypes=10, nmb_local_prototypes=10)
    torchvision.models.resnet50().load_state_dict(export_backbone(model), strict=True)
