"""The control protocol of a volume's daemon, defined once: its ops, limits, server and client.

Every daemon (the real one and the stand-in, under CSI or `kvfs mount`) serves it with
`ControlServer`; the CSI plugin, tests and tools speak it with `ControlClient`. One JSON object
per line each way (kvfs.daemon.jsonline), one request at a time per connection:

    {"op": "token", "token": JWT}   → {"ok": true}          a fresh service account token (CSI republish)
    {"op": "status"}                → {"ok": true, "pid": N, ...}   the mount's live state
    {"op": "events", "since": N}    → {"ok": true, "next": M, "dropped": K, "events": [...]}
    {"op": "fetch", "files": [NAME, ...]}
                                    → {"ok": true, "files": {NAME: base64}, "errors": {NAME: {...}}}
    {"op": "metrics"}               → {"ok": true, "counters": {...}, "histograms": {...}}   (kvfs.daemon.metrics)
    {"op": "stop"}                  → {"ok": true}, then the daemon unmounts and exits
    anything else                   → {"ok": false, "error": TEXT}

Nothing a client does can stop the mount: a request is bounded in size (MAX_REQUEST) and time
(IDLE_TIMEOUT), a reply nobody reads is dropped after SEND_TIMEOUT, at most MAX_CONNECTIONS
are served at once, and every failure ends only its own connection.

`fetch` hands the bytes of named files to the CSI plugin, which syncs them into Kubernetes
Secrets (secretObjects): the daemon reads them from its cache, fetching what is not cached with
the volume's own identity. Only the plugin (root) and the daemon's own uid can connect.

Where the socket is: in CSI, `<state dir>/volumes/<key>/control.sock`, made by the plugin; for
`kvfs mount`, `socket_path_for(MOUNTPOINT)` (0600, in `/run/kvfs/` for root, else in
`$XDG_RUNTIME_DIR/kvfs/`), advertised as the mount root's extended attribute `user.kvfs.control`.
A killed `kvfs mount` cannot remove its socket: each new one first removes the sockets in that
folder that nobody listens on any more (sweep_stale_sockets).
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import logging
import os
import base64
import binascii
import re
import socket
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from kvfs.daemon import jsonline
from kvfs.daemon.events import EventRing

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024  # bytes of one request line (a service account token is a few KiB)
MAX_REPLY = jsonline.MAX_LINE  # bytes of one reply a client accepts
IDLE_TIMEOUT = 10.0  # seconds for a connection to send one whole request
SEND_TIMEOUT = 10.0  # seconds for a client to take one reply
MAX_CONNECTIONS = 16  # served at once; more are told "busy" and closed
CONTROL_XATTR = "user.kvfs.control"  # on the root of a `kvfs mount`: the control socket's path
MAX_FETCH_FILES = 64  # file names in one fetch request
MAX_FETCH_BYTES = 2 * 1024 * 1024  # file bytes in one fetch reply (base64 takes it to 2.7 MiB < MAX_REPLY)
MAX_NAME = 4096  # characters of one file name (PATH_MAX)


class Op(str, enum.Enum):
    TOKEN = "token"
    STATUS = "status"
    EVENTS = "events"
    FETCH = "fetch"
    METRICS = "metrics"
    STOP = "stop"


@dataclass(frozen=True)
class Request:
    op: Op
    token: str = ""  # TOKEN
    since: int = 0  # EVENTS
    files: tuple[str, ...] = ()  # FETCH

    def to_json(self) -> dict[str, Any]:
        message: dict[str, Any] = {"op": self.op.value}
        if self.op is Op.TOKEN:
            message["token"] = self.token
        elif self.op is Op.EVENTS:
            message["since"] = self.since
        elif self.op is Op.FETCH:
            message["files"] = list(self.files)
        return message


class BadRequest(Exception):
    """A request the server answers with {"ok": false}; the message names the field and the fix."""


def parse_request(message: dict[str, Any]) -> Request:
    op = message.get("op")
    if not isinstance(op, str) or op not in {o.value for o in Op}:
        shown = repr(op)[:40]
        raise BadRequest(f"'op' {shown}: expected one of {', '.join(o.value for o in Op)}")
    kind = Op(op)
    if kind is Op.TOKEN:
        token = message.get("token")
        if not isinstance(token, str) or not token.strip():
            raise BadRequest("'token' must be a non-empty string (the service account token)")
        return Request(kind, token=token.strip())
    if kind is Op.EVENTS:
        since = message.get("since", 0)
        if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since < 2**63:
            raise BadRequest(f"'since' {repr(since)[:40]}: expected a whole number >= 0 (the last reply's 'next')")
        return Request(kind, since=since)
    if kind is Op.FETCH:
        files = message.get("files")
        if (
            not isinstance(files, list)
            or not 0 < len(files) <= MAX_FETCH_FILES
            or not all(isinstance(f, str) and 0 < len(f) <= MAX_NAME for f in files)
        ):
            raise BadRequest(
                f"'files' must list 1 to {MAX_FETCH_FILES} file names of the volume (strings of at most {MAX_NAME}"
                " characters)"
            )
        return Request(kind, files=tuple(dict.fromkeys(files)))
    return Request(kind)


FileError = dict[str, str]  # {"code", "errno", "message"}: why one file could not be fetched


def fetch_reply(files: Mapping[str, bytes], errors: Mapping[str, FileError]) -> dict[str, Any]:
    """A fetch's answer (without "ok"): file bytes base64-encoded, up to MAX_FETCH_BYTES in all;
    the files beyond that are errors, and a client asks for them again on their own."""
    encoded: dict[str, str] = {}
    failed = dict(errors)
    total = 0
    for name, data in files.items():
        total += len(data)
        if total > MAX_FETCH_BYTES:
            failed[name] = {
                "code": "ReplyTooLarge",
                "errno": "EFBIG",
                "message": f"the files asked for exceed {MAX_FETCH_BYTES} bytes in one reply: fetch {name} on its own",
            }
            continue
        encoded[name] = base64.b64encode(data).decode("ascii")
    return {"files": encoded, "errors": failed}


def ok(**fields: Any) -> dict[str, Any]:
    return {"ok": True, **fields}


def refused(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


class Refused(Exception):
    """Raised by a handler: the request is understood but cannot be done (e.g. no workload identity)."""


class ControlHandler(Protocol):
    """What a daemon offers its control socket."""

    events: EventRing

    def push_token(self, token: str) -> None:
        """Use `token` as the service account token from now on; Refused if the volume takes none."""
        ...

    def status(self) -> dict[str, Any]:
        """The mount's live state (without "ok")."""
        ...

    async def fetch(self, files: Sequence[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        """The bytes of the named files of the volume (fetched if not cached), and why others failed."""
        ...

    def metrics(self) -> dict[str, Any]:
        """The daemon's counters, a kvfs.daemon.metrics snapshot (without "ok")."""
        ...

    def stop(self) -> None:
        """Unmount and exit (called after the reply was sent, or the client left)."""
        ...


# ---- server -------------------------------------------------------------------------------------


class ControlServer:
    """Serves the control protocol on a listening unix socket (`sock`), for as long as the daemon runs."""

    def __init__(
        self,
        handler: ControlHandler,
        sock: socket.socket,
        *,
        max_request: int = MAX_REQUEST,
        idle_timeout: float = IDLE_TIMEOUT,
        send_timeout: float = SEND_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.handler = handler
        self.sock = sock
        self.max_request = max_request
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.connections = 0
        self._failed_before = False

    async def serve(self) -> None:
        """Accept connections forever; each is served on its own task and fails alone."""
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(self.sock))
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # out of fds, say: wait, and try again
                    log.warning("control socket: accept failed (%s); retrying in 1 s", exc.strerror or exc)
                    await trio.sleep(1.0)
                    continue
                nursery.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            async with stream:
                if self.connections > self.max_connections:
                    await self._send(stream, refused(f"busy: {self.max_connections} control connections are open"))
                    return
                buffer = bytearray()
                while True:
                    line = await self._read_line(stream, buffer)
                    if line is None:
                        return
                    reply, request = await self._answer(line)
                    if request is not None and request.op is Op.STOP:
                        try:
                            await self._send(stream, reply)
                        finally:
                            self.handler.stop()
                        return
                    if not await self._send(stream, reply):
                        return
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.debug("control client went away: %s", exc)
        except Exception:
            self._log_failure()
        finally:
            self.connections -= 1

    async def _read_line(self, stream: trio.SocketStream, buffer: bytearray) -> bytes | None:
        """The next request line; None when the client is done, idle too long, or sent too much."""
        with trio.move_on_after(self.idle_timeout):
            while (end := buffer.find(b"\n")) < 0:
                if len(buffer) > self.max_request:
                    await self._send(stream, refused(f"request longer than {self.max_request} bytes"))
                    return None
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return None  # a half request without its newline is dropped
                buffer += chunk
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if len(line) > self.max_request:
                await self._send(stream, refused(f"request longer than {self.max_request} bytes"))
                return None
            return line
        log.debug("control client idle for %g s: closing", self.idle_timeout)
        return None

    async def _send(self, stream: trio.SocketStream, reply: dict[str, Any]) -> bool:
        """Send one reply; False when the client did not take it in time (the connection ends)."""
        with trio.move_on_after(self.send_timeout):
            await stream.send_all(jsonline.encode(reply))
            return True
        log.debug("control client did not read its reply within %g s: closing", self.send_timeout)
        return False

    async def _answer(self, line: bytes) -> tuple[dict[str, Any], Request | None]:
        """The reply to one line; never raises."""
        try:
            request = parse_request(jsonline.decode(line, "request"))
        except (jsonline.ProtocolError, BadRequest) as exc:
            return refused(f"{exc} (send one JSON object per line, e.g. {{\"op\": \"status\"}})"), None
        try:
            if request.op is Op.TOKEN:
                self.handler.push_token(request.token)
                return ok(), request
            if request.op is Op.STATUS:
                return ok(**self.handler.status()), request
            if request.op is Op.EVENTS:
                return ok(**self.handler.events.read(request.since)), request
            if request.op is Op.FETCH:
                return ok(**fetch_reply(*await self.handler.fetch(request.files))), request
            if request.op is Op.METRICS:
                return ok(**self.handler.metrics()), request
            return ok(), request  # STOP: the caller stops after replying
        except Refused as exc:
            return refused(str(exc)), request
        except Exception:
            self._log_failure()
            return refused(f"internal error answering {request.op.value!r} (see the daemon's log)"), request

    def _log_failure(self) -> None:
        """The first unexpected failure with its traceback, later ones in one line at DEBUG."""
        if not self._failed_before:
            self._failed_before = True
            log.exception("internal error on the control socket; the mount keeps serving")
        else:
            log.debug("internal error on the control socket again", exc_info=True)


# ---- client -------------------------------------------------------------------------------------


class ControlError(jsonline.ProtocolError):
    """The daemon answered {"ok": false, "error": ...}."""


class ControlClient:
    """The client side: one connection per request, bounded in time and reply size."""

    def __init__(self, path: str, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    def call(self, request: Request) -> dict[str, Any]:
        """The reply; jsonline.ProtocolError if unreachable or garbled, ControlError if refused."""
        reply = jsonline.request(self.path, request.to_json(), self.timeout, limit=MAX_REPLY)
        if reply.get("ok") is not True:
            raise ControlError(str(reply.get("error") or "refused without a reason")[:500])
        return reply

    def push_token(self, token: str) -> None:
        self.call(Request(Op.TOKEN, token=token))

    def status(self) -> dict[str, Any]:
        return self.call(Request(Op.STATUS))

    def events(self, since: int = 0) -> dict[str, Any]:
        return self.call(Request(Op.EVENTS, since=since))

    def fetch(self, files: Sequence[str]) -> tuple[dict[str, bytes], dict[str, FileError]]:
        """The named files' bytes, and why the others failed; ProtocolError on a garbled answer."""
        reply = self.call(Request(Op.FETCH, files=tuple(files)))
        got, errors = reply.get("files"), reply.get("errors")
        if not isinstance(got, dict) or not isinstance(errors, dict):
            raise jsonline.ProtocolError("fetch: the reply has no 'files' and 'errors' mappings")
        try:
            data = {str(name): base64.b64decode(str(text), validate=True) for name, text in got.items()}
        except binascii.Error:
            raise jsonline.ProtocolError("fetch: a file in the reply is not base64") from None
        if not all(isinstance(err, dict) for err in errors.values()):
            raise jsonline.ProtocolError("fetch: an error in the reply is not a mapping")
        failed = {str(name): {str(k): str(v) for k, v in err.items()} for name, err in errors.items()}
        return data, failed

    def metrics(self) -> dict[str, Any]:
        return self.call(Request(Op.METRICS))

    def stop(self) -> None:
        self.call(Request(Op.STOP))


# ---- where `kvfs mount` puts its socket -------------------------------------------------------


def runtime_dir() -> str:
    """`/run/kvfs` for root, `$XDG_RUNTIME_DIR/kvfs` for others (a private folder in /tmp without it)."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/kvfs"
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "kvfs")
    return os.path.join(tempfile.gettempdir(), f"kvfs-{uid}")


def socket_path_for(mountpoint: str) -> str:
    """The control socket of the `kvfs mount` at `mountpoint`; never touches the mount itself."""
    absolute = os.path.abspath(mountpoint)
    # resolve the parent's symlinks only: stat on the mountpoint would ask the (maybe hung) daemon
    key = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
    return os.path.join(runtime_dir(), hashlib.sha256(os.fsencode(key)).hexdigest()[:24] + ".sock")


def listen_for_mount(mountpoint: str) -> tuple[socket.socket, str]:
    """The listening control socket of a `kvfs mount` and its path, after removing the stale
    sockets of killed mounts; OSError or AddressInUse if impossible.

    The folder is locked (flock) while sockets are swept and this one is bound and made to listen:
    a sweep never sees a socket that is bound but not listening yet."""
    path = socket_path_for(mountpoint)
    folder = os.path.dirname(path)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise PermissionError(f"{folder} must belong to uid {os.geteuid()} and be private (mode 0700)")
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed = sweep_stale_sockets(folder, keep=os.path.basename(path))
        if removed:
            log.info("removed %d control socket(s) of killed kvfs mounts from %s", len(removed), folder)
        return jsonline.listen(path, backlog=16), path
    finally:
        os.close(fd)  # and the lock with it


_SOCKET_NAME = re.compile(r"[0-9a-f]{24}\.sock")  # socket_path_for's names


def sweep_stale_sockets(folder: str, *, keep: str = "") -> list[str]:
    """Remove the sockets in `folder` (socket_path_for's names, this user's, not `keep`) that refuse
    connections: no process listens there any more, so the mount they served is gone or dead. A
    symlink, another file type or a socket that accepts, times out or is replaced meanwhile stays.
    The names removed. The caller holds the folder's lock (listen_for_mount)."""
    removed = []
    for name in sorted(os.listdir(folder)):
        if name == keep or not _SOCKET_NAME.fullmatch(name):
            continue
        path = os.path.join(folder, name)
        try:
            before = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(before.st_mode) or before.st_uid != os.geteuid() or not _refuses(path):
            continue  # not ours, or someone may still listen
        try:
            after = os.lstat(path)
            if (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino):
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            pass
    return removed


def _refuses(path: str) -> bool:
    """True when nobody listens on the socket at `path` any more; False when in doubt."""
    try:
        return jsonline.nobody_listens(path)
    except OSError:
        return False
