"""Loss terms and their builder (reference ``train.py`` ``Trainer``): the terms of every method preset, hand
values of the composed classification/KD terms, LGKD label downsampling, validation variants."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import argparser
from utils.errors import OptionsError
from utils.loss import LabelGuidedKnowledgeDistillationLoss, UnbiasedCrossEntropy
from utils.loss_terms import (
    REFERENCE_LOG_NAMES,
    ClassificationTerm,
    EntropyMinTerm,
    ICaRLTerm,
    OutputKDTerm,
    StepBatch,
    StepInfo,
    build_criterion,
    build_loss_terms,
    downsample_labels,
    needs_intermediate,
    needs_old_outputs,
)
from utils.pseudo_label import PseudoLabeler, PseudoLabels

LN2 = math.log(2)


def make_opts(*args: str) -> argparse.Namespace:
    return argparser.modify_command_options(argparser.get_argparser().parse_args(list(args)))


def voc_15_5(step: int = 1) -> StepInfo:
    return StepInfo.from_classes(step, [16, 5][: step + 1], 21, "voc")


# --- StepInfo ---------------------------------------------------------------------------------------------


def test_step_info_from_classes():
    info = StepInfo.from_classes(2, [16, 1, 1], 21, "voc")  # VOC 15-5s, step 2
    assert (info.old_classes, info.current_classes, info.new_classes) == (17, 18, 1)
    assert info.has_old_model and info.distill
    city = StepInfo.from_classes(1, [19, 19], 19, "cityscapes_domain")
    assert (city.old_classes, city.current_classes, city.new_classes, city.num_classes) == (19, 19, 19, 19)
    test_mode = StepInfo.from_classes(1, None, 21, "voc")
    assert test_mode.old_classes == 0 and not test_mode.distill
    assert not StepInfo.from_classes(0, [16], 21, "voc").distill
    with pytest.raises(AttributeError):
        info.step = 3  # frozen


def test_reference_log_names():
    assert REFERENCE_LOG_NAMES == {
        "ce": "CE",
        "kd": "LKD",
        "de": "LDE",
        "reg": "LReg",
        "pod": "POD",
        "entmin": "EntMin",
        "icarl": "LICaRL",
    }


# --- presets ----------------------------------------------------------------------------------------------

PRESET_TERMS = {
    "FT": ["ce"],
    "LWF": ["ce", "kd"],
    "LWF-MC": ["ce", "icarl"],
    "ILT": ["ce", "kd", "de"],
    "EWC": ["ce"],
    "RW": ["ce"],
    "PI": ["ce"],
    "MiB": ["ce", "kd"],
    "PLOP": ["ce", "pod"],
    "LGKD": ["ce", "kd", "pod"],
}


@pytest.mark.parametrize("method", list(PRESET_TERMS))
def test_preset_terms(method):
    opts = make_opts("--method", method, "--step", "1")
    assert list(build_loss_terms(opts, voc_15_5(1), 16)) == PRESET_TERMS[method]
    assert list(build_loss_terms(opts, voc_15_5(0), 16)) == ["ce"]
    assert list(build_loss_terms(opts, StepInfo.from_classes(1, None, 21, "voc"), 16)) == ["ce"]


def test_preset_criteria_and_kd_losses():
    info = voc_15_5(1)
    mib = build_loss_terms(make_opts("--method", "MiB"), info, 16)
    assert isinstance(mib["ce"].criterion, UnbiasedCrossEntropy) and mib["ce"].criterion.old_cl == 16
    assert type(mib["kd"].loss).__name__ == "UnbiasedKnowledgeDistillationLoss"
    lgkd = build_loss_terms(make_opts("--method", "LGKD", "--prev_kd", "5", "--novel_kd", "0.5"), info, 16)
    assert isinstance(lgkd["kd"].loss, LabelGuidedKnowledgeDistillationLoss)
    assert (lgkd["kd"].loss.prev_kd, lgkd["kd"].loss.novel_kd, lgkd["kd"].weight) == (5.0, 0.5, 1.0)
    assert isinstance(lgkd["ce"].criterion, nn.CrossEntropyLoss)
    assert lgkd["pod"].pod_kwargs["pod_factor"] == 0.01
    ade = build_loss_terms(
        make_opts("--method", "LGKD", "--dataset", "ade"), StepInfo.from_classes(1, [101, 50], 151, "ade"), 16
    )
    assert ade["pod"].pod_kwargs["pod_factor"] == 0.001
    assert ade["pod"].pod_kwargs["pod_options"]["switch"]["after"]["factor"] == 0.00001
    lwf_mc = build_loss_terms(make_opts("--method", "LWF-MC"), info, 16)
    assert type(lwf_mc["ce"].criterion).__name__ == "BCEWithLogitsLossWithIgnoreIndex"
    assert (
        type(build_loss_terms(make_opts("--method", "LWF"), info, 16)["kd"].loss).__name__
        == "KnowledgeDistillationLoss"
    )


@pytest.mark.parametrize("method", list(PRESET_TERMS))
def test_needs_old_outputs_and_intermediate(method):
    opts = make_opts("--method", method)
    uses_old = method in ("LWF", "LWF-MC", "ILT", "MiB", "PLOP", "LGKD")
    assert needs_old_outputs(opts, voc_15_5(1)) == uses_old
    assert not needs_old_outputs(opts, voc_15_5(0))
    assert needs_intermediate(opts) == (method in ("ILT", "PLOP", "LGKD"))


def test_lgkd_without_pod_still_gets_small_logits():
    # RN-14 fixed: --lgkd alone needs the intermediate features.
    opts = make_opts("--lgkd", "--loss_kd", "1")
    assert needs_intermediate(opts)
    assert not needs_intermediate(make_opts("--lgkd"))  # loss_kd = 0: no KD term


def test_criterion_chain_first_match():
    info = voc_15_5(1)
    assert (
        type(build_criterion(make_opts("--bce", "--unce"), info)).__name__
        == "BCEWithLogitsLossWithIgnoreIndex"
    )
    assert isinstance(build_criterion(make_opts("--unce"), info), UnbiasedCrossEntropy)
    assert isinstance(build_criterion(make_opts("--unce"), voc_15_5(0)), nn.CrossEntropyLoss)
    assert type(build_criterion(make_opts("--focal_loss"), info)).__name__ == "FocalLoss"
    focal_new = build_criterion(make_opts("--focal_loss_new"), info)
    assert type(focal_new).__name__ == "FocalLossNew" and focal_new.index == 16
    with pytest.raises(OptionsError):
        build_criterion(make_opts("--nca"), info)  # no cosine scalar
    model = nn.Module()
    model.scalar = nn.Parameter(torch.tensor(2.0))
    assert type(build_criterion(make_opts("--nca"), info, model)).__name__ == "UnbiasedNCA"
    assert type(build_criterion(make_opts("--nca"), voc_15_5(0), model)).__name__ == "NCA"


def test_refused_combinations():
    with pytest.raises(OptionsError):
        build_loss_terms(make_opts("--loss_kd", "1", "--exkd_gt"), voc_15_5(1), 16)
    with pytest.raises(OptionsError):
        build_loss_terms(make_opts("--ce_on_pseudo", "--pseudo", "naive"), voc_15_5(1), 16)


# --- composed values --------------------------------------------------------------------------------------


def zeros_batch(labels: torch.Tensor, channels: int, **kw) -> StepBatch:
    outputs = torch.zeros(labels.shape[0], channels, *labels.shape[1:], requires_grad=True)
    return StepBatch(images=torch.zeros(1), labels=labels, original_labels=labels, outputs=outputs, **kw)


def test_ce_mean_over_all_pixels_including_ignored():
    # Zero logits over 2 classes: CE ln 2 on labelled pixels, 0 on 255; mean over 4 pixels (RN-04).
    labels = torch.tensor([[[0, 1], [255, 255]]])
    term = ClassificationTerm(nn.CrossEntropyLoss(ignore_index=255, reduction="none"))
    assert math.isclose(term(zeros_batch(labels, 2)).item(), 2 * LN2 / 4, rel_tol=1e-6)
    # Per-image adaptive factor (B, 1, 1): image 0 x 0.5, image 1 x 1.
    labels2 = torch.zeros(2, 1, 2, dtype=torch.long)
    pseudo = PseudoLabels(
        labels2, labels2 < 1, classif_adaptive_factor=torch.tensor([0.5, 1.0]).view(2, 1, 1)
    )
    value = term(zeros_batch(labels2, 2, pseudo=pseudo)).item()
    assert math.isclose(value, (0.5 * LN2 * 2 + LN2 * 2) / 4, rel_tol=1e-6)
    # Validation: plain mean of the criterion, no factor.
    assert math.isclose(
        term.validation_loss(zeros_batch(labels2, 2, pseudo=pseudo)).item(), LN2, rel_tol=1e-6
    )


def test_ce_sample_weights_new_weights_every_pixel():
    # RN-18: --sample_weights_new 3 multiplies every pixel, not only new ones.
    labels = torch.tensor([[[0, 1]]])
    term = ClassificationTerm(nn.CrossEntropyLoss(ignore_index=255, reduction="none"), sample_weights_new=3.0)
    assert math.isclose(term(zeros_batch(labels, 2)).item(), 3 * LN2, rel_tol=1e-6)


def test_ce_on_new_and_ce_on_pseudo():
    labels = torch.tensor([[[0, 1]]])
    ce = nn.CrossEntropyLoss(ignore_index=255, reduction="none")
    assert math.isclose(
        ClassificationTerm(ce, ce_on_new=True)(zeros_batch(labels, 2)).item(), LN2 / 2, rel_tol=1e-6
    )
    # ce_on_pseudo with UNCE(C_old = 2), 3 channels, zero logits. Pixel 0 (bg, confident, ŷ = 1): CE on the
    # pseudo label = ln 3. Pixel 1 (label 2, new): UNCE = -ln(1/3) = ln 3. Mean = ln 3.
    labels = torch.tensor([[[0, 2]]])
    pseudo = PseudoLabels(
        labels=torch.tensor([[[1, 2]]]),
        mask_background=torch.tensor([[[True, False]]]),
        mask_valid=torch.tensor([[[True, True]]]),
        pseudo_targets=torch.tensor([[[1, 0]]]),
    )
    term = ClassificationTerm(UnbiasedCrossEntropy(old_cl=2, reduction="none"), ce_on_pseudo=True)
    assert math.isclose(term(zeros_batch(labels, 3, pseudo=pseudo)).item(), math.log(3), rel_tol=1e-6)


def test_kd_term_weight_schedule_and_unweighted_validation():
    opts = make_opts("--loss_kd", "10", "--kd_scheduling")
    info = voc_15_5(1)  # C_new 21, N_new 5
    term = OutputKDTerm.from_opts(opts, info, 16)
    torch.manual_seed(0)
    z, z_old = torch.randn(1, 21, 2, 2), torch.randn(1, 16, 2, 2)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    batch = StepBatch(torch.zeros(1), labels, labels, z, outputs_old=z_old)
    plain = term.loss(z, z_old)
    assert math.isclose(term(batch).item(), 10 * plain.item() * math.sqrt(21 / 5), rel_tol=1e-6)
    assert math.isclose(term.validation_loss(batch).item(), plain.item(), rel_tol=1e-6)


def test_lgkd_term_uses_small_logits_and_label_at_stride():
    # 32×32 labels, OS 16 -> 2×2 small logits with T[i, j] = label[16 i, 16 j]. The pixels sampled are new
    # class 2 at (0, 0), 255 at (16, 16); neighbours are 0 so a different sampling changes the value.
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[0, 0, 0], labels[0, 16, 16] = 2, 255
    small = downsample_labels(labels, 16, (2, 2))
    assert small.tolist() == [[[2, 0], [0, 255]]]
    torch.manual_seed(0)
    z_small, z_old_small = torch.randn(1, 3, 2, 2), torch.randn(1, 2, 2, 2)
    info = StepInfo.from_classes(1, [2, 1], 3, "voc")
    term = OutputKDTerm.from_opts(make_opts("--lgkd", "--loss_kd", "1"), info, 16)
    batch = StepBatch(
        torch.zeros(1),
        labels,
        labels,
        outputs=torch.randn(1, 3, 32, 32),
        features={"sem_logits_small": z_small},
        outputs_old=torch.randn(1, 2, 32, 32),
        features_old={"sem_logits_small": z_old_small},
    )
    expected = LabelGuidedKnowledgeDistillationLoss()(z_small, z_old_small, small)
    assert math.isclose(term(batch).item(), expected.item(), rel_tol=1e-6)
    # Validation: full-resolution logits and labels.
    full = LabelGuidedKnowledgeDistillationLoss()(batch.outputs, batch.outputs_old, labels)
    assert math.isclose(term.validation_loss(batch).item(), full.item(), rel_tol=1e-6)
    # Output stride 8 (RN-13 fixed): label[8 i, 8 j] on 4×4 logits; a non-multiple size falls back to size=.
    assert downsample_labels(labels, 8, (4, 4))[0, 2, 2].item() == 255
    assert downsample_labels(labels[:, :31, :31], 16, (2, 2)).shape == (1, 2, 2)


def test_lgkd_term_with_a_single_novel_pixel_on_the_label_grid():
    """Exactly one novel pixel on the 1/16 grid of a two-image batch (many more off the grid): the
    reference's LGKD crashes there under current torch ("refer to a single memory location"); kept working
    here, with the value of an ordinary novel pixel, and it backpropagates."""
    labels = torch.zeros(2, 32, 32, dtype=torch.long)
    labels[0, 1:16, 1:16] = 2  # novel, but never sampled: the grid is label[16 i, 16 j]
    labels[1, 16:, 16:] = 2  # one grid point, (1, 1) of image 1
    small = downsample_labels(labels, 16, (2, 2))
    assert (small == 2).sum().item() == 1 and small[1, 1, 1].item() == 2
    torch.manual_seed(0)
    z_small = torch.randn(2, 3, 2, 2, requires_grad=True)
    z_old_small = torch.randn(2, 2, 2, 2)
    info = StepInfo.from_classes(1, [2, 1], 3, "voc")
    term = OutputKDTerm.from_opts(
        make_opts("--lgkd", "--loss_kd", "1", "--prev_kd", "5", "--novel_kd", "1"), info, 16
    )
    batch = StepBatch(
        torch.zeros(2),
        labels,
        labels,
        outputs=torch.randn(2, 3, 32, 32),
        features={"sem_logits_small": z_small},
        outputs_old=torch.randn(2, 2, 32, 32),
        features_old={"sem_logits_small": z_old_small},
    )
    value = term(batch)
    # By hand: 7 previous pixels (weight 5) and the novel one (weight 1) with q̃ = [0, q_1, q_0].
    log_p = torch.log_softmax(z_small.detach(), dim=1)
    q = torch.softmax(z_old_small, dim=1)
    total = 0.0
    for b in range(2):
        for i in range(2):
            for j in range(2):
                if small[b, i, j] == 2:
                    target = torch.stack([torch.tensor(0.0), q[b, 1, i, j], q[b, 0, i, j]])
                    total -= 1.0 * (target * log_p[b, :, i, j]).sum().item()
                else:
                    total -= 5.0 * (q[b, :, i, j] * log_p[b, :2, i, j]).sum().item()
    assert math.isclose(value.item(), total / 8, rel_tol=1e-6)
    value.backward()
    assert torch.isfinite(z_small.grad).all() and z_small.grad[1, :, 1, 1].abs().sum() > 0


def test_icarl_and_entmin_terms():
    # iCaRL: zero logits, old logits 0 -> BCE(0, 1/2) = ln 2 per element; x importance x C_old.
    z, z_old = torch.zeros(1, 3, 1, 1), torch.zeros(1, 2, 1, 1)
    labels = torch.zeros(1, 1, 1, dtype=torch.long)
    batch = StepBatch(torch.zeros(1), labels, labels, z, outputs_old=z_old)
    assert math.isclose(ICaRLTerm(10.0)(batch).item(), 10 * 2 * LN2, rel_tol=1e-6)
    # Validation: the reference adds the *weighted* term to the reg loss (LWF-MC logged 0 here before).
    assert math.isclose(ICaRLTerm(10.0).validation_loss(batch).item(), 10 * 2 * LN2, rel_tol=1e-6)
    assert ICaRLTerm(10.0).validation_loss(StepBatch(torch.zeros(1), labels, labels, z)) is None
    # Old logits [0, ln 3] -> sigmoid [1/2, 3/4]; new logits [ln 3, 0, 5] (the new class is not used):
    # BCE(ln 3, 1/2) = ln 4 - ln 3 / 2, BCE(0, 3/4) = ln 2; mean over C_old = 2 classes, x 2 x 10.
    z = torch.tensor([math.log(3), 0.0, 5.0]).view(1, 3, 1, 1)
    z_old = torch.tensor([0.0, math.log(3)]).view(1, 2, 1, 1)
    batch = StepBatch(torch.zeros(1), labels, labels, z, outputs_old=z_old)
    expected = 10 * 2 * ((math.log(4) - math.log(3) / 2) + LN2) / 2
    assert math.isclose(ICaRLTerm(10.0).validation_loss(batch).item(), expected, rel_tol=1e-6)
    # Entropy min: uniform over 4 channels -> E = 1/4 on unlabelled pixels; image without such pixels -> 0.
    labels = torch.tensor([[[0, 3]], [[2, 255]]])
    batch = StepBatch(torch.zeros(1), labels, labels, torch.zeros(2, 4, 1, 2))
    assert math.isclose(EntropyMinTerm()(batch).item(), (0.25 + 0.0) / 2, rel_tol=1e-5)


# --- every preset end to end on tiny tensors --------------------------------------------------------------


def tiny_step_batch(info: StepInfo, opts: argparse.Namespace) -> tuple[StepBatch, list[torch.Tensor]]:
    torch.manual_seed(0)
    b, size, os = 2, 32, 16
    h = size // os
    c_new, c_old = info.current_classes, info.old_classes
    small = torch.randn(b, c_new, h, h, requires_grad=True)
    attentions = [torch.randn(b, 4, h, h, requires_grad=True) for _ in range(5)]
    body = torch.randn(b, 6, h, h, requires_grad=True)
    outputs = F.interpolate(small, size=(size, size), mode="bilinear", align_corners=False)
    features = {"body": body, "attentions": attentions, "sem_logits_small": small}
    small_old = torch.randn(b, c_old, h, h)
    outputs_old = F.interpolate(small_old, size=(size, size), mode="bilinear", align_corners=False)
    features_old = {
        "body": torch.randn(b, 6, h, h),
        "attentions": [torch.randn(b, 4, h, h) for _ in range(5)],
        "sem_logits_small": small_old,
    }
    labels = torch.zeros(b, size, size, dtype=torch.long)
    labels[:, :16, :16] = c_new - 1
    labels[:, 20:, 20:] = 255
    labeler = PseudoLabeler.from_opts(opts, info, torch.full((c_new,), 0.001), math.log(c_new))
    pseudo = labeler(labels, outputs_old) if labeler is not None else None
    batch = StepBatch(
        torch.zeros(b, 3, size, size),
        pseudo.labels if pseudo is not None else labels,
        labels,
        outputs,
        features,
        outputs_old,
        features_old,
        pseudo,
    )
    return batch, [small, body, *attentions]


@pytest.mark.parametrize("method", list(PRESET_TERMS))
def test_every_preset_runs_and_backpropagates(method):
    opts = make_opts("--method", method, "--step", "1")
    info = voc_15_5(1)
    terms = build_loss_terms(opts, info, 16)
    batch, leaves = tiny_step_batch(info, opts)
    attention_maps = [t.detach().clone() for t in batch.features["attentions"]]
    losses = {name: term(batch) for name, term in terms.items()}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert leaves[0].grad is not None  # every preset trains the logits
    # The model's feature lists are not extended (the reference appended the logits to them).
    assert len(batch.features["attentions"]) == 5
    assert all(torch.equal(a.detach(), b) for a, b in zip(batch.features["attentions"], attention_maps))
    for term in terms.values():
        value = term.validation_loss(batch)
        assert value is None or torch.isfinite(value)
