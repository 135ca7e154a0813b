"""Round trips per open, counted from libfuse's log of the requests the kernel sent (real mount)."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e.conftest import is_mounted, needs_fuse, wait_until

pytestmark = [needs_fuse, pytest.mark.mount]

HERE = Path(__file__).resolve().parent


def test_a_cached_open_read_close_costs_an_open_and_a_release_and_flush_is_sent_once(tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    log = tmp_path / "requests.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE.parent)]))
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, str(HERE / "debug_mount.py"), str(mountpoint)], stdin=subprocess.PIPE, stderr=out, env=env
        )
    try:
        wait_until(lambda: is_mounted(mountpoint) or server.poll() is not None)
        for _ in range(50):
            fd = os.open(mountpoint / "alpha", os.O_RDONLY)
            assert os.read(fd, 65536) == b"the value of alpha\n"
            os.close(fd)
        # RELEASE is sent after close() returns: wait for the last one to reach the daemon.
        wait_until(lambda: log.read_text().count("opcode: RELEASE") >= 50)
    finally:
        assert server.stdin is not None
        server.stdin.close()  # unmounts
        server.wait(timeout=20)
    requests = collections.Counter(re.findall(r"opcode: (\w+)", log.read_text()))
    assert requests["OPEN"] == requests["RELEASE"] == 50
    assert requests["FLUSH"] == 1  # answered ENOSYS: the kernel never sends it again
    assert requests["READ"] == 1  # then the page cache serves the bytes (keep_cache)
    assert not is_mounted(mountpoint)
