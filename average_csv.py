"""Summarise a results CSV of a continual run (the reference's ``average_csv.py``).

Usage: ``python average_csv.py <csv>``

The CSV has one row per step, ``step,IoU_0,...,IoU_{K-1},MeanIoU`` (as the reference's ``run.py``
``main`` writes it), with ``X`` for a class absent from that step's test ground truth and ``x`` for a
class not learned yet. Printed, as percentages with two
decimals: the final step, the background IoU of the last step, the mean IoU over the step-0 foreground
classes ("old") and over the classes added later ("new") at the last step, the last step's mIoU ("all"),
and the mean of the mIoU column over all steps ("Avg").

Reference behaviour (RN-29, fixed on purpose): the reference crashes on ``X`` in the last row and, when a
step-0 class is absent from the step-0 test set (``X`` in row 0), takes that column as the end of the
step-0 classes. Here the end of the step-0 classes is the first lower-case ``x`` of row 0 (the first class
not learned at step 0), and ``X``/``x`` entries of the last row are left out of the old/new means, with a
note on stderr. Malformed files (empty, steps missing or out of order, ragged rows, non-numbers, IoUs
outside [0, 1] or NaN anywhere in the file) give a one-paragraph message and exit status 1 instead of a
traceback or a summary of impossible numbers.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from utils.results import ABSENT, NOT_LEARNED  # class absent from a step's test set / not learned yet

EXIT_BAD_INPUT = 1
EXIT_USAGE = 2


class CsvFormatError(ValueError):
    """The CSV cannot be summarised; the message says why and what to do."""


def read_rows(path: str | Path) -> list[list[str]]:
    """All non-empty rows of the CSV, as lists of stripped strings."""
    with open(path, newline="") as f:
        rows = [[field.strip() for field in row] for row in csv.reader(f)]
    return [row for row in rows if any(row)]


def _check_rows(rows: Sequence[Sequence[str]]) -> None:
    if not rows:
        raise CsvFormatError(
            "the file holds no rows. It is written by run.py after each step; run at least step 0 first."
        )
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) < 3:
            raise CsvFormatError(
                f"row {i + 1} has {len(row)} fields; a results row is 'step,IoU_0,...,IoU_K-1,MeanIoU'."
            )
        if len(row) != width:
            raise CsvFormatError(
                f"row {i + 1} has {len(row)} fields but row 1 has {width}: the rows come from runs with a "
                "different number of classes. Keep the rows of one continual run only."
            )
        try:
            step = int(row[0])
        except ValueError:
            raise CsvFormatError(f"row {i + 1} starts with {row[0]!r}, not a step number.") from None
        if step != i:
            raise CsvFormatError(
                f"row {i + 1} is step {step}, expected step {i}: the file must hold exactly one row per "
                "step, in order 0, 1, 2, ... Remove duplicated or stale rows (a step run twice, or a file "
                "not deleted before a new run), or rerun the missing steps."
            )


def _number(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise CsvFormatError(f"{where} is {value!r}, not a number.") from None


def _iou(value: str, where: str) -> float:
    """``value`` as an IoU: a number in [0, 1] (NaN and infinities refused)."""
    number = _number(value, where)
    if not 0.0 <= number <= 1.0:  # False for NaN too
        raise CsvFormatError(
            f"{where} is {value!r}, not an IoU in [0, 1]: run.py writes every IoU as a fraction (X or x when "
            "there is none). The row is damaged or was not written by run.py (percentages?); rerun that step "
            "with --test to rewrite it."
        )
    return number


def _check_values(rows: Sequence[Sequence[str]]) -> None:
    """Every class IoU is X, x or in [0, 1]; every mIoU is in [0, 1] (rows already shaped by _check_rows)."""
    for i, row in enumerate(rows):
        for col in range(1, len(row) - 1):
            if row[col] not in (ABSENT, NOT_LEARNED):
                _iou(row[col], f"the IoU of class {col - 1} in row {i + 1}")
        _iou(row[-1], f"the mIoU of row {i + 1}")


def _first_unlearned_column(first_row: Sequence[str]) -> int:
    """Column of the first class not learned at step 0 (the mIoU column if every class is)."""
    for col in range(1, len(first_row)):
        if first_row[col] == NOT_LEARNED:
            return col
    return len(first_row) - 1


def _mean_iou(fields: Sequence[str], first_class: int, what: str, notes: list[str]) -> float:
    """Mean of the numeric IoUs in ``fields`` (classes ``first_class``...), skipping X/x with a note."""
    if not fields:
        notes.append(f"mIoU {what}: no such classes in this task; reported as 0.")
        return 0.0
    values: list[float] = []
    skipped: list[str] = []
    for offset, value in enumerate(fields):
        if value in (ABSENT, NOT_LEARNED):
            skipped.append(f"{first_class + offset} ({value})")
        else:
            values.append(_iou(value, f"the IoU of class {first_class + offset} in the last row"))
    if skipped:
        notes.append(
            f"mIoU {what}: classes {', '.join(skipped)} have no IoU in the last row "
            "(X = absent from the test ground truth, x = not learned) and are left out of the mean."
        )
    if not values:
        return math.nan
    return sum(values) / len(values)


def summarize(rows: Sequence[Sequence[str]], notes: list[str] | None = None) -> dict[str, float | int]:
    """Summary of a continual run (fractions in [0, 1], not percentages).

    Args:
        rows: the CSV rows, row ``i`` being step ``i``.
        notes: if given, explanations of left-out classes are appended to it.

    Returns:
        ``{"step", "bg", "old", "new", "all", "avg"}``: last step, its background IoU, mean IoU of the
        step-0 foreground classes, mean IoU of the classes added after step 0, its mIoU, and the mean
        mIoU over all steps. With a single row, bg/old/new are 0 as in the reference.

    Raises:
        CsvFormatError: empty input, steps not 0..n-1 in order, ragged rows, non-numeric values or IoUs
            outside [0, 1] (NaN included).
    """
    notes = [] if notes is None else notes
    _check_rows(rows)
    _check_values(rows)
    first, last = rows[0], rows[-1]
    miou = [_iou(row[-1], f"the mIoU of row {i + 1}") for i, row in enumerate(rows)]
    summary: dict[str, float | int] = {
        "step": int(last[0]),
        "bg": 0.0,
        "old": 0.0,
        "new": 0.0,
        "all": miou[-1],
        "avg": sum(miou) / len(miou),
    }
    if len(rows) == 1:
        # Reference behaviour (``average_csv.py``): a single step (joint/offline training) reports
        # bg/old/new as 0.
        return summary
    # Columns: 0 = step, 1 = class 0 (background), 2..col-1 = step-0 foreground, col..-2 = later classes.
    col = _first_unlearned_column(first)
    if last[1] in (ABSENT, NOT_LEARNED):
        notes.append("IoU BG: background has no IoU in the last row.")
        summary["bg"] = math.nan
    else:
        summary["bg"] = _iou(last[1], "the background IoU in the last row")
    summary["old"] = _mean_iou(last[2:col], 1, "old", notes)
    summary["new"] = _mean_iou(last[col:-1], col - 1, "new", notes)
    return summary


def format_summary(summary: dict[str, float | int]) -> str:
    """The reference's summary lines (percentages with two decimals)."""
    lines = [f"Final Step: {summary['step']}"]
    for label, key in (
        ("IoU BG", "bg"),
        ("mIoU old", "old"),
        ("mIoU new", "new"),
        ("mIoU all", "all"),
        ("mIoU Avg", "avg"),
    ):
        lines.append(f"{label}: {100 * summary[key]:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the summary of the CSV named on the command line; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python average_csv.py <results.csv>", file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else EXIT_USAGE
    path = argv[0]
    notes: list[str] = []
    try:
        summary = summarize(read_rows(path), notes)
    except CsvFormatError as err:
        print(f"average_csv.py: cannot summarise {path}: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        print(
            f"average_csv.py: cannot read {path}: {err}. Pass the results CSV written by run.py.",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    print(format_summary(summary))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
