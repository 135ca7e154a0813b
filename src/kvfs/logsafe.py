"""Logging set-up with a last line of defence against leaking credentials.

kvfs never logs a token or a secret value on purpose; this filter additionally masks anything
shaped like a JWT or a bearer credential in every record, in case a library does.
"""

from __future__ import annotations

import logging
import re
import sys

_JWT = JWT_PATTERN = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]+\.?[A-Za-z0-9_-]*")  # public: auth redacts with it
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}")
_FORM_SECRET = re.compile(r"(?i)((?:client_secret|client_assertion|access_token)=)[^&\s\"']+")


def redact(text: str) -> str:
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


def setup_logging(level: str = "INFO", *, stream=None) -> None:  # type: ignore[no-untyped-def]
    """Log to stderr (or `stream`) with the redaction filter on the handler."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack", "azure", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kvfs logs one actionable line per credential failure; azure-identity's own multi-line
    # warning about the same failure would only repeat it.
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
