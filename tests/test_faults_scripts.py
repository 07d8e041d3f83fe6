"""Experiment scripts after a crash: a rerun continues the experiment and keeps its results CSV and date,
FRESH=1 starts over after checking the launcher, and torchrun is found in .venv without activating it.

The fast cases run the real scripts with a fake ``torchrun`` that records its command line; the slow case
runs a real two-step experiment on synthetic data, stops it with SIGTERM in step 1 and reruns it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, load_script_module

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# The fast cases run the scripts with a `date` that always answers TODAY, so a run across midnight
# cannot see two dates; the slow case reads the date the script recorded.
TODAY = "2026-03-14"
BASE_PATH = "/usr/bin:/bin"  # no torchrun here


def fake_repo(tmp_path: Path, with_venv: bool = True) -> tuple[Path, Path]:
    """The scripts in a copy of the repository whose .venv/bin holds a fake torchrun and python; returns
    (repository, calls log)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts", ignore=shutil.ignore_patterns("*.py"))
    log = tmp_path / "calls.log"
    fake_bin = repo / "fake-bin"
    fake_bin.mkdir()
    (fake_bin / "date").write_text(
        f'#!/bin/sh\nif [ "$1" = "+%Y-%m-%d" ]; then echo {TODAY}; else exec /bin/date "$@"; fi\n'
    )
    (fake_bin / "date").chmod(0o755)
    if with_venv:
        venv = repo / ".venv" / "bin"
        venv.mkdir(parents=True)
        for tool in ("torchrun", "python"):
            (venv / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\n')
            (venv / tool).chmod(0o755)
    return repo, log


def run(repo: Path, script: str, data: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(repo / "scripts" / f"{script}.sh")],
        env={
            "PATH": f"{repo / 'fake-bin'}{os.pathsep}{BASE_PATH}",
            "HOME": "/tmp",
            "LC_ALL": "C",
            "DATA_ROOT": str(data),
            "NB_GPU": "1",
            **env,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def option(call: str, flag: str) -> str:
    words = call.split()
    return words[words.index(flag) + 1]


def test_torchrun_and_python_come_from_the_venv_without_activating_it(tmp_path):
    repo, log = fake_repo(tmp_path)
    proc = run(repo, "voc/lgkd_19-1", tmp_path)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["torchrun", "torchrun", "python"]
    assert calls[2] == f"python average_csv.py results/{TODAY}_voc_19-1_LGKD.csv"


def test_missing_torchrun_is_an_error_before_anything_is_deleted(tmp_path):
    repo, _ = fake_repo(tmp_path, with_venv=False)
    ckpt = repo / "checkpoints" / "step"
    ckpt.mkdir(parents=True)
    (ckpt / "19-1-voc_LGKD_0.pth").write_bytes(b"model")
    csv = repo / "results" / f"{TODAY}_voc_19-1_LGKD.csv"
    csv.parent.mkdir()
    csv.write_text("0,0.5\n")
    proc = run(repo, "voc/lgkd_19-1", tmp_path, FRESH="1")
    assert proc.returncode != 0
    assert "torchrun was not found" in proc.stderr and ". .venv/bin/activate" in proc.stderr
    assert (ckpt / "19-1-voc_LGKD_0.pth").exists() and csv.exists()


def test_rerun_keeps_the_csv_and_the_experiment_date(tmp_path):
    """A crash in step 1 on an earlier day: the rerun writes into that day's CSV, which is kept."""
    repo, log = fake_repo(tmp_path)
    ckpt = repo / "checkpoints" / "step"
    ckpt.mkdir(parents=True)
    (ckpt / "19-1-voc_LGKD_0.pth").write_bytes(b"model")
    (ckpt / "19-1-voc_LGKD_1_last.pth").write_bytes(b"state")
    (ckpt / "19-1-voc_LGKD.date").write_text("2020-01-31\n")
    csv = repo / "results" / "2020-01-31_voc_19-1_LGKD.csv"
    csv.parent.mkdir()
    csv.write_text("0,0.5\n")
    proc = run(repo, "voc/lgkd_19-1", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "continuing 19-1-voc LGKD, started on 2020-01-31" in proc.stderr
    calls = log.read_text().splitlines()
    assert [option(c, "--date") for c in calls[:2]] == ["2020-01-31"] * 2
    assert calls[2] == "python average_csv.py results/2020-01-31_voc_19-1_LGKD.csv"
    assert csv.read_text() == "0,0.5\n"
    # DRY_RUN shows the same dates and touches nothing.
    dry = run(repo, "voc/lgkd_19-1", tmp_path, DRY_RUN="1")
    assert dry.returncode == 0 and "--date 2020-01-31" in dry.stdout


def test_an_experiment_that_has_not_started_gets_todays_date(tmp_path):
    repo, log = fake_repo(tmp_path)
    ckpt = repo / "checkpoints" / "step"
    ckpt.mkdir(parents=True)
    (ckpt / "19-1-voc_LGKD.date").write_text("2020-01-31\n")  # stale: no checkpoint of it is left
    (ckpt / "19-1-voc_LGKD_2_0.pth").write_bytes(b"another experiment, LGKD_2")
    assert run(repo, "voc/lgkd_19-1", tmp_path).returncode == 0
    assert option(log.read_text().splitlines()[0], "--date") == TODAY
    assert (ckpt / "19-1-voc_LGKD.date").read_text().strip() == TODAY


def test_fresh_deletes_exactly_this_experiment(tmp_path):
    repo, log = fake_repo(tmp_path)
    ckpt = repo / "checkpoints" / "step"
    ckpt.mkdir(parents=True)
    mine = ["19-1-voc_LGKD_0.pth", "19-1-voc_LGKD_1_last.pth", "19-1-voc_LGKD_1.pth", "19-1-voc_LGKD.date"]
    others = [
        "19-1-voc_LGKD_2_0.pth",
        "19-1-voc_LGKDx_0.pth",
        "15-5s-voc_LGKD_0.pth",
        "19-1-voc_LGKD_0.pth.bak",
    ]
    for name in mine + others:
        (ckpt / name).write_bytes(b"x")
    (ckpt / "19-1-voc_LGKD.date").write_text("2020-01-31\n")
    results = repo / "results"
    results.mkdir()
    (results / f"{TODAY}_voc_19-1_LGKD.csv").write_text("0,0.1\n")
    (results / "2020-01-31_voc_19-1_LGKD.csv").write_text("0,0.2\n")  # an earlier experiment's table
    proc = run(repo, "voc/lgkd_19-1", tmp_path, FRESH="1")
    assert proc.returncode == 0, proc.stderr
    assert "FRESH=1: deleted" in proc.stderr
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*others, "19-1-voc_LGKD.date"])
    assert (ckpt / "19-1-voc_LGKD.date").read_text().strip() == TODAY
    assert sorted(p.name for p in results.iterdir()) == ["2020-01-31_voc_19-1_LGKD.csv"]
    assert option(log.read_text().splitlines()[0], "--date") == TODAY


def test_fresh_is_refused_while_a_step_of_the_experiment_is_training(tmp_path):
    if shutil.which("flock") is None:
        pytest.skip("needs flock(1)")
    repo, _ = fake_repo(tmp_path)
    ckpt = repo / "checkpoints" / "step"
    ckpt.mkdir(parents=True)
    (ckpt / "19-1-voc_LGKD_0.pth").write_bytes(b"model")
    lock = ckpt / "19-1-voc_LGKD_1.lock"
    with open(lock, "w") as handle:
        handle.write('{"pid": 1234}')
        handle.flush()
        fcntl.flock(handle, fcntl.LOCK_EX)
        proc = run(repo, "voc/lgkd_19-1", tmp_path, FRESH="1")
    assert proc.returncode != 0 and "still training" in proc.stderr and '"pid": 1234' in proc.stderr
    assert (ckpt / "19-1-voc_LGKD_0.pth").exists()


def test_step0_evaluation_is_skipped_once_its_row_exists(tmp_path):
    repo, log = fake_repo(tmp_path)
    model = tmp_path / "15-x-voc.pth"
    model.write_bytes(b"released")
    ckpt = repo / "checkpoints" / "step"
    ckpt.mkdir(parents=True)
    (ckpt / "15-5s-voc_LGKD_1.pth").write_bytes(b"step 1")
    (ckpt / "15-5s-voc_LGKD.date").write_text("2020-01-31\n")
    csv = repo / "results" / "2020-01-31_voc_15-5s_LGKD.csv"
    csv.parent.mkdir()
    csv.write_text("0,0.5\n1,0.4\n")
    proc = run(repo, "voc/lgkd_15-1", tmp_path, STEP0_CKPT=str(model))
    assert proc.returncode == 0, proc.stderr
    assert "step 0: STEP0_CKPT already evaluated" in proc.stderr
    torchruns = [c for c in log.read_text().splitlines() if c.startswith("torchrun")]
    assert [option(c, "--step") for c in torchruns] == ["1", "2", "3", "4", "5"]
    assert option(torchruns[0], "--step_ckpt") == str(model)


# ---------------------------------------------------------------------------------------------- real
@pytest.mark.slow
def test_real_experiment_continues_after_sigterm_in_step_1(tmp_path):
    """voc/lgkd_19-1.sh on synthetic data with a tiny model: stopped by SIGTERM (to every process, as a
    scheduler does) while step 1 trains, then rerun: step 0 is not retrained, step 1 resumes, the CSV
    keeps step 0's row and gets step 1's, and the summary runs."""
    make_synthetic = load_script_module("data/make_synthetic.py", "make_synthetic_scripts")
    data = make_synthetic.make_synthetic("voc", tmp_path / "voc", num_train=60, num_val=12, size=64, seed=2)
    ckpt, results = tmp_path / "ckpt", tmp_path / "results"
    extra = (
        "--backbone resnet18 --no_pretrained --crop_size 48 --batch_size 4 --epochs 3 --num_workers 0 "
        f"--device cpu --no_progress --cache_dir {tmp_path / 'cache'} --logdir {tmp_path / 'logs'}"
    )
    env = {
        "PATH": BASE_PATH,  # torchrun and python from the repository's .venv, not activated
        "HOME": os.environ.get("HOME", "/tmp"),
        "DATA_ROOT": str(data),
        "NB_GPU": "1",
        "CHECKPOINT_DIR": str(ckpt),
        "RESULTS_DIR": str(results),
        "EXTRA_ARGS": extra,
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
    }
    if not (ROOT / ".venv" / "bin" / "torchrun").exists():
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{BASE_PATH}"
    script = ["bash", str(ROOT / "scripts" / "voc" / "lgkd_19-1.sh")]
    proc = subprocess.Popen(script, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    last = ckpt / "19-1-voc_LGKD_1_last.pth"
    deadline = time.time() + 600
    while not _saved(last):
        assert proc.poll() is None, proc.communicate()[0][-4000:]
        assert time.time() < deadline
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0 and "Stopped by SIGTERM" in output
    step0 = ckpt / "19-1-voc_LGKD_0.pth"
    stamp = step0.stat().st_mtime_ns
    started = (ckpt / "19-1-voc_LGKD.date").read_text().strip()
    csv = results / f"{started}_voc_19-1_LGKD.csv"
    assert csv.read_text().startswith("0,") and len(csv.read_text().splitlines()) == 1

    # The rerun (another day: the recorded date names the CSV).
    (ckpt / "19-1-voc_LGKD.date").write_text("2020-01-31\n")
    csv = csv.rename(results / "2020-01-31_voc_19-1_LGKD.csv")
    row0 = csv.read_text()
    rerun = subprocess.run(script, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "Step 0 already finished" in rerun.stdout and "Resuming step 1" in rerun.stdout
    assert step0.stat().st_mtime_ns == stamp
    lines = csv.read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == ["0", "1"] and lines[0] + "\n" == row0
    assert "mIoU all" in rerun.stdout
    assert not last.exists() and not list(tmp_path.glob("ckpt/*.tmp"))


def _saved(path: Path) -> bool:
    try:
        return int(torch.load(path, weights_only=True, mmap=True)["epoch"]) >= 1
    except Exception:
        return False
