"""Logging setup: text for development, one JSON object per line for production."""

from __future__ import annotations

import json
import logging
import sys
import time

from app.platform.context import principal_var, request_id_var, trace_id_var
from app.settings import Settings

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class ContextFilter(logging.Filter):
    """Add the request id and the caller's uid to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        if getattr(record, "trace_id", None) is None:
            record.trace_id = trace_id_var.get()
        if getattr(record, "uid", None) is None:
            principal = principal_var.get()
            record.uid = principal.uid if principal else None
        return True


class JSONFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message and the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Format a record as one readable line, with the request id and uid when known."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        # A request path or header value may contain line breaks; escaped, it cannot forge a line.
        return super().formatMessage(record).replace("\r", "\\r").replace("\n", "\\n")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(
            f"{key}={value}" for key in ("request_id", "uid") if (value := getattr(record, key, None))
        )
        return f"{line} [{context}]" if context else line


def configure_logging(settings: Settings) -> None:
    """Send every log record to stderr in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if settings.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for existing in [h for h in root.handlers if getattr(h, "_functions_handler", False)]:
        root.removeHandler(existing)
    handler._functions_handler = True
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn's own access log repeats what RequestContextMiddleware logs.
    logging.getLogger("uvicorn.access").disabled = True
