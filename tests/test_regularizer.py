"""EWC / PI / RW (reference ``utils/regularizer.py``): zero penalty at init, update formulas, module. names,
state round trip."""

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
    model[0].bias.grad = None  # the reference crashed here (RN-30)
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
    # The reference's layout: "iteration" is the update period; the count goes under "count" (issue 12).
    assert state["iteration"] == 2 and state["count"] == 3 and state["name"] == "rw"
    restored = RW(model, model_old, "cpu")
    restored.load_state_dict(state)
    assert restored.count == 3 and restored.iterations == 2
    assert torch.equal(restored.score["module.0.bias"], state["score"]["module.0.bias"])

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


# --- checkpoint layouts (issue 12): the reference's keys, read both ways -------------------------------


class TwoStepNet(nn.Module):
    """A body and one classifier per step, like the segmentation module: step 1 adds ``cls.1``."""

    def __init__(self, steps: int):
        super().__init__()
        self.body = nn.Linear(2, 2)
        self.cls = nn.ModuleList(nn.Linear(2, 1) for _ in range(steps))


def two_step_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model_old = TwoStepNet(1)
    model = TwoStepNet(2)
    model.load_state_dict(model_old.state_dict(), strict=False)
    return model, model_old


def saved_score(model_old: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {f"module.{n}": torch.rand(p.shape, generator=generator) for n, p in model_old.named_parameters()}


def through_checkpoint(state: dict, tmp_path) -> dict:
    """A trainer_state written with torch.save and read back the safe way, as run.py does."""
    path = tmp_path / "state.pth"
    torch.save({"trainer_state": {"regularizer": state}}, path)
    return torch.load(path, weights_only=True)["trainer_state"]["regularizer"]


def train_a_little(model: nn.Module, reg, steps: int = 3) -> None:
    generator = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        reg.update()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.1 * p.grad


def test_rw_state_has_the_reference_keys_and_period(tmp_path):
    model, model_old = two_step_models()
    rw = RW(model, model_old, "cpu", iterations=2)
    train_a_little(model, rw)
    state = through_checkpoint(rw.state_dict(), tmp_path)
    # The reference's RW.state_dict keys, "iteration" = the period; plus this project's "count".
    assert set(state) == {"name", "score", "fisher", "iteration", "alpha", "count"}
    assert state["iteration"] == 2 and state["count"] == 3
    restored = RW(model, model_old, "cpu", iterations=2)
    restored.load_state_dict(state)
    assert (restored.iterations, restored.count) == (2, 3)
    for key in rw.fisher:
        assert torch.equal(restored.fisher[key], rw.fisher[key])
        assert torch.equal(restored.score[key], rw.get_score()[key])


def _warnings_of(load) -> list[str]:
    """Messages the regulariser module logs at WARNING while ``load()`` runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    module_logger = logging.getLogger("LGKD.utils.regularizer")
    module_logger.addHandler(handler)
    try:
        load()
    finally:
        module_logger.removeHandler(handler)
    return [r.getMessage() for r in records]


def test_rw_reads_a_reference_written_state(tmp_path):
    model, model_old = two_step_models()
    rw = RW(model, model_old, "cpu", iterations=5)
    train_a_little(model, rw)
    # What the reference writes: the same tensors, iteration = its period (here 5), no count.
    reference = {k: v for k, v in rw.state_dict().items() if k != "count"}
    restored = RW(model, model_old, "cpu", iterations=5)
    assert _warnings_of(lambda: restored.load_state_dict(through_checkpoint(reference, tmp_path))) == []
    assert (restored.iterations, restored.count) == (5, 0)  # the reference's resume restarts the count
    # A period other than --reg_iterations is taken from the checkpoint (as the reference), with a warning
    # that names the other reading (a count written by this project's earlier layout).
    other = RW(model, model_old, "cpu", iterations=10)
    messages = _warnings_of(lambda: other.load_state_dict(reference))
    assert other.iterations == 5 and other.count == 0
    assert any("period 5" in m and "--no_resume" in m for m in messages)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s: s.update(iteration=0), "period"),
        (lambda s: s.update(count=-1), "period"),
        (lambda s: s["fisher"].pop("module.cls.1.bias"), "missing"),
        (lambda s: s["score"].update({"module.cls.2.bias": torch.zeros(1)}), "unknown"),
        (lambda s: s["fisher"].update({"module.body.bias": torch.zeros(3)}), "shape"),
        (lambda s: s.update(score=None), "no 'score'"),
    ],
)
def test_rw_refuses_a_state_of_another_model(change, match):
    model, model_old = two_step_models()
    state = RW(model, model_old, "cpu").state_dict()
    state = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
    change(state)
    with pytest.raises(CheckpointError, match=match):
        RW(model, model_old, "cpu").load_state_dict(state)


def test_pi_state_holds_only_the_new_parameters_as_the_reference(tmp_path):
    model, model_old = two_step_models()
    pi = PI(model, model_old, "cpu", score=saved_score(model_old))
    state = through_checkpoint(pi.state_dict(), tmp_path)
    assert set(state) == {"name", "score", "delta", "starting_model"}
    # The new classifier only (its value when built), not a second copy of the model.
    assert set(state["starting_model"]) == {"module.cls.1.weight", "module.cls.1.bias"}
    assert torch.equal(state["starting_model"]["module.cls.1.weight"], model.cls[1].weight.detach())
    # Step 0 (no old model): nothing, as the reference.
    assert PI(TwoStepNet(1), None, "cpu").state_dict()["starting_model"] == {}


def _pi_after_training() -> tuple[nn.Module, nn.Module, PI, dict]:
    model, model_old = two_step_models()
    start_new = {n: p.detach().clone() for n, p in model.cls[1].named_parameters()}
    pi = PI(model, model_old, "cpu", score=saved_score(model_old))
    train_a_little(model, pi)
    return model, model_old, pi, start_new


@pytest.mark.parametrize("layout", ["reference", "every parameter"])
def test_pi_resume_from_either_layout_gives_the_full_anchor(layout, tmp_path):
    model, model_old, pi, start_new = _pi_after_training()
    state = pi.state_dict()
    # The reference's layout: the new classifier as built. This project's earlier one: the whole model.
    state["starting_model"] = {f"module.cls.1.{k}": v for k, v in start_new.items()}
    if layout == "every parameter":
        old_values = {f"module.{n}": p.detach().clone() for n, p in model_old.named_parameters()}
        state["starting_model"] |= old_values
    expected_penalty, expected_score = pi.penalty().item(), pi.get()

    # A resumed run: the Trainer (and its PI) is built on a model whose new classifier has another value
    # (the trained weights), then the state is loaded.
    restored = PI(model, model_old, "cpu", score=saved_score(model_old))
    assert not torch.equal(restored.model_old_dict["module.cls.1.weight"], start_new["weight"])
    restored.load_state_dict(through_checkpoint(state, tmp_path))
    # Anchor: old model for the old parameters, the saved starting values for the new classifier.
    assert set(restored.model_old_dict) >= {f"module.{n}" for n, _ in model.named_parameters()}
    for name, param in model_old.named_parameters():
        assert torch.equal(restored.model_old_dict[f"module.{name}"], param)
    assert torch.equal(restored.model_old_dict["module.cls.1.weight"], start_new["weight"])
    # So the penalty still covers the old parameters and the next step's score is the uninterrupted one.
    assert expected_penalty > 0 and restored.penalty().item() == pytest.approx(expected_penalty, rel=1e-6)
    for key, value in expected_score.items():
        torch.testing.assert_close(restored.get()[key], value)


def test_pi_refuses_a_state_of_another_model():
    model, model_old, pi, _ = _pi_after_training()
    state = pi.state_dict()
    bad = dict(state, starting_model={"module.cls.1.weight": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match="shape"):
        PI(model, model_old, "cpu").load_state_dict(bad)
    bad = dict(state, delta={k: v for k, v in state["delta"].items() if k != "module.body.weight"})
    with pytest.raises(CheckpointError, match="missing"):
        PI(model, model_old, "cpu").load_state_dict(bad)
    bad = dict(state, starting_model={"module.cls.7.weight": torch.zeros(1, 2)})
    with pytest.raises(CheckpointError, match="unknown"):
        PI(model, model_old, "cpu").load_state_dict(bad)


def test_ewc_refuses_a_state_of_another_model():
    model, model_old = two_step_models()
    state = EWC(model, model_old, "cpu").state_dict()
    with pytest.raises(CheckpointError, match="missing"):
        EWC(model, model_old, "cpu").load_state_dict(
            dict(state, fisher={k: v for k, v in state["fisher"].items() if "cls.1" not in k})
        )
