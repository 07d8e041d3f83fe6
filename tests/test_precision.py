"""Numerical correctness of the fast paths against plain fp32 on the CPU.

* channels_last (input and weights) gives the same logits, intermediate features and gradients as the
  contiguous model (only the summation order of the convolutions differs);
* a bf16 autocast forward stays close to the fp32 forward (loose tolerance: bf16 keeps 8 mantissa bits);
* the loss terms compute in fp32 even when the model outputs are bf16 (RN-31: softmax / log-softmax /
  LSE and the POD powers and norms in fp32): the loss of bf16 inputs equals the loss of the same values
  cast to fp32, and is an fp32 tensor.

Small models (ResNet-18 body, DeepLabV3 head, output stride 16, 64x64 inputs) keep the file fast.
"""

from __future__ import annotations

import argparse
import copy
import math

import pytest
import torch

from argparser import get_argparser, modify_command_options
from segmentation_module import make_model
from utils.loss_terms import StepBatch, StepInfo, build_loss_terms
from utils.pseudo_label import PseudoLabeler

CROP = 64
BATCH = 2
CLASSES_STEP1 = [16, 5]  # VOC 15-5: 16 classes at step 0 (background included), 5 at step 1


def lgkd_opts(step: int = 1, norm_act: str = "iabn_sync"):
    """Resolved options of ``--method LGKD`` on VOC 15-5 with a tiny backbone and no pretrained weights."""
    argv = [
        "--method",
        "LGKD",
        "--dataset",
        "voc",
        "--task",
        "15-5",
        "--step",
        str(step),
        "--backbone",
        "resnet18",
        "--norm_act",
        norm_act,
        "--no_pretrained",
        "--device",
        "cpu",
        "--crop_size",
        str(CROP),
        "--batch_size",
        str(BATCH),
        "--prev_kd",
        "5",
        "--novel_kd",
        "1",
    ]
    return modify_command_options(get_argparser().parse_args(argv))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in fp64."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def flatten_features(features: dict) -> dict[str, torch.Tensor]:
    """The tensors of a model's intermediate dict, attentions numbered."""
    out = {k: v for k, v in features.items() if torch.is_tensor(v)}
    out.update({f"attentions.{i}": a for i, a in enumerate(features.get("attentions", []))})
    return out


def synthetic_labels(generator: torch.Generator, classes: list[int]) -> torch.Tensor:
    """(B, H, W) long labels: background, rectangles of ``classes`` and a 255 band around them."""
    labels = torch.zeros(BATCH, CROP, CROP, dtype=torch.long)
    for b in range(BATCH):
        for k, cls in enumerate(classes[:2]):
            top, left = 6 + 24 * k, 8 + 20 * b
            labels[b, top - 2 : top + 18, left - 2 : left + 22] = 255
            labels[b, top : top + 16, left : left + 20] = cls
    return labels


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(BATCH, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("norm_act", ["iabn_sync", "std"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_matches_contiguous(images: torch.Tensor, norm_act: str, training: bool) -> None:
    torch.manual_seed(0)
    model = make_model(lgkd_opts(norm_act=norm_act), classes=CLASSES_STEP1)
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    model.train(training)
    model_cl.train(training)

    x = images.clone().requires_grad_(True)
    x_cl = images.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    logits, features = model(x, ret_intermediate=True)
    logits_cl, features_cl = model_cl(x_cl, ret_intermediate=True)

    # fp32 summation-order differences are ~1e-7 relative per layer. In training mode the batch norms
    # amplify them where they normalise few values (the head's image-pooling branch: 2 values per channel
    # at batch 2), hence the looser bound; measured: ~3e-7 (eval) and ~4e-5 (train).
    tolerance = 5e-4 if training else 1e-5
    assert logits_cl.shape == logits.shape
    assert relative_error(logits_cl, logits) < tolerance
    ref, got = flatten_features(features), flatten_features(features_cl)
    assert ref.keys() == got.keys()
    for name in ref:
        assert relative_error(got[name], ref[name]) < tolerance, name

    # Gradients through the whole network (input and first convolution) agree as well.
    (logits.square().mean() + features["sem_logits_small"].mean()).backward()
    (logits_cl.square().mean() + features_cl["sem_logits_small"].mean()).backward()
    assert relative_error(x_cl.grad, x.grad) < 10 * tolerance
    conv1, conv1_cl = model.body.mod1.conv1.weight.grad, model_cl.body.mod1.conv1.weight.grad
    assert relative_error(conv1_cl, conv1) < 10 * tolerance

    if training:  # the batch statistics were the same: so are the running statistics
        bn, bn_cl = model.body.mod1.bn1, model_cl.body.mod1.bn1
        torch.testing.assert_close(bn_cl.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn_cl.running_var, bn.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_bf16_autocast_forward_close_to_fp32(
    images: torch.Tensor, memory_format: torch.memory_format
) -> None:
    torch.manual_seed(0)
    model = make_model(lgkd_opts(), classes=CLASSES_STEP1).to(memory_format=memory_format)
    # Evaluation mode: training-mode batch norm over 2 values per channel (the image-pooling branch at
    # batch 2) turns bf16 rounding into O(1) changes and says nothing about the autocast path itself.
    model.eval()
    x = images.contiguous(memory_format=memory_format)
    with torch.no_grad():
        logits, features = model(x, ret_intermediate=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_bf16, features_bf16 = model(x, ret_intermediate=True)

    assert logits_bf16.dtype in (torch.bfloat16, torch.float32)
    assert torch.isfinite(logits_bf16.float()).all()
    # bf16 keeps 8 significant bits (2**-9 relative rounding); measured ~5e-3 through the network.
    assert relative_error(logits_bf16, logits) < 0.03
    cos = torch.nn.functional.cosine_similarity(
        logits_bf16.double().flatten(), logits.double().flatten(), dim=0
    )
    assert cos > 0.999
    ref, got = flatten_features(features), flatten_features(features_bf16)
    for name in ref:
        assert relative_error(got[name], ref[name]) < 0.03, name


def _lgkd_batches() -> tuple[StepInfo, argparse.Namespace, dict[str, StepBatch]]:
    """One LGKD step-1 batch from real (tiny) models, as fp32 and as bf16 tensors."""
    torch.manual_seed(0)
    opts = lgkd_opts(step=1)
    info = StepInfo.from_classes(1, CLASSES_STEP1, opts.num_classes, opts.dataset)
    model = make_model(opts, classes=CLASSES_STEP1).eval()
    model_old = make_model(lgkd_opts(step=0), classes=CLASSES_STEP1[:1]).eval()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(BATCH, 3, CROP, CROP, generator=generator)
    with torch.no_grad():
        outputs, features = model(x, ret_intermediate=True)
        outputs_old, features_old = model_old(x, ret_intermediate=True)
    labels = synthetic_labels(generator, [16, 18])
    thresholds = torch.full((info.current_classes,), 0.01)
    labeler = PseudoLabeler(
        "entropy",
        info.old_classes,
        thresholds=thresholds,
        max_entropy=math.log(info.current_classes),
        classif_adaptive_factor=True,
    )

    def cast(value, dtype):
        if torch.is_tensor(value):
            return value.to(dtype) if value.is_floating_point() else value
        if isinstance(value, list):
            return [cast(v, dtype) for v in value]
        if isinstance(value, dict):
            return {k: cast(v, dtype) for k, v in value.items()}
        return value

    batches = {}
    for name, dtype, back in (
        ("bf16", torch.bfloat16, None),
        ("bf16_as_fp32", torch.bfloat16, torch.float32),
    ):
        out, feat = cast(outputs, dtype), cast(features, dtype)
        out_old, feat_old = cast(outputs_old, dtype), cast(features_old, dtype)
        if back is not None:
            out, feat = cast(out, back), cast(feat, back)
            out_old, feat_old = cast(out_old, back), cast(feat_old, back)
        pseudo = labeler(labels, out_old.float())
        batches[name] = StepBatch(
            images=x,
            labels=pseudo.labels,
            original_labels=labels,
            outputs=out,
            features=feat,
            outputs_old=out_old,
            features_old=feat_old,
            pseudo=pseudo,
        )
    return info, opts, batches


def test_loss_terms_compute_in_fp32_with_bf16_inputs() -> None:
    info, opts, batches = _lgkd_batches()
    terms = build_loss_terms(opts, info, 16)
    assert {"ce", "kd", "pod"} <= set(terms.keys())  # the LGKD preset: CE (pseudo-labels), LGKD, POD
    for name, term in terms.items():
        loss_bf16 = term(batches["bf16"])
        loss_ref = term(batches["bf16_as_fp32"])
        assert loss_bf16.dtype == torch.float32, f"{name} returned {loss_bf16.dtype}"
        assert torch.isfinite(loss_ref), name
        # Same input values: an fp32 computation gives the same result up to fp32 rounding; a bf16 one
        # would be off by ~1e-2 relative.
        torch.testing.assert_close(loss_bf16, loss_ref, rtol=1e-4, atol=1e-7, msg=f"loss term {name}")
        validation = term.validation_loss(batches["bf16"])
        if validation is not None:
            assert validation.dtype == torch.float32, f"{name} validation returned {validation.dtype}"
            torch.testing.assert_close(
                validation,
                term.validation_loss(batches["bf16_as_fp32"]),
                rtol=1e-4,
                atol=1e-7,
                msg=f"validation loss {name}",
            )


def test_loss_terms_backward_gives_fp32_free_finite_gradients() -> None:
    """Backward through the terms from bf16 logits reaches the bf16 leaves with finite gradients."""
    info, opts, batches = _lgkd_batches()
    terms = build_loss_terms(opts, info, 16)
    batch = batches["bf16"]
    outputs = batch.outputs.detach().requires_grad_(True)
    small = batch.features["sem_logits_small"].detach().requires_grad_(True)
    features = {**batch.features, "sem_logits_small": small}
    batch = StepBatch(**{**vars(batch), "outputs": outputs, "features": features})
    total = torch.stack([term(batch) for term in terms.values()]).sum()
    total.backward()
    assert outputs.grad is not None and outputs.grad.dtype == torch.bfloat16
    assert torch.isfinite(outputs.grad.float()).all()
    assert small.grad is not None and torch.isfinite(small.grad.float()).all()


@pytest.mark.parametrize(
    ("precision", "dtype", "scaled"),
    [("fp32", torch.float32, False), ("bf16", torch.bfloat16, False), ("fp16", torch.float16, True)],
)
def test_trainer_takes_its_autocast_setting_as_an_argument(precision, dtype, scaled) -> None:
    """``Trainer(..., autocast=...)`` is the seam the benchmarks and the GPU tests use to run CPU autocast
    (the options alone give fp32 on the CPU); the loss scaler follows it: on for fp16 only."""
    import testing
    from metrics import StreamSegMetrics
    from train import Trainer

    opts = testing.build_opts(step=0, backbone="resnet18", crop=32, batch=2, device="cpu", method="FT",
                              precision=precision)  # fmt: skip
    model, _ = testing.build_models(opts, 0, torch.device("cpu"))
    classes = testing.step_classes(opts, 0)
    default = Trainer(model, None, torch.device("cpu"), opts, None, classes=classes)
    assert not default.amp_enabled and not default.scaler.is_enabled()  # --opt_level O1 runs fp32 on CPU

    trainer = Trainer(model, None, torch.device("cpu"), opts, None, classes=classes,
                      autocast=testing.autocast_setting(precision))  # fmt: skip
    assert trainer.amp_enabled == (precision != "fp32") and trainer.scaler.is_enabled() == scaled
    seen: list[torch.dtype] = []
    model.cls[0].register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))  # a conv
    batches = testing.synthetic_batches(1, 2, 32, testing.seen_labels(opts, 0)[0])
    trainer.validate(batches, StreamSegMetrics(sum(classes)))
    assert seen == [dtype]
    with pytest.raises(ValueError, match="precision"):
        testing.autocast_setting("fp8")
