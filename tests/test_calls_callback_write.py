"""A queued callback's row and event are written by the calls' group-commit writer
(appliance/dbwriter.py); the live feed hears the event only once the batch holding it has
committed, with the seq the write gave it, and never hears of a write that failed.

Real SQLite file (the site's migrations), a real ``DatabaseWriter``; what the feed is told is
checked against what a second connection can read at that moment.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from appliance import eventlog
from appliance.calls.callbacks import QueuedCallbacks
from appliance.dbwriter import DatabaseWriter
from appliance.store import open_site_db

WAIT_S = 10.0


class Host(QueuedCallbacks):
    """The part of call control ``_callback_write`` uses: the database, its writer, ``_emit``
    (recording, for each event, whether another connection could read its row then)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = open_site_db(path)
        self._db_thread = DatabaseWriter(self.db, name="calls")
        self.heard: list[tuple[str, dict[str, Any], bool]] = []
        self.told = asyncio.Event()

    def _emit(self, kind: str, payload: dict[str, Any], at: float) -> None:
        reader = sqlite3.connect(self.path, timeout=5)
        try:
            visible = reader.execute("SELECT count(*) FROM events WHERE seq = ?",
                                     (payload["seq"],)).fetchone()[0] == 1
        finally:
            reader.close()
        self.heard.append((kind, payload, visible))
        self.told.set()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "site.db"
    db = open_site_db(path)
    eventlog.bind_site(db, "demo")
    db.close()
    return path


def _rows(path: Path, sql: str) -> list[tuple]:
    reader = sqlite3.connect(path, timeout=5)
    try:
        return reader.execute(sql).fetchall()
    finally:
        reader.close()


INSERT = ("INSERT INTO callback_requests (call_id, queue, number, caller, priority,"
          " requested_at, place_at, state, attempts, variables, updated_at)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, 'waiting', 0, ?, ?)")


def test_the_feed_hears_a_callback_event_only_after_its_batch_committed(db_path) -> None:
    async def scenario() -> Host:
        host = Host(db_path)
        loop = asyncio.get_running_loop()
        writer = host._db_thread
        hold, release = threading.Event(), threading.Event()
        # The writer is busy with an earlier job, so the callback's write and a later job
        # are committed together; that later job waits (bounded) to hear the event first.
        writer.submit(lambda: hold.set() or release.wait(WAIT_S))
        assert await asyncio.to_thread(hold.wait, WAIT_S)
        host._callback_write(INSERT, ("c1", "support", "+15550111", "+15550111", 5, 1.0, 1.0,
                                      json.dumps({"tier": "gold"}), 1.0),
                             "callback.requested", {"call_id": "c1", "queue": "support"}, 1.0)
        later = writer.submit(lambda: asyncio.run_coroutine_threadsafe(
            asyncio.wait_for(host.told.wait(), 1.0), loop).exception())
        release.set()
        await asyncio.wait_for(host.told.wait(), WAIT_S)
        await asyncio.wrap_future(later)
        await asyncio.to_thread(writer.close)
        return host

    host = asyncio.run(scenario())
    [(kind, payload, visible)] = host.heard
    assert kind == "callback.requested" and payload["call_id"] == "c1"
    assert visible, "the event reached the live feed before its batch committed"
    [(seq, stored_kind)] = _rows(db_path, "SELECT seq, kind FROM events")
    assert (payload["seq"], stored_kind) == (seq, "callback.requested")
    assert _rows(db_path, "SELECT call_id, state FROM callback_requests") == [("c1", "waiting")]
    host.db.close()


def test_a_failed_callback_write_is_never_heard_and_loses_nothing_else(db_path,
                                                                        caplog) -> None:
    async def scenario() -> Host:
        host = Host(db_path)
        caplog.set_level(logging.ERROR, logger="edgecc")
        # No such column: the write fails whole (its event is not appended either).
        host._callback_write("UPDATE callback_requests SET no_such_column = 1", (),
                             "callback.failed", {"call_id": "c0", "queue": "support"}, 1.0)
        host._callback_write(INSERT, ("c2", "support", "+15550122", "+15550122", 0, 2.0, 2.0,
                                      "{}", 2.0),
                             "callback.requested", {"call_id": "c2", "queue": "support"}, 2.0)
        await asyncio.wait_for(host.told.wait(), WAIT_S)
        assert await asyncio.to_thread(host._db_thread.flush, WAIT_S)
        await asyncio.to_thread(host._db_thread.close)
        return host

    host = asyncio.run(scenario())
    assert [(k, p["call_id"], v) for k, p, v in host.heard] == [
        ("callback.requested", "c2", True)]
    assert [k for (k,) in _rows(db_path, "SELECT kind FROM events")] == ["callback.requested"]
    assert _rows(db_path, "SELECT call_id FROM callback_requests") == [("c2",)]
    failed = [r.getMessage() for r in caplog.records
              if "event=callback_write_failed" in r.getMessage()]
    assert len(failed) == 1 and "kind=callback.failed" in failed[0], failed
    host.db.close()


def test_a_writer_that_refuses_the_job_is_logged_not_raised(db_path, caplog) -> None:
    async def scenario() -> Host:
        host = Host(db_path)
        await asyncio.to_thread(host._db_thread.close)
        caplog.set_level(logging.ERROR, logger="edgecc")
        host._callback_write(None, (), "callback.dialled", {"call_id": "c3"}, 3.0)
        return host

    host = asyncio.run(scenario())
    assert host.heard == []
    assert any("callback_write_failed" in r.getMessage() for r in caplog.records)
    host.db.close()
