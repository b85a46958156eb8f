"""Call control's queued callbacks: a caller who chose to be called back keeps their place, and
when they reach the head the reserved agent's phone rings first, then the customer's number
through the carrier trunk (docs/calls.md, "Queued callbacks"; the router's rules in
docs/routing.md §7).

One request (the caller's call id, also the router's id for it) leads to at most
``1 + callback_retries`` attempts; each attempt is a call of its own (direction ``callback``,
its record names the request in ``callback_of``). Requests are kept in the table
``callback_requests`` so pending ones survive a restart of the appliance.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from appliance import eventlog
from appliance.acd import model as acd
from appliance.calls.leg import Direction, EndReason, Leg, LegInput, LegState, Party
from appliance.calls.model import CAPABILITIES, AgentLeg, Call, destination, recording_decision
from appliance.log import kv
from appliance.sip.dialog import DialogId
from appliance.sip.transaction import TransactionKey
from media_core import sdp
from media_core.engine import EngineError
from media_core.sip import SipMessage

__all__ = ["CALLBACK_STATES", "CallbackAttempt", "CallbackRequest", "QueuedCallbacks",
           "callback_priority"]

log = logging.getLogger("edgecc.calls")

CALLBACK_STATES = ("waiting", "dialling", "answered", "failed", "cancelled")
"""States of a row of ``callback_requests``: waiting (for its turn or a retry), dialling (an
attempt in progress), and the final ones."""
PENDING_STATES = ("waiting", "dialling")
MAX_PENDING = 10_000
"""Callback requests held at most; beyond it a new request is refused (``callback-refused``)."""
UNREACHABLE_DELAY = 1.0
"""Seconds before an attempt whose agent's phone holds no registration counts as failed (so a
queue whose only agent is unreachable does not spin on the loop)."""


def _ringback(seconds: float = 60.0) -> np.ndarray:
    """North American ringback (ANSI T1.401: 440 + 480 Hz, 2 s on, 4 s off) at about -19 dBm0
    per tone: what the agent hears while the customer's phone rings."""
    t = np.arange(int(2.0 * 8000)) / 8000
    on = (0.08 * 32767 * (np.sin(2 * np.pi * 440 * t) + np.sin(2 * np.pi * 480 * t)))
    cycle = np.concatenate([on.astype(np.int16), np.zeros(4 * 8000, dtype=np.int16)])
    return np.tile(cycle, int(math.ceil(seconds / 6.0)))


RINGBACK = _ringback()
"""Played to the agent's leg of a callback attempt from the carrier's 180 to the answer."""


def callback_priority(variables: dict[str, str] | Any) -> int:
    """The queue priority of a callback from the flow's ``priority`` variable (0-100, as a
    ``queue`` node clamps it; a value that is not a number counts as 0)."""
    try:
        value = int(str(variables.get("priority", "0")).strip())
    except ValueError:
        return 0
    return max(0, min(100, value))


def _variables(stored: str | None) -> dict[str, str]:
    """The flow variables kept with a request (``{}`` for none or a row that is not an
    object of strings)."""
    try:
        value = json.loads(stored or "{}")
    except ValueError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items()}


@dataclass
class CallbackRequest:
    """A pending callback, as call control keeps it while the router holds it."""

    call_id: str
    """The request's id: the requesting call's id, and the router's call id."""
    queue: str
    number: str
    """The number to call back."""
    caller: str
    """The requesting call's caller number."""
    priority: int
    requested_at: float
    """Wall time of the request."""
    place_at: float
    """Wall time the caller's place counts from (their join time if they were queued)."""
    attempts: int = 0
    """Attempts dialled so far (across restarts)."""
    dialled: set[int] = field(default_factory=set)
    """Router attempt numbers already acted on (never dialled twice)."""
    variables: dict[str, str] = field(default_factory=dict)
    """What the IVR learnt on the requesting call (for the attempts' screen pops)."""


@dataclass(eq=False)
class CallbackAttempt:
    """One dial attempt of a request: the reserved agent's phone, then the customer."""

    request: CallbackRequest
    attempt: int
    """1 for the first attempt (counted across restarts)."""
    agent: str
    call: Call | None = None
    carrier_dialled: bool = False
    """The customer's number was dialled (at most once per attempt)."""
    result: bool | None = None
    """None until the router was told: True answered, False failed."""
    ring_timer: asyncio.TimerHandle | None = None
    ringback: int | None = None
    """Engine prompt id of the ringback the agent hears, if playing."""


class QueuedCallbacks:
    """The queued-callback part of ``CallControl`` (the state lives there: ``callbacks``,
    ``callback_attempts``)."""

    # -- the request (IVR ``callback`` node) -----------------------------------------------

    def _request_callback(self, call: Call, action: Any) -> None:
        """The caller accepted a call back (``ivr.OfferCallback``): hand it to the router,
        keeping the caller's place when they were already queued, and persist it."""
        now = time.time()
        queue = action.queue
        if self.router is None or queue not in self.queues:
            log.error(kv(event="queue_unknown", call=call.call_id, queue=queue))
            self._refuse_callback(call, "no-queue")
            return
        if len(self.callbacks) >= MAX_PENDING:
            self._refuse_callback(call, "too-many")
            return
        priority = callback_priority(action.variables)
        decisions: list[Any] = []
        joining = not call.in_router
        try:
            if joining:
                self._sync_presence()
                joined = self.router.handle(acd.CallerJoin(
                    call.call_id, queue, caller_number=call.caller, priority=priority),
                    self._router_clock())
                overflow = next((d for d in joined if isinstance(d, acd.Overflow)
                                 and d.call == call.call_id), None)
                if overflow is not None:
                    self._route([d for d in joined if d is not overflow])
                    self._refuse_callback(call, overflow.reason.value)
                    return
                decisions.extend(joined)
            decisions.extend(self.router.handle(
                acd.CallbackRequested(call.call_id, action.number), self._router_clock()))
        except acd.LocalProtocolError as exc:
            log.error(kv(event="callback_refused", call=call.call_id, detail=str(exc)))
            self._refuse_callback(call, "router")
            return
        call.in_router = False  # the caller's leg is no longer waiting: no abandon at hang-up
        call.end_reason = "callback-requested"
        self._stop_queue_music(call)
        request = CallbackRequest(call.call_id, queue, action.number, call.caller, priority,
                                  now, call.queued_at or now,
                                  variables=dict(action.variables))
        self.callbacks[call.call_id] = request
        call.queue = queue
        log.info(kv(event="callback_requested", call=call.call_id, queue=queue,
                    priority=priority))
        self._callback_write(
            "INSERT INTO callback_requests (call_id, queue, number, caller, priority,"
            " requested_at, place_at, state, attempts, variables, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, 'waiting', 0, ?, ?)",
            (call.call_id, queue, action.number, call.caller, priority, now, request.place_at,
             json.dumps(dict(action.variables)), now),
            "callback.requested",
            {"call_id": call.call_id, "queue": queue, "number": action.number,
             "caller": call.caller, "priority": priority}, now)
        # A join may have offered the caller at once, and the request withdrew that offer
        # (CancelOffer): neither rings anybody. A caller already queued may be ringing an
        # agent: that offer's CancelOffer is carried out.
        self._route([d for d in decisions if not (
            joining and isinstance(d, acd.Offer | acd.CancelOffer) and d.call == call.call_id)])

    def _refuse_callback(self, call: Call, reason: str) -> None:
        log.info(kv(event="callback_refused", call=call.call_id, reason=reason))
        self._stop_ivr(call)
        call.end_reason = f"callback-refused-{reason}"
        self._hangup_caller(call, EndReason.SYSTEM)

    def _restore_callbacks(self) -> None:
        """At start: the pending requests back into the router at their stored places (their
        callers' first joins, ``CallerJoin.place_time``), oldest first, so they keep their
        order among themselves and stay ahead of every caller joining later."""
        if self.router is None:
            return
        rows = self.db.execute(
            "SELECT call_id, queue, number, caller, priority, requested_at, place_at, attempts,"
            " variables FROM callback_requests WHERE state IN ('waiting', 'dialling')"
            " ORDER BY place_at, rowid").fetchall()
        restored = 0
        for (call_id, queue, number, caller, priority, requested_at, place_at, attempts,
             variables) in rows:
            settings = self.queues.get(queue)
            if settings is None or attempts >= 1 + settings.callback_retries:
                reason = "queue-removed" if settings is None else "attempts-used"
                self._callback_write(
                    "UPDATE callback_requests SET state = 'failed', updated_at = ?"
                    " WHERE call_id = ?", (time.time(), call_id), "callback.failed",
                    {"call_id": call_id, "queue": queue, "attempt": attempts, "final": True,
                     "reason": reason}, time.time())
                continue
            request = CallbackRequest(call_id, queue, number, caller, priority, requested_at,
                                      place_at, attempts, variables=_variables(variables))
            clock = self._router_clock()
            # The router's clock is monotonic and restarts with the process; the stored place is
            # wall-clock: it is carried over as the time since it (never after now), so the
            # request keeps its place among the callers of its priority and its relaxation
            # steps count from its first join, not from the restart.
            place = clock - max(0.0, time.time() - float(place_at))
            try:
                decisions = self.router.handle(acd.CallerJoin(
                    call_id, queue, caller_number=caller, priority=priority,
                    place_time=place), clock)
                refused = next((d for d in decisions if isinstance(d, acd.Overflow)
                                and d.call == call_id), None)
                if refused is not None:
                    # The queue's rules refuse it now (e.g. join_empty): said, not lost quietly.
                    log.warning(kv(event="callback_not_restored", call=call_id, queue=queue,
                                   reason=refused.reason.value))
                    self._callback_write(
                        "UPDATE callback_requests SET state = 'failed', updated_at = ?"
                        " WHERE call_id = ?", (time.time(), call_id), "callback.failed",
                        {"call_id": call_id, "queue": queue, "attempt": attempts,
                         "final": True, "reason": f"restore-refused-{refused.reason.value}"},
                        time.time())
                    continue
                decisions += self.router.handle(acd.CallbackRequested(call_id, number),
                                                self._router_clock())
            except acd.LocalProtocolError as exc:
                log.error(kv(event="callback_not_restored", call=call_id, detail=str(exc)))
                continue
            self.callbacks[call_id] = request
            restored += 1
            self._route([d for d in decisions if not (
                isinstance(d, acd.Offer | acd.CancelOffer) and d.call == call_id)])
        if rows:
            log.info(kv(event="callbacks_restored", restored=restored, pending=len(rows)))

    # -- an attempt: the agent's phone, then the customer ------------------------------------

    def _dial_callback(self, decision: acd.DialCallback) -> None:
        """The router reserved ``decision.agent`` for a callback: ring their phone first."""
        request = self.callbacks.get(decision.call)
        if request is None:
            log.error(kv(event="callback_unknown", call=decision.call))
            with contextlib.suppress(acd.LocalProtocolError):
                self._route(self._router().handle(acd.CallerAbandon(decision.call),
                                                  self._router_clock()))
            return
        if decision.attempt in request.dialled:
            log.warning(kv(event="callback_attempt_repeated", call=decision.call,
                           attempt=decision.attempt))
            return  # exactly once per attempt, whatever is told twice
        request.dialled.add(decision.attempt)
        request.attempts += 1
        attempt = CallbackAttempt(request, request.attempts, decision.agent)
        now = time.time()
        settings = self.queues[request.queue]
        budget = 1 + settings.callback_retries
        if request.attempts > budget:  # attempts made before a restart count
            self._give_up_callback(request, "attempts-used")
            return
        from appliance.calls.dialling import check_dial

        account = self.config.sip.accounts_by_user.get(decision.agent)
        role = getattr(account, "role", "agent")
        rule = check_dial(self.config.dialling, role, request.number, 0)
        if self.config.trunk.carrier is None or not rule.allowed:
            # Retrying cannot help: the request ends here.
            self._give_up_callback(request, "no-outbound-route" if rule.allowed
                                   else f"dial-rule-{rule.reason}")
            return
        bindings = self.registrar.lookup(decision.agent, self.service.clock())
        self._callback_write(
            "UPDATE callback_requests SET state = 'dialling', attempts = ?, updated_at = ?"
            " WHERE call_id = ?", (request.attempts, now, request.call_id), None, None, now)
        if not bindings:
            log.info(kv(event="agent_unreachable", call=request.call_id, agent=decision.agent))
            asyncio.get_running_loop().call_later(
                UNREACHABLE_DELAY, self._callback_result, attempt, False, "agent-unreachable")
            return
        try:
            near = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="callback_leg_failed", call=request.call_id, error=str(exc)))
            asyncio.get_running_loop().call_later(
                UNREACHABLE_DELAY, self._callback_result, attempt, False, "no-media-ports")
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, near.rtp_port,
                                   rtcp_port=near.rtcp_port)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:agent", Direction.OUTBOUND, Party.AGENT, now)
        leg.handle(LegInput.DIAL, now)
        realm = self.config.sip.realm
        binding = bindings[0]
        number = rule.number
        # The agent sees whom they are about to call back.
        key = self._signalling().invite(
            from_party=f'"Callback {number}" <sip:{number}@{realm}>',
            to_party=f"<sip:{decision.agent}@{realm}>", request_uri=binding.contact,
            destination=destination(binding), body=session.offer().to_bytes())
        record, reason = recording_decision(settings.record, random.random())
        call = Call(call_id, "", number, number, "", key, DialogId("", "", ""), leg, near.leg,
                    session, b"", now, agent=decision.agent, direction="callback",
                    record_outbound=record, click_to_dial=True)
        call.queue = request.queue
        call.queued_at = request.place_at
        call.recording_decision = reason
        attempt.call = call
        # The record names the request (``callback_of``); Call has no field of its own for it.
        call.callback_request = request.call_id
        self.calls[call_id] = call
        self.callback_attempts[call_id] = attempt
        self._by_invite[key] = (call, None)
        self._by_media[near.leg] = call
        attempt.ring_timer = asyncio.get_running_loop().call_later(
            settings.ring_timeout, self._callback_ring_timeout, call)
        log.info(kv(event="callback_agent_ringing", call=call_id, request=request.call_id,
                    agent=decision.agent, attempt=attempt.attempt))
        # The screen pop names the customer to call back and what the IVR learnt of them.
        self._emit("call.ringing", {
            "call_id": call_id, "agent": decision.agent, "queue": request.queue,
            "caller": request.caller, "dialled": number, "flow": None,
            "priority": request.priority, "tier": request.variables.get("tier"),
            "variables": dict(request.variables), "callback_of": request.call_id}, now)

    def _callback_ring_timeout(self, call: Call) -> None:
        attempt = self.callback_attempts.get(call.call_id)
        if attempt is None:
            return
        attempt.ring_timer = None
        if call.leg.state in (LegState.INVITING, LegState.PROCEEDING, LegState.RINGING,
                              LegState.EARLY):
            call.end_reason = "agent-no-answer"
            self._hangup_caller(call, EndReason.NO_ANSWER)

    def _click_response(self, call: Call, response: SipMessage,
                        dialog: DialogId | None) -> None:
        attempt = self.callback_attempts.get(call.call_id)
        if attempt is None:
            super()._click_response(call, response, dialog)  # type: ignore[misc]
            return
        status = response.status or 0
        if 200 <= status < 300 and attempt.carrier_dialled:
            # The phone's 200 again (retransmitted, or a second fork): the number was dialled
            # once already; a second dialog is ended at once.
            if dialog is not None and dialog != call.dialog:
                self._signalling().hangup(dialog)
            return
        if status >= 200 and attempt.ring_timer is not None:
            attempt.ring_timer.cancel()
            attempt.ring_timer = None
        super()._click_response(call, response, dialog)  # type: ignore[misc]
        if any(a.number is not None for a in call.agents.values()) and (
                not attempt.carrier_dialled):
            attempt.carrier_dialled = True
            now = time.time()
            request = attempt.request
            log.info(kv(event="callback_dialled", call=call.call_id, request=request.call_id,
                        agent=attempt.agent, attempt=attempt.attempt))
            self._callback_write(
                None, (), "callback.dialled",
                {"call_id": request.call_id, "attempt_call_id": call.call_id,
                 "agent": attempt.agent, "queue": request.queue, "number": call.dialled,
                 "attempt": attempt.attempt}, now)

    def _carrier_progress(self, call: Call, far_leg: AgentLeg, response: SipMessage,
                          inp: LegInput, now: float) -> None:
        """The customer's phone rings (180) or sends early media (183 with a description,
        RFC 3960): the agent hears ringback, or the carrier's own tones and announcements."""
        attempt = self.callback_attempts.get(call.call_id)
        if attempt is None:
            super()._carrier_progress(call, far_leg, response, inp, now)  # type: ignore[misc]
            return
        if call.connected is not None or call.ended_at is not None:
            return
        if inp is LegInput.RX_183 and response.body:
            self._stop_ringback(call, attempt)
            if self._take_early_answer(call, far_leg, response, bridge=True):
                return
        if attempt.ringback is None:
            with contextlib.suppress(EngineError):
                attempt.ringback = self.engine.play(call.media, RINGBACK)

    def _stop_ringback(self, call: Call, attempt: CallbackAttempt) -> None:
        if attempt.ringback is not None:
            attempt.ringback = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)

    def _carrier_response(self, call: Call, far_leg: AgentLeg, key: TransactionKey,
                          response: SipMessage, dialog: DialogId | None) -> None:
        attempt = self.callback_attempts.get(call.call_id)
        reason = call.recording_decision
        if attempt is not None and (response.status or 0) >= 200:
            self._stop_ringback(call, attempt)  # answered or failed: the ringing is over
        super()._carrier_response(call, far_leg, key, response, dialog)  # type: ignore[misc]
        if attempt is None or call.connected is not far_leg or attempt.result is not None:
            return
        call.recording_decision = reason  # the queue's policy, not the dial rules'
        call.talk_started = call.answered_at
        self._callback_result(attempt, True, "answered")

    def _callback_leg_gone(self, call: Call) -> None:
        """The agent's side of an attempt ended: unanswered, that attempt failed."""
        attempt = self.callback_attempts.get(call.call_id)
        if attempt is None:
            return
        if attempt.ring_timer is not None:
            attempt.ring_timer.cancel()
            attempt.ring_timer = None
        if attempt.result is None:
            self._callback_result(attempt, False, call.end_reason or "failed")

    def _callback_result(self, attempt: CallbackAttempt, answered: bool, reason: str) -> None:
        """Tell the router how the attempt went (once), and write it down."""
        if attempt.result is not None:
            return
        attempt.result = answered
        request = attempt.request
        now = time.time()
        try:
            decisions = self._router().handle(acd.CallbackResult(request.call_id, answered),
                                              self._router_clock())
        except acd.LocalProtocolError as exc:
            log.error(kv(event="router_input_refused", input="CallbackResult",
                         call=request.call_id, detail=str(exc)))
            decisions = []
        outcome = next((d for d in decisions if isinstance(d, acd.CallbackOutcome)), None)
        attempt_id = attempt.call.call_id if attempt.call is not None else None
        if answered:
            self.callbacks.pop(request.call_id, None)
            self._callback_write(
                "UPDATE callback_requests SET state = 'answered', updated_at = ?"
                " WHERE call_id = ?", (now, request.call_id), "callback.answered",
                {"call_id": request.call_id, "attempt_call_id": attempt_id,
                 "agent": attempt.agent, "queue": request.queue, "attempt": attempt.attempt},
                now)
        else:
            final = outcome is not None
            if final:
                self.callbacks.pop(request.call_id, None)
            retry = self.queues[request.queue].callback_retry_interval
            self._callback_write(
                "UPDATE callback_requests SET state = ?, updated_at = ? WHERE call_id = ?",
                ("failed" if final else "waiting", now, request.call_id), "callback.failed",
                {"call_id": request.call_id, "attempt_call_id": attempt_id,
                 "agent": attempt.agent, "queue": request.queue, "attempt": attempt.attempt,
                 "reason": reason, "final": final,
                 "retry_in_s": None if final else retry}, now)
        log.info(kv(event="callback_result", call=request.call_id, attempt=attempt.attempt,
                    answered=answered, reason=reason,
                    final=outcome is not None or answered))
        self._route(decisions)

    def _give_up_callback(self, request: CallbackRequest, reason: str) -> None:
        """End a request for good (the router forgets it as a cancelled callback)."""
        self.callbacks.pop(request.call_id, None)
        now = time.time()
        with contextlib.suppress(acd.LocalProtocolError):
            self._route(self._router().handle(acd.CallerAbandon(request.call_id),
                                              self._router_clock()))
        log.info(kv(event="callback_given_up", call=request.call_id, reason=reason))
        self._callback_write(
            "UPDATE callback_requests SET state = 'failed', attempts = ?, updated_at = ?"
            " WHERE call_id = ?", (request.attempts, now, request.call_id), "callback.failed",
            {"call_id": request.call_id, "attempt_call_id": None, "agent": None,
             "queue": request.queue, "attempt": request.attempts, "reason": reason,
             "final": True, "retry_in_s": None}, now)

    def _callback_finished(self, call: Call) -> None:
        """An attempt's call is over: an answered one ends the agent's interaction (the
        queue's wrap-up follows, docs/routing.md §6)."""
        attempt = self.callback_attempts.pop(call.call_id, None)
        if attempt is None:
            return
        if attempt.result is None:
            self._callback_result(attempt, False, call.end_reason or "failed")
        if attempt.result and self.router is not None:
            with contextlib.suppress(acd.LocalProtocolError):
                self._route(self.router.handle(
                    acd.CallEnded(attempt.request.call_id, attempt.agent),
                    self._router_clock()))

    def _callback_of(self, call: Call) -> str | None:
        """The request an attempt's call dials for (None for other calls)."""
        attempt = self.callback_attempts.get(call.call_id)
        if attempt is not None:
            return attempt.request.call_id
        return call.callback_request

    # -- the API -----------------------------------------------------------------------------

    def pending_callbacks(self) -> list[dict[str, Any]]:
        """The callbacks still to be made, oldest place first: call_id (the request's),
        queue, number, caller, priority, requested_at, place_at, attempts (made so far), state
        (``callback-waiting``, ``callback-dialling``, ``callback-retry``), agent (reserved
        while dialling, else None), position (1-based, in its queue)."""
        out = []
        for request in sorted(self.callbacks.values(), key=lambda r: (r.place_at, r.call_id)):
            try:
                view = self._router().caller_view(request.call_id)
                position = self._router().position(request.call_id)
            except (acd.LocalProtocolError, RuntimeError):
                continue
            out.append({
                "call_id": request.call_id, "queue": request.queue, "number": request.number,
                "caller": request.caller, "priority": request.priority,
                "requested_at": request.requested_at, "place_at": request.place_at,
                "attempts": request.attempts, "state": view.state,
                "agent": view.offered_to[0] if view.offered_to else None,
                "position": position})
        return out

    def cancel_callback(self, call_id: str, *, by: str) -> None:
        """Withdraw a pending callback (the customer called in, or asked not to be called).
        Raises ``CallControlError`` 404 for no such pending request, 409 while an attempt is
        being dialled (hang that call up instead). Audited; event ``callback.cancelled``."""
        from appliance.calls import CallControlError

        request = self.callbacks.get(call_id)
        if request is None:
            raise CallControlError(404, f"no pending callback {call_id!r}")
        if any(a.request is request and a.result is None
               for a in self.callback_attempts.values()):
            raise CallControlError(409, f"callback {call_id} is being dialled")
        try:
            decisions = self._router().handle(acd.CallerAbandon(call_id), self._router_clock())
        except acd.LocalProtocolError as exc:
            raise CallControlError(409, f"callback {call_id} cannot be cancelled now: {exc}"
                                   ) from exc
        self.callbacks.pop(call_id, None)
        now = time.time()
        log.info(kv(event="callback_cancelled", call=call_id, by=by))
        self._audit(by, "callback.cancel", kv(call=call_id, queue=request.queue))
        self._callback_write(
            "UPDATE callback_requests SET state = 'cancelled', updated_at = ? WHERE call_id = ?",
            (now, call_id), "callback.cancelled",
            {"call_id": call_id, "queue": request.queue, "attempts": request.attempts,
             "by": by}, now)
        self._route(decisions)

    # -- persistence -------------------------------------------------------------------------

    def _callback_write(self, sql: str | None, args: tuple[Any, ...], kind: str | None,
                        payload: dict[str, Any] | None, at: float) -> None:
        """The request's row and its event in one transaction, by the calls' writer; the event
        goes to ``on_event`` (on the loop, with its seq) only once that transaction committed,
        never for a write that failed."""
        loop = asyncio.get_running_loop()

        def write() -> int | None:
            with eventlog.transaction(self.db) as conn:
                if sql is not None:
                    conn.execute(sql, args)
                # callback.* are essential (eventlog.ESSENTIAL_PREFIXES): a callback is a
                # promise to a customer, never dropped for the outbox quota.
                return (eventlog.append(self.db, kind, payload, occurred_at=at)
                        if kind is not None else None)

        def written(future: concurrent.futures.Future[int | None]) -> None:
            # On the writer's thread, after the batch's COMMIT (appliance.dbwriter): the
            # live feed never shows an event the database does not hold.
            if future.cancelled() or future.exception() is not None:
                log.error(kv(event="callback_write_failed", kind=kind or "",
                             error="cancelled" if future.cancelled()
                             else repr(future.exception())))
                return
            if kind is not None and payload is not None and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._emit, kind,
                                              {**payload, "seq": future.result()}, at)

        try:
            self._db_thread.submit(write).add_done_callback(written)
        except Exception as exc:  # WriterFull / WriterClosed: nothing was queued
            log.error(kv(event="callback_write_failed", kind=kind or "", error=repr(exc)))
