"""DeepLabV3 ASPP head (reference ``modules/deeplab.py`` ``DeeplabV3``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .abn import is_norm_layer

# Output stride -> dilation rates of the three 3x3 ASPP branches.
# Reference behaviour (RN-13; ``DeeplabV3.__init__``): OS8 uses 32 for the last rate, not the usual 36.
ASPP_RATES = {16: (6, 12, 18), 8: (12, 24, 32)}


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


class DeeplabV3(nn.Module):
    """ASPP with an image-pooling branch.

    ``o = red_conv(map_bn(cat(map_convs(x))))``, ``p =
    pool_red_conv(global_pooling_bn(global_pooling_conv(pool(x))))``,
    output ``red_bn(o + p)`` of shape (B, out_channels, h, w).

    Args:
        in_channels: backbone channels (2048 for ResNet-50/101, 512 for ResNet-18/34).
        out_channels: output channels (256).
        hidden_channels: channels of each ASPP branch (256).
        out_stride: backbone output stride, 16 or 8; selects the ASPP rates.
        norm_act: callable(num_features) -> normalisation+activation layer.
        pooling_size: eval-time window of the image-pooling branch (``--pooling``); None = always global.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 256,
        out_stride: int = 16,
        norm_act: Callable[[int], nn.Module] = nn.BatchNorm2d,
        pooling_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if out_stride not in ASPP_RATES:
            raise ValueError(f"out_stride must be one of {sorted(ASPP_RATES)}, got {out_stride}")
        self.pooling_size = pooling_size
        rates = ASPP_RATES[out_stride]
        # Registration order fixes the reference's state-dict key order: map_convs, map_bn,
        # global_pooling_conv, global_pooling_bn, red_conv, pool_red_conv, red_bn.
        self.map_convs = nn.ModuleList(
            [nn.Conv2d(in_channels, hidden_channels, 1, bias=False)]
            + [nn.Conv2d(in_channels, hidden_channels, 3, dilation=r, padding=r, bias=False) for r in rates]
        )
        self.map_bn = norm_act(hidden_channels * 4)
        self.global_pooling_conv = nn.Conv2d(in_channels, hidden_channels, 1, bias=False)
        self.global_pooling_bn = norm_act(hidden_channels)
        self.red_conv = nn.Conv2d(hidden_channels * 4, out_channels, 1, bias=False)
        self.pool_red_conv = nn.Conv2d(hidden_channels, out_channels, 1, bias=False)
        self.red_bn = norm_act(out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        gain = nn.init.calculate_gain("leaky_relu", 0.01)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight, gain)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif is_norm_layer(module) and getattr(module, "weight", None) is not None:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, 1, 1) in training (or without pooling_size), else (B, C, h, w)."""
        if self.training or self.pooling_size is None:
            return x.mean(dim=(2, 3), keepdim=True)
        kh, kw = _pair(self.pooling_size)
        kh, kw = min(kh, x.shape[2]), min(kw, x.shape[3])
        pool = F.avg_pool2d(x, (kh, kw), stride=1)
        # Replicate-pad back to h x w; for an even window the extra row/column goes to the right/bottom.
        left, top = (kw - 1) // 2, (kh - 1) // 2
        return F.pad(pool, (left, kw - 1 - left, top, kh - 1 - top), mode="replicate")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([conv(x) for conv in self.map_convs], dim=1)  # (B, 4*hidden, h, w)
        out = self.red_conv(self.map_bn(out))  # (B, out, h, w)
        # (B, out, 1, 1) in training, broadcast over h x w by the sum; (B, out, h, w) in eval.
        pool = self.pool_red_conv(self.global_pooling_bn(self.global_pooling_conv(self._pool(x))))
        return self.red_bn(out + pool)
