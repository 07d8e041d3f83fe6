"""The options that shape training, stored in checkpoints and compared when a step resumes or is rerun.

Rule (one place): **every option of the parser shapes the trained model, except those in**
:data:`FREE_OPTIONS`, which only say where files are, what is logged, which resources the process uses, or
have no effect. A new option is therefore compared by default; declaring it free is a decision written down
here with its reason. The comparison is on *resolved* values (after ``--method`` presets), so a preset that
changes a loss weight shows up as that weight, attributed to the ``--method`` that set it.

The batch is compared as the global batch (``--batch_size`` x processes): with synchronised batch-norm
(``--norm_act iabn_sync``) the same global batch on another number of GPUs trains the same model and keeps
the learning-rate schedule (its length is counted in iterations of the global batch). With unsynchronised
normalisation the per-process batch sets the batch-norm statistics, so ``--batch_size`` is compared too.

Checkpoints written before this mechanism (and the reference's) have no ``options`` entry: nothing can be
compared and the run goes on with this command's options, saying so in the log.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from argparser import get_argparser, resolve_preset

# dest -> why it may differ between the run that wrote a checkpoint and the run that resumes or reuses it.
FREE_OPTIONS: dict[str, str] = {
    # where inputs and outputs are
    "data_root": "path of the data set",
    "cache_dir": "where split caches are kept",
    "logdir": "where logs go",
    "results_dir": "where the results CSV goes",
    "checkpoint": "where checkpoints go",
    "code_directory": "where pretrained/ is",
    "ckpt": "path of the file to resume from",
    "step_ckpt": "path of the previous step's model (its identity is checked separately)",
    "name": "experiment name in file names",
    "date": "prefix of the results CSV name",
    # what is logged
    "visualize": "tensorboard summaries",
    "sample_num": "validation samples shown",
    "print_interval": "log period",
    "debug": "log level",
    "no_progress": "progress display",
    # resources and implementations with the same results
    "num_workers": "data-loading processes",
    "scan_workers": "processes of the first data scan",
    "device": "where the same computation runs",
    "memory_format": "tensor layout",
    "no_cudnn_benchmark": "cuDNN algorithm search",
    "deterministic": "repeatable kernels of the same computation",
    "recompute_abn": "memory scheme of the same computation",
    "abn_impl": "implementation of the same batch-norm",
    "knn_chunk": "memory bound of the kNN search, same neighbours (point clouds)",
    # what this invocation does
    "test": "evaluation instead of training",
    "no_resume": "start-over switch",
    # accepted for compatibility, no effect
    "dont_predict_bg": "no effect",
    "fusion_mode": "no effect",
    "ckpt_interval": "no effect",
    "pod_apply": "no effect",
    "pod_interpolate_last": "no effect",
    "entropy_min_mean_pixels": "no effect",
    "kd_mask": "no effect",
    "kd_mask_adaptative_factor": "no effect",
    "kd_new": "no effect",
    "temperature": "no effect",
    "temperature_apply": "no effect",
}
# Normalisation layers whose statistics are computed over all processes (see the module docstring).
SYNCHRONISED_NORMS = ("iabn_sync", "iabn_sync_test")
GLOBAL_BATCH = "global batch"  # the derived entry compared instead of --batch_size


def _parser_actions() -> dict[str, argparse.Action]:
    return {action.dest: action for action in get_argparser()._actions if action.dest != "help"}


def option_flag(dest: str, actions: Mapping[str, argparse.Action] | None = None) -> str:
    """The command-line flag of ``dest`` (``--lr`` for ``lr``; ``--fusion-mode`` for ``fusion_mode``)."""
    action = (actions or _parser_actions()).get(dest)
    if action is None or not action.option_strings:
        return dest
    return next((s for s in action.option_strings if s.startswith("--")), action.option_strings[0])


def _plain(value: Any) -> Any:
    """JSON-safe copy (what a checkpoint can hold under ``weights_only`` and what opts.json shows)."""
    return json.loads(json.dumps(value, default=str))


def stored_options(opts: argparse.Namespace) -> dict[str, Any]:
    """Every resolved parser option of ``opts`` as plain JSON values: the ``options`` entry of checkpoints."""
    return {dest: _plain(getattr(opts, dest)) for dest in _parser_actions() if hasattr(opts, dest)}


def shaping_options(options: Mapping[str, Any], world_size: int | None) -> dict[str, Any]:
    """The compared entries: every option except :data:`FREE_OPTIONS`, plus the global batch (and the
    per-process batch with unsynchronised normalisation, or when the number of processes is unknown)."""
    compared = {dest: value for dest, value in options.items() if dest not in FREE_OPTIONS}
    batch = compared.pop("batch_size", None)
    if batch is not None and world_size is not None:
        compared[GLOBAL_BATCH] = (int(batch) * int(world_size), int(batch), int(world_size))
    if world_size is None or options.get("norm_act") not in SYNCHRONISED_NORMS:
        compared["batch_size"] = batch
    return compared


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def option_differences(
    stored: Mapping[str, Any],
    stored_world_size: int | None,
    opts: argparse.Namespace,
    world_size: int,
) -> list[str]:
    """The options that shape training and differ, one ``"--flag: old -> new"`` string each.

    Args:
        stored: the ``options`` entry of a checkpoint.
        stored_world_size: its number of processes (None: unknown, the global batch is not compared).
        opts: this run's resolved options.
        world_size: this run's number of processes.

    An option the checkpoint does not record (added to the code later) is compared against its default.
    A value set by a ``--method`` preset is marked as such, so the user sees which flag to change.
    """
    actions = _parser_actions()
    old = shaping_options(stored, stored_world_size)
    new = shaping_options(stored_options(opts), world_size if stored_world_size is not None else None)
    old_presets = resolve_preset(stored.get("method"), stored.get("dataset", "voc")) if stored else {}
    new_presets = resolve_preset(getattr(opts, "method", None), getattr(opts, "dataset", "voc"))
    differences = []
    for key, new_value in new.items():
        if key == GLOBAL_BATCH:
            if key in old and old[key][0] != new_value[0]:
                (o_total, o_batch, o_world), (n_total, n_batch, n_world) = old[key], new_value
                differences.append(
                    f"--batch_size x processes: {o_total} ({o_batch} x {o_world}) -> "
                    f"{n_total} ({n_batch} x {n_world})"
                )
            continue
        recorded = key in old or key in stored
        if recorded:
            old_value = old.get(key, stored.get(key))
        else:
            old_value = _plain(actions[key].default) if key in actions else None
        if old_value == new_value:
            continue
        notes = []
        if key in old_presets:
            notes.append(f"old value set by --method {stored.get('method')}")
        if key in new_presets:
            notes.append(f"set by --method {opts.method}")
        if not recorded:
            notes.append("not recorded in the checkpoint; compared with the default")
        note = f" ({'; '.join(notes)})" if notes else ""
        differences.append(
            f"{option_flag(key, actions)}: {_format_value(old_value)} -> {_format_value(new_value)}{note}"
        )
    return differences
