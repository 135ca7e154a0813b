"""A daemon entry for tests (`--daemon-entry parse_probe_entry:run`, tests/daemon on PYTHONPATH).

The default entry, watched: `prepare` and `run` are kvfs.daemon.entry's own. What it adds: every
call of `parse_parameters` records the process's effective uid, and serving the volume is
replaced by a start-up error that tells those uids and the Key Vault host the parse took from
the cloud env file.
"""

from __future__ import annotations

import os
from typing import Any

import kvfs.config.parameters
import kvfs.daemon.volume
from kvfs.config.model import MountConfig
from kvfs.daemon.entry import prepare, report_error, run_volume

__all__ = ["prepare", "run"]

_parsed_as: list[int] = []
_parse = kvfs.config.parameters.parse_parameters


def _watched_parse(*args: Any, **kwargs: Any) -> MountConfig:
    _parsed_as.append(os.geteuid())
    return _parse(*args, **kwargs)


def _tell(config: MountConfig, mountpoint: str, *, ready_fd: int, **_: Any) -> int:
    report_error(ready_fd, f"parsed as uid {_parsed_as}, Key Vault at {config.cloud.keyvault_dns_suffix}")
    return 2


kvfs.config.parameters.parse_parameters = _watched_parse  # type: ignore[assignment]
kvfs.daemon.volume.serve_volume = _tell  # type: ignore[assignment]
run = run_volume
