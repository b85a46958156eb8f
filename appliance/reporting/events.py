"""The records the KPI engine reads: queue events (Asterisk ``queue_log`` verbs) and component
up/down events, plus reading and writing ``queue_log`` lines.

A ``queue_log`` line is ``epoch|call_id|queue|agent|VERB|data1|data2|...`` (Asterisk
``doc/queue_log.txt`` / the "Queue Logs" chapter of the Asterisk documentation). The positional
data fields of each verb are given names in ``DATA_FIELDS`` so code reads ``data["wait"]``
rather than ``data1``. Times are seconds since the epoch (UTC).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field


class EventError(ValueError):
    """An event or a ``queue_log`` line is malformed; the message says which field and why."""


class QueueVerb(enum.Enum):
    """What happened, in the words of Asterisk's ``queue_log``."""

    ENTERQUEUE = "ENTERQUEUE"
    """The caller joined the queue."""
    CONNECT = "CONNECT"
    """An agent answered the caller: waiting ends, talk begins."""
    COMPLETECALLER = "COMPLETECALLER"
    """The caller hung up after talking to the agent."""
    COMPLETEAGENT = "COMPLETEAGENT"
    """The agent hung up after talking to the caller."""
    TRANSFER = "TRANSFER"
    """The agent transferred the caller away; the agent's talk ends."""
    ABANDON = "ABANDON"
    """The caller hung up while waiting."""
    EXITWITHTIMEOUT = "EXITWITHTIMEOUT"
    """The caller left the queue at its timeout (overflow), unanswered."""
    EXITEMPTY = "EXITEMPTY"
    """The caller left because the queue had no agent (leave-when-empty)."""
    EXITWITHKEY = "EXITWITHKEY"
    """The caller left the queue by pressing a key."""
    RINGNOANSWER = "RINGNOANSWER"
    """The call was offered to an agent who did not answer in time."""
    AGENTLOGIN = "AGENTLOGIN"
    """The agent logged in."""
    AGENTLOGOFF = "AGENTLOGOFF"
    """The agent logged off."""
    PAUSE = "PAUSE"
    """The agent stopped taking calls (break, lunch, ...); reason in ``data["reason"]``."""
    UNPAUSE = "UNPAUSE"
    """The agent takes calls again."""
    WRAPUPSTART = "WRAPUPSTART"
    """The agent started after-call work on the call."""
    WRAPUPEND = "WRAPUPEND"
    """The agent finished after-call work."""
    HOLD = "HOLD"
    """The agent put the caller on hold."""
    UNHOLD = "UNHOLD"
    """The agent took the caller off hold."""
    DISPOSITION = "DISPOSITION"
    """The agent recorded the outcome of the call; code in ``data["code"]``."""


#: Names of the positional ``queue_log`` data fields of each verb (Asterisk order). Verbs not
#: listed carry no data. Numeric fields are converted to ``float`` by ``parse_queue_log_line``.
DATA_FIELDS: Mapping[QueueVerb, tuple[str, ...]] = {
    QueueVerb.ENTERQUEUE: ("url", "caller_id", "position"),
    QueueVerb.CONNECT: ("wait", "bridged_call_id", "ring"),
    QueueVerb.COMPLETECALLER: ("wait", "talk", "position"),
    QueueVerb.COMPLETEAGENT: ("wait", "talk", "position"),
    QueueVerb.TRANSFER: ("extension", "context", "wait", "talk", "position"),
    QueueVerb.ABANDON: ("position", "original_position", "wait"),
    QueueVerb.EXITWITHTIMEOUT: ("position", "original_position", "wait"),
    QueueVerb.EXITEMPTY: ("position", "original_position", "wait"),
    QueueVerb.EXITWITHKEY: ("key", "position", "original_position", "wait"),
    QueueVerb.RINGNOANSWER: ("ring_ms",),
    QueueVerb.AGENTLOGIN: ("channel",),
    QueueVerb.AGENTLOGOFF: ("channel", "logged_in"),
    QueueVerb.PAUSE: ("reason",),
    QueueVerb.UNPAUSE: ("reason",),
    QueueVerb.DISPOSITION: ("code",),
}
_NUMERIC = frozenset({"wait", "talk", "ring", "ring_ms", "position", "original_position",
                      "logged_in"})

#: ``queue_log`` writes "NONE" where a line has no call or no agent.
NONE = "NONE"
#: Longest ``queue_log`` line accepted, bytes; a longer one is an error, never a larger buffer.
MAX_LINE = 4096


@dataclass(frozen=True)
class QueueEvent:
    """One entry of the queue event log."""

    at: float
    """When it happened, seconds since the epoch."""
    call_id: str
    """The call it concerns; "" for agent events (login, pause, ...)."""
    queue: str
    """The queue it concerns; "" when none."""
    agent: str
    """The agent it concerns; "" when none (the caller is still waiting)."""
    caller: str
    """Who called (caller id number), the key of first-contact resolution; "" if unknown."""
    verb: QueueVerb
    """What happened."""
    data: Mapping[str, object] = field(default_factory=dict, hash=False)
    """Verb-specific details named as in ``DATA_FIELDS`` (``reason``, ``code``, ...)."""
    site: str = ""
    """The site the event comes from."""

    def __post_init__(self) -> None:
        if not isinstance(self.verb, QueueVerb):
            raise EventError(f"verb must be a QueueVerb, got {self.verb!r}")
        if not isinstance(self.at, (int, float)) or not math.isfinite(self.at):
            raise EventError(f"at must be a finite number of seconds, got {self.at!r}")


@dataclass(frozen=True)
class ComponentEvent:
    """A component of a site (SIP service, media engine, trunk, edge agent, ...) went up or
    down; uptime is computed from these."""

    at: float
    """When, seconds since the epoch."""
    component: str
    """Which component, e.g. "sip", "media", "trunk:carrier-a"."""
    up: bool
    """True when it came up, False when it went down."""
    site: str = ""
    """The site of the component."""


def parse_queue_log_line(line: str, *, site: str = "") -> QueueEvent:
    """One ``queue_log`` line as a ``QueueEvent``; raises ``EventError`` naming the field."""
    if len(line) > MAX_LINE:
        raise EventError(f"queue_log line longer than {MAX_LINE} characters")
    parts = line.rstrip("\r\n").split("|")
    if len(parts) < 5:
        raise EventError(f"queue_log line needs at least 5 fields separated by |, got "
                         f"{len(parts)}: {line[:80]!r}")
    at_text, call_id, queue, agent, verb_text, *data = parts
    try:
        at = float(at_text)
    except ValueError:
        raise EventError(f"time field is not a number: {at_text[:40]!r}") from None
    try:
        verb = QueueVerb(verb_text)
    except ValueError:
        raise EventError(f"unknown queue_log verb {verb_text[:40]!r}") from None
    named: dict[str, object] = {}
    caller = ""
    for name, value in zip(DATA_FIELDS.get(verb, ()), data, strict=False):
        if value == "":
            continue
        if name in _NUMERIC:
            try:
                named[name] = float(value)
            except ValueError:
                raise EventError(f"{verb.value} field {name} is not a number: "
                                 f"{value[:40]!r}") from None
        else:
            named[name] = value
        if name == "caller_id":
            caller = value
    return QueueEvent(
        at=at, call_id="" if call_id == NONE else call_id, queue="" if queue == NONE else queue,
        agent="" if agent == NONE else agent, caller=caller, verb=verb, data=named, site=site,
    )


def read_queue_log(lines: Iterable[str], *, site: str = "") -> Iterator[QueueEvent]:
    """Every event of a ``queue_log`` text; blank lines are skipped and a malformed line raises
    ``EventError`` carrying its line number."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield parse_queue_log_line(line, site=site)
        except EventError as exc:
            raise EventError(f"line {number}: {exc}") from None


def format_queue_log_line(event: QueueEvent) -> str:
    """The ``queue_log`` line of an event (no newline); the inverse of
    ``parse_queue_log_line`` for the fields ``queue_log`` has."""
    values = []
    for name in DATA_FIELDS.get(event.verb, ()):
        value = event.data.get(name, "")
        if name == "caller_id" and not value:
            value = event.caller
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        values.append(str(value))
    while values and values[-1] == "":
        values.pop()
    at = int(event.at) if float(event.at).is_integer() else event.at
    head = [str(at), event.call_id or NONE, event.queue or NONE, event.agent or NONE,
            event.verb.value]
    return "|".join(head + values)
