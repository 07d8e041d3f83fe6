"""Datasets of the continual segmentation benchmarks: Pascal VOC 2012, ADE20k, Cityscapes domains."""

from .ade import ADE_CLASSES, AdeSegmentation, AdeSegmentationIncremental
from .cityscapes_domain import (
    CITYSCAPES_CLASSES,
    CityscapesSegmentationDomain,
    CityscapesSegmentationIncrementalDomain,
)
from .incremental import IncrementalSegmentationDataset
from .presets import DATASETS, DatasetBundle, build_datasets
from .voc import VOC_CLASSES, VOCSegmentation, VOCSegmentationIncremental

__all__ = [
    "ADE_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASETS",
    "VOC_CLASSES",
    "AdeSegmentation",
    "AdeSegmentationIncremental",
    "CityscapesSegmentationDomain",
    "CityscapesSegmentationIncrementalDomain",
    "DatasetBundle",
    "IncrementalSegmentationDataset",
    "VOCSegmentation",
    "VOCSegmentationIncremental",
    "build_datasets",
]
