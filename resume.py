"""A step's files on disk and what they mean for the next run, decided before any work.

One training step owns, in ``--checkpoint``:

* ``{task}-{dataset}_{name}_{step}.pth``: its best model (the reference's name and format, what the next step
  loads), written at each validation that improves the mIoU;
* ``{task}-{dataset}_{name}_{step}_last.pth``: its resumable state, written when training starts and after
  every epoch, removed only once the results row is written. **A step is finished when its ``.pth`` exists
  and its ``_last.pth`` does not**;
* ``{task}-{dataset}_{name}_{step}.lock``: held by the run training it (:mod:`utils.filelock`).

Every checkpoint this project writes records the resolved options (``options``), the number of
processes (``world_size``), an identifier of the training run (``run_id``) and the identity of the previous
step's model it started from (``previous_step``); the best checkpoint also holds its score (``score``), so
a missing results row can be rewritten without evaluating. :func:`inspect_checkpoints` loads the files a
run will use, checks them against a model built on the ``meta`` device (no memory, no random numbers) and
against this command's options (:mod:`training_options`), and returns a :class:`StepPlan` -- all
before the data set is scanned, so a wrong file or option costs seconds.

Files without recorded options (the reference's, or older versions') cannot be compared: a finished step's
checkpoint is then taken as its result, and resuming goes on with this command's options; the log says so.

The same files seen from ``run.py``'s stages: :func:`preflight` checks names and paths before anything
else, :func:`skip_finished_step` ends a finished step, :class:`StepState` is what the epoch loop tracks,
:func:`restore_state` loads a resumed run's state, :func:`save_last_epoch` and :func:`save_best_checkpoint`
write the two checkpoints, and :func:`write_row` the step's results row.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

import tasks
from argparser import save_options
from segmentation_module import make_model
from training_options import option_differences, stored_options
from utils import distributed as dist_utils
from utils.checkpoint import (
    MODEL_ENTRIES,
    RESUME_ENTRIES,
    check_entries,
    check_model_state,
    check_same_layout,
    checkpoint_dict,
    load_checkpoint,
    load_model_state,
    load_optimizer_state,
    loading_entry,
    rng_state,
    save_checkpoint,
)
from utils.errors import CheckpointError, DatasetError, OptionsError, OutputError
from utils.filelock import FileLock, LockHeld, describe_owner, owner_description
from utils.files import TEMP_NAME_EXTRA, describe_os_error, remove_stray_temp_files
from utils.interrupt import RunProgress
from utils.logger import Logger
from utils.results import (
    format_results_row,
    remove_stray_results_temp_files,
    results_csv_path,
    results_steps,
    write_results_row,
)

if TYPE_CHECKING:
    from train import Trainer


# ---------------------------------------------------------------------------------------------- paths
def step_checkpoint_path(opts: Any, step: int) -> Path:
    """The reference's checkpoint name: ``{checkpoint}/{task}-{dataset}_{name}_{step}.pth``."""
    return Path(opts.checkpoint) / f"{opts.task}-{opts.dataset}_{opts.name}_{step}.pth"


def last_epoch_checkpoint_path(opts: Any) -> Path:
    """Resumable state of this step (written from the start of training, removed once it finished)."""
    return Path(opts.checkpoint) / f"{opts.task}-{opts.dataset}_{opts.name}_{opts.step}_last.pth"


def step_lock_path(opts: Any) -> Path:
    return Path(opts.checkpoint) / f"{opts.task}-{opts.dataset}_{opts.name}_{opts.step}.lock"


def log_directory(opts: Any) -> Path:
    return Path(opts.logdir) / f"{opts.task}-{opts.dataset}" / opts.name / f"step{opts.step}"


def options_file(opts: Any) -> Path:
    """``opts.json`` of a training run; ``opts_test.json`` for ``--test``, which must not replace it."""
    return log_directory(opts) / ("opts_test.json" if opts.test else "opts.json")


def results_path(opts: Any) -> Path:
    return results_csv_path(opts.results_dir, opts.date, opts.dataset, opts.task, opts.name)


def previous_step_path(opts: Any) -> Path:
    return Path(opts.step_ckpt) if opts.step_ckpt else step_checkpoint_path(opts, opts.step - 1)


def launch_rank() -> int:
    """This process's global rank as the launcher set it (usable before the process group exists)."""
    return int(os.environ.get("RANK", "0"))


def planned_world_size() -> int:
    """Number of processes of this run as the launcher set it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def say(message: str) -> None:
    """A line before the logger exists (rank 0 of the launch only)."""
    if launch_rank() == 0:
        print(f"[LGKD] {message}", flush=True)


# ---------------------------------------------------------------------------------------------- names
def _limit(directory: Path, name: str, default: int) -> int:
    """``pathconf`` limit of the nearest existing ancestor of ``directory``."""
    probe = directory.absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, name)
    except (OSError, ValueError):
        return default


def output_names(opts: Any) -> list[tuple[Path, int]]:
    """Every file the run creates, with the characters its temporary file adds to the name."""
    files = [(results_path(opts), TEMP_NAME_EXTRA), (options_file(opts), TEMP_NAME_EXTRA)]
    files.append((log_directory(opts) / "log.txt", 0))
    if not opts.test:
        files += [
            (step_checkpoint_path(opts, opts.step), TEMP_NAME_EXTRA),
            (last_epoch_checkpoint_path(opts), TEMP_NAME_EXTRA),
            (step_lock_path(opts), 0),
        ]
    return files


def check_name_lengths(opts: Any) -> None:
    """Refuse, before any work, output names longer than their file system allows (with the temporary
    file's ``.NAME.XXXXXXXX.tmp``), which would otherwise fail at the first save, after an epoch.

    Raises:
        OptionsError: naming the file, its length, the limit and the option to shorten.
    """
    for path, extra in output_names(opts):
        name_max = _limit(path.parent, "PC_NAME_MAX", 255)
        for component in path.parts[1:] if path.is_absolute() else path.parts:
            is_file = component == path.name
            length = len(component.encode()) + (extra if is_file else 0)
            if length <= name_max:
                continue
            parts = [f for f, v in (("--date", opts.date), ("--name", opts.name)) if v and v in component]
            culprit = " and ".join(parts) or "the --checkpoint, --logdir or --results_dir path"
            raise OptionsError(
                f"The output name {component!r} is {length} bytes long"
                f"{' with its temporary-file prefix and suffix' if extra and is_file else ''}, more than the "
                f"{name_max} bytes the file system allows (in {path.parent}). It is built from {culprit}: "
                "shorten it."
            )
        path_max = _limit(path.parent, "PC_PATH_MAX", 4096)
        if len(str(path.absolute()).encode()) + extra >= path_max:
            raise OptionsError(
                f"The output path {path} is longer than the {path_max} bytes the system allows. Use shorter "
                "--checkpoint, --logdir or --results_dir folders, or a shorter --name."
            )


# ---------------------------------------------------------------------------------------------- checks
def check_safe_name(value: str, flag: str) -> None:
    """File names built from --name / --date must stay inside the output folders."""
    if not value and flag == "--name":
        raise OptionsError("--name is empty. Give the experiment a name, e.g. --name LGKD.")
    bad = ("/" in value) or ("\\" in value) or ("\x00" in value) or value in (".", "..") or ".." in value
    if bad:
        raise OptionsError(
            f"{flag} {value!r} contains a path separator or '..'. It is used to build file names inside "
            f"--checkpoint, --logdir and --results_dir and must not point outside them; use a plain name "
            "such as LGKD_run1."
        )


def ensure_writable(directory: Path, flag: str) -> None:
    """Create ``directory`` and check that a file can be written in it (an anonymous temporary file, so
    nothing is left behind even if the process is killed right then)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OptionsError(
            f"Cannot write to {directory} ({flag}): {describe_os_error(err)}. Choose a writable folder with "
            f"{flag} or fix its permissions."
        ) from None


def _not_a_file(path: Path, flag: str) -> str | None:
    if path.is_dir():
        return f"{flag} {path} is a directory, not a checkpoint file: pass the .pth file itself."
    if not path.is_file():
        return f"{flag} {path} does not exist."
    return None


def preflight(opts: Any) -> None:
    """Checks that need no data and no model, so bad input fails in a second and writes nothing."""
    check_safe_name(opts.name, "--name")
    check_safe_name(opts.date, "--date")
    if opts.test:
        path = Path(opts.ckpt) if opts.ckpt else step_checkpoint_path(opts, opts.step)
        problem = _not_a_file(path, "--ckpt" if opts.ckpt else "The checkpoint of this step,")
        if problem:
            raise CheckpointError(
                f"--test needs the checkpoint to evaluate: {problem} Pass it with --ckpt (e.g. a released "
                "model such as 15-x-voc.pth) or train the step first."
            )
    elif opts.ckpt is not None:
        problem = _not_a_file(Path(opts.ckpt), "--ckpt")
        if problem:
            raise CheckpointError(
                f"{problem} When training, --ckpt names a checkpoint to resume this step from (it must "
                "exist; an interrupted step resumes by itself from its _last.pth without --ckpt). To start "
                f"step {opts.step} from the previous step's model use --step_ckpt; to evaluate a model use "
                "--test --ckpt FILE."
            )
    if not opts.test and opts.step > 0 and not opts.debug:
        path = previous_step_path(opts)
        if path.is_dir():
            raise CheckpointError(
                f"--step_ckpt {path} is a directory, not a checkpoint file: pass the previous step's .pth "
                "file."
            )
        if not path.is_file():
            raise CheckpointError(
                f"Step {opts.step} starts from the model of step {opts.step - 1}, but {path} does not exist. "
                f"Run step {opts.step - 1} first with the same --name, --task and --checkpoint, or point "
                "--step_ckpt to the previous step's checkpoint (e.g. a released step-0 model)."
            )
    if not (Path(opts.data_root).is_dir()):
        raise DatasetError(
            f"--data_root {opts.data_root} does not exist. Point it to the folder that holds the dataset "
            "(VOC: the folder containing PascalVOC2012/, see data/download_voc.sh; ADE: the folder "
            "containing ADEChallengeData2016/, see data/download_ade.sh; S3DIS / ScanNet: the folder "
            "containing S3DIS/ or ScanNet/, prepared with data/prepare_3d.py; or make a synthetic one with "
            "python data/make_synthetic.py)."
        )
    check_name_lengths(opts)


# ---------------------------------------------------------------------------------------------- lock
def _missing_ancestors(directory: Path) -> list[Path]:
    missing = []
    probe = directory.absolute()
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    return missing  # deepest first


@contextlib.contextmanager
def step_guard(opts: Any) -> Iterator[None]:
    """While a training run lives: hold the step lock (rank 0), after removing temporary files that a
    killed run of this step left. On failure, folders this guard created are removed again if empty, so
    refused input leaves nothing behind. ``--test`` runs and other ranks hold nothing.

    Raises:
        OutputError: another run trains this step (named), or the lock cannot be created.
        OptionsError: ``--checkpoint`` cannot be created.
    """
    if opts.test or launch_rank() != 0:
        yield
        return
    directory = Path(opts.checkpoint)
    created = _missing_ancestors(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OptionsError(
            f"Cannot write to {directory} (--checkpoint): {describe_os_error(err)}. Choose a writable folder "
            "with --checkpoint or fix its permissions."
        ) from None
    lock_path = step_lock_path(opts)
    lock = FileLock(lock_path, blocking=False, owner=owner_description())
    succeeded = False
    try:
        try:
            lock.acquire()
        except LockHeld:
            raise OutputError(
                f"Step {opts.step} of {opts.task}-{opts.dataset} '{opts.name}' is already being trained by "
                f"another run ({describe_owner(lock_path)}); both would write "
                f"{step_checkpoint_path(opts, opts.step)}. Wait for it to end or stop it, or use another "
                f"--name or --checkpoint. The lock {lock_path} is released when that process ends, even if "
                "it crashes."
            ) from None
        except OSError as err:
            raise OutputError(
                f"Could not create the lock file {lock_path}: {describe_os_error(err)}. Make --checkpoint "
                f"{directory} writable, or choose another folder."
            ) from err
        for path in (step_checkpoint_path(opts, opts.step), last_epoch_checkpoint_path(opts)):
            remove_stray_temp_files(path)
        remove_stray_temp_files(options_file(opts))
        remove_stray_results_temp_files(results_path(opts))
        yield
        succeeded = True
    finally:
        lock.release()
        if not succeeded:
            for folder in created:
                with contextlib.suppress(OSError):
                    folder.rmdir()


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class StepPlan:
    """What :func:`inspect_checkpoints` found; the loaded dicts are reused, files are read once."""

    finished: bool = False
    final: dict | None = None  # the finished step's checkpoint (memory-mapped)
    previous: dict | None = None  # step-1 model (training at step > 0)
    previous_identity: str | None = None
    resume: dict | None = None  # state to resume from (--ckpt or this step's _last.pth)
    resume_path: Path | None = None
    test_model: dict | None = None  # --test: the checkpoint to evaluate (memory-mapped)
    test_path: Path | None = None
    notes: list[str] = field(default_factory=list)  # for the log, once it exists


def checkpoint_identity(ckpt: Mapping[str, Any]) -> str | None:
    """What identifies the model in a checkpoint: its training run's ``run_id``, or for files without one
    (the reference's released models) its epoch and best score. None if neither is known."""
    run_id = ckpt.get("run_id")
    if isinstance(run_id, str):
        return run_id
    epoch, best = ckpt.get("epoch"), ckpt.get("best_score")
    try:
        return f"epoch {int(epoch)}, best score {float(best)!r}"
    except (TypeError, ValueError):
        return None


class MetaModels:
    """Models of each step built on the ``meta`` device: shapes only, no memory, no random numbers
    consumed (the real models are built later, in the reference's order)."""

    def __init__(self, opts: Any) -> None:
        self.opts = argparse.Namespace(**{**vars(opts), "no_pretrained": True})
        self._models: dict[int, nn.Module] = {}

    def __call__(self, step: int) -> nn.Module:
        if step not in self._models:
            classes = tasks.get_per_task_classes(self.opts.dataset, self.opts.task, step)
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                self._models[step] = make_model(self.opts, classes=classes)
        return self._models[step]


def load_model_file(
    path: Path, fix: str, entries: tuple[str, ...] = MODEL_ENTRIES, mmap: bool = True
) -> dict[str, Any]:
    """Load a checkpoint whose model this run uses, with the entries that use needs (the one check that a
    file holds a ``model_state``). Memory-mapped by default: inspecting a large file costs no memory.

    Args:
        path: the file.
        fix: the sentence telling the user what to pass instead.
        entries: the entries the use needs (:data:`utils.checkpoint.RESUME_ENTRIES` to resume).
        mmap: memory-map the tensors.

    Raises:
        CheckpointError: unreadable, unsafe, or without the entries.
    """
    ckpt = load_checkpoint(path, mmap=mmap)
    check_entries(ckpt, entries, str(path), fix)
    return ckpt


RESUME_FIX = (
    "--ckpt resumes an interrupted training of this step from a checkpoint that holds its optimizer and "
    "scheduler state (a *_last.pth, or a checkpoint this step wrote). To start step {step} from the previous "
    "step's model use --step_ckpt FILE; to evaluate a model use --test --ckpt FILE."
)


def inspect_checkpoints(opts: Any, world_size: int) -> StepPlan:
    """Load and check every checkpoint this run will use, and decide whether the step is finished.

    Training: the previous step's model (step > 0), this step's finished checkpoint (unless ``--ckpt`` or
    ``--no_resume``), otherwise the state to resume from (``--ckpt``, or ``_last.pth`` unless
    ``--no_resume``). ``--test``: the checkpoint to evaluate.

    Raises:
        CheckpointError: a file that is unreadable, of another task/step/backbone, of unexpected layout, or
            trained from another previous-step model.
        OptionsError: the options that shape training differ from those the file was written with.
    """
    plan = StepPlan()
    models = MetaModels(opts)
    if opts.test:
        path = Path(opts.ckpt) if opts.ckpt else step_checkpoint_path(opts, opts.step)
        ckpt = load_model_file(path, "Pass a model checkpoint of this step with --ckpt.")
        check_model_state(models(opts.step), ckpt["model_state"], strict=True, source=str(path))
        plan.test_model, plan.test_path = ckpt, path
        return plan
    if opts.step > 0:
        _inspect_previous(opts, plan, models)
    final, last = step_checkpoint_path(opts, opts.step), last_epoch_checkpoint_path(opts)
    if opts.ckpt is None and not opts.no_resume and final.is_file() and not last.exists():
        ckpt = load_model_file(final, "Pass --no_resume to train the step again and replace it.")
        try:
            check_model_state(models(opts.step), ckpt["model_state"], strict=True, source=str(final))
        except CheckpointError as err:
            raise CheckpointError(
                f"Step {opts.step} already finished, but its checkpoint does not fit this command's model: "
                f"{err} Or pass --no_resume to train step {opts.step} again and replace it."
            ) from None
        _check_same_training(opts, plan, ckpt, final, world_size, finished=True)
        plan.finished, plan.final = True, ckpt
        return plan
    source = Path(opts.ckpt) if opts.ckpt else (last if not opts.no_resume and last.is_file() else None)
    if source is not None:
        ckpt = load_model_file(source, RESUME_FIX.format(step=opts.step), RESUME_ENTRIES, mmap=False)
        check_model_state(models(opts.step), ckpt["model_state"], strict=True, source=str(source))
        _check_same_training(opts, plan, ckpt, source, world_size, finished=False)
        plan.resume, plan.resume_path = ckpt, source
    return plan


def _inspect_previous(opts: Any, plan: StepPlan, models: MetaModels) -> None:
    path = previous_step_path(opts)
    if not path.is_file() and not path.is_dir():
        # Only reachable with --debug (preflight refuses otherwise).
        plan.notes.append(f"Previous-step checkpoint {path} not found: continuing (--debug).")
        return
    ckpt = load_model_file(
        path,
        "It is not a model checkpoint of this framework or of the LGKD/PLOP reference. Pass the previous "
        "step's .pth with --step_ckpt.",
    )
    # Into the current model (its newest classifier is new) and into the frozen old model.
    check_model_state(models(opts.step), ckpt["model_state"], strict=False, source=str(path))
    check_model_state(
        models(opts.step - 1), ckpt["model_state"], strict=opts.strict_weights, source=str(path)
    )
    plan.previous, plan.previous_identity = ckpt, checkpoint_identity(ckpt)


def _check_same_training(
    opts: Any, plan: StepPlan, ckpt: Mapping[str, Any], path: Path, world_size: int, finished: bool
) -> None:
    step = opts.step
    options = ckpt.get("options")
    if options is None:
        plan.notes.append(
            f"{path} records no training options (a checkpoint of the reference or of an older version): "
            "they cannot be compared with this command's. "
            + ("It is taken as this step's result." if finished else "Resuming with this command's options.")
        )
    else:
        differences = option_differences(options, ckpt.get("world_size"), opts, world_size)
        if differences:
            listed = "; ".join(differences)
            if finished:
                raise OptionsError(
                    f"Step {step} already finished: {path} was trained with other training options "
                    f"(old -> new): {listed}. Run with the options it was trained with to reuse it (a rerun "
                    "rewrites a missing results row), use another --name for a new experiment, or pass "
                    f"--no_resume to train step {step} again and replace it."
                )
            start_over = (
                "leave out --ckpt to start the step from the previous step's model"
                if opts.ckpt
                else f"pass --no_resume to start step {step} over (the interrupted state is replaced)"
            )
            raise OptionsError(
                f"{path} holds an interrupted training of step {step} with other training options (old -> "
                f"new): {listed}. Resuming would continue its optimizer and learning-rate schedule with "
                f"different settings. Run with the options it was started with to resume, or {start_over}."
            )
    stored_previous = ckpt.get("previous_step")
    known = stored_previous is not None and plan.previous_identity is not None
    if known and stored_previous != plan.previous_identity:
        what = "finished" if finished else "interrupted"
        raise CheckpointError(
            f"The {what} step {step} in {path} was trained from another step-{step - 1} model than "
            f"{previous_step_path(opts)} ({stored_previous} vs {plan.previous_identity}): step "
            f"{step - 1} was trained again or --step_ckpt changed. Pass --no_resume to train step {step} "
            f"again from the current step-{step - 1} model, or restore the model it was trained from."
        )


# ---------------------------------------------------------------------------------------------- finished
def skip_finished_step(opts: Any, plan: StepPlan) -> bool:
    """A finished step does no work: its row is already in the CSV, or is rewritten from the score stored
    in its checkpoint. False when the row is missing and the checkpoint holds no score."""
    path, csv = step_checkpoint_path(opts, opts.step), results_path(opts)
    ckpt = plan.final or {}
    for note in plan.notes:
        say(note)
    done = (
        f"Step {opts.step} already finished: {path} (epoch {ckpt.get('epoch')}, best mIoU "
        f"{ckpt.get('best_score')})."
    )
    again = f"Pass --no_resume to train step {opts.step} again."
    if opts.step in results_steps(csv):
        say(f"{done} Its results row is in {csv}. Nothing to do. {again}")
        return True
    score = ckpt.get("score")
    if isinstance(score, Mapping) and {"Class IoU", "Mean IoU"} <= set(score):
        if launch_rank() == 0:
            write_row(opts, score)
        say(f"{done} Its missing results row was written to {csv} from the checkpoint. {again}")
        return True
    say(
        f"{done} Its results row is missing from {csv} and the checkpoint holds no score (written by the "
        "reference or an older version): evaluating it to write the row."
    )
    return False


def write_row(opts: Any, score: Mapping[str, Any]) -> None:
    """The step's results CSV row; a failed write says what is kept and how to write the row later."""
    try:
        write_results_row(
            results_path(opts), opts.step, format_results_row(opts.step, score, opts.num_classes)
        )
    except OutputError as err:
        last = last_epoch_checkpoint_path(opts)
        if opts.test or not last.is_file():
            raise OutputError(f"{err} Then rerun the same command: it only writes the row.") from err
        raise OutputError(
            f"{err} The trained model is saved in {step_checkpoint_path(opts, opts.step)} and the resumable "
            f"state {last_epoch_checkpoint_path(opts)} is kept: once fixed, rerun the same command (it only "
            "writes the row), or evaluate the model with --test, which writes the row too."
        ) from err


def write_options(opts: Any, info: dist_utils.DistInfo, plan: StepPlan) -> None:
    """``opts.json`` (``opts_test.json`` for --test): the resolved options this run used, and under ``run``
    the number of processes, the device and what it resumed from."""
    path = options_file(opts)
    record = {
        **vars(opts),
        "run": {
            "world_size": info.world_size,
            "device": str(info.device),
            "resumed_from": str(plan.resume_path) if plan.resume_path else None,
            "resumed_at_epoch": int(plan.resume["epoch"]) if plan.resume is not None else None,
            "evaluated": str(plan.test_path) if plan.test_path else None,
        },
    }
    try:
        save_options(record, path)
    except OSError as err:
        raise OutputError(
            f"Could not write {path}: {describe_os_error(err)}. Nothing was trained yet."
        ) from err


def remove_resumable_state(opts: Any, log: Logger) -> None:
    """The step is finished once its row is written: its ``_last.pth`` goes."""
    path = last_epoch_checkpoint_path(opts)
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        log.warning(f"Could not remove {path} ({describe_os_error(err)}); the step is finished anyway.")


# ---------------------------------------------------------------------------------------------- state
def plain_score(score: Mapping[str, Any]) -> dict[str, Any]:
    """Score dict without the matrix, with python numbers (checkpoints are loaded with weights_only)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, np.generic):
            return v.item()
        return v

    return {k: plain(v) for k, v in score.items() if k != "Confusion Matrix"}


class StepState:
    """What the epoch loop tracks and a resumed run restores (reference ``run.py`` ``main``: ``cur_epoch``,
    ``best_score``; plus the validated scores, so that a resumed step knows its best epoch's score).

    ``provenance`` goes into every checkpoint of the run: the resolved options, the number of processes,
    the run's identifier and the identity of the previous step's model (:func:`make_provenance`).
    """

    def __init__(self) -> None:
        self.start_epoch = 0
        self.best_score = -math.inf  # RN-23: a first validation with mIoU 0 is still saved
        self.best_epoch = 0
        self.test_scores: dict[int, dict] = {}
        self.provenance: dict[str, Any] = {}


def make_provenance(opts: Any, world_size: int, plan: StepPlan) -> dict[str, Any]:
    """The entries that let a later run tell whether a checkpoint is the result of the same training."""
    resumed_id = plan.resume.get("run_id") if plan.resume is not None else None
    return {
        "options": stored_options(opts),
        "world_size": world_size,
        # A resumed run continues the same training: it keeps the identifier.
        "run_id": resumed_id if isinstance(resumed_id, str) else uuid.uuid4().hex,
        "previous_step": plan.previous_identity,
    }


def restore_state(
    opts: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer: Trainer,
    log: Logger,
    plan: StepPlan,
) -> tuple[StepState, list | None]:
    """Resume from --ckpt (reference) or, automatically, from this step's last finished epoch.

    The checkpoint was chosen, loaded and checked by :func:`inspect_checkpoints`; an entry that still does
    not load (written by other code) is a CheckpointError naming the file and the entry.

    Returns:
        The state of the epoch loop (a fresh one when nothing is resumed) and the saved random states of
        every rank (None when nothing is resumed or the file has none).
    """
    state = StepState()
    checkpoint, path = plan.resume, plan.resume_path
    if checkpoint is None:
        return state, None
    source = str(path)
    load_model_state(model, checkpoint["model_state"], strict=True, source=source)
    with loading_entry(source, "optimizer_state"):
        load_optimizer_state(optimizer, checkpoint["optimizer_state"])
    check_same_layout(scheduler.state_dict(), checkpoint["scheduler_state"], source, "scheduler_state")
    with loading_entry(source, "scheduler_state"):
        scheduler.load_state_dict(checkpoint["scheduler_state"])
    if checkpoint.get("scaler_state"):
        with loading_entry(source, "scaler_state"):
            trainer.scaler.load_state_dict(checkpoint["scaler_state"])
    if checkpoint.get("trainer_state"):
        with loading_entry(source, "trainer_state"):
            trainer.load_state_dict(checkpoint["trainer_state"])
    with loading_entry(source, "epoch / best_score / test_scores"):
        state.start_epoch = state.best_epoch = int(checkpoint["epoch"])
        state.best_score = float(checkpoint.get("best_score", -math.inf))
        state.best_epoch = int(checkpoint.get("best_epoch", state.best_epoch))
        state.test_scores = {int(k): v for k, v in checkpoint.get("test_scores", {}).items()}
    log.info(f"[!] Resuming step {opts.step} from {path} at epoch {state.start_epoch}/{opts.epochs}")
    return state, checkpoint.get("rng_state")


def resume_hint(progress: RunProgress) -> str:
    """How a rerun continues after a failed save."""
    if progress.saved_epoch is None:
        return "Then rerun the same command: training had not started."
    return f"Then rerun the same command to resume from epoch {progress.saved_epoch + 1}."


def save_best_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer: Trainer,
    state: StepState,
    path: Path,
    progress: RunProgress,
) -> None:
    """The reference's best-mIoU checkpoint (rank 0), with its score, so that a lost results row can be
    rewritten."""
    extra = {
        **state.provenance,
        "best_epoch": state.best_epoch,
        "score": state.test_scores[state.best_epoch],
    }
    dist_utils.on_main(
        lambda: save_checkpoint(
            checkpoint_dict(model, optimizer, scheduler, trainer, state.best_epoch, state.best_score, extra),
            path,
            hint=resume_hint(progress),
        )
    )


def same_file(a: Path | None, b: Path) -> bool:
    """Whether ``a`` names the file ``b`` (False if either cannot be resolved)."""
    try:
        return a is not None and a.resolve() == b.resolve()
    except OSError:
        return False


def save_last_epoch(
    opts: Any,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer: Trainer,
    epoch: int,
    state: StepState,
    path: Path,
    progress: RunProgress,
) -> None:
    """Write the resumable state after ``epoch`` finished epochs, atomically (every rank's RNG state
    included); a failed write stops every rank with the path and the cause, the previous file intact."""
    all_rng = dist_utils.all_gather_object(rng_state())

    def save() -> None:
        checkpoint = checkpoint_dict(
            model, optimizer, scheduler, trainer, epoch, state.best_score, state.provenance
        )
        checkpoint.update(
            best_epoch=state.best_epoch,
            test_scores=state.test_scores,
            rng_state=all_rng,
            world_size=len(all_rng),
        )
        save_checkpoint(checkpoint, path, hint=resume_hint(progress))

    dist_utils.on_main(save)
    progress.saved_epoch, progress.resume_path = epoch, path
