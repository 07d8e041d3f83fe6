"""Incremental point-cloud datasets: block selection per step, label remapping, transforms, caches."""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np
import pytest
import torch
from conftest import load_script_module
from torch.utils.data import DataLoader

import tasks
from dataset import (
    S3DISSegmentationIncremental,
    ScanNetSegmentationIncremental,
    build_datasets,
)
from dataset.pointcloud import MIN_POINTS, PointCloudBlocks, class_presence
from dataset.pointcloud_transform import (
    JITTER_CLIP,
    Augmentation,
    PointCloudTransform,
    augmentation_matrix,
    eval_transform_3d,
    train_transform_3d,
)
from utils.errors import DatasetError, OptionsError

CLASSES = {"s3dis": S3DISSegmentationIncremental, "scannet": ScanNetSegmentationIncremental}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    syn = load_script_module("data/make_synthetic.py", "make_synthetic_for_pointcloud_tests")
    out = tmp_path_factory.mktemp("pc")
    syn.make_synthetic_3d("s3dis", out, num_train=5, num_val=2, seed=11, workers=1)
    syn.make_synthetic_3d("scannet", out, num_train=5, num_val=2, seed=11, workers=1)
    return out


def fake_opts(root, tmp_path, **kw) -> argparse.Namespace:
    opts = argparse.Namespace(
        dataset="scannet",
        task="15-5",
        step=1,
        data_root=str(root),
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
        num_points=256,
    )
    vars(opts).update(kw)
    return opts


def raw_labels(dataset, index: int) -> np.ndarray:
    """The raw labels of the points item ``index`` samples (same generator as __getitem__)."""
    full = dataset.indices[index]
    _, labels = dataset.transform(dataset.load_block(full), full, dataset.blocks.extents[full])
    return labels.numpy()


# ---- which blocks a step uses


def test_class_presence_threshold():
    # 3DPC-CISS: more than max(int(0.05 n), 100) points of the class.
    counts = np.array([[101, 0, 1899], [100, 5, 1895], [0, 151, 2849], [0, 150, 2850]])
    n = counts.sum(axis=1)
    presence = class_presence(counts, n)
    assert presence.shape == (4, 256) and not presence[:, 3:].any()
    assert presence[:, :3].tolist() == [
        [True, False, True],
        [False, False, True],
        [False, True, True],
        [False, False, True],
    ]
    assert MIN_POINTS == 100


def expected_blocks(blocks: PointCloudBlocks, labels, labels_old, overlap: bool) -> set[int]:
    """3DPC-CISS class2scans: union over the current classes of the blocks listing them; disjoint
    additionally drops blocks listing a class that is neither current, old nor background."""
    listed = {}
    for b, (counts, n) in enumerate(zip(blocks.counts, blocks.num_points)):
        threshold = max(int(n * 0.05), 100)
        listed[b] = {c for c, k in enumerate(counts) if k > threshold}
    current = set(labels) - {0}
    keep = {b for b, cs in listed.items() if cs & current}
    if not overlap:
        allowed = current | set(labels_old) | {0}
        keep = {b for b in keep if listed[b] <= allowed}
    return keep


CASES = [("s3dis", t) for t in ("12-1", "8-1_cv1", "8-5", "10-3_cv1")] + [
    ("scannet", t) for t in ("15-1", "17-3_cv1", "19-1", "15-5_cv1")
]


@pytest.mark.parametrize(("name", "task"), CASES)
@pytest.mark.parametrize("overlap", [True, False])
def test_step_selection_matches_class2scans(root, name, task, overlap):
    for step in range(tasks.get_num_steps(name, task)):
        labels, labels_old, _ = tasks.get_task_labels(name, task, step)
        dst = CLASSES[name](root, train=True, labels=labels, labels_old=labels_old, overlap=overlap)
        assert set(dst.indices) == expected_blocks(dst.blocks, labels, labels_old, overlap)
        assert dst.indices == sorted(dst.indices)
        if step == 0 and overlap:
            assert len(dst) > 0
        # (Disjoint can be empty: a floor learned later is a future class of nearly every block.)


@pytest.mark.parametrize(
    ("name", "task", "step"),
    [("s3dis", "8-1_cv1", 2), ("scannet", "15-5_cv1", 1), ("scannet", "15-1", 0), ("s3dis", "offline", 0)],
)
def test_labels_remapped_to_task_order(root, name, task, step):
    labels, labels_old, _ = tasks.get_task_labels(name, task, step)
    order = labels_old + labels  # model class k = k-th class of the task order
    dst = CLASSES[name](
        root, train=True, labels=labels, labels_old=labels_old, transform=eval_transform_3d(512)
    )
    assert len(dst) > 0
    for i in range(min(len(dst), 6)):
        points, target = dst[i]
        assert points.shape == (9, 512) and points.dtype == torch.float32
        assert target.shape == (512,) and target.dtype == torch.int64
        raw = raw_labels(dst, i)
        expected = np.array([order.index(r) if r in labels and r != 0 else 0 for r in raw])
        np.testing.assert_array_equal(target.numpy(), expected)


def test_masking_modes_and_ignored_background(root):
    # Step 1 of 15-1: old classes, one current class and four future ones.
    labels, labels_old, _ = tasks.get_task_labels("scannet", "15-1_cv1", 1)
    order, future = labels_old + labels, set(range(21)) - set(labels_old + labels)

    def mapped(**kw):
        dst = ScanNetSegmentationIncremental(root, train=True, labels=labels, labels_old=labels_old, **kw)
        targets = np.concatenate([dst[i][1].numpy() for i in range(len(dst))])
        raws = np.concatenate([raw_labels(dst, i) for i in range(len(dst))])
        return raws, targets

    raws, t = mapped(data_masking="current+old")
    old = np.isin(raws, labels_old[1:])
    np.testing.assert_array_equal(t[old], [order.index(r) for r in raws[old]])
    assert (t[np.isin(raws, list(future))] == 0).all()
    raws, t = mapped(data_masking="new")
    assert (t[np.isin(raws, labels_old[1:] + list(future))] == 255).all()
    assert (t[raws == 0] == 0).all()
    assert (t[np.isin(raws, labels)] == order.index(labels[0])).all()
    raws, t = mapped(masking=False)  # --no_mask: reorder only
    seen = np.isin(raws, order)
    np.testing.assert_array_equal(t[seen], [order.index(r) for r in raws[seen]])
    raws, t = mapped(ignore_test_bg=True)  # unannotated and every other class ignored
    assert (t[~np.isin(raws, labels)] == 255).all()
    with pytest.raises(OptionsError, match="--data_masking all"):
        ScanNetSegmentationIncremental(root, labels=labels, labels_old=labels_old, data_masking="all")


def test_no_labels_keeps_every_block_and_raw_ids(root):
    dst = S3DISSegmentationIncremental(root, train=False)
    assert len(dst) == len(dst.blocks.names)
    points, target = dst[0]
    np.testing.assert_array_equal(target.numpy(), raw_labels(dst, 0))
    assert target.min() >= 1  # S3DIS: no point is background


# ---- transforms


def test_eval_transform_is_deterministic_and_well_formed():
    rng = np.random.default_rng(0)
    block = np.concatenate(
        [
            rng.uniform([2, 3, 0], [3, 4, 2.7], (3000, 3)),
            rng.integers(0, 256, (3000, 3)),
            rng.integers(1, 14, (3000, 1)),
        ],
        axis=1,
    ).astype(np.float32)
    tf = eval_transform_3d(2048)
    a, la = tf(block, 7)
    b, lb = tf(block, 7)
    c, _ = tf(block, 8)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert a.shape == (9, 2048) and a.dtype == torch.float32 and la.dtype == torch.int64
    xyz, rgb, norm = a[:3], a[3:6], a[6:]
    assert torch.allclose(xyz.min(dim=1).values, torch.zeros(3))  # shifted to the sampled minimum
    assert rgb.min() >= 0 and rgb.max() <= 1
    assert torch.allclose(norm.min(dim=1).values, torch.zeros(3)) and torch.allclose(
        norm.max(dim=1).values, torch.ones(3)
    )
    # Normalised xyz = xyz / its extent, per axis.
    torch.testing.assert_close(norm, xyz / xyz.max(dim=1, keepdim=True).values)
    # Without replacement when the block is large enough: 2048 distinct points.
    assert len(np.unique(a.numpy().T, axis=0)) == 2048
    small, small_labels = tf(block[:100], 0)  # with replacement otherwise
    assert small.shape == (9, 2048) and len(np.unique(small.numpy().T, axis=0)) <= 100
    assert set(small_labels.tolist()) <= set(block[:100, 6].astype(int).tolist())


def test_room_normalisation_and_flat_blocks():
    block = np.zeros((50, 7), dtype=np.float32)
    block[:, 0] = np.linspace(1, 2, 50)  # y and z constant: zero extent on two axes
    block[:, 3:6] = 255
    points, _ = PointCloudTransform(64)(block, 0)
    assert torch.isfinite(points).all() and (points[7:] == 0).all()
    room, _ = PointCloudTransform(64, xyz_norm="room")(block, 0, room_extent=np.array([4.0, 2.0, 3.0]))
    torch.testing.assert_close(room[6], room[0] / 4.0 + 0.25)  # x in [1, 2] of a 4 m room
    with pytest.raises(ValueError, match="room extent"):
        PointCloudTransform(64, xyz_norm="room")(block, 0)
    with pytest.raises(ValueError, match="xyz_norm"):
        PointCloudTransform(64, xyz_norm="sphere")


def test_augmentation_matrix_ranges():
    rng = np.random.default_rng(1)
    identity = augmentation_matrix(rng, Augmentation(scale=0, rotate=False, mirror_prob=0, jitter=False))
    np.testing.assert_array_equal(identity, np.eye(3))
    scales, flips = [], np.zeros(2)
    for _ in range(400):
        m = augmentation_matrix(rng, Augmentation(scale=1.5, rotate=True, mirror_prob=1.0))
        s = abs(np.linalg.det(m)) ** (1 / 3)
        r = m / s
        np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)  # scale x orthogonal
        np.testing.assert_allclose(r[2], [0, 0, 1], atol=1e-12)  # z is never rotated or mirrored
        scales.append(s)
        flips[0] += np.linalg.det(r) < 0
    assert 1 / 1.5 <= min(scales) < 0.75 and 1.4 < max(scales) <= 1.5
    # Each of x and y mirrored with probability 1/2: an odd number of mirrors (det -1) half the time.
    assert 150 < flips[0] < 250
    always = augmentation_matrix(rng, Augmentation(scale=0, rotate=False, mirror_prob=2.0))
    np.testing.assert_array_equal(always, np.diag([-1.0, -1.0, 1.0]))


def test_train_transform_randomness_and_jitter(monkeypatch):
    rng = np.random.default_rng(2)
    block = np.concatenate(
        [rng.uniform(0, 1, (4000, 3)), np.full((4000, 3), 128.0), np.ones((4000, 1))], axis=1
    ).astype(np.float32)
    torch.manual_seed(0)
    tf = train_transform_3d(1024)
    a, _ = tf(block, 3)
    b, _ = tf(block, 3)
    assert not torch.equal(a, b)  # a new draw per call, from torch's generator
    torch.manual_seed(0)
    assert torch.equal(tf(block, 3)[0], a)  # ... which run.py seeds
    # Jitter alone: every coordinate moves by at most 0.05 m, about 0.01 m on average.
    jitter_only = PointCloudTransform(1024, Augmentation(rotate=False, jitter=True))
    plain = PointCloudTransform(1024, None)
    seeds = iter([5, 5])
    monkeypatch.setattr(
        PointCloudTransform, "generator", lambda self, key: np.random.default_rng(next(seeds))
    )
    moved, _ = jitter_only(block, 0)
    still, _ = plain(block, 0)
    delta = (moved[:3] - still[:3]).abs()
    assert delta.max() <= JITTER_CLIP + 1e-6 and 0.005 < delta.mean() < 0.012
    torch.testing.assert_close(moved[3:6], still[3:6])  # colours untouched


# ---- datasets through build_datasets


def test_build_datasets_3d(root, tmp_path):
    for name, task in (("scannet", "15-5"), ("s3dis", "12-1_cv1")):
        for step in (0, 1):
            bundle = build_datasets(fake_opts(root, tmp_path, dataset=name, task=task, step=step))
            labels, labels_old, _ = tasks.get_task_labels(name, task, step)
            assert bundle.labels == labels and bundle.labels_old == labels_old
            assert bundle.n_classes == len(labels_old) + len(labels)
            test_blocks = PointCloudBlocks(name, root, "test")
            assert len(bundle.test) == len(test_blocks.names)  # every block of the test split
            assert len(bundle.train) > 0 and len(bundle.val) <= len(bundle.test)
            assert step > 0 or len(bundle.val) > 0
            cache = tmp_path / "cache" / name / f"{task}-ov"
            for file in (f"train-{step}.npy", f"val-{step}.npy", f"test_on_val-{step}.npy"):
                assert (cache / file).is_file() and (cache / f"{file}.json").is_file()
            seen = set()
            for i in range(len(bundle.test)):
                seen |= set(bundle.test[i][1].tolist())
            assert seen <= set(range(bundle.n_classes)) and len(seen) > 3
    # The test split: S3DIS Area_5, ScanNet's validation scenes.
    assert all(n.startswith("Area_5_") for n in PointCloudBlocks("s3dis", root, "test").names)
    assert not any(n.startswith("Area_5_") for n in PointCloudBlocks("s3dis", root, "train").names)
    val = (root / "ScanNet/scannetv2_val.txt").read_text().split()
    assert {n.rsplit("_block_", 1)[0] for n in PointCloudBlocks("scannet", root, "test").names} == set(val)


def test_loader_batches_have_the_interface_shapes(root, tmp_path):
    bundle = build_datasets(fake_opts(root, tmp_path, step=0, num_points=300))
    for part in (bundle.train, bundle.val, bundle.test):
        points, labels = next(iter(DataLoader(part, batch_size=3, shuffle=False, num_workers=0)))
        assert points.shape == (3, 9, 300) and points.dtype == torch.float32
        assert labels.shape == (3, 300) and labels.dtype == torch.int64
    # Through a worker process, as run.py loads; the default number of points is 2048.
    opts = fake_opts(root, tmp_path, step=0)
    del opts.num_points
    bundle = build_datasets(opts)
    points, labels = next(iter(DataLoader(bundle.train, batch_size=2, num_workers=1)))
    assert points.shape == (2, 9, 2048) and labels.shape == (2, 2048)
    # Evaluation items are the same in every epoch and every worker.
    first = [bundle.test[i][0] for i in range(3)]
    again = next(iter(DataLoader(bundle.test, batch_size=3, num_workers=1)))[0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_build_datasets_variants(root, tmp_path, caplog):
    torch.manual_seed(0)
    opts = fake_opts(
        root,
        tmp_path,
        dataset="s3dis",
        task="8-5",
        step=1,
        cross_val=True,
        val_on_trainset=True,
        overlap=False,
        test_on_val=True,
    )
    with caplog.at_level(logging.WARNING, logger="LGKD.dataset"):
        bundle = build_datasets(opts)
    assert "--test_on_val only applies to VOC" in caplog.text
    n = len(bundle.train) + len(bundle.val)
    assert len(bundle.train) == int(0.8 * n)
    cache = tmp_path / "cache/s3dis/8-5"
    assert (cache / "test_on_train-1.npy").is_file() and not (cache / "val-1.npy").exists()
    assert len(bundle.test) == len(PointCloudBlocks("s3dis", root, "train").names)
    assert bundle.test.ignore_test_bg is False


# ---- split caches


def test_split_cache_reused_and_invalidated(root, tmp_path, monkeypatch, caplog):
    labels, labels_old, _ = tasks.get_task_labels("scannet", "19-1", 1)
    path = tmp_path / "train-1.npy"
    first = ScanNetSegmentationIncremental(root, labels=labels, labels_old=labels_old, idxs_path=path)
    meta = json.loads(path.with_name("train-1.npy.json").read_text())
    assert meta["signature"]["min_ratio"] == 0.05 and meta["signature"]["filter_blocks"] is True
    assert meta["signature"]["split"]["split"] == "train"

    def fail(self):
        raise AssertionError("recomputed")

    monkeypatch.setattr(ScanNetSegmentationIncremental, "compute_indices", fail)
    again = ScanNetSegmentationIncremental(root, labels=labels, labels_old=labels_old, idxs_path=path)
    assert again.indices == first.indices
    monkeypatch.undo()
    # Another selection rule (disjoint) or a new preparation of the blocks: recomputed.
    with caplog.at_level(logging.INFO, logger="LGKD.dataset"):
        ScanNetSegmentationIncremental(
            root, labels=labels, labels_old=labels_old, idxs_path=path, overlap=False
        )
    assert "overlap: True -> False" in caplog.text
    manifest = root / "ScanNet/blocks_bs1_s1/blocks.json"
    manifest.write_text(manifest.read_text())  # same content, new mtime: the blocks may differ
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="LGKD.dataset"):
        ScanNetSegmentationIncremental(root, labels=labels, labels_old=labels_old, idxs_path=path)
    assert "Recomputing" in caplog.text and "mtime_ns" in caplog.text


# ---- errors


def test_dataset_layout_errors(root, tmp_path):
    with pytest.raises(DatasetError, match="s3dis was not found under --data_root") as info:
        S3DISSegmentationIncremental(tmp_path)
    assert f"{tmp_path} is empty" in str(info.value) and "Area_{1..6}" in str(info.value)
    (tmp_path / "ScanNet/scans/scene0000_00").mkdir(parents=True)
    not_cut = r"has not been cut into blocks yet .*prepare_3d\.py --dataset scannet"
    with pytest.raises(DatasetError, match=not_cut):
        ScanNetSegmentationIncremental(tmp_path)
    with pytest.raises(DatasetError, match="is the S3DIS folder itself"):
        S3DISSegmentationIncremental(root / "S3DIS")
    blocks = tmp_path / "ScanNet/blocks_bs1_s1"
    blocks.mkdir()
    (blocks / "blocks.json").write_text(json.dumps({"format": 0}))
    with pytest.raises(DatasetError, match="another version of the preparation"):
        ScanNetSegmentationIncremental(tmp_path)
    good = json.loads((root / "ScanNet/blocks_bs1_s1/blocks.json").read_text())
    (blocks / "blocks.json").write_text(json.dumps({**good, "dataset": "s3dis"}))
    with pytest.raises(DatasetError, match="describes 's3dis' blocks, not scannet"):
        ScanNetSegmentationIncremental(tmp_path)
    only_train = {**good, "rooms": [r for r in good["rooms"] if r["split"] == "train"]}
    (blocks / "blocks.json").write_text(json.dumps(only_train))
    with pytest.raises(DatasetError, match="test split of the prepared scannet blocks .* is empty"):
        ScanNetSegmentationIncremental(tmp_path, train=False)


def test_broken_block_files(root, tmp_path):
    import shutil

    shutil.copytree(root / "S3DIS/blocks_bs1_s1", tmp_path / "S3DIS/blocks_bs1_s1")
    dst = S3DISSegmentationIncremental(tmp_path, train=False)
    path = tmp_path / "S3DIS/blocks_bs1_s1/data" / f"{dst.blocks.names[0]}.npy"
    np.save(path, np.zeros((10, 6), dtype=np.float32))
    with pytest.raises(DatasetError, match=r"shape \(10, 6\), not \(n, 7\).*--force"):
        dst[0]
    np.save(path, np.full((10, 7), 14, dtype=np.float32))
    with pytest.raises(DatasetError, match="labels outside 0..13"):
        dst[0]
    path.unlink()
    with pytest.raises(DatasetError, match="Cannot read the block"):
        dst[0]
