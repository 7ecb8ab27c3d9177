"""Structured logs: one JSON object per line (or readable text), each carrying the ids of what it
is about (request, tenant, key, job, stage) from a context the caller binds.

No web framework imports: the API's middleware and the worker's tasks configure and bind the
same way. What is bound are ids and counts, never API keys or customer text: callers bind only
what they would show in an error message.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["json", "text"]

# The current unit of work's fields. A dict shared by reference: code that runs in a thread
# (which gets a copy of the context) can still add a field the request's own log line shows.
_FIELDS: ContextVar[dict[str, Any] | None] = ContextVar("tailor_log_fields", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged.
_RECORD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)
_HANDLER_NAME = "tailor"


def current_fields() -> dict[str, Any]:
    """The fields bound for the current unit of work (a copy)."""
    return dict(_FIELDS.get() or {})


@contextmanager
def log_scope(**fields: Any) -> Iterator[dict[str, Any]]:
    """A unit of work (a request, a task): inside it every log line carries `fields` and what
    `bind` adds later; nested scopes inherit the outer fields."""
    scope = {**(_FIELDS.get() or {}), **_present(fields)}
    token = _FIELDS.set(scope)
    try:
        yield scope
    finally:
        _FIELDS.reset(token)


def bind(**fields: Any) -> None:
    """Add fields to the current unit of work (from here on, and on its closing log line)."""
    scope = _FIELDS.get()
    if scope is None:
        _FIELDS.set(_present(fields))
    else:
        scope.update(_present(fields))


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES}


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "message", ...bound fields, ...extra, "exception"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(current_fields())
        entry.update(_extra(record))
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-12-05 10:00:00,123 INFO app.x message key=value ...` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {**current_fields(), **_extra(record)}
        if not fields:
            return line
        head, newline, tail = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{key}={value}" for key, value in fields.items())
        return f"{head} {pairs}{newline}{tail}"


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is emitted (tools and tests swap it)."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def configure_logging(log_format: LogFormat = "json", level: str = "INFO") -> None:
    """Send every log line (uvicorn's and Celery's included) through one stderr handler in
    `log_format`. Idempotent: a second call replaces the first call's handler only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
    handler = _StderrHandler()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    # uvicorn's own handlers would print a second, unstructured copy; its access log is
    # replaced by the API's request line, which carries the request id.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
