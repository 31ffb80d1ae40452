"""The generated toy set: COCO layout, content, determinism, colour independence."""

from __future__ import annotations

import contextlib
import io
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from gaelle_ray.data.toy import TOY_CATEGORIES, make_toy, sample_scene


def _load(ann_file: str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(ann_file)


def _files(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_layout_and_summary(tiny_toy):
    root = tiny_toy["out_dir"]
    assert sorted(os.listdir(root)) == ["annotations", "train", "val"]
    assert sorted(os.listdir(os.path.join(root, "annotations"))) == [
        "instances_train.json", "instances_val.json"]
    assert len(os.listdir(os.path.join(root, "train"))) == 16
    assert len(os.listdir(os.path.join(root, "val"))) == 6
    assert tiny_toy["splits"]["train"]["images"] == 16
    assert tiny_toy["class_names"] == [name for _, name, _ in TOY_CATEGORIES]
    assert len(tiny_toy["class_names"]) >= 10


def test_coco_json_is_valid_and_consistent(tiny_toy):
    for split, info in tiny_toy["splits"].items():
        coco = _load(info["ann_file"])
        cat_ids = sorted(coco.getCatIds())
        assert len(cat_ids) >= 10
        assert cat_ids != list(range(cat_ids[0], cat_ids[0] + len(cat_ids))), "ids have gaps"
        assert {c["supercategory"] for c in coco.loadCats(cat_ids)} <= {"round", "polygon",
                                                                        "symbol"}
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        assert info["annotations"] == len(ann_ids)
        for img in coco.loadImgs(coco.getImgIds()):
            assert (img["width"], img["height"]) == (48, 48)
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 5
            for ann in anns:
                x, y, w, h = ann["bbox"]
                assert ann["iscrowd"] == 0 and ann["area"] > 0
                assert ann["category_id"] in cat_ids
                assert 0 <= x and 0 <= y and w >= 2 and h >= 2
                assert x + w <= 48 and y + h <= 48
            with Image.open(os.path.join(info["image_dir"], img["file_name"])) as im:
                im.load()
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (48, 48)


def test_image_ids_unique_across_splits(tiny_toy):
    ids = [set(_load(info["ann_file"]).getImgIds()) for info in tiny_toy["splits"].values()]
    assert not ids[0] & ids[1]


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    a = make_toy(tmp_path / "a", n_train=5, n_val=2, image_size=40, seed=7)
    b = make_toy(tmp_path / "b", n_train=5, n_val=2, image_size=40, seed=7)
    c = make_toy(tmp_path / "c", n_train=5, n_val=2, image_size=40, seed=8)
    files_a, files_b, files_c = (_files(s["out_dir"]) for s in (a, b, c))
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert files_a["annotations/instances_train.json"] != files_c[
        "annotations/instances_train.json"]


def test_regenerating_smaller_set_removes_old_images(tmp_path):
    make_toy(tmp_path, n_train=6, n_val=2, image_size=32)
    (tmp_path / "train" / "keep.txt").write_text("not ours")
    make_toy(tmp_path, n_train=3, n_val=2, image_size=32)
    assert sorted(os.listdir(tmp_path / "train")) == [
        "000000000001.jpg", "000000000002.jpg", "000000000003.jpg", "keep.txt"]


def test_worker_processes_do_not_change_output(tmp_path):
    one = make_toy(tmp_path / "one", n_train=64, n_val=0, image_size=32, seed=1, workers=1)
    two = make_toy(tmp_path / "two", n_train=64, n_val=0, image_size=32, seed=1, workers=2)
    assert _files(one["out_dir"]) == _files(two["out_dir"])


def test_scenes_hold_several_objects_of_every_class(tmp_path):
    summary = make_toy(tmp_path, n_train=60, n_val=0, image_size=48, seed=0)
    coco = _load(summary["splits"]["train"]["ann_file"])
    per_image = Counter(a["image_id"] for a in coco.dataset["annotations"])
    assert len(per_image) == 60
    assert sum(1 for n in per_image.values() if n >= 2) > 30
    assert max(per_image.values()) == 5
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {
        cid for cid, _, _ in TOY_CATEGORIES}


def test_colour_does_not_identify_the_class():
    rng = np.random.default_rng(0)
    colours: dict[int, list] = {}
    for _ in range(400):
        for obj in sample_scene(rng, 64)["objects"]:
            colours.setdefault(obj["cls"], []).append(obj["colour"])
    means = np.array([np.mean(colours[k], axis=0) for k in sorted(colours)])  # (classes, 3)
    spreads = np.array([np.std(colours[k], axis=0) for k in sorted(colours)])
    assert len(colours) == len(TOY_CATEGORIES)
    assert (spreads > 40).all(), "every class comes in many colours"
    assert np.ptp(means, axis=0).max() < 25, "no class has its own average colour"


def test_images_are_textured_not_flat(tiny_toy):
    info = tiny_toy["splits"]["train"]
    for name in sorted(os.listdir(info["image_dir"]))[:5]:
        pixels = np.asarray(Image.open(os.path.join(info["image_dir"], name)), np.float32)
        assert pixels.std() > 5


@pytest.mark.parametrize("kwargs", [{"n_train": -1}, {"n_train": 0, "n_val": 0},
                                    {"image_size": 16}, {"workers": 0}, {"n_val": 1.5}])
def test_bad_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_toy(tmp_path, **{"n_train": 2, "n_val": 1, **kwargs})
