"""User-facing errors.

Every problem a user can fix (a wrong path, an unknown task, a checkpoint of another task, options that
cannot work together) is raised as a :class:`UserError` subclass whose message is one paragraph naming
the problem and the fix. ``run.py`` catches them, prints the message without a traceback and exits with
status 2 before any work is lost.

A :class:`UserError` raised inside a ``DataLoader`` worker process reaches the main process re-created by
torch as ``type(err)(text)``, where ``text`` is the worker's formatted traceback ("Caught DatasetError in
DataLoader worker process 2. Original Traceback ...", torch/_utils.py ``ExceptionWrapper.reraise``). The
constructor recognises that text and keeps only the original one-paragraph message, so the user sees the
same error whether the data was read in the main process or in a worker.
"""

from __future__ import annotations

import re

# The header torch puts before a worker's traceback: "Caught DatasetError in DataLoader worker process 0."
# (or "... in pin memory thread for device 0."), then "Original Traceback (most recent call last):".
_WORKER_TRACEBACK = re.compile(r"\ACaught \w+ [^\n]*\.\nOriginal Traceback \(most recent call last\):\n")


def original_message(cls: type[BaseException], text: str) -> str:
    """The message of a ``cls`` error, unwrapped from a worker traceback if ``text`` is one.

    The last line of a formatted traceback is ``module.QualName: message`` (``traceback.format_exception``;
    chained causes come before it), so the message is what follows the last such prefix. Text that is not a
    worker traceback, or that does not name ``cls``, is returned unchanged.
    """
    if not _WORKER_TRACEBACK.match(text):
        return text
    for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__):
        start = text.rfind(f"\n{name}: ")
        if start >= 0:
            return text[start + len(name) + 3 :].strip()
    return text


class UserError(Exception):
    """A problem with the user's input, explained in one paragraph. Exit status 2."""

    exit_code = 2

    def __init__(self, *args: object) -> None:
        if len(args) == 1 and isinstance(args[0], str):
            args = (original_message(type(self), args[0]),)
        super().__init__(*args)


class OptionsError(UserError, ValueError):
    """Command-line options that are unknown, out of range or cannot work together."""


class TaskError(UserError, ValueError):
    """Unknown dataset or task, or a step beyond the task."""


class DatasetError(UserError, FileNotFoundError):
    """Missing or malformed data on disk (layout, list files, masks, unreadable images)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weight file that is missing, truncated, unsafe or of another task/step/backbone."""


class TrainingError(RuntimeError):
    """A run that cannot go on (for example a non-finite loss). Exit status 3."""

    exit_code = 3


class OutputError(UserError, OSError):
    """An output that cannot be written (disk full, name too long, no permission, ...) or is in use by
    another run. The message names the path and the cause; what was written before is left intact."""
