"""Synthetic indoor scenes in the raw layout of S3DIS or ScanNet v2 (used by make_synthetic.py).

Each room is a box-shaped space with a floor, four walls and (S3DIS, whose class list has one) a ceiling,
furnished with objects of the dataset's classes. Every class has its own shape and colour (a red chair of
seat, back and legs, a flat light-blue window in a wall, a brown door down to the floor, a tall purple
bookcase, ...), so that a small DGCNN can tell them apart from 2,048 points of a 1 m block. Object classes
are dealt to rooms from consecutive random permutations, so each class is in about as many rooms as the
others. Points are sampled on the surfaces at a fixed density, colours carry a little noise.

The files are those of the real downloads, so the preparation a user runs on them is the same:

* S3DIS: ``S3DIS/Stanford3dDataset_v1.2_Aligned_Version/Area_N/<type>_<k>/Annotations/<class>_<i>.txt``
  (``x y z r g b`` lines, 3 decimals) and the whole-room ``<type>_<k>.txt``; training rooms in Areas
  1-4 and 6, the ``num_val`` test rooms in Area_5. One clutter object of the first training room with
  clutter is written as ``stairs_1.txt``, a name outside the 13 classes that the download also has (it
  counts as clutter).
* ScanNet: ``ScanNet/scans/sceneXXXX_00/`` with the binary PLY mesh ``_vh_clean_2.ply`` (vertices x y z
  red green blue alpha, then faces), the over-segmentation ``_vh_clean_2.0.010000.segs.json`` and the
  object aggregation ``.aggregation.json`` whose labels are raw ScanNet categories (several per class,
  e.g. "office chair"); ``ScanNet/scannetv2-labels.combined.tsv`` maps them to NYU40 ids (refrigerator
  under the official misspelling "refridgerator"; props such as "lamp" or "box" map to no benchmark class,
  i.e. unannotated); ``ScanNet/scannetv2_train.txt`` / ``scannetv2_val.txt`` list the scenes. A few mesh
  vertices belong to no object, as in real scans.

Output is identical for a given seed, whatever the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

MARKER = "SYNTHETIC.txt"
#: Surface sampling density in points per square metre. A 1 m block of floor (+ ceiling for S3DIS)
#: then holds more than the 1,000 points the preparation requires.
DENSITY = {"s3dis": 700.0, "scannet": 1200.0}
S3DIS_ROOM_TYPES = ("office", "conferenceRoom", "hallway", "lounge", "storage", "pantry", "copyRoom")
S3DIS_TRAIN_AREAS = ("Area_1", "Area_2", "Area_3", "Area_4", "Area_6")
S3DIS_TEST_AREA = "Area_5"

Points = tuple[np.ndarray, np.ndarray]  # (m, 3) float64 xyz, (m, 3) float64 rgb
Builder = Callable[[np.random.Generator, dict], Points]

# ---------------------------------------------------------------------------------------------------------
# Surface primitives. Every function returns (xyz, rgb) with rgb the object's base colour (noise added later).


def _count(rng: np.random.Generator, area: float, density: float) -> int:
    return int(rng.poisson(max(area, 0.0) * density))


def rect(
    rng: np.random.Generator, origin: Sequence[float], u: Sequence[float], v: Sequence[float], density: float
) -> np.ndarray:
    """Points on the parallelogram ``origin + a u + b v``, a, b in [0, 1]."""
    u_, v_ = np.asarray(u, dtype=np.float64), np.asarray(v, dtype=np.float64)
    n = _count(rng, float(np.linalg.norm(np.cross(u_, v_))), density)
    ab = rng.random((n, 2))
    return np.asarray(origin, dtype=np.float64) + ab[:, :1] * u_ + ab[:, 1:] * v_


def box(
    rng: np.random.Generator,
    lo: Sequence[float],
    size: Sequence[float],
    density: float,
    bottom: bool = False,
    top: bool = True,
) -> np.ndarray:
    """Points on the faces of the axis-aligned box ``lo .. lo + size`` (no bottom face by default)."""
    (x, y, z), (sx, sy, sz) = lo, size
    faces = [
        rect(rng, (x, y, z), (sx, 0, 0), (0, 0, sz), density),
        rect(rng, (x, y + sy, z), (sx, 0, 0), (0, 0, sz), density),
        rect(rng, (x, y, z), (0, sy, 0), (0, 0, sz), density),
        rect(rng, (x + sx, y, z), (0, sy, 0), (0, 0, sz), density),
    ]
    if top:
        faces.append(rect(rng, (x, y, z + sz), (sx, 0, 0), (0, sy, 0), density))
    if bottom:
        faces.append(rect(rng, (x, y, z), (sx, 0, 0), (0, sy, 0), density))
    return np.concatenate(faces)


def cylinder(
    rng: np.random.Generator,
    centre: Sequence[float],
    radius: float,
    height: float,
    density: float,
    top: bool = True,
) -> np.ndarray:
    """Points on a vertical cylinder standing on ``centre`` (side and top disk)."""
    cx, cy, z = centre
    n = _count(rng, 2 * math.pi * radius * height, density)
    t, h = rng.uniform(0, 2 * math.pi, n), rng.uniform(0, height, n)
    side = np.stack([cx + radius * np.cos(t), cy + radius * np.sin(t), z + h], axis=1)
    if not top:
        return side
    m = _count(rng, math.pi * radius**2, density)
    r, t = radius * np.sqrt(rng.random(m)), rng.uniform(0, 2 * math.pi, m)
    cap = np.stack([cx + r * np.cos(t), cy + r * np.sin(t), np.full(m, z + height)], axis=1)
    return np.concatenate([side, cap])


def sphere(rng: np.random.Generator, centre: Sequence[float], radius: float, density: float) -> np.ndarray:
    n = _count(rng, 4 * math.pi * radius**2, density)
    d = rng.standard_normal((n, 3))
    return np.asarray(centre) + radius * d / np.linalg.norm(d, axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------------------
# Objects. ``p`` holds the room (size, height, density) and the placement drawn by ``place``.


def _legs(
    rng: np.random.Generator,
    p: dict,
    lo: Sequence[float],
    size: Sequence[float],
    height: float,
    leg: float = 0.05,
) -> list[np.ndarray]:
    (x, y, z), (sx, sy) = lo, size[:2]
    corners = [(x, y), (x + sx - leg, y), (x, y + sy - leg), (x + sx - leg, y + sy - leg)]
    return [box(rng, (cx, cy, z), (leg, leg, height), p["density"], top=False) for cx, cy in corners]


def table_like(top_z: float, thickness: float = 0.05) -> Builder:
    """A slab on four legs (table, desk)."""

    def build(rng: np.random.Generator, p: dict) -> np.ndarray:
        (x, y), (sx, sy) = p["xy"], p["size"][:2]
        slab = box(rng, (x, y, top_z - thickness), (sx, sy, thickness), p["density"], bottom=True)
        return np.concatenate([slab, *_legs(rng, p, (x, y, 0), (sx, sy), top_z - thickness)])

    return build


def chair(rng: np.random.Generator, p: dict) -> np.ndarray:
    (x, y), (sx, sy, _) = p["xy"], p["size"]
    seat = box(rng, (x, y, 0.42), (sx, sy, 0.06), p["density"], bottom=True)
    back = box(rng, (x, y + sy - 0.06, 0.48), (sx, 0.06, 0.45), p["density"])
    return np.concatenate([seat, back, *_legs(rng, p, (x, y, 0), (sx, sy), 0.42)])


def sofa(rng: np.random.Generator, p: dict) -> np.ndarray:
    (x, y), (sx, sy, _) = p["xy"], p["size"]
    base = box(rng, (x, y, 0), (sx, sy, 0.42), p["density"])
    back = box(rng, (x, y + sy - 0.2, 0.42), (sx, 0.2, 0.4), p["density"])
    arms = [box(rng, (ax, y, 0.42), (0.15, sy - 0.2, 0.2), p["density"]) for ax in (x, x + sx - 0.15)]
    return np.concatenate([base, back, *arms])


def solid(rng: np.random.Generator, p: dict) -> np.ndarray:
    """A closed box standing on the floor (bookcase, cabinet, refrigerator, counter, bed base)."""
    (x, y), size = p["xy"], p["size"]
    return box(rng, (x, y, 0), size, p["density"])


def bed(rng: np.random.Generator, p: dict) -> np.ndarray:
    (x, y), (sx, sy, sz) = p["xy"], p["size"]
    head = box(rng, (x, y + sy - 0.08, 0), (sx, 0.08, sz + 0.5), p["density"])
    return np.concatenate([box(rng, (x, y, 0), (sx, sy - 0.08, sz), p["density"]), head])


def tub(rng: np.random.Generator, p: dict) -> np.ndarray:
    """An open-topped shell: outer and inner sides and the rim (bathtub)."""
    (x, y), (sx, sy, sz) = p["xy"], p["size"]
    wall = 0.08
    outer = box(rng, (x, y, 0), (sx, sy, sz), p["density"], top=False)
    inner = box(
        rng,
        (x + wall, y + wall, 0.1),
        (sx - 2 * wall, sy - 2 * wall, sz - 0.1),
        p["density"],
        bottom=True,
        top=False,
    )
    return np.concatenate([outer, inner])


def sink(rng: np.random.Generator, p: dict) -> np.ndarray:
    (x, y), (sx, sy, sz) = p["xy"], p["size"]
    stand = cylinder(rng, (x + sx / 2, y + sy / 2, 0), 0.08, sz - 0.15, p["density"], top=False)
    bowl = cylinder(rng, (x + sx / 2, y + sy / 2, sz - 0.15), min(sx, sy) / 2, 0.15, p["density"])
    return np.concatenate([stand, bowl])


def toilet(rng: np.random.Generator, p: dict) -> np.ndarray:
    (x, y), (sx, sy, _) = p["xy"], p["size"]
    bowl = cylinder(rng, (x + sx / 2, y + sy * 0.4, 0), sx / 2, 0.42, p["density"])
    tank = box(rng, (x, y + sy - 0.18, 0.42), (sx, 0.18, 0.35), p["density"])
    return np.concatenate([bowl, tank])


def round_thing(rng: np.random.Generator, p: dict) -> np.ndarray:
    """A pedestal with a ball on it (otherfurniture)."""
    (x, y), (sx, _, sz) = p["xy"], p["size"]
    r = sx / 2
    return np.concatenate(
        [
            cylinder(rng, (x + r, y + r, 0), 0.06, sz - r, p["density"], top=False),
            sphere(rng, (x + r, y + r, sz), r, p["density"]),
        ]
    )


def clutter(rng: np.random.Generator, p: dict) -> np.ndarray:
    """A heap of small boxes, balls and cans in one spot."""
    (x, y), (sx, sy, _) = p["xy"], p["size"]
    parts = []
    for _ in range(int(rng.integers(4, 8))):
        cx, cy = x + rng.uniform(0.1, sx - 0.1), y + rng.uniform(0.1, sy - 0.1)
        kind, r = int(rng.integers(0, 3)), rng.uniform(0.08, 0.16)
        if kind == 0:
            parts.append(box(rng, (cx - r, cy - r, 0), (2 * r, 2 * r, 2 * r), p["density"]))
        elif kind == 1:
            parts.append(sphere(rng, (cx, cy, r), r, p["density"]))
        else:
            parts.append(cylinder(rng, (cx, cy, 0), r * 0.7, 3 * r, p["density"]))
    return np.concatenate(parts)


def wall_panel(bottom: float, wavy: bool = False) -> Builder:
    """A flat (or folded, for curtains) panel on a wall, ``bottom`` metres above the floor."""

    def build(rng: np.random.Generator, p: dict) -> np.ndarray:
        width, _, height = p["size"]
        pts = rect(rng, (0, 0, 0), (width, 0, 0), (0, 0, height), p["density"] * (1.6 if wavy else 1.0))
        offset = 0.02 + (0.06 * (1 + np.sin(pts[:, 0] * 2 * math.pi / 0.25)) if wavy else 0.0)
        return _on_wall(p, pts[:, 0], offset, bottom + pts[:, 2])

    return build


def _on_wall(p: dict, along: np.ndarray, off: np.ndarray | float, z: np.ndarray) -> np.ndarray:
    """Map (distance along the wall from the placement start, distance from the wall, z) to room xyz."""
    (rx, ry), wall, start = p["room"], p["wall"], p["start"]
    s = start + along
    off = np.broadcast_to(off, s.shape)
    if wall == 0:
        return np.stack([s, off, z], 1)
    if wall == 1:
        return np.stack([s, ry - off, z], 1)
    if wall == 2:
        return np.stack([off, s, z], 1)
    return np.stack([rx - off, s, z], 1)


def column(rng: np.random.Generator, p: dict) -> np.ndarray:
    width, depth, _ = p["size"]
    pts = box(rng, (0, 0, 0), (width, depth, p["height"]), p["density"], top=False)
    return _on_wall(p, pts[:, 0], pts[:, 1], pts[:, 2])


def beam(rng: np.random.Generator, p: dict) -> np.ndarray:
    """A beam across the room under the ceiling, along x or y."""
    (rx, ry), (_, width, depth) = p["room"], p["size"]
    pos, along_x = p["pos"], p["wall"] % 2 == 0
    length = rx if along_x else ry
    pts = box(rng, (0, 0, p["height"] - depth), (length, width, depth), p["density"], bottom=True, top=False)
    if along_x:
        return np.stack([pts[:, 0], pos + pts[:, 1], pts[:, 2]], 1)
    return np.stack([pos + pts[:, 1], pts[:, 0], pts[:, 2]], 1)


# name -> (builder, placement, size range (w, d, h) low/high, colour). Placements: "floor" (free-standing,
# random spot), "wall" (against or in a wall, at a random place along it), "ceiling" (beam).
STYLES: dict[
    str,
    tuple[Builder, str, tuple[tuple[float, float, float], tuple[float, float, float]], tuple[int, int, int]],
] = {
    "beam": (beam, "ceiling", ((0, 0.25, 0.25), (0, 0.35, 0.35)), (120, 120, 20)),
    "column": (column, "wall", ((0.35, 0.35, 0), (0.5, 0.5, 0)), (100, 120, 150)),
    "window": (wall_panel(0.9), "wall", ((0.9, 0, 0.9), (1.4, 0, 1.2)), (120, 185, 240)),
    "door": (wall_panel(0.0), "wall", ((0.85, 0, 2.0), (1.0, 0, 2.1)), (110, 55, 25)),
    "table": (table_like(0.75), "floor", ((1.0, 0.7, 0), (1.4, 0.9, 0)), (245, 130, 20)),
    "desk": (table_like(0.72, 0.1), "floor", ((1.2, 0.6, 0), (1.6, 0.75, 0)), (200, 160, 60)),
    "chair": (chair, "floor", ((0.45, 0.45, 0), (0.55, 0.55, 0)), (215, 35, 35)),
    "sofa": (sofa, "floor", ((1.6, 0.8, 0), (2.0, 0.95, 0)), (40, 150, 60)),
    "bookcase": (solid, "floor", ((0.8, 0.35, 1.8), (1.0, 0.4, 2.0)), (130, 50, 180)),
    "bookshelf": (solid, "floor", ((0.8, 0.35, 1.8), (1.0, 0.4, 2.0)), (130, 50, 180)),
    "board": (wall_panel(1.0), "wall", ((1.4, 0, 0.9), (1.8, 0, 1.1)), (25, 25, 25)),
    "clutter": (clutter, "floor", ((0.6, 0.6, 0), (0.8, 0.8, 0)), (230, 210, 30)),
    "bed": (bed, "floor", ((1.4, 1.9, 0.5), (1.6, 2.1, 0.55)), (40, 70, 210)),
    "sink": (sink, "floor", ((0.5, 0.45, 0.85), (0.6, 0.5, 0.9)), (30, 190, 200)),
    "bathtub": (tub, "floor", ((1.5, 0.7, 0.5), (1.7, 0.8, 0.6)), (170, 240, 200)),
    "toilet": (toilet, "floor", ((0.4, 0.65, 0), (0.45, 0.7, 0)), (190, 170, 240)),
    "curtain": (wall_panel(0.3, wavy=True), "wall", ((1.2, 0, 1.8), (1.6, 0, 2.1)), (210, 50, 170)),
    "counter": (solid, "floor", ((1.6, 0.6, 0.9), (2.0, 0.65, 0.95)), (20, 30, 100)),
    "shower curtain": (wall_panel(0.0, wavy=True), "wall", ((0.9, 0, 1.8), (1.1, 0, 1.9)), (160, 230, 60)),
    "refrigerator": (solid, "floor", ((0.7, 0.65, 1.7), (0.8, 0.7, 1.85)), (25, 25, 25)),
    "picture": (wall_panel(1.3), "wall", ((0.5, 0, 0.4), (0.8, 0, 0.6)), (250, 150, 180)),
    "cabinet": (solid, "floor", ((0.8, 0.45, 0.9), (1.0, 0.5, 1.1)), (200, 90, 60)),
    "otherfurniture": (round_thing, "floor", ((0.5, 0.5, 1.0), (0.6, 0.6, 1.2)), (20, 110, 100)),
}
STRUCTURE_COLOURS = {"floor": (125, 105, 85), "wall": (205, 195, 165), "ceiling": (235, 235, 225)}

#: Raw ScanNet categories written in the aggregation files, per class; the synthetic tsv maps each to its
#: NYU40 id. Unannotated props use categories whose NYU40 class is not one of the 20.
SCANNET_RAW = {
    "wall": ["wall"],
    "floor": ["floor"],
    "chair": ["chair", "office chair"],
    "table": ["table", "coffee table"],
    "desk": ["desk"],
    "bed": ["bed"],
    "bookshelf": ["bookshelf", "bookshelves"],
    "sofa": ["couch", "sofa"],
    "sink": ["sink"],
    "bathtub": ["bathtub"],
    "toilet": ["toilet"],
    "curtain": ["curtain"],
    "counter": ["counter", "kitchen counter"],
    "door": ["door"],
    "window": ["window"],
    "shower curtain": ["shower curtain"],
    "refrigerator": ["refrigerator", "mini fridge"],
    "picture": ["picture"],
    "cabinet": ["cabinet", "kitchen cabinets"],
    "otherfurniture": ["stand", "ottoman"],
}
#: (raw category, NYU40 id, NYU40 class name as the official tsv writes it) for every class above.
NYU40 = {
    "wall": (1, "wall"),
    "floor": (2, "floor"),
    "cabinet": (3, "cabinet"),
    "bed": (4, "bed"),
    "chair": (5, "chair"),
    "sofa": (6, "sofa"),
    "table": (7, "table"),
    "door": (8, "door"),
    "window": (9, "window"),
    "bookshelf": (10, "bookshelf"),
    "picture": (11, "picture"),
    "counter": (12, "counter"),
    "desk": (14, "desk"),
    "curtain": (16, "curtain"),
    "refrigerator": (24, "refridgerator"),
    "shower curtain": (28, "shower curtain"),
    "toilet": (33, "toilet"),
    "sink": (34, "sink"),
    "bathtub": (36, "bathtub"),
    "otherfurniture": (39, "otherfurniture"),
}
UNANNOTATED_PROPS = [("lamp", 35, "lamp"), ("box", 29, "box")]


def object_classes(dataset: str) -> list[str]:
    """Class names dealt to rooms as objects (everything except floor, wall and ceiling)."""
    if dataset == "s3dis":
        return ["beam", "column", "window", "door", "table", "chair", "sofa", "bookcase", "board", "clutter"]
    return [c for c in SCANNET_RAW if c not in ("wall", "floor")]


def room_schedule(dataset: str, n_rooms: int, seed: int, stream: int) -> list[list[str]]:
    """Object classes of every room: 3-5 (S3DIS) or 4-6 (ScanNet) from consecutive permutations."""
    names = object_classes(dataset)
    rng = np.random.default_rng([seed, stream, 30])
    low = 3 if dataset == "s3dis" else 4
    counts = rng.integers(low, low + 3, size=n_rooms)
    n_perm = max(1, math.ceil(int(counts.sum()) / len(names)))
    seq = [names[i] for _ in range(n_perm) for i in rng.permutation(len(names))]
    out, pos = [], 0
    for c in counts:
        out.append(seq[pos : pos + int(c)])
        pos += int(c)
    return out


def _place(rng: np.random.Generator, name: str, p: dict) -> dict:
    """Draw the size and placement of one object of class ``name`` in the room ``p``."""
    _, placement, (low, high), _ = STYLES[name]
    size = tuple(rng.uniform(a, b) if b > a else a for a, b in zip(low, high))
    (rx, ry) = p["room"]
    q = {**p, "size": size}
    if placement == "floor":
        if rng.random() < 0.5:  # quarter turn: swap width and depth
            size = (size[1], size[0], size[2])
            q["size"] = size
        q["xy"] = (
            rng.uniform(0.1, max(0.11, rx - size[0] - 0.1)),
            rng.uniform(0.1, max(0.11, ry - size[1] - 0.1)),
        )
    else:
        q["wall"] = int(rng.integers(0, 4))
        length = rx if q["wall"] < 2 else ry
        extent = size[0] if placement == "wall" else size[1]
        q["start"] = rng.uniform(0.05, max(0.06, length - extent - 0.05))
        q["pos"] = rng.uniform(0.3, max(0.31, (ry if q["wall"] % 2 == 0 else rx) - 0.6))
    return q


def render_room(
    dataset: str, objects: Sequence[str], rng: np.random.Generator
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The room as a list of ``(class name, xyz (m, 3), rgb (m, 3) uint8)`` parts, structure first.

    Coordinates start near the origin with a random offset (the preparation shifts rooms anyway).
    """
    density = DENSITY[dataset]
    rx, ry, height = rng.uniform(2.6, 4.2), rng.uniform(2.6, 4.2), rng.uniform(2.6, 3.0)
    p = {"room": (rx, ry), "height": height, "density": density}
    parts: list[tuple[str, np.ndarray]] = [("floor", rect(rng, (0, 0, 0), (rx, 0, 0), (0, ry, 0), density))]
    if dataset == "s3dis":
        parts.append(("ceiling", rect(rng, (0, 0, height), (rx, 0, 0), (0, ry, 0), density)))
    for start, u in (
        ((0, 0, 0), (rx, 0, 0)),
        ((0, ry, 0), (rx, 0, 0)),
        ((0, 0, 0), (0, ry, 0)),
        ((rx, 0, 0), (0, ry, 0)),
    ):
        parts.append(("wall", rect(rng, start, u, (0, 0, height), density)))
    for name in objects:
        builder = STYLES[name][0]
        parts.append((name, builder(rng, _place(rng, name, p))))
    if dataset == "scannet":
        for _ in range(int(rng.integers(1, 3))):  # props of no benchmark class: unannotated
            q = {**p, "xy": (rng.uniform(0.2, rx - 0.6), rng.uniform(0.2, ry - 0.6))}
            parts.append(("prop", cylinder(rng, (q["xy"][0] + 0.2, q["xy"][1] + 0.2, 0), 0.15, 0.5, density)))
    offset = rng.uniform(-5, 5, size=3) * (1, 1, 0.1)
    out = []
    for name, xyz in parts:
        base = np.asarray(
            STYLES[name][3] if name in STYLES else STRUCTURE_COLOURS.get(name, (160, 140, 120)),
            dtype=np.float64,
        )
        rgb = base * rng.uniform(0.9, 1.05) + rng.normal(0, 8, size=(len(xyz), 3))
        out.append((name, xyz + offset, np.clip(np.round(rgb), 0, 255).astype(np.uint8)))
    return out


# ---------------------------------------------------------------------------------------------------------
# Writers


def _xyzrgb_lines(xyz: np.ndarray, rgb: np.ndarray) -> str:
    """S3DIS text: one 'x y z r g b' line per point, coordinates with 3 decimals."""
    line = "{:.3f} {:.3f} {:.3f} {:d} {:d} {:d}\n".format
    return "".join(line(*row) for row in zip(*xyz.T.tolist(), *rgb.T.tolist()))


def write_s3dis_room(room_dir: Path, parts: list[tuple[str, np.ndarray, np.ndarray]], stairs: bool) -> None:
    annotations = room_dir / "Annotations"
    annotations.mkdir(parents=True, exist_ok=True)
    counters: dict[str, int] = {}
    texts = []
    for name, xyz, rgb in parts:
        if stairs and name == "clutter" and "stairs" not in counters:
            name = "stairs"
        counters[name] = counters.get(name, 0) + 1
        text = _xyzrgb_lines(xyz, rgb)
        (annotations / f"{name}_{counters[name]}.txt").write_text(text)
        texts.append(text)
    (room_dir / f"{room_dir.name}.txt").write_text("".join(texts))


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, faces: np.ndarray) -> None:
    """Binary little-endian PLY with the vertex and face layout of ScanNet's ``_vh_clean_2.ply``."""
    vertex = np.empty(
        len(xyz),
        dtype=[
            ("x", "<f4"),
            ("y", "<f4"),
            ("z", "<f4"),
            ("red", "u1"),
            ("green", "u1"),
            ("blue", "u1"),
            ("alpha", "u1"),
        ],
    )
    vertex["x"], vertex["y"], vertex["z"] = xyz.T
    vertex["red"], vertex["green"], vertex["blue"] = rgb.T
    vertex["alpha"] = 255
    face = np.empty(len(faces), dtype=[("n", "u1"), ("v", "<i4", (3,))])
    face["n"], face["v"] = 3, faces
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment synthetic scene (data/make_synthetic.py)\n"
        f"element vertex {len(xyz)}\nproperty float x\nproperty float y\nproperty float z\n"
        "property uchar red\nproperty uchar green\nproperty uchar blue\nproperty uchar alpha\n"
        f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    path.write_bytes(header.encode("ascii") + vertex.tobytes() + face.tobytes())


def write_scannet_scene(
    scene_dir: Path, parts: list[tuple[str, np.ndarray, np.ndarray]], rng: np.random.Generator
) -> None:
    """Mesh, over-segmentation (objects cut into chunks of ~400 vertices) and aggregation of one scene."""
    scene = scene_dir.name
    scene_dir.mkdir(parents=True, exist_ok=True)
    xyz_parts, rgb_parts, seg_parts, groups = [], [], [], []
    next_segment = int(rng.integers(1, 50))
    for object_id, (name, xyz, rgb) in enumerate(parts):
        order = np.argsort(xyz[:, 0] + 0.37 * xyz[:, 1] + 0.11 * xyz[:, 2], kind="stable")
        n_chunks = max(1, len(xyz) // 400)
        chunk = np.empty(len(xyz), dtype=np.int64)
        chunk[order] = np.arange(len(xyz)) * n_chunks // max(1, len(xyz))
        seg_ids = next_segment + 7 * np.arange(n_chunks)
        next_segment = int(seg_ids[-1]) + 7
        if name == "prop":
            category = UNANNOTATED_PROPS[object_id % len(UNANNOTATED_PROPS)][0]
        else:
            options = SCANNET_RAW[name]
            category = options[int(rng.integers(0, len(options)))]
        groups.append(
            {"id": object_id, "objectId": object_id, "segments": seg_ids.tolist(), "label": category}
        )
        xyz_parts.append(xyz)
        rgb_parts.append(rgb)
        seg_parts.append(seg_ids[chunk])
    # Mesh vertices in no object (unlabelled noise), as real scans have.
    stray = int(rng.integers(20, 60))
    xyz_parts.append(rng.uniform(0.5, 2.0, size=(stray, 3)) + xyz_parts[0].min(axis=0))
    rgb_parts.append(rng.integers(0, 255, size=(stray, 3)).astype(np.uint8))
    seg_parts.append(np.full(stray, next_segment, dtype=np.int64))
    xyz, rgb, segs = np.concatenate(xyz_parts), np.concatenate(rgb_parts), np.concatenate(seg_parts)
    faces = np.stack([np.arange(0, len(xyz) - 2, 3) + k for k in range(3)], axis=1)
    write_ply(scene_dir / f"{scene}_vh_clean_2.ply", xyz, rgb, faces)
    segs_file = f"{scene}_vh_clean_2.0.010000.segs.json"
    (scene_dir / segs_file).write_text(
        json.dumps(
            {
                "params": {"kThresh": "0.0001", "segMinVerts": "20"},
                "sceneId": scene,
                "segIndices": segs.tolist(),
            }
        )
    )
    (scene_dir / f"{scene}.aggregation.json").write_text(
        json.dumps(
            {
                "sceneId": f"scannet.{scene}",
                "appId": "synthetic",
                "segGroups": groups,
                "segmentsFile": f"scannet.{segs_file}",
            }
        )
    )


def write_scannet_label_map(path: Path) -> None:
    """A label-map tsv with the official columns, for every raw category the scenes use."""
    header = [
        "id",
        "raw_category",
        "category",
        "count",
        "nyu40id",
        "eigen13id",
        "nyuClass",
        "nyu40class",
        "eigen13class",
        "ModelNet40",
        "ModelNet10",
        "ShapeNetCore55",
        "synsetoffset",
        "wnsynsetid",
        "wnsynsetkey",
        "mpcat40",
        "mpcat40index",
    ]
    rows = []
    for cls, raws in SCANNET_RAW.items():
        nyu40id, nyu40class = NYU40[cls]
        rows += [(raw, cls, nyu40id, nyu40class) for raw in raws]
    rows += [(raw, raw, nyu40id, nyu40class) for raw, nyu40id, nyu40class in UNANNOTATED_PROPS]
    lines = ["\t".join(header)]
    for i, (raw, category, nyu40id, nyu40class) in enumerate(rows, start=1):
        fields = [str(i), raw, category, "1", str(nyu40id), "", "", nyu40class] + [""] * 9
        lines.append("\t".join(fields))
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------
# Driver


def room_names(dataset: str, num_train: int, num_val: int) -> list[tuple[str, str, int, int]]:
    """``(split, relative folder, stream, index)`` of every room, training rooms first."""
    out = []
    if dataset == "s3dis":
        per_area: dict[str, int] = {}
        for split, n, stream in (("train", num_train, 1), ("val", num_val, 2)):
            for i in range(n):
                area = S3DIS_TRAIN_AREAS[i % len(S3DIS_TRAIN_AREAS)] if split == "train" else S3DIS_TEST_AREA
                per_area[area] = per_area.get(area, 0) + 1
                kind = S3DIS_ROOM_TYPES[(per_area[area] - 1) % len(S3DIS_ROOM_TYPES)]
                number = (per_area[area] - 1) // len(S3DIS_ROOM_TYPES) + 1
                out.append((split, f"{area}/{kind}_{number}", stream, i))
        return out
    for split, n, stream, first in (("train", num_train, 1, 0), ("val", num_val, 2, num_train)):
        out += [(split, f"scene{first + i:04d}_00", stream, i) for i in range(n)]
    return out


def _render_job(job: tuple[str, str, str, int, int, list[str], int, bool]) -> None:
    dataset, folder, rel, stream, index, objects, seed, stairs = job
    rng = np.random.default_rng([seed, stream, 3, index])
    parts = render_room(dataset, objects, rng)
    if dataset == "s3dis":
        write_s3dis_room(Path(folder) / rel, parts, stairs=stairs)
    else:
        write_scannet_scene(Path(folder) / rel, parts, rng)


def prepare_top(top: Path) -> None:
    """Create the top folder of a synthetic data set, with its marker file: refuse to touch a real data set,
    replace an earlier synthetic one (data/make_synthetic.py uses it for the image data sets too)."""
    if top.exists():
        if not (top / MARKER).is_file():
            raise SystemExit(
                f"{top} exists and was not made by make_synthetic.py; refusing to overwrite it. "
                "Choose another --out folder."
            )
        shutil.rmtree(top)
    top.mkdir(parents=True)
    (top / MARKER).write_text(
        "Synthetic data made by data/make_synthetic.py; safe to delete. Not the real dataset.\n"
    )


def make_synthetic_3d(
    dataset: str, out: str | os.PathLike, num_train: int, num_val: int, seed: int, workers: int = 1
) -> Path:
    """Write ``num_train`` training and ``num_val`` test rooms of ``dataset`` in its raw layout under ``out``.

    Returns the dataset's top folder (``out/S3DIS`` or ``out/ScanNet``); the caller runs the preparation.
    """
    if dataset not in DENSITY:
        raise ValueError(f"dataset must be one of {sorted(DENSITY)}, not {dataset!r}")
    if num_train < 1 or num_val < 1:
        raise ValueError("3D synthetic data needs at least one training and one test room")
    root = Path(out)
    top = root / ("S3DIS" if dataset == "s3dis" else "ScanNet")
    prepare_top(top)
    folder = top / ("Stanford3dDataset_v1.2_Aligned_Version" if dataset == "s3dis" else "scans")
    folder.mkdir()
    schedule = {1: room_schedule(dataset, num_train, seed, 1), 2: room_schedule(dataset, num_val, seed, 2)}
    # The first training room with clutter writes one clutter object as stairs_1.txt.
    stairs = next((i for i, objects in enumerate(schedule[1]) if "clutter" in objects), -1)
    jobs = [
        (dataset, str(folder), rel, stream, i, schedule[stream][i], seed, stream == 1 and i == stairs)
        for _, rel, stream, i in room_names(dataset, num_train, num_val)
    ]
    if workers > 1 and len(jobs) > 1:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
        with ctx.Pool(min(workers, len(jobs))) as pool:
            pool.map(_render_job, jobs)
    else:
        for job in jobs:
            _render_job(job)
    if dataset == "scannet":
        write_scannet_label_map(top / "scannetv2-labels.combined.tsv")
        names = room_names(dataset, num_train, num_val)
        for split in ("train", "val"):
            listed = "".join(f"{rel}\n" for s, rel, _, _ in names if s == split)
            (top / f"scannetv2_{split}.txt").write_text(listed)
    return top
