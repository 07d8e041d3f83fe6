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
from .incremental import IncrementalSegmentationDataset
from .pointcloud import S3DISSegmentationIncremental, ScanNetSegmentationIncremental
from .pointcloud_transform import eval_transform_3d, train_transform_3d
from .transform import train_transform, val_transform
from .voc import VOCSegmentationIncremental

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


def split_cache_dir(opts: Any, path_base: str) -> Path:
    """Folder of the kept-index caches: ``{cache_dir}/{dataset}/{task}`` or the reference ``path_base``.

    ``-ov`` is appended with ``--overlap`` (§3.2), so ``data/voc/15-5s-ov/train-3.npy`` by default.
    """
    cache_dir = getattr(opts, "cache_dir", None)
    base = os.path.join(cache_dir, opts.dataset, opts.task) if cache_dir else path_base
    if opts.overlap:
        base += "-ov"
    return Path(base)


def build_datasets(opts: Any) -> DatasetBundle:
    """Reference ``get_dataset`` (§4.3 table): the step's train, val and test sets.

    * train: the training split, current/previous labels, ``--overlap``, ``--data_masking``,
      ``--test_on_val``; cache ``train-{step}.npy``.
    * val: a random 80/20 split of train with ``--cross_val`` (it then keeps the training transform),
      otherwise the val split with overlap filtering; cache ``val-{step}.npy``.
    * test: the val split (train split with ``--val_on_trainset``), labels = every seen class and no
      previous ones, overlap filtering, ``current`` masking, ``--ignore_test_bg`` (ADE);
      cache ``test_on_val-{step}.npy`` / ``test_on_train-{step}.npy``.

    S3DIS and ScanNet go to :func:`build_point_cloud_datasets` (same roles, point-cloud items).

    Args:
        opts: parsed options (reference dests plus ``cache_dir``, ``scan_workers``, ``no_progress``).

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
    if opts.dataset in POINT_CLOUD_DATASETS:
        return build_point_cloud_datasets(opts, labels, labels_old, cache, common)
    train_tf = train_transform(opts.crop_size)
    val_tf = val_transform(opts.crop_size, opts.crop_val)

    train_dst: Dataset = dataset_cls(
        root=opts.data_root, train=True, transform=train_tf, labels=list(labels),
        labels_old=list(labels_old), idxs_path=cache / f"train-{step}.npy", masking=masking,
        overlap=opts.overlap, data_masking=opts.data_masking, test_on_val=opts.test_on_val, step=step,
        **common,
    )
    if opts.cross_val:
        # Reference behaviour (§4.7): torch's global generator draws the split, so it follows
        # --random_seed; the val part keeps the training transform.
        train_len = int(0.8 * len(train_dst))
        train_dst, val_dst = random_split(train_dst, [train_len, len(train_dst) - train_len])
    else:
        val_dst = dataset_cls(
            root=opts.data_root, train=False, transform=val_tf, labels=list(labels),
            labels_old=list(labels_old), idxs_path=cache / f"val-{step}.npy", masking=masking,
            overlap=True, data_masking=opts.data_masking, step=step, **common,
        )
    image_set = "train" if opts.val_on_trainset else "val"
    # Reference behaviour (§4.3 / Q3): the test set holds every seen class with no "old" ones, so it is
    # filtered to images with at least one seen class and future classes become background.
    test_dst = dataset_cls(
        root=opts.data_root, train=opts.val_on_trainset, transform=val_tf, labels=list(labels_cum),
        idxs_path=cache / f"test_on_{image_set}-{step}.npy", test_on_val=opts.test_on_val, step=step,
        ignore_test_bg=opts.ignore_test_bg, **common,
    )
    n_classes = len(CITYSCAPES_CLASSES) if opts.dataset == "cityscapes_domain" else len(labels_cum)
    return DatasetBundle(
        train=train_dst, val=val_dst, test=test_dst, labels=list(labels), labels_old=list(labels_old),
        labels_cum=list(labels_cum), n_classes=n_classes,
    )


def build_point_cloud_datasets(
    opts: Any, labels: list[int], labels_old: list[int], cache: Path, common: dict[str, Any]
) -> DatasetBundle:
    """The 3D counterpart of :func:`build_datasets` (S3DIS, ScanNet), same roles and cache files.

    * train: training split, blocks with a current class (overlap) or without future ones (disjoint),
      3DPC-CISS augmentation; cache ``train-{step}.npy``.
    * val: ``--cross_val`` 80/20 random split of train, otherwise the test split's blocks with a current
      class, evaluation sampling; cache ``val-{step}.npy``.
    * test: every block of the test split (of the training split with ``--val_on_trainset``), labels =
      every seen class, other classes background (or ignored with ``--ignore_test_bg``); cache
      ``test_on_val-{step}.npy`` / ``test_on_train-{step}.npy``.

    Reads ``opts.num_points`` (default 2048) and ``opts.xyz_norm`` (default ``block``) when present.
    """
    dataset_cls = DATASETS[opts.dataset]
    labels_cum = labels_old + labels
    step, masking = opts.step, not opts.no_mask
    num_points = getattr(opts, "num_points", None) or DEFAULT_NUM_POINTS
    xyz_norm = getattr(opts, "xyz_norm", None) or "block"
    eval_tf = eval_transform_3d(num_points, xyz_norm)
    train_dst: Dataset = dataset_cls(
        root=opts.data_root, train=True, transform=train_transform_3d(num_points, xyz_norm),
        labels=list(labels), labels_old=list(labels_old), idxs_path=cache / f"train-{step}.npy",
        masking=masking, overlap=opts.overlap, data_masking=opts.data_masking, test_on_val=opts.test_on_val,
        step=step, **common,
    )
    if opts.cross_val:
        train_len = int(0.8 * len(train_dst))
        train_dst, val_dst = random_split(train_dst, [train_len, len(train_dst) - train_len])
    else:
        val_dst = dataset_cls(
            root=opts.data_root, train=False, transform=eval_tf, labels=list(labels),
            labels_old=list(labels_old), idxs_path=cache / f"val-{step}.npy", masking=masking, overlap=True,
            data_masking=opts.data_masking, step=step, **common,
        )
    image_set = "train" if opts.val_on_trainset else "val"
    test_dst = dataset_cls(
        root=opts.data_root, train=opts.val_on_trainset, transform=eval_tf, labels=list(labels_cum),
        idxs_path=cache / f"test_on_{image_set}-{step}.npy", filter_blocks=False, step=step,
        ignore_test_bg=opts.ignore_test_bg, **common,
    )
    return DatasetBundle(
        train=train_dst, val=val_dst, test=test_dst, labels=list(labels), labels_old=list(labels_old),
        labels_cum=list(labels_cum), n_classes=len(labels_cum),
    )
