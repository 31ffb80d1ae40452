"""Storage locations and the checkpoint format, on local paths and file:// URIs.

The remote branches (a URI on another filesystem) run against a local folder: the test
`remote` fixture makes `fake://` URIs resolve to a folder under tmp_path, so nothing here
touches the network.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch

from gaelle_ray import storage


def _complete(run: Path, epoch: int) -> Path:
    """A complete checkpoint folder of `epoch` under `run` (state.pt + meta.json)."""
    return storage.save_checkpoint(run / storage.checkpoint_name(epoch), {"worker": {"model": {}}}, {"epoch": epoch})


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """fake://<path> resolves to <tmp_path>/bucket/<path> on a local filesystem: a stand-in
    for a remote store (is_remote is True for it)."""
    root = tmp_path / "bucket"
    root.mkdir()
    real_resolve = storage.resolve

    def resolve(uri):
        uri = os.fspath(uri)
        if uri.startswith("fake://"):
            fs = pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())
            return fs, uri.removeprefix("fake://").rstrip("/") or "/"
        return real_resolve(uri)

    monkeypatch.setattr(storage, "resolve", resolve)
    return root


# ----------------------------------------------------------------------------- locations


def test_is_remote_and_normalise(tmp_path, monkeypatch):
    assert storage.is_remote("s3://bucket/run") and storage.is_remote("gs://b/x")
    assert not storage.is_remote("runs/x") and not storage.is_remote(f"file://{tmp_path}")
    assert not storage.is_remote(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert storage.normalise("runs/x") == str(tmp_path.resolve() / "runs" / "x")
    assert storage.normalise(f"file://{tmp_path}/runs/../y") == str(tmp_path.resolve() / "y")
    assert storage.normalise(Path("z")) == str(tmp_path.resolve() / "z")
    assert storage.normalise("s3://bucket/run/") == "s3://bucket/run/"  # remote: unchanged


def test_resolve_local_paths_and_file_uris(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("a/b/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == os.path.abspath("a/b")
    fs, path = storage.resolve(f"file://{tmp_path}/c/")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/c"
    fs, path = storage.resolve(tmp_path / "d")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "d")
    assert storage.resolve("/")[1] == "/"
    assert storage.join("s3://b/run/", "x.json") == "s3://b/run/x.json"
    assert storage.join(str(tmp_path), "x.json") == f"{tmp_path}/x.json"


@pytest.mark.parametrize("as_uri", [False, True])
def test_json_round_trip(tmp_path, as_uri):
    folder = tmp_path / "new" / "folder"
    where = f"file://{folder}" if as_uri else str(folder)
    assert storage.read_json(where, "run.json") is None  # no folder yet
    storage.write_json(where, "run.json", {"run_id": "abc", "n": [1, 2]})
    assert json.loads((folder / "run.json").read_text()) == {"run_id": "abc", "n": [1, 2]}
    assert storage.read_json(where, "run.json") == {"run_id": "abc", "n": [1, 2]}
    assert storage.file_exists(storage.join(where, "run.json"))
    assert not storage.file_exists(where)  # a folder is not a file
    assert storage.read_json(where, "other.json") is None
    storage.delete_file(where, "run.json")
    storage.delete_file(where, "run.json")  # absent: nothing to do
    assert storage.read_json(where, "run.json") is None
    (folder / "bad.json").write_text("{not json")
    with pytest.raises(ValueError):
        storage.read_json(where, "bad.json")


# ----------------------------------------------------------------------------- checkpoints


def test_save_and_load_checkpoint(tmp_path):
    assert storage.checkpoint_name(7) == "epoch_00007"
    state = {"worker": {"model": {"w": torch.arange(3.0)}}, "history": [1.5]}
    folder = storage.save_checkpoint(tmp_path / "run" / storage.checkpoint_name(7), state, {"epoch": 7})
    assert sorted(p.name for p in folder.iterdir()) == [storage.META_FILE, storage.STATE_FILE]
    loaded, meta = storage.load_checkpoint(folder)
    assert meta == {"epoch": 7, "state_bytes": (folder / storage.STATE_FILE).stat().st_size}
    assert loaded["history"] == [1.5]
    assert torch.equal(loaded["worker"]["model"]["w"], torch.arange(3.0))
    (folder / storage.STATE_FILE).unlink()
    with pytest.raises(ValueError, match="not a complete gaelle checkpoint"):
        storage.load_checkpoint(folder)
    (folder / storage.META_FILE).write_text("{")
    with pytest.raises(ValueError, match=f"{storage.META_FILE}: not valid JSON"):
        storage.read_meta_file(folder / storage.META_FILE)


@pytest.mark.parametrize("as_uri", [False, True])
def test_latest_epoch_counts_complete_folders_only(tmp_path, as_uri):
    run = tmp_path / "run"
    where = f"file://{run}" if as_uri else str(run)
    assert storage.latest_epoch(where) is None and storage.checkpoint_epochs(where) == []  # no folder
    for epoch in (0, 2, 10):
        _complete(run, epoch)
    (run / storage.checkpoint_name(11)).mkdir()  # being written: no meta.json yet
    (run / storage.checkpoint_name(12)).mkdir()
    (run / storage.checkpoint_name(12) / storage.STATE_FILE).write_bytes(b"")
    (run / "epoch_latest").mkdir()  # not an epoch number
    (run / "epoch_00099").write_text("a file, not a folder")
    (run / "other").mkdir()
    assert storage.checkpoint_epochs(where) == [0, 2, 10]
    assert storage.latest_epoch(where) == 10


@pytest.mark.parametrize("as_uri", [False, True])
def test_is_checkpoint_folder_and_local_copy_of_local_paths(tmp_path, as_uri):
    folder = _complete(tmp_path / "run", 3)
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"weights")
    prefix = "file://" if as_uri else ""
    assert storage.is_checkpoint_folder(f"{prefix}{folder}")
    assert not storage.is_checkpoint_folder(f"{prefix}{weights}")
    assert not storage.is_checkpoint_folder(f"{prefix}{tmp_path / 'missing'}")
    with storage.local_copy(f"{prefix}{folder}", (storage.STATE_FILE,)) as local:
        assert local == folder  # local: no copy
    with storage.local_copy(f"{prefix}{weights}") as local:
        assert local == weights and local.read_bytes() == b"weights"


def test_remote_folder_and_file(remote):
    _complete(remote / "run", 1)
    _complete(remote / "run", 4)
    (remote / "run" / storage.checkpoint_name(4) / "extra.bin").write_bytes(b"x")
    (remote / "backbone.pth").write_bytes(b"weights")
    assert storage.is_remote("fake://run")
    assert storage.latest_epoch("fake://run") == 4
    folder = f"fake://run/{storage.checkpoint_name(4)}"
    assert storage.is_checkpoint_folder(folder)
    assert not storage.is_checkpoint_folder("fake://run")  # no meta.json directly inside
    assert not storage.is_checkpoint_folder("fake://backbone.pth")
    with storage.local_copy(folder, (storage.META_FILE, storage.STATE_FILE, "absent.txt")) as local:
        assert not str(local).startswith(str(remote))  # a copy
        assert sorted(p.name for p in local.iterdir()) == [storage.META_FILE, storage.STATE_FILE]
        state, meta = storage.load_checkpoint(local)
        assert meta["epoch"] == 4 and state == {"worker": {"model": {}}}
    assert not local.exists()  # the temporary copy is gone afterwards
    with storage.local_copy("fake://backbone.pth") as local:
        assert local.name == "backbone.pth" and local.read_bytes() == b"weights"
    with pytest.raises(ValueError, match="fake://missing.pth: checkpoint not found"):
        with storage.local_copy("fake://missing.pth"):
            pass


def test_worker_model_state():
    model = {"backbone.conv1.weight": torch.zeros(1)}
    state = {"worker": {"model": model, "optimizer": {}}, "queues": None}
    assert storage.worker_model_state(state, "ckpt/state.pt") is model
    assert storage.holds_worker_state(state)
    for bad in ({"model": model}, {"worker": None}, {"worker": {"optimizer": {}}}, [1, 2]):
        assert not storage.holds_worker_state(bad)
        with pytest.raises(ValueError, match="ckpt/state.pt: no worker.model entry"):
            storage.worker_model_state(bad, "ckpt/state.pt")
    with pytest.raises(ValueError, match=r"ckpt/state.pt: worker.model is a list, not a state dict"):
        storage.worker_model_state({"worker": {"model": [1]}}, "ckpt/state.pt")
