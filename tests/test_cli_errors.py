"""Bad input gets a clear one-paragraph error before any work, no traceback, and nothing written.

Each case runs the real command line (``run.main(argv)``, the function behind ``python run.py``) and checks
the exit status and the message; two cases also run ``python run.py`` as a subprocess.
"""

from __future__ import annotations

import io
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from tests.conftest import ROOT, run_argv


def write_voc_tree(root: Path, masks: dict[str, np.ndarray]) -> Path:
    """A minimal VOC layout with the given masks (id -> HxW uint8), used for train and val lists."""
    base = root / "PascalVOC2012"
    (base / "VOCdevkit/VOC2012/JPEGImages").mkdir(parents=True)
    (base / "SegmentationClassAug").mkdir()
    (base / "list").mkdir()
    lines = []
    for name, mask in masks.items():
        Image.fromarray(np.full((*mask.shape, 3), 120, np.uint8)).save(
            base / f"VOCdevkit/VOC2012/JPEGImages/{name}.jpg"
        )
        Image.fromarray(mask).save(base / f"SegmentationClassAug/{name}.png")
        lines.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png\n")
    for split in ("train_aug", "val"):
        (base / "list" / f"{split}.txt").write_text("".join(lines))
    return root


def tiny_voc_tree(root: Path) -> Path:
    """Six 32 x 32 images: classes 1 and 2 in every one, class 16 in the first three (VOC 15-5 step 1)."""
    masks = {}
    for i in range(6):
        m = np.zeros((32, 32), np.uint8)
        m[4:20, 4:20] = 1 + (i % 2)  # classes 1 and 2 only
        m[20:28, 20:28] = 16 if i < 3 else 0
        masks[f"img{i}"] = m
    return write_voc_tree(root, masks)


@pytest.fixture()
def voc_tree(tmp_path: Path) -> Path:
    return tiny_voc_tree(tmp_path / "voc")


def base_args(root: Path, out: Path, step: int = 0, **extra: str) -> list[str]:
    options = {
        "--backbone": "resnet18",
        "--crop_size": "32",
        "--batch_size": "2",
        "--epochs": "1",
        "--num_workers": "0",
        "--name": "err",
        **extra,
    }
    return run_argv(root, out, step, options, ("--overlap", "--no_pretrained", "--no_progress"))


def expect_error(argv: list[str], capsys, *needles: str, code: int = 2) -> str:
    assert run.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


def nothing_written(out: Path) -> bool:
    return not any((out / d).exists() for d in ("ckpt", "logs", "results"))


def test_missing_data_root(tmp_path, capsys):
    expect_error(base_args(tmp_path / "nope", tmp_path), capsys, "does not exist", "download_voc.sh")
    assert nothing_written(tmp_path)


def test_data_root_without_voc_layout(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    expect_error(base_args(tmp_path / "empty", tmp_path), capsys, "PascalVOC2012")
    assert nothing_written(tmp_path)


def test_unknown_dataset_task_method_are_refused(tmp_path, capsys):
    for flag, value in (("--dataset", "coco"), ("--task", "15-7"), ("--method", "XYZ")):
        with pytest.raises(SystemExit) as exc:
            run.main([*base_args(tmp_path, tmp_path), flag, value])
        assert exc.value.code == 2
        assert "invalid choice" in capsys.readouterr().err


def test_task_of_another_dataset(voc_tree, tmp_path, capsys):
    expect_error(base_args(voc_tree, tmp_path, **{"--task": "100-50"}), capsys, "100-50", "15-5s")
    assert nothing_written(tmp_path)


def test_step_beyond_task(voc_tree, tmp_path, capsys):
    expect_error(base_args(voc_tree, tmp_path, step=6), capsys, "step")
    assert nothing_written(tmp_path)


def test_missing_previous_checkpoint(voc_tree, tmp_path, capsys):
    err = expect_error(base_args(voc_tree, tmp_path, step=1), capsys, "--step_ckpt")
    assert "15-5s-voc_err_0.pth" in err
    assert nothing_written(tmp_path)


def _fake_checkpoint(path: Path, classes: list[int], backbone: str = "resnet18") -> Path:
    from argparser import get_argparser, modify_command_options
    from segmentation_module import make_model

    opts = modify_command_options(
        get_argparser().parse_args(["--backbone", backbone, "--no_pretrained", "--dataset", "voc"])
    )
    model = make_model(opts, classes=classes)
    torch.save(
        {
            "epoch": 1,
            "model_state": {f"module.{k}": v for k, v in model.state_dict().items()},
            "best_score": 0.5,
            "trainer_state": {"regularizer": None},
        },
        path,
    )
    return path


def test_checkpoint_of_another_task(voc_tree, tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path / "19-1.pth", [20])
    expect_error(base_args(voc_tree, tmp_path, step=1, **{"--step_ckpt": str(ckpt)}), capsys, str(ckpt))
    assert nothing_written(tmp_path)


def test_checkpoint_of_another_backbone(voc_tree, tmp_path, capsys):
    ckpt = _fake_checkpoint(tmp_path / "r34.pth", [16], backbone="resnet34")
    expect_error(base_args(voc_tree, tmp_path, step=1, **{"--step_ckpt": str(ckpt)}), capsys, str(ckpt))


def test_truncated_and_non_checkpoint_files(voc_tree, tmp_path, capsys):
    good = _fake_checkpoint(tmp_path / "good.pth", [16])
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:4000])
    expect_error(
        base_args(voc_tree, tmp_path, step=1, **{"--step_ckpt": str(truncated)}), capsys, str(truncated)
    )
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n")
    expect_error(base_args(voc_tree, tmp_path, step=1, **{"--step_ckpt": str(text)}), capsys, str(text))
    assert nothing_written(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(voc_tree, tmp_path, capsys):
    evil = tmp_path / "evil.pth"
    buf = io.BytesIO()
    torch.save({"model_state": _Exploit()}, buf, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    evil.write_bytes(buf.getvalue())
    err = expect_error(base_args(voc_tree, tmp_path, **{"--ckpt": str(evil)}) + ["--test"], capsys, str(evil))
    assert "pwned" not in capsys.readouterr().out
    assert "code" in err


def test_imagenet_file_in_wrong_layout(voc_tree, tmp_path, capsys):
    code_dir = tmp_path / "code"
    (code_dir / "pretrained").mkdir(parents=True)
    torch.save({"weights": {"a": torch.zeros(1)}}, code_dir / "pretrained" / "resnet18_iabn_sync.pth.tar")
    argv = [a for a in base_args(voc_tree, tmp_path) if a != "--no_pretrained"]
    expect_error([*argv, "--code_directory", str(code_dir)], capsys, "resnet18_iabn_sync.pth.tar")
    assert nothing_written(tmp_path)


def test_missing_imagenet_file_names_it(voc_tree, tmp_path, capsys):
    argv = [a for a in base_args(voc_tree, tmp_path) if a != "--no_pretrained"]
    expect_error(
        [*argv, "--code_directory", str(tmp_path)], capsys, "resnet18_iabn_sync.pth.tar", "--no_pretrained"
    )


def test_empty_training_set(voc_tree, tmp_path, capsys):
    # No image holds class 17, the class of step 2.
    ckpt = _fake_checkpoint(tmp_path / "s1.pth", [16, 1])
    expect_error(base_args(voc_tree, tmp_path, step=2, **{"--step_ckpt": str(ckpt)}), capsys, "empty")
    assert nothing_written(tmp_path)


def test_training_set_smaller_than_a_batch(voc_tree, tmp_path, capsys):
    expect_error(base_args(voc_tree, tmp_path, **{"--batch_size": "64"}), capsys, "--batch_size")
    assert nothing_written(tmp_path)


def test_unwritable_output_folder(voc_tree, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    expect_error(
        base_args(voc_tree, tmp_path, **{"--checkpoint": str(blocker / "sub")}), capsys, "--checkpoint"
    )


def test_name_cannot_escape_output_folders(voc_tree, tmp_path, capsys):
    expect_error(base_args(voc_tree, tmp_path, **{"--name": "../../etc/x"}), capsys, "--name")
    expect_error(base_args(voc_tree, tmp_path, **{"--date": "../up"}), capsys, "--date")
    assert nothing_written(tmp_path)


def test_real_command_line_exit_status(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", *base_args(tmp_path / "missing", tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
