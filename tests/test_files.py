"""utils/files.py: the one atomic writer and its file-mode policy, through every writer that uses it."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from argparser import save_options
from dataset.incremental import IndexCache
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import OutputError
from utils.files import current_umask, output_file_mode, write_atomically, write_text_atomically
from utils.results import write_results_row


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test and restore it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# Every atomic writer of the code base, as (file name, write it once).
WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "checkpoint": ("step.pth", lambda path: save_checkpoint({"epoch": 1}, path)),
    "results row": ("results.csv", lambda path: write_results_row(path, 0, ["0", "0.5", "0.5"])),
    "opts.json": ("opts.json", lambda path: save_options({"lr": 0.01}, path)),
    "split cache": ("train-0.npy", lambda path: IndexCache(path, {"root": "r"}).save(np.arange(3))),
    "text": ("notes.txt", lambda path: write_text_atomically(path, "text\n")),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_new_files_of_every_writer_follow_the_umask(tmp_path, umask, writer, mask):
    name, write = WRITERS[writer]
    umask(mask)
    path = tmp_path / "sub" / name
    write(path)
    assert mode(path) == 0o666 & ~mask
    if writer == "split cache":  # its sidecar too (it was owner-only before the writers were merged)
        assert mode(path.with_name(name + ".json")) == 0o666 & ~mask
    assert leftovers(path.parent) == []


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("kept", [0o600, 0o640, 0o664])
def test_a_rewritten_file_keeps_the_mode_it_had(tmp_path, umask, writer, kept):
    name, write = WRITERS[writer]
    path = tmp_path / name
    write(path)
    path.chmod(kept)
    umask(0o022)
    write(path)  # replaced through a new temporary file: the user's permissions stay
    assert mode(path) == kept


def test_current_umask_reads_without_changing_it(umask):
    for mask in (0o022, 0o077, 0o002):
        umask(mask)
        assert current_umask() == mask
        assert current_umask() == mask
    assert output_file_mode(Path("/nonexistent/x")) == 0o666 & ~0o002


def test_write_atomically_content_and_parents(tmp_path):
    path = tmp_path / "a" / "b" / "data.bin"
    write_atomically(path, lambda handle: handle.write(b"\x00\x01"))
    assert path.read_bytes() == b"\x00\x01"
    write_text_atomically(path, "é\n")
    assert path.read_bytes() == "é\n".encode()
    write_text_atomically(path, "é\n", encoding="latin-1")
    assert path.read_bytes() == b"\xe9\n"
    save_checkpoint({"w": torch.ones(2)}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(2))


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_previous_file_and_no_temporary_file(tmp_path, failure):
    path = tmp_path / "data.txt"
    write_text_atomically(path, "previous\n")

    def write(handle):
        handle.write(b"half of the new")
        raise failure

    with pytest.raises(type(failure)) as info:
        write_atomically(path, write)
    if isinstance(failure, OSError):
        assert info.value.errno == errno.ENOSPC  # the real errno reaches the caller
    assert path.read_text() == "previous\n" and leftovers(tmp_path) == []


def test_a_failed_temporary_file_creation_is_the_system_error(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), kwargs["dir"])

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as info:
        write_text_atomically(tmp_path / "x.txt", "x")
    assert info.value.errno == errno.EACCES and not (tmp_path / "x.txt").exists()


def test_checkpoint_write_failure_names_errno_through_the_common_writer(tmp_path, monkeypatch):
    path = tmp_path / "step.pth"
    save_checkpoint({"epoch": 1}, path)
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

        def __getattr__(self, name):
            return getattr(self.handle, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: Full(real_fdopen(fd, *a, **k)))
    with pytest.raises(OutputError, match=r"\(EDQUOT\)") as info:
        save_checkpoint({"epoch": 2}, path)
    assert info.value.errno == errno.EDQUOT and "previous step.pth is intact" in str(info.value)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and leftovers(tmp_path) == []
