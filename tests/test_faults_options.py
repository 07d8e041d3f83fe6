"""Every option is checked before any work (issue 11, section 2).

* every numeric option of the parser declares a valid range (one mechanism, :class:`argparser.InRange`); a
  flag added later without one fails :func:`test_every_numeric_option_declares_a_range`;
* each declared bound is tested through the real command line (``run.main``, the function behind
  ``python run.py``): the value just outside is refused with the flag, the value and the range, nothing is
  written; the bound itself is accepted;
* size combinations the model cannot train on (one image per process, a 1x1 feature map) are refused, and
  the premise of each refusal is checked on the real model;
* worker counts above the CPUs are capped with a one-line warning, also in a real run;
* the help of the inverted (store_false) flags says what passing them does.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import argparser
import run
from argparser import (
    METHOD_PRESETS,
    InRange,
    available_cpus,
    check_ranges,
    get_argparser,
    modify_command_options,
    validate_options,
)
from segmentation_module import make_model
from tests.conftest import ROOT, make_opts
from tests.test_cli_errors import base_args, nothing_written, tiny_voc_tree
from utils.errors import OptionsError


def ranged_actions() -> list[InRange]:
    return [a for a in get_argparser()._actions if isinstance(a, InRange)]


def resolved(*argv: str) -> argparse.Namespace:
    return modify_command_options(get_argparser().parse_args(list(argv)))


def boundary_values(action: InRange) -> tuple[list[str], list[str]]:
    """(accepted, refused) command-line values at the edges of ``action``'s declared range."""
    valid, kind = action.valid, action.type
    accepted: list[str] = []
    refused: list[str] = ["nan", "inf", "-inf"] if kind is float else []
    for bound, is_open, outward in ((valid.low, valid.low_open, -1), (valid.high, valid.high_open, +1)):
        if bound is None:
            continue
        if kind is int:
            inside = int(bound) - outward if is_open else int(bound)
            outside = int(bound) if is_open else int(bound) + outward
            accepted.append(str(inside))
            refused.append(str(outside))
        else:
            # The closest floats on each side of the bound: the check is exact, not approximately right.
            towards = math.inf * outward
            inside = math.nextafter(bound, -towards) if is_open else float(bound)
            outside = float(bound) if is_open else math.nextafter(bound, towards)
            accepted.append(repr(inside))
            refused.append(repr(outside))
    return accepted, refused


# ---------------------------------------------------------------------------------------------- declarations
def test_every_numeric_option_declares_a_range():
    numeric = []
    for action in get_argparser()._actions:
        default_is_number = isinstance(action.default, int | float) and not isinstance(action.default, bool)
        if action.type in (int, float) or (default_is_number and action.nargs != 0):
            numeric.append(action.dest)
            assert isinstance(action, InRange) or action.choices, (
                f"{action.option_strings[0]} is numeric but declares no range: add it with "
                "**ranged(type, Range) (or choices)"
            )
    assert len(numeric) >= 45


def test_declared_defaults_are_in_range_and_ranges_are_in_the_help():
    for action in ranged_actions():
        if action.default is not None:
            assert check_one(action, action.default) is None, action.dest
        assert action.valid.describe(action.type) in action.help, action.dest


def check_one(action: InRange, value: object) -> str | None:
    return argparser.out_of_range(action.option_strings[0], value, action.valid, action.type)


def test_every_declared_range_has_something_to_refuse():
    # A range that refuses nothing would be a declaration in name only; only options without effect
    # (and --step, whose range depends on --task and is checked against it) may take any finite value.
    unbounded = {a.dest for a in ranged_actions() if a.valid.low is None and a.valid.high is None}
    assert unbounded == {
        "num_classes",
        "step",
        "step_threshold",
        "temperature",
        "temperature_semiold",
        "ckpt_interval",
    }


# ---------------------------------------------------------------------------------------------- boundaries
@pytest.mark.parametrize("action", ranged_actions(), ids=lambda a: a.dest)
def test_range_boundaries_through_the_command_line(action, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # any output would land here
    flag = action.option_strings[0]
    accepted, refused = boundary_values(action)
    for value in refused:
        with pytest.raises(SystemExit) as exc:
            run.main([f"{flag}={value}"])  # "=": argparse reads "-inf" or "-5e-324" after a space as a flag
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"error: {flag} "), err
        assert "out of range" in err and action.valid.describe(action.type) in err, err
        assert "Traceback" not in err and "usage:" not in err
    for value in accepted:
        opts = resolved(f"{flag}={value}")
        check_ranges(opts)  # the same declaration, on the resolved options
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("flag", "value", "valid"),
    [
        # The cases of the issue, each of which used to end in a traceback or in a silent wrong run.
        ("--batch_size", "0", "an integer >= 1"),
        ("--lr", "-1", "a number > 0"),
        ("--crop_size", "0", "an integer >= 1"),
        ("--val_interval", "0", "an integer >= 1"),
        ("--random_seed", "-1", "an integer from 0 to 4294967295"),
        ("--reg_iterations", "0", "an integer >= 1"),
        ("--spp_scales", "0", "an integer >= 1"),
        ("--momentum", "0", "a number in (0, 1)"),
        ("--threshold", "1.5", "a number in [0, 1]"),
        ("--loss_kd", "-0.5", "a number >= 0"),
    ],
)
def test_issue_cases_are_refused_before_any_work(flag, value, valid, tmp_path, capsys):
    argv = [*base_args(tmp_path / "no-data", tmp_path), flag, value]
    with pytest.raises(SystemExit) as exc:
        run.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag} {value}" in err.replace(".0 ", " ") and valid in err
    assert nothing_written(tmp_path)


def test_spp_scales_checks_every_value(capsys):
    with pytest.raises(SystemExit):
        run.main(["--spp_scales", "1", "2", "0"])
    assert "--spp_scales 0 is out of range" in capsys.readouterr().err


def test_python_run_py_prints_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "run.py", "--crop_size", "-3", "--checkpoint", str(tmp_path / "c")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "error: --crop_size -3 is out of range: it must be an integer >= 1. `python run.py --help` lists "
        "every option and its valid values.\n"
    )
    assert not (tmp_path / "c").exists()


def test_range_is_checked_again_on_resolved_options():
    for dataset, task, step in (("voc", "15-5s", 1), ("ade", "100-10", 1), ("cityscapes_domain", "11-5", 1)):
        for method in METHOD_PRESETS:
            argv = ("--method", method, "--dataset", dataset, "--task", task, "--step", str(step))
            check_ranges(resolved(*argv))
    for dest, value, needle in (
        ("lr", -1.0, "--lr -1.0 is out of range"),
        ("batch_size", 0, "--batch_size 0"),
        ("spp_scales", [1, 0], "--spp_scales 0"),
        ("threshold", float("nan"), "--threshold nan"),
        ("num_workers", -2, "--num_workers -2"),
        ("epochs", "3", "--epochs '3'"),  # a string from a hand-made namespace is not a number
    ):
        opts = resolved()
        setattr(opts, dest, value)
        with pytest.raises(OptionsError, match=needle.replace("(", r"\(").replace(".", r"\.")):
            validate_options(opts)
    opts = resolved()
    opts.lr_old = None  # None where None is the default is fine
    validate_options(opts)


@pytest.mark.parametrize(
    ("pseudo", "ok"),
    [
        ("threshold_0", True),
        ("threshold_1", True),
        ("threshold_0.7", True),
        ("threshold_1.5", False),
        ("threshold_-0.1", False),
        ("threshold_nan", False),
        ("threshold_inf", False),
    ],
)
def test_pseudo_fixed_threshold_is_a_probability(pseudo, ok):
    opts = resolved("--pseudo", pseudo)
    if ok:
        validate_options(opts)
    else:
        with pytest.raises(OptionsError, match=r"threshold_<t>: t .* out of range.*\[0, 1\]"):
            validate_options(opts)


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"factor": -1}, "switch.after.factor is -1"),
        ({"factor": "big"}, "switch.after.factor is 'big'"),
        ({"factor": float("nan")}, "switch.after.factor is nan"),
        ({"spp_scales": [1, 0]}, "switch.after.spp_scales is [1, 0]"),
        ({"spp_scales": []}, "spp_scales is []"),
        ({"spp_scales": [1.5]}, "spp_scales is [1.5]"),
        ({"upscale_mask_topk": 0}, "upscale_mask_topk is 0"),
    ],
)
def test_pod_options_numbers_are_checked(section, needle):
    opts = resolved("--pod", "local", "--pod_options", json.dumps({"switch": {"after": section}}))
    with pytest.raises(OptionsError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        validate_options(opts)
    good = {"switch": {"after": {"factor": 0, "spp_scales": [1, 2], "upscale_mask_topk": 2}}}
    validate_options(resolved("--pod", "local", "--pod_options", json.dumps(good)))


# ---------------------------------------------------------------------------------------------- combinations
@pytest.mark.parametrize("norm_act", ["iabn_sync", "std"])
def test_one_image_per_process_cannot_train(norm_act):
    # The premise of the refusal, on the real model: batch statistics of the image-pooling branch need two
    # images per process, whatever the normalisation layer.
    model = make_model(make_opts(norm_act=norm_act), classes=[16]).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        model(torch.zeros(1, 3, 32, 32))
    model(torch.zeros(2, 3, 32, 32))
    with pytest.raises(OptionsError, match="--batch_size 2 or more"):
        validate_options(resolved("--batch_size", "1", "--norm_act", norm_act))
    validate_options(resolved("--batch_size", "2", "--norm_act", norm_act))
    validate_options(resolved("--batch_size", "1", "--test"))  # evaluation uses running statistics


@pytest.mark.parametrize("output_stride", [8, 16])
def test_crop_that_leaves_a_one_pixel_feature_map_is_refused(output_stride):
    model = make_model(make_opts(output_stride=output_stride), classes=[16]).eval()
    for crop in (output_stride - 1, output_stride, output_stride + 1, 2 * output_stride):
        with torch.no_grad():
            features = model.body(torch.zeros(1, 3, crop, crop))
        features = features[0] if isinstance(features, tuple) else features
        assert features.shape[-1] == math.ceil(crop / output_stride)  # the rule the check relies on
        opts = resolved("--crop_size", str(crop), "--output_stride", str(output_stride))
        if crop <= output_stride:
            with pytest.raises(OptionsError, match=f"at least {output_stride + 1}"):
                validate_options(opts)
        else:
            validate_options(opts)
    # Testing on full images (--crop_val passed) does not use the crop.
    full_images = ("--test", "--crop_val")
    validate_options(resolved("--crop_size", "4", "--output_stride", str(output_stride), *full_images))


@pytest.fixture()
def voc_tree(tmp_path: Path) -> Path:
    return tiny_voc_tree(tmp_path / "voc")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--batch_size", "1", "--batch_size 1 cannot train"),
        ("--crop_size", "16", "--crop_size 16 is too small"),
    ],
)
def test_combinations_refused_by_the_command_line(voc_tree, tmp_path, capsys, option, value, needle):
    out = tmp_path / "out"
    assert run.main([*base_args(voc_tree, out), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {needle}") and "Traceback" not in err
    assert nothing_written(out)


# ---------------------------------------------------------------------------------------------- workers
def test_worker_counts_above_the_cpus_are_capped_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(argparser, "available_cpus", lambda: 3)
    monkeypatch.delenv("RANK", raising=False)
    opts = resolved("--num_workers", "1000", "--scan_workers", "64")
    assert (opts.num_workers, opts.scan_workers) == (3, 3)
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "warning: --num_workers 1000 is more than the 3 CPUs available to this process; using 3.",
        "warning: --scan_workers 64 is more than the 3 CPUs available to this process; using 3.",
    ]
    opts = resolved()  # the default, 4, is above 3 CPUs too
    assert opts.num_workers == 3 and opts.scan_workers is None
    assert capsys.readouterr().err.count("\n") == 1
    opts = resolved("--num_workers", "3", "--scan_workers", "0")
    assert (opts.num_workers, opts.scan_workers) == (3, 0)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "1")  # other torchrun ranks cap silently
    assert resolved("--num_workers", "9").num_workers == 3
    assert capsys.readouterr().err == ""


def test_available_cpus_follows_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(argparser.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert available_cpus() == 1
    monkeypatch.delattr(argparser.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(argparser.os, "cpu_count", lambda: None)
    assert available_cpus() == 1


def test_thousand_workers_run_capped(voc_tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert run.main(base_args(voc_tree, out, **{"--num_workers": "1000"})) == 0
    cpus = available_cpus()
    err = capsys.readouterr().err
    assert f"warning: --num_workers 1000 is more than the {cpus} CPUs available to this process" in err
    saved = json.loads((out / "logs/15-5s-voc/err/step0/opts.json").read_text())
    assert saved["num_workers"] == cpus  # the options file records what the run used


# ---------------------------------------------------------------------------------------------- help
def test_inverted_flags_say_what_passing_them_does():
    inverted = [a for a in get_argparser()._actions if isinstance(a, argparse._StoreFalseAction)]
    assert {a.dest for a in inverted} == {"crop_val", "visualize", "strict_weights"}
    for action in inverted:
        assert action.help.startswith("pass it to"), action.dest
        assert f"sets {action.dest} False" in action.help, action.dest
        assert not action.help.startswith("True"), action.dest
