"""Call control's bookkeeping off the SIP path: the per-call index of SIP keys, and the calls'
rows committed by the database writer (crash trace, records of calls a crash cut off).

The database is a real SQLite file with the site's migrations; the writer is the appliance's
``DatabaseWriter``. Full calls through SIPp are in test_calls_e2e.py and test_restart_agents.py.
"""

from __future__ import annotations

import json
import sqlite3
import types
from pathlib import Path
from typing import Any

import pytest

from appliance import eventlog
from appliance.calls.control import CallControl, CallIndex, _in_progress
from appliance.dbwriter import DatabaseWriter
from appliance.store import open_site_db

T0 = 1_764_061_200.0


def call(call_id: str) -> Any:
    return types.SimpleNamespace(call_id=call_id)


def test_the_index_drops_a_calls_own_keys_and_no_others() -> None:
    index: CallIndex[str] = CallIndex()
    a, b = call("a"), call("b")
    index["k1"] = (a, None)
    index["k2"] = (a, None)
    index["k3"] = (b, None)
    assert set(index.take_fresh()) == {"a", "b"} and index.take_fresh() == {}
    index["k2"] = (b, None)  # a key that moves to another call (a dialog taken over)
    assert index.pop("k1") == (a, None) and index.pop("nothing", None) is None
    with pytest.raises(KeyError):
        index.pop("nothing")
    index.drop_call(a)
    assert dict(index) == {"k2": (b, None), "k3": (b, None)}
    assert set(index.take_fresh()) == {"b"}
    index["k4"] = (a, None)
    del index["k4"]
    index.drop_call(b)
    assert dict(index) == {} and index._keys == {}
    assert index.take_fresh() == {"a": a}  # given an entry since: until its end drops it


def test_a_crash_trace_becomes_a_record_at_the_next_start(tmp_path: Path) -> None:
    path = tmp_path / "site.db"
    db = open_site_db(path)
    eventlog.bind_site(db, "demo")
    writer = DatabaseWriter(db, name="calls")
    try:
        # At INVITE, then at answer (the same row updated), for one call; another only offered.
        rows = [("c1", "sip-1", "+331", "100", "main", "inbound", T0, None, None, None),
                ("c1", "sip-1", "+331", "100", "main", "inbound", T0, "support", "1001",
                 T0 + 5),
                ("c2", "sip-2", "+332", "100", "main", "inbound", T0 + 1, None, None, None)]
        futures = [writer.write("trace", lambda conn, _db, row=row: _in_progress(row, conn, _db))
                   for row in rows]
        assert all(f.result(10) is None for f in futures)
        # The last event the site committed before the crash.
        writer.write("event", lambda _conn, d: eventlog.append(
            d, "queue.enter", {"call_id": "c2", "queue": "support"}, occurred_at=T0 + 9)
        ).result(10)
        # The next start: the records of calls the crash cut off, in one job of the writer.
        control = types.SimpleNamespace(db=db)
        writer.submit(CallControl._record_interrupted, control, T0 + 60).result(10)
    finally:
        writer.close(10)
    check = sqlite3.connect(path)
    try:
        records = check.execute("SELECT call_id, queue, agent, answered_at, ended_at, end_reason"
                                " FROM call_records ORDER BY call_id").fetchall()
        assert records == [("c1", "support", "1001", T0 + 5, T0 + 9, "appliance-crashed"),
                           ("c2", None, None, None, T0 + 9, "appliance-crashed")]
        assert check.execute("SELECT COUNT(*) FROM calls_in_progress").fetchone() == (0,)
        events = [json.loads(p)["call_id"] for k, p in check.execute(
            "SELECT kind, payload FROM events WHERE kind = 'call.record' ORDER BY seq")]
        assert events == ["c1", "c2"]
    finally:
        check.close()
        db.close()
