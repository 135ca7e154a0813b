"""docs/SECURITY.md is a contract: every boundary cites a test, and every cited test exists.
The README's flags table for `kvfs csi node` lists every flag the command takes."""

from __future__ import annotations

import argparse
import re

import pytest

from doc_citations import CITATION, ROOT, citations, missing_tests
from kvfs.cli import build_parser
from kvfs.auth.cache import EXPIRED_TOKEN_HOLD
from kvfs.config.clouds import MAX_ENV_FILE
from kvfs.config.objects import MAX_OBJECTS, MAX_OBJECTS_TEXT, MAX_VERSION_HISTORY
from kvfs.net.body import TOKEN_BODY_CAP, VAULT_BODY_CAP
from kvfs.net.deadlines import READ_BUDGET
from kvfs.vault.client import MAX_PAGES


def _doc() -> str:
    return (ROOT / "docs" / "SECURITY.md").read_text()


def test_every_cited_test_exists() -> None:
    assert len(citations(_doc())) >= 20, "the document should cite its tests"
    assert missing_tests(_doc()) == []


def test_every_boundary_cites_a_test() -> None:
    sections = re.split(r"\n(?=### )", _doc().split("## Boundaries", 1)[1].split("\n## ", 1)[0])[1:]
    assert len(sections) >= 10
    for section in sections:
        assert CITATION.search(section), f"no test cited for: {section.splitlines()[0]}"


def _boundary(title: str) -> str:
    """One boundary's text, on one line."""
    return " ".join(_doc().split(f"### {title}", 1)[1].split("\n### ", 1)[0].split())


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        (r"(\d+) MiB for Key Vault", VAULT_BODY_CAP // 2**20),
        (r"(\d+) MiB for a token endpoint", TOKEN_BODY_CAP // 2**20),
        (r"a read's (\d+) s budget", READ_BUDGET),
        (r"\(at most (\d+), refused at publish", MAX_VERSION_HISTORY),
        (r"at most (\d+) pages", MAX_PAGES),
        (r"that token is\s+used for (\d+) s", EXPIRED_TOKEN_HOLD),
    ],
)
def test_the_bounds_on_answers_are_the_codes(pattern: str, value: int) -> None:
    found = re.search(pattern, _boundary("15. "))
    assert found, f"boundary 15 no longer says {pattern!r}"
    assert int(found.group(1)) == value


@pytest.mark.parametrize(
    ("pattern", "value"),
    [
        (r"`objects` is at most (\d+) MiB", MAX_OBJECTS_TEXT // 2**20),
        (r"lists at most (\d+) objects", MAX_OBJECTS),
        (r"the cloud env file is at most (\d+) KiB", MAX_ENV_FILE // 2**10),
    ],
)
def test_the_bounds_on_what_root_parses_are_the_codes(pattern: str, value: int) -> None:
    found = re.search(pattern, _boundary("17. "))
    assert found, f"boundary 17 no longer says {pattern!r}"
    assert int(found.group(1)) == value


def test_readme_links_the_security_model_and_lists_every_csi_node_flag() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/SECURITY.md)" in readme
    parser = build_parser()
    csi = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["csi"]
    node = next(a for a in csi._actions if isinstance(a, argparse._SubParsersAction)).choices["node"]
    flags = [
        option
        for action in node._actions
        if action.help != argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)
        for option in action.option_strings
    ]
    assert "--allow-inline-parameters" in flags and "--daemon-uid-range" in flags
    table = [line for line in readme.splitlines() if line.startswith("| `--")]
    missing = [flag for flag in flags if not any(f"`{flag}" in line for line in table)]
    assert missing == []
