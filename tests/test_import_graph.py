"""The import graph has no upward edges from ``utils/``: a module of ``utils`` imports the standard library,
third-party packages and other ``utils`` modules only, never a top-level module or package of this
repository (``run``, ``argparser``, ``tasks``, ``segmentation_module``, ``dataset``, ``models``, ...) nor
``scripts``, ``benchmarks``, ``data`` or ``tests``. What a ``utils`` function needs from above is passed in.

Every ``utils/**/*.py`` is parsed with ``ast`` (imports inside functions and ``TYPE_CHECKING`` blocks count
too, and so do ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name), so a new
file or a new import is checked without a list to update.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

LIBRARY_BASE = "utils"


def repository_top_level_names(root: Path) -> set[str]:
    """The importable names at the top of the repository except ``utils``: ``*.py`` modules and folders
    (packages, and script folders such as ``scripts`` and ``data``, importable as namespace packages)."""
    names = {path.stem for path in root.glob("*.py")}
    names |= {path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")}
    names |= {"scripts", "benchmarks", "data", "tests"}
    return names - {LIBRARY_BASE}


def imported_modules(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, a module of the dotted ``package``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1] if node.level <= len(parts) else []
                module = ".".join(filter(None, [*base, node.module or ""]))
                if node.level > len(parts):  # above the repository root: name it by what is imported
                    module = node.module or (node.names[0].name if node.names else "")
            else:
                module = node.module or ""
            found.append((node.lineno, module))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def upward_imports(source: str, package: str, forbidden: set[str]) -> list[tuple[int, str]]:
    """The imports of ``source`` (a module of ``package``) whose first component is in ``forbidden``."""
    tree = ast.parse(source)
    return [(line, name) for line, name in imported_modules(tree, package) if name.split(".")[0] in forbidden]


def library_files() -> list[Path]:
    return sorted((ROOT / LIBRARY_BASE).rglob("*.py"))


def test_utils_has_no_upward_import():
    forbidden = repository_top_level_names(ROOT)
    expected = {"run", "argparser", "tasks", "segmentation_module", "resume", "dataset", "models", "scripts"}
    assert expected <= forbidden
    files = library_files()
    assert ROOT / LIBRARY_BASE / "pseudo_label.py" in files
    problems = []
    for path in files:
        relative = path.relative_to(ROOT)
        package = ".".join(relative.parent.parts)
        for line, name in upward_imports(path.read_text(encoding="utf-8"), package, forbidden):
            problems.append(f"{relative}:{line} imports {name}")
    assert not problems, (
        "utils/ must not import top-level modules of this repository or scripts (pass what is needed in, "
        "or move the module up):\n" + "\n".join(problems)
    )


FORBIDDEN = {"run", "tasks", "dataset", "scripts", "benchmarks"}


@pytest.mark.parametrize(
    ("source", "package", "expected"),
    [
        ("import tasks", "utils", [(1, "tasks")]),
        ("import dataset.transform as T", "utils", [(1, "dataset.transform")]),
        ("from run import build_model", "utils", [(1, "run")]),
        ("from scripts.demo_support import report", "utils", [(1, "scripts.demo_support")]),
        ("def f():\n    from dataset.voc import VOC_CLASSES", "utils", [(2, "dataset.voc")]),
        ("if TYPE_CHECKING:\n    import benchmarks.common", "utils", [(2, "benchmarks.common")]),
        ("from ..dataset import transform", "utils", [(1, "dataset")]),
        ("from ...run import main", "utils.sub", [(1, "run")]),
        ("from .. import tasks", "utils", [(1, "tasks")]),
        ("importlib.import_module('run')", "utils", [(1, "run")]),
        ("__import__('tasks')", "utils", [(1, "tasks")]),
        # Allowed: utils itself, the standard library, third-party packages, relative imports inside utils.
        ("import torch\nfrom utils.loss import entropy\nfrom . import files\nimport os.path", "utils", []),
        ("from .. import loss", "utils.sub", []),
        ("import runpy\nimport dataclasses\nimport tasks_extra", "utils", []),
    ],
)
def test_upward_imports_are_found(source, package, expected):
    assert upward_imports(source, package, FORBIDDEN) == expected
