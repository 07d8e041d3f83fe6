"""Train or evaluate one incremental step: ``python run.py ...`` or ``torchrun --nproc_per_node=N run.py``.

One call = one step (spec §1): the step-``t`` run loads the best checkpoint of step ``t-1`` into the new model
(balanced initialisation of the new classifier) and into the frozen old model, trains for ``--epochs``,
validates on the seen-classes test set, keeps the best checkpoint and appends its row to the results CSV.
An interrupted step resumes from its last finished epoch when the same command is run again.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

import tasks
from argparser import is_point_cloud, parse_command_line, save_options, validate_options
from dataset import build_datasets
from metrics import StreamSegMetrics, confusion_matrix_to_fig
from segmentation_module import make_model
from train import Trainer, uses_grad_scaler
from utils import distributed as dist_utils
from utils.allocator import keep_freed_memory
from utils.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from utils.errors import CheckpointError, DatasetError, OptionsError, TrainingError, UserError
from utils.logger import Logger
from utils.results import format_results_row, results_csv_path, write_results_row
from utils.sampler import ShardedEvalSampler
from utils.scheduler import build_scheduler
from utils.visualization import make_pointcloud_grid, make_prediction_grid

# Reference behaviour (§7.4): validate when (epoch+1) % val_interval == 0 from epoch 30 on, or after the
# last epoch. With the default --val_interval 60 only the last epoch of VOC runs is evaluated.
MIN_EPOCH_FOR_VALIDATION = 30
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------- paths
def step_checkpoint_path(opts: Any, step: int) -> Path:
    """The reference's checkpoint name: ``{checkpoint}/{task}-{dataset}_{name}_{step}.pth`` (§10.2)."""
    return Path(opts.checkpoint) / f"{opts.task}-{opts.dataset}_{opts.name}_{step}.pth"


def last_epoch_checkpoint_path(opts: Any) -> Path:
    """Checkpoint of the last finished epoch, for resuming an interrupted step (removed on success)."""
    return Path(opts.checkpoint) / f"{opts.task}-{opts.dataset}_{opts.name}_{opts.step}_last.pth"


def log_directory(opts: Any) -> Path:
    return Path(opts.logdir) / f"{opts.task}-{opts.dataset}" / opts.name / f"step{opts.step}"


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
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OptionsError(
            f"Cannot write to {directory} ({flag}): {err.strerror or err}. Choose a writable folder with "
            f"{flag} or fix its permissions."
        ) from None


def preflight(opts: Any) -> None:
    """Checks that need no data and no model, so bad input fails in a second and writes nothing."""
    check_safe_name(opts.name, "--name")
    check_safe_name(opts.date, "--date")
    if opts.test:
        path = Path(opts.ckpt) if opts.ckpt else step_checkpoint_path(opts, opts.step)
        if not path.is_file():
            raise CheckpointError(
                f"--test needs the checkpoint to evaluate, but {path} does not exist. Pass it with --ckpt "
                "(e.g. a released model such as 15-x-voc.pth) or train the step first."
            )
    elif opts.step > 0 and not opts.debug:
        path = previous_step_path(opts)
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


def previous_step_path(opts: Any) -> Path:
    return Path(opts.step_ckpt) if opts.step_ckpt else step_checkpoint_path(opts, opts.step - 1)


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
    # Reference behaviour (§4.7): DistributedSampler (seed 0, set_epoch each epoch) also with one process,
    # so the shuffling order of a one-process run matches the reference's world-size-1 run.
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
    # Q8 fixed: every test image is evaluated exactly once whatever the number of processes.
    test_loader = DataLoader(
        bundle.test,
        batch_size=opts.batch_size if opts.crop_val else 1,
        sampler=ShardedEvalSampler(bundle.test, num_replicas=world, rank=info.rank),
        num_workers=opts.num_workers,
        pin_memory=pin,
    )
    return train_loader, test_loader


def build_model(opts: Any, step: int, device: torch.device, pretrained: bool = True) -> nn.Module:
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, step)
    model_opts = opts if pretrained else argparse.Namespace(**{**vars(opts), "no_pretrained": True})
    model = make_model(model_opts, classes=classes).to(device)
    if device.type == "cuda" and opts.memory_format in ("auto", "channels_last"):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(opts: Any, model: nn.Module, *, fused: bool | None = None) -> torch.optim.Optimizer:
    """Param groups of §6: backbone (unless --freeze), head, classifiers (old ones at lr_old x lr).

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
        # 3DPC-CISS (runs/*.py): torch's Adam with its default betas, weight decay as an L2 term.
        return torch.optim.Adam(groups, lr=opts.lr, fused=fused or None)
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=True, fused=fused or None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a saved optimizer state but keep this run's kernel choice (``fused``/``foreach``).

    ``Optimizer.load_state_dict`` restores every saved group option, the implementation switches
    included: an fp16 checkpoint (fused SGD) resumed in fp32 would switch to the fused kernel, and the
    reverse would hand the GradScaler's device flags to a step that cannot take them.
    """
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)


def load_previous_step(
    opts: Any, model: nn.Module, model_old: nn.Module, train_loader: DataLoader, device: torch.device
) -> dict | None:
    """Load step t-1 into the new model (non-strict, then balanced init) and the frozen old model (§7.2)."""
    path = previous_step_path(opts)
    if not path.is_file():
        # Only reachable with --debug (preflight refuses otherwise).
        logging.getLogger("LGKD").warning(f"Previous-step checkpoint {path} not found: continuing (--debug).")
        return None
    checkpoint = load_checkpoint(path)
    if "model_state" not in checkpoint:
        raise CheckpointError(
            f"{path} has no 'model_state' entry (keys: {sorted(checkpoint)[:8]}); it is not a checkpoint of "
            "this framework or of the LGKD/PLOP reference. Pass the previous step's .pth with --step_ckpt."
        )
    load_model_state(model, checkpoint["model_state"], strict=False, source=str(path))
    if opts.init_balanced:
        model.init_new_classifier(device)
    elif opts.init_multimodal is not None:
        model.init_new_classifier_multimodal(device, train_loader, opts.init_multimodal)
    load_model_state(model_old, checkpoint["model_state"], strict=opts.strict_weights, source=str(path))
    return checkpoint.get("trainer_state")


# ---------------------------------------------------------------------------------------------- state
def plain_score(score: dict) -> dict:
    """Score dict without the matrix, with python numbers (checkpoints are loaded with weights_only)."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, np.generic):
            return v.item()
        return v

    return {k: plain(v) for k, v in score.items() if k != "Confusion Matrix"}


def rng_state() -> dict:
    """Every generator a resumed run needs, as plain python (gathered across ranks, weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


class StepState:
    """What the epoch loop tracks and a resumed run restores (§7.3, §7.4)."""

    def __init__(self) -> None:
        self.start_epoch = 0
        self.best_score = -math.inf  # Q23 fixed: a first validation with mIoU 0 is still saved
        self.best_epoch = 0
        self.test_scores: dict[int, dict] = {}


def checkpoint_dict(
    model: nn.Module, optimizer: Any, scheduler: Any, trainer: Trainer, epoch: int, best_score: float
) -> dict:
    """The reference format (§10.2) with ``module.``-prefixed keys, plus the AMP scaler state."""
    return {
        "epoch": epoch,
        "model_state": {f"module.{k}": v for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "best_score": float(best_score),
        "trainer_state": trainer.state_dict(),
        "scaler_state": trainer.scaler.state_dict(),
    }


def resume(
    opts: Any, model: nn.Module, optimizer: Any, scheduler: Any, trainer: Trainer, log: Logger
) -> tuple[StepState, dict | None]:
    """Resume from --ckpt (reference) or, automatically, from this step's last finished epoch."""
    state = StepState()
    path = None
    if opts.ckpt is not None and Path(opts.ckpt).is_file():
        path = Path(opts.ckpt)
    elif not opts.no_resume and last_epoch_checkpoint_path(opts).is_file():
        path = last_epoch_checkpoint_path(opts)
    if path is None:
        return state, None
    checkpoint = load_checkpoint(path)
    load_model_state(model, checkpoint["model_state"], strict=True, source=str(path))
    load_optimizer_state(optimizer, checkpoint["optimizer_state"])
    scheduler.load_state_dict(checkpoint["scheduler_state"])
    if checkpoint.get("scaler_state"):
        trainer.scaler.load_state_dict(checkpoint["scaler_state"])
    if checkpoint.get("trainer_state"):
        trainer.load_state_dict(checkpoint["trainer_state"])
    state.start_epoch = state.best_epoch = int(checkpoint["epoch"])
    state.best_score = float(checkpoint.get("best_score", -math.inf))
    state.best_epoch = int(checkpoint.get("best_epoch", state.best_epoch))
    state.test_scores = dict(checkpoint.get("test_scores", {}))
    log.info(f"[!] Resuming step {opts.step} from {path} at epoch {state.start_epoch}/{opts.epochs}")
    return state, checkpoint.get("rng_state")


# ---------------------------------------------------------------------------------------------- loops
def should_validate(epoch_done: int, val_interval: int, epochs: int) -> bool:
    return (epoch_done % val_interval == 0 and epoch_done >= MIN_EPOCH_FOR_VALIDATION) or epoch_done == epochs


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


def fit(
    opts: Any,
    trainer: Trainer,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    loaders: tuple[DataLoader, DataLoader],
    metrics: StreamSegMetrics,
    state: StepState,
    log: Logger,
) -> dict:
    """The epoch loop with the reference's validation cadence and best-mIoU checkpoint (§7.3, §7.4)."""
    train_loader, test_loader = loaders
    best_path, last_path = step_checkpoint_path(opts, opts.step), last_epoch_checkpoint_path(opts)
    sample_ids = sample_batch_ids(opts, len(test_loader))
    for epoch in range(state.start_epoch, opts.epochs):
        class_loss, reg_loss = trainer.train(epoch, optimizer, train_loader, scheduler, logger=log)
        log.info(
            f"End of Epoch {epoch}/{opts.epochs}, Average Loss={class_loss + reg_loss}, "
            f"Class Loss={class_loss}, Reg Loss={reg_loss}"
        )
        log.add_scalar("E-Loss", class_loss + reg_loss, epoch)
        log.add_scalar("E-Loss-reg", reg_loss, epoch)
        log.add_scalar("E-Loss-cls", class_loss, epoch)
        if should_validate(epoch + 1, opts.val_interval, opts.epochs):
            val_loss, score, samples = trainer.validate(
                test_loader, metrics, sample_ids, logger=log, end_task=True
            )
            log_validation(log, opts, epoch, val_loss, score, samples)
            state.test_scores[epoch + 1] = plain_score(score)
            if score["Mean IoU"] > state.best_score:
                state.best_score, state.best_epoch = float(score["Mean IoU"]), epoch + 1
                if dist_utils.is_main_process():
                    save_checkpoint(
                        checkpoint_dict(model, optimizer, scheduler, trainer, epoch + 1, state.best_score),
                        best_path,
                    )
                    log.info(f"[!] Checkpoint saved: {best_path}")
            log.info(f"Current best epoch {state.best_epoch}, best score {state.best_score}")
        save_last_epoch(opts, model, optimizer, scheduler, trainer, epoch + 1, state, last_path)
    return final_score(opts, trainer, model, test_loader, metrics, state, best_path, log)


def save_last_epoch(
    opts: Any,
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    trainer: Trainer,
    epoch: int,
    state: StepState,
    path: Path,
) -> None:
    """Write the resumable state of the finished epoch atomically (every rank's RNG state included)."""
    rng = rng_state()
    all_rng = [rng]
    if dist_utils.is_dist_avail_and_initialized():
        all_rng = [None] * dist_utils.get_world_size()
        torch.distributed.all_gather_object(all_rng, rng)
    if dist_utils.is_main_process():
        checkpoint = checkpoint_dict(model, optimizer, scheduler, trainer, epoch, state.best_score)
        checkpoint.update(
            best_epoch=state.best_epoch,
            test_scores=state.test_scores,
            rng_state=all_rng,
            world_size=len(all_rng),
        )
        save_checkpoint(checkpoint, path)
    dist_utils.barrier()


def final_score(
    opts: Any,
    trainer: Trainer,
    model: nn.Module,
    test_loader: DataLoader,
    metrics: StreamSegMetrics,
    state: StepState,
    best_path: Path,
    log: Logger,
) -> dict:
    """The best validated epoch's score (reference: no reload, no extra test pass)."""
    if state.best_epoch in state.test_scores:
        return state.test_scores[state.best_epoch]
    # Q23 fixed: resuming a finished step whose best score is not recorded re-evaluates the best model.
    if best_path.is_file():
        load_model_state(model, load_checkpoint(best_path)["model_state"], strict=True, source=str(best_path))
    _, score, _ = trainer.validate(test_loader, metrics)
    return plain_score(score)


def sample_batch_ids(opts: Any, n_batches: int) -> list[int]:
    if not (opts.visualize and opts.sample_num > 0) or n_batches == 0:
        return []
    rng = random.Random(opts.random_seed)
    return sorted(rng.sample(range(n_batches), min(opts.sample_num, n_batches)))


def finish_step(opts: Any, score: dict, best_epoch: int, log: Logger) -> None:
    """End-of-step logging (§7.6) and the results CSV row (§10.3), rank 0."""
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
    if dist_utils.is_main_process():
        path = results_csv_path(opts.results_dir, opts.date, opts.dataset, opts.task, opts.name)
        write_results_row(path, opts.step, format_results_row(opts.step, score, opts.num_classes))
        log.info(f"Results row of step {opts.step} written to {path}")


# ---------------------------------------------------------------------------------------------- main
def run_step(opts: Any) -> None:
    """Check every input (options, data, checkpoints, weights) before writing anything, then run."""
    preflight(opts)
    info = setup_runtime(opts)
    device = info.device
    opts.inital_nb_classes = tasks.get_per_task_classes(opts.dataset, opts.task, 0)[0]

    seed_everything(opts.random_seed)
    bundle = build_datasets(opts)
    random.seed(opts.random_seed)
    loaders = build_loaders(opts, bundle, info)
    if opts.test:
        model, ckpt_path, epoch = load_test_model(opts, device)
        model_old = trainer_state = None
    else:
        model, model_old, trainer_state = build_train_models(opts, device, loaders[0])

    # Everything was checked: only now create the output folders and the logger.
    if dist_utils.is_main_process():
        for directory, flag in (
            (Path(opts.checkpoint), "--checkpoint"),
            (Path(opts.results_dir), "--results_dir"),
            (log_directory(opts), "--logdir"),
        ):
            ensure_writable(directory, flag)
    dist_utils.barrier()
    log = Logger(
        log_directory(opts), rank=info.rank, debug=opts.debug, summary=opts.visualize, step=opts.step
    )
    try:
        if dist_utils.is_main_process():
            save_options(opts, log_directory(opts) / "opts.json")
        log_setup(opts, info, bundle, log)
        # Point clouds: a (B, N) label batch is B samples.
        metrics = StreamSegMetrics(
            bundle.n_classes, device=device, sample_ndim=1 if is_point_cloud(opts) else 2
        )
        if opts.test:
            log.info(f"*** Model restored from {ckpt_path} (epoch {epoch})")
            trainer = Trainer(model, None, device, opts, None, None, opts.step)
            _, score, _ = trainer.validate(loaders[1], metrics)
            best_epoch = epoch
        else:
            score, best_epoch = train_step(opts, info, model, model_old, trainer_state, loaders, metrics, log)
        finish_step(opts, score, best_epoch, log)
    finally:
        log.close()


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


def build_train_models(
    opts: Any, device: torch.device, train_loader: DataLoader
) -> tuple[nn.Module, nn.Module | None, dict | None]:
    model = build_model(opts, opts.step, device)
    if opts.fix_bn:
        model.fix_bn()
    if opts.step == 0:
        return model, None, None
    model_old = build_model(opts, opts.step - 1, device, pretrained=False)
    trainer_state = load_previous_step(opts, model, model_old, train_loader, device)
    # The old model is frozen for good: eval mode (running statistics), no gradients, never DDP-wrapped.
    model_old.requires_grad_(False)
    model_old.eval()
    return model, model_old, trainer_state


def train_step(
    opts: Any,
    info: dist_utils.DistInfo,
    model: nn.Module,
    model_old: nn.Module | None,
    trainer_state: dict | None,
    loaders: tuple[DataLoader, DataLoader],
    metrics: StreamSegMetrics,
    log: Logger,
) -> tuple[dict, int]:
    device = info.device
    optimizer = build_optimizer(opts, model)
    scheduler = build_scheduler(opts, optimizer, max_iters=opts.epochs * len(loaders[0]))
    wrapped = model
    if info.world_size > 1:
        wrapped = DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    classes = tasks.get_per_task_classes(opts.dataset, opts.task, opts.step)
    trainer = Trainer(wrapped, model_old, device, opts, trainer_state, classes, opts.step)
    state, saved_rng = resume(opts, model, optimizer, scheduler, trainer, log)
    log.add_table("Opts", vars(opts))
    # Reference behaviour (§7.2 step 8): the reference draws (and prints) one torch random number here.
    log.debug(f"Random draw {torch.randint(0, 100, (1, 1)).item()}")
    trainer.before(loaders[0], logger=log)
    if saved_rng is not None and len(saved_rng) == info.world_size:
        set_rng_state(saved_rng[info.rank])

    score = fit(opts, trainer, model, optimizer, scheduler, loaders, metrics, state, log)
    dist_utils.barrier()
    if dist_utils.is_main_process():
        last_epoch_checkpoint_path(opts).unlink(missing_ok=True)
    return score, state.best_epoch


def load_test_model(opts: Any, device: torch.device) -> tuple[nn.Module, Path, int]:
    """--test: the model of this step with --ckpt (or this step's default checkpoint) loaded (§7.5)."""
    model = build_model(opts, opts.step, device, pretrained=False)
    path = Path(opts.ckpt) if opts.ckpt else step_checkpoint_path(opts, opts.step)
    checkpoint = load_checkpoint(path)
    if "model_state" not in checkpoint:
        raise CheckpointError(
            f"{path} has no 'model_state' entry (keys: {sorted(checkpoint)[:8]}); it is not a model "
            "checkpoint of this framework or of the LGKD/PLOP reference."
        )
    load_model_state(model, checkpoint["model_state"], strict=True, source=str(path))
    return model, path, int(checkpoint.get("epoch", 0))


def main(argv: list[str] | None = None) -> int:
    """``python run.py ...``: 0 on success, 2 for bad input (UserError), 3 when training diverged."""
    opts, explicit = parse_command_line(argv)
    finished = False
    try:
        validate_options(opts, explicit)
        run_step(opts)
        finished = True
    except (UserError, TrainingError) as err:
        # One paragraph naming the problem and the fix, no traceback; printed once, by rank 0.
        if dist_utils.is_main_process():
            print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        dist_utils.cleanup(synchronize=finished)
    return 0


if __name__ == "__main__":
    sys.exit(main())
