"""Agents' state across an appliance restart, with a call in progress (docs/routing.md, "After
a restart").

``edgecc appliance`` runs as a process of its own on a fixed SIP port; the agents' phones and
the carrier's caller are pjsua2 processes. Agent 1001 logs in (``*70``) and answers; agent
1002 logs in and pauses for lunch (``*722``); a caller is connected to 1001. Then the
appliance is stopped (SIGTERM) or killed (SIGKILL) and started again on the same site
directory. Afterwards: the logins and the pause reason are back, 1001 is not left on a call
that died with the appliance (the dead call is audited as cleared by ``watchdog``), the
interrupted call has what can be known of it, and a new call reaches 1001 (never 1002).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from peers import (
    Agent,
    agent_phone,
    decrypt_recording,
    free_port,
    log_lines,
    make_site,
    query,
    wait_for,
)
from test_register_peers import Running, Site, stop
from test_register_peers import start as start_appliance

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sip-tester missing"),
    pytest.mark.timeout(150),
]
pjsua2 = pytest.importorskip("pjsua2")

DID = "+15550100"


@pytest.fixture
def site(tmp_path: Path) -> Site:
    port = free_port()

    def edit(data: dict) -> None:
        # A fixed port: the phones keep the address they registered to across the restart.
        data["sip"]["udp_port"] = port
        data["sip"]["tcp_port"] = port
        # The watchdog runs often and clears after a short grace, so the test waits little.
        data["agents"] = {"watchdog_interval": 0.5, "watchdog_grace": 1.0}

    return make_site(tmp_path / "site", agents=2, edit=edit)


def scratch_wavs(site: Site) -> list[Path]:
    """The plaintext WAVs in this site's recording scratch directories (appliance/calls/
    control.py: ``_scratch_dir``, each with an owner file naming the site database)."""
    from appliance.calls.control import SCRATCH_OWNER, _scratch_base

    found = []
    for directory in _scratch_base().glob("edgecc-*-rec-*"):
        with contextlib.suppress(OSError, ValueError):
            owner = (directory / SCRATCH_OWNER).read_text().splitlines()
            if owner[1] == str(Path(site.database).resolve()):
                found += directory.glob("*.wav")
    return found


@pytest.fixture
def appliances(site: Site) -> Iterator[list[Running]]:
    """Every appliance process the test starts; each is stopped at the end."""
    started: list[Running] = []
    try:
        yield started
    finally:
        for running in started:
            stop(running.proc)


def dial(phone: Agent, code: str) -> int:
    """Dial a feature code; the final status the phone saw (200: confirmed)."""
    phone.command(f"dial {code}")
    phone.next("dialled")
    return int(phone.next("disconnected")["code"])


def desk_rows(site: Site) -> dict[str, tuple[str, str | None]]:
    return {a: (p, r) for a, p, r in query(site, "SELECT agent, presence, reason FROM agent_desk")}


def kinds_of(site: Site, prefix: str) -> list[tuple[str, dict]]:
    return [(k, json.loads(p)) for k, p in query(
        site, "SELECT kind, payload FROM events WHERE kind LIKE ? ORDER BY seq", (prefix + "%",))]


@pytest.mark.parametrize("how", ["sigterm", "kill"])
def test_agents_and_call_across_a_restart(site: Site, appliances: list[Running],
                                          tmp_path: Path, how: str) -> None:
    first = start_appliance(site, "first.log")
    appliances.append(first)
    with contextlib.ExitStack() as phones:
        alice = phones.enter_context(agent_phone(tmp_path, site, first, "answer", user="1001"))
        bob = phones.enter_context(agent_phone(tmp_path, site, first, "idle", user="1002"))
        assert dial(bob, "*70") == 200
        assert dial(bob, "*722") == 200  # pause, reason 2: lunch
        wait_for(lambda: desk_rows(site) == {"1001": ("available", None),
                                            "1002": ("paused", "lunch")},
                 15, "both agents' desk rows", first)

        # A caller through the IVR ("1") and the queue to 1001, who answers.
        caller = Agent(tmp_path, site, first.port, "carrier", f"trunk:{DID}")
        try:
            alice.next("incoming")
            alice.next("answered")
            caller.wait("answered")
            [connected] = wait_for(lambda: log_lines(first, "call_connected"), 15,
                                   "the call connected", first)
            call_id = connected["call"]
            assert connected["agent"] == "1001"
            # The router holds the call at 1001 and the watchdog has seen it answered (it may
            # have noted it ringing first, a run earlier).
            wait_for(lambda: query(site, "SELECT call_id, kind FROM agent_desk_calls "
                                         "WHERE agent = '1001'") == [(call_id, "on-call")],
                     15, "the desk noting 1001's call", first)

            if how == "sigterm":
                assert stop(first.proc) == 0
                # The audit chain's head as it stopped (its "stop" row) went out for the cloud.
                [(payload,)] = query(site, "SELECT payload FROM events WHERE kind = "
                                           "'audit.head' ORDER BY seq DESC LIMIT 1")
                assert [(json.loads(payload)["id"], json.loads(payload)["hash"])] == query(
                    site, "SELECT head_id, head_hash FROM audit_chain")
                # A stop hangs up both sides and writes the record.
                alice.next("disconnected")
                caller.wait("disconnected")
                alice.wait("closed")  # the phone's script ends with its call
            else:
                # The call is being recorded: the engine's plaintext WAV grows in the site's
                # scratch directory (in RAM) until the call's end encrypts it.
                wav = wait_for(lambda: [w for w in scratch_wavs(site) if w.name ==
                                        f"{call_id}.wav" and w.stat().st_size > 44 + 8000],
                               15, "the call's recording under way", first)[0]
                first.proc.send_signal(signal.SIGKILL)
                assert first.proc.wait(15) == -signal.SIGKILL
                assert wav.exists()  # what the crash leaves: plaintext audio

            audits_before = query(site, "SELECT COUNT(*) FROM audit_log")[0][0]
            second = start_appliance(site, "second.log")
            appliances.append(second)

            # Logins and the pause reason are back; nobody logged in again.
            assert desk_rows(site) == {"1001": ("available", None), "1002": ("paused", "lunch")}
            assert [p["agent"] for _, p in kinds_of(site, "agent.login")] == ["1001", "1002"]

            # The call that died with the appliance no longer holds 1001: cleared at start,
            # audited as the watchdog's.
            cleared = wait_for(lambda: query(
                site, "SELECT actor, detail FROM audit_log WHERE action = 'agent.watchdog' "
                      "AND id > ?", (audits_before,)), 15, "the watchdog's audit row", second)
            assert cleared[0][0] == "watchdog"
            assert f"call_id={call_id}" in cleared[0][1] and "agent=1001" in cleared[0][1]
            assert "cleared=on-call" in cleared[0][1]
            assert query(site, "SELECT * FROM agent_desk_calls") == []

            # What the site keeps of the interrupted call.
            records = query(site, "SELECT end_reason, agent FROM call_records "
                                  "WHERE call_id = ?", (call_id,))
            if how == "sigterm":
                assert records == [("appliance-stopped", "1001")]
            else:
                # Recorded at the start after the crash, from calls_in_progress, with the
                # audio recorded until the crash: encrypted, and no plaintext left behind.
                assert records == [("appliance-crashed", "1001")]
                [(recording_id,)] = query(site, "SELECT recording_id FROM call_records "
                                                "WHERE call_id = ?", (call_id,))
                assert recording_id is not None
                assert decrypt_recording(site, recording_id).shape[0] > 2000
                assert not wav.exists() and not wav.parent.exists()
                assert scratch_wavs(site) == []
        finally:
            caller.close()

        if how == "sigterm":
            # 1001 picks up a phone again; its *70 is refused as already logged in (403).
            alice = phones.enter_context(agent_phone(tmp_path, site, second, "answer",
                                                     user="1001"))
            assert [p["agent"] for _, p in kinds_of(site, "agent.login")] == ["1001", "1002"]
        # A new call reaches the restored agent 1001, never the paused 1002.
        again = Agent(tmp_path, site, second.port, "carrier2", f"trunk:{DID}")
        try:
            alice.next("incoming")
            alice.next("answered")
            again.wait("answered")
            new = wait_for(lambda: [c for c in log_lines(second, "call_connected")
                                    if c["call"] != call_id], 15, "the new call", second)
            assert new[0]["agent"] == "1001"
        finally:
            again.close()
        assert not [e for e in bob.seen if e["event"] == "incoming"]
        # 1002 is paused in the restarted appliance too: unpausing is accepted.
        assert dial(bob, "*73") == 200
        wait_for(lambda: desk_rows(site)["1002"] == ("available", None), 15,
                 "1002 unpaused", second)
