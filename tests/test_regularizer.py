"""EWC / PI / RW (spec §8.9): zero penalty at init, update formulas, module. names, state round trip."""

from __future__ import annotations

import argparse
import copy
import logging

import pytest
import torch
from torch import nn

from utils.errors import CheckpointError, OptionsError
from utils.regularizer import EWC, PI, RW, get_regularizer, normalize_fn


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 2))


def reg_opts(name: str | None, **kw) -> argparse.Namespace:
    base = {"regularizer": name, "reg_alpha": 0.9, "reg_no_normalize": False, "reg_iterations": 10}
    base.update(kw)
    return argparse.Namespace(**base)


def set_grads(model: nn.Module, value: float) -> None:
    for p in model.parameters():
        p.grad = torch.full_like(p, value)


def test_normalize_fn():
    assert torch.allclose(
        normalize_fn(torch.tensor([1.0, 3.0, 5.0])), torch.tensor([0.0, 0.5, 1.0]), atol=1e-6
    )


def test_ewc_names_update_and_no_penalty_at_step_zero():
    model = tiny_model()
    ewc = EWC(model, None, "cpu", alpha=0.9)
    assert set(ewc.fisher) == {"module.0.weight", "module.0.bias"}  # reference DDP names
    assert ewc.penalty().item() == 0.0 and not ewc.penalize
    # F = 0.9 g² + 0.1 * 1 with g = 2 -> 3.7; a second update: 0.9 * 4 + 0.1 * 3.7 = 3.97.
    set_grads(model, 2.0)
    ewc.update()
    assert torch.allclose(ewc.fisher["module.0.weight"], torch.full((2, 2), 3.7))
    ewc.update()
    assert torch.allclose(ewc.fisher["module.0.bias"], torch.full((2,), 3.97))


def test_ewc_skips_parameters_without_grad():
    model = tiny_model()
    ewc = EWC(model, None, "cpu")
    model[0].weight.grad = torch.ones(2, 2)
    model[0].bias.grad = None  # the reference crashed here (Q30)
    ewc.update()
    assert torch.equal(ewc.fisher["module.0.bias"], torch.ones(2))
    assert torch.allclose(ewc.fisher["module.0.weight"], torch.ones(2, 2))


def test_ewc_penalty_uses_normalised_saved_fisher():
    model_old = tiny_model()
    model = copy.deepcopy(model_old)
    fisher = {
        "module.0.weight": torch.tensor([[0.0, 1.0], [2.0, 4.0]]),
        "module.0.bias": torch.tensor([1.0, 1.0]),
    }
    ewc = EWC(model, model_old, "cpu", fisher=fisher)
    assert ewc.penalty().item() == 0.0  # identical parameters
    with torch.no_grad():
        model[0].weight += 1.0
    # normalize([[0, 1], [2, 4]]) = [[0, .25], [.5, 1]] (up to 1e-8); bias Fisher is constant -> 0.
    assert abs(ewc.penalty().item() - 1.75) < 1e-5
    # The running Fisher starts from the *un-normalised* saved one; the caller's dict is untouched.
    assert torch.equal(ewc.fisher["module.0.weight"], fisher["module.0.weight"])
    assert fisher["module.0.weight"][1, 1] == 4.0
    penalty = ewc.penalty()
    penalty.backward()
    assert model[0].weight.grad is not None


def test_ewc_state_round_trip():
    model = tiny_model()
    ewc = EWC(model, None, "cpu", alpha=0.5)
    set_grads(model, 1.0)
    ewc.update()
    state = ewc.state_dict()
    assert state["name"] == "ewc" and state["alpha"] == 0.5
    other = EWC(model, None, "cpu")
    other.load_state_dict(state)
    assert other.alpha == 0.5
    assert all(torch.equal(other.fisher[k], v) for k, v in state["fisher"].items())
    with pytest.raises(CheckpointError):
        other.load_state_dict({"name": "rw"})


def test_pi_accumulates_path_integral_and_round_trips():
    model = tiny_model()
    pi = PI(model, None, "cpu")
    assert pi.penalty().item() == 0.0
    set_grads(model, 1.0)
    pi.update()  # first call: snapshot only
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5
    pi.update()  # delta += g * (theta_prev - theta) = 1 * 0.5
    assert torch.allclose(pi.delta["module.0.bias"], torch.full((2,), 0.5))
    # score = delta / ((theta - theta_start)^2 + 1e-20) = 0.5 / 0.25 = 2.
    score = pi.get()
    assert torch.allclose(score["module.0.weight"], torch.full((2, 2), 2.0))
    state = pi.state_dict()
    assert set(state) == {"name", "score", "delta", "starting_model"}
    restored = PI(model, None, "cpu")
    restored.load_state_dict(state)
    assert torch.equal(restored.delta["module.0.weight"], pi.delta["module.0.weight"])


def test_pi_next_step_penalty():
    model_old = tiny_model()
    model = copy.deepcopy(model_old)
    score = {
        k: torch.arange(p.numel(), dtype=torch.float32).view_as(p)
        for k, p in EWC(model, None, "cpu").fisher.items()
    }
    pi = PI(model, model_old, "cpu", score=score)
    assert pi.penalize and pi.penalty().item() == 0.0
    with torch.no_grad():
        model[0].bias += 2.0
    # normalize([0, 1]) = [0, 1] -> 1 * 2² = 4.
    assert abs(pi.penalty().item() - 4.0) < 1e-5


def test_rw_update_period_and_round_trip():
    model_old = tiny_model()
    model = copy.deepcopy(model_old)
    rw = RW(model, model_old, "cpu", iterations=2)
    assert not rw.penalize and rw.penalty().item() == 0.0
    set_grads(model, 1.0)
    rw.update()  # count 0: snapshot
    assert rw.count == 1 and torch.allclose(rw.fisher["module.0.bias"], torch.full((2,), 0.9 + 0.1))
    rw.update()  # count 1: no score update
    assert torch.equal(rw.score["module.0.bias"], torch.zeros(2))
    with torch.no_grad():
        model[0].bias -= 1.0
    rw.update()  # count 2: score += g (snap - theta) / (0.5 F (theta - snap)^2 + 1e-8) = 1 / (0.5 * 1)
    assert torch.allclose(rw.score["module.0.bias"], torch.full((2,), 2.0), atol=1e-6)
    state = rw.state_dict()
    assert state["iteration"] == 3 and state["name"] == "rw"
    restored = RW(model, model_old, "cpu")
    restored.load_state_dict(state)
    assert restored.count == 3 and torch.equal(
        restored.score["module.0.bias"], state["score"]["module.0.bias"]
    )

    # Next step: penalty from normalise(F) + normalise(S); zero at the old parameters.
    nxt = RW(copy.deepcopy(model), model, "cpu", fisher=state["fisher"], score=state["score"])
    assert nxt.penalize and nxt.penalty().item() == 0.0


def test_get_regularizer():
    model, model_old = tiny_model(), tiny_model()
    assert get_regularizer(model, None, "cpu", reg_opts(None), None) is None
    assert isinstance(get_regularizer(model, None, "cpu", reg_opts("ewc"), None), EWC)
    assert isinstance(get_regularizer(model, None, "cpu", reg_opts("pi"), None), PI)
    rw = get_regularizer(model, None, "cpu", reg_opts("rw", reg_iterations=3, reg_alpha=0.5), None)
    assert isinstance(rw, RW) and rw.iterations == 3 and rw.alpha == 0.5
    ewc_state = EWC(model, None, "cpu").state_dict()
    resumed = get_regularizer(model, model_old, "cpu", reg_opts("ewc", reg_no_normalize=True), ewc_state)
    assert resumed.penalize and not resumed.normalize
    # A handler on the module logger itself: the run logger "LGKD" may not propagate to the root.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    module_logger = logging.getLogger("LGKD.utils.regularizer")
    module_logger.addHandler(handler)
    try:
        get_regularizer(model, model_old, "cpu", reg_opts("pi"), ewc_state)
    finally:
        module_logger.removeHandler(handler)
    assert any("differs" in r.getMessage() for r in records)
    with pytest.raises(OptionsError):
        get_regularizer(model, None, "cpu", reg_opts("si"), None)


@pytest.mark.parametrize("cls", [PI, RW])
def test_path_snapshot_is_refreshed_in_place_on_the_parameters_device(cls):
    """PI/RW's parameter snapshot stays where the parameters are and is overwritten, not reallocated: the
    reference's per-iteration copy to the CPU made every update wait for the GPU."""
    model = tiny_model()
    reg = cls(model, None, "cpu", **({"iterations": 1} if cls is RW else {}))
    set_grads(model, 1.0)
    reg.update()
    storage = {n: t.data_ptr() for n, t in reg.model_temp.items()}
    with torch.no_grad():
        model[0].bias -= 0.25
    reg.update()
    for name, param in zip(("module.0.weight", "module.0.bias"), model.parameters()):
        snap = reg.model_temp[name]
        assert snap.data_ptr() == storage[name] != param.data_ptr()
        assert snap.device == param.device and torch.equal(snap, param.detach())
