"""Top-down renderings of point clouds and the point-cloud prediction grid (utils/visualization.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.visualization import (
    EMPTY_COLOR,
    IGNORED_POINT_COLOR,
    make_pointcloud_grid,
    render_top_down,
    voc_cmap,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_the_highest_point_is_seen_from_above():
    xyz = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.5, 2.0, 1.0]])  # (3, N): x, y, z rows
    colours = np.array([RED, GREEN, BLUE], dtype=np.uint8)  # point 1 (z = 2) lies above point 0
    image = render_top_down(xyz, colours, size=9, radius=0)
    assert image.shape == (9, 9, 3) and image.dtype == np.uint8
    assert tuple(image[8, 0]) == GREEN  # (x, y) = (0, 0): bottom left
    assert tuple(image[0, 8]) == BLUE  # (1, 1): top right
    assert (image == EMPTY_COLOR).all(axis=-1).sum() == 81 - 2
    # The order of the points does not change what is seen.
    reversed_image = render_top_down(xyz[:, ::-1], colours[::-1], size=9, radius=0)
    assert np.array_equal(reversed_image, image)


def test_top_down_view_keeps_the_aspect_ratio_and_accepts_point_tensors():
    points = torch.zeros(9, 3)
    points[0] = torch.tensor([0.0, 2.0, 1.0])  # x spans 2
    points[1] = torch.tensor([0.0, 1.0, 0.5])  # y spans 1
    image = render_top_down(points, np.full((3, 3), 7, np.uint8), size=21, radius=1)
    drawn = (image != EMPTY_COLOR).any(axis=-1)
    rows, cols = np.nonzero(drawn)
    assert cols.min() == 0 and cols.max() == 20  # the full width
    assert rows.max() == 20 and rows.min() == 9  # half the height (y = 1 of 2), at the bottom
    with pytest.raises(ValueError, match=r"\(3\+, N\)"):
        render_top_down(np.zeros((2, 4)), np.zeros((4, 3), np.uint8))
    with pytest.raises(ValueError, match="colours"):
        render_top_down(np.zeros((3, 4)), np.zeros((3, 3), np.uint8))


def test_pointcloud_grid_columns():
    generator = torch.Generator().manual_seed(0)
    points = torch.rand(2, 9, 200, generator=generator)
    gts = torch.randint(0, 5, (2, 200), generator=generator)
    gts[:, :50] = 255
    grid = make_pointcloud_grid(
        points, gts, {"LGKD": gts.clone(), "FT": torch.zeros_like(gts)}, voc_cmap(), 32
    )
    assert grid.shape == (2 * 32 + 2, 4 * 32 + 3 * 2, 3)
    tile = lambda row, col: grid[row * 34 : row * 34 + 32, col * 34 : col * 34 + 32]  # noqa: E731
    assert np.array_equal(tile(1, 1), tile(1, 2))  # the prediction equal to the ground truth looks the same
    colours = {tuple(c) for c in tile(0, 1).reshape(-1, 3)}
    assert IGNORED_POINT_COLOR in colours and EMPTY_COLOR in colours
    assert colours <= {EMPTY_COLOR, IGNORED_POINT_COLOR, *map(tuple, voc_cmap()[:5])}
    assert {tuple(c) for c in tile(0, 3).reshape(-1, 3)} <= {EMPTY_COLOR, (0, 0, 0)}
    rgb = {tuple(c) for c in tile(0, 0).reshape(-1, 3)} - {EMPTY_COLOR}
    assert len(rgb) > 50  # the clouds' own colours
    with pytest.raises(ValueError, match="LGKD has shape"):
        make_pointcloud_grid(points, gts, {"LGKD": gts[:, :10]}, voc_cmap())
