"""Cityscapes with cities as incremental domains (reference ``dataset/cityscapes_domain.py``).

Here the task "labels" are domain ids (one per city), not classes: every step trains all 19 classes,
on the images of the step's cities.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DatasetError

from .incremental import IGNORE, ImageLabelPairs, IncrementalSegmentationDataset, base_kwargs

#: City -> domain id: the 18 train cities, then the 3 val cities.
CITY_TO_DOMAIN: dict[str, int] = {
    "aachen": 0,
    "bremen": 1,
    "darmstadt": 2,
    "erfurt": 3,
    "hanover": 4,
    "krefeld": 5,
    "strasbourg": 6,
    "tubingen": 7,
    "weimar": 8,
    "bochum": 9,
    "cologne": 10,
    "dusseldorf": 11,
    "hamburg": 12,
    "jena": 13,
    "monchengladbach": 14,
    "stuttgart": 15,
    "ulm": 16,
    "zurich": 17,
    "frankfurt": 18,
    "lindau": 19,
    "munster": 20,
}

#: Standard Cityscapes labelIds -> trainIds; every other id is ignored (255).
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,
    8: 1,
    11: 2,
    12: 3,
    13: 4,
    17: 5,
    19: 6,
    20: 7,
    21: 8,
    22: 9,
    23: 10,
    24: 11,
    25: 12,
    26: 13,
    27: 14,
    28: 15,
    31: 16,
    32: 17,
    33: 18,
}

CITYSCAPES_CLASSES: list[str] = [
    "road",
    "sidewalk",
    "building",
    "wall",
    "fence",
    "pole",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "train",
    "motorcycle",
    "bicycle",
]

CITYSCAPES_HINT = (
    "--data_root must be the Cityscapes root holding leftImg8bit/{train,val}/<city>/*_leftImg8bit.png "
    "and gtFine/{train,val}/<city>/*_gtFine_labelIds.png. Cityscapes needs a registration: download "
    "leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com "
    "and unzip both into that folder."
)


def cityscapes_lut() -> np.ndarray:
    """256-entry ``uint8`` table mapping labelIds to trainIds (unknown ids -> 255)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


class CityscapesSegmentationDomain(ImageLabelPairs):
    """Raw reader: sorted train images then sorted val images, each with its city's domain id.

    Args:
        root: the Cityscapes root.
        transform: optional joint transform applied by ``__getitem__`` (labels stay labelIds).

    Raises:
        DatasetError: a split folder is missing or empty, or a city is not one of the 21 known ones.
    """

    def __init__(
        self, root: str | os.PathLike, transform: Callable[[Any, Any], tuple[Any, Any]] | None = None
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        self.images: list[tuple[str, str]] = []
        self.domains: list[int] = []
        for split in ("train", "val"):
            folder = self.root / "leftImg8bit" / split
            if not folder.is_dir():
                raise DatasetError(f"The Cityscapes folder {folder} does not exist. {CITYSCAPES_HINT}")
            paths = sorted(glob.glob(os.path.join(str(folder), "*", "*_leftImg8bit.png")))
            if not paths:
                raise DatasetError(f"The Cityscapes folder {folder} holds no image. {CITYSCAPES_HINT}")
            for path in paths:
                city = os.path.basename(os.path.dirname(path))
                if city not in CITY_TO_DOMAIN:
                    raise DatasetError(
                        f"Unknown Cityscapes city folder {os.path.dirname(path)}: the domains are the 21 "
                        f"cities of the train and val splits ({', '.join(CITY_TO_DOMAIN)}). {CITYSCAPES_HINT}"
                    )
                # "<name>_leftImg8bit.png" -> "<name>_gtFine_labelIds.png" (drop the last 15 characters).
                name = os.path.basename(path)[: -len("leftImg8bit.png")] + "gtFine_labelIds.png"
                self.images.append((path, str(self.root / "gtFine" / split / city / name)))
                self.domains.append(CITY_TO_DOMAIN[city])

    def signature(self) -> dict[str, Any]:
        """Identity of the listing for the index cache."""
        return {
            "root": str(self.root.resolve()),
            "num_files": len(self.images),
            "first": os.path.relpath(self.images[0][0], self.root),
            "last": os.path.relpath(self.images[-1][0], self.root),
        }


class CityscapesSegmentationIncrementalDomain(IncrementalSegmentationDataset):
    """Cityscapes images of the step's domains (cities), labels as the 19 trainIds (reference
    ``CityscapesSegmentationIncrementalDomain``).

    Args:
        root: the Cityscapes root.
        train: keep the first 80 % of the shuffled domain images (True) or the remaining 20 %.
        transform: joint transform.
        labels: domain ids of this step (train) or of all seen steps (test); None = every image.
        idxs_path: kept-index cache file.
        masking: accepted and ignored (no class masking: every step sees all 19 classes).
        overlap: accepted and ignored (domains never overlap).
        **kwargs: ``scan_workers`` / ``progress`` (unused: no mask is read to filter) and other reference
            keywords (``labels_old``, ``step`` ...), accepted and ignored.
    """

    num_classes = len(CITYSCAPES_CLASSES)
    download_hint = CITYSCAPES_HINT
    strip_zero = False  # domain 0 (aachen) is a real domain, not a background class

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        labels: Sequence[int] | None = None,
        idxs_path: str | os.PathLike | None = None,
        masking: bool = True,
        overlap: bool = True,
        **kwargs: Any,
    ) -> None:
        self.masking = masking
        full = CityscapesSegmentationDomain(root)
        self.domains = np.asarray(full.domains, dtype=np.int64)
        # Reference behaviour (RN-09): train and test each shuffle their own filtered list with
        # RandomState(1) and split it 80/20, so a test image may have been trained on.
        super().__init__(
            full.images,
            labels=labels,
            labels_old=None,
            transform=transform,
            idxs_path=idxs_path,
            overlap=overlap,
            train=train,
            holdout=labels is not None,
            data_root=root,
            split_signature=full.signature(),
            **base_kwargs(kwargs),
        )

    def compute_indices(self) -> np.ndarray:
        """Keep the images whose city is one of the step's domains (no mask is read)."""
        return np.flatnonzero(np.isin(self.domains, self.labels)).astype(np.int64)

    def build_lut(self) -> np.ndarray:
        return cityscapes_lut()
