# cython: language_level=3
"""The compiled ACD router: the rules of ``appliance.acd.reference``, to the letter, with typed
state and C arrays on the routing path (eligibility, skills, strategy picks), the available
agents kept as they change, each queue's callers in the global order (routing merges the
heads of the queues a free agent belongs to; there is no list of every caller), the offers
ringing at each agent, and a heap of timers, so that routing, ``handle_timer()``,
``next_timer()``, positions, estimated waits, a logout and a queue emptied by ``leave_empty`` do
not scan every waiting caller (docs/acd.md, "Numbers").

The reference's module docstring states the rules; ``tests/test_acd_equivalence.py`` drives
both with the same random event sequences and requires the same decisions and state.
"""

import math

cimport cython
from cpython.object cimport PyObject_GenericSetAttr
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.math cimport isfinite
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc, realloc

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
    Strategy,
    WrapUpEnded,
    is_time,
    make_plan,
)

# Presence and caller states as small integers; the names and the transition tables come from
# appliance.acd.model so that both routers share one definition.
cdef enum:
    P_LOGGED_OUT = 0
    P_READY = 1
    P_PAUSED = 2

cdef enum:
    S_GONE = -1
    S_WAITING = 0
    S_OFFERED = 1
    S_CB_WAITING = 2
    S_CB_DIALLING = 3
    S_CB_RETRY = 4

_PRESENCE_NAMES = (LOGGED_OUT, READY, PAUSED)
_PRESENCE_CODE = {name: i for i, name in enumerate(_PRESENCE_NAMES)}
_STATE_NAMES = (WAITING, OFFERED, CALLBACK_WAITING, CALLBACK_DIALLING, CALLBACK_RETRY)
_STATE_CODE = {name: i for i, name in enumerate(_STATE_NAMES)}
# The same tables indexed by state code, then by input: no key tuple to build per transition.
_PRESENCE_TABLE = [{what: _PRESENCE_CODE[n] for (s, what), n in PRESENCE_TRANSITIONS.items()
                    if s == name} for name in _PRESENCE_NAMES]
_CALLER_TABLE = [{what: (S_GONE if n is None else _STATE_CODE[n])
                  for (s, what), n in CALLER_TRANSITIONS.items() if s == name}
                 for name in _STATE_NAMES]

cdef enum:
    ST_RING_ALL = 0
    ST_LONGEST_IDLE = 1
    ST_FEWEST_CALLS = 2
    ST_LEAST_TALK_TIME = 3
    ST_ROUND_ROBIN_MEMORY = 4
    ST_LINEAR = 5
    ST_RANDOM = 6
    ST_WEIGHTED_RANDOM = 7

_STRATEGY_CODE = {
    Strategy.RING_ALL: ST_RING_ALL,
    Strategy.LONGEST_IDLE: ST_LONGEST_IDLE,
    Strategy.FEWEST_CALLS: ST_FEWEST_CALLS,
    Strategy.LEAST_TALK_TIME: ST_LEAST_TALK_TIME,
    Strategy.ROUND_ROBIN_MEMORY: ST_ROUND_ROBIN_MEMORY,
    Strategy.LINEAR: ST_LINEAR,
    Strategy.RANDOM: ST_RANDOM,
    Strategy.WEIGHTED_RANDOM: ST_WEIGHTED_RANDOM,
}
cdef enum:
    E_NEVER = 0
    E_UNSTAFFED = 1
    E_UNAVAILABLE = 2

_EMPTY_CODE = {EmptyRule.NEVER: E_NEVER, EmptyRule.UNSTAFFED: E_UNSTAFFED,
               EmptyRule.UNAVAILABLE: E_UNAVAILABLE}

cdef double INF = math.inf

# Kinds of timer in Router._timers; an entry is live while the state still holds that timer.
cdef enum:
    K_RING = 0      # a ringing offer's ring timeout (caller offered, deadline)
    K_OVERFLOW = 1  # a waiting or ringing caller's max_wait
    K_RETRY = 2     # a failed callback's next attempt
    K_STEP = 3      # a skill relaxation step of a waiting caller or callback
    K_WRAP = 4      # an agent's wrap-up end

# The router's own objects hold no reference back to a caller (the per-queue orders and the
# callers ringing at an agent live in the Router, by object or by call id), so they form no
# reference cycle and stay out of the cycle collector: with 10,000 waiting callers its passes
# over them cost more than the routing itself.
@cython.no_gc
cdef class _Agent:
    pass


@cython.no_gc
cdef class _Member:
    pass


@cython.no_gc
cdef class _Queue:
    pass


@cython.no_gc
cdef class _Caller:
    pass


def _order_key(_Caller c):
    """A caller's place in the global order: (priority, place time, seq), as in the reference."""
    return (-c.priority, c.place_time, c.seq)


cdef object _new_object = object.__new__


cdef object _offer(str call, tuple agents, str queue):
    """``Offer(call, agents, queue)`` without the frozen dataclass's ``__init__``, whose three
    ``object.__setattr__`` calls go through Python: the same fields, an equal object."""
    o = _new_object(Offer)
    PyObject_GenericSetAttr(o, "call", call)
    PyObject_GenericSetAttr(o, "agents", agents)
    PyObject_GenericSetAttr(o, "queue", queue)
    return o


cdef object _cancel_offer(str call, tuple agents):
    """``CancelOffer(call, agents)``, built as ``_offer`` builds an Offer."""
    o = _new_object(CancelOffer)
    PyObject_GenericSetAttr(o, "call", call)
    PyObject_GenericSetAttr(o, "agents", agents)
    return o


cdef inline bint _before(_Caller x, _Caller y) noexcept:
    """True when ``x`` is ahead of ``y`` in the global order (priority, place time, seq)."""
    if x.priority != y.priority:
        return x.priority > y.priority
    if x.place_time != y.place_time:
        return x.place_time < y.place_time
    return x.seq < y.seq


cdef int _presence_next(_Agent a, str what) except -2:
    nxt = (<dict>(<list>_PRESENCE_TABLE)[a.presence]).get(what)
    if nxt is None:
        raise LocalProtocolError(
            f"agent {a.id!r}: cannot {what} while {_PRESENCE_NAMES[a.presence]}")
    return nxt


cdef int _caller_next(_Caller c, str what) except -2:
    nxt = (<dict>(<list>_CALLER_TABLE)[c.state]).get(what) if c.state >= 0 else None
    if nxt is None:
        raise LocalProtocolError(f"call {c.id!r}: cannot {what} while {_STATE_NAMES[c.state]}")
    return nxt


cdef inline bint _timer_before(_Timer* x, _Timer* y) noexcept:
    return x.t < y.t or (x.t == y.t and x.tie < y.tie)


cdef Py_ssize_t _find_in(list order, _Caller c) except -1:
    """Index where ``c`` is (or belongs) in ``order``: the first caller not ahead of it."""
    cdef Py_ssize_t lo = 0, hi = len(order), mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if _before(<_Caller>order[mid], c):
            lo = mid + 1
        else:
            hi = mid
    return lo


cdef void* _alloc(size_t n, size_t size) except NULL:
    cdef void* p = malloc((n if n > 0 else 1) * size)
    if p == NULL:
        raise MemoryError()
    return p


cdef class Router:
    """The ACD router, sans-IO, compiled: the same rules and API as ``ReferenceRouter``."""

    def __cinit__(self):
        self._member_pos = NULL
        self._levels = NULL
        self._step_after = NULL
        self._step_base = NULL
        self._req_start = NULL
        self._req_base = NULL
        self._req_skill = NULL
        self._req_min = NULL
        self._avail = NULL
        self._cand = NULL
        self._staffed = NULL
        self._free = NULL
        self._sq = NULL
        self._sq_at = NULL
        self._heads = NULL
        self._timers = NULL
        self._n_timers = 0
        self._timers_cap = 0

    def __dealloc__(self):
        free(self._member_pos)
        free(self._levels)
        free(self._step_after)
        free(self._step_base)
        free(self._req_start)
        free(self._req_base)
        free(self._req_skill)
        free(self._req_min)
        free(self._avail)
        free(self._cand)
        free(self._staffed)
        free(self._free)
        free(self._sq)
        free(self._sq_at)
        free(self._heads)
        self._clear_timers()
        free(self._timers)

    def __init__(self, config):
        cdef int i, qi, k, n_steps_total, n_reqs_total, n_starts, si, ri, st
        cdef _Agent a
        cdef _Queue q
        cdef _Member m
        plan = make_plan(config)
        self._config = config
        self._nq = len(plan.queue_names)
        self._na = len(plan.agent_ids)
        self._ns = len(plan.skills)
        self._auto_pause_after = config.auto_pause_after
        self._samples_max = config.handle_time_samples
        self._max_waiting = config.max_waiting
        self._max_rejoin = config.max_rejoin_memory
        self._member_pos = <int*>_alloc(self._na * self._nq, sizeof(int))
        self._levels = <int*>_alloc(self._na * self._ns, sizeof(int))
        self._avail = <int*>_alloc(self._na, sizeof(int))
        self._cand = <int*>_alloc(self._na, sizeof(int))
        self._staffed = <char*>_alloc(self._nq, sizeof(char))
        self._free = <int*>_alloc(self._na, sizeof(int))
        self._n_free = 0
        self._sq = <int*>_alloc(self._nq, sizeof(int))
        self._sq_at = <Py_ssize_t*>_alloc(self._nq, sizeof(Py_ssize_t))
        self._heads = <int*>_alloc(self._nq, sizeof(int))
        self._timer_tie = 0
        self._timer_limit = 1024
        for i in range(self._na * self._nq):
            self._member_pos[i] = -1
        self._agents = []
        for i in range(self._na):
            a = _Agent()
            a.index = i
            a.id = plan.agent_ids[i]
            a.cap = plan.agent_caps[i]
            a.presence = P_LOGGED_OUT
            a.pause_reason = ""
            a.in_wrap = False
            a.wrap_until = 0.0
            a.active = {}
            a.outside = set()
            a.ringing = 0
            a.missed = 0
            a.idle_since = 0.0
            a.free_pos = -1
            a.offered_calls = set()
            for k in range(self._ns):
                self._levels[i * self._ns + k] = plan.agent_levels[i][k]
            self._agents.append(a)
        self._agent_by_id = {a.id: a for a in self._agents}
        n_steps_total = 0
        n_reqs_total = 0
        n_starts = 0
        for qi in range(self._nq):
            n_steps_total += len(plan.queue_step_after[qi])
            n_starts += len(plan.queue_requirements[qi]) + 1
            for reqs in plan.queue_requirements[qi]:
                n_reqs_total += len(reqs)
        self._step_after = <double*>_alloc(n_steps_total, sizeof(double))
        self._step_base = <int*>_alloc(self._nq, sizeof(int))
        self._req_start = <int*>_alloc(n_starts, sizeof(int))
        self._req_base = <int*>_alloc(self._nq, sizeof(int))
        self._req_skill = <int*>_alloc(n_reqs_total, sizeof(int))
        self._req_min = <int*>_alloc(n_reqs_total, sizeof(int))
        self._queues = []
        si = 0
        st = 0
        ri = 0
        for qi in range(self._nq):
            cfg = config.queues[qi]
            q = _Queue()
            q.index = qi
            q.cfg = cfg
            q.name = cfg.name
            q.target = cfg.overflow_target
            q.strategy = _STRATEGY_CODE[cfg.strategy]
            q.ring_timeout = cfg.ring_timeout
            q.wrap_up = cfg.wrap_up
            q.has_max_wait = cfg.max_wait is not None
            q.max_wait = cfg.max_wait if cfg.max_wait is not None else 0.0
            q.max_length = cfg.max_length if cfg.max_length is not None else -1
            q.has_max_ewt = cfg.max_estimated_wait is not None
            q.max_ewt = cfg.max_estimated_wait if q.has_max_ewt else 0.0
            q.join_empty = _EMPTY_CODE[cfg.join_empty]
            q.leave_empty = _EMPTY_CODE[cfg.leave_empty]
            q.default_handle_time = cfg.default_handle_time
            q.retries = cfg.callback_retries
            q.retry_interval = cfg.callback_retry_interval
            q.rejoin_window = cfg.rejoin_window
            q.rr_last = -1
            q.samples = []
            q.n_callers = 0
            q.members = []
            for k, (ai, penalty, weight) in enumerate(plan.queue_members[qi]):
                m = _Member()
                m.agent = self._agents[ai]
                m.pos = k
                m.penalty = penalty
                m.weight = weight
                m.calls = 0
                m.talk_time = 0.0
                self._member_pos[ai * self._nq + qi] = k
                q.members.append(m)
            q.n_steps = len(plan.queue_step_after[qi])
            self._step_base[qi] = si
            for after in plan.queue_step_after[qi]:
                self._step_after[si] = after
                si += 1
            self._req_base[qi] = st
            for reqs in plan.queue_requirements[qi]:
                self._req_start[st] = ri
                st += 1
                for skill, level in reqs:
                    self._req_skill[ri] = skill
                    self._req_min[ri] = level
                    ri += 1
            self._req_start[st] = ri
            st += 1
            self._queues.append(q)
        self._queue_by_name = {q.name: q for q in self._queues}
        self._callers = {}
        self._orders = [[] for qi in range(self._nq)]
        self._n_callers = 0
        self._seq = 0
        self._rng = <uint64_t>(config.seed & 0xFFFFFFFFFFFFFFFF)
        self._now = -INF
        self._rejoin = {}

    # ---------------------------------------------------------------- public API

    @property
    def config(self):
        """The configuration the router was built from."""
        return self._config

    def handle(self, event, now):
        """Apply one event at time ``now``; returns the decisions it leads to, in order."""
        cdef double t = self._check_now(now)
        cdef list out = []
        kind = type(event)
        if kind is CallerJoin:
            self._on_join(event, t, out)
        elif kind is OfferAccepted:
            self._on_accepted(event, t, out)
        elif kind is CallEnded:
            self._on_call_ended(event, t, out)
        elif kind is WrapUpEnded:
            self._on_wrap_up_ended(event, t, out)
        elif kind is CallerAbandon:
            self._on_abandon(event, t, out)
        elif kind is OfferRejected:
            self._on_declined(event, t, False, out)
        elif kind is OfferTimeout:
            self._on_declined(event, t, True, out)
        elif kind is AgentLogin:
            self._on_login(event, t, out)
        elif kind is AgentLogout:
            self._on_logout(event, t, out)
        elif kind is AgentPause:
            self._on_pause(event, t, out)
        elif kind is AgentUnpause:
            self._on_unpause(event, t, out)
        elif kind is CallbackRequested:
            self._on_callback(event, t, out)
        elif kind is CallbackResult:
            self._on_callback_result(event, t, out)
        elif kind is AnnounceRequest:
            self._on_announce(event, t, out)
        elif kind is OutsideCallStarted:
            self._on_outside(event, t, True, out)
        elif kind is OutsideCallEnded:
            self._on_outside(event, t, False, out)
        else:
            raise LocalProtocolError(f"not an ACD event: {kind.__name__}")
        self._now = t
        if self._n_timers > self._timer_limit:
            self._rebuild_timers()
        return out

    def handle_timer(self, now):
        """Run what is due at ``now`` (ring timeouts, wrap-up ends, callback retries, wait
        timeouts, skill relaxation) and route."""
        cdef double t = self._check_now(now)
        cdef list out = []
        cdef _Caller c
        cdef _Agent a
        cdef tuple agents
        cdef int kind
        cdef dict rings = {}, wraps = {}, retries = {}, overflows = {}
        self._now = t
        # What is due sits at the top of the timer heap: take it off (stale entries with it),
        # then handle it group by group in the reference's order, never looking at the callers
        # nothing is due for. An entry may be there twice (re-armed at the same time): the
        # dicts keep one.
        while self._n_timers and self._timers[0].t <= t:
            if self._timer_live(&self._timers[0]):
                kind = self._timers[0].kind
                what = <object>self._timers[0].what
                if kind == K_RING:
                    c = <_Caller>what
                    rings[c.id] = (c.deadline, c.seq, c.id)
                elif kind == K_WRAP:
                    a = <_Agent>what
                    wraps[a.index] = (a.wrap_until, a.index, a)
                elif kind == K_RETRY:
                    c = <_Caller>what
                    retries[c.id] = (c.retry_at, c.seq, c.id)
                elif kind == K_OVERFLOW:
                    c = <_Caller>what
                    overflows[c.id] = (c.overflow_at, c.seq, c.id)
                # K_STEP: a relaxation step now passed only asks for the routing below
            self._pop_timer()
        for _, _, call_id in sorted(rings.values()):
            c = self._callers.get(call_id)
            if c is None or c.state != S_OFFERED:
                continue
            agents = c.offered
            out.append(_cancel_offer(c.id, tuple([a.id for a in agents])))
            c.state = _caller_next(c, "decline")
            c.offered = ()
            if c.tried is None:
                c.tried = set()
            for a in agents:
                self._unring(c, a)
                c.tried.add(a.index)
            self._arm_steps(c, t)
            for a in agents:
                self._missed(a, out)
        for _, _, a in sorted(wraps.values()):
            a.in_wrap = False
            a.idle_since = a.wrap_until
            self._refresh(a)
        for _, _, call_id in sorted(retries.values()):
            c = self._callers[call_id]
            c.state = _caller_next(c, "retry-due")
            self._arm_steps(c, t)
        for _, _, call_id in sorted(overflows.values()):
            c = self._callers.get(call_id)
            if c is not None and (c.state == S_WAITING or c.state == S_OFFERED):
                self._overflow(c, OverflowReason.TIMEOUT, out)
        self._route(t, out)
        if self._n_timers > self._timer_limit:
            self._rebuild_timers()
        return out

    def next_timer(self):
        """When ``handle_timer`` next needs to run, or None when nothing is pending."""
        while self._n_timers:
            if self._timer_live(&self._timers[0]):
                return self._timers[0].t
            self._pop_timer()  # stale: the state no longer holds this timer
        return None

    def position(self, call):
        """1-based place of the caller among those of their queue, in the global order."""
        return self._position(self._caller(call))

    def estimated_wait(self, call):
        """Seconds the caller is estimated still to wait (``math.inf`` with nobody staffed)."""
        cdef _Caller c = self._caller(call)
        return self._ewt(c.queue, self._position(c))

    def queue_estimated_wait(self, queue):
        """Estimated wait of a new caller of priority 0 joining ``queue`` now."""
        cdef _Queue q = self._queue(queue)
        cdef list lst = self._orders[q.index]
        cdef Py_ssize_t lo = 0, hi = len(lst), mid
        # The queue's callers of priority 0 and above come first in its order.
        while lo < hi:
            mid = (lo + hi) >> 1
            if (<_Caller>lst[mid]).priority >= 0:
                lo = mid + 1
            else:
                hi = mid
        return self._ewt(q, lo + 1)

    def waiting(self, queue):
        """Calls of ``queue`` in the global order (callbacks included)."""
        cdef _Queue q = self._queue(queue)
        cdef _Caller c
        return tuple([c.id for c in <list>self._orders[q.index]])

    def agent_view(self, agent):
        """The agent's routing state."""
        a = self._agent_by_id.get(agent)
        if a is None:
            raise LocalProtocolError(f"unknown agent {agent!r}")
        return self._agent_view(a)

    def caller_view(self, call):
        """The queued caller's routing state."""
        return self._caller_view(self._caller(call))

    def snapshot(self):
        """Everything that decides future routing, as plain values (for comparison)."""
        cdef _Agent a
        cdef _Queue q
        cdef _Member m
        return {
            "now": self._now,
            "rng": int(self._rng),
            "agents": tuple([self._agent_view(a) for a in self._agents]),
            "callers": tuple([self._caller_view(c)
                              for c in self._in_order(self._callers.values())]),
            "queues": tuple([
                (q.name, q.rr_last, tuple(q.samples),
                 tuple([(m.calls, m.talk_time) for m in q.members]))
                for q in self._queues]),
            "rejoin": tuple(sorted([
                (k[0], (<_Queue>self._queues[k[1]]).name, v) for k, v in self._rejoin.items()])),
            "interactions": tuple(sorted([
                (a.id, call, (<_Queue>self._queues[v[0]]).name, v[1])
                for a in self._agents for call, v in a.active.items()])),
            "outside": tuple(sorted([(a.id, call) for a in self._agents for call in a.outside])),
        }

    # ---------------------------------------------------------------- event handlers

    cdef _on_login(self, ev, double now, list out):
        cdef _Agent a = self._agent(ev.agent)
        a.presence = _presence_next(a, "login")
        a.pause_reason = ""
        a.missed = 0
        a.idle_since = now
        self._refresh(a)
        self._route(now, out)

    cdef _on_logout(self, ev, double now, list out):
        cdef _Agent a = self._agent(ev.agent)
        cdef _Caller c
        a.presence = _presence_next(a, "logout")
        a.pause_reason = ""
        a.in_wrap = False
        self._refresh(a)
        # The offers ringing at the agent, in the global order (not a walk of every caller).
        ringing = [self._callers[call] for call in a.offered_calls]
        for c in self._in_order(ringing):
            if c.state == S_OFFERED:
                out.append(_cancel_offer(c.id, (a.id,)))
                self._decline(c, a, False, out)
        self._leave_empty(a, out)
        self._route(now, out)

    cdef _on_pause(self, ev, double now, list out):
        cdef _Agent a = self._agent(ev.agent)
        a.presence = _presence_next(a, "pause")
        a.pause_reason = ev.reason
        self._refresh(a)
        self._leave_empty(a, out)
        self._route(now, out)

    cdef _on_unpause(self, ev, double now, list out):
        cdef _Agent a = self._agent(ev.agent)
        a.presence = _presence_next(a, "unpause")
        a.pause_reason = ""
        a.missed = 0
        self._refresh(a)
        self._route(now, out)

    cdef _on_join(self, ev, double now, list out):
        cdef _Queue q = self._queue(ev.queue)
        cdef _Caller c
        cdef long long ahead
        cdef double place_time
        cdef long long seq
        cdef bint rejoined
        call = ev.call
        if not isinstance(call, str) or not call:
            raise LocalProtocolError("call id must be a non-empty string")
        if call in self._callers:
            raise LocalProtocolError(f"call {call!r} is already queued")
        if not isinstance(ev.caller_number, str):
            raise LocalProtocolError(f"caller number must be a string, got {ev.caller_number!r}")
        priority = ev.priority
        if (not isinstance(priority, int) or isinstance(priority, bool)
                or not MIN_PRIORITY <= priority <= MAX_PRIORITY):
            raise LocalProtocolError(
                f"priority must be an integer in {MIN_PRIORITY}..{MAX_PRIORITY}, "
                f"got {priority!r}")
        given = ev.place_time
        if given is not None and (not is_time(given) or given > now):
            raise LocalProtocolError(
                f"place time must be a finite time not after {now}, got {given!r}")
        if self._is_empty(q, q.join_empty):
            out.append(Overflow(call, q.name, OverflowReason.NO_AGENTS, q.target))
            return
        if ((q.max_length >= 0 and q.n_callers >= q.max_length)
                or self._n_callers >= self._max_waiting):
            out.append(Overflow(call, q.name, OverflowReason.MAX_LENGTH, q.target))
            return
        place_time = now
        seq = self._seq
        number = ev.caller_number
        key = (number, q.index)
        # A place given by the appliance (a caller sent back) wins over a remembered one,
        # which then stays remembered.
        remembered = self._rejoin.get(key) if number and given is None else None
        if given is not None:
            place_time = <double>given
        rejoined = remembered is not None and now - <double>remembered[2] <= q.rejoin_window
        if rejoined:
            place_time = remembered[0]
            seq = remembered[1]
        c = _Caller()
        c.id = call
        c.queue = q
        c.number = number
        c.priority = priority
        c.place_time = place_time
        c.seq = seq
        c.state = S_WAITING
        c.offered = ()
        c.deadline = 0.0
        c.tried = None
        c.overflow_at = INF
        c.cb_number = ""
        c.attempts = 0
        c.retry_at = 0.0
        if q.has_max_ewt:
            ahead = _find_in(self._orders[q.index], c)  # the queue's callers ahead of the newcomer
            if self._ewt(q, ahead + 1) > q.max_ewt:
                out.append(Overflow(call, q.name, OverflowReason.ESTIMATED_WAIT, q.target))
                return
        if remembered is not None:
            del self._rejoin[key]
        if not rejoined:
            self._seq += 1
        if q.has_max_wait:
            c.overflow_at = now + q.max_wait
            self._push_timer(c.overflow_at, K_OVERFLOW, c)
        self._callers[call] = c
        self._insert(c)
        self._arm_steps(c, now)
        self._route(now, out)

    cdef _on_abandon(self, ev, double now, list out):
        cdef _Caller c = self._caller(ev.call)
        cdef _Agent a
        cdef int was = c.state
        _caller_next(c, "abandon")
        if was == S_OFFERED:
            out.append(_cancel_offer(c.id, tuple([a.id for a in c.offered])))
            for a in c.offered:
                self._unring(c, a)
        elif was == S_CB_DIALLING:
            self._unring(c, c.offered[0])
        self._remove(c)
        if (c.number and c.queue.rejoin_window > 0 and (was == S_WAITING or was == S_OFFERED)
                and self._max_rejoin > 0):
            key = (c.number, c.queue.index)
            self._rejoin.pop(key, None)
            while len(self._rejoin) >= self._max_rejoin:
                del self._rejoin[next(iter(self._rejoin))]
            self._rejoin[key] = (c.place_time, c.seq, now)
        self._route(now, out)

    cdef _on_accepted(self, ev, double now, list out):
        cdef _Caller c
        cdef _Agent a, o
        c, a = self._offered_pair(ev.call, ev.agent)
        _caller_next(c, "accept")
        others = tuple([o.id for o in c.offered if o is not a])
        if others:
            out.append(_cancel_offer(c.id, others))
        for o in c.offered:
            self._unring(c, o)
        self._connect(c, a, now)
        self._route(now, out)

    cdef _on_declined(self, ev, double now, bint missed, list out):
        cdef _Caller c
        cdef _Agent a
        c, a = self._offered_pair(ev.call, ev.agent)
        self._decline(c, a, missed, out)
        self._route(now, out)

    cdef _on_call_ended(self, ev, double now, list out):
        cdef _Agent a = self._agent(ev.agent)
        cdef _Queue q
        cdef _Member m
        cdef double talk, until
        call = ev.call
        if call not in a.active:
            raise LocalProtocolError(f"agent {a.id!r} has no call {call!r}")
        qi, answered = a.active.pop(call)
        q = self._queues[qi]
        talk = now - <double>answered
        m = q.members[self._member_pos[a.index * self._nq + q.index]]
        m.talk_time += talk
        q.samples.append(talk + q.wrap_up)
        if len(q.samples) > self._samples_max:
            del q.samples[0]
        if q.wrap_up > 0:
            until = now + q.wrap_up
            if not a.in_wrap or until > a.wrap_until:
                a.wrap_until = until
            a.in_wrap = True
            self._push_timer(a.wrap_until, K_WRAP, a)
        elif not a.in_wrap and not a.active:
            a.idle_since = now
        self._refresh(a)
        self._route(now, out)

    cdef _on_wrap_up_ended(self, ev, double now, list out):
        cdef _Agent a = self._agent(ev.agent)
        if not a.in_wrap:
            raise LocalProtocolError(f"agent {a.id!r} is not in wrap-up")
        a.in_wrap = False
        a.idle_since = now
        self._refresh(a)
        self._route(now, out)

    cdef _on_callback(self, ev, double now, list out):
        cdef _Caller c = self._caller(ev.call)
        cdef _Agent a
        cdef int was
        if not isinstance(ev.number, str) or not ev.number:
            raise LocalProtocolError("callback number must be a non-empty string")
        was = c.state
        c.state = _caller_next(c, "callback")
        if was == S_OFFERED:
            out.append(_cancel_offer(c.id, tuple([a.id for a in c.offered])))
            for a in c.offered:
                self._unring(c, a)
            c.offered = ()
        c.cb_number = ev.number
        c.overflow_at = INF
        self._arm_steps(c, now)
        self._route(now, out)

    cdef _on_callback_result(self, ev, double now, list out):
        cdef _Caller c = self._caller(ev.call)
        cdef _Queue q = c.queue
        cdef _Agent a
        cdef bint final
        cdef int nxt
        if ev.answered:
            _caller_next(c, "answered")
            a = c.offered[0]
            self._unring(c, a)
            self._connect(c, a, now)
            out.append(CallbackOutcome(c.id, q.name, True, c.attempts))
        else:
            final = c.attempts > q.retries
            nxt = _caller_next(c, "gave-up" if final else "failed")
            self._unring(c, c.offered[0])
            c.offered = ()
            if final:
                self._remove(c)
                out.append(CallbackOutcome(c.id, q.name, False, c.attempts))
            else:
                c.state = nxt
                c.retry_at = now + q.retry_interval
                self._push_timer(c.retry_at, K_RETRY, c)
        self._route(now, out)

    cdef _on_announce(self, ev, double now, list out):
        cdef _Caller c = self._caller(ev.call)
        cdef long long pos
        _caller_next(c, "announce")
        pos = self._position(c)
        out.append(Announce(c.id, pos, self._ewt(c.queue, pos)))

    cdef _on_outside(self, ev, double now, bint started, list out):
        cdef _Agent a = self._agent(ev.agent)
        call = ev.call_id
        if not isinstance(call, str) or not call:
            raise LocalProtocolError("call id must be a non-empty string")
        at = ev.at
        if (isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at)
                or at > now):
            raise LocalProtocolError(f"at must be a finite time not after {now}, got {at!r}")
        if started:
            if call in a.outside:
                raise LocalProtocolError(f"agent {a.id!r} already has outside call {call!r}")
            a.outside.add(call)
        else:
            if call not in a.outside:
                raise LocalProtocolError(f"agent {a.id!r} has no outside call {call!r}")
            a.outside.discard(call)
        self._refresh(a)
        self._route(now, out)

    # ---------------------------------------------------------------- rules

    cdef bint _available(self, _Agent a) noexcept:
        return (a.presence == P_READY and not a.in_wrap
                and len(a.active) + len(a.outside) + a.ringing < a.cap)

    cdef void _refresh(self, _Agent a) noexcept:
        """Keep ``_free`` in step with the agent's availability; called after every change of
        presence, wrap-up, calls or ringing offers, so routing never scans every agent."""
        cdef int last
        if self._available(a):
            if a.free_pos < 0:
                a.free_pos = self._n_free
                self._free[self._n_free] = a.index
                self._n_free += 1
        elif a.free_pos >= 0:
            self._n_free -= 1
            last = self._free[self._n_free]
            self._free[a.free_pos] = last
            (<_Agent>self._agents[last]).free_pos = a.free_pos
            a.free_pos = -1

    cdef int _collect_avail(self) noexcept:
        # The order of _avail does not matter: candidates are sorted by member position.
        cdef int i
        for i in range(self._n_free):
            self._avail[i] = self._free[i]
        return self._n_free

    cdef int _route(self, double now, list out) except -1:
        """Offer each waiting caller, in the global order, to the agents free for them.

        Only callers of a queue with an available member can be offered, so only those queues'
        orders are merged (a binary heap of their head callers): a freed agent looks at the
        heads of their own queues, never at every waiting caller."""
        cdef int n_avail = self._collect_avail()
        cdef int n_sq = 0, n_heads = 0, qi, k, j, keep
        cdef Py_ssize_t at
        cdef _Caller c
        cdef list lst
        if n_avail == 0:
            return 0
        self._mark_staffed(n_avail)
        for qi in range(self._nq):
            if self._staffed[qi]:
                lst = self._orders[qi]
                at = self._skip_busy(lst, 0)
                if at < len(lst):
                    self._sq[n_sq] = qi
                    self._sq_at[n_sq] = at
                    self._heads_push(n_heads, n_sq)
                    n_heads += 1
                    n_sq += 1
        while n_heads:
            k = self._heads_pop(n_heads)
            n_heads -= 1
            qi = self._sq[k]
            if not self._staffed[qi]:
                continue  # its last available member was just taken: nothing more to offer
            lst = self._orders[qi]
            at = self._sq_at[k]
            c = <_Caller>lst[at]
            at = self._skip_busy(lst, at + 1)
            self._sq_at[k] = at
            if at < len(lst):
                self._heads_push(n_heads, k)
                n_heads += 1
            if not self._try_route(c, n_avail, now, out):
                continue
            keep = 0
            for j in range(n_avail):
                if self._available(<_Agent>self._agents[self._avail[j]]):
                    self._avail[keep] = self._avail[j]
                    keep += 1
            n_avail = keep
            if n_avail == 0:
                return 0
            self._mark_staffed(n_avail)
        return 0

    cdef Py_ssize_t _skip_busy(self, list lst, Py_ssize_t at) noexcept:
        """The first index from ``at`` of a caller routing may offer (waiting or a callback
        waiting), or ``len(lst)``."""
        cdef Py_ssize_t n = len(lst)
        cdef _Caller c
        while at < n:
            c = <_Caller>lst[at]
            if c.state == S_WAITING or c.state == S_CB_WAITING:
                return at
            at += 1
        return n

    cdef bint _slot_before(self, int x, int y) noexcept:
        """Whether merge slot ``x``'s head caller is ahead of slot ``y``'s."""
        return _before(<_Caller>(<list>self._orders[self._sq[x]])[self._sq_at[x]],
                       <_Caller>(<list>self._orders[self._sq[y]])[self._sq_at[y]])

    cdef void _heads_push(self, int n, int slot) noexcept:
        """Add ``slot`` to the heap ``_heads[:n]``."""
        cdef int i = n, parent
        while i > 0:
            parent = (i - 1) >> 1
            if not self._slot_before(slot, self._heads[parent]):
                break
            self._heads[i] = self._heads[parent]
            i = parent
        self._heads[i] = slot

    cdef int _heads_pop(self, int n) noexcept:
        """Take the slot with the earliest head caller off the heap ``_heads[:n]``."""
        cdef int top = self._heads[0], last, i = 0, child
        n -= 1
        if n:
            last = self._heads[n]
            while True:
                child = 2 * i + 1
                if child >= n:
                    break
                if child + 1 < n and self._slot_before(self._heads[child + 1],
                                                       self._heads[child]):
                    child += 1
                if not self._slot_before(self._heads[child], last):
                    break
                self._heads[i] = self._heads[child]
                i = child
            self._heads[i] = last
        return top

    cdef int _try_route(self, _Caller c, int n_avail, double now, list out) except -1:
        """Offer (or dial for) caller ``c`` if any of the first ``n_avail`` agents of
        ``_avail`` may take them; 1 when an offer or a callback dial was made."""
        cdef int nq = self._nq, ns = self._ns
        cdef int qi, k, steps, sb, rb, rs, re, n, j, ai, pos, low, picked, keep
        cdef bint ok
        cdef _Queue q
        cdef _Agent a
        cdef _Member m
        cdef list members
        if c.state != S_WAITING and c.state != S_CB_WAITING:
            return 0
        q = c.queue
        qi = q.index
        steps = 0
        sb = self._step_base[qi]
        for k in range(q.n_steps):
            if c.place_time + self._step_after[sb + k] <= now:
                steps += 1
        rb = self._req_base[qi] + steps
        rs = self._req_start[rb]
        re = self._req_start[rb + 1]
        n = 0
        for j in range(n_avail):
            ai = self._avail[j]
            if self._member_pos[ai * nq + qi] < 0:
                continue
            ok = True
            for k in range(rs, re):
                if self._levels[ai * ns + self._req_skill[k]] < self._req_min[k]:
                    ok = False
                    break
            if ok:
                self._cand[n] = ai
                n += 1
        if n == 0:
            return 0
        if c.tried is not None and c.tried:
            keep = 0
            for j in range(n):
                if self._cand[j] not in c.tried:
                    self._cand[keep] = self._cand[j]
                    keep += 1
            if keep:
                n = keep
            else:
                c.tried.clear()
        # agent indices -> member positions, in member order (insertion sort: n is small)
        for j in range(n):
            pos = self._member_pos[self._cand[j] * nq + qi]
            k = j
            while k > 0 and self._cand[k - 1] > pos:
                self._cand[k] = self._cand[k - 1]
                k -= 1
            self._cand[k] = pos
        members = q.members
        low = (<_Member>members[self._cand[0]]).penalty
        for j in range(1, n):
            m = <_Member>members[self._cand[j]]
            if m.penalty < low:
                low = m.penalty
        keep = 0
        for j in range(n):
            if (<_Member>members[self._cand[j]]).penalty == low:
                self._cand[keep] = self._cand[j]
                keep += 1
        picked = self._pick(q, keep)
        if c.state == S_CB_WAITING:
            a = (<_Member>members[self._cand[0]]).agent
            c.state = _caller_next(c, "dial")
            c.attempts += 1
            c.offered = (a,)
            self._ring(c, a)
            out.append(DialCallback(c.id, a.id, q.name, c.cb_number, c.attempts))
        else:
            c.state = _caller_next(c, "offer")
            if picked == 1:
                a = (<_Member>members[self._cand[0]]).agent
                c.offered = (a,)
                ids = (a.id,)
            else:
                c.offered = tuple([(<_Member>members[self._cand[j]]).agent
                                   for j in range(picked)])
                ids = tuple([a.id for a in c.offered])
            c.deadline = now + q.ring_timeout
            self._push_timer(c.deadline, K_RING, c)
            for a in c.offered:
                self._ring(c, a)
            out.append(_offer(c.id, ids, q.name))
        return 1

    cdef void _mark_staffed(self, int n_avail) noexcept:
        """Per queue, whether any of the first ``n_avail`` agents of ``_avail`` is a member."""
        cdef int j, qi, base
        for qi in range(self._nq):
            self._staffed[qi] = 0
        for j in range(n_avail):
            base = self._avail[j] * self._nq
            for qi in range(self._nq):
                if self._member_pos[base + qi] >= 0:
                    self._staffed[qi] = 1

    cdef uint64_t _next_random(self) noexcept:
        # SplitMix64, as appliance.acd.model.splitmix64: unsigned 64-bit arithmetic wraps.
        cdef uint64_t z
        self._rng += <uint64_t>0x9E3779B97F4A7C15ULL
        z = self._rng
        z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
        return z ^ (z >> 31)

    cdef int _pick(self, _Queue q, int n) except -1:
        """Strategy pick among member positions ``_cand[:n]`` (member order, lowest penalty
        tier); leaves the pick(s) at the front of ``_cand`` and returns how many."""
        cdef int s = q.strategy
        cdef int j, best, nm, d, best_d
        cdef _Member m, bm
        cdef list members = q.members
        cdef uint64_t r
        cdef long long total, rr
        if s == ST_RING_ALL:
            return n
        if s == ST_LINEAR:
            return 1
        best = 0
        if s == ST_LONGEST_IDLE:
            bm = <_Member>members[self._cand[0]]
            for j in range(1, n):
                m = <_Member>members[self._cand[j]]
                if m.agent.idle_since < bm.agent.idle_since:
                    bm = m
                    best = j
        elif s == ST_FEWEST_CALLS:
            bm = <_Member>members[self._cand[0]]
            for j in range(1, n):
                m = <_Member>members[self._cand[j]]
                if m.calls < bm.calls:
                    bm = m
                    best = j
        elif s == ST_LEAST_TALK_TIME:
            bm = <_Member>members[self._cand[0]]
            for j in range(1, n):
                m = <_Member>members[self._cand[j]]
                if m.talk_time < bm.talk_time:
                    bm = m
                    best = j
        elif s == ST_ROUND_ROBIN_MEMORY:
            nm = len(members)
            # C's % truncates toward zero; the reference uses Python's floor modulo.
            best_d = ((self._cand[0] - q.rr_last - 1) % nm + nm) % nm
            for j in range(1, n):
                d = ((self._cand[j] - q.rr_last - 1) % nm + nm) % nm
                if d < best_d:
                    best_d = d
                    best = j
            q.rr_last = self._cand[best]
        elif s == ST_RANDOM:
            r = self._next_random()
            best = <int>(r % <uint64_t>n)
        else:
            r = self._next_random()
            total = 0
            for j in range(n):
                total += (<_Member>members[self._cand[j]]).weight
            rr = <long long>(r % <uint64_t>total)
            for j in range(n):
                m = <_Member>members[self._cand[j]]
                if rr < m.weight:
                    best = j
                    break
                rr -= m.weight
        self._cand[0] = self._cand[best]
        return 1

    cdef int _decline(self, _Caller c, _Agent a, bint missed, list out) except -1:
        cdef _Agent o
        remaining = tuple([o for o in c.offered if o is not a])
        c.state = _caller_next(c, "decline-one" if remaining else "decline")
        c.offered = remaining
        if c.tried is None:
            c.tried = set()
        c.tried.add(a.index)
        self._unring(c, a)
        if not remaining:
            self._arm_steps(c, self._now)  # waiting again: its relaxation steps count again
        if missed:
            self._missed(a, out)
        return 0

    cdef int _missed(self, _Agent a, list out) except -1:
        a.missed += 1
        if self._auto_pause_after and a.missed >= self._auto_pause_after and a.presence == P_READY:
            a.presence = _presence_next(a, "auto-pause")
            a.pause_reason = AUTO_PAUSE_REASON
            self._refresh(a)
            out.append(AutoPause(a.id, a.missed))
            self._leave_empty(a, out)
        return 0

    cdef int _connect(self, _Caller c, _Agent a, double now) except -1:
        cdef _Queue q = c.queue
        a.active[c.id] = (q.index, now)
        a.missed = 0
        self._refresh(a)
        (<_Member>q.members[self._member_pos[a.index * self._nq + q.index]]).calls += 1
        self._remove(c)
        return 0

    cdef int _overflow(self, _Caller c, object reason, list out) except -1:
        cdef int was = c.state
        cdef _Agent a
        _caller_next(c, "overflow")
        if was == S_OFFERED:
            out.append(_cancel_offer(c.id, tuple([a.id for a in c.offered])))
            for a in c.offered:
                self._unring(c, a)
        self._remove(c)
        out.append(Overflow(c.id, c.queue.name, reason, c.queue.target))
        return 0

    cdef int _leave_empty(self, _Agent a, list out) except -1:
        cdef int qi
        cdef _Queue q
        cdef _Caller c
        empty = set()
        for qi in range(self._nq):
            q = self._queues[qi]
            if self._member_pos[a.index * self._nq + qi] >= 0 and self._is_empty(q, q.leave_empty):
                empty.add(qi)
        if not empty:
            return 0
        # Only the callers of the queues now empty, in the global order.
        leaving = []
        for qi in empty:
            for c in <list>self._orders[qi]:
                if c.state == S_WAITING or c.state == S_OFFERED:
                    leaving.append(c)
        for c in self._in_order(leaving):
            self._overflow(c, OverflowReason.NO_AGENTS, out)
        return 0

    cdef bint _is_empty(self, _Queue q, int rule) noexcept:
        cdef _Member m
        cdef int p
        if rule == E_NEVER:
            return False
        for m in q.members:
            p = m.agent.presence
            if p == P_READY or (p == P_PAUSED and rule == E_UNSTAFFED):
                return False
        return True

    cdef long long _position(self, _Caller c) except -1:
        # The queue's own order holds exactly its callers, in the global order.
        cdef list lst = self._orders[c.queue.index]
        cdef Py_ssize_t k = _find_in(lst, c)
        if k >= len(lst) or lst[k] is not c:
            raise AssertionError("queued caller missing from the order")
        return k + 1

    cdef double _ewt(self, _Queue q, long long position) noexcept:
        cdef long long staffed = 0
        cdef _Member m
        cdef double total, handle
        cdef Py_ssize_t i, ns
        for m in q.members:
            if m.agent.presence == P_READY:
                staffed += m.agent.cap
        if staffed == 0:
            return INF
        ns = len(q.samples)
        if ns:
            total = 0.0
            for i in range(ns):
                total += <double>q.samples[i]
            handle = total / <double>ns
        else:
            handle = q.default_handle_time
        return handle * <double>position / <double>staffed

    cdef int _insert(self, _Caller c) except -1:
        cdef list lst = self._orders[c.queue.index]
        lst.insert(_find_in(lst, c), c)
        c.queue.n_callers += 1
        self._n_callers += 1
        return 0

    cdef int _remove(self, _Caller c) except -1:
        cdef list lst = self._orders[c.queue.index]
        cdef Py_ssize_t k = _find_in(lst, c)
        if k >= len(lst) or lst[k] is not c:
            raise AssertionError("order out of step")
        del lst[k]
        del self._callers[c.id]
        c.queue.n_callers -= 1
        self._n_callers -= 1
        c.state = S_GONE  # its timers still in the heap are stale now
        return 0

    cdef list _in_order(self, object callers):
        """``callers`` (any iterable of them) sorted into the global order."""
        return sorted(callers, key=_order_key)

    cdef int _ring(self, _Caller c, _Agent a) except -1:
        """An offer of ``c`` (or its callback dial) now rings at ``a``."""
        a.ringing += 1
        a.offered_calls.add(c.id)
        self._refresh(a)
        return 0

    cdef int _unring(self, _Caller c, _Agent a) except -1:
        """The offer of ``c`` (or its callback dial) no longer rings at ``a``."""
        a.ringing -= 1
        a.offered_calls.discard(c.id)
        self._refresh(a)
        return 0

    # ---------------------------------------------------------------- timers

    cdef int _push_timer(self, double t, int kind, object what) except -1:
        cdef Py_ssize_t i, parent, cap
        cdef _Timer* grown
        cdef _Timer e
        if self._n_timers == self._timers_cap:
            cap = self._timers_cap * 2 if self._timers_cap else 256
            grown = <_Timer*>realloc(self._timers, cap * sizeof(_Timer))
            if grown == NULL:
                raise MemoryError()
            self._timers = grown
            self._timers_cap = cap
        self._timer_tie += 1
        e.t = t
        e.tie = self._timer_tie
        e.kind = kind
        e.what = <PyObject*>what
        Py_INCREF(what)
        i = self._n_timers
        self._n_timers += 1
        while i > 0:
            parent = (i - 1) >> 1
            if not _timer_before(&e, &self._timers[parent]):
                break
            self._timers[i] = self._timers[parent]
            i = parent
        self._timers[i] = e
        return 0

    cdef void _pop_timer(self) noexcept:
        """Drop the earliest entry."""
        cdef Py_ssize_t i = 0, child, n
        cdef PyObject* what = self._timers[0].what
        cdef _Timer last
        self._n_timers -= 1
        n = self._n_timers
        if n:
            last = self._timers[n]
            while True:
                child = 2 * i + 1
                if child >= n:
                    break
                if child + 1 < n and _timer_before(&self._timers[child + 1],
                                                   &self._timers[child]):
                    child += 1
                if not _timer_before(&self._timers[child], &last):
                    break
                self._timers[i] = self._timers[child]
                i = child
            self._timers[i] = last
        Py_DECREF(<object>what)

    cdef void _clear_timers(self) noexcept:
        cdef Py_ssize_t i
        cdef Py_ssize_t n = self._n_timers
        self._n_timers = 0
        for i in range(n):
            Py_DECREF(<object>self._timers[i].what)

    cdef int _arm_steps(self, _Caller c, double now) except -1:
        """Queue the caller's relaxation steps still ahead of ``now`` (on entering waiting or
        callback-waiting, the states whose next step is a timer)."""
        cdef int k, base = self._step_base[c.queue.index]
        cdef double tt
        for k in range(c.queue.n_steps):
            tt = c.place_time + self._step_after[base + k]
            if tt > now:
                self._push_timer(tt, K_STEP, c)
        return 0

    cdef bint _timer_live(self, _Timer* entry) noexcept:
        """Whether the state still holds this timer (what next_timer's rules count)."""
        cdef double t = entry.t
        cdef int kind = entry.kind
        cdef _Caller c
        cdef _Agent a
        cdef int st
        if kind == K_WRAP:
            a = <_Agent>entry.what
            return a.in_wrap and a.wrap_until == t
        c = <_Caller>entry.what
        st = c.state
        if kind == K_RING:
            return st == S_OFFERED and c.deadline == t
        if kind == K_OVERFLOW:
            return (st == S_WAITING or st == S_OFFERED) and c.overflow_at == t
        if kind == K_RETRY:
            return st == S_CB_RETRY and c.retry_at == t
        return (st == S_WAITING or st == S_CB_WAITING) and t > self._now

    cdef int _rebuild_timers(self) except -1:
        """Drop the stale entries: the heap holds at most twice what the state needs."""
        cdef _Caller c
        cdef _Agent a
        cdef int st
        self._clear_timers()
        for c in self._callers.values():
            st = c.state
            if st == S_OFFERED:
                self._push_timer(c.deadline, K_RING, c)
            if (st == S_WAITING or st == S_OFFERED) and c.overflow_at != INF:
                self._push_timer(c.overflow_at, K_OVERFLOW, c)
            if st == S_CB_RETRY:
                self._push_timer(c.retry_at, K_RETRY, c)
            if st == S_WAITING or st == S_CB_WAITING:
                self._arm_steps(c, self._now)
        for a in self._agents:
            if a.in_wrap:
                self._push_timer(a.wrap_until, K_WRAP, a)
        self._timer_limit = max(1024, 2 * self._n_timers)
        return 0

    # ---------------------------------------------------------------- lookups

    cdef double _check_now(self, now) except? -1.0:
        cdef double t
        if type(now) is float:  # the usual case, checked in C; anything else as below
            t = <double>now
            if isfinite(t) and t >= self._now:
                return t
        if isinstance(now, bool) or not isinstance(now, (int, float)) or not math.isfinite(now):
            raise LocalProtocolError(f"now must be a finite number, got {now!r}")
        if now < self._now:
            raise LocalProtocolError(f"time ran backwards: {now} < {self._now}")
        return <double>now

    cdef _Agent _agent(self, agent_id):
        a = self._agent_by_id.get(agent_id)
        if a is None:
            raise LocalProtocolError(f"unknown agent {agent_id!r}")
        return a

    cdef _Queue _queue(self, name):
        q = self._queue_by_name.get(name)
        if q is None:
            raise LocalProtocolError(f"unknown queue {name!r}")
        return q

    cdef _Caller _caller(self, call):
        c = self._callers.get(call)
        if c is None:
            raise LocalProtocolError(f"no queued call {call!r}")
        return c

    cdef tuple _offered_pair(self, call, agent):
        cdef _Caller c = self._caller(call)
        cdef _Agent a = self._agent(agent)
        if c.state != S_OFFERED or a not in c.offered:
            raise LocalProtocolError(f"call {call!r} is not ringing at agent {agent!r}")
        return c, a

    cdef _agent_view(self, _Agent a):
        return AgentView(a.id, _PRESENCE_NAMES[a.presence], a.pause_reason, a.in_wrap,
                         len(a.active), a.ringing, a.missed, a.idle_since, len(a.outside))

    cdef _caller_view(self, _Caller c):
        cdef _Agent a
        return CallerView(c.id, c.queue.name, _STATE_NAMES[c.state], c.priority, c.place_time,
                          tuple([a.id for a in c.offered]))
