"""Activated batch norm (inplace_abn v1.1.0 ``InPlaceABNSync``; RN-06, RN-35): arithmetic by hand, buffers,
loading, gradients, 2-process sync."""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from modules import ABN, BatchNormAct2d, InPlaceABN, InPlaceABNSync, abs_plus_eps, is_norm_layer
from modules.abn import import_inplace_abn
from utils.distributed import cleanup
from utils.errors import OptionsError

EPS = 1e-5


def _hand_bn(x: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, slope: float | None = 0.01):
    """Batch norm over (N, H, W) with biased variance, then leaky ReLU (None = identity)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = (x - mean) / torch.sqrt(var + EPS) * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)
    return y if slope is None else torch.where(y >= 0, y, slope * y)


def _layer(cls, weight, bias, **kwargs):
    layer = cls(len(weight), **kwargs)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return layer


def test_inplace_abn_training_forward_and_running_stats_by_hand():
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    layer = _layer(InPlaceABN, [-0.5, 0.0, 2.0], [0.1, -0.2, 0.3])
    y = layer(x)
    # Scale |w| + eps = [0.50001, 0.00001, 2.00001], not w (RN-06).
    scale = torch.tensor([0.5 + EPS, 0.0 + EPS, 2.0 + EPS])
    torch.testing.assert_close(y, _hand_bn(x, scale, layer.bias.detach()), atol=1e-5, rtol=1e-5)
    # running_mean = 0.9 * 0 + 0.1 * mean; running_var = 0.9 * 1 + 0.1 * var * n / (n - 1), n = 4*5*5 = 100.
    mean = x.mean(dim=(0, 2, 3))
    var_biased = x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(layer.running_mean, 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var_biased * 100 / 99)
    assert layer.num_batches_tracked.item() == 1
    layer(x)
    assert layer.num_batches_tracked.item() == 2
    torch.testing.assert_close(layer.running_mean, 0.9 * 0.1 * mean + 0.1 * mean)


def test_abn_uses_the_raw_weight():
    x = torch.randn(3, 2, 4, 4)
    layer = _layer(ABN, [-1.5, 0.5], [0.2, 0.0], activation="identity")
    torch.testing.assert_close(
        layer(x), _hand_bn(x, torch.tensor([-1.5, 0.5]), torch.tensor([0.2, 0.0]), None), atol=1e-5, rtol=1e-5
    )
    iabn = _layer(InPlaceABN, [-1.5, 0.5], [0.2, 0.0], activation="identity")
    assert not torch.allclose(iabn(x)[:, 0], layer(x)[:, 0])


def test_eval_uses_running_statistics():
    layer = _layer(InPlaceABN, [2.0, -3.0], [0.5, -0.5])
    layer.running_mean.copy_(torch.tensor([1.0, -1.0]))
    layer.running_var.copy_(torch.tensor([4.0, 0.25]))
    layer.eval()
    x = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1)  # one value per channel is fine in eval
    y = layer(x).flatten()
    # channel 0: (3 - 1) / sqrt(4 + 1e-5) * (2 + 1e-5) + 0.5 = 2.5 (to 1e-5)
    # channel 1: (-2 + 1) / sqrt(0.25 + 1e-5) * (3 + 1e-5) - 0.5 = -6.5 -> leaky 0.01 -> -0.065
    expected = torch.tensor(
        [
            2 / math.sqrt(4 + EPS) * (2 + EPS) + 0.5,
            0.01 * (-1 / math.sqrt(0.25 + EPS) * (3 + EPS) - 0.5),
        ]
    )
    torch.testing.assert_close(y, expected)
    assert layer.num_batches_tracked.item() == 0
    torch.testing.assert_close(layer.running_mean, torch.tensor([1.0, -1.0]))


@pytest.mark.parametrize(
    ("activation", "param", "fn"),
    [
        ("leaky_relu", 0.2, lambda t: F.leaky_relu(t, 0.2)),
        ("elu", 0.7, lambda t: F.elu(t, 0.7)),
        ("relu", 0.0, F.relu),
        ("identity", 0.0, lambda t: t),
    ],
)
def test_activations(activation, param, fn):
    x = torch.randn(2, 3, 4, 4)
    layer = ABN(3, activation=activation, activation_param=param)
    torch.testing.assert_close(layer(x), fn(_hand_bn(x, torch.ones(3), torch.zeros(3), None)))


def test_activation_is_settable_and_validated():
    layer = InPlaceABN(4)
    assert (layer.activation, layer.activation_param) == ("leaky_relu", 0.01)
    layer.activation = "identity"
    x = torch.randn(2, 4, 3, 3)
    assert (layer(x) < 0).any()
    with pytest.raises(ValueError, match="activation"):
        layer.activation = "gelu"
    with pytest.raises(ValueError, match="activation"):
        BatchNormAct2d(4, activation="swish")


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync, BatchNormAct2d])
def test_training_with_one_value_per_channel_raises(cls):
    layer = cls(3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    layer.eval()
    layer(torch.randn(1, 3, 1, 1))


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync, BatchNormAct2d])
def test_loading_without_num_batches_tracked_fills_zero(cls):
    source = cls(3)
    state = {k: v for k, v in source.state_dict().items() if k != "num_batches_tracked"}
    target = cls(3)
    target.num_batches_tracked.fill_(5)
    result = target.load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert target.num_batches_tracked.item() == 0
    keys = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(source.state_dict()) == keys


def test_weight_gradient_carries_the_sign_and_plus_one_at_zero():
    # torch.abs would give gradient 0 at w = 0; inplace_abn treats sign(0) as +1.
    w = torch.tensor([-2.0, 0.0, 3.0], requires_grad=True)
    abs_plus_eps(w, EPS).sum().backward()
    assert w.grad.tolist() == [-1.0, 1.0, 1.0]
    # The no-grad shortcut (old model, validation) gives the same values.
    with torch.no_grad():
        assert torch.equal(abs_plus_eps(w, EPS), abs_plus_eps(w.detach(), EPS))
    assert torch.equal(abs_plus_eps(w, EPS).detach(), torch.tensor([2.0, 0.0, 3.0]) + EPS)

    x = torch.randn(3, 3, 4, 4)
    g = torch.randn(3, 3, 4, 4)
    layer = _layer(InPlaceABN, [-2.0, 0.0, 3.0], [0.0, 0.0, 0.0], activation="identity")
    (layer(x) * g).sum().backward()
    x_hat = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + EPS
    )
    # dL/dw_c = sign(w_c) * sum(g * x_hat) over (N, H, W); dL/db_c = sum(g).
    expected = torch.tensor([-1.0, 1.0, 1.0]) * (g * x_hat).sum(dim=(0, 2, 3))
    torch.testing.assert_close(layer.weight.grad, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.bias.grad, g.sum(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_input_gradient_matches_batchnorm():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(4, 3, 5, 5)
    layer = _layer(InPlaceABN, [0.5, -1.0, 2.0], [0.1, 0.2, 0.3])
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.abs() + EPS)
        ref.bias.copy_(layer.bias)
    (layer(x) * g).sum().backward()
    (F.leaky_relu(ref(x_ref), 0.01) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(layer.running_var, ref.running_var)


def test_momentum_none_is_a_cumulative_average():
    layer = ABN(2, momentum=None)
    batches = [torch.randn(4, 2, 3, 3) + i for i in range(3)]
    for batch in batches:
        layer(batch)
    expected = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    torch.testing.assert_close(layer.running_mean, expected)


def test_batchnorm_act_matches_batchnorm_then_leaky_relu():
    x = torch.randn(3, 4, 5, 5)
    layer = BatchNormAct2d(4)
    ref = nn.BatchNorm2d(4)
    torch.testing.assert_close(layer(x), F.leaky_relu(ref(x), 0.01))
    torch.testing.assert_close(layer.running_var, ref.running_var)
    assert list(layer.state_dict()) == list(ABN(4).state_dict())
    layer.activation = "identity"
    layer.eval()
    ref.eval()
    torch.testing.assert_close(layer(x), ref(x))


@pytest.mark.parametrize("cls", [ABN, InPlaceABN, InPlaceABNSync, BatchNormAct2d])
def test_recompute_gives_identical_outputs_gradients_and_single_stat_update(cls):
    plain = _layer(cls, [0.5, -1.0, 0.0, 2.0], [0.1, -0.1, 0.2, 0.0])
    recomputed = _layer(cls, [0.5, -1.0, 0.0, 2.0], [0.1, -0.1, 0.2, 0.0], recompute=True)
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(3, 4, 5, 5)
    y1, y2 = plain(x), recomputed(x2)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.equal(y1, y2)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    # The in-place layers recover x_hat = (z - bias) / (|w| + eps) from the output: on the channel whose
    # weight is 0 the rounding error of z is divided by eps = 1e-5 (as in the compiled inplace_abn).
    w_tol = {"rtol": 1e-3, "atol": 1e-5} if cls in (InPlaceABN, InPlaceABNSync) else {"rtol": 0, "atol": 1e-6}
    torch.testing.assert_close(plain.weight.grad, recomputed.weight.grad, **w_tol)
    torch.testing.assert_close(
        plain.weight.grad[[0, 1, 3]], recomputed.weight.grad[[0, 1, 3]], rtol=0, atol=1e-5
    )
    torch.testing.assert_close(plain.bias.grad, recomputed.bias.grad, rtol=0, atol=1e-6)
    # The recomputation in backward must not update the running statistics a second time.
    assert torch.equal(plain.running_mean, recomputed.running_mean)
    assert torch.equal(plain.running_var, recomputed.running_var)
    assert recomputed.num_batches_tracked.item() == 1


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of distinct storages autograd keeps for backward of ``module(x)``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("activation", ["leaky_relu", "elu", "identity"])
def test_recompute_keeps_only_the_output_of_in_place_layers(activation):
    """conv -> InPlaceABN -> conv: without recompute autograd keeps x, the conv output and the ABN output;
    with it the ABN input (the first conv's output) is no longer kept: one activation less per layer."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    act = 16 * 2 * 16 * 16 * 4  # bytes of one (2, 16, 16, 16) float32 activation
    nets = []
    for recompute in (False, True):
        norm = InPlaceABN(
            16, activation=activation, activation_param=0.1 if activation == "leaky_relu" else 1.0
        )
        norm.recompute = recompute
        nets.append(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), norm, nn.Conv2d(16, 4, 1)))
    nets[1].load_state_dict(nets[0].state_dict())
    plain, output_only = (_saved_bytes(net.train(), x) for net in nets)
    assert plain - output_only >= act
    # Same values and gradients as the autograd path (outputs within float32 rounding).
    g = torch.randn(2, 4, 16, 16)
    grads = []
    for net in nets:
        xi = x.detach().clone().requires_grad_()
        (net(xi) * g).sum().backward()
        grads.append([xi.grad] + [p.grad for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_recompute_falls_back_to_checkpointing_when_not_invertible():
    # ReLU loses the negative inputs and plain ABN's raw weight may be 0: both keep the autograd path.
    for layer in (InPlaceABN(4, activation="relu"), ABN(4)):
        layer.recompute = True
        assert not layer._save_output_only()


def test_output_only_eval_mode_with_grad_matches_autograd():
    torch.manual_seed(0)
    plain = _layer(InPlaceABN, [0.5, -1.0, 0.3, 2.0], [0.1, -0.1, 0.2, 0.0])
    plain.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    plain.running_var.copy_(torch.tensor([1.5, 0.5, 2.0, 1.0]))
    fast = _layer(InPlaceABN, [0.5, -1.0, 0.3, 2.0], [0.1, -0.1, 0.2, 0.0], recompute=True)
    fast.load_state_dict(plain.state_dict())
    plain.eval()
    fast.eval()
    x = torch.randn(2, 4, 3, 3)
    g = torch.randn(2, 4, 3, 3)
    out = []
    for layer in (plain, fast):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        (y * g).sum().backward()
        out.append((y.detach(), xi.grad, layer.weight.grad, layer.bias.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(plain.running_var, fast.running_var)


def test_sync_without_process_group_is_local():
    assert not dist.is_initialized()
    x = torch.randn(3, 4, 5, 5)
    sync, local = InPlaceABNSync(4), InPlaceABN(4)
    assert torch.equal(sync(x), local(x))
    assert torch.equal(sync.running_var, local.running_var)


def test_is_norm_layer():
    assert all(is_norm_layer(m) for m in (ABN(2), InPlaceABNSync(2), BatchNormAct2d(2), nn.BatchNorm2d(2)))
    assert not is_norm_layer(nn.Conv2d(2, 2, 1))


def test_missing_inplace_abn_package_explains_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "inplace_abn", None)  # makes the import fail
    with pytest.raises(OptionsError, match="pip install inplace-abn") as info:
        import_inplace_abn()
    assert "--abn_impl torch" in str(info.value)


SPLIT = [3, 1]  # uneven per-rank batches: statistics must be combined by count


def _sync_worker(rank: int, world: int, init_file: str, data: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    finished = False
    try:
        results = {}
        for recompute in (False, True):
            layer = InPlaceABNSync(data["weight"].numel(), recompute=recompute)
            layer.load_state_dict({"weight": data["weight"], "bias": data["bias"]}, strict=False)
            x = data["x"].split(SPLIT)[rank].clone().requires_grad_()
            g = data["g"].split(SPLIT)[rank]
            y = layer(x)
            (y * g).sum().backward()
            layer.eval()
            results[recompute] = {
                "y": y.detach(),
                "x_grad": x.grad,
                "w_grad": layer.weight.grad,
                "b_grad": layer.bias.grad,
                "state": layer.state_dict(),
                "eval": layer(data["x"]).detach(),
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        finished = True
    finally:
        cleanup(synchronize=finished)


@pytest.mark.parametrize("shape", [(4, 3, 4, 4), (4, 3, 16)], ids=["image", "points"])
def test_sync_abn_two_process_gloo_equals_single_process_global_batch(tmp_path, shape):
    # (B, C, H, W) feature maps and (B, C, N) point features: the same 64 values per channel.
    data = {
        "x": torch.randn(*shape) * 3 + 2,
        "g": torch.randn(*shape),
        "weight": torch.tensor([0.5, -1.5, 0.0]),
        "bias": torch.tensor([0.2, 0.0, -0.3]),
    }
    # spawn: fresh interpreters, no thread pools inherited from pytest; file:// rendezvous in tmp_path.
    mp.spawn(_sync_worker, args=(2, str(tmp_path / "init"), data, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    single = InPlaceABN(3)
    single.load_state_dict({"weight": data["weight"], "bias": data["bias"]}, strict=False)
    x = data["x"].clone().requires_grad_()
    y = single(x)
    (y * data["g"]).sum().backward()
    single.eval()
    expected_eval = single(data["x"]).detach()

    for recompute in (False, True):
        parts = [r[recompute] for r in ranks]
        torch.testing.assert_close(torch.cat([p["y"] for p in parts]), y.detach(), atol=1e-5, rtol=1e-5)
        # Each rank's input gradient is its slice of the global-batch gradient.
        torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x.grad, atol=1e-5, rtol=1e-4)
        # Parameter gradients are per-rank contributions (DDP reduces them): they add up to the global one.
        w_grad, b_grad = (parts[0][k] + parts[1][k] for k in ("w_grad", "b_grad"))
        # Channel 2 has weight 0: recovering x_hat from the output divides rounding errors by eps.
        torch.testing.assert_close(w_grad, single.weight.grad, atol=1e-4, rtol=5e-3 if recompute else 1e-4)
        torch.testing.assert_close(w_grad[:2], single.weight.grad[:2], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(b_grad, single.bias.grad, atol=1e-4, rtol=1e-4)
        for part in parts:
            # Same running statistics on every rank, from the global batch (unbiased var, n = 64).
            torch.testing.assert_close(part["state"]["running_mean"], single.running_mean)
            torch.testing.assert_close(part["state"]["running_var"], single.running_var)
            assert part["state"]["num_batches_tracked"].item() == 1
            torch.testing.assert_close(part["eval"], expected_eval, atol=1e-5, rtol=1e-5)


def test_modules_misc_keeps_the_old_import_path_of_modules_abn():
    import modules.abn as abn
    import modules.misc as misc
    from modules.misc import InPlaceABNSync as OldPathSync

    assert OldPathSync is abn.InPlaceABNSync is InPlaceABNSync
    # Every public class, function and constant defined in modules/abn.py is reachable under the old name.
    public = {
        name
        for name, value in vars(abn).items()
        if not name.startswith("_")
        and (getattr(value, "__module__", None) == abn.__name__ or isinstance(value, tuple))
    }
    assert public == set(misc.__all__)
    assert all(getattr(misc, name) is getattr(abn, name) for name in misc.__all__)
