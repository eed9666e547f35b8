"""Data (a leaf layer): dataset discovery and layouts, image readers, the embedded synthetic data,
augmentation and training-time datasets. Imports nothing of bionet_fast but utils."""
from .datasets import FORMATS, TASKS, Sample, SegmentationDataset, detect_format, discover

__all__ = ["FORMATS", "TASKS", "Sample", "SegmentationDataset", "detect_format", "discover"]
