"""POD (reference ``train.py`` ``features_distillation``): pooling vectors written out by hand, distances,
options, schedule, no input mutation."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from utils.errors import OptionsError
from utils.pod import (
    PODOptions,
    _local_pooling_grid,
    _local_pooling_regions,
    features_distillation,
    pod_distance,
    pod_embedding,
)

PLOP_OPTIONS = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}

# A 2×2 single-channel map:  [[1, 2],
#                             [3, 4]]
X = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)


def test_local_pooling_on_a_2x2_map():
    # Scale 1 (k = 2): row means [1.5, 3.5] (mean over width), column means [2, 3] (mean over height).
    # Scale 2 (k = 1): regions 1, 2, 3, 4 in row-major order, each giving [v] then [v].
    expected = [1.5, 3.5, 2.0, 3.0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert pod_embedding(X, "local", [1, 2]).tolist() == [expected]
    # normalize_per_scale=True divides each region's vectors by s².
    scaled = [1.5, 3.5, 2.0, 3.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1, 1]
    assert pod_embedding(X, "local", [1, 2], normalize_per_scale=True).tolist() == [scaled]
    # "spm" with S = 2 scales: 2^(S-1) = 2 for the first, 2^(S-1) = 2 for the second.
    assert pod_embedding(X, "local", [1, 2], normalize_per_scale="spm").tolist() == [
        [v / 2 for v in expected]
    ]


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 2, 9, 9), (1, 2, 10, 7), (1, 2, 5, 8)])
def test_vectorised_local_pooling_matches_region_loop(shape):
    # RN-10: regions of side W // s on both axes, also on non-square maps (the reference's slicing).
    x = torch.randn(shape)
    expected = torch.cat([_local_pooling_regions(x, s, shape[-1] // s) for s in (1, 2, 4)], dim=1)
    # (With H < W the lower regions are empty and give NaN, in the reference too.)
    assert torch.allclose(pod_embedding(x, "local", [1, 2, 4]), expected, atol=1e-6, equal_nan=True)
    if shape[-2] >= shape[-1]:
        assert torch.allclose(
            _local_pooling_grid(x, 4, shape[-1] // 4), _local_pooling_regions(x, 4, shape[-1] // 4)
        )


def test_local_pooling_length_is_14_c_w():
    x = torch.randn(2, 3, 8, 8)
    assert pod_embedding(x, "local", [1, 2, 4]).shape == (2, 14 * 3 * 8)


def test_spatial_and_global_pooling():
    # spatial: sums over width [3, 7], then sums over height [4, 6].
    assert pod_embedding(X, "spatial").tolist() == [[3.0, 7.0, 4.0, 6.0]]
    # global, scale 1: avg_pool(2) = 2.5 -> [2.5] (sum over height), [2.5] (sum over width);
    # scale 2: avg_pool(1) = X -> column sums [4, 6], row sums [3, 7].
    assert pod_embedding(X, "global", [1, 2]).tolist() == [[2.5, 2.5, 4.0, 6.0, 3.0, 7.0]]


def test_masked_local_pooling_zeroes_masked_positions():
    mask = torch.tensor([[[True, False], [False, False]]])
    expected = pod_embedding(X.masked_fill(mask[:, None], 0.0), "local", [1, 2])
    assert torch.equal(pod_embedding(X, "local", [1, 2], mask=mask), expected)
    none_masked = torch.zeros(1, 2, 2, dtype=torch.bool)
    assert torch.equal(pod_embedding(X, "local", [1, 2], mask=none_masked), pod_embedding(X, "local", [1, 2]))


def test_distances():
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]])
    assert pod_distance(a, b, "frobenius").tolist() == [5.0]
    assert pod_distance(a, b, "l1").tolist() == [7.0]
    assert pod_distance(b, b, "kl").abs().max() < 1e-6
    with pytest.raises(OptionsError):
        pod_distance(a, b, "cosine")
    with pytest.raises(OptionsError):
        pod_distance(a, b, "frobenius_mix")


def test_single_layer_hand_value():
    # a = 0, b = X, pow: b² = [[1, 4], [9, 16]]
    # -> local([1, 2]) = [2.5, 12.5, 5, 10, 1, 1, 4, 4, 9, 9, 16, 16];
    # L2 norm = sqrt(6.25 + 156.25 + 25 + 100 + 2 (1 + 16 + 81 + 256)) = sqrt(995.5).
    loss = features_distillation(
        [torch.zeros_like(X)], [X], collapse_channels="local", spp_scales=[1, 2], use_pod_schedule=False
    )
    assert math.isclose(loss.item(), math.sqrt(995.5), rel_tol=1e-6)
    # sqrt(C_new / N_new) schedule with C_new = 4, N_new = 1 doubles it; pod_factor scales it.
    scheduled = features_distillation(
        [torch.zeros_like(X)],
        [X],
        collapse_channels="local",
        spp_scales=[1, 2],
        pod_factor=0.5,
        nb_current_classes=4,
        nb_new_classes=1,
    )
    assert math.isclose(scheduled.item(), 0.5 * 2 * math.sqrt(995.5), rel_tol=1e-6)


def test_sum_over_layers_divided_by_number_of_layers():
    # Two identical layers plus one layer with zero difference: (d + d + 0) / 3.
    d = math.sqrt(995.5)
    loss = features_distillation(
        [torch.zeros_like(X), torch.zeros_like(X), X],
        [X, X, X],
        collapse_channels="local",
        spp_scales=[1, 2],
        use_pod_schedule=False,
    )
    assert math.isclose(loss.item(), 2 * d / 3, rel_tol=1e-6)


def test_zero_for_identical_inputs_every_collapse():
    torch.manual_seed(0)
    maps = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)]
    for collapse in ("local", "spatial", "global"):
        loss = features_distillation(
            maps,
            [m.clone() for m in maps],
            collapse_channels=collapse,
            nb_current_classes=4,
            nb_new_classes=2,
        )
        assert loss.item() == 0.0


def test_extra_channels_sum_trim():
    # Old logits (1, 2, 1, 1) = [1, 2]; new (1, 3, 1, 1) = [0.5, 2, 0.5].
    # sum: b' = [0.5 + 0.5, 2] = [1, 2] = a -> 0. trim: b' = [0.5, 2] -> |1 - 0.25| on the first channel.
    a = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    b = torch.tensor([0.5, 2.0, 0.5]).view(1, 3, 1, 1)
    common = {"collapse_channels": "spatial", "index_new_class": 2, "use_pod_schedule": False}
    summed = features_distillation(
        [a], [b], pod_options={"switch": {"after": {"extra_channels": "sum"}}}, **common
    )
    assert summed.item() == 0.0
    trimmed = features_distillation(
        [a], [b], pod_options={"switch": {"after": {"extra_channels": "trim"}}}, **common
    )
    # spatial on 1×1: [v0, v1, v0, v1] after pow -> difference (1 - 0.25) twice -> sqrt(2) * 0.75.
    assert math.isclose(trimmed.item(), math.sqrt(2) * 0.75, rel_tol=1e-6)
    # Default handling is "sum" (reset every layer).
    assert features_distillation([a], [b], **common).item() == 0.0
    with pytest.raises(ValueError):
        features_distillation([b, a], [a, b], **common)  # only the last layer may differ


def test_extra_channels_expand_is_label_guided():
    # Old logits equal -> old probs [1/2, 1/2]; a pixel labelled 2 (new) moves 1/2 from channel 0 to 2.
    a = torch.zeros(1, 2, 1, 1)
    b = torch.tensor([-30.0, 0.0, 0.0]).view(1, 3, 1, 1)  # new probs ~ [0, 1/2, 1/2]
    labels = torch.full((1, 16, 16), 2, dtype=torch.long)
    loss = features_distillation(
        [a],
        [b],
        collapse_channels="spatial",
        labels=labels,
        index_new_class=2,
        use_pod_schedule=False,
        pod_options={"switch": {"after": {"extra_channels": "expand"}}},
    )
    assert loss.item() < 1e-6


def test_plop_options_last_layer_factor_and_before_persistence():
    options = PODOptions.parse(PLOP_OPTIONS)
    assert options.after["factor"] == 0.0005 and options.before is None
    assert options.mask_position == "last" and options.difference_function == "frobenius"
    # Layer 0 uses pod_factor (1.0); the last layer uses the "after" factor.
    layer0 = features_distillation(
        [torch.zeros_like(X)], [X], collapse_channels="local", spp_scales=[1, 2], use_pod_schedule=False
    )
    two = features_distillation(
        [torch.zeros_like(X), torch.zeros_like(X)],
        [X, X],
        collapse_channels="local",
        spp_scales=[1, 2],
        use_pod_schedule=False,
        pod_options={"switch": {"after": {"factor": 0.5}}},
    )
    assert math.isclose(two.item(), (layer0.item() + 0.5 * layer0.item()) / 2, rel_tol=1e-6)
    # "before" sets the factor of every non-last layer; without an "after" section the last layer keeps
    # the value assigned in the loop (reference behaviour).
    before = features_distillation(
        [torch.zeros_like(X), torch.zeros_like(X)],
        [X, X],
        collapse_channels="local",
        spp_scales=[1, 2],
        use_pod_schedule=False,
        pod_options={"switch": {"before": {"factor": 0.25}}},
    )
    assert math.isclose(before.item(), (0.25 + 0.25) * layer0.item() / 2, rel_tol=1e-6)


def test_prepro_and_bad_options_refused():
    with pytest.raises(OptionsError):
        features_distillation([X], [X], prepro="abs")
    with pytest.raises(OptionsError):
        PODOptions.parse({"difference_function": "nope"})
    relu = features_distillation([torch.zeros_like(X)], [-X], prepro="relu", use_pod_schedule=False)
    assert relu.item() == 0.0


def test_inputs_not_mutated_and_gradient_flows_to_new_maps():
    torch.manual_seed(0)
    old = [torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)]
    new = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, 4, 4, requires_grad=True)]
    old_copy, new_copy = copy.deepcopy(old), [t.detach().clone() for t in new]
    labels = torch.randint(0, 4, (2, 8, 8))
    loss = features_distillation(
        old,
        new,
        collapse_channels="local",
        labels=labels,
        index_new_class=2,
        pod_deeplab_mask=True,
        prepro="none",
        deeplabmask_upscale=False,
        pod_options=PLOP_OPTIONS,
        nb_current_classes=4,
        nb_new_classes=2,
    )
    loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(old, old_copy))
    assert all(torch.equal(a.detach(), b) for a, b in zip(new, new_copy))
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in new)


def test_masked_pod_factor_zero_skips_layer_and_keeps_graph():
    b = X.clone().requires_grad_(True)
    labels = torch.zeros(1, 2, 2, dtype=torch.long)
    loss = features_distillation(
        [torch.zeros_like(X)],
        [b],
        collapse_channels="local",
        labels=labels,
        index_new_class=1,
        pod_deeplab_mask=True,
        pod_deeplab_mask_factor=0.0,
    )
    assert loss.item() == 0.0 and loss.requires_grad


def test_adaptive_factor_uses_background_fraction():
    labels = torch.tensor([[[0, 0], [1, 1]]])  # half background
    plain = features_distillation(
        [torch.zeros_like(X)], [X], collapse_channels="local", spp_scales=[1, 2], use_pod_schedule=False
    )
    adaptive = features_distillation(
        [torch.zeros_like(X)],
        [X],
        collapse_channels="local",
        spp_scales=[1, 2],
        use_pod_schedule=False,
        labels=labels,
        pod_options={"switch": {"after": {"use_adaptative_factor": True}}},
    )
    assert math.isclose(adaptive.item(), 0.5 * plain.item(), rel_tol=1e-6)
