"""Make a small synthetic dataset laid out exactly like Pascal VOC 2012, ADE20k, S3DIS or ScanNet v2.

Each foreground class is a unique (shape, colour, texture) combination drawn on a cluttered,
low-saturation textured background, 1-4 objects per image, class frequencies balanced. Consecutive
class ids (which end up in the same incremental step) differ in shape, texture and colour at once, so
a small CNN can learn them at 64-128 px and continual-learning effects (background shift,
forgetting) behave as on real data. Output is byte-identical for a given seed, whatever the number
of worker processes.

For ``--dataset s3dis|scannet`` it writes rooms (``--num_train`` training and ``--num_val`` test rooms)
in the raw layout of the 3D download (data/synthetic_3d.py), then runs the block preparation a user runs
on the real download (data/prepare_3d.py), so that DATA_ROOT is ready for ``run.py --data_root``.

Usage:
    python data/make_synthetic.py --dataset voc --out DATA_ROOT --num_train 800 --num_val 200 \\
        --size 128 --seed 0 [--workers W]
    python data/make_synthetic.py --dataset scannet --out DATA_ROOT --num_train 8 --num_val 2 --seed 0
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

NUM_CLASSES = {"voc": 20, "ade": 150}  # foreground classes; 0 is background
POINT_CLOUD_DATASETS = ("s3dis", "scannet")  # rooms, written by data/synthetic_3d.py

SHAPES = ("disk", "square", "triangle", "ring", "cross")
TEXTURES = ("solid", "stripes", "checker")
# Ten saturated hues in hue-wheel order; the background only uses low-saturation colours.
_HUES = [
    (220, 30, 30),
    (245, 130, 10),
    (235, 215, 20),
    (150, 230, 40),
    (30, 180, 40),
    (20, 200, 210),
    (30, 60, 220),
    (120, 40, 180),
    (210, 40, 200),
    (250, 120, 160),
]
# Colour index c -> hue 3c mod 10, so that neighbouring colour indices are far apart on the wheel.
COLOURS = [_HUES[(3 * c) % 10] for c in range(10)]
CHUNK = 16


def class_style(cls: int) -> tuple[str, tuple[int, int, int], str]:
    """(shape, RGB colour, texture) of foreground class ``cls`` (1-based).

    ``idx = cls - 1``: shape ``idx % 5`` and texture ``idx % 3`` (a bijection with ``idx % 15``), colour
    ``(idx + 2 * (idx // 15)) % 10``; the triple is unique for the 150 classes, and consecutive classes
    differ in all three attributes.
    """
    idx = cls - 1
    return SHAPES[idx % 5], COLOURS[(idx + 2 * (idx // 15)) % 10], TEXTURES[idx % 3]


def voc_palette() -> list[int]:
    """The standard Pascal VOC colour map (256 RGB entries, flattened): 255 -> (224, 224, 192)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def _shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = xx - cx, yy - cy
    if shape == "disk":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "triangle":  # apex up, base at cy + 0.75 r
        return (dy <= 0.75 * r) & (np.abs(dx) <= 0.62 * (dy + r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    # cross
    arm = 0.32 * r
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))


def _texture(
    texture: str, colour: np.ndarray, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """(H, W, 3) float painting of ``colour`` with the class texture (random phase/orientation)."""
    base = np.broadcast_to(colour, (*xx.shape, 3)).astype(np.float32)
    if texture == "solid":
        return base
    period = int(rng.integers(5, 8))
    phase = int(rng.integers(0, period))
    if texture == "stripes":
        direction = 1 if rng.random() < 0.5 else -1
        on = ((xx + direction * yy + phase) % period) < period / 2
        dark = base * 0.35
        return np.where(on[..., None], base, dark)
    on = (((xx + phase) // (period // 2 + 1)) + ((yy + phase) // (period // 2 + 1))) % 2 == 0
    light = base * 0.45 + 255 * 0.55
    return np.where(on[..., None], base, light)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Cluttered low-saturation background: smooth grey field, tinted blobs and pixel noise."""
    grey = rng.uniform(60, 190)
    tint = rng.uniform(-14, 14, size=3)
    coarse = rng.uniform(-40, 40, size=(4, 5)).astype(np.float32)
    field = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC))
    img = np.empty((h, w, 3), dtype=np.float32)
    img[...] = grey + tint
    img += field[..., None]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        ax, ay = rng.uniform(0.05, 0.3) * w, rng.uniform(0.05, 0.3) * h
        blob = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        level = rng.uniform(40, 210)
        img[blob] = level + rng.uniform(-18, 18, size=3)
    img += rng.normal(0, 10, size=img.shape).astype(np.float32)
    return img


def _border(label: np.ndarray, width: int) -> np.ndarray:
    """VOC-style void band: pixels next to a label change that involves a foreground object."""
    band = np.zeros(label.shape, dtype=bool)
    for a, b, sa, sb in (
        (label[:, 1:], label[:, :-1], np.s_[:, 1:], np.s_[:, :-1]),
        (label[1:, :], label[:-1, :], np.s_[1:, :], np.s_[:-1, :]),
    ):
        edge = (a != b) & ((a > 0) | (b > 0))
        band[sa] |= edge
        band[sb] |= edge
    if width >= 3:  # widen by one pixel down/right
        band[1:, :] |= band[:-1, :].copy()
    return band


def render(
    dataset: str, classes: Sequence[int], size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 mask with the given object classes."""
    h = size
    w = int(round(size * rng.uniform(1.0, 4.0 / 3.0)))
    img = _background(rng, h, w)
    label = np.zeros((h, w), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for cls in classes:
        shape, colour, texture = class_style(int(cls))
        r = rng.uniform(0.16, 0.3) * h
        cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
        mask = _shape_mask(shape, xx, yy, cx, cy, r)
        shade = np.asarray(colour, dtype=np.float32) * rng.uniform(0.85, 1.1)
        paint = _texture(texture, np.clip(shade, 0, 255), xx, yy, rng)
        img[mask] = paint[mask] + rng.normal(0, 6, size=(int(mask.sum()), 3))
        label[mask] = cls
    if dataset == "voc":
        label[_border(label, int(rng.integers(2, 4)))] = 255
    return np.clip(img, 0, 255).astype(np.uint8), label


def class_schedule(n_images: int, n_classes: int, seed: int, stream: int) -> list[list[int]]:
    """Object classes of every image: 1-4 per image, taken from consecutive random permutations of
    all classes, so every class occurs equally often (up to one)."""
    rng = np.random.default_rng([seed, stream, 0])
    counts = rng.integers(1, 5, size=n_images)
    n_perm = max(1, math.ceil(int(counts.sum()) / n_classes))
    seq = np.concatenate([rng.permutation(n_classes) + 1 for _ in range(n_perm)]).tolist()
    out, pos = [], 0
    for c in counts:
        out.append(seq[pos : pos + int(c)])
        pos += int(c)
    return out


def _paths(dataset: str, root: Path, split: str, index: int) -> tuple[Path, Path, str]:
    if dataset == "voc":
        name = f"{split}_{index:06d}"
        voc = root / "PascalVOC2012"
        return (
            voc / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{name}.jpg",
            voc / "SegmentationClassAug" / f"{name}.png",
            name,
        )
    folder = "training" if split == "train" else "validation"
    name = f"ADE_{split}_{index + 1:08d}"
    ade = root / "ADEChallengeData2016"
    return ade / "images" / folder / f"{name}.jpg", ade / "annotations" / folder / f"{name}.png", name


def _render_chunk(job: tuple[str, str, str, int, int, list[tuple[int, list[int]]]]) -> np.ndarray:
    """Render and write a chunk of images; returns per-class pixel counts ``(len, 256)``."""
    dataset, root, split, size, seed, items = job
    palette = voc_palette() if dataset == "voc" else None
    stream = 1 if split == "train" else 2
    counts = np.zeros((len(items), 256), dtype=np.int64)
    for row, (index, classes) in enumerate(items):
        rng = np.random.default_rng([seed, stream, 1, index])
        img, label = render(dataset, classes, size, rng)
        img_path, mask_path, _ = _paths(dataset, Path(root), split, index)
        Image.fromarray(img).save(img_path, quality=90)
        mask = Image.fromarray(label)  # mode L
        if palette is not None:
            mask.putpalette(palette)  # L -> P with the VOC colours, values unchanged
        mask.save(mask_path)
        counts[row] = np.bincount(label.ravel(), minlength=256)
    return counts


def _prepare(dataset: str, root: Path) -> None:
    """Create the folders; refuse to touch a real dataset, replace an earlier synthetic one."""
    top = root / ("PascalVOC2012" if dataset == "voc" else "ADEChallengeData2016")
    _load_sibling(Path(__file__).resolve().parent / "synthetic_3d.py", "synthetic_3d").prepare_top(top)
    if dataset == "voc":
        for sub in ("VOCdevkit/VOC2012/JPEGImages", "SegmentationClassAug", "list"):
            (top / sub).mkdir(parents=True, exist_ok=True)
    else:
        for sub in ("images/training", "images/validation", "annotations/training", "annotations/validation"):
            (top / sub).mkdir(parents=True, exist_ok=True)


def _write_metadata(
    dataset: str, root: Path, names: dict[str, list[str]], counts: dict[str, np.ndarray]
) -> None:
    if dataset == "voc":
        lists = root / "PascalVOC2012" / "list"
        for split, list_name in (("train", "train_aug.txt"), ("val", "val.txt")):
            lines = [f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in names[split]]
            (lists / list_name).write_text("".join(lines))
        return
    class_names = _ade_names(Path(__file__).resolve().parent.parent / "dataset" / "ade.py")
    ade = root / "ADEChallengeData2016"
    train_px, val_px = counts["train"], counts["val"]
    total_px = max(1, int(train_px.sum()))
    rows = ["Idx\tRatio\tTrain\tVal\tName\n"]
    for c in range(1, 151):
        ratio = train_px[:, c].sum() / total_px
        n_train, n_val = int((train_px[:, c] > 0).sum()), int((val_px[:, c] > 0).sum())
        rows.append(f"{c}\t{ratio:.4f}\t{n_train}\t{n_val}\t{class_names[c]}\n")
    (ade / "objectInfo150.txt").write_text("".join(rows))
    scenes = [f"{n} synthetic\n" for split in ("train", "val") for n in names[split]]
    (ade / "sceneCategories.txt").write_text("".join(scenes))


def _ade_names(path: Path) -> list[str]:
    """ADE class names read from dataset/ade.py (parsed, not imported: no torch import needed)."""
    try:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "ADE_CLASSES":
                return list(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return ["void"] + [f"class{c}" for c in range(1, 151)]


def make_synthetic(
    dataset: str,
    out: str | os.PathLike,
    num_train: int,
    num_val: int,
    size: int,
    seed: int,
    workers: int | None = None,
) -> Path:
    """Write a synthetic VOC or ADE20k tree under ``out`` and return ``out``.

    Args:
        dataset: ``voc`` (20 classes, palettised masks with a 255 border), ``ade`` (150 classes, L masks),
            or ``s3dis`` / ``scannet`` (rooms of points, see :func:`make_synthetic_3d`).
        out: data root (receives ``PascalVOC2012/`` or ``ADEChallengeData2016/``).
        num_train: training images (``train_aug`` / ``training``).
        num_val: validation images (``val`` / ``validation``).
        size: image height in pixels (width is 1 to 4/3 times it); unused for 3D.
        seed: random seed; the same seed gives byte-identical files.
        workers: processes (None = all CPUs); does not change the output.
    """
    if dataset in POINT_CLOUD_DATASETS:
        return make_synthetic_3d(dataset, out, num_train, num_val, seed, workers)
    if dataset not in NUM_CLASSES:
        raise ValueError(f"dataset must be one of {sorted(NUM_CLASSES)}, not {dataset!r}")
    if size < 16:
        raise ValueError("size must be at least 16 pixels")
    start = time.perf_counter()
    root = Path(out)
    _prepare(dataset, root)
    n_classes = NUM_CLASSES[dataset]
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    names: dict[str, list[str]] = {}
    counts: dict[str, np.ndarray] = {}
    jobs = []
    for split, n, stream in (("train", num_train, 1), ("val", num_val, 2)):
        schedule = class_schedule(n, n_classes, seed, stream)
        names[split] = [_paths(dataset, root, split, i)[2] for i in range(n)]
        items = list(enumerate(schedule))
        for i in range(0, n, CHUNK):
            jobs.append((dataset, str(root), split, size, seed, items[i : i + CHUNK]))
    if workers > 1 and len(jobs) > 1:
        # fork: children inherit this module even when it was loaded from a file path (tests).
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(workers, len(jobs))) as pool:
            results = pool.map(_render_chunk, jobs)
    else:
        results = [_render_chunk(job) for job in jobs]
    for split in ("train", "val"):
        parts = [r for job, r in zip(jobs, results) if job[2] == split]
        counts[split] = np.concatenate(parts) if parts else np.zeros((0, 256), dtype=np.int64)
    _write_metadata(dataset, root, names, counts)
    elapsed = time.perf_counter() - start
    print(
        f"make_synthetic: {dataset} {num_train} train + {num_val} val images, {size} px, "
        f"{n_classes} classes, seed {seed} -> {root} ({elapsed:.1f} s, {workers} workers)"
    )
    return root


def make_synthetic_3d(
    dataset: str, out: str | os.PathLike, num_train: int, num_val: int, seed: int, workers: int | None = None
) -> Path:
    """Write synthetic S3DIS or ScanNet rooms under ``out`` and cut them into blocks; returns ``out``.

    The rooms are written in the raw layout of the download (``out/S3DIS/Stanford3dDataset_v1.2_Aligned_
    Version/...`` or ``out/ScanNet/scans/...``, see data/synthetic_3d.py); the blocks by the same
    preparation as for the real data (data/prepare_3d.py), with its default settings.
    """
    start = time.perf_counter()
    workers = (os.cpu_count() or 1) if workers is None else max(1, workers)
    here = Path(__file__).resolve().parent
    generator = _load_sibling(here / "synthetic_3d.py", "synthetic_3d")
    generator.make_synthetic_3d(dataset, out, num_train, num_val, seed, workers)
    generated = time.perf_counter() - start
    _load_sibling(here / "prepare_3d.py", "prepare_3d").run(dataset, out, workers=workers)
    print(
        f"make_synthetic: {dataset} {num_train} train + {num_val} test rooms, seed {seed} -> {out} "
        f"({generated:.1f} s to generate, {time.perf_counter() - start:.1f} s with the block preparation, "
        f"{workers} workers)"
    )
    return Path(out)


def _load_sibling(path: Path, name: str):
    """Import a script of this folder by path (data/ is not a package; tests load this file by path too)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=[*sorted(NUM_CLASSES), *POINT_CLOUD_DATASETS], default="voc")
    parser.add_argument("--out", required=True, help="data root to write (pass it as --data_root)")
    parser.add_argument("--num_train", type=int, default=800, help="training images (3D: rooms)")
    parser.add_argument("--num_val", type=int, default=200, help="validation images (3D: test rooms)")
    parser.add_argument("--size", type=int, default=128, help="image height in pixels (2D only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs)")
    args = parser.parse_args(argv)
    make_synthetic(args.dataset, args.out, args.num_train, args.num_val, args.size, args.seed, args.workers)


if __name__ == "__main__":
    main()
