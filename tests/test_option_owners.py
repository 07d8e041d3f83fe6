"""Each option rule has one owner: the parser takes its choices from the module that uses the option, and
``validate_options`` refuses a bad value with the very message that module raises when it builds (the data
sets, the model, the loss terms, POD, pseudo-labelling), so the rule cannot drift between the two places."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

import models
from argparser import METHOD_PRESETS, get_argparser, modify_command_options, validate_options
from dataset.build import DATASETS
from dataset.incremental import DATA_MASKINGS, voc_masking_lut
from dataset.pointcloud_transform import XYZ_NORMS
from dataset.voc import VOCSegmentationIncremental
from segmentation_module import (
    ABN_IMPLS,
    ALIGN_TYPES,
    NORM_ACTS,
    REFERENCE_MULTIMODAL_INITS,
    IncrementalSegmentationModule,
)
from utils.errors import OptionsError
from utils.loss import BCE_SIGMOID_SHAPES
from utils.loss_terms import StepInfo, build_loss_terms
from utils.pod import COLLAPSE_TYPES, features_distillation
from utils.pseudo_label import PSEUDO_ABLATIONS, PSEUDO_SOFT_MODES, PseudoLabeler, check_pseudo_mode
from utils.regularizer import REGULARIZERS
from utils.scheduler import LR_POLICIES


def resolved(*argv: str) -> argparse.Namespace:
    return modify_command_options(get_argparser().parse_args(list(argv)))


def refusal(call) -> str:
    """The message of the ``OptionsError`` that ``call()`` raises."""
    with pytest.raises(OptionsError) as info:
        call()
    return str(info.value)


def step1() -> StepInfo:
    return StepInfo.from_classes(1, [16, 5], 21, "voc")


OWNED_CHOICES = {
    "dataset": list(DATASETS),
    "backbone": [*models.BACKBONES, *models.POINT_BACKBONES],
    "output_stride": sorted(models.DILATIONS),
    "norm_act": list(NORM_ACTS),
    "abn_impl": list(ABN_IMPLS),
    "method": list(METHOD_PRESETS),
    "data_masking": list(DATA_MASKINGS),
    "regularizer": list(REGULARIZERS),
    "lr_policy": list(LR_POLICIES),
    "pseudo_soft": list(PSEUDO_SOFT_MODES),
    "pseudo_ablation": list(PSEUDO_ABLATIONS),
    "pod": list(COLLAPSE_TYPES),
    "init_multimodal": list(REFERENCE_MULTIMODAL_INITS),
    "align_weight": list(ALIGN_TYPES),
    "kd_bce_sig_shape": list(BCE_SIGMOID_SHAPES),
    "xyz_norm": list(XYZ_NORMS),
}


def test_choices_come_from_the_owners():
    actions = {a.dest: a for a in get_argparser()._actions}
    for dest, owned in OWNED_CHOICES.items():
        assert list(actions[dest].choices) == owned, dest


@pytest.mark.parametrize(
    "mode",
    [
        "entropi",
        "Median",
        "threshold_",
        "threshold_x",
        "threshold_1.5",
        "threshold_-0.1",
        "threshold_nan",
        "threshold_inf",
        "threshold_-inf",
        "threshold_1e9",
    ],
)
def test_pseudo_refused_alike_by_the_parser_and_the_labeler(mode):
    expected = refusal(lambda: PseudoLabeler(mode, 2))
    assert refusal(lambda: validate_options(resolved("--pseudo", mode))) == expected
    assert expected.startswith(("Unknown --pseudo", "--pseudo threshold_<t>"))


@pytest.mark.parametrize(
    "mode", ["naive", "confidence", "median", "entropy", "threshold_0", "threshold_1", "threshold_0.25"]
)
def test_pseudo_accepted_alike(mode):
    validate_options(resolved("--pseudo", mode))
    check_pseudo_mode(mode)


POD_CASES = [
    ("--pod_prepro", "abs"),
    ("--pod_prepro", "square"),
    ("--pod_prepro", "POW"),
    ("--pod_options", "[1, 2]"),
    ("--pod_options", '{"switch": "after"}'),
    ("--pod_options", '{"switch": {"before": {"prepro": "abs"}}}'),
    ("--pod_options", '{"switch": {"after": {"prepro": "sqrt"}}}'),
    ("--pod_options", '{"switch": {"after": {"factor": -1}}}'),
    ("--pod_options", '{"switch": {"after": {"factor": true}}}'),
    ("--pod_options", '{"switch": {"after": {"spp_scales": [1, 0]}}}'),
    ("--pod_options", '{"switch": {"before": {"upscale_mask_topk": 1.5}}}'),
    ("--pod_options", '{"difference_function": "cosine"}'),
    ("--pod_options", '{"difference_function_all": "l2"}'),
]


@pytest.mark.parametrize(("flag", "value"), POD_CASES)
def test_pod_refused_alike_by_the_parser_and_the_loss_term(flag, value):
    opts = resolved("--pod", "local", flag, value)
    expected = refusal(lambda: build_loss_terms(opts, step1(), 16))
    assert refusal(lambda: validate_options(opts)) == expected


@pytest.mark.parametrize("text", ["{switch: 1}", '{"switch": ', "'a'"])
def test_pod_options_as_invalid_json_text_is_an_options_error(text):
    # A namespace written by hand (or read back from opts.json) may hold the JSON text itself.
    opts = resolved("--pod", "local")
    opts.pod_options = text
    message = refusal(lambda: build_loss_terms(opts, step1(), 16))
    assert "not valid JSON" in message and "--pod_options" in message
    assert refusal(lambda: validate_options(opts)) == message


def test_pod_options_as_valid_json_text_is_parsed():
    opts = resolved("--pod", "local", "--pod_options", '{"switch": {"after": {"type": "local"}}}')
    opts.pod_options = '{"switch": {"after": {"type": "local"}}}'
    pod = build_loss_terms(opts, step1(), 16)["pod"]
    assert pod.pod_kwargs["pod_options"] == {"switch": {"after": {"type": "local"}}}


def test_pod_prepro_refused_alike_by_pod_itself():
    x = [torch.ones(1, 2, 4, 4)]
    for prepro in ("abs", "square"):
        expected = refusal(lambda p=prepro: features_distillation(x, x, prepro=p))
        assert refusal(lambda p=prepro: validate_options(resolved("--pod_prepro", p))) == expected


@pytest.mark.parametrize("flag", ["--exkd_gt", "--exkd_sum"])
def test_excluded_kd_refused_alike_by_the_parser_and_the_loss_terms(flag):
    opts = resolved("--loss_kd", "1", flag)
    expected = refusal(lambda: build_loss_terms(opts, step1(), 16))
    assert refusal(lambda: validate_options(opts)) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ("--nca",),
        ("--nca", "--unce", "--step", "0"),
        ("--pseudo_soft", "soft_certain"),
        ("--ce_on_pseudo",),
        ("--ce_on_pseudo", "--pseudo", "median"),
    ],
)
def test_loss_rules_of_a_later_step_refused_before_any_work(argv):
    # build_loss_terms runs after the data scan and the models are loaded; the parser refuses first.
    opts = resolved("--step", "1", *argv)  # a later --step in argv wins
    model = _module()  # no --cosine: no scalar
    info = step1() if opts.step else StepInfo.from_classes(0, [16], 21, "voc")
    expected = refusal(lambda: build_loss_terms(opts, info, 16, model))
    assert refusal(lambda: validate_options(opts)) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ("--nca", "--cosine"),
        ("--nca", "--unce"),
        ("--nca", "--bce"),
        ("--pseudo_soft", "soft_certain", "--step", "0"),
        ("--pseudo_soft", "soft_uncertain", "--pseudo", "entropy"),
    ],
)
def test_loss_rules_accept_what_builds(argv):
    validate_options(resolved("--step", "1", *argv))


def _module(**kwargs) -> IncrementalSegmentationModule:
    return IncrementalSegmentationModule(nn.Identity(), nn.Identity(), 4, [16, 5], **kwargs)


@pytest.mark.parametrize("init", [i for i in REFERENCE_MULTIMODAL_INITS if i.endswith("_init")])
def test_multimodal_init_refused_alike_by_the_parser_and_the_model(init):
    model = _module(nb_background_modes=2)
    expected = refusal(lambda: model.init_new_classifier_multimodal("cpu", [], init))
    assert refusal(lambda: validate_options(resolved("--init_multimodal", init))) == expected


@pytest.mark.parametrize("init", ["max", "softmax_remove"])
def test_multimodal_init_with_one_mode_refused_alike_by_the_parser_and_the_model(init):
    model = _module(nb_background_modes=1)
    expected = refusal(lambda: model.init_new_classifier_multimodal("cpu", [], init))
    assert refusal(lambda: validate_options(resolved("--step", "1", "--init_multimodal", init))) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ("--step", "0", "--init_multimodal", "max"),  # step 0 has no new classifier to initialise
        ("--step", "1", "--init_multimodal", "max", "--init_balanced"),  # the balanced init comes first
        ("--step", "1", "--init_multimodal", "max", "--nb_background_modes", "2"),
    ],
)
def test_multimodal_init_accepted_where_it_applies_or_can_work(argv):
    validate_options(resolved(*argv))


@pytest.mark.parametrize("fusion", ["avg", "median", "SUM", ""])
def test_multimodal_fusion_refused_alike_by_the_parser_and_the_model(fusion):
    expected = refusal(lambda: _module(nb_background_modes=2, multimodal_fusion=fusion))
    assert refusal(lambda: validate_options(resolved("--multimodal_fusion", fusion))) == expected


@pytest.mark.parametrize("data_masking", ["all", "everything", "Current"])
def test_data_masking_refused_alike_by_the_parser_and_the_datasets(data_masking, tmp_path):
    expected = refusal(lambda: voc_masking_lut([1], [], data_masking))

    def voc() -> None:
        VOCSegmentationIncremental(tmp_path, labels=[1], data_masking=data_masking)

    assert refusal(voc) == expected  # refused before the (missing) data is read
    for name, task in (("voc", "15-5"), ("ade", "100-50"), ("s3dis", "8-5")):
        opts = resolved("--dataset", name, "--task", task)
        opts.data_masking = data_masking  # a hand-built or loaded namespace: the parser's choices are skipped
        assert refusal(lambda o=opts: validate_options(o)) == expected


def test_no_mask_refused_alike_for_voc_only(tmp_path):
    expected = refusal(lambda: VOCSegmentationIncremental(tmp_path, labels=[1], masking=False))
    assert refusal(lambda: validate_options(resolved("--no_mask"))) == expected
    validate_options(resolved("--no_mask", "--dataset", "ade", "--task", "100-50"))


def test_every_preset_passes_the_owners_checks():
    for method in METHOD_PRESETS:
        for name, task in (("voc", "15-5"), ("ade", "100-10"), ("scannet", "15-5")):
            opts = resolved("--method", method, "--dataset", name, "--task", task, "--step", "1")
            validate_options(opts)
