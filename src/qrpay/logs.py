"""qrpay's logs: the `qrpay` logger (stdlib logging) and its children
(`qrpay.access`, the service's access log, ...) written to stderr, one line
per record: plain text, or one JSON object per line for a log collector
(docs/OPERATIONS.md, Logs).

A JSON line has `time` (ISO 8601, UTC, milliseconds), `level`, `logger`,
`message`, then the record's extra fields (`log.info("...", extra={...})`)
and `exception` when there is one. A message that is itself a JSON object
(the service's access log writes those) gives its fields to the line and
leaves `message` empty.

Nothing secret reaches the output, whatever a caller passes: bytes (token
bytes, batch bodies) become `<N bytes>`, a token's text form (`QP:...`)
becomes `QP:<redacted>`, a secret key's text (`qrpay:ROLE-secret:...`)
loses its key, and an extra field named like a secret (token, secret,
password, authorization) is replaced whole.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

LOGGER = "qrpay"
LEVELS = ("debug", "info", "warning", "error", "critical")

# A token's text form: 'QP:' and Base45 (0-9, A-Z, space and $%*+-./:).
_TOKEN_TEXT = re.compile(r"QP:[0-9A-Z $%*+\-./:]+")
# A secret key's text form: qrpay:ROLE-secret:BASE64URL.
_SECRET_TEXT = re.compile(r"(qrpay:[a-z]+-secret)(:[A-Za-z0-9_\-=]*)?")
_SECRET_FIELD = re.compile(r"token|secret|password|passphrase|authorization|credential",
                           re.IGNORECASE)
_BYTES = (bytes, bytearray, memoryview)
# What every LogRecord has: the rest of its attributes are extra fields.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}


def configure(level: str, json_format: bool) -> logging.Logger:
    """Send the `qrpay` logger's records at `level` (debug, info, warning,
    error, critical) and above to stderr, as JSON lines or as plain text.
    Calling it again replaces what an earlier call set up. Returns the
    logger. A level not in LEVELS is a ValueError."""
    name = level.strip().lower() if isinstance(level, str) else ""
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    logger = logging.getLogger(LOGGER)
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(name.upper())
    # Ours writes them: the root logger's handlers (logging.basicConfig) would
    # print each record a second time.
    logger.propagate = False
    return logger


class _StderrHandler(logging.Handler):
    """Writes to whatever sys.stderr is when the record comes (the CLI
    wraps it; tests capture it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def redact(text: str) -> str:
    """`text` without token text forms or secret key texts."""
    text = _TOKEN_TEXT.sub("QP:<redacted>", text)
    return _SECRET_TEXT.sub(r"\1:<redacted>", text)


def _safe(value: Any) -> Any:
    """A value fit for a log line: bytes as their length, strings
    redacted, containers item by item, anything else as JSON can hold it
    or as its redacted str()."""
    if isinstance(value, _BYTES):
        return f"<{len(value)} bytes>"
    if isinstance(value, str):
        return redact(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _field(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_safe(v) for v in value]
    return redact(str(value))


def _field(name: str, value: Any) -> Any:
    if _SECRET_FIELD.search(name) and isinstance(value, (str, *_BYTES)):
        return "<redacted>"
    return _safe(value)


def _message(record: logging.LogRecord) -> str:
    """The record's message with its %-arguments made safe first (a bytes
    argument shows as `<N bytes>`, never as its repr)."""
    args = record.args
    if isinstance(args, Mapping):
        safe_args: Any = {k: _printable(v) for k, v in args.items()}
    elif isinstance(args, tuple):
        safe_args = tuple(_printable(v) for v in args)
    else:
        safe_args = args
    message = str(record.msg)
    if safe_args:
        try:
            message = message % safe_args
        except (TypeError, ValueError, KeyError):
            message = f"{message} {safe_args!r}"
    return redact(message)


def _printable(value: Any) -> Any:
    return f"<{len(value)} bytes>" if isinstance(value, _BYTES) else value


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: _field(k, v) for k, v in vars(record).items()
            if k not in _STANDARD and not k.startswith("_")}


def _json_object(message: str) -> dict[str, Any] | None:
    if not message.startswith("{"):
        return None
    try:
        found = json.loads(message)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        message = _message(record)
        line: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": message,
        }
        fields = _extras(record)
        embedded = _json_object(message)
        if embedded is not None:   # the access log's lines: its fields, not a quoted string
            line["message"] = ""
            fields = {**{k: _field(k, v) for k, v in embedded.items()}, **fields}
        for key, value in fields.items():
            line.setdefault(key, value)   # never over the four above
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, ensure_ascii=False, default=lambda v: redact(str(v)))


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE key=value ...`, redacted as JSON lines are."""

    def format(self, record: logging.LogRecord) -> str:
        when = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        parts = [when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                 record.levelname.lower(), f"{record.name}:", _message(record)]
        parts += [f"{k}={json.dumps(v, default=str)}" for k, v in _extras(record).items()]
        text = " ".join(parts)
        if record.exc_info:
            text += "\n" + redact(self.formatException(record.exc_info))
        return text
