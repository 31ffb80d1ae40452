"""`gaelle import-released` (released .pth -> checkpoint folder), the head-group checks, and
the refusal of the released script's per-crop input layout."""

import argparse

import pytest
import torch

from gaelle_ray.cli import main
from gaelle_ray.config import AugmentationConfig
from gaelle_ray.model.gaelle import GaelleModel


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(hidden_mlp=64, feat_dim=32, nmb_prototypes=20, nmb_local_prototypes=12, nmb_groups_heads=4)
    args.update(kw)
    return GaelleModel("resnet18", **args).eval()


def released_file(path, model, epoch=400, **extra):
    """What the authors' script saves (method.md section 9): DDP `module.` prefix, the backbone
    at top level, under "state_dict", with the epoch and the optimiser."""
    state = {}
    for key, value in model.state_dict().items():
        name = key[len("backbone."):] if key.startswith("backbone.") else key
        state["module." + name] = value.clone()
    torch.save({"epoch": epoch, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}, **extra}, path)
    return path


def _same_state(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_import_released_then_every_loader_reads_the_folder(tmp_path, capsys):
    from gaelle_ray.cli import _eval_config
    from gaelle_ray.eval.checkpoints import load_backbone_info, pretraining_data_of, read_meta
    from gaelle_ray.viz import load_model_for_attention

    src = _model(seed=1)
    path = released_file(tmp_path / "gaelle_release.pth.tar", src)
    out = tmp_path / "imported"
    assert main(["import-released", str(path), "--heads", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "next: gaelle linear-eval --checkpoint" in printed

    meta = read_meta(out)  # the folder format `gaelle pretrain` writes
    model_cfg = meta["config"]["model"]
    assert model_cfg["arch"] == "resnet18" and model_cfg["nmb_groups_heads"] == 4
    assert (model_cfg["hidden_mlp"], model_cfg["feat_dim"], model_cfg["nmb_prototypes"],
            model_cfg["nmb_local_prototypes"]) == (64, 32, 20, 12)  # read from the weights
    assert meta["epoch"] == 400 and meta["imported"]["source"] == str(path)
    assert pretraining_data_of(out) is None  # a released file's pretraining data is unknown

    # linear-eval / semisup: the backbone, strictly, and their config from meta.json
    backbone, info = load_backbone_info(out)
    assert info["kind"] == "folder" and info["arch"] == "resnet18" and info["epoch"] == 400
    _same_state(backbone.state_dict(), {k[9:]: v for k, v in src.state_dict().items() if k.startswith("backbone.")})
    config = _eval_config(argparse.Namespace(config=None, checkpoint=str(out), dataset="toy", overrides=[]))
    assert config.model.arch == "resnet18" and config.model.feat_dim == 32

    # show-attention: the whole model, rebuilt from meta.json
    model, description = load_model_for_attention(out)
    assert model.n_groups == 4 and "epoch 400" in description
    _same_state(model.state_dict(), src.state_dict())

    # an explicit --arch that agrees is accepted
    assert main(["import-released", str(path), "--heads", "8", "--arch", "resnet18", "--out",
                 str(tmp_path / "h8")]) == 0
    assert read_meta(tmp_path / "h8")["config"]["model"]["nmb_groups_heads"] == 8


def _refused(capsys, argv, *fragments):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err  # one line
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_heads_contradicting_the_weights_are_refused(tmp_path, capsys):
    path = released_file(tmp_path / "d32.pth", _model(seed=2))  # d = 32, C = 512
    out = tmp_path / "out"
    _refused(capsys, ["import-released", str(path), "--heads", "3", "--out", str(out)],
             "gaelle import-released: error:", str(path), "--heads = 3", "feat_dim d = 32",
             "possible values: 1, 2, 4, 8, 16, 32")
    _refused(capsys, ["import-released", str(path), "--heads", "0", "--out", str(out)], str(path), "--heads = 0")
    assert not out.exists()  # nothing written when refused

    # d = 48 is divisible by 3, the 512 backbone channels are not
    wide_d = released_file(tmp_path / "d48.pth", _model(seed=3, feat_dim=48))
    _refused(capsys, ["import-released", str(wide_d), "--heads", "3", "--out", str(out)],
             str(wide_d), "--heads = 3", "backbone width C = 512", "possible values: 1, 2, 4, 8, 16")
    assert not out.exists()

    # a file that saves its training arguments tells H itself
    with_args = released_file(tmp_path / "args.pth", _model(seed=4),
                              args=argparse.Namespace(nmb_groups_heads=8, arch="resnet18"))
    _refused(capsys, ["import-released", str(with_args), "--heads", "4", "--out", str(out)],
             str(with_args), "--heads = 4", "nmb_groups_heads = 8")
    assert main(["import-released", str(with_args), "--heads", "8", "--out", str(out)]) == 0


def test_import_released_other_refusals(tmp_path, capsys):
    model = _model(seed=5)
    path = released_file(tmp_path / "r.pth", model)
    _refused(capsys, ["import-released", str(path), "--heads", "4", "--arch", "resnet50", "--out",
                      str(tmp_path / "o")], str(path), "--arch resnet50", "resnet18")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    _refused(capsys, ["import-released", str(path), "--heads", "4", "--out", str(busy)], str(busy), "not an empty")
    swav = tmp_path / "swav.pth"
    state = {k: v for k, v in torch.load(path)["state_dict"].items() if not k.startswith(("module.local", "module.l2g"))}
    torch.save({"epoch": 800, "state_dict": state}, swav)
    _refused(capsys, ["import-released", str(swav), "--heads", "4", "--out", str(tmp_path / "o")],
             str(swav), "not a GAELLE checkpoint", "local_prototypes.weight")
    _refused(capsys, ["import-released", str(tmp_path / "missing.pth"), "--heads", "4", "--out",
                      str(tmp_path / "o")], "missing.pth", "not found")


def test_forward_refuses_the_released_per_crop_layout():
    model = _model(seed=6).train()
    b = 2
    per_crop = [torch.randn(b, 3, 64, 64) for _ in range(2)] + [torch.randn(b, 3, 32, 32) for _ in range(6)]
    with pytest.raises(ValueError, match=r"8 tensors and crops\[0\] and crops\[1\] are both 64x64 px: that is the "
                                         r"released script's per-crop layout.*one tensor per resolution"):
        model(per_crop)
    # SwAV-style global crops only, also one tensor per crop
    with pytest.raises(ValueError, match="per-crop layout"):
        model(per_crop[:2])
    with pytest.raises(ValueError, match=r"crops\[1\] is \(2, 32, 32\)"):
        model([per_crop[0], torch.randn(2, 32, 32)])
    with pytest.raises(ValueError, match="non-empty list"):
        model(torch.cat(per_crop[:2]))
    # the same crops in this model's layout run
    out = model([torch.cat(per_crop[:2]), torch.cat(per_crop[2:])])
    assert out.scores.shape == (8 * b, 20) and out.local_embeddings.shape == (2 * b * 8, 32)


def test_config_refuses_neighbouring_crop_sizes_that_forward_would_refuse():
    with pytest.raises(ValueError, match=r"augmentation.size_crops: \[0\] and \[1\] are both 224 px"):
        AugmentationConfig(size_crops=[224, 224, 96], nmb_crops=[1, 1, 6], min_scale_crops=[0.14, 0.14, 0.05],
                           max_scale_crops=[1.0, 1.0, 0.14])
