"""Blind transfer with real phones: the agent's phone sends REFER (RFC 3515) to another agent.

The caller is pjsua2 from 127.0.0.2 (the test site's trunk source) and sends 1000 Hz; agent 1001
(440 Hz) answers, then transfers to 1002 (660 Hz). We answer the REFER 202, NOTIFY 100 then
200, hang up 1001, and bridge the caller to 1002: the caller then hears 660 Hz. Transfers to a
number go through SIPp as the carrier, whose ringing and early media reach the caller. The
appliance runs in this process (``peers.LiveAppliance``) for ``on_event`` and the API.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from peers import (
    LiveAppliance,
    carrier_for,
    channel_rms,
    connected_call,
    dominant_hz,
    events_of,
    free_port,
    hears,
    live_site,
    log_lines,
    query,
    wait_for,
    with_carrier,
    write_tone_pcap,
)

from appliance.calls import CallControlError

# The carrier challenges the first INVITE; the retry is in the same call when the dialog
# layer can keep the From tag and raise the CSeq (RFC 3261 §8.1.3.5), else a new call.
CHALLENGING_CARRIER = ("carrier_uas_retry", 1)

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", record=False)

    with live_site(tmp_path_factory.mktemp("calls-transfer-site"), edit) as appliance:
        yield appliance


def test_blind_transfer_from_the_phone(live, tmp_path) -> None:
    calls = live.calls
    with connected_call(tmp_path, live) as (first, second, caller, call_id):
        # The API refuses what cannot be done, and changes nothing.
        for target, status in (("4711", 404), ("1001", 404)):
            with pytest.raises(CallControlError) as caught:
                live.run(calls.transfer, call_id, target, by="sup1")
            assert caught.value.status == status
        first.command("xfer 1002")
        second.next("incoming")
        second.next("answered")
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["by"], moved["target"], moved["kind"], moved["from_agent"]) == (
            "1001", "1002", "blind", "1001")
        first.next("disconnected")  # NOTIFY 200, then our BYE
        rows = live.run(calls.active_calls)
        assert [(r["call_id"], r["agent"], r["state"]) for r in rows] == [
            (call_id, "1002", "connected")]
        samples, rate = hears(caller, tmp_path / "after.wav")
        assert abs(dominant_hz(samples, rate) - 660) < 10  # agent 1002's tone
        live.run(calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
        second.next("disconnected")
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (agent, legs) = query(live.site, "SELECT agent, legs FROM call_records WHERE call_id = ?",
                          (call_id,))[0]
    assert agent == "1002"
    assert [leg["agent"] for leg in json.loads(legs)] == [None, "1001", "1002"]
    by_agent = {leg["agent"]: leg for leg in json.loads(legs) if leg["agent"]}
    assert by_agent["1001"]["end_reason"] == "transferred"
    assert by_agent["1002"]["answered_at"] > by_agent["1001"]["answered_at"]
    logged = [(k, p.get("agent"), p.get("ended_by")) for _, k, _, p in
              events_of(live.site, call_id)]
    assert logged == [("queue.enter", None, None), ("queue.connect", "1001", None),
                      ("queue.complete", "1001", "transferred"), ("call.transfer", None, None),
                      ("queue.complete", "1002", "hung-up-by-api"),
                      ("call.record", "1002", "sup1")]



@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live_trunk(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        data["queues"][0].update(members=["1001"], record=False)
        with_carrier(data, carrier_port)

    with live_site(tmp_path_factory.mktemp("calls-xfer-trunk-site"), edit) as appliance:
        yield appliance


needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")


@needs_sipp
def test_blind_transfer_to_an_external_number(live_trunk, carrier_port, tmp_path) -> None:
    live = live_trunk
    calls = live.calls
    number = "+15551230000"
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER), \
            connected_call(tmp_path, live, colleague=None) as (agent, _, caller, call_id):
        # Dial rules apply to the number: an international one is refused.
        with pytest.raises(CallControlError) as caught:
            live.run(calls.transfer, call_id, "+442071234567", by="1001")
        assert caught.value.status == 403
        agent.command(f"xfer {number}")
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["target"], moved["by"]) == (number, "1001")
        agent.next("disconnected")
        samples, rate = hears(caller, tmp_path / "far.wav")
        assert channel_rms(samples) > 100  # the carrier's speech
        assert abs(dominant_hz(samples, rate) - 440) > 20  # not the agent's tone
        live.run(calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (agent_column, legs) = query(live.site, "SELECT agent, legs FROM call_records "
                                            "WHERE call_id = ?", (call_id,))[0]
    assert agent_column == "1001"
    caller_leg, first, far = json.loads(legs)
    assert first["agent"] == "1001" and first["end_reason"] == "transferred"
    assert far["agent"] is None and far["answered_at"] is not None
    # The external leg is in the record like an agent's: the number, times, media figures.
    assert far["number"] == number and far["ended_at"] >= far["answered_at"]
    assert far["media"] is not None and far["media"]["rx_packets"] > 0


@needs_sipp
def test_attended_transfer_to_a_number_from_the_api(live_trunk, carrier_port, tmp_path) -> None:
    live = live_trunk
    calls = live.calls
    number = "+15551230002"
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER), \
            connected_call(tmp_path, live, colleague=None) as (agent, _, caller, call_id):
        # The agent's dial rules apply to the consultation too.
        with pytest.raises(CallControlError) as caught:
            live.run(calls.consult, call_id, "+442071234567", by="sup1")
        assert caught.value.status == 403
        live.run(calls.consult, call_id, number, by="sup1")
        live.wait_event("call.consult", timeout=30, match=lambda p: (
            p["call_id"] == call_id and p["state"] == "answered"))
        # The agent talks to the number (its speech), the caller hears the music.
        samples, _ = hears(agent, tmp_path / "consult.wav", 1.5)
        assert channel_rms(samples) > 100
        live.run(calls.complete_transfer, call_id, by="sup1")
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["target"], moved["kind"], moved["by"]) == (number, "attended", "sup1")
        agent.next("disconnected")
        samples, rate = hears(caller, tmp_path / "far.wav", 1.5)
        assert channel_rms(samples) > 100 and abs(dominant_hz(samples, rate) - 440) > 20
        live.run(calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (legs, holds) = query(live.site, "SELECT legs, holds FROM call_records WHERE call_id = ?",
                          (call_id,))[0]
    _, first, far = json.loads(legs)
    assert first["agent"] == "1001" and first["end_reason"] == "transferred"
    assert far["number"] == number and far["media"]["rx_packets"] > 0
    (period,) = json.loads(holds)
    assert period[0] < period[1]


@needs_sipp
def test_attended_transfer_from_the_phone_to_a_number(live_trunk, carrier_port,
                                                      tmp_path) -> None:
    live = live_trunk
    number = "+15551230003"
    with carrier_for(tmp_path, live, carrier_port, *CHALLENGING_CARRIER), \
            connected_call(tmp_path, live, colleague=None) as (agent, _, caller, call_id):
        agent.command("hold")
        live.wait_event("call.hold", match=lambda p: p["call_id"] == call_id)
        # The consultation: the phone dials the number through the carrier.
        agent.command(f"dial {number}")
        consult = live.wait_event("call.dialling", match=lambda p: p["number"] == number)
        agent.next("answered")
        agent.command("attxfer")
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert (moved["target"], moved["kind"], moved["by"]) == (number, "attended", "1001")
        live.wait_event("call.ended", match=lambda p: p["call_id"] == consult["call_id"])
        samples, rate = hears(caller, tmp_path / "far.wav", 1.5)
        assert channel_rms(samples) > 100 and abs(dominant_hz(samples, rate) - 440) > 20
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (legs,) = query(live.site, "SELECT legs FROM call_records WHERE call_id = ?",
                    (call_id,))[0]
    _, first, far = json.loads(legs)
    assert first["agent"] == "1001" and first["end_reason"] == "transferred"
    assert far["number"] == number and far["answered_at"] is not None
    (reason,) = query(live.site, "SELECT end_reason FROM call_records WHERE call_id = ?",
                      (consult["call_id"],))[0]
    assert reason == "transferred"


@needs_sipp
def test_blind_transfer_relays_the_carriers_early_media(live_trunk, carrier_port,
                                                        tmp_path) -> None:
    live = live_trunk
    number, tone_hz = "+15551230004", 1400.0
    write_tone_pcap(tmp_path / "tone.pcap", tone_hz, 4.0)
    mark = len(live.log_text())
    with carrier_for(tmp_path, live, carrier_port, "carrier_early_tone"), \
            connected_call(tmp_path, live, colleague=None) as (agent, _, caller, call_id):
        agent.command(f"xfer {number}")
        # The carrier's 180: ringback from us while it rings, instead of the music.
        wait_for(lambda: [e for e in log_lines(live, "transfer_ringback", mark)
                          if e["call"] == call_id], 20, "the carrier's 180", live)
        samples, rate = hears(caller, tmp_path / "ringing.wav", 1.0)
        assert min(abs(dominant_hz(samples, rate) - hz) for hz in (440, 480)) < 10
        # Its 183: the carrier's own tone, before it answers (RFC 3960).
        early = wait_for(lambda: [e for e in log_lines(live, "early_media", mark)
                                  if e["call"] == call_id], 20, "the 183", live)
        assert early[0]["kind"] == "transfer"
        samples, rate = hears(caller, tmp_path / "early.wav", 1.5)
        assert abs(dominant_hz(samples, rate) - tone_hz) < 10
        assert not [p for k, p in live.events
                    if k == "call.transfer" and p["call_id"] == call_id]
        moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
        assert moved["target"] == number
        live.run(live.calls.hangup, call_id, by="sup1")
        caller.next("disconnected")
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (legs,) = query(live.site, "SELECT legs FROM call_records WHERE call_id = ?", (call_id,))[0]
    _, first, far = json.loads(legs)
    assert first["end_reason"] == "transferred"
    assert far["number"] == number and far["answered_at"] is not None
