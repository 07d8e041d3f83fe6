"""Pseudo-labelling (reference ``Trainer.train``) and the approximate median of ``Trainer.find_median`` with
its quirks (RN-05)."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from utils.errors import OptionsError
from utils.loss_terms import StepInfo
from utils.pseudo_label import PseudoLabeler, _approximate_medians, find_median

CONFIDENT = 30.0  # logit gap making the softmax one-hot to float precision


def one_hot_logits(classes: list[int], num_classes: int) -> torch.Tensor:
    """(1, C, 1, W) logits predicting ``classes`` with certainty."""
    logits = torch.zeros(1, num_classes, 1, len(classes))
    for w, c in enumerate(classes):
        logits[0, c, 0, w] = CONFIDENT
    return logits


# --- find_median ------------------------------------------------------------------------------------------


def test_median_all_pixels_in_bin_zero_gives_0_005():
    # Confident old predictions: entropy ~ 0 -> bin 0 for every background pixel. Class 1 gets 3 pixels,
    # class 0 one. Loop stops at i = 0: median = 0 + (T/2 - 0)/T * 0.01 = 0.005 -> max(0.005, 0.001).
    # Class 2 (never predicted) keeps 0 -> max(0, 0.001) = 0.001. Pixels labelled != 0 are skipped.
    images = torch.zeros(1, 3, 1, 5)
    labels = torch.tensor([[[0, 0, 0, 0, 2]]])
    logits = one_hot_logits([1, 1, 1, 0, 0], 2)  # the old model has C_old = 2 channels

    thresholds, max_value = find_median([(images, labels)], lambda _: logits, "cpu", 3, "entropy", 0.001)
    assert math.isclose(max_value, math.log(3), rel_tol=1e-6)
    assert thresholds.dtype == torch.float32
    assert torch.allclose(thresholds, torch.tensor([0.005, 0.005, 0.001]))


def test_median_probability_mode_quirks():
    # Probability mode, 20 bins: pmax ~ 1 -> bin 19. The running sum adds bin indices (0 + 1 + ... + 18 = 171
    # before i = 19), so with 400 pixels (half = 200) the loop stops at i = 19:
    # median = 0.95 + (200 - 171)/400 * 0.05 = 0.953625, then min(median, 0.99).
    images = torch.zeros(1, 3, 1, 400)
    labels = torch.zeros(1, 1, 400, dtype=torch.long)
    logits = one_hot_logits([0] * 400, 2)
    thresholds, max_value = find_median([(images, labels)], lambda _: logits, "cpu", 2, "probability", 0.99)
    assert max_value == 1.0
    assert math.isclose(thresholds[0].item(), 0.953625, rel_tol=1e-6)
    assert thresholds[1].item() == 0.0  # min(0, 0.99)
    # With 4 pixels the loop never stops: the last bin is used with run = 0 + 1 + ... + 19 = 190,
    # median = 0.95 + (2 - 190)/4 * 0.05 = -1.4 (a negative "median", as in the reference).
    small = one_hot_logits([0] * 4, 2)
    thresholds, _ = find_median(
        [(images[..., :4], labels[..., :4])], lambda _: small, "cpu", 2, "probability", 0.99
    )
    assert math.isclose(thresholds[0].item(), -1.4, rel_tol=1e-6)


def test_median_running_sum_adds_bin_index():
    # 10 bins, 10 pixels in bin 3: half = 5; run goes 0, 0, 1, 3 (indices, not counts) and the loop stops
    # at i = 3: median = 0.3 + (5 - 3)/10 * 0.1 = 0.32 (the true median of the bin would be 0.35).
    hist = torch.zeros(1, 10, dtype=torch.long)
    hist[0, 3] = 10
    assert math.isclose(_approximate_medians(hist, 10)[0].item(), 0.32, rel_tol=1e-6)


def test_median_float_bin_index_error():
    # 100 bins: int(29 / 100 * 100) = 28. With 20 pixels in bin 28 and 800 in bin 90 (half = 410):
    # i = 28: 378 <= 410 <= 398 fails, run = 406; i = 29 reads bin 28 again: 406 <= 410 <= 426 stops.
    # median = 0.29 + (410 - 406)/20 * 0.01 = 0.292.
    assert int(29 / 100 * 100) == 28
    hist = torch.zeros(1, 100, dtype=torch.long)
    hist[0, 28], hist[0, 90] = 20, 800
    assert math.isclose(_approximate_medians(hist, 100)[0].item(), 0.292, rel_tol=1e-5)


@pytest.mark.parametrize("spread", [0.0, 1.0, 4.0, 30.0], ids=["uniform", "unsure", "mixed", "confident"])
def test_entropy_thresholds_are_degenerate_whatever_the_data(spread):
    """Reference behaviour kept on purpose (RN-05): with the channel-mean entropy
    divided again by ln C_new, every value of VOC 15 -> 16 lies in [0, 1/(16 ln 17)] ~ [0, 0.022], i.e. the
    first 3 of 100 bins, and the per-class thresholds of the predicted classes land between 0.005 (every
    pixel in bin 0) and about 0.025 (bin 2), from a one-hot to a uniform old model."""
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(4, 3, 16, 16)
    labels = torch.zeros(4, 16, 16, dtype=torch.long)
    logits = spread * torch.randn(4, 16, 16, 16, generator=generator)  # (B, C_old = 16, H, W)
    thresholds, max_value = find_median([(images, labels)], lambda _: logits, "cpu", 17, "entropy", 0.001)
    assert max_value == pytest.approx(math.log(17))
    assert 1 / (16 * math.log(17)) < 0.0221
    predicted = thresholds[logits.argmax(dim=1).unique()]
    assert ((predicted >= 0.005) & (predicted <= 0.026)).all(), thresholds


def test_nb_bins_override():
    images, labels = torch.zeros(1, 3, 1, 2), torch.zeros(1, 1, 2, dtype=torch.long)
    logits = one_hot_logits([0, 0], 2)
    # 2 bins, both pixels in bin 0: median = 0 + (1 - 0)/2 * (1/2) = 0.25.
    thresholds, _ = find_median([(images, labels)], lambda _: logits, "cpu", 2, "entropy", 0.001, nb_bins=2)
    assert math.isclose(thresholds[0].item(), 0.25, rel_tol=1e-6)
    with pytest.raises(ValueError):
        find_median([], lambda _: logits, "cpu", 2, "median", 0.001)


# --- PseudoLabeler ----------------------------------------------------------------------------------------


def entropy_case():
    # C_old = 2, C_new = 4. Pixels: confident class 1, uncertain ([0, 0]), confident class 0, new class 3.
    labels = torch.tensor([[[0, 0, 0, 3]]])
    logits = torch.tensor([[0.0, 0.0, CONFIDENT, 0.0], [CONFIDENT, 0.0, 0.0, 0.0]]).view(1, 2, 1, 4)
    # Uniform over 2 old classes: E = 1/2, / ln 4 = 0.36 > 0.01 -> rejected; confident pixels: E ~ 0.
    thresholds = torch.full((4,), 0.01)
    return labels, logits, thresholds, math.log(4)


def test_entropy_pseudo_labels_and_adaptive_factor():
    labels, logits, thresholds, max_entropy = entropy_case()
    before = labels.clone()
    labeler = PseudoLabeler("entropy", 2, thresholds, max_entropy, classif_adaptive_factor=True)
    out = labeler(labels, logits)
    assert out.labels.tolist() == [[[1, 255, 0, 3]]]
    assert torch.equal(labels, before)  # not modified in place
    assert out.mask_background.tolist() == [[[True, True, True, False]]]
    assert out.mask_valid.tolist() == [[[True, False, True, False]]]  # pixel 3 is uniform too
    assert out.pseudo_targets.tolist() == [[[1, 0, 0, 0]]]
    # 2 confident background pixels out of 3: 2 / (3 + 1e-6), shape (B, 1, 1).
    assert out.classif_adaptive_factor.shape == (1, 1, 1)
    assert math.isclose(out.classif_adaptive_factor.item(), 2 / (3 + 1e-6), rel_tol=1e-6)
    clamped = PseudoLabeler("entropy", 2, thresholds, max_entropy, True, classif_adaptive_min_factor=0.9)
    assert math.isclose(clamped(labels, logits).classif_adaptive_factor.item(), 0.9, rel_tol=1e-6)
    assert PseudoLabeler("entropy", 2, thresholds, max_entropy)(labels, logits).classif_adaptive_factor == 1.0


def test_entropy_ablations_and_soft_modes():
    labels, logits, thresholds, max_entropy = entropy_case()
    corrected = PseudoLabeler("entropy", 2, thresholds, max_entropy, pseudo_ablation="corrected_errors")
    assert corrected(labels, logits).labels.tolist() == [[[0, 255, 0, 3]]]
    # removed_errors: pseudo-label 1 differs from label 0 -> 255; pseudo-label 0 equals label 0 -> kept.
    removed = PseudoLabeler("entropy", 2, thresholds, max_entropy, pseudo_ablation="removed_errors")
    assert removed(labels, logits).labels.tolist() == [[[255, 255, 0, 3]]]
    soft_uncertain = PseudoLabeler("entropy", 2, thresholds, max_entropy, pseudo_soft="soft_uncertain")
    assert soft_uncertain(labels, logits).labels.tolist() == [[[1, 0, 0, 3]]]
    soft_certain = PseudoLabeler("entropy", 2, thresholds, max_entropy, pseudo_soft="soft_certain")
    assert soft_certain(labels, logits).labels.tolist() == [[[0, 0, 0, 3]]]


def test_other_modes():
    labels, logits, _, _ = entropy_case()
    assert PseudoLabeler("naive", 2)(labels, logits).labels.tolist() == [[[1, 0, 0, 3]]]
    # threshold_0.9: the uncertain pixel (pmax = 1/2) -> 255.
    assert PseudoLabeler("threshold_0.9", 2)(labels, logits).labels.tolist() == [[[1, 255, 0, 3]]]
    confidence = PseudoLabeler("confidence", 2)(labels, logits)
    assert confidence.labels.tolist() == [[[1, 0, 0, 3]]]
    assert torch.allclose(confidence.sample_weights, torch.tensor([[[1.0, 0.5, 1.0, 1.0]]]))
    # median: class thresholds [0.6, 0.6, ...] reject pmax = 1/2.
    median = PseudoLabeler("median", 2, thresholds=torch.full((4,), 0.6))
    assert median(labels, logits).labels.tolist() == [[[1, 255, 0, 3]]]


def test_bad_modes_refused():
    with pytest.raises(OptionsError):
        PseudoLabeler("entropyy", 2)
    with pytest.raises(OptionsError):
        PseudoLabeler("threshold_x", 2)
    with pytest.raises(ValueError):
        PseudoLabeler("entropy", 2)  # thresholds missing


def test_from_opts():
    opts = argparse.Namespace(
        pseudo="entropy",
        classif_adaptive_factor=True,
        classif_adaptive_min_factor=0.0,
        pseudo_soft=None,
        pseudo_ablation=None,
    )
    info = StepInfo.from_classes(1, [15, 1], 21, "voc")
    labeler = PseudoLabeler.from_opts(opts, info, torch.zeros(16), math.log(16))
    assert labeler.mode == "entropy" and labeler.old_classes == 15 and labeler.classif_adaptive_factor
    step0 = StepInfo.from_classes(0, [15], 21, "voc")
    assert PseudoLabeler.from_opts(opts, step0) is None
    opts.pseudo = None
    assert PseudoLabeler.from_opts(opts, info) is None
