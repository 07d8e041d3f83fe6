"""Datasets of the continual segmentation benchmarks: Pascal VOC 2012, ADE20k, Cityscapes domains, and the
point clouds of S3DIS and ScanNet v2."""

from .ade import ADE_CLASSES, AdeSegmentation, AdeSegmentationIncremental
from .build import DATASETS, POINT_CLOUD_DATASETS, DatasetBundle, build_datasets
from .cityscapes_domain import (
    CITYSCAPES_CLASSES,
    CityscapesSegmentationDomain,
    CityscapesSegmentationIncrementalDomain,
)
from .incremental import IncrementalSegmentationDataset
from .pointcloud import (
    PointCloudSegmentationIncremental,
    S3DISSegmentationIncremental,
    ScanNetSegmentationIncremental,
)
from .pointcloud_raw import S3DIS_CLASSES, SCANNET_CLASSES
from .voc import VOC_CLASSES, VOCSegmentation, VOCSegmentationIncremental

__all__ = [
    "ADE_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASETS",
    "POINT_CLOUD_DATASETS",
    "S3DIS_CLASSES",
    "SCANNET_CLASSES",
    "VOC_CLASSES",
    "AdeSegmentation",
    "AdeSegmentationIncremental",
    "CityscapesSegmentationDomain",
    "CityscapesSegmentationIncrementalDomain",
    "DatasetBundle",
    "IncrementalSegmentationDataset",
    "PointCloudSegmentationIncremental",
    "S3DISSegmentationIncremental",
    "ScanNetSegmentationIncremental",
    "VOCSegmentation",
    "VOCSegmentationIncremental",
    "build_datasets",
]
