"""File-system helpers shared by every writer of outputs (checkpoints, results, options, split caches, locks).

:func:`write_atomically` is the one atomic writer: it fills a temporary file next to its target
(``.{name}.XXXXXXXX.tmp``) and renames it over the target, so a reader never sees half a file. A failed
write becomes an :class:`~utils.errors.OutputError` (:func:`output_error`) that names the path, the
system's cause with its errno name (``No space left on device (ENOSPC)``) and what to do about it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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


def current_umask() -> int:
    """The process's file-mode creation mask, read without changing it where the system allows.

    ``/proc/self/status`` reports it (Linux >= 4.7); elsewhere it is read by setting and restoring it
    (``os.umask`` has no read-only form before Python 3.13), which is momentarily process-wide.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_file_mode(path: Path) -> int:
    """The permissions a rewrite of ``path`` gets: those of the file it replaces, else ``0o666 & ~umask``.

    This is what ``open(path, "w")`` would give, so an atomic write changes no permission a user set and a
    new file is as readable as any other output (``mkstemp`` alone would make it owner-only).
    """
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def write_atomically(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through a temporary file in its folder, then rename the temporary file over it.

    ``write(handle)`` fills the temporary file (opened in binary mode). The data is flushed to the disk
    before the rename and the rename itself afterwards, so after a crash, a signal or a full disk ``path``
    holds either its previous content or the new one, never part of it. Parent folders are created; the
    file mode follows :func:`output_file_mode`.

    Args:
        path: the file to write.
        write: writes the new content into the binary handle it is given.

    Raises:
        OSError: the system's error (with its real errno) from creating, writing or renaming the
            temporary file, or whatever ``write`` raised; the temporary file is removed and ``path`` is
            unchanged. Callers turn OSErrors into :func:`output_error`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = output_file_mode(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path), suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_directory(path.parent)


def write_text_atomically(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """:func:`write_atomically` of ``text``, encoded with ``encoding``."""
    data = text.encode(encoding)
    write_atomically(path, lambda handle: handle.write(data))


def _fsync_directory(folder: Path) -> None:
    """Persist a rename in ``folder`` (POSIX); some platforms and file systems cannot, which is harmless."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


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
