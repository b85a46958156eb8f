"""Blind transfer with real phones: the agent's phone sends REFER (RFC 3515) to another agent.

The caller is pjsua2 from 127.0.0.2 (the test site's trunk source) and sends 1000 Hz; agent 1001
(440 Hz) answers, then transfers to 1002 (660 Hz). We answer the REFER 202, NOTIFY 100 then
200, hang up 1001, and bridge the caller to 1002: the caller then hears 660 Hz. The appliance
runs in this process (``peers.LiveAppliance``) for ``on_event`` and the API.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator

import pytest
from peers import (
    DID,
    Agent,
    LiveAppliance,
    agent_phone,
    dominant_hz,
    events_of,
    make_site,
    query,
    read_heard,
)

from appliance.calls import CallControlError

# The carrier challenges the first INVITE; the retry is in the same call when the dialog
# layer can keep the From tag and raise the CSeq (RFC 3261 §8.1.3.5), else a new call.
CHALLENGING_CARRIER = ("carrier_uas_retry", 1)

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")

    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", record=False)

    site = make_site(tmp_path_factory.mktemp("calls-transfer-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def test_blind_transfer_from_the_phone(live, tmp_path) -> None:
    calls = live.calls
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as first, \
            agent_phone(tmp_path, live.site, live, "answer", user="1002") as second:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered")["call_id"]
            first.next("answered")
            caller.next("answered")
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
            caller.command(f"record {tmp_path / 'after.wav'} 2")
            caller.next("recorded", timeout=20)
            samples, rate = read_heard(tmp_path / "after.wav")
            assert abs(dominant_hz(samples, rate) - 660) < 10  # agent 1002's tone
            live.run(calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
            second.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
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



TRUNK_USER, TRUNK_REALM, TRUNK_PASSWORD = "site-trunk", "carrier.test", "trunk-secret"


@pytest.fixture(scope="module")
def carrier_port() -> int:
    from peers import free_port

    return free_port()


@pytest.fixture(scope="module")
def live_trunk(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    import hashlib

    pytest.importorskip("pjsua2")
    ha1 = hashlib.md5(f"{TRUNK_USER}:{TRUNK_REALM}:{TRUNK_PASSWORD}".encode()).hexdigest()

    def edit(data: dict) -> None:
        data["queues"][0].update(members=["1001"], record=False)
        data["trunk"].update(carrier={"host": "127.0.0.1", "port": carrier_port},
                             auth={"user": TRUNK_USER, "realm": TRUNK_REALM, "ha1_md5": ha1})

    site = make_site(tmp_path_factory.mktemp("calls-xfer-trunk-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")
def test_blind_transfer_to_an_external_number(live_trunk, carrier_port, tmp_path) -> None:
    from peers import Carrier, channel_rms

    live = live_trunk
    calls = live.calls
    number = "+15551230000"
    carrier = Carrier(tmp_path, CHALLENGING_CARRIER[0], calls=CHALLENGING_CARRIER[1],
                      port=carrier_port)
    try:
        with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
            caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
            try:
                call_id = live.wait_event("call.offered")["call_id"]
                agent.next("answered")
                caller.next("answered")
                # Dial rules apply to the number: an international one is refused.
                with pytest.raises(CallControlError) as caught:
                    live.run(calls.transfer, call_id, "+442071234567", by="1001")
                assert caught.value.status == 403
                agent.command(f"xfer {number}")
                moved = live.wait_event("call.transfer",
                                        match=lambda p: p["call_id"] == call_id)
                assert (moved["target"], moved["by"]) == (number, "1001")
                agent.next("disconnected")
                caller.command(f"record {tmp_path / 'far.wav'} 2")
                caller.next("recorded", timeout=20)
                samples, rate = read_heard(tmp_path / "far.wav")
                assert channel_rms(samples) > 100  # the carrier's speech
                assert abs(dominant_hz(samples, rate) - 440) > 20  # not the agent's tone
                live.run(calls.hangup, call_id, by="sup1")
                caller.next("disconnected")
            finally:
                caller.close()
                if caller.proc.returncode is None:
                    caller.proc.kill()
        assert carrier.finish() == 0, carrier.text()[-3000:] + live.log_text()[-3000:]
    finally:
        carrier.close()
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


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")
def test_attended_transfer_to_a_number_from_the_api(live_trunk, carrier_port, tmp_path) -> None:
    from peers import Carrier, channel_rms

    live = live_trunk
    calls = live.calls
    number = "+15551230002"
    carrier = Carrier(tmp_path, CHALLENGING_CARRIER[0], calls=CHALLENGING_CARRIER[1],
                      port=carrier_port)
    try:
        with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
            caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
            try:
                call_id = live.wait_event("call.offered", match=lambda p: not any(
                    k == "call.ended" and e["call_id"] == p["call_id"]
                    for k, e in live.events))["call_id"]
                agent.next("answered")
                caller.next("answered")
                # The agent's dial rules apply to the consultation too.
                with pytest.raises(CallControlError) as caught:
                    live.run(calls.consult, call_id, "+442071234567", by="sup1")
                assert caught.value.status == 403
                live.run(calls.consult, call_id, number, by="sup1")
                live.wait_event("call.consult", timeout=30, match=lambda p: (
                    p["call_id"] == call_id and p["state"] == "answered"))
                # The agent talks to the number (its speech), the caller hears the music.
                agent.command(f"record {tmp_path / 'consult.wav'} 1.5")
                agent.next("recorded", timeout=20)
                samples, _ = read_heard(tmp_path / "consult.wav")
                assert channel_rms(samples) > 100
                live.run(calls.complete_transfer, call_id, by="sup1")
                moved = live.wait_event("call.transfer",
                                        match=lambda p: p["call_id"] == call_id)
                assert (moved["target"], moved["kind"], moved["by"]) == (
                    number, "attended", "sup1")
                agent.next("disconnected")
                caller.command(f"record {tmp_path / 'far.wav'} 1.5")
                caller.next("recorded", timeout=20)
                samples, rate = read_heard(tmp_path / "far.wav")
                assert channel_rms(samples) > 100 and abs(dominant_hz(samples, rate) - 440) > 20
                live.run(calls.hangup, call_id, by="sup1")
                caller.next("disconnected")
            finally:
                caller.close()
                if caller.proc.returncode is None:
                    caller.proc.kill()
        assert carrier.finish() == 0, carrier.text()[-3000:] + live.log_text()[-3000:]
    finally:
        carrier.close()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (legs, holds) = query(live.site, "SELECT legs, holds FROM call_records WHERE call_id = ?",
                          (call_id,))[0]
    _, first, far = json.loads(legs)
    assert first["agent"] == "1001" and first["end_reason"] == "transferred"
    assert far["number"] == number and far["media"]["rx_packets"] > 0
    (period,) = json.loads(holds)
    assert period[0] < period[1]


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")
def test_attended_transfer_from_the_phone_to_a_number(live_trunk, carrier_port,
                                                      tmp_path) -> None:
    from peers import Carrier, channel_rms

    live = live_trunk
    number = "+15551230003"
    carrier = Carrier(tmp_path, CHALLENGING_CARRIER[0], calls=CHALLENGING_CARRIER[1],
                      port=carrier_port)
    try:
        with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
            caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
            try:
                call_id = live.wait_event("call.offered", match=lambda p: not any(
                    k == "call.ended" and e["call_id"] == p["call_id"]
                    for k, e in live.events))["call_id"]
                agent.next("answered")
                caller.next("answered")
                agent.command("hold")
                live.wait_event("call.hold", match=lambda p: p["call_id"] == call_id)
                # The consultation: the phone dials the number through the carrier.
                agent.command(f"dial {number}")
                consult = live.wait_event("call.dialling", match=lambda p: (
                    p["number"] == number))
                agent.next("answered")
                agent.command("attxfer")
                moved = live.wait_event("call.transfer",
                                        match=lambda p: p["call_id"] == call_id)
                assert (moved["target"], moved["kind"], moved["by"]) == (
                    number, "attended", "1001")
                live.wait_event("call.ended",
                                match=lambda p: p["call_id"] == consult["call_id"])
                caller.command(f"record {tmp_path / 'far.wav'} 1.5")
                caller.next("recorded", timeout=20)
                samples, rate = read_heard(tmp_path / "far.wav")
                assert channel_rms(samples) > 100 and abs(dominant_hz(samples, rate) - 440) > 20
                live.run(live.calls.hangup, call_id, by="sup1")
                caller.next("disconnected")
            finally:
                caller.close()
                if caller.proc.returncode is None:
                    caller.proc.kill()
        assert carrier.finish() == 0, carrier.text()[-3000:] + live.log_text()[-3000:]
    finally:
        carrier.close()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (legs,) = query(live.site, "SELECT legs FROM call_records WHERE call_id = ?",
                    (call_id,))[0]
    _, first, far = json.loads(legs)
    assert first["agent"] == "1001" and first["end_reason"] == "transferred"
    assert far["number"] == number and far["answered_at"] is not None
    (reason,) = query(live.site, "SELECT end_reason FROM call_records WHERE call_id = ?",
                      (consult["call_id"],))[0]
    assert reason == "transferred"
