"""docs/SEMANTICS.md is a contract: every test it cites must exist (mountpoint-s3's habit)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")


def test_every_cited_test_exists() -> None:
    text = (ROOT / "docs" / "SEMANTICS.md").read_text()
    citations = CITATION.findall(text)
    assert len(citations) >= 15, "the document should cite its tests"
    missing = []
    for path, name in citations:
        tree = ast.parse((ROOT / path).read_text())
        names = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        if name not in names:
            missing.append(f"{path}::{name}")
    assert missing == []


def test_every_statement_cites_a_test() -> None:
    text = (ROOT / "docs" / "SEMANTICS.md").read_text()
    statements = re.split(r"\n(?=\d+\. )", text)[1:]
    assert len(statements) >= 13
    for statement in statements:
        assert CITATION.search(statement), f"no test cited for: {statement[:80]!r}"
