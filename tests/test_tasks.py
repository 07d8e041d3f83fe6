"""Task tables (reference ``tasks.py``): every split of every dataset, helper functions and error messages."""

from __future__ import annotations

import pytest

import tasks
from utils.errors import TaskError

# cityscapes_domain: 21 cities; s3dis / scannet: background 0 and 13 / 20 classes.
NUM_LABELS = {"voc": 21, "ade": 151, "cityscapes_domain": 21, "s3dis": 14, "scannet": 21}

# Steps per task and labels per step, written out from the reference's ``tasks.py``.
EXPECTED_PER_STEP = {
    ("voc", "offline"): [21],
    ("voc", "19-1"): [20, 1],
    ("voc", "15-5"): [16, 5],
    ("voc", "15-5s"): [16, 1, 1, 1, 1, 1],
    ("voc", "10-1"): [11] + [1] * 10,
    ("ade", "offline"): [151],
    ("ade", "100-50"): [101, 50],
    ("ade", "100-10"): [101] + [10] * 5,
    ("ade", "100-5"): [101] + [5] * 10,
    ("ade", "50"): [51, 50, 50],
    ("cityscapes_domain", "offline"): [21],
    ("cityscapes_domain", "11-5"): [11, 5, 5],
    ("cityscapes_domain", "11-1"): [11] + [1] * 10,
    ("cityscapes_domain", "1-1"): [1] * 21,
}
RANDOM_ORDER_TASKS = [f"15-5s_{letter}" for letter in "bcdefghijklmnopqrstuvw"]
EXPECTED_PER_STEP.update({("voc", name): [16, 1, 1, 1, 1, 1] for name in RANDOM_ORDER_TASKS})
# 3D (3DPC-CISS settings), each for class-order fold 0 (plain name) and fold 1 ("_cv1").
for fold in ("", "_cv1"):
    EXPECTED_PER_STEP.update(
        {
            ("s3dis", f"offline{fold}"): [14],
            ("s3dis", f"12-1{fold}"): [13, 1],
            ("s3dis", f"10-3{fold}"): [11, 3],
            ("s3dis", f"8-5{fold}"): [9, 5],
            ("s3dis", f"8-1{fold}"): [9, 1, 1, 1, 1, 1],
            ("scannet", f"offline{fold}"): [21],
            ("scannet", f"19-1{fold}"): [20, 1],
            ("scannet", f"17-3{fold}"): [18, 3],
            ("scannet", f"15-5{fold}"): [16, 5],
            ("scannet", f"15-1{fold}"): [16, 1, 1, 1, 1, 1],
        }
    )

ALL_TASKS = [(dataset, task) for dataset, table in tasks.TASKS.items() for task in table]


def test_every_task_is_expected_and_vice_versa():
    assert sorted(ALL_TASKS) == sorted(EXPECTED_PER_STEP)
    assert len(tasks.tasks_voc) == 27
    assert set(tasks.TASKS) == {"voc", "ade", "cityscapes_domain", "s3dis", "scannet"}


@pytest.mark.parametrize(("dataset", "task"), ALL_TASKS)
def test_steps_partition_all_labels(dataset, task):
    num_steps = tasks.get_num_steps(dataset, task)
    assert num_steps == len(EXPECTED_PER_STEP[dataset, task])
    seen: list[int] = []
    for step in range(num_steps):
        labels, labels_old, path_base = tasks.get_task_labels(dataset, task, step)
        assert not set(labels) & set(labels_old)
        assert labels_old == seen  # concatenation of the previous steps, in task order
        assert path_base == f"data/{dataset}/{task}"
        seen += labels
    # Every label 0..N-1 is introduced exactly once over the steps.
    assert sorted(seen) == list(range(NUM_LABELS[dataset]))
    assert tasks.get_per_task_classes(dataset, task, num_steps - 1) == EXPECTED_PER_STEP[dataset, task]


@pytest.mark.parametrize(("dataset", "task"), ALL_TASKS)
def test_step_zero_contains_background(dataset, task):
    labels, labels_old, _ = tasks.get_task_labels(dataset, task, 0)
    assert labels_old == []
    assert labels[0] == 0


def test_specific_values():
    assert tasks.get_per_task_classes("voc", "15-5s", 3) == [16, 1, 1, 1]
    assert tasks.get_per_task_classes("ade", "50", 2) == [51, 50, 50]
    assert tasks.get_per_task_classes("voc", "10-1", 10) == [11] + [1] * 10
    assert tasks.get_task_labels("voc", "19-1", 1) == ([20], list(range(20)), "data/voc/19-1")
    assert tasks.get_task_labels("voc", "15-5", 1)[0] == [16, 17, 18, 19, 20]
    assert tasks.get_task_labels("ade", "100-10", 3)[0] == list(range(121, 131))
    assert tasks.get_task_labels("ade", "100-5", 10)[0] == list(range(146, 151))
    assert tasks.get_task_labels("cityscapes_domain", "11-1", 4)[0] == [14]
    expected = ([20], list(range(20)), "data/cityscapes_domain/1-1")
    assert tasks.get_task_labels("cityscapes_domain", "1-1", 20) == expected


def test_random_order_keeps_stored_order():
    labels, labels_old, _ = tasks.get_task_labels("voc", "15-5s_b", 2)
    assert labels == [3]
    assert labels_old == [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11, 17]
    step0_w = [0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10]
    assert tasks.get_task_labels("voc", "15-5s_w", 0)[0] == step0_w
    assert [tasks.tasks_voc["15-5s_m"][s][0] for s in range(1, 6)] == [5, 11, 20, 16, 19]


def test_labels_are_copies():
    labels, labels_old, _ = tasks.get_task_labels("voc", "15-5s", 1)
    labels.append(99)
    labels_old.append(99)
    assert tasks.tasks_voc["15-5s"][1] == [16]
    assert tasks.tasks_voc["15-5s"][0] == list(range(16))


def test_task_list_concatenates_keys_with_duplicates():
    task_list = tasks.get_task_list()
    assert task_list == (
        list(tasks.tasks_voc)
        + list(tasks.tasks_ade)
        + list(tasks.tasks_cityscapes_domain)
        + list(tasks.tasks_s3dis)
        + list(tasks.tasks_scannet)
    )
    assert task_list.count("offline") == 5 and task_list.count("15-5") == 2
    assert len(task_list) == 27 + 5 + 4 + 10 + 10


def test_unknown_dataset_lists_datasets():
    with pytest.raises(TaskError, match="voc, ade, cityscapes_domain, s3dis, scannet"):
        tasks.get_task_labels("coco", "15-5", 0)


def test_unknown_task_lists_tasks_of_dataset():
    with pytest.raises(TaskError) as info:
        tasks.get_task_labels("ade", "15-5", 0)
    message = str(info.value)
    assert "'15-5'" in message and "offline, 100-50, 100-10, 100-5, 50" in message
    with pytest.raises(TaskError, match="--task"):
        tasks.get_per_task_classes("voc", "100-50", 0)


@pytest.mark.parametrize("step", [-1, 2, 7])
def test_step_out_of_range_lists_valid_range(step):
    with pytest.raises(TaskError, match="from 0 to 1"):
        tasks.get_task_labels("voc", "15-5", step)
    with pytest.raises(TaskError, match="from 0 to 1"):
        tasks.get_per_task_classes("voc", "15-5", step)


def test_task_error_is_a_user_error():
    from utils.errors import UserError

    with pytest.raises(UserError):
        tasks.get_num_steps("voc", "nope")


# ---- 3D tasks: the class orders and settings of 3DPC-CISS (dataloaders/s3dis.py, dataloaders/scannet.py)

S3DIS_NAMES = [
    "ceiling",
    "floor",
    "wall",
    "beam",
    "column",
    "window",
    "door",
    "table",
    "chair",
    "sofa",
    "bookcase",
    "board",
    "clutter",
]
SCANNET_NAMES = [
    "wall",
    "floor",
    "chair",
    "table",
    "desk",
    "bed",
    "bookshelf",
    "sofa",
    "sink",
    "bathtub",
    "toilet",
    "curtain",
    "counter",
    "door",
    "window",
    "shower curtain",
    "refrigerator",
    "picture",
    "cabinet",
    "otherfurniture",
]


def ids(names: list[str], vocabulary: list[str]) -> list[int]:
    """Class ids of ``names``: position in the class-name file, plus 1 (0 is background)."""
    return [vocabulary.index(name) + 1 for name in names]


@pytest.mark.parametrize(("dataset", "names"), [("s3dis", S3DIS_NAMES), ("scannet", SCANNET_NAMES)])
def test_3d_fold_orders_are_file_order_and_alphabetical(dataset, names):
    # Fold 0 learns the classes in the class-file order, fold 1 in alphabetical order of their names.
    offline0 = tasks.get_task_labels(dataset, "offline", 0)[0]
    offline1 = tasks.get_task_labels(dataset, "offline_cv1", 0)[0]
    assert offline0 == [0, *range(1, len(names) + 1)]
    assert offline1 == [0, *ids(sorted(names), names)]


def test_3d_tasks_match_3dpc_ciss_lists():
    # A few settings written out by class name, as 3DPC-CISS lists them.
    labels, old, path = tasks.get_task_labels("s3dis", "12-1_cv1", 1)
    assert labels == ids(["window"], S3DIS_NAMES) and path == "data/s3dis/12-1_cv1"
    assert old == [
        0,
        *ids(
            [
                "beam",
                "board",
                "bookcase",
                "ceiling",
                "chair",
                "clutter",
                "column",
                "door",
                "floor",
                "sofa",
                "table",
                "wall",
            ],
            S3DIS_NAMES,
        ),
    ]
    assert tasks.get_task_labels("s3dis", "10-3", 1)[0] == ids(["bookcase", "board", "clutter"], S3DIS_NAMES)
    assert tasks.get_task_labels("s3dis", "8-5_cv1", 1)[0] == ids(
        ["floor", "sofa", "table", "wall", "window"], S3DIS_NAMES
    )
    # 8-1: the five classes of 8-5 one at a time, in the same order.
    assert [tasks.get_task_labels("s3dis", "8-1", s)[0][0] for s in range(1, 6)] == ids(
        ["chair", "sofa", "bookcase", "board", "clutter"], S3DIS_NAMES
    )
    assert tasks.get_task_labels("scannet", "19-1", 1)[0] == ids(["otherfurniture"], SCANNET_NAMES)
    assert tasks.get_task_labels("scannet", "17-3_cv1", 1)[0] == ids(
        ["toilet", "wall", "window"], SCANNET_NAMES
    )
    assert [tasks.get_task_labels("scannet", "15-1_cv1", s)[0][0] for s in range(1, 6)] == ids(
        ["sofa", "table", "toilet", "wall", "window"], SCANNET_NAMES
    )
    assert tasks.get_task_labels("scannet", "15-5", 1)[0] == ids(
        ["shower curtain", "refrigerator", "picture", "cabinet", "otherfurniture"], SCANNET_NAMES
    )
    assert tasks.get_per_task_classes("scannet", "15-1", 3) == [16, 1, 1, 1]


def test_3d_split_rule_and_errors():
    # The rule behind every 3D table, on other values: base classes, then equal increments.
    order = [5, 3, 1, 4, 2]
    assert tasks.incremental_split(order, 3, 1) == {0: [0, 5, 3, 1], 1: [4], 2: [2]}
    assert tasks.incremental_split(order, 1, 2) == {0: [0, 5], 1: [3, 1], 2: [4, 2]}
    assert tasks.incremental_split(order, 5, 1) == {0: [0, 5, 3, 1, 4, 2]}
    with pytest.raises(ValueError, match="cannot be split as 2-2"):
        tasks.incremental_split(order, 2, 2)
    with pytest.raises(TaskError, match="12-1, 10-3, 8-5, 8-1"):
        tasks.get_task_labels("s3dis", "19-1", 0)
    with pytest.raises(TaskError, match="from 0 to 5"):
        tasks.get_task_labels("scannet", "15-1_cv1", 6)
