"""Attended transfer with real phones (RFC 5589 §7, RFC 3891 Replaces in a REFER).

The caller is pjsua2 from 127.0.0.2 (the test site's trunk source, 1000 Hz). Agent 1001 (440 Hz)
answers, holds the caller (who hears the hold music), dials agent 1002 (660 Hz) from the phone
(an agent-to-agent call, rung directly), talks to them, then sends REFER on the caller's dialog
with Replaces naming the 1001-1002 dialog (pjsua2's ``xferReplaces``). The B2BUA bridges the
caller to 1002 and ends both of 1001's dialogs; the caller then hears 660 Hz. The appliance runs
in this process (``peers.LiveAppliance``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from peers import (
    DID,
    Agent,
    LiveAppliance,
    agent_phone,
    dominant_hz,
    events_of,
    make_site,
    query,
    read_heard,
)

from appliance.calls import CallControlError

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")

    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", record=False, members=["1001"])

    site = make_site(tmp_path_factory.mktemp("calls-attended-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _hears(caller: Agent, path, seconds: float = 2.0) -> float:
    caller.command(f"record {path} {seconds}")
    caller.next("recorded", timeout=seconds + 15)
    samples, rate = read_heard(path)
    assert samples.size > rate * seconds * 0.5, (samples.size, rate)
    return dominant_hz(samples, rate)


def test_attended_transfer_from_the_phone(live, tmp_path) -> None:
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as first, \
            agent_phone(tmp_path, live.site, live, "answer", user="1002") as second:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered")["call_id"]
            first.next("answered")
            caller.next("answered")
            first.command("hold")
            live.wait_event("call.hold", match=lambda p: p["call_id"] == call_id)
            # The consultation: 1001's phone dials 1002's extension (no carrier involved).
            first.command("dial 1002")
            consult = live.wait_event("call.dialling", match=lambda p: p["agent"] == "1001")
            assert consult["number"] == "1002"
            second.next("incoming")
            second.next("answered")
            first.next("answered")
            # The music (chords, 392 Hz among them), not 1001's 440 Hz.
            assert abs(_hears(caller, tmp_path / "held.wav", 1.5) - 440) > 10
            first.command("attxfer")
            moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
            assert (moved["by"], moved["target"], moved["kind"], moved["from_agent"]) == (
                "1001", "1002", "attended", "1001")
            live.wait_event("call.ended", match=lambda p: p["call_id"] == consult["call_id"])
            first.next("disconnected")
            rows = live.run(live.calls.active_calls)
            assert [(r["call_id"], r["agent"], r["state"], r["held"]) for r in rows] == [
                (call_id, "1002", "connected", False)]
            assert abs(_hears(caller, tmp_path / "after.wav") - 660) < 10  # agent 1002
            live.run(live.calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
            second.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    agent, legs, holds = query(
        live.site, "SELECT agent, legs, holds FROM call_records WHERE call_id = ?",
        (call_id,))[0]
    assert agent == "1002"
    by_agent = {leg["agent"]: leg for leg in json.loads(legs) if leg["agent"]}
    assert by_agent["1001"]["end_reason"] == "transferred"
    assert by_agent["1002"]["answered_at"] > by_agent["1001"]["answered_at"]
    (period,) = json.loads(holds)
    assert period[0] < period[1]  # the hold ended with the transfer
    logged = [(k, p.get("agent"), p.get("kind")) for _, k, _, p in events_of(live.site, call_id)]
    assert ("call.transfer", None, "attended") in logged
    assert ("queue.complete", "1001", None) in logged
    (reason, direction) = query(
        live.site, "SELECT end_reason, direction FROM call_records WHERE call_id = ?",
        (consult["call_id"],))[0]
    assert (reason, direction) == ("transferred", "outbound")


def test_replacing_an_unanswered_consultation_is_refused(live, tmp_path) -> None:
    from peers import log_lines, wait_for

    mark = len(live.log_text())
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as first, \
            agent_phone(tmp_path, live.site, live, "idle", user="1002") as second:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered", match=lambda p: not any(
                k == "call.ended" and e["call_id"] == p["call_id"] for k, e in live.events)
            )["call_id"]
            first.next("answered")
            caller.next("answered")
            first.command("hold")
            live.wait_event("call.hold", match=lambda p: p["call_id"] == call_id)
            first.command("dial 1002")
            second.next("incoming")  # rings, never answered: an early dialog
            while first.next("state")["state"] != 3:  # PJSIP_INV_STATE_EARLY: our 180 came
                pass
            first.command("attxfer")
            refused = wait_for(lambda: [
                e for e in log_lines(live, "transfer_refused", mark)
                if e["call"] == call_id], 15, "the REFER refused", live)[0]
            assert (refused["kind"], refused["status"]) == ("attended", "486")
            # Nothing moved: the caller is still 1001's, held, and no transfer was recorded.
            rows = live.run(live.calls.active_calls)
            mine = [r for r in rows if r["call_id"] == call_id]
            assert [(r["agent"], r["state"], r["held"]) for r in mine] == [
                ("1001", "connected", True)]
            assert not [p for k, p in live.events
                        if k == "call.transfer" and p["call_id"] == call_id]
            live.run(live.calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)


# --------------------------------------------------------------------------- from the API


def test_attended_transfer_from_the_api(live, tmp_path) -> None:
    calls = live.calls
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as first, \
            agent_phone(tmp_path, live.site, live, "answer", user="1002") as second:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered", match=lambda p: not any(
                k == "call.ended" and e["call_id"] == p["call_id"] for k, e in live.events)
            )["call_id"]
            first.next("answered")
            caller.next("answered")
            # Nothing to complete or cancel yet; a number abroad is refused by the dial rules.
            for action in (calls.complete_transfer, calls.cancel_consult):
                with pytest.raises(CallControlError) as caught:
                    live.run(action, call_id, by="sup1")
                assert caught.value.status == 409
            with pytest.raises(CallControlError) as caught:
                live.run(calls.consult, "no-such-call", "1002", by="sup1")
            assert caught.value.status == 404
            live.run(calls.consult, call_id, "1002", by="sup1")
            live.wait_event("call.hold", match=lambda p: p["call_id"] == call_id)
            with pytest.raises(CallControlError) as caught:  # one consultation at a time
                live.run(calls.consult, call_id, "1002", by="sup1")
            assert caught.value.status == 409
            second.next("incoming")
            second.next("answered")
            live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                            and p["state"] == "answered")
            # The caller hears the hold music meanwhile, neither agent.
            held = _hears(caller, tmp_path / "held.wav", 1.5)
            assert abs(held - 440) > 10 and abs(held - 660) > 10
            live.run(calls.complete_transfer, call_id, by="sup1")
            moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
            assert (moved["by"], moved["target"], moved["kind"], moved["from_agent"]) == (
                "sup1", "1002", "attended", "1001")
            first.next("disconnected")
            rows = live.run(calls.active_calls)
            assert [(r["agent"], r["state"], r["held"]) for r in rows
                    if r["call_id"] == call_id] == [("1002", "connected", False)]
            assert abs(_hears(caller, tmp_path / "after.wav") - 660) < 10  # agent 1002
            live.run(calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
            second.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    agent, legs, holds = query(
        live.site, "SELECT agent, legs, holds FROM call_records WHERE call_id = ?",
        (call_id,))[0]
    assert agent == "1002"
    by_agent = {leg["agent"]: leg for leg in json.loads(legs) if leg["agent"]}
    assert by_agent["1001"]["end_reason"] == "transferred"
    assert by_agent["1002"]["answered_at"] > by_agent["1001"]["answered_at"]
    (period,) = json.loads(holds)
    assert period[0] < period[1]
    audited = query(live.site, "SELECT actor, action FROM audit_log WHERE detail LIKE ?",
                    (f"%{call_id}%",))
    assert ("sup1", "call.consult") in audited and ("sup1", "call.transfer") in audited


def test_cancelled_consultation_gives_the_caller_back(live, tmp_path) -> None:
    calls = live.calls
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as first, \
            agent_phone(tmp_path, live.site, live, "idle", user="1002") as second:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered", match=lambda p: not any(
                k == "call.ended" and e["call_id"] == p["call_id"] for k, e in live.events)
            )["call_id"]
            first.next("answered")
            caller.next("answered")
            live.run(calls.consult, call_id, "1002", by="sup1")
            second.next("incoming")  # rings, never answered
            with pytest.raises(CallControlError) as caught:
                live.run(calls.complete_transfer, call_id, by="sup1")
            assert caught.value.status == 409  # not answered yet
            live.run(calls.cancel_consult, call_id, by="sup1")
            live.wait_event("call.resume", match=lambda p: p["call_id"] == call_id)
            second.next("disconnected")  # our CANCEL
            rows = live.run(calls.active_calls)
            assert [(r["agent"], r["state"], r["held"]) for r in rows
                    if r["call_id"] == call_id] == [("1001", "connected", False)]
            assert abs(_hears(caller, tmp_path / "back.wav") - 440) < 10  # agent 1001 again
            live.run(calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    agent, legs = query(live.site, "SELECT agent, legs FROM call_records WHERE call_id = ?",
                        (call_id,))[0]
    assert agent == "1001"
    consult_leg = [leg for leg in json.loads(legs) if leg["agent"] == "1002"]
    assert len(consult_leg) == 1 and consult_leg[0]["answered_at"] is None
    assert not [p for k, p in live.events if k == "call.transfer" and p["call_id"] == call_id]


class _OnLiveLoop:
    """The live appliance's ``CallService``, called on its own loop: the API below is served
    from another loop (thread) in this test process."""

    def __init__(self, live: LiveAppliance) -> None:
        self.live = live

    def __getattr__(self, name: str):
        method = getattr(self.live.calls, name)
        return lambda *args, **kwargs: self.live.run(method, *args, **kwargs)


def test_attended_transfer_endpoints(live, tmp_path) -> None:
    from test_api_server import ApiServer

    from appliance.api import Role

    api = ApiServer(tmp_path)
    try:
        api.add("sam", Role.SUPERVISOR)
        api.add("alex", Role.AGENT)
        token, agent_token = api.token("sam"), api.token("alex")
        api.context.calls = _OnLiveLoop(live)
        with agent_phone(tmp_path, live.site, live, "answer", user="1001") as first, \
                agent_phone(tmp_path, live.site, live, "answer", user="1002") as second:
            caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
            try:
                call_id = live.wait_event("call.offered", match=lambda p: not any(
                    k == "call.ended" and e["call_id"] == p["call_id"] for k, e in live.events)
                )["call_id"]
                first.next("answered")
                caller.next("answered")
                base = f"/api/calls/{call_id}"
                # Agents may not; refusals keep call control's status.
                assert api.request("POST", f"{base}/consult", {"target": "1002"},
                                   token=agent_token).status == 403
                reply = api.request("POST", f"{base}/transfer/complete", token=token)
                assert reply.status == 409, reply.body
                reply = api.request("POST", f"{base}/consult", {"target": "+442071234567"},
                                    token=token)
                # This site has no carrier: a number is no target here.
                assert reply.status == 404 and reply.body["error"] == "Unknown Transfer Target"
                reply = api.request("POST", f"{base}/consult", {"target": "1002"}, token=token)
                assert reply.status == 200, reply.body
                second.next("answered")
                live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                                and p["state"] == "answered")
                reply = api.request("POST", f"{base}/transfer/complete", token=token)
                assert reply.status == 200, reply.body
                moved = live.wait_event("call.transfer",
                                        match=lambda p: p["call_id"] == call_id)
                assert (moved["by"], moved["kind"], moved["target"]) == (
                    "sam", "attended", "1002")
                first.next("disconnected")
                assert api.request("POST", f"{base}/consult/cancel",
                                   token=token).status == 409  # nothing left to cancel
                live.run(live.calls.hangup, call_id, by="sam")
                caller.next("disconnected")
                second.next("disconnected")
            finally:
                caller.close()
                if caller.proc.returncode is None:
                    caller.proc.kill()
    finally:
        api.context.calls = None
        api.close()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
