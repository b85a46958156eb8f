"""The link's state (online, degraded, offline) as a table; sans-IO, time is a parameter.

Each tick the agent reports what it sees; ``LinkMonitor.observe`` turns that into one input and
looks up the next state:

- ``HEALTHY``      linked (the stream's first Ack arrived), backlog young, nothing wrong;
- ``LAGGING``      linked, but the oldest unacknowledged event is older than
                   ``degraded_after_s``, the outbox is over quota, or the cloud's ack makes no
                   sense for this log;
- ``RECONNECTING`` not linked, lost less than ``offline_after_s`` ago;
- ``UNREACHABLE``  not linked and never linked since start, or lost for ``offline_after_s``.

A link that blips while already offline stays offline until it is linked again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


class Input(enum.Enum):
    HEALTHY = "healthy"
    LAGGING = "lagging"
    RECONNECTING = "reconnecting"
    UNREACHABLE = "unreachable"


TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.OFFLINE, Input.HEALTHY): State.ONLINE,
    (State.OFFLINE, Input.LAGGING): State.DEGRADED,
    (State.OFFLINE, Input.RECONNECTING): State.OFFLINE,
    (State.OFFLINE, Input.UNREACHABLE): State.OFFLINE,
    (State.ONLINE, Input.HEALTHY): State.ONLINE,
    (State.ONLINE, Input.LAGGING): State.DEGRADED,
    (State.ONLINE, Input.RECONNECTING): State.DEGRADED,
    (State.ONLINE, Input.UNREACHABLE): State.OFFLINE,
    (State.DEGRADED, Input.HEALTHY): State.ONLINE,
    (State.DEGRADED, Input.LAGGING): State.DEGRADED,
    (State.DEGRADED, Input.RECONNECTING): State.DEGRADED,
    (State.DEGRADED, Input.UNREACHABLE): State.OFFLINE,
}


@dataclass(frozen=True)
class Observation:
    """What the agent sees at one tick."""

    linked: bool
    """A stream is open and its first Ack arrived."""
    lost_at: float | None
    """When the last link was lost (None: never linked since start, or linked now)."""
    lag_seconds: float
    """Age of the oldest unacknowledged event."""
    problem: str = ""
    """Something wrong besides lag (over quota, strange ack); empty when none."""
    reason: str = ""
    """Why the link is down, when it is (last error)."""


@dataclass(frozen=True)
class Change:
    """A transition (or none) and its explanation."""

    state: State
    """State after the observation."""
    changed: bool
    """True when the state differs from before."""
    detail: str
    """Why, in words."""


class LinkMonitor:
    """Applies observations to the state table."""

    def __init__(self, *, degraded_after_s: float, offline_after_s: float, now: float) -> None:
        self.degraded_after_s = degraded_after_s
        self.offline_after_s = offline_after_s
        self.state = State.OFFLINE
        self.since = now

    def classify(self, seen: Observation, now: float) -> tuple[Input, str]:
        """The table input for an observation, and the detail to show."""
        if seen.linked:
            if seen.problem:
                return Input.LAGGING, seen.problem
            if seen.lag_seconds >= self.degraded_after_s:
                return Input.LAGGING, (
                    f"oldest unacknowledged event is {seen.lag_seconds:.0f} s old "
                    f"(degraded after {self.degraded_after_s:g} s)"
                )
            return Input.HEALTHY, ""
        why = f": {seen.reason}" if seen.reason else ""
        if seen.lost_at is not None and now - seen.lost_at < self.offline_after_s:
            return Input.RECONNECTING, f"link lost, reconnecting{why}"
        extra = f"; {seen.problem}" if seen.problem else ""
        return Input.UNREACHABLE, f"cloud unreachable{why}{extra}"

    def observe(self, seen: Observation, now: float) -> Change:
        """Apply one observation at ``now``."""
        event, detail = self.classify(seen, now)
        following = TRANSITIONS[(self.state, event)]
        changed = following is not self.state
        if changed:
            self.state = following
            self.since = now
        return Change(following, changed, detail)


#: The edge agent rewrites its link-state row every ``state_interval_s``. A row this many
#: intervals old (and at least ``STALE_FLOOR_S``) means the agent is no longer running (killed,
#: crashed, hung): its last word ("online") must not be believed.
STALE_REPORTS = 10
STALE_FLOOR_S = 2.0


def stale_after_s(state_interval_s: float) -> float:
    """Age beyond which the agent's link-state row no longer tells the link's state."""
    return max(STALE_FLOOR_S, STALE_REPORTS * state_interval_s)
