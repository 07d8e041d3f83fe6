"""ResNet backbones without classifier (reference ``models/resnet.py`` ``ResNet``), with the reference's
(inplace_abn) module names.

``mod1`` is the stem (7x7 conv, norm, 3x3 max-pool); ``mod2..mod5`` hold ``block1..blockK``. The
forward returns the activated output of ``mod5`` and the pre-activations of the last block of each of
``mod2..mod5`` (used by POD and LGKD).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from modules.residual import NormAct, ResidualBlock

# Output stride -> dilation of mod2..mod5. A module with dilation 1 (other than mod2) starts with a
# stride-2 block.
DILATIONS = {16: (1, 1, 1, 2), 8: (1, 1, 2, 4)}

# name -> (blocks per module, bottleneck)
RESNET_STRUCTURES: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
}


class ResNet(nn.Module):
    """ResNet body.

    Args:
        structure: number of blocks in mod2..mod5.
        bottleneck: bottleneck (1x1-3x3-1x1) blocks instead of basic (3x3-3x3) ones.
        norm_act: callable(num_features) -> normalisation+activation layer.
        output_stride: 16 or 8.
    """

    def __init__(
        self,
        structure: Sequence[int],
        bottleneck: bool,
        norm_act: NormAct = nn.BatchNorm2d,
        output_stride: int = 16,
    ) -> None:
        super().__init__()
        if len(structure) != 4:
            raise ValueError(f"structure must list the blocks of 4 modules, got {structure}")
        if output_stride not in DILATIONS:
            raise ValueError(f"output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
        self.structure = tuple(structure)
        self.bottleneck = bottleneck
        self.output_stride = output_stride
        dilations = DILATIONS[output_stride]

        self.mod1 = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)),
                    ("bn1", norm_act(64)),
                    ("pool1", nn.MaxPool2d(3, stride=2, padding=1)),
                ]
            )
        )
        in_channels = 64
        channels = [64, 64, 256] if bottleneck else [64, 64]
        for mod_index, (num_blocks, dilation) in enumerate(zip(structure, dilations)):
            blocks = []
            for block_index in range(num_blocks):
                first_strided = mod_index > 0 and block_index == 0 and dilation == 1
                block = ResidualBlock(
                    in_channels,
                    channels,
                    stride=2 if first_strided else 1,
                    dilation=dilation,
                    norm_act=norm_act,
                    last=block_index == num_blocks - 1,
                )
                blocks.append((f"block{block_index + 1}", block))
                in_channels = channels[-1]
            self.add_module(f"mod{mod_index + 2}", nn.Sequential(OrderedDict(blocks)))
            channels = [c * 2 for c in channels]
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B, 3, H, W) -> x5 (B, out_channels, H/OS, W/OS) and the 4 last-block pre-activations.

        For a 512x512 input at OS16 (ResNet-101) the pre-activations are (B,256,128,128), (B,512,64,64),
        (B,1024,32,32), (B,2048,32,32).
        """
        x = self.mod1(x)
        attentions = []
        for mod in (self.mod2, self.mod3, self.mod4, self.mod5):
            for block in mod:
                x = block(x)
            x, pre = x  # the last block returns (out, pre)
            attentions.append(pre)
        return x, attentions


def _make(name: str, norm_act: NormAct, output_stride: int) -> ResNet:
    structure, bottleneck = RESNET_STRUCTURES[name]
    return ResNet(structure, bottleneck, norm_act=norm_act, output_stride=output_stride)


def net_resnet18(norm_act: NormAct = nn.BatchNorm2d, output_stride: int = 16) -> ResNet:
    """ResNet-18 body: basic blocks [2, 2, 2, 2], 512 output channels."""
    return _make("resnet18", norm_act, output_stride)


def net_resnet34(norm_act: NormAct = nn.BatchNorm2d, output_stride: int = 16) -> ResNet:
    """ResNet-34 body: basic blocks [3, 4, 6, 3], 512 output channels."""
    return _make("resnet34", norm_act, output_stride)


def net_resnet50(norm_act: NormAct = nn.BatchNorm2d, output_stride: int = 16) -> ResNet:
    """ResNet-50 body: bottleneck blocks [3, 4, 6, 3], 2048 output channels."""
    return _make("resnet50", norm_act, output_stride)


def net_resnet101(norm_act: NormAct = nn.BatchNorm2d, output_stride: int = 16) -> ResNet:
    """ResNet-101 body: bottleneck blocks [3, 4, 23, 3], 2048 output channels."""
    return _make("resnet101", norm_act, output_stride)


BACKBONES: dict[str, Callable[..., ResNet]] = {
    "resnet18": net_resnet18,
    "resnet34": net_resnet34,
    "resnet50": net_resnet50,
    "resnet101": net_resnet101,
}
