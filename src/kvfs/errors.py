"""Error types shared by every layer.

Every error kvfs raises on purpose is a `KvfsError`: it carries a message that is safe to log
(never a secret value or a token) and the errno a file read should fail with. The FUSE adapter
turns these into `FUSEError(errno)`; anything else becomes EIO plus a log line.
"""

from __future__ import annotations

import errno as _errno
import ssl


class KvfsError(Exception):
    """Base class. `str(err)` must never contain a secret value or a token."""

    errno: int = _errno.EIO
    # Whether the failure is answered from memory for the error cooldown (docs/SEMANTICS.md #11).
    # Not when it cost no request: a host known to be down fails at once anyway, and the next read
    # may be the probe that finds it back (kvfs.net.circuit).
    cooldown: bool = True


class ConfigError(KvfsError, ValueError):
    """Bad user input (manifest, parameters, flags): names the field, the value and the fix."""

    errno = _errno.EINVAL

    def __init__(
        self, field: str, value: object, problem: str, fix: str = "", *, message: str = ""
    ) -> None:
        self.field = field
        self.value = value
        self.problem = problem
        self.fix = fix
        # `message` replaces the composed text, so upstream's exact wording can stay a prefix.
        if message:
            msg = message
        else:
            shown = "" if value is None else f" {value!r}"
            msg = f"{field}{shown}: {problem}"
        if fix:
            msg += f" ({fix})"
        super().__init__(msg)


class AuthError(KvfsError):
    """Getting a Key Vault token failed.

    `code` is the service's error code (e.g. ``AADSTS70021``, ``imds_404``) for logs and metrics;
    `errno` is EACCES when the identity is refused, EIO when the service is unreachable.
    """

    def __init__(self, message: str, *, code: str = "", errno: int = _errno.EACCES) -> None:
        super().__init__(message)
        self.code = code
        self.errno = errno


class VaultError(KvfsError):
    """A Key Vault request failed.

    `status` is the HTTP status (0 when the service could not be reached), `code` and
    `inner_code` come from Key Vault's error envelope.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 0,
        code: str = "",
        inner_code: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.inner_code = inner_code
        self.retry_after = retry_after
        if status == 404:
            self.errno = _errno.ENOENT
        elif status in (401, 403):
            self.errno = _errno.EACCES
        else:
            self.errno = _errno.EIO


class RenderError(KvfsError):
    """A fetched object cannot be turned into file bytes (bad PFX, unsupported key type, ...)."""

    errno = _errno.EIO


def error_code(exc: BaseException) -> str:
    """The most specific code of a failure, for one-line logs and counters."""
    if isinstance(exc, VaultError):
        return exc.inner_code or exc.code or (f"HTTP{exc.status}" if exc.status else "VaultError")
    code = getattr(exc, "code", "")
    return str(code) if code else type(exc).__name__


def is_tls_verification_error(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a certificate verification failure."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False
