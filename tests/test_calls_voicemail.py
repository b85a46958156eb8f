"""Voicemail with a real peer: SIPp as the carrier calls a DID whose flow takes a message and
sends a tone; the stored message decrypts and carries that tone, and its index says whose
message it is (docs/calls.md, "Voicemail")."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from peers import (
    CALLER,
    LiveAppliance,
    decrypt_recording,
    dominant_hz,
    events_of,
    make_site,
    query,
    sipp,
    sipp_failed,
    write_tone_pcap,
)

from appliance.calls.voicemail import BEEP

VOICEMAIL_DID = "+15550177"
TONE_HZ = 800.0
TONE_SECONDS = 5.5
MAX_SECONDS = 5

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp missing")


def test_beep_is_a_short_1khz_tone() -> None:
    sounding = np.flatnonzero(BEEP)
    assert 0.4 <= (sounding[-1] - sounding[0]) / 8000 <= 0.6
    assert BEEP.size > sounding[-1] + 800  # then a short silence before the recording
    assert abs(dominant_hz(BEEP, 8000) - 1000) < 20


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        queue = data["queues"][0]["name"]
        data["ivr"]["dids"][VOICEMAIL_DID] = "messages"
        data["ivr"]["flows"]["messages"] = {"start": "topic", "nodes": {
            "topic": {"type": "set", "variables": {"topic": "billing"}, "next": "mailbox"},
            "mailbox": {"type": "voicemail", "mailbox": "sales", "prompt": "goodbye",
                        "max_seconds": MAX_SECONDS, "queue": queue}}}

    site = make_site(tmp_path_factory.mktemp("calls-voicemail-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def _message(live: LiveAppliance, tmp_path: Path, stop: str) -> tuple[dict, dict]:
    write_tone_pcap(tmp_path / "tone.pcap", TONE_HZ, TONE_SECONDS)
    before = {p["call_id"] for k, p in list(live.events) if k == "voicemail.left"}
    result = sipp(tmp_path, live, "voicemail_call", keys={"stop": stop}, service=VOICEMAIL_DID,
                  timeout=40)
    assert result.returncode == 0, sipp_failed(result, live)
    left = live.wait_event("voicemail.left", match=lambda p: p["call_id"] not in before)
    call_id = left["call_id"]
    live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
    names = [r[1] for r in query(live.site, "PRAGMA table_info(call_records)")]
    record = dict(zip(names, query(live.site, "SELECT * FROM call_records WHERE call_id = ?",
                                   (call_id,))[0], strict=True))
    return left, record


@needs_sipp
@pytest.mark.timeout(90)
def test_message_is_stored_encrypted_with_its_mailbox(live, tmp_path) -> None:
    left, record = _message(live, tmp_path, "wait")
    call_id, recording_id = left["call_id"], left["recording_id"]
    assert (left["mailbox"], left["queue"], left["caller"]) == ("sales", "support", CALLER)
    # The call: answered, ended by the message's end, recorded as a voicemail.
    assert record["end_reason"] == "voicemail"
    assert record["answered_at"] is not None and record["recording_id"] == recording_id
    assert (record["recording_decision"], record["queue"]) == ("voicemail", "support")
    # The index row: mailbox, queue, caller, the flow's variables, the length (the message
    # stopped at max_seconds: the caller stayed on the line, silent after the tone).
    (mailbox, queue, caller, variables, duration, message_call), = query(
        live.site, "SELECT mailbox, queue, caller, variables, duration_s, call_id"
        " FROM voicemail_messages WHERE recording_id = ?", (recording_id,))
    assert (mailbox, queue, caller, message_call) == ("sales", "support", CALLER, call_id)
    assert json.loads(variables)["topic"] == "billing"
    assert 0 < duration <= MAX_SECONDS + 0.5
    assert left["duration_s"] == duration
    # Stored like a call recording: the same index (so search, export, retention and erasure
    # apply), encrypted; it decrypts to the caller's tone on the left, silence on the right.
    assert query(live.site, "SELECT caller, queue, call_id FROM recordings WHERE id = ?",
                 (recording_id,)) == [(CALLER, "support", call_id)]
    raw = next((live.site.directory / "recordings").rglob(f"*{recording_id}*")).read_bytes()
    assert b"RIFF" not in raw[:64]
    stereo = decrypt_recording(live.site, recording_id)
    assert abs(stereo.shape[0] / 8000 - duration) < 0.1
    assert abs(dominant_hz(stereo[:, 0], 8000) - TONE_HZ) < 15
    assert not np.any(stereo[:, 1])
    # voicemail.left is in the event log with the call's record, each with its outbox row.
    kinds = [k for _, k, _, _ in events_of(live.site, call_id)]
    assert kinds == ["voicemail.left", "call.record"]


@needs_sipp
@pytest.mark.timeout(90)
def test_pound_ends_the_message(live, tmp_path) -> None:
    left, record = _message(live, tmp_path, "pound")
    assert record["end_reason"] == "voicemail"
    # "#" came 6 s after the answer, about 3 s into the message: well before max_seconds.
    assert left["duration_s"] < MAX_SECONDS - 0.5
    stereo = decrypt_recording(live.site, left["recording_id"])
    assert abs(dominant_hz(stereo[:, 0], 8000) - TONE_HZ) < 15
