"""Faults of real ``python run.py`` processes: real signals (one process and torchrun), a real full file
system, a real second run of the same step. Slow: each case starts real processes."""

from __future__ import annotations

import os
import re
import shutil
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
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    make_synthetic = load_script_module("data/make_synthetic.py", "make_synthetic_faults")
    root = tmp_path_factory.mktemp("voc")
    make_synthetic.make_synthetic("voc", root, num_train=80, num_val=16, size=64, seed=5)
    return root


def args(root: Path, out: Path, **extra: str) -> list[str]:
    options = {
        "--name": "sig",
        "--backbone": "resnet18",
        "--crop_size": "48",
        "--batch_size": "4",
        "--epochs": "3",
        "--num_workers": "0",
        "--date": "s",
        **extra,
    }
    return run_argv(
        root, out, 0, options, ("--overlap", "--no_pretrained", "--no_progress", "--method", "FT")
    )


def start(argv: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*(launcher or [PY]), "run.py", *argv],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended early ({proc.returncode}):\n{out[-2000:]}\n{err[-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def log_has(out: Path, text: str, after: int = 0) -> bool:
    log = out / "logs" / "15-5s-voc" / "sig" / "step0" / "log.txt"
    return log.is_file() and text in log.read_text()[after:]


def saved_epoch(path: Path) -> int | None:
    try:
        return int(torch.load(path, weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_sigterm_and_ctrl_c_stop_with_one_line_and_the_run_resumes(voc_root, tmp_path):
    out = tmp_path / "out"
    last = out / "ckpt" / "15-5s-voc_sig_0_last.pth"
    argv = args(voc_root, out)

    # Before training: the lock exists once the handlers are installed and the checks run.
    proc = start(argv)
    wait_for((out / "ckpt" / "15-5s-voc_sig_0.lock").exists, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [
        "Stopped by SIGTERM before training started; rerun the same command to start the step again "
        "(nothing was saved yet)."
    ]

    # During the second epoch: the first one is saved.
    proc = start(argv)
    wait_for(lambda: log_has(out, "Epoch 1, lr"), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.fullmatch(
        r"Stopped by SIGTERM in epoch 2/3 (at iteration \d+/\d+|during validation|while saving its "
        r"checkpoint \(the previous one is intact\)); rerun the same command to resume from epoch 2/3 "
        rf"\(the state after 1 epoch is saved in {re.escape(str(last))}\)\.",
        lines[0],
    ), lines[0]
    assert saved_epoch(last) == 1 and no_temp_files(out)
    assert not (out / "ckpt" / "15-5s-voc_sig_0.lock").exists()

    # Ctrl-C (SIGINT) in the resumed run.
    offset = len((out / "logs" / "15-5s-voc" / "sig" / "step0" / "log.txt").read_text())
    proc = start(argv)
    wait_for(lambda: log_has(out, "Epoch 2, lr", offset), proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    stdout, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Resuming step 0" in stdout
    assert len(err.strip().splitlines()) == 1 and err.startswith("Stopped by SIGINT in epoch 3/3")
    assert saved_epoch(last) == 2 and no_temp_files(out)

    proc = start(argv)
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "Resuming step 0" in stdout and not last.exists()
    assert (out / "results" / "s_voc_15-5s_sig.csv").read_text().startswith("0,")


def test_a_second_real_run_of_the_same_step_is_refused(voc_root, tmp_path):
    out = tmp_path / "out"
    argv = args(voc_root, out, **{"--epochs": "20"})
    first = start(argv)
    try:
        wait_for(lambda: log_has(out, "Epoch 0, lr"), first)
        second = subprocess.run([PY, "run.py", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True)
        assert second.returncode == 2, second.stderr
        assert "already being trained by another run" in second.stderr
        assert f"pid {first.pid} " in second.stderr and "run.py" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 143


def test_torchrun_sigterm_reaches_every_rank(voc_root, tmp_path):
    out = tmp_path / "out"
    last = out / "ckpt" / "15-5s-voc_sig_0_last.pth"
    launcher = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    proc = start(args(voc_root, out, **{"--batch_size": "2"}), launcher)
    wait_for(lambda: log_has(out, "Epoch 1, lr"), proc)
    time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler does: every process of the job
    stdout, err = proc.communicate(timeout=180)
    assert proc.returncode != 0
    stopped = [line for line in (stdout + err).splitlines() if line.startswith("Stopped by SIGTERM")]
    assert len(stopped) == 1, stdout + err  # rank 0 reports; rank 1 stops silently
    # No traceback through this repository's code on any rank (torchrun's agent prints its own).
    assert not re.search(rf'File "{re.escape(str(ROOT))}/(?!\.venv)', err), err
    assert saved_epoch(last) == 1 and no_temp_files(out)


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m none /mnt"], capture_output=True
    )
    return probe.returncode == 0


def test_real_full_disk_keeps_the_previous_state(voc_root, tmp_path):
    """A real file system that fills up while a checkpoint is saved: a tmpfs (in a user mount namespace)
    with room for one checkpoint but not two; where that cannot be made, a file-size limit (EFBIG)."""
    out = tmp_path / "out"
    first = subprocess.run(
        [PY, "run.py", *args(voc_root, out, **{"--epochs": "1"})], cwd=ROOT, env=ENV, capture_output=True
    )
    assert first.returncode == 0, first.stderr[-3000:]
    # The resumable state after epoch 1 of a 2-epoch run.
    state = torch.load(out / "ckpt" / "15-5s-voc_sig_0.pth", weights_only=True)
    state["options"]["epochs"] = 2
    source = tmp_path / "last_after_epoch1.pth"
    torch.save(state, source)
    small = tmp_path / "small"
    small.mkdir()
    last = small / "15-5s-voc_sig_0_last.pth"
    run_py = [PY, "run.py", *args(voc_root, out, **{"--epochs": "2", "--checkpoint": str(small)})]
    if _can_mount_tmpfs():
        size = int(source.stat().st_size * 1.5)
        script = (
            f'mount -t tmpfs -o size={size} none {small} && cp {source} {last} && "$@"; rc=$?; '
            f"cmp -s {source} {last} && echo INTACT; ls -A {small}; exit $rc"
        )
        proc = subprocess.run(
            ["unshare", "-rm", "sh", "-c", script, "sh", *run_py],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
        )
        cause, listing = "No space left on device (ENOSPC)", proc.stdout.strip().splitlines()
        assert "INTACT" in listing  # the previous _last.pth is untouched
    else:
        import resource

        shutil.copy(source, last)

        def limit_file_size() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (source.stat().st_size // 2,) * 2)

        proc = subprocess.run(
            run_py, cwd=ROOT, env=ENV, capture_output=True, text=True, preexec_fn=limit_file_size
        )
        cause, listing = "File too large (EFBIG)", [p.name for p in small.iterdir()]
        assert last.read_bytes() == source.read_bytes()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert cause in proc.stderr and "Could not write the checkpoint" in proc.stderr, proc.stderr
    assert "is intact" in proc.stderr and "Traceback" not in proc.stderr
    assert [name for name in listing if name.endswith(".tmp")] == []
