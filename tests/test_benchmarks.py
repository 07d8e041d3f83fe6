"""The benchmark scripts run end to end in ``--smoke`` mode and report what they promise.

Each script runs once as a subprocess (as ``make bench`` does); the human-readable table goes to stdout
and the JSON to ``--json_out``, so one run checks both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def run_smoke(script: str, tmp_path: Path, *extra: str) -> tuple[str, dict]:
    """Run ``benchmarks/<script> --smoke`` and return (stdout, parsed JSON)."""
    out = tmp_path / f"{Path(script).stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--json_out", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads(out.read_text())


def test_bench_train_smoke(tmp_path: Path) -> None:
    stdout, payload = run_smoke("bench_train.py", tmp_path, "--device", "cpu")
    for header in ("ms/iter", "img/s", "peak MiB", "time ratio", "peak ratio", "GFLOP/img"):
        assert header in stdout
    assert "ours" in stdout and "baseline" in stdout
    assert payload["benchmark"] == "train"
    assert {"date", "machine", "config", "flops", "steps", "targets"} <= payload.keys()
    assert payload["config"]["backbone"] == "resnet18" and payload["config"]["crop"] == 64
    assert [s["step"] for s in payload["steps"]] == [1, 0]
    for s in payload["steps"]:
        assert {"time_ratio", "mem_ratio", "delta_mem_ratio", "variants"} <= s.keys()
        for variant in ("ours", "baseline"):
            v = s["variants"][variant]
            assert "error" not in v, v
            assert v["img_per_s"] > 0 and v["ms_per_iter"] > 0 and v["peak_mib"] > 0
        assert s["variants"]["ours"]["norm_layer"] != s["variants"]["baseline"]["norm_layer"]
        assert s["time_ratio"] > 0
    step1, step0 = payload["steps"]
    # Step 1 runs the full LGKD objective with the old model, step 0 only the CE.
    assert {"ce", "kd", "pod"} <= set(step1["variants"]["ours"]["terms"])
    assert step1["variants"]["ours"]["uses_old_model"] is True
    assert step0["variants"]["ours"]["terms"] == ["ce"]
    flops = payload["flops"]["1"]
    assert flops["forward_backward"] > flops["forward"] > 0
    assert flops["train_iteration"] == pytest.approx(flops["forward_backward"] + flops["old_forward"])
    assert payload["flops"]["0"]["old_forward"] == 0


def test_bench_eval_smoke(tmp_path: Path) -> None:
    stdout, payload = run_smoke("bench_eval.py", tmp_path, "--device", "cpu")
    for header in ("img/s", "ms/batch", "update ms/batch", "metrics share %"):
        assert header in stdout
    assert "target metrics" in stdout
    assert payload["benchmark"] == "eval"
    results = payload["results"]
    for key in (
        "img_per_s",
        "ms_per_batch",
        "update_ms_per_batch",
        "metrics_share",
        "update_share",
        "micro_update_ms",
        "mean_iou",
    ):
        assert key in results
    assert results["img_per_s"] > 0
    assert 0 < results["update_share"] <= results["metrics_share"] < 1
    assert payload["targets"][0]["target"].startswith("metrics <")


def test_bench_data_smoke(tmp_path: Path) -> None:
    stdout, payload = run_smoke("bench_data.py", tmp_path)
    for header in ("JPEG decode", "DataLoader workers", "filtering scan", "masks/s"):
        assert header in stdout
    assert payload["benchmark"] == "data"
    serial = payload["serial"]
    for key in ("decode_img_per_s", "getitem_img_per_s", "transform_ms", "collate_ms_per_batch"):
        assert serial[key] > 0 or key == "transform_ms"
    assert [row["workers"] for row in payload["loader"]] == [0, 1]
    assert all(row["img_per_s"] > 0 for row in payload["loader"])
    scan = payload["scan"]
    assert scan["serial_masks_per_s"] > 0 and scan["parallel_masks_per_s"] > 0
    assert payload["config"]["dataset_len"] > 0


def test_bench_data_compares_with_training_json(tmp_path: Path) -> None:
    """``--train_json`` turns a bench_train result into a "pipeline feeds training" verdict."""
    train_json = tmp_path / "train.json"
    train_json.write_text(
        json.dumps(
            {
                "config": {"crop": 64, "batch": 2, "device": "cpu", "backbone": "resnet18"},
                "steps": [
                    {"step": 1, "variants": {"ours": {"img_per_s": 1.0}}},
                    {"step": 0, "variants": {"ours": {"img_per_s": 2.0}}},
                ],
            }
        )
    )
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_data
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    ref = bench_data.train_reference(str(train_json), 64)
    assert ref["crop_matches"] and ref["step1_img_per_s"] == 1.0 and ref["step0_img_per_s"] == 2.0


def test_bench_memory_smoke(tmp_path: Path) -> None:
    stdout, payload = run_smoke("bench_memory.py", tmp_path)
    assert "saved / baseline" in stdout
    rows = {(r["step"], r["variant"]): r for r in payload["results"]}
    assert set(rows) == {(s, v) for s in (1, 0) for v in ("ours", "ours --recompute_abn", "baseline")}
    for step in (1, 0):
        ours, recompute = rows[(step, "ours")], rows[(step, "ours --recompute_abn")]
        # Same network, same saved tensors as the plain-PyTorch baseline, up to the ABN's per-channel vectors.
        assert ours["ratio_to_baseline"] == pytest.approx(1.0, abs=0.01)
        # The output-only scheme drops the inputs of the leaky-activated in-place ABN layers.
        assert recompute["saved_bytes"] < ours["saved_bytes"] * 0.99
        assert ours["param_bytes"] == recompute["param_bytes"] > 0


def test_bench_pointcloud_smoke(tmp_path: Path) -> None:
    stdout, payload = run_smoke("bench_pointcloud.py", tmp_path)
    for header in ("points/s", "ms/iter", "CPU ms/iter", "peak MiB", "kNN MiB chunked", "kNN MiB unchunked"):
        assert header in stdout
    assert payload["benchmark"] == "pointcloud"
    assert {"date", "machine", "config", "results"} <= payload.keys()
    assert payload["config"]["device"] == "cpu" and payload["config"]["points"] == [128, 256]
    rows = {(r["points"], r["step"]): r for r in payload["results"]}
    assert set(rows) == {(p, s) for p in (128, 256) for s in (1, 0)}
    for (_, step), r in rows.items():
        assert "error" not in r, r
        assert r["points_per_s"] > 0 and r["ms_per_iter"] > 0 and r["peak_mib"] > 0
        # Step 1 distils per point with LGKD from the old model; step 0 is CE only.
        assert r["terms"] == (["ce", "kd"] if step == 1 else ["ce"]) and r["uses_old_model"] == (step == 1)
        # The smoke chunk (200 query points) is smaller than a batch of two clouds: the graph is chunked.
        assert r["knn_rows_mib"] < r["knn_unchunked_mib"]
