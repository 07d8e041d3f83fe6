"""Hand-computed values of every criterion and distillation loss in utils/loss.py (the reference's
``utils/loss.py`` classes of the same names).

Most cases use one image with two pixels and three channels (B×C×H×W = 1×3×1×2) chosen so that the
softmaxes are simple fractions:

    z  pixel 0 = [0, 0, ln 2]   -> softmax [1/4, 1/4, 1/2],  LSE = ln 4
    z  pixel 1 = [ln 3, 0, 0]   -> softmax [3/5, 1/5, 1/5],  LSE = ln 5
    z_old pixel 0 = [0, 0]      -> softmax [1/2, 1/2]
    z_old pixel 1 = [0, ln 3]   -> softmax [1/4, 3/4]
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from utils.loss import (
    NCA,
    BCESigmoid,
    BCEWithLogitsLossWithIgnoreIndex,
    FocalLoss,
    FocalLossNew,
    IcarlLoss,
    KnowledgeDistillationLoss,
    LabelGuidedKnowledgeDistillationLoss,
    UnbiasedCrossEntropy,
    UnbiasedKnowledgeDistillationLoss,
    UnbiasedNCA,
    entropy,
    soft_crossentropy,
)

LN2, LN3, LN4, LN5 = math.log(2), math.log(3), math.log(4), math.log(5)


def new_logits(dtype=torch.float32, requires_grad=False):
    z = torch.tensor([[0.0, LN3], [0.0, 0.0], [LN2, 0.0]], dtype=dtype)  # (C, W) = 3×2
    return z[None, :, None, :].clone().requires_grad_(requires_grad)  # (1, 3, 1, 2)


def old_logits(dtype=torch.float32):
    z = torch.tensor([[0.0, 0.0], [0.0, LN3]], dtype=dtype)  # (C_old, W) = 2×2
    return z[None, :, None, :].clone()  # (1, 2, 1, 2)


def labels(*values):
    return torch.tensor(values, dtype=torch.long)[None, None, :]  # (1, 1, W)


def close(actual, expected, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=tol
    )


# --- cross-entropy family ---------------------------------------------------------------------------------


def test_unbiased_cross_entropy_hand_values():
    # C_old = 2. Pixel 0, label 1 (old) -> 0: p̂_0 = (1+1)/4 -> loss ln 2.
    # Pixel 1, label 2 (new): p̂_2 = 1/5 -> loss ln 5.
    loss = UnbiasedCrossEntropy(old_cl=2, reduction="none")
    assert close(loss(new_logits(), labels(1, 2)), [[[LN2, LN5]]])
    assert close(UnbiasedCrossEntropy(old_cl=2)(new_logits(), labels(1, 2)), (LN2 + LN5) / 2)
    assert close(UnbiasedCrossEntropy(old_cl=2, reduction="sum")(new_logits(), labels(1, 2)), LN2 + LN5)
    # Ignored pixel: 0 in "none", excluded from the mean.
    assert close(loss(new_logits(), labels(1, 255)), [[[LN2, 0.0]]])
    assert close(UnbiasedCrossEntropy(old_cl=2)(new_logits(), labels(1, 255)), LN2)
    # mask: pixel 0 ignored.
    mask = torch.tensor([[[True, False]]])
    assert close(loss(new_logits(), labels(1, 2), mask=mask), [[[0.0, LN5]]])
    # Background of pixel 1 = (3 + 1)/5.
    assert close(loss(new_logits(), labels(0, 0)), [[[LN2, math.log(5 / 4)]]])


def test_unbiased_cross_entropy_all_ignored_is_zero_with_graph():
    z = new_logits(requires_grad=True)
    loss = UnbiasedCrossEntropy(old_cl=2)(z, labels(255, 255))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_unbiased_cross_entropy_gradcheck():
    z = new_logits(torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: UnbiasedCrossEntropy(old_cl=2)(x, labels(1, 2)), (z,))


def test_bce_with_ignore_index():
    # Zero logits: BCE per channel ln 2, per pixel 2 ln 2 (two channels).
    z = torch.zeros(1, 2, 1, 2, requires_grad=True)
    bce = BCEWithLogitsLossWithIgnoreIndex(reduction="none")
    assert close(bce(z, labels(0, 255)), [[[2 * LN2, 0.0]]])
    assert close(BCEWithLogitsLossWithIgnoreIndex()(z, labels(0, 255)), 2 * LN2)
    assert close(BCEWithLogitsLossWithIgnoreIndex(reduction="sum")(z, labels(0, 1)), 4 * LN2)
    # Non-zero logit: BCEWithLogits(x, t) = softplus(x) - t x; x = ln 3 on the labelled channel 1.
    z2 = torch.tensor([0.0, LN3]).view(1, 2, 1, 1)
    assert close(bce(z2, labels(1)), [[[LN2 + LN4 - LN3]]])
    all_ignored = BCEWithLogitsLossWithIgnoreIndex()(z, labels(255, 255))
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad


def test_icarl_loss_targets_replaced_by_old_sigmoid():
    # C_new = 3, C_old = 2, one pixel labelled 2, logits [ln 3, 0, 0], old probabilities [1/4, 1/2].
    # Targets [1/4, 1/2, 1]: softplus(ln 3) - ln3/4 + ln 2 + ln 2 = 4 ln 2 - ln 3 / 4.
    z = torch.tensor([LN3, 0.0, 0.0]).view(1, 3, 1, 1)
    old = torch.tensor([0.25, 0.5]).view(1, 2, 1, 1)
    assert close(IcarlLoss()(z, labels(2), old), 4 * LN2 - LN3 / 4)
    # bkg=True keeps the ground truth (0) on channel 0: ln 4 + ln 2 + ln 2.
    assert close(IcarlLoss(bkg=True)(z, labels(2), old), 4 * LN2)


def test_focal_losses():
    # z = [0, 0]: p_t = 1/2, CE = ln 2, focal = (1/2)^2 ln 2 = ln2 / 4.
    z = torch.zeros(1, 2, 1, 2)
    assert close(FocalLoss(reduction="none")(z, labels(0, 1)), [[[LN2 / 4, LN2 / 4]]])
    assert close(FocalLoss(alpha=2, gamma=1)(z, labels(0, 255)), (2 * 0.5 * LN2 + 0) / 2)
    # FocalLossNew(index=1): plain CE on label 0, focal on label 1.
    assert close(FocalLossNew(index=1, reduction="none")(z, labels(0, 1)), [[[LN2, LN2 / 4]]])


def test_nca_margin_has_no_effect():
    # scale 2: 2 * [0, ln3 / 2] = [0, ln 3] -> p = [1/4, 3/4], label 1 -> ln(4/3).
    z = torch.tensor([0.0, LN3 / 2]).view(1, 2, 1, 1)
    for margin in (0.0, 0.5):
        assert close(NCA(scale=2.0, margin=margin)(z, labels(1)), math.log(4 / 3))
    # Unbiased NCA with C_old = 1: background is channel 0 alone.
    assert close(UnbiasedNCA(old_cl=1, scale=2.0, margin=0.3)(z, labels(0)), LN4)


def test_nca_does_not_register_the_model_scalar():
    scalar = torch.nn.Parameter(torch.tensor(1.0))
    assert list(NCA(scale=scalar).parameters()) == []
    assert list(UnbiasedNCA(old_cl=1, scale=scalar).parameters()) == []


def test_soft_crossentropy_sign_and_masks():
    # One pixel, C_new = 2, C_old = 2, uniform new and old logits.
    z = torch.zeros(1, 2, 1, 1)
    z_old = torch.zeros(1, 2, 1, 1)
    bg, valid = torch.tensor([[[True]]]), torch.tensor([[[False]]])
    # Uncertain background pixel: + sum_c ln(1/2) * 1/2 = -ln 2 (positive sign of RN-20), factor 3.
    value = soft_crossentropy(z, labels(0), z_old, valid, bg, "soft_uncertain", pseudo_soft_factor=3.0)
    assert close(value, [[[-3 * LN2]]])
    # Valid background pixel with soft_uncertain: certain -> CE = ln 2.
    assert close(soft_crossentropy(z, labels(0), z_old, ~valid, bg, "soft_uncertain"), [[[LN2]]])
    # soft_certain: every background pixel is uncertain.
    assert close(soft_crossentropy(z, labels(0), z_old, ~valid, bg, "soft_certain"), [[[-LN2]]])


# --- distillation -----------------------------------------------------------------------------------------


def test_knowledge_distillation_hand_values():
    # Pixel 0: l = log_softmax([0, 0]) = [-ln2, -ln2], q = [1/2, 1/2] -> mean_c q l = -ln2 / 2.
    # Pixel 1: l = log_softmax([ln3, 0]) = [ln(3/4), ln(1/4)], q = [1/4, 3/4].
    p0 = LN2 / 2
    p1 = -(0.25 * math.log(3 / 4) + 0.75 * math.log(1 / 4)) / 2
    assert close(KnowledgeDistillationLoss(reduction="none")(new_logits(), old_logits()), [[[p0, p1]]])
    assert close(KnowledgeDistillationLoss()(new_logits(), old_logits()), (p0 + p1) / 2)
    assert close(KnowledgeDistillationLoss(reduction="sum")(new_logits(), old_logits()), p0 + p1)
    # alpha = 2 on pixel 1: q = softmax([0, 2 ln 3]) = [1/10, 9/10].
    p1_alpha = -(0.1 * math.log(3 / 4) + 0.9 * math.log(1 / 4)) / 2
    assert close(KnowledgeDistillationLoss(alpha=2.0)(new_logits(), old_logits()), (p0 + p1_alpha) / 2)
    mask = torch.tensor([[[True, False]]])
    assert close(KnowledgeDistillationLoss(reduction="sum")(new_logits(), old_logits(), mask=mask), p0)


def test_knowledge_distillation_kd_cil_weights_one_image():
    # w = 1 + H(softmax(z_old)): pixel 0 H([1/2, 1/2]) = ln 2; pixel 1 H([1/4, 3/4]).
    p0 = LN2 / 2
    p1 = -(0.25 * math.log(3 / 4) + 0.75 * math.log(1 / 4)) / 2
    w0 = 1 + LN2
    w1 = 1 - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    loss = KnowledgeDistillationLoss(kd_cil_weights=True)
    # Value of the reference's KnowledgeDistillationLoss(kd_cil_weights=True) on this case: 0.7275891.
    assert close(loss(new_logits(), old_logits()), (w0 * p0 + w1 * p1) / 2)
    assert close(loss(new_logits(), old_logits()), 0.7275891, tol=1e-6)
    none = KnowledgeDistillationLoss(reduction="none", kd_cil_weights=True)(new_logits(), old_logits())
    assert none.shape == (1, 1, 1, 2) and close(none, [[[[w0 * p0, w1 * p1]]]])
    # The weights use the old logits without alpha.
    p1_alpha = -(0.1 * math.log(3 / 4) + 0.9 * math.log(1 / 4)) / 2
    weighted_alpha = KnowledgeDistillationLoss(alpha=2.0, kd_cil_weights=True)(new_logits(), old_logits())
    assert close(weighted_alpha, (w0 * p0 + w1 * p1_alpha) / 2)


def test_knowledge_distillation_kd_cil_weights_broadcast_over_the_batch():
    """Reference behaviour: w[:, None] (B, 1, H, W) times the (B, H, W) loss is a (B, B, H, W) tensor."""
    z = torch.cat([new_logits(), new_logits().flip(-1)])  # (2, 3, 1, 2)
    z_old = torch.cat([old_logits(), 2 * old_logits().flip(-1)])  # (2, 2, 1, 2)
    plain = KnowledgeDistillationLoss(reduction="none")(z, z_old)  # (2, 1, 2): -mean_c q l
    log_old = torch.log_softmax(z_old, dim=1)
    w = 1 - (log_old.exp() * log_old).sum(dim=1)  # (2, 1, 2)
    none = KnowledgeDistillationLoss(reduction="none", kd_cil_weights=True)(z, z_old)
    assert none.shape == (2, 2, 1, 2)
    for i in range(2):
        for j in range(2):
            assert close(none[i, j], w[i] * plain[j])
    loss = KnowledgeDistillationLoss(kd_cil_weights=True)
    assert close(loss(z, z_old), none.mean())
    # Values of the reference's loss on this case (mean, sum, and alpha 2 with a mask).
    assert close(loss(z, z_old), 0.7387565, tol=1e-6)
    assert close(
        KnowledgeDistillationLoss(reduction="sum", kd_cil_weights=True)(z, z_old), 5.9100518, tol=1e-5
    )
    mask = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    masked = KnowledgeDistillationLoss(alpha=2.0, kd_cil_weights=True)(z, z_old, mask=mask)
    assert close(masked, 0.5307702, tol=1e-6)


def test_unbiased_knowledge_distillation_hand_values():
    # Pixel 0: p̃_bg = (1 + 2)/4, p̃_1 = 1/4, q = [1/2, 1/2]: l = -(1/2)(ln(3/4)/2 + ln(1/4)/2).
    # Pixel 1: p̃_bg = (3 + 1)/5, p̃_1 = 1/5, q = [1/4, 3/4]: l = -(1/2)(ln(4/5)/4 + 3 ln(1/5)/4).
    p0 = -(0.5 * math.log(3 / 4) + 0.5 * math.log(1 / 4)) / 2
    p1 = -(0.25 * math.log(4 / 5) + 0.75 * math.log(1 / 5)) / 2
    loss = UnbiasedKnowledgeDistillationLoss(reduction="none")
    assert close(loss(new_logits(), old_logits()), [[[p0, p1]]])
    assert close(UnbiasedKnowledgeDistillationLoss()(new_logits(), old_logits()), (p0 + p1) / 2)


def test_unbiased_kd_without_new_classes():
    # C_new == C_old (the reference crashed): background is channel 0 alone, i.e. plain KD times C_old.
    z, z_old = new_logits()[:, :2], old_logits()
    expected = KnowledgeDistillationLoss(reduction="none")(z, z_old)
    assert close(UnbiasedKnowledgeDistillationLoss(reduction="none")(z, z_old), expected)


@pytest.mark.parametrize("loss_cls", [KnowledgeDistillationLoss, UnbiasedKnowledgeDistillationLoss])
def test_kd_gradcheck(loss_cls):
    z = new_logits(torch.float64, requires_grad=True)
    z_old = old_logits(torch.float64)
    assert torch.autograd.gradcheck(lambda x: loss_cls(alpha=1.5)(x, z_old), (z,))


def test_bce_sigmoid_trim_and_sum():
    z = torch.tensor([0.0, 0.0, 5.0]).view(1, 3, 1, 1)
    z_old = torch.zeros(1, 2, 1, 1)
    # trim: BCE(1/2, 1/2) = ln 2 on both kept channels.
    assert close(BCESigmoid(shape="trim")(z, z_old), LN2)
    # sum: channel 0 replaced by the new channels' sum (5): BCE(sigmoid(5), 1/2).
    s = torch.sigmoid(torch.tensor(5.0)).item()
    expected = (-(0.5 * math.log(s) + 0.5 * math.log(1 - s)) + LN2) / 2
    before = z.clone()
    assert close(BCESigmoid(shape="sum")(z, z_old), expected)
    assert torch.equal(z, before)  # the reference overwrote channel 0 in place


# --- LGKD -------------------------------------------------------------------------------------------------


def lgkd_expected_two_pixels():
    # Labels [0, 2] with C_old = 2: pixel 0 previous, pixel 1 novel (g = 2).
    # Pixel 0: q = [1/2, 1/2, 0], l = [ln 1/4, ln 1/4, ln 1/2] -> s = ln(1/4).
    # Pixel 1: q = [1/4, 3/4, 0] -> q̃ = [0, 3/4, 1/4], l = [ln 3/5, ln 1/5, ln 1/5] -> s = ln(1/5).
    return -math.log(1 / 4), -math.log(1 / 5)


def test_lgkd_previous_and_novel_pixels():
    s0, s1 = lgkd_expected_two_pixels()
    loss = LabelGuidedKnowledgeDistillationLoss()  # prev_kd 10, novel_kd 2
    assert close(loss(new_logits(), old_logits(), labels(0, 2)), (10 * s0 + 2 * s1) / 2)
    weighted = LabelGuidedKnowledgeDistillationLoss(prev_kd=1.0, novel_kd=3.0)
    assert close(weighted(new_logits(), old_logits(), labels(0, 2)), (s0 + 3 * s1) / 2)
    assert close(
        LabelGuidedKnowledgeDistillationLoss(reduction="sum")(new_logits(), old_logits(), labels(0, 2)),
        10 * s0 + 2 * s1,
    )
    none = LabelGuidedKnowledgeDistillationLoss(reduction="none")(new_logits(), old_logits(), labels(0, 2))
    assert close(none, [[[10 * s0, 2 * s1]]])
    # Labels may come as (B, 1, H, W) floats (F.interpolate output).
    as_float = labels(0, 2)[:, None].float()
    assert close(loss(new_logits(), old_logits(), as_float), (10 * s0 + 2 * s1) / 2)


def test_lgkd_reduction_none_is_the_reference_vector_previous_pixels_first():
    # Two images, the second one with its pixels swapped; labels [[2, 0], [0, 2]] (C_old = 2).
    z = torch.cat([new_logits(), new_logits().flip(-1)])  # (2, 3, 1, 2)
    z_old = torch.cat([old_logits(), old_logits().flip(-1)])  # (2, 2, 1, 2)
    y = torch.tensor([[[2, 0]], [[0, 2]]])
    # Previous pixels (image 0 pixel 1, image 1 pixel 0): q = [1/4, 3/4, 0] on softmax [3/5, 1/5, 1/5].
    prev = -10 * (0.25 * math.log(3 / 5) + 0.75 * math.log(1 / 5))
    # Novel pixels (image 0 pixel 0, image 1 pixel 1): q̃ = [0, 1/2, 1/2] on softmax [1/4, 1/4, 1/2].
    novel = 2 * 1.5 * LN2
    none = LabelGuidedKnowledgeDistillationLoss(reduction="none")(z, z_old, y)
    assert none.shape == (4,)
    assert close(none, [prev, prev, novel, novel])
    # The reference's output on this case.
    assert close(none, [13.3478, 13.3478, 2.0794, 2.0794], tol=1e-4)
    mean = LabelGuidedKnowledgeDistillationLoss()(z, z_old, y)
    assert close(mean, none.mean()) and close(mean, 7.7136, tol=1e-4)
    assert close(LabelGuidedKnowledgeDistillationLoss(reduction="sum")(z, z_old, y), 30.8546, tol=1e-4)
    # Ignored pixels are left out; an old class counts as previous, in (b, h, w) order with the others.
    y_ignore = torch.tensor([[[2, 255]], [[1, 2]]])
    none_ignore = LabelGuidedKnowledgeDistillationLoss(reduction="none")(z, z_old, y_ignore)
    assert close(none_ignore, [13.3478, 2.0794, 2.0794], tol=1e-4)
    # The same values as a (B, H, W) map, 0 where ignored.
    loss_map = LabelGuidedKnowledgeDistillationLoss(reduction="none").loss_map(z, z_old, y_ignore)
    assert loss_map.shape == (2, 1, 2) and loss_map[0, 0, 1] == 0
    assert close(loss_map, [[[novel, 0.0]], [[prev, novel]]])


def test_lgkd_a_single_novel_pixel():
    """One novel pixel in the batch: the reference's in-place index assignment crashes under current torch
    ("refer to a single memory location"); here it is an ordinary novel pixel."""
    z = torch.cat([new_logits(), new_logits().flip(-1)])
    z_old = torch.cat([old_logits(), old_logits().flip(-1)])
    y = torch.tensor([[[0, 0]], [[0, 2]]])
    prev_0 = -10 * (-2 * LN2)  # image 0 pixel 0: q = [1/2, 1/2, 0], l = [ln 1/4, ln 1/4, ln 1/2]
    prev_1 = -10 * (0.25 * math.log(3 / 5) + 0.75 * math.log(1 / 5))
    novel = 2 * 1.5 * LN2
    loss = LabelGuidedKnowledgeDistillationLoss()
    assert close(loss(z, z_old, y), (prev_0 + 2 * prev_1 + novel) / 4)
    none = LabelGuidedKnowledgeDistillationLoss(reduction="none")(z, z_old, y)
    assert close(none, [prev_0, prev_1, prev_1, novel])
    # Only one pixel at all, and it is novel.
    one = loss(new_logits()[..., :1], old_logits()[..., :1], labels(2))
    assert close(one, novel)


def test_lgkd_no_novel_pixels_old_label_is_previous():
    # Labels [0, 1]: label 1 < C_old -> previous. Pixel 1: s = ln(3/5)/4 + 3 ln(1/5)/4.
    s1 = -(0.25 * math.log(3 / 5) + 0.75 * math.log(1 / 5))
    expected = 10 * (LN4 + s1) / 2
    loss = LabelGuidedKnowledgeDistillationLoss()
    assert close(loss(new_logits(), old_logits(), labels(0, 1)), expected)
    assert close(loss(new_logits(), old_logits(), labels(0, 0)), expected)


def test_lgkd_only_novel_pixels():
    # Labels [2, 2]. Pixel 0: q̃ = [0, 1/2, 1/2] -> s = ln(1/4)/2 + ln(1/2)/2 = -(3/2) ln 2.
    # Pixel 1: s = ln(1/5) as above. Mean with novel_kd = 2: 2 (3/2 ln2 + ln5) / 2.
    loss = LabelGuidedKnowledgeDistillationLoss()
    assert close(loss(new_logits(), old_logits(), labels(2, 2)), 1.5 * LN2 + LN5)


def test_lgkd_alpha_and_ignore():
    # alpha = 2, labels [0, 0]: pixel 1 q = softmax([0, 2 ln3]) = [1/10, 9/10].
    s1 = -(0.1 * math.log(3 / 5) + 0.9 * math.log(1 / 5))
    loss = LabelGuidedKnowledgeDistillationLoss(alpha=2.0)
    assert close(loss(new_logits(), old_logits(), labels(0, 0)), 10 * (LN4 + s1) / 2)
    # 255 dropped from sum and count.
    assert close(LabelGuidedKnowledgeDistillationLoss()(new_logits(), old_logits(), labels(0, 255)), 10 * LN4)


def test_lgkd_all_ignored_is_zero_with_graph():
    z = new_logits(requires_grad=True)
    loss = LabelGuidedKnowledgeDistillationLoss()(z, old_logits(), labels(255, 255))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_lgkd_gradient_is_weighted_softmax_minus_target():
    # dL/dz_p = w_p / N * (softmax(z_p) - q̃_p) because q̃ sums to 1 on every pixel.
    z = new_logits(requires_grad=True)
    LabelGuidedKnowledgeDistillationLoss()(z, old_logits(), labels(0, 2)).backward()
    p = torch.softmax(new_logits(), dim=1)[0, :, 0]  # (3, 2)
    q = torch.tensor([[0.5, 0.0], [0.5, 0.75], [0.0, 0.25]])
    expected = (p - q) * torch.tensor([10.0, 2.0]) / 2
    assert torch.allclose(z.grad[0, :, 0], expected, atol=1e-6)


def test_lgkd_gradcheck_and_fp16_inputs():
    z = new_logits(torch.float64, requires_grad=True)
    loss = LabelGuidedKnowledgeDistillationLoss(alpha=1.3, prev_kd=2.0, novel_kd=0.5)
    assert torch.autograd.gradcheck(lambda x: loss(x, old_logits(torch.float64), labels(0, 2)), (z,))
    half = loss(new_logits().half(), old_logits().half(), labels(0, 2))
    assert half.dtype == torch.float32


def test_lgkd_matches_plain_kd_shape_on_random_input():
    # Sanity on a larger random case: previous-only LGKD equals prev_kd * CE(q_padded, softmax(z)) mean.
    torch.manual_seed(0)
    z, z_old = torch.randn(2, 5, 3, 3), torch.randn(2, 3, 3, 3)
    y = torch.zeros(2, 3, 3, dtype=torch.long)
    q = F.pad(torch.softmax(z_old, 1), (0, 0, 0, 0, 0, 2))
    expected = -(q * torch.log_softmax(z, 1)).sum(1).mean()
    assert close(LabelGuidedKnowledgeDistillationLoss(prev_kd=1.0)(z, z_old, y), expected.item(), tol=1e-5)


# --- entropy ----------------------------------------------------------------------------------------------


def test_entropy_is_a_channel_mean_in_zero_to_one_over_c():
    # Uniform over C = 4: -(1/ln4) * mean_c (1/4 ln(1/4)) = 1/4.
    uniform = torch.full((1, 4, 1, 1), 0.25)
    assert close(entropy(uniform), [[[0.25]]], tol=1e-6)
    one_hot = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 4, 1, 1)
    assert abs(entropy(one_hot).item()) < 1e-6
    random = torch.softmax(torch.randn(2, 4, 5, 5) * 3, dim=1)
    values = entropy(random)
    assert values.shape == (2, 5, 5)
    assert (values >= -1e-7).all() and (values <= 0.25 + 1e-6).all()
