"""Pascal VOC 2012 with the SBD-augmented masks (reference ``dataset/voc.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DatasetError, OptionsError

from .incremental import (
    ImageLabelPairs,
    IncrementalSegmentationDataset,
    base_kwargs,
    check_data_masking,
    identity_lut,
    voc_masking_lut,
)

VOC_CLASSES: list[str] = [
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
]


def check_voc_masking(masking: bool) -> None:
    """Refuse VOC without masking (``--no_mask``); ``argparser.validate_options`` applies it before any work.

    Raises:
        OptionsError: ``masking`` is False (RN-21: the reference hits ``assert False``).
    """
    if not masking:
        raise OptionsError(
            "--no_mask is not supported for VOC (the reference stops on `assert False`). "
            "Drop --no_mask, or use --data_masking current+old to keep the old classes' labels."
        )


VOC_DIR = "PascalVOC2012"
VOC_DOWNLOAD_HINT = (
    "--data_root must contain PascalVOC2012/VOCdevkit/VOC2012/JPEGImages/*.jpg, "
    "PascalVOC2012/SegmentationClassAug/*.png and PascalVOC2012/list/{train_aug,val}.txt; "
    "`bash data/download_voc.sh DATA_ROOT` downloads and lays out the dataset that way "
    "(or `python data/make_synthetic.py --dataset voc --out DATA_ROOT` makes a small synthetic one)."
)


def voc_error(problem: str) -> DatasetError:
    """A :class:`DatasetError` naming ``problem``, the expected layout and the download script."""
    return DatasetError(f"{problem} {VOC_DOWNLOAD_HINT}")


def parse_split_file(split_file: Path, voc_root: Path) -> list[tuple[str, str]]:
    """``(image_path, mask_path)`` pairs of a VOC split list.

    Each line is ``/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png``; the image lives under
    ``PascalVOC2012/VOCdevkit/VOC2012/`` and the mask under ``PascalVOC2012/``.

    Reference behaviour (RN-26) fixed harmlessly: the reference drops the last character of every line,
    which eats a real character when the file does not end with a newline; here only a newline is
    dropped. Blank lines are skipped; a line without two paths raises :class:`DatasetError`.
    """
    pairs = []
    with open(split_file) as f:
        for lineno, line in enumerate(f, 1):
            if line.endswith("\n"):
                line = line[:-1]
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) < 2 or not parts[0] or not parts[1]:
                raise voc_error(
                    f"Line {lineno} of the split list {split_file} is {line!r}, not "
                    "'/JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png'."
                )
            image, mask = (p[1:] if p.startswith("/") else p for p in parts[:2])
            pairs.append((str(voc_root / "VOCdevkit" / "VOC2012" / image), str(voc_root / mask)))
    if not pairs:
        raise voc_error(f"The split list {split_file} is empty.")
    return pairs


class VOCSegmentation(ImageLabelPairs):
    """Raw VOC split reader: lists the split's (image, mask) pairs.

    Args:
        root: the data root, which must contain ``PascalVOC2012/``.
        image_set: split name; ``train`` with ``is_aug`` reads ``list/train_aug.txt``, otherwise
            ``list/{image_set}.txt``.
        is_aug: use the SBD-augmented training list.
        transform: optional joint transform applied by ``__getitem__``.

    Raises:
        DatasetError: ``PascalVOC2012/``, ``SegmentationClassAug/`` (training) or the list file is missing.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        image_set: str = "train",
        is_aug: bool = True,
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        voc_root = self.root / VOC_DIR
        if not voc_root.is_dir():
            raise voc_error(f"Pascal VOC 2012 was not found: {voc_root} does not exist.")
        if is_aug and image_set == "train":
            mask_dir = voc_root / "SegmentationClassAug"
            if not mask_dir.is_dir():
                raise voc_error(f"The augmented masks folder {mask_dir} does not exist.")
            split_file = voc_root / "list" / "train_aug.txt"
        else:
            split_file = voc_root / "list" / (image_set.rstrip("\n") + ".txt")
        if not split_file.is_file():
            raise voc_error(f"The split list {split_file} does not exist.")
        self.split_file = split_file
        self.images = parse_split_file(split_file, voc_root)

    def signature(self) -> dict[str, Any]:
        """Identity of the split list for the index cache: path, size, mtime and number of entries."""
        st = self.split_file.stat()
        return {
            "list_file": str(self.split_file.resolve()),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
            "num_entries": len(self.images),
        }


class VOCSegmentationIncremental(IncrementalSegmentationDataset):
    """VOC images relevant to one incremental step, labels masked and reordered (reference
    ``VOCSegmentationIncremental.__init__``).

    Args:
        root: data root containing ``PascalVOC2012/``.
        train: ``train_aug`` split (True) or ``val``.
        transform: joint transform (see :mod:`dataset.transform`).
        labels: classes of this step (None: the whole split, labels untouched).
        labels_old: classes of the previous steps.
        idxs_path: kept-index cache file.
        masking: must be True; the reference's ``--no_mask`` path for VOC is ``assert False``.
        overlap: overlapped (True) or disjoint filtering.
        data_masking: ``current``, ``current+old`` or ``new`` (``all`` is refused).
        test_on_val: keep 80 % (train) / 20 % (else) of the kept indices after a RandomState(1) shuffle.
        **kwargs: ``scan_workers`` and ``progress`` for the filtering scan; other reference keyword
            arguments (``step``, ``disable_background``, ``ignore_test_bg``) are accepted and ignored.
    """

    num_classes = len(VOC_CLASSES)
    download_hint = VOC_DOWNLOAD_HINT

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        labels: Sequence[int] | None = None,
        labels_old: Sequence[int] | None = None,
        idxs_path: str | os.PathLike | None = None,
        masking: bool = True,
        overlap: bool = True,
        data_masking: str = "current",
        test_on_val: bool = False,
        **kwargs: Any,
    ) -> None:
        if labels is not None:
            check_voc_masking(masking)
            check_data_masking(data_masking)  # refuse `all`/unknown modes before the scan
        self.masking, self.data_masking = masking, data_masking
        full = VOCSegmentation(root, "train" if train else "val", is_aug=True)
        super().__init__(
            full.images,
            labels=labels,
            labels_old=labels_old,
            transform=transform,
            idxs_path=idxs_path,
            overlap=overlap,
            train=train,
            holdout=test_on_val,
            data_root=root,
            split_signature=full.signature(),
            **base_kwargs(kwargs),
        )

    def build_lut(self) -> np.ndarray:
        if self.labels is None:
            return identity_lut()
        return voc_masking_lut(self.labels, self.labels_old, self.data_masking)
