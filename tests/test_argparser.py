"""Command-line interface (reference ``argparser.py``): defaults snapshot, polarity, presets, derived options,
validation."""

from __future__ import annotations

import argparse
import copy
import io
import json

import pytest

import tasks
from argparser import (
    METHOD_PRESETS,
    NUM_CLASSES,
    get_argparser,
    load_options,
    modify_command_options,
    resolve_preset,
    save_options,
    validate_options,
)
from utils.errors import OptionsError, TaskError

# Every reference flag: dest -> default, written out from the reference's ``argparser.py``
# ``get_argparser`` (not generated from the parser).
REFERENCE_DEFAULTS = {
    # Performance / data
    "random_seed": 42,
    "num_workers": 4,
    "data_root": "data",
    "dataset": "voc",
    "num_classes": None,
    "dont_predict_bg": False,
    # Method
    "method": None,
    "strict_weights": True,
    "base_weights": False,
    # Training
    "epochs": 30,
    "fix_bn": False,
    "batch_size": 4,
    "crop_size": 512,
    "lr": 0.01,
    "lr_old": None,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "lr_policy": "poly",
    "lr_decay_step": 5000,
    "lr_decay_factor": 0.1,
    "lr_power": 0.9,
    "bce": False,
    # Validation
    "test_on_val": False,
    "val_on_trainset": False,
    "cross_val": False,
    "crop_val": True,
    # Logging
    "logdir": "./logs",
    "name": "Experiment",
    "sample_num": 0,
    "debug": False,
    "visualize": True,
    "print_interval": 10,
    "val_interval": 60,
    "ckpt_interval": 1,
    # Model
    "backbone": "resnet101",
    "output_stride": 16,
    "no_pretrained": False,
    "norm_act": "iabn_sync",
    "fusion_mode": "mean",
    "pooling": 32,
    # Test / checkpoint
    "test": False,
    "ckpt": None,
    "step_ckpt": None,
    "checkpoint": "./checkpoints/step",
    "opt_level": "O0",
    "date": "",
    "code_directory": ".",
    # Distillation / regularisation
    "freeze": False,
    "loss_de": 0.0,
    "loss_kd": 0.0,
    "prev_kd": 10.0,
    "novel_kd": 2.0,
    "regularizer": None,
    "reg_importance": 1.0,
    "reg_alpha": 0.9,
    "reg_no_normalize": False,
    "reg_iterations": 10,
    "icarl": False,
    "icarl_importance": 1.0,
    "icarl_disjoint": False,
    "icarl_bkg": False,
    "init_balanced": False,
    "unkd": False,
    "lgkd": False,
    "alpha": 1.0,
    "unce": False,
    # Incremental setting
    "task": "19-1",
    "step": 0,
    "no_mask": False,
    "data_masking": "current",
    "overlap": False,
    # Pseudo-labelling / PLOP
    "pseudo": None,
    "threshold": 0.9,
    "step_threshold": None,
    "ce_on_pseudo": False,
    "pseudo_nb_bins": None,
    "classif_adaptive_factor": False,
    "classif_adaptive_min_factor": 0.0,
    "pseudo_soft": None,
    "pseudo_soft_factor": 1.0,
    "pseudo_ablation": None,
    "kd_new": False,
    "pod": None,
    "pod_factor": 5.0,
    "pod_options": None,
    "pod_prepro": "pow",
    "no_pod_schedule": False,
    "pod_apply": "all",
    "pod_deeplab_mask": False,
    "pod_deeplab_mask_factor": None,
    "deeplab_mask_downscale": False,
    "pod_interpolate_last": False,
    "pod_logits": False,
    "pod_large_logits": False,
    "spp_scales": [1, 2, 4],
    # Other experimental options
    "nb_background_modes": 1,
    "init_multimodal": None,
    "multimodal_fusion": "sum",
    "align_weight": None,
    "align_weight_frequency": "never",
    "cosine": False,
    "nca": False,
    "nca_margin": 0.0,
    "kd_mask": None,
    "kd_mask_adaptative_factor": False,
    "disable_background": False,
    "ignore_test_bg": False,
    "entropy_min": 0.0,
    "entropy_min_mean_pixels": False,
    "kd_scheduling": False,
    "sample_weights_new": None,
    "temperature": 1.0,
    "temperature_semiold": 1.0,
    "temperature_apply": None,
    "kd_bce_sig": False,
    "kd_bce_sig_shape": "trim",
    "exkd_gt": False,
    "exkd_sum": False,
    "focal_loss": False,
    "focal_loss_new": False,
    "focal_loss_gamma": 2,
    "ce_on_new": False,
}

# Additive flags of docs/CONTRIBUTING-interfaces.md.
NEW_DEFAULTS = {
    "amp_dtype": "fp16",
    "abn_impl": "torch",
    "recompute_abn": False,
    "memory_format": "auto",
    "no_cudnn_benchmark": False,
    "deterministic": False,
    "device": "auto",
    "cache_dir": None,
    "results_dir": "results",
    "no_resume": False,
    "scan_workers": None,
    "no_progress": False,
    # The 3D track (issue 15).
    "optimizer": "sgd",
    "lr_decay_epochs": None,
    "num_points": 2048,
    "knn_k": 20,
    "knn_chunk": 8192,
    "xyz_norm": "block",
}

# Option types of the reference valued flags (booleans are covered by the defaults snapshot).
REFERENCE_TYPES = {
    int: [
        "random_seed",
        "num_workers",
        "num_classes",
        "epochs",
        "batch_size",
        "crop_size",
        "lr_decay_step",
        "sample_num",
        "print_interval",
        "val_interval",
        "ckpt_interval",
        "output_stride",
        "pooling",
        "reg_iterations",
        "step",
        "pseudo_nb_bins",
        "nb_background_modes",
        "focal_loss_gamma",
    ],
    float: [
        "lr",
        "lr_old",
        "momentum",
        "weight_decay",
        "lr_decay_factor",
        "lr_power",
        "loss_de",
        "loss_kd",
        "prev_kd",
        "novel_kd",
        "reg_importance",
        "reg_alpha",
        "icarl_importance",
        "alpha",
        "threshold",
        "step_threshold",
        "classif_adaptive_min_factor",
        "pseudo_soft_factor",
        "pod_factor",
        "pod_deeplab_mask_factor",
        "nca_margin",
        "entropy_min",
        "sample_weights_new",
        "temperature",
        "temperature_semiold",
    ],
    str: [
        "data_root",
        "dataset",
        "method",
        "lr_policy",
        "logdir",
        "name",
        "backbone",
        "norm_act",
        "fusion_mode",
        "ckpt",
        "step_ckpt",
        "checkpoint",
        "opt_level",
        "date",
        "code_directory",
        "regularizer",
        "task",
        "data_masking",
        "pseudo",
        "pseudo_soft",
        "pseudo_ablation",
        "pod",
        "pod_prepro",
        "pod_apply",
        "init_multimodal",
        "multimodal_fusion",
        "align_weight",
        "align_weight_frequency",
        "kd_mask",
        "temperature_apply",
        "kd_bce_sig_shape",
    ],
}

# The 3D track (issue 15) appends the point-cloud datasets and backbone after the reference choices.
REFERENCE_CHOICES = {
    "dataset": ["voc", "ade", "cityscapes_domain", "s3dis", "scannet"],
    "method": ["FT", "LWF", "LWF-MC", "ILT", "EWC", "RW", "PI", "MiB", "PLOP", "LGKD"],
    "lr_policy": ["poly", "step"],
    "backbone": ["resnet18", "resnet34", "resnet50", "resnet101", "dgcnn"],
    "output_stride": [8, 16],
    "norm_act": ["iabn_sync", "iabn", "abn", "std", "iabn_sync_test"],
    "fusion_mode": ["mean", "voting", "max"],
    "opt_level": ["O0", "O1", "O2", "O3"],
    "regularizer": ["ewc", "rw", "pi"],
    "data_masking": ["current", "current+old", "all", "new"],
    "pseudo_soft": ["soft_certain", "soft_uncertain"],
    "pseudo_ablation": ["corrected_errors", "removed_errors"],
    "pod": ["spatial", "local", "global"],
    "pod_apply": ["all", "backbone", "deeplab"],
    "init_multimodal": ["max", "softmax", "max_init", "softmax_init", "softmax_remove", "max_remove"],
    "align_weight": ["old", "background", "all"],
    "align_weight_frequency": ["never", "epoch", "task"],
    "kd_mask": ["oldbackground", "new"],
    "temperature_apply": ["all", "new", "old"],
    "kd_bce_sig_shape": ["trim", "sum"],
    "amp_dtype": ["fp16", "bf16"],
    "abn_impl": ["torch", "inplace_abn"],
    "memory_format": ["auto", "channels_last", "contiguous"],
    "device": ["auto", "cpu", "cuda"],
}

POD_AFTER = {"switch": {"after": {"extra_channels": "sum", "factor": 0.0005, "type": "local"}}}
POD_AFTER_ADE = {"switch": {"after": {"extra_channels": "sum", "factor": 0.00001, "type": "local"}}}
PLOP_RESOLVED = {
    "pod": "local",
    "pod_factor": 0.01,
    "pod_logits": True,
    "pod_options": POD_AFTER,
    "pseudo": "entropy",
    "threshold": 0.001,
    "classif_adaptive_factor": True,
    "init_balanced": True,
}
LGKD_VOC = {**PLOP_RESOLVED, "loss_kd": 1.0, "lgkd": True}
LGKD_ADE = {**LGKD_VOC, "pod_factor": 0.001, "pod_options": POD_AFTER_ADE}
RESOLVED_PRESETS = {
    "FT": {},
    "LWF": {"loss_kd": 100},
    "LWF-MC": {"icarl": True, "icarl_importance": 10},
    "ILT": {"loss_kd": 100, "loss_de": 100},
    "EWC": {"regularizer": "ewc", "reg_importance": 100},
    "RW": {"regularizer": "rw", "reg_importance": 100},
    "PI": {"regularizer": "pi", "reg_importance": 100},
    "MiB": {"loss_kd": 10, "unce": True, "unkd": True, "init_balanced": True},
    "PLOP": PLOP_RESOLVED,
}


def parse(*argv: str) -> argparse.Namespace:
    return get_argparser().parse_args(list(argv))


def resolved(*argv: str) -> argparse.Namespace:
    return modify_command_options(parse(*argv))


def _actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in get_argparser()._actions if action.dest != "help"}


def test_defaults_snapshot_is_exact():
    assert vars(parse()) == {**REFERENCE_DEFAULTS, **NEW_DEFAULTS}


def test_reference_types_and_choices():
    actions = _actions()
    for kind, dests in REFERENCE_TYPES.items():
        for dest in dests:
            assert actions[dest].type is kind, dest
    for dest, choices in REFERENCE_CHOICES.items():
        assert list(actions[dest].choices) == choices, dest
    assert actions["pod_options"].type is json.loads
    assert actions["spp_scales"].type is int and actions["spp_scales"].nargs == "+"
    assert actions["task"].choices == tasks.get_task_list()


def test_every_reference_flag_name():
    option_strings = {s for action in get_argparser()._actions for s in action.option_strings}
    for dest in REFERENCE_DEFAULTS:
        flag = "--fusion-mode" if dest == "fusion_mode" else f"--{dest}"
        assert flag in option_strings, flag


@pytest.mark.parametrize("dest", ["crop_val", "visualize", "strict_weights"])
def test_store_false_polarity(dest):
    assert getattr(parse(), dest) is True
    assert getattr(parse(f"--{dest}"), dest) is False


def test_store_true_flags_default_false_and_set_true():
    actions = _actions()
    flags = [dest for dest, action in actions.items() if isinstance(action, argparse._StoreTrueAction)]
    assert len(flags) > 40
    opts = parse(*[actions[dest].option_strings[0] for dest in flags])
    assert all(getattr(opts, dest) is True for dest in flags)


def test_fusion_mode_hyphen_and_alias():
    assert parse("--fusion-mode", "max").fusion_mode == "max"
    assert parse("--fusion_mode", "voting").fusion_mode == "voting"


def test_value_parsing():
    opts = parse(
        "--pod_options",
        json.dumps(POD_AFTER),
        "--spp_scales",
        "1",
        "2",
        "--lr",
        "0.5",
        "--backbone",
        "resnet18",
        "--step",
        "3",
    )
    assert opts.pod_options == POD_AFTER
    assert opts.spp_scales == [1, 2]
    assert opts.lr == 0.5 and opts.step == 3 and opts.backbone == "resnet18"


def test_invalid_choice_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        parse("--task", "15-7")
    assert "invalid choice" in capsys.readouterr().err


def test_unknown_task_lists_the_tasks_of_each_dataset_once(capsys):
    # The --task choices repeat names shared by datasets ('offline' five times); the refusal lists them
    # by dataset, as --help does, so each dataset's valid names can be read off.
    with pytest.raises(SystemExit):
        parse("--task", "15-9")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'15-9'" in err
    for dataset, table in tasks.TASKS.items():
        assert f"{dataset}: {', '.join(table)}" in err


@pytest.mark.parametrize(
    ("flag", "value"), [("--method", "XYZ"), ("--dataset", "coco"), ("--norm_act", "bn")]
)
def test_an_invalid_choice_lists_each_valid_value_once(flag, value, capsys):
    with pytest.raises(SystemExit):
        parse(flag, value)
    err = capsys.readouterr().err
    listed = err.split("choose from ", 1)[1].split(")", 1)[0].split(", ")
    action = {a.dest: a for a in get_argparser()._actions}[flag.removeprefix("--")]
    assert f"invalid choice: {value!r}" in err
    assert listed == [repr(c) for c in dict.fromkeys(action.choices)]


def test_help_renders_and_uses_groups():
    parser = get_argparser()
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    titles = [group.title for group in parser._action_groups]
    for title in (
        "Performance",
        "Dataset",
        "Method",
        "Training",
        "Validation",
        "Logging",
        "Model",
        "Checkpoint",
        "Incremental",
        "Distillation / regularisation",
        "ICaRL",
        "Pseudo-labelling",
        "POD",
        "Other experimental",
        "Deprecated / no-op",
    ):
        assert title in titles
    buffer = io.StringIO()
    parser.print_help(buffer)
    assert "--fusion-mode" in buffer.getvalue()
    for action in parser._actions:
        # The formatter appends the real default; a help text must not state another one.
        assert "(default" not in (action.help or ""), action.dest


def test_num_classes_and_derived_options():
    for dataset in ("voc", "ade", "cityscapes_domain", "s3dis", "scannet"):
        assert resolved("--dataset", dataset).num_classes == NUM_CLASSES[dataset]
    assert NUM_CLASSES == {
        "voc": 21,
        "ade": 151,
        "cityscapes_domain": 19,
        "cityscapes": 17,
        "cityscapes_classdomain": 19,
        "s3dis": 14,  # background + 13 classes (issue 15)
        "scannet": 21,  # unannotated (background) + 20 classes
    }
    opts = resolved()
    assert opts.no_overlap is True and opts.no_cross_val is True
    opts = resolved("--overlap", "--cross_val")
    assert opts.no_overlap is False and opts.no_cross_val is False


def test_sample_num_forced_to_zero_without_visualize():
    assert resolved("--sample_num", "5").sample_num == 5
    assert resolved("--sample_num", "5", "--visualize").sample_num == 0


def test_iabn_sync_test_is_an_alias():
    assert resolved("--norm_act", "iabn_sync_test").norm_act == "iabn_sync"
    assert resolved("--norm_act", "std").norm_act == "std"


@pytest.mark.parametrize("method", sorted(RESOLVED_PRESETS))
def test_presets_resolve_like_the_reference(method):
    defaults = resolved("--dataset", "voc")
    opts = resolved("--method", method)
    expected = RESOLVED_PRESETS[method]
    for option, value in expected.items():
        assert getattr(opts, option) == value, option
    # Everything else keeps its (default) value.
    for option, value in vars(defaults).items():
        if option not in expected and option != "method":
            assert getattr(opts, option) == value, option
    # PLOP uses the same factors on every dataset.
    if method == "PLOP":
        assert resolve_preset("PLOP", "ade") == resolve_preset("PLOP", "voc")


def test_lgkd_preset_depends_on_dataset():
    voc = resolved("--method", "LGKD", "--dataset", "voc", "--task", "15-5s")
    ade = resolved("--method", "LGKD", "--dataset", "ade", "--task", "100-10")
    for option, value in LGKD_VOC.items():
        assert getattr(voc, option) == value, option
    for option, value in LGKD_ADE.items():
        assert getattr(ade, option) == value, option
    # prev_kd / novel_kd are left to the scripts.
    assert (voc.prev_kd, voc.novel_kd) == (10.0, 2.0)
    assert resolved("--method", "LGKD", "--prev_kd", "1", "--novel_kd", "0").novel_kd == 0.0


def test_presets_override_command_line_values():
    opts = resolved(
        "--method",
        "LGKD",
        "--loss_kd",
        "5",
        "--pod_factor",
        "3",
        "--threshold",
        "0.5",
        "--pod_options",
        '{"switch": {}}',
        "--lr",
        "0.2",
    )
    assert (opts.loss_kd, opts.pod_factor, opts.threshold) == (1.0, 0.01, 0.001)
    assert opts.pod_options == POD_AFTER
    assert opts.lr == 0.2  # not part of the preset


def test_preset_table_is_not_shared_with_results():
    opts = resolved("--method", "PLOP")
    opts.pod_options["switch"]["after"]["factor"] = 123
    assert METHOD_PRESETS["PLOP"]["pod_options"] == POD_AFTER
    assert resolved("--method", "PLOP").pod_options == POD_AFTER


def test_modify_command_options_does_not_mutate_input():
    opts = parse(
        "--method",
        "LGKD",
        "--visualize",
        "--sample_num",
        "3",
        "--norm_act",
        "iabn_sync_test",
        "--pod_options",
        '{"switch": {"after": {"factor": 1}}}',
    )
    before = copy.deepcopy(vars(opts))
    pod_options = opts.pod_options
    new = modify_command_options(opts)
    assert new is not opts
    assert vars(opts) == before
    assert opts.pod_options is pod_options and pod_options == {"switch": {"after": {"factor": 1}}}
    assert not hasattr(opts, "no_overlap")
    assert new.pod_options is not pod_options


def test_unknown_method_in_hand_built_namespace():
    opts = parse()
    opts.method = "Bogus"
    with pytest.raises(OptionsError, match="LGKD"):
        modify_command_options(opts)


def test_validate_accepts_defaults_and_presets():
    validate_options(resolved())
    for method in METHOD_PRESETS:
        validate_options(resolved("--method", method, "--dataset", "ade", "--task", "50", "--step", "2"))
    # Not rejected: the trainer makes them work (LGKD without POD, output stride 8), --test without --ckpt.
    validate_options(resolved("--lgkd", "--loss_kd", "1", "--output_stride", "8", "--test"))
    validate_options(resolved("--pseudo", "threshold_0.7"))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--dataset", "ade", "--task", "15-5s"], "100-50"),
        (["--dataset", "voc", "--task", "100-10"], "15-5s_w"),
        (["--task", "15-5", "--step", "2"], "from 0 to 1"),
        (["--task", "15-5", "--step", "-1"], "from 0 to 1"),
    ],
)
def test_validate_task_errors(argv, match):
    with pytest.raises(TaskError, match=match):
        validate_options(resolved(*argv))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--data_masking", "all"], "current"),
        (["--no_mask"], "--data_masking"),
        (["--exkd_gt"], "--exkd_gt"),
        (["--exkd_sum"], "--exkd_gt/--exkd_sum"),
        (["--pod_prepro", "abs"], "pow"),
        (["--pod_prepro", "square"], "pow"),
        (["--pod_options", '{"switch": {"before": {"prepro": "abs"}}}'], "abs"),
        (["--pod_options", "[1, 2]"], "JSON object"),
        (["--init_multimodal", "max_init"], "max_remove"),
        (["--init_multimodal", "softmax_init"], "softmax_remove"),
        (["--pseudo", "entropi"], "entropy"),
        (["--pseudo", "threshold_high"], "threshold_"),
        (["--multimodal_fusion", "avg"], "softmax"),
    ],
)
def test_validate_option_errors(argv, match):
    with pytest.raises(OptionsError, match=match):
        validate_options(resolved(*argv))


def test_no_mask_is_allowed_for_ade():
    validate_options(resolved("--no_mask", "--dataset", "ade", "--task", "100-50"))


def test_save_options_round_trip(tmp_path):
    opts = resolved("--method", "LGKD", "--dataset", "ade", "--task", "100-10", "--step", "1")
    path = tmp_path / "sub" / "options.json"
    save_options(opts, path)
    text = path.read_text()
    data = json.loads(text)
    assert list(data) == sorted(data)
    assert data == vars(opts)
    assert load_options(path) == opts
    assert [p.name for p in path.parent.iterdir()] == ["options.json"]  # no temp file left behind
    save_options({"b": 1, "a": tmp_path}, path)  # mappings and non-JSON values (as strings) work too
    assert json.loads(path.read_text()) == {"a": str(tmp_path), "b": 1}
