"""Alerts: conditions a supervisor must see now, raised and cleared from the site's events.

``AlertEngine`` is sans-IO: the composition root feeds it every event (``feed(kind, payload,
at)``, the same kinds and payloads as the event log and the live topics) and calls
``tick(now)`` — at least every second, or at ``next_timer()`` — which returns the alerts raised
and cleared since the previous tick. It reads no clock and does no I/O; turning an alert into
an event-log row (``alert.raised`` / ``alert.cleared``), a hub publish, a webhook post and the
wallboard banner is the caller's job (docs/alerts.md).

Rules, each optional, each keyed so one alert exists per queue, agent, call or host:

| rule | key | raised when | back to normal when |
| --- | --- | --- | --- |
| ``service_level`` | queue | SL of the callers who left the queue in the last ``window_s`` < ``target`` (with ≥ ``min_calls`` of them) | SL ≥ ``clear_above``, or too few calls |
| ``calls_waiting`` | queue | callers waiting > ``above`` | < ``clear_below`` |
| ``longest_wait`` | queue | the longest-waiting caller has waited > ``above_s`` | < ``clear_below_s`` |
| ``agent_paused`` | agent | paused for > ``above_s`` | unpaused or logged out |
| ``long_call`` | call | a call has lasted > ``above_s`` | it ended |
| ``link_down`` | "cloud" | the cloud link is ``offline`` for > ``after_s`` | online or degraded again |
| ``security`` | "site" | ≥ ``count`` bans or failed logins in the last ``window_s`` | < ``clear_below`` |

Hysteresis, so that a banner does not flap: an alert clears only once its rule has been back to
normal for ``clear_after_s`` seconds without a break (a figure back over the clear threshold in
between starts the wait again), and the clear thresholds leave a band below the raise ones. A
pause or an outage that resumes within ``clear_after_s`` of ending continues the old one (its
clock does not restart). ``long_call`` has none: a call's end is final.

Queue facts come through ``appliance.reporting.from_log.to_queue_events`` and the wallboard's
``LiveBoard``, so the alerts and the wallboard count waiting callers the same way.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from appliance.reporting.events import EventError, QueueVerb
from appliance.reporting.from_log import to_queue_events
from appliance.reporting.kpi import KpiConfig, LiveBoard

#: Event kinds the security rule counts: SIP guard bans and refused API logins.
SECURITY_KINDS = frozenset({"security.ban", "security.login_failed"})
#: Event kinds that end a call for the long-call rule.
CALL_END_KINDS = frozenset({"call.ended", "call.record"})
#: Most events the sliding windows hold; beyond it the oldest are forgotten (counted).
MAX_WINDOW_EVENTS = 100_000
#: Seconds a rule must stay back to normal before its alert clears, unless configured.
DEFAULT_CLEAR_AFTER = 30.0
#: Where the count and wait rules clear by default, as a fraction of their raise threshold.
DEFAULT_CLEAR_FRACTION = 0.8
#: How far above its target a service level must climb back, by default, to clear.
DEFAULT_CLEAR_MARGIN = 0.05


class Severity(enum.Enum):
    """How urgent an alert is."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


@dataclass(frozen=True)
class Alert:
    """One alert: raised once, cleared once."""

    rule: str
    """The rule that raised it (``service_level``, ``calls_waiting``, ...)."""
    key: str
    """What it is about: a queue, an agent, a call id, "cloud" or "site"."""
    severity: Severity
    """How urgent."""
    message: str
    """One line for people, with the figure and the threshold."""
    raised_at: float
    """When the condition was first seen true (seconds since the epoch)."""
    cleared_at: float | None = None
    """When it cleared (its rule back to normal for the rule's ``clear_after_s``); None while
    active."""

    def as_dict(self) -> dict[str, Any]:
        """The alert as plain JSON values (event-log payload, webhook body, hub message)."""
        return {"rule": self.rule, "key": self.key, "severity": self.severity.value,
                "message": self.message, "raised_at": self.raised_at,
                "cleared_at": self.cleared_at}


@dataclass(frozen=True)
class ServiceLevelRule:
    """Service level over a sliding window below target."""

    target: float = 0.8
    """Fraction of callers answered within ``threshold_s``."""
    threshold_s: float = 20.0
    """Answered within this many seconds counts as in time."""
    window_s: float = 1800.0
    """Callers who left the queue within this many seconds before now are counted."""
    min_calls: int = 10
    """Fewer callers than this in the window say nothing."""
    severity: Severity = Severity.WARNING
    clear_above: float | None = None
    """Back to normal at or above this level; None: ``target`` + 5 points (at most 1)."""
    clear_after_s: float = DEFAULT_CLEAR_AFTER
    """Seconds back to normal before the alert clears."""

    def __post_init__(self) -> None:
        if not 0 < self.target <= 1:
            raise ValueError(f"service level target must be in (0, 1], got {self.target}")
        if self.clear_above is not None and not self.target <= self.clear_above <= 1:
            raise ValueError(f"clear_above must be between the target {self.target} and 1, "
                             f"got {self.clear_above}")
        _check_clear_after(self.clear_after_s)

    @property
    def clear_level(self) -> float:
        """The level at or above which the queue is back to normal."""
        if self.clear_above is not None:
            return self.clear_above
        return min(1.0, self.target + DEFAULT_CLEAR_MARGIN)


@dataclass(frozen=True)
class CallsWaitingRule:
    """Too many callers waiting in one queue."""

    above: int = 10
    severity: Severity = Severity.WARNING
    clear_below: int | None = None
    """Back to normal with fewer callers than this; None: 80 % of ``above`` (at least 1)."""
    clear_after_s: float = DEFAULT_CLEAR_AFTER
    """Seconds back to normal before the alert clears."""

    def __post_init__(self) -> None:
        if self.clear_below is not None and not 1 <= self.clear_below <= self.above + 1:
            raise ValueError(f"clear_below must be from 1 to above + 1 ({self.above + 1}), "
                             f"got {self.clear_below}")
        _check_clear_after(self.clear_after_s)

    @property
    def clear_level(self) -> int:
        """Fewer waiting callers than this is back to normal."""
        if self.clear_below is not None:
            return self.clear_below
        return max(1, math.floor(self.above * DEFAULT_CLEAR_FRACTION))


@dataclass(frozen=True)
class LongestWaitRule:
    """A caller waiting too long."""

    above_s: float = 120.0
    severity: Severity = Severity.WARNING
    clear_below_s: float | None = None
    """Back to normal once the longest wait is under this; None: 80 % of ``above_s``."""
    clear_after_s: float = DEFAULT_CLEAR_AFTER
    """Seconds back to normal before the alert clears."""

    def __post_init__(self) -> None:
        if self.clear_below_s is not None and not 0 < self.clear_below_s <= self.above_s:
            raise ValueError(f"clear_below_s must be above 0 and at most above_s "
                             f"({self.above_s}), got {self.clear_below_s}")
        _check_clear_after(self.clear_after_s)

    @property
    def clear_level(self) -> float:
        """A longest wait under this many seconds is back to normal."""
        if self.clear_below_s is not None:
            return self.clear_below_s
        return self.above_s * DEFAULT_CLEAR_FRACTION


@dataclass(frozen=True)
class AgentPausedRule:
    """An agent paused for too long."""

    above_s: float = 900.0
    severity: Severity = Severity.INFO
    clear_after_s: float = DEFAULT_CLEAR_AFTER
    """Seconds unpaused before the alert clears; a pause again within them continues the
    old one."""

    def __post_init__(self) -> None:
        _check_clear_after(self.clear_after_s)


@dataclass(frozen=True)
class LongCallRule:
    """A call lasting too long (stuck, or an agent needing help)."""

    above_s: float = 3600.0
    severity: Severity = Severity.INFO


@dataclass(frozen=True)
class LinkDownRule:
    """The cloud link offline for too long."""

    after_s: float = 60.0
    severity: Severity = Severity.CRITICAL
    clear_after_s: float = DEFAULT_CLEAR_AFTER
    """Seconds back online (or degraded) before the alert clears; offline again within them
    continues the old outage."""

    def __post_init__(self) -> None:
        _check_clear_after(self.clear_after_s)


@dataclass(frozen=True)
class SecurityRule:
    """Bans and failed logins in a burst."""

    count: int = 5
    window_s: float = 300.0
    severity: Severity = Severity.CRITICAL
    clear_below: int | None = None
    """Back to normal with fewer events than this in the window; None: half of ``count``
    (at least 1)."""
    clear_after_s: float = DEFAULT_CLEAR_AFTER
    """Seconds back to normal before the alert clears."""

    def __post_init__(self) -> None:
        if self.clear_below is not None and not 1 <= self.clear_below <= self.count:
            raise ValueError(f"clear_below must be from 1 to count ({self.count}), "
                             f"got {self.clear_below}")
        _check_clear_after(self.clear_after_s)

    @property
    def clear_level(self) -> int:
        """Fewer events than this in the window is back to normal."""
        if self.clear_below is not None:
            return self.clear_below
        return max(1, self.count // 2)


def _check_clear_after(seconds: float) -> None:
    if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
        raise ValueError(f"clear_after_s must be a number of seconds >= 0, got {seconds!r}")


@dataclass(frozen=True)
class AlertRules:
    """Which rules run and their thresholds; ``None`` turns a rule off."""

    service_level: ServiceLevelRule | None = field(default_factory=ServiceLevelRule)
    calls_waiting: CallsWaitingRule | None = field(default_factory=CallsWaitingRule)
    longest_wait: LongestWaitRule | None = field(default_factory=LongestWaitRule)
    agent_paused: AgentPausedRule | None = field(default_factory=AgentPausedRule)
    long_call: LongCallRule | None = field(default_factory=LongCallRule)
    link_down: LinkDownRule | None = field(default_factory=LinkDownRule)
    security: SecurityRule | None = field(default_factory=SecurityRule)


@dataclass
class _Condition:
    severity: Severity
    message: str
    raising: bool = True
    """Past the raise threshold (else only short of back to normal: holds an active alert)."""


class _Outcomes:
    """One queue's answered/abandoned outcomes in the service-level window, with a running
    count of those answered within the threshold (the level is read on every event)."""

    __slots__ = ("entries", "ok")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, bool]] = deque()
        self.ok = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[float, bool]:
        return self.entries[index]

    def append(self, at: float, ok: bool) -> None:
        self.entries.append((at, ok))
        self.ok += ok
        if len(self.entries) > MAX_WINDOW_EVENTS:
            self.popleft()

    def popleft(self) -> None:
        self.ok -= self.entries.popleft()[1]

    def level(self) -> float:
        return self.ok / len(self.entries)


class _Times(dict[str, float]):
    """Call -> time, with the earliest time at hand: a heap beside the dict, its entries for
    calls gone or retimed dropped when they reach the top (and all rebuilt when most are
    stale), so that the rules need not scan every live call at every event."""

    def __init__(self) -> None:
        super().__init__()
        self._heap: list[tuple[float, str]] = []

    def __setitem__(self, key: str, value: float) -> None:
        dict.__setitem__(self, key, value)
        heapq.heappush(self._heap, (value, key))
        if len(self._heap) > 2 * len(self) + 64:
            self._heap = [(v, k) for k, v in self.items()]
            heapq.heapify(self._heap)

    def setdefault(self, key: str, value: float) -> float:  # type: ignore[override]
        """``dict.setdefault``, keeping the heap."""
        if key not in self:
            self[key] = value
        return dict.__getitem__(self, key)

    def earliest(self) -> float | None:
        """The smallest time; None when empty."""
        heap = self._heap
        while heap and dict.get(self, heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if heap:
            return heap[0][0]
        return min(self.values()) if self else None  # only times that are not numbers left


class AlertEngine:
    """Raises and clears alerts from fed events; see the module docstring."""

    def __init__(self, rules: AlertRules | None = None, *, max_tracked: int = 100_000) -> None:
        self.rules = rules or AlertRules()
        self.max_tracked = max_tracked
        threshold = (self.rules.service_level.threshold_s if self.rules.service_level
                     else 20.0)
        self._board = LiveBoard(KpiConfig(service_level_threshold=threshold))
        self._queues: set[str] = set()
        # queue -> (left_at, answered within threshold) of callers who left, oldest first
        self._outcomes: dict[str, _Outcomes] = {}
        self._entered = _Times()  # waiting call -> when it entered
        self._paused: dict[str, float] = {}  # agent -> paused since
        self._unpaused: dict[str, tuple[float, float]] = {}  # agent -> (paused since, until)
        self._calls = _Times()  # live call -> started at
        self._link: tuple[str, float] | None = None  # (state, since)
        self._outage: tuple[float, float] | None = None  # last outage (offline since, until)
        self._security: deque[float] = deque()
        self._active: dict[tuple[str, str], Alert] = {}
        self._normal_since: dict[tuple[str, str], float] = {}  # active alert -> back to normal
        self.ignored = 0
        """Events that could not be read (malformed payloads); counted, never raised."""

    # ---------------------------------------------------------------------------- input

    def feed(self, kind: str, payload: Mapping[str, Any], at: float) -> None:
        """Take one event (event-log row or live topic). Never raises for a bad payload."""
        try:
            self._feed(kind, payload, at)
        except (EventError, LookupError, TypeError, ValueError, AttributeError):
            self.ignored += 1

    def _feed(self, kind: str, payload: Mapping[str, Any], at: float) -> None:
        if kind in SECURITY_KINDS:
            self._security.append(at)
            if len(self._security) > MAX_WINDOW_EVENTS:
                self._security.popleft()
            return
        if kind.startswith("link."):
            state = str(payload["state"])
            since = float(payload.get("since", at))
            if not math.isfinite(since):
                raise ValueError("link state since is not a time")
            if self._link is None or self._link[0] != state:
                if self._link is not None and self._link[0] == "offline":
                    self._outage = (self._link[1], since)
                rule = self.rules.link_down
                if (state == "offline" and self._outage is not None and rule is not None
                        and since - self._outage[1] < rule.clear_after_s):
                    since = self._outage[0]  # a flap: the same outage goes on
                self._link = (state, since)
            return
        call_id = str(payload.get("call_id") or "")
        if kind == "call.offered" and call_id:
            self._track_call(call_id, at)
        elif kind in CALL_END_KINDS:
            self._calls.pop(call_id, None)
        for event in to_queue_events(kind, payload, at):
            self._queue_event(event.verb, event.call_id, event.queue, event.agent, event.at)
            self._board.apply(event)

    def _track_call(self, call_id: str, at: float) -> None:
        if call_id not in self._calls and len(self._calls) >= self.max_tracked:
            self.ignored += 1
            return
        self._calls.setdefault(call_id, at)

    def _queue_event(self, verb: QueueVerb, call_id: str, queue: str, agent: str,
                     at: float) -> None:
        if verb is QueueVerb.ENTERQUEUE:
            if call_id not in self._entered and len(self._entered) >= self.max_tracked:
                raise EventError(f"more than {self.max_tracked} callers waiting")
            self._queues.add(queue)
            self._entered[call_id] = at
            self._track_call(call_id, at)
        elif verb in (QueueVerb.CONNECT, QueueVerb.ABANDON, QueueVerb.EXITWITHTIMEOUT,
                      QueueVerb.EXITEMPTY, QueueVerb.EXITWITHKEY):
            entered = self._entered.pop(call_id, None)
            rule = self.rules.service_level
            if entered is not None and rule is not None:
                wait = at - entered
                short = verb is QueueVerb.ABANDON and wait < self._board.config.short_abandon
                if not short:  # short abandons count nowhere (docs/kpis.md)
                    window = self._outcomes.get(queue)
                    if window is None:
                        window = self._outcomes[queue] = _Outcomes()
                    window.append(at, verb is QueueVerb.CONNECT and wait <= rule.threshold_s)
            if verb is not QueueVerb.CONNECT:
                self._calls.pop(call_id, None)
        elif verb in (QueueVerb.COMPLETECALLER, QueueVerb.COMPLETEAGENT, QueueVerb.TRANSFER):
            self._calls.pop(call_id, None)
        elif verb is QueueVerb.PAUSE:
            if agent not in self._paused:
                if agent not in self._unpaused and len(self._paused) >= self.max_tracked:
                    raise EventError(f"more than {self.max_tracked} agents paused")
                since, until = self._unpaused.pop(agent, (at, -math.inf))
                paused = self.rules.agent_paused
                # Paused again soon after: the same pause goes on (no flapping banner).
                resumed = paused is not None and at - until < paused.clear_after_s
                self._paused[agent] = since if resumed else at
        elif verb in (QueueVerb.UNPAUSE, QueueVerb.AGENTLOGOFF):
            ended = self._paused.pop(agent, None)
            if ended is not None and self.rules.agent_paused is not None:
                self._unpaused[agent] = (ended, at)

    # ---------------------------------------------------------------------------- output

    def _conditions(self, now: float) -> dict[tuple[str, str], _Condition]:
        """Every (rule, key) not back to normal at ``now``; ``raising`` when past the raise
        threshold too."""
        rules, found = self.rules, {}
        if rules.service_level is not None:
            rule = rules.service_level
            for queue, window in self._outcomes.items():
                while window and window[0][0] <= now - rule.window_s:
                    window.popleft()
                if len(window) >= rule.min_calls:
                    level = window.level()
                    if level < rule.clear_level:
                        found[("service_level", queue)] = _Condition(
                            rule.severity, f"queue {queue}: service level {level:.0%} over "
                            f"the last {rule.window_s:g} s, target {rule.target:.0%}",
                            raising=level < rule.target)
        for queue in self._queues:
            waiting = self._board.waiting(queue)
            count = rules.calls_waiting
            if count is not None and waiting >= count.clear_level:
                found[("calls_waiting", queue)] = _Condition(
                    count.severity,
                    f"queue {queue}: {waiting} callers waiting, limit {count.above}",
                    raising=waiting > count.above)
            longest = self._board.longest_wait(queue, now)
            wait = rules.longest_wait
            if wait is not None and longest >= wait.clear_level:
                found[("longest_wait", queue)] = _Condition(
                    wait.severity, f"queue {queue}: a caller has waited "
                    f"{longest:.0f} s, limit {wait.above_s:g} s",
                    raising=longest > wait.above_s)
        if rules.agent_paused is not None:
            keep = rules.agent_paused.clear_after_s
            for agent in [a for a, (_, until) in self._unpaused.items() if now - until >= keep]:
                del self._unpaused[agent]
            for agent, since in self._paused.items():
                if now - since > rules.agent_paused.above_s:
                    found[("agent_paused", agent)] = _Condition(
                        rules.agent_paused.severity, f"agent {agent} paused for "
                        f"{now - since:.0f} s, limit {rules.agent_paused.above_s:g} s")
        if rules.long_call is not None:
            first = self._calls.earliest()
            # Only when the oldest call is over the limit is any call (O(calls) otherwise,
            # at every event).
            long_calls = (self._calls.items() if first is not None
                          and now - first > rules.long_call.above_s else ())
            for call_id, started in long_calls:
                if now - started > rules.long_call.above_s:
                    found[("long_call", call_id)] = _Condition(
                        rules.long_call.severity, f"call {call_id} has lasted "
                        f"{now - started:.0f} s, limit {rules.long_call.above_s:g} s")
        if rules.link_down is not None and self._link is not None:
            state, since = self._link
            if state == "offline" and now - since > rules.link_down.after_s:
                found[("link_down", "cloud")] = _Condition(
                    rules.link_down.severity, f"cloud link offline for {now - since:.0f} s")
        if rules.security is not None:
            burst = rules.security
            while self._security and self._security[0] <= now - burst.window_s:
                self._security.popleft()
            if len(self._security) >= burst.clear_level:
                found[("security", "site")] = _Condition(
                    burst.severity, f"{len(self._security)} bans or failed logins in the last "
                    f"{burst.window_s:g} s, limit {burst.count}",
                    raising=len(self._security) >= burst.count)
        return found

    def _clear_after(self, rule: str) -> float:
        return float(getattr(getattr(self.rules, rule, None), "clear_after_s", 0.0))

    def tick(self, now: float) -> list[Alert]:
        """Evaluate every rule at ``now``; return the alerts raised (``cleared_at`` None) and
        cleared (``cleared_at`` set) since the previous tick, cleared first."""
        found = self._conditions(now)
        changes = []
        for key in list(self._active):
            if key in found:  # not back to normal (again): the wait starts over
                self._normal_since.pop(key, None)
                continue
            normal = self._normal_since.setdefault(key, now)
            if now - normal >= self._clear_after(key[0]):
                del self._normal_since[key]
                changes.append(replace(self._active.pop(key), cleared_at=now))
        for key, condition in sorted(found.items()):
            if condition.raising and key not in self._active:
                alert = Alert(key[0], key[1], condition.severity, condition.message, now)
                self._active[key] = alert
                changes.append(alert)
        return changes

    def active(self) -> list[Alert]:
        """Alerts raised and not cleared, by rule and key (messages as when raised)."""
        return [self._active[k] for k in sorted(self._active)]

    def next_timer(self) -> float | None:
        """The earliest time a rule may change without a new event (a wait, pause, call or
        outage crossing its limit, a window forgetting an event, or an alert back to normal
        long enough to clear); None when nothing is pending. Ticking more often is
        harmless."""
        rules, times = self.rules, []
        if rules.longest_wait is not None and self._entered:
            times.append(self._entered.earliest() + rules.longest_wait.above_s)  # type: ignore[operator]
        if rules.agent_paused is not None and self._paused:
            times.append(min(self._paused.values()) + rules.agent_paused.above_s)
        if rules.long_call is not None and self._calls:
            times.append(self._calls.earliest() + rules.long_call.above_s)  # type: ignore[operator]
        if rules.link_down is not None and self._link and self._link[0] == "offline":
            times.append(self._link[1] + rules.link_down.after_s)
        if rules.security is not None and self._security:
            times.append(self._security[0] + rules.security.window_s)
        if rules.service_level is not None:
            times.extend(w[0][0] + rules.service_level.window_s
                         for w in self._outcomes.values() if w)
        times.extend(normal + self._clear_after(key[0])
                     for key, normal in self._normal_since.items())
        # A limit is crossed strictly after it is reached.
        return math.nextafter(min(times), math.inf) if times else None


def rules_from_config(config: Any) -> AlertRules:
    """The rules of ``site.yaml``'s ``alerts:`` section (``appliance.config.AlertsConfig``)."""
    def maybe(section: Any, make: Any) -> Any:
        return None if section is None else make(section)

    return AlertRules(
        service_level=maybe(config.service_level, lambda c: ServiceLevelRule(
            target=c.target, threshold_s=c.threshold, window_s=c.window,
            min_calls=c.min_calls, clear_above=c.clear_above, clear_after_s=c.clear_after)),
        calls_waiting=maybe(config.calls_waiting, lambda c: CallsWaitingRule(
            above=c.above, clear_below=c.clear_below, clear_after_s=c.clear_after)),
        longest_wait=maybe(config.longest_wait, lambda c: LongestWaitRule(
            above_s=c.above, clear_below_s=c.clear_below, clear_after_s=c.clear_after)),
        agent_paused=maybe(config.agent_paused, lambda c: AgentPausedRule(
            above_s=c.above, clear_after_s=c.clear_after)),
        long_call=maybe(config.long_call, lambda c: LongCallRule(above_s=c.above)),
        link_down=maybe(config.link_down, lambda c: LinkDownRule(
            after_s=c.after, clear_after_s=c.clear_after)),
        security=maybe(config.security, lambda c: SecurityRule(
            count=c.count, window_s=c.window, clear_below=c.clear_below,
            clear_after_s=c.clear_after)),
    )
