"""The state of a call in call control: ``Call`` and its ``AgentLeg``s, and the small rules
the parts of call control (``control``, ``outbound``, ``transfer``, ``supervision``) share."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from appliance.calls.leg import Leg
from appliance.ivr import runner as ivr
from appliance.sip.dialog import DialogId
from appliance.sip.source import Source
from appliance.sip.transaction import TransactionKey
from media_core import sdp

__all__ = ["CAPABILITIES", "DIAL_REFUSALS", "MAX_CALLS", "SDP_HEADERS", "AgentLeg", "Call",
           "InternalDial", "destination", "http_status", "recording_decision", "relay_status"]

CAPABILITIES = sdp.Capabilities(codecs=(sdp.PCMU, sdp.PCMA))
"""What the media engine relays and transcodes: G.711 both laws, RFC 4733 events."""
MAX_CALLS = 10_000
"""Live calls at most; beyond it a new INVITE gets 503."""
SDP_HEADERS = (("Content-Type", "application/sdp"),)
DIAL_REFUSALS = {
    "address-incomplete": "Address Incomplete", "role-may-not-dial": "Role May Not Dial",
    "premium": "Premium Numbers Not Allowed", "international": "International Not Allowed",
    "not-allowed": "Number Not Allowed", "too-many-calls": "Busy Here",
}
"""Reason phrases of dial-rule refusals (RFC 3261 §21.4: 403, 484, 486)."""



@dataclass(frozen=True)
class InternalDial:
    """An agent's phone dials another agent's extension (a consultation before an attended
    transfer, or a colleague): rung directly, never through the carrier."""

    number: str
    """The extension (the other agent's SIP user)."""
    record: bool = False
    internal: bool = True


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
    place_at: float | None = None
    """When the caller's place in their queue counts from (their first entry into it); a caller
    sent back to the same queue (a failed transfer) keeps it. Wall clock, as ``queued_at``."""
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
    priority: int = 0
    """The caller's priority in the queue (kept when they overflow to another queue)."""
    tier: str | None = None
    """The caller's customer tier (the flow's ``tier`` variable), kept like the priority."""
    variables: dict[str, str] = field(default_factory=dict)
    """What the IVR learnt (its flow variables when it routed the call to a queue), for the
    screen pop; kept when the caller moves to another queue."""
    overflows: int = 0
    """Queues this caller overflowed from (bounded: no overflow loop between queues)."""
    callback_request: str | None = None
    """A queued callback's dial attempt: the call id of the caller's request."""


def recording_decision(policy: bool | int, draw: float) -> tuple[bool, str]:
    """Whether to record a call under a queue's ``record`` policy (true, false or a
    percentage), with ``draw`` uniform in [0, 1); the reason goes into the call record."""
    if policy is True:
        return True, "always"
    if policy is False:
        return False, "never"
    recorded = draw * 100 < policy
    return recorded, f"sampled-{'in' if recorded else 'out'} {policy}%"


def http_status(sip_status: int) -> int:
    """The API's status for a SIP refusal: 484 -> 400 (bad number), 480/486/491 -> 409 (not
    possible now); 403 and 404 mean the same in both."""
    return {484: 400, 480: 409, 486: 409, 491: 409}.get(sip_status, sip_status)


def relay_status(status: int) -> int:
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


def destination(binding: Any) -> Source | None:
    """Where to send the INVITE: the address the REGISTER came from (RFC 5626 §5 style flow,
    so a phone behind NAT is reached), else the contact itself."""
    received = getattr(binding, "received", None)
    if not received:
        return None
    host, _, port = received.rpartition(":")
    if not port.isdigit():
        return None
    return Source(binding.transport or "UDP", host.strip("[]"), int(port))
