"""Ready-made training steps for the tests and the benchmarks: options, models, autocast and batches.

A step of LGKD on VOC 15-5 (the task of ``scripts/voc/lgkd_15-5.sh``: step 0 learns classes 0..15, step 1
the classes 16..20, with ``--prev_kd 5 --novel_kd 1``) built through the real parser and ``--method``
preset, its current and frozen previous-step models, and synthetic batches shaped as the presets'
DataLoader yields them. The CPU tests (``tests/test_host_sync.py``, ``tests/test_gpu.py``) and the
benchmarks (``benchmarks/bench_*.py``, ``benchmarks/gpu_check.py``) build their steps here, so what the tests
check is what the benchmarks measure; ``run.py`` does not use this module.

torch and the model code are imported inside the functions: ``benchmarks/gpu_check.py`` reads the
constants in a parent process that never imports torch.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

DATASET = "voc"
TASK = "15-5"
#: The step-1 options of ``scripts/voc/lgkd_15-5.sh`` beyond ``--method LGKD``.
LGKD_STEP_ARGS = ("--prev_kd", "5", "--novel_kd", "1")
#: ``--precision`` of the benchmarks and tests -> the Trainer's ``autocast`` argument.
PRECISIONS = ("fp32", "fp16", "bf16")


def build_opts(
    *,
    step: int,
    backbone: str,
    crop: int,
    batch: int,
    device: str,
    norm_act: str = "iabn_sync",
    abn: str = "torch",
    precision: str = "fp32",
    memory_format: str = "contiguous",
    method: str = "LGKD",
    num_workers: int = 0,
    extra: Iterable[str] = (),
) -> argparse.Namespace:
    """Resolved options of an LGKD run on VOC 15-5 at ``step``, through the real parser and preset.

    Args:
        abn: ``torch`` (pure-PyTorch ABN), ``inplace_abn`` (compiled package) or ``recompute``
            (pure PyTorch with ``--recompute_abn``).
        precision: ``fp32`` (``--opt_level O0``) or ``fp16``/``bf16`` (``O1`` with ``--amp_dtype``).
    """
    from argparser import get_argparser, modify_command_options

    argv = [
        "--method",
        method,
        "--dataset",
        DATASET,
        "--task",
        TASK,
        "--step",
        str(step),
        "--backbone",
        backbone,
        "--output_stride",
        "16",
        "--norm_act",
        norm_act,
        "--no_pretrained",
        "--crop_size",
        str(crop),
        "--batch_size",
        str(batch),
        "--device",
        device,
        "--memory_format",
        memory_format,
        "--num_workers",
        str(num_workers),
        "--no_progress",
        "--abn_impl",
        "inplace_abn" if abn == "inplace_abn" else "torch",
    ]
    if abn == "recompute":
        argv.append("--recompute_abn")
    if precision != "fp32":
        argv += ["--opt_level", "O1", "--amp_dtype", precision]
    if step > 0:
        argv += list(LGKD_STEP_ARGS)
    argv += list(extra)
    return modify_command_options(get_argparser().parse_args(argv))


def autocast_setting(precision: str) -> tuple[bool, Any]:
    """``(enabled, dtype)`` for ``Trainer(..., autocast=...)``: ``fp32`` off, ``fp16``/``bf16`` on.

    The Trainer computes this from ``--opt_level``/``--amp_dtype`` on CUDA and runs the CPU in fp32; the
    benchmarks and the precision tests pass it explicitly to exercise CPU autocast too (fp16 then also
    gets an enabled ``GradScaler``, as on CUDA).
    """
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    return precision != "fp32", torch.bfloat16 if precision == "bf16" else torch.float16


def step_classes(opts: argparse.Namespace, step: int) -> list[int]:
    """Classes per step up to ``step`` (``tasks.get_per_task_classes``)."""
    import tasks

    return tasks.get_per_task_classes(opts.dataset, opts.task, step)


def seen_labels(opts: argparse.Namespace, step: int) -> tuple[list[int], list[int]]:
    """(labels learned at ``step``, labels of the earlier steps), as in ``tasks.get_task_labels``."""
    import tasks

    labels, labels_old, _ = tasks.get_task_labels(opts.dataset, opts.task, step)
    return list(labels), list(labels_old)


def build_models(opts: argparse.Namespace, step: int, device: Any) -> tuple[Any, Any]:
    """The current model of ``step`` and, for step > 0, the frozen previous-step model, built by
    :func:`run.build_model` (layout from ``opts.memory_format``); the old model gets the current model's
    weights of the classes it has (no checkpoint needed)."""
    from run import build_model

    model = build_model(opts, step, device)
    model_old = None
    if step > 0:
        model_old = build_model(opts, step - 1, device)
        model_old.load_state_dict(
            {k: v for k, v in model.state_dict().items() if k in model_old.state_dict()}, strict=False
        )
        for p in model_old.parameters():
            p.requires_grad = False
        model_old.eval()
    return model, model_old


def synthetic_labels(
    batch: int, size: int, classes: Sequence[int], generator: Any, objects: int = 3, border: int = 2
) -> Any:
    """VOC-like label maps (B, H, W) uint8: background 0, a few rectangles of ``classes`` outlined by 255.

    Args:
        classes: class indices the objects are drawn from (0 is never drawn as an object).
        border: width of the 255 ("void") outline around each object, as in VOC annotations.
    """
    import torch

    labels = torch.zeros(batch, size, size, dtype=torch.uint8)
    pool = [c for c in classes if c != 0] or [0]
    for b in range(batch):
        for _ in range(objects):
            h, w = (int(v) for v in torch.randint(size // 6, size // 2 + 1, (2,), generator=generator))
            top = int(torch.randint(0, size - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, size - w + 1, (1,), generator=generator))
            cls = pool[int(torch.randint(0, len(pool), (1,), generator=generator))]
            t0, l0 = max(top - border, 0), max(left - border, 0)
            labels[b, t0 : top + h + border, l0 : left + w + border] = 255
            labels[b, top : top + h, left : left + w] = cls
    return labels


def synthetic_batches(
    n: int, batch: int, crop: int, classes: Sequence[int], seed: int = 0, pin: bool = False
) -> list[tuple[Any, Any]]:
    """``n`` (images, labels) batches as the presets' DataLoader yields them: uint8 (B, 3, crop, crop) images
    (normalised on the device by the trainer, as in training) and uint8 (B, crop, crop) labels."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        images = torch.randint(0, 256, (batch, 3, crop, crop), generator=generator, dtype=torch.uint8)
        labels = synthetic_labels(batch, crop, classes, generator)
        if pin:
            images, labels = images.pin_memory(), labels.pin_memory()
        batches.append((images, labels))
    return batches
