"""`train_loop_per_worker`: what every Ray Train worker runs, top to bottom.

setup (device, seeds, model, synchronised BatchNorm, DDP, stepper) -> restore from the
newest checkpoint if Ray hands one over -> for every batch of the stream: one step,
progress line and step metrics every `train.log_every_steps` -> at every epoch end: metrics
averaged over workers, collapse watch, checkpoint (rank 0 writes, Ray uploads), epoch
metrics to MLflow (rank 0).

A run that must stop (too many non-finite steps in a row, or a collapse with
`train.collapse_action: stop`) reports `stopped` with the reason and returns normally, so
Ray does not retry it; the driver turns it into a clear error. Worker crashes are left to
Ray Train's FailureConfig, which restarts the workers from the newest checkpoint.
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gaelle_ray.config import Config
from gaelle_ray.data.pipeline import count_rows, epoch_batches, steps_per_epoch
from gaelle_ray.model import build_model
from gaelle_ray.model.norm import convert_group_batchnorm
from gaelle_ray.losses.queue import per_worker_length
from gaelle_ray.train.checkpoint import (
    checkpoint_name, load_checkpoint, queues_for_rank, save_checkpoint, write_stop_reason,
)
from gaelle_ray.train.collapse import collapse_check
from gaelle_ray.train.step import GaelleStepper, TooManyNonFiniteSteps

log = logging.getLogger(__name__)

EPOCH_KEYS = ("loss", "loss_global", "loss_local", "loss_l2g", "code_entropy", "prototypes_in_use")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _build(config: Config, device: torch.device, world: int):
    model = build_model(config)
    group = dist.group.WORLD if world > 1 else None
    if world > 1 and config.model.sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:  # torch's SyncBatchNorm refuses CPU tensors
            model = convert_group_batchnorm(model, group)
    model.to(device)
    if device.type == "cuda" and config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    forward_model: nn.Module = model
    if world > 1:
        forward_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.train.compile:
        forward_model = torch.compile(forward_model)
    return model, forward_model, group


def _gather_queues(stepper: GaelleStepper, group, world: int) -> dict[str, list | None]:
    """Every rank's queue states, on every rank (small: a few MB at COCO scale)."""
    mine = {"queue": stepper.queue.state_dict() if stepper.queue else None,
            "local_queue": stepper.local_queue.state_dict() if stepper.local_queue else None}
    if world == 1:
        return {k: [v] for k, v in mine.items()}
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    return {k: [e[k] for e in everyone] for k in mine}


def _mean_over_workers(values: dict[str, float], group, device) -> dict[str, float]:
    if group is None:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    t /= dist.get_world_size(group)
    return dict(zip(keys, t.tolist()))


def say(message: str) -> None:
    """One progress line on the worker's stdout (what `ray job logs` shows). Not the print
    builtin: Ray Train patches it to also copy lines into its logger, so each showed twice."""
    sys.stdout.write(f"[gaelle] {message}\n")
    sys.stdout.flush()


def _format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. loop_config: {"config": Config.to_dict(), "tracking_uri", "run_id",
    "run_uri" (the run's storage folder, for the stop record)}."""
    config = Config.from_dict(loop_config["config"], source="train_loop_config")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if torch.cuda.is_available() and config.train.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(config.ray.num_cpus_per_worker)))
    _seed_everything(config.train.seed + rank)

    tc = config.train
    batch = tc.batch_size_per_worker
    rows = count_rows(config)
    steps = steps_per_epoch(config, rows, world)
    model, forward_model, group = _build(config, device, world)
    stepper = GaelleStepper(model, config, device, group, world, rank, steps, forward_model)

    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            state, meta = load_checkpoint(ckpt_dir)
        lengths = {"queue": per_worker_length(config.queue.queue_length, batch, world),
                   "local_queue": per_worker_length(config.queue.local_queue_length, batch * config.num_slots, world)}
        queues = {name: queues_for_rank(state["queues"][name], rank, world, lengths, name)
                  for name in ("queue", "local_queue")}
        stepper.load_state_dict(state["worker"], queues=queues)
        start_epoch, history = int(meta["epoch"]) + 1, list(state["history"])
        if rank == 0:
            say(f"resumed from {checkpoint_name(int(meta['epoch']))}: epoch {start_epoch}, iteration "
                f"{stepper.iteration} (checkpoint written by {meta['world_size']} workers, now {world})")

    logger = None
    if rank == 0 and loop_config.get("run_id"):
        from gaelle_ray.tracking import RunLogger
        logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"])
        logger.set_tags({"world_size": world, "device_name": torch.cuda.get_device_name(device)
                         if device.type == "cuda" else "cpu"})
        for past in history:  # epochs checkpointed but never logged (crash between the two)
            logger.log_metrics({f"epoch_{k}": v for k, v in past.items() if k != "epoch"}, step=past["epoch"])

    if start_epoch >= tc.epochs:
        return
    shard = ray.train.get_dataset_shard("train")
    sums: dict[str, float] = defaultdict(float)
    counted = 0
    skipped_records = 0
    t_epoch, wait_epoch, run_t0 = time.perf_counter(), 0.0, time.perf_counter()
    stop_reason, stop_reported = None, False
    for item in epoch_batches(shard, batch, steps, tc.epochs - start_epoch, device,
                              start_epoch=start_epoch, prefetch_batches=config.data.prefetch_batches):
        epoch, step = item.epoch, item.step
        if step == 0:  # the epoch's clock starts before the wait for its first batch
            t_epoch, wait_epoch = time.perf_counter() - item.wait_s, 0.0
            sums, counted, skipped_records = defaultdict(float), 0, 0
        try:
            m = stepper.step(item.crops, epoch, tc.epochs)
        except TooManyNonFiniteSteps as exc:
            stop_reason = f"non-finite loss: {exc}"
            break
        wait_epoch += item.wait_s
        skipped_records += item.skipped
        if not m.nonfinite:
            counted += 1
            for key in EPOCH_KEYS:
                sums[key] += getattr(m, key)
        done = step + 1
        if done % tc.log_every_steps == 0 or done == steps:
            elapsed = time.perf_counter() - t_epoch
            imgs = done * batch * world / max(elapsed, 1e-9)
            if rank == 0:
                remaining = (tc.epochs - epoch - 1) * steps + steps - done
                say(f"epoch {epoch + 1}/{tc.epochs} step {done}/{steps} loss {m.loss:.4f} "
                    f"(global {m.loss_global:.3f} local {m.loss_local:.3f} l2g {m.loss_l2g:.3f}) "
                    f"lr {m.lr:.4g} {imgs:.1f} img/s data wait {100 * wait_epoch / max(elapsed, 1e-9):.0f}% "
                    f"eta {_format_eta(remaining * elapsed / done)}")
            if logger is not None:
                logger.log_metrics({"loss": m.loss, "loss_global": m.loss_global, "loss_local": m.loss_local,
                                    "loss_l2g": m.loss_l2g, "lr": m.lr, "images_per_s": imgs,
                                    "data_wait_share": wait_epoch / max(elapsed, 1e-9),
                                    "code_entropy": m.code_entropy, "prototypes_in_use": m.prototypes_in_use,
                                    "skipped_records": skipped_records,
                                    "nonfinite_steps": stepper.nonfinite_total}, step=stepper.iteration)
        if done < steps:
            continue

        # ---- epoch end (every rank) ----
        elapsed = time.perf_counter() - t_epoch
        local = {k: sums[k] / max(counted, 1) for k in EPOCH_KEYS}
        local.update(images_per_s=steps * batch * world / elapsed, data_wait_share=wait_epoch / elapsed,
                     skipped_records=float(skipped_records))
        epoch_metrics = _mean_over_workers(local, group, device)
        epoch_metrics["skipped_records"] *= world  # a sum, not a mean
        epoch_metrics["nonfinite_steps"] = float(stepper.nonfinite_total)
        record = {"epoch": epoch, **epoch_metrics}
        history.append(record)
        collapse = collapse_check(epoch_metrics, epoch, config)
        if collapse:
            say(f"WARNING {collapse}")
            if tc.collapse_action == "stop":
                stop_reason = collapse
        last = epoch + 1 == tc.epochs
        report = {"epoch": epoch, "iteration": stepper.iteration, "collapsed": bool(collapse),
                  "stopped": stop_reason or "", **epoch_metrics}
        queues = _gather_queues(stepper, group, world)
        if (epoch + 1) % tc.checkpoint_every_epochs == 0 or last or stop_reason:
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    state = {"worker": stepper.state_dict(), "queues": queues, "history": history}
                    save_checkpoint(tmp, state, {"epoch": epoch, "iteration": stepper.iteration,
                                                 "world_size": world, "config": config.to_dict()})
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=checkpoint_name(epoch))
        else:
            ray.train.report(report)
        stop_reported = bool(stop_reason)
        if logger is not None:
            logger.log_metrics({f"epoch_{k}": v for k, v in epoch_metrics.items()}, step=epoch)
            if collapse:
                logger.set_tags({"collapse_warning": collapse})
        if stop_reason:
            break

    if stop_reason and not stop_reported:
        # stopped mid-epoch: no new checkpoint (the newest good one stays)
        ray.train.report({"epoch": epoch, "iteration": stepper.iteration, "collapsed": False,
                          "stopped": stop_reason})
    if stop_reason and rank == 0:
        write_stop_reason(loop_config["run_uri"], stop_reason, epoch, stepper.iteration)
    if rank == 0:
        say(f"training loop finished in {_format_eta(time.perf_counter() - run_t0)}"
            + (f"; stopped: {stop_reason}" if stop_reason else ""))
