"""Results CSV (reference ``run.py`` ``main``) and average_csv.py (RN-29)."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, load_script_module

from utils.errors import OptionsError
from utils.results import format_results_row, results_csv_path, write_results_row

average_csv = load_script_module("average_csv.py", "average_csv")


def test_results_csv_path(tmp_path: Path) -> None:
    path = results_csv_path(tmp_path, "2024-01-27", "voc", "15-5s", "LGKD")
    assert path == tmp_path / "2024-01-27_voc_15-5s_LGKD.csv"
    # Reference behaviour: without --date the name starts with "_".
    assert results_csv_path("results", "", "ade", "100-50", "PLOP") == Path("results/_ade_100-50_PLOP.csv")


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "../evil"),
        ("name", ".."),
        ("task", "a/b"),
        ("dataset", "a\\b"),
        ("date", "/abs"),
        ("name", "a\x00b"),
    ],
)
def test_results_csv_path_refuses_escapes(tmp_path: Path, field: str, value: str) -> None:
    parts = {"date": "d", "dataset": "voc", "task": "15-1", "name": "x"}
    parts[field] = value
    with pytest.raises(OptionsError, match=field):
        results_csv_path(tmp_path, **parts)


def test_format_results_row() -> None:
    score = {
        "Class IoU": {0: np.float64(0.9), 1: "X", 2: np.float64(0.25)},
        "Mean IoU": np.float64(0.575),
    }
    # 5 dataset classes, 3 learned so far: classes 3, 4 are "x"; class 1 absent from the test GT is "X".
    assert format_results_row(2, score, 5) == ["2", "0.9", "X", "0.25", "x", "x", "0.575"]


def test_write_results_row_replaces_same_step_and_sorts(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "r.csv"
    write_results_row(path, 1, ["1", "0.8", "0.5", "0.65"])
    write_results_row(path, 0, ["0", "0.9", "x", "0.9"])
    assert path.read_text() == "0,0.9,x,0.9\n1,0.8,0.5,0.65\n"
    write_results_row(path, 1, ["1", "0.7", "0.4", "0.55"])  # step 1 rerun: replaced, not duplicated
    assert path.read_text() == "0,0.9,x,0.9\n1,0.7,0.4,0.55\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    with pytest.raises(ValueError):
        write_results_row(path, 2, ["1", "0.7", "0.4", "0.55"])


# 6 classes: step 0 learns 0..3 (3 foreground), step 1 adds 4, step 2 adds 5.
GOOD = [
    "0,0.9,0.8,0.7,0.6,x,x,0.75",
    "1,0.92,0.7,0.6,0.5,0.4,x,0.624",
    "2,0.94,0.6,0.5,0.4,0.3,0.2,0.49",
]
# Last row: bg 0.94; old = (0.6 + 0.5 + 0.4) / 3 = 0.5; new = (0.3 + 0.2) / 2 = 0.25; all = 0.49;
# avg = (0.75 + 0.624 + 0.49) / 3 = 0.621333...
GOOD_OUTPUT = (
    "Final Step: 2\nIoU BG: 94.00\nmIoU old: 50.00\nmIoU new: 25.00\nmIoU all: 49.00\nmIoU Avg: 62.13\n"
)


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "results.csv"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "average_csv.py"), *args], capture_output=True, text=True, cwd=ROOT
    )


def test_summarize_by_hand() -> None:
    rows = [line.split(",") for line in GOOD]
    summary = average_csv.summarize(rows)
    assert summary == {
        "step": 2,
        "bg": 0.94,
        "old": pytest.approx(0.5),
        "new": pytest.approx(0.25),
        "all": 0.49,
        "avg": pytest.approx(1.864 / 3),
    }


def test_average_csv_cli(tmp_path: Path) -> None:
    proc = _run(str(_write(tmp_path, GOOD)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == GOOD_OUTPUT
    assert proc.stderr == ""


def test_results_rows_feed_average_csv(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    for line in reversed(GOOD):
        row = line.split(",")
        write_results_row(path, int(row[0]), row)
    assert _run(str(path)).stdout == GOOD_OUTPUT


def test_absent_class_in_last_row_is_left_out(tmp_path: Path) -> None:
    lines = [*GOOD[:2], "2,0.94,X,0.5,0.4,0.3,0.2,0.49"]
    proc = _run(str(_write(tmp_path, lines)))
    assert proc.returncode == 0, proc.stderr
    assert "mIoU old: 45.00\n" in proc.stdout  # (0.5 + 0.4) / 2, class 1 left out
    assert "mIoU new: 25.00\n" in proc.stdout
    assert "class" in proc.stderr and "1 (X)" in proc.stderr and "left out" in proc.stderr


def test_step0_class_absent_from_step0_test_set(tmp_path: Path) -> None:
    # Class 2 is "X" in row 0: the step-0 classes still end at the first lower-case "x" (class 4).
    # The reference would stop at the "X" and count one old class only.
    lines = ["0,0.9,0.8,X,0.6,x,x,0.75", *GOOD[1:]]
    proc = _run(str(_write(tmp_path, lines)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == GOOD_OUTPUT


def test_single_row(tmp_path: Path) -> None:
    proc = _run(str(_write(tmp_path, ["0,0.9,0.8,0.7,0.6,0.5,0.4,0.65"])))
    assert proc.returncode == 0, proc.stderr
    # Reference behaviour: bg/old/new print 0 for a single step.
    assert proc.stdout == (
        "Final Step: 0\nIoU BG: 0.00\nmIoU old: 0.00\nmIoU new: 0.00\nmIoU all: 65.00\nmIoU Avg: 65.00\n"
    )


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "no rows"),
        ([GOOD[0], GOOD[2]], "expected step 1"),
        ([GOOD[0], GOOD[1], GOOD[1]], "expected step 2"),
        ([GOOD[1], GOOD[0]], "expected step 0"),
        ([GOOD[0], "1,0.9,0.5"], "fields"),
        ([GOOD[0], "1,0.92,0.7,0.6,0.5,0.4,x,oops"], "not a number"),
    ],
)
def test_bad_inputs_exit_1_with_message(tmp_path: Path, lines: list[str], message: str) -> None:
    proc = _run(str(_write(tmp_path, lines)))
    assert proc.returncode == 1
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_file_and_usage(tmp_path: Path) -> None:
    proc = _run(str(tmp_path / "missing.csv"))
    assert proc.returncode == 1 and "cannot read" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run()
    assert proc.returncode == 2 and "usage" in proc.stderr
