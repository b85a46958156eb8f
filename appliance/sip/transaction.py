"""RFC 3261 §17 transactions, sans-IO.

Rules of this file:

* Four transaction kinds (client/server x INVITE/non-INVITE), each one a table
  ``(state, input) -> (actions, next_state)``. A pair missing from a table is API misuse
  (``LocalProtocolError``); every input that can come from the network is in every table, so
  a peer can never make this module raise.
* Time is an argument. Nothing here reads a clock or touches a socket: callers feed messages
  and ``now``, ask ``next_timer()``, call ``handle_timer(now)`` when it is due, and carry out
  the events that come back (``Transmit`` bytes to a ``Source``, hand requests/responses to the
  transaction user, report timeouts and terminations).
* RFC 6026 is applied: an INVITE answered with 2xx goes to Accepted (timers L and M) instead of
  straight to Terminated, so retransmitted INVITEs and 2xx are absorbed or passed up correctly.
* Timers that RFC 3261 sets to zero on reliable transports (D, I, J, K) fire at once, inside the
  call that armed them; retransmission timers (A, E, G) are never armed on reliable transports.
* A non-INVITE server transaction that has sent its final response over UDP only waits for
  timer J (§17.2.2): the layer keeps its key, response bytes and J deadline, not the machine.
  Its inputs are still those of Figure 8's Completed row (retransmission -> the response again,
  transport error, timer J).
"""

from __future__ import annotations

import bisect
import enum
import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from appliance.sip.source import Source

# One class per kind of error across the stack.
from media_core.sip import LocalProtocolError, parse_message

MAGIC_COOKIE = "z9hG4bK"
"""RFC 3261 §8.1.1.7: branches that start with this were built by RFC 3261 clients."""

RELIABLE_TRANSPORTS = frozenset({"TCP", "TLS", "SCTP", "TLS-SCTP", "WS", "WSS"})

Message = Any
"""A SIP message as the codec gives it (``media_core.sip.SipMessage`` or look-alike)."""


class TransactionTableFull(Exception):
    """A new server transaction was refused because the table holds ``max_transactions``."""


@dataclass(frozen=True)
class TimerConfig:
    """RFC 3261 §17 / Table 4 timer base values, in seconds."""

    t1: float = 0.5
    """RTT estimate; first retransmission interval."""
    t2: float = 4.0
    """Cap of the non-INVITE request and INVITE response retransmission interval."""
    t4: float = 5.0
    """Longest time a message stays in the network (timers I and K)."""
    trying: float = 0.2
    """§17.2.1: an INVITE server sends 100 Trying itself if the TU is silent this long."""

    def __post_init__(self) -> None:
        if not (0 < self.t1 <= self.t2) or self.t4 <= 0 or self.trying < 0:
            raise LocalProtocolError(
                f"bad timer config t1={self.t1} t2={self.t2} t4={self.t4} trying={self.trying}"
            )


class _Symbol(enum.Enum):
    """An enum whose members hash by identity: the tables are looked up for every message, and
    ``Enum.__hash__`` (a Python function) would cost more than the lookup itself."""

    __hash__ = object.__hash__


class Kind(_Symbol):
    """The four transaction machines of RFC 3261 §17.1.1, §17.1.2, §17.2.1, §17.2.2."""

    INVITE_CLIENT = "invite-client"
    NON_INVITE_CLIENT = "non-invite-client"
    INVITE_SERVER = "invite-server"
    NON_INVITE_SERVER = "non-invite-server"


class State(_Symbol):
    """Transaction states of RFC 3261 §17 (and Accepted from RFC 6026)."""

    CALLING = "calling"
    TRYING = "trying"
    PROCEEDING = "proceeding"
    COMPLETED = "completed"
    CONFIRMED = "confirmed"
    ACCEPTED = "accepted"  # RFC 6026 §7.1/§7.2
    TERMINATED = "terminated"


class Timer(_Symbol):
    """The transaction timers of RFC 3261 Table 4, RFC 6026 and the §17.2.1 100 Trying."""

    A = "A"
    B = "B"
    D = "D"
    E = "E"
    F = "F"
    G = "G"
    H = "H"
    I = "I"  # noqa: E741 - the RFC's name
    J = "J"
    K = "K"
    L = "L"  # RFC 6026
    M = "M"  # RFC 6026
    TRYING = "100"  # §17.2.1 automatic 100 Trying


class Input(_Symbol):
    """What can happen to a transaction: network input, transaction-user input, timers."""

    REQUEST = "request"  # server: retransmission of the request
    ACK = "ack"  # server INVITE: ACK matched to the transaction
    RX_1XX = "rx-1xx"  # client: responses from the network
    RX_2XX = "rx-2xx"
    RX_FINAL = "rx-300-699"
    TU_1XX = "tu-1xx"  # server: responses from the transaction user
    TU_2XX = "tu-2xx"
    TU_FINAL = "tu-300-699"
    TRANSPORT_ERROR = "transport-error"
    TIMER_A = "timer-A"
    TIMER_B = "timer-B"
    TIMER_D = "timer-D"
    TIMER_E = "timer-E"
    TIMER_F = "timer-F"
    TIMER_G = "timer-G"
    TIMER_H = "timer-H"
    TIMER_I = "timer-I"
    TIMER_J = "timer-J"
    TIMER_K = "timer-K"
    TIMER_L = "timer-L"
    TIMER_M = "timer-M"
    TIMER_TRYING = "timer-100"


class Action(_Symbol):
    """What a transition does, in order, before it enters its next state."""

    SEND_REQUEST = "send-request"  # (re)transmit the request
    SEND_RESPONSE = "send-response"  # store the TU's response and transmit it
    RESEND_RESPONSE = "resend-response"  # retransmit the last response, if any
    SEND_TRYING = "send-trying"  # transmit 100 Trying unless a provisional went out
    SEND_ACK = "send-ack"  # client INVITE: (re)transmit ACK for the non-2xx final
    TO_TU = "to-tu"  # pass the received response / ACK up
    TIMEOUT = "timeout"  # report the timer that expired
    TRANSPORT_ERROR = "transport-error"  # report the transport failure
    START_A = "start-A"
    BACKOFF_A = "backoff-A"
    START_B = "start-B"
    START_D = "start-D"
    START_E = "start-E"
    BACKOFF_E = "backoff-E"
    E_AT_T2 = "E-at-T2"
    START_F = "start-F"
    START_G = "start-G"
    BACKOFF_G = "backoff-G"
    START_H = "start-H"
    START_I = "start-I"
    START_J = "start-J"
    START_K = "start-K"
    START_L = "start-L"
    START_M = "start-M"
    START_TRYING = "start-100"
    STOP_TRYING = "stop-100"
    FORGET_REQUEST = "forget-request"  # only the response bytes are needed from here on


S, In, A = State, Input, Action
Row = tuple[tuple[Action, ...], State]

# RFC 3261 Figure 5 + RFC 6026 Figure 5.
_INVITE_CLIENT: dict[tuple[State, Input], Row] = {
    (S.CALLING, In.TIMER_A): ((A.SEND_REQUEST, A.BACKOFF_A), S.CALLING),
    (S.CALLING, In.TIMER_B): ((A.TIMEOUT,), S.TERMINATED),
    (S.CALLING, In.RX_1XX): ((A.TO_TU,), S.PROCEEDING),
    (S.CALLING, In.RX_2XX): ((A.TO_TU, A.START_M), S.ACCEPTED),
    (S.CALLING, In.RX_FINAL): ((A.TO_TU, A.SEND_ACK, A.START_D), S.COMPLETED),
    (S.CALLING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    (S.PROCEEDING, In.RX_1XX): ((A.TO_TU,), S.PROCEEDING),
    (S.PROCEEDING, In.RX_2XX): ((A.TO_TU, A.START_M), S.ACCEPTED),
    (S.PROCEEDING, In.RX_FINAL): ((A.TO_TU, A.SEND_ACK, A.START_D), S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    # §17.1.1.2: retransmitted finals are answered with the same ACK and not passed up.
    (S.COMPLETED, In.RX_FINAL): ((A.SEND_ACK,), S.COMPLETED),
    (S.COMPLETED, In.RX_1XX): ((), S.COMPLETED),
    (S.COMPLETED, In.RX_2XX): ((), S.COMPLETED),
    (S.COMPLETED, In.TIMER_D): ((), S.TERMINATED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    # RFC 6026 §7.2: every 2xx (retransmission or another fork) goes to the TU.
    (S.ACCEPTED, In.RX_2XX): ((A.TO_TU,), S.ACCEPTED),
    (S.ACCEPTED, In.RX_1XX): ((), S.ACCEPTED),
    (S.ACCEPTED, In.RX_FINAL): ((), S.ACCEPTED),
    (S.ACCEPTED, In.TRANSPORT_ERROR): ((), S.ACCEPTED),
    (S.ACCEPTED, In.TIMER_M): ((), S.TERMINATED),
}

# RFC 3261 Figure 6.
_NON_INVITE_CLIENT: dict[tuple[State, Input], Row] = {
    (S.TRYING, In.TIMER_E): ((A.SEND_REQUEST, A.BACKOFF_E), S.TRYING),
    (S.TRYING, In.TIMER_F): ((A.TIMEOUT,), S.TERMINATED),
    (S.TRYING, In.RX_1XX): ((A.TO_TU,), S.PROCEEDING),
    (S.TRYING, In.RX_2XX): ((A.TO_TU, A.START_K), S.COMPLETED),
    (S.TRYING, In.RX_FINAL): ((A.TO_TU, A.START_K), S.COMPLETED),
    (S.TRYING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    # §17.1.2.2: in Proceeding timer E is reset to T2 on every firing.
    (S.PROCEEDING, In.TIMER_E): ((A.SEND_REQUEST, A.E_AT_T2), S.PROCEEDING),
    (S.PROCEEDING, In.TIMER_F): ((A.TIMEOUT,), S.TERMINATED),
    (S.PROCEEDING, In.RX_1XX): ((A.TO_TU,), S.PROCEEDING),
    (S.PROCEEDING, In.RX_2XX): ((A.TO_TU, A.START_K), S.COMPLETED),
    (S.PROCEEDING, In.RX_FINAL): ((A.TO_TU, A.START_K), S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    (S.COMPLETED, In.RX_1XX): ((), S.COMPLETED),
    (S.COMPLETED, In.RX_2XX): ((), S.COMPLETED),
    (S.COMPLETED, In.RX_FINAL): ((), S.COMPLETED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ((), S.COMPLETED),
    (S.COMPLETED, In.TIMER_K): ((), S.TERMINATED),
}

# RFC 3261 Figure 7 + RFC 6026 Figure 7.
_INVITE_SERVER: dict[tuple[State, Input], Row] = {
    (S.PROCEEDING, In.REQUEST): ((A.RESEND_RESPONSE,), S.PROCEEDING),
    (S.PROCEEDING, In.ACK): ((), S.PROCEEDING),
    (S.PROCEEDING, In.TIMER_TRYING): ((A.SEND_TRYING,), S.PROCEEDING),
    (S.PROCEEDING, In.TU_1XX): ((A.STOP_TRYING, A.SEND_RESPONSE), S.PROCEEDING),
    (S.PROCEEDING, In.TU_2XX): ((A.SEND_RESPONSE, A.START_L), S.ACCEPTED),
    (S.PROCEEDING, In.TU_FINAL): ((A.SEND_RESPONSE, A.START_G, A.START_H), S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    (S.COMPLETED, In.REQUEST): ((A.RESEND_RESPONSE,), S.COMPLETED),
    (S.COMPLETED, In.TIMER_G): ((A.RESEND_RESPONSE, A.BACKOFF_G), S.COMPLETED),
    (S.COMPLETED, In.TIMER_H): ((A.TIMEOUT,), S.TERMINATED),
    (S.COMPLETED, In.ACK): ((A.START_I,), S.CONFIRMED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    # §17.2.1: Confirmed only absorbs ACK retransmissions until timer I.
    (S.CONFIRMED, In.REQUEST): ((), S.CONFIRMED),
    (S.CONFIRMED, In.ACK): ((), S.CONFIRMED),
    (S.CONFIRMED, In.TRANSPORT_ERROR): ((), S.CONFIRMED),
    (S.CONFIRMED, In.TIMER_I): ((), S.TERMINATED),
    # RFC 6026 §7.1: the TU retransmits its 2xx through here; INVITE copies are absorbed.
    (S.ACCEPTED, In.REQUEST): ((), S.ACCEPTED),
    (S.ACCEPTED, In.ACK): ((A.TO_TU,), S.ACCEPTED),
    (S.ACCEPTED, In.TU_2XX): ((A.SEND_RESPONSE,), S.ACCEPTED),
    (S.ACCEPTED, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.ACCEPTED),
    (S.ACCEPTED, In.TIMER_L): ((), S.TERMINATED),
}

# RFC 3261 Figure 8.
_NON_INVITE_SERVER: dict[tuple[State, Input], Row] = {
    (S.TRYING, In.REQUEST): ((), S.TRYING),
    (S.TRYING, In.TU_1XX): ((A.SEND_RESPONSE,), S.PROCEEDING),
    (S.TRYING, In.TU_2XX): ((A.SEND_RESPONSE, A.START_J, A.FORGET_REQUEST), S.COMPLETED),
    (S.TRYING, In.TU_FINAL): ((A.SEND_RESPONSE, A.START_J, A.FORGET_REQUEST), S.COMPLETED),
    (S.TRYING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    (S.PROCEEDING, In.REQUEST): ((A.RESEND_RESPONSE,), S.PROCEEDING),
    (S.PROCEEDING, In.TU_1XX): ((A.SEND_RESPONSE,), S.PROCEEDING),
    (S.PROCEEDING, In.TU_2XX): ((A.SEND_RESPONSE, A.START_J, A.FORGET_REQUEST), S.COMPLETED),
    (S.PROCEEDING, In.TU_FINAL): ((A.SEND_RESPONSE, A.START_J, A.FORGET_REQUEST),
                                   S.COMPLETED),
    (S.PROCEEDING, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    (S.COMPLETED, In.REQUEST): ((A.RESEND_RESPONSE,), S.COMPLETED),
    (S.COMPLETED, In.TRANSPORT_ERROR): ((A.TRANSPORT_ERROR,), S.TERMINATED),
    (S.COMPLETED, In.TIMER_J): ((), S.TERMINATED),
}

TRANSITIONS: dict[Kind, dict[tuple[State, Input], Row]] = {
    Kind.INVITE_CLIENT: _INVITE_CLIENT,
    Kind.NON_INVITE_CLIENT: _NON_INVITE_CLIENT,
    Kind.INVITE_SERVER: _INVITE_SERVER,
    Kind.NON_INVITE_SERVER: _NON_INVITE_SERVER,
}
"""The four state machines. Public so tests and docs can walk them."""

INITIAL: dict[Kind, tuple[tuple[Action, ...], State]] = {
    Kind.INVITE_CLIENT: ((A.SEND_REQUEST, A.START_A, A.START_B), S.CALLING),
    Kind.NON_INVITE_CLIENT: ((A.SEND_REQUEST, A.START_E, A.START_F), S.TRYING),
    Kind.INVITE_SERVER: ((A.START_TRYING,), S.PROCEEDING),
    Kind.NON_INVITE_SERVER: ((), S.TRYING),
}

# Timers that survive in a state; entering a state cancels every other timer.
_LIVE: dict[Kind, dict[State, frozenset[Timer]]] = {
    Kind.INVITE_CLIENT: {
        S.CALLING: frozenset({Timer.A, Timer.B}),
        S.COMPLETED: frozenset({Timer.D}),
        S.ACCEPTED: frozenset({Timer.M}),
    },
    Kind.NON_INVITE_CLIENT: {
        S.TRYING: frozenset({Timer.E, Timer.F}),
        S.PROCEEDING: frozenset({Timer.E, Timer.F}),
        S.COMPLETED: frozenset({Timer.K}),
    },
    Kind.INVITE_SERVER: {
        S.PROCEEDING: frozenset({Timer.TRYING}),
        S.COMPLETED: frozenset({Timer.G, Timer.H}),
        S.CONFIRMED: frozenset({Timer.I}),
        S.ACCEPTED: frozenset({Timer.L}),
    },
    Kind.NON_INVITE_SERVER: {S.COMPLETED: frozenset({Timer.J})},
}

# Action -> (timer, its duration for (config, reliable transport)), RFC 3261 Table 4 and
# RFC 6026. None leaves the timer off: retransmission timers (A, E, G) run on unreliable
# transports only, and D, I, J, K are zero on reliable ones (§17.1.1.2, §17.1.2.2, §17.2.1,
# §17.2.2).
Duration = Callable[[TimerConfig, bool], float | None]
_STARTS: dict[Action, tuple[Timer, Duration]] = {
    A.START_A: (Timer.A, lambda c, reliable: None if reliable else c.t1),
    A.START_B: (Timer.B, lambda c, reliable: 64 * c.t1),
    A.START_D: (Timer.D, lambda c, reliable: 0.0 if reliable else max(32.0, 64 * c.t1)),
    A.START_E: (Timer.E, lambda c, reliable: None if reliable else c.t1),
    A.E_AT_T2: (Timer.E, lambda c, reliable: c.t2),
    A.START_F: (Timer.F, lambda c, reliable: 64 * c.t1),
    A.START_G: (Timer.G, lambda c, reliable: None if reliable else c.t1),
    A.START_H: (Timer.H, lambda c, reliable: 64 * c.t1),
    A.START_I: (Timer.I, lambda c, reliable: 0.0 if reliable else c.t4),
    A.START_J: (Timer.J, lambda c, reliable: 0.0 if reliable else 64 * c.t1),
    A.START_K: (Timer.K, lambda c, reliable: 0.0 if reliable else c.t4),
    A.START_L: (Timer.L, lambda c, reliable: 64 * c.t1),
    A.START_M: (Timer.M, lambda c, reliable: 64 * c.t1),
    A.START_TRYING: (Timer.TRYING, lambda c, reliable: c.trying),
}
# Action -> (timer, capped at T2): A doubles without bound, E and G up to T2.
_BACKOFFS: dict[Action, tuple[Timer, bool]] = {
    A.BACKOFF_A: (Timer.A, False),
    A.BACKOFF_E: (Timer.E, True),
    A.BACKOFF_G: (Timer.G, True),
}

_TIMER_INPUT = {t: Input["TIMER_" + t.name] for t in Timer}
# When two timers fall due at the same instant, the one that ends the transaction wins.
_TIMER_RANK = {t: (0 if t in {Timer.B, Timer.F, Timer.H} else 1) for t in Timer}


# --------------------------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class TransactionKey:
    """Identifies one transaction inside a ``TransactionLayer`` (RFC 3261 §17.1.3, §17.2.3)."""

    server: bool
    """True for server transactions (requests we received)."""
    method: str
    """Request method; ACK is filed under INVITE, as §17.2.3 matches it to the INVITE."""
    branch: str
    """Top Via branch; empty for RFC 2543 peers (matched by ``legacy``)."""
    sent_by: str = ""
    """Top Via sent-by ``host:port`` (server side, RFC 3261 branches only)."""
    legacy: tuple[str, ...] = ()
    """RFC 2543 fallback fields: Request-URI, From tag, Call-ID, CSeq number, To tag, Via."""
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Keys are hashed several times per message (live table, completed table, heap):
        # hash the fields once.
        object.__setattr__(
            self, "_hash", hash((self.server, self.method, self.branch, self.sent_by, self.legacy))
        )

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True)
class Transmit:
    """Send bytes to a peer."""

    key: TransactionKey | None
    """Transaction that sends it (None for stateless sends)."""
    message: Message
    """The message being sent."""
    data: bytes
    """Its serialized bytes."""
    destination: Source
    """Where to send it (for responses: where the request came from, §18.2.2)."""
    retransmission: bool = False
    """True when this repeats an earlier transmission."""


@dataclass(frozen=True)
class RequestReceived:
    """A new request for the transaction user (or an ACK that matched no transaction)."""

    key: TransactionKey | None
    """The server transaction created for it; None for an ACK outside any transaction."""
    request: Message
    """The request."""
    source: Source
    """Where it came from."""


@dataclass(frozen=True)
class AckReceived:
    """An ACK for a 2xx, matched to an INVITE server transaction in Accepted (RFC 6026)."""

    key: TransactionKey
    """The INVITE server transaction."""
    request: Message
    """The ACK."""


@dataclass(frozen=True)
class ResponseReceived:
    """A response for the transaction user of a client transaction."""

    key: TransactionKey
    """The client transaction."""
    response: Message
    """The response."""


@dataclass(frozen=True)
class StrayResponse:
    """A response that matched no client transaction (§18.1.2: discarded)."""

    response: Message
    """The response."""
    source: Source
    """Where it came from."""


@dataclass(frozen=True)
class TransactionTimeout:
    """The transaction gave up: timer B/F (no answer) or H (no ACK)."""

    key: TransactionKey
    """The transaction."""
    timer: Timer
    """The timer that fired."""


@dataclass(frozen=True)
class TransportFailed:
    """The transport reported a failure while this transaction was sending."""

    key: TransactionKey
    """The transaction."""


@dataclass(frozen=True)
class TransactionTerminated:
    """The transaction reached Terminated and left the layer."""

    key: TransactionKey
    """The transaction."""


Event = (
    Transmit
    | RequestReceived
    | AckReceived
    | ResponseReceived
    | StrayResponse
    | TransactionTimeout
    | TransportFailed
    | TransactionTerminated
)


# --------------------------------------------------------------------------------------------
# One transaction


def _classify(status: int, *, server: bool) -> Input:
    if not 100 <= status <= 699:
        raise LocalProtocolError(f"status {status} is not a SIP response code")
    if status < 200:
        return Input.TU_1XX if server else Input.RX_1XX
    if status < 300:
        return Input.TU_2XX if server else Input.RX_2XX
    return Input.TU_FINAL if server else Input.RX_FINAL


def default_ack(request: Message, response: Message) -> Message:
    """Build the ACK for a non-2xx final response, per RFC 3261 §17.1.1.3."""
    from media_core.sip import build_request

    headers = [
        ("Via", str(request.top_via)),
        ("Max-Forwards", "70"),
        ("From", request.get("From")),
        ("To", response.get("To")),
        ("Call-ID", request.call_id),
        ("CSeq", f"{request.cseq[0]} ACK"),
    ]
    headers += [("Route", route) for route in request.get_all("Route")]
    return build_request("ACK", request.uri, headers=headers)


def default_trying(request: Message) -> Message:
    """Build the 100 Trying an INVITE server transaction sends on its own (§17.2.1)."""
    from media_core.sip import build_response

    return build_response(request, 100)


@dataclass(eq=False, slots=True)
class Transaction:
    """One RFC 3261 §17 transaction: a table-driven state machine with its timers."""

    kind: Kind
    key: TransactionKey
    request: Message
    """The request; None once a non-INVITE server transaction has its final response."""
    peer: Source
    """Where requests (client) or responses (server) are sent."""
    config: TimerConfig = field(default_factory=TimerConfig)
    build_ack: Callable[[Message, Message], Message] = default_ack
    build_trying: Callable[[Message], Message] = default_trying
    state: State = State.TERMINATED
    """Current state; Terminated until ``start`` enters the initial one."""
    last_response: Message | None = None
    ack: Message | None = None
    _timers: dict[Timer, float] = field(default_factory=dict)
    _interval: dict[Timer, float] = field(default_factory=dict)
    _request_bytes: bytes = b""
    _response_bytes: bytes = b""
    _ack_bytes: bytes = b""
    _sent_provisional: bool = False
    _started: bool = False
    ack_fields: tuple[str, ...] | None = None
    """RFC 2543 peers: the fields their ACK will carry (our To tag), for matching."""
    queued_at: float | None = None
    """Deadline under which the owning layer last queued this transaction."""

    @property
    def reliable(self) -> bool:
        """True on transports that retransmit for us (§17: no A/E/G, zero D/I/J/K)."""
        return self.peer.transport.upper() in RELIABLE_TRANSPORTS

    @property
    def is_server(self) -> bool:
        return self.kind in (Kind.INVITE_SERVER, Kind.NON_INVITE_SERVER)

    def start(self, now: float) -> list[Event]:
        """Enter the initial state: a client sends its request, an INVITE server arms 100."""
        if self._started:
            raise LocalProtocolError("transaction already started")
        self._started = True
        self._request_bytes = self.request.to_bytes() if not self.is_server else b""
        actions, state = INITIAL[self.kind]
        events: list[Event] = []
        for action in actions:
            self._perform(action, now, None, events)
        self.state = state
        self._run_due(now, events)
        return events

    def next_timer(self) -> float | None:
        """The instant at which ``handle_timer`` must next run, or None."""
        return min(self._timers.values()) if self._timers else None

    def handle_timer(self, now: float) -> list[Event]:
        """Fire every timer due at ``now``, earliest first."""
        events: list[Event] = []
        self._run_due(now, events)
        return events

    def feed(self, inp: Input, now: float, message: Message | None = None) -> list[Event]:
        """Apply one input; raises ``LocalProtocolError`` when the table has no such pair."""
        events: list[Event] = []
        self._step(inp, now, message, events)
        self._run_due(now, events)
        return events

    def abandon(self) -> None:
        """Leave the machine without another input (the layer reports the termination)."""
        self._timers.clear()
        self.state = State.TERMINATED

    def receive_response(self, response: Message, now: float) -> list[Event]:
        """A response from the network (client transactions)."""
        if self.is_server:
            raise LocalProtocolError("server transactions do not receive responses")
        return self.feed(_classify(response.status, server=False), now, response)

    def send_response(self, response: Message, now: float) -> list[Event]:
        """A response from the transaction user (server transactions)."""
        if not self.is_server:
            raise LocalProtocolError("client transactions do not send responses")
        return self.feed(_classify(response.status, server=True), now, response)

    # -- internals ---------------------------------------------------------------------------

    def _run_due(self, now: float, events: list[Event]) -> None:
        while self.state is not State.TERMINATED and self._timers:
            if min(self._timers.values()) > now:
                return  # the common case, decided without building the sort keys below
            timer, deadline = min(
                self._timers.items(), key=lambda item: (item[1], _TIMER_RANK[item[0]])
            )
            if deadline > now:
                return
            del self._timers[timer]
            # Reschedule from the deadline, not from ``now``: the schedule stays exact even
            # when the adapter wakes late.
            self._step(_TIMER_INPUT[timer], deadline, None, events)

    def _step(self, inp: Input, now: float, message: Message | None, events: list[Event]) -> None:
        row = TRANSITIONS[self.kind].get((self.state, inp))
        if row is None:
            raise LocalProtocolError(
                f"{self.kind.value} transaction in state {self.state.value} cannot take {inp.value}"
            )
        actions, next_state = row
        for action in actions:
            self._perform(action, now, message, events, inp)
        self.state = next_state
        live = _LIVE[self.kind].get(next_state, frozenset())
        for timer in [t for t in self._timers if t not in live]:
            del self._timers[timer]
        if next_state is State.TERMINATED:
            events.append(TransactionTerminated(self.key))

    def _arm(self, timer: Timer, now: float, delay: float) -> None:
        self._timers[timer] = now + delay
        self._interval[timer] = delay

    def _perform(
        self,
        action: Action,
        now: float,
        message: Message | None,
        events: list[Event],
        inp: Input | None = None,
    ) -> None:
        cfg = self.config
        if action is A.SEND_REQUEST:
            events.append(
                Transmit(self.key, self.request, self._request_bytes, self.peer, inp is not None)
            )
        elif action is A.SEND_RESPONSE:
            assert message is not None
            self.last_response = message
            self._response_bytes = message.to_bytes()
            if message.status < 200:
                self._sent_provisional = True
            events.append(Transmit(self.key, message, self._response_bytes, self.peer))
        elif action is A.RESEND_RESPONSE:
            if self.last_response is not None:
                events.append(
                    Transmit(self.key, self.last_response, self._response_bytes, self.peer, True)
                )
        elif action is A.SEND_TRYING:
            if not self._sent_provisional:
                self._perform(A.SEND_RESPONSE, now, self.build_trying(self.request), events)
        elif action is A.SEND_ACK:
            retransmission = self.ack is not None
            if self.ack is None:
                assert message is not None
                self.ack = self.build_ack(self.request, message)
                self._ack_bytes = self.ack.to_bytes()
            events.append(
                Transmit(self.key, self.ack, self._ack_bytes, self.peer, retransmission)
            )
        elif action is A.TO_TU:
            if self.is_server:
                events.append(AckReceived(self.key, message))
            else:
                events.append(ResponseReceived(self.key, message))
        elif action is A.TIMEOUT:
            assert inp is not None
            events.append(TransactionTimeout(self.key, Timer[inp.name.removeprefix("TIMER_")]))
        elif action is A.TRANSPORT_ERROR:
            events.append(TransportFailed(self.key))
        elif action in _STARTS:
            timer, duration = _STARTS[action]
            delay = duration(cfg, self.reliable)
            if delay is not None:
                self._arm(timer, now, delay)
        elif action in _BACKOFFS:
            timer, capped = _BACKOFFS[action]
            delay = 2 * self._interval[timer]
            self._arm(timer, now, min(delay, cfg.t2) if capped else delay)
        elif action is A.STOP_TRYING:
            self._timers.pop(Timer.TRYING, None)
        elif action is A.FORGET_REQUEST:
            # A registrar holds thousands of these for 64*T1 each: keep them small.
            self.request = None
        else:  # pragma: no cover - every Action is handled above
            raise LocalProtocolError(f"unhandled action {action}")


# --------------------------------------------------------------------------------------------
# The layer

DEFAULT_MAX_TRANSACTIONS = 200_000
"""Room for 5,000 non-INVITE requests/s held for timer J (64*T1 = 32 s) plus live ones."""


def _sent_by(message: Message) -> str:
    via = message.top_via
    return f"{via.host.lower()}:{via.port or ''}"


def _tag(name_addr: Any) -> str:
    return (name_addr.tag or "") if name_addr is not None else ""


def _legacy_fields(request: Message, to_tag: str) -> tuple[str, ...]:
    # RFC 3261 §17.2.3, RFC 2543 rules: Request-URI, To tag, From tag, Call-ID, CSeq number and
    # the top Via all equal (ACK's To tag is compared with the response's, see ``_acks``).
    return (
        request.uri or "",
        _tag(request.from_),
        request.call_id,
        str(request.cseq[0]),
        to_tag,
        str(request.top_via),
    )


def server_key(request: Message, method: str | None = None) -> TransactionKey:
    """The §17.2.3 key of a received request (ACK and CANCEL are filed as ``method``)."""
    method = method or ("INVITE" if request.method == "ACK" else request.method)
    branch = request.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        return TransactionKey(True, method, branch, _sent_by(request))
    return TransactionKey(True, method, "", "", _legacy_fields(request, _tag(request.to)))


class TransactionLayer:
    """All transactions of one SIP endpoint, matched per RFC 3261 §17.1.3 and §17.2.3.

    Feed it what the transports receive and what the transaction user sends; carry out the
    events it returns; call ``handle_timer(now)`` at ``next_timer()``.
    """

    def __init__(
        self,
        config: TimerConfig | None = None,
        *,
        max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
        build_ack: Callable[[Message, Message], Message] = default_ack,
        build_trying: Callable[[Message], Message] = default_trying,
    ) -> None:
        self.config = config or TimerConfig()
        self.max_transactions = max_transactions
        """Transactions held at most, live and completed alike; a new one beyond it is
        refused with ``TransactionTableFull``."""
        self._build_ack = build_ack
        self._build_trying = build_trying
        self._transactions: dict[TransactionKey, Transaction] = {}
        # RFC 2543 ACKs carry the To tag of our response, not of the INVITE.
        self._acks: dict[tuple[str, ...], TransactionKey] = {}
        self._heap: list[tuple[float, int, TransactionKey]] = []
        self._seq = 0
        # Non-INVITE server transactions in Completed over UDP (§17.2.2) only absorb
        # retransmissions until timer J: they are kept as key -> (J deadline, final response
        # bytes, destination), swept in deadline order, instead of as whole machines.
        self._completed: dict[TransactionKey, tuple[float, bytes, Source]] = {}
        self._expiries: deque[tuple[float, int, TransactionKey]] = deque()

    def __len__(self) -> int:
        return len(self._transactions) + len(self._completed)

    def __contains__(self, key: object) -> bool:
        return key in self._transactions or key in self._completed

    @property
    def completed(self) -> int:
        """Non-INVITE server transactions held compactly in Completed (part of ``len``)."""
        return len(self._completed)

    def get(self, key: TransactionKey) -> Transaction | None:
        """The live transaction with this key, if any.

        None also for a non-INVITE server transaction over UDP that has sent its final
        response: it only keeps those bytes until timer J (``key in layer`` is still True).
        """
        return self._transactions.get(key)

    # -- network side ------------------------------------------------------------------------

    def receive_request(
        self, request: Message, source: Source, now: float, *, reply_to: Source | None = None
    ) -> list[Event]:
        """A request from the network: absorbed, matched, or opened as a server transaction.

        ``reply_to`` is where responses go (§18.2.2); defaults to ``source``. Raises
        ``TransactionTableFull`` instead of opening a transaction beyond ``max_transactions``.
        """
        key = server_key(request)
        if request.method == "ACK":
            tx = self._transactions.get(key)
            if tx is None and not key.branch and key.legacy in self._acks:
                tx = self._transactions.get(self._acks[key.legacy])
            if tx is None or tx.kind is not Kind.INVITE_SERVER:
                # §17.2.3: the ACK for a 2xx is its own transaction-less request for the TU.
                return [RequestReceived(None, request, source)]
            return self._feed(tx, Input.ACK, now, request)
        tx = self._transactions.get(key)
        if tx is not None:
            return self._feed(tx, Input.REQUEST, now, request)
        held = self._completed.get(key)
        if held is not None:
            # §17.2.2 Completed: the retransmitted request gets the final response again and
            # the transaction user is not told (Figure 8, the table's (COMPLETED, REQUEST)).
            _, data, destination = held
            return [Transmit(key, parse_message(data), data, destination, True)]
        if len(self._transactions) + len(self._completed) >= self.max_transactions:
            raise TransactionTableFull(f"{len(self)} transactions held")
        kind = Kind.INVITE_SERVER if request.method == "INVITE" else Kind.NON_INVITE_SERVER
        tx = Transaction(
            kind, key, request, reply_to or source, self.config,
            self._build_ack, self._build_trying,
        )
        self._transactions[key] = tx
        events: list[Event] = [RequestReceived(key, request, source)]
        events += tx.start(now)
        self._after(tx, events)
        return events

    def receive_response(self, response: Message, source: Source, now: float) -> list[Event]:
        """A response from the network, matched by branch + CSeq method (§17.1.3)."""
        branch = response.branch or ""
        method = response.cseq[1]
        tx = self._transactions.get(TransactionKey(False, method, branch))
        if tx is None or not 100 <= response.status <= 699:
            return [StrayResponse(response, source)]
        return self._feed(tx, _classify(response.status, server=False), now, response)

    def transport_error(self, key: TransactionKey, now: float) -> list[Event]:
        """The transport could not deliver a message of this transaction."""
        tx = self._transactions.get(key)
        if tx is None:
            if self._completed.pop(key, None) is not None:
                # (COMPLETED, TRANSPORT_ERROR) of Figure 8.
                return [TransportFailed(key), TransactionTerminated(key)]
            return []
        return self._feed(tx, Input.TRANSPORT_ERROR, now, None)

    # -- transaction user side ---------------------------------------------------------------

    def send_request(
        self, request: Message, destination: Source, now: float
    ) -> tuple[TransactionKey, list[Event]]:
        """Open a client transaction for ``request`` and send it to ``destination``."""
        if request.method == "ACK":
            raise LocalProtocolError("ACK is not sent in a client transaction (§17.1.1.3)")
        branch = request.branch or ""
        if not branch.startswith(MAGIC_COOKIE):
            raise LocalProtocolError(f"branch {branch!r} lacks the RFC 3261 magic cookie")
        key = TransactionKey(False, request.method, branch)
        if key in self._transactions:
            raise LocalProtocolError(f"a client transaction with branch {branch} exists")
        kind = Kind.INVITE_CLIENT if request.method == "INVITE" else Kind.NON_INVITE_CLIENT
        tx = Transaction(
            kind, key, request, destination, self.config, self._build_ack, self._build_trying
        )
        self._transactions[key] = tx
        events = tx.start(now)
        self._after(tx, events)
        return key, events

    def respond(self, key: TransactionKey, response: Message, now: float) -> list[Event]:
        """Send the transaction user's response through server transaction ``key``."""
        tx = self._transactions.get(key)
        if tx is None or not tx.is_server:
            if key in self._completed:
                raise LocalProtocolError(
                    f"non-invite-server transaction in state completed cannot take "
                    f"{_classify(response.status, server=True).value}"
                )
            raise LocalProtocolError(f"no server transaction {key}")
        events = self._feed(tx, _classify(response.status, server=True), now, response)
        if not key.branch and tx.kind is Kind.INVITE_SERVER and key in self._transactions:
            if tx.ack_fields is not None:
                self._acks.pop(tx.ack_fields, None)
            tx.ack_fields = key.legacy[:4] + (_tag(response.to),) + key.legacy[5:]
            self._acks[tx.ack_fields] = key
        return events

    def answer_at_once(
        self, key: TransactionKey, response_bytes: bytes, destination: Source, now: float
    ) -> None:
        """File a new non-INVITE server transaction over UDP already answered with a final
        response: the same end state as ``receive_request`` then ``respond`` with it, without
        building the machine (the registrar's hot path).

        RFC 3261 §17.2.2: (TRYING, final from the TU) -> Completed with timer J = 64*T1; until
        J the transaction only re-sends ``response_bytes`` to retransmissions. The caller has
        checked ``key not in self`` and sends the bytes itself. Raises
        ``TransactionTableFull`` like ``receive_request``.
        """
        if key in self._transactions or key in self._completed:
            raise LocalProtocolError(f"transaction {key} exists")
        if not key.server or key.method in ("INVITE", "ACK"):
            raise LocalProtocolError("only non-INVITE server transactions are answered at once")
        if destination.transport.upper() in RELIABLE_TRANSPORTS:
            raise LocalProtocolError("answer_at_once is for UDP (timer J is zero on streams)")
        if len(self._transactions) + len(self._completed) >= self.max_transactions:
            raise TransactionTableFull(f"{len(self)} transactions held")
        _, duration = _STARTS[A.START_J]
        deadline = now + duration(self.config, False)
        self._completed[key] = (deadline, response_bytes, destination)
        self._seq += 1
        entry = (deadline, self._seq, key)
        expiries = self._expiries
        if not expiries or expiries[-1][0] <= deadline:
            expiries.append(entry)
        else:
            bisect.insort(expiries, entry, key=lambda e: (e[0], e[1]))

    def abandon(self, key: TransactionKey) -> list[Event]:
        """Drop a server transaction the transaction user cannot answer at all."""
        tx = self._transactions.get(key)
        if tx is None and self._completed.pop(key, None) is not None:
            return [TransactionTerminated(key)]
        if tx is None or not tx.is_server:
            raise LocalProtocolError(f"no server transaction {key}")
        tx.abandon()
        events: list[Event] = [TransactionTerminated(key)]
        self._after(tx, events)
        return events

    def transactions(self) -> list[Transaction]:
        """The live transactions (a snapshot)."""
        return list(self._transactions.values())

    def find_invite(self, cancel: Message) -> TransactionKey | None:
        """The INVITE server transaction a CANCEL refers to (§9.2), if it is still open."""
        key = server_key(cancel, "INVITE")
        return key if key in self._transactions else None

    # -- time --------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """The instant at which ``handle_timer`` must next run, or None."""
        live = self._next_live()
        held = self._next_completed()
        if held is None or (live is not None and live < held):
            return live
        return held

    def handle_timer(self, now: float) -> list[Event]:
        """Fire every transaction timer due at ``now``, earliest first."""
        events: list[Event] = []
        completed = self._completed
        expiries = self._expiries
        while True:
            live = self._next_live()
            held = self._next_completed()
            if held is not None and held <= now and (live is None or held <= live):
                # Timer J of a compactly held transaction: (COMPLETED, TIMER_J) -> Terminated.
                _, _, key = expiries.popleft()
                del completed[key]
                events.append(TransactionTerminated(key))
                continue
            if live is None or live > now:
                return events
            _, _, key = heapq.heappop(self._heap)
            tx = self._transactions[key]
            produced = tx.handle_timer(now)
            self._after(tx, produced)
            events += produced

    def _next_live(self) -> float | None:
        heap = self._heap
        while heap:
            deadline, _, key = heap[0]
            tx = self._transactions.get(key)
            if tx is not None and tx.next_timer() == deadline:
                return deadline
            heapq.heappop(heap)  # stale: the transaction moved on or ended
        return None

    def _next_completed(self) -> float | None:
        expiries = self._expiries
        while expiries:
            deadline, _, key = expiries[0]
            held = self._completed.get(key)
            if held is not None and held[0] == deadline:
                return deadline
            expiries.popleft()  # stale: ended early (transport error, abandon)
        return None

    # -- internals ---------------------------------------------------------------------------

    def _feed(
        self, tx: Transaction, inp: Input, now: float, message: Message | None
    ) -> list[Event]:
        events = tx.feed(inp, now, message)
        self._after(tx, events)
        return events

    def _after(self, tx: Transaction, events: list[Event]) -> None:
        state = tx.state
        if state is State.TERMINATED:
            self._transactions.pop(tx.key, None)
            if tx.ack_fields is not None:
                self._acks.pop(tx.ack_fields, None)
            return
        if state is State.COMPLETED and tx.kind is Kind.NON_INVITE_SERVER:
            self._hold_completed(tx)
            return
        deadline = tx.next_timer()
        if deadline is not None and deadline != tx.queued_at:
            tx.queued_at = deadline
            self._seq += 1
            heapq.heappush(self._heap, (deadline, self._seq, tx.key))

    def _hold_completed(self, tx: Transaction) -> None:
        # Only timer J is left (§17.2.2): keep the response bytes and the deadline, drop the
        # machine. On reliable transports J is zero and the transaction has already ended.
        deadline = tx.next_timer()
        assert deadline is not None and tx.last_response is not None
        key = tx.key
        del self._transactions[key]
        self._completed[key] = (deadline, tx._response_bytes, tx.peer)
        self._seq += 1
        entry = (deadline, self._seq, key)
        expiries = self._expiries
        if not expiries or expiries[-1][0] <= deadline:
            expiries.append(entry)  # the usual case: J has one length, ``now`` only grows
        else:
            bisect.insort(expiries, entry, key=lambda e: (e[0], e[1]))
