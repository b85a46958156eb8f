"""The event log read as queue events (appliance.reporting.from_log) and the persisted KPI
rollup (appliance.reporting.rollup), over real rows in a real SQLite site database."""

from __future__ import annotations

import random
from dataclasses import fields
from pathlib import Path

import pytest

from appliance import eventlog
from appliance.reporting.events import (
    EventError,
    QueueVerb,
    format_queue_log_line,
    read_queue_log,
)
from appliance.reporting.from_log import (
    queue_events_after,
    queue_events_from_db,
    to_queue_events,
)
from appliance.reporting.kpi import KpiConfig, KpiEngine
from appliance.reporting.rollup import QueueRollup, RollupError
from appliance.store import open_site_db

T0 = 1_764_061_200.0  # 2025-11-25 09:00:00 UTC, on a 30-minute boundary


@pytest.fixture
def db(tmp_path: Path):
    database = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(database, "paris")
    yield database
    database.conn.close()


def put(db, kind: str, at: float, **payload: object) -> int:
    return eventlog.append(db, kind, payload, occurred_at=at, now=at)


def answered_call(db, cid: str, queue: str, caller: str, entered: float, wait: float,
                  talk: float, agent: str, ended_by: str = "caller-hung-up") -> None:
    """The rows call control writes for an answered call, in one transaction at its end."""
    with eventlog.transaction(db):
        put(db, "queue.enter", entered, call_id=cid, queue=queue, caller=caller, priority=0,
            dialled="100")
        put(db, "queue.connect", entered + wait, call_id=cid, queue=queue, agent=agent,
            wait_s=wait, ring_s=1.5)
        put(db, "queue.complete", entered + wait + talk, call_id=cid, queue=queue, agent=agent,
            talk_s=talk, ended_by=ended_by)
        put(db, "call.record", entered + wait + talk, call_id=cid, caller=caller, queue=queue,
            agent=agent, legs=[])


def unanswered_call(db, cid: str, queue: str, caller: str, entered: float, wait: float,
                    overflow: str | None = None) -> None:
    extra = {} if overflow is None else {"overflow": overflow}
    with eventlog.transaction(db):
        put(db, "queue.enter", entered, call_id=cid, queue=queue, caller=caller, priority=0,
            dialled="100")
        put(db, "queue.abandon", entered + wait, call_id=cid, queue=queue, caller=caller,
            wait_s=wait, **extra)
        put(db, "call.record", entered + wait, call_id=cid, caller=caller, queue=queue, legs=[])


# ------------------------------------------------------------------------------ mapping


def test_each_kind_maps_to_its_queue_log_verb() -> None:
    at = T0
    cases = [
        ("queue.enter", {"call_id": "c1", "queue": "sales", "caller": "+331"},
         QueueVerb.ENTERQUEUE, {"caller_id": "+331"}),
        ("queue.connect", {"call_id": "c1", "queue": "sales", "agent": "1001", "wait_s": 12.5,
                           "ring_s": 2}, QueueVerb.CONNECT, {"wait": 12.5, "ring": 2.0}),
        ("queue.complete", {"call_id": "c1", "queue": "sales", "agent": "1001", "talk_s": 60,
                            "ended_by": "caller-hung-up"}, QueueVerb.COMPLETECALLER,
         {"talk": 60.0}),
        ("queue.complete", {"call_id": "c1", "queue": "sales", "agent": "1001", "talk_s": 60,
                            "ended_by": "agent-hung-up"}, QueueVerb.COMPLETEAGENT,
         {"talk": 60.0}),
        ("queue.complete", {"call_id": "c1", "queue": "sales", "agent": "1001", "talk_s": 60,
                            "ended_by": "transferred"}, QueueVerb.TRANSFER, {"talk": 60.0}),
        ("queue.abandon", {"call_id": "c2", "queue": "sales", "caller": "+332", "wait_s": 7},
         QueueVerb.ABANDON, {"wait": 7.0}),
        ("queue.abandon", {"call_id": "c3", "queue": "sales", "wait_s": 300,
                           "overflow": "timeout"}, QueueVerb.EXITWITHTIMEOUT, {"wait": 300.0}),
        ("queue.abandon", {"call_id": "c4", "queue": "sales", "wait_s": 0,
                           "overflow": "no-agents"}, QueueVerb.EXITEMPTY, {"wait": 0.0}),
        ("agent.login", {"agent": "1001", "actor": "1001", "source": "phone"},
         QueueVerb.AGENTLOGIN, {}),
        ("agent.logout", {"agent": "1001"}, QueueVerb.AGENTLOGOFF, {}),
        ("agent.pause", {"agent": "1001", "reason": "lunch"}, QueueVerb.PAUSE,
         {"reason": "lunch"}),
        ("agent.unpause", {"agent": "1001"}, QueueVerb.UNPAUSE, {}),
        ("agent.disposition", {"agent": "1001", "call_id": "c1", "code": "billing"},
         QueueVerb.DISPOSITION, {"code": "billing"}),
        ("call.hold", {"call_id": "c1", "agent": "1001"}, QueueVerb.HOLD, {}),
        ("call.resume", {"call_id": "c1", "agent": "1001"}, QueueVerb.UNHOLD, {}),
    ]
    for kind, payload, verb, data in cases:
        (event,) = to_queue_events(kind, payload, at, site="paris")
        assert event.verb is verb, kind
        assert dict(event.data) == data, kind
        assert event.at == at and event.site == "paris"
        assert event.call_id == payload.get("call_id", "")
        assert event.agent == payload.get("agent", "")
    (enter,) = to_queue_events("queue.enter", cases[0][1], at)
    assert enter.caller == "+331" and enter.queue == "sales"


def test_kinds_without_queue_facts_give_nothing() -> None:
    assert to_queue_events("call.record", {"call_id": "c1"}, T0) == []
    assert to_queue_events("call.offered", {"call_id": "c1"}, T0) == []
    assert to_queue_events("stats.media", {}, T0) == []


def test_malformed_rows_name_the_problem() -> None:
    with pytest.raises(EventError, match="wait_s must be a number"):
        to_queue_events("queue.connect", {"call_id": "c", "wait_s": "soon"}, T0)
    with pytest.raises(EventError, match="names no agent"):
        to_queue_events("agent.pause", {"reason": "lunch"}, T0)
    with pytest.raises(EventError, match="JSON object"):
        to_queue_events("queue.enter", ["c1"], T0)  # type: ignore[arg-type]


def test_a_malformed_row_in_the_database_names_its_seq(db) -> None:
    answered_call(db, "c1", "sales", "+331", T0, 5, 60, "1001")
    bad = put(db, "queue.connect", T0 + 100, call_id="c9", queue="sales", wait_s="x")
    with pytest.raises(EventError, match=f"event seq {bad} "):
        list(queue_events_from_db(db))
    # The rows before it were read, nothing was changed: the log is intact.
    assert eventlog.last_seq(db) == bad


# ------------------------------------------------------------------------------ reading


def test_rows_come_back_in_time_order_within_bounds(db) -> None:
    # Call control writes a call's rows when it ends: c2 (short) is written before c1.
    unanswered_call(db, "c2", "sales", "+332", T0 + 30, 12)
    answered_call(db, "c1", "sales", "+331", T0 + 10, 15, 300, "1001")
    put(db, "agent.login", T0, agent="1001", actor="1001", source="phone")
    events = list(queue_events_from_db(db))
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert [(e.call_id, e.verb) for e in events] == [
        ("", QueueVerb.AGENTLOGIN), ("c1", QueueVerb.ENTERQUEUE), ("c1", QueueVerb.CONNECT),
        ("c2", QueueVerb.ENTERQUEUE), ("c2", QueueVerb.ABANDON),
        ("c1", QueueVerb.COMPLETECALLER)]
    assert all(e.site == "paris" for e in events)
    window = list(queue_events_from_db(db, since=T0 + 10, until=T0 + 42))
    assert [e.at for e in window] == [T0 + 10, T0 + 25, T0 + 30]
    seqs, last = queue_events_after(db, 0, limit=4)
    assert last == 4 and [s for s, _ in seqs] == [1, 2, 4]  # seq 3 is c2's call.record


def test_paging_through_many_rows_loses_none(db, monkeypatch) -> None:
    monkeypatch.setattr("appliance.reporting.from_log.BATCH_ROWS", 7)
    with eventlog.transaction(db):
        for i in range(40):  # equal times force the (time, seq) paging key
            put(db, "queue.enter", T0 + i // 5, call_id=f"c{i}", queue="q", caller="")
    events = list(queue_events_from_db(db))
    assert [e.call_id for e in events] == [f"c{i}" for i in range(40)]


def test_report_from_the_log(db) -> None:
    put(db, "agent.login", T0, agent="1001", actor="1001", source="phone")
    put(db, "agent.login", T0, agent="1002", actor="1002", source="phone")
    answered_call(db, "c1", "sales", "+331", T0 + 10, 15, 150, "1001")
    answered_call(db, "c2", "sales", "+332", T0 + 20, 40, 240, "1002", ended_by="agent-hung-up")
    unanswered_call(db, "c3", "sales", "+333", T0 + 30, 3)        # short abandon
    unanswered_call(db, "c4", "sales", "+334", T0 + 40, 12)       # abandon within 20 s
    unanswered_call(db, "c5", "sales", "+335", T0 + 600, 300, overflow="timeout")
    put(db, "agent.pause", T0 + 1000, agent="1002", reason="lunch", actor="1002",
        source="phone")
    put(db, "agent.unpause", T0 + 1300, agent="1002", actor="1002", source="phone")
    engine = KpiEngine(KpiConfig(interval=1800))
    for event in queue_events_from_db(db):
        engine.feed(event)
    report = engine.report(end=T0 + 1800)
    (row,) = report.rows("queue", "sales")
    assert (row.offered, row.answered, row.abandoned, row.short_abandoned, row.timed_out) == \
        (4, 2, 1, 1, 1)
    assert row.service_level == pytest.approx(1 / 4)          # c1 only within 20 s
    assert row.asa == pytest.approx((15 + 40) / 2)
    assert row.longest_wait == 300
    assert row.aht == pytest.approx((150 + 240) / 2)
    (a2,) = report.rows("agent", "1002")
    assert a2.paused == 300 and a2.logged_in == 1800 and a2.busy == 240
    assert report.anomalies == 0


def test_queue_log_export_reads_back_identically(db) -> None:
    answered_call(db, "c1", "sales", "+331", T0 + 10.25, 15, 150, "1001", ended_by="transferred")
    unanswered_call(db, "c5", "sales", "+335", T0 + 600, 300, overflow="no-agents")
    put(db, "agent.pause", T0 + 5, agent="1001", reason="lunch")
    put(db, "agent.disposition", T0 + 200, agent="1001", call_id="c1", code="billing")
    events = list(queue_events_from_db(db))
    lines = [format_queue_log_line(e) for e in events]
    assert lines[0] == f"{int(T0 + 5)}|NONE|NONE|1001|PAUSE|lunch"
    assert lines[1] == f"{T0 + 10.25}|c1|sales|NONE|ENTERQUEUE||+331"
    assert list(read_queue_log(lines, site="paris")) == events


# ------------------------------------------------------------------------------ rollup


def random_log(db, seed: int, calls: int, start: float = T0) -> None:
    rng = random.Random(seed)
    at = start
    for i in range(calls):
        at += rng.expovariate(1 / 40)
        cid, queue = f"c{seed}-{i}", rng.choice(["sales", "support", "billing"])
        wait = round(rng.expovariate(1 / 25), 3)
        fate = rng.random()
        if fate < 0.65:
            talk = round(rng.uniform(10, 900), 3)
            with eventlog.transaction(db):
                put(db, "queue.enter", at, call_id=cid, queue=queue, caller=f"+33{i % 50}")
                if rng.random() < 0.2:
                    put(db, "queue.ring_no_answer", at + wait / 2, call_id=cid, queue=queue,
                        agent="1009")
                put(db, "queue.connect", at + wait, call_id=cid, queue=queue, agent="1001",
                    wait_s=wait)
                if rng.random() < 0.3:
                    put(db, "call.hold", at + wait + talk / 3, call_id=cid, agent="1001")
                    put(db, "call.resume", at + wait + talk / 2, call_id=cid, agent="1001")
                if rng.random() < 0.9:  # the rest are still talking at the report
                    put(db, "queue.complete", at + wait + talk, call_id=cid, queue=queue,
                        agent="1001", talk_s=talk, ended_by=rng.choice(
                            ["caller-hung-up", "agent-hung-up", "transferred"]))
        elif fate < 0.9:
            unanswered_call(db, cid, queue, f"+33{i % 50}", at, wait,
                            overflow=rng.choice([None, None, "timeout", "no-agents"]))
        else:  # still waiting
            put(db, "queue.enter", at, call_id=cid, queue=queue, caller="")


def same_queue_rows(rollup_rows, report) -> None:
    expected = [r for r in report.intervals if r.scope == "queue"]
    assert [(r.interval_start, r.key) for r in rollup_rows] == \
        [(r.interval_start, r.key) for r in expected]
    skip = {"fcr", "fcr_resolved", "fcr_repeated"}
    for got, want in zip(rollup_rows, expected, strict=True):
        for f in fields(got):
            if f.name in skip:
                continue
            g, w = getattr(got, f.name), getattr(want, f.name)
            if isinstance(w, float):
                assert g == pytest.approx(w, rel=1e-9, abs=1e-6), (f.name, got.key)
            else:
                assert g == w, (f.name, got.key, got.interval_start)


def engine_report(db, config: KpiConfig):
    engine = KpiEngine(config)
    for event in queue_events_from_db(db):
        engine.feed(event)
    return engine.report()


@pytest.mark.parametrize("interval", [900, 1800])
def test_rollup_equals_the_engine(db, interval: int) -> None:
    random_log(db, seed=interval, calls=400)
    config = KpiConfig(interval=interval)
    rollup = QueueRollup(db, config)
    rows = rollup.report()
    assert sum(r.offered for r in rows) > 300 and any(r.waiting for r in rows)
    same_queue_rows(rows, engine_report(db, config))


def test_rollup_follows_the_log_incrementally_and_persists(db) -> None:
    config = KpiConfig(interval=1800)
    random_log(db, seed=1, calls=150)
    first = QueueRollup(db, config)
    first.catch_up()
    seq = first.last_seq
    random_log(db, seed=2, calls=150, start=T0 + 150 * 40)
    # A new process picks up where the persisted rollup stopped.
    second = QueueRollup(db, config)
    assert second.last_seq == seq
    assert second.catch_up() == eventlog.last_seq(db) - seq
    same_queue_rows(second.report(), engine_report(db, config))
    # Catching up again reads nothing and changes nothing.
    assert second.catch_up() == 0
    same_queue_rows(QueueRollup(db, config).report(), engine_report(db, config))


def test_rollup_window_and_settings(db) -> None:
    random_log(db, seed=3, calls=200)
    config = KpiConfig(interval=1800, service_level_threshold=10)
    rows = QueueRollup(db, config).report(since=T0 + 1800, until=T0 + 3 * 1800)
    assert rows and {r.interval_start for r in rows} <= {int(T0) + 1800, int(T0) + 3600}
    # Other settings count from scratch, beside the first rollup.
    other = QueueRollup(db, KpiConfig(interval=1800)).report()
    assert sum(r.answered_within for r in other) > sum(
        r.answered_within for r in QueueRollup(db, config).report())


def test_two_writers_never_count_twice(db) -> None:
    random_log(db, seed=4, calls=50)
    config = KpiConfig()
    a, b = QueueRollup(db, config), QueueRollup(db, config)
    assert a.last_seq == b.last_seq == 0  # both loaded the same starting point
    a.catch_up()
    with pytest.raises(RollupError, match="another process"):
        b.catch_up()
    same_queue_rows(b.report(), engine_report(db, config))  # b reloaded: nothing doubled


def test_a_malformed_row_stops_the_rollup_without_writing(db) -> None:
    random_log(db, seed=5, calls=20)
    put(db, "queue.connect", T0 + 10_000, call_id="zz", queue="q", wait_s="late")
    rollup = QueueRollup(db)
    with pytest.raises(EventError, match="wait_s"):
        rollup.catch_up()
    assert rollup.last_seq == 0
    assert db.conn.execute("SELECT COUNT(*) FROM kpi_rollup").fetchone()[0] == 0
