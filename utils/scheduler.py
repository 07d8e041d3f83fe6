"""Learning-rate schedules: polynomial decay per iteration, or step decay.

Reference: ``run.py`` ``run_step`` builds them (its ``utils/scheduler.py`` ``PolyLR``, or torch's
``StepLR``).
"""

from __future__ import annotations

from argparse import Namespace

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, StepLR

from utils.errors import OptionsError

#: ``--lr_policy`` values (:func:`build_scheduler`).
LR_POLICIES = ("poly", "step")


class PolyLR(LRScheduler):
    """Polynomial decay stepped every iteration: ``lr_k = base_lr * (1 - k / max_iters) ** power``.

    ``k`` is the number of ``step()`` calls so far, so the first iteration runs at the base lr and the
    lr reaches 0 after ``max_iters`` steps. ``state_dict()`` holds ``last_epoch`` (= k), ``base_lrs``,
    ``max_iters`` and ``power``, the keys of reference checkpoints (``run.py`` ``save_ckpt``).

    Reference behaviour (RN-48): same formula; ``k`` is clamped to ``max_iters`` here, so an extra step
    (e.g. a resumed run with a shorter loader) yields lr 0 instead of a complex number from a negative
    base raised to a fractional power.

    Args:
        optimizer: wrapped optimizer.
        max_iters: total number of iterations (``epochs * len(train_loader)``, batches per rank).
        power: decay exponent (``--lr_power``, 0.9).
        last_epoch: index of the last step when resuming; -1 for a fresh start.
    """

    def __init__(
        self, optimizer: Optimizer, max_iters: int, power: float = 0.9, last_epoch: int = -1
    ) -> None:
        if max_iters <= 0:
            raise OptionsError(
                f"The poly learning-rate schedule needs at least one iteration, got max_iters={max_iters}: "
                "the training loader is empty (too few images for the batch size with drop_last, or no image "
                "of this step's classes). Lower --batch_size or check the dataset and task."
            )
        self.max_iters = int(max_iters)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)

    def _factor(self, k: int) -> float:
        k = min(max(k, 0), self.max_iters)
        return (1.0 - k / self.max_iters) ** self.power

    def get_lr(self) -> list[float]:
        factor = self._factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


def build_scheduler(opts: Namespace, optimizer: Optimizer, max_iters: int) -> LRScheduler:
    """Scheduler selected by ``--lr_policy``.

    Args:
        opts: options with ``lr_policy`` ("poly" or "step"), ``lr_power``, ``lr_decay_step``,
            ``lr_decay_factor`` and, optionally, ``lr_decay_epochs`` and ``epochs``.
        optimizer: the optimizer to schedule.
        max_iters: ``epochs * len(train_loader)``; both schedules are stepped every iteration.

    With ``lr_decay_epochs`` set, the step policy's period is that many epochs (``lr_decay_epochs *
    max_iters / epochs`` iterations) instead of ``lr_decay_step`` iterations: 3DPC-CISS halves its learning
    rate every 50 epochs with a ``StepLR`` stepped once per epoch, which this reproduces exactly.
    """
    policy = getattr(opts, "lr_policy", "poly")
    if policy == "poly":
        return PolyLR(optimizer, max_iters=max_iters, power=getattr(opts, "lr_power", 0.9))
    if policy == "step":
        period = opts.lr_decay_step
        decay_epochs = getattr(opts, "lr_decay_epochs", None)
        if decay_epochs is not None:
            iters_per_epoch = max_iters // opts.epochs if opts.epochs else 0
            period = max(1, decay_epochs * iters_per_epoch)
        return StepLR(optimizer, step_size=period, gamma=opts.lr_decay_factor)
    raise OptionsError(f"Unknown --lr_policy {policy!r}: use one of {', '.join(LR_POLICIES)}.")
