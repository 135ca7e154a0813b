"""Issue 9: daemons fork from a zygote that never handled a request.

A new daemon's memory must not hold any earlier volume's client secret or token (they reached
the mounter, which forked daemons itself before), and a dead zygote is replaced while the
daemons it forked keep serving and are still reaped.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import INLINE
from csi_harness import Kubelet, PluginProcess, newest_mounter, wait_for
from kvfs.csi.state import process_alive

pytestmark = [pytest.mark.mount, INLINE]


def memory(pid: int) -> Iterator[bytes]:
    """Every readable mapping of `pid`, read as root through /proc/PID/mem."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or fields[-1] in ("[vvar]", "[vvar_vclock]", "[vsyscall]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                yield mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue


def found_in(pid: int, needles: list[str]) -> set[str]:
    wanted = {needle: needle.encode() for needle in needles}
    hits: set[str] = set()
    for chunk in memory(pid):
        hits |= {needle for needle, raw in wanted.items() if raw in chunk}
    return hits


def parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])


def planted(i: int) -> tuple[str, str]:
    """A recognisable client secret and service account token for publish number `i`."""
    tag = f"{i:02d}-{os.urandom(6).hex()}"
    return f"PLANTED-SECRET-{tag}", f"eyJhbGciOiJSUzI1NiJ9.PLANTED-TOKEN-{tag}.c2ln"


def test_a_new_daemon_holds_no_earlier_volumes_secrets_or_tokens(csi_plugin: Kubelet, tmp_path: Path) -> None:
    earlier: list[str] = []
    for i in range(20):
        secret, token = planted(i)
        earlier += [secret, token]
        target = csi_plugin.target(tmp_path, f"p{i}")
        csi_plugin.publish(f"vol-{i}", target, secrets={"clientsecret": secret}, token=token)
    secret, token = planted(20)
    target = csi_plugin.target(tmp_path, "new")
    csi_plugin.publish("vol-new", target, secrets={"clientsecret": secret}, token=token)
    assert Path(target, "hello").read_text() == "hello from vol-new\n"
    daemon = csi_plugin.state(target).pid
    assert found_in(daemon, [secret, token]) == {secret, token}  # the scan sees what is there
    assert found_in(daemon, earlier) == set()
    zygote = parent(daemon)
    assert Path(f"/proc/{zygote}/cmdline").read_bytes().startswith(b"kvfs zygote")
    assert found_in(zygote, [*earlier, secret, token]) == set()  # the zygote never saw a request


def test_a_dead_zygote_is_replaced_and_its_daemons_keep_serving(
    csi_process: Callable[..., PluginProcess], tmp_path: Path
) -> None:
    plugin = csi_process(allow_inline_parameters=True)
    kubelet = plugin.kubelet
    assert kubelet is not None
    mounter = newest_mounter(plugin.state_dir)
    first = kubelet.target(tmp_path, "first")
    kubelet.publish("vol-first", first)
    orphan = kubelet.state(first)
    zygote = int(mounter.ping()["zygote"])  # type: ignore[index]
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{zygote}"), 10, "the mounter to reap the zygote")
    # its daemon lives on, now a child of the mounter (a subreaper), and still serves
    assert parent(orphan.pid) == plugin.mounter_pid()
    assert Path(first, "hello").read_text() == "hello from vol-first\n"
    second = kubelet.target(tmp_path, "second")
    kubelet.publish("vol-second", second)  # a new zygote forks it
    assert Path(second, "hello").read_text() == "hello from vol-second\n"
    replacement = int(mounter.ping()["zygote"])  # type: ignore[index]
    assert replacement not in (0, zygote)
    kubelet.unpublish("vol-first", first)
    wait_for(lambda: not os.path.exists(f"/proc/{orphan.pid}"), 10, "the orphaned daemon to be reaped")
    assert not process_alive(orphan.pid, orphan.pid_start)
    kubelet.unpublish("vol-second", second)
