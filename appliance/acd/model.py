"""The ACD router's vocabulary: configuration, events in, decisions out, and its two errors.

Both routers (``appliance.acd.reference`` in pure Python and the compiled
``appliance.acd._router``) take exactly these objects and return exactly these objects, so a
test can drive both with one event sequence and compare what they decide.

Identifiers (queue names, agent ids, call ids) are opaque strings chosen by the appliance.
Times are seconds on one monotonic clock, passed in by the caller of the router.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

#: Skill levels run 1 (novice) to 10 (expert).
MIN_SKILL_LEVEL = 1
MAX_SKILL_LEVEL = 10
#: Caller priorities the router accepts (higher is served first).
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1


class LocalProtocolError(Exception):
    """The router was misused: an event that the current state does not allow (unknown call,
    offer answered by an agent it was not offered to, time running backwards, ...). The router's
    state is unchanged when this is raised."""


class ConfigError(ValueError):
    """The router configuration is invalid; the message names the queue/agent and the field."""


class Strategy(enum.Enum):
    """How a queue picks among the agents eligible for its head caller."""

    RING_ALL = "ring-all"
    LONGEST_IDLE = "longest-idle"
    FEWEST_CALLS = "fewest-calls"
    LEAST_TALK_TIME = "least-talk-time"
    ROUND_ROBIN_MEMORY = "round-robin-with-memory"
    LINEAR = "linear"
    RANDOM = "random"
    WEIGHTED_RANDOM = "weighted-random"


class EmptyRule(enum.Enum):
    """When a queue counts as empty, for joining and for staying in it."""

    NEVER = "never"
    """The queue is never empty: callers join and stay whatever the staffing."""
    UNSTAFFED = "unstaffed"
    """Empty when no member agent is logged in."""
    UNAVAILABLE = "unavailable"
    """Empty when no member agent is logged in and unpaused."""


class OverflowReason(enum.Enum):
    """Why a caller left the queue for the overflow target."""

    TIMEOUT = "timeout"
    MAX_LENGTH = "max-length"
    NO_AGENTS = "no-agents"
    ESTIMATED_WAIT = "estimated-wait"


# --------------------------------------------------------------------------------------------
# Configuration


@dataclass(frozen=True)
class RelaxStep:
    """One step of skill relaxation, applied once the caller has waited ``after`` seconds.
    Steps accumulate: a caller who has waited past two steps gets both."""

    after: float
    """Seconds of waiting (counted from the caller's place in the queue) before the step applies."""
    lower_by: int = 0
    """Every remaining required minimum level is lowered by this much (never below 1)."""
    drop: tuple[str, ...] = ()
    """Skills no longer required at all."""


@dataclass(frozen=True)
class Member:
    """An agent's membership of one queue."""

    agent: str
    """Agent id."""
    penalty: int = 0
    """Agents with a lower penalty are offered first; higher tiers only when the lower are busy."""
    weight: int = 1
    """Relative share of calls under the weighted-random strategy (1 or more)."""


@dataclass(frozen=True)
class QueueConfig:
    """One ACD queue."""

    name: str
    """Queue name, unique in the router."""
    members: tuple[Member, ...]
    """Member agents, in the order linear and round-robin walk them."""
    strategy: Strategy = Strategy.LONGEST_IDLE
    """How an agent is picked among the eligible ones."""
    required_skills: tuple[tuple[str, int], ...] = ()
    """(skill, minimum level) pairs an agent needs to take this queue's callers."""
    relax_steps: tuple[RelaxStep, ...] = ()
    """Skill relaxation as the caller waits, in increasing ``after`` order."""
    ring_timeout: float = 15.0
    """Seconds an offer rings before it goes to the next agent."""
    wrap_up: float = 0.0
    """Seconds of after-call work following a call of this queue (0: none)."""
    max_wait: float | None = None
    """Seconds a caller may wait before overflowing (None: no limit)."""
    max_length: int | None = None
    """Waiting callers beyond which new callers overflow (None: no limit but the router's)."""
    max_estimated_wait: float | None = None
    """Estimated wait beyond which a new caller overflows at once (None: never)."""
    join_empty: EmptyRule = EmptyRule.NEVER
    """When a new caller is refused (overflow no-agents) because the queue is empty."""
    leave_empty: EmptyRule = EmptyRule.NEVER
    """When waiting callers are sent out (overflow no-agents) because the queue became empty."""
    overflow_target: str = ""
    """Where overflowing callers go (a queue name, an extension, voicemail); opaque here."""
    default_handle_time: float = 180.0
    """Handle time assumed for the estimated wait until calls have been handled."""
    callback_retries: int = 2
    """Further dial attempts after a queued callback's first attempt fails."""
    callback_retry_interval: float = 300.0
    """Seconds between a failed callback attempt and the next one."""
    rejoin_window: float = 0.0
    """Seconds within which an abandoning caller who calls again keeps their place (0: off)."""


@dataclass(frozen=True)
class AgentConfig:
    """One agent known to the router."""

    agent: str
    """Agent id."""
    skills: tuple[tuple[str, int], ...] = ()
    """(skill, level 1-10) pairs."""
    max_interactions: int = 1
    """Concurrent interactions (ringing offers included) the agent may have."""


@dataclass(frozen=True)
class RouterConfig:
    """Everything the router is built from."""

    queues: tuple[QueueConfig, ...]
    """The queues."""
    agents: tuple[AgentConfig, ...]
    """The agents."""
    seed: int = 0
    """Seed of the random and weighted-random strategies (same seed, same picks)."""
    auto_pause_after: int = 3
    """Consecutive offers an agent lets ring out before being paused (0: never)."""
    handle_time_samples: int = 20
    """Recent handle times per queue the estimated wait averages."""
    max_waiting: int = 100_000
    """Callers the router holds at most, across all queues; beyond it callers overflow."""
    max_rejoin_memory: int = 10_000
    """Abandoned callers remembered for rejoining at most (oldest forgotten first)."""
    max_skills: int = 64
    """Distinct skill names the router accepts."""


# --------------------------------------------------------------------------------------------
# Events in


@dataclass(frozen=True)
class AgentLogin:
    """The agent logged in and is ready."""

    agent: str
    """Agent id."""


@dataclass(frozen=True)
class AgentLogout:
    """The agent logged out; calls in progress continue, ringing offers are withdrawn."""

    agent: str
    """Agent id."""


@dataclass(frozen=True)
class AgentPause:
    """The agent paused (break, training, ...)."""

    agent: str
    """Agent id."""
    reason: str = ""
    """Pause reason code, for reporting."""


@dataclass(frozen=True)
class AgentUnpause:
    """The agent is ready again."""

    agent: str
    """Agent id."""


@dataclass(frozen=True)
class CallerJoin:
    """A caller enters a queue."""

    call: str
    """Call id."""
    queue: str
    """Queue name."""
    caller_number: str = ""
    """Caller's number, used to recognise a caller who abandoned and calls again."""
    priority: int = 0
    """Higher is served first (set from a CRM lookup or a customer list)."""
    place_time: float | None = None
    """When the caller's place counts from, on the router's clock, if earlier than now: a
    caller sent back to the queue (a transfer that failed) gives their first join and takes
    their old place among the callers of their priority, and their relaxation steps count from
    it. Not after ``now``; None: the caller joins now (or at a place remembered for rejoining).
    Wait timeouts (``max_wait``) still count from this join."""


@dataclass(frozen=True)
class CallerAbandon:
    """The caller hung up while queued (or cancelled their queued callback)."""

    call: str
    """Call id."""


@dataclass(frozen=True)
class OfferAccepted:
    """The agent answered the offered call; the call leaves the queue."""

    call: str
    """Call id."""
    agent: str
    """Agent id."""


@dataclass(frozen=True)
class OfferRejected:
    """The agent declined the offered call (busy here, declined on the phone)."""

    call: str
    """Call id."""
    agent: str
    """Agent id."""


@dataclass(frozen=True)
class OfferTimeout:
    """The offer rang out on the agent's side before the router's own ring timeout."""

    call: str
    """Call id."""
    agent: str
    """Agent id."""


@dataclass(frozen=True)
class CallEnded:
    """A call the agent was handling ended; wrap-up of the call's queue starts."""

    call: str
    """Call id."""
    agent: str
    """Agent id."""


@dataclass(frozen=True)
class WrapUpEnded:
    """The agent finished after-call work early."""

    agent: str
    """Agent id."""


@dataclass(frozen=True)
class CallbackRequested:
    """The queued caller chose to be called back; they hang up and keep their place."""

    call: str
    """Call id."""
    number: str
    """Number to dial back."""


@dataclass(frozen=True)
class CallbackResult:
    """How the dial attempt of a queued callback went."""

    call: str
    """Call id."""
    answered: bool
    """True when the customer answered and is connected to the reserved agent."""


@dataclass(frozen=True)
class AnnounceRequest:
    """The queue's announcement is due for this caller; the router answers with Announce."""

    call: str
    """Call id."""


@dataclass(frozen=True)
class OutsideCallStarted:
    """A call the router did not route started for the agent (their own outbound or
    click-to-dial call, a colleague's call, a transfer or IVR transfer ringing them, a
    supervisor's session): it counts against their interaction cap while it lasts."""

    agent: str
    """Agent id."""
    call_id: str
    """Call id, unique among the agent's calls outside the queues."""
    at: float
    """When the agent's leg started; not later than the ``now`` the event is handled at."""


@dataclass(frozen=True)
class OutsideCallEnded:
    """A call outside the queues ended for the agent: no wrap-up, no statistics, and the agent's
    idle-since time is unchanged."""

    agent: str
    """Agent id."""
    call_id: str
    """Call id given to OutsideCallStarted."""
    at: float
    """When the agent's leg ended; not later than the ``now`` the event is handled at."""


Event = (
    AgentLogin
    | AgentLogout
    | AgentPause
    | AgentUnpause
    | CallerJoin
    | CallerAbandon
    | OfferAccepted
    | OfferRejected
    | OfferTimeout
    | CallEnded
    | WrapUpEnded
    | CallbackRequested
    | CallbackResult
    | AnnounceRequest
    | OutsideCallStarted
    | OutsideCallEnded
)


# --------------------------------------------------------------------------------------------
# Decisions out


@dataclass(frozen=True)
class Offer:
    """Ring the call at these agents (several only under ring-all); the first to accept wins."""

    call: str
    """Call id."""
    agents: tuple[str, ...]
    """Agents to ring."""
    queue: str
    """Queue the call waits in."""


@dataclass(frozen=True)
class CancelOffer:
    """Stop ringing the call at these agents (another answered, the caller left, ...)."""

    call: str
    """Call id."""
    agents: tuple[str, ...]
    """Agents to stop ringing."""


@dataclass(frozen=True)
class Overflow:
    """The caller leaves the queue for the queue's overflow target."""

    call: str
    """Call id."""
    queue: str
    """Queue the caller leaves (or was refused by)."""
    reason: OverflowReason
    """Why."""
    target: str
    """The queue's overflow target."""


@dataclass(frozen=True)
class DialCallback:
    """Dial the customer of a queued callback; the agent is reserved for it."""

    call: str
    """Call id of the callback request."""
    agent: str
    """Agent reserved for the callback."""
    queue: str
    """Queue the callback waited in."""
    number: str
    """Number to dial."""
    attempt: int
    """1 for the first attempt, then 2, 3, ..."""


@dataclass(frozen=True)
class CallbackOutcome:
    """A queued callback is finished: answered, or every attempt failed."""

    call: str
    """Call id of the callback request."""
    queue: str
    """Queue of the callback."""
    answered: bool
    """True when connected to an agent."""
    attempts: int
    """Dial attempts made."""


@dataclass(frozen=True)
class AutoPause:
    """The router paused the agent after consecutive missed offers."""

    agent: str
    """Agent id."""
    missed: int
    """Consecutive offers that rang out."""


@dataclass(frozen=True)
class Announce:
    """Tell the caller where they stand."""

    call: str
    """Call id."""
    position: int
    """1 for the next caller to be served in this queue."""
    estimated_wait: float
    """Seconds, from recent handle times and staffing; ``math.inf`` when nobody is staffed."""


Decision = Offer | CancelOffer | Overflow | DialCallback | CallbackOutcome | AutoPause | Announce

#: Pause reason the router gives an agent it pauses itself.
AUTO_PAUSE_REASON = "auto-pause"


# --------------------------------------------------------------------------------------------
# Read-side views


@dataclass(frozen=True)
class AgentView:
    """An agent's routing state."""

    agent: str
    """Agent id."""
    presence: str
    """"logged-out", "ready" or "paused"."""
    pause_reason: str
    """Reason of the current pause ("" when not paused)."""
    in_wrap_up: bool
    """True while after-call work blocks offers from every queue."""
    interactions: int
    """Calls in progress."""
    ringing: int
    """Offers ringing (and callbacks being dialled) for this agent."""
    missed: int
    """Consecutive offers that rang out."""
    idle_since: float
    """When the agent last became free."""
    outside: int = 0
    """Calls outside the queues in progress (they count against the cap, like ``interactions``)."""


@dataclass(frozen=True)
class CallerView:
    """A queued caller's routing state."""

    call: str
    """Call id."""
    queue: str
    """Queue name."""
    state: str
    """"waiting", "offered", "callback-waiting", "callback-dialling" or "callback-retry"."""
    priority: int
    """Caller priority."""
    place_time: float
    """Time the caller's place counts from (their first join when they rejoined)."""
    offered_to: tuple[str, ...] = field(default=())
    """Agents ringing for this caller (or the agent reserved for its callback)."""


INFINITE_WAIT = math.inf


# --------------------------------------------------------------------------------------------
# State tables shared by both routers: (state, input) -> next state. A pair that is not in a
# table is API misuse (LocalProtocolError). ``None`` as next state: the caller leaves the queue.

LOGGED_OUT = "logged-out"
READY = "ready"
PAUSED = "paused"

PRESENCE_TRANSITIONS: dict[tuple[str, str], str] = {
    (LOGGED_OUT, "login"): READY,
    (READY, "logout"): LOGGED_OUT,
    (PAUSED, "logout"): LOGGED_OUT,
    (READY, "pause"): PAUSED,
    (PAUSED, "pause"): PAUSED,  # a new reason replaces the old one
    (PAUSED, "unpause"): READY,
    (READY, "auto-pause"): PAUSED,
}

WAITING = "waiting"
OFFERED = "offered"
CALLBACK_WAITING = "callback-waiting"
CALLBACK_DIALLING = "callback-dialling"
CALLBACK_RETRY = "callback-retry"

CALLER_TRANSITIONS: dict[tuple[str, str], str | None] = {
    (WAITING, "offer"): OFFERED,
    (WAITING, "abandon"): None,
    (WAITING, "callback"): CALLBACK_WAITING,
    (WAITING, "overflow"): None,
    (WAITING, "announce"): WAITING,
    (OFFERED, "accept"): None,
    (OFFERED, "decline"): WAITING,  # the last ringing agent declined, rang out or left
    (OFFERED, "decline-one"): OFFERED,  # ring-all: others still ringing
    (OFFERED, "abandon"): None,
    (OFFERED, "callback"): CALLBACK_WAITING,
    (OFFERED, "overflow"): None,
    (OFFERED, "announce"): OFFERED,
    (CALLBACK_WAITING, "dial"): CALLBACK_DIALLING,
    (CALLBACK_WAITING, "abandon"): None,
    (CALLBACK_WAITING, "announce"): CALLBACK_WAITING,
    (CALLBACK_DIALLING, "answered"): None,
    (CALLBACK_DIALLING, "failed"): CALLBACK_RETRY,
    (CALLBACK_DIALLING, "gave-up"): None,
    (CALLBACK_DIALLING, "abandon"): None,
    (CALLBACK_DIALLING, "announce"): CALLBACK_DIALLING,
    (CALLBACK_RETRY, "retry-due"): CALLBACK_WAITING,
    (CALLBACK_RETRY, "abandon"): None,
    (CALLBACK_RETRY, "announce"): CALLBACK_RETRY,
}


# --------------------------------------------------------------------------------------------
# Configuration checked and turned into indices, shared by both routers.


@dataclass(frozen=True)
class Plan:
    """A validated RouterConfig with names turned into indices."""

    config: RouterConfig
    """The configuration the plan was made from."""
    skills: tuple[str, ...]
    """Skill names; a skill's index is its position here."""
    agent_ids: tuple[str, ...]
    """Agent ids; an agent's index is its position here."""
    agent_levels: tuple[tuple[int, ...], ...]
    """Per agent, the level of every skill (0 where the agent lacks it)."""
    agent_caps: tuple[int, ...]
    """Per agent, max concurrent interactions."""
    queue_names: tuple[str, ...]
    """Queue names; a queue's index is its position here."""
    queue_members: tuple[tuple[tuple[int, int, int], ...], ...]
    """Per queue, (agent index, penalty, weight) in member order."""
    queue_requirements: tuple[tuple[tuple[tuple[int, int], ...], ...], ...]
    """Per queue, per number of relax steps applied (0..n), the (skill index, min level) pairs."""
    queue_step_after: tuple[tuple[float, ...], ...]
    """Per queue, the ``after`` of each relax step."""


def _check_level(where: str, level: object) -> int:
    if not isinstance(level, int) or isinstance(level, bool):
        raise ConfigError(f"{where}: skill level must be an integer, got {level!r}")
    if not MIN_SKILL_LEVEL <= level <= MAX_SKILL_LEVEL:
        raise ConfigError(
            f"{where}: skill level {level} outside {MIN_SKILL_LEVEL}-{MAX_SKILL_LEVEL}"
        )
    return level


def _check_seconds(where: str, value: float | None, *, optional: bool, positive: bool) -> None:
    if value is None:
        if not optional:
            raise ConfigError(f"{where}: a number of seconds is required")
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number of seconds, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}: expected {'> 0' if positive else '>= 0'}, got {value!r}")


#: Largest count a configuration field takes (keeps sums of weights within 64 bits).
MAX_COUNT = 2**31 - 1


def _check_count(where: str, value: int | None, *, optional: bool, minimum: int) -> None:
    if value is None and optional:
        return
    if (isinstance(value, bool) or not isinstance(value, int)
            or not minimum <= value <= MAX_COUNT):
        raise ConfigError(f"{where}: expected an integer in {minimum}..{MAX_COUNT}, got {value!r}")


def make_plan(config: RouterConfig) -> Plan:
    """Check ``config`` and index it; raises ConfigError naming what is wrong."""
    if not isinstance(config, RouterConfig):
        raise ConfigError(f"expected a RouterConfig, got {type(config).__name__}")
    _check_count("router.auto_pause_after", config.auto_pause_after, optional=False, minimum=0)
    _check_count("router.handle_time_samples", config.handle_time_samples, optional=False,
                 minimum=1)
    _check_count("router.max_waiting", config.max_waiting, optional=False, minimum=1)
    _check_count("router.max_rejoin_memory", config.max_rejoin_memory, optional=False, minimum=0)
    _check_count("router.max_skills", config.max_skills, optional=False, minimum=1)
    if not isinstance(config.seed, int) or isinstance(config.seed, bool):
        raise ConfigError(f"router.seed: expected an integer, got {config.seed!r}")
    skills: dict[str, int] = {}

    def skill_index(where: str, name: object) -> int:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: skill name must be a non-empty string, got {name!r}")
        if name not in skills:
            if len(skills) >= config.max_skills:
                raise ConfigError(f"{where}: more than {config.max_skills} distinct skills")
            skills[name] = len(skills)
        return skills[name]

    agent_index: dict[str, int] = {}
    agent_skill_pairs: list[list[tuple[int, int]]] = []
    caps: list[int] = []
    for a in config.agents:
        where = f"agent {a.agent!r}"
        if not isinstance(a.agent, str) or not a.agent:
            raise ConfigError(f"{where}: agent id must be a non-empty string")
        if a.agent in agent_index:
            raise ConfigError(f"{where}: defined twice")
        _check_count(f"{where}.max_interactions", a.max_interactions, optional=False, minimum=1)
        pairs: list[tuple[int, int]] = []
        seen: set[int] = set()
        for name, level in a.skills:
            idx = skill_index(f"{where}.skills", name)
            if idx in seen:
                raise ConfigError(f"{where}.skills: {name!r} listed twice")
            seen.add(idx)
            pairs.append((idx, _check_level(f"{where}.skills.{name}", level)))
        agent_index[a.agent] = len(agent_index)
        agent_skill_pairs.append(pairs)
        caps.append(a.max_interactions)

    queue_index: dict[str, int] = {}
    members_out: list[tuple[tuple[int, int, int], ...]] = []
    reqs_out: list[tuple[tuple[tuple[int, int], ...], ...]] = []
    after_out: list[tuple[float, ...]] = []
    for q in config.queues:
        where = f"queue {q.name!r}"
        if not isinstance(q.name, str) or not q.name:
            raise ConfigError(f"{where}: queue name must be a non-empty string")
        if q.name in queue_index:
            raise ConfigError(f"{where}: defined twice")
        if not isinstance(q.strategy, Strategy):
            raise ConfigError(f"{where}.strategy: expected a Strategy, got {q.strategy!r}")
        for rule_name in ("join_empty", "leave_empty"):
            if not isinstance(getattr(q, rule_name), EmptyRule):
                raise ConfigError(f"{where}.{rule_name}: expected an EmptyRule")
        _check_seconds(f"{where}.ring_timeout", q.ring_timeout, optional=False, positive=True)
        _check_seconds(f"{where}.wrap_up", q.wrap_up, optional=False, positive=False)
        _check_seconds(f"{where}.max_wait", q.max_wait, optional=True, positive=False)
        _check_seconds(f"{where}.max_estimated_wait", q.max_estimated_wait, optional=True,
                       positive=False)
        _check_seconds(f"{where}.default_handle_time", q.default_handle_time, optional=False,
                       positive=False)
        _check_seconds(f"{where}.callback_retry_interval", q.callback_retry_interval,
                       optional=False, positive=True)
        _check_seconds(f"{where}.rejoin_window", q.rejoin_window, optional=False, positive=False)
        _check_count(f"{where}.max_length", q.max_length, optional=True, minimum=0)
        _check_count(f"{where}.callback_retries", q.callback_retries, optional=False, minimum=0)
        members: list[tuple[int, int, int]] = []
        for m in q.members:
            if m.agent not in agent_index:
                raise ConfigError(f"{where}.members: unknown agent {m.agent!r}")
            if any(x[0] == agent_index[m.agent] for x in members):
                raise ConfigError(f"{where}.members: agent {m.agent!r} listed twice")
            _check_count(f"{where}.members.{m.agent}.penalty", m.penalty, optional=False,
                         minimum=0)
            _check_count(f"{where}.members.{m.agent}.weight", m.weight, optional=False, minimum=1)
            members.append((agent_index[m.agent], m.penalty, m.weight))
        required: dict[int, int] = {}
        for name, level in q.required_skills:
            idx = skill_index(f"{where}.required_skills", name)
            if idx in required:
                raise ConfigError(f"{where}.required_skills: {name!r} listed twice")
            required[idx] = _check_level(f"{where}.required_skills.{name}", level)
        steps: list[tuple[tuple[int, int], ...]] = [tuple(sorted(required.items()))]
        afters: list[float] = []
        current = dict(required)
        for n, step in enumerate(q.relax_steps):
            swhere = f"{where}.relax_steps[{n}]"
            _check_seconds(f"{swhere}.after", step.after, optional=False, positive=False)
            if afters and step.after < afters[-1]:
                raise ConfigError(f"{swhere}.after: steps must be in increasing order")
            _check_count(f"{swhere}.lower_by", step.lower_by, optional=False, minimum=0)
            for name in step.drop:
                current.pop(skill_index(f"{swhere}.drop", name), None)
            current = {s: max(MIN_SKILL_LEVEL, lvl - step.lower_by) for s, lvl in current.items()}
            steps.append(tuple(sorted(current.items())))
            afters.append(float(step.after))
        queue_index[q.name] = len(queue_index)
        members_out.append(tuple(members))
        reqs_out.append(tuple(steps))
        after_out.append(tuple(afters))

    levels = []
    for pairs in agent_skill_pairs:
        row = [0] * len(skills)
        for idx, level in pairs:
            row[idx] = level
        levels.append(tuple(row))
    return Plan(
        config=config,
        skills=tuple(skills),
        agent_ids=tuple(agent_index),
        agent_levels=tuple(levels),
        agent_caps=tuple(caps),
        queue_names=tuple(queue_index),
        queue_members=tuple(members_out),
        queue_requirements=tuple(reqs_out),
        queue_step_after=tuple(after_out),
    )


def is_time(value: object) -> bool:
    """Whether ``value`` is a finite number of seconds (a bool is not; an int too large for a
    float is not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64 (Steele, Lea, Flood 2014): (new state, output). Both routers use
    it so that a seed gives the same random picks in each."""
    state = (state + 0x9E3779B97F4A7C15) & MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return state, z ^ (z >> 31)
