"""Build the train/val/test datasets of one step from the options (reference run.py `get_dataset`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset, random_split

from utils.errors import OptionsError

from .ade import AdeSegmentationIncremental
from .cityscapes_domain import CITYSCAPES_CLASSES, CityscapesSegmentationIncrementalDomain
from .incremental import IncrementalSegmentationDataset, check_data_masking
from .pointcloud import S3DISSegmentationIncremental, ScanNetSegmentationIncremental
from .pointcloud_transform import PointCloudTransform
from .presets import eval_transform_3d, train_transform, train_transform_3d, val_transform
from .transform import Compose
from .voc import VOCSegmentationIncremental, check_voc_masking

DATASETS: dict[str, type[IncrementalSegmentationDataset]] = {
    "voc": VOCSegmentationIncremental,
    "ade": AdeSegmentationIncremental,
    "cityscapes_domain": CityscapesSegmentationIncrementalDomain,
    "s3dis": S3DISSegmentationIncremental,
    "scannet": ScanNetSegmentationIncremental,
}
#: Datasets of point clouds: items (points (9, N) float32, labels (N,) int64) instead of images.
POINT_CLOUD_DATASETS = ("s3dis", "scannet")
#: Points sampled per block when the options do not say (3DPC-CISS ``--pc_npts``).
DEFAULT_NUM_POINTS = 2048


@dataclass
class DatasetBundle:
    """The datasets of one step and the label lists they were built from.

    Attributes:
        train: training set (a ``Subset`` with ``--cross_val``).
        val: validation set (unused for model selection by the reference).
        test: test set over every seen class, used for validation and model selection.
        labels: classes (domains for cityscapes_domain) introduced at this step.
        labels_old: classes of the previous steps.
        labels_cum: ``labels_old + labels``.
        n_classes: size of the confusion matrix: ``len(labels_cum)`` (19 for cityscapes_domain).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    labels: list[int]
    labels_old: list[int]
    labels_cum: list[int]
    n_classes: int


def check_dataset_options(opts: Any) -> None:
    """Refuse the dataset options the datasets cannot build, before any work (``argparser.validate_options``;
    the datasets apply the same checks before their scan).

    Raises:
        OptionsError: ``--data_masking all`` or an unknown mode (any dataset, as the reference parser),
            ``--no_mask`` with VOC.
    """
    check_data_masking(opts.data_masking)
    if opts.dataset == "voc":
        check_voc_masking(not opts.no_mask)


def split_cache_dir(opts: Any, path_base: str) -> Path:
    """Folder of the kept-index caches: ``{cache_dir}/{dataset}/{task}`` or the reference ``path_base``.

    ``-ov`` is appended with ``--overlap`` (reference ``run.py`` ``get_dataset``), so
    ``data/voc/15-5s-ov/train-3.npy`` by default.
    """
    cache_dir = getattr(opts, "cache_dir", None)
    base = os.path.join(cache_dir, opts.dataset, opts.task) if cache_dir else path_base
    if opts.overlap:
        base += "-ov"
    return Path(base)


def step_transforms(opts: Any) -> tuple[Compose | PointCloudTransform, Compose | PointCloudTransform]:
    """The (training, evaluation) presets of a run: the image presets at ``--crop_size`` (``--crop_val``),
    or for point clouds the block presets at ``opts.num_points`` (default 2048) points and
    ``opts.xyz_norm`` (default ``block``) when the options have them."""
    if opts.dataset in POINT_CLOUD_DATASETS:
        num_points = getattr(opts, "num_points", None) or DEFAULT_NUM_POINTS
        xyz_norm = getattr(opts, "xyz_norm", None) or "block"
        return train_transform_3d(num_points, xyz_norm), eval_transform_3d(num_points, xyz_norm)
    return train_transform(opts.crop_size), val_transform(opts.crop_size, opts.crop_val)


def build_datasets(opts: Any) -> DatasetBundle:
    """Reference ``run.py`` ``get_dataset``: the step's train, val and test sets, of images or of
    point-cloud blocks (S3DIS, ScanNet: same roles and cache files, 3DPC-CISS transforms).

    * train: the training split, current/previous labels, ``--overlap``, ``--data_masking``,
      ``--test_on_val``; cache ``train-{step}.npy``.
    * val: a random 80/20 split of train with ``--cross_val`` (it then keeps the training transform),
      otherwise the val split (the test split's blocks) with overlap filtering; cache ``val-{step}.npy``.
    * test: the val split (train split with ``--val_on_trainset``), labels = every seen class and no
      previous ones, overlap filtering, ``current`` masking, ``--ignore_test_bg`` (ADE, point clouds);
      every block of the split for point clouds; cache ``test_on_val-{step}.npy`` /
      ``test_on_train-{step}.npy``.

    The transforms are the presets :func:`step_transforms` picks.

    Args:
        opts: parsed options (reference dests plus ``cache_dir``, ``scan_workers``, ``no_progress``; for
            point clouds ``num_points`` and ``xyz_norm`` when present).

    Raises:
        OptionsError: unknown dataset. TaskError (from tasks.py): unknown task or step.
        DatasetError: missing or malformed data.
    """
    import tasks

    if opts.dataset not in DATASETS:
        raise OptionsError(f"Unknown --dataset {opts.dataset!r}; choose one of {', '.join(DATASETS)}.")
    dataset_cls = DATASETS[opts.dataset]
    labels, labels_old, path_base = tasks.get_task_labels(opts.dataset, opts.task, opts.step)
    labels_cum = labels_old + labels
    cache = split_cache_dir(opts, path_base)
    cache.mkdir(parents=True, exist_ok=True)

    scan_workers = getattr(opts, "scan_workers", None)
    common: dict[str, Any] = {
        "scan_workers": opts.num_workers if scan_workers is None else scan_workers,
        "progress": not getattr(opts, "no_progress", False),
    }
    step, masking = opts.step, not opts.no_mask
    train_tf, eval_tf = step_transforms(opts)
    # What only the test set gets: VOC's --test_on_val hold-out, or for point clouds every block.
    point_clouds = opts.dataset in POINT_CLOUD_DATASETS
    test_only = {"filter_blocks": False} if point_clouds else {"test_on_val": opts.test_on_val}

    train_dst: Dataset = dataset_cls(
        root=opts.data_root,
        train=True,
        transform=train_tf,
        labels=list(labels),
        labels_old=list(labels_old),
        idxs_path=cache / f"train-{step}.npy",
        masking=masking,
        overlap=opts.overlap,
        data_masking=opts.data_masking,
        test_on_val=opts.test_on_val,
        step=step,
        **common,
    )
    if opts.cross_val:
        # Reference behaviour (``get_dataset``, ``random_split``): torch's global generator draws the
        # split, so it follows --random_seed; the val part keeps the training transform.
        train_len = int(0.8 * len(train_dst))
        train_dst, val_dst = random_split(train_dst, [train_len, len(train_dst) - train_len])
    else:
        val_dst = dataset_cls(
            root=opts.data_root,
            train=False,
            transform=eval_tf,
            labels=list(labels),
            labels_old=list(labels_old),
            idxs_path=cache / f"val-{step}.npy",
            masking=masking,
            overlap=True,
            data_masking=opts.data_masking,
            step=step,
            **common,
        )
    image_set = "train" if opts.val_on_trainset else "val"
    # Reference behaviour (RN-03): the test set holds every seen class with no "old" ones, so it is
    # filtered to images with at least one seen class and future classes become background.
    test_dst = dataset_cls(
        root=opts.data_root,
        train=opts.val_on_trainset,
        transform=eval_tf,
        labels=list(labels_cum),
        idxs_path=cache / f"test_on_{image_set}-{step}.npy",
        step=step,
        ignore_test_bg=opts.ignore_test_bg,
        **test_only,
        **common,
    )
    n_classes = len(CITYSCAPES_CLASSES) if opts.dataset == "cityscapes_domain" else len(labels_cum)
    return DatasetBundle(
        train=train_dst,
        val=val_dst,
        test=test_dst,
        labels=list(labels),
        labels_old=list(labels_old),
        labels_cum=list(labels_cum),
        n_classes=n_classes,
    )
