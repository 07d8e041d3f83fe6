"""Logger (reference ``utils/logger.py`` ``Logger``) and progress reporting."""

from __future__ import annotations

import logging
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

import utils.progress as progress_module
from metrics import confusion_matrix_to_fig
from utils.logger import LOGGER_NAME, Logger, get_logger
from utils.progress import progress


def _event_tags(logdir: Path) -> dict[str, list]:
    """Tags of all summaries in the tensorboard event files of ``logdir`` -> list of their values."""
    tags: dict[str, list] = {}
    for path in logdir.glob("events.out.tfevents.*"):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            # TFRecord: uint64 length, uint32 crc, payload, uint32 crc.
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            payload = data[pos + 12 : pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(payload)
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append((event.step, value))
    return tags


def test_logger_writes_log_txt_and_suffixed_tags(tmp_path: Path, capsys) -> None:
    logdir = tmp_path / "15-5s-voc" / "LGKD" / "step3"
    log = Logger(logdir, rank=0, step=3)
    log.info("Training step 3 with lr 0.001.")
    log.debug("hidden without --debug")
    log.warning("careful")
    get_logger("utils.loss").info("from a child logger")
    log.add_scalar("Loss", 1.5, 7)
    log.add_table("Opts", {"lr": 0.001, "epochs": 30})
    log.add_results({"T-IoU": {0: 0.9, 1: "X"}, "T-Acc": {0: 0.95, 1: "X"}}, tag="Results", best_epoch=30)
    log.add_text("Note", "hello", 1)
    log.add_figure("Test_Confusion_Matrix", confusion_matrix_to_fig(np.eye(3)))
    log.add_image("Samples", np.zeros((3, 4, 4), dtype=np.uint8), 1)
    log.close()

    text = (logdir / "log.txt").read_text()
    assert "LGKD INFO: Training step 3 with lr 0.001." in text
    assert "LGKD WARNING: careful" in text
    assert "LGKD.utils.loss INFO: from a child logger" in text
    assert "hidden" not in text
    assert text.startswith("[")

    out = capsys.readouterr().out
    assert "LGKD]: Training step 3 with lr 0.001." in out
    assert out.count("Training step 3") == 1

    tags = _event_tags(logdir)
    assert tags["Loss/3"][0][0] == 7
    assert tags["Loss/3"][0][1].simple_value == 1.5
    assert "Opts/3/text_summary" in tags
    assert "Results/3(epoch 30)/text_summary" in tags
    assert "Note/3/text_summary" in tags
    assert "Test_Confusion_Matrix/3" in tags
    assert "Samples/3" in tags
    table = tags["Opts/3/text_summary"][0][1].tensor.string_val[0].decode()
    assert "<table" in table and "<td>lr</td><td>0.001</td>" in table


def test_results_tag_built_by_caller_is_not_suffixed_twice(tmp_path: Path) -> None:
    log = Logger(tmp_path, rank=0, step=2)
    log.add_results({"T-IoU": {0: 0.5}}, tag="Results/2(epoch 30)")
    log.close()
    assert "Results/2(epoch 30)/text_summary" in _event_tags(tmp_path)


def test_logger_without_step_keeps_tags(tmp_path: Path) -> None:
    log = Logger(tmp_path, rank=0)
    log.add_scalar("E-Loss", 0.5, 0)
    log.close()
    assert "E-Loss" in _event_tags(tmp_path)


def test_logger_twice_does_not_duplicate_and_switches_file(tmp_path: Path, capsys) -> None:
    first = Logger(tmp_path / "step0", rank=0, step=0, summary=False)
    first.info("step zero")
    second = Logger(tmp_path / "step1", rank=0, step=1, summary=False)
    second.info("step one")
    second.close()
    first.close()
    out = capsys.readouterr().out
    assert out.count("step one") == 1
    assert "step one" not in (tmp_path / "step0" / "log.txt").read_text()
    assert (tmp_path / "step1" / "log.txt").read_text().count("step one") == 1
    lgkd = logging.getLogger(LOGGER_NAME)
    assert lgkd.level == logging.DEBUG and lgkd.propagate is False


def test_logger_appends_to_existing_log(tmp_path: Path) -> None:
    for message in ("first run", "second run"):
        log = Logger(tmp_path, rank=0, summary=False)
        log.info(message)
        log.close()
    text = (tmp_path / "log.txt").read_text()
    assert "first run" in text and "second run" in text


def test_debug_flag(tmp_path: Path) -> None:
    log = Logger(tmp_path, rank=0, debug=True, summary=False)
    log.debug("visible with --debug")
    log.close()
    assert "LGKD DEBUG: visible with --debug" in (tmp_path / "log.txt").read_text()


def test_other_ranks_are_silent(tmp_path: Path, capsys) -> None:
    log = Logger(tmp_path / "r1", rank=1, step=0)
    log.info("rank one")
    log.warning("rank one warning")
    get_logger("utils.loss").warning("child on rank one")
    log.add_scalar("Loss", 1.0, 0)
    log.close()
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert not (tmp_path / "r1").exists()


def test_no_summary_writes_no_events(tmp_path: Path) -> None:
    log = Logger(tmp_path, rank=0, summary=False)
    log.add_scalar("Loss", 1.0, 0)
    log.flush()
    log.close()
    assert not list(tmp_path.glob("events.out.tfevents.*"))


@pytest.fixture
def lgkd_records(caplog):
    # The LGKD logger does not propagate to the root logger that caplog listens to.
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.DEBUG)
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


def test_progress_falls_back_to_log_lines_without_tty(lgkd_records) -> None:
    assert not sys.stderr.isatty()
    bar = progress(range(20), desc="Evaluation")
    seen = []
    for i in bar:
        seen.append(i)
        bar.set_postfix(loss=0.123456, lr="1.00e-02")
    assert seen == list(range(20))
    lines = [r.getMessage() for r in lgkd_records.records if r.name == LOGGER_NAME]
    assert len(lines) == 10  # every 10 % (2 iterations), the last one at 20/20
    assert lines[0].startswith("Evaluation: 2/20 (10%)")
    assert (
        "it/s" in lines[0] and "ETA" in lines[0] and "loss=0.1235" in lines[0] and "lr=1.00e-02" in lines[0]
    )
    assert lines[-1].startswith("Evaluation: 20/20 (100%)")


def test_progress_disabled_logs_even_on_a_terminal(lgkd_records, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_stderr_is_terminal", lambda: True)
    assert list(progress(range(4), desc="Epoch 1", enabled=False, log_every=2)) == [0, 1, 2, 3]
    assert len([r for r in lgkd_records.records if r.name == LOGGER_NAME]) == 2


def test_progress_uses_tqdm_on_a_terminal(lgkd_records, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "_stderr_is_terminal", lambda: True)
    bar = progress(iter(range(5)), desc="Epoch 1", total=5)
    assert bar.mode == "tqdm"
    out = []
    for i in bar:
        bar.set_postfix(loss=1.0)
        out.append(i)
    assert out == list(range(5))
    assert not [r for r in lgkd_records.records if r.name == LOGGER_NAME]


def test_progress_silent_on_other_ranks(lgkd_records, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "get_rank", lambda: 1)
    bar = progress(range(10), desc="Evaluation")
    bar.set_postfix(loss=1.0)
    assert list(bar) == list(range(10))
    assert not lgkd_records.records


def test_progress_unknown_length(lgkd_records) -> None:
    assert list(progress((i for i in range(3)), desc="Scan")) == [0, 1, 2]
    lines = [r.getMessage() for r in lgkd_records.records]
    assert lines == [lines[0]] and lines[0].startswith("Scan: 3,")
