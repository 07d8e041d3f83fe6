"""Results CSV: one line ``step,IoU_0,...,IoU_{K-1},MeanIoU`` per incremental step.

Reference: ``run.py`` ``main`` writes the same rows.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils.errors import OptionsError, OutputError, UserError
from utils.filelock import locked
from utils.files import describe_os_error, output_error, remove_stray_temp_files, write_text_atomically

# The two non-numeric cells of a results row, owned here and read by metrics, average_csv.py and the demo:
ABSENT = "X"  # the class is absent from the step's test ground truth (StreamSegMetrics' "Class IoU")
NOT_LEARNED = "x"  # the class is not learned yet at that step (index beyond the current metric size)


def _check_component(label: str, value: str) -> str:
    value = str(value)
    bad = (
        "/" in value
        or "\\" in value
        or (os.sep in value)
        or (os.altsep is not None and os.altsep in value)
        or "\x00" in value
        or value in {".", ".."}
        or os.path.isabs(value)
    )
    if bad:
        raise OptionsError(
            f"--{label} {value!r} cannot be part of the results file name: it contains a path separator, "
            f"'..', a NUL byte or is an absolute path, which could write outside the results folder. "
            f"Use a plain name (letters, digits, '-', '_', '.')."
        )
    return value


def results_csv_path(results_dir: str | os.PathLike, date: str, dataset: str, task: str, name: str) -> Path:
    """``{results_dir}/{date}_{dataset}_{task}_{name}.csv`` (reference ``run.py`` ``main``; an empty date
    gives a leading ``_``).

    Raises:
        OptionsError: a component contains a path separator, NUL, is ``.``/``..`` or absolute.
    """
    parts = [
        _check_component(label, value)
        for label, value in (("date", date), ("dataset", dataset), ("task", task), ("name", name))
    ]
    return Path(results_dir) / f"{'_'.join(parts)}.csv"


def format_results_row(step: int, score: Mapping[str, Any], num_classes: int) -> list[str]:
    """The CSV fields of one step: ``[step, IoU_0, ..., IoU_{num_classes-1}, MeanIoU]`` as strings.

    Each IoU is ``str()`` of the metric value (``"X"`` when the class is absent from the test ground
    truth, as ``StreamSegMetrics`` reports it), or ``"x"`` when the class index is beyond the current
    metric size (not learned yet).

    Args:
        step: incremental step.
        score: ``StreamSegMetrics.get_results()`` (needs "Class IoU" and "Mean IoU").
        num_classes: classes of the dataset (21 VOC, 151 ADE, 19 Cityscapes domains).
    """
    class_iou = score["Class IoU"]
    row = [str(step)]
    row += [str(class_iou[c]) if c in class_iou else NOT_LEARNED for c in range(num_classes)]
    row.append(str(score["Mean IoU"]))
    return row


def _row_step(line: str) -> int | None:
    try:
        return int(line.split(",", 1)[0])
    except ValueError:
        return None


def results_lock_path(path: str | os.PathLike) -> Path:
    """The lock file that serialises writers of the CSV ``path`` (``.{name}.lock`` next to it)."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def results_steps(path: str | os.PathLike) -> set[int]:
    """Steps that have a row in the results CSV ``path`` (empty if the file does not exist).

    Raises:
        OutputError: the file exists but cannot be read.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    except OSError as err:
        raise OutputError(f"Cannot read the results file {path}: {describe_os_error(err)}.") from err
    return {step for step in map(_row_step, text.splitlines()) if step is not None}


def remove_stray_results_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files of writes of the CSV ``path`` that a killed process left, under its lock."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    with locked(results_lock_path(path), f"the results file {path}"):
        return remove_stray_temp_files(path)


def write_results_row(path: str | os.PathLike, step: int, row: Sequence[str]) -> None:
    """Write the row of ``step`` into the CSV at ``path``, atomically and under a file lock.

    Existing rows are kept; a row of the same step is replaced instead of duplicated, and rows are kept
    sorted by step. The read-modify-write holds an exclusive lock (``.{name}.lock`` next to the CSV), so
    processes writing rows of different steps at the same moment never lose one; the new content goes to
    a temporary file in the same folder, then ``os.replace`` swaps it in, so a crash never leaves a
    half-written CSV (temporary files of a killed writer are removed by the next writer).

    Reference behaviour (RN-44): the reference appends a line per run. For the scripts' normal use (steps
    run in order) the file is identical; re-running a step no longer leaves a duplicate row that
    ``average_csv.py`` rejects. Lines without an integer step (none are written by this project) are kept
    at the top, in their order.

    Args:
        path: the CSV file (parent folders are created).
        step: the step of ``row``.
        row: the fields from :func:`format_results_row`; ``row[0]`` must be ``str(step)``.

    Raises:
        OutputError: the file cannot be written (disk full, permissions, name too long); its previous
            content is intact.
    """
    row = [str(field) for field in row]
    if not row or row[0] != str(step):
        raise ValueError(f"row must start with its step {step}, got {row[:1]}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(results_lock_path(path), f"the results file {path}"):
            remove_stray_temp_files(path)
            _replace_row(path, step, row)
    except OSError as err:
        if isinstance(err, UserError):
            raise
        kept = "Its previous content is intact." if path.is_file() else "Nothing was written."
        raise output_error(f"the results row of step {step} to", path, err, kept) from err


def _replace_row(path: Path, step: int, row: list[str]) -> None:
    others: list[str] = []
    by_step: dict[int, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            line_step = _row_step(line)
            if line_step is None:
                others.append(line)
            else:
                by_step[line_step] = line
    by_step[int(step)] = ",".join(row)
    lines = others + [by_step[s] for s in sorted(by_step)]
    write_text_atomically(path, "\n".join(lines) + "\n")
