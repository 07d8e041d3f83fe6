#!/usr/bin/env python3
"""Continual semantic segmentation on your CPU: VOC 15-5 (task ``15-5``) with FT, MiB, PLOP and LGKD.

``make demo`` runs this script. It

1. writes a small synthetic data set in the Pascal VOC layout with ``data/make_synthetic.py``
   (under ``data/synthetic_demo/``, once);
2. trains step 0 (background + classes 1-15) once, with a ResNet-18 DeepLabV3 from scratch, and shares it
   between the methods, as the experiment scripts do with a released step-0 model (``STEP0_CKPT``):
   each method evaluates it with ``--test --ckpt STEP0`` (its step-0 CSV row) and starts step 1 with
   ``--step_ckpt STEP0``;
3. runs step 1 (classes 16-20 together) for every method, one ``run.py`` process each, with the options
   of ``scripts/voc/*_15-5.sh`` (``--overlap``, the ``--method`` preset, LGKD's ``--prev_kd 5
   --novel_kd 1``), fp32 (``--opt_level O0``) and a small backbone, crop and data set;
4. prints the final background / old / new / all mIoU per method (``average_csv.summarize``) and the
   all-class mIoU after each step, writes ``summary.json`` and PNG figures under ``results/demo/``.

Every method gets the same settings (:data:`FULL`); nothing is tuned per method. Where they differ from
the paper's (``scripts/voc/``) and why: README, "What the demo shows". Finished steps are not run again:
rerunning the script after an interruption (or with other ``--methods``) continues, and ``run.py`` itself
resumes an interrupted step from its last finished epoch.

Usage::

    python scripts/demo.py                      # the whole demo (its measured time: README, "Results")
    python scripts/demo.py --methods FT LGKD    # only these methods (step 0 is reused if already trained)
    python scripts/demo.py --quick --out /tmp/demo   # tiny smoke configuration (tests)
    python scripts/demo.py --dataset scannet    # the same on synthetic point clouds: ScanNet 15-1, DGCNN

With ``--dataset scannet`` (or ``s3dis``) the demo runs the point-cloud track instead: synthetic rooms in the
raw ScanNet (S3DIS) layout cut into blocks by ``data/prepare_3d.py``, task ``15-1`` (``8-1``) of 3DPC-CISS
(one new class per step, so that the mIoU curve shows the forgetting step by step), DGCNN with the
point-cloud defaults of ``run.py`` on small clouds (:data:`POINT_CLOUD_SETTINGS`), and the same steps,
tables and figures, the predictions drawn as top-down views of test blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, ClassVar

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from argparser import METHODS  # noqa: E402  (root on sys.path first)
from dataset import S3DIS_CLASSES, SCANNET_CLASSES, VOC_CLASSES  # noqa: E402
from scripts.demo_support.report import (  # noqa: E402
    MethodResult,
    build_summary,
    copy_figure,
    format_final_table,
    format_markdown_table,
    format_per_step_table,
    load_method_result,
    plot_confusion_matrix,
    plot_final_class_iou,
    plot_miou_per_step,
    plot_prediction_grid,
    write_json,
)
from tasks import get_task_dict  # noqa: E402
from utils.files import write_text_atomically  # noqa: E402

DATASET = "voc"
# VOC 15-5: background + classes 1-15 at step 0, then classes 16-20 together at step 1. In one final table
# it shows what each method learns of the new classes and keeps of the old ones. In 15-1 (task "15-5s",
# one class per step) fine-tuning forgets each new class at the next step as well, so its final new-class
# mIoU cannot show what it learned; and 15-1 costs five run.py processes per method instead of one.
TASK = "15-5"
PROTOCOL = "15-5"  # the protocol's name in the paper and in scripts/voc/{method}_{PROTOCOL}.sh
STEP_CLASSES: dict[int, list[int]] = get_task_dict(DATASET, TASK)
NUM_STEPS = len(STEP_CLASSES)
N_STEP0_CLASSES = len(STEP_CLASSES[0])  # background + 15 classes
N_CLASSES = sum(len(labels) for labels in STEP_CLASSES.values())
DEFAULT_METHODS = ("FT", "MiB", "PLOP", "LGKD")
ALL_METHODS = METHODS  # every --method preset of run.py
# Per-method arguments beyond --method, at steps >= 1, exactly as the reference scripts pass them
# (scripts/voc/lgkd_15-5.sh: the LGKD preset leaves --prev_kd / --novel_kd at 10 / 2).
METHOD_EXTRA_ARGS: dict[str, tuple[str, ...]] = {"LGKD": ("--prev_kd", "5", "--novel_kd", "1")}
# Step 0 is plain cross-entropy for every method (distillation, pseudo-labels, POD, unbiased CE and the
# balanced init only act from step 1 on), so one training serves them all; it runs with the FT preset.
STEP0_NAME = "step0"
STEP0_METHOD = "FT"
# Relative cost of a method's steps >= 1 (measured: PLOP and LGKD ~1.6x FT, MiB ~1.3x), to schedule chains.
CHAIN_COST: dict[str, float] = {"FT": 1.0, "MiB": 1.3, "PLOP": 1.6, "LGKD": 1.6}
DEMO_DATE = "demo"  # --date: results CSVs are {results_dir}/demo_voc_15-5_{method}.csv
DEFAULT_OUT = ROOT / "results" / "demo"
STATE_FILE = "demo_state.json"
TIMINGS_FILE = "step_times.json"
DATA_MARKER = "demo_data.json"
README_FIGURE = ROOT / "docs" / "images" / "demo_miou.png"
GRID_IMAGES = 6


@dataclass(frozen=True, kw_only=True)
class _DemoSchedule:
    """What every demo run has, images or point clouds; identical for every method.

    Step 0 uses ``lr_step0`` / ``epochs_step0`` / ``batch_step0`` and steps >= 1 ``lr_later`` /
    ``epochs_later`` / ``batch_later``.
    """

    num_train: int
    num_val: int
    data_seed: int
    batch_step0: int
    batch_later: int
    epochs_step0: int
    epochs_later: int
    lr_step0: float
    lr_later: float
    num_workers: int = 0
    # Validate only after the last epoch (the reference validates from epoch 30 on, every --val_interval).
    val_interval: int = 1000
    random_seed: int = 42
    #: The settings that define the data set (recorded next to it, see ensure_data).
    DATA_FIELDS: ClassVar[tuple[str, ...]] = ("num_train", "num_val", "data_seed")

    def data_args(self) -> list[str]:
        """Arguments of data/make_synthetic.py (besides --dataset and --out)."""
        return [
            "--num_train", str(self.num_train),
            "--num_val", str(self.num_val),
            *self.data_size_args(),
            "--seed", str(self.data_seed),
        ]  # fmt: skip

    def data_size_args(self) -> list[str]:
        """make_synthetic.py arguments that size each sample (none: the generator's defaults)."""
        return []

    def step_args(self, step: int) -> list[str]:
        """run.py training settings of a step (the same for every method)."""
        later = step > 0
        return [
            *self.model_args(),
            "--batch_size", str(self.batch_later if later else self.batch_step0),
            "--epochs", str(self.epochs_later if later else self.epochs_step0),
            "--lr", str(self.lr_later if later else self.lr_step0),
            "--num_workers", str(self.num_workers),
            "--val_interval", str(self.val_interval),
            "--random_seed", str(self.random_seed),
        ]  # fmt: skip

    def model_args(self) -> list[str]:
        """run.py arguments of the model and its input, before the schedule."""
        return []


@dataclass(frozen=True, kw_only=True)
class DemoSettings(_DemoSchedule):
    """An image demo run (VOC layout). The reference scripts use lr / epochs / batch 0.01 / 30 / 8 at
    step 0 and then 0.001 / 30 / 12 (batch per GPU, two GPUs)."""

    image_size: int
    crop_size: int
    backbone: str = "resnet18"
    DATA_FIELDS: ClassVar[tuple[str, ...]] = ("num_train", "num_val", "image_size", "data_seed")

    def data_size_args(self) -> list[str]:
        return ["--size", str(self.image_size)]

    def model_args(self) -> list[str]:
        return ["--backbone", self.backbone, "--no_pretrained", "--crop_size", str(self.crop_size)]


# The demo (README "What the demo shows": its time, and why these differ from the paper's settings).
# Step 1 keeps step 0's lr 0.01: the paper's 0.001 fine-tunes an ImageNet-pretrained network for 30
# epochs; with this network, trained from scratch, MiB, PLOP and LGKD learn none of the new classes in 6
# epochs at 0.001 (measured, README). A 96-pixel crop gives the output-stride-16 logits a 6 x 6 grid
# (4 x 4 at 64 pixels, where step 0 reaches 49 % mIoU instead of 70 %).
FULL = DemoSettings(
    num_train=480, num_val=100, image_size=96, data_seed=0, crop_size=96,
    batch_step0=16, batch_later=8, epochs_step0=12, epochs_later=6, lr_step0=0.01, lr_later=0.01,
)  # fmt: skip
# A smoke test of the whole pipeline in about a minute per method: the numbers mean nothing.
QUICK = DemoSettings(
    num_train=120, num_val=30, image_size=48, data_seed=0, crop_size=32,
    batch_step0=4, batch_later=4, epochs_step0=1, epochs_later=1, lr_step0=0.01, lr_later=0.01,
)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PointCloudDemoSettings(_DemoSchedule):
    """A point-cloud demo run (``--dataset scannet|s3dis``).

    The model and optimiser are run.py's point-cloud defaults (DGCNN from scratch, Adam at lr 0.001, as
    3DPC-CISS); the clouds are smaller (``num_points``, ``knn_k``) and the epochs fewer, to fit a CPU budget.
    """

    num_points: int
    knn_k: int

    def model_args(self) -> list[str]:
        return ["--num_points", str(self.num_points), "--knn_k", str(self.knn_k)]


# The point-cloud demos (README "The 3D demo": time and results) and their smoke configurations (whose
# numbers mean nothing). 48 ScanNet rooms give the rarest new class (picture) 3 training blocks, hence
# batch 2 at steps >= 1; lr 0.001 at every step is 3DPC-CISS's.
POINT_CLOUD_SETTINGS: dict[tuple[str, bool], PointCloudDemoSettings] = {
    ("scannet", False): PointCloudDemoSettings(
        num_train=48, num_val=8, data_seed=0, num_points=256, knn_k=10, batch_step0=8, batch_later=2,
        epochs_step0=4, epochs_later=5, lr_step0=0.001, lr_later=0.001,
    ),
    ("s3dis", False): PointCloudDemoSettings(
        num_train=48, num_val=8, data_seed=0, num_points=256, knn_k=10, batch_step0=8, batch_later=2,
        epochs_step0=4, epochs_later=5, lr_step0=0.001, lr_later=0.001,
    ),
    ("scannet", True): PointCloudDemoSettings(
        num_train=12, num_val=3, data_seed=0, num_points=128, knn_k=8, batch_step0=4, batch_later=2,
        epochs_step0=1, epochs_later=1, lr_step0=0.001, lr_later=0.001,
    ),
    ("s3dis", True): PointCloudDemoSettings(
        num_train=12, num_val=3, data_seed=0, num_points=128, knn_k=8, batch_step0=4, batch_later=2,
        epochs_step0=1, epochs_later=1, lr_step0=0.001, lr_later=0.001,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class DemoProtocol:
    """The continual task a demo runs, and how its report names things."""

    dataset: str
    task: str
    name: str  # the protocol's name, e.g. "VOC 15-5", "ScanNet 15-1"
    class_names: tuple[str, ...]
    data_folder: str  # what make_synthetic.py writes in the data root
    #: Per-method arguments beyond --method at steps >= 1 (as the experiment scripts pass them).
    method_extra_args: Mapping[str, tuple[str, ...]]
    readme_figure: Path
    data_text: str = "synthetic data"

    @property
    def step_classes(self) -> dict[int, list[int]]:
        return get_task_dict(self.dataset, self.task)

    @property
    def num_steps(self) -> int:
        return len(self.step_classes)

    @property
    def n_step0_classes(self) -> int:
        return len(self.step_classes[0])

    @property
    def n_classes(self) -> int:
        return sum(len(labels) for labels in self.step_classes.values())

    @property
    def point_cloud(self) -> bool:
        return self.dataset in ("s3dis", "scannet")


# LGKD's weights of the multi-step point-cloud scripts (scripts/scannet/lgkd_15-1.sh, s3dis/lgkd_8-1.sh).
POINT_CLOUD_EXTRA_ARGS: dict[str, tuple[str, ...]] = {"LGKD": ("--prev_kd", "1", "--novel_kd", "0")}
POINT_CLOUD_PROTOCOLS: dict[str, DemoProtocol] = {
    "scannet": DemoProtocol(
        dataset="scannet", task="15-1", name="ScanNet 15-1", class_names=tuple(SCANNET_CLASSES),
        data_folder="ScanNet", method_extra_args=POINT_CLOUD_EXTRA_ARGS,
        readme_figure=ROOT / "docs" / "images" / "demo_miou_scannet.png",
        data_text="synthetic point clouds (DGCNN)",
    ),
    "s3dis": DemoProtocol(
        dataset="s3dis", task="8-1", name="S3DIS 8-1", class_names=tuple(S3DIS_CLASSES),
        data_folder="S3DIS", method_extra_args=POINT_CLOUD_EXTRA_ARGS,
        readme_figure=ROOT / "docs" / "images" / "demo_miou_s3dis.png",
        data_text="synthetic point clouds (DGCNN)",
    ),
}  # fmt: skip


#: Values of the demo's --dataset.
DEMO_DATASETS = (DATASET, *POINT_CLOUD_PROTOCOLS)


def demo_protocol(dataset: str = DATASET) -> DemoProtocol:
    """The protocol of the demo of ``dataset``. The image demo's is made from this module's constants
    (:data:`TASK`, :data:`METHOD_EXTRA_ARGS` ...) when asked, so that changing them changes it."""
    if dataset != DATASET:
        return POINT_CLOUD_PROTOCOLS[dataset]
    return DemoProtocol(
        dataset=DATASET,
        task=TASK,
        name=f"VOC {PROTOCOL}",
        class_names=tuple(VOC_CLASSES),
        data_folder="PascalVOC2012",
        method_extra_args=METHOD_EXTRA_ARGS,
        readme_figure=README_FIGURE,
    )


def demo_settings(dataset: str, quick: bool) -> DemoSettings | PointCloudDemoSettings:
    """The settings of the demo of ``dataset`` (``--quick``: the smoke configuration)."""
    if dataset == DATASET:
        return QUICK if quick else FULL
    return POINT_CLOUD_SETTINGS[dataset, quick]


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo reads and writes (all under ``out`` except the data)."""

    out: Path
    data_root: Path
    dataset: str = DATASET  # which demo: voc, scannet or s3dis

    @property
    def protocol(self) -> DemoProtocol:
        return demo_protocol(self.dataset)

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def csv(self) -> Path:
        return self.out / "csv"

    @property
    def cache(self) -> Path:
        return self.out / "cache"

    @property
    def stdout(self) -> Path:
        return self.out / "stdout"

    def generated(self) -> list[Path]:
        """The folders the demo creates in ``out`` (removed when the settings change)."""
        return [self.checkpoints, self.logs, self.csv, self.cache, self.stdout]

    @property
    def prefix(self) -> str:
        """``{task}-{dataset}``, as run.py names checkpoints and log folders."""
        return f"{self.protocol.task}-{self.protocol.dataset}"

    def step_checkpoint(self, name: str, step: int) -> Path:
        return self.checkpoints / f"{self.prefix}_{name}_{step}.pth"

    def last_epoch_checkpoint(self, name: str, step: int) -> Path:
        return self.checkpoints / f"{self.prefix}_{name}_{step}_last.pth"

    def results_csv(self, name: str) -> Path:
        return self.csv / f"{DEMO_DATE}_{self.protocol.dataset}_{self.protocol.task}_{name}.csv"

    def step_options(self, name: str, step: int) -> Path:
        return self.logs / self.prefix / name / f"step{step}" / "opts.json"


@dataclass(frozen=True)
class StepCommand:
    """One run.py call of the demo."""

    name: str  # experiment name (--name): a method, or STEP0_NAME
    method: str
    step: int
    kind: str  # "train" or "test"
    argv: tuple[str, ...]


# ---------------------------------------------------------------------------------------------- commands
def display_path(path: Path) -> str:
    """``path`` relative to the repository root when inside it (commands run with cwd = root).

    Symbolic links are not resolved, so ``.venv/bin/python`` stays the virtual environment's interpreter.
    """
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(ROOT))
    except ValueError:
        return str(absolute)


def class_span(labels: Sequence[int]) -> str:
    """``[16, 17, 18, 19, 20]`` -> ``"16-20"``, ``[16]`` -> ``"16"``; other lists are written out."""
    labels = sorted(labels)
    if len(labels) > 1 and labels == list(range(labels[0], labels[-1] + 1)):
        return f"{labels[0]}-{labels[-1]}"
    return ", ".join(str(label) for label in labels)


def protocol_description(protocol: DemoProtocol | None = None) -> str:
    """The task's steps in words, e.g. ``step 0 = classes 0-15, step 1 = classes 16-20`` (None: VOC)."""
    protocol = protocol or demo_protocol()
    steps = protocol.step_classes
    return ", ".join(f"step {step} = classes {class_span(steps[step])}" for step in range(protocol.num_steps))


def new_classes(protocol: DemoProtocol | None = None) -> list[int]:
    """The classes added after step 0 (None: the VOC demo)."""
    protocol = protocol or demo_protocol()
    return [label for step in range(1, protocol.num_steps) for label in protocol.step_classes[step]]


def python_executable() -> str:
    return display_path(Path(sys.executable))


def common_args(paths: DemoPaths, name: str, method: str, step: int) -> list[str]:
    """Arguments every demo step shares: the reference scripts' (overlap, O0 on CPU) plus output folders."""
    return [
        "--data_root", display_path(paths.data_root), "--dataset", paths.protocol.dataset,
        "--task", paths.protocol.task, "--overlap",
        "--name", name, "--method", method, "--step", str(step), "--opt_level", "O0", "--device", "cpu",
        "--date", DEMO_DATE, "--checkpoint", display_path(paths.checkpoints),
        "--logdir", display_path(paths.logs), "--results_dir", display_path(paths.csv),
        "--cache_dir", display_path(paths.cache), "--no_progress",
    ]  # fmt: skip


def step0_command(settings: DemoSettings | PointCloudDemoSettings, paths: DemoPaths) -> StepCommand:
    """Train the shared step 0."""
    argv = [
        python_executable(),
        "run.py",
        *common_args(paths, STEP0_NAME, STEP0_METHOD, 0),
        *settings.step_args(0),
    ]
    return StepCommand(STEP0_NAME, STEP0_METHOD, 0, "train", tuple(argv))


def method_commands(
    method: str, settings: DemoSettings | PointCloudDemoSettings, paths: DemoPaths
) -> list[StepCommand]:
    """A method's chain: step 0 evaluated from the shared model, then the later steps of the task trained.

    This is the scripts' STEP0_CKPT path: ``--ckpt STEP0 --test`` writes the step-0 CSV row and
    ``--step_ckpt STEP0`` makes step 1 start from it; later steps load the previous step of this method.
    """
    step0 = display_path(paths.step_checkpoint(STEP0_NAME, 0))
    python = python_executable()
    commands = [
        StepCommand(method, method, 0, "test", (
            python, "run.py", *common_args(paths, method, method, 0), *settings.step_args(0),
            "--ckpt", step0, "--test",
        )),
    ]  # fmt: skip
    for step in range(1, paths.protocol.num_steps):
        argv = [python, "run.py", *common_args(paths, method, method, step), *settings.step_args(step)]
        argv += paths.protocol.method_extra_args.get(method, ())
        if step == 1:
            argv += ["--step_ckpt", step0]
        commands.append(StepCommand(method, method, step, "train", tuple(argv)))
    return commands


def synthetic_data_command(settings: DemoSettings | PointCloudDemoSettings, paths: DemoPaths) -> list[str]:
    return [
        python_executable(),
        "data/make_synthetic.py",
        "--dataset",
        paths.protocol.dataset,
        "--out",
        display_path(paths.data_root),
        *settings.data_args(),
    ]


# ---------------------------------------------------------------------------------------------- state
def csv_steps(path: Path) -> set[int]:
    """Steps that have a row in a results CSV."""
    if not path.is_file():
        return set()
    steps = set()
    for line in path.read_text().splitlines():
        head = line.split(",", 1)[0].strip()
        if head.isdigit():
            steps.add(int(head))
    return steps


def step_done(command: StepCommand, paths: DemoPaths) -> bool:
    """Whether a step finished with its model on disk: CSV row written, and for training its best
    checkpoint and no unfinished-epoch checkpoint (``run.py`` deletes ``*_last.pth`` at the end)."""
    if command.step not in csv_steps(paths.results_csv(command.name)):
        return False
    if command.kind == "test":
        return True
    return (
        paths.step_checkpoint(command.name, command.step).is_file()
        and not paths.last_epoch_checkpoint(command.name, command.step).exists()
    )


def first_step_to_run(commands: Sequence[StepCommand], paths: DemoPaths) -> int:
    """Index of the first step of a chain that has to run (``len(commands)`` when all are finished).

    The chain resumes after the latest step that finished with its model on disk, provided every step
    up to it has its CSV row. Intermediate checkpoints may have been removed (see
    :func:`remove_intermediate_checkpoint`): a finished later step stands for them.
    """
    rows = csv_steps(paths.results_csv(commands[0].name)) if commands else set()
    start = 0
    for index, command in enumerate(commands):
        if command.step not in rows:
            break
        if step_done(command, paths):
            start = index + 1
    return start


def remove_intermediate_checkpoint(command: StepCommand, paths: DemoPaths) -> None:
    """Once step t is trained, step t-1's model is no longer needed (t-1 >= 1; the shared step 0 and
    the final models stay): 122 MB each with the ResNet-18, in tasks of more than two steps."""
    if command.kind == "train" and command.step >= 2:
        paths.step_checkpoint(command.name, command.step - 1).unlink(missing_ok=True)


def prepare_output(paths: DemoPaths, settings: DemoSettings | PointCloudDemoSettings, fresh: bool) -> None:
    """Start over when asked or when the settings differ from those of the outputs already in ``out``."""
    state_path = paths.out / STATE_FILE
    wanted = {"settings": asdict(settings), "data_root": str(paths.data_root.resolve())}
    stale = fresh
    if state_path.is_file() and not fresh:
        try:
            stale = json.loads(state_path.read_text()) != wanted
        except (OSError, json.JSONDecodeError):
            stale = True
        if stale:
            print(
                f"[demo] the settings differ from those of the run in {display_path(paths.out)}: "
                "starting over."
            )
    elif not state_path.is_file() and any(p.exists() for p in paths.generated()):
        stale = True  # outputs of unknown settings
    if stale:
        for folder in paths.generated():
            shutil.rmtree(folder, ignore_errors=True)
        (paths.out / TIMINGS_FILE).unlink(missing_ok=True)
    paths.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(state_path, json.dumps(wanted, indent=2) + "\n")


def ensure_data(settings: DemoSettings | PointCloudDemoSettings, paths: DemoPaths, log: DemoProgress) -> None:
    """Generate the synthetic VOC tree (point clouds: rooms cut into blocks) unless the same one is there.

    A tree without the demo's marker file (e.g. one you made yourself with other settings, or a real
    VOC) is used as it is; ``make_synthetic.py`` itself refuses to overwrite a tree it did not make.
    """
    marker = paths.data_root / DATA_MARKER
    wanted = {"dataset": paths.protocol.dataset, **{k: getattr(settings, k) for k in settings.DATA_FIELDS}}
    if (paths.data_root / paths.protocol.data_folder).is_dir():
        if not marker.is_file():
            log.say(f"using the existing data set in {display_path(paths.data_root)}")
            return
        if json.loads(marker.read_text()) == wanted:
            return
        log.say(f"{display_path(paths.data_root)} holds a demo data set of other settings: regenerating it")
        marker.unlink()
    command = synthetic_data_command(settings, paths)
    log.say("generating the synthetic data set: " + shlex.join(command))
    start = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=child_env(1), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DemoError(
            f"data/make_synthetic.py failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    write_text_atomically(marker, json.dumps(wanted, indent=2) + "\n")
    log.say(f"data set ready ({time.monotonic() - start:.1f} s)")


# ---------------------------------------------------------------------------------------------- running
class DemoError(RuntimeError):
    """A step failed; the message holds the command and the end of its output."""


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages (None where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and of the children it has waited for."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class DemoProgress:
    """The demo's clock and its timestamped progress lines (safe to call from the chain threads); the
    ``run.py`` processes log through their own logger (``utils/logger.py``) into their output files."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.load_start = load_average()
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, message: str) -> None:
        with self.lock:
            print(f"[demo {self.elapsed():6.1f}s] {message}", flush=True)


def child_env(threads: int) -> dict[str, str]:
    """Environment of a run.py process: ``threads`` intra-op threads, no display."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), MPLBACKEND="Agg", PYTHONUNBUFFERED="1"
    )
    return env


def last_miou(paths: DemoPaths, name: str, step: int) -> float | None:
    path = paths.results_csv(name)
    if not path.is_file():
        return None
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if fields and fields[0].strip() == str(step):
            try:
                return 100.0 * float(fields[-1])
            except ValueError:
                return None
    return None


def run_process(argv: Sequence[str], env: dict[str, str], output: IO[str]) -> tuple[int, float | None]:
    """Run ``argv`` in the repository root, its output to ``output``; return its exit code and CPU time.

    The CPU time (user + system seconds of the process, read with ``os.wait4``) does not grow when other
    programs share the cores, unlike the wall time; None where the platform has no ``wait4``.
    """
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        if not hasattr(os, "wait4"):
            return proc.wait(), None
        _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:  # Ctrl-C or a failing sibling chain: do not leave the step running
        proc.kill()
        proc.wait()
        raise
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: Popen must not wait again
    return proc.returncode, usage.ru_utime + usage.ru_stime


def run_command(
    command: StepCommand, paths: DemoPaths, threads: int, log: DemoProgress
) -> dict[str, float | None]:
    """Run one step (its output goes to ``out/stdout``); return its ``wall_s`` and ``cpu_s`` seconds."""
    paths.stdout.mkdir(parents=True, exist_ok=True)
    output = paths.stdout / f"{command.name}_step{command.step}.log"
    start = time.monotonic()
    with open(output, "w") as handle:
        handle.write("$ " + shlex.join(command.argv) + "\n")
        handle.flush()
        returncode, cpu = run_process(command.argv, child_env(threads), handle)
    seconds = time.monotonic() - start
    if returncode != 0:
        tail = "".join(output.read_text().splitlines(keepends=True)[-40:])
        raise DemoError(
            f"{command.name} step {command.step} failed (exit {returncode}) after {seconds:.0f} s.\n"
            f"Command: {shlex.join(command.argv)}\nLast lines of {display_path(output)}:\n{tail}"
        )
    miou = last_miou(paths, command.name, command.step)
    what = "evaluated the shared step-0 model" if command.kind == "test" else "trained"
    cpu_text = "" if cpu is None else f" ({cpu:.0f} s CPU)"
    log.say(
        f"{command.name:<5} step {command.step} {what} in {seconds:5.1f} s{cpu_text}, "
        f"mIoU over seen classes {miou:.1f}%"
        if miou is not None
        else f"{command.name} step {command.step} done"
    )
    return {"wall_s": round(seconds, 1), "cpu_s": None if cpu is None else round(cpu, 1)}


def run_chain(
    commands: Sequence[StepCommand],
    paths: DemoPaths,
    threads: int,
    log: DemoProgress,
    timings: dict[str, dict],
    keep_checkpoints: bool = False,
) -> None:
    """Run the steps of one chain in order from the first unfinished one (a rerun step invalidates the
    later ones, which run again too)."""
    for command in commands[first_step_to_run(commands, paths) :]:
        timings[f"{command.name}/{command.step}"] = run_command(command, paths, threads, log)
        if not keep_checkpoints:
            remove_intermediate_checkpoint(command, paths)


def run_all(
    methods: Sequence[str],
    settings: DemoSettings | PointCloudDemoSettings,
    paths: DemoPaths,
    jobs: int,
    threads: int,
    log: DemoProgress,
    keep_checkpoints: bool = False,
) -> dict:
    """Step 0 once, then the methods' chains, ``jobs`` chains at a time; return the step timings
    (``{"FT/1": {"wall_s": ..., "cpu_s": ...}, ...}``)."""
    timings: dict[str, dict] = {}
    step0 = step0_command(settings, paths)
    if step_done(step0, paths):
        log.say(f"shared step 0 already trained: {display_path(paths.step_checkpoint(STEP0_NAME, 0))}")
    else:
        protocol = paths.protocol
        step0_classes = class_span(protocol.step_classes[0][1:])
        log.say(f"training the shared step 0 ({protocol.class_names[0]} + classes {step0_classes})")
        timings[f"{STEP0_NAME}/0"] = run_command(step0, paths, threads, log)
    # Longest chains first (old-model forward, POD, pseudo-labels), so that side-by-side chains end
    # together instead of one heavy chain running alone at the end.
    order = sorted(methods, key=lambda m: -CHAIN_COST.get(m, 1))
    chains = [method_commands(method, settings, paths) for method in order]
    jobs = max(1, min(jobs, len(chains)))
    if jobs == 1:
        for chain in chains:
            run_chain(chain, paths, threads, log, timings, keep_checkpoints)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [
                pool.submit(run_chain, chain, paths, threads, log, timings, keep_checkpoints)
                for chain in chains
            ]
            for future in futures:
                future.result()
    return timings


# ---------------------------------------------------------------------------------------------- report
def load_results(methods: Sequence[str], paths: DemoPaths) -> list[MethodResult]:
    results = [load_method_result(paths.results_csv(method), method) for method in methods]
    for result in results:
        result.csv_path = Path(display_path(paths.results_csv(result.name)))
    return results


def record_timings(paths: DemoPaths, new: dict[str, dict]) -> dict[str, dict]:
    """Merge this invocation's step times into those of earlier ones (a resumed demo keeps them all)."""
    path = paths.out / TIMINGS_FILE
    try:
        timings = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        timings = {}
    timings.update(new)
    write_text_atomically(path, json.dumps(timings, indent=2, sort_keys=True) + "\n")
    return timings


def method_command_lines(
    methods: Sequence[str], settings: DemoSettings | PointCloudDemoSettings, paths: DemoPaths
) -> dict[str, list[str]]:
    """Every method's chain as shell command lines, the shared step-0 training first."""
    step0 = shlex.join(step0_command(settings, paths).argv)
    return {m: [step0, *(shlex.join(c.argv) for c in method_commands(m, settings, paths))] for m in methods}


def draw_predictions(
    methods: Sequence[str], paths: DemoPaths, threads: int, log: DemoProgress
) -> dict[str, str]:
    """Prediction grid of every method's final model and LGKD's final confusion matrix (PNG paths)."""
    import torch

    from dataset.transform import IMAGENET_MEAN, IMAGENET_STD
    from scripts.demo_support.inference import (
        build_step_model,
        evaluate,
        load_step_options,
        pick_samples,
        predict,
        test_set,
    )
    from utils.visualization import make_pointcloud_grid, make_prediction_grid, voc_cmap

    protocol = paths.protocol
    figures: dict[str, str] = {}
    last = protocol.num_steps - 1
    device = torch.device("cpu")
    torch.set_num_threads(threads)
    opts = load_step_options(paths.step_options(methods[0], last))
    dataset = test_set(opts)
    # Point clouds: (K, 9, N) float points and (K, N) labels, drawn seen from above.
    images, labels, _ = pick_samples(dataset, GRID_IMAGES, protocol.n_step0_classes, seed=0)
    predictions = {}
    confusion_method = "LGKD" if "LGKD" in methods else methods[-1]
    for method in methods:
        method_opts = load_step_options(paths.step_options(method, last))
        model = build_step_model(method_opts, paths.step_checkpoint(method, last), device)
        predictions[method] = predict(model, images)
        if method == confusion_method:
            score = evaluate(model, dataset, protocol.n_classes, device)
            path = plot_confusion_matrix(
                score["Confusion Matrix"],
                paths.out / f"confusion_matrix_{method}.png",
                class_names=protocol.class_names,
                title=f"{method}, after step {last}: confusion matrix on the test set (rows sum to 1)",
                n_step0_classes=protocol.n_step0_classes,
            )
            figures["confusion_matrix"] = display_path(path)
    cmap = voc_cmap()
    if protocol.point_cloud:
        tile = 128
        grid = make_pointcloud_grid(images, labels, predictions, cmap, size=tile, radius=2)
    else:
        tile = images.shape[-1]
        grid = make_prediction_grid(images, labels, predictions, cmap, IMAGENET_MEAN, IMAGENET_STD)
    shown = sorted(
        {int(v) for v in labels.unique().tolist()}
        | {int(v) for p in predictions.values() for v in p.unique().tolist()}
    )
    legend = {c: (protocol.class_names[c], cmap[c].tolist()) for c in shown if c < protocol.n_classes}
    what = "Test blocks seen from above" if protocol.point_cloud else "Test images"
    path = plot_prediction_grid(
        grid,
        ["colours" if protocol.point_cloud else "image", "ground truth", *methods],
        tile,
        paths.out / "predictions.png",
        legend=legend,
        title=f"{what} after step {last} (classes {class_span(new_classes(protocol))} were added after "
        "step 0)",
    )
    figures["predictions"] = display_path(path)
    log.say(f"drew the predictions of {', '.join(methods)} and the confusion matrix of {confusion_method}")
    return figures


def report(
    methods: Sequence[str],
    settings: DemoSettings | PointCloudDemoSettings,
    paths: DemoPaths,
    timings: dict,
    log: DemoProgress,
    quick: bool,
    draw: bool = True,
    threads: int = 1,
) -> dict:
    """Tables on stdout, summary.json and the figures."""
    protocol = paths.protocol
    results = load_results(methods, paths)
    class_figure = plot_final_class_iou(
        results, paths.out / "final_class_iou.png", protocol.class_names, protocol.n_step0_classes
    )
    figures = {
        "miou_per_step": display_path(
            plot_miou_per_step(
                results,
                paths.out / "miou_per_step.png",
                protocol.n_step0_classes,
                protocol.n_classes,
                title=f"{protocol.name} (task {protocol.task}) on {protocol.data_text}",
                step_label=protocol_description(protocol),
            )
        ),
        "final_class_iou": display_path(class_figure),
    }
    if draw:
        figures.update(draw_predictions(methods, paths, threads, log))
    wall = round(log.elapsed(), 1)
    summary = build_summary(
        results,
        method_command_lines(methods, settings, paths),
        {
            "protocol": f"{protocol.dataset} {protocol.task} ({protocol.name}): "
            + protocol_description(protocol),
            "settings": asdict(settings),
            "quick": quick,
            "data_root": display_path(paths.data_root),
            # Steps finished by an earlier invocation are not run again: this is not the demo's total.
            "this_invocation_wall_time_s": wall,
            # User + system seconds of this process and the run.py / data processes it waited for.
            "this_invocation_cpu_time_s": round(cpu_seconds(), 1),
            # Wall time grows with the load (other programs on the cores), CPU time much less.
            "load_average": {"start": log.load_start, "end": load_average()},
            "step_times": record_timings(paths, timings),
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
            },
            "figures": figures,
        },
    )
    write_json(summary, paths.out / "summary.json")
    print()
    print(
        f"Final step {protocol.num_steps - 1} of {protocol.task} ({protocol.name}) on {protocol.data_text}, "
        "mIoU in % (as average_csv.py computes it):"
    )
    print(format_final_table(results, protocol.n_step0_classes, protocol.n_classes))
    print()
    print("mIoU over all seen classes after each step (%):")
    print(format_per_step_table(results))
    print()
    print("Markdown:")
    print(format_markdown_table(results, protocol.n_step0_classes, protocol.n_classes))
    print()
    print(f"Summary: {display_path(paths.out / 'summary.json')}; figures: " + ", ".join(figures.values()))
    return summary


# ---------------------------------------------------------------------------------------------- main
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=f"Continual learning demo on synthetic VOC-like data (VOC {PROTOCOL} with FT, MiB, PLOP, "
        "LGKD), or on synthetic point clouds (--dataset scannet: ScanNet 15-1; s3dis: S3DIS 8-1).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--dataset",
        default=DATASET,
        choices=list(DEMO_DATASETS),
        help="voc: images, DeepLabV3; scannet / s3dis: point clouds, DGCNN (3DPC-CISS protocol)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(DEFAULT_METHODS),
        choices=ALL_METHODS,
        metavar="METHOD",
        help=f"methods to run, among {', '.join(ALL_METHODS)}",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny smoke configuration (1 epoch per step, tiny data): checks the pipeline, "
        "the numbers mean nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (None: results/demo, results/demo_scannet or results/demo_s3dis, with _quick "
        "appended with --quick)",
    )
    parser.add_argument(
        "--data_root",
        type=Path,
        default=None,
        help="synthetic data set folder, generated if missing (None: data/synthetic_demo, "
        "data/synthetic_demo_scannet or data/synthetic_demo_s3dis, with _quick appended with --quick)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per run.py process. Small convolutions gain little from more, and when "
        "another program keeps a core busy two threads can run ten times slower than one",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=os.cpu_count() or 1,
        help="method chains run side by side, one run.py process each (default: the number of CPU cores)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete this demo's previous outputs in --out and start over"
    )
    parser.add_argument(
        "--keep_checkpoints",
        action="store_true",
        help="keep every step's checkpoint (by default a method keeps only its final model; the shared "
        "step-0 model is always kept)",
    )
    parser.add_argument(
        "--no_figures",
        action="store_true",
        help="skip the prediction grid and confusion matrix (they load every final model)",
    )
    parser.add_argument(
        "--readme_figure",
        action="store_true",
        help=f"also copy the mIoU figure to {display_path(README_FIGURE)} (point clouds: "
        "docs/images/demo_miou_{scannet,s3dis}.png)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the command lines and exit")
    return parser


def resolve_paths(args: argparse.Namespace) -> DemoPaths:
    dataset = getattr(args, "dataset", DATASET)
    suffix = ("" if dataset == DATASET else f"_{dataset}") + ("_quick" if args.quick else "")
    out = args.out if args.out is not None else DEFAULT_OUT.with_name(DEFAULT_OUT.name + suffix)
    data_root = args.data_root if args.data_root is not None else ROOT / "data" / f"synthetic_demo{suffix}"
    return DemoPaths(out=Path(out).resolve(), data_root=Path(data_root).resolve(), dataset=dataset)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    settings = demo_settings(args.dataset, args.quick)
    paths = resolve_paths(args)
    methods = list(dict.fromkeys(args.methods))
    if args.dry_run:
        print(shlex.join(synthetic_data_command(settings, paths)))
        print(shlex.join(step0_command(settings, paths).argv))
        for method in methods:
            for command in method_commands(method, settings, paths):
                print(shlex.join(command.argv))
        return 0
    log = DemoProgress()
    log.say(
        f"{paths.protocol.name} (task {paths.protocol.task}) with {', '.join(methods)}; "
        f"outputs in {display_path(paths.out)}" + (" (quick smoke configuration)" if args.quick else "")
    )
    try:
        prepare_output(paths, settings, args.fresh)
        ensure_data(settings, paths, log)
        timings = run_all(methods, settings, paths, args.jobs, args.threads, log, args.keep_checkpoints)
        summary = report(
            methods, settings, paths, timings, log, args.quick, draw=not args.no_figures, threads=args.threads
        )
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.readme_figure:
        copy_figure(ROOT / summary["figures"]["miou_per_step"], paths.protocol.readme_figure)
    log.say(f"done in {log.elapsed() / 60:.1f} min ({cpu_seconds() / 60:.1f} min CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
