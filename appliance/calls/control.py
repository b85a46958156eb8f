"""Call control: the B2BUA that takes a trunk call through the IVR and a queue to an agent.

One ``Call`` per trunk INVITE. The inbound (caller) leg is answered with early media (183 with
our SDP answer, RFC 3261 §13.3.1.1, RFC 3264) so the IVR can play prompts and hear digits while
the call is not yet answered; it is answered (200, the same answer) only when an agent answers,
so a caller who gives up while the agent's phone rings sends CANCEL and the agent leg is
cancelled too. The path:

    INVITE from a trunk source -> DID -> flow (404 if none) -> SDP answer (488 if no common
    codec) with an engine leg -> 183 -> IVR (prompts by the engine, digits from its events)
    -> RouteToQueue -> ACD router CallerJoin -> Offer -> INVITE to the agent's registered
    contact (a second engine leg) -> 2xx -> bridge, 200 to the caller, recording per queue
    -> BYE on either side ends both legs -> call record + queue events + call.record in one
    transaction.

The leg states are ``appliance.calls.leg`` tables; signalling goes through
``appliance.calls.DialogSignalling``; routing decisions come from ``appliance.acd``. This module
is an asyncio adapter: it reads clocks (wall time for records and the IVR's schedules, the
monotonic clock for the router) and arms timers. Database and recording-store work runs on one
writer thread (``appliance.dbwriter``: group commit, each job a savepoint), never on the event
loop; a call's record is durable once its job's future resolved.

Agents log in, pause and log out through the agent desk (``appliance.acd.desk``: feature codes
and the API); a logged-in agent whose phone holds no registration is not offered calls.

``CallControl`` is split by subject: outbound calls (``outbound``), transfers (``transfer``)
and supervision (``supervision``) are its parts; ``Call`` and ``AgentLeg`` are in ``model``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import glob
import ipaddress
import json
import logging
import math
import os
import random
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import sqlite_utils

from appliance import audit as audit_chain
from appliance import eventlog
from appliance.acd import model as acd
from appliance.calls import CallControlError, DialogSignalling
from appliance.calls.callbacks import QueuedCallbacks
from appliance.calls.leg import (
    Direction,
    EndReason,
    Leg,
    LegAction,
    LegInput,
    LegState,
    Party,
    is_hold_offer,
    response_input,
)
from appliance.calls.model import (
    CAPABILITIES,
    MAX_CALLS,
    SDP_HEADERS,
    AgentLeg,
    Call,
    destination,
    recording_decision,
)
from appliance.calls.outbound import OutboundCalls
from appliance.calls.supervision import Supervision
from appliance.calls.transfer import Transfers
from appliance.calls.voicemail import VoicemailTaking
from appliance.config import SiteConfig
from appliance.dbwriter import DatabaseWriter, WriterError
from appliance.ivr import runner as ivr
from appliance.ivr.flow import Flow
from appliance.ivr.lookup import CrmLookup, listed_customer
from appliance.log import kv
from appliance.sip.dialog import (
    AckReceived,
    CallCancelled,
    DialogId,
    DialogTerminated,
    IncomingCall,
    InDialogRequest,
    Output,
    RequestFailed,
    ResponseReceived,
)
from appliance.sip.source import Source
from appliance.sip.transaction import TransactionKey
from media_core import sdp
from media_core.engine import (
    DigitReceived,
    EngineError,
    MediaEngine,
    MediaEvent,
    MediaTimeout,
    PromptFinished,
    RecordingFinished,
)
from media_core.sip import SipMessage, build_response, new_tag

__all__ = ["AgentLeg", "Call", "CallControl", "CallControlError", "CallService",
           "EventCallback", "recording_decision", "start_call_control", "trunk_networks"]

log = logging.getLogger("edgecc.calls")

PRESENCE_PERIOD = 1.0
"""Seconds between checks of the agents' registrations (login = registered)."""
FINISH_GRACE = 40.0
"""Seconds after the caller's leg ended before a call is closed even if an agent leg has not
confirmed its end (64·T1 = 32 s bounds any SIP transaction)."""
STOP_RECORDS_TIMEOUT = 1.0
"""Seconds the appliance's stop gives to hanging up live calls and writing their records
(the whole stop has 1.5 s)."""
RELEASE_TIMEOUT = 3.0
"""Seconds to wait for the engine to confirm a leg release or a recording's end."""
UNREACHABLE_RETRY = 1.0
"""Seconds before the router hears that a logged-in agent's phone holds no registration."""
LIVE_FIRST = frozenset({"queue.enter", "queue.connect", "call.hold", "call.resume",
                        "call.transfer"})
"""Event-log kinds ``on_event`` hears when they happen (without ``seq``), not again when the
call's rows are written (at its end, in one transaction): the wallboard sees a caller wait and
an agent answer at once."""
_SHIPPED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts"
ANNOUNCE_PROMPTS = ("you_are_caller", "estimated_wait", "minute", "minutes",
                    *(f"digit_{d}" for d in range(10)))
"""Prompts of the position / estimated-wait announcement (shipped; a site's own replace them)."""
EventCallback = Callable[[str, dict[str, Any]], None]
"""``on_event(kind, payload)``: every event-log row of the call path (payload plus ``seq`` and
``at``) and the live-only topics (``call.offered``, ``call.ringing``, ``call.ended``, ...)."""


def trunk_networks(config: SiteConfig) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks whose INVITEs are carrier calls (``trunk.allowed_sources``)."""
    return tuple(ipaddress.ip_network(n) for n in config.trunk.allowed_sources)


class CallControl(QueuedCallbacks, VoicemailTaking, OutboundCalls, Transfers, Supervision):
    """The B2BUA: see the module docstring; its outbound calls, transfers and supervision are
    in ``outbound``, ``transfer`` and ``supervision``. Built and started by the composition root."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        engine: MediaEngine,
        registrar: Any,
        auth: Any,
        guard: Any,
        flows: Mapping[str, Flow],
        prompts: Mapping[str, np.ndarray],
        router: Any | None,
        db: sqlite_utils.Database,
        recordings: Any,
        media_host: str,
        scratch_dir: Path | None = None,
        on_event: EventCallback | None = None,
        desk: Any | None = None,
    ) -> None:
        self.config = config
        self.on_event = on_event
        self.desk = desk
        self.engine = engine
        self.registrar = registrar
        self.auth = auth
        self.guard = guard
        self.flows = dict(flows)
        self.crm = CrmLookup(max_concurrent=config.ivr.lookup_concurrency)
        self.prompts = dict(prompts)
        self.hold_music = self.prompts.get("hold_music")
        if self.hold_music is None:
            from media_core.prompt import load_prompt

            self.hold_music = load_prompt(_SHIPPED_PROMPTS / "hold_music.wav")
        if any(q.announce_every is not None for q in config.queues):
            from media_core.prompt import load_prompt

            for name in ANNOUNCE_PROMPTS:
                if name not in self.prompts:
                    self.prompts[name] = load_prompt(_SHIPPED_PROMPTS / f"{name}.wav")
        self.router = router
        self.db = db
        self.recordings = recordings
        self.media_host = media_host
        self.queues = {q.name: q for q in config.queues}
        self.members = sorted({m for q in config.queues for m in q.members})
        self.trunks = trunk_networks(config)
        self.signalling: DialogSignalling | None = None
        self.service: Any = None
        self.calls: dict[str, Call] = {}
        self._by_dialog: CallIndex[DialogId] = CallIndex()
        self._by_invite: CallIndex[TransactionKey] = CallIndex()
        """INVITE transaction -> (call, agent leg); its ``fresh`` calls are those an INVITE
        was sent or received for since ``_offer`` last looked."""
        self._by_media: dict[int, Call] = {}
        self._logged_in: set[str] = set()
        self._agent_invites: dict[str, tuple[str, Any]] = {}
        self._feature_invites: dict[str, tuple[str, Any]] = {}
        """Call-ID -> (agent, feature code) of feature codes applied, answered with a tone."""
        self._last_call: dict[str, str] = {}
        """Agent -> their last connected call (the one ``*74`` dispositions)."""
        self.feature_codes = _feature_codes(config)
        self._watchdog_task: asyncio.Task[None] | None = None
        """Call-ID -> (agent, dial decision) of agents' INVITEs admitted, until they arrive."""
        self._router_timer: asyncio.TimerHandle | None = None
        self._router_now = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events_task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self.writer = DatabaseWriter(db, name="calls")
        """Commits the calls' rows (traces, records, events, audit) in order and in groups, on
        its own thread: the only user of ``db`` (``appliance.dbwriter``)."""
        self._db_thread: concurrent.futures.Executor = self.writer
        """The writer as an executor (``loop.run_in_executor``, ``submit``) for the parts."""
        self._scratch_given = scratch_dir
        self._scratch: Path | None = scratch_dir
        self.completed = 0
        self.callbacks: dict[str, Any] = {}
        """Request id -> the pending queued callback (``callbacks.CallbackRequest``)."""
        self.callback_attempts: dict[str, Any] = {}
        """Attempt call id -> its ``callbacks.CallbackAttempt``, until the call is written."""
        self._late_offers: dict[DialogId, tuple[Call, AgentLeg | None, bool]] = {}
        """Dialog -> (call, its agent leg or None for the call's own leg, initial INVITE) for
        each 2xx we sent carrying our offer (late offer), until its ACK brings the answer."""
        self.voicemails: dict[str, Any] = {}
        """Call id -> the message being taken (``voicemail.VoicemailTake``)."""
        self._outside_told: dict[str, set[str]] = {}
        """Call id -> the agents the router has been told this call outside the queues busies
        (``OutsideCallStarted`` given, ``OutsideCallEnded`` not yet)."""

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, service: Any) -> DialogSignalling:
        """Hook into a running ``SipService`` through ``DialogSignalling``."""
        self.service = service
        self.signalling = DialogSignalling.attach(
            service, on_event=self.on_dialog_event, admit=self.admit,
            contact_user="edgecc")
        return self.signalling

    async def start(self) -> None:
        """Read the engine's events; with a desk, bring the router to the persisted presence
        and run the watchdog, else keep presence in step with registrations."""
        self._events_task = asyncio.create_task(self._read_media_events())
        # Calls the previous run left in progress (a crash): each gets its record now, with
        # the recording the crash cut short.
        now = time.time()
        await asyncio.get_running_loop().run_in_executor(
            self._db_thread, lambda: self._record_interrupted(now, self._recover_recordings()))
        if self.desk is not None:
            self.apply_router_inputs(self.desk.restore(time.time()))
            self._watchdog_task = asyncio.create_task(self._watchdog_loop())
        else:
            self._presence_task = asyncio.create_task(self._presence_loop())
        self._restore_callbacks()

    async def close(self) -> None:
        """Hang up the live calls and write their records (``appliance-stopped``), then stop
        reading events and timers."""
        try:
            await asyncio.wait_for(self._stop_live_calls(), STOP_RECORDS_TIMEOUT)
        except Exception as exc:  # the stop goes on: a missing record beats a stuck stop
            log.error(kv(event="stop_records_failed", error=repr(exc)))
        for task in (self._events_task, self._presence_task, self._watchdog_task,
                     *self._tasks):
            if task is not None:
                task.cancel()
        for call in self.calls.values():
            if call.ivr_timer is not None:
                call.ivr_timer.cancel()
            if call.finish_timer is not None:
                call.finish_timer.cancel()
        if self._router_timer is not None:
            self._router_timer.cancel()
        await self.crm.close()
        if self.signalling is not None:
            self.signalling.close()
        for call in self.calls.values():
            if call.recording is not None:
                with contextlib.suppress(EngineError, KeyError):
                    self.engine.record_stop(call.recording)
            if call.recording_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(call.recording_path)  # no plaintext audio left behind
        await asyncio.to_thread(self.writer.close)
        if self._scratch is not None and self._scratch_given is None:
            with contextlib.suppress(OSError):
                (self._scratch / SCRATCH_OWNER).unlink()
                self._scratch.rmdir()  # empty unless a call was cut off mid-recording

    async def _stop_live_calls(self) -> None:
        """BYE (or a final answer) to both sides of every live call, then its call record."""
        now = time.time()
        live = [c for c in self.calls.values() if not c.finishing]
        for call in live:
            call.finishing = True  # recorded here, not by the usual end of a call
            if call.ended_at is None:
                call.end_reason = "appliance-stopped"
            if call.direction == "feature":
                continue
            try:
                for agent_leg in list(call.agents.values()):
                    self._hangup_agent(call, agent_leg, EndReason.SYSTEM)
                self._hangup_caller(call, EndReason.SYSTEM)
            except Exception:
                log.exception(kv(event="stop_hangup_failed", call=call.call_id))
            call.ended_at = call.ended_at or now
        loop = asyncio.get_running_loop()
        for call in live:
            if call.direction == "feature":
                continue
            finished: RecordingFinished | None = None
            if call.recording is not None:
                with contextlib.suppress(TimeoutError, EngineError):
                    finished = await asyncio.wait_for(
                        self.engine.record_stop(call.recording), RELEASE_TIMEOUT / 3)
                call.recording = None
            _, written = await loop.run_in_executor(
                self._db_thread, self._write_record, call, finished)
            for kind, payload, at, seq in written:
                if kind not in LIVE_FIRST:
                    self._emit(kind, {**payload, "seq": seq}, at)
            self._emit("call.ended", {"call_id": call.call_id,
                                      "end_reason": call.end_reason}, now)
            log.info(kv(event="call_ended", call=call.call_id, reason=call.end_reason,
                        agent=call.agent or ""))
        if live:
            log.warning(kv(event="calls_stopped", calls=len(live)))

    # -- admission (before the dialog layer sees an INVITE) ------------------------------------

    def is_trunk(self, source: Source) -> bool:
        """True when ``source`` is in ``trunk.allowed_sources``."""
        try:
            address = ipaddress.ip_address(source.host)
        except ValueError:
            return False
        return any(address in network for network in self.trunks)

    def admit(self, request: SipMessage, source: Source, now: float) -> SipMessage | None:
        """Trunk INVITEs pass; others must carry an agent's digest credentials (RFC 8760)."""
        if self.is_trunk(source):
            return None
        result = self.auth.verify(request, now)
        if not result.ok:
            if result.attempted and self.guard is not None:
                self.guard.auth_failed(source, now)
            return build_response(request, 401, headers=self.auth.challenge(
                request, now, stale=result.stale), to_tag=new_tag())
        if self.guard is not None:
            self.guard.auth_succeeded(source, now)
        return self._admit_agent_call(request, result.user)

    # -- dialog events -----------------------------------------------------------------------

    def on_dialog_event(self, event: Output) -> None:
        """``DialogSignalling``'s ``on_event``: every call-control event of the dialog layer."""
        try:
            before = self._event_call(event)
            self._dialog_event(event)
            # Agents' own INVITEs admitted, phones rung or answered, legs ended: the router
            # hears of the calls outside the queues that started or ended.
            after = self._event_call(event)
            for call in {id(c): c for c in (before, after) if c is not None}.values():
                self._sync_outside(call)
        except Exception:
            log.exception(kv(event="call_internal_error", where=type(event).__name__))

    def _dialog_event(self, event: Output) -> None:
        if isinstance(event, IncomingCall):
            self._incoming(event)
        elif isinstance(event, ResponseReceived):
            entry = self._by_invite.get(event.key)
            if entry is not None and entry[1] is None and entry[0].supervising is not None:
                self._supervisor_response(entry[0], event.response, event.dialog)
            elif entry is not None and entry[1] is None and entry[0].click_to_dial:
                self._click_response(entry[0], event.response, event.dialog)
            elif entry is not None and entry[1] is not None:
                if entry[0].direction == "outbound" or entry[1].number is not None:
                    self._carrier_response(entry[0], entry[1], event.key, event.response,
                                           event.dialog)
                else:
                    self._agent_response(entry[0], entry[1], event.response, event.dialog)
        elif isinstance(event, RequestFailed):
            entry = self._by_invite.get(event.key)
            if entry is not None and entry[1] is not None and event.method == "INVITE":
                if entry[0].direction == "outbound" or entry[1].number is not None:
                    self._carrier_failed(entry[0], entry[1], 408)
                else:
                    self._agent_failed(entry[0], entry[1], 408)
        elif isinstance(event, CallCancelled):
            entry = self._by_invite.get(event.key)
            if entry is not None and entry[1] is None:
                self._caller_cancelled(entry[0])
        elif isinstance(event, AckReceived):
            self._ack_received(event)
        elif isinstance(event, DialogTerminated):
            entry = self._by_dialog.get(event.dialog)
            if entry is not None:
                self._dialog_ended(entry[0], entry[1], event)
        elif isinstance(event, InDialogRequest):
            self._in_dialog(event)

    # -- the caller's leg --------------------------------------------------------------------

    def _incoming(self, event: IncomingCall) -> None:
        signalling = self._signalling()
        request = event.request
        now = time.time()
        origin = self._agent_invites.pop(request.call_id, None)
        if origin is not None:
            self._outgoing(event, *origin)
            return
        feature = self._feature_invites.pop(request.call_id, None)
        if feature is not None:
            if feature[1].action in ("listen", "whisper", "barge"):
                self._supervisor_dialled(event, feature[0], feature[1].action,
                                         feature[1].argument or "")
            else:
                self._confirm_feature(event, *feature)
            return
        dialled = request.request_uri.user or ""
        caller = request.from_.uri.user or ""
        if len(self.calls) >= MAX_CALLS:
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        flow_name = self.config.ivr.dids.get(dialled)
        if flow_name is None or flow_name not in self.flows:
            log.info(kv(event="call_refused", reason="unknown-did", dialled=dialled,
                        sip_call_id=request.call_id))
            signalling.answer(event.key, 404)
            return
        if not request.body:
            self._late_offer_call(event, caller, dialled, flow_name)  # RFC 3261 §13.2.1
            return
        try:
            offer = sdp.parse(request.body)
        except sdp.SdpError as exc:
            log.info(kv(event="call_refused", reason="bad-sdp", detail=str(exc)))
            signalling.answer(event.key, 400, reason="Bad Session Description")
            return
        try:
            address = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="call_refused", reason="no-media-ports", error=str(exc)))
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        try:
            negotiated = session.answer(offer)
        except sdp.NotAcceptable as exc:
            log.info(kv(event="call_refused", reason="no-common-codec", detail=exc.reason,
                        sip_call_id=request.call_id))
            self._release_media(address.leg)
            signalling.answer(event.key, 488)
            return
        self._apply_media(address.leg, negotiated)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:caller", Direction.INBOUND, Party.CALLER, now)
        call = Call(call_id, request.call_id, caller, dialled, flow_name, event.key, event.dialog,
                    leg, address.leg, session, negotiated.sdp.to_bytes(), now)
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[address.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        leg.handle(LegInput.EARLY_MEDIA, now)
        # RFC 3261 §13.3.1.1 / RFC 3960: early media carries the IVR before any answer.
        signalling.answer(event.key, 183, headers=SDP_HEADERS, body=call.answer_sdp)
        log.info(kv(event="call_started", call=call_id, caller=caller, dialled=dialled,
                    flow=flow_name, codec=negotiated.codec.name,
                    dtmf="rfc4733" if negotiated.telephone_event_pt is not None else "inband",
                    sip_call_id=request.call_id))
        self._note_in_progress(call)
        customer = listed_customer(self.config.ivr.customers, caller)
        call.run = ivr.FlowRun(self.flows[flow_name], now, caller, dialled=dialled,
                               customer=customer)
        self._emit_offered(call, customer, now)
        self._ivr_actions(call, call.run.take_actions())

    def _apply_media(self, media: int, negotiated: sdp.Negotiated) -> None:
        event_pt = negotiated.telephone_event_pt
        self.engine.set_codec(media, negotiated.codec.name.upper(),
                              event_pt if event_pt is not None else -1)
        if negotiated.remote_address not in ("0.0.0.0", "::"):
            rtcp = negotiated.remote_rtcp[0] if negotiated.remote_rtcp else None
            self.engine.set_remote(media, negotiated.remote_address, negotiated.remote_port, rtcp)
        if event_pt is None:
            # No telephone-event negotiated: listen for DTMF tones in the audio (Q.24).
            self.engine.detect_inband_dtmf(media, True)

    def _caller_cancelled(self, call: Call) -> None:
        if call.leg.can_take(LegInput.CANCEL):
            call.leg.handle(LegInput.CANCEL, time.time())
            log.info(kv(event="call_cancelled", call=call.call_id))
            self._caller_gone(call, "cancelled")

    def _hangup_caller(self, call: Call, reason: EndReason, code: int = 480) -> None:
        """End the caller's leg from our side (BYE, or a final answer while unanswered)."""
        leg = call.leg
        if not leg.can_take(LegInput.HANGUP):
            return
        actions = leg.handle(LegInput.HANGUP, time.time(), code=code, reason=reason)
        if LegAction.SEND_FINAL in actions:
            self._signalling().answer(call.key, code)
        elif LegAction.SEND_BYE in actions:
            self._signalling().hangup(call.dialog)
        elif LegAction.SEND_CANCEL in actions:  # a supervisor's phone still ringing
            self._signalling().cancel(call.key)
        self._caller_gone(call, reason.value)

    def _caller_gone(self, call: Call, reason: str) -> None:
        """The caller's side is over: stop the IVR, leave the queue, end the agent legs."""
        now = time.time()
        if call.ended_at is None:
            call.ended_at = now
            call.end_reason = call.end_reason or reason
        if call.hold_started is not None:
            self._close_hold(call, now)
        if call.supervising is not None:
            self._supervisor_gone(call)
        for supervisor in list(call.supervisors):
            call.supervisors.remove(supervisor)
            with contextlib.suppress(Exception):
                supervisor.end_reason = "supervised-call-ended"
                self._hangup_caller(supervisor, EndReason.SYSTEM)
        self._stop_ivr(call)
        if call.run is not None and not call.run.finished:
            with contextlib.suppress(ivr.LocalProtocolError):
                call.run.handle(ivr.CallerHungUp(), now)
        if call.in_router and call.connected is None:
            call.in_router = False
            self._route(self._router().handle(acd.CallerAbandon(call.call_id),
                                              self._router_clock()))
            call.events.append(("queue.abandon", {
                "call_id": call.call_id, "queue": call.queue, "caller": call.caller,
                "wait_s": round(now - (call.queued_at or now), 3)}, now))
        far = (EndReason.AGENT_HUNG_UP if call.direction == "outbound"
               else EndReason.CALLER_HUNG_UP)
        for agent_leg in list(call.agents.values()):
            self._hangup_agent(call, agent_leg, far)
        self._callback_leg_gone(call)
        self._voicemail_gone(call)
        self._maybe_finish(call)

    # -- the agent desk: feature codes, router inputs, watchdog --------------------------------

    def _feature_code(self, request: SipMessage, agent: str,
                      dialled: str) -> SipMessage | None | bool:
        """An agent dialled a feature code (docs/routing.md): apply it through the desk. False
        when ``dialled`` is no feature code; None to answer it with a confirmation tone; a
        response (4xx) when it cannot be applied."""
        from appliance.acd.desk import DeskError, parse_feature_code

        try:
            code = parse_feature_code(dialled, self.feature_codes)
        except DeskError as exc:
            if self.desk is None and not dialled.startswith(("*8",)):
                return False
            log.info(kv(event="feature_code_refused", agent=agent, dialled=dialled,
                        status=exc.status, detail=exc.message))
            return build_response(request, 484, "Invalid Feature Code", to_tag=new_tag())
        if code is None:
            return False
        if self.desk is None and code.action not in ("listen", "whisper", "barge"):
            return False  # registered = logged in: no desk to apply it to
        now = time.time()
        desk = self.desk
        source = f"sip:{agent}"
        try:
            if code.action == "login":
                inputs = desk.login(agent, now, actor=agent, source=source)
            elif code.action == "logout":
                inputs = desk.logout(agent, now, actor=agent, source=source)
            elif code.action == "pause":
                inputs = desk.pause(agent, code.argument, now, actor=agent, source=source)
            elif code.action == "unpause":
                view = self.router_view(agent)
                inputs = desk.unpause(agent, now, actor=agent, source=source,
                                      in_wrap_up=view is not None and view.in_wrap_up)
            elif code.action == "disposition":
                last = self._last_call.get(agent)
                if last is None:
                    raise DeskError(409, f"agent {agent} has no call to give a disposition")
                desk.disposition(agent, last, code.argument or "", now, actor=agent,
                                 source=source)
                inputs = []
            elif code.action in ("listen", "whisper", "barge"):
                target = self._supervise_refusal(agent, code.argument or "")
                if isinstance(target, tuple):
                    log.info(kv(event="supervise_refused", supervisor=agent,
                                agent=code.argument, status=target[0]))
                    return build_response(request, target[0], target[1], to_tag=new_tag())
                self._feature_invites[request.call_id] = (agent, code)
                return None
            else:
                # In-call codes (*1/*2) are RFC 4733 digits during a call, not dialled.
                log.info(kv(event="feature_code_refused", agent=agent, action=code.action,
                            status=501))
                return build_response(request, 501, "Feature Not Available",
                                      to_tag=new_tag())
        except DeskError as exc:
            log.info(kv(event="feature_code_refused", agent=agent, action=code.action,
                        status=exc.status, detail=exc.message))
            status, phrase = {404: (404, "Unknown Agent"), 400: (484, "Invalid Feature Code")
                              }.get(exc.status, (403, "Not Possible Now"))
            return build_response(request, status, phrase, to_tag=new_tag())
        log.info(kv(event="feature_code", agent=agent, action=code.action,
                    argument=code.argument or ""))
        self.apply_router_inputs(inputs)
        if len(self._feature_invites) >= MAX_CALLS:
            self._feature_invites.clear()
        self._feature_invites[request.call_id] = (agent, code)
        return None

    def _confirm_feature(self, event: IncomingCall, agent: str, code: Any) -> None:
        """Answer a feature-code call, play the confirmation tone, then hang up."""
        signalling = self._signalling()
        request = event.request
        now = time.time()
        try:
            offer = sdp.parse(request.body) if request.body else None
            address = self.engine.allocate_leg(self.media_host)
        except (sdp.SdpError, EngineError, OSError):
            signalling.answer(event.key, 200)  # applied; no media to confirm with
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        try:
            if offer is None:
                raise sdp.SdpError("no offer")
            negotiated = session.answer(offer)
        except sdp.SdpError:
            self._release_media(address.leg)
            signalling.answer(event.key, 200)
            return
        self._apply_media(address.leg, negotiated)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:agent", Direction.INBOUND, Party.AGENT, now)
        call = Call(call_id, request.call_id, agent, request.request_uri.user or "", "",
                    event.key, event.dialog, leg, address.leg, session,
                    negotiated.sdp.to_bytes(), now, agent=agent, direction="feature")
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[address.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        leg.handle(LegInput.ANSWER, now)
        signalling.answer(event.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        call.playing = (self.engine.play(address.leg, CONFIRMATION_TONE), "confirmation")
        call.end_reason = f"feature-{code.action}"

    def apply_router_inputs(self, inputs: Iterable[Any]) -> None:
        """Feed the desk's router inputs to the router and carry out its decisions."""
        if self.router is None:
            return
        for item in inputs:
            try:
                self._route(self.router.handle(item, self._router_clock()))
            except acd.LocalProtocolError as exc:
                log.info(kv(event="router_input_refused", input=type(item).__name__,
                            detail=str(exc)))

    def router_view(self, agent: str) -> Any | None:
        """The router's view of ``agent`` (None without a router or for an unknown agent)."""
        if self.router is None:
            return None
        try:
            return self.router.agent_view(agent)
        except Exception:
            return None

    def live_calls_by_agent(self) -> dict[str, set[str]]:
        """Agent -> the call ids call control knows for them (ringing, connected, dialling)."""
        live: dict[str, set[str]] = {}
        for call in self.calls.values():
            if call.direction in ("feature", "supervise"):
                continue
            for agent_leg in call.agents.values():
                if call.direction == "inbound":
                    live.setdefault(agent_leg.agent, set()).add(call.call_id)
            if call.agent:
                live.setdefault(call.agent, set()).add(call.call_id)
                request = self._callback_of(call)
                if request is not None:  # the router knows an attempt by its request
                    live[call.agent].add(request)
        return live

    async def _watchdog_loop(self) -> None:
        from appliance.acd.desk import router_calls

        while True:
            await asyncio.sleep(self.config.agents.watchdog_interval)
            if self.router is None or self.desk is None:
                continue
            try:
                views = {a: v for a in self.members
                         if (v := self.router_view(a)) is not None}
                snapshot, now = self.router.snapshot(), time.time()
                inputs = self.desk.watchdog(views, self.live_calls_by_agent(), now,
                                            held=router_calls(snapshot))
                # Callers the router still queues whose call is gone are dropped, and the
                # offers they hold with them (an input for one of them would be refused).
                stray = self.desk.stray_callers(
                    [c.call for c in snapshot.get("callers", ())],
                    self.calls.keys() | self.callbacks.keys(), now)
                gone = {s.call for s in stray}
                self.apply_router_inputs([*stray, *(i for i in inputs
                                                    if getattr(i, "call", None) not in gone)])
            except Exception:
                log.exception(kv(event="call_internal_error", where="watchdog"))

    # -- IVR ---------------------------------------------------------------------------------

    def _ivr_actions(self, call: Call, actions: Iterable[ivr.Action]) -> None:
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, ivr.Play):
                call.prompts.append(action.prompt)
                if call.playing is None:
                    self._next_prompt(call)
            elif isinstance(action, ivr.StopPlayback):
                call.prompts.clear()
                if call.playing is not None:
                    call.playing = None
                    self.engine.stop_play(call.media)
            elif isinstance(action, ivr.StartTimer):
                self._arm_ivr_timer(call)
            elif isinstance(action, ivr.StartCollect):
                pass  # digits are always reported by the engine; the runner counts them
            elif isinstance(action, ivr.HttpLookup):
                call.lookup = self.crm.submit(
                    action, lambda result, c=call: self._lookup_done(c, result),
                    call=call.call_id)
            elif isinstance(action, ivr.RouteToQueue):
                self._stop_ivr(call)
                self._enter_queue(call, action)
            elif isinstance(action, ivr.Hangup):
                self._stop_ivr(call)
                if call.end_reason != "callback-requested":
                    call.end_reason = f"ivr-{action.reason}"
                self._hangup_caller(call, EndReason.SYSTEM)
            elif isinstance(action, ivr.Transfer):
                self._ivr_transfer(call, action)
            elif isinstance(action, ivr.OfferCallback):
                self._request_callback(call, action)
            elif isinstance(action, ivr.Voicemail):
                self._take_voicemail(call, action)
            else:
                log.warning(kv(event="ivr_action_not_supported", call=call.call_id,
                               action=type(action).__name__))
                self._stop_ivr(call)
                call.end_reason = "ivr-unsupported"
                self._hangup_caller(call, EndReason.SYSTEM)

    def _next_prompt(self, call: Call) -> None:
        while call.prompts:
            name = call.prompts.popleft()
            pcm = self.prompts.get(name)
            if pcm is None:
                log.error(kv(event="prompt_missing", call=call.call_id, prompt=name))
                self._feed_ivr(call, ivr.PromptFinished(name))
                continue
            call.playing = (self.engine.play(call.media, pcm), name)
            return

    def _feed_ivr(self, call: Call, event: ivr.Event) -> None:
        run = call.run
        if run is None or run.finished:
            return
        try:
            actions = run.handle(event, time.time())
        except ivr.LocalProtocolError as exc:
            log.info(kv(event="ivr_event_ignored", call=call.call_id, detail=str(exc)))
            return
        self._ivr_actions(call, actions)

    def _arm_ivr_timer(self, call: Call) -> None:
        if call.ivr_timer is not None:
            call.ivr_timer.cancel()
            call.ivr_timer = None
        at = call.run.next_timer() if call.run is not None else None
        if at is None:
            return
        loop = asyncio.get_running_loop()
        call.ivr_timer = loop.call_later(max(0.0, at - time.time()), self._ivr_timer_fired,
                                         call)

    def _ivr_timer_fired(self, call: Call) -> None:
        call.ivr_timer = None
        if call.run is None or call.run.finished:
            return
        try:
            actions = call.run.handle_timer(time.time())
        except Exception:
            log.exception(kv(event="call_internal_error", where="ivr_timer"))
            return
        self._ivr_actions(call, actions)
        if call.ivr_timer is None and call.run.next_timer() is not None:
            self._arm_ivr_timer(call)

    def _lookup_done(self, call: Call, result: ivr.HttpResult) -> None:
        call.lookup = None
        if call.run is not None and self.calls.get(call.call_id) is call:
            self._feed_ivr(call, result)

    def _stop_ivr(self, call: Call) -> None:
        if call.lookup is not None:
            call.lookup.cancel()
            call.lookup = None
        if call.ivr_timer is not None:
            call.ivr_timer.cancel()
            call.ivr_timer = None
        call.prompts.clear()
        if call.playing is not None:
            call.playing = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)

    # -- queue and agents --------------------------------------------------------------------

    def _router(self) -> Any:
        if self.router is None:
            raise RuntimeError("no queues are configured")
        return self.router

    def _router_clock(self) -> float:
        # The router refuses time running backwards; the monotonic clock never does, and
        # max() covers two reads in the same tick.
        self._router_now = max(self._router_now, time.monotonic())
        return self._router_now

    def _enter_queue(self, call: Call, action: ivr.RouteToQueue, *,
                     keep_place: bool = False) -> None:
        """Put the caller in ``action.queue``; ``keep_place``: they were in it already and take
        back their place (``call.place_at``) among the callers of their priority."""
        now = time.time()
        if self.router is None or action.queue not in self.queues:
            log.error(kv(event="queue_unknown", call=call.call_id, queue=action.queue))
            call.end_reason = "no-queue"
            self._hangup_caller(call, EndReason.SYSTEM)
            return
        self._sync_presence()
        call.queue = action.queue
        call.queued_at = now
        if not keep_place or call.place_at is None:
            call.place_at = now
        call.priority = action.priority
        # A caller sent back to a queue (overflow, a failed transfer) keeps what the IVR learnt.
        if action.tier is not None:
            call.tier = action.tier
        if action.variables:
            call.variables = dict(action.variables)
        call.in_router = True
        self._log_event(call, "queue.enter", {
            "call_id": call.call_id, "queue": action.queue, "caller": call.caller,
            "priority": action.priority, "dialled": call.dialled, "tier": call.tier}, now)
        log.info(kv(event="queue_enter", call=call.call_id, queue=action.queue))
        self._queue_music(call)
        self._arm_announcement(call)
        clock = self._router_clock()
        # The router's clock is monotonic, call times are wall-clock: the place is carried over
        # as the time since it, never after now (the KPIs keep queued_at, the real entry).
        place = (clock - max(0.0, now - call.place_at)
                 if keep_place and call.place_at is not None else None)
        self._route(self.router.handle(acd.CallerJoin(
            call.call_id, action.queue, caller_number=call.caller, priority=action.priority,
            place_time=place), clock))

    def _queue_music(self, call: Call) -> None:
        """Start (or restart, looping) the queue's music on a caller still waiting."""
        settings = self.queues.get(call.queue or "")
        name = settings.music if settings is not None else None
        if call.ivr_transfer is not None:
            name = "hold_music"
        if name is None or call.connected is not None or call.ended_at is not None:
            call.queue_play = None
            return
        pcm = self.prompts.get(name)
        if pcm is None and name == "hold_music":
            pcm = self.hold_music
        if pcm is None:  # load_call_path refuses such a site; a prompt gone since is logged
            log.error(kv(event="prompt_missing", call=call.call_id, prompt=name))
            call.queue_play = None
            return
        try:
            call.queue_play = self.engine.play(call.media, pcm)
        except EngineError as exc:
            log.error(kv(event="queue_music_failed", call=call.call_id, error=str(exc)))
            call.queue_play = None

    def _stop_queue_music(self, call: Call) -> None:
        if call.announce_timer is not None:
            call.announce_timer.cancel()
            call.announce_timer = None
        call.announcement.clear()
        if call.queue_play is not None or call.announce_play is not None:
            call.queue_play = call.announce_play = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)

    def _arm_announcement(self, call: Call) -> None:
        settings = self.queues.get(call.queue or "")
        every = settings.announce_every if settings is not None else None
        if every is None or call.connected is not None or call.ended_at is not None:
            return
        if call.announce_timer is not None:
            call.announce_timer.cancel()
        call.announce_timer = asyncio.get_running_loop().call_later(
            every, self._announcement_due, call)

    def _announcement_due(self, call: Call) -> None:
        call.announce_timer = None
        if self.calls.get(call.call_id) is not call or not call.in_router or (
                call.connected is not None or call.ended_at is not None):
            return
        try:  # the router answers with Announce (position, estimated wait)
            self._route(self._router().handle(acd.AnnounceRequest(call.call_id),
                                              self._router_clock()))
        except acd.LocalProtocolError as exc:
            log.info(kv(event="router_input_refused", input="AnnounceRequest", detail=str(exc)))
            self._arm_announcement(call)

    def _announce(self, call: Call, decision: Any) -> None:
        """Play "you are caller number N, your estimated wait is about M minutes" between the
        music; the music resumes after it and the next one is armed."""
        if call.connected is not None or call.ended_at is not None:
            return
        pieces = announcement_prompts(decision.position, decision.estimated_wait)
        wait = decision.estimated_wait
        log.info(kv(event="queue_announce", call=call.call_id, position=decision.position,
                    estimated_wait=round(wait, 1) if math.isfinite(wait) else "unknown"))
        call.queue_play = None
        call.announcement = deque(pieces)
        self._next_announcement(call)

    def _next_announcement(self, call: Call) -> None:
        while call.announcement:
            pcm = self.prompts.get(call.announcement.popleft())
            if pcm is not None:
                try:
                    call.announce_play = self.engine.play(call.media, pcm)
                except EngineError:
                    break
                return
        call.announce_play = None
        self._queue_music(call)
        self._arm_announcement(call)

    def _route(self, decisions: Iterable[Any]) -> None:
        for decision in decisions:
            call = self.calls.get(getattr(decision, "call", ""))
            if isinstance(decision, acd.Offer) and call is not None:
                for agent in decision.agents:
                    self._offer(call, agent)
            elif isinstance(decision, acd.CancelOffer) and call is not None:
                for agent_leg in [a for a in call.agents.values()
                                  if a.agent in decision.agents and a.offered]:
                    agent_leg.offered = False
                    # Rang out (or another agent answered), unless the caller left.
                    self._hangup_agent(call, agent_leg, EndReason.NO_ANSWER
                                       if call.ended_at is None else EndReason.CALLER_HUNG_UP)
            elif isinstance(decision, acd.Overflow) and call is not None:
                call.in_router = False
                now = time.time()
                call.events.append(("queue.abandon", {
                    "call_id": call.call_id, "queue": decision.queue, "caller": call.caller,
                    "wait_s": round(now - (call.queued_at or now), 3),
                    "overflow": decision.reason.value}, now))
                if (decision.target and call.ended_at is None
                        and call.overflows < len(self.queues)):
                    # The queue's `overflow`: the caller moves on with their priority.
                    call.overflows += 1
                    self._stop_queue_music(call)
                    log.info(kv(event="queue_overflow", call=call.call_id, queue=decision.queue,
                                target=decision.target, reason=decision.reason.value))
                    self._enter_queue(call, ivr.RouteToQueue(
                        decision.target, call.priority, call.tier, call.variables))
                    continue
                call.end_reason = f"overflow-{decision.reason.value}"
                self._hangup_caller(call, EndReason.SYSTEM)
            elif isinstance(decision, acd.Announce) and call is not None:
                self._announce(call, decision)
            elif isinstance(decision, acd.DialCallback):
                self._dial_callback(decision)
            elif isinstance(decision, acd.AutoPause):
                log.info(kv(event="agent_auto_paused", agent=decision.agent,
                            missed=decision.missed))
                if self.desk is not None:
                    try:
                        self.desk.auto_paused(decision.agent, decision.missed, time.time())
                    except Exception:
                        log.exception(kv(event="desk_auto_pause_failed", agent=decision.agent))
            else:
                log.debug(kv(event="router_decision_ignored", decision=type(decision).__name__))
        self._arm_router_timer()

    def _arm_router_timer(self) -> None:
        if self._router_timer is not None:
            self._router_timer.cancel()
            self._router_timer = None
        at = self.router.next_timer() if self.router is not None else None
        if at is None:
            return
        delay = max(0.0, at - time.monotonic())
        self._router_timer = asyncio.get_running_loop().call_later(delay, self._router_fired)

    def _router_fired(self) -> None:
        self._router_timer = None
        try:
            self._route(self._router().handle_timer(self._router_clock()))
        except Exception:
            log.exception(kv(event="call_internal_error", where="router_timer"))
            self._arm_router_timer()

    def _event_call(self, event: Output) -> Call | None:
        """The call a dialog-layer event belongs to, if call control knows it."""
        key = getattr(event, "key", None)
        entry = self._by_invite.get(key) if key is not None else None
        if entry is None:
            dialog = getattr(event, "dialog", None)
            entry = self._by_dialog.get(dialog) if dialog is not None else None
        return entry[0] if entry is not None else None

    def _outside_agents(self, call: Call) -> set[str]:
        """The router's agents that ``call`` busies although the router did not route it
        (docs/routing.md §6): their own outbound and click-to-dial calls, a colleague's call to
        their extension, a transfer or an IVR ``transfer`` node ringing them, a supervisor's
        session. Queued callbacks are the router's own; feature-code calls are not calls."""
        found: set[str] = set()
        if (self.router is None or self.calls.get(call.call_id) is not call or call.finishing
                or call.ended_at is not None or call.direction in ("feature", "callback")):
            return found
        if call.direction in ("outbound", "supervise") and call.agent:
            found.add(call.agent)
        for leg in call.agents.values():
            if (leg.number is None and leg.leg.state is not LegState.ENDED
                    and (call.direction == "outbound" or leg.transfer
                         or leg is call.ivr_transfer
                         or (leg is call.connected and call.queue is None))):
                found.add(leg.agent)
        if found:
            found &= {a.agent for a in self.router.config.agents}
        return found

    def _sync_outside(self, call: Call) -> None:
        """Tell the router which agents ``call`` started or stopped busying outside the queues
        since it was last told: ``OutsideCallEnded`` first (that agent may be offered the next
        caller at once), then ``OutsideCallStarted``."""
        live = self._outside_agents(call)
        told = self._outside_told.get(call.call_id, set())
        if live == told or self.router is None:
            return
        now = self._router_clock()
        changes: list[Any] = [acd.OutsideCallEnded(agent, call.call_id, now)
                              for agent in sorted(told - live)]
        changes += [acd.OutsideCallStarted(agent, call.call_id, now)
                    for agent in sorted(live - told)]
        if live:
            self._outside_told[call.call_id] = live
        else:
            self._outside_told.pop(call.call_id, None)
        for change in changes:
            log.info(kv(event="agent_outside_call", agent=change.agent, call=change.call_id,
                        state="started" if isinstance(change, acd.OutsideCallStarted)
                        else "ended"))
            try:
                self._route(self.router.handle(change, now))
            except acd.LocalProtocolError as exc:
                log.info(kv(event="router_input_refused", input=type(change).__name__,
                            detail=str(exc)))

    def _over_cap_outside(self, agent: str) -> bool:
        """True when the router's offers and calls of ``agent``, counted with their calls
        outside the queues, exceed their concurrent-interaction cap."""
        view = self.router_view(agent)
        if view is None or not view.outside:
            return False
        cap = next((a.max_interactions for a in self.router.config.agents if a.agent == agent),
                   1)
        return view.interactions + view.ringing + view.outside > cap

    def _offer(self, call: Call, agent: str, *, transfer: bool = False) -> AgentLeg | None:
        signalling = self._signalling()
        now = time.time()
        if not transfer:
            # The router counts calls outside the queues against the cap once told of them
            # (docs/routing.md §6). A call that started since it was last told, and so is not
            # yet counted, makes this offer one too many: it is refused without ringing, and
            # the router, now counting that call, does not offer the agent again meanwhile.
            # Only a call with an INVITE sent or received since the last look can have started
            # busying an agent unseen (every other change comes with a dialog event, which
            # syncs its call), and only a call told before can have stopped: not every call.
            fresh = self._by_invite.take_fresh()
            for call_id in list(self._outside_told):
                other = self.calls.get(call_id)
                if other is not None:
                    fresh.setdefault(call_id, other)
            for other in fresh.values():
                if other is not call and self.calls.get(other.call_id) is other:
                    self._sync_outside(other)
            if self._over_cap_outside(agent):
                log.info(kv(event="agent_busy_outside", call=call.call_id, agent=agent))
                self._reject_offer(call.call_id, agent)
                return None
        bindings = self.registrar.lookup(agent, self.service.clock())
        if not bindings and transfer:
            return None
        if not bindings:
            if self.desk is not None:
                # Logged in at the desk but the phone is not registered: a refused offer.
                # Told a second later, so a queue whose only agent is unreachable does not
                # spin offer -> refusal -> offer on the loop.
                log.info(kv(event="agent_unreachable", call=call.call_id, agent=agent))
                asyncio.get_running_loop().call_later(
                    UNREACHABLE_RETRY, self._reject_offer, call.call_id, agent)
                return None
            self._logged_in.discard(agent)
            self._route(self._router().handle(acd.AgentLogout(agent), self._router_clock()))
            return None
        binding = bindings[0]
        try:
            address = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="agent_leg_failed", call=call.call_id, agent=agent,
                         error=str(exc)))
            if transfer:
                return None
            self._route(self._router().handle(acd.OfferRejected(call.call_id, agent),
                                              self._router_clock()))
            return None
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        # The same agent may be rung again for this caller (nobody else left): a new leg.
        leg_id = f"{call.call_id}:{agent}:{len(call.agents) + len(call.finished_agents) + 1}"
        leg = Leg(leg_id, Direction.OUTBOUND, Party.AGENT, now)
        agent_leg = AgentLeg(agent, leg, address.leg, session, offered=not transfer,
                             transfer=transfer)
        call.agents[leg_id] = agent_leg
        if call.offered_at is None:
            call.offered_at = now
        leg.handle(LegInput.DIAL, now)
        realm = self.config.sip.realm
        display = call.caller.replace('"', "")
        key = signalling.invite(
            from_party=f'"{display}" <sip:{call.caller or "anonymous"}@{realm}>',
            to_party=f"<sip:{agent}@{realm}>",
            request_uri=binding.contact,
            destination=destination(binding),
            body=session.offer().to_bytes())
        agent_leg.key = key
        self._by_invite[key] = (call, agent_leg)
        log.info(kv(event="agent_offered", call=call.call_id, agent=agent, queue=call.queue,
                    contact=binding.contact))
        self._emit("call.ringing", {"call_id": call.call_id, "agent": agent,
                                    "queue": call.queue, **self._screen_facts(call)}, now)
        if transfer:
            self._sync_outside(call)  # a transfer rings the agent: a call outside the queues
        return agent_leg

    def _reject_offer(self, call_id: str, agent: str) -> None:
        call = self.calls.get(call_id)
        if call is None or not call.in_router or call.connected is not None:
            return
        try:
            self._route(self._router().handle(acd.OfferRejected(call_id, agent),
                                              self._router_clock()))
        except acd.LocalProtocolError as exc:
            log.info(kv(event="router_input_refused", input="OfferRejected", detail=str(exc)))

    def _agent_response(self, call: Call, agent_leg: AgentLeg, response: SipMessage,
                        dialog: DialogId | None) -> None:
        status = response.status or 0
        now = time.time()
        leg = agent_leg.leg
        inp = response_input(status, response.body)
        if dialog is not None and (agent_leg.dialog is None or 200 <= status < 300):
            agent_leg.dialog = dialog
            self._by_dialog[dialog] = (call, agent_leg)
        if status >= 300:
            self._agent_failed(call, agent_leg, status)
            return
        if not leg.can_take(inp):
            return
        actions = leg.handle(inp, now, code=status)
        if inp is not LegInput.RX_2XX:
            return
        if LegAction.SEND_BYE in actions or call.ended_at is not None or (
                call.connected is not None and not agent_leg.transfer):
            # The answer crossed our CANCEL, or the caller left: the layer ACKed it; hang up.
            if dialog is not None:
                self._signalling().hangup(dialog)
            if leg.state is not LegState.TERMINATING and leg.can_take(LegInput.HANGUP):
                leg.handle(LegInput.HANGUP, now, reason=EndReason.CALLER_HUNG_UP)
            return
        try:
            negotiated = agent_leg.session.receive_answer(sdp.parse(response.body))
        except sdp.SdpError as exc:
            log.info(kv(event="agent_answer_unusable", call=call.call_id,
                        agent=agent_leg.agent, detail=str(exc)))
            self._hangup_agent(call, agent_leg, EndReason.SYSTEM)
            if agent_leg.offered:
                agent_leg.offered = False
                self._route(self._router().handle(
                    acd.OfferRejected(call.call_id, agent_leg.agent), self._router_clock()))
            return
        self._apply_media(agent_leg.media, negotiated)
        if call.ivr_transfer is agent_leg:
            self._ivr_transfer_answered(call, agent_leg, now)
            return
        if agent_leg.transfer:
            self._transfer_answered(call, agent_leg, now)
            return
        self._connect(call, agent_leg, now)

    def _connect(self, call: Call, agent_leg: AgentLeg, now: float) -> None:
        call.connected = agent_leg
        call.agent = agent_leg.agent
        self._last_call[agent_leg.agent] = call.call_id
        call.answered_at = now
        agent_leg.offered = False
        self._route(self._router().handle(acd.OfferAccepted(call.call_id, agent_leg.agent),
                                          self._router_clock()))
        self._stop_ivr(call)
        self._stop_queue_music(call)
        self.engine.bridge(call.media, agent_leg.media)
        self._arm_media_timeout(call.media, agent_leg.media)
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        self._log_event(call, "queue.connect", {
            "call_id": call.call_id, "queue": call.queue, "agent": agent_leg.agent,
            "wait_s": round(now - (call.queued_at or now), 3),
            "ring_s": round(now - agent_leg.leg.started_at, 3)}, now)
        self._note_in_progress(call, agent=agent_leg.agent)
        settings = self.queues.get(call.queue or "")
        record, call.recording_decision = recording_decision(
            settings.record if settings is not None else False, random.random())
        if record and self.recordings is not None:
            self._start_recording(call, call.media, agent_leg.media, now)
            agent_leg.recorded = call.recording is not None
        log.info(kv(event="call_connected", call=call.call_id, agent=agent_leg.agent,
                    queue=call.queue, recording=call.recording is not None))

    def _start_recording(self, call: Call, customer: int, agent: int, now: float) -> None:
        """Stereo recording of the bridged call: the customer left, the agent right."""
        if self._scratch is None:
            self._scratch = _scratch_dir(self.config.site.id, self.config.storage.database)
        path = self._scratch / f"{call.call_id}.wav"
        try:
            call.recording = self.engine.record_start(str(path), customer, agent)
        except (EngineError, OSError) as exc:
            log.error(kv(event="recording_failed", call=call.call_id, error=str(exc)))
        else:
            call.recording_path = str(path)
            call.recording_started = now

    def _agent_failed(self, call: Call, agent_leg: AgentLeg, status: int) -> None:
        leg = agent_leg.leg
        now = time.time()
        inp = response_input(status)
        if leg.can_take(inp):
            leg.handle(inp, now, code=status)
        elif leg.state is not LegState.ENDED and leg.can_take(LegInput.TIMEOUT):
            leg.handle(LegInput.TIMEOUT, now)
        log.info(kv(event="agent_leg_ended", call=call.call_id, agent=agent_leg.agent,
                    status=status, reason=leg.end_reason.value if leg.end_reason else ""))
        self._agent_leg_over(call, agent_leg)
        if call.ivr_transfer is agent_leg:
            self._ivr_transfer_over(call, agent_leg, status)
        if agent_leg.transfer and call.transfer is not None and (
                call.transfer["to"] is agent_leg):
            self._transfer_failed(call, status)
        if agent_leg.offered and call.ended_at is None:
            agent_leg.offered = False
            event = (acd.OfferTimeout(call.call_id, agent_leg.agent) if status == 408
                     else acd.OfferRejected(call.call_id, agent_leg.agent))
            self._route(self._router().handle(event, self._router_clock()))
        self._maybe_finish(call)

    def _hangup_agent(self, call: Call, agent_leg: AgentLeg, reason: EndReason) -> None:
        leg = agent_leg.leg
        if not leg.can_take(LegInput.HANGUP):
            return
        actions = leg.handle(LegInput.HANGUP, time.time(), reason=reason)
        if LegAction.SEND_CANCEL in actions and agent_leg.key is not None:
            self._signalling().cancel(agent_leg.key)
        elif LegAction.SEND_BYE in actions and agent_leg.dialog is not None:
            self._signalling().hangup(agent_leg.dialog)

    def _agent_leg_over(self, call: Call, agent_leg: AgentLeg) -> None:
        if call.connected is not agent_leg and agent_leg.recorded:
            return  # transferred away: its media stays until the recording stops
        if call.connected is not agent_leg:
            # Only a leg that was never bridged is released at once; a bridged one goes with
            # the call (after its recording stopped).
            if call.agents.pop(agent_leg.leg.leg_id, None) is not None:
                call.finished_agents.append(agent_leg)  # once, however often it is told
            self._release_agent_media(agent_leg)

    def _release_agent_media(self, agent_leg: AgentLeg) -> None:
        if not agent_leg.released:
            agent_leg.released = True
            agent_leg.media_figures = self._leg_figures(agent_leg.media)
            self._release_media(agent_leg.media)

    def _leg_figures(self, media: int) -> dict[str, Any] | None:
        """What the record keeps of a leg's media (RFC 3550 §6.4 receiver figures, MOS)."""
        try:
            stats = self.engine.stats(media)
        except (EngineError, KeyError, ValueError):
            return None
        return {"rx_packets": stats.rx_packets, "tx_packets": stats.tx_packets,
                "lost": stats.lost, "loss_pct": round(stats.loss_pct, 3),
                "jitter_ms": round(stats.jitter_ms, 2),
                "rtt_ms": None if stats.rtt_ms is None else round(stats.rtt_ms, 2),
                "mos": None if stats.mos is None else round(stats.mos, 2)}

    # -- mid-call and the end -----------------------------------------------------------------

    def _in_dialog(self, event: InDialogRequest) -> None:
        signalling = self._signalling()
        entry = self._by_dialog.get(event.dialog)
        method = event.request.method
        if entry is None:
            signalling.answer(event.key, 481)
            return
        call, agent_leg = entry
        if method == "INVITE":
            session = agent_leg.session if agent_leg is not None else call.session
            media = agent_leg.media if agent_leg is not None else call.media
            if not event.request.body:
                self._reoffer(event, call, agent_leg)  # we offer, the ACK answers
                return
            try:
                negotiated = session.answer(sdp.parse(event.request.body))
            except sdp.SdpError as exc:
                signalling.answer(event.key, exc.status)
                return
            self._apply_media(media, negotiated)
            signalling.answer(event.key, 200, headers=SDP_HEADERS,
                              body=negotiated.sdp.to_bytes())
            self._reinvite_hold(call, agent_leg, event.request.body)
        elif method in ("INFO", "UPDATE", "NOTIFY"):
            signalling.answer(event.key, 200)
        elif method == "REFER":
            self._refer(event, call, agent_leg)
        else:
            signalling.answer(event.key, 501)

    # -- hold and resume ------------------------------------------------------------------------

    def _reinvite_hold(self, call: Call, agent_leg: AgentLeg | None, body: bytes) -> None:
        """A re-INVITE from the agent's phone holds (sendonly/inactive, RFC 3264 §8.4) or
        resumes the call; one from the customer's side only updates the media."""
        leg = call.leg if agent_leg is None else agent_leg.leg
        try:
            held = is_hold_offer(body)
        except sdp.SdpError:
            return
        inp = LegInput.HOLD if held else (
            LegInput.RESUME if leg.state is LegState.HOLDING else LegInput.REINVITE)
        if leg.can_take(inp):
            leg.handle(inp, time.time())
        from_agent = (agent_leg is None) if call.direction == "outbound" else (
            agent_leg is not None and agent_leg is call.connected)
        if not from_agent or call.connected is None or call.ended_at is not None:
            return
        if held and call.hold_started is None:
            self._start_hold(call, call.agent or "agent")
        elif not held and call.hold_started is not None:
            self._end_hold(call, call.agent or "agent")

    def _customer_media(self, call: Call) -> int:
        assert call.connected is not None
        return call.connected.media if call.direction == "outbound" else call.media

    def _start_hold(self, call: Call, by: str) -> None:
        """Stop the bridge; the customer hears the hold music in a loop."""
        now = time.time()
        customer = self._customer_media(call)
        with contextlib.suppress(EngineError):
            self.engine.unbridge(customer)
        call.hold_started = now
        call.holds.append([now, None])
        call.hold_play = self.engine.play(customer, self.hold_music)
        self._log_event(call, "call.hold", {"call_id": call.call_id, "queue": call.queue,
                                            "agent": call.agent, "by": by}, now)
        log.info(kv(event="call_held", call=call.call_id, by=by))

    def _end_hold(self, call: Call, by: str) -> None:
        """Stop the music and bridge the two sides again."""
        now = time.time()
        self._close_hold(call, now)
        if call.connected is None:
            return
        customer = self._customer_media(call)
        other = call.connected.media if call.direction == "inbound" else call.media
        with contextlib.suppress(EngineError):
            self.engine.stop_play(customer)
            self.engine.bridge(customer, other)
        self._arm_media_timeout(customer, other)  # held phones may have sent nothing
        self._log_event(call, "call.resume", {"call_id": call.call_id, "queue": call.queue,
                                              "agent": call.agent, "by": by}, now)
        log.info(kv(event="call_resumed", call=call.call_id, by=by))

    def _close_hold(self, call: Call, now: float) -> None:
        call.hold_started = None
        call.hold_play = None
        if call.holds and call.holds[-1][1] is None:
            call.holds[-1][1] = now

    def hold(self, call_id: str, *, by: str) -> None:
        """Put a connected call on hold from the API: the customer hears the hold music, the
        agent silence. 404 unknown call; 409 not connected or already held."""
        call = self._live_call(call_id)
        if call.connected is None:
            raise CallControlError(409, f"call {call_id} is not connected")
        if call.hold_started is not None:
            raise CallControlError(409, f"call {call_id} is already on hold")
        self._audit(by, "call.hold", kv(call=call_id))
        self._start_hold(call, by)

    def resume(self, call_id: str, *, by: str) -> None:
        """Take a held call off hold. 404 unknown call; 409 not on hold."""
        call = self._live_call(call_id)
        if call.hold_started is None:
            raise CallControlError(409, f"call {call_id} is not on hold")
        self._audit(by, "call.resume", kv(call=call_id))
        self._end_hold(call, by)

    # -- recording pause / resume -------------------------------------------------------------

    def _agent_digit_call(self, media: int) -> Call | None:
        """The connected call whose agent side is engine leg ``media``."""
        own = self._by_media.get(media)
        if own is not None and own.direction == "inbound":
            return None  # a caller's leg (an IVR digit): no agent side, no need to look
        if own is not None:
            # Outbound calls: the call's own leg is the agent's.
            return own if own.connected is not None and own.ended_at is None else None
        for call in self.calls.values():
            if call.connected is None or call.ended_at is not None:
                continue
            agent_media = call.connected.media if call.direction == "inbound" else call.media
            if agent_media == media:
                return call
        return None

    def _in_call_digit(self, call: Call, digit: str) -> None:
        """``*1`` pauses the recording, ``*2`` resumes it (the agent's RFC 4733 digits)."""
        from appliance.acd.desk import DEFAULT_CODES, DeskError, parse_feature_code

        codes = self.feature_codes or DEFAULT_CODES
        call.agent_digits = (call.agent_digits + digit)[-8:] if digit != "*" else "*"
        if not call.agent_digits.startswith("*"):
            call.agent_digits = ""
            return
        try:
            code = parse_feature_code(call.agent_digits, codes)
        except DeskError:
            return  # not complete yet (or not a code)
        if code is None or code.action not in ("record-pause", "record-resume"):
            return
        call.agent_digits = ""
        by = call.agent or "agent"
        try:
            if code.action == "record-pause":
                self.pause_recording(call.call_id, by=by)
            else:
                self.resume_recording(call.call_id, by=by)
        except CallControlError as exc:
            log.info(kv(event="recording_code_refused", call=call.call_id, by=by,
                        status=exc.status, detail=exc.message))

    def pause_recording(self, call_id: str, *, by: str) -> None:
        """Write silence instead of the call's audio (a card number being read). 404 unknown
        call; 409 not recorded or already paused."""
        call = self._live_call(call_id)
        if call.recording is None:
            raise CallControlError(409, f"call {call_id} is not being recorded")
        if call.recording_paused:
            raise CallControlError(409, f"the recording of call {call_id} is already paused")
        self.engine.record_pause(call.recording)
        call.recording_paused = True
        self._audit(by, "recording.paused", kv(call=call_id))
        log.info(kv(event="recording_paused", call=call_id, by=by))
        self._emit("recording.paused", {"call_id": call_id, "by": by}, time.time())

    def resume_recording(self, call_id: str, *, by: str) -> None:
        """Record the call's audio again. 404 unknown call; 409 not paused."""
        call = self._live_call(call_id)
        if call.recording is None or not call.recording_paused:
            raise CallControlError(409, f"the recording of call {call_id} is not paused")
        self.engine.record_resume(call.recording)
        call.recording_paused = False
        self._audit(by, "recording.resumed", kv(call=call_id))
        log.info(kv(event="recording_resumed", call=call_id, by=by))
        self._emit("recording.resumed", {"call_id": call_id, "by": by}, time.time())

    # -- the end of a call ----------------------------------------------------------------------

    def _dialog_ended(self, call: Call, agent_leg: AgentLeg | None,
                      event: DialogTerminated) -> None:
        now = time.time()
        leg = call.leg if agent_leg is None else agent_leg.leg
        if leg.state is LegState.ENDED:
            return
        if event.reason == "bye-received":
            inp = LegInput.BYE
        elif leg.state is LegState.TERMINATING:
            inp = LegInput.BYE_ANSWERED if event.reason == "bye-sent" else LegInput.TIMEOUT
        elif event.reason in ("rejected", "fork-lost", "cancelled"):
            return  # the final response / CallCancelled carries it
        else:
            inp = LegInput.TIMEOUT
        if not leg.can_take(inp):
            return
        leg.handle(inp, now)
        if agent_leg is None:
            if call.end_reason is None and leg.end_reason is not None:
                call.end_reason = leg.end_reason.value
            log.info(kv(event="caller_leg_ended", call=call.call_id, reason=event.reason))
            self._caller_gone(call, leg.end_reason.value if leg.end_reason else event.reason)
            return
        log.info(kv(event="agent_leg_ended", call=call.call_id, agent=agent_leg.agent,
                    reason=event.reason))
        if call.transfer is not None and agent_leg in (call.transfer["from"],
                                                       call.transfer["to"]):
            # The transferring agent or the consulted target hung up (transfer.py).
            self._transfer_party_gone(call, agent_leg)
            return
        if call.connected is agent_leg and call.end_reason is None:
            call.end_reason = (leg.end_reason or EndReason.AGENT_HUNG_UP).value
            self._hangup_caller(call, EndReason.CALLER_HUNG_UP if call.direction == "outbound"
                                else EndReason.AGENT_HUNG_UP)
        self._agent_leg_over(call, agent_leg)
        self._maybe_finish(call)

    def _maybe_finish(self, call: Call) -> None:
        if call.finishing or call.leg.state is not LegState.ENDED:
            if call.ended_at is not None and call.finish_timer is None and not call.finishing:
                call.finish_timer = asyncio.get_running_loop().call_later(
                    FINISH_GRACE, self._finish_now, call)
            return
        if any(a.leg.state is not LegState.ENDED for a in call.agents.values()):
            if call.finish_timer is None:
                call.finish_timer = asyncio.get_running_loop().call_later(
                    FINISH_GRACE, self._finish_now, call)
            return
        self._finish_now(call)

    def _finish_now(self, call: Call) -> None:
        if call.finishing:
            return
        call.finishing = True
        if call.finish_timer is not None:
            call.finish_timer.cancel()
            call.finish_timer = None
        task = asyncio.create_task(self._finish(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, call: Call) -> None:
        now = call.ended_at or time.time()
        self._sync_outside(call)  # an outside call over: the agent may be offered at once
        self._callback_finished(call)
        if call.connected is not None and self.router is not None and (
                call.direction == "inbound") and call.connected.number is None and (
                call.queue is not None):
            call.events.append(("queue.complete", {
                "call_id": call.call_id, "queue": call.queue, "agent": call.agent,
                "talk_s": round(now - (call.talk_started or call.answered_at or now), 3),
                "ended_by": call.end_reason}, now))
            with contextlib.suppress(acd.LocalProtocolError):
                self._route(self.router.handle(acd.CallEnded(call.call_id, call.connected.agent),
                                               self._router_clock()))
        finished: RecordingFinished | None = None
        if call.recording is not None:
            try:
                finished = await asyncio.wait_for(
                    self.engine.record_stop(call.recording), RELEASE_TIMEOUT)
            except (TimeoutError, EngineError) as exc:
                log.error(kv(event="recording_stop_failed", call=call.call_id, error=repr(exc)))
        call.media_figures = self._leg_figures(call.media)
        releases = [self._release_media(call.media)]
        for agent_leg in [*call.agents.values(), *call.finished_agents]:
            if not agent_leg.released:
                agent_leg.released = True
                agent_leg.media_figures = self._leg_figures(agent_leg.media)
                releases.append(self._release_media(agent_leg.media))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*releases, return_exceptions=True),
                                   RELEASE_TIMEOUT)
        self._by_invite.drop_call(call)
        self._by_dialog.drop_call(call)
        # The engine may already have given this leg id to a newer call (the release awaited
        # above freed it): drop the mapping only while it is still this call's.
        if self._by_media.get(call.media) is call:
            del self._by_media[call.media]
        self.calls.pop(call.call_id, None)
        self._sync_outside(call)  # its agents are free of it (if not told already)
        loop = asyncio.get_running_loop()
        if call.direction in ("feature", "supervise"):
            log.info(kv(event="feature_call_ended", call=call.call_id, agent=call.agent or "",
                        legs_active=self.engine.legs_active))
            return
        try:
            recording_id, written = await loop.run_in_executor(
                self._db_thread, self._write_record, call, finished)
        except Exception:
            log.exception(kv(event="call_record_failed", call=call.call_id))
            self._emit("call.ended", {"call_id": call.call_id,
                                      "end_reason": call.end_reason or "system"}, now)
            return
        for kind, payload, at, seq in written:
            if kind not in LIVE_FIRST:
                self._emit(kind, {**payload, "seq": seq}, at)
        self._emit("call.ended", {"call_id": call.call_id,
                                  "end_reason": call.end_reason or "system"}, now)
        self.completed += 1
        log.info(kv(event="call_ended", call=call.call_id, reason=call.end_reason,
                    agent=call.agent or "", recording=recording_id or "",
                    legs_active=self.engine.legs_active))

    def _release_media(self, media: int) -> asyncio.Future[None]:
        self._by_media.pop(media, None)
        try:
            return self.engine.release(media)
        except EngineError as exc:
            log.error(kv(event="media_release_failed", leg=media, error=str(exc)))
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            future.set_result(None)
            return future

    def _write_record(self, call: Call, finished: RecordingFinished | None
                      ) -> tuple[str | None, list[tuple[str, dict[str, Any], float, int]]]:
        """Worker thread: encrypt the recording, then the record and its events in one
        transaction. Returns the recording id and the events written (kind, payload, at,
        seq)."""
        now = call.ended_at or time.time()
        recording_id: str | None = None
        if call.recording_path is not None:
            path = Path(call.recording_path)
            if finished is not None and finished.ok and path.exists():
                try:
                    recording_id = self.recordings.import_wav(
                        path, call_id=call.call_id,
                        caller=call.dialled if call.direction == "outbound" else call.caller,
                        started_at=call.recording_started or now, ended_at=now,
                        agent=call.agent, queue=call.queue)
                except Exception:
                    log.exception(kv(event="recording_import_failed", call=call.call_id))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # never leave plaintext audio behind
        outbound = call.direction == "outbound"
        # Every leg, the carrier legs of outbound calls and transfers (with the number they
        # called) as well as the agents'.
        legs = [(call.leg.record(), call.caller if outbound else None, call.media_figures,
                 None)] + [
            (a.leg.record(), None if outbound or a.number else a.agent, a.media_figures,
             a.number)
            for a in sorted([*call.finished_agents, *call.agents.values()],
                            key=lambda a: a.leg.started_at)]
        legs_json = [{
            "leg": r.leg_id, "direction": r.direction.value, "party": r.party.value,
            "agent": agent, "number": number, "started_at": r.started_at,
            "answered_at": r.answered_at, "ended_at": r.ended_at,
            "end_reason": r.end_reason.value if r.end_reason else None,
            "end_code": r.end_code, "media": media,
        } for r, agent, media, number in legs]
        trace = list(call.run.trace) if call.run is not None else []
        end_reason = call.end_reason or "system"
        row = {
            "call_id": call.call_id, "sip_call_id": call.sip_call_id, "caller": call.caller,
            "dialled": call.dialled, "flow": call.flow_name or None, "queue": call.queue,
            "agent": call.agent, "started_at": call.started_at, "offered_at": call.offered_at,
            "answered_at": call.answered_at, "ended_at": now, "end_reason": end_reason,
            "end_code": call.end_code, "recording_id": recording_id,
            "direction": call.direction, "holds": call.holds, "ended_by": call.ended_by,
            "recording_decision": call.recording_decision,
            "callback_of": self._callback_of(call),
        }
        written: list[tuple[str, dict[str, Any], float, int]] = []
        with eventlog.transaction(self.db) as conn:
            conn.execute("DELETE FROM calls_in_progress WHERE call_id = ?", (call.call_id,))
            conn.execute(
                "INSERT INTO call_records (call_id, sip_call_id, caller, dialled, flow, queue,"
                " agent, started_at, offered_at, answered_at, ended_at, end_reason, end_code,"
                " recording_id, ivr_trace, legs, direction, holds, ended_by,"
                " recording_decision, callback_of) VALUES"
                " (:call_id, :sip_call_id, :caller, :dialled, :flow, :queue, :agent,"
                " :started_at, :offered_at, :answered_at, :ended_at, :end_reason, :end_code,"
                " :recording_id, :ivr_trace, :legs, :direction, :holds, :ended_by,"
                " :recording_decision, :callback_of)",
                {**row, "ivr_trace": json.dumps(trace), "legs": json.dumps(legs_json),
                 "holds": json.dumps(call.holds)})
            message = self._voicemail_rows(conn, call, recording_id, finished, now)
            for kind, payload, at in [*call.events, *message]:
                written.append((kind, payload, at,
                                eventlog.append(self.db, kind, payload, occurred_at=at)))
            record = {**row, "legs": legs_json, "ivr_trace": trace}
            written.append(("call.record", record, now,
                            eventlog.append(self.db, "call.record", record, occurred_at=now)))
        return recording_id, written

    # -- the API (all on the loop) -------------------------------------------------------------

    def active_calls(self) -> list[dict[str, Any]]:
        """The live calls, oldest first: call_id, caller, dialled, queue, agent, state (``ivr``,
        ``queued``, ``ringing``, ``connected``, ``ending``), since (when that state began),
        held, recording_paused."""
        out = []
        for call in sorted(self.calls.values(), key=lambda c: c.started_at):
            if call.direction in ("feature", "supervise"):
                continue
            state, since = self._call_state(call)
            out.append({
                "call_id": call.call_id, "caller": call.caller, "dialled": call.dialled,
                "queue": call.queue, "agent": call.agent, "state": state, "since": since,
                "direction": call.direction,
                "held": call.hold_started is not None,
                "recording_paused": call.recording_paused,
            })
        return out

    def _call_state(self, call: Call) -> tuple[str, float]:
        if call.ended_at is not None or call.finishing:
            return "ending", call.ended_at or call.started_at
        if call.connected is not None:
            return "connected", call.answered_at or call.started_at
        ringing = [a.leg.started_at for a in call.agents.values()
                   if a.leg.state is not LegState.ENDED]
        if ringing:
            return "ringing", min(ringing)
        if call.in_router:
            return "queued", call.queued_at or call.started_at
        return "ivr", call.started_at

    def _live_call(self, call_id: str) -> Call:
        call = self.calls.get(call_id)
        if call is None:
            raise CallControlError(404, f"no live call {call_id!r}")
        if call.ended_at is not None or call.finishing:
            raise CallControlError(409, f"call {call_id} is already ending")
        return call

    def hangup(self, call_id: str, *, by: str) -> None:
        """End a live call from our side (BYE, or a final answer while unanswered); the call
        record says ``end_reason`` ``hung-up-by-api``. Raises
        ``CallControlError`` 404 for an unknown call, 409 for a call already ending. The
        ``call.record`` event carries ``ended_by``; the audit log has the request."""
        call = self._live_call(call_id)
        call.ended_by = by
        call.end_reason = "hung-up-by-api"
        log.info(kv(event="call_hangup_requested", call=call.call_id, by=by))
        self._audit(by, "call.hangup", kv(call=call.call_id))
        for agent_leg in list(call.agents.values()):
            self._hangup_agent(call, agent_leg, EndReason.SYSTEM)
        self._hangup_caller(call, EndReason.SYSTEM)
        if call.ended_at is None:
            # The caller's leg could not take a hang-up (its INVITE not answered yet by any
            # final): end the call's side all the same.
            self._caller_gone(call, "hung-up-by-api")

    def _note_in_progress(self, call: Call, *, agent: str | None = None) -> None:
        """Keep the call in ``calls_in_progress`` until its record is written, so that a crash
        leaves a trace the next start turns into a record. A job of the writer's group commit:
        no transaction (fsync) of its own."""
        row = (call.call_id, call.sip_call_id, call.caller, call.dialled, call.flow_name or None,
               call.direction, call.started_at, call.queue, agent, call.answered_at)
        try:
            self.writer.write(f"calls_in_progress:{call.call_id}", partial(_in_progress, row))
        except WriterError as exc:  # stopping, or the database is stuck: the call goes on
            log.error(kv(event="call_in_progress_failed", call=call.call_id, error=str(exc)))

    def _record_interrupted(self, now: float, recorded: Mapping[str, str] | None = None
                            ) -> None:
        """Database thread, at start: a call record (end reason ``appliance-crashed``) and its
        ``call.record`` event for every call the previous run left in progress, with its
        recording from ``recorded`` (call id -> recording id). It ended at the last event the
        site committed before the crash (at least when it started)."""
        recorded = recorded or {}
        rows = self.db.conn.execute(
            "SELECT call_id, sip_call_id, caller, dialled, flow, direction, started_at, queue,"
            " agent, answered_at FROM calls_in_progress ORDER BY started_at").fetchall()
        if not rows:
            return
        last = self.db.conn.execute("SELECT MAX(occurred_at) FROM events").fetchone()[0]
        with eventlog.transaction(self.db) as conn:
            for (call_id, sip_call_id, caller, dialled, flow, direction, started_at, queue,
                 agent, answered_at) in rows:
                ended_at = max(started_at, answered_at or started_at, min(last or now, now))
                record = {
                    "call_id": call_id, "sip_call_id": sip_call_id, "caller": caller,
                    "dialled": dialled, "flow": flow, "queue": queue, "agent": agent,
                    "started_at": started_at, "offered_at": None, "answered_at": answered_at,
                    "ended_at": ended_at, "end_reason": "appliance-crashed", "end_code": None,
                    "recording_id": recorded.get(call_id), "direction": direction,
                    "holds": [], "ended_by": None, "recording_decision": None}
                conn.execute(
                    "INSERT OR IGNORE INTO call_records (call_id, sip_call_id, caller, dialled,"
                    " flow, queue, agent, started_at, answered_at, ended_at, end_reason, legs,"
                    " direction, recording_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '[]', ?,"
                    " ?)",
                    (call_id, sip_call_id, caller, dialled, flow, queue, agent, started_at,
                     answered_at, ended_at, "appliance-crashed", direction,
                     recorded.get(call_id)))
                eventlog.append(self.db, "call.record", {**record, "legs": [], "ivr_trace": []},
                                occurred_at=ended_at)
                log.warning(kv(event="call_interrupted", call=call_id, agent=agent or "",
                               reason="appliance-crashed"))
            conn.execute("DELETE FROM calls_in_progress")

    def _recover_recordings(self) -> dict[str, str]:
        """Database thread, at start: the plaintext WAVs a crashed run left in its scratch
        directory are made whole (``media_core.recorder.repair``), encrypted into the store and
        removed, and the directory with them; returns call id -> recording id, for the
        interrupted calls' records. A file too torn to keep is removed (logged)."""
        if self._scratch_given is not None:
            return {}
        from media_core.recorder import RecordingError, repair

        in_progress = {r[0]: r for r in self.db.conn.execute(
            "SELECT call_id, sip_call_id, caller, dialled, flow, direction, started_at, queue,"
            " agent, answered_at FROM calls_in_progress")}
        now = time.time()  # the start of a recording whose call left no row
        recorded: dict[str, str] = {}
        for directory in left_scratch_dirs(self.config.site.id, self.config.storage.database):
            for path in sorted(directory.glob("*.wav")):
                call_id = path.stem
                row = in_progress.get(call_id)
                started = (row[9] or row[6]) if row else now
                try:
                    repair(path)
                    # As long as the audio it holds: stereo 16-bit at 8 kHz after the header.
                    seconds = max(0, path.stat().st_size - 44) / (8000 * 2 * 2)
                    if self.recordings is not None:
                        recorded[call_id] = self.recordings.import_wav(
                            path, call_id=call_id, caller=row[2] if row else None,
                            started_at=started, ended_at=started + seconds,
                            agent=row[8] if row else None, queue=row[7] if row else None)
                        log.warning(kv(event="recording_recovered", call=call_id,
                                       recording=recorded[call_id]))
                except (OSError, RecordingError, ValueError) as exc:
                    log.error(kv(event="recording_unrecoverable", call=call_id,
                                 error=str(exc)))
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()  # never leave plaintext audio behind
            with contextlib.suppress(OSError):
                for leftover in directory.iterdir():
                    leftover.unlink()
                directory.rmdir()
        return recorded

    def _audit(self, actor: str, action: str, detail: str) -> None:
        """An audit-log row, committed by the writer (never on the loop)."""
        at = time.time()
        try:
            self.writer.write(f"audit:{action}", lambda conn, _db: audit_chain.append(
                conn, at, actor, action, detail))
        except WriterError as exc:
            log.error(kv(event="audit_failed", action=action, error=str(exc)))

    def _log_event(self, call: Call, kind: str, payload: dict[str, Any], at: float) -> None:
        """Keep one event-log row of the call (written with its record, in one transaction);
        a LIVE_FIRST kind is also handed to ``on_event`` now."""
        call.events.append((kind, payload, at))
        if kind in LIVE_FIRST:
            self._emit(kind, payload, at)

    @staticmethod
    def _screen_facts(call: Call) -> dict[str, Any]:
        """What a screen pop shows of ``call`` (``call.offered`` / ``call.ringing``): caller,
        dialled number, flow, priority, tier and the IVR's variables (a copy: the event may be
        serialised after the flow changed them)."""
        variables = call.variables
        if not variables and call.run is not None:
            # Still in the IVR (an IVR transfer, the offer): never a secret variable.
            variables = call.run.shared_variables()
        return {"caller": call.caller, "dialled": call.dialled, "flow": call.flow_name,
                "priority": call.priority, "tier": call.tier, "variables": dict(variables)}

    def _emit_offered(self, call: Call, customer: dict[str, Any] | None, now: float) -> None:
        """``call.offered`` at the INVITE, with what is known before the IVR runs: the customer
        list's priority and tier, if the caller is listed."""
        self._emit("call.offered", {
            "call_id": call.call_id, **self._screen_facts(call),
            "priority": None if customer is None else customer.get("priority"),
            "tier": None if customer is None else customer.get("tier")}, now)

    def _emit(self, kind: str, payload: dict[str, Any], at: float) -> None:
        """Hand one event to ``on_event``; a failing callback never breaks a call."""
        if self.on_event is None:
            return
        try:
            self.on_event(kind, {**payload, "at": at})
        except Exception:
            log.exception(kv(event="on_event_failed", kind=kind))

    # -- engine events and presence -------------------------------------------------------------

    async def _read_media_events(self) -> None:
        while True:
            event = await self.engine.events.get()
            try:
                self._media_event(event)
            except Exception:
                log.exception(kv(event="call_internal_error", where=type(event).__name__))

    def _arm_media_timeout(self, *media: int) -> None:
        """Watch answered legs for RTP inactivity (``media.rtp_timeout``; RFC 3550 §6.3.5
        style: a party that sends nothing for that long is gone)."""
        seconds = float(self.config.media.rtp_timeout)
        if seconds <= 0:
            return
        for leg in media:
            with contextlib.suppress(EngineError):
                self.engine.set_timeout(leg, seconds)

    def _media_timeout(self, event: MediaTimeout) -> None:
        call = self._by_media.get(event.leg)
        if call is None:
            call = next((c for c in self.calls.values() if any(
                a.media == event.leg for a in c.agents.values())), None)
        if call is None or call.ended_at is not None or call.connected is None:
            return
        if call.hold_started is not None or call.transfer is not None:
            return  # no media is owed while held; re-armed at resume
        log.info(kv(event="media_timeout", call=call.call_id, leg=event.leg,
                    idle_s=round(event.idle_seconds, 1)))
        call.end_reason = "media-timeout"
        for agent_leg in list(call.agents.values()):
            self._hangup_agent(call, agent_leg, EndReason.RTP_TIMEOUT)
        self._hangup_caller(call, EndReason.RTP_TIMEOUT)

    def _media_event(self, event: MediaEvent) -> None:
        if isinstance(event, MediaTimeout):
            self._media_timeout(event)
        elif isinstance(event, DigitReceived):
            agent_call = self._agent_digit_call(event.leg)
            if agent_call is not None:
                self._in_call_digit(agent_call, event.digit)
                return
            call = self._by_media.get(event.leg)
            if call is not None and call.connected is None:
                # Never the digit itself: callers key PINs and card numbers.
                log.info(kv(event="dtmf", call=call.call_id, method=event.method))
                if not self._voicemail_digit(call, event.digit):
                    self._feed_ivr(call, ivr.DigitPressed(event.digit))
        elif isinstance(event, PromptFinished):
            call = self._by_media.get(event.leg)
            if call is not None and call.direction == "feature":
                call.playing = None
                self._hangup_caller(call, EndReason.SYSTEM)
                return
            if call is not None and self._voicemail_prompt_done(call, event):
                return
            if call is not None and call.announce_play is not None and (
                    call.announce_play == event.prompt_id):
                if event.completed:
                    self._next_announcement(call)
                return
            if call is not None and call.queue_play is not None and (
                    call.queue_play == event.prompt_id):
                if event.completed:
                    self._queue_music(call)  # loop until an agent is bridged
                return
            if call is not None and call.playing is not None and (
                    call.playing[0] == event.prompt_id):
                name = call.playing[1]
                call.playing = None
                self._feed_ivr(call, ivr.PromptFinished(name))
                if call.playing is None:
                    self._next_prompt(call)
                return
            held = self._by_hold_leg(event.leg)
            if held is not None and held.hold_play == event.prompt_id and event.completed and (
                    held.hold_started is not None or held.transfer is not None):
                held.hold_play = self.engine.play(event.leg, self.hold_music)  # loop

    async def _presence_loop(self) -> None:
        while True:
            try:
                self._sync_presence()
            except Exception:
                log.exception(kv(event="call_internal_error", where="presence"))
            await asyncio.sleep(PRESENCE_PERIOD)

    def _sync_presence(self) -> None:
        """Without a desk: log in agents who hold a registration, log out those who lost it."""
        if self.router is None or self.service is None or self.desk is not None:
            return
        now = self.service.clock()
        for agent in self.members:
            registered = bool(self.registrar.lookup(agent, now))
            if registered and agent not in self._logged_in:
                self._logged_in.add(agent)
                log.info(kv(event="agent_login", agent=agent, cause="registered"))
                self._route(self.router.handle(acd.AgentLogin(agent), self._router_clock()))
            elif not registered and agent in self._logged_in:
                self._logged_in.discard(agent)
                log.info(kv(event="agent_logout", agent=agent, cause="unregistered"))
                self._route(self.router.handle(acd.AgentLogout(agent), self._router_clock()))

    def _by_hold_leg(self, media: int) -> Call | None:
        """The call whose customer leg ``media`` plays hold music, if any."""
        own = self._by_media.get(media)
        if own is not None:  # the leg is this call's own: no other call's customer leg
            return own if own.hold_play is not None and own.connected is not None and (
                self._customer_media(own) == media) else None
        for call in self.calls.values():
            if call.hold_play is not None and call.connected is not None and (
                    self._customer_media(call) == media):
                return call
        return None

    def _signalling(self) -> DialogSignalling:
        if self.signalling is None:
            raise RuntimeError("call control is not attached to a SIP service")
        return self.signalling


K = TypeVar("K")


class CallIndex(dict[K, tuple[Call, "AgentLeg | None"]]):
    """A map of SIP keys (INVITE transactions, dialogs) to (call, agent leg) that also knows
    each call's keys, so that a call's end drops its own entries instead of walking every live
    call's, and the calls given an entry since ``take_fresh()``."""

    def __init__(self) -> None:
        super().__init__()
        self._keys: dict[str, set[K]] = {}
        self._fresh: dict[str, Call] = {}

    def __setitem__(self, key: K, value: tuple[Call, AgentLeg | None]) -> None:
        old = dict.get(self, key)
        if old is not None and old[0] is not value[0]:
            self._forget(key, old[0])
        dict.__setitem__(self, key, value)
        self._keys.setdefault(value[0].call_id, set()).add(key)
        self._fresh[value[0].call_id] = value[0]

    def __delitem__(self, key: K) -> None:
        old = dict.pop(self, key)
        self._forget(key, old[0])

    def pop(self, key: K, *default: Any) -> Any:  # type: ignore[override]
        """``dict.pop``, keeping the per-call index."""
        if key in self:
            value = dict.__getitem__(self, key)
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def drop_call(self, call: Call) -> None:
        """Remove every entry of ``call``."""
        for key in self._keys.pop(call.call_id, ()):
            entry = dict.get(self, key)
            if entry is not None and entry[0] is call:
                dict.__delitem__(self, key)
        self._fresh.pop(call.call_id, None)

    def take_fresh(self) -> dict[str, Call]:
        """The calls given an entry since the last call (and forget them)."""
        fresh, self._fresh = self._fresh, {}
        return fresh

    def _forget(self, key: K, call: Call) -> None:
        keys = self._keys.get(call.call_id)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._keys[call.call_id]


def _in_progress(row: tuple[Any, ...], conn: Any, _db: Any) -> None:
    """Writer job: insert or update one call's ``calls_in_progress`` row."""
    conn.execute(
        "INSERT INTO calls_in_progress (call_id, sip_call_id, caller, dialled, flow, direction,"
        " started_at, queue, agent, answered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (call_id) DO UPDATE SET queue = excluded.queue, agent = excluded.agent,"
        " answered_at = excluded.answered_at", row)


def announcement_prompts(position: int, estimated_wait: float) -> list[str]:
    """The prompts saying "you are caller number <position>, your estimated wait is about
    <minutes> minute(s)", numbers digit by digit; an unknown wait (``inf``/NaN: nobody
    staffed) is left out, a known one is rounded up to whole minutes (at least 1)."""
    pieces = ["you_are_caller", *(f"digit_{d}" for d in str(max(1, int(position))))]
    if math.isfinite(estimated_wait):
        minutes = max(1, math.ceil(estimated_wait / 60))
        pieces += ["estimated_wait", *(f"digit_{d}" for d in str(minutes)),
                   "minute" if minutes == 1 else "minutes"]
    return pieces


def _confirmation() -> np.ndarray:
    """Two short 880 Hz beeps at -13 dBm0 (0.15 s on, 0.1 s off): "done"."""
    t = np.arange(int(0.15 * 8000)) / 8000
    beep = (0.22 * 32767 * np.sin(2 * np.pi * 880 * t)).astype(np.int16)
    gap = np.zeros(800, dtype=np.int16)
    return np.concatenate([beep, gap, beep, gap])


CONFIRMATION_TONE = _confirmation()
"""What an agent hears after a feature code was applied."""


def _feature_codes(config: SiteConfig) -> Any:
    """The site's feature codes (``agents.feature_codes``, pause reasons, dispositions)."""
    from appliance.acd.desk import FeatureCodes

    section = config.agents
    return FeatureCodes(**{k.replace("-", "_"): v for k, v in section.feature_codes.items()},
                        pause_reasons=tuple(section.pause_reasons),
                        dispositions=tuple(section.dispositions))


SCRATCH_OWNER = "owner"
"""File in a scratch directory: the PID that made it and the site database it records for."""


def _scratch_base() -> Path:
    return Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())


def _scratch_dir(site_id: str, database: str) -> Path:
    """A private directory for the engine's WAV output until it is encrypted; in RAM
    (/dev/shm) where available, so plaintext audio does not reach a disk. Its owner file
    lets the next start of the same site find what a crash left in it."""
    path = Path(tempfile.mkdtemp(prefix=f"edgecc-{site_id}-rec-", dir=_scratch_base()))
    os.chmod(path, 0o700)
    (path / SCRATCH_OWNER).write_text(f"{os.getpid()}\n{str(Path(database).resolve())}\n")
    return path


def left_scratch_dirs(site_id: str, database: str) -> list[Path]:
    """Scratch directories an earlier run of this site left behind: made for the same
    database by a process that is gone (or by this PID, before it re-executed itself)."""
    found = []
    for path in _scratch_base().glob(f"edgecc-{glob.escape(site_id)}-rec-*"):
        try:
            pid_text, owner_db = (path / SCRATCH_OWNER).read_text().splitlines()[:2]
            pid = int(pid_text)
        except (OSError, ValueError):
            continue  # not ours, or being made right now
        if owner_db != str(Path(database).resolve()):
            continue
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running: another appliance's live calls
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        found.append(path)
    return found


def build_router(config: SiteConfig) -> Any | None:
    """The ACD router for ``config.queues`` (None when the site has no queue)."""
    from appliance.acd.router import Router

    if not config.queues:
        return None
    agents = sorted({m for q in config.queues for m in q.members})
    accounts = config.sip.accounts_by_user
    return Router(acd.RouterConfig(
        queues=tuple(acd.QueueConfig(
            q.name, tuple(acd.Member(m, q.penalties.get(m, 0), q.weights.get(m, 1))
                          for m in q.members), strategy=acd.Strategy(q.strategy),
            ring_timeout=q.ring_timeout, wrap_up=float(q.wrap_up), max_wait=q.max_wait,
            callback_retries=q.callback_retries,
            callback_retry_interval=float(q.callback_retry_interval),
            required_skills=tuple(q.required_skills.items()),
            relax_steps=tuple(acd.RelaxStep(float(r.after), r.lower_by, tuple(r.drop))
                              for r in q.relax),
            max_length=q.max_length, max_estimated_wait=q.max_estimated_wait,
            join_empty=acd.EmptyRule(q.join_empty), leave_empty=acd.EmptyRule(q.leave_empty),
            overflow_target=q.overflow or "", rejoin_window=float(q.rejoin_window))
            for q in config.queues),
        agents=tuple(acd.AgentConfig(a, skills=tuple(accounts[a].skills.items()),
                                     max_interactions=accounts[a].max_interactions)
                     for a in agents),
        auto_pause_after=config.agents.auto_pause_after))


def load_call_path(config: SiteConfig) -> tuple[dict[str, Flow], dict[str, np.ndarray]]:
    """The site's IVR flows (checked against prompts and queues) and its prompts.

    Raises ``appliance.ivr.FlowError`` listing every problem, ``PromptFormatError`` for a bad
    prompt file, ``ValueError`` for a DID naming an unknown flow.
    """
    from appliance.ivr import load_flows
    from media_core.prompt import load_prompt

    directory = config.ivr.prompts or Path(__file__).resolve().parent.parent / "data" / "prompts"
    prompts = {p.stem: load_prompt(p) for p in sorted(Path(directory).glob("*.wav"))}
    flows: dict[str, Flow] = {}
    source = config.ivr.flows
    queues = [q.name for q in config.queues]
    if isinstance(source, str):
        base = config.site_dir or Path.cwd()
        flows = load_flows(base / source, prompts=set(prompts), queues=queues)
    elif source:
        site_file = config.site_dir / "site.yaml" if config.site_dir is not None else None
        if site_file is not None and site_file.is_file():
            flows = load_flows(site_file, prompts=set(prompts), queues=queues)
        else:
            flows = load_flows({"flows": source}, prompts=set(prompts), queues=queues)
    for queue in config.queues:
        if queue.music is not None and queue.music not in prompts and (
                queue.music != "hold_music"):
            raise ValueError(f"queues: {queue.name!r} music names prompt {queue.music!r}, "
                             f"which is not in the prompts ({', '.join(sorted(prompts))})")
    for did, flow in config.ivr.dids.items():
        if flow not in flows:
            raise ValueError(f"ivr.dids: {did!r} names flow {flow!r}, which is not defined "
                             f"(flows: {', '.join(sorted(flows)) or 'none'})")
    return flows, prompts


@dataclass
class CallService:
    """What the composition root keeps of call control: the engine, the B2BUA, their DB."""

    engine: MediaEngine
    control: CallControl
    db: sqlite_utils.Database

    def active_calls(self) -> list[dict[str, Any]]:
        """The live calls (``CallControl.active_calls``)."""
        return self.control.active_calls()

    def hangup(self, call_id: str, *, by: str) -> None:
        """End a live call (``CallControl.hangup``); raises ``CallControlError``."""
        self.control.hangup(call_id, by=by)

    def hold(self, call_id: str, *, by: str) -> None:
        """Put a connected call on hold (``CallControl.hold``)."""
        self.control.hold(call_id, by=by)

    def resume(self, call_id: str, *, by: str) -> None:
        """Take a held call off hold (``CallControl.resume``)."""
        self.control.resume(call_id, by=by)

    def pause_recording(self, call_id: str, *, by: str) -> None:
        """Pause the call's recording (``CallControl.pause_recording``)."""
        self.control.pause_recording(call_id, by=by)

    def resume_recording(self, call_id: str, *, by: str) -> None:
        """Resume the call's recording (``CallControl.resume_recording``)."""
        self.control.resume_recording(call_id, by=by)

    def supervise(self, supervisor: str, agent: str, mode: str, *, by: str) -> str:
        """Join a supervisor to an agent's call (``CallControl.supervise``)."""
        return self.control.supervise(supervisor, agent, mode, by=by)

    def dial(self, agent: str, number: str, *, by: str) -> str:
        """Click-to-dial (``CallControl.dial``); returns the call id."""
        return self.control.dial(agent, number, by=by)

    def pending_callbacks(self) -> list[dict[str, Any]]:
        """The queued callbacks still to be made (``CallControl.pending_callbacks``)."""
        return self.control.pending_callbacks()

    def cancel_callback(self, call_id: str, *, by: str) -> None:
        """Withdraw a pending callback (``CallControl.cancel_callback``); raises
        ``CallControlError``."""
        self.control.cancel_callback(call_id, by=by)

    def transfer(self, call_id: str, target: str, *, by: str) -> None:
        """Blind transfer to agent ``target`` (``CallControl.transfer``)."""
        self.control.transfer(call_id, target, by=by)

    def consult(self, call_id: str, target: str, *, by: str) -> None:
        """Attended transfer: hold the caller, ring ``target`` (``CallControl.consult``)."""
        self.control.consult(call_id, target, by=by)

    def complete_transfer(self, call_id: str, *, by: str) -> None:
        """Bridge the caller to the consulted target (``CallControl.complete_transfer``)."""
        self.control.complete_transfer(call_id, by=by)

    def cancel_consult(self, call_id: str, *, by: str) -> None:
        """Back to the caller (``CallControl.cancel_consult``)."""
        self.control.cancel_consult(call_id, by=by)

    @property
    def desk(self) -> Any:
        """The agent desk given at start (None: registered = logged in)."""
        return self.control.desk

    def apply(self, inputs: Iterable[Any]) -> None:
        """Feed the desk's router inputs to the running router (``DeskService``)."""
        self.control.apply_router_inputs(inputs)

    def router_view(self, agent: str) -> Any | None:
        """The router's view of ``agent`` (``DeskService``)."""
        return self.control.router_view(agent)

    async def stop(self) -> None:
        """Stop call control, then the engine, then close the calls' database connection."""
        try:
            await self.control.close()
        finally:
            await self.engine.close()
            self.db.close()


async def start_call_control(config: SiteConfig, service: Any, *, registrar: Any, auth: Any,
                             guard: Any, on_event: EventCallback | None = None,
                             desk: Any | None = None) -> CallService:
    """Build the media engine (``media.rtp_ports``), the router, the IVR and the B2BUA, and
    attach it to the running SIP ``service``. Raises on a bad flow, prompt or site key.

    ``on_event(kind, payload)`` runs on the loop for every event the call path writes and for
    the live-only topics (see ``EventCallback``); ``desk`` is the agents' desk
    (``appliance.acd.desk.AgentDesk``)."""
    from appliance.recording import RecordingStore, load_site_key
    from appliance.store import open_site_db

    flows, prompts = load_call_path(config)
    router = build_router(config)
    bind = config.sip.bind
    media_host = "127.0.0.1" if ipaddress.ip_address(bind).is_unspecified else bind
    # Call records and recordings have a connection of their own, used by one worker thread.
    db = open_site_db(config.storage.database)
    try:
        key_path = config.storage.site_key
        recordings = RecordingStore(db, config.storage.recordings,
                                    load_site_key(key_path.parent, key_path.name))
        engine = MediaEngine(config.media.rtp_ports, host=media_host)
        await engine.start()
    except BaseException:
        db.close()
        raise
    control = CallControl(config, engine=engine, registrar=registrar, auth=auth, guard=guard,
                          flows=flows, prompts=prompts, router=router, db=db,
                          recordings=recordings, media_host=media_host, on_event=on_event,
                          desk=desk)
    control.attach(service)
    await control.start()
    log.info(kv(event="call_control_started", flows=len(flows), prompts=len(prompts),
                queues=len(config.queues), dids=len(config.ivr.dids)))
    return CallService(engine, control, db)
