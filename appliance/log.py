"""Structured logging: one ``key=value`` line per event, on stderr, never carrying secrets."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.:/@[]+,")


def kv(**fields: Any) -> str:
    """Render fields as ``key=value`` pairs; values with spaces or quotes are quoted."""
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or not set(text) <= _SAFE:
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = kv(
            ts=f"{stamp}.{int(record.msecs):03d}Z", level=record.levelname.lower(),
            logger=record.name,
        )
        line = f"{head} {record.getMessage()}"
        if record.exc_info:
            line += " exc=" + kv(e=self.formatException(record.exc_info))[2:]
        return line


def setup_logging(level: int = logging.INFO) -> None:
    """Send log records to stderr as key=value lines (stdout stays for command output)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own start/stop chatter duplicates our start-up line.
    logging.getLogger("uvicorn").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
