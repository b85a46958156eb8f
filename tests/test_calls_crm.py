"""The IVR's CRM look-up on a real call: the customer's web service names the caller's priority
and tier, and they reach the queue; when the service fails, the call carries on without them.

The CRM is a real HTTP server on 127.0.0.1 (standard library), the carrier SIPp
(tests/sipp/trunk_call.xml), the agent's phone pjsua2; the appliance runs in this process.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from collections.abc import Iterator
from typing import NamedTuple

import pytest
from peers import HttpPeer, LiveAppliance, agent_phone, http_peer, make_site, sipp, sipp_failed

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(120),
]


class Crm(NamedTuple):
    """The customer's web service: answers each look-up with the next of ``answers`` (status,
    body), 503 when none is left."""

    peer: HttpPeer
    answers: list[tuple[int, bytes]]

    @property
    def url(self) -> str:
        return f"{self.peer.url}/ivr/lookup"

    @property
    def asked(self) -> list[dict]:
        """What each look-up sent, in order."""
        return [r.json() for r in self.peer.requests]


@pytest.fixture(scope="module")
def crm() -> Iterator[Crm]:
    answers: list[tuple[int, bytes]] = []
    with http_peer(lambda *_: answers.pop(0) if answers else (503, b"{}")) as peer:
        yield Crm(peer, answers)


@pytest.fixture(scope="module")
def live(tmp_path_factory, crm: Crm) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        flow = data["ivr"]["flows"]["main"]
        flow["nodes"]["lookup"] = {
            "type": "http", "url": crm.url, "timeout": 2,
            "map": {"priority": "customer.priority", "tier": "customer.tier"},
            "next": flow["start"], "on_failure": flow["start"]}
        flow["start"] = "lookup"
        data["queues"][0]["record"] = False

    site = make_site(tmp_path_factory.mktemp("calls-crm-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _one_call(live: LiveAppliance, tmp_path) -> tuple[dict, dict]:
    with agent_phone(tmp_path, live.site, live, "answer", talk=1.0) as agent, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        carrier = pool.submit(sipp, tmp_path, live, "trunk_call", keys={"hangup": "agent"})
        seen = {p["call_id"] for k, p in list(live.events) if k == "call.offered"}
        call_id = live.wait_event("call.offered",
                                  match=lambda p: p["call_id"] not in seen)["call_id"]
        entered = live.wait_event("queue.enter", match=lambda p: p["call_id"] == call_id)
        agent.wait("answered")
        ended = live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
        result = carrier.result(60)
        assert result.returncode == 0, sipp_failed(result, live)
    return entered, ended


def test_the_crm_names_a_valuable_caller_and_the_queue_hears_it(live, crm, tmp_path) -> None:
    crm.answers.append((200, json.dumps(
        {"customer": {"priority": 7, "tier": "gold", "name": "A. Customer"}}).encode()))
    entered, ended = _one_call(live, tmp_path)
    assert crm.asked[-1]["caller"] == "+15557654321"
    assert crm.asked[-1]["dialled"] == "+15550100"
    assert (entered["priority"], entered["tier"]) == (7, "gold")
    assert ended["end_reason"] == "agent-hung-up"


def test_a_failing_crm_leaves_the_caller_served_at_the_default_priority(live, crm,
                                                                        tmp_path) -> None:
    crm.answers.append((500, b"{}"))
    asked_before = len(crm.asked)
    entered, ended = _one_call(live, tmp_path)
    assert len(crm.asked) == asked_before + 1
    assert (entered["priority"], entered["tier"]) == (0, None)
    assert ended["end_reason"] == "agent-hung-up"
    assert "event=ivr_lookup_failed" in live.log_text() and "status 500" in live.log_text()
