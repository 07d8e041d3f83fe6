"""Paired transforms (§4.6): geometry shared by image and label, nearest labels, torchvision arithmetic."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from dataset import transform as T


def _label_and_image(w: int = 40, h: int = 30, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A blocky label map and an image whose grey level encodes the label (value * 10)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 21, size=(h // 5 + 1, w // 5 + 1)).astype(np.uint8)
    label = np.kron(coarse, np.ones((5, 5), dtype=np.uint8))[:h, :w]
    label[0, 0] = 255
    image = np.repeat((label.astype(np.int32) * 10 % 256).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(image), Image.fromarray(label)


def _reference_params(width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """Hand re-derivation of the reference RandomResizedCrop sampling (§4.6)."""
    area = width * height
    for _attempt in range(10):
        target = random.uniform(scale[0], scale[1]) * area
        aspect = math.exp(random.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if w <= width and h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    if width / height < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif width / height > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (64, 64), (300, 100)])
def test_random_resized_crop_params_match_reference_formula(size):
    img = Image.new("RGB", size)
    scale, ratio = (0.5, 2.0), (3 / 4, 4 / 3)
    fallbacks = 0
    for seed in range(200):
        random.seed(seed)
        got = T.RandomResizedCrop.get_params(img, scale, ratio)
        after_got = random.random()
        random.seed(seed)
        expected = _reference_params(size[0], size[1], scale, ratio)
        assert got == expected
        assert random.random() == after_got  # same number of draws consumed
        top, left, h, w = got
        assert 0 <= top <= size[1] - h and 0 <= left <= size[0] - w
        fallbacks += (top, left, h, w) == ((size[1] - h) // 2, (size[0] - w) // 2, h, w)
    # Q11: about two thirds of the draws cannot fit, so the fallback is common.
    assert fallbacks > 0


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((300, 100), (0, 83, 100, 133)),  # too wide: h = H, w = round(H * 4/3) = 133, centred
        ((100, 300), (83, 0, 133, 100)),  # too tall: w = W, h = round(W / (3/4)) = 133
        ((120, 100), (0, 0, 100, 120)),  # ratio inside [3/4, 4/3]: whole image
    ],
)
def test_random_resized_crop_fallback(size, expected):
    # A scale far above 1 never fits, so all 10 attempts fail.
    assert T.RandomResizedCrop.get_params(Image.new("L", size), (5.0, 6.0), (3 / 4, 4 / 3)) == expected


def test_random_resized_crop_keeps_image_and_label_aligned():
    img, lbl = _label_and_image()
    exact = T.RandomResizedCrop(24, interpolation=Image.NEAREST)
    for seed in range(20):
        random.seed(seed)
        out_img, out_lbl = exact(img, lbl)
        assert out_img.size == out_lbl.size == (24, 24)
        code = (np.asarray(out_lbl).astype(np.int32) * 10 % 256).astype(np.uint8)
        np.testing.assert_array_equal(np.asarray(out_img)[..., 0], code)


def test_bilinear_image_matches_nearest_label_inside_regions():
    img, lbl = _label_and_image(80, 60)
    for seed in range(10):
        random.seed(seed)
        out_img, out_lbl = T.RandomResizedCrop(48)(img, lbl)
        lab = np.asarray(out_lbl).astype(np.int32)
        pad = np.pad(lab, 1, mode="edge")
        flat = np.ones_like(lab, dtype=bool)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                flat &= pad[dy : dy + lab.shape[0], dx : dx + lab.shape[1]] == lab
        flat &= lab != 255
        grey = np.asarray(out_img)[..., 0].astype(np.int32)
        assert flat.sum() > 100
        assert np.abs(grey[flat] - (lab[flat] * 10 % 256)).max() <= 1


def test_labels_use_nearest_no_new_values():
    img, lbl = _label_and_image(53, 41)
    values = set(np.unique(np.asarray(lbl)).tolist())
    tf = T.train_transform(32)
    for seed in range(15):
        random.seed(seed)
        _, out = tf(img, lbl)
        assert out.dtype == torch.uint8
        assert set(out.unique().tolist()) <= values
    _, out = T.val_transform(32, True)(img, lbl)
    assert set(out.unique().tolist()) <= values


def test_horizontal_flip_flips_both_together():
    img, lbl = _label_and_image()
    flips = 0
    for seed in range(10):
        random.seed(seed)
        draw = random.random()
        random.seed(seed)
        out_img, out_lbl = T.RandomHorizontalFlip(0.5)(img, lbl)
        flipped = draw < 0.5
        flips += flipped
        ref = np.asarray(lbl)[:, ::-1] if flipped else np.asarray(lbl)
        np.testing.assert_array_equal(np.asarray(out_lbl), ref)
        ref_img = np.asarray(img)[:, ::-1] if flipped else np.asarray(img)
        np.testing.assert_array_equal(np.asarray(out_img), ref_img)
    assert 0 < flips < 10


@pytest.mark.parametrize(
    ("size", "expected"),
    [((500, 375), (682, 512)), ((375, 500), (512, 682)), ((512, 700), (512, 700)), ((333, 333), (512, 512))],
)
def test_resize_shorter_side_like_torchvision(size, expected):
    img, lbl = T.Resize(512)(Image.new("RGB", size), Image.new("L", size))
    assert img.size == lbl.size == expected


def test_resize_label_nearest():
    _, lbl = _label_and_image()
    _, out = T.Resize(77)(lbl.convert("RGB"), lbl)
    assert set(np.unique(np.asarray(out)).tolist()) <= set(np.unique(np.asarray(lbl)).tolist())


@pytest.mark.parametrize(("width", "left"), [(682, 85), (683, 86), (512, 0)])
def test_center_crop_offsets(width, left):
    arr = np.arange(512 * width, dtype=np.int64).reshape(512, width) % 251
    lbl = Image.fromarray(arr.astype(np.uint8))
    img, out = T.CenterCrop(512)(lbl.convert("RGB"), lbl)
    assert img.size == out.size == (512, 512)
    np.testing.assert_array_equal(np.asarray(out), arr[:, left : left + 512].astype(np.uint8))


def test_center_crop_pads_small_images_with_zero():
    lbl = Image.fromarray(np.full((4, 6), 7, dtype=np.uint8))
    _, out = T.CenterCrop(8)(lbl.convert("RGB"), lbl)
    arr = np.asarray(out)
    assert arr.shape == (8, 8)
    assert (arr[2:6, 1:7] == 7).all() and arr.sum() == 7 * 24


def test_to_tensor_and_normalize():
    img = Image.fromarray(np.array([[[0, 128, 255]]], dtype=np.uint8))
    lbl = Image.fromarray(np.array([[255]], dtype=np.uint8))
    t_img, t_lbl = T.ToTensor()(img, lbl)
    assert t_img.shape == (3, 1, 1) and t_img.dtype == torch.float32
    torch.testing.assert_close(t_img.flatten(), torch.tensor([0.0, 128 / 255, 1.0]))
    assert t_lbl.dtype == torch.uint8 and t_lbl.item() == 255
    n_img, n_lbl = T.Normalize()(t_img, t_lbl)
    expected = (t_img.flatten() - torch.tensor(T.MEAN)) / torch.tensor(T.STD)
    torch.testing.assert_close(n_img.flatten(), expected)
    assert n_lbl is t_lbl


def test_presets_shapes():
    img, lbl = _label_and_image(70, 50)
    random.seed(0)
    x, y = T.train_transform(32)(img, lbl)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    x, y = T.val_transform(32, crop_val=True)(img, lbl)
    assert x.shape == (3, 32, 32) and y.shape == (32, 32)
    x, y = T.val_transform(32, crop_val=False)(img, lbl)
    assert x.shape == (3, 50, 70) and y.shape == (50, 70)
