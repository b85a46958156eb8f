"""Call control's voicemail: the IVR's ``voicemail`` node answers the call, plays the mailbox's
greeting and a beep, and records the caller until ``#``, ``max_seconds`` or their hang-up
(docs/calls.md, "Voicemail").

The message is stored like a call recording (``appliance.recording.RecordingStore``: encrypted,
same search, export, retention and erasure); the table ``voicemail_messages`` says which
recordings are messages, for which mailbox and queue, from which caller, with the flow's
variables and the message's length. The call record's end reason is ``voicemail``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from appliance.calls.leg import EndReason, LegInput
from appliance.calls.model import SDP_HEADERS, Call
from appliance.log import kv
from media_core.engine import EngineError, PromptFinished, RecordingFinished

__all__ = ["BEEP", "MAX_VOICEMAILS", "VoicemailTake", "VoicemailTaking"]

log = logging.getLogger("edgecc.calls")

MAX_VOICEMAILS = 1_000
"""Messages being taken at once at most; beyond it the call ends (``voicemail-busy``)."""
STOP_DIGIT = "#"
"""The caller ends the message with this key (the usual voicemail convention)."""


def _beep() -> np.ndarray:
    """0.5 s of 1000 Hz at about -10 dBm0, then 0.2 s of silence: "speak now"."""
    t = np.arange(int(0.5 * 8000)) / 8000
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    return np.concatenate([tone, np.zeros(1600, dtype=np.int16)])


BEEP = _beep()
"""What the caller hears right before the recording starts."""


@dataclass(eq=False)
class VoicemailTake:
    """A message being taken on one call."""

    mailbox: str
    queue: str | None
    max_seconds: int
    variables: dict[str, str]
    greeting: int | None = None
    """Engine prompt id of the greeting playing."""
    beep: int | None = None
    """Engine prompt id of the beep playing."""
    recording: bool = False
    """The message is being recorded."""
    timer: asyncio.TimerHandle | None = None
    """Ends the message at ``max_seconds``."""


class VoicemailTaking:
    """The voicemail part of ``CallControl`` (the state lives there: ``voicemails``)."""

    def _take_voicemail(self, call: Call, action: Any) -> None:
        """The flow reached a ``voicemail`` node (``ivr.Voicemail``): answer, greet, beep."""
        now = time.time()
        self._stop_ivr(call)
        if self.recordings is None or len(self.voicemails) >= MAX_VOICEMAILS:
            call.end_reason = "voicemail-busy"
            self._hangup_caller(call, EndReason.SYSTEM)
            return
        take = VoicemailTake(action.mailbox, action.queue, action.max_seconds,
                             dict(action.variables))
        self.voicemails[call.call_id] = take
        call.queue = action.queue
        # Answered (RFC 3261 §13.3.1.4): a message may be longer than a carrier lets early
        # media run, and the caller is talking to us now.
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
            call.answered_at = now
        self._arm_media_timeout(call.media)
        log.info(kv(event="voicemail_greeting", call=call.call_id, mailbox=action.mailbox))
        pcm = self.prompts.get(action.prompt) if action.prompt else None
        try:
            if pcm is not None:
                take.greeting = self.engine.play(call.media, pcm)
            else:
                take.beep = self.engine.play(call.media, BEEP)
        except EngineError as exc:
            log.error(kv(event="voicemail_failed", call=call.call_id, error=str(exc)))
            self._end_voicemail(call, "voicemail-failed")

    def _voicemail_prompt_done(self, call: Call, event: PromptFinished) -> bool:
        """The greeting or the beep ended; True when the event was the voicemail's."""
        take = self.voicemails.get(call.call_id)
        if take is None:
            return False
        if event.prompt_id == take.greeting:
            take.greeting = None
            if call.ended_at is None:
                try:
                    take.beep = self.engine.play(call.media, BEEP)
                except EngineError:
                    self._end_voicemail(call, "voicemail-failed")
            return True
        if event.prompt_id == take.beep:
            take.beep = None
            if call.ended_at is None and not take.recording:
                self._start_message(call, take)
            return True
        return False

    def _start_message(self, call: Call, take: VoicemailTake) -> None:
        now = time.time()
        # Mono in effect: the caller on the left, the right channel silent (no other party).
        self._start_recording(call, call.media, -1, now)
        if call.recording is None:
            self._end_voicemail(call, "voicemail-failed")
            return
        take.recording = True
        call.recording_decision = "voicemail"
        call.end_reason = "voicemail"
        take.timer = asyncio.get_running_loop().call_later(
            take.max_seconds, self._end_voicemail, call, "voicemail")
        log.info(kv(event="voicemail_recording", call=call.call_id, mailbox=take.mailbox,
                    max_seconds=take.max_seconds))

    def _voicemail_digit(self, call: Call, digit: str) -> bool:
        """A digit from the caller; True when the voicemail took it (``#``: message done, or
        the greeting skipped)."""
        take = self.voicemails.get(call.call_id)
        if take is None:
            return False
        if digit != STOP_DIGIT:
            return True  # digits are not messages' business: ignored, not recorded as input
        if take.recording:
            self._end_voicemail(call, "voicemail")
        elif take.greeting is not None:
            take.greeting = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)
            with contextlib.suppress(EngineError):
                take.beep = self.engine.play(call.media, BEEP)
        return True

    def _end_voicemail(self, call: Call, reason: str) -> None:
        """End the message (``#``, ``max_seconds``) and the call."""
        take = self.voicemails.get(call.call_id)
        if take is not None and take.timer is not None:
            take.timer.cancel()
            take.timer = None
        if call.ended_at is not None:
            return
        call.end_reason = reason
        self._hangup_caller(call, EndReason.SYSTEM)

    def _voicemail_gone(self, call: Call) -> None:
        """The call is over (whoever ended it): no timer left behind."""
        take = self.voicemails.get(call.call_id)
        if take is not None and take.timer is not None:
            take.timer.cancel()
            take.timer = None

    def _voicemail_rows(self, conn: sqlite3.Connection, call: Call, recording_id: str | None,
                        finished: RecordingFinished | None, now: float
                        ) -> list[tuple[str, dict[str, Any], float]]:
        """Database thread, inside the call record's transaction: the message's index row;
        returns the ``voicemail.left`` event to append with the record (none without a
        message)."""
        take = self.voicemails.pop(call.call_id, None)
        if take is None or recording_id is None:
            return []
        if finished is not None and finished.frames > 0:
            duration = finished.frames / 8000
        else:
            duration = max(0.0, now - (call.recording_started or now))
        duration = round(duration, 3)
        conn.execute(
            "INSERT INTO voicemail_messages (recording_id, call_id, mailbox, queue, caller,"
            " variables, duration_s, left_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (recording_id, call.call_id, take.mailbox, take.queue, call.caller,
             json.dumps(take.variables), duration, call.recording_started or now))
        log.info(kv(event="voicemail_left", call=call.call_id, mailbox=take.mailbox,
                    recording=recording_id, duration_s=duration))
        return [("voicemail.left", {
            "call_id": call.call_id, "recording_id": recording_id, "mailbox": take.mailbox,
            "queue": take.queue, "caller": call.caller, "duration_s": duration}, now)]
