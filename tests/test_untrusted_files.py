"""A checkpoint crafted so that unpickling it runs a command is refused, naming the file,
and the command never runs: through the storage loader, the weights reader, and the CLI
commands that take a checkpoint file or folder without starting Ray (linear-eval,
semisup, show-attention). Our own checkpoints and torchvision exports still load."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gaelle_ray.cli import main
from gaelle_ray.model.weights import read_checkpoint_file
from gaelle_ray.storage import META_FILE, STATE_FILE, load_checkpoint


class _Payload:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_file(path, marker):
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    return path


def _crafted_folder(folder, marker):
    folder.mkdir(parents=True)
    _crafted_file(folder / STATE_FILE, marker)
    from gaelle_ray.config import Config

    config = Config.from_dict({"data": {"shards": str(folder / "nowhere")}, "model": {"arch": "resnet18"},
                               "eval": {"dataset": "toy"}})
    (folder / META_FILE).write_text(json.dumps({"epoch": 0, "config": config.to_dict()}))
    return folder


def test_loaders_refuse_a_crafted_pickle_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    crafted = _crafted_file(tmp_path / "evil.pth", marker)
    with pytest.raises(ValueError, match="evil.pth: refused: the file holds more than tensors"):
        read_checkpoint_file(crafted)
    with pytest.raises(ValueError, match="state.pt: refused"):
        load_checkpoint(_crafted_folder(tmp_path / "epoch_00000", marker))
    assert not marker.exists()


def test_plain_checkpoints_still_load(tmp_path):
    import argparse

    import numpy as np

    torch.save({"epoch": np.int64(3), "args": argparse.Namespace(nmb_prototypes=3000),
                "state_dict": {"module.conv1.weight": torch.ones(2)}}, tmp_path / "released.pth")
    obj = read_checkpoint_file(tmp_path / "released.pth")  # the released script's few data-only types
    assert int(obj["epoch"]) == 3 and obj["args"].nmb_prototypes == 3000


@pytest.mark.parametrize("command", [
    ["linear-eval", "--dataset", "toy", "--fast"],
    ["semisup", "--percent", "10", "--dataset", "toy"],
    ["show-attention", "--images", "x.jpg", "--out", "pics"],
])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_cli_commands_refuse_a_crafted_checkpoint(command, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    if kind == "file":
        checkpoint = _crafted_file(tmp_path / "evil.pth", marker)
    else:
        checkpoint = _crafted_folder(tmp_path / "run" / "train" / "epoch_00000", marker)
    if command[0] == "show-attention":  # a real image: the inputs are checked before the checkpoint is read
        from PIL import Image

        Image.new("RGB", (32, 32)).save(tmp_path / "x.jpg")
    else:
        from gaelle_ray.data.prepare import prepare_toy

        prepare_toy(tmp_path / "shards", n_train=8, n_val=4, image_size=32, seed=0)
        command = [*command, "--data", str(tmp_path / "shards")]
    code = main([command[0], "--checkpoint", str(checkpoint), *command[1:]])
    err = capsys.readouterr().err
    assert code != 0 and "refused" in err and ("evil.pth" in err or "state.pt" in err), err
    assert not marker.exists()
