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


def missing_tests(text: str) -> list[str]:
    missing = []
    for path, name in citations(text):
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name not in names:
            missing.append(f"{path}::{name}")
    return missing
