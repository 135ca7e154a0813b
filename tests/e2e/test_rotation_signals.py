"""What an inotify watcher sees when a secret rotates, on a real mount against the emulator.

kvfs tells the kernel that the old version's inode was deleted (FUSE notify_delete), so a watch
on the file gets IN_DELETE_SELF, as with kubelet's atomic writer; fsnotify-based reloaders then
reload and add their watch again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from e2e.conftest import Mounter, needs_fuse, read, workload_parameters
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]

EVERYTHING = 0xFFF  # every inotify event of a watched object (IN_ALL_EVENTS)


def events_until(inotify: INotify, wd: int, wanted: int, timeout: float = 20.0) -> list[tuple[int, int]]:
    """(wd, mask) of every event read until `wd` got `wanted`; a deadline, never a timing assert."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[int, int]] = []
    while not any(w == wd and mask & wanted for w, mask in seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {flags.from_mask(wanted)} for watch {wd}; events: {seen}")
        seen += [(event.wd, event.mask) for event in inotify.read(timeout=int(left * 1000) + 1)]
    return seen


def test_a_watch_on_a_read_file_sees_delete_self_at_rotation_and_can_be_added_again(
    emu: Emulator, mounter: Mounter
) -> None:
    emu.set_secret("demo", "tls-cert", "version one")
    mount = mounter.start(
        workload_parameters(emu, {"objectName": "tls-cert", "objectType": "secret"}), "--refresh-interval", "1s"
    )
    path = mount.path / "tls-cert"
    assert read(path) == b"version one"
    with INotify() as inotify:
        on_file = inotify.add_watch(path, EVERYTHING)
        on_folder = inotify.add_watch(mount.path, EVERYTHING)
        emu.set_secret("demo", "tls-cert", "version two")
        seen = events_until(inotify, on_file, flags.DELETE_SELF)
        assert read(path) == b"version two"  # what a reloader does next
        seen += [(event.wd, event.mask) for event in inotify.read(timeout=0)]
        # The file's watch ends with the deletion; the folder hears nothing (no IN_DELETE,
        # IN_CREATE or IN_MOVED_TO: FUSE cannot make the kernel emit those).
        assert [mask for wd, mask in seen if wd == on_file] == [flags.DELETE_SELF, flags.IGNORED]
        names_changed = flags.DELETE | flags.CREATE | flags.MOVED_FROM | flags.MOVED_TO
        assert not [mask for wd, mask in seen if wd == on_folder and mask & names_changed]

        # A watch added again, here through the ..data/ view, sees the next rotation too.
        again = inotify.add_watch(mount.path / "..data" / "tls-cert", EVERYTHING)
        emu.set_secret("demo", "tls-cert", "version three")
        events_until(inotify, again, flags.DELETE_SELF)
        assert read(mount.path / "..data" / "tls-cert") == b"version three"
        assert read(Path(path)) == b"version three"
