"""Pictures of a run: loss curves, per-class AP, and GAELLE's semantic attention maps.

Everything draws on `matplotlib.figure.Figure` objects with the Agg canvas: no pyplot, no
display, no global backend switch, safe in Ray workers and on headless machines. The
functions return figures; `save_figure` writes a PNG and the caller logs it (MLflow is
tracking.py's business, not this module's).

Attention maps (method.md section 2): for every position p of the last feature map the
global projection head gives A[:, p, :] (d values); A is L2-normalised over d, divided by
the attention temperature and soft-maxed over the P = h*w positions, so each of the d maps
is a distribution over positions. Map m = k * S + j belongs to head group k (S = d / H).
A group's picture is the mean of its S maps, itself a distribution over positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from gaelle_ray.config import MEAN, STD
from gaelle_ray.model.backbone import feature_map

__all__ = [
    "attention_maps",
    "attention_weights",
    "load_images",
    "load_model_for_attention",
    "plot_attention",
    "plot_loss_curves",
    "plot_per_class_ap",
    "save_figure",
    "show_attention",
]

LOSS_TERMS = (("loss", "total"), ("loss_global", "global (swapped)"), ("loss_local", "local"),
              ("loss_l2g", "local-to-global"))
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # Agg canvas: renders without a display
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write `fig` as a PNG to `path` (parent folders created); returns the path."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; {path} does not end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=dpi)
    return path


# ----------------------------------------------------------------------------- training curves


def _series(rows: Sequence[Mapping[str, Any]], x_key: str, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if value is None or row.get(x_key) is None:
            continue
        value = float(value)
        if math.isfinite(value):
            xs.append(float(row[x_key]))
            ys.append(value)
    return xs, ys


def plot_loss_curves(history: Sequence[Mapping[str, Any]],
                     steps: Sequence[Mapping[str, Any]] | None = None, *,
                     nmb_prototypes: int | None = None, title: str = "GAELLE pretraining") -> Figure:
    """Loss terms and code entropy over training.

    history: one dict per epoch with keys `epoch`, `loss`, `loss_global`, `loss_local`,
        `loss_l2g`, `code_entropy` (the `history` list of a checkpoint's state.pt); missing
        or non-finite values are skipped.
    steps: optional step-level rows, each with `step` and any of the loss keys (the per-step
        metrics the loop logs); drawn on a third panel against the iteration.
    nmb_prototypes: K; when given, ln(K) (the collapse level, method.md section 8) is drawn
        on the loss panel.
    Returns a Figure: losses per epoch, normalised code entropy per epoch, [per-step losses].
    """
    if not history and not steps:
        raise ValueError("plot_loss_curves: empty history (no epoch and no step rows)")
    n_panels = 3 if steps else 2
    fig = _figure(6.0 * n_panels, 4.0)
    axes = fig.subplots(1, n_panels)
    fig.suptitle(title)

    ax = axes[0]
    for key, label in LOSS_TERMS:
        xs, ys = _series(history, "epoch", key)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, lw=2.2 if key == "loss" else 1.4,
                    label=label)
    if nmb_prototypes:
        ax.axhline(math.log(nmb_prototypes), color="grey", ls=":", lw=1,
                   label=f"ln K = {math.log(nmb_prototypes):.2f} (collapse)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("losses per epoch")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)

    ax = axes[1]
    xs, ys = _series(history, "epoch", "code_entropy")
    if xs:
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, color="tab:purple", label="code entropy")
        ax.axhline(1.0, color="grey", ls=":", lw=1, label="uniform codes")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no code_entropy recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("normalised entropy of the codes")
    ax.set_title("code entropy per epoch")
    ax.grid(alpha=0.3)

    if steps:
        ax = axes[2]
        for key, label in LOSS_TERMS:
            xs, ys = _series(steps, "step", key)
            if xs:
                ax.plot(xs, ys, lw=1.6 if key == "loss" else 0.9, label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title("losses per logged step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


def plot_online_map(history: Sequence[Mapping[str, Any]], baseline: float | None,
                    title: str = "online evaluation during pretraining", *,
                    linear_baseline: float | None = None) -> Figure:
    """The online k-NN mAP (and the online linear-probe mAP when recorded) against the
    number of epochs trained, with the random-initialisation baseline at 0 epochs.

    history: one dict per epoch (a checkpoint's `history`); the epochs that were evaluated
    hold `online_map` (and maybe `online_linear_map`). baseline: the online mAP before the
    first step, or None; linear_baseline: the same for the online linear probe. Raises
    ValueError when nothing was evaluated.
    """
    rows = [r for r in history if "online_map" in r and r.get("online_map_epoch", r["epoch"]) == r["epoch"]]
    if not rows and baseline is None:
        raise ValueError("plot_online_map: no online evaluation in the history")
    fig = _figure(6.0, 4.0)
    ax = fig.subplots(1, 1)
    for key, label, colour in (("online_map", "k-NN mAP", "tab:blue"), ("online_linear_map", "linear mAP", "tab:green")):
        xs = [float(r["epoch"]) + 1 for r in rows if key in r and math.isfinite(r[key])]
        ys = [100 * float(r[key]) for r in rows if key in r and math.isfinite(r[key])]
        first = baseline if key == "online_map" else linear_baseline
        if first is not None:
            xs, ys = [0.0] + xs, [100 * first] + ys
        if xs:
            ax.plot(xs, ys, marker="o", color=colour, label=label)
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", ls=":", lw=1, label=f"k-NN at random init {100 * baseline:.1f}")
    ax.set_xlabel("epochs trained")
    ax.set_ylabel("mAP (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_per_class_ap(class_names: Sequence[str], ap, title: str = "per-class AP") -> Figure:
    """Horizontal bars of per-class average precision, best at the top, with the mAP line.

    class_names: C names. ap: (C,) APs in [0, 1] (or in percent when any value is > 1);
    NaN marks a class left out of the mAP (no positive in the test set) and is listed at
    the bottom as "excluded". The mAP drawn is the mean over the non-NaN classes.
    """
    ap = np.asarray(ap.detach().cpu() if isinstance(ap, torch.Tensor) else ap, dtype=np.float64).reshape(-1)
    names = [str(n) for n in class_names]
    if len(names) != ap.shape[0]:
        raise ValueError(f"plot_per_class_ap: {len(names)} class names but {ap.shape[0]} AP values")
    if ap.shape[0] == 0:
        raise ValueError("plot_per_class_ap: no classes")
    valid = ~np.isnan(ap)
    if not valid.any():
        raise ValueError("plot_per_class_ap: every AP is NaN (no class has a positive)")
    percent = 1.0 if np.nanmax(ap) > 1.0 else 100.0  # shown in percent
    values = ap * percent
    order = [int(i) for i in np.argsort(-values[valid], kind="stable")]
    kept = np.flatnonzero(valid)[order]
    excluded = np.flatnonzero(~valid)
    rows = list(kept) + list(excluded)  # top to bottom

    fig = _figure(7.5, max(2.5, 0.22 * len(rows) + 1.4))
    ax = fig.subplots()
    y = np.arange(len(rows))[::-1]  # first row at the top
    bar_values = [values[i] if valid[i] else 0.0 for i in rows]
    colors = ["tab:blue" if valid[i] else "lightgrey" for i in rows]
    ax.barh(y, bar_values, color=colors, height=0.75)
    ax.set_yticks(y, [names[i] if valid[i] else f"{names[i]} (excluded)" for i in rows],
                  fontsize=8 if len(rows) > 30 else 9)
    m_ap = float(np.nanmean(values))
    ax.axvline(m_ap, color="tab:red", ls="--", lw=1.5, label=f"mAP {m_ap:.1f}")
    for yy, i in zip(y, rows):
        if valid[i]:
            ax.text(values[i] + 0.5, yy, f"{values[i]:.1f}", va="center", fontsize=7)
    ax.set_xlim(0, 100 if percent == 100.0 else max(100.0, float(np.nanmax(values)) * 1.08))
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel("average precision (%)")
    ax.set_title(f"{title}  (mAP {m_ap:.1f} over {int(valid.sum())} classes)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


# ----------------------------------------------------------------------------- attention


@torch.no_grad()
def attention_weights(model, images: torch.Tensor) -> torch.Tensor:
    """Every semantic attention map of every image, before the per-group average.

    model: a GaelleModel (run in eval mode here; its previous mode is restored).
    images: (N, 3, H, W) normalised images.
    Returns (N, G, S, h, w) on the CPU, float32: G = H head groups, S = d / G maps per group,
    (h, w) the last feature map's grid; each map sums to 1 over its h*w positions.
    Same maths as model/gaelle.py semantic_attention, stopping at the maps.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"attention_weights expects images (N, 3, H, W), got shape {tuple(images.shape)}")
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = images.to(device=param.device, dtype=param.dtype)
        fmap = feature_map(model.backbone, x)  # (N, C, h, w)
        n, _, h, w = fmap.shape
        scores = model.projection_head.forward_positions(fmap.flatten(2).transpose(1, 2))  # (N, P, d)
        d = scores.shape[-1]
        groups = model.n_groups
        if d % groups:
            raise ValueError(f"attention_weights: d = {d} is not divisible by {groups} head groups")
        attn = F.normalize(scores.float(), dim=-1) / model.attention_temperature  # (N, P, d)
        attn = attn.softmax(dim=1)  # (N, P, d) softmax over positions
        attn = attn.reshape(n, h * w, groups, d // groups)  # (N, P, G, S) map m = k*S + j
        attn = attn.permute(0, 2, 3, 1).reshape(n, groups, d // groups, h, w)  # (N, G, S, h, w)
        return attn.cpu()
    finally:
        model.train(was_training)


def attention_maps(model, images: torch.Tensor) -> torch.Tensor:
    """Semantic attention map of each head group: the mean of the group's S maps.

    images: (N, 3, H, W) normalised. Returns (N, G, h, w) float32 on the CPU, non-negative,
    each map summing to 1 over its h*w positions (see attention_weights).
    """
    return attention_weights(model, images).mean(dim=2)  # (N, G, h, w)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(G, h, w) -> (G, H, W), bilinear."""
    t = torch.as_tensor(maps, dtype=torch.float32)[None]  # (1, G, h, w)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False)[0].numpy()  # (G, H, W)


def plot_attention(images_uint8, maps, titles: Sequence[str] | None = None, *,
                   cmap: str = "jet", alpha: float = 0.5) -> Figure:
    """One row per image: the picture, then each head group's map over it.

    images_uint8: (N, H, W, 3) uint8 pictures (what the model saw, before normalisation).
    maps: (N, G, h, w) attention maps (attention_maps). Each map is upsampled bilinearly to
    H x W and drawn as a heat map scaled to its own maximum; the panel title gives its
    most attended position's weight relative to uniform attention (1/P): 1.0x = no focus.
    titles: N row titles (e.g. file names), optional.
    """
    images = _to_numpy(images_uint8)
    maps = _to_numpy(maps).astype(np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"plot_attention: images must be (N, H, W, 3), got {images.shape}")
    if maps.ndim != 4 or maps.shape[0] != images.shape[0]:
        raise ValueError(f"plot_attention: maps must be (N, G, h, w) with N = {images.shape[0]}, got {maps.shape}")
    if titles is not None and len(titles) != images.shape[0]:
        raise ValueError(f"plot_attention: {len(titles)} titles for {images.shape[0]} images")
    if images.dtype != np.uint8:
        images = np.clip(images, 0, 255).astype(np.uint8)
    n, height, width, _ = images.shape
    groups = maps.shape[1]
    positions = maps.shape[2] * maps.shape[3]  # P = h * w
    cols = groups + 1
    panel = 2.4
    fig = _figure(panel * cols, panel * n + 0.3)
    axes = np.asarray(fig.subplots(n, cols, squeeze=False))
    for i in range(n):
        big = _upsample(maps[i], (height, width))  # (G, H, W)
        axes[i, 0].imshow(images[i])
        axes[i, 0].set_title(titles[i] if titles is not None else "image", fontsize=8)
        for k in range(groups):
            ax = axes[i, k + 1]
            peak = float(maps[i, k].max()) * positions  # 1.0 = uniform attention
            heat = big[k] / max(float(big[k].max()), 1e-12)
            ax.imshow(images[i])
            ax.imshow(heat, cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0)
            ax.set_title(f"head group {k}  (peak {peak:.1f}x uniform)", fontsize=8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


# ----------------------------------------------------------------------------- from a checkpoint


def load_images(image_files: Sequence[str | Path], image_size: int = 224,
                mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> tuple[np.ndarray, torch.Tensor]:
    """Read images with PIL: RGB, shorter side resized to `image_size` (bicubic), centre crop.

    Returns (pictures (N, S, S, 3) uint8, normalised tensor (N, 3, S, S) float32).
    """
    from PIL import Image

    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 (one feature-map position is 32 px), got {image_size}")
    pictures = []
    for file in image_files:
        path = Path(file)
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                w, h = img.size
                scale = image_size / min(w, h)
                new = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
                img = img.resize(new, Image.BICUBIC)
                left, top = (new[0] - image_size) // 2, (new[1] - image_size) // 2
                img = img.crop((left, top, left + image_size, top + image_size))
                pictures.append(np.asarray(img, dtype=np.uint8))
        except FileNotFoundError:
            raise ValueError(f"{path}: image file not found") from None
        except OSError as exc:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"{path}: cannot read image: {exc}") from None
    if not pictures:
        raise ValueError("no image files given")
    batch = np.stack(pictures)  # (N, S, S, 3) uint8
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return batch, (x - m) / s


def load_model_for_attention(checkpoint: str | Path, arch: str | None = None,
                             nmb_groups_heads: int | None = None):
    """(GaelleModel in eval mode, description) from a checkpoint.

    checkpoint: one of
      - a gaelle checkpoint folder (epoch_NNNNN/ with state.pt and meta.json, or a folder
        `gaelle import-released` wrote), or a run folder holding some (the newest complete
        one is used): the model is rebuilt from the config saved in meta.json;
      - a `.pth` file of the authors' released script (method.md section 9): sizes are read
        from the weights, the backbone is `arch` (default resnet50) and the head groups
        `nmb_groups_heads` (default: what the file records, else 4, the headline run's;
        refused when the weights contradict it, see weights.check_heads).
    arch / nmb_groups_heads: for a gaelle checkpoint, must agree with its config when given.
    """
    from gaelle_ray.config import Config
    from gaelle_ray.model import build_model
    from gaelle_ray.model.weights import check_heads, import_released_checkpoint, infer_model_sizes, load_state_strict

    path = Path(checkpoint)
    if path.is_dir():
        from gaelle_ray import storage

        folder = storage.find_checkpoint_folder(path)
        state, meta = storage.load_checkpoint(folder)
        if "config" not in meta:
            raise ValueError(f"{folder}: meta.json holds no config; cannot rebuild the model")
        config = Config.from_dict(meta["config"], source=f"{folder}/meta.json")
        for name, wanted in (("arch", arch), ("nmb_groups_heads", nmb_groups_heads)):
            have = getattr(config.model, name)
            if wanted is not None and wanted != have:
                raise ValueError(f"{folder}: the checkpoint was trained with model.{name} = {have!r}, "
                                 f"not {wanted!r}")
        weights = storage.worker_model_state(state, f"{folder}/{storage.STATE_FILE}")
        model = build_model(config)
        load_state_strict(model, weights, str(folder))
        description = f"{folder.name} ({config.model.arch}, epoch {meta.get('epoch', '?')})"
    elif path.is_file():
        released = import_released_checkpoint(path)
        sizes = infer_model_sizes(released["model"])
        heads = nmb_groups_heads or released["recorded_heads"] or 4
        check_heads(released["model"], heads, str(path), recorded=released["recorded_heads"])
        raw = {"model": {"arch": arch or "resnet50", "nmb_groups_heads": heads, **sizes}}
        config = Config.from_dict(raw, source=str(path))
        model = build_model(config)
        load_state_strict(model, released["model"], str(path))
        description = f"{path.name} ({config.model.arch}, epoch {released.get('epoch', '?')})"
    else:
        raise ValueError(f"{path}: checkpoint not found")
    model.eval()
    return model, description


def show_attention(checkpoint: str | Path, image_files: Sequence[str | Path], out_dir: str | Path,
                   arch: str | None = None, image_size: int = 224, *, nmb_groups_heads: int | None = None,
                   batch_size: int = 16, device: str = "cpu") -> list[Path]:
    """Draw the semantic attention of a pretrained GAELLE model on some pictures.

    checkpoint: a gaelle checkpoint folder (epoch_NNNNN/), a run folder holding some (the
        newest is used) or a released-script .pth file (see load_model_for_attention).
    image_files: image paths (any format PIL reads); a folder stands for the images in it.
    out_dir: where the PNGs go (created); one `<image stem>_attention.png` per image, the
        picture followed by one heat map per head group.
    arch: backbone of a released .pth checkpoint (default resnet50); for a gaelle checkpoint
        it is read from the checkpoint and, when given, must match.
    image_size: side of the square centre crop fed to the model (shorter side resized first).
        The maps have image_size / 32 positions per side (7 x 7 at 224).
    nmb_groups_heads: head groups H of a released .pth checkpoint (default 4).
    batch_size / device: how the images go through the model.
    Returns the PNG paths, in the order of the images.
    """
    files: list[Path] = []
    for item in image_files:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            files.append(p)
    if not files:
        raise ValueError("show_attention: no image files given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, description = load_model_for_attention(checkpoint, arch, nmb_groups_heads)
    model.to(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    used: set[str] = set()
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        pictures, x = load_images(chunk, image_size)  # (n, S, S, 3) uint8, (n, 3, S, S)
        maps = attention_maps(model, x)  # (n, G, h, w)
        for file, picture, m in zip(chunk, pictures, maps):
            name = f"{file.stem}_attention"
            k = 1
            while name in used:
                k += 1
                name = f"{file.stem}_{k}_attention"
            used.add(name)
            fig = plot_attention(picture[None], m[None], [f"{file.name}"])
            fig.suptitle(description, fontsize=9)
            written.append(save_figure(fig, out / f"{name}.png"))
    return written
