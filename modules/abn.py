"""Activated batch normalisation (batch norm followed by an activation) in pure PyTorch.

The reference builds every normalisation layer from the compiled ``inplace_abn`` package (v1.1.0). The classes
below reproduce its numerics and its state-dict layout without the CUDA extension, so the reference's ImageNet
weights and checkpoints load unchanged and give the same activations:

* :class:`ABN`: ``act(batch_norm(x) * weight + bias)``.
* :class:`InPlaceABN`: the same with the scale ``|weight| + eps`` instead of ``weight`` (RN-06).
* :class:`InPlaceABNSync`: :class:`InPlaceABN` whose training statistics are computed over the global batch of
  all processes of a ``torch.distributed`` group.
* :class:`BatchNormAct2d`: ``nn.BatchNorm2d`` plus the same activation attributes, for ``--norm_act std``.

"In place" described how the compiled kernels saved memory: they keep only the layer's output for backward and
recover the normalised input from it by inverting the activation and the affine map, which is why the scale
must be ``|weight| + eps`` (Rota Bulò et al., "In-Place Activated BatchNorm for Memory-Optimized Training of
DNNs", CVPR 2018, Sec. 3). By default the layers here let autograd keep the layer input and its output (the
fastest path). ``recompute=True`` (``--recompute_abn``) switches :class:`InPlaceABN` and
:class:`InPlaceABNSync` with an invertible activation (leaky ReLU, ELU, identity) to the same output-only
scheme (:class:`_InvertibleABNFunction`), which frees one activation-sized tensor per layer. The other layers
(plain ABN, whose raw weight may be 0, ReLU, BatchNormAct2d) cannot be inverted; they recompute the
normalisation under activation checkpointing instead, which keeps their input and saves little.

Per channel, in training: ``mu``, ``var`` = mean and biased variance over (N, H, W); the running variance is
updated with the unbiased variance ``var * n / (n - 1)``; ``num_batches_tracked`` grows by one per training
forward. In eval the running statistics are used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from utils.errors import OptionsError

__all__ = [
    "ABN",
    "ACTIVATIONS",
    "BatchNormAct2d",
    "InPlaceABN",
    "InPlaceABNSync",
    "abs_plus_eps",
    "all_reduce_sum_differentiable",
    "apply_activation",
    "check_activation",
    "import_inplace_abn",
    "is_norm_layer",
]

ACTIVATIONS = ("leaky_relu", "elu", "relu", "identity")


def check_activation(activation: str) -> str:
    """Return ``activation`` if it is supported, else raise ``ValueError``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")
    return activation


def apply_activation(x: torch.Tensor, activation: str, param: float, inplace: bool = False) -> torch.Tensor:
    """Apply one of :data:`ACTIVATIONS`; ``param`` is the leaky slope or the ELU alpha."""
    if activation == "leaky_relu":
        return F.leaky_relu(x, negative_slope=param, inplace=inplace)
    if activation == "elu":
        return F.elu(x, alpha=param, inplace=inplace)
    if activation == "relu":
        return F.relu(x, inplace=inplace)
    if activation == "identity":
        return x
    raise ValueError(f"Unknown activation {activation!r}; expected one of {ACTIVATIONS}.")


def abs_plus_eps(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``|weight| + eps`` whose gradient is ``sign(weight)`` with +1 at 0, as in inplace_abn.

    ``torch.abs`` has gradient 0 at 0, which would freeze a weight that is exactly 0; ``where(w >= 0, w, -w)``
    takes the ``w`` branch at 0 and so has gradient +1 there. Without a gradient to track (the frozen old
    model, validation) the same values come from ``abs`` in two kernels instead of four.
    """
    if not (weight.requires_grad and torch.is_grad_enabled()):
        return weight.abs() + eps
    return torch.where(weight >= 0, weight, -weight) + eps


def _check_batch_size(x: torch.Tensor) -> None:
    # (N, C, *) -> N * prod(*) values per channel; one value has no variance.
    if x.dim() < 2 or x.numel() // max(x.shape[1], 1) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}: use a "
            "batch size of at least 2 (per process) or put the layer in eval mode."
        )


def _fill_missing_num_batches_tracked(state_dict: dict[str, Any], prefix: str) -> None:
    # The inplace_abn ImageNet files predate num_batches_tracked (loaded by the reference's
    # ``segmentation_module.py`` ``make_model``): a missing counter loads as 0.
    key = prefix + "num_batches_tracked"
    if key not in state_dict:
        state_dict[key] = torch.tensor(0, dtype=torch.long)


def _run_maybe_recomputed(
    fn: Callable[[torch.Tensor, bool], torch.Tensor], x: torch.Tensor, recompute: bool
) -> torch.Tensor:
    """Run ``fn(x, update_running_stats)``, under activation checkpointing when ``recompute`` is set.

    The checkpointed forward runs twice (forward and again in backward); only the first call may update the
    running statistics, so the second one is told not to.
    """
    if not (recompute and torch.is_grad_enabled()):
        return fn(x, True)
    first_call = [True]

    def run(inp: torch.Tensor) -> torch.Tensor:
        update = first_call[0]
        first_call[0] = False
        return fn(inp, update)

    return checkpoint(run, x, use_reentrant=False)


def _global_statistics(
    xf: torch.Tensor, group: Any, all_reduce: Callable[[torch.Tensor, Any], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and biased variance (C,) of a float32 (N, C, *) input over the batches of all ranks of ``group``.

    Each rank sums count, sum and sum of squares into one (2C + 1,) tensor for a single all-reduce, so ranks
    with different batch sizes combine exactly by count. Statistics are float32 even under autocast:
    sum-of-squares variance cancels badly in half precision. Returns ``(mean, var, count)``, count a (1,)
    tensor (kept on the device: no synchronisation).
    """
    channels = xf.shape[1]
    dims = [d for d in range(xf.dim()) if d != 1]
    count = xf.new_full((1,), float(xf.numel() // channels))
    stats = all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]), group)
    n = stats[-1:]
    mean = stats[:channels] / n
    var = (stats[channels : 2 * channels] / n - mean * mean).clamp_min(0.0)
    return mean, var, n


def _all_reduce_sum(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def _batch_statistics(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean and biased variance (C,) float32 of ``x`` (N, C, *), and the value count, without autograd.

    Local statistics use ``torch.var_mean`` (one pass, numerically stable); with a group, see
    :func:`_global_statistics`.
    """
    xf = x.detach().to(_compute_dtype(x))
    if group is None:
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(xf, dims, correction=0)
        return mean, var, xf.new_full((1,), float(x.numel() // x.shape[1]))
    return _global_statistics(xf, group, _all_reduce_sum)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 tensors, float64 for float64 ones."""
    return torch.promote_types(x.dtype, torch.float32)


def _invertible_activation(activation: str, param: float) -> bool:
    # ReLU (or a leaky ReLU / ELU with parameter 0) maps every negative value to 0: its input cannot be
    # recovered from its output.
    return activation == "identity" or (activation in ("leaky_relu", "elu") and param > 0)


class _InvertibleABNFunction(torch.autograd.Function):
    """``act(batch_norm(x) * gamma + beta)`` with ``gamma > 0`` that saves only its output for backward.

    The memory scheme of In-Place ABN (Rota Bulò et al., CVPR 2018, Sec. 3, Eqs. 5-8). Forward keeps ``y``
    (the activated output, which the next convolution keeps anyway) and per-channel vectors; the input ``x``
    is not referenced, so it is freed as soon as its producer is done. Backward inverts the activation and the
    affine map:

        z = act^-1(y),  dz = dy * act'(z),  x_hat = (z - beta) / gamma,
        dx = gamma / sigma * (dz - mean(dz) - x_hat * mean(dz * x_hat))   (training; means over N, H, W)
        dx = gamma / sigma * dz                                          (running statistics)
        dgamma = sum(dz * x_hat),  dbeta = sum(dz)

    With a process group the two means are taken over the global batch (one all-reduce of 2C values), while
    ``dgamma``/``dbeta`` stay per-rank contributions that DDP sums, as for the autograd path.

    Inputs: ``x`` (N, C, *), ``weight``/``bias`` (C,) or None, ``mean``/``var`` (C,) float32 statistics
    used for the normalisation (batch or running), ``count`` the number of values per channel they were
    taken over (global with a group), ``training`` whether they are batch statistics (then they depend on
    ``x``), ``eps``, ``activation``/``slope``, ``group`` or None. ``weight`` is the raw parameter; the scale
    is ``|weight| + eps`` with gradient ``sign(weight)``, +1 at 0 (as :func:`abs_plus_eps`).
    ``fused_running = (running_mean, running_var, momentum)`` (local training only; ``mean``/``var``/``count``
    are then None) lets one native batch-norm kernel compute the batch statistics, the output and the
    running-statistics update, bitwise as the autograd path: separate ``var_mean`` + eval-mode kernels made
    the forward 3x slower on the CPU.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        mean: torch.Tensor,
        var: torch.Tensor,
        count: float,
        training: bool,
        eps: float,
        activation: str,
        slope: float,
        group: Any,
        fused_running: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    ) -> torch.Tensor:
        gamma = weight.detach().abs() + eps if weight is not None else None  # (C,), > 0
        beta = bias.detach() if bias is not None else None
        if fused_running is not None:
            # Local training statistics: one native kernel computes them, normalises and updates the running
            # statistics, exactly as the autograd path's F.batch_norm (same output, same buffers).
            running_mean, running_var, momentum = fused_running
            y, _, rstd = torch.ops.aten.native_batch_norm(
                x, gamma, beta, running_mean, running_var, True, momentum, eps
            )
            count = float(x.numel() // x.shape[1])
        else:
            # Given statistics (global batch, or running): one fused kernel, output in x's dtype.
            y = F.batch_norm(x, mean, var, gamma, beta, False, 0.0, eps)
            rstd = torch.rsqrt(var + eps)
        # rstd: (C,) float32 (float64 for a float64 input)
        y = apply_activation(y, activation, slope, inplace=True)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.config = (count, training, eps, activation, slope, group)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, weight, bias, rstd = ctx.saved_tensors
        count, training, eps, activation, slope, group = ctx.config
        channels = y.shape[1]
        shape = [1, channels] + [1] * (y.dim() - 2)
        dims = [d for d in range(y.dim()) if d != 1]
        # (N, C, *) in float32 (or float64): the sums below lose too much in half precision; no copy when
        # y is already float32.
        dtype = _compute_dtype(y)
        yf, dyf = y.to(dtype), dy.to(dtype)
        rstd = rstd.to(dtype)
        gamma = weight.detach().to(dtype).abs() + eps if weight is not None else torch.ones_like(rstd)
        beta = bias.detach().to(dtype) if bias is not None else torch.zeros_like(rstd)
        beta_ = beta.view(shape)
        # dz = dL/dz from the output (the output has the sign of z), and gamma * x_hat = z - beta with
        # z = act^-1(y): one kernel and one fresh tensor each.
        if activation == "leaky_relu":
            dz = torch.ops.aten.leaky_relu_backward(dyf, yf, slope, True)
            zc = F.leaky_relu(yf, 1.0 / slope).sub_(beta_)
        elif activation == "elu":
            dz = torch.ops.aten.elu_backward(dyf, slope, 1, 1, True, yf)  # dy * (y + alpha) where y < 0
            zc = torch.where(yf < 0, torch.log1p(yf / slope), yf).sub_(beta_)
        else:  # identity: dz is updated in place below and must not alias the incoming gradient
            dz, zc = dyf.clone(), yf - beta_
        # Per-rank sums (C,): S1 = sum(dz), S2 = sum(dz * x_hat) = sum(dz * (z - beta)) / gamma. Subtracting
        # beta before the product keeps the error of S2 that of an elementwise x_hat (channels with
        # gamma ~ eps amplify any cancellation by 1 / gamma).
        sum_dz = dz.sum(dims)
        sum_dz_xhat = (dz * zc).sum(dims) / gamma
        dx = None
        if ctx.needs_input_grad[0]:
            a = gamma * rstd  # (C,)
            if training:
                totals = torch.cat([sum_dz, sum_dz_xhat])
                if group is not None:
                    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
                m1, m2 = totals[:channels] / count, totals[channels:] / count
                # dx = a * (dz - m1 - x_hat * m2) = a * dz - (rstd * m2) * (z - beta) - a * m1, three
                # in-place passes over dz and no further activation-sized tensor.
                dx = dz.mul_(a.view(shape)).addcmul_(zc, (-rstd * m2).view(shape)).sub_((a * m1).view(shape))
            else:
                dx = dz.mul_(a.view(shape))
            dx = dx.to(dy.dtype)
        d_weight = d_bias = None
        if weight is not None and ctx.needs_input_grad[1]:
            sign = torch.where(weight.detach() >= 0, 1.0, -1.0)
            d_weight = (sum_dz_xhat * sign).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            d_bias = sum_dz.to(bias.dtype)
        return dx, d_weight, d_bias, None, None, None, None, None, None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over a process group: the backward sums the incoming gradients too.

    With ``y = sum_r x_r`` on every rank and the total loss ``L = sum_r L_r``,
    ``dL/dx_r = sum_r' dL_r'/dy``: one all-reduce of the gradient gives every rank the global-batch
    batch-norm gradient (as SyncBatchNorm does).
    """

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def all_reduce_sum_differentiable(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Sum ``tensor`` over ``group`` (default WORLD) with a gradient that is summed over the group as well."""
    return _AllReduceSum.apply(tensor, group)


class _SharedRef:
    """Holds an object that copies of the module share and pickling drops.

    Process groups can be neither deep-copied nor pickled; a deep copy of the model (e.g. the frozen old
    model) keeps using the same group, and an unpickled one falls back to the default group.
    """

    def __init__(self, value: Any = None) -> None:
        self.value = value

    def __copy__(self) -> _SharedRef:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedRef:
        return self

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return _SharedRef, (None,)


class _ActivationAttribute:
    """The ``activation`` attribute of the activated norm layers: checked when set, and changeable after
    construction (``modules.residual.identity_norm`` turns a layer's activation to ``identity``)."""

    _activation: str

    @property
    def activation(self) -> str:
        return self._activation

    @activation.setter
    def activation(self, value: str) -> None:
        self._activation = check_activation(value)


class ABN(_ActivationAttribute, nn.Module):
    """Activated batch normalisation: ``act(batch_norm(x) * weight + bias)`` (inplace_abn ``ABN``).

    Args:
        num_features: channels C of the (N, C, ...) input.
        eps: added to the variance (and, in :class:`InPlaceABN`, to ``|weight|``).
        momentum: running-statistics factor; None means a cumulative average over ``num_batches_tracked``.
        affine: learn ``weight`` and ``bias``.
        activation: "leaky_relu", "elu", "relu" or "identity"; can be changed after construction.
        activation_param: leaky slope or ELU alpha.
        recompute: recompute the normalisation in backward instead of storing its intermediates.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        *,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.activation = activation
        self.activation_param = activation_param
        self.recompute = recompute
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1)
        self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _scale(self) -> torch.Tensor | None:
        """Per-channel multiplier of the normalised input: the raw weight for plain ABN."""
        return self.weight

    def _momentum(self) -> float:
        """Count this training batch and return the running-statistics factor."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _local_forward(self, x: torch.Tensor, momentum: float, update_running: bool) -> torch.Tensor:
        """Batch norm with this process's statistics (training) or the running ones (eval), then act."""
        running_mean, running_var = self.running_mean, self.running_var
        if self.training and not update_running:
            # Recomputation in backward: the update goes to throw-away copies (passing None instead would
            # change what batch_norm saves for backward, which activation checkpointing checks).
            running_mean, running_var = running_mean.clone(), running_var.clone()
        y = F.batch_norm(
            x, running_mean, running_var, self._scale(), self.bias, self.training, momentum, self.eps
        )
        # y is a fresh tensor that batch_norm's backward does not need: the activation may overwrite it.
        return apply_activation(y, self.activation, self.activation_param, inplace=True)

    def _invertible(self) -> bool:
        """Whether backward may recover the input from the output: needs a scale that is never 0."""
        return False

    def _save_output_only(self) -> bool:
        return self.recompute and torch.is_grad_enabled() and self._invertible()

    def _update_running(
        self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor, momentum: float
    ) -> None:
        """Update the running statistics from a batch ``mean`` and biased ``var`` (C,) of ``count`` values."""
        with torch.no_grad():
            # No .item(): the unbiased correction n / (n - 1) stays on the device.
            unbiased = var * (count / (count - 1.0).clamp_min(1.0))
            self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
            self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)

    def _output_only_forward(self, x: torch.Tensor, group: Any, momentum: float) -> torch.Tensor:
        """The ``recompute`` path of invertible layers: see :class:`_InvertibleABNFunction`."""
        fused = None
        if self.training and group is None:
            mean = var = count = None  # computed by the fused kernel, which also updates the buffers
            fused = (self.running_mean, self.running_var, momentum)
        elif self.training:
            mean, var, count = _batch_statistics(x, group)
            self._update_running(mean, var, count, momentum)
        else:
            mean, var, count = self.running_mean, self.running_var, x.new_ones(())
        return _InvertibleABNFunction.apply(
            x,
            self.weight,
            self.bias,
            mean,
            var,
            count,
            self.training,
            self.eps,
            self.activation,
            self.activation_param,
            group,
            fused,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self._save_output_only():
                return self._output_only_forward(x, None, 0.0)
            return self._local_forward(x, 0.0, False)
        _check_batch_size(x)
        momentum = self._momentum()
        if self._save_output_only():
            return self._output_only_forward(x, None, momentum)
        return _run_maybe_recomputed(
            lambda inp, update: self._local_forward(inp, momentum, update), x, self.recompute
        )

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        _fill_missing_num_batches_tracked(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        rep = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        rep += f", activation={self.activation}"
        if self.activation in ("leaky_relu", "elu"):
            rep += f"[{self.activation_param}]"
        if self.recompute:
            rep += ", recompute=True"
        return rep


class InPlaceABN(ABN):
    """:class:`ABN` whose scale is ``|weight| + eps`` (inplace_abn ``InPlaceABN``).

    Reference behaviour (RN-06): the compiled in-place backward needs an invertible scale, so inplace_abn
    multiplies by ``|weight| + eps``; the reference's weights were trained that way and give the reference's
    activations only with this scale.
    """

    def _scale(self) -> torch.Tensor | None:
        return abs_plus_eps(self.weight, self.eps) if self.weight is not None else None

    def _invertible(self) -> bool:
        return _invertible_activation(self.activation, self.activation_param)


class InPlaceABNSync(InPlaceABN):
    """:class:`InPlaceABN` with batch statistics over the processes of ``group`` (inplace_abn's Sync layer).

    In training, when ``torch.distributed`` is initialised and the group has more than one process, every
    rank sums its per-channel count, sum and sum of squares into one tensor and all-reduces it once; the
    statistics are then those of the global batch, combined exactly by count. The gradient goes through the
    same all-reduce, so each rank's input gradient equals the gradient of batch norm over the global batch.
    Without a process group (or with one process) it is :class:`InPlaceABN`. Works with gloo (CPU) and NCCL
    (CUDA).

    Args:
        group: process group; None means the default (WORLD) group.
        (others as :class:`ABN`.)
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        group: Any = None,
        *,
        recompute: bool = False,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, activation, activation_param, recompute=recompute
        )
        self.group = group

    @property
    def group(self) -> Any:
        return self._group_ref.value

    @group.setter
    def group(self, value: Any) -> None:
        self._group_ref = _SharedRef(value)

    def _sync_group(self) -> Any:
        """The group to reduce over, or None when statistics stay local."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.group if self.group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _sync_forward(
        self, x: torch.Tensor, group: Any, momentum: float, update_running: bool
    ) -> torch.Tensor:
        channels = x.shape[1]
        xf = x.to(_compute_dtype(x))
        mean, var, n = _global_statistics(xf, group, all_reduce_sum_differentiable)
        if update_running:
            self._update_running(mean, var, n, momentum)

        # y = x * scale + shift, scale = (|w| + eps) / sqrt(var + eps), shift = b - mean * scale; (C,) each.
        scale = torch.rsqrt(var + self.eps)
        weight = self._scale()
        if weight is not None:
            scale = scale * weight.to(xf.dtype)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.to(xf.dtype)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)
        return apply_activation(y, self.activation, self.activation_param, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self._sync_group() if self.training else None
        if group is None:
            return super().forward(x)
        # Reference behaviour (inplace_abn v1.1.0 ``InPlaceABNSync``): the check is per rank.
        _check_batch_size(x)
        momentum = self._momentum()
        if self._save_output_only():
            return self._output_only_forward(x, group, momentum)
        return _run_maybe_recomputed(
            lambda inp, update: self._sync_forward(inp, group, momentum, update), x, self.recompute
        )

    def extra_repr(self) -> str:
        if self.group is None:
            return super().extra_repr()
        world = dist.is_initialized() and self.group is dist.group.WORLD
        return super().extra_repr() + (", group=WORLD" if world else ", group=custom")


class BatchNormAct2d(_ActivationAttribute, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` then an activation, with ABN's ``activation``/``activation_param`` attributes.

    Used for ``--norm_act std`` (the reference crashed there, RN-12, because BatchNorm2d had no
    ``activation``). Its state-dict keys are BatchNorm2d's, which are also ABN's.

    Like the ABN layers it normalises any (N, C, *) input over every axis but C: image maps (N, C, H, W)
    and point features (N, C, P) of the point-cloud models alike (``nn.BatchNorm2d`` itself refuses
    anything but 4-D input; the arithmetic of ``F.batch_norm`` is the same for every rank).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 3:
            raise ValueError(f"expected an (N, C, *) input with a spatial axis, got {input.dim()}D input")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        *,
        recompute: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.activation = activation
        self.activation_param = activation_param
        self.recompute = recompute

    def _bn_act(self, x: torch.Tensor, update_running: bool) -> torch.Tensor:
        if update_running or self.running_mean is None:
            y = super().forward(x)
        else:
            # Recomputation in backward: same batch statistics, the update goes to throw-away copies.
            running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
            y = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, True, 0.0, self.eps)
        return apply_activation(y, self.activation, self.activation_param, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or not self.track_running_stats
        return _run_maybe_recomputed(self._bn_act, x, self.recompute and use_batch_stats)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if self.track_running_stats:
            _fill_missing_num_batches_tracked(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation}"


def import_inplace_abn() -> ModuleType:
    """Import the optional compiled ``inplace_abn`` package, or explain how to get it.

    Raises:
        OptionsError: the package is not installed (or its extension does not load).
    """
    try:
        return importlib.import_module("inplace_abn")
    except ImportError as exc:
        raise OptionsError(
            "--abn_impl inplace_abn needs the compiled inplace_abn package, which could not be imported "
            f"({exc}). Install it on a machine with the CUDA toolkit matching your PyTorch build (pip "
            "install inplace-abn, which compiles a CUDA extension), or drop --abn_impl to use the default "
            "pure-PyTorch implementation (--abn_impl torch), which gives the same numerics."
        ) from exc


def is_norm_layer(module: nn.Module) -> bool:
    """True for BatchNorm layers and every ABN flavour, ours or the compiled inplace_abn's."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, ABN)):
        return True
    cls = type(module)
    return cls.__module__.startswith("inplace_abn") and cls.__name__ in (
        "ABN",
        "InPlaceABN",
        "InPlaceABNSync",
    )
