"""Evaluation throughput with metric accumulation, and the share of the time spent in the metrics.

Runs the real evaluation loop, ``Trainer.validate`` (forward of the current model and, at step > 0, of
the old one for the validation losses; validation losses; argmax; ``StreamSegMetrics.update`` on the
device; ``synch``; ``get_results``) over pre-made batches. The metrics object is wrapped so that each
``update`` is timed where it runs: with ``perf_counter`` on the CPU and with CUDA events on a GPU (events do
not synchronise, so the loop is not perturbed; they are read after the loop). ``synch`` and
``get_results`` are timed too. A separate micro-benchmark times ``update`` alone on the same batch shape.

Examples::

    python benchmarks/bench_eval.py --smoke
    python benchmarks/bench_eval.py --device cpu --backbone resnet50 --crop 256 --batch 4
    python benchmarks/bench_eval.py --device cuda --crop 512 --batch 12 --precision fp16 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_paths()
import testing  # noqa: E402  (the step builders the tests use too)

TARGET_METRICS_SHARE = 0.02


class TimedMetrics:
    """Delegates to a ``StreamSegMetrics`` and records the time of ``update``, ``synch`` and ``get_results``.

    On CUDA, ``update`` is bracketed by two CUDA events (no host synchronisation inside the loop); call
    :meth:`update_seconds` after the loop.
    """

    def __init__(self, metrics: Any, device: Any) -> None:
        self.metrics = metrics
        self.device = device
        self._events: list[tuple[Any, Any]] = []
        self._cpu_seconds: list[float] = []
        self.synch_seconds = 0.0
        self.results_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.metrics, name)

    def reset(self) -> None:
        self.metrics.reset()

    def update(self, label_trues: Any, label_preds: Any) -> None:
        import torch

        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            self.metrics.update(label_trues, label_preds)
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            self.metrics.update(label_trues, label_preds)
            self._cpu_seconds.append(time.perf_counter() - t0)

    def synch(self, device: Any = None) -> None:
        with common.BlockTimer(self.device) as timer:
            self.metrics.synch(device)
        self.synch_seconds += timer.seconds

    def get_results(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        results = self.metrics.get_results()
        self.results_seconds += time.perf_counter() - t0
        return results

    def update_seconds(self) -> list[float]:
        """Seconds of each ``update`` so far (device time on CUDA)."""
        common.synchronize(self.device)
        gpu = [start.elapsed_time(end) / 1e3 for start, end in self._events]
        return self._cpu_seconds + gpu

    def clear_timings(self) -> None:
        self._events, self._cpu_seconds = [], []
        self.synch_seconds = self.results_seconds = 0.0


def eval_batches(opts: Any, step: int, n: int, batch: int, crop: int, pin: bool) -> list[tuple[Any, Any]]:
    """Test batches: labels over every class seen so far (the test set keeps old classes), 255 outlines."""
    labels_now, labels_old = testing.seen_labels(opts, step)
    seen = sorted(set(labels_old) | set(labels_now))
    # The test LUT maps raw classes to model indices 0..n_seen-1; draw directly from that range.
    return testing.synthetic_batches(n, batch, crop, list(range(len(seen))), seed=1, pin=pin)


def micro_update(metrics_cls: Any, n_classes: int, batches: list, device: Any, repeats: int) -> float:
    """Seconds per ``update`` alone (labels and predictions already on the device), median of ``repeats``."""
    import torch

    metrics = metrics_cls(n_classes, device=device)
    labels = batches[0][1].to(device).long()
    preds = torch.randint(0, n_classes, labels.shape, device=device)
    metrics.update(labels, preds)  # warm-up (allocates the matrix)
    times = []
    for _ in range(repeats):
        with common.BlockTimer(device) as timer:
            metrics.update(labels, preds)
        times.append(timer.seconds)
    return common.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model(s), warm up, run ``--repeats`` timed evaluations; return the results dict."""
    import torch

    common.setup_paths()
    from metrics import StreamSegMetrics
    from train import Trainer

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.resolve_device(args.device)
    machine = common.machine_info(device)
    common.set_cuda_flags(device)
    opts = testing.build_opts(
        step=args.step,
        backbone=args.backbone,
        crop=args.crop,
        batch=args.batch,
        device=str(device),
        precision=args.precision,
        memory_format=args.memory_format,
    )
    model, model_old = testing.build_models(opts, args.step, device)
    classes = testing.step_classes(opts, args.step)
    trainer = Trainer(
        model, model_old, device, opts, None, classes=classes, step=args.step,
        autocast=testing.autocast_setting(args.precision),  # also on the CPU (run.py runs it in fp32)
    )  # fmt: skip
    n_classes = sum(classes)
    metrics = TimedMetrics(StreamSegMetrics(n_classes, device=device), device)
    batches = eval_batches(opts, args.step, args.iters, args.batch, args.crop, device.type == "cuda")

    if args.warmup > 0:
        trainer.validate(batches[: args.warmup], metrics)
    totals, update_totals, other_metrics = [], [], []
    for _ in range(args.repeats):
        metrics.clear_timings()
        with common.BlockTimer(device) as timer:
            _, score, _ = trainer.validate(batches, metrics)
        totals.append(timer.seconds)
        update_totals.append(sum(metrics.update_seconds()))
        other_metrics.append(metrics.synch_seconds + metrics.results_seconds)

    total = common.median(totals)
    update = common.median(update_totals)
    other = common.median(other_metrics)
    n_images = args.iters * args.batch
    micro = micro_update(StreamSegMetrics, n_classes, batches, device, max(args.repeats * 5, 5))
    return {
        "benchmark": "eval",
        "date": common.today(),
        "machine": machine,
        "config": {
            "device": device.type,
            "backbone": args.backbone,
            "crop": args.crop,
            "batch": args.batch,
            "step": args.step,
            "precision": args.precision,
            "memory_format": args.memory_format,
            "warmup": args.warmup,
            "iters": args.iters,
            "repeats": args.repeats,
            "smoke": args.smoke,
            "n_classes": n_classes,
            "threads": torch.get_num_threads(),
            "uses_old_model": bool(trainer.use_old),
        },
        "results": {
            "seconds": total,
            "seconds_all": totals,
            "img_per_s": n_images / total,
            "ms_per_batch": 1e3 * total / args.iters,
            "update_ms_per_batch": 1e3 * update / args.iters,
            "synch_results_ms": 1e3 * other,
            "metrics_share": (update + other) / total,
            "update_share": update / total,
            "micro_update_ms": 1e3 * micro,
            "micro_update_share": micro * args.iters / total,
            "mean_iou": float(score["Mean IoU"]),
        },
    }


def render(payload: dict[str, Any]) -> str:
    cfg, res = payload["config"], payload["results"]
    headers = [
        "step",
        "img/s",
        "ms/batch",
        "update ms/batch",
        "synch+results ms",
        "metrics share %",
        "update alone ms",
        "update alone share %",
    ]
    row = [
        cfg["step"],
        res["img_per_s"],
        res["ms_per_batch"],
        res["update_ms_per_batch"],
        res["synch_results_ms"],
        100 * res["metrics_share"],
        res["micro_update_ms"],
        100 * res["micro_update_share"],
    ]
    machine = payload["machine"]
    met = res["metrics_share"] < TARGET_METRICS_SHARE
    return "\n".join(
        [
            f"bench_eval {payload['date']}  device={cfg['device']}  backbone={cfg['backbone']} OS16  "
            f"crop={cfg['crop']}  batch={cfg['batch']}  step={cfg['step']} "
            f"(old model: {cfg['uses_old_model']})  "
            f"precision={cfg['precision']}  memory_format={cfg['memory_format']}  classes={cfg['n_classes']}",
            f"machine: {machine['cpu']} ({machine['cpu_cores']} cores), torch {machine['torch']}, "
            f"{machine['torch_threads']} torch threads, load average "
            f"{common.fmt(machine.get('loadavg_1min'))} at start"
            + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
            f"timing: {cfg['warmup']} warm-up batches, then {cfg['repeats']} timed evaluations of "
            f"{cfg['iters']} "
            "batches (median)",
            "",
            common.format_table(headers, [row]),
            "",
            f"target metrics < {100 * TARGET_METRICS_SHARE:.0f}% of evaluation time: "
            f"{100 * res['metrics_share']:.3f}% -> {'MET' if met else 'MISSED'}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    common.add_model_args(parser)
    parser.add_argument(
        "--step", type=int, default=0, help="incremental step (0: no old model, the highest metrics share)"
    )
    parser.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches (default 5 CUDA, 1 CPU)")
    parser.add_argument(
        "--iters", type=int, default=None, help="batches per timed evaluation (default 50 CUDA, 5 CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed evaluations")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI mode: resnet18, crop 64, batch 2, 2 batches, 1 repeat, 1 thread",
    )
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.backbone, args.crop, args.batch = "resnet18", 64, 2
        args.warmup, args.iters, args.repeats = 1, 2, 1
        args.threads = args.threads or 1  # one thread: immune to OpenMP stalls on a busy CI machine
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    common.resolve_model_defaults(args, cuda)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.iters = args.iters or (50 if cuda else 5)
    payload = run(args)
    payload["targets"] = [
        {
            "target": f"metrics < {100 * TARGET_METRICS_SHARE:.0f}% of evaluation time",
            "value": payload["results"]["metrics_share"],
            "met": payload["results"]["metrics_share"] < TARGET_METRICS_SHARE,
        }
    ]
    common.write_json(payload, args.json_out)
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
