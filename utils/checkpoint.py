"""Reading and writing checkpoints and ImageNet weights safely, with errors a user can act on.

* :func:`load_checkpoint` always uses ``torch.load(weights_only=True)``: a file that would need to run code to
  load is refused, never executed. Truncated or corrupt files give a :class:`CheckpointError` naming the file.
* :func:`save_checkpoint` is atomic: an interrupted save never leaves a half-written checkpoint behind, and a
  failed write (disk full, name too long, permissions) is an :class:`OutputError` naming the path and the
  errno, with the previous file intact.
* :func:`check_entries` validates the top-level entries of a checkpoint (presence and value types) and
  :func:`loading_entry` turns any error raised while loading one entry into a :class:`CheckpointError`
  naming the file and the entry.
* :func:`check_model_state` / :func:`load_model_state` check (and load) a state dict with or without the
  ``module.`` prefix of the reference's checkpoints (LGKD ``run.py`` ``run_step`` saves the DDP-wrapped
  model) against an unwrapped model: same task, step and backbone. The check also works against a model
  built on the ``meta`` device.
* :func:`load_imagenet_weights` loads the inplace_abn ImageNet files (LGKD ``segmentation_module.py``
  ``make_model``).
* :func:`checkpoint_dict`, :func:`load_optimizer_state`, :func:`rng_state` / :func:`set_rng_state`: the
  training state a checkpoint holds and a resumed run restores.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import random
import re
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.distributed import unwrap_model
from utils.errors import CheckpointError, TrainingError, UserError
from utils.files import describe_os_error, output_error, write_atomically

PREFIX = "module."
IMAGENET_URL = "https://github.com/Ze-Yang/LGKD/releases/download/v1.0/resnet101_iabn_sync.pth.tar"
RELEASED_IMAGENET_FILE = "resnet101_iabn_sync.pth.tar"
_IMAGENET_HEAD_KEYS = ("classifier.fc.weight", "classifier.fc.bias")
# Blocks per module (mod2..mod5) and whether blocks are bottlenecks -> backbone name.
_STRUCTURE_NAMES = {
    ((2, 2, 2, 2), False): "resnet18",
    ((3, 4, 6, 3), False): "resnet34",
    ((3, 4, 6, 3), True): "resnet50",
    ((3, 4, 23, 3), True): "resnet101",
}
_BLOCK_KEY = re.compile(r"(?:^|\.)mod([2-5])\.block(\d+)\.")
_CLS_KEY = re.compile(r"^cls\.(\d+)\.weight$")
_DGCNN_KEY = re.compile(r"(?:^|\.)edge_convs\.\d+\.conv0\.")


def _numpy_safe_globals() -> list[Any]:
    """numpy scalars/arrays that may appear in checkpoints (the reference saves ``best_score`` as np.float64).

    Rebuilding a numeric numpy scalar or array runs no user code; the names saved by numpy 1.x
    (``numpy.core.multiarray``) are allowed as well as numpy 2's.
    """
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list[Any] = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [(multiarray.scalar, "numpy.core.multiarray.scalar")]
    allowed += [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            dtype_cls = getattr(dtypes, name)
            if (
                name.endswith("DType")
                and isinstance(dtype_cls, type)
                and name not in ("ObjectDType", "VoidDType")
            ):
                allowed.append(dtype_cls)
    return allowed


# Wordings of torch's weights-only unpickler (torch 2.0 .. 2.13) for content that is refused on purpose: a
# global (class or function) that is not allow-listed, or an object it would have to build or call. The
# group, when there is one, names the object.
_DISALLOWED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),  # torch >= 2.4
    re.compile(r"unsupported GLOBAL (\S+) whose module \S+ is blocked"),  # torch >= 2.5 (os, subprocess, ...)
    re.compile(r"Unsupported class (\S+)"),  # torch 2.0 .. 2.3
    re.compile(r"Trying to call reduce for unrecognized function (.+?)(?: which belongs to|$)", re.MULTILINE),
    re.compile(r"Can only create new object for .*? but got (\S+)"),
    re.compile(r"Can only build .*? but got (\S+)"),
    re.compile(r"Can only (?:append to|extend) lists, but got (\S+)"),
    re.compile(r"Can only \w+ for dict, .*? but got (\S+)"),
    re.compile(r"(\S+) must be imported to load"),
)
_UNSUPPORTED_OPERAND = re.compile(r"Unsupported operand (\d+)")


def _well_formed_container(path: Path) -> bool:
    """A zip archive (torch >= 1.6 format) or a file starting with a pickle PROTO header (legacy format)."""
    try:
        if zipfile.is_zipfile(path):
            return True
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _disallowed_content(message: str, path: Path) -> str | None:
    """What a weights-only ``UnpicklingError`` refused, or None if the message is not a refusal.

    Returns a short description ("the Python object posix.system", "the pickle instruction FRAME"). An
    "Unsupported operand N" is a refusal only if N is a real pickle opcode (one the safe unpickler does not
    execute, e.g. STACK_GLOBAL or FRAME of pickle protocol 4+) in a well-formed file; random bytes of a
    corrupt file are reported as corruption.
    """
    for pattern in _DISALLOWED_PATTERNS:
        found = pattern.search(message)
        if found:
            return f"the Python object {found.group(1).strip()}"
    if "Weights only load failed" in message and "blocked" in message:
        return "a Python object from a blocked module"
    operand = _UNSUPPORTED_OPERAND.search(message)
    if operand:
        opcode = pickletools.code2op.get(chr(int(operand.group(1))))
        if opcode is not None and _well_formed_container(path):
            return f"the pickle instruction {opcode.name}"
    return None


def _unsafe(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"Refused to load {path}: it contains code or objects that are not allowed ({what}). Loading it "
        "would mean executing code, and checkpoints are always loaded with torch.load(weights_only=True), "
        "which accepts only tensors, numbers, strings and containers. The file is not truncated or corrupt: "
        "it was written with such objects (or with pickle protocol 4+ instructions). Use a checkpoint "
        "written by this project or the reference; if you wrote and trust the file, re-save only its "
        "tensors and numbers with torch.save (default protocol)."
    )


def _load_weights_only(path: Path, map_location: Any, mmap: bool) -> Any:
    with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
        # Raised while torch guesses the format of a non-torch file; the error below says it better.
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as exc:
            # Files of torch < 1.6 (legacy format) cannot be memory-mapped: read them whole.
            if mmap and "mmap can only be used with files saved with" in str(exc):
                return torch.load(path, map_location=map_location, weights_only=True)
            raise


def load_checkpoint(
    path: str | os.PathLike[str], map_location: Any = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Load a torch-saved dict with ``weights_only=True``.

    Args:
        path: the file.
        map_location: where tensors go (CPU by default, so CUDA checkpoints load anywhere).
        mmap: memory-map the tensors instead of reading them (cheap inspection of a large file; falls back
            to a plain read for legacy-format files).

    Raises:
        CheckpointError: the file is missing, a directory, unreadable, truncated/corrupt, not a dict, or
            contains objects whose loading would execute code.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file. Pass the .pth file itself (e.g. "
            f"{path}/{{task}}-{{dataset}}_{{name}}_{{step}}.pth), or use --checkpoint for the folder."
        )
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file {path} does not exist. Check the path (--ckpt, --step_ckpt or --checkpoint "
            "with --name/--task/--step), or run the previous step first so that it writes its checkpoint."
        )
    try:
        obj = _load_weights_only(path, map_location, mmap)
    except pickle.UnpicklingError as exc:
        what = _disallowed_content(str(exc), path)
        if what is not None:
            raise _unsafe(path, what) from exc
        raise _corrupt(path, exc) from exc
    except OSError as exc:
        raise CheckpointError(
            f"Cannot read {path}: {describe_os_error(exc)}. Check the file's permissions (and that its disk "
            "is mounted), or copy it somewhere readable."
        ) from exc
    except Exception as exc:  # zip/EOF/pickle-stack errors: any failure to parse the bytes
        if "deserialize object on a CUDA device" in str(exc):
            raise CheckpointError(
                f"{path} holds CUDA tensors but CUDA is not available here: load it with map_location='cpu' "
                "(the default of load_checkpoint) or run on a machine with a GPU."
            ) from exc
        raise _corrupt(path, exc) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a dict: expected a checkpoint dict (with "
            "'model_state', 'epoch', ...) or an ImageNet weight file (with 'state_dict'). Check that the "
            "path points to the right file."
        )
    return dict(obj)


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    size = path.stat().st_size if path.exists() else 0
    return CheckpointError(
        f"Could not read {path} ({size} bytes): it is not a readable PyTorch file, most likely truncated or "
        f"corrupt ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}). This usually comes from an interrupted "
        "copy or download, or a run killed while saving; copy or download it again, or re-run the step that "
        "writes it."
    )


# ---------------------------------------------------------------------------------------------- writing
class _ErrnoKeepingWriter:
    """File wrapper for ``torch.save``: torch reports a failed write as a RuntimeError without the errno
    ("unexpected pos ..."); this keeps the original OSError so the user learns the real cause."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(obj: Any, path: str | os.PathLike[str], hint: str = "") -> None:
    """``torch.save`` through :func:`utils.files.write_atomically`: temporary file, fsync, rename.

    A crash, a signal or a full disk never leaves a truncated ``path``; the temporary file is removed on
    failure.

    Args:
        obj: what to save.
        path: the checkpoint file.
        hint: appended to the error message of a failed write (e.g. how to resume).

    Raises:
        OutputError: the file could not be written (its ``errno`` is the system's); ``path`` is unchanged.
    """
    path = Path(path)

    def write(handle: Any) -> None:
        writer = _ErrnoKeepingWriter(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise

    try:
        write_atomically(path, write)
    except OSError as err:
        if isinstance(err, UserError):
            raise
        kept = (
            f"The previous {path.name} is intact."
            if path.is_file()
            else f"Nothing was written to {path.name}."
        )
        raise output_error("the checkpoint", path, err, kept, hint) from err


# ---------------------------------------------------------------------------------------------- state
def checkpoint_dict(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer: Any,
    epoch: int,
    best_score: float,
    provenance: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A training checkpoint in the reference's format, with ``module.``-prefixed keys, plus the AMP scaler
    state and the run's ``provenance`` (extra top-level entries, which the reference's loading ignores).

    The format is LGKD ``run.py`` ``main`` (``save_ckpt``): ``epoch``, ``model_state``, ``optimizer_state``,
    ``scheduler_state``, ``best_score``, ``trainer_state``.

    Args:
        model: the unwrapped model.
        optimizer: its optimizer.
        scheduler: its learning-rate scheduler.
        trainer: the step's ``Trainer`` (its ``state_dict()`` and its loss ``scaler``).
        epoch: finished epochs.
        best_score: best validation mIoU so far.
        provenance: further top-level entries (``options``, ``world_size``, ``run_id``, ...).
    """
    return {
        "epoch": epoch,
        "model_state": {f"{PREFIX}{k}": v for k, v in model.state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "best_score": float(best_score),
        "trainer_state": trainer.state_dict(),
        "scaler_state": trainer.scaler.state_dict(),
        **(provenance or {}),
    }


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
    """Load a saved optimizer state but keep this run's kernel choice (``fused``/``foreach``).

    ``Optimizer.load_state_dict`` restores every saved group option, the implementation switches
    included: an fp16 checkpoint (fused SGD) resumed in fp32 would switch to the fused kernel, and the
    reverse would hand the GradScaler's device flags to a step that cannot take them.
    """
    kernels = [{k: group[k] for k in ("fused", "foreach") if k in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)


def rng_state() -> dict[str, Any]:
    """Every generator a resumed run needs, as plain python (gathered across ranks, weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    random.setstate(_to_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _to_tuple(x: Any) -> Any:
    # A weights_only checkpoint holds lists where random.getstate() gave tuples.
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list | tuple) else x


# ---------------------------------------------------------------------------------------------- entries
_NUMBER = (int, float, np.integer, np.floating)
# Top-level entries this project reads, with the value types it can use. Checkpoints of the reference have
# epoch, model_state, optimizer_state, scheduler_state, best_score and trainer_state; the others are this
# project's additions. Unknown entries are ignored.
ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "epoch": (int, np.integer),
    "model_state": (Mapping,),
    "optimizer_state": (Mapping,),
    "scheduler_state": (Mapping,),
    "best_score": (*_NUMBER, torch.Tensor),
    "trainer_state": (Mapping, type(None)),
    "scaler_state": (Mapping, type(None)),
    "best_epoch": (int, np.integer),
    "test_scores": (Mapping,),
    "rng_state": (list, tuple, type(None)),
    "world_size": (int, np.integer),
    "options": (Mapping,),
    "run_id": (str, type(None)),
    "previous_step": (str, type(None)),
    "score": (Mapping, type(None)),
}
# What each use needs.
MODEL_ENTRIES = ("model_state",)
RESUME_ENTRIES = ("epoch", "model_state", "optimizer_state", "scheduler_state")


def _type_names(types: tuple[type, ...]) -> str:
    names = {Mapping: "dict", type(None): "None", np.integer: "int", np.floating: "float"}
    names[torch.Tensor] = "tensor"
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def check_entries(ckpt: Mapping[str, Any], required: Iterable[str], source: str, fix: str) -> None:
    """Check that ``ckpt`` has the ``required`` entries and that every known entry has a usable type.

    Args:
        ckpt: a loaded checkpoint dict.
        required: entries this use needs (e.g. :data:`RESUME_ENTRIES`).
        source: how to name the file.
        fix: the sentence telling the user what to do instead.

    Raises:
        CheckpointError: an entry is missing or of another type (booleans are not numbers here).
    """
    missing = [key for key in required if key not in ckpt]
    wrong = [
        f"'{key}' is a {type(ckpt[key]).__name__} (expected {_type_names(types)})"
        for key, types in ENTRY_TYPES.items()
        if key in ckpt and (not isinstance(ckpt[key], types) or isinstance(ckpt[key], bool))
    ]
    if not missing and not wrong:
        return
    problems = []
    if missing:
        entries = "entry" if len(missing) == 1 else "entries"
        problems.append(f"it has no {', '.join(repr(k) for k in missing)} {entries}")
    problems += wrong
    raise CheckpointError(
        f"{source} is not a checkpoint this run can use: {'; '.join(problems)} (its entries: "
        f"{', '.join(sorted(map(str, ckpt))[:10])}). {fix}"
    )


def check_same_layout(expected: Mapping[str, Any], loaded: Any, source: str, entry: str) -> None:
    """Check a saved sub-state against the state this run's object would save (same keys, compatible value
    types), for objects whose ``load_state_dict`` accepts anything (learning-rate schedulers).

    Raises:
        CheckpointError: naming the file, the entry and the keys that differ.
    """
    if not isinstance(loaded, Mapping):
        problems = [f"it is a {type(loaded).__name__}"]
    else:
        problems = [f"no {key!r}" for key in expected if key not in loaded]
        problems += [
            f"{key!r} is a {type(loaded[key]).__name__} (expected {type(value).__name__})"
            for key, value in expected.items()
            if key in loaded and not _compatible(value, loaded[key])
        ]
    if problems:
        raise CheckpointError(
            f"{source}: its '{entry}' entry does not fit this run ({'; '.join(problems[:5])}). The file was "
            "written by other code or with other options (--lr_policy, ...). Run with the options it was "
            "written with, or pass --no_resume to start the step over."
        )


def _compatible(expected: Any, value: Any) -> bool:
    if isinstance(expected, bool) or isinstance(value, bool):
        return isinstance(expected, bool) == isinstance(value, bool)
    if isinstance(expected, int | float) and isinstance(value, int | float | np.integer | np.floating):
        return True
    if isinstance(expected, list | tuple):
        return isinstance(value, list | tuple)
    if isinstance(expected, Mapping):
        return isinstance(value, Mapping)
    return expected is None or value is None or isinstance(value, type(expected))


@contextlib.contextmanager
def loading_entry(source: str, entry: str) -> Iterator[None]:
    """Turn an error raised while loading one entry of a checkpoint into a :class:`CheckpointError`.

    ``load_state_dict`` of the optimizer, scheduler, scaler or trainer, or restoring random states, raise
    KeyError / TypeError / ValueError / AttributeError / IndexError / RuntimeError when the entry was written
    by other code or for other options; the user gets the file, the entry and the likely cause instead.
    """
    try:
        yield
    except (UserError, TrainingError):
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else "no detail"
        raise CheckpointError(
            f"{source}: its '{entry}' entry does not fit this run ({type(exc).__name__}: {detail[:300]}). "
            "The file was written by other code or with other options (method, --freeze, --lr_old, "
            "--opt_level, number of processes, ...). Run with the options it was written with, or pass "
            "--no_resume to start the step over."
        ) from exc


def strip_module_prefix(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Drop a leading ``module.`` (DDP wrapper) from every key that has it."""
    return OrderedDict((k[len(PREFIX) :] if k.startswith(PREFIX) else k, v) for k, v in state.items())


def add_module_prefix(state: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """Add the ``module.`` prefix of the reference's checkpoints to every key that lacks it."""
    return OrderedDict((k if k.startswith(PREFIX) else PREFIX + k, v) for k, v in state.items())


def classifier_sizes(state: Mapping[str, Any]) -> list[int]:
    """Output sizes of ``cls.0``, ``cls.1``, ... in an unprefixed model state dict."""
    sizes = {}
    for key, value in state.items():
        match = _CLS_KEY.match(key)
        if match:
            sizes[int(match.group(1))] = int(value.shape[0])
    return [sizes[i] for i in sorted(sizes)]


def guess_backbone(state: Mapping[str, Any]) -> str | None:
    """Name of the backbone whose body keys ``state`` holds (any key prefix), or None if non-standard:
    a ResNet by its block structure, or ``dgcnn`` (the point-cloud body) by its EdgeConv blocks."""
    if any(_DGCNN_KEY.search(key) for key in state):
        return "dgcnn"
    blocks = dict.fromkeys(range(2, 6), 0)
    bottleneck = False
    for key in state:
        match = _BLOCK_KEY.search(key)
        if match:
            module, block = int(match.group(1)), int(match.group(2))
            blocks[module] = max(blocks[module], block)
            bottleneck = bottleneck or ".convs.conv3." in key
    structure = tuple(blocks[m] for m in range(2, 6))
    return _STRUCTURE_NAMES.get((structure, bottleneck))


def _describe_classes(sizes: list[int]) -> str:
    return f"{sizes} = {sum(sizes)} classes, {len(sizes)} step{'s' if len(sizes) != 1 else ''}"


def _list_keys(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _key_problems(missing: list[str], unexpected: list[str], *more: tuple[str, list[str]]) -> str:
    """``missing a, b; unexpected c; ...``: the non-empty groups, a few keys each. ``more`` adds groups as
    (template with ``{}`` for the keys, keys)."""
    groups = [("missing {}", missing), ("unexpected {}", unexpected), *more]
    return "; ".join(template.format(_list_keys(keys)) for template, keys in groups if keys)


def _check_classifiers(ckpt_sizes: list[int], model_sizes: list[int], strict: bool, source: str) -> None:
    if ckpt_sizes == model_sizes:
        return
    if not strict and ckpt_sizes == model_sizes[:-1]:
        return  # current model at step N: its newest classifier is not in the step N-1 checkpoint
    expected = f"{_describe_classes(model_sizes)}"
    if not strict and len(model_sizes) > 1:
        expected += f" (or {_describe_classes(model_sizes[:-1])} for the previous step's checkpoint)"
    raise CheckpointError(
        f"{source} does not match the model: the checkpoint's classifiers have sizes "
        f"{_describe_classes(ckpt_sizes)}, but the model expects {expected}. The file was probably written "
        "for another task or step: check --task, --step and --dataset, and for the previous-step model "
        "--step_ckpt must be the checkpoint of step N-1 of the same task (by default "
        "{checkpoint}/{task}-{dataset}_{name}_{step-1}.pth)."
    )


def _check_backbone(state: Mapping[str, Any], model_state: Mapping[str, Any], source: str) -> None:
    body_ckpt = {k for k in state if k.startswith("body.")}
    body_model = {k for k in model_state if k.startswith("body.")}
    only_model, only_ckpt = body_model - body_ckpt, body_ckpt - body_model
    # State-dict order, so that the first keys named are the first layers that differ.
    missing = [k for k in model_state if k in only_model and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k in only_ckpt]
    if not missing and not unexpected:
        return
    found, wanted = guess_backbone(state), guess_backbone(model_state)
    details = _key_problems(missing, unexpected)
    raise CheckpointError(
        f"{source} has a different backbone: the file seems to hold a {found or 'non-standard'} body while "
        f"the model is a {wanted or 'non-standard'} ({details}). Use the --backbone the "
        "checkpoint was trained with (and the same --output_stride/--norm_act), or a checkpoint of this "
        "backbone."
    )


def _check_state_types(state: Mapping[Any, Any], source: str) -> None:
    bad = [
        f"{key!r}: {type(value).__name__}"
        for key, value in state.items()
        if not isinstance(key, str) or not isinstance(value, torch.Tensor)
    ]
    if bad:
        raise CheckpointError(
            f"{source} has a 'model_state' that is not a model state dict: every entry must map a parameter "
            f"name to a tensor, but found {_list_keys(bad)}. The file was not written by this project or the "
            "reference (or was edited); use the checkpoint the step wrote."
        )


def check_model_state(
    model: nn.Module,
    state: Mapping[str, Any],
    strict: bool = True,
    *,
    source: str = "the checkpoint",
) -> OrderedDict[str, Any]:
    """Check that a model state dict (``module.``-prefixed or not) fits an unwrapped model; load nothing.

    Only names and shapes are compared, so ``model`` may live on the ``meta`` device: a checkpoint is checked
    in a second, before the data set is scanned. With ``strict=False`` (the current model at step N loading
    step N-1's weights) only the newest classifier ``cls.{N}`` may be missing; any other missing or unexpected
    key is still an error (``num_batches_tracked`` excepted, it loads as 0).

    Args:
        model: the model (a DDP wrapper is unwrapped).
        state: the ``model_state`` of a checkpoint.
        strict: require the same classifiers.
        source: how to name the file in errors (e.g. its path).

    Returns:
        ``state`` without the ``module.`` prefix.

    Raises:
        CheckpointError: not a tensor dict, classifiers of another task/step, another backbone,
            missing/unexpected keys or shapes.
    """
    _check_state_types(state, source)
    model = unwrap_model(model)
    state = strip_module_prefix(state)
    model_state = model.state_dict()
    ckpt_sizes, model_sizes = classifier_sizes(state), classifier_sizes(model_state)
    _check_classifiers(ckpt_sizes, model_sizes, strict, source)
    _check_backbone(state, model_state, source)

    allowed_missing = set()
    if not strict and len(ckpt_sizes) == len(model_sizes) - 1:
        last = len(model_sizes) - 1
        allowed_missing = {f"cls.{last}.weight", f"cls.{last}.bias"}
    missing = [
        k
        for k in model_state
        if k not in state and k not in allowed_missing and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in state if k not in model_state]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(model_state[k].shape)}"
        for k in state
        if k in model_state and state[k].shape != model_state[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = _key_problems(missing, unexpected, ("shape mismatch {} (file vs model)", wrong_shape))
        raise CheckpointError(
            f"{source} does not fit the model: {details}. It was probably written with other "
            "model options (--cosine, --nb_background_modes, --output_stride, --backbone, --dataset); run "
            "with the options the checkpoint was trained with."
        )
    return state


def load_model_state(
    model: nn.Module,
    state: Mapping[str, Any],
    strict: bool = True,
    *,
    source: str = "the checkpoint",
) -> Any:
    """Load a model state dict (``module.``-prefixed or not) into an unwrapped model, after
    :func:`check_model_state`.

    Args:
        model: the model (a DDP wrapper is unwrapped).
        state: the ``model_state`` of a checkpoint.
        strict: require the same classifiers (see :func:`check_model_state`).
        source: how to name the file in errors (e.g. its path).

    Returns:
        The ``load_state_dict`` result (missing/unexpected keys).

    Raises:
        CheckpointError: see :func:`check_model_state`; also any error of ``load_state_dict`` itself.
    """
    state = check_model_state(model, state, strict, source=source)
    with loading_entry(source, "model_state"):
        return unwrap_model(model).load_state_dict(state, strict=strict)


def checkpoint_summary(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """A few facts about a checkpoint for the logs: epoch, classifier sizes, backbone guess, score."""
    raw_state = ckpt.get("model_state", ckpt.get("state_dict", {}))
    state = strip_module_prefix(raw_state) if isinstance(raw_state, Mapping) else {}
    sizes = classifier_sizes(state)
    best = ckpt.get("best_score")
    return {
        "epoch": ckpt.get("epoch"),
        "classes": sizes,
        "num_classes": sum(sizes),
        "num_steps": len(sizes),
        "backbone": guess_backbone(state),
        "best_score": float(best) if best is not None else None,
        "module_prefix": any(str(k).startswith(PREFIX) for k in raw_state)
        if isinstance(raw_state, Mapping)
        else False,
        "keys": sorted(ckpt.keys()),
    }


def _imagenet_missing_message(path: Path) -> str:
    name = path.name
    if name == RELEASED_IMAGENET_FILE:
        fetch = (
            f"Download it from {IMAGENET_URL} (the inplace_abn ImageNet weights re-hosted by LGKD) into "
            f"{path.parent}/."
        )
    else:
        fetch = (
            f"Only {RELEASED_IMAGENET_FILE} (--backbone resnet101 --norm_act iabn_sync, {IMAGENET_URL}) is "
            "released; for this backbone/norm combination convert ImageNet weights yourself into that "
            "layout (see pretrained/README.md)."
        )
    return (
        f"ImageNet weights not found at {path}. The model expects a file named {name} "
        f"({{backbone}}_{{norm_act}}.pth.tar) in {{code_directory}}/pretrained/ (--code_directory). {fetch} "
        "Or pass --no_pretrained to start the backbone from random weights."
    )


def load_imagenet_weights(body: nn.Module, path: str | os.PathLike[str]) -> Any:
    """Load an inplace_abn ImageNet file (dict with ``state_dict``) into a ResNet body (LGKD
    ``segmentation_module.py`` ``make_model``).

    The keys carry the ``module.`` prefix of a wrapped ImageNet model; it is stripped (the first 7
    characters, as in the reference), ``classifier.fc.*`` is dropped, and the rest is loaded strictly.
    ``num_batches_tracked``, absent from these old files, loads as 0.

    Raises:
        CheckpointError: missing file, unexpected layout, or weights of another backbone.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(_imagenet_missing_message(path))
    data = load_checkpoint(path)
    state = data.get("state_dict")
    if not isinstance(state, Mapping):
        hint = (
            " It looks like a training checkpoint (pass it with --ckpt/--step_ckpt instead)."
            if ("model_state" in data)
            else ""
        )
        raise CheckpointError(
            f"{path} is not in the ImageNet-weights layout: expected a dict with a 'state_dict' entry (keys "
            f"'module.mod1.conv1.weight', ...), found top-level keys {sorted(map(str, data))[:8]}.{hint} Use "
            f"the released file from {IMAGENET_URL}, or pass --no_pretrained."
        )
    keys = list(state)
    prefixed = [k.startswith(PREFIX) for k in keys]
    if all(prefixed):
        # Reference behaviour (LGKD segmentation_module.py make_model): the first 7 characters ("module.")
        # of every key are dropped.
        state = OrderedDict((k[7:], v) for k, v in state.items())
    elif any(prefixed):
        raise CheckpointError(
            f"{path} mixes keys with and without the 'module.' prefix (e.g. {keys[0]!r}); expected the "
            "inplace_abn ImageNet layout where every key starts with 'module.'. Re-create the file or pass "
            "--no_pretrained."
        )
    state = OrderedDict((k, v) for k, v in state.items() if k not in _IMAGENET_HEAD_KEYS)

    body_state = body.state_dict()
    missing = [k for k in body_state if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in body_state]
    wrong_shape = [
        k for k in state if k in body_state and tuple(state[k].shape) != tuple(body_state[k].shape)
    ]
    if missing or unexpected or wrong_shape:
        found = guess_backbone(state) or "non-standard"
        wanted = guess_backbone(body_state) or "non-standard"
        details = _key_problems(missing, unexpected, ("wrong shape {}", wrong_shape))
        raise CheckpointError(
            f"ImageNet weights {path} do not fit the {wanted} backbone: the file seems to hold a {found} "
            f"({details}). Use the file that matches --backbone, or pass --no_pretrained."
        )
    return body.load_state_dict(state, strict=True)
