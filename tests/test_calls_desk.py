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

from appliance.acd.desk import DeskError, FeatureCode, Presence, parse_feature_code

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
    actions = [a for (a,) in query(live.site, "SELECT action FROM audit_log WHERE actor = '1001'"
                                             " ORDER BY id")]
    assert actions == ["agent.login", "agent.pause", "agent.unpause", "agent.logout"]
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


@pytest.fixture(scope="module")
def live_out(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    """A desk site whose calls to numbers go to SIPp as the carrier on ``carrier_port``."""
    with live_site(tmp_path_factory.mktemp("calls-desk-out-site"),
                   lambda data: with_carrier(data, carrier_port), desk=True) as appliance:
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
