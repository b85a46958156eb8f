"""Hold and resume with real phones: the agent's phone holds (re-INVITE sendonly, RFC 3264
§8.4) and the caller hears the hold music; after resume the caller hears the agent again.

Both parties are pjsua2 (each its own process): the caller dials the DID from 127.0.0.2 (the
test site's trunk source) and presses "1"; the agent (1001, 440 Hz tone) answers. The caller
records what it hears while held and after the resume; an FFT tells music from the agent's tone.
The appliance runs in this process (``peers.LiveAppliance``) for ``on_event`` and the API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from peers import (
    DID,
    Agent,
    LiveAppliance,
    agent_phone,
    dominant_hz,
    make_site,
    query,
    read_heard,
)

from appliance.calls import CallControlError

pytestmark = [pytest.mark.timeout(120)]
CHORD_NOTES = (165, 175, 196, 220, 247, 262, 294, 330, 392)
"""The notes of appliance/data/prompts/hold_music.wav (docs/calls.md, "Hold")."""


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")

    def edit(data: dict) -> None:
        data.setdefault("trunk", {})["allowed_sources"] = ["127.0.0.2/32"]

    site = make_site(tmp_path_factory.mktemp("calls-hold-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _hears(caller: Agent, path, seconds: float = 2.0):
    caller.command(f"record {path} {seconds}")
    caller.next("recorded", timeout=seconds + 15)
    samples, rate = read_heard(path)
    assert samples.size > rate * seconds * 0.5, (samples.size, rate)
    return samples, rate


def test_agent_holds_caller_hears_music_then_the_agent(live, tmp_path) -> None:
    calls = live.calls
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            offered = live.wait_event("call.offered")
            call_id = offered["call_id"]
            agent.next("answered")
            caller.next("answered")
            # Held from the phone: the bridge stops, the caller hears the music.
            agent.command("hold")
            held = live.wait_event("call.hold", match=lambda p: p["call_id"] == call_id)
            assert held["by"] == "1001"
            assert live.run(calls.active_calls)[0]["held"] is True
            samples, rate = _hears(caller, tmp_path / "held.wav")
            note = dominant_hz(samples, rate)
            assert min(abs(note - n) for n in CHORD_NOTES) < 6, note
            # Resumed from the phone: the agent's 440 Hz tone again.
            agent.command("unhold")
            live.wait_event("call.resume", match=lambda p: p["call_id"] == call_id)
            samples, rate = _hears(caller, tmp_path / "resumed.wav")
            assert abs(dominant_hz(samples, rate) - 440) < 10
            # Hold from the API, refused twice; then resume, refused twice.
            live.run(calls.hold, call_id, by="sup1")
            with pytest.raises(CallControlError) as caught:
                live.run(calls.hold, call_id, by="sup1")
            assert caught.value.status == 409
            samples, rate = _hears(caller, tmp_path / "api-held.wav", 1.5)
            assert min(abs(dominant_hz(samples, rate) - n) for n in CHORD_NOTES) < 6
            live.run(calls.resume, call_id, by="sup1")
            with pytest.raises(CallControlError) as caught:
                live.run(calls.resume, call_id, by="sup1")
            assert caught.value.status == 409
            live.run(calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
            agent.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (holds,) = query(live.site, "SELECT holds FROM call_records WHERE call_id = ?",
                     (call_id,))[0]
    periods = json.loads(holds)
    assert len(periods) == 2 and all(start < end for start, end in periods)
    assert periods[0][1] <= periods[1][0]
    topics = [(k, p["by"]) for k, p in live.events
              if k in ("call.hold", "call.resume") and p["call_id"] == call_id]
    assert topics == [("call.hold", "1001"), ("call.resume", "1001"), ("call.hold", "sup1"),
                      ("call.resume", "sup1")]
    # The same four are in the event log (for the KPI's HOLD/UNHOLD), heard live only once.
    from peers import events_of

    logged = [(k, p["by"]) for _, k, _, p in events_of(live.site, call_id)
              if k in ("call.hold", "call.resume")]
    assert logged == topics
    assert [k for _, k, _, _ in events_of(live.site, call_id)][-2:] == [
        "queue.complete", "call.record"]
