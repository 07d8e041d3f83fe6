"""Command-line interface: every reference flag, method presets, derived options and validation.

The interface is the reference one flag for flag (reference ``argparser.py`` ``get_argparser``): same
names, ``dest``, types, defaults, choices and ``store_true``/``store_false`` polarity, including the
inverted ``--crop_val``, ``--visualize`` and ``--strict_weights`` and the hyphenated ``--fusion-mode``.
Scripts and saved option dumps of the reference therefore keep working. What changes is the shape:

* flags are grouped and the help shows the real defaults (``ArgumentDefaultsHelpFormatter``);
* every numeric flag declares its valid values (``**ranged(int, at_least(1))``, see :class:`InRange`):
  the parser refuses others with the flag, the value and the range, in one line, before any work;
* ``--method`` presets are data (:data:`METHOD_PRESETS`), resolved by :func:`resolve_preset`;
* :func:`modify_command_options` returns a new ``Namespace`` instead of mutating its input, with worker
  counts capped at the CPUs available;
* a point-cloud ``--dataset`` (S3DIS, ScanNet) brings its own defaults (:data:`POINT_CLOUD_DEFAULTS`: DGCNN
  and the 3DPC-CISS training settings) for the options the user did not set, told apart from explicit flags
  by :meth:`OptionParser.explicit_dests`;
* :func:`validate_options` refuses, before any work, values out of their declared range, sizes the model
  cannot train on, options set where they do not apply (:data:`OPTION_SCOPES`: e.g. POD or crops on point
  clouds) and option combinations the reference crashes on;
* :func:`save_options` writes the resolved options next to the logs.

Typical use (run.py)::

    opts, explicit = parse_command_line(argv)  # parse, record the explicit flags, modify_command_options
    validate_options(opts, explicit)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import tasks
from dataset.build import DATASETS as DATASET_CLASSES
from dataset.build import POINT_CLOUD_DATASETS, check_dataset_options
from dataset.incremental import DATA_MASKINGS
from dataset.pointcloud_transform import XYZ_NORMS
from models import BACKBONES, DEFAULT_KNN_CHUNK, DILATIONS, POINT_BACKBONES
from segmentation_module import (
    ABN_IMPLS,
    ALIGN_TYPES,
    MULTIMODAL_FUSIONS,
    NORM_ACTS,
    REFERENCE_MULTIMODAL_INITS,
    check_model_options,
)
from utils.errors import OptionsError
from utils.files import write_text_atomically
from utils.loss import BCE_SIGMOID_SHAPES
from utils.loss_terms import check_loss_options
from utils.pod import COLLAPSE_TYPES, PREPRO_TYPES, check_pod_options
from utils.pseudo_label import PSEUDO_ABLATIONS, PSEUDO_MODES, PSEUDO_SOFT_MODES, check_pseudo_mode
from utils.regularizer import REGULARIZERS
from utils.scheduler import LR_POLICIES

# The choices of an option and the rules of its values belong to the module that uses them (the datasets,
# the model, the losses, POD, pseudo-labelling): imported here for ``choices=`` and the help, and their
# checks called by validate_options, so that each rule is written once.

#: Every --dataset, in the order of the reference's choices (point clouds appended).
DATASETS = tuple(DATASET_CLASSES)
#: Image datasets; the point-cloud ones (the 3DPC-CISS protocol) have (9, N) points as items and DGCNN.
IMAGE_DATASETS = tuple(name for name in DATASETS if name not in POINT_CLOUD_DATASETS)

# Number of output classes per dataset. Reference ``argparser.py`` ``modify_command_options``:
# "cityscapes" and "cityscapes_classdomain" are known here but not selectable with --dataset. The
# point-cloud datasets count background 0 (S3DIS: none of its points; ScanNet: "unannotated") and their
# 13 / 20 classes.
NUM_CLASSES: dict[str, int] = {
    "voc": 21,
    "ade": 151,
    "cityscapes_domain": 19,
    "cityscapes": 17,
    "cityscapes_classdomain": 19,
    "s3dis": 14,
    "scannet": 21,
}
#: ResNet depths of the image model (``models.BACKBONES``); ``models.POINT_BACKBONES`` for point clouds.
IMAGE_BACKBONES = tuple(BACKBONES)


# numpy's legacy seeding (np.random.seed) takes 0 <= seed < 2**32; torch and python accept that range too.
MAX_SEED = 2**32 - 1


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: an interval (bounds optional, each open or closed).

    NaN and infinities are never valid: no option of this interface has a use for them, and a NaN
    compares False with every bound, so it would otherwise slip through.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    #: Replaces the generated description, for a range checked elsewhere (e.g. --step, by the task).
    text: str | None = None

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self, kind: type) -> str:
        """``"an integer >= 1"``, ``"a number in (0, 1]"``, ``"any finite number"`` ..."""
        if self.text is not None:
            return self.text
        noun = "an integer" if kind is int else "a number"
        if self.low is None and self.high is None:
            return "any integer" if kind is int else "any finite number"
        if self.high is None:
            return f"{noun} {'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{noun} {'<' if self.high_open else '<='} {_number(self.high)}"
        if kind is int and not (self.low_open or self.high_open):
            return f"{noun} from {_number(self.low)} to {_number(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{noun} in {left}{_number(self.low)}, {_number(self.high)}{right}"


ANY = Range()
# The valid steps depend on --task: validate_options refuses the others with a TaskError that names them.
STEP_RANGE = Range(text="a step of --task: 0 to its number of steps - 1")


def at_least(low: float) -> Range:
    return Range(low=low)


def above(low: float) -> Range:
    return Range(low=low, low_open=True)


def between(low: float, high: float) -> Range:
    return Range(low=low, high=high)


def out_of_range(flag: str, value: object, valid: Range, kind: type) -> str | None:
    """None if ``value`` (a number, or a list of numbers for ``nargs``) is valid, else the reason."""
    for item in value if isinstance(value, list | tuple) else [value]:
        if item not in valid:
            return f"{flag} {item!r} is out of range: it must be {valid.describe(kind)}"
    return None


class InRange(argparse.Action):
    """``store`` (any ``nargs``) that refuses values outside the option's declared :class:`Range`.

    Every numeric option of :func:`get_argparser` is declared through :func:`ranged`, so its valid values
    are checked when the command line is parsed, listed in ``--help``, and checked again by
    :func:`validate_options` on the resolved options (presets, hand-built namespaces).
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, valid: Range, **kwargs: Any) -> None:
        if kwargs.get("type") not in (int, float):
            raise ValueError(f"{dest}: InRange needs type=int or type=float")
        if kwargs.get("help") not in (None, argparse.SUPPRESS):
            kwargs["help"] = f"{kwargs['help']} [{valid.describe(kwargs['type'])}]"
        super().__init__(option_strings, dest, **kwargs)
        self.valid = valid

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        problem = out_of_range(option_string or self.dest, values, self.valid, self.type)
        if problem is not None:
            parser.error(problem)
        setattr(namespace, self.dest, values)


def ranged(kind: type, valid: Range) -> dict[str, Any]:
    """``add_argument`` keywords of a numeric option: its type and its valid values."""
    return {"type": kind, "action": InRange, "valid": valid}


def _is_main_rank() -> bool:
    # Before torch.distributed is set up, torchrun's RANK variable tells which process this is.
    return os.environ.get("RANK", "0") == "0"


class OptionParser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors are one line (not the 40-line usage of 130 flags), printed once."""

    def error(self, message: str) -> NoReturn:
        if _is_main_rank():
            print(
                f"error: {message}. `python {self.prog} --help` lists every option and its valid values.",
                file=sys.stderr,
            )
        self.exit(2)

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse lists the choices as declared. --task's are the union of every dataset's task names
        # (reference ``get_task_list``), where 'offline' stands five times and '19-1' twice: a refused task
        # is answered with the tasks of each dataset instead, and any other list without repeats.
        if action.choices is None or value in action.choices:
            return
        if action.dest == "task":
            listing = "; ".join(f"{name}: {', '.join(table)}" for name, table in tasks.TASKS.items())
            raise argparse.ArgumentError(
                action, f"invalid choice: {value!r}. The tasks of each dataset are {listing}"
            )
        choices = ", ".join(map(repr, dict.fromkeys(action.choices)))
        raise argparse.ArgumentError(action, f"invalid choice: {value!r} (choose from {choices})")

    def explicit_dests(self, args: Sequence[str] | None = None) -> frozenset[str]:
        """The options (``dest`` names) that the command line ``args`` sets, whatever their values.

        A parsed ``Namespace`` cannot tell ``--batch_size 4`` from the default 4; dataset-dependent
        defaults (:data:`DATASET_DEFAULTS`) and scope refusals (:data:`OPTION_SCOPES`) need to. ``args`` is
        parsed again into a namespace whose every option holds a marker: argparse fills in defaults only
        for options missing from the namespace, so exactly the options on the command line replace the
        marker. Call it after ``parse_args(args)`` succeeded (errors are reported by that first parse).

        Args:
            args: the command line without the program name (None: ``sys.argv[1:]``, as ``parse_args``).
        """
        unset = object()
        probe = argparse.Namespace(**{a.dest: unset for a in self._actions if a.dest != "help"})
        self.parse_known_args(args, probe)
        return frozenset(dest for dest, value in vars(probe).items() if value is not unset)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a batch scheduler)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def cap_workers(value: int | None, flag: str, cpus: int) -> int | None:
    """``value`` limited to ``cpus``, with a one-line warning when it was above (rank 0 prints it).

    More worker processes than CPUs only add memory (each worker holds a copy of the dataset object and
    its prefetched batches) and fork overhead: ``--num_workers 1000`` would exhaust the machine.
    """
    if value is None or value <= cpus:
        return value
    if _is_main_rank():
        print(
            f"warning: {flag} {value} is more than the {cpus} CPUs available to this process; using {cpus}.",
            file=sys.stderr,
        )
    return cpus


def _pod_switch_options(after_factor: float) -> dict[str, Any]:
    """PLOP's ``pod_options``: the last POD map (the logits) uses local POD with its own factor and
    folds the new classes' logits into the background channel."""
    return {"switch": {"after": {"extra_channels": "sum", "factor": after_factor, "type": "local"}}}


# Options each --method sets, overriding whatever the command line said for the same options
# (reference ``argparser.py`` ``modify_command_options``). Options not listed keep their command-line
# value; in particular the LGKD preset leaves prev_kd/novel_kd alone (the scripts pass them).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "FT": {},
    "LWF": {"loss_kd": 100.0},
    "LWF-MC": {"icarl": True, "icarl_importance": 10.0},
    "ILT": {"loss_kd": 100.0, "loss_de": 100.0},
    "EWC": {"regularizer": "ewc", "reg_importance": 100.0},
    "RW": {"regularizer": "rw", "reg_importance": 100.0},
    "PI": {"regularizer": "pi", "reg_importance": 100.0},
    "MiB": {"loss_kd": 10.0, "unce": True, "unkd": True, "init_balanced": True},
    "PLOP": {
        "pod": "local",
        "pod_factor": 0.01,
        "pod_logits": True,
        "pod_options": _pod_switch_options(0.0005),
        "pseudo": "entropy",
        "threshold": 0.001,
        "classif_adaptive_factor": True,
        "init_balanced": True,
    },
    "LGKD": {
        "loss_kd": 1.0,
        "lgkd": True,
        "pod": "local",
        "pod_factor": 0.01,
        "pod_logits": True,
        "pod_options": _pod_switch_options(0.0005),
        "pseudo": "entropy",
        "threshold": 0.001,
        "classif_adaptive_factor": True,
        "init_balanced": True,
    },
}

#: --method values: the methods that have a preset.
METHODS = tuple(METHOD_PRESETS)

# Dataset-dependent values layered on top of METHOD_PRESETS. Only LGKD has any: weaker POD on ADE20k.
# The PLOP preset deliberately has none (reference ``argparser.py`` ``modify_command_options`` sets the
# VOC factors on every dataset).
PRESET_DATASET_OVERRIDES: dict[tuple[str, str], dict[str, Any]] = {
    ("LGKD", "ade"): {"pod_factor": 0.001, "pod_options": _pod_switch_options(0.00001)},
}


def resolve_preset(method: str | None, dataset: str) -> dict[str, Any]:
    """Return the options ``--method`` forces on ``dataset`` (a fresh, deep-copied dict).

    Raises:
        OptionsError: ``method`` is not one of :data:`METHOD_PRESETS`.
    """
    if method is None:
        return {}
    if method not in METHOD_PRESETS:
        raise OptionsError(
            f"Unknown --method {method!r}. Pass one of: {', '.join(METHOD_PRESETS)} "
            "(or no --method to set every option by hand)."
        )
    preset = {**METHOD_PRESETS[method], **PRESET_DATASET_OVERRIDES.get((method, dataset), {})}
    # A preset never sets an option that does not apply to the dataset (OPTION_SCOPES): PLOP and LGKD on
    # point clouds keep their pseudo-labels, adaptive factor and balanced init, without POD.
    outside = out_of_scope_dests(argparse.Namespace(dataset=dataset))
    return copy.deepcopy({option: value for option, value in preset.items() if option not in outside})


#: POD (PLOP's pooled feature distillation): every option of the "POD" group of the parser.
POD_OPTIONS = (
    "pod",
    "pod_factor",
    "pod_options",
    "pod_prepro",
    "no_pod_schedule",
    "pod_deeplab_mask",
    "pod_deeplab_mask_factor",
    "deeplab_mask_downscale",
    "pod_logits",
    "pod_large_logits",
    "spp_scales",
)


def is_point_cloud(opts: Any) -> bool:
    """Whether ``opts.dataset`` is a point-cloud dataset (S3DIS, ScanNet)."""
    return getattr(opts, "dataset", None) in POINT_CLOUD_DATASETS


@dataclass(frozen=True)
class OptionScope:
    """Options that mean something only when another option has certain values; set anywhere else, they
    are refused.

    Attributes:
        dests: the options (``dest`` names).
        by: the option that decides (``dataset``, ``optimizer``).
        values: the values of ``by`` with which ``dests`` apply.
        reason: why they do not apply otherwise, for the message.
    """

    dests: tuple[str, ...]
    by: str
    values: tuple[str, ...]
    reason: str

    def applies(self, opts: Any) -> bool:
        """Whether ``dests`` apply to the run of ``opts`` (a missing ``by`` has its parser default)."""
        return getattr(opts, self.by, parser_defaults().get(self.by)) in self.values


#: The one table of which options apply where: validate_options refuses the others when the user sets
#: them, and resolve_preset leaves them out of method presets.
OPTION_SCOPES: tuple[OptionScope, ...] = (
    OptionScope(
        ("output_stride", "pooling"),
        "dataset",
        IMAGE_DATASETS,
        "the output stride and the pooling window configure the DeepLab head on ResNet feature maps, and "
        "DGCNN keeps one feature per point",
    ),
    OptionScope(
        ("crop_size", "crop_val"),
        "dataset",
        IMAGE_DATASETS,
        "crops and resizing are for images; a point-cloud block is sampled to --num_points points, in "
        "training and evaluation alike",
    ),
    OptionScope(
        POD_OPTIONS,
        "dataset",
        IMAGE_DATASETS,
        "POD pools feature maps along their height and width, and point features (B, C, N) have no such "
        "axes (the PLOP and LGKD presets leave POD out on point clouds)",
    ),
    OptionScope(
        ("code_directory",),
        "dataset",
        IMAGE_DATASETS,
        "the code directory locates the ImageNet weights of the ResNet backbones (pretrained/); DGCNN has "
        "no pretrained weights and is trained from scratch, as in 3DPC-CISS",
    ),
    OptionScope(
        ("num_points", "knn_k", "knn_chunk", "xyz_norm"),
        "dataset",
        POINT_CLOUD_DATASETS,
        "block sampling and DGCNN's neighbour graphs exist for point clouds only",
    ),
    OptionScope(
        ("momentum",),
        "optimizer",
        ("sgd",),
        "Adam uses its default betas (0.9, 0.999), as 3DPC-CISS",
    ),
)

#: The backbones of each kind of dataset: the model must match the items (images or (9, N) points).
BACKBONES_BY_DATASETS: dict[tuple[str, ...], tuple[str, ...]] = {
    IMAGE_DATASETS: IMAGE_BACKBONES,
    POINT_CLOUD_DATASETS: POINT_BACKBONES,
}

#: The 3DPC-CISS training settings (its scripts/train_*_segmentor.sh, main.py and runs/*.py: Adam, lr
#: 0.001 halved every 50 epochs, 100 epochs, batch 32, DGCNN trained from scratch), used for a point-cloud
#: dataset instead of the image defaults of the options the command line does not set. Validation runs
#: after the last epoch only, so the next step starts from the end-of-training model as in 3DPC-CISS.
POINT_CLOUD_DEFAULTS: dict[str, Any] = {
    "backbone": "dgcnn",
    "no_pretrained": True,
    "optimizer": "adam",
    "lr": 0.001,
    "lr_policy": "step",
    "lr_decay_epochs": 50,
    "lr_decay_factor": 0.5,
    "epochs": 100,
    "batch_size": 32,
    "val_interval": 100,
}
#: Defaults that depend on --dataset (applied by modify_command_options to the options not set).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = dict.fromkeys(POINT_CLOUD_DATASETS, POINT_CLOUD_DEFAULTS)


def out_of_scope_dests(opts: Any) -> set[str]:
    """The options of :data:`OPTION_SCOPES` that do not apply to the run of ``opts``."""
    return {dest for scope in OPTION_SCOPES if not scope.applies(opts) for dest in scope.dests}


@functools.cache
def parser_defaults() -> dict[str, Any]:
    """``dest -> default`` of every option of :func:`get_argparser` (shared: do not mutate)."""
    return {a.dest: a.default for a in get_argparser()._actions if a.dest != "help"}


def user_set_options(opts: argparse.Namespace, explicit: Collection[str] | None) -> set[str]:
    """The options the user set: ``explicit`` (:meth:`OptionParser.explicit_dests`) when known.

    Without it (a namespace built by hand or loaded from a file) the options whose value differs from the
    parser default count as set: the best that can be told from values alone.
    """
    if explicit is not None:
        return set(explicit)
    defaults = parser_defaults()
    return {dest for dest, value in defaults.items() if hasattr(opts, dest) and getattr(opts, dest) != value}


def _add_performance_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Performance")
    group.add_argument(
        "--random_seed",
        **ranged(int, between(0, MAX_SEED)),
        default=42,
        help="seed of torch, numpy and python random (same on every rank)",
    )
    group.add_argument(
        "--num_workers", **ranged(int, at_least(0)), default=4, help="DataLoader worker processes"
    )
    group.add_argument(
        "--scan_workers",
        **ranged(int, at_least(0)),
        default=None,
        help="processes for the first per-step image filtering scan (None: --num_workers)",
    )
    group.add_argument(
        "--opt_level",
        type=str,
        default="O0",
        choices=["O0", "O1", "O2", "O3"],
        help="mixed precision level, named as apex did: O0 = fp32, O1..O3 = autocast "
        "(the reference scripts use O1)",
    )
    group.add_argument(
        "--amp_dtype",
        type=str,
        default="fp16",
        choices=["fp16", "bf16"],
        help="autocast dtype when --opt_level is O1..O3 (CUDA only; CPU runs fp32)",
    )
    group.add_argument(
        "--device",
        type=str,
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="device to run on (auto: CUDA when available)",
    )
    group.add_argument(
        "--memory_format",
        type=str,
        default="auto",
        choices=["auto", "channels_last", "contiguous"],
        help="tensor memory format (auto: channels_last on CUDA, contiguous on CPU)",
    )
    group.add_argument(
        "--recompute_abn",
        action="store_true",
        default=False,
        help="in-place ABN layers keep only their output for backward and invert it there (in-place ABN's "
        "memory scheme: less activation memory, slower)",
    )
    group.add_argument(
        "--no_cudnn_benchmark",
        action="store_true",
        default=False,
        help="disable cuDNN benchmark mode (otherwise on with CUDA unless --deterministic)",
    )
    group.add_argument(
        "--deterministic",
        action="store_true",
        default=False,
        help="use deterministic algorithms; CPU runs become bitwise repeatable",
    )


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Dataset")
    group.add_argument(
        "--data_root",
        type=str,
        default="data",
        help="dataset root: VOC must contain PascalVOC2012/, ADE20k ADEChallengeData2016/, S3DIS S3DIS/ and "
        "ScanNet ScanNet/ (cut into blocks by data/prepare_3d.py); for cityscapes_domain it is the "
        "Cityscapes root itself",
    )
    group.add_argument("--dataset", type=str, default="voc", choices=list(DATASETS), help="dataset")
    group.add_argument(
        "--num_classes",
        **ranged(int, ANY),
        default=None,
        help="always overwritten from the dataset (voc 21, ade 151, cityscapes_domain 19, s3dis 14, "
        "scannet 21)",
    )
    group.add_argument(
        "--cache_dir",
        type=str,
        default=None,
        help="root of the per-step split-index caches (None: the reference location "
        "data/{dataset}/{task} relative to the working directory)",
    )


def _add_method_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Method")
    group.add_argument(
        "--method",
        type=str,
        default=None,
        choices=list(METHODS),
        help="apply this method's preset (see argparser.METHOD_PRESETS); it overrides "
        "command-line values of the options it sets",
    )
    group.add_argument(
        "--base_weights",
        action="store_true",
        default=False,
        help="the model keeps only the first (step-0) classifier",
    )


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Training")
    group.add_argument(
        "--epochs",
        **ranged(int, at_least(1)),
        default=30,
        help="epochs of this step (point-cloud datasets: 100 unless set)",
    )
    group.add_argument(
        "--fix_bn",
        action="store_true",
        default=False,
        help="freeze the affine parameters of the normalisation layers "
        "(docs/reference-notes.md RN-19: their eval mode is undone by model.train() every epoch)",
    )
    group.add_argument(
        "--batch_size",
        **ranged(int, at_least(1)),
        default=4,
        help="batch size per process (point-cloud datasets: 32 unless set)",
    )
    group.add_argument(
        "--crop_size",
        **ranged(int, at_least(1)),
        default=512,
        help="train crop size, and val/test resize + center-crop size",
    )
    group.add_argument(
        "--lr",
        **ranged(float, above(0)),
        default=0.01,
        help="base learning rate (point-cloud datasets: 0.001 unless set)",
    )
    group.add_argument(
        "--optimizer",
        type=str,
        default="sgd",
        choices=["sgd", "adam"],
        help="sgd: SGD with Nesterov momentum (the reference); adam: Adam with betas (0.9, 0.999) and L2 "
        "weight decay, as 3DPC-CISS (point-cloud datasets: adam unless set)",
    )
    group.add_argument(
        "--lr_old",
        **ranged(float, at_least(0)),
        default=None,
        help="at step > 0, old classifiers use lr_old * lr in their own param group",
    )
    group.add_argument(
        "--momentum",
        **ranged(float, Range(0, 1, low_open=True, high_open=True)),
        default=0.9,
        help="SGD (Nesterov) momentum; the reference ignored this flag and always used 0.9",
    )
    group.add_argument(
        "--weight_decay", **ranged(float, at_least(0)), default=1e-4, help="weight decay of every param group"
    )
    group.add_argument(
        "--lr_policy",
        type=str,
        default="poly",
        choices=list(LR_POLICIES),
        help="learning-rate schedule, stepped every iteration (point-cloud datasets: step unless set)",
    )
    group.add_argument(
        "--lr_decay_step", **ranged(int, at_least(1)), default=5000, help="step policy: period in iterations"
    )
    group.add_argument(
        "--lr_decay_epochs",
        **ranged(int, at_least(1)),
        default=None,
        help="step policy: period in epochs, replacing --lr_decay_step (None: use --lr_decay_step; "
        "point-cloud datasets: 50 unless set, as 3DPC-CISS)",
    )
    group.add_argument(
        "--lr_decay_factor",
        **ranged(float, Range(0, 1, low_open=True)),
        default=0.1,
        help="step policy: decay factor (point-cloud datasets: 0.5 unless set)",
    )
    group.add_argument("--lr_power", **ranged(float, at_least(0)), default=0.9, help="poly policy: power")
    group.add_argument(
        "--freeze", action="store_true", default=False, help="exclude the backbone from the optimizer"
    )
    group.add_argument(
        "--bce",
        action="store_true",
        default=False,
        help="one-hot BCE-with-logits criterion instead of cross-entropy",
    )
    group.add_argument(
        "--unce", action="store_true", default=False, help="MiB unbiased cross-entropy (step > 0)"
    )


def _add_validation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Validation")
    group.add_argument(
        "--val_interval",
        **ranged(int, at_least(1)),
        default=60,
        help="validate every N epochs from epoch 30 on, and after the last epoch (point-cloud datasets: 100 "
        "unless set, i.e. after the last of the 100 epochs only)",
    )
    group.add_argument(
        "--crop_val",
        action="store_false",
        default=True,
        help="pass it to evaluate val/test images at full size (loader batch 1) instead of resizing and "
        "center-cropping them to --crop_size (inverted reference flag: passing it sets crop_val False)",
    )
    group.add_argument(
        "--test_on_val",
        action="store_true",
        default=False,
        help="VOC only: train on 80%% of the filtered train images and test on the last "
        "20%% of the filtered val images",
    )
    group.add_argument(
        "--val_on_trainset",
        action="store_true",
        default=False,
        help="build the test set from the train split",
    )
    group.add_argument(
        "--cross_val",
        action="store_true",
        default=False,
        help="validation set = random 80/20 split of the train set",
    )


def _add_logging_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Logging")
    group.add_argument("--logdir", type=str, default="./logs", help="log root")
    group.add_argument(
        "--name",
        type=str,
        default="Experiment",
        help="experiment name (log directory, checkpoint and results CSV names)",
    )
    group.add_argument("--date", type=str, default="", help="prefix of the results CSV name")
    group.add_argument("--results_dir", type=str, default="results", help="directory of the results CSV")
    group.add_argument(
        "--visualize",
        action="store_false",
        default=True,
        help="pass it to turn OFF the tensorboard summaries rank 0 writes by default (inverted reference "
        "flag: passing it sets visualize False, and --sample_num 0)",
    )
    group.add_argument(
        "--sample_num",
        **ranged(int, at_least(0)),
        default=0,
        help="number of validation samples to visualise (forced to 0 when --visualize is passed, which "
        "turns the summaries off)",
    )
    group.add_argument(
        "--print_interval",
        **ranged(int, at_least(1)),
        default=10,
        help="iterations between training-loss log lines; the reference ignored this flag and always used 10",
    )
    group.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="debug-level logging; a missing previous-step checkpoint is only a warning",
    )
    group.add_argument(
        "--no_progress", action="store_true", default=False, help="plain log lines instead of progress bars"
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Model")
    group.add_argument(
        "--backbone",
        type=str,
        default="resnet101",
        choices=[*IMAGE_BACKBONES, *POINT_BACKBONES],
        help="ResNet depth for images; dgcnn (DGCNN, the only point-cloud backbone) for point clouds, "
        "chosen unless set",
    )
    group.add_argument(
        "--output_stride", type=int, default=16, choices=sorted(DILATIONS), help="backbone output stride"
    )
    group.add_argument(
        "--no_pretrained",
        action="store_true",
        default=False,
        help="do not load the ImageNet backbone weights (always so for point clouds: DGCNN has none)",
    )
    group.add_argument(
        "--norm_act",
        type=str,
        default="iabn_sync",
        choices=list(NORM_ACTS),
        help="normalisation + activation layer: iabn_sync (synchronised in-place ABN), "
        "iabn, abn, std (BatchNorm2d + activation); iabn_sync_test is an alias of "
        "iabn_sync kept for old command lines",
    )
    group.add_argument(
        "--abn_impl",
        type=str,
        default="torch",
        choices=list(ABN_IMPLS),
        help="activated batch-norm implementation: pure PyTorch, or the compiled "
        "inplace_abn package (CUDA, optional)",
    )
    group.add_argument(
        "--pooling",
        **ranged(int, at_least(1)),
        default=32,
        help="eval-time pooling window of the ASPP image-pooling branch",
    )
    group.add_argument("--code_directory", type=str, default=".", help="directory that contains pretrained/")


def _add_point_cloud_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Point clouds", "S3DIS and ScanNet only (the 3DPC-CISS protocol; see the README's 3D section)"
    )
    group.add_argument(
        "--num_points",
        **ranged(int, at_least(1)),
        default=2048,
        help="points sampled from each 1 m x 1 m block (3DPC-CISS --pc_npts)",
    )
    group.add_argument(
        "--knn_k",
        **ranged(int, at_least(1)),
        default=20,
        help="neighbours of DGCNN's EdgeConv graphs (3DPC-CISS --dgcnn_k); at most --num_points",
    )
    group.add_argument(
        "--knn_chunk",
        **ranged(int, at_least(0)),
        default=DEFAULT_KNN_CHUNK,
        help="query points per chunk of the kNN search: bounds its memory, not the neighbours found (up to "
        "ties between equal distances); 0: all points of a batch at once",
    )
    group.add_argument(
        "--xyz_norm",
        type=str,
        default="block",
        choices=list(XYZ_NORMS),
        help="the last 3 point attributes: xyz normalised to [0, 1] over the block (block, as 3DPC-CISS's "
        "loader) or divided by the room's size (room)",
    )


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Checkpoint")
    group.add_argument(
        "--test",
        action="store_true",
        default=False,
        help="no training: evaluate a checkpoint on the test set",
    )
    group.add_argument(
        "--ckpt",
        type=str,
        default=None,
        help="training: resume from this file if it exists; --test: file to evaluate "
        "(None: this step's standard checkpoint path)",
    )
    group.add_argument(
        "--step_ckpt",
        type=str,
        default=None,
        help="previous-step checkpoint (None: {checkpoint}/{task}-{dataset}_{name}_{step-1}.pth)",
    )
    group.add_argument(
        "--checkpoint",
        type=str,
        default="./checkpoints/step",
        help="checkpoint directory (created at startup)",
    )
    group.add_argument(
        "--strict_weights",
        action="store_false",
        default=True,
        help="pass it to load the previous-step checkpoint into the old model non-strictly (the old model's "
        "newest classifier may be missing from the file); by default every key must match (inverted "
        "reference flag: passing it sets strict_weights False)",
    )
    group.add_argument(
        "--no_resume",
        action="store_true",
        default=False,
        help="start this step over: ignore its interrupted state (_last.pth) and train it even if it "
        "already finished (its checkpoint is replaced); without it a rerun resumes or skips the step",
    )


def _add_incremental_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Incremental")
    task_help = "; ".join(f"{name}: {', '.join(table)}" for name, table in tasks.TASKS.items())
    # As the reference (``tasks.py`` ``get_task_list``), the choices are the union of every dataset's task
    # names; whether the task exists for --dataset is checked by validate_options.
    group.add_argument(
        "--task",
        type=str,
        default="19-1",
        choices=tasks.get_task_list(),
        metavar="TASK",
        help=f"task split ({task_help})",
    )
    group.add_argument("--step", **ranged(int, STEP_RANGE), default=0, help="incremental step to run")
    group.add_argument(
        "--overlap", action="store_true", default=False, help="overlapped setting instead of the disjoint one"
    )
    group.add_argument(
        "--no_mask",
        action="store_true",
        default=False,
        help="ADE20k only: reorder labels without masking old/future classes",
    )
    group.add_argument(
        "--data_masking",
        type=str,
        default="current",
        choices=list(DATA_MASKINGS),
        help="VOC train/val label masking: current (old and future classes -> background), "
        "current+old (future -> background), new (old and future -> ignored); "
        "all is not implemented",
    )
    group.add_argument(
        "--init_balanced",
        action="store_true",
        default=False,
        help="MiB initialisation of the new classifier from the background one",
    )


def _add_distillation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Distillation / regularisation")
    group.add_argument(
        "--loss_kd",
        **ranged(float, at_least(0)),
        default=0.0,
        help="weight of output distillation (KD, unbiased KD or LGKD) at step > 0",
    )
    group.add_argument(
        "--unkd", action="store_true", default=False, help="MiB unbiased knowledge distillation"
    )
    group.add_argument(
        "--lgkd", action="store_true", default=False, help="label-guided knowledge distillation"
    )
    group.add_argument(
        "--prev_kd",
        **ranged(float, at_least(0)),
        default=10.0,
        help="LGKD weight of previous (background/old) pixels",
    )
    group.add_argument(
        "--novel_kd", **ranged(float, at_least(0)), default=2.0, help="LGKD weight of novel-class pixels"
    )
    group.add_argument(
        "--alpha",
        **ranged(float, above(0)),
        default=1.0,
        help="multiplier of the old logits in KD losses (also the focal-loss alpha)",
    )
    group.add_argument(
        "--loss_de",
        **ranged(float, at_least(0)),
        default=0.0,
        help="weight of ILT encoder feature distillation",
    )
    group.add_argument(
        "--regularizer", type=str, default=None, choices=list(REGULARIZERS), help="parameter regulariser"
    )
    group.add_argument(
        "--reg_importance", **ranged(float, at_least(0)), default=1.0, help="regulariser weight"
    )
    group.add_argument(
        "--reg_alpha",
        **ranged(float, between(0, 1)),
        default=0.9,
        help="Fisher moving-average factor (EWC, RW)",
    )
    group.add_argument(
        "--reg_no_normalize",
        action="store_true",
        default=False,
        help="disable min-max normalisation of the importance matrices",
    )
    group.add_argument(
        "--reg_iterations",
        **ranged(int, at_least(1)),
        default=10,
        help="RW score update period in iterations",
    )


def _add_icarl_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ICaRL")
    group.add_argument(
        "--icarl", action="store_true", default=False, help="LwF-MC: BCE + sigmoid distillation"
    )
    group.add_argument(
        "--icarl_importance",
        **ranged(float, at_least(0)),
        default=1.0,
        help="weight of the iCaRL distillation",
    )
    group.add_argument(
        "--icarl_disjoint",
        action="store_true",
        default=False,
        help="replace the old classes' targets by the old model's sigmoid outputs",
    )
    group.add_argument(
        "--icarl_bkg",
        action="store_true",
        default=False,
        help="with --icarl_disjoint: keep the ground truth for the background channel",
    )


def _add_pseudo_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Pseudo-labelling")
    group.add_argument(
        "--pseudo",
        type=str,
        default=None,
        help=f"pseudo-label background pixels with the old model: {', '.join(PSEUDO_MODES)}",
    )
    group.add_argument(
        "--threshold",
        **ranged(float, between(0, 1)),
        default=0.9,
        help="base threshold of the median/entropy pseudo-labelling",
    )
    group.add_argument(
        "--step_threshold",
        **ranged(float, ANY),
        default=None,
        help="no effect (docs/reference-notes.md RN-15: added after the threshold is used)",
    )
    group.add_argument(
        "--pseudo_nb_bins",
        **ranged(int, at_least(1)),
        default=None,
        help="histogram bins of the median search (None: 100 for entropy, 20 for probability)",
    )
    group.add_argument(
        "--classif_adaptive_factor",
        action="store_true",
        default=False,
        help="scale each image's CE by its fraction of confident background pixels",
    )
    group.add_argument(
        "--classif_adaptive_min_factor",
        **ranged(float, between(0, 1)),
        default=0.0,
        help="lower clamp of the adaptive factor (0: no clamp)",
    )
    group.add_argument(
        "--ce_on_pseudo",
        action="store_true",
        default=False,
        help="separate CE on pseudo-labelled pixels (entropy pseudo-labelling)",
    )
    group.add_argument(
        "--pseudo_soft",
        type=str,
        default=None,
        choices=list(PSEUDO_SOFT_MODES),
        help="soft pseudo-label CE variant",
    )
    group.add_argument(
        "--pseudo_soft_factor",
        **ranged(float, at_least(0)),
        default=1.0,
        help="weight of the uncertain part of the soft CE",
    )
    group.add_argument(
        "--pseudo_ablation",
        type=str,
        default=None,
        choices=list(PSEUDO_ABLATIONS),
        help="entropy pseudo-label ablations",
    )


def _add_pod_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("POD")
    group.add_argument(
        "--pod",
        type=str,
        default=None,
        choices=list(COLLAPSE_TYPES),
        help="POD feature distillation pooling (step > 0)",
    )
    group.add_argument(
        "--pod_factor", **ranged(float, at_least(0)), default=5.0, help="POD weight of the non-last maps"
    )
    group.add_argument(
        "--pod_options",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='POD options as a JSON object, e.g. \'{"switch": {"after": {"extra_channels": '
        '"sum", "factor": 0.0005, "type": "local"}}}\'',
    )
    group.add_argument(
        "--pod_prepro",
        type=str,
        default="pow",
        help=f"elementwise pre-processing before pooling: {', '.join(PREPRO_TYPES)}",
    )
    group.add_argument(
        "--no_pod_schedule",
        action="store_true",
        default=False,
        help="disable the sqrt(C_new / N_new) POD multiplier",
    )
    group.add_argument(
        "--pod_deeplab_mask", action="store_true", default=False, help="masked local POD on the last map(s)"
    )
    group.add_argument(
        "--pod_deeplab_mask_factor",
        **ranged(float, at_least(0)),
        default=None,
        help="POD factor of the masked maps (None: --pod_factor)",
    )
    group.add_argument(
        "--deeplab_mask_downscale",
        action="store_true",
        default=False,
        help="downscale the mask instead of upscaling the features",
    )
    group.add_argument(
        "--pod_logits",
        action="store_true",
        default=False,
        help="add the (pre-upsampling) logits to the POD maps",
    )
    group.add_argument(
        "--pod_large_logits",
        action="store_true",
        default=False,
        help="add the full-resolution logits to the POD maps (ignored with --pod_logits)",
    )
    group.add_argument(
        "--spp_scales",
        **ranged(int, at_least(1)),
        nargs="+",
        default=[1, 2, 4],
        help="pyramid scales of local/global POD",
    )


def _add_experimental_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Other experimental", "not used by any published setting")
    group.add_argument(
        "--nb_background_modes",
        **ranged(int, at_least(1)),
        default=1,
        help="> 1: the background classifier has this many outputs fused into one logit",
    )
    group.add_argument(
        "--multimodal_fusion",
        type=str,
        default="sum",
        help=f"fusion of the background modes: {', '.join(MULTIMODAL_FUSIONS)}",
    )
    group.add_argument(
        "--init_multimodal",
        type=str,
        default=None,
        choices=list(REFERENCE_MULTIMODAL_INITS),
        help="multimodal initialisation of the new classifier (the *_init variants are "
        "refused: broken in the reference)",
    )
    group.add_argument(
        "--align_weight",
        type=str,
        default=None,
        choices=list(ALIGN_TYPES),
        help="weight-norm alignment of the newest classifier at validation",
    )
    group.add_argument(
        "--align_weight_frequency",
        type=str,
        default="never",
        choices=["never", "epoch", "task"],
        help="when to align the classifier weights",
    )
    group.add_argument(
        "--cosine", action="store_true", default=False, help="cosine classifier with a learnable scale"
    )
    group.add_argument("--nca", action="store_true", default=False, help="NCA criterion")
    group.add_argument("--nca_margin", **ranged(float, at_least(0)), default=0.0, help="NCA margin")
    group.add_argument(
        "--disable_background",
        action="store_true",
        default=False,
        help="at evaluation, force the background logit to 0",
    )
    group.add_argument(
        "--ignore_test_bg",
        action="store_true",
        default=False,
        help="ADE20k only: background and unseen classes are ignored in the test set",
    )
    group.add_argument(
        "--entropy_min",
        **ranged(float, at_least(0)),
        default=0.0,
        help="> 0 enables entropy minimisation (docs/reference-notes.md RN-17: weight is always 1)",
    )
    group.add_argument(
        "--kd_scheduling",
        action="store_true",
        default=False,
        help="multiply the KD loss by sqrt(C_new / N_new)",
    )
    group.add_argument(
        "--sample_weights_new",
        **ranged(float, at_least(0)),
        default=None,
        help="multiply the CE of every pixel by this value (docs/reference-notes.md RN-18)",
    )
    group.add_argument("--kd_bce_sig", action="store_true", default=False, help="sigmoid-BCE distillation")
    group.add_argument(
        "--kd_bce_sig_shape",
        type=str,
        default="trim",
        choices=list(BCE_SIGMOID_SHAPES),
        help="sigmoid-BCE KD: drop the new channels (trim) or sum them into background",
    )
    group.add_argument(
        "--exkd_gt",
        action="store_true",
        default=False,
        help="excluded KD (refused: crashes in the reference)",
    )
    group.add_argument(
        "--exkd_sum",
        action="store_true",
        default=False,
        help="excluded KD, sum variant (refused: crashes in the reference)",
    )
    group.add_argument(
        "--temperature_semiold",
        **ranged(float, ANY),
        default=1.0,
        help="temperature of the excluded KD (unused, since --exkd_* is refused)",
    )
    group.add_argument("--focal_loss", action="store_true", default=False, help="focal-loss criterion")
    group.add_argument(
        "--focal_loss_new",
        action="store_true",
        default=False,
        help="focal loss only on pixels of classes learned at this step",
    )
    group.add_argument("--focal_loss_gamma", **ranged(int, at_least(0)), default=2, help="focal-loss gamma")
    group.add_argument(
        "--ce_on_new", action="store_true", default=False, help="ignore background pixels in the CE"
    )


def _add_deprecated_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "Deprecated / no-op", "accepted for compatibility with reference command lines; no effect"
    )
    group.add_argument("--dont_predict_bg", action="store_true", default=False, help="no effect")
    group.add_argument(
        "--fusion-mode",
        "--fusion_mode",
        dest="fusion_mode",
        type=str,
        default="mean",
        choices=["mean", "voting", "max"],
        help="no effect",
    )
    group.add_argument("--ckpt_interval", **ranged(int, ANY), default=1, help="no effect")
    group.add_argument(
        "--pod_apply", type=str, default="all", choices=["all", "backbone", "deeplab"], help="no effect"
    )
    group.add_argument("--pod_interpolate_last", action="store_true", default=False, help="no effect")
    group.add_argument("--entropy_min_mean_pixels", action="store_true", default=False, help="no effect")
    group.add_argument(
        "--kd_mask",
        type=str,
        default=None,
        choices=["oldbackground", "new"],
        help="no effect (commented out in the LGKD reference)",
    )
    group.add_argument(
        "--kd_mask_adaptative_factor",
        action="store_true",
        default=False,
        help="no effect (commented out in the LGKD reference)",
    )
    group.add_argument(
        "--kd_new", action="store_true", default=False, help="no effect (commented out in the LGKD reference)"
    )
    group.add_argument(
        "--temperature",
        **ranged(float, ANY),
        default=1.0,
        help="no effect (commented out in the LGKD reference)",
    )
    group.add_argument(
        "--temperature_apply",
        type=str,
        default=None,
        choices=["all", "new", "old"],
        help="no effect (commented out in the LGKD reference)",
    )


def get_argparser() -> OptionParser:
    """Build the parser with every reference flag (reference ``argparser.py`` ``get_argparser``) plus the
    additive flags of this project."""
    parser = OptionParser(
        description="Continual semantic segmentation: train or test one incremental step.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for add_group in (
        _add_performance_args,
        _add_dataset_args,
        _add_method_args,
        _add_training_args,
        _add_validation_args,
        _add_logging_args,
        _add_model_args,
        _add_point_cloud_args,
        _add_checkpoint_args,
        _add_incremental_args,
        _add_distillation_args,
        _add_icarl_args,
        _add_pseudo_args,
        _add_pod_args,
        _add_experimental_args,
        _add_deprecated_args,
    ):
        add_group(parser)
    return parser


def modify_command_options(
    opts: argparse.Namespace, explicit: Collection[str] | None = None
) -> argparse.Namespace:
    """Resolve method presets and derived options; return a new ``Namespace`` (``opts`` is untouched).

    Reference semantics (``argparser.py`` ``modify_command_options``): ``num_classes`` comes from the
    dataset; without ``visualize``, ``sample_num`` is 0; the ``--method`` preset overwrites the options it
    lists whatever the command line said; ``no_overlap`` and ``no_cross_val`` are the negations of
    ``overlap`` and ``cross_val``.
    Before the preset, the dataset's own defaults (:data:`DATASET_DEFAULTS`: DGCNN and the 3DPC-CISS
    training settings for S3DIS and ScanNet) replace the values of the options the user did not set
    (``explicit``, see :func:`user_set_options`).
    ``num_workers`` and ``scan_workers`` above the CPUs available are lowered to that number, with a
    one-line warning on stderr, so the saved options hold what the run really uses.
    ``norm_act = iabn_sync_test`` is resolved to its alias ``iabn_sync`` here, once, so that the current
    and the old model are built alike (the reference renamed it half-way, RN-12).

    Raises:
        OptionsError: unknown dataset or method (only possible for a hand-built ``Namespace``).
    """
    resolved = argparse.Namespace(**copy.deepcopy(vars(opts)))
    if resolved.dataset not in NUM_CLASSES:
        raise OptionsError(
            f"Unknown dataset {resolved.dataset!r}. Pass --dataset with one of: {', '.join(DATASETS)}."
        )
    resolved.num_classes = NUM_CLASSES[resolved.dataset]
    dataset_defaults = DATASET_DEFAULTS.get(resolved.dataset, {})
    if dataset_defaults:
        user_set = user_set_options(opts, explicit)
        for option, value in dataset_defaults.items():
            if option not in user_set:
                setattr(resolved, option, copy.deepcopy(value))
    if not resolved.visualize:
        resolved.sample_num = 0
    for option, value in resolve_preset(resolved.method, resolved.dataset).items():
        setattr(resolved, option, value)
    resolved.no_overlap = not resolved.overlap
    resolved.no_cross_val = not resolved.cross_val
    if resolved.norm_act == "iabn_sync_test":
        resolved.norm_act = "iabn_sync"
    cpus = available_cpus()
    resolved.num_workers = cap_workers(resolved.num_workers, "--num_workers", cpus)
    resolved.scan_workers = cap_workers(getattr(resolved, "scan_workers", None), "--scan_workers", cpus)
    return resolved


def check_ranges(opts: argparse.Namespace) -> None:
    """Refuse a numeric option outside the range its parser declaration gives (see :class:`InRange`).

    The parser already checks the command line; this covers values that did not come through it: method
    presets, options loaded from a file, namespaces built by hand. Options missing from ``opts`` and
    None where None is the default are skipped.

    Raises:
        OptionsError: naming the flag, the value and the valid range.
    """
    for action in get_argparser()._actions:
        if not isinstance(action, InRange) or not hasattr(opts, action.dest):
            continue
        value = getattr(opts, action.dest)
        if value is None and action.default is None:
            continue
        problem = out_of_range(action.option_strings[0], value, action.valid, action.type)
        if problem is not None:
            raise OptionsError(f"{problem}. Pass a value in that range (see python run.py --help).")


def _check_scopes(opts: argparse.Namespace, explicit: Collection[str] | None) -> None:
    """Refuse a backbone of the other kind of data (:data:`BACKBONES_BY_DATASETS`) and options the user set
    where they do not apply (:data:`OPTION_SCOPES`)."""
    for datasets, backbones in BACKBONES_BY_DATASETS.items():
        if opts.dataset in datasets and opts.backbone not in backbones:
            raise OptionsError(
                f"--backbone {opts.backbone} cannot be used with --dataset {opts.dataset}: the backbones of "
                f"{', '.join(datasets)} are {', '.join(backbones)}. Pass one of those, or leave --backbone "
                f"out ({' and '.join(POINT_CLOUD_DATASETS)} use {POINT_BACKBONES[0]}, the others resnet101)."
            )
    user_set = user_set_options(opts, explicit)
    for scope in OPTION_SCOPES:
        given = [f"--{dest}" for dest in scope.dests if dest in user_set]
        if given and not scope.applies(opts):
            flags, one = ", ".join(given), len(given) == 1
            raise OptionsError(
                f"{flags} {'does' if one else 'do'} not apply with --{scope.by} {getattr(opts, scope.by)}, "
                f"only with --{scope.by} {' or '.join(scope.values)}: {scope.reason}. Remove {flags} from "
                "the command line."
            )


def _check_point_cloud_sizes(opts: argparse.Namespace) -> None:
    """DGCNN's neighbour graphs need k neighbours among the points of a block."""
    if opts.knn_k > opts.num_points:
        raise OptionsError(
            f"--knn_k {opts.knn_k} is more than --num_points {opts.num_points}: each point needs that many "
            "neighbours in its block. Lower --knn_k (3DPC-CISS: 20) or raise --num_points (3DPC-CISS: 2048)."
        )


def _check_shapes(opts: argparse.Namespace) -> None:
    """Combinations of sizes the image model cannot train on (single ranges: check_ranges).

    Both rules are about the DeepLab head on image feature maps; point clouds have their own
    (:func:`_check_point_cloud_sizes`).
    """
    if not opts.test and opts.batch_size < 2:
        raise OptionsError(
            f"--batch_size {opts.batch_size} cannot train: batch normalisation needs more than one value per "
            "channel, and the image-pooling branch of the DeepLab head reduces each image to a single value "
            "(every --norm_act computes batch statistics in training, also with --fix_bn, whose eval mode is "
            "undone each epoch; the check is per process, as in inplace_abn). Use --batch_size 2 or more "
            "(per process; the reference scripts use 6 to 12); with little memory, lower --crop_size instead."
        )
    if not opts.test or opts.crop_val:
        # The backbone's last feature map has side ceil(crop_size / output_stride).
        side = math.ceil(opts.crop_size / opts.output_stride)
        if side < 2:
            raise OptionsError(
                f"--crop_size {opts.crop_size} is too small for --output_stride {opts.output_stride}: the "
                f"backbone's last feature map would be {side}x{side}, so the segmentation head sees one "
                "feature and predicts one class per image. Use a --crop_size larger than --output_stride "
                f"(at least {opts.output_stride + 1}; the paper uses 512)."
            )


def validate_options(opts: argparse.Namespace, explicit: Collection[str] | None = None) -> None:
    """Refuse, before any work, options that cannot work (called after :func:`modify_command_options`).

    Args:
        opts: resolved options.
        explicit: the options the command line set (:meth:`OptionParser.explicit_dests`); None: those
            whose value differs from the default (see :func:`user_set_options`).

    Raises:
        TaskError: the task does not exist for the dataset, or the step is out of range.
        OptionsError: a numeric option outside its declared range, a size combination the model cannot
            train on, an option set where it does not apply (point clouds vs images), or an option
            (combination) the reference does not implement or crashes on.
    """
    check_ranges(opts)
    tasks.get_task_labels(opts.dataset, opts.task, opts.step)
    _check_scopes(opts, explicit)
    if is_point_cloud(opts):
        _check_point_cloud_sizes(opts)
    else:
        _check_shapes(opts)
    # The rules of the modules that build the datasets, the model, the losses and POD from these options,
    # applied here so that a run stops before any work (those modules apply them again when they build).
    check_dataset_options(opts)
    check_loss_options(opts)
    check_model_options(opts)
    check_pseudo_mode(opts.pseudo)
    check_pod_options(opts.pod_options, opts.pod_prepro)


def parse_command_line(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, frozenset[str]]:
    """``run.py``'s options: the parsed and resolved ``Namespace`` and the options the command line set.

    Pass both to :func:`validate_options`. Parser errors exit with status 2 and a one-line message.
    """
    parser = get_argparser()
    parsed = parser.parse_args(argv)
    explicit = parser.explicit_dests(argv)
    return modify_command_options(parsed, explicit), explicit


def _options_dict(opts: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    return dict(opts) if isinstance(opts, Mapping) else dict(vars(opts))


def save_options(opts: argparse.Namespace | Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write the (resolved) options as sorted, indented JSON, atomically (temp file + ``os.replace``).

    Values JSON cannot represent (e.g. ``Path``) are written as strings. Parent directories are created.
    """
    write_text_atomically(path, json.dumps(_options_dict(opts), sort_keys=True, indent=2, default=str) + "\n")


def load_options(path: str | os.PathLike[str]) -> argparse.Namespace:
    """Read options written by :func:`save_options` back into a ``Namespace``."""
    with open(path, encoding="utf-8") as handle:
        return argparse.Namespace(**json.load(handle))
