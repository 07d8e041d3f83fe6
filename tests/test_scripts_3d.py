"""Point-cloud experiment scripts (scripts/s3dis, scripts/scannet): every run.py line resolves to the
3DPC-CISS settings.

As tests/test_scripts.py: each script runs with ``DRY_RUN=1`` and every printed torchrun line is parsed with
the real parser (and its record of explicit flags), resolved and validated as run.py does.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import pytest

from argparser import parse_command_line, validate_options
from tests.test_scripts import ROOT, run_py_args, run_script

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

# Written out from 3DPC-CISS's scripts/train_*_segmentor.sh (its settings) and tasks (both datasets).
# setting -> number of steps
SETTINGS = {
    "s3dis": {"12-1": 2, "10-3": 2, "8-5": 2, "8-1": 6},
    "scannet": {"19-1": 2, "17-3": 2, "15-5": 2, "15-1": 6},
}
# LGKD's (prev_kd, novel_kd) of later steps: the paper's VOC values of the analogous setting.
LGKD_WEIGHTS = {
    "12-1": (5.0, 0.5), "10-3": (5.0, 1.0), "8-5": (5.0, 1.0), "8-1": (1.0, 0.0),
    "19-1": (5.0, 0.5), "17-3": (5.0, 1.0), "15-5": (5.0, 1.0), "15-1": (1.0, 0.0),
}  # fmt: skip
# script prefix -> (--name, --method, options the method preset resolves to)
METHODS = {
    "ft": ("FT", "FT", {"lgkd": False, "unkd": False, "pseudo": None, "regularizer": None, "loss_kd": 0.0}),
    "lwf": ("LWF", "LWF", {"loss_kd": 100.0, "unkd": False}),
    "ewc": ("EWC", "EWC", {"regularizer": "ewc", "reg_importance": 100.0}),
    "mib": ("MiB", "MiB", {"unce": True, "unkd": True, "loss_kd": 10.0, "init_balanced": True}),
    "plop": ("PLOP", "PLOP", {"pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": True,
                              "init_balanced": True, "lgkd": False}),
    "lgkd": ("LGKD", "LGKD", {"pseudo": "entropy", "threshold": 0.001, "classif_adaptive_factor": True,
                              "init_balanced": True, "lgkd": True, "loss_kd": 1.0}),
}  # fmt: skip
# Every step of every script: the 3DPC-CISS protocol and no image-only option.
PROTOCOL = {
    "backbone": "dgcnn", "optimizer": "adam", "lr": 0.001, "epochs": 100, "lr_policy": "step",
    "lr_decay_epochs": 50, "lr_decay_factor": 0.5, "weight_decay": 1e-4, "num_points": 2048, "knn_k": 20,
    "xyz_norm": "block", "overlap": True, "opt_level": "O1", "no_pretrained": True, "pod": None,
    "pod_logits": False, "pod_options": None, "test": False, "ckpt": None, "step_ckpt": None,
}  # fmt: skip


def expected_scripts() -> dict[str, tuple[str, str, int, str, str, dict]]:
    """script -> (dataset, setting, steps, --name, --method, preset values)."""
    table = {}
    for dataset, settings in SETTINGS.items():
        for setting, steps in settings.items():
            for prefix, (name, method, preset) in METHODS.items():
                table[f"{dataset}/{prefix}_{setting}"] = (dataset, setting, steps, name, method, preset)
        table[f"{dataset}/joint"] = (dataset, "offline", 1, "Joint", "FT", METHODS["ft"][2])
    return table


EXPECTED = expected_scripts()


def dry_run(script: str, data_root: Path, **env: str) -> list[list[str]]:
    proc = run_script(script, data_root, DRY_RUN="1", PYTHON="false", **env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith("+ torchrun ") for line in lines), proc.stdout
    return [shlex.split(line[2:]) for line in lines]


def test_every_point_cloud_script_is_in_the_table():
    scripts = {
        str(p.relative_to(ROOT / "scripts").with_suffix(""))
        for folder in ("s3dis", "scannet")
        for p in (ROOT / "scripts" / folder).glob("*.sh")
    }
    assert scripts == set(EXPECTED)
    for script in scripts:
        text = (ROOT / "scripts" / f"{script}.sh").read_text()
        assert "set -euo pipefail" in text and "STEP0_CKPT" in text and "lib/pointcloud.sh" in text
        assert ("summarize_results" in text) == (not script.endswith("joint"))


@pytest.mark.parametrize("script", sorted(EXPECTED))
@pytest.mark.parametrize(("fold", "nb_gpu"), [("0", "1"), ("1", "2")])
def test_script_resolves_to_the_3dpc_ciss_settings(script, fold, nb_gpu, tmp_path):
    dataset, setting, steps, name, method, preset = EXPECTED[script]
    commands = dry_run(script, tmp_path, FOLD=fold, NB_GPU=nb_gpu)
    assert len(commands) == steps
    task = setting + ("_cv1" if fold == "1" else "")
    for step, argv in enumerate(commands):
        assert argv[:4] == ["torchrun", "--master_port", argv[2], f"--nproc_per_node={nb_gpu}"]
        opts, explicit = parse_command_line(run_py_args(argv))
        validate_options(opts, explicit)
        values = {
            **PROTOCOL, **preset, "dataset": dataset, "task": task, "name": name, "method": method,
            "step": step, "data_root": str(tmp_path),
            "batch_size": 32 // int(nb_gpu),  # the global batch of 3DPC-CISS
        }  # fmt: skip
        if method == "LGKD":
            values["prev_kd"], values["novel_kd"] = LGKD_WEIGHTS[setting] if step else (10.0, 2.0)
        for option, value in values.items():
            assert getattr(opts, option) == value, (script, step, option)


def test_fold_and_gpu_count_errors(tmp_path):
    proc = run_script("scannet/lgkd_15-5", tmp_path, DRY_RUN="1", FOLD="2")
    assert proc.returncode != 0 and "FOLD=2" in proc.stderr and proc.stdout == ""
    proc = run_script("s3dis/joint", tmp_path, DRY_RUN="1", NB_GPU="3")
    assert proc.returncode != 0 and "NB_GPU=3 does not divide the batch of 32" in proc.stderr


def test_missing_data_root_names_the_point_cloud_layout():
    proc = run_script("scannet/lgkd_15-5", None, DRY_RUN="1")
    assert (
        proc.returncode != 0 and "S3DIS/ or ScanNet/" in proc.stderr and "data/prepare_3d.py" in proc.stderr
    )


def test_step0_ckpt_and_extra_args(tmp_path):
    model = tmp_path / "base.pth"
    model.write_bytes(b"")
    commands = dry_run(
        "s3dis/lgkd_8-1", tmp_path, STEP0_CKPT=str(model), EXTRA_ARGS="--num_workers 2", NB_GPU="1"
    )
    first, second = (parse_command_line(run_py_args(argv))[0] for argv in commands[:2])
    assert (first.test, first.ckpt, second.step_ckpt, second.num_workers) == (True, str(model), str(model), 2)
