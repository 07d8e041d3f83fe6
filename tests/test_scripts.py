"""Experiment scripts (reference ``scripts/*/*.sh``): every run.py line parses and resolves to the reference
settings.

The scripts are run with ``DRY_RUN=1`` (they print their torchrun lines instead of running them); each
printed line is parsed with the real parser and ``modify_command_options``.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from argparser import get_argparser, modify_command_options, validate_options

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


@dataclass(frozen=True)
class Expected:
    """One reference script (``scripts/{voc,ade,cityscapesDomain}/*.sh``). Per-step values are (step 0, later
    steps)."""

    dataset: str
    task: str
    name: str
    method: str
    last_step: int
    batch_size: tuple[int, int]
    epochs: tuple[int, int]
    lr: tuple[float, float]
    later: dict = field(default_factory=dict)  # options of steps >= 1 (prev_kd / novel_kd, POD options)
    every: dict = field(default_factory=dict)  # options of every step


def pod_after(factor: float) -> dict:
    return {"switch": {"after": {"extra_channels": "sum", "factor": factor, "type": "local"}}}


CITY_POD = {"pod": "local", "pod_factor": 0.0001, "pod_logits": True}

# Written out from the reference's ``scripts/{voc,ade,cityscapesDomain}/*.sh``.
# fmt: off
EXPECTED = {
    # script: dataset, task, --name, --method, last step, batch size, epochs, lr (step 0, later steps)
    "voc/joint": Expected("voc", "offline", "Joint", "FT", 0, (8, 8), (30, 30), (0.01, 0.01)),
    "voc/lgkd_15-1": Expected("voc", "15-5s", "LGKD", "LGKD", 5, (8, 12), (30, 30), (0.01, 0.001),
                              later={"prev_kd": 1.0, "novel_kd": 0.0}),
    "voc/lgkd_15-5": Expected("voc", "15-5", "LGKD", "LGKD", 1, (8, 12), (30, 30), (0.01, 0.001),
                              later={"prev_kd": 5.0, "novel_kd": 1.0}),
    "voc/lgkd_19-1": Expected("voc", "19-1", "LGKD", "LGKD", 1, (12, 12), (30, 30), (0.01, 0.001),
                              later={"prev_kd": 5.0, "novel_kd": 0.5}),
    "voc/mib_15-1": Expected("voc", "15-5s", "MiB", "MiB", 5, (12, 12), (30, 30), (0.01, 0.001)),
    "voc/plop_10-1": Expected("voc", "10-1", "PLOP", "PLOP", 10, (8, 12), (30, 10), (0.01, 0.001)),
    "voc/plop_15-1": Expected("voc", "15-5s", "PLOP", "PLOP", 5, (8, 12), (30, 30), (0.01, 0.001)),
    "voc/plop_15-5": Expected("voc", "15-5", "PLOP", "PLOP", 1, (8, 12), (30, 30), (0.01, 0.001)),
    "voc/plop_19-1": Expected("voc", "19-1", "PLOP", "PLOP", 1, (12, 12), (30, 30), (0.01, 0.001)),
    "ade/joint": Expected("ade", "offline", "Joint", "FT", 0, (8, 8), (60, 60), (0.02, 0.02)),
    "ade/lgkd_ade_100-10": Expected("ade", "100-10", "LGKD", "LGKD", 5, (8, 8), (60, 60), (0.02, 0.002),
                                    later={"prev_kd": 1.0, "novel_kd": 1.0}),
    "ade/lgkd_ade_100-50": Expected("ade", "100-50", "LGKD", "LGKD", 1, (6, 6), (60, 60), (0.02, 0.002),
                                    later={"prev_kd": 1.0, "novel_kd": 20.0}),
    "ade/lgkd_ade_50": Expected("ade", "50", "LGKD", "LGKD", 2, (6, 6), (60, 60), (0.02, 0.002),
                                later={"prev_kd": 2.0, "novel_kd": 10.0}),
    "ade/plop_ade_100-10": Expected("ade", "100-10", "PLOP", "PLOP", 5, (8, 8), (60, 60), (0.02, 0.002)),
    "ade/plop_ade_100-5": Expected("ade", "100-5", "PLOP", "PLOP", 10, (6, 6), (60, 60), (0.02, 0.002)),
    "ade/plop_ade_100-50": Expected("ade", "100-50", "PLOP", "PLOP", 1, (6, 6), (60, 60), (0.02, 0.002)),
    "ade/plop_ade_50": Expected("ade", "50", "PLOP", "PLOP", 2, (6, 6), (60, 60), (0.02, 0.002)),
    "cityscapesDomain/mib_cityscapesDomain_1-1": Expected(
        "cityscapes_domain", "1-1", "MiB", "FT", 20, (12, 12), (50, 50), (0.01, 0.001),
        every={"loss_kd": 10.0}),
    "cityscapesDomain/plop_cityscapesDomain_1-1": Expected(
        "cityscapes_domain", "1-1", "PLOP", "FT", 20, (12, 12), (50, 50), (0.01, 0.001),
        every=CITY_POD, later={"pod_options": pod_after(0.001)}),
    "cityscapesDomain/plop_cityscapesDomain_11-1": Expected(
        "cityscapes_domain", "11-1", "PLOP", "FT", 10, (12, 12), (50, 50), (0.01, 0.001),
        every=CITY_POD, later={"pod_options": pod_after(0.0001)}),
}
# fmt: on

# What the method presets resolve to (they override the command line): reference
# ``argparser.py`` ``modify_command_options``.
PLOP_PRESET = {
    "lgkd": False,
    "pod": "local",
    "pod_factor": 0.01,
    "pod_options": pod_after(0.0005),
    "pseudo": "entropy",
    "threshold": 0.001,
    "classif_adaptive_factor": True,
    "init_balanced": True,
}
PRESET_VALUES = {
    ("PLOP", "voc"): PLOP_PRESET,
    ("PLOP", "ade"): PLOP_PRESET,  # the reference's PLOP ADE scripts use the VOC factors
    ("LGKD", "voc"): {**PLOP_PRESET, "lgkd": True, "loss_kd": 1.0},
    ("LGKD", "ade"): {**PLOP_PRESET, "lgkd": True, "loss_kd": 1.0, "pod_factor": 0.001,
                      "pod_options": pod_after(0.00001)},
    ("MiB", "voc"): {"unce": True, "unkd": True, "loss_kd": 10.0, "init_balanced": True},
    ("FT", "voc"): {"lgkd": False, "unkd": False, "init_balanced": False, "pseudo": None},
    ("FT", "ade"): {"lgkd": False, "unkd": False, "init_balanced": False, "pseudo": None},
    ("FT", "cityscapes_domain"): {"lgkd": False, "unkd": False, "init_balanced": False, "pseudo": None},
}  # fmt: skip


def run_script(
    script: str, data_root: Path | None, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess:
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), "LC_ALL": "C"}
    if data_root is not None:
        base["DATA_ROOT"] = str(data_root)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / f"{script}.sh")],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def dry_run(script: str, data_root: Path, cwd: Path | None = None, **env: str) -> list[list[str]]:
    """Run ``script`` with DRY_RUN=1 and return the argv of every printed torchrun line."""
    env = {"NB_GPU": "2", **env}
    proc = run_script(script, data_root, cwd, DRY_RUN="1", PYTHON="false", **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ torchrun ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def run_py_args(argv: list[str]) -> list[str]:
    return argv[argv.index("run.py") + 1 :]


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_script_resolves_to_reference_settings(script, tmp_path):
    expected = EXPECTED[script]
    commands = dry_run(script, tmp_path)
    assert len(commands) == expected.last_step + 1
    ports = {argv[argv.index("--master_port") + 1] for argv in commands}
    assert len(ports) == 1 and 9000 <= int(ports.pop()) < 10000
    checkpoint = "checkpoints/step/" if expected.dataset == "cityscapes_domain" else "checkpoints/step"
    today = datetime.date.today().isoformat()
    parser = get_argparser()
    for step, argv in enumerate(commands):
        assert argv[:4] == ["torchrun", "--master_port", argv[2], "--nproc_per_node=2"]
        assert argv[4] == "run.py"
        opts = modify_command_options(parser.parse_args(run_py_args(argv)))
        validate_options(opts)
        later = int(step > 0)
        values = {
            "dataset": expected.dataset, "task": expected.task, "name": expected.name,
            "method": expected.method, "step": step, "batch_size": expected.batch_size[later],
            "epochs": expected.epochs[later], "lr": expected.lr[later], "overlap": True, "opt_level": "O1",
            "checkpoint": checkpoint, "date": today, "data_root": str(tmp_path), "test": False, "ckpt": None,
            "step_ckpt": None, "prev_kd": 10.0, "novel_kd": 2.0, "pod_options": None,
            **PRESET_VALUES[expected.method, expected.dataset], **expected.every,
            **(expected.later if step else {}),
        }  # fmt: skip
        for option, value in values.items():
            assert getattr(opts, option) == value, (script, step, option)


def test_every_script_is_covered():
    scripts = {str(p.relative_to(ROOT / "scripts").with_suffix("")) for p in ROOT.glob("scripts/*/*.sh")}
    scripts -= {"lib/common"}
    assert scripts >= set(EXPECTED)
    for script in EXPECTED:
        text = (ROOT / "scripts" / f"{script}.sh").read_text()
        assert "set -euo pipefail" in text and "STEP0_CKPT" in text
        # average_csv.py summarises incremental runs only.
        assert ("summarize_results" in text) == (not script.endswith("joint"))


def test_missing_data_root_is_a_clear_error():
    proc = run_script("voc/lgkd_15-1", None, DRY_RUN="1")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert "DATA_ROOT is not set" in proc.stderr and "data/download_voc.sh" in proc.stderr
    proc = run_script("ade/plop_ade_50", Path("/nonexistent/data/root"), DRY_RUN="1")
    assert proc.returncode != 0 and "not a directory" in proc.stderr


def test_step0_ckpt_skips_training_of_step_zero(tmp_path):
    model = tmp_path / "15-x-voc.pth"
    model.write_bytes(b"")
    # A relative path is resolved against the caller's directory (the scripts cd to the repository root).
    commands = dry_run("voc/lgkd_15-1", tmp_path, cwd=tmp_path, STEP0_CKPT="15-x-voc.pth")
    parser = get_argparser()
    steps = [parser.parse_args(run_py_args(argv)) for argv in commands]
    assert (steps[0].test, steps[0].ckpt, steps[0].step_ckpt) == (True, str(model), None)
    assert (steps[1].test, steps[1].ckpt, steps[1].step_ckpt) == (False, None, str(model))
    assert all((s.test, s.ckpt, s.step_ckpt) == (False, None, None) for s in steps[2:])
    proc = run_script("voc/lgkd_15-1", tmp_path, DRY_RUN="1", STEP0_CKPT=str(tmp_path / "missing.pth"))
    assert proc.returncode != 0 and "STEP0_CKPT" in proc.stderr


def test_extra_args_and_gpu_count(tmp_path):
    commands = dry_run("voc/plop_15-5", tmp_path, EXTRA_ARGS="--num_workers 2  --no_pretrained")
    for argv in commands:
        opts = get_argparser().parse_args(run_py_args(argv))
        assert opts.num_workers == 2 and opts.no_pretrained is True
    proc = run_script("voc/plop_15-5", tmp_path, DRY_RUN="1", CUDA_VISIBLE_DEVICES="0,1,3")
    assert "--nproc_per_node=3" in proc.stdout
    proc = run_script("voc/plop_15-5", tmp_path, DRY_RUN="1", NB_GPU="two")
    assert proc.returncode != 0 and "NB_GPU" in proc.stderr


def test_real_run_order_with_fake_launcher(tmp_path):
    """Without DRY_RUN: one torchrun per step, then average_csv.py. A rerun continues the experiment, so
    the results CSV is kept (the reference deleted it first); FRESH=1 deletes it before the first step."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    results = tmp_path / "results"
    results.mkdir()
    stale = results / f"{datetime.date.today().isoformat()}_voc_19-1_LGKD.csv"
    fake = bin_dir / "torchrun"
    fake.write_text(f'#!/usr/bin/env bash\necho "torchrun $* stale=$(ls {results} | wc -l)" >> {log}\n')
    fake.chmod(0o755)
    fake_python = bin_dir / "fakepython"
    fake_python.write_text(f'#!/usr/bin/env bash\necho "python $*" >> {log}\n')
    fake_python.chmod(0o755)
    for fresh, expected_stale in (("0", "stale=1"), ("1", "stale=0")):
        stale.write_text("old rows\n")
        log.unlink(missing_ok=True)
        proc = run_script(
            "voc/lgkd_19-1",
            tmp_path,
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            NB_GPU="1",
            RESULTS_DIR=str(results),
            CHECKPOINT_DIR=str(tmp_path / "ckpt"),
            PYTHON=str(fake_python),
            FRESH=fresh,
        )
        assert proc.returncode == 0, proc.stderr
        calls = log.read_text().splitlines()
        assert len(calls) == 3
        assert all(call.startswith("torchrun ") and call.endswith(expected_stale) for call in calls[:2])
        assert f"--results_dir {results}" in calls[0]
        assert f"--checkpoint {tmp_path / 'ckpt'}" in calls[0]
        assert calls[2] == f"python average_csv.py {stale}"


def test_pod_options_are_valid_json_in_scripts():
    for script in ("plop_cityscapesDomain_1-1", "plop_cityscapesDomain_11-1"):
        text = (ROOT / "scripts" / "cityscapesDomain" / f"{script}.sh").read_text()
        value = next(line for line in text.splitlines() if line.startswith("POD_OPTIONS="))
        assert (
            json.loads(shlex.split(value.removeprefix("POD_OPTIONS="))[0])["switch"]["after"]["type"]
            == "local"
        )
