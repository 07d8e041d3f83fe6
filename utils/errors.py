"""User-facing errors.

Every problem a user can fix (a wrong path, an unknown task, a checkpoint of another task, options that
cannot work together) is raised as a :class:`UserError` subclass whose message is one paragraph naming
the problem and the fix. ``run.py`` catches them, prints the message without a traceback and exits with
status 2 before any work is lost.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, explained in one paragraph. Exit status 2."""

    exit_code = 2


class OptionsError(UserError, ValueError):
    """Command-line options that are unknown, out of range or cannot work together."""


class TaskError(UserError, ValueError):
    """Unknown dataset or task, or a step beyond the task."""


class DatasetError(UserError, FileNotFoundError):
    """Missing or malformed data on disk (layout, list files, masks)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or weight file that is missing, truncated, unsafe or of another task/step/backbone."""


class TrainingError(RuntimeError):
    """A run that cannot go on (for example a non-finite loss). Exit status 3."""

    exit_code = 3


class OutputError(UserError, OSError):
    """An output that cannot be written (disk full, name too long, no permission, ...) or is in use by
    another run. The message names the path and the cause; what was written before is left intact."""
