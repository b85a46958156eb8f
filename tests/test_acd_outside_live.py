"""The router hears of a call it did not route from call control (docs/routing.md §6): a
click-to-dial ringing the agent's phone busies them, and its refusal frees them at once. Real
peers: a pjsua2 agent phone, SIPp as the caller."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from peers import (
    DID,
    LiveAppliance,
    agent_phone,
    free_port,
    log_lines,
    make_site,
    sipp,
    sipp_failed,
    wait_for,
)

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")


@pytest.fixture()
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        # Never dialled here: the agent refuses the click-to-dial before the number is called.
        data["trunk"]["carrier"] = {"host": "127.0.0.1", "port": free_port()}
        data["queues"][0].update(members=["1001"], ring_timeout=10.0, record=False)

    site = make_site(tmp_path_factory.mktemp("acd-outside-live"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


@needs_sipp
@pytest.mark.timeout(120)
def test_refused_click_to_dial_frees_the_agent_for_the_queued_caller(live, tmp_path) -> None:
    caller: dict[str, Any] = {}
    router = live.calls.control.router
    with agent_phone(tmp_path, live.site, live, "idle", talk=2.0) as agent:
        wait_for(lambda: log_lines(live, "agent_login"), 15, "the agent logged in", live)
        dialled = live.run(live.calls.dial, "1001", "+1 555 123 0002", by="web")
        agent.next("incoming")  # the phone rings for the click-to-dial
        wait_for(lambda: [e for e in log_lines(live, "agent_outside_call")
                          if e["call"] == dialled and e["state"] == "started"],
                 15, "the router told of the click-to-dial", live)
        thread = threading.Thread(target=lambda: caller.update(result=sipp(
            tmp_path, live, "trunk_call", keys={"hangup": "agent"}, service=DID,
            timeout=60)), daemon=True)
        thread.start()
        queued = live.wait_event("queue.enter")["call_id"]
        waiting = live.run(router.caller_view, queued)
        busy = live.run(router.agent_view, "1001")
        agent.command("hangup")  # the agent refuses the click-to-dial (603)
        live.wait_event("call.ended", match=lambda p: p["call_id"] == dialled)
        agent.next("incoming", timeout=20)  # now the queued caller rings
        agent.command("answer")
        connected = live.wait_event("queue.connect", timeout=20)
        agent.next("disconnected", timeout=30)
    thread.join(60)
    assert not thread.is_alive()
    assert caller["result"].returncode == 0, sipp_failed(caller["result"], live)
    assert (waiting.state, waiting.offered_to) == ("waiting", ())
    assert (busy.outside, busy.interactions, busy.ringing) == (1, 0, 0)
    assert connected["call_id"] == queued and connected["agent"] == "1001"
    told = [(e["agent"], e["state"]) for e in log_lines(live, "agent_outside_call")
            if e["call"] == dialled]
    assert told == [("1001", "started"), ("1001", "ended")]
    assert not log_lines(live, "agent_busy_outside")
    said = [e["event"] for e in agent.seen]
    assert said.count("incoming") == 2  # the click-to-dial, then the queued caller
    view = live.run(router.agent_view, "1001")
    assert (view.missed, view.outside) == (0, 0)
