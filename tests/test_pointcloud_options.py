"""Options of the 3D track (issue 15): point-cloud defaults, explicit flags, the scope table and its refusals.

* ``--dataset s3dis|scannet`` gives DGCNN and the 3DPC-CISS training settings to every option of
  :data:`argparser.POINT_CLOUD_DEFAULTS` the user did not set; an explicit flag wins even when its value is
  the image default (``--batch_size 4``), which only the parser's record of explicit flags can tell;
* every option of :data:`argparser.OPTION_SCOPES` is refused, through the real command line, where it does
  not apply (POD, crops, output stride, ImageNet weights on point clouds; point sampling on images; momentum
  with Adam), and accepted where it does; method presets never set such options;
* the image-only shape rules do not apply to point clouds, which have their own (``--knn_k`` <= points);
* Adam and the epoch-based step decay reproduce 3DPC-CISS's optimiser and ``StepLR``.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import argparser
import run
from argparser import (
    DATASET_DEFAULTS,
    IMAGE_BACKBONES,
    IMAGE_DATASETS,
    METHOD_PRESETS,
    OPTION_SCOPES,
    POD_OPTIONS,
    POINT_BACKBONES,
    POINT_CLOUD_DATASETS,
    POINT_CLOUD_DEFAULTS,
    InRange,
    get_argparser,
    modify_command_options,
    parse_command_line,
    resolve_preset,
    validate_options,
)
from utils.errors import OptionsError
from utils.scheduler import build_scheduler

TASK = {"voc": "15-5", "ade": "100-50", "cityscapes_domain": "11-5", "s3dis": "8-5", "scannet": "15-5"}


def actions() -> dict[str, argparse.Action]:
    return {a.dest: a for a in get_argparser()._actions if a.dest != "help"}


def command(dataset: str, *argv: str) -> list[str]:
    return ["--dataset", dataset, "--task", TASK[dataset], "--num_workers", "0", *argv]


def parsed(dataset: str, *argv: str) -> tuple[argparse.Namespace, frozenset[str]]:
    return parse_command_line(command(dataset, *argv))


# Free-text options whose valid values the parser does not list.
VALID_TEXT = {"pod_prepro": "relu", "code_directory": "elsewhere"}


def other_value(dest: str) -> list[str]:
    """A command-line setting of ``dest`` that differs from its default and is valid on its own."""
    action = actions()[dest]
    flag = action.option_strings[0]
    if dest in VALID_TEXT:
        return [flag, VALID_TEXT[dest]]
    if action.nargs == 0:  # store_true / store_false
        return [flag]
    if action.choices:
        return [flag, str(next(c for c in action.choices if c != action.default))]
    if isinstance(action, InRange):
        default = action.default[0] if isinstance(action.default, list) else action.default
        candidates = [default + 1 if default is not None else 1, 1, 0.5]
        value = next(v for v in candidates if v in action.valid and v != default)
        return [flag, str(value)]
    assert action.type is json.loads, f"add a valid value of {flag} to VALID_TEXT"
    return [flag, "{}"]


# ------------------------------------------------------------------------------------------- explicit flags
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], set()),
        (["--batch_size", "4"], {"batch_size"}),  # the default value, still explicit
        (["--batch_size=4", "--lr", "0.01"], {"batch_size", "lr"}),
        (["--no_pretrained", "--crop_val", "--visualize"], {"no_pretrained", "crop_val", "visualize"}),
        (["--spp_scales", "1", "2"], {"spp_scales"}),
        (["--fusion-mode", "mean"], {"fusion_mode"}),
        (["--fusion_mode", "mean"], {"fusion_mode"}),
        (["--pod_options", "{}"], {"pod_options"}),
        (["--num_poi", "512"], {"num_points"}),  # argparse's unambiguous prefixes
    ],
)
def test_explicit_dests_names_exactly_the_options_on_the_command_line(argv, expected):
    parser = get_argparser()
    parser.parse_args(argv)
    assert parser.explicit_dests(argv) == expected


def test_explicit_dests_reads_sys_argv_like_parse_args(monkeypatch):
    monkeypatch.setattr("sys.argv", ["run.py", "--epochs", "30", "--dataset", "scannet"])
    parser = get_argparser()
    assert parser.explicit_dests() == {"epochs", "dataset"}


# ---------------------------------------------------------------------------------------------- defaults
@pytest.mark.parametrize("dataset", POINT_CLOUD_DATASETS)
def test_point_cloud_defaults_fill_every_option_not_set(dataset):
    opts, _ = parsed(dataset)
    for option, value in POINT_CLOUD_DEFAULTS.items():
        assert getattr(opts, option) == value, option
    assert DATASET_DEFAULTS[dataset] is POINT_CLOUD_DEFAULTS
    assert (opts.backbone, opts.optimizer, opts.no_pretrained) == ("dgcnn", "adam", True)
    # The 3DPC-CISS training settings (scripts/train_*_segmentor.sh): Adam 0.001 halved every 50 of 100
    # epochs, batch 32, 2048 points, k = 20, weight decay 1e-4.
    assert (opts.lr, opts.lr_decay_epochs, opts.lr_decay_factor, opts.epochs) == (0.001, 50, 0.5, 100)
    assert (opts.batch_size, opts.num_points, opts.knn_k, opts.weight_decay) == (32, 2048, 20, 1e-4)
    validate_options(opts)


@pytest.mark.parametrize("dataset", IMAGE_DATASETS)
def test_image_datasets_keep_the_reference_defaults(dataset):
    opts, _ = parsed(dataset)
    defaults = modify_command_options(get_argparser().parse_args(command(dataset)))
    assert vars(opts) == vars(defaults)
    assert (opts.backbone, opts.optimizer, opts.lr, opts.batch_size) == ("resnet101", "sgd", 0.01, 4)


@pytest.mark.parametrize("option", sorted(POINT_CLOUD_DEFAULTS))
def test_an_explicit_value_wins_even_when_it_is_the_image_default(option):
    action = actions()[option]
    if action.nargs == 0:
        flag_value = [action.option_strings[0]]  # a store_true flag can only say True
        expected = not action.default
    elif option == "backbone":
        flag_value, expected = ["--backbone", "dgcnn"], "dgcnn"
    else:
        flag_value, expected = [action.option_strings[0], str(action.default)], action.default
        if action.default is None:
            flag_value, expected = [action.option_strings[0], "7"], 7
    opts, explicit = parsed("scannet", *flag_value)
    assert option in explicit
    assert getattr(opts, option) == expected
    # Every other option still gets its point-cloud default.
    for other, value in POINT_CLOUD_DEFAULTS.items():
        if other != option:
            assert getattr(opts, other) == value, other


def test_the_acceptance_command_keeps_its_batch_and_epochs():
    opts, explicit = parse_command_line(
        ["--data_root", "D", "--dataset", "scannet", "--task", "15-5", "--step", "1", "--method", "LGKD",
         "--epochs", "1", "--batch_size", "4", "--num_workers", "0"]
    )  # fmt: skip
    validate_options(opts, explicit)
    assert (opts.epochs, opts.batch_size, opts.backbone, opts.num_points) == (1, 4, "dgcnn", 2048)


def test_without_a_record_values_other_than_the_default_count_as_set():
    # A hand-built or loaded namespace: the record of explicit flags is unknown.
    raw = get_argparser().parse_args(command("scannet", "--batch_size", "8", "--epochs", "30"))
    opts = modify_command_options(raw)
    assert opts.batch_size == 8  # differs from the image default: the user's
    assert opts.epochs == 100  # equals the image default 30: indistinguishable from "not set"
    assert modify_command_options(raw, explicit={"epochs"}).epochs == 30


# ---------------------------------------------------------------------------------------------- presets
@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
@pytest.mark.parametrize("dataset", POINT_CLOUD_DATASETS)
def test_presets_on_point_clouds_are_the_image_presets_without_out_of_scope_options(method, dataset):
    preset = resolve_preset(method, dataset)
    outside = argparser.out_of_scope_dests(argparse.Namespace(dataset=dataset))
    assert {**preset} == {k: v for k, v in resolve_preset(method, "voc").items() if k not in outside}
    opts, explicit = parsed(dataset, "--method", method, "--step", "1")
    validate_options(opts, explicit)
    assert opts.pod is None and opts.pod_logits is False and opts.pod_options is None
    if method in ("PLOP", "LGKD"):
        # PLOP-style pseudo-labels, adaptive factor and balanced init stay.
        assert (opts.pseudo, opts.threshold, opts.classif_adaptive_factor) == ("entropy", 0.001, True)
        assert opts.init_balanced is True
    if method == "LGKD":
        assert (opts.lgkd, opts.loss_kd) == (True, 1.0)


# ---------------------------------------------------------------------------------------------- scopes
def scoped_cases() -> list[tuple[str, str]]:
    return [(scope.by, dest) for scope in OPTION_SCOPES for dest in scope.dests]


def scope_of(dest: str):
    return next(scope for scope in OPTION_SCOPES if dest in scope.dests)


def test_the_scope_table_covers_the_pod_and_point_cloud_groups():
    groups = {g.title: {a.dest for a in g._group_actions} for g in get_argparser()._action_groups}
    assert set(POD_OPTIONS) == groups["POD"]
    point_rows = [s for s in OPTION_SCOPES if s.by == "dataset" and s.values == POINT_CLOUD_DATASETS]
    assert groups["Point clouds"] == {dest for scope in point_rows for dest in scope.dests}
    dests = [d for s in OPTION_SCOPES for d in s.dests]
    assert len(dests) == len(set(dests))  # one row per option
    assert set(dests) <= set(actions())


@pytest.mark.parametrize(("by", "dest"), scoped_cases(), ids=lambda x: x)
def test_a_scoped_option_is_refused_exactly_where_it_does_not_apply(by, dest):
    scope = scope_of(dest)
    flag_value = other_value(dest)
    if by == "dataset":
        settings = [(dataset, []) for dataset in (*IMAGE_DATASETS, *POINT_CLOUD_DATASETS)]
    else:
        settings = [("voc", ["--optimizer", "sgd"]), ("voc", ["--optimizer", "adam"]),
                    ("scannet", ["--optimizer", "sgd"]), ("scannet", [])]  # fmt: skip
    for dataset, extra in settings:
        opts, explicit = parsed(dataset, *extra, *flag_value)
        if scope.applies(opts):
            validate_options(opts, explicit)
        else:
            with pytest.raises(OptionsError) as err:
                validate_options(opts, explicit)
            message = str(err.value)
            assert f"--{dest} does not apply with --{by} {getattr(opts, by)}" in message, message
            assert scope.reason in message and f"Remove --{dest}" in message
            assert "\n" not in message


def test_every_flag_the_user_set_is_named_at_once():
    opts, explicit = parsed("s3dis", "--pod", "local", "--pod_factor", "3", "--spp_scales", "1")
    with pytest.raises(OptionsError, match="--pod, --pod_factor, --spp_scales do not apply"):
        validate_options(opts, explicit)


def test_a_flag_given_with_its_default_value_is_refused_too():
    opts, explicit = parsed("scannet", "--crop_size", "512")
    with pytest.raises(OptionsError, match="--crop_size does not apply"):
        validate_options(opts, explicit)
    validate_options(opts)  # without the record, the default value cannot be told from "not set"


@pytest.mark.parametrize("dataset", POINT_CLOUD_DATASETS)
@pytest.mark.parametrize("backbone", IMAGE_BACKBONES)
def test_image_backbones_are_refused_on_point_clouds(dataset, backbone):
    opts, explicit = parsed(dataset, "--backbone", backbone)
    with pytest.raises(OptionsError, match=f"--backbone {backbone} cannot be used with --dataset {dataset}"):
        validate_options(opts, explicit)


@pytest.mark.parametrize("dataset", IMAGE_DATASETS)
def test_dgcnn_is_refused_on_images(dataset):
    opts, explicit = parsed(dataset, "--backbone", "dgcnn")
    with pytest.raises(OptionsError, match="the backbones of voc, ade, cityscapes_domain are resnet18"):
        validate_options(opts, explicit)


def test_constants_match_the_model_code():
    import models

    assert POINT_BACKBONES == models.POINT_BACKBONES
    assert argparser.DEFAULT_KNN_CHUNK == models.DEFAULT_KNN_CHUNK
    assert actions()["knn_k"].default == models.DEFAULT_K


def test_refusal_through_the_command_line_is_one_paragraph_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = command("scannet", "--pod", "local", "--data_root", str(tmp_path))
    argv += ["--checkpoint", str(out / "c"), "--logdir", str(out / "l"), "--results_dir", str(out / "r")]
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --pod does not apply with --dataset scannet") and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize("dataset", POINT_CLOUD_DATASETS)
def test_point_clouds_have_their_own_size_rule(dataset):
    opts, explicit = parsed(dataset, "--knn_k", "64", "--num_points", "64")
    validate_options(opts, explicit)
    opts, explicit = parsed(dataset, "--knn_k", "65", "--num_points", "64")
    with pytest.raises(OptionsError, match="--knn_k 65 is more than --num_points 64"):
        validate_options(opts, explicit)


def test_one_cloud_per_process_trains_the_point_model():
    # The image rule "--batch_size >= 2" comes from DeepLab's image pooling; DGCNN's normalisation layers
    # see the N points of a cloud, and the global feature is a maximum (no statistics over the batch).
    opts, explicit = parsed("scannet", "--batch_size", "1")
    validate_options(opts, explicit)
    from segmentation_module import make_model

    model = make_model(argparse.Namespace(**{**vars(opts), "knn_k": 4, "device": "cpu"}), classes=[16])
    model.train()
    points = torch.rand(1, 9, 32)
    logits = model(points)[0]
    assert logits.shape == (1, 16, 32) and torch.isfinite(logits).all()
    logits.sum().backward()


# ---------------------------------------------------------------------------------------------- optimiser
def test_adam_has_the_sgd_param_groups(tmp_path):
    from segmentation_module import make_model

    opts, _ = parsed("scannet", "--step", "1", "--lr_old", "0.1")
    opts = argparse.Namespace(**{**vars(opts), "knn_k": 4, "device": "cpu"})
    model = make_model(opts, classes=[16, 5])
    adam = run.build_optimizer(opts, model)
    sgd = run.build_optimizer(argparse.Namespace(**{**vars(opts), "optimizer": "sgd"}), model)
    assert isinstance(adam, torch.optim.Adam) and isinstance(sgd, torch.optim.SGD)
    assert adam.defaults["betas"] == (0.9, 0.999)
    assert len(adam.param_groups) == len(sgd.param_groups) == 4
    for a, s in zip(adam.param_groups, sgd.param_groups):
        assert [id(p) for p in a["params"]] == [id(p) for p in s["params"]]
        assert (a["lr"], a["weight_decay"]) == (s["lr"], s["weight_decay"])
    assert adam.param_groups[2]["lr"] == pytest.approx(0.1 * 0.001)


@pytest.mark.parametrize(("epochs", "iters", "decay"), [(6, 3, 2), (100, 7, 50), (5, 1, 1), (4, 2, 10)])
def test_epoch_step_decay_equals_a_per_epoch_steplr(epochs, iters, decay):
    """3DPC-CISS steps ``StepLR(step_size=50, gamma=0.5)`` once per epoch; ours steps every iteration."""
    opts = argparse.Namespace(
        lr_policy="step", lr_decay_step=5000, lr_decay_epochs=decay, lr_decay_factor=0.5, epochs=epochs
    )
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.001)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.001)
    scheduler = build_scheduler(opts, ours, max_iters=epochs * iters)
    reference = torch.optim.lr_scheduler.StepLR(theirs, step_size=decay, gamma=0.5)
    for _ in range(epochs):
        for _ in range(iters):
            assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
            ours.step()
            scheduler.step()
        theirs.step()
        reference.step()


def test_without_epochs_the_step_decay_counts_iterations():
    opts = argparse.Namespace(
        lr_policy="step", lr_decay_step=3, lr_decay_epochs=None, lr_decay_factor=0.5, epochs=10
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(opts, optimizer, max_iters=100)
    assert scheduler.step_size == 3
