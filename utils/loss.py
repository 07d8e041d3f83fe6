"""Per-pixel classification criteria and output-distillation losses.

Class names, constructor arguments and call signatures are those of the reference ``utils/loss.py`` so that
code written against it keeps working. Every loss computes in fp32 whatever the input dtype (the logits may
come from an fp16/bf16 autocast region), and float64 inputs stay float64 so that ``gradcheck`` works.

Shapes: ``B`` batch, ``C_new`` classes of the current model, ``C_old`` classes of the previous-step model,
``H×W`` the spatial size of the logits passed in (full resolution or the small pre-upsampling map). Every
loss takes any number of spatial axes: point-cloud logits (B, C, N) with labels (B, N) give the same
per-point values as the same numbers laid out as an image (B, C, N, 1) with labels (B, N, 1).

Where the reference returns NaN (a "mean" over an empty pixel set, e.g. an all-ignored batch) these losses
return a zero that stays connected to the graph, so that ``backward()`` and DDP keep working.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255

__all__ = [
    "BCE_SIGMOID_SHAPES",
    "BCESigmoid",
    "BCEWithLogitsLossWithIgnoreIndex",
    "FocalLoss",
    "FocalLossNew",
    "IcarlLoss",
    "KnowledgeDistillationLoss",
    "LabelGuidedKnowledgeDistillationLoss",
    "NCA",
    "UnbiasedCrossEntropy",
    "UnbiasedKnowledgeDistillationLoss",
    "UnbiasedNCA",
    "entropy",
    "soft_crossentropy",
    "upcast_fp32",
]


def upcast_fp32(x: Tensor) -> Tensor:
    """Upcast half/bfloat16 to float32; keep float32 and float64 as they are.

    Every loss computes in fp32 whatever the autocast dtype of its inputs (losses, POD and loss terms).
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"Unknown reduction {reduction!r}: expected 'mean', 'sum' or 'none'.")


def _one_hot_ignore(targets: Tensor, num_classes: int, ignore_index: int, dtype: torch.dtype) -> Tensor:
    """One-hot (B, C, *) targets of (B, *) labels; ignored pixels get an all-zero vector.

    Written with ``scatter_`` instead of ``F.one_hot``, which on the CPU reads the labels' minimum and
    maximum back to the host on every call (two synchronisations per training iteration of LWF-MC/BCE);
    ``scatter_`` checks its indices inside the kernel. Same 0/1 values.
    """
    # The ignored label is sent to an extra channel C that is then dropped: (B, H, W) -> (B, C+1, H, W).
    labels = torch.where(targets != ignore_index, targets, num_classes).long()
    batch, *spatial = labels.shape
    one_hot = torch.zeros((batch, num_classes + 1, *spatial), dtype=dtype, device=labels.device)
    one_hot.scatter_(1, labels.unsqueeze(1), 1.0)
    return one_hot[:, :num_classes]


def entropy(probabilities: Tensor) -> Tensor:
    """Normalised entropy of a probability map, as used by PLOP's pseudo-labelling (reference
    ``train.py`` ``entropy``).

    ``E(P) = -(1 / ln(C + 1e-8)) * mean_c [P_c * ln(P_c + 1e-8)]`` over the channel axis.

    Reference behaviour (RN-05): the channel MEAN (not the sum) is taken, so ``E`` lies in ``[0, 1/C]``
    instead of ``[0, 1]``; PLOP's thresholds were tuned on this scale.

    Args:
        probabilities: (B, C, H, W) probabilities (softmax over dim 1).

    Returns:
        (B, H, W) entropy map.
    """
    probabilities = upcast_fp32(probabilities)
    factor = 1.0 / math.log(probabilities.shape[1] + 1e-8)
    return -factor * torch.mean(probabilities * torch.log(probabilities + 1e-8), dim=1)


class UnbiasedCrossEntropy(nn.Module):
    """MiB unbiased cross-entropy (Cermelli et al., CVPR 2020, Eq. 4-5).

    The background probability absorbs every class the current step does not label::

        ln p̂_0 = LSE(z_0 .. z_{C_old-1}) - LSE(z),     ln p̂_c = z_c - LSE(z)  for c >= C_old

    and ``loss = -ln p̂_y`` with every label ``< C_old`` mapped to 0 (channels 1..C_old-1 are never targeted).

    Args:
        old_cl: number of classes of the previous step, ``C_old``.
        reduction: "mean" (over non-ignored pixels), "sum" or "none" (B, H, W map, 0 where ignored).
        ignore_index: label excluded from the loss.
    """

    def __init__(self, old_cl: int | None = None, reduction: str = "mean", ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.old_cl = old_cl
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: inputs (B, C_new, H, W) logits; targets (B, H, W) labels; mask (B, H, W) bool, to ignore."""
        if self.old_cl is None:
            raise ValueError("UnbiasedCrossEntropy needs old_cl (the number of previous-step classes).")
        inputs = upcast_fp32(inputs)
        old_cl = self.old_cl
        den = torch.logsumexp(inputs, dim=1)  # (B, H, W)
        log_bg = torch.logsumexp(inputs[:, :old_cl], dim=1) - den  # (B, H, W)
        # Channels 1..C_old-1 are filled with 0 like the reference; no label points at them.
        log_probs = torch.cat(
            [log_bg[:, None], torch.zeros_like(inputs[:, 1:old_cl]), inputs[:, old_cl:] - den[:, None]], dim=1
        )
        labels = torch.where(targets < old_cl, torch.zeros_like(targets), targets)
        if mask is not None:
            labels = torch.where(mask, torch.full_like(labels, self.ignore_index), labels)
        if self.reduction == "mean":
            # Sum over labelled pixels / their count; an all-ignored batch gives 0 (reference: NaN).
            count = (labels != self.ignore_index).sum().clamp(min=1)
            return F.nll_loss(log_probs, labels, ignore_index=self.ignore_index, reduction="sum") / count
        return F.nll_loss(log_probs, labels, ignore_index=self.ignore_index, reduction=self.reduction)


class KnowledgeDistillationLoss(nn.Module):
    """LwF-style output distillation (Li & Hoiem, ECCV 2016).

    With ``q = softmax(alpha * z_old)`` and ``l = log_softmax(z[:, :C_old])``::

        L = -(1 / (B*H*W*C_old)) * sum_pixels sum_{c < C_old} q_c * l_c

    i.e. the mean is taken over classes and pixels.

    ``kd_cil_weights`` (an option of the reference's constructor that no flag sets) weights each pixel by
    ``w = 1 + H(softmax(z_old))``, the entropy (natural log, summed over the ``C_old`` classes, without
    ``alpha``) of the old model's prediction plus one. Reference behaviour, kept: the reference multiplies
    the (B, H, W) loss by ``w[:, None]`` (B, 1, H, W), which broadcasts to (B, B, H, W) with entry
    ``[i, j] = w_i * loss_j``; "mean" is then ``mean_{h,w}(mean_i w_i * mean_j loss_j)`` and "none" returns
    that (B, B, H, W) tensor. With one image per batch this is the per-pixel weighting.

    Args:
        reduction: "mean", "sum" or "none" (per-pixel ``-mean_c q_c l_c``, shape (B, H, W); (B, B, H, W)
            with ``kd_cil_weights``).
        alpha: multiplier of the old logits before the softmax.
        kd_cil_weights: weight pixels by ``1 + H(softmax(z_old))`` as described above.
    """

    def __init__(self, reduction: str = "mean", alpha: float = 1.0, kd_cil_weights: bool = False):
        super().__init__()
        self.reduction = reduction
        self.alpha = alpha
        self.kd_cil_weights = kd_cil_weights

    def forward(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: inputs (B, C_new, H, W) new logits; targets (B, C_old, H, W) old logits; mask (B, H, W)."""
        inputs, targets = upcast_fp32(inputs), upcast_fp32(targets)
        log_probs = torch.log_softmax(inputs[:, : targets.shape[1]], dim=1)  # (B, C_old, H, W)
        old_probs = torch.softmax(targets * self.alpha, dim=1)
        loss = (log_probs * old_probs).mean(dim=1)  # (B, H, W)
        if self.kd_cil_weights:
            # 1 + entropy of the old prediction, (B, H, W).
            weights = 1.0 - (torch.softmax(targets, dim=1) * torch.log_softmax(targets, dim=1)).sum(dim=1)
            # Reference behaviour (RN-42): (B, 1, H, W) * (B, H, W) -> (B, B, H, W).
            loss = loss * weights[:, None]
        if mask is not None:
            loss = loss * mask.to(loss.dtype)
        return -_reduce(loss, self.reduction)


class UnbiasedKnowledgeDistillationLoss(nn.Module):
    """MiB unbiased distillation (Cermelli et al., CVPR 2020, Eq. 6-7).

    With ``q = softmax(alpha * z_old)`` and ``LSE`` over all ``C_new`` channels::

        ln p̃_bg = LSE({z_0} ∪ {z_c : c >= C_old}) - LSE(z),   ln p̃_c = z_c - LSE(z)  (1 <= c < C_old)
        l = -(1 / C_old) * (q_0 ln p̃_bg + sum_{c=1}^{C_old-1} q_c ln p̃_c)

    The reference needs at least one new class (it slices ``1:-N_new``); this version also works with
    ``C_new == C_old`` (then ``p̃_bg = p_0``).

    Args:
        reduction: "mean", "sum" or "none" (per-pixel ``l``, shape (B, H, W)).
        alpha: multiplier of the old logits before the softmax.
    """

    def __init__(self, reduction: str = "mean", alpha: float = 1.0):
        super().__init__()
        self.reduction = reduction
        self.alpha = alpha

    def forward(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: inputs (B, C_new, H, W) new logits; targets (B, C_old, H, W) old logits; mask (B, H, W)."""
        inputs, targets = upcast_fp32(inputs), upcast_fp32(targets)
        old_cl = targets.shape[1]
        den = torch.logsumexp(inputs, dim=1)  # (B, H, W)
        log_old_fg = inputs[:, 1:old_cl] - den[:, None]  # (B, C_old-1, H, W)
        bg_and_new = torch.cat([inputs[:, :1], inputs[:, old_cl:]], dim=1)  # (B, 1+N_new, H, W)
        log_bg = torch.logsumexp(bg_and_new, dim=1) - den  # (B, H, W)
        old_probs = torch.softmax(targets * self.alpha, dim=1)
        loss = (old_probs[:, 0] * log_bg + (old_probs[:, 1:] * log_old_fg).sum(dim=1)) / old_cl
        if mask is not None:
            loss = loss * mask.to(loss.dtype)
        return -_reduce(loss, self.reduction)


class LabelGuidedKnowledgeDistillationLoss(nn.Module):
    """Label-guided knowledge distillation (LGKD; Yang et al., ICCV 2023).

    The ground truth ``T`` splits the non-ignored pixels into *previous* pixels ``Π = {T < C_old}``
    (background, including old classes turned into background by data masking) and *novel* pixels
    ``Ν = {C_old <= T < 255}``. The old distribution ``q = softmax(alpha * z_old)`` is zero-padded to
    ``C_new`` channels; on a novel pixel with label ``g`` the old background mass is moved onto ``g``
    (``q̃_g = q_0``, then ``q̃_0 = 0``; old foreground probabilities are kept). With
    ``l = log_softmax(z)`` over **all** ``C_new`` channels and ``s_p = sum_c q_c l_c`` (``q̃`` on Ν)::

        L = -(prev_kd * sum_{p in Π} s_p + novel_kd * sum_{p in Ν} s_p) / (|Π| + |Ν|)

    a weighted cross-entropy (not a KL, no division by the number of classes).

    Reductions: "mean" is the formula above; "sum" drops the division by ``|Π| + |Ν|``; "none" returns,
    as the reference does, the 1-D vector of the non-ignored pixels' ``-w_p * s_p`` (``w_p`` = prev_kd or
    novel_kd): every previous pixel first, then every novel pixel, each group in (b, h, w) order, so that
    its mean is the "mean" reduction. :meth:`loss_map` gives the same values as a (B, H, W) map (0 on
    ignored pixels). If no pixel is left, "mean" returns a zero that keeps the graph (the reference
    returns NaN, RN-14). A batch with a single novel pixel is computed like any other; the reference's
    in-place assignment fails there under current PyTorch (RN-38).

    Args:
        reduction: "mean", "sum" or "none".
        alpha: multiplier of the old logits before the softmax.
        prev_kd: weight of previous pixels.
        novel_kd: weight of novel pixels.
    """

    def __init__(
        self, reduction: str = "mean", alpha: float = 1.0, prev_kd: float = 10.0, novel_kd: float = 2.0
    ):
        super().__init__()
        self.reduction = reduction
        self.alpha = alpha
        self.prev_kd = prev_kd
        self.novel_kd = novel_kd

    def forward(self, inputs: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
        """Args: inputs (B, C_new, H, W) new logits; targets (B, C_old, H, W) old logits; labels
        (B, H, W) or (B, 1, H, W) ground truth at the logits' resolution (any integer or float dtype).
        Point clouds: (B, C, N) logits and (B, N) or (B, 1, N) labels."""
        loss, previous, novel = self._weighted_pixels(inputs, targets, labels)
        if self.reduction == "none":
            # Reference layout: (|Π| + |Ν|,) previous pixels, then novel ones (a host read for the sizes).
            flat = loss.reshape(-1)
            return torch.cat([flat[previous.reshape(-1)], flat[novel.reshape(-1)]])
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "mean":
            # |Π| + |Ν|, clamped so that an all-ignored batch gives a graph-keeping 0 (reference: NaN, RN-14).
            return loss.sum() / (previous | novel).sum().clamp(min=1)
        raise ValueError(f"Unknown reduction {self.reduction!r}: expected 'mean', 'sum' or 'none'.")

    def loss_map(self, inputs: Tensor, targets: Tensor, labels: Tensor) -> Tensor:
        """The per-pixel loss ``-w_p * s_p`` as a (B, H, W) map, 0 on ignored pixels (same arguments as
        :meth:`forward`; the reduction is not applied)."""
        return self._weighted_pixels(inputs, targets, labels)[0]

    def _weighted_pixels(
        self, inputs: Tensor, targets: Tensor, labels: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(loss map (B, H, W), previous mask (B, H, W), novel mask (B, H, W))."""
        inputs, targets = upcast_fp32(inputs), upcast_fp32(targets)
        if labels.dim() == inputs.dim():
            labels = labels[:, 0]  # (B, 1, *) -> (B, *)
        labels = labels.long()  # (B, H, W)
        old_cl, new_cl = targets.shape[1], inputs.shape[1]

        previous = labels < old_cl
        novel = (labels >= old_cl) & (labels != IGNORE_INDEX)

        log_probs = torch.log_softmax(inputs, dim=1)  # (B, C_new, H, W)
        old_probs = torch.softmax(targets * self.alpha, dim=1)
        # Zero-padded to C_new channels (F.pad lists the last axis first: the spatial ones are not padded).
        old_probs = F.pad(old_probs, (0, 0) * (inputs.dim() - 2) + (0, new_cl - old_cl))
        # Novel pixels: q̃_g = q_0 then q̃_0 = 0. Other pixels scatter q_0 onto channel 0 (a no-op).
        target_channel = torch.where(novel, labels, torch.zeros_like(labels))[:, None]  # (B, 1, H, W)
        guided = old_probs.scatter(1, target_channel, old_probs[:, :1])
        guided = torch.cat([guided[:, :1] * (~novel[:, None]).to(guided.dtype), guided[:, 1:]], dim=1)

        per_pixel = (guided * log_probs).sum(dim=1)  # s_p, (B, H, W)
        weights = self.prev_kd * previous.to(per_pixel.dtype) + self.novel_kd * novel.to(per_pixel.dtype)
        # torch.where keeps ignored pixels out of the gradient even if their logits are not finite.
        loss = torch.where(previous | novel, -weights * per_pixel, torch.zeros_like(per_pixel))
        return loss, previous, novel


class BCEWithLogitsLossWithIgnoreIndex(nn.Module):
    """Binary cross-entropy on one-hot targets, for ``--bce`` and LwF-MC (reference class of the same
    name).

    Per pixel ``sum_c BCEWithLogits(z_c, t_c)`` with ``t`` the one-hot label over the ``C_new`` channels.

    Args:
        reduction: "mean" (over non-ignored pixels), "sum" (over non-ignored pixels) or "none"
            ((B, H, W), 0 on ignored pixels).
        ignore_index: label excluded from the loss.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Args: inputs (B, C, H, W) logits; targets (B, H, W) labels."""
        inputs = upcast_fp32(inputs)
        one_hot = _one_hot_ignore(targets, inputs.shape[1], self.ignore_index, inputs.dtype)
        loss = F.binary_cross_entropy_with_logits(inputs, one_hot, reduction="none").sum(dim=1)  # (B, H, W)
        valid = one_hot.sum(dim=1)  # 1 on labelled pixels, 0 on ignored ones
        loss = loss * valid
        if self.reduction == "mean":
            # Mean over labelled pixels; an all-ignored batch gives 0 (reference: NaN).
            return loss.sum() / valid.sum().clamp(min=1)
        return _reduce(loss, self.reduction)


class IcarlLoss(nn.Module):
    """iCaRL-style BCE whose old-class targets are the old model's sigmoids (Rebuffi et al., CVPR 2017;
    used by ``--icarl_disjoint``; reference class of the same name).

    One-hot targets over ``C_new`` channels whose first ``C_old`` channels (channels ``1..C_old-1`` with
    ``bkg=True``) are replaced by ``sigmoid(z_old)``; per pixel the BCE is summed over channels.

    Args:
        reduction: "mean" (over all pixels, ignored ones included), "sum" or "none" ((B, H, W)).
        ignore_index: label that gets an all-zero one-hot vector.
        bkg: keep the ground truth for the background channel.
    """

    def __init__(self, reduction: str = "mean", ignore_index: int = IGNORE_INDEX, bkg: bool = False):
        super().__init__()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.bkg = bkg

    def forward(self, inputs: Tensor, targets: Tensor, output_old: Tensor) -> Tensor:
        """Args: inputs (B, C_new, H, W) logits; targets (B, H, W) labels; output_old (B, C_old, H, W)
        old-model probabilities (``sigmoid(z_old)``)."""
        inputs, output_old = upcast_fp32(inputs), upcast_fp32(output_old)
        one_hot = _one_hot_ignore(targets, inputs.shape[1], self.ignore_index, inputs.dtype)
        old_cl = output_old.shape[1]
        first = 1 if self.bkg else 0
        soft_targets = torch.cat([one_hot[:, :first], output_old[:, first:], one_hot[:, old_cl:]], dim=1)
        loss = F.binary_cross_entropy_with_logits(inputs, soft_targets, reduction="none").sum(dim=1)
        return _reduce(loss, self.reduction)


class FocalLoss(nn.Module):
    """Focal loss ``alpha * (1 - p_t)^gamma * CE`` with ``p_t = exp(-CE)`` (Lin et al., ICCV 2017, Eq. 5).

    Args:
        alpha: scale.
        gamma: focusing exponent.
        reduction: "mean" (over all pixels, ignored ones count 0), "sum" or "none" ((B, H, W)).
        ignore_index: label excluded from the loss.
    """

    def __init__(
        self, alpha: float = 1, gamma: float = 2, reduction: str = "mean", ignore_index: int = IGNORE_INDEX
    ):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Args: inputs (B, C, H, W) logits; targets (B, H, W) labels."""
        _, focal = _cross_entropy_and_focal(inputs, targets, self.alpha, self.gamma, self.ignore_index)
        return _reduce(focal, self.reduction)


def _cross_entropy_and_focal(
    inputs: Tensor, targets: Tensor, alpha: float, gamma: float, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """Per-pixel CE (B, H, W), 0 on ignored pixels, and the focal loss ``alpha (1 - p_t)^gamma CE`` (Lin et
    al., ICCV 2017, Eq. 5, with ``p_t = exp(-CE)``), both in fp32."""
    ce = F.cross_entropy(upcast_fp32(inputs), targets, reduction="none", ignore_index=ignore_index)
    return ce, alpha * (1 - torch.exp(-ce)) ** gamma * ce


class FocalLossNew(nn.Module):
    """Focal loss on pixels labelled ``>= index`` (the new classes), plain CE elsewhere (reference class of
    the same name).

    Args:
        alpha: scale of the focal part.
        gamma: focusing exponent.
        index: first new class, ``C_old``.
        reduction: "mean" (over all pixels), "sum" or "none" ((B, H, W)).
        ignore_index: label excluded from the loss.
    """

    def __init__(
        self,
        alpha: float = 1,
        gamma: float = 2,
        index: int = 0,
        reduction: str = "mean",
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.index = index
        self.reduction = reduction
        self.ignore_index = ignore_index

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Args: inputs (B, C, H, W) logits; targets (B, H, W) labels."""
        ce, focal = _cross_entropy_and_focal(inputs, targets, self.alpha, self.gamma, self.ignore_index)
        loss = torch.where(targets >= self.index, focal, ce)  # ignored pixels have ce = 0 either way
        return _reduce(loss, self.reduction)


class NCA(nn.Module):
    """NCA criterion on cosine-classifier similarities (PLOP's ``--nca``; reference ``nca`` and ``NCA``).

    ``loss = CE(scale * (z - margin), y)``.

    Reference behaviour (RN-22): the margin is subtracted from *every* class rather than from the target
    only, so (softmax being shift-invariant) it has no effect; kept as is.

    Args:
        scale: the model's learnable cosine scalar (a tensor) or a float.
        margin: margin (no effect, see above).
        ignore_index: label excluded from the loss.
        reduction: "mean", "sum" or "none".
    """

    def __init__(
        self,
        scale: float | Tensor = 1.0,
        margin: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
    ):
        super().__init__()
        # The scalar is a parameter of the model (optimised there): keep a plain reference so that the
        # criterion does not register it a second time.
        object.__setattr__(self, "scale", scale)
        self.margin = margin
        self.ignore_index = ignore_index
        self.reduction = reduction

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Args: inputs (B, C, H, W) similarities; targets (B, H, W) labels."""
        # Reference behaviour (RN-22): margin subtracted from every class.
        logits = self.scale * (upcast_fp32(inputs) - self.margin)
        return F.cross_entropy(logits, targets, ignore_index=self.ignore_index, reduction=self.reduction)


class UnbiasedNCA(nn.Module):
    """NCA with MiB's unbiased background (reference ``UnbiasedNCA``): ``UNCE(scale * (z - margin), y)``.

    Reference behaviour (RN-22): the margin is subtracted from every class (no effect on the softmax).

    Args:
        old_cl: number of previous-step classes.
        scale: the model's learnable cosine scalar (a tensor) or a float.
        margin: margin (no effect).
        ignore_index: label excluded from the loss.
        reduction: "mean", "sum" or "none".
    """

    def __init__(
        self,
        old_cl: int | None = None,
        scale: float | Tensor = 1.0,
        margin: float = 0.1,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
    ):
        super().__init__()
        object.__setattr__(self, "scale", scale)  # owned by the model, see NCA
        self.margin = margin
        self.unce = UnbiasedCrossEntropy(old_cl=old_cl, reduction=reduction, ignore_index=ignore_index)

    def forward(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: inputs (B, C_new, H, W) similarities; targets (B, H, W) labels; mask (B, H, W) to ignore."""
        return self.unce(self.scale * (upcast_fp32(inputs) - self.margin), targets, mask=mask)


#: ``BCESigmoid`` shapes (``--kd_bce_sig_shape``): drop the new channels, or sum them into background.
BCE_SIGMOID_SHAPES = ("trim", "sum")


class BCESigmoid(nn.Module):
    """Sigmoid-BCE output distillation (``--kd_bce_sig``; reference class of the same name).

    ``BCE(sigmoid(alpha * z'), sigmoid(alpha * z_old))`` elementwise, where ``z'`` keeps the first ``C_old``
    channels ("trim") or, with "sum", has channel 0 *replaced* (not incremented) by the sum of the new
    channels. The reference did that replacement in place on the model's output; here a new tensor is built,
    so later loss terms see the unmodified logits.

    Args:
        reduction: "mean", "sum" or "none" ((B, C_old, H, W)).
        alpha: multiplier of both logits before the sigmoid.
        shape: "trim" or "sum".
    """

    def __init__(self, reduction: str = "mean", alpha: float = 1.0, shape: str = "trim"):
        super().__init__()
        if shape not in BCE_SIGMOID_SHAPES:
            raise ValueError(f"Unknown BCESigmoid shape {shape!r}: expected one of {BCE_SIGMOID_SHAPES}.")
        self.reduction = reduction
        self.alpha = alpha
        self.shape = shape

    def forward(self, inputs: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        """Args: inputs (B, C_new, H, W) new logits; targets (B, C_old, H, W) old logits; mask (B, H, W)."""
        inputs, targets = upcast_fp32(inputs), upcast_fp32(targets)
        old_cl = targets.shape[1]
        if self.shape == "sum":
            # Reference behaviour (``BCESigmoid.forward``, RN-40): channel 0 is overwritten by the new
            # channels' sum, not added to.
            inputs = torch.cat([inputs[:, old_cl:].sum(dim=1, keepdim=True), inputs[:, 1:old_cl]], dim=1)
        else:
            inputs = inputs[:, :old_cl]
        loss = F.binary_cross_entropy(
            torch.sigmoid(self.alpha * inputs), torch.sigmoid(self.alpha * targets), reduction="none"
        )
        if mask is not None:
            loss = loss * mask[:, None].to(loss.dtype)
        return _reduce(loss, self.reduction)


def soft_crossentropy(
    logits: Tensor,
    labels: Tensor,
    logits_old: Tensor,
    mask_valid_pseudo: Tensor,
    mask_background: Tensor,
    pseudo_soft: str,
    pseudo_soft_factor: float = 1.0,
) -> Tensor:
    """Soft pseudo-label cross-entropy of PLOP's ``--pseudo_soft`` (reference
    ``soft_crossentropy``).

    Certain pixels get ``CE(z, y)``; uncertain pixels get
    ``sum_c ln softmax(z_old)_c * softmax(z[:, :C_old])_c`` scaled by ``pseudo_soft_factor``. Certain
    pixels are the non-background ones ("soft_certain"), plus the confident background ones
    ("soft_uncertain").

    Reference behaviour (RN-20): the uncertain term has a positive sign, so minimising the loss *maximises*
    the cross-entropy between the old and new distributions.

    Args:
        logits: (B, C_new, H, W) new logits.
        labels: (B, H, W) labels after pseudo-labelling.
        logits_old: (B, C_old, H, W) old logits.
        mask_valid_pseudo: (B, H, W) bool, confident old-model pixels.
        mask_background: (B, H, W) bool, pixels labelled ``< C_old``.
        pseudo_soft: "soft_certain" or "soft_uncertain".
        pseudo_soft_factor: weight of the uncertain part.

    Returns:
        (B, H, W) per-pixel loss.
    """
    logits, logits_old = upcast_fp32(logits), upcast_fp32(logits_old)
    old_cl = logits_old.shape[1]
    loss_certain = F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)
    new_probs_old_classes = torch.softmax(logits[:, :old_cl], dim=1)  # (B, C_old, H, W)
    loss_uncertain = (torch.log_softmax(logits_old, dim=1) * new_probs_old_classes).sum(dim=1)
    if pseudo_soft == "soft_certain":
        mask_certain = ~mask_background
    elif pseudo_soft == "soft_uncertain":
        mask_certain = (mask_valid_pseudo & mask_background) | ~mask_background
    else:
        raise ValueError(f"Unknown pseudo_soft {pseudo_soft!r}: expected 'soft_certain' or 'soft_uncertain'.")
    certain = mask_certain.to(loss_certain.dtype)
    return certain * loss_certain + pseudo_soft_factor * (1 - certain) * loss_uncertain
