"""Shared helpers of the benchmark scripts (``benchmarks/bench_*.py``).

The scripts run from the repository root as ``python benchmarks/bench_train.py ...``; :func:`setup_paths`
puts the repository on ``sys.path`` so that the project's flat packages (``utils``, ``models``, ...)
import as they do for ``run.py``. Project modules are imported inside the functions that need them, so a
benchmark's parent process stays light and a missing module fails with a clear message at the point of use.

Measurement conventions shared by all benchmarks:

* time: ``time.perf_counter`` around a block of iterations; on CUDA one ``torch.cuda.synchronize()``
  before the block starts and one after it ends, nothing inside it (the training loop's own syncs, e.g.
  the per-print-interval loss check, are part of what is measured);
* memory (:class:`MemoryProbe`): on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak
  resident set size (``VmHWM`` of ``/proc/self/status``) of a fresh process that runs one configuration,
  with the high-water mark reset (``/proc/self/clear_refs``) after the warm-up; both also as the increase
  over the memory of the built model;
* the machine's load average is recorded with the results: on a shared machine other processes make CPU
  timings noisy (an OpenMP parallel region waits for its slowest thread).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCH_RESULT "
MIB = 1024.0 * 1024.0


def setup_paths() -> None:
    """Make the repository's top-level packages importable (the scripts live in ``benchmarks/``)."""
    root = str(ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


# ---------------------------------------------------------------------------------------------- device
def resolve_device(name: str) -> Any:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but no CUDA device is visible. Use --device cpu.")
    return torch.device(name)


def synchronize(device: Any) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def set_cuda_flags(device: Any) -> None:
    """The settings ``run.py`` uses on CUDA: cuDNN benchmark mode and TF32 matmuls/convolutions."""
    import torch

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------- memory
def proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``); None where there is no procfs."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_kib() -> int:
    """Peak resident set size of this process: ``VmHWM``, else ``getrusage`` (Linux reports kB)."""
    value = proc_status_kib("VmHWM")
    if value is not None:
        return value
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); False where this is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def minor_page_faults() -> int:
    """Minor page faults of this process so far (``getrusage``; 0 where unavailable)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
    except (ImportError, OSError):
        return 0


class MemoryProbe:
    """Peak memory of the steady-state part of a benchmark, in bytes.

    Call :meth:`mark_base` once the model is built (before the warm-up), :meth:`reset_peak` after the
    warm-up and :meth:`read_peak` after the timed iterations. ``peak`` is then the peak over the timed
    iterations and ``delta`` its increase over the base: gradients, optimizer state, activations and
    allocator caches of training on top of the built model.

    CUDA: ``memory_allocated`` / ``max_memory_allocated`` (tensor memory, what decides an OOM).
    CPU: ``VmRSS`` / ``VmHWM``; the high-water mark is reset through ``/proc/self/clear_refs`` when the
    kernel allows it (``rss_reset`` False otherwise: the peak then also covers the set-up).
    """

    def __init__(self, device: Any) -> None:
        self.device = device
        self.base = 0
        self.peak = 0
        self.rss_reset = True

    def mark_base(self) -> None:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = (proc_status_kib("VmRSS") or 0) * 1024

    def reset_peak(self) -> None:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss_reset = reset_peak_rss()

    def read_peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = peak_rss_kib() * 1024
        return self.peak

    @property
    def delta(self) -> int:
        return max(self.peak - self.base, 0)


# ---------------------------------------------------------------------------------------------- timing
class BlockTimer:
    """Wall time of a block, synchronising the device once before and once after it."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.seconds = 0.0

    def __enter__(self) -> BlockTimer:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0


class TimedBatches:
    """A list of batches that records a (wall, CPU) timestamp each time the loop asks for the next batch.

    The training loop takes the next batch at the start of every iteration, so consecutive timestamps
    delimit the iterations without any device synchronisation; meaningful per iteration on the CPU only
    (on CUDA they measure the host side, the block time is the figure to use).
    """

    def __init__(self, batches: Sequence[Any]) -> None:
        self.batches = list(batches)
        self.stamps: list[tuple[float, float]] = []

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.stamps.append((time.perf_counter(), time.process_time()))
            yield batch

    def per_iteration(self, end: tuple[float, float]) -> tuple[list[float], list[float]]:
        """(wall seconds, CPU seconds) of each iteration, the last one closed by ``end``."""
        stamps = [*self.stamps, end]
        wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]
        cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        return wall, cpu


def tensor_memory_peak(run: Callable[[], None]) -> int | None:
    """Peak bytes of live CPU tensors while ``run()`` executes, from the PyTorch memory profiler.

    Exact and deterministic (unlike the resident set size, which moves with allocator caching); counts
    the tensors alive before ``run`` (weights, gradients, optimizer state) plus every allocation during
    it. Uses the profiler's memory timeline (a private API): None if it is not available.
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch.profiler._memory_profiler import Action

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                     with_stack=True) as prof:  # fmt: skip
            run()
        current = peak = 0
        for _, action, _, size in prof._memory_profile().timeline:
            if action in (Action.PREEXISTING, Action.CREATE):
                current += size
            elif action == Action.DESTROY:
                current -= size
            peak = max(peak, current)
        return int(peak)
    except Exception:  # noqa: BLE001 - private API: report "not available" rather than fail the benchmark
        torch.autograd.set_grad_enabled(True)
        return None


def median(values: Sequence[float]) -> float:
    """Median, NaN for an empty sequence."""
    return float(statistics.median(values)) if values else math.nan


def safe_ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator in (None, 0) or math.isnan(denominator) or math.isnan(numerator):
        return None
    return numerator / denominator


# ---------------------------------------------------------------------------------------------- machine
def cpu_model_name() -> str:
    """The CPU model of ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: Any = None) -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, torch version, threads and the GPU if any."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model_name(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device) if device is not None else None,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / (1024**3), 1)
        info["cuda"] = torch.version.cuda
    return info


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(model: Any, images: Any, *, backward: bool, ret_intermediate: bool = True) -> int:
    """FLOPs (``torch.utils.flop_counter``: matmuls and convolutions, 2 per multiply-add) of one forward,
    or of a forward and a backward of the sum of the logits, for the whole batch ``images``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if backward:
            logits, _ = model(images, ret_intermediate=ret_intermediate)
            logits.float().sum().backward()
        else:
            with torch.no_grad():
                model(images, ret_intermediate=ret_intermediate)
    return int(counter.get_total_flops())


# ---------------------------------------------------------------------------------------------- workers
@dataclass
class WorkerFailure:
    """A worker subprocess that did not produce a result."""

    returncode: int
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.message, "returncode": self.returncode}


def emit_result(result: dict[str, Any]) -> None:
    """Print a worker's result as the one line its parent looks for."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


# glibc malloc settings that keep freed memory in the heap instead of returning it to the kernel and
# faulting it in again: a fixed (not adaptive) mmap threshold of 4 GiB and no trimming.
GLIBC_NO_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(4 << 30), "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}


def run_worker(
    script: Path, config: dict[str, Any], timeout: float | None = None, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``script --worker CONFIG_JSON`` in a fresh interpreter and return its result dict.

    A failing worker (exception, out of memory, missing optional package) gives ``{"error": ...}`` with
    the last lines of its stderr instead of stopping the whole benchmark.

    Args:
        env: extra environment variables of the worker (e.g. :data:`GLIBC_NO_TRIM_ENV`).
    """
    cmd = [sys.executable, str(script), "--worker", json.dumps(config)]
    env = {**os.environ, **(env or {})}
    env.setdefault("PYTHONUNBUFFERED", "1")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT), env=env)
    except subprocess.TimeoutExpired:
        return WorkerFailure(-1, f"timed out after {timeout} s").as_dict()
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
    return WorkerFailure(proc.returncode, tail or f"exit code {proc.returncode}").as_dict()


# ---------------------------------------------------------------------------------------------- output
def fmt(value: Any, digits: int = 2) -> str:
    """Table cell: floats with ``digits`` decimals, None/NaN as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with a header rule (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def write_json(payload: dict[str, Any], path: str | None) -> None:
    """Write ``payload`` as indented JSON to ``path`` (no-op for None)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--backbone``, ``--crop``, ``--batch`` and ``--memory_format`` of the timed benchmarks;
    the size and layout defaults depend on the device: see :func:`resolve_model_defaults`."""
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--backbone", default="resnet101", choices=BACKBONES)
    parser.add_argument("--crop", type=int, default=None, help="crop size (default: 512 on CUDA, 128 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: 12 on CUDA, 2 on CPU)")
    parser.add_argument(
        "--memory_format",
        choices=["channels_last", "contiguous"],
        default=None,
        help="default: channels_last on CUDA, contiguous on CPU (as --memory_format auto)",
    )


def resolve_model_defaults(args: argparse.Namespace, cuda: bool) -> None:
    """Fill the device-dependent defaults of :func:`add_model_args` in place (the reference's GPU setting,
    crop 512 batch 12, on CUDA; a size one CPU core measures in seconds otherwise)."""
    args.crop = args.crop or (512 if cuda else 128)
    args.batch = args.batch or (12 if cuda else 2)
    args.memory_format = args.memory_format or ("channels_last" if cuda else "contiguous")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """``--json`` (print JSON instead of the table) and ``--json_out PATH`` (also write it to a file)."""
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    parser.add_argument("--json_out", type=str, default=None, help="also write the JSON results to this file")


def today() -> str:
    """The date of the measurement (ISO), stored with the results."""
    return time.strftime("%Y-%m-%d")
