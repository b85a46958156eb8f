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
import math
import os
import random
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from appliance import eventlog
from appliance.acd import model as acd
from appliance.calls import CallControlError, DialogSignalling
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
from appliance.config import SiteConfig
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
           "EventCallback", "start_call_control", "trunk_networks"]

log = logging.getLogger("edgecc.calls")

CAPABILITIES = sdp.Capabilities(codecs=(sdp.PCMU, sdp.PCMA))
"""What the media engine relays and transcodes: G.711 both laws, RFC 4733 events."""
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
MAX_CALLS = 10_000
"""Live calls at most; beyond it a new INVITE gets 503."""
SDP_HEADERS = (("Content-Type", "application/sdp"),)
LIVE_FIRST = frozenset({"queue.enter", "queue.connect", "call.hold", "call.resume",
                        "call.transfer"})
"""Event-log kinds ``on_event`` hears when they happen (without ``seq``), not again when the
call's rows are written (at its end, in one transaction): the wallboard sees a caller wait and
an agent answer at once."""
_SHIPPED_PROMPTS = Path(__file__).resolve().parent.parent / "data" / "prompts"
ANNOUNCE_PROMPTS = ("you_are_caller", "estimated_wait", "minute", "minutes",
                    *(f"digit_{d}" for d in range(10)))
"""Prompts of the position / estimated-wait announcement (shipped; a site's own replace them)."""
_DIAL_REFUSALS = {
    "address-incomplete": "Address Incomplete", "role-may-not-dial": "Role May Not Dial",
    "premium": "Premium Numbers Not Allowed", "international": "International Not Allowed",
    "not-allowed": "Number Not Allowed", "too-many-calls": "Busy Here",
}
"""Reason phrases of dial-rule refusals (RFC 3261 §21.4: 403, 484, 486)."""

EventCallback = Callable[[str, dict[str, Any]], None]
"""``on_event(kind, payload)``: every event-log row of the call path (payload plus ``seq`` and
``at``) and the live-only topics (``call.offered``, ``call.ringing``, ``call.ended``, ...)."""


@dataclass(frozen=True)
class InternalDial:
    """An agent's phone dials another agent's extension (a consultation before an attended
    transfer, or a colleague): rung directly, never through the carrier."""

    number: str
    """The extension (the other agent's SIP user)."""
    record: bool = False
    internal: bool = True


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
    transfer: bool = False
    """This leg rings the target of a transfer."""
    number: str | None = None
    """A leg to the carrier: the number it calls (None: an agent's phone)."""
    recorded: bool = False
    """The call's recording taps this leg's media (released only with the call)."""
    media_figures: dict[str, Any] | None = None
    """The engine's counters of this leg when it was released (the record's ``media``)."""


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
    media_figures: dict[str, Any] | None = None
    """The engine's counters of the caller's leg when it was released."""
    lookup: asyncio.Task[None] | None = None
    """The IVR's CRM look-up in flight, if any."""
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
    ended_by: str | None = None
    """Who ended the call through the API (``hangup``), else None."""
    direction: str = "inbound"
    """``inbound`` (carrier -> IVR -> agent) or ``outbound`` (an agent's phone -> carrier)."""
    record_outbound: bool = False
    """Outbound: the dial rules ask for a recording."""
    trunk_auth_sent: bool = False
    """Outbound: the carrier's challenge was answered once (a second one fails the call)."""
    holds: list[list[float | None]] = field(default_factory=list)
    """Hold periods, ``[start, end]`` (end None while held)."""
    hold_started: float | None = None
    """When the current hold began (None: not held)."""
    hold_play: int | None = None
    """The engine prompt id of the hold music playing."""
    talk_started: float | None = None
    """When the current agent's talk began (the answer, or the transfer to them)."""
    recording_decision: str | None = None
    """Why the call is or is not recorded: ``always``, ``never``, ``sampled-in N%``,
    ``sampled-out N%``."""
    recording_paused: bool = False
    """The recording writes silence (``*1`` / the API) until resumed."""
    agent_digits: str = ""
    """RFC 4733 digits from the agent's phone during the call, for in-call codes."""
    click_to_dial: bool = False
    """Outbound from the API: we rang the agent's phone first (``dial``)."""
    supervising: tuple[str, str] | None = None
    """A supervisor's call: (mode, the supervised call's id)."""
    supervisors: list[Call] = field(default_factory=list)
    """The supervisors' calls joined to this call."""
    transfer: dict[str, Any] | None = None
    """The transfer in progress: from (AgentLeg), to (AgentLeg), target, by, kind, notify
    (the REFER's dialog and event id, or None for the API)."""
    queue_play: int | None = None
    """The engine prompt id of the queue's music playing to the waiting caller, if any."""
    internal: bool = False
    """Outbound to another agent's extension (``InternalDial``), not through the carrier."""
    ivr_transfer: AgentLeg | None = None
    """The leg an IVR ``transfer`` node rings, until it answers or fails."""
    ivr_transfer_timer: asyncio.TimerHandle | None = None
    announce_timer: asyncio.TimerHandle | None = None
    """When the queue's next position / wait announcement is due."""
    announcement: deque[str] = field(default_factory=deque)
    """Prompts of the announcement still to play."""
    announce_play: int | None = None
    """The engine prompt id of the announcement's prompt playing, if any."""


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
        self._by_dialog: dict[DialogId, tuple[Call, AgentLeg | None]] = {}
        self._by_invite: dict[TransactionKey, tuple[Call, AgentLeg | None]] = {}
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
        """Read the engine's events; with a desk, bring the router to the persisted presence
        and run the watchdog, else keep presence in step with registrations."""
        self._events_task = asyncio.create_task(self._read_media_events())
        if self.desk is not None:
            self.apply_router_inputs(self.desk.restore(time.time()))
            self._watchdog_task = asyncio.create_task(self._watchdog_loop())
        else:
            self._presence_task = asyncio.create_task(self._presence_loop())

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
        self._db_thread.shutdown(wait=True, cancel_futures=False)
        if self._scratch is not None and self._scratch_given is None:
            with contextlib.suppress(OSError):
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

    def _admit_agent_call(self, request: SipMessage, agent: str) -> SipMessage | None:
        """An authenticated agent's INVITE: the dial rules decide (docs/calls.md, "Dial
        rules"); a refusal is the response, None lets the INVITE through."""
        from appliance.calls.dialling import check_dial

        dialled = request.request_uri.user or ""
        refusal = self._feature_code(request, agent, dialled)
        if refusal is not False:
            return refusal  # type: ignore[return-value]
        if dialled in self.config.sip.accounts_by_user and dialled != agent:
            # Another agent's extension: rung directly (no dial rules, no carrier).
            if not self.registrar.lookup(dialled, self.service.clock()):
                log.info(kv(event="call_refused", reason="agent-unavailable", agent=agent,
                            dialled=dialled))
                return build_response(request, 480, "Agent Unavailable", to_tag=new_tag())
            if len(self._agent_invites) >= MAX_CALLS:
                self._agent_invites.clear()
            self._agent_invites[request.call_id] = (agent, InternalDial(dialled))
            return None
        if self.config.trunk.carrier is None:
            log.info(kv(event="call_refused", reason="no-outbound-route", agent=agent))
            return build_response(request, 403, "No Outbound Route", to_tag=new_tag())
        account = self.config.sip.accounts_by_user.get(agent)
        role = getattr(account, "role", "agent")
        live = sum(1 for c in self.calls.values()
                   if c.direction == "outbound" and c.caller == agent and c.ended_at is None)
        decision = check_dial(self.config.dialling, role, dialled, live)
        if not decision.allowed:
            log.info(kv(event="call_refused", reason=decision.reason, agent=agent, role=role,
                        dialled=dialled))
            phrase = _DIAL_REFUSALS.get(decision.reason, "Forbidden")
            return build_response(request, decision.status, phrase, to_tag=new_tag())
        if len(self._agent_invites) >= MAX_CALLS:
            self._agent_invites.clear()  # never grows without bound; the phones retry
        self._agent_invites[request.call_id] = (agent, decision)
        return None

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
        self._emit("call.offered", {"call_id": call_id, "caller": caller, "dialled": dialled,
                                    "flow": flow_name}, now)
        call.run = ivr.FlowRun(self.flows[flow_name], now, caller, dialled=dialled,
                               customer=listed_customer(self.config.ivr.customers, caller))
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
                inputs = desk.unpause(agent, now, actor=agent, source=source)
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
                inputs = self.desk.watchdog(views, self.live_calls_by_agent(), time.time(),
                                            held=router_calls(self.router.snapshot()))
                self.apply_router_inputs(inputs)
            except Exception:
                log.exception(kv(event="call_internal_error", where="watchdog"))

    # -- outbound: an agent's phone -> the carrier ---------------------------------------------

    def _outgoing(self, event: IncomingCall, agent: str, decision: Any) -> None:
        """An agent's admitted INVITE: answer its offer with an engine leg, dial the carrier
        with a second one; the agent's phone hears ringing until the carrier answers."""
        signalling = self._signalling()
        request = event.request
        now = time.time()
        if len(self.calls) >= MAX_CALLS:
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        if not request.body:
            signalling.answer(event.key, 488, reason="Offer Required")
            return
        try:
            offer = sdp.parse(request.body)
        except sdp.SdpError as exc:
            log.info(kv(event="call_refused", reason="bad-sdp", agent=agent, detail=str(exc)))
            signalling.answer(event.key, 400, reason="Bad Session Description")
            return
        try:
            near = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="call_refused", reason="no-media-ports", error=str(exc)))
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, near.rtp_port,
                                   rtcp_port=near.rtcp_port)
        try:
            negotiated = session.answer(offer)
        except sdp.NotAcceptable as exc:
            log.info(kv(event="call_refused", reason="no-common-codec", agent=agent,
                        detail=exc.reason))
            self._release_media(near.leg)
            signalling.answer(event.key, 488)
            return
        try:
            far = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="call_refused", reason="no-media-ports", error=str(exc)))
            self._release_media(near.leg)
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        self._apply_media(near.leg, negotiated)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:agent", Direction.INBOUND, Party.AGENT, now)
        call = Call(call_id, request.call_id, agent, decision.number, "", event.key,
                    event.dialog, leg, near.leg, session, negotiated.sdp.to_bytes(), now,
                    agent=agent, direction="outbound", record_outbound=decision.record,
                    internal=getattr(decision, "internal", False))
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[near.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        far_session = sdp.MediaSession(CAPABILITIES, self.media_host, far.rtp_port,
                                       rtcp_port=far.rtcp_port)
        if call.internal:
            far_leg = AgentLeg(decision.number, Leg(f"{call_id}:{decision.number}",
                                                    Direction.OUTBOUND, Party.AGENT, now),
                               far.leg, far_session, offered=False)
        else:
            # The far party is the customer: "caller" in the leg's words.
            far_leg = AgentLeg(agent, Leg(f"{call_id}:carrier", Direction.OUTBOUND,
                                          Party.CALLER, now), far.leg, far_session,
                               offered=False, number=decision.number)
        call.agents[far_leg.leg.leg_id] = far_leg
        call.offered_at = now
        call.events.append(("call.dial", {
            "call_id": call_id, "agent": agent, "number": decision.number}, now))
        log.info(kv(event="call_dialling", call=call_id, agent=agent, number=decision.number,
                    sip_call_id=request.call_id))
        self._emit("call.dialling", {"call_id": call_id, "agent": agent,
                                     "number": decision.number}, now)
        far_leg.leg.handle(LegInput.DIAL, now)
        if call.internal:
            self._dial_extension(call, far_leg)
        else:
            self._dial_carrier(call, far_leg)

    def _dial_extension(self, call: Call, far_leg: AgentLeg) -> None:
        """INVITE to the dialled agent's registered phone (its answers are handled like the
        carrier's: 180 to the calling phone, 200 bridges)."""
        bindings = self.registrar.lookup(far_leg.agent, self.service.clock())
        if not bindings:
            self._carrier_failed(call, far_leg, 480)
            return
        realm = self.config.sip.realm
        key = self._signalling().invite(
            from_party=f"<sip:{call.caller}@{realm}>", to_party=f"<sip:{far_leg.agent}@{realm}>",
            request_uri=bindings[0].contact, destination=_destination(bindings[0]),
            body=far_leg.session.offer().to_bytes())
        far_leg.key = key
        self._by_invite[key] = (call, far_leg)

    def dial(self, agent: str, number: str, *, by: str) -> str:
        """Click-to-dial: ring ``agent``'s phone; when answered, call ``number`` through the
        carrier under the dial rules (the agent hears it ring). Returns the call id. 403 dial
        rule or no carrier; 404 unknown agent; 400 not a number; 409 the phone is not
        registered or has too many calls."""
        from appliance.calls.dialling import check_dial

        account = self.config.sip.accounts_by_user.get(agent)
        if account is None:
            raise CallControlError(404, f"no SIP account {agent!r}")
        if self.config.trunk.carrier is None:
            raise CallControlError(403, "no outbound route (trunk.carrier is not set)")
        live = sum(1 for c in self.calls.values()
                   if c.direction == "outbound" and c.caller == agent and c.ended_at is None)
        decision = check_dial(self.config.dialling, account.role, number, live)
        if not decision.allowed:
            raise CallControlError(_http_status(decision.status),
                                   f"dial rules: {decision.reason}")
        bindings = self.registrar.lookup(agent, self.service.clock())
        if not bindings:
            raise CallControlError(409, f"agent {agent}'s phone is not registered")
        try:
            near = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            raise CallControlError(503, f"no media ports: {exc}") from exc
        now = time.time()
        session = sdp.MediaSession(CAPABILITIES, self.media_host, near.rtp_port,
                                   rtcp_port=near.rtcp_port)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:agent", Direction.OUTBOUND, Party.AGENT, now)
        leg.handle(LegInput.DIAL, now)
        realm = self.config.sip.realm
        binding = bindings[0]
        key = self._signalling().invite(
            from_party=f'"{decision.number}" <sip:{decision.number}@{realm}>',
            to_party=f"<sip:{agent}@{realm}>", request_uri=binding.contact,
            destination=_destination(binding), body=session.offer().to_bytes())
        call = Call(call_id, "", agent, decision.number, "", key, DialogId("", "", ""), leg,
                    near.leg, session, b"", now, agent=agent, direction="outbound",
                    record_outbound=decision.record, click_to_dial=True)
        call.ended_by = None
        self.calls[call_id] = call
        self._by_invite[key] = (call, None)
        self._by_media[near.leg] = call
        self._audit(by, "call.dial", kv(agent=agent, number=decision.number))
        log.info(kv(event="click_to_dial", call=call_id, agent=agent, number=decision.number,
                    by=by))
        self._emit("call.dialling", {"call_id": call_id, "agent": agent,
                                     "number": decision.number}, now)
        return call_id

    def _click_response(self, call: Call, response: SipMessage,
                        dialog: DialogId | None) -> None:
        """The agent's phone answered (or not) our click-to-dial INVITE."""
        status = response.status or 0
        now = time.time()
        if dialog is not None and 200 <= status < 300:
            call.dialog = dialog
            call.sip_call_id = dialog.call_id
            self._by_dialog[dialog] = (call, None)
        inp = response_input(status, response.body)
        if not call.leg.can_take(inp):
            return
        actions = call.leg.handle(inp, now, code=status)
        if status >= 300:
            call.end_reason = "agent-unavailable"
            call.end_code = status
            self._caller_gone(call, call.end_reason)
            return
        if inp is not LegInput.RX_2XX:
            return
        if LegAction.SEND_BYE in actions or call.ended_at is not None:
            if dialog is not None:
                self._signalling().hangup(dialog)
            return
        try:
            negotiated = call.session.receive_answer(sdp.parse(response.body))
            far = self.engine.allocate_leg(self.media_host)
        except (sdp.SdpError, EngineError, OSError) as exc:
            log.info(kv(event="click_to_dial_failed", call=call.call_id, detail=str(exc)))
            call.end_reason = "system"
            self._hangup_caller(call, EndReason.SYSTEM)
            return
        self._apply_media(call.media, negotiated)
        far_session = sdp.MediaSession(CAPABILITIES, self.media_host, far.rtp_port,
                                       rtcp_port=far.rtcp_port)
        far_leg = AgentLeg(call.caller, Leg(f"{call.call_id}:carrier", Direction.OUTBOUND,
                                            Party.CALLER, now), far.leg, far_session,
                           offered=False, number=call.dialled)
        call.agents[far_leg.leg.leg_id] = far_leg
        call.offered_at = now
        call.events.append(("call.dial", {"call_id": call.call_id, "agent": call.caller,
                                          "number": call.dialled}, now))
        far_leg.leg.handle(LegInput.DIAL, now)
        self._dial_carrier(call, far_leg)

    def _dial_carrier(self, call: Call, far_leg: AgentLeg,
                      authorization: tuple[str, str] | None = None) -> None:
        """INVITE to ``trunk.carrier`` (again with ``authorization`` after a challenge)."""
        carrier = self.config.trunk.carrier
        assert carrier is not None  # admission refused the call otherwise
        host = f"[{carrier.host}]" if ":" in carrier.host else carrier.host
        suffix = "" if carrier.transport == "UDP" else f";transport={carrier.transport.lower()}"
        number = far_leg.number or call.dialled
        uri = f"sip:{number}@{host}:{carrier.port}{suffix}"
        auth = self.config.trunk.auth
        from_user = auth.user if auth is not None else call.caller
        try:
            ipaddress.ip_address(carrier.host)
            destination: Source | None = Source(carrier.transport, carrier.host, carrier.port)
        except ValueError:
            destination = None  # a host name: the layer resolves the URI
        key = self._signalling().invite(
            from_party=f"<sip:{from_user}@{host}>", to_party=f"<sip:{number}@{host}>",
            request_uri=uri, destination=destination,
            headers=[authorization] if authorization is not None else [],
            body=far_leg.session.offer().to_bytes())
        far_leg.key = key
        self._by_invite[key] = (call, far_leg)

    def _carrier_response(self, call: Call, far_leg: AgentLeg, key: TransactionKey,
                          response: SipMessage, dialog: DialogId | None) -> None:
        status = response.status or 0
        now = time.time()
        if key != far_leg.key:
            return  # the challenged INVITE's late responses
        if status in (401, 407) and call.ended_at is None and self._answer_challenge(
                call, far_leg, response):
            return
        if dialog is not None and (far_leg.dialog is None or 200 <= status < 300):
            far_leg.dialog = dialog
            self._by_dialog[dialog] = (call, far_leg)
        if status >= 300:
            self._carrier_failed(call, far_leg, status)
            return
        leg = far_leg.leg
        inp = response_input(status, response.body)
        if not leg.can_take(inp):
            return
        actions = leg.handle(inp, now, code=status)
        if inp in (LegInput.RX_180, LegInput.RX_183) and call.direction == "outbound" and (
                call.leg.can_take(LegInput.RING)):
            # The agent's phone plays its own ringback on 180 (RFC 3261 §21.1.2).
            call.leg.handle(LegInput.RING, now)
            self._signalling().answer(call.key, 180)
        if inp is not LegInput.RX_2XX:
            return
        if LegAction.SEND_BYE in actions or call.ended_at is not None:
            if dialog is not None:
                self._signalling().hangup(dialog)
            if leg.state is not LegState.TERMINATING and leg.can_take(LegInput.HANGUP):
                leg.handle(LegInput.HANGUP, now, reason=EndReason.AGENT_HUNG_UP)
            return
        try:
            negotiated = far_leg.session.receive_answer(sdp.parse(response.body))
        except sdp.SdpError as exc:
            log.info(kv(event="carrier_answer_unusable", call=call.call_id, detail=str(exc)))
            call.end_reason = "carrier-answer-unusable"
            self._hangup_agent(call, far_leg, EndReason.SYSTEM)
            self._hangup_caller(call, EndReason.SYSTEM, code=488)
            return
        self._apply_media(far_leg.media, negotiated)
        if call.ivr_transfer is far_leg:
            self._ivr_transfer_answered(call, far_leg, now)
            return
        if far_leg.transfer:
            self._transfer_answered(call, far_leg, now)
            return
        call.connected = far_leg
        if call.agent:
            self._last_call[call.agent] = call.call_id
        call.answered_at = now
        self.engine.bridge(call.media, far_leg.media)
        self._arm_media_timeout(call.media, far_leg.media)
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        call.events.append(("call.connect", {
            "call_id": call.call_id, "agent": call.agent, "number": call.dialled,
            "ring_s": round(now - far_leg.leg.started_at, 3)}, now))
        call.recording_decision = "always" if call.record_outbound else "never"
        if call.record_outbound and self.recordings is not None:
            self._start_recording(call, far_leg.media, call.media, now)
        log.info(kv(event="call_connected", call=call.call_id, agent=call.agent,
                    direction="outbound", recording=call.recording is not None))

    def _answer_challenge(self, call: Call, far_leg: AgentLeg, response: SipMessage) -> bool:
        """Answer the carrier's 401/407 once with ``trunk.auth`` (RFC 3261 §22.2); False when
        it cannot be answered (no credentials, a second challenge, another realm)."""
        from appliance.calls.dialling import trunk_authorization

        auth = self.config.trunk.auth
        status = response.status
        name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        challenge = response.get(name)
        if auth is None or call.trunk_auth_sent or not challenge:
            log.info(kv(event="carrier_auth_failed", call=call.call_id, status=status,
                        reason="no-credentials" if auth is None else "challenged-again"))
            return False
        carrier = self.config.trunk.carrier
        assert carrier is not None
        host = f"[{carrier.host}]" if ":" in carrier.host else carrier.host
        suffix = "" if carrier.transport == "UDP" else f";transport={carrier.transport.lower()}"
        uri = f"sip:{far_leg.number or call.dialled}@{host}:{carrier.port}{suffix}"
        try:
            value = trunk_authorization(challenge, auth, method="INVITE", uri=uri)
        except (ValueError, KeyError) as exc:
            log.info(kv(event="carrier_auth_failed", call=call.call_id, status=status,
                        reason="unanswerable", detail=str(exc)))
            return False
        call.trunk_auth_sent = True
        if far_leg.key is not None:
            self._by_invite.pop(far_leg.key, None)
        log.info(kv(event="carrier_challenge_answered", call=call.call_id, status=status))
        # A fresh INVITE (new Call-ID) carrying the credentials; the leg stays INVITING.
        self._dial_carrier(call, far_leg, (
            "Authorization" if status == 401 else "Proxy-Authorization", value))
        return True

    def _carrier_failed(self, call: Call, far_leg: AgentLeg, status: int) -> None:
        leg = far_leg.leg
        now = time.time()
        inp = response_input(status)
        if leg.can_take(inp):
            leg.handle(inp, now, code=status)
        elif leg.state is not LegState.ENDED and leg.can_take(LegInput.TIMEOUT):
            leg.handle(LegInput.TIMEOUT, now)
        log.info(kv(event="carrier_leg_ended", call=call.call_id, status=status,
                    reason=leg.end_reason.value if leg.end_reason else ""))
        self._agent_leg_over(call, far_leg)
        if call.ivr_transfer is far_leg:
            self._ivr_transfer_over(call, far_leg, status)
            self._maybe_finish(call)
            return
        if far_leg.transfer:
            if call.transfer is not None and call.transfer["to"] is far_leg:
                self._transfer_failed(call, status)
            self._maybe_finish(call)
            return
        if call.ended_at is None:
            call.end_reason = "carrier-busy" if status in (486, 600) else "carrier-rejected"
            call.end_code = status
            self._hangup_caller(call, EndReason.REJECTED, code=_relay_status(status))
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
                call.lookup = self.crm.submit(
                    action, lambda result, c=call: self._lookup_done(c, result),
                    call=call.call_id)
            elif isinstance(action, ivr.RouteToQueue):
                self._stop_ivr(call)
                self._enter_queue(call, action)
            elif isinstance(action, ivr.Hangup):
                self._stop_ivr(call)
                call.end_reason = f"ivr-{action.reason}"
                self._hangup_caller(call, EndReason.SYSTEM)
            elif isinstance(action, ivr.Transfer):
                self._ivr_transfer(call, action)
            else:  # Voicemail, OfferCallback: later issues
                log.warning(kv(event="ivr_action_not_supported", call=call.call_id,
                               action=type(action).__name__))
                self._stop_ivr(call)
                call.end_reason = "ivr-unsupported"
                self._hangup_caller(call, EndReason.SYSTEM)

    def _ivr_transfer(self, call: Call, action: ivr.Transfer) -> None:
        """A ``transfer`` node: ring an agent's extension, or a number through the carrier
        under the dial rules of the node's role; the caller hears the hold music meanwhile
        (docs/ivr.md, "transfer")."""
        from appliance.calls.dialling import check_dial

        call.prompts.clear()
        if call.playing is not None:
            call.playing = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)
        if call.ivr_timer is not None:
            call.ivr_timer.cancel()
            call.ivr_timer = None
        target = action.number
        if target.startswith(("sip:", "sips:")):
            target = target.split(":", 1)[1].split("@", 1)[0].split(";", 1)[0]
        leg: AgentLeg | None = None
        status = 480
        if target in self.config.sip.accounts_by_user:
            leg = self._offer(call, target, transfer=True)  # None: not registered
        elif self.config.trunk.carrier is None:
            status = 404
        else:
            decision = check_dial(self.config.dialling, action.role, target, 0)
            if decision.allowed:
                leg = self._dial_transfer_target(call, target)
            else:
                status = decision.status
                log.info(kv(event="ivr_transfer_refused", call=call.call_id, target=target,
                            reason=decision.reason))
        log.info(kv(event="ivr_transfer", call=call.call_id, target=target,
                    ringing=leg is not None))
        if leg is None:
            self._ivr_transfer_over(call, None, status, "refused")
            return
        call.ivr_transfer = leg
        call.ivr_transfer_timer = asyncio.get_running_loop().call_later(
            action.timeout, self._ivr_transfer_timeout, call, leg)
        self._queue_music(call)

    def _ivr_transfer_timeout(self, call: Call, leg: AgentLeg) -> None:
        call.ivr_transfer_timer = None
        if call.ivr_transfer is leg:
            self._hangup_agent(call, leg, EndReason.NO_ANSWER)  # CANCEL; its 487 ends it

    def _ivr_transfer_answered(self, call: Call, leg: AgentLeg, now: float) -> None:
        """The IVR's transfer target answered: bridge and answer the caller; the flow ends."""
        self._ivr_transfer_over(call, leg, 200, "answered")
        call.connected = leg
        if leg.number is None:
            call.agent = leg.agent
            self._last_call[leg.agent] = call.call_id
        call.answered_at = call.talk_started = now
        self.engine.bridge(call.media, leg.media)
        self._arm_media_timeout(call.media, leg.media)
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        payload = {"call_id": call.call_id, "by": f"ivr:{call.flow_name}",
                   "target": leg.number or leg.agent, "kind": "blind", "from_agent": None}
        self._log_event(call, "call.transfer", payload, now)
        log.info(kv(event="call_transferred", call=call.call_id, by=payload["by"],
                    target=payload["target"]))
        self._feed_ivr(call, ivr.TransferResult("answered"))

    def _ivr_transfer_over(self, call: Call, leg: AgentLeg | None, status: int,
                           outcome: str | None = None) -> None:
        """The IVR's transfer ends ringing: answered (the caller), or failed (the flow goes
        on at the node's ``on_failure`` with ``transfer_result`` busy / no-answer / refused)."""
        if call.ivr_transfer_timer is not None:
            call.ivr_transfer_timer.cancel()
            call.ivr_transfer_timer = None
        call.ivr_transfer = None
        self._stop_queue_music(call)
        if outcome == "answered" or call.ended_at is not None:
            return
        if outcome is None:
            outcome = ("busy" if status in (486, 600) else
                       "no-answer" if status in (408, 480, 487) else "refused")
        log.info(kv(event="ivr_transfer_failed", call=call.call_id, outcome=outcome,
                    status=status))
        self._feed_ivr(call, ivr.TransferResult(outcome, status))

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
        self._log_event(call, "queue.enter", {
            "call_id": call.call_id, "queue": action.queue, "caller": call.caller,
            "priority": action.priority, "dialled": call.dialled, "tier": action.tier}, now)
        log.info(kv(event="queue_enter", call=call.call_id, queue=action.queue))
        self._queue_music(call)
        self._arm_announcement(call)
        self._route(self.router.handle(acd.CallerJoin(
            call.call_id, action.queue, caller_number=call.caller, priority=action.priority),
            self._router_clock()))

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
                call.end_reason = f"overflow-{decision.reason.value}"
                self._hangup_caller(call, EndReason.SYSTEM)
            elif isinstance(decision, acd.Announce) and call is not None:
                self._announce(call, decision)
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

    def _offer(self, call: Call, agent: str, *, transfer: bool = False) -> AgentLeg | None:
        signalling = self._signalling()
        now = time.time()
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
            destination=_destination(binding),
            body=session.offer().to_bytes())
        agent_leg.key = key
        self._by_invite[key] = (call, agent_leg)
        log.info(kv(event="agent_offered", call=call.call_id, agent=agent, queue=call.queue,
                    contact=binding.contact))
        self._emit("call.ringing", {"call_id": call.call_id, "agent": agent,
                                    "queue": call.queue}, now)
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
            self._scratch = _scratch_dir(self.config.site.id)
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

    # -- supervision: listen, whisper, barge ---------------------------------------------------

    def _supervise_refusal(self, supervisor: str, agent: str) -> Call | tuple[int, str]:
        """The call ``agent`` is on, or why ``supervisor`` may not join it."""
        account = self.config.sip.accounts_by_user.get(supervisor)
        if getattr(account, "role", "agent") != "supervisor":
            return 403, "Supervisors Only"
        if agent not in self.config.sip.accounts_by_user:
            return 404, "Unknown Agent"
        for call in self.calls.values():
            if (call.agent == agent and call.connected is not None and call.ended_at is None
                    and call.direction in ("inbound", "outbound")):
                return call
        return 409, "Agent Not On A Call"

    def _supervision_legs(self, call: Call) -> tuple[int, int]:
        """(customer media, agent media) of a connected call."""
        assert call.connected is not None
        if call.direction == "outbound":
            return call.connected.media, call.media
        return call.media, call.connected.media

    def _supervisor_dialled(self, event: IncomingCall, supervisor: str, mode: str,
                            agent: str) -> None:
        """A supervisor's ``*80``/``*81``/``*82`` + agent: answer and join the agent's call."""
        signalling = self._signalling()
        target = self._supervise_refusal(supervisor, agent)
        if isinstance(target, tuple):
            signalling.answer(event.key, target[0], reason=target[1])
            return
        request = event.request
        now = time.time()
        try:
            offer = sdp.parse(request.body)
            address = self.engine.allocate_leg(self.media_host)
        except (sdp.SdpError, EngineError, OSError):
            signalling.answer(event.key, 488)
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        try:
            negotiated = session.answer(offer)
        except sdp.SdpError:
            self._release_media(address.leg)
            signalling.answer(event.key, 488)
            return
        self._apply_media(address.leg, negotiated)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:supervisor", Direction.INBOUND, Party.AGENT, now)
        call = Call(call_id, request.call_id, supervisor, agent, "", event.key, event.dialog,
                    leg, address.leg, session, negotiated.sdp.to_bytes(), now,
                    agent=supervisor, direction="supervise",
                    supervising=(mode, target.call_id))
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[address.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        leg.handle(LegInput.ANSWER, now)
        signalling.answer(event.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        self._join_supervisor(call, target, supervisor)

    def _join_supervisor(self, call: Call, target: Call, by: str) -> None:
        assert call.supervising is not None
        mode = call.supervising[0]
        customer, agent_media = self._supervision_legs(target)
        join = {"listen": self.engine.monitor, "whisper": self.engine.whisper,
                "barge": self.engine.barge}[mode]
        join(call.media, customer, agent_media)
        target.supervisors.append(call)
        self._audit(by, f"call.{mode}", kv(call=target.call_id, agent=target.agent or "",
                                            supervisor=call.caller))
        log.info(kv(event="supervisor_joined", call=target.call_id, supervisor=call.caller,
                    agent=target.agent or "", mode=mode))
        self._emit("call.supervise", {"call_id": target.call_id, "supervisor": call.caller,
                                      "agent": target.agent, "mode": mode, "by": by},
                   time.time())

    def _supervisor_gone(self, call: Call) -> None:
        """The supervisor's call ended: caller and agent hear each other only again."""
        if call.supervising is None:
            return
        target = self.calls.get(call.supervising[1])
        if target is None or call not in target.supervisors:
            return
        target.supervisors.remove(call)
        if target.connected is not None and target.ended_at is None:
            customer, agent_media = self._supervision_legs(target)
            with contextlib.suppress(EngineError):
                self.engine.stop_listening(call.media, customer, agent_media)
        log.info(kv(event="supervisor_left", call=target.call_id, supervisor=call.caller))

    def supervise(self, supervisor: str, agent: str, mode: str, *, by: str) -> str:
        """Ring ``supervisor``'s phone; when answered, join ``agent``'s current call in
        ``mode`` (listen, whisper, barge). Returns the supervisor's call id. 400 bad mode;
        403 not a supervisor; 404 unknown agent; 409 the agent is on no call or the
        supervisor's phone is not registered."""
        if mode not in ("listen", "whisper", "barge"):
            raise CallControlError(400, f"mode must be listen, whisper or barge, got {mode!r}")
        target = self._supervise_refusal(supervisor, agent)
        if isinstance(target, tuple):
            raise CallControlError(*target)
        bindings = self.registrar.lookup(supervisor, self.service.clock())
        if not bindings:
            raise CallControlError(409, f"supervisor {supervisor}'s phone is not registered")
        try:
            address = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            raise CallControlError(503, f"no media ports: {exc}") from exc
        now = time.time()
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:supervisor", Direction.OUTBOUND, Party.AGENT, now)
        realm = self.config.sip.realm
        binding = bindings[0]
        leg.handle(LegInput.DIAL, now)
        key = self._signalling().invite(
            from_party=f'"{mode} {agent}" <sip:edgecc@{realm}>',
            to_party=f"<sip:{supervisor}@{realm}>", request_uri=binding.contact,
            destination=_destination(binding), body=session.offer().to_bytes())
        call = Call(call_id, "", supervisor, agent, "", key, DialogId("", "", ""), leg,
                    address.leg, session, b"", now, agent=supervisor, direction="supervise",
                    supervising=(mode, target.call_id))
        call.ended_by = by
        self.calls[call_id] = call
        self._by_invite[key] = (call, None)
        self._by_media[address.leg] = call
        log.info(kv(event="supervisor_ringing", supervisor=supervisor, agent=agent, mode=mode,
                    by=by))
        return call_id

    def _supervisor_response(self, call: Call, response: SipMessage,
                             dialog: DialogId | None) -> None:
        """Responses to the INVITE ringing a supervisor for ``supervise()``."""
        status = response.status or 0
        now = time.time()
        if dialog is not None and (200 <= status < 300 or call.dialog.call_id == ""):
            call.dialog = dialog
            self._by_dialog[dialog] = (call, None)
        inp = response_input(status, response.body)
        if not call.leg.can_take(inp):
            return
        call.leg.handle(inp, now, code=status)
        if status >= 300:
            call.end_reason = "supervisor-unavailable"
            self._caller_gone(call, call.end_reason)
            return
        if inp is not LegInput.RX_2XX:
            return
        assert call.supervising is not None
        target = self.calls.get(call.supervising[1])
        try:
            negotiated = call.session.receive_answer(sdp.parse(response.body))
        except sdp.SdpError:
            negotiated = None
        if target is None or target.connected is None or target.ended_at is not None \
                or negotiated is None:
            if dialog is not None:
                self._signalling().hangup(dialog)
            if call.leg.can_take(LegInput.HANGUP):
                call.leg.handle(LegInput.HANGUP, now, reason=EndReason.SYSTEM)
            return
        self._apply_media(call.media, negotiated)
        self._join_supervisor(call, target, call.ended_by or call.caller)

    # -- transfer (RFC 3515 REFER, and the API) ------------------------------------------------

    def _refer(self, event: InDialogRequest, call: Call, agent_leg: AgentLeg | None) -> None:
        """A REFER from the connected agent's phone: blind transfer to another agent."""
        from appliance.sip.refer import parse_refer, refer_notify
        from media_core.sip import RemoteProtocolError

        signalling = self._signalling()
        if agent_leg is None or agent_leg is not call.connected or call.direction != "inbound":
            signalling.answer(event.key, 403, reason="Transfer Not Allowed")
            return
        try:
            request = parse_refer(event.request)
        except RemoteProtocolError as exc:
            signalling.answer(event.key, exc.status, reason=exc.reason)
            return
        if request.refer_to.replaces is not None:
            self._attended_transfer(event, call, agent_leg, request)
            return
        target = request.refer_to.target.user or ""
        refusal = self._transfer_refusal(call, target)
        if refusal is not None:
            log.info(kv(event="transfer_refused", call=call.call_id, target=target,
                        status=refusal[0]))
            signalling.answer(event.key, refusal[0], reason=refusal[1])
            return
        signalling.answer(event.key, 202)  # RFC 3515 §2.4.2
        if agent_leg.leg.can_take(LegInput.REFER):
            agent_leg.leg.handle(LegInput.REFER, time.time())
        notify = (agent_leg.dialog, request.event_id)
        headers, body = refer_notify(100, event_id=request.event_id)
        with contextlib.suppress(Exception):
            signalling.request(agent_leg.dialog, "NOTIFY", headers=headers, body=body)
        self._begin_transfer(call, target, by=agent_leg.agent, notify=notify)

    def _attended_transfer(self, event: InDialogRequest, call: Call, agent_leg: AgentLeg,
                           request: Any) -> None:
        """REFER with ``Replaces`` (RFC 3891, RFC 5589 §7) from the connected agent's phone,
        naming its own answered call to another agent: the customer is bridged to that agent
        at once (both legs are ours, no new INVITE is needed), and the transferring phone's
        two dialogs are ended (NOTIFY 200, then BYE on each)."""
        from appliance.sip.refer import refer_notify

        signalling = self._signalling()
        replaces = request.refer_to.replaces
        consult: Call | None = None
        # §3: to-tag is the recipient's local tag, from-tag its remote tag; the reverse is
        # accepted too (a phone naming the dialog from its own side).
        for local, remote in ((replaces.to_tag, replaces.from_tag),
                              (replaces.from_tag, replaces.to_tag)):
            entry = self._by_dialog.get(DialogId(replaces.call_id, local, remote))
            if entry is not None and entry[1] is None:
                consult = entry[0]
                break
        refusal: tuple[int, str] | None = None
        if call.transfer is not None:
            refusal = 491, "Transfer In Progress"
        elif consult is None or consult.ended_at is not None or consult.finishing:
            refusal = 481, "Replaced Dialog Not Found"  # RFC 3891 §3
        elif not consult.internal or consult.caller != agent_leg.agent:
            refusal = 403, "Transfer Not Allowed"
        elif consult.connected is None:
            refusal = 486, "Consultation Not Answered"  # early dialogs are not replaced
        if refusal is not None:
            log.info(kv(event="transfer_refused", call=call.call_id, kind="attended",
                        status=refusal[0]))
            signalling.answer(event.key, refusal[0], reason=refusal[1])
            return
        assert consult is not None and consult.connected is not None
        now = time.time()
        signalling.answer(event.key, 202)  # RFC 3515 §2.4.2
        if agent_leg.leg.can_take(LegInput.REFER):
            agent_leg.leg.handle(LegInput.REFER, now)
        notify = (agent_leg.dialog, request.event_id)
        headers, body = refer_notify(100, event_id=request.event_id)
        with contextlib.suppress(Exception):
            signalling.request(agent_leg.dialog, "NOTIFY", headers=headers, body=body)
        # The consulted agent's leg moves from the consultation into the customer's call.
        target = consult.connected
        consult.connected = None
        consult.agents.pop(target.leg.leg_id, None)
        target.transfer = True
        call.agents[target.leg.leg_id] = target
        if target.dialog is not None:
            self._by_dialog[target.dialog] = (call, target)
        if target.key is not None:
            self._by_invite[target.key] = (call, target)
        with contextlib.suppress(EngineError):
            self.engine.unbridge(target.media)
        if call.hold_started is not None:
            self._close_hold(call, now)
        call.transfer = {"from": agent_leg, "to": target, "target": target.agent,
                         "by": agent_leg.agent, "kind": "attended", "notify": notify,
                         "started_at": now, "replaced": consult.call_id}
        log.info(kv(event="transfer_started", call=call.call_id, by=agent_leg.agent,
                    target=target.agent, kind="attended", consultation=consult.call_id))
        self._transfer_answered(call, target, now)
        # RFC 5589 §7: the transferor's consultation ends too.
        consult.end_reason = "transferred"
        self._hangup_caller(consult, EndReason.TRANSFERRED)

    def _transfer_refusal(self, call: Call, target: str) -> tuple[int, str] | None:
        if call.connected is None or call.ended_at is not None:
            return 409, "Call Not Connected"
        if call.transfer is not None:
            return 491, "Transfer In Progress"
        if target == call.agent:
            return 404, "Unknown Transfer Target"
        if target not in self.config.sip.accounts_by_user:
            return self._external_refusal(call, target)
        if not self.registrar.lookup(target, self.service.clock()):
            return 480, "Transfer Target Unavailable"
        return None

    def _external_refusal(self, call: Call, number: str) -> tuple[int, str] | None:
        """A transfer to a number through the carrier, under the transferring agent's dial
        rules (docs/calls.md, "Dial rules")."""
        from appliance.calls.dialling import check_dial

        if self.config.trunk.carrier is None:
            return 404, "Unknown Transfer Target"
        account = self.config.sip.accounts_by_user.get(call.agent or "")
        decision = check_dial(self.config.dialling, getattr(account, "role", "agent"),
                              number, 0)
        if not decision.allowed:
            return decision.status, _DIAL_REFUSALS.get(decision.reason, "Forbidden")
        return None

    def _begin_transfer(self, call: Call, target: str, *, by: str,
                        notify: tuple[Any, str] | None) -> None:
        assert call.connected is not None
        now = time.time()
        customer = self._customer_media(call)
        with contextlib.suppress(EngineError):
            self.engine.unbridge(customer)
        call.transfer = {"from": call.connected, "to": None, "target": target, "by": by,
                         "kind": "blind", "notify": notify, "started_at": now}
        call.hold_play = self.engine.play(customer, self.hold_music)
        log.info(kv(event="transfer_started", call=call.call_id, by=by, target=target))
        if target in self.config.sip.accounts_by_user:
            new_leg = self._offer(call, target, transfer=True)
        else:
            new_leg = self._dial_transfer_target(call, target)
        if new_leg is None:
            self._transfer_failed(call, 480)
            return
        call.transfer["to"] = new_leg

    def _dial_transfer_target(self, call: Call, dialled: str) -> AgentLeg | None:
        """A carrier leg for a transfer to an external number (the dial rules passed)."""
        from appliance.calls.dialling import normalize_number

        try:
            far = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="transfer_leg_failed", call=call.call_id, error=str(exc)))
            return None
        now = time.time()
        session = sdp.MediaSession(CAPABILITIES, self.media_host, far.rtp_port,
                                   rtcp_port=far.rtcp_port)
        n = len(call.agents) + len(call.finished_agents) + 1
        # The number takes the agent's place: party "agent" in the leg's words.
        far_leg = AgentLeg(call.agent or "", Leg(f"{call.call_id}:carrier:{n}",
                                                 Direction.OUTBOUND, Party.AGENT, now),
                           far.leg, session, offered=False, transfer=True,
                           number=normalize_number(dialled))
        call.agents[far_leg.leg.leg_id] = far_leg
        call.trunk_auth_sent = False
        far_leg.leg.handle(LegInput.DIAL, now)
        self._dial_carrier(call, far_leg)
        return far_leg

    def _transfer_answered(self, call: Call, new_leg: AgentLeg, now: float) -> None:
        """The target answered: bridge the customer to them, release the transferring
        agent (NOTIFY 200 then BYE), tell the router that agent's call ended."""
        from appliance.sip.refer import refer_notify

        transfer = call.transfer
        if transfer is None or transfer["to"] is not new_leg:
            self._hangup_agent(call, new_leg, EndReason.SYSTEM)
            return
        old: AgentLeg = transfer["from"]
        call.transfer = None
        call.hold_play = None
        with contextlib.suppress(EngineError):
            self.engine.stop_play(call.media)
            self.engine.bridge(call.media, new_leg.media)
        self._arm_media_timeout(new_leg.media)
        call.connected = new_leg
        if new_leg.number is None:
            call.agent = new_leg.agent
            self._last_call[new_leg.agent] = call.call_id
        signalling = self._signalling()
        if transfer["notify"] is not None and not transfer.get("from_gone"):
            dialog, event_id = transfer["notify"]
            headers, body = refer_notify(200, event_id=event_id)
            with contextlib.suppress(Exception):
                signalling.request(dialog, "NOTIFY", headers=headers, body=body)
        if old.leg.can_take(LegInput.TRANSFER_DONE):
            actions = old.leg.handle(LegInput.TRANSFER_DONE, now)
            if LegAction.SEND_BYE in actions and old.dialog is not None:
                signalling.hangup(old.dialog)
        else:
            self._hangup_agent(call, old, EndReason.TRANSFERRED)
        if self.router is not None:
            with contextlib.suppress(acd.LocalProtocolError):
                self._route(self.router.handle(acd.CallEnded(call.call_id, old.agent),
                                               self._router_clock()))
        payload = {"call_id": call.call_id, "by": transfer["by"], "target": transfer["target"],
                   "kind": transfer["kind"], "from_agent": old.agent}
        # The first agent's talk ends here (queue_log TRANSFER); the target's starts.
        call.events.append(("queue.complete", {
            "call_id": call.call_id, "queue": call.queue, "agent": old.agent,
            "talk_s": round(now - (call.talk_started or call.answered_at or now), 3),
            "ended_by": "transferred"}, now))
        call.talk_started = now
        self._log_event(call, "call.transfer", payload, now)
        log.info(kv(event="call_transferred", call=call.call_id, by=transfer["by"],
                    target=transfer["target"]))
        if old.leg.state is LegState.ENDED:
            self._agent_leg_over(call, old)

    def _transfer_failed(self, call: Call, status: int) -> None:
        """The target did not answer: NOTIFY the failure, bridge the agent back (or end the
        call when the transferring agent has gone)."""
        from appliance.sip.refer import refer_notify

        transfer = call.transfer
        if transfer is None:
            return
        call.transfer = None
        call.hold_play = None
        old: AgentLeg = transfer["from"]
        log.info(kv(event="transfer_failed", call=call.call_id, target=transfer["target"],
                    status=status))
        if call.ended_at is not None:
            return
        if transfer.get("from_gone") or old.leg.state is LegState.ENDED:
            call.end_reason = "transfer-failed"
            self._hangup_caller(call, EndReason.SYSTEM)
            return
        if transfer["notify"] is not None:
            dialog, event_id = transfer["notify"]
            headers, body = refer_notify(status if status >= 300 else 503, event_id=event_id)
            with contextlib.suppress(Exception):
                self._signalling().request(dialog, "NOTIFY", headers=headers, body=body)
        if old.leg.can_take(LegInput.TRANSFER_FAILED):
            old.leg.handle(LegInput.TRANSFER_FAILED, time.time())
        with contextlib.suppress(EngineError):
            self.engine.stop_play(call.media)
            self.engine.bridge(call.media, old.media)

    def transfer(self, call_id: str, target: str, *, by: str) -> None:
        """Blind transfer from the API: ring agent ``target``; when they answer the customer is
        theirs and the agent's phone is hung up. 404 unknown call or target; 409 not
        connected, target not registered, or a transfer already in progress."""
        call = self._live_call(call_id)
        if call.direction != "inbound":
            raise CallControlError(409, f"call {call_id} is not a queue call")
        refusal = self._transfer_refusal(call, target)
        if refusal is not None:
            raise CallControlError(_http_status(refusal[0]), refusal[1])
        self._audit(by, "call.transfer", kv(call=call_id, target=target))
        self._begin_transfer(call, target, by=by, notify=None)

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
        if call.transfer is not None and call.transfer["from"] is agent_leg:
            # The transferring agent hung up before the target answered (RFC 5589 §6.1).
            call.transfer["from_gone"] = True
            self._maybe_finish(call)
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
        for key in [k for k, v in self._by_invite.items() if v[0] is call]:
            del self._by_invite[key]
        for dialog in [d for d, v in self._by_dialog.items() if v[0] is call]:
            del self._by_dialog[dialog]
        self._by_media.pop(call.media, None)
        self.calls.pop(call.call_id, None)
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
        legs = [(call.leg.record(), call.caller if outbound else None, call.media_figures)] + [
            (a.leg.record(), None if outbound or a.number else a.agent, a.media_figures)
            for a in sorted([*call.finished_agents, *call.agents.values()],
                            key=lambda a: a.leg.started_at)]
        legs_json = [{
            "leg": r.leg_id, "direction": r.direction.value, "party": r.party.value,
            "agent": agent, "started_at": r.started_at, "answered_at": r.answered_at,
            "ended_at": r.ended_at, "end_reason": r.end_reason.value if r.end_reason else None,
            "end_code": r.end_code, "media": media,
        } for r, agent, media in legs]
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
        }
        written: list[tuple[str, dict[str, Any], float, int]] = []
        with eventlog.transaction(self.db) as conn:
            conn.execute(
                "INSERT INTO call_records (call_id, sip_call_id, caller, dialled, flow, queue,"
                " agent, started_at, offered_at, answered_at, ended_at, end_reason, end_code,"
                " recording_id, ivr_trace, legs, direction, holds, ended_by,"
                " recording_decision) VALUES"
                " (:call_id, :sip_call_id, :caller, :dialled, :flow, :queue, :agent,"
                " :started_at, :offered_at, :answered_at, :ended_at, :end_reason, :end_code,"
                " :recording_id, :ivr_trace, :legs, :direction, :holds, :ended_by,"
                " :recording_decision)",
                {**row, "ivr_trace": json.dumps(trace), "legs": json.dumps(legs_json),
                 "holds": json.dumps(call.holds)})
            for kind, payload, at in call.events:
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

    def _audit(self, actor: str, action: str, detail: str) -> None:
        """An audit-log row, written by the database thread (never on the loop)."""
        from appliance.store import audit

        def write() -> None:
            try:
                audit(self.db, actor, action, detail)
            except Exception:
                log.exception(kv(event="audit_failed", action=action))

        self._db_thread.submit(write)

    def _log_event(self, call: Call, kind: str, payload: dict[str, Any], at: float) -> None:
        """Keep one event-log row of the call (written with its record, in one transaction);
        a LIVE_FIRST kind is also handed to ``on_event`` now."""
        call.events.append((kind, payload, at))
        if kind in LIVE_FIRST:
            self._emit(kind, payload, at)

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
                log.info(kv(event="dtmf", call=call.call_id, digit=event.digit,
                            method=event.method))
                self._feed_ivr(call, ivr.DigitPressed(event.digit))
        elif isinstance(event, PromptFinished):
            call = self._by_media.get(event.leg)
            if call is not None and call.direction == "feature":
                call.playing = None
                self._hangup_caller(call, EndReason.SYSTEM)
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
            held = self._by_hold_leg(event.leg)
            if held is not None and held.hold_play == event.prompt_id:
                if event.completed and (held.hold_started is not None
                                        or held.transfer is not None):
                    held.hold_play = self.engine.play(event.leg, self.hold_music)  # loop
                return
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
        for call in self.calls.values():
            if call.hold_play is not None and call.connected is not None and (
                    self._customer_media(call) == media):
                return call
        return None

    def _signalling(self) -> DialogSignalling:
        if self.signalling is None:
            raise RuntimeError("call control is not attached to a SIP service")
        return self.signalling


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


def recording_decision(policy: bool | int, draw: float) -> tuple[bool, str]:
    """Whether to record a call under a queue's ``record`` policy (true, false or a
    percentage), with ``draw`` uniform in [0, 1); the reason goes into the call record."""
    if policy is True:
        return True, "always"
    if policy is False:
        return False, "never"
    recorded = draw * 100 < policy
    return recorded, f"sampled-{'in' if recorded else 'out'} {policy}%"


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


def _http_status(sip_status: int) -> int:
    """The API's status for a SIP refusal: 484 -> 400 (bad number), 480/486/491 -> 409 (not
    possible now); 403 and 404 mean the same in both."""
    return {484: 400, 480: 409, 486: 409, 491: 409}.get(sip_status, sip_status)


def _relay_status(status: int) -> int:
    """The final answer to the agent's phone for the carrier's final ``status``: busy and
    not-found pass through; authentication trouble is ours (403); timeouts 480; the rest 503
    (RFC 3261 §16.7 step 6 spirit: the agent's phone learns what it can act on)."""
    if status in (486, 600):
        return 486
    if status in (401, 407, 403):
        return 403
    if status in (408, 480, 487):
        return 480
    if 400 <= status < 500:
        return status
    return 503


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

    def transfer(self, call_id: str, target: str, *, by: str) -> None:
        """Blind transfer to agent ``target`` (``CallControl.transfer``)."""
        self.control.transfer(call_id, target, by=by)

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
