"""Training-iteration throughput and peak memory of DeepLabV3 (ResNet, output stride 16) with LGKD.

Measures the real training iteration, ``Trainer.train`` over pre-made batches: old-model forward (no
grad), entropy pseudo-labels with the adaptive CE factor, new-model forward with intermediate features,
CE + LGKD + local POD (the full ``--method LGKD`` preset of VOC 15-5, step 1), one backward, SGD step.
A step-0 variant (CE only, no old model) is measured as well. "ours" is the default ``--norm_act
iabn_sync`` (activated batch norm with the ``|w| + eps`` scale); the plain-PyTorch baseline is the same
network with ``--norm_act std`` (``nn.BatchNorm2d`` + LeakyReLU).

Two ways of interleaving the two variants (``--interleave``):

* ``process`` (default): every run is a fresh process (so its peak memory is its own): warm-up
  iterations, one timed block, peak memory; runs alternate ABBA and the time ratio is the median of
  the ratios of adjacent runs. Gives throughput, memory and FLOP/s.
* ``iteration``: both variants live in one process and alternate block by block (ABBA, ``--block``
  iterations, 1 on the CPU); the ratio is the median over many adjacent pairs, which is far less
  sensitive to other processes on a shared machine. Run twice per step with the build order swapped,
  because on the CPU the model built first can run a few percent slower (memory placement). Time only.

Examples::

    python benchmarks/bench_train.py --smoke
    python benchmarks/bench_train.py --device cpu --backbone resnet50 --crop 128 --batch 2
    python benchmarks/bench_train.py --device cuda --crop 512 --batch 12 --precision fp16 --json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_paths()
import testing  # noqa: E402  (the step builders the tests use too)

# Targets (BENCHMARKS.md): one H100, crop 512, batch 12.
GPU_TARGET_IMG_S = {0: 400.0, 1: 300.0}
GPU_TARGET_PEAK_BYTES = 24e9
CPU_TARGET_TIME_RATIO = 1.02
CPU_TARGET_MEM_RATIO = 1.0
RSS_TOLERANCE = 0.01  # relative resolution of a CPU peak-RSS comparison
TENSOR_TOLERANCE = 0.001  # parameter-sized temporaries do not count as "higher"

VARIANTS = ("ours", "baseline")


# ---------------------------------------------------------------------------------------------- worker
def _variant_opts(cfg: dict[str, Any]) -> Any:
    ours = cfg["variant"] == "ours"
    return testing.build_opts(
        step=cfg["step"],
        backbone=cfg["backbone"],
        crop=cfg["crop"],
        batch=cfg["batch"],
        device=cfg["device"],
        norm_act="iabn_sync" if ours else "std",
        abn=cfg["abn"] if ours else "torch",
        precision=cfg["precision"],
        memory_format=cfg["memory_format"],
    )


def _build(cfg: dict[str, Any], variant: str | None = None) -> dict[str, Any]:
    """Model(s), Trainer, optimizer and batches of one configuration (``variant`` overrides the job's)."""
    import torch

    common.setup_paths()
    from run import build_optimizer
    from train import Trainer

    cfg = {**cfg, "variant": variant or cfg["variant"]}
    torch.manual_seed(cfg.get("seed", 0))
    device = common.resolve_device(cfg["device"])
    common.set_cuda_flags(device)
    step = cfg["step"]
    opts = _variant_opts(cfg)
    model, model_old = testing.build_models(opts, step, device)
    trainer = Trainer(
        model, model_old, device, opts, None, classes=testing.step_classes(opts, step), step=step,
        autocast=testing.autocast_setting(cfg["precision"]),  # also on the CPU (run.py runs it in fp32)
    )  # fmt: skip
    labels_now, _ = testing.seen_labels(opts, step)
    n_batches = max(cfg["warmup"], cfg["iters"], 1)
    batches = testing.synthetic_batches(
        n_batches, cfg["batch"], cfg["crop"], labels_now, seed=cfg.get("seed", 0), pin=device.type == "cuda"
    )
    if step > 0:
        trainer.before(batches[:1])  # entropy thresholds of the pseudo-labeller (one batch is enough here)
    return {
        "trainer": trainer, "optim": build_optimizer(opts, model), "batches": batches, "model": model,
        "device": device,
    }  # fmt: skip


def _describe(setup: dict[str, Any]) -> dict[str, Any]:
    trainer, model = setup["trainer"], setup["model"]
    return {
        "terms": sorted(trainer.loss_terms.keys()),
        "uses_old_model": bool(trainer.use_old),
        "norm_layer": _norm_layer_name(model),
    }


def run_training(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration: build, warm up, time ``iters`` iterations of ``Trainer.train``."""
    import torch

    setup = _build(cfg)
    trainer, optim, batches, device = setup["trainer"], setup["optim"], setup["batches"], setup["device"]
    memory = common.MemoryProbe(device)
    memory.mark_base()
    if cfg["warmup"] > 0:
        trainer.train(0, optim, batches[: cfg["warmup"]])
    memory.reset_peak()
    timed = common.TimedBatches(batches[: cfg["iters"]])
    cpu0, faults0 = time.process_time(), common.minor_page_faults()
    with common.BlockTimer(device) as timer:
        trainer.train(0, optim, timed)
    cpu_seconds = time.process_time() - cpu0
    faults = common.minor_page_faults() - faults0
    wall_iters, cpu_iters = timed.per_iteration((time.perf_counter(), time.process_time()))
    memory.read_peak()
    tensor_peak = None
    if device.type == "cpu" and cfg.get("tensor_memory", True):
        # One more iteration under the memory profiler (after the timing, so it does not disturb it).
        tensor_peak = common.tensor_memory_peak(lambda: trainer.train(0, optim, batches[:1]))
    return {
        "seconds": timer.seconds,
        "iters": cfg["iters"],
        "s_per_iter": timer.seconds / cfg["iters"],
        "cpu_s_per_iter": cpu_seconds / cfg["iters"],
        "faults_per_iter": faults / cfg["iters"],
        "iter_s": wall_iters if device.type == "cpu" else [],
        "iter_cpu_s": cpu_iters if device.type == "cpu" else [],
        "peak_bytes": memory.peak,
        "delta_bytes": memory.delta,
        "base_bytes": memory.base,
        "tensor_peak_bytes": tensor_peak,
        "rss_reset": memory.rss_reset,
        "threads": torch.get_num_threads(),
        **_describe(setup),
    }


def run_paired(cfg: dict[str, Any]) -> dict[str, Any]:
    """Both variants in this process, timed in alternating blocks (ABBA) of ``block`` iterations.

    Adjacent blocks see the same machine state, so the per-pair ratios cancel drift and load from other
    processes far better than separate runs; the price is that memory is not measured here.
    """
    # Build order matters on the CPU (measured: the model built first ran ~4% slower, whichever it was,
    # from where its tensors landed in memory); the parent runs both orders and pools the pairs.
    order = VARIANTS if cfg.get("build_order", "ours_first") == "ours_first" else tuple(reversed(VARIANTS))
    setups = {v: _build(cfg, v) for v in order}
    device = setups["ours"]["device"]
    for setup in setups.values():
        if cfg["warmup"] > 0:
            setup["trainer"].train(0, setup["optim"], setup["batches"][: cfg["warmup"]])
    block = max(1, cfg["block"])
    times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    for pair in range(cfg["pairs"]):
        for variant in VARIANTS if pair % 2 == 0 else tuple(reversed(VARIANTS)):
            setup = setups[variant]
            batches = [setup["batches"][i % len(setup["batches"])] for i in range(block)]
            cpu0, faults0 = time.process_time(), common.minor_page_faults()
            with common.BlockTimer(device) as timer:
                setup["trainer"].train(0, setup["optim"], batches)
            cpu_s = (time.process_time() - cpu0) / block
            times[variant].append(
                (timer.seconds / block, cpu_s, (common.minor_page_faults() - faults0) / block)
            )
    return {
        "paired": True, "block": block, "build_order": cfg.get("build_order", "ours_first"), "times": times,
        **{v: _describe(s) for v, s in setups.items()},
    }  # fmt: skip


def run_jobs(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point: run ``payload["jobs"]`` in order ("train" or "flops"), each failure reported
    in its own result so that the other jobs still run."""
    import torch

    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    if payload.get("malloc", "run") == "run":
        common.setup_paths()
        from utils.allocator import keep_freed_memory

        keep_freed_memory()  # what run.py does on the CPU (a no-op for GPU memory)
    results = []
    for job in payload["jobs"]:
        # The previous job's models and optimizer sit in reference cycles: free them now, or they would
        # count in this job's peak memory (--one_process runs every configuration in this process).
        gc.collect()
        try:
            if job["kind"] == "flops":
                results.append(model_flops(job["backbone"], job["crop"], job["step"]))
            elif job["kind"] == "paired":
                results.append(run_paired(job))
            else:
                results.append(run_training(job))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which prints it
            tail = traceback.format_exc().strip().splitlines()[-6:]
            results.append({"error": f"{type(exc).__name__}: {exc}", "traceback": tail})
    return {"results": results}


def _norm_layer_name(model: Any) -> str:
    """Module and class of the first normalisation layer of the body, to show what was measured
    (``modules.abn.InPlaceABNSync`` is ours, ``inplace_abn...`` the compiled package)."""
    layer = getattr(getattr(getattr(model, "body", model), "mod1", None), "bn1", None)
    if layer is None:
        return "?"
    cls = type(layer)
    return f"{cls.__module__}.{cls.__name__}"


# ---------------------------------------------------------------------------------------------- FLOPs
def model_flops(backbone: str, crop: int, step: int) -> dict[str, Any]:
    """FLOPs per image of the current model (forward, forward+backward) and of the old model's forward.

    Counted on the ``meta`` device (shapes only, no compute) with a batch of 2 (training-mode batch norm
    needs more than one value per channel), then divided by 2. Falls back to the CPU if the model cannot
    be built on ``meta``.
    """
    import torch

    opts = testing.build_opts(step=step, backbone=backbone, crop=crop, batch=2, device="cpu")
    result: dict[str, Any] = {}
    for where in ("meta", "cpu"):
        try:
            with torch.device(where):
                model, model_old = testing.build_models(opts, step, torch.device(where))
                model.train()
                images = torch.zeros(2, 3, crop, crop)
                result["forward"] = common.count_flops(model, images, backward=False) / 2
                result["forward_backward"] = common.count_flops(model, images, backward=True) / 2
                old = common.count_flops(model_old, images, backward=False) if model_old is not None else 0
                result["old_forward"] = old / 2
            result["counted_on"] = where
            break
        except Exception as exc:  # noqa: BLE001 - any failure on meta: count for real on the CPU
            result["meta_error"] = f"{type(exc).__name__}: {exc}"
    result["train_iteration"] = result.get("forward_backward", 0.0) + result.get("old_forward", 0.0)
    return result


# ---------------------------------------------------------------------------------------------- parent
def _paired(runs: dict[str, list[dict]], key: str) -> list[float]:
    """ours/baseline ratios of ``key`` for each pair of adjacent runs (both successful)."""
    return [
        o[key] / b[key]
        for o, b in zip(runs["ours"], runs["baseline"])
        if "error" not in o and "error" not in b
    ]


def _variant_summary(ok: list[dict], batch: int, flops: dict[str, Any]) -> dict[str, Any]:
    s_iter = common.median([r["s_per_iter"] for r in ok])
    flops_iter = flops.get("train_iteration", 0.0) * batch
    iter_s = [t for r in ok for t in r.get("iter_s", [])]
    iter_cpu = [t for r in ok for t in r.get("iter_cpu_s", [])]
    tensor_peaks = [r["tensor_peak_bytes"] for r in ok if r.get("tensor_peak_bytes")]
    return {
        "ms_per_iter": 1e3 * s_iter,
        "img_per_s": batch / s_iter,
        "ms_per_iter_all": [1e3 * r["s_per_iter"] for r in ok],
        "cpu_ms_per_iter": 1e3 * common.median([r["cpu_s_per_iter"] for r in ok]),
        "faults_per_iter": common.median([r.get("faults_per_iter", math.nan) for r in ok]),
        # Per-iteration extremes (CPU only): the minimum is the least disturbed by other processes.
        "min_ms_per_iter": 1e3 * min(iter_s) if iter_s else None,
        "min_cpu_ms_per_iter": 1e3 * min(iter_cpu) if iter_cpu else None,
        "peak_mib": common.median([r["peak_bytes"] for r in ok]) / common.MIB,
        "delta_mib": common.median([r["delta_bytes"] for r in ok]) / common.MIB,
        "tensor_peak_mib": common.median(tensor_peaks) / common.MIB if tensor_peaks else None,
        "tflop_s": flops_iter / s_iter / 1e12 if flops_iter else None,
        "norm_layer": ok[0]["norm_layer"],
        "terms": ok[0]["terms"],
        "uses_old_model": ok[0]["uses_old_model"],
        "rss_reset": all(r["rss_reset"] for r in ok),
    }


def summarize(step: int, runs: dict[str, list[dict]], batch: int, flops: dict[str, Any]) -> dict[str, Any]:
    """Medians over repetitions per variant, paired ours/baseline ratios."""
    summary: dict[str, Any] = {"step": step, "variants": {}}
    for variant, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if ok:
            summary["variants"][variant] = _variant_summary(ok, batch, flops)
        else:
            summary["variants"][variant] = {"error": results[0].get("error") if results else "not run"}
    ours, base = summary["variants"].get("ours", {}), summary["variants"].get("baseline", {})
    if "ms_per_iter" in ours and "ms_per_iter" in base:
        summary["time_ratio_all"] = _paired(runs, "s_per_iter")
        summary["time_ratio"] = common.median(summary["time_ratio_all"])
        summary["cpu_time_ratio"] = common.median(_paired(runs, "cpu_s_per_iter"))
        summary["min_time_ratio"] = common.safe_ratio(ours["min_ms_per_iter"], base["min_ms_per_iter"])
        summary["min_cpu_time_ratio"] = common.safe_ratio(
            ours["min_cpu_ms_per_iter"], base["min_cpu_ms_per_iter"]
        )
        summary["mem_ratio"] = common.safe_ratio(ours["peak_mib"], base["peak_mib"])
        summary["delta_mem_ratio"] = common.safe_ratio(ours["delta_mib"], base["delta_mib"])
        summary["tensor_mem_ratio"] = common.safe_ratio(ours["tensor_peak_mib"], base["tensor_peak_mib"])
    return summary


def summarize_paired(
    step: int, results: list[dict[str, Any]], batch: int, flops: dict[str, Any]
) -> dict[str, Any]:
    """Summary of :func:`run_paired` results (both build orders pooled) in the layout of
    :func:`summarize`; memory is not measured in this mode."""
    ok = [r for r in results if "error" not in r]
    if not ok:
        return {"step": step, "variants": {v: {"error": results[0]["error"]} for v in VARIANTS}}
    times = {v: [t for r in ok for t in r["times"][v]] for v in VARIANTS}
    summary: dict[str, Any] = {
        "step": step, "variants": {}, "interleave": "iteration", "block": ok[0]["block"],
        "build_orders": [r["build_order"] for r in ok],
    }  # fmt: skip
    flops_iter = flops.get("train_iteration", 0.0) * batch
    for variant in VARIANTS:
        wall = [t[0] for t in times[variant]]
        cpu = [t[1] for t in times[variant]]
        s_iter = common.median(wall)
        summary["variants"][variant] = {
            "ms_per_iter": 1e3 * s_iter,
            "img_per_s": batch / s_iter,
            "ms_per_iter_all": [1e3 * t for t in wall],
            "cpu_ms_per_iter": 1e3 * common.median(cpu),
            "faults_per_iter": common.median([t[2] for t in times[variant]]),
            "min_ms_per_iter": 1e3 * min(wall),
            "min_cpu_ms_per_iter": 1e3 * min(cpu),
            "peak_mib": None,
            "delta_mib": None,
            "tensor_peak_mib": None,
            "tflop_s": flops_iter / s_iter / 1e12 if flops_iter else None,
            **ok[0][variant],
        }
    pairs = list(zip(times["ours"], times["baseline"]))
    summary["time_ratio_all"] = [o[0] / b[0] for o, b in pairs]
    summary["time_ratio"] = common.median(summary["time_ratio_all"])
    summary["cpu_time_ratio"] = common.median([o[1] / b[1] for o, b in pairs])
    summary["time_ratio_by_build_order"] = {
        r["build_order"]: common.median(
            [o[0] / b[0] for o, b in zip(r["times"]["ours"], r["times"]["baseline"])]
        )
        for r in ok
    }
    ours, base = summary["variants"]["ours"], summary["variants"]["baseline"]
    summary["min_time_ratio"] = ours["min_ms_per_iter"] / base["min_ms_per_iter"]
    summary["min_cpu_time_ratio"] = ours["min_cpu_ms_per_iter"] / base["min_cpu_ms_per_iter"]
    summary["mem_ratio"] = summary["delta_mem_ratio"] = summary["tensor_mem_ratio"] = None
    return summary


def check_targets(args: argparse.Namespace, device: Any, steps: list[dict]) -> list[dict[str, Any]]:
    """Target verdicts (BENCHMARKS.md); GPU throughput targets only at crop 512, batch 12.

    Memory: on CUDA the allocated-bytes peak; on the CPU the tensor peak of the memory profiler when
    available (exact), else the peak RSS within its resolution (:data:`RSS_TOLERANCE`).
    """
    checks: list[dict[str, Any]] = []
    for s in steps:
        step, ours = s["step"], s["variants"].get("ours", {})
        if "time_ratio" in s:
            checks.append({
                "target": f"step {step}: time ours/baseline <= {CPU_TARGET_TIME_RATIO}",
                "value": s["time_ratio"],
                "met": s["time_ratio"] <= CPU_TARGET_TIME_RATIO,
            })  # fmt: skip
            if s.get("interleave") == "iteration":
                pass  # memory is not measured in interleaved mode
            elif device.type == "cuda":
                what, value, limit = "peak allocated", s["mem_ratio"], CPU_TARGET_MEM_RATIO
            elif s.get("tensor_mem_ratio") is not None:
                # + TENSOR_TOLERANCE: |w| + eps and its sign mask are parameter-sized (C per layer).
                what, value = "tensor peak (+0.1%: per-channel temporaries)", s["tensor_mem_ratio"]
                limit = CPU_TARGET_MEM_RATIO + TENSOR_TOLERANCE
            else:
                what, value, limit = "peak RSS (+1% resolution)", s["mem_ratio"], 1.0 + RSS_TOLERANCE
            if s.get("interleave") != "iteration":
                checks.append({
                    "target": f"step {step}: {what} ours/baseline <= {limit:g}",
                    "value": value,
                    "met": value is not None and value <= limit,
                })  # fmt: skip
        if device.type == "cuda" and args.crop == 512 and args.batch == 12 and "img_per_s" in ours:
            target = GPU_TARGET_IMG_S[min(step, 1)]
            checks.append({
                "target": f"step {step}: >= {target:.0f} img/s (crop 512, batch 12)",
                "value": ours["img_per_s"],
                "met": ours["img_per_s"] >= target,
            })  # fmt: skip
            checks.append({
                "target": f"step {step}: peak memory <= 24 GB (crop 512, batch 12)",
                "value": ours["peak_mib"] * common.MIB / 1e9,
                "met": ours["peak_mib"] * common.MIB <= GPU_TARGET_PEAK_BYTES,
            })  # fmt: skip
    return checks


def render(payload: dict[str, Any]) -> str:
    """The human-readable report: configuration, FLOPs, the table, ratios, target verdicts."""
    cfg, machine = payload["config"], payload["machine"]
    threads = cfg.get("threads") or machine["torch_threads"]
    where = "one worker process for all runs" if cfg.get("one_process") else "a fresh process per run"
    if cfg.get("interleave") == "iteration":
        where = "both variants in one process per step, alternating blocks (memory not measured)"
    lines = [
        f"bench_train {payload['date']}  device={cfg['device']}  backbone={cfg['backbone']} OS16  "
        f"crop={cfg['crop']}  batch={cfg['batch']}  precision={cfg['precision']}  "
        f"memory_format={cfg['memory_format']}  abn={cfg['abn']}  malloc={cfg.get('malloc', 'run')}",
        f"machine: {machine['cpu']} ({machine['cpu_cores']} cores), torch {machine['torch']}, "
        f"{threads} torch threads, load average {common.fmt(machine.get('loadavg_1min'))} at start"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        f"timing: {cfg['warmup']} warm-up + {cfg['iters']} timed iterations per run, {cfg['repeats']} "
        f"ABBA-interleaved runs per variant; {where}",
        "",
    ]
    headers = [
        "step", "variant", "norm layer", "ms/iter", "img/s", "CPU ms/iter", "min ms/iter", "faults/iter",
        "peak MiB", "train delta MiB", "tensor peak MiB", "GFLOP/img", "TFLOP/s", "time ratio",
        "CPU-time ratio", "min-time ratio", "peak ratio", "tensor-peak ratio",
    ]  # fmt: skip
    rows = []
    for s in payload["steps"]:
        flops = payload["flops"][str(s["step"])]
        for variant in VARIANTS:
            v = s["variants"].get(variant)
            if v is None:
                continue
            if "error" in v:
                rows.append([s["step"], variant, "ERROR: " + v["error"].splitlines()[-1][:60]])
                rows[-1] += ["-"] * (len(headers) - 3)
                continue
            keys = ("time_ratio", "cpu_time_ratio", "min_time_ratio", "mem_ratio", "tensor_mem_ratio")
            ratios = [common.fmt(s.get(k), 3) for k in keys] if variant == "ours" else [None] * len(keys)
            rows.append([
                s["step"], variant, v["norm_layer"].rsplit(".", 1)[-1], v["ms_per_iter"], v["img_per_s"],
                v["cpu_ms_per_iter"], v["min_ms_per_iter"], common.fmt(v.get("faults_per_iter"), 0),
                v["peak_mib"], v["delta_mib"],
                v["tensor_peak_mib"], flops.get("train_iteration", 0.0) / 1e9, v["tflop_s"], *ratios,
            ])  # fmt: skip
    lines.append(common.format_table(headers, rows))
    lines.append("")
    lines.append(
        "ratios = ours / baseline: time and CPU time = median over the paired (adjacent) runs; min-time = "
        "ratio of the fastest iterations; memory = ratio of the medians.\npeak = CUDA max allocated / "
        "CPU peak RSS of the process; train delta = peak minus the memory of the built model; tensor peak "
        "(CPU) = live-tensor peak from the memory profiler.\nGFLOP/img = one training iteration "
        "(old-model forward + forward + backward), matmuls and convolutions only. faults/iter = minor page "
        "faults of the process per iteration (memory the allocator returned to the kernel and touches again)."
    )
    for s in payload["steps"]:
        if s.get("time_ratio_by_build_order"):
            orders = ", ".join(f"{k} {v:.3f}" for k, v in s["time_ratio_by_build_order"].items())
            lines.append(f"step {s['step']}: time ratio per build order (pooled above): {orders}")
    for step, f in payload["flops"].items():
        if "error" in f or not f:
            continue
        lines.append(
            f"FLOPs per image, step {step}: forward {f.get('forward', 0) / 1e9:.2f} G, forward+backward "
            f"{f.get('forward_backward', 0) / 1e9:.2f} G, "
            f"old-model forward {f.get('old_forward', 0) / 1e9:.2f} G "
            f"(counted on {f.get('counted_on', '?')})"
        )
    for check in payload["targets"]:
        verdict = "MET" if check["met"] else "MISSED"
        lines.append(f"target {check['target']}: {common.fmt(check['value'], 4)} -> {verdict}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_model_args(parser)
    parser.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="fp16/bf16 = autocast (fp16 with GradScaler); forced on CPU too",
    )
    parser.add_argument(
        "--abn",
        choices=["torch", "inplace_abn", "recompute"],
        default="torch",
        help="our ABN implementation: pure PyTorch, compiled inplace_abn, or with --recompute_abn",
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 0], help="incremental steps to measure")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 5 CUDA, 2 CPU)")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed iterations per run (default 20 CUDA, 5 CPU)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per variant (default 4)")
    parser.add_argument("--no_baseline", action="store_true", help="measure only our model")
    parser.add_argument("--no_flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads in the workers (default: torch's)"
    )
    parser.add_argument(
        "--interleave",
        choices=["process", "iteration"],
        default="process",
        help="process: a fresh process per run, ABBA over runs (throughput and memory); iteration: both "
        "variants in one process, ABBA over blocks of --block iterations (time ratio only, most robust)",
    )
    parser.add_argument(
        "--block", type=int, default=None, help="iterations per block with --interleave iteration (CPU: 1)"
    )
    parser.add_argument(
        "--malloc",
        choices=["run", "default", "no_trim"],
        default="run",
        help="CPU allocator setting of the workers: run (as run.py: utils/allocator.py keeps freed memory "
        "for reuse), default (glibc's adaptive thresholds: freed activations are unmapped and faulted in "
        "again), or no_trim (the same as run through MALLOC_* variables at start-up)",
    )
    parser.add_argument(
        "--one_process",
        action="store_true",
        help="run every configuration in one worker process (faster; peak memory less isolated)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI mode: resnet18, crop 64, batch 2, 1 warm-up + 2 timed iterations, 1 run, one process, "
        "1 thread",
    )
    common.add_output_args(parser)
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.crop, args.batch = "resnet18", 64, 2
        args.warmup, args.iters, args.repeats = 1, 2, 1
        args.one_process = True
        args.threads = args.threads or 1  # one thread: immune to OpenMP stalls on a busy CI machine
    return args


def _worker_env(args: argparse.Namespace) -> dict[str, str]:
    """``--malloc no_trim``: glibc keeps freed memory (see :data:`common.GLIBC_NO_TRIM_ENV`)."""
    return dict(common.GLIBC_NO_TRIM_ENV) if args.malloc == "no_trim" else {}


def plan_runs(steps: list[int], variants: tuple[str, ...], repeats: int) -> list[tuple[int, str, int]]:
    """(step, variant, repetition) in execution order: ABBA per step, so each pair is adjacent in time."""
    plan = []
    for step in steps:
        for rep in range(repeats):
            for variant in variants if rep % 2 == 0 else tuple(reversed(variants)):
                plan.append((step, variant, rep))
    return plan


def execute(args: argparse.Namespace, config: dict[str, Any], device: Any) -> tuple[list, dict]:
    """Run the plan in worker processes; return ``(steps summaries, flops per step)``."""
    if args.interleave == "iteration":
        return execute_paired(args, config, device)
    variants = VARIANTS[:1] if args.no_baseline else VARIANTS
    plan = plan_runs(args.steps, variants, args.repeats)
    jobs = [
        {**config, "kind": "train", "device": str(device), "step": step, "variant": variant, "seed": rep}
        for step, variant, rep in plan
    ]
    flops_jobs = [
        {"kind": "flops", "backbone": args.backbone, "crop": args.crop, "step": step}
        for step in ([] if args.no_flops else args.steps)
    ]
    script = Path(__file__).resolve()

    def launch(batch: list[dict]) -> list[dict]:
        out = common.run_worker(
            script,
            {"jobs": batch, "threads": args.threads, "malloc": args.malloc},
            timeout=args.timeout,
            env=_worker_env(args),
        )
        return out["results"] if "results" in out else [out] * len(batch)

    if args.one_process:
        results = launch(jobs + flops_jobs)
    else:
        results = [r for job in jobs for r in launch([job])]
        results += launch(flops_jobs) if flops_jobs else []
    train_results, flops_results = results[: len(jobs)], results[len(jobs) :]
    flops = {str(step): {} for step in args.steps}
    for job, result in zip(flops_jobs, flops_results):
        flops[str(job["step"])] = result
    steps = []
    for step in args.steps:
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for (s, variant, _), result in zip(plan, train_results):
            if s == step:
                runs[variant].append(result)
                if "error" in result:
                    print(f"[bench_train] step {step} {variant}: {result['error']}", file=sys.stderr)
        steps.append(summarize(step, runs, args.batch, flops[str(step)]))
    return steps, flops


def execute_paired(args: argparse.Namespace, config: dict[str, Any], device: Any) -> tuple[list, dict]:
    """``--interleave iteration``: per step, two worker processes holding both variants, one building
    ours first and one the baseline first; their pairs are pooled (cancels the build-order bias)."""
    script = Path(__file__).resolve()
    block = args.block or (1 if device.type == "cpu" else args.iters)
    pairs = max(1, args.repeats * max(1, args.iters // block) // 2)
    steps, flops = [], {}
    for step in args.steps:
        job = {**config, "kind": "paired", "device": str(device), "step": step, "variant": "ours",
               "pairs": pairs, "block": block}  # fmt: skip
        results = []
        for build_order in ("ours_first", "baseline_first"):
            out = common.run_worker(
                script,
                {"jobs": [{**job, "build_order": build_order}], "threads": args.threads,
                 "malloc": args.malloc},
                timeout=args.timeout, env=_worker_env(args),
            )  # fmt: skip
            results.append(out["results"][0] if "results" in out else out)
        if not args.no_flops:
            jobs = [{"kind": "flops", "backbone": args.backbone, "crop": args.crop, "step": step}]
            out = common.run_worker(script, {"jobs": jobs}, timeout=args.timeout)
            flops[str(step)] = out["results"][0] if "results" in out else {}
        else:
            flops[str(step)] = {}
        for result in results:
            if "error" in result:
                print(f"[bench_train] step {step}: {result['error']}", file=sys.stderr)
        steps.append(summarize_paired(step, results, args.batch, flops[str(step)]))
    return steps, flops


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        common.emit_result(run_jobs(json.loads(args.worker)))
        return 0

    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    common.resolve_model_defaults(args, cuda)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.iters = args.iters or (20 if cuda else 5)
    args.repeats = args.repeats or 4
    config = {
        "device": device.type,
        "backbone": args.backbone,
        "crop": args.crop,
        "batch": args.batch,
        "precision": args.precision,
        "memory_format": args.memory_format,
        "abn": args.abn,
        "warmup": args.warmup,
        "iters": args.iters,
        "repeats": args.repeats,
        "threads": args.threads,
        "one_process": args.one_process,
        "interleave": args.interleave,
        "malloc": args.malloc,
        "smoke": args.smoke,
    }
    machine = common.machine_info(device)  # before the runs: the load average is other processes'
    steps, flops = execute(args, config, device)
    payload = {
        "benchmark": "train",
        "date": common.today(),
        "machine": machine,
        "config": config,
        "flops": flops,
        "steps": steps,
    }
    payload["targets"] = check_targets(args, device, steps)
    common.write_json(payload, args.json_out)
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else render(payload))
    failed = any("error" in v for s in steps for v in s["variants"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
