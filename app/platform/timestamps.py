"""Conversion of datetimes to google.protobuf.Timestamp messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp_of(value: datetime) -> Timestamp:
    """Return the Timestamp of an aware datetime."""
    timestamp = Timestamp()
    timestamp.FromDatetime(value)
    return timestamp
