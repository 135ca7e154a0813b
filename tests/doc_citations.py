"""Docs that cite tests as `tests/PATH.py::test_name` (SEMANTICS.md, SECURITY.md): the citations
and the ones that name no existing test."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def citations(text: str) -> list[tuple[str, str]]:
    return CITATION.findall(text)


def names_in(path: Path) -> set[str]:
    """Functions and classes of a test module, and module-level names (`test_x = Machine.TestCase`)."""
    tree = ast.parse(path.read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return names | {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}


def missing_tests(text: str) -> list[str]:
    return [f"{path}::{name}" for path, name in citations(text) if name not in names_in(ROOT / path)]
