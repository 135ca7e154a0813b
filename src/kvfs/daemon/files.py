"""A volume's files by name, read from its cache: what the control socket's `fetch` answers.

The names are the ones the mount shows (kvfs.fs.tree lays them out the same way): an object's
file name (its alias, else its name), its split `.crt` / `.key` companions, and `NAME/0` …
`NAME/N-1` of a history folder. Reading goes through the cache like a pod's read: what is cached
is answered at once, the rest is fetched with the volume's identity within the read budget, and
each file fails alone with the error a read would get.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from typing import NamedTuple

import trio

from kvfs.cache.base import ObjectCache
from kvfs.config.model import MountConfig, ObjectSpec
from kvfs.daemon.control import FileError
from kvfs.daemon.status import Failure
from kvfs.errors import KvfsError

SPLIT_SUFFIXES = (".crt", ".key")


class _Place(NamedTuple):
    spec: ObjectSpec
    suffix: str  # "" or a split companion's
    entry: int  # the history entry, -1 for an object's own file


class VolumeFiles:
    """Which object every file name of the volume shows, and their bytes."""

    def __init__(self, config: MountConfig, cache: ObjectCache) -> None:
        self.cache = cache
        self.places: dict[str, _Place] = {}
        for spec in config.objects:
            if spec.version_history >= 2:
                for index in range(spec.version_history):
                    self.places[f"{spec.file_name}/{index}"] = _Place(spec, "", index)
                continue
            self.places[spec.file_name] = _Place(spec, "", -1)
            if config.split_cert_key and spec.type == "secret":
                for suffix in SPLIT_SUFFIXES:
                    self.places[spec.file_name + suffix] = _Place(spec, suffix, -1)

    async def read(self, names: Sequence[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        """The bytes of each named file, concurrently; the error of each that failed."""
        files: dict[str, bytes] = {}
        errors: dict[str, FileError] = {}

        async def one(name: str) -> None:
            try:
                files[name] = await self._bytes(name)
            except KvfsError as exc:
                failure = Failure.of(exc)
                errors[name] = {"code": failure.code, "errno": failure.errno, "message": failure.message}

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)
        return {n: files[n] for n in names if n in files}, errors

    async def _bytes(self, name: str) -> bytes:
        place = self.places.get(name)
        if place is None:
            raise _NoSuchFile(name)
        if place.entry >= 0:
            versions = await self.cache.history(place.spec)
            if place.entry >= len(versions):
                raise _NoSuchFile(name, f"{place.spec.object_id} has fewer than {place.entry + 1} enabled versions")
            return versions[place.entry].files.get("", b"")
        version = await self.cache.current(place.spec)
        if place.suffix not in version.files:
            raise _NoSuchFile(name, f"{place.spec.object_id} is not a certificate-backed secret")
        return version.files[place.suffix]


class _NoSuchFile(KvfsError):
    """The volume shows no file of that name (a secretObjects objectName that names none)."""

    code = "NoSuchFile"

    def __init__(self, name: str, why: str = "") -> None:
        super().__init__(
            f"{name}: no such file in this volume"
            + (f" ({why})" if why else ": a file name is an object's objectAlias, else its objectName")
        )
        self.errno = errno.ENOENT
