"""The SIP side of the appliance: transports + transaction layer + the request pipeline.

Pipeline for every received request (RFC 3261 §8.2, §17.2, §18.2):

1. framing/parse error -> 400 (or the codec's status), or dropped when no answer can be built;
2. ``guard.admit`` -> requests it drops get no response at all;
3. the transaction layer: retransmissions are absorbed (the last response is re-sent);
4. ``check_request`` (§8.2 checks; Max-Forwards 0 -> 483);
5. method dispatch: REGISTER -> registrar; OPTIONS -> 200 with Allow/Accept/Supported;
   INVITE -> digest challenge, then 480 until call control exists; ACK absorbed;
   CANCEL -> 200 (+487 on the INVITE) when it matches, else 481; BYE -> 481;
   known-but-unsupported -> 405 with Allow; unknown -> 501.

Responses received from the wire are matched to client transactions or dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from appliance.sip.guard import GuardVerdict
from appliance.sip.source import Source
from appliance.sip.transaction import (
    DEFAULT_MAX_TRANSACTIONS,
    AckReceived,
    Event,
    RequestReceived,
    ResponseReceived,
    State,
    StrayResponse,
    TimerConfig,
    TransactionKey,
    TransactionLayer,
    TransactionTableFull,
    TransactionTerminated,
    TransactionTimeout,
    Transmit,
    TransportFailed,
    server_key,
)
from appliance.sip.transport import (
    DEFAULT_PORTS,
    STREAM_TRANSPORTS,
    UDP_BUFFER_BYTES,
    SipTransports,
    response_destination,
    server_ssl_context,
    stamp_via,
)
from media_core.sip import (
    Limits,
    RemoteProtocolError,
    SipMessage,
    build_response,
    check_request,
    new_tag,
    parse_message,
)

__all__ = ["ALLOW", "SipService", "error_response_bytes"]

log = logging.getLogger("edgecc.sip.service")

ALLOW = ("INVITE", "ACK", "CANCEL", "BYE", "OPTIONS", "REGISTER")
"""Methods this endpoint implements (the Allow header, RFC 3261 §20.5)."""
ACCEPT = ("application/sdp",)
SUPPORTED: frozenset[str] = frozenset()
"""Option tags we implement (RFC 3261 §19.2); none yet."""
DIALOG_METHODS = frozenset({"INVITE", "ACK", "CANCEL", "BYE", "UPDATE", "INFO", "REFER", "NOTIFY"})
"""Methods handed to ``on_dialog_request`` when call control is attached."""
_TAKEN = object()  # ``_answer``: the dialog hook took the request and answers it itself
HOUSEKEEPING_PERIOD = 10.0
"""Seconds between prunes of the guard's tables and the registrar's expired bindings."""
TIMER_GRANULARITY = 0.005
"""Transaction timers are served on a 5 ms grid: under load thousands of timer J deadlines
fall due each second, and one wake-up serves all those of its slot. The layer keeps its
schedule exact regardless (it reschedules from each deadline, RFC 3261 §17)."""

_HEADER_NAMES = {
    "via": "Via", "v": "Via", "from": "From", "f": "From", "to": "To", "t": "To",
    "call-id": "Call-ID", "i": "Call-ID", "cseq": "CSeq",
}
_REQUEST_LINE = re.compile(r"^[A-Za-z0-9.!%*_+`'~-]+ \S+ \S+$")


def error_response_bytes(data: bytes, status: int, reason: str,
                         headers: Iterable[tuple[str, str]] = ()) -> bytes | None:
    """A stateless error response for a request that could not be parsed, or None.

    RFC 3261 §8.2: a 400 carries the request's Via, From, To, Call-ID and CSeq. They are
    scraped leniently from the raw bytes; without a Via or a request line there is no one to
    answer (and never an answer to a response).
    """
    head = data[:65536].replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    lines = head.decode("utf-8", "replace").split("\n")
    first = lines[0].strip() if lines else ""
    if not _REQUEST_LINE.match(first) or first.startswith(("SIP/", "ACK ")):
        return None  # never answer a response or an ACK (RFC 3261 §17.1.1.3)
    unfolded: list[str] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and unfolded:
            unfolded[-1] += " " + line.strip()
        elif line.strip():
            unfolded.append(line)
    copied: list[tuple[str, str]] = []
    for line in unfolded:
        name, sep, value = line.partition(":")
        canonical = _HEADER_NAMES.get(name.strip().lower())
        if sep and canonical and value.strip() and "\r" not in value:
            copied.append((canonical, value.strip()))
    if not any(name == "Via" for name, _ in copied):
        return None
    out = [f"SIP/2.0 {status} {_clean(reason)}"]
    for name, value in copied:
        if name == "To" and ";tag=" not in value.lower().replace(" ", ""):
            value += f";tag={new_tag()}"
        out.append(f"{name}: {value}")
    out += [f"{_clean(n)}: {_clean(v)}" for n, v in headers]
    out += ["Content-Length: 0", "", ""]
    return "\r\n".join(out).encode("utf-8", "replace")


def _clean(text: str) -> str:
    return re.sub(r"[\r\n\0]+", " ", str(text)).strip()


class SipService:
    """The SIP side of the appliance, built by the composition root."""

    def __init__(
        self,
        config: Any,
        *,
        registrar: Any,
        guard: Any,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = 300.0,
        max_connections: int = 4096,
        max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
        udp_buffer_bytes: int = UDP_BUFFER_BYTES,
    ) -> None:
        sip = config.sip
        self.config = config
        self.registrar = registrar
        self.guard = guard
        self.clock = clock
        self.limits = Limits(
            max_message_bytes=sip.limits.max_message_bytes,
            max_headers=sip.limits.max_headers,
            max_vias=sip.limits.max_vias,
            max_line_bytes=sip.limits.max_line_bytes,
        )
        self.timers = TimerConfig(t1=sip.timers.t1, t2=sip.timers.t2, t4=sip.timers.t4)
        self.layer = TransactionLayer(self.timers, max_transactions=max_transactions)
        self.transports = SipTransports(
            on_message=self._on_message,
            on_malformed=self._on_malformed,
            on_send_failed=self._on_send_failed,
            limits=self.limits,
            stream_buffer_bytes=sip.limits.stream_buffer_bytes,
            idle_timeout=idle_timeout,
            max_connections=max_connections,
            clock=clock,
            udp_buffer_bytes=udp_buffer_bytes,
        )
        self.stats: dict[str, int] = {
            "requests": 0, "responses": 0, "malformed": 0, "dropped": 0, "retransmissions": 0,
        }
        self.on_transaction_event: Callable[[Event], None] | None = None
        """Hook for the future call-control layer: client-side events go here."""
        self.on_dialog_request: (
            Callable[[TransactionKey | None, SipMessage, Source], bool] | None) = None
        """Call control (``appliance.calls.DialogSignalling``): gets INVITE, ACK, CANCEL, BYE,
        UPDATE, INFO, REFER and NOTIFY after the §8.2 checks (key None: an ACK for a 2xx) and
        answers through ``respond``; returns False to leave the request to the service."""
        self.allow: tuple[str, ...] = ALLOW
        """Allow header and the §8.2 method check; call control adds its methods."""
        self.supported: frozenset[str] = SUPPORTED
        """Option tags for the Require check and Supported; call control adds its own."""
        self._timer: asyncio.TimerHandle | None = None
        self._housekeeping: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._sent_by: dict[TransactionKey, Source] = {}
        self._client_hooks: dict[TransactionKey, Callable[[Event], None]] = {}
        self._closed = False

    @property
    def addresses(self) -> dict[str, tuple[str, int]]:
        """``{"UDP": (host, port), "TCP": ..., "TLS": ...}`` as actually bound."""
        return dict(self.transports.addresses)

    @classmethod
    async def start(
        cls,
        config: Any,
        *,
        registrar: Any,
        guard: Any,
        clock: Callable[[], float] = time.monotonic,
        idle_timeout: float = 300.0,
        max_connections: int = 4096,
        max_transactions: int = DEFAULT_MAX_TRANSACTIONS,
        udp_buffer_bytes: int = UDP_BUFFER_BYTES,
    ) -> SipService:
        """Bind the listeners of ``config.sip`` and start answering."""
        service = cls(config, registrar=registrar, guard=guard, clock=clock,
                      idle_timeout=idle_timeout, max_connections=max_connections,
                      max_transactions=max_transactions, udp_buffer_bytes=udp_buffer_bytes)
        sip = config.sip
        context = None
        if sip.tls_port is not None:
            context = server_ssl_context(sip.tls.cert, sip.tls.key)
        await service.transports.start(
            sip.bind, udp_port=sip.udp_port, tcp_port=sip.tcp_port,
            tls_port=sip.tls_port, ssl_context=context,
        )
        service._schedule_housekeeping()
        return service

    async def close(self) -> None:
        """Stop listening, close connections, drop pending timers."""
        self._closed = True
        for handle in (self._timer, self._housekeeping):
            if handle is not None:
                handle.cancel()
        self._timer = self._housekeeping = None
        await self.transports.close()

    # -- sending (for call control) ----------------------------------------------------------

    def send_request(self, request: SipMessage, destination: Source, *,
                     on_event: Callable[[Event], None] | None = None) -> TransactionKey:
        """Open a client transaction; its events go to ``on_event`` when given (until it
        terminates), else to ``on_transaction_event``."""
        key, events = self.layer.send_request(request, destination, self.clock())
        if on_event is not None:
            self._client_hooks[key] = on_event
        self._run(events)
        return key

    def respond(self, key: TransactionKey, response: SipMessage) -> None:
        """Send a response through the server transaction ``key``."""
        self._run(self.layer.respond(key, response, self.clock()))

    # -- receiving ---------------------------------------------------------------------------

    def _on_message(self, message: SipMessage, source: Source) -> None:
        now = self.clock()
        try:
            if not message.is_request:
                self.stats["responses"] += 1
                self._run(self.layer.receive_response(message, source, now))
                return
            self.stats["requests"] += 1
            self._on_request(message, source, now)
        except RemoteProtocolError as exc:
            # A header the transaction layer needs (Via, CSeq, From/To tag) is malformed.
            self._on_malformed(message.to_bytes(), exc, source)
        except Exception:
            # A bug must not take the endpoint down; the peer will retransmit or time out.
            log.exception("event=sip_internal_error source=%s:%d", source.host, source.port)

    def _on_request(self, request: SipMessage, source: Source, now: float) -> None:
        if self._refused_by_guard(request, source, now):
            return
        if request.method == "REGISTER" and source.transport == "UDP":
            # The registration storm's path: a new REGISTER over UDP is answered at once, so
            # its server transaction goes straight to Completed (RFC 3261 §17.2.2) without a
            # machine or event list; retransmissions and a full table take the general path.
            key = server_key(request)
            layer = self.layer
            if key not in layer and len(layer) < layer.max_transactions:
                self._register_at_once(key, request, source, now)
                return
        try:
            events = self.layer.receive_request(
                request, source, now, reply_to=response_destination(request, source)
            )
        except TransactionTableFull:
            log.warning("event=sip_overload source=%s:%d", source.host, source.port)
            response = None
            if request.method != "ACK":
                response = self._error_response(request, 503, "Service Unavailable",
                                                [("Retry-After", "5")])
            if response is not None:
                self.transports.send(response.to_bytes(), response_destination(request, source))
            return
        if not events or not isinstance(events[0], RequestReceived):
            self.stats["retransmissions"] += 1
        self._run(events)

    def _refused_by_guard(self, request: SipMessage, source: Source, now: float) -> bool:
        if self.guard is None:
            return False
        if self.guard.admit(request, source, now) is GuardVerdict.ALLOW:
            return False
        self.stats["dropped"] += 1
        return True

    def _on_malformed(self, data: bytes, error: RemoteProtocolError, source: Source) -> None:
        try:
            self._answer_malformed(data, error, source)
        except Exception:
            log.exception("event=sip_internal_error where=malformed source=%s:%d",
                          source.host, source.port)

    def _answer_malformed(self, data: bytes, error: RemoteProtocolError, source: Source) -> None:
        self.stats["malformed"] += 1
        log.info("event=sip_malformed source=%s:%d transport=%s status=%d reason=%s",
                 source.host, source.port, source.transport, error.status,
                 error.reason.replace(" ", "_"))
        if error.droppable:
            return
        banned = getattr(self.guard, "is_banned", None)
        if banned is not None and banned(source.host, self.clock()):
            return
        answer = None
        partial = getattr(error, "message", None)  # what the codec could read of it
        if partial is not None and partial.is_request and partial.method != "ACK":
            try:
                stamp_via(partial, source)  # RFC 3581 applies to error answers too
                answer = build_response(partial, error.status, error.reason,
                                        headers=error.headers, to_tag=new_tag()).to_bytes()
            except Exception:  # the headers a response copies are themselves broken
                answer = None
        if answer is None:
            answer = error_response_bytes(data, error.status, error.reason, error.headers)
        if answer is not None:
            self.transports.send(answer, source)

    def _on_send_failed(self, destination: Source, exc: BaseException) -> None:
        now = self.clock()
        for key, dest in list(self._sent_by.items()):
            if dest == destination:
                self._run(self.layer.transport_error(key, now))

    # -- events ------------------------------------------------------------------------------

    def _run(self, events: list[Event]) -> None:
        pending = list(events)
        pending.reverse()  # popped from the end; events a dispatch adds go on in order
        while pending:
            event = pending.pop()
            kind = type(event)
            if kind is Transmit:
                destination = event.destination
                if destination.transport in STREAM_TRANSPORTS:
                    destination = self._stream_destination(event)
                    if event.key is not None:
                        self._sent_by[event.key] = destination
                self.transports.send(event.data, destination)
            elif kind is TransactionTerminated:
                if self._sent_by:
                    self._sent_by.pop(event.key, None)
                self._notify(event)
            elif isinstance(event, RequestReceived):
                if event.key is None:
                    # ACK for a 2xx outside any transaction: end to end, for the dialogs.
                    hook = self.on_dialog_request
                    if hook is None or not hook(None, event.request, event.source):
                        log.debug("event=sip_ack_absorbed call_id=%s",
                                  event.request.get("Call-ID"))
                    continue
                pending.extend(reversed(self._dispatch(event.key, event.request, event.source)))
            elif isinstance(event, StrayResponse):
                log.debug("event=sip_stray_response status=%s source=%s:%d",
                          event.response.status, event.source.host, event.source.port)
            elif isinstance(event, TransactionTimeout | TransportFailed):
                log.info("event=sip_transaction_failed kind=%s method=%s",
                         type(event).__name__, event.key.method)
                self._sent_by.pop(event.key, None)
                self._notify(event)
            elif isinstance(event, ResponseReceived | AckReceived):
                self._notify(event)
            else:  # TransactionTerminated
                self._sent_by.pop(event.key, None)
                self._notify(event)
        self._reschedule()

    def _stream_destination(self, event: Transmit) -> Source:
        destination = event.destination
        key = event.key
        if (destination.transport not in STREAM_TRANSPORTS or key is None or not key.server
                or self.transports.has_connection(destination)):
            return destination
        # RFC 3261 §18.2.2: the request's connection is gone; open one to the source address
        # and the sent-by port instead.
        if key.branch:
            port_text = key.sent_by.rpartition(":")[2]
        else:  # RFC 2543 key: the sent-by is inside the Via it keeps
            tx = self.layer.get(key)
            via = tx.request.top_via if tx is not None and tx.request is not None else None
            port_text = str(via.port) if via is not None and via.port else ""
        port = int(port_text) if port_text.isdigit() else DEFAULT_PORTS[destination.transport]
        return Source(destination.transport, destination.host, port)

    def _notify(self, event: Event) -> None:
        hooks = self._client_hooks
        hook = hooks.get(event.key) if hooks else None
        if hook is None:
            if self.on_transaction_event is not None:
                self.on_transaction_event(event)
            return
        if type(event) is TransactionTerminated:
            del hooks[event.key]
        try:
            hook(event)
        except Exception:  # the owner's bug must not stop the SIP service
            log.exception("event=sip_internal_error where=client_hook method=%s",
                          event.key.method)

    def _register_at_once(self, key: TransactionKey, request: SipMessage, source: Source,
                          now: float) -> None:
        # Same answer as ``_dispatch`` gives; the layer files the response bytes for timer J.
        response = self._build_answer(key, request, source, now)
        if response is None:
            self._run([TransactionTerminated(key)])  # what ``layer.abandon`` reports
            return
        data = response.to_bytes()
        destination = response_destination(request, source)
        self.layer.answer_at_once(key, data, destination, now)
        self.transports.send(data, destination)
        self._reschedule()

    def _dispatch(self, key: TransactionKey, request: SipMessage, source: Source) -> list[Event]:
        now = self.clock()
        response = self._build_answer(key, request, source, now)
        if response is _TAKEN:
            return []  # call control answers through respond()
        if response is None:
            return self.layer.abandon(key)
        return self.layer.respond(key, response, now)

    def _build_answer(self, key: TransactionKey, request: SipMessage, source: Source,
                      now: float) -> Any:
        """The response to ``request``, ``_TAKEN`` (call control answers), or None."""
        try:
            response = self._answer(key, request, source, now)
            if response is _TAKEN:
                return response
        except RemoteProtocolError as exc:
            response = self._error_response(request, exc.status, exc.reason, exc.headers)
        except Exception:
            # Log fields are read with ``get``: a broken header must not stop the answer.
            log.exception("event=sip_internal_error method=%s call_id=%s",
                          request.method, request.get("Call-ID"))
            response = self._error_response(request, 500, "Server Internal Error", ())
        if response is None:
            # Nothing can be built to answer with: end the transaction rather than leave it
            # open (an INVITE server transaction has no timer of its own in Proceeding).
            log.info("event=sip_unanswerable method=%s call_id=%s source=%s:%d",
                     request.method, request.get("Call-ID"), source.host, source.port)
            return None
        if log.isEnabledFor(logging.DEBUG):
            log.debug("event=sip_response method=%s status=%d call_id=%s source=%s:%d",
                      request.method, response.status, request.get("Call-ID"), source.host,
                      source.port)
        return response

    @staticmethod
    def _error_response(request: SipMessage, status: int, reason: str,
                        headers: Iterable[tuple[str, str]]) -> SipMessage | None:
        try:
            return build_response(request, status, reason, headers=headers, to_tag=new_tag())
        except Exception:  # a header the response copies is broken: copy it as text
            raw = error_response_bytes(request.to_bytes(), status, reason, headers)
        if raw is None:
            return None
        try:
            return parse_message(raw)
        except RemoteProtocolError:
            return None

    def _answer(self, key: TransactionKey, request: SipMessage, source: Source,
                now: float) -> Any:
        method = request.method
        # §8.2: header checks, then 405 (a method SIP defines) / 501 (unknown), 483, 420, 415.
        check_request(request, supported=self.supported, accept=ACCEPT, allow=self.allow)
        hook = self.on_dialog_request
        if hook is not None and method in DIALOG_METHODS and hook(key, request, source):
            return _TAKEN
        if method == "REGISTER":
            return self.registrar.handle_register(request, source, now)
        if method == "OPTIONS":
            return build_response(request, 200, headers=[
                ("Allow", ", ".join(self.allow)),
                ("Accept", ", ".join(ACCEPT)),
                ("Supported", ", ".join(sorted(self.supported))),
            ], to_tag=new_tag())
        if method == "INVITE":
            return self._invite(request, source, now)
        if method == "CANCEL":
            return self._cancel(request, now)
        return build_response(request, 481, to_tag=new_tag())  # BYE: no dialogs yet

    def _invite(self, request: SipMessage, source: Source, now: float) -> SipMessage:
        auth = self.registrar.auth
        result = auth.verify(request, now)
        if not result.ok:
            if getattr(result, "attempted", False) and self.guard is not None:
                self.guard.auth_failed(source, now)
            return build_response(request, 401, headers=auth.challenge(
                request, now, stale=result.stale), to_tag=new_tag())
        if self.guard is not None:
            self.guard.auth_succeeded(source, now)
        # Call control is not wired yet: the caller is told the callee is unavailable.
        return build_response(request, 480, to_tag=new_tag())

    def _cancel(self, cancel: SipMessage, now: float) -> SipMessage:
        invite_key = self.layer.find_invite(cancel)
        if invite_key is None:
            return build_response(cancel, 481, to_tag=new_tag())
        tx = self.layer.get(invite_key)
        if tx is not None and tx.state is State.PROCEEDING:
            # RFC 3261 §9.2: the INVITE ends with 487 and the CANCEL gets 200.
            self._run(self.layer.respond(
                invite_key, build_response(tx.request, 487, to_tag=new_tag()), now))
        return build_response(cancel, 200, to_tag=new_tag())

    # -- timers ------------------------------------------------------------------------------

    def _reschedule(self) -> None:
        if self._closed:
            return
        deadline = self.layer.next_timer()
        if deadline is None:
            return  # a wake-up already armed finds nothing due and is not renewed
        # Wake at the end of the deadline's slot of the timer grid.
        wake = math.ceil(deadline / TIMER_GRANULARITY) * TIMER_GRANULARITY
        if self._timer_at is not None and self._timer_at <= wake:
            return  # an earlier (or the same) wake-up is armed; it reschedules after itself
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        delay = max(0.0, wake - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._run(self.layer.handle_timer(self.clock()))
        except Exception:
            log.exception("event=sip_internal_error where=timer")
            self._reschedule()

    def _schedule_housekeeping(self) -> None:
        if not self._closed:
            self._housekeeping = asyncio.get_running_loop().call_later(
                HOUSEKEEPING_PERIOD, self._on_housekeeping)

    def _on_housekeeping(self) -> None:
        # Guard tables and expired bindings are pruned here, off the per-request path.
        now = self.clock()
        try:
            prune = getattr(self.guard, "prune", None)
            if prune is not None:
                prune(now)
            due = getattr(self.registrar, "next_timer", None)
            if due is not None and (due() or 0.0) <= now:
                self.registrar.handle_timer(now)
        except Exception:
            log.exception("event=sip_internal_error where=housekeeping")
        self._schedule_housekeeping()
