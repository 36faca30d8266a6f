"""Log formatting: text lines cannot be forged through request data; JSON carries the context."""

from __future__ import annotations

import json
import logging

from app.platform.logs import JSONFormatter, TextFormatter


def make_record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "app.access", "levelno": logging.INFO, "levelname": "INFO", "msg": message, "args": args})
    record.__dict__.update(extra)
    return record


def test_text_line_escapes_line_breaks() -> None:
    record = make_record("POST %s 404", "/x\n2026-12-04 00:00:00,000 ERROR app.security: FORGED")

    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(record)

    assert "\n" not in line
    assert "\\n2026-12-04" in line


def test_text_line_keeps_traceback_lines() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = make_record("failed")
        record.exc_info = sys.exc_info()

    text = TextFormatter("%(message)s").format(record)

    assert text.startswith("failed\nTraceback")


def test_json_line_carries_extra_fields() -> None:
    record = make_record("GET %s %s", "/healthz", 200, request_id="req-12345678", uid="alice", duration_ms=1.5)

    entry = json.loads(JSONFormatter().format(record))

    assert entry["message"] == "GET /healthz 200"
    assert entry["request_id"] == "req-12345678"
    assert entry["uid"] == "alice"
    assert entry["duration_ms"] == 1.5
