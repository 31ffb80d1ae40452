"""An evaluation's MLflow run: params, tags, metrics per epoch and at the end, and the
per-class AP table and chart. Written through gaelle_ray.tracking (the one module that
talks to MLflow) by `gaelle linear-eval` and `gaelle semisup`.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from gaelle_ray.eval.probe import ProbeResult

__all__ = ["write_per_class_csv", "log_eval_run", "log_on_pretraining_run", "eval_run_name", "RANDOM_INIT"]

RANDOM_INIT = "random init"  # in the name of every evaluation of a randomly initialised backbone


def _metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)


def eval_run_name(job: str, checkpoint: str, info: dict[str, Any], config=None, run_id: str | None = None) -> str:
    """An evaluation run's name: `<job>: <what was evaluated>`, at most 80 characters, e.g.
    `linear-eval fast toy: cpu_demo/epoch_00019` (a checkpoint folder: the name of the
    pretraining run `run_id` when the store knows it, else its run directory's name, then the
    epoch), `linear-eval fast toy: random init resnet18`, `semisup 10% coco:
    backbone_resnet50.pth`. info: load_backbone_info's {"kind", "arch", "epoch"}."""
    from gaelle_ray import storage, tracking

    prefix = f"{job}: "
    if info.get("kind") == "random":
        return tracking.shorten(f"{prefix}{RANDOM_INIT} {info.get('arch') or ''}".rstrip())
    path = PurePosixPath(str(checkpoint).rstrip("/").split("://", 1)[-1])
    epoch = info.get("epoch")
    if info.get("kind") != "folder":  # a .pth file: its name (and the epoch it records)
        return tracking.fit_name(prefix, path.name, f" epoch {epoch}" if epoch is not None else "")
    name = None
    if run_id and config is not None:
        try:
            name = tracking.run_name(tracking.resolve_tracking_uri(config), run_id)
        except ValueError:  # no store to ask: the path names it
            name = None
    if path.name.startswith(storage.CHECKPOINT_PREFIX):  # <run_dir>/train/epoch_NNNNN
        run_dir = path.parent.parent if path.parent.name == "train" else path.parent
        return tracking.fit_name(prefix, name or run_dir.name, f"/{path.name}")
    return tracking.fit_name(prefix, name or path.name,
                             f"/{storage.checkpoint_name(int(epoch))}" if epoch is not None else "")


def write_per_class_csv(result: ProbeResult, path: str | os.PathLike) -> Path:
    """The per-class AP table (class, ap_final, ap_best_epoch, positives) as CSV."""
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["class", "ap_final", "ap_best_epoch", "positives"])
        writer.writeheader()
        for row in result.per_class():
            writer.writerow(row)
    return path


def log_eval_run(config, result: ProbeResult, *, job: str, run_name: str, params: dict[str, Any],
                 tags: dict[str, Any], parent_run_id: str | None = None) -> str:
    """One MLflow run (experiment config.tracking.experiment) holding an evaluation: params,
    tags (mlflow.parentRunId = the pretraining run when known), metrics map_final, map_best,
    best_epoch, ap/<class> (final epoch), per-epoch test_map / train_loss / lr, the
    per-class AP table as per_class_ap.csv and its bar chart pictures/per_class_ap.png.
    Returns the run id."""
    from gaelle_ray import tracking

    uri = tracking.resolve_tracking_uri(config)
    tracking.check_reachable(uri)
    run_id = tracking.start_run(uri, config.tracking.experiment, run_name, params,
                                {"job": job, **{k: str(v) for k, v in tags.items()}}, parent_run_id=parent_run_id)
    try:
        logger = tracking.RunLogger(uri, run_id)
        for rec in result.history:
            logger.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=int(rec["epoch"]))
        final = {"map_final": result.map_final, "map_best": result.map_best, "best_epoch": result.best_epoch}
        for name, ap in zip(result.class_names, result.ap_final):
            if np.isfinite(ap):
                final[f"ap/{_metric_name(name)}"] = float(ap)
        logger.log_metrics(final, step=0)
        if result.excluded:
            logger.set_tags({"excluded_classes": ", ".join(result.excluded)[:4000]})
        with tempfile.TemporaryDirectory() as tmp:
            from gaelle_ray import viz

            logger.log_artifact(write_per_class_csv(result, Path(tmp) / "per_class_ap.csv"))
            chart = viz.plot_per_class_ap(result.class_names, result.ap_final,
                                          title=f"{run_name}: per-class AP (final epoch, mAP {100 * result.map_final:.1f})")
            logger.log_artifact(viz.save_figure(chart, Path(tmp) / "per_class_ap.png"), "pictures")
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    return run_id


def log_on_pretraining_run(config, pretraining_run_id: str, result: ProbeResult, dataset: str,
                           epoch: int | None = None) -> str:
    """The evaluation's final mAP also as a metric of the pretraining run itself
    (`linear_<mode>_map_<dataset>`, e.g. linear_fast_map_coco, at step = the checkpoint's
    epoch), so the MLflow UI sorts and compares pretraining runs by their downstream mAP.
    Returns the metric name."""
    from gaelle_ray import tracking

    name = _metric_name(f"linear_{result.mode}_map_{dataset}")
    tracking.RunLogger(tracking.resolve_tracking_uri(config), pretraining_run_id).log_metrics(
        {name: result.map_final}, step=int(epoch or 0))
    return name
