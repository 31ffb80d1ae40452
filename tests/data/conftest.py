"""Fixtures for the data tests: real image files and a tiny generated toy set."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from gaelle_ray.data.toy import make_toy


def write_image(path, size=(40, 30), mode="RGB", fmt="JPEG", seed=0) -> str:
    """Write a real image file with random content; size is (width, height). Returns path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        img = rgb.convert("RGBA")
        alpha = np.full((size[1], size[0]), 255, np.uint8)
        alpha[:, : size[0] // 2] = 0  # left half transparent
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = rgb.convert(mode)
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return path


@pytest.fixture
def image_writer():
    """The write_image helper, as a fixture."""
    return write_image


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    """A 16 + 6 image toy set, 48 px, generated once per session. Returns make_toy's summary."""
    return make_toy(tmp_path_factory.mktemp("toy"), n_train=16, n_val=6, image_size=48, seed=3)
