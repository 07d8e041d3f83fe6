"""Colour maps and image helpers for qualitative figures and TensorBoard."""

from __future__ import annotations

import colorsys
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
ADE_NUM_CLASSES = 151

ArrayLike = torch.Tensor | np.ndarray


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def voc_cmap(N: int = 256, normalized: bool = False) -> np.ndarray:
    """The Pascal VOC palette: bits of the class index spread over R, G, B from the high bit down.

    Bit ``3j`` of the index sets bit ``7-j`` of R, bit ``3j+1`` that of G, bit ``3j+2`` that of B
    (class 1 = (128, 0, 0), class 15 = (192, 128, 128), 255 = (224, 224, 192)).

    Args:
        N: number of entries.
        normalized: float32 in [0, 1] instead of uint8.

    Returns:
        (N, 3) array.
    """
    index = np.arange(N, dtype=np.int64)
    cmap = np.zeros((N, 3), dtype=np.int64)
    for j in range(8):
        for channel in range(3):
            bit = (index >> (3 * j + channel)) & 1
            cmap[:, channel] |= bit << (7 - j)
    if normalized:
        return (cmap / 255.0).astype(np.float32)
    return cmap.astype(np.uint8)


def ade_cmap() -> np.ndarray:
    """151 distinct colours for ADE20k (class 0 = "other" in black), generated deterministically.

    Hues follow the golden-ratio sequence, so consecutive classes are far apart on the colour wheel;
    saturation and value cycle over three levels each, which keeps all 151 colours distinct.

    Returns:
        (151, 3) uint8 array.
    """
    golden = (5**0.5 - 1) / 2
    colours = [BLACK]
    for c in range(1, ADE_NUM_CLASSES):
        hue = (c * golden) % 1.0
        saturation = (0.95, 0.65, 0.8)[c % 3]
        value = (0.95, 0.75, 0.55)[(c // 3) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.asarray(colours, dtype=np.uint8)


def color_label(
    label: ArrayLike,
    cmap: np.ndarray,
    ignore_color: Sequence[int] = WHITE,
    ignore_index: int = IGNORE_INDEX,
) -> np.ndarray:
    """Colour a label map.

    Args:
        label: (..., H, W) integer class indices.
        cmap: (K, 3) uint8 palette (``voc_cmap()``, ``ade_cmap()``).
        ignore_color: colour of the ignore label (white by default; pass ``BLACK`` for black).
        ignore_index: ignore label.

    Returns:
        (..., H, W, 3) uint8 image.
    """
    label = _to_numpy(label).astype(np.int64)
    cmap = np.asarray(cmap)
    if cmap.dtype != np.uint8:
        cmap = np.clip(np.rint(cmap * 255 if cmap.max() <= 1.0 else cmap), 0, 255).astype(np.uint8)
    ignored = label == ignore_index
    valid = label[~ignored]
    if valid.size and (valid.min() < 0 or valid.max() >= len(cmap)):
        raise ValueError(f"label values outside [0, {len(cmap)}) cannot be coloured with this palette")
    # Extend the palette with the ignore colour at the end and point ignored pixels there.
    palette = np.concatenate([cmap, np.asarray([ignore_color], dtype=np.uint8)], axis=0)
    return palette[np.where(ignored, len(cmap), label)]


def label_to_pil_palette(label: ArrayLike, cmap: np.ndarray) -> Image.Image:
    """A palettised ("P" mode) PIL image of a (H, W) label map, as VOC stores its masks.

    Palette entries beyond ``cmap`` are black, except 255 which is white when ``cmap`` has no entry for it.
    """
    label = _to_numpy(label)
    if label.ndim != 2:
        raise ValueError(f"expected a (H, W) label map, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError("a palettised image holds indices 0..255 only")
    cmap = np.asarray(cmap, dtype=np.uint8)[:256]
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(cmap)] = cmap
    if len(cmap) <= IGNORE_INDEX:
        palette[IGNORE_INDEX] = WHITE
    image = Image.fromarray(label.astype(np.uint8))  # mode "L"; putpalette turns it into "P"
    image.putpalette(palette.reshape(-1).tolist())
    return image


class Denormalize:
    """Undo ``Normalize(mean, std)`` on image tensors: ``x * std + mean`` per channel.

    Accepts (C, H, W) or (B, C, H, W) tensors (or numpy arrays, returned as numpy).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    def __call__(self, tensor: ArrayLike) -> ArrayLike:
        if isinstance(tensor, np.ndarray):
            return self(torch.from_numpy(tensor)).numpy()
        shape = (-1, 1, 1)  # broadcast over (..., C, H, W)
        mean = self.mean.to(tensor.device, tensor.dtype).view(shape)
        std = self.std.to(tensor.device, tensor.dtype).view(shape)
        return tensor * std + mean


def make_prediction_grid(
    images: ArrayLike,
    gts: ArrayLike,
    preds_by_name: Mapping[str, ArrayLike],
    cmap: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    gap: int = 2,
) -> np.ndarray:
    """One row per image: the image, its ground truth, then each prediction in ``preds_by_name`` order.

    Args:
        images: (B, 3, H, W) normalised images.
        gts: (B, H, W) ground-truth labels (255 = ignore, drawn white).
        preds_by_name: name -> (B, H, W) predicted labels (e.g. {"LGKD": ..., "old model": ...}).
        cmap: palette for the labels.
        mean, std: the normalisation of ``images``.
        gap: white pixels between tiles.

    Returns:
        (B*H + (B-1)*gap, K*W + (K-1)*gap, 3) uint8 array, K = 2 + len(preds_by_name); pass it to
        ``Logger.add_image(..., dataformats="HWC")`` or ``plt.imshow``.
    """
    images_t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    rgb = Denormalize(mean, std)(images_t.detach().float().cpu()).clamp(0, 1)
    rgb = (rgb.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)  # (B, H, W, 3)
    columns = [rgb, color_label(gts, cmap)] + [color_label(p, cmap) for p in preds_by_name.values()]
    batch, height, width, _ = rgb.shape
    for name, column in zip(["gts", *preds_by_name], columns[1:]):
        if column.shape != rgb.shape:
            raise ValueError(f"{name} has shape {column.shape[:-1]}, expected {(batch, height, width)}")
    n_cols = len(columns)
    grid = np.full(
        (batch * height + (batch - 1) * gap, n_cols * width + (n_cols - 1) * gap, 3), 255, dtype=np.uint8
    )
    for row in range(batch):
        top = row * (height + gap)
        for col, column in enumerate(columns):
            left = col * (width + gap)
            grid[top : top + height, left : left + width] = column[row]
    return grid


#: Colour of pixels no point falls on, and of points with the ignore label, in point-cloud renderings.
EMPTY_COLOR = (255, 255, 255)
IGNORED_POINT_COLOR = (160, 160, 160)


def render_top_down(
    xyz: ArrayLike,
    colours: ArrayLike,
    size: int = 128,
    radius: int = 1,
    background: Sequence[int] = EMPTY_COLOR,
) -> np.ndarray:
    """Top-down (orthographic, along -z) view of a point cloud: each point a square of ``2 * radius + 1``
    pixels; where points overlap, the highest one is seen, as from above.

    x and y share one scale (the cloud keeps its aspect ratio), fitted to the ``size`` x ``size`` canvas; x
    runs left to right and y bottom to top.

    Args:
        xyz: (3, N) coordinates (more rows are ignored, so a (9, N) point tensor can be passed as it is).
        colours: (N, 3) uint8 colour of every point.
        size: side of the square image in pixels.
        radius: half-size of the square drawn for each point (0: one pixel).
        background: colour where no point falls.

    Returns:
        (size, size, 3) uint8 image.
    """
    xyz = _to_numpy(xyz).astype(np.float64)
    colours = np.asarray(_to_numpy(colours), dtype=np.uint8)
    if xyz.ndim != 2 or xyz.shape[0] < 3:
        raise ValueError(f"expected (3+, N) point coordinates, got shape {xyz.shape}")
    if colours.shape != (xyz.shape[1], 3):
        raise ValueError(f"expected ({xyz.shape[1]}, 3) colours, got shape {colours.shape}")
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = np.asarray(background, dtype=np.uint8)
    if xyz.shape[1] == 0:
        return image
    low = xyz[:2].min(axis=1, keepdims=True)  # (2, 1)
    extent = float((xyz[:2].max(axis=1, keepdims=True) - low).max()) or 1.0
    inner = size - 1 - 2 * radius
    cols, rows = np.rint((xyz[:2] - low) / extent * max(inner, 0)).astype(np.int64) + radius  # (N,) each
    rows = size - 1 - rows  # y grows upwards
    # z-buffer: every pixel keeps the highest point's rank (rank = position in the order of heights).
    rank = np.empty(xyz.shape[1], dtype=np.int64)
    rank[np.argsort(xyz[2], kind="stable")] = np.arange(xyz.shape[1])
    top = np.full((size, size), -1, dtype=np.int64)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            r, c = np.clip(rows + dy, 0, size - 1), np.clip(cols + dx, 0, size - 1)
            np.maximum.at(top, (r, c), rank)
    covered = top >= 0
    by_rank = np.empty_like(colours)
    by_rank[rank] = colours
    image[covered] = by_rank[top[covered]]
    return image


def make_pointcloud_grid(
    points: ArrayLike,
    gts: ArrayLike,
    preds_by_name: Mapping[str, ArrayLike],
    cmap: np.ndarray,
    size: int = 128,
    gap: int = 2,
    radius: int = 1,
) -> np.ndarray:
    """The point-cloud counterpart of :func:`make_prediction_grid`: one row per cloud, top-down views of its
    colours, its ground truth, then each prediction in ``preds_by_name`` order (:func:`render_top_down`).

    Args:
        points: (B, C, N) points whose channels 0-2 are xyz and 3-5 rgb in [0, 1] (the 9-attribute clouds of
            the point-cloud datasets).
        gts: (B, N) ground-truth labels (255 = ignore, drawn grey).
        preds_by_name: name -> (B, N) predicted labels.
        cmap: palette for the labels.
        size: side of each tile in pixels.
        gap: white pixels between tiles.
        radius: half-size of the square drawn for each point.

    Returns:
        (B*size + (B-1)*gap, K*size + (K-1)*gap, 3) uint8 array, K = 2 + len(preds_by_name).
    """
    points = _to_numpy(points)
    if points.ndim != 3 or points.shape[1] < 6:
        raise ValueError(f"expected (B, 6+, N) points (xyz, rgb, ...), got shape {points.shape}")
    batch, _, num_points = points.shape
    label_maps = [_to_numpy(gts), *[_to_numpy(p) for p in preds_by_name.values()]]
    for name, labels in zip(["gts", *preds_by_name], label_maps):
        if labels.shape != (batch, num_points):
            raise ValueError(f"{name} has shape {labels.shape}, expected {(batch, num_points)}")
    rgb = np.clip(np.rint(points[:, 3:6].transpose(0, 2, 1) * 255), 0, 255).astype(np.uint8)  # (B, N, 3)
    columns = [rgb] + [color_label(labels, cmap, ignore_color=IGNORED_POINT_COLOR) for labels in label_maps]
    n_cols = len(columns)
    grid = np.full((batch * size + (batch - 1) * gap, n_cols * size + (n_cols - 1) * gap, 3), 255, np.uint8)
    for row in range(batch):
        top = row * (size + gap)
        for col, colours in enumerate(columns):
            left = col * (size + gap)
            grid[top : top + size, left : left + size] = render_top_down(
                points[row], colours[row], size, radius
            )
    return grid
