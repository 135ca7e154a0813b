"""docs/SEMANTICS.md is a contract: its numbers are the code's, and the claims that can run here do.

Every numbered statement cites the tests that check it, and every cited test must exist
(mountpoint-s3's habit). The statements about what a listing fetches, how long a failure is
remembered, the read budget and the kernel's cache times also run below, over the real cache
(kvfs.cache.resolver) on an in-memory Key Vault (tests/cache/fakevault.py), with the numbers
read from the document itself.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import trio
import trio.testing

from cache.fakevault import FakeVault, fake_render
from doc_citations import ROOT, citations, missing_tests, names_in
from kvfs.cache.resolver import Resolver
from kvfs.config.model import DEFAULT_CACHE_LIMIT, AuthConfig, CloudConfig, MountConfig, ObjectSpec
from kvfs.config.objects import MAX_VERSION_HISTORY, parse_objects
from kvfs.csi.health import RESTART_INTERVAL
from kvfs.fs.adapter import FuseAdapter
from kvfs.fs.core import IMMUTABLE_TIMEOUT, NAME_TIMEOUT, FilesystemCore, FsError
from kvfs.fs.tree import ROOT_INODE
from kvfs.net.body import VAULT_BODY_CAP
from kvfs.net.deadlines import ERROR_COOLDOWN, READ_BUDGET

DOC = (ROOT / "docs" / "SEMANTICS.md").read_text()
CLOUD = CloudConfig("AzurePublicCloud", "vault.azure.net", "https://vault.azure.net", "https://login.microsoftonline.com")


def statements() -> dict[int, str]:
    """Numbered statement → its text, on one line."""
    parts = re.split(r"^(\d+)\. ", DOC, flags=re.MULTILINE)
    return {int(number): " ".join(text.split("\n## ")[0].split()) for number, text in zip(parts[1::2], parts[2::2])}


def stated(number: int, pattern: str) -> str:
    """What `pattern`'s group matches in statement `number`; the test fails if it is not there."""
    found = re.search(pattern, statements()[number])
    assert found, f"statement {number} no longer says {pattern!r}"
    return found.group(1)


def test_every_statement_cites_tests_that_exist() -> None:
    texts = statements()
    assert sorted(texts) == list(range(1, len(texts) + 1)) and len(texts) >= 15
    for number, text in texts.items():
        assert citations(text), f"statement {number} cites no test"
    assert missing_tests(DOC) == []


def test_statement_numbers_cited_in_tests_and_the_intro_are_right() -> None:
    """Renumbering the document must rename `test_statement_N_…` and fix the intro's list."""
    texts = statements()
    here = "tests/test_semantics_doc.py"
    for name in sorted(names_in(Path(__file__))):
        if found := re.fullmatch(r"test_statement_(\d+)_\w+", name):
            assert (here, name) in citations(texts[int(found.group(1))]), f"{name} is not cited by its statement"
    intro = re.search(r"it runs statements ([\d, and]+)\s+itself", DOC)
    assert intro, "the intro no longer lists the statements this file runs"
    listed = {int(number) for number in re.findall(r"\d+", intro.group(1))}
    assert listed == {number for number, text in texts.items() if any(path == here for path, _ in citations(text))}


@pytest.mark.parametrize(
    ("number", "pattern", "value"),
    [
        (3, r"N is at most (\d+)", MAX_VERSION_HISTORY),
        (4, r"\(default (0[0-7]+)\)", parse_objects("array:\n  - |\n    objectName: a\n    objectType: secret\n")[0].file_mode),
        (10, r"over (\d+) MiB", VAULT_BODY_CAP // 2**20),
        (11, r"remembered for (\d+) s", ERROR_COOLDOWN),
        (12, r"answers within (\d+) s", READ_BUDGET),
        (15, r"at most (\d+) MiB", DEFAULT_CACHE_LIMIT // 2**20),
        (16, r"name's entry for (\d+) s", NAME_TIMEOUT),
        (16, r"cached for (\d+) s", IMMUTABLE_TIMEOUT),
        (21, r"once per pod per (\d+) minutes", RESTART_INTERVAL // 60),
    ],
)
def test_the_numbers_in_the_text_are_the_codes(number: int, pattern: str, value: float) -> None:
    text = stated(number, pattern)
    assert int(text, 8 if text.startswith("0") else 10) == value


# ----- claims run over the real cache ------------------------------------------------------

PLAIN = [ObjectSpec(name=f"s{i}", type="secret") for i in range(3)]
NESTED = ObjectSpec(name="nested", type="secret", alias="dir/n")
HISTORY = ObjectSpec(name="hist", type="secret", version_history=3)


def volume(vault: FakeVault, *specs: ObjectSpec, refresh: float = 120.0) -> tuple[FilesystemCore, Resolver]:
    config = MountConfig(
        vault_name="demo", cloud=CLOUD, auth=AuthConfig(mode="default_chain"), objects=specs, refresh_interval=refresh
    )
    cores: list[FilesystemCore] = []

    async def changed(spec: ObjectSpec, version: object) -> None:
        await cores[0].on_change(spec, version)  # type: ignore[arg-type]

    cache = Resolver(vault, config, render=fake_render, on_change=changed)
    cores.append(FilesystemCore(config, cache))
    return cores[0], cache


async def test_statement_2_what_listing_and_lookups_fetch(autojump_clock: trio.testing.MockClock) -> None:
    vault = FakeVault()
    for spec in [*PLAIN, NESTED]:
        vault.add("secret", spec.name, f"value of {spec.name}")
    for i in range(5):
        vault.add("secret", HISTORY.name, f"history {i}")
    core, cache = volume(vault, *PLAIN, NESTED, HISTORY)

    def fetched() -> tuple[int, int]:
        return vault.calls["get"], vault.calls["list"]

    # `ls` of the root, `..data` and an alias folder: nothing.
    listed = [name for name, _ in await core.readdir(ROOT_INODE)]
    for folder in ("..data", "dir"):
        await core.readdir((await core.lookup(ROOT_INODE, folder)).inode)
    assert fetched() == (0, 0)
    # `ls -l` / `stat`: a lookup of each name fetches that object, once.
    for name in ("s0", "s1"):
        await core.lookup(ROOT_INODE, name)
    assert fetched() == (2, 0) and vault.calls["get:s0:latest"] == vault.calls["get:s1:latest"] == 1
    for name in listed:
        await core.lookup(ROOT_INODE, name)
    assert fetched() == (3, 0)  # only s2 was new; folders fetch nothing
    # Reading a file fetches that object only (here: nothing more, it is cached).
    fh = await core.open((await core.lookup(ROOT_INODE, "s2")).inode, os.O_RDONLY)
    assert await core.read(fh, 0, 100) == b"value of s2" and fetched() == (3, 0)
    # A history folder's listing: 1 list + N GETs; listing it again: nothing.
    folder = (await core.lookup(ROOT_INODE, "hist")).inode
    assert [name for name, _ in await core.readdir(folder)] == ["0", "1", "2"]
    assert fetched() == (3 + 3, 1)
    await core.readdir(folder)
    assert fetched() == (6, 1)
    # Its refresh fetches the list and only the versions not held yet.
    async with trio.open_nursery() as nursery:
        await nursery.start(cache.run_refresh)
        vault.add("secret", HISTORY.name, "history 5")
        await trio.sleep(120 + 1)
        nursery.cancel_scope.cancel()
    fh = await core.open((await core.lookup(folder, "0")).inode, os.O_RDONLY)
    assert await core.read(fh, 0, 100) == b"history 5"
    assert fetched() == (6 + 1 + 3, 2)  # and the three files read in the refresh of s0..s2


async def test_statement_11_a_failure_is_remembered_for_the_stated_time(autojump_clock: trio.testing.MockClock) -> None:
    cooldown = float(stated(11, r"remembered for (\d+) s"))
    vault = FakeVault()
    core, _ = volume(vault, PLAIN[0])
    for _ in range(3):  # polling a missing file
        with pytest.raises(FsError) as info:
            await core.lookup(ROOT_INODE, "s0")
        assert info.value.errno == errno.ENOENT
    vault.add("secret", "s0", "now it exists")
    await trio.sleep(cooldown - 0.5)
    with pytest.raises(FsError):
        await core.lookup(ROOT_INODE, "s0")
    assert vault.calls["get"] == 1
    await trio.sleep(1)
    assert (await core.lookup(ROOT_INODE, "s0")).size == len(b"now it exists")
    assert vault.calls["get"] == 2


async def test_statement_12_a_read_answers_within_the_stated_budget(autojump_clock: trio.testing.MockClock) -> None:
    budget = float(stated(12, r"answers within (\d+) s"))
    vault = FakeVault()
    vault.add("secret", "s0", "slow")
    vault.latency = 10 * budget  # Key Vault never answers in time
    core, _ = volume(vault, PLAIN[0])
    with trio.fail_after(budget):
        with pytest.raises(FsError) as info:
            await core.lookup(ROOT_INODE, "s0")
    assert info.value.errno == errno.EIO


async def test_statement_16_what_the_kernel_may_cache_and_for_how_long(autojump_clock: trio.testing.MockClock) -> None:
    name_seconds = float(stated(16, r"name's entry for (\d+) s"))
    inode_seconds = float(stated(16, r"cached for (\d+) s"))
    vault = FakeVault()
    vault.add("secret", "s0", "latest")
    first = vault.add("secret", "s1", "pinned")
    core, _ = volume(vault, PLAIN[0], ObjectSpec(name="s1", type="secret", version=first))
    placeholder = dict(await core.readdir(ROOT_INODE))["s0"]
    assert (placeholder.entry_timeout, placeholder.attr_timeout) == (0, 0)  # statement 17
    latest = await core.lookup(ROOT_INODE, "s0")
    assert (latest.entry_timeout, latest.attr_timeout) == (name_seconds, inode_seconds)
    pinned = await core.lookup(ROOT_INODE, "s1")
    assert (pinned.entry_timeout, pinned.attr_timeout) == (inode_seconds, inode_seconds)
    # The kernel keeps a version inode's pages between opens.
    info = await FuseAdapter(core).open(latest.inode, os.O_RDONLY, None)  # type: ignore[arg-type]
    assert info.keep_cache
