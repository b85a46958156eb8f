"""Call control: call legs (``appliance.calls.leg``) and the signalling adapter.

``DialogSignalling`` binds the sans-IO ``appliance.sip.dialog.DialogLayer`` to a running
``SipService``: it takes the dialog requests the service hands it (``on_dialog_request``), the
client-side transaction events (``on_transaction_event``), carries out the layer's outputs
through the service (``respond``, ``send_request``, the transports for end-to-end ACKs), arms
the layer's timer on the event loop, and passes every call-control event to ``on_event``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from appliance.sip.dialog import (
    ALLOW,
    DIALOG_METHODS,
    SUPPORTED,
    DialogConfig,
    DialogId,
    DialogLayer,
    Output,
    SendAck,
    SendRequest,
    SendResponse,
)
from appliance.sip.service import TIMER_GRANULARITY
from appliance.sip.source import Source
from appliance.sip.transaction import (
    AckReceived,
    Event,
    ResponseReceived,
    TimerConfig,
    TransactionKey,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailed,
)
from media_core.sip import RemoteProtocolError, SipMessage

__all__ = ["Admission", "CallControlError", "DialogSignalling"]

log = logging.getLogger("edgecc.calls")


class CallControlError(Exception):
    """An API request call control cannot carry out; nothing was changed.

    ``status`` follows HTTP: 404 unknown call or agent, 409 not possible in the call's current
    state, 403 refused by a dial rule, 400 a bad argument.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status} {message}")
        self.status = status
        """The HTTP-style status."""
        self.message = message
        """What went wrong, for the person who asked."""

Admission = Callable[[SipMessage, Source, float], SipMessage | None]
"""Checks a new INVITE before it becomes a call: a response (401 challenge, 403) refuses it."""


class DialogSignalling:
    """The dialog layer wired to a running ``SipService`` (the asyncio adapter)."""

    def __init__(self, service: Any, layer: DialogLayer, *,
                 on_event: Callable[[Output], None],
                 admit: Admission | None = None) -> None:
        self.service = service
        self.layer = layer
        self.on_event = on_event
        self.admit = admit
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._reply_to: dict[TransactionKey, Source] = {}
        self._closed = False

    @classmethod
    def attach(cls, service: Any, *, on_event: Callable[[Output], None],
               admit: Admission | None = None, contact_user: str = "edgecc",
               transport: str = "UDP", **config: Any) -> DialogSignalling:
        """Build a layer for ``service`` (Contact on its ``transport`` address) and hook it in.

        Needs ``service.on_dialog_request`` (the service's dialog hook); sets ``allow`` and
        ``supported`` on the service so UPDATE, INFO, REFER and NOTIFY pass its §8.2 checks.
        """
        host, port = service.addresses[transport]
        host_text = f"[{host}]" if ":" in host else host
        suffix = "" if transport == "UDP" else f";transport={transport.lower()}"
        timers = getattr(service, "timers", None) or TimerConfig()
        layer = DialogLayer(DialogConfig(
            contact=f"sip:{contact_user}@{host_text}:{port}{suffix}",
            sent_by=dict(service.addresses), timers=timers, **config))
        signalling = cls(service, layer, on_event=on_event, admit=admit)
        service.on_dialog_request = signalling.handle_request
        service.on_transaction_event = signalling.handle_transaction_event
        service.allow = tuple(dict.fromkeys((*getattr(service, "allow", ()), *ALLOW)))
        service.supported = frozenset(getattr(service, "supported", frozenset())) | set(
            SUPPORTED)
        return signalling

    def close(self) -> None:
        """Stop the timer; the service keeps running without dialogs."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- hooks the service calls --------------------------------------------------------------

    def handle_request(self, key: TransactionKey | None, request: SipMessage,
                       source: Source) -> bool:
        """The service's ``on_dialog_request``: True when the request was taken."""
        if request.method not in DIALOG_METHODS:
            return False
        now = self.service.clock()
        if key is not None:
            tx = self.service.layer.get(key)
            if tx is not None:
                self._reply_to[key] = tx.peer
        if (self.admit is not None and key is not None and request.method == "INVITE"
                and not request.to.tag):
            refusal = self.admit(request, source, now)
            if refusal is not None:
                self._execute([SendResponse(key, refusal)])
                return True
        self._execute(self.layer.receive_request(key, request, source, now))
        return True

    def handle_transaction_event(self, event: Event) -> None:
        """The service's ``on_transaction_event``."""
        now = self.service.clock()
        if isinstance(event, ResponseReceived):
            try:
                outputs = self.layer.receive_response(event.key, event.response, now)
            except RemoteProtocolError as exc:
                log.info("event=dialog_bad_response status=%s call_id=%s reason=%s",
                         event.response.status, event.response.get("Call-ID"),
                         exc.reason.replace(" ", "_"))
                return
        elif isinstance(event, AckReceived):
            # An ACK that reused the INVITE's branch (RFC 2543 style): same end-to-end path.
            outputs = self.layer.receive_request(None, event.request, Source("UDP", "", 0), now)
        elif isinstance(event, TransactionTimeout | TransportFailed):
            outputs = self.layer.transaction_failed(event.key, now)
        elif isinstance(event, TransactionTerminated):
            self._reply_to.pop(event.key, None)
            self.layer.transaction_ended(event.key)
            outputs = []
        else:
            return
        self._execute(outputs)

    # -- call control's side ------------------------------------------------------------------

    def answer(self, key: TransactionKey, status: int, *, reason: str | None = None,
               headers: Iterable[tuple[str, str]] = (), body: bytes = b"") -> None:
        """Answer an ``IncomingCall`` / ``InDialogRequest``."""
        self._execute(self.layer.answer(key, status, self.service.clock(), reason=reason,
                                        headers=headers, body=body))

    def invite(self, **kwargs: Any) -> TransactionKey:
        """Send an initial INVITE (``DialogLayer.invite`` arguments)."""
        key, outputs = self.layer.invite(self.service.clock(), **kwargs)
        self._execute(outputs)
        return key

    def request(self, dialog_id: DialogId, method: str, **kwargs: Any) -> TransactionKey:
        """Send a request within a dialog."""
        key, outputs = self.layer.request(dialog_id, method, self.service.clock(), **kwargs)
        self._execute(outputs)
        return key

    def hangup(self, dialog_id: DialogId) -> None:
        """BYE (held back until the ACK of our 2xx, §15)."""
        self._execute(self.layer.hangup(dialog_id, self.service.clock()))

    def cancel(self, key: TransactionKey) -> None:
        """CANCEL our INVITE."""
        self._execute(self.layer.cancel(key, self.service.clock()))

    # -- carrying out ------------------------------------------------------------------------

    def _execute(self, outputs: list[Output]) -> None:
        for output in outputs:
            try:
                self._carry_out(output)
            except Exception:
                # One failed send must not stop the others (or the service).
                log.exception("event=dialog_output_failed output=%s", type(output).__name__)
        self._reschedule()

    def _carry_out(self, output: Output) -> None:
        service = self.service
        if isinstance(output, SendResponse):
            if output.key in service.layer:
                service.respond(output.key, output.response)
            elif output.retransmission and output.key in self._reply_to:
                # The INVITE transaction has gone (timer L): the 2xx goes straight out.
                service.transports.send(output.response.to_bytes(), self._reply_to[output.key])
            else:
                log.info("event=dialog_response_dropped status=%s call_id=%s",
                         output.response.status, output.response.get("Call-ID"))
        elif isinstance(output, SendRequest):
            service.send_request(output.request, output.destination)
        elif isinstance(output, SendAck):
            service.transports.send(output.request.to_bytes(), output.destination)
        else:
            self.on_event(output)

    def _reschedule(self) -> None:
        if self._closed:
            return
        deadline = self.layer.next_timer()
        if deadline is None:
            return  # a wake-up already armed finds nothing due and is not renewed
        # Wake at the end of the deadline's slot of the SIP service's timer grid, so that a
        # deadline moving by microseconds (every new dialog) does not re-arm the loop's timer.
        wake = math.ceil(deadline / TIMER_GRANULARITY) * TIMER_GRANULARITY
        if self._timer_at is not None and self._timer_at <= wake:
            return  # an earlier (or the same) wake-up is armed; it reschedules after itself
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = wake
        delay = max(0.0, wake - self.service.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self._execute(self.layer.handle_timer(self.service.clock()))
        except Exception:
            log.exception("event=dialog_internal_error where=timer")
            self._reschedule()
