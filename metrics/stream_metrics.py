"""Streaming semantic-segmentation metrics (reference ``metrics/stream_metrics.py`` ``StreamSegMetrics``).

The confusion matrix lives on the device the predictions come from and is filled with one fixed-size
``scatter_add_`` per batch, so evaluation never copies label maps to the CPU, never loops over images in
Python and, on a GPU, never waits for the device (``torch.bincount`` and a ``bool()`` range check would
each read a value back to the host). The summary statistics are computed once, in float64 on the CPU,
with the reference's ε arithmetic so that the results CSV and ``average_csv.py`` stay comparable with
published numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from utils.distributed import all_reduce_sum
from utils.results import ABSENT

# Reference behaviour (``StreamSegMetrics.get_results``): ε added to the per-class denominators (not to the
# Overall Acc one).
EPS = 1e-6

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.ascontiguousarray(x))


class StreamSegMetrics:
    """Confusion-matrix metrics accumulated batch by batch.

    ``Hist[gt, pred]`` counts pixels (rows = ground truth, columns = prediction) whose ground truth is a
    valid class ``0 <= gt < n_classes``; the ignore label 255 (and anything else outside the range) is
    skipped. Counts are int64, hence exact however many pixels are evaluated.

    Args:
        n_classes: number of classes of the metric (all classes seen so far, as the reference's ``run.py``
            ``run_step``).
        device: where the confusion matrix lives. ``None`` = the device of the first batch passed to
            :meth:`update` (the model's device in evaluation), CPU for numpy input.
        sample_ndim: axes of one sample's label map, 2 for images (H, W) and 1 for point clouds (N,); only
            "Total samples" depends on it (a (B, N) batch of clouds is B samples, a (H, W) map one image).
            For point clouds "pixels" are points: the matrix counts points.
    """

    def __init__(
        self, n_classes: int, device: torch.device | str | None = None, sample_ndim: int = 2
    ) -> None:
        if n_classes <= 0:
            raise ValueError(f"n_classes must be positive, got {n_classes}")
        if sample_ndim not in (1, 2):
            raise ValueError(f"sample_ndim must be 1 (point clouds) or 2 (images), got {sample_ndim}")
        self.n_classes = int(n_classes)
        self.sample_ndim = int(sample_ndim)
        self.device: torch.device | None = torch.device(device) if device is not None else None
        # (n*n + 2,) int64 counts: the flattened matrix Hist[gt, pred] at gt*n + pred, then one bin for
        # pixels whose ground truth is ignored (IGNORED) and one for out-of-range predictions (BAD_PRED).
        self._counts: torch.Tensor | None = None
        self.total_samples = 0
        self._synched = False

    @property
    def _ignored_bin(self) -> int:
        return self.n_classes * self.n_classes

    def _count_vector(self) -> torch.Tensor:
        if self._counts is None:
            device = self.device if self.device is not None else torch.device("cpu")
            self._counts = torch.zeros(self._ignored_bin + 2, dtype=torch.int64, device=device)
            self.device = device
        return self._counts

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """The raw (n, n) int64 count matrix, on the metric's device (a view of the running counts)."""
        n = self.n_classes
        return self._count_vector()[: n * n].view(n, n)

    def reset(self) -> None:
        """Forget everything accumulated (the device is kept)."""
        if self._counts is not None:
            self._counts.zero_()
        self.total_samples = 0
        self._synched = False

    def _bad_predictions_message(self, count: int) -> str:
        n = self.n_classes
        return (
            f"{count} predicted pixels lie outside [0, {n}) and cannot be counted in a {n}-class confusion "
            "matrix: the predictions have more classes than the metric (create it with the number of classes "
            "seen so far)."
        )

    def _check_predictions(self) -> None:
        # On a GPU, out-of-range predictions are counted in the BAD_PRED bin and reported here, at synch()
        # or get_results(): a per-batch check would stop the host until the device has caught up.
        if self._counts is not None and (bad := int(self._counts[-1])) > 0:
            raise ValueError(self._bad_predictions_message(bad))

    def update(self, label_trues: ArrayLike, label_preds: ArrayLike) -> None:
        """Add one batch.

        Args:
            label_trues: ground truth, (B, H, W) integer tensor or array (uint8 or long; 255 = ignore).
                A single (H, W) map counts as one image. Point clouds (``sample_ndim=1``): (B, N), or (N,)
                for one cloud.
            label_preds: predicted class indices of the same shape, in ``[0, n_classes)``.
        """
        if self._synched:
            raise RuntimeError(
                "StreamSegMetrics.update() after synch(): the matrix already holds the sum over all ranks; "
                "call reset() before accumulating a new evaluation."
            )
        gt = _as_tensor(label_trues)
        pred = _as_tensor(label_preds)
        if gt.shape != pred.shape:
            raise ValueError(f"labels {tuple(gt.shape)} and predictions {tuple(pred.shape)} differ in shape")
        if self._counts is None and self.device is None:
            self.device = gt.device
        counts = self._count_vector()
        n = self.n_classes
        gt = gt.to(counts.device, non_blocking=True).reshape(-1)
        pred = pred.to(counts.device, non_blocking=True).reshape(-1)
        # index = n*gt + pred, (B*H*W,) int64, built in place to keep to one large allocation. Pixels with
        # an ignored ground truth (255, or a class the metric does not know) go to the IGNORED bin; an
        # out-of-range prediction, which would silently land in another cell, to the BAD_PRED bin.
        index = gt.long() * n
        index += pred.long()
        index.masked_fill_((gt < 0) | (gt >= n), self._ignored_bin)
        bad_pred = (pred < 0) | (pred >= n)
        if counts.device.type == "cpu" and bool(bad_pred.any()):
            # On the CPU the check costs no synchronisation: refuse the batch before counting any of it.
            raise ValueError(self._bad_predictions_message(int(bad_pred.sum())))
        index.masked_fill_(bad_pred, self._ignored_bin + 1)
        # Fixed-size scatter of a broadcast 1 (no (B*H*W,) ones tensor); unlike bincount no host read.
        counts.scatter_add_(0, index, index.new_ones(()).expand_as(index))
        self.total_samples += _num_samples(label_trues, self.sample_ndim)

    def synch(self, device: torch.device | str | None = None) -> None:
        """Sum the confusion matrix and the sample count over all ranks, once.

        Uses an all-reduce, so every rank ends with the global result (identity with one process).
        Calling it again before :meth:`reset` does nothing, so nothing is counted twice.

        Args:
            device: device on which the reduction runs (a CUDA device with NCCL); ``None`` = the
                matrix's device. The matrix stays there afterwards.

        Reference behaviour (RN-36): the reference reduces to rank 0 only; all ranks agree here.
        """
        if self._synched:
            return
        counts = self._count_vector()
        if device is not None:
            counts = counts.to(device)
        # One collective: (n*n + 3,) int64 = the counts (matrix and the two extra bins), then the samples.
        packed = torch.cat([counts, counts.new_tensor([self.total_samples])])
        all_reduce_sum(packed)
        self._counts = packed[:-1].clone()
        self.device = self._counts.device
        self.total_samples = int(packed[-1].item())
        self._synched = True
        self._check_predictions()

    def get_results(self) -> dict[str, Any]:
        """Summary statistics of the accumulated matrix, keys in the reference order (``get_results``).

        Means run over the classes present in the ground truth only (row sum > 0); classes absent from
        it get ``"X"`` in "Class IoU" / "Class Acc" even when they were predicted.
        "Confusion Matrix" is the row-normalised matrix as a numpy array; draw it with
        :func:`confusion_matrix_to_fig`.
        """
        self._check_predictions()
        hist = self.confusion_matrix.detach().cpu().numpy().astype(np.float64)
        gt_sum = hist.sum(axis=1)
        pred_sum = hist.sum(axis=0)
        diag = np.diag(hist)
        present = gt_sum != 0
        total = hist.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            # Empty matrix (every pixel ignored): Overall Acc, Mean Acc and Mean IoU are nan as in the
            # reference (warning-free here); FreqW Acc is the reference's sum over no class, 0.0.
            overall_acc = diag.sum() / total
            acc_cls = diag / (gt_sum + EPS)
            iou = diag / (gt_sum + pred_sum - diag + EPS)
            freq = gt_sum / total
            mean_acc = acc_cls[present].mean() if present.any() else np.float64(np.nan)
            mean_iou = iou[present].mean() if present.any() else np.float64(np.nan)
            freq_pos = freq > 0
            fwavacc = (freq[freq_pos] * iou[freq_pos]).sum()  # freq is nan when empty: a sum over nothing
            normalised = hist / (gt_sum[:, None] + EPS)
        class_iou = {c: (iou[c] if present[c] else ABSENT) for c in range(self.n_classes)}
        class_acc = {c: (acc_cls[c] if present[c] else ABSENT) for c in range(self.n_classes)}
        return {
            "Total samples": self.total_samples,
            "Overall Acc": overall_acc,
            "Mean Acc": mean_acc,
            "FreqW Acc": fwavacc,
            "Mean IoU": mean_iou,
            "Class IoU": class_iou,
            "Class Acc": class_acc,
            "Confusion Matrix": normalised,
        }

    @staticmethod
    def to_str(results: dict[str, Any]) -> str:
        """The reference's text summary (``to_str``): scalar lines, then one line per class IoU and Acc."""
        skip = {"Class IoU", "Class Acc", "Confusion Matrix"}
        lines = [""]
        lines += [f"{key}: {float(value):f}" for key, value in results.items() if key not in skip]
        lines.append("Class IoU:")
        lines += [f"\tclass {c}: {value}" for c, value in results["Class IoU"].items()]
        lines.append("Class Acc:")
        lines += [f"\tclass {c}: {value}" for c, value in results["Class Acc"].items()]
        return "\n".join(lines) + "\n"

    def __repr__(self) -> str:
        extra = ", sample_ndim=1" if self.sample_ndim == 1 else ""
        return f"{type(self).__name__}(n_classes={self.n_classes}, device={self.device}{extra})"


def _num_samples(labels: ArrayLike, sample_ndim: int = 2) -> int:
    # (B, H, W) -> B images; a lone (H, W) map is one image. Point clouds: (B, N) -> B, (N,) -> 1.
    return int(labels.shape[0]) if labels.ndim > sample_ndim else 1


def confusion_matrix_to_fig(matrix: np.ndarray | torch.Tensor) -> Figure:
    """Draw a (row-normalised) confusion matrix as the reference figure
    (``StreamSegMetrics.confusion_matrix_to_fig``).

    Built on a bare :class:`matplotlib.figure.Figure` with the Agg canvas, so no pyplot state (and no
    GUI backend) is involved and the figure is freed when the caller drops it.

    Args:
        matrix: (n, n) array, rows = ground truth, columns = prediction
            (``get_results()["Confusion Matrix"]``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu().numpy()
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, interpolation="nearest", cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_title("Confusion Matrix")
    ax.set_ylabel("True label")
    ax.set_xlabel("Predicted label")
    fig.tight_layout()
    return fig
