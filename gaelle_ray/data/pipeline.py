"""The Ray Data stream that feeds multi-crop batches to the Ray Train workers.

This is the only module of :mod:`gaelle_ray.data` that imports Ray.

Shape of the stream
-------------------
Ray Data has a large fixed cost per execution (start-up before the first batch), so the
stream is built ONCE for all the epochs of a run instead of being re-executed every epoch:

1. *Work items.* The rows of the split (``data.split`` of the shards at ``data.shards``, the
   first ``data.max_images`` of them when > 0, in manifest order) are cut into items of at
   most ``rows_per_item`` consecutive rows of one shard: ``(shard, start, stop)``.
2. *Input.* ``ray.data.from_items`` holds one row ``{epoch, item}`` per item and epoch,
   epoch after epoch, the items of epoch ``e`` in a random order seeded by
   ``(train.seed, e)``. Ray Data consumes input blocks in order, so items reach the crop
   stage in epoch order (only the tasks in flight can finish out of order). Each input
   block costs the driver time and memory for as long as the stream lives (``ray.put`` and
   metadata; figures in docs/benchmarks.md), so the rows go into at most
   :data:`MAX_INPUT_BLOCKS` (8192) blocks of consecutive rows: one item per block, i.e. one
   crop task per item, up to 8192 item-epochs (the 2000-image demo has 320); beyond that
   ``ceil(rows / 8192)`` items per block and task (400 COCO epochs at 128 rows per item:
   370k item-epochs in 8192 blocks of 45-46 items instead of 370k blocks, which would hold
   the driver for minutes and gigabytes). A task works through its items one after the
   other and its output leaves it in blocks as it goes, so only the window of items in
   flight (tasks running x items per task) can arrive out of order; with many items per
   task that window can span an epoch boundary or two (each image is still used once per
   stream-epoch).
3. *Crop stage.* ``map_batches(crop_items, batch_size=1, num_cpus=data.crop_cpus)``: each
   task (one per input block) reads each item's rows from the Parquet shard with pyarrow (through
   ``pyarrow.fs``, so local paths, ``s3://`` and ``gs://`` all work; only the row groups
   that hold the rows are read), shuffles them with an rng seeded by
   ``(seed, epoch, shard, start)``, decodes and crops every image with an rng seeded by
   ``(seed, epoch, image_id)`` (so an image's crops in an epoch do not depend on scheduling,
   item size or worker count) through :func:`gaelle_ray.data.crops.multicrop_images`,
   drops undecodable rows and outputs one row per image:

   - ``crops_{r}``: uint8 (n_r, 3, S_r, S_r) per resolution r (per batch: (B, n_r, 3, S, S));
     when ``augmentation.colour_on_device`` is false, the colour half (jitter, grayscale,
     blur, normalise) runs here too and the crops are float16 normalised instead;
   - ``epoch``, ``image_id``: int64;
   - ``skipped``: int64, the number of undecodable records of the item on its first row, 0
     elsewhere, so that the column's sum over the stream counts the records skipped.

   There is no separate Ray Data read operator: reading a few row groups is part of the crop
   task, which keeps the CPU budget to one kind of task.

Shuffling is two-level: the order of the items is a fresh permutation every epoch and the
rows inside an item are shuffled, but a batch of B rows holds images of roughly
``B / rows_per_item + 1`` items (neighbouring rows of a shard). Shards are written in
image-id order, which for COCO carries no content order; use a small ``rows_per_item`` for
data sets whose row order means something.

Order
-----
What a stream holds is fixed by ``(train.seed, epochs, data)``: the item order of every
epoch, the row order inside an item and every image's crops are seeded. The ORDER in
which the rows reach a worker is not, by default, in two places of Ray Data: the executor
hands on each crop task's output as the task finishes (tasks in flight finish in any
order: seen with two one-item epochs, epoch 1 arrived first), and the worker's iterator
formats ``prefetch_batches`` batches in a thread pool and yields them as they are done
(seen: batches 0 and 1 of one task swapped between two runs). With Ray Data's
``execution_options.preserve_order`` both keep the input order and ``streaming_split``
deals the blocks out deterministically (it then ignores locality hints), so each worker's
batch sequence is a function of the seed, the epochs, the world size and the data, and a
resumed run sees exactly the batches the uninterrupted run would have seen (one worker,
bitwise: tests/train/test_resume_ray.py). Ray Train takes the option from the driver's
``DataContext`` when the trainer is created, or from ``DataConfig(execution_options=
ordered_ingest_options())``. The price is head-of-line blocking: a finished task's output
waits for the slower tasks before it (the crop tasks are of one size here).

Worker side
-----------
:func:`epoch_batches` iterates ONE ``iter_torch_batches(batch_size=B, drop_last=True)``
over the whole stream and cuts it into epochs of exactly ``steps_per_epoch`` batches
(:func:`steps_per_epoch`: ``floor(rows / (B * W))``, the remainder of an epoch is not
dropped but rolls over). Consequences, by design:

- the rows a worker gets beyond ``steps_per_epoch * B`` in epoch e are used at the start of
  its epoch e + 1, and so on; a batch may mix rows of two consecutive epochs (the
  ``row_epochs`` field says which), and with several crop tasks in flight a few items of
  epoch e + 1 may overtake the last items of epoch e. Every image is still seen once per
  stream-epoch, and at most ``B * W`` rows per epoch roll over.
- skipped (corrupt) records shorten the stream; if it runs dry before
  ``num_epochs * steps_per_epoch`` batches, :class:`StreamExhaustedError` says so.

Unreadable shards
-----------------
A shard that cannot be read while the stream runs (deleted, truncated or rewritten after
``gaelle prepare``) is handled by ``data.bad_shard_action``:

- ``stop`` (default): the crop task raises :class:`BadShardError` naming the shard, the rows
  and the cause; the worker's :func:`epoch_batches` re-raises it as a plain
  :class:`BadShardError` (Ray wraps task errors in its own exception types), and the
  training loop stops the run with that message (its checkpoints are kept).
- ``skip``: the item's rows are dropped with an error line naming the shard (they are not
  counted in ``skipped``: an item with no row left has no row to carry the count), and a
  stream built later (a restart or ``--resume``) leaves the shards it cannot open out of
  the epoch (:func:`split_shards`), with a warning naming them. The rows lost before that
  come out of the per-epoch slack; if the stream runs dry, :class:`StreamExhaustedError`.

CPU budget (read this before sizing a cluster)
----------------------------------------------
Ray Train workers hold their CPUs for the whole run. Ray Data tasks only run on the CPUs
left over, so on a cluster with ``C`` CPUs, ``W`` train workers of ``c`` CPUs each and crop
tasks of ``crop_cpus`` CPUs, you need::

    C >= W * c + crop_cpus          (at least one crop task can run)

and for throughput ``C - W * c`` should hold as many crop tasks as needed to keep up
(``(C - W * c) / crop_cpus`` tasks run at once). The input blocks are made on the driver
and the stream has no separate read tasks, so nothing else needs reserving. When the rule is broken
the crop tasks stay pending forever while the train workers wait for their first batch: a
deadlock, not an error (a local instance with ``num_cpus=2`` and two 1-CPU train workers is
the classic case). ``gaelle_ray.ray_setup.check_cpu_budget`` raises ValueError for it;
call it before ``trainer.fit()``.

The stream sets no ``DataContext.execution_options.resource_limits`` /
``exclude_resources``: they only cap what Ray Data *asks* for and cannot create free CPUs,
so they do not prevent the deadlock; and Ray Train (2.60) already reserves its workers'
resources through the autoscaling coordinator, leaving Ray Data what is left, so excluding
the training CPUs again would subtract them twice. ``data.read_parallelism`` > 0 caps the
number of concurrent crop tasks (0 lets Ray Data decide).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from gaelle_ray import storage
from gaelle_ray.config import AugmentationConfig
from gaelle_ray.data.crops import DecodeOptions, multicrop_images
from gaelle_ray.data.shards import read_manifest, shard_uri

__all__ = [
    "DEFAULT_ROWS_PER_ITEM",
    "MAX_INPUT_BLOCKS",
    "BadShardError",
    "StreamBatch",
    "StreamExhaustedError",
    "StreamPlan",
    "WorkItem",
    "build_pretrain_stream",
    "count_rows",
    "crop_item",
    "crop_items",
    "epoch_batches",
    "epoch_item_order",
    "input_blocks",
    "ordered_ingest_options",
    "plan_items",
    "read_rows",
    "split_shards",
    "steps_per_epoch",
    "work_item_rows",
]

logger = logging.getLogger(__name__)

DEFAULT_ROWS_PER_ITEM = 128  # rows per work item: the shards' default row group size
MAX_INPUT_BLOCKS = 8192  # input blocks of a stream (each costs the driver while the stream lives)

# Domain tags mixed into the seeds so that the three random streams never coincide.
_TAG_ORDER, _TAG_ROWS, _TAG_CROP = 0x0D3E, 0x5A0F, 0xC409
_MASK64 = (1 << 64) - 1
_READ_COLUMNS = ["jpeg", "image_id"]


def _seed(*values: int) -> np.random.SeedSequence:
    """A SeedSequence from any ints (negative ones taken modulo 2**64)."""
    return np.random.SeedSequence([int(v) & _MASK64 for v in values])


# ----------------------------------------------------------------------------- from the config


class BadShardError(RuntimeError):
    """A shard of the stream cannot be read (``data.bad_shard_action: stop``); the message
    names the shard, the rows and the cause."""


def shard_problem(path: str, rows: int | None = None) -> str | None:
    """Why the shard at ``path`` cannot be used, or None: it opens, its Parquet footer reads,
    and (when ``rows`` is given) it holds at least that many rows. Not cached."""
    try:
        fs, inner = storage.resolve(path)
        with fs.open_input_file(inner) as f:
            have = pq.read_metadata(f).num_rows
    except (OSError, ValueError, pa.ArrowException) as exc:
        return _first_line(exc)
    if rows is not None and have < rows:
        return f"it holds {have} rows, the manifest says {rows}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def split_shards(config) -> list[tuple[str, int]]:
    """``[(shard path or URI, rows used), ...]`` of ``data.split``, in manifest order.

    Honours ``data.max_images`` (the first N rows of the split; the last shard used may be
    cut and later shards dropped). With ``data.bad_shard_action: skip`` the shards that
    cannot be opened are left out, with a warning naming them. Raises ValueError when the
    split is not in the manifest or has no rows.
    """
    uri = config.data.shards
    manifest = read_manifest(uri)
    split = config.data.split
    shards = [(shard_uri(uri, s["path"]), int(s["num_rows"])) for s in manifest["shards"]
              if s["split"] == split]
    if not shards:
        raise ValueError(f"data.split = {split!r}: no shards of that split in {uri} "
                         f"(splits: {sorted(manifest.get('counts', {}))})")
    if config.data.bad_shard_action == "skip":
        problems = {p: shard_problem(p, n) for p, n in shards}
        bad = {p: why for p, why in problems.items() if why}
        if bad:
            logger.warning("data.bad_shard_action = skip: leaving out %d unreadable shard(s) of split %r: %s",
                           len(bad), split, "; ".join(f"{p} ({why})" for p, why in bad.items()))
            shards = [(p, n) for p, n in shards if p not in bad]
    limit = config.data.max_images
    if limit > 0:
        kept, left = [], limit
        for path, rows in shards:
            if left <= 0:
                break
            kept.append((path, min(rows, left)))
            left -= rows
        shards = kept
    shards = [(p, n) for p, n in shards if n > 0]
    if not shards:
        raise ValueError(f"data.split = {split!r} of {uri} has no rows")
    return shards


def count_rows(config) -> int:
    """Rows (images) one epoch of the stream holds: the split's rows, capped by data.max_images."""
    return sum(rows for _, rows in split_shards(config))


def steps_per_epoch(config, num_rows: int, world_size: int) -> int:
    """Optimisation steps per epoch: ``floor(num_rows / (B * W))`` (the last partial global
    batch is not a step; its rows roll over into the next epoch, see the module docstring).

    B = ``train.batch_size_per_worker``, W = ``world_size``. Raises ValueError when the data
    do not fill a single global batch.
    """
    b = config.train.batch_size_per_worker
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if num_rows < 0:
        raise ValueError(f"num_rows must be >= 0, got {num_rows}")
    steps = num_rows // (b * world_size)
    if steps == 0:
        raise ValueError(
            f"{num_rows} images ({config.data.shards}, split {config.data.split!r}, "
            f"data.max_images = {config.data.max_images}) do not fill one global batch of "
            f"train.batch_size_per_worker x workers = {b} x {world_size} = {b * world_size}")
    return steps


# ----------------------------------------------------------------------------- work items


@dataclass(frozen=True)
class WorkItem:
    """Rows ``[start, stop)`` of shard number ``shard``."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


def plan_items(shard_rows: Sequence[int], rows_per_item: int) -> list[WorkItem]:
    """Cut every shard (``shard_rows[k]`` rows) into items of at most ``rows_per_item`` rows."""
    if rows_per_item < 1:
        raise ValueError(f"rows_per_item must be >= 1, got {rows_per_item}")
    return [WorkItem(k, start, min(start + rows_per_item, rows))
            for k, rows in enumerate(shard_rows) for start in range(0, rows, rows_per_item)]


def epoch_item_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    """(num_items,) int64 permutation: the order of the items in ``epoch``."""
    return np.random.default_rng(_seed(seed, _TAG_ORDER, epoch)).permutation(num_items)


@dataclass(frozen=True)
class StreamPlan:
    """Everything a stream task needs (small and picklable; shipped once per operator).

    ``aug``: the crop and colour settings (``config.augmentation``); the colour half runs in
    the stream when ``aug.colour_on_device`` is false (:attr:`colour_in_stream`).
    """

    shards: tuple[str, ...]
    items: tuple[WorkItem, ...]
    seed: int
    aug: AugmentationConfig
    decode: DecodeOptions = dataclasses.field(default_factory=DecodeOptions)
    bad_shard_action: str = "stop"  # data.bad_shard_action: stop | skip

    @classmethod
    def from_config(cls, config, rows_per_item: int = DEFAULT_ROWS_PER_ITEM,
                    decode: DecodeOptions | None = None) -> "StreamPlan":
        shards = split_shards(config)
        return cls(shards=tuple(p for p, _ in shards),
                   items=tuple(plan_items([n for _, n in shards], rows_per_item)),
                   seed=config.train.seed, aug=config.augmentation,
                   decode=DecodeOptions() if decode is None else decode,
                   bad_shard_action=config.data.bad_shard_action)

    @property
    def colour_in_stream(self) -> bool:
        """True when the crop tasks also run the colour half (float16 normalised output)."""
        return not self.aug.colour_on_device

    @property
    def num_rows(self) -> int:
        return sum(len(item) for item in self.items)


# ----------------------------------------------------------------------------- stream tasks


def input_blocks(num_rows: int) -> int:
    """Blocks (= crop tasks) for ``num_rows`` input rows: one row each, at most
    :data:`MAX_INPUT_BLOCKS` (then consecutive rows share a block, ``from_items`` splits
    them into near-equal runs)."""
    return max(1, min(num_rows, MAX_INPUT_BLOCKS))


def work_item_rows(plan: StreamPlan, epochs: Sequence[int]) -> list[dict[str, int]]:
    """The stream's input rows ``{"epoch", "item"}``: every epoch's items in its random order."""
    return [{"epoch": int(e), "item": int(i)}
            for e in epochs for i in epoch_item_order(len(plan.items), plan.seed, e)]


@functools.lru_cache(maxsize=64)
def _shard_file(path: str) -> tuple[pafs.FileSystem, str, pq.FileMetaData, np.ndarray]:
    """File system, inner path, Parquet footer and row-group start offsets of one shard.

    Cached per process: Ray reuses worker processes, so each shard's footer is read once.
    """
    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as f:
        metadata = pq.read_metadata(f)
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # (G + 1,)
    return fs, inner, metadata, offsets


def read_rows(path: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a shard (columns jpeg, image_id), reading only their row groups."""
    fs, inner, metadata, offsets = _shard_file(path)
    if not 0 <= start < stop <= offsets[-1]:
        raise ValueError(f"{path}: rows [{start}, {stop}) out of range: the shard has "
                         f"{offsets[-1]} rows (manifest and shard disagree?)")
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))  # exclusive
    with fs.open_input_file(inner) as f:
        table = pq.ParquetFile(f, metadata=metadata).read_row_groups(
            list(range(first, last)), columns=_READ_COLUMNS)
    return table.slice(start - int(offsets[first]), stop - start)


def crop_item(plan: StreamPlan, epoch: int, item: WorkItem) -> dict[str, np.ndarray]:
    """Read, shuffle, decode and crop the rows of one work item (see the module docstring).

    Returns columns for the N decodable rows: ``crops_{r}`` (N, n_r, 3, S_r, S_r) uint8 (or
    float16 normalised when ``plan.colour_in_stream``), ``epoch``, ``image_id``, ``skipped``
    (N,) int64.
    """
    path = plan.shards[item.shard]
    try:
        table = read_rows(path, item.start, item.stop)
    except (OSError, ValueError, pa.ArrowException) as exc:  # deleted, truncated or rewritten since prepare
        _shard_file.cache_clear()  # its footer may be cached from before
        message = (f"shard {path}, rows [{item.start}, {item.stop}) of epoch {epoch}, cannot be read "
                   f"({_first_line(exc)})")
        if plan.bad_shard_action == "skip":
            logger.error("%s; data.bad_shard_action = skip: its %d rows are left out", message, len(item))
            return _no_rows(plan)
        raise BadShardError(f"{message}. Did it change after `gaelle prepare`? Prepare the shards again, or set "
                            "data.bad_shard_action=skip to train without the rows it cannot read") from None
    jpegs = table.column("jpeg").to_pylist()
    ids = table.column("image_id").to_numpy(zero_copy_only=False).astype(np.int64)  # (R,)
    order = np.random.default_rng(
        _seed(plan.seed, _TAG_ROWS, epoch, item.shard, item.start)).permutation(len(ids))
    rngs = [np.random.default_rng(_seed(plan.seed, _TAG_CROP, epoch, ids[i])) for i in order]
    out, kept = multicrop_images([jpegs[i] for i in order], plan.aug, rngs,
                                 colour=plan.colour_in_stream, options=plan.decode)
    kept_ids = ids[order][kept]  # (N,)
    n, skipped = len(kept_ids), len(ids) - len(kept_ids)
    out["epoch"] = np.full(n, epoch, dtype=np.int64)
    out["image_id"] = kept_ids.reshape(n)
    out["skipped"] = np.zeros(n, dtype=np.int64)
    if skipped and n:
        out["skipped"][0] = skipped
    elif skipped:
        logger.error("every record of %s rows [%d, %d) is undecodable; the %d skipped records "
                     "of this item are not counted in the stream's 'skipped' column",
                     plan.shards[item.shard], item.start, item.stop, skipped)
    return out


def _no_rows(plan: StreamPlan) -> dict[str, np.ndarray]:
    """crop_item's columns with N = 0 rows."""
    dtype = np.float16 if plan.colour_in_stream else np.uint8
    out = {f"crops_{r}": np.zeros((0, n, 3, s, s), dtype=dtype)
           for r, (s, n) in enumerate(zip(plan.aug.size_crops, plan.aug.nmb_crops))}
    return {**out, **{k: np.zeros(0, dtype=np.int64) for k in ("epoch", "image_id", "skipped")}}


def crop_items(batch: Mapping[str, np.ndarray], plan: StreamPlan) -> dict[str, np.ndarray]:
    """Ray Data UDF of the crop stage: item rows ``{epoch, item}`` -> image rows."""
    torch.set_num_threads(1)  # one task per CPU; torch's intra-op threads would oversubscribe
    parts = [crop_item(plan, int(e), plan.items[int(i)])
             for e, i in zip(np.asarray(batch["epoch"]).tolist(),
                             np.asarray(batch["item"]).tolist())]
    if len(parts) == 1:
        return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


# ----------------------------------------------------------------------------- the stream


def _epoch_range(config, start_epoch: int, num_epochs: int | None) -> range:
    total = config.train.epochs
    if not 0 <= start_epoch < total:
        raise ValueError(f"start_epoch = {start_epoch} is outside [0, train.epochs = {total})")
    if num_epochs is None:
        num_epochs = total - start_epoch
    if num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
    return range(start_epoch, start_epoch + num_epochs)


def build_pretrain_stream(config, start_epoch: int = 0, num_epochs: int | None = None, *,
                          rows_per_item: int = DEFAULT_ROWS_PER_ITEM,
                          decode: DecodeOptions | None = None) -> "ray.data.Dataset":
    """One lazy Ray Dataset with the crops of epochs ``start_epoch .. start_epoch+num_epochs-1``.

    ``num_epochs=None``: up to ``train.epochs``. Rows (one per decodable image and epoch):
    ``crops_{r}`` (n_r, 3, S_r, S_r) uint8 (float16 normalised when
    ``augmentation.colour_on_device`` is false), ``epoch``, ``image_id``, ``skipped`` int64.
    Pass it to the TorchTrainer as ``datasets={"train": ...}`` and read it on the workers
    with :func:`epoch_batches`. Nothing runs until it is iterated.
    """
    epochs = _epoch_range(config, start_epoch, num_epochs)
    plan = StreamPlan.from_config(config, rows_per_item, decode)
    logger.info("pretrain stream: %d rows in %d items of <= %d rows from %d shards, "
                "epochs %d..%d, colour %s", plan.num_rows, len(plan.items), rows_per_item,
                len(plan.shards), epochs.start, epochs.stop - 1,
                "in the stream" if plan.colour_in_stream else "on the device")
    rows = work_item_rows(plan, epochs)
    # One block of consecutive input rows = one crop task; the blocks are consumed in this
    # order (epoch after epoch), and only the tasks in flight can finish out of order.
    ds = ray.data.from_items(rows, override_num_blocks=input_blocks(len(rows)))
    parallel = config.data.read_parallelism
    return ds.map_batches(crop_items, batch_size=1, batch_format="numpy",
                          fn_kwargs={"plan": plan}, num_cpus=config.data.crop_cpus,
                          concurrency=parallel if parallel > 0 else None)


def ordered_ingest_options() -> "ray.data.ExecutionOptions":
    """Ray Train's ingest options (taken from the current ``DataContext``) with
    ``preserve_order`` on: the workers' batch order no longer depends on which crop task
    or formatting thread finishes first (module docstring, "Order"). For
    ``ray.train.DataConfig(execution_options=...)``."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


# ----------------------------------------------------------------------------- worker side


class StreamExhaustedError(RuntimeError):
    """The stream ended before the requested number of batches."""


class StreamBatch(NamedTuple):
    """One training batch of B images.

    crops: per resolution r, (n_r * B, 3, S_r, S_r) on the device, crop-major (crop k of image
    b at row ``k * B + b``), uint8 (float16 normalised when the colour ran in the stream).
    skipped: undecodable records accounted to this batch. wait_s: seconds spent waiting for
    it. image_ids, row_epochs: (B,) int64 on the CPU, the stream epoch each row was made for.
    """

    epoch: int
    step: int
    crops: list[torch.Tensor]
    skipped: int
    wait_s: float
    image_ids: torch.Tensor
    row_epochs: torch.Tensor


def bad_shard_reason(exc: BaseException) -> str | None:
    """The message of the :class:`BadShardError` a crop task raised, from the exception Ray
    hands the consumer (a ``RayTaskError(UserCodeException)`` that is not an instance of it
    and carries the task's traceback as text), or None when it is about something else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, BadShardError):
            return str(exc)
        found = re.search(rf"{BadShardError.__name__}: (.+)", str(exc))
        if found:
            return found.group(1).strip()
        exc = exc.__cause__ or exc.__context__
    return None


def _crop_major(x: torch.Tensor) -> torch.Tensor:
    """(B, n_r, 3, S, S) -> (n_r * B, 3, S, S), crop k of image b at row k * B + b."""
    b, n, c, h, w = x.shape
    return x.transpose(0, 1).reshape(n * b, c, h, w)  # (n_r, B, 3, S, S) -> (n_r*B, 3, S, S)


def _crop_keys(batch: Mapping[str, Any]) -> list[str]:
    keys = sorted((k for k in batch if k.startswith("crops_")), key=lambda k: int(k[6:]))
    if not keys or keys != [f"crops_{r}" for r in range(len(keys))]:
        raise ValueError(f"a stream batch needs columns crops_0, crops_1, ..., got {sorted(batch)}")
    return keys


def epoch_batches(iterator, batch_size: int, steps_per_epoch: int, num_epochs: int,
                  device: torch.device | str = "cpu", *, start_epoch: int = 0,
                  prefetch_batches: int = 2) -> Iterator[StreamBatch]:
    """Cut ONE pass over the stream into ``num_epochs`` epochs of ``steps_per_epoch`` batches.

    ``iterator``: a ``ray.data.DataIterator`` (``ray.train.get_dataset_shard("train")``) or a
    ``ray.data.Dataset``. Yields :class:`StreamBatch` ``(epoch, step, crops, skipped, wait_s,
    image_ids, row_epochs)`` for epochs ``start_epoch ..`` and steps ``0 .. steps_per_epoch-1``.
    Batches are copied to ``device`` with ``non_blocking=True`` (from pinned memory on CUDA).
    Rows left over at the end of an epoch roll into the next (module docstring). Raises
    :class:`StreamExhaustedError` when the stream ends early.
    """
    for name, value in (("batch_size", batch_size), ("steps_per_epoch", steps_per_epoch),
                        ("num_epochs", num_epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    device = torch.device(device)
    batches = iter(iterator.iter_torch_batches(
        batch_size=batch_size, drop_last=True, prefetch_batches=prefetch_batches,
        device="cpu", pin_memory=device.type == "cuda"))
    total = steps_per_epoch * num_epochs
    keys: list[str] | None = None
    for i in range(total):
        epoch, step = start_epoch + i // steps_per_epoch, i % steps_per_epoch
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except BadShardError:
            raise
        except StopIteration:
            raise StreamExhaustedError(
                f"the data stream ended after {i} batches of {batch_size} (epoch {epoch}, step "
                f"{step}); expected {num_epochs} epochs x {steps_per_epoch} steps = {total}. "
                "Either the stream was built for fewer epochs or rows than the loop runs, or "
                "undecodable records (see the 'skipped' counts) or the rows of unreadable shards "
                "(data.bad_shard_action = skip) used up the per-epoch slack; rebuild the stream (a "
                "--resume leaves unreadable shards out) or lower steps_per_epoch") from None
        except Exception as exc:  # Ray's wrapper of a crop task's error
            reason = bad_shard_reason(exc)
            if reason is None:
                raise
            raise BadShardError(reason) from None
        wait_s = time.perf_counter() - t0
        keys = keys or _crop_keys(batch)
        crops = [_crop_major(batch[k].to(device, non_blocking=True)) for k in keys]
        yield StreamBatch(epoch, step, crops, int(batch["skipped"].sum()), wait_s,
                          batch["image_id"], batch["epoch"])
