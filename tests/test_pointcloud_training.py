"""Losses, pseudo-labels, the Trainer and metrics on point clouds: logits (B, C, N), labels (B, N).

Every per-pixel computation must give a point cloud the values it gives the same numbers laid out as an image
(B, C, N, 1) / (B, N, 1), and every method must train the DGCNN model through ``Trainer.train`` as it trains
DeepLabV3, step 0 then step 1 with the previous step's weights and regulariser state.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import argparser
from metrics import StreamSegMetrics
from run import build_optimizer
from segmentation_module import make_model
from train import Trainer
from utils.checkpoint import add_module_prefix, load_model_state
from utils.loss import (
    NCA,
    BCESigmoid,
    BCEWithLogitsLossWithIgnoreIndex,
    FocalLoss,
    FocalLossNew,
    IcarlLoss,
    KnowledgeDistillationLoss,
    LabelGuidedKnowledgeDistillationLoss,
    UnbiasedCrossEntropy,
    UnbiasedKnowledgeDistillationLoss,
    UnbiasedNCA,
    entropy,
    soft_crossentropy,
)
from utils.loss_terms import (
    ClassificationTerm,
    EncoderKDTerm,
    EntropyMinTerm,
    ICaRLTerm,
    OutputKDTerm,
    StepBatch,
    downsample_labels,
)
from utils.pseudo_label import PseudoLabeler, find_median

B, N, C_OLD, C_NEW = 2, 40, 4, 6


def image(t: torch.Tensor) -> torch.Tensor:
    """(B, C, N) -> (B, C, N, 1) and (B, N) -> (B, N, 1): the same numbers as an image one pixel wide."""
    return t.unsqueeze(-1)


def point_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Logits of 6 classes (4 old), labels with background, old, new and ignored points."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C_NEW, (B, N), generator=g)
    labels[:, :5] = 0
    labels[:, 5:8] = 255
    return {
        "logits": (2 * torch.randn(B, C_NEW, N, generator=g)).requires_grad_(),
        "old": 2 * torch.randn(B, C_OLD, N, generator=g),
        "labels": labels,
        "mask": torch.rand(B, N, generator=g) > 0.7,
    }


LOSSES: dict[str, Callable[[dict, Callable], torch.Tensor]] = {
    "CE": lambda d, f: nn.CrossEntropyLoss(ignore_index=255, reduction="none")(
        f(d["logits"]), f(d["labels"])
    ),
    "UNCE mean": lambda d, f: UnbiasedCrossEntropy(C_OLD)(f(d["logits"]), f(d["labels"])),
    "UNCE none + mask": lambda d, f: UnbiasedCrossEntropy(C_OLD, reduction="none")(
        f(d["logits"]), f(d["labels"]), mask=f(d["mask"])
    ),
    "KD": lambda d, f: KnowledgeDistillationLoss(alpha=0.5)(f(d["logits"]), f(d["old"])),
    "KD none + mask": lambda d, f: KnowledgeDistillationLoss("none")(
        f(d["logits"]), f(d["old"]), f(d["mask"])
    ),
    "UNKD": lambda d, f: UnbiasedKnowledgeDistillationLoss()(f(d["logits"]), f(d["old"])),
    "UNKD none": lambda d, f: UnbiasedKnowledgeDistillationLoss("none")(f(d["logits"]), f(d["old"])),
    "LGKD mean": lambda d, f: LabelGuidedKnowledgeDistillationLoss(prev_kd=5, novel_kd=1)(
        f(d["logits"]), f(d["old"]), f(d["labels"])
    ),
    "LGKD none": lambda d, f: LabelGuidedKnowledgeDistillationLoss("none")(
        f(d["logits"]), f(d["old"]), f(d["labels"])
    ),
    "LGKD sum, labels (B, 1, *)": lambda d, f: LabelGuidedKnowledgeDistillationLoss("sum", novel_kd=0)(
        f(d["logits"]), f(d["old"]), f(d["labels"])[:, None]
    ),
    "BCE": lambda d, f: BCEWithLogitsLossWithIgnoreIndex()(f(d["logits"]), f(d["labels"])),
    "BCE none": lambda d, f: BCEWithLogitsLossWithIgnoreIndex(reduction="none")(
        f(d["logits"]), f(d["labels"])
    ),
    "iCaRL": lambda d, f: IcarlLoss(reduction="none", bkg=True)(
        f(d["logits"]), f(d["labels"]), torch.sigmoid(f(d["old"]))
    ),
    "focal": lambda d, f: FocalLoss(reduction="none")(f(d["logits"]), f(d["labels"])),
    "focal new": lambda d, f: FocalLossNew(index=C_OLD, reduction="none")(f(d["logits"]), f(d["labels"])),
    "NCA": lambda d, f: NCA(scale=3.0, reduction="none")(f(d["logits"]), f(d["labels"])),
    "UNCA": lambda d, f: UnbiasedNCA(C_OLD, scale=3.0, reduction="none")(f(d["logits"]), f(d["labels"])),
    "BCE sigmoid sum": lambda d, f: BCESigmoid("none", shape="sum")(
        f(d["logits"]), f(d["old"]), f(d["mask"])
    ),
    "soft CE": lambda d, f: soft_crossentropy(
        f(d["logits"]), f(d["labels"]), f(d["old"]), f(d["mask"]), f(d["labels"] < C_OLD), "soft_uncertain"
    ),
    "entropy": lambda d, f: entropy(torch.softmax(f(d["logits"]), dim=1)),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_on_points_equals_the_image_layout(name):
    """(B, C, N) and (B, C, N, 1) give the same values (per point for "none") and the same gradients."""
    values, grads = [], []
    for layout in (lambda t: t, image):
        data = point_batch()
        value = LOSSES[name](data, layout)
        (grad,) = torch.autograd.grad(value.sum(), data["logits"])
        values.append(value)
        grads.append(grad)
    points, pixels = values
    if points.dim() > 0:
        pixels = pixels.squeeze(-1)  # (B, [C,] N, 1) -> (B, [C,] N)
    assert points.shape == pixels.shape and torch.isfinite(points).all()
    torch.testing.assert_close(points, pixels)
    torch.testing.assert_close(grads[0], grads[1])


def test_lgkd_per_point_hand_value():
    """Two points, 3 new logits, 2 old: a previous point (label 0) and a novel one (label 2)."""
    logits = torch.tensor([[[0.0, math.log(3)], [0.0, 0.0], [math.log(2), 0.0]]])  # (1, 3, 2)
    old = torch.tensor([[[0.0, 0.0], [0.0, math.log(3)]]])  # (1, 2, 2)
    labels = torch.tensor([[0, 2]])
    criterion = LabelGuidedKnowledgeDistillationLoss("none", prev_kd=1, novel_kd=1)
    # Point 0: q = [1/2, 1/2, 0], p = [1/4, 1/4, 1/2] -> ln 4. Point 1: q = [1/4, 3/4] moved to
    # [0, 3/4, 1/4], p = [3/5, 1/5, 1/5] -> ln 5.
    expected = torch.tensor([[math.log(4), math.log(5)]])  # (B, N)
    torch.testing.assert_close(criterion.loss_map(logits, old, labels), expected)
    # reduction="none": the reference's 1-D layout, previous points first, then novel ones.
    torch.testing.assert_close(criterion(logits, old, labels), torch.tensor([math.log(4), math.log(5)]))


# --- terms, pseudo-labels, thresholds -------------------------------------------------------------------


def test_downsample_labels_keeps_per_point_labels():
    labels = torch.randint(0, 5, (2, 30), dtype=torch.uint8)
    out = downsample_labels(labels, 16, (30,))
    assert out.dtype == torch.long and torch.equal(out, labels.long())
    # Images keep their stride sampling: label[16 i, 16 j].
    pixels = torch.arange(64 * 64).view(1, 64, 64) % 7
    assert torch.equal(downsample_labels(pixels, 16, (4, 4)), pixels[:, ::16, ::16])


def _batches_for_terms(data: dict, layout: Callable) -> StepBatch:
    labeler = PseudoLabeler(
        "entropy",
        C_OLD,
        thresholds=torch.full((C_NEW,), 0.05),
        max_entropy=math.log(C_NEW),
        classif_adaptive_factor=True,
    )
    labels, logits, old = layout(data["labels"]), layout(data["logits"]), layout(data["old"])
    pseudo = labeler(labels, old)
    body = layout(data["logits"][:, :3] * 2)
    return StepBatch(
        images=torch.zeros(1),
        labels=pseudo.labels,
        original_labels=labels,
        outputs=logits,
        features={"sem_logits_small": logits, "body": body},
        outputs_old=old,
        features_old={"sem_logits_small": old, "body": body.detach() + 1},
        pseudo=pseudo,
    )


def test_loss_terms_and_pseudo_labels_on_points_equal_the_image_layout():
    terms = {
        "ce": ClassificationTerm(nn.CrossEntropyLoss(ignore_index=255, reduction="none")),
        "unce": ClassificationTerm(UnbiasedCrossEntropy(C_OLD, reduction="none"), ce_on_pseudo=True),
        "lgkd": OutputKDTerm(LabelGuidedKnowledgeDistillationLoss(prev_kd=5, novel_kd=1), 1.0, True, 16),
        "unkd": OutputKDTerm(UnbiasedKnowledgeDistillationLoss(reduction="none"), 10.0),
        "de": EncoderKDTerm(100.0),
        "icarl": ICaRLTerm(10.0),
        "entmin": EntropyMinTerm(),
    }
    data = point_batch(1)
    points, pixels = _batches_for_terms(data, lambda t: t), _batches_for_terms(data, image)
    assert points.pseudo.classif_adaptive_factor.shape == (B, 1)
    torch.testing.assert_close(
        points.pseudo.classif_adaptive_factor, pixels.pseudo.classif_adaptive_factor[..., 0]
    )
    assert torch.equal(points.labels, pixels.labels[..., 0])
    assert (points.labels != points.original_labels).any()  # some background points were pseudo-labelled
    for name, term in terms.items():
        torch.testing.assert_close(term(points), term(pixels), msg=name)
        val_points, val_pixels = term.validation_loss(points), term.validation_loss(pixels)
        if val_points is not None:
            torch.testing.assert_close(val_points, val_pixels, msg=name)
    # LGKD distils every point with its own label: training and validation compute the same loss.
    expected = LabelGuidedKnowledgeDistillationLoss(prev_kd=5, novel_kd=1)(
        data["logits"], data["old"], data["labels"]
    )
    torch.testing.assert_close(terms["lgkd"](points), expected)
    validation = dataclasses.replace(points, labels=points.original_labels, pseudo=None)  # as in validate()
    torch.testing.assert_close(terms["lgkd"].validation_loss(validation), expected)


@pytest.mark.parametrize("mode", ["naive", "confidence", "threshold_0.5", "median", "entropy"])
def test_every_pseudo_label_mode_on_points_equals_the_image_layout(mode):
    data = point_batch(2)
    labeler = PseudoLabeler(
        mode,
        C_OLD,
        thresholds=torch.full((C_NEW,), 0.3),
        max_entropy=math.log(C_NEW),
        classif_adaptive_factor=True,
    )
    points, pixels = labeler(data["labels"], data["old"]), labeler(image(data["labels"]), image(data["old"]))
    for field in ("labels", "mask_background", "mask_valid", "sample_weights", "pseudo_targets"):
        a, b = getattr(points, field), getattr(pixels, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.equal(a, b[..., 0]), field


def test_find_median_on_points_equals_the_image_layout():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(C_OLD, 9, generator=g)
    batches = [(torch.rand(B, 9, N, generator=g), torch.randint(0, 3, (B, N), generator=g)) for _ in range(3)]

    as_images = [(image(x), image(y)) for x, y in batches]
    # Thresholds that clamp nothing; confident logits (scale 30) so that the entropy histogram's median
    # search (the reference's, which adds bin indices) ends inside the histogram.
    for mode, threshold, scale in (("entropy", 0.0, 30.0), ("probability", 1.0, 3.0)):

        def old_logits(x: torch.Tensor, scale: float = scale) -> torch.Tensor:  # per-point, any layout
            return torch.einsum("oc,bc...->bo...", weight, x) * scale

        points = find_median(batches, old_logits, "cpu", C_NEW, mode=mode, threshold=threshold)
        pixels = find_median(as_images, old_logits, "cpu", C_NEW, mode=mode, threshold=threshold)
        torch.testing.assert_close(points[0], pixels[0])
        assert points[1] == pixels[1]
        assert (points[0] != threshold).any()  # some class got its own median


def test_metrics_count_clouds_and_points():
    metrics = StreamSegMetrics(3, sample_ndim=1)
    metrics.update(torch.tensor([[0, 1, 2, 255], [1, 1, 0, 0]]), torch.tensor([[0, 1, 1, 0], [1, 1, 0, 2]]))
    metrics.update(torch.tensor([2, 2]), torch.tensor([2, 2]))  # one (N,) cloud
    score = metrics.get_results()
    assert score["Total samples"] == 3
    assert metrics.confusion_matrix.sum() == 9  # the ignored point is not counted
    assert score["Class IoU"][1] == pytest.approx(3 / (3 + 1 + 1e-6))
    assert StreamSegMetrics(3).sample_ndim == 2
    with pytest.raises(ValueError, match="sample_ndim"):
        StreamSegMetrics(3, sample_ndim=3)


# --- the Trainer, every method, two steps -----------------------------------------------------------------

POINTS, BATCH, ITERS, K = 48, 2, 2, 6
STEP_CLASSES = {0: [16], 1: [16, 5]}  # a ScanNet 15-5 style task: background + 15, then 5 new classes
EXPECTED_TERMS = {
    "FT": {"ce"},
    "LWF": {"ce", "kd"},
    "LWF-MC": {"ce", "icarl"},
    "ILT": {"ce", "kd", "de"},
    "EWC": {"ce", "reg"},
    "RW": {"ce", "reg"},
    "PI": {"ce", "reg"},
    "MiB": {"ce", "kd"},
    "PLOP": {"ce"},
    "LGKD": {"ce", "kd"},
}


def point_opts(method: str, step: int) -> argparse.Namespace:
    """The method preset through the real parser, then the point-cloud model (POD does not apply)."""
    argv = ["--dataset", "voc", "--task", "15-5", "--step", str(step), "--method", method, "--no_progress"]
    argv += ["--no_pretrained", "--device", "cpu", "--batch_size", str(BATCH), "--lr", "0.01"]
    opts = argparser.modify_command_options(argparser.get_argparser().parse_args(argv))
    opts.backbone, opts.dataset, opts.knn_k, opts.knn_chunk, opts.pod = "dgcnn", "scannet", K, 50, None
    return opts


def point_batches(step: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(ITERS):
        points = torch.rand(BATCH, 9, POINTS, generator=g)
        if step == 0:
            labels = torch.randint(0, 16, (BATCH, POINTS), generator=g)
        else:  # old classes are background at step 1: labels 0 and 16..20
            labels = torch.randint(15, 21, (BATCH, POINTS), generator=g)
            labels[labels == 15] = 0
        labels[:, :3] = 255
        batches.append((points, labels.to(torch.uint8)))
    return batches


def train_step(method: str, step: int, previous: dict | None) -> tuple[dict, list[dict], Trainer]:
    """One epoch of ``method`` at ``step`` (run.py's order: build, load step-1, balanced init, optimizer)."""
    torch.manual_seed(step)
    opts = point_opts(method, step)
    cpu = torch.device("cpu")
    model = make_model(opts, STEP_CLASSES[step])
    model_old = None
    if step > 0:
        load_model_state(model, previous["model_state"], strict=False)
        if opts.init_balanced:
            model.init_new_classifier(cpu)
        model_old = make_model(opts, STEP_CLASSES[step - 1])
        load_model_state(model_old, previous["model_state"], strict=True)
        model_old.eval().requires_grad_(False)
    state = previous["trainer_state"] if previous else None
    trainer = Trainer(model, model_old, cpu, opts, state, classes=STEP_CLASSES[step], step=step)
    batches = point_batches(step, seed=step)
    trainer.before(batches)
    losses: list[dict] = []
    train_step_fn = trainer._train_step
    trainer._train_step = lambda *a: losses.append(train_step_fn(*a)) or losses[-1]
    optim = build_optimizer(opts, model)
    trainer.train(0, optim, batches, print_int=1)
    checkpoint = {"model_state": add_module_prefix(model.state_dict()), "trainer_state": trainer.state_dict()}
    return checkpoint, losses, trainer


@pytest.mark.parametrize("method", list(EXPECTED_TERMS))
def test_every_method_trains_the_point_model_for_two_steps(method):
    step0, losses0, _ = train_step(method, 0, None)
    assert all(set(d) <= {"ce", "reg"} for d in losses0)
    _, losses1, trainer = train_step(method, 1, step0)
    assert trainer.use_old == (method not in ("FT", "EWC", "RW", "PI"))
    for iteration in losses1:
        assert set(iteration) == EXPECTED_TERMS[method]
        assert all(torch.isfinite(v) for v in iteration.values())
    last = losses1[-1]
    assert last["ce"] > 0
    for name in EXPECTED_TERMS[method] - {"ce"}:
        assert last[name] > 0, name  # every distillation / regularisation term is active
    if method in ("PLOP", "LGKD"):
        labeler = trainer.pseudo_labeler
        assert labeler is not None and labeler.mode == "entropy" and labeler.classif_adaptive_factor
        assert labeler.thresholds.shape == (21,)
    if method == "LGKD":
        assert isinstance(trainer.loss_terms["kd"].loss, LabelGuidedKnowledgeDistillationLoss)
    if method == "MiB":
        assert isinstance(trainer.loss_terms["ce"].criterion, UnbiasedCrossEntropy)
        assert isinstance(trainer.loss_terms["kd"].loss, UnbiasedKnowledgeDistillationLoss)


def test_validation_of_the_point_model():
    step0, _, _ = train_step("LGKD", 0, None)
    _, _, trainer = train_step("LGKD", 1, step0)
    metrics = StreamSegMetrics(21, sample_ndim=1)
    batches = point_batches(1, seed=7)
    (class_loss, reg_loss), score, samples = trainer.validate(batches, metrics, ret_samples_ids=[1])
    assert math.isfinite(class_loss) and reg_loss > 0  # LGKD's validation loss on every point
    assert score["Total samples"] == ITERS * BATCH
    assert metrics.confusion_matrix.sum() == ITERS * BATCH * (POINTS - 3)
    ((points, labels, prediction),) = samples
    assert points.shape == (9, POINTS) and labels.shape == prediction.shape == (POINTS,)


@pytest.mark.parametrize("method", ["LGKD", "MiB"])
def test_point_training_loop_reads_the_device_only_at_the_print_interval(method):
    """The kNN chunk loops, the per-point losses and pseudo-labels add no host-device synchronisation."""
    from tests.test_host_sync import HostReads, Loader, _phase

    opts = point_opts(method, 1)
    model, model_old = make_model(opts, STEP_CLASSES[1]), make_model(opts, STEP_CLASSES[0])
    model_old.load_state_dict({k: v for k, v in model.state_dict().items() if k in model_old.state_dict()})
    model_old.eval().requires_grad_(False)
    cpu = torch.device("cpu")
    trainer = Trainer(model, model_old, cpu, opts, None, classes=STEP_CLASSES[1], step=1)
    batches = point_batches(1, seed=3)  # two iterations: the first has no print interval
    trainer.before(batches[:1])
    record = HostReads()
    trainer._train_step = _phase(record, "iteration", trainer._train_step)
    trainer._check_finite = _phase(record, "print interval", trainer._check_finite)
    trainer._log_interval = _phase(record, "print interval", trainer._log_interval)
    record.phase = "loop"
    with record:
        trainer.train(0, build_optimizer(opts, model), Loader(batches, record), print_int=2)
    assert not [r for r in record.reads if r[0] not in ("print interval", "epoch end")], record.reads
