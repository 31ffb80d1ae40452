"""Collapse watch (method.md section 8): every image gets the same, uniform code and the
loss sits at ln(K) (`collapse_check`), or the representation itself stops improving: the
online mAP stays at its random-initialisation baseline (`online_collapse_check`). The loop
runs both at every epoch end; `train.collapse_action` decides between a warning and
stopping the run (what Tune sweeps use to drop bad trials at once)."""

from __future__ import annotations

import math


def collapse_check(epoch_metrics: dict, epoch: int, config) -> str | None:
    """A message when the epoch looks collapsed (method.md section 8), else None.

    Collapsed: past `train.collapse_window_epochs`, the global loss within 2% of ln(K) and the
    mean code entropy above 0.98 of its maximum (every image gets the same, uniform code).
    """
    if epoch + 1 < config.train.collapse_window_epochs:
        return None
    ln_k = math.log(config.model.nmb_prototypes)
    loss, entropy = epoch_metrics.get("loss_global"), epoch_metrics.get("code_entropy")
    if loss is None or entropy is None or not math.isfinite(loss):
        return None
    if abs(loss - ln_k) < 0.02 * ln_k and entropy > 0.98:
        return (f"collapse: epoch {epoch} global loss {loss:.4f} is at ln(K) = {ln_k:.4f} with near-uniform codes "
                f"(normalised entropy {entropy:.3f}); try a smaller loss.epsilon, a longer "
                "optim.freeze_prototypes_niters, softer augmentation, or a later/shorter queue")
    return None


def online_collapse_check(history: list[dict], baseline: float | None, epoch: int, config) -> str | None:
    """A message when the online mAP stayed at its baseline over the last
    `train.collapse_window_epochs` epochs, else None.

    history: the epoch records (those with "online_map" were evaluated); baseline: the
    online mAP of the random initialisation (None: unknown, no check). At its baseline:
    every online mAP measured in epochs (epoch - window, epoch] gains less than
    `train.collapse_min_map_gain` over it. It takes at least two evaluations in the window
    (one is a single noisy point: early in training the k-NN mAP can dip below its
    baseline before it rises), so the window must span two `eval.online_every_epochs`, and
    it must have passed since the start.
    """
    window = config.train.collapse_window_epochs
    if baseline is None or window <= 0 or epoch + 1 < window:
        return None
    recent = [r["online_map"] for r in history if "online_map" in r and epoch - window < r["epoch"] <= epoch
              and r.get("online_map_epoch", r["epoch"]) == r["epoch"]]
    if len(recent) < 2:
        return None
    min_gain = config.train.collapse_min_map_gain
    if max(recent) - baseline < min_gain:
        return (f"collapse: the online k-NN mAP stayed at its random-init baseline {100 * baseline:.1f} for "
                f"{window} epochs (best {100 * max(recent):.1f}, needs +{100 * min_gain:.1f}); the backbone is "
                "not learning: check the learning rate, loss.epsilon and the augmentation")
    return None
