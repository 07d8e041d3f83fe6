"""POD feature distillation of PLOP, as used by PLOP and LGKD (reference ``train.py``
``features_distillation``).

PLOP (Douillard et al., CVPR 2021) distils the *pooled* features of every stage of the old model into the
new one: each (pre-processed) map is summarised by width- and height-pooled vectors over a pyramid of
regions ("Local POD", PLOP Eq. 1-2), and the per-layer loss is the L2 distance between the old and new
summaries, averaged over the batch (PLOP Eq. 3).

The reference packed everything into one 275-line function; here it is split into

* :class:`PODOptions`: parses the ``pod_options`` dictionary (``--pod_options`` JSON) once, after
  :func:`check_pod_options` (the rules of ``--pod_options`` and ``--pod_prepro``, which
  ``argparser.validate_options`` applies before any work);
* :func:`pod_embedding`: spatial / local / global pooling, with an optional mask (masked local POD);
* :func:`pod_distance`: frobenius / l1 / kl / bce / frobenius_mix distances;
* :func:`features_distillation`: the reference entry point, with its keyword arguments and defaults.

Inputs are never modified (the reference appended to the model's ``attentions`` list and zeroed masked
positions in place).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from utils.errors import OptionsError
from utils.loss import upcast_fp32

__all__ = [
    "PODOptions",
    "check_pod_options",
    "check_prepro",
    "features_distillation",
    "pod_distance",
    "pod_embedding",
]

COLLAPSE_TYPES = ("spatial", "local", "global")
# Element-wise pre-processing of a map before pooling (--pod_prepro and the sections' "prepro").
_PREPROS: dict[str, Callable[[Tensor], Tensor]] = {
    "pow": lambda x: x.pow(2),
    "none": lambda x: x,
    "relu": lambda x: x.clamp(min=0.0),
}
PREPRO_TYPES = tuple(_PREPROS)
EXTRA_CHANNELS = ("sum", "trim", "expand")
DISTANCES = ("frobenius", "l1", "kl", "bce", "frobenius_mix")


@dataclass(frozen=True)
class PODOptions:
    """The ``pod_options`` dictionary, parsed once.

    ``switch.before`` applies to layers ``0..L-2`` and ``switch.after`` to the last layer (keys ``type``,
    ``factor``, ``norm``, ``prepro``, ``use_adaptative_factor``; "after" also ``apply_mask``,
    ``upscale_mask_topk``, ``mix_new_old``, ``extra_channels``, ``spp_scales``, ``use_pod_schedule``).
    ``switch.mask_position`` ("last" or "all") and ``switch.normalize_per_scale`` are read only when a
    non-empty ``switch`` exists; ``difference_function`` (last layer) and ``difference_function_all``
    (other layers) are top-level keys. ``pool`` is accepted and ignored, as in the reference.

    Attributes:
        before: the ``switch.before`` section, or None.
        after: the ``switch.after`` section, or None.
        mask_position: where masked local POD applies with ``--pod_deeplab_mask``.
        normalize_per_scale: False, True (divide each region's vectors by s²) or "spm".
        difference_function: distance for the last layer.
        difference_function_all: distance for the other layers.
    """

    before: Mapping[str, Any] | None = None
    after: Mapping[str, Any] | None = None
    mask_position: str = "last"
    normalize_per_scale: bool | str = False
    difference_function: str = "frobenius"
    difference_function_all: str = "frobenius"

    @classmethod
    def parse(cls, pod_options: Mapping[str, Any] | None) -> PODOptions:
        """Build from the ``--pod_options`` dictionary (None or ``{}`` give the defaults)."""
        pod_options = pod_options or {}
        kwargs: dict[str, Any] = {
            "difference_function": pod_options.get("difference_function", "frobenius"),
            "difference_function_all": pod_options.get("difference_function_all", "frobenius"),
        }
        switch = pod_options.get("switch")
        if switch:
            kwargs.update(
                before=switch.get("before"),
                after=switch.get("after"),
                mask_position=switch.get("mask_position", "last"),
                normalize_per_scale=switch.get("normalize_per_scale", False),
            )
        for key in ("difference_function", "difference_function_all"):
            if kwargs[key] not in DISTANCES:
                raise OptionsError(
                    f"--pod_options: unknown {key} {kwargs[key]!r}; choose one of {DISTANCES}."
                )
        return cls(**kwargs)


_POD_OPTIONS_EXAMPLE = (
    'e.g. \'{"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}\''
)
# Numeric entries of a "switch" section, with the valid values of the flags they override: (integers only,
# lowest value, what the message says).
_SECTION_NUMBERS: dict[str, tuple[bool, float, str]] = {
    "factor": (False, 0, "a number >= 0"),
    "spp_scales": (True, 1, "a list of integers >= 1"),
    "upscale_mask_topk": (True, 1, "an integer >= 1"),
}


def check_prepro(prepro: str) -> None:
    """Refuse a pre-processing (``--pod_prepro`` or a section's ``prepro``) other than pow, none, relu.

    Raises:
        OptionsError: ``abs`` (RN-21: the reference calls ``torch.abs`` with two arguments and crashes) or
            an unknown name.
    """
    if prepro in _PREPROS:
        return
    if prepro == "abs":
        raise OptionsError(
            "POD pre-processing 'abs' (--pod_prepro or a 'prepro' entry of --pod_options) is broken "
            "in the reference and not supported. Use pow (default), none or relu."
        )
    raise OptionsError(
        f"Unknown POD pre-processing {prepro!r} (--pod_prepro or a 'prepro' entry of --pod_options). "
        "Use pow (default), none or relu."
    )


def _valid_number(value: Any, integer: bool, low: float) -> bool:
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return False
    return math.isfinite(value) and value >= low


def _check_section_numbers(name: str, section: Mapping[str, Any]) -> None:
    for key, (integer, low, what) in _SECTION_NUMBERS.items():
        if key not in section:
            continue
        value = section[key]
        values = value if isinstance(value, list) else [value]
        if not values or not all(_valid_number(v, integer, low) for v in values):
            raise OptionsError(
                f"--pod_options: switch.{name}.{key} is {value!r}; it must be {what}. Fix the JSON of "
                f"--pod_options, {_POD_OPTIONS_EXAMPLE}."
            )


def check_pod_options(pod_options: Any, pod_prepro: str = "pow") -> dict[str, Any] | None:
    """The rules of ``--pod_options`` and ``--pod_prepro``, written once: applied by
    ``argparser.validate_options`` before any work and by the POD loss term when it is built.

    Args:
        pod_options: the parsed ``--pod_options`` JSON, or its text (an options namespace written by hand or
            read back from ``opts.json``); None: no options.
        pod_prepro: ``--pod_prepro``.

    Returns:
        The options as a dictionary (None when there are none).

    Raises:
        OptionsError: text that is not JSON, not a JSON object, a section that is not one, a
            pre-processing other than pow, none or relu (:func:`check_prepro`), a number out of its range,
            an unknown difference function.
    """
    if isinstance(pod_options, str):
        try:
            pod_options = json.loads(pod_options)
        except json.JSONDecodeError as err:
            raise OptionsError(
                f"--pod_options is not valid JSON ({err.msg} at character {err.pos}): {pod_options!r}. "
                f"Quote the whole dictionary for the shell, {_POD_OPTIONS_EXAMPLE}."
            ) from None
    if pod_options is not None and not isinstance(pod_options, dict):
        raise OptionsError(
            f"--pod_options must be a JSON object, got {pod_options!r}. Pass for example "
            '\'{"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}\'.'
        )
    switch = (pod_options or {}).get("switch") or {}
    if not isinstance(switch, dict):
        raise OptionsError(
            f"--pod_options: 'switch' is {switch!r}; it must be a JSON object with 'before' and/or 'after' "
            f"sections. Fix the JSON of --pod_options, {_POD_OPTIONS_EXAMPLE}."
        )
    sections = {name: section for name, section in switch.items() if isinstance(section, dict)}
    for name, section in sections.items():
        _check_section_numbers(name, section)
    check_prepro(pod_prepro)
    for section in sections.values():
        if section.get("prepro") is not None:
            check_prepro(section["prepro"])
    PODOptions.parse(pod_options)
    return pod_options


@dataclass
class _LayerSettings:
    """Settings of the layer being processed.

    Reference behaviour (``features_distillation``): the reference kept these as local variables of its layer
    loop, so a value assigned for one layer (by a ``switch`` section or by the masked-POD factor) persists to
    the following layers unless reassigned; only ``extra_channels``, ``use_adaptive_factor`` and
    ``normalize_per_scale`` were reset at every layer.
    """

    collapse: str
    factor: float
    prepro: str
    spp_scales: list[int]
    use_pod_schedule: bool
    normalize: bool = False
    use_adaptive_factor: bool = False
    extra_channels: str = "sum"
    apply_mask: str = "background"
    upscale_mask_topk: int = 1
    mix_new_old: float | None = None

    def reset_layer(self) -> None:
        self.use_adaptive_factor = False
        self.extra_channels = "sum"

    def apply(self, section: Mapping[str, Any], last: bool) -> None:
        """Apply a ``switch.before`` (``last=False``) or ``switch.after`` (``last=True``) section."""
        self.collapse = section.get("type", self.collapse)
        self.factor = section.get("factor", self.factor)
        self.normalize = section.get("norm", False)
        self.prepro = section.get("prepro", self.prepro)
        self.use_adaptive_factor = section.get("use_adaptative_factor", self.use_adaptive_factor)
        if last:
            self.apply_mask = section.get("apply_mask", self.apply_mask)
            self.upscale_mask_topk = section.get("upscale_mask_topk", self.upscale_mask_topk)
            self.mix_new_old = section.get("mix_new_old", self.mix_new_old)
            self.extra_channels = section.get("extra_channels", self.extra_channels)
            self.spp_scales = list(section.get("spp_scales", self.spp_scales))
            self.use_pod_schedule = section.get("use_pod_schedule", self.use_pod_schedule)


def _scale_divisor(normalize_per_scale: bool | str, scale: int, scale_index: int, nb_scales: int) -> float:
    if normalize_per_scale is True:
        return float(scale**2)
    if normalize_per_scale == "spm":
        # Reference behaviour (``_local_pod``): 2^(S-1) for the first scale and 2^(S-index) for the others.
        # (The reference's masked variant crashed here on an undefined variable, RN-21; both variants work
        # here.)
        return float(2 ** (nb_scales - 1) if scale_index == 0 else 2 ** (nb_scales - scale_index))
    return 1.0


def _local_pooling_regions(x: Tensor, scale: int, k: int) -> Tensor:
    """One scale of local pooling, region by region (any map shape)."""
    batch = x.shape[0]
    embedding = []
    for i in range(scale):
        for j in range(scale):
            region = x[..., i * k : (i + 1) * k, j * k : (j + 1) * k]  # (B, C, k, k)
            # Mean over the width, then over the height: (B, C*k) each.
            embedding.append(region.mean(dim=3).reshape(batch, -1))
            embedding.append(region.mean(dim=2).reshape(batch, -1))
    return torch.cat(embedding, dim=1)


def _local_pooling_grid(x: Tensor, scale: int, k: int) -> Tensor:
    """The same values as :func:`_local_pooling_regions` in one pass, when every region is k×k."""
    batch, channels = x.shape[:2]
    grid = x[..., : scale * k, : scale * k].reshape(batch, channels, scale, k, scale, k)  # (B, C, i, y, j, x)
    over_width = grid.mean(dim=5).permute(0, 2, 4, 1, 3)  # (B, i, j, C, y)
    over_height = grid.mean(dim=3).permute(0, 2, 3, 1, 4)  # (B, i, j, C, x)
    # Region-major order, width-pooled vector before height-pooled vector, as the region loop.
    return torch.stack([over_width, over_height], dim=3).reshape(batch, -1)


def _local_pooling(x: Tensor, spp_scales: Sequence[int], normalize_per_scale: bool | str) -> Tensor:
    height, width = x.shape[-2:]
    embedding = []
    for scale_index, scale in enumerate(spp_scales):
        # Reference behaviour (RN-10): the region side comes from the width and is used for both axes
        # (square maps assumed).
        k = width // scale
        pooling = _local_pooling_grid if k > 0 and height >= scale * k else _local_pooling_regions
        divisor = _scale_divisor(normalize_per_scale, scale, scale_index, len(spp_scales))
        pooled = pooling(x, scale, k)
        embedding.append(pooled / divisor if divisor != 1.0 else pooled)
    return torch.cat(embedding, dim=1)


def _global_pooling(x: Tensor, spp_scales: Sequence[int]) -> Tensor:
    batch, width = x.shape[0], x.shape[-1]
    embedding = []
    for scale in spp_scales:
        pooled = F.avg_pool2d(x, kernel_size=width // scale)  # (B, C, s, s) for square maps
        embedding.append(pooled.sum(dim=2).reshape(batch, -1))  # summed over height
        embedding.append(pooled.sum(dim=3).reshape(batch, -1))  # summed over width
    return torch.cat(embedding, dim=1)


def pod_embedding(
    x: Tensor,
    collapse: str,
    spp_scales: Sequence[int] = (1, 2, 4),
    normalize_per_scale: bool | str = False,
    mask: Tensor | None = None,
) -> Tensor:
    """Pooled summary of a feature map (PLOP Eq. 1-2; reference ``_local_pod``, ``_global_pod``).

    * ``spatial``: sums over the width (C·H values) then sums over the height (C·W values).
    * ``local``: for each scale ``s``, regions of side ``k = W // s`` in row-major order; for each region
      its mean over the width (C·k values) then its mean over the height (C·k values). Length ``14·C·W``
      for scales [1, 2, 4].
    * ``global``: for each scale, ``avg_pool2d(kernel = W // s)`` summed over height, then over width.

    Args:
        x: (B, C, H, W) map, already pre-processed.
        collapse: "spatial", "local" or "global".
        spp_scales: pyramid scales (local and global).
        normalize_per_scale: local only: False, True (divide by s²) or "spm".
        mask: optional (B, H, W) bool; masked positions are set to 0 before pooling (PLOP's masked local
            POD). ``x`` itself is not modified.

    Returns:
        (B, D) embedding.
    """
    if mask is not None:
        x = x.masked_fill(mask[:, None], 0.0)
    if collapse == "local":
        return _local_pooling(x, spp_scales, normalize_per_scale)
    if collapse == "spatial":
        return torch.cat([x.sum(dim=3).flatten(1), x.sum(dim=2).flatten(1)], dim=-1)
    if collapse == "global":
        return _global_pooling(x, spp_scales)
    raise OptionsError(f"Unknown POD pooling {collapse!r}; choose one of {COLLAPSE_TYPES}.")


def pod_distance(a: Tensor, b: Tensor, kind: str = "frobenius", mix_new_old: float | None = None) -> Tensor:
    """Distance between old (``a``) and new (``b``) embeddings, per sample (reference
    ``features_distillation``, ``difference_function``).

    Args:
        a: (B, D) old embedding.
        b: (B, D) new embedding.
        kind: "frobenius" (L2 norm of the difference, PLOP Eq. 3), "l1", "kl" (``KL(b || a)`` summed),
            "bce" (BCE of ``a`` against target ``b``, averaged), or "frobenius_mix".
        mix_new_old: weight of the first entry for "frobenius_mix".

    Returns:
        (B,) distances (a scalar for "frobenius_mix", see below).
    """
    if kind == "frobenius":
        # torch.frobenius_norm is gone (RN-10): the same value as an L2 vector norm over the last axis.
        return torch.linalg.vector_norm(a - b, ord=2, dim=-1)
    if kind == "l1":
        return torch.linalg.vector_norm(a - b, ord=1, dim=-1)
    if kind == "kl":
        kl = F.kl_div((a + 1e-8).log(), b + 1e-8, reduction="none")
        return kl.flatten(1).sum(dim=1)
    if kind == "bce":
        bce = -(b * torch.log(a + 1e-6) + (1 - b) * torch.log(1 - a + 1e-6))
        return bce.flatten(1).mean(dim=1)
    if kind == "frobenius_mix":
        if mix_new_old is None:
            raise OptionsError(
                "--pod_options: difference_function 'frobenius_mix' needs switch.after.mix_new_old."
            )
        # Reference behaviour (``features_distillation``, ``frobenius_mix``): entries 0 and 1 of the
        # embeddings are mixed (it expected a pair of embeddings; with a batched embedding these are the first
        # two samples).
        old = torch.linalg.vector_norm(a[0] - b[0], ord=2, dim=-1)
        new = torch.linalg.vector_norm(a[1] - b[1], ord=2, dim=-1)
        return mix_new_old * old + (1 - mix_new_old) * new
    raise OptionsError(f"Unknown POD difference function {kind!r}; choose one of {DISTANCES}.")


def _prepro(x: Tensor, prepro: str) -> Tensor:
    check_prepro(prepro)
    return _PREPROS[prepro](x)


def _downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour labels at ``size``: ``label[s*i, s*j]`` when the sizes differ by an integer s."""
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def _expand_old_probabilities(a: Tensor, b: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """LGKD's ``expand`` extra-channel mode: the label-guided re-mapping in probability space."""
    old_cl, new_cl = a.shape[1], b.shape[1]
    old_probs = torch.softmax(a, dim=1)
    new_probs = torch.softmax(b, dim=1)
    small = _downsample_labels(labels, a.shape[-2:])
    small = torch.where(small == 255, torch.zeros_like(small), small)  # (B, h, w), 255 -> 0
    expanded = F.pad(old_probs, (0, 0, 0, 0, 0, new_cl - old_cl))  # (B, C_new, h, w)
    # The old background probability goes into each pixel's label channel ...
    expanded = expanded.scatter(1, small[:, None], expanded[:, :1])
    # ... and leaves channel 0 on pixels of a new class.
    is_new = (small >= old_cl)[:, None]
    expanded = torch.cat([expanded[:, :1].masked_fill(is_new, 0.0), expanded[:, 1:]], dim=1)
    return expanded, new_probs


def _handle_extra_channels(
    a: Tensor, b: Tensor, mode: str, index_new_class: int | None, labels: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Make the new map (C_new channels) comparable with the old one (C_old channels) (reference
    ``features_distillation``, ``handle_extra_channels``)."""
    old_cl = a.shape[1] if index_new_class is None else index_new_class
    if mode == "sum":
        # Raw logits of the new classes are added to the background logit (not probabilities).
        return a, torch.cat([b[:, :1] + b[:, old_cl:].sum(dim=1, keepdim=True), b[:, 1:old_cl]], dim=1)
    if mode == "trim":
        return a, b[:, :old_cl]
    if mode == "expand":
        if labels is None:
            raise ValueError("POD extra_channels='expand' needs the labels.")
        return _expand_old_probabilities(a, b, labels)
    raise OptionsError(f"--pod_options: unknown extra_channels {mode!r}; choose one of {EXTRA_CHANNELS}.")


def _pod_mask(apply_mask: str, labels: Tensor, index_new_class: int, outputs_old: Tensor | None) -> Tensor:
    """(B, H, W) bool mask of masked local POD: positions set to 0 before pooling."""
    if apply_mask == "background":
        return labels < index_new_class
    if apply_mask == "old":
        if outputs_old is None:
            raise ValueError("POD apply_mask='old' needs outputs_old.")
        background = labels == 0
        pseudo = torch.where(background, outputs_old.argmax(dim=1), labels)
        return (labels < index_new_class) & (pseudo > 0)
    raise OptionsError(f"--pod_options: unknown apply_mask {apply_mask!r}; choose 'background' or 'old'.")


def _masked_inputs(
    a: Tensor,
    b: Tensor,
    settings: _LayerSettings,
    labels: Tensor,
    index_new_class: int,
    outputs_old: Tensor | None,
    deeplabmask_upscale: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    mask = _pod_mask(settings.apply_mask, labels, index_new_class, outputs_old)
    if deeplabmask_upscale:
        # Top-k over channels, then bilinear upsampling of the features to the label size.
        k = settings.upscale_mask_topk
        size = labels.shape[-2:]
        a = F.interpolate(a.topk(k, dim=1).values, size=size, mode="bilinear", align_corners=False)
        b = F.interpolate(b.topk(k, dim=1).values, size=size, mode="bilinear", align_corners=False)
    else:
        mask = F.interpolate(mask[:, None].float(), size=a.shape[-2:], mode="nearest")[:, 0].bool()
    return a, b, mask


def features_distillation(
    list_attentions_a: Sequence[Tensor],
    list_attentions_b: Sequence[Tensor],
    collapse_channels: str = "spatial",
    normalize: bool = True,
    labels: Tensor | None = None,
    index_new_class: int | None = None,
    pod_apply: str = "all",
    pod_deeplab_mask: bool = False,
    pod_deeplab_mask_factor: float | None = None,
    interpolate_last: bool = False,
    pod_factor: float = 1.0,
    prepro: str = "pow",
    deeplabmask_upscale: bool = True,
    spp_scales: Sequence[int] = (1, 2, 4),
    pod_options: Mapping[str, Any] | None = None,
    outputs_old: Tensor | None = None,
    use_pod_schedule: bool = True,
    nb_current_classes: int = -1,
    nb_new_classes: int = -1,
) -> Tensor:
    """POD distillation loss over a list of layers (PLOP Eq. 3; reference ``features_distillation``).

    For each layer ``i`` (old map ``a``, new map ``b``; gradients flow through ``b`` only): extra channels
    of the last layer are folded (``sum``/``trim``/``expand``), both maps pre-processed (``pow``: squared),
    pooled (:func:`pod_embedding`), compared per sample (:func:`pod_distance`), averaged over the batch
    (times an optional adaptive factor), multiplied by the layer factor and by ``sqrt(C_new / N_new)``
    (unless the schedule is off); the sum over layers is divided by the number of layers. For the
    PLOP/LGKD presets::

        L = (1/6) sqrt(C_new/N_new) [ f      sum_{i<5} mean_b ||Φ(a_i²) - Φ(b_i²)||₂
                                    + f_last mean_b ||Φ(a_5²) - Φ(sum(b_5)²)||₂ ]

    Args:
        list_attentions_a: old-model maps, each (B, C_i, h_i, w_i).
        list_attentions_b: new-model maps, same shapes except the channels of the last map.
        collapse_channels: pooling ("spatial", "local", "global"), overridable by ``pod_options``.
        normalize: ignored (reference behaviour: forced to False at the start; a ``switch`` section's
            ``norm`` key can still turn on L2 normalisation of the embeddings).
        labels: (B, H, W) ground truth (the reference passes the original, not pseudo-labelled, labels).
        index_new_class: ``C_old``.
        pod_apply: accepted and unused, as in the reference (RN-25).
        pod_deeplab_mask: masked local POD on the last layer (or all layers with ``mask_position="all"``).
        pod_deeplab_mask_factor: factor of masked layers (default ``pod_factor``; 0 skips them).
        interpolate_last: accepted and unused, as in the reference (RN-25).
        pod_factor: factor of the layers (overridable by ``pod_options``).
        prepro: "pow", "none" or "relu" ("abs" crashes in the reference and is refused).
        deeplabmask_upscale: masked POD upsamples the top-k features to the label size (else the mask is
            downsampled to the feature size).
        spp_scales: pyramid scales.
        pod_options: the ``--pod_options`` dictionary (see :class:`PODOptions`).
        outputs_old: (B, C_old, H, W) old logits, for ``apply_mask="old"``.
        use_pod_schedule: multiply each layer by ``sqrt(nb_current_classes / nb_new_classes)``.
        nb_current_classes: ``C_new``.
        nb_new_classes: ``N_new``.

    Returns:
        Scalar loss (fp32).
    """
    if len(list_attentions_a) != len(list_attentions_b):
        raise ValueError("features_distillation needs as many old maps as new maps.")
    options = PODOptions.parse(pod_options)
    if pod_deeplab_mask_factor is None:
        pod_deeplab_mask_factor = pod_factor
    # Reference behaviour (``features_distillation``): the ``normalize`` argument is overwritten with False on
    # the first line.
    settings = _LayerSettings(
        collapse=collapse_channels,
        factor=pod_factor,
        prepro=prepro,
        spp_scales=list(spp_scales),
        use_pod_schedule=use_pod_schedule,
        normalize=False,
    )
    nb_layers = len(list_attentions_a)
    loss: Tensor | None = None
    for i, (a, b) in enumerate(zip(list_attentions_a, list_attentions_b)):
        last = i == nb_layers - 1
        settings.reset_layer()
        section = options.after if last else options.before
        if section is not None:
            settings.apply(section, last)
        # fp32 whatever the autocast dtype of the features (apex O1 also ran pow/sum/norm in fp32).
        a, b = upcast_fp32(a), upcast_fp32(b)
        adaptive_factor: Tensor | float = 1.0

        if a.shape[1] != b.shape[1]:
            if not last:
                raise ValueError(f"POD layer {i}: old and new maps differ in channels; only the last may.")
            a, b = _handle_extra_channels(a, b, settings.extra_channels, index_new_class, labels)
        if a.shape != b.shape:
            raise ValueError(f"POD layer {i}: shapes {tuple(a.shape)} and {tuple(b.shape)} differ.")

        if not pod_deeplab_mask and settings.use_adaptive_factor:
            adaptive_factor = (labels == 0).float().mean()

        a, b = _prepro(a, settings.prepro), _prepro(b, settings.prepro)

        mask = None
        masked = (
            settings.collapse == "local"
            and pod_deeplab_mask
            and ((last and options.mask_position == "last") or options.mask_position == "all")
        )
        if masked:
            if pod_deeplab_mask_factor == 0.0:
                continue
            settings.factor = pod_deeplab_mask_factor  # persists to later layers, as in the reference
            a, b, mask = _masked_inputs(
                a, b, settings, labels, index_new_class, outputs_old, deeplabmask_upscale
            )
            if settings.use_adaptive_factor:
                adaptive_factor = mask.float().mean(dim=(1, 2))  # (B,)

        emb_a = pod_embedding(a, settings.collapse, settings.spp_scales, options.normalize_per_scale, mask)
        emb_b = pod_embedding(b, settings.collapse, settings.spp_scales, options.normalize_per_scale, mask)
        if settings.normalize:
            emb_a, emb_b = F.normalize(emb_a, dim=1, p=2), F.normalize(emb_b, dim=1, p=2)

        kind = options.difference_function if last else options.difference_function_all
        layer_loss = torch.mean(adaptive_factor * pod_distance(emb_a, emb_b, kind, settings.mix_new_old))
        if settings.factor <= 0.0:
            continue
        layer_loss = settings.factor * layer_loss
        if settings.use_pod_schedule:
            layer_loss = layer_loss * math.sqrt(nb_current_classes / nb_new_classes)
        loss = layer_loss if loss is None else loss + layer_loss

    if loss is None:
        # Every layer skipped (or no layer): a zero that keeps the graph of the new features.
        if nb_layers == 0:
            return torch.zeros(())
        return list_attentions_b[-1].float().sum() * 0.0
    return loss / nb_layers
