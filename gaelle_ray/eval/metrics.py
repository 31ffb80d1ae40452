"""Mean average precision for multi-label classification (method.md section 7).

The definition is scikit-learn's `average_precision_score`: scores sorted in decreasing
order, one threshold per distinct score, and

    AP = sum_n (R_n - R_{n-1}) * P_n

over the thresholds, P_n / R_n the precision / recall of "score >= threshold n". It is the
step-wise precision taken at each positive (not interpolated); positives that share a
score share one threshold, as in sklearn.

The SS-PRL protocol, which GAELLE reports, adds two rules, applied here:
- entries whose target is 255 (VOC "difficult") are left out of that class entirely;
- ties are broken against the positives: the score used is `score - 1e-5 * target`, so a
  positive tied with a negative ranks after it (in float64, so the shift is never rounded
  away at the scale of logits).

Note on the tie rule: for exact ties, sklearn's grouping already gives the pessimistic
answer (a group's positives all get the precision at the end of the group, which is what
putting them after the group's negatives gives), so the rule changes nothing there. What
it does change is a positive scored less than 1e-5 above a negative: the shift moves it
below. This is what SS-PRL's evaluation (sklearn on shifted scores) computes, so the
numbers here match it exactly; an ungrouped per-row precision would not.

mAP is computed once over all gathered test scores, never averaged over batches or
workers, and classes without a positive among the kept entries are reported and left out
of the mean.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

IGNORE = 255  # target value that is left out (VOC difficult)
TIE_SHIFT = 1e-5  # score - TIE_SHIFT * target: ties broken against positives


def _as_array(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check(scores: Any, targets: Any, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    s = _as_array(scores, "scores").astype(np.float64, copy=False)
    t = _as_array(targets, "targets")
    if s.ndim != ndim or t.shape != s.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must both have {ndim} dimension(s) "
                         "and the same shape")
    if not np.all(np.isfinite(s)):
        bad = int(np.sum(~np.isfinite(s)))
        raise ValueError(f"scores hold {bad} non-finite value(s); AP needs finite scores")
    t = t.astype(np.int64, copy=False)
    odd = ~np.isin(t, (0, 1, IGNORE))
    if np.any(odd):
        raise ValueError(f"targets must be 0, 1 or {IGNORE}; found {sorted(set(t[odd].tolist()))[:5]}")
    return s, t


def _ap_columns(scores: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AP of every column, vectorised.

    scores: (N, C) float64, targets: (N, C) in {0, 1, 255}.
    Returns (ap (C,) with nan where a column has no positive, positives (C,) int).
    """
    n, c = scores.shape
    valid = targets != IGNORE  # (N, C)
    pos = (targets == 1)  # (N, C)
    shifted = scores - TIE_SHIFT * pos  # (N, C) ties broken against positives
    # Masked entries go to the bottom with zero weight: they change neither tp nor fp.
    keyed = np.where(valid, shifted, -np.inf)  # (N, C)
    order = np.argsort(-keyed, axis=0, kind="stable")  # (N, C) decreasing score
    s_sorted = np.take_along_axis(keyed, order, axis=0)  # (N, C)
    pos_sorted = np.take_along_axis(pos & valid, order, axis=0).astype(np.float64)  # (N, C)
    neg_sorted = np.take_along_axis(~pos & valid, order, axis=0).astype(np.float64)  # (N, C)
    tp = np.cumsum(pos_sorted, axis=0)  # (N, C)
    fp = np.cumsum(neg_sorted, axis=0)  # (N, C)
    # Row i closes a threshold when the next score differs (or it is the last row).
    is_end = np.ones((n, c), dtype=bool)  # (N, C)
    is_end[:-1] = s_sorted[:-1] != s_sorted[1:]
    # Index of the threshold that row i belongs to: the next closing row at or below i.
    end_idx = np.where(is_end, np.arange(n)[:, None], n - 1)  # (N, C)
    end_idx = np.minimum.accumulate(end_idx[::-1], axis=0)[::-1]  # (N, C)
    tp_end = np.take_along_axis(tp, end_idx, axis=0)  # (N, C)
    fp_end = np.take_along_axis(fp, end_idx, axis=0)  # (N, C)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp_end / (tp_end + fp_end)  # (N, C) precision of each row's threshold
    # Each positive adds 1/P recall at its threshold: sum_pos P(threshold) / P.
    contrib = np.where(pos_sorted > 0, precision, 0.0)  # (N, C)
    positives = pos_sorted.sum(axis=0)  # (C,)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = contrib.sum(axis=0) / positives  # (C,)
    ap[positives == 0] = np.nan
    return ap, positives.astype(np.int64)


def average_precision(scores: Any, targets: Any) -> float:
    """AP of one class (sklearn definition, 255 masked, ties broken against positives).

    scores: (N,) float; targets: (N,) in {0, 1, 255}. Returns nan when no kept entry is
    positive.
    """
    s, t = _check(scores, targets, 1)
    ap, _ = _ap_columns(s[:, None], t[:, None])
    return float(ap[0])


def mean_average_precision(scores: Any, targets: Any, class_names: Sequence[str] | None = None
                           ) -> tuple[float, np.ndarray, dict[str, Any]]:
    """mAP over classes, computed once over all rows.

    scores: (N, C) float (logits or probabilities: AP only uses the order);
    targets: (N, C) in {0, 1, 255}; class_names: C names for the report (optional).

    Returns (map, per_class_ap (C,) with nan for excluded classes, info) where info holds
    "positives" (C,), "negatives" (C,), "ignored" (C,) counts, "excluded" (indices of the
    classes without a positive, left out of the mean), "excluded_names", "num_classes_used"
    and "num_samples". map is nan when no class has a positive.
    """
    s, t = _check(scores, targets, 2)
    c = s.shape[1]
    if class_names is not None and len(class_names) != c:
        raise ValueError(f"{len(class_names)} class names for {c} score columns")
    ap, positives = _ap_columns(s, t)
    excluded = [int(i) for i in np.flatnonzero(positives == 0)]
    used = c - len(excluded)
    names = [class_names[i] for i in excluded] if class_names is not None else [str(i) for i in excluded]
    if excluded:
        log.warning("mAP: %d of %d classes have no positive test example and are left out: %s",
                    len(excluded), c, ", ".join(names[:10]) + (" ..." if len(names) > 10 else ""))
    value = float(np.nanmean(ap)) if used else float("nan")
    info = {
        "positives": positives,
        "negatives": np.sum(t == 0, axis=0),
        "ignored": np.sum(t == IGNORE, axis=0),
        "excluded": excluded,
        "excluded_names": names,
        "num_classes_used": used,
        "num_samples": int(s.shape[0]),
    }
    return value, ap, info
