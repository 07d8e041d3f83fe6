"""Evaluation metrics (§9)."""

from .stream_metrics import StreamSegMetrics, confusion_matrix_to_fig

__all__ = ["StreamSegMetrics", "confusion_matrix_to_fig"]
