"""The site's event log and outbox on real SQLite files."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance import eventlog
from appliance.eventlog import DROPPABLE, ESSENTIAL, NORMAL, EventLogError
from appliance.store import open_site_db

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(tmp_path: Path):
    database = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(database, "paris-1")
    yield database
    database.conn.close()


def _outbox(db) -> list[int]:
    return [row[0] for row in db.execute("SELECT seq FROM outbox ORDER BY seq").fetchall()]


def test_a_call_record_and_its_queue_events_commit_together(db) -> None:
    with eventlog.transaction(db):
        db.conn.execute("INSERT INTO audit_log (at, actor, action) VALUES (1, 'acd', 'call')")
        first = eventlog.append(db, "queue.enter", {"call": "c1", "queue": "sales"},
                                occurred_at=100.0)
        second = eventlog.append(db, "call.record", {"call": "c1", "talk_s": 42},
                                 occurred_at=101.0)
    assert (first, second) == (1, 2)
    pending = eventlog.read_pending(db, 0, 10)
    assert [(p.seq, p.kind, p.site_id, p.withheld) for p in pending] == [
        (1, "queue.enter", "paris-1", False), (2, "call.record", "paris-1", False)
    ]
    assert json.loads(pending[1].payload) == {"call": "c1", "talk_s": 42}
    assert pending[0].occurred_at == 100.0

    # A failure part-way leaves nothing: not the record, not the events, not the outbox rows.
    with pytest.raises(RuntimeError), eventlog.transaction(db):
        eventlog.append(db, "queue.enter", {"call": "c2"}, occurred_at=102.0)
        db.conn.execute("INSERT INTO audit_log (at, actor, action) VALUES (2, 'acd', 'call')")
        raise RuntimeError("call control failed")
    assert eventlog.last_seq(db) == 2
    assert _outbox(db) == [1, 2]
    assert db.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 1
    assert eventlog.append(db, "queue.leave", {"call": "c1"}, occurred_at=103.0) == 3


def test_seq_is_strictly_increasing_across_writers_and_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    first = open_site_db(path)
    eventlog.bind_site(first, "paris-1")
    second = open_site_db(path)
    seqs = []
    for i in range(20):
        writer = first if i % 2 else second
        seqs.append(eventlog.append(writer, "queue.enter", {"i": i}, occurred_at=float(i)))
    assert seqs == list(range(1, 21))
    # Another process appends too; its seqs continue the same sequence.
    code = (
        "from appliance.store import open_site_db; from appliance import eventlog;"
        f"db = open_site_db({str(path)!r});"
        "print(eventlog.append(db, 'queue.enter', {}, occurred_at=0.0))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    assert int(out.stdout) == 21
    # The log is append-only: no update, no delete, so a seq can never come back.
    for statement in ("UPDATE events SET kind = 'x' WHERE seq = 1", "DELETE FROM events"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            first.conn.execute(statement)
        first.conn.rollback()
    assert eventlog.append(first, "queue.enter", {}, occurred_at=0.0) == 22
    first.conn.close()
    second.conn.close()


@pytest.mark.parametrize(
    ("kind", "payload", "words"),
    [
        ("", {}, "kind"),
        ("Queue Enter", {}, "kind"),
        ("q" * 65, {}, "kind"),
        ("queue.enter", {"x": float("nan")}, "JSON"),
        ("queue.enter", {"x": object()}, "JSON"),
        ("queue.enter", {"x": "y" * (256 * 1024)}, "limit"),
    ],
)
def test_bad_events_are_refused_and_lose_nothing(db, kind, payload, words) -> None:
    with eventlog.transaction(db):
        eventlog.append(db, "call.record", {"call": "c1"}, occurred_at=1.0)
    with pytest.raises(EventLogError, match=words):
        eventlog.append(db, kind, payload, occurred_at=2.0)
    # Inside a caller's transaction the refusal comes before any write: the rest still commits.
    with eventlog.transaction(db):
        eventlog.append(db, "queue.enter", {"call": "c2"}, occurred_at=3.0)
        with pytest.raises(EventLogError):
            eventlog.append(db, kind, payload, occurred_at=3.0)
    assert [p.kind for p in eventlog.read_pending(db, 0, 10)] == ["call.record", "queue.enter"]


def test_priorities_and_essential_kinds(db) -> None:
    assert eventlog.default_priority("call.record") == ESSENTIAL
    assert eventlog.default_priority("queue.enter") == ESSENTIAL
    assert eventlog.default_priority("stats.sample") == DROPPABLE
    assert eventlog.default_priority("chat.message") == NORMAL
    with pytest.raises(EventLogError, match="essential"):
        eventlog.append(db, "call.record", {}, occurred_at=1.0, priority=DROPPABLE)
    assert eventlog.last_seq(db) == 0


def test_site_binding(tmp_path: Path) -> None:
    db = open_site_db(tmp_path / "edgecc.db")
    with pytest.raises(EventLogError, match="bind_site"):
        eventlog.append(db, "queue.enter", {}, occurred_at=1.0)
    assert eventlog.append(db, "queue.enter", {}, occurred_at=1.0, site_id="lyon-2") == 1
    assert eventlog.bound_site(db) == "lyon-2"
    with pytest.raises(EventLogError, match="cannot change hands"):
        eventlog.bind_site(db, "paris-1")
    with pytest.raises(EventLogError, match="cannot change hands"):
        eventlog.append(db, "queue.enter", {}, occurred_at=1.0, site_id="paris-1")
    assert eventlog.last_seq(db) == 1
    db.conn.close()


def test_acknowledge_deletes_only_up_to_the_ack_and_gaps_come_back_withheld(db) -> None:
    for i in range(1, 7):
        eventlog.append(db, "queue.enter", {"i": i}, occurred_at=float(i),
                        with_outbox=i != 3)
    assert _outbox(db) == [1, 2, 4, 5, 6]
    assert eventlog.acknowledge(db, 2) == 2
    assert _outbox(db) == [4, 5, 6]
    pending = eventlog.read_pending(db, 2, 10)
    assert [(p.seq, p.withheld) for p in pending] == [
        (3, True), (4, False), (5, False), (6, False)
    ]
    assert [p.seq for p in eventlog.read_pending(db, 2, 2)] == [3, 4]
    assert eventlog.acknowledge(db, 2) == 0  # acknowledging again changes nothing
    assert eventlog.acknowledge(db, 6) == 3
    assert _outbox(db) == []
    assert eventlog.last_seq(db) == 6  # the log itself keeps everything


def test_quota_drops_only_droppable_kinds_lowest_priority_then_oldest(db) -> None:
    sizes = {}
    kinds = ["call.record", "stats.sample", "queue.enter", "stats.sample", "chat.message",
             "stats.sample", "agent.state"]
    for kind in kinds:
        seq = eventlog.append(db, kind, {"pad": "x" * 1000}, occurred_at=1.0)
        sizes[seq] = db.execute("SELECT bytes FROM outbox WHERE seq = ?", (seq,)).fetchone()[0]
    total = eventlog.outbox_bytes(db)
    assert total == sum(sizes.values())
    assert eventlog.drop_for_quota(db, total) == (0, 0)
    # Room for all but one event: the oldest stats sample goes.
    assert eventlog.drop_for_quota(db, total - 1) == (1, sizes[2])
    assert _outbox(db) == [1, 3, 4, 5, 6, 7]
    # A quota of nothing: every droppable row goes, essential and normal ones stay.
    dropped, dropped_bytes = eventlog.drop_for_quota(db, 0)
    assert (dropped, dropped_bytes) == (2, sizes[4] + sizes[6])
    assert _outbox(db) == [1, 3, 5, 7]
    assert eventlog.outbox_bytes(db) > 0
    assert [p.seq for p in eventlog.read_pending(db, 0, 10) if p.withheld] == [2, 4, 6]


def test_link_state_round_trip(db) -> None:
    assert eventlog.read_link_state(db) is None
    state = eventlog.LinkState("degraded", 10.0, 5, 3, 12.5, "link lost", 100, 2, 50, 11.0)
    eventlog.write_link_state(db, state)
    assert eventlog.read_link_state(db) == state
    with pytest.raises(sqlite3.IntegrityError):
        eventlog.write_link_state(db, eventlog.LinkState("sideways", 0, 0, 0, 0, "", 0, 0, 0, 0))
    assert eventlog.read_link_state(db) == state
