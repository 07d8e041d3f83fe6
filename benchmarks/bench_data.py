"""Data-pipeline throughput: JPEG decode, training transforms, collate, DataLoader workers, filtering scan.

The data are VOC-sized (height 375, width 375-500) JPEG images and palettised PNG masks written by
``data/make_synthetic.py --size 375`` into a temporary folder (or an existing data root with
``--data_root``, e.g. the real Pascal VOC 2012). Measured, on the training set of VOC 15-5 step 0
(``VOCSegmentationIncremental`` with the training preset of ``dataset/transform.py``):

* ``decode``: ``PIL.Image.open(...).convert("RGB")`` of the image and loading the mask, one process;
* ``getitem``: the dataset's ``__getitem__`` (decode + RandomResizedCrop + flip + to a uint8 tensor +
  label lookup table), one process; ``transform`` = getitem - decode;
* ``collate``: ``default_collate`` of a batch;
* the DataLoader as ``run.py`` builds it (batch ``--batch``, ``drop_last``, persistent workers), for each
  worker count: images/s in steady state (after the first batch) and the time to the first batch;
* the same stages, interleaved with the above in the same run, for the float pipeline the presets used
  before (``ToTensor`` + ``Normalize`` in the worker, float32 batches): keys ``float_pipeline`` and
  ``comparison`` of the JSON, ratios > 1 in favour of uint8. The uint8 batches are normalised later by
  ``dataset.transform.normalize_on_device``; its cost per batch (on CUDA when there is one, with the
  host-to-device copy, else on the CPU in the main process) is measured against moving a float batch;
* the first filtering scan of the split (every mask read once, ``scan_masks``), in-process and with
  ``--scan_workers`` processes, in masks/s, on a split of ``--scan_masks`` entries (masks copied from the
  generated ones; the scan uses a pool only from 512 masks on).

``--train_json`` takes the JSON of ``bench_train.py`` to compare the pipeline's images/s with a training
iteration's at the same crop.

Examples::

    python benchmarks/bench_data.py --smoke
    python benchmarks/bench_data.py --crop 512 --batch 12 --workers 0 1 2 3 4
    python benchmarks/bench_data.py --data_root /data --crop 512  # real VOC
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.setup_paths()
import testing  # noqa: E402  (the step builders the tests use too)

DEFAULT_NUM_WORKERS = 4  # argparser.py --num_workers default
VOC_TRAIN_AUG_SIZE = 10582  # entries of the real train_aug list, to extrapolate the scan time


def load_make_synthetic() -> Any:
    """``data/make_synthetic.py`` as a module (``data/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(
        "make_synthetic", common.ROOT / "data" / "make_synthetic.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_synthetic"] = module  # its process pool pickles functions by module name
    spec.loader.exec_module(module)
    return module


def make_scan_root(data_root: Path, out: Path, n_masks: int) -> Path:
    """A VOC tree whose ``train_aug`` list has ``n_masks`` entries, cycling over the masks of ``data_root``.

    Every entry gets its own mask file (a copy), the image is a hard link (the scan only checks that it
    exists).
    """
    src = data_root / "PascalVOC2012"
    lines = (src / "list" / "train_aug.txt").read_text().split("\n")
    pairs = [line.split(" ") for line in lines if line.strip()]
    dst = out / "PascalVOC2012"
    (dst / "VOCdevkit" / "VOC2012" / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (dst / "SegmentationClassAug").mkdir(parents=True, exist_ok=True)
    (dst / "list").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n_masks):
        image, mask = (p.lstrip("/") for p in pairs[i % len(pairs)][:2])
        name = f"scan_{i:06d}"
        image_src = src / "VOCdevkit" / "VOC2012" / image
        image_dst = dst / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{name}.jpg"
        try:
            os.link(image_src, image_dst)
        except OSError:
            shutil.copyfile(image_src, image_dst)
        shutil.copyfile(src / mask, dst / "SegmentationClassAug" / f"{name}.png")
        entries.append(f"/JPEGImages/{name}.jpg /SegmentationClassAug/{name}.png\n")
    (dst / "list" / "train_aug.txt").write_text("".join(entries))
    (dst / "list" / "val.txt").write_text("".join(entries[:1]))
    return out


#: The pipelines compared: the training preset now (uint8 images) and before (float32, normalised).
PIPELINES = ("uint8", "float")


def pipeline_transform(pipeline: str, crop: int) -> Any:
    """The training transform of ``pipeline``: ``"uint8"`` = ``train_transform`` (ends with PILToTensor),
    ``"float"`` = the same geometry then ``ToTensor`` + ``Normalize`` in the worker, as before."""
    common.setup_paths()
    from dataset import presets
    from dataset import transform as T

    if pipeline == "uint8":
        return presets.train_transform(crop)
    if pipeline == "float":
        return T.Compose(
            [
                T.RandomResizedCrop(crop, scale=(0.5, 2.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(T.MEAN, T.STD),
            ]
        )
    raise ValueError(f"unknown pipeline {pipeline!r}: expected one of {PIPELINES}")


def with_pipeline(dataset: Any, pipeline: str, crop: int) -> Any:
    """A shallow copy of ``dataset`` (same filtered indices, no new scan) with ``pipeline``'s transform."""
    other = copy.copy(dataset)
    other.transform = pipeline_transform(pipeline, crop)
    return other


def build_train_set(root: Path, crop: int, scan_workers: int = 0) -> Any:
    """The training set of VOC 15-5 step 0 with the training transform, filtered now (no index cache)."""
    common.setup_paths()
    import tasks
    from dataset import VOCSegmentationIncremental

    labels, labels_old, _ = tasks.get_task_labels(testing.DATASET, testing.TASK, 0)
    return VOCSegmentationIncremental(
        root,
        train=True,
        transform=pipeline_transform("uint8", crop),
        labels=list(labels),
        labels_old=list(labels_old),
        idxs_path=None,
        overlap=True,
        scan_workers=scan_workers,
        progress=False,
    )


def time_serial(dataset: Any, n: int) -> dict[str, float]:
    """Per-image seconds of decode alone and of ``__getitem__``, in this process."""
    from PIL import Image

    indices = [dataset.indices[i % len(dataset)] for i in range(n)]
    t0 = time.perf_counter()
    for idx in indices:
        image_path, label_path = dataset.samples[idx]
        Image.open(image_path).convert("RGB")
        with Image.open(label_path) as label:
            label.load()
    decode = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        dataset[i % len(dataset)]
    getitem = (time.perf_counter() - t0) / n
    return {"decode_s": decode, "getitem_s": getitem, "transform_s": max(getitem - decode, 0.0)}


def time_collate(dataset: Any, batch: int, repeats: int) -> float:
    """Seconds of ``default_collate`` of ``batch`` samples (median)."""
    from torch.utils.data import default_collate

    items = [dataset[i % len(dataset)] for i in range(batch)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        default_collate(items)
        times.append(time.perf_counter() - t0)
    return common.median(times)


def time_loader(dataset: Any, batch: int, workers: int, n_batches: int, pin: bool) -> dict[str, float]:
    """DataLoader as in run.py: time to the first batch, then images/s over ``n_batches`` more batches."""
    from torch.utils.data import DataLoader, RandomSampler

    # More workers than cores is measured on purpose; torch's warning about it is expected here.
    warnings.filterwarnings("ignore", message="This DataLoader will create")

    sampler = RandomSampler(dataset, replacement=True, num_samples=batch * (n_batches + 1))
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=pin,
        persistent_workers=workers > 0,
    )
    t0 = time.perf_counter()
    iterator = iter(loader)
    next(iterator)
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    count = 0
    for images, _ in iterator:
        count += images.shape[0]
    steady = time.perf_counter() - t1
    del iterator, loader
    return {
        "workers": workers,
        "first_batch_s": first,
        "img_per_s": count / steady if steady > 0 else 0.0,
        "images": count,
    }


def time_to_device(dataset: Any, batch: int, repeats: int, pin: bool) -> dict[str, Any]:
    """ms per batch of ``normalize_on_device`` on one collated batch, and the batch's bytes.

    On CUDA (when available) this is the host-to-device copy plus, for uint8, the conversion and
    normalisation there; on the CPU it is the normalisation the main process now does (a float batch
    only passes through).
    """
    import torch
    from torch.utils.data import default_collate

    from dataset.transform import normalize_on_device

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = default_collate([dataset[i % len(dataset)] for i in range(batch)])[0]  # (B, 3, H, W)
    if pin and device.type == "cuda":
        images = images.pin_memory()
    times = []
    for _ in range(repeats + 1):  # the first call creates the cached constants: not timed
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        normalize_on_device(images, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "device": str(device),
        "dtype": str(images.dtype).replace("torch.", ""),
        "batch_bytes": images.numel() * images.element_size(),
        "ms_per_batch": 1e3 * common.median(times[1:]),
    }


def compare(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """Ratios of the float pipeline's costs to the uint8 one's (> 1: uint8 is better)."""
    ratio = common.safe_ratio
    return {
        "getitem_speedup": ratio(old["serial"]["getitem_ms"], new["serial"]["getitem_ms"]),
        "transform_speedup": ratio(old["serial"]["transform_ms"], new["serial"]["transform_ms"]),
        "transform_ms_saved": old["serial"]["transform_ms"] - new["serial"]["transform_ms"],
        "collate_speedup": ratio(
            old["serial"]["collate_ms_per_batch"], new["serial"]["collate_ms_per_batch"]
        ),
        "batch_bytes_ratio": ratio(old["to_device"]["batch_bytes"], new["to_device"]["batch_bytes"]),
        "to_device_ms_ratio": ratio(old["to_device"]["ms_per_batch"], new["to_device"]["ms_per_batch"]),
        "loader_img_per_s_ratio": {
            str(a["workers"]): ratio(a["img_per_s"], b["img_per_s"])
            for a, b in zip(new["loader"], old["loader"], strict=True)
        },
    }


def serial_summary(serial: dict[str, float], collate: float) -> dict[str, float]:
    return {
        "decode_img_per_s": 1 / serial["decode_s"],
        "getitem_img_per_s": 1 / serial["getitem_s"],
        "decode_ms": 1e3 * serial["decode_s"],
        "transform_ms": 1e3 * serial["transform_s"],
        "getitem_ms": 1e3 * serial["getitem_s"],
        "collate_ms_per_batch": 1e3 * collate,
    }


def time_scan(root: Path, workers: int) -> float:
    """Seconds of the first filtering scan of the split under ``root`` (dataset construction)."""
    t0 = time.perf_counter()
    build_train_set(root, 64, scan_workers=workers)
    return time.perf_counter() - t0


def train_reference(path: str | None, crop: int) -> dict[str, Any] | None:
    """images/s of our model's training iteration from a bench_train JSON, if its crop matches."""
    if not path:
        return None
    payload = json.loads(Path(path).read_text())
    out = {
        "crop": payload["config"]["crop"],
        "batch": payload["config"]["batch"],
        "device": payload["config"]["device"],
        "backbone": payload["config"]["backbone"],
        "crop_matches": payload["config"]["crop"] == crop,
    }
    for s in payload["steps"]:
        ours = s["variants"].get("ours", {})
        if "img_per_s" in ours:
            out[f"step{s['step']}_img_per_s"] = ours["img_per_s"]
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    machine = common.machine_info()
    if args.data_root:
        root = Path(args.data_root)
        generated = None
    else:
        root = work / "voc"
        t0 = time.perf_counter()
        # The generator reports on stdout; keep stdout for the table or the JSON (--json).
        with contextlib.redirect_stdout(sys.stderr):
            load_make_synthetic().make_synthetic("voc", root, args.num_images, 1, 375, 0, args.gen_workers)
        generated = {"images": args.num_images, "seconds": time.perf_counter() - t0, "height": 375}

    dataset = build_train_set(root, args.crop)
    datasets = {p: with_pipeline(dataset, p, args.crop) for p in PIPELINES}
    # Each stage runs for both pipelines back to back, so that both see the same machine state.
    results: dict[str, dict[str, Any]] = {p: {"loader": []} for p in PIPELINES}
    for p in PIPELINES:
        results[p]["serial_raw"] = time_serial(datasets[p], args.serial_images)
    for p in PIPELINES:
        results[p]["serial"] = serial_summary(
            results[p].pop("serial_raw"), time_collate(datasets[p], args.batch, 5)
        )
    for w in args.workers:
        for p in PIPELINES:
            results[p]["loader"].append(
                time_loader(datasets[p], args.batch, w, args.loader_batches, args.pin)
            )
    for p in PIPELINES:
        results[p]["to_device"] = time_to_device(datasets[p], args.batch, 5, args.pin)
        by_w = {row["workers"]: row for row in results[p]["loader"]}
        row = by_w.get(DEFAULT_NUM_WORKERS)
        results[p]["default_workers_img_per_s"] = row["img_per_s"] if row else None
    new, old = results["uint8"], results["float"]
    loaders = new["loader"]

    scan_root = make_scan_root(root, work / "scan", args.scan_masks)
    scan_serial = time_scan(scan_root, 0)
    scan_parallel = time_scan(scan_root, args.scan_workers)

    by_workers = {row["workers"]: row for row in loaders}
    default = by_workers.get(DEFAULT_NUM_WORKERS)
    payload: dict[str, Any] = {
        "benchmark": "data",
        "date": common.today(),
        "machine": machine,
        "config": {
            "crop": args.crop,
            "batch": args.batch,
            "workers": args.workers,
            "num_images": args.num_images,
            "data_root": str(args.data_root)
            if args.data_root
            else "synthetic (make_synthetic.py --size 375)",
            "dataset_len": len(dataset),
            "scan_masks": args.scan_masks,
            "scan_workers": args.scan_workers,
            "pin_memory": args.pin,
            "threads": args.threads,
            "smoke": args.smoke,
            "pipeline": "uint8 (train_transform: PILToTensor; normalize_on_device on the consumer side)",
        },
        "generated": generated,
        "serial": new["serial"],
        "loader": loaders,
        "to_device": new["to_device"],
        "float_pipeline": {
            "description": "ToTensor + Normalize in the worker (the preset before uint8), float32 batches",
            **old,
        },
        "comparison": compare(new, old),
        "scan": {
            "serial_masks_per_s": args.scan_masks / scan_serial,
            "parallel_masks_per_s": args.scan_masks / scan_parallel,
            "speedup": scan_serial / scan_parallel,
            "voc_train_aug_serial_s": VOC_TRAIN_AUG_SIZE * scan_serial / args.scan_masks,
            "voc_train_aug_parallel_s": VOC_TRAIN_AUG_SIZE * scan_parallel / args.scan_masks,
        },
        "default_workers": DEFAULT_NUM_WORKERS,
        "default_workers_img_per_s": default["img_per_s"] if default else None,
    }
    reference = train_reference(args.train_json, args.crop)
    if reference is not None:
        payload["train_reference"] = reference
        feed = payload["default_workers_img_per_s"]
        payload["targets"] = [
            {
                "target": f"pipeline ({DEFAULT_NUM_WORKERS} workers) feeds training step {k[4]}",
                "value": feed / v if feed else None,
                "met": bool(feed and feed >= v),
            }
            for k, v in reference.items()
            if k.endswith("_img_per_s")
        ]
    else:
        payload["targets"] = []
    return payload


def render_comparison(payload: dict[str, Any]) -> str:
    """The uint8 pipeline next to the float one: per-image, per-batch and DataLoader figures."""
    new, old, cmp = payload, payload["float_pipeline"], payload["comparison"]
    cfg = payload["config"]
    dev = new["to_device"]["device"]
    to_device = "H2D copy + normalise" if dev.startswith("cuda") else "normalise (main process)"
    rows = [
        [
            "__getitem__ ms/img",
            new["serial"]["getitem_ms"],
            old["serial"]["getitem_ms"],
            cmp["getitem_speedup"],
        ],
        [
            "transforms + LUT ms/img",
            new["serial"]["transform_ms"],
            old["serial"]["transform_ms"],
            cmp["transform_speedup"],
        ],
        [
            f"collate ms/batch of {cfg['batch']}",
            new["serial"]["collate_ms_per_batch"],
            old["serial"]["collate_ms_per_batch"],
            cmp["collate_speedup"],
        ],
        [
            "image batch MiB",
            new["to_device"]["batch_bytes"] / 2**20,
            old["to_device"]["batch_bytes"] / 2**20,
            cmp["batch_bytes_ratio"],
        ],
        [
            f"{to_device} on {dev}, ms/batch",
            new["to_device"]["ms_per_batch"],
            old["to_device"]["ms_per_batch"],
            cmp["to_device_ms_ratio"],
        ],
    ]
    for a, b in zip(new["loader"], old["loader"], strict=True):
        rows.append(
            [
                f"DataLoader {a['workers']} workers img/s",
                a["img_per_s"],
                b["img_per_s"],
                cmp["loader_img_per_s_ratio"][str(a["workers"])],
            ]
        )
    return common.format_table(
        ["uint8 vs float32 pipeline", "uint8 (now)", "float32 (before)", "ratio (>1: uint8 better)"], rows
    )


def render(payload: dict[str, Any]) -> str:
    cfg, serial, scan = payload["config"], payload["serial"], payload["scan"]
    machine = payload["machine"]
    lines = [
        f"bench_data {payload['date']}  crop={cfg['crop']}  batch={cfg['batch']}  data={cfg['data_root']}  "
        f"train set (VOC 15-5 step 0): {cfg['dataset_len']} images",
        f"machine: {machine['cpu']} ({machine['cpu_cores']} cores), torch {machine['torch']}, "
        f"load average {common.fmt(machine.get('loadavg_1min'))} at start",
        "",
        common.format_table(
            ["stage (1 process)", "ms/img", "img/s"],
            [
                ["JPEG decode + mask load", serial["decode_ms"], serial["decode_img_per_s"]],
                ["train transforms + LUT (uint8)", serial["transform_ms"], None],
                ["__getitem__ (all of it)", serial["getitem_ms"], serial["getitem_img_per_s"]],
                [f"collate (per batch of {cfg['batch']})", serial["collate_ms_per_batch"], None],
            ],
        ),
        "",
        common.format_table(
            ["DataLoader workers", "img/s (steady)", "first batch s"],
            [[row["workers"], row["img_per_s"], row["first_batch_s"]] for row in payload["loader"]],
        ),
        "",
        common.format_table(
            ["filtering scan", "masks/s", f"extrapolated to {VOC_TRAIN_AUG_SIZE} masks (s)"],
            [
                ["in-process", scan["serial_masks_per_s"], scan["voc_train_aug_serial_s"]],
                [
                    f"scan_workers={cfg['scan_workers']}",
                    scan["parallel_masks_per_s"],
                    scan["voc_train_aug_parallel_s"],
                ],
            ],
        ),
        f"scan speed-up: {scan['speedup']:.2f}x on {cfg['scan_masks']} masks",
        "",
        render_comparison(payload),
    ]
    ref = payload.get("train_reference")
    if ref:
        lines.append(
            f"training reference ({ref['device']}, {ref['backbone']}, crop {ref['crop']}, "
            f"batch {ref['batch']}"
            f"{'' if ref['crop_matches'] else ', DIFFERENT CROP'}): "
            + ", ".join(f"{k[:5]} {v:.2f} img/s" for k, v in ref.items() if k.endswith("_img_per_s"))
        )
    for check in payload["targets"]:
        lines.append(
            f"target {check['target']}: pipeline/training = {common.fmt(check['value'])} -> "
            f"{'MET' if check['met'] else 'MISSED'}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--crop", type=int, default=512, help="training crop size")
    parser.add_argument("--batch", type=int, default=12, help="batch size")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=list(range(DEFAULT_NUM_WORKERS + 1)),
        help="DataLoader worker counts to measure",
    )
    parser.add_argument(
        "--data_root",
        type=str,
        default=None,
        help="existing VOC data root (default: generate synthetic data in a temp folder)",
    )
    parser.add_argument("--num_images", type=int, default=160, help="synthetic training images to generate")
    parser.add_argument("--gen_workers", type=int, default=None, help="processes for the generator")
    parser.add_argument("--serial_images", type=int, default=64, help="images timed in one process")
    parser.add_argument("--loader_batches", type=int, default=20, help="batches timed per worker count")
    parser.add_argument("--scan_masks", type=int, default=2048, help="entries of the split for the scan")
    parser.add_argument("--scan_workers", type=int, default=DEFAULT_NUM_WORKERS, help="processes of the scan")
    parser.add_argument("--pin", action="store_true", help="pin_memory=True (as run.py on CUDA)")
    parser.add_argument("--train_json", type=str, default=None, help="bench_train.py JSON to compare with")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process (DataLoader workers always use 1); more than 1 stalls small "
        "tensor ops whenever another process occupies a core",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="CI mode: 12 images, crop 64, batch 2, workers 0 and 1, 520-mask scan",
    )
    common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_images, args.crop, args.batch, args.workers = 12, 64, 2, [0, 1]
        args.serial_images, args.loader_batches, args.scan_masks, args.scan_workers = 8, 3, 520, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    try:
        payload = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    common.write_json(payload, args.json_out)
    print(json.dumps(payload, indent=2, sort_keys=True) if args.json else render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
