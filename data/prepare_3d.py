"""Cut a raw S3DIS or ScanNet v2 download into the 1 m x 1 m blocks the 3D datasets read.

The 3DPC-CISS preparation (collect each room's labelled points, shift it to the origin, cut 1 m x 1 m
blocks with a 1 m stride, drop blocks of fewer than 1,000 points), with the raw layout checked first.
See dataset/pointcloud_raw.py for the expected layout and the output. Run it once per dataset; running it
again only does what is missing (``--force`` redoes everything).

Usage:
    python data/prepare_3d.py --dataset s3dis --data_root DATA_ROOT      # DATA_ROOT/S3DIS/Stanford3d...
    python data/prepare_3d.py --dataset scannet --data_root DATA_ROOT    # DATA_ROOT/ScanNet/scans/...
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dataset.pointcloud_raw import (  # noqa: E402  (needs the repository root on sys.path)
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MIN_POINTS,
    DEFAULT_STRIDE,
    SPECS,
    prepare,
)
from utils.errors import UserError  # noqa: E402
from utils.logger import get_logger  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(SPECS), required=True)
    parser.add_argument(
        "--data_root",
        required=True,
        help="folder holding S3DIS/ or ScanNet/ (what run.py later gets as --data_root)",
    )
    parser.add_argument("--block_size", type=float, default=DEFAULT_BLOCK_SIZE, help="block side in metres")
    parser.add_argument("--stride", type=float, default=DEFAULT_STRIDE, help="block sliding step in metres")
    parser.add_argument(
        "--min_points", type=int, default=DEFAULT_MIN_POINTS, help="blocks with fewer points are dropped"
    )
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--force", action="store_true", help="redo every room")
    parser.add_argument(
        "--val_list",
        default=None,
        help="ScanNet validation scene list (default: DATA_ROOT/ScanNet/scannetv2_val.txt if "
        "present, else the official list in data/meta/)",
    )
    return parser


def run(dataset: str, data_root: str | os.PathLike, **kwargs: Any) -> Path:
    """:func:`dataset.pointcloud_raw.prepare` with its progress printed, timed."""
    log = get_logger("dataset")
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("prepare_3d: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    start = time.perf_counter()
    out = prepare(dataset, data_root, **kwargs)
    log.info(
        "done in %.1f s; pass --data_root %s --dataset %s to run.py",
        time.perf_counter() - start,
        data_root,
        dataset,
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if args.stride > args.block_size or args.stride <= 0 or args.min_points < 1:
        print("error: need 0 < --stride <= --block_size and --min_points >= 1.", file=sys.stderr)
        return 2
    try:
        run(
            args.dataset,
            args.data_root,
            block_size=args.block_size,
            stride=args.stride,
            min_points=args.min_points,
            workers=args.workers,
            force=args.force,
            val_list=args.val_list,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
