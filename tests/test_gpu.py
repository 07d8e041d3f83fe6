"""CUDA correctness (issue 13): what the CPU suite cannot check, run by ``benchmarks/gpu_check.py``.

Marked ``gpu``: ``make test`` deselects them, and without CUDA they are skipped. ``GPU_CHECK_DEVICE=cpu``
(set by ``gpu_check.py --smoke`` on a machine without a GPU) runs them on the CPU instead, so that their
code runs in CI before it first meets a GPU; the comparisons are then CPU against CPU, and the slowest
cases run for a subset of the methods (:data:`CPU_METHODS`).

* one training iteration of every method, fp32 and fp16 / bf16 autocast, gives finite losses and weights;
* fp32 on the device against the CPU, same weights and batch: every loss term within
  :data:`LOSS_RTOL`, and the SGD update within :data:`UPDATE_RTOL` (TF32 off for the comparison);
* the fused SGD of loss-scaled runs skips an overflowing step on the device (``tests/test_host_sync.py``),
  also when it is the very first step (a known failure: expected to fail until ``run.build_optimizer``
  initialises the momentum buffers);
* ``StreamSegMetrics`` on the device counts exactly what it counts on the CPU;
* ``--abn_impl inplace_abn`` (when the compiled package is installed) gives the default layer's outputs.

``normalize_on_device`` on CUDA is checked by ``tests/test_transform.py`` (marked ``gpu`` as well).
Measured differences are attached to the JUnit report with ``record_property``; gpu_check.py shows them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import testing  # the step builders the benchmarks use
from argparser import METHODS
from metrics import StreamSegMetrics
from run import build_optimizer
from segmentation_module import make_model
from tests.test_host_sync import check_overflowing_step_is_skipped
from train import Trainer

pytestmark = pytest.mark.gpu

DEVICE_ENV = "GPU_CHECK_DEVICE"  # benchmarks/gpu_check.py sets it
PRECISIONS = ("fp32", "fp16", "bf16")
# Standing in on the CPU (CI), these methods cover every kind of loss term (CE, KD, iCaRL BCE, POD +
# pseudo-labels + LGKD, a parameter regulariser); the other methods are skipped there by the tests that
# are slow on the CPU (fp16 autocast, ~8x slower than fp32) or that would compare the CPU with itself.
CPU_METHODS = ("FT", "LWF-MC", "PI", "LGKD")
# fp32 device against CPU. Both sum in another order (cuDNN algorithms, channels_last), ~1e-6 relative per
# layer; training-mode batch norm over few values amplifies that (measured on the CPU between
# channels_last and contiguous: ~4e-5 on the logits, tests/test_precision.py). Losses are means over
# thousands of pixels, so 1e-3 leaves a wide margin; the update (lr x gradient, all parameters) is looser.
LOSS_RTOL, LOSS_ATOL = 1e-3, 1e-6
UPDATE_RTOL = 1e-2
# inplace_abn against our layer (fp32, TF32 off): same formula, other kernels.
IABN_RTOL = {"eval": 1e-4, "train": 1e-3, "grad": 1e-2}


def _device() -> torch.device:
    return torch.device(os.environ.get(DEVICE_ENV, "cuda"))


@pytest.fixture(scope="module")
def device() -> torch.device:
    dev = _device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"needs CUDA ({DEVICE_ENV}=cpu runs these tests on the CPU)")
    return dev


@pytest.fixture(scope="module", autouse=True)
def _one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Standing in on the CPU (CI): one torch thread, which a busy machine cannot stall (an OpenMP region
    waits for its slowest thread; measured, 2 threads ran these tests 3-5x slower under load)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def sizes(device: torch.device) -> dict[str, Any]:
    """The real backbone on a GPU; a small one when the tests stand in on the CPU."""
    if device.type == "cuda":
        return {"backbone": "resnet101", "crop": 64, "batch": 4}
    return {"backbone": "resnet18", "crop": 32, "batch": 4}


@pytest.fixture(scope="module")
def cpu_models(sizes: dict[str, Any]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Step-1 model and frozen step-0 model of VOC 15-5 on the CPU (the same network for every method),
    built once and copied by each test."""
    torch.manual_seed(0)
    opts = testing.build_opts(step=1, device="cpu", **sizes)
    return testing.build_models(opts, 1, torch.device("cpu"))


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """Plain fp32 matmuls and convolutions on CUDA (no TF32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def _step1(
    method: str, precision: str, device: torch.device, sizes: dict[str, Any], cpu_models: tuple
) -> dict[str, Any]:
    """Trainer, optimizer and batches of one LGKD-protocol step-1 iteration, as run.py sets them up."""
    cuda = device.type == "cuda"
    opts = testing.build_opts(
        step=1, device=device.type, method=method, precision=precision,
        memory_format="channels_last" if cuda else "contiguous", **sizes,
    )  # fmt: skip
    model, model_old = (copy.deepcopy(m).to(device) for m in cpu_models)
    if cuda:  # run.py's default layout on CUDA (--memory_format auto)
        model, model_old = (m.to(memory_format=torch.channels_last) for m in (model, model_old))
    # The Trainer runs the CPU in fp32; exercise autocast there anyway, as the benchmarks do.
    autocast = None if cuda else testing.autocast_setting(precision)
    trainer = Trainer(
        model, model_old, device, opts, None, classes=testing.step_classes(opts, 1), step=1, autocast=autocast
    )
    if cuda:
        assert trainer.amp_enabled == (precision != "fp32")
    labels_now, _ = testing.seen_labels(opts, 1)
    batches = testing.synthetic_batches(1, sizes["batch"], sizes["crop"], labels_now, seed=3, pin=cuda)
    trainer.before(batches)  # PLOP/LGKD entropy thresholds
    # CUDA: run.py's own choice (fused SGD exactly when the loss is scaled); CPU: the same choice by hand.
    optim = build_optimizer(opts, model, fused=None if cuda else precision == "fp16")
    assert all(bool(g["fused"]) == (precision == "fp16") for g in optim.param_groups)
    return {"trainer": trainer, "optim": optim, "batches": batches, "model": model}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("method", METHODS)
def test_one_iteration_of_every_method_is_finite(
    method: str, precision: str, device: torch.device, sizes: dict, cpu_models: tuple, record_property
) -> None:
    if device.type == "cpu" and precision == "fp16" and method not in CPU_METHODS:
        pytest.skip(f"standing in on the CPU, where fp16 autocast is slow: {CPU_METHODS} cover fp16")
    setup = _step1(method, precision, device, sizes, cpu_models)
    trainer, batches = setup["trainer"], setup["batches"]
    # Trainer.train checks the sum of the loss terms at the end of the loop (TrainingError if non-finite).
    class_loss, reg_loss = trainer.train(0, setup["optim"], batches)
    record_property("losses", json.dumps({"class": round(class_loss, 6), "reg": round(reg_loss, 6)}))
    assert math.isfinite(class_loss) and math.isfinite(reg_loss)
    assert all(torch.isfinite(p).all() for p in setup["model"].parameters())
    if precision == "fp16":
        # The scale starts at 2**16 and halves on every overflowing step; it must stay a usable number.
        assert 1.0 <= trainer.scaler.get_scale() <= 2.0**16


@pytest.mark.parametrize("method", METHODS)
def test_fp32_losses_on_the_device_match_the_cpu(
    method: str, device: torch.device, sizes: dict, cpu_models: tuple, record_property
) -> None:
    """Same weights, same batch, one fp32 iteration on the device and on the CPU: every loss term and the
    SGD update agree (what differs is only the order of floating-point sums)."""
    if device.type == "cpu" and method not in CPU_METHODS:
        pytest.skip(f"standing in on the CPU, which it would compare with itself: {CPU_METHODS} run the code")
    runs = []
    with ieee_fp32():
        for where in (torch.device("cpu"), device):
            setup = _step1(method, "fp32", where, sizes, cpu_models)
            images, labels = setup["batches"][0]
            losses = setup["trainer"]._train_step(images, labels, setup["optim"])
            runs.append(
                {
                    "losses": {k: float(v.detach()) for k, v in losses.items()},
                    "update": _update(setup, cpu_models),
                }
            )
    ref, got = runs
    assert got["losses"].keys() == ref["losses"].keys()
    diffs = {k: abs(got["losses"][k] - v) / max(abs(v), LOSS_ATOL) for k, v in ref["losses"].items()}
    update_error = relative_error(got["update"], ref["update"])
    record_property("loss_rel_diff", json.dumps({k: f"{v:.2e}" for k, v in diffs.items()}))
    record_property("update_rel_diff", f"{update_error:.2e}")
    for name, value in ref["losses"].items():
        assert math.isfinite(value), name
        assert got["losses"][name] == pytest.approx(value, rel=LOSS_RTOL, abs=LOSS_ATOL), name
    assert ref["update"].abs().max() > 0  # the step moved the weights
    assert update_error < UPDATE_RTOL


def _update(setup: dict[str, Any], cpu_models: tuple) -> torch.Tensor:
    """All parameters of the trained model minus their initial values (the copied CPU model), flattened."""
    start = cpu_models[0].parameters()
    return torch.cat([(p.detach().cpu() - p0).flatten() for p, p0 in zip(setup["model"].parameters(), start)])


def test_loss_scaled_step_skips_an_overflowing_step(device: torch.device) -> None:
    """fp16 on CUDA (GradScaler + fused SGD, the real --opt_level O1 path): an overflowing iteration
    changes no weight and no momentum, without a host read, and the scale backs off."""
    check_overflowing_step_is_skipped(device)


def test_training_after_an_overflowing_first_step_matches_a_clean_start(
    device: torch.device, sizes: dict, cpu_models: tuple
) -> None:
    """The first loss-scaled step overflows and is skipped; the next step must then make the update of a
    run that started with that step (no momentum left by the skipped one)."""
    updates = []
    for skip_first in (True, False):
        setup = _step1("FT", "fp16", device, sizes, cpu_models)
        trainer, optim = setup["trainer"], setup["optim"]
        trainer.scaler = torch.amp.GradScaler(device.type, init_scale=3.0e38 if skip_first else 1024.0)
        if skip_first:
            trainer._train_step(*setup["batches"][0], optim)  # the scaled loss overflows: step skipped
            assert trainer.scaler.get_scale() == pytest.approx(1.5e38)
            trainer.scaler.update(torch.tensor(1024.0, device=device))
        trainer._train_step(*setup["batches"][0], optim)
        updates.append(_update(setup, cpu_models))
    skipped, clean = updates
    assert torch.isfinite(skipped).all()
    assert clean.abs().max() > 0 and relative_error(skipped, clean) < 1e-3


def _metric_batches(n_classes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(uint8 labels with 255 bands and classes the metric does not know, long predictions) batches."""
    generator = torch.Generator().manual_seed(5)
    batches = []
    for b in range(4):
        labels = torch.randint(0, n_classes + 2, (2, 37, 53), generator=generator, dtype=torch.uint8)
        labels[:, :, 10 + b : 14 + b] = 255
        preds = torch.randint(0, n_classes, labels.shape, generator=generator)
        preds[0, 0] = labels[0, 0].long().clamp_max(n_classes - 1)  # some agreement on the diagonal
        batches.append((labels, preds))
    return batches


def test_metrics_on_the_device_equal_the_cpu(device: torch.device) -> None:
    n_classes = 17
    on_cpu = StreamSegMetrics(n_classes, device="cpu")
    on_device = StreamSegMetrics(n_classes, device=device)
    for labels, preds in _metric_batches(n_classes):
        on_cpu.update(labels, preds)
        on_device.update(labels.to(device), preds.to(device))
    on_cpu.synch()
    on_device.synch()
    assert on_device.confusion_matrix.device.type == device.type
    assert torch.equal(on_device.confusion_matrix.cpu(), on_cpu.confusion_matrix)
    ref, got = on_cpu.get_results(), on_device.get_results()
    assert got.keys() == ref.keys()
    for key, value in ref.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
        elif isinstance(value, float) and math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == value, key


def test_metrics_on_the_device_refuse_out_of_range_predictions(device: torch.device) -> None:
    """On the CPU a bad batch is refused at update(); on a GPU, without a host read, at synch() at the
    latest. Either way no result comes out of it."""
    metrics = StreamSegMetrics(5, device=device)
    labels = torch.zeros(1, 4, 4, dtype=torch.uint8, device=device)
    preds = torch.full((1, 4, 4), 7, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="outside"):
        metrics.update(labels, preds)
        metrics.synch()


@pytest.mark.parametrize("norm_act", ["iabn_sync", "iabn"])
def test_inplace_abn_package_matches_the_default_layer(
    norm_act: str, device: torch.device, record_property
) -> None:
    if device.type != "cuda":
        pytest.skip("--abn_impl inplace_abn is used on CUDA only (the CPU falls back to the default layer)")
    pytest.importorskip("inplace_abn", reason="the optional inplace_abn package is not installed")
    torch.manual_seed(0)
    built = {}
    for impl in ("torch", "inplace_abn"):
        opts = testing.build_opts(
            step=0, backbone="resnet50", crop=64, batch=4, device="cuda", norm_act=norm_act,
            abn="inplace_abn" if impl == "inplace_abn" else "torch",
        )  # fmt: skip
        built[impl] = make_model(opts, classes=testing.step_classes(opts, 0)).to(device)
    result = built["inplace_abn"].load_state_dict(built["torch"].state_dict(), strict=False)
    # The compiled layers may lack the batch counter; every weight and running statistic must load.
    assert all(k.endswith("num_batches_tracked") for k in [*result.missing_keys, *result.unexpected_keys])
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(device)
    errors = {}
    with ieee_fp32():
        for mode in ("eval", "train"):
            outputs, grads = {}, {}
            for impl, model in built.items():
                model.train(mode == "train")
                x = images.clone().requires_grad_(True)
                logits, _ = model(x)
                logits.square().mean().backward()
                outputs[impl], grads[impl] = logits.detach(), x.grad
                model.zero_grad(set_to_none=True)
            errors[mode] = relative_error(outputs["inplace_abn"], outputs["torch"])
            errors[f"{mode}_grad"] = relative_error(grads["inplace_abn"], grads["torch"])
    record_property("rel_diff", json.dumps({k: f"{v:.2e}" for k, v in errors.items()}))
    assert errors["eval"] < IABN_RTOL["eval"] and errors["train"] < IABN_RTOL["train"]
    assert errors["eval_grad"] < IABN_RTOL["grad"] and errors["train_grad"] < IABN_RTOL["grad"]
