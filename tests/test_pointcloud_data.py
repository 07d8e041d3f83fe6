"""3D data preparation: synthetic rooms in the raw S3DIS / ScanNet layouts, readers, blocks, layout errors."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import load_script_module

from dataset import pointcloud_raw as raw
from utils.errors import DatasetError

syn = load_script_module("data/make_synthetic.py", "make_synthetic_3d_under_test")
prep_cli = load_script_module("data/prepare_3d.py", "prepare_3d_under_test")

S3DIS_RAW = "S3DIS/Stanford3dDataset_v1.2_Aligned_Version"


def digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("syn3d")
    syn.make_synthetic_3d("s3dis", root, num_train=6, num_val=2, seed=5, workers=1)
    syn.make_synthetic_3d("scannet", root, num_train=4, num_val=2, seed=5, workers=1)
    return root


def manifest(root: Path, top: str) -> dict:
    return json.loads((root / top / "blocks_bs1_s1" / "blocks.json").read_text())


# ---- generator + preparation


def test_s3dis_raw_layout(tree):
    base = tree / S3DIS_RAW
    assert (tree / "S3DIS/SYNTHETIC.txt").is_file()
    areas = sorted(p.name for p in base.iterdir())
    assert areas == ["Area_1", "Area_2", "Area_3", "Area_4", "Area_5", "Area_6"]
    rooms = sorted(p.relative_to(base).as_posix() for p in base.glob("Area_*/*") if p.is_dir())
    assert len(rooms) == 8 and sum(r.startswith("Area_5/") for r in rooms) == 2
    names = set()
    for room in base.glob("Area_*/*"):
        files = sorted((room / "Annotations").glob("*.txt"))
        names |= {f.name.split("_")[0] for f in files}
        assert {"ceiling_1.txt", "floor_1.txt", "wall_4.txt"} <= {f.name for f in files}
        # The whole-room file holds the lines of all annotation files, 'x y z r g b'.
        whole = (room / f"{room.name}.txt").read_text()
        lines = [line for f in files for line in f.read_text().splitlines()]
        assert sorted(whole.splitlines()) == sorted(lines)
        first = whole.splitlines()[0].split()
        assert len(first) == 6 and len(first[0].split(".")[1]) == 3 and first[3].isdigit()
    assert names - {"stairs"} <= set(raw.S3DIS_CLASSES[1:]) and "stairs" in names


def test_scannet_raw_layout(tree):
    top = tree / "ScanNet"
    scenes = sorted(p.name for p in (top / "scans").iterdir())
    assert scenes == [f"scene{i:04d}_00" for i in range(6)]
    assert (top / "scannetv2_val.txt").read_text() == "scene0004_00\nscene0005_00\n"
    for scene in scenes:
        d = top / "scans" / scene
        for name in (
            f"{scene}_vh_clean_2.ply",
            f"{scene}_vh_clean_2.0.010000.segs.json",
            f"{scene}.aggregation.json",
        ):
            assert (d / name).is_file()
        assert (d / f"{scene}_vh_clean_2.ply").read_bytes().startswith(b"ply\nformat binary_little_endian")
    header = (top / "scannetv2-labels.combined.tsv").read_text().splitlines()[0].split("\t")
    assert header[1] == "raw_category" and header[4] == "nyu40id" and header[7] == "nyu40class"


@pytest.mark.parametrize(
    ("top", "classes", "test_rooms"),
    [
        ("S3DIS", raw.S3DIS_CLASSES, {"Area_5_office_1", "Area_5_conferenceRoom_1"}),
        ("ScanNet", raw.SCANNET_CLASSES, {"scene0004_00", "scene0005_00"}),
    ],
)
def test_blocks_and_manifest(tree, top, classes, test_rooms):
    m = manifest(tree, top)
    assert (m["format"], m["block_size"], m["stride"], m["min_points"]) == (1, 1.0, 1.0, 1000)
    assert m["classes"] == classes
    assert {r["name"] for r in m["rooms"] if r["split"] == "test"} == test_rooms
    seen = np.zeros(len(classes), dtype=np.int64)
    for room in m["rooms"]:
        assert room["blocks"], room["name"]
        for k, entry in enumerate(room["blocks"]):
            assert entry["name"] == f"{room['name']}_block_{k}"
            block = np.load(tree / top / "blocks_bs1_s1/data" / f"{entry['name']}.npy")
            assert block.dtype == np.float32 and block.shape == (entry["num_points"], 7)
            assert entry["num_points"] >= 1000
            counts = np.bincount(block[:, 6].astype(int), minlength=len(classes))
            assert counts.tolist() == entry["counts"]
            xyz = block[:, :3]
            # Room-shifted coordinates inside the room; a block spans at most 1 m in x and y.
            assert xyz.min() >= 0 and (xyz.max(axis=0) <= np.asarray(room["extent"]) + 1e-5).all()
            assert (np.ptp(xyz[:, :2], axis=0) <= 1 + 1e-5).all()
            assert (block[:, 3:6] >= 0).all() and (block[:, 3:6] <= 255).all()
            seen += counts
    if top == "S3DIS":
        assert seen[0] == 0 and (seen[1:] > 0).sum() >= 11  # no background; nearly every class
    else:
        assert seen[0] > 0 and (seen[1:] > 0).sum() >= 16  # unannotated props


def test_generation_is_deterministic_whatever_the_workers(tree, tmp_path):
    syn.make_synthetic_3d("scannet", tmp_path, num_train=4, num_val=2, seed=5, workers=2)
    ours = {k: v for k, v in digest(tmp_path / "ScanNet").items() if not k.startswith("blocks_")}
    ref = {k: v for k, v in digest(tree / "ScanNet").items() if not k.startswith("blocks_")}
    assert ours == ref
    # The preparation in two processes writes the same blocks.
    raw.prepare("scannet", tmp_path, workers=2)
    blocks = {k: v for k, v in digest(tmp_path / "ScanNet").items() if k.startswith("blocks_bs1_s1/data")}
    assert blocks == {k: v for k, v in digest(tree / "ScanNet").items() if k.startswith("blocks_bs1_s1/data")}


def test_make_synthetic_cli_3d_and_refusal(tmp_path, capsys):
    syn.main(
        [
            "--dataset",
            "s3dis",
            "--out",
            str(tmp_path),
            "--num_train",
            "1",
            "--num_val",
            "1",
            "--seed",
            "1",
            "--workers",
            "1",
        ]
    )
    assert "s3dis 1 train + 1 test rooms" in capsys.readouterr().out
    assert (tmp_path / "S3DIS/blocks_bs1_s1/blocks.json").is_file()
    (tmp_path / "S3DIS/SYNTHETIC.txt").unlink()  # now it looks like a real download
    with pytest.raises(SystemExit, match="refusing to overwrite"):
        syn.make_synthetic("s3dis", tmp_path, 1, 1, size=0, seed=1, workers=1)


# ---- blocks: the 3DPC-CISS cutting rule


def reference_blocks(
    points: np.ndarray, block_size: float, stride: float, min_points: int
) -> list[np.ndarray]:
    """room2blocks spelled out: full-room masks per grid cell, x outer, inclusive bounds."""
    data = points.astype(np.float64).copy()
    data[:, :3] -= data[:, :3].min(axis=0)
    top = data[:, :3].max(axis=0)
    nx = int(np.ceil((top[0] - block_size) / stride)) + 1
    ny = int(np.ceil((top[1] - block_size) / stride)) + 1
    out = []
    for i in range(nx):
        for j in range(ny):
            x0, y0 = i * stride, j * stride
            cond = (
                (data[:, 0] >= x0)
                & (data[:, 0] <= x0 + block_size)
                & (data[:, 1] >= y0)
                & (data[:, 1] <= y0 + block_size)
            )
            if cond.sum() >= min_points:
                out.append(data[cond].astype(np.float32))
    return out


@pytest.mark.parametrize(
    ("block_size", "stride", "min_points"),
    [
        (1.0, 1.0, 1000),
        (1.0, 0.5, 200),
        (1.5, 1.0, 1),
        (0.7, 0.35, 50),
        (2.0, 2.0, 5000),
    ],
)
def test_room_to_blocks_equals_reference(block_size, stride, min_points):
    rng = np.random.default_rng(int(block_size * 10 + stride * 100))
    n = 30000
    points = np.concatenate(
        [
            rng.uniform([-3.2, 7.0, 0.1], [1.9, 10.4, 2.8], size=(n, 3)),
            rng.integers(0, 256, size=(n, 3)),
            rng.integers(0, 14, size=(n, 1)),
        ],
        axis=1,
    )
    # Points exactly on block borders belong to both neighbours (inclusive bounds).
    points[:50, 0] = points[:, 0].min() + 1.0
    blocks, extent = raw.room_to_blocks(points, block_size, stride, min_points)
    expected = reference_blocks(points, block_size, stride, min_points)
    assert len(blocks) == len(expected) > 0
    for ours, ref in zip(blocks, expected):
        np.testing.assert_array_equal(ours, ref)
    np.testing.assert_allclose(extent, np.ptp(points[:, :3], axis=0))


def test_room_to_blocks_small_room_and_bad_stride():
    points = np.array([[0.0, 0.0, 0.0, 1, 2, 3, 4], [0.3, 0.2, 1.0, 1, 2, 3, 4]])
    blocks, extent = raw.room_to_blocks(points, 1.0, 1.0, 1)
    assert len(blocks) == 1 and blocks[0].shape == (2, 7)
    assert raw.room_to_blocks(np.zeros((0, 7)))[0] == []
    with pytest.raises(ValueError, match="stride"):
        raw.room_to_blocks(points, 1.0, 1.5, 1)


# ---- readers


def test_s3dis_reader_nul_bytes_stairs_and_bad_lines(tmp_path):
    room = tmp_path / "office_9"
    (room / "Annotations").mkdir(parents=True)
    (room / "Annotations/chair_1.txt").write_bytes(b"1.000 2.000 3.000 10 20 30\n1.5 2.5 3.\x005 1 2 3\n")
    (room / "Annotations/stairs_1.txt").write_text("0 0 0 0 0 0\n")
    (room / "Annotations/empty_1.txt").write_text("")
    points = raw.s3dis_room_points(room)
    np.testing.assert_array_equal(
        points[:, 6], [raw.S3DIS_CLASSES.index("chair")] * 2 + [raw.S3DIS_CLASSES.index("clutter")]
    )
    np.testing.assert_allclose(points[1, :6], [1.5, 2.5, 3.5, 1, 2, 3])
    (room / "Annotations/wall_1.txt").write_text("1 2 3 4 5 6\n1 2 3\n")
    with pytest.raises(DatasetError, match=r"wall_1\.txt.*six numbers"):
        raw.s3dis_room_points(room)
    (room / "Annotations/wall_1.txt").write_text("1 2 3 4 5 6 7\n")
    with pytest.raises(DatasetError, match="7 numbers per line, not 6"):
        raw.s3dis_room_points(room)


@pytest.mark.parametrize("fmt", ["binary_little_endian", "binary_big_endian", "ascii"])
def test_ply_reader_formats(tmp_path, fmt):
    rng = np.random.default_rng(0)
    xyz, rgb = rng.normal(size=(7, 3)).astype(np.float32), rng.integers(0, 256, size=(7, 3))
    props = (
        "property float x\nproperty float y\nproperty float z\nproperty uchar red\n"
        "property uchar green\nproperty uchar blue\nproperty uchar alpha\n"
    )
    header = (
        f"ply\nformat {fmt} 1.0\ncomment test\nelement camera 1\nproperty float view\n"
        f"element vertex 7\n{props}element face 2\nproperty list uchar int vertex_indices\n"
        "end_header\n"
    )
    if fmt == "ascii":
        rows = "".join(
            f"{x!r} {y!r} {z!r} {r} {g} {b} 255\n" for (x, y, z), (r, g, b) in zip(xyz.tolist(), rgb.tolist())
        )
        body = ("0.5\n" + rows + "3 0 1 2\n3 2 3 4\n").encode()
    else:
        e = "<" if fmt.endswith("little_endian") else ">"
        v = np.empty(
            7,
            dtype=[
                ("x", e + "f4"),
                ("y", e + "f4"),
                ("z", e + "f4"),
                ("red", "u1"),
                ("green", "u1"),
                ("blue", "u1"),
                ("alpha", "u1"),
            ],
        )
        v["x"], v["y"], v["z"] = xyz.T
        v["red"], v["green"], v["blue"], v["alpha"] = *rgb.T, 255
        body = np.array([0.5], dtype=e + "f4").tobytes() + v.tobytes() + b"\x03" + bytes(12)
    path = tmp_path / "m.ply"
    path.write_bytes(header.encode() + body)
    out = raw.read_ply_vertices(path)
    np.testing.assert_array_equal(out, np.concatenate([xyz, rgb], axis=1).astype(np.float64))
    with pytest.raises(DatasetError, match="no vertex property nx"):
        raw.read_ply_vertices(path, names=("x", "nx"))
    if fmt != "ascii":
        path.write_bytes(header.encode() + body[:40])
        with pytest.raises(DatasetError, match="truncated"):
            raw.read_ply_vertices(path)
    path.write_bytes(b"solid stl\n")
    with pytest.raises(DatasetError, match="not a PLY file"):
        raw.read_ply_vertices(path)


def test_scannet_label_map_uses_nyu40_ids(tree):
    mapping = raw.read_scannet_label_map(tree / "ScanNet/scannetv2-labels.combined.tsv")
    # The official tsv spells the NYU40 class "refridgerator": matched by id, not name.
    assert mapping["refrigerator"] == mapping["mini fridge"] == raw.SCANNET_CLASSES.index("refrigerator")
    assert mapping["office chair"] == raw.SCANNET_CLASSES.index("chair")
    assert mapping["kitchen cabinets"] == raw.SCANNET_CLASSES.index("cabinet")
    assert mapping["ottoman"] == raw.SCANNET_CLASSES.index("otherfurniture")
    assert mapping["lamp"] == mapping["box"] == 0
    # Every benchmark class is reachable; ids of the 20 classes are the benchmark's NYU40 ids.
    assert set(mapping.values()) == set(range(21))
    assert raw.SCANNET_NYU40_IDS == [1, 2, 5, 7, 14, 4, 10, 6, 34, 36, 33, 16, 12, 8, 9, 28, 24, 11, 3, 39]


def test_scannet_scene_collects_objects_only(tree):
    scene = tree / "ScanNet/scans/scene0000_00"
    mapping = raw.read_scannet_label_map(tree / "ScanNet/scannetv2-labels.combined.tsv")
    points = raw.scannet_scene_points(scene, mapping)
    segs_file = scene / "scene0000_00_vh_clean_2.0.010000.segs.json"
    segs = np.asarray(json.loads(segs_file.read_text())["segIndices"])
    groups = json.loads((scene / "scene0000_00.aggregation.json").read_text())["segGroups"]
    in_groups = np.isin(segs, [s for g in groups for s in g["segments"]])
    assert len(points) == in_groups.sum() < len(segs)  # stray vertices are left out
    # Object after object, each with its class.
    sizes = [int(np.isin(segs, g["segments"]).sum()) for g in groups]
    expected = np.repeat([mapping[g["label"]] for g in groups], sizes)
    np.testing.assert_array_equal(points[:, 6], expected)
    vertices = raw.read_ply_vertices(scene / "scene0000_00_vh_clean_2.ply")
    # Segment after segment (in the aggregation's order), each segment's vertices ascending.
    first = np.concatenate([np.flatnonzero(segs == seg) for seg in groups[0]["segments"]])
    np.testing.assert_array_equal(points[: len(first), :6], vertices[first])


# ---- layout errors


def test_s3dis_layout_errors(tmp_path):
    with pytest.raises(DatasetError) as info:
        raw.prepare("s3dis", tmp_path)
    message = str(info.value)
    assert "S3DIS was not found" in message and f"{tmp_path} is empty" in message
    assert "Area_{1..6}/<room>/Annotations/" in message and "make_synthetic.py --dataset s3dis" in message
    # The download unpacked directly in the data root.
    (tmp_path / "Stanford3dDataset_v1.2_Aligned_Version/Area_1/office_1").mkdir(parents=True)
    with pytest.raises(DatasetError, match="exists but must be moved to"):
        raw.prepare("s3dis", tmp_path)
    # --data_root pointing at the download folder itself.
    with pytest.raises(DatasetError, match="looks like the S3DIS folder itself"):
        raw.prepare("s3dis", tmp_path / "Stanford3dDataset_v1.2_Aligned_Version")
    shutil.move(tmp_path / "Stanford3dDataset_v1.2_Aligned_Version", tmp_path / "S3DIS" / "x")
    (tmp_path / S3DIS_RAW).mkdir(parents=True)
    with pytest.raises(DatasetError, match="is the S3DIS folder itself; pass its parent"):
        raw.prepare("s3dis", tmp_path / "S3DIS")
    with pytest.raises(DatasetError, match=r"No Area_\* folder .* is empty"):
        raw.prepare("s3dis", tmp_path)
    (tmp_path / S3DIS_RAW / "Area_2/hallway_1").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"hallway_1 has no Annotations/\*\.txt files .*does not exist"):
        raw.prepare("s3dis", tmp_path)


def test_scannet_layout_errors(tree, tmp_path):
    with pytest.raises(DatasetError, match="ScanNet was not found"):
        raw.prepare("scannet", tmp_path)
    (tmp_path / "scans/scene0000_00").mkdir(parents=True)
    with pytest.raises(DatasetError, match="exists but must be in"):
        raw.prepare("scannet", tmp_path)
    with pytest.raises(DatasetError, match="looks like the ScanNet scans folder itself"):
        raw.prepare("scannet", tmp_path / "scans")
    shutil.copytree(tree / "ScanNet/scans/scene0001_00", tmp_path / "ScanNet/scans/scene0001_00")
    with pytest.raises(DatasetError, match="is the ScanNet folder itself; pass its parent"):
        raw.prepare("scannet", tmp_path / "ScanNet")
    with pytest.raises(DatasetError, match=r"label map .*scannetv2-labels\.combined\.tsv is missing"):
        raw.prepare("scannet", tmp_path)
    shutil.copy(tree / "ScanNet/scannetv2-labels.combined.tsv", tmp_path / "ScanNet")
    (tmp_path / "ScanNet/scans/scene0001_00/scene0001_00.aggregation.json").unlink()
    missing = r"scene0001_00 has no scene0001_00\.aggregation\.json \(.* holds "
    with pytest.raises(DatasetError, match=missing):
        raw.prepare("scannet", tmp_path)
    with pytest.raises(DatasetError, match=r"aggregation .*scene0001_00\.aggregation\.json is missing"):
        raw.scannet_scene_points(tmp_path / "ScanNet/scans/scene0001_00", {})
    with pytest.raises(DatasetError, match="validation list .* does not exist"):
        raw.prepare("scannet", tmp_path, val_list=tmp_path / "nope.txt")


def test_scannet_val_list_default_is_the_official_one(tmp_path):
    official = raw.read_scene_list(raw.BUNDLED_SCANNET_VAL_LIST)
    assert len(official) == len(set(official)) == 312 and official[0] == "scene0568_00"
    assert raw.scannet_val_list(tmp_path) == raw.BUNDLED_SCANNET_VAL_LIST
    (tmp_path / "ScanNet").mkdir()
    (tmp_path / "ScanNet/scannetv2_val.txt").write_text("scene0001_00\n")
    assert raw.scannet_val_list(tmp_path) == tmp_path / "ScanNet/scannetv2_val.txt"


def test_prepare_cli_reports_user_errors(tmp_path, capsys):
    assert prep_cli.main(["--dataset", "scannet", "--data_root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ScanNet was not found") and "Traceback" not in err
    assert prep_cli.main(["--dataset", "s3dis", "--data_root", str(tmp_path), "--stride", "2"]) == 2


# ---- resuming and settings


def test_prepare_resumes_and_redoes_on_new_settings(tree, tmp_path):
    shutil.copytree(tree / "S3DIS", tmp_path / "S3DIS")
    out = tmp_path / "S3DIS/blocks_bs1_s1"
    first = out / "data/Area_1_office_1_block_0.npy"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()}
    text = (out / "blocks.json").read_text()
    raw.prepare("s3dis", tmp_path)  # everything done: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (out / "data").iterdir()} == before
    assert (out / "blocks.json").read_text() == text
    # An interrupted run: one room without its record is cut again, the others are kept.
    (out / ".rooms/Area_1_office_1.json").unlink()
    (out / "blocks.json").unlink()
    raw.prepare("s3dis", tmp_path)
    assert first.stat().st_mtime_ns != before[first.name]
    kept = "Area_2_office_1_block_0.npy"
    assert (out / "data" / kept).stat().st_mtime_ns == before[kept]
    assert json.loads((out / "blocks.json").read_text()) == json.loads(text)
    # Other settings: every room again, another manifest.
    raw.prepare("s3dis", tmp_path, min_points=3000)
    m = manifest(tmp_path, "S3DIS")
    assert m["min_points"] == 3000
    assert all(b["num_points"] >= 3000 for r in m["rooms"] for b in r["blocks"])

    def num_blocks(m: dict) -> int:
        return sum(len(r["blocks"]) for r in m["rooms"])

    assert num_blocks(m) < num_blocks(manifest(tree, "S3DIS"))
    # Another block size goes to its own folder.
    assert raw.prepare("s3dis", tmp_path, block_size=2.0, stride=1.0).name == "blocks_bs2_s1"
    assert math.isclose(manifest(tmp_path, "S3DIS")["min_points"], 3000)
