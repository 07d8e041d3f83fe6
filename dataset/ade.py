"""ADE20k SceneParsing (ADEChallengeData2016), 150 classes plus void 0 (reference ``dataset/ade.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DatasetError
from utils.logger import get_logger

from .incremental import (
    ImageLabelPairs,
    IncrementalSegmentationDataset,
    ade_masking_lut,
    base_kwargs,
    identity_lut,
)

logger = get_logger("dataset")

ADE_CLASSES: list[str] = [
    "void",
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
]

ADE_DIR = "ADEChallengeData2016"
ADE_DOWNLOAD_HINT = (
    "--data_root must contain ADEChallengeData2016/images/{training,validation}/*.jpg and "
    "ADEChallengeData2016/annotations/{training,validation}/*.png; `bash data/download_ade.sh DATA_ROOT` "
    "downloads and unpacks it that way (or `python data/make_synthetic.py --dataset ade --out DATA_ROOT` "
    "makes a small synthetic one)."
)


def ade_error(problem: str) -> DatasetError:
    """A :class:`DatasetError` naming ``problem``, the expected layout and the download script."""
    return DatasetError(f"{problem} {ADE_DOWNLOAD_HINT}")


class AdeSegmentation(ImageLabelPairs):
    """Raw ADE20k split reader: the sorted image listing and the matching annotation names.

    Args:
        root: the data root, which must contain ``ADEChallengeData2016/``.
        train: ``training`` split (True) or ``validation``.
        transform: optional joint transform applied by ``__getitem__``.

    Raises:
        DatasetError: a folder of the layout is missing or holds no image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        train: bool = True,
        transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        ade_root = self.root / ADE_DIR
        if not ade_root.is_dir():
            raise ade_error(f"ADE20k was not found: {ade_root} does not exist.")
        split = "training" if train else "validation"
        self.image_folder = ade_root / "images" / split
        annotation_folder = ade_root / "annotations" / split
        for folder in (self.image_folder, annotation_folder):
            if not folder.is_dir():
                raise ade_error(f"The folder {folder} does not exist.")
        # Reference behaviour (``AdeSegmentation.__init__``): sorted listing; annotation = image name
        # with "jpg" -> "png".
        # Only .jpg files are listed, so stray files (.DS_Store ...) do not shift the indices (RN-55).
        names = sorted(n for n in os.listdir(self.image_folder) if n.lower().endswith(".jpg"))
        if not names:
            raise ade_error(f"The folder {self.image_folder} holds no .jpg image.")
        self.images = [(str(self.image_folder / n), str(annotation_folder / (n[:-3] + "png"))) for n in names]

    def signature(self) -> dict[str, Any]:
        """Identity of the listing for the index cache: folder, number, first and last names."""
        return {
            "image_dir": str(self.image_folder.resolve()),
            "num_files": len(self.images),
            "first": Path(self.images[0][0]).name,
            "last": Path(self.images[-1][0]).name,
        }


class AdeSegmentationIncremental(IncrementalSegmentationDataset):
    """ADE20k images relevant to one incremental step, labels masked and reordered (reference
    ``AdeSegmentationIncremental.__init__``).

    Args:
        root: data root containing ``ADEChallengeData2016/``.
        train: ``training`` (True) or ``validation`` split.
        transform: joint transform.
        labels: classes of this step (None: the whole split, labels untouched).
        labels_old: classes of the previous steps.
        idxs_path: kept-index cache file.
        masking: False (``--no_mask``) only reorders labels.
        overlap: overlapped (True) or disjoint filtering.
        data_masking: accepted and ignored, as in the reference.
        ignore_test_bg: void 0 and every unseen class become 255 (the reference passes it to the test set).
        **kwargs: ``scan_workers`` and ``progress``; other reference keywords (``test_on_val``, ``step``,
            ``disable_background``) are accepted and ignored.
    """

    num_classes = len(ADE_CLASSES)
    download_hint = ADE_DOWNLOAD_HINT

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
        ignore_test_bg: bool = False,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("test_on_val"):
            logger.warning("--test_on_val only applies to VOC; ADE20k ignores it (as the reference does).")
        self.masking, self.ignore_test_bg = masking, ignore_test_bg
        full = AdeSegmentation(root, train=train)
        super().__init__(
            full.images,
            labels=labels,
            labels_old=labels_old,
            transform=transform,
            idxs_path=idxs_path,
            overlap=overlap,
            train=train,
            data_root=root,
            split_signature=full.signature(),
            **base_kwargs(kwargs),
        )

    def build_lut(self) -> np.ndarray:
        if self.labels is None:
            return identity_lut()
        return ade_masking_lut(self.labels, self.labels_old, self.masking, self.ignore_test_bg)
