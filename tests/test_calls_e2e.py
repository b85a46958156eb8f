"""A carrier call through the IVR and a queue to an agent's phone, with real SIP stacks.

``edgecc init --demo`` makes a site whose DID +15550100 runs the starter flow (welcome menu,
"1" -> queue ``support`` with every demo agent); ``edgecc appliance`` runs it on free ports.
The agent is pjsua2 (null audio device, its own process) registered as 1001: it rings, answers
and talks with a 440 Hz tone, or only rings. The carrier is SIPp (tests/sipp/trunk_*.xml):
G.711 A-law offer, "1" as RFC 4733 events from SIPp's dtmf_2833_1.pcap, speech from its
g711a.pcap. The checks read the site database (read-only), the appliance's log lines and the
decrypted recording. Every wait is bounded and waits on an event, never on a fixed sleep.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from peers import (
    CALLER,
    DID,
    agent_phone,
    call_record,
    channel_rms,
    decrypt_recording,
    events_of,
    log_lines,
    make_site,
    sipp,
    sipp_failed,
)
from test_register_peers import (
    EDGECC,
    Running,
    Site,
    stop,
)
from test_register_peers import start as start_appliance

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(120),
]


# --------------------------------------------------------------------------- site and appliance


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return make_site(tmp_path_factory.mktemp("calls-site"))


@pytest.fixture(scope="module")
def appliance(site: Site) -> Iterator[Running]:
    running = start_appliance(site, "calls.log")
    try:
        yield running
    finally:
        stop(running.proc)


# --------------------------------------------------------------------------- tests


def test_call_reaches_agent_is_recorded_and_written_down(site, appliance, tmp_path) -> None:
    mark = len(appliance.log_text())
    with agent_phone(tmp_path, site, appliance, "answer", talk=2.5) as agent:
        result = sipp(tmp_path, appliance, "trunk_call", keys={"hangup": "agent"})
        assert result.returncode == 0, sipp_failed(result, appliance)
        incoming = agent.wait("incoming")
        assert CALLER in incoming["remote"]
        agent.wait("answered")
        agent.wait("hanging_up")
        agent.wait("disconnected")
        agent.wait("closed")
    # The IVR heard one digit as RFC 4733 events on the caller's leg (the trace below says it
    # was "1"); the log never says which digit (callers key PINs and card numbers).
    digits = log_lines(appliance, "dtmf", mark)
    assert [(d.get("digit"), d["method"]) for d in digits] == [(None, "rfc4733")]
    record = call_record(site, appliance, mark)
    assert record["caller"] == CALLER and record["dialled"] == DID
    assert (record["flow"], record["queue"], record["agent"]) == ("main", "support", "1001")
    assert record["ivr_trace"] == ["welcome", "support"]
    assert record["end_reason"] == "agent-hung-up"
    assert (record["started_at"] <= record["offered_at"] <= record["answered_at"]
            <= record["ended_at"])
    caller_leg, agent_leg = record["legs"]
    assert (caller_leg["party"], caller_leg["direction"]) == ("caller", "inbound")
    assert (agent_leg["party"], agent_leg["direction"], agent_leg["agent"]) == (
        "agent", "outbound", "1001")
    assert agent_leg["end_reason"] == "agent-hung-up"
    assert agent_leg["answered_at"] is not None and caller_leg["answered_at"] is not None
    # Each leg's media as the engine counted it: the caller's speech and digits came in, the
    # agent's tone came in, and each was sent on to the other side; MOS from the E-model.
    for leg in (caller_leg, agent_leg):
        media = leg["media"]
        assert media["rx_packets"] > 20 and media["tx_packets"] > 20, leg
        assert media["lost"] == 0 and media["loss_pct"] == 0.0
        assert 4.0 <= media["mos"] <= 4.5
    # Queue events and the call record, in order, each with its outbox row.
    events = events_of(site, record["call_id"])
    assert [e[1] for e in events] == ["queue.enter", "queue.connect", "queue.complete",
                                      "call.record"]
    times = [e[2] for e in events]
    assert times == sorted(times)
    assert events[1][3]["agent"] == "1001" and events[2][3]["ended_by"] == "agent-hung-up"
    assert events[3][3]["recording_id"] == record["recording_id"]
    # Stereo recording, encrypted at rest: the caller's speech on the left channel, the
    # agent's 440 Hz tone on the right.
    assert record["recording_id"]
    stereo = decrypt_recording(site, record["recording_id"])
    assert stereo.shape[0] > 8000  # over a second of call
    caller, agent_side = stereo[:, 0], stereo[:, 1]
    assert channel_rms(caller) > 100, channel_rms(caller)
    spectrum = np.abs(np.fft.rfft(agent_side.astype(np.float64)))
    freqs = np.fft.rfftfreq(agent_side.size, 1 / 8000)
    assert abs(freqs[int(np.argmax(spectrum))] - 440) < 10
    assert channel_rms(agent_side) > 100
    # The bridge carried the caller to the agent: the phone's own recording holds speech.
    with wave.open(str(agent.recording), "rb") as heard:
        samples = np.frombuffer(heard.readframes(heard.getnframes()), dtype="<i2")
    assert channel_rms(samples) > 100, channel_rms(samples)
    # No plaintext audio is left behind.
    assert not list((site.directory / "recordings").rglob("*.wav"))
    legs_after = int(record["log"]["legs_active"])
    assert legs_after == 0


def test_caller_hangs_up_after_talking(site, appliance, tmp_path) -> None:
    mark = len(appliance.log_text())
    with agent_phone(tmp_path, site, appliance, "answer", talk=0) as agent:
        result = sipp(tmp_path, appliance, "trunk_call", keys={"hangup": "caller"})
        assert result.returncode == 0, sipp_failed(result, appliance)
        agent.wait("answered")
        assert agent.wait("disconnected")
    record = call_record(site, appliance, mark)
    assert record["end_reason"] == "caller-hung-up"
    assert record["legs"][1]["end_reason"] == "caller-hung-up"
    kinds = [e[1] for e in events_of(site, record["call_id"])]
    assert kinds == ["queue.enter", "queue.connect", "queue.complete", "call.record"]
    assert int(record["log"]["legs_active"]) == 0


def test_cancel_while_agent_rings_cancels_the_agent_leg(site, appliance, tmp_path) -> None:
    mark = len(appliance.log_text())
    with agent_phone(tmp_path, site, appliance, "ring") as agent:
        result = sipp(tmp_path, appliance, "trunk_cancel")
        assert result.returncode == 0, sipp_failed(result, appliance)
        assert "SIP/2.0 487" in result.messages
        agent.wait("incoming")
        gone = agent.wait("disconnected")
        assert gone["code"] == 487  # the agent's INVITE was cancelled, never answered
        assert "answered" not in [e["event"] for e in agent.seen]
    record = call_record(site, appliance, mark)
    assert record["end_reason"] == "cancelled"
    assert record["answered_at"] is None and record["agent"] is None
    assert record["recording_id"] is None
    caller_leg, agent_leg = record["legs"]
    assert caller_leg["end_reason"] == "cancelled"
    assert agent_leg["end_reason"] == "caller-hung-up" and agent_leg["answered_at"] is None
    kinds = [e[1] for e in events_of(site, record["call_id"])]
    assert kinds == ["queue.enter", "queue.abandon", "call.record"]
    # Both engine legs were released: nothing dangles.
    assert int(record["log"]["legs_active"]) == 0


@pytest.mark.parametrize(
    ("service", "codec_pt", "codec_map", "status"),
    [
        (DID, "18", "18 G729/8000", 488),
        ("+15550199", "8", "8 PCMA/8000", 404),
    ],
    ids=["g729-only-488", "unknown-did-404"],
)
def test_refused_calls(site, appliance, tmp_path, service, codec_pt, codec_map, status) -> None:
    mark = len(appliance.log_text())
    result = sipp(tmp_path, appliance, "trunk_refused", service=service,
                  keys={"codec_pt": codec_pt, "codec_map": codec_map})
    assert result.returncode == 0, sipp_failed(result, appliance)
    finals = re.findall(r"^SIP/2.0 (\d{3})", result.messages, re.M)
    assert finals and finals[-1] == str(status), finals
    refused = log_lines(appliance, "call_refused", mark)
    assert [r["reason"] for r in refused] == [
        "no-common-codec" if status == 488 else "unknown-did"]
    # Refused before any call existed: no record, no engine leg left.
    assert not log_lines(appliance, "call_started", mark)


@pytest.fixture(scope="module")
def short_ring_appliance(tmp_path_factory) -> Iterator[tuple[Site, Running]]:
    """A second site whose queue rings each agent for 1.5 s, in member order (linear)."""

    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", ring_timeout=1.5, record=False)

    site = make_site(tmp_path_factory.mktemp("calls-ring-site"), edit=edit)
    running = start_appliance(site, "calls.log")
    try:
        yield site, running
    finally:
        stop(running.proc)


def test_ring_timeout_offers_the_next_agent(short_ring_appliance, tmp_path) -> None:
    site, running = short_ring_appliance
    mark = len(running.log_text())
    with agent_phone(tmp_path, site, running, "ring", user="1001") as first, \
            agent_phone(tmp_path, site, running, "answer", talk=1.0, user="1002") as second:
        result = sipp(tmp_path, running, "trunk_call", keys={"hangup": "agent"})
        assert result.returncode == 0, sipp_failed(result, running)
        first.wait("incoming")
        assert first.wait("disconnected")["code"] == 487  # rang out: cancelled by us
        second.wait("answered")
        second.wait("disconnected")
    record = call_record(site, running, mark)
    assert record["agent"] == "1002" and record["end_reason"] == "agent-hung-up"
    assert record["recording_id"] is None  # this queue does not record
    caller_leg, rang_out, answered = record["legs"]
    assert rang_out["agent"] == "1001" and rang_out["end_reason"] == "no-answer"
    assert answered["agent"] == "1002" and answered["answered_at"] is not None
    assert rang_out["started_at"] < answered["started_at"]
    offers = [e["agent"] for e in log_lines(running, "agent_offered", mark)]
    assert offers == ["1001", "1002"]


def test_agent_invites_need_digest_and_have_no_outbound_route_yet(site, appliance) -> None:
    from test_register_peers import raw_phone

    from appliance.sip.digest import answer_challenge

    # 127.0.0.3 is not in trunk.allowed_sources: an INVITE from there is an agent's own call.
    with raw_phone("127.0.0.3", appliance, site) as phone:
        contact = (f"Contact: <sip:1002@{phone.host}:{phone.port}>",)
        first = phone.response(phone.send("INVITE", "1002", contact), 5)
        assert first is not None and first.status == 401
        challenge = next(v for n, v in first.headers if n == "WWW-Authenticate")
        wrong = answer_challenge(challenge, method="INVITE", uri=f"sip:{site.realm}",
                                 username="1002", password="not-the-password")
        refused = phone.response(phone.send("INVITE", "1002", (*contact,
                                                               f"Authorization: {wrong}")), 5)
        assert refused is not None and refused.status == 401
        auth = answer_challenge(challenge, method="INVITE", uri=f"sip:{site.realm}",
                                username="1002", password=site.passwords["1002"])
        final = phone.response(phone.send("INVITE", "1002", (*contact,
                                                             f"Authorization: {auth}")), 5)
    assert final is not None and (final.status, final.reason) == (403, "No Outbound Route")


# --------------------------------------------------------------------------- bad configuration


def test_bad_call_configuration_is_refused_with_clear_errors(tmp_path) -> None:
    import yaml

    from appliance.config import ConfigError, parse_site_yaml

    directory = tmp_path / "site"
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    site_file = directory / "site.yaml"
    good = site_file.read_text()
    data = yaml.safe_load(good)

    # Schema errors name the key path: an unknown member, a duplicate queue, a bad strategy.
    broken = json.loads(json.dumps(data))
    broken["queues"][0]["members"].append("4711")
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(yaml.safe_dump(broken, sort_keys=False))
    text = str(caught.value)
    assert "queues[0].members[2]: expected the user of a sip.accounts entry, got '4711'" in text
    broken = json.loads(json.dumps(data))
    broken["queues"].append({"name": "support"})
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(yaml.safe_dump(broken, sort_keys=False))
    assert "queues[1].name: expected a unique queue name, 'support' is already queues[0]" in (
        str(caught.value))

    broken = json.loads(json.dumps(data))
    broken["queues"][0]["strategy"] = "fastest"
    broken["ivr"]["dids"]["not a number"] = "main"
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(yaml.safe_dump(broken, sort_keys=False))
    assert "queues[0].strategy: expected one of ring-all" in str(caught.value)
    assert "ivr.dids: expected a dialled number" in str(caught.value)

    # Flow errors (unknown prompt, unknown queue) and a DID naming no flow stop the start,
    # each problem listed with its line; nothing is changed.
    broken = json.loads(json.dumps(data))
    nodes = broken["ivr"]["flows"]["main"]["nodes"]
    nodes["welcome"]["prompt"] = "welcom"
    nodes["support"]["queue"] = "suport"
    site_file.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = subprocess.run([str(EDGECC), "appliance", "--site-dir", str(directory)],
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "cannot start" in err and "unknown queue 'suport'" in err and "welcom" in err
    assert re.search(r"site\.yaml:\d+: flow 'main' node 'support'", err), err

    broken = json.loads(json.dumps(data))
    broken["ivr"]["dids"]["+15550111"] = "sales"
    site_file.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = subprocess.run([str(EDGECC), "appliance", "--site-dir", str(directory)],
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    assert "ivr.dids: '+15550111' names flow 'sales', which is not defined" in (
        result.stderr.decode())
    assert not (directory / "recordings").exists()


def test_flows_from_a_file_and_prompts_from_a_directory(tmp_path) -> None:
    import yaml

    from appliance.calls.control import load_call_path
    from appliance.config import load_site
    from media_core.prompt import PromptFormatError

    directory = tmp_path / "site"
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "1",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    site_file = directory / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    (directory / "flows.yaml").write_text(yaml.safe_dump({"flows": data["ivr"]["flows"]}))
    prompts = directory / "prompts"
    prompts.mkdir()
    shipped = ROOT / "appliance" / "data" / "prompts"
    for name in ("welcome", "invalid", "no_input", "goodbye"):
        (prompts / f"{name}.wav").write_bytes((shipped / f"{name}.wav").read_bytes())
    data["ivr"]["flows"] = "flows.yaml"
    data["ivr"]["prompts"] = "prompts"
    site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    flows, loaded = load_call_path(load_site(directory))
    assert list(flows) == ["main"] and sorted(loaded) == ["goodbye", "invalid", "no_input",
                                                         "welcome"]
    assert all(p.dtype == np.int16 and p.size > 8000 for p in loaded.values())
    # A prompt that is not 16-bit mono PCM is named, not half-loaded.
    (prompts / "welcome.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(PromptFormatError, match="welcome.wav"):
        load_call_path(load_site(directory))
