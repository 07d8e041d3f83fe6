"""Task tables (§3): every split of every dataset, helper functions and error messages."""

from __future__ import annotations

import pytest

import tasks
from utils.errors import TaskError

NUM_LABELS = {"voc": 21, "ade": 151, "cityscapes_domain": 21}  # cityscapes_domain: 21 cities

# Steps per task and labels per step, written out from §3.1.
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

ALL_TASKS = [(dataset, task) for dataset, table in tasks.TASKS.items() for task in table]


def test_every_task_is_expected_and_vice_versa():
    assert sorted(ALL_TASKS) == sorted(EXPECTED_PER_STEP)
    assert len(tasks.tasks_voc) == 27
    assert set(tasks.TASKS) == {"voc", "ade", "cityscapes_domain"}


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
    assert task_list == list(tasks.tasks_voc) + list(tasks.tasks_ade) + list(tasks.tasks_cityscapes_domain)
    assert task_list.count("offline") == 3
    assert len(task_list) == 27 + 5 + 4


def test_unknown_dataset_lists_datasets():
    with pytest.raises(TaskError, match="voc, ade, cityscapes_domain"):
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
