"""SingleFlight under MockClock: shared loads, own exception per caller, cooldown, cancelled leaders."""

from __future__ import annotations

import errno
import traceback

import pytest
import trio
import trio.testing

from kvfs.errors import ConfigError, KvfsError, VaultError
from kvfs.net.singleflight import SingleFlight, fresh_copy


class Load:
    """A load that takes `latency` seconds and then returns `value` or raises `error`; counts runs."""

    def __init__(self, *, latency: float = 1.0, value: str = "v", error: Exception | None = None) -> None:
        self.latency = latency
        self.value = value
        self.error = error
        self.runs = 0

    async def __call__(self) -> str:
        self.runs += 1
        await trio.sleep(self.latency)
        if self.error is not None:
            raise self.error
        return self.value


async def gather(flights: SingleFlight[str, str], load: Load, callers: int) -> list[str | BaseException]:
    out: list[str | BaseException] = []

    async def one() -> None:
        try:
            out.append(await flights.run("k", load))
        except Exception as exc:  # noqa: BLE001 - collected for the assertions
            out.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(one)
    return out


async def test_concurrent_callers_share_one_load(autojump_clock: trio.testing.MockClock) -> None:
    flights: SingleFlight[str, str] = SingleFlight()
    load = Load()
    assert await gather(flights, load, 50) == ["v"] * 50
    assert load.runs == 1 and not flights.running("k")


async def test_each_caller_gets_its_own_exception(autojump_clock: trio.testing.MockClock) -> None:
    error = VaultError("secret 'db': throttled", status=429, code="Throttled", retry_after=3.0)
    flights: SingleFlight[str, str] = SingleFlight(cooldown=5.0, remember=(KvfsError,))
    load = Load(error=error)
    failures = await gather(flights, load, 20)
    # ... and so does every caller answered from the cooldown afterwards
    for _ in range(20):
        with pytest.raises(VaultError) as caught:
            await flights.run("k", load)
        failures.append(caught.value)
    assert load.runs == 1
    assert len({id(f) for f in failures}) == len(failures) == 40
    for failure in failures:
        assert isinstance(failure, VaultError)
        assert (str(failure), failure.status, failure.code, failure.retry_after, failure.errno) == (
            str(error), 429, "Throttled", 3.0, errno.EIO
        )
    # No traceback piles up: the last reader's is as short as the first cooled-down reader's.
    depth = [len(traceback.extract_tb(f.__traceback__)) for f in failures[20:]]
    assert depth[0] == depth[-1]


async def test_failure_is_remembered_for_the_cooldown_only(autojump_clock: trio.testing.MockClock) -> None:
    flights: SingleFlight[str, str] = SingleFlight(cooldown=5.0, remember=(KvfsError,))
    load = Load(latency=0.0, error=VaultError("gone", status=404, code="SecretNotFound"))
    with pytest.raises(VaultError):
        await flights.run("k", load)
    load.error = None
    await trio.sleep(4.9)
    with pytest.raises(VaultError):
        await flights.run("k", load)  # answered from memory
    assert load.runs == 1
    assert isinstance(flights.remembered("k"), VaultError) and flights.remembered("other") is None
    await trio.sleep(0.2)
    assert await flights.run("k", load) == "v"
    assert load.runs == 2


async def test_only_the_remembered_types_cool_down(autojump_clock: trio.testing.MockClock) -> None:
    flights: SingleFlight[str, str] = SingleFlight(cooldown=5.0, remember=(KvfsError,))
    load = Load(latency=0.0, error=RuntimeError("a bug, not an answer"))
    for _ in range(3):
        with pytest.raises(RuntimeError):
            await flights.run("k", load)
    assert load.runs == 3


async def test_background_runs_neither_use_nor_start_a_cooldown(autojump_clock: trio.testing.MockClock) -> None:
    flights: SingleFlight[str, str] = SingleFlight(cooldown=5.0, remember=(KvfsError,))
    load = Load(latency=0.0, error=VaultError("throttled", status=429))
    with pytest.raises(VaultError):
        await flights.run("k", load, cooldown=False)
    with pytest.raises(VaultError):
        await flights.run("k", load)  # not remembered: a real second load
    assert load.runs == 2
    load.error = None
    assert await flights.run("k", load, cooldown=False) == "v"  # ignores the reader's cooldown
    assert load.runs == 3


async def test_a_cancelled_leader_hands_over_to_a_waiter(autojump_clock: trio.testing.MockClock) -> None:
    flights: SingleFlight[str, str] = SingleFlight(cooldown=5.0)
    load = Load(latency=5.0)
    got: list[str] = []

    async def waiter() -> None:
        await trio.sleep(1)
        got.append(await flights.run("k", load))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        with trio.move_on_after(2):  # the leader gives up (an interrupted read)
            await flights.run("k", load)
    assert got == ["v"]
    assert load.runs == 2  # the waiter loaded again; the leader's cancellation is not remembered
    assert flights.remembered("k") is None


def test_fresh_copy_keeps_type_and_attributes_without_calling_init() -> None:
    original = ConfigError("objectName", "a/b", "must not contain /", "use objectAlias")
    try:
        raise original
    except ConfigError as exc:
        copy = fresh_copy(exc)
    assert type(copy) is ConfigError and copy is not original
    assert (str(copy), copy.field, copy.value, copy.fix, copy.errno) == (
        str(original), "objectName", "a/b", "use objectAlias", errno.EINVAL
    )
    assert copy.__traceback__ is None and original.__traceback__ is not None
