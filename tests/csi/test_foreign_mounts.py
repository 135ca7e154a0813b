"""A node switched from the upstream driver to kvfs under the upstream name: kubelet then calls kvfs
for volumes the upstream driver published, whose targets hold its tmpfs (real tmpfs mounts here)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import INLINE
from csi_harness import Kubelet, inline_params
from kvfs.csi.mountinfo import find_mount, read_mountinfo

pytestmark = [pytest.mark.mount, INLINE]


def mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, timeout=30)


def upstream_volume(target: Path) -> None:
    """What the upstream driver leaves at a target: a tmpfs with its atomic writer's layout."""
    target.mkdir(parents=True)
    mount("-t", "tmpfs", "tmpfs", str(target))
    stamp = target / "..2026_01_01_00_00_00.000000001"
    (stamp / "folder").mkdir(parents=True)
    (stamp / "db-password").write_text("s3cret")
    (stamp / "folder" / "nested").write_text("n")
    (target / "..data").symlink_to(stamp.name)
    for name in ("db-password", "folder"):
        (target / name).symlink_to(f"..data/{name}")


@pytest.fixture
def outside(tmp_path: Path) -> Iterator[Path]:
    """A folder outside kubelet's pod folders that must survive whatever unpublish does."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "keep-me").write_text("precious")
    yield folder


def mounts_below(path: Path) -> list[str]:
    return [e.mount_point for e in read_mountinfo() if e.mount_point.startswith(str(path))]


def test_unpublish_removes_the_upstream_tmpfs_as_upstream_does(csi_plugin: Kubelet, tmp_path: Path, outside: Path) -> None:
    target = Path(csi_plugin.target(tmp_path, "old-pod"))
    upstream_volume(target)
    # a symlink pointing out of the target, and a file system mounted inside it: neither is followed
    (target / "escape").symlink_to(outside)
    (target / "inner").mkdir()
    mount("--bind", str(outside), str(target / "inner"))
    held = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # a process still in the tmpfs: it is busy
    try:
        csi_plugin.unpublish("csi-upstream-vol", str(target))
        # the files went before the unmount, as upstream deletes them (what the holder still sees)
        assert os.listdir(held) == ["inner"]  # the mount point inside was neither entered nor removed
        assert not target.exists()
        assert mounts_below(tmp_path) == []
        assert sorted(os.listdir(outside)) == ["keep-me"] and (outside / "keep-me").read_text() == "precious"
        csi_plugin.unpublish("csi-upstream-vol", str(target))  # idempotent: a missing target is success
    finally:
        os.close(held)
        for point in reversed(mounts_below(tmp_path)):
            subprocess.run(["umount", "-l", point], check=False)


def test_republish_of_an_upstream_volume_leaves_it_to_the_pod_until_unpublish(
    csi_plugin: Kubelet, tmp_path: Path
) -> None:
    target = Path(csi_plugin.target(tmp_path, "running-pod"))
    upstream_volume(target)
    try:
        for _ in range(2):  # kubelet republishes every minute or two
            csi_plugin.publish("csi-upstream-vol", str(target), inline_params())
            entry = find_mount(str(target))
            assert entry is not None and entry.fstype == "tmpfs"  # nothing mounted over it
            assert (target / "db-password").read_text() == "s3cret"
            assert csi_plugin.state(str(target)) is None
        csi_plugin.unpublish("csi-upstream-vol", str(target))
        assert not target.exists() and mounts_below(tmp_path) == []
    finally:
        for point in reversed(mounts_below(tmp_path)):
            subprocess.run(["umount", "-l", point], check=False)


def test_an_upstream_tmpfs_nested_deeper_than_python_recurses_is_still_unpublished(
    csi_plugin: Kubelet, tmp_path: Path
) -> None:
    """A tenant's objectAlias made the folders (upstream bounds only the path's length)."""
    target = Path(csi_plugin.target(tmp_path, "deep-pod"))
    upstream_volume(target)
    fd = os.open(target / "..2026_01_01_00_00_00.000000001", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(1500):  # Path.mkdir(parents=True) would itself recurse too deep
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd), fd
        os.close(parent)
    os.close(os.open("secret", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    try:
        csi_plugin.unpublish("csi-upstream-vol", str(target))
        assert not target.exists() and mounts_below(tmp_path) == []
    finally:
        for point in reversed(mounts_below(tmp_path)):
            subprocess.run(["umount", "-l", point], check=False)
