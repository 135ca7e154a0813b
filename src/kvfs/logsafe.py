"""Logging set-up with a last line of defence against leaking credentials.

kvfs never logs a token or a secret value on purpose; this filter additionally masks anything
shaped like a JWT or a bearer credential in every record, in case a library does, and every
value a process registered as secret (a daemon registers its own client secret and token).
Every kvfs process (CLI, CSI plugin, mounter, zygote, daemons) logs through `setup_logging`,
as text for people or as JSON lines for log collectors (`--log-format json`):

    {"time": "2024-05-01T12:00:00.123Z", "level": "WARNING", "logger": "kvfs.cache.loader",
     "message": "...", "pid": 42, "object": "secret/db-password", "code": "SecretNotFound"}

`time` (RFC 3339, UTC, milliseconds), `level`, `logger`, `message` and `pid` are always there;
the fields a log call passes with `extra=` (and a daemon's `set_log_context`: `volume`, `pod`)
follow; an exception adds `exc` (its one-line summary) and `traceback`. Every field is redacted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple, TextIO

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")

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


# The attributes every LogRecord has; any other attribute came from a log call's `extra=`.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName", "exc_line"}
_context: dict[str, str] = {}


def set_log_context(**fields: str) -> None:
    """Fields every later JSON record of this process carries (a daemon: its `volume`, `pod`)."""
    _context.update({name: value for name, value in fields.items() if value})


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {name: value for name, value in record.__dict__.items() if name not in _RECORD_ATTRS}


def _clean(value: Any) -> Any:
    """A field value safe to log: numbers and booleans as they are, anything else redacted text."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return redact(str(value))


class RedactingFilter(logging.Filter):
    """Redacts each record's message, exception and `extra=` fields before any formatter runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            summary = "".join(traceback.format_exception_only(record.exc_info[1]))
            record.exc_line = redact(" ".join(summary.split()))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for name, value in _extra_fields(record).items():
            setattr(record, name, _clean(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; see the module docstring for the fields."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        entry: dict[str, Any] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name, value in {**_context, **_extra_fields(record)}.items():
            entry.setdefault(name, _clean(value))
        if record.exc_text:
            entry["exc"] = getattr(record, "exc_line", "") or record.exc_text.splitlines()[-1]
            entry["traceback"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry)  # ASCII: a line stays writable whatever the locale


class _LogOption(NamedTuple):
    flag: str
    name: str
    choices: tuple[str, ...]
    env: str
    default: str
    fold: Callable[[str], str]
    help: str


_LEVEL = _LogOption("--log-level", "log level", LOG_LEVELS, "KVFS_LOG_LEVEL", "INFO", str.upper, "log verbosity")
_FORMAT = _LogOption(
    "--log-format", "log format", LOG_FORMATS, "KVFS_LOG_FORMAT", "text", str.lower,
    "text for people, json (one object per line) for log collectors",
)  # fmt: skip


def _choice_type(option: _LogOption) -> Callable[[str], str]:
    """An argparse type for the option's choices; a wrong value from its variable is named so."""

    def parse(text: str) -> str:
        value = option.fold(text.strip())
        if value not in option.choices:
            source = f" (from ${option.env})" if os.environ.get(option.env) == text else ""
            raise argparse.ArgumentTypeError(
                f"{text!r}{source} is not a {option.name}: use one of {', '.join(option.choices)}"
            )
        return value

    return parse


def add_log_options(parser: argparse.ArgumentParser, *, top_level: bool = False, level: bool = True) -> None:
    """`--log-level` and `--log-format`, defaulting to $KVFS_LOG_LEVEL and $KVFS_LOG_FORMAT.

    Only the top-level parser sets defaults; a command's own flags stay unset unless given, so
    `kvfs --log-level X mount` and `kvfs mount --log-level X` both work.
    """
    for option in (_LEVEL, _FORMAT) if level else (_FORMAT,):
        parser.add_argument(
            option.flag,
            type=_choice_type(option),
            metavar="{" + ",".join(option.choices) + "}",
            default=os.environ.get(option.env, option.default) if top_level else argparse.SUPPRESS,
            help=f"{option.help} (default {option.default}, or ${option.env})",
        )


def setup_logging(
    level: str = "INFO", *, stream: TextIO | None = None, pid: bool = False, fmt: str = "text"
) -> None:
    """Log to stderr (or `stream`) with the redaction filter on the handler.

    `pid` adds the process id to each text line (JSON lines always carry it): the CSI mounter,
    its zygote and every daemon share one log. `fmt` is "text" or "json".
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        text = "%(asctime)s " + ("%(process)d " if pid else "") + "%(levelname)s %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(text))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "hpack", "azure", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # kvfs logs one actionable line per credential failure; azure-identity's own multi-line
    # warning about the same failure would only repeat it.
    logging.getLogger("azure.identity").setLevel(logging.ERROR)
