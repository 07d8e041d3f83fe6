"""Checkpoint I/O (reference ``run.py`` ``save_ckpt``, the LGKD v1.0 release files, ImageNet weights as
``segmentation_module.py`` ``make_model`` loads them): safe loading, atomic saving, prefix handling, mismatch
errors."""

from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from models import build_backbone
from modules import InPlaceABNSync
from segmentation_module import make_model
from tests.conftest import make_opts
from utils import checkpoint as ckpt_mod
from utils.checkpoint import (
    IMAGENET_URL,
    add_module_prefix,
    checkpoint_summary,
    guess_backbone,
    load_checkpoint,
    load_imagenet_weights,
    load_model_state,
    save_checkpoint,
    strip_module_prefix,
)
from utils.errors import CheckpointError


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb weights and running statistics so that a wrong load would show in the outputs."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.05)
                if name.endswith("running_var"):
                    tensor.abs_()
            else:
                tensor.fill_(3)
    return model


@pytest.fixture(scope="module")
def step1_model():
    torch.manual_seed(0)
    return _trained_like(make_model(make_opts(), classes=[16, 1])).eval()


def _reference_checkpoint(model: torch.nn.Module) -> dict:
    """A checkpoint in the reference's layout (``run.py`` ``save_ckpt``): DDP-prefixed model_state plus
    training state."""
    return {
        "epoch": 30,
        "model_state": add_module_prefix(model.state_dict()),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
        "scheduler_state": {"last_epoch": 300, "base_lrs": [0.001], "max_iters": 300, "power": 0.9},
        "best_score": np.float64(0.625),
        "trainer_state": {"regularizer": None},
    }


def test_save_and_load_round_trip_with_and_without_prefix(tmp_path, step1_model):
    path = tmp_path / "ckpt" / "15-5s-voc_LGKD_1.pth"
    save_checkpoint(_reference_checkpoint(step1_model), path)
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 30 and loaded["best_score"] == pytest.approx(0.625)
    assert next(iter(loaded["model_state"])) == "module.body.mod1.conv1.weight"

    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = step1_model(x)[0]
    for state in (loaded["model_state"], strip_module_prefix(loaded["model_state"])):
        torch.manual_seed(1)
        fresh = make_model(make_opts(), classes=[16, 1]).eval()
        result = load_model_state(fresh, state, strict=True, source=str(path))
        assert result.missing_keys == [] and result.unexpected_keys == []
        with torch.no_grad():
            assert torch.equal(fresh(x)[0], expected)
        assert fresh.body.mod1.bn1.num_batches_tracked.item() == 3


def test_next_step_model_loads_with_strict_false(step1_model):
    state = add_module_prefix(step1_model.state_dict())
    model = make_model(make_opts(), classes=[16, 1, 1])
    result = load_model_state(model, state, strict=False, source="step1.pth")
    assert result.missing_keys == ["cls.2.weight", "cls.2.bias"] and result.unexpected_keys == []
    assert torch.equal(model.cls[1].weight, step1_model.cls[1].weight)


def test_wrong_step_is_reported_with_classifier_sizes(step1_model):
    state = add_module_prefix(step1_model.state_dict())
    # Old model of step 3 expects [16, 1, 1]; the file is of step 1: [16, 1] = 17 classes, 2 steps.
    with pytest.raises(CheckpointError) as info:
        load_model_state(make_model(make_opts(), classes=[16, 1, 1]), state, strict=True, source="prev.pth")
    message = str(info.value)
    assert "prev.pth" in message
    assert "[16, 1] = 17 classes, 2 steps" in message
    assert "[16, 1, 1] = 18 classes, 3 steps" in message
    assert "step_ckpt" in message and "another task or step" in message
    # strict=False tolerates only the newest classifier missing.
    with pytest.raises(CheckpointError, match=r"\[16, 1\] = 17 classes"):
        load_model_state(make_model(make_opts(), classes=[16, 1, 1, 1]), state, strict=False)
    with pytest.raises(CheckpointError, match=r"\[20\] = 20 classes, 1 step\b"):
        load_model_state(make_model(make_opts(), classes=[20]), state, strict=False)


def test_other_unexpected_or_missing_keys_are_errors_even_non_strict(step1_model):
    state = step1_model.state_dict()
    state["scalar"] = torch.tensor(1.0)  # e.g. written with --cosine
    with pytest.raises(CheckpointError, match="unexpected scalar"):
        load_model_state(make_model(make_opts(), classes=[16, 1, 1]), state, strict=False)
    state = step1_model.state_dict()
    del state["head.red_bn.weight"]
    with pytest.raises(CheckpointError, match=r"missing head\.red_bn\.weight"):
        load_model_state(make_model(make_opts(), classes=[16, 1, 1]), state, strict=False)
    # A missing num_batches_tracked is fine (it loads as 0).
    state = OrderedDict((k, v) for k, v in step1_model.state_dict().items() if "num_batches" not in k)
    model = make_model(make_opts(), classes=[16, 1])
    load_model_state(model, state)
    assert model.body.mod1.bn1.num_batches_tracked.item() == 0


def test_wrong_backbone_names_the_file_backbone():
    resnet50 = build_backbone("resnet50", InPlaceABNSync).state_dict()
    resnet101 = build_backbone("resnet101", InPlaceABNSync).state_dict()
    state = OrderedDict((f"module.body.{k}", v) for k, v in resnet50.items())
    model_state = OrderedDict((f"body.{k}", v) for k, v in resnet101.items())

    class Model(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            return model_state

    with pytest.raises(CheckpointError) as info:
        load_model_state(Model(), state, source="r50.pth")
    message = str(info.value)
    assert "resnet50" in message and "resnet101" in message and "--backbone" in message
    assert "body.mod4.block7" in message
    assert guess_backbone(resnet50) == "resnet50" and guess_backbone(model_state) == "resnet101"

    torch.manual_seed(0)
    small = make_model(make_opts(backbone="resnet34"), classes=[16])
    with pytest.raises(CheckpointError, match="resnet34 body while the model is a resnet18"):
        load_model_state(make_model(make_opts(), classes=[16]), small.state_dict())


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_checkpoint(tmp_path / "nope.pth")
    assert str(tmp_path / "nope.pth") in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file(tmp_path, legacy):
    path = tmp_path / "cut.pth"
    torch.save({"model_state": {"w": torch.randn(1000)}}, path, _use_new_zipfile_serialization=not legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # an interrupted copy
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


class _Payload:
    """Unpickling this would create a file: it must never run."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_needing_code_is_refused_and_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "pwned"
    torch.save({"epoch": 1, "model_state": {}, "x": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="executing code") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(path)


def test_save_is_atomic_and_cleans_up_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.pth"
    save_checkpoint({"epoch": 1}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.pth"]  # temp removed
    assert load_checkpoint(path)["epoch"] == 1  # previous file intact


def test_prefix_helpers_and_summary(step1_model):
    state = OrderedDict([("body.a", torch.zeros(1)), ("module.cls.0.weight", torch.zeros(3, 256, 1, 1))])
    assert list(strip_module_prefix(state)) == ["body.a", "cls.0.weight"]
    assert list(add_module_prefix(state)) == ["module.body.a", "module.cls.0.weight"]
    summary = checkpoint_summary(_reference_checkpoint(step1_model))
    assert summary["epoch"] == 30 and summary["classes"] == [16, 1] and summary["num_classes"] == 17
    assert summary["backbone"] == "resnet18" and summary["best_score"] == pytest.approx(0.625)
    assert summary["module_prefix"] is True


def _imagenet_state(body: torch.nn.Module) -> OrderedDict:
    state = OrderedDict(
        (f"module.{k}", torch.randn_like(v)) for k, v in body.state_dict().items() if "num_batches" not in k
    )
    state["module.classifier.fc.weight"] = torch.randn(1000, 512)
    state["module.classifier.fc.bias"] = torch.randn(1000)
    return state


def test_imagenet_weights_layout(tmp_path):
    body = build_backbone("resnet18", InPlaceABNSync)
    state = _imagenet_state(body)
    path = tmp_path / "resnet18_iabn_sync.pth.tar"
    torch.save({"state_dict": state}, path)
    result = load_imagenet_weights(body, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(body.mod5.block2.convs.bn2.weight, state["module.mod5.block2.convs.bn2.weight"])

    torch.save({"epoch": 3, "model_state": {}}, path)
    with pytest.raises(CheckpointError, match="found top-level keys") as info:
        load_imagenet_weights(body, path)
    assert "--ckpt" in str(info.value)

    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match="seems to hold a resnet18") as info:
        load_imagenet_weights(build_backbone("resnet34", InPlaceABNSync), path)
    assert "missing mod2.block3.convs.conv1.weight" in str(info.value)


def test_imagenet_missing_file_messages(tmp_path):
    body = build_backbone("resnet18", InPlaceABNSync)
    released = tmp_path / "pretrained" / "resnet101_iabn_sync.pth.tar"
    with pytest.raises(CheckpointError) as info:
        load_imagenet_weights(body, released)
    message = str(info.value)
    assert str(released) in message and IMAGENET_URL in message and "--no_pretrained" in message
    assert "{backbone}_{norm_act}.pth.tar" in message

    other = tmp_path / "pretrained" / "resnet50_abn.pth.tar"
    with pytest.raises(CheckpointError) as info:
        load_imagenet_weights(body, other)
    message = str(info.value)
    assert str(other) in message and "resnet50_abn.pth.tar" in message
    assert "Only resnet101_iabn_sync.pth.tar" in message and "--no_pretrained" in message


def test_imagenet_weights_without_prefix_and_mixed_prefix(tmp_path):
    body = build_backbone("resnet18", InPlaceABNSync)
    state = _imagenet_state(body)
    path = tmp_path / "w.pth.tar"
    torch.save({"state_dict": strip_module_prefix(state)}, path)
    load_imagenet_weights(body, path)
    assert torch.equal(body.mod1.conv1.weight, state["module.mod1.conv1.weight"])
    mixed = OrderedDict(state)
    mixed["mod1.conv1.weight"] = mixed.pop("module.mod1.conv1.weight")
    torch.save({"state_dict": mixed}, path)
    with pytest.raises(CheckpointError, match="mixes keys"):
        load_imagenet_weights(body, path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch file") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
