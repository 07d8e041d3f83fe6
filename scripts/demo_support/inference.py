"""Predictions of the demo's final models: a qualitative grid and a confusion matrix (``scripts/demo.py``).

A finished step is rebuilt from what its ``run.py`` call left on disk: the resolved options it saved next to
its logs (``opts.json``, :func:`argparser.save_options`) and its best checkpoint. The model is built as
``run.py`` builds it (:func:`run.build_model`) and loaded as a ``--test`` run loads it
(:func:`resume.load_model_file`, :func:`utils.checkpoint.load_model_state`), the images come from the same
``dataset.build_datasets`` test set (val transform: resize + centre crop) that ``run.py`` evaluated, so the
confusion matrix here is the one behind the results-CSV row of that step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from argparser import load_options
from dataset import build_datasets
from dataset.transform import normalize_on_device
from metrics import StreamSegMetrics
from resume import load_model_file
from run import build_model
from utils.checkpoint import load_model_state


def load_step_options(path: str | Path) -> argparse.Namespace:
    """The resolved options of a finished step, set up for evaluation on this process's CPU."""
    opts = load_options(path)
    opts.device = "cpu"
    opts.test = True
    # Cached split indices are read, never rebuilt in parallel workers here.
    opts.num_workers = 0
    return opts


def build_step_model(
    opts: argparse.Namespace, checkpoint_path: str | Path, device: torch.device
) -> nn.Module:
    """The model of ``opts.step`` with the weights of ``checkpoint_path``, in eval mode."""
    # The checkpoint holds every weight: no ImageNet initialisation needed (nor wanted, it may be absent).
    model = build_model(opts, opts.step, device, pretrained=False)
    checkpoint = load_model_file(Path(checkpoint_path), "Run the demo step that writes it again.", mmap=False)
    load_model_state(model, checkpoint["model_state"], strict=True, source=str(checkpoint_path))
    model.eval()
    if hasattr(model, "in_eval"):
        # As Trainer.validate: evaluation-only behaviour of the module (e.g. --disable_background).
        model.in_eval = True
    return model


def test_set(opts: argparse.Namespace) -> Dataset:
    """The test set ``run.py`` evaluates at ``opts.step``: val images with a seen class, val transform."""
    return build_datasets(opts).test


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Arg-max class of every pixel: (B, 3, H, W) normalised images -> (B, H, W) int64."""
    outputs = model(images)
    logits = outputs[0] if isinstance(outputs, tuple | list) else outputs
    return logits.argmax(dim=1)


@torch.no_grad()
def evaluate(
    model: nn.Module, dataset: Dataset, n_classes: int, device: torch.device, batch_size: int = 8
) -> dict:
    """``StreamSegMetrics`` results of ``model`` over ``dataset`` (keys of ``get_results()``).

    ``"Confusion Matrix"`` is row-normalised (rows = ground truth); ``"Class IoU"`` matches the CSV row.
    """
    metrics = StreamSegMetrics(n_classes, device=device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    for images, labels in loader:
        images = normalize_on_device(images, device)  # uint8 (B, 3, H, W) -> normalised float32
        labels = labels.to(device, dtype=torch.long)
        metrics.update(labels, predict(model, images))
    return metrics.get_results()


def pick_samples(
    dataset: Dataset, count: int, n_step0_classes: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``count`` test images drawn at random, half of them (rounded up) showing a class added after step 0.

    Args:
        dataset: the test set (items ``(image (3, H, W), label (H, W))``).
        count: number of images.
        n_step0_classes: classes of step 0 (background included); a higher label is a "new" class.
        seed: seed of the draw, so every method is shown the same images.

    Returns:
        (images (K, 3, H, W) normalised float32 on the CPU, labels (K, H, W) int64, dataset indices in
        increasing order), K <= count.
        Showing new-class images next to old-class ones makes both learning and forgetting visible.
    """
    order = np.random.default_rng(seed).permutation(len(dataset)).tolist()
    with_new: list[int] = []
    old_only: list[int] = []
    wanted_new = (count + 1) // 2
    for index in order:
        label = torch.as_tensor(dataset[index][1])
        has_new = bool(((label >= n_step0_classes) & (label != 255)).any())
        (with_new if has_new else old_only).append(index)
        if len(with_new) >= wanted_new and len(old_only) >= count:
            break
    chosen = with_new[:wanted_new]
    chosen += old_only[: count - len(chosen)]
    chosen += with_new[wanted_new : wanted_new + count - len(chosen)]
    chosen.sort()
    # The presets give uint8 images (3, H, W); predict() and the grid's Denormalize want them normalised.
    images = normalize_on_device(torch.stack([torch.as_tensor(dataset[i][0]) for i in chosen]), "cpu")
    labels = torch.stack([torch.as_tensor(dataset[i][1]).long() for i in chosen])
    return images, labels, chosen
