"""One command that proves a GPU install: environment, CUDA correctness, figures and a real torchrun job.

``make gpu-check`` (or ``python benchmarks/gpu_check.py``) runs, on the GPU of the machine:

1. **environment**: GPU name and memory, driver, torch / CUDA / cuDNN / NCCL versions, whether the
   compiled ``inplace_abn`` package imports;
2. **correctness**: the tests marked ``gpu`` (``tests/test_gpu.py`` and the CUDA tests of the other test
   files), run by pytest on the device: every method's training iteration in fp32, fp16 and bf16 autocast,
   fp32 device losses against CPU losses of the same weights and batch, the fused-SGD + GradScaler skip of
   an overflowing step, ``normalize_on_device``, the metrics, ``--abn_impl inplace_abn`` when installed;
3. **figures**: ``bench_train.py`` at crop 512 batch 12 (steps 1 and 0 of the LGKD VOC 15-5 iteration, fp16
   and bf16 autocast, channels_last, ours against plain PyTorch: img/s, peak memory), ``bench_eval.py``,
   and the device's measured bf16 matmul rate, against which each training configuration's achieved
   FLOP/s is given as a fraction;
4. **the real job**: synthetic VOC-layout data at 512 px made on the spot, then ``torchrun
   --nproc_per_node=1 run.py`` step 0 and an LGKD step 1 with ``--opt_level O1`` and DataLoader worker
   processes, a few epochs each; checkpoints and results rows are checked and each epoch's img/s (data
   loading included) is read from the run's progress log;
5. **multi-GPU**, when more than one GPU is visible: step 0 again under ``torchrun --nproc_per_node=N``
   (synchronised ABN over NCCL, same global batch), and the one-process step-1 checkpoint evaluated by N
   processes; rows are compared with the one-process run.

Every step runs in its own subprocess with a timeout inside a global time budget (``--budget``); a failing
step is recorded and the next one still runs. The JSON and Markdown reports (``gpu_check.json``,
``gpu_check.md`` in ``--out``) are rewritten after every step, so a killed check still leaves a partial
report; the full output of every subprocess is in ``--out/logs/``. Exit status: 0 when every step passed
(or did not apply to this machine, e.g. step 5 with one GPU), 1 otherwise.

``--smoke`` runs the same sequence at toy sizes on whatever device is present, the CPU included: there
gloo replaces NCCL (two processes for step 5), the job runs fp32 (``--opt_level O1`` needs CUDA), the
figures are bf16 only (CPU fp16 autocast kernels are slow) and the ``gpu`` tests run on the CPU through
``GPU_CHECK_DEVICE=cpu``. CI runs it, so the code of every step has run before it first meets a GPU.

Examples::

    make gpu-check                                            # full check, report in results/gpu_check/
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke
    python benchmarks/gpu_check.py --only figures --budget 300   # rerun one part
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_paths()
import testing  # noqa: E402
from utils.files import write_text_atomically  # noqa: E402

ROOT = common.ROOT
PY = sys.executable
SCRIPT = Path(__file__).resolve()
REPORT_JSON, REPORT_MD = "gpu_check.json", "gpu_check.md"
# Read by tests/test_gpu.py: the device the `gpu` tests run on (cuda; cpu in the smoke mode without a GPU).
DEVICE_ENV = "GPU_CHECK_DEVICE"

# The real job: LGKD on VOC 15-5 as scripts/voc/lgkd_15-5.sh (step 0 lr 0.01; step 1 lr 0.001 with
# --prev_kd 5 --novel_kd 1), overlapped setting.
JOB_TASK, JOB_NAME, JOB_DATE = "15-5", "gpu_check", "gpu_check"
JOB_STEP_ARGS = {0: ("--lr", "0.01"), 1: ("--lr", "0.001", *testing.LGKD_STEP_ARGS)}
# One results column per VOC class (21) plus the step and the mean IoU.
ROW_LENGTH = 1 + 21 + 1
# Training under N processes sees the same global batches (DistributedSampler over the same permutation,
# per-process batch B/N, synchronised ABN) but other augmentation draws and per-process loss means, so
# the mean IoU of a few epochs only agrees loosely; evaluating one checkpoint must agree per class.
MIOU_TOLERANCE = 0.05
IOU_TOLERANCE = 1e-3
# Data loading is said to keep up when the job's img/s reaches this fraction of bench_train's img/s
# (same step, precision, crop and batch, batches already in memory).
FEED_RATIO_OK = 0.9
MIN_STEP_SECONDS = 15.0  # a step is not started with less time than this left in the budget
PARTS = ("env", "tests", "job", "multi", "figures")
PROGRESS_LINE = re.compile(r"Epoch (\d+): (\d+)/(\d+) \(100%\), ([0-9.]+) it/s")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class Profile:
    """Sizes and time limits of one mode (full or smoke)."""

    name: str
    budget_s: float
    backbone: str
    crop: int
    batch: int
    epochs: int
    print_interval: int
    data_size: int
    num_train: int
    num_val: int
    bench_train_args: tuple[str, ...]
    bench_eval_args: tuple[str, ...]
    matmul_n: int
    matmul_iters: int
    timeouts: dict[str, float] = field(default_factory=dict)


FULL = Profile(
    name="full", budget_s=480.0, backbone="resnet101", crop=512, batch=12, epochs=3, print_interval=5,
    # ~95 % of the images show a step-0 class (15 of 20, 1-4 objects each) and ~half a step-1 class:
    # ~15 and ~8 iterations of 12 images per epoch.
    data_size=512, num_train=192, num_val=48,
    bench_train_args=(
        "--crop", "512", "--batch", "12", "--steps", "1", "0", "--repeats", "2", "--warmup", "5", "--iters",
        "20", "--one_process",
    ),
    bench_eval_args=("--crop", "512", "--batch", "12", "--iters", "20", "--repeats", "2"),
    matmul_n=8192, matmul_iters=50,
    timeouts={
        "env": 120, "matmul": 90, "tests": 300, "data": 120, "job0": 240, "job1": 240, "multi_train": 300,
        "multi_test": 150, "train_fp16": 240, "train_bf16": 180, "eval": 120,
    },
)  # fmt: skip
SMOKE = Profile(
    name="smoke", budget_s=900.0, backbone="resnet18", crop=48, batch=4, epochs=2, print_interval=2,
    data_size=64, num_train=48, num_val=12, bench_train_args=("--smoke",), bench_eval_args=("--smoke",),
    matmul_n=256, matmul_iters=5,
    timeouts={
        "env": 120, "matmul": 60, "tests": 300, "data": 60, "job0": 240, "job1": 240, "multi_train": 240,
        "multi_test": 180, "train_fp16": 180, "train_bf16": 180, "eval": 120,
    },
)  # fmt: skip


class StepFailed(Exception):
    """A step ran and found a problem (the message goes into the report)."""


class StepSkipped(Exception):
    """A step does not apply to this machine or mode (not a failure)."""


class StepNotRun(Exception):
    """A step could not run: out of time budget, or a step it needs failed (a failure of the check)."""


# ---------------------------------------------------------------------------------------------- processes
@dataclass
class CommandResult:
    """Outcome of :func:`run_command`."""

    returncode: int
    seconds: float
    timed_out: bool
    output: str

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def run_command(
    cmd: list[str], log_path: Path, timeout: float, env: dict[str, str] | None = None
) -> CommandResult:
    """Run ``cmd`` from the repository root, stdout and stderr into ``log_path``, within ``timeout`` s.

    The command gets its own process group. On timeout the group gets SIGTERM (torchrun then stops its
    workers, which run in sessions of their own), 20 s later SIGKILL.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.monotonic()
    timed_out = False
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(proc)
        except BaseException:  # Ctrl-C or SIGTERM of the check: its own session would keep running
            _stop_group(proc)
            raise
    seconds = time.monotonic() - start
    output = log_path.read_text(encoding="utf-8", errors="replace")
    if timed_out:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n[gpu_check] stopped after the step's timeout of {timeout:.0f} s\n")
    return CommandResult(proc.returncode if not timed_out else -1, seconds, timed_out, ANSI.sub("", output))


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the command's process group, then SIGKILL if it is still there."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def require_success(result: CommandResult, what: str, log_path: Path) -> None:
    """Raise :class:`StepFailed` naming the log when ``result`` timed out or exited non-zero."""
    if result.timed_out:
        raise StepFailed(f"{what} did not finish within its timeout ({result.seconds:.0f} s); see {log_path}")
    if result.returncode != 0:
        raise StepFailed(
            f"{what} exited with status {result.returncode}; see {log_path}. Last lines:\n{result.tail()}"
        )


def argv(options: dict[str, Any], *flags: str) -> list[str]:
    """``{"--crop": 512, ...}`` and flags -> a command-line argument list (values as strings)."""
    return [*(x for key, value in options.items() for x in (key, str(value))), *flags]


def free_port() -> int:
    """A TCP port free on this machine now (for torchrun's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------- workers
def environment_report() -> dict[str, Any]:
    """What the check runs on (worker side: imports torch and initialises CUDA when present)."""
    import importlib

    import torch
    import torch.distributed as dist

    info = common.machine_info()
    info.pop("device", None)
    info.update(
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        nccl_available=dist.is_available() and dist.is_nccl_available(),
        gloo_available=dist.is_available() and dist.is_gloo_available(),
        memory_gib=_host_memory_gib(),
        driver=None,
        gpus=[],
    )
    if info["cuda_available"]:
        import torch.cuda.nccl

        info["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
        for index in range(info["device_count"]):
            props = torch.cuda.get_device_properties(index)
            info["gpus"].append(
                {
                    "name": props.name,
                    "memory_gib": round(props.total_memory / 1024**3, 1),
                    "capability": f"{props.major}.{props.minor}",
                    "multiprocessors": getattr(props, "multi_processor_count", None),
                }
            )
        info["driver"] = _nvidia_smi_driver()
    try:
        module = importlib.import_module("inplace_abn")
        info["inplace_abn"] = getattr(module, "__version__", "importable")
    except Exception as exc:  # noqa: BLE001 - ImportError, or OSError from a broken compiled extension
        info["inplace_abn"] = None
        info["inplace_abn_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _host_memory_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def _nvidia_smi_driver() -> str | None:
    """The NVIDIA driver version (torch does not expose it), or None without ``nvidia-smi``."""
    try:
        proc = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = proc.stdout.strip().splitlines()
    return lines[0].strip() if proc.returncode == 0 and lines else None


def matmul_rate(device_name: str, n: int, iters: int, repeats: int = 3) -> dict[str, Any]:
    """Measured bf16 matmul rate of the device: the best of ``repeats`` blocks of ``iters`` (n x n) @ (n x n)
    products (2 n^3 FLOPs each), timed with one synchronisation before and after each block."""
    import torch

    device = torch.device(device_name)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=generator)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):  # warm-up: kernel selection, clocks
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(repeats):
        with common.BlockTimer(device) as timer:
            for _ in range(iters):
                torch.mm(a, b, out=out)
        rates.append(2.0 * n**3 * iters / timer.seconds / 1e12)
    if not math.isfinite(float(out.float().abs().max())):
        raise RuntimeError("the bf16 matmul produced non-finite values")
    return {"dtype": "bf16", "n": n, "iters": iters, "tflop_s": max(rates), "tflop_s_all": rates}


def run_worker_job(job: dict[str, Any]) -> dict[str, Any]:
    if job["kind"] == "env":
        return environment_report()
    if job["kind"] == "matmul":
        return matmul_rate(job["device"], job["n"], job["iters"])
    raise ValueError(f"unknown worker job {job['kind']!r}")


def call_worker(job: dict[str, Any], log_path: Path, timeout: float) -> dict[str, Any]:
    """Run ``gpu_check.py --worker JOB`` in a fresh interpreter; its result dict, or StepFailed."""
    result = run_command([PY, str(SCRIPT), "--worker", json.dumps(job)], log_path, timeout)
    require_success(result, f"the {job['kind']} worker", log_path)
    for line in reversed(result.output.splitlines()):
        if line.startswith(common.RESULT_MARKER):
            return json.loads(line[len(common.RESULT_MARKER) :])
    raise StepFailed(f"the {job['kind']} worker printed no result; see {log_path}")


# ---------------------------------------------------------------------------------------------- parsing
def parse_junit(path: Path) -> dict[str, Any]:
    """Counts and per-test outcomes (with ``record_property`` values) of a pytest JUnit XML file."""
    root = ET.parse(path).getroot()
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (node.get("message") or node.text or "").strip()
                break
        properties = {p.get("name"): p.get("value") for p in case.iter("property")}
        cases.append(
            {
                "test": f"{case.get('classname', '')}::{case.get('name', '')}",
                "outcome": outcome,
                "seconds": float(case.get("time") or 0.0),
                "message": message[:500],
                "properties": properties,
            }
        )
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"counts": counts, "cases": cases}


def epoch_rates(output: str) -> list[dict[str, Any]]:
    """Training epochs' iterations/s from a run's plain progress lines (``Epoch k: n/n (100%), R it/s``).

    The rate covers the whole epoch loop as the DataLoader feeds it: data loading included.
    """
    rates = []
    for match in PROGRESS_LINE.finditer(ANSI.sub("", output)):
        epoch, done, total, rate = match.groups()
        if done == total:
            rates.append({"epoch": int(epoch), "iterations": int(total), "it_s": float(rate)})
    return rates


def read_rows(path: Path) -> list[list[str]]:
    """The rows of a results CSV (``step,IoU_0,...,IoU_{N-1},MeanIoU``)."""
    with open(path, newline="", encoding="utf-8") as handle:
        return [row for row in csv.reader(handle) if row]


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def compare_rows(a: list[str], b: list[str], tolerance: float, only_mean: bool = False) -> list[str]:
    """Differences between two results rows: markers (``x``/``X``) must match; numbers within
    ``tolerance`` (every class, or only the mean IoU, the last column)."""
    problems = []
    if len(a) != len(b):
        return [f"{len(a)} columns against {len(b)}"]
    for column, (u, v) in enumerate(zip(a, b)):
        x, y = _number(u), _number(v)
        if (x is None) != (y is None) or (x is None and u != v):
            problems.append(f"column {column}: {u!r} against {v!r}")
        elif x is not None and (not only_mean or column == len(a) - 1) and abs(x - y) > tolerance:
            problems.append(f"column {column}: {u} against {v} (tolerance {tolerance})")
    return problems


# ---------------------------------------------------------------------------------------------- the check
class GpuCheck:
    """Runs the steps in order, each isolated, and keeps the reports on disk up to date."""

    def __init__(self, args: argparse.Namespace, profile: Profile) -> None:
        self.args = args
        self.profile = profile
        self.out = Path(args.out).resolve()
        self.work = self.out / "work"
        self.logs = self.out / "logs"
        self.start = time.monotonic()
        self.deadline = self.start + (args.budget or profile.budget_s)
        self.env: dict[str, Any] = {}
        self.device = "cpu"
        self.flops_counted = False
        self.report: dict[str, Any] = {
            "tool": "benchmarks/gpu_check.py",
            "mode": profile.name,
            "date": common.today(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(PY).name, "benchmarks/gpu_check.py", *(args.argv or [])]),
            "budget_s": args.budget or profile.budget_s,
            "status": "running",
            "environment": {},
            "steps": [],
            "figures": {},
            "job": {
                "crop": profile.crop,
                "batch": profile.batch,
                "epochs": profile.epochs,
                "backbone": profile.backbone,
                "task": f"voc {JOB_TASK}, overlap",
            },
        }

    # ------------------------------------------------------------------ bookkeeping
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def step_record(self, key: str) -> dict[str, Any] | None:
        return next((s for s in self.report["steps"] if s["key"] == key), None)

    def passed(self, key: str) -> bool:
        record = self.step_record(key)
        return record is not None and record["status"] == "passed"

    def run_step(self, key: str, part: str, title: str, fn: Callable[[dict[str, Any], float], None]) -> None:
        """Run ``fn(details, timeout)``; record its status, time and details (filled even on failure)."""
        record: dict[str, Any] = {
            "key": key,
            "part": part,
            "title": title,
            "status": "not run",
            "details": {},
        }
        self.report["steps"].append(record)
        timeout = min(self.profile.timeouts.get(key, 120.0), self.remaining())
        t0 = time.monotonic()
        try:
            if self.args.only and part not in self.args.only:
                raise StepSkipped(f"not selected (--only {' '.join(self.args.only)})")
            if timeout < MIN_STEP_SECONDS:
                raise StepNotRun(
                    f"the time budget of {self.report['budget_s']:.0f} s was used up before this step; "
                    "raise --budget, or rerun the missing parts with --only"
                )
            print(f"[gpu_check] {title} (timeout {timeout:.0f} s) ...", flush=True)
            fn(record["details"], timeout)
            record["status"] = "passed"
        except StepSkipped as exc:
            record["status"], record["reason"] = "skipped", str(exc)
        except StepNotRun as exc:
            record["status"], record["reason"] = "not run", str(exc)
        except StepFailed as exc:
            record["status"], record["error"] = "failed", str(exc)
        except KeyboardInterrupt:
            record["reason"] = "the check was interrupted during this step"
            raise
        except Exception as exc:  # noqa: BLE001 - a bug in a step must not stop the other steps
            record["status"] = "failed"
            record["error"] = f"{type(exc).__name__}: {exc}\n" + traceback.format_exc()[-2000:]
        record["seconds"] = round(time.monotonic() - t0, 1)
        note = (record.get("error") or record.get("reason") or "").strip()
        first = note.splitlines()[0] if note else ""
        print(f"[gpu_check] {title}: {record['status']} ({record['seconds']} s) {first}", flush=True)
        self.write()

    def needs(self, *keys: str) -> None:
        for key in keys:
            if not self.passed(key):
                record = self.step_record(key)
                status = record["status"] if record else "not run"
                if status == "skipped":
                    raise StepSkipped(f"step {key!r} was skipped")
                raise StepNotRun(
                    f"needs step {key!r}, which {'failed' if status == 'failed' else 'did not run'}"
                )

    def write(self) -> None:
        """Rewrite both reports atomically (a killed check leaves the last complete version)."""
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.report["figures"] = collect_figures(self.report)
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (
            (REPORT_JSON, json.dumps(self.report, indent=2, sort_keys=True, default=str) + "\n"),
            (REPORT_MD, render_markdown(self.report)),
        ):
            write_text_atomically(self.out / name, text)

    # ------------------------------------------------------------------ steps
    def run(self) -> int:
        """All steps; 0 when every step passed or did not apply, 1 otherwise, 130 when interrupted."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.write()
        try:
            self.run_steps()
        except KeyboardInterrupt:
            self.report["status"] = "interrupted"
            self.write()
            print(f"[gpu_check] interrupted; partial report: {self.out / REPORT_MD}", flush=True)
            return 130
        failed = [s["key"] for s in self.report["steps"] if s["status"] in ("failed", "not run")]
        self.report["status"] = "failed" if failed else "passed"
        self.report["failed_steps"] = failed
        self.report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)
        self.write()
        print(
            f"[gpu_check] {self.report['status'].upper()} in {self.report['elapsed_s']:.0f} s; report: "
            f"{self.out / REPORT_MD}" + (f"; failed: {', '.join(failed)}" if failed else ""),
            flush=True,
        )
        return 1 if failed else 0

    def run_steps(self) -> None:
        """The steps in order: the real job before the figures, so a short budget keeps the essential."""
        self.run_step("env", "env", "1. environment", self.step_env)
        self.run_step("matmul", "figures", "3c. bf16 matmul rate", self.step_matmul)
        self.run_step("tests", "tests", "2. correctness tests (pytest -m gpu)", self.step_tests)
        self.run_step("data", "job", "4a. synthetic VOC data", self.step_data)
        self.run_step("job0", "job", "4b. torchrun x1 run.py step 0", lambda d, t: self.step_job(d, t, 0))
        self.run_step(
            "job1", "job", "4c. torchrun x1 run.py step 1 (LGKD)", lambda d, t: self.step_job(d, t, 1)
        )
        self.run_step("multi_train", "multi", "5a. torchrun xN step 0", self.step_multi_train)
        self.run_step("multi_test", "multi", "5b. torchrun xN evaluation of step 1", self.step_multi_test)
        for precision in ("fp16", "bf16"):
            self.run_step(
                f"train_{precision}",
                "figures",
                f"3a. bench_train {precision}",
                lambda d, t, p=precision: self.step_bench_train(d, t, p),
            )
        self.run_step("eval", "figures", "3b. bench_eval", self.step_bench_eval)

    def step_env(self, details: dict[str, Any], timeout: float) -> None:
        self.env = call_worker({"kind": "env"}, self.logs / "env.log", timeout)
        self.report["environment"] = self.env
        details.update(cuda=self.env["cuda_available"], gpus=len(self.env["gpus"]))
        cuda = self.env["cuda_available"]
        if self.args.device == "cuda" and not cuda:
            raise StepFailed("--device cuda was asked for, but torch sees no CUDA device.")
        self.device = "cuda" if cuda and self.args.device != "cpu" else "cpu"
        details["device"] = self.device
        if self.profile.name == "full" and self.device != "cuda":
            raise StepFailed(
                "No CUDA device is visible to torch, so the full check cannot run: it measures a GPU. "
                "On a machine without a GPU run the smoke mode (python benchmarks/gpu_check.py --smoke "
                "--out DIR); on a GPU machine install a CUDA build of torch (README, 'On a GPU machine') "
                "and check nvidia-smi."
            )

    def step_matmul(self, details: dict[str, Any], timeout: float) -> None:
        self.needs("env")
        job = {
            "kind": "matmul",
            "device": self.device,
            "n": self.profile.matmul_n,
            "iters": self.profile.matmul_iters,
        }
        details.update(call_worker(job, self.logs / "matmul.log", timeout))

    def step_tests(self, details: dict[str, Any], timeout: float) -> None:
        self.needs("env")
        junit = self.out / "gpu_tests.xml"
        junit.unlink(missing_ok=True)
        # xunit1: the JUnit flavour that keeps the tests' record_property values.
        options = {"-m": "gpu", "-p": "no:cacheprovider", "-o": "junit_family=xunit1"}
        cmd = [PY, "-m", "pytest", "-q", *argv(options), f"--junitxml={junit}", "tests"]
        result = run_command(cmd, self.logs / "tests.log", timeout, env={DEVICE_ENV: self.device})
        details["device"] = self.device
        if junit.is_file():
            parsed = parse_junit(junit)
            details.update(parsed["counts"])
            details["cases"] = parsed["cases"]
        if result.timed_out:
            require_success(result, "pytest -m gpu", self.logs / "tests.log")
        if result.returncode not in (0, 1) or not junit.is_file():
            raise StepFailed(f"pytest could not run the tests (status {result.returncode}):\n{result.tail()}")
        if details.get("failed") or details.get("error") or result.returncode != 0:
            names = [c["test"] for c in details.get("cases", []) if c["outcome"] in ("failed", "error")]
            raise StepFailed(
                f"{len(names)} gpu test(s) failed: {', '.join(names)}; see {self.logs / 'tests.log'}"
            )
        if not details.get("passed"):
            raise StepFailed("no gpu test ran (all skipped or none collected)")

    def step_data(self, details: dict[str, Any], timeout: float) -> None:
        p = self.profile
        options = {
            "--dataset": "voc", "--out": self.work / "data", "--num_train": p.num_train,
            "--num_val": p.num_val, "--size": p.data_size, "--seed": 0,
            "--workers": max(1, min(16, os.cpu_count() or 1)),
        }  # fmt: skip
        cmd = [PY, "data/make_synthetic.py", *argv(options)]
        result = run_command(cmd, self.logs / "data.log", timeout)
        require_success(result, "data/make_synthetic.py", self.logs / "data.log")
        details.update(images=p.num_train + p.num_val, size=p.data_size, seconds=round(result.seconds, 1))

    # ------------------------------------------------------------------ the real job
    def nproc_multi(self) -> int:
        if self.device == "cuda":
            return min(int(self.env.get("device_count", 1)), 8)
        return 2  # CPU: two gloo processes stand in for two GPUs

    def loader_workers(self, nproc: int) -> int:
        return max(1, min(8, (os.cpu_count() or 2) // (2 * nproc))) if self.device == "cuda" else 2

    def job_args(
        self, step: int, *, name: str, nproc: int, batch: int, extra: tuple[str, ...] = ()
    ) -> list[str]:
        """A run.py command line of the real job (everything it writes under ``--out/work``)."""
        p, w = self.profile, self.work
        options = {
            "--data_root": w / "data", "--dataset": "voc", "--task": JOB_TASK, "--step": step, "--name": name,
            "--date": JOB_DATE, "--method": "LGKD", "--backbone": p.backbone, "--crop_size": p.crop,
            "--batch_size": batch, "--epochs": p.epochs, "--num_workers": self.loader_workers(nproc),
            "--opt_level": "O1", "--device": self.device, "--print_interval": p.print_interval,
            "--checkpoint": w / "ckpt", "--logdir": w / "logs", "--results_dir": w / "results" / name,
            "--cache_dir": w / "cache",
        }  # fmt: skip
        flags = ("--overlap", "--no_pretrained", "--no_progress", "--no_resume")
        return [*argv(options, *flags), *JOB_STEP_ARGS[step], *extra]

    def torchrun(self, nproc: int) -> list[str]:
        launcher = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}",
        ]
        return [PY, *launcher, "run.py"]

    def job_env(self) -> dict[str, str]:
        # One torch thread per process on the CPU (as scripts/smoke_cpu.sh): small CPUs stall with more.
        return {} if self.device == "cuda" else {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}

    def checkpoint_path(self, name: str, step: int) -> Path:
        return self.work / "ckpt" / f"{JOB_TASK}-voc_{name}_{step}.pth"

    def results_path(self, name: str) -> Path:
        return self.work / "results" / name / f"{JOB_DATE}_voc_{JOB_TASK}_{name}.csv"

    def train_and_check(
        self, details: dict[str, Any], timeout: float, step: int, *, name: str, nproc: int
    ) -> list[str]:
        """torchrun ``run.py`` one training step; check checkpoint, rows, img/s. Returns this step's row."""
        batch = self.profile.batch if nproc == 1 else max(1, self.profile.batch // nproc)
        log = self.logs / f"{name}_step{step}.log"
        cmd = [*self.torchrun(nproc), *self.job_args(step, name=name, nproc=nproc, batch=batch)]
        details.update(
            nproc=nproc,
            batch_per_process=batch,
            global_batch=batch * nproc,
            loader_workers=self.loader_workers(nproc),
            backend="nccl" if self.device == "cuda" else "gloo",
            precision="fp16 autocast (--opt_level O1)"
            if self.device == "cuda"
            else "fp32 (--opt_level O1 runs fp32 on the CPU)",
        )
        result = run_command(cmd, log, timeout, env=self.job_env())
        details["seconds_total"] = round(result.seconds, 1)
        rates = epoch_rates(result.output)
        details["epochs"] = [{**r, "img_s": round(r["it_s"] * batch * nproc, 2)} for r in rates]
        require_success(result, f"run.py step {step} under torchrun x{nproc}", log)
        if len(rates) != self.profile.epochs:
            raise StepFailed(
                f"found {len(rates)} epoch progress lines ('Epoch k: n/n (100%), R it/s') in {log}, expected "
                f"{self.profile.epochs}: the img/s with data loading could not be read"
            )
        steady = [r["img_s"] for r in details["epochs"][1:]] or [details["epochs"][0]["img_s"]]
        details["img_s_with_loading"] = round(statistics.median(steady), 2)
        details["checkpoint"] = check_checkpoint(self.checkpoint_path(name, step), self.profile.epochs)
        last = self.work / "ckpt" / f"{JOB_TASK}-voc_{name}_{step}_last.pth"
        if last.exists():
            raise StepFailed(f"{last} still exists after the step finished (it is removed on success)")
        rows = read_rows(self.results_path(name))
        details["rows"] = rows
        if [r[0] for r in rows] != [str(s) for s in range(step + 1)] or any(
            len(r) != ROW_LENGTH for r in rows
        ):
            raise StepFailed(
                f"results rows {[r[:1] for r in rows]} of {ROW_LENGTH} columns expected for steps "
                f"0..{step}, found {[len(r) for r in rows]} columns"
            )
        row = rows[-1]
        mean = _number(row[-1])
        if mean is None or not math.isfinite(mean):
            raise StepFailed(f"step {step} mean IoU is {row[-1]!r}")
        details["mean_iou"] = mean
        return row

    def step_job(self, details: dict[str, Any], timeout: float, step: int) -> None:
        self.needs("env", "data", *(("job0",) if step == 1 else ()))
        self.train_and_check(details, timeout, step, name=JOB_NAME, nproc=1)

    def step_multi_train(self, details: dict[str, Any], timeout: float) -> None:
        self.needs("env", "data")
        nproc = self.nproc_multi()
        if nproc < 2:
            raise StepSkipped("one GPU visible: the multi-GPU comparison needs two or more")
        self.needs("job0")
        row = self.train_and_check(details, timeout, 0, name=f"{JOB_NAME}_x{nproc}", nproc=nproc)
        reference = read_rows(self.results_path(JOB_NAME))[0]
        details["one_process_row"] = reference
        details["mean_iou_one_process"] = _number(reference[-1])
        problems = compare_rows(row, reference, MIOU_TOLERANCE, only_mean=True)
        details["tolerance_mean_iou"] = MIOU_TOLERANCE
        if problems:
            raise StepFailed(f"step 0 under x{nproc} differs from the one-process run: {'; '.join(problems)}")

    def step_multi_test(self, details: dict[str, Any], timeout: float) -> None:
        self.needs("env", "data")
        nproc = self.nproc_multi()
        if nproc < 2:
            raise StepSkipped("one GPU visible: the multi-GPU comparison needs two or more")
        self.needs("job1")
        name = f"{JOB_NAME}_test_x{nproc}"
        batch = max(1, self.profile.batch // nproc)
        ckpt = self.checkpoint_path(JOB_NAME, 1)
        cmd = [
            *self.torchrun(nproc),
            *self.job_args(1, name=name, nproc=nproc, batch=batch, extra=("--test", "--ckpt", str(ckpt))),
        ]
        log = self.logs / f"{name}.log"
        result = run_command(cmd, log, timeout, env=self.job_env())
        details.update(nproc=nproc, batch_per_process=batch, seconds_total=round(result.seconds, 1))
        require_success(result, f"run.py --test under torchrun x{nproc}", log)
        rows = read_rows(self.results_path(name))
        reference = read_rows(self.results_path(JOB_NAME))[-1]
        details.update(row=rows[-1] if rows else None, one_process_row=reference, tolerance_iou=IOU_TOLERANCE)
        if len(rows) != 1:
            raise StepFailed(f"expected one results row from --test, found {len(rows)}")
        problems = compare_rows(rows[-1], reference, IOU_TOLERANCE)
        if problems:
            raise StepFailed(
                f"evaluation under x{nproc} differs from the one-process row: {'; '.join(problems)}"
            )

    # ------------------------------------------------------------------ figures
    def step_bench_train(self, details: dict[str, Any], timeout: float, precision: str) -> None:
        self.needs("env")
        if precision == "fp16" and self.device == "cpu":
            # CPU autocast has fp16 kernels, but they ran 8x slower than fp32 and bf16 here (1.5 s against
            # 0.2 s per ResNet-18 iteration at crop 64): the smoke mode measures bf16 alone on the CPU.
            raise StepSkipped("fp16 autocast has no fast CPU kernels; bf16 stands for both on the CPU")
        path = self.out / f"bench_train_{precision}.json"
        path.unlink(missing_ok=True)
        options = {"--device": self.device, "--precision": precision, "--memory_format": "channels_last",
                   "--json_out": path, "--timeout": max(10, int(timeout - 10))}  # fmt: skip
        cmd = [PY, "benchmarks/bench_train.py", *self.profile.bench_train_args, *argv(options)]
        if self.flops_counted:
            cmd.append("--no_flops")  # the same network at the same size: counted once
        log = self.logs / f"bench_train_{precision}.log"
        result = run_command(cmd, log, timeout)
        details["precision"] = precision
        if path.is_file():
            details["summary"] = summarize_bench_train(json.loads(path.read_text(encoding="utf-8")))
            details["json"] = path.name
            self.flops_counted = self.flops_counted or bool(details["summary"]["flops_per_image"])
        require_success(result, f"bench_train.py --precision {precision}", log)
        if not path.is_file():
            raise StepFailed(f"bench_train.py wrote no JSON; see {log}")

    def step_bench_eval(self, details: dict[str, Any], timeout: float) -> None:
        self.needs("env")
        precision = "fp16" if self.device == "cuda" else "bf16"
        path = self.out / "bench_eval.json"
        path.unlink(missing_ok=True)
        options = {"--device": self.device, "--step": 1, "--precision": precision, "--json_out": path}
        cmd = [PY, "benchmarks/bench_eval.py", *self.profile.bench_eval_args, *argv(options)]
        log = self.logs / "bench_eval.log"
        result = run_command(cmd, log, timeout)
        require_success(result, "bench_eval.py", log)
        payload = json.loads(path.read_text(encoding="utf-8"))
        details.update(
            precision=precision, json=path.name, config=payload["config"], results=payload["results"]
        )


def check_checkpoint(path: Path, epochs: int) -> dict[str, Any]:
    """Load a step checkpoint as run.py writes it (weights only) and check its keys and epoch."""
    import torch

    if not path.is_file():
        raise StepFailed(f"the step checkpoint {path} was not written")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"epoch", "model_state", "optimizer_state", "scheduler_state", "best_score"} - set(checkpoint)
    if missing:
        raise StepFailed(f"{path} lacks {sorted(missing)}")
    if int(checkpoint["epoch"]) != epochs:
        raise StepFailed(f"{path} was saved at epoch {checkpoint['epoch']}, expected {epochs}")
    tensors = checkpoint["model_state"].values()
    if not all(bool(t.float().isfinite().all()) for t in tensors if t.is_floating_point()):
        raise StepFailed(f"{path} holds non-finite weights")
    return {
        "file": path.name,
        "mib": round(path.stat().st_size / common.MIB, 1),
        "epoch": checkpoint["epoch"],
    }


# ---------------------------------------------------------------------------------------------- figures
def summarize_bench_train(payload: dict[str, Any]) -> dict[str, Any]:
    """The figures of a bench_train.py JSON that the report shows."""
    rows = []
    for step in payload.get("steps", []):
        for variant, values in step.get("variants", {}).items():
            row = {"step": step["step"], "variant": variant}
            if "error" in values:
                row["error"] = values["error"]
            else:
                for key in ("img_per_s", "ms_per_iter", "peak_mib", "delta_mib", "tflop_s", "norm_layer"):
                    row[key] = values.get(key)
            if variant == "ours":
                row["time_ratio"] = step.get("time_ratio")
                row["mem_ratio"] = step.get("mem_ratio")
            rows.append(row)
    flops = {
        s: f.get("train_iteration") for s, f in payload.get("flops", {}).items() if f.get("train_iteration")
    }
    return {
        "config": payload.get("config", {}),
        "rows": rows,
        "flops_per_image": flops,
        "targets": payload.get("targets", []),
    }


def collect_figures(report: dict[str, Any]) -> dict[str, Any]:
    """Training figures of both precisions with the achieved fraction of the bf16 matmul rate, the
    evaluation figures, and each job's img/s with data loading next to bench_train's."""
    steps = {s["key"]: s for s in report["steps"]}
    matmul = steps.get("matmul", {}).get("details", {}).get("tflop_s")
    flops: dict[str, float] = {}
    for key in ("train_fp16", "train_bf16"):
        flops.update(steps.get(key, {}).get("details", {}).get("summary", {}).get("flops_per_image", {}))
    train = []
    for key in ("train_fp16", "train_bf16"):
        details = steps.get(key, {}).get("details", {})
        summary = details.get("summary")
        if not summary:
            continue
        for row in summary["rows"]:
            row = {
                **row,
                "precision": details["precision"],
                "crop": summary["config"].get("crop"),
                "batch": summary["config"].get("batch"),
            }
            per_image = flops.get(str(row["step"]))
            if per_image and row.get("img_per_s"):
                row["tflop_s"] = per_image * row["img_per_s"] / 1e12
                row["matmul_fraction"] = row["tflop_s"] / matmul if matmul else None
            train.append(row)
    feed = []
    for key, step in (("job0", 0), ("job1", 1)):
        details = steps.get(key, {}).get("details", {})
        loaded = details.get("img_s_with_loading")
        if loaded is None:
            continue
        bench = next(
            (
                r
                for r in train
                if r["step"] == step
                and r["variant"] == "ours"
                and r.get("img_per_s")
                and r["precision"] == "fp16"
                and r["crop"] == report.get("job", {}).get("crop")
                and r["batch"] == details.get("global_batch")
            ),
            None,
        )
        ratio = loaded / bench["img_per_s"] if bench else None
        feed.append(
            {
                "step": step,
                "img_s_with_loading": loaded,
                "bench_img_s": bench and bench["img_per_s"],
                "ratio": ratio,
                "keeps_up": None if ratio is None else ratio >= FEED_RATIO_OK,
            }
        )
    evaluation = steps.get("eval", {}).get("details", {}).get("results")
    return {"matmul_bf16_tflop_s": matmul, "train": train, "eval": evaluation, "feed": feed}


# ---------------------------------------------------------------------------------------------- Markdown
def _cell(value: Any) -> str:
    """A Markdown cell: floats with 3 significant digits below 1, 2 decimals up to 100, 1 above."""
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        size = abs(value)
        return f"{value:.3g}" if 0 < size < 1 else f"{value:.{1 if size >= 100 else 2}f}"
    return str(value).replace("|", "/").replace("\n", " ")


def _table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines + [""]


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report (rewritten after every step, like the JSON)."""
    env = report.get("environment") or {}
    gpus = env.get("gpus") or []
    device = ", ".join(g["name"] for g in gpus) or (f"CPU: {env['cpu']}" if env.get("cpu") else "?")
    lines = [
        f"# GPU check: {report['status'].upper()}",
        "",
        f"`{report['command']}`, mode **{report['mode']}**, {report['date']} (started {report['started']}), "
        f"{report.get('elapsed_s', 0):.0f} s of a {report['budget_s']:.0f} s budget. Device: **{device}**.",
        "",
        "## Steps",
        "",
    ]
    rows = []
    for s in report["steps"]:
        note = s.get("error") or s.get("reason") or ""
        rows.append(
            [
                s["title"],
                s["status"].upper() if s["status"] == "failed" else s["status"],
                s.get("seconds"),
                note.splitlines()[0][:200] if note else "",
            ]
        )
    lines += _table(["step", "status", "seconds", "note"], rows)
    if env:
        lines += ["## 1. Environment", ""]
        keys = (
            "gpus",
            "driver",
            "torch",
            "torch_cuda",
            "cudnn",
            "nccl",
            "nccl_available",
            "gloo_available",
            "inplace_abn",
            "cpu",
            "cpu_cores",
            "memory_gib",
            "python",
        )
        values = [[k, json.dumps(env.get(k)) if k == "gpus" else env.get(k)] for k in keys if k in env]
        lines += _table(["", "value"], values)
    lines += _render_tests(report) + _render_figures(report) + _render_job(report)
    failures = [s for s in report["steps"] if s.get("error")]
    if failures:
        lines += ["## Failures", ""]
        for s in failures:
            lines += [f"### {s['title']}", "", "```", s["error"].strip()[-3000:], "```", ""]
    return "\n".join(lines)


def _details(report: dict[str, Any], key: str) -> dict[str, Any]:
    return next((s.get("details", {}) for s in report["steps"] if s["key"] == key), {})


def _render_tests(report: dict[str, Any]) -> list[str]:
    tests = _details(report, "tests")
    if not tests.get("cases"):
        return []
    lines = [
        "## 2. Correctness tests",
        "",
        f"On `{tests.get('device')}`: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, "
        f"{tests.get('error', 0)} errors, {tests.get('skipped', 0)} skipped.",
        "",
    ]
    rows = [
        [
            c["test"].rsplit(".", 1)[-1],
            c["outcome"],
            c["seconds"],
            "; ".join(f"{k}={v}" for k, v in c["properties"].items()) or c["message"][:160],
        ]
        for c in tests["cases"]
    ]
    return lines + _table(["test", "outcome", "seconds", "measured / message"], rows)


def _render_figures(report: dict[str, Any]) -> list[str]:
    figures = report.get("figures") or {}
    lines = []
    if figures.get("train"):
        lines += [
            "## 3. Figures",
            "",
            f"bf16 matmul rate measured on this device: {_cell(figures.get('matmul_bf16_tflop_s'))} TFLOP/s.",
            "",
        ]
        rows = [
            [
                r["precision"],
                r["step"],
                r["variant"],
                r.get("img_per_s"),
                r.get("ms_per_iter"),
                r.get("peak_mib"),
                r.get("tflop_s"),
                r.get("matmul_fraction"),
                r.get("time_ratio"),
                r.get("mem_ratio"),
                r.get("error", ""),
            ]
            for r in figures["train"]
        ]
        crop = {r.get("crop") for r in figures["train"]}
        batch = {r.get("batch") for r in figures["train"]}
        lines += [
            f"Training iteration (`bench_train.py`, crop {'/'.join(map(str, crop))}, batch "
            f"{'/'.join(map(str, batch))}, channels_last; ratios ours / plain PyTorch):",
            "",
        ]
        lines += _table(
            [
                "precision",
                "step",
                "variant",
                "img/s",
                "ms/iter",
                "peak MiB",
                "TFLOP/s",
                "of bf16 matmul",
                "time ratio",
                "peak ratio",
                "error",
            ],
            rows,
        )
    evaluation = figures.get("eval")
    if evaluation:
        lines += ["Evaluation (`bench_eval.py`, step 1):", ""]
        lines += _table(
            ["img/s", "ms/batch", "metrics share", "mean IoU"],
            [
                [
                    evaluation.get("img_per_s"),
                    evaluation.get("ms_per_batch"),
                    evaluation.get("metrics_share"),
                    evaluation.get("mean_iou"),
                ]
            ],
        )
    return lines


def _render_job(report: dict[str, Any]) -> list[str]:
    rows = []
    for key in ("job0", "job1", "multi_train"):
        d = _details(report, key)
        if not d.get("nproc"):
            continue
        epochs = ", ".join(_cell(e["img_s"]) for e in d.get("epochs", []))
        rows.append(
            [
                key,
                d["nproc"],
                d.get("backend"),
                d.get("global_batch"),
                d.get("loader_workers"),
                d.get("precision"),
                epochs,
                d.get("img_s_with_loading"),
                d.get("mean_iou"),
                d.get("seconds_total"),
            ]
        )
    if not rows:
        return []
    lines = [
        "## 4. The real job (torchrun run.py, synthetic VOC 15-5, LGKD)",
        "",
        "img/s per epoch include data loading (the first epoch also worker start-up and cuDNN "
        "autotuning); the steady figure is the median of the later epochs.",
        "",
    ]
    lines += _table(
        [
            "run",
            "processes",
            "backend",
            "global batch",
            "loader workers / process",
            "precision",
            "img/s per epoch",
            "img/s steady",
            "mean IoU",
            "seconds",
        ],
        rows,
    )
    feed = (report.get("figures") or {}).get("feed") or []
    if any(f.get("ratio") is not None for f in feed):
        lines += _table(
            ["step", "job img/s (with loading)", "bench_train img/s", "ratio", "loading keeps up"],
            [[f["step"], f["img_s_with_loading"], f["bench_img_s"], f["ratio"], f["keeps_up"]] for f in feed],
        )
    test = _details(report, "multi_test")
    if test.get("row"):
        lines += [
            f"Step-1 checkpoint evaluated by {test['nproc']} processes: mean IoU {test['row'][-1]} "
            f"against {test['one_process_row'][-1]} in one process.",
            "",
        ]
    return lines


# ---------------------------------------------------------------------------------------------- main
def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the whole sequence at toy sizes on whatever device is present (CPU included)",
    )
    parser.add_argument("--out", default="results/gpu_check", help="folder of the reports and logs")
    parser.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="auto: CUDA when torch sees a GPU (the full check requires one)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="global time limit in seconds (default: 480 full, 900 smoke); steps that do not "
        "fit are reported as not run",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=PARTS,
        default=None,
        help="run only these parts (env always runs): tests, job (4), multi (5), figures (3)",
    )
    parser.add_argument(
        "--keep_work", action="store_true", help="keep --out/work (synthetic data, checkpoints, run logs)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = get_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.only:
        args.only = sorted(set(args.only) | {"env"})
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        common.emit_result(run_worker_job(json.loads(args.worker)))
        return 0
    # SIGTERM (a scheduler's or a wrapper's timeout) ends the check like Ctrl-C: the running command's
    # process group is stopped and the partial report is kept.
    signal.signal(signal.SIGTERM, _interrupt)
    return GpuCheck(args, SMOKE if args.smoke else FULL).run()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
