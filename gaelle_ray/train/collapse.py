"""Collapse watch (method.md section 8): every image gets the same, uniform code and the
loss sits at ln(K). The loop logs code entropy and prototypes in use every step and runs
this check at every epoch end; `train.collapse_action` decides between a warning and
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
