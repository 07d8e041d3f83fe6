"""Self-contained references: no tracked file cites a document a reader of this repository cannot open.

Comments, docstrings and docs may cite the papers, the public reference code (file and function, e.g.
"reference ``train.py`` ``Trainer.train``") or this repository's ``docs/`` (a row of
``docs/reference-notes.md`` as ``RN-05``). The behaviour specification the code was written from is not in
the repository, so its section numbers (a section sign followed by a number) and its quirk ids (``Q`` and a
number) mean nothing to a reader; neither do the names of the two private documents (the behaviour
specification and the style guide). This test keeps it so for every text file ``git ls-files`` lists.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

# Each pattern, and each example below, is written so that this file's own source does not match it:
# "\u00a7" is the section sign, "\x51" the letter Q and "\x2e" a dot.
FORBIDDEN = {
    "section number of the private behaviour specification": re.compile("\u00a7" + r"\s*\d"),
    "quirk id of the private behaviour specification": re.compile(r"\bQ\d+\b"),
    "name of a private document": re.compile(r"\breference-behaviou?r\.md\b|\bstyle\.md\b"),
}
HINT = (
    "cite a row of docs/reference-notes.md as RN-nn (a quirk Qn is row RN-nn), the reference code's file "
    "and function (e.g. reference `train.py` `Trainer.train`), or the paper (e.g. PLOP Sec. 3.2, Eq. 4)"
)


def tracked_text_files() -> list[str]:
    """Paths (relative to the repository root) of the tracked files that are UTF-8 text."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout (git ls-files)")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
    ).stdout.decode("utf-8")
    paths = []
    for rel in filter(None, listed.split("\0")):
        path = ROOT / rel
        if not path.is_file():  # deleted in the work tree, not yet committed
            continue
        data = path.read_bytes()
        if b"\0" in data:  # images and other binary files
            continue
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        paths.append(rel)
    return paths


def forbidden_citations(text: str) -> list[tuple[int, str, str]]:
    """(line number, what, line) of every forbidden citation in ``text``."""
    hits = []
    for number, line in enumerate(text.splitlines(), 1):
        for what, pattern in FORBIDDEN.items():
            if pattern.search(line):
                hits.append((number, what, line.strip()))
    return hits


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("# Reference behaviour (\u00a78.10): logging", 1),
        ("spec \u00a7 4.3 table", 1),
        ("(\u00a7\u00a74.2-4.5)", 1),
        ("# Reference behaviour (\x515): adds the bin index", 1),
        ("crash in the reference (\x5116) and", 1),
        ("see the reference-behaviour\x2emd table", 1),
        ("examples in style\x2emd 4.2", 1),
        ("# Reference behaviour (RN-05): adds the bin index", 0),
        ("PLOP Sec. 3.2, Eq. 4; reference ``train.py`` ``Trainer.find_median``", 0),
        ("docs/reference-notes.md#rn-42, QR codes, Q&A, IQ2, Q8_0, FAQ1", 0),
        ("my_style.md and stylesheet.md are other files", 0),
    ],
)
def test_the_patterns_find_what_they_should(text: str, expected: int) -> None:
    assert len(forbidden_citations(text)) == expected, forbidden_citations(text)


def test_tracked_files_cite_only_what_a_reader_can_open() -> None:
    files = tracked_text_files()
    assert "README.md" in files and "train.py" in files, files[:10]
    hits = [
        f"{rel}:{number}: {what}: {line[:100]}"
        for rel in files
        for number, what, line in forbidden_citations((ROOT / rel).read_text(encoding="utf-8"))
    ]
    assert not hits, f"{len(hits)} citation(s) of private documents; {HINT}:\n" + "\n".join(hits)
