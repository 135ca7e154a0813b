"""Logging set-up with a last line of defence against leaking credentials.

kvfs never logs a token or a secret value on purpose; this filter additionally masks anything
shaped like a JWT or a bearer credential in every record, in case a library does, and every
value a process registered as secret (a daemon registers its own client secret and token).
Every kvfs process (CLI, CSI plugin, mounter, zygote, daemons) logs through `setup_logging`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from typing import TextIO

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_JWT = JWT_PATTERN = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.?[A-Za-z0-9_-]*")  # public: auth redacts with it
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_FORM_SECRET = re.compile(r"(?i)((?:client_secret|client_assertion|access_token)=)[^&\s\"']+")

# Shorter values would mask ordinary words; every real secret or token is longer.
MIN_SECRET_LENGTH = 8
_secrets: set[str] = set()
_secrets_lock = threading.Lock()


def register_secret(value: str) -> None:
    """Mask `value` in every later log record of this process (belt and braces)."""
    value = value.strip()
    if len(value) >= MIN_SECRET_LENGTH:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    with _secrets_lock:
        known = sorted(_secrets, key=len, reverse=True)
    for value in known:
        text = text.replace(value, "<redacted>")
    text = _JWT.sub("<redacted-jwt>", text)
    text = _BEARER.sub(r"\1<redacted>", text)
    return _FORM_SECRET.sub(r"\1<redacted>", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message with `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup_logging(level: str = "INFO", *, stream: TextIO | None = None, pid: bool = False) -> None:
    """Log to stderr (or `stream`) with the redaction filter on the handler.

    `pid` adds the process id to each line: the CSI mounter, its zygote and every daemon share
    one log.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    fmt = "%(asctime)s " + ("%(process)d " if pid else "") + "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack", "azure", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kvfs logs one actionable line per credential failure; azure-identity's own multi-line
    # warning about the same failure would only repeat it.
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
