"""Recording policy per queue and recording pause/resume (``*1`` / ``*2`` and the API).

The caller is pjsua2 from 127.0.0.2 (1000 Hz), the agent pjsua2 1001 (440 Hz); the agent
presses ``*1`` (RFC 4733) and the API resumes. The decrypted recording is silent in both
channels while paused and carries both parties outside it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from peers import (
    DID,
    Agent,
    LiveAppliance,
    agent_phone,
    channel_rms,
    decrypt_recording,
    make_site,
    query,
    wait_for,
)

from appliance.calls import CallControlError
from appliance.calls.control import recording_decision


def test_recording_policy_draws() -> None:
    assert recording_decision(True, 0.99) == (True, "always")
    assert recording_decision(False, 0.0) == (False, "never")
    assert recording_decision(25, 0.10) == (True, "sampled-in 25%")
    assert recording_decision(25, 0.25) == (False, "sampled-out 25%")
    assert recording_decision(0, 0.0) == (False, "sampled-out 0%")
    assert recording_decision(100, 0.999) == (True, "sampled-in 100%")
    # Over many draws the share follows the percentage (a seeded generator: no flakiness).
    rng = np.random.default_rng(7)
    share = np.mean([recording_decision(30, d)[0] for d in rng.random(4000)])
    assert 0.27 < share < 0.33


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")
    site = make_site(tmp_path_factory.mktemp("calls-recording-site"))
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


@pytest.mark.timeout(120)
def test_pause_by_code_resume_by_api(live, tmp_path) -> None:
    calls = live.calls
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered")["call_id"]
            agent.next("answered")
            caller.next("answered")
            agent_media = live.run(lambda: calls.control.calls[call_id].connected.media)

            def media_for(seconds: float) -> None:
                start = live.run(calls.engine.stats, agent_media).rx_packets
                wait_for(lambda: live.run(calls.engine.stats, agent_media).rx_packets
                         > start + seconds * 50, 20, "the agent's media", live)

            media_for(1.0)
            with pytest.raises(CallControlError) as caught:
                live.run(calls.resume_recording, call_id, by="sup1")
            assert caught.value.status == 409  # not paused
            agent.command("dtmf *1")
            paused = live.wait_event("recording.paused")
            assert (paused["call_id"], paused["by"]) == (call_id, "1001")
            assert live.run(calls.active_calls)[0]["recording_paused"] is True
            media_for(1.5)
            live.run(calls.resume_recording, call_id, by="sup1")
            resumed = live.wait_event("recording.resumed")
            assert resumed["by"] == "sup1"
            media_for(1.5)
            live.run(calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    (recording_id, decision, answered_at) = query(
        live.site, "SELECT recording_id, recording_decision, answered_at FROM call_records"
        " WHERE call_id = ?", (call_id,))[0]
    assert decision == "always"
    stereo = decrypt_recording(live.site, recording_id)

    def stretch(start: float, end: float) -> np.ndarray:
        # The middle of [start, end] (seconds since the answer), clear of the edges.
        a, b = start + (end - start) * 0.25, end - (end - start) * 0.25
        return stereo[int(a * 8000):int(b * 8000)]

    pause_s, resume_s = paused["at"] - answered_at, resumed["at"] - answered_at
    before, during = stretch(0.0, pause_s), stretch(pause_s, resume_s)
    after = stretch(resume_s, stereo.shape[0] / 8000)
    assert during.size and channel_rms(during[:, 0]) < 30 and channel_rms(during[:, 1]) < 30
    for part in (before, after):
        assert channel_rms(part[:, 0]) > 100 and channel_rms(part[:, 1]) > 100
    actions = [a for (a,) in query(live.site, "SELECT action FROM audit_log WHERE action LIKE"
                                             " 'recording.%' ORDER BY id")]
    assert actions == ["recording.paused", "recording.resumed"]
