"""Everything a broken or hostile client can throw at a daemon's control socket (issue 10).

`attack(path)` runs it all against a live daemon: garbage, half requests, huge lines, non-JSON,
wrong types, early hang-ups (many in parallel, some with a reset), slow readers and more
connections than the daemon serves at once. It asserts what each answer says; the caller then
checks that the mount still serves reads and the socket still answers `status`. Nothing here
sends `stop` or a well-formed `token` (that would change the daemon legitimately).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import threading
import time
from typing import Any

from kvfs.daemon.control import MAX_CONNECTIONS, MAX_REQUEST, ControlClient

STATUS = b'{"op": "status"}\n'

BAD_LINES = [
    b"garbage",
    b"\x00\x01\x02\xff\xfe",
    b"{",
    b'{"op": "status"',
    b"null",
    b"[]",
    b"42",
    b'"status"',
    b"{}",
    b'{"op": null}',
    b'{"op": ["status"]}',
    b'{"op": {"op": "status"}}',
    b'{"op": "STOP"}',
    b'{"op": "stop "}',
    b'{"op": "reboot"}',
    b'{"op": "token"}',
    b'{"op": "token", "token": ""}',
    b'{"op": "token", "token": 7}',
    b'{"op": "token", "token": ["a"]}',
    b'{"op": "token", "token": {"token": "x"}}',
    b'{"op": "events", "since": -5}',
    b'{"op": "events", "since": "0"}',
    b'{"op": "events", "since": 1.5}',
    b'{"op": "events", "since": 1e400}',
    b'{"op": "events", "since": 99999999999999999999999999}',
    b'{"op": "events", "since": false}',
    b"[" * 50_000,  # deep nesting, still under the size limit
    '{"op": "stätus"}'.encode(),
]


def _exchange(path: str, data: bytes, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Send `data`, close our side, collect every reply line until the daemon closes."""
    with _connect(path) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon stopped reading (a huge line): its answer is still there
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in received.splitlines()]


def _connect(path: str) -> socket.socket:
    """A connection, blocking while the daemon's listen backlog is full."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def _hang_up(path: str, data: bytes, *, reset: bool) -> None:
    """Connect, send, and leave before reading anything; `reset`: with an RST, not a FIN."""
    with _connect(path) as sock:
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if data:
            sock.sendall(data)


def _in_parallel(count: int, work: Any) -> None:
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


def answers_status(path: str, timeout: float = 30.0) -> dict[str, Any]:
    """The daemon's status, waiting out connections it is still closing (busy); fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        reply = _exchange(path, STATUS)
        if reply and reply[0].get("ok"):
            return reply[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"the control socket stopped answering status: {reply}")
        time.sleep(0.05)


def attack(path: str, *, seed: int = 10) -> None:
    rng = random.Random(seed)
    # Garbage and wrong types, one line at a time: refused, and the same connection goes on.
    randoms = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))).replace(b"\n", b" ") for _ in range(40)]
    for line in BAD_LINES + randoms:
        replies = _exchange(path, line + b"\n" + STATUS)
        assert len(replies) == 2, (line[:60], replies)
        assert replies[0]["ok"] is False and replies[0]["error"], (line[:60], replies[0])
        assert replies[1]["ok"] is True, (line[:60], replies[1])
    # Huge lines, with and without a newline: refused, the connection closed.
    for huge in (b"x" * (4 * MAX_REQUEST), b'{"op": "status", "pad": "' + b"y" * (16 * MAX_REQUEST) + b'"}\n'):
        replies = _exchange(path, huge + STATUS)
        assert replies == [{"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}], replies
    # Half requests (no newline) and early hang-ups, many at once, some with a reset.
    pieces = [b'{"op": "stat', b'{"op": "status"}', STATUS, STATUS * 200, b'{"op": "events", "since": 0}\n' * 50, b""]
    _in_parallel(96, lambda i: _hang_up(path, pieces[i % len(pieces)], reset=i % 3 == 0))
    # Slow readers: requests piled up and never read, while others are answered.
    slow = []
    for _ in range(3):
        sock = _connect(path)
        sock.setblocking(False)
        try:
            for _ in range(20_000):
                sock.send(b'{"op": "events", "since": 0}\n' * 20)
        except BlockingIOError:
            pass  # both socket buffers are full: the daemon is stuck sending to us
        slow.append(sock)
    answers_status(path)
    # More connections than the daemon serves at once: the rest are told it is busy.
    held = []
    for _ in range(MAX_CONNECTIONS + 8):
        held.append(_connect(path))
    busy = _exchange(path, STATUS)
    assert busy[0]["ok"] is True or "busy" in busy[0]["error"], busy
    for sock in slow + held:
        sock.close()
    answers_status(path)
