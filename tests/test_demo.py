"""The CPU demo (scripts/demo.py): its command lines, resume logic, summary, tables and figures.

The fast tests feed the summary and plotting code with hand-written results CSVs; the slow one runs
``scripts/demo.py --quick`` end to end (real run.py subprocesses on a tiny synthetic data set).
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from argparser import get_argparser, modify_command_options, validate_options
from average_csv import read_rows, summarize
from scripts.demo_support.report import (
    build_summary,
    format_final_table,
    format_markdown_table,
    format_per_step_table,
    load_method_result,
    plot_confusion_matrix,
    plot_final_class_iou,
    plot_miou_per_step,
    plot_prediction_grid,
    write_json,
)
from tests.conftest import ROOT, load_script_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON_SETTINGS = ("crop_size", "batch_size", "epochs", "lr", "num_workers", "val_interval", "random_seed")

demo = load_script_module("scripts/demo.py", "demo_script")


def _row(step: int, ious: dict[int, float | str], miou: float) -> str:
    """A results-CSV line: classes not in ``ious`` are "x" (not learned yet)."""
    fields = [str(step)] + [str(ious.get(c, "x")) for c in range(21)] + [str(miou)]
    return ",".join(fields)


def write_run(path: Path, old_iou: float, new_iou: float, bg: float = 0.9) -> list[float]:
    """A 15-5s run: step 0 learns 0..15, each step t adds class 15 + t. Returns the mIoU column."""
    lines, mious = [], []
    for step in range(6):
        ious: dict[int, float | str] = {0: bg}
        ious.update(dict.fromkeys(range(1, 16), old_iou - 0.05 * step))
        ious.update({15 + t: new_iou for t in range(1, step + 1)})
        if step == 5:
            ious[17] = "X"  # absent from the test set: left out of the "new" mean
        values = [v for v in ious.values() if v != "X"]
        mious.append(sum(values) / len(values))
        lines.append(_row(step, ious, mious[-1]))
    path.write_text("\n".join(lines) + "\n")
    return mious


@pytest.fixture
def two_runs(tmp_path: Path) -> tuple[list, dict[str, list[float]]]:
    mious = {
        "FT": write_run(tmp_path / "FT.csv", old_iou=0.6, new_iou=0.5),
        "LGKD": write_run(tmp_path / "LGKD.csv", old_iou=0.8, new_iou=0.3),
    }
    results = [load_method_result(tmp_path / f"{m}.csv", m) for m in ("FT", "LGKD")]
    return results, mious


def test_results_match_average_csv(two_runs, tmp_path: Path) -> None:
    results, mious = two_runs
    ft = results[0]
    reference = summarize(read_rows(tmp_path / "FT.csv"))
    assert ft.final == pytest.approx({k: 100 * reference[k] for k in ("bg", "old", "new", "all")})
    # Hand check: old = mean of classes 1..15 at step 5 = 0.6 - 0.25; new = mean of 16, 18, 19, 20 (17: X).
    assert ft.final["bg"] == pytest.approx(90.0)
    assert ft.final["old"] == pytest.approx(35.0)
    assert ft.final["new"] == pytest.approx(50.0)
    assert ft.per_step_all == pytest.approx([100 * m for m in mious["FT"]])
    assert ft.average == pytest.approx(100 * sum(mious["FT"]) / 6)
    class_iou = ft.final_class_iou()
    assert len(class_iou) == 21 and class_iou[17] is None and class_iou[16] == pytest.approx(50.0)


def test_summary_json(two_runs, tmp_path: Path) -> None:
    results, _ = two_runs
    commands = {
        "FT": ["python run.py --step 0"],
        "LGKD": ["python run.py --step 0", "python run.py --step 1"],
    }
    summary = build_summary(results, commands, {"wall_time_s": 12.5})
    path = tmp_path / "out" / "summary.json"
    write_json(summary, path)
    loaded = json.loads(path.read_text())
    assert set(loaded["methods"]) == {"FT", "LGKD"}
    lgkd = loaded["methods"]["LGKD"]
    assert set(lgkd["final"]) == {"bg", "old", "new", "all"}
    assert lgkd["final"]["old"] == pytest.approx(55.0)
    assert len(lgkd["per_step_all"]) == 6
    assert lgkd["commands"] == commands["LGKD"]
    assert loaded["wall_time_s"] == 12.5


def test_summary_json_has_no_nan(tmp_path: Path) -> None:
    # Every new class absent from the last test set: average_csv gives nan for "new"; JSON gets null.
    lines = [_row(0, dict.fromkeys(range(16), 0.5), 0.5)]
    lines.append(_row(1, {**dict.fromkeys(range(16), 0.5), 16: "X"}, 0.5))
    (tmp_path / "r.csv").write_text("\n".join(lines) + "\n")
    result = load_method_result(tmp_path / "r.csv", "FT")
    assert math.isnan(result.final["new"])
    write_json(build_summary([result]), tmp_path / "s.json")
    assert json.loads((tmp_path / "s.json").read_text())["methods"]["FT"]["final"]["new"] is None
    assert "-" in format_final_table([result])


def test_tables(two_runs) -> None:
    results, _ = two_runs
    final = format_final_table(results)
    assert "old (1-15)" in final and "new (16-20)" in final
    assert "LGKD" in final and "55.00" in final  # LGKD old: 0.8 - 0.25
    per_step = format_per_step_table(results)
    assert "step 5" in per_step and per_step.count("\n") == 3
    markdown = format_markdown_table(results)
    assert markdown.splitlines()[0].startswith("| method | background | old (1-15) | new (16-20) | all |")
    assert len(markdown.splitlines()) == 4


def _is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 1000


def test_plots(two_runs, tmp_path: Path) -> None:
    results, _ = two_runs
    assert _is_png(plot_miou_per_step(results, tmp_path / "a" / "miou.png"))
    assert _is_png(plot_final_class_iou(results, tmp_path / "iou.png"))
    matrix = np.random.default_rng(0).random((21, 21))
    matrix /= matrix.sum(axis=1, keepdims=True)
    assert _is_png(plot_confusion_matrix(matrix, tmp_path / "cm.png"))
    grid = np.full((3 * 32 + 2 * 2, 4 * 32 + 3 * 2, 3), 200, dtype=np.uint8)
    legend = {0: ("background", [0, 0, 0]), 16: ("pottedplant", [0, 64, 0])}
    path = plot_prediction_grid(grid, ["image", "ground truth", "FT", "LGKD"], 32, tmp_path / "g.png", legend)
    assert _is_png(path)


def test_class_names_match_the_dataset() -> None:
    from dataset import VOC_CLASSES

    assert list(demo.demo_protocol().class_names) == [name.lower() for name in VOC_CLASSES]


def _run_py_args(argv: tuple[str, ...]) -> list[str]:
    assert argv[1] == "run.py"
    return list(argv[2:])


def test_commands_parse_and_follow_the_protocol(tmp_path: Path) -> None:
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    step0 = demo.step0_command(demo.FULL, paths)
    step0_ckpt = demo.display_path(paths.step_checkpoint(demo.STEP0_NAME, 0))
    settings_of = {}
    for method in demo.DEFAULT_METHODS:
        commands = demo.method_commands(method, demo.FULL, paths)
        assert [c.step for c in commands] == list(range(demo.NUM_STEPS))
        for command in [step0, *commands]:
            opts = modify_command_options(get_argparser().parse_args(_run_py_args(command.argv)))
            validate_options(opts)
            assert (opts.task, opts.dataset, opts.overlap, opts.opt_level) == (demo.TASK, "voc", True, "O0")
            assert (opts.backbone, opts.no_pretrained) == ("resnet18", True)
            assert opts.checkpoint.startswith(demo.display_path(paths.out))
            assert opts.cache_dir.startswith(demo.display_path(paths.out))
            if command is step0:
                continue
            assert opts.name == method and opts.method == method
            if command.step == 0:
                assert opts.test and opts.ckpt == step0_ckpt
            else:
                assert not opts.test
                assert opts.step_ckpt == (step0_ckpt if command.step == 1 else None)
            # Common settings are identical for every method.
            common = {k: getattr(opts, k) for k in COMMON_SETTINGS}
            assert settings_of.setdefault(command.step, common) == common
    train0 = modify_command_options(get_argparser().parse_args(_run_py_args(step0.argv)))
    assert train0.epochs == demo.FULL.epochs_step0 and train0.lr == demo.FULL.lr_step0


# The options in which a demo step may differ from the paper's script of the same protocol and method: the
# CPU budget (README "What the demo shows" says which and why), the output folders, and the shared step 0.
DEMO_ONLY_OPTIONS = {
    "backbone", "no_pretrained", "crop_size", "batch_size", "epochs", "lr", "opt_level", "device",
    "num_workers", "val_interval", "random_seed", "no_progress",
    "data_root", "date", "checkpoint", "logdir", "results_dir", "cache_dir", "ckpt", "test", "step_ckpt",
}  # fmt: skip


def _paper_options(method: str, tmp_path: Path) -> list:
    """run.py options of every step of ``method`` in the paper's protocol: its script
    ``scripts/voc/{method}_{PROTOCOL}.sh`` (dry run) where there is one, else the ``--method`` preset alone
    (FT and MiB have no 15-5 script; their preset is their whole configuration)."""
    script = ROOT / "scripts" / "voc" / f"{method.lower()}_{demo.PROTOCOL}.sh"
    parser = get_argparser()
    if not script.is_file():
        base = ["--dataset", "voc", "--task", demo.TASK, "--overlap", "--name", method, "--method", method]
        return [parser.parse_args([*base, "--step", str(s)]) for s in range(demo.NUM_STEPS)]
    env = {"PATH": os.environ["PATH"], "DATA_ROOT": str(tmp_path), "DRY_RUN": "1", "NB_GPU": "2"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line[2:]) for line in proc.stdout.splitlines()]
    return [parser.parse_args(argv[argv.index("run.py") + 1 :]) for argv in lines]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_methods_keep_the_paper_options(tmp_path: Path) -> None:
    """Every demo step runs its method exactly as the paper's script does (LGKD's --prev_kd / --novel_kd
    of the protocol included); only the budget options and folders differ."""
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    parser = get_argparser()
    for method in demo.ALL_METHODS:
        paper = _paper_options(method, tmp_path)
        ours = [
            parser.parse_args(_run_py_args(c.argv)) for c in demo.method_commands(method, demo.FULL, paths)
        ]
        assert len(ours) == len(paper) == demo.NUM_STEPS
        for step, (mine, theirs) in enumerate(zip(ours, paper, strict=True)):
            mine, theirs = modify_command_options(mine), modify_command_options(theirs)
            differ = {k for k in vars(theirs) if getattr(mine, k) != getattr(theirs, k)}
            assert differ <= DEMO_ONLY_OPTIONS, (method, step, sorted(differ - DEMO_ONLY_OPTIONS))
    # The scripts keep the paper's values (the demo changes its own copy only).
    lgkd = _paper_options("LGKD", tmp_path)
    assert (lgkd[1].lr, lgkd[1].epochs, lgkd[1].crop_size) == (0.001, 30, 512)


def _readme_demo_section() -> str:
    """The README's "What the demo shows" section (up to the next level-2 heading)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("\n## What the demo shows\n", 1)[1].split("\n## ", 1)[0]


def test_readme_states_the_demo_settings(tmp_path: Path) -> None:
    """The README's table of the demo's settings (rows ``| `--flag` | step 0 | step 1 | ...``) and its
    data command say what scripts/demo.py runs, whatever the settings are."""
    section = _readme_demo_section()
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"`(--\w+)`", cells[0]) if line.startswith("|") else None
        if match:
            rows[match.group(1)] = cells[1:]
    assert {"--crop_size", "--batch_size", "--epochs", "--lr", "--opt_level"} <= set(rows)
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    step0, step1 = (
        demo.step0_command(demo.FULL, paths).argv,
        demo.method_commands("FT", demo.FULL, paths)[1].argv,
    )
    for flag, cells in rows.items():
        for column, argv in enumerate((step0, step1)):
            assert flag in argv, flag
            assert cells[column] == argv[argv.index(flag) + 1], (flag, column, cells)
    data = [
        "data/make_synthetic.py",
        "--dataset",
        "voc",
        "--out",
        "data/synthetic_demo",
        *demo.FULL.data_args(),
    ]
    assert " ".join(data) in " ".join(section.split()), "the README's data command is not the demo's"
    # LGKD's step-1 weights as the demo passes them.
    assert " ".join(demo.METHOD_EXTRA_ARGS["LGKD"]) in section


def test_dry_run_prints_every_command(capsys, tmp_path: Path) -> None:
    assert demo.main(["--dry_run", "--methods", "FT", "LGKD", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 + 1 + 2 * demo.NUM_STEPS  # data, shared step 0, two chains
    assert "data/make_synthetic.py" in lines[0]


def test_resume_skips_finished_steps(tmp_path: Path, monkeypatch) -> None:
    # The resume logic does not depend on the task: a six-step one (VOC 15-1) exercises all of it.
    monkeypatch.setattr(demo, "TASK", "15-5s")
    monkeypatch.setattr(demo, "NUM_STEPS", 6)
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    commands = demo.method_commands("FT", demo.QUICK, paths)
    paths.csv.mkdir(parents=True)
    paths.checkpoints.mkdir(parents=True)
    csv = paths.results_csv("FT")
    # Steps 0-2 finished (step 1's model already removed); step 3 interrupted: its last-epoch
    # checkpoint is still there and run.py resumes from it.
    csv.write_text("".join(f"{s},0.5\n" for s in range(3)))
    for step in (2, 3):
        paths.step_checkpoint("FT", step).write_bytes(b"")
    paths.last_epoch_checkpoint("FT", 3).write_bytes(b"")
    assert [demo.step_done(c, paths) for c in commands] == [True, False, True, False, False, False]
    assert demo.first_step_to_run(commands, paths) == 3

    ran = []

    def fake_run(command, paths, threads, log):
        ran.append(command.step)
        paths.last_epoch_checkpoint("FT", command.step).unlink(missing_ok=True)
        paths.step_checkpoint("FT", command.step).write_bytes(b"")
        demo_rows = demo.csv_steps(csv) | {command.step}
        csv.write_text("".join(f"{s},0.5\n" for s in sorted(demo_rows)))
        return {"wall_s": 1.0, "cpu_s": 1.0}

    monkeypatch.setattr(demo, "run_command", fake_run)
    demo.run_chain(commands, paths, 1, demo.DemoProgress(), {})
    assert ran == [3, 4, 5]
    # Only the final model stays (steps 2, 3, 4 were removed once the next step had finished).
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["15-5s-voc_FT_5.pth"]
    assert demo.first_step_to_run(commands, paths) == 6

    # A missing row means that step and every later one run again (here: from step 1).
    csv.write_text("".join(f"{s},0.5\n" for s in (0, 2, 3, 4, 5)))
    ran.clear()
    demo.run_chain(commands, paths, 1, demo.DemoProgress(), {}, keep_checkpoints=True)
    assert ran == [1, 2, 3, 4, 5]
    assert len(list(paths.checkpoints.iterdir())) == 5


def test_run_command_times_the_step_and_reports_failures(tmp_path: Path) -> None:
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    # A step that keeps a core busy for 0.4 s of its own CPU time.
    busy = "import time\nstart = time.process_time()\nwhile time.process_time() - start < 0.4:\n    pass"
    command = demo.StepCommand("FT", "FT", 1, "train", (sys.executable, "-c", busy))
    timing = demo.run_command(command, paths, 1, demo.DemoProgress())
    assert timing["cpu_s"] >= 0.4 and timing["wall_s"] >= 0.4
    failing = demo.StepCommand(
        "FT", "FT", 1, "train", (sys.executable, "-c", "print('boom'); raise SystemExit(3)")
    )
    with pytest.raises(demo.DemoError, match=r"(?s)FT step 1 failed \(exit 3\).*boom"):
        demo.run_command(failing, paths, 1, demo.DemoProgress())


def test_changed_settings_start_over(tmp_path: Path, capsys) -> None:
    paths = demo.DemoPaths(out=tmp_path / "out", data_root=tmp_path / "data")
    demo.prepare_output(paths, demo.QUICK, fresh=False)
    paths.checkpoints.mkdir()
    (paths.checkpoints / "x.pth").write_bytes(b"")
    demo.prepare_output(paths, demo.QUICK, fresh=False)
    assert (paths.checkpoints / "x.pth").exists()
    demo.prepare_output(paths, demo.FULL, fresh=False)
    assert not paths.checkpoints.exists()
    assert "starting over" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [
        sys.executable,
        "scripts/demo.py",
        "--quick",
        "--methods",
        "FT",
        "LGKD",
        "--out",
        str(out),
        "--data_root",
        str(data),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "old (1-15)" in proc.stdout and "LGKD" in proc.stdout

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["FT", "LGKD"]
    for method, entry in summary["methods"].items():
        assert set(entry["final"]) == {"bg", "old", "new", "all"}
        assert len(entry["per_step_all"]) == demo.NUM_STEPS
        assert len(entry["commands"]) == demo.NUM_STEPS + 1  # shared step 0 + evaluation of it + steps >= 1
        rows = read_rows(out / "csv" / f"demo_voc_{demo.TASK}_{method}.csv")
        assert [r[0] for r in rows] == [str(s) for s in range(demo.NUM_STEPS)]
        expected = summarize(rows)
        assert entry["final"]["all"] == pytest.approx(100 * expected["all"], abs=1e-3)
    steps = {f"{m}/{s}" for m in ("FT", "LGKD") for s in range(demo.NUM_STEPS)} | {"step0/0"}
    assert set(summary["step_times"]) == steps
    assert all(t["wall_s"] > 0 and t["cpu_s"] > 0 for t in summary["step_times"].values())
    assert summary["this_invocation_cpu_time_s"] > 0
    for name in ("miou_per_step.png", "final_class_iou.png", "confusion_matrix_LGKD.png", "predictions.png"):
        assert _is_png(out / name), name

    # Everything is finished: a second call trains nothing and reports the same numbers.
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert " trained in " not in again.stdout and "generating" not in again.stdout
    assert json.loads((out / "summary.json").read_text())["methods"] == summary["methods"]
