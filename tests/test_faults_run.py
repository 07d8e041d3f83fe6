"""Faults and reruns of one step, through the real entry point (``run.main``, what ``python run.py`` calls).

A rerun never loses or redoes finished work, options that shape training are compared with those a
checkpoint was written with, every checkpoint problem is a clear error found before the data scan, writes
fail with the path and the real errno and keep the previous state, a second run of the same step is
refused, and concurrent results writers never lose a row. Faults are real files on disk, real
locks held by another open file, and OSErrors with a real errno raised at the real write call. Real
signals, a real full file system and real concurrent processes are in ``test_faults_run_slow.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import multiprocessing
import os
import pickle
import shutil
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

import run
from argparser import get_argparser, modify_command_options
from tests.conftest import run_argv
from tests.test_cli_errors import tiny_voc_tree
from training_options import FREE_OPTIONS, option_differences, stored_options
from utils import checkpoint as ckpt_mod
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import OutputError
from utils.filelock import FileLock, owner_description
from utils.logger import Logger, remove_handlers
from utils.results import write_results_row

NAME = "faults"


def argv(root: Path, out: Path, step: int = 0, **extra: str) -> list[str]:
    options = {
        "--backbone": "resnet18",
        "--crop_size": "32",
        "--batch_size": "2",
        "--epochs": "1",
        "--num_workers": "0",
        "--name": NAME,
        "--date": "d",
        "--lr": "0.01" if step == 0 else "0.001",
        **extra,
    }
    flags = ("--overlap", "--no_pretrained", "--no_progress", "--method", "LGKD")
    return run_argv(root, out, step, options, flags)


def paths(out: Path, step: int) -> tuple[Path, Path, Path]:
    """(checkpoint, _last.pth, results CSV) of ``step``."""
    ckpt = out / "ckpt" / f"15-5s-voc_{NAME}_{step}.pth"
    return ckpt, ckpt.with_name(ckpt.stem + "_last.pth"), out / "results" / "d_voc_15-5s_faults.csv"


def main_ok(args: list[str], capsys) -> str:
    code = run.main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    return captured.out + captured.err


def main_error(args: list[str], capsys, *needles: str, code: int = 2) -> str:
    result = run.main(args)
    err = capsys.readouterr().err
    assert result == code, err[-3000:]
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in:\n{err}"
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A data tree and an output folder where steps 0 and 1 finished (one epoch each)."""
    base = tmp_path_factory.mktemp("faults")
    root, out = tiny_voc_tree(base / "voc"), base / "out"
    for step in (0, 1):
        assert run.main(argv(root, out, step)) == 0
    remove_handlers()
    return root, out


@pytest.fixture()
def done(trained, tmp_path) -> tuple[Path, Path]:
    """A private copy of the finished experiment."""
    root, template = trained
    out = tmp_path / "out"
    # Hard links: run.py replaces files (new inodes) and tests rewrite them with save(), never in place.
    shutil.copytree(template, out, copy_function=os.link)
    return root, out


@pytest.fixture()
def no_scan(monkeypatch):
    """Fail the test if the run reaches the data set scan."""

    def scan(opts):
        raise AssertionError("the data set was scanned")

    monkeypatch.setattr(run, "build_datasets", scan)


def fail_writes_under(monkeypatch, directory: Path, code: int, after_bytes: int = 0) -> None:
    """Make writes into files opened (by ``os.fdopen``, as the atomic writers do) under ``directory`` fail
    with ``OSError(code)`` once ``after_bytes`` were written: the fault happens at the real write call."""
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, handle):
            self.handle, self.written = handle, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.written += len(data)
            if self.written > after_bytes:
                raise OSError(code, os.strerror(code))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def fdopen(fd, *args, **kwargs):
        handle = real_fdopen(fd, *args, **kwargs)
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
        return Failing(handle) if directory.resolve() in target.parents else handle

    monkeypatch.setattr(os, "fdopen", fdopen)


def temp_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".write-test")]


# ---------------------------------------------------------------------------------------------- section 1
def test_finished_step_exits_without_work_and_rewrites_its_missing_row(done, capsys, no_scan):
    root, out = done
    ckpt, last, csv = paths(out, 1)
    stamp, rows = ckpt.stat().st_mtime_ns, csv.read_text()
    text = main_ok(argv(root, out, 1), capsys)
    assert "Step 1 already finished" in text and "Nothing to do" in text
    assert ckpt.stat().st_mtime_ns == stamp and csv.read_text() == rows
    # A lost CSV: the rows come back from the scores stored in the checkpoints, identical.
    csv.unlink()
    for step in (0, 1):
        assert "was written to" in main_ok(argv(root, out, step), capsys)
    assert csv.read_text() == rows
    # Options that do not shape training may differ freely.
    other = argv(root, out, 1, **{"--num_workers": "1", "--logdir": str(out / "elsewhere")})
    assert "already finished" in main_ok([*other, "--debug"], capsys)


def test_finished_step_with_other_training_options_is_refused(done, capsys, no_scan):
    root, out = done
    cases = {
        "--lr": ("0.002", "--lr: 0.001 -> 0.002"),
        "--epochs": ("3", "--epochs: 1 -> 3"),
        "--batch_size": ("3", "--batch_size x processes: 2 (2 x 1) -> 3 (3 x 1)"),
        "--crop_size": ("48", "--crop_size: 32 -> 48"),
        "--random_seed": ("7", "--random_seed: 42 -> 7"),
        "--prev_kd": ("5", "--prev_kd: 10.0 -> 5.0"),
        "--weight_decay": ("0.001", "--weight_decay: 0.0001 -> 0.001"),
        "--val_interval": ("5", "--val_interval: 60 -> 5"),
    }
    for flag, (value, listed) in cases.items():
        main_error(
            argv(root, out, 1, **{flag: value}), capsys, "Step 1 already finished", listed, "--no_resume"
        )
    # A --method preset: its resolved values are listed, attributed to the flag that set them.
    err = main_error(argv(root, out, 1) + ["--method", "MiB"], capsys, "--method: LGKD -> MiB")
    assert "--unkd: False -> True (set by --method MiB)" in err
    assert "--lgkd: True -> False (old value set by --method LGKD)" in err
    main_error(argv(root, out, 1) + ["--fix_bn"], capsys, "--fix_bn: False -> True")


def _changed_value(
    parser: argparse.ArgumentParser, base_args: list[str], action: argparse.Action, current: object
) -> list[str] | None:
    """Command-line words the parser accepts that give ``action`` a value other than ``current``."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # store_true / store_false
        candidates = [[flag]]
    elif action.choices:
        candidates = [[flag, str(choice)] for choice in action.choices if choice != current]
    else:
        numbers = []
        if isinstance(current, int | float) and not isinstance(current, bool):
            numbers = [current * 2, current + 1, current / 2]
        values = [*numbers, 3, 0.5, 1, "median", '{"switch": {}}', "other_value"]
        candidates = [[flag, str(value)] for value in values]
        if action.nargs == "+":
            candidates.insert(0, [flag, "1", "3"])
    for words in candidates:
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                value = getattr(parser.parse_args([*base_args, *words]), action.dest)
        except SystemExit:
            continue
        if value != current:
            return words
    return None


def test_every_parser_option_is_compared_unless_declared_free():
    """The rule over all options: changing any one is reported (by its flag) unless it is in FREE_OPTIONS."""
    parser = get_argparser()
    base_args = ["--dataset", "voc", "--task", "15-5s", "--step", "1"]
    base = modify_command_options(parser.parse_args(base_args))
    stored = stored_options(base)
    compared = free = 0
    for action in parser._actions:
        if action.dest in ("help", "method", "dataset", "task", "step", "num_classes"):
            continue
        words = _changed_value(parser, base_args, action, getattr(base, action.dest))
        assert words is not None, f"no test value for {action.dest}"
        changed = modify_command_options(parser.parse_args([*base_args, *words]))
        differences = option_differences(stored, 1, changed, 1)
        if action.dest in FREE_OPTIONS:
            free += 1
            assert differences == [], (action.dest, differences)
        else:
            compared += 1
            assert any(d.startswith(f"{words[0]}") or "processes" in d for d in differences), (
                action.dest,
                differences,
            )
    assert compared > 80 and free > 25
    # The global batch, not the per-process batch, with synchronised batch-norm; same global batch on more
    # processes is the same training.
    two = modify_command_options(parser.parse_args([*base_args, "--batch_size", "2"]))
    assert option_differences(stored_options(two), 2, base, 1) == []
    assert option_differences(stored_options(two), 1, base, 1) == [
        "--batch_size x processes: 2 (2 x 1) -> 4 (4 x 1)"
    ]
    unsynced = modify_command_options(parser.parse_args([*base_args, "--norm_act", "std"]))
    two_std = modify_command_options(
        parser.parse_args([*base_args, "--norm_act", "std", "--batch_size", "2"])
    )
    assert option_differences(stored_options(two_std), 2, unsynced, 1) == ["--batch_size: 2 -> 4"]
    # Options the checkpoint does not record (older code) are compared with their default.
    old = {k: v for k, v in stored.items() if k != "pooling"}
    pooled = modify_command_options(parser.parse_args([*base_args, "--pooling", "16"]))
    assert option_differences(old, 1, base, 1) == []
    assert "not recorded" in option_differences(old, 1, pooled, 1)[0]


def test_resume_with_other_options_is_refused_then_resumes(done, capsys, no_scan, monkeypatch):
    root, out = done
    ckpt, last, csv = paths(out, 1)
    shutil.copy(ckpt, last)  # an interrupted step: its state after epoch 1
    err = main_error(
        argv(root, out, 1, **{"--lr": "0.01"}), capsys, "holds an interrupted training of step 1"
    )
    assert "--lr: 0.001 -> 0.01" in err and "pass --no_resume to start step 1 over" in err
    assert last.is_file()
    monkeypatch.undo()
    text = main_ok(argv(root, out, 1), capsys)
    assert "Resuming step 1" in text and not last.exists()
    assert csv.read_text().count("\n1,") == 1


def test_results_row_is_written_before_the_resumable_state_goes(done, capsys, monkeypatch):
    root, out = done
    ckpt, last, csv = paths(out, 1)
    shutil.copy(ckpt, last)
    csv.unlink()
    fail_writes_under(monkeypatch, csv.parent, errno.ENOSPC)
    err = main_error(
        argv(root, out, 1),
        capsys,
        str(csv),
        "No space left on device (ENOSPC)",
        "rerun the same command",
        "--test",
        str(last),
    )
    assert "Traceback" not in err
    assert last.is_file() and not csv.exists() and temp_files(out) == []
    monkeypatch.undo()
    main_ok(argv(root, out, 1), capsys)
    assert csv.read_text().startswith("1,") and not last.exists()


def test_test_run_keeps_the_training_opts_json(done, capsys):
    root, out = done
    opts_json = out / "logs" / "15-5s-voc" / NAME / "step1" / "opts.json"
    before = opts_json.read_bytes()
    recorded = json.loads(before)
    assert recorded["run"]["world_size"] == 1 and recorded["run"]["device"] == "cpu"
    assert recorded["lr"] == 0.001 and recorded["lgkd"] is True
    main_ok(argv(root, out, 1) + ["--test"], capsys)
    assert opts_json.read_bytes() == before
    tested = json.loads((opts_json.parent / "opts_test.json").read_text())
    assert tested["test"] is True and tested["run"]["evaluated"].endswith("_1.pth")


def test_reference_checkpoint_without_stored_score_is_evaluated_for_its_row(done, capsys):
    root, out = done
    ckpt, _, csv = paths(out, 0)
    rows = csv.read_text().splitlines()
    reference = {k: v for k, v in load_checkpoint(ckpt).items() if k not in ("options", "score", "run_id")}
    save_checkpoint(reference, ckpt)  # a new file: the template is hard-linked
    csv.unlink()
    text = main_ok(argv(root, out, 0), capsys)
    assert "records no training options" in text and "evaluating it" in text
    assert csv.read_text().splitlines() == rows[:1]


def test_step_trained_from_another_previous_model_is_refused(done, capsys, no_scan):
    root, out = done
    step0 = paths(out, 0)[0]
    retrained = load_checkpoint(step0)
    retrained["run_id"] = "another-training"
    save_checkpoint(retrained, step0)
    main_error(argv(root, out, 1), capsys, "trained from another step-0 model", "--no_resume")


# ---------------------------------------------------------------------------------------------- section 3
def test_ckpt_paths_are_checked(done, capsys, no_scan):
    root, out = done
    main_error(
        argv(root, out, 1, **{"--ckpt": str(out / "nope.pth")}), capsys, "does not exist", "--step_ckpt"
    )
    main_error(argv(root, out, 1, **{"--ckpt": str(out)}), capsys, "is a directory")
    main_error(argv(root, out, 1, **{"--step_ckpt": str(out / "ckpt")}), capsys, "is a directory")
    main_error(argv(root, out, 1, **{"--ckpt": str(out / "ckpt")}) + ["--test"], capsys, "is a directory")


def test_ckpt_without_training_state_explains_the_three_flags(done, capsys, no_scan):
    root, out = done
    model_only = out / "model_only.pth"
    torch.save({"model_state": load_checkpoint(paths(out, 1)[0])["model_state"]}, model_only)
    main_error(
        argv(root, out, 1, **{"--ckpt": str(model_only)}),
        capsys,
        "'epoch', 'optimizer_state', 'scheduler_state'",
        "--step_ckpt",
        "--test --ckpt",
    )


@pytest.mark.parametrize(
    ("entry", "value", "needle"),
    [
        ("epoch", "3", "'epoch' is a str"),
        ("optimizer_state", [1, 2], "'optimizer_state' is a list"),
        ("model_state", [1, 2], "'model_state' is a list"),
        ("trainer_state", "x", "'trainer_state' is a str"),
        ("best_score", True, "'best_score' is a bool"),
        ("options", [1], "'options' is a list"),
    ],
)
def test_checkpoint_entries_of_unexpected_types(done, capsys, no_scan, entry, value, needle):
    root, out = done
    ckpt, last, _ = paths(out, 1)
    state = load_checkpoint(ckpt)
    state[entry] = value
    torch.save(state, last)
    main_error(argv(root, out, 1), capsys, str(last), needle)


def test_model_state_with_non_tensor_values(done, capsys, no_scan):
    root, out = done
    ckpt, last, _ = paths(out, 1)
    state = load_checkpoint(ckpt)
    state["model_state"] = {**state["model_state"], "module.cls.0.weight": "oops"}
    torch.save(state, last)
    main_error(argv(root, out, 1), capsys, "not a model state dict", "'module.cls.0.weight': str")


@pytest.mark.parametrize(
    ("entry", "value"),
    [
        ("optimizer_state", {"state": {}, "param_groups": [{"params": [0]}]}),
        ("scheduler_state", {"last_epoch": "three", "base_lrs": [0.1]}),
        ("rng_state", [{"python": 3}]),
    ],
)
def test_sub_state_that_does_not_load_is_a_checkpoint_error(done, capsys, entry, value):
    """Whatever a sub-state's load_state_dict raises becomes one message naming the file and the entry."""
    root, out = done
    ckpt, last, _ = paths(out, 1)
    state = load_checkpoint(ckpt)
    state[entry] = value
    torch.save(state, last)
    main_error(argv(root, out, 1), capsys, str(last), f"'{entry}' entry does not fit this run")


class _Reduce:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


class _Object:
    def __init__(self):
        self.x = 1


def _pickles() -> dict[str, bytes]:
    cases = {}
    for name, payload in (("reduce", _Reduce()), ("object", _Object())):
        for protocol in (2, 4):
            buffer = io.BytesIO()
            torch.save({"model_state": payload}, buffer, pickle_protocol=protocol)
            cases[f"torch-{name}-p{protocol}"] = buffer.getvalue()
        cases[f"raw-{name}"] = pickle.dumps({"model_state": payload}, protocol=2)
        buffer = io.BytesIO()
        torch.save({"model_state": payload}, buffer, _use_new_zipfile_serialization=False)
        cases[f"legacy-{name}"] = buffer.getvalue()
    return cases


@pytest.mark.parametrize("case", sorted(_pickles()))
def test_pickle_that_would_run_code_is_refused_as_such(tmp_path, case, capfd):
    path = tmp_path / f"{case}.pth"
    path.write_bytes(_pickles()[case])
    with pytest.raises(ckpt_mod.CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert message.startswith(f"Refused to load {path}: it contains code or objects that are not allowed")
    assert "most likely truncated" not in message
    assert "pwned" not in capfd.readouterr().out


def test_random_bytes_are_still_reported_as_corrupt(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(20):
        path = tmp_path / f"junk{i}.pth"
        path.write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
        with pytest.raises(ckpt_mod.CheckpointError, match="truncated or corrupt"):
            load_checkpoint(path)


def test_checkpoint_compatibility_is_checked_before_the_data_scan(done, capsys, no_scan):
    root, out = done
    step1 = str(paths(out, 1)[0])
    # Step 1's model given as the previous step of step 1, or evaluated as step 2: classes do not match.
    main_error(argv(root, out, 1, **{"--step_ckpt": step1, "--name": "other"}), capsys, step1, "classifiers")
    main_error(argv(root, out, 2, **{"--ckpt": step1}) + ["--test"], capsys, "classifiers")
    # Another backbone, resuming.
    main_error(
        argv(root, out, 1, **{"--backbone": "resnet34", "--ckpt": step1}), capsys, "different backbone"
    )


# ---------------------------------------------------------------------------------------------- section 5
def test_stray_temporary_files_of_a_killed_run_are_removed(done, capsys):
    root, out = done
    ckpt, last, csv = paths(out, 1)
    strays = [
        ckpt.parent / f".{ckpt.name}.k1ll3d00.tmp",
        ckpt.parent / f".{last.name}.k1ll3d01.tmp",
        csv.parent / f".{csv.name}.k1ll3d02.tmp",
        out / "logs" / "15-5s-voc" / NAME / "step1" / ".opts.json.k1ll3d03.tmp",
    ]
    for stray in strays:
        stray.write_bytes(b"half")
    keep = ckpt.parent / f".{paths(out, 0)[0].name}.other.tmp"  # another step's: not ours to remove
    keep.write_bytes(b"x")
    main_ok(argv(root, out, 1), capsys)
    assert not any(p.exists() for p in strays) and keep.exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO])
def test_failed_checkpoint_write_names_path_and_errno_and_keeps_the_previous_state(
    done, capsys, monkeypatch, code
):
    """The real write call (torch.save writing into the temporary file) fails with the real errno."""
    root, out = done
    ckpt, last, csv = paths(out, 1)
    shutil.copy(ckpt, last)  # resumable state after epoch 1; the run trains epoch 2 and saves
    before = last.read_bytes()
    fail_writes_under(monkeypatch, ckpt.parent, code, after_bytes=100_000)
    err = main_error(
        argv(root, out, 1, **{"--epochs": "2"}) + ["--no_resume"],
        capsys,
        f"({errno.errorcode[code]})",
        "Could not write the checkpoint",
        "rerun the same command",
    )
    assert str(last) in err or str(ckpt) in err
    assert last.read_bytes() == before and temp_files(out) == []


@pytest.mark.parametrize("code", [errno.ENAMETOOLONG, errno.EACCES, errno.EROFS])
def test_failed_temporary_file_creation(done, capsys, monkeypatch, code):
    root, out = done

    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs["dir"]) == out / "ckpt":
            raise OSError(code, os.strerror(code), kwargs.get("dir"))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    err = main_error(argv(root, out, 1) + ["--no_resume"], capsys, f"({errno.errorcode[code]})", "_last.pth")
    assert "training had not started" in err


def test_log_file_write_failure_is_one_line_and_the_run_goes_on(tmp_path, capsys):
    log = Logger(tmp_path, rank=0, summary=False)
    handler = next(h for h in log.logger.handlers if hasattr(h, "baseFilename"))

    def full(data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    handler.stream.write = full
    for i in range(3):
        log.info(f"line {i}")
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "(ENOSPC)" in err and "Traceback" not in err
    log.close()
    remove_handlers()


def test_output_names_too_long_are_refused_before_any_work(tmp_path, capsys, no_scan):
    root = tiny_voc_tree(tmp_path / "voc")
    out = tmp_path / "out"
    main_error(argv(root, out, 0, **{"--name": "n" * 240}), capsys, "--name", "255 bytes")
    main_error(argv(root, out, 0, **{"--date": "d" * 250}), capsys, "--date")
    assert not any((out / d).exists() for d in ("ckpt", "logs", "results"))


def test_second_run_of_a_step_is_refused_naming_the_first(done, capsys, no_scan):
    root, out = done
    lock_path = out / "ckpt" / f"15-5s-voc_{NAME}_1.lock"
    holder = FileLock(lock_path, blocking=False, owner=owner_description())
    holder.acquire()
    try:
        err = main_error(argv(root, out, 1), capsys, "already being trained by another run")
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in err and str(lock_path) in err
    finally:
        holder.release()
    # A lock file left by a crashed run is stale: nobody holds it, the next run goes on and removes it.
    lock_path.write_text("garbage of a killed run")
    main_ok(argv(root, out, 1), capsys)
    assert not lock_path.exists()


def _write_rows(args: tuple[str, int, int]) -> None:
    path, step, repeats = args
    for i in range(repeats):
        write_results_row(path, step, [str(step), str(i), f"0.{step}"])


def test_concurrent_writers_of_different_steps_never_lose_a_row(tmp_path):
    path = str(tmp_path / "results" / "x.csv")
    steps = 6
    with multiprocessing.get_context("fork").Pool(steps) as pool:
        pool.map(_write_rows, [(path, step, 40) for step in range(steps)])
    lines = Path(path).read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [str(s) for s in range(steps)]
    assert all(line.split(",")[1] == "39" for line in lines)
    assert sorted(p.name for p in Path(path).parent.iterdir()) == ["x.csv"]  # no lock or temp file left


def test_results_write_failure_is_an_output_error_with_errno(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    write_results_row(path, 0, ["0", "1"])

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError, match=r"No space left on device \(ENOSPC\)") as info:
        write_results_row(path, 1, ["1", "2"])
    assert str(path) in str(info.value) and "previous content is intact" in str(info.value)
    assert path.read_text() == "0,1\n"


def test_previous_step_trainer_state_that_does_not_fit_the_regulariser(done, capsys):
    root, out = done
    step0 = load_checkpoint(paths(out, 0)[0])
    step0["trainer_state"] = {"regularizer": {"name": "ewc", "fisher": ["not", "a", "dict"]}}
    broken = out / "step0_broken.pth"
    torch.save(step0, broken)
    args = argv(root, out, 1, **{"--step_ckpt": str(broken), "--name": "ewc"}) + ["--method", "EWC"]
    main_error(args, capsys, str(broken), "'trainer_state' entry does not fit this run")
