"""PLOP pseudo-labelling of the background with the old model.

Reference: ``train.py`` ``Trainer.find_median`` and the ``pseudo`` branches of ``Trainer.train``.

At step t > 0 the pixels labelled background (``label < C_old``: true background *and* old classes hidden by
data masking) receive the old model's prediction where it is confident (PLOP, Douillard et al., CVPR 2021,
Eq. 4), and the cross-entropy of each image is scaled by the fraction of confident background pixels
(PLOP Eq. 5, ``--classif_adaptive_factor``). Confidence thresholds per class come from an approximate
median computed once before training by :func:`find_median`.

Shapes are written for images, (B, C, H, W) logits and (B, H, W) labels; point clouds pass (B, C, N) logits
and (B, N) labels through the same code (the per-image factor is then (B, 1)).
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from utils.errors import OptionsError
from utils.logger import get_logger
from utils.loss import IGNORE_INDEX, entropy

if TYPE_CHECKING:
    from utils.loss_terms import StepInfo

__all__ = ["PseudoLabeler", "PseudoLabels", "check_pseudo_mode", "entropy", "find_median"]

logger = get_logger("utils.pseudo_label")

#: ``--pseudo`` values; ``threshold_<t>`` stands for a fixed confidence threshold t in [0, 1].
PSEUDO_MODES = ("naive", "confidence", "threshold_<t>", "median", "entropy")
#: ``--pseudo_soft`` values.
PSEUDO_SOFT_MODES = ("soft_certain", "soft_uncertain")
#: ``--pseudo_ablation`` values.
PSEUDO_ABLATIONS = ("corrected_errors", "removed_errors")


def check_pseudo_mode(mode: str | None) -> float | None:
    """Validate a ``--pseudo`` value (None: no pseudo-labelling); the one place the rule is written.

    Returns:
        t of ``threshold_<t>``, else None.

    Raises:
        OptionsError: an unknown mode, or a fixed threshold that is not a probability.
    """
    if mode is None:
        return None
    if mode.startswith("threshold_"):
        try:
            threshold = float(mode.removeprefix("threshold_"))
        except ValueError:
            pass
        else:
            # The fixed threshold is compared with the old model's softmax confidence, a probability.
            if not (math.isfinite(threshold) and 0 <= threshold <= 1):
                raise OptionsError(
                    f"--pseudo threshold_<t>: t {threshold!r} is out of range: it must be a number in "
                    "[0, 1], e.g. threshold_0.9."
                )
            return threshold
    elif mode in PSEUDO_MODES:
        return None
    raise OptionsError(
        f"Unknown --pseudo {mode!r}. Pass one of: {', '.join(PSEUDO_MODES)} (e.g. threshold_0.9), or leave "
        "it out to disable pseudo-labelling."
    )


@torch.no_grad()
def find_median(
    loader: Iterable[tuple[Tensor, Tensor]],
    old_logits_fn: Callable[[Tensor], Tensor],
    device: torch.device | str,
    nb_current_classes: int,
    mode: str = "probability",
    threshold: float = 0.9,
    nb_bins: int | None = None,
    log: logging.Logger | None = None,
) -> tuple[Tensor, float]:
    """Per-class confidence thresholds from an approximate median of the old model's confidence
    (reference ``Trainer.find_median``).

    One pass over ``loader``: for every pixel labelled 0, the old model's predicted class ``ŷ`` and a value
    (``E(P) / ln(C_new)`` in "entropy" mode, max probability in "probability" mode) fill a histogram
    ``Hist[C_new, nb_bins]``. The per-class median is then approximated from the histogram and clamped with
    the base ``threshold``: ``max`` in entropy mode, ``min`` in probability mode.

    Reference behaviour (RN-05), reproduced exactly: the running sum of the median search adds the bin
    *index* (``lb * nb_bins``) instead of the bin count, the bin index is ``int(i / nb_bins * nb_bins)``
    with its float error (``i - 1`` for i in {29, 57, 58} with 100 bins), the last visited bin is used if
    the search never stops, and the arithmetic is float32. Each process computes its thresholds on its own
    shard, without synchronisation.

    Args:
        loader: yields ``(images, labels)``; images as the loader gives them (``old_logits_fn`` moves and
            normalises them); labels (B, H, W) with 0 for background.
        old_logits_fn: loader ``images -> (B, C_old, H, W)`` full-resolution old-model logits on ``device``
            (the Trainer normalises uint8 images on the device first, as for training).
        device: where images, labels and the histogram go.
        nb_current_classes: ``C_new`` (number of histogram rows and of thresholds).
        mode: "entropy" or "probability".
        threshold: base threshold (``--threshold``).
        nb_bins: histogram bins (``--pseudo_nb_bins``); default 100 (entropy) or 20 (probability).
        log: logger for progress messages (default: this module's).

    Returns:
        ``(thresholds, max_value)``: float32 (C_new,) thresholds on ``device`` and the normaliser of the
        values (``ln C_new`` computed in float32 for entropy mode, 1.0 for probability mode).
    """
    log = log or logger
    if mode == "entropy":
        max_value = float(torch.log(torch.tensor(float(nb_current_classes), dtype=torch.float32)))
        default_bins = 100
    elif mode == "probability":
        max_value, default_bins = 1.0, 20  # bins of 0.05 on [0, 1]
    else:
        raise ValueError(f"Unknown find_median mode {mode!r}: expected 'entropy' or 'probability'.")
    nb_bins = nb_bins if nb_bins is not None else default_bins

    histogram = torch.zeros(nb_current_classes * nb_bins, dtype=torch.long, device=device)
    nb_batches = len(loader) if hasattr(loader, "__len__") else "?"
    for cur_step, (images, labels) in enumerate(loader):
        labels = labels.to(device, dtype=torch.long)
        probas = torch.softmax(old_logits_fn(images).float(), dim=1)  # (B, C_old, H, W)
        max_probas, pseudo_labels = probas.max(dim=1)  # (B, H, W) each
        background = labels == 0
        if mode == "entropy":
            values = entropy(probas)[background] / max_value
        else:
            values = max_probas[background]
        bins = (values * nb_bins).long().clamp(max=nb_bins - 1)
        histogram += torch.bincount(pseudo_labels[background] * nb_bins + bins, minlength=histogram.numel())
        if cur_step % 10 == 0:
            log.info(f"Median computing {cur_step}/{nb_batches}.")
    histogram = histogram.view(nb_current_classes, nb_bins)

    log.info("Approximating median")
    thresholds = _approximate_medians(histogram.cpu(), nb_bins)
    for c in range(nb_current_classes):
        clamp = max if mode == "entropy" else min
        thresholds[c] = clamp(float(thresholds[c]), threshold)
    log.info(f"Finished computing median {thresholds}")
    return thresholds.to(device), max_value


def _approximate_medians(histogram: Tensor, nb_bins: int) -> Tensor:
    """The reference's median search, operation for operation (float32 tensors, Python loop)."""
    thresholds = torch.zeros(histogram.shape[0], dtype=torch.float32)
    for c in range(histogram.shape[0]):
        total = histogram[c].sum()
        if total <= 0:
            continue  # classes never predicted keep 0
        half = total / 2  # float32 tensor, as in the reference
        running_sum = 0.0
        for index in range(nb_bins):
            lower_border = index / nb_bins
            # Reference behaviour (RN-05): int(i / n * n) is i - 1 for some i (float error).
            bin_index = int(lower_border * nb_bins)
            if half >= running_sum and half <= running_sum + histogram[c, bin_index]:
                break
            # Reference behaviour (RN-05): adds the bin index, not the bin count.
            running_sum += lower_border * nb_bins
        # The last visited (lower_border, bin_index) is used when the loop never breaks.
        thresholds[c] = lower_border + ((half - running_sum) / histogram[c, bin_index]) * (1 / nb_bins)
    return thresholds


@dataclass
class PseudoLabels:
    """Result of :class:`PseudoLabeler` for one batch.

    Attributes:
        labels: (B, H, W) long, the labels after pseudo-labelling (a new tensor).
        mask_background: (B, H, W) bool, ``original label < C_old``.
        mask_valid: (B, H, W) bool, confident old predictions (entropy mode only, else None).
        classif_adaptive_factor: (B, 1, 1) per-image CE factor ((B, 1) per point cloud; entropy mode with
            ``--classif_adaptive_factor``), else 1.0.
        sample_weights: (B, H, W) float per-pixel CE weights ("confidence" mode), else None.
        pseudo_targets: (B, H, W) long, the old model's argmax ``ŷ`` (entropy mode, for ``--ce_on_pseudo``),
            else None.
    """

    labels: Tensor
    mask_background: Tensor
    mask_valid: Tensor | None = None
    classif_adaptive_factor: Tensor | float = 1.0
    sample_weights: Tensor | None = None
    pseudo_targets: Tensor | None = None


class PseudoLabeler:
    """Rewrites the background labels with the old model's predictions (reference
    ``Trainer.train``, ``pseudo`` branches).

    Modes (``--pseudo``), with ``P = softmax(z_old)``, ``(pmax, ŷ) = max_c P`` and ``M_bg = label < C_old``:

    * ``naive``: ``labels[M_bg] = ŷ``.
    * ``threshold_<t>``: ``ŷ`` set to 255 where ``pmax < t``, then ``labels[M_bg] = ŷ``.
    * ``confidence``: ``labels[M_bg] = ŷ``; per-pixel CE weights 1, and ``pmax`` on ``M_bg``.
    * ``median``: ``ŷ`` set to 255 where ``pmax < thresholds[ŷ]``, then ``labels[M_bg] = ŷ``.
    * ``entropy`` (PLOP, LGKD): ``valid = E(P) / max_entropy < thresholds[ŷ]``;
      ``labels[M_bg & ~valid] = 255`` and ``labels[M_bg & valid] = ŷ`` (PLOP Eq. 4).
      ``pseudo_ablation``: "corrected_errors" leaves valid pixels unchanged, "removed_errors" keeps
      only pseudo-labels equal to the label (others 255).
      ``pseudo_soft="soft_uncertain"`` only writes the valid pixels; "soft_certain" changes nothing.
      ``classif_adaptive_factor``: per image ``|M_bg & valid| / (|M_bg| + 1e-6)`` (PLOP Eq. 5), clamped
      below by ``classif_adaptive_min_factor`` when that is non-zero.

    Args:
        mode: one of naive, confidence, threshold_<t>, median, entropy.
        old_classes: ``C_old``.
        thresholds: (C_new,) per-class thresholds from :func:`find_median` (median and entropy modes).
        max_entropy: entropy normaliser from :func:`find_median` (entropy mode).
        classif_adaptive_factor: compute the per-image CE factor (entropy mode).
        classif_adaptive_min_factor: lower clamp of that factor (0 = none).
        pseudo_soft: None, "soft_certain" or "soft_uncertain".
        pseudo_ablation: None, "corrected_errors" or "removed_errors".
    """

    def __init__(
        self,
        mode: str,
        old_classes: int,
        thresholds: Tensor | None = None,
        max_entropy: float | None = None,
        classif_adaptive_factor: bool = False,
        classif_adaptive_min_factor: float = 0.0,
        pseudo_soft: str | None = None,
        pseudo_ablation: str | None = None,
    ):
        self.fixed_threshold = check_pseudo_mode(mode)
        if mode in ("median", "entropy") and thresholds is None:
            raise ValueError(f"Pseudo-labelling mode {mode!r} needs the thresholds of find_median.")
        if mode == "entropy" and max_entropy is None:
            raise ValueError("Pseudo-labelling mode 'entropy' needs max_entropy from find_median.")
        if pseudo_ablation not in (None, *PSEUDO_ABLATIONS):
            raise OptionsError(
                f"Unknown --pseudo_ablation {pseudo_ablation!r}: choose one of {', '.join(PSEUDO_ABLATIONS)}."
            )
        if pseudo_soft not in (None, *PSEUDO_SOFT_MODES):
            raise OptionsError(
                f"Unknown --pseudo_soft {pseudo_soft!r}: choose one of {', '.join(PSEUDO_SOFT_MODES)}."
            )
        self.mode = mode
        self.old_classes = old_classes
        self.thresholds = thresholds
        self.max_entropy = max_entropy
        self.classif_adaptive_factor = classif_adaptive_factor
        self.classif_adaptive_min_factor = classif_adaptive_min_factor
        self.pseudo_soft = pseudo_soft
        self.pseudo_ablation = pseudo_ablation

    @classmethod
    def from_opts(
        cls,
        opts: argparse.Namespace,
        info: StepInfo,
        thresholds: Tensor | None = None,
        max_entropy: float | None = None,
    ) -> PseudoLabeler | None:
        """Build from the options, or return None when there is no pseudo-labelling (no ``--pseudo``, or
        step 0 / no old model). ``thresholds``/``max_entropy`` come from :func:`find_median`."""
        if opts.pseudo is None:
            return None
        check_pseudo_mode(opts.pseudo)
        if not info.distill:
            return None
        return cls(
            mode=opts.pseudo,
            old_classes=info.old_classes,
            thresholds=thresholds,
            max_entropy=max_entropy,
            classif_adaptive_factor=opts.classif_adaptive_factor,
            classif_adaptive_min_factor=opts.classif_adaptive_min_factor,
            pseudo_soft=opts.pseudo_soft,
            pseudo_ablation=opts.pseudo_ablation,
        )

    def __call__(self, labels: Tensor, outputs_old: Tensor) -> PseudoLabels:
        """Pseudo-label a batch.

        Args:
            labels: (B, H, W) long ground truth (not modified).
            outputs_old: (B, C_old, H, W) full-resolution old-model logits.

        Returns:
            The new labels and the masks/factors the classification loss needs.
        """
        mask_background = labels < self.old_classes
        if self.mode == "naive":
            new_labels = torch.where(mask_background, outputs_old.argmax(dim=1), labels)
            return PseudoLabels(new_labels, mask_background)

        probs = torch.softmax(outputs_old.float(), dim=1)  # (B, C_old, H, W)
        max_probs, pseudo = probs.max(dim=1)  # (B, H, W) each
        ignore = torch.full_like(pseudo, IGNORE_INDEX)
        if self.mode == "confidence":
            new_labels = torch.where(mask_background, pseudo, labels)
            weights = torch.where(mask_background, max_probs, torch.ones_like(max_probs))
            return PseudoLabels(new_labels, mask_background, sample_weights=weights)
        if self.mode == "entropy":
            return self._entropy(labels, probs, pseudo, mask_background)
        if self.mode == "median":
            rejected = max_probs < self.thresholds.to(probs.device)[pseudo]
        else:  # threshold_<t>
            rejected = max_probs < self.fixed_threshold
        pseudo = torch.where(rejected, ignore, pseudo)
        return PseudoLabels(torch.where(mask_background, pseudo, labels), mask_background)

    def _entropy(
        self, labels: Tensor, probs: Tensor, pseudo: Tensor, mask_background: Tensor
    ) -> PseudoLabels:
        thresholds = self.thresholds.to(probs.device)
        mask_valid = entropy(probs) / self.max_entropy < thresholds[pseudo]  # (B, H, W)
        confident = mask_valid & mask_background
        new_labels = labels
        if self.pseudo_soft is None:
            new_labels = labels.masked_fill(mask_background & ~mask_valid, IGNORE_INDEX)
            if self.pseudo_ablation is None:
                new_labels = torch.where(confident, pseudo, new_labels)
            elif self.pseudo_ablation == "removed_errors":
                error = new_labels != pseudo
                new_labels = torch.where(confident & ~error, pseudo, new_labels)
                new_labels = new_labels.masked_fill(confident & error, IGNORE_INDEX)
            # "corrected_errors": valid pixels keep their label (the GT with data_masking current+old).
        elif self.pseudo_soft == "soft_uncertain":
            new_labels = torch.where(confident, pseudo, labels)
        else:  # soft_certain leaves the labels as they are
            new_labels = labels.clone()

        factor: Tensor | float = 1.0
        if self.classif_adaptive_factor:
            spatial = tuple(range(1, labels.dim()))  # (1, 2) for images, (1,) for point clouds
            num = confident.float().sum(dim=spatial)  # confident background pixels per image
            den = mask_background.float().sum(dim=spatial)  # background pixels per image
            factor = (num / (den + 1e-6)).view(-1, *[1] * len(spatial))  # (B, 1, 1), or (B, 1) per cloud
            if self.classif_adaptive_min_factor:
                factor = factor.clamp(min=self.classif_adaptive_min_factor)
        return PseudoLabels(new_labels, mask_background, mask_valid, factor, pseudo_targets=pseudo)
