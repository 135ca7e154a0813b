"""Serve one secret, `alpha`, at MOUNTPOINT with the real adapter and core, logging every request.

    python tests/fs/debug_mount.py MOUNTPOINT   (PYTHONPATH=src:tests; unmounts when stdin closes)

libfuse's `debug` option prints each request the kernel sends (`opcode: OPEN (14)`) to stderr,
so tests count round trips from what actually crossed the FUSE connection.
"""

from __future__ import annotations

import sys

import pyfuse3
import trio

from cache.fakevault import FakeVault, fake_render
from kvfs.cache.resolver import Resolver
from kvfs.config.model import AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.fs.adapter import FuseAdapter, KernelNotifier, fuse_options
from kvfs.fs.core import FilesystemCore

CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")


async def serve(mountpoint: str) -> None:
    vault = FakeVault()
    vault.add("secret", "alpha", "the value of alpha\n")
    config = MountConfig(
        vault_name="demo", cloud=CLOUD, auth=AuthConfig(mode="default_chain"), objects=(ObjectSpec("alpha", "secret"),)
    )
    core = FilesystemCore(config, Resolver(vault, config, render=fake_render), kernel=KernelNotifier())
    pyfuse3.init(FuseAdapter(core), mountpoint, fuse_options(allow_other=False, debug=True))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_at_end_of_stdin)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()
    finally:
        pyfuse3.close(unmount=True)


async def stop_at_end_of_stdin() -> None:
    await trio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
    pyfuse3.terminate()


if __name__ == "__main__":
    trio.run(serve, sys.argv[1])
