"""data/make_synthetic.py: layout, list format, determinism, class coverage, distinct class styles."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script_module
from PIL import Image

syn = load_script_module("data/make_synthetic.py", "make_synthetic_under_test")


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def voc_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    syn.make_synthetic("voc", root, num_train=40, num_val=12, size=48, seed=7, workers=1)
    return root


def test_voc_layout_and_lists(voc_tree):
    voc = voc_tree / "PascalVOC2012"
    train = (voc / "list/train_aug.txt").read_text()
    val = (voc / "list/val.txt").read_text()
    assert train.endswith("\n") and len(train.splitlines()) == 40 and len(val.splitlines()) == 12
    pattern = re.compile(r"^/JPEGImages/(\S+)\.jpg /SegmentationClassAug/\1\.png$")
    for line in train.splitlines() + val.splitlines():
        m = pattern.match(line)
        assert m, line
        assert (voc / "VOCdevkit/VOC2012/JPEGImages" / f"{m.group(1)}.jpg").is_file()
        assert (voc / "SegmentationClassAug" / f"{m.group(1)}.png").is_file()
    mask = Image.open(next((voc / "SegmentationClassAug").glob("*.png")))
    assert mask.mode == "P"
    assert mask.getpalette()[:6] == [0, 0, 0, 128, 0, 0] and mask.getpalette()[765:768] == [224, 224, 192]
    img = Image.open(next((voc / "VOCdevkit/VOC2012/JPEGImages").glob("*.jpg")))
    assert img.mode == "RGB" and img.size[1] == 48 and 48 <= img.size[0] <= 64


def test_voc_masks_cover_classes_with_void_border(voc_tree):
    seen = np.zeros(256, dtype=int)
    for p in (voc_tree / "PascalVOC2012/SegmentationClassAug").glob("train_*.png"):
        arr = np.asarray(Image.open(p))
        seen[np.unique(arr)] += 1
        fg = (arr > 0) & (arr < 255)
        assert fg.any() and (arr == 255).any()  # 1-4 objects, each outlined by 255
    assert set(np.flatnonzero(seen)) <= set(range(21)) | {255}
    assert (seen[1:21] > 0).all()  # every class occurs
    assert seen[1:21].max() <= 4 * seen[1:21].min() + 4  # roughly balanced


def test_ade_layout(tmp_path):
    syn.make_synthetic("ade", tmp_path, num_train=60, num_val=10, size=32, seed=1, workers=1)
    ade = tmp_path / "ADEChallengeData2016"
    images = sorted((ade / "images/training").iterdir())
    assert [p.name for p in images[:2]] == ["ADE_train_00000001.jpg", "ADE_train_00000002.jpg"]
    assert len(list((ade / "annotations/validation").glob("ADE_val_*.png"))) == 10
    info = (ade / "objectInfo150.txt").read_text().splitlines()
    assert len(info) == 151 and info[1].endswith("\twall") and info[-1].endswith("\tflag")
    assert len((ade / "sceneCategories.txt").read_text().splitlines()) == 70
    values = set()
    for p in (ade / "annotations/training").glob("*.png"):
        im = Image.open(p)
        assert im.mode == "L"
        values |= set(np.unique(np.asarray(im)).tolist())
    assert values <= set(range(151)) and len(values) > 100


def test_deterministic_bytes(tmp_path, voc_tree):
    syn.make_synthetic("voc", tmp_path / "a", num_train=40, num_val=12, size=48, seed=7, workers=2)
    assert tree_digest(tmp_path / "a") == tree_digest(voc_tree)  # also independent of --workers
    syn.make_synthetic("voc", tmp_path / "b", num_train=40, num_val=12, size=48, seed=8, workers=1)
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a.keys() == b.keys() and sum(a[k] != b[k] for k in a) > 40


def test_class_styles_are_distinct():
    styles = [syn.class_style(c) for c in range(1, 151)]
    assert len(set(styles)) == 150
    for a, b in zip(styles, styles[1:]):  # consecutive classes (same step) differ in every attribute
        assert a[0] != b[0] and a[1] != b[1] and a[2] != b[2]


def test_balanced_schedule():
    schedule = syn.class_schedule(1000, 150, seed=0, stream=1)
    assert all(1 <= len(s) <= 4 for s in schedule)
    counts = np.bincount(np.concatenate(schedule), minlength=151)[1:]
    assert counts.max() - counts.min() <= 1


def test_refuses_foreign_tree_and_cli(tmp_path, capsys):
    (tmp_path / "PascalVOC2012").mkdir()
    with pytest.raises(SystemExit, match="refusing"):
        syn.make_synthetic("voc", tmp_path, 2, 2, 32, 0, workers=1)
    syn.main(
        [
            "--dataset",
            "voc",
            "--out",
            str(tmp_path / "x"),
            "--num_train",
            "3",
            "--num_val",
            "2",
            "--size",
            "32",
            "--seed",
            "0",
            "--workers",
            "1",
        ]
    )
    assert capsys.readouterr().out.count("\n") == 1
    syn.main(
        [
            "--dataset",
            "voc",
            "--out",
            str(tmp_path / "x"),
            "--num_train",
            "2",
            "--num_val",
            "1",
            "--size",
            "32",
            "--seed",
            "0",
            "--workers",
            "1",
        ]
    )  # replaces its own earlier tree
    assert len(list((tmp_path / "x/PascalVOC2012/SegmentationClassAug").iterdir())) == 3
