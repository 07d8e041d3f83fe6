"""Backbones; ``build_backbone`` replaces the reference's ``models.__dict__[f"net_{backbone}"]`` lookup."""

from __future__ import annotations

from modules.residual import NormAct
from utils.errors import OptionsError

from .dgcnn import DEFAULT_K, DEFAULT_KNN_CHUNK, DGCNN, POINT_CHANNELS
from .resnet import (
    BACKBONES,
    DILATIONS,
    RESNET_STRUCTURES,
    ResNet,
    net_resnet18,
    net_resnet34,
    net_resnet50,
    net_resnet101,
)


def build_backbone(name: str, norm_act: NormAct, output_stride: int = 16) -> ResNet:
    """Build the body named by ``--backbone``.

    Raises:
        OptionsError: unknown backbone name or output stride.
    """
    if name not in BACKBONES:
        raise OptionsError(f"Unknown --backbone {name!r}: choose one of {', '.join(BACKBONES)}.")
    if output_stride not in DILATIONS:
        raise OptionsError(f"--output_stride {output_stride} is not supported: choose 16 or 8.")
    return BACKBONES[name](norm_act=norm_act, output_stride=output_stride)


#: Backbones of the point-cloud model (``--backbone``); built by ``segmentation_module.make_model``.
POINT_BACKBONES = ("dgcnn",)

__all__ = [
    "BACKBONES",
    "DEFAULT_K",
    "DEFAULT_KNN_CHUNK",
    "DGCNN",
    "POINT_BACKBONES",
    "POINT_CHANNELS",
    "DILATIONS",
    "RESNET_STRUCTURES",
    "ResNet",
    "build_backbone",
    "net_resnet18",
    "net_resnet34",
    "net_resnet50",
    "net_resnet101",
]
