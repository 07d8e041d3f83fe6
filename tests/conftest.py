"""Shared test fixtures: CPU only, fixed seeds, small thread count."""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.logger import remove_handlers

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(2)


def load_script_module(relpath: str, name: str):
    """Import a script that is not inside a package (e.g. data/make_synthetic.py, average_csv.py)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / relpath)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free at this moment, for a torchrun rendezvous: a fixed port collides when two test runs
    (or two CI jobs) share a host."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_argv(
    root: Path, out: Path, step: int, options: dict[str, str], flags: tuple[str, ...] = ()
) -> list[str]:
    """A ``run.py`` command line for step ``step`` of VOC 15-5s on the tree in ``root``, on the CPU, with
    every output (checkpoints, logs, results, split caches) under ``out``; ``options`` add or override."""
    args = {
        "--data_root": str(root),
        "--dataset": "voc",
        "--task": "15-5s",
        "--step": str(step),
        "--checkpoint": str(out / "ckpt"),
        "--logdir": str(out / "logs"),
        "--results_dir": str(out / "results"),
        "--cache_dir": str(out / "cache"),
        "--device": "cpu",
        **options,
    }
    return [*[x for kv in args.items() for x in kv], *flags]


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _detach_console_log():
    """``run.main`` leaves its console log handler in place for late messages. It writes to the stream
    pytest captured for that test and closes afterwards, so a later test's log records would hit a closed
    file ("--- Logging error ---" in place of the message under test): detach the handlers around every
    test."""
    remove_handlers()
    yield
    remove_handlers()


def make_opts(**overrides) -> argparse.Namespace:
    """The model-related reference dests (reference ``argparser.py`` ``get_argparser``) plus the new flags,
    with a small CPU-friendly backbone."""
    values = {
        "backbone": "resnet18",
        "output_stride": 16,
        "norm_act": "iabn_sync",
        "no_pretrained": True,
        "code_directory": ".",
        "pooling": 32,
        "dataset": "voc",
        "num_classes": 21,
        "base_weights": False,
        "nb_background_modes": 1,
        "multimodal_fusion": "sum",
        "cosine": False,
        "disable_background": False,
        "abn_impl": "torch",
        "recompute_abn": False,
        "device": "cpu",
    }
    values.update(overrides)
    return argparse.Namespace(**values)
