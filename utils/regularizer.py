"""Parameter regularisers EWC, PI and RW, with the reference's interface (``utils/regularizer.py``).

Each regulariser keeps per-parameter importance tensors keyed by parameter name. The reference named the
parameters of the DDP-wrapped model, so every key carries the ``module.`` prefix; these classes take the
*unwrapped* model (a wrapped one is unwrapped) and add the prefix themselves, so that the importance saved
in a checkpoint's ``trainer_state["regularizer"]`` is interchangeable with the reference's.

Usage by the Trainer, after the main backward (gradients unscaled and already averaged over processes):
rank 0 calls :meth:`Regularizer.update`; every rank adds ``reg_importance * penalty()`` with its own
backward. ``penalty()`` returns a 0-dim tensor; it has no graph (and is 0) when there is nothing to
penalise, which :attr:`Regularizer.penalize` also tells.

Saved states have the reference's layout, key for key (``regularizer.py`` ``EWC/PI/RW.state_dict``), so
that a checkpoint goes both ways between this project and the reference:

* EWC ``{name, fisher, alpha}``;
* PI ``{name, score, delta, starting_model}``, ``starting_model`` holding only the parameters that the
  old model lacks (the new classifier; nothing at step 0);
* RW ``{name, score, fisher, iteration, alpha}`` with ``iteration`` the score-update *period*, plus this
  project's ``count`` (updates so far, which keeps the period's phase on a resume).

``load_state_dict`` reads both this layout and the reference's, and refuses (``CheckpointError``) a
state whose tensors do not match the model's parameters (RN-43).
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from utils.distributed import unwrap_model
from utils.errors import CheckpointError, OptionsError
from utils.logger import get_logger

__all__ = ["EWC", "PI", "REGULARIZERS", "RW", "Regularizer", "get_regularizer", "normalize_fn"]

logger = get_logger("utils.regularizer")

PREFIX = "module."
#: ``--regularizer`` values (:func:`get_regularizer`).
REGULARIZERS = ("ewc", "rw", "pi")


def normalize_fn(mat: Tensor) -> Tensor:
    """Min-max normalisation of one importance tensor: ``(M - min M) / (max M - min M + 1e-8)``."""
    return (mat - mat.min()) / (mat.max() - mat.min() + 1e-8)


def _named_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters under the reference's DDP names (``module.`` + name)."""
    for name, param in unwrap_model(model).named_parameters():
        yield PREFIX + name, param


@torch.no_grad()
def _snapshot(model: nn.Module, previous: dict[str, Tensor] | None) -> dict[str, Tensor]:
    """Copy of the trainable parameters for PI/RW's path increments, refreshed in place when possible.

    The reference kept this snapshot on the CPU: a device-to-host copy of the whole model, which waits for
    the GPU, every iteration (PI) or every ``iterations`` (RW). It stays on the parameters' device here
    (one model's worth of memory); the values are the same.
    """
    params = {name: p for name, p in _named_parameters(model) if p.requires_grad}
    if previous is None:
        return {name: p.detach().clone() for name, p in params.items()}
    for name, kept in previous.items():
        kept.copy_(params[name])
    return previous


def _old_parameters(model_old: nn.Module, device: torch.device | str) -> dict[str, Tensor]:
    """Detached copy of the old model's state under the reference's DDP names."""
    state = unwrap_model(model_old).state_dict()
    return {PREFIX + k: v.detach().clone().to(device) for k, v in state.items()}


class Regularizer(ABC):
    """Common interface: ``update()`` after each backward, ``penalty()``, and a picklable state."""

    name: ClassVar[str]
    penalize: bool

    def __init__(self, model: nn.Module, device: torch.device | str):
        self.model = model
        self.device = device

    def _zero(self) -> Tensor:
        return torch.zeros((), device=self.device)

    def _weighted_distance(self, importance: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> Tensor:
        """``sum_n sum importance[n] * (theta_n - reference_n)^2`` over trainable parameters having both."""
        if not self.penalize:
            return self._zero()
        loss = self._zero()
        for name, param in _named_parameters(self.model):
            # A parameter without importance (frozen at the previous step) is skipped; the reference
            # raised KeyError there.
            if param.requires_grad and name in reference and name in importance:
                loss = loss + (importance[name] * (param - reference[name]) ** 2).sum()
        return loss

    def _check_name(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise CheckpointError(
                f"The checkpoint's regulariser state is for {state.get('name')!r}, not {self.name!r}: "
                f"pass the same --regularizer as the run that wrote it."
            )

    def _saved_tensors(self, state: Mapping[str, Any], key: str, required: bool = True) -> dict[str, Tensor]:
        """``state[key]``, a dict parameter name -> tensor, checked and moved to the device.

        Every name must be a parameter of the model (``module.`` name) with its shape; with ``required``
        every trainable parameter must be there too (what ``update()`` accumulates into).
        """
        params = dict(_named_parameters(self.model))
        saved = state.get(key)
        if not isinstance(saved, Mapping) or not all(torch.is_tensor(v) for v in saved.values()):
            raise CheckpointError(
                f"The checkpoint's {self.name} regulariser state has no {key!r} dictionary of tensors "
                f"(keys: {sorted(state)}): it was not written by this project or the LGKD/PLOP reference. "
                "Resume from another checkpoint, or start the step over with --no_resume (without --ckpt)."
            )
        unknown = sorted(k for k in saved if k not in params)
        missing = (
            sorted(k for k, p in params.items() if p.requires_grad and k not in saved) if required else []
        )
        wrong = sorted(k for k in saved if k in params and saved[k].shape != params[k].shape)
        if unknown or missing or wrong:
            problems = [
                f"{what} {names[:3]}{' ...' if len(names) > 3 else ''} ({len(names)})"
                for what, names in (("unknown", unknown), ("missing", missing), ("shape mismatch", wrong))
                if names
            ]
            raise CheckpointError(
                f"The checkpoint's {self.name} regulariser state {key!r} does not match this model's "
                f"parameters: {'; '.join(problems)}. It was written for another task, step or backbone; "
                "resume with the options of the run that wrote it, or start the step over with --no_resume "
                "(without --ckpt)."
            )
        return {k: v.detach().to(self.device) for k, v in saved.items()}

    @abstractmethod
    def update(self) -> None:
        """Accumulate importance from the current gradients."""

    @abstractmethod
    def penalty(self) -> Tensor:
        """Quadratic penalty (unweighted; the Trainer multiplies it by ``--reg_importance``)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """State stored in ``trainer_state["regularizer"]``."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by :meth:`state_dict` (resuming within a step)."""


class EWC(Regularizer):
    """Elastic weight consolidation (Kirkpatrick et al., PNAS 2017, Eq. 3) with an online Fisher estimate.

    ``F[n] <- alpha * g_n^2 + (1 - alpha) * F[n]`` at every update, and
    ``penalty = sum_n sum F_old[n] * (theta_n - theta_old,n)^2`` with ``F_old`` the (min-max normalised)
    Fisher saved by the previous step. The running Fisher starts from the un-normalised saved one; new
    parameters (the new classifier) start at ones.

    Args:
        model: the current model (unwrapped or DDP).
        model_old: the previous-step model, or None (step 0: no penalty).
        device: device of the importance tensors.
        fisher: the saved Fisher of the previous step (``trainer_state["regularizer"]["fisher"]``), or None.
        alpha: EMA factor of the Fisher (``--reg_alpha``).
        normalize: min-max normalise the saved Fisher (not ``--reg_no_normalize``).
    """

    name = "ewc"

    def __init__(
        self,
        model: nn.Module,
        model_old: nn.Module | None,
        device: torch.device | str,
        fisher: Mapping[str, Tensor] | None = None,
        alpha: float = 0.9,
        normalize: bool = True,
    ):
        super().__init__(model, device)
        self.alpha = alpha
        self.normalize = normalize
        self.model_old_dict = _old_parameters(model_old, device) if model_old is not None else {}
        self.penalize = model_old is not None and fisher is not None
        self.fisher_old: dict[str, Tensor] | None = None
        self.fisher: dict[str, Tensor] = {}
        if fisher is not None:
            self.fisher_old = {
                k: (normalize_fn(v) if normalize else v).detach().to(device) for k, v in fisher.items()
            }
            self.fisher = {k: v.detach().clone().to(device) for k, v in fisher.items()}
        for name, param in _named_parameters(model):
            if param.requires_grad and name not in self.fisher:
                self.fisher[name] = torch.ones_like(param, device=device).detach()

    @torch.no_grad()
    def update(self) -> None:
        """``F[n] = alpha * g_n^2 + (1 - alpha) * F[n]`` for every parameter with a gradient.

        The reference needed every parameter to have a gradient (RN-30); parameters whose ``grad`` is None
        (frozen, or unused in this forward) are skipped here.
        """
        for name, param in _named_parameters(self.model):
            if param.grad is None or name not in self.fisher:
                continue
            self.fisher[name] = (
                self.alpha * param.grad.to(self.fisher[name].dtype) ** 2
                + (1 - self.alpha) * self.fisher[name]
            )

    def penalty(self) -> Tensor:
        return self._weighted_distance(self.fisher_old or {}, self.model_old_dict)

    def get(self) -> dict[str, Tensor]:
        """The running Fisher."""
        return self.fisher

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fisher": self.fisher, "alpha": self.alpha}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._check_name(state)
        self.fisher = self._saved_tensors(state, "fisher")
        self.alpha = state["alpha"]


class PI(Regularizer):
    """Path integral / synaptic intelligence (Zenke et al., ICML 2017).

    ``update()`` accumulates ``delta[n] += g_n * (theta_prev,n - theta_n)`` between consecutive updates
    (``theta_prev`` the parameters at the previous update); the score saved at the end of the step is
    ``max(delta[n] / ((theta_n - theta_ref,n)^2 + 1e-20), 0)`` plus the previous score, and
    ``penalty = sum_n S[n] * (theta_n - theta_ref,n)^2`` with ``S`` the (normalised) saved score.

    The anchor ``theta_ref`` covers every parameter: the old model's value, or, for the parameters the old
    model lacks (the new classifier; every parameter at step 0), the value when this regulariser is built.
    ``run.py`` builds the Trainer before it loads a resumed checkpoint's weights, so that is the step's
    initial value. The saved ``starting_model`` holds those new parameters' anchors (nothing at step 0),
    as the reference's; loading a state takes them from it and keeps the rest, so a reference-written
    state and this project's earlier layout (every parameter) both give the full anchor.

    Args:
        model: the current model.
        model_old: the previous-step model, or None.
        device: device of the tensors.
        score: the saved score of the previous step, or None (no penalty).
        normalize: min-max normalise the saved score.
    """

    name = "pi"

    def __init__(
        self,
        model: nn.Module,
        model_old: nn.Module | None,
        device: torch.device | str,
        score: Mapping[str, Tensor] | None = None,
        normalize: bool = True,
    ):
        super().__init__(model, device)
        self.normalize = normalize
        # The anchor of every parameter as built (old-model parameters are then read from the old model).
        self.starting_model = {n: p.detach().clone().to(device) for n, p in _named_parameters(model)}
        self._old = _old_parameters(model_old, device) if model_old is not None else {}
        self.model_old_dict = self._reference_parameters()
        self.penalize = model_old is not None and score is not None
        # Previous score: raw (added to the new score) and normalised (weights of the penalty).
        self.score_prev = {k: v.detach().to(device) for k, v in score.items()} if score is not None else None
        self.score_old = (
            {k: normalize_fn(v) if normalize else v for k, v in self.score_prev.items()}
            if self.score_prev is not None
            else None
        )
        self.delta = {
            n: torch.zeros_like(p, device=device).detach()
            for n, p in _named_parameters(model)
            if p.requires_grad
        }
        self.model_temp: dict[str, Tensor] | None = None

    def _reference_parameters(self) -> dict[str, Tensor]:
        return {n: self._old.get(n, start) for n, start in self.starting_model.items()}

    @torch.no_grad()
    def update(self) -> None:
        if self.model_temp is not None:
            for name, param in _named_parameters(self.model):
                if param.grad is not None and name in self.delta:
                    self.delta[name] += param.grad * (self.model_temp[name] - param.detach())
        self.model_temp = _snapshot(self.model, self.model_temp)

    def penalty(self) -> Tensor:
        return self._weighted_distance(self.score_old or {}, self.model_old_dict)

    @torch.no_grad()
    def get(self) -> dict[str, Tensor]:
        """The score to save for the next step."""
        score = {}
        for name, param in _named_parameters(self.model):
            if name not in self.delta:
                continue
            moved = (param.detach() - self.model_old_dict[name]) ** 2 + 1e-20
            score[name] = (self.delta[name] / moved).clamp(min=0)
            if self.score_prev is not None and name in self.score_prev:
                score[name] = score[name] + self.score_prev[name]
        return score

    def state_dict(self) -> dict[str, Any]:
        """The reference's layout: ``starting_model`` holds only the parameters absent from the old model
        (on the CPU, as the reference's), not a second copy of the whole model; nothing at step 0."""
        return {
            "name": self.name,
            "score": self.get(),
            "delta": self.delta,
            # Reference behaviour: at step 0 (no old model) the reference records no starting value.
            "starting_model": {
                name: start.detach().cpu()
                for name, start in self.starting_model.items()
                if self._old and name not in self._old
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``delta`` and the anchors of the parameters ``starting_model`` holds.

        Either layout gives the full anchor: the reference's (new parameters only) and this project's
        earlier one (every parameter) update the anchors they hold; the old model's parameters are always
        anchored at the old model; any other parameter keeps its value as built.

        Raises:
            CheckpointError: the state's tensors are not this model's parameters (another task, step or
                backbone).
        """
        self._check_name(state)
        delta = self._saved_tensors(state, "delta")
        starting = self._saved_tensors(state, "starting_model", required=False)
        self.delta = delta
        self.starting_model = {**self.starting_model, **starting}
        self.model_old_dict = self._reference_parameters()


class RW(Regularizer):
    """Riemannian walk (Chaudhry et al., ECCV 2018): online Fisher plus a path-integral score.

    Every ``iterations`` updates the score accumulates
    ``g_n * (theta_snap - theta_n) / (0.5 * F[n] * (theta_n - theta_snap)^2 + 1e-8)`` and a new snapshot is
    taken; the Fisher is updated at every call as in EWC. ``penalty = sum_n (norm(F_saved) + norm(S_saved))
    * (theta_n - theta_old,n)^2``; the score saved at the end is ``max(score, 0)``, averaged with the
    previous score when there is one.

    Args:
        model: the current model.
        model_old: the previous-step model, or None.
        device: device of the tensors.
        fisher: the saved Fisher, or None.
        score: the saved score, or None (both needed for a penalty).
        alpha: EMA factor of the Fisher.
        iterations: score update period in ``update()`` calls (``--reg_iterations``).
        normalize: min-max normalise the saved Fisher and score.
    """

    name = "rw"

    def __init__(
        self,
        model: nn.Module,
        model_old: nn.Module | None,
        device: torch.device | str,
        fisher: Mapping[str, Tensor] | None = None,
        score: Mapping[str, Tensor] | None = None,
        alpha: float = 0.9,
        iterations: int = 10,
        normalize: bool = True,
    ):
        super().__init__(model, device)
        self.alpha = alpha
        self.iterations = iterations
        self.normalize = normalize
        self.model_old_dict = _old_parameters(model_old, device) if model_old is not None else {}
        resumed = fisher is not None and score is not None
        self.penalize = model_old is not None and resumed
        self.fisher: dict[str, Tensor] = {}
        self.score_old: dict[str, Tensor] | None = None
        self.score_plus_fisher: dict[str, Tensor] = {}
        if resumed:
            norm = normalize_fn if normalize else (lambda t: t)
            self.score_old = {k: v.detach().to(device) for k, v in score.items()}
            for key, value in fisher.items():
                self.fisher[key] = value.detach().clone().to(device)
                if key in self.score_old:
                    self.score_plus_fisher[key] = norm(value.detach().to(device)) + norm(self.score_old[key])
        trainable = [(n, p) for n, p in _named_parameters(model) if p.requires_grad]
        for name, param in trainable:
            if name not in self.fisher:
                self.fisher[name] = torch.ones_like(param, device=device).detach()
        self.score = {n: torch.zeros_like(p, device=device).detach() for n, p in trainable}
        self.model_temp: dict[str, Tensor] | None = None
        self.count = 0

    @torch.no_grad()
    def update(self) -> None:
        if self.count % self.iterations == 0:
            if self.model_temp is not None:
                for name, param in _named_parameters(self.model):
                    if param.grad is None or name not in self.score:
                        continue
                    moved = param.detach() - self.model_temp[name]
                    self.score[name] += (param.grad * -moved) / (0.5 * self.fisher[name] * moved**2 + 1e-8)
            self.model_temp = _snapshot(self.model, self.model_temp)
        self.count += 1
        for name, param in _named_parameters(self.model):
            if param.grad is not None and name in self.fisher:
                self.fisher[name] = self.alpha * param.grad**2 + (1 - self.alpha) * self.fisher[name]

    def penalty(self) -> Tensor:
        return self._weighted_distance(self.score_plus_fisher, self.model_old_dict)

    @torch.no_grad()
    def get_score(self) -> dict[str, Tensor]:
        """``max(score, 0)``, averaged with the previous step's score where there is one."""
        score = {}
        for name, value in self.score.items():
            current = value.clamp(min=0)
            if self.score_old is not None and name in self.score_old:
                current = 0.5 * (current + self.score_old[name])
            score[name] = current
        return score

    def state_dict(self) -> dict[str, Any]:
        """The reference's keys, ``iteration`` being the update *period* as there; the number of updates so
        far goes under this project's own key ``count`` (the reference's loader ignores it)."""
        return {
            "name": self.name,
            "score": self.get_score(),
            "fisher": self.fisher,
            "iteration": self.iterations,
            "alpha": self.alpha,
            "count": self.count,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore score, Fisher, period and alpha from this project's or the reference's layout.

        With ``count`` (this project) the update count is restored, so score updates keep their phase; a
        reference state has no count and starts again at 0, as the reference's resume does. As there, the
        restored score is the saved (clamped, averaged) one.

        Raises:
            CheckpointError: the tensors are not this model's parameters, or ``iteration`` / ``count`` are
                not a positive period / a count.
        """
        self._check_name(state)
        period, count = state.get("iteration"), state.get("count", 0)
        if not _is_int(period) or period < 1 or not _is_int(count) or count < 0:
            raise CheckpointError(
                f"The checkpoint's rw regulariser state has iteration={period!r} and count={count!r}; "
                "expected the score-update period (a positive integer) and the number of updates. Resume "
                "from another checkpoint, or start the step over with --no_resume (without --ckpt)."
            )
        if "count" not in state and period != self.iterations:
            logger.warning(
                f"Resuming RW with the checkpoint's score-update period {period} instead of "
                f"--reg_iterations {self.iterations}, as the reference does. (If this checkpoint was written "
                f"by this project before it stored the update count under 'count', {period} is that count "
                "and the period is wrong: start the step over with --no_resume.)"
            )
        self.score = self._saved_tensors(state, "score")
        self.fisher = self._saved_tensors(state, "fisher")
        self.iterations, self.count = int(period), int(count)
        self.alpha = state["alpha"]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def get_regularizer(
    model: nn.Module,
    model_old: nn.Module | None,
    device: torch.device | str,
    opts: argparse.Namespace,
    old_state: Mapping[str, Any] | None,
) -> Regularizer | None:
    """Build the ``--regularizer`` (None without one) from the previous step's saved state.

    Args:
        model: the current model (unwrapped; a DDP wrapper is unwrapped).
        model_old: the frozen previous-step model, or None at step 0.
        device: device of the importance tensors.
        opts: reads ``regularizer``, ``reg_alpha``, ``reg_no_normalize``, ``reg_iterations``.
        old_state: ``trainer_state["regularizer"]`` of the previous step's checkpoint, or None.
    """
    name = opts.regularizer
    if old_state is not None and name != old_state.get("name"):
        logger.warning(
            f"The regularizer you passed ({name}) differs from the one in the previous step's state "
            f"({old_state.get('name')})."
        )
    if name is None:
        return None
    state = old_state or {}
    normalize = not opts.reg_no_normalize
    if name == "ewc":
        return EWC(
            model, model_old, device, fisher=state.get("fisher"), alpha=opts.reg_alpha, normalize=normalize
        )
    if name == "pi":
        return PI(model, model_old, device, score=state.get("score"), normalize=normalize)
    if name == "rw":
        return RW(
            model,
            model_old,
            device,
            fisher=state.get("fisher"),
            score=state.get("score"),
            alpha=opts.reg_alpha,
            iterations=opts.reg_iterations,
            normalize=normalize,
        )
    raise OptionsError(f"Unknown --regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}.")
