"""IncrementalSegmentationModule and make_model (reference ``segmentation_module.py``): outputs, classifiers,
inits, norms, weights."""

from __future__ import annotations

import math
import sys
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modules import ABN, BatchNormAct2d, DeeplabV3, InPlaceABN, InPlaceABNSync, is_norm_layer
from segmentation_module import IncrementalSegmentationModule, build_norm_act, make_model
from tests.conftest import make_opts
from utils.errors import CheckpointError, OptionsError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return make_model(make_opts(), classes=[16, 1, 1])


def test_classifiers_and_forward_outputs(model):
    assert model.classes == [16, 1, 1] and model.tot_classes == 18
    assert [c.out_channels for c in model.cls] == [16, 1, 1]
    assert all(c.in_channels == 256 and c.kernel_size == (1, 1) and c.bias is not None for c in model.cls)
    assert model.scalar is None and model.in_eval is False
    model.train()
    x = torch.randn(2, 3, 64, 48)
    logits, features = model(x)
    assert logits.shape == (2, 18, 64, 48) and features == {}
    logits, features = model(x, ret_intermediate=True)
    assert set(features) == {"body", "pre_logits", "attentions", "sem_logits_small"}
    assert features["body"].shape == (2, 512, 4, 3)
    assert features["pre_logits"].shape == (2, 256, 4, 3)
    assert features["sem_logits_small"].shape == (2, 18, 4, 3)
    shapes = [tuple(a.shape) for a in features["attentions"]]
    assert shapes == [(2, 64, 16, 12), (2, 128, 8, 6), (2, 256, 4, 3), (2, 512, 4, 3), (2, 256, 4, 3)]
    assert features["attentions"][-1] is features["pre_logits"]
    small = features["sem_logits_small"]
    upsampled = F.interpolate(small, size=(64, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, upsampled)
    torch.testing.assert_close(small, torch.cat([c(features["pre_logits"]) for c in model.cls], dim=1))


def test_only_bg_and_disable_background():
    torch.manual_seed(0)
    assert make_model(make_opts(disable_background=True), classes=[3]).disable_background
    net = _small_module([3, 2], disable_background=True)
    x = torch.randn(1, 4, 8, 8)
    bg, extra = net(x, only_bg=True)
    assert extra == {}
    torch.testing.assert_close(bg, net.cls[0](x))
    logits, _ = net(x)
    assert (logits[:, 0] != 0).all()  # disable_background acts only while in_eval
    net.in_eval = True
    logits_eval, _ = net(x)
    assert (logits_eval[:, 0] == 0).all()
    torch.testing.assert_close(logits_eval[:, 1:], logits[:, 1:])


def test_state_dict_keys_resnet101_voc_15_5s_step2():
    torch.manual_seed(0)
    net = make_model(make_opts(backbone="resnet101"), classes=[16, 1, 1])
    keys = list(net.state_dict())
    body = [k for k in keys if k.startswith("body.")]
    head = [k for k in keys if k.startswith("head.")]
    cls = [k for k in keys if k.startswith("cls.")]
    assert (len(keys), len(body), len(head)) == (652, 624, 22)
    assert keys == body + head + cls  # body, then head, then classifiers
    assert body[0] == "body.mod1.conv1.weight"
    assert body[-1] == "body.mod5.block3.convs.bn3.num_batches_tracked"
    assert head[0] == "head.map_convs.0.weight" and head[-1] == "head.red_bn.num_batches_tracked"
    assert cls == ["cls.0.weight", "cls.0.bias", "cls.1.weight", "cls.1.bias", "cls.2.weight", "cls.2.bias"]
    state = net.state_dict()
    weights = [tuple(state[f"cls.{i}.weight"].shape) for i in range(3)]
    assert weights == [(16, 256, 1, 1), (1, 256, 1, 1), (1, 256, 1, 1)]
    assert [tuple(state[f"cls.{i}.bias"].shape) for i in range(3)] == [(16,), (1,), (1,)]
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32))[0].shape == (1, 18, 32, 32)


@pytest.mark.parametrize(
    ("overrides", "classes", "expected"),
    [
        ({"dataset": "cityscapes_domain", "num_classes": 19}, [11, 5, 5], [19]),  # one 19-way classifier
        ({"base_weights": True}, [15, 5], [15]),
        ({"nb_background_modes": 3}, [16, 1], [3, 15, 1]),
        ({}, [101, 10, 10], [101, 10, 10]),
    ],
)
def test_classifier_sizes(overrides, classes, expected):
    given = list(classes)
    net = make_model(make_opts(**overrides), classes=classes)
    assert net.classes == expected
    assert [c.out_channels for c in net.cls] == expected
    assert classes == given  # the caller's list is not modified


@pytest.mark.parametrize(
    ("norm_act", "cls"),
    [
        ("iabn_sync", InPlaceABNSync),
        ("iabn_sync_test", InPlaceABNSync),
        ("iabn", InPlaceABN),
        ("abn", ABN),
        ("std", BatchNormAct2d),
    ],
)
def test_norm_act_choices(norm_act, cls):
    net = make_model(make_opts(norm_act=norm_act), classes=[3])
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert norms and all(type(m) is cls for m in norms)
    assert net.body.mod1.bn1.activation == "leaky_relu" and net.body.mod1.bn1.activation_param == 0.01
    assert net.body.mod2.block1.convs.bn2.activation == "identity"
    if cls is InPlaceABNSync:
        assert net.body.mod1.bn1.group is None  # no process group in this test


def test_std_norm_trains_one_step():
    torch.manual_seed(0)
    net = make_model(make_opts(norm_act="std"), classes=[4, 2]).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 6, (2, 32, 32))
    loss = F.cross_entropy(net(x)[0], y)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert net.body.mod1.bn1.num_batches_tracked.item() == 1


def test_recompute_abn_gives_same_gradients():
    net = make_model(make_opts(recompute_abn=True), classes=[4])
    assert all(m.recompute for m in net.modules() if is_norm_layer(m))
    # Numerics on a small head (every layer kind of the model: convs, ABN with and without activation).
    norm = build_norm_act("iabn_sync", recompute=False)
    norm_recompute = build_norm_act("iabn_sync", recompute=True)
    torch.manual_seed(0)
    plain = nn.Sequential(DeeplabV3(16, 8, 8, norm_act=norm), nn.Conv2d(8, 3, 1))
    recomputed = nn.Sequential(DeeplabV3(16, 8, 8, norm_act=norm_recompute), nn.Conv2d(8, 3, 1))
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 16, 6, 6)
    out_plain, out_recomputed = plain(x), recomputed(x)
    out_plain.square().mean().backward()
    out_recomputed.square().mean().backward()
    # The output-only path normalises with var_mean statistics in one fused eval kernel: float32 rounding.
    torch.testing.assert_close(out_plain, out_recomputed, rtol=1e-5, atol=1e-6)
    for (name, p1), (_, p2) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(plain.state_dict(), recomputed.state_dict())


def test_abn_impl_inplace_abn_missing_is_an_options_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "inplace_abn", None)
    with pytest.raises(OptionsError, match="pip install inplace-abn"):
        make_model(make_opts(abn_impl="inplace_abn"), classes=[3])
    with pytest.raises(OptionsError, match="norm_act"):
        build_norm_act("gn")


def _small_module(classes, **kwargs) -> IncrementalSegmentationModule:
    """A module whose body/head are trivial, for classifier-level tests."""

    class Body(nn.Module):
        def forward(self, x):
            return x, []

    return IncrementalSegmentationModule(Body(), nn.Identity(), 4, classes, **kwargs)


def test_init_new_classifier_balanced():
    torch.manual_seed(0)
    net = _small_module([3, 2, 4])
    w_bg = net.cls[0].weight[0].clone()
    b_bg = net.cls[0].bias[0].item()
    old_fg = net.cls[0].bias[1:].clone()
    old_second = net.cls[1].weight.clone()
    net.init_new_classifier("cpu")
    # N = 4 new classes: bias = b_bg - ln(5) for the new classes AND the old background (RN-07).
    expected = b_bg - math.log(5)
    assert torch.equal(net.cls[2].weight, w_bg.expand(4, 4, 1, 1))
    torch.testing.assert_close(net.cls[2].bias, torch.full((4,), expected))
    torch.testing.assert_close(net.cls[0].bias[0], torch.tensor(expected))
    assert torch.equal(net.cls[0].bias[1:], old_fg) and torch.equal(net.cls[1].weight, old_second)
    # Background and each new class now share the old background probability equally.
    x = torch.randn(1, 4, 2, 2)
    prob = F.softmax(net(x)[0], dim=1)
    torch.testing.assert_close(prob[:, 5:].sum(1) + prob[:, 0], prob[:, 0] * 5)


def test_init_new_classifier_multimodal_background_and_cosine():
    torch.manual_seed(0)
    net = _small_module([16, 2], nb_background_modes=3)
    assert net.classes == [3, 15, 2]
    w_sum, b_sum = net.cls[0].weight.sum(0).clone(), net.cls[0].bias.sum().item()
    net.init_new_classifier()
    expected = b_sum - math.log(3)
    assert torch.equal(net.cls[-1].weight, w_sum.expand(2, 4, 1, 1))
    torch.testing.assert_close(net.cls[-1].bias, torch.full((2,), expected))
    torch.testing.assert_close(net.cls[0].bias, torch.full((3,), expected))

    cosine = _small_module([3, 2], use_cosine=True)
    biases = [c.bias.clone() for c in cosine.cls]
    cosine.init_new_classifier()
    assert torch.equal(cosine.cls[1].weight, cosine.cls[0].weight[0].expand(2, 4, 1, 1))
    assert all(torch.equal(c.bias, b) for c, b in zip(cosine.cls, biases))  # weights only


def test_cosine_classifier_normalises_weights_only():
    torch.manual_seed(0)
    net = _small_module([3, 2], use_cosine=True)
    assert isinstance(net.scalar, nn.Parameter) and net.scalar.item() == 1.0
    x = torch.randn(1, 4, 2, 2) * 5
    logits = net(x)[0]
    weight = torch.cat([c.weight for c in net.cls])[..., 0, 0]
    # RN-22: features are not normalised, there is no bias and the scalar is not applied here.
    expected = torch.einsum("bchw,kc->bkhw", x, F.normalize(weight, dim=1))
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(
    ("fusion", "fuse"),
    [
        ("sum", lambda m: m.sum(1, keepdim=True)),
        ("mean", lambda m: m.mean(1, keepdim=True)),
        ("max", lambda m: m.amax(1, keepdim=True)),
        ("softmax", lambda m: (F.softmax(m, 1) * m).sum(1, keepdim=True)),
    ],
)
def test_multimodal_fusion(fusion, fuse):
    torch.manual_seed(0)
    net = _small_module([4, 1], nb_background_modes=2, multimodal_fusion=fusion)
    x = torch.randn(1, 4, 2, 2)
    logits = net(x)[0]
    assert logits.shape == (1, 5, 2, 2)
    torch.testing.assert_close(logits[:, :1], fuse(net.cls[0](x)))
    torch.testing.assert_close(logits[:, 1:], torch.cat([net.cls[1](x), net.cls[2](x)], 1))
    with pytest.raises(OptionsError, match="multimodal_fusion"):
        _small_module([4], nb_background_modes=2, multimodal_fusion="median")


@pytest.mark.parametrize("init_type", ["max", "softmax", "max_remove", "softmax_remove"])
def test_init_new_classifier_multimodal(init_type):
    torch.manual_seed(0)
    net = _small_module([3, 2], nb_background_modes=3)  # [3 modes, 2 old fg, 2 new]: labels 3 and 4 are new
    with torch.no_grad():
        net.cls[0].bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # mode 1 wins everywhere
    weight1 = net.cls[0].weight[1].clone()
    labels = torch.tensor([[[3, 4], [0, 255]]])
    loader = [(torch.randn(1, 4, 2, 2), labels) for _ in range(2)]
    net.init_new_classifier_multimodal("cpu", loader, init_type)
    # Classes are handled in order and each overwrites mode 1's bias, which the next class starts from.
    if init_type.startswith("max"):
        # bias = b_mode - ln(N + 1), N = 2
        expected = [50.0 - math.log(3), 50.0 - 2 * math.log(3)]
        torch.testing.assert_close(net.cls[-1].weight, weight1.expand(2, 4, 1, 1))
    else:
        # counts (0, 2, 0) per class -> softmax weights (1, e^2, 1) / (2 + e^2); no -ln term.
        share = math.e**2 / (2 + math.e**2)
        expected = [50.0 * share, 50.0 * share**2]
    torch.testing.assert_close(net.cls[-1].bias, torch.tensor(expected))
    if init_type.endswith("remove"):
        assert net.classes == [2, 2, 2] and net.cls[0].out_channels == 2
        assert net(torch.randn(1, 4, 2, 2))[0].shape == (1, 5, 2, 2)
    else:
        torch.testing.assert_close(net.cls[0].bias[1], torch.tensor(expected[-1]))
    with pytest.raises(OptionsError, match="max_init"):
        net.init_new_classifier_multimodal("cpu", loader, "max_init")


@pytest.mark.parametrize("align_type", ["old", "background", "all"])
def test_align_weight(align_type):
    torch.manual_seed(0)
    net = _small_module([3, 2, 2])
    with torch.no_grad():
        net.cls[0].weight.mul_(torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1, 1))
    rows = [c.weight[..., 0, 0].clone() for c in net.cls]
    first = {"old": rows[0][1:], "background": rows[0][:1], "all": rows[0]}[align_type]
    old_mean = torch.cat([first, rows[1]]).norm(dim=1).mean()
    net.align_weight(align_type)
    torch.testing.assert_close(net.cls[-1].weight[..., 0, 0].norm(dim=1).mean(), old_mean)
    ratio = net.cls[-1].weight[..., 0, 0] / rows[-1]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0, 0].item()))


def test_fix_bn():
    net = make_model(make_opts(norm_act="std"), classes=[3]).train()
    net.fix_bn()
    norms = [m for m in net.modules() if is_norm_layer(m)]
    assert all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in norms)
    assert all(c.weight.requires_grad for c in net.cls)
    net.train()  # Reference behaviour (RN-19): train() puts them back in training mode, weights stay frozen
    assert all(m.training and not m.weight.requires_grad for m in norms)


def _imagenet_file(body: nn.Module, path) -> OrderedDict:
    """A file in the inplace_abn ImageNet layout: module. prefix, classifier.fc.*, no num_batches_tracked."""
    state = OrderedDict(
        (f"module.{k}", torch.randn_like(v) if v.is_floating_point() else v)
        for k, v in body.state_dict().items()
        if not k.endswith("num_batches_tracked")
    )
    state["module.classifier.fc.weight"] = torch.randn(1000, 512)
    state["module.classifier.fc.bias"] = torch.randn(1000)
    torch.save({"state_dict": state, "epoch": 90, "arch": "resnet18"}, path)
    return state


def test_make_model_loads_imagenet_weights(tmp_path):
    (tmp_path / "pretrained").mkdir()
    reference = make_model(make_opts(), classes=[3])
    with torch.no_grad():
        reference.body.mod1.bn1.num_batches_tracked.fill_(7)
    state = _imagenet_file(reference.body, tmp_path / "pretrained" / "resnet18_iabn_sync.pth.tar")
    net = make_model(make_opts(no_pretrained=False, code_directory=str(tmp_path)), classes=[3])
    loaded = net.body.state_dict()
    key = "mod4.block2.convs.conv2.weight"
    assert torch.equal(loaded[key], state[f"module.{key}"])
    assert torch.equal(loaded["mod1.bn1.running_var"], state["module.mod1.bn1.running_var"])
    assert loaded["mod1.bn1.num_batches_tracked"].item() == 0
    # iabn_sync_test reads the iabn_sync file.
    make_model(make_opts(no_pretrained=False, code_directory=str(tmp_path), norm_act="iabn_sync_test"), [3])


def test_make_model_missing_imagenet_weights(tmp_path):
    with pytest.raises(CheckpointError) as info:
        make_model(make_opts(no_pretrained=False, code_directory=str(tmp_path)), classes=[3])
    message = str(info.value)
    assert str(tmp_path / "pretrained" / "resnet18_iabn_sync.pth.tar") in message
    assert "only" in message.lower() and "resnet101_iabn_sync.pth.tar" in message
    assert "--no_pretrained" in message


def test_make_model_syncs_over_world_and_deep_copies(tmp_path):
    import copy

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        net = make_model(make_opts(), classes=[3])
        assert net.body.mod1.bn1.group is dist.group.WORLD
        old = copy.deepcopy(net)  # process groups are shared by copies, not copied
        assert old.body.mod1.bn1.group is dist.group.WORLD
        assert "group=WORLD" in repr(old.head.red_bn)
        net.train()(torch.randn(2, 3, 32, 32))  # world of 1: local statistics
    finally:
        dist.destroy_process_group()


def test_recompute_abn_full_model_gradients_equal_in_float64():
    """The whole network (every ABN kind and position) with the output-only layers gives the autograd
    gradients to float64 precision: the inversion is exact math, only float32 rounding differs (and a
    randomly initialised net on a tiny batch amplifies that rounding by orders of magnitude in fp32)."""
    torch.manual_seed(0)
    plain = make_model(make_opts(), classes=[4, 2]).double().train()
    recomputed = make_model(make_opts(recompute_abn=True), classes=[4, 2]).double().train()
    recomputed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    for net in (plain, recomputed):
        net(x)[0].square().mean().backward()
    for (name, p1), (_, p2) in zip(plain.named_parameters(), recomputed.named_parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-8, atol=1e-12, msg=name)
    torch.testing.assert_close(plain.state_dict(), recomputed.state_dict(), rtol=1e-10, atol=1e-12)
