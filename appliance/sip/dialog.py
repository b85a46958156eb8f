"""RFC 3261 §12-§15 dialogs for a user agent (the B2BUA's two sides), sans-IO.

Rules of this file:

* Time is an argument and nothing here touches a socket: callers feed requests, responses and
  ``now``; the layer returns outputs (``SendResponse`` through a server transaction,
  ``SendRequest`` opening a client transaction, ``SendAck`` sent outside any transaction) and
  events for the call-control user. ``next_timer()`` / ``handle_timer(now)`` drive the 2xx
  retransmissions (§13.3.1.4), the re-INVITE glare retry (§14.1) and RFC 4028 session timers.
* A dialog is found by Call-ID + local tag + remote tag (§12.2.2). A request with a To tag that
  finds none gets 481; a lower CSeq than the last one seen gets 500 (§12.2.2).
* Peer mistakes are answered (481, 491, 500, 422) and never raise; misuse of the API (answering
  a transaction twice, a request on an ended dialog) raises ``LocalProtocolError``.
* The transaction layer (``appliance.sip.transaction``) stays in charge of retransmitting
  requests and non-2xx responses. The ACK for a 2xx is end to end (§13.2.2.4, §17.1.1.3): this
  layer builds it and the UAS core here stops retransmitting its 2xx when it arrives.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from appliance.sip.source import Source
from appliance.sip.transaction import TimerConfig, TransactionKey, server_key
from media_core.sip import (
    LocalProtocolError,
    NameAddr,
    RemoteProtocolError,
    SipMessage,
    SipUri,
    build_request,
    build_response,
    new_branch,
    new_tag,
    parse_name_addr,
    parse_uri,
)

__all__ = [
    "DIALOG_METHODS",
    "AckReceived",
    "CallCancelled",
    "Dialog",
    "DialogConfig",
    "DialogEarly",
    "DialogConfirmed",
    "DialogId",
    "DialogLayer",
    "DialogState",
    "DialogTerminated",
    "InDialogRequest",
    "IncomingCall",
    "Output",
    "RequestFailed",
    "ResponseReceived",
    "SendAck",
    "SendRequest",
    "SendResponse",
    "SessionTimer",
    "destination_for",
]

DIALOG_METHODS = frozenset(
    {"INVITE", "ACK", "CANCEL", "BYE", "UPDATE", "INFO", "REFER", "NOTIFY"}
)
"""Requests the dialog layer takes from the SIP service (the rest stay with the service)."""
TARGET_REFRESH = frozenset({"INVITE", "UPDATE"})
"""§12.2 / RFC 3311 §5: requests whose Contact replaces the remote target."""
ALLOW = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "UPDATE", "INFO", "REFER", "NOTIFY")
SUPPORTED = ("replaces", "timer")
MAX_CSEQ = 2**31 - 1
"""§8.1.1.5: CSeq numbers stay below 2**31."""


class DialogState(enum.Enum):
    """§12: a dialog is early (1xx with a To tag) or confirmed (2xx), then terminated."""

    EARLY = "early"
    CONFIRMED = "confirmed"
    TERMINATED = "terminated"


@dataclass(frozen=True)
class DialogId:
    """§12: Call-ID plus the local and remote tags, from this endpoint's point of view."""

    call_id: str
    """The Call-ID of every request in the dialog."""
    local_tag: str
    """Our tag (From of our requests, To of theirs)."""
    remote_tag: str
    """The peer's tag."""


@dataclass(frozen=True)
class DialogConfig:
    """What the dialog layer needs to know about this endpoint."""

    contact: str
    """Our Contact URI, e.g. ``sip:edgecc@192.0.2.10:5060``."""
    sent_by: Mapping[str, tuple[str, int]]
    """Via sent-by per transport (``SipService.addresses``)."""
    timers: TimerConfig = field(default_factory=TimerConfig)
    """T1/T2 for the 2xx retransmission schedule (§13.3.1.4)."""
    session_expires: int = 1800
    """RFC 4028 Session-Expires we offer and accept at most (seconds)."""
    min_se: int = 90
    """RFC 4028 §5: smallest session interval we accept; smaller gets 422."""
    max_dialogs: int = 50_000
    """Limit on dialogs plus pending INVITEs; beyond it new INVITEs get 503."""
    max_forks: int = 16
    """Limit on early dialogs one outgoing INVITE may create (forking, §13.2.2.4)."""
    user_agent: str = "edgecc"


@dataclass(frozen=True)
class SessionTimer:
    """RFC 4028 session timer state negotiated in a 2xx."""

    interval: int
    """Session-Expires delta-seconds."""
    we_refresh: bool
    """True when this endpoint is the refresher."""


@dataclass(eq=False)
class Dialog:
    """One dialog's state (§12.1): tags, URIs, CSeqs, route set, remote target."""

    id: DialogId
    state: DialogState
    is_uac: bool
    """True when we sent the INVITE that created it (we own the Call-ID, §14.1)."""
    local_party: NameAddr
    """From of our requests (with our tag)."""
    remote_party: NameAddr
    """To of our requests (with their tag)."""
    remote_target: SipUri
    """Where requests go (the peer's Contact)."""
    route_set: tuple[str, ...]
    """Route header values for our requests, in order (§12.1.1, §12.1.2)."""
    local_cseq: int
    """Last CSeq number we used."""
    remote_cseq: int | None
    """Last CSeq number the peer used; None until it sends one (UAC side)."""
    flow: Source | None = None
    """Fixed next hop (the connection a TCP/TLS peer came on); None resolves the URI."""
    secure: bool = False
    """§12.1: the dialog was created over sips/TLS."""
    peer_allows: frozenset[str] = frozenset()
    """The peer's Allow header (to pick UPDATE for session refresh)."""
    session: SessionTimer | None = None
    local_sdp: bytes = b""
    """Last session description we sent (re-offered unchanged on a re-INVITE refresh)."""
    remote_origin: str | None = None
    """``o=`` line of the peer's last description (same line: a refresh, not a change)."""
    created_at: float = 0.0
    end_reason: str | None = None


# --------------------------------------------------------------------------------------------
# Outputs: what the caller must do, and what call control must hear


@dataclass(frozen=True)
class SendResponse:
    """Send a response through the server transaction ``key``."""

    key: TransactionKey
    """The server transaction (the INVITE's for a 2xx retransmission)."""
    response: SipMessage
    """The response."""
    retransmission: bool = False
    """True for a §13.3.1.4 2xx retransmission."""


@dataclass(frozen=True)
class SendRequest:
    """Open a client transaction for ``request`` towards ``destination``."""

    key: TransactionKey
    """The client transaction key it will have (branch + method)."""
    request: SipMessage
    """The request."""
    destination: Source
    """Next hop."""
    dialog: DialogId | None
    """The dialog it belongs to (None for an initial INVITE)."""


@dataclass(frozen=True)
class SendAck:
    """Send an ACK for a 2xx straight through the transport (no transaction, §17.1.1.3)."""

    request: SipMessage
    """The ACK."""
    destination: Source
    """Next hop."""
    dialog: DialogId
    """Its dialog."""


@dataclass(frozen=True)
class IncomingCall:
    """A new INVITE: answer it with ``DialogLayer.answer(key, ...)``."""

    key: TransactionKey
    """Its server transaction."""
    request: SipMessage
    """The INVITE."""
    source: Source
    """Where it came from."""
    dialog: DialogId
    """The id the dialog will have once answered with a tag."""


@dataclass(frozen=True)
class InDialogRequest:
    """A re-INVITE, UPDATE, INFO, REFER or NOTIFY: answer it with ``answer(key, ...)``."""

    key: TransactionKey
    """Its server transaction."""
    request: SipMessage
    """The request."""
    dialog: DialogId
    """Its dialog."""
    is_refresh: bool = False
    """A session refresh (RFC 4028): no description, or the same ``o=`` version as before."""


@dataclass(frozen=True)
class AckReceived:
    """The ACK for our 2xx arrived (retransmissions of the 2xx stopped)."""

    dialog: DialogId
    """Its dialog."""
    request: SipMessage
    """The ACK (its body is the answer when our 2xx carried the offer)."""


@dataclass(frozen=True)
class CallCancelled:
    """The caller CANCELled an INVITE we had not answered finally (487 sent)."""

    key: TransactionKey
    """The INVITE server transaction."""
    dialog: DialogId
    """The dialog id it would have had."""


@dataclass(frozen=True)
class DialogEarly:
    """An early dialog exists (we sent or received a 1xx with a To tag)."""

    dialog: DialogId
    """The dialog."""
    response: SipMessage
    """The provisional response."""


@dataclass(frozen=True)
class DialogConfirmed:
    """A 2xx to the initial INVITE confirmed the dialog."""

    dialog: DialogId
    """The dialog."""
    response: SipMessage
    """The 2xx."""


@dataclass(frozen=True)
class DialogTerminated:
    """The dialog ended."""

    dialog: DialogId
    """The dialog."""
    reason: str
    """``bye-received``, ``bye-sent``, ``rejected``, ``cancelled``, ``ack-timeout``,
    ``session-expired``, ``no-dialog`` (481/408 to our request, §12.2.1.2), ``fork-lost``,
    ``timeout``."""
    status: int | None = None
    """The final status involved (e.g. 486 for a rejected INVITE), when there is one."""


@dataclass(frozen=True)
class ResponseReceived:
    """A response to a request we sent (the 2xx is ACKed by the layer when it can)."""

    key: TransactionKey
    """The client transaction."""
    response: SipMessage
    """The response."""
    dialog: DialogId | None
    """The dialog it belongs to (None for a 1xx/3xx-6xx without a To tag)."""


@dataclass(frozen=True)
class RequestFailed:
    """A request we sent got no response (timer B/F) or could not be sent."""

    key: TransactionKey
    """The client transaction."""
    method: str
    """Its method."""
    dialog: DialogId | None
    """Its dialog."""


Output = (
    SendResponse | SendRequest | SendAck | IncomingCall | InDialogRequest | AckReceived
    | CallCancelled | DialogEarly | DialogConfirmed | DialogTerminated | ResponseReceived
    | RequestFailed
)


# --------------------------------------------------------------------------------------------
# Helpers


_DEFAULT_PORT = {"UDP": 5060, "TCP": 5060, "TLS": 5061}


def destination_for(uri: SipUri) -> Source:
    """The next hop a SIP URI names (§19.1.4 defaults; no DNS: the host must be an address)."""
    transport = (uri.params.get("transport") or "").upper()
    if not transport:
        transport = "TLS" if uri.scheme == "sips" else "UDP"
    host = uri.host
    if host.startswith("["):
        host = host[1:-1]
    return Source(transport, host, uri.port or _DEFAULT_PORT.get(transport, 5060))


def _with_tag(party: NameAddr, tag: str) -> NameAddr:
    params = dict(party.params)
    params["tag"] = tag
    return NameAddr(party.uri, party.display, params)


def _route_uri(route: str) -> SipUri:
    return parse_name_addr(route).uri


def _contact_uri(message: SipMessage) -> SipUri | None:
    """The first Contact's URI; None when there is none or it is a wildcard."""
    contacts = message.contacts
    if not contacts or contacts[0].is_wildcard:
        return None
    return contacts[0].uri


def _check_dialog_fields(message: SipMessage) -> None:
    """Raise ``RemoteProtocolError`` 400 when Record-Route or Contact cannot be parsed, before
    any dialog state is touched."""
    for value in message.get_all("Record-Route"):
        parse_name_addr(value)
    _ = message.contacts


def _origin_line(body: bytes) -> str | None:
    for line in body.decode("utf-8", "replace").splitlines():
        if line.startswith("o="):
            return line.strip()
    return None


def _parse_session_expires(value: str | None) -> tuple[int, str | None] | None:
    """RFC 4028 §4: ``delta-seconds *(;se-params)``; None when absent or unreadable."""
    if not value:
        return None
    head, *params = [part.strip() for part in value.split(";")]
    if not head.isdigit():
        return None
    refresher = None
    for param in params:
        name, _, val = param.partition("=")
        if name.strip().lower() == "refresher" and val.strip().lower() in ("uac", "uas"):
            refresher = val.strip().lower()
    return int(head), refresher


@dataclass(eq=False)
class _ServerInvite:
    """An INVITE we received and have not answered finally (initial or re-INVITE)."""

    key: TransactionKey
    request: SipMessage
    source: Source
    dialog_id: DialogId
    initial: bool
    answered: bool = False


@dataclass(eq=False)
class _PendingAck:
    """§13.3.1.4: our 2xx to an INVITE, retransmitted until its ACK or 64*T1."""

    key: TransactionKey
    response: SipMessage
    cseq: int
    started: float
    next_at: float
    interval: float
    bye_after: bool = False
    """§15: the user hung up before the ACK; BYE goes when it arrives (or at 64*T1)."""


@dataclass(eq=False)
class _ClientRequest:
    """A request we sent, for routing its responses."""

    key: TransactionKey
    request: SipMessage
    destination: Source
    dialog_id: DialogId | None
    initial: bool = False
    provisional: bool = False
    final: bool = False
    cancel_wanted: bool = False
    forks: dict[str, DialogId] = field(default_factory=dict)
    acks: dict[str, SipMessage] = field(default_factory=dict)
    """Remote tag -> the ACK sent for its 2xx (re-sent for each retransmitted 2xx)."""
    winner: str | None = None


@dataclass(eq=False)
class _Timers:
    glare_at: float | None = None
    glare_request: _ClientRequest | None = None
    refresh_at: float | None = None
    expires_at: float | None = None


class DialogLayer:
    """Every dialog of one user agent, and the INVITEs that are creating them."""

    def __init__(self, config: DialogConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.SystemRandom()
        self._dialogs: dict[DialogId, Dialog] = {}
        self._server_invites: dict[TransactionKey, _ServerInvite] = {}
        # The unanswered ones by dialog: a BYE or re-INVITE looks up its dialog's open INVITEs
        # here, not among every answered INVITE still kept for a late CANCEL (64*T1 of them).
        self._open_invites: dict[DialogId, dict[TransactionKey, _ServerInvite]] = {}
        self._server_requests: dict[TransactionKey, tuple[DialogId, SipMessage]] = {}
        self._client: dict[TransactionKey, _ClientRequest] = {}
        # Our last re-INVITE per dialog: "is one in progress" is asked of it, not of every
        # request still kept for retransmissions (32 s of them under load).
        self._reinvites: dict[DialogId, _ClientRequest] = {}
        self._pending_acks: dict[DialogId, _PendingAck] = {}
        self._timers: dict[DialogId, _Timers] = {}
        # Every instant set on a pending 2xx or a dialog's timers goes on this heap as
        # (instant, sequence, dialog id); entries whose instant is no longer set are dropped
        # when they come to the top, so next_timer() never walks the live dialogs.
        self._heap: list[tuple[float, int, DialogId]] = []
        self._heap_seq = itertools.count()
        self._ended: collections.deque[Dialog] = collections.deque(maxlen=1024)

    # -- inspection ------------------------------------------------------------------------

    def get(self, dialog_id: DialogId) -> Dialog | None:
        """The live dialog with this id (ended ones are in ``ended()``)."""
        return self._dialogs.get(dialog_id)

    def dialogs(self) -> list[Dialog]:
        """The live dialogs (a snapshot)."""
        return [d for d in self._dialogs.values() if d.state is not DialogState.TERMINATED]

    def __len__(self) -> int:
        return len(self.dialogs())

    def match(self, request: SipMessage) -> Dialog | None:
        """§12.2.2: the dialog of a received request (Call-ID, To tag local, From tag remote)."""
        to_tag, from_tag = request.to.tag, request.from_.tag
        if not to_tag:
            return None
        dialog = self._dialogs.get(DialogId(request.call_id, to_tag, from_tag or ""))
        if dialog is None or dialog.state is DialogState.TERMINATED:
            return None
        return dialog

    # -- requests from the network -----------------------------------------------------------

    def receive_request(
        self, key: TransactionKey | None, request: SipMessage, source: Source, now: float
    ) -> list[Output]:
        """A request for the dialog layer. ``key`` is None for an ACK outside a transaction."""
        method = request.method
        if method == "ACK":
            return self._receive_ack(request, now)
        if key is None:
            raise LocalProtocolError(f"{method} needs its server transaction key")
        if method == "CANCEL":
            return self._receive_cancel(key, request)
        if method == "INVITE" and not request.to.tag:
            return self._receive_initial_invite(key, request, source, now)
        dialog = self.match(request)
        if dialog is None:
            # §12.2.2: a request with a To tag (or a BYE/UPDATE/... without one) that matches
            # no dialog.
            to_tag = None if request.to.tag else new_tag()
            return [SendResponse(key, build_response(request, 481, to_tag=to_tag))]
        number = request.cseq[0]
        if dialog.remote_cseq is not None and number < dialog.remote_cseq:
            # §12.2.2: out of order.
            return [SendResponse(key, build_response(request, 500, "Out of Order CSeq"))]
        if method in TARGET_REFRESH:
            try:
                _check_dialog_fields(request)
            except RemoteProtocolError as exc:
                return [SendResponse(key, build_response(request, 400, exc.reason))]
        dialog.remote_cseq = number
        if method == "BYE":
            return self._receive_bye(key, request, dialog)
        if method == "INVITE":
            glare = self._reinvite_conflict(key, request, dialog)
            if glare is not None:
                return glare
            self._keep_invite(_ServerInvite(key, request, source, dialog.id, False))
        else:
            self._server_requests[key] = (dialog.id, request)
        if method in TARGET_REFRESH:
            too_small = self._check_session_interval(key, request)
            if too_small is not None:
                self._forget_invite(key)
                self._server_requests.pop(key, None)
                return too_small
            target = _contact_uri(request)
            if target is not None:
                dialog.remote_target = target  # §12.2.2 target refresh
        is_refresh = method in TARGET_REFRESH and (
            not request.body or _origin_line(request.body) == dialog.remote_origin)
        if method == "UPDATE" and not request.body:
            # RFC 4028 §7.4 / RFC 3311: an UPDATE without an offer is a pure session refresh;
            # answered here so a refresh never reaches (or disturbs) call control.
            return self.answer(key, 200, now)
        if request.body and method in TARGET_REFRESH:
            dialog.remote_origin = _origin_line(request.body)
        return [InDialogRequest(key, request, dialog.id, is_refresh)]

    def _receive_initial_invite(self, key: TransactionKey, request: SipMessage, source: Source,
                                now: float) -> list[Output]:
        if key in self._server_invites:
            return []
        if len(self._dialogs) + len(self._server_invites) >= self.config.max_dialogs:
            # (answered INVITEs stay counted until their transaction ends, 64*T1 at most)
            return [SendResponse(key, build_response(
                request, 503, headers=[("Retry-After", "5")], to_tag=new_tag()))]
        too_small = self._check_session_interval(key, request)
        if too_small is not None:
            return too_small
        try:
            _check_dialog_fields(request)
        except RemoteProtocolError as exc:
            return [SendResponse(key, build_response(request, 400, exc.reason,
                                                     to_tag=new_tag()))]
        dialog_id = DialogId(request.call_id, new_tag(), request.from_.tag or "")
        self._keep_invite(_ServerInvite(key, request, source, dialog_id, True))
        return [IncomingCall(key, request, source, dialog_id)]

    def _check_session_interval(self, key: TransactionKey,
                                request: SipMessage) -> list[Output] | None:
        se = _parse_session_expires(request.get("Session-Expires"))
        if se is not None and se[0] < self.config.min_se:
            # RFC 4028 §8.1: too small an interval gets 422 with our Min-SE.
            return [SendResponse(key, build_response(
                request, 422, "Session Interval Too Small",
                headers=[("Min-SE", str(self.config.min_se))], to_tag=new_tag()))]
        return None

    def _reinvite_conflict(self, key: TransactionKey, request: SipMessage,
                           dialog: Dialog) -> list[Output] | None:
        if self._reinvite_open(dialog.id):
            # §14.2: our own re-INVITE is in progress: glare.
            return [SendResponse(key, build_response(request, 491))]
        if self._open_invites.get(dialog.id):
            # §14.2: a second INVITE before our final answer to the first.
            retry = str(self._rng.randint(0, 10))
            return [SendResponse(key, build_response(
                request, 500, headers=[("Retry-After", retry)]))]
        return None

    def _receive_bye(self, key: TransactionKey, request: SipMessage,
                     dialog: Dialog) -> list[Output]:
        out: list[Output] = [SendResponse(key, build_response(request, 200))]
        for pending in list(self._open_invites.get(dialog.id, {}).values()):
            # §15.1.2: requests still open on the dialog are answered 487.
            self._mark_answered(pending)
            out.append(SendResponse(pending.key, self._response(pending, 487, None, (), b"")))
        out += self._terminate(dialog, "bye-received")
        return out

    def _receive_cancel(self, key: TransactionKey, cancel: SipMessage) -> list[Output]:
        invite_key = server_key(cancel, "INVITE")
        pending = self._server_invites.get(invite_key)
        if pending is None or not pending.initial:
            # §9.2: nothing to cancel here.
            return [SendResponse(key, build_response(cancel, 481, to_tag=new_tag()))]
        out: list[Output] = [SendResponse(key, build_response(cancel, 200))]
        if pending.answered:
            return out  # §9.2: the final response already went; CANCEL has no effect
        self._mark_answered(pending)
        out.append(SendResponse(invite_key, self._response(pending, 487, None, (), b"")))
        out.append(CallCancelled(invite_key, pending.dialog_id))
        dialog = self._dialogs.get(pending.dialog_id)
        if dialog is not None:
            out += self._terminate(dialog, "cancelled", 487)
        return out

    def _receive_ack(self, ack: SipMessage, now: float) -> list[Output]:
        dialog = self.match(ack)
        if dialog is None:
            return []  # §17.2.3 / §13.3.1.4: an ACK that matches nothing is discarded
        pending = self._pending_acks.get(dialog.id)
        if pending is None or pending.cseq != ack.cseq[0]:
            return []  # a retransmitted ACK, or one for an older 2xx
        del self._pending_acks[dialog.id]
        out: list[Output] = [AckReceived(dialog.id, ack)]
        if pending.bye_after:
            out += self.request(dialog.id, "BYE", now)[1]
        return out

    # -- answering (UAS) ---------------------------------------------------------------------

    def answer(self, key: TransactionKey, status: int, now: float, *, reason: str | None = None,
               headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> list[Output]:
        """Answer a request the layer handed up (``IncomingCall`` / ``InDialogRequest``)."""
        pending = self._server_invites.get(key)
        if pending is not None:
            return self._answer_invite(pending, status, now, reason, headers, body)
        entry = self._server_requests.pop(key, None)
        if entry is None:
            raise LocalProtocolError(f"no request awaiting an answer for {key}")
        dialog_id, request = entry
        if status < 200:
            self._server_requests[key] = entry
        dialog = self._dialogs.get(dialog_id)
        extra = list(headers)
        if request.method == "UPDATE" and 200 <= status < 300 and dialog is not None:
            extra += self._session_headers(request, dialog, now)
            extra.append(("Contact", f"<{self.config.contact}>"))
        response = build_response(request, status, reason, headers=extra, body=body)
        return [SendResponse(key, response)]

    def _answer_invite(self, pending: _ServerInvite, status: int, now: float,
                       reason: str | None, headers: Iterable[tuple[str, str]],
                       body: bytes) -> list[Output]:
        if pending.answered:
            raise LocalProtocolError(f"INVITE {pending.key} already has a final answer")
        if status == 100:
            return [SendResponse(pending.key, build_response(pending.request, 100))]
        extra = list(headers)
        if status < 300:
            extra.append(("Contact", f"<{self.config.contact}>"))
            if pending.initial:
                # §12.1.1: a dialog-establishing response copies the Record-Route values.
                extra += [("Record-Route", rr) for rr in pending.request.get_all("Record-Route")]
        out: list[Output] = []
        dialog = self._dialogs.get(pending.dialog_id)
        if status >= 200:
            self._mark_answered(pending)
        if 200 <= status < 300:
            if dialog is None:
                dialog = self._new_uas_dialog(pending, now)
            extra += self._session_headers(pending.request, dialog, now)
            if body:
                dialog.local_sdp = body
            response = self._response(pending, status, reason, extra, body)
            out.append(SendResponse(pending.key, response))
            t1 = self.config.timers.t1
            self._pending_acks[dialog.id] = _PendingAck(
                pending.key, response, pending.request.cseq[0], now, now + t1, t1)
            self._schedule(dialog.id, now + t1)
            if pending.initial and dialog.state is not DialogState.CONFIRMED:
                dialog.state = DialogState.CONFIRMED
                out.append(DialogConfirmed(dialog.id, response))
            return out
        response = self._response(pending, status, reason, extra, body)
        out.append(SendResponse(pending.key, response))
        if status < 200:
            if dialog is None and pending.initial:
                # §12.1.1: a 1xx with a To tag creates an early dialog.
                dialog = self._new_uas_dialog(pending, now)
                out.append(DialogEarly(dialog.id, response))
            return out
        if pending.initial and dialog is not None:
            out += self._terminate(dialog, "rejected", status)
        return out

    def _response(self, pending: _ServerInvite, status: int, reason: str | None,
                  headers: Iterable[tuple[str, str]], body: bytes) -> SipMessage:
        to_tag = pending.dialog_id.local_tag if pending.initial else None
        return build_response(pending.request, status, reason, headers=headers, body=body,
                              to_tag=to_tag)

    def _new_uas_dialog(self, pending: _ServerInvite, now: float) -> Dialog:
        request = pending.request
        # §8.1.1.8 makes Contact mandatory in INVITE; without one, the From URI is the best
        # guess at a target.
        contact = _contact_uri(request) or request.from_.uri
        flow = pending.source if pending.source.transport in ("TCP", "TLS") else None
        dialog = Dialog(
            id=pending.dialog_id,
            state=DialogState.EARLY,
            is_uac=False,
            local_party=_with_tag(request.to, pending.dialog_id.local_tag),
            remote_party=request.from_,
            remote_target=contact,
            route_set=tuple(request.get_all("Record-Route")),  # §12.1.1: in order
            local_cseq=self._rng.randint(1, 2**16),  # §12.1.1: empty; §8.1.1.5 start
            remote_cseq=request.cseq[0],
            flow=flow,
            secure=request.request_uri.scheme == "sips",
            peer_allows=frozenset(a.upper() for a in request.get_all("Allow")),
            remote_origin=_origin_line(request.body) if request.body else None,
            created_at=now,
        )
        self._dialogs[dialog.id] = dialog
        return dialog

    def _session_headers(self, request: SipMessage, dialog: Dialog,
                         now: float) -> list[tuple[str, str]]:
        """RFC 4028 §9: Session-Expires (and Require: timer) for our 2xx to a refresh."""
        se = _parse_session_expires(request.get("Session-Expires"))
        if se is None:
            return []
        interval = min(se[0], self.config.session_expires)
        interval = max(interval, self.config.min_se)
        refresher = se[1]
        if refresher is None:
            # §9: the UAS picks; a UAC that supports timer refreshes, else we do.
            supported = [t.lower() for t in request.get_all("Supported")]
            refresher = "uac" if "timer" in supported else "uas"
        self._set_session(dialog, SessionTimer(interval, refresher == "uas"), now)
        headers = [("Session-Expires", f"{interval};refresher={refresher}")]
        if refresher == "uac":
            headers.append(("Require", "timer"))  # RFC 4028 §9
        return headers

    def _set_session(self, dialog: Dialog, session: SessionTimer, now: float) -> None:
        dialog.session = session
        timers = self._timers.setdefault(dialog.id, _Timers())
        if session.we_refresh:
            # RFC 4028 §10: the refresher refreshes at half the interval.
            timers.refresh_at, timers.expires_at = now + session.interval / 2, None
            self._schedule(dialog.id, timers.refresh_at)
        else:
            # §10: without a refresh, BYE at interval - min(32, interval/3).
            grace = min(32.0, session.interval / 3)
            timers.refresh_at, timers.expires_at = None, now + session.interval - grace
            self._schedule(dialog.id, timers.expires_at)

    # -- requests we send (UAC) --------------------------------------------------------------

    def invite(self, now: float, *, from_party: str, to_party: str, request_uri: str | None = None,
               destination: Source | None = None, body: bytes = b"",
               headers: Iterable[tuple[str, str]] = (), call_id: str | None = None,
               from_tag: str | None = None,
               cseq: int = 1) -> tuple[TransactionKey, list[Output]]:
        """Send an initial INVITE; returns its client transaction key. ``call_id``,
        ``from_tag`` and ``cseq`` repeat a challenged INVITE (§8.1.3.5, §22.2: the same
        Call-ID and From, CSeq one higher)."""
        to = parse_name_addr(to_party)
        if to.tag:
            raise LocalProtocolError("an initial INVITE has no To tag")
        uri = parse_uri(request_uri) if request_uri else to.uri
        destination = destination or destination_for(uri)
        local = _with_tag(parse_name_addr(from_party), from_tag or new_tag())
        extra = list(headers)
        if body and not any(n.lower() == "content-type" for n, _ in extra):
            extra.append(("Content-Type", "application/sdp"))
        if self.config.session_expires:
            extra.append(("Session-Expires", str(self.config.session_expires)))
        request = self._build("INVITE", uri, destination, local, to,
                              call_id or f"{new_tag()}{new_tag()}@edgecc", cseq, (), extra, body)
        key = TransactionKey(False, "INVITE", request.branch or "")
        self._client[key] = _ClientRequest(key, request, destination, None, initial=True)
        return key, [SendRequest(key, request, destination, None)]

    def cancel(self, key: TransactionKey, now: float) -> list[Output]:
        """§9.1: CANCEL our pending initial INVITE (sent once a provisional has arrived)."""
        tx = self._client.get(key)
        if tx is None or not tx.initial:
            raise LocalProtocolError(f"no initial INVITE {key} to cancel")
        if tx.final or tx.cancel_wanted:
            return []
        tx.cancel_wanted = True
        if not tx.provisional:
            return []  # §9.1: wait for a provisional response before sending CANCEL
        return self._send_cancel(tx)

    def _send_cancel(self, tx: _ClientRequest) -> list[Output]:
        invite = tx.request
        headers = [
            ("Via", str(invite.top_via)),
            ("Max-Forwards", "70"),
            ("From", invite.get("From") or ""),
            ("To", invite.get("To") or ""),
            ("Call-ID", invite.call_id),
            ("CSeq", f"{invite.cseq[0]} CANCEL"),
        ]
        headers += [("Route", r) for r in invite.get_all("Route")]
        cancel = build_request("CANCEL", invite.uri or "", headers=headers)
        key = TransactionKey(False, "CANCEL", invite.branch or "")
        self._client[key] = _ClientRequest(key, cancel, tx.destination, None)
        return [SendRequest(key, cancel, tx.destination, None)]

    def request(self, dialog_id: DialogId, method: str, now: float, *,
                headers: Iterable[tuple[str, str]] = (),
                body: bytes = b"") -> tuple[TransactionKey, list[Output]]:
        """§12.2.1.1: send BYE, re-INVITE, UPDATE, INFO, REFER or NOTIFY within a dialog."""
        return self._request(dialog_id, method, headers, body, "bye-sent")

    def _request(self, dialog_id: DialogId, method: str, headers: Iterable[tuple[str, str]],
                 body: bytes, end_reason: str) -> tuple[TransactionKey, list[Output]]:
        dialog = self._dialogs.get(dialog_id)
        if dialog is None or dialog.state is DialogState.TERMINATED:
            raise LocalProtocolError(f"dialog {dialog_id} is not live")
        if method in ("ACK", "CANCEL"):
            raise LocalProtocolError(f"{method} is not sent with request()")
        if method == "BYE" and dialog.state is DialogState.EARLY and not dialog.is_uac:
            # §15: the callee must not send BYE on an early dialog; it answers the INVITE.
            raise LocalProtocolError("a UAS ends an early dialog with a final response")
        if method == "INVITE" and self._reinvite_open(dialog_id):
            raise LocalProtocolError("a re-INVITE is already in progress on this dialog")
        if dialog.local_cseq >= MAX_CSEQ:
            raise LocalProtocolError("local CSeq exhausted")
        dialog.local_cseq += 1
        uri, routes = self._request_target(dialog)
        destination = self._next_hop(dialog, uri, routes)
        extra = list(headers)
        if body and method == "INVITE":
            dialog.local_sdp = body
            if not any(n.lower() == "content-type" for n, _ in extra):
                extra.append(("Content-Type", "application/sdp"))
        if method in TARGET_REFRESH and dialog.session is not None and not any(
                n.lower() == "session-expires" for n, _ in extra):
            refresher = "uac" if dialog.session.we_refresh else "uas"
            extra.append(("Session-Expires", f"{dialog.session.interval};refresher={refresher}"))
        request = self._build(method, uri, destination, dialog.local_party, dialog.remote_party,
                              dialog.id.call_id, dialog.local_cseq, routes, extra, body)
        key = TransactionKey(False, method, request.branch or "")
        tx = self._client[key] = _ClientRequest(key, request, destination, dialog.id)
        if method == "INVITE":
            self._reinvites[dialog.id] = tx
        out: list[Output] = [SendRequest(key, request, destination, dialog.id)]
        if method == "BYE":
            out += self._terminate(dialog, end_reason)
        return key, out

    def hangup(self, dialog_id: DialogId, now: float) -> list[Output]:
        """End a dialog with BYE (§15.1.1); as UAS, not before the ACK of our 2xx (§15)."""
        pending = self._pending_acks.get(dialog_id)
        if pending is not None and not self._dialogs[dialog_id].is_uac:
            pending.bye_after = True
            return []
        return self.request(dialog_id, "BYE", now)[1]

    def ack(self, dialog_id: DialogId, now: float, body: bytes = b"") -> list[Output]:
        """Send the ACK for the 2xx to our INVITE when it carried the offer (late offer)."""
        dialog = self._dialogs.get(dialog_id)
        for tx in self._client.values():
            if (dialog is not None and tx.request.method == "INVITE" and not tx.request.body
                    and tx.final and dialog_id.remote_tag not in tx.acks
                    and (tx.dialog_id == dialog_id or dialog_id in tx.forks.values())):
                return self._send_ack(tx, dialog, body)
        raise LocalProtocolError(f"no 2xx awaiting an ACK with a body on {dialog_id}")

    def _request_target(self, dialog: Dialog) -> tuple[SipUri, tuple[str, ...]]:
        routes = dialog.route_set
        if not routes or "lr" in _route_uri(routes[0]).params:
            return dialog.remote_target, routes
        # §12.2.1.1 strict routing: the first route becomes the Request-URI and the remote
        # target goes last in the Route set.
        first = _route_uri(routes[0])
        first = SipUri(first.scheme, first.user, first.password, first.host, first.port,
                       {k: v for k, v in first.params.items() if k not in ("method", "maddr",
                        "ttl", "transport", "lr")})
        return first, routes[1:] + (f"<{dialog.remote_target}>",)

    @staticmethod
    def _next_hop(dialog: Dialog, uri: SipUri, routes: tuple[str, ...]) -> Source:
        if dialog.flow is not None:
            return dialog.flow
        if dialog.route_set:
            # §8.1.2: the first route is the next hop, loose (Route) or strict (Request-URI).
            return destination_for(_route_uri(dialog.route_set[0]))
        return destination_for(uri)

    def _build(self, method: str, uri: SipUri, destination: Source, local: NameAddr,
               remote: NameAddr, call_id: str, cseq: int, routes: Iterable[str],
               extra: list[tuple[str, str]], body: bytes, *,
               cseq_method: str | None = None, branch: str | None = None) -> SipMessage:
        host, port = self.config.sent_by.get(destination.transport) or self.config.sent_by.get(
            "UDP") or next(iter(self.config.sent_by.values()))
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        headers = [
            ("Via", f"SIP/2.0/{destination.transport} {host}:{port};branch="
                    f"{branch or new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", str(local)),
            ("To", str(remote)),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {cseq_method or method}"),
        ]
        headers += [("Route", r) for r in routes]
        if method in ("INVITE", "UPDATE", "REFER", "NOTIFY", "SUBSCRIBE"):
            headers.append(("Contact", f"<{self.config.contact}>"))
        if method in ("INVITE", "UPDATE"):
            headers += [("Allow", ", ".join(ALLOW)), ("Supported", ", ".join(SUPPORTED))]
        if method != "ACK":
            headers.append(("User-Agent", self.config.user_agent))
        headers += extra
        return build_request(method, uri, headers=headers, body=body)

    def _send_ack(self, tx: _ClientRequest, dialog: Dialog, body: bytes = b"") -> list[Output]:
        # §13.2.2.4: same CSeq number as the INVITE, method ACK, the dialog's route set and a
        # new branch; it is end to end, so no transaction.
        uri, routes = self._request_target(dialog)
        destination = self._next_hop(dialog, uri, routes)
        extra = [("Content-Type", "application/sdp")] if body else []
        ack = self._build("ACK", uri, destination, dialog.local_party, dialog.remote_party,
                          dialog.id.call_id, tx.request.cseq[0], routes, extra, body,
                          cseq_method="ACK")
        tx.acks[dialog.id.remote_tag] = ack
        return [SendAck(ack, destination, dialog.id)]

    # -- responses from the network ----------------------------------------------------------

    def receive_response(self, key: TransactionKey, response: SipMessage,
                         now: float) -> list[Output]:
        """A response the transaction layer passed up for one of our requests."""
        tx = self._client.get(key)
        if tx is None:
            return []
        status = response.status or 0
        if 100 < status < 300:
            # A broken Record-Route/Contact raises here, before anything changes; the
            # response is then dropped like any malformed one (§18.1.2).
            _check_dialog_fields(response)
        if tx.initial:
            return self._initial_invite_response(tx, response, status, now)
        out: list[Output] = []
        method = tx.request.method
        dialog = self._dialogs.get(tx.dialog_id) if tx.dialog_id else None
        tag = response.to.tag or ""
        if method == "INVITE" and 200 <= status < 300 and tag in tx.acks and tx.dialog_id:
            # §13.2.2.4: every retransmission of the 2xx gets the same ACK again.
            hop = tx.destination if dialog is None else self._next_hop_for(dialog)
            return [SendAck(tx.acks[tag], hop, tx.dialog_id)]
        if status >= 200:
            if tx.final:
                return []
            tx.final = True  # kept until the transaction ends, for 2xx retransmissions
        if dialog is None:
            return [ResponseReceived(key, response, tx.dialog_id)]
        if status in (481, 408) and dialog.state is not DialogState.TERMINATED:
            # §12.2.1.2: the dialog is gone at the far end.
            out.append(ResponseReceived(key, response, dialog.id))
            out += self._terminate(dialog, "no-dialog", status)
            return out
        if method == "INVITE" and 200 <= status < 300:
            if dialog.state is DialogState.TERMINATED:
                return []
            target = _contact_uri(response)
            if target is not None:
                dialog.remote_target = target  # §12.2.1.2 target refresh
            self._learn_session(tx.request, response, dialog, now)
            out.append(ResponseReceived(key, response, dialog.id))
            if tx.request.body:
                out += self._send_ack(tx, dialog)
            return out  # late offer: the user's ack() carries the answer
        if method == "INVITE" and status == 491 and dialog.state is not DialogState.TERMINATED:
            # §14.1: retry after T: 2.1-4 s when we own the Call-ID, 0-2 s otherwise (10 ms).
            delay = (self._rng.randint(210, 400) if dialog.is_uac
                     else self._rng.randint(0, 200)) / 100
            timers = self._timers.setdefault(dialog.id, _Timers())
            timers.glare_at, timers.glare_request = now + delay, tx
            self._schedule(dialog.id, timers.glare_at)
        if method == "UPDATE" and 200 <= status < 300:
            target = _contact_uri(response)
            if target is not None:
                dialog.remote_target = target  # RFC 3311 §5.1: UPDATE is a target refresh
            self._learn_session(tx.request, response, dialog, now)
        out.append(ResponseReceived(key, response, dialog.id))
        if (method == "UPDATE" and status in (405, 501) and tx.request.get("Session-Expires")
                and dialog.state is DialogState.CONFIRMED):
            # RFC 4028 §7.4: the peer does not take UPDATE after all: refresh by re-INVITE.
            dialog.peer_allows = dialog.peer_allows - {"UPDATE"}
            out += self._refresh(dialog, now)
        return out

    def _initial_invite_response(self, tx: _ClientRequest, response: SipMessage, status: int,
                                 now: float) -> list[Output]:
        out: list[Output] = []
        tag = response.to.tag
        if status < 200:
            if status > 100 and not tx.provisional and tx.cancel_wanted:
                tx.provisional = True
                out += self._send_cancel(tx)
            tx.provisional = tx.provisional or status > 100
            dialog = None
            if tag and status > 100 and not tx.final:
                dialog = self._fork(tx, response, DialogState.EARLY, now, out)
            out.insert(0, ResponseReceived(tx.key, response, dialog.id if dialog else None))
            return out
        if status >= 300:
            if not tx.final:
                tx.final = True
                out.append(ResponseReceived(tx.key, response, None))
                for fork in tx.forks.values():
                    out += self._terminate_id(fork, "rejected", status)
            return out
        # 2xx: every fork's 2xx is ACKed (§13.2.2.4); the first one wins.
        if not tag:
            return out  # a 2xx without a To tag cannot make a dialog; nothing to ACK
        if tag in tx.acks:
            # §13.2.2.4: a retransmitted 2xx gets the same ACK again.
            dialog = self._dialogs.get(tx.forks[tag])
            hop = self._next_hop_for(dialog) if dialog is not None else tx.destination
            return [SendAck(tx.acks[tag], hop, tx.forks[tag])]
        tx.final = True
        dialog = self._fork(tx, response, DialogState.CONFIRMED, now, out)
        if dialog is None:
            return out
        out.append(ResponseReceived(tx.key, response, dialog.id))
        if tx.winner is None:
            tx.winner = tag
            self._learn_session(tx.request, response, dialog, now)
            for other_tag, other in tx.forks.items():
                if other_tag != tag:
                    out += self._terminate_id(other, "fork-lost")
            out.append(DialogConfirmed(dialog.id, response))
            if tx.request.body:
                out += self._send_ack(tx, dialog)
            return out
        # A second fork answered too: ACK it and end it with BYE (§13.2.2.4).
        out += self._send_ack(tx, dialog, b"")
        out += self._bye(dialog, now, "fork-lost")
        return out

    def _next_hop_for(self, dialog: Dialog) -> Source:
        uri, routes = self._request_target(dialog)
        return self._next_hop(dialog, uri, routes)

    def _fork(self, tx: _ClientRequest, response: SipMessage, state: DialogState, now: float,
              out: list[Output]) -> Dialog | None:
        tag = response.to.tag or ""
        dialog_id = DialogId(tx.request.call_id, tx.request.from_.tag or "", tag)
        dialog = self._dialogs.get(dialog_id)
        routes = tuple(reversed(response.get_all("Record-Route")))  # §12.1.2: reversed
        target = _contact_uri(response) or tx.request.request_uri
        if dialog is None:
            if len(tx.forks) >= self.config.max_forks:
                return None
            dialog = Dialog(
                id=dialog_id, state=state, is_uac=True, local_party=tx.request.from_,
                remote_party=response.to, remote_target=target, route_set=routes,
                local_cseq=tx.request.cseq[0], remote_cseq=None,
                flow=tx.destination if tx.destination.transport in ("TCP", "TLS") else None,
                secure=tx.request.request_uri.scheme == "sips",
                peer_allows=frozenset(a.upper() for a in response.get_all("Allow")),
                local_sdp=tx.request.body, created_at=now)
            self._dialogs[dialog_id] = dialog
            tx.forks[tag] = dialog_id
            if state is DialogState.EARLY:
                out.append(DialogEarly(dialog_id, response))
        elif dialog.state is not DialogState.TERMINATED:
            if state is DialogState.CONFIRMED:
                dialog.state = state
                dialog.route_set = routes  # §13.2.2.4: recomputed from the 2xx
                dialog.peer_allows = frozenset(a.upper() for a in response.get_all("Allow"))
            dialog.remote_target = target
        else:
            return None
        if response.body:
            dialog.remote_origin = _origin_line(response.body)
        return dialog

    def _learn_session(self, request: SipMessage, response: SipMessage, dialog: Dialog,
                       now: float) -> None:
        se = _parse_session_expires(response.get("Session-Expires"))
        if se is None:
            return
        # RFC 4028 §7.2: refresher=uac means us (we sent the request).
        self._set_session(dialog, SessionTimer(se[0], se[1] != "uas"), now)

    def _reinvite_open(self, dialog_id: DialogId) -> bool:
        """Our re-INVITE on this dialog has no final response yet."""
        tx = self._reinvites.get(dialog_id)
        return tx is not None and not tx.final and self._client.get(tx.key) is tx

    def _forget_client(self, key: TransactionKey) -> _ClientRequest | None:
        tx = self._client.pop(key, None)
        if tx is not None and tx.dialog_id is not None and self._reinvites.get(
                tx.dialog_id) is tx:
            del self._reinvites[tx.dialog_id]
        return tx

    def transaction_failed(self, key: TransactionKey, now: float) -> list[Output]:
        """Timer B/F or a transport failure on one of our requests (§8.1.3.1: as 408)."""
        tx = self._forget_client(key)
        if tx is None or tx.final:
            return []
        out: list[Output] = [RequestFailed(key, key.method, tx.dialog_id)]
        if tx.initial:
            for fork in tx.forks.values():
                out += self._terminate_id(fork, "timeout", 408)
            return out
        dialog = self._dialogs.get(tx.dialog_id) if tx.dialog_id else None
        if dialog is not None and tx.request.method != "BYE":
            out += self._terminate(dialog, "no-dialog", 408)  # §12.2.1.2
        return out

    def transaction_ended(self, key: TransactionKey) -> None:
        """The transaction layer forgot ``key``: drop what was kept for its retransmissions."""
        self._forget_client(key)
        self._server_requests.pop(key, None)
        # Answered INVITEs are kept until here so a late CANCEL still finds them (§9.2: 200).
        self._forget_invite(key)

    def _keep_invite(self, pending: _ServerInvite) -> None:
        self._server_invites[pending.key] = pending
        self._open_invites.setdefault(pending.dialog_id, {})[pending.key] = pending

    def _mark_answered(self, pending: _ServerInvite) -> None:
        pending.answered = True
        self._unindex_invite(pending)

    def _forget_invite(self, key: TransactionKey) -> None:
        pending = self._server_invites.pop(key, None)
        if pending is not None:
            self._unindex_invite(pending)

    def _unindex_invite(self, pending: _ServerInvite) -> None:
        open_ = self._open_invites.get(pending.dialog_id)
        if open_ is not None:
            open_.pop(pending.key, None)
            if not open_:
                del self._open_invites[pending.dialog_id]

    # -- time --------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must next run, or None."""
        heap = self._heap
        while heap:
            at, _, dialog_id = heap[0]
            if at in self._instants(dialog_id):
                return at
            heapq.heappop(heap)  # cleared or moved since it was scheduled
        return None

    def _instants(self, dialog_id: DialogId) -> tuple[float, ...]:
        """The instants currently set for one dialog (its pending 2xx and its timers)."""
        pending = self._pending_acks.get(dialog_id)
        timers = self._timers.get(dialog_id)
        ack = (pending.next_at,) if pending is not None else ()
        if timers is None:
            return ack
        return ack + tuple(t for t in (timers.glare_at, timers.refresh_at, timers.expires_at)
                           if t is not None)

    def _schedule(self, dialog_id: DialogId, at: float) -> None:
        heap = self._heap
        heapq.heappush(heap, (at, next(self._heap_seq), dialog_id))
        live = len(self._pending_acks) + 3 * len(self._timers)
        if len(heap) > 2 * live + 1024:
            # Mostly entries of ended dialogs and answered 2xx: rebuild from what is set.
            self._heap = [(t, next(self._heap_seq), d)
                          for d in {*self._pending_acks, *self._timers}
                          for t in self._instants(d)]
            heapq.heapify(self._heap)

    def handle_timer(self, now: float) -> list[Output]:
        """Fire the 2xx retransmissions, glare retries and session timers due at ``now``."""
        out: list[Output] = []
        heap = self._heap
        due: dict[DialogId, None] = {}
        while heap and heap[0][0] <= now:
            at, _, dialog_id = heapq.heappop(heap)
            if at in self._instants(dialog_id):
                due[dialog_id] = None
        t1, t2 = self.config.timers.t1, self.config.timers.t2
        for dialog_id in due:
            pending = self._pending_acks.get(dialog_id)
            if pending is None:
                continue
            was = pending.next_at
            while dialog_id in self._pending_acks and pending.next_at <= now:
                if pending.next_at >= pending.started + 64 * t1:
                    # §13.3.1.4: no ACK within 64*T1: confirmed, but ended with BYE.
                    del self._pending_acks[dialog_id]
                    dialog = self._dialogs.get(dialog_id)
                    if dialog is not None:
                        out += self._bye(dialog, now, "ack-timeout")
                    break
                out.append(SendResponse(pending.key, pending.response, retransmission=True))
                pending.interval = min(2 * pending.interval, t2)
                pending.next_at = min(pending.next_at + pending.interval,
                                      pending.started + 64 * t1)
            if self._pending_acks.get(dialog_id) is pending and pending.next_at != was:
                self._schedule(dialog_id, pending.next_at)
        for dialog_id in due:
            timers = self._timers.get(dialog_id)
            if timers is None:
                continue
            dialog = self._dialogs.get(dialog_id)
            if dialog is None or dialog.state is DialogState.TERMINATED:
                self._timers.pop(dialog_id, None)
                continue
            if timers.glare_at is not None and timers.glare_at <= now:
                tx = timers.glare_request
                timers.glare_at, timers.glare_request = None, None
                busy = self._reinvite_open(dialog_id)
                if tx is not None and not busy:
                    headers = [(n, v) for n, v in tx.request.headers if n in (
                        "Content-Type", "Session-Expires")]
                    out += self.request(dialog_id, "INVITE", now, headers=headers,
                                        body=tx.request.body)[1]
            if timers.refresh_at is not None and timers.refresh_at <= now:
                timers.refresh_at = None
                out += self._refresh(dialog, now)
            if (timers.expires_at is not None and timers.expires_at <= now
                    and dialog.state is DialogState.CONFIRMED):
                timers.expires_at = None
                out += self._bye(dialog, now, "session-expired")
        for dialog_id in due:
            # A due instant that did not fire (a session expiry outside CONFIRMED) stays set,
            # and stays due, as it was taken off the heap above.
            for at in self._instants(dialog_id):
                if at <= now:
                    self._schedule(dialog_id, at)
        return out

    def _refresh(self, dialog: Dialog, now: float) -> list[Output]:
        # RFC 4028 §7.4: UPDATE without a body when the peer allows it, else a re-INVITE
        # re-offering the same description.
        if dialog.state is not DialogState.CONFIRMED or dialog.session is None:
            return []
        headers = [("Session-Expires", f"{dialog.session.interval};refresher=uac")]
        if "UPDATE" in dialog.peer_allows:
            return self.request(dialog.id, "UPDATE", now, headers=headers)[1]
        if self._reinvite_open(dialog.id):
            # A re-INVITE is in progress (it refreshes too if it succeeds); look again soon.
            self._timers.setdefault(dialog.id, _Timers()).refresh_at = now + self.config.timers.t2
            self._schedule(dialog.id, now + self.config.timers.t2)
            return []
        return self.request(dialog.id, "INVITE", now, headers=headers,
                            body=dialog.local_sdp)[1]

    def _bye(self, dialog: Dialog, now: float, reason: str) -> list[Output]:
        return self._request(dialog.id, "BYE", (), b"", reason)[1]

    # -- internals ---------------------------------------------------------------------------

    def _terminate(self, dialog: Dialog, reason: str, status: int | None = None) -> list[Output]:
        if dialog.state is DialogState.TERMINATED:
            return []
        dialog.state = DialogState.TERMINATED
        dialog.end_reason = reason
        self._pending_acks.pop(dialog.id, None)
        self._timers.pop(dialog.id, None)
        # Terminated dialogs are forgotten; a late request for one gets 481 (§12.2.2).
        del self._dialogs[dialog.id]
        self._ended.append(dialog)
        return [DialogTerminated(dialog.id, reason, status)]

    def _terminate_id(self, dialog_id: DialogId, reason: str,
                      status: int | None = None) -> list[Output]:
        dialog = self._dialogs.get(dialog_id)
        return [] if dialog is None else self._terminate(dialog, reason, status)

    def ended(self) -> list[Dialog]:
        """Recently ended dialogs (the last 1024), oldest first, with ``end_reason``."""
        return list(self._ended)
