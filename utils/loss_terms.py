"""The training objective as a dictionary of loss terms, one per method component.

The reference computes them inline in ``train.py`` (``Trainer.__init__``, ``Trainer.train``,
``Trainer.validate``); the README's "Methods and adding a new one" says how a method is added here.

Each method component is a small :class:`LossTerm` that reads a :class:`StepBatch` and returns its weighted
scalar; the Trainer does ``losses = {name: term(batch) for name, term in terms.items()}``, sums them,
backpropagates and logs the dict (``REFERENCE_LOG_NAMES`` maps the keys to the reference's log labels).
:meth:`LossTerm.validation_loss` gives the reference's validation variant of the same term (unweighted,
as in ``Trainer.validate``), or None where validation does not compute it.

Only the ``from_opts`` classmethods and the module-level builders read ``opts``; the term classes take
explicit arguments so that tests (and other tools) can build them directly.

Typical Trainer use (step > 0 shown)::

    info = StepInfo.from_classes(step, classes, opts.num_classes, opts.dataset)
    terms = build_loss_terms(opts, info, output_stride=opts.output_stride, model=model)
    with torch.no_grad():                           # if needs_old_outputs(opts, info)
        outputs_old, features_old = model_old(images, ret_intermediate=needs_intermediate(opts))
    pseudo = labeler(labels, outputs_old) if labeler else None      # PseudoLabeler.from_opts(...)
    outputs, features = model(images, ret_intermediate=needs_intermediate(opts))
    batch = StepBatch(images, pseudo.labels if pseudo else labels, labels, outputs, features,
                      outputs_old, features_old, pseudo)
    losses = {name: term(batch) for name, term in terms.items()}
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import OptionsError
from utils.logger import get_logger
from utils.loss import (
    IGNORE_INDEX,
    NCA,
    BCESigmoid,
    BCEWithLogitsLossWithIgnoreIndex,
    FocalLoss,
    FocalLossNew,
    IcarlLoss,
    KnowledgeDistillationLoss,
    LabelGuidedKnowledgeDistillationLoss,
    UnbiasedCrossEntropy,
    UnbiasedKnowledgeDistillationLoss,
    UnbiasedNCA,
    entropy,
    soft_crossentropy,
    upcast_fp32,
)
from utils.pod import check_pod_options, features_distillation
from utils.pseudo_label import PseudoLabels

__all__ = [
    "REFERENCE_LOG_NAMES",
    "ClassificationTerm",
    "EncoderKDTerm",
    "EntropyMinTerm",
    "ICaRLTerm",
    "LossTerm",
    "OutputKDTerm",
    "PODTerm",
    "StepBatch",
    "StepInfo",
    "build_criterion",
    "build_loss_terms",
    "check_loss_options",
    "criterion_kind",
    "downsample_labels",
    "needs_intermediate",
    "needs_old_outputs",
]

logger = get_logger("utils.loss_terms")

# Keys of the loss dict -> labels of the reference's "Loss made of: CE, LKD, LDE, LReg, POD, EntMin" line.
REFERENCE_LOG_NAMES = {
    "ce": "CE",
    "kd": "LKD",
    "de": "LDE",
    "reg": "LReg",
    "pod": "POD",
    "entmin": "EntMin",
    "icarl": "LICaRL",
}


@dataclass(frozen=True)
class StepInfo:
    """Class bookkeeping of one incremental step (reference ``Trainer.__init__``).

    Attributes:
        step: the step index.
        old_classes: ``C_old``, classes of the previous-step model (background included).
        current_classes: ``C_new``, classes of the current model.
        new_classes: ``N_new = C_new - C_old``, classes added at this step.
        num_classes: classes of the dataset (21 VOC, 151 ADE, 19 Cityscapes).
        dataset: "voc", "ade" or "cityscapes_domain".
        has_old_model: a frozen previous-step model is available (training at step > 0).
    """

    step: int
    old_classes: int
    current_classes: int
    new_classes: int
    num_classes: int
    dataset: str
    has_old_model: bool = True

    @property
    def distill(self) -> bool:
        """True when the old-model terms (KD, POD, pseudo-labels, ...) apply: step > 0 with an old model."""
        return self.step > 0 and self.has_old_model

    @classmethod
    def from_classes(
        cls,
        step: int,
        classes: list[int] | None,
        num_classes: int,
        dataset: str,
        has_old_model: bool | None = None,
    ) -> StepInfo:
        """Class counts as the reference Trainer derives them.

        Args:
            step: the step index.
            classes: classes per step up to this one (``get_per_task_classes``), or None in test mode.
            num_classes: classes of the dataset.
            dataset: dataset name.
            has_old_model: defaults to ``step > 0 and classes is not None`` (test mode has no old model).

        ``cityscapes_domain``: every count is ``num_classes`` (19: domains, not classes, are incremental).
        ``classes`` None (test mode): ``old_classes = 0``, ``current_classes = num_classes``,
        ``new_classes = 0``.
        """
        if has_old_model is None:
            has_old_model = step > 0 and classes is not None
        if dataset == "cityscapes_domain":
            counts = (num_classes, num_classes, num_classes)
        elif classes is not None:
            current = sum(classes)
            counts = (current - classes[-1], current, classes[-1])
        else:
            counts = (0, num_classes, 0)
        return cls(step, *counts, num_classes=num_classes, dataset=dataset, has_old_model=has_old_model)


@dataclass
class StepBatch:
    """Everything a loss term may read for one batch.

    Shapes are written for images; for point clouds every (H, W) is (N,): images (B, 9, N) points, labels
    (B, N), outputs (B, C_new, N), and the features of the point-cloud model.

    Attributes:
        images: (B, 3, H, W) input images.
        labels: (B, H, W) long labels *after* pseudo-labelling (``pseudo.labels``; the ground truth when
            there is no pseudo-labelling; the test labels in validation).
        original_labels: (B, H, W) long ground truth, never modified (KD, LGKD and POD use it).
        outputs: (B, C_new, H, W) full-resolution logits of the current model.
        features: the current model's intermediate dict (``body``, ``attentions``, ``sem_logits_small``,
            ...) or ``{}``.
        outputs_old: (B, C_old, H, W) full-resolution old-model logits, or None.
        features_old: the old model's intermediate dict, or None.
        pseudo: the :class:`~utils.pseudo_label.PseudoLabels` of this batch, or None.
    """

    images: Tensor
    labels: Tensor
    original_labels: Tensor
    outputs: Tensor
    features: Mapping[str, Any] = field(default_factory=dict)
    outputs_old: Tensor | None = None
    features_old: Mapping[str, Any] | None = None
    pseudo: PseudoLabels | None = None


class LossTerm(nn.Module):
    """One component of the objective.

    ``forward(batch)`` returns the weighted scalar added to the training loss; ``validation_loss(batch)``
    returns the reference's validation variant (unweighted), or None when validation does not compute it.
    """

    name: ClassVar[str]

    def forward(self, batch: StepBatch) -> Tensor:
        raise NotImplementedError

    def validation_loss(self, batch: StepBatch) -> Tensor | None:
        return None


def _require(value: Any, what: str, term: str) -> Any:
    if value is None:
        raise ValueError(f"The {term!r} loss term needs {what} in the StepBatch.")
    return value


# --- classification -------------------------------------------------------------------------------------


def criterion_kind(opts: argparse.Namespace, has_old_classes: bool) -> str:
    """Which criterion :func:`build_criterion` builds, by the reference's first-match order: ``bce``,
    ``unce``, ``nca``, ``focal``, ``focal_new`` or ``ce``. Also read by :func:`check_loss_options`."""
    if opts.bce or opts.icarl:
        return "bce"
    if opts.unce and has_old_classes:
        return "unce"
    if opts.nca:
        return "nca"
    if opts.focal_loss:
        return "focal"
    if opts.focal_loss_new:
        return "focal_new"
    return "ce"


def build_criterion(opts: argparse.Namespace, info: StepInfo, model: nn.Module | None = None) -> nn.Module:
    """The per-pixel criterion of the reference's ``Trainer.__init__`` (reduction "none", ignore index 255),
    first match wins.

    ``bce``/``icarl`` -> BCE with ignore; ``unce`` with ``C_old != 0`` -> unbiased CE; ``nca`` with
    ``C_old != 0`` -> unbiased NCA; ``nca`` -> NCA; ``focal_loss`` -> focal; ``focal_loss_new`` -> focal on
    new classes; otherwise cross-entropy. NCA uses the model's cosine scalar (``model.scalar``).
    """
    old = info.old_classes
    kind = criterion_kind(opts, has_old_classes=old != 0)
    if kind == "bce":
        return BCEWithLogitsLossWithIgnoreIndex(reduction="none")
    if kind == "unce":
        return UnbiasedCrossEntropy(old_cl=old, reduction="none", ignore_index=IGNORE_INDEX)
    if kind == "nca":
        scale = getattr(model, "scalar", None) if model is not None else None
        if scale is None:
            # The reference multiplied by the missing scalar and crashed.
            raise OptionsError(_NCA_NEEDS_COSINE)
        if old != 0:
            return UnbiasedNCA(old_cl=old, scale=scale, margin=opts.nca_margin, reduction="none")
        return NCA(scale=scale, margin=opts.nca_margin, reduction="none")
    if kind == "focal":
        return FocalLoss(alpha=opts.alpha, gamma=opts.focal_loss_gamma, reduction="none")
    if kind == "focal_new":
        return FocalLossNew(alpha=opts.alpha, gamma=opts.focal_loss_gamma, index=old, reduction="none")
    return nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")


class ClassificationTerm(LossTerm):
    """The classification loss ``"ce"`` (reference ``Trainer.train``; MiB Eq. 4-5, PLOP Eq. 5).

    Per pixel, the first that applies: soft pseudo-label CE (``pseudo_soft``); ``IcarlLoss`` against the old
    sigmoids (``icarl_disjoint``); ``criterion(original labels, with confident pseudo-labelled pixels
    ignored) + CE(pseudo labels)`` (``ce_on_pseudo``); ``criterion`` with background ignored
    (``ce_on_new``); ``criterion(labels)``. Then multiplied by the per-pixel sample weights, by the per-image
    ``classif_adaptive_factor`` and averaged over all B·H·W pixels.

    Reference behaviour (RN-04): the average includes the ignored pixels (which contribute 0).

    Args:
        criterion: per-pixel criterion (reduction "none"), see :func:`build_criterion`.
        icarl_loss: ``IcarlLoss`` replacing the criterion (``icarl_disjoint`` at step > 0), or None.
        ce_on_new: ignore background pixels.
        ce_on_pseudo: separate CE on the confident pseudo-labelled pixels (entropy pseudo-labels).
        pseudo_soft: None, "soft_certain" or "soft_uncertain".
        pseudo_soft_factor: weight of the uncertain part of the soft CE.
        sample_weights_new: constant per-pixel weight, or None.
    """

    name = "ce"

    def __init__(
        self,
        criterion: nn.Module,
        icarl_loss: IcarlLoss | None = None,
        ce_on_new: bool = False,
        ce_on_pseudo: bool = False,
        pseudo_soft: str | None = None,
        pseudo_soft_factor: float = 1.0,
        sample_weights_new: float | None = None,
    ):
        super().__init__()
        self.criterion = criterion
        self.icarl_loss = icarl_loss
        self.ce_on_new = ce_on_new
        self.ce_on_pseudo = ce_on_pseudo
        self.pseudo_soft = pseudo_soft
        self.pseudo_soft_factor = pseudo_soft_factor
        self.sample_weights_new = sample_weights_new

    @classmethod
    def from_opts(
        cls, opts: argparse.Namespace, info: StepInfo, model: nn.Module | None = None
    ) -> ClassificationTerm:
        _check_pseudo_soft(opts, info.distill)
        icarl_loss = None
        if info.distill and opts.icarl and opts.icarl_disjoint:
            icarl_loss = IcarlLoss(reduction="mean", bkg=opts.icarl_bkg)
        return cls(
            build_criterion(opts, info, model),
            icarl_loss=icarl_loss,
            ce_on_new=opts.ce_on_new,
            ce_on_pseudo=opts.ce_on_pseudo and info.distill,
            pseudo_soft=opts.pseudo_soft if info.distill else None,
            pseudo_soft_factor=opts.pseudo_soft_factor,
            sample_weights_new=opts.sample_weights_new,
        )

    def _criterion(self, outputs: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is None:
            return self.criterion(outputs, labels)
        if isinstance(self.criterion, (UnbiasedCrossEntropy, UnbiasedNCA)):
            return self.criterion(outputs, labels, mask=mask)
        # Criteria without a ``mask`` argument (the reference crashed): ignoring the masked pixels is what
        # the unbiased CE does with its mask.
        return self.criterion(outputs, labels.masked_fill(mask, IGNORE_INDEX))

    def per_pixel_loss(self, batch: StepBatch) -> Tensor:
        """(B, H, W) loss before sample weights and adaptive factor (a scalar with ``IcarlLoss``)."""
        outputs, labels, pseudo = upcast_fp32(batch.outputs), batch.labels, batch.pseudo
        if self.pseudo_soft is not None and pseudo is not None:
            return soft_crossentropy(
                outputs,
                labels,
                _require(batch.outputs_old, "outputs_old", self.name),
                pseudo.mask_valid,
                pseudo.mask_background,
                self.pseudo_soft,
                pseudo_soft_factor=self.pseudo_soft_factor,
            )
        if self.icarl_loss is not None:
            old_probs = torch.sigmoid(upcast_fp32(_require(batch.outputs_old, "outputs_old", self.name)))
            return self.icarl_loss(outputs, labels, old_probs)
        if self.ce_on_pseudo and pseudo is not None:
            confident = pseudo.mask_background & pseudo.mask_valid
            # Criterion on the ground truth, away from the confident pseudo-labelled pixels ...
            loss_not_pseudo = self._criterion(outputs, batch.original_labels, mask=confident)
            # ... plus plain CE on them (the two pixel sets are disjoint).
            pseudo_labels = torch.where(confident, pseudo.pseudo_targets, IGNORE_INDEX)
            loss_pseudo = F.cross_entropy(outputs, pseudo_labels, ignore_index=IGNORE_INDEX, reduction="none")
            return loss_pseudo + loss_not_pseudo
        if self.ce_on_new:
            return self._criterion(outputs, labels.masked_fill(labels == 0, IGNORE_INDEX))
        return self._criterion(outputs, labels)

    def forward(self, batch: StepBatch) -> Tensor:
        loss = self.per_pixel_loss(batch)
        sample_weights = batch.pseudo.sample_weights if batch.pseudo is not None else None
        if self.sample_weights_new is not None:
            # Reference behaviour (RN-18): the weight was meant for new-class pixels, but its selection
            # (label >= 0) is every pixel.
            sample_weights = torch.full_like(batch.original_labels, self.sample_weights_new, dtype=loss.dtype)
        if sample_weights is not None:
            loss = loss * sample_weights
        factor = batch.pseudo.classif_adaptive_factor if batch.pseudo is not None else 1.0
        # Reference behaviour (RN-04): mean over all B*H*W pixels, ignored ones included.
        return (factor * loss).mean()

    def validation_loss(self, batch: StepBatch) -> Tensor:
        """Mean of the criterion over all pixels; no pseudo-labels, weights or adaptive factor
        (reference ``Trainer.validate``)."""
        outputs = upcast_fp32(batch.outputs)
        if self.icarl_loss is not None and batch.outputs_old is not None:
            old_probs = torch.sigmoid(upcast_fp32(batch.outputs_old))
            return self.icarl_loss(outputs, batch.labels, old_probs).mean()
        return self.criterion(outputs, batch.labels).mean()


# --- output distillation --------------------------------------------------------------------------------


def downsample_labels(labels: Tensor, output_stride: int, size: tuple[int, ...] | torch.Size) -> Tensor:
    """Labels at the small-logit resolution for LGKD: nearest ``F.interpolate(scale_factor=1/output_stride)``.

    At output stride 16 this picks ``label[16i, 16j]`` (reference ``Trainer.train``, LGKD branch). The
    reference always used 1/16, which broke output stride 8 (RN-13); here the stride is the model's. When the
    input size is not a multiple of the stride, the labels are resized to the logits' ``size`` instead (the
    reference crashed).

    Labels that already have the logits' size are returned as they are, whatever ``output_stride``: this is
    the point-cloud case, where the model gives one logit vector per point (``sem_logits_small`` is the
    full (B, C, N) output) and every point keeps its own label; an image model's small logits are always
    smaller than its labels.

    Args:
        labels: (B, H, W) labels, or (B, N) point labels.
        output_stride: the backbone output stride (8 or 16).
        size: (h, w) of the small logits, or (N,).

    Returns:
        (B, h, w) long labels ((B, N) for point clouds).
    """
    if tuple(labels.shape[1:]) == tuple(size):
        return labels.long()
    as_float = labels[:, None].float()  # (B, 1, H, W); 255 is exact in float
    small = F.interpolate(as_float, scale_factor=1.0 / output_stride, mode="nearest")
    if tuple(small.shape[-2:]) != tuple(size):
        small = F.interpolate(as_float, size=tuple(size), mode="nearest")
    return small[:, 0].long()


class OutputKDTerm(LossTerm):
    """Output distillation ``"kd"``: KD (LwF), unbiased KD (MiB), LGKD or sigmoid-BCE KD (reference
    ``Trainer.__init__``, ``Trainer.train``).

    Training: ``loss_kd * mean(loss)`` (times ``sqrt(C_new / N_new)`` with ``--kd_scheduling``). LGKD runs on
    the small pre-upsampling logits ``features["sem_logits_small"]`` with the original labels downsampled
    by the output stride; the others on the full-resolution logits. Validation: the unweighted loss, LGKD on
    the full-resolution logits and labels (reference ``Trainer.validate``, RN-28).

    Point clouds: the per-point logits are the model's only resolution (``sem_logits_small`` is the output
    itself), so LGKD distils every point with its own label (:func:`downsample_labels` leaves labels of the
    logits' size unchanged): no 1/16 sub-sampling, and training and validation compute the same loss.

    Args:
        loss: the distillation loss module.
        weight: ``--loss_kd``.
        label_guided: the loss is LGKD (takes labels, small logits at training).
        output_stride: backbone output stride, to downsample the labels for LGKD.
        schedule: extra multiplier, ``sqrt(C_new / N_new)`` with ``--kd_scheduling``, else 1.
    """

    name = "kd"

    def __init__(
        self,
        loss: nn.Module,
        weight: float,
        label_guided: bool = False,
        output_stride: int = 16,
        schedule: float = 1.0,
    ):
        super().__init__()
        self.loss = loss
        self.weight = weight
        self.label_guided = label_guided
        self.output_stride = output_stride
        self.schedule = schedule

    @classmethod
    def from_opts(cls, opts: argparse.Namespace, info: StepInfo, output_stride: int) -> OutputKDTerm:
        """First match: ``unkd`` -> unbiased KD; ``lgkd`` -> LGKD; ``kd_bce_sig`` -> sigmoid BCE; otherwise KD
        (``exkd_*`` are refused, :func:`check_loss_options`)."""
        check_loss_options(opts)
        label_guided = False
        if opts.unkd:
            loss: nn.Module = UnbiasedKnowledgeDistillationLoss(reduction="none", alpha=opts.alpha)
        elif opts.lgkd:
            loss = LabelGuidedKnowledgeDistillationLoss(
                reduction="mean", alpha=opts.alpha, prev_kd=opts.prev_kd, novel_kd=opts.novel_kd
            )
            label_guided = True
            logger.info(f"prev kd: {opts.prev_kd}\t novel kd: {opts.novel_kd}")
        elif opts.kd_bce_sig:
            loss = BCESigmoid(reduction="mean", alpha=opts.alpha, shape=opts.kd_bce_sig_shape)
        else:
            loss = KnowledgeDistillationLoss(reduction="mean", alpha=opts.alpha)
        schedule = math.sqrt(info.current_classes / info.new_classes) if opts.kd_scheduling else 1.0
        return cls(loss, opts.loss_kd, label_guided, output_stride, schedule)

    def forward(self, batch: StepBatch) -> Tensor:
        if self.label_guided:
            features_old = _require(batch.features_old, "features_old", self.name)
            logits = batch.features["sem_logits_small"]  # (B, C_new, h, w), or (B, C_new, N) per point
            labels = downsample_labels(batch.original_labels, self.output_stride, logits.shape[2:])
            loss = self.loss(logits, features_old["sem_logits_small"], labels)
        else:
            loss = self.loss(batch.outputs, _require(batch.outputs_old, "outputs_old", self.name))
        return (self.weight * loss).mean() * self.schedule

    def validation_loss(self, batch: StepBatch) -> Tensor | None:
        if batch.outputs_old is None:
            return None
        # Reference behaviour (RN-28): unweighted; LGKD on full-resolution logits and labels.
        if self.label_guided:
            return self.loss(batch.outputs, batch.outputs_old, batch.labels).mean()
        return self.loss(batch.outputs, batch.outputs_old).mean()


class EncoderKDTerm(LossTerm):
    """ILT encoder distillation ``"de"`` (Michieli & Zanuttigh, ICCVW 2019).

    ``loss_de * MSE(features["body"], features_old["body"])`` over all elements of the backbone output.

    Args:
        weight: ``--loss_de``.
    """

    name = "de"

    def __init__(self, weight: float):
        super().__init__()
        self.weight = weight

    def _mse(self, batch: StepBatch) -> Tensor:
        features_old = _require(batch.features_old, "features_old", self.name)
        return F.mse_loss(upcast_fp32(batch.features["body"]), upcast_fp32(features_old["body"]))

    def forward(self, batch: StepBatch) -> Tensor:
        return self.weight * self._mse(batch)

    def validation_loss(self, batch: StepBatch) -> Tensor | None:
        if batch.features_old is None:
            return None
        return self._mse(batch)  # Reference behaviour (RN-28): unweighted


class ICaRLTerm(LossTerm):
    """LwF-MC / iCaRL distillation ``"icarl"`` (Rebuffi et al., CVPR 2017; reference
    ``Trainer.train`` ``icarl_combined``).

    ``icarl_importance * C_old * BCEWithLogits_mean(z[:, :C_old], sigmoid(z_old))``: the mean over
    B·C_old·H·W times ``C_old`` sums over the classes.

    Args:
        importance: ``--icarl_importance``.
    """

    name = "icarl"

    def __init__(self, importance: float):
        super().__init__()
        self.importance = importance

    def forward(self, batch: StepBatch) -> Tensor:
        outputs_old = upcast_fp32(_require(batch.outputs_old, "outputs_old", self.name))
        old_cl = outputs_old.shape[1]
        outputs = upcast_fp32(batch.outputs[:, :old_cl])
        bce = F.binary_cross_entropy_with_logits(outputs, torch.sigmoid(outputs_old))
        return self.importance * old_cl * bce

    def validation_loss(self, batch: StepBatch) -> Tensor | None:
        """The training value, *weighted*: the reference's ``validate`` adds
        ``icarl_importance * C_old * BCE`` to the reg loss, unlike the KD/ILT/regulariser terms, which it
        adds unweighted."""
        if batch.outputs_old is None:
            return None
        return self(batch)


class PODTerm(LossTerm):
    """PLOP's Local POD ``"pod"`` (Douillard et al., CVPR 2021, Eq. 1-3).

    Distils the old model's ``attentions`` (4 backbone stages + head output), plus the small logits with
    ``--pod_logits`` or else the full-resolution logits with ``--pod_large_logits``, using
    :func:`utils.pod.features_distillation` with the original labels. Not computed at validation.

    Args:
        index_new_class: ``C_old``.
        nb_current_classes: ``C_new``.
        nb_new_classes: ``N_new``.
        pod_logits: append the small logits.
        pod_large_logits: append the full-resolution logits (when ``pod_logits`` is off).
        **pod_kwargs: keyword arguments of :func:`~utils.pod.features_distillation`
            (``collapse_channels``, ``pod_factor``, ``pod_options``, ``prepro``, ...).
    """

    name = "pod"

    def __init__(
        self,
        index_new_class: int,
        nb_current_classes: int,
        nb_new_classes: int,
        pod_logits: bool = False,
        pod_large_logits: bool = False,
        **pod_kwargs: Any,
    ):
        super().__init__()
        self.index_new_class = index_new_class
        self.nb_current_classes = nb_current_classes
        self.nb_new_classes = nb_new_classes
        self.pod_logits = pod_logits
        self.pod_large_logits = pod_large_logits
        self.pod_kwargs = pod_kwargs

    @classmethod
    def from_opts(cls, opts: argparse.Namespace, info: StepInfo) -> PODTerm:
        # Refuse malformed options before training starts; a JSON text (hand-built options) is parsed here.
        pod_options = check_pod_options(opts.pod_options, opts.pod_prepro)
        return cls(
            index_new_class=info.old_classes,
            nb_current_classes=info.current_classes,
            nb_new_classes=info.new_classes,
            pod_logits=opts.pod_logits,
            pod_large_logits=opts.pod_large_logits,
            collapse_channels=opts.pod,
            pod_apply=opts.pod_apply,
            pod_deeplab_mask=opts.pod_deeplab_mask,
            pod_deeplab_mask_factor=opts.pod_deeplab_mask_factor,
            interpolate_last=opts.pod_interpolate_last,
            pod_factor=opts.pod_factor,
            prepro=opts.pod_prepro,
            deeplabmask_upscale=not opts.deeplab_mask_downscale,
            spp_scales=list(opts.spp_scales),
            pod_options=pod_options,
            use_pod_schedule=not opts.no_pod_schedule,
        )

    def forward(self, batch: StepBatch) -> Tensor:
        features_old = _require(batch.features_old, "features_old", self.name)
        # New lists: the reference appended the logits to the models' own ``attentions`` lists.
        attentions_old = list(features_old["attentions"])
        attentions_new = list(batch.features["attentions"])
        if self.pod_logits:
            attentions_old.append(features_old["sem_logits_small"])
            attentions_new.append(batch.features["sem_logits_small"])
        elif self.pod_large_logits:
            attentions_old.append(_require(batch.outputs_old, "outputs_old", self.name))
            attentions_new.append(batch.outputs)
        return features_distillation(
            attentions_old,
            attentions_new,
            labels=batch.original_labels,
            index_new_class=self.index_new_class,
            outputs_old=batch.outputs_old,
            nb_current_classes=self.nb_current_classes,
            nb_new_classes=self.nb_new_classes,
            **self.pod_kwargs,
        )


class EntropyMinTerm(LossTerm):
    """Entropy minimisation ``"entmin"`` on pixels not labelled with a class (reference
    ``Trainer.train``, ``entropy_min`` branch).

    ``mean_b( sum_{labels == 0} E(softmax(z)) / |labels == 0| )`` with ``E`` the entropy of
    :func:`utils.loss.entropy` (after pseudo-labelling; 255 counts as labelled). An image without such
    pixels contributes 0 (the reference divided by zero).

    Reference behaviour (RN-17): the ``--entropy_min`` value only switches the term on; its weight is 1.
    """

    name = "entmin"

    def forward(self, batch: StepBatch) -> Tensor:
        labelled = batch.labels > 0  # (B, H, W) or (B, N)
        entropies = entropy(torch.softmax(upcast_fp32(batch.outputs), dim=1)).masked_fill(labelled, 0.0)
        spatial = tuple(range(1, labelled.dim()))  # every axis but the batch
        pixel_amount = (~labelled).sum(dim=spatial).clamp(min=1).to(entropies.dtype)
        return (entropies.sum(dim=spatial) / pixel_amount).mean()


# --- builders -------------------------------------------------------------------------------------------


_NCA_NEEDS_COSINE = (
    "--nca scales the logits by the cosine classifier's learnable scalar, which only --cosine creates: add "
    "--cosine (code that builds the criterion itself must pass the model)."
)


def _check_pseudo_soft(opts: argparse.Namespace, distill: bool) -> None:
    # The reference read variables that only the entropy mode defines (NameError/assert), at steps > 0.
    if distill and (opts.pseudo_soft or opts.ce_on_pseudo) and opts.pseudo != "entropy":
        raise OptionsError("--pseudo_soft and --ce_on_pseudo need --pseudo entropy.")


def check_loss_options(opts: argparse.Namespace) -> None:
    """Refuse loss options that cannot work; ``argparser.validate_options`` calls this before any work, so a
    step > 0 stops in a second instead of after its data scan and model loading.

    Raises:
        OptionsError: ``--exkd_gt`` / ``--exkd_sum`` (RN-16: excluded KD crashes in the reference's training
            loop); ``--nca`` reached by :func:`build_criterion` without ``--cosine`` (no scalar to scale
            by); at a step > 0, ``--pseudo_soft`` / ``--ce_on_pseudo`` without ``--pseudo entropy``.
    """
    if opts.exkd_gt or opts.exkd_sum:
        raise OptionsError(
            "--exkd_gt/--exkd_sum (excluded knowledge distillation) crash in the reference training "
            "loop (RN-16) and are not supported. Remove them; use --loss_kd with --unkd, --lgkd or plain KD."
        )
    # A step > 0 has old classes.
    if criterion_kind(opts, has_old_classes=opts.step > 0) == "nca" and not opts.cosine:
        raise OptionsError(_NCA_NEEDS_COSINE)
    _check_pseudo_soft(opts, opts.step > 0)


def build_loss_terms(
    opts: argparse.Namespace, info: StepInfo, output_stride: int, model: nn.Module | None = None
) -> nn.ModuleDict:
    """The loss terms of this step, in the order ce, kd, de, icarl, pod, entmin.

    Args:
        opts: resolved options (after ``modify_command_options``).
        info: class bookkeeping of the step.
        output_stride: backbone output stride (LGKD label downsampling).
        model: the current (unwrapped) model; only read for ``--nca`` (its cosine ``scalar``).

    Returns:
        ``nn.ModuleDict`` name -> :class:`LossTerm`. "ce" is always present; the old-model terms only
        when ``info.distill``; "entmin" at step > 0.
    """
    terms: dict[str, LossTerm] = {"ce": ClassificationTerm.from_opts(opts, info, model)}
    if info.distill and opts.loss_kd > 0:
        terms["kd"] = OutputKDTerm.from_opts(opts, info, output_stride)
    if info.distill and opts.loss_de > 0:
        terms["de"] = EncoderKDTerm(opts.loss_de)
    if info.distill and opts.icarl and not opts.icarl_disjoint:
        terms["icarl"] = ICaRLTerm(opts.icarl_importance)
    if info.distill and opts.pod is not None:
        terms["pod"] = PODTerm.from_opts(opts, info)
    if info.step > 0 and opts.entropy_min > 0:
        terms["entmin"] = EntropyMinTerm()
    return nn.ModuleDict(terms)


def needs_old_outputs(opts: argparse.Namespace, info: StepInfo, validation: bool = False) -> bool:
    """Whether the old model must run on the batch (reference ``Trainer.train``, ``Trainer.validate``).

    Training: any of ILT (``loss_de``), KD (``loss_kd``), iCaRL distillation, POD or pseudo-labelling at
    step > 0 with an old model. Validation: ILT, KD or iCaRL distillation.
    """
    if not info.distill:
        return False
    active = opts.loss_de > 0 or opts.loss_kd > 0 or bool(opts.icarl)
    if validation:
        return active
    return active or opts.pod is not None or opts.pseudo is not None


def needs_intermediate(opts: argparse.Namespace) -> bool:
    """Whether the models must return their intermediate features (``ret_intermediate``).

    The reference asked for them for ``loss_de`` or POD only, so ``--lgkd`` without POD crashed (RN-14);
    LGKD with ``loss_kd > 0`` also needs the small logits.
    """
    return bool(opts.loss_de) or opts.pod is not None or (bool(opts.lgkd) and opts.loss_kd > 0)
