"""Music while queued, with real phones: from joining the queue until an agent is bridged the
caller hears the queue's music (the shipped four chords by default), also while an agent's
phone rings and after it rang out; `music: null` is silence; a music prompt that does not
exist stops the site at load.

The caller is pjsua2 dialling the DID from 127.0.0.2 (the test sites' trunk source) and
pressing "1"; the agent 1001 is pjsua2 that rings and answers only on the test's command
(440 Hz tone). What the caller hears is recorded and told apart by FFT. The appliance runs in
this process (``peers.LiveAppliance``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from peers import DID, Agent, LiveAppliance, agent_phone, dominant_hz, make_site, read_heard

pytestmark = [pytest.mark.timeout(120)]
CHORD_NOTES = (165, 175, 196, 220, 247, 262, 294, 330, 392)
"""The notes of appliance/data/prompts/hold_music.wav (docs/calls.md, "Hold")."""


def _site(tmp_path_factory, name: str, **queue: object):
    def edit(data: dict) -> None:
        data["queues"][0].update(strategy="linear", record=False, **queue)
        data["queues"][0]["members"] = ["1001"]

    return make_site(tmp_path_factory.mktemp(name), edit=edit)


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")
    appliance = LiveAppliance(_site(tmp_path_factory, "queue-music", ring_timeout=2)).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _hears(caller: Agent, path, seconds: float = 2.0) -> tuple[np.ndarray, int]:
    caller.command(f"record {path} {seconds}")
    caller.next("recorded", timeout=seconds + 15)
    samples, rate = read_heard(path)
    assert samples.size > rate * seconds * 0.5, (samples.size, rate)
    return samples, rate


def _is_music(samples: np.ndarray, rate: int) -> bool:
    note = dominant_hz(samples, rate)
    return min(abs(note - n) for n in CHORD_NOTES) < 6


def test_caller_hears_music_while_queued_and_ringing_then_the_agent(live, tmp_path) -> None:
    with agent_phone(tmp_path, live.site, live, "idle", user="1001") as agent:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            entered = live.wait_event("queue.enter")
            call_id = entered["call_id"]
            # The agent's phone rings (never answered): the caller hears the music.
            live.wait_event("call.ringing", match=lambda p: p["call_id"] == call_id)
            agent.next("incoming")
            samples, rate = _hears(caller, tmp_path / "ringing.wav")
            assert _is_music(samples, rate), dominant_hz(samples, rate)
            # It rang out (2 s) and is rung again: still the music, no gap of silence.
            agent.next("incoming", timeout=30)
            samples, rate = _hears(caller, tmp_path / "rung-again.wav")
            assert _is_music(samples, rate), dominant_hz(samples, rate)
            quiet = [abs(samples[i:i + rate // 5].astype(np.int32)).max()
                     for i in range(0, samples.size - rate // 5, rate // 5)]
            assert min(quiet) > 200, quiet  # the loop restarts without silence
            # Answered and bridged: the music stops, the caller hears the agent's 440 Hz.
            agent.command("answer")
            live.wait_event("queue.connect", match=lambda p: p["call_id"] == call_id)
            caller.next("answered")
            samples, rate = _hears(caller, tmp_path / "bridged.wav")
            assert abs(dominant_hz(samples, rate) - 440) < 10
            live.run(live.calls.hangup, call_id, by="sup1")
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    assert "queue_music_failed" not in live.log_text()


def test_music_null_is_silence(tmp_path_factory, tmp_path) -> None:
    pytest.importorskip("pjsua2")
    appliance = LiveAppliance(_site(tmp_path_factory, "queue-silent", music=None)).start()
    try:
        caller = Agent(tmp_path, appliance.site, appliance.port, "carrier", f"trunk:{DID}")
        try:
            call_id = appliance.wait_event("queue.enter")["call_id"]
            samples, rate = _hears(caller, tmp_path / "silent.wav", 2.0)
            # Nobody logged in: the caller waits in silence (after the IVR prompt's last
            # packets, still in the phone's jitter buffer when it starts recording).
            assert np.abs(samples[rate // 2:].astype(np.int32)).max() < 200
            appliance.run(appliance.calls.hangup, call_id, by="sup1")
            appliance.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    finally:
        appliance.close()


def test_unknown_music_prompt_stops_the_site(tmp_path_factory) -> None:
    from appliance.calls.control import load_call_path
    from appliance.config import load_site

    site = _site(tmp_path_factory, "queue-bad-music", music="no_such_tune")
    with pytest.raises(ValueError) as caught:
        load_call_path(load_site(site.directory))
    message = str(caught.value)
    assert "'support' music names prompt 'no_such_tune'" in message
    assert "hold_music" in message  # the prompts there are, to choose from


def test_music_name_is_checked_by_config(tmp_path_factory) -> None:
    from appliance.config import ConfigError, load_site

    site = _site(tmp_path_factory, "queue-music-name", music="../etc/passwd")
    with pytest.raises(ConfigError) as caught:
        load_site(site.directory)
    assert "queues[0].music" in str(caught.value)


def _match(heard: np.ndarray, rate: int, prompt: np.ndarray) -> float:
    """Peak normalised cross-correlation of ``prompt`` (8 kHz) within what was heard."""
    if rate != 8000:
        heard = heard[::rate // 8000]  # the phone's 16 kHz of an 8 kHz call: nothing above 4k
    a = heard.astype(np.float64)
    b = prompt.astype(np.float64)
    n = a.size + b.size
    corr = np.fft.irfft(np.fft.rfft(a, n) * np.conj(np.fft.rfft(b, n)), n)[:a.size - b.size]
    window = np.sqrt(np.convolve(a * a, np.ones(b.size), "valid")[:corr.size])
    loud = window > 0.1 * window.max()  # silence would divide by ~0
    return float(np.max(corr[loud] / (window[loud] * np.linalg.norm(b))))


def test_position_announcement_reaches_the_caller(tmp_path_factory, tmp_path) -> None:
    pytest.importorskip("pjsua2")
    from peers import log_lines, wait_for

    from appliance.calls.control import _SHIPPED_PROMPTS
    from media_core.prompt import load_prompt

    site = _site(tmp_path_factory, "queue-announce", music=None, announce_every=1.0)
    appliance = LiveAppliance(site).start()
    try:
        caller = Agent(tmp_path, appliance.site, appliance.port, "carrier", f"trunk:{DID}")
        try:
            call_id = appliance.wait_event("queue.enter")["call_id"]
            caller.command(f"record {tmp_path / 'announced.wav'} 4")
            caller.next("recorded", timeout=20)
            said = wait_for(lambda: [e for e in log_lines(appliance, "queue_announce")
                                     if e["call"] == call_id][1:], 15,
                            "a second announcement", appliance)
            # Nobody is staffed: the position only ("you are caller number one").
            assert (said[0]["position"], said[0]["estimated_wait"]) == ("1", "unknown")
            samples, rate = read_heard(tmp_path / "announced.wav")
            intro = load_prompt(_SHIPPED_PROMPTS / "you_are_caller.wav")
            one = load_prompt(_SHIPPED_PROMPTS / "digit_1.wav")
            assert _match(samples, rate, intro) > 0.6
            assert _match(samples, rate, one) > 0.6
            assert _match(samples, rate, load_prompt(_SHIPPED_PROMPTS / "digit_7.wav")) < 0.5
            appliance.run(appliance.calls.hangup, call_id, by="sup1")
            appliance.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    finally:
        appliance.close()


def test_announcement_prompts_say_position_and_wait() -> None:
    from appliance.calls.control import ANNOUNCE_PROMPTS, announcement_prompts

    assert announcement_prompts(12, 150.0) == [
        "you_are_caller", "digit_1", "digit_2", "estimated_wait", "digit_3", "minutes"]
    assert announcement_prompts(1, 20.0) == [
        "you_are_caller", "digit_1", "estimated_wait", "digit_1", "minute"]
    assert announcement_prompts(3, float("inf")) == ["you_are_caller", "digit_3"]
    assert announcement_prompts(2, float("nan")) == ["you_are_caller", "digit_2"]
    # Every prompt it names is shipped.
    assert set(announcement_prompts(1234567890, 600 * 60)) <= set(ANNOUNCE_PROMPTS)
