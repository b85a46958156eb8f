"""The IVR's ``transfer`` node with real peers: to an agent's extension (their phone rings) or
to a number through the trunk (SIPp as the carrier), with the node's ``on_failure`` branch on
no answer, busy and a dial-rule refusal.

The caller is pjsua2 from 127.0.0.2 (the test site's trunk source) and presses the menu digit;
agents are pjsua2 (1001: 440 Hz, 1002: 660 Hz). The carrier is SIPp: ``carrier_uas_retry`` (401,
then answers the retry in the same call and plays speech) or ``carrier_busy`` (486). The appliance runs in this process
(``peers.LiveAppliance``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from peers import (
    LiveAppliance,
    agent_phone,
    carrier_for,
    channel_rms,
    dominant_hz,
    free_port,
    hears,
    live_site,
    log_lines,
    query,
    trunk_caller,
    wait_for,
    with_carrier,
    write_tone_pcap,
)

# The carrier challenges the first INVITE; the retry is in the same call when the dialog
# layer can keep the From tag and raise the CSeq (RFC 3261 §8.1.3.5), else a new call.
CHALLENGING_CARRIER = ("carrier_uas_retry", 1)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")]
NUMBER = "+15551230000"


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        data["queues"][0].update(members=["1001"], record=False)
        with_carrier(data, carrier_port)
        nodes = data["ivr"]["flows"]["main"]["nodes"]
        nodes["welcome"]["options"].update({"2": "to_agent", "3": "to_number", "4": "abroad"})
        nodes["to_agent"] = {"type": "transfer", "number": "1002", "timeout": 3,
                             "on_failure": "to_number"}
        nodes["to_number"] = {"type": "transfer", "number": NUMBER, "on_failure": "support"}
        nodes["abroad"] = {"type": "transfer", "number": "+4930123456", "role": "agent",
                           "on_failure": "goodbye"}

    with live_site(tmp_path_factory.mktemp("calls-ivr-transfer-site"), edit) as appliance:
        yield appliance


def _record(live: LiveAppliance, call_id: str) -> dict:
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    names = [r[1] for r in query(live.site, "PRAGMA table_info(call_records)")]
    row = query(live.site, "SELECT * FROM call_records WHERE call_id = ?", (call_id,))[0]
    record = dict(zip(names, row, strict=True))
    record["ivr_trace"] = json.loads(record["ivr_trace"])
    record["legs"] = json.loads(record["legs"])
    return record


def test_transfer_to_an_agent_extension(live, tmp_path) -> None:
    with agent_phone(tmp_path, live.site, live, "answer", user="1002", login=False) as target, \
            trunk_caller(tmp_path, live, "2") as (caller, call_id):
        target.next("incoming")
        target.next("answered")
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["by"], moved["target"], moved["kind"]) == ("ivr:main", "1002", "blind")
        caller.next("answered")
        samples, rate = hears(caller, tmp_path / "agent.wav")
        assert abs(dominant_hz(samples, rate) - 660) < 10  # agent 1002's phone
        target.command("quit")  # the agent's phone hangs up and goes
        caller.next("disconnected")
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "to_agent"]
    assert (record["agent"], record["queue"]) == ("1002", None)
    assert record["answered_at"] is not None


def test_no_answer_goes_on_to_the_number_through_the_carrier(live, carrier_port,
                                                             tmp_path) -> None:
    mark = len(live.log_text())
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER), \
            agent_phone(tmp_path, live.site, live, "idle", user="1002", login=False) as target, \
            trunk_caller(tmp_path, live, "2") as (caller, call_id):
        target.next("incoming")  # rings for the node's 3 s, never answered
        samples, rate = hears(caller, tmp_path / "ringing.wav", 1.0)
        assert channel_rms(samples) > 100  # the hold music while it rings
        moved = live.wait_event("call.transfer", timeout=30,
                                match=lambda p: p["call_id"] == call_id)
        assert moved["target"] == NUMBER
        caller.next("answered")
        samples, rate = hears(caller, tmp_path / "far.wav")
        assert channel_rms(samples) > 100  # the carrier's speech
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    failed = [e for e in log_lines(live, "ivr_transfer_failed", mark) if e["call"] == call_id]
    assert [(e["outcome"], e["status"]) for e in failed] == [("no-answer", "487")]
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "to_agent", "to_number"]
    assert record["agent"] is None
    caller_leg, rang, far = record["legs"]
    # Every leg the node rang is in the record, with times and media figures.
    assert (rang["agent"], rang["end_reason"], rang["answered_at"]) == (
        "1002", "no-answer", None)
    assert rang["started_at"] <= rang["ended_at"] and rang["media"] is not None
    assert (far["number"], far["agent"]) == (NUMBER, None)  # the carrier's leg
    assert far["answered_at"] is not None and far["ended_at"] >= far["answered_at"]
    assert far["media"] is not None and far["media"]["rx_packets"] > 0


def test_busy_number_goes_to_the_queue(live, carrier_port, tmp_path) -> None:
    mark = len(live.log_text())
    with carrier_for(tmp_path, live, carrier_port, "carrier_busy"), \
            agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent, \
            trunk_caller(tmp_path, live, "3") as (caller, call_id):
        agent.next("answered")  # the on_failure branch queued the caller
        caller.next("answered")
        samples, rate = hears(caller, tmp_path / "queued.wav")
        assert abs(dominant_hz(samples, rate) - 440) < 10
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    failed = [e for e in log_lines(live, "ivr_transfer_failed", mark) if e["call"] == call_id]
    assert [(e["outcome"], e["status"]) for e in failed] == [("busy", "486")]
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "to_number", "support"]
    assert (record["agent"], record["queue"]) == ("1001", "support")


def test_dial_rule_refusal_takes_the_failure_branch(live, tmp_path) -> None:
    mark = len(live.log_text())
    with trunk_caller(tmp_path, live, "4") as (caller, call_id):
        caller.next("disconnected", timeout=30)  # goodbye, then the flow hangs up
    refused = wait_for(lambda: [e for e in log_lines(live, "ivr_transfer_refused", mark)
                                if e["call"] == call_id], 10, "the refusal", live)
    assert refused[0]["reason"] == "international"
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "abroad", "goodbye", "bye"]
    assert record["answered_at"] is None


def _flow(nodes: dict):
    from appliance.ivr import load_flows

    return load_flows({"flows": {"main": {"start": "t", "nodes": nodes}}},
                      prompts={"goodbye"}, queues=["support"])["main"]


def test_transfer_node_is_checked_at_load() -> None:
    from appliance.ivr import FlowError

    with pytest.raises(FlowError) as caught:
        _flow({"t": {"type": "transfer", "number": "1002", "role": "admin", "timeout": 1}})
    text = str(caught.value)
    assert "role must be agent or supervisor, got 'admin'" in text
    assert "timeout must be a number from 2 to 300, got 1" in text
    with pytest.raises(FlowError) as caught:
        _flow({"t": {"type": "transfer", "number": "1002", "on_failure": "nowhere"}})
    assert "on_failure refers to unknown node 'nowhere'" in str(caught.value)
    with pytest.raises(FlowError) as caught:  # ring, fail, ring again: no caller input
        _flow({"t": {"type": "transfer", "number": "1002", "on_failure": "t"}})
    assert "loop without caller input" in str(caught.value)


def test_transfer_result_drives_the_flow() -> None:
    from appliance.ivr.runner import (
        CallerHungUp,
        DigitPressed,
        FlowRun,
        Hangup,
        Play,
        PromptFinished,
        RouteToQueue,
        Transfer,
        TransferResult,
    )

    flow = _flow({"t": {"type": "transfer", "number": NUMBER, "timeout": 20,
                        "on_failure": "sorry"},
                  "sorry": {"type": "play", "prompt": "goodbye", "next": "q"},
                  "q": {"type": "queue", "queue": "support"}})
    run = FlowRun(flow, 0.0, "+15557654321")
    assert run.take_actions() == [Transfer(NUMBER, "agent", 20.0)]
    assert not run.finished
    assert run.handle(DigitPressed("5"), 1.0) == []  # ignored while it rings
    assert run.handle(TransferResult("busy", 486), 2.0) == [Play("goodbye", False)]
    assert run.variables["transfer_result"] == "busy"
    (route,) = run.handle(PromptFinished("goodbye"), 3.0)
    assert isinstance(route, RouteToQueue) and route.variables["transfer_result"] == "busy"
    # Answered: the run ends with the transfer as its result.
    run = FlowRun(flow, 0.0, "+15557654321")
    run.take_actions()
    assert run.handle(TransferResult("answered"), 1.0) == []
    assert run.finished and run.result == Transfer(NUMBER, "agent", 20.0)
    # Without on_failure the call ends; a caller who hangs up while it rings ends the run.
    bare = _flow({"t": {"type": "transfer", "number": "1002"}})
    run = FlowRun(bare, 0.0, "x")
    run.take_actions()
    assert run.handle(TransferResult("no-answer", 487), 1.0) == [Hangup("transfer-failed")]
    run = FlowRun(bare, 0.0, "x")
    run.take_actions()
    assert run.handle(CallerHungUp(), 1.0) == [] and run.finished


EARLY_HZ = 1400.0
"""The carrier's early-media tone (tests/sipp/carrier_early_tone.xml plays it)."""


def test_caller_hears_the_carriers_ringing_and_early_media(live, carrier_port,
                                                           tmp_path) -> None:
    write_tone_pcap(tmp_path / "tone.pcap", EARLY_HZ, 4.0)
    mark = len(live.log_text())
    with carrier_for(tmp_path, live, carrier_port, "carrier_early_tone"), \
            trunk_caller(tmp_path, live, "3") as (caller, call_id):
        # 180 without a description: ringback from us (440 + 480 Hz), not the music.
        wait_for(lambda: [e for e in log_lines(live, "transfer_ringback", mark)
                          if e["call"] == call_id], 20, "the carrier's 180", live)
        samples, rate = hears(caller, tmp_path / "ringing.wav", 1.0)
        assert min(abs(dominant_hz(samples, rate) - hz) for hz in (440, 480)) < 10
        # 183 with a description: the carrier's own tone reaches the caller (RFC 3960).
        early = wait_for(lambda: [e for e in log_lines(live, "early_media", mark)
                                  if e["call"] == call_id], 20, "the 183", live)
        assert (early[0]["kind"], early[0]["target"]) == ("ivr-transfer", NUMBER)
        samples, rate = hears(caller, tmp_path / "early.wav", 1.5)
        assert abs(dominant_hz(samples, rate) - EARLY_HZ) < 10
        assert "answered" not in [e["event"] for e in caller.seen]  # still early media
        caller.next("answered")
        live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "to_number"]
    caller_leg, far = record["legs"]
    assert far["number"] == NUMBER and far["answered_at"] > caller_leg["started_at"]
    assert far["media"]["rx_packets"] > 0
