"""CPU allocator setting for training on the CPU.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks with ``mmap`` and, after
an activation-sized block is freed, adapts its thresholds and trims the heap, so memory freed at the end of an
iteration goes back to the kernel and is faulted in again, page by page, in the next one. Measured on
ResNet-101 at crop 256 (BENCHMARKS.md): about 37,000 minor page faults and 60 ms of system time per
iteration, and 1-2 % more time than the same network with ``nn.BatchNorm2d`` whose allocation pattern
happened to trim less. Keeping freed memory in the process removes the faults (and the difference).

This is what ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` do at start-up; ``mallopt`` applies the
same settings to a running process. The cost is that the process keeps its peak heap until it exits, which is
what a training process needs anyway. Set ``CSS_MALLOC=default`` to keep glibc's behaviour; any
``MALLOC_*_`` variable in the environment also leaves the allocator alone (the user chose).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from utils.logger import get_logger

log = get_logger("utils.allocator")

# glibc <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Largest values mallopt accepts (int): ~2 GiB. Blocks above the mmap threshold still use mmap, as they
# should (a single >2 GiB tensor is rare and then cheap to fault in relative to its use).
_MMAP_THRESHOLD = 1 << 30
_TRIM_THRESHOLD = 2**31 - 1


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the kernel.

    Returns True when the settings were applied; False (and nothing changes) off glibc, when the user opted
    out with ``CSS_MALLOC=default`` or set a ``MALLOC_*_`` variable, or when ``mallopt`` refused.
    """
    if os.environ.get("CSS_MALLOC", "").lower() == "default":
        return False
    if any(key.startswith("MALLOC_") and key.endswith("_") for key in os.environ):
        return False
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another C library without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Both or neither: setting either one switches glibc's dynamic thresholds off, and with only the trim
    # threshold set every block above 128 KiB is mmap'ed and faulted in anew (measured: 17x the faults).
    ok = mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the allocator settings; keeping glibc's defaults")
    return ok
