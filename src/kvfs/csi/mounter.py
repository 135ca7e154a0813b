"""The mounter: a long-lived, single-threaded process that starts one daemon per volume.

With `--state-dir` it registers itself as one mounter generation among any number
(kvfs.csi.mounters); `--socket PATH` runs one at that address instead, unregistered.
The plugin connects to the mounter socket and sends one `spawn` request with two fds (the
mounted FUSE connection and the daemon's listening control socket) and the volume's
configuration. The mounter never forks a daemon from itself (its memory holds earlier volumes'
secrets): it asks its zygote (kvfs.csi.zygote, started by exec, so clean) to fork one, writes
the configuration to the new daemon over a socket of its own, answers
`{"event": "forked", "pid": N}` at once, then `{"ok": true}` when the daemon reported
FUSE_INIT, or `{"ok": false, "error": ...}` (the daemon is killed then). Daemons get their own
session, so they outlive both the plugin and the mounter; the mounter is a child subreaper, so
daemons whose zygote died are still reaped. A zygote that dies is replaced by a new one for the
next volume. Single-threaded on purpose (a selector loop): nothing here forks a threaded process.

A mounter that does not fall over: a pipe, socketpair, fork or accept that fails because the
mounter or the node ran out of processes, file descriptors or memory fails that one request,
answered `{"ok": false, "code": "RESOURCE_EXHAUSTED", "error": ...}` (what failed, the errno, the
limit to raise), and the mounter keeps serving. It lowers its own OOM score; daemons raise theirs.
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import kvfs
from kvfs.config.model import RenderDefaults
from kvfs.csi import syscalls
from kvfs.csi.mounters import MounterInfo, MounterRegistry
from kvfs.csi.state import process_start_time
from kvfs.daemon import jsonline
from kvfs.daemon.entry import daemon_environment
from kvfs.csi.zygote import FORK_FDS, reaped

log = logging.getLogger(__name__)

SPAWN_CODES = ("RESOURCE_EXHAUSTED", "INTERNAL")  # the gRPC codes a mounter may give a refused spawn


class ZygoteError(Exception):
    """The zygote could not be started or did not answer a fork command; `code` is the gRPC code."""

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        super().__init__(message)
        self.code = code


class ForkRefused(ZygoteError):
    """The zygote answered, but could not fork this daemon (it stays usable)."""


def _failed(what: str, exc: OSError) -> ZygoteError:
    code, message = syscalls.failure(what, exc, "mounter")
    return ZygoteError(message, code)


@dataclass
class _Zygote:
    pid: int
    sock: socket.socket
    reader: jsonline.LineReader

    @classmethod
    def start(cls, entry_name: str, log_level: str, log_format: str, timeout: float) -> _Zygote:
        """exec a fresh interpreter (-P: not even the working folder on sys.path); wait for its hello."""
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            raise _failed("socketpair for a new zygote", exc) from None
        try:
            theirs.set_inheritable(True)
            argv = [
                sys.executable, "-P", "-m", "kvfs.csi.zygote", "--fd", str(theirs.fileno()),
                "--daemon-entry", entry_name, "--log-level", log_level, "--log-format", log_format,
            ]  # fmt: skip
            stdin = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
            pid = os.posix_spawn(sys.executable, argv, os.environ, file_actions=stdin)
        except OSError as exc:
            ours.close()
            raise _failed("starting a zygote", exc) from None
        finally:
            theirs.close()
        zygote = cls(pid, ours, jsonline.LineReader(ours))
        try:
            hello = zygote.reader.read(timeout)
        except jsonline.ProtocolError as exc:
            zygote.stop(kill=True)
            raise ZygoteError(f"the zygote did not start: {exc}") from None
        if not hello.get("ok"):
            zygote.stop(kill=False)
            raise ZygoteError(str(hello.get("error") or "the zygote did not start"))
        log.info("zygote pid %d ready (daemon entry %s)", pid, entry_name)
        return zygote

    def fork(self, command: dict[str, Any], fds: list[int]) -> int:
        """Send one fork command with its fds; the daemon's pid. ZygoteError: the zygote is unusable."""
        try:
            jsonline.send(self.sock, command, fds)
            reply = self.reader.read(10.0)
        except (OSError, jsonline.ProtocolError) as exc:
            raise ZygoteError(f"the zygote (pid {self.pid}) did not answer: {exc}") from None
        pid = int(reply.get("pid") or 0)
        if not reply.get("ok") and reply.get("error"):
            code = reply.get("code")
            raise ForkRefused(str(reply["error"]), code if code in SPAWN_CODES else "INTERNAL")
        if not reply.get("ok") or pid <= 0:
            raise ZygoteError(f"unexpected zygote answer {reply!r}")
        return pid

    def stop(self, *, kill: bool) -> None:
        """Close our end (the zygote exits on EOF); the reaper collects it."""
        self.sock.close()
        if kill:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
    """Serve spawn requests on `socket_path` until SIGTERM/SIGINT (daemons keep running).

    With a `registry`, announce this mounter there (as `mounter_id`) once it listens.
    """

    REQUEST_TIMEOUT = 5.0
    ZYGOTE_TIMEOUT = 120.0  # imports on a loaded node
    CONFIG_TIMEOUT = 10.0
    PAUSE = 0.1  # out of file descriptors with no reserve left: wait this long before accepting again

    def __init__(
        self,
        socket_path: str,
        entry_name: str,
        *,
        log_level: str = "INFO",
        log_format: str = "text",
        mounter_id: str = "",
        registry: MounterRegistry | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.entry_name = entry_name
        self.log_level = log_level
        self.log_format = log_format
        self.id = mounter_id
        self.registry = registry
        self.started = time.time()
        self.reserve = _reserve_fd()  # given up to answer one client when out of file descriptors
        self.sel = selectors.DefaultSelector()
        self.pending: dict[int, _Pending] = {}  # ready_r fd -> pending
        self.clients: dict[int, _Client] = {}  # conn fd -> client still sending its request
        self.stopping = False
        self.listener: socket.socket | None = None
        self.zygote: _Zygote | None = None

    def serve(self) -> int:
        syscalls.set_dumpable(False)
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        _protect_from_oom()
        try:
            self.zygote = _Zygote.start(self.entry_name, self.log_level, self.log_format, self.ZYGOTE_TIMEOUT)
        except ZygoteError as exc:
            log.error("%s", exc)
            return 2
        self.listener = self._listen()
        self.sel.register(self.listener, selectors.EVENT_READ, "accept")
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        if self.registry is not None:
            pid = os.getpid()
            info = MounterInfo(
                self.id, pid, process_start_time(pid) or 0, kvfs.__version__, self.started, self.entry_name
            )
            self.registry.register(info)
        log.info("mounter %s listening on %s (daemon entry %s)", self.id, self.socket_path, self.entry_name)
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
        try:
            sock = jsonline.listen(self.socket_path, backlog=64)
        except jsonline.AddressInUse:
            raise SystemExit(f"another mounter already listens on {self.socket_path}") from None
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
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                log.warning("accept failed: %s", exc)
                return
            self._shed(exc)
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

    def _shed(self, exc: OSError) -> None:
        """Out of file descriptors: the reserve one takes the next client, which is told so and closed
        (after its request, so that it is not refused a write first; fds riding along are dropped).
        Without a reserve (the whole node is out of them), wait a moment: the selector would spin."""
        assert self.listener is not None
        code, message = syscalls.failure("accepting a connection", exc, "mounter")
        log.error("%s", message)
        if self.reserve < 0:
            time.sleep(self.PAUSE)
            self.reserve = _reserve_fd()
            return
        os.close(self.reserve)
        try:
            conn, _ = self.listener.accept()
        except OSError:
            pass
        else:
            conn.setblocking(True)
            conn.settimeout(1.0)
            try:
                conn.recv(65536)
            except OSError:
                pass
            _reply(conn, {"ok": False, "code": code, "error": message})
            conn.close()
        self.reserve = _reserve_fd()

    def _read_request(self, fd: int) -> None:
        client = self.clients[fd]
        try:
            message = client.reader.try_read()
        except jsonline.FdsDropped as exc:
            code, text = syscalls.failure("receiving the volume's file descriptors", exc.cause, "mounter")
            self._drop_client(fd, reply={"ok": False, "code": code, "error": text})
            return
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
            zygote = self.zygote.pid if self.zygote else 0
            reply = {"ok": True, "pid": os.getpid(), "entry": self.entry_name, "zygote": zygote, "id": self.id}
            _reply(conn, {**reply, "version": kvfs.__version__, "started": self.started})
            conn.close()
        elif op == "spawn":
            fds, reader.fds = reader.fds, []
            try:
                self._spawn(conn, message, fds)
            finally:
                for fd in fds:  # the daemon has its own copies now: keep none here
                    jsonline.close_quietly(fd)
        else:
            reader.close_fds()
            _reply(conn, {"ok": False, "error": f"unknown op {op!r}"})
            conn.close()

    def _spawn(self, conn: socket.socket, req: dict[str, Any], fds: list[int]) -> None:
        volume_id = str(req.get("volume_id", ""))
        try:
            uid, gid = int(req["uid"]), int(req["gid"])
            timeout = float(req.get("timeout", 30.0))
            config = {
                "params": {str(k): str(v) for k, v in dict(req["params"]).items()},
                "secrets": {str(k): str(v) for k, v in dict(req.get("secrets") or {}).items()},
                "env": None if req.get("env") is None else {str(k): str(v) for k, v in dict(req["env"]).items()},
                "cloud_env_dir": str(req.get("cloud_env_dir") or ""),
                "allow_node_identity": bool(req.get("allow_node_identity", False)),
                "defaults": RenderDefaults.from_json(req.get("defaults")).to_json(),
            }
        except (KeyError, TypeError, ValueError) as exc:
            _reply(conn, {"ok": False, "error": f"bad spawn request: {type(exc).__name__} {exc}"})
            conn.close()
            return
        if len(fds) != 2:
            _reply(conn, {"ok": False, "error": f"spawn needs 2 fds (fuse, control), got {len(fds)}"})
            conn.close()
            return
        try:
            ready_r, ready_w, config_ours, config_theirs = _daemon_channels()
        except OSError as exc:
            code, message = syscalls.failure("creating the daemon's ready pipe and config socket", exc, "mounter")
            log.error("volume %s: %s", volume_id, message)
            _reply(conn, {"ok": False, "error": message, "code": code})
            conn.close()
            return
        command = {"op": "fork", "volume_id": volume_id, "uid": uid, "gid": gid, "entry": self.entry_name}
        try:
            pid = self._fork(command, [fds[0], fds[1], ready_w, config_theirs.fileno()])
        except ZygoteError as exc:
            log.error("volume %s: %s", volume_id, exc)
            os.close(ready_r)
            config_ours.close()
            _reply(conn, {"ok": False, "error": str(exc), "code": exc.code})
            conn.close()
            return
        finally:
            os.close(ready_w)
            config_theirs.close()
        log.info("volume %s: daemon pid %d forked by the zygote", volume_id, pid, extra={"volume": volume_id})
        _reply(conn, {"event": "forked", "pid": pid})
        try:  # only now, in the daemon's own process, does the volume's configuration arrive
            config_ours.settimeout(self.CONFIG_TIMEOUT)
            jsonline.send(config_ours, config)
        except OSError as exc:
            log.warning("volume %s: daemon pid %d did not take its configuration: %s", volume_id, pid, exc)
        finally:
            config_ours.close()
        os.set_blocking(ready_r, False)
        self.pending[ready_r] = _Pending(pid, volume_id, conn, ready_r, time.monotonic() + timeout)
        self.sel.register(ready_r, selectors.EVENT_READ, "ready")

    def _fork(self, command: dict[str, Any], fds: list[int]) -> int:
        """Through the zygote, starting a new one if the last one died; a zygote that fails is replaced."""
        assert len(fds) == FORK_FDS
        if self.zygote is None:
            self.zygote = _Zygote.start(self.entry_name, self.log_level, self.log_format, self.ZYGOTE_TIMEOUT)
        try:
            return self.zygote.fork(command, fds)
        except ForkRefused:
            raise
        except ZygoteError:
            self.zygote.stop(kill=True)
            self.zygote = None
            raise

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
        """The zygote, or daemons orphaned by a dead zygote (we are their subreaper)."""
        for pid, code in reaped():
            if self.zygote is not None and pid == self.zygote.pid:
                log.warning("zygote pid %d exited (%d); a new one starts for the next volume", pid, code)
                self.zygote.stop(kill=False)
                self.zygote = None
            else:
                log.log(logging.INFO if code == 0 else logging.WARNING, "process %d exited (%d)", pid, code)

    def _shutdown(self) -> None:
        log.info("mounter stopping; %d daemon(s) keep serving", len(self.pending))
        for pending in list(self.pending.values()):
            self._fail(pending, "mounter is stopping")
        if self.zygote is not None:
            self.zygote.stop(kill=False)
        if self.listener is not None:
            self.listener.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass


def _protect_from_oom() -> None:
    """Lower our OOM score (CAP_SYS_RESOURCE, which the mounter DaemonSet grants); one warning without it."""
    try:
        syscalls.set_oom_score_adj(syscalls.MOUNTER_OOM_SCORE_ADJ)
    except OSError as exc:
        log.warning(
            "cannot lower the mounter's oom_score_adj to %d (%s; it needs CAP_SYS_RESOURCE): under memory"
            " pressure the OOM killer may pick the mounter before a daemon, and in a mounter pod that ends"
            " every volume the pod serves",
            syscalls.MOUNTER_OOM_SCORE_ADJ,
            exc.strerror,
        )


def _reserve_fd() -> int:
    """An fd held only to be closed when the mounter runs out of them; -1 when none is free."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _daemon_channels() -> tuple[int, int, socket.socket, socket.socket]:
    """The daemon's ready pipe (read, write) and its config socketpair (ours, theirs); none left open on failure."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError:
        os.close(ready_r)
        os.close(ready_w)
        raise
    return ready_r, ready_w, ours, theirs


def _reply(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        jsonline.send(conn, message)
    except OSError as exc:
        log.debug("client went away before the answer: %s", exc)


class MounterClient:
    """The plugin's side of the mounter socket."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path

    def hello(self, timeout: float = 2.0) -> dict[str, Any]:
        """The mounter's answer to a ping: `ok` with its pid, id, version..., or a refusal with
        `code` and `error` (out of file descriptors); jsonline.ProtocolError when none came."""
        return jsonline.request(self.socket_path, {"op": "ping"}, timeout)

    def ping(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The answer of a mounter that serves, else None."""
        try:
            reply = self.hello(timeout)
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
        cloud_env_dir: str,
        fuse_fd: int,
        control_fd: int,
        timeout: float,
        on_forked: Any = None,
        defaults: RenderDefaults = RenderDefaults(),
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
                    "cloud_env_dir": cloud_env_dir,
                    "defaults": defaults.to_json(),
                    "timeout": timeout,
                    "env": daemon_environment(),
                }
                jsonline.send(sock, request, [fuse_fd, control_fd])
            except OSError as exc:
                raise jsonline.ProtocolError(f"cannot reach the mounter at {self.socket_path}: {exc}") from None
            finally:
                # the fds are in flight (or the send failed): this process keeps no copy either way
                jsonline.close_quietly(fuse_fd)
                jsonline.close_quietly(control_fd)
            reader = jsonline.LineReader(sock)
            forked = reader.read(10.0)
            pid = int(forked.get("pid", 0))
            if forked.get("event") != "forked" or pid <= 0:
                code = str(forked.get("code") or "")
                message = str(forked.get("error") or f"unexpected mounter answer {forked!r}")
                raise SpawnError(message, 0, code=code if code in SPAWN_CODES else "")
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
    """The daemon did not come up; `pid` (0 if never forked) is already killed by the mounter.
    `code`: the gRPC code the mounter gave (RESOURCE_EXHAUSTED), or ""."""

    def __init__(self, message: str, pid: int, *, timed_out: bool = False, code: str = "") -> None:
        super().__init__(message)
        self.pid = pid
        self.timed_out = timed_out
        self.code = code
