"""Structured logging: one ``key=value`` line per event, on stderr, never carrying secrets.

``kv(**fields)`` renders the fields; values with characters outside a safe set are quoted.
Under load the formatter runs for every line, so it does little: the time stamp's text is
kept for the current second, and the ``level=`` / ``logger=`` part is kept per level and
logger. Callers that log on a per-message path use ``log.isEnabledFor`` (or a ``Fields``
argument, rendered only when a handler writes the line) so nothing is formatted at a level
that is off.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

_UNSAFE = re.compile(r"[^a-zA-Z0-9\-_.:/@\[\]+,]")
"""A character outside the set written without quotes."""


def _value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    if not text or _UNSAFE.search(text) is not None:
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def kv(**fields: Any) -> str:
    """Render fields as ``key=value`` pairs; values with spaces or quotes are quoted."""
    return " ".join([f"{key}={_value(value)}" for key, value in fields.items()])


class Fields:
    """``key=value`` fields rendered only when a handler writes the line.

    ``log.debug("%s", Fields(event="x", call=call_id))`` costs one small object when debug
    is off, and the same text as ``kv`` when it is on.
    """

    __slots__ = ("fields",)

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return kv(**self.fields)


class _KeyValueFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""
        self._heads: dict[tuple[str, str], str] = {}

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        key = (record.levelname, record.name)
        tail = self._heads.get(key)
        if tail is None:
            if len(self._heads) >= 1024:
                self._heads.clear()
            tail = self._heads[key] = (
                f" level={_value(record.levelname.lower())} logger={_value(record.name)} ")
        line = f"ts={self._stamp}.{int(record.msecs):03d}Z{tail}{record.getMessage()}"
        if record.exc_info:
            line += " exc=" + _value(self.formatException(record.exc_info))
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
    # Records carry no thread, process or caller-frame figures the lines do not print.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # no findCaller walk per record
