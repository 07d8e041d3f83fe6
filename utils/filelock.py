"""Advisory file locks (``fcntl.flock``) that are never stale and leave no file behind on a clean exit.

Two uses:

* the **step lock** ``{checkpoint}/{task}-{dataset}_{name}_{step}.lock``, held by a training run for its whole
  life: a second run of the same step (same checkpoint path) is refused with a message naming the first
  (pid, host, start time, command, which the holder writes into the file);
* the **results lock** ``.{csv}.lock`` next to a results CSV, held for the few milliseconds of a
  read-modify-write of the CSV, so that processes writing rows of different steps never lose a row.

The kernel releases an ``flock`` when its process dies, whatever the cause (SIGKILL, out of memory, power
loss of a node on a local disk), so a lock file left by a crash is *stale*: it is reused, never obeyed. On
release the holder deletes the file while still holding the lock. A process that opened the file before the
deletion and then obtains the lock on the deleted inode notices that the path no longer names the inode it
locked and tries again, so two processes never both believe they hold the lock.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from utils.errors import OutputError
from utils.files import describe_os_error, os_error_advice


class LockHeld(Exception):
    """The lock is held by another process (non-blocking acquisition)."""


class FileLock:
    """An exclusive ``flock`` on ``path`` (created if needed), removed on :meth:`release`.

    Args:
        path: the lock file.
        blocking: wait for the lock (True) or raise :class:`LockHeld` at once (False).
        owner: written into the file once the lock is held (read back by refused processes).
    """

    def __init__(self, path: str | os.PathLike[str], blocking: bool = True, owner: str = "") -> None:
        self.path = Path(path)
        self.blocking = blocking
        self.owner = owner
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock.

        Raises:
            LockHeld: ``blocking=False`` and another process holds it.
            OSError: the lock file cannot be created (missing folder, permissions, disk full, ...).
        """
        flags = fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                raise LockHeld(str(self.path)) from None
            except BaseException:
                os.close(fd)
                raise
            # The holder before us may have deleted (and someone else re-created) the file meanwhile.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        if self.owner:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self.owner.encode(), 0)
            except BaseException:
                self.release()
                raise

    def release(self) -> None:
        """Delete the lock file (while still holding the lock), then release it. Idempotent."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)  # closing the last descriptor releases the flock
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], what: str) -> Iterator[None]:
    """Hold a blocking :class:`FileLock` on ``path`` for the ``with`` body.

    Raises:
        OutputError: the lock file cannot be created; ``what`` names what it protects.
    """
    lock = FileLock(path, blocking=True)
    try:
        lock.acquire()
    except OSError as err:
        raise OutputError(
            f"Could not create the lock file {path} that protects {what}: {describe_os_error(err)}. "
            f"{os_error_advice(err)}"
        ) from err
    try:
        yield
    finally:
        lock.release()


def owner_description() -> str:
    """What a step lock file records about its holder (JSON): pid, host, start time and command line."""
    return json.dumps(
        {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        }
    )


def describe_owner(path: Path, attempts: int = 20) -> str:
    """The holder of a lock, from what it wrote into the lock file (``unknown`` if it wrote nothing yet)."""
    for _ in range(attempts):
        try:
            info = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return (
                f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started "
                f"{info.get('started', '?')}: {info.get('command', '?')}"
            )
        time.sleep(0.05)  # the holder writes its details right after taking the lock
    return "a process that has not written its details (an older version of this code?)"
