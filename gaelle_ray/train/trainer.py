"""The driver side of `gaelle pretrain`: Ray, MLflow and the TorchTrainer put together.

Layout of a run directory (`train.run_dir`, local path or URI):

    <run_dir>/mlflow.db          default MLflow store (sqlite), artifacts in mlartifacts/
    <run_dir>/mlflow_run.json    the MLflow run id, so --resume continues the same run
    <run_dir>/train/epoch_NNNNN/ checkpoints (Ray Train storage, newest K kept)

A new run refuses a run directory that already holds checkpoints (use --resume, or another
`train.run_dir`); `--resume` continues from the newest checkpoint with the same learning
rate schedule and queues, with any number of workers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray.train
from ray.train.torch import TorchTrainer

from gaelle_ray import storage, tracking
from gaelle_ray.config import Config
from gaelle_ray.data.pipeline import build_pretrain_stream, ordered_ingest_options
from gaelle_ray.preflight import check_pretrain_inputs
from gaelle_ray.progress import bars_wanted
from gaelle_ray.ray_setup import build_torch_trainer, check_cpu_budget, init_ray, wait_for_cpus
from gaelle_ray.train.checkpoint import clear_stop_reason, read_stop_reason
from gaelle_ray.train.init_from import check_init_from
from gaelle_ray.train.loop import train_loop_per_worker

log = logging.getLogger(__name__)

RUN_NAME = "train"


class PretrainStopped(RuntimeError):
    """The run stopped itself (non-finite losses or collapse); the newest good checkpoint is kept."""


@dataclass
class PretrainResult:
    run_dir: str
    checkpoint: str | None  # path/URI of the newest checkpoint folder
    metrics: dict
    tracking_uri: str
    mlflow_run_id: str


def _run_uri(config: Config) -> str:
    """Where Ray Train keeps this run's checkpoints: <ray.storage_path or train.run_dir>/train."""
    return storage.join(storage.normalise(config.ray.storage_path or config.train.run_dir), RUN_NAME)


def _read_run_id(run_dir: str) -> str | None:
    saved = storage.read_json(storage.normalise(run_dir), storage.RUN_ID_FILE)
    return saved["run_id"] if saved else None


def _write_run_id(run_dir: str, run_id: str) -> None:
    storage.write_json(storage.normalise(run_dir), storage.RUN_ID_FILE, {"run_id": run_id})


def make_stream_factory(config: Config):
    """A callable for TorchTrainer(datasets=...): Ray calls it at every (re)start of the worker
    group, and the stream then begins at the epoch after the newest complete checkpoint."""
    run_uri = _run_uri(config)

    def factory():
        done = storage.latest_epoch(run_uri)
        start = 0 if done is None else done + 1
        return build_pretrain_stream(config, start_epoch=min(start, config.train.epochs - 1))

    return factory


def build_trainer(config: Config, tracking_uri: str = "", run_id: str = "", callbacks=()) -> TorchTrainer:
    """The pretraining TorchTrainer: train_loop_per_worker on train.num_workers workers, the
    stream as its "train" dataset, checkpoints under <ray.storage_path or train.run_dir>/train.
    The workers draw progress bars (on the driver) when this driver is on a terminal."""
    tc = config.train
    return build_torch_trainer(
        train_loop_per_worker,
        {"config": config.to_dict(), "tracking_uri": tracking_uri, "run_id": run_id, "run_uri": _run_uri(config),
         "progress_bars": bars_wanted()},
        name=RUN_NAME, storage_path=storage.normalise(config.ray.storage_path or tc.run_dir),
        num_workers=tc.num_workers, use_gpu=tc.use_gpu, cpus_per_worker=config.ray.num_cpus_per_worker,
        keep_checkpoints=tc.keep_checkpoints, max_failures=tc.max_failures, callbacks=callbacks,
        placement_strategy=config.ray.placement_strategy, datasets={"train": make_stream_factory(config)},
        dataset_config=ray.train.DataConfig(execution_options=ordered_ingest_options())
        if config.data.preserve_order else None)


def pretrain(config: Config, *, resume: bool = False, address: str = "", track: bool = True,
             parent_run_id: str | None = None, callbacks=(), check_budget: bool = True,
             config_file: str | os.PathLike | None = None, overrides=()) -> PretrainResult:
    """Run GAELLE pretraining on Ray Train; returns where the newest checkpoint is and the
    final metrics. Raises ValueError before anything starts on a bad setup, PretrainStopped
    when the run stopped itself.

    parent_run_id: MLflow parent (a sweep's run). callbacks: Ray Train callbacks (a Tune
    trial passes TuneReportCallback). check_budget: False inside Tune trials, which share
    the cluster with each other (the sweep checks the budget once for all).
    config_file, overrides: the YAML and `--set` strings the config came from; a new MLflow
    run is named after them (tracking.pretrain_run_name), a resumed run keeps its name."""
    tc = config.train
    run_uri = _run_uri(config)
    done = storage.latest_epoch(run_uri)
    if done is not None and not resume:
        raise ValueError(f"train.run_dir = {tc.run_dir!r} already holds a run (checkpoint of epoch {done}); "
                         "pass --resume to continue it, or choose another train.run_dir")
    if resume and done is None:
        log.warning("--resume: no checkpoint in %s, starting from epoch 0", run_uri)
    check_pretrain_inputs(config, resume)  # shards, split, storage: one-line errors, before Ray starts
    check_online_data(config)
    check_init_from(config, resuming=resume and done is not None)

    # Ray and the CPU budget first: nothing is written before the setup is known to run.
    # A local instance gets at least enough logical CPUs for the workers and two crop tasks.
    needed = tc.num_workers * config.ray.num_cpus_per_worker + 2 * config.data.crop_cpus
    init_ray(address, num_cpus=None if address else max(os.cpu_count() or 1, int(needed + 0.999)))
    if check_budget:
        check_cpu_budget(wait_for_cpus(needed - config.data.crop_cpus, 120 if address else 0), tc.num_workers,
                         config.ray.num_cpus_per_worker, config.data.crop_cpus)

    tracking_uri, run_id = "", ""
    if track:
        tracking_uri = tracking.resolve_tracking_uri(config)
        tracking.check_reachable(tracking_uri)
        run_id = (_read_run_id(tc.run_dir) if resume else None) or ""
        if not run_id:
            run_id = tracking.start_run(tracking_uri, config.tracking.experiment,
                                        tracking.pretrain_run_name(config, config_file, overrides),
                                        config.flat(), {**tracking.version_tags(), "job": "pretrain",
                                                        **({"config_file": str(config_file)} if config_file else {})},
                                        parent_run_id=parent_run_id)
            _write_run_id(tc.run_dir, run_id)
        _log_config_artifact(config, tracking_uri, run_id)

    clear_stop_reason(run_uri)
    try:
        result = build_trainer(config, tracking_uri, run_id, callbacks).fit()
    except Exception:  # a worker that stopped the run (its data failed) and no restart left to see the record
        if not read_stop_reason(run_uri):
            raise
        result = None
    metrics = dict(result.metrics or {}) if result else {}
    if result is not None:
        checkpoint = _checkpoint_uri(result.checkpoint) if result.checkpoint else None
    else:
        newest = storage.latest_epoch(run_uri)
        checkpoint = None if newest is None else storage.join(run_uri, storage.checkpoint_name(newest))
    if track:  # down at the run's end: training is done and its records stay local; don't crash
        try:
            tracking.check_reachable(tracking_uri)
        except ValueError as exc:
            log.warning("%s: MLflow run %s is left unfinished, without its final artifacts; the checkpoints and "
                        "the run id (%s) stay in %s", exc, run_id, storage.RUN_ID_FILE, tc.run_dir)
            track = False
    if track and result is not None and result.checkpoint:
        _log_final_artifacts(config, result.checkpoint, checkpoint, tracking_uri, run_id)
    stopped = read_stop_reason(run_uri)
    if stopped:
        if track:
            tracking.set_tags(tracking_uri, run_id, {"stopped": stopped["reason"]})
            tracking.end_run(tracking_uri, run_id, "FAILED")
        raise PretrainStopped(f"pretraining stopped at epoch {stopped['epoch']}, iteration {stopped['iteration']}: "
                              f"{stopped['reason']}; newest good checkpoint: {checkpoint or 'none'}")
    if track:
        tracking.end_run(tracking_uri, run_id)
    return PretrainResult(tc.run_dir, checkpoint, metrics, tracking_uri, run_id)


def check_online_data(config: Config) -> None:
    """With online evaluation on: its query split must not be in the pretraining data (the
    leakage guard; eval.allow_overlap lets it run with a warning). Raises ValueError."""
    from gaelle_ray.eval.leakage import check_overlap
    from gaelle_ray.eval.online import OnlineSettings

    online = OnlineSettings.from_config(config)
    if online is None:
        return
    try:
        check_overlap(config.data.shards, online.data, online.query_split, config.eval.allow_overlap,
                      pretrain_splits=[config.data.split])
    except FileNotFoundError as exc:
        raise ValueError(f"eval.online_every_epochs = {config.eval.online_every_epochs}: cannot read the "
                         f"online evaluation data {online.data!r} ({exc}); set eval.online_data, or 0 to "
                         "turn online evaluation off") from None


def _log_config_artifact(config: Config, uri: str, run_id: str) -> None:
    import tempfile

    from gaelle_ray.config import dump_yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(dump_yaml(config))
        tracking.log_artifact(uri, run_id, path)


def _checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """A local path, or scheme://path for a checkpoint on a remote filesystem."""
    kind = checkpoint.filesystem.type_name
    return checkpoint.path if kind == "local" else f"{kind}://{checkpoint.path}"


BACKBONE_MODEL = "backbone"  # the MLflow model's name


def log_backbone_model(arch: str, exported: dict, uri: str, run_id: str, epoch: int = 0) -> str | None:
    """The exported backbone also as an MLflow PyTorch model of the run, ready to register:
    a torchvision ResNet with fc = Identity (input (N, 3, H, W) normalised float32 images,
    output (N, features)) holding the exported weights, its pip requirements given
    explicitly; the run's metrics of `epoch` are linked to it. Returns its models:/ URI, or
    None (with a warning) when logging it failed: the file artifact is logged already."""
    from gaelle_ray.model.backbone import build_backbone

    backbone = build_backbone(arch)
    backbone.load_state_dict({k: v for k, v in exported.items() if not k.startswith("fc.")}, strict=True)
    backbone.eval()
    try:
        return tracking.log_torch_model(uri, run_id, backbone, name=BACKBONE_MODEL, step=epoch,
                                        output_dim=backbone.num_features, params={"arch": arch, "epoch": epoch})
    except Exception as exc:  # a store without model support, a full disk: the run itself is fine
        log.warning("the backbone was not logged as an MLflow model (it is logged as a file): %s: %s",
                    type(exc).__name__, exc)
        return None


def _log_final_artifacts(config: Config, ckpt: ray.train.Checkpoint, checkpoint: str, uri: str, run_id: str) -> None:
    """From the newest checkpoint: the backbone exported as a torchvision state dict, the loss
    curves, and the attention maps of a few validation images (PNG), into MLflow and into
    <run_dir>/pictures when the run dir is local."""
    import tempfile

    import torch

    from gaelle_ray import viz
    from gaelle_ray.model import build_model
    from gaelle_ray.model.weights import export_backbone, load_state_strict

    with tempfile.TemporaryDirectory() as tmp:
        with ckpt.as_directory() as local:  # downloaded when remote
            state, meta = storage.load_checkpoint(local)
        model = build_model(config)
        load_state_strict(model, storage.worker_model_state(state, checkpoint), checkpoint)
        path = Path(tmp) / f"backbone_{config.model.arch}.pth"
        exported = export_backbone(model)
        torch.save(exported, path)
        tracking.log_artifact(uri, run_id, path)
        log_backbone_model(config.model.arch, exported, uri, run_id, epoch=int(meta["epoch"]))

        run_dir = storage.normalise(config.train.run_dir)
        pictures = Path(tmp if storage.is_remote(run_dir) else run_dir) / "pictures"
        fig = viz.plot_loss_curves(state["history"], nmb_prototypes=config.model.nmb_prototypes,
                                   title=f"GAELLE pretraining, {config.model.arch}")
        files = [viz.save_figure(fig, pictures / "loss_curves.png")]
        baselines = (state.get("online") or {}).get("baselines", {})
        if baselines or any("online_map" in r for r in state["history"]):
            fig = viz.plot_online_map(state["history"], baselines.get("online_map"),
                                      linear_baseline=baselines.get("online_linear_map"),
                                      title=f"online mAP on held-out images, {config.model.arch} ({config.eval.dataset})")
            files.append(viz.save_figure(fig, pictures / "online_map.png"))
        images = _validation_images(config, count=4, size=config.augmentation.size_crops[0])
        if images is not None:
            fig = viz.plot_attention(images[0], viz.attention_maps(model, images[1]))
            files.append(viz.save_figure(fig, pictures / f"attention_epoch_{meta['epoch']:05d}.png"))
        for file in files:
            tracking.log_artifact(uri, run_id, file, "pictures")


def _validation_images(config: Config, count: int, size: int):
    """(pictures (n, S, S, 3) uint8, normalised (n, 3, S, S)) of the first images of the shards'
    eval test split (or the pretraining split), or None when there are none."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from PIL import Image

    from gaelle_ray.config import MEAN, STD
    from gaelle_ray.data.shards import list_shards

    for split in (config.eval.test_split, config.data.split):
        try:
            paths = list_shards(config.data.shards, split)
        except (ValueError, OSError):
            continue
        if not paths:
            continue
        fs, path = storage.resolve(paths[0])
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=["jpeg"]).slice(0, count)
        pictures = []
        for jpeg in table.column("jpeg").to_pylist():
            img = Image.open(io.BytesIO(jpeg)).convert("RGB")
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))))
            left, top = (img.width - size) // 2, (img.height - size) // 2
            pictures.append(np.asarray(img.crop((left, top, left + size, top + size))))
        if not pictures:
            continue
        arr = np.stack(pictures)  # (n, S, S, 3)
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255  # (n, 3, S, S)
        x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
        return arr, x
    return None
