"""The IVR's ``transfer`` node with real peers: to an agent's extension (their phone rings) or
to a number through the trunk (SIPp as the carrier), with the node's ``on_failure`` branch on
no answer, busy and a dial-rule refusal.

The caller is pjsua2 from 127.0.0.2 (the test site's trunk source) and presses the menu digit;
agents are pjsua2 (1001: 440 Hz, 1002: 660 Hz). The carrier is SIPp: ``carrier_uas_retry`` (401,
then answers the retry in the same call and plays speech) or ``carrier_busy`` (486). The appliance runs in this process
(``peers.LiveAppliance``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator

import pytest
from peers import (
    DID,
    Agent,
    Carrier,
    LiveAppliance,
    agent_phone,
    channel_rms,
    dominant_hz,
    free_port,
    log_lines,
    make_site,
    query,
    read_heard,
    wait_for,
)

# The carrier challenges the first INVITE; the retry is in the same call when the dialog
# layer can keep the From tag and raise the CSeq (RFC 3261 §8.1.3.5), else a new call.
CHALLENGING_CARRIER = ("carrier_uas_retry", 1)

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")]
TRUNK_USER, TRUNK_REALM, TRUNK_PASSWORD = "site-trunk", "carrier.test", "trunk-secret"
NUMBER = "+15551230000"


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def live(tmp_path_factory, carrier_port) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")
    ha1 = hashlib.md5(f"{TRUNK_USER}:{TRUNK_REALM}:{TRUNK_PASSWORD}".encode()).hexdigest()

    def edit(data: dict) -> None:
        data["queues"][0].update(members=["1001"], record=False)
        data["trunk"].update(carrier={"host": "127.0.0.1", "port": carrier_port},
                             auth={"user": TRUNK_USER, "realm": TRUNK_REALM, "ha1_md5": ha1})
        nodes = data["ivr"]["flows"]["main"]["nodes"]
        nodes["welcome"]["options"].update({"2": "to_agent", "3": "to_number", "4": "abroad"})
        nodes["to_agent"] = {"type": "transfer", "number": "1002", "timeout": 3,
                             "on_failure": "to_number"}
        nodes["to_number"] = {"type": "transfer", "number": NUMBER, "on_failure": "support"}
        nodes["abroad"] = {"type": "transfer", "number": "+4930123456", "role": "agent",
                           "on_failure": "goodbye"}

    site = make_site(tmp_path_factory.mktemp("calls-ivr-transfer-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


@contextlib.contextmanager
def _phone(tmp_path, live: LiveAppliance, user: str, mode: str) -> Iterator[Agent]:
    """A registered phone of an agent who is in no queue (no login needed)."""
    phone = Agent(tmp_path, live.site, live.port, user, mode)
    try:
        assert phone.wait("registered")["code"] == 200
        yield phone
    finally:
        phone.close()
        if phone.proc.returncode is None:
            phone.proc.kill()


def _hears(caller: Agent, path, seconds: float = 2.0):
    caller.command(f"record {path} {seconds}")
    caller.next("recorded", timeout=seconds + 15)
    samples, rate = read_heard(path)
    assert samples.size > rate * seconds * 0.5, (samples.size, rate)
    return samples, rate


def _record(live: LiveAppliance, call_id: str) -> dict:
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    names = [r[1] for r in query(live.site, "PRAGMA table_info(call_records)")]
    row = query(live.site, "SELECT * FROM call_records WHERE call_id = ?", (call_id,))[0]
    record = dict(zip(names, row, strict=True))
    record["ivr_trace"] = json.loads(record["ivr_trace"])
    record["legs"] = json.loads(record["legs"])
    return record


def _new_call(live: LiveAppliance) -> str:
    seen = {p["call_id"] for k, p in live.events if k == "call.offered"}
    return live.wait_event("call.offered", match=lambda p: p["call_id"] not in seen)["call_id"]


def test_transfer_to_an_agent_extension(live, tmp_path) -> None:
    with _phone(tmp_path, live, "1002", "answer") as target:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}/2")
        try:
            call_id = _new_call(live)
            target.next("incoming")
            target.next("answered")
            moved = live.wait_event("call.transfer", match=lambda p: p["call_id"] == call_id)
            assert (moved["by"], moved["target"], moved["kind"]) == ("ivr:main", "1002", "blind")
            caller.next("answered")
            samples, rate = _hears(caller, tmp_path / "agent.wav")
            assert abs(dominant_hz(samples, rate) - 660) < 10  # agent 1002's phone
            target.command("quit")  # the agent's phone hangs up and goes
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "to_agent"]
    assert (record["agent"], record["queue"]) == ("1002", None)
    assert record["answered_at"] is not None


def test_no_answer_goes_on_to_the_number_through_the_carrier(live, carrier_port,
                                                             tmp_path) -> None:
    mark = len(live.log_text())
    carrier = Carrier(tmp_path, CHALLENGING_CARRIER[0], calls=CHALLENGING_CARRIER[1],
                      port=carrier_port)
    try:
        with _phone(tmp_path, live, "1002", "idle") as target:
            caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}/2")
            try:
                call_id = _new_call(live)
                target.next("incoming")  # rings for the node's 3 s, never answered
                samples, rate = _hears(caller, tmp_path / "ringing.wav", 1.0)
                assert channel_rms(samples) > 100  # the hold music while it rings
                moved = live.wait_event("call.transfer", timeout=30,
                                        match=lambda p: p["call_id"] == call_id)
                assert moved["target"] == NUMBER
                caller.next("answered")
                samples, rate = _hears(caller, tmp_path / "far.wav")
                assert channel_rms(samples) > 100  # the carrier's speech
                live.run(live.calls.hangup, call_id, by="sup1")
                caller.next("disconnected")
            finally:
                caller.close()
                if caller.proc.returncode is None:
                    caller.proc.kill()
        assert carrier.finish() == 0, carrier.text()[-3000:] + live.log_text()[-3000:]
    finally:
        carrier.close()
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
    carrier = Carrier(tmp_path, "carrier_busy", calls=1, port=carrier_port)
    try:
        with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
            caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}/3")
            try:
                call_id = _new_call(live)
                agent.next("answered")  # the on_failure branch queued the caller
                caller.next("answered")
                samples, rate = _hears(caller, tmp_path / "queued.wav")
                assert abs(dominant_hz(samples, rate) - 440) < 10
                live.run(live.calls.hangup, call_id, by="sup1")
                caller.next("disconnected")
            finally:
                caller.close()
                if caller.proc.returncode is None:
                    caller.proc.kill()
        assert carrier.finish() == 0, carrier.text()[-3000:]
    finally:
        carrier.close()
    failed = [e for e in log_lines(live, "ivr_transfer_failed", mark) if e["call"] == call_id]
    assert [(e["outcome"], e["status"]) for e in failed] == [("busy", "486")]
    record = _record(live, call_id)
    assert record["ivr_trace"] == ["welcome", "to_number", "support"]
    assert (record["agent"], record["queue"]) == ("1001", "support")


def test_dial_rule_refusal_takes_the_failure_branch(live, tmp_path) -> None:
    mark = len(live.log_text())
    caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}/4")
    try:
        call_id = _new_call(live)
        caller.next("disconnected", timeout=30)  # goodbye, then the flow hangs up
    finally:
        caller.close()
        if caller.proc.returncode is None:
            caller.proc.kill()
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
