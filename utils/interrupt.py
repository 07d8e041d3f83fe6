"""Stopping on Ctrl-C (SIGINT) and SIGTERM (what job schedulers and torchrun send) with one line.

:func:`install_stop_handlers` makes both signals raise :class:`StopRequested` in the main thread, the way
Python raises ``KeyboardInterrupt`` for Ctrl-C: every writer is atomic (temporary file + rename, removed on
any exception), so the exception leaves no temporary file and never a half-written ``_last.pth``. ``run.py``
catches it, prints :func:`stop_message` (where it stopped, what rerunning the same command does) and exits
with 128 + the signal number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process killed by it.

Under torchrun every rank receives the signal (the launcher forwards it); only rank 0 prints. Processes
forked by this one (DataLoader workers, the mask scan) inherit the handler; there it restores the default
action and re-raises the signal, so they end quietly and the main process reports. A second signal while
stopping gets the default action (immediate exit), so a stuck shutdown can still be interrupted.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(BaseException):
    """Raised in the main thread when SIGINT or SIGTERM arrives (a BaseException, like KeyboardInterrupt,
    so that no ``except Exception`` on the way swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class RunProgress:
    """Where the run is, kept up to date by ``run.py`` for the stop message."""

    phase: str = "setup"  # setup, training, validation, saving, finishing, evaluation
    epoch: int = 0  # index of the epoch in progress (0-based)
    epochs: int = 0
    iteration: int = 0  # batches drawn in the epoch in progress
    iterations: int = 0
    saved_epoch: int | None = None  # finished epochs stored in the resumable checkpoint (None: none)
    resume_path: Path | None = None


_received: int | None = None
_owner_pid: int | None = None


def _handler(signum: int, frame: Any) -> None:
    global _received
    if os.getpid() != _owner_pid:
        # A forked child (DataLoader worker, scan process): die of the signal like an unhandled process.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    _received = signum
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    raise StopRequested(signum)


def install_stop_handlers() -> dict[int, Any]:
    """Raise :class:`StopRequested` on SIGINT/SIGTERM in this process (main thread only).

    Returns:
        The handlers it replaced, for :func:`restore_handlers`.
    """
    global _owner_pid, _received
    _owner_pid, _received = os.getpid(), None
    return {sig: signal.signal(sig, _handler) for sig in STOP_SIGNALS}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers that :func:`install_stop_handlers` replaced (a caller keeps its own)."""
    global _owner_pid
    _owner_pid = None
    for sig, handler in previous.items():
        signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def received_signal() -> int | None:
    """The stop signal this process received, if any (errors raised while stopping are its consequence)."""
    return _received


def stop_message(signum: int, progress: RunProgress) -> str:
    """One line: which signal, where the run was, and what rerunning the same command does."""
    name = signal.Signals(signum).name
    where = {
        "setup": "before training started",
        "evaluation": "during the evaluation",
        "finishing": "after training, while writing the results",
    }.get(progress.phase)
    if where is None:
        where = f"in epoch {progress.epoch + 1}/{progress.epochs}"
        if progress.phase == "training":
            where += f" at iteration {progress.iteration}/{progress.iterations}"
        elif progress.phase == "validation":
            where += " during validation"
        elif progress.phase == "saving":
            where += " while saving its checkpoint (the previous one is intact)"
    if progress.phase == "evaluation":
        then = "rerun the same command to evaluate again"
    elif progress.phase == "finishing":
        then = "rerun the same command to write them without training again"
    elif progress.saved_epoch is None:
        then = "rerun the same command to start the step again (nothing was saved yet)"
    else:
        done = progress.saved_epoch
        then = (
            f"rerun the same command to resume from epoch {done + 1}/{progress.epochs} (the state after "
            f"{done} epoch{'' if done == 1 else 's'} is saved in {progress.resume_path})"
        )
    return f"Stopped by {name} {where}; {then}."


class CountingIterable:
    """Wrap a loader so that ``progress.iteration`` counts the batches drawn; everything else (``len``,
    ``sampler``, ...) is the loader's."""

    def __init__(self, loader: Any, progress: RunProgress) -> None:
        self._loader = loader
        self._progress = progress

    def __iter__(self) -> Iterator[Any]:
        self._progress.iteration = 0
        for batch in self._loader:
            self._progress.iteration += 1
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
