"""The screen pop carries what the IVR learnt: a carrier caller (SIPp) keys an account number
in the IVR (RFC 4733 digits), the IVR asks the CRM about the caller (a real HTTP server on
127.0.0.1, with an API key), and the call rings agent 1001's phone (pjsua2, logged in at the
desk). The CRM's screen-pop URL (the same server) and the agent's WebSocket (``/api/events``)
both get the collected digits, the CRM's answer, the priority and the tier; neither the
CRM's API key nor the webhook's signing key ever appears in what is sent or logged.

The appliance runs as ``edgecc appliance`` (its composition root posts the webhooks).
"""

from __future__ import annotations

import concurrent.futures
import hmac
import json
import shutil
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from peers import CALLER, DID, HttpPeer, agent_phone, http_peer, sipp, sipp_failed
from test_web_pages import WebSite, close_web_site, start_web_site

from appliance.webhooks import sign

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(150),
]

API_KEY = "crm-api-key-7f3e9a1c5b"
"""The CRM's key the IVR's look-up sends (a header): must never reach a pop or the log."""
SIGNING_KEY = b"screen-pop-signing-key-0123456789"
ACCOUNT = "4271"
PIN = "583920"
"""Keyed into a ``secret`` collect node: the CRM's look-up gets it, nothing else does."""
KEYED = f"1{ACCOUNT}#{PIN}#"
"""The menu choice, then the account number ended by the terminator."""
WAIT_S = 20.0


LOOKUP_ANSWER = json.dumps({"customer": {"name": "A. Customer", "priority": 40,
                                        "tier": "gold"}}).encode()


class Crm(NamedTuple):
    """A CRM on 127.0.0.1: ``/lookup`` answers the IVR's look-up, ``/pop`` takes screen pops
    (204). Everything received is kept."""

    peer: HttpPeer

    @property
    def url(self) -> str:
        return self.peer.url

    @property
    def lookups(self) -> list[tuple[dict[str, str], dict]]:
        return [(r.headers, r.json()) for r in self.peer.requests if r.path == "/lookup"]

    @property
    def pops(self) -> list[tuple[dict[str, str], bytes]]:
        return [(r.headers, r.body) for r in self.peer.requests if r.path == "/pop"]

    def pop(self, match, timeout: float = WAIT_S) -> tuple[dict[str, str], bytes, dict]:
        """The first screen pop whose payload satisfies ``match`` (bounded wait)."""
        first = self.peer.wait(lambda r: r.path == "/pop" and match(r.json()["payload"]),
                               timeout)[0]
        return first.headers, first.body, first.json()


@pytest.fixture(scope="module")
def crm() -> Iterator[Crm]:
    with http_peer(lambda path, *_: (200, LOOKUP_ANSWER) if path == "/lookup" else (204, b"")
                   ) as peer:
        yield Crm(peer)


@pytest.fixture(scope="module")
def site(tmp_path_factory, crm: Crm) -> Iterator[WebSite]:
    directory = tmp_path_factory.mktemp("screenpop-site")

    def edit(data: dict) -> None:
        key = directory / "pop.key"
        key.write_bytes(SIGNING_KEY)
        key.chmod(0o600)
        data["webhooks"] = [{"url": f"{crm.url}/pop", "secret_file": "pop.key",
                             "kinds": ["screen.pop"], "backoff": 0.05, "retries": 3}]
        data["queues"][0]["record"] = False
        data.setdefault("trunk", {})["allowed_sources"] = ["127.0.0.2/32"]
        # Menu "1" -> the account number (digits up to "#") -> the CRM -> the queue.
        data["ivr"]["flows"]["main"]["variables"] = ["customer_name"]
        nodes = data["ivr"]["flows"]["main"]["nodes"]
        nodes["welcome"]["options"]["1"] = "account"
        nodes["account"] = {"type": "collect", "variable": "account", "max_digits": 8,
                            "timeout": 5, "next": "pin", "on_failure": "support"}
        nodes["pin"] = {"type": "collect", "variable": "pin", "max_digits": 8, "secret": True,
                        "timeout": 5, "next": "lookup", "on_failure": "support"}
        nodes["lookup"] = {
            "type": "http", "url": f"{crm.url}/lookup", "timeout": 3,
            "headers": {"X-Api-Key": API_KEY},
            "map": {"customer_name": "customer.name", "priority": "customer.priority",
                    "tier": "customer.tier"},
            "next": "support", "on_failure": "support"}

    running = start_web_site(directory, edit=edit)
    try:
        yield running
    finally:
        close_web_site(running)


def write_digits_pcap(path: Path, digits: str) -> None:
    """A libpcap file of RFC 4733 telephone-event packets (payload type 101, as trunk_digits.xml
    offers) keying ``digits``: per digit 160 ms of event packets every 20 ms, the first with
    the marker bit (§2.5.1.3 new event), the last three with the E bit (§2.5.1.4 sent three
    times), then 300 ms of nothing before the next."""
    codes = {**{str(d): d for d in range(10)}, "*": 10, "#": 11}
    loopback = socket.inet_aton("127.0.0.1")
    seq, usec = 0, 500_000  # half a second in: the IVR's first prompt has started
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for index, digit in enumerate(digits):
            timestamp = index * 8000
            for step in range(1, 11):
                end = step >= 8
                payload = struct.pack("!BBH", codes[digit], (0x80 if end else 0) | 10,
                                      min(step, 8) * 160)
                marker = 0x80 if step == 1 else 0
                rtp = struct.pack("!BBHII", 0x80, marker | 101, seq, timestamp, 0x5EED) + payload
                udp = struct.pack("!HHHH", 40000, 40002, 8 + len(rtp), 0) + rtp
                ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq, 0, 64, 17, 0,
                                 loopback, loopback) + udp
                frame = b"\x00" * 12 + b"\x08\x00" + ip
                out.write(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000,
                                      len(frame), len(frame)) + frame)
                seq += 1
                usec += 20_000
            usec += 300_000


def test_the_pop_and_the_agents_desk_carry_the_ivr_data(site: WebSite, crm: Crm,
                                                         tmp_path) -> None:
    from websockets.sync.client import connect

    write_digits_pcap(tmp_path / "digits.pcap", KEYED)
    token = site.token("alex")  # alex is agent 1001
    url = site.url.replace("http://", "ws://") + f"/api/events?token={token}"
    with connect(url, open_timeout=WAIT_S) as ws, \
            agent_phone(tmp_path, site, site, "answer", talk=1.0, user="1001") as agent, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert json.loads(ws.recv(timeout=WAIT_S))["type"] == "hello"
        carrier = pool.submit(sipp, tmp_path, site, "trunk_digits", keys={"hangup": "agent"})
        seen: list[dict] = []
        deadline = time.monotonic() + 60
        while not any(e["topic"] == "call.ringing" for e in seen):
            assert time.monotonic() < deadline, f"no call.ringing on the desk; saw {seen}"
            message = json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message["type"] == "event":
                seen.append(message)
        agent.wait("answered")
        agent.wait("disconnected")
        result = carrier.result(60)
        assert result.returncode == 0, sipp_failed(result, site)

    # The desk: the call's offer first (who calls), then its ringing with what the IVR learnt.
    ringing = next(e["data"] for e in seen if e["topic"] == "call.ringing")
    call_id = ringing["call_id"]
    offered = [e["data"] for e in seen if e["topic"] == "call.offered"]
    assert [o["call_id"] for o in offered] == [call_id]
    assert (offered[0]["caller"], offered[0]["dialled"]) == (CALLER, DID)
    _assert_ivr_facts(ringing, call_id)

    # The CRM's look-up had the key and the digits keyed before it.
    headers, asked = crm.lookups[-1]
    assert headers["x-api-key"] == API_KEY
    assert asked["variables"]["account"] == ACCOUNT
    assert asked["variables"]["pin"] == PIN  # the flow's own check of the PIN

    # The pops: at the offer (before the IVR: nothing learnt yet), and at the ringing.
    _, _, at_offer = crm.pop(lambda p: p["call_id"] == call_id and p["agent"] is None)
    first = at_offer["payload"]
    assert (first["caller"], first["dialled"], first["flow"]) == (CALLER, DID, "main")
    assert (first["priority"], first["tier"]) == (None, None)
    assert "account" not in first["variables"]
    pop_headers, body, at_ringing = crm.pop(
        lambda p: p["call_id"] == call_id and p["agent"] == "1001")
    assert at_ringing["kind"] == "screen.pop"
    _assert_ivr_facts(at_ringing["payload"], call_id)
    assert hmac.compare_digest(pop_headers["x-edgecc-signature"],
                               sign(SIGNING_KEY, pop_headers["x-edgecc-timestamp"], body))

    # No secret went anywhere: not in a pop, not on the desk, not in the log (the PIN, and no
    # keyed digit at all: the log never carries a caller's digits).
    everything = [b for _, b in crm.pops] + [json.dumps(e).encode() for e in seen]
    log_text = site.log_text()
    for secret in (API_KEY.encode(), SIGNING_KEY, PIN.encode()):
        assert not any(secret in blob for blob in everything)
        assert secret.decode() not in log_text
    assert "digit=" not in log_text


def _assert_ivr_facts(pop: dict, call_id: str) -> None:
    assert (pop["call_id"], pop["agent"], pop["queue"]) == (call_id, "1001", "support")
    assert (pop["caller"], pop["dialled"], pop["flow"]) == (CALLER, DID, "main")
    assert (pop["priority"], pop["tier"]) == (40, "gold")
    variables = pop["variables"]
    assert variables["account"] == ACCOUNT  # the digits keyed in the IVR
    assert "pin" not in variables
    assert variables["menu_choice"] == "1"
    assert (variables["customer_name"], variables["priority"], variables["tier"]) == (
        "A. Customer", "40", "gold")
    assert variables["customer_source"] == "crm"
