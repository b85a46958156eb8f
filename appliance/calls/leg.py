"""One call leg (the caller's or an agent's side of a B2BUA call) as a state table.

Rules of this file:

* ``TRANSITIONS[direction][(state, input)] -> Row(actions, next_state, end)``. An inbound leg
  is a call that reached us (the caller, or a phone dialling out through us); an outbound leg is
  one we dial (an agent's phone, a transfer target). Mid-call rows are shared by both.
* A pair that is not in the table is ``LocalProtocolError``: call control fed an input the leg
  cannot take in that state (the dialog layer has already answered the peer).
* The leg decides *what* to do (``LegAction``); call control does it with the dialog layer
  (``appliance.sip.dialog``) and the media engine. No clocks: ``now`` is an argument.
* An ended leg carries its ``EndReason`` (and the SIP status when one was involved) for the
  call record.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from media_core.sip import LocalProtocolError

__all__ = [
    "TRANSITIONS",
    "Direction",
    "EndReason",
    "Leg",
    "LegAction",
    "LegInput",
    "LegRecord",
    "LegState",
    "Party",
    "Row",
    "is_hold_offer",
    "response_input",
]


class Direction(enum.Enum):
    """Who sent the INVITE that opened the leg."""

    INBOUND = "inbound"  # the peer called us
    OUTBOUND = "outbound"  # we called the peer


class Party(enum.Enum):
    """Who is at the far end of the leg (decides "caller hung up" vs "agent hung up")."""

    CALLER = "caller"
    AGENT = "agent"


class LegState(enum.Enum):
    IDLE = "idle"
    INVITING = "inviting"  # outbound: INVITE sent, nothing back yet
    PROCEEDING = "proceeding"  # inbound: 100 sent; outbound: 100 received
    RINGING = "ringing"  # 180 sent / received
    EARLY = "early"  # 183 with SDP: early media flows
    ANSWERED = "answered"  # inbound: our 200 sent, its ACK not yet here
    CONNECTED = "connected"
    HOLDING = "holding"  # either side put the call on hold (sendonly/inactive)
    TRANSFERRING = "transferring"  # a REFER is being carried out
    TERMINATING = "terminating"  # our CANCEL or BYE is out, waiting for its answer
    ENDED = "ended"


class LegInput(enum.Enum):
    # from the network (through the dialog layer)
    INVITE_RECEIVED = "invite-received"
    RX_100 = "rx-100"
    RX_180 = "rx-180"  # 180, or any 1xx without a description
    RX_183 = "rx-183"  # a 1xx with a description: early media
    RX_2XX = "rx-2xx"
    RX_BUSY = "rx-busy"  # 486, 600
    RX_REJECT = "rx-reject"  # any other 3xx-6xx (408 for a transaction timeout, §8.1.3.1)
    RX_487 = "rx-487"  # Request Terminated: the answer to our CANCEL
    ACK = "ack"
    CANCEL = "cancel"
    BYE = "bye"
    HOLD = "hold"  # re-INVITE offering sendonly/inactive (RFC 3264 §8.4)
    RESUME = "resume"  # re-INVITE offering sendrecv again
    REINVITE = "reinvite"  # re-INVITE that changes neither (session refresh, codec change)
    REFER = "refer"  # the peer asks us to transfer it (RFC 3515)
    BYE_ANSWERED = "bye-answered"  # the response to our BYE
    # from call control
    DIAL = "dial"
    RING = "ring"  # send 180
    EARLY_MEDIA = "early-media"  # send 183 with a description
    ANSWER = "answer"  # send 200
    REJECT = "reject"  # send a 3xx-6xx
    LOCAL_HOLD = "local-hold"
    LOCAL_RESUME = "local-resume"
    TRANSFER = "transfer"  # we send REFER
    TRANSFER_DONE = "transfer-done"  # the transfer succeeded; this leg is finished
    TRANSFER_FAILED = "transfer-failed"
    HANGUP = "hangup"
    # timers
    TIMEOUT = "timeout"  # no answer in time (ring timer) / dialog timed out (no ACK, expiry)
    RTP_TIMEOUT = "rtp-timeout"


class LegAction(enum.Enum):
    SEND_100 = "send-100"
    SEND_180 = "send-180"
    SEND_183 = "send-183"
    SEND_200 = "send-200"
    SEND_FINAL = "send-final"  # 3xx-6xx with the code given to ``handle``
    SEND_487 = "send-487"
    SEND_INVITE = "send-invite"
    SEND_ACK = "send-ack"
    SEND_CANCEL = "send-cancel"
    SEND_BYE = "send-bye"
    ANSWER_BYE = "answer-bye"  # 200 to the peer's BYE
    ANSWER_REINVITE = "answer-reinvite"  # 200 with our answer to the peer's re-INVITE
    SEND_REINVITE_HOLD = "send-reinvite-hold"
    SEND_REINVITE_RESUME = "send-reinvite-resume"
    ACCEPT_REFER = "accept-refer"  # 202, then NOTIFY 100 Trying (RFC 3515 §2.4.4)
    NOTIFY_FAILURE = "notify-failure"  # NOTIFY with the failure sipfrag
    SEND_REFER = "send-refer"
    START_RING_TIMER = "start-ring-timer"
    STOP_RING_TIMER = "stop-ring-timer"
    START_MEDIA = "start-media"
    HOLD_MEDIA = "hold-media"
    RESUME_MEDIA = "resume-media"
    STOP_MEDIA = "stop-media"


class EndReason(enum.Enum):
    """Why a leg ended, as the call record says it."""

    CALLER_HUNG_UP = "caller-hung-up"
    AGENT_HUNG_UP = "agent-hung-up"
    NO_ANSWER = "no-answer"
    BUSY = "busy"
    CANCELLED = "cancelled"
    RTP_TIMEOUT = "rtp-timeout"
    REJECTED = "rejected"  # with the SIP status in ``end_code``
    TRANSFERRED = "transferred"
    SIGNALLING_TIMEOUT = "signalling-timeout"  # no ACK, session expired, BYE unanswered
    SYSTEM = "system"  # the appliance ended it (shutdown, policy)


class _End(enum.Enum):
    """How a row decides the end reason."""

    REMOTE = "remote"  # the far party hung up: caller or agent by ``Leg.party``
    LOCAL = "local"  # we hung up: the reason given to ``handle`` (default: the other party)
    PENDING = "pending"  # the reason noted when TERMINATING was entered


@dataclass(frozen=True)
class Row:
    """One transition."""

    actions: tuple[LegAction, ...]
    """What call control does, in order."""
    next_state: LegState
    """The state after it."""
    end: EndReason | _End | None = None
    """The end reason (ENDED), or the pending one (TERMINATING)."""


S, I, A, R, E = LegState, LegInput, LegAction, EndReason, _End  # noqa: E741

_UNANSWERED_IN = (S.PROCEEDING, S.RINGING, S.EARLY)
_UNANSWERED_OUT = (S.INVITING, S.PROCEEDING, S.RINGING, S.EARLY)

_INBOUND: dict[tuple[LegState, LegInput], Row] = {
    (S.IDLE, I.INVITE_RECEIVED): Row((A.SEND_100,), S.PROCEEDING),
    (S.PROCEEDING, I.RING): Row((A.SEND_180,), S.RINGING),
    (S.RINGING, I.RING): Row((A.SEND_180,), S.RINGING),
    (S.PROCEEDING, I.EARLY_MEDIA): Row((A.SEND_183, A.START_MEDIA), S.EARLY),
    (S.RINGING, I.EARLY_MEDIA): Row((A.SEND_183, A.START_MEDIA), S.EARLY),
    (S.PROCEEDING, I.ANSWER): Row((A.SEND_200, A.START_MEDIA), S.ANSWERED),
    (S.RINGING, I.ANSWER): Row((A.SEND_200, A.START_MEDIA), S.ANSWERED),
    (S.EARLY, I.ANSWER): Row((A.SEND_200,), S.ANSWERED),
    (S.ANSWERED, I.ACK): Row((), S.CONNECTED),
    (S.ANSWERED, I.BYE): Row((A.ANSWER_BYE, A.STOP_MEDIA), S.ENDED, E.REMOTE),
    # §15: the BYE waits for the ACK (the dialog layer holds it back).
    (S.ANSWERED, I.HANGUP): Row((A.SEND_BYE, A.STOP_MEDIA), S.TERMINATING, E.LOCAL),
    (S.ANSWERED, I.TIMEOUT): Row((A.STOP_MEDIA,), S.ENDED, R.SIGNALLING_TIMEOUT),
    (S.TERMINATING, I.ACK): Row((), S.TERMINATING),
}
_stop: tuple[LegAction, ...]
for _s in _UNANSWERED_IN:
    _stop = (A.STOP_MEDIA,) if _s is S.EARLY else ()
    _INBOUND[(_s, I.REJECT)] = Row((A.SEND_FINAL, *_stop), S.ENDED, R.REJECTED)
    _INBOUND[(_s, I.CANCEL)] = Row((A.SEND_487, *_stop), S.ENDED, R.CANCELLED)
    _INBOUND[(_s, I.HANGUP)] = Row((A.SEND_FINAL, *_stop), S.ENDED, E.LOCAL)
    _INBOUND[(_s, I.TIMEOUT)] = Row((A.SEND_FINAL, *_stop), S.ENDED, R.NO_ANSWER)
for _s in (S.RINGING, S.EARLY):
    # §15: the caller may BYE an early dialog; the INVITE is then answered 487.
    _INBOUND[(_s, I.BYE)] = Row((A.ANSWER_BYE, A.SEND_487, *((A.STOP_MEDIA,) if _s is S.EARLY
                                                              else ())), S.ENDED, E.REMOTE)

_OUTBOUND: dict[tuple[LegState, LegInput], Row] = {
    (S.IDLE, I.DIAL): Row((A.SEND_INVITE, A.START_RING_TIMER), S.INVITING),
    (S.INVITING, I.RX_100): Row((), S.PROCEEDING),
    (S.PROCEEDING, I.RX_100): Row((), S.PROCEEDING),
    (S.RINGING, I.RX_100): Row((), S.RINGING),
    (S.EARLY, I.RX_100): Row((), S.EARLY),
    (S.INVITING, I.RX_180): Row((), S.RINGING),
    (S.PROCEEDING, I.RX_180): Row((), S.RINGING),
    (S.RINGING, I.RX_180): Row((), S.RINGING),
    (S.EARLY, I.RX_180): Row((), S.EARLY),  # early media keeps flowing
    (S.INVITING, I.RX_183): Row((A.START_MEDIA,), S.EARLY),
    (S.PROCEEDING, I.RX_183): Row((A.START_MEDIA,), S.EARLY),
    (S.RINGING, I.RX_183): Row((A.START_MEDIA,), S.EARLY),
    (S.EARLY, I.RX_183): Row((), S.EARLY),
    # After our CANCEL: its 487 (or any final) ends the leg; a 2xx that crossed it is
    # ACKed and ended with BYE (§9.1, §15).
    (S.TERMINATING, I.RX_100): Row((), S.TERMINATING),
    (S.TERMINATING, I.RX_180): Row((), S.TERMINATING),
    (S.TERMINATING, I.RX_183): Row((), S.TERMINATING),
    (S.TERMINATING, I.RX_487): Row((A.STOP_MEDIA,), S.ENDED, E.PENDING),
    (S.TERMINATING, I.RX_BUSY): Row((A.STOP_MEDIA,), S.ENDED, E.PENDING),
    (S.TERMINATING, I.RX_REJECT): Row((A.STOP_MEDIA,), S.ENDED, E.PENDING),
    (S.TERMINATING, I.RX_2XX): Row((A.SEND_ACK, A.SEND_BYE), S.TERMINATING),
}
for _s in _UNANSWERED_OUT:
    _stop = (A.STOP_RING_TIMER, A.STOP_MEDIA) if _s is S.EARLY else (A.STOP_RING_TIMER,)
    _OUTBOUND[(_s, I.RX_2XX)] = Row(
        (A.STOP_RING_TIMER, A.SEND_ACK, A.START_MEDIA), S.CONNECTED)
    _OUTBOUND[(_s, I.RX_BUSY)] = Row(_stop, S.ENDED, R.BUSY)
    _OUTBOUND[(_s, I.RX_REJECT)] = Row(_stop, S.ENDED, R.REJECTED)
    _OUTBOUND[(_s, I.RX_487)] = Row(_stop, S.ENDED, R.REJECTED)  # not after our CANCEL
    _OUTBOUND[(_s, I.TIMEOUT)] = Row((A.SEND_CANCEL,), S.TERMINATING, R.NO_ANSWER)
    _OUTBOUND[(_s, I.HANGUP)] = Row((A.STOP_RING_TIMER, A.SEND_CANCEL), S.TERMINATING, E.LOCAL)

# Mid-call rows, the same for both directions.
_MID_CALL: dict[tuple[LegState, LegInput], Row] = {
    (S.CONNECTED, I.ACK): Row((), S.CONNECTED),  # the ACK of a re-INVITE's 2xx
    (S.CONNECTED, I.HOLD): Row((A.ANSWER_REINVITE, A.HOLD_MEDIA), S.HOLDING),
    (S.CONNECTED, I.LOCAL_HOLD): Row((A.SEND_REINVITE_HOLD, A.HOLD_MEDIA), S.HOLDING),
    (S.CONNECTED, I.RESUME): Row((A.ANSWER_REINVITE,), S.CONNECTED),
    (S.CONNECTED, I.REINVITE): Row((A.ANSWER_REINVITE,), S.CONNECTED),
    (S.CONNECTED, I.REFER): Row((A.ACCEPT_REFER,), S.TRANSFERRING),
    (S.CONNECTED, I.TRANSFER): Row((A.SEND_REFER,), S.TRANSFERRING),
    (S.CONNECTED, I.RTP_TIMEOUT): Row((A.SEND_BYE, A.STOP_MEDIA), S.TERMINATING, R.RTP_TIMEOUT),
    (S.HOLDING, I.ACK): Row((), S.HOLDING),
    (S.HOLDING, I.HOLD): Row((A.ANSWER_REINVITE,), S.HOLDING),
    (S.HOLDING, I.REINVITE): Row((A.ANSWER_REINVITE,), S.HOLDING),
    (S.HOLDING, I.RESUME): Row((A.ANSWER_REINVITE, A.RESUME_MEDIA), S.CONNECTED),
    (S.HOLDING, I.LOCAL_RESUME): Row((A.SEND_REINVITE_RESUME, A.RESUME_MEDIA), S.CONNECTED),
    # Attended transfer from a phone: it holds the call, then sends REFER.
    (S.HOLDING, I.REFER): Row((A.ACCEPT_REFER,), S.TRANSFERRING),
    (S.HOLDING, I.TRANSFER): Row((A.SEND_REFER,), S.TRANSFERRING),
    # No media is expected while held: an RTP timeout is not a hang-up.
    (S.HOLDING, I.RTP_TIMEOUT): Row((), S.HOLDING),
    (S.TRANSFERRING, I.ACK): Row((), S.TRANSFERRING),
    (S.TRANSFERRING, I.HOLD): Row((A.ANSWER_REINVITE, A.HOLD_MEDIA), S.TRANSFERRING),
    (S.TRANSFERRING, I.RESUME): Row((A.ANSWER_REINVITE, A.RESUME_MEDIA), S.TRANSFERRING),
    (S.TRANSFERRING, I.REINVITE): Row((A.ANSWER_REINVITE,), S.TRANSFERRING),
    (S.TRANSFERRING, I.RTP_TIMEOUT): Row((), S.TRANSFERRING),
    (S.TRANSFERRING, I.BYE): Row((A.ANSWER_BYE, A.STOP_MEDIA), S.ENDED, R.TRANSFERRED),
    (S.TRANSFERRING, I.TRANSFER_DONE): Row(
        (A.SEND_BYE, A.STOP_MEDIA), S.TERMINATING, R.TRANSFERRED),
    (S.TRANSFERRING, I.TRANSFER_FAILED): Row((A.NOTIFY_FAILURE,), S.CONNECTED),
    (S.TERMINATING, I.BYE): Row((A.ANSWER_BYE,), S.TERMINATING),  # BYEs crossed
    (S.TERMINATING, I.BYE_ANSWERED): Row((), S.ENDED, E.PENDING),
    (S.TERMINATING, I.TIMEOUT): Row((), S.ENDED, E.PENDING),
    (S.TERMINATING, I.RTP_TIMEOUT): Row((), S.TERMINATING),
}
for _s in (S.CONNECTED, S.HOLDING, S.TRANSFERRING):
    _MID_CALL.setdefault((_s, I.BYE), Row((A.ANSWER_BYE, A.STOP_MEDIA), S.ENDED, E.REMOTE))
    _MID_CALL[(_s, I.HANGUP)] = Row((A.SEND_BYE, A.STOP_MEDIA), S.TERMINATING, E.LOCAL)
    _MID_CALL[(_s, I.TIMEOUT)] = Row((A.STOP_MEDIA,), S.ENDED, R.SIGNALLING_TIMEOUT)

TRANSITIONS: dict[Direction, dict[tuple[LegState, LegInput], Row]] = {
    Direction.INBOUND: {**_MID_CALL, **_INBOUND},
    Direction.OUTBOUND: {**_MID_CALL, **_OUTBOUND},
}
"""The two tables. Public so tests and docs can walk them."""
del _s, _stop


@dataclass(frozen=True)
class LegRecord:
    """What a call record keeps of one leg."""

    leg_id: str
    """The leg's id."""
    direction: Direction
    """Inbound or outbound."""
    party: Party
    """Caller or agent."""
    started_at: float
    """When the leg was created."""
    answered_at: float | None
    """When it was answered (CONNECTED first reached via ANSWERED/2xx), or None."""
    ended_at: float | None
    """When it ended, or None while live."""
    end_reason: EndReason | None
    """Why it ended."""
    end_code: int | None
    """The SIP status involved (rejected/busy codes), if any."""


class Leg:
    """One call leg's state; ``handle`` applies one input and returns what to do."""

    def __init__(self, leg_id: str, direction: Direction, party: Party, now: float) -> None:
        self.leg_id = leg_id
        self.direction = direction
        self.party = party
        self.state = LegState.IDLE
        self.started_at = now
        self.answered_at: float | None = None
        self.ended_at: float | None = None
        self.end_reason: EndReason | None = None
        self.end_code: int | None = None
        self._pending: EndReason | None = None

    def can_take(self, inp: LegInput) -> bool:
        """True when ``inp`` is in the table for the current state."""
        return (self.state, inp) in TRANSITIONS[self.direction]

    def handle(self, inp: LegInput, now: float, *, code: int | None = None,
               reason: EndReason | None = None) -> tuple[LegAction, ...]:
        """Apply ``inp``; ``code`` is the SIP status (sent or received), ``reason`` the cause of
        a local hang-up. Raises ``LocalProtocolError`` for a pair not in the table."""
        row = TRANSITIONS[self.direction].get((self.state, inp))
        if row is None:
            raise LocalProtocolError(
                f"{self.direction.value} leg {self.leg_id} in state {self.state.value} "
                f"cannot take {inp.value}")
        end = self._resolve(row.end, reason)
        if row.next_state is LegState.TERMINATING and end is not None:
            self._pending = end
        if code is not None and (row.next_state is LegState.ENDED
                                 or inp in (LegInput.REJECT, LegInput.RX_REJECT)):
            self.end_code = code
        if row.next_state in (LegState.CONNECTED, LegState.ANSWERED) and self.answered_at is None:
            self.answered_at = now
        self.state = row.next_state
        if row.next_state is LegState.ENDED:
            self.ended_at = now
            self.end_reason = end if end is not None else self._pending
        return row.actions

    def _resolve(self, end: EndReason | _End | None,
                 reason: EndReason | None) -> EndReason | None:
        if end is None or isinstance(end, EndReason):
            return end
        if end is _End.PENDING:
            return self._pending
        if end is _End.REMOTE:
            return (EndReason.CALLER_HUNG_UP if self.party is Party.CALLER
                    else EndReason.AGENT_HUNG_UP)
        # _End.LOCAL: we hang up this leg because of the other party (or a given reason).
        if reason is not None:
            return reason
        return EndReason.AGENT_HUNG_UP if self.party is Party.CALLER else EndReason.CALLER_HUNG_UP

    def record(self) -> LegRecord:
        """A snapshot for the call record."""
        return LegRecord(self.leg_id, self.direction, self.party, self.started_at,
                         self.answered_at, self.ended_at, self.end_reason, self.end_code)


def response_input(status: int, body: bytes = b"") -> LegInput:
    """The leg input for a response to our INVITE (408 stands for a transaction timeout)."""
    if status == 100:
        return LegInput.RX_100
    if status < 200:
        return LegInput.RX_183 if body else LegInput.RX_180
    if status < 300:
        return LegInput.RX_2XX
    if status == 487:
        return LegInput.RX_487
    if status in (486, 600):
        return LegInput.RX_BUSY
    return LegInput.RX_REJECT


def is_hold_offer(body: bytes) -> bool:
    """RFC 3264 §8.4: an offer puts the call on hold when no audio stream both sends and
    receives (sendonly / inactive, or the RFC 2543 ``c=0.0.0.0``). No description: not hold."""
    if not body:
        return False
    from media_core import sdp  # the SDP parser is only needed for re-INVITEs

    description = sdp.parse(body)
    audio = [m for m in description.media if m.media == "audio" and m.port != 0]
    if not audio:
        return False
    for media in audio:
        connection = description.connection_for(media)
        held = (connection is not None and connection.is_hold) or not (
            description.direction_for(media).receives)
        if not held:
            return False
    return True
