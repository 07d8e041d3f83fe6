"""The incremental segmentation model and its builder ``make_model`` (reference ``segmentation_module.py``).

``IncrementalSegmentationModule`` = ResNet body + DeepLabV3 head + one 1x1 classifier per incremental step
for images, or DGCNN body + per-point head + one per-point classifier per step for point clouds
(``--backbone dgcnn``). Its state-dict keys are the reference's without the DDP ``module.`` prefix;
``utils.checkpoint`` adds or strips the prefix so reference checkpoints load unchanged.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataset.transform import normalize_on_device
from models import DEFAULT_K, DEFAULT_KNN_CHUNK, DGCNN, POINT_BACKBONES, POINT_CHANNELS, build_backbone
from modules import (
    ABN,
    BatchNormAct2d,
    DeeplabV3,
    InPlaceABN,
    InPlaceABNSync,
    PointSegHead,
    import_inplace_abn,
    is_norm_layer,
)
from utils.checkpoint import load_imagenet_weights
from utils.distributed import all_reduce_sum, is_dist_avail_and_initialized
from utils.errors import OptionsError
from utils.logger import get_logger

logger = get_logger("segmentation_module")

HEAD_CHANNELS = 256
NORM_ACTS = ("iabn_sync", "iabn", "abn", "std", "iabn_sync_test")
ABN_IMPLS = ("torch", "inplace_abn")
MULTIMODAL_FUSIONS = ("sum", "mean", "max", "softmax")
#: The reference's --init_multimodal choices, accepted by the parser so that its command lines parse.
REFERENCE_MULTIMODAL_INITS = ("max", "softmax", "max_init", "softmax_init", "softmax_remove", "max_remove")
#: The --init_multimodal values that work (the reference's *_init variants crash, RN-21).
MULTIMODAL_INITS = tuple(init for init in REFERENCE_MULTIMODAL_INITS if not init.endswith("_init"))
ALIGN_TYPES = ("old", "background", "all")
# Reference behaviour (``IncrementalSegmentationModule.__init__``): Cityscapes-as-domains keeps one 19-way
# classifier at every step.
CITYSCAPES_CLASSES = 19
# Classifier convolutions and their functional form by the number of spatial axes of the logits:
# (B, C, N) per-point logits of point clouds, (B, C, H, W) maps of images.
_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
_CONV_FNS: dict[int, Callable[..., torch.Tensor]] = {1: F.conv1d, 2: F.conv2d}


def check_multimodal_fusion(fusion: str) -> None:
    """Refuse an unknown ``--multimodal_fusion`` (how the background modes are fused into one logit)."""
    if fusion not in MULTIMODAL_FUSIONS:
        raise OptionsError(
            f"Unknown --multimodal_fusion {fusion!r}: choose one of {', '.join(MULTIMODAL_FUSIONS)}."
        )


def check_multimodal_init(init_type: str) -> None:
    """Refuse an ``--init_multimodal`` that does not work (RN-21: the reference's *_init variants crash)."""
    if init_type not in MULTIMODAL_INITS:
        raise OptionsError(
            f"--init_multimodal {init_type!r} is not supported: choose one of "
            f"{', '.join(MULTIMODAL_INITS)} (the reference's *_init variants crash, RN-21)."
        )


def check_model_options(opts: argparse.Namespace) -> None:
    """The model options that cannot work, refused before any work (``argparser.validate_options``); the
    model applies the same checks when it is built.

    Raises:
        OptionsError: an ``--init_multimodal`` that does not work (or, at a step > 0, has a single
            background mode to hand over), an unknown ``--multimodal_fusion``.
    """
    if getattr(opts, "init_multimodal", None) is not None:
        check_multimodal_init(opts.init_multimodal)
        # run.load_previous_step applies it at steps > 0 unless --init_balanced comes first.
        if opts.step > 0 and not opts.init_balanced:
            check_multimodal_modes(opts.nb_background_modes)
    check_multimodal_fusion(getattr(opts, "multimodal_fusion", "sum"))


def check_multimodal_modes(nb_background_modes: int) -> None:
    """Refuse ``--init_multimodal`` with a single background mode: there is no mode to hand over."""
    if nb_background_modes < 2:
        raise OptionsError(
            "--init_multimodal needs --nb_background_modes of at least 2 (it hands background modes "
            "over to the new classes): add --nb_background_modes 2 or more from step 0 on, or drop "
            "--init_multimodal."
        )


def build_norm_act(
    norm_act: str,
    *,
    abn_impl: str = "torch",
    recompute: bool = False,
    use_cuda: bool = False,
    group: Any = None,
) -> Callable[[int], nn.Module]:
    """Return ``callable(num_features) -> norm layer`` for ``--norm_act`` (leaky ReLU 0.01, eps 1e-5).

    Args:
        norm_act: iabn_sync (and iabn_sync_test, treated the same), iabn, abn or std.
        abn_impl: "torch" (pure PyTorch) or "inplace_abn" (the compiled package, used on CUDA only).
        recompute: recompute normalisation in backward (pure-PyTorch layers only).
        use_cuda: whether the model will run on CUDA.
        group: process group of the synchronised layer; None = WORLD when initialised.

    Raises:
        OptionsError: unknown norm, or ``--abn_impl inplace_abn`` without the package.
    """
    if norm_act not in NORM_ACTS:
        raise OptionsError(f"Unknown --norm_act {norm_act!r}: choose one of {', '.join(NORM_ACTS)}.")
    if abn_impl not in ABN_IMPLS:
        raise OptionsError(f"Unknown --abn_impl {abn_impl!r}: choose {' or '.join(ABN_IMPLS)}.")
    # RN-12: the reference built BatchNorm2d for iabn_sync_test (and crashed); it is plain iabn_sync here.
    kind = "iabn_sync" if norm_act == "iabn_sync_test" else norm_act
    act = {"activation": "leaky_relu", "activation_param": 0.01}
    if kind == "std":
        return functools.partial(BatchNormAct2d, **act, recompute=recompute)
    if abn_impl == "inplace_abn":
        package = import_inplace_abn()
        if use_cuda:
            if kind == "iabn_sync":
                # The LGKD fix (reference ``make_model``): pass the WORLD group explicitly so statistics are
                # global.
                extra = {"group": group} if group is not None else {}
                return functools.partial(package.InPlaceABNSync, **act, **extra)
            return functools.partial(package.InPlaceABN if kind == "iabn" else package.ABN, **act)
        logger.warning(
            "--abn_impl inplace_abn is used on CUDA only; this CPU run uses the pure-PyTorch layers."
        )
    if kind == "iabn_sync":
        return functools.partial(InPlaceABNSync, **act, group=group, recompute=recompute)
    return functools.partial(InPlaceABN if kind == "iabn" else ABN, **act, recompute=recompute)


def _uses_cuda(opts: argparse.Namespace) -> bool:
    device = str(getattr(opts, "device", "auto") or "auto")
    if device == "auto":
        return torch.cuda.is_available()
    return device.startswith("cuda")


def imagenet_weights_path(opts: argparse.Namespace) -> Path:
    """``{code_directory}/pretrained/{backbone}_{norm_act}.pth.tar`` (iabn_sync_test reads iabn_sync's)."""
    norm_name = "iabn_sync" if opts.norm_act == "iabn_sync_test" else opts.norm_act
    return Path(opts.code_directory) / "pretrained" / f"{opts.backbone}_{norm_name}.pth.tar"


def classifier_sizes_for(opts: argparse.Namespace, classes: Sequence[int]) -> list[int]:
    """Classifier sizes of the model for the per-step class counts ``classes`` (the reference's
    ``IncrementalSegmentationModule.__init__`` exceptions applied)."""
    if opts.dataset == "cityscapes_domain":
        return [int(getattr(opts, "num_classes", None) or CITYSCAPES_CLASSES)]
    if getattr(opts, "base_weights", False):
        return [int(classes[0])]
    return [int(c) for c in classes]


def make_model(
    opts: argparse.Namespace, classes: Sequence[int] | None = None
) -> IncrementalSegmentationModule:
    """Build the model of one step from the options (reference ``make_model``, called by ``run_step``).

    Args:
        opts: parsed options (backbone, output_stride, norm_act, abn_impl, recompute_abn, no_pretrained,
            code_directory, pooling, dataset, num_classes, base_weights, nb_background_modes,
            multimodal_fusion, cosine, disable_background).
        classes: classes added at each step so far, e.g. ``[16, 1, 1]`` for VOC 15-5s step 2.

    ``--backbone dgcnn`` builds the point-cloud model (input (B, 9, N), logits (B, C, N)): see
    :func:`_make_point_model` for the options it reads.

    Raises:
        OptionsError: bad model options; CheckpointError: missing or unusable ImageNet weights.
    """
    if classes is None:
        # RN-21: the reference then referred to a SegmentationModule that does not exist.
        raise ValueError("make_model needs the per-step class counts (tasks.get_per_task_classes).")
    group = torch.distributed.group.WORLD if is_dist_avail_and_initialized() else None
    norm = build_norm_act(
        opts.norm_act,
        abn_impl=getattr(opts, "abn_impl", "torch"),
        recompute=bool(getattr(opts, "recompute_abn", False)),
        use_cuda=_uses_cuda(opts),
        group=group,
    )
    if opts.backbone in POINT_BACKBONES:
        return _make_point_model(opts, classes, norm)
    body = build_backbone(opts.backbone, norm, opts.output_stride)
    if not opts.no_pretrained:
        load_imagenet_weights(body, imagenet_weights_path(opts))
    head = DeeplabV3(
        body.out_channels,
        HEAD_CHANNELS,
        HEAD_CHANNELS,
        out_stride=opts.output_stride,
        norm_act=norm,
        pooling_size=opts.pooling,
    )
    return IncrementalSegmentationModule(
        body,
        head,
        HEAD_CHANNELS,
        classifier_sizes_for(opts, classes),
        nb_background_modes=int(getattr(opts, "nb_background_modes", 1)),
        multimodal_fusion=getattr(opts, "multimodal_fusion", "sum"),
        use_cosine=bool(getattr(opts, "cosine", False)),
        disable_background=bool(getattr(opts, "disable_background", False)),
    )


def _make_point_model(
    opts: argparse.Namespace, classes: Sequence[int], norm: Callable[[int], nn.Module]
) -> IncrementalSegmentationModule:
    """DGCNN body + per-point head + per-step ``Conv1d`` classifiers (3DPC-CISS ``models/dgcnn_seg.py``).

    Reads ``knn_k`` (default 20) and ``knn_chunk`` (query points per kNN chunk, default
    ``models.DEFAULT_KNN_CHUNK``; 0 or None: no chunking) with ``getattr``. DGCNN is trained from scratch
    (3DPC-CISS has no pretrained weights), so ``--no_pretrained`` makes no difference; ``output_stride``
    and ``pooling`` do not apply (the logits are per point).
    """
    k = getattr(opts, "knn_k", None)
    chunk = getattr(opts, "knn_chunk", DEFAULT_KNN_CHUNK)
    if not getattr(opts, "no_pretrained", True):
        logger.info("DGCNN has no pretrained weights (nor has 3DPC-CISS's): it is trained from scratch.")
    body = DGCNN(
        POINT_CHANNELS,
        norm,
        k=DEFAULT_K if k is None else int(k),
        chunk_size=int(chunk) if chunk else None,
    )
    head = PointSegHead(body.out_channels, norm)
    return IncrementalSegmentationModule(
        body,
        head,
        head.out_channels,
        classifier_sizes_for(opts, classes),
        nb_background_modes=int(getattr(opts, "nb_background_modes", 1)),
        multimodal_fusion=getattr(opts, "multimodal_fusion", "sum"),
        use_cosine=bool(getattr(opts, "cosine", False)),
        disable_background=bool(getattr(opts, "disable_background", False)),
        spatial_dims=1,
    )


class IncrementalSegmentationModule(nn.Module):
    """Body + head + one classifier per step; logits are the concatenation of the classifiers' outputs.

    Args:
        body: backbone returning ``(features, [4 pre-activations])``.
        head: DeepLabV3 head.
        head_channels: channels of the head output (256).
        classes: classes added at each step, e.g. ``[16, 1, 1]``.
        nb_background_modes: > 1 gives background that many outputs (``cls[0]``), fused into one logit.
        multimodal_fusion: sum, mean, max or softmax (softmax-weighted sum of the modes).
        use_cosine: cosine classifier (normalised weights) with a learnable ``scalar`` used by the NCA loss.
        disable_background: in evaluation (``in_eval``), the background logit is set to 0.
        spatial_dims: 2 for images (input (B, 3, H, W), ``Conv2d`` classifiers, logits upsampled bilinearly
            to the input size) or 1 for point clouds (input (B, C, N), ``Conv1d`` classifiers, one logit
            vector per point: the head keeps the N points, so nothing is resampled).

    Attributes:
        classes: classifier sizes (with multimodal background: ``[modes, classes[0] - 1, *classes[1:]]``).
        in_eval: set by the trainer during validation (only ``disable_background`` reads it).
        scalar: learnable scale for ``--cosine`` (None otherwise).
    """

    def __init__(
        self,
        body: nn.Module,
        head: nn.Module,
        head_channels: int,
        classes: Sequence[int],
        *,
        nb_background_modes: int = 1,
        multimodal_fusion: str = "sum",
        use_cosine: bool = False,
        disable_background: bool = False,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in _CONVS:
            raise ValueError(f"spatial_dims must be 1 (point clouds) or 2 (images), got {spatial_dims}")
        self.spatial_dims = spatial_dims
        if not classes or any(int(c) <= 0 for c in classes):
            raise ValueError(
                f"classes must be a non-empty list of positive class counts, got {list(classes)}"
            )
        check_multimodal_fusion(multimodal_fusion)
        if nb_background_modes < 1:
            raise OptionsError(f"--nb_background_modes must be at least 1, got {nb_background_modes}.")
        self.body = body
        self.head = head
        sizes = [int(c) for c in classes]  # a copy: the reference edited the caller's list in place
        if nb_background_modes > 1:
            sizes = [nb_background_modes, sizes[0] - 1, *sizes[1:]]
            if sizes[1] <= 0:
                raise OptionsError("--nb_background_modes needs at least one foreground class at step 0.")
        self.classes = sizes
        self.tot_classes = sum(sizes)
        self.head_channels = head_channels
        self.cls = nn.ModuleList([_CONVS[spatial_dims](head_channels, c, 1) for c in sizes])
        self.nb_background_modes = nb_background_modes
        self.multimodal_fusion = multimodal_fusion
        self.use_cosine = use_cosine
        self.disable_background = disable_background
        self.in_eval = False
        self.scalar = nn.Parameter(torch.tensor(1.0)) if use_cosine else None

    def _fuse_background(self, modes: torch.Tensor) -> torch.Tensor:
        """(B, M, *) background-mode logits -> (B, 1, *), * = (h, w) or (N,)."""
        if self.multimodal_fusion == "sum":
            return modes.sum(dim=1, keepdim=True)
        if self.multimodal_fusion == "mean":
            return modes.mean(dim=1, keepdim=True)
        if self.multimodal_fusion == "max":
            return modes.amax(dim=1, keepdim=True)
        return (F.softmax(modes, dim=1) * modes).sum(dim=1, keepdim=True)

    def _classify(self, x_pl: torch.Tensor) -> torch.Tensor:
        """(B, head_channels, *) head output -> (B, C_new, *) logits, * = (h, w) or (N,)."""
        logits = []
        for i, conv in enumerate(self.cls):
            if i == 0 and self.nb_background_modes > 1:
                logits.append(self._fuse_background(conv(x_pl)))
            elif self.use_cosine:
                # Reference behaviour (RN-22): only the weights are L2-normalised (and there is no bias); the
                # reference normalises the features into a variable it never uses, so raw features go in.
                conv_fn = _CONV_FNS[self.spatial_dims]
                logits.append(conv_fn(x_pl, F.normalize(conv.weight, p=2, dim=1)))
            else:
                logits.append(conv(x_pl))
        x_o = torch.cat(logits, dim=1)
        if self.disable_background and self.in_eval:
            x_o = torch.cat([torch.zeros_like(x_o[:, :1]), x_o[:, 1:]], dim=1)
        return x_o

    def _to_input_size(self, logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """Images: bilinear upsampling of (B, C, h, w) to the input's (H, W). Point clouds: the logits
        already have one column per input point and are returned as they are."""
        if self.spatial_dims == 1:
            return logits
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)

    def forward(
        self, x: torch.Tensor, ret_intermediate: bool = False, only_bg: bool = False
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, 3, H, W) images -> (sem_logits (B, C_new, H, W), features); for point clouds (B, C_in, N)
        points -> (sem_logits (B, C_new, N), features).

        ``features`` is ``{}``, or with ``ret_intermediate``: ``body`` (B, C_body, h, w), ``pre_logits``
        (B, 256, h, w), ``attentions`` (4 backbone pre-activations + ``pre_logits``) and ``sem_logits_small``
        (B, C_new, h, w). ``only_bg`` returns the upsampled raw output of ``cls[0]`` (the background modes).

        Point clouds: ``body`` (B, 448, N) DGCNN features, ``pre_logits`` (B, 128, N), ``attentions`` (the
        three EdgeConv outputs, the DGCNN MLP output and ``pre_logits``) and ``sem_logits_small``, which is
        ``sem_logits`` itself (per-point logits have no smaller resolution).
        """
        size = x.shape[2:]
        x_b, attentions = self.body(x)
        x_pl = self.head(x_b)
        if only_bg:
            return self._to_input_size(self.cls[0](x_pl), size), {}
        x_o = self._classify(x_pl)
        sem_logits = self._to_input_size(x_o, size)
        if not ret_intermediate:
            return sem_logits, {}
        return sem_logits, {
            "body": x_b,
            "pre_logits": x_pl,
            "attentions": [*attentions, x_pl],
            "sem_logits_small": x_o,
        }

    def fix_bn(self) -> None:
        """Put every BN/ABN layer in eval mode and freeze its affine parameters.

        Reference behaviour (RN-19): a later ``model.train()`` puts the layers back in training mode; only the
        freezing of weight and bias persists.
        """
        for module in self.modules():
            if is_norm_layer(module):
                module.eval()
                for param in (getattr(module, "weight", None), getattr(module, "bias", None)):
                    if param is not None:
                        param.requires_grad = False

    def _log_new_classes(self, device: torch.device | str | None) -> torch.Tensor:
        # ln(N + 1) in float32, N = size of the newest classifier.
        dev = device if device is not None else self.cls[-1].weight.device
        return torch.log(torch.tensor([self.classes[-1] + 1.0], dtype=torch.float32, device=dev))

    @torch.no_grad()
    def init_new_classifier(self, device: torch.device | str | None = None) -> None:
        """MiB balanced initialisation of the newest classifier from the background one (reference
        ``init_new_classifier``).

        Every new row gets the background weight and the bias ``b_bg - ln(N + 1)``; the old background bias
        gets the same value, so background and the N new classes share the old background probability equally.
        """
        new_cls, bg_cls = self.cls[-1], self.cls[0]
        if self.nb_background_modes > 1:
            bg_weight = bg_cls.weight.sum(dim=0)  # (256, 1, 1), sum of the modes
            bg_bias = bg_cls.bias.sum(dim=0)
        else:
            bg_weight = bg_cls.weight[0]
            bg_bias = bg_cls.bias[0]
        new_cls.weight.copy_(bg_weight.expand_as(new_cls.weight))
        if self.use_cosine:
            return  # cosine classifiers: weights only
        new_bias = (bg_bias - self._log_new_classes(device).to(bg_bias.dtype).to(bg_bias.device)).squeeze()
        new_cls.bias.copy_(new_bias.expand_as(new_cls.bias))
        # Reference behaviour (RN-07): the old background bias is lowered by ln(N + 1) too.
        if self.nb_background_modes > 1:
            bg_cls.bias.copy_(new_bias.expand_as(bg_cls.bias))
        else:
            bg_cls.bias[0] = new_bias

    @torch.no_grad()
    def _count_winning_modes(self, device: torch.device | str, train_loader: Iterable[Any]) -> torch.Tensor:
        """(M, N) counts: for each new-class pixel, which background mode has the largest ``cls[0]`` logit."""
        modes, num_new = self.nb_background_modes, self.classes[-1]
        first_new = self.tot_classes - num_new - modes + 1  # label of the first new class
        winners = torch.zeros(modes * num_new, dtype=torch.long, device=device)
        for batch in train_loader:
            # uint8 images from the presets are normalised on the device (float batches pass through).
            images, labels = normalize_on_device(batch[0], device), batch[1].to(device)
            winner = self(images, only_bg=True)[0].argmax(dim=1)  # (B, H, W) or (B, N)
            # The reference counts 0 < label < 255, i.e. only new classes under the default masking.
            mask = (labels >= first_new) & (labels < first_new + num_new)
            index = winner[mask] * num_new + (labels[mask] - first_new)
            winners += torch.bincount(index, minlength=modes * num_new)
        # Every rank counts on its own shard; summing keeps the initialisation identical on all ranks.
        return all_reduce_sum(winners).view(modes, num_new)

    @torch.no_grad()
    def init_new_classifier_multimodal(
        self, device: torch.device | str, train_loader: Iterable[Any], init_type: str
    ) -> None:
        """Initialise each new class from the background modes that win on its pixels (reference
        ``init_new_classifier_multimodal``).

        ``max``: weight of the winning mode and its bias ``- ln(N + 1)``; ``softmax``: the
        softmax(counts)-weighted average of the mode weights and biases. The winning mode's bias is
        overwritten with the new bias.
        ``*_remove`` then removes the winning modes from ``cls[0]``.

        The pass runs in the model's current mode: in training mode BN running statistics are updated, as in
        the reference.
        """
        check_multimodal_init(init_type)
        check_multimodal_modes(self.nb_background_modes)
        kind, _, suffix = init_type.partition("_")
        winners = self._count_winning_modes(device, train_loader)
        bg_cls, new_cls = self.cls[0], self.cls[-1]
        bias_diff = self._log_new_classes(device).to(bg_cls.bias.device).squeeze()
        chosen = []
        # Reference behaviour (``init_new_classifier_multimodal``): classes are handled in order and each
        # overwrites its winning mode's bias, so a later class won by the same mode starts from the already
        # lowered bias.
        for c in range(self.classes[-1]):
            mode = int(winners[:, c].argmax())
            chosen.append(mode)
            if kind == "max":
                weight = bg_cls.weight[mode]
                bias = bg_cls.bias[mode] - bias_diff
            else:
                weighting = F.softmax(winners[:, c].float(), dim=0).to(bg_cls.weight.dtype)
                mode_weights = weighting.view(-1, *[1] * (bg_cls.weight.dim() - 1))  # (M, 1, 1[, 1])
                weight = (mode_weights * bg_cls.weight).sum(dim=0)
                bias = (weighting * bg_cls.bias).sum(dim=0)
            new_cls.weight[c] = weight
            new_cls.bias[c] = bias
            bg_cls.bias[mode] = bias
        if suffix == "remove":
            self._remove_background_modes(sorted(set(chosen)))

    def _remove_background_modes(self, modes: list[int]) -> None:
        # The reference dropped only the bias entry, leaving weight and bias of different sizes (the next
        # forward crashes); here the whole mode (weight row and bias) is removed.
        keep = [m for m in range(self.nb_background_modes) if m not in modes]
        if not keep:
            raise OptionsError(
                "--init_multimodal *_remove would remove every background mode: use more "
                "--nb_background_modes or the max/softmax variant."
            )
        old = self.cls[0]
        conv = _CONVS[self.spatial_dims]
        new = conv(old.in_channels, len(keep), 1).to(device=old.weight.device, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[keep])
        new.bias.copy_(old.bias[keep])
        self.cls[0] = new
        self.nb_background_modes = len(keep)
        self.classes[0] = len(keep)
        self.tot_classes = sum(self.classes)

    @staticmethod
    def _mean_row_norm(convs: Iterable[nn.Module], only: str = "all") -> torch.Tensor:
        total, count = 0.0, 0
        for i, conv in enumerate(convs):
            rows = conv.weight.flatten(1)  # (n_i, head_channels): the 1x1 kernels of Conv2d or Conv1d
            if i == 0 and only == "old":
                rows = rows[1:]
            elif i == 0 and only == "background":
                rows = rows[:1]
            total = total + rows.norm(dim=1).sum()
            count += rows.shape[0]
        return total / count

    @torch.no_grad()
    def align_weight(self, align_type: str) -> None:
        """Scale the newest classifier so its mean row norm equals that of the old classifiers (reference
        ``align_weight``).

        ``old``: old rows without background; ``background``: background row of ``cls[0]`` (plus later old
        classifiers); ``all``: every old row.
        """
        if align_type not in ALIGN_TYPES:
            raise OptionsError(
                f"Unknown --align_weight {align_type!r}: choose one of {', '.join(ALIGN_TYPES)}."
            )
        if len(self.cls) < 2:
            return  # nothing old to align to at step 0
        old_norm = self._mean_row_norm(self.cls[:-1], only=align_type)
        new_norm = self._mean_row_norm(self.cls[-1:])
        self.cls[-1].weight.mul_(old_norm / new_norm)


__all__ = [
    "IncrementalSegmentationModule",
    "build_norm_act",
    "check_model_options",
    "check_multimodal_fusion",
    "check_multimodal_init",
    "check_multimodal_modes",
    "classifier_sizes_for",
    "imagenet_weights_path",
    "make_model",
]
