"""The time limits nest inside the one documented budget, and the docs state that budget."""

from __future__ import annotations

from pathlib import Path

from kvfs.net import deadlines
from kvfs.net.retry import ENTRA_RETRY, IMDS_RETRY, KEY_VAULT_RETRY

ROOT = Path(__file__).resolve().parents[2]


def test_each_limit_fits_inside_the_one_above() -> None:
    d = deadlines
    assert d.HTTP_TIMEOUT < d.TOKEN_DEADLINE < d.VAULT_OP_DEADLINE < d.LOAD_DEADLINE < d.READ_BUDGET
    # A token leaves room for one whole Key Vault attempt inside the same operation.
    assert d.TOKEN_DEADLINE + d.HTTP_TIMEOUT <= d.VAULT_OP_DEADLINE
    assert KEY_VAULT_RETRY.deadline == d.VAULT_OP_DEADLINE
    assert ENTRA_RETRY.deadline == IMDS_RETRY.deadline == d.TOKEN_DEADLINE


def test_docs_promise_the_read_budget() -> None:
    budget = f"{deadlines.READ_BUDGET:g}"
    assert f"within {budget} seconds" in (ROOT / "README.md").read_text()
    assert f"answers within {budget} s" in (ROOT / "docs" / "SEMANTICS.md").read_text()
