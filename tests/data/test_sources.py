"""Source readers: COCO (pycocotools), VOC2007 ImageSets, plain folders."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gaelle_ray.data.sources import (VOC_CLASSES, coco_paths, read_coco, read_folder,
                                     read_voc)


def _coco_dict():
    # categories listed out of order, ids with gaps: label order must be person, car, toothbrush
    return {
        "images": [
            {"id": 9, "file_name": "c.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "a.jpg", "width": 40, "height": 30},
            {"id": 5, "file_name": "sub/b.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {"id": 1, "image_id": 2, "category_id": 90, "bbox": [0, 0, 5, 5], "area": 25,
             "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25,
             "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25,
             "iscrowd": 0},
            {"id": 4, "image_id": 9, "category_id": 3, "bbox": [0, 0, 5, 5], "area": 25,
             "iscrowd": 1},
        ],
        "categories": [
            {"id": 90, "name": "toothbrush", "supercategory": "indoor"},
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 3, "name": "car", "supercategory": "vehicle"},
        ],
    }


def _write_json(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def test_read_coco_labels_follow_sorted_category_ids(tmp_path, capsys):
    ann = _write_json(tmp_path / "instances.json", _coco_dict())
    records, names, stats = read_coco(ann, tmp_path / "imgs", "train")
    assert names == ["person", "car", "toothbrush"]
    assert [r["image_id"] for r in records] == [2, 5, 9]
    by_id = {r["image_id"]: r for r in records}
    np.testing.assert_array_equal(by_id[2]["labels"], [1, 0, 1])
    np.testing.assert_array_equal(by_id[5]["labels"], [0, 0, 0])
    np.testing.assert_array_equal(by_id[9]["labels"], [0, 1, 0])  # crowd counts
    assert all(r["labels"].dtype == np.uint8 for r in records)
    assert by_id[5]["file_name"] == "sub/b.jpg"
    assert by_id[5]["path"] == os.path.join(str(tmp_path), "imgs", "sub", "b.jpg")
    assert {r["split"] for r in records} == {"train"}
    assert stats["no_annotation"] == 1 and stats["images"] == 3 and stats["annotations"] == 4
    assert stats["bad_annotations"] == []
    assert capsys.readouterr().out == "", "pycocotools' prints are silenced"


def test_read_coco_reports_unknown_ids(tmp_path):
    data = _coco_dict()
    data["annotations"] += [
        {"id": 10, "image_id": 777, "category_id": 1, "bbox": [0, 0, 1, 1], "area": 1,
         "iscrowd": 0},
        {"id": 11, "image_id": 5, "category_id": 55, "bbox": [0, 0, 1, 1], "area": 1,
         "iscrowd": 0},
    ]
    ann = _write_json(tmp_path / "instances.json", data)
    records, _, stats = read_coco(ann, tmp_path, "val")
    bad = {b["annotation_id"]: b for b in stats["bad_annotations"]}
    assert set(bad) == {10, 11}
    assert "unknown image_id 777" in bad[10]["reason"]
    assert "unknown category_id 55" in bad[11]["reason"]
    # the valid ones still count; the bad one does not give image 5 a label
    np.testing.assert_array_equal(records[1]["labels"], [0, 0, 0])
    assert stats["no_annotation"] == 1

    with pytest.raises(ValueError, match=r"instances\.json.*annotation id 10.*image_id 777"):
        read_coco(ann, tmp_path, "val", strict=True)


def test_read_coco_truncated_json_names_the_file(tmp_path):
    text = json.dumps(_coco_dict())
    path = tmp_path / "instances_cut.json"
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="instances_cut.json"):
        read_coco(path, tmp_path, "train")


@pytest.mark.parametrize("mutate", ["top_level_list", "no_image_id", "no_images",
                                    "duplicate_image", "no_file_name", "binary"])
def test_read_coco_malformed_files_raise_value_error(tmp_path, mutate):
    data = _coco_dict()
    path = tmp_path / f"bad_{mutate}.json"
    if mutate == "top_level_list":
        data = [data]
    elif mutate == "no_image_id":
        del data["annotations"][0]["image_id"]
    elif mutate == "no_images":
        del data["images"]
    elif mutate == "duplicate_image":
        data["images"].append(dict(data["images"][0]))
    elif mutate == "no_file_name":
        del data["images"][1]["file_name"]
    if mutate == "binary":
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        _write_json(path, data)
    with pytest.raises(ValueError, match=f"bad_{mutate}.json"):
        read_coco(path, tmp_path, "train")


def test_read_coco_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_coco(tmp_path / "nope.json", tmp_path, "train")


def test_read_coco_on_generated_toy(tiny_toy):
    info = tiny_toy["splits"]["train"]
    records, names, stats = read_coco(info["ann_file"], info["image_dir"], "train", strict=True)
    assert names == tiny_toy["class_names"]
    assert len(records) == 16 and stats["no_annotation"] == 0
    with open(info["ann_file"]) as f:
        data = json.load(f)
    order = {cid: k for k, cid in enumerate(sorted(c["id"] for c in data["categories"]))}
    for rec in records:
        expected = np.zeros(len(names), np.uint8)
        for a in data["annotations"]:
            if a["image_id"] == rec["image_id"]:
                expected[order[a["category_id"]]] = 1
        np.testing.assert_array_equal(rec["labels"], expected)
        assert os.path.isfile(rec["path"])


def test_coco_paths(tmp_path):
    ann, images = coco_paths(tmp_path, 2014, "val")
    assert ann == os.path.join(str(tmp_path), "annotations", "instances_val2014.json")
    assert images == os.path.join(str(tmp_path), "val2014")
    assert coco_paths(tmp_path, "2017", "train")[1].endswith("train2017")
    with pytest.raises(ValueError, match="2015"):
        coco_paths(tmp_path, 2015, "train")
    with pytest.raises(ValueError, match="test"):
        coco_paths(tmp_path, 2017, "test")


# ----------------------------------------------------------------------------- VOC


def _voc_tree(root, image_writer, values=None):
    """VOCdevkit/VOC2007 with 3 test images. values: {cls: {id: '1'|'0'|'-1'}} overrides."""
    base = root / "VOCdevkit" / "VOC2007"
    main = base / "ImageSets" / "Main"
    main.mkdir(parents=True)
    ids = ["000005", "000007", "000012"]
    (main / "test.txt").write_text("\n".join(ids) + "\n")
    values = values or {"aeroplane": {"000005": "1", "000012": "0"},
                        "person": {"000007": "1", "000012": "1"}}
    for cls in VOC_CLASSES:
        lines = [f"{i} {values.get(cls, {}).get(i, '-1'):>2}" for i in ids]
        (main / f"{cls}_test.txt").write_text("\n".join(lines) + "\n")
    for n, i in enumerate(ids):
        image_writer(base / "JPEGImages" / f"{i}.jpg", seed=n)
    return base


def test_read_voc_labels(tmp_path, image_writer):
    base = _voc_tree(tmp_path, image_writer)
    records, names, stats = read_voc(base, "test")
    assert names == list(VOC_CLASSES) and len(names) == 20
    assert [r["image_id"] for r in records] == [5, 7, 12]
    aero, person = names.index("aeroplane"), names.index("person")
    labels = np.stack([r["labels"] for r in records])
    assert labels.dtype == np.uint8 and labels.shape == (3, 20)
    assert labels[:, aero].tolist() == [1, 0, 255]
    assert labels[:, person].tolist() == [0, 1, 1]
    assert labels.sum() == 1 + 255 + 2
    assert records[0]["file_name"] == "000005.jpg"
    assert records[0]["path"] == os.path.join(str(base), "JPEGImages", "000005.jpg")
    assert os.path.isfile(records[0]["path"])
    assert stats == {"images": 3, "positives": 3, "difficult": 1}


def test_read_voc_finds_the_tree_from_parent_folders(tmp_path, image_writer):
    _voc_tree(tmp_path, image_writer)
    assert len(read_voc(tmp_path, "test")[0]) == 3
    assert len(read_voc(tmp_path / "VOCdevkit", "test")[0]) == 3


def test_read_voc_bad_value_names_file_and_line(tmp_path, image_writer):
    base = _voc_tree(tmp_path, image_writer, values={"dog": {"000007": "2"}})
    with pytest.raises(ValueError, match=r"dog_test\.txt:2"):
        read_voc(base, "test")


def test_read_voc_class_file_disagreeing_with_split(tmp_path, image_writer):
    base = _voc_tree(tmp_path, image_writer)
    cat = base / "ImageSets" / "Main" / "cat_test.txt"
    cat.write_text("000005 -1\n000007 -1\n")
    with pytest.raises(ValueError, match=r"cat_test\.txt.*000012"):
        read_voc(base, "test")


def test_read_voc_missing_files(tmp_path, image_writer):
    base = _voc_tree(tmp_path, image_writer)
    with pytest.raises(FileNotFoundError, match="trainval.txt"):
        read_voc(base, "trainval")
    os.remove(base / "ImageSets" / "Main" / "sofa_test.txt")
    with pytest.raises(FileNotFoundError, match="sofa_test.txt"):
        read_voc(base, "test")
    with pytest.raises(FileNotFoundError, match="no VOC2007 tree"):
        read_voc(tmp_path / "elsewhere", "test")


# ----------------------------------------------------------------------------- folder


def test_read_folder(tmp_path, image_writer):
    image_writer(tmp_path / "b" / "z.JPG")
    image_writer(tmp_path / "a.png", fmt="PNG")
    image_writer(tmp_path / "b" / "c" / "y.jpeg")
    image_writer(tmp_path / "m.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    records, names, stats = read_folder(tmp_path, split="unlabeled")
    assert names == [] and stats == {"images": 4}
    assert [r["file_name"] for r in records] == ["a.png", "b/c/y.jpeg", "b/z.JPG", "m.jpg"]
    assert [r["image_id"] for r in records] == [0, 1, 2, 3]
    assert all(r["labels"].shape == (0,) and r["labels"].dtype == np.uint8 for r in records)
    assert all(os.path.isfile(r["path"]) and r["split"] == "unlabeled" for r in records)


def test_read_folder_empty_or_missing(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        read_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        read_folder(tmp_path / "missing")
