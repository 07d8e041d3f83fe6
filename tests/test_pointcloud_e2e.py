"""End to end on synthetic point clouds (issue 15): run.py steps of S3DIS and ScanNet like the 2D ones.

Synthetic rooms from ``data/make_synthetic.py`` (the same raw layout and preparation as the real data),
cut to small clouds (``--num_points 256 --knn_k 8``) so that a step takes seconds on a CPU. Fast: LGKD's
two steps through ``run.main`` (the function behind ``python run.py``), the results CSV, checkpoints, the
``--visualize`` samples and ``average_csv.py``. Slow (real processes): every method's two steps, the joint
upper bound, S3DIS, the issue's command line with the 3D defaults (DGCNN, 2048 points), kill -9 and resume,
and torchrun on gloo with two processes.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from argparser import METHOD_PRESETS
from tests.conftest import ROOT, free_port, load_script_module
from tests.test_run_e2e import _run_until_killed, run_cmd

PY = sys.executable
SMALL = {"--num_points": "256", "--knn_k": "8", "--epochs": "1", "--batch_size": "2", "--num_workers": "0"}
SCANNET_CLASSES = 21  # unannotated + 20


def make_rooms(dataset: str, root: Path, num_train: int = 2, num_val: int = 1, seed: int = 1) -> Path:
    make_synthetic = load_script_module("data/make_synthetic.py", "make_synthetic_pointcloud_e2e")
    return make_synthetic.make_synthetic(dataset, root, num_train, num_val, size=0, seed=seed, workers=1)


@pytest.fixture(scope="module")
def scannet_root(tmp_path_factory) -> Path:
    return make_rooms("scannet", tmp_path_factory.mktemp("scannet"))


@pytest.fixture(scope="module")
def s3dis_root(tmp_path_factory) -> Path:
    return make_rooms("s3dis", tmp_path_factory.mktemp("s3dis"))


def argv_3d(
    root: Path, out: Path, dataset: str, task: str, step: int, name: str, method: str | None, **extra: str
) -> list[str]:
    """A run.py command line with every output under ``out`` (``extra`` adds or overrides options)."""
    options = {
        "--data_root": str(root),
        "--dataset": dataset,
        "--task": task,
        "--step": str(step),
        "--name": name,
        "--checkpoint": str(out / "ckpt"),
        "--logdir": str(out / "logs"),
        "--results_dir": str(out / "results"),
        "--cache_dir": str(out / "cache"),
        "--device": "cpu",
        "--date": "e2e",
        "--random_seed": "5",
        **SMALL,
        **extra,
    }
    if method is not None:
        options["--method"] = method
    return [*[x for kv in options.items() for x in kv], "--overlap", "--no_progress"]


def read_rows(out: Path, dataset: str, task: str, name: str) -> list[list[str]]:
    with open(out / "results" / f"e2e_{dataset}_{task}_{name}.csv") as f:
        return list(csv.reader(f))


def log_text(out: Path, dataset: str, task: str, name: str, step: int) -> str:
    return (out / "logs" / f"{task}-{dataset}" / name / f"step{step}" / "log.txt").read_text()


def summary_of(csv_path: Path) -> str:
    proc = subprocess.run(
        [PY, "average_csv.py", str(csv_path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return proc.stdout


# ---------------------------------------------------------------------------------------------- fast
def test_lgkd_two_steps_on_scannet_through_run_main(scannet_root: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for step in (0, 1):
        argv = argv_3d(
            scannet_root, tmp_path, "scannet", "15-5", step, "lgkd", "LGKD", **{"--sample_num": "1"}
        )
        if step:
            argv += ["--prev_kd", "5", "--novel_kd", "1"]
        assert run.main(argv) == 0

    rows = read_rows(tmp_path, "scannet", "15-5", "lgkd")
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(len(r) == 1 + SCANNET_CLASSES + 1 for r in rows)
    # Step 0 learned background + 15 classes; classes 16..20 are "x" (not learned yet) until step 1.
    assert rows[0][17:22] == ["x"] * 5 and "x" not in rows[1]

    ckpt = torch.load(tmp_path / "ckpt" / "15-5-scannet_lgkd_1.pth", weights_only=True)
    state = ckpt["model_state"]
    assert all(k.startswith("module.") for k in state)
    assert state["module.cls.0.weight"].shape == (16, 128, 1)  # background + 15 classes, per point
    assert state["module.cls.1.weight"].shape == (5, 128, 1)
    assert any(k.startswith("module.body.edge_convs.") for k in state)
    assert isinstance(ckpt["optimizer_state"], dict) and ckpt["epoch"] == 1

    opts = json.loads((tmp_path / "logs" / "15-5-scannet" / "lgkd" / "step1" / "opts.json").read_text())
    assert (opts["backbone"], opts["optimizer"], opts["lr_policy"], opts["lr_decay_epochs"]) == (
        "dgcnn", "adam", "step", 50,
    )  # fmt: skip
    assert (opts["pod"], opts["pseudo"], opts["lgkd"], opts["prev_kd"], opts["novel_kd"]) == (
        None, "entropy", True, 5.0, 1.0,
    )  # fmt: skip
    log = log_text(tmp_path, "scannet", "15-5", "lgkd", 1)
    n_test = int(log.split("Test set: ")[1].split(",")[0])
    assert f"Total samples: {n_test}" in log  # one sample per block, not per point
    assert (tmp_path / "logs" / "15-5-scannet" / "lgkd" / "step1" / "samples" / "epoch001.png").is_file()

    summary = summary_of(tmp_path / "results" / "e2e_scannet_15-5_lgkd.csv")
    for label in ("Final Step: 1", "IoU BG", "mIoU old", "mIoU new", "mIoU all", "mIoU Avg"):
        assert label in summary


def test_point_cloud_refusal_happens_before_the_data_is_read(tmp_path, capsys) -> None:
    argv = argv_3d(
        tmp_path / "missing", tmp_path, "s3dis", "12-1", 0, "x", "PLOP", **{"--output_stride": "8"}
    )
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "--output_stride does not apply with --dataset s3dis" in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists() and not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------- slow
# Methods whose step 1 adds a distillation or regularisation term to the loss ("Reg Loss" > 0).
REGULARISED = {"LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "LGKD"}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_PRESETS))
def test_every_method_runs_two_steps_through_run_py(method: str, scannet_root: Path, tmp_path: Path) -> None:
    name = method.replace("-", "")
    for step in (0, 1):
        run_cmd(argv_3d(scannet_root, tmp_path, "scannet", "15-5", step, name, method))
    rows = read_rows(tmp_path, "scannet", "15-5", name)
    assert [r[0] for r in rows] == ["0", "1"] and len(rows[1]) == 1 + SCANNET_CLASSES + 1
    log = log_text(tmp_path, "scannet", "15-5", name, 1)
    epoch_line = next(line for line in log.splitlines() if "End of Epoch 0/1" in line)
    reg_loss = float(epoch_line.split("Reg Loss=")[1].split()[0])
    assert (reg_loss > 0) == (method in REGULARISED), reg_loss
    opts = json.loads((tmp_path / "logs" / "15-5-scannet" / name / "step1" / "opts.json").read_text())
    assert opts["pod"] is None and opts["backbone"] == "dgcnn"
    if method in ("PLOP", "LGKD"):
        assert opts["pseudo"] == "entropy" and "Pseudo labeling is: entropy" in log


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "task"), [("scannet", "offline"), ("s3dis", "offline_cv1")])
def test_joint_upper_bound(dataset: str, task: str, scannet_root, s3dis_root, tmp_path: Path) -> None:
    root = scannet_root if dataset == "scannet" else s3dis_root
    run_cmd(argv_3d(root, tmp_path, dataset, task, 0, "joint", "FT"))
    rows = read_rows(tmp_path, dataset, task, "joint")
    assert len(rows) == 1 and "x" not in rows[0]
    assert len(rows[0]) == 1 + (SCANNET_CLASSES if dataset == "scannet" else 14) + 1


@pytest.mark.slow
def test_s3dis_two_steps_and_retest(s3dis_root: Path, tmp_path: Path) -> None:
    for step in (0, 1):
        run_cmd(argv_3d(s3dis_root, tmp_path, "s3dis", "8-5", step, "lgkd", "LGKD"))
    rows = read_rows(tmp_path, "s3dis", "8-5", "lgkd")
    assert [r[0] for r in rows] == ["0", "1"] and all(len(r) == 1 + 14 + 1 for r in rows)
    # S3DIS has no background point: at the last step every class is learned and class 0 is absent.
    assert rows[1][1] == "X" and "x" not in rows[1]
    # The checkpoint reloads with --test and gives the same mIoU.
    args = argv_3d(s3dis_root, tmp_path / "retest", "s3dis", "8-5", 1, "lgkd", "LGKD")
    args += ["--test", "--ckpt", str(tmp_path / "ckpt" / "8-5-s3dis_lgkd_1.pth")]
    run_cmd(args)
    assert float(read_rows(tmp_path / "retest", "s3dis", "8-5", "lgkd")[0][-1]) == pytest.approx(
        float(rows[1][-1])
    )
    assert "mIoU all" in summary_of(tmp_path / "results" / "e2e_s3dis_8-5_lgkd.csv")


@pytest.mark.slow
def test_the_issue_command_line_trains_with_the_3d_defaults(scannet_root: Path, tmp_path: Path) -> None:
    """``python run.py --data_root D --dataset scannet --task T --step 0|1 --method LGKD --epochs 1
    --batch_size 4 --num_workers 0``: DGCNN, 2048 points, k = 20 and Adam without further flags."""
    outputs = ["--checkpoint", str(tmp_path / "ckpt"), "--logdir", str(tmp_path / "logs")]
    outputs += ["--results_dir", str(tmp_path / "results"), "--cache_dir", str(tmp_path / "cache")]
    for step in (0, 1):
        argv = ["--data_root", str(scannet_root), "--dataset", "scannet", "--task", "15-5"]
        argv += ["--step", str(step), "--method", "LGKD", "--epochs", "1", "--batch_size", "4"]
        argv += ["--num_workers", "0"]
        run_cmd([*argv, *outputs])
    opts = json.loads((tmp_path / "logs" / "15-5-scannet" / "Experiment" / "step1" / "opts.json").read_text())
    assert (opts["backbone"], opts["num_points"], opts["knn_k"]) == ("dgcnn", 2048, 20)
    assert (opts["optimizer"], opts["lr"], opts["no_pretrained"]) == ("adam", 0.001, True)
    assert (opts["epochs"], opts["batch_size"]) == (1, 4)
    with open(tmp_path / "results" / "_scannet_15-5_Experiment.csv") as f:
        assert [r[0] for r in csv.reader(f)] == ["0", "1"]


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted(scannet_root: Path, tmp_path: Path) -> None:
    run_cmd(argv_3d(scannet_root, tmp_path, "scannet", "15-5", 0, "base", "LGKD"))
    extra = {"--epochs": "4", "--step_ckpt": str(tmp_path / "ckpt" / "15-5-scannet_base_0.pth")}
    straight = argv_3d(scannet_root, tmp_path, "scannet", "15-5", 1, "straight", "LGKD", **extra)
    run_cmd([*straight, "--deterministic"])
    resumed = [
        *argv_3d(scannet_root, tmp_path, "scannet", "15-5", 1, "resumed", "LGKD", **extra),
        "--deterministic",
    ]
    _run_until_killed(resumed, tmp_path / "ckpt" / "15-5-scannet_resumed_1_last.pth")
    proc = run_cmd(resumed)
    assert "Resuming step 1" in proc.stdout + proc.stderr
    assert read_rows(tmp_path, "scannet", "15-5", "resumed") == read_rows(
        tmp_path, "scannet", "15-5", "straight"
    )
    a = torch.load(tmp_path / "ckpt" / "15-5-scannet_straight_1.pth", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "ckpt" / "15-5-scannet_resumed_1.pth", weights_only=True)["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_two_steps_torchrun_gloo(scannet_root: Path, tmp_path: Path) -> None:
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    for step in (0, 1):
        run_cmd(argv_3d(scannet_root, tmp_path, "scannet", "15-5", step, "ddp", "MiB"), launcher=launcher)
    rows = read_rows(tmp_path, "scannet", "15-5", "ddp")
    assert [r[0] for r in rows] == ["0", "1"]
    log = log_text(tmp_path, "scannet", "15-5", "ddp", 1)
    assert "Total batch size is 4" in log
    n_test = int(log.split("Test set: ")[1].split(",")[0])
    assert f"Total samples: {n_test}" in log  # every test block evaluated once over the two processes
    # The DDP checkpoint loads into a one-process evaluation with the same mIoU.
    args = argv_3d(scannet_root, tmp_path / "retest", "scannet", "15-5", 1, "ddp", "MiB")
    run_cmd([*args, "--test", "--ckpt", str(tmp_path / "ckpt" / "15-5-scannet_ddp_1.pth")])
    assert float(read_rows(tmp_path / "retest", "scannet", "15-5", "ddp")[0][-1]) == pytest.approx(
        float(rows[1][-1])
    )
