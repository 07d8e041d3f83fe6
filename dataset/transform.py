"""Paired image/label transforms (reference ``dataset/transform.py``), written with PIL and torch only.

Every transform takes and returns an ``(image, label)`` pair and applies the same geometry to both:
the image is resampled bilinearly, the label with nearest neighbour so that no new class values appear.
Until the tensor conversion both are PIL images; afterwards the label is a ``uint8`` tensor ``(H, W)``
and the image a tensor ``(3, H, W)`` whose type depends on the conversion:

* the presets (:mod:`dataset.presets`: ``train_transform``, ``val_transform``) end with
  :class:`PILToTensor`: the image stays ``uint8`` in [0, 255] through the DataLoader and is normalised on
  the device by :func:`normalize_on_device`, called by every consumer of batches (``Trainer._to_device``
  and friends);
* :class:`ToTensor` (float32 in [0, 1]) followed by :class:`Normalize` keeps working for pipelines built
  by hand; :func:`normalize_on_device` passes such float batches through unchanged.

Why uint8: at crop 512 ToTensor + Normalize took 2.7 of the 7.9 ms a worker spends per image
(BENCHMARKS.md, data pipeline), and a float32 batch is 4x the bytes of a uint8 one in collate, pinning
and the host-to-device copy. :func:`normalize_on_device` repeats the same float32 operations in the same
order (float conversion, true division by 255, minus mean, true division by std), so the normalised
batch is bitwise identical to the old worker-side result.

The arithmetic follows torchvision's functional PIL backend (the reference calls it), so crops and
resized pixels are identical: RandomResizedCrop samples with python ``random`` exactly as the
reference does, Resize computes the long side as ``int(size * long / short)``, CenterCrop rounds the
offset with ``int(round(...))``, and ToTensor divides by 255 after the float conversion.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

#: ImageNet statistics used by every reference preset (and to show normalised images again).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MEAN, STD = IMAGENET_MEAN, IMAGENET_STD  # the names the transforms' defaults use

Pair = tuple[Any, Any]


def _pair_size(size: int | Sequence[int]) -> tuple[int, int]:
    """``size`` as (height, width); an int means a square."""
    if isinstance(size, int):
        return size, size
    if len(size) == 1:
        return int(size[0]), int(size[0])
    return int(size[0]), int(size[1])


def crop(img: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    """PIL crop with torchvision's argument order (areas outside the image are filled with 0)."""
    return img.crop((left, top, left + width, top + height))


def resize_shorter_side(img: Image.Image, size: int, resample: int) -> Image.Image:
    """Resize so that the shorter side equals ``size``, keeping the aspect ratio as torchvision does.

    torchvision truncates the long side (``int(size * long / short)``) and returns the image unchanged
    when the short side already equals ``size``.
    """
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return img
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return img.resize((new_w, new_h), resample)


class Compose:
    """Apply paired transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[Any, Any], Pair]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Any, lbl: Any) -> Pair:
        for t in self.transforms:
            img, lbl = t(img, lbl)
        return img, lbl

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


class RandomResizedCrop:
    """Crop a random area/aspect-ratio region and resize it to ``size`` (image bilinear, label nearest).

    Args:
        size: output size (int for a square, or (height, width)).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect ratio (width / height).
        interpolation: PIL resampling filter for the image.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.5, 2.0),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        interpolation: int = Image.BILINEAR,
    ) -> None:
        self.size = _pair_size(size)
        self.scale = scale
        self.ratio = ratio
        self.interpolation = interpolation

    @staticmethod
    def get_params(
        img: Image.Image, scale: tuple[float, float], ratio: tuple[float, float]
    ) -> tuple[int, int, int, int]:
        """Sample ``(top, left, height, width)`` of the crop with python ``random``.

        Reference behaviour (RN-11): ``scale`` is an area fraction and the reference passes
        (0.5, 2.0), so every draw above 1 fails to fit and the centred fallback is common.
        """
        width, height = img.size
        area = width * height
        log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):
            target_area = random.uniform(*scale) * area
            aspect_ratio = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect_ratio)))
            h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return top, left, h, w
        # Fallback: the largest centred crop whose aspect ratio lies inside ``ratio``.
        in_ratio = width / height
        if in_ratio < min(ratio):
            w = width
            h = int(round(w / min(ratio)))
        elif in_ratio > max(ratio):
            h = height
            w = int(round(h * max(ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, lbl: Image.Image) -> Pair:
        top, left, h, w = self.get_params(img, self.scale, self.ratio)
        out_wh = (self.size[1], self.size[0])
        img = crop(img, top, left, h, w).resize(out_wh, self.interpolation)
        lbl = crop(lbl, top, left, h, w).resize(out_wh, Image.NEAREST)
        return img, lbl

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Flip image and label left-right with probability ``p`` (one ``random.random()`` draw)."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image, lbl: Image.Image) -> Pair:
        if random.random() < self.p:
            return img.transpose(Image.FLIP_LEFT_RIGHT), lbl.transpose(Image.FLIP_LEFT_RIGHT)
        return img, lbl

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p})"


class Resize:
    """Resize the shorter side to ``size`` (int), or to exactly (height, width) for a pair.

    Args:
        size: target short side, or (height, width).
        interpolation: PIL resampling filter for the image; the label always uses nearest.
    """

    def __init__(self, size: int | Sequence[int], interpolation: int = Image.BILINEAR) -> None:
        self.size = size
        self.interpolation = interpolation

    def _resize(self, img: Image.Image, resample: int) -> Image.Image:
        if isinstance(self.size, int):
            return resize_shorter_side(img, self.size, resample)
        if len(self.size) == 1:
            return resize_shorter_side(img, int(self.size[0]), resample)
        h, w = self.size
        return img.resize((w, h), resample)

    def __call__(self, img: Image.Image, lbl: Image.Image) -> Pair:
        return self._resize(img, self.interpolation), self._resize(lbl, Image.NEAREST)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


class CenterCrop:
    """Crop the centre ``size`` region; an image smaller than ``size`` is first zero-padded (torchvision)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair_size(size)

    @staticmethod
    def _pad(img: Image.Image, crop_h: int, crop_w: int) -> Image.Image:
        w, h = img.size
        left = (crop_w - w) // 2 if crop_w > w else 0
        top = (crop_h - h) // 2 if crop_h > h else 0
        right = (crop_w - w + 1) // 2 if crop_w > w else 0
        bottom = (crop_h - h + 1) // 2 if crop_h > h else 0
        canvas = Image.new(img.mode, (w + left + right, h + top + bottom), 0)
        if img.mode == "P":
            canvas.putpalette(img.getpalette())
        canvas.paste(img, (left, top))
        return canvas

    def _crop(self, img: Image.Image) -> Image.Image:
        crop_h, crop_w = self.size
        w, h = img.size
        if crop_w > w or crop_h > h:
            img = self._pad(img, crop_h, crop_w)
            w, h = img.size
            if crop_w == w and crop_h == h:
                return img
        top = int(round((h - crop_h) / 2.0))
        left = int(round((w - crop_w) / 2.0))
        return crop(img, top, left, crop_h, crop_w)

    def __call__(self, img: Image.Image, lbl: Image.Image) -> Pair:
        return self._crop(img), self._crop(lbl)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def image_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 PIL image -> contiguous CHW uint8 tensor of its raw values (mode "1" becomes 0/255).

    torchvision's ``pil_to_tensor``, except for mode "1", scaled to 0/255 as ``to_tensor`` does, so that
    :func:`image_to_tensor` is exactly this followed by the float conversion and the division by 255.
    """
    arr = np.array(img, dtype=np.uint8, copy=True)  # (H, W, C) or (H, W)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if img.mode == "1":
        arr = arr * 255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (C, H, W) uint8


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """HWC uint8 PIL image -> CHW float32 tensor in [0, 1] (torchvision ``to_tensor`` for 8-bit modes)."""
    return image_to_uint8_tensor(img).to(torch.float32).div(255)


def label_to_tensor(lbl: Image.Image) -> torch.Tensor:
    """PIL label -> ``(H, W)`` uint8 tensor of its raw values (no scaling)."""
    return torch.from_numpy(np.array(lbl, dtype=np.uint8))


class ToTensor:
    """Image -> float tensor (C, H, W) in [0, 1]; label -> uint8 tensor (H, W)."""

    def __call__(self, img: Image.Image, lbl: Image.Image) -> Pair:
        return image_to_tensor(img), label_to_tensor(lbl)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PILToTensor:
    """Image -> ``uint8`` tensor (C, H, W) of its raw 0-255 values; label -> ``uint8`` tensor (H, W).

    The last step of the presets. The image is converted to float and normalised later, on the device,
    by :func:`normalize_on_device`: that takes the float conversion and the normalisation (2.7 of the
    7.9 ms per image at crop 512) out of the DataLoader workers and makes the batches that are collated,
    pinned and copied to the device 4x smaller than float32 ones.
    """

    def __call__(self, img: Image.Image, lbl: Image.Image) -> Pair:
        return image_to_uint8_tensor(img), label_to_tensor(lbl)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: Alias of :class:`PILToTensor` named after what it returns.
ToUint8Tensor = PILToTensor


class Normalize:
    """Normalise the image tensor channel-wise, ``(x - mean) / std``; the label passes through."""

    def __init__(self, mean: Sequence[float] = MEAN, std: Sequence[float] = STD) -> None:
        self.mean = tuple(mean)
        self.std = tuple(std)

    def __call__(self, img: torch.Tensor, lbl: Any) -> Pair:
        mean = torch.as_tensor(self.mean, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=img.dtype, device=img.device).view(-1, 1, 1)
        return (img - mean) / std, lbl

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


# (device, mean, std) -> (255, mean, std) as float32 tensors on that device, shaped to broadcast against
# (C, H, W) and (B, C, H, W): (), (C, 1, 1), (C, 1, 1). Created once per device, so a training step does
# no host-to-device copy of constants.
_NORMALIZE_CONSTANTS: dict[
    tuple[torch.device, tuple[float, ...], tuple[float, ...]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
] = {}


def _normalize_constants(
    device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    key = (device, mean, std)
    constants = _NORMALIZE_CONSTANTS.get(key)
    if constants is None:
        constants = (
            torch.tensor(255.0, dtype=torch.float32, device=device),
            torch.as_tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1),
            torch.as_tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1),
        )
        _NORMALIZE_CONSTANTS[key] = constants
    return constants


def normalize_on_device(
    images: torch.Tensor,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.preserve_format,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> torch.Tensor:
    """Move a batch of images to ``device`` as normalised float32, converting there if it is ``uint8``.

    Args:
        images: (B, C, H, W) (or (C, H, W)) batch from a DataLoader: ``uint8`` in [0, 255] from the presets
            (:class:`PILToTensor`), or already floating, e.g. from a hand-built ``ToTensor`` + ``Normalize``
            pipeline.
        device: target device.
        memory_format: layout of the result (``torch.channels_last`` for the channels-last trainer).
        mean: per-channel mean, in [0, 1] units as for :class:`Normalize`.
        std: per-channel standard deviation.

    Returns:
        float32 tensor of the same shape on ``device``. A ``uint8`` batch crosses the host-device link as
        ``uint8`` (a quarter of the float32 bytes; ``non_blocking`` when it is pinned) and is then
        converted with exactly the operations of ``ToTensor`` + ``Normalize``, in the same order and in
        float32: ``x.float() / 255``, ``- mean``, ``/ std``. Each is correctly rounded elementwise, so the
        result is bitwise identical to the worker-side path. A floating batch is only moved and cast to
        float32, as before (it is assumed normalised already).

    The divisor 255 is a float32 tensor on the device rather than a Python number on purpose: CUDA
    replaces a division by a CPU scalar with a multiplication by its float32 reciprocal, which differs
    from ``x / 255`` in the last bit for about half of the 256 values.
    """
    if images.is_floating_point():
        return images.to(device, dtype=torch.float32, non_blocking=True, memory_format=memory_format)
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_on_device expects uint8 or floating images, got {images.dtype}.")
    images = images.to(device, non_blocking=True)  # (B, C, H, W) uint8: 1/4 of the float32 bytes
    # The cast allocates a new tensor, so the in-place operations below never touch the caller's batch.
    x = images.to(dtype=torch.float32, memory_format=memory_format)
    scale, mean_t, std_t = _normalize_constants(x.device, tuple(mean), tuple(std))
    return x.div_(scale).sub_(mean_t).div_(std_t)  # (B, C, H, W) float32


def __getattr__(name: str) -> Any:
    """``dataset.transform.train_transform`` / ``val_transform``: the presets' old home (now
    :mod:`dataset.presets`, which imports this module, hence the lazy lookup)."""
    if name in ("train_transform", "val_transform"):
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
