"""benchmarks/gpu_check.py: step isolation, time budget, timeouts, incremental reports, parsers, and the
whole ``--smoke`` sequence on the CPU (slow; CI runs it through ``make test-slow``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, load_script_module

gpu_check = load_script_module("benchmarks/gpu_check.py", "gpu_check_under_test")


def make_check(tmp_path: Path, *extra: str) -> object:
    args = gpu_check.parse_args(["--smoke", "--out", str(tmp_path / "report"), *extra])
    return gpu_check.GpuCheck(args, gpu_check.SMOKE)


def read_report(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "report" / gpu_check.REPORT_JSON).read_text())


# ---------------------------------------------------------------------------------------------- steps
def test_each_step_is_isolated_and_the_report_is_rewritten_after_it(tmp_path: Path) -> None:
    check = make_check(tmp_path)

    def fails(details: dict, timeout: float) -> None:
        details["measured"] = 1.5  # what a step found before failing stays in the report
        raise gpu_check.StepFailed("the device returned NaN")

    def crashes(details: dict, timeout: float) -> None:
        raise KeyError("a bug in the step")

    def skips(details: dict, timeout: float) -> None:
        raise gpu_check.StepSkipped("one GPU visible")

    def passes(details: dict, timeout: float) -> None:
        assert 0 < timeout <= gpu_check.SMOKE.timeouts["tests"]
        details["ok"] = True

    check.run_step("env", "env", "first", fails)
    on_disk = read_report(tmp_path)  # written before the next step starts
    assert on_disk["steps"][0]["status"] == "failed" and on_disk["steps"][0]["details"] == {"measured": 1.5}
    assert "the device returned NaN" in (tmp_path / "report" / gpu_check.REPORT_MD).read_text()
    check.run_step("matmul", "figures", "second", crashes)
    check.run_step("multi_train", "multi", "third", skips)
    check.run_step("tests", "tests", "fourth", passes)
    steps = read_report(tmp_path)["steps"]
    assert [s["status"] for s in steps] == ["failed", "failed", "skipped", "passed"]
    assert "KeyError" in steps[1]["error"] and "a bug in the step" in steps[1]["error"]
    assert steps[2]["reason"] == "one GPU visible"
    assert steps[3]["details"] == {"ok": True}


def test_steps_that_do_not_fit_the_budget_are_not_run_and_fail_the_check(tmp_path: Path) -> None:
    check = make_check(tmp_path)
    check.deadline = time.monotonic() + gpu_check.MIN_STEP_SECONDS / 2
    ran = []
    check.run_step("env", "env", "late", lambda details, timeout: ran.append(timeout))
    record = read_report(tmp_path)["steps"][0]
    assert not ran and record["status"] == "not run" and "--budget" in record["reason"]


def test_a_step_needing_a_failed_step_is_not_run(tmp_path: Path) -> None:
    check = make_check(tmp_path)

    def fails(details: dict, timeout: float) -> None:
        raise gpu_check.StepFailed("run.py exited with status 3")

    check.run_step("job0", "job", "step 0", fails)
    check.run_step("job1", "job", "step 1", lambda details, timeout: check.needs("job0"))
    record = read_report(tmp_path)["steps"][1]
    assert record["status"] == "not run" and "job0" in record["reason"]


def test_only_runs_the_selected_parts_and_always_the_environment(tmp_path: Path) -> None:
    check = make_check(tmp_path, "--only", "figures")
    assert check.args.only == ["env", "figures"]
    check.run_step("job0", "job", "step 0", lambda d, t: pytest.fail("must not run"))
    assert read_report(tmp_path)["steps"][0]["status"] == "skipped"


# ---------------------------------------------------------------------------------------------- processes
def test_a_timed_out_command_is_stopped_with_its_children(tmp_path: Path) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print('CHILD', child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    start = time.monotonic()
    result = gpu_check.run_command([sys.executable, "-c", code], tmp_path / "log.txt", timeout=3)
    assert result.timed_out and result.returncode != 0 and time.monotonic() - start < 60
    child = int(next(line.split()[1] for line in result.output.splitlines() if line.startswith("CHILD")))
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child)
    assert "timeout" in (tmp_path / "log.txt").read_text()
    with pytest.raises(gpu_check.StepFailed, match="did not finish"):
        gpu_check.require_success(result, "the sleeper", tmp_path / "log.txt")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split()[2] == "Z")  # a zombie is dead


def test_a_failing_command_names_its_log_and_shows_its_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "fail.log"
    result = gpu_check.run_command([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], log, 30)
    assert result.returncode == 3 and not result.timed_out
    with pytest.raises(gpu_check.StepFailed, match=r"(?s)status 3.*fail\.log.*boom"):
        gpu_check.require_success(result, "the command", log)


# ---------------------------------------------------------------------------------------------- parsers
def test_epoch_rates_come_from_the_final_progress_line_of_each_epoch() -> None:
    output = (
        "\x1b[32m[11/29 10:00:00 LGKD]: \x1b[0mEpoch 1: 2/15 (13%), 0.50 it/s, elapsed 0:00:04, ETA 0:00:26\n"
        "\x1b[32m[11/29 10:00:09 LGKD]: \x1b[0mEpoch 1: 15/15 (100%), 1.75 it/s, elapsed 0:00:09, loss=2.3\n"
        "[11/29 10:00:12 LGKD]: Evaluation: 4/4 (100%), 3.00 it/s, elapsed 0:00:01\n"
        "[11/29 10:00:15 LGKD]: Epoch 2: 15/15 (100%), 12.00 it/s, elapsed 0:00:01\n"
    )
    assert gpu_check.epoch_rates(output) == [
        {"epoch": 1, "iterations": 15, "it_s": 1.75},
        {"epoch": 2, "iterations": 15, "it_s": 12.0},
    ]


def test_compare_rows_checks_markers_and_tolerances() -> None:
    a = ["1", "0.5", "X", "x", "0.25"]
    assert gpu_check.compare_rows(a, ["1", "0.5004", "X", "x", "0.2504"], 1e-3) == []
    assert gpu_check.compare_rows(a, ["1", "0.6", "X", "x", "0.25"], 1e-3) == [
        "column 1: 0.5 against 0.6 (tolerance 0.001)"
    ]
    # Only the mean IoU (last column) is held to the tolerance, markers always.
    assert gpu_check.compare_rows(a, ["1", "0.9", "X", "x", "0.26"], 0.05, only_mean=True) == []
    assert gpu_check.compare_rows(a, ["1", "0.9", "X", "0.1", "0.26"], 0.05, only_mean=True)
    assert gpu_check.compare_rows(a, a[:-1], 1.0) == ["5 columns against 4"]


def test_parse_junit_keeps_outcomes_and_recorded_properties(tmp_path: Path) -> None:
    xml = tmp_path / "junit.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_a" time="1.5">'
        '<properties><property name="rel_diff" value="1e-06"/></properties></testcase>'
        '<testcase classname="tests.test_gpu" name="test_b" time="0.1">'
        '<failure message="assert 1 == 2">trace</failure></testcase>'
        '<testcase classname="tests.test_gpu" name="test_c" time="0">'
        '<skipped message="needs CUDA"/></testcase>'
        "</testsuite></testsuites>"
    )
    parsed = gpu_check.parse_junit(xml)
    assert parsed["counts"] == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    a, b, c = parsed["cases"]
    assert a["properties"] == {"rel_diff": "1e-06"} and a["seconds"] == 1.5
    assert b["outcome"] == "failed" and b["message"] == "assert 1 == 2"
    assert c["outcome"] == "skipped" and c["message"] == "needs CUDA"


def test_figures_give_the_fraction_of_the_matmul_rate_and_the_loading_ratio() -> None:
    summary = {
        "config": {"crop": 512, "batch": 12},
        "rows": [{"step": 1, "variant": "ours", "img_per_s": 300.0}],
        "flops_per_image": {"1": 537e9},
    }
    report = {
        "job": {"crop": 512},
        "steps": [
            {"key": "matmul", "details": {"tflop_s": 800.0}},
            {"key": "train_fp16", "details": {"precision": "fp16", "summary": summary}},
            {"key": "job1", "details": {"img_s_with_loading": 150.0, "global_batch": 12}},
        ],
    }
    figures = gpu_check.collect_figures(report)
    row = figures["train"][0]
    assert row["tflop_s"] == pytest.approx(537e9 * 300 / 1e12)
    assert row["matmul_fraction"] == pytest.approx(row["tflop_s"] / 800.0)
    assert figures["feed"] == [
        {"step": 1, "img_s_with_loading": 150.0, "bench_img_s": 300.0, "ratio": 0.5, "keeps_up": False}
    ]


# ---------------------------------------------------------------------------------------------- command
def run_gpu_check(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_full_check_without_a_gpu_fails_with_a_clear_message(tmp_path: Path) -> None:
    out = tmp_path / "full"
    proc = run_gpu_check("--out", str(out), "--device", "cpu", "--only", "tests")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads((out / gpu_check.REPORT_JSON).read_text())
    assert report["status"] == "failed" and report["mode"] == "full"
    env, *others = report["steps"]
    assert env["status"] == "failed" and "--smoke" in env["error"]
    assert report["environment"]["cuda_available"] is False
    tests = next(s for s in others if s["key"] == "tests")
    assert tests["status"] == "not run"  # needs a passed environment step
    assert "Traceback" not in proc.stderr


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in pids if _alive(pid)]


def test_sigterm_stops_the_running_step_and_keeps_a_partial_report(tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [sys.executable, "benchmarks/gpu_check.py", "--smoke", "--out", str(out), "--device", "cpu",
         "--only", "tests"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    junit = f"--junitxml={out / 'gpu_tests.xml'}"
    deadline = time.monotonic() + 120
    while not _processes_mentioning(junit):  # the pytest step has started
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.terminate()
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, output
    report = json.loads((out / gpu_check.REPORT_JSON).read_text())
    assert report["status"] == "interrupted"
    assert report["steps"][-1]["key"] == "tests" and "interrupted" in report["steps"][-1]["reason"]
    deadline = time.monotonic() + 30
    while _processes_mentioning(junit) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(junit)  # the step's own session did not outlive the check


@pytest.mark.slow
def test_smoke_mode_runs_the_whole_sequence_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "smoke"
    proc = run_gpu_check("--smoke", "--out", str(out), "--device", "cpu", timeout=1200)
    report = json.loads((out / gpu_check.REPORT_JSON).read_text())
    statuses = {s["key"]: s["status"] for s in report["steps"]}
    assert proc.returncode == 0, (statuses, proc.stdout[-4000:], (out / gpu_check.REPORT_MD).read_text())
    # On the CPU only the fp16 figures are skipped (bf16 stands for them); everything else ran.
    assert statuses.pop("train_fp16") == "skipped"
    assert set(statuses.values()) == {"passed"}, statuses
    steps = {s["key"]: s["details"] for s in report["steps"]}
    assert steps["tests"]["passed"] >= 25 and steps["tests"]["device"] == "cpu"
    assert steps["job0"]["rows"][0][0] == "0" and [r[0] for r in steps["job1"]["rows"]] == ["0", "1"]
    for key in ("job0", "job1", "multi_train"):
        assert steps[key]["img_s_with_loading"] > 0 and steps[key]["backend"] == "gloo"
    assert steps["multi_train"]["nproc"] == 2 and steps["multi_test"]["nproc"] == 2
    figures = report["figures"]
    assert figures["matmul_bf16_tflop_s"] > 0 and figures["eval"]["img_per_s"] > 0
    assert {(r["step"], r["variant"]) for r in figures["train"]} == {
        (s, v) for s in (0, 1) for v in ("ours", "baseline")
    }
    assert all(r["matmul_fraction"] > 0 for r in figures["train"])
    markdown = (out / gpu_check.REPORT_MD).read_text()
    for heading in ("# GPU check: PASSED", "## 2. Correctness tests", "## 3. Figures", "## 4. The real job"):
        assert heading in markdown
    assert not (out / "work").exists()  # synthetic data and checkpoints are removed
    assert (out / "logs" / "tests.log").is_file()
