"""Evaluation metrics (reference ``metrics/stream_metrics.py``)."""

from .stream_metrics import StreamSegMetrics, confusion_matrix_to_fig

__all__ = ["StreamSegMetrics", "confusion_matrix_to_fig"]
