"""Queued callbacks with real peers: SIPp callers ask through the IVR to be called back, a
pjsua2 agent phone is rung first, then SIPp as the carrier answers (or is busy) as the customer.

The appliance runs in this process (``peers.LiveAppliance``); docs/calls.md, "Queued
callbacks", and docs/routing.md §7 state the rules checked here.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from peers import (
    DID,
    Carrier,
    LiveAppliance,
    agent_phone,
    dominant_hz,
    events_of,
    free_port,
    make_site,
    query,
    read_heard,
    sipp,
    sipp_failed,
)

from appliance.calls import CallControlError
from appliance.calls.callbacks import callback_priority
from appliance.config import ConfigError, parse_site_yaml

CALLBACK_DID = "+15550199"
REQUESTER = "+15550001111"
EARLY, LATE = "+15550002222", "+15550003333"
RETRY_INTERVAL = 3.0

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")


def test_callback_priority_from_flow_variables() -> None:
    assert callback_priority({"priority": "7"}) == 7
    assert callback_priority({"priority": "250"}) == 100
    assert callback_priority({"priority": "-3"}) == 0
    assert callback_priority({"priority": "gold"}) == 0
    assert callback_priority({}) == 0


def test_callback_retry_settings_are_checked() -> None:
    config = parse_site_yaml("queues:\n  - name: sales\n    callback_retries: 3\n"
                             "    callback_retry_interval: 90\n")
    assert (config.queues[0].callback_retries, config.queues[0].callback_retry_interval) == (
        3, 90)
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml("queues:\n  - name: sales\n    callback_retries: -1\n")
    assert "callback_retries" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml("queues:\n  - name: sales\n    callback_retry_interval: 0\n")
    assert "callback_retry_interval" in str(caught.value)


def _site_edit(carrier_port: int) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        data["trunk"].update(carrier={"host": "127.0.0.1", "port": carrier_port})
        queue = data["queues"][0]
        queue.update(members=["1001"], ring_timeout=10.0, record=True, callback_retries=1,
                     callback_retry_interval=RETRY_INTERVAL)
        data["ivr"]["dids"][CALLBACK_DID] = "callback"
        data["ivr"]["flows"]["callback"] = {"start": "offer", "nodes": {
            "offer": {"type": "callback", "queue": queue["name"], "prompt": "welcome",
                      "accept_digit": "1", "timeout": 10, "on_decline": "bye",
                      "next": "goodbye"},
            "goodbye": {"type": "play", "prompt": "goodbye", "next": "bye"},
            "bye": {"type": "hangup"}}}

    return edit


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    site = make_site(tmp_path_factory.mktemp("calls-callback-site"),
                     edit=_site_edit(carrier_port))
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


class Background:
    """A SIPp caller in a thread (its scenario blocks until the call is over)."""

    def __init__(self, tmp: Path, live: LiveAppliance, scenario: str, **kwargs: Any) -> None:
        self.result: Any = None
        self.thread = threading.Thread(target=self._run, args=(tmp, live, scenario),
                                       kwargs=kwargs, daemon=True)
        self.thread.start()

    def _run(self, *args: Any, **kwargs: Any) -> None:
        self.result = sipp(*args, **kwargs)

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the SIPp caller did not finish"
        return self.result


def _record(live: LiveAppliance, call_id: str) -> dict[str, Any]:
    names = [r[1] for r in query(live.site, "PRAGMA table_info(call_records)")]
    rows = query(live.site, "SELECT * FROM call_records WHERE call_id = ?", (call_id,))
    assert len(rows) == 1, call_id
    return dict(zip(names, rows[0], strict=True))


def _router(live: LiveAppliance) -> Any:
    return live.calls.control.router


@needs_sipp
@pytest.mark.timeout(180)
def test_callback_keeps_its_place_is_retried_and_dialled_once(live, carrier_port,
                                                              tmp_path) -> None:
    # No agent phone yet: callers wait. X joins first, then R asks for a callback, then Y.
    early = Background(tmp_path, live, "trunk_call", keys={"hangup": "agent"}, service=DID,
                       timeout=90)
    x = live.wait_event("queue.enter", timeout=30)["call_id"]
    result = sipp(tmp_path, live, "callback_request", keys={"caller": REQUESTER},
                  service=CALLBACK_DID, timeout=40)
    assert result.returncode == 0, sipp_failed(result, live)
    requested = live.wait_event("callback.requested")
    r = requested["call_id"]
    assert (requested["number"], requested["queue"]) == (REQUESTER, "support")
    late = Background(tmp_path, live, "trunk_call", keys={"hangup": "agent"}, service=DID,
                      timeout=90)
    y = live.wait_event("queue.enter", match=lambda p: p["call_id"] not in (x, r))["call_id"]
    router = _router(live)
    assert live.run(router.waiting, "support") == (x, r, y)
    assert live.run(router.caller_view, r).state == "callback-waiting"
    # The requesting call ended with its own reason; the request is kept in the database.
    live.wait_event("call.ended", match=lambda p: p["call_id"] == r)
    assert _record(live, r)["end_reason"] == "callback-requested"
    assert query(live.site, "SELECT state, attempts, number FROM callback_requests"
                 " WHERE call_id = ?", (r,)) == [("waiting", 0, REQUESTER)]

    # The carrier is busy for the first attempt, then answers the retry.
    busy = Carrier(tmp_path, "carrier_busy", calls=1, port=carrier_port)
    answering: Carrier | None = None
    incoming: list[str] = []
    try:
        with agent_phone(tmp_path, live.site, live, "idle", talk=4.0) as agent:
            for _ in range(4):  # X, attempt 1, Y, attempt 2: each answered by the agent
                incoming.append(agent.next("incoming", timeout=40)["remote"])
                agent.command("answer")
                agent.next("disconnected", timeout=40)
                if len(incoming) == 2:
                    assert busy.finish() == 0, busy.text()[-3000:] + live.log_text()[-3000:]
                    answering = Carrier(tmp_path, "callback_customer", calls=1,
                                        port=carrier_port)
            answered = live.wait_event("callback.answered", timeout=30)
        assert answering is not None
        assert answering.finish() == 0, answering.text()[-3000:] + live.log_text()[-3000:]
    finally:
        busy.close()
        if answering is not None:
            answering.close()
    for background in (early, late):
        done = background.join(60)
        assert done.returncode == 0, sipp_failed(done, live)

    # The agent's phone said whom it was calling back; the order was X, R, Y, R again.
    assert [("Callback" in remote and REQUESTER in remote) for remote in incoming] == [
        False, True, False, True]
    # (By time: callback events reach on_event once written, queue events at once.)
    connected = {p["call_id"]: p["at"] for k, p in live.events if k == "queue.connect"}
    dialled = [p["at"] for k, p in live.events if k == "callback.dialled"]
    assert connected[x] < dialled[0] < connected[y] < dialled[1]
    kinds = [(k, p.get("attempt")) for k, p in live.events
             if k.startswith("callback.") and p["call_id"] == r]
    assert kinds == [("callback.requested", None), ("callback.dialled", 1),
                     ("callback.failed", 1), ("callback.dialled", 2),
                     ("callback.answered", 2)]
    # Each attempt's ringing (the screen pop) names the request and what the IVR learnt.
    pops = [p for k, p in live.events if k == "call.ringing" and p.get("callback_of") == r]
    assert [(p["agent"], p["caller"], p["dialled"]) for p in pops] == [
        ("1001", REQUESTER, REQUESTER)] * 2
    assert all(p["variables"]["callback_number"] == REQUESTER for p in pops)
    failed = next(p for k, p in live.events if k == "callback.failed")
    assert (failed["reason"], failed["final"], failed["retry_in_s"]) == (
        "carrier-busy", False, RETRY_INTERVAL)
    assert answered["attempt"] == 2 and answered["agent"] == "1001"
    # The event log has them too (each with its outbox row), in this order.
    assert [k for _, k, _, _ in events_of(live.site, r)
            if k.startswith("callback.")] == [k for k, _ in kinds]

    # One call record per attempt, naming the request.
    attempts = query(live.site, "SELECT call_id FROM call_records WHERE callback_of = ?"
                     " ORDER BY started_at", (r,))
    assert len(attempts) == 2
    first, second = (_record(live, a) for (a,) in attempts)
    for record in (first, second):
        assert (record["direction"], record["queue"], record["agent"], record["caller"],
                record["dialled"]) == ("callback", "support", "1001", REQUESTER, REQUESTER)
    assert first["end_reason"] == "carrier-busy" and first["recording_id"] is None
    assert second["answered_at"] is not None and second["recording_id"] is not None
    assert second["recording_decision"] == "always"
    assert second["call_id"] == answered["attempt_call_id"]
    legs = json.loads(second["legs"])
    assert [leg["party"] for leg in legs] == ["agent", "caller"]
    assert query(live.site, "SELECT state, attempts FROM callback_requests WHERE call_id = ?",
                 (r,)) == [("answered", 2)]
    # Dialled exactly once per attempt: one INVITE to each carrier (a second one would also
    # have failed its scenario).
    assert busy.text().count("INVITE sip:") == 1
    assert answering.text().count("INVITE sip:") == 1
    # The router let the agent go: the callback is gone from the queue, no interaction left.
    assert live.run(router.waiting, "support") == ()
    assert live.run(router.agent_view, "1001").interactions == 0


@needs_sipp
@pytest.mark.timeout(120)
def test_agent_hears_ringback_until_the_customer_answers(live, carrier_port, tmp_path) -> None:
    number = "+15550004444"
    customer = Carrier(tmp_path, "callback_customer_ringing", calls=1, port=carrier_port)
    heard = tmp_path / "agent-heard.wav"
    try:
        with agent_phone(tmp_path, live.site, live, "idle", talk=4.0) as agent:
            result = sipp(tmp_path, live, "callback_request", keys={"caller": number},
                          service=CALLBACK_DID, timeout=40)
            assert result.returncode == 0, sipp_failed(result, live)
            assert number in agent.next("incoming", timeout=30)["remote"]
            agent.command("answer")
            agent.command(f"record {heard} 2.5")
            agent.next("recorded", timeout=20)
            answered = live.wait_event("callback.answered", timeout=30,
                                       match=lambda p: p["attempt"] == 1)
            agent.next("disconnected", timeout=30)
        assert customer.finish() == 0, customer.text()[-3000:] + live.log_text()[-3000:]
    finally:
        customer.close()
    # While the customer's phone rang (3 s), the agent heard 440 + 480 Hz ringback.
    samples, rate = read_heard(heard)
    assert samples.size > rate
    assert min(abs(dominant_hz(samples, rate) - hz) for hz in (440, 480)) < 15
    request = answered["call_id"]
    assert query(live.site, "SELECT state, attempts FROM callback_requests WHERE call_id = ?",
                 (request,)) == [("answered", 1)]


@needs_sipp
@pytest.mark.timeout(120)
def test_pending_callback_survives_a_restart(tmp_path_factory, tmp_path) -> None:
    site = make_site(tmp_path_factory.mktemp("calls-callback-restart"),
                     edit=_site_edit(free_port()))
    first = LiveAppliance(site).start()
    try:
        result = sipp(tmp_path, first, "callback_request", keys={"caller": REQUESTER},
                      service=CALLBACK_DID, timeout=40)
        assert result.returncode == 0, sipp_failed(result, first)
        r = first.wait_event("callback.requested")["call_id"]
        first.wait_event("call.ended", match=lambda p: p["call_id"] == r)
    finally:
        first.close()
    second = LiveAppliance(site, "live-2.log").start()
    try:
        router = _router(second)
        assert second.run(router.waiting, "support") == (r,)
        view = second.run(router.caller_view, r)
        assert (view.state, view.queue) == ("callback-waiting", "support")
        # It rejoined at its stored place, not at the restart: on the router's clock it has
        # waited as long as it has on the wall clock since its place (the first run, its stop
        # and this start included), so relaxation steps and waits count from there.
        [(place_at,)] = query(site, "SELECT place_at FROM callback_requests WHERE call_id = ?",
                              (r,))
        wall = time.time()
        waited = second.run(second.calls.control._router_clock) - view.place_time
        assert abs(waited - (wall - place_at)) < 0.25, (waited, wall - place_at)
        assert "event=callbacks_restored restored=1 pending=1" in second.log_text()
        # What the IVR learnt comes back with it (for the attempts' screen pops).
        restored = second.run(lambda: dict(second.calls.control.callbacks[r].variables))
        assert restored["callback_number"] == REQUESTER
        # A caller joining after the restart queues behind the restored callback.
        later = Background(tmp_path, second, "trunk_call", keys={"hangup": "caller"},
                           service=DID, timeout=40)
        y = second.wait_event("queue.enter")["call_id"]
        assert second.run(router.waiting, "support") == (r, y)
        second.run(second.calls.hangup, y, by="test")
        later.join(60)
        # The restored request is listed, and can be withdrawn (once).
        (pending,) = second.run(second.calls.pending_callbacks)
        assert (pending["call_id"], pending["number"], pending["state"], pending["position"],
                pending["attempts"], pending["agent"]) == (
            r, REQUESTER, "callback-waiting", 1, 0, None)
        second.run(second.calls.cancel_callback, r, by="supervisor-1")
        cancelled = second.wait_event("callback.cancelled")
        assert (cancelled["call_id"], cancelled["by"]) == (r, "supervisor-1")
        assert second.run(router.waiting, "support") == ()
        assert second.run(second.calls.pending_callbacks) == []
        with pytest.raises(CallControlError) as caught:
            second.run(second.calls.cancel_callback, r, by="supervisor-1")
        assert caught.value.status == 404
    finally:
        second.close()
    assert query(site, "SELECT state FROM callback_requests WHERE call_id = ?", (r,)) == [
        ("cancelled",)]
    assert query(site, "SELECT actor FROM audit_log WHERE action = 'callback.cancel'") == [
        ("supervisor-1",)]
    # A third start has nothing to restore.
    third = LiveAppliance(site, "live-3.log").start()
    try:
        assert third.run(third.calls.pending_callbacks) == []
    finally:
        third.close()
