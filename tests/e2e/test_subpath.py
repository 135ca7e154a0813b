"""`subPath`: a bind mount of one file of the volume, as kubelet makes it, across rotations.

The bind holds the inode it was made on (kvfs makes one inode per version). That inode keeps
its version while a file opened through it before the rotation is open, then follows its
name: the next open reads the new version, with the new size.
"""

from __future__ import annotations

import errno
import mmap
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from inotify_simple import INotify, flags

from e2e.conftest import (
    Mounter,
    needs_fuse,
    read,
    read_during_rapid_rotations,
    rotation_content,
    wait_until,
    workload_parameters,
)
from kvfs.emulator.server import Emulator

pytestmark = [needs_fuse, pytest.mark.mount]


@contextmanager
def bind_mounted(source: Path, target: Path) -> Iterator[Path]:
    """`mount --bind FILE TARGET`, what kubelet does for a volumeMount with `subPath`."""
    target.touch()
    subprocess.run(["mount", "--bind", str(source), str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def read_with_size(path: Path) -> tuple[bytes, int]:
    """The bytes of one open, and the size `fstat` gives for that open file."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        return f.read(), size


def test_a_bind_mounted_file_shows_the_new_version_on_the_next_open(
    emu: Emulator, mounter: Mounter, tmp_path: Path
) -> None:
    emu.set_secret("demo", "app-config", "version one")
    mount = mounter.start(
        workload_parameters(emu, {"objectName": "app-config", "objectType": "secret"}), "--refresh-interval", "1s"
    )
    observed: list[bytes] = []

    def next_open_shows(path: Path, expected: bytes) -> None:
        """Poll until an open through `path` reads `expected`; `fstat` of that open gives its size.

        Polls that overlap the rotation may see the next version's size in `fstat` (statement
        19); the open that first shows it comes after, and nothing rotates until the next step.
        """

        def poll() -> tuple[bytes, int] | None:
            data, size = read_with_size(path)
            observed.append(data)
            return (data, size) if data == expected else None

        data, size = wait_until(poll)
        assert size == len(data)

    with bind_mounted(mount.path / "app-config", tmp_path / "subpath-file") as target, INotify() as inotify:
        inotify.add_watch(target, flags.DELETE_SELF)
        held = open(target, "rb")
        assert held.read(7) == b"version"
        emu.set_secret("demo", "app-config", "version two, longer")
        wait_until(lambda: read(mount.path / "app-config") == b"version two, longer")
        # While a file opened before the rotation is open, the bind shows the version it had.
        assert read_with_size(target) == (b"version one", len(b"version one"))
        assert held.read() == b" one"
        held.close()
        next_open_shows(target, b"version two, longer")

        emu.set_secret("demo", "app-config", "v3")  # shorter, then longer again
        next_open_shows(target, b"v3")
        emu.set_secret("demo", "app-config", "version four, the longest of them all")
        next_open_shows(target, b"version four, the longest of them all")
        with open(target, "rb") as pinned:
            emu.set_secret("demo", "app-config", "version five")
            next_open_shows(target, b"version five")
            assert pinned.read() == b"version four, the longest of them all"  # open files keep theirs
        with open(target, "rb") as f:  # such opens bypass the page cache: no shared mapping
            with pytest.raises(OSError) as info:
                mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            assert info.value.errno == errno.ENODEV
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ) as private:
                assert private[:] == b"version five"
        # The bind holds the old entry, so a watch on it never hears of a deletion.
        assert inotify.read(timeout=0) == []
    versions = {b"version one", b"version two, longer", b"v3", b"version four, the longest of them all", b"version five"}
    assert set(observed) <= versions  # every read a whole version


def test_rapid_rotations_through_a_bind_mount_never_tear(emu: Emulator, mounter: Mounter, tmp_path: Path) -> None:
    emu.set_secret("demo", "hot", rotation_content(0))
    mount = mounter.start(
        workload_parameters(emu, {"objectName": "hot", "objectType": "secret"}), "--refresh-interval", "0.05s"
    )
    with bind_mounted(mount.path / "hot", tmp_path / "subpath-file") as target:
        seen, torn = read_during_rapid_rotations(emu, "hot", target, readers=2)
    assert torn == []
    assert len({data[:7] for data in seen}) > 3, "the bind should have shown several versions"
