"""Residual blocks of the ResNet backbones (reference ``modules/residual.py`` ``ResidualBlock``)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .abn import apply_activation

NormAct = Callable[[int], nn.Module]


def identity_norm(norm_act: NormAct, num_features: int) -> nn.Module:
    """A norm layer from ``norm_act`` whose activation is switched to identity after construction.

    Setting the attribute (rather than passing ``activation=``) works for every ABN flavour, ours and the
    compiled inplace_abn's, whatever keyword arguments ``norm_act`` was built with.
    """
    layer = norm_act(num_features)
    layer.activation = "identity"
    return layer


class ResidualBlock(nn.Module):
    """Basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block.

    ``pre = convs(x) + shortcut(x)``; the block returns ``act(pre)`` with the activation of ``convs.bn1``, and
    the last block of a module also returns ``pre`` (the pre-activation used by POD and LGKD, as in the
    reference's ``ResidualBlock.forward``).

    Args:
        in_channels: input channels.
        channels: (c0, c1) for a basic block, (c0, c1, c2) for a bottleneck.
        stride: stride of the first 3x3 conv (basic: conv1, bottleneck: conv2) and of the projection.
        dilation: dilation (and padding) of the 3x3 convs.
        norm_act: callable(num_features) -> normalisation+activation layer.
        last: return ``(out, pre)`` instead of ``out``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        stride: int = 1,
        dilation: int = 1,
        norm_act: NormAct = nn.BatchNorm2d,
        last: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) not in (2, 3):
            raise ValueError(f"channels must have 2 (basic) or 3 (bottleneck) entries, got {channels}")
        self.last = last
        c = list(channels)
        if len(c) == 2:
            layers = [
                ("conv1", nn.Conv2d(in_channels, c[0], 3, stride, dilation, dilation, bias=False)),
                ("bn1", norm_act(c[0])),
                ("conv2", nn.Conv2d(c[0], c[1], 3, 1, dilation, dilation, bias=False)),
                ("bn2", identity_norm(norm_act, c[1])),
            ]
        else:
            layers = [
                ("conv1", nn.Conv2d(in_channels, c[0], 1, bias=False)),
                ("bn1", norm_act(c[0])),
                ("conv2", nn.Conv2d(c[0], c[1], 3, stride, dilation, dilation, bias=False)),
                ("bn2", norm_act(c[1])),
                ("conv3", nn.Conv2d(c[1], c[2], 1, bias=False)),
                ("bn3", identity_norm(norm_act, c[2])),
            ]
        self.convs = nn.Sequential(OrderedDict(layers))
        if stride != 1 or in_channels != c[-1]:
            self.proj_conv = nn.Conv2d(in_channels, c[-1], 1, stride, bias=False)
            self.proj_bn = identity_norm(norm_act, c[-1])
        else:
            self.proj_conv = None
            self.proj_bn = None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        shortcut = x if self.proj_conv is None else self.proj_bn(self.proj_conv(x))
        pre = self.convs(x) + shortcut
        bn1 = self.convs.bn1
        activation = getattr(bn1, "activation", "leaky_relu")
        param = getattr(bn1, "activation_param", 0.01)
        if self.last:
            # `pre` is returned as well, so the activation must not overwrite it.
            return apply_activation(pre, activation, param, inplace=False), pre
        return apply_activation(pre, activation, param, inplace=True)
