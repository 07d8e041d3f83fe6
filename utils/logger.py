"""Run logger: the Python logger ``LGKD`` plus TensorBoard summaries, both on rank 0 only.

Reference: ``utils/logger.py`` ``Logger``.

Text goes through :mod:`logging`: the logger ``LGKD`` (level DEBUG, no propagation) gets a coloured
console handler and a plain file handler appending to ``{logdir}/log.txt``. Modules log through child
loggers, ``get_logger("utils.loss")`` (:func:`get_logger`: ``LGKD.utils.loss``), which propagate into it;
:data:`LOGGER_NAME` is the one place the name is written.
Scalars, tables and figures go to a tensorboardX ``SummaryWriter`` in the same folder; every tag gets the
suffix ``/{step}`` so the steps of a continual run stay apart in TensorBoard.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from termcolor import colored

from utils.errors import OptionsError, OutputError
from utils.files import describe_os_error, os_error_advice

LOGGER_NAME = "LGKD"
_OWNED = "_lgkd_handler"  # attribute marking the handlers installed by Logger (so they can be replaced)


def get_logger(name: str | None = None) -> logging.Logger:
    """The ``LGKD`` logger, or its child ``LGKD.<name>`` (which propagates into it)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def remove_handlers() -> None:
    """Detach and close the handlers installed by :class:`Logger` (end of a run, tests)."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if getattr(h, _OWNED, False)]:
        logger.removeHandler(handler)
        handler.close()


class _ColourFormatter(logging.Formatter):
    """``[mm/dd HH:MM:SS LGKD]: message`` with a green prefix; warnings and errors flagged in red."""

    def __init__(self) -> None:
        super().__init__(datefmt="%m/%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        prefix = colored(f"[{self.formatTime(record, self.datefmt)} {record.name}]: ", "green")
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.ERROR:
            message = f"{colored('ERROR', 'red', attrs=['underline'])} {message}"
        elif record.levelno >= logging.WARNING:
            message = f"{colored('WARNING', 'red')} {message}"
        return prefix + message


class _LogFileHandler(logging.FileHandler):
    """``log.txt``: a failed write (disk full, file removed, ...) is reported once, in one line naming the
    file and the cause, instead of logging's traceback on every record; the run and the console log go
    on (checkpoints, written atomically, report their own failures and stop the run)."""

    reported = False

    def handleError(self, record: logging.LogRecord) -> None:
        if self.reported:
            return
        self.reported = True
        err = sys.exc_info()[1]
        cause = describe_os_error(err) if isinstance(err, OSError) else f"{type(err).__name__}: {err}"
        advice = f" {os_error_advice(err)}" if isinstance(err, OSError) else ""
        sys.stderr.write(
            f"error: cannot write the log file {self.baseFilename}: {cause}. The run goes on and the console "
            f"still shows the log; later lines are missing from the file.{advice}\n"
        )


def _html_cell(value: Any) -> str:
    return f"<td>{value}</td>"


class Logger:
    """Logging facade of a run (one step): text log, console and TensorBoard.

    Constructing a second ``Logger`` in the same process (next step, tests) replaces the handlers the
    first one installed, so messages are never duplicated.

    Args:
        logdir: folder of this step (``{logdir}/{task}-{dataset}/{name}/step{step}``); created on rank 0.
        rank: process rank; only rank 0 prints, writes ``log.txt`` and TensorBoard events.
        type: summary writer: "tensorboardX" (default) or "torch" (``torch.utils.tensorboard``).
        debug: let :meth:`debug` (and DEBUG records of child loggers) through.
        filename: text log file; default ``{logdir}/log.txt``.
        summary: write TensorBoard summaries (``--visualize``, on by default).
        step: incremental step, appended to every tag as ``/{step}``; None = no suffix.
    """

    def __init__(
        self,
        logdir: str | os.PathLike,
        rank: int,
        type: str = "tensorboardX",
        debug: bool = False,
        filename: str | os.PathLike | None = None,
        summary: bool = True,
        step: int | None = None,
    ) -> None:
        if type not in ("tensorboardX", "torch"):
            raise OptionsError(f"Unknown summary writer type {type!r}: use 'tensorboardX' or 'torch'.")
        self.logdir = Path(logdir)
        self.rank = rank
        self.type = type
        self.is_debug = debug
        self.step = step
        self.summary = bool(summary) and rank == 0
        self.logfile = Path(filename) if filename is not None else self.logdir / "log.txt"
        self.logger = self._setup_text_logger()
        self.writer = self._make_writer() if self.summary else None

    def _setup_text_logger(self) -> logging.Logger:
        logger = logging.getLogger(LOGGER_NAME)
        logger.setLevel(logging.DEBUG)
        logger.propagate = False
        remove_handlers()
        level = logging.DEBUG if self.is_debug else logging.INFO
        handlers: list[logging.Handler] = []
        if self.rank == 0:
            self.logfile.parent.mkdir(parents=True, exist_ok=True)
            console = logging.StreamHandler(sys.stdout)
            console.setFormatter(_ColourFormatter())
            try:
                file_handler = _LogFileHandler(self.logfile, mode="a", encoding="utf-8")
            except OSError as err:
                raise OutputError(
                    f"Could not open the log file {self.logfile}: {describe_os_error(err)}. "
                    f"{os_error_advice(err)}"
                ) from err
            file_handler.setFormatter(logging.Formatter("[%(asctime)s] %(name)s %(levelname)s: %(message)s"))
            handlers = [console, file_handler]
        else:
            # Other ranks stay silent; the NullHandler keeps logging's last-resort stderr handler away.
            handlers = [logging.NullHandler()]
        for handler in handlers:
            handler.setLevel(level)
            setattr(handler, _OWNED, True)
            logger.addHandler(handler)
        return logger

    def _make_writer(self) -> Any:
        if self.type == "torch":
            from torch.utils.tensorboard import SummaryWriter
        else:
            from tensorboardX import SummaryWriter
        try:
            return SummaryWriter(str(self.logdir))
        except OSError as err:
            raise OutputError(
                f"Could not create the tensorboard events file in {self.logdir}: {describe_os_error(err)}. "
                f"{os_error_advice(err)}"
            ) from err

    def _tag(self, tag: str) -> str:
        return f"{tag}/{self.step}" if self.step is not None else tag

    def info(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            self.logger.info(msg, *args)

    def debug(self, msg: str, *args: Any) -> None:
        if self.rank == 0 and self.is_debug:
            self.logger.debug(msg, *args)

    def warning(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            self.logger.warning(msg, *args)

    def error(self, msg: str, *args: Any) -> None:
        if self.rank == 0:
            self.logger.error(msg, *args)

    def add_scalar(self, tag: str, scalar_value: float, step: int | None = None) -> None:
        if self.writer is not None:
            self.writer.add_scalar(self._tag(tag), float(scalar_value), step)

    def add_image(self, tag: str, image: Any, step: int | None = None, dataformats: str = "CHW") -> None:
        """Log an image (tensor or array; ``dataformats`` "CHW" or "HWC")."""
        if self.writer is not None:
            self.writer.add_image(self._tag(tag), image, step, dataformats=dataformats)

    def add_figure(self, tag: str, image: Any, step: int | None = None) -> None:
        """Log a matplotlib figure (e.g. ``confusion_matrix_to_fig(...)``)."""
        if self.writer is not None:
            self.writer.add_figure(self._tag(tag), image, step)

    def add_text(self, tag: str, text: str, step: int | None = None) -> None:
        if self.writer is not None:
            self.writer.add_text(self._tag(tag), text, step)

    def add_table(self, tag: str, tbl: Mapping[Any, Any], step: int | None = None) -> None:
        """Log a key/value mapping as an HTML table ("Term", "Value") through ``add_text``."""
        if self.writer is None:
            return
        rows = "".join(f"<tr>{_html_cell(key)}{_html_cell(value)}</tr>" for key, value in tbl.items())
        text = f'<table width="100%"><tr><th>Term</th><th>Value</th></tr>{rows}</table>'
        self.add_text(tag, text, step)

    def add_results(
        self, results: Mapping[str, Mapping[Any, Any]], tag: str = "Results", best_epoch: int | None = None
    ) -> None:
        """Log per-class results as an HTML table, one row per key (e.g. "T-IoU", "T-Acc").

        The tag becomes ``{tag}/{step}``, followed by ``(epoch {best_epoch})`` when given, i.e. the
        reference's ``Results/{step}(epoch {best_epoch})`` (``Logger.add_results``). A tag that already
        carries the step segment (``f"Results/{step}(epoch {best_epoch})"`` built by the caller) is used as it
        is.
        """
        if self.writer is None:
            return
        if self.step is not None and f"/{self.step}" in tag:
            full_tag = tag
        else:
            full_tag = self._tag(tag)
        if best_epoch is not None:
            full_tag += f"(epoch {best_epoch})"
        rows = "".join(
            f"<tr>{_html_cell(name)}{''.join(_html_cell(v) for v in values.values())}</tr>"
            for name, values in results.items()
        )
        self.writer.add_text(full_tag, f'<table width="100%">{rows}</table>')

    def to_file(self, msg: str, level: int = logging.WARNING) -> None:
        """Write ``msg`` to ``log.txt`` only (e.g. a line already printed on the console)."""
        if self.rank != 0:
            return
        record = self.logger.makeRecord(self.logger.name, level, __file__, 0, msg, (), None)
        for handler in self.logger.handlers:
            if isinstance(handler, logging.FileHandler) and getattr(handler, _OWNED, False):
                handler.handle(record)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()
        for handler in self.logger.handlers:
            handler.flush()

    def close(self) -> None:
        """Close the summary writer and the log file; the console handler stays for late messages."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except OSError as err:
                cause = describe_os_error(err)
                sys.stderr.write(f"error: cannot finish the tensorboard events in {self.logdir}: {cause}.\n")
        for handler in [h for h in self.logger.handlers if isinstance(h, logging.FileHandler)]:
            if getattr(handler, _OWNED, False):
                self.logger.removeHandler(handler)
                handler.close()
