"""Data faults (issue 11, section 4, and average_csv.py of section 5): real files, real entry points.

* a mask whose size differs from its image's is refused by the filtering scan (in-process and in the scan
  pool), naming both files, before anything is written; the scan reads image headers only;
* splits that are not scanned (a reused index cache, Cityscapes domains) refuse it when loading;
* an error raised in a DataLoader worker (the default is 4) reaches the user as the project's one-paragraph
  message, for the project's own errors and for whatever PIL raises on a damaged file;
* the empty-training-set message suggests --overlap only when it was not given;
* average_csv.py refuses IoUs outside [0, 1] and NaN instead of printing them.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

import dataset.incremental as inc
import run
from dataset import (
    AdeSegmentationIncremental,
    CityscapesSegmentationIncrementalDomain,
    VOCSegmentationIncremental,
)
from tests.conftest import ROOT
from tests.test_cli_errors import _fake_checkpoint, base_args, nothing_written, write_voc_tree
from utils.errors import CheckpointError, DatasetError, OptionsError, UserError, original_message


def _masks(n: int = 6, size: tuple[int, int] = (32, 32)) -> dict[str, np.ndarray]:
    masks = {}
    for i in range(n):
        m = np.zeros(size, np.uint8)
        m[4:20, 4:20] = 1 + (i % 2)  # classes 1 and 2 (step 0 of 15-5s)
        m[20:28, 20:28] = 16 if i < 3 else 0
        masks[f"img{i}"] = m
    return masks


@pytest.fixture()
def voc_tree(tmp_path: Path) -> Path:
    return write_voc_tree(tmp_path / "voc", _masks())


def voc_paths(root: Path, name: str) -> tuple[Path, Path]:
    base = root / "PascalVOC2012"
    return base / f"VOCdevkit/VOC2012/JPEGImages/{name}.jpg", base / f"SegmentationClassAug/{name}.png"


def truncate_jpeg(path: Path, size: tuple[int, int]) -> None:
    """A JPEG of ``size`` (w, h) whose header is complete but whose pixel data stops half-way."""
    noise = np.random.RandomState(0).randint(0, 255, (size[1], size[0], 3)).astype(np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    start_of_scan = data.index(b"\xff\xda")
    cut = (start_of_scan + len(data)) // 2
    assert start_of_scan + 20 < cut < len(data) - 20
    path.write_bytes(data[:cut])


# ---------------------------------------------------------------------------------------------- mask size
@pytest.mark.parametrize("pool", [False, True], ids=["in-process", "scan-pool"])
@pytest.mark.parametrize("shape", [(32, 40), (40, 32), (16, 16)], ids=["wider", "rotated", "smaller"])
def test_mask_of_another_size_is_refused_by_the_scan(voc_tree, tmp_path, capsys, monkeypatch, pool, shape):
    if pool:
        monkeypatch.setattr(inc, "MIN_PARALLEL_SCAN", 0)
        monkeypatch.setattr(inc, "SCAN_CHUNK", 2)
    image, mask = voc_paths(voc_tree, "img4")
    Image.fromarray(np.zeros(shape, np.uint8)).save(mask)
    out = tmp_path / "out"
    workers = {"--scan_workers": "2"} if pool else {}
    assert run.main(base_args(voc_tree, out, **workers)) == 2
    err = capsys.readouterr().err
    size = f"{shape[1]}x{shape[0]}"
    assert err.startswith(f"error: The mask file {mask} is {size} pixels but its image {image} is 32x32"), err
    assert "Traceback" not in err and err.count("\n") == 1
    assert nothing_written(out)


def test_ade_mask_of_another_size_is_refused(tmp_path):
    ade = tmp_path / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for i in range(3):
            name = f"ADE_{split}_{i:08d}"
            (ade / "images" / split).mkdir(parents=True, exist_ok=True)
            (ade / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(ade / "images" / split / f"{name}.jpg")
            side = 23 if (split, i) == ("training", 1) else 24
            Image.fromarray(np.ones((side, 24), np.uint8)).save(ade / "annotations" / split / f"{name}.png")
    with pytest.raises(DatasetError, match=r"ADE_training_00000001\.png is 24x23 pixels but its image"):
        AdeSegmentationIncremental(tmp_path, labels=[1])
    AdeSegmentationIncremental(tmp_path, train=False, labels=[1])  # the other split is fine


def test_scan_reads_image_headers_only(voc_tree, tmp_path):
    # A JPEG whose pixel data is cut passes the scan (its header holds the size), and fails when decoded.
    image, _ = voc_paths(voc_tree, "img3")
    truncate_jpeg(image, (32, 32))
    ds = VOCSegmentationIncremental(voc_tree, labels=list(range(16)), overlap=True)
    position = ds.indices.index(3)
    with pytest.raises(DatasetError, match=rf"The image file {image} cannot be read \(OSError: image file"):
        ds[position]
    # A file that is not an image at all is refused by the scan.
    image.write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match=rf"The image file {image} cannot be read \(UnidentifiedImage"):
        VOCSegmentationIncremental(voc_tree, labels=list(range(16)), overlap=True)


def test_unscanned_splits_refuse_the_mismatch_when_loading(voc_tree, tmp_path):
    cache = tmp_path / "cache.npy"
    VOCSegmentationIncremental(voc_tree, labels=list(range(16)), overlap=True, idxs_path=cache)
    image, mask = voc_paths(voc_tree, "img0")
    Image.fromarray(np.zeros((30, 32), np.uint8)).save(mask)
    ds = VOCSegmentationIncremental(voc_tree, labels=list(range(16)), overlap=True, idxs_path=cache)
    assert cache.is_file()  # reused: no scan
    with pytest.raises(DatasetError, match=rf"{mask} is 32x30 pixels but its image {image} is 32x32"):
        ds[ds.indices.index(0)]
    # Cityscapes domains are never scanned: the loader checks each pair.
    root = tmp_path / "cs"
    images, labels = root / "leftImg8bit/train/aachen", root / "gtFine/train/aachen"
    for folder in (images, labels, root / "leftImg8bit/val/frankfurt"):
        folder.mkdir(parents=True)
    rgb = Image.fromarray(np.zeros((8, 16, 3), np.uint8))
    for k in range(2):
        name = f"aachen_{k:06d}_000019"
        rgb.save(images / f"{name}_leftImg8bit.png")
        label = np.full((8, 8 if k else 16), 7, np.uint8)  # the second one is 8 pixels narrower
        Image.fromarray(label).save(labels / f"{name}_gtFine_labelIds.png")
    rgb.save(root / "leftImg8bit/val/frankfurt/f_0_leftImg8bit.png")
    cs = CityscapesSegmentationIncrementalDomain(root, labels=None)
    cs[0]
    with pytest.raises(DatasetError, match=r"aachen_000001_000019_gtFine_labelIds\.png is 8x8 pixels"):
        cs[1]


# ---------------------------------------------------------------------------------------------- workers
def test_worker_error_reaches_the_user_as_one_paragraph(voc_tree, tmp_path, capsys):
    image, _ = voc_paths(voc_tree, "img3")
    truncate_jpeg(image, (32, 32))
    assert run.main(base_args(voc_tree, tmp_path / "out", **{"--num_workers": "2"})) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"error: The image file {image} cannot be read (OSError: image file is trunc")
    for noise in ("Traceback", "Caught", "worker process", 'File "'):
        assert noise not in err, err


def test_foreign_error_in_a_worker_becomes_a_dataset_error(voc_tree, monkeypatch):
    ds = VOCSegmentationIncremental(voc_tree, labels=list(range(16)), overlap=True)
    # PIL's decompression-bomb guard raises an Exception that is not an OSError; the workers are forked
    # after this change, so they see it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DatasetError) as err:
        next(iter(DataLoader(ds, batch_size=2, num_workers=2)))
    message = str(err.value)
    assert message.startswith("The image file ") and "cannot be read (DecompressionBombError" in message
    assert "Traceback" not in message and "worker process" not in message and "download_voc.sh" in message


def _worker_text(err: BaseException, where: str = "in DataLoader worker process 3") -> str:
    """What torch hands to ``type(err)(...)`` in the main process (torch/_utils.py ExceptionWrapper)."""
    formatted = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return f"Caught {type(err).__name__} {where}.\nOriginal {formatted}"


def _raised(err: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        try:
            if cause is not None:
                raise cause
        except BaseException as inner:
            raise err from inner
        raise err
    except BaseException as caught:
        return caught


@pytest.mark.parametrize("cls", [DatasetError, OptionsError, CheckpointError])
@pytest.mark.parametrize("where", ["in DataLoader worker process 3", "in pin memory thread for device 0"])
def test_user_errors_recover_their_message_from_a_worker_traceback(cls, where):
    message = "The mask file /d/a: b.png is bad. Fix it: see data/README (x: y)."
    for cause in (None, OSError("image file is truncated"), cls("an earlier user error")):
        text = _worker_text(_raised(cls(message), cause), where)
        assert text.count("Traceback") >= 1
        rebuilt = cls(text)
        assert str(rebuilt) == message and rebuilt.args == (message,)
        assert str(pickle.loads(pickle.dumps(rebuilt))) == message
    # Anything that is not a worker traceback is kept as it is.
    assert str(cls(message)) == message
    assert original_message(cls, "Caught nothing here") == "Caught nothing here"
    # A worker traceback of another class is not cut at a line of ours.
    other = _worker_text(_raised(ValueError("boom")))
    assert original_message(cls, other) == other
    assert isinstance(cls(text), UserError)


# ---------------------------------------------------------------------------------------------- empty split
@pytest.mark.parametrize("overlap", [True, False])
def test_empty_training_set_suggests_overlap_only_without_it(voc_tree, tmp_path, capsys, overlap):
    ckpt = _fake_checkpoint(tmp_path / "s1.pth", [16, 1])  # no image holds class 17, the class of step 2
    argv = base_args(voc_tree, tmp_path / "out", step=2, **{"--step_ckpt": str(ckpt)})
    if not overlap:
        argv.remove("--overlap")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "The training set of step 2 of task 15-5s is empty" in err
    assert ("--overlap" in err) is (not overlap)


# ---------------------------------------------------------------------------------------------- average_csv
GOOD = ["0,0.9,0.8,0.7,0.6,x,x,0.75", "1,0.92,0.7,0.6,0.5,0.4,x,0.624", "2,0.94,0.6,0.5,0.4,0.3,0.2,0.49"]


def _average_csv(tmp_path: Path, lines: list[str]) -> subprocess.CompletedProcess:
    path = tmp_path / "r.csv"
    path.write_text("".join(f"{line}\n" for line in lines))
    return subprocess.run(
        [sys.executable, str(ROOT / "average_csv.py"), str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("row", "col", "value", "where"),
    [
        (2, 2, "nan", "the IoU of class 1 in row 3"),  # an old class of the last row
        (2, 6, "1.5", "the IoU of class 5 in row 3"),  # a new class of the last row
        (2, 1, "-0.01", "the IoU of class 0 in row 3"),  # background
        (2, 7, "inf", "the mIoU of row 3"),
        (0, 7, "75.0", "the mIoU of row 1"),  # a percentage in an earlier row's mIoU (averaged into Avg)
        (1, 3, "NaN", "the IoU of class 2 in row 2"),  # an earlier row, not printed but corrupt all the same
    ],
)
def test_average_csv_refuses_impossible_ious(tmp_path, row, col, value, where):
    lines = [line.split(",") for line in GOOD]
    lines[row][col] = value
    proc = _average_csv(tmp_path, [",".join(fields) for fields in lines])
    assert proc.returncode == 1 and proc.stdout == ""
    assert f"{where} is '{value}', not an IoU in [0, 1]" in proc.stderr and "Traceback" not in proc.stderr


def test_average_csv_accepts_the_bounds(tmp_path):
    proc = _average_csv(tmp_path, [GOOD[0], GOOD[1], "2,1,0,1.0,0.0,1,0,0.5"])
    assert proc.returncode == 0, proc.stderr
    assert "IoU BG: 100.00\nmIoU old: 33.33\nmIoU new: 50.00\nmIoU all: 50.00\n" in proc.stdout
