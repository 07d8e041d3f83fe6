"""StreamSegMetrics (reference ``metrics/stream_metrics.py``), the evaluation sampler (RN-08) and the poly
learning-rate schedule (reference ``utils/scheduler.py`` ``PolyLR``)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from metrics import StreamSegMetrics, confusion_matrix_to_fig
from utils.distributed import cleanup
from utils.errors import OptionsError
from utils.sampler import ShardedEvalSampler
from utils.scheduler import PolyLR, build_scheduler

EPS = 1e-6

# Hand-made confusion matrix, rows = ground truth, columns = prediction. Class 2 never occurs in the
# ground truth but is predicted once (for a class-3 pixel): it must be "X" and excluded from the means.
HIST = np.array(
    [
        [3, 1, 0, 0],
        [1, 2, 0, 1],
        [0, 0, 0, 0],
        [0, 0, 1, 1],
    ]
)


def _pixels_from_hist(hist: np.ndarray, n_ignored: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """(2, 2, 4) label/prediction maps whose valid pixels give ``hist``, plus 255-labelled pixels."""
    gt, pred = [], []
    for g in range(hist.shape[0]):
        for p in range(hist.shape[1]):
            gt += [g] * int(hist[g, p])
            pred += [p] * int(hist[g, p])
    gt += [255] * n_ignored
    pred += [1, 3, 0, 2, 1, 1][:n_ignored]  # whatever is predicted on ignored pixels must not count
    order = np.random.default_rng(0).permutation(len(gt))
    gt_arr = np.asarray(gt, dtype=np.uint8)[order].reshape(2, 2, 4)
    pred_arr = np.asarray(pred, dtype=np.int64)[order].reshape(2, 2, 4)
    return gt_arr, pred_arr


@pytest.fixture
def filled() -> StreamSegMetrics:
    metrics = StreamSegMetrics(4)
    gt, pred = _pixels_from_hist(HIST)
    metrics.update(gt, pred)
    return metrics


def test_confusion_matrix_counts_valid_pixels_only(filled: StreamSegMetrics) -> None:
    assert filled.confusion_matrix.dtype == torch.int64
    np.testing.assert_array_equal(filled.confusion_matrix.numpy(), HIST)
    assert filled.total_samples == 2


def test_results_by_hand(filled: StreamSegMetrics) -> None:
    res = filled.get_results()
    assert list(res) == [
        "Total samples",
        "Overall Acc",
        "Mean Acc",
        "FreqW Acc",
        "Mean IoU",
        "Class IoU",
        "Class Acc",
        "Confusion Matrix",
    ]
    assert res["Total samples"] == 2
    # Overall Acc = (3 + 2 + 0 + 1) / 10, no epsilon.
    assert res["Overall Acc"] == 0.6
    # Class Acc = diag / (gt_sum + eps), gt_sum = (4, 4, 0, 2); mean over present classes 0, 1, 3:
    # (3/4 + 2/4 + 1/2) / 3 = 0.58333... (0.583333145833401 with the epsilons).
    assert res["Mean Acc"] == pytest.approx(0.583333145833401, rel=1e-12)
    # IoU = diag / (gt_sum + pred_sum - diag + eps), pred_sum = (4, 3, 1, 2):
    # class 0: 3 / 5, class 1: 2 / 5, class 3: 1 / 3; class 2 is absent from the ground truth.
    assert res["Class IoU"][0] == pytest.approx(3 / (5 + EPS), rel=1e-12)
    assert res["Class IoU"][1] == pytest.approx(2 / (5 + EPS), rel=1e-12)
    assert res["Class IoU"][2] == "X"
    assert res["Class IoU"][3] == pytest.approx(1 / (3 + EPS), rel=1e-12)
    # Mean IoU over present classes only: (0.6 + 0.4 + 0.3333) / 3 = 0.4444 (not / 4 = 0.3333).
    assert res["Mean IoU"] == pytest.approx(0.4444443407407664, rel=1e-12)
    # FreqW = 0.4 * 0.6 + 0.4 * 0.4 + 0.2 * 1/3 = 0.46667.
    assert res["FreqW Acc"] == pytest.approx(0.4666665644444679, rel=1e-12)
    assert res["Class Acc"] == {
        0: pytest.approx(3 / (4 + EPS)),
        1: pytest.approx(2 / (4 + EPS)),
        2: "X",
        3: pytest.approx(1 / (2 + EPS)),
    }
    expected_cm = HIST / (HIST.sum(axis=1, keepdims=True) + EPS)
    np.testing.assert_allclose(res["Confusion Matrix"], expected_cm, rtol=1e-12)
    assert isinstance(res["Mean IoU"], np.float64)


def test_to_str_reference_text() -> None:
    results = {
        "Total samples": 2,
        "Overall Acc": 0.5,
        "Mean Acc": 0.25,
        "FreqW Acc": 0.125,
        "Mean IoU": 0.75,
        "Class IoU": {0: 0.5, 1: "X"},
        "Class Acc": {0: 0.25, 1: "X"},
        "Confusion Matrix": np.eye(2),
    }
    assert StreamSegMetrics.to_str(results) == (
        "\n"
        "Total samples: 2.000000\n"
        "Overall Acc: 0.500000\n"
        "Mean Acc: 0.250000\n"
        "FreqW Acc: 0.125000\n"
        "Mean IoU: 0.750000\n"
        "Class IoU:\n"
        "\tclass 0: 0.5\n"
        "\tclass 1: X\n"
        "Class Acc:\n"
        "\tclass 0: 0.25\n"
        "\tclass 1: X\n"
    )


def test_to_str_of_real_results(filled: StreamSegMetrics) -> None:
    text = StreamSegMetrics.to_str(filled.get_results())
    assert "Overall Acc: 0.600000\n" in text
    assert "\tclass 2: X\n" in text
    assert "Confusion" not in text


def test_torch_and_numpy_inputs_agree() -> None:
    gen = torch.Generator().manual_seed(0)
    gt = torch.randint(0, 5, (3, 16, 16), generator=gen)
    gt[:, :2] = 255
    pred = torch.randint(0, 5, (3, 16, 16), generator=gen)
    from_torch, from_numpy = StreamSegMetrics(5), StreamSegMetrics(5)
    from_torch.update(gt, pred)
    from_numpy.update(gt.numpy().astype(np.uint8), pred.numpy())
    assert torch.equal(from_torch.confusion_matrix, from_numpy.confusion_matrix)
    assert from_torch.confusion_matrix.sum().item() == 3 * 14 * 16
    assert from_torch.total_samples == from_numpy.total_samples == 3
    # Per-image accumulation (the reference loop) gives the same matrix as one batch.
    per_image = StreamSegMetrics(5)
    for i in range(3):
        per_image.update(gt[i : i + 1], pred[i : i + 1])
    assert torch.equal(per_image.confusion_matrix, from_torch.confusion_matrix)


def test_labels_outside_range_are_ignored() -> None:
    metrics = StreamSegMetrics(3)
    gt = torch.tensor([[[0, 1, 2, 3, 255, 7]]])  # 3 and 7 are not classes of a 3-class metric
    pred = torch.tensor([[[0, 1, 1, 2, 0, 0]]])
    metrics.update(gt, pred)
    assert metrics.confusion_matrix.sum().item() == 3
    assert metrics.confusion_matrix[2, 1].item() == 1


def test_predictions_out_of_range_are_refused() -> None:
    metrics = StreamSegMetrics(2)
    with pytest.raises(ValueError, match="outside"):
        metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 5))


def test_device_follows_first_batch_and_reset() -> None:
    metrics = StreamSegMetrics(3)
    metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    assert metrics.confusion_matrix.device == torch.device("cpu")
    metrics.reset()
    assert metrics.total_samples == 0
    assert metrics.confusion_matrix.sum().item() == 0


def test_empty_metrics_give_nan_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = StreamSegMetrics(3).get_results()
    assert np.isnan(res["Mean IoU"]) and np.isnan(res["Overall Acc"])
    assert res["Class IoU"] == {0: "X", 1: "X", 2: "X"}


def test_every_pixel_ignored_gives_the_reference_results_and_text() -> None:
    """FreqW Acc is the reference's sum over no class, 0.0 (not nan); the others are nan."""
    metrics = StreamSegMetrics(3)
    metrics.update(np.full((2, 2, 3), 255, dtype=np.uint8), np.zeros((2, 2, 3), dtype=np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = metrics.get_results()
    assert res["FreqW Acc"] == 0.0
    assert all(np.isnan(res[k]) for k in ("Overall Acc", "Mean Acc", "Mean IoU"))
    # The reference's StreamSegMetrics.to_str on the same batch, character for character.
    expected = (
        "\nTotal samples: 2.000000\nOverall Acc: nan\nMean Acc: nan\nFreqW Acc: 0.000000\nMean IoU: nan\n"
        "Class IoU:\n\tclass 0: X\n\tclass 1: X\n\tclass 2: X\n"
        "Class Acc:\n\tclass 0: X\n\tclass 1: X\n\tclass 2: X\n"
    )
    assert StreamSegMetrics.to_str(res) == expected


def test_synch_is_identity_with_one_process_and_runs_once(filled: StreamSegMetrics) -> None:
    before = filled.get_results()
    filled.synch()
    filled.synch()  # a second call must not count anything twice
    after = filled.get_results()
    np.testing.assert_array_equal(filled.confusion_matrix.numpy(), HIST)
    assert after["Total samples"] == before["Total samples"] == 2
    assert after["Mean IoU"] == before["Mean IoU"]
    with pytest.raises(RuntimeError, match="reset"):
        filled.update(np.zeros((1, 2, 2), dtype=np.uint8), np.zeros((1, 2, 2), dtype=np.int64))
    filled.reset()
    filled.update(np.zeros((1, 2, 2), dtype=np.uint8), np.zeros((1, 2, 2), dtype=np.int64))
    assert filled.total_samples == 1


def test_confusion_matrix_figure(filled: StreamSegMetrics) -> None:
    fig = confusion_matrix_to_fig(filled.get_results()["Confusion Matrix"])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_title() == "Confusion Matrix"
    assert ax.get_ylabel() == "True label"
    assert ax.get_xlabel() == "Predicted label"
    assert len(fig.axes) == 2  # image + colorbar
    assert ax.images[0].get_cmap().name == "Blues"


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [0, 1, 5, 7, 10, 1449])
def test_sharded_sampler_covers_each_index_once(world: int, size: int) -> None:
    dataset = list(range(size))
    shards = [list(ShardedEvalSampler(dataset, num_replicas=world, rank=r)) for r in range(world)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(size))  # no padding, no duplicates (RN-08 fixed)
    lengths = [len(ShardedEvalSampler(dataset, num_replicas=world, rank=r)) for r in range(world)]
    assert lengths == [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1


def test_sharded_sampler_defaults_and_validation() -> None:
    sampler = ShardedEvalSampler(list(range(5)))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)
    assert list(sampler) == [0, 1, 2, 3, 4]
    sampler.set_epoch(3)
    with pytest.raises(ValueError):
        ShardedEvalSampler(list(range(5)), num_replicas=2, rank=2)


def _sgd(lr: float = 0.01) -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9, nesterov=True)


def _step(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler, n: int) -> None:
    for _ in range(n):
        optimizer.step()
        scheduler.step()


def test_poly_lr_values() -> None:
    optimizer = _sgd()
    scheduler = PolyLR(optimizer, max_iters=10, power=0.9)
    assert optimizer.param_groups[0]["lr"] == 0.01  # first iteration at the base lr
    _step(optimizer, scheduler, 1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.009095325760829623, rel=1e-12)  # 0.01*0.9^0.9
    _step(optimizer, scheduler, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005358867312681466, rel=1e-12)  # 0.01*0.5^0.9
    _step(optimizer, scheduler, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0012589254117941673, rel=1e-12)  # 0.01*0.1^0.9
    _step(optimizer, scheduler, 1)
    assert optimizer.param_groups[0]["lr"] == 0.0
    _step(optimizer, scheduler, 3)  # beyond max_iters: clamped, never complex or NaN
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, float) and lr == 0.0


def test_poly_lr_state_dict_and_resume() -> None:
    optimizer = _sgd()
    scheduler = PolyLR(optimizer, max_iters=10, power=0.9)
    _step(optimizer, scheduler, 3)
    state = scheduler.state_dict()
    assert state["last_epoch"] == 3
    assert state["base_lrs"] == [0.01]
    assert state["max_iters"] == 10
    assert state["power"] == 0.9

    optimizer2 = _sgd()
    optimizer2.load_state_dict(optimizer.state_dict())
    resumed = PolyLR(optimizer2, max_iters=10, power=0.9)
    resumed.load_state_dict(state)
    _step(optimizer2, resumed, 1)
    _step(optimizer, scheduler, 1)
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_poly_lr_per_group_base_lrs() -> None:
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 0.001}], lr=0.01)
    scheduler = PolyLR(optimizer, max_iters=4, power=1.0)
    _step(optimizer, scheduler, 2)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.005, 0.0005])


def test_build_scheduler() -> None:
    from argparse import Namespace

    opts = Namespace(lr_policy="poly", lr_power=0.9, lr_decay_step=5000, lr_decay_factor=0.1)
    assert isinstance(build_scheduler(opts, _sgd(), 100), PolyLR)
    opts.lr_policy = "step"
    step = build_scheduler(opts, _sgd(), 100)
    assert isinstance(step, torch.optim.lr_scheduler.StepLR)
    assert (step.step_size, step.gamma) == (5000, 0.1)
    opts.lr_policy = "cosine"
    with pytest.raises(OptionsError):
        build_scheduler(opts, _sgd(), 100)
    with pytest.raises(OptionsError, match="empty"):
        PolyLR(_sgd(), max_iters=0)


def _synch_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    finished = False
    try:
        # Rank r holds a different part of the data: the global matrix is the sum.
        metrics = StreamSegMetrics(4)
        gt, pred = _pixels_from_hist(HIST)
        metrics.update(gt[rank : rank + 1], pred[rank : rank + 1])
        metrics.synch()
        metrics.synch()
        results[rank] = (metrics.confusion_matrix.numpy().tolist(), metrics.total_samples)
        finished = True
    finally:
        cleanup(synchronize=finished)


@pytest.mark.slow  # two spawned processes (a few seconds): run by `make test-slow`
def test_synch_sums_over_two_processes(tmp_path) -> None:
    import torch.multiprocessing as mp

    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_synch_worker, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
    assert set(results) == {0, 1}
    for rank in (0, 1):
        matrix, samples = results[rank]  # every rank holds the global result (all-reduce)
        np.testing.assert_array_equal(np.asarray(matrix), HIST)
        assert samples == 2


def test_predictions_out_of_range_in_a_middle_row_are_refused() -> None:
    # gt 0 with pred 3 would otherwise be counted as (gt 1, pred 0) in a 3-class matrix.
    metrics = StreamSegMetrics(3)
    with pytest.raises(ValueError, match="outside"):
        metrics.update(torch.zeros(1, 1, 2, dtype=torch.long), torch.tensor([[[3, -1]]]))
    assert metrics.confusion_matrix.sum().item() == 0


def test_update_never_reads_the_device_back() -> None:
    """Off the CPU, update() queues work only: no .item()/bool() (aten._local_scalar_dense), no bincount
    (whose CUDA kernel reads its input's min and max back). Checked on the meta device, where every op runs
    the same Python path as on a GPU but a host read is visible as an op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    metrics = StreamSegMetrics(4, device="meta")
    gt = torch.zeros(2, 8, 8, dtype=torch.uint8, device="meta")
    pred = torch.zeros(2, 8, 8, dtype=torch.long, device="meta")
    with Record() as record:
        metrics.update(gt, pred)
        metrics.update(gt, pred)
    assert any("scatter_add" in op for op in record.ops)
    assert not [op for op in record.ops if "_local_scalar_dense" in op or "bincount" in op or "nonzero" in op]


def test_out_of_range_predictions_counted_on_device_are_reported_at_results() -> None:
    # What a GPU run accumulates without checking (see update): the report comes at synch/get_results.
    metrics = StreamSegMetrics(3)
    metrics.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    metrics._count_vector()[-1] += 2  # two predictions of class 3 counted in the BAD_PRED bin
    with pytest.raises(ValueError, match="2 predicted pixels lie outside"):
        metrics.get_results()
    with pytest.raises(ValueError, match="outside"):
        metrics.synch()
