"""Feature codes dialled from an agent's phone drive the agent desk and the ACD router.

With a desk, registration no longer logs an agent in: the agent dials ``*70`` (login), ``*72``
+ reason (pause), ``*73`` (unpause), ``*71`` (logout); each is answered with a confirmation tone
and hung up, or refused with a 4xx. The agent is pjsua2; callers are SIPp
(tests/sipp/trunk_cancel.xml: the caller waits in the queue 2 s and gives up). The appliance
runs in this process with a desk (``peers.LiveAppliance(desk=True)``).
"""

from __future__ import annotations

import concurrent.futures
import shutil
from collections.abc import Iterator

import pytest
from peers import (
    DID,
    Agent,
    LiveAppliance,
    agent_phone,
    carrier_for,
    free_port,
    live_site,
    make_site,
    query,
    sipp,
    sipp_failed,
    wait_for,
    with_carrier,
)

from appliance.acd import model as acd
from appliance.acd.desk import DeskError, FeatureCode, Presence, parse_feature_code
from appliance.acd.model import AUTO_PAUSE_REASON

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(150),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        # The phones are on 127.0.0.1; the carrier (SIPp) calls from 127.0.0.2.
        data.setdefault("trunk", {})["allowed_sources"] = ["127.0.0.2/32"]

    site = make_site(tmp_path_factory.mktemp("calls-desk-site"), edit=edit)
    appliance = LiveAppliance(site, desk=True).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _dial(live: LiveAppliance, agent, code: str) -> int:
    """Dial a feature code; the final status the phone saw (200: answered and hung up by us)."""
    agent.command(f"dial {code}")
    agent.next("dialled")
    return agent.next("disconnected")["code"]


def _caller_waits(live: LiveAppliance, tmp_path) -> str:
    """A caller who queues for 2 s then gives up; returns its call id once it has left."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        carrier = pool.submit(sipp, tmp_path, live, "trunk_cancel", host="127.0.0.2")
        offered = live.wait_event("call.offered", match=lambda p: not any(
            p["call_id"] == q["call_id"] for k, q in live.events if k == "call.ended"))
        result = carrier.result(60)
    assert result.returncode == 0, sipp_failed(result, live)
    live.wait_event("call.ended", match=lambda p: p["call_id"] == offered["call_id"])
    return offered["call_id"]


def test_feature_codes_drive_desk_and_router(live, tmp_path) -> None:
    calls = live.calls
    desk = live.desk
    with agent_phone(tmp_path, live.site, live, "idle", user="1001") as agent:
        # Registered but not logged in: a caller is not offered to this phone.
        assert desk.presence("1001") is Presence.LOGGED_OUT
        first = _caller_waits(live, tmp_path)
        kinds = [k for k, p in live.events if p.get("call_id") == first]
        assert "queue.enter" in kinds and "queue.abandon" in kinds
        assert "call.ringing" not in kinds
        assert not [e for e in agent.seen if e["event"] == "incoming"]

        assert _dial(live, agent, "*70") == 200
        assert desk.presence("1001") is Presence.AVAILABLE
        assert live.run(calls.router_view, "1001").presence == "ready"
        login = live.wait_event("agent.login")
        assert (login["agent"], login["source"]) == ("1001", "sip:1001")

        # Logged in: the next caller rings this phone.
        second = _caller_waits(live, tmp_path)
        ringing = [p for k, p in live.events if k == "call.ringing" and p["call_id"] == second]
        assert ringing and ringing[0]["agent"] == "1001"
        agent.next("incoming")

        assert _dial(live, agent, "*722") == 200  # pause, reason 2 (lunch)
        view = live.run(calls.router_view, "1001")
        assert (view.presence, desk.presence("1001")) == ("paused", Presence.PAUSED)
        assert live.wait_event("agent.pause")["reason"] == "lunch"
        # An unknown pause reason and a disposition with no call: refused, nothing changes.
        assert _dial(live, agent, "*729") == 484
        assert _dial(live, agent, "*741") == 403
        assert desk.presence("1001") is Presence.PAUSED

        assert _dial(live, agent, "*73") == 200
        assert live.run(calls.router_view, "1001").presence == "ready"
        assert _dial(live, agent, "*71") == 200
        assert live.run(calls.router_view, "1001").presence == "logged-out"
        assert desk.presence("1001") is Presence.LOGGED_OUT
        assert _dial(live, agent, "*71") == 403  # already logged out
    # Every change is audited; feature-code calls leave no call record.
    assert desk.flush(10)  # the desk's writer commits behind the answers
    rows = query(live.site, "SELECT action, detail, at FROM audit_log WHERE actor = '1001' "
                            "ORDER BY id")
    assert [a for a, _, _ in rows] == ["agent.login", "agent.pause", "agent.unpause",
                                       "agent.logout"]
    # Who (the actor), from where (the phone's extension) and when, on every row.
    assert all("agent=1001" in d and "source=sip:1001" in d and at > 0 for _, d, at in rows)
    assert "reason=lunch" in rows[1][1]
    records = {c for (c,) in query(live.site, "SELECT call_id FROM call_records")}
    assert records == {first, second}
    # The confirmation calls released their engine legs.
    wait_for(lambda: live.run(lambda: calls.engine.legs_active) == 0, 10, "no engine leg", live)


# ------------------------------------------------------------------ numbers are not feature codes


@pytest.mark.parametrize("digits", ["+15551234", "+442071234567", "+1 555 123", "5551234",
                                    "+" + "1" * 40, "sip-user", "+*70"])
def test_numbers_that_start_with_no_code_are_for_the_dial_rules(digits: str) -> None:
    assert parse_feature_code(digits) is None


@pytest.mark.parametrize("digits", ["*70+1", "*7+", "*+15551234", "*" + "1" * 40])
def test_star_numbers_stay_feature_codes_and_garbage_after_a_star_is_refused(digits: str
                                                                              ) -> None:
    with pytest.raises(DeskError) as caught:
        parse_feature_code(digits)
    assert caught.value.status == 400 and caught.value.field == "digits"
    assert parse_feature_code("*722") == FeatureCode("pause", "2")


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


RING_TIMEOUT = 1.0
"""Seconds an offer rings in ``support`` on the ``live_out`` site before it counts as missed."""
AUTO_PAUSE_AFTER = 2
"""Missed offers in a row after which the router pauses the agent (``live_out`` site)."""
SALES_WRAP_UP = 120.0
"""Wrap-up after a ``sales`` call (``live_out`` site): longer than any test step, so the wrap-up
test never depends on how fast the box is."""


def _routing_site(data: dict) -> None:
    """``support`` (menu 1): 1001 and 1002, linear, short ring, no wrap-up, rejoin window;
    ``sales`` (menu 2): 1001 only, a long wrap-up; auto-pause after 2 missed offers; a watchdog
    that runs often with a short grace."""
    data["queues"][0].update(members=["1001", "1002"], strategy="linear",
                             ring_timeout=RING_TIMEOUT, wrap_up=0.0, rejoin_window=300.0,
                             record=False)
    data["queues"].append({"name": "sales", "members": ["1001"], "strategy": "linear",
                           "ring_timeout": 10.0, "wrap_up": SALES_WRAP_UP, "record": False})
    nodes = data["ivr"]["flows"]["main"]["nodes"]
    nodes["welcome"]["options"]["2"] = "sales"
    nodes["sales"] = {"type": "queue", "queue": "sales"}
    data["agents"].update(auto_pause_after=AUTO_PAUSE_AFTER, watchdog_interval=0.2,
                          watchdog_grace=0.5)


@pytest.fixture(scope="module")
def live_out(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    """A desk site whose calls to numbers go to SIPp as the carrier on ``carrier_port``, with
    the queues of ``_routing_site`` (one appliance serves the dialling and the routing tests)."""

    def edit(data: dict) -> None:
        with_carrier(data, carrier_port)
        _routing_site(data)

    with live_site(tmp_path_factory.mktemp("calls-desk-out-site"), edit,
                   desk=True) as appliance:
        yield appliance


def test_an_agent_at_the_desk_dials_an_e164_number_through_the_carrier(
        live_out, carrier_port, tmp_path) -> None:
    number = "+15551230000"
    with carrier_for(tmp_path, live_out, carrier_port, "carrier_uas_retry") as carrier, \
            agent_phone(tmp_path, live_out.site, live_out, f"dial:{number}",
                        talk=1.0) as agent:
        dialling = live_out.wait_event("call.dialling")
        assert (dialling["agent"], dialling["number"]) == ("1001", number)
        agent.wait("answered")
        agent.wait("disconnected")
    # The carrier got the number as dialled (its INVITE's Request-URI).
    assert f"INVITE sip:{number}@" in carrier.text()
    assert "event=feature_code_refused" not in live_out.log_text()
    ended = live_out.wait_event("call.ended", match=lambda p: p["call_id"] == dialling["call_id"])
    assert ended["end_reason"] == "agent-hung-up"


def test_an_e164_number_the_dial_rules_refuse_gets_their_answer_not_484(live_out,
                                                                       tmp_path) -> None:
    mark = len(live_out.log_text())
    with agent_phone(tmp_path, live_out.site, live_out, "dial:+442071234567") as agent:
        gone = agent.wait("disconnected")
    assert gone["code"] == 403
    text = live_out.log_text()[mark:]
    assert "reason=international" in text and "feature_code_refused" not in text


# ------------------------------------------------------------------ routing with live phones


def _shown(live: LiveAppliance, agent: str) -> str:
    """What a supervisor sees of ``agent`` (``/api/agents``: the desk's view over the router's);
    on the event loop's thread."""
    return str(live.desk.view(agent, live.calls.control.router_view(agent))["state"])


def _state(live: LiveAppliance, agent: str) -> str:
    """``_shown`` from the test's thread."""
    return str(live.run(_shown, live, agent))


def _audit_rows(live: LiveAppliance, action: str, since: int) -> list[tuple[str, str]]:
    assert live.desk.flush(10)  # the desk's writer commits behind the changes
    return query(live.site, "SELECT actor, detail FROM audit_log WHERE action = ? AND id > ? "
                            "ORDER BY id", (action, since))


def _last_audit_id(live: LiveAppliance) -> int:
    assert live.desk.flush(10)
    return int(query(live.site, "SELECT COALESCE(MAX(id), 0) FROM audit_log")[0][0])


def _caller(tmp_path, live: LiveAppliance, number: str, menu: str = "1") -> tuple[Agent, str]:
    """A pjsua2 caller from the carrier (``number``) choosing ``menu``; its call id once it
    has entered the queue."""
    mark = len(live.events)
    caller = Agent(tmp_path, live.site, live.port, number, f"trunk:{DID}/{menu}")
    entered = live.wait_event("queue.enter", match=lambda p: p["caller"] == number and all(
        p is not q for _, q in live.events[:mark]))
    return caller, entered["call_id"]


def _hang_up(caller: Agent) -> None:
    try:
        caller.command("hangup")
        caller.next("disconnected")
    finally:
        caller.close()


def test_missed_offers_pause_the_agent_audited_with_the_reason(live_out, tmp_path) -> None:
    live = live_out
    since = _last_audit_id(live)
    with agent_phone(tmp_path, live.site, live, "idle", user="1001") as phone:
        assert _dial(live, phone, "*70") == 200
        assert _state(live, "1001") == "available"
        caller, call_id = _caller(tmp_path, live, "+15551239001")
        try:
            # The phone rings and is never answered: each offer rings out and counts.
            for _ in range(AUTO_PAUSE_AFTER):
                phone.next("incoming")
                assert phone.next("disconnected")["code"] == 487  # CANCELled at ring timeout
            paused = live.wait_event("agent.pause", match=lambda p: p["actor"] == "router")
            assert (paused["agent"], paused["reason"], paused["missed"]) == (
                "1001", AUTO_PAUSE_REASON, AUTO_PAUSE_AFTER)
            assert live.desk.presence("1001") is Presence.PAUSED
            assert live.desk.reason("1001") == AUTO_PAUSE_REASON
            assert _state(live, "1001") == "paused"
            # The caller keeps waiting, offered to nobody.
            router = live.calls.control.router
            assert live.run(router.waiting, "support") == (call_id,)
            assert live.run(router.caller_view, call_id).offered_to == ()
            ringing = [p["agent"] for k, p in live.events
                       if k == "call.ringing" and p["call_id"] == call_id]
            assert ringing == ["1001"] * AUTO_PAUSE_AFTER
        finally:
            _hang_up(caller)
        # Audited: by the router, the reason, before and after.
        [(actor, detail)] = _audit_rows(live, "agent.pause", since)
        assert actor == "router"
        assert all(part in detail for part in ("agent=1001", "before=available",
                                               "after=paused", f"reason={AUTO_PAUSE_REASON}",
                                               "source=router"))
        # The agent takes calls again only by choice.
        assert _dial(live, phone, "*73") == 200
        assert _state(live, "1001") == "available"
        assert _dial(live, phone, "*71") == 200
        assert _state(live, "1001") == "logged-out"


def test_watchdog_clears_router_holds_and_callers_no_call_explains(live_out, tmp_path) -> None:
    live = live_out
    control = live.calls.control
    since = _last_audit_id(live)
    with agent_phone(tmp_path, live.site, live, "idle", user="1001") as phone:
        assert _dial(live, phone, "*70") == 200

        def ghost() -> tuple[list, str, str]:
            # A call the router routed and was answered, but call control never carried (as
            # when a call is lost without the router being told): on the loop, so the
            # watchdog's runs fall before or after, never between.
            router, now = control.router, control._router_clock
            offered = router.handle(acd.CallerJoin("ghost-1", "support"), now())
            ringing = _shown(live, "1001")
            router.handle(acd.OfferAccepted("ghost-1", "1001"), now())
            return offered, ringing, _shown(live, "1001")

        offered, ringing, held = live.run(ghost)
        assert offered == [acd.Offer("ghost-1", ("1001",), "support")]
        assert (ringing, held) == ("ringing", "on-call")
        wait_for(lambda: _state(live, "1001") == "available", 15,
                 "the watchdog clearing 1001's call", live)
        view = live.run(live.calls.router_view, "1001")
        assert (view.presence, view.interactions, view.ringing) == ("ready", 0, 0)
        [(actor, detail)] = _audit_rows(live, "agent.watchdog", since)
        assert actor == "watchdog"
        assert all(part in detail for part in ("agent=1001", "call_id=ghost-1",
                                               "cleared=on-call", "source=watchdog"))
        assert live.desk.presence("1001") is Presence.AVAILABLE  # the choice is untouched

        # A caller the router still queues, ringing 1001, whose call is gone: dropped with its
        # offer (else it would ring agent after agent and stay ahead of the living).
        since = _last_audit_id(live)
        offered = live.run(lambda: control.router.handle(
            acd.CallerJoin("ghost-2", "support"), control._router_clock()))
        assert offered == [acd.Offer("ghost-2", ("1001",), "support")]
        wait_for(lambda: live.run(control.router.waiting, "support") == ()
                 and _state(live, "1001") == "available", 15,
                 "the watchdog dropping the stray caller", live)
        assert _audit_rows(live, "queue.watchdog", since) == [
            ("watchdog", "call_id=ghost-2 cleared=queued source=watchdog")]
        assert _dial(live, phone, "*71") == 200


def test_a_caller_who_abandons_and_calls_again_takes_their_old_place(live_out,
                                                                      tmp_path) -> None:
    live = live_out
    router = live.calls.control.router
    assert live.desk.presence("1001") is live.desk.presence("1002") is Presence.LOGGED_OUT
    first, abandoned = _caller(tmp_path, live, "+15551239002")
    _hang_up(first)
    live.wait_event("queue.abandon", match=lambda p: p["call_id"] == abandoned)
    later, later_id = _caller(tmp_path, live, "+15551239003")
    try:
        again, again_id = _caller(tmp_path, live, "+15551239002")
        try:
            # Within the window: ahead of the caller who joined after their first call.
            assert live.run(router.waiting, "support") == (again_id, later_id)
            assert live.run(router.position, again_id) == 1
            assert live.run(router.position, later_id) == 2
            assert (live.run(router.caller_view, again_id).place_time
                    < live.run(router.caller_view, later_id).place_time)
            # A third caller, new, queues behind both.
            new, new_id = _caller(tmp_path, live, "+15551239004")
            try:
                assert live.run(router.waiting, "support") == (again_id, later_id, new_id)
            finally:
                _hang_up(new)
        finally:
            _hang_up(again)
    finally:
        _hang_up(later)


def test_wrap_up_after_one_queue_holds_the_agent_in_all_of_them(live_out, tmp_path) -> None:
    """1001 in the long wrap-up of ``sales`` is offered nothing, gives the call its disposition
    and ends the wrap-up early with ``*73`` (ready)."""
    live = live_out
    router = live.calls.control.router
    since = _last_audit_id(live)
    with agent_phone(tmp_path, live.site, live, "idle", user="1001") as phone:
        assert _dial(live, phone, "*70") == 200
        sale, sale_id = _caller(tmp_path, live, "+15551239005", menu="2")
        phone.next("incoming")
        phone.command("answer")
        phone.next("answered")
        sale.next("answered")
        assert _state(live, "1001") == "on-call"
        _hang_up(sale)
        live.wait_event("call.ended", match=lambda p: p["call_id"] == sale_id)
        assert _state(live, "1001") == "wrap-up"
        # A caller for support (no wrap-up of its own) is not offered to 1001 in wrap-up.
        support, support_id = _caller(tmp_path, live, "+15551239006", menu="1")
        try:
            assert live.run(router.waiting, "support") == (support_id,)
            assert live.run(router.caller_view, support_id).offered_to == ()
            view = live.run(live.calls.router_view, "1001")
            assert (view.in_wrap_up, view.presence) == (True, "ready")
            assert not [p for k, p in live.events
                        if k == "call.ringing" and p["call_id"] == support_id]
        finally:
            _hang_up(support)
        # In wrap-up the agent gives the call its disposition from the phone (*74 + code).
        assert _dial(live, phone, "*741") == 200
        [(actor, detail)] = _audit_rows(live, "agent.disposition", since)
        assert actor == "1001"
        assert all(part in detail for part in (f"call_id={sale_id}", "disposition=resolved",
                                               "source=sip:1001"))
        assert _dial(live, phone, "*749") == 484  # no such disposition
        # Ready: the wrap-up ends now (audited), and the desk stays as it was.
        assert _dial(live, phone, "*73") == 200
        view = live.run(live.calls.router_view, "1001")
        assert (view.in_wrap_up, view.presence) == (False, "ready")
        assert _state(live, "1001") == "available"
        [(actor, detail)] = _audit_rows(live, "agent.ready", since)
        assert actor == "1001" and "source=sip:1001" in detail
        assert _dial(live, phone, "*73") == 403  # neither paused nor in wrap-up
    # No real call was ever cleared by the watchdog on this site.
    cleared = query(live.site, "SELECT detail FROM audit_log WHERE action = 'agent.watchdog'")
    assert all("call_id=ghost-" in d for (d,) in cleared)
    assert query(live.site, "SELECT detail FROM audit_log WHERE action = 'queue.watchdog'") == [
        ("call_id=ghost-2 cleared=queued source=watchdog",)]
