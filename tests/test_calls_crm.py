"""The IVR's CRM look-up on a real call: the customer's web service names the caller's priority
and tier, and they reach the queue; when the service fails, the call carries on without them.

The CRM is a real HTTP server on 127.0.0.1 (standard library), the carrier SIPp
(tests/sipp/trunk_call.xml), the agent's phone pjsua2; the appliance runs in this process.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from peers import LiveAppliance, agent_phone, make_site, sipp, sipp_failed

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(120),
]


class Crm:
    """Answers each POST with the next queued (status, body); records what it was asked."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, bytes]] = []
        self.asked: list[dict] = []
        crm = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                length = int(self.headers.get("Content-Length") or 0)
                crm.asked.append(json.loads(self.rfile.read(length)))
                status, body = crm.answers.pop(0) if crm.answers else (503, b"{}")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/ivr/lookup"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def crm() -> Iterator[Crm]:
    server = Crm()
    try:
        yield server
    finally:
        server.close()


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
