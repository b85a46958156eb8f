"""Supervisor listen / whisper / barge with real phones (the engine's mixer).

The caller is pjsua2 from 127.0.0.2 (1000 Hz), agent 1001 answers (440 Hz), supervisor 1003
(account role supervisor, 880 Hz) dials ``*81`` + 1001 (whisper): the agent hears the
supervisor's tone and the caller does not. Then ``supervise()`` from the API rings the
supervisor's phone for ``listen``. The appliance runs in this process.
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


def _hears(phone: Agent, path, seconds: float = 1.5):
    phone.command(f"record {path} {seconds}")
    phone.next("recorded", timeout=seconds + 15)
    return read_heard(path)


def test_whisper_reaches_the_agent_only(live, tmp_path) -> None:
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
            supervisor.command("dial *811001")
            supervisor.next("answered")
            joined = live.wait_event("call.supervise")
            assert (joined["call_id"], joined["mode"], joined["supervisor"]) == (
                call_id, "whisper", "1003")
            heard, rate = _hears(agent, tmp_path / "agent.wav")
            assert _level(heard, rate, 880) > 0.3  # the supervisor's tone
            assert _level(heard, rate, 1000) > 0.3  # and the caller
            heard, rate = _hears(caller, tmp_path / "caller.wav")
            assert _level(heard, rate, 440) > 0.5  # the agent
            assert _level(heard, rate, 880) < 0.05  # never the supervisor
            # From the API: ring the supervisor's phone, then listen in once answered.
            with pytest.raises(CallControlError) as caught:
                live.run(calls.supervise, "1003", "1001", "spy", by="sup")
            assert caught.value.status == 400
            live.run(calls.supervise, "1003", "1001", "listen", by="sup")
            supervisor.next("incoming")
            supervisor.command("answer")
            listen = live.wait_event("call.supervise", match=lambda p: p["mode"] == "listen")
            assert (listen["call_id"], listen["by"]) == (call_id, "sup")
            live.run(calls.hangup, call_id, by="sup")
            supervisor.next("disconnected")  # the supervised call ended: so did theirs
            supervisor.next("disconnected")
            caller.next("disconnected")
        finally:
            caller.close()
            if caller.proc.returncode is None:
                caller.proc.kill()
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    audited = query(live.site, "SELECT actor, action FROM audit_log WHERE action IN "
                               "('call.whisper', 'call.listen') ORDER BY id")
    assert audited == [("1003", "call.whisper"), ("sup", "call.listen")]
    # Supervisors' calls leave no call record of their own.
    assert [c for (c,) in query(live.site, "SELECT call_id FROM call_records")] == [call_id]
