"""docs/SEMANTICS.md is a contract: every test it cites must exist (mountpoint-s3's habit)."""

from __future__ import annotations

import re

from doc_citations import CITATION, ROOT, citations, missing_tests


def test_every_cited_test_exists() -> None:
    text = (ROOT / "docs" / "SEMANTICS.md").read_text()
    assert len(citations(text)) >= 15, "the document should cite its tests"
    assert missing_tests(text) == []


def test_every_statement_cites_a_test() -> None:
    text = (ROOT / "docs" / "SEMANTICS.md").read_text()
    statements = re.split(r"\n(?=\d+\. )", text)[1:]
    assert len(statements) >= 13
    for statement in statements:
        assert CITATION.search(statement), f"no test cited for: {statement[:80]!r}"
