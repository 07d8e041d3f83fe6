"""DGCNN point-cloud encoder, the body of the 3D incremental segmentation model.

Dynamic Graph CNN (Wang et al., ACM TOG 2019) as 3DPC-CISS (Yang et al., CVPR 2023) configures it for
class-incremental point-cloud segmentation (``models/dgcnn.py`` ``DGCNN`` and the first half of
``models/dgcnn_seg.py`` ``DGCNNSeg.forward``): three EdgeConv blocks of widths [64, 64] with k = 20 on the
9 point attributes (xyz, rgb, room-normalised xyz), a per-point MLP of [512, 256] on their concatenated
outputs, and the maximum of that MLP's output over the points (a global feature) appended to every point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from modules.edgeconv import EdgeConv, NormAct, conv_norm_stack

#: Point attributes of the 3DPC-CISS protocol: xyz, rgb in [0, 1], xyz normalised to the room.
POINT_CHANNELS = 9
EDGECONV_WIDTHS: tuple[tuple[int, ...], ...] = ((64, 64), (64, 64), (64, 64))
MLP_WIDTHS: tuple[int, ...] = (512, 256)
DEFAULT_K = 20
#: Query points per kNN chunk: 8192 rows of 2048 distances are 64 MiB of float32, four clouds of 2048
#: points at a time (the unchunked graph of a batch of 32 such clouds would be 512 MiB).
DEFAULT_KNN_CHUNK = 8192


class DGCNN(nn.Module):
    """DGCNN encoder: EdgeConv blocks, a per-point MLP and a global max-pooled feature.

    ``forward`` returns ``(features, intermediates)`` like the ResNet bodies:

    * ``features`` (B, sum(EdgeConv widths) + mlp_widths[-1], N) = (B, 448, N) by default: the outputs of
      the EdgeConv blocks and, broadcast to every point, the maximum over the points of the MLP output;
    * ``intermediates``: the EdgeConv outputs (B, 64, N) each and the MLP output (B, 256, N), the
      point-cloud counterpart of the backbone stages (``features["attentions"]`` of the model).

    Every output is permutation-equivariant in the points (the global feature is invariant).

    Args:
        in_channels: point attributes C of the (B, C, N) input (9).
        norm_act: callable(num_features) -> normalisation+activation layer (``--norm_act``); its leaky
            slope is set to DGCNN's 0.2.
        edgeconv_widths: layer widths of each EdgeConv block.
        mlp_widths: widths of the per-point MLP after the EdgeConv blocks.
        k: neighbours of the kNN graphs (``--knn_k``).
        chunk_size: query points per kNN chunk (``--knn_chunk``); None computes each graph at once.
    """

    def __init__(
        self,
        in_channels: int,
        norm_act: NormAct,
        edgeconv_widths: Sequence[Sequence[int]] = EDGECONV_WIDTHS,
        mlp_widths: Sequence[int] = MLP_WIDTHS,
        k: int = DEFAULT_K,
        chunk_size: int | None = DEFAULT_KNN_CHUNK,
    ) -> None:
        super().__init__()
        self.k = k
        blocks, channels = [], in_channels
        for widths in edgeconv_widths:
            blocks.append(EdgeConv(channels, widths, norm_act, k=k, chunk_size=chunk_size))
            channels = blocks[-1].out_channels
        self.edge_convs = nn.ModuleList(blocks)
        edge_channels = sum(block.out_channels for block in blocks)
        self.mlp = conv_norm_stack(edge_channels, mlp_widths, norm_act)
        self.out_channels = edge_channels + int(mlp_widths[-1])

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """(B, C, N) points -> ((B, out_channels, N) features, [EdgeConv outputs..., MLP output])."""
        num_points = x.shape[-1]
        edge_outputs = []
        h = x
        for block in self.edge_convs:
            h = block(h)  # (B, 64, N); the next block builds its graph in this feature space
            edge_outputs.append(h)
        point = self.mlp(torch.cat(edge_outputs, dim=1))  # (B, 256, N)
        global_feature = point.max(dim=-1, keepdim=True).values  # (B, 256, 1)
        features = torch.cat([*edge_outputs, global_feature.expand(-1, -1, num_points)], dim=1)
        return features, [*edge_outputs, point]


__all__ = ["DEFAULT_K", "DEFAULT_KNN_CHUNK", "DGCNN", "EDGECONV_WIDTHS", "MLP_WIDTHS", "POINT_CHANNELS"]
