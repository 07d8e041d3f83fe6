"""Transform presets: the training and evaluation pipelines of images and of point-cloud blocks.

The transforms themselves live in :mod:`dataset.transform` (paired image/label transforms) and
:mod:`dataset.pointcloud_transform` (block sampling and augmentation); :mod:`dataset.build` picks a preset
for each dataset of a step. The image presets end with a ``uint8`` tensor: the reference's ToTensor +
ImageNet Normalize happen on the device (:func:`dataset.transform.normalize_on_device`, bitwise the same
values).
"""

from __future__ import annotations

from .pointcloud_transform import Augmentation, PointCloudTransform
from .transform import CenterCrop, Compose, PILToTensor, RandomHorizontalFlip, RandomResizedCrop, Resize

__all__ = ["eval_transform_3d", "train_transform", "train_transform_3d", "val_transform"]


def train_transform(crop_size: int) -> Compose:
    """Reference training preset (LGKD ``run.py`` ``get_dataset``): random resized crop, flip, to a
    ``uint8`` tensor: image ``uint8 (3, crop, crop)``, label ``uint8 (crop, crop)``."""
    return Compose([RandomResizedCrop(crop_size, scale=(0.5, 2.0)), RandomHorizontalFlip(), PILToTensor()])


def val_transform(crop_size: int, crop_val: bool = True) -> Compose:
    """Reference val/test preset (LGKD ``run.py`` ``get_dataset``), ending with a ``uint8`` image tensor.

    Args:
        crop_size: short side after resizing and side of the centre crop.
        crop_val: the ``--crop_val`` option (default True). False keeps full images (loader batch 1).

    Evaluation happens on the centre crop, not on the full image, as in the reference
    (RN-02). CenterCrop pads small images with 0 in PIL, before the tensor
    conversion, so padded pixels normalise to ``-mean / std`` exactly as with the reference's ToTensor +
    Normalize.
    """
    if crop_val:
        return Compose([Resize(crop_size), CenterCrop(crop_size), PILToTensor()])
    return Compose([PILToTensor()])


def train_transform_3d(num_points: int = 2048, xyz_norm: str = "block") -> PointCloudTransform:
    """3DPC-CISS training preset: sampling with rotation about z and jitter."""
    return PointCloudTransform(num_points, Augmentation(), xyz_norm)


def eval_transform_3d(num_points: int = 2048, xyz_norm: str = "block") -> PointCloudTransform:
    """Evaluation preset: deterministic sampling per block, no augmentation."""
    return PointCloudTransform(num_points, None, xyz_norm)
