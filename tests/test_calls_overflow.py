"""A queue's overflow with real peers: a caller refused by an empty queue (``join_empty``)
moves to the queue's ``overflow`` queue with their priority and is answered there; the
overflow is in the event log. SIPp is the carrier caller, pjsua2 the agent's phone."""

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
        # support: only 1002, who never logs in; its callers go to backup, where 1001 is.
        data["queues"][0].update(members=["1002"], record=False, join_empty="unstaffed",
                                 overflow="backup")
        data["queues"].append({"name": "backup", "members": ["1001"], "record": False})

    site = make_site(tmp_path_factory.mktemp("overflow"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


@needs_sipp
@pytest.mark.timeout(120)
def test_a_caller_refused_by_an_empty_queue_is_answered_in_its_overflow_queue(
        live, tmp_path) -> None:
    caller: dict[str, Any] = {}
    with agent_phone(tmp_path, live.site, live, "answer", talk=2.0) as agent:
        wait_for(lambda: log_lines(live, "agent_login"), 15, "the agent logged in", live)
        thread = threading.Thread(target=lambda: caller.update(result=sipp(
            tmp_path, live, "trunk_call", keys={"hangup": "agent"}, service=DID,
            timeout=60)), daemon=True)
        thread.start()
        connected = live.wait_event("queue.connect", timeout=30)
        agent.next("disconnected", timeout=30)
        record = live.wait_event("call.record", timeout=30,
                                 match=lambda p: p["call_id"] == connected["call_id"])
        left = live.wait_event("queue.abandon", timeout=10,
                               match=lambda p: p["call_id"] == connected["call_id"])
    thread.join(60)
    assert not thread.is_alive()
    assert caller["result"].returncode == 0, sipp_failed(caller["result"], live)
    assert (connected["queue"], connected["agent"]) == ("backup", "1001")
    [moved] = log_lines(live, "queue_overflow")
    assert (moved["queue"], moved["target"], moved["reason"]) == ("support", "backup",
                                                                  "no-agents")
    assert (left["queue"], left["overflow"]) == ("support", "no-agents")
    assert (record["queue"], record["agent"]) == ("backup", "1001")
