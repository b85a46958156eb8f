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
        [active] = alerts.active()
        assert (active["rule"], active["key"], active["cleared_at"]) == (
            "calls_waiting", "sales", None)
        now[0] = T0 + 5
        feed("queue.abandon", {"call_id": "c1", "queue": "sales", "wait_s": 4.0,
                               "at": now[0]})
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
