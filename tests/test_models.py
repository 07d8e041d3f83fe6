"""ResNet bodies and the DeepLabV3 head (reference ``models/resnet.py``, ``modules/deeplab.py``): shapes,
strides, key names, init, pooling."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from models import BACKBONES, build_backbone
from modules import DeeplabV3, InPlaceABN, InPlaceABNSync
from utils.errors import OptionsError

NORM = functools.partial(InPlaceABNSync, activation="leaky_relu", activation_param=0.01)

# name -> (channels of the 4 pre-activations, out_channels, state-dict keys)
EXPECTED = {
    "resnet18": ((64, 128, 256, 512), 512, 120),
    "resnet34": ((64, 128, 256, 512), 512, 216),
    "resnet50": ((256, 512, 1024, 2048), 2048, 318),
    "resnet101": ((256, 512, 1024, 2048), 2048, 624),
}


@pytest.fixture(scope="module")
def bodies():
    torch.manual_seed(0)
    return {name: {os_: build_backbone(name, NORM, os_) for os_ in (16, 8)} for name in BACKBONES}


@pytest.mark.parametrize("output_stride", [16, 8])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_forward_shapes(bodies, name, output_stride):
    body = bodies[name][output_stride].eval()
    channels, out_channels, _ = EXPECTED[name]
    with torch.no_grad():
        x5, attentions = body(torch.randn(1, 3, 32, 32))
    # 32x32 input: mod2 at /4, mod3 at /8, mod4 and mod5 at /16 (OS16) or /8 (OS8).
    last = 32 // output_stride
    sizes = [8, 4, last, last]
    assert body.out_channels == out_channels
    assert x5.shape == (1, out_channels, last, last)
    assert [tuple(a.shape) for a in attentions] == [(1, c, s, s) for c, s in zip(channels, sizes)]
    # The attentions are pre-activations: negative values survive (no leaky ReLU applied to them).
    assert (attentions[-1] < 0).any()
    assert torch.equal(x5, F.leaky_relu(attentions[-1], 0.01))


def test_state_dict_keys_resnet101(bodies):
    keys = list(bodies["resnet101"][16].state_dict())
    assert len(keys) == 624  # 312 parameters + 312 buffers
    assert keys[:8] == [
        "mod1.conv1.weight",
        "mod1.bn1.weight",
        "mod1.bn1.bias",
        "mod1.bn1.running_mean",
        "mod1.bn1.running_var",
        "mod1.bn1.num_batches_tracked",
        "mod2.block1.convs.conv1.weight",
        "mod2.block1.convs.bn1.weight",
    ]
    assert keys[-1] == "mod5.block3.convs.bn3.num_batches_tracked"
    assert "mod4.block23.convs.bn3.running_var" in keys
    assert "mod4.block24.convs.conv1.weight" not in keys
    proj = [k for k in keys if ".proj_" in k]
    assert proj == [f"mod{m}.block1.proj_{p}" for m in (2, 3, 4, 5) for p in PROJ_SUFFIXES]
    # Order inside a block: convs first, then the projection.
    last_conv_key = keys.index("mod2.block1.convs.bn3.num_batches_tracked")
    assert keys[last_conv_key + 1] == "mod2.block1.proj_conv.weight"


PROJ_SUFFIXES = [
    "conv.weight",
    "bn.weight",
    "bn.bias",
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_state_dict_sizes(bodies, name):
    assert len(bodies[name][16].state_dict()) == EXPECTED[name][2]
    assert list(bodies[name][16].state_dict()) == list(bodies[name][8].state_dict())


def test_basic_block_layout(bodies):
    block = bodies["resnet18"][16].mod3.block1
    assert [n for n, _ in block.convs.named_children()] == ["conv1", "bn1", "conv2", "bn2"]
    assert block.convs.conv1.kernel_size == (3, 3) and block.convs.conv1.stride == (2, 2)
    assert block.convs.bn1.activation == "leaky_relu"
    assert block.convs.bn2.activation == "identity"
    assert block.proj_bn.activation == "identity"
    assert bodies["resnet18"][16].mod3.block2.proj_conv is None


@pytest.mark.parametrize(
    ("output_stride", "strides", "dilations"),
    [(16, (1, 2, 2, 1), (1, 1, 1, 2)), (8, (1, 2, 1, 1), (1, 1, 2, 4))],
)
def test_bottleneck_strides_and_dilations(bodies, output_stride, strides, dilations):
    body = bodies["resnet101"][output_stride]
    for mod, stride, dilation in zip((body.mod2, body.mod3, body.mod4, body.mod5), strides, dilations):
        first = mod.block1
        assert first.convs.conv2.stride == (stride, stride)
        assert first.proj_conv.stride == (stride, stride)
        for block in mod:
            assert block.convs.conv2.dilation == (dilation, dilation)
            assert block.convs.conv2.padding == (dilation, dilation)
            assert [block.convs.bn1.activation, block.convs.bn2.activation] == ["leaky_relu"] * 2
            assert block.convs.bn3.activation == "identity"
        assert [b.last for b in mod] == [False] * (len(mod) - 1) + [True]


def test_stem(bodies):
    mod1 = bodies["resnet50"][16].mod1
    assert [n for n, _ in mod1.named_children()] == ["conv1", "bn1", "pool1"]
    conv = mod1.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((7, 7), (2, 2), (3, 3), None)
    assert mod1.pool1.kernel_size == 3 and mod1.pool1.stride == 2 and mod1.pool1.padding == 1


def test_build_backbone_rejects_unknown_names():
    with pytest.raises(OptionsError, match="resnet152"):
        build_backbone("resnet152", NORM)
    with pytest.raises(OptionsError, match="output_stride"):
        build_backbone("resnet18", NORM, 32)


HEAD_KEYS = [
    "map_convs.0.weight",
    "map_convs.1.weight",
    "map_convs.2.weight",
    "map_convs.3.weight",
    *(f"map_bn.{b}" for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
    "global_pooling_conv.weight",
    *(
        f"global_pooling_bn.{b}"
        for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ),
    "red_conv.weight",
    "pool_red_conv.weight",
    *(f"red_bn.{b}" for b in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")),
]


@pytest.mark.parametrize(("output_stride", "rates"), [(16, (6, 12, 18)), (8, (12, 24, 32))])
def test_head_layout(output_stride, rates):
    head = DeeplabV3(2048, 256, 256, out_stride=output_stride, norm_act=NORM, pooling_size=32)
    state = head.state_dict()
    assert list(state) == HEAD_KEYS and len(state) == 22
    assert head.map_convs[0].kernel_size == (1, 1)
    assert [c.dilation[0] for c in head.map_convs[1:]] == list(rates)
    assert [c.padding[0] for c in head.map_convs[1:]] == list(rates)
    assert state["map_bn.weight"].shape == (1024,)
    assert state["red_conv.weight"].shape == (256, 1024, 1, 1)
    assert state["global_pooling_conv.weight"].shape == (256, 2048, 1, 1)
    assert state["pool_red_conv.weight"].shape == (256, 256, 1, 1)
    assert all(getattr(head, n).activation == "leaky_relu" for n in ("map_bn", "global_pooling_bn", "red_bn"))


def test_head_init_is_xavier_normal_with_leaky_gain():
    torch.manual_seed(0)
    head = DeeplabV3(2048, 256, 256, norm_act=InPlaceABN)
    # gain = sqrt(2 / (1 + 0.01^2)) = 1.41414; std = gain * sqrt(2 / (fan_in + fan_out)).
    gain = math.sqrt(2 / (1 + 0.01**2))
    weight = head.map_convs[0].weight  # 1x1, fan_in 2048, fan_out 256
    assert abs(weight.std().item() / (gain * math.sqrt(2 / (2048 + 256))) - 1) < 0.01
    weight = head.map_convs[1].weight  # 3x3, fan_in 2048*9, fan_out 256*9
    assert abs(weight.std().item() / (gain * math.sqrt(2 / ((2048 + 256) * 9))) - 1) < 0.01
    assert torch.equal(head.red_bn.weight, torch.ones(256))
    assert torch.equal(head.red_bn.bias, torch.zeros(256))


def test_head_pooling_train_vs_eval():
    head = DeeplabV3(8, 4, 4, norm_act=InPlaceABN, pooling_size=4)
    x = torch.randn(2, 8, 6, 5)
    # Training: global average (B, C, 1, 1).
    torch.testing.assert_close(head._pool(x), x.mean(dim=(2, 3), keepdim=True))
    head.eval()
    pooled = head._pool(x)
    assert pooled.shape == x.shape
    # Window (min(4, 6), min(4, 5)) = (4, 4), stride 1 -> (3, 2); replicate padding 1 before, 2 after.
    windows = F.avg_pool2d(x, (4, 4), stride=1)
    torch.testing.assert_close(pooled[:, :, 1:4, 1:3], windows)
    torch.testing.assert_close(pooled[:, :, 0, 0], windows[:, :, 0, 0])
    torch.testing.assert_close(pooled[:, :, 5, 4], windows[:, :, 2, 1])
    # A window at least as large as the map is global pooling again.
    head.pooling_size = 32
    torch.testing.assert_close(head._pool(x), x.mean(dim=(2, 3), keepdim=True).expand_as(x))
    head.pooling_size = None
    torch.testing.assert_close(head._pool(x), x.mean(dim=(2, 3), keepdim=True))


def test_head_forward_shape_and_eval_equals_train_pooling_when_window_covers_map():
    torch.manual_seed(0)
    head = DeeplabV3(16, 8, 8, norm_act=InPlaceABN, pooling_size=32)
    x = torch.randn(2, 16, 4, 4)
    assert head(x).shape == (2, 8, 4, 4)
    head.eval()
    out_eval = head(x)
    head.pooling_size = None
    torch.testing.assert_close(head(x), out_eval)
