"""Newline-delimited JSON over unix stream sockets, with file descriptors riding along (SCM_RIGHTS).

The plugin talks to the mounter, the mounter to its zygote, and everyone to a daemon's control
socket this way (kvfs.daemon.control). Reads are bounded in size and time: a daemon is
unprivileged and its answers are not trusted.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from typing import Any

MAX_LINE = 4 * 1024 * 1024
MAX_FDS = 8


class ProtocolError(Exception):
    """The peer closed early, sent garbage, or did not answer in time (`timed_out`)."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class FdsDropped(ProtocolError):
    """The kernel dropped fds sent with a message (MSG_CTRUNC): more than MAX_FDS, or this process
    has no free file descriptor; `cause` is the OSError that says so (EMFILE)."""

    def __init__(self) -> None:
        super().__init__("file descriptors sent with the message were dropped (MSG_CTRUNC)")
        self.cause = OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def encode(message: dict[str, Any]) -> bytes:
    """One message as one line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes, what: str = "answer") -> dict[str, Any]:
    """One line (without its newline) as a JSON object; ProtocolError for anything else."""
    try:
        # decoded here: json.loads would guess UTF-16/32 from the bytes and import that codec, which
        # an unprivileged daemon may be unable to read from disk
        message = json.loads(line.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"{what} is not UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{what} is not a JSON object")
    return message


def send(sock: socket.socket, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = encode(message)
    sent = socket.send_fds(sock, [data], list(fds)) if fds else sock.send(data)
    if sent < len(data):
        sock.sendall(data[sent:])


class LineReader:
    """Reads one JSON line at a time from `sock`, collecting any fds passed with it."""

    def __init__(self, sock: socket.socket, limit: int = MAX_LINE) -> None:
        self.sock = sock
        self.limit = limit
        self.buf = b""
        self.fds: list[int] = []

    def read(self, timeout: float | None) -> dict[str, Any]:
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            if len(self.buf) > self.limit:
                raise ProtocolError(f"message longer than {self.limit} bytes")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ProtocolError(f"no answer within {timeout:g}s", timed_out=True)
                self.sock.settimeout(left)
            try:
                self._receive("answer")
            except socket.timeout:
                raise ProtocolError(f"no answer within {timeout:g}s", timed_out=True) from None
        line, self.buf = self.buf.split(b"\n", 1)
        if len(line) > self.limit:
            raise ProtocolError(f"message longer than {self.limit} bytes")
        return decode(line)

    def try_read(self) -> dict[str, Any] | None:
        """One non-blocking receive; the message once a full line is in, else None."""
        if b"\n" not in self.buf:
            try:
                self._receive("message")
            except BlockingIOError:
                return None
            if b"\n" not in self.buf:
                if len(self.buf) > self.limit:
                    raise ProtocolError(f"message longer than {self.limit} bytes")
                return None
        return self.read(None)

    def _receive(self, what: str) -> None:
        """One recv into the buffer; timeouts and would-block pass through for the caller to judge."""
        try:
            data, fds, flags, _addr = socket.recv_fds(self.sock, 65536, MAX_FDS)
        except (socket.timeout, BlockingIOError):
            raise
        except OSError as exc:
            raise ProtocolError(f"connection failed: {exc.strerror or exc}") from None
        self.fds.extend(fds)
        self.buf += data  # kept when fds were dropped: the reader may refuse that message and read on
        if flags & socket.MSG_CTRUNC:
            raise FdsDropped()
        if not data:
            raise ProtocolError(f"connection closed before a full {what}")

    def close_fds(self) -> None:
        for fd in self.fds:
            close_quietly(fd)
        self.fds.clear()


def close_quietly(fd: int) -> None:
    """Close an fd that may already be gone (handed over, or closed by the peer's failure)."""
    try:
        os.close(fd)
    except OSError:
        pass


def request(path: str, message: dict[str, Any], timeout: float, limit: int = 65536) -> dict[str, Any]:
    """Connect to `path`, send one request, return one answer; ProtocolError on any failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            send(sock, message)
        except OSError as exc:
            raise ProtocolError(f"cannot reach {path}: {exc.strerror or exc}") from None
        reader = LineReader(sock, limit)
        try:
            return reader.read(timeout)
        finally:
            reader.close_fds()
    finally:
        sock.close()


class AddressInUse(Exception):
    """Another process answers on the socket path already."""


def nobody_listens(path: str, timeout: float = 1.0) -> bool:
    """Whether no process listens on the unix socket `path`: connecting is refused or nothing is
    there. A listener that accepts, has a full backlog or does not answer within `timeout` (a
    stopped process) is one. Other errors (no permission, not a socket) raise."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return True
    except (TimeoutError, BlockingIOError):
        return False
    finally:
        probe.close()
    return False


def listen(path: str, backlog: int) -> socket.socket:
    """A listening unix socket at `path`, mode 0600; a stale socket file left there is replaced.

    AddressInUse when a live process answers there: its socket is never taken over.
    """
    if not nobody_listens(path):
        raise AddressInUse(f"another process already listens on {path}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        sock.bind(path)  # the umask keeps others out from the start
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    return sock
