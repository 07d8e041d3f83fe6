"""Incremental datasets (reference ``dataset/``): filtering, masking/reordering LUTs, hold-out split, index
cache, errors, and build_datasets on a synthetic tree."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script_module
from PIL import Image

import dataset.incremental as inc
from dataset import (
    AdeSegmentationIncremental,
    CityscapesSegmentationIncrementalDomain,
    VOCSegmentation,
    VOCSegmentationIncremental,
    build_datasets,
)
from dataset.transform import train_transform
from utils.errors import DatasetError, OptionsError, TaskError

VOC_STEP0 = list(range(16))  # 15-5s: step 0 = 0..15, then 16, 17, ...
B_STEP0 = [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11]  # 15-5s_b, step 0 in task order

# Train masks: each is a 6x6 map made of the listed values (first value fills the map, others stripes).
VOC_TRAIN = [
    [0, 1],  # 0
    [0, 2, 255],  # 1
    [0, 16],  # 2
    [0, 1, 16],  # 3
    [0, 17],  # 4
    [0, 255],  # 5: only background
    [0, 16, 17],  # 6
    [0, 12, 17, 3, 255],  # 7
]
VOC_VAL = [[0, 1], [0, 16], [0, 5, 17], [0], [0, 2], [0, 3], [0, 4], [0, 6], [0, 7], [0, 8]]


def _mask(values: list[int], size: int = 6) -> np.ndarray:
    m = np.full((size, size), values[0], dtype=np.uint8)
    for k, v in enumerate(values[1:]):
        m[k + 1, :] = v
    return m


def _write_pair(img_path: Path, mask_path: Path, mask: np.ndarray, palette: bool = True) -> None:
    img_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.repeat(mask[..., None], 3, axis=2)).save(img_path)
    im = Image.fromarray(mask)
    if palette:
        im.putpalette([i % 256 for i in range(768)])
    im.save(mask_path)


def make_voc(root: Path, train=VOC_TRAIN, val=VOC_VAL) -> Path:
    voc = root / "PascalVOC2012"
    (voc / "list").mkdir(parents=True)
    (voc / "SegmentationClassAug").mkdir(parents=True)
    for split, masks, list_name in (("tr", train, "train_aug.txt"), ("va", val, "val.txt")):
        lines = []
        for i, values in enumerate(masks):
            name = f"{split}{i:03d}"
            _write_pair(
                voc / "VOCdevkit/VOC2012/JPEGImages" / f"{name}.jpg",
                voc / "SegmentationClassAug" / f"{name}.png",
                _mask(values),
            )
            lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png\n")
        (voc / "list" / list_name).write_text("".join(lines))
    return root


def make_ade(root: Path, train: list[list[int]], val: list[list[int]]) -> Path:
    ade = root / "ADEChallengeData2016"
    for folder, prefix, masks in (("training", "train", train), ("validation", "val", val)):
        (ade / "images" / folder).mkdir(parents=True)
        for i, values in enumerate(masks):
            name = f"ADE_{prefix}_{i + 1:08d}"
            _write_pair(
                ade / "images" / folder / f"{name}.jpg",
                ade / "annotations" / folder / f"{name}.png",
                _mask(values),
                palette=False,
            )
    return root


def voc(root, **kw):
    kw.setdefault("labels", VOC_STEP0)
    kw.setdefault("labels_old", [])
    return VOCSegmentationIncremental(root, **kw)


def values_of(ds, i) -> set[int]:
    return set(ds[i][1].unique().tolist())


@pytest.fixture
def voc_root(tmp_path):
    return make_voc(tmp_path / "data")


# ---- filtering (reference ``dataset/utils.py`` ``filter_images``)


@pytest.mark.parametrize(
    ("labels", "labels_old", "overlap", "expected"),
    [
        (VOC_STEP0, [], True, [0, 1, 3, 7]),
        (VOC_STEP0, [], False, [0, 1]),
        ([16], VOC_STEP0, True, [2, 3, 6]),
        ([16], VOC_STEP0, False, [2, 3]),
        ([17], VOC_STEP0 + [16], True, [4, 6, 7]),
        ([17], VOC_STEP0 + [16], False, [4, 6, 7]),
    ],
)
def test_overlap_and_disjoint_filtering(voc_root, labels, labels_old, overlap, expected):
    ds = voc(voc_root, labels=labels, labels_old=labels_old, overlap=overlap)
    assert ds.indices == expected
    assert len(ds) == len(expected)


def test_parallel_scan_equals_in_process(voc_root, monkeypatch):
    serial = voc(voc_root, labels=[16], labels_old=VOC_STEP0, scan_workers=0)
    monkeypatch.setattr(inc, "MIN_PARALLEL_SCAN", 0)
    monkeypatch.setattr(inc, "SCAN_CHUNK", 3)
    parallel = voc(voc_root, labels=[16], labels_old=VOC_STEP0, scan_workers=2)
    assert parallel.indices == serial.indices


# ---- masking and reordering (reference ``VOCSegmentationIncremental``, ``AdeSegmentationIncremental``)


def test_voc_masking_modes(voc_root):
    # image 3 = {0, 1, 16}, image 6 = {0, 16, 17}; step 1 of 15-5s (labels [16], old 0..15)
    cur = voc(voc_root, labels=[16], labels_old=VOC_STEP0, data_masking="current")
    assert cur.indices == [2, 3, 6]
    assert values_of(cur, 1) == {0, 16}  # old class 1 -> background
    assert values_of(cur, 2) == {0, 16}  # future class 17 -> background
    old = voc(voc_root, labels=[16], labels_old=VOC_STEP0, data_masking="current+old")
    assert values_of(old, 1) == {0, 1, 16}
    assert values_of(old, 2) == {0, 16}
    new = voc(voc_root, labels=[16], labels_old=VOC_STEP0, data_masking="new")
    assert values_of(new, 1) == {0, 16, 255}  # old -> ignored
    assert values_of(new, 2) == {0, 16, 255}  # future -> ignored
    lut = new.lut
    assert lut[1] == 255 and lut[17] == 255 and lut[0] == 0 and lut[16] == 16 and lut[255] == 255


def test_voc_255_kept_and_lut_is_exact(voc_root):
    ds = voc(voc_root)  # step 0, current masking
    assert values_of(ds, 1) == {0, 2, 255}
    expected = np.zeros(256, dtype=np.uint8)
    expected[:16] = np.arange(16)
    expected[255] = 255
    np.testing.assert_array_equal(ds.lut, expected)


def test_random_order_task_reordering(voc_root):
    # 15-5s_b: model class k = k-th class in task order; image 7 = {0, 12, 17, 3, 255}
    step0 = voc(voc_root, labels=B_STEP0, labels_old=[])
    assert step0.lut[12] == 1 and step0.lut[9] == 2 and step0.lut[20] == 3 and step0.lut[11] == 15
    assert step0.lut[17] == 0 and step0.lut[3] == 0 and step0.lut[255] == 255
    k = step0.indices.index(7)
    assert values_of(step0, k) == {0, 1, 255}
    step1 = voc(voc_root, labels=[17], labels_old=B_STEP0)
    assert step1.lut[17] == 16 and step1.lut[12] == 0
    assert values_of(step1, step1.indices.index(7)) == {0, 16, 255}
    kept_old = voc(voc_root, labels=[17], labels_old=B_STEP0, data_masking="current+old")
    assert values_of(kept_old, kept_old.indices.index(7)) == {0, 1, 16, 255}


def test_voc_refused_options(voc_root):
    with pytest.raises(OptionsError, match="data_masking all"):
        voc(voc_root, data_masking="all")
    with pytest.raises(OptionsError, match="no_mask"):
        voc(voc_root, masking=False)
    with pytest.raises(TaskError):
        voc(voc_root, labels=[16, 3], labels_old=VOC_STEP0)


def test_ade_masking(tmp_path):
    root = make_ade(tmp_path, train=[[0, 5, 101, 255], [0, 7], [0, 120]], val=[[0, 5, 101], [0, 140], [0]])
    old, new = list(range(101)), list(range(101, 151))
    train = AdeSegmentationIncremental(root, labels=new, labels_old=old)
    assert train.indices == [0, 2]
    # Reference behaviour: background, old classes and even 255 become 0; no 0 is prepended.
    assert values_of(train, 0) == {0, 101}
    assert train.lut[255] == 0 and train.lut[5] == 0 and train.lut[150] == 150
    no_mask = AdeSegmentationIncremental(root, labels=new, labels_old=old, masking=False)
    assert values_of(no_mask, 0) == {0, 5, 101, 255}
    # Test set at step 0 of 100-50: seen classes only, everything else -> 0 (or 255 with ignore_test_bg).
    test = AdeSegmentationIncremental(root, train=False, labels=old)
    assert test.indices == [0]
    assert values_of(test, 0) == {0, 5}
    ignore = AdeSegmentationIncremental(root, train=False, labels=old, ignore_test_bg=True)
    assert values_of(ignore, 0) == {5, 255}
    assert ignore.lut[0] == 255 and ignore.lut[101] == 255 and ignore.lut[5] == 5


def test_test_on_val_split(voc_root):
    full = voc(voc_root, train=False, labels=list(range(9)))
    kept = list(full.indices)
    assert kept == [0, 2, 4, 5, 6, 7, 8, 9]
    shuffled = list(kept)
    np.random.RandomState(1).shuffle(shuffled)
    cut = int(0.8 * len(shuffled))
    head = voc(voc_root, train=False, labels=list(range(9)), test_on_val=True)
    # train=False keeps the last 20 % of the shuffled val indices (RN-25)
    assert head.indices == shuffled[cut:]
    train = voc(voc_root, train=True, labels=VOC_STEP0, test_on_val=True)
    tr = [0, 1, 3, 7]
    np.random.RandomState(1).shuffle(tr)
    assert train.indices == tr[: int(0.8 * 4)]


def test_getitem_with_train_transform(voc_root):
    ds = voc(voc_root, transform=train_transform(16))
    img, lbl = ds[0]
    # The presets keep the image uint8; it is normalised on the device (normalize_on_device).
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    assert lbl.shape == (16, 16) and lbl.dtype == torch.uint8


def test_list_without_final_newline_keeps_last_char(voc_root):
    lst = voc_root / "PascalVOC2012/list/val.txt"
    lst.write_text(lst.read_text().rstrip("\n"))
    raw = VOCSegmentation(voc_root, "val")
    assert raw.images[-1][1].endswith("va009.png")
    assert raw.images[0][0].endswith("PascalVOC2012/VOCdevkit/VOC2012/JPEGImages/va000.jpg")


# ---- index cache


def _count_scans(monkeypatch) -> list[int]:
    calls = []
    real = inc.scan_masks

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(inc, "scan_masks", counting)
    return calls


def test_cache_written_and_reused(voc_root, tmp_path, monkeypatch):
    calls = _count_scans(monkeypatch)
    path = tmp_path / "cache" / "train-1.npy"
    first = voc(voc_root, labels=[16], labels_old=VOC_STEP0, idxs_path=path)
    assert len(calls) == 1
    np.testing.assert_array_equal(np.load(path), first.indices)
    meta = json.loads((tmp_path / "cache" / "train-1.npy.json").read_text())
    assert meta["signature"]["data_root"] == str(voc_root.resolve())
    assert meta["signature"]["overlap"] is True and meta["signature"]["labels"] == [16]
    second = voc(voc_root, labels=[16], labels_old=VOC_STEP0, idxs_path=path)
    assert len(calls) == 1 and second.indices == first.indices
    assert not list(path.parent.glob("*.tmp"))


def test_cache_invalidated_by_data_root_list_and_options(voc_root, tmp_path, monkeypatch, caplog):
    calls = _count_scans(monkeypatch)
    path = tmp_path / "cache" / "train-1.npy"
    voc(voc_root, labels=[16], labels_old=VOC_STEP0, idxs_path=path)
    other = tmp_path / "other"
    shutil.copytree(voc_root, other)
    with caplog.at_level(logging.INFO, logger="LGKD.dataset"):
        voc(other, labels=[16], labels_old=VOC_STEP0, idxs_path=path)
    assert len(calls) == 2
    assert "data_root" in caplog.text
    meta = json.loads(path.with_name("train-1.npy.json").read_text())
    assert meta["signature"]["data_root"] == str(other.resolve())
    # a changed list file (one entry dropped) -> recomputed, and the new indices are right
    lst = other / "PascalVOC2012/list/train_aug.txt"
    lst.write_text("".join(lst.read_text().splitlines(keepends=True)[:4]))
    ds = voc(other, labels=[16], labels_old=VOC_STEP0, idxs_path=path)
    assert len(calls) == 3 and ds.indices == [2, 3]
    voc(other, labels=[16], labels_old=VOC_STEP0, idxs_path=path, overlap=False)
    assert len(calls) == 4


def test_cache_without_sidecar_or_corrupt_is_recomputed(voc_root, tmp_path, monkeypatch, caplog):
    calls = _count_scans(monkeypatch)
    path = tmp_path / "train-0.npy"
    np.save(path, np.array([5, 6], dtype=int))  # as written by the reference: no sidecar
    with caplog.at_level(logging.INFO, logger="LGKD.dataset"):
        ds = voc(voc_root, idxs_path=path)
    assert ds.indices == [0, 1, 3, 7] and len(calls) == 1
    assert "sidecar" in caplog.text
    np.save(path, np.array([1], dtype=int))  # tampered file, sidecar checksum no longer matches
    ds = voc(voc_root, idxs_path=path)
    assert ds.indices == [0, 1, 3, 7] and len(calls) == 2


# ---- errors


def test_missing_voc_root(tmp_path):
    with pytest.raises(DatasetError, match="download_voc.sh") as err:
        voc(tmp_path)
    assert "PascalVOC2012" in str(err.value) and "\n\n" not in str(err.value)


def test_missing_list_file_and_aug_folder(voc_root):
    (voc_root / "PascalVOC2012/list/val.txt").unlink()
    with pytest.raises(DatasetError, match=r"val\.txt"):
        voc(voc_root, train=False)
    shutil.rmtree(voc_root / "PascalVOC2012/SegmentationClassAug")
    with pytest.raises(DatasetError, match="SegmentationClassAug"):
        voc(voc_root)


def test_missing_mask_and_image(voc_root):
    (voc_root / "PascalVOC2012/SegmentationClassAug/tr003.png").unlink()
    with pytest.raises(DatasetError, match=r"tr003\.png"):
        voc(voc_root)
    (voc_root / "PascalVOC2012/VOCdevkit/VOC2012/JPEGImages/va002.jpg").unlink()
    with pytest.raises(DatasetError, match=r"va002\.jpg"):
        voc(voc_root, train=False)


def test_missing_image_at_load_time(voc_root, tmp_path):
    ds = voc(voc_root, idxs_path=tmp_path / "c.npy")
    (voc_root / "PascalVOC2012/VOCdevkit/VOC2012/JPEGImages/tr001.jpg").unlink()
    ds = voc(voc_root, idxs_path=tmp_path / "c.npy")  # cached: no scan
    with pytest.raises(DatasetError, match=r"tr001\.jpg"):
        ds[1]


def test_out_of_range_and_rgb_masks(voc_root, tmp_path):
    bad = voc_root / "PascalVOC2012/SegmentationClassAug/tr002.png"
    Image.fromarray(_mask([0, 30])).save(bad)
    with pytest.raises(DatasetError, match=r"tr002\.png.*\[30\]"):
        voc(voc_root)
    Image.fromarray(np.zeros((6, 6, 3), dtype=np.uint8)).save(bad)
    with pytest.raises(DatasetError, match=r"tr002\.png.*mode 'RGB'"):
        voc(voc_root)
    root = make_ade(tmp_path / "ade", train=[[0, 151]], val=[[0]])
    with pytest.raises(DatasetError, match=r"ADE_train_00000001\.png.*\[151\]"):
        AdeSegmentationIncremental(root, labels=[1])


def test_missing_ade(tmp_path):
    with pytest.raises(DatasetError, match="download_ade.sh"):
        AdeSegmentationIncremental(tmp_path, labels=[1])


# ---- Cityscapes domains (reference ``CityscapesSegmentationIncrementalDomain``)


def make_cityscapes(root: Path) -> Path:
    for split, cities in (("train", ["aachen", "bremen", "zurich"]), ("val", ["frankfurt"])):
        for city in cities:
            for k in range(5):
                name = f"{city}_{k:06d}_000019"
                mask = np.array([[7, 26], [0, 33]], dtype=np.uint8)
                _write_pair(
                    root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png",
                    root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png",
                    mask,
                    palette=False,
                )
    return root


def test_cityscapes_domains(tmp_path):
    root = make_cityscapes(tmp_path)
    train = CityscapesSegmentationIncrementalDomain(root, labels=[0, 1], idxs_path=tmp_path / "c/train-0.npy")
    kept = list(range(10))  # aachen then bremen, in sorted order
    np.random.RandomState(1).shuffle(kept)
    assert train.indices == kept[:8]
    test = CityscapesSegmentationIncrementalDomain(root, train=False, labels=[0, 1, 18])
    assert len(test.indices) == 15 - int(0.8 * 15)
    assert all(i < 10 or i >= 15 for i in test.indices)  # zurich (domain 17) is not seen
    _, lbl = train[0]
    np.testing.assert_array_equal(lbl.numpy(), [[0, 13], [255, 18]])


# ---- build_datasets on a make_synthetic tree


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    mod = load_script_module("data/make_synthetic.py", "make_synthetic_for_dataset_tests")
    root = tmp_path_factory.mktemp("syn")
    mod.make_synthetic("voc", root, num_train=40, num_val=16, size=32, seed=3, workers=1)
    mod.make_synthetic("ade", root, num_train=40, num_val=16, size=32, seed=3, workers=1)
    return root


def fake_opts(root, tmp_path, **kw) -> argparse.Namespace:
    opts = argparse.Namespace(
        dataset="voc",
        task="15-5s",
        step=1,
        data_root=str(root),
        crop_size=24,
        crop_val=True,
        overlap=True,
        no_mask=False,
        data_masking="current",
        test_on_val=False,
        val_on_trainset=False,
        cross_val=False,
        ignore_test_bg=False,
        num_workers=0,
        scan_workers=None,
        cache_dir=str(tmp_path / "cache"),
        no_progress=True,
    )
    vars(opts).update(kw)
    return opts


def test_build_datasets_voc(synthetic_root, tmp_path):
    bundle = build_datasets(fake_opts(synthetic_root, tmp_path))
    assert bundle.labels == [16] and bundle.labels_old == VOC_STEP0
    assert bundle.labels_cum == VOC_STEP0 + [16] and bundle.n_classes == 17
    cache = tmp_path / "cache/voc/15-5s-ov"
    for name in ("train-1.npy", "val-1.npy", "test_on_val-1.npy"):
        assert (cache / name).is_file() and (cache / f"{name}.json").is_file()
    assert len(bundle.train) > 0 and len(bundle.test) >= len(bundle.val)
    for i in range(len(bundle.train)):
        img, lbl = bundle.train[i]
        assert img.shape == (3, 24, 24)
        assert set(lbl.unique().tolist()) <= {0, 16, 255}
    seen = set()
    for i in range(len(bundle.test)):
        seen |= set(bundle.test[i][1].unique().tolist())
    assert seen <= set(range(17)) | {255} and len(seen) > 3


def test_build_datasets_loaders_yield_uint8_batches(synthetic_root, tmp_path):
    from torch.utils.data import DataLoader

    from dataset.transform import normalize_on_device

    opts = fake_opts(synthetic_root, tmp_path)
    bundle = build_datasets(opts)
    for part in (bundle.train, bundle.val, bundle.test):
        images, labels = next(iter(DataLoader(part, batch_size=2, shuffle=False, num_workers=0)))
        assert images.dtype == torch.uint8 and images.shape == (2, 3, 24, 24)
        assert labels.dtype == torch.uint8 and labels.shape == (2, 24, 24)
        normalised = normalize_on_device(images, "cpu")
        assert normalised.dtype == torch.float32 and normalised.shape == images.shape
    # Through a worker process as run.py builds it (pin_memory only where an accelerator exists).
    loader = DataLoader(bundle.train, batch_size=2, num_workers=1, pin_memory=torch.cuda.is_available())
    images, _ = next(iter(loader))
    assert images.dtype == torch.uint8
    # --crop_val off: full images, batch 1 as run.py uses then.
    full = build_datasets(fake_opts(synthetic_root, tmp_path, crop_val=False)).test
    images, _ = next(iter(DataLoader(full, batch_size=1)))
    assert images.dtype == torch.uint8 and images.shape[:2] == (1, 3)


def test_build_datasets_variants(synthetic_root, tmp_path, monkeypatch):
    torch.manual_seed(0)
    bundle = build_datasets(
        fake_opts(synthetic_root, tmp_path, cross_val=True, val_on_trainset=True, overlap=False)
    )
    n = len(bundle.train) + len(bundle.val)
    assert len(bundle.train) == int(0.8 * n)
    cache = tmp_path / "cache/voc/15-5s"
    assert (cache / "test_on_train-1.npy").is_file() and not (cache / "val-1.npy").exists()
    # no --cache_dir: the reference's path relative to the working directory
    monkeypatch.chdir(tmp_path)
    build_datasets(fake_opts(synthetic_root, tmp_path, cache_dir=None, step=0))
    assert (tmp_path / "data/voc/15-5s-ov/train-0.npy").is_file()


def test_build_datasets_ade(synthetic_root, tmp_path):
    opts = fake_opts(synthetic_root, tmp_path, dataset="ade", task="100-50", step=1, ignore_test_bg=True)
    bundle = build_datasets(opts)
    assert bundle.n_classes == 151 and bundle.labels == list(range(101, 151))
    for i in range(len(bundle.train)):
        assert set(bundle.train[i][1].unique().tolist()) <= {0, *range(101, 151)}
    for i in range(len(bundle.test)):
        assert 0 not in set(bundle.test[i][1].unique().tolist())


def test_build_datasets_cityscapes(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    opts = fake_opts(root, tmp_path, dataset="cityscapes_domain", task="11-5", step=0)
    bundle = build_datasets(opts)
    assert bundle.n_classes == 19 and bundle.labels == list(range(11))
    assert len(bundle.train) == 8 and len(bundle.test) == 2  # aachen + bremen: 10 images, 80/20
    assert len(bundle.val) == 2
    assert set(bundle.train[0][1].unique().tolist()) <= {0, 13, 18, 255}
