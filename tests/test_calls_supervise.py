"""Supervisor listen / whisper / barge with real phones (the engine's mixer).

The caller is pjsua2 from 127.0.0.2 (1000 Hz), agent 1001 answers (440 Hz), supervisor 1003
(account role supervisor, 880 Hz). On one call: whisper by ``*81`` + 1001 (the agent hears the
supervisor, the caller does not), listen from ``supervise()`` (the API's call: it rings the
supervisor's phone; the supervisor hears both, neither hears the supervisor), barge from the
API (all three hear each other), each checked by FFT on what the phones heard; then listen by
``*80``, barge by ``*82`` and whisper from the API. Every join is audited with who and from where. The
appliance runs in this process.
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
    make_site,
    query,
    read_heard,
)

from appliance.calls import CallControlError

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    pytest.importorskip("pjsua2")

    def edit(data: dict) -> None:
        data["sip"]["accounts"][2]["role"] = "supervisor"
        data["queues"][0].update(members=["1001"], record=False)

    site = make_site(tmp_path_factory.mktemp("calls-supervise-site"), agents=3, edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _level(samples: np.ndarray, rate: int, hz: float) -> float:
    """Spectral magnitude around ``hz`` relative to the strongest component."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(samples.size)))
    freqs = np.fft.rfftfreq(samples.size, 1 / rate)
    band = spectrum[(freqs > hz - 8) & (freqs < hz + 8)]
    return float(band.max() / spectrum[freqs > 60].max())


def _hears_all(tmp_path, tag: str, **phones: Agent) -> dict[str, tuple[np.ndarray, int]]:
    """What each phone hears over the same 1.5 s (recorded at once, so one call set-up serves
    every check of a mode)."""
    seconds = 1.5
    for name, phone in phones.items():
        phone.command(f"record {tmp_path / f'{tag}-{name}.wav'} {seconds}")
    heard = {}
    for name, phone in phones.items():
        phone.next("recorded", timeout=seconds + 15)
        heard[name] = read_heard(tmp_path / f"{tag}-{name}.wav")
    return heard


CALLER_HZ, AGENT_HZ, SUPERVISOR_HZ = 1000, 440, 880
"""The tones the phones send (tests/peers.py): the carrier's caller, agent 1001, supervisor
1003."""
HEARD, UNHEARD = 0.3, 0.05
"""Level (relative to the strongest component) above which a tone counts as heard, and below
which as not heard."""


def _check_mix(heard: dict[str, tuple[np.ndarray, int]], hears: dict[str, set[int]]) -> None:
    """Each phone hears exactly the tones ``hears`` gives it among the other two parties'."""
    sent = {"caller": CALLER_HZ, "agent": AGENT_HZ, "supervisor": SUPERVISOR_HZ}
    for name, expected in hears.items():
        for other, hz in sent.items():
            if other == name:
                continue
            level = _level(*heard[name], hz)
            if hz in expected:
                assert level > HEARD, f"{name} should hear the {other} ({hz} Hz): {level:.3f}"
            else:
                assert level < UNHEARD, f"{name} must not hear the {other} ({hz} Hz): {level:.3f}"


def _leave(live: LiveAppliance, supervisor: Agent, call_id: str) -> None:
    """The supervisor hangs up; caller and agent stay connected."""
    supervisor.command("hangup")
    supervisor.next("disconnected")
    assert live.run(lambda: [c.call_id for c in live.calls.control.calls.values()
                             if c.direction == "inbound"]) == [call_id]


JOINS = [("whisper", "1003", "sip:1003"), ("listen", "sup", "api"), ("barge", "sup", "api"),
         ("listen", "1003", "sip:1003"), ("barge", "1003", "sip:1003"),
         ("whisper", "sup", "api")]
"""(mode, who asked, from where) of the test's joins, in order."""


def test_listen_whisper_barge_by_code_and_api(live, tmp_path) -> None:
    calls = live.calls
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent, \
            agent_phone(tmp_path, live.site, live, "idle", user="1003") as supervisor:
        caller = Agent(tmp_path, live.site, live.port, "carrier", f"trunk:{DID}")
        try:
            call_id = live.wait_event("call.offered")["call_id"]
            agent.next("answered")
            caller.next("answered")
            # An agent may not supervise; a supervisor may not join an idle agent.
            with pytest.raises(CallControlError) as caught:
                live.run(calls.supervise, "1001", "1001", "listen", by="x")
            assert caught.value.status == 403
            with pytest.raises(CallControlError) as caught:
                live.run(calls.supervise, "1003", "1002", "listen", by="x")
            assert caught.value.status == 409
            phones = {"caller": caller, "agent": agent, "supervisor": supervisor}
            joins = []

            def join_by_code(code: str, mode: str) -> None:
                supervisor.command(f"dial {code}1001")
                supervisor.next("answered")
                joined = live.wait_event("call.supervise", match=lambda p: p["mode"] == mode
                                         and all(p is not j for j in joins))
                joins.append(joined)

            def join_by_api(mode: str) -> None:
                live.run(calls.supervise, "1003", "1001", mode, by="sup")
                supervisor.next("incoming")
                supervisor.command("answer")
                joined = live.wait_event("call.supervise", match=lambda p: p["mode"] == mode
                                         and all(p is not j for j in joins))
                joins.append(joined)

            # Whisper (*81): the agent hears the supervisor, the caller never does. (What the
            # supervisor's phone hears is checked on the calls it answers: a phone that dials
            # renews its stream right after the answer, a re-INVITE to one codec.)
            join_by_code("*81", "whisper")
            _check_mix(_hears_all(tmp_path, "whisper", caller=caller, agent=agent), {
                "agent": {CALLER_HZ, SUPERVISOR_HZ}, "caller": {AGENT_HZ}})
            _leave(live, supervisor, call_id)
            # Listen from the API (rings the supervisor's phone): the supervisor hears both;
            # neither hears the supervisor.
            with pytest.raises(CallControlError) as caught:
                live.run(calls.supervise, "1003", "1001", "spy", by="sup")
            assert caught.value.status == 400
            join_by_api("listen")
            _check_mix(_hears_all(tmp_path, "listen", **phones), {
                "agent": {CALLER_HZ}, "caller": {AGENT_HZ},
                "supervisor": {CALLER_HZ, AGENT_HZ}})
            _leave(live, supervisor, call_id)
            # Barge from the API: all three hear each other.
            join_by_api("barge")
            _check_mix(_hears_all(tmp_path, "barge", **phones), {
                "agent": {CALLER_HZ, SUPERVISOR_HZ}, "caller": {AGENT_HZ, SUPERVISOR_HZ},
                "supervisor": {CALLER_HZ, AGENT_HZ}})
            _leave(live, supervisor, call_id)
            # Once the supervisor has left, caller and agent hear each other only again.
            _check_mix(_hears_all(tmp_path, "after", caller=caller, agent=agent), {
                "agent": {CALLER_HZ}, "caller": {AGENT_HZ}})
            # The other halves, through the same mixer calls: listen and barge by code,
            # whisper from the API.
            join_by_code("*80", "listen")
            _leave(live, supervisor, call_id)
            join_by_code("*82", "barge")
            _leave(live, supervisor, call_id)
            join_by_api("whisper")
            assert [(j["call_id"], j["mode"], j["by"], j["source"]) for j in joins] == [
                (call_id, *join) for join in JOINS]
            live.run(calls.hangup, call_id, by="sup")
            supervisor.next("disconnected")  # the supervised call ended: so did theirs
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    # Every join audited: who asked, from where (the supervisor's phone or the API), which
    # call and agent, which supervisor phone.
    audited = query(live.site, "SELECT actor, action, detail FROM audit_log WHERE action IN "
                               "('call.whisper', 'call.listen', 'call.barge') ORDER BY id")
    assert [(actor, action) for actor, action, _ in audited] == [
        (by, f"call.{mode}") for mode, by, _ in JOINS]
    for (_, _, detail), (_, _, source) in zip(audited, JOINS, strict=True):
        assert f"call={call_id}" in detail and "agent=1001" in detail
        assert "supervisor=1003" in detail and f"source={source}" in detail
    # Supervisors' calls leave no call record of their own.
    assert [c for (c,) in query(live.site, "SELECT call_id FROM call_records")] == [call_id]
