"""Pictures: loss curves, per-class AP, semantic attention maps (gaelle_ray.viz)."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from gaelle_ray import viz
from gaelle_ray.config import Config
from gaelle_ray.model import build_model
from gaelle_ray.model.backbone import feature_map
from gaelle_ray.model.gaelle import semantic_attention
from gaelle_ray.storage import save_checkpoint


def _config(groups=4, feat_dim=16):
    return Config.from_dict({"model": {"arch": "resnet18", "hidden_mlp": 32, "feat_dim": feat_dim,
                                       "nmb_prototypes": 10, "nmb_local_prototypes": 12,
                                       "nmb_groups_heads": groups}})


def _model(groups=4, seed=0):
    torch.manual_seed(seed)
    model = build_model(_config(groups))
    with torch.no_grad():  # non-trivial running statistics for the eval-mode head
        bn = model.projection_head[1]
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
    return model


def _png_ok(path, min_bytes=5000):
    assert path.is_file() and path.suffix == ".png"
    assert path.stat().st_size > min_bytes
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        arr = np.asarray(img.convert("RGB"))
    assert w > 200 and h > 150
    assert arr.std() > 5  # not a blank canvas
    return w, h


# ----------------------------------------------------------------------------- attention maths


@pytest.mark.parametrize("groups", [1, 4])
def test_attention_weights_are_distributions_over_positions(groups):
    model = _model(groups)
    model.train()
    images = torch.randn(3, 3, 96, 64)
    weights = viz.attention_weights(model, images)
    s = 16 // groups
    assert weights.shape == (3, groups, s, 3, 2)  # (N, G, S, h, w), h = 96/32, w = 64/32
    assert model.training  # mode restored
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(dim=(-2, -1)), torch.ones(3, groups, s))

    maps = viz.attention_maps(model, images)
    assert maps.shape == (3, groups, 3, 2)
    assert (maps >= 0).all()
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, groups))
    torch.testing.assert_close(maps, weights.mean(dim=2))


@pytest.mark.parametrize("groups", [1, 4])
def test_attention_weights_pool_like_the_model(groups):
    """Pooling the feature map with these weights gives semantic_attention's local descriptors."""
    model = _model(groups, seed=1).eval()
    images = torch.randn(2, 3, 64, 96)
    weights = viz.attention_weights(model, images)  # (N, G, S, h, w)
    n, g, s, h, w = weights.shape
    with torch.no_grad():
        fmap = feature_map(model.backbone, images)  # (N, C, h, w)
        expected = semantic_attention(fmap, model.projection_head, groups, model.attention_temperature)
    c = fmap.shape[1]
    grouped = fmap.flatten(2).reshape(n, g, c // g, h * w)  # (N, G, C/G, P)
    pooled = torch.einsum("ngcp,ngsp->ngcs", grouped, weights.flatten(3))  # (N, G, C/G, S)
    pooled = pooled.reshape(n, c, s).transpose(1, 2).reshape(n * s, c)  # (N*S, C)
    torch.testing.assert_close(pooled, expected, rtol=1e-4, atol=1e-5)


def test_attention_rejects_bad_images():
    with pytest.raises(ValueError, match="N, 3, H, W"):
        viz.attention_weights(_model(), torch.randn(3, 64, 64))


# ----------------------------------------------------------------------------- plots


def test_plot_loss_curves_png(tmp_path):
    history = [{"epoch": e, "loss": 7.5 - 0.4 * e, "loss_global": 7.6 - 0.5 * e, "loss_local": 7.2 - 0.3 * e,
                "loss_l2g": 7.7 - 0.35 * e, "code_entropy": 0.99 - 0.05 * e} for e in range(8)]
    history[3]["loss_l2g"] = float("nan")  # skipped, not drawn as a gap-filling line
    steps = [{"step": i, "loss": 7.6 - 0.01 * i + 0.05 * math.sin(i)} for i in range(0, 200, 5)]
    w, _ = _png_ok(viz.save_figure(viz.plot_loss_curves(history, steps, nmb_prototypes=3000),
                                   tmp_path / "curves.png"))
    w2, _ = _png_ok(viz.save_figure(viz.plot_loss_curves(history), tmp_path / "sub" / "curves2.png"))
    assert w > w2  # the step panel makes it wider
    with pytest.raises(ValueError, match="empty"):
        viz.plot_loss_curves([])
    with pytest.raises(ValueError, match="PNG"):
        viz.save_figure(viz.plot_loss_curves(history), tmp_path / "curves.jpg")


def test_plot_online_map_png(tmp_path):
    history = [{"epoch": e, "loss": 3.0} for e in range(6)]
    for e, value in ((1, 0.30), (3, 0.33), (5, 0.35)):
        history[e].update(online_map=value, online_map_epoch=float(e), online_linear_map=value + 0.02)
    history[2].update(online_map=0.30, online_map_epoch=1.0)  # carried forward: not a new point
    fig = viz.plot_online_map(history, baseline=0.28)
    ax = fig.axes[0]
    knn = ax.lines[0]
    assert list(knn.get_xdata()) == [0.0, 2.0, 4.0, 6.0]  # epochs trained; the baseline at 0
    assert list(knn.get_ydata()) == pytest.approx([28.0, 30.0, 33.0, 35.0])
    assert list(ax.lines[1].get_ydata()) == pytest.approx([32.0, 35.0, 37.0])  # linear mAP
    _png_ok(viz.save_figure(fig, tmp_path / "online.png"))
    with pytest.raises(ValueError, match="no online evaluation"):
        viz.plot_online_map([{"epoch": 0, "loss": 1.0}], None)


def test_plot_per_class_ap_png(tmp_path):
    names = [f"class_{i}" for i in range(20)]
    ap = np.linspace(0.2, 0.95, 20)
    ap[4] = np.nan
    fig = viz.plot_per_class_ap(names, ap, title="VOC2007 test")
    assert "mAP" in fig.axes[0].get_title()
    expected = 100 * np.nanmean(ap)
    assert f"{expected:.1f}" in fig.axes[0].get_title()
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == "class_19" and labels[-1] == "class_4 (excluded)"  # best first, excluded last
    _, h = _png_ok(viz.save_figure(fig, tmp_path / "ap.png"))
    _, h80 = _png_ok(viz.save_figure(viz.plot_per_class_ap([f"c{i}" for i in range(80)], torch.rand(80)),
                                     tmp_path / "ap80.png"))
    assert h80 > h
    with pytest.raises(ValueError, match="names"):
        viz.plot_per_class_ap(names[:3], ap)


def test_plot_attention_png(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(2, 64, 96, 3), dtype=np.uint8)
    maps = torch.rand(2, 4, 2, 3)
    maps = maps / maps.sum(dim=(-2, -1), keepdim=True)
    fig = viz.plot_attention(images, maps, ["a.jpg", "b.jpg"])
    assert len(fig.axes) == 2 * 5
    _png_ok(viz.save_figure(fig, tmp_path / "attn.png"))
    with pytest.raises(ValueError, match="titles"):
        viz.plot_attention(images, maps, ["a.jpg"])


# ----------------------------------------------------------------------------- from a checkpoint


def _jpeg(path, seed, size=(120, 90)):
    rng = np.random.default_rng(seed)
    arr = np.full((size[1], size[0], 3), 40, np.uint8)
    x0, y0 = rng.integers(0, size[0] // 2), rng.integers(0, size[1] // 2)
    arr[y0:y0 + size[1] // 2, x0:x0 + size[0] // 2] = rng.integers(80, 255, size=3)
    Image.fromarray(arr).save(path, quality=90)
    return path


def test_show_attention_from_checkpoint(tmp_path):
    config = _config(groups=4)
    torch.manual_seed(0)
    model = build_model(config)
    run = tmp_path / "run" / "train"
    save_checkpoint(run / "epoch_00000", {"worker": {"model": model.state_dict()}, "history": []},
                    {"config": config.to_dict(), "epoch": 0, "iteration": 3, "world_size": 1})
    save_checkpoint(run / "epoch_00001", {"worker": {"model": model.state_dict()}, "history": []},
                    {"config": config.to_dict(), "epoch": 1, "iteration": 6, "world_size": 1})
    files = [_jpeg(tmp_path / "one.jpg", 0), _jpeg(tmp_path / "two.jpg", 1, size=(80, 140))]

    out = tmp_path / "pictures"
    paths = viz.show_attention(run / "epoch_00000", files, out, image_size=96)
    assert [p.name for p in paths] == ["one_attention.png", "two_attention.png"]
    for p in paths:
        w, h = _png_ok(p)
        assert w > 2 * h  # picture + 4 head groups side by side

    # a run folder: the newest epoch is used; arch must agree with the checkpoint's config
    model2, description = viz.load_model_for_attention(tmp_path / "run")
    assert "epoch_00001" in description and not model2.training
    with pytest.raises(ValueError, match="model.arch"):
        viz.show_attention(run / "epoch_00000", files, out, arch="resnet50")
    with pytest.raises(ValueError, match="no gaelle checkpoint"):
        viz.show_attention(tmp_path / "pictures", files, out)
    with pytest.raises(ValueError, match="not found"):
        viz.show_attention(run / "epoch_00000", [tmp_path / "missing.jpg"], out)
