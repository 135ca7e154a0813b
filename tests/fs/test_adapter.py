"""The pyfuse3 adapter without a mount: what each handler answers when the core fails."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Callable

import pyfuse3
import pytest

from fs.test_core import A, make_core, version
from kvfs.errors import VaultError
from kvfs.fs.adapter import FuseAdapter
from kvfs.fs.tree import ROOT_INODE

CTX = None  # the handlers never look at the request context


async def test_handlers_answer_the_errno_of_kvfs_errors_and_eio_with_a_log_line_for_bugs(
    caplog: pytest.LogCaptureFixture, expect_logs: Callable[..., None]
) -> None:
    expect_logs(r"internal error in (lookup|open); answering EIO", level=logging.ERROR)
    core, resolver, _ = make_core(A)
    adapter = FuseAdapter(core)
    placeholder = dict(await core.readdir(ROOT_INODE))["alpha"].inode  # listed, never fetched
    resolver.errors["alpha"] = VaultError("gone", status=404, code="SecretNotFound")
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.lookup(ROOT_INODE, b"alpha", CTX)
    assert info.value.errno == errno.ENOENT
    resolver.errors["alpha"] = RuntimeError("a bug")
    for call in (adapter.lookup(ROOT_INODE, b"alpha", CTX), adapter.open(placeholder, os.O_RDONLY, CTX)):
        with pytest.raises(pyfuse3.FUSEError) as info:
            await call
        assert info.value.errno == errno.EIO
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "internal error in lookup; answering EIO",
        "internal error in open; answering EIO",
    ]
    del resolver.errors["alpha"]
    resolver.latest["alpha"] = version(A, "v1", b"x")
    inode = (await core.lookup(ROOT_INODE, "alpha")).inode
    with pytest.raises(pyfuse3.FUSEError) as info:
        await adapter.open(inode, os.O_WRONLY, CTX)
    assert info.value.errno == errno.EROFS
    opened = await adapter.open(inode, os.O_RDONLY, CTX)
    assert (opened.direct_io, opened.keep_cache) == (False, True)
