"""The composition root's live feed: each call-control or desk event reaches the hub (topic =
kind, queue figures for supervisors only) and, through ``from_log.to_queue_events``, the
wallboard; a bad event is counted and logged, never raised into the call that produced it."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from appliance.api import Hub, Role
from appliance.app import LiveFeed
from appliance.reporting.kpi import AgentState, LiveBoard

T0 = 1_700_000_000.0


async def _drain(subscription, timeout: float = 0.5) -> list[dict]:
    out = []
    while True:
        event = await subscription.get(timeout if not out else 0.05)
        if event is None:
            return out
        out.append(json.loads(event.message))


def test_events_reach_hub_and_board_as_they_happen() -> None:
    async def scenario() -> None:
        hub, board = Hub(clock=lambda: T0 + 100), LiveBoard()
        feed = LiveFeed(hub, board, site="demo", clock=lambda: T0 + 100)
        supervisor = hub.subscribe(Role.SUPERVISOR)
        agent = hub.subscribe(Role.AGENT, agent="1001")
        colleague = hub.subscribe(Role.AGENT, agent="1002")
        feed("agent.login", {"agent": "1001", "actor": "1001", "source": "phone", "at": T0})
        feed("call.offered", {"call_id": "c1", "caller": "+331", "dialled": "+1555",
                              "flow": "main", "at": T0 + 1})
        feed("queue.enter", {"call_id": "c1", "queue": "support", "caller": "+331",
                             "at": T0 + 2})
        snap = board.snapshot(T0 + 5)
        [queue] = snap.queues
        assert (queue.queue, queue.waiting, queue.longest_wait) == ("support", 1, 3.0)
        assert snap.agents == {"1001": AgentState.AVAILABLE}
        feed("queue.connect", {"call_id": "c1", "queue": "support", "agent": "1001",
                               "wait_s": 4.0, "ring_s": 1.0, "at": T0 + 6})
        snap = board.snapshot(T0 + 7)
        assert (snap.queues[0].waiting, snap.queues[0].answered) == (0, 1)
        assert snap.agents == {"1001": AgentState.ON_CALL}

        seen = await _drain(supervisor)
        assert [m["topic"] for m in seen] == ["agent.login", "call.offered", "queue.enter",
                                              "queue.connect"]
        assert seen[2]["data"] == {"call_id": "c1", "queue": "support", "caller": "+331",
                                   "at": T0 + 2}
        # Callers waiting are for supervisors; an agent's desk sees its own calls being
        # answered (the caller's details first), a colleague's desk sees none of it.
        assert [m["topic"] for m in await _drain(agent)] == ["agent.login", "call.offered",
                                                             "queue.connect"]
        assert await _drain(colleague) == []
        assert (feed.delivered, feed.rejected) == (4, 0)

    asyncio.run(scenario())


def test_a_bad_event_is_counted_and_the_next_one_still_flows(caplog) -> None:
    async def scenario() -> None:
        hub, board = Hub(), LiveBoard()
        feed = LiveFeed(hub, board, clock=lambda: T0)
        sub = hub.subscribe(Role.ADMIN)
        with caplog.at_level(logging.ERROR, logger="edgecc.appliance"):
            feed("call.offered", {"call_id": "c1", "caller": object()})   # not JSON
            feed("agent.pause", {"reason": "break", "at": T0})           # names no agent
            feed("queue.connect", {"call_id": "c2", "wait_s": "soon"})   # not a number
            feed("", {"call_id": "c3"})                                  # no topic
        assert feed.rejected == 4
        assert "event=live_event_rejected kind=call.offered" in caplog.text
        assert "event=live_board_rejected kind=agent.pause" in caplog.text
        feed("queue.enter", {"call_id": "c4", "queue": "sales", "caller": "+1"})
        assert board.waiting("sales") == 1
        topics = [m["topic"] for m in await _drain(sub)]
        # The malformed-but-serialisable ones are still shown live; nothing else leaked.
        assert topics == ["agent.pause", "queue.connect", "queue.enter"]

    asyncio.run(scenario())


@pytest.mark.parametrize("at", [None, "yesterday", float("nan")])
def test_an_event_without_a_usable_time_takes_the_clock(at) -> None:
    async def scenario() -> None:
        board = LiveBoard()
        feed = LiveFeed(Hub(), board, clock=lambda: T0 + 50)
        payload = {"call_id": "c1", "queue": "support", "caller": "+1"}
        if at is not None:
            payload["at"] = at
        feed("queue.enter", payload)
        assert board.longest_wait("support", T0 + 60) == pytest.approx(10.0)

    asyncio.run(scenario())


class _Posts:
    """The webhook side as the alert loop sees it: what was posted (the sender itself is
    tested with a real receiver in test_webhooks.py)."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, dict]] = []

    def post(self, kind: str, payload) -> None:
        self.posted.append((kind, dict(payload)))


def test_alerts_are_raised_and_cleared_live_logged_and_posted(tmp_path) -> None:
    from appliance import eventlog
    from appliance.app import AlertLoop
    from appliance.reporting.alerts import AlertEngine, AlertRules, CallsWaitingRule
    from appliance.store import open_site_db

    db = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(db, "demo")
    now = [T0]

    async def scenario() -> None:
        hub, board = Hub(clock=lambda: now[0]), LiveBoard()
        posts = _Posts()
        alerts = AlertLoop(AlertEngine(AlertRules(calls_waiting=CallsWaitingRule(
                                                      above=1, clear_below=2, clear_after_s=0),
                                                  service_level=None, longest_wait=None)),
                           hub, db, poster=posts, clock=lambda: now[0])
        feed = LiveFeed(hub, board, alerts=alerts, clock=lambda: now[0])
        sub = hub.subscribe(Role.SUPERVISOR)
        agent = hub.subscribe(Role.AGENT, agent="1001")
        for i in (1, 2):
            now[0] = T0 + i
            feed("queue.enter", {"call_id": f"c{i}", "queue": "sales", "caller": "+1",
                                 "at": now[0]})
        # The rules are evaluated once, after the events of this pass of the loop.
        assert (alerts.active(), alerts.ticks) == ([], 0)
        await asyncio.sleep(0)
        assert alerts.ticks == 1
        [active] = alerts.active()
        assert (active["rule"], active["key"], active["cleared_at"]) == (
            "calls_waiting", "sales", None)
        now[0] = T0 + 5
        feed("queue.abandon", {"call_id": "c1", "queue": "sales", "wait_s": 4.0,
                               "at": now[0]})
        await asyncio.sleep(0)
        assert alerts.active() == []
        alerts.close()
        shown = [m for m in await _drain(sub) if m["topic"] == "alert"]
        assert [m["data"]["state"] for m in shown] == ["raised", "cleared"]
        assert shown[0]["data"]["message"].startswith("queue sales: 2 callers waiting")
        assert shown[1]["data"]["cleared_at"] == T0 + 5
        assert not [m for m in await _drain(agent) if m["topic"] == "alert"]
        assert [k for k, _ in posts.posted] == ["alert.raised", "alert.cleared"]

    try:
        asyncio.run(scenario())
        rows = db.conn.execute("SELECT kind, occurred_at, payload FROM events "
                               "WHERE kind LIKE 'alert.%' ORDER BY seq").fetchall()
    finally:
        db.close()
    assert [(k, at) for k, at, _ in rows] == [("alert.raised", T0 + 2),
                                               ("alert.cleared", T0 + 5)]
    assert json.loads(rows[1][2])["rule"] == "calls_waiting"


def test_alert_rules_run_once_per_loop_pass_and_the_timer_is_armed_once(tmp_path) -> None:
    from appliance import eventlog
    from appliance.app import AlertLoop
    from appliance.reporting.alerts import AlertEngine, AlertRules, LongestWaitRule
    from appliance.store import open_site_db

    db = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(db, "demo")
    now = [T0]

    async def scenario() -> None:
        hub = Hub(clock=lambda: now[0])
        rules = AlertRules(longest_wait=LongestWaitRule(above_s=30.0), service_level=None,
                           calls_waiting=None, agent_paused=None, long_call=None)
        alerts = AlertLoop(AlertEngine(rules), hub, db, clock=lambda: now[0])
        feed = LiveFeed(hub, LiveBoard(), alerts=alerts, clock=lambda: now[0])
        for i in range(50):  # a burst in one pass: one evaluation
            feed("queue.enter", {"call_id": f"c{i}", "queue": "sales", "caller": "+1",
                                 "at": T0 + i / 100})
        await asyncio.sleep(0)
        assert alerts.ticks == 1
        timer, due = alerts._timer, alerts._timer_due
        assert timer is not None and due == pytest.approx(T0 + 30.0)
        # A later caller does not move the earliest limit: the timer is left alone.
        feed("queue.enter", {"call_id": "late", "queue": "sales", "caller": "+1", "at": T0 + 5})
        await asyncio.sleep(0)
        assert alerts.ticks == 2 and alerts._timer is timer
        # The first caller answered: the limit moves to the next one, the timer with it.
        feed("queue.connect", {"call_id": "c0", "queue": "sales", "agent": "1001",
                               "wait_s": 1.0, "at": T0 + 1})
        await asyncio.sleep(0)
        assert alerts._timer is not timer
        assert alerts._timer_due == pytest.approx(T0 + 0.01 + 30.0)
        alerts.close()

    try:
        asyncio.run(scenario())
    finally:
        db.close()


def test_component_rows_only_on_changes_and_an_unclean_stop_is_closed_at_restart(
        tmp_path) -> None:
    from appliance import eventlog
    from appliance.app import ComponentLog
    from appliance.reporting.from_log import component_events_from_db
    from appliance.reporting.kpi import compute_kpis
    from appliance.sip.trunk import TrunkState, TrunkStateChanged
    from appliance.store import open_site_db

    db = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(db, "demo")
    now = [T0]
    try:
        first_db = open_site_db(tmp_path / "edgecc.db")
        components = ComponentLog(first_db, clock=lambda: now[0])
        assert components.recover() == []  # a new site: nothing to close
        components.set("appliance", True)
        components.set("appliance", True)  # the same state again: no row
        trunk = TrunkStateChanged
        components.on_trunk(trunk(TrunkState.UNKNOWN, TrunkState.UP, "200", 5.0))
        now[0] = T0 + 60
        components.on_trunk(trunk(TrunkState.UP, TrunkState.DOWN, "503", 65.0))
        components.on_trunk(trunk(TrunkState.DOWN, TrunkState.DOWN, "503", 66.0))
        now[0] = T0 + 90
        components.on_trunk(trunk(TrunkState.DOWN, TrunkState.UP, "200", 95.0))
        components.on_trunk("not a state change")  # registration changes say nothing here
        # A link online since before the appliance started is dated from its start.
        link = eventlog.LinkState("online", T0 - 500, 0, 0, 0.0, "", 0, 0, 0, T0)
        components.on_link(link)
        components.on_link(link)
        assert components.flush(10)
        rows = db.conn.execute("SELECT kind, occurred_at, payload FROM events "
                               "ORDER BY seq").fetchall()
        assert [(k, at, json.loads(p)["component"]) for k, at, p in rows] == [
            ("component.up", T0, "appliance"), ("component.up", T0, "trunk"),
            ("component.down", T0 + 60, "trunk"), ("component.up", T0 + 90, "trunk"),
            ("component.up", T0, "cloud-link")]
        assert json.loads(rows[2][2])["detail"] == "503"
        # Killed: no down rows. The next start closes what the log shows up at its last event.
        eventlog.append(db, "queue.enter", {"call_id": "c1", "queue": "q", "caller": "+1"},
                        occurred_at=T0 + 100)
        components.close(10)  # (the process died; nothing more was written)
        first_db.close()
        now[0] = T0 + 400
        second_db = open_site_db(tmp_path / "edgecc.db")
        restarted = ComponentLog(second_db, clock=lambda: now[0])
        assert sorted(restarted.recover()) == ["appliance", "cloud-link", "trunk"]
        restarted.set("appliance", True)
        now[0] = T0 + 500
        restarted.stop()
        restarted.on_trunk(trunk(TrunkState.DOWN, TrunkState.UP, "200", 501.0))  # stopping
        restarted.close(10)
        second_db.close()
        events = component_events_from_db(db)
        assert [(e.component, e.up) for e in events if e.at >= T0 + 400] == [
            ("appliance", True), ("appliance", False)]
        report = compute_kpis(events, end=T0 + 500)
        totals = {u.component: u for u in report.uptime if u.interval_start is None}
        # appliance: up 0-100, down 100-400 (killed), up 400-500.
        assert (totals["appliance"].up, totals["appliance"].down) == (200.0, 300.0)
        # trunk: up 0-60, down 60-90, up 90-100, down from 100 on.
        assert (totals["trunk"].up, totals["trunk"].down) == (70.0, 430.0)
        assert totals["trunk"].outages == 2
    finally:
        db.close()


def test_a_stopped_writer_loses_no_live_output_and_says_so(tmp_path, caplog) -> None:
    # The database side fails (the writer is stopped): the alert still reaches the hub and the
    # webhook, the component still changes state; both failures are logged, none is raised.
    from appliance import eventlog
    from appliance.app import AlertLoop, ComponentLog
    from appliance.reporting.alerts import AlertEngine, AlertRules, SecurityRule
    from appliance.store import open_site_db

    db = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(db, "demo")

    async def scenario() -> None:
        hub = Hub(clock=lambda: T0)
        sub = hub.subscribe(Role.SUPERVISOR)
        posts = _Posts()
        off = dict(service_level=None, calls_waiting=None, longest_wait=None,
                   agent_paused=None, long_call=None, link_down=None)
        alerts = AlertLoop(AlertEngine(AlertRules(security=SecurityRule(count=1), **off)),
                           hub, db, poster=posts, clock=lambda: T0)
        alerts._writer.close(1)
        components = ComponentLog(db, clock=lambda: T0)
        components.close(1)
        with caplog.at_level(logging.INFO, logger="edgecc.appliance"):
            alerts.feed("security.ban", {"source": "192.0.2.7"}, T0)
            await asyncio.sleep(0)
            components.set("trunk", False, detail="503")
        assert [m["data"]["rule"] for m in await _drain(sub)] == ["security"]
        assert [k for k, _ in posts.posted] == ["alert.raised"]
        assert components.states == {"trunk": False}
        assert "event=alert_write_failed rule=security" in caplog.text
        assert "event=component_write_failed component=trunk" in caplog.text

    try:
        asyncio.run(scenario())
        assert db.conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    finally:
        db.close()
