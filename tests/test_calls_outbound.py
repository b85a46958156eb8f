"""Calls agents place through the carrier trunk: dial rules, the carrier's digest, the record.

The agent is pjsua2 (its own process) dialling the appliance; the carrier is SIPp as a UAS
(tests/sipp/carrier_uas_retry.xml) that challenges the first INVITE with 401 and answers the
retry carrying credentials in the same call (same Call-ID and From tag, CSeq one higher). The appliance runs in this process (``peers.LiveAppliance``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import wave
from collections.abc import Iterator

import numpy as np
import pytest
from peers import (
    TRUNK_USER,
    LiveAppliance,
    agent_phone,
    carrier_for,
    channel_rms,
    decrypt_recording,
    events_of,
    free_port,
    live_site,
    query,
    with_carrier,
)

from appliance.calls import CallControlError
from appliance.calls.dialling import check_dial, normalize_number, trunk_authorization
from appliance.config import DiallingConfig, DialRole, TrunkAuth

# The carrier challenges the first INVITE; the retry is in the same call when the dialog
# layer can keep the From tag and raise the CSeq (RFC 3261 §8.1.3.5), else a new call.
CHALLENGING_CARRIER = ("carrier_uas_retry", 1)

NUMBER = "+15551230000"


# --------------------------------------------------------------------------- dial rules


def test_dial_rules_per_role() -> None:
    rules = DiallingConfig(roles={
        "agent": DialRole(allowed_prefixes=("+1555", "555"), max_calls=1),
        "supervisor": DialRole(international=True, premium=False, max_calls=2),
    })
    allowed = check_dial(rules, "agent", "+1 (555) 123-0000", 0)
    assert (allowed.allowed, allowed.number, allowed.record) == (True, "+15551230000", True)
    # International: the longest prefix decides ("+1" national beats "+" international).
    assert check_dial(rules, "agent", "+442071234567", 0).reason == "international"
    assert check_dial(rules, "agent", "011442071234567", 0).status == 403
    assert check_dial(rules, "supervisor", "+442071234567", 0).allowed
    # Premium is refused even for a role that may dial abroad.
    premium = check_dial(rules, "supervisor", "+19005550100", 0)
    assert (premium.allowed, premium.status, premium.reason) == (False, 403, "premium")
    # Outside the role's prefixes; too many calls; not a number; a role without rules.
    assert check_dial(rules, "agent", "+12125550100", 0).reason == "not-allowed"
    busy = check_dial(rules, "agent", "5551234", 1)
    assert (busy.status, busy.reason) == (486, "too-many-calls")
    assert check_dial(rules, "agent", "555;drop", 0).status == 484
    assert check_dial(rules, "agent", "", 0).status == 484
    assert check_dial(DiallingConfig(roles={}), "agent", "5551234", 0).reason == (
        "role-may-not-dial")
    assert normalize_number(" 555.123 ") == "555123"


def test_trunk_authorization_from_ha1_matches_rfc2617_vector() -> None:
    # RFC 2617 §3.5: the worked example (qop=auth), answered from HA1 alone.
    ha1 = hashlib.md5(b"Mufasa:testrealm@host.com:Circle Of Life").hexdigest()
    auth = TrunkAuth(user="Mufasa", realm="testrealm@host.com", ha1_md5=ha1)
    challenge = ('Digest realm="testrealm@host.com", qop="auth,auth-int", '
                 'nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093", '
                 'opaque="5ccc069c403ebaf9f0171e9517f40e41"')
    value = trunk_authorization(challenge, auth, method="GET", uri="/dir/index.html",
                                cnonce="0a4f113b")
    assert 'response="6629fae49393a05397450978507c4ef1"' in value
    assert 'opaque="5ccc069c403ebaf9f0171e9517f40e41"' in value and "nc=00000001" in value
    # A challenge for another realm, or an algorithm without a stored HA1: a clear error.
    with pytest.raises(ValueError, match="realm"):
        trunk_authorization(challenge.replace("testrealm@host.com", "other"), auth,
                            method="GET", uri="/")
    with pytest.raises(ValueError, match="SHA-256"):
        trunk_authorization(challenge + ", algorithm=SHA-256", auth, method="GET", uri="/")


def test_bad_dialling_config_names_the_key() -> None:
    from appliance.config import ConfigError, parse_site_yaml

    with pytest.raises(ConfigError) as caught:
        parse_site_yaml("dialling:\n  roles:\n    agent:\n      allowed_prefixes: ['+1x']\n")
    assert "dialling.roles.agent.allowed_prefixes" in str(caught.value)
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml("dialling:\n  roles:\n    operator: {}\n")
    assert "dialling.roles" in str(caught.value)


# --------------------------------------------------------------------------- real peers

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    # The phones are on 127.0.0.1: carrier INVITEs come only from 127.0.0.2 (make_site).
    with live_site(tmp_path_factory.mktemp("calls-outbound-site"),
                   lambda data: with_carrier(data, carrier_port)) as appliance:
        yield appliance


@needs_sipp
@pytest.mark.timeout(120)
def test_agent_dials_out_through_the_carrier(live, carrier_port, tmp_path) -> None:
    site = live.site
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER) as carrier, \
            agent_phone(tmp_path, site, live, f"dial:{NUMBER}", talk=3.0) as agent:
        dialling = live.wait_event("call.dialling")
        assert (dialling["agent"], dialling["number"]) == ("1001", NUMBER)
        agent.wait("answered")
        agent.wait("hanging_up")
        agent.wait("disconnected")
        agent.wait("closed")
    messages = carrier.text()
    # The first INVITE was challenged; the second answered it with the trunk's user.
    assert "SIP/2.0 401" in messages and f'username="{TRUNK_USER}"' in messages
    invites = _invites(messages)
    assert len(invites) == 2
    assert "authorization" in invites[1] and "authorization" not in invites[0]
    call_id = dialling["call_id"]
    ended = live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    assert ended["end_reason"] == "agent-hung-up"
    names = [r[1] for r in query(site, "PRAGMA table_info(call_records)")]
    rows = query(site, "SELECT * FROM call_records WHERE call_id = ?", (call_id,))
    record = dict(zip(names, rows[0], strict=True))
    assert (record["direction"], record["agent"], record["caller"], record["dialled"]) == (
        "outbound", "1001", "1001", NUMBER)
    assert record["queue"] is None and record["flow"] is None
    assert record["started_at"] <= record["answered_at"] <= record["ended_at"]
    near, far = json.loads(record["legs"])
    assert (near["party"], near["direction"], near["agent"]) == ("agent", "inbound", "1001")
    assert (far["party"], far["direction"]) == ("caller", "outbound")
    assert near["end_reason"] == "agent-hung-up" and far["end_reason"] == "agent-hung-up"
    assert [k for _, k, _, _ in events_of(site, call_id)] == [
        "call.dial", "call.connect", "call.record"]
    # Recorded per the role's policy: the customer's speech left, the agent's tone right.
    stereo = decrypt_recording(site, record["recording_id"])
    assert channel_rms(stereo[:, 0]) > 100
    agent_side = stereo[:, 1].astype(np.float64)
    freqs = np.fft.rfftfreq(agent_side.size, 1 / 8000)
    assert abs(freqs[int(np.argmax(np.abs(np.fft.rfft(agent_side))))] - 440) < 10
    # The agent heard the carrier's side.
    with wave.open(str(agent.recording), "rb") as heard:
        samples = np.frombuffer(heard.readframes(heard.getnframes()), dtype="<i2")
    assert channel_rms(samples) > 100


@pytest.mark.timeout(60)
def test_dial_rules_refuse_an_international_number(live, tmp_path) -> None:
    mark = len(live.log_text())
    with agent_phone(tmp_path, live.site, live, "dial:+442071234567") as agent:
        gone = agent.wait("disconnected")
    assert gone["code"] == 403
    assert "reason=international" in live.log_text()[mark:]
    assert not [k for k, p in live.events if k == "call.dialling"
                and p["number"] == "+442071234567"]


@needs_sipp
@pytest.mark.timeout(120)
def test_click_to_dial_rings_the_agent_then_the_number(live, carrier_port, tmp_path) -> None:
    calls = live.calls
    # Refusals come before anything rings.
    for agent, number, status in (("4711", NUMBER, 404), ("1001", "+442071234567", 403),
                                  ("1001", "12;x", 400), ("1002", NUMBER, 409)):
        with pytest.raises(CallControlError) as caught:
            live.run(calls.dial, agent, number, by="web")
        assert caught.value.status == status, (agent, number)
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER), \
            agent_phone(tmp_path, live.site, live, "answer", talk=3.0, user="1001") as agent:
        call_id = live.run(calls.dial, "1001", "+1 555 123 0001", by="web")
        incoming = agent.next("incoming")
        assert "+15551230001" in incoming["remote"]  # the phone shows the number
        agent.next("answered")
        live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
        agent.next("disconnected")
    (direction, dialled, end_reason, answered_at) = query(
        live.site, "SELECT direction, dialled, end_reason, answered_at FROM call_records"
        " WHERE call_id = ?", (call_id,))[0]
    assert (direction, dialled, end_reason) == ("outbound", "+15551230001", "agent-hung-up")
    assert answered_at is not None
    assert [k for _, k, _, _ in events_of(live.site, call_id)] == [
        "call.dial", "call.connect", "call.record"]
    assert query(live.site, "SELECT actor FROM audit_log WHERE action = 'call.dial'") == [
        ("web",)]


def _invites(messages: str) -> list[dict[str, str]]:
    """The INVITEs in a SIPp message trace, each as {lower-case header: value}."""
    out = []
    for block in messages.split("INVITE sip:")[1:]:
        head = block.split("\n\n", 1)[0]
        fields = {}
        for line in head.splitlines()[1:]:
            name, _, value = line.partition(":")
            fields.setdefault(name.strip().lower(), value.strip())
        out.append(fields)
    return out


@needs_sipp
@pytest.mark.timeout(120)
def test_challenge_retry_keeps_from_tag_and_raises_cseq(live, carrier_port, tmp_path) -> None:
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER) as carrier, \
            agent_phone(tmp_path, live.site, live, f"dial:{NUMBER}", talk=1.0) as agent:
        agent.wait("answered")
        agent.wait("closed")
    first, second = _invites(carrier.text())[:2]
    # RFC 3261 §8.1.3.5 / §22.2: the same Call-ID, To and From (tag), CSeq one higher.
    assert first["call-id"] == second["call-id"]
    assert first["from"] == second["from"] and first["to"] == second["to"]
    assert int(second["cseq"].split()[0]) == int(first["cseq"].split()[0]) + 1


@needs_sipp
@pytest.mark.timeout(120)
def test_carrier_early_media_reaches_the_agent(live, carrier_port, tmp_path) -> None:
    mark = len(live.log_text())
    with carrier_for(tmp_path, live, carrier_port, "carrier_early"), \
            agent_phone(tmp_path, live.site, live, f"dial:{NUMBER}", talk=8.0) as agent:
        # RFC 3960: the carrier's 183 with SDP becomes a 183 with ours to the phone, and
        # the phone's audio starts before the answer.
        while (state := agent.next("state"))["code"] != 183:
            assert state["code"] < 200, state
        agent.next("media")
        agent.command(f"record {tmp_path / 'early.wav'} 1.5")
        agent.next("recorded", timeout=20)
        agent.wait("answered")
        agent.wait("closed")
    from peers import log_lines, read_heard

    early, rate = read_heard(tmp_path / "early.wav")
    assert early.size > rate * 0.5 and channel_rms(early) > 100  # the carrier's speech
    (line,) = [e for e in log_lines(live, "early_media", mark)]
    record = query(live.site, "SELECT end_reason, answered_at, started_at FROM call_records"
                   " WHERE call_id = ?", (line["call"],))
    assert record and record[0][0] == "agent-hung-up" and record[0][1] > record[0][2]
