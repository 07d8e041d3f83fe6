"""Paired transforms (reference ``dataset/transform.py``): geometry shared by image and label, nearest labels,
torchvision arithmetic."""

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
    """Hand re-derivation of the reference RandomResizedCrop sampling (``RandomResizedCrop.get_params``)."""
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
    # RN-11: about two thirds of the draws cannot fit, so the fallback is common.
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


# ---- uint8 through the DataLoader, normalisation on the device ---------------------------------------


def _old_train(crop: int) -> T.Compose:
    """The training preset before the change: ToTensor + Normalize in the worker."""
    return T.Compose(
        [
            T.RandomResizedCrop(crop, scale=(0.5, 2.0)),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(T.MEAN, T.STD),
        ]
    )


def _old_val(crop: int, crop_val: bool = True) -> T.Compose:
    head = [T.Resize(crop), T.CenterCrop(crop)] if crop_val else []
    return T.Compose([*head, T.ToTensor(), T.Normalize(T.MEAN, T.STD)])


def _random_pair(w: int, h: int, seed: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    lbl = Image.fromarray(rng.integers(0, 21, size=(h, w), dtype=np.uint8))
    return img, lbl


def test_pil_to_tensor_keeps_uint8_values():
    img, lbl = _random_pair(7, 5, seed=0)
    x, y = T.PILToTensor()(img, lbl)
    assert x.dtype == torch.uint8 and x.shape == (3, 5, 7) and x.is_contiguous()
    assert torch.equal(x, torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert y.dtype == torch.uint8 and torch.equal(y, torch.from_numpy(np.array(lbl)))
    assert T.ToUint8Tensor is T.PILToTensor
    assert repr(T.PILToTensor()) == "PILToTensor()"


@pytest.mark.parametrize("mode", ["RGB", "L", "1"])
def test_image_to_tensor_is_uint8_conversion_then_division(mode):
    img = _random_pair(9, 6, seed=1)[0].convert(mode)
    assert torch.equal(T.image_to_tensor(img), T.image_to_uint8_tensor(img).to(torch.float32).div(255))


def test_normalize_on_device_every_value_bitwise():
    # Each of the 256 values in each channel: the device path equals ToTensor + Normalize bit for bit.
    arr = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    img, lbl = Image.fromarray(arr), Image.fromarray(arr[..., 0])
    old, _ = T.Compose([T.ToTensor(), T.Normalize()])(img, lbl)
    new, _ = T.PILToTensor()(img, lbl)
    out = T.normalize_on_device(new[None], "cpu")
    assert out.dtype == torch.float32 and out.shape == (1, 3, 16, 16)
    assert torch.equal(out[0], old)
    assert torch.equal(T.normalize_on_device(new, "cpu"), old)  # an unbatched (3, H, W) image too


@pytest.mark.parametrize(("w", "h"), [(500, 375), (375, 500), (64, 64), (90, 17), (33, 41)])
@pytest.mark.parametrize("crop", [32, 64])
def test_presets_plus_normalize_on_device_equal_old_pipeline(w, h, crop):
    img, lbl = _random_pair(w, h, seed=w * h + crop)
    for seed in range(3):
        random.seed(seed)
        old_x, old_y = _old_train(crop)(img, lbl)
        random.seed(seed)
        new_x, new_y = T.train_transform(crop)(img, lbl)
        assert new_x.dtype == torch.uint8 and new_x.shape == (3, crop, crop)
        assert torch.equal(new_y, old_y)
        assert torch.equal(T.normalize_on_device(new_x[None], "cpu")[0], old_x)
    for crop_val in (True, False):
        old_x, old_y = _old_val(crop, crop_val)(img, lbl)
        new_x, new_y = T.val_transform(crop, crop_val)(img, lbl)
        assert new_x.dtype == torch.uint8 and torch.equal(new_y, old_y)
        assert torch.equal(T.normalize_on_device(new_x[None], "cpu")[0], old_x)


def test_center_crop_padding_normalises_like_old_pipeline():
    # In the val preset Resize brings the short side to the crop first, so CenterCrop never pads there;
    # a smaller image through CenterCrop alone exercises the padding: PIL pads with 0 before the tensor
    # conversion, so the padded pixels become -mean/std on both paths.
    img, lbl = _random_pair(20, 11, seed=5)
    old_x, old_y = T.Compose([T.CenterCrop(32), T.ToTensor(), T.Normalize()])(img, lbl)
    new_x, new_y = T.Compose([T.CenterCrop(32), T.PILToTensor()])(img, lbl)
    assert torch.equal(new_y, old_y)
    out = T.normalize_on_device(new_x[None], "cpu")[0]
    assert torch.equal(out, old_x)
    pad = -torch.tensor(T.MEAN) / torch.tensor(T.STD)
    assert torch.equal(out[:, 0, 0], pad) and torch.equal(new_x[:, 0, 0], torch.zeros(3, dtype=torch.uint8))


def test_normalize_on_device_batch_and_channels_last():
    pairs = [_random_pair(48, 40, seed=s) for s in range(4)]
    old = torch.stack([_old_val(24)(*p)[0] for p in pairs])  # (4, 3, 24, 24)
    batch = torch.stack([T.val_transform(24)(*p)[0] for p in pairs])
    before = batch.clone()
    out = T.normalize_on_device(batch, torch.device("cpu"), memory_format=torch.channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, old)
    assert torch.equal(batch, before)  # the caller's uint8 batch is left alone
    contiguous = T.normalize_on_device(batch, "cpu", memory_format=torch.contiguous_format)
    assert contiguous.is_contiguous() and torch.equal(contiguous, old)


def test_normalize_on_device_custom_statistics():
    batch = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    mean, std = (0.5, 0.25, 0.0), (0.5, 1.0, 2.0)
    expected = T.Normalize(mean, std)(batch.to(torch.float32).div(255), None)[0]
    assert torch.equal(T.normalize_on_device(batch, "cpu", mean=mean, std=std), expected)


def test_normalize_on_device_passes_float_batches_through():
    x = torch.randn(2, 3, 8, 8)
    out = T.normalize_on_device(x, "cpu")
    assert out.dtype == torch.float32 and torch.equal(out, x)
    x64 = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(T.normalize_on_device(x64, "cpu"), x64.float())
    last = T.normalize_on_device(x, "cpu", memory_format=torch.channels_last)
    assert last.is_contiguous(memory_format=torch.channels_last) and torch.equal(last, x)
    with pytest.raises(TypeError, match="uint8 or floating"):
        T.normalize_on_device(torch.zeros(1, 3, 2, 2, dtype=torch.int64), "cpu")


def test_trainer_to_device_normalises_uint8_batches():
    from train import Trainer

    trainer = Trainer.__new__(Trainer)  # only the two attributes _to_device reads
    trainer.device, trainer.channels_last = torch.device("cpu"), True
    pairs = [_random_pair(40, 30, seed=s) for s in range(2)]
    images = torch.stack([T.val_transform(16)(*p)[0] for p in pairs])
    labels = torch.stack([T.val_transform(16)(*p)[1] for p in pairs])
    x, y = trainer._to_device(images, labels)
    expected = torch.stack([_old_val(16)(*p)[0] for p in pairs])
    assert torch.equal(x, expected) and x.is_contiguous(memory_format=torch.channels_last)
    assert y.dtype == torch.int64 and torch.equal(y, labels.long())


@pytest.mark.gpu  # run by benchmarks/gpu_check.py
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_normalize_on_device_cuda_bitwise_equal_to_cpu_pipeline():
    # CUDA turns a division by a CPU scalar into a multiplication by its reciprocal (last-bit differences
    # for about half of the values); normalize_on_device divides by a device tensor to stay exact.
    arr = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    img, lbl = Image.fromarray(arr), Image.fromarray(arr[..., 0])
    old, _ = T.Compose([T.ToTensor(), T.Normalize()])(img, lbl)
    new = T.PILToTensor()(img, lbl)[0][None].pin_memory()
    out = T.normalize_on_device(new, torch.device("cuda"), memory_format=torch.channels_last)
    assert out.is_cuda and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out.cpu()[0], old)


def test_presets_live_in_dataset_presets_and_keep_their_old_import_paths() -> None:
    import argparse

    from dataset import pointcloud_transform, presets
    from dataset.build import step_transforms
    from dataset.transform import train_transform, val_transform  # the old home still imports

    assert train_transform is presets.train_transform and val_transform is presets.val_transform
    assert T.train_transform is presets.train_transform
    assert pointcloud_transform.train_transform_3d is presets.train_transform_3d
    assert pointcloud_transform.eval_transform_3d is presets.eval_transform_3d
    with pytest.raises(AttributeError):
        _ = T.test_transform
    with pytest.raises(AttributeError):
        _ = pointcloud_transform.val_transform
    # build_datasets' choice: image presets at --crop_size, block presets for point clouds.
    image = argparse.Namespace(dataset="ade", crop_size=24, crop_val=False)
    assert [repr(t) for t in step_transforms(image)] == [repr(presets.train_transform(24)),
                                                         repr(presets.val_transform(24, False))]  # fmt: skip
    cloud = argparse.Namespace(dataset="scannet", num_points=300, xyz_norm="room")
    train_tf, eval_tf = step_transforms(cloud)
    assert (train_tf.num_points, train_tf.xyz_norm, eval_tf.augmentation) == (300, "room", None)
    assert train_tf.augmentation is not None
