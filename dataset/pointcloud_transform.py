"""Point-cloud transforms: one prepared block -> ``(points (9, N) float32, labels (N,) int64)``.

As 3DPC-CISS ``dataloaders/loader.py`` (``sample_pointcloud``, ``augment_pointcloud``):

1. sample ``N`` points of the block, without replacement when it has at least ``N`` (with replacement
   otherwise);
2. shift xyz so that the sampled points' minimum corner is the origin;
3. training only: multiply xyz by a random matrix (scaling in [1/s, s], rotation about the vertical z axis,
   mirroring of x and/or y) and add Gaussian jitter (sigma 0.01 m, clipped to +-0.05 m) to xyz;
4. the 9 attributes: xyz, rgb / 255, and normalised xyz ``XYZ`` in [0, 1].

``XYZ`` is normalised to the block by default (3DPC-CISS: ``(xyz - min) / max`` over the sampled,
augmented points); ``xyz_norm="room"`` divides the room-relative coordinates by the room's extent instead
(the DGCNN / PointNet S3DIS convention). An axis of zero extent (a block that is only floor) gives 0 there
instead of the 0/0 of 3DPC-CISS.

Randomness: evaluation draws from a generator seeded by ``(seed, block index)``, so a block always gives the
same points whatever the step, the filtering or the worker; training draws a fresh generator seed from
torch's global generator, which run.py seeds and DataLoader seeds per worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

#: 3DPC-CISS ``augment_pointcloud`` jitter: sigma and clip, in metres.
JITTER_SIGMA = 0.01
JITTER_CLIP = 0.05
#: Number of attributes per point: xyz, rgb, normalised xyz.
NUM_ATTRIBUTES = 9
XYZ_NORMS = ("block", "room")
_EPS = 1e-6


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation of xyz; the defaults are 3DPC-CISS's training scripts (``--pc_augm`` with
    ``--pc_augm_scale 0 --pc_augm_rot 1 --pc_augm_mirror_prob 0 --pc_augm_jitter 1``).

    Attributes:
        scale: random isotropic scaling in [1/scale, scale] when > 1 (off otherwise).
        rotate: random rotation about the z axis, angle uniform in [0, 2 pi).
        mirror_prob: x and y are each mirrored with probability ``mirror_prob / 2``.
        jitter: add clip(N(0, 0.01^2), -0.05, 0.05) to every coordinate.
    """

    scale: float = 0.0
    rotate: bool = True
    mirror_prob: float = 0.0
    jitter: bool = True


def augmentation_matrix(rng: np.random.Generator, aug: Augmentation) -> np.ndarray:
    """The (3, 3) matrix ``M`` applied as ``xyz @ M.T``: mirror . rotation . scale, composed in that order."""
    m = np.eye(3)
    if aug.scale > 1:
        m = rng.uniform(1 / aug.scale, aug.scale) * m
    if aug.rotate:
        angle = rng.uniform(0, 2 * math.pi)
        c, s = math.cos(angle), math.sin(angle)
        m = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ m
    if aug.mirror_prob > 0:
        for axis in (0, 1):
            if rng.random() < aug.mirror_prob / 2:
                flip = np.eye(3)
                flip[axis, axis] = -1.0
                m = flip @ m
    return m


def sample_indices(rng: np.random.Generator, num_available: int, num_points: int) -> np.ndarray:
    """``num_points`` indices into a block of ``num_available`` points (with replacement only if too few)."""
    return rng.choice(num_available, num_points, replace=num_available < num_points)


class PointCloudTransform:
    """Sample, augment and describe the points of one block.

    Args:
        num_points: points per item (``N``; 3DPC-CISS: 2048).
        augmentation: training augmentation, or None for evaluation (deterministic per block).
        xyz_norm: ``block`` (3DPC-CISS) or ``room``: what the normalised coordinates are relative to.
        seed: evaluation seed, combined with the block index.
    """

    def __init__(
        self,
        num_points: int = 2048,
        augmentation: Augmentation | None = None,
        xyz_norm: str = "block",
        seed: int = 0,
    ) -> None:
        if num_points < 1:
            raise ValueError(f"num_points must be positive, not {num_points}")
        if xyz_norm not in XYZ_NORMS:
            raise ValueError(f"xyz_norm must be one of {XYZ_NORMS}, not {xyz_norm!r}")
        self.num_points, self.augmentation = num_points, augmentation
        self.xyz_norm, self.seed = xyz_norm, seed

    def generator(self, key: int) -> np.random.Generator:
        if self.augmentation is None:
            return np.random.default_rng([self.seed, key])
        return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))

    def __call__(
        self, block: np.ndarray, key: int, room_extent: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Transform a block.

        Args:
            block: (n, 7) ``x y z r g b label``, xyz relative to the room's minimum corner.
            key: the block's index in its split (seeds evaluation sampling).
            room_extent: (3,) room size, needed with ``xyz_norm="room"``.

        Returns:
            ``points`` (9, N) float32 (xyz, rgb in [0, 1], normalised xyz) and raw ``labels`` (N,) int64.
        """
        rng = self.generator(key)
        picked = block[sample_indices(rng, len(block), self.num_points)]  # (N, 7)
        room_xyz = picked[:, :3].astype(np.float64)
        xyz = room_xyz - room_xyz.min(axis=0)
        if self.augmentation is not None:
            xyz = xyz @ augmentation_matrix(rng, self.augmentation).T
            if self.augmentation.jitter:
                xyz = xyz + np.clip(JITTER_SIGMA * rng.standard_normal(xyz.shape), -JITTER_CLIP, JITTER_CLIP)
        if self.xyz_norm == "block":
            shifted = xyz - xyz.min(axis=0)
            normalised = shifted / np.maximum(shifted.max(axis=0), _EPS)
        else:
            if room_extent is None:
                raise ValueError("xyz_norm='room' needs the room extent")
            normalised = room_xyz / np.maximum(np.asarray(room_extent, dtype=np.float64), _EPS)
        points = np.concatenate([xyz, picked[:, 3:6] / 255.0, normalised], axis=1)  # (N, 9)
        labels = picked[:, 6].astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(points.T, dtype=np.float32)), torch.from_numpy(labels)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_points={self.num_points}, augmentation={self.augmentation}, "
            f"xyz_norm={self.xyz_norm!r})"
        )


def __getattr__(name: str) -> Any:
    """``train_transform_3d`` / ``eval_transform_3d`` from their old home (now :mod:`dataset.presets`)."""
    if name in ("train_transform_3d", "eval_transform_3d"):
        from . import presets

        return getattr(presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
