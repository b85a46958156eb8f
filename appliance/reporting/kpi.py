"""Contact-center KPIs computed from the queue event log only, per interval and per queue, agent
and site; component uptime; and a live snapshot for the wallboard.

The formulas, the attribution rules and a worked example are in ``docs/kpis.md``. In short:

* every per-call figure (offered, answered, abandoned, waits, service level, handle time, FCR)
  belongs to the interval in which the caller **entered the queue**, however long the call
  lasts;
* agent time (available, paused, talk, hold, wrap-up) is cut at interval boundaries, each
  second counted in the interval it falls in.

``KpiEngine`` takes events in time order (``feed``) and reports whenever asked; ``LiveBoard``
keeps the wallboard figures current in O(1) per event.
"""

from __future__ import annotations

import enum
import math
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields

from appliance.reporting.events import ComponentEvent, EventError, QueueEvent, QueueVerb

#: Interval lengths reports are made for, seconds.
INTERVALS = (900, 1800, 3600)
#: Caller ids that identify nobody, never used for first-contact resolution.
ANONYMOUS_CALLERS = frozenset({"", "anonymous", "unknown", "restricted", "none", "unavailable"})

_ANSWER_ENDS = frozenset({QueueVerb.COMPLETECALLER, QueueVerb.COMPLETEAGENT, QueueVerb.TRANSFER})
_UNANSWERED_EXITS = frozenset({QueueVerb.EXITWITHTIMEOUT, QueueVerb.EXITEMPTY,
                               QueueVerb.EXITWITHKEY})


@dataclass(frozen=True)
class KpiConfig:
    """How the KPIs are counted."""

    interval: int = 1800
    """Interval length in seconds: 900, 1800 or 3600."""
    service_level_threshold: float = 20.0
    """A caller answered within this many seconds counts as served in time."""
    short_abandon: float = 5.0
    """Callers hanging up within this many seconds are short abandons, left out of every
    figure (misdials, callers who hear the greeting and leave)."""
    fcr_window: float = 72 * 3600.0
    """A contact is resolved first time when the same caller does not call again within this
    many seconds after the contact ended."""
    fcr_same_disposition: bool = False
    """When true, only a repeat contact with the same disposition code counts against FCR."""
    utc_offset: int = 0
    """Seconds east of UTC of the site's local time; intervals start on local boundaries."""

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS} seconds, got {self.interval}")
        for name in ("service_level_threshold", "short_abandon", "fcr_window"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be 0 or more seconds, got {value}")
        if not -14 * 3600 <= self.utc_offset <= 14 * 3600:
            raise ValueError(f"utc_offset must be within ±14 h, got {self.utc_offset}")

    def interval_start(self, at: float) -> int:
        """Start (epoch seconds) of the interval containing ``at``."""
        local = math.floor(at) + self.utc_offset
        return local - local % self.interval - self.utc_offset


# --------------------------------------------------------------------------------------------
# Agent states: one table for the batch engine and the live board.


class Activity(enum.Enum):
    """What an agent is doing, as far as handle time goes."""

    LOGGED_OUT = "logged-out"
    IDLE = "idle"
    TALK = "talk"
    HOLD = "hold"
    WRAP_UP = "wrap-up"


class AgentState(enum.Enum):
    """The state shown on the wallboard."""

    LOGGED_OUT = "logged-out"
    AVAILABLE = "available"
    PAUSED = "paused"
    ON_CALL = "on-call"
    ON_HOLD = "on-hold"
    WRAP_UP = "wrap-up"


_A = Activity
#: (activity, verb) → next activity. A pair not here is an anomaly: counted, then ignored.
#: CONNECT from LOGGED_OUT is an implicit login (dynamic members, a log that starts mid-shift).
AGENT_TRANSITIONS: Mapping[tuple[Activity, QueueVerb], Activity] = {
    (_A.LOGGED_OUT, QueueVerb.AGENTLOGIN): _A.IDLE,
    (_A.IDLE, QueueVerb.AGENTLOGIN): _A.IDLE,
    (_A.LOGGED_OUT, QueueVerb.CONNECT): _A.TALK,
    (_A.IDLE, QueueVerb.CONNECT): _A.TALK,
    (_A.WRAP_UP, QueueVerb.CONNECT): _A.TALK,
    (_A.TALK, QueueVerb.HOLD): _A.HOLD,
    (_A.HOLD, QueueVerb.UNHOLD): _A.TALK,
    (_A.TALK, QueueVerb.COMPLETECALLER): _A.IDLE,
    (_A.HOLD, QueueVerb.COMPLETECALLER): _A.IDLE,
    (_A.TALK, QueueVerb.COMPLETEAGENT): _A.IDLE,
    (_A.HOLD, QueueVerb.COMPLETEAGENT): _A.IDLE,
    (_A.TALK, QueueVerb.TRANSFER): _A.IDLE,
    (_A.HOLD, QueueVerb.TRANSFER): _A.IDLE,
    (_A.IDLE, QueueVerb.WRAPUPSTART): _A.WRAP_UP,
    (_A.TALK, QueueVerb.WRAPUPSTART): _A.WRAP_UP,
    (_A.HOLD, QueueVerb.WRAPUPSTART): _A.WRAP_UP,
    (_A.WRAP_UP, QueueVerb.WRAPUPEND): _A.IDLE,
    (_A.IDLE, QueueVerb.AGENTLOGOFF): _A.LOGGED_OUT,
    (_A.TALK, QueueVerb.AGENTLOGOFF): _A.LOGGED_OUT,
    (_A.HOLD, QueueVerb.AGENTLOGOFF): _A.LOGGED_OUT,
    (_A.WRAP_UP, QueueVerb.AGENTLOGOFF): _A.LOGGED_OUT,
}
_CALL_VERBS = frozenset({QueueVerb.HOLD, QueueVerb.UNHOLD, QueueVerb.DISPOSITION,
                         *_ANSWER_ENDS})
_AGENT_VERBS = frozenset(verb for _, verb in AGENT_TRANSITIONS) | {QueueVerb.PAUSE,
                                                                   QueueVerb.UNPAUSE}


def shown_state(activity: Activity, paused: bool) -> AgentState:
    """The wallboard state of an agent doing ``activity``, paused or not."""
    if activity is Activity.IDLE:
        return AgentState.PAUSED if paused else AgentState.AVAILABLE
    return _SHOWN[activity]


_SHOWN = {Activity.LOGGED_OUT: AgentState.LOGGED_OUT, Activity.TALK: AgentState.ON_CALL,
          Activity.HOLD: AgentState.ON_HOLD, Activity.WRAP_UP: AgentState.WRAP_UP}


def agent_step(activity: Activity, paused: bool,
               verb: QueueVerb) -> tuple[Activity, bool] | None:
    """The agent's (activity, paused) after ``verb``; None when the table has no such
    transition (an anomaly in the log)."""
    if verb is QueueVerb.PAUSE:
        return (activity, True) if activity is not Activity.LOGGED_OUT else None
    if verb is QueueVerb.UNPAUSE:
        return (activity, False) if activity is not Activity.LOGGED_OUT else None
    following = AGENT_TRANSITIONS.get((activity, verb))
    if following is None:
        return None
    return following, paused and following is not Activity.LOGGED_OUT


# --------------------------------------------------------------------------------------------
# Report rows


@dataclass(frozen=True)
class KpiRow:
    """The KPIs of one queue, agent or site over one interval (or the whole period).
    Ratios are None when their denominator is zero; times are seconds."""

    scope: str
    """"queue", "agent" or "site"."""
    key: str
    """Queue name, agent id or site id."""
    interval_start: int | None
    """Epoch start of the interval; None for the whole period."""
    offered: int
    """Callers who entered the queue, short abandons left out."""
    answered: int
    """Callers an agent answered."""
    abandoned: int
    """Callers who hung up while waiting, after the short-abandon threshold."""
    short_abandoned: int
    """Callers who hung up within the short-abandon threshold (not in ``offered``)."""
    timed_out: int
    """Callers who left unanswered by the queue's own rule (timeout, empty queue, key)."""
    waiting: int
    """Callers still waiting when the report was made."""
    answered_within: int
    """Answered within the service-level threshold."""
    abandoned_within: int
    """Abandoned (not short) within the service-level threshold."""
    service_level: float | None
    """answered_within / (answered + abandoned + timed_out)."""
    service_level_excluding_abandons: float | None
    """answered_within / (answered + abandoned + timed_out − abandoned_within)."""
    asa: float | None
    """Average speed of answer: total wait of answered callers / answered."""
    average_wait: float | None
    """Total wait of every caller who left the queue / those callers."""
    longest_wait: float | None
    """Longest wait of any caller (answered or not) who left the queue."""
    abandon_rate: float | None
    """abandoned / (answered + abandoned + timed_out)."""
    handled: int
    """Answered calls whose handling (talk and wrap-up) is over."""
    aht: float | None
    """Average handle time: (talk + hold + wrap-up) of the handled calls / handled."""
    talk: float
    """Talk time of the handled calls (connected time less hold)."""
    hold: float
    """Hold time of the handled calls."""
    wrap_up: float
    """After-call work of the handled calls."""
    fcr: float | None
    """First-contact resolution: resolved / (resolved + repeated)."""
    fcr_resolved: int
    """Contacts with no repeat within the window."""
    fcr_repeated: int
    """Contacts followed by a repeat within the window."""
    mean_patience: float | None
    """Estimated mean caller patience: total wait of every caller / abandons (exponential
    patience, censored by answers)."""
    ring_no_answer: int
    """Offers an agent let ring out."""
    logged_in: float
    """Agent seconds logged in (agent and site rows)."""
    available: float
    """Agent seconds logged in, idle and not paused."""
    paused: float
    """Agent seconds logged in, idle and paused."""
    busy: float
    """Agent seconds in talk, hold or wrap-up."""
    occupancy: float | None
    """busy / (busy + available)."""
    utilisation: float | None
    """busy / logged_in."""


@dataclass(frozen=True)
class UptimeRow:
    """Availability of one component over one interval (or the whole period)."""

    site: str
    """The component's site."""
    component: str
    """The component."""
    interval_start: int | None
    """Epoch start of the interval; None for the whole period."""
    up: float
    """Seconds up."""
    down: float
    """Seconds down."""
    uptime: float | None
    """up / (up + down); time before a component's first event is unknown and not counted."""
    outages: int
    """Times it went down (a down that started in this interval)."""
    longest_outage: float
    """Longest down period that ended or was cut by the report's end, seconds."""


@dataclass(frozen=True)
class KpiReport:
    """Everything ``KpiEngine.report`` gives."""

    config: KpiConfig
    """How it was counted."""
    start: float | None
    """First event time."""
    end: float | None
    """The report's end: open calls and agent states are counted up to here."""
    intervals: tuple[KpiRow, ...]
    """Per interval, for every queue, agent and site that had activity in it."""
    totals: tuple[KpiRow, ...]
    """Whole period, per queue, agent and site."""
    uptime: tuple[UptimeRow, ...]
    """Component availability per interval, then for the whole period."""
    anomalies: int
    """Events that fit no transition (agent already on a call, complete without connect...)."""

    def rows(self, scope: str, key: str | None = None,
             totals: bool = False) -> list[KpiRow]:
        """The rows of a scope ("queue", "agent", "site"), optionally of one key."""
        source = self.totals if totals else self.intervals
        return [r for r in source if r.scope == scope and (key is None or r.key == key)]


# --------------------------------------------------------------------------------------------
# The engine


@dataclass
class _Call:
    call_id: str
    queue: str
    site: str
    caller: str
    entered_at: float
    agent: str = ""
    answered_at: float | None = None
    left_at: float | None = None
    outcome: QueueVerb | None = None
    talk_end: float | None = None
    hold_started: float | None = None
    hold: float = 0.0
    wrap_started: float | None = None
    wrap_up: float = 0.0
    wrapping: bool = False
    disposition: str | None = None
    ring_no_answer: int = 0

    @property
    def wait(self) -> float | None:
        end = self.answered_at if self.answered_at is not None else self.left_at
        return None if end is None else max(0.0, end - self.entered_at)

    @property
    def handled(self) -> bool:
        return self.talk_end is not None and not self.wrapping


@dataclass
class _Agent:
    site: str
    activity: Activity = Activity.LOGGED_OUT
    paused: bool = False
    since: float = 0.0
    call: _Call | None = None
    last_call: _Call | None = None


@dataclass
class _Tally:
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    short_abandoned: int = 0
    timed_out: int = 0
    waiting: int = 0
    answered_within: int = 0
    abandoned_within: int = 0
    answered_wait: float = 0.0
    left_wait: float = 0.0
    all_wait: float = 0.0
    all_abandons: int = 0
    longest_wait: float | None = None
    handled: int = 0
    talk: float = 0.0
    hold: float = 0.0
    wrap_up: float = 0.0
    fcr_resolved: int = 0
    fcr_repeated: int = 0
    ring_no_answer: int = 0
    logged_in: float = 0.0
    available: float = 0.0
    paused: float = 0.0
    busy: float = 0.0

    def row(self, scope: str, key: str, interval_start: int | None) -> KpiRow:
        left = self.answered + self.abandoned + self.timed_out
        handle = self.talk + self.hold + self.wrap_up
        return KpiRow(
            scope=scope, key=key, interval_start=interval_start, offered=self.offered,
            answered=self.answered, abandoned=self.abandoned,
            short_abandoned=self.short_abandoned, timed_out=self.timed_out,
            waiting=self.waiting, answered_within=self.answered_within,
            abandoned_within=self.abandoned_within,
            service_level=_ratio(self.answered_within, left),
            service_level_excluding_abandons=_ratio(self.answered_within,
                                                    left - self.abandoned_within),
            asa=_ratio(self.answered_wait, self.answered),
            average_wait=_ratio(self.left_wait, left), longest_wait=self.longest_wait,
            abandon_rate=_ratio(self.abandoned, left), handled=self.handled,
            aht=_ratio(handle, self.handled), talk=self.talk, hold=self.hold,
            wrap_up=self.wrap_up,
            fcr=_ratio(self.fcr_resolved, self.fcr_resolved + self.fcr_repeated),
            fcr_resolved=self.fcr_resolved, fcr_repeated=self.fcr_repeated,
            mean_patience=_ratio(self.all_wait, self.all_abandons),
            ring_no_answer=self.ring_no_answer, logged_in=self.logged_in,
            available=self.available, paused=self.paused, busy=self.busy,
            occupancy=_ratio(self.busy, self.busy + self.available),
            utilisation=_ratio(self.busy, self.logged_in),
        )


def _ratio(top: float, bottom: float) -> float | None:
    return top / bottom if bottom > 0 else None


@dataclass
class _Component:
    up: bool
    since: float
    down_started: float | None = None


class KpiEngine:
    """Reads queue and component events in time order and reports KPIs on demand."""

    def __init__(self, config: KpiConfig | None = None, *,
                 max_calls: int = 10_000_000) -> None:
        self.config = config or KpiConfig()
        self.max_calls = max_calls
        self._calls: list[_Call] = []
        self._latest: dict[str, _Call] = {}  # call id -> its latest queue attempt
        self._agents: dict[str, _Agent] = {}
        # (interval_start, scope, key) -> agent-time tally, filled as states change.
        self._agent_time: dict[tuple[int, str, str], _Tally] = {}
        self._components: dict[tuple[str, str], _Component] = {}
        self._uptime: dict[tuple[int, str, str], list[float]] = {}
        self._outages: list[tuple[str, str, float, float]] = []
        self._first: float | None = None
        self._last: float | None = None
        self.anomalies = 0

    # ---------------------------------------------------------------------------- input

    def _advance(self, at: float) -> None:
        if self._last is not None and at < self._last:
            raise EventError(f"events must come in time order: {at} after {self._last}")
        if self._first is None:
            self._first = at
        self._last = at

    def feed(self, event: QueueEvent) -> None:
        """Take one queue event; raises ``EventError`` if it is older than the previous one."""
        verb = event.verb
        if verb is QueueVerb.ENTERQUEUE and len(self._calls) >= self.max_calls:
            raise EventError(f"more than {self.max_calls} calls in one report; report a "
                             f"shorter period")
        self._advance(event.at)
        if verb is QueueVerb.ENTERQUEUE:
            entry = _Call(event.call_id, event.queue, event.site, event.caller, event.at)
            self._calls.append(entry)
            self._latest[event.call_id] = entry
            return
        call = self._latest.get(event.call_id) if event.call_id else None
        if verb in _AGENT_VERBS and event.agent:
            self._agent_event(event, call)
        elif verb is QueueVerb.RINGNOANSWER and event.agent:
            start = self.config.interval_start(event.at)
            tally = self._agent_time.setdefault((start, "agent", event.agent), _Tally())
            tally.ring_no_answer += 1
        if call is None:
            call = self._call_without_entry(event)
            if call is None:
                return
        self._call_event(event, call)

    def _call_without_entry(self, event: QueueEvent) -> _Call | None:
        # The log may start while a caller is already waiting or talking: rebuild the entry
        # time from the wait the event carries (queue_log data), else count from the event.
        verb = event.verb
        if verb is QueueVerb.CONNECT or verb is QueueVerb.ABANDON or verb in _UNANSWERED_EXITS:
            wait = event.data.get("wait", 0.0)
            entered = event.at - (float(wait) if isinstance(wait, (int, float)) else 0.0)
            call = _Call(event.call_id, event.queue, event.site, event.caller, entered)
            self._calls.append(call)
            self._latest[event.call_id] = call
            return call
        if verb in _CALL_VERBS:
            self.anomalies += 1  # hold, complete, disposition... of a call never seen
        return None

    def _call_event(self, event: QueueEvent, call: _Call) -> None:
        verb, at = event.verb, event.at
        if verb is QueueVerb.CONNECT:
            if call.answered_at is not None or call.outcome is not None:
                self.anomalies += 1
                return
            call.answered_at, call.agent = at, event.agent
            if event.site and not call.site:
                call.site = event.site
        elif verb is QueueVerb.ABANDON or verb in _UNANSWERED_EXITS:
            if call.answered_at is not None or call.outcome is not None:
                self.anomalies += 1
                return
            call.outcome, call.left_at = verb, at
        elif verb in _ANSWER_ENDS:
            if call.answered_at is None or call.talk_end is not None:
                self.anomalies += 1
                return
            if call.hold_started is not None:
                call.hold += at - call.hold_started
                call.hold_started = None
            call.outcome, call.talk_end = verb, at
        elif verb is QueueVerb.HOLD:
            if call.answered_at is not None and call.hold_started is None:
                call.hold_started = at
        elif verb is QueueVerb.UNHOLD:
            if call.hold_started is not None:
                call.hold += at - call.hold_started
                call.hold_started = None
        elif verb is QueueVerb.RINGNOANSWER:
            call.ring_no_answer += 1
        elif verb is QueueVerb.DISPOSITION:
            code = event.data.get("code")
            call.disposition = None if code is None else str(code)

    def _agent_event(self, event: QueueEvent, call: _Call | None) -> None:
        agent = self._agents.get(event.agent)
        if agent is None:
            agent = self._agents[event.agent] = _Agent(site=event.site, since=event.at)
        step = agent_step(agent.activity, agent.paused, event.verb)
        if step is None:
            self.anomalies += 1
            return
        self._close_agent_segment(event.agent, agent, event.at)
        activity, paused = step
        verb = event.verb
        if verb is QueueVerb.CONNECT:
            if agent.activity is Activity.WRAP_UP:
                self._end_wrap_up(agent, event.at)  # a new call cuts wrap-up short
            agent.call = call
        elif verb is QueueVerb.WRAPUPSTART:
            wrapped = agent.call or (call if call is not None else agent.last_call)
            if wrapped is not None and wrapped.talk_end is None and wrapped.answered_at:
                # Wrap-up began without a complete event: talk ends here.
                wrapped.talk_end = event.at
            if wrapped is not None:
                wrapped.wrapping, wrapped.wrap_started = True, event.at
            agent.call = wrapped
        elif verb is QueueVerb.WRAPUPEND:
            self._end_wrap_up(agent, event.at)
        elif verb in _ANSWER_ENDS or verb is QueueVerb.AGENTLOGOFF:
            if agent.activity is Activity.WRAP_UP:
                self._end_wrap_up(agent, event.at)
            agent.last_call, agent.call = agent.call, None
        agent.activity, agent.paused, agent.since = activity, paused, event.at

    def _end_wrap_up(self, agent: _Agent, at: float) -> None:
        call = agent.call
        if call is not None and call.wrapping and call.wrap_started is not None:
            call.wrap_up += at - call.wrap_started
            call.wrapping, call.wrap_started = False, None
        agent.last_call, agent.call = call, None

    def _close_agent_segment(self, agent_id: str, agent: _Agent, until: float) -> None:
        activity = agent.activity
        if activity is Activity.LOGGED_OUT or until <= agent.since:
            return
        for start, seconds in _slices(agent.since, until, self.config):
            for scope, key in (("agent", agent_id), ("site", agent.site)):
                _add_agent_seconds(self._agent_time.setdefault((start, scope, key), _Tally()),
                                   activity, agent.paused, seconds)

    def feed_component(self, event: ComponentEvent) -> None:
        """Take one component up/down event (same time order as queue events)."""
        self._advance(event.at)
        key = (event.site, event.component)
        state = self._components.get(key)
        if state is None:
            self._components[key] = _Component(event.up, event.at,
                                               None if event.up else event.at)
            if not event.up:
                self._count_outage_start(key, event.at)
            return
        if state.up == event.up:
            return  # repeated report of the same state
        self._close_component_segment(key, state, event.at)
        if event.up and state.down_started is not None:
            self._outages.append((*key, state.down_started, event.at))
            state.down_started = None
        elif not event.up:
            state.down_started = event.at
            self._count_outage_start(key, event.at)
        state.up, state.since = event.up, event.at

    def _count_outage_start(self, key: tuple[str, str], at: float) -> None:
        start = self.config.interval_start(at)
        self._uptime.setdefault((start, *key), [0.0, 0.0, 0.0])[2] += 1

    def _close_component_segment(self, key: tuple[str, str], state: _Component,
                                 until: float) -> None:
        for start, seconds in _slices(state.since, until, self.config):
            self._uptime.setdefault((start, *key), [0.0, 0.0, 0.0])[0 if state.up else 1] += seconds

    # ---------------------------------------------------------------------------- output

    def report(self, end: float | None = None) -> KpiReport:
        """The KPIs so far. Agent states and component states still open are counted up to
        ``end`` (default: the last event); calls still waiting count as ``waiting``."""
        cfg = self.config
        end = self._last if end is None else end
        if end is not None and self._last is not None and end < self._last:
            raise EventError(f"report end {end} is before the last event {self._last}")
        per: dict[tuple[int | None, str, str], _Tally] = {}

        def tallies(start: int, scopes: Iterable[tuple[str, str]]) -> Iterator[_Tally]:
            for scope, key in scopes:
                for when in (start, None):
                    yield per.setdefault((when, scope, key), _Tally())

        resolved = _first_contact_resolution(self._calls, cfg, end)
        for call in self._calls:
            start = cfg.interval_start(call.entered_at)
            fcr = resolved.get(id(call))
            for tally in tallies(start, (("queue", call.queue), ("site", call.site))):
                _add_call(tally, call, cfg, fcr, agent_row=False)
            if call.agent:
                # An agent's row counts the calls that agent answered, nothing else.
                for tally in tallies(start, (("agent", call.agent),)):
                    _add_call(tally, call, cfg, fcr, agent_row=True)
        agent_time = {k: _copy_time(v) for k, v in self._agent_time.items()}
        if end is not None:
            for agent_id, agent in self._agents.items():
                if agent.activity is Activity.LOGGED_OUT or end <= agent.since:
                    continue
                for start, seconds in _slices(agent.since, end, cfg):
                    for scope, key in (("agent", agent_id), ("site", agent.site)):
                        _add_agent_seconds(agent_time.setdefault((start, scope, key), _Tally()),
                                           agent.activity, agent.paused, seconds)
        for (start, scope, key), time_tally in agent_time.items():
            for when in (start, None):
                tally = per.setdefault((when, scope, key), _Tally())
                tally.logged_in += time_tally.logged_in
                tally.available += time_tally.available
                tally.paused += time_tally.paused
                tally.busy += time_tally.busy
                if scope == "agent":
                    tally.ring_no_answer += time_tally.ring_no_answer
        interval_rows = sorted(
            (t.row(scope, key, when) for (when, scope, key), t in per.items() if when is not None),
            key=lambda r: (r.interval_start, r.scope, r.key))
        total_rows = sorted(
            (t.row(scope, key, None) for (when, scope, key), t in per.items() if when is None),
            key=lambda r: (r.scope, r.key))
        return KpiReport(cfg, self._first, end, tuple(interval_rows), tuple(total_rows),
                         self._uptime_rows(end), self.anomalies)

    def _uptime_rows(self, end: float | None) -> tuple[UptimeRow, ...]:
        cells = {k: list(v) for k, v in self._uptime.items()}
        outages = list(self._outages)
        for key, state in self._components.items():
            if end is None:
                continue
            for start, seconds in _slices(state.since, end, self.config):
                cells.setdefault((start, *key), [0.0, 0.0, 0.0])[0 if state.up else 1] += seconds
            if state.down_started is not None:
                outages.append((*key, state.down_started, end))
        longest: dict[tuple[int | None, str, str], float] = {}
        for site, component, began, ended in outages:
            for when in (self.config.interval_start(began), None):
                k = (when, site, component)
                longest[k] = max(longest.get(k, 0.0), ended - began)
        totals: dict[tuple[str, str], list[float]] = {}
        rows = []
        for (start, site, component), (up, down, count) in sorted(cells.items()):
            total = totals.setdefault((site, component), [0.0, 0.0, 0.0])
            total[0] += up
            total[1] += down
            total[2] += count
            rows.append(UptimeRow(site, component, start, up, down, _ratio(up, up + down),
                                  int(count), longest.get((start, site, component), 0.0)))
        for (site, component), (up, down, count) in sorted(totals.items()):
            rows.append(UptimeRow(site, component, None, up, down, _ratio(up, up + down),
                                  int(count), longest.get((None, site, component), 0.0)))
        return tuple(rows)


def _copy_time(tally: _Tally) -> _Tally:
    return _Tally(logged_in=tally.logged_in, available=tally.available, paused=tally.paused,
                  busy=tally.busy, ring_no_answer=tally.ring_no_answer)


def _add_agent_seconds(tally: _Tally, activity: Activity, paused: bool, seconds: float) -> None:
    tally.logged_in += seconds
    if activity is Activity.IDLE:
        if paused:
            tally.paused += seconds
        else:
            tally.available += seconds
    else:
        tally.busy += seconds


def _add_call(tally: _Tally, call: _Call, cfg: KpiConfig, fcr: bool | None, *,
              agent_row: bool) -> None:
    wait = call.wait
    outcome = call.outcome
    if wait is not None and (call.answered_at is not None or outcome is not None):
        tally.all_wait += wait
    if call.answered_at is None and outcome is QueueVerb.ABANDON:
        tally.all_abandons += 1
        if wait is not None and wait < cfg.short_abandon:
            tally.short_abandoned += 1
            return
    if not agent_row:
        tally.offered += 1
        tally.ring_no_answer += call.ring_no_answer
    if call.answered_at is not None:
        assert wait is not None
        tally.answered += 1
        tally.answered_wait += wait
        tally.answered_within += wait <= cfg.service_level_threshold
    elif outcome is QueueVerb.ABANDON:
        tally.abandoned += 1
        tally.abandoned_within += wait is not None and wait <= cfg.service_level_threshold
    elif outcome in _UNANSWERED_EXITS:
        tally.timed_out += 1
    else:
        tally.waiting += 1
        return
    assert wait is not None
    tally.left_wait += wait
    tally.longest_wait = wait if tally.longest_wait is None else max(tally.longest_wait, wait)
    if call.answered_at is not None and call.handled:
        assert call.talk_end is not None
        tally.handled += 1
        tally.talk += call.talk_end - call.answered_at - call.hold
        tally.hold += call.hold
        tally.wrap_up += call.wrap_up
    if fcr is True:
        tally.fcr_resolved += 1
    elif fcr is False:
        tally.fcr_repeated += 1


def _first_contact_resolution(calls: list[_Call], cfg: KpiConfig,
                              end: float | None) -> dict[int, bool]:
    """id(call) → resolved first time (True) or repeated (False), for answered calls whose
    outcome is known: a repeat was seen, or the whole window has passed by ``end``."""
    by_caller: dict[str, list[_Call]] = {}
    for call in calls:
        if call.caller.strip().lower() in ANONYMOUS_CALLERS:
            continue
        wait = call.wait
        if (call.answered_at is None and call.outcome is QueueVerb.ABANDON
                and wait is not None and wait < cfg.short_abandon):
            continue  # a short abandon is not a contact
        by_caller.setdefault(call.caller, []).append(call)
    verdict: dict[int, bool] = {}
    for contacts in by_caller.values():
        contacts.sort(key=lambda c: c.entered_at)
        for i, call in enumerate(contacts):
            if call.answered_at is None or call.talk_end is None:
                continue
            ended = call.talk_end
            repeat = False
            for later in contacts[i + 1:]:
                if later.entered_at > ended + cfg.fcr_window:
                    break
                if later.entered_at < ended or later.call_id == call.call_id:
                    continue  # a parallel call, or the same call transferred to a queue
                if cfg.fcr_same_disposition and (later.disposition is None
                                                 or later.disposition != call.disposition):
                    continue
                repeat = True
                break
            if repeat:
                verdict[id(call)] = False
            elif end is not None and end >= ended + cfg.fcr_window:
                verdict[id(call)] = True
    return verdict


def _slices(start: float, end: float, cfg: KpiConfig) -> Iterator[tuple[int, float]]:
    """(interval_start, seconds) pieces of [start, end) cut at interval boundaries."""
    at = start
    while at < end:
        begin = cfg.interval_start(at)
        stop = min(end, begin + cfg.interval)
        yield begin, stop - at
        at = stop


def compute_kpis(events: Iterable[QueueEvent | ComponentEvent], config: KpiConfig | None = None,
                 *, end: float | None = None) -> KpiReport:
    """KPIs of a batch of events in any order (sorted by time, stable)."""
    engine = KpiEngine(config)
    for event in sorted(events, key=lambda e: e.at):
        if isinstance(event, ComponentEvent):
            engine.feed_component(event)
        else:
            engine.feed(event)
    return engine.report(end)


# --------------------------------------------------------------------------------------------
# Live board


@dataclass(frozen=True)
class LiveQueue:
    """Wallboard figures of one queue."""

    queue: str
    """The queue."""
    waiting: int
    """Callers waiting now."""
    longest_wait: float
    """How long the longest-waiting caller has waited, seconds (0 when nobody waits)."""
    offered: int
    """Callers since the board was started (short abandons left out)."""
    answered: int
    """Callers answered since start."""
    abandoned: int
    """Callers who abandoned since start (short abandons left out)."""
    answered_within: int
    """Callers answered within the threshold since start."""
    service_level: float | None
    """answered_within / (answered + abandoned + timed out) since start."""


@dataclass(frozen=True)
class LiveSnapshot:
    """What the wallboard shows at one moment."""

    at: float
    """When the snapshot was taken."""
    queues: tuple[LiveQueue, ...]
    """Per queue, sorted by name."""
    agents_by_state: Mapping[AgentState, int]
    """How many agents are in each state (logged-out agents included once seen)."""
    agents: Mapping[str, AgentState] = field(default_factory=dict)
    """Each agent's state."""


@dataclass
class _LiveQueueState:
    waiting: OrderedDict[str, float] = field(default_factory=OrderedDict)
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    timed_out: int = 0
    answered_within: int = 0


class LiveBoard:
    """Wallboard state updated per event in O(1) amortised time.

    Waiting callers of a queue sit in an insertion-ordered linked map, so the longest waiting
    caller is its first entry and any caller leaves in O(1); agent counts per state are kept
    as counters moved on each transition.
    """

    def __init__(self, config: KpiConfig | None = None, *, max_waiting: int = 100_000) -> None:
        self.config = config or KpiConfig()
        self.max_waiting = max_waiting
        self._queues: dict[str, _LiveQueueState] = {}
        self._where: dict[str, str] = {}  # waiting call -> its queue
        self._agents: dict[str, tuple[Activity, bool]] = {}
        self._by_state: Counter[AgentState] = Counter()
        self.anomalies = 0

    def apply(self, event: QueueEvent) -> None:
        """Take one event."""
        verb = event.verb
        if verb is QueueVerb.ENTERQUEUE:
            moved_from = self._where.pop(event.call_id, None)
            if moved_from is not None:  # the caller went on to another queue
                self._queues[moved_from].waiting.pop(event.call_id, None)
            elif len(self._where) >= self.max_waiting:
                raise EventError(f"more than {self.max_waiting} callers waiting; callers "
                                 f"whose exit event was lost are still counted")
            state = self._queues.setdefault(event.queue, _LiveQueueState())
            state.waiting[event.call_id] = event.at
            self._where[event.call_id] = event.queue
            return
        if verb in _AGENT_VERBS and event.agent:
            self._agent(event)
        if verb is QueueVerb.CONNECT or verb is QueueVerb.ABANDON or verb in _UNANSWERED_EXITS:
            self._leave(event)

    def _leave(self, event: QueueEvent) -> None:
        queue = self._where.pop(event.call_id, None)
        if queue is None:
            return
        state = self._queues[queue]
        entered = state.waiting.pop(event.call_id)
        wait = event.at - entered
        if event.verb is QueueVerb.ABANDON and wait < self.config.short_abandon:
            return
        state.offered += 1
        if event.verb is QueueVerb.CONNECT:
            state.answered += 1
            state.answered_within += wait <= self.config.service_level_threshold
        elif event.verb is QueueVerb.ABANDON:
            state.abandoned += 1
        else:
            state.timed_out += 1

    def _agent(self, event: QueueEvent) -> None:
        before = self._agents.get(event.agent, (Activity.LOGGED_OUT, False))
        after = agent_step(*before, event.verb)
        if after is None:
            self.anomalies += 1
            return
        if event.agent in self._agents:
            self._by_state[shown_state(*before)] -= 1
        self._agents[event.agent] = after
        self._by_state[shown_state(*after)] += 1

    def agent_state(self, agent: str) -> AgentState:
        """One agent's state now (LOGGED_OUT when never seen)."""
        return shown_state(*self._agents.get(agent, (Activity.LOGGED_OUT, False)))

    def longest_wait(self, queue: str, now: float) -> float:
        """Seconds the longest-waiting caller of ``queue`` has waited at ``now``."""
        state = self._queues.get(queue)
        if state is None or not state.waiting:
            return 0.0
        return max(0.0, now - next(iter(state.waiting.values())))

    def waiting(self, queue: str) -> int:
        """Callers waiting in ``queue`` now."""
        state = self._queues.get(queue)
        return 0 if state is None else len(state.waiting)

    def snapshot(self, now: float) -> LiveSnapshot:
        """Every figure at ``now`` (O(queues + agents))."""
        queues = []
        for name in sorted(self._queues):
            s = self._queues[name]
            left = s.answered + s.abandoned + s.timed_out
            queues.append(LiveQueue(name, len(s.waiting), self.longest_wait(name, now),
                                    s.offered, s.answered, s.abandoned, s.answered_within,
                                    _ratio(s.answered_within, left)))
        return LiveSnapshot(
            at=now, queues=tuple(queues),
            agents_by_state={state: self._by_state.get(state, 0) for state in AgentState},
            agents={agent: shown_state(*st) for agent, st in sorted(self._agents.items())},
        )


def row_as_dict(row: KpiRow | UptimeRow) -> dict[str, object]:
    """A report row as a plain dict (for JSON)."""
    return {f.name: getattr(row, f.name) for f in fields(row)}
