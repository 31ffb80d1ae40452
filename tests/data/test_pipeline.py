"""The Ray Data pretraining stream: work items, per-image determinism, epochs, skipped
records, worker-side batching. One local Ray instance for the whole module."""

from __future__ import annotations

import os
import shutil

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before Ray is imported

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from gaelle_ray.config import Config  # noqa: E402
from gaelle_ray.data import pipeline  # noqa: E402
from gaelle_ray.data.colour_ops import normalize  # noqa: E402
from gaelle_ray.data.prepare import prepare_toy  # noqa: E402

N_IMAGES = 48
SIZES, COUNTS = (32, 16), (2, 3)
ROWS_PER_ITEM = 16


def _config(shards: str, **sections) -> Config:
    raw = {
        "data": {"shards": shards, "split": "train"},
        "augmentation": {"size_crops": list(SIZES), "nmb_crops": list(COUNTS),
                         "min_scale_crops": [0.3, 0.1], "max_scale_crops": [1.0, 0.3]},
        "train": {"epochs": 2, "batch_size_per_worker": 8, "num_workers": 1, "seed": 5},
        "queue": {"queue_length": 0},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return Config.from_dict(raw)


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> str:
    """48 toy images (64 px) in 3 shards of 20, 20 and 8 rows, row groups of 8."""
    out = str(tmp_path_factory.mktemp("pipeline") / "shards")
    prepare_toy(out, n_train=N_IMAGES, n_val=2, image_size=64, seed=1, shard_size=20,
                row_group_size=8)
    return out


@pytest.fixture(scope="module")
def corrupt_dir(shards_dir, tmp_path_factory) -> str:
    """A copy of the train shards whose first shard has garbage instead of one JPEG."""
    out = str(tmp_path_factory.mktemp("corrupt") / "shards")
    shutil.copytree(shards_dir, out)
    path = os.path.join(out, "train", "part-00000.parquet")
    table = pq.read_table(path)
    jpegs = table.column("jpeg").to_pylist()
    jpegs[3] = b"this is not a jpeg"
    col = table.schema.get_field_index("jpeg")
    table = table.set_column(col, table.schema.field(col), [jpegs])
    pq.write_table(table, path, row_group_size=8)
    return out


@pytest.fixture(scope="module")
def ray_local():
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=4,
             include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def _collect(ds) -> dict[str, np.ndarray]:
    """Every row of a stream (single consumer), concatenated in arrival order."""
    parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


@pytest.fixture(scope="module")
def stream_rows(ray_local, shards_dir):
    config = _config(shards_dir)
    return _collect(pipeline.build_pretrain_stream(config, rows_per_item=ROWS_PER_ITEM))


# ----------------------------------------------------------------------------- without Ray


def test_steps_per_epoch_drops_the_last_partial_global_batch(shards_dir):
    config = _config(shards_dir, train={"batch_size_per_worker": 8})
    assert pipeline.steps_per_epoch(config, 48, 1) == 6
    assert pipeline.steps_per_epoch(config, 48, 2) == 3
    assert pipeline.steps_per_epoch(config, 47, 2) == 2
    assert pipeline.steps_per_epoch(config, 16, 2) == 1
    with pytest.raises(ValueError, match="batch_size_per_worker"):
        pipeline.steps_per_epoch(config, 15, 2)
    with pytest.raises(ValueError, match="world_size"):
        pipeline.steps_per_epoch(config, 48, 0)


def test_count_rows_and_max_images(shards_dir):
    assert pipeline.count_rows(_config(shards_dir)) == N_IMAGES
    config = _config(shards_dir, data={"max_images": 25})
    assert pipeline.count_rows(config) == 25
    assert [n for _, n in pipeline.split_shards(config)] == [20, 5]
    assert pipeline.count_rows(_config(shards_dir, data={"split": "val"})) == 2
    with pytest.raises(ValueError, match="data.split"):
        pipeline.count_rows(_config(shards_dir, data={"split": "nope"}))


def test_work_items_cover_every_row_once_and_epochs_get_different_orders():
    items = pipeline.plan_items([20, 20, 8], 16)
    assert [(i.shard, i.start, i.stop) for i in items] == [
        (0, 0, 16), (0, 16, 20), (1, 0, 16), (1, 16, 20), (2, 0, 8)]
    orders = [pipeline.epoch_item_order(50, 7, e).tolist() for e in range(3)]
    assert all(sorted(o) == list(range(50)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert pipeline.epoch_item_order(50, 7, 1).tolist() == orders[1]  # same seed, same order
    assert pipeline.epoch_item_order(50, 8, 1).tolist() != orders[1]


def test_read_rows_reads_across_row_groups(shards_dir):
    path = pipeline.split_shards(_config(shards_dir))[0][0]
    full = pq.read_table(path, columns=["jpeg", "image_id"])
    part = pipeline.read_rows(path, 5, 19)  # row groups of 8: spans groups 0, 1 and 2
    assert part.equals(full.slice(5, 14))
    with pytest.raises(ValueError, match="out of range"):
        pipeline.read_rows(path, 10, 21)


def test_crops_of_an_image_do_not_depend_on_the_item_it_is_read_in(shards_dir):
    config = _config(shards_dir)
    small = pipeline.StreamPlan.from_config(config, rows_per_item=5)
    large = pipeline.StreamPlan.from_config(config, rows_per_item=20)
    a = pipeline.crop_item(small, 1, small.items[1])  # shard 0 rows 5..10
    b = pipeline.crop_item(large, 1, large.items[0])  # shard 0 rows 0..20
    assert len(a["image_id"]) == 5 and len(b["image_id"]) == 20
    where = {int(i): k for k, i in enumerate(b["image_id"])}
    for k, image_id in enumerate(a["image_id"]):
        for r in range(len(SIZES)):
            np.testing.assert_array_equal(a[f"crops_{r}"][k], b[f"crops_{r}"][where[int(image_id)]])
    other = pipeline.crop_item(small, 0, small.items[1])  # same images, another epoch
    assert not np.array_equal(other["crops_0"][np.argsort(other["image_id"])],
                              a["crops_0"][np.argsort(a["image_id"])])


def test_colour_in_the_stream_is_float16_normalised(shards_dir):
    # with every colour op switched off, the colour stage is exactly normalise(uint8 / 255)
    off = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    plain = pipeline.StreamPlan.from_config(_config(shards_dir, augmentation=off))
    coloured = pipeline.StreamPlan.from_config(
        _config(shards_dir, augmentation={**off, "colour_on_device": False}))
    assert not plain.colour_in_stream and coloured.colour_in_stream
    a = pipeline.crop_item(plain, 0, plain.items[0])
    b = pipeline.crop_item(coloured, 0, coloured.items[0])
    np.testing.assert_array_equal(a["image_id"], b["image_id"])
    for r, (size, count) in enumerate(zip(SIZES, COUNTS)):
        assert a[f"crops_{r}"].dtype == np.uint8
        assert b[f"crops_{r}"].dtype == np.float16
        assert b[f"crops_{r}"].shape == (len(a["image_id"]), count, 3, size, size)
        x = torch.from_numpy(a[f"crops_{r}"]).flatten(0, 1).float() / 255  # (N*n_r, 3, S, S)
        expected = normalize(x).view(b[f"crops_{r}"].shape)
        torch.testing.assert_close(torch.from_numpy(b[f"crops_{r}"]).float(), expected,
                                   atol=2e-3, rtol=2e-3)


def test_crop_item_skips_and_counts_undecodable_records(shards_dir, corrupt_dir):
    """Without Ray: the corrupt record of shard 0 (row 3) is dropped, counted on the item's
    first row, and the other rows keep the crops they have in the intact shards."""
    plan = pipeline.StreamPlan.from_config(_config(corrupt_dir), rows_per_item=8)
    out = pipeline.crop_item(plan, 0, plan.items[0])  # shard 0 rows 0..8
    assert len(out["image_id"]) == 7 and out["skipped"].tolist() == [1] + [0] * 6
    assert out["epoch"].tolist() == [0] * 7
    intact = pipeline.StreamPlan.from_config(_config(shards_dir), rows_per_item=8)
    full = pipeline.crop_item(intact, 0, intact.items[0])
    missing = set(full["image_id"].tolist()) - set(out["image_id"].tolist())
    assert len(missing) == 1
    where = {int(i): k for k, i in enumerate(full["image_id"])}
    for k, image_id in enumerate(out["image_id"]):
        for r in range(len(SIZES)):
            np.testing.assert_array_equal(out[f"crops_{r}"][k], full[f"crops_{r}"][where[int(image_id)]])


class _FakeIterator:
    """Anything with iter_torch_batches works; this one yields `n` batches of B rows."""

    def __init__(self, n: int, b: int):
        self.n, self.b = n, b

    def iter_torch_batches(self, *, batch_size, drop_last, prefetch_batches, device,
                           pin_memory):
        assert batch_size == self.b and drop_last
        for i in range(self.n):
            yield {"crops_0": torch.zeros(self.b, 2, 3, 4, 4, dtype=torch.uint8),
                   "epoch": torch.zeros(self.b, dtype=torch.int64),
                   "image_id": torch.arange(self.b) + i * self.b,
                   "skipped": torch.zeros(self.b, dtype=torch.int64)}


def test_epoch_batches_raises_when_the_stream_ends_early():
    got = [(b.epoch, b.step) for b in pipeline.epoch_batches(_FakeIterator(6, 4), 4, 3, 2)]
    assert got == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    with pytest.raises(pipeline.StreamExhaustedError, match="ended after 5 batches"):
        list(pipeline.epoch_batches(_FakeIterator(5, 4), 4, 3, 2, start_epoch=7))


# ----------------------------------------------------------------------------- through Ray


def test_every_image_once_per_epoch_in_a_different_order(stream_rows):
    epochs, ids = stream_rows["epoch"], stream_rows["image_id"]
    assert sorted(set(epochs.tolist())) == [0, 1]
    assert stream_rows["skipped"].sum() == 0
    per_epoch = [ids[epochs == e] for e in (0, 1)]
    for e_ids in per_epoch:
        assert len(e_ids) == N_IMAGES and len(set(e_ids.tolist())) == N_IMAGES
    assert set(per_epoch[0].tolist()) == set(per_epoch[1].tolist())
    assert per_epoch[0].tolist() != per_epoch[1].tolist()
    for r, (size, count) in enumerate(zip(SIZES, COUNTS)):
        crops = stream_rows[f"crops_{r}"]
        assert crops.dtype == np.uint8 and crops.shape == (2 * N_IMAGES, count, 3, size, size)


def test_stream_crops_are_repeatable_per_image(stream_rows, shards_dir):
    # the crops of (epoch, image) out of Ray equal a direct computation with other items
    plan = pipeline.StreamPlan.from_config(_config(shards_dir), rows_per_item=7)
    ref = pipeline.crop_item(plan, 1, plan.items[0])
    rows = {(int(e), int(i)): k for k, (e, i) in
            enumerate(zip(stream_rows["epoch"], stream_rows["image_id"]))}
    for k, image_id in enumerate(ref["image_id"]):
        for r in range(len(SIZES)):
            np.testing.assert_array_equal(
                ref[f"crops_{r}"][k], stream_rows[f"crops_{r}"][rows[(1, int(image_id))]])


def test_epoch_batches_shapes_dtypes_and_crop_major_order(ray_local, shards_dir, stream_rows):
    config = _config(shards_dir)
    b = config.train.batch_size_per_worker
    steps = pipeline.steps_per_epoch(config, pipeline.count_rows(config), 1)
    ds = pipeline.build_pretrain_stream(config, rows_per_item=ROWS_PER_ITEM)
    batches = list(pipeline.epoch_batches(ds, b, steps, 2, "cpu", prefetch_batches=1))
    assert [(x.epoch, x.step) for x in batches] == [(e, s) for e in (0, 1) for s in range(6)]
    lookup = {(int(e), int(i)): k for k, (e, i) in
              enumerate(zip(stream_rows["epoch"], stream_rows["image_id"]))}
    for batch in batches:
        assert batch.skipped == 0 and batch.wait_s >= 0
        assert batch.image_ids.shape == (b,) and batch.row_epochs.shape == (b,)
        for r, (size, count) in enumerate(zip(SIZES, COUNTS)):
            x = batch.crops[r]
            assert x.dtype == torch.uint8 and x.shape == (count * b, 3, size, size)
            assert x.is_contiguous()
            for j in (0, b - 1):  # crop k of image j sits at row k * B + j
                row = lookup[(int(batch.row_epochs[j]), int(batch.image_ids[j]))]
                for k in range(count):
                    np.testing.assert_array_equal(x[k * b + j].numpy(),
                                                  stream_rows[f"crops_{r}"][row, k])
    seen = torch.cat([x.image_ids for x in batches])
    assert len(seen) == 2 * 6 * b and len(set(seen.tolist())) == N_IMAGES


def test_corrupt_record_is_skipped_and_counted_with_colour_in_the_stream(ray_local, corrupt_dir):
    config = _config(corrupt_dir, augmentation={"colour_on_device": False},
                     train={"epochs": 1})
    rows = _collect(pipeline.build_pretrain_stream(config, rows_per_item=ROWS_PER_ITEM))
    assert len(rows["image_id"]) == N_IMAGES - 1
    assert rows["skipped"].sum() == 1
    assert len(set(rows["image_id"].tolist())) == N_IMAGES - 1
    lo = (0 - 0.485) / 0.228 - 0.01
    hi = (1 - 0.406) / 0.225 + 0.01
    for r in range(len(SIZES)):
        crops = rows[f"crops_{r}"]
        assert crops.dtype == np.float16 and np.isfinite(crops).all()
        assert lo <= float(crops.min()) and float(crops.max()) <= hi
        assert crops.min() < 0 < crops.max()


def test_input_blocks_are_capped():
    assert pipeline.input_blocks(0) == 1
    assert pipeline.input_blocks(320) == 320  # the demo: one item per block and task
    assert pipeline.input_blocks(400 * 925) == pipeline.MAX_INPUT_BLOCKS  # 400 COCO epochs


def test_stream_with_several_items_per_input_block_has_the_same_rows(
        ray_local, shards_dir, stream_rows, monkeypatch):
    """With the input capped at 3 blocks (several items per crop task) the stream holds the
    same (epoch, image) rows with the same crops as with one item per block."""
    blocks = []
    from_items = ray.data.from_items

    def spy(rows, **kwargs):
        blocks.append(kwargs["override_num_blocks"])
        return from_items(rows, **kwargs)

    monkeypatch.setattr(pipeline, "MAX_INPUT_BLOCKS", 3)
    monkeypatch.setattr(ray.data, "from_items", spy)
    grouped = _collect(pipeline.build_pretrain_stream(_config(shards_dir),
                                                      rows_per_item=ROWS_PER_ITEM))
    assert blocks == [3]
    key = lambda rows: {(int(e), int(i)): k for k, (e, i) in  # noqa: E731
                        enumerate(zip(rows["epoch"], rows["image_id"]))}
    ref, got = key(stream_rows), key(grouped)
    assert sorted(ref) == sorted(got) and len(got) == 2 * N_IMAGES
    for pair, k in ref.items():
        for r in range(len(SIZES)):
            np.testing.assert_array_equal(stream_rows[f"crops_{r}"][k],
                                          grouped[f"crops_{r}"][got[pair]])


# ----------------------------------------------------------------------------- unreadable shards (issue 15.8)


@pytest.fixture
def damaged_dir(shards_dir, tmp_path) -> str:
    """A copy of the shards; the test deletes or truncates a shard of it."""
    out = str(tmp_path / "shards")
    shutil.copytree(shards_dir, out)
    return out


def _shard(folder, k):
    return os.path.join(folder, "train", f"part-{k:05d}.parquet")


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_a_shard_damaged_after_the_stream_was_planned_stops_naming_it(damaged_dir, damage):
    plan = pipeline.StreamPlan.from_config(_config(damaged_dir), rows_per_item=8)
    pipeline.crop_item(plan, 0, plan.items[1])  # reads shard 0 (its footer is cached from now on)
    (os.remove if damage == "deleted" else _truncate)(_shard(damaged_dir, 0))
    with pytest.raises(pipeline.BadShardError) as info:
        pipeline.crop_item(plan, 1, plan.items[1])
    message = str(info.value)
    assert _shard(damaged_dir, 0) in message and "rows [8, 16) of epoch 1" in message
    assert "data.bad_shard_action=skip" in message
    pipeline.crop_item(plan, 1, plan.items[3])  # the other shards still read


def test_skip_drops_the_rows_of_a_damaged_shard_with_an_error_naming_it(damaged_dir, caplog):
    config = _config(damaged_dir, data={"bad_shard_action": "skip"}, augmentation={"colour_on_device": False})
    plan = pipeline.StreamPlan.from_config(config, rows_per_item=8)
    _truncate(_shard(damaged_dir, 1))
    with caplog.at_level("ERROR", logger=pipeline.__name__):
        out = pipeline.crop_item(plan, 0, plan.items[3])  # shard 1 rows 0..8
    assert len(out["image_id"]) == 0 and out["skipped"].dtype == np.int64
    for r, (s, n) in enumerate(zip(SIZES, COUNTS)):  # the columns of a normal item, with no row
        assert out[f"crops_{r}"].shape == (0, n, 3, s, s) and out[f"crops_{r}"].dtype == np.float16
    assert _shard(damaged_dir, 1) in caplog.text and "its 8 rows are left out" in caplog.text
    # a stream planned later (a restart, --resume) leaves the shard out of the epoch, saying so
    with caplog.at_level("WARNING", logger=pipeline.__name__):
        shards = pipeline.split_shards(config)
    assert [p for p, _ in shards] == [_shard(damaged_dir, 0), _shard(damaged_dir, 2)]
    assert "leaving out 1 unreadable shard" in caplog.text
    with pytest.raises(ValueError, match="no shards"):  # stop (the default) does not look at the files here
        pipeline.split_shards(_config(damaged_dir, data={"split": "nope"}))
    assert len(pipeline.split_shards(_config(damaged_dir))) == 3


def test_bad_shard_reason_reads_ray_s_wrapped_error():
    inner = pipeline.BadShardError("shard /x/part-00001.parquet, rows [0, 8) of epoch 2, cannot be read (OSError)")
    assert pipeline.bad_shard_reason(inner) == str(inner)
    wrapped = RuntimeError("ray::MapBatches(crop_items)() (pid=1, ip=127.0.0.1)\n  File ...\n"
                           f"gaelle_ray.data.pipeline.BadShardError: {inner}\n")
    assert pipeline.bad_shard_reason(wrapped) == str(inner)
    assert pipeline.bad_shard_reason(ValueError("something else")) is None


def test_workers_see_a_crop_task_s_bad_shard_error_as_it_is(ray_local, damaged_dir):
    """Through Ray Data: the worker-side iterator turns the task's wrapped error back into a
    BadShardError naming the shard (what the training loop stops on)."""
    config = _config(damaged_dir, train={"epochs": 1})
    os.remove(_shard(damaged_dir, 2))
    ds = pipeline.build_pretrain_stream(config, rows_per_item=ROWS_PER_ITEM)
    with pytest.raises(pipeline.BadShardError, match="part-00002.parquet, rows \\[0, 8\\) of epoch 0"):
        for _ in pipeline.epoch_batches(ds, 8, 6, 1):
            pass
