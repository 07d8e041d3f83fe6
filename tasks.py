"""Continual-learning task splits: which classes (or, for Cityscapes, which domains) each step introduces.

A task maps a step index to the list of class indices learned at that step. Step 0 always contains the
background class 0 for VOC, ADE20k, S3DIS and ScanNet. The 2D tables reproduce the reference exactly
(``tasks.py`` ``tasks_voc``, ``tasks_ade``, ``tasks_cityscapes_domain``), including the stored order of the
random-order VOC tasks ``15-5s_b`` .. ``15-5s_w``: the datasets re-index classes by task order, so that order
is part of the task definition. The 3D tables follow 3DPC-CISS's class orders and settings (see
``tasks_s3dis`` below).

This module is pure: no I/O and no torch. ``path_base`` is only a string (the reference split-cache
location, relative to the working directory); callers decide where caches really go.
"""

from __future__ import annotations

from utils.errors import TaskError


def _span(first: int, last: int) -> list[int]:
    """Inclusive integer range, to keep the tables below readable."""
    return list(range(first, last + 1))


# fmt: off
tasks_voc: dict[str, dict[int, list[int]]] = {
    "offline": {0: _span(0, 20)},
    "19-1": {0: _span(0, 19), 1: [20]},
    "15-5": {0: _span(0, 15), 1: [16, 17, 18, 19, 20]},
    "15-5s": {0: _span(0, 15), 1: [16], 2: [17], 3: [18], 4: [19], 5: [20]},
    # Random class orders of 15-1 (the "15-5s" setting): step-0 lists in their stored, unsorted order.
    "15-5s_b": {0: [0, 12, 9, 20, 7, 15, 8, 14, 16, 5, 19, 4, 1, 13, 2, 11], 1: [17], 2: [3], 3: [6], 4: [18], 5: [10]},
    "15-5s_c": {0: [0, 13, 19, 15, 17, 9, 8, 5, 20, 4, 3, 10, 11, 18, 16, 7], 1: [12], 2: [14], 3: [6], 4: [1], 5: [2]},
    "15-5s_d": {0: [0, 15, 3, 2, 12, 14, 18, 20, 16, 11, 1, 19, 8, 10, 7, 17], 1: [6], 2: [5], 3: [13], 4: [9], 5: [4]},
    "15-5s_e": {0: [0, 7, 5, 3, 9, 13, 12, 14, 19, 10, 2, 1, 4, 16, 8, 17], 1: [15], 2: [18], 3: [6], 4: [11], 5: [20]},
    "15-5s_f": {0: [0, 7, 13, 5, 11, 9, 2, 15, 12, 14, 3, 20, 1, 16, 4, 18], 1: [8], 2: [6], 3: [10], 4: [19], 5: [17]},
    "15-5s_g": {0: [0, 7, 5, 9, 1, 15, 18, 14, 3, 20, 10, 4, 19, 11, 17, 16], 1: [12], 2: [8], 3: [6], 4: [2], 5: [13]},
    "15-5s_h": {0: [0, 12, 9, 19, 6, 4, 10, 5, 18, 14, 15, 16, 3, 8, 7, 11], 1: [13], 2: [2], 3: [20], 4: [17], 5: [1]},
    "15-5s_i": {0: [0, 13, 10, 15, 8, 7, 19, 4, 3, 16, 12, 14, 11, 5, 20, 6], 1: [2], 2: [18], 3: [9], 4: [17], 5: [1]},
    "15-5s_j": {0: [0, 1, 14, 9, 5, 2, 15, 8, 20, 6, 16, 18, 7, 11, 10, 19], 1: [3], 2: [4], 3: [17], 4: [12], 5: [13]},
    "15-5s_k": {0: [0, 16, 13, 1, 11, 12, 18, 6, 14, 5, 3, 7, 9, 20, 19, 15], 1: [4], 2: [2], 3: [10], 4: [8], 5: [17]},
    "15-5s_l": {0: [0, 10, 7, 6, 19, 16, 8, 17, 1, 14, 4, 9, 3, 15, 11, 12], 1: [2], 2: [18], 3: [20], 4: [13], 5: [5]},
    "15-5s_m": {0: [0, 18, 4, 14, 17, 12, 10, 7, 3, 9, 1, 8, 15, 6, 13, 2], 1: [5], 2: [11], 3: [20], 4: [16], 5: [19]},
    "15-5s_n": {0: [0, 5, 4, 13, 18, 14, 10, 19, 15, 7, 9, 3, 2, 8, 16, 20], 1: [1], 2: [12], 3: [11], 4: [6], 5: [17]},
    "15-5s_o": {0: [0, 9, 12, 13, 18, 7, 1, 15, 17, 10, 8, 4, 5, 20, 16, 6], 1: [14], 2: [19], 3: [11], 4: [2], 5: [3]},
    "15-5s_p": {0: [0, 9, 12, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], 1: [14], 2: [19], 3: [1], 4: [7], 5: [3]},
    "15-5s_q": {0: [0, 3, 14, 13, 18, 2, 11, 15, 17, 10, 8, 4, 5, 20, 16, 6], 1: [12], 2: [19], 3: [1], 4: [7], 5: [9]},
    "15-5s_r": {0: [0, 3, 14, 13, 1, 2, 11, 15, 17, 7, 8, 4, 5, 9, 16, 19], 1: [12], 2: [6], 3: [18], 4: [10], 5: [20]},
    "15-5s_s": {0: [0, 3, 14, 6, 1, 2, 11, 12, 17, 7, 20, 4, 5, 9, 16, 19], 1: [15], 2: [13], 3: [18], 4: [10], 5: [8]},
    "15-5s_t": {0: [0, 3, 15, 13, 1, 2, 11, 18, 17, 7, 20, 8, 5, 9, 16, 19], 1: [14], 2: [6], 3: [12], 4: [10], 5: [4]},
    "15-5s_u": {0: [0, 3, 15, 13, 14, 6, 11, 18, 17, 7, 20, 8, 4, 9, 16, 10], 1: [1], 2: [2], 3: [12], 4: [19], 5: [5]},
    "15-5s_v": {0: [0, 1, 2, 12, 14, 6, 19, 18, 17, 5, 20, 8, 4, 9, 16, 10], 1: [3], 2: [15], 3: [13], 4: [11], 5: [7]},
    "15-5s_w": {0: [0, 1, 2, 12, 14, 13, 19, 18, 7, 11, 20, 8, 4, 9, 16, 10], 1: [3], 2: [15], 3: [6], 4: [5], 5: [17]},
    "10-1": {0: _span(0, 10), **{step: [10 + step] for step in range(1, 11)}},
}
# fmt: on

tasks_ade: dict[str, dict[int, list[int]]] = {
    "offline": {0: _span(0, 150)},
    "100-50": {0: _span(0, 100), 1: _span(101, 150)},
    "100-10": {0: _span(0, 100), **{step: _span(91 + 10 * step, 100 + 10 * step) for step in range(1, 6)}},
    "100-5": {0: _span(0, 100), **{step: _span(96 + 5 * step, 100 + 5 * step) for step in range(1, 11)}},
    "50": {0: _span(0, 50), 1: _span(51, 100), 2: _span(101, 150)},
}

# Cityscapes as domains: the "labels" are domain ids (one per city), not semantic classes; every step
# sees all 19 semantic classes. The reference literal writes the "11-5" key twice with the same value,
# which a dict keeps once.
tasks_cityscapes_domain: dict[str, dict[int, list[int]]] = {
    "offline": {0: _span(0, 20)},
    "11-5": {0: _span(0, 10), 1: _span(11, 15), 2: _span(16, 20)},
    "11-1": {0: _span(0, 10), **{step: [10 + step] for step in range(1, 11)}},
    "1-1": {step: [step] for step in range(21)},
}

# 3D point clouds: the class-incremental protocol of 3DPC-CISS (Yang et al., CVPR 2023, code
# leolyj/3DPC-CISS, dataloaders/s3dis.py and dataloaders/scannet.py). Class ids are those of the prepared
# blocks (dataset/pointcloud.py): 0 is background (never present in S3DIS; ScanNet's "unannotated"), the
# real classes are 1..13 (S3DIS) and 1..20 (ScanNet) in the order of the datasets' class-name files.
# 3DPC-CISS defines two class orders ("cvfold"): fold 0 is the class-file order, fold 1 the alphabetical
# order of the class names. A task "B-I" learns the first B classes of the order at step 0 (with
# background 0) and I more classes at each later step until all are learned: "12-1", "10-3", "8-5" have
# two steps, "8-1" six. Fold 0 is the plain name, fold 1 the name with the suffix "_cv1" ("12-1_cv1");
# "offline" / "offline_cv1" learn every class at once (joint training, the upper bound).
#: S3DIS: 1 ceiling, 2 floor, 3 wall, 4 beam, 5 column, 6 window, 7 door, 8 table, 9 chair, 10 sofa,
#: 11 bookcase, 12 board, 13 clutter.
S3DIS_CLASS_ORDERS: dict[int, list[int]] = {
    0: _span(1, 13),
    # beam, board, bookcase, ceiling, chair, clutter, column, door, floor, sofa, table, wall, window
    1: [4, 12, 11, 1, 9, 13, 5, 7, 2, 10, 8, 3, 6],
}
#: ScanNet: 1 wall, 2 floor, 3 chair, 4 table, 5 desk, 6 bed, 7 bookshelf, 8 sofa, 9 sink, 10 bathtub,
#: 11 toilet, 12 curtain, 13 counter, 14 door, 15 window, 16 shower curtain, 17 refrigerator, 18 picture,
#: 19 cabinet, 20 otherfurniture.
SCANNET_CLASS_ORDERS: dict[int, list[int]] = {
    0: _span(1, 20),
    # bathtub, bed, bookshelf, cabinet, chair, counter, curtain, desk, door, floor, otherfurniture, picture,
    # refrigerator, shower curtain, sink, sofa, table, toilet, wall, window
    1: [10, 6, 7, 19, 3, 13, 12, 5, 14, 2, 20, 18, 17, 16, 9, 8, 4, 11, 1, 15],
}
#: The 3DPC-CISS settings per dataset as (base classes, classes per later step).
S3DIS_SETTINGS: list[tuple[int, int]] = [(12, 1), (10, 3), (8, 5), (8, 1)]
SCANNET_SETTINGS: list[tuple[int, int]] = [(19, 1), (17, 3), (15, 5), (15, 1)]
#: Suffix of the task names of each class-order fold.
FOLD_SUFFIX: dict[int, str] = {0: "", 1: "_cv1"}


def incremental_split(order: list[int], base: int, increment: int) -> dict[int, list[int]]:
    """Steps of a "base-increment" task on a class order: background 0 and the first ``base`` classes,
    then ``increment`` classes per step until the order is exhausted."""
    if (len(order) - base) % increment:
        raise ValueError(f"{len(order)} classes cannot be split as {base}-{increment}")
    rest = order[base:]
    steps = {0: [0, *order[:base]]}
    steps.update({1 + i // increment: rest[i : i + increment] for i in range(0, len(rest), increment)})
    return steps


def point_cloud_tasks(
    orders: dict[int, list[int]], settings: list[tuple[int, int]]
) -> dict[str, dict[int, list[int]]]:
    """Task table of a 3D dataset: every setting and the offline task, for each class-order fold."""
    table: dict[str, dict[int, list[int]]] = {}
    for fold, order in orders.items():
        suffix = FOLD_SUFFIX[fold]
        table[f"offline{suffix}"] = {0: [0, *order]}
        for base, increment in settings:
            table[f"{base}-{increment}{suffix}"] = incremental_split(order, base, increment)
    return table


tasks_s3dis: dict[str, dict[int, list[int]]] = point_cloud_tasks(S3DIS_CLASS_ORDERS, S3DIS_SETTINGS)
tasks_scannet: dict[str, dict[int, list[int]]] = point_cloud_tasks(SCANNET_CLASS_ORDERS, SCANNET_SETTINGS)

TASKS: dict[str, dict[str, dict[int, list[int]]]] = {
    "voc": tasks_voc,
    "ade": tasks_ade,
    "cityscapes_domain": tasks_cityscapes_domain,
    "s3dis": tasks_s3dis,
    "scannet": tasks_scannet,
}


def get_task_list() -> list[str]:
    """Return every task name of every dataset, for the ``--task`` choices.

    Reference behaviour (``get_task_list``): the key lists are concatenated, so names shared by several
    datasets (``offline``) appear several times; whether a task exists for the chosen dataset is checked later
    (:func:`get_task_dict`, called by ``argparser.validate_options``).
    """
    return [name for tasks in TASKS.values() for name in tasks]


def get_task_dict(dataset: str, task: str) -> dict[int, list[int]]:
    """Return the step -> labels table of ``task`` on ``dataset`` (the shared table; do not mutate it).

    Raises:
        TaskError: unknown dataset, or a task that does not exist for that dataset.
    """
    if dataset not in TASKS:
        raise TaskError(
            f"Unknown dataset {dataset!r}: no task table exists for it. "
            f"Pass --dataset with one of: {', '.join(TASKS)}."
        )
    tasks = TASKS[dataset]
    if task not in tasks:
        raise TaskError(
            f"Task {task!r} does not exist for dataset {dataset!r}. "
            f"Pass --task with one of the {dataset} tasks: {', '.join(tasks)}."
        )
    return tasks[task]


def get_num_steps(dataset: str, task: str) -> int:
    """Number of incremental steps of ``task`` (valid ``--step`` values are 0 .. num_steps - 1)."""
    return len(get_task_dict(dataset, task))


def _checked_task(dataset: str, task: str, step: int) -> dict[int, list[int]]:
    task_dict = get_task_dict(dataset, task)
    if isinstance(step, bool) or not isinstance(step, int) or step not in task_dict:
        raise TaskError(
            f"Step {step!r} does not exist in task {task!r} of dataset {dataset!r}, which has "
            f"{len(task_dict)} step(s). Pass --step with a value from 0 to {len(task_dict) - 1}."
        )
    return task_dict


def get_task_labels(dataset: str, task: str, step: int) -> tuple[list[int], list[int], str]:
    """Labels introduced at ``step``, labels of all previous steps, and the reference split-cache path.

    Args:
        dataset: ``voc``, ``ade``, ``cityscapes_domain``, ``s3dis`` or ``scannet``.
        task: task name valid for that dataset (e.g. ``15-5s``).
        step: incremental step, 0 .. get_num_steps(dataset, task) - 1.

    Returns:
        ``(labels, labels_old, path_base)``: a copy of the step's list; the concatenation of the lists
        of steps 0 .. step-1 in task order (including background 0 from step 0); and
        ``"data/{dataset}/{task}"``.

    Raises:
        TaskError: unknown dataset or task, or step out of range.
    """
    task_dict = _checked_task(dataset, task, step)
    labels = list(task_dict[step])
    labels_old = [label for s in range(step) for label in task_dict[s]]
    # Reference behaviour (``get_task_labels``): a path relative to the working directory, not to --data_root.
    path_base = f"data/{dataset}/{task}"
    return labels, labels_old, path_base


def get_per_task_classes(dataset: str, task: str, step: int) -> list[int]:
    """Number of labels introduced at each step 0 .. ``step``, e.g. VOC 15-5s step 3 -> [16, 1, 1, 1].

    For ``cityscapes_domain`` these are domain counts; the model ignores them there (one 19-way
    classifier at every step, reference ``IncrementalSegmentationModule.__init__``).

    Raises:
        TaskError: unknown dataset or task, or step out of range.
    """
    task_dict = _checked_task(dataset, task, step)
    return [len(task_dict[s]) for s in range(step + 1)]
