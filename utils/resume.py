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
against this command's options (:mod:`utils.training_options`), and returns a :class:`StepPlan` -- all
before the data set is scanned, so a wrong file or option costs seconds.

Files without recorded options (the reference's, or older versions') cannot be compared: a finished step's
checkpoint is then taken as its result, and resuming goes on with this command's options; the log says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import tasks
from segmentation_module import make_model
from utils.checkpoint import (
    MODEL_ENTRIES,
    RESUME_ENTRIES,
    check_entries,
    check_model_state,
    load_checkpoint,
)
from utils.errors import CheckpointError, OptionsError, OutputError
from utils.filelock import FileLock, LockHeld, describe_owner, owner_description
from utils.files import TEMP_NAME_EXTRA, describe_os_error, remove_stray_temp_files
from utils.results import remove_stray_results_temp_files, results_csv_path
from utils.training_options import option_differences


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
        ckpt = load_checkpoint(path, mmap=True)
        check_entries(ckpt, MODEL_ENTRIES, str(path), "Pass a model checkpoint of this step with --ckpt.")
        check_model_state(models(opts.step), ckpt["model_state"], strict=True, source=str(path))
        plan.test_model, plan.test_path = ckpt, path
        return plan
    if opts.step > 0:
        _inspect_previous(opts, plan, models)
    final, last = step_checkpoint_path(opts, opts.step), last_epoch_checkpoint_path(opts)
    if opts.ckpt is None and not opts.no_resume and final.is_file() and not last.exists():
        ckpt = load_checkpoint(final, mmap=True)
        check_entries(
            ckpt, MODEL_ENTRIES, str(final), "Pass --no_resume to train the step again and replace it."
        )
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
        ckpt = load_checkpoint(source)
        check_entries(ckpt, RESUME_ENTRIES, str(source), RESUME_FIX.format(step=opts.step))
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
    ckpt = load_checkpoint(path, mmap=True)
    check_entries(
        ckpt,
        MODEL_ENTRIES,
        str(path),
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
