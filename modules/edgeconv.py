"""Point-cloud blocks of DGCNN: the chunked k-nearest-neighbour graph, EdgeConv and the per-point head.

DGCNN (Wang et al., "Dynamic Graph CNN for Learning on Point Clouds", ACM TOG 2019, Eq. 7-8): every EdgeConv
block builds the kNN graph of its input features (the graph is *dynamic*: recomputed in the feature space of
each block), computes an edge feature ``h(x_j - x_i, x_i)`` for every neighbour ``j`` of point ``i`` with
shared 1x1 convolutions, normalisation and leaky ReLU, and keeps the channel-wise maximum over the
neighbours. The layer stack follows 3DPC-CISS (Yang et al., CVPR 2023; ``models/dgcnn.py``,
``models/dgcnn_seg.py``): 1x1 convolutions without bias, each followed by batch norm and a leaky ReLU of
slope 0.2.

Everything is pure PyTorch: the graph comes from ``torch.cdist`` + ``topk`` over chunks of query points, so
the full (N, N) distance matrix of a cloud is never held when N exceeds the chunk (no torch-cluster, no
compiled extension).

Tensor layout: point features are (B, C, N) (channels first, as images are (B, C, H, W)); neighbour indices
are (B, N, k) int64 indices into the N points of the same cloud.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from utils.errors import OptionsError

NormAct = Callable[[int], nn.Module]

#: Negative slope of DGCNN's leaky ReLUs (3DPC-CISS ``models/dgcnn.py``: ``nn.LeakyReLU(0.2)``).
LEAKY_SLOPE = 0.2


def _check_k(k: int, num_points: int) -> None:
    if not 1 <= k <= num_points:
        raise OptionsError(
            f"The k-nearest-neighbour graph of DGCNN needs 1 <= k <= number of points, got k = {k} for point "
            f"clouds of {num_points} points. Lower --knn_k (DGCNN uses 20) or sample more points per block "
            "with --num_points (the 3DPC-CISS protocol uses 2048)."
        )


def _nearest(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """(b, q, C) queries, (b, n, C) points -> (b, q, k) indices of the k nearest points, nearest first."""
    distances = torch.cdist(queries, points, compute_mode="use_mm_for_euclid_dist")  # (b, q, n), one chunk
    return distances.topk(k, dim=-1, largest=False, sorted=True).indices


def knn(points: Tensor, k: int, chunk_size: int | None = None) -> Tensor:
    """Indices of the k nearest neighbours of every point, by Euclidean distance in feature space.

    Every point is its own nearest neighbour (distance 0), as in DGCNN. The distances come from
    ``torch.cdist``'s matrix-product form ``|x|^2 + |y|^2 - 2 x.y`` (a GEMM, fast on CPU and GPU; the direct
    form is 4x slower on the CPU) for every chunk size. Its rounding (~1e-7 relative) depends on the shape
    of the product, so neighbours at distances equal up to rounding, duplicated points above all (block
    sampling with replacement produces them), may come in another order for another chunk size. EdgeConv
    keeps the maximum over the neighbours, so the order never matters, and duplicated points have
    identical features, so neither does which of them is picked.

    No gradient flows through the graph (DGCNN treats it as a constant of each forward): the distances
    are computed without autograd, in float32 even under autocast.

    Args:
        points: (B, C, N) point features.
        k: neighbours per point, ``1 <= k <= N``.
        chunk_size: how many query points' distance rows are computed at once, counted over the whole
            batch. Peak extra memory is about ``chunk_size * N`` float32 distances (a chunk of whole clouds
            when ``chunk_size >= N``, else slices of one cloud). None: all ``B * N`` rows at once.

    Returns:
        (B, N, k) int64 indices into dim 2 of ``points``.

    Raises:
        OptionsError: ``k`` outside ``[1, N]`` or ``chunk_size < 1``.
    """
    if points.dim() != 3:
        raise ValueError(f"knn expects (B, C, N) point features, got shape {tuple(points.shape)}")
    batch, _, num_points = points.shape
    _check_k(k, num_points)
    if chunk_size is not None and chunk_size < 1:
        raise OptionsError(f"--knn_chunk must be at least 1 (query points per chunk), got {chunk_size}.")
    rows = batch * num_points if chunk_size is None else int(chunk_size)
    with torch.no_grad(), torch.autocast(points.device.type, enabled=False):
        pts = points.detach().float().transpose(1, 2)  # (B, N, C)
        if rows >= num_points:
            clouds = max(rows // num_points, 1)  # whole clouds per chunk
            if clouds >= batch:
                return _nearest(pts, pts, k)
            parts = [_nearest(pts[b : b + clouds], pts[b : b + clouds], k) for b in range(0, batch, clouds)]
            return torch.cat(parts, dim=0)
        out = torch.empty(batch, num_points, k, dtype=torch.long, device=points.device)
        for b in range(batch):
            cloud = pts[b : b + 1]  # (1, N, C)
            for start in range(0, num_points, rows):
                out[b : b + 1, start : start + rows] = _nearest(cloud[:, start : start + rows], cloud, k)
        return out


def edge_features(x: Tensor, idx: Tensor) -> Tensor:
    """DGCNN's edge features ``[x_j - x_i, x_i]`` for every neighbour ``j`` of every point ``i``.

    Materialises (B, 2C, N, k); :class:`EdgeConv` computes its first layer without it, and this function is
    the definition it is tested against.

    Args:
        x: (B, C, N) point features.
        idx: (B, N, k) neighbour indices (:func:`knn`).

    Returns:
        (B, 2C, N, k) edge features.
    """
    batch, channels, num_points = x.shape
    k = idx.shape[-1]
    neighbours = gather_neighbours(x, idx)  # (B, C, N, k)
    centres = x.unsqueeze(-1).expand(batch, channels, num_points, k)
    return torch.cat([neighbours - centres, centres], dim=1)


def gather_neighbours(x: Tensor, idx: Tensor) -> Tensor:
    """``out[b, :, i, m] = x[b, :, idx[b, i, m]]``: (B, C, N) features, (B, N, k) indices -> (B, C, N, k).

    One ``index_select`` on the (B*N, C) point-major view, so the index is (B*N*k,) and not expanded over
    the channels (an expanded int64 index for ``torch.gather`` would take twice the memory of the result).
    The result has channels-last strides (a permuted view of the gathered (B, N, k, C) rows).
    """
    batch, channels, num_points = x.shape
    k = idx.shape[-1]
    rows = x.transpose(1, 2).reshape(batch * num_points, channels)  # (B*N, C)
    offsets = torch.arange(batch, device=idx.device).view(batch, 1, 1) * num_points
    flat = (idx + offsets).view(-1)  # (B*N*k,) row of every neighbour in ``rows``
    return rows.index_select(0, flat).view(batch, num_points, k, channels).permute(0, 3, 1, 2)


def _norm(norm_act: NormAct, channels: int) -> nn.Module:
    """A normalisation+activation layer from ``norm_act`` with DGCNN's leaky slope.

    Set as an attribute after construction (as :func:`modules.residual.identity_norm` does) so that every
    ABN flavour, ours or the compiled inplace_abn's, and ``BatchNormAct2d`` take it whatever keyword
    arguments ``norm_act`` was built with.
    """
    layer = norm_act(channels)
    layer.activation_param = LEAKY_SLOPE
    return layer


class EdgeConv(nn.Module):
    """One EdgeConv block of DGCNN: kNN graph, shared 1x1 convolutions on edge features, max over neighbours.

    Layers (3DPC-CISS ``models/dgcnn.py`` ``conv2d``): for each width ``w`` a 1x1 ``Conv2d`` without bias and
    a normalisation+activation layer (``norm_act``, leaky slope 0.2), applied to the (B, 2C, N, k) edge
    features; then the maximum over the k neighbours.

    The first convolution is linear in the edge feature, ``W [x_j - x_i; x_i] = W_a x_j + (W_b - W_a) x_i``
    with ``W = [W_a, W_b]``, so it is computed once per point, (B, w, N), and the neighbours' rows are
    gathered afterwards: k times fewer multiply-adds than convolving the (B, 2C, N, k) edge features, which
    are never built. The weight is the ``Conv2d`` parameter ``conv0.weight`` all the same.

    Args:
        in_channels: C of the (B, C, N) input.
        widths: output channels of the successive 1x1 convolutions, e.g. (64, 64).
        norm_act: callable(num_features) -> normalisation+activation layer.
        k: neighbours per point.
        chunk_size: query points per kNN chunk (:func:`knn`).
    """

    def __init__(
        self,
        in_channels: int,
        widths: Sequence[int],
        norm_act: NormAct,
        k: int = 20,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not widths:
            raise ValueError("EdgeConv needs at least one layer width")
        if k < 1:
            raise OptionsError(f"--knn_k must be at least 1 (neighbours per point; DGCNN uses 20), got {k}.")
        if chunk_size is not None and chunk_size < 1:
            raise OptionsError(
                f"--knn_chunk must be at least 1 query point (or 0 for no chunking), got {chunk_size}."
            )
        self.in_channels = in_channels
        self.k = k
        self.chunk_size = chunk_size
        self.out_channels = int(widths[-1])
        channels = [2 * in_channels, *[int(w) for w in widths]]
        for i in range(len(widths)):
            self.add_module(f"conv{i}", nn.Conv2d(channels[i], channels[i + 1], 1, bias=False))
            self.add_module(f"bn{i}", _norm(norm_act, channels[i + 1]))
        self.num_layers = len(widths)

    def first_layer(self, x: Tensor, idx: Tensor) -> Tensor:
        """``conv0`` applied to :func:`edge_features` ``(x, idx)``, (B, w0, N, k), without building them."""
        channels = x.shape[1]
        weight = self.conv0.weight.flatten(1)  # (w0, 2C)
        w_neighbour = weight[:, :channels]
        w_centre = weight[:, channels:] - w_neighbour
        # One convolution for both per-point projections: (B, 2*w0, N).
        projected = F.conv1d(x, torch.cat([w_neighbour, w_centre]).unsqueeze(-1))
        neighbour, centre = projected.split(weight.shape[0], dim=1)  # (B, w0, N) each
        return gather_neighbours(neighbour, idx) + centre.unsqueeze(-1)  # (B, w0, N, k)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, N) -> (B, widths[-1], N)."""
        idx = knn(x, self.k, self.chunk_size)  # (B, N, k), recomputed in this block's input space
        h = self.bn0(self.first_layer(x, idx))
        for i in range(1, self.num_layers):
            h = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h))
        return h.max(dim=-1).values  # (B, w, N): the gradient goes to the maximal neighbour, as in DGCNN

    def extra_repr(self) -> str:
        return f"k={self.k}, chunk_size={self.chunk_size}"


def conv_norm_stack(in_channels: int, widths: Sequence[int], norm_act: NormAct) -> nn.Sequential:
    """Per-point layers: for each width a 1x1 ``Conv1d`` without bias, then ``norm_act`` (slope 0.2).

    3DPC-CISS ``models/dgcnn.py`` ``conv1d`` and the segmentor of ``models/dgcnn_seg.py``. The bias of the
    convolutions would be removed by the following batch norm, so there is none (the reference gives the
    segmentor's second convolution a redundant one). Module names: ``0`` conv, ``1`` norm, ``2`` conv, ...
    """
    layers: list[nn.Module] = []
    channels = [in_channels, *[int(w) for w in widths]]
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.Conv1d(c_in, c_out, 1, bias=False), _norm(norm_act, c_out)]
    return nn.Sequential(*layers)


class PointSegHead(nn.Module):
    """The per-point segmentation head on DGCNN features (3DPC-CISS ``models/dgcnn_seg.py`` ``segmentor``).

    (B, C_in, N) -> 1x1 conv + norm + leaky ReLU for each width -> dropout -> (B, widths[-1], N). The
    classifiers (``IncrementalSegmentationModule.cls``) follow.

    Args:
        in_channels: channels of the body's output (448 for DGCNN: 3 x 64 EdgeConv + 256 global).
        norm_act: callable(num_features) -> normalisation+activation layer.
        widths: output channels of the 1x1 convolutions.
        dropout: dropout probability after the last layer (active in training only).
    """

    def __init__(
        self,
        in_channels: int,
        norm_act: NormAct,
        widths: Sequence[int] = (256, 128),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.mlp = conv_norm_stack(in_channels, widths, norm_act)
        self.dropout = nn.Dropout(dropout)
        self.out_channels = int(widths[-1])

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.mlp(x))


__all__ = [
    "LEAKY_SLOPE",
    "EdgeConv",
    "PointSegHead",
    "conv_norm_stack",
    "edge_features",
    "gather_neighbours",
    "knn",
]
