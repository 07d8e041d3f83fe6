"""Training throughput (points/s) and peak memory of the DGCNN point-cloud model, per block size.

Measures the real training iteration, ``Trainer.train`` over pre-made point batches (float32 (B, 9, N)
points, (B, N) labels) of the ``--backbone dgcnn`` model (3DPC-CISS's DGCNN: k = 20, three EdgeConv
[64, 64], MLP [512, 256], head [256, 128]): at step 1 the LGKD objective of a ScanNet 15-5 style task
(old-model forward, entropy pseudo-labels with the adaptive CE factor, CE + per-point LGKD, backward, SGD),
at step 0 CE only. Each (points, step) configuration runs in a fresh process so that its peak memory is its
own; CPU peak memory is the resident set size, CUDA's ``max_memory_allocated``.

The kNN graph is built over chunks of ``--knn_chunk`` query points: its distance rows take ``chunk x N``
floats instead of the ``B x N x N`` of an unchunked graph; the table prints both.

Examples::

    python benchmarks/bench_pointcloud.py --smoke
    python benchmarks/bench_pointcloud.py --device cpu --points 1024 2048 4096 --batch 2
    python benchmarks/bench_pointcloud.py --device cuda --points 1024 2048 4096 --batch 32 --precision fp16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_paths()
import testing  # noqa: E402  (the step builders the tests use too)

# A ScanNet 15-5 style task: background + 15 classes at step 0, 5 new classes at step 1 (21 outputs).
STEP_CLASSES = {0: [16], 1: [16, 5]}
NUM_CLASSES = 21
POINT_CHANNELS = 9


# ---------------------------------------------------------------------------------------------- worker
def point_opts(cfg: dict[str, Any]) -> argparse.Namespace:
    """Options of an LGKD run (step 1) or of its step 0, with the point-cloud model.

    The method preset goes through the real parser; the 3-D settings are then set on the namespace (POD
    on feature maps does not apply to point clouds).
    """
    common.setup_paths()
    from argparser import get_argparser, modify_command_options

    argv = ["--dataset", "voc", "--task", "15-5", "--step", str(cfg["step"]), "--method", "LGKD"]
    argv += ["--no_pretrained", "--device", cfg["device"], "--batch_size", str(cfg["batch"]), "--no_progress"]
    argv += list(testing.LGKD_STEP_ARGS)
    if cfg["precision"] != "fp32":
        argv += ["--opt_level", "O1", "--amp_dtype", cfg["precision"]]
    opts = modify_command_options(get_argparser().parse_args(argv))
    opts.backbone, opts.dataset, opts.num_classes, opts.pod = "dgcnn", "scannet", NUM_CLASSES, None
    opts.knn_k, opts.knn_chunk, opts.num_points = cfg["k"], cfg["knn_chunk"], cfg["points"]
    return opts


def point_batches(n: int, batch: int, points: int, step: int, seed: int = 0, pin: bool = False) -> list:
    """``n`` batches of uniform points in a unit cube with colours, and labels of the step's classes."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    classes = torch.tensor([0, *range(16, 21)] if step > 0 else list(range(16)))
    batches = []
    for _ in range(n):
        xyz = torch.rand(batch, 3, points, generator=generator)
        cloud = torch.cat([xyz, torch.rand(batch, 3, points, generator=generator), xyz], dim=1)
        labels = classes[torch.randint(0, len(classes), (batch, points), generator=generator)].to(torch.uint8)
        if pin:
            cloud, labels = cloud.pin_memory(), labels.pin_memory()
        batches.append((cloud, labels))
    return batches


def run_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the step's model(s) and Trainer, warm up, time ``iters`` iterations, read the peak memory."""
    import torch

    common.setup_paths()
    from run import build_optimizer
    from train import Trainer

    torch.manual_seed(0)
    device = common.resolve_device(cfg["device"])
    common.set_cuda_flags(device)
    opts = point_opts(cfg)
    step = cfg["step"]
    # run.build_model with the classes of tasks.py's scannet 15-5, which are STEP_CLASSES.
    model, model_old = testing.build_models(opts, step, device)
    trainer = Trainer(
        model, model_old, device, opts, None, classes=STEP_CLASSES[step], step=step,
        autocast=testing.autocast_setting(cfg["precision"]),  # also on the CPU (run.py runs it in fp32)
    )  # fmt: skip
    n = max(cfg["warmup"], cfg["iters"], 1)
    batches = point_batches(n, cfg["batch"], cfg["points"], step, pin=device.type == "cuda")
    if trainer.pseudo_mode is not None:
        trainer.before(batches[:1])  # entropy thresholds of the pseudo-labeller
    optim = build_optimizer(opts, model)
    memory = common.MemoryProbe(device)
    memory.mark_base()
    if cfg["warmup"] > 0:
        trainer.train(0, optim, batches[: cfg["warmup"]])
    memory.reset_peak()
    cpu0 = time.process_time()
    with common.BlockTimer(device) as timer:
        trainer.train(0, optim, batches[: cfg["iters"]])
    cpu_seconds = time.process_time() - cpu0
    memory.read_peak()
    s_per_iter = timer.seconds / cfg["iters"]
    chunk = model.body.edge_convs[0].chunk_size
    rows = cfg["batch"] * cfg["points"] if chunk is None else min(chunk, cfg["batch"] * cfg["points"])
    if rows >= cfg["points"]:
        rows -= rows % cfg["points"]  # whole clouds per chunk
    return {
        "points": cfg["points"],
        "step": step,
        "terms": sorted(trainer.loss_terms.keys()),
        "uses_old_model": bool(trainer.use_old),
        "ms_per_iter": 1000 * s_per_iter,
        # CPU time of the process: with one thread, what an idle machine would take (other processes
        # on a shared machine inflate the wall time, not this).
        "cpu_ms_per_iter": 1000 * cpu_seconds / cfg["iters"],
        "points_per_s": cfg["batch"] * cfg["points"] / s_per_iter,
        "clouds_per_s": cfg["batch"] / s_per_iter,
        "peak_mib": memory.peak / common.MIB,
        "delta_mib": memory.delta / common.MIB,
        "rss_reset": memory.rss_reset,
        "knn_chunk": chunk,
        "knn_rows_mib": rows * cfg["points"] * 4 / common.MIB,
        "knn_unchunked_mib": cfg["batch"] * cfg["points"] ** 2 * 4 / common.MIB,
        "threads": torch.get_num_threads(),
    }


def worker(payload: dict[str, Any]) -> dict[str, Any]:
    """Run ``payload["jobs"]`` in order; a failing job is reported in its own result."""
    import torch

    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    results = []
    for job in payload["jobs"]:
        try:
            results.append(run_config(job))
        except Exception as exc:  # noqa: BLE001 - reported in the table instead of stopping the benchmark
            error = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            results.append({**error, "config": {"points": job["points"], "step": job["step"]}})
    return {"results": results}


# ---------------------------------------------------------------------------------------------- parent
def render(payload: dict[str, Any]) -> str:
    config, machine = payload["config"], payload["machine"]
    load = machine.get("loadavg_1min")
    head = (
        f"DGCNN training ({config['device']}, batch {config['batch']}, k {config['k']}, "
        f"{config['precision']}, kNN chunk {config['knn_chunk']} query points) on "
        f"{machine.get('gpu') or machine['cpu']}, torch {machine['torch']}, "
        f"load average {common.fmt(load)} on {machine['cpu_cores']} cores"
    )
    headers = ["points", "step", "terms", "ms/iter", "CPU ms/iter", "points/s", "clouds/s", "peak MiB"]
    headers += ["delta MiB"]
    headers += ["kNN MiB chunked", "kNN MiB unchunked"]
    rows = []
    for r in payload["results"]:
        if "error" in r:
            rows.append([r["config"]["points"], r["config"]["step"], "error: " + r["error"]] + ["-"] * 8)
            continue
        rows.append(
            [
                r["points"],
                r["step"],
                "+".join(r["terms"]),
                r["ms_per_iter"],
                r["cpu_ms_per_iter"],
                round(r["points_per_s"]),
                r["clouds_per_s"],
                r["peak_mib"],
                r["delta_mib"],
                r["knn_rows_mib"],
                r["knn_unchunked_mib"],
            ]
        )
    note = (
        "CPU ms/iter = process CPU time (all threads); peak = resident set size of the worker process (CPU) "
        "or max_memory_allocated (CUDA); delta = its increase over the built model(s); kNN MiB = float32 "
        "distance rows held at once by one graph"
    )
    return "\n".join([head, "", common.format_table(headers, rows), "", note])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--points", type=int, nargs="+", default=[1024, 2048, 4096], help="points per block")
    parser.add_argument("--batch", type=int, default=None, help="clouds per batch (default 32 CUDA, 2 CPU)")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 0], choices=[0, 1])
    parser.add_argument("--k", type=int, default=20, help="neighbours of the kNN graphs")
    parser.add_argument("--knn_chunk", type=int, default=None, help="query points per kNN chunk (0: none)")
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 3 CUDA, 1 CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default 10 CUDA, 3 CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the workers")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per worker process")
    parser.add_argument(
        "--one_process",
        action="store_true",
        help="run every configuration in one worker process (faster; peak memory less isolated)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI mode: CPU, 128 and 256 points, batch 2, k 8, 1+1 iterations, one process, one thread",
    )
    common.add_output_args(parser)
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.points, args.batch, args.k = "cpu", [128, 256], 2, 8
        args.knn_chunk = 200 if args.knn_chunk is None else args.knn_chunk  # chunked at both sizes
        args.warmup, args.iters, args.threads = 1, 1, args.threads or 1
        args.one_process = True
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        common.emit_result(worker(json.loads(args.worker)))
        return 0
    common.setup_paths()
    from models import DEFAULT_KNN_CHUNK

    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    config = {
        "device": device.type,
        "points": args.points,
        "batch": args.batch or (32 if cuda else 2),
        "steps": args.steps,
        "k": args.k,
        "knn_chunk": DEFAULT_KNN_CHUNK if args.knn_chunk is None else args.knn_chunk,
        "precision": args.precision,
        "warmup": args.warmup if args.warmup is not None else (3 if cuda else 1),
        "iters": args.iters or (10 if cuda else 3),
        "threads": args.threads,
        "one_process": args.one_process,
        "smoke": args.smoke,
    }
    machine = common.machine_info(device)
    jobs = []
    for points in args.points:
        for step in args.steps:
            job = {k: v for k, v in config.items() if k not in ("points", "steps")}
            jobs.append({**job, "points": points, "step": step})
    script = Path(__file__).resolve()
    started = time.perf_counter()
    results = []
    for batch_of_jobs in [jobs] if args.one_process else [[job] for job in jobs]:
        payload = {"threads": args.threads, "jobs": batch_of_jobs}
        outcome = common.run_worker(script, payload, timeout=args.timeout)
        if "error" in outcome:  # the whole worker failed: every job of it gets the message
            failed = [
                {**outcome, "config": {"points": j["points"], "step": j["step"]}} for j in batch_of_jobs
            ]
            results += failed
        else:
            results += outcome["results"]
    payload = {
        "benchmark": "pointcloud",
        "date": common.today(),
        "machine": machine,
        "config": config,
        "results": results,
        "seconds": time.perf_counter() - started,
    }
    common.write_json(payload, args.json_out)
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else render(payload))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
