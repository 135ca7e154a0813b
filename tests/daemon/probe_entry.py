"""A daemon entry for tests (`--daemon-entry probe_entry:run`, tests/daemon on PYTHONPATH).

It serves nothing: its start-up error says which of its steps ran, and as which uid.
"""

from __future__ import annotations

import os

from kvfs.daemon.entry import DaemonSpec, report_error

_prepared_as: list[int] = []


def prepare(spec: DaemonSpec) -> None:
    _prepared_as.append(os.getuid())


def run(spec: DaemonSpec) -> int:
    report_error(spec.ready_fd, f"probe entry: prepared as uid {_prepared_as}, ran as uid {os.getuid()}")
    return 2
