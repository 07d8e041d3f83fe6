"""Incremental point-cloud datasets (S3DIS, ScanNet v2) on the incremental base of the 2D datasets.

The protocol is 3DPC-CISS's (Yang et al., CVPR 2023, code leolyj/3DPC-CISS, ``dataloaders/``): rooms cut
into 1 m x 1 m blocks by ``data/prepare_3d.py`` (:mod:`dataset.pointcloud_raw`), ``N`` points sampled per
block (:mod:`dataset.pointcloud_transform`), S3DIS Area_5 or the ScanNet validation scenes as the test split.
One item is ``(points (9, N) float32, labels (N,) int64)``; a batch is ``(B, 9, N)``, ``(B, N)``.

What the base class (:class:`IncrementalSegmentationDataset`) does for points as for pixels: label
reordering by task order and masking through the 256-entry lookup table, overlap / disjoint selection of
the blocks of a step, split caches (``train-{step}.npy`` and the JSON sidecar that invalidates them).

Which blocks a step uses (3DPC-CISS ``get_class2scans`` mapped onto the selection rule of the 2D datasets):
a block *contains* class ``c`` when ``c`` has more than ``max(int(0.05 n), 100)`` of its ``n`` points
(3DPC-CISS lists such blocks per class and trains a step on the union of the lists of its classes). With
that definition of presence, the 2D rule applies unchanged: overlap keeps every block containing a class of
the step, disjoint also drops blocks containing a future class. One definition is used for both tests so
that a block is judged the same way whichever way it is looked at; in the disjoint setting a block can thus
keep a few points of a future class (under the threshold), labelled background as every class not learned
at the step. 3DPC-CISS itself has only the overlap setting.

The test set holds every block of the test split (3DPC-CISS evaluates every block of Area_5 / of the
validation scenes), with the classes seen so far and every other class as background.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from utils.errors import DatasetError
from utils.logger import get_logger

from .incremental import (
    IncrementalSegmentationDataset,
    ade_masking_lut,
    base_kwargs,
    check_data_masking,
    identity_lut,
    select_indices,
    voc_masking_lut,
)
from .pointcloud_raw import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_STRIDE,
    MANIFEST,
    MANIFEST_FORMAT,
    S3DIS_CLASSES,
    SCANNET_CLASSES,
    SPECS,
    blocks_dirname,
    found_in,
)
from .pointcloud_transform import PointCloudTransform
from .presets import eval_transform_3d

logger = get_logger("dataset")

#: 3DPC-CISS ``get_class2scans``: a block contains a class above this share of its points and this count.
MIN_RATIO = 0.05
MIN_POINTS = 100
SPLITS = ("train", "test")


def class_presence(counts: np.ndarray, num_points: np.ndarray) -> np.ndarray:
    """``(B, 256)`` bool: block ``b`` contains class ``c`` (``counts[b, c] > max(int(0.05 n_b), 100)``).

    Args:
        counts: (B, C) points per class of each block.
        num_points: (B,) points of each block.
    """
    threshold = np.maximum((num_points * MIN_RATIO).astype(np.int64), MIN_POINTS)  # (B,)
    presence = np.zeros((len(counts), 256), dtype=bool)
    presence[:, : counts.shape[1]] = counts > threshold[:, None]
    return presence


class PointCloudBlocks:
    """The prepared blocks of one split (the raw reader, as :class:`dataset.voc.VOCSegmentation` for VOC).

    Args:
        dataset: ``s3dis`` or ``scannet``.
        root: the data root (holds ``S3DIS/`` or ``ScanNet/``).
        split: ``train`` or ``test``.
        block_size, stride: which preparation to read (``blocks_bs1_s1`` by default).

    Attributes:
        names: block names, in the manifest's order (rooms sorted by name, blocks in cutting order).
        paths: their ``.npy`` files.
        counts: (B, C) int64 points per class. ``num_points``: (B,) int64. ``extents``: (B, 3) room sizes.

    Raises:
        DatasetError: not prepared (the message says whether the raw download is there and what to run),
            prepared by another version or for another dataset, or no block in the split.
    """

    def __init__(
        self,
        dataset: str,
        root: str | os.PathLike,
        split: str = "train",
        block_size: float = DEFAULT_BLOCK_SIZE,
        stride: float = DEFAULT_STRIDE,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
        self.spec, self.root, self.split = SPECS[dataset], Path(root), split
        self.blocks_dir = self.root / self.spec.top / blocks_dirname(block_size, stride)
        self.manifest_path = self.blocks_dir / MANIFEST
        manifest = self._read_manifest(block_size, stride)
        rooms = [r for r in manifest["rooms"] if r["split"] == split]
        blocks = [(room, block) for room in rooms for block in room["blocks"]]
        if not blocks:
            raise DatasetError(
                f"The {split} split of the prepared {self.spec.name} blocks in {self.blocks_dir} is empty "
                f"({len(rooms)} {split} room(s), {manifest['test_split']} are the test rooms). "
                f"{self.spec.hint}"
            )
        self.names = [block["name"] for _, block in blocks]
        self.paths = [str(self.blocks_dir / "data" / f"{name}.npy") for name in self.names]
        self.counts = np.asarray([block["counts"] for _, block in blocks], dtype=np.int64)
        self.num_points = np.asarray([block["num_points"] for _, block in blocks], dtype=np.int64)
        self.extents = np.asarray([room["extent"] for room, _ in blocks], dtype=np.float64)

    def _read_manifest(self, block_size: float, stride: float) -> dict[str, Any]:
        spec, path = self.spec, self.manifest_path
        prepare = f"`python data/prepare_3d.py --dataset {spec.name} --data_root {self.root}`"
        if not path.is_file():
            raw = self.root / spec.top
            nested = self.root / blocks_dirname(block_size, stride) / MANIFEST
            if nested.is_file() or self.root.name == spec.top:
                problem = (
                    f"--data_root {self.root} is the {spec.top} folder itself; pass the folder that "
                    f"contains {spec.top}/ ({self.root.parent})."
                )
            elif raw.is_dir():
                problem = (
                    f"The {spec.name} download in {raw} has not been cut into blocks yet "
                    f"({self.manifest_path} is missing; {found_in(raw)}): run {prepare} first."
                )
            else:
                problem = (
                    f"{spec.name} was not found under --data_root: {raw} does not exist "
                    f"({found_in(self.root)})."
                )
            raise DatasetError(f"{problem} {spec.hint}")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"Cannot read {path} ({exc}); run {prepare} again.") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            raise DatasetError(
                f"{path} was written by another version of the preparation; run {prepare} "
                "again (add --force to redo every room)."
            )
        if manifest.get("dataset") != spec.name or manifest.get("classes") != list(spec.classes):
            raise DatasetError(
                f"{path} describes {manifest.get('dataset')!r} blocks, not {spec.name}; "
                f"check --dataset and --data_root."
            )
        return manifest

    def signature(self) -> dict[str, Any]:
        """Identity of the prepared blocks for the split caches: manifest file, size, mtime and split."""
        st = self.manifest_path.stat()
        return {
            "manifest": str(self.manifest_path.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "split": self.split,
            "num_blocks": len(self.names),
        }


class PointCloudSegmentationIncremental(IncrementalSegmentationDataset):
    """The blocks of one split that matter at one step, with labels remapped to the step's classes.

    Args:
        root: data root holding the prepared ``S3DIS/`` or ``ScanNet/`` blocks.
        train: training split (True) or test split (S3DIS Area_5, ScanNet validation scenes).
        transform: :class:`PointCloudTransform` (default: evaluation sampling of 2048 points).
        labels: classes of this step (None: every block, labels untouched).
        labels_old: classes of the previous steps.
        idxs_path: kept-index cache file.
        masking: False (``--no_mask``) only reorders labels, as for ADE20k.
        overlap: overlapped (True) or disjoint block selection.
        data_masking: ``current`` (default: old and future classes -> background), ``current+old`` or
            ``new``, as for VOC.
        ignore_test_bg: background and unseen classes become 255 (ignored), as for ADE20k.
        filter_blocks: select blocks by class presence (False: every block of the split, the test set).
        block_size, stride: which preparation to read.
        **kwargs: ``scan_workers`` and ``progress`` are accepted (the selection reads the manifest, no
            scan); ``test_on_val`` is ignored with a warning, other reference keywords silently.
    """

    dataset_name: ClassVar[str] = ""

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: PointCloudTransform | None = None,
        labels: Sequence[int] | None = None,
        labels_old: Sequence[int] | None = None,
        idxs_path: str | os.PathLike | None = None,
        masking: bool = True,
        overlap: bool = True,
        data_masking: str = "current",
        ignore_test_bg: bool = False,
        filter_blocks: bool = True,
        block_size: float = DEFAULT_BLOCK_SIZE,
        stride: float = DEFAULT_STRIDE,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("test_on_val"):
            logger.warning("--test_on_val only applies to VOC; %s ignores it.", self.dataset_name)
        if labels is not None and masking and not ignore_test_bg:
            check_data_masking(data_masking)  # refuse `all`/unknown modes before reading anything
        self.masking, self.data_masking, self.ignore_test_bg = masking, data_masking, ignore_test_bg
        self.filter_blocks = filter_blocks
        split = "train" if train else "test"
        self.blocks = PointCloudBlocks(self.dataset_name, root, split, block_size, stride)
        super().__init__(
            [(path, name) for path, name in zip(self.blocks.paths, self.blocks.names)],
            labels=labels,
            labels_old=labels_old,
            transform=transform if transform is not None else eval_transform_3d(),
            idxs_path=idxs_path,
            overlap=overlap,
            train=train,
            data_root=root,
            split_signature=self.blocks.signature(),
            **base_kwargs(kwargs),
        )

    def cache_signature(self) -> dict[str, Any]:
        """The base signature plus the presence thresholds and whether blocks are selected at all."""
        return {
            **super().cache_signature(),
            "min_ratio": MIN_RATIO,
            "min_points": MIN_POINTS,
            "filter_blocks": self.filter_blocks,
        }

    def compute_indices(self) -> np.ndarray:
        """Blocks of the step from the per-class point counts of the manifest (no file is read)."""
        if not self.filter_blocks:
            return np.arange(len(self.samples), dtype=np.int64)
        presence = class_presence(self.blocks.counts, self.blocks.num_points)
        idxs = select_indices(presence, self.labels, self.labels_old, self.overlap)
        name = self.idxs_path.stem if self.idxs_path is not None else "split"
        logger.info("%s %s: kept %d of %d blocks.", type(self).__name__, name, idxs.size, len(self.samples))
        return idxs

    def build_lut(self) -> np.ndarray:
        if self.labels is None:
            return identity_lut()
        if self.ignore_test_bg or not self.masking:
            return ade_masking_lut(self.labels, self.labels_old, self.masking, self.ignore_test_bg)
        return voc_masking_lut(self.labels, self.labels_old, self.data_masking)

    def load_block(self, index: int) -> np.ndarray:
        """The (n, 7) float32 block ``index`` of the full split.

        Raises:
            DatasetError: the file is missing, unreadable or not an (n, 7) array of labels 0..C-1.
        """
        path = self.samples[index][0]
        redo = (
            f"Run `python data/prepare_3d.py --dataset {self.dataset_name} --data_root "
            f"{self.blocks.root} --force` to prepare the blocks again."
        )
        try:
            block = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DatasetError(f"Cannot read the block {path} ({exc}). {redo}") from exc
        if block.ndim != 2 or block.shape[1] != 7 or not len(block):
            raise DatasetError(f"The block {path} has shape {block.shape}, not (n, 7). {redo}")
        labels = block[:, 6]
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DatasetError(
                f"The block {path} has labels outside 0..{self.num_classes - 1} (min {labels.min():g}, "
                f"max {labels.max():g}). {redo}"
            )
        return block

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(points (9, N) float32, labels (N,) int64)`` of the ``index``-th kept block."""
        full = self.indices[index]
        points, labels = self.transform(self.load_block(full), full, self.blocks.extents[full])
        return points, self._lut[labels].long()


class S3DISSegmentationIncremental(PointCloudSegmentationIncremental):
    """S3DIS (Stanford3dDataset v1.2, aligned): 13 classes, ids 1..13; test split Area_5."""

    dataset_name = "s3dis"
    num_classes = len(S3DIS_CLASSES)
    download_hint = SPECS["s3dis"].hint


class ScanNetSegmentationIncremental(PointCloudSegmentationIncremental):
    """ScanNet v2: 20 classes, ids 1..20, 0 = unannotated; test split = the official validation scenes."""

    dataset_name = "scannet"
    num_classes = len(SCANNET_CLASSES)
    download_hint = SPECS["scannet"].hint
