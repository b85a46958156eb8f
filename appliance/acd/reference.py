"""The ACD routing rules in plain Python: the reference the compiled router is checked against.

Rules of this file (the compiled ``_router.pyx`` follows them to the letter):

- One global order of waiting callers across every queue: higher ``priority`` first, then the
  earlier place time (a rejoining caller's first join, or the ``place_time`` a caller sent back
  to the queue joins with), then arrival sequence.
- Routing walks that order; for each caller it takes the *available* agents (logged in,
  unpaused, not in wrap-up, below their interaction cap) that are members of the caller's queue
  and meet its skill requirements as relaxed for the time waited, skips those that already
  declined or missed this caller unless no one else is left, keeps the lowest penalty tier, and
  lets the queue's strategy pick. So an agent in several queues takes the first caller in the
  global order they are eligible for.
- Ties in every strategy go to the earlier member in the queue's member list.
- Timers fire in this order: ring timeouts, wrap-up ends, callback retries, wait timeouts; each
  group by (deadline, arrival sequence); then routing runs.
- Calls outside the queues (``OutsideCallStarted`` .. ``OutsideCallEnded``) count against the
  agent's cap like calls in progress, whatever the agent's presence; their end starts no wrap-up
  and changes no statistic and no idle-since time.
- Every event is checked before anything changes: a refused event leaves the state untouched.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable

from appliance.acd.model import (
    AUTO_PAUSE_REASON,
    CALLBACK_DIALLING,
    CALLBACK_RETRY,
    CALLBACK_WAITING,
    CALLER_TRANSITIONS,
    LOGGED_OUT,
    MAX_PRIORITY,
    MIN_PRIORITY,
    OFFERED,
    PAUSED,
    PRESENCE_TRANSITIONS,
    READY,
    WAITING,
    AgentLogin,
    AgentLogout,
    AgentPause,
    AgentUnpause,
    AgentView,
    Announce,
    AnnounceRequest,
    AutoPause,
    CallbackOutcome,
    CallbackRequested,
    CallbackResult,
    CallEnded,
    CallerAbandon,
    CallerJoin,
    CallerView,
    CancelOffer,
    Decision,
    DialCallback,
    EmptyRule,
    LocalProtocolError,
    Offer,
    OfferAccepted,
    OfferRejected,
    OfferTimeout,
    OutsideCallEnded,
    OutsideCallStarted,
    Overflow,
    OverflowReason,
    Plan,
    RouterConfig,
    Strategy,
    WrapUpEnded,
    is_time,
    make_plan,
    splitmix64,
)


class _Agent:
    __slots__ = ("index", "id", "levels", "cap", "presence", "pause_reason", "in_wrap",
                 "wrap_until", "active", "outside", "ringing", "missed", "idle_since",
                 "member_pos")

    def __init__(self, index: int, agent_id: str, levels: tuple[int, ...], cap: int,
                 n_queues: int) -> None:
        self.index = index
        self.id = agent_id
        self.levels = levels
        self.cap = cap
        self.presence = LOGGED_OUT
        self.pause_reason = ""
        self.in_wrap = False
        self.wrap_until = 0.0
        self.active: dict[str, tuple[int, float]] = {}  # call -> (queue index, answered at)
        self.outside: set[str] = set()  # calls outside the queues
        self.ringing = 0
        self.missed = 0
        self.idle_since = 0.0
        self.member_pos = [-1] * n_queues


class _Member:
    __slots__ = ("agent", "pos", "penalty", "weight", "calls", "talk_time")

    def __init__(self, agent: _Agent, pos: int, penalty: int, weight: int) -> None:
        self.agent = agent
        self.pos = pos
        self.penalty = penalty
        self.weight = weight
        self.calls = 0
        self.talk_time = 0.0


class _Queue:
    __slots__ = ("index", "cfg", "members", "reqs", "step_after", "rr_last", "samples")

    def __init__(self, index, cfg, members, reqs, step_after) -> None:
        self.index = index
        self.cfg = cfg
        self.members: list[_Member] = members
        self.reqs = reqs
        self.step_after = step_after
        self.rr_last = -1
        self.samples: list[float] = []


class _Caller:
    __slots__ = ("id", "queue", "number", "priority", "place_time", "seq", "state", "offered",
                 "deadline", "tried", "step_times", "overflow_at", "cb_number", "attempts",
                 "retry_at")

    def __init__(self, call_id, queue, number, priority, place_time, seq) -> None:
        self.id = call_id
        self.queue: _Queue = queue
        self.number = number
        self.priority = priority
        self.place_time = place_time
        self.seq = seq
        self.state = WAITING
        self.offered: list[_Agent] = []
        self.deadline = 0.0
        self.tried: set[int] = set()
        self.step_times: list[float] = []
        self.overflow_at = math.inf
        self.cb_number = ""
        self.attempts = 0
        self.retry_at = 0.0


def _order_key(c: _Caller) -> tuple[int, float, int]:
    return (-c.priority, c.place_time, c.seq)


class ReferenceRouter:
    """The ACD router, sans-IO: feed it events and timer ticks with the time, act on what it
    decides. See ``docs/acd.md`` for the rules."""

    def __init__(self, config: RouterConfig) -> None:
        plan: Plan = make_plan(config)
        self._config = config
        nq = len(plan.queue_names)
        self._agents = [_Agent(i, aid, plan.agent_levels[i], plan.agent_caps[i], nq)
                        for i, aid in enumerate(plan.agent_ids)]
        self._agent_by_id = {a.id: a for a in self._agents}
        self._queues: list[_Queue] = []
        for qi, qcfg in enumerate(config.queues):
            members = []
            for pos, (ai, penalty, weight) in enumerate(plan.queue_members[qi]):
                agent = self._agents[ai]
                agent.member_pos[qi] = pos
                members.append(_Member(agent, pos, penalty, weight))
            self._queues.append(_Queue(qi, qcfg, members, plan.queue_requirements[qi],
                                       plan.queue_step_after[qi]))
        self._queue_by_name = {q.cfg.name: q for q in self._queues}
        self._callers: dict[str, _Caller] = {}
        self._order: list[_Caller] = []
        self._seq = 0
        self._rng = config.seed & ((1 << 64) - 1)
        self._now = -math.inf
        # (caller number, queue index) -> (place time, seq, abandoned at), oldest first
        self._rejoin: dict[tuple[str, int], tuple[float, int, float]] = {}

    # ---------------------------------------------------------------- public API

    @property
    def config(self) -> RouterConfig:
        """The configuration the router was built from."""
        return self._config

    def handle(self, event: object, now: float) -> list[Decision]:
        """Apply one event at time ``now``; returns the decisions it leads to, in order."""
        now = self._check_now(now)
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise LocalProtocolError(f"not an ACD event: {type(event).__name__}")
        out: list[Decision] = []
        handler(self, event, now, out)
        self._now = now
        return out

    def handle_timer(self, now: float) -> list[Decision]:
        """Run what is due at ``now`` (ring timeouts, wrap-up ends, callback retries, wait
        timeouts, skill relaxation) and route."""
        now = self._check_now(now)
        self._now = now
        out: list[Decision] = []
        due = sorted((c.deadline, c.seq, c.id) for c in self._order
                     if c.state == OFFERED and c.deadline <= now)
        for _, _, call_id in due:
            c = self._callers.get(call_id)
            if c is None or c.state != OFFERED:
                continue  # a leave-empty overflow earlier in this tick took it
            # Release every ringing agent first, then count the misses: an auto-pause can
            # empty the queue and overflow this very caller.
            agents = c.offered
            out.append(CancelOffer(c.id, tuple(a.id for a in agents)))
            c.state = self._caller_next(c, "decline")
            c.offered = []
            for a in agents:
                a.ringing -= 1
                c.tried.add(a.index)
            for a in agents:
                self._missed(a, out)
        for _, _, a in sorted((a.wrap_until, a.index, a) for a in self._agents
                              if a.in_wrap and a.wrap_until <= now):
            a.in_wrap = False
            a.idle_since = a.wrap_until
        for _, _, call_id in sorted((c.retry_at, c.seq, c.id) for c in self._order
                                    if c.state == CALLBACK_RETRY and c.retry_at <= now):
            c = self._callers[call_id]
            c.state = self._caller_next(c, "retry-due")
        for _, _, call_id in sorted((c.overflow_at, c.seq, c.id) for c in self._order
                                    if c.state in (WAITING, OFFERED) and c.overflow_at <= now):
            c = self._callers.get(call_id)
            if c is not None and c.state in (WAITING, OFFERED):
                self._overflow(c, OverflowReason.TIMEOUT, out)
        self._route(now, out)
        return out

    def next_timer(self) -> float | None:
        """When ``handle_timer`` next needs to run, or None when nothing is pending."""
        best = math.inf
        for c in self._order:
            st = c.state
            if st == OFFERED:
                best = min(best, c.deadline, c.overflow_at)
            elif st == WAITING:
                best = min(best, c.overflow_at)
            elif st == CALLBACK_RETRY:
                best = min(best, c.retry_at)
            if st in (WAITING, CALLBACK_WAITING):
                for t in c.step_times:
                    if t > self._now:
                        best = min(best, t)
                        break
        for a in self._agents:
            if a.in_wrap:
                best = min(best, a.wrap_until)
        return None if best == math.inf else best

    def position(self, call: str) -> int:
        """1-based place of the caller among those of their queue, in the global order."""
        return self._position(self._caller(call))

    def estimated_wait(self, call: str) -> float:
        """Seconds the caller is estimated still to wait (``math.inf`` with nobody staffed)."""
        c = self._caller(call)
        return self._ewt(c.queue, self._position(c))

    def queue_estimated_wait(self, queue: str) -> float:
        """Estimated wait of a new caller of priority 0 joining ``queue`` now."""
        q = self._queue(queue)
        behind = sum(1 for c in self._order if c.queue is q and c.priority >= 0)
        return self._ewt(q, behind + 1)

    def waiting(self, queue: str) -> tuple[str, ...]:
        """Calls of ``queue`` in the global order (callbacks included)."""
        q = self._queue(queue)
        return tuple(c.id for c in self._order if c.queue is q)

    def agent_view(self, agent: str) -> AgentView:
        """The agent's routing state."""
        a = self._agent_by_id.get(agent)
        if a is None:
            raise LocalProtocolError(f"unknown agent {agent!r}")
        return self._agent_view(a)

    def caller_view(self, call: str) -> CallerView:
        """The queued caller's routing state."""
        return self._caller_view(self._caller(call))

    def snapshot(self) -> dict[str, object]:
        """Everything that decides future routing, as plain values (for comparison)."""
        return {
            "now": self._now,
            "rng": self._rng,
            "agents": tuple(self._agent_view(a) for a in self._agents),
            "callers": tuple(self._caller_view(c) for c in self._order),
            "queues": tuple(
                (q.cfg.name, q.rr_last, tuple(q.samples),
                 tuple((m.calls, m.talk_time) for m in q.members))
                for q in self._queues),
            "rejoin": tuple(sorted(
                (k[0], self._queues[k[1]].cfg.name, v) for k, v in self._rejoin.items())),
            "interactions": tuple(sorted(
                (a.id, call, self._queues[qi].cfg.name, t)
                for a in self._agents for call, (qi, t) in a.active.items())),
            "outside": tuple(sorted((a.id, call) for a in self._agents for call in a.outside)),
        }

    # ---------------------------------------------------------------- event handlers

    def _on_login(self, ev: AgentLogin, now: float, out: list[Decision]) -> None:
        a = self._agent(ev.agent)
        a.presence = self._presence_next(a, "login")
        a.pause_reason = ""
        a.missed = 0
        a.idle_since = now
        self._route(now, out)

    def _on_logout(self, ev: AgentLogout, now: float, out: list[Decision]) -> None:
        a = self._agent(ev.agent)
        a.presence = self._presence_next(a, "logout")
        a.pause_reason = ""
        a.in_wrap = False
        for c in list(self._order):
            if c.state == OFFERED and a in c.offered:
                out.append(CancelOffer(c.id, (a.id,)))
                self._decline(c, a, missed=False, out=out)
        self._leave_empty(a, out)
        self._route(now, out)

    def _on_pause(self, ev: AgentPause, now: float, out: list[Decision]) -> None:
        a = self._agent(ev.agent)
        a.presence = self._presence_next(a, "pause")
        a.pause_reason = ev.reason
        self._leave_empty(a, out)
        self._route(now, out)

    def _on_unpause(self, ev: AgentUnpause, now: float, out: list[Decision]) -> None:
        a = self._agent(ev.agent)
        a.presence = self._presence_next(a, "unpause")
        a.pause_reason = ""
        a.missed = 0
        self._route(now, out)

    def _on_join(self, ev: CallerJoin, now: float, out: list[Decision]) -> None:
        q = self._queue(ev.queue)
        if not isinstance(ev.call, str) or not ev.call:
            raise LocalProtocolError("call id must be a non-empty string")
        if ev.call in self._callers:
            raise LocalProtocolError(f"call {ev.call!r} is already queued")
        if not isinstance(ev.caller_number, str):
            raise LocalProtocolError(f"caller number must be a string, got {ev.caller_number!r}")
        if (not isinstance(ev.priority, int) or isinstance(ev.priority, bool)
                or not MIN_PRIORITY <= ev.priority <= MAX_PRIORITY):
            raise LocalProtocolError(
                f"priority must be an integer in {MIN_PRIORITY}..{MAX_PRIORITY}, "
                f"got {ev.priority!r}")
        given = ev.place_time
        if given is not None and (not is_time(given) or given > now):
            raise LocalProtocolError(
                f"place time must be a finite time not after {now}, got {given!r}")
        cfg = q.cfg
        if self._is_empty(q, cfg.join_empty):
            out.append(Overflow(ev.call, cfg.name, OverflowReason.NO_AGENTS, cfg.overflow_target))
            return
        in_queue = sum(1 for c in self._order if c.queue is q)
        if ((cfg.max_length is not None and in_queue >= cfg.max_length)
                or len(self._order) >= self._config.max_waiting):
            out.append(Overflow(ev.call, cfg.name, OverflowReason.MAX_LENGTH,
                                cfg.overflow_target))
            return
        place_time, seq = now, self._seq
        key = (ev.caller_number, q.index)
        # A place given by the appliance (a caller sent back) wins over a remembered one,
        # which then stays remembered.
        remembered = self._rejoin.get(key) if ev.caller_number and given is None else None
        if given is not None:
            place_time = float(given)
        rejoined = remembered is not None and now - remembered[2] <= cfg.rejoin_window
        if rejoined:
            place_time, seq, _ = remembered
        c = _Caller(ev.call, q, ev.caller_number, ev.priority, place_time, seq)
        if cfg.max_estimated_wait is not None:
            ahead = 0
            k = _order_key(c)
            for other in self._order:
                if other.queue is q and _order_key(other) < k:
                    ahead += 1
            if self._ewt(q, ahead + 1) > cfg.max_estimated_wait:
                out.append(Overflow(ev.call, cfg.name, OverflowReason.ESTIMATED_WAIT,
                                    cfg.overflow_target))
                return
        if remembered is not None:
            del self._rejoin[key]
        if not rejoined:
            self._seq += 1
        c.step_times = [place_time + after for after in q.step_after]
        if cfg.max_wait is not None:
            c.overflow_at = now + cfg.max_wait
        self._callers[c.id] = c
        bisect.insort(self._order, c, key=_order_key)
        self._route(now, out)

    def _on_abandon(self, ev: CallerAbandon, now: float, out: list[Decision]) -> None:
        c = self._caller(ev.call)
        was = c.state
        self._caller_next(c, "abandon")
        if was == OFFERED:
            out.append(CancelOffer(c.id, tuple(a.id for a in c.offered)))
            for a in c.offered:
                a.ringing -= 1
        elif was == CALLBACK_DIALLING:
            c.offered[0].ringing -= 1
        self._remove(c)
        window = c.queue.cfg.rejoin_window
        if (c.number and window > 0 and was in (WAITING, OFFERED)
                and self._config.max_rejoin_memory > 0):
            key = (c.number, c.queue.index)
            self._rejoin.pop(key, None)
            while len(self._rejoin) >= self._config.max_rejoin_memory:
                del self._rejoin[next(iter(self._rejoin))]
            self._rejoin[key] = (c.place_time, c.seq, now)
        self._route(now, out)

    def _on_accepted(self, ev: OfferAccepted, now: float, out: list[Decision]) -> None:
        c, a = self._offered_pair(ev.call, ev.agent)
        self._caller_next(c, "accept")
        others = tuple(o.id for o in c.offered if o is not a)
        if others:
            out.append(CancelOffer(c.id, others))
        for o in c.offered:
            o.ringing -= 1
        self._connect(c, a, now)
        self._route(now, out)

    def _on_rejected(self, ev: OfferRejected, now: float, out: list[Decision]) -> None:
        c, a = self._offered_pair(ev.call, ev.agent)
        self._decline(c, a, missed=False, out=out)
        self._route(now, out)

    def _on_offer_timeout(self, ev: OfferTimeout, now: float, out: list[Decision]) -> None:
        c, a = self._offered_pair(ev.call, ev.agent)
        self._decline(c, a, missed=True, out=out)
        self._route(now, out)

    def _on_call_ended(self, ev: CallEnded, now: float, out: list[Decision]) -> None:
        a = self._agent(ev.agent)
        if ev.call not in a.active:
            raise LocalProtocolError(f"agent {a.id!r} has no call {ev.call!r}")
        qi, answered = a.active.pop(ev.call)
        q = self._queues[qi]
        talk = now - answered
        q.members[a.member_pos[qi]].talk_time += talk
        q.samples.append(talk + q.cfg.wrap_up)
        if len(q.samples) > self._config.handle_time_samples:
            del q.samples[0]
        if q.cfg.wrap_up > 0:
            until = now + q.cfg.wrap_up
            if not a.in_wrap or until > a.wrap_until:
                a.wrap_until = until
            a.in_wrap = True
        elif not a.in_wrap and not a.active:
            a.idle_since = now
        self._route(now, out)

    def _on_wrap_up_ended(self, ev: WrapUpEnded, now: float, out: list[Decision]) -> None:
        a = self._agent(ev.agent)
        if not a.in_wrap:
            raise LocalProtocolError(f"agent {a.id!r} is not in wrap-up")
        a.in_wrap = False
        a.idle_since = now
        self._route(now, out)

    def _on_callback(self, ev: CallbackRequested, now: float, out: list[Decision]) -> None:
        c = self._caller(ev.call)
        if not isinstance(ev.number, str) or not ev.number:
            raise LocalProtocolError("callback number must be a non-empty string")
        was = c.state
        c.state = self._caller_next(c, "callback")
        if was == OFFERED:
            out.append(CancelOffer(c.id, tuple(a.id for a in c.offered)))
            for a in c.offered:
                a.ringing -= 1
            c.offered = []
        c.cb_number = ev.number
        c.overflow_at = math.inf  # the customer is not on the line: no wait timeout
        self._route(now, out)

    def _on_callback_result(self, ev: CallbackResult, now: float, out: list[Decision]) -> None:
        c = self._caller(ev.call)
        q = c.queue
        if ev.answered:
            self._caller_next(c, "answered")
            a = c.offered[0]
            a.ringing -= 1
            self._connect(c, a, now)
            out.append(CallbackOutcome(c.id, q.cfg.name, True, c.attempts))
        else:
            final = c.attempts > q.cfg.callback_retries
            nxt = self._caller_next(c, "gave-up" if final else "failed")
            c.offered[0].ringing -= 1
            c.offered = []
            if final:
                self._remove(c)
                out.append(CallbackOutcome(c.id, q.cfg.name, False, c.attempts))
            else:
                c.state = nxt
                c.retry_at = now + q.cfg.callback_retry_interval
        self._route(now, out)

    def _on_announce(self, ev: AnnounceRequest, now: float, out: list[Decision]) -> None:
        c = self._caller(ev.call)
        self._caller_next(c, "announce")
        pos = self._position(c)
        out.append(Announce(c.id, pos, self._ewt(c.queue, pos)))

    def _on_outside_started(self, ev: OutsideCallStarted, now: float,
                            out: list[Decision]) -> None:
        a = self._outside_event(ev, now)
        if ev.call_id in a.outside:
            raise LocalProtocolError(f"agent {a.id!r} already has outside call {ev.call_id!r}")
        a.outside.add(ev.call_id)
        self._route(now, out)

    def _on_outside_ended(self, ev: OutsideCallEnded, now: float, out: list[Decision]) -> None:
        a = self._outside_event(ev, now)
        if ev.call_id not in a.outside:
            raise LocalProtocolError(f"agent {a.id!r} has no outside call {ev.call_id!r}")
        a.outside.discard(ev.call_id)
        self._route(now, out)

    def _outside_event(self, ev: OutsideCallStarted | OutsideCallEnded, now: float) -> _Agent:
        """Check an outside-call event; returns its agent."""
        a = self._agent(ev.agent)
        if not isinstance(ev.call_id, str) or not ev.call_id:
            raise LocalProtocolError("call id must be a non-empty string")
        at = ev.at
        if (isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at)
                or at > now):
            raise LocalProtocolError(f"at must be a finite time not after {now}, got {at!r}")
        return a

    _HANDLERS = {
        AgentLogin: _on_login,
        AgentLogout: _on_logout,
        AgentPause: _on_pause,
        AgentUnpause: _on_unpause,
        CallerJoin: _on_join,
        CallerAbandon: _on_abandon,
        OfferAccepted: _on_accepted,
        OfferRejected: _on_rejected,
        OfferTimeout: _on_offer_timeout,
        CallEnded: _on_call_ended,
        WrapUpEnded: _on_wrap_up_ended,
        CallbackRequested: _on_callback,
        CallbackResult: _on_callback_result,
        AnnounceRequest: _on_announce,
        OutsideCallStarted: _on_outside_started,
        OutsideCallEnded: _on_outside_ended,
    }

    # ---------------------------------------------------------------- rules

    def _route(self, now: float, out: list[Decision]) -> None:
        avail = [a for a in self._agents if self._available(a)]
        if not avail:
            return
        staffed = self._queues_of(avail)
        for c in self._order:
            if c.state != WAITING and c.state != CALLBACK_WAITING:
                continue
            q = c.queue
            qi = q.index
            if not staffed[qi]:
                continue  # no available member at all: nothing to check
            steps = 0
            for t in c.step_times:
                if t <= now:
                    steps += 1
            reqs = q.reqs[steps]
            eligible = [a for a in avail if a.member_pos[qi] >= 0 and _skilled(a, reqs)]
            if not eligible:
                continue
            fresh = [a for a in eligible if a.index not in c.tried]
            if fresh:
                eligible = fresh
            else:
                c.tried.clear()
            members = sorted((q.members[a.member_pos[qi]] for a in eligible),
                             key=lambda m: m.pos)
            low = min(m.penalty for m in members)
            members = [m for m in members if m.penalty == low]
            picked = self._pick(q, members)
            if c.state == CALLBACK_WAITING:
                a = picked[0].agent
                c.state = self._caller_next(c, "dial")
                c.attempts += 1
                c.offered = [a]
                a.ringing += 1
                out.append(DialCallback(c.id, a.id, q.cfg.name, c.cb_number, c.attempts))
            else:
                c.state = self._caller_next(c, "offer")
                c.offered = [m.agent for m in picked]
                c.deadline = now + q.cfg.ring_timeout
                for m in picked:
                    m.agent.ringing += 1
                out.append(Offer(c.id, tuple(m.agent.id for m in picked), q.cfg.name))
            avail = [a for a in avail if self._available(a)]
            if not avail:
                return
            staffed = self._queues_of(avail)

    def _queues_of(self, avail: list[_Agent]) -> list[bool]:
        """Per queue, whether any of the ``avail`` agents is a member."""
        staffed = [False] * len(self._queues)
        for a in avail:
            for qi, pos in enumerate(a.member_pos):
                if pos >= 0:
                    staffed[qi] = True
        return staffed

    def _pick(self, q: _Queue, members: list[_Member]) -> list[_Member]:
        strategy = q.cfg.strategy
        if strategy is Strategy.RING_ALL:
            return members
        if strategy is Strategy.LINEAR:
            return [members[0]]
        if strategy is Strategy.LONGEST_IDLE:
            best = members[0]
            for m in members[1:]:
                if m.agent.idle_since < best.agent.idle_since:
                    best = m
            return [best]
        if strategy is Strategy.FEWEST_CALLS:
            best = members[0]
            for m in members[1:]:
                if m.calls < best.calls:
                    best = m
            return [best]
        if strategy is Strategy.LEAST_TALK_TIME:
            best = members[0]
            for m in members[1:]:
                if m.talk_time < best.talk_time:
                    best = m
            return [best]
        if strategy is Strategy.ROUND_ROBIN_MEMORY:
            n = len(q.members)
            best = members[0]
            best_d = (best.pos - q.rr_last - 1) % n
            for m in members[1:]:
                d = (m.pos - q.rr_last - 1) % n
                if d < best_d:
                    best, best_d = m, d
            q.rr_last = best.pos
            return [best]
        self._rng, r = splitmix64(self._rng)
        if strategy is Strategy.RANDOM:
            return [members[r % len(members)]]
        total = 0
        for m in members:
            total += m.weight
        r %= total
        for m in members:
            if r < m.weight:
                return [m]
            r -= m.weight
        raise AssertionError("unreachable: weights cover r")

    def _decline(self, c: _Caller, a: _Agent, *, missed: bool, out: list[Decision]) -> None:
        """Agent ``a`` stops ringing for caller ``c`` without answering."""
        remaining = [o for o in c.offered if o is not a]
        c.state = self._caller_next(c, "decline-one" if remaining else "decline")
        c.offered = remaining
        c.tried.add(a.index)
        a.ringing -= 1
        if missed:
            self._missed(a, out)

    def _missed(self, a: _Agent, out: list[Decision]) -> None:
        """An offer rang out at ``a``: count it, and pause ``a`` at the configured limit."""
        a.missed += 1
        limit = self._config.auto_pause_after
        if limit and a.missed >= limit and a.presence == READY:
            a.presence = self._presence_next(a, "auto-pause")
            a.pause_reason = AUTO_PAUSE_REASON
            out.append(AutoPause(a.id, a.missed))
            self._leave_empty(a, out)

    def _connect(self, c: _Caller, a: _Agent, now: float) -> None:
        q = c.queue
        a.active[c.id] = (q.index, now)
        a.missed = 0
        q.members[a.member_pos[q.index]].calls += 1
        self._remove(c)

    def _overflow(self, c: _Caller, reason: OverflowReason, out: list[Decision]) -> None:
        was = c.state
        self._caller_next(c, "overflow")
        if was == OFFERED:
            out.append(CancelOffer(c.id, tuple(a.id for a in c.offered)))
            for a in c.offered:
                a.ringing -= 1
        self._remove(c)
        out.append(Overflow(c.id, c.queue.cfg.name, reason, c.queue.cfg.overflow_target))

    def _leave_empty(self, a: _Agent, out: list[Decision]) -> None:
        """After ``a`` stopped being staffed: callers of queues now empty by their leave rule
        overflow (callbacks stay: the customer is not on the line)."""
        empty = set()
        for qi, pos in enumerate(a.member_pos):
            q = self._queues[qi]
            if pos >= 0 and self._is_empty(q, q.cfg.leave_empty):
                empty.add(qi)
        if not empty:
            return
        for c in list(self._order):
            if c.queue.index in empty and c.state in (WAITING, OFFERED):
                self._overflow(c, OverflowReason.NO_AGENTS, out)

    def _is_empty(self, q: _Queue, rule: EmptyRule) -> bool:
        if rule is EmptyRule.NEVER:
            return False
        for m in q.members:
            p = m.agent.presence
            if p == READY or (p == PAUSED and rule is EmptyRule.UNSTAFFED):
                return False
        return True

    def _available(self, a: _Agent) -> bool:
        return (a.presence == READY and not a.in_wrap
                and len(a.active) + len(a.outside) + a.ringing < a.cap)

    def _position(self, c: _Caller) -> int:
        pos = 1
        for other in self._order:
            if other is c:
                return pos
            if other.queue is c.queue:
                pos += 1
        raise AssertionError("queued caller missing from the order")

    def _ewt(self, q: _Queue, position: int) -> float:
        staffed = 0
        for m in q.members:
            if m.agent.presence == READY:
                staffed += m.agent.cap
        if staffed == 0:
            return math.inf
        if q.samples:
            total = 0.0
            for s in q.samples:
                total += s
            handle = total / len(q.samples)
        else:
            handle = float(q.cfg.default_handle_time)
        return handle * position / staffed

    def _remove(self, c: _Caller) -> None:
        i = bisect.bisect_left(self._order, _order_key(c), key=_order_key)
        if self._order[i] is not c:
            raise AssertionError("order out of step")
        del self._order[i]
        del self._callers[c.id]

    # ---------------------------------------------------------------- lookups and tables

    def _check_now(self, now: float) -> float:
        if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise LocalProtocolError(f"now must be a finite number, got {now!r}")
        if now < self._now:
            raise LocalProtocolError(f"time ran backwards: {now} < {self._now}")
        return float(now)

    def _agent(self, agent_id: str) -> _Agent:
        a = self._agent_by_id.get(agent_id)
        if a is None:
            raise LocalProtocolError(f"unknown agent {agent_id!r}")
        return a

    def _queue(self, name: str) -> _Queue:
        q = self._queue_by_name.get(name)
        if q is None:
            raise LocalProtocolError(f"unknown queue {name!r}")
        return q

    def _caller(self, call: str) -> _Caller:
        c = self._callers.get(call)
        if c is None:
            raise LocalProtocolError(f"no queued call {call!r}")
        return c

    def _offered_pair(self, call: str, agent: str) -> tuple[_Caller, _Agent]:
        c = self._caller(call)
        a = self._agent(agent)
        if c.state != OFFERED or a not in c.offered:
            raise LocalProtocolError(f"call {call!r} is not ringing at agent {agent!r}")
        return c, a

    @staticmethod
    def _presence_next(a: _Agent, what: str) -> str:
        nxt = PRESENCE_TRANSITIONS.get((a.presence, what))
        if nxt is None:
            raise LocalProtocolError(f"agent {a.id!r}: cannot {what} while {a.presence}")
        return nxt

    @staticmethod
    def _caller_next(c: _Caller, what: str) -> str | None:
        key = (c.state, what)
        if key not in CALLER_TRANSITIONS:
            raise LocalProtocolError(f"call {c.id!r}: cannot {what} while {c.state}")
        return CALLER_TRANSITIONS[key]

    @staticmethod
    def _agent_view(a: _Agent) -> AgentView:
        return AgentView(a.id, a.presence, a.pause_reason, a.in_wrap, len(a.active), a.ringing,
                         a.missed, a.idle_since, len(a.outside))

    @staticmethod
    def _caller_view(c: _Caller) -> CallerView:
        return CallerView(c.id, c.queue.cfg.name, c.state, c.priority, c.place_time,
                          tuple(a.id for a in c.offered))


def _skilled(a: _Agent, reqs: Iterable[tuple[int, int]]) -> bool:
    levels = a.levels
    return all(levels[s] >= lvl for s, lvl in reqs)
