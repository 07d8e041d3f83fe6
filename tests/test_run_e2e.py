"""End to end: run.py on a synthetic VOC tree, one process and torchrun on gloo, kill -9 and resume.

These run the real command line as users do (subprocesses), with a tiny backbone and crop.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, free_port, load_script_module, run_argv

pytestmark = pytest.mark.slow

PY = sys.executable


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    make_synthetic = load_script_module("data/make_synthetic.py", "make_synthetic_e2e")
    root = tmp_path_factory.mktemp("voc")
    make_synthetic.make_synthetic("voc", root, num_train=80, num_val=24, size=64, seed=3)
    return root


def common_args(root: Path, out: Path, name: str, step: int, **extra: str) -> list[str]:
    options = {
        "--name": name,
        "--backbone": "resnet18",
        "--crop_size": "48",
        "--batch_size": "4",
        "--epochs": "2",
        "--lr": "0.01" if step == 0 else "0.001",
        "--num_workers": "0",
        "--date": "e2e",
        "--random_seed": "7",
        **extra,
    }
    method = ("--method", "LGKD", "--prev_kd", "1", "--novel_kd", "0") if step > 0 else ("--method", "LGKD")
    return run_argv(
        root,
        out,
        step,
        options,
        (*method, "--overlap", "--no_pretrained", "--no_progress", "--deterministic"),
    )


def run_cmd(
    args: list[str], launcher: list[str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    cmd = [*(launcher or [PY]), "run.py", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    )
    return proc


def read_rows(out: Path, name: str) -> list[list[str]]:
    with open(out / "results" / f"e2e_voc_15-5s_{name}.csv") as f:
        return list(csv.reader(f))


def test_two_steps_single_process(voc_root: Path, tmp_path: Path) -> None:
    for step in (0, 1):
        run_cmd(common_args(voc_root, tmp_path, "single", step))
    rows = read_rows(tmp_path, "single")
    assert [r[0] for r in rows] == ["0", "1"]
    assert all(len(r) == 1 + 21 + 1 for r in rows)
    # Step 0 knows 16 classes: classes 16..20 are "x" (not learned yet); step 1 knows 17.
    assert rows[0][17:22] == ["x"] * 5 and rows[1][18:22] == ["x"] * 4

    ckpt = torch.load(tmp_path / "ckpt" / "15-5s-voc_single_1.pth", weights_only=True)
    assert set(ckpt) >= {
        "epoch",
        "model_state",
        "optimizer_state",
        "scheduler_state",
        "best_score",
        "trainer_state",
    }
    assert all(k.startswith("module.") for k in ckpt["model_state"])
    assert ckpt["model_state"]["module.cls.1.weight"].shape == (1, 256, 1, 1)
    assert ckpt["epoch"] == 2
    assert not (tmp_path / "ckpt" / "15-5s-voc_single_1_last.pth").exists()

    # The checkpoint reloads with --test and gives the same mIoU as the training run's row.
    test_out = tmp_path / "retest"
    args = common_args(voc_root, tmp_path, "single", 1)
    args += ["--test", "--ckpt", str(tmp_path / "ckpt" / "15-5s-voc_single_1.pth")]
    args[args.index("--results_dir") + 1] = str(test_out / "results")
    run_cmd(args)
    retest = read_rows(test_out, "single")
    assert retest[0][-1] == pytest.approx(rows[1][-1]) or float(retest[0][-1]) == pytest.approx(
        float(rows[1][-1])
    )

    summary = subprocess.run(
        [PY, "average_csv.py", str(tmp_path / "results" / "e2e_voc_15-5s_single.csv")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for label in ("IoU BG", "mIoU old", "mIoU new", "mIoU all"):
        assert label in summary
    opts_json = tmp_path / "logs" / "15-5s-voc" / "single" / "step1" / "opts.json"
    assert opts_json.is_file() and (opts_json.parent / "log.txt").is_file()


def test_two_steps_torchrun_gloo(voc_root: Path, tmp_path: Path) -> None:
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    for step in (0, 1):
        run_cmd(common_args(voc_root, tmp_path, "ddp", step, **{"--batch_size": "2"}), launcher=launcher)
    rows = read_rows(tmp_path, "ddp")
    assert [r[0] for r in rows] == ["0", "1"]
    ckpt = torch.load(tmp_path / "ckpt" / "15-5s-voc_ddp_1.pth", weights_only=True)
    assert all(k.startswith("module.") for k in ckpt["model_state"])
    # The DDP checkpoint loads into a single-process evaluation.
    args = common_args(voc_root, tmp_path, "ddp", 1) + ["--test"]
    args[args.index("--results_dir") + 1] = str(tmp_path / "retest")
    run_cmd(args)


def _saved_epochs(last_ckpt: Path) -> int:
    """Finished epochs in a resumable checkpoint (0 if absent or being replaced). run.py writes it when
    training starts (epoch 0), then after every epoch."""
    try:
        return int(torch.load(last_ckpt, weights_only=True, mmap=True)["epoch"])
    except Exception:
        return 0


def _run_until_killed(args: list[str], last_ckpt: Path) -> None:
    """Start run.py, SIGKILL it as soon as the first epoch's resumable checkpoint exists."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [PY, "run.py", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while _saved_epochs(last_ckpt) < 1:
        assert proc.poll() is None, "run finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_and_resume_matches_uninterrupted(voc_root: Path, tmp_path: Path) -> None:
    # Step 0 shared by both chains, then step 1 uninterrupted vs killed-and-resumed.
    run_cmd(common_args(voc_root, tmp_path, "base", 0, **{"--epochs": "1"}))
    step0 = str(tmp_path / "ckpt" / "15-5s-voc_base_0.pth")
    extra = {"--epochs": "3", "--step_ckpt": step0}
    run_cmd(common_args(voc_root, tmp_path, "straight", 1, **extra))

    resumed_args = common_args(voc_root, tmp_path, "resumed", 1, **extra)
    _run_until_killed(resumed_args, tmp_path / "ckpt" / "15-5s-voc_resumed_1_last.pth")
    proc = run_cmd(resumed_args)
    assert "Resuming step 1" in proc.stdout + proc.stderr
    run_cmd(resumed_args)  # a rerun after success must not add a second row for step 1

    straight, resumed = read_rows(tmp_path, "straight"), read_rows(tmp_path, "resumed")
    assert len(resumed) == 1
    assert resumed[0] == straight[0]
    a = torch.load(tmp_path / "ckpt" / "15-5s-voc_straight_1.pth", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "ckpt" / "15-5s-voc_resumed_1.pth", weights_only=True)["model_state"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(voc_root: Path, tmp_path: Path) -> None:
    run_cmd(common_args(voc_root, tmp_path, "nan", 0, **{"--epochs": "1"}))
    best = tmp_path / "ckpt" / "15-5s-voc_nan_0.pth"
    before = best.read_bytes()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    args = common_args(voc_root, tmp_path, "nan", 0, **{"--lr": "1e30"}) + ["--no_resume"]
    proc = subprocess.run(
        [PY, "run.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "Non-finite loss" in proc.stderr and "iteration" in proc.stderr and "CE=" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert best.read_bytes() == before


def _worker_pids(name: str) -> dict[int, int]:
    """pid of each torchrun worker (by LOCAL_RANK) whose command line holds --name ``name``."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"run.py" not in cmdline or name.encode() not in cmdline:
            continue
        local = [e for e in environ if e.startswith(b"LOCAL_RANK=")]
        if local:
            pids[int(local[0].split(b"=")[1])] = int(entry.name)
    return pids


def test_torchrun_restarts_a_killed_worker_and_resumes(voc_root: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    launcher = [
        PY,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--max-restarts=1",
        f"--master_port={free_port()}",
    ]
    args = common_args(voc_root, tmp_path, "elastic", 0, **{"--batch_size": "2", "--epochs": "3"})
    proc = subprocess.Popen(
        [*launcher, "run.py", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = tmp_path / "ckpt" / "15-5s-voc_elastic_0_last.pth"
    deadline = time.time() + 300
    while _saved_epochs(last) < 1:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    pids = _worker_pids("elastic")
    assert 1 in pids, pids
    os.kill(pids[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-5000:]
    assert "Resuming step 0" in out
    rows = read_rows(tmp_path, "elastic")
    assert [r[0] for r in rows] == ["0"]
    assert torch.load(tmp_path / "ckpt" / "15-5s-voc_elastic_0.pth", weights_only=True)["epoch"] == 3
