"""No stale instructions: what README.md and the shell scripts tell users to run must exist and parse.

* every ``make TARGET`` shown in the README is a Makefile target;
* every repository file the README names (scripts, modules, docs, images) exists;
* every ``run.py`` command line in a README code block parses with ``argparser.get_argparser()`` (after
  substituting environment variables) and passes ``validate_options``; its launcher part parses with
  torchrun's own parser; ``scripts/demo.py`` and ``data/make_synthetic.py`` lines parse with theirs;
* every ``--flag`` in the README's code and in ``scripts/**/*.sh`` exists in one of the parsers of the
  programs this repository runs (run.py, torchrun, data/make_synthetic.py, scripts/demo.py,
  benchmarks/gpu_check.py).
"""

from __future__ import annotations

import keyword
import re
import shlex
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from argparser import get_argparser, modify_command_options, validate_options
from tests.conftest import ROOT, load_script_module

README = ROOT / "README.md"
# Values for the environment variables the README's commands use.
ENV = {
    "DATA_ROOT": "/data/continual",
    "NB_GPU": "2",
    "STEP0_CKPT": "/models/15-x-voc.pth",
    "HOST0": "host0",
}
# Options of the other tools the README shows (pip), which no parser of this repository knows.
EXTERNAL_FLAGS = {"--index-url", "--extra-index-url", "--disable-pip-version-check", "--upgrade"}
CHECKED_SUFFIXES = (".py", ".sh", ".md", ".yml", ".yaml", ".toml", ".png", ".cfg")
ROOT_FILES = {"requirements.txt", "LICENSE", "Makefile"}
# What runs write (git-ignored): named in the README as outputs, not as files of the repository.
RUN_OUTPUTS = ("results/", "logs/", "checkpoints/", "runs/", "data/synthetic")
PLACEHOLDER = "..."


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def code_blocks(text: str) -> list[str]:
    """Bodies of the fenced code blocks."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def inline_code(text: str) -> list[str]:
    """Inline code spans outside the fenced blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`]+)`", prose)


def logical_lines(block: str) -> list[str]:
    """Shell lines with backslash continuations joined and ``#`` comments removed."""
    joined = re.sub(r"\\\n", " ", block)
    lines = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def substitute_env(token: str) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        assert name in ENV, f"README uses ${name}; add a value for it to ENV in {Path(__file__).name}"
        return ENV[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, token)


def commands_running(program: str) -> list[tuple[list[str], list[str]]]:
    """(words before ``program``, arguments after it) of every README code line that runs ``program``."""
    found = []
    for block in code_blocks(readme_text()):
        for line in logical_lines(block):
            words = [substitute_env(w) for w in shlex.split(line)]
            if program in words:
                at = words.index(program)
                found.append((words[:at], [w for w in words[at + 1 :] if w != PLACEHOLDER]))
    return found


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


@cache
def run_py_flags() -> frozenset[str]:
    return frozenset(s for a in get_argparser()._actions for s in a.option_strings)


@cache
def torchrun_parser():
    from torch.distributed.run import get_args_parser

    return get_args_parser()


@cache
def demo_module():
    return load_script_module("scripts/demo.py", "demo_script_readme")


@cache
def make_synthetic_flags() -> frozenset[str]:
    # Its parser lives inside main(); its --help is the honest list of what it accepts.
    proc = subprocess.run(
        [sys.executable, "data/make_synthetic.py", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return frozenset(re.findall(r"(--[A-Za-z][\w-]*)", proc.stdout))


@cache
def gpu_check_module():
    return load_script_module("benchmarks/gpu_check.py", "gpu_check_readme")


def known_flags() -> set[str]:
    torchrun = {s for a in torchrun_parser()._actions for s in a.option_strings}
    demo = {s for a in demo_module().get_parser()._actions for s in a.option_strings}
    gpu_check = {s for a in gpu_check_module().get_parser()._actions for s in a.option_strings}
    return set(run_py_flags()) | torchrun | demo | gpu_check | set(make_synthetic_flags()) | EXTERNAL_FLAGS


def flags_in(text: str) -> set[str]:
    return {m.rstrip("=") for m in re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*=?)", text)}


# ---------------------------------------------------------------------------------------------- tests
def test_make_targets_exist() -> None:
    text = readme_text()
    snippets = [line for block in code_blocks(text) for line in logical_lines(block)] + inline_code(text)
    targets = {m for s in snippets for m in re.findall(r"(?:^|[\s;&(])make\s+([A-Za-z][\w-]*)", s)}
    assert targets, "the README shows no make target"
    missing = sorted(targets - makefile_targets())
    assert not missing, f"README shows make targets that the Makefile lacks: {missing}"


def repository_paths(text: str) -> set[str]:
    """Repository files named in the README's code, inline code and links."""
    snippets = code_blocks(text) + inline_code(text) + re.findall(r"\]\(([^)\s]+)\)", text)
    paths = set()
    for snippet in snippets:
        for token in re.split(r"[\s`'\"(),;=]+", snippet):
            if "path/to/this/repo/" in token:
                token = token.split("path/to/this/repo/", 1)[1]
            token = token.rstrip(".:")
            if not token or token.startswith(("/", "http", "$", "~")) or re.search(r"[{}<>*$]", token):
                continue
            token = token.removeprefix("./")
            if token.startswith(RUN_OUTPUTS):
                continue
            if token.endswith(CHECKED_SUFFIXES) or token in ROOT_FILES:
                paths.add(token)
    return paths


def test_named_files_exist() -> None:
    paths = repository_paths(readme_text())
    for expected in ("scripts/demo.py", "scripts/smoke_cpu.sh", "run.py", "average_csv.py"):
        assert expected in paths, f"{expected} is not mentioned in the README any more"
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README names files that do not exist: {missing}"


def test_readme_run_py_commands_parse() -> None:
    commands = commands_running("run.py")
    assert len(commands) >= 3, "expected the README's run.py examples"
    for launcher, args in commands:
        where = shlex.join([*launcher, "run.py", *args])
        try:
            opts = get_argparser().parse_args(args)
        except SystemExit:
            pytest.fail(f"README command does not parse with argparser.get_argparser(): {where}")
        validate_options(modify_command_options(opts))
        if launcher and Path(launcher[0]).name == "torchrun":
            try:
                torchrun_parser().parse_args([*launcher[1:], "run.py"])
            except SystemExit:
                pytest.fail(f"torchrun rejects the launcher options of: {where}")
        else:
            assert launcher and Path(launcher[-1]).name.startswith("python"), where


def test_readme_demo_and_data_commands_parse() -> None:
    demo_lines = commands_running("scripts/demo.py")
    assert demo_lines, "the README shows no scripts/demo.py command"
    for _, args in demo_lines:
        demo_module().get_parser().parse_args(args)
    for _, args in commands_running("data/make_synthetic.py"):
        unknown = sorted(flags_in(" ".join(args)) - make_synthetic_flags())
        assert not unknown, f"data/make_synthetic.py has no {unknown}"


def test_readme_flags_exist() -> None:
    text = readme_text()
    snippets = [line for block in code_blocks(text) for line in logical_lines(block)] + inline_code(text)
    used = set().union(*(flags_in(s) for s in snippets))
    assert "--step_ckpt" in used
    unknown = sorted(used - known_flags())
    assert not unknown, f"README mentions flags no parser knows: {unknown}"


@pytest.mark.parametrize(
    "script", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "scripts").rglob("*.sh")), ids=str
)
def test_script_flags_exist(script: str) -> None:
    used = flags_in((ROOT / script).read_text())
    unknown = sorted(used - known_flags())
    assert not unknown, f"{script} uses flags no parser knows: {unknown}"


def test_smoke_script_dry_run_parses(tmp_path: Path) -> None:
    """scripts/smoke_cpu.sh's run.py lines, printed with DRY_RUN=1, parse and validate."""
    proc = subprocess.run(
        ["bash", "scripts/smoke_cpu.sh", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "PYTHON": sys.executable},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]
    runs = [words[words.index("run.py") + 1 :] for words in lines if "run.py" in words]
    assert [modify_command_options(get_argparser().parse_args(a)).step for a in runs] == [0, 1]
    for args in runs:
        opts = modify_command_options(get_argparser().parse_args(args))
        validate_options(opts)
        assert (opts.method, opts.task, opts.overlap) == ("LGKD", "15-5s", True)


# --- docs/reference-notes.md: the page the code's comments cite -----------------------------------------

NOTES = ROOT / "docs" / "reference-notes.md"
NOTE_ROW = re.compile(r'^\| <a id="(rn-\d{2})"></a>RN-(\d{2}) \|')


def note_rows() -> list[tuple[str, list[str]]]:
    """(anchor, cells) of every row of the table."""
    rows = []
    for line in NOTES.read_text(encoding="utf-8").splitlines():
        match = NOTE_ROW.match(line)
        if match:
            assert match.group(1) == f"rn-{match.group(2)}", line[:40]
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            rows.append((match.group(1), cells))
    return rows


def test_reference_notes_is_one_table_with_stable_anchors() -> None:
    rows = note_rows()
    anchors = [anchor for anchor, _ in rows]
    # Numbered without gaps and each once: code cites them as RN-NN.
    assert anchors == [f"rn-{i:02d}" for i in range(1, len(rows) + 1)] and len(rows) >= 30
    header = "| ID | Status | What | Why | Effect on numbers | Where to check in the reference |"
    assert header in NOTES.read_text(encoding="utf-8")
    statuses = {"kept", "fixed", "works", "refused", "changed", "added"}
    effects = ("none", "logged values only", "training", "evaluation")
    for anchor, cells in rows:
        assert len(cells) == 6 and all(cells), f"{anchor}: {len(cells)} cells, or an empty one"
        assert set(re.split(r" / ", cells[1])) <= statuses, f"{anchor}: status {cells[1]!r}"
        assert cells[4].startswith(effects), f"{anchor}: effect {cells[4]!r}"
        assert ".py`" in cells[5] or ".sh`" in cells[5] or "inplace_abn" in cells[5], (
            f"{anchor}: {cells[5]!r}"
        )
    assert "(docs/reference-notes.md)" in readme_text()


def test_code_citations_of_the_notes_exist() -> None:
    """Every ``reference-notes.md#rn-NN`` (or ``RN-NN``) cited in the code names a row of the table."""
    anchors = {anchor for anchor, _ in note_rows()}
    cited = {}
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".sh", ".md") or ".venv" in path.parts or path == NOTES:
            continue
        for match in re.finditer(r"reference-notes\.md#(rn-\d{2})|\bRN-(\d{2})\b", path.read_text("utf-8")):
            cited.setdefault(match.group(1) or f"rn-{match.group(2)}", path.relative_to(ROOT).as_posix())
    unknown = {a: p for a, p in cited.items() if a not in anchors}
    assert not unknown, f"citations of rows that do not exist: {unknown}"


def test_adding_a_method_names_what_the_code_has() -> None:
    """The "adding a new one" steps name files and, in them, functions, classes, tables and switches: every
    such name is defined (or, for an environment variable, read as a string) in one of the files the
    section names, so the steps cannot go stale when the code is renamed."""
    text = readme_text()
    section = text[text.index("## Methods and adding a new one") :]
    section = section[: section.index("\n## ", 1)]
    quoted = re.findall(r"`([^`]+)`", section)
    files = sorted({q for q in quoted if q.endswith(".py")})
    assert {"argparser.py", "utils/loss.py", "utils/loss_terms.py", "train.py"} <= set(files)
    sources = {name: (ROOT / name).read_text(encoding="utf-8") for name in files}
    names = sorted({q for q in quoted if q.isidentifier() and not keyword.iskeyword(q)})
    assert {"METHOD_PRESETS", "LossTerm", "build_loss_terms", "check_loss_options"} <= set(names)
    missing = []
    for name in names:
        defined = re.compile(
            rf"^\s*(def|class)\s+{name}\b|^\s*{name}\s*(:[^=\n]*)?=|[\"']{name}[\"']", re.MULTILINE
        )
        if not any(defined.search(source) for source in sources.values()):
            missing.append(name)
    assert not missing, f"README's adding-a-method steps name what none of {files} defines: {missing}"
