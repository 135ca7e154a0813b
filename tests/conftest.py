"""Shared fixtures: `*.localhost` resolves to loopback, a running emulator (async or threaded),
and the guards of tests/guards.py (checklogs; a loud line when real-mount tests were skipped)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from guards import checklogs, expect_logs, pytest_terminal_summary  # noqa: F401 - for every test
from kvfs.emulator.server import Emulator, EmulatorThread, open_emulator

_real_getaddrinfo = socket.getaddrinfo


def _loopback_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    """Resolve `localhost` and any `*.localhost` name to 127.0.0.1, as systemd-resolved does (RFC 6761)."""
    if isinstance(host, bytes):
        name = host.decode("ascii", "replace")
    else:
        name = host
    if isinstance(name, str) and name.lower().rstrip(".").endswith(".localhost"):
        host = "127.0.0.1"
    return _real_getaddrinfo(host, *args, **kwargs)


@pytest.fixture(autouse=True)
def _resolve_localhost(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _loopback_getaddrinfo)


@pytest.fixture
async def emulator(tmp_path: Path) -> AsyncIterator[Emulator]:
    """The emulator in the test's own trio run, with vault `demo` and files under tmp_path/emulator."""
    async with open_emulator(tmp_path / "emulator") as emu:
        yield emu


@pytest.fixture
def emulator_thread(tmp_path: Path) -> Iterator[Emulator]:
    """The emulator on a background thread, for tests doing blocking I/O (real FUSE mounts, the SDK)."""
    with EmulatorThread(tmp_path / "emulator") as emu:
        yield emu

