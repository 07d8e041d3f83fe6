"""The point-cloud demo (``scripts/demo.py --dataset scannet|s3dis``): its command lines, folders, and (slow)
its quick configuration end to end with real run.py processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tasks
from argparser import parse_command_line, validate_options
from average_csv import read_rows, summarize
from tests.conftest import ROOT, load_script_module

demo = load_script_module("scripts/demo.py", "demo_script_pointcloud")
POINT_DATASETS = ("scannet", "s3dis")


def argv_of(command) -> list[str]:
    return list(command.argv[command.argv.index("run.py") + 1 :])


@pytest.mark.parametrize("dataset", POINT_DATASETS)
@pytest.mark.parametrize("quick", [False, True])
def test_commands_parse_and_follow_the_protocol(dataset: str, quick: bool, tmp_path: Path) -> None:
    protocol = demo.demo_protocol(dataset)
    settings = demo.demo_settings(dataset, quick)
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data", dataset=dataset)
    assert protocol.num_steps == 6 and protocol.n_classes == len(protocol.class_names)
    assert protocol.n_step0_classes == len(tasks.get_task_labels(dataset, protocol.task, 0)[0])
    step0 = demo.step0_command(settings, paths)
    step0_ckpt = demo.display_path(paths.step_checkpoint(demo.STEP0_NAME, 0))
    assert step0_ckpt.endswith(f"{protocol.task}-{dataset}_step0_0.pth")
    for method in demo.DEFAULT_METHODS:
        commands = [step0, *demo.method_commands(method, settings, paths)]
        assert [c.step for c in commands] == [0, 0, 1, 2, 3, 4, 5]
        for command in commands:
            opts, explicit = parse_command_line(argv_of(command))
            validate_options(opts, explicit)
            assert (opts.dataset, opts.task, opts.overlap, opts.device) == (
                dataset,
                protocol.task,
                True,
                "cpu",
            )
            # run.py's point-cloud defaults, with smaller clouds: no image option anywhere.
            assert (opts.backbone, opts.optimizer, opts.pod) == ("dgcnn", "adam", None)
            assert (opts.num_points, opts.knn_k) == (settings.num_points, settings.knn_k)
            later = command.step > 0
            assert opts.batch_size == (settings.batch_later if later else settings.batch_step0)
            assert opts.epochs == (settings.epochs_later if later else settings.epochs_step0)
            assert opts.cache_dir.startswith(demo.display_path(paths.out))
            if method == "LGKD" and later:
                assert (opts.prev_kd, opts.novel_kd) == (1.0, 0.0)  # scripts/<dataset>/lgkd_<B>-1.sh
        assert argv_of(commands[1])[-3:] == ["--ckpt", step0_ckpt, "--test"]
        assert argv_of(commands[2])[-2:] == ["--step_ckpt", step0_ckpt]


def test_the_voc_demo_is_unchanged(tmp_path: Path) -> None:
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    assert paths.protocol == demo.demo_protocol("voc") and demo.demo_settings("voc", False) is demo.FULL
    assert (paths.protocol.task, paths.protocol.method_extra_args) == (demo.TASK, demo.METHOD_EXTRA_ARGS)
    assert paths.results_csv("FT").name == f"demo_voc_{demo.TASK}_FT.csv"
    assert paths.protocol.num_steps == demo.NUM_STEPS
    opts, _ = parse_command_line(argv_of(demo.step0_command(demo.FULL, paths)))
    assert (opts.dataset, opts.backbone, opts.optimizer) == ("voc", "resnet18", "sgd")


def test_dry_run_and_default_folders(capsys, tmp_path: Path) -> None:
    assert demo.main(["--dataset", "scannet", "--dry_run", "--methods", "FT", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0].split()[1:4] == ["data/make_synthetic.py", "--dataset", "scannet"]
        and "--size" not in lines[0]
    )
    assert len(lines) == 1 + 1 + 6 and all("--dataset scannet --task 15-1" in line for line in lines[1:])
    args = demo.get_parser().parse_args(["--dataset", "s3dis", "--quick"])
    paths = demo.resolve_paths(args)
    assert (paths.out.name, paths.data_root.name) == ("demo_s3dis_quick", "synthetic_demo_s3dis_quick")
    assert paths.protocol.task == "8-1"
    paths = demo.resolve_paths(demo.get_parser().parse_args([]))
    assert (paths.out.name, paths.data_root.name) == ("demo", "synthetic_demo")


@pytest.mark.slow
def test_quick_point_cloud_demo_end_to_end(tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [sys.executable, "scripts/demo.py", "--dataset", "scannet", "--quick", "--methods", "FT", "LGKD",
           "--out", str(out), "--data_root", str(data)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "ScanNet 15-1" in proc.stdout and "old (1-15)" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["FT", "LGKD"] and summary["protocol"].startswith("scannet 15-1")
    for method, entry in summary["methods"].items():
        assert len(entry["per_step_all"]) == 6 and len(entry["commands"]) == 7
        rows = read_rows(out / "csv" / f"demo_scannet_15-1_{method}.csv")
        assert [r[0] for r in rows] == [str(s) for s in range(6)] and len(rows[0]) == 1 + 21 + 1
        assert entry["final"]["all"] == pytest.approx(100 * summarize(rows)["all"], abs=1e-3)
    for name in ("miou_per_step.png", "final_class_iou.png", "confusion_matrix_LGKD.png", "predictions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert " trained in " not in again.stdout and "generating" not in again.stdout
