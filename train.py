"""The Trainer: one incremental step's training and evaluation loops.

The Trainer orchestrates; it defines no loss. Every method component (CE and its variants, KD / UNKD /
LGKD, ILT, iCaRL, POD, entropy minimisation) is a :class:`utils.loss_terms.LossTerm` built once per step
by :func:`utils.loss_terms.build_loss_terms`, and the training iteration is

    old forward (no grad) -> pseudo-labels -> zero_grad -> new forward -> {name: term(batch)}
    -> one scaled backward of the sum -> regulariser update (rank 0) and penalty gradient
    -> optimizer step -> scheduler step,

the order of operations of the reference's ``Trainer.train``. ``features_distillation`` (POD, PLOP eq. 2-4)
is re-exported here because the reference exposed it from ``train.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from dataset.transform import normalize_on_device
from utils import distributed as dist_utils
from utils.errors import TrainingError
from utils.loss_terms import (
    REFERENCE_LOG_NAMES,
    StepBatch,
    StepInfo,
    build_loss_terms,
    needs_intermediate,
    needs_old_outputs,
)
from utils.pod import features_distillation
from utils.progress import progress
from utils.pseudo_label import PseudoLabeler, find_median
from utils.regularizer import get_regularizer

__all__ = ["Trainer", "features_distillation", "autocast_settings"]

# Reference behaviour (RN-25; ``Trainer.train`` ``print_int=10``): interval logging every 10 iterations,
# hard-coded in the reference;
# --print_interval (default 10) now drives it.
DEFAULT_PRINT_INTERVAL = 10


def autocast_settings(opts: Any, device: torch.device) -> tuple[bool, torch.dtype]:
    """Map ``--opt_level`` / ``--amp_dtype`` to (enabled, dtype) for ``torch.autocast``.

    apex's O1 patched functions to run convolutions in fp16; native autocast does the same. O2/O3 (fp16
    master weights) are approximated by the same autocast. CPU runs stay fp32.
    """
    wants_amp = getattr(opts, "opt_level", "O0") != "O0"
    dtype = torch.bfloat16 if getattr(opts, "amp_dtype", "fp16") == "bf16" else torch.float16
    return wants_amp and device.type == "cuda", dtype


def uses_grad_scaler(opts: Any, device: torch.device) -> bool:
    """Whether the run scales its loss (fp16 autocast on CUDA): bf16 and fp32 need no ``GradScaler``."""
    return _scales_loss(*autocast_settings(opts, device))


def _scales_loss(enabled: bool, dtype: torch.dtype) -> bool:
    """Loss scaling is for fp16 autocast only (its gradients underflow); bf16 and fp32 need none."""
    return enabled and dtype == torch.float16


class Trainer:
    """Trains and evaluates the current model of one step, distilling from the frozen previous model.

    Args:
        model: the current model, possibly wrapped in DistributedDataParallel.
        model_old: the previous step's model (frozen, eval mode, never DDP-wrapped) or None.
        device: the device of this rank.
        opts: resolved options (only read here and in the ``build_*``/``from_opts`` factories).
        trainer_state: the previous step's ``trainer_state`` (regulariser state), or None.
        classes: classes per step (``tasks.get_per_task_classes``), None in test mode.
        step: the incremental step.
        scaler: a ``torch.amp.GradScaler`` (disabled for fp32/bf16); created if None, enabled exactly when
            the autocast dtype is fp16.
        autocast: ``(enabled, dtype)`` of ``torch.autocast`` around the forward passes; None: from
            ``--opt_level`` / ``--amp_dtype`` (:func:`autocast_settings`: autocast on CUDA only). The
            benchmarks and precision tests pass it to exercise CPU autocast.
    """

    def __init__(
        self,
        model: nn.Module,
        model_old: nn.Module | None,
        device: torch.device,
        opts: Any,
        trainer_state: dict | None = None,
        classes: list[int] | None = None,
        step: int = 0,
        *,
        scaler: torch.amp.GradScaler | None = None,
        autocast: tuple[bool, torch.dtype] | None = None,
    ) -> None:
        self.model = model
        self.model_without_ddp = dist_utils.unwrap_model(model)
        self.model_old = model_old
        self.device = device
        self.step = step
        self.info = StepInfo.from_classes(step, classes, opts.num_classes, opts.dataset)
        self.opts = opts

        terms = build_loss_terms(opts, self.info, opts.output_stride, model=self.model_without_ddp)
        if model_old is None:
            # Test mode or step 0: only the classification term can be evaluated without an old model.
            terms = nn.ModuleDict({k: v for k, v in terms.items() if k == "ce"})
        self.loss_terms = terms.to(device)
        self.ret_intermediate = needs_intermediate(opts)
        self.use_old = model_old is not None and step > 0 and needs_old_outputs(opts, self.info)
        # Reference behaviour (``Trainer.validate``): at validation the old model runs only for ILT, KD and
        # iCaRL.
        self.use_old_val = (
            model_old is not None and step > 0 and needs_old_outputs(opts, self.info, validation=True)
        )
        self.pseudo_mode = opts.pseudo if (model_old is not None and step > 0) else None
        self.pseudo_labeler: PseudoLabeler | None = None
        if self.pseudo_mode is not None and self.pseudo_mode not in ("median", "entropy"):
            self.pseudo_labeler = PseudoLabeler.from_opts(opts, self.info, None, None)

        self.regularizer = None
        self.reg_importance = opts.reg_importance
        if opts.regularizer is not None and classes is not None:
            old_state = (trainer_state or {}).get("regularizer")
            self.regularizer = get_regularizer(self.model_without_ddp, model_old, device, opts, old_state)

        if autocast is None:
            autocast = autocast_settings(opts, device)
        self.amp_enabled, self.amp_dtype = autocast
        scaled = _scales_loss(self.amp_enabled, self.amp_dtype)
        self.scaler = scaler or torch.amp.GradScaler(device.type, enabled=scaled)
        self.channels_last = wants_channels_last(opts, device)
        self.print_interval = getattr(opts, "print_interval", None) or DEFAULT_PRINT_INTERVAL
        self.show_progress = not getattr(opts, "no_progress", False)

    # ------------------------------------------------------------------ helpers
    def _autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_enabled)

    def _to_device(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Loader batch -> (normalised float32 images (B, 3, H, W), int64 labels (B, H, W)) on the device.

        The presets deliver uint8 images; they cross to the device as uint8 (4x less traffic than float32)
        and are normalised there, bitwise as the reference's worker-side ToTensor + Normalize
        (:func:`dataset.transform.normalize_on_device`). Float batches from hand-built pipelines pass.
        Point clouds, float32 (B, 9, N) points and (B, N) labels, pass the same way (channels-last is a
        layout of 4-D tensors only).
        """
        channels_last = self.channels_last and images.dim() == 4
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        images = normalize_on_device(images, self.device, memory_format=memory_format)
        # Labels travel as uint8 (4x less host-device traffic) and become long on the device.
        labels = labels.to(self.device, non_blocking=True).long()
        return images, labels

    def _old_forward(
        self, images: Tensor, ret_intermediate: bool, validation: bool = False
    ) -> tuple[Tensor | None, dict | None]:
        if not (self.use_old_val if validation else self.use_old):
            return None, None
        with torch.no_grad(), self._autocast():
            return self.model_old(images, ret_intermediate=ret_intermediate)

    def _forward(
        self,
        model: nn.Module,
        images: Tensor,
        labels: Tensor,
        original_labels: Tensor,
        old: tuple[Tensor | None, dict | None],
        pseudo: Any,
        ret_intermediate: bool,
    ) -> StepBatch:
        """Current-model forward under autocast, packed with everything a loss term may read."""
        with self._autocast():
            outputs, features = model(images, ret_intermediate=ret_intermediate)
        return StepBatch(
            images=images,
            labels=labels,
            original_labels=original_labels,
            outputs=outputs,
            features=features,
            outputs_old=old[0],
            features_old=old[1],
            pseudo=pseudo,
        )

    # ------------------------------------------------------------------ public API
    def before(self, train_loader: Iterable) -> None:
        """Compute the per-class pseudo-label thresholds before training (PLOP Sec. 3.2; reference
        ``Trainer.find_median``).

        Reference behaviour (RN-05): each rank runs on its own shard without synchronisation.
        """
        if self.pseudo_mode not in ("median", "entropy"):
            return

        def old_logits(images: Tensor) -> Tensor:
            # A loader batch: uint8 (B, 3, H, W) images become normalised float32 on the device.
            images = normalize_on_device(images, self.device)
            with torch.no_grad(), self._autocast():
                return self.model_old(images)[0].float()

        mode = "probability" if self.pseudo_mode == "median" else "entropy"
        thresholds, max_value = find_median(
            train_loader,
            old_logits,
            self.device,
            self.info.current_classes,
            mode=mode,
            threshold=self.opts.threshold,
            nb_bins=self.opts.pseudo_nb_bins,
        )
        self.pseudo_labeler = PseudoLabeler.from_opts(self.opts, self.info, thresholds, max_value)

    def train(
        self,
        cur_epoch: int,
        optim: torch.optim.Optimizer,
        train_loader: Any,
        scheduler: Any = None,
        print_int: int | None = None,
        logger: Any = None,
    ) -> tuple[float, float]:
        """Train one epoch; returns (class_loss, reg_loss) averaged over iterations and ranks (as the
        reference's ``Trainer.train``)."""
        print_int = print_int or self.print_interval
        model = self.model
        self.model_without_ddp.in_eval = False
        model.train()
        if hasattr(train_loader, "sampler") and hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(cur_epoch)
        if logger is not None:
            logger.info(f"Pseudo labeling is: {self.pseudo_mode}")
            logger.info(f"Epoch {cur_epoch}, lr = {optim.param_groups[0]['lr']:.6f}")

        n_iters = len(train_loader)
        epoch_loss = torch.zeros((), device=self.device)
        reg_loss_sum = torch.zeros((), device=self.device)
        interval: list[dict[str, Tensor]] = []
        bar = progress(train_loader, desc=f"Epoch {cur_epoch + 1}", total=n_iters, enabled=self.show_progress)
        for cur_step, (images, labels) in enumerate(bar):
            losses = self._train_step(images, labels, optim)
            if scheduler is not None:
                scheduler.step()
            epoch_loss += losses["ce"].detach()
            # Reference behaviour (RN-28): the "reg" epoch sum holds reg + KD + ILT + iCaRL, not POD/EntMin.
            for name in ("reg", "kd", "de", "icarl"):
                if name in losses:
                    reg_loss_sum += losses[name].detach()
            interval.append({k: v.detach() for k, v in losses.items()})
            if (cur_step + 1) % print_int == 0 or cur_step + 1 == n_iters:
                # The only host-device synchronisation of the loop: once per print interval.
                self._check_finite(interval, cur_epoch, cur_step + 1 - len(interval))
                self._log_interval(interval, cur_epoch, cur_step, n_iters, optim, logger, bar)
                interval = []

        dist_utils.all_reduce_sum(epoch_loss)
        dist_utils.all_reduce_sum(reg_loss_sum)
        denom = dist_utils.get_world_size() * max(n_iters, 1)
        return epoch_loss.item() / denom, reg_loss_sum.item() / denom

    def _train_step(self, images: Tensor, labels: Tensor, optim: torch.optim.Optimizer) -> dict[str, Tensor]:
        images, labels = self._to_device(images, labels)
        original_labels = labels
        outputs_old, features_old = self._old_forward(images, self.ret_intermediate)

        pseudo = None
        if self.pseudo_labeler is not None and outputs_old is not None:
            pseudo = self.pseudo_labeler(labels, outputs_old.float())
            labels = pseudo.labels

        optim.zero_grad(set_to_none=True)
        batch = self._forward(
            self.model,
            images,
            labels,
            original_labels,
            (outputs_old, features_old),
            pseudo,
            self.ret_intermediate,
        )
        losses = {name: term(batch) for name, term in self.loss_terms.items()}
        total = torch.stack([v.float() for v in losses.values()]).sum()
        self.scaler.scale(total).backward()

        if self.regularizer is not None:
            losses["reg"] = self._regularizer_step(optim)
        self.scaler.step(optim)
        self.scaler.update()
        return losses

    def _regularizer_step(self, optim: torch.optim.Optimizer) -> Tensor:
        """EWC / RW / PI (RN-32): update on rank 0 with the unscaled, all-reduced gradients, then add
        the penalty's gradient.

        The reference ran a second (loss-scaled) backward for the penalty. Here the main gradients are
        unscaled once by the GradScaler, the regulariser reads them, and the penalty's gradient (computed
        with autograd.grad, so DDP does not all-reduce it again: every rank computes the same penalty on
        the same parameters) is added unscaled; the sum is the same as the reference's.
        """
        self.scaler.unscale_(optim)
        if dist_utils.is_main_process():
            self.regularizer.update()
        penalty = self.regularizer.penalty()
        if not torch.is_tensor(penalty):
            return torch.zeros((), device=self.device)
        reg_loss = self.reg_importance * penalty
        # No host sync here: a penalty with nothing to penalise comes back without a graph.
        if reg_loss.requires_grad:
            params = [p for p in self.model_without_ddp.parameters() if p.requires_grad]
            grads = torch.autograd.grad(reg_loss, params, allow_unused=True)
            for p, g in zip(params, grads):
                if g is None:
                    continue
                p.grad = g if p.grad is None else p.grad + g
        return reg_loss.detach()

    def _check_finite(self, interval: list[dict[str, Tensor]], epoch: int, first_iter: int) -> None:
        """Stop on a non-finite loss, naming the iteration and the terms (the last good checkpoint stays)."""
        totals = torch.stack([torch.stack([v.float() for v in d.values()]).sum() for d in interval])
        bad = (~torch.isfinite(totals)).nonzero()
        if bad.numel() == 0:
            return
        k = int(bad[0])
        terms = ", ".join(f"{REFERENCE_LOG_NAMES.get(n, n)}={v.item():.4g}" for n, v in interval[k].items())
        raise TrainingError(
            f"Non-finite loss at epoch {epoch + 1}, iteration {first_iter + k + 1}: {terms}. Training of "
            "this step was stopped and no checkpoint was written from the diverged model; the last good "
            "checkpoint is untouched. Lower --lr, check the data, or use --opt_level O0 to rule out fp16 "
            "overflow."
        )

    def _log_interval(
        self,
        interval: list[dict[str, Tensor]],
        epoch: int,
        cur_step: int,
        n_iters: int,
        optim: torch.optim.Optimizer,
        logger: Any,
        bar: Any,
    ) -> None:
        means = {k: torch.stack([d[k].float() for d in interval]).mean().item() for k in interval[0]}
        total = sum(means.values())
        lr = optim.param_groups[0]["lr"]
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
        if logger is None:
            return
        x = epoch * n_iters + cur_step + 1
        logger.debug(
            f"Epoch {epoch}, Batch {cur_step + 1}/{n_iters}, Loss={total:.6f}; "
            + "Loss made of: "
            + ", ".join(f"{REFERENCE_LOG_NAMES.get(k, k)} {v:.6f}" for k, v in means.items())
        )
        logger.add_scalar("Loss", total, x)
        for k, v in means.items():
            logger.add_scalar(f"Loss-{k}", v, x)

    def validate(
        self,
        loader: Any,
        metrics: Any,
        ret_samples_ids: list[int] | None = None,
    ) -> tuple[tuple[float, float], dict, list]:
        """Evaluate on ``loader`` (reference ``Trainer.validate``): losses unweighted as the reference
        (RN-28), metrics on the device.

        Returns ((class_loss, reg_loss), score, samples) where samples are (image, target, prediction)
        numpy triplets of the requested batch indices (first image of each batch).
        """
        metrics.reset()
        model = self.model
        self.model_without_ddp.in_eval = True
        model.eval()
        if getattr(self.opts, "align_weight_frequency", "never") == "epoch" and self.opts.align_weight:
            self.model_without_ddp.align_weight(self.opts.align_weight)

        class_loss = torch.zeros((), device=self.device)
        reg_loss = torch.zeros((), device=self.device)
        samples: list = []
        wants_samples = set(ret_samples_ids or [])
        ret_intermediate = "de" in self.loss_terms
        n_batches = 0
        with torch.no_grad():
            for i, (images, labels) in enumerate(
                progress(loader, desc="Evaluation", total=len(loader), enabled=self.show_progress)
            ):
                images, labels = self._to_device(images, labels)
                outputs_old, features_old = self._old_forward(images, ret_intermediate, validation=True)
                batch = self._forward(
                    self.model_without_ddp,
                    images,
                    labels,
                    labels,
                    (outputs_old, features_old),
                    None,
                    ret_intermediate,
                )
                outputs = batch.outputs
                for name, term in self.loss_terms.items():
                    value = term.validation_loss(batch)
                    if value is None:
                        continue
                    if name == "ce":
                        class_loss += value.float()
                    else:
                        reg_loss += value.float()
                if self.regularizer is not None:
                    penalty = self.regularizer.penalty()
                    if torch.is_tensor(penalty):
                        reg_loss += penalty.detach().float()
                prediction = outputs.argmax(dim=1)
                metrics.update(labels, prediction)
                n_batches += 1
                if i in wants_samples:
                    samples.append(
                        (
                            images[0].float().cpu().numpy(),
                            labels[0].cpu().numpy(),
                            prediction[0].cpu().numpy(),
                        )
                    )

        metrics.synch(self.device)
        score = metrics.get_results()
        n = torch.tensor(float(n_batches), device=self.device)
        dist_utils.all_reduce_sum(class_loss)
        dist_utils.all_reduce_sum(reg_loss)
        dist_utils.all_reduce_sum(n)
        denom = max(n.item(), 1.0)
        return (class_loss.item() / denom, reg_loss.item() / denom), score, samples

    def state_dict(self) -> dict:
        """``trainer_state`` of the checkpoint (the reference's ``run.py`` ``save_ckpt`` format): the
        regulariser's state."""
        return {"regularizer": self.regularizer.state_dict() if self.regularizer is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state.get("regularizer") is not None and self.regularizer is not None:
            self.regularizer.load_state_dict(state["regularizer"])


def wants_channels_last(opts: Any, device: torch.device) -> bool:
    """``--memory_format``: channels-last models and image batches (``auto``: on CUDA only)."""
    fmt = getattr(opts, "memory_format", "auto")
    return fmt == "channels_last" or (fmt == "auto" and device.type == "cuda")
