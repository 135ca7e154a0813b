"""The control protocol's server and client (kvfs.daemon.control), over real unix sockets.

The server runs in the test's trio loop with a fake daemon behind it; its time limits run on
trio's MockClock. Real daemons under the same attacks: tests/e2e/test_control.py and
tests/csi/test_real_daemon.py.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import pytest
import trio
import trio.testing

from kvfs.daemon import jsonline
from kvfs.daemon.control import (
    MAX_FETCH_BYTES,
    BadRequest,
    MAX_FETCH_FILES,
    ControlClient,
    ControlError,
    ControlServer,
    FileError,
    Op,
    Refused,
    Request,
    parse_request,
    listen_for_mount,
    socket_path_for,
)
from kvfs.daemon.events import EventKind, EventRing


class FakeDaemon:
    """A ControlHandler that records what it was asked."""

    def __init__(self) -> None:
        self.events = EventRing()
        self.tokens: list[str] = []
        self.stops = 0
        self.fail_status = False
        self.contents = {"a": b"\x00binary\xff", "big": b"b" * (MAX_FETCH_BYTES - 10), "more": b"m" * 20}

    async def fetch(self, files: Sequence[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        await trio.sleep(0)  # as a daemon awaiting its cache
        missing = {"code": "NoSuchFile", "errno": "ENOENT", "message": "no such file"}
        return (
            {n: self.contents[n] for n in files if n in self.contents},
            {n: missing for n in files if n not in self.contents},
        )

    def push_token(self, token: str) -> None:
        if token == "refuse-me":
            raise Refused("this volume does not use workload identity")
        self.tokens.append(token)

    def status(self) -> dict[str, Any]:
        if self.fail_status:
            raise RuntimeError("status exploded")
        return {"pid": 42, "objects": []}

    def stop(self) -> None:
        self.stops += 1


@pytest.fixture
def socket_path() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="kvfsctl-", dir="/tmp")  # unix socket paths are short
    yield os.path.join(folder, "control.sock")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def served(socket_path: str) -> AsyncIterator[tuple[ControlServer, FakeDaemon, str]]:
    """A server on a real socket with small limits, running beside the test."""
    daemon = FakeDaemon()
    sock = jsonline.listen(socket_path, backlog=64)
    server = ControlServer(daemon, sock, max_request=1024, idle_timeout=5.0, send_timeout=5.0, max_connections=4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        yield server, daemon, socket_path
        nursery.cancel_scope.cancel()
    sock.close()


async def ask(path: str, data: bytes) -> list[dict[str, Any]]:
    """Send raw bytes, then read replies until the server closes (a reset, when the server left
    some of `data` unread, counts as closing)."""
    stream = await trio.open_unix_socket(path)
    received = b""
    async with stream:
        try:
            await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass  # the server stopped reading: its replies are still there to read
        with trio.fail_after(30):
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass
    return [json.loads(line) for line in received.splitlines()]


async def test_each_op_is_answered_one_request_at_a_time(served: tuple[ControlServer, FakeDaemon, str]) -> None:
    _server, daemon, path = served
    daemon.events.add(EventKind.SERVED, object="secret/a", file="a", version="v1")
    replies = await ask(path, b'{"op":"token","token":" t1 "}\n{"op":"status"}\n{"op":"events","since":0}\n')
    assert replies[0] == {"ok": True}
    assert replies[1] == {"ok": True, "pid": 42, "objects": []}
    assert replies[2]["ok"] is True and replies[2]["next"] == 2 and replies[2]["dropped"] == 0
    assert [e["kind"] for e in replies[2]["events"]] == ["served"]
    assert daemon.tokens == ["t1"]
    assert daemon.stops == 0


@pytest.mark.parametrize(
    ("line", "says"),
    [
        (b"garbage", "request is not UTF-8 JSON"),
        (b"\xff\xfe\x00", "request is not UTF-8 JSON"),
        (b"[1, 2]", "request is not a JSON object"),
        (b'"status"', "request is not a JSON object"),
        (b"{}", "'op' None: expected one of token, status, events, fetch, metrics, stop"),
        (b'{"op": 1}', "'op' 1: expected one of"),
        (b'{"op": "explode"}', "'op' 'explode': expected one of"),
        (b'{"op": "token"}', "'token' must be a non-empty string"),
        (b'{"op": "token", "token": 5}', "'token' must be a non-empty string"),
        (b'{"op": "token", "token": "   "}', "'token' must be a non-empty string"),
        (b'{"op": "events", "since": -1}', "'since' -1: expected a whole number >= 0"),
        (b'{"op": "events", "since": "3"}', "'since' '3': expected a whole number"),
        (b'{"op": "events", "since": true}', "'since' True: expected a whole number"),
        (b'{"op": "events", "since": 1e300}', "'since' 1e+300: expected a whole number"),
        (b'{"op": "fetch"}', "'files' must list 1 to 64 file names"),
        (b'{"op": "fetch", "files": []}', "'files' must list 1 to 64 file names"),
        (b'{"op": "fetch", "files": "a"}', "'files' must list 1 to 64 file names"),
        (b'{"op": "fetch", "files": ["a", 3]}', "'files' must list 1 to 64 file names"),
        (b'{"op": "fetch", "files": [""]}', "'files' must list 1 to 64 file names"),
        (b"[" * 100_000, "request longer than 1024 bytes"),
        (b'{"op": "token", "token": "refuse-me"}', "this volume does not use workload identity"),
    ],
)
async def test_bad_requests_are_refused_with_the_field_and_the_connection_goes_on(
    served: tuple[ControlServer, FakeDaemon, str], line: bytes, says: str
) -> None:
    _server, daemon, path = served
    replies = await ask(path, line + b'\n{"op":"status"}\n')
    assert replies[0]["ok"] is False and says in replies[0]["error"]
    if b"[[[" in line:
        assert len(replies) == 1  # an oversized request ends its connection
    else:
        assert replies[1]["ok"] is True  # the same connection still answers
    assert daemon.tokens == [] and daemon.stops == 0


async def test_fetch_answers_each_file_or_its_error_within_the_reply_limit(
    served: tuple[ControlServer, FakeDaemon, str],
) -> None:
    _server, daemon, path = served
    [reply] = await ask(path, b'{"op":"fetch","files":["a","nope","a"]}\n')
    assert reply == {
        "ok": True,
        "files": {"a": base64.b64encode(daemon.contents["a"]).decode()},
        "errors": {"nope": {"code": "NoSuchFile", "errno": "ENOENT", "message": "no such file"}},
    }
    [reply] = await ask(path, b'{"op":"fetch","files":["big","more"]}\n')  # together past the limit
    assert list(reply["files"]) == ["big"] and reply["errors"]["more"]["code"] == "ReplyTooLarge"
    assert "fetch more on its own" in reply["errors"]["more"]["message"]
    client = ControlClient(path)
    files, errors = await trio.to_thread.run_sync(client.fetch, ["more", "a", "gone"])
    assert files == {"more": daemon.contents["more"], "a": daemon.contents["a"]} and list(errors) == ["gone"]
    names = [f"f{i}" for i in range(MAX_FETCH_FILES)]
    assert parse_request({"op": "fetch", "files": names}) == Request(Op.FETCH, files=tuple(names))
    for files in ([*names, "one-more"], ["x" * 4097]):
        with pytest.raises(BadRequest, match="'files' must list 1 to 64 file names"):
            parse_request({"op": "fetch", "files": files})


async def test_stop_runs_even_when_the_client_leaves_before_the_reply(
    served: tuple[ControlServer, FakeDaemon, str],
) -> None:
    server, daemon, path = served
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        await trio.to_thread.run_sync(sock.connect, path)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        sock.sendall(b'{"op": "stop"}\n')
    with trio.fail_after(30):
        while daemon.stops == 0 or server.connections:
            await trio.sleep(0.01)
    assert daemon.stops == 1


async def test_early_hang_ups_in_parallel_leave_the_server_serving(
    served: tuple[ControlServer, FakeDaemon, str],
) -> None:
    server, _daemon, path = served

    def hang_up(request: bytes) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(request)

    for request in (b'{"op": "status"}\n' * 50, b'{"op": "sta', b"", b'{"op": "events"}\n'):
        threads = [threading.Thread(target=hang_up, args=(request,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        await trio.to_thread.run_sync(lambda: [t.join() for t in threads])
    with trio.fail_after(30):
        while server.connections:
            await trio.sleep(0.01)
    assert (await ask(path, b'{"op": "status"}\n'))[0]["pid"] == 42


async def test_idle_and_half_requests_are_closed_after_the_idle_timeout(
    served: tuple[ControlServer, FakeDaemon, str], autojump_clock: trio.testing.MockClock
) -> None:
    server, _daemon, path = served
    quiet = await trio.open_unix_socket(path)
    half = await trio.open_unix_socket(path)
    await half.send_all(b'{"op": "stat')  # never finished
    with trio.fail_after(600):  # MockClock: the server's 5 s idle timeout passes at once
        assert await quiet.receive_some(100) == b""
        assert await half.receive_some(100) == b""
        while server.connections:
            await trio.sleep(1)
    await quiet.aclose()
    await half.aclose()


async def test_a_client_that_never_reads_is_dropped_and_others_are_served(
    served: tuple[ControlServer, FakeDaemon, str], autojump_clock: trio.testing.MockClock
) -> None:
    server, _daemon, path = served
    slow = await trio.open_unix_socket(path)
    sent = 0
    with trio.move_on_after(1):  # until the socket buffers are full both ways
        while True:
            await slow.send_all(b'{"op": "events", "since": 0}\n' * 100)
            sent += 100
    assert sent > 100
    assert (await ask(path, b'{"op": "status"}\n'))[0]["ok"] is True
    with trio.fail_after(600):  # the 5 s send timeout passes at once: the slow client is dropped
        while server.connections:
            await trio.sleep(1)
    await slow.aclose()


async def test_more_connections_than_the_limit_are_told_busy(served: tuple[ControlServer, FakeDaemon, str]) -> None:
    server, _daemon, path = served
    held = [await trio.open_unix_socket(path) for _ in range(server.max_connections)]
    with trio.fail_after(30):
        while server.connections < server.max_connections:
            await trio.sleep(0.01)
    reply = await ask(path, b'{"op": "status"}\n')
    assert reply == [{"ok": False, "error": "busy: 4 control connections are open"}]
    for stream in held:
        await stream.aclose()
    with trio.fail_after(30):
        while server.connections:
            await trio.sleep(0.01)
    assert (await ask(path, b'{"op": "status"}\n'))[0]["ok"] is True


async def test_a_failing_daemon_answers_internal_error_logs_once_and_serves_on(
    served: tuple[ControlServer, FakeDaemon, str],
    caplog: pytest.LogCaptureFixture,
    expect_logs: Callable[..., None],
) -> None:
    _server, daemon, path = served
    daemon.fail_status = True
    expect_logs(r"internal error on the control socket", level=logging.ERROR)
    expect_logs(r"internal error on the control socket again", level=logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger="kvfs.daemon.control"):
        replies = await ask(path, b'{"op": "status"}\n' * 3 + b'{"op": "events"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, True]
    assert replies[0]["error"] == "internal error answering 'status' (see the daemon's log)"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None  # one traceback, not one per request


# ---- the client ---------------------------------------------------------------------------------


def _one_shot_server(path: str, answer: bytes | None) -> threading.Thread:
    """Accepts one connection, reads the request, sends `answer` (None: says nothing until closed)."""
    listener = jsonline.listen(path, backlog=1)

    def run() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                try:
                    if answer is not None:
                        conn.sendall(answer)
                    conn.recv(1)  # until the client hangs up
                except OSError:
                    pass  # the client gave up first

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_the_client_sends_typed_requests_and_raises_on_refusals(socket_path: str) -> None:
    assert Request(Op.TOKEN, token="t").to_json() == {"op": "token", "token": "t"}
    assert Request(Op.EVENTS, since=7).to_json() == {"op": "events", "since": 7}
    assert parse_request(Request(Op.EVENTS, since=7).to_json()) == Request(Op.EVENTS, since=7)
    _one_shot_server(socket_path, b'{"ok": false, "error": "no such thing"}\n')
    with pytest.raises(ControlError, match="no such thing"):
        ControlClient(socket_path).status()


def test_the_client_bounds_the_reply_in_size_and_time(socket_path: str) -> None:
    thread = _one_shot_server(socket_path, b'{"ok": true, "x": "' + b"a" * (5 * 1024 * 1024) + b'"}\n')
    with pytest.raises(jsonline.ProtocolError, match="longer than"):
        ControlClient(socket_path).status()
    thread.join(30)
    _one_shot_server(socket_path, None)
    with pytest.raises(jsonline.ProtocolError) as info:
        ControlClient(socket_path, timeout=0.2).status()
    assert info.value.timed_out


def test_a_mounts_socket_path_depends_on_the_mountpoint_only(tmp_path: Any) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert socket_path_for(str(tmp_path / "link" / "mnt")) == socket_path_for(str(tmp_path / "real" / "mnt") + "/")
    assert socket_path_for(str(tmp_path / "real" / "a")) != socket_path_for(str(tmp_path / "real" / "b"))
    assert socket_path_for("/x").startswith("/run/kvfs/" if os.geteuid() == 0 else "/")


def _stale_socket(path: str) -> None:
    """A socket file nobody listens on: what a killed mount leaves."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()


def test_a_new_mount_removes_the_sockets_of_killed_mounts_and_nothing_else(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tempfile.mkdtemp(prefix="kvfsrun-", dir="/tmp")  # short: unix socket paths are limited
    try:
        monkeypatch.setattr("kvfs.daemon.control.runtime_dir", lambda: folder)
        names = {what: f"{i:024x}.sock" for i, what in enumerate(["stale", "live", "link", "plain", "other"])}
        path = {what: os.path.join(folder, name) for what, name in names.items()}
        _stale_socket(path["stale"])
        live = jsonline.listen(path["live"], backlog=1)  # a mount that serves (or hangs): it listens
        _stale_socket(os.path.join(folder, "kept.sock"))  # not a name kvfs gives
        os.symlink(os.path.join(folder, "kept.sock"), path["link"])  # never followed, never removed
        open(path["plain"], "w").close()  # not a socket
        _stale_socket(path["other"])
        if os.geteuid() == 0:
            os.lchown(path["other"], 4242, 4242)  # another user's
        with caplog.at_level(logging.INFO, logger="kvfs.daemon.control"):
            sock, made = listen_for_mount(str(tmp_path / "mnt"))
        sock.close()
        live.close()
        left = set(os.listdir(folder))
        assert names["stale"] not in left
        assert {names["live"], names["link"], names["plain"], "kept.sock", os.path.basename(made)} <= left
        assert (names["other"] in left) is (os.geteuid() == 0)  # as root it is another user's: kept
        assert f"removed {1 if os.geteuid() == 0 else 2} control socket(s) of killed kvfs mounts" in caplog.text
    finally:
        shutil.rmtree(folder, ignore_errors=True)
