"""Colour maps and figure helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.visualization import (
    BLACK,
    Denormalize,
    ade_cmap,
    color_label,
    label_to_pil_palette,
    make_prediction_grid,
    voc_cmap,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def test_voc_cmap_known_colours() -> None:
    cmap = voc_cmap()
    assert cmap.shape == (256, 3) and cmap.dtype == np.uint8
    expected = {
        0: (0, 0, 0),  # background
        1: (128, 0, 0),  # aeroplane
        2: (0, 128, 0),  # bicycle
        3: (128, 128, 0),  # bird
        7: (128, 128, 128),  # car
        15: (192, 128, 128),  # person
        20: (0, 64, 128),  # tv/monitor
        255: (224, 224, 192),  # void
    }
    for index, colour in expected.items():
        assert tuple(cmap[index]) == colour, index
    assert len({tuple(c) for c in cmap}) == 256  # the bit interleaving is a bijection


def test_voc_cmap_normalized_and_size() -> None:
    small = voc_cmap(21, normalized=True)
    assert small.shape == (21, 3) and small.dtype == np.float32
    np.testing.assert_allclose(small[15], np.array([192, 128, 128]) / 255)


def test_ade_cmap_distinct_and_deterministic() -> None:
    cmap = ade_cmap()
    assert cmap.shape == (151, 3) and cmap.dtype == np.uint8
    assert tuple(cmap[0]) == (0, 0, 0)
    assert len({tuple(c) for c in cmap}) == 151
    np.testing.assert_array_equal(cmap, ade_cmap())


def test_color_label_ignore_colour() -> None:
    label = torch.tensor([[0, 1], [15, 255]])
    coloured = color_label(label, voc_cmap())
    assert coloured.shape == (2, 2, 3) and coloured.dtype == np.uint8
    assert tuple(coloured[0, 1]) == (128, 0, 0)
    assert tuple(coloured[1, 0]) == (192, 128, 128)
    assert tuple(coloured[1, 1]) == (255, 255, 255)
    assert tuple(color_label(label, voc_cmap(21), ignore_color=BLACK)[1, 1]) == (0, 0, 0)
    batch = color_label(np.zeros((3, 4, 5), dtype=np.uint8), ade_cmap())
    assert batch.shape == (3, 4, 5, 3)
    with pytest.raises(ValueError):
        color_label(np.array([[21]]), voc_cmap(21))


def test_label_to_pil_palette() -> None:
    image = label_to_pil_palette(np.array([[0, 1], [15, 255]], dtype=np.uint8), voc_cmap(21))
    assert image.mode == "P"
    assert image.getpixel((0, 1)) == 15
    rgb = image.convert("RGB")
    assert rgb.getpixel((0, 1)) == (192, 128, 128)
    assert rgb.getpixel((1, 1)) == (255, 255, 255)  # 255 beyond a 21-entry palette: white


def test_denormalize_inverts_normalize() -> None:
    x = torch.rand(2, 3, 4, 5)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    normalised = (x - mean) / std
    torch.testing.assert_close(Denormalize(MEAN, STD)(normalised), x)
    torch.testing.assert_close(Denormalize(MEAN, STD)(normalised[0]), x[0])
    np.testing.assert_allclose(Denormalize(MEAN, STD)(normalised.numpy()), x.numpy(), atol=1e-6)


def test_make_prediction_grid() -> None:
    images = torch.zeros(2, 3, 4, 6)  # normalised zeros -> the mean colour
    gts = torch.zeros(2, 4, 6, dtype=torch.long)
    gts[1, 0, 0] = 255
    preds = {"new": torch.ones(2, 4, 6, dtype=torch.long), "old": torch.full((2, 4, 6), 15)}
    grid = make_prediction_grid(images, gts, preds, voc_cmap(), MEAN, STD)
    gap = 2
    assert grid.shape == (2 * 4 + gap, 4 * 6 + 3 * gap, 3) and grid.dtype == np.uint8
    assert tuple(grid[0, 0]) == tuple(round(255 * m) for m in MEAN)
    assert tuple(grid[0, 6 + gap]) == (0, 0, 0)  # ground truth background
    assert tuple(grid[4 + gap, 6 + gap]) == (255, 255, 255)  # ignored pixel of image 1
    assert tuple(grid[0, 2 * (6 + gap)]) == (128, 0, 0)  # "new" predicts class 1
    assert tuple(grid[4 + gap, 3 * (6 + gap)]) == (192, 128, 128)  # "old" predicts class 15
    assert tuple(grid[0, 6]) == (255, 255, 255)  # separator
    with pytest.raises(ValueError):
        make_prediction_grid(
            images, gts, {"bad": torch.zeros(2, 3, 3, dtype=torch.long)}, voc_cmap(), MEAN, STD
        )
