"""Fault knobs and request counters: what tests and benchmarks turn and read.

Both are plain thread-safe objects (tests in another thread change them while the server runs).
Faults apply to Key Vault data-plane requests only; the Entra outage is the identity provider's
own flag, reached through the `identity` object given here.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)


class _HasOutage(Protocol):
    outage: bool


@dataclass(frozen=True)
class Decision:
    """What to do with one request: `action` is one of none, drop, fail, throttle."""

    action: str = "none"
    status: int = 0
    retry_after: float | None = None
    latency: float = 0.0
    empty_page: bool = False


class Faults:
    """Injected throttling, 5xx, latency, dropped connections, empty list pages and Entra outage."""

    def __init__(self, identity: _HasOutage | None = None) -> None:
        self._lock = threading.Lock()
        self._identity = identity
        self.reset()

    def reset(self) -> None:
        """Back to a healthy service (also ends an Entra outage)."""
        with self._lock:
            self._throttle = 0
            self._retry_after: float | None = None
            self._fail = 0
            self._fail_status = 503
            self._latency = 0.0
            self._drop = 0
            self._empty_pages = 0
        if self._identity is not None:
            self._identity.outage = False

    def throttle(self, n: int, retry_after: float | None = None) -> None:
        """The next `n` vault requests get 429 Throttled, with `Retry-After` only when given."""
        with self._lock:
            self._throttle = max(0, n)
            self._retry_after = retry_after

    def fail(self, status: int, n: int) -> None:
        """The next `n` vault requests get `status` (5xx) in Key Vault's error envelope."""
        if not 400 <= status <= 599:
            raise ValueError(f"fail status {status} is not an HTTP error status (400-599)")
        with self._lock:
            self._fail = max(0, n)
            self._fail_status = status

    def latency(self, seconds: float) -> None:
        """Every vault request waits `seconds` (trio time) before it is answered."""
        with self._lock:
            self._latency = max(0.0, seconds)

    def drop(self, n: int) -> None:
        """The next `n` vault requests have their connection closed without an answer."""
        with self._lock:
            self._drop = max(0, n)

    def empty_pages(self, n: int) -> None:
        """The next `n` list requests answer an empty page whose nextLink repeats the position."""
        with self._lock:
            self._empty_pages = max(0, n)

    def entra_outage(self, on: bool) -> None:
        """While on, the token endpoint fails (the identity provider decides how)."""
        if self._identity is None:
            raise RuntimeError("no identity provider attached")
        self._identity.outage = on

    def decide(self, *, is_list: bool = False) -> Decision:
        """Consume one unit of the first armed fault: drop, then fail, then throttle."""
        with self._lock:
            latency = self._latency
            empty = False
            if is_list and self._empty_pages > 0:
                self._empty_pages -= 1
                empty = True
            if self._drop > 0:
                self._drop -= 1
                return Decision("drop", latency=latency)
            if self._fail > 0:
                self._fail -= 1
                return Decision("fail", status=self._fail_status, latency=latency)
            if self._throttle > 0:
                self._throttle -= 1
                return Decision("throttle", status=429, retry_after=self._retry_after, latency=latency)
            return Decision(latency=latency, empty_page=empty)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "throttle": {"remaining": self._throttle, "retry_after": self._retry_after},
                "fail": {"remaining": self._fail, "status": self._fail_status},
                "latency": self._latency,
                "drop": self._drop,
                "empty_pages": self._empty_pages,
                "entra_outage": bool(self._identity.outage) if self._identity is not None else False,
            }

    def apply(self, body: dict[str, Any]) -> None:
        """Admin endpoint form: {"reset": true, "throttle": {"n", "retry_after"}, "fail": {"status", "n"},
        "latency": s, "drop": n, "empty_pages": n, "entra_outage": bool}."""
        if body.get("reset"):
            self.reset()
        if "throttle" in body:
            t = body["throttle"]
            if isinstance(t, int):
                self.throttle(t)
            else:
                self.throttle(int(t["n"]), None if t.get("retry_after") is None else float(t["retry_after"]))
        if "fail" in body:
            self.fail(int(body["fail"].get("status", 503)), int(body["fail"]["n"]))
        if "latency" in body:
            self.latency(float(body["latency"]))
        if "drop" in body:
            self.drop(int(body["drop"]))
        if "empty_pages" in body:
            self.empty_pages(int(body["empty_pages"]))
        if "entra_outage" in body:
            self.entra_outage(bool(body["entra_outage"]))


class Counts:
    """Requests per (vault, route, client_id); the identity provider counts with vault None."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter[tuple[str | None, str, str | None]] = Counter()

    def add(self, vault: str | None, route: str, client_id: str | None) -> None:
        with self._lock:
            self._c[(vault.lower() if vault else None, route, client_id.lower() if client_id else None)] += 1

    def count(self, vault: str | None = None, route: str | None = None, client_id: str | None = None) -> int:
        """Sum over entries matching every filter given (None matches anything)."""
        with self._lock:
            return sum(
                n
                for (v, r, c), n in self._c.items()
                if (vault is None or v == vault.lower())
                and (route is None or r == route)
                and (client_id is None or c == client_id.lower())
            )

    def reset(self) -> None:
        with self._lock:
            self._c.clear()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {"vault": v, "route": r, "client_id": c, "count": n} for (v, r, c), n in sorted(
                    self._c.items(), key=lambda kv: tuple(str(x) for x in kv[0])
                )
            ]
