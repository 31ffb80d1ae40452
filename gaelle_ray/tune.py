"""Ray Tune sweeps over any GAELLE config keys.

A sweep file (see experiments/sweeps/):

    name: queue_and_crops            # Tune experiment name (folder under storage)
    base: ../coco2017_400ep.yaml     # experiment config, relative to this file
    set:                             # fixed overrides for every trial
      train.epochs: 50
    space:                           # searched keys: one kind each
      queue.queue_length: {grid: [0, 1920, 3840]}
      optim.base_lr: {loguniform: [0.1, 1.2]}
      loss.epsilon: {choice: [0.03, 0.05]}
      augmentation.min_scale_crops: {grid: [[0.14, 0.05], [0.3, 0.1]]}
    num_samples: 2                   # repeats of the grid (random keys are re-drawn)
    max_concurrent: 1
    storage: runs/sweeps             # local path or URI
    scheduler: {type: asha, metric: online_map, mode: max, grace_period: 2, reduction_factor: 2}

Each trial is a function (Ray Train V2: a Tuner does not take a trainer) that builds the
trial's config, runs `pretrain` (a TorchTrainer, its epoch reports reaching Tune through
TuneReportCallback), then the fast linear probe; the objective is its mAP (`map`, max).
ASHA prunes on `online_map` (max) unless the sweep file says otherwise: the online k-NN mAP
that the training workers measure every `eval.online_every_epochs` epochs (reported with
every epoch, the newest value). Losses are not comparable across trials that differ in
epsilon, temperature, K, the queue or the crops, so pruning on a loss while the space varies
one of those keys gets a warning naming them. A trial whose collapse watch fires stops at
once (`train.collapse_action: stop` is forced) and reports `collapsed`. MLflow: one parent
run per sweep, one child run per trial (params, curves, final mAP); the best trial's config
is written as a ready-to-run experiment YAML.
`--resume` continues a stopped or killed sweep (the driver's machine lost, say) under the same
MLflow parent run (kept in `<storage>/<name>/mlflow_parent.json`): finished trials are not
rerun, and a trial that was running continues from its newest checkpoint in its folder
`<storage>/<name>/trials/<trial id>`, in the same MLflow child run. Tune saves its view of the
trials every few seconds only, so a trial writes its final report (`trial_result.json`) into its
folder before reporting it: one that finished after Tune's last save reports that again
instead of training again.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import yaml
from ray import tune

from gaelle_ray import storage, tracking
from gaelle_ray.config import Config, ConfigError, dump_yaml, load_config

log = logging.getLogger(__name__)

SPACE_KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
SWEEP_KEYS = ("name", "base", "set", "space", "num_samples", "max_concurrent", "storage", "scheduler", "metric")
OBJECTIVE = "map"
FINAL_RECORD = "trial_result.json"  # a finished trial's final report, in its folder
PARENT_FILE = "mlflow_parent.json"  # the sweep's MLflow parent run id, in <storage>/<name> (local or remote)
TRIAL_CPU = 0.1  # what a trial's own process reserves
PRUNE_METRIC, PRUNE_MODE = "online_map", "max"  # ASHA's default
# keys that change what a loss value means: a loss is not comparable across their values
LOSS_SCALE_KEYS = ("loss.epsilon", "loss.temperature", "model.nmb_prototypes", "model.nmb_local_prototypes",
                   "queue.", "augmentation.size_crops", "augmentation.nmb_crops", "augmentation.min_scale_crops",
                   "augmentation.max_scale_crops", "loss.weight_", "loss.crops_for_assign")


@dataclass
class SweepSpec:
    name: str
    base: Config
    base_path: str
    space: dict[str, dict[str, list]]
    fixed: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    max_concurrent: int = 1
    storage: str = "runs/sweeps"
    scheduler: dict[str, Any] = field(default_factory=dict)
    source: str = ""


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file; errors name the file and the key."""
    path = Path(path)
    src = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{src}: sweep file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{src}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: a sweep file is a mapping with keys {', '.join(SWEEP_KEYS)}")
    for key in raw:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            raise ConfigError(f"{src}: {key}: unknown sweep key" + (f"; did you mean '{close[0]}'?" if close else ""))
    for key in ("name", "base", "space"):
        if key not in raw:
            raise ConfigError(f"{src}: {key}: required")
    fixed = raw.get("set") or {}
    base_path = (path.parent / raw["base"]).resolve()
    base = load_config(base_path, [f"{k}={_yaml_value(v)}" for k, v in fixed.items()])
    space = raw["space"]
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{src}: space: must map config keys to a search kind")
    for key, spec in space.items():
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"{src}: space.{key}: must be one of {{{', '.join(k + ': ...' for k in SPACE_KINDS)}}}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{src}: space.{key}.{kind}: needs a non-empty list")
        if kind in ("uniform", "loguniform", "randint") and len(values) != 2:
            raise ConfigError(f"{src}: space.{key}.{kind}: needs [low, high]")
        if kind == "loguniform" and min(values) <= 0:
            raise ConfigError(f"{src}: space.{key}.loguniform: bounds must be > 0")
        probes = values if kind in ("grid", "choice") else values[:1]
        for value in probes:  # every listed value must make a valid config
            try:
                base.replace({key: value})
            except ConfigError as exc:
                raise ConfigError(f"{src}: space.{key}: value {value!r} gives a bad config: {exc}") from None
    scheduler = raw.get("scheduler") or {}
    if scheduler and scheduler.get("type", "asha") not in ("asha", "none"):
        raise ConfigError(f"{src}: scheduler.type: must be asha or none")
    _check_prune_metric(src, scheduler, base, space)
    return SweepSpec(name=str(raw["name"]), base=base, base_path=str(base_path), space=space, fixed=fixed,
                     num_samples=int(raw.get("num_samples", 1)), max_concurrent=int(raw.get("max_concurrent", 1)),
                     storage=str(raw.get("storage", "runs/sweeps")), scheduler=scheduler, source=src)


def _check_prune_metric(src: str, scheduler: dict, base: Config, space: dict) -> None:
    """ASHA's metric must be reported, and should be comparable across the trials."""
    if not scheduler or scheduler.get("type", "asha") == "none":
        return
    metric = str(scheduler.get("metric", PRUNE_METRIC))
    if metric.startswith("online_") and base.eval.online_every_epochs <= 0:
        raise ConfigError(f"{src}: scheduler.metric: {metric} is measured only with online evaluation on: set "
                          "eval.online_every_epochs (in set: or the base config) to a number of epochs")
    if "loss" in metric:
        varied = [k for k in space if any(k == p or (p.endswith((".", "_")) and k.startswith(p))
                                          for p in LOSS_SCALE_KEYS)]
        if varied:
            log.warning("%s: ASHA prunes on %s, but the space varies %s, which change what a loss value means: "
                        "losses are not comparable across these trials; prune on online_map (max) instead",
                        src, metric, ", ".join(varied))


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Tune's param_space: one entry per searched key (dots kept in the names)."""
    lists = {"grid": tune.grid_search, "choice": tune.choice}
    ranges = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    out = {}
    for key, kind_values in spec.space.items():
        kind, values = next(iter(kind_values.items()))
        out[key] = lists[kind](values) if kind in lists else ranges[kind](*values)
    return out


def storage_dir(spec: SweepSpec) -> str:
    """The sweep's Tune storage: a remote URI as given, a local path made absolute."""
    return storage.normalise(spec.storage)


def sweep_tracking_uri(spec: SweepSpec) -> str:
    """The sweep's MLflow store: the base config's, else sqlite beside the Tune results."""
    if spec.base.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return tracking.resolve_tracking_uri(spec.base)
    root = storage_dir(spec)
    if storage.is_remote(root):
        raise ValueError(f"storage {root!r} is remote: set tracking.tracking_uri in the base config")
    return f"sqlite:///{Path(root) / spec.name / 'mlflow.db'}"


def trial_config(base: dict, params: dict[str, Any], trial_dir: str, tracking_uri: str, run_name: str = "") -> Config:
    """The trial's validated config: base + searched values, its own run dir, the sweep's
    MLflow store (and run name, when given), and the collapse watch set to stop the trial."""
    config = Config.from_dict(base, source="sweep base")
    extra = {"tracking.run_name": run_name} if run_name else {}
    return config.replace({**params, "train.run_dir": trial_dir, "tracking.tracking_uri": tracking_uri,
                           "train.collapse_action": "stop", **extra})


def trial_run_name(params: dict[str, Any], trial_id: str = "") -> str:
    """A trial's MLflow run name: its searched values (`optim.base_lr=0.3125 queue.queue_length=1920`),
    then its number in the sweep (`#3`, from the Tune trial id), since repeats of a grid
    (num_samples > 1) search the same values. At most tracking.MAX_RUN_NAME characters."""
    number = re.search(r"_(\d+)$", trial_id or "")
    tail = f" #{int(number.group(1))}" if number else ""
    return tracking.fit_name("", tracking.describe_overrides(params) or "trial", tail)


def run_trial(tune_config: dict) -> None:
    """One Tune trial: pretrain on Ray Train, then the fast linear probe; reports `map`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from gaelle_ray.eval.linear import run_linear_eval
    from gaelle_ray.train.trainer import PretrainStopped, pretrain

    meta = tune_config["__sweep__"]
    params = {k: v for k, v in tune_config.items() if k != "__sweep__"}
    trial_id = tune.get_context().get_trial_id()
    trial_dir = os.path.join(meta["trials_dir"], trial_id)  # a resumed trial keeps its MLflow run (and name)
    config = trial_config(meta["base"], params, trial_dir, meta["tracking_uri"], trial_run_name(params, trial_id))
    done = storage.read_json(trial_dir, FINAL_RECORD)
    if done is not None:  # finished before the sweep's driver died, after Tune's last save: not rerun
        tune.report(done)
        return
    fs, path = storage.resolve(trial_dir)  # an earlier attempt: continue its newest checkpoint and MLflow run
    resume = fs.get_file_info(path).type != pafs.FileType.NotFound
    try:
        result = pretrain(config, resume=resume, parent_run_id=meta["parent_run_id"],
                          callbacks=[TuneReportCallback()], check_budget=False)
    except PretrainStopped as exc:
        _report_final(trial_dir, {OBJECTIVE: 0.0, "collapsed": True, "stopped": str(exc), "epoch": config.train.epochs})
        return
    evaluation = run_linear_eval(result.checkpoint, config.eval.dataset, config.eval.data or config.data.shards,
                                 config, fast=True, allow_overlap=True, parent_run_id=result.mlflow_run_id)
    score = float(evaluation["map_final"])
    tracking.RunLogger(result.tracking_uri, result.mlflow_run_id).log_metrics({OBJECTIVE: score}, step=0)
    _report_final(trial_dir, {OBJECTIVE: score, "map_best": float(evaluation.get("map_best", score)), "collapsed": False,
                              "epoch": config.train.epochs, **{k: v for k, v in result.metrics.items()
                                                               if isinstance(v, (int, float)) and k != "epoch"}})


def _report_final(trial_dir: str, result: dict) -> None:
    """A trial's last report, written first to <trial_dir>/trial_result.json (a temporary
    file renamed: never half written), so a restored sweep reports it again, not retrains."""
    storage.write_json(trial_dir, FINAL_RECORD, result)
    tune.report(result)


def _scheduler(spec: SweepSpec):
    s = spec.scheduler
    if not s or s.get("type", "asha") == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # one Tune result per epoch (TuneReportCallback), plus the final mAP report
    metric = s.get("metric", PRUNE_METRIC)
    default_mode = "max" if metric.startswith("online_") or metric == OBJECTIVE else "min"
    return ASHAScheduler(time_attr="training_iteration", metric=metric, mode=s.get("mode", default_mode),
                         grace_period=int(s.get("grace_period", 1)), reduction_factor=float(s.get("reduction_factor", 2)),
                         max_t=spec.base.train.epochs + 1)


def _stop_collapsed(trial_id: str, result: dict) -> bool:
    return bool(result.get("collapsed"))


@dataclass
class SweepResult:
    best_config_path: str
    best_map: float
    trials: list[dict]
    parent_run_id: str
    tracking_uri: str


def run_sweep(spec: SweepSpec, *, resume: bool = False, address: str = "") -> SweepResult:
    """Run (or resume) a sweep; returns the best trial and every trial's outcome."""
    from gaelle_ray.ray_setup import check_cpu_budget, init_ray

    root = storage_dir(spec)
    experiment_path = f"{root.rstrip('/')}/{spec.name}"
    uri = sweep_tracking_uri(spec)
    tracking.check_reachable(uri)
    restorable = resume and tune.Tuner.can_restore(experiment_path)
    if resume and not restorable:
        log.warning("--resume: no sweep to continue in %s (no Tune state there); starting sweep %s from the start",
                    experiment_path, spec.name)
    saved = storage.read_json(experiment_path, PARENT_FILE) if resume else None
    parent_run_id = saved["run_id"] if saved else ""
    if not parent_run_id:
        parent_run_id = tracking.start_run(
            uri, spec.base.tracking.experiment, f"sweep-{spec.name}",
            {"sweep.file": spec.source, "sweep.base": spec.base_path, "sweep.num_samples": spec.num_samples,
             **{f"space.{k}": v for k, v in spec.space.items()}, **{f"set.{k}": v for k, v in spec.fixed.items()}},
            {**tracking.version_tags(), "job": "sweep"})
        storage.write_json(experiment_path, PARENT_FILE, {"run_id": parent_run_id})

    tc = spec.base.train
    needed = tc.num_workers * spec.base.ray.num_cpus_per_worker + 2 * spec.base.data.crop_cpus + TRIAL_CPU
    init_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, int(math.ceil(needed))))
    check_cpu_budget(ray.cluster_resources().get("CPU", 0) - TRIAL_CPU, tc.num_workers,
                     spec.base.ray.num_cpus_per_worker, spec.base.data.crop_cpus)

    # the trial function only drives a TorchTrainer (whose workers reserve their own CPUs);
    # Tune refuses an empty request, so it holds a tenth of a CPU
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    if restorable:  # trial ids (and so folders) are kept; unfinished and errored trials run again
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        space = param_space(spec)
        space["__sweep__"] = {"base": spec.base.to_dict(), "tracking_uri": uri, "parent_run_id": parent_run_id,
                              "trials_dir": f"{experiment_path}/trials"}
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(num_samples=spec.num_samples, max_concurrent_trials=spec.max_concurrent,
                                        scheduler=_scheduler(spec)),
            run_config=tune.RunConfig(name=spec.name, storage_path=root, stop=_stop_collapsed))
    grid = tuner.fit()

    trials = []
    for r in grid:
        params = {k: v for k, v in (r.config or {}).items() if k != "__sweep__"}
        metrics = r.metrics or {}
        trials.append({"params": params, OBJECTIVE: metrics.get(OBJECTIVE), "collapsed": metrics.get("collapsed"),
                       "epoch": metrics.get("epoch"), "online_map": metrics.get("online_map"),
                       "error": str(r.error) if r.error else None})
    finished = [t for t in trials if t[OBJECTIVE] is not None and not t["collapsed"]]
    if not finished:
        raise RuntimeError(f"sweep {spec.name}: no trial finished with an mAP; see {experiment_path}")
    best = max(finished, key=lambda t: t[OBJECTIVE])
    best_config = spec.base.replace(best["params"])
    best_path = Path(root) / spec.name / "best_config.yaml" if not storage.is_remote(root) else Path(f"best_{spec.name}.yaml")
    best_path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# best trial of sweep {spec.name} ({spec.source}): fast linear-probe mAP {best[OBJECTIVE]:.4f}\n"
              f"# searched values: {best['params']}\n")
    best_path.write_text(header + dump_yaml(best_config))
    tracking.log_artifact(uri, parent_run_id, best_path)
    tracking.RunLogger(uri, parent_run_id).log_metrics({f"best_{OBJECTIVE}": best[OBJECTIVE]}, step=0)
    tracking.end_run(uri, parent_run_id)
    return SweepResult(str(best_path), float(best[OBJECTIVE]), trials, parent_run_id, uri)
