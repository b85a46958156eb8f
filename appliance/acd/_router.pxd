# Typed state of the compiled ACD router (see _router.pyx and appliance/acd/reference.py).

from cpython.ref cimport PyObject
from libc.stdint cimport uint64_t


cdef struct _Timer:
    double t
    long long tie                     # push order: equal times come out first pushed first
    int kind                          # K_RING ... (see _router.pyx)
    PyObject* what                    # the caller or agent, a reference owned by the heap


cdef class _Agent:
    cdef public int index
    cdef public str id
    cdef public int cap
    cdef public int presence          # P_LOGGED_OUT / P_READY / P_PAUSED
    cdef public str pause_reason
    cdef public bint in_wrap
    cdef public double wrap_until
    cdef public dict active           # call -> (queue index, answered at)
    cdef public set outside           # calls outside the queues
    cdef public int ringing
    cdef public int missed
    cdef public double idle_since
    cdef public int free_pos          # index in Router._free, -1 when not available
    cdef public set offered_calls     # ids of the callers ringing (or dialled) for this agent


cdef class _Member:
    cdef public _Agent agent
    cdef public int pos
    cdef public int penalty
    cdef public int weight
    cdef public long long calls
    cdef public double talk_time


cdef class _Queue:
    cdef public int index
    cdef public object cfg
    cdef public str name
    cdef public str target
    cdef public list members          # of _Member, in member order
    cdef public int strategy
    cdef public double ring_timeout
    cdef public double wrap_up
    cdef public bint has_max_wait
    cdef public double max_wait
    cdef public long long max_length  # -1: no limit
    cdef public bint has_max_ewt
    cdef public double max_ewt
    cdef public int join_empty
    cdef public int leave_empty
    cdef public double default_handle_time
    cdef public int retries
    cdef public double retry_interval
    cdef public double rejoin_window
    cdef public int n_steps
    cdef public int rr_last
    cdef public list samples
    cdef public long long n_callers   # callers of this queue (their order: Router._orders)


cdef class _Caller:
    cdef public str id
    cdef public _Queue queue
    cdef public str number
    cdef public long long priority
    cdef public double place_time
    cdef public long long seq
    cdef public int state             # S_WAITING ...
    cdef public tuple offered         # of _Agent
    cdef public double deadline
    cdef public set tried             # agent indices; None until an agent declines
    cdef public double overflow_at
    cdef public str cb_number
    cdef public int attempts
    cdef public double retry_at


cdef class Router:
    cdef object _config
    cdef list _agents
    cdef list _queues
    cdef list _orders                 # per queue, its callers in the global order
    cdef long long _n_callers         # callers in every queue
    cdef dict _agent_by_id
    cdef dict _queue_by_name
    cdef dict _callers
    cdef dict _rejoin
    cdef long long _seq
    cdef uint64_t _rng
    cdef double _now
    cdef int _nq
    cdef int _na
    cdef int _ns
    cdef int _auto_pause_after
    cdef int _samples_max
    cdef long long _max_waiting
    cdef long long _max_rejoin
    cdef int* _member_pos             # [agent * nq + queue], -1 when not a member
    cdef int* _levels                 # [agent * ns + skill], 0 when lacking
    cdef double* _step_after          # [step_base[queue] + k]
    cdef int* _step_base
    cdef int* _req_start              # requirement k of a queue: [req_start[rb+k], req_start[rb+k+1])
    cdef int* _req_base
    cdef int* _req_skill
    cdef int* _req_min
    cdef int* _avail
    cdef int* _cand
    cdef int* _free                   # the available agents (unordered), _n_free of them
    cdef int _n_free
    cdef int* _sq                     # staffed queues merged by _route, and where each stands
    cdef Py_ssize_t* _sq_at
    cdef int* _heads                  # _route's binary heap of staffed-queue slots by head caller
    cdef _Timer* _timers              # binary min-heap by (t, tie); stale entries are
    cdef Py_ssize_t _n_timers         #   dropped when they reach the top
    cdef Py_ssize_t _timers_cap
    cdef long long _timer_tie
    cdef Py_ssize_t _timer_limit
    cdef char* _staffed               # per queue: an available agent is a member

    cdef list _in_order(self, object callers)
    cdef int _ring(self, _Caller c, _Agent a) except -1
    cdef int _unring(self, _Caller c, _Agent a) except -1
    cdef bint _slot_before(self, int x, int y) noexcept
    cdef void _heads_push(self, int n, int slot) noexcept
    cdef int _heads_pop(self, int n) noexcept
    cdef Py_ssize_t _skip_busy(self, list lst, Py_ssize_t at) noexcept
    cdef bint _available(self, _Agent a) noexcept
    cdef void _refresh(self, _Agent a) noexcept
    cdef int _try_route(self, _Caller c, int n_avail, double now, list out) except -1
    cdef int _push_timer(self, double t, int kind, object what) except -1
    cdef int _arm_steps(self, _Caller c, double now) except -1
    cdef bint _timer_live(self, _Timer* entry) noexcept
    cdef void _pop_timer(self) noexcept
    cdef void _clear_timers(self) noexcept
    cdef int _rebuild_timers(self) except -1
    cdef int _collect_avail(self) noexcept
    cdef int _route(self, double now, list out) except -1
    cdef void _mark_staffed(self, int n_avail) noexcept
    cdef int _pick(self, _Queue q, int n) except -1
    cdef uint64_t _next_random(self) noexcept
    cdef int _decline(self, _Caller c, _Agent a, bint missed, list out) except -1
    cdef int _missed(self, _Agent a, list out) except -1
    cdef int _connect(self, _Caller c, _Agent a, double now) except -1
    cdef int _overflow(self, _Caller c, object reason, list out) except -1
    cdef int _leave_empty(self, _Agent a, list out) except -1
    cdef bint _is_empty(self, _Queue q, int rule) noexcept
    cdef long long _position(self, _Caller c) except -1
    cdef double _ewt(self, _Queue q, long long position) noexcept
    cdef int _insert(self, _Caller c) except -1
    cdef int _remove(self, _Caller c) except -1
    cdef double _check_now(self, now) except? -1.0
    cdef _Agent _agent(self, agent_id)
    cdef _Queue _queue(self, name)
    cdef _Caller _caller(self, call)
    cdef tuple _offered_pair(self, call, agent)
    cdef _agent_view(self, _Agent a)
    cdef _caller_view(self, _Caller c)
    cdef _on_login(self, ev, double now, list out)
    cdef _on_logout(self, ev, double now, list out)
    cdef _on_pause(self, ev, double now, list out)
    cdef _on_unpause(self, ev, double now, list out)
    cdef _on_join(self, ev, double now, list out)
    cdef _on_abandon(self, ev, double now, list out)
    cdef _on_accepted(self, ev, double now, list out)
    cdef _on_declined(self, ev, double now, bint missed, list out)
    cdef _on_call_ended(self, ev, double now, list out)
    cdef _on_wrap_up_ended(self, ev, double now, list out)
    cdef _on_callback(self, ev, double now, list out)
    cdef _on_callback_result(self, ev, double now, list out)
    cdef _on_announce(self, ev, double now, list out)
    cdef _on_outside(self, ev, double now, bint started, list out)
