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
worker thread, never on the event loop.

Agents are logged in to the router while they hold a registration (checked every
``PRESENCE_PERIOD`` s and when a caller joins); feature codes and pause states come later.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import json
import logging
import os
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from appliance import eventlog
from appliance.acd import model as acd
from appliance.calls import DialogSignalling
from appliance.calls.leg import (
    Direction,
    EndReason,
    Leg,
    LegAction,
    LegInput,
    LegState,
    Party,
    response_input,
)
from appliance.config import SiteConfig
from appliance.ivr import runner as ivr
from appliance.ivr.flow import Flow
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
    PromptFinished,
    RecordingFinished,
)
from media_core.sip import SipMessage, build_response, new_tag

__all__ = ["Call", "CallControl", "AgentLeg", "trunk_networks"]

log = logging.getLogger("edgecc.calls")

CAPABILITIES = sdp.Capabilities(codecs=(sdp.PCMU, sdp.PCMA))
"""What the media engine relays and transcodes: G.711 both laws, RFC 4733 events."""
PRESENCE_PERIOD = 1.0
"""Seconds between checks of the agents' registrations (login = registered)."""
FINISH_GRACE = 40.0
"""Seconds after the caller's leg ended before a call is closed even if an agent leg has not
confirmed its end (64·T1 = 32 s bounds any SIP transaction)."""
RELEASE_TIMEOUT = 3.0
"""Seconds to wait for the engine to confirm a leg release or a recording's end."""
MAX_CALLS = 10_000
"""Live calls at most; beyond it a new INVITE gets 503."""
SDP_HEADERS = (("Content-Type", "application/sdp"),)


def trunk_networks(config: SiteConfig) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """The networks whose INVITEs are carrier calls (``trunk.allowed_sources``)."""
    return tuple(ipaddress.ip_network(n) for n in config.trunk.allowed_sources)


@dataclass(eq=False)
class AgentLeg:
    """The B2BUA's outbound leg to one agent's phone."""

    agent: str
    leg: Leg
    media: int
    """Engine leg id."""
    session: sdp.MediaSession
    key: TransactionKey | None = None
    """The INVITE's client transaction."""
    dialog: DialogId | None = None
    offered: bool = True
    """The router still counts this as a ringing offer."""
    released: bool = False


@dataclass(eq=False)
class Call:
    """One trunk call, from its INVITE to its call record."""

    call_id: str
    sip_call_id: str
    caller: str
    dialled: str
    flow_name: str
    key: TransactionKey
    dialog: DialogId
    leg: Leg
    media: int
    session: sdp.MediaSession
    answer_sdp: bytes
    started_at: float
    run: ivr.FlowRun | None = None
    prompts: deque[str] = field(default_factory=deque)
    playing: tuple[int, str] | None = None
    ivr_timer: asyncio.TimerHandle | None = None
    queue: str | None = None
    queued_at: float | None = None
    offered_at: float | None = None
    answered_at: float | None = None
    ended_at: float | None = None
    agent: str | None = None
    agents: dict[str, AgentLeg] = field(default_factory=dict)
    """Agent legs still live (or bridged)."""
    finished_agents: list[AgentLeg] = field(default_factory=list)
    """Agent legs that ended without being bridged (rang out, rejected, cancelled)."""
    connected: AgentLeg | None = None
    recording: int | None = None
    recording_path: str | None = None
    recording_started: float | None = None
    events: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    end_reason: str | None = None
    end_code: int | None = None
    finishing: bool = False
    finish_timer: asyncio.TimerHandle | None = None
    in_router: bool = False


class CallControl:
    """The B2BUA: see the module docstring. Built and started by the composition root."""

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
    ) -> None:
        self.config = config
        self.engine = engine
        self.registrar = registrar
        self.auth = auth
        self.guard = guard
        self.flows = dict(flows)
        self.prompts = dict(prompts)
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
        self._by_dialog: dict[DialogId, tuple[Call, AgentLeg | None]] = {}
        self._by_invite: dict[TransactionKey, tuple[Call, AgentLeg | None]] = {}
        self._by_media: dict[int, Call] = {}
        self._logged_in: set[str] = set()
        self._router_timer: asyncio.TimerHandle | None = None
        self._router_now = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._events_task: asyncio.Task[None] | None = None
        self._presence_task: asyncio.Task[None] | None = None
        self._db_thread = concurrent.futures.ThreadPoolExecutor(1, "edgecc-calls-db")
        self._scratch_given = scratch_dir
        self._scratch: Path | None = scratch_dir
        self.completed = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def attach(self, service: Any) -> DialogSignalling:
        """Hook into a running ``SipService`` through ``DialogSignalling``."""
        self.service = service
        self.signalling = DialogSignalling.attach(
            service, on_event=self.on_dialog_event, admit=self.admit,
            contact_user="edgecc")
        return self.signalling

    async def start(self) -> None:
        """Read the engine's events and keep agents' presence in step with registrations."""
        self._events_task = asyncio.create_task(self._read_media_events())
        self._presence_task = asyncio.create_task(self._presence_loop())

    async def close(self) -> None:
        """Stop reading events and timers; live calls are dropped without records."""
        for task in (self._events_task, self._presence_task, *self._tasks):
            if task is not None:
                task.cancel()
        for call in self.calls.values():
            if call.ivr_timer is not None:
                call.ivr_timer.cancel()
            if call.finish_timer is not None:
                call.finish_timer.cancel()
        if self._router_timer is not None:
            self._router_timer.cancel()
        if self.signalling is not None:
            self.signalling.close()
        if self.calls:
            log.warning(kv(event="calls_dropped_at_stop", calls=len(self.calls)))
        for call in self.calls.values():
            if call.recording is not None:
                with contextlib.suppress(EngineError, KeyError):
                    self.engine.record_stop(call.recording)
            if call.recording_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(call.recording_path)  # no plaintext audio left behind
        self._db_thread.shutdown(wait=True, cancel_futures=False)
        if self._scratch is not None and self._scratch_given is None:
            with contextlib.suppress(OSError):
                self._scratch.rmdir()  # empty unless a call was cut off mid-recording

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
        # Agents' own calls need outbound dial rules, which do not exist yet.
        log.info(kv(event="call_refused", reason="no-outbound-route", agent=result.user))
        return build_response(request, 403, "No Outbound Route", to_tag=new_tag())

    # -- dialog events -----------------------------------------------------------------------

    def on_dialog_event(self, event: Output) -> None:
        """``DialogSignalling``'s ``on_event``: every call-control event of the dialog layer."""
        try:
            self._dialog_event(event)
        except Exception:
            log.exception(kv(event="call_internal_error", where=type(event).__name__))

    def _dialog_event(self, event: Output) -> None:
        if isinstance(event, IncomingCall):
            self._incoming(event)
        elif isinstance(event, ResponseReceived):
            entry = self._by_invite.get(event.key)
            if entry is not None and entry[1] is not None:
                self._agent_response(entry[0], entry[1], event.response, event.dialog)
        elif isinstance(event, RequestFailed):
            entry = self._by_invite.get(event.key)
            if entry is not None and entry[1] is not None and event.method == "INVITE":
                self._agent_failed(entry[0], entry[1], 408)
        elif isinstance(event, CallCancelled):
            entry = self._by_invite.get(event.key)
            if entry is not None and entry[1] is None:
                self._caller_cancelled(entry[0])
        elif isinstance(event, AckReceived):
            entry = self._by_dialog.get(event.dialog)
            if entry is not None and entry[1] is None and entry[0].leg.can_take(LegInput.ACK):
                entry[0].leg.handle(LegInput.ACK, time.time())
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
            # A late offer (INVITE without SDP) would need the offer in our 183/200; the
            # trunks we serve send one in the INVITE.
            signalling.answer(event.key, 488, reason="Offer Required")
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
        call.run = ivr.FlowRun(self.flows[flow_name], now, caller)
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
        self._caller_gone(call, reason.value)

    def _caller_gone(self, call: Call, reason: str) -> None:
        """The caller's side is over: stop the IVR, leave the queue, end the agent legs."""
        now = time.time()
        if call.ended_at is None:
            call.ended_at = now
            call.end_reason = call.end_reason or reason
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
        for agent_leg in list(call.agents.values()):
            self._hangup_agent(call, agent_leg, EndReason.CALLER_HUNG_UP)
        self._maybe_finish(call)

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
                assert call.run is not None
                pending.extend(call.run.handle(ivr.HttpResult(
                    action.request_id, error="http lookups are not available yet"),
                    time.time()))
            elif isinstance(action, ivr.RouteToQueue):
                self._stop_ivr(call)
                self._enter_queue(call, action)
            elif isinstance(action, ivr.Hangup):
                self._stop_ivr(call)
                call.end_reason = f"ivr-{action.reason}"
                self._hangup_caller(call, EndReason.SYSTEM)
            else:  # Transfer, Voicemail, OfferCallback: later issues
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

    def _stop_ivr(self, call: Call) -> None:
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

    def _enter_queue(self, call: Call, action: ivr.RouteToQueue) -> None:
        now = time.time()
        if self.router is None or action.queue not in self.queues:
            log.error(kv(event="queue_unknown", call=call.call_id, queue=action.queue))
            call.end_reason = "no-queue"
            self._hangup_caller(call, EndReason.SYSTEM)
            return
        self._sync_presence()
        call.queue = action.queue
        call.queued_at = now
        call.in_router = True
        call.events.append(("queue.enter", {
            "call_id": call.call_id, "queue": action.queue, "caller": call.caller,
            "priority": action.priority, "dialled": call.dialled}, now))
        log.info(kv(event="queue_enter", call=call.call_id, queue=action.queue))
        self._route(self.router.handle(acd.CallerJoin(
            call.call_id, action.queue, caller_number=call.caller, priority=action.priority),
            self._router_clock()))

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
                call.end_reason = f"overflow-{decision.reason.value}"
                self._hangup_caller(call, EndReason.SYSTEM)
            elif isinstance(decision, acd.AutoPause):
                log.info(kv(event="agent_auto_paused", agent=decision.agent,
                            missed=decision.missed))
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

    def _offer(self, call: Call, agent: str) -> None:
        signalling = self._signalling()
        now = time.time()
        bindings = self.registrar.lookup(agent, self.service.clock())
        if not bindings:
            self._logged_in.discard(agent)
            self._route(self._router().handle(acd.AgentLogout(agent), self._router_clock()))
            return
        binding = bindings[0]
        try:
            address = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="agent_leg_failed", call=call.call_id, agent=agent,
                         error=str(exc)))
            self._route(self._router().handle(acd.OfferRejected(call.call_id, agent),
                                              self._router_clock()))
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        # The same agent may be rung again for this caller (nobody else left): a new leg.
        leg_id = f"{call.call_id}:{agent}:{len(call.agents) + len(call.finished_agents) + 1}"
        leg = Leg(leg_id, Direction.OUTBOUND, Party.AGENT, now)
        agent_leg = AgentLeg(agent, leg, address.leg, session)
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
            destination=_destination(binding),
            body=session.offer().to_bytes())
        agent_leg.key = key
        self._by_invite[key] = (call, agent_leg)
        log.info(kv(event="agent_offered", call=call.call_id, agent=agent, queue=call.queue,
                    contact=binding.contact))

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
        if LegAction.SEND_BYE in actions or call.ended_at is not None or call.connected:
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
        self._connect(call, agent_leg, now)

    def _connect(self, call: Call, agent_leg: AgentLeg, now: float) -> None:
        call.connected = agent_leg
        call.agent = agent_leg.agent
        call.answered_at = now
        agent_leg.offered = False
        self._route(self._router().handle(acd.OfferAccepted(call.call_id, agent_leg.agent),
                                          self._router_clock()))
        self._stop_ivr(call)
        self.engine.bridge(call.media, agent_leg.media)
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        call.events.append(("queue.connect", {
            "call_id": call.call_id, "queue": call.queue, "agent": agent_leg.agent,
            "wait_s": round(now - (call.queued_at or now), 3),
            "ring_s": round(now - agent_leg.leg.started_at, 3)}, now))
        settings = self.queues.get(call.queue or "")
        if settings is not None and settings.record and self.recordings is not None:
            if self._scratch is None:
                self._scratch = _scratch_dir(self.config.site.id)
            path = self._scratch / f"{call.call_id}.wav"
            try:
                call.recording = self.engine.record_start(str(path), call.media, agent_leg.media)
            except (EngineError, OSError) as exc:
                log.error(kv(event="recording_failed", call=call.call_id, error=str(exc)))
            else:
                call.recording_path = str(path)
                call.recording_started = now
        log.info(kv(event="call_connected", call=call.call_id, agent=agent_leg.agent,
                    queue=call.queue, recording=call.recording is not None))

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
        if call.connected is not agent_leg:
            # Only a leg that was never bridged is released at once; a bridged one goes with
            # the call (after its recording stopped).
            call.agents.pop(agent_leg.leg.leg_id, None)
            call.finished_agents.append(agent_leg)
            self._release_agent_media(agent_leg)

    def _release_agent_media(self, agent_leg: AgentLeg) -> None:
        if not agent_leg.released:
            agent_leg.released = True
            self._release_media(agent_leg.media)

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
                signalling.answer(event.key, 200, headers=SDP_HEADERS,
                                  body=session.offer().to_bytes())
                return
            try:
                negotiated = session.answer(sdp.parse(event.request.body))
            except sdp.SdpError as exc:
                signalling.answer(event.key, exc.status)
                return
            self._apply_media(media, negotiated)
            signalling.answer(event.key, 200, headers=SDP_HEADERS,
                              body=negotiated.sdp.to_bytes())
        elif method in ("INFO", "UPDATE", "NOTIFY"):
            signalling.answer(event.key, 200)
        else:  # REFER: transfers come with a later issue
            signalling.answer(event.key, 501)

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
        if call.connected is agent_leg and call.end_reason is None:
            call.end_reason = (leg.end_reason or EndReason.AGENT_HUNG_UP).value
            self._hangup_caller(call, EndReason.AGENT_HUNG_UP)
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
        if call.connected is not None and self.router is not None:
            call.events.append(("queue.complete", {
                "call_id": call.call_id, "queue": call.queue, "agent": call.agent,
                "talk_s": round(now - (call.answered_at or now), 3),
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
        releases = [self._release_media(call.media)]
        for agent_leg in [*call.agents.values(), *call.finished_agents]:
            if not agent_leg.released:
                agent_leg.released = True
                releases.append(self._release_media(agent_leg.media))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*releases, return_exceptions=True),
                                   RELEASE_TIMEOUT)
        for key in [k for k, v in self._by_invite.items() if v[0] is call]:
            del self._by_invite[key]
        for dialog in [d for d, v in self._by_dialog.items() if v[0] is call]:
            del self._by_dialog[dialog]
        self._by_media.pop(call.media, None)
        self.calls.pop(call.call_id, None)
        loop = asyncio.get_running_loop()
        try:
            recording_id = await loop.run_in_executor(
                self._db_thread, self._write_record, call, finished)
        except Exception:
            log.exception(kv(event="call_record_failed", call=call.call_id))
            return
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

    def _write_record(self, call: Call, finished: RecordingFinished | None) -> str | None:
        """Worker thread: encrypt the recording, then the record and its events in one
        transaction."""
        now = call.ended_at or time.time()
        recording_id: str | None = None
        if call.recording_path is not None:
            path = Path(call.recording_path)
            if finished is not None and finished.ok and path.exists():
                try:
                    recording_id = self.recordings.import_wav(
                        path, call_id=call.call_id, caller=call.caller,
                        started_at=call.recording_started or now, ended_at=now,
                        agent=call.agent, queue=call.queue)
                except Exception:
                    log.exception(kv(event="recording_import_failed", call=call.call_id))
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # never leave plaintext audio behind
        legs = [(call.leg.record(), None)] + [(a.leg.record(), a.agent) for a in sorted(
            [*call.finished_agents, *call.agents.values()], key=lambda a: a.leg.started_at)]
        legs_json = [{
            "leg": r.leg_id, "direction": r.direction.value, "party": r.party.value,
            "agent": agent, "started_at": r.started_at, "answered_at": r.answered_at,
            "ended_at": r.ended_at, "end_reason": r.end_reason.value if r.end_reason else None,
            "end_code": r.end_code,
        } for r, agent in legs]
        trace = list(call.run.trace) if call.run is not None else []
        end_reason = call.end_reason or "system"
        row = {
            "call_id": call.call_id, "sip_call_id": call.sip_call_id, "caller": call.caller,
            "dialled": call.dialled, "flow": call.flow_name, "queue": call.queue,
            "agent": call.agent, "started_at": call.started_at, "offered_at": call.offered_at,
            "answered_at": call.answered_at, "ended_at": now, "end_reason": end_reason,
            "end_code": call.end_code, "recording_id": recording_id,
        }
        with eventlog.transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO call_records (call_id, sip_call_id, caller, dialled, flow, queue,"
                " agent, started_at, offered_at, answered_at, ended_at, end_reason, end_code,"
                " recording_id, ivr_trace, legs) VALUES"
                " (:call_id, :sip_call_id, :caller, :dialled, :flow, :queue, :agent,"
                " :started_at, :offered_at, :answered_at, :ended_at, :end_reason, :end_code,"
                " :recording_id, :ivr_trace, :legs)",
                {**row, "ivr_trace": json.dumps(trace), "legs": json.dumps(legs_json)})
            for kind, payload, at in call.events:
                eventlog.append(self.db, kind, payload, occurred_at=at)
            eventlog.append(self.db, "call.record", {**row, "legs": legs_json,
                                                     "ivr_trace": trace}, occurred_at=now)
        return recording_id

    # -- engine events and presence -------------------------------------------------------------

    async def _read_media_events(self) -> None:
        while True:
            event = await self.engine.events.get()
            try:
                self._media_event(event)
            except Exception:
                log.exception(kv(event="call_internal_error", where=type(event).__name__))

    def _media_event(self, event: MediaEvent) -> None:
        if isinstance(event, DigitReceived):
            call = self._by_media.get(event.leg)
            if call is not None and call.connected is None:
                log.info(kv(event="dtmf", call=call.call_id, digit=event.digit,
                            method=event.method))
                self._feed_ivr(call, ivr.DigitPressed(event.digit))
        elif isinstance(event, PromptFinished):
            call = self._by_media.get(event.leg)
            if call is not None and call.playing is not None and (
                    call.playing[0] == event.prompt_id):
                name = call.playing[1]
                call.playing = None
                self._feed_ivr(call, ivr.PromptFinished(name))
                if call.playing is None:
                    self._next_prompt(call)

    async def _presence_loop(self) -> None:
        while True:
            try:
                self._sync_presence()
            except Exception:
                log.exception(kv(event="call_internal_error", where="presence"))
            await asyncio.sleep(PRESENCE_PERIOD)

    def _sync_presence(self) -> None:
        """Log in agents who hold a registration, log out those who lost it."""
        if self.router is None or self.service is None:
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

    def _signalling(self) -> DialogSignalling:
        if self.signalling is None:
            raise RuntimeError("call control is not attached to a SIP service")
        return self.signalling


def _destination(binding: Any) -> Source | None:
    """Where to send the INVITE: the address the REGISTER came from (RFC 5626 §5 style flow,
    so a phone behind NAT is reached), else the contact itself."""
    received = getattr(binding, "received", None)
    if not received:
        return None
    host, _, port = received.rpartition(":")
    if not port.isdigit():
        return None
    return Source(binding.transport or "UDP", host.strip("[]"), int(port))


def _scratch_dir(site_id: str) -> Path:
    """A private directory for the engine's WAV output until it is encrypted; in RAM
    (/dev/shm) where available, so plaintext audio does not reach a disk."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    path = Path(tempfile.mkdtemp(prefix=f"edgecc-{site_id}-rec-", dir=base))
    os.chmod(path, 0o700)
    return path


def build_router(config: SiteConfig) -> Any | None:
    """The ACD router for ``config.queues`` (None when the site has no queue)."""
    from appliance.acd.router import Router

    if not config.queues:
        return None
    agents = sorted({m for q in config.queues for m in q.members})
    return Router(acd.RouterConfig(
        queues=tuple(acd.QueueConfig(
            q.name, tuple(acd.Member(m) for m in q.members), strategy=acd.Strategy(q.strategy),
            ring_timeout=q.ring_timeout, wrap_up=float(q.wrap_up), max_wait=q.max_wait)
            for q in config.queues),
        agents=tuple(acd.AgentConfig(a) for a in agents)))


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

    async def stop(self) -> None:
        """Stop call control, then the engine, then close the calls' database connection."""
        try:
            await self.control.close()
        finally:
            await self.engine.close()
            self.db.close()


async def start_call_control(config: SiteConfig, service: Any, *, registrar: Any, auth: Any,
                             guard: Any) -> CallService:
    """Build the media engine (``media.rtp_ports``), the router, the IVR and the B2BUA, and
    attach it to the running SIP ``service``. Raises on a bad flow, prompt or site key."""
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
                          recordings=recordings, media_host=media_host)
    control.attach(service)
    await control.start()
    log.info(kv(event="call_control_started", flows=len(flows), prompts=len(prompts),
                queues=len(config.queues), dids=len(config.ivr.dids)))
    return CallService(engine, control, db)
