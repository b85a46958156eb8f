"""An agent busy on a call the router did not route (here: their own outbound call through the
carrier) is not offered a queued caller meanwhile, and is offered as soon as they hang up
(docs/routing.md §6). Real peers: a pjsua2 agent phone, SIPp as the caller and the carrier."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from peers import (
    DID,
    Carrier,
    LiveAppliance,
    agent_phone,
    free_port,
    log_lines,
    make_site,
    sipp,
    sipp_failed,
    wait_for,
)

NUMBER = "+15551230000"

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")


@pytest.fixture()
def live(tmp_path_factory) -> Iterator[tuple[LiveAppliance, int]]:
    carrier_port = free_port()

    def edit(data: dict) -> None:
        data["trunk"]["carrier"] = {"host": "127.0.0.1", "port": carrier_port}
        data["queues"][0].update(members=["1001"], ring_timeout=10.0, record=False)

    site = make_site(tmp_path_factory.mktemp("calls-busy-outside"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance, carrier_port
    finally:
        appliance.close()


@needs_sipp
@pytest.mark.timeout(120)
def test_agent_on_an_outbound_call_is_offered_only_after_hanging_up(live, tmp_path) -> None:
    live, carrier_port = live
    carrier = Carrier(tmp_path, "callback_customer", calls=1, port=carrier_port)
    caller: dict[str, Any] = {}
    try:
        with agent_phone(tmp_path, live.site, live, "idle", talk=4.0) as agent:
            wait_for(lambda: log_lines(live, "agent_login"), 15, "the agent logged in", live)
            agent.command(f"dial {NUMBER}")
            outbound = live.wait_event("call.dialling")["call_id"]
            agent.next("answered")
            # The router was told of the call it did not route, as the phone's INVITE came in.
            started = wait_for(lambda: [e for e in log_lines(live, "agent_outside_call")
                                        if e["call"] == outbound], 15, "router told", live)
            assert [(e["agent"], e["state"]) for e in started] == [("1001", "started")]
            # A caller queues while the agent talks to the customer they called.
            thread = threading.Thread(target=lambda: caller.update(result=sipp(
                tmp_path, live, "trunk_call", keys={"hangup": "agent"}, service=DID,
                timeout=60)), daemon=True)
            thread.start()
            queued = live.wait_event("queue.enter")["call_id"]
            # The router routes as the caller joins: the agent at their cap is not offered.
            router = live.calls.control.router
            waiting = live.run(router.caller_view, queued)
            busy = live.run(router.agent_view, "1001")
            agent.command("hangup")  # the agent ends the outbound call
            agent.next("disconnected", timeout=30)
            ended = live.wait_event("call.ended", match=lambda p: p["call_id"] == outbound)
            agent.next("incoming", timeout=20)  # only now the queued caller rings
            agent.command("answer")
            connected = live.wait_event("queue.connect", timeout=20)
            view = live.run(live.calls.control.router_view, "1001")
            agent.next("disconnected", timeout=30)
        assert carrier.finish() == 0, carrier.text()[-3000:] + live.log_text()[-3000:]
        thread.join(60)
        assert not thread.is_alive()
        assert caller["result"].returncode == 0, sipp_failed(caller["result"], live)
    finally:
        carrier.close()
    assert (waiting.state, waiting.offered_to) == ("waiting", ())
    assert (busy.outside, busy.interactions, busy.ringing) == (1, 0, 0)
    ended_outside = [e for e in log_lines(live, "agent_outside_call")
                     if e["call"] == outbound and e["state"] == "ended"]
    assert len(ended_outside) == 1
    # Never offered while busy, so no offer had to be refused without ringing.
    assert not log_lines(live, "agent_busy_outside")
    assert connected["call_id"] == queued and connected["agent"] == "1001"
    assert connected["at"] >= ended["at"]
    # The phone never rang during the outbound call: one incoming call in all, after it.
    said = [e["event"] for e in agent.seen]
    assert said.count("incoming") == 1
    assert said.index("incoming") > said.index("disconnected")
    # No missed offer was counted against the agent (no auto-pause): they were busy.
    assert (view.missed, view.presence, view.interactions, view.outside) == (0, "ready", 1, 0)
