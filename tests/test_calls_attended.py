"""Attended transfer with real phones (RFC 5589 §7, RFC 3891 Replaces in a REFER).

The caller is pjsua2 from 127.0.0.2 (the test site's trunk source, 1000 Hz). Agent 1001 (440 Hz)
answers, holds the caller (who hears the hold music), dials agent 1002 (660 Hz) from the phone
(an agent-to-agent call, rung directly), talks to them, then sends REFER on the caller's dialog
with Replaces naming the 1001-1002 dialog (pjsua2's ``xferReplaces``). The B2BUA bridges the
caller to 1002 and ends both of 1001's dialogs; the caller then hears 660 Hz. The same from the
API (``consult`` / ``complete_transfer`` / ``cancel_consult``), and what happens when the agent,
the consulted target or the caller hangs up half-way (docs/calls.md, "When someone hangs up
during a transfer"). The appliance runs in this process (``peers.LiveAppliance``).
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator

import pytest
from peers import (
    Agent,
    LiveAppliance,
    channel_rms,
    connected_call,
    decrypt_recording,
    dominant_hz,
    events_of,
    hears,
    live_site,
    log_lines,
    query,
    trunk_caller,
    wait_for,
)

from appliance.calls import CallControlError

pytestmark = [pytest.mark.timeout(120)]
RING_TIMEOUT = 4.0


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        # A short ring_timeout: how long a transfer target rings once the agent has gone.
        data["queues"][0].update(strategy="linear", record=False, members=["1001"],
                                 ring_timeout=RING_TIMEOUT)

    with live_site(tmp_path_factory.mktemp("calls-attended-site"), edit) as appliance:
        yield appliance


def _hears(phone: Agent, path, seconds: float = 2.0) -> float:
    """The strongest frequency ``phone`` hears for ``seconds``."""
    return dominant_hz(*hears(phone, path, seconds))


def _record(live: LiveAppliance, call_id: str) -> tuple[dict, list[dict], list]:
    """The call's record once it ended: the row, its legs and its hold periods."""
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    names = [r[1] for r in query(live.site, "PRAGMA table_info(call_records)")]
    row = dict(zip(names, query(live.site, "SELECT * FROM call_records WHERE call_id = ?",
                                (call_id,))[0], strict=True))
    return row, json.loads(row["legs"]), json.loads(row["holds"])


def _transferred_to_1002(live: LiveAppliance, call_id: str) -> None:
    """The record of a call 1001 handed to 1002 after holding the caller."""
    row, legs, holds = _record(live, call_id)
    assert row["agent"] == "1002"
    by_agent = {leg["agent"]: leg for leg in legs if leg["agent"]}
    assert by_agent["1001"]["end_reason"] == "transferred"
    assert by_agent["1002"]["answered_at"] > by_agent["1001"]["answered_at"]
    (period,) = holds
    assert period[0] < period[1]  # the hold ended with the transfer


def test_attended_transfer_from_the_phone(live, tmp_path) -> None:
    with connected_call(tmp_path, live) as (first, second, caller, call_id):
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
    _transferred_to_1002(live, call_id)
    logged = [(k, p.get("agent"), p.get("kind")) for _, k, _, p in events_of(live.site, call_id)]
    assert ("call.transfer", None, "attended") in logged
    assert ("queue.complete", "1001", None) in logged
    (reason, direction) = query(
        live.site, "SELECT end_reason, direction FROM call_records WHERE call_id = ?",
        (consult["call_id"],))[0]
    assert (reason, direction) == ("transferred", "outbound")


def test_replacing_an_unanswered_consultation_is_refused(live, tmp_path) -> None:
    mark = len(live.log_text())
    with connected_call(tmp_path, live, colleague_mode="idle") as (first, second, caller, call_id):
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
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)


# --------------------------------------------------------------------------- from the API


def test_attended_transfer_from_the_api(live, tmp_path) -> None:
    calls = live.calls
    with connected_call(tmp_path, live) as (first, second, caller, call_id):
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
    _transferred_to_1002(live, call_id)
    audited = query(live.site, "SELECT actor, action FROM audit_log WHERE detail LIKE ?",
                    (f"%{call_id}%",))
    assert ("sup1", "call.consult") in audited and ("sup1", "call.transfer") in audited


def test_cancelled_consultation_gives_the_caller_back(live, tmp_path) -> None:
    calls = live.calls
    with connected_call(tmp_path, live, colleague_mode="idle") as (first, second, caller, call_id):
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
        with connected_call(tmp_path, live) as (first, second, caller, call_id):
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
        api.context.calls = None
        api.close()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)


# --------------------------------------------------------------------------- hang-ups mid-way


def _answered_consultation(live: LiveAppliance, call_id: str, target: Agent) -> None:
    """Consult 1002 from the API and wait until it answered (phones in "answer" mode)."""
    live.run(live.calls.consult, call_id, "1002", by="sup1")
    target.next("answered")
    live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                    and p["state"] == "answered")


def test_agent_hanging_up_completes_an_answered_consultation(live, tmp_path) -> None:
    with connected_call(tmp_path, live) as (first, second, caller, call_id):
        _answered_consultation(live, call_id, second)
        first.command("hangup")  # transfer on hang-up: the caller goes to 1002
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["by"], moved["target"], moved["kind"], moved["from_agent"]) == (
            "sup1", "1002", "attended", "1001")
        first.next("disconnected")
        rows = live.run(live.calls.active_calls)
        assert [(r["agent"], r["state"], r["held"]) for r in rows
                if r["call_id"] == call_id] == [("1002", "connected", False)]
        samples, rate = hears(caller, tmp_path / "after.wav")
        assert abs(dominant_hz(samples, rate) - 660) < 10  # 1002, no more music
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
        second.next("disconnected")
    row, legs, holds = _record(live, call_id)
    assert row["agent"] == "1002" and row["end_reason"] == "hung-up-by-api"
    by_agent = {leg["agent"]: leg for leg in legs if leg["agent"]}
    assert by_agent["1001"]["end_reason"] == "agent-hung-up"
    assert by_agent["1002"]["answered_at"] is not None
    assert by_agent["1002"]["media"]["rx_packets"] > 0
    (period,) = holds
    assert period[1] is not None and period[1] <= by_agent["1001"]["ended_at"] + 1
    logged = [(k, p.get("agent"), p.get("ended_by") or p.get("kind"))
              for _, k, _, p in events_of(live.site, call_id)]
    assert ("queue.complete", "1001", "transferred") in logged
    assert ("call.transfer", None, "attended") in logged
    assert ("queue.complete", "1002", "hung-up-by-api") in logged


def test_agent_hanging_up_while_the_target_rings_makes_it_blind(live, tmp_path) -> None:
    with connected_call(tmp_path, live, colleague_mode="idle") as (first, second, caller, call_id):
        live.run(live.calls.consult, call_id, "1002", by="sup1")
        second.next("incoming")  # rings; answered only after 1001 left
        first.command("hangup")
        first.next("disconnected")
        live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                        and p["state"] == "blind")
        # Meanwhile the caller waits on hold, not cut off.
        rows = live.run(live.calls.active_calls)
        assert [(r["state"], r["held"]) for r in rows if r["call_id"] == call_id] == [
            ("connected", True)]
        second.command("answer")
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["target"], moved["kind"], moved["from_agent"]) == (
            "1002", "blind", "1001")
        samples, rate = hears(caller, tmp_path / "after.wav")
        assert abs(dominant_hz(samples, rate) - 660) < 10
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
        second.next("disconnected")
    row, legs, holds = _record(live, call_id)
    assert row["agent"] == "1002"
    assert [leg["agent"] for leg in legs] == [None, "1001", "1002"]
    (period,) = holds
    assert period[1] is not None


@pytest.mark.parametrize("refusal", ["declines", "rings-out"])
def test_refused_target_sends_the_caller_back_to_the_queue(live, tmp_path, refusal) -> None:
    with connected_call(tmp_path, live, agent_mode="idle", colleague_mode="idle") as (
            first, second, caller, call_id):
        live.run(live.calls.consult, call_id, "1002", by="sup1")
        second.next("incoming")
        first.command("hangup")
        first.next("disconnected")
        live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                        and p["state"] == "blind")
        if refusal == "declines":
            second.command("hangup")  # 603
        # else: nobody answers; after the queue's ring_timeout we cancel (487).
        # Back in the queue (not dropped): its only agent, 1001, is offered the caller again.
        first.next("incoming", timeout=RING_TIMEOUT + 20)
        rows = live.run(live.calls.active_calls)
        assert [(r["state"], r["held"]) for r in rows if r["call_id"] == call_id] == [
            ("ringing", False)]
        first.command("answer")
        first.next("answered")
        samples, rate = hears(caller, tmp_path / "back.wav")
        assert abs(dominant_hz(samples, rate) - 440) < 10  # 1001 again
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    assert not [p for k, p in live.events if k == "call.transfer" and p["call_id"] == call_id]
    row, legs, holds = _record(live, call_id)
    assert (row["agent"], row["queue"], row["end_reason"]) == ("1001", "support",
                                                               "hung-up-by-api")
    assert [leg["agent"] for leg in legs] == [None, "1001", "1002", "1001"]
    refused = legs[2]
    assert (refused["answered_at"], refused["end_code"], refused["end_reason"]) == (
        (None, 603, "rejected") if refusal == "declines" else (None, 487, "no-answer"))
    assert legs[3]["answered_at"] > legs[1]["ended_at"]
    (period,) = holds
    assert period[1] is not None and period[1] <= legs[3]["started_at"]
    logged = [(k, p.get("agent"), p.get("ended_by"), p.get("priority"))
              for _, k, _, p in events_of(live.site, call_id)]
    assert [entry for entry in logged if entry[0].startswith("queue.")] == [
        ("queue.enter", None, None, 0), ("queue.connect", "1001", None, None),
        ("queue.complete", "1001", "transferred", None), ("queue.enter", None, None, 0),
        ("queue.connect", "1001", None, None), ("queue.complete", "1001", "hung-up-by-api", None)]


def test_target_hanging_up_gives_the_caller_back(live, tmp_path) -> None:
    with connected_call(tmp_path, live) as (first, second, caller, call_id):
        _answered_consultation(live, call_id, second)
        second.command("hangup")
        live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                        and p["state"] == "ended")
        resumed = live.wait_event("call.resume", match=lambda p: p["call_id"] == call_id)
        assert resumed["by"] == "1002"
        rows = live.run(live.calls.active_calls)
        assert [(r["agent"], r["state"], r["held"]) for r in rows
                if r["call_id"] == call_id] == [("1001", "connected", False)]
        samples, rate = hears(caller, tmp_path / "back.wav")
        assert abs(dominant_hz(samples, rate) - 440) < 10  # 1001 again
        with pytest.raises(CallControlError) as caught:  # nothing left in progress
            live.run(live.calls.cancel_consult, call_id, by="sup1")
        assert caught.value.status == 409
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
        first.next("disconnected")
    row, legs, holds = _record(live, call_id)
    assert row["agent"] == "1001"
    by_agent = {leg["agent"]: leg for leg in legs if leg["agent"]}
    assert by_agent["1002"]["answered_at"] is not None
    assert by_agent["1002"]["end_reason"] == "agent-hung-up"
    (period,) = holds
    assert period[1] is not None
    assert not [p for k, p in live.events if k == "call.transfer" and p["call_id"] == call_id]


def test_caller_hanging_up_ends_the_consultation(live, tmp_path) -> None:
    with connected_call(tmp_path, live) as (first, second, caller, call_id):
        _answered_consultation(live, call_id, second)
        caller.command("hangup")
        first.next("disconnected")
        second.next("disconnected")
    row, legs, _ = _record(live, call_id)
    assert row["end_reason"] == "caller-hung-up"
    assert [(leg["agent"], leg["end_reason"]) for leg in legs] == [
        (None, "caller-hung-up"), ("1001", "caller-hung-up"), ("1002", "caller-hung-up")]


@pytest.fixture(scope="module")
def live_recorded(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", record=True, members=["1001"])

    with live_site(tmp_path_factory.mktemp("calls-attended-rec-site"), edit) as appliance:
        yield appliance


def test_requeued_caller_keeps_the_recording_so_far(live_recorded, tmp_path) -> None:
    live = live_recorded
    with connected_call(tmp_path, live, agent_mode="idle", colleague_mode="idle") as (
            first, second, caller, call_id):
        hears(caller, tmp_path / "first.wav", 1.0)  # the talk before the consultation
        live.run(live.calls.consult, call_id, "1002", by="sup1")
        second.next("incoming")
        first.command("hangup")
        first.next("disconnected")
        live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                        and p["state"] == "blind")
        second.command("hangup")
        first.next("incoming")  # the queue offers the caller to 1001 again
        first.command("answer")
        first.next("answered")
        hears(caller, tmp_path / "second.wav", 1.0)  # the second talk, recorded anew
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    row, _, _ = _record(live, call_id)
    parts = wait_for(lambda: query(
        live.site, "SELECT id, agent, ended_at FROM recordings WHERE call_id = ? "
        "ORDER BY started_at", (call_id,)) if len(query(
            live.site, "SELECT id FROM recordings WHERE call_id = ? AND ended_at IS NOT NULL",
            (call_id,))) == 2 else None, 10, "both recordings", live)
    # The talk before the transfer is a recording of its own; the record names the last one.
    assert row["recording_id"] == parts[1][0] and [p[1] for p in parts] == ["1001", "1001"]
    for recording_id, _, _ in parts:
        stereo = decrypt_recording(live.site, recording_id)
        assert stereo.shape[0] > 8000 * 0.5
        assert abs(dominant_hz(stereo[:, 1], 8000) - 440) < 10  # 1001 on the right
        assert channel_rms(stereo[:, 0]) > 100  # the caller on the left
    assert not glob.glob(f"/dev/shm/edgecc-*-rec-*/{call_id}*")  # no plaintext left


def test_requeued_caller_keeps_their_place_ahead_of_a_later_caller(live, tmp_path) -> None:
    with connected_call(tmp_path, live, agent_mode="idle", colleague_mode="idle") as (
            first, second, caller, call_id):
        later_dir = tmp_path / "later"
        later_dir.mkdir()
        with trunk_caller(later_dir, live) as (_, later_id):
            live.wait_event("queue.enter", match=lambda p: p["call_id"] == later_id)
            live.run(live.calls.consult, call_id, "1002", by="sup1")
            second.next("incoming")
            first.command("hangup")
            first.next("disconnected")
            live.wait_event("call.consult", match=lambda p: p["call_id"] == call_id
                            and p["state"] == "blind")
            second.command("hangup")  # declined: the customer goes back to the queue
            first.next("incoming")
            rows = live.run(live.calls.active_calls)
            # 1001 is offered the customer queued first, not the one who joined since
            assert [r["call_id"] for r in rows if r["state"] == "ringing"] == [call_id]
            assert [r["state"] for r in rows if r["call_id"] == later_id] == ["queued"]
            live.run(live.calls.hangup, later_id, by="sup1")
            live.run(live.calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
