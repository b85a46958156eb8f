"""Call control's API and its event callback, with real phones and a real carrier.

The appliance runs in this process (``peers.LiveAppliance``) so the test calls ``CallService``
methods on its loop and sees ``on_event``; the agent is pjsua2 and the carrier SIPp, each in a
process of its own.
"""

from __future__ import annotations

import concurrent.futures
import shutil
from collections.abc import Iterator

import pytest
from peers import (
    CALLER,
    DID,
    LiveAppliance,
    agent_phone,
    events_of,
    make_site,
    query,
    sipp,
    sipp_failed,
    wait_for,
)

from appliance.calls import CallControlError

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    site = make_site(tmp_path_factory.mktemp("calls-api-site"))
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _error(live: LiveAppliance, fn, *args, **kwargs) -> CallControlError:
    with pytest.raises(CallControlError) as caught:
        live.run(fn, *args, **kwargs)
    return caught.value


def test_hangup_by_api_ends_a_connected_call_and_events_follow(live, tmp_path) -> None:
    site = live.site
    calls = live.calls
    # Unknown calls are named, nothing changes.
    assert _error(live, calls.hangup, "no-such-call", by="sup1").status == 404
    assert live.run(calls.active_calls) == []
    # A consumer that fails on one kind never breaks the call.
    live.fail_kinds = frozenset({"call.ringing"})
    with agent_phone(tmp_path, site, live, "answer", talk=0) as agent, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        carrier = pool.submit(sipp, tmp_path, live, "trunk_call", keys={"hangup": "agent"})
        offered = live.wait_event("call.offered")
        assert (offered["caller"], offered["dialled"], offered["flow"]) == (CALLER, DID, "main")
        call_id = offered["call_id"]
        ringing = live.wait_event("call.ringing")
        assert (ringing["call_id"], ringing["agent"], ringing["queue"]) == (
            call_id, "1001", "support")
        agent.wait("answered")
        connected = wait_for(lambda: [c for c in live.run(calls.active_calls)
                                      if c["state"] == "connected"], 15, "a connected call",
                             live)
        assert len(connected) == 1
        row = connected[0]
        assert (row["call_id"], row["caller"], row["dialled"], row["queue"], row["agent"]) == (
            call_id, CALLER, DID, "support", "1001")
        assert row["held"] is False and row["recording_paused"] is False
        assert row["since"] >= offered["at"]
        # The carrier talks after its ACK (SIPp plays its speech then waits for our BYE): wait
        # for half a second of it on the caller's leg before hanging up.
        media = live.run(lambda: calls.control.calls[call_id].media)
        start = live.run(calls.engine.stats, media).rx_packets
        wait_for(lambda: live.run(calls.engine.stats, media).rx_packets > start + 25, 15,
                 "the caller's speech", live)

        def hang_up_twice() -> int:
            calls.hangup(call_id, by="sup1")
            try:
                calls.hangup(call_id, by="sup1")
            except CallControlError as exc:
                return exc.status
            return 0

        assert live.run(hang_up_twice) == 409  # already ending
        result = carrier.result(60)
        assert result.returncode == 0, sipp_failed(result, live)  # the carrier got our BYE
        assert agent.wait("disconnected")
    ended = live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    assert ended["end_reason"] == "hung-up-by-api"
    assert live.run(calls.active_calls) == []
    assert _error(live, calls.hangup, call_id, by="sup1").status == 404
    # The record and the event log agree with what on_event said, seq for seq.
    (end_reason,) = query(site, "SELECT end_reason FROM call_records WHERE call_id = ?",
                          (call_id,))[0]
    assert end_reason == "hung-up-by-api"
    logged = [(seq, kind) for seq, kind, _, _ in events_of(site, call_id)]
    assert [k for _, k in logged] == ["queue.enter", "queue.connect", "queue.complete",
                                      "call.record"]
    seen = [(kind, p) for kind, p in live.events if p.get("call_id") == call_id]
    # queue.enter and queue.connect are heard when they happen (no seq yet), the rest with
    # their seq once the call's rows are written.
    assert [k for k, _ in seen] == ["call.offered", "queue.enter", "call.ringing",
                                    "queue.connect", "queue.complete", "call.record",
                                    "call.ended"]
    assert [(p["seq"], k) for k, p in seen if "seq" in p] == logged[2:]
    assert [k for k, p in seen if k.startswith("queue.") and "seq" not in p] == [
        "queue.enter", "queue.connect"]
    record = dict(seen)["call.record"]
    assert record["ended_by"] == "sup1" and record["end_reason"] == "hung-up-by-api"
    assert wait_for(lambda: query(
        site, "SELECT actor FROM audit_log WHERE action = 'call.hangup' AND detail LIKE ?",
        (f"%{call_id}%",)), 10, "the audit row", live) == [("sup1",)]
    assert "event=on_event_failed kind=call.ringing" in live.log_text()


def test_calls_up_at_stop_get_a_record(tmp_path) -> None:
    site = make_site(tmp_path / "stop-site")
    live = LiveAppliance(site).start()
    try:
        with agent_phone(tmp_path, site, live, "answer", talk=0) as agent, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            carrier = pool.submit(sipp, tmp_path, live, "trunk_call", keys={"hangup": "agent"})
            call_id = live.wait_event("call.offered")["call_id"]
            agent.next("answered")
            calls = live.calls
            media = live.run(lambda: calls.control.calls[call_id].media)
            start = live.run(calls.engine.stats, media).rx_packets
            wait_for(lambda: live.run(calls.engine.stats, media).rx_packets > start + 25, 15,
                     "the caller's speech", live)
            live.close()  # the appliance stops with the call up
            result = carrier.result(60)
            assert result.returncode == 0, sipp_failed(result, live)  # it got our BYE
            agent.next("disconnected")
    finally:
        live.close()
    (end_reason, recording_id) = query(
        site, "SELECT end_reason, recording_id FROM call_records WHERE call_id = ?",
        (call_id,))[0]
    assert end_reason == "appliance-stopped"
    assert recording_id  # the recording was closed and encrypted before the stop
    assert [k for _, k, _, _ in events_of(site, call_id)] == [
        "queue.enter", "queue.connect", "call.record"]
    ended = [p for k, p in live.events if k == "call.ended" and p["call_id"] == call_id]
    assert ended and ended[0]["end_reason"] == "appliance-stopped"
    assert not list((site.directory / "recordings").rglob("*.wav"))
