"""Reading and writing checkpoints and ImageNet weights safely, with errors a user can act on.

* :func:`load_checkpoint` always uses ``torch.load(weights_only=True)``: a file that would need to run code to
  load is refused, never executed. Truncated or corrupt files give a :class:`CheckpointError` naming the file.
* :func:`save_checkpoint` is atomic: an interrupted save never leaves a half-written checkpoint behind.
* :func:`load_model_state` loads a state dict with or without the ``module.`` prefix of the reference's
  DDP-wrapped checkpoints (§5.6) into an unwrapped model, after checking that the file is of the same task,
  step and backbone.
* :func:`load_imagenet_weights` loads the inplace_abn ImageNet files (§5.7).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from utils.errors import CheckpointError

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


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a torch-saved dict with ``weights_only=True``.

    Raises:
        CheckpointError: the file is missing, truncated/corrupt, not a dict, or would execute code when
            loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file {path} does not exist. Check the path (--ckpt, --step_ckpt or --checkpoint "
            "with --name/--task/--step), or run the previous step first so that it writes its checkpoint."
        )
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()), warnings.catch_warnings():
            # Raised while torch guesses the format of a non-torch file; the error below says it better.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if found:
            raise CheckpointError(
                f"Refused to load {path}: it contains a pickled Python object ({found.group(1)}) that could "
                "only be loaded by executing code, and checkpoints are always loaded with "
                "torch.load(weights_only=True). Use a checkpoint that holds only tensors, numbers, strings "
                "and containers (as written by this project or the reference); if you wrote and trust the "
                "file, re-save its tensors in such a dict."
            ) from exc
        raise _corrupt(path, exc) from exc
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


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash or a full disk never leaves a truncated ``path``; the temporary file is removed on failure.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file owner-only; checkpoints are shared like any other output (umask applies).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)
        os.replace(tmp_name, path)
    except BaseException:
        _remove_quietly(tmp_name)
        raise
    # Persist the rename itself (POSIX); not possible on every platform/filesystem.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _remove_quietly(name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name)


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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def load_model_state(
    model: nn.Module,
    state: Mapping[str, Any],
    strict: bool = True,
    *,
    source: str = "the checkpoint",
) -> Any:
    """Load a model state dict (``module.``-prefixed or not) into an unwrapped model, after checks.

    With ``strict=False`` (the current model at step N loading step N-1's weights) only the newest classifier
    ``cls.{N}`` may be missing; any other missing or unexpected key is still an error (``num_batches_tracked``
    excepted, it loads as 0).

    Args:
        model: the model (a DDP wrapper is unwrapped).
        state: the ``model_state`` of a checkpoint.
        strict: require the same classifiers.
        source: how to name the file in errors (e.g. its path).

    Returns:
        The ``load_state_dict`` result (missing/unexpected keys).

    Raises:
        CheckpointError: classifiers of another task/step, another backbone, missing/unexpected keys or
            shapes.
    """
    model = _unwrap(model)
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
        if k in model_state and hasattr(state[k], "shape") and state[k].shape != model_state[k].shape
    ]
    if missing or unexpected or wrong_shape:
        details = _key_problems(missing, unexpected, ("shape mismatch {} (file vs model)", wrong_shape))
        raise CheckpointError(
            f"{source} does not fit the model: {details}. It was probably written with other "
            "model options (--cosine, --nb_background_modes, --output_stride, --backbone, --dataset); run "
            "with the options the checkpoint was trained with."
        )
    return model.load_state_dict(state, strict=strict)


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
    """Load an inplace_abn ImageNet file (dict with ``state_dict``) into a ResNet body (§5.7).

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
        # Reference behaviour (§5.7): the first 7 characters ("module.") of every key are dropped.
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
