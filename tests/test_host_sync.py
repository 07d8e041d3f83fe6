"""No host-device synchronisation inside the training loop (issue 6), for every method.

A GPU run stalls whenever Python needs a value computed on the device (``.item()``, ``bool(t)``, a
boolean-mask index, ``nonzero``, ...): the CPU waits for the queue to drain and the GPU then waits for
the next kernels. The training loop may do that only at the print interval (finite-loss check and
logging) and at the end of the epoch. On the CPU the same reads go through the same aten operators, so
recording the dispatched operators finds them without a GPU.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import testing  # the step builders the benchmarks use: parser, presets, models and uint8 batches
from argparser import METHODS
from run import build_optimizer, load_optimizer_state
from train import Trainer

# Operators whose result (or output shape) is a device value read back by the host.
HOST_READS = (
    "aten._local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "aten.is_nonzero",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten.bincount",  # its CUDA kernel reads min/max back
    "aten.equal",
    "aten.repeat_interleave",
    "aten.masked_scatter",
)

CROP, BATCH, ITERS, PRINT_INT = 48, 2, 3, 2


class HostReads(TorchDispatchMode):
    """Records (phase, operator) for every dispatched operator that reads a device value on the host."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.reads: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        read = name.startswith(HOST_READS)
        if name.startswith("aten.index.Tensor") or name.startswith("aten.index_put"):
            # x[mask] with a boolean mask has a data-dependent shape: it runs nonzero on the host's behalf.
            read = read or any(t is not None and t.dtype == torch.bool for t in args[1])
        if read:
            self.reads.append((self.phase, name))
        return func(*args, **(kwargs or {}))


class Loader:
    """Batches with a length (as a DataLoader); marks the end of the epoch once they are exhausted."""

    def __init__(self, batches: list, record: HostReads) -> None:
        self.batches, self.record = batches, record

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        yield from self.batches
        self.record.phase = "epoch end"


def _phase(record: HostReads, name: str, fn):
    def wrapped(*args: Any, **kwargs: Any):
        previous, record.phase = record.phase, name
        try:
            return fn(*args, **kwargs)
        finally:
            record.phase = previous

    return wrapped


CPU = torch.device("cpu")


def _setup(method: str, *, scaled: bool, device: torch.device = CPU) -> dict[str, Any]:
    """Step 1 of VOC 15-5 for ``method`` on ``device``. ``scaled``: fp16 loss scaling. On CUDA that is the
    real ``--opt_level O1`` path (fp16 autocast, GradScaler, fused SGD); on the CPU, where the Trainer runs
    fp32, an enabled GradScaler and the fused optimizer are set up by hand around the fp32 model."""
    torch.manual_seed(0)
    cuda_fp16 = scaled and device.type == "cuda"
    opts = testing.build_opts(
        step=1, backbone="resnet18", crop=CROP, batch=BATCH, device=device.type, method=method,
        precision="fp16" if cuda_fp16 else "fp32",
    )  # fmt: skip
    model, model_old = testing.build_models(opts, 1, device)
    # fp16 loss scaling on the CPU, as on CUDA: an enabled GradScaler and the optimizer run.py then builds.
    scaler = torch.amp.GradScaler("cpu", enabled=True) if scaled and not cuda_fp16 else None
    trainer = Trainer(
        model, model_old, device, opts, None, classes=testing.step_classes(opts, 1), step=1, scaler=scaler
    )
    labels_now, _ = testing.seen_labels(opts, 1)
    batches = testing.synthetic_batches(ITERS, BATCH, CROP, labels_now)
    trainer.before(batches[:1])  # PLOP/LGKD thresholds: a pass before training, allowed to read back
    optim = build_optimizer(opts, model, fused=scaled or None)
    return {"trainer": trainer, "optim": optim, "batches": batches, "model_old": model_old}


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "loss-scaled"])
@pytest.mark.parametrize("method", METHODS)
def test_training_loop_reads_the_device_only_at_the_print_interval(method: str, scaled: bool) -> None:
    setup = _setup(method, scaled=scaled)
    trainer, record = setup["trainer"], HostReads()
    trainer._train_step = _phase(record, "iteration", trainer._train_step)
    trainer._check_finite = _phase(record, "print interval", trainer._check_finite)
    trainer._log_interval = _phase(record, "print interval", trainer._log_interval)
    old_calls = []
    setup["model_old"].register_forward_hook(lambda *_: old_calls.append(1))

    record.phase = "loop"
    with record:
        trainer.train(0, setup["optim"], Loader(setup["batches"], record), print_int=PRINT_INT)

    assert not [r for r in record.reads if r[0] not in ("print interval", "epoch end")], record.reads
    # The epoch's two loss sums are read once, after the last iteration.
    at_end = [op for phase, op in record.reads if phase == "epoch end"]
    assert at_end == ["aten._local_scalar_dense.default"] * 2
    # The old model runs once per iteration where a loss needs its outputs, never twice, else never.
    assert len(old_calls) == (ITERS if trainer.use_old else 0)


def test_loss_scaled_step_skips_non_finite_gradients_on_the_device() -> None:
    check_overflowing_step_is_skipped(CPU)


def check_overflowing_step_is_skipped(device: torch.device) -> None:
    """The fused step takes GradScaler's inf flag as a tensor: an overflowing iteration changes no
    parameter and no momentum, without a host read, and the scale backs off as with the plain step.
    (Also run on CUDA by ``tests/test_gpu.py``.)"""
    setup = _setup("LGKD", scaled=True, device=device)
    trainer, optim = setup["trainer"], setup["optim"]
    trainer.train(0, optim, setup["batches"][:1], print_int=100)
    params = [p for g in optim.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    momentum = [optim.state[p]["momentum_buffer"].clone() for p in params]
    scale = trainer.scaler.get_scale()

    images, labels = setup["batches"][1]
    record = HostReads()
    # A huge loss scale overflows fp32 gradients: the step must be skipped.
    trainer.scaler.update(torch.tensor(3.0e38, device=device))  # the scaler takes a tensor of its device
    with record:
        trainer._train_step(images, labels, optim)
    assert not record.reads
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(optim.state[p]["momentum_buffer"], m) for p, m in zip(params, momentum))
    assert trainer.scaler.get_scale() == pytest.approx(3.0e38 * 0.5) and scale != trainer.scaler.get_scale()


def test_build_optimizer_fuses_only_loss_scaled_runs() -> None:
    opts = testing.build_opts(step=0, backbone="resnet18", crop=CROP, batch=BATCH, device="cpu", method="FT")
    model, _ = testing.build_models(opts, 0, torch.device("cpu"))
    plain = build_optimizer(opts, model)  # CPU: fp32 whatever --opt_level says
    assert all(not g["fused"] for g in plain.param_groups)
    assert not getattr(plain, "_step_supports_amp_scaling", False)
    fused = build_optimizer(opts, model, fused=True)
    assert all(g["fused"] for g in fused.param_groups)


def test_resume_keeps_this_runs_optimizer_kernel() -> None:
    """A checkpoint written by a loss-scaled (fused) run resumes in an fp32 run with the plain step, and
    the other way round; momentum buffers and learning rates come from the checkpoint."""
    opts = testing.build_opts(step=0, backbone="resnet18", crop=CROP, batch=BATCH, device="cpu", method="FT")
    model, _ = testing.build_models(opts, 0, torch.device("cpu"))
    for saved_fused, resumed_fused in ((True, False), (False, True)):
        saved = build_optimizer(opts, model, fused=saved_fused)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        saved.step()
        saved.param_groups[0]["lr"] = 0.123
        resumed = build_optimizer(opts, model, fused=resumed_fused)
        load_optimizer_state(resumed, saved.state_dict())
        assert all(bool(g["fused"]) == resumed_fused for g in resumed.param_groups)
        assert resumed.param_groups[0]["lr"] == 0.123
        first = next(iter(model.parameters()))
        assert torch.equal(resumed.state[first]["momentum_buffer"], saved.state[first]["momentum_buffer"])
        resumed.step()  # the plain step refuses GradScaler-style flags; the fused one runs
