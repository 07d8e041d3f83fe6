"""Small file-system helpers shared by every writer of outputs (checkpoints, results, options, locks).

Writers create a temporary file next to their target (``.{name}.XXXXXXXX.tmp``) and rename it over the
target, so a reader never sees half a file. A failed write becomes an :class:`~utils.errors.OutputError`
that names the path, the system's cause with its errno name (``No space left on device (ENOSPC)``) and
what to do about it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from utils.errors import OutputError

# mkstemp names a temporary file "{prefix}{8 random characters}{suffix}": ".{name}.XXXXXXXX.tmp".
TEMP_SUFFIX = ".tmp"
TEMP_NAME_EXTRA = len(".") + len(".") + 8 + len(TEMP_SUFFIX)


def temp_prefix(path: Path) -> str:
    """Prefix of the temporary files that atomic writers of ``path`` create next to it."""
    return f".{path.name}."


def remove_stray_temp_files(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files an interrupted atomic write of ``path`` left behind (killed process).

    Only call this while no other process may be writing ``path`` (its step lock or file lock held).
    Returns the removed files.
    """
    path = Path(path)
    removed = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            if entry.name.startswith(temp_prefix(path)) and entry.name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def describe_os_error(err: OSError) -> str:
    """``"No space left on device (ENOSPC)"``: the system's text and the errno name."""
    text = err.strerror or str(err) or type(err).__name__
    name = errno.errorcode.get(err.errno) if isinstance(err.errno, int) else None
    return f"{text} ({name})" if name else text


def os_error_advice(err: OSError) -> str:
    """What to do about a failed write, by errno."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "Free space on that disk (or raise the quota), or write to another folder."
    if code == errno.ENAMETOOLONG:
        return "Use a shorter --name (or --date) or a folder with a shorter path."
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "Make the folder writable, or choose another folder."
    if code == errno.EFBIG:
        return "The file exceeds the size limit of this process or file system (see `ulimit -f`)."
    return "Check that the folder exists and is writable."


def output_error(what: str, path: Path, err: OSError, kept: str, hint: str = "") -> OutputError:
    """The :class:`OutputError` for a failed write of ``path``: path, cause (errno), what is intact, fix."""
    message = f"Could not write {what} {path}: {describe_os_error(err)}. {kept} {os_error_advice(err)}"
    if hint:
        message += f" {hint}"
    error = OutputError(message)
    error.errno = err.errno
    error.path = str(path)
    return error
