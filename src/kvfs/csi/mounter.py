"""The mounter: a long-lived process with kvfs imported that forks one daemon per volume.

Single-threaded on purpose (a selector loop): forking a threaded process can leave a child with
locks held by threads that no longer exist. The plugin connects to the mounter socket and sends
one `spawn` request with two fds (the mounted FUSE connection and the daemon's listening control
socket). The mounter forks, answers `{"event": "forked", "pid": N}` at once, then `{"ok": true}`
when the daemon reported FUSE_INIT, or `{"ok": false, "error": ...}` (the daemon is killed then).
Daemons get their own session, so they outlive both the plugin and the mounter.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from kvfs.csi import jsonline
from kvfs.csi.daemon import (
    DaemonEntry,
    DaemonSpec,
    apply_environment,
    daemon_environment,
    prepare,
    report_error,
)

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38


@dataclass
class _Pending:
    """A forked daemon whose ready line has not arrived yet."""

    pid: int
    volume_id: str
    conn: socket.socket
    ready_r: int
    deadline: float
    buf: bytes = b""


@dataclass
class _Client:
    conn: socket.socket
    reader: jsonline.LineReader
    accepted: float = field(default_factory=time.monotonic)


class Mounter:
    """Serve spawn requests on `socket_path` until SIGTERM/SIGINT (daemons keep running)."""

    REQUEST_TIMEOUT = 5.0

    def __init__(self, socket_path: str, entry: DaemonEntry, *, entry_name: str = "") -> None:
        self.socket_path = socket_path
        self.entry = entry
        self.entry_name = entry_name
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, _Pending] = {}  # ready_r fd -> pending
        self.clients: dict[int, _Client] = {}  # conn fd -> client still sending its request
        self.stopping = False
        self.listener: socket.socket | None = None

    def serve(self) -> int:
        self.listener = self._listen()
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("mounter listening on %s (daemon entry %s)", self.socket_path, self.entry_name)
        while not self.stopping:
            for key, _ in self.sel.select(self._next_timeout()):
                if key.data == "accept":
                    self._accept()
                elif key.data == "client":
                    self._read_request(key.fd)
                elif key.data == "ready":
                    self._read_ready(key.fd)
            self._expire()
            self._reap()
        self._shutdown()
        return 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.stopping = True

    def _listen(self) -> socket.socket:
        os.makedirs(os.path.dirname(self.socket_path) or ".", mode=0o700, exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
            raise SystemExit(f"another mounter already listens on {self.socket_path}")
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        finally:
            probe.close()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o077)
        try:
            sock.bind(self.socket_path)
        finally:
            os.umask(old)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def _next_timeout(self) -> float:
        # wake at least once a second to reap exited daemons
        now = time.monotonic()
        deadlines = [p.deadline for p in self.pending.values()]
        deadlines += [c.accepted + self.REQUEST_TIMEOUT for c in self.clients.values()]
        return max(0.0, min([now + 1.0, *deadlines]) - now)

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid not in (0, os.getuid()):
            log.warning("refusing mounter connection from uid %d", uid)
            conn.close()
            return
        conn.setblocking(False)
        self.clients[conn.fileno()] = _Client(conn, jsonline.LineReader(conn))
        self.sel.register(conn, selectors.EVENT_READ, "client")

    def _read_request(self, fd: int) -> None:
        client = self.clients[fd]
        try:
            message = client.reader.try_read()
        except jsonline.ProtocolError as exc:
            self._drop_client(fd, reply={"ok": False, "error": f"bad request: {exc}"})
            return
        if message is None:
            return  # partial line: wait for more
        self.sel.unregister(client.conn)
        del self.clients[fd]
        client.conn.setblocking(True)
        self._handle(client.conn, message, client.reader)

    def _drop_client(self, fd: int, reply: dict[str, Any] | None = None) -> None:
        client = self.clients.pop(fd)
        self.sel.unregister(client.conn)
        client.reader.close_fds()
        if reply is not None:
            _reply(client.conn, reply)
        client.conn.close()

    def _handle(self, conn: socket.socket, message: dict[str, Any], reader: jsonline.LineReader) -> None:
        op = message.get("op")
        if op == "ping":
            reader.close_fds()
            _reply(conn, {"ok": True, "pid": os.getpid(), "entry": self.entry_name})
            conn.close()
        elif op == "spawn":
            fds, reader.fds = reader.fds, []
            try:
                self._spawn(conn, message, fds)
            finally:
                for fd in fds:  # the child has its own copies now: keep none here
                    _close(fd)
        else:
            reader.close_fds()
            _reply(conn, {"ok": False, "error": f"unknown op {op!r}"})
            conn.close()

    def _spawn(self, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
        volume_id = str(req.get("volume_id", ""))
        try:
            uid, gid = int(req["uid"]), int(req["gid"])
            timeout = float(req.get("timeout", 30.0))
            params = {str(k): str(v) for k, v in dict(req["params"]).items()}
            secrets = {str(k): str(v) for k, v in dict(req.get("secrets") or {}).items()}
            env = None if req.get("env") is None else {str(k): str(v) for k, v in dict(req["env"]).items()}
        except (KeyError, TypeError, ValueError) as exc:
            _reply(conn, {"ok": False, "error": f"bad spawn request: {type(exc).__name__} {exc}"})
            conn.close()
            return
        if len(fds) != 2:
            _reply(conn, {"ok": False, "error": f"spawn needs 2 fds (fuse, control), got {len(fds)}"})
            conn.close()
            return
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        spec = DaemonSpec(
            volume_id=volume_id,
            params=params,
            secrets=secrets,
            allow_node_identity=bool(req.get("allow_node_identity", False)),
            fuse_fd=fds[0],
            control_fd=fds[1],
            ready_fd=ready_w,
            env=env,
        )
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            os.close(ready_r)
            self._child(spec, uid, gid)
        os.close(ready_w)
        log.info("volume %s: forked daemon pid %d", volume_id, pid)
        _reply(conn, {"event": "forked", "pid": pid})
        os.set_blocking(ready_r, False)
        self.pending[ready_r] = _Pending(pid, volume_id, conn, ready_r, time.monotonic() + timeout)
        self.sel.register(ready_r, selectors.EVENT_READ, "ready")

    def _child(self, spec: DaemonSpec, uid: int, gid: int) -> None:  # pragma: no cover - child
        code = 1
        try:
            os.setsid()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            _close_all_but({0, 1, 2, spec.fuse_fd, spec.control_fd, spec.ready_fd})
            _set_title(f"kvfs daemon volume={spec.volume_id}")
            apply_environment(spec.env)
            prepare(spec)  # read root-only files (CA bundle, cloud env file) before the drop
            _drop_privileges(uid, gid)
            code = self.entry(spec)
        except BaseException as exc:  # noqa: BLE001 - report anything, then exit
            report_error(spec.ready_fd, f"daemon start-up failed: {type(exc).__name__}: {exc}")
            logging.getLogger(__name__).exception("volume %s: daemon failed", spec.volume_id)
        finally:
            logging.shutdown()
            os._exit(code if isinstance(code, int) else 1)

    def _read_ready(self, fd: int) -> None:
        pending = self.pending[fd]
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        pending.buf += chunk
        if b"\n" in pending.buf:
            line = pending.buf.split(b"\n", 1)[0].decode(errors="replace").strip()
            if line == "ready":
                self._finish(pending, {"ok": True, "pid": pending.pid})
            else:
                msg = line[6:] if line.startswith("error ") else f"unexpected ready line {line[:200]!r}"
                self._fail(pending, msg)
        elif not chunk or len(pending.buf) > 8192:
            self._fail(pending, "daemon exited before it was ready (see its log)")

    def _expire(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self.pending.values() if p.deadline <= now]:
            self._fail(pending, "daemon did not report ready in time (FUSE_INIT not received)", timed_out=True)
        for fd in [fd for fd, c in self.clients.items() if c.accepted + self.REQUEST_TIMEOUT <= now]:
            self._drop_client(fd)

    def _fail(self, pending: _Pending, message: str, *, timed_out: bool = False) -> None:
        log.warning("volume %s: daemon pid %d failed to start: %s", pending.volume_id, pending.pid, message)
        try:
            os.kill(pending.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._finish(pending, {"ok": False, "error": message, "pid": pending.pid, "timeout": timed_out})

    def _finish(self, pending: _Pending, reply: dict[str, Any]) -> None:
        self.sel.unregister(pending.ready_r)
        os.close(pending.ready_r)
        del self.pending[pending.ready_r]
        _reply(pending.conn, reply)
        pending.conn.close()

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            log.log(logging.INFO if code == 0 else logging.WARNING, "daemon pid %d exited (%d)", pid, code)

    def _shutdown(self) -> None:
        log.info("mounter stopping; %d daemon(s) keep serving", len(self.pending))
        for pending in list(self.pending.values()):
            self._fail(pending, "mounter is stopping")
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        jsonline.send(conn, message)
    except OSError as exc:
        log.debug("client went away before the answer: %s", exc)


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            _close(fd)


def _set_title(title: str) -> None:
    try:
        import setproctitle

        setproctitle.setproctitle(title)
    except ImportError:
        log.warning("setproctitle is not installed: daemon processes keep the mounter's title")


def _drop_privileges(uid: int, gid: int) -> None:
    """No supplementary groups, the daemon uid/gid, no way back, no ptrace by other daemons."""
    libc = ctypes.CDLL(None, use_errno=True)
    if os.getuid() == 0:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    elif (uid, gid) != (os.getuid(), os.getgid()):
        raise PermissionError(errno.EPERM, f"a non-root mounter cannot run daemons as {uid}:{gid}")
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)


class MounterClient:
    """The plugin's side of the mounter socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def ping(self, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            reply = jsonline.request(self.socket_path, {"op": "ping"}, timeout)
        except jsonline.ProtocolError:
            return None
        return reply if reply.get("ok") else None

    def spawn(
        self,
        *,
        volume_id: str,
        params: dict[str, str],
        secrets: dict[str, str],
        uid: int,
        gid: int,
        allow_node_identity: bool,
        fuse_fd: int,
        control_fd: int,
        timeout: float,
        on_forked: Any = None,
    ) -> int:
        """Hand both fds over (and close them here), wait for ready; the daemon pid.

        Raises jsonline.ProtocolError on transport failures and SpawnError when the daemon
        did not start (it is dead then).
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(5.0)
            try:
                sock.connect(self.socket_path)
                request = {
                    "op": "spawn",
                    "volume_id": volume_id,
                    "params": params,
                    "secrets": secrets,
                    "uid": uid,
                    "gid": gid,
                    "allow_node_identity": allow_node_identity,
                    "timeout": timeout,
                    "env": daemon_environment(),
                }
                jsonline.send(sock, request, [fuse_fd, control_fd])
            except OSError as exc:
                raise jsonline.ProtocolError(f"cannot reach the mounter at {self.socket_path}: {exc}") from None
            finally:
                # the fds are in flight (or the send failed): this process keeps no copy either way
                _close(fuse_fd)
                _close(control_fd)
            reader = jsonline.LineReader(sock)
            forked = reader.read(10.0)
            pid = int(forked.get("pid", 0))
            if forked.get("event") != "forked" or pid <= 0:
                raise SpawnError(str(forked.get("error") or f"unexpected mounter answer {forked!r}"), 0)
            if on_forked is not None:
                on_forked(pid)
            done = reader.read(timeout + 10.0)
            reader.close_fds()
            if not done.get("ok"):
                error = str(done.get("error") or "daemon failed to start")
                raise SpawnError(error, pid, timed_out=bool(done.get("timeout")))
            return pid
        finally:
            sock.close()


class SpawnError(Exception):
    """The daemon did not come up; `pid` (0 if never forked) is already killed by the mounter."""

    def __init__(self, message: str, pid: int, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.pid = pid
        self.timed_out = timed_out
