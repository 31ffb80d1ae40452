"""`train_loop_per_worker`: what every Ray Train worker runs, top to bottom.

    set up (device, seeds, model, synchronised BatchNorm, DDP, stepper, online probe)
    restore from the newest checkpoint if Ray hands one over
    a fresh run with online evaluation: score the random initialisation (the baseline)
    for each epoch:
        run its steps (progress line and step metrics every `train.log_every_steps`)
        end it (metrics averaged over workers, online evaluation when due, collapse watch,
                checkpoint written by rank 0 and uploaded by Ray, epoch metrics to MLflow
                from rank 0)

A run that must stop (too many non-finite steps in a row, or a collapse with
`train.collapse_action: stop`) reports `stopped` with the reason and returns normally, so
Ray does not retry it; the driver turns it into a clear error. Worker crashes are left to
Ray Train's FailureConfig, which restarts the workers from the newest checkpoint.

A data failure seen by one worker only (a shard that cannot be read, with
`data.bad_shard_action: stop`, or a stream that ran dry) cannot return normally: the other
workers would wait for it in their next collective. That worker writes the stop record
(`train/checkpoint.write_stop_reason`) and raises `DataStopped`; Ray Train ends the worker
group, and a restarted group finds the record and returns at once (no retraining, no new
checkpoint); the driver reads the record either way.
"""

from __future__ import annotations

import itertools
import logging
import random
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gaelle_ray.config import Config
from gaelle_ray.data.pipeline import (BadShardError, StreamBatch, StreamExhaustedError, count_rows, epoch_batches,
                                     steps_per_epoch)
from gaelle_ray.eval.online import OnlineProbe, OnlineSettings
from gaelle_ray.losses.queue import per_worker_length
from gaelle_ray.model import build_model
from gaelle_ray.model.norm import convert_group_batchnorm
from gaelle_ray.progress import worker_bar
from gaelle_ray.ray_setup import quiet_train_worker_console
from gaelle_ray.storage import (CHECKPOINT_PREFIX, META_FILE, STATE_FILE, checkpoint_name, is_remote, latest_epoch,
                                load_checkpoint, local_copy, save_checkpoint)
from gaelle_ray.storage import join as storage_join
from gaelle_ray.train.checkpoint import queues_for_rank, read_stop_reason, write_stop_reason
from gaelle_ray.train.collapse import collapse_check, online_collapse_check
from gaelle_ray.train.init_from import apply_init_from
from gaelle_ray.train.step import GaelleStepper, StepMetrics, TooManyNonFiniteSteps

log = logging.getLogger(__name__)

EPOCH_KEYS = ("loss", "loss_global", "loss_local", "loss_l2g", "code_entropy", "prototypes_in_use")


# ----------------------------------------------------------------------------- set-up


@dataclass
class Worker:
    """One training worker's place in the run and what it trains."""

    config: Config
    rank: int
    world: int
    device: torch.device
    group: object  # process group of the training workers; None with one worker
    steps: int  # steps per epoch
    stepper: GaelleStepper
    history: list[dict] = field(default_factory=list)  # one record per finished epoch
    logger: object = None  # tracking.RunLogger on rank 0 when the run is tracked
    online: OnlineProbe | None = None  # the online evaluation, when eval.online_every_epochs > 0
    # {"baselines": every online metric of the random init, "latest": the newest evaluation}
    online_state: dict = field(default_factory=dict)
    run_uri: str = ""  # the run's storage folder (its stop record), "" when not known (tests)

    @property
    def images_per_step(self) -> int:
        return self.config.train.batch_size_per_worker * self.world


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_training_model(config: Config, device: torch.device, world: int):
    """(model, what the step calls, process group): the model with synchronised BatchNorm
    across the workers (our GroupBatchNorm on every backend, gloo and nccl alike: one
    implementation, the one the tests run), in channels-last layout when configured,
    wrapped in DDP when there are several workers and compiled when configured."""
    group = dist.group.WORLD if world > 1 else None
    model = build_model(config, position_group=group)
    if world > 1 and config.model.sync_bn:
        model = convert_group_batchnorm(model, group)
    model.to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward_model: nn.Module = model
    if world > 1:
        forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.train.compile:
        forward_model = torch.compile(forward_model, backend=config.train.compile_backend)
    return model, forward_model, group


def set_up_worker(config: Config, resuming: bool | None = None) -> Worker:
    """Device, seeds, model and stepper of this worker (inside a Ray Train worker group).
    resuming: a checkpoint will be restored (None: Ray hands one over)."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    use_gpu = torch.cuda.is_available() and config.train.use_gpu
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.ray.num_cpus_per_worker)))
    _seed_everything(config.train.seed + rank)
    steps = steps_per_epoch(config, count_rows(config), world)
    model, forward_model, group = build_training_model(config, device, world)
    if resuming is None:
        resuming = ray.train.get_checkpoint() is not None
    apply_init_from(model, config, resuming=resuming,
                    say=write_progress_line if rank == 0 else None)
    stepper = GaelleStepper(model, config, device, group, world, rank, steps, forward_model)
    settings = OnlineSettings.from_config(config)
    online = OnlineProbe(settings, rank, world) if settings is not None else None
    return Worker(config, rank, world, device, group, steps, stepper, online=online)


def checkpoint_to_restore(handed: ray.train.Checkpoint | None, run_uri: str) -> ray.train.Checkpoint | str | None:
    """The checkpoint Ray handed over, or the run folder's newest complete checkpoint (its
    path) when that one is newer: a kill between Ray's upload of a checkpoint and Ray's
    record of it leaves Ray with the older one, while the stream starts after the newest
    complete folder (trainer.make_stream_factory); the state must match the stream."""
    newest = latest_epoch(run_uri) if run_uri else None
    if newest is None:
        return handed
    name = Path(str(handed.path)).name if handed is not None else ""
    handed_epoch = int(name[len(CHECKPOINT_PREFIX):]) if name[len(CHECKPOINT_PREFIX):].isdigit() else -1
    if handed is not None and handed_epoch >= newest:
        return handed
    return storage_join(run_uri, checkpoint_name(newest))


def restore(worker: Worker, checkpoint: ray.train.Checkpoint | str | None) -> int:
    """Load a checkpoint (what checkpoint_to_restore chose: Ray's, or a folder's path or URI)
    into the worker; the epoch to start at.

    The queues are re-split when the checkpoint was written by another number of workers."""
    if checkpoint is None:
        return 0
    config, batch, world = worker.config, worker.config.train.batch_size_per_worker, worker.world
    if isinstance(checkpoint, str):
        with local_copy(checkpoint, (STATE_FILE, META_FILE)) as ckpt_dir:
            state, meta = load_checkpoint(ckpt_dir)
    else:
        with checkpoint.as_directory() as ckpt_dir:
            state, meta = load_checkpoint(ckpt_dir)
    lengths = {"queue": per_worker_length(config.queue.queue_length, batch, world),
               "local_queue": per_worker_length(config.queue.local_queue_length, batch * config.num_slots, world)}
    queues = {name: queues_for_rank(state["queues"][name], worker.rank, world, lengths, name)
              for name in ("queue", "local_queue")}
    worker.stepper.load_state_dict(state["worker"], queues=queues)
    worker.history = list(state["history"])
    worker.online_state = dict(state.get("online") or {})
    start_epoch = int(meta["epoch"]) + 1
    if worker.rank == 0:
        write_progress_line(f"resumed from {checkpoint_name(int(meta['epoch']))}: epoch {start_epoch}, iteration "
                            f"{worker.stepper.iteration} (checkpoint written by {meta['world_size']} workers, "
                            f"now {world})")
    return start_epoch


def open_run_logger(worker: Worker, tracking_uri: str, run_id: str) -> None:
    """On rank 0 of a tracked run: the MLflow logger, with the epochs that were checkpointed
    but never logged (a crash between the two) logged now, and MLflow's system metrics
    (`system/...`, every 10 s) recorded until this training thread ends, i.e. until
    train_loop_per_worker returns or raises."""
    if worker.rank != 0 or not run_id:
        return
    from gaelle_ray.tracking import RunLogger

    run_dir = worker.config.train.run_dir  # what a tracking outage holds back stays with the run when it is local
    worker.logger = RunLogger(tracking_uri, run_id,
                              unsent_dir=None if is_remote(run_dir) else Path(run_dir) / "mlflow_unsent")
    device = worker.device
    worker.logger.set_tags({"world_size": worker.world,
                            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"})
    for past in worker.history:
        worker.logger.log_metrics({f"epoch_{k}": v for k, v in past.items() if k != "epoch"}, step=past["epoch"])
    worker.logger.monitor_system(until_caller_ends=True)


# ----------------------------------------------------------------------------- progress


def write_progress_line(message: str) -> None:
    """One progress line on the worker's stdout (what `ray job logs` shows). Not the print
    builtin: Ray Train patches it to also copy lines into its logger, so each showed twice."""
    sys.stdout.write(f"[gaelle] {message}\n")
    sys.stdout.flush()


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


# ----------------------------------------------------------------------------- one epoch


@dataclass
class EpochTally:
    """What an epoch's steps add up to, on one worker."""

    started: float  # perf_counter at the start of the epoch, before the wait for its first batch
    sums: dict[str, float] = field(default_factory=lambda: defaultdict(float))  # EPOCH_KEYS over finite steps
    finite_steps: int = 0
    wait_s: float = 0.0
    skipped_records: int = 0
    stop_reason: str | None = None  # set when the run must stop before the epoch ends

    def add(self, item: StreamBatch, m: StepMetrics) -> None:
        self.wait_s += item.wait_s
        self.skipped_records += item.skipped
        if not m.nonfinite:
            self.finite_steps += 1
            for key in EPOCH_KEYS:
                value = getattr(m, key)
                if value is not None:  # None: a loss term with weight 0
                    self.sums[key] += value


class DataStopped(RuntimeError):
    """This worker's data failed (the message says how); the run's stop record is written."""


def run_epoch(worker: Worker, batches: Iterable[StreamBatch], epoch: int, bars: bool = False) -> EpochTally:
    """Run the steps of `epoch` over its batches; the step metrics every
    train.log_every_steps steps, with a progress line, or (bars: the driver is on a
    terminal; rank 0 only) a progress bar drawn on the driver whose label carries the loss.
    A skipped (non-finite) step gets a warning line naming its cause and, when its input
    held non-finite values, the images. Stops early (tally.stop_reason) after too many
    non-finite steps in a row; raises DataStopped when the stream fails (module docstring)."""
    tc, stepper = worker.config.train, worker.stepper
    tally: EpochTally | None = None
    bar = worker_bar(worker.steps, f"epoch {epoch + 1}/{tc.epochs}", unit="step") if bars else None
    try:
        for item in _stopping_on_data_errors(worker, batches, epoch):
            if tally is None:  # the epoch's clock starts before the wait for its first batch
                tally = EpochTally(started=time.perf_counter() - item.wait_s)
            try:
                m = stepper.step(item.crops, epoch, tc.epochs, image_ids=item.image_ids)
            except TooManyNonFiniteSteps as exc:
                tally.stop_reason = f"non-finite loss: {exc}"
                return tally
            if m.nonfinite and worker.rank == 0:
                write_progress_line(f"WARNING epoch {epoch + 1}/{tc.epochs} iteration {stepper.iteration - 1} "
                                    f"skipped: {m.skip_reason}")
            tally.add(item, m)
            done = item.step + 1
            if done % tc.log_every_steps == 0 or done == worker.steps:
                _log_step(worker, tally, m, epoch, done, bar)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if tally is None:
        raise RuntimeError(f"epoch {epoch}: the stream gave no batch")
    return tally


def _stopping_on_data_errors(worker: Worker, batches: Iterable[StreamBatch], epoch: int):
    """`batches`, with an unreadable shard or a stream that ran dry turned into the run's
    stop record and DataStopped (module docstring)."""
    try:
        yield from batches
    except (BadShardError, StreamExhaustedError) as exc:
        reason = str(exc) if isinstance(exc, BadShardError) else f"the data stream ran dry: {exc}"
        write_progress_line(f"stopping (worker {worker.rank}): {reason}")
        if worker.run_uri:
            write_stop_reason(worker.run_uri, reason, epoch, worker.stepper.iteration)
        raise DataStopped(reason) from None


def _log_step(worker: Worker, tally: EpochTally, m: StepMetrics, epoch: int, done: int, bar=None) -> None:
    tc, steps = worker.config.train, worker.steps
    elapsed = max(time.perf_counter() - tally.started, 1e-9)
    imgs = done * worker.images_per_step / elapsed
    if bar is not None:  # the bar shows the rate and the time left; its label the loss
        bar.set_description(f"epoch {epoch + 1}/{tc.epochs} loss {m.loss:.4f} data wait "
                            f"{100 * tally.wait_s / elapsed:.0f}%")
    elif worker.rank == 0:
        remaining = (tc.epochs - epoch - 1) * steps + steps - done
        write_progress_line(
            f"epoch {epoch + 1}/{tc.epochs} step {done}/{steps} loss {m.loss:.4f} "
            f"(global {m.loss_global:.3f} local {_term(m.loss_local)} l2g {_term(m.loss_l2g)}) "
            f"lr {m.lr:.4g} {imgs:.1f} img/s data wait {100 * tally.wait_s / elapsed:.0f}% "
            f"eta {_format_eta(remaining * elapsed / done)}")
    if worker.logger is not None:
        terms = {k: v for k, v in (("loss_local", m.loss_local), ("loss_l2g", m.loss_l2g)) if v is not None}
        worker.logger.log_metrics({"loss": m.loss, "loss_global": m.loss_global, **terms, "lr": m.lr,
                                   "images_per_s": imgs,
                                   "data_wait_share": tally.wait_s / elapsed,
                                   "code_entropy": m.code_entropy, "prototypes_in_use": m.prototypes_in_use,
                                   "skipped_records": tally.skipped_records,
                                   "nonfinite_steps": worker.stepper.nonfinite_total},
                                  step=worker.stepper.iteration)


def _term(value: float | None) -> str:
    return "off" if value is None else f"{value:.3f}"


def _mean_over_workers(values: dict[str, float], group, device) -> dict[str, float]:
    if group is None:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    t /= dist.get_world_size(group)
    return dict(zip(keys, t.tolist()))


def _gather_queues(worker: Worker) -> dict[str, list | None]:
    """Every rank's queue states, on every rank (small: a few MB at COCO scale)."""
    stepper = worker.stepper
    mine = {"queue": stepper.queue.state_dict() if stepper.queue else None,
            "local_queue": stepper.local_queue.state_dict() if stepper.local_queue else None}
    if worker.world == 1:
        return {k: [v] for k, v in mine.items()}
    everyone: list = [None] * worker.world
    dist.all_gather_object(everyone, mine, group=worker.group)
    return {k: [e[k] for e in everyone] for k in mine}


def _computed(worker: Worker) -> set[str]:
    """The EPOCH_KEYS this run computes (a loss term with weight 0 is not)."""
    _, w_local, w_l2g = worker.stepper.settings.weights
    off = {"loss_local"} if w_local == 0 else set()
    return set(EPOCH_KEYS) - off - ({"loss_l2g"} if w_l2g == 0 else set())


def end_epoch(worker: Worker, epoch: int, tally: EpochTally) -> str | None:
    """Every rank: the epoch's metrics averaged over workers, the collapse watch, the report
    to Ray Train (with a checkpoint written by rank 0 when one is due), the epoch metrics to
    MLflow. Returns why the run must stop, or None."""
    tc, stepper = worker.config.train, worker.stepper
    elapsed = time.perf_counter() - tally.started
    local = {k: tally.sums[k] / max(tally.finite_steps, 1) for k in EPOCH_KEYS if k in _computed(worker)}
    local.update(images_per_s=worker.steps * worker.images_per_step / elapsed, data_wait_share=tally.wait_s / elapsed,
                 skipped_records=float(tally.skipped_records))
    epoch_metrics = _mean_over_workers(local, worker.group, worker.device)
    epoch_metrics["skipped_records"] *= worker.world  # a sum, not a mean
    epoch_metrics["nonfinite_steps"] = float(stepper.nonfinite_total)
    online = {}
    if worker.online is not None and worker.online.settings.due(epoch, tc.epochs):
        online = evaluate_online(worker, epoch)
    worker.history.append({"epoch": epoch, **epoch_metrics, **online})

    stop_reason = None
    collapse = collapse_check(epoch_metrics, epoch, worker.config)
    if not collapse and online:  # judged when a new online mAP arrives, not again on each epoch after it
        baseline = worker.online_state.get("baselines", {}).get("online_map")
        collapse = online_collapse_check(worker.history, baseline, epoch, worker.config)
    if collapse:
        write_progress_line(f"WARNING {collapse}")
        if tc.collapse_action == "stop":
            stop_reason = collapse
    report = {"epoch": epoch, "iteration": stepper.iteration, "collapsed": bool(collapse),
              "stopped": stop_reason or "", **epoch_metrics, **online_metrics(worker)}
    queues = _gather_queues(worker)  # a collective: every rank, every epoch
    if (epoch + 1) % tc.checkpoint_every_epochs == 0 or epoch + 1 == tc.epochs or stop_reason:
        _report_with_checkpoint(worker, epoch, report, queues)
    else:
        ray.train.report(report)
    if worker.logger is not None:
        logged = {**epoch_metrics, **{k: v for k, v in online.items() if k != "online_map_epoch"}}  # step = epoch
        worker.logger.log_metrics({f"epoch_{k}": v for k, v in logged.items()}, step=epoch)
        if collapse:
            worker.logger.set_tags({"collapse_warning": collapse})
    return stop_reason


def _report_with_checkpoint(worker: Worker, epoch: int, report: dict, queues: dict) -> None:
    """Rank 0 writes the checkpoint folder and every rank reports (Ray uploads rank 0's)."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if worker.rank == 0:
            write_checkpoint(worker, tmp, epoch, queues)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(epoch))


def write_checkpoint(worker: Worker, directory: str, epoch: int, queues: dict) -> None:
    """The checkpoint of the end of `epoch` (state.pt and meta.json) into the local folder
    `directory`; `queues`: every rank's queue states (_gather_queues). What restore() reads."""
    state = {"worker": worker.stepper.state_dict(), "queues": queues, "history": worker.history,
             "online": worker.online_state}
    save_checkpoint(directory, state, {"epoch": epoch, "iteration": worker.stepper.iteration,
                                       "world_size": worker.world, "config": worker.config.to_dict()})


# ----------------------------------------------------------------------------- online evaluation


def online_metrics(worker: Worker) -> dict[str, float]:
    """The newest online evaluation, as reported with every epoch (so that schedulers and
    the progress line always see it): online_map (and online_linear_map when configured),
    the epoch it was measured at (-1: the baseline itself), and for each metric its
    random-init baseline (`<metric>_baseline`) and the gain over it (`<metric>_gain`)."""
    st = worker.online_state
    latest = st.get("latest")
    if not latest:
        return {}
    out = dict(latest)
    for key, base in st.get("baselines", {}).items():
        if key in latest:
            out[f"{key}_baseline"] = base
            out[f"{key}_gain"] = latest[key] - base
    return out


def evaluate_online(worker: Worker, epoch: int) -> dict[str, float]:
    """Every rank: score the current backbone (epoch -1: before the first step, the
    baseline); the progress line on rank 0. Returns online_metrics(worker)."""
    t0 = time.perf_counter()
    result = worker.online.evaluate(worker.stepper.model.backbone, worker.device, worker.group)
    latest = {**result, "online_map_epoch": float(epoch)}
    worker.online_state["latest"] = latest
    if epoch < 0:
        worker.online_state["baselines"] = dict(result)
    metrics = online_metrics(worker)
    if worker.rank == 0:
        bank, queries = worker.online.sizes
        what = "random-init baseline" if epoch < 0 else f"epoch {epoch + 1}/{worker.config.train.epochs}"
        gain = (f" (baseline {100 * metrics['online_map_baseline']:.1f}, {100 * metrics['online_map_gain']:+.1f})"
                if epoch >= 0 and "online_map_gain" in metrics else "")
        linear = ""
        if "online_linear_map" in result:
            linear = f", linear {100 * result['online_linear_map']:.1f}"
            if epoch >= 0 and "online_linear_map_gain" in metrics:
                linear += f" ({100 * metrics['online_linear_map_gain']:+.1f})"
        write_progress_line(f"{what} online k-NN mAP {100 * result['online_map']:.1f}{gain}{linear} "
                            f"({bank} bank / {queries} query images, {time.perf_counter() - t0:.1f}s)")
    return metrics


def log_online_baseline(worker: Worker) -> None:
    baselines = worker.online_state.get("baselines") or {}
    if worker.logger is not None and baselines:
        worker.logger.log_metrics({f"{k}_baseline": v for k, v in baselines.items()}, step=0)


# ----------------------------------------------------------------------------- the loop


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: {"config": Config.to_dict(), "tracking_uri", "run_id",
    "run_uri" (the run's storage folder, for the stop record), "progress_bars" (the driver is
    on a terminal: progress bars instead of progress lines)}."""
    quiet_train_worker_console()
    config = Config.from_dict(loop_config["config"], source="train_loop_config")
    tc = config.train
    if loop_config.get("run_uri") and read_stop_reason(loop_config["run_uri"]):
        return  # a restart after a worker stopped the run (DataStopped): nothing more to train
    checkpoint = checkpoint_to_restore(ray.train.get_checkpoint(), loop_config.get("run_uri", ""))
    worker = set_up_worker(config, resuming=checkpoint is not None)
    worker.run_uri = loop_config.get("run_uri", "")
    start_epoch = restore(worker, checkpoint)
    open_run_logger(worker, loop_config.get("tracking_uri", ""), loop_config.get("run_id", ""))
    if start_epoch >= tc.epochs:
        return
    if worker.online is not None and start_epoch == 0 and "baselines" not in worker.online_state:
        evaluate_online(worker, -1)  # the random initialisation of this run, before its first step
    log_online_baseline(worker)

    run_started = time.perf_counter()
    batches = epoch_batches(ray.train.get_dataset_shard("train"), tc.batch_size_per_worker, worker.steps,
                            tc.epochs - start_epoch, worker.device, start_epoch=start_epoch,
                            prefetch_batches=config.data.prefetch_batches)
    stop_reason, epoch = None, start_epoch
    for epoch in range(start_epoch, tc.epochs):
        tally = run_epoch(worker, itertools.islice(batches, worker.steps), epoch,
                          bars=bool(loop_config.get("progress_bars")) and worker.rank == 0)
        if tally.stop_reason:  # stopped mid-epoch: no new checkpoint (the newest good one stays)
            stop_reason = tally.stop_reason
            ray.train.report({"epoch": epoch, "iteration": worker.stepper.iteration, "collapsed": False,
                              "stopped": stop_reason})
            break
        stop_reason = end_epoch(worker, epoch, tally)
        if stop_reason:
            break

    if stop_reason and worker.rank == 0:
        write_stop_reason(loop_config["run_uri"], stop_reason, epoch, worker.stepper.iteration)
    if worker.rank == 0:
        write_progress_line(f"training loop finished in {_format_eta(time.perf_counter() - run_started)}"
                            + (f"; stopped: {stop_reason}" if stop_reason else ""))
    if worker.logger is not None:  # sends what a tracking outage held back, or keeps it in a file
        worker.logger.close()
