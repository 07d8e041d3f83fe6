"""Raw S3DIS / ScanNet v2 downloads -> 1 m x 1 m blocks of labelled points (the 3DPC-CISS preparation).

The class-incremental point-cloud protocol of 3DPC-CISS (Yang et al., CVPR 2023, code leolyj/3DPC-CISS:
``preprocess/collect_s3dis_data.py``, ``preprocess/collect_scannet_data.py``, ``preprocess/room2blocks.py``)
collects every room's points and labels, shifts the room so that its minimum corner is the origin, and cuts
it into blocks of ``block_size`` x ``block_size`` metres in x/y, sliding by ``stride``; blocks with fewer
than ``min_points`` points are dropped. This module does the same in one pass per room, with layout checks
and clear errors, and writes (under ``--data_root``)::

    S3DIS/blocks_bs1_s1/data/Area_1_office_1_block_0.npy     (n, 7) float32: x y z r g b label
    ScanNet/blocks_bs1_s1/data/scene0000_00_block_0.npy
    {S3DIS,ScanNet}/blocks_bs1_s1/blocks.json                manifest: settings, rooms, blocks, class counts

x y z are in metres relative to the room's minimum corner, r g b in 0..255 and the label is the class id of
this repository (``S3DIS_CLASSES`` / ``SCANNET_CLASSES``): 0 is background (absent from S3DIS, "unannotated"
in ScanNet), the classes are 1..13 (S3DIS) and 1..20 (ScanNet). 3DPC-CISS stores S3DIS classes as 0..12;
here they are shifted by one so that both datasets keep 0 for background, as the 2D datasets do.

Differences from 3DPC-CISS, on purpose:

* ScanNet labels are mapped through the ``nyu40id`` column of the label-map tsv (the ids of the ScanNet
  20-class benchmark), not the ``nyu40class`` name: the official tsv spells that name "refridgerator", so a
  match by name (as 3DPC-CISS does) leaves the refrigerator class without a single point.
* NUL bytes in S3DIS annotation files are dropped while reading (3DPC-CISS asks users to delete the one in
  Area_5/hallway_6/Annotations/ceiling_1.txt by hand).
* Rooms are not saved a second time as whole-room files; blocks are written directly, room by room, and an
  interrupted preparation resumes at the first unfinished room.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from utils.errors import DatasetError
from utils.files import write_text_atomically
from utils.logger import get_logger

logger = get_logger("dataset")

#: Class names by class id. S3DIS: the 13 classes of s3dis_classnames.txt after a background 0 that no
#: point carries. ScanNet: "unannotated" (background) and the 20 benchmark classes of scannet_classnames.txt.
S3DIS_CLASSES: list[str] = [
    "background",
    "ceiling",
    "floor",
    "wall",
    "beam",
    "column",
    "window",
    "door",
    "table",
    "chair",
    "sofa",
    "bookcase",
    "board",
    "clutter",
]
SCANNET_CLASSES: list[str] = [
    "unannotated",
    "wall",
    "floor",
    "chair",
    "table",
    "desk",
    "bed",
    "bookshelf",
    "sofa",
    "sink",
    "bathtub",
    "toilet",
    "curtain",
    "counter",
    "door",
    "window",
    "shower curtain",
    "refrigerator",
    "picture",
    "cabinet",
    "otherfurniture",
]
#: NYU40 id of each ScanNet class (the benchmark's VALID_CLASS_IDS), in SCANNET_CLASSES order from 1.
SCANNET_NYU40_IDS: list[int] = [1, 2, 5, 7, 14, 4, 10, 6, 34, 36, 33, 16, 12, 8, 9, 28, 24, 11, 3, 39]

S3DIS_DIR = "S3DIS"
S3DIS_RAW = "Stanford3dDataset_v1.2_Aligned_Version"
#: The test area of the protocol (3DPC-CISS ``VALID_SET = 'Area_5'``); the other areas are for training.
S3DIS_TEST_AREA = "Area_5"
SCANNET_DIR = "ScanNet"
SCANNET_SCANS = "scans"
SCANNET_LABEL_MAP = "scannetv2-labels.combined.tsv"
SCANNET_VAL_LIST = "scannetv2_val.txt"
#: The official ScanNet v2 validation scenes (ScanNet's Tasks/Benchmark/scannetv2_val.txt), the test split.
BUNDLED_SCANNET_VAL_LIST = Path(__file__).resolve().parent.parent / "data" / "meta" / SCANNET_VAL_LIST

MANIFEST = "blocks.json"
#: Bumped whenever the meaning of the prepared files changes; older preparations are redone.
MANIFEST_FORMAT = 1
ROOM_RECORDS = ".rooms"
DEFAULT_BLOCK_SIZE = 1.0
DEFAULT_STRIDE = 1.0
#: 3DPC-CISS room2blocks.py ``--min_npts``: blocks with fewer points are dropped.
DEFAULT_MIN_POINTS = 1000

S3DIS_HINT = (
    "Expected layout: DATA_ROOT/S3DIS/Stanford3dDataset_v1.2_Aligned_Version/Area_{1..6}/<room>/Annotations/"
    "<class>_<n>.txt (lines 'x y z r g b'), as the Stanford3dDataset_v1.2_Aligned_Version.zip download "
    "unpacks (http://buildingparser.stanford.edu/dataset.html), then `python data/prepare_3d.py --dataset "
    "s3dis --data_root DATA_ROOT` cuts the rooms into blocks (or `python data/make_synthetic.py --dataset "
    "s3dis --out DATA_ROOT` makes a small synthetic one, prepared)."
)
SCANNET_HINT = (
    "Expected layout: DATA_ROOT/ScanNet/scans/scene*/ with <scene>_vh_clean_2.ply, "
    "<scene>_vh_clean_2.0.010000.segs.json and <scene>.aggregation.json for each scene, and "
    "DATA_ROOT/ScanNet/scannetv2-labels.combined.tsv, as ScanNet's download-scannet.py writes them with "
    "`-o DATA_ROOT/ScanNet` (http://www.scan-net.org/); then `python data/prepare_3d.py --dataset scannet "
    "--data_root DATA_ROOT` cuts the scenes into blocks (or `python data/make_synthetic.py --dataset scannet "
    "--out DATA_ROOT` makes a small synthetic one, prepared)."
)


@dataclass(frozen=True)
class PointCloudSpec:
    """What differs between the two 3D datasets."""

    name: str  # --dataset value
    top: str  # folder under --data_root
    classes: tuple[str, ...]
    hint: str


SPECS: dict[str, PointCloudSpec] = {
    "s3dis": PointCloudSpec("s3dis", S3DIS_DIR, tuple(S3DIS_CLASSES), S3DIS_HINT),
    "scannet": PointCloudSpec("scannet", SCANNET_DIR, tuple(SCANNET_CLASSES), SCANNET_HINT),
}


def get_spec(dataset: str) -> PointCloudSpec:
    if dataset not in SPECS:
        raise DatasetError(f"Unknown point-cloud dataset {dataset!r}; choose one of {', '.join(SPECS)}.")
    return SPECS[dataset]


def blocks_dirname(block_size: float, stride: float) -> str:
    """``blocks_bs1_s1`` for 1 m blocks with a 1 m stride (3DPC-CISS's folder name)."""
    return f"blocks_bs{block_size:g}_s{stride:g}"


def found_in(folder: Path, limit: int = 8) -> str:
    """What ``folder`` holds, for error messages: 'it holds a, b, c (and 3 more)' or why there is nothing."""
    if not folder.exists():
        return f"{folder} does not exist"
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return f"{folder} is empty"
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return f"{folder} holds {', '.join(names[:limit])}{more}"


# ---------------------------------------------------------------------------------------------------------
# Readers of the raw files


def read_s3dis_annotation(path: Path) -> np.ndarray:
    """Points of one S3DIS annotation file as (n, 6) float64 ``x y z r g b``.

    NUL bytes are dropped first: the v1.2 download has one in Area_5/hallway_6/Annotations/ceiling_1.txt.

    Raises:
        DatasetError: a line without six numbers.
    """
    raw = path.read_bytes()
    if b"\x00" in raw:
        logger.info(
            "%s: dropped %d NUL byte(s) (a known defect of the S3DIS download).", path, raw.count(b"\x00")
        )
        raw = raw.replace(b"\x00", b"")
    if not raw.strip():
        return np.zeros((0, 6), dtype=np.float64)
    try:
        points = np.loadtxt(io.BytesIO(raw), dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise DatasetError(
            f"Cannot parse the S3DIS annotation file {path} ({exc}); every line must hold six numbers "
            f"'x y z r g b'. {S3DIS_HINT}"
        ) from exc
    if points.shape[1] != 6:
        raise DatasetError(
            f"The S3DIS annotation file {path} has {points.shape[1]} numbers per line, not 6 "
            f"('x y z r g b'). {S3DIS_HINT}"
        )
    return points


def s3dis_class_id(file_name: str) -> int:
    """Class id of an annotation file ``<class>_<n>.txt``; unknown names (the 'stairs' of a few rooms)
    count as clutter, as in 3DPC-CISS ``collect_point_label``."""
    name = file_name.split("_")[0]
    return S3DIS_CLASSES.index(name) if name in S3DIS_CLASSES[1:] else S3DIS_CLASSES.index("clutter")


def s3dis_room_points(room_dir: Path) -> np.ndarray:
    """All annotated points of an S3DIS room as (n, 7) float64 ``x y z r g b label``, files in name order."""
    files = sorted((room_dir / "Annotations").glob("*.txt"))
    parts = []
    for path in files:
        points = read_s3dis_annotation(path)
        label = np.full((len(points), 1), s3dis_class_id(path.name), dtype=np.float64)
        parts.append(np.concatenate([points, label], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 7), dtype=np.float64)


_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}


def _ply_header(f: Any, path: Path) -> tuple[str, list[tuple[str, int, list[tuple[str, str | None]]]]]:
    """``(format, [(element, count, [(property, numpy type or None for a list)])])`` of a PLY header."""
    if f.readline().strip() != b"ply":
        raise DatasetError(f"{path} is not a PLY file (it does not start with 'ply'). {SCANNET_HINT}")
    fmt, elements = "", []
    for line in iter(f.readline, b""):
        words = line.decode("ascii", "replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            return fmt, elements
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property" and elements:
            is_list = words[1] == "list"
            kind = None if is_list else _PLY_TYPES.get(words[1])
            if not is_list and kind is None:
                raise DatasetError(f"{path}: unknown PLY property type {words[1]!r}.")
            elements[-1][2].append((words[-1], kind))
    raise DatasetError(f"{path}: the PLY header has no end_header line (truncated file?). {SCANNET_HINT}")


def read_ply_vertices(
    path: Path, names: Sequence[str] = ("x", "y", "z", "red", "green", "blue")
) -> np.ndarray:
    """The ``names`` properties of the vertices of a PLY file as (n, len(names)) float64.

    Reads ascii and binary (little or big endian) files whose vertex element has scalar properties and
    comes after elements of scalar properties only (ScanNet meshes: vertices first, then faces).

    Raises:
        DatasetError: not a PLY file, a missing property, a truncated body or an unsupported layout.
    """
    with open(path, "rb") as f:
        fmt, elements = _ply_header(f, path)
        body_start = f.tell()
    offset_rows, offset_bytes = 0, 0
    endian = {"binary_little_endian": "<", "binary_big_endian": ">"}.get(fmt, "")
    for element, count, props in elements:
        if any(kind is None for _, kind in props):
            if element == "vertex":
                raise DatasetError(f"{path}: PLY vertices with list properties are not supported.")
            raise DatasetError(
                f"{path}: the PLY element {element!r} with list properties comes before the "
                "vertices; only files with the vertices first are supported."
            )
        dtype = np.dtype([(name, endian + kind) for name, kind in props])
        if element == "vertex":
            missing = [n for n in names if n not in dtype.names]
            if missing:
                raise DatasetError(
                    f"The PLY file {path} has no vertex propert{'ies' if len(missing) > 1 else 'y'} "
                    f"{', '.join(missing)} (it has {', '.join(dtype.names)}). {SCANNET_HINT}"
                )
            if fmt == "ascii":
                with open(path, "rb") as f:
                    f.seek(body_start)
                    for _ in range(offset_rows):
                        f.readline()
                    columns = [dtype.names.index(n) for n in names]
                    data = np.loadtxt(f, dtype=np.float64, max_rows=count, usecols=columns, ndmin=2)
                if len(data) != count:
                    raise DatasetError(f"The PLY file {path} is truncated: {len(data)} of {count} vertices.")
                return data
            if not endian:
                raise DatasetError(f"{path}: unknown PLY format {fmt!r}.")
            with open(path, "rb") as f:
                f.seek(body_start + offset_bytes)
                buffer = f.read(count * dtype.itemsize)
            if len(buffer) < count * dtype.itemsize:
                raise DatasetError(
                    f"The PLY file {path} is truncated: it ends inside the vertex list. {SCANNET_HINT}"
                )
            vertices = np.frombuffer(buffer, dtype=dtype, count=count)
            return np.stack([vertices[n].astype(np.float64) for n in names], axis=1)
        offset_rows += count
        offset_bytes += count * dtype.itemsize
    raise DatasetError(f"The PLY file {path} has no vertex element. {SCANNET_HINT}")


def read_scannet_label_map(path: Path) -> dict[str, int]:
    """Raw category -> class id (0 = unannotated) from ``scannetv2-labels.combined.tsv``.

    The class is found through the ``nyu40id`` column (see the module docstring for why not the name).

    Raises:
        DatasetError: the file lacks the ``raw_category`` or ``nyu40id`` column.
    """
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t") if lines else []
    if "raw_category" not in header or "nyu40id" not in header:
        raise DatasetError(
            f"The label map {path} has no 'raw_category' and 'nyu40id' columns (its header is {header[:8]}); "
            f"it must be ScanNet's scannetv2-labels.combined.tsv. {SCANNET_HINT}"
        )
    raw_col, id_col = header.index("raw_category"), header.index("nyu40id")
    class_of_nyu40 = {nyu40: cls for cls, nyu40 in enumerate(SCANNET_NYU40_IDS, start=1)}
    mapping = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) <= max(raw_col, id_col):
            continue
        nyu40 = fields[id_col].strip()
        mapping[fields[raw_col]] = class_of_nyu40.get(int(nyu40), 0) if nyu40.isdigit() else 0
    return mapping


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DatasetError(f"The ScanNet {what} {path} is missing. {SCANNET_HINT}") from exc
    except (OSError, ValueError) as exc:
        raise DatasetError(f"Cannot read the ScanNet {what} {path} ({exc}). {SCANNET_HINT}") from exc


def scannet_scene_files(scene: str) -> tuple[str, str, str]:
    """The files of a scene the preparation reads: mesh, over-segmentation, aggregation."""
    return f"{scene}_vh_clean_2.ply", f"{scene}_vh_clean_2.0.010000.segs.json", f"{scene}.aggregation.json"


def scannet_scene_points(scene_dir: Path, label_map: dict[str, int]) -> np.ndarray:
    """The annotated points of a ScanNet scene as (n, 7) float64 ``x y z r g b label``.

    As 3DPC-CISS ``collect_point_label``: the vertices of each object of the aggregation (its segments of
    the over-segmentation), object after object; objects whose category the label map does not send to
    one of the 20 classes are unannotated (0); vertices in no object are left out.
    """
    scene = scene_dir.name
    ply_name, segs_name, aggregation_name = scannet_scene_files(scene)
    segs = _read_json(scene_dir / segs_name, "over-segmentation")
    aggregation = _read_json(scene_dir / aggregation_name, "aggregation")
    ply = scene_dir / ply_name
    if not ply.is_file():
        raise DatasetError(f"The ScanNet mesh {ply} is missing. {SCANNET_HINT}")
    vertices = read_ply_vertices(ply)
    seg_indices = np.asarray(segs.get("segIndices", []), dtype=np.int64)
    if len(seg_indices) != len(vertices):
        raise DatasetError(
            f"{scene}: the over-segmentation has {len(seg_indices)} entries for {len(vertices)} mesh "
            f"vertices; the .segs.json and _vh_clean_2.ply files must come from the same scan. {SCANNET_HINT}"
        )
    # Vertices of each segment, ascending: segment ids sorted, split where the id changes.
    order = np.argsort(seg_indices, kind="stable")
    seg_ids, starts = np.unique(seg_indices[order], return_index=True)
    members = dict(zip(seg_ids.tolist(), np.split(order, starts[1:])))
    parts = []
    for group in aggregation.get("segGroups", []):
        try:
            ids = [members[int(s)] for s in group["segments"]]
        except KeyError as exc:
            raise DatasetError(
                f"{scene}: the aggregation names segment {exc.args[0]}, which the over-segmentation does not "
                f"have. {SCANNET_HINT}"
            ) from exc
        points = vertices[np.concatenate(ids)] if ids else np.zeros((0, 6))
        label = np.full((len(points), 1), label_map.get(group.get("label", ""), 0), dtype=np.float64)
        parts.append(np.concatenate([points, label], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 7), dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# Rooms -> blocks


def room_to_blocks(
    points: np.ndarray,
    block_size: float = DEFAULT_BLOCK_SIZE,
    stride: float = DEFAULT_STRIDE,
    min_points: int = DEFAULT_MIN_POINTS,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Cut a room into blocks, as 3DPC-CISS ``room2blocks``.

    The room is shifted so that its minimum corner is the origin. Block (i, j) holds the points with
    ``i*stride <= x <= i*stride + block_size`` and the same in y (both bounds inclusive, so a point on a
    border belongs to both blocks), for ``i`` in ``0 .. ceil((x_max - block_size) / stride)``; blocks are
    listed with x outer and y inner, and blocks with fewer than ``min_points`` points are dropped.

    Args:
        points: (n, 7) ``x y z r g b label``.

    Returns:
        ``(blocks, extent)``: each block (m, 7) float32 with room-shifted coordinates and its points in the
        room's order; ``extent`` (3,) float64, the room's size after the shift.
    """
    if stride > block_size:
        raise ValueError(f"the stride ({stride}) must not exceed the block size ({block_size})")
    data = points.astype(np.float64, copy=True)
    if not len(data):
        return [], np.zeros(3)
    data[:, :3] -= data[:, :3].min(axis=0)
    extent = data[:, :3].max(axis=0)
    num_x = max(1, math.ceil((extent[0] - block_size) / stride) + 1)
    num_y = max(1, math.ceil((extent[1] - block_size) / stride) + 1)
    # Points sorted by x once: each column of blocks is a contiguous slice of that order.
    by_x = np.argsort(data[:, 0], kind="stable")
    xs = data[by_x, 0]
    blocks = []
    for i in range(num_x):
        lo = np.searchsorted(xs, i * stride, side="left")
        hi = np.searchsorted(xs, i * stride + block_size, side="right")
        column = np.sort(by_x[lo:hi])  # back to the room's point order
        ys = data[column, 1]
        for j in range(num_y):
            inside = column[(ys >= j * stride) & (ys <= j * stride + block_size)]
            if len(inside) >= min_points:
                blocks.append(data[inside].astype(np.float32))
    return blocks, extent


# ---------------------------------------------------------------------------------------------------------
# The preparation


@dataclass(frozen=True)
class RoomJob:
    """One room to cut: its name (block file prefix), where its raw files are and its split."""

    name: str
    source: str
    split: str  # "train" or "test"


def _misplaced_download(
    data_root: Path,
    name: str,
    top_name: str,
    raw_name: str,
    raw_title: str,
    raw_content: str,
    companion: str | None = None,
) -> str:
    """Why ``data_root/top_name/raw_name`` (the raw download) is missing, from what ``data_root`` holds.

    Args:
        name: the data set's name ("S3DIS").
        top_name, raw_name: the expected ``{top_name}/{raw_name}/`` folders under the data root.
        raw_title: what the raw folder is called in the message ("the S3DIS folder").
        raw_content: a glob matching entries of the raw folder (a data root pointing into it matches).
        companion: a file that has to sit next to ``raw_name`` in ``top_name`` (it moves with it).
    """
    top = data_root / top_name
    raw = top / raw_name
    if data_root.name == raw_name or any(data_root.glob(raw_content)):
        return (
            f"--data_root {data_root} looks like {raw_title} itself; pass the folder that contains "
            f"{top_name}/{raw_name}/ instead."
        )
    if (data_root / raw_name).is_dir() and data_root.name == top_name:
        return (
            f"--data_root {data_root} is the {top_name} folder itself; pass its parent "
            f"{data_root.parent} instead."
        )
    if (data_root / raw_name).is_dir():
        if companion is None:
            return f"{data_root / raw_name} exists but must be moved to {raw}."
        return (
            f"{data_root / raw_name} exists but must be in {top}/ (with {companion}): move both into {top}."
        )
    return f"{name} was not found: {raw} does not exist ({found_in(top if top.is_dir() else data_root)})."


def list_s3dis_rooms(data_root: Path) -> list[RoomJob]:
    """Every room of the S3DIS download, Area_5 as test, after checking the layout.

    Raises:
        DatasetError: the raw folder, its areas, or a room's Annotations folder is missing.
    """
    raw = data_root / S3DIS_DIR / S3DIS_RAW
    if not raw.is_dir():
        problem = _misplaced_download(
            data_root, "S3DIS", S3DIS_DIR, S3DIS_RAW, "the S3DIS folder", "Area_[0-9]*"
        )
        raise DatasetError(f"{problem} {S3DIS_HINT}")
    areas = sorted(p for p in raw.glob("Area_*") if p.is_dir())
    if not areas:
        raise DatasetError(f"No Area_* folder in {raw} ({found_in(raw)}). {S3DIS_HINT}")
    rooms = []
    for area in areas:
        room_dirs = sorted(p for p in area.iterdir() if p.is_dir())
        if not room_dirs:
            raise DatasetError(f"The S3DIS area {area} holds no room folder ({found_in(area)}). {S3DIS_HINT}")
        for room in room_dirs:
            annotations = room / "Annotations"
            if not annotations.is_dir() or not any(annotations.glob("*.txt")):
                raise DatasetError(
                    f"The S3DIS room {room} has no Annotations/*.txt files ({found_in(annotations)}). "
                    f"{S3DIS_HINT}"
                )
            split = "test" if area.name == S3DIS_TEST_AREA else "train"
            rooms.append(RoomJob(f"{area.name}_{room.name}", str(room), split))
    if not any(r.split == "test" for r in rooms):
        logger.warning("No room of %s in %s: the S3DIS test split will be empty.", S3DIS_TEST_AREA, raw)
    return rooms


def read_scene_list(path: Path) -> list[str]:
    """Scene names of a split list, one per line (blank lines skipped)."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def scannet_val_list(data_root: Path, val_list: str | os.PathLike | None = None) -> Path:
    """The validation list that defines the test split: ``val_list`` if given, else
    ``ScanNet/scannetv2_val.txt`` under the data root if present, else the official list shipped in
    ``data/meta/``."""
    if val_list is not None:
        path = Path(val_list)
        if not path.is_file():
            raise DatasetError(f"The ScanNet validation list {path} does not exist.")
        return path
    local = data_root / SCANNET_DIR / SCANNET_VAL_LIST
    return local if local.is_file() else BUNDLED_SCANNET_VAL_LIST


def list_scannet_scenes(data_root: Path, val_scenes: Iterable[str]) -> list[RoomJob]:
    """Every scene of ``ScanNet/scans``, those of ``val_scenes`` as test, after checking the layout.

    Raises:
        DatasetError: the scans folder or the label map is missing, or ``scans`` holds no scene.
    """
    top = data_root / SCANNET_DIR
    scans = top / SCANNET_SCANS
    if not scans.is_dir():
        problem = _misplaced_download(
            data_root,
            "ScanNet",
            SCANNET_DIR,
            SCANNET_SCANS,
            "the ScanNet scans folder",
            "scene[0-9]*_[0-9]*",
            SCANNET_LABEL_MAP,
        )
        raise DatasetError(f"{problem} {SCANNET_HINT}")
    if not (top / SCANNET_LABEL_MAP).is_file():
        raise DatasetError(
            f"The ScanNet label map {top / SCANNET_LABEL_MAP} is missing ({found_in(top)}). {SCANNET_HINT}"
        )
    scenes = sorted(p for p in scans.iterdir() if p.is_dir() and p.name.startswith("scene"))
    if not scenes:
        raise DatasetError(f"No scene*/ folder in {scans} ({found_in(scans)}). {SCANNET_HINT}")
    # Every scene's files are checked before the (long) preparation starts.
    for scene in scenes:
        for name in scannet_scene_files(scene.name):
            if not (scene / name).is_file():
                raise DatasetError(
                    f"The ScanNet scene {scene} has no {name} ({found_in(scene)}). {SCANNET_HINT}"
                )
    val = set(val_scenes)
    rooms = [RoomJob(s.name, str(s), "test" if s.name in val else "train") for s in scenes]
    if not any(r.split == "test" for r in rooms):
        logger.warning(
            "No scene of %s is in the validation list: the ScanNet test split will be empty.", scans
        )
    return rooms


def _settings(dataset: str, block_size: float, stride: float, min_points: int) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "dataset": dataset,
        "block_size": float(block_size),
        "stride": float(stride),
        "min_points": int(min_points),
    }


def _write_json(path: Path, payload: Any) -> None:
    write_text_atomically(path, json.dumps(payload, sort_keys=True) + "\n")


def _prepare_room(job: tuple[RoomJob, str, dict[str, Any], dict[str, int] | None]) -> dict[str, Any]:
    """Read one room, write its blocks and its record (runs in a pool worker); returns the record."""
    room, out, settings, label_map = job
    out_dir = Path(out)
    if label_map is None:
        points = s3dis_room_points(Path(room.source))
    else:
        points = scannet_scene_points(Path(room.source), label_map)
    blocks, extent = room_to_blocks(
        points, settings["block_size"], settings["stride"], settings["min_points"]
    )
    num_classes = len(SPECS[settings["dataset"]].classes)
    entries = []
    for k, block in enumerate(blocks):
        name = f"{room.name}_block_{k}"
        np.save(out_dir / "data" / f"{name}.npy", block)
        counts = np.bincount(block[:, 6].astype(np.int64), minlength=num_classes)
        entries.append({"name": name, "num_points": len(block), "counts": counts.tolist()})
    record = {
        "name": room.name,
        "split": room.split,
        "num_points": len(points),
        "extent": [round(float(e), 6) for e in extent],
        "blocks": entries,
        "settings": settings,
    }
    _write_json(out_dir / ROOM_RECORDS / f"{room.name}.json", record)
    return record


def _load_record(path: Path, room: RoomJob, settings: dict[str, Any]) -> dict[str, Any] | None:
    """A finished room's record, if it was made with these settings for this split."""
    with contextlib.suppress(OSError, ValueError):
        record = json.loads(path.read_text())
        if record.get("settings") == settings and record.get("split") == room.split:
            return record
    return None


def _pool_map(func: Callable[[Any], Any], jobs: list[Any], workers: int) -> Iterator[Any]:
    """``map(func, jobs)`` in order, in ``workers`` forked processes when there is more than one."""
    if workers <= 1 or len(jobs) <= 1:
        yield from map(func, jobs)
        return
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    pool = ctx.Pool(min(workers, len(jobs)))
    try:
        yield from pool.imap(func, jobs)
    finally:
        pool.terminate()
        pool.join()


def prepare(
    dataset: str,
    data_root: str | os.PathLike,
    block_size: float = DEFAULT_BLOCK_SIZE,
    stride: float = DEFAULT_STRIDE,
    min_points: int = DEFAULT_MIN_POINTS,
    workers: int = 0,
    force: bool = False,
    val_list: str | os.PathLike | None = None,
) -> Path:
    """Cut every room of a raw S3DIS or ScanNet download under ``data_root`` into blocks.

    Args:
        dataset: ``s3dis`` or ``scannet``.
        data_root: the folder holding ``S3DIS/`` or ``ScanNet/`` (the later ``--data_root``).
        block_size, stride: block side and sliding step in metres (3DPC-CISS: 1 and 1).
        min_points: blocks with fewer points are dropped (3DPC-CISS: 1000).
        workers: processes (0 or 1: in-process); does not change the output.
        force: redo every room even if it was prepared with the same settings.
        val_list: ScanNet only: the validation scene list (default: see :func:`scannet_val_list`).

    Returns:
        The blocks folder (``{S3DIS,ScanNet}/blocks_bs1_s1``), holding ``data/*.npy`` and ``blocks.json``.

    Raises:
        DatasetError: wrong raw layout or unreadable raw files (message names the file and the layout).
    """
    spec, root = get_spec(dataset), Path(data_root)
    if dataset == "s3dis":
        rooms, label_map, test_rule = list_s3dis_rooms(root), None, f"S3DIS {S3DIS_TEST_AREA}"
    else:
        val_path = scannet_val_list(root, val_list)
        val_scenes = read_scene_list(val_path)
        rooms = list_scannet_scenes(root, val_scenes)
        label_map = read_scannet_label_map(root / SCANNET_DIR / SCANNET_LABEL_MAP)
        test_rule = f"ScanNet scenes listed in {val_path.resolve()} ({len(val_scenes)} scenes)"
    settings = _settings(dataset, block_size, stride, min_points)
    out = root / spec.top / blocks_dirname(block_size, stride)
    manifest_path = out / MANIFEST
    if force and out.exists():
        shutil.rmtree(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (out / ROOM_RECORDS).mkdir(exist_ok=True)

    records: dict[str, dict[str, Any]] = {}
    todo = []
    for room in rooms:
        record = _load_record(out / ROOM_RECORDS / f"{room.name}.json", room, settings)
        if record is None:
            todo.append((room, str(out), settings, label_map))
        else:
            records[room.name] = record
    if todo:
        manifest_path.unlink(missing_ok=True)  # a manifest only describes a finished preparation
        logger.info(
            "Cutting %d of %d %s rooms into %s blocks (%d already done) -> %s",
            len(todo),
            len(rooms),
            dataset,
            blocks_dirname(block_size, stride),
            len(records),
            out,
        )
    for done, record in enumerate(_pool_map(_prepare_room, todo, workers), start=1):
        records[record["name"]] = record
        if done % 50 == 0 or done == len(todo):
            logger.info("%s: %d/%d rooms cut", dataset, done, len(todo))

    manifest = {
        **settings,
        "classes": list(spec.classes),
        "test_split": test_rule,
        "rooms": [{k: v for k, v in records[r.name].items() if k != "settings"} for r in rooms],
    }
    old = None
    with contextlib.suppress(OSError, ValueError):
        old = json.loads(manifest_path.read_text())
    if old != json.loads(json.dumps(manifest)):
        _write_json(manifest_path, manifest)
    num_blocks = sum(len(r["blocks"]) for r in manifest["rooms"])
    num_test = sum(len(r["blocks"]) for r in manifest["rooms"] if r["split"] == "test")
    logger.info(
        "%s: %d rooms -> %d blocks (%d train, %d test) in %s",
        dataset,
        len(rooms),
        num_blocks,
        num_blocks - num_test,
        num_test,
        out,
    )
    return out
