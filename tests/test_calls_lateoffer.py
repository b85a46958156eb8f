"""Late offer (RFC 3261 §13.2.1, RFC 3264 §5) with real peers: INVITEs and re-INVITEs without a
description get our offer in the 200 and the answer comes in the ACK.

The carrier is SIPp from 127.0.0.2 (tests/sipp/trunk_late_offer*.xml); the agent is pjsua2
(1001, 440 Hz, auto answer); an agent's phone dialling out without an offer is pjsua2 with
PJSUA_CALL_NO_SDP_OFFER, the carrier SIPp as a UAS that challenges first. The appliance runs in
this process.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterator

import numpy as np
import pytest
from peers import (
    LiveAppliance,
    agent_phone,
    call_record,
    channel_rms,
    free_port,
    log_lines,
    make_site,
    sipp,
    sipp_failed,
    wait_for,
)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")]

NUMBER = "+15551230000"
TRUNK_USER, TRUNK_REALM, TRUNK_PASSWORD = "site-trunk", "carrier.test", "trunk-secret"


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    ha1 = hashlib.md5(f"{TRUNK_USER}:{TRUNK_REALM}:{TRUNK_PASSWORD}".encode()).hexdigest()

    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", record=False, members=["1001"])
        data.setdefault("trunk", {}).update(
            allowed_sources=["127.0.0.2/32"],
            carrier={"host": "127.0.0.1", "port": carrier_port},
            auth={"user": TRUNK_USER, "realm": TRUNK_REALM, "ha1_md5": ha1})

    site = make_site(tmp_path_factory.mktemp("calls-lateoffer-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _answered(live: LiveAppliance, mark: int, call_id: str) -> list[dict[str, str]]:
    return [e for e in log_lines(live, "late_offer_answered", mark) if e["call"] == call_id]


def test_carrier_late_offer_runs_the_ivr_and_reaches_the_agent(live, tmp_path) -> None:
    mark = len(live.log_text())
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
        result = sipp(tmp_path, live, "trunk_late_offer", timeout=40)
        assert result.returncode == 0, sipp_failed(result, live)
        agent.wait("disconnected")
    record = call_record(live.site, live, mark)
    call_id = record["call_id"]
    assert (record["agent"], record["queue"], record["end_reason"]) == (
        "1001", "support", "caller-hung-up")
    caller, agent_leg = record["legs"]
    # Answered at once (the 200 carried the offer), before the agent answered.
    assert caller["party"] == "caller" and caller["answered_at"] is not None
    assert agent_leg["agent"] == "1001" and agent_leg["answered_at"] > caller["answered_at"]
    assert record["ivr_trace"], "the IVR ran after the ACK's answer"
    # The ACK answered our offer twice: the INVITE's and the re-INVITE's.
    answered = _answered(live, mark, call_id)
    assert [(e["initial"], e["codec"]) for e in answered] == [
        ("True", "PCMA"), ("False", "PCMA")]
    # Both 200s to the caller carried an offer (m= line) and nothing was refused.
    offers = re.findall(r"SIP/2.0 200 OK.*?m=audio \d+ RTP/AVP ([\d ]+)", result.messages,
                        re.S)
    assert len(offers) >= 2 and all("8" in o.split() for o in offers)
    assert not [e for e in log_lines(live, "call_refused", mark) if e.get("call") == call_id]
    # The agent heard the caller's speech (sent after the ACKs set the media).
    samples = np.frombuffer(agent.recording.read_bytes()[44:], dtype="<i2")
    assert channel_rms(samples) > 100


def test_late_offer_answer_without_a_common_codec_ends_with_a_reason(live, tmp_path) -> None:
    mark = len(live.log_text())
    legs_before = live.calls.engine.legs_active
    result = sipp(tmp_path, live, "trunk_late_offer_g729", timeout=30)
    assert result.returncode == 0, sipp_failed(result, live)
    # RFC 3326: the BYE says why.
    bye = result.messages[result.messages.index("BYE sip:"):]
    assert re.search(r"Reason: SIP ;cause=488", bye), bye[:800]
    record = call_record(live.site, live, mark)
    assert (record["end_reason"], record["end_code"]) == ("no-common-codec", 488)
    assert record["agent"] is None and record["queue"] is None and record["ivr_trace"] == []
    (caller,) = record["legs"]
    assert caller["end_reason"] == "system"
    refused = log_lines(live, "call_refused", mark)
    assert [(e["reason"], e["offer"]) for e in refused] == [("no-common-codec", "late")]
    wait_for(lambda: live.calls.engine.legs_active == legs_before, 10,
             "the call's engine leg released", live)


# An agent's phone that dials without an offer (pjsua2's PJSUA_CALL_NO_SDP_OFFER): the shared
# phone script in peers.py always offers, so this one is small and on its own. It prints one
# JSON line per event: "state" (state, code), "media", "closed".
LATE_PHONE = r"""
import json, queue, sys, time
import pjsua2 as pj

user, password, realm, port, number = sys.argv[1:6]
events = queue.Queue()

class Call(pj.Call):
    def onCallState(self, prm):
        info = self.getInfo()
        events.put(("state", info.state, info.lastStatusCode))

    def onCallMediaState(self, prm):
        events.put(("media",))

ep = pj.Endpoint()
ep.libCreate()
cfg = pj.EpConfig()
cfg.logConfig.consoleLevel = 0
cfg.logConfig.level = 0
ep.libInit(cfg)
ep.audDevManager().setNullDev()
tcfg = pj.TransportConfig()
tcfg.boundAddress = "127.0.0.1"
ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
ep.libStart()
acfg = pj.AccountConfig()
acfg.idUri = f"sip:{user}@{realm}"
acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, user, 0, password))
acc = pj.Account()
acc.create(acfg)
call = Call(acc)
op = pj.CallOpParam(True)
op.opt.flag = pj.PJSUA_CALL_NO_SDP_OFFER
call.makeCall(f"sip:{number}@127.0.0.1:{port}", op)
deadline = time.monotonic() + 40
hangup_at = None
try:
    while time.monotonic() < deadline:
        wait = deadline - time.monotonic()
        if hangup_at is not None:
            wait = min(wait, hangup_at - time.monotonic())
        try:
            event = events.get(timeout=max(0.0, wait))
        except queue.Empty:
            if hangup_at is not None and time.monotonic() >= hangup_at:
                hangup_at = None
                call.hangup(pj.CallOpParam())
            continue
        if event[0] == "state":
            print(json.dumps({"event": "state", "state": event[1], "code": event[2]}),
                  flush=True)
            if event[1] == pj.PJSIP_INV_STATE_CONFIRMED:
                hangup_at = time.monotonic() + 2.0
            if event[1] == pj.PJSIP_INV_STATE_DISCONNECTED:
                break
        else:
            print(json.dumps({"event": "media"}), flush=True)
finally:
    ep.libDestroy()
    print(json.dumps({"event": "closed"}), flush=True)
"""


def test_agent_phone_late_offer_dials_out(live, carrier_port, tmp_path) -> None:
    import json
    import subprocess
    import sys

    from peers import Carrier

    pytest.importorskip("pjsua2")
    mark = len(live.log_text())
    script = tmp_path / "late_phone.py"
    script.write_text(LATE_PHONE)
    carrier = Carrier(tmp_path, "carrier_uas_retry",
                      calls=1, port=carrier_port)
    try:
        phone = subprocess.run(
            [sys.executable, str(script), "1001", live.site.passwords["1001"],
             live.site.realm, str(live.port), NUMBER],
            capture_output=True, timeout=60, cwd=tmp_path)
        assert carrier.finish() == 0, carrier.text()[-3000:] + live.log_text()[-3000:]
    finally:
        carrier.close()
    said = [json.loads(line) for line in phone.stdout.decode().splitlines()
            if line.startswith("{")]
    assert {"event": "media"} in said, (said, phone.stderr.decode()[-2000:])
    assert any(e.get("state") == 5 for e in said)  # PJSIP_INV_STATE_CONFIRMED
    record = call_record(live.site, live, mark)
    assert (record["direction"], record["agent"], record["dialled"], record["end_reason"]) == (
        "outbound", "1001", NUMBER, "agent-hung-up")
    near, far = record["legs"]
    assert near["answered_at"] is not None and far["number"] == NUMBER
    (answered,) = _answered(live, mark, record["call_id"])
    assert answered["initial"] == "True" and answered["codec"] in ("PCMU", "PCMA")
