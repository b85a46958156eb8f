"""The agent desk on a real SQLite file: every transition of the presence table, the rows each
change writes (desk, audit, event log) in one transaction, committed in order by the desk's
writer thread without blocking the event loop, flushed at stop, whole after a kill -9;
persistence across a reopen, restore into a fresh router, the watchdog, and feature-code
parsing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api_agents import AgentsApi, template  # noqa: F401 -- the users' template fixture

from appliance import eventlog
from appliance.acd import model as m
from appliance.acd.desk import (
    DEFAULT_CODES,
    PRESENCE_TABLE,
    AgentDesk,
    DeskError,
    DisplayState,
    FeatureCode,
    FeatureCodes,
    Presence,
    RouterDeskService,
    desk_from_config,
    parse_feature_code,
    router_calls,
)
from appliance.acd.reference import ReferenceRouter
from appliance.acd.router import COMPILED, Router
from appliance.config import parse_site_yaml
from appliance.store import open_site_db

AGENTS = ("1001", "1002", "1003")
T0 = 1_700_000_000.0


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        self.seen.append((kind, payload))


_OPEN: list[AgentDesk] = []


@pytest.fixture(autouse=True)
def _close_desks() -> Iterator[None]:
    yield
    while _OPEN:
        shut(_OPEN.pop())


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "edgecc.db"


def open_desk(path: Path, on_event: Any = None, **kwargs: Any) -> AgentDesk:
    desk = AgentDesk(open_site_db(path), agents=AGENTS,
                     pause_reasons={"1": "break", "2": "lunch", "3": "training"},
                     dispositions={"1": "resolved", "2": "follow-up"}, site_id="demo",
                     on_event=on_event, **kwargs)
    _OPEN.append(desk)
    return desk


def shut(desk: AgentDesk) -> None:
    """Stop the desk as the appliance does: flush and stop the writer, close the connection."""
    if desk in _OPEN:
        _OPEN.remove(desk)
    assert desk.close(10)
    desk._db.close()


def rows(desk: AgentDesk, sql: str) -> list[tuple[Any, ...]]:
    """Rows as committed once every change so far is written."""
    assert desk.flush(10)
    return desk._db.conn.execute(sql).fetchall()


def counts(desk: AgentDesk) -> tuple[int, int, int]:
    return tuple(rows(desk, f"SELECT COUNT(*) FROM {t}")[0][0]  # type: ignore[return-value]
                 for t in ("agent_desk", "audit_log", "events"))


def go(desk: AgentDesk, agent: str, action: str, now: float, reason: str | None = None
       ) -> list[Any]:
    kw = {"actor": "api:sam", "source": "127.0.0.1:5000"}
    if action == "pause":
        return desk.pause(agent, reason, now, **kw)
    if action == "auto-pause":
        desk.auto_paused(agent, 3, now)
        return []
    return getattr(desk, action)(agent, now, **kw)


def reach(desk: AgentDesk, agent: str, presence: Presence, now: float) -> None:
    if presence is not Presence.LOGGED_OUT:
        desk.login(agent, now, actor="t", source="t")
    if presence is Presence.PAUSED:
        desk.pause(agent, "2", now, actor="t", source="t")


# ---------------------------------------------------------------------------- transitions

ACTIONS = ("login", "logout", "pause", "unpause", "auto-pause")


@pytest.mark.parametrize("start", list(Presence))
@pytest.mark.parametrize("action", ACTIONS)
def test_every_pair_of_the_table(db_path: Path, start: Presence, action: str) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    reach(desk, "1001", start, T0)
    before = counts(desk)
    seen_before = len(events.seen)
    step = PRESENCE_TABLE.get((start, action))
    if step is None:
        with pytest.raises(DeskError) as err:
            go(desk, "1001", action, T0 + 5, "1")
        assert err.value.status == 409 and "1001" in err.value.message
        assert counts(desk) == before and len(events.seen) == seen_before
        assert desk.presence("1001") is start
        return
    inputs = go(desk, "1001", action, T0 + 5, "1")
    after, _ = step
    assert desk.presence("1001") is after
    expected = {"login": [m.AgentLogin("1001")], "logout": [m.AgentLogout("1001")],
                "pause": [m.AgentPause("1001", "break")], "unpause": [m.AgentUnpause("1001")],
                "auto-pause": []}[action]
    assert inputs == expected
    # One desk row (upserted), one audit row, one event row: all written.
    assert counts(desk) == (1, before[1] + 1, before[2] + 1)
    [(presence, reason, since, actor, source)] = rows(
        desk, "SELECT presence, reason, since, actor, source FROM agent_desk")
    assert presence == after.value and since == T0 + 5
    kind = "agent.pause" if action == "auto-pause" else f"agent.{action}"
    [(ev_kind, payload, occurred)] = rows(
        desk, "SELECT kind, payload, occurred_at FROM events ORDER BY seq DESC LIMIT 1")
    assert ev_kind == kind and occurred == T0 + 5
    [(audit_actor, audit_action, detail)] = rows(
        desk, "SELECT actor, action, detail FROM audit_log ORDER BY id DESC LIMIT 1")
    assert audit_action == kind
    if action == "auto-pause":
        assert (reason, actor, source) == (m.AUTO_PAUSE_REASON, "router", "router")
        assert audit_actor == "router" and '"missed":3' in payload
    else:
        assert (actor, source) == ("api:sam", "127.0.0.1:5000")
        assert audit_actor == "api:sam" and "source=127.0.0.1:5000" in detail
        assert reason == ("break" if action == "pause" else None)
    assert f"before={start.value}" in detail and f"after={after.value}" in detail
    last_kind, last = events.seen[-1]
    assert last_kind == kind and last["agent"] == "1001" and last["at"] == T0 + 5
    # Told at once, before the commit: the event log's seq is not known yet.
    assert "seq" not in last and eventlog.last_seq(desk._db) == before[2] + 1


def test_pause_payload_names_the_reason_given_by_code_or_name(db_path: Path) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    desk.login("1002", T0, actor="a", source="s")
    assert desk.pause("1002", "lunch", T0 + 1, actor="a", source="s") == [
        m.AgentPause("1002", "lunch")]
    assert desk.pause("1002", "3", T0 + 2, actor="a", source="s") == [
        m.AgentPause("1002", "training")]
    assert desk.reason("1002") == "training"
    assert events.seen[-1] == ("agent.pause", {"agent": "1002", "reason": "training",
                                               "actor": "a", "source": "s",
                                               "at": T0 + 2})
    # No reason at all is a pause too.
    assert desk.pause("1002", None, T0 + 3, actor="a", source="s") == [m.AgentPause("1002", "")]
    assert desk.reason("1002") is None
    desk.unpause("1002", T0 + 4, actor="a", source="s")
    assert desk.reason("1002") is None


@pytest.mark.parametrize(("call", "status", "field"), [
    (lambda d: d.login("9999", T0, actor="a", source="s"), 404, "agent"),
    (lambda d: d.pause("1001", "7", T0, actor="a", source="s"), 400, "reason"),
    (lambda d: d.pause("1001", "auto-pause", T0, actor="a", source="s"), 400, "reason"),
    (lambda d: d.pause("1001", "break", T0, actor="a", source="s"), 409, None),
    (lambda d: d.disposition("1001", "c-1", "9", T0, actor="a", source="s"), 400, "code"),
    (lambda d: d.disposition("1001", "", "1", T0, actor="a", source="s"), 400, "call_id"),
    (lambda d: d.disposition("1001", "x" * 500, "1", T0, actor="a", source="s"), 400,
     "call_id"),
    (lambda d: d.disposition("nobody", "c-1", "1", T0, actor="a", source="s"), 404, "agent"),
    (lambda d: d.presence("nobody"), 404, "agent"),
])
def test_bad_input_is_refused_and_writes_nothing(db_path: Path, call: Any, status: int,
                                                 field: str | None) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    with pytest.raises(DeskError) as err:
        call(desk)
    assert err.value.status == status and err.value.field == field and err.value.message
    assert counts(desk) == (0, 0, 0) and events.seen == []


def test_disposition_is_audited_and_logged(db_path: Path) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    desk.disposition("1003", "call-42", "follow-up", T0, actor="phone:1003",
                     source="UDP:127.0.0.1:5070")
    assert counts(desk) == (0, 1, 1)
    kind, payload = events.seen[-1]
    assert kind == "agent.disposition"
    assert payload["call_id"] == "call-42" and payload["code"] == "2"
    assert payload["disposition"] == "follow-up" and payload["agent"] == "1003"


def test_ready_ends_wrap_up_unpauses_a_paused_agent_and_refuses_otherwise(
        db_path: Path) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    desk.login("1001", T0, actor="1001", source="sip:1001")
    # Available, in wrap-up: only the wrap-up ends (the presence row stays).
    assert desk.unpause("1001", T0 + 1, actor="1001", source="sip:1001",
                        in_wrap_up=True) == [m.WrapUpEnded("1001")]
    assert events.seen[-1] == ("agent.ready", {"agent": "1001", "actor": "1001",
                                               "source": "sip:1001", "at": T0 + 1})
    # Paused, in wrap-up: unpaused, then the wrap-up ends.
    desk.pause("1001", "1", T0 + 2, actor="1001", source="sip:1001")
    assert desk.unpause("1001", T0 + 3, actor="1001", source="sip:1001", in_wrap_up=True) == [
        m.AgentUnpause("1001"), m.WrapUpEnded("1001")]
    assert desk.view("1001", None)["presence"] == "available"
    # Neither paused nor in wrap-up, or logged out: refused, nothing written.
    assert desk.flush(10)
    before = counts(desk)
    with pytest.raises(DeskError) as refused:
        desk.unpause("1001", T0 + 4, actor="1001", source="sip:1001")
    assert refused.value.status == 409
    with pytest.raises(DeskError) as logged_out:
        desk.unpause("1002", T0 + 4, actor="1002", source="sip:1002", in_wrap_up=True)
    assert logged_out.value.status == 409
    assert desk.flush(10) and counts(desk) == before


def test_a_failing_write_rolls_back_all_three_rows(db_path: Path, caplog: Any) -> None:
    desk = open_desk(db_path)
    conn = desk._db.conn
    conn.execute("CREATE TRIGGER no_audit BEFORE INSERT ON audit_log "
                 "BEGIN SELECT RAISE(ABORT, 'audit refused'); END")
    desk.login("1001", T0, actor="a", source="s")
    # The desk row and the event were written before the audit row failed: both rolled back.
    assert counts(desk) == (0, 0, 0)
    assert (desk.writer.failed, desk.writer.committed) == (1, 0)
    assert "event=agent_desk_write_failed" in caplog.text and "audit refused" in caplog.text
    conn.execute("DROP TRIGGER no_audit")
    # The writer goes on with the next change.
    desk.pause("1001", "1", T0 + 1, actor="a", source="s")
    assert counts(desk) == (1, 1, 1)
    assert rows(desk, "SELECT presence, reason FROM agent_desk") == [("paused", "break")]


def test_a_failing_callback_changes_nothing(db_path: Path) -> None:
    def broken(kind: str, payload: dict[str, Any]) -> None:
        raise RuntimeError("listener down")

    desk = open_desk(db_path, broken)
    assert desk.login("1001", T0, actor="a", source="s") == [m.AgentLogin("1001")]
    assert desk.presence("1001") is Presence.AVAILABLE


# ---------------------------------------------------------------------------- persistence


def test_presence_survives_a_reopen_and_restores_the_router(db_path: Path) -> None:
    desk = open_desk(db_path)
    desk.login("1001", T0, actor="a", source="s")
    desk.login("1002", T0 + 1, actor="a", source="s")
    desk.pause("1002", "2", T0 + 2, actor="a", source="s")
    desk.login("1003", T0 + 3, actor="a", source="s")
    desk.logout("1003", T0 + 4, actor="a", source="s")
    shut(desk)

    again = open_desk(db_path)
    assert [again.presence(a) for a in AGENTS] == [
        Presence.AVAILABLE, Presence.PAUSED, Presence.LOGGED_OUT]
    assert again.reason("1002") == "lunch"
    assert again.view("1002", None)["since"] == T0 + 2
    inputs = again.restore(T0 + 10)
    assert inputs == [m.AgentLogin("1001"), m.AgentLogin("1002"), m.AgentPause("1002", "lunch")]
    router = ReferenceRouter(router_config())
    for item in inputs:
        router.handle(item, 1.0)
    assert router.agent_view("1001").presence == "ready"
    assert router.agent_view("1002").presence == "paused"
    assert router.agent_view("1002").pause_reason == "lunch"
    assert router.agent_view("1003").presence == "logged-out"
    for agent in AGENTS:
        assert again.view(agent, router.agent_view(agent))["in_sync"]


def test_agents_no_longer_configured_are_left_alone(db_path: Path) -> None:
    desk = open_desk(db_path)
    desk.login("1003", T0, actor="a", source="s")
    shut(desk)
    fewer = AgentDesk(open_site_db(db_path), agents=("1001",), site_id="demo")
    _OPEN.append(fewer)
    assert fewer.restore(T0) == []
    with pytest.raises(DeskError):
        fewer.presence("1003")


# ---------------------------------------------------------------------------- router, view


def router_config(wrap_up: float = 0.0) -> m.RouterConfig:
    return m.RouterConfig(
        queues=(m.QueueConfig("sales", tuple(m.Member(a) for a in AGENTS),
                              strategy=m.Strategy.LINEAR, wrap_up=wrap_up,
                              callback_retries=0),),
        agents=tuple(m.AgentConfig(a) for a in AGENTS), auto_pause_after=1)


def test_view_shows_what_the_router_is_doing(db_path: Path) -> None:
    desk = open_desk(db_path)
    router = ReferenceRouter(router_config(wrap_up=30))
    service = RouterDeskService(desk, router, clock=lambda: 5.0)

    def state(agent: str) -> str:
        return desk.view(agent, service.router_view(agent))["state"]

    assert state("1001") == DisplayState.LOGGED_OUT.value
    service.apply(desk.login("1001", T0, actor="a", source="s"))
    assert state("1001") == "available"
    router.handle(m.CallerJoin("c1", "sales"), 6.0)
    assert state("1001") == "ringing"
    router.handle(m.OfferAccepted("c1", "1001"), 7.0)
    assert state("1001") == "on-call"
    view = desk.view("1001", router.agent_view("1001"))
    assert view["calls"] == 1 and view["presence"] == "available"
    router.handle(m.CallEnded("c1", "1001"), 8.0)
    assert state("1001") == "wrap-up"
    router.handle(m.WrapUpEnded("1001"), 9.0)
    service.clock = lambda: 10.0
    service.apply(desk.pause("1001", "1", T0 + 1, actor="a", source="s"))
    assert state("1001") == "paused"
    assert desk.view("1001", router.agent_view("1001"))["reason"] == "break"
    assert service.router_view("nobody") is None


def test_auto_pause_from_the_router_keeps_desk_and_router_in_step(db_path: Path) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    router = ReferenceRouter(router_config())
    decisions: list[Any] = []
    service = RouterDeskService(desk, router, clock=lambda: 1.0, on_decisions=decisions.extend)
    service.apply(desk.login("1001", T0, actor="a", source="s"))
    router.handle(m.CallerJoin("c1", "sales"), 2.0)
    out = router.handle(m.OfferTimeout("c1", "1001"), 3.0)
    [auto] = [d for d in out if isinstance(d, m.AutoPause)]
    desk.auto_paused(auto.agent, auto.missed, T0 + 3)
    view = desk.view("1001", router.agent_view("1001"))
    assert view["state"] == "paused" and view["reason"] == m.AUTO_PAUSE_REASON
    assert view["in_sync"] and view["actor"] == "router"
    assert events.seen[-1][0] == "agent.pause"
    assert events.seen[-1][1]["reason"] == m.AUTO_PAUSE_REASON
    # Unpausing through the desk reaches the router.
    service.clock = lambda: 4.0
    service.apply(desk.unpause("1001", T0 + 4, actor="a", source="s"))
    assert router.agent_view("1001").presence == "ready"
    assert any(isinstance(d, m.Offer) for d in decisions)  # c1 offered again


# ---------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize("router_class", [ReferenceRouter, Router],
                         ids=["reference", "compiled" if COMPILED else "fallback"])
def test_restore_with_an_agent_on_a_call_and_the_watchdog(db_path: Path,
                                                          router_class: Any) -> None:
    desk = open_desk(db_path, watchdog_grace=10.0)
    router = router_class(router_config())
    service = RouterDeskService(desk, router, clock=lambda: 1.0)
    service.apply(desk.login("1001", T0, actor="a", source="s"))
    service.apply(desk.login("1002", T0, actor="a", source="s"))
    router.handle(m.CallerJoin("c1", "sales"), 2.0)
    router.handle(m.OfferAccepted("c1", "1001"), 3.0)
    router.handle(m.CallerJoin("c2", "sales"), 4.0)  # rings at 1002
    shut(desk)

    # The appliance restarts its desk; the router still holds c1 at 1001 and c2 at 1002, but
    # call control lost c1 (no live call explains it) and still knows c2.
    again = open_desk(db_path, watchdog_grace=10.0)
    assert again.restore(T0 + 5) == [m.AgentLogin("1001"), m.AgentLogin("1002")]
    views = {a: router.agent_view(a) for a in AGENTS}
    live = {"1002": {"c2"}}
    held = router_calls(router.snapshot())
    assert held == {"1001": {"c1": "on-call"}, "1002": {"c2": "ringing"}}
    audits = counts(again)[1]
    # Within the grace period nothing is cleared.
    assert again.watchdog(views, live, T0 + 10, held=held) == []
    assert again.watchdog(views, live, T0 + 15, held=held) == []
    assert counts(again)[1] == audits
    # Once it has stayed unexplained for the grace period, it is cleared and audited.
    cleared = again.watchdog(views, live, T0 + 20, held=held)
    assert cleared == [m.CallEnded("c1", "1001")]
    [(actor, action, detail)] = rows(
        again, "SELECT actor, action, detail FROM audit_log ORDER BY id DESC LIMIT 1")
    assert (actor, action) == ("watchdog", "agent.watchdog")
    assert "call_id=c1" in detail and "cleared=on-call" in detail
    for item in cleared:
        router.handle(item, 5.0)
    assert router.agent_view("1001").interactions == 0
    assert again.view("1001", router.agent_view("1001"))["state"] == "available"
    # c2 is explained by a live call: still ringing.
    assert router.agent_view("1002").ringing == 1


def test_watchdog_clears_ghost_offers_and_callbacks_without_missing(db_path: Path) -> None:
    desk = open_desk(db_path, watchdog_grace=0.0)
    router = ReferenceRouter(router_config())
    service = RouterDeskService(desk, router, clock=lambda: 1.0)
    service.apply(desk.login("1001", T0, actor="a", source="s"))
    router.handle(m.CallerJoin("c1", "sales"), 2.0)
    cleared = desk.watchdog({"1001": router.agent_view("1001")}, {}, T0,
                            held=router_calls(router.snapshot()))
    assert cleared == [m.OfferRejected("c1", "1001")]
    router.handle(cleared[0], 3.0)
    # Not a missed offer: auto_pause_after=1 would have paused the agent.
    assert router.agent_view("1001").presence == "ready"
    assert router.agent_view("1001").missed == 0
    # A callback being dialled for the agent, unknown to call control.
    router2 = ReferenceRouter(router_config())
    router2.handle(m.CallerJoin("c9", "sales"), 1.0)
    router2.handle(m.CallbackRequested("c9", "+15550199"), 1.0)
    router2.handle(m.AgentLogin("1001"), 2.0)
    held = router_calls(router2.snapshot())
    assert held == {"1001": {"c9": "dialling"}}
    assert desk.watchdog({}, {}, T0 + 1, held=held) == [m.CallbackResult("c9", False)]


def test_watchdog_without_the_router_calls_only_reports(db_path: Path) -> None:
    desk = open_desk(db_path)
    view = m.AgentView("1001", "ready", "", False, 1, 0, 0, 0.0)
    assert desk.watchdog({"1001": view}, {}, T0) == []
    assert counts(desk) == (0, 0, 0)


def test_watchdog_forgets_a_suspect_that_comes_back(db_path: Path) -> None:
    desk = open_desk(db_path, watchdog_grace=10.0)
    held = {"1001": {"c1": "on-call"}}
    assert desk.watchdog({}, {}, T0, held=held) == []
    # Explained at the next run (call control caught up): the clock starts again after.
    assert desk.watchdog({}, {"1001": {"c1"}}, T0 + 5, held=held) == []
    assert desk.watchdog({}, {}, T0 + 12, held=held) == []
    assert desk.watchdog({}, {}, T0 + 22, held=held) == [m.CallEnded("c1", "1001")]


def test_stray_callers_are_abandoned_after_the_grace_and_audited(db_path: Path) -> None:
    desk = open_desk(db_path, watchdog_grace=10.0)
    router = ReferenceRouter(router_config())
    RouterDeskService(desk, router, clock=lambda: 1.0).apply(
        desk.login("1001", T0, actor="a", source="s"))
    # "gone" rings 1001 and "later" waits behind it; call control carries only "later".
    router.handle(m.CallerJoin("gone", "sales"), 2.0)
    router.handle(m.CallerJoin("later", "sales"), 2.0)
    queued = [c.call for c in router.snapshot()["callers"]]
    assert queued == ["gone", "later"]
    assert desk.stray_callers(queued, {"later"}, T0) == []
    assert desk.stray_callers(queued, {"later"}, T0 + 9) == []
    # Explained again (call control caught up) forgets the suspect: its grace starts over.
    assert desk.stray_callers(queued, {"gone", "later"}, T0 + 9.5) == []
    assert desk.stray_callers(queued, {"later"}, T0 + 15) == []
    cleared = desk.stray_callers(queued, {"later"}, T0 + 25)
    assert cleared == [m.CallerAbandon("gone")]
    # The router lets go: 1001's ringing offer goes to the living caller.
    decisions = router.handle(cleared[0], 3.0)
    assert m.Offer("later", ("1001",), "sales") in decisions
    assert router.waiting("sales") == ("later",)
    assert desk.stray_callers(["later"], {"later"}, T0 + 40) == []
    assert desk.flush(10)
    assert rows(desk, "SELECT actor, action, detail FROM audit_log WHERE action = "
                      "'queue.watchdog'") == [
        ("watchdog", "queue.watchdog", "call_id=gone cleared=queued source=watchdog")]


# ---------------------------------------------------------------------------- feature codes


@pytest.mark.parametrize(("digits", "expected"), [
    ("*70", FeatureCode("login", None)),
    ("*71", FeatureCode("logout", None)),
    ("*72", FeatureCode("pause", None)),
    ("*722", FeatureCode("pause", "2")),
    ("*73", FeatureCode("unpause", None)),
    ("*741", FeatureCode("disposition", "1")),
    ("*801002", FeatureCode("listen", "1002")),
    ("*811002", FeatureCode("whisper", "1002")),
    ("*821002", FeatureCode("barge", "1002")),
    ("*1", FeatureCode("record-pause", None)),
    ("*2", FeatureCode("record-resume", None)),
    ("1002", None),
    ("15550100", None),
    ("", None),
    ("*9", None),
    ("#", None),
])
def test_default_feature_codes(digits: str, expected: FeatureCode | None) -> None:
    assert parse_feature_code(digits) == expected


@pytest.mark.parametrize(("digits", "field"), [
    ("*729", "reason"),      # unknown pause reason
    ("*749", "code"),        # unknown disposition
    ("*74", "digits"),       # disposition needs a code
    ("*80", "digits"),       # listen needs an agent
    ("*70123", "digits"),    # login takes nothing after it
    ("*12", "digits"),       # nor does record pause
    ("*72#", "digits"),      # arguments are digits
    ("*7x", "digits"),       # not DTMF at all
    ("*" * 40, "digits"),    # over the limit
])
def test_codes_with_garbage_are_refused(digits: str, field: str) -> None:
    with pytest.raises(DeskError) as err:
        parse_feature_code(digits)
    assert err.value.status == 400 and err.value.field == field


def test_configured_codes_and_longest_match() -> None:
    codes = FeatureCodes(login="*7", pause="*72", pause_reasons=("5",), dispositions=())
    assert parse_feature_code("*7", codes) == FeatureCode("login", None)
    assert parse_feature_code("*725", codes) == FeatureCode("pause", "5")
    with pytest.raises(DeskError):
        parse_feature_code("*721", codes)
    with pytest.raises(DeskError):
        parse_feature_code("*741", codes)  # no disposition configured
    with pytest.raises(DeskError) as err:
        FeatureCodes(login="*71")
    assert err.value.field == "logout"
    with pytest.raises(DeskError):
        FeatureCodes(barge="*8a")


HA1 = f"ha1_md5: '{'0' * 32}', ha1_sha256: '{'0' * 64}'"


def test_desk_from_site_yaml(db_path: Path) -> None:
    config = parse_site_yaml(
        "sip:\n  accounts:\n"
        f"    - {{user: '1001', {HA1}}}\n"
        f"    - {{user: '2001', {HA1}, role: supervisor}}\n"
        "agents:\n  feature_codes: {login: '*90', record-pause: '*5'}\n"
        "  pause_reasons: {'4': coaching}\n  dispositions: {'7': sale}\n"
        "  watchdog_grace: 3\n")
    desk, codes = desk_from_config(open_site_db(db_path), config)
    _OPEN.append(desk)
    assert desk.agents == ("1001",)
    assert desk.watchdog_grace == 3
    assert parse_feature_code("*90", codes) == FeatureCode("login", None)
    assert parse_feature_code("*5", codes) == FeatureCode("record-pause", None)
    assert parse_feature_code("*724", codes) == FeatureCode("pause", "4")
    assert parse_feature_code("*747", codes) == FeatureCode("disposition", "7")
    desk.login("1001", T0, actor="a", source="s")
    assert desk.pause("1001", "4", T0, actor="a", source="s") == [
        m.AgentPause("1001", "coaching")]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789*#ABCDx ", max_size=40))
def test_parsing_random_digits_never_raises_anything_but_desk_error(digits: str) -> None:
    try:
        result = parse_feature_code(digits)
    except DeskError as exc:
        assert exc.status == 400 and exc.message
    else:
        assert result is None or result.action in {
            "login", "logout", "pause", "unpause", "disposition", "listen", "whisper", "barge",
            "record-pause", "record-resume"}
        if result is None:
            assert not any(digits.startswith(getattr(DEFAULT_CODES, f)) for f in (
                "login", "logout", "pause", "unpause", "disposition", "listen", "whisper",
                "barge", "record_pause", "record_resume"))


def test_an_agent_in_no_queue_has_a_presence_but_no_routing(db_path: Path) -> None:
    desk = AgentDesk(open_site_db(db_path), agents=(*AGENTS, "1009"), site_id="demo")
    _OPEN.append(desk)
    router = ReferenceRouter(router_config())
    service = RouterDeskService(desk, router, clock=lambda: 1.0)
    service.apply(desk.login("1009", T0, actor="a", source="s"))
    service.apply(desk.login("1001", T0, actor="a", source="s"))
    assert desk.view("1009", service.router_view("1009"))["state"] == "available"
    assert router.agent_view("1001").presence == "ready"


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(AGENTS),
                          st.sampled_from(("login", "logout", "pause", "unpause")),
                          st.sampled_from((None, "1", "lunch"))), max_size=25))
def test_desk_and_router_agree_on_any_sequence(steps: list[tuple[str, str, str | None]]
                                               ) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "edgecc.db"
        desk = open_desk(path)
        router = ReferenceRouter(router_config())
        accepted = 0
        for n, (agent, action, reason) in enumerate(steps):
            try:
                inputs = go(desk, agent, action, T0 + n, reason)
            except DeskError as exc:
                assert exc.status == 409
                # The router refuses the same thing (its table agrees with the desk's).
                kind = {"login": m.AgentLogin(agent), "logout": m.AgentLogout(agent),
                        "pause": m.AgentPause(agent), "unpause": m.AgentUnpause(agent)}[action]
                with pytest.raises(m.LocalProtocolError):
                    router.handle(kind, float(n))
                continue
            accepted += 1
            for item in inputs:
                router.handle(item, float(n))
            assert desk.view(agent, router.agent_view(agent))["in_sync"]
        assert counts(desk)[1:] == (accepted, accepted)
        shut(desk)
        again = open_desk(path)
        fresh = ReferenceRouter(router_config())
        for item in again.restore(T0 + 100):
            fresh.handle(item, 1.0)
        for agent in AGENTS:
            assert fresh.agent_view(agent).presence == router.agent_view(agent).presence
            assert fresh.agent_view(agent).pause_reason == router.agent_view(agent).pause_reason
        shut(again)


def test_desk_audit_rows_extend_the_hash_chain(db_path: Path) -> None:
    from appliance.audit import verify

    desk = open_desk(db_path)
    for step, action in enumerate(("login", "pause", "unpause", "logout")):
        go(desk, "1001", action, T0 + step, reason="1" if action == "pause" else None)
    assert desk.flush(10)
    report = verify(sqlite3.connect(db_path))
    assert report.ok, report.problem
    assert report.rows >= 4 and report.legacy == 0


# ---------------------------------------------------------------------------- the writer thread


class WriteLock:
    """Another connection holding the database's write lock (``BEGIN IMMEDIATE``), as a
    backup or the edge agent may: the desk's writer waits for it (busy timeout)."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path, timeout=5, isolation_level=None)
        self.conn.execute("BEGIN IMMEDIATE")

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        self.conn.close()


def committed(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """What another reader sees committed now (WAL readers never wait for the writer)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_a_change_does_not_block_the_event_loop(db_path: Path) -> None:
    events = Events()
    desk = open_desk(db_path, events)
    lock = WriteLock(db_path)
    try:
        async def scenario() -> tuple[list[str], Presence, int, list[tuple[Any, ...]]]:
            order: list[str] = []
            ran = asyncio.Event()

            def change() -> None:
                desk.login("1001", T0, actor="api:sam", source="127.0.0.1:5000")
                order.append("changed")
                asyncio.get_running_loop().call_soon(other)

            def other() -> None:
                order.append("other callback")
                ran.set()

            asyncio.get_running_loop().call_soon(change)
            await asyncio.wait_for(ran.wait(), 5)
            # The writer is still held by the lock: nothing is committed, yet the loop ran on
            # and the desk already shows the change.
            return (order, desk.presence("1001"), desk.writer.pending,
                    committed(db_path, "SELECT * FROM agent_desk"))

        order, presence, pending, rows_now = asyncio.run(scenario())
        assert order == ["changed", "other callback"]
        assert presence is Presence.AVAILABLE and pending == 1 and rows_now == []
        assert events.seen[-1][0] == "agent.login"
    finally:
        lock.release()
    assert desk.flush(10)
    assert committed(db_path, "SELECT agent, presence FROM agent_desk") == [("1001", "available")]
    assert desk.writer.pending == 0 and desk.writer.committed == 1


def test_changes_commit_in_the_order_they_were_made(db_path: Path) -> None:
    from appliance.audit import verify

    desk = open_desk(db_path, watchdog_grace=0.0)
    lock = WriteLock(db_path)  # everything queues up behind the lock, then drains in order
    try:
        desk.login("1001", T0, actor="a", source="s")
        desk.login("1002", T0 + 1, actor="a", source="s")
        desk.pause("1001", "2", T0 + 2, actor="a", source="s")
        desk.disposition("1002", "call-7", "1", T0 + 3, actor="a", source="s")
        desk.watchdog({}, {}, T0 + 4, held={"1002": {"call-8": "on-call"}})
        desk.unpause("1001", T0 + 5, actor="a", source="s")
        desk.logout("1002", T0 + 6, actor="a", source="s")
        assert desk.writer.pending == 7
    finally:
        lock.release()
    expected = [("agent.login", "a"), ("agent.login", "a"), ("agent.pause", "a"),
                ("agent.disposition", "a"), ("agent.watchdog", "watchdog"),
                ("agent.unpause", "a"), ("agent.logout", "a")]
    audit = rows(desk, "SELECT action, actor FROM audit_log ORDER BY id")
    assert audit == expected
    events = rows(desk, "SELECT kind, occurred_at, payload FROM events ORDER BY seq")
    assert [(k, at) for k, at, _ in events] == [
        ("agent.login", T0), ("agent.login", T0 + 1), ("agent.pause", T0 + 2),
        ("agent.disposition", T0 + 3), ("agent.unpause", T0 + 5), ("agent.logout", T0 + 6)]
    assert json.loads(events[2][2])["reason"] == "lunch"
    assert rows(desk, "SELECT agent, presence FROM agent_desk ORDER BY agent") == [
        ("1001", "available"), ("1002", "logged-out")]
    report = verify(sqlite3.connect(db_path))
    assert report.ok and report.rows == 7, report.problem


def test_close_flushes_everything_and_then_refuses(db_path: Path) -> None:
    desk = open_desk(db_path)
    lock = WriteLock(db_path)
    for agent in AGENTS:
        desk.login(agent, T0, actor="a", source="s")
    desk.pause("1003", "3", T0 + 1, actor="a", source="s")
    closing = threading.Thread(target=lambda: setattr(closing, "done", desk.close(10)))
    closing.start()
    # close() waits for the writer; nothing is committed while the lock is held.
    assert committed(db_path, "SELECT COUNT(*) FROM agent_desk") == [(0,)]
    lock.release()
    closing.join(15)
    assert not closing.is_alive() and closing.done  # type: ignore[attr-defined]
    assert committed(db_path, "SELECT agent, presence, reason FROM agent_desk ORDER BY agent") == [
        ("1001", "available", None), ("1002", "available", None), ("1003", "paused", "training")]
    assert committed(db_path, "SELECT COUNT(*) FROM events") == [(4,)]
    # Stopped: a change is refused whole (nothing in memory, nothing written).
    with pytest.raises(DeskError) as err:
        desk.logout("1001", T0 + 2, actor="a", source="s")
    assert err.value.status == 503
    assert desk.presence("1001") is Presence.AVAILABLE
    shut(desk)


def test_a_close_that_times_out_says_so_and_loses_only_what_waited(db_path: Path,
                                                                   caplog: Any) -> None:
    desk = open_desk(db_path)
    started, release = threading.Event(), threading.Event()

    def in_progress(conn: Any, db: Any) -> None:
        # A change the writer is busy with (its batch is open) while the others wait.
        conn.execute("INSERT INTO agent_desk (agent, presence, reason, since, actor, source) "
                     "VALUES ('1003', 'available', NULL, 1.0, 'a', 's')")
        started.set()
        assert release.wait(15)

    desk.writer.write("in-progress", in_progress)
    assert started.wait(10)
    try:
        desk.login("1001", T0, actor="a", source="s")  # these two wait behind it
        desk.login("1002", T0, actor="a", source="s")
        assert desk.close(0.2) is False
        assert "event=agent_desk_stop_unflushed" in caplog.text and "pending=3" in caplog.text
        assert desk.flush(0) is False
    finally:
        release.set()
    assert desk.writer.join(15)  # the change in progress completes
    assert committed(db_path, "SELECT agent FROM agent_desk") == [("1003",)]
    assert committed(db_path, "SELECT COUNT(*) FROM audit_log") == [(0,)]
    _OPEN.remove(desk)
    desk.writer.db.close()
    desk._db.close()


def test_too_many_waiting_changes_are_refused_whole(db_path: Path) -> None:
    events = Events()
    desk = open_desk(db_path, events, max_pending=2)
    lock = WriteLock(db_path)
    try:
        desk.login("1001", T0, actor="a", source="s")
        desk.login("1002", T0, actor="a", source="s")
        with pytest.raises(DeskError) as err:
            desk.login("1003", T0, actor="a", source="s")
        assert err.value.status == 503 and "waiting" in err.value.message
        with pytest.raises(DeskError):
            desk.disposition("1001", "c-1", "1", T0, actor="a", source="s")
        assert desk.presence("1003") is Presence.LOGGED_OUT
        assert [k for k, _ in events.seen] == ["agent.login", "agent.login"]
    finally:
        lock.release()
    assert desk.flush(10)
    desk.login("1003", T0 + 1, actor="a", source="s")  # room again
    assert counts(desk) == (3, 3, 3)


CRASH_SCRIPT = r"""
import sys, time
from appliance.acd.desk import AgentDesk
from appliance.store import open_site_db
desk = AgentDesk(open_site_db(sys.argv[1]), agents=("1001", "1002", "1003"), site_id="demo")
print("ready", flush=True)
for n in range(100000):
    agent = ("1001", "1002", "1003")[n % 3]
    if desk.presence(agent).value == "logged-out":
        desk.login(agent, 1.0 + n, actor="a", source="s")
    else:
        desk.logout(agent, 1.0 + n, actor="a", source="s")
    if desk.writer.pending > 50:
        desk.flush(5)  # keep the queue short: the kill lands with changes in flight
"""


def test_a_kill_mid_write_leaves_every_change_whole(db_path: Path) -> None:
    from appliance.audit import verify

    open_site_db(db_path).close()
    proc = subprocess.Popen([sys.executable, "-c", CRASH_SCRIPT, str(db_path)],
                            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        deadline = time.monotonic() + 30
        while committed(db_path, "SELECT COUNT(*) FROM events")[0][0] < 20:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)  # polling the committed rows of another process
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)
    # Every committed change has its three rows; the desk rows match the last event per agent.
    events = committed(db_path, "SELECT kind, payload FROM events ORDER BY seq")
    audit = committed(db_path, "SELECT action FROM audit_log ORDER BY id")
    assert len(events) >= 20 and [(k,) for k, _ in events] == audit
    last = {json.loads(p)["agent"]: k for k, p in events}
    desk_rows = dict(committed(db_path, "SELECT agent, presence FROM agent_desk"))
    assert desk_rows == {a: "available" if k == "agent.login" else "logged-out"
                         for a, k in last.items()}
    report = verify(sqlite3.connect(db_path))
    assert report.ok, report.problem
    again = open_desk(db_path)
    assert {a: again.presence(a).value for a in desk_rows} == desk_rows


def test_calls_held_at_a_crash_are_cleared_and_audited_at_restore(db_path: Path) -> None:
    from appliance.audit import verify

    desk = open_desk(db_path, watchdog_grace=10.0)
    desk.login("1001", T0, actor="a", source="s")
    desk.login("1002", T0, actor="a", source="s")
    held = {"1001": {"c1": "on-call"}, "1002": {"c2": "ringing"}}
    live = {"1001": {"c1"}, "1002": {"c2"}}
    assert desk.watchdog({}, live, T0 + 1, held=held) == []
    assert rows(desk, "SELECT agent, call_id, kind, since FROM agent_desk_calls ORDER BY agent"
                ) == [("1001", "c1", "on-call", T0 + 1), ("1002", "c2", "ringing", T0 + 1)]
    # c2 is answered by 1002, c1 ends: the rows follow (c2's since is when it became a call).
    held = {"1002": {"c2": "on-call"}}
    assert desk.watchdog({}, {"1002": {"c2"}}, T0 + 2, held=held) == []
    assert rows(desk, "SELECT agent, call_id, kind, since FROM agent_desk_calls") == [
        ("1002", "c2", "on-call", T0 + 2)]
    audits = counts(desk)[1]
    # Unchanged: nothing written.
    assert desk.watchdog({}, {"1002": {"c2"}}, T0 + 3, held=held) == []
    assert desk.writer.committed == 4 and counts(desk)[1] == audits
    # The appliance dies with c2 up; at the next start the desk clears it.
    shut(desk)
    again = open_desk(db_path)
    assert again.restore(T0 + 60) == [m.AgentLogin("1001"), m.AgentLogin("1002")]
    [(actor, action, detail)] = rows(
        again, "SELECT actor, action, detail FROM audit_log ORDER BY id DESC LIMIT 1")
    assert (actor, action) == ("watchdog", "agent.watchdog")
    assert "agent=1002" in detail and "call_id=c2" in detail and "cleared=on-call" in detail
    assert "source=restart" in detail
    assert rows(again, "SELECT * FROM agent_desk_calls") == []
    # A second start finds nothing more to clear.
    shut(again)
    third = open_desk(db_path)
    third.restore(T0 + 120)
    assert counts(third)[1] == audits + 1
    assert verify(sqlite3.connect(db_path)).ok


def test_the_api_answers_a_change_once_its_rows_are_committed(
        tmp_path: Path, template: tuple[Path, dict[str, str]]) -> None:  # noqa: F811
    # The desk's writer is held (a job of its own in progress) while a supervisor logs 1002
    # in through the API: the answer comes only after the writer let go and committed the
    # change, and the rows are in the file when it arrives (read by another connection, with
    # no flush). The desk has a database file of its own here, so that the API's own audit
    # row (users' file) is not held up with it.
    api = AgentsApi(tmp_path, template)
    desk_path = tmp_path / "desk.db"
    desk = AgentDesk(open_site_db(desk_path), agents=("1001", "1002"), site_id="demo")
    api.service = RouterDeskService(desk, api.router, clock=api.tick,
                                    on_decisions=api.decisions.extend)
    gate_open, release = threading.Event(), threading.Event()
    try:
        def hold(_conn: Any, _db: Any) -> None:
            gate_open.set()
            assert release.wait(30)

        desk.writer.write("held", hold)
        assert gate_open.wait(10)
        seen: dict[str, Any] = {}

        def log_in() -> None:
            reply = api.as_("sam", "POST", "/api/agents/1002/login")
            seen["status"] = reply.status
            seen["rows"] = committed(desk_path, "SELECT agent, presence FROM agent_desk")
            seen["events"] = committed(desk_path, "SELECT kind FROM events")

        client = threading.Thread(target=log_in)
        client.start()
        try:
            deadline = time.monotonic() + 15
            while desk.writer.pending < 2:  # the login's rows queued behind the held job
                assert time.monotonic() < deadline and client.is_alive()
                time.sleep(0.01)  # polling another thread's progress
            # No answer while its rows wait (an answer given before the commit would be here
            # well within this wait; with the commit awaited it cannot come at all).
            client.join(0.5)
            assert client.is_alive() and seen == {}
        finally:
            release.set()
        client.join(30)
        assert seen == {"status": 200, "rows": [("1002", "available")],
                        "events": [("agent.login",)]}
    finally:
        release.set()
        desk.close()
        desk._db.close()
        api.close()


def test_the_api_says_so_when_a_change_cannot_be_committed(
        tmp_path: Path, template: tuple[Path, dict[str, str]]) -> None:  # noqa: F811
    api = AgentsApi(tmp_path, template)
    try:
        conn = sqlite3.connect(tmp_path / "edgecc.db")
        conn.execute("CREATE TRIGGER no_desk BEFORE INSERT ON agent_desk "
                     "BEGIN SELECT RAISE(ABORT, 'disk refused'); END")
        conn.commit()
        reply = api.as_("sam", "POST", "/api/agents/1002/login")
        assert reply.status == 503 and "could not be recorded" in reply.body["error"]
        assert committed(tmp_path / "edgecc.db", "SELECT COUNT(*) FROM events") == [(0,)]
        conn.execute("DROP TRIGGER no_desk")
        conn.commit()
        conn.close()
        # The next change commits and is answered as usual.
        assert api.as_("sam", "POST", "/api/agents/1002/pause").status == 200
        assert committed(tmp_path / "edgecc.db", "SELECT kind FROM events") == [
            ("agent.pause",)]
    finally:
        api.close()
