"""RetryPolicy: which outcomes retry, Retry-After parsing, jittered backoff, the deadline (MockClock)."""

from __future__ import annotations

import email.utils
import random
import ssl

import httpx
import pytest
import trio

from kvfs.errors import is_tls_verification_error
from kvfs.net.retry import (
    RETRY_STATUSES,
    DeadlineExceeded,
    RetryPolicy,
    full_jitter,
    parse_retry_after,
)

NOW = 1_700_000_000.0


def _resp(status: int, **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=headers)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": " 2.5 "}, 2.5),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"x-ms-retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "100", "Retry-After": "9"}, 0.1),  # the precise header wins
        ({"Retry-After": email.utils.formatdate(NOW + 12, usegmt=True)}, 12.0),
        ({"Retry-After": email.utils.formatdate(NOW - 60, usegmt=True)}, 0.0),  # date in the past
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "inf"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = parse_retry_after(httpx.Headers(headers), now=NOW)
    assert got == pytest.approx(expected) if expected is not None else got is None


def test_full_jitter_is_bounded_and_capped() -> None:
    rng = random.Random(1)
    for attempt in range(1, 12):
        ceiling = min(8.0, 0.8 * 2 ** (attempt - 1))
        samples = [full_jitter(attempt, base=0.8, cap=8.0, rng=rng) for _ in range(200)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling * 0.8  # it really spreads up to the ceiling


@pytest.mark.parametrize("status", sorted(RETRY_STATUSES))
def test_retryable_statuses(status: int) -> None:
    assert RetryPolicy().retryable_status(status)


@pytest.mark.parametrize("status", [200, 400, 401, 403, 404, 409, 501])
def test_non_retryable_statuses(status: int) -> None:
    assert not RetryPolicy().retryable_status(status)


def test_exception_classification() -> None:
    policy = RetryPolicy()
    req = httpx.Request("GET", "https://v.vault.azure.net/")
    for exc in (
        httpx.ConnectError("refused", request=req),
        httpx.ReadTimeout("slow", request=req),
        httpx.RemoteProtocolError("Server disconnected without sending a response.", request=req),
        httpx.ReadError("reset", request=req),
    ):
        assert policy.retryable_exception(exc), exc
    tls = httpx.ConnectError("verify failed", request=req)
    tls.__cause__ = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    assert is_tls_verification_error(tls)
    assert not policy.retryable_exception(tls)
    assert not policy.retryable_exception(httpx.LocalProtocolError("bad", request=req))
    assert not policy.retryable_exception(ValueError("x"))


async def test_run_retries_until_success(autojump_clock: trio.testing.MockClock) -> None:
    answers = [_resp(503), _resp(500), _resp(200)]
    calls = 0

    async def attempt() -> httpx.Response:
        nonlocal calls
        calls += 1
        return answers.pop(0)

    start = trio.current_time()
    response = await RetryPolicy(rng=random.Random(0)).run(attempt)
    assert response.status_code == 200 and calls == 3
    assert 0 < trio.current_time() - start <= 0.8 + 1.6  # two jittered waits, each within its ceiling


async def test_run_honours_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    answers = [_resp(429, **{"Retry-After": "4"}), _resp(200)]

    async def attempt() -> httpx.Response:
        return answers.pop(0)

    start = trio.current_time()
    assert (await RetryPolicy().run(attempt)).status_code == 200
    assert trio.current_time() - start == pytest.approx(4.0)


async def test_run_honours_http_date_retry_after(autojump_clock: trio.testing.MockClock) -> None:
    answers = [_resp(503, **{"Retry-After": email.utils.formatdate(NOW + 6, usegmt=True)}), _resp(200)]

    async def attempt() -> httpx.Response:
        return answers.pop(0)

    start = trio.current_time()
    assert (await RetryPolicy(wallclock=lambda: NOW).run(attempt)).status_code == 200
    assert trio.current_time() - start == pytest.approx(6.0)


async def test_run_does_not_start_a_retry_past_the_deadline(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def attempt() -> httpx.Response:
        nonlocal calls
        calls += 1
        return _resp(429, **{"Retry-After": "30"})

    start = trio.current_time()
    response = await RetryPolicy(deadline=25.0).run(attempt)
    assert response.status_code == 429 and calls == 1
    assert trio.current_time() == start  # gave up at once instead of sleeping 30 s


async def test_run_stops_within_deadline_when_always_failing(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def attempt() -> httpx.Response:
        nonlocal calls
        calls += 1
        await trio.sleep(2.0)  # each attempt takes time
        return _resp(503)

    start = trio.current_time()
    response = await RetryPolicy(deadline=25.0, max_attempts=100, rng=random.Random(3)).run(attempt)
    assert response.status_code == 503
    assert calls > 3
    assert trio.current_time() - start <= 25.0


async def test_run_deadline_cancels_a_hanging_attempt(autojump_clock: trio.testing.MockClock) -> None:
    async def attempt() -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError

    start = trio.current_time()
    with pytest.raises(DeadlineExceeded):
        await RetryPolicy(deadline=25.0).run(attempt)
    assert trio.current_time() - start == pytest.approx(25.0)


async def test_run_reraises_last_network_error(autojump_clock: trio.testing.MockClock) -> None:
    req = httpx.Request("GET", "https://v.vault.azure.net/")
    calls = 0

    async def attempt() -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(httpx.ConnectError):
        await RetryPolicy(max_attempts=4).run(attempt)
    assert calls == 4


async def test_run_does_not_retry_non_retryable_exception(autojump_clock: trio.testing.MockClock) -> None:
    calls = 0

    async def attempt() -> httpx.Response:
        nonlocal calls
        calls += 1
        raise RuntimeError("bug")

    with pytest.raises(RuntimeError):
        await RetryPolicy().run(attempt)
    assert calls == 1
