"""Train or evaluate one incremental step: ``python run.py ...`` or ``torchrun --nproc_per_node=N run.py``.

One call = one step (as the reference's ``run.py``): the step-``t`` run loads the best checkpoint of step
``t-1`` into the new model (balanced initialisation of the new classifier) and into the frozen old model,
trains for ``--epochs``, validates on the seen-classes test set, keeps the best checkpoint and writes its row
to the results CSV.

The stages, in order (:func:`run_step`): check the input (:func:`resume.preflight`), take the step's lock and
check every checkpoint it will use (:func:`resume.inspect_checkpoints`), then set up the process
(:func:`setup_runtime`), build the data (:func:`dataset.build_datasets`, :func:`build_loaders`) and the models
(:func:`build_train_models` or :func:`load_test_model`), open the outputs (:func:`open_outputs`), train
(:func:`train_step`: :func:`build_optimizer`, the Trainer, :func:`fit`) or evaluate, and write the results
(:func:`finish_step`).

Running the same command again never loses or redoes work: an interrupted step resumes from its last
finished epoch, a finished step exits at once (rewriting its results row if it is missing), and a rerun with
options that would change the trained model is refused with the list of differences. That bookkeeping (the
step's files, checkpoints and resume state) lives in ``resume.py`` and ``training_options.py``; Ctrl-C and
SIGTERM stop with one line that says how to resume (``utils/interrupt.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import tasks
from argparser import is_point_cloud, parse_command_line, validate_options
from dataset import build_datasets
from dataset.transform import IMAGENET_MEAN, IMAGENET_STD
from metrics import StreamSegMetrics, confusion_matrix_to_fig
from resume import (
    StepPlan,
    StepState,
    ensure_writable,
    inspect_checkpoints,
    last_epoch_checkpoint_path,
    launch_rank,
    load_model_file,
    log_directory,
    make_provenance,
    plain_score,
    planned_world_size,
    preflight,
    previous_step_path,
    remove_resumable_state,
    restore_state,
    results_path,
    same_file,
    save_best_checkpoint,
    save_last_epoch,
    skip_finished_step,
    step_checkpoint_path,
    step_guard,
    write_options,
    write_row,
)
from segmentation_module import make_model
from train import Trainer, uses_grad_scaler, wants_channels_last
from utils import distributed as dist_utils
from utils.allocator import keep_freed_memory
from utils.checkpoint import load_model_state, load_optimizer_state, loading_entry, set_rng_state
from utils.errors import DatasetError, OptionsError, TrainingError, UserError
from utils.interrupt import (
    CountingIterable,
    RunProgress,
    StopRequested,
    install_stop_handlers,
    received_signal,
    restore_handlers,
    stop_message,
)
from utils.logger import Logger
from utils.sampler import ShardedEvalSampler
from utils.scheduler import build_scheduler
from utils.visualization import make_pointcloud_grid, make_prediction_grid

# Public names of this module; the resume bookkeeping that moved to resume.py and utils/checkpoint.py
# stays importable from here.
__all__ = [
    "MIN_EPOCH_FOR_VALIDATION",
    "build_loaders",
    "build_model",
    "build_optimizer",
    "build_train_models",
    "fit",
    "load_optimizer_state",
    "load_previous_step",
    "load_test_model",
    "main",
    "preflight",
    "run_step",
    "seed_everything",
    "setup_runtime",
    "step_checkpoint_path",
    "train_step",
]

# Reference behaviour (LGKD run.py run_step, RN-01): validate when (epoch+1) % val_interval == 0 from epoch
# 30 on, or after the last epoch. With the default --val_interval 60 only the last epoch of VOC runs is
# evaluated.
MIN_EPOCH_FOR_VALIDATION = 30


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """``python run.py ...``: 0 on success (or nothing to do), 2 for bad input or an output that cannot be
    written (UserError), 3 when training diverged, 128 + N when stopped by signal N (130 Ctrl-C, 143
    SIGTERM)."""
    opts, explicit = parse_command_line(argv)
    progress = RunProgress()
    # Signal handlers can only be installed from the main thread (a caller may run main() elsewhere).
    previous = install_stop_handlers() if threading.current_thread() is threading.main_thread() else None
    finished = False
    try:
        validate_options(opts, explicit)
        run_step(opts, progress)
        finished = True
    except StopRequested as stop:
        return report_stop(stop.signum, progress)
    except (UserError, TrainingError) as err:
        if received_signal() is not None:
            return report_stop(received_signal(), progress)
        # One paragraph naming the problem and the fix, no traceback; printed once, by rank 0.
        if is_rank0():
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except BaseException:
        # Anything raised while a stop signal unwinds the run (a DataLoader worker killed by the same
        # SIGTERM, a collective whose peer left) is the stop, not a bug to report.
        if received_signal() is not None:
            return report_stop(received_signal(), progress)
        raise
    finally:
        with contextlib.suppress(StopRequested):
            dist_utils.cleanup(synchronize=finished)
        if previous is not None:
            restore_handlers(previous)
    return 0


def report_stop(signum: int, progress: RunProgress) -> int:
    if is_rank0():
        print(stop_message(signum, progress), file=sys.stderr, flush=True)
    return 128 + signum


def is_rank0() -> bool:
    return dist_utils.get_rank() == 0 if dist_utils.is_dist_avail_and_initialized() else launch_rank() == 0


def run_step(opts: Any, progress: RunProgress | None = None) -> None:
    """Check every input (options, names, checkpoints) before any work, then run or skip the step.

    Order: options and paths (:func:`resume.preflight`), then the step lock and the checkpoint files
    (:func:`resume.inspect_checkpoints`, against models on the meta device), and only then the data set
    (whose first scan can take minutes), the models, the outputs and the training.
    """
    progress = progress or RunProgress()
    progress.epochs = opts.epochs
    if opts.test:
        progress.phase = "evaluation"
    preflight(opts)
    with step_guard(opts):
        plan = inspect_checkpoints(opts, planned_world_size())
        if plan.finished:
            if skip_finished_step(opts, plan):
                return
            # Finished, but its row is missing and the file holds no score: evaluate it to write the row.
            opts = argparse.Namespace(
                **{**vars(opts), "test": True, "ckpt": str(step_checkpoint_path(opts, opts.step))}
            )
            plan = StepPlan(test_model=plan.final, test_path=Path(opts.ckpt), notes=plan.notes)
            progress.phase = "evaluation"
        if plan.resume is not None:
            progress.saved_epoch, progress.resume_path = int(plan.resume["epoch"]), plan.resume_path
        execute_step(opts, plan, progress)


def execute_step(opts: Any, plan: StepPlan, progress: RunProgress) -> None:
    """Data, models, outputs, then training or evaluation, then the results row."""
    info = setup_runtime(opts)
    device = info.device
    opts.inital_nb_classes = tasks.get_per_task_classes(opts.dataset, opts.task, 0)[0]

    seed_everything(opts.random_seed)
    bundle = build_datasets(opts)
    random.seed(opts.random_seed)
    loaders = build_loaders(opts, bundle, info)
    if opts.test:
        model, epoch = load_test_model(opts, device, plan)
        model_old = trainer_state = None
    else:
        model, model_old, trainer_state = build_train_models(opts, device, loaders[0], plan)

    log = open_outputs(opts, info)
    try:
        dist_utils.on_main(lambda: write_options(opts, info, plan))
        for note in plan.notes:
            log.info(f"[!] {note}")
        log_setup(opts, info, bundle, log)
        # Point clouds: a (B, N) label batch is B samples.
        metrics = StreamSegMetrics(
            bundle.n_classes, device=device, sample_ndim=1 if is_point_cloud(opts) else 2
        )
        if opts.test:
            log.info(f"*** Model restored from {plan.test_path} (epoch {epoch})")
            trainer = Trainer(model, None, device, opts, None, None, opts.step)
            progress.phase = "evaluation"
            _, score, _ = trainer.validate(loaders[1], metrics)
            best_epoch = epoch
        else:
            score, best_epoch = train_step(
                opts, info, model, model_old, trainer_state, loaders, metrics, log, plan, progress
            )
            progress.phase = "finishing"
        finish_step(opts, score, best_epoch, log)
        if not opts.test:
            # Only now is the step finished: the resumable state goes once the row is written.
            dist_utils.on_main(lambda: remove_resumable_state(opts, log))
    except StopRequested as stop:
        log.to_file(stop_message(stop.signum, progress))
        raise
    finally:
        log.close()


# ---------------------------------------------------------------------------------------------- setup
def setup_runtime(opts: Any) -> dist_utils.DistInfo:
    device = None if opts.device == "auto" else opts.device
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionsError("--device cuda was asked for, but no CUDA device is visible. Use --device cpu.")
    info = dist_utils.init_distributed(device)
    if info.device.type == "cpu":
        # Freed activations are reused instead of being unmapped and faulted in again (utils/allocator.py).
        keep_freed_memory()
    if info.device.type == "cuda":
        torch.backends.cudnn.benchmark = not (opts.no_cudnn_benchmark or opts.deterministic)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if opts.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return info


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(opts: Any, bundle: Any, info: dist_utils.DistInfo) -> tuple[DataLoader, DataLoader]:
    world = info.world_size
    item = "block" if is_point_cloud(opts) else "image"
    if len(bundle.train) == 0 and not opts.test:
        raise DatasetError(
            f"The training set of step {opts.step} of task {opts.task} is empty: no {item} of "
            f"{opts.data_root} contains the classes {bundle.labels} of this step"
            f"{' without future classes (disjoint setting)' if not opts.overlap else ''}. Check --data_root, "
            f"--task and --step{'' if opts.overlap else ', or use --overlap'}."
        )
    if len(bundle.train) < opts.batch_size * world and not opts.test:
        raise DatasetError(
            f"The training set of step {opts.step} has {len(bundle.train)} {item}s, fewer than one global "
            f"batch ({opts.batch_size} per process x {world} processes); with drop_last no iteration would "
            "run. Lower --batch_size, use fewer processes, or use more data."
        )
    pin = info.device.type == "cuda"
    # Reference behaviour (LGKD run.py run_step): DistributedSampler (seed 0, set_epoch each epoch) also with
    # one process, so the shuffling order of a one-process run matches the reference's world-size-1 run.
    train_sampler = DistributedSampler(bundle.train, num_replicas=world, rank=info.rank)
    train_loader = DataLoader(
        bundle.train,
        batch_size=opts.batch_size,
        sampler=train_sampler,
        num_workers=opts.num_workers,
        drop_last=True,
        pin_memory=pin,
        persistent_workers=opts.num_workers > 0,
    )
    # RN-08: every test image is evaluated exactly once whatever the number of processes.
    test_loader = DataLoader(
        bundle.test,
        batch_size=opts.batch_size if opts.crop_val else 1,
        sampler=ShardedEvalSampler(bundle.test, num_replicas=world, rank=info.rank),
        num_workers=opts.num_workers,
        pin_memory=pin,
    )
    return train_loader, test_loader


def open_outputs(opts: Any, info: dist_utils.DistInfo) -> Logger:
    """Everything was checked: only now create the output folders (rank 0) and the logger."""
    if dist_utils.is_main_process():
        folders = [(Path(opts.results_dir), "--results_dir"), (log_directory(opts), "--logdir")]
        if not opts.test:
            folders.insert(0, (Path(opts.checkpoint), "--checkpoint"))
        for directory, flag in folders:
            ensure_writable(directory, flag)
    dist_utils.barrier()
    return Logger(
        log_directory(opts), rank=info.rank, debug=opts.debug, summary=opts.visualize, step=opts.step
    )


# ---------------------------------------------------------------------------------------------- models
def build_model(opts: Any, step: int, device: torch.device, pretrained: bool = True) -> nn.Module:
    """The model of ``step`` (its classifiers up to that step) on ``device``, in the layout the Trainer
    gives its image batches (``--memory_format``).

    Args:
        pretrained: load the ImageNet backbone weights unless ``--no_pretrained`` (False: never, for a
            model whose every weight comes from a checkpoint).
    """
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, step)
    model_opts = opts if pretrained else argparse.Namespace(**{**vars(opts), "no_pretrained": True})
    model = make_model(model_opts, classes=classes).to(device)
    if wants_channels_last(opts, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(opts: Any, model: nn.Module, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """The reference's param groups (LGKD ``run.py`` ``run_step``): backbone (unless --freeze), head,
    classifiers (old ones at lr_old x lr).

    SGD with Nesterov momentum (the reference), or Adam with ``--optimizer adam`` (3DPC-CISS, the default
    for point clouds) on the same groups.

    Args:
        fused: use PyTorch's fused SGD kernel. None (default): only when the run scales its loss (fp16
            on CUDA). There ``GradScaler.step`` would otherwise read the inf/NaN flag back to the host
            every iteration to decide whether to step; the fused kernel takes the flag as a tensor and
            skips the update on the device. Elsewhere the plain step is kept: the fused kernel rounds
            differently (1 ulp), and fp32 runs stay bitwise those of the reference's SGD.
    """
    trainable = lambda module: [p for p in module.parameters() if p.requires_grad]  # noqa: E731
    groups: list[dict] = []
    if not opts.freeze:
        groups.append({"params": trainable(model.body), "weight_decay": opts.weight_decay})
    groups.append({"params": trainable(model.head), "weight_decay": opts.weight_decay})
    if opts.lr_old is not None and opts.step > 0:
        groups.append(
            {
                "params": trainable(model.cls[:-1]),
                "weight_decay": opts.weight_decay,
                "lr": opts.lr_old * opts.lr,
            }
        )
        groups.append({"params": trainable(model.cls[-1:]), "weight_decay": opts.weight_decay})
    else:
        groups.append({"params": trainable(model.cls), "weight_decay": opts.weight_decay})
    if getattr(model, "scalar", None) is not None:
        groups.append({"params": [model.scalar], "weight_decay": opts.weight_decay})
    if fused is None:
        device = next(model.parameters()).device
        fused = uses_grad_scaler(opts, device)
    if getattr(opts, "optimizer", "sgd") == "adam":
        # 3DPC-CISS (runs/*.py): torch's Adam with its default betas, weight decay as an L2 term. Its fused
        # kernel creates its moment buffers as zeros, so a skipped fp16 step leaves them valid.
        return torch.optim.Adam(groups, lr=opts.lr, fused=fused or None)
    optimizer = torch.optim.SGD(
        groups, lr=opts.lr, momentum=opts.momentum, nesterov=True, fused=fused or None
    )
    if fused:
        zero_momentum_buffers(optimizer)
    return optimizer


def zero_momentum_buffers(optimizer: torch.optim.Optimizer) -> None:
    """Start every momentum buffer at zero before the first step of a fused SGD.

    The fused kernel allocates its buffers with ``empty_like`` on its first call and fills them in that
    step; when the GradScaler skips the step (an overflow, common at the initial scale 2**16) they stay
    uninitialised and the next step uses the garbage as momentum (torch ``optim/sgd.py`` ``_fused_sgd``).
    Zero buffers give the same first update (buf = momentum * 0 + g = g) and survive a skipped step.
    """
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for param in group["params"]:
            optimizer.state[param].setdefault("momentum_buffer", torch.zeros_like(param))


def build_train_models(
    opts: Any, device: torch.device, train_loader: DataLoader, plan: StepPlan
) -> tuple[nn.Module, nn.Module | None, dict | None]:
    model = build_model(opts, opts.step, device)
    if opts.fix_bn:
        model.fix_bn()
    if opts.step == 0:
        return model, None, None
    model_old = build_model(opts, opts.step - 1, device, pretrained=False)
    trainer_state = load_previous_step(opts, model, model_old, train_loader, device, plan.previous)
    # The old model is frozen for good: eval mode (running statistics), no gradients, never DDP-wrapped.
    model_old.requires_grad_(False)
    model_old.eval()
    return model, model_old, trainer_state


def load_previous_step(
    opts: Any,
    model: nn.Module,
    model_old: nn.Module,
    train_loader: DataLoader,
    device: torch.device,
    checkpoint: Mapping[str, Any] | None,
) -> dict | None:
    """Load step t-1 into the new model (non-strict, then balanced init) and the frozen old model (LGKD
    ``run.py`` ``run_step``).

    ``checkpoint`` was loaded and checked by :func:`resume.inspect_checkpoints` (None: missing, which
    only ``--debug`` allows).
    """
    if checkpoint is None:
        return None
    source = str(previous_step_path(opts))
    load_model_state(model, checkpoint["model_state"], strict=False, source=source)
    if opts.init_balanced:
        model.init_new_classifier(device)
    elif opts.init_multimodal is not None:
        model.init_new_classifier_multimodal(device, train_loader, opts.init_multimodal)
    load_model_state(model_old, checkpoint["model_state"], strict=opts.strict_weights, source=source)
    return checkpoint.get("trainer_state")


def load_test_model(opts: Any, device: torch.device, plan: StepPlan) -> tuple[nn.Module, int]:
    """--test: the model of this step with the checked checkpoint of the plan loaded (LGKD ``run.py``
    ``run_step``, test mode)."""
    model = build_model(opts, opts.step, device, pretrained=False)
    checkpoint = plan.test_model or {}
    load_model_state(model, checkpoint["model_state"], strict=True, source=str(plan.test_path))
    with loading_entry(str(plan.test_path), "epoch"):
        epoch = int(checkpoint.get("epoch", 0))
    return model, epoch


# ---------------------------------------------------------------------------------------------- training
def train_step(
    opts: Any,
    info: dist_utils.DistInfo,
    model: nn.Module,
    model_old: nn.Module | None,
    trainer_state: dict | None,
    loaders: tuple[DataLoader, DataLoader],
    metrics: StreamSegMetrics,
    log: Logger,
    plan: StepPlan,
    progress: RunProgress,
) -> tuple[dict, int]:
    """Optimizer, scheduler and Trainer, the resumed state if any, then :func:`fit`; returns the step's
    score and its best epoch."""
    device = info.device
    optimizer = build_optimizer(opts, model)
    scheduler = build_scheduler(opts, optimizer, max_iters=opts.epochs * len(loaders[0]))
    wrapped = model
    if info.world_size > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    # The previous step's trainer_state (regulariser importances) is read while the Trainer is built.
    source = str(previous_step_path(opts)) if opts.step > 0 else "the previous step's checkpoint"
    with loading_entry(source, "trainer_state") if trainer_state is not None else contextlib.nullcontext():
        trainer = Trainer(wrapped, model_old, device, opts, trainer_state, classes, opts.step)
    state, saved_rng = restore_state(opts, model, optimizer, scheduler, trainer, log, plan)
    state.provenance = make_provenance(opts, info.world_size, plan)
    plan.resume = plan.previous = None  # loaded into the models: free the checkpoints' memory
    log.add_table("Opts", vars(opts))
    # Reference behaviour (LGKD run.py run_step): one torch random number is drawn (and printed) here.
    log.debug(f"Random draw {torch.randint(0, 100, (1, 1)).item()}")
    trainer.before(loaders[0])
    if saved_rng is not None and len(saved_rng) == info.world_size:
        with loading_entry(str(plan.resume_path), "rng_state"):
            set_rng_state(saved_rng[info.rank])

    score = fit(opts, trainer, model, optimizer, scheduler, loaders, metrics, state, log, progress)
    return score, state.best_epoch


def should_validate(epoch_done: int, val_interval: int, epochs: int) -> bool:
    return (epoch_done % val_interval == 0 and epoch_done >= MIN_EPOCH_FOR_VALIDATION) or epoch_done == epochs


def fit(
    opts: Any,
    trainer: Trainer,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loaders: tuple[DataLoader, DataLoader],
    metrics: StreamSegMetrics,
    state: StepState,
    log: Logger,
    progress: RunProgress,
) -> dict:
    """The epoch loop with the reference's validation cadence and best-mIoU checkpoint (LGKD ``run.py``
    ``run_step``; RN-01).

    The resumable state is on disk from the start (``_last.pth`` at ``state.start_epoch``, unless this run
    resumed from it): a full disk shows before the first epoch, and a step whose ``.pth`` exists without a
    ``_last.pth`` is always a finished one.
    """
    train_loader, test_loader = loaders
    best_path, last_path = step_checkpoint_path(opts, opts.step), last_epoch_checkpoint_path(opts)
    sample_ids = sample_batch_ids(opts, len(test_loader))
    progress.epochs, progress.iterations = opts.epochs, len(train_loader)
    counted_loader = CountingIterable(train_loader, progress)
    if state.start_epoch < opts.epochs and not same_file(progress.resume_path, last_path):
        progress.phase = "saving"
        save_last_epoch(
            opts, model, optimizer, scheduler, trainer, state.start_epoch, state, last_path, progress
        )
    for epoch in range(state.start_epoch, opts.epochs):
        progress.phase, progress.epoch = "training", epoch
        class_loss, reg_loss = trainer.train(epoch, optimizer, counted_loader, scheduler, logger=log)
        log.info(
            f"End of Epoch {epoch}/{opts.epochs}, Average Loss={class_loss + reg_loss}, "
            f"Class Loss={class_loss}, Reg Loss={reg_loss}"
        )
        log.add_scalar("E-Loss", class_loss + reg_loss, epoch)
        log.add_scalar("E-Loss-reg", reg_loss, epoch)
        log.add_scalar("E-Loss-cls", class_loss, epoch)
        if should_validate(epoch + 1, opts.val_interval, opts.epochs):
            progress.phase = "validation"
            val_loss, score, samples = trainer.validate(test_loader, metrics, sample_ids)
            log_validation(log, opts, epoch, val_loss, score, samples)
            state.test_scores[epoch + 1] = plain_score(score)
            if score["Mean IoU"] > state.best_score:
                state.best_score, state.best_epoch = float(score["Mean IoU"]), epoch + 1
                progress.phase = "saving"
                save_best_checkpoint(model, optimizer, scheduler, trainer, state, best_path, progress)
                log.info(f"[!] Checkpoint saved: {best_path}")
            log.info(f"Current best epoch {state.best_epoch}, best score {state.best_score}")
        progress.phase = "saving"
        save_last_epoch(opts, model, optimizer, scheduler, trainer, epoch + 1, state, last_path, progress)
    progress.phase = "validation"
    return final_score(trainer, model, test_loader, metrics, state, best_path)


def final_score(
    trainer: Trainer,
    model: nn.Module,
    test_loader: DataLoader,
    metrics: StreamSegMetrics,
    state: StepState,
    best_path: Path,
) -> dict:
    """The best validated epoch's score (reference: no reload, no extra test pass)."""
    if state.best_epoch in state.test_scores:
        return state.test_scores[state.best_epoch]
    # RN-23: resuming a finished step whose best score is not recorded re-evaluates the best model.
    if best_path.is_file():
        best = load_model_file(best_path, "Pass --no_resume to train the step again and replace it.")
        load_model_state(model, best["model_state"], strict=True, source=str(best_path))
    _, score, _ = trainer.validate(test_loader, metrics)
    return plain_score(score)


# ---------------------------------------------------------------------------------------------- logging
def finish_step(opts: Any, score: Mapping[str, Any], best_epoch: int, log: Logger) -> None:
    """End-of-step logging and the results CSV row, rank 0 (LGKD ``run.py`` ``run_step`` and ``main``)."""
    log.info(StreamSegMetrics.to_str(score))
    log.add_table("Test_Class_IoU", score["Class IoU"])
    log.add_table("Test_Class_Acc", score["Class Acc"])
    if "Confusion Matrix" in score:
        log.add_figure("Test_Confusion_Matrix", confusion_matrix_to_fig(score["Confusion Matrix"]))
    log.add_results(
        {"T-IoU": score["Class IoU"], "T-Acc": score["Class Acc"]},
        tag=f"Results/{opts.step}(epoch {best_epoch})",
    )
    log.add_scalar("T_Overall_Acc", score["Overall Acc"], opts.step)
    log.add_scalar("T_MeanIoU", score["Mean IoU"], opts.step)
    log.add_scalar("T_MeanAcc", score["Mean Acc"], opts.step)
    dist_utils.on_main(lambda: write_row(opts, score))
    log.info(f"Results row of step {opts.step} written to {results_path(opts)}")


def log_setup(opts: Any, info: dist_utils.DistInfo, bundle: Any, log: Logger) -> None:
    log.info(
        f"Training step {opts.step} with lr {opts.lr}." if not opts.test else f"Testing step {opts.step}."
    )
    if info.device.type == "cpu" and opts.opt_level != "O0":
        log.info(f"--opt_level {opts.opt_level}: mixed precision needs CUDA; this CPU run uses fp32.")
    elif opts.opt_level in ("O2", "O3"):
        log.info(f"--opt_level {opts.opt_level} is approximated by autocast (no apex fp16 master weights).")
    log.info(
        f"Dataset: {opts.dataset}, Train set: {len(bundle.train)}, Val set: {len(bundle.val)}, "
        f"Test set: {len(bundle.test)}, n_classes {bundle.n_classes}"
    )
    log.info(f"Total batch size is {opts.batch_size * info.world_size}")
    if opts.step > 0 and not opts.test:
        log.info(f"[!] Previous model loaded from {previous_step_path(opts)}")


def log_validation(log: Logger, opts: Any, epoch: int, val_loss: tuple, score: dict, samples: list) -> None:
    log.info(f"Validation, Class Loss={val_loss[0]}, Reg Loss={val_loss[1]} (without scaling)")
    log.info(StreamSegMetrics.to_str(score))
    log.add_scalar("V-Loss", val_loss[0] + val_loss[1], epoch)
    log.add_scalar("V-Loss-reg", val_loss[1], epoch)
    log.add_scalar("V-Loss-cls", val_loss[0], epoch)
    log.add_scalar("Val_Overall_Acc", score["Overall Acc"], epoch)
    log.add_scalar("Val_MeanIoU", score["Mean IoU"], epoch)
    log.add_table("Val_Class_IoU", score["Class IoU"], epoch)
    log.add_table("Val_Acc_IoU", score["Class Acc"], epoch)
    log.add_figure("Val_Confusion_Matrix", confusion_matrix_to_fig(score["Confusion Matrix"]), epoch)
    if samples and dist_utils.is_main_process():
        write_samples(log, opts, samples, epoch)


def write_samples(log: Logger, opts: Any, samples: list, epoch: int) -> None:
    """--visualize with --sample_num N: image / ground truth / prediction grids to tensorboard and PNG
    (point clouds: top-down views of the colours, the ground truth and the prediction)."""
    from PIL import Image

    from utils.visualization import ade_cmap, voc_cmap

    cmap = ade_cmap() if opts.dataset == "ade" else voc_cmap()
    inputs, gts = np.stack([s[0] for s in samples]), np.stack([s[1] for s in samples])
    preds = {"prediction": np.stack([s[2] for s in samples])}
    if is_point_cloud(opts):
        grid = make_pointcloud_grid(inputs, gts, preds, cmap)
    else:
        grid = make_prediction_grid(inputs, gts, preds, cmap, IMAGENET_MEAN, IMAGENET_STD)
    out = log_directory(opts) / "samples"
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out / f"epoch{epoch + 1:03d}.png")
    log.add_image("Samples", grid.transpose(2, 0, 1), epoch)


def sample_batch_ids(opts: Any, n_batches: int) -> list[int]:
    if not (opts.visualize and opts.sample_num > 0) or n_batches == 0:
        return []
    rng = random.Random(opts.random_seed)
    return sorted(rng.sample(range(n_batches), min(opts.sample_num, n_batches)))


if __name__ == "__main__":
    sys.exit(main())
