"""Python 3.10 is declared supported (pyproject: requires-python >= 3.10), and the team's machines
run 3.11, so nothing here would notice 3.11-only code. Once, `import tomllib` in cli/train.py
broke `--set` on 3.10. This parses every module of the package with 3.10's grammar and checks
that no module uses the standard library's 3.11 additions, except behind a version check.
"""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for folder in ("tinymoe", "cli", "presets") for p in (ROOT / folder).rglob("*.py"))
# Standard-library names that appeared in 3.11 (the ones a tinymoe module could plausibly use).
NEW_MODULES = {"tomllib", "wsgiref.types"}
NEW_NAMES = {("typing", "Self"), ("typing", "LiteralString"), ("typing", "Never"), ("typing", "assert_never"),
             ("typing", "reveal_type"), ("typing", "Required"), ("typing", "NotRequired"), ("enum", "StrEnum"),
             ("datetime", "UTC"), ("hashlib", "file_digest"), ("contextlib", "chdir"), ("asyncio", "TaskGroup")}
NEW_BUILTINS = {"ExceptionGroup", "BaseExceptionGroup"}


def _version_guarded(tree: ast.AST) -> set[int]:
    """Line numbers inside the body of `if sys.version_info >= (3, 11):`."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "version_info" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def test_sources_were_found():
    assert len(SOURCES) > 50 and ROOT / "tinymoe" / "config.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_module_is_python_310(path):
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(path), feature_version=(3, 10))  # e.g. `except*` fails here
    guarded = _version_guarded(tree)
    problems = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in guarded:
            continue
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name in NEW_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in NEW_MODULES:
                problems.append(f"from {node.module} import ...")
            problems += [f"from {node.module} import {a.name}" for a in node.names
                         if (node.module, a.name) in NEW_NAMES]
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in NEW_NAMES:
                problems.append(f"{node.value.id}.{node.attr}")
        elif isinstance(node, ast.Name) and node.id in NEW_BUILTINS:
            problems.append(node.id)
        elif isinstance(node, ast.TryStar):  # absent before 3.11's ast, so only reached on newer Pythons
            problems.append("except*")
    assert not problems, f"{path.relative_to(ROOT)}: 3.11+ only: {problems} (line numbers via ast)"


def test_tomllib_is_imported_only_by_config_behind_the_version_check():
    """tinymoe.config is the one place that picks tomllib or tomli; everyone else imports it from there."""
    importers = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        guarded = _version_guarded(tree)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            if "tomllib" in names:
                importers.append((path.relative_to(ROOT).as_posix(), node.lineno in guarded))
    assert importers == [("tinymoe/config.py", True)], importers


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="runs where tomllib is missing")
def test_set_parses_on_310():
    from tinymoe.cli.train import _parse_value

    assert _parse_value("50000") == 50000 and _parse_value("true") is True and _parse_value("wide") == "wide"
