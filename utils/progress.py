"""Progress reporting for training and evaluation loops.

On rank 0, with a terminal on stderr and progress enabled, a tqdm bar; otherwise (``--no_progress``,
output redirected to a file, batch jobs) plain log lines through the ``LGKD`` logger about every 10 %
of the loop, with the rate and the remaining time, so log files stay readable. Other ranks print nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

from utils.distributed import get_rank
from utils.logger import get_logger

T = TypeVar("T")

_UNKNOWN_TOTAL_EVERY = 100  # log period (iterations) when the length of the iterable is unknown


def _format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _format_value(value.item())
    return str(value)


class Progress(Generic[T]):
    """Iterable returned by :func:`progress`; call ``set_postfix(loss=..., lr=...)`` inside the loop."""

    def __init__(
        self,
        iterable: Iterable[T],
        desc: str,
        total: int | None,
        mode: str,
        log_every: float,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.total = total
        self.mode = mode  # "tqdm", "log" or "silent"
        self.postfix: dict[str, Any] = {}
        self._bar: Any = None
        if mode == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(iterable, desc=desc, total=total, dynamic_ncols=True, leave=False)
        if log_every >= 1:
            self._every = int(log_every)
        elif total:
            self._every = max(1, round(total * log_every))
        else:
            self._every = _UNKNOWN_TOTAL_EVERY
        self._logger = get_logger()

    def set_postfix(self, **kwargs: Any) -> None:
        """Values shown next to the bar, or appended to the next log line (e.g. ``loss``, ``lr``)."""
        self.postfix.update(kwargs)
        if self._bar is not None:
            self._bar.set_postfix({k: _format_value(v) for k, v in self.postfix.items()}, refresh=False)

    def __len__(self) -> int:
        if self.total is None:
            raise TypeError("progress over an iterable of unknown length")
        return self.total

    def __iter__(self) -> Iterator[T]:
        if self.mode == "tqdm":
            try:
                yield from self._bar
            finally:
                self._bar.close()
            return
        if self.mode == "silent":
            yield from self.iterable
            return
        yield from self._iter_logged()

    def _iter_logged(self) -> Iterator[T]:
        start = time.perf_counter()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            if done % self._every == 0 and done != self.total:
                self._log(done, time.perf_counter() - start)
        if done:
            self._log(done, time.perf_counter() - start)

    def _log(self, done: int, elapsed: float) -> None:
        rate = done / elapsed if elapsed > 0 else float("inf")
        if self.total:
            line = f"{self.desc}: {done}/{self.total} ({100 * done / self.total:.0f}%)"
        else:
            line = f"{self.desc}: {done}"
        line += f", {rate:.2f} it/s, elapsed {_format_seconds(elapsed)}"
        if self.total and done < self.total and rate > 0:
            line += f", ETA {_format_seconds((self.total - done) / rate)}"
        if self.postfix:
            line += ", " + ", ".join(f"{k}={_format_value(v)}" for k, v in self.postfix.items())
        self._logger.info(line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _stderr_is_terminal() -> bool:
    stream = sys.stderr
    return bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


def progress(
    iterable: Iterable[T],
    desc: str,
    total: int | None = None,
    enabled: bool = True,
    log_every: float = 0.1,
) -> Progress[T]:
    """Wrap a loop with a progress display suited to where the output goes.

    Args:
        iterable: what the loop runs over (e.g. a DataLoader).
        desc: label of the bar / log lines (e.g. "Epoch 3/30").
        total: number of iterations; default ``len(iterable)`` when it has one.
        enabled: False (``--no_progress``) forces plain log lines even on a terminal.
        log_every: log-line period, a fraction of ``total`` if < 1 (default every 10 %), else a number
            of iterations.

    Returns:
        An iterable with ``set_postfix(**values)``: a tqdm bar on rank 0 when stderr is a terminal and
        ``enabled``; log lines on rank 0 otherwise; nothing on other ranks.
    """
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    if get_rank() != 0:
        mode = "silent"
    elif enabled and _stderr_is_terminal():
        mode = "tqdm"
    else:
        mode = "log"
    return Progress(iterable, desc, total, mode, log_every)
