"""The zygote: the process every volume daemon is forked from, and which never sees a request.

The mounter starts it by exec (`python -P -m kvfs.csi.zygote --fd N ...`), so it inherits nothing
from the mounter's memory: no earlier volume's parameters, client secret or token. It imports
what a daemon needs, parses the system CAs (kvfs.net.http.share_system_trust), runs the entry's
warm-up (kvfs.daemon.warmup), freezes those objects for the garbage collector (their pages stay
shared with every fork), and then serves fork commands on the socket the mounter passed:

    mounter → zygote  {"op": "fork", "volume_id": ID, "uid": N, "gid": N, "entry": "MOD:FUNC"}
                      + fds (SCM_RIGHTS): fuse connection, control socket, ready pipe, config socket
    zygote → mounter  {"ok": true, "pid": PID}  or  {"ok": false, "error": TEXT[, "code": GRPC_CODE]}

A fork that fails, or a command whose fds the kernel dropped (the zygote is out of file
descriptors), is refused with RESOURCE_EXHAUSTED; the zygote serves on.

Nothing in a fork command is secret. The child reads its volume's configuration (parameters,
secrets, environment, cloud env folder, node-identity flag) from the config socket, which the
mounter writes only after the fork; it prepares as root, drops to the volume's own uid and gid,
and runs the entry. The zygote reaps its children; when it dies the mounter starts a new one.
"""

from __future__ import annotations

import argparse
import errno
import gc
import logging
import os
import select
import signal
import socket
import sys
from collections.abc import Iterator
from typing import Any

import setproctitle

from kvfs.config.model import RenderDefaults
from kvfs.config.parameters import SA_TOKENS_KEY, token_for_audience
from kvfs.csi import syscalls
from kvfs.csi.request import pod_of
from kvfs.daemon import jsonline
from kvfs.daemon.entry import (
    DaemonEntry, DaemonSpec, apply_environment, before_fork, load_entry, preload, report_error,
)  # fmt: skip
from kvfs.logsafe import LOG_FORMATS, LOG_LEVELS, redact, register_secret, set_log_context, setup_logging

log = logging.getLogger("kvfs.csi.zygote")  # not __main__: it runs as `python -m`

FORK_FDS = 4  # fuse, control, ready, config
CONFIG_TIMEOUT = 30.0


class Zygote:
    def __init__(self, sock: socket.socket, entry: DaemonEntry) -> None:
        self.sock = sock
        self.entry = entry
        self.reader = jsonline.LineReader(sock)

    def serve(self) -> int:
        jsonline.send(self.sock, {"ok": True, "event": "ready", "pid": os.getpid()})
        while True:
            self._reap()
            if not select.select([self.sock], [], [], 1.0)[0]:
                continue
            try:
                try:
                    message = self.reader.read(10.0)
                except jsonline.FdsDropped as exc:
                    reply = self._refuse_dropped(exc)
                else:
                    reply = self._fork(message, self.reader.fds)
                finally:
                    self.reader.close_fds()  # the child has its own copies: keep none here
            except jsonline.ProtocolError as exc:
                # the mounter is gone (or broken): its daemons keep serving without us
                log.info("zygote stopping: %s", exc)
                return 0
            try:
                jsonline.send(self.sock, reply)
            except OSError as exc:
                log.info("zygote stopping: the mounter went away (%s)", exc)
                return 0

    def _refuse_dropped(self, exc: jsonline.FdsDropped) -> dict[str, Any]:
        """Out of file descriptors, the kernel dropped a fork command's fds: that volume fails
        (RESOURCE_EXHAUSTED), and the command, read to its end, is not run; the zygote serves on.
        The caller closes whatever fds did arrive."""
        self.reader.read(10.0)
        code, text = syscalls.failure("receiving the daemon's file descriptors", exc.cause, "mounter's zygote")
        log.error("%s", text)
        return {"ok": False, "error": text, "code": code}

    def _fork(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        try:
            if message.get("op") != "fork":
                raise ValueError(f"unknown op {message.get('op')!r}")
            volume_id = str(message["volume_id"])
            uid, gid = int(message["uid"]), int(message["gid"])
            if message.get("entry") != self.entry.name:
                raise ValueError(f"this zygote runs {self.entry.name}, not {message.get('entry')!r}")
        except (KeyError, TypeError, ValueError) as exc:
            return {"ok": False, "error": f"bad fork command: {exc}"}
        if len(fds) != FORK_FDS:
            return {"ok": False, "error": f"fork needs {FORK_FDS} fds (fuse, control, ready, config), got {len(fds)}"}
        before_fork()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: this volume fails, the zygote serves on
            code, text = syscalls.failure("forking the daemon", exc, "mounter's zygote")
            log.error("volume %s: %s", volume_id, text)
            return {"ok": False, "error": text, "code": code}
        if pid == 0:  # pragma: no cover - runs in the child
            _child(self.entry, volume_id, uid, gid, *fds)
        log.debug("volume %s: forked daemon pid %d", volume_id, pid)
        return {"ok": True, "pid": pid}

    @staticmethod
    def _reap() -> None:
        for pid, code in reaped():
            log.log(logging.INFO if code == 0 else logging.WARNING, "daemon pid %d exited (%d)", pid, code)


def reaped() -> Iterator[tuple[int, int]]:
    """(pid, exit code) of every child that has exited, without waiting."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(status)


def _child(  # pragma: no cover - runs in the forked child
    entry: DaemonEntry, volume_id: str, uid: int, gid: int, fuse_fd: int, control_fd: int, ready_fd: int, config_fd: int
) -> None:
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        _close_all_but({0, 1, 2, fuse_fd, control_fd, ready_fd, config_fd})
        setproctitle.setproctitle(f"kvfs daemon volume={volume_id}")
        set_log_context(volume=volume_id)  # these two go on every JSON line this daemon logs
        spec = _read_spec(volume_id, fuse_fd, control_fd, ready_fd, config_fd)
        set_log_context(pod=pod_of(spec.params))
        apply_environment(spec.env)
        if entry.prepare is not None:
            entry.prepare(spec)  # read root-only files (CA bundle, cloud env file) before the drop
        _prefer_as_oom_victim()
        drop_privileges(uid, gid)
        code = entry.run(spec)
    except BaseException as exc:  # noqa: BLE001 - report anything, then exit
        report_error(ready_fd, redact(f"daemon start-up failed: {type(exc).__name__}: {exc}"))
        log.exception("volume %s: daemon failed", volume_id)
    finally:
        logging.shutdown()
        os._exit(code if isinstance(code, int) else 1)


def _read_spec(volume_id: str, fuse_fd: int, control_fd: int, ready_fd: int, config_fd: int) -> DaemonSpec:
    """The volume's configuration, written by the mounter after the fork; its secrets registered."""
    with socket.socket(fileno=config_fd) as sock:
        config = jsonline.LineReader(sock).read(CONFIG_TIMEOUT)
    params = {str(k): str(v) for k, v in dict(config["params"]).items()}
    secrets = {str(k): str(v) for k, v in dict(config.get("secrets") or {}).items()}
    env = None if config.get("env") is None else {str(k): str(v) for k, v in dict(config["env"]).items()}
    for key, value in secrets.items():
        if key.lower() != "clientid":  # an id, shown in error messages; the rest may be secret
            register_secret(value)
    register_secret(token_for_audience(params.get(SA_TOKENS_KEY, "")))
    return DaemonSpec(
        volume_id=volume_id,
        params=params,
        secrets=secrets,
        allow_node_identity=bool(config.get("allow_node_identity", False)),
        fuse_fd=fuse_fd,
        control_fd=control_fd,
        ready_fd=ready_fd,
        env=env,
        cloud_env_dir=str(config.get("cloud_env_dir") or ""),
        defaults=RenderDefaults.from_json(config.get("defaults")),
    )


def _prefer_as_oom_victim() -> None:  # pragma: no cover - runs in the forked child
    """Raise our OOM score (always allowed, but only before the drop: /proc/self is root's then)."""
    try:
        syscalls.set_oom_score_adj(syscalls.DAEMON_OOM_SCORE_ADJ)
    except OSError as exc:
        log.warning("cannot raise the daemon's oom_score_adj: %s", exc)


def drop_privileges(uid: int, gid: int) -> None:
    """No supplementary groups, the volume's own uid/gid, no way back, no ptrace by other daemons."""
    if os.getuid() == 0:
        if uid <= 0 or gid <= 0:
            raise PermissionError(errno.EPERM, f"refusing to run a daemon as {uid}:{gid} (root)")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    elif (uid, gid) != (os.getuid(), os.getgid()):
        raise PermissionError(errno.EPERM, f"a non-root mounter cannot run daemons as {uid}:{gid}")
    syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
    syscalls.set_dumpable(False)


def _close_all_but(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            jsonline.close_quietly(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvfs.csi.zygote")
    parser.add_argument("--fd", type=int, required=True, help="the socket inherited from the mounter")
    parser.add_argument("--daemon-entry", required=True)
    parser.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, default="INFO")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text")  # forks inherit both
    args = parser.parse_args(argv)
    setup_logging(args.log_level, pid=True, fmt=args.log_format)
    syscalls.set_dumpable(False)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the mounter decides when we stop (it closes our socket)
    setproctitle.setproctitle("kvfs zygote")
    sock = socket.socket(fileno=args.fd)
    try:
        preload()
        entry = load_entry(args.daemon_entry)
    except (ImportError, AttributeError, ValueError) as exc:
        message = f"--daemon-entry {args.daemon_entry}: {exc}"
        print(f"kvfs zygote: {message}", file=sys.stderr)
        jsonline.send(sock, {"ok": False, "event": "ready", "error": message})
        return 2
    if entry.warm_up is not None:
        entry.warm_up()  # code and state a daemon would build on first use, built once to be shared
    gc.freeze()  # objects imported so far are never written by the collector: shared with every fork
    return Zygote(sock, entry).serve()


if __name__ == "__main__":
    raise SystemExit(main())
