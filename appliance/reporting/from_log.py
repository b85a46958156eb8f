"""The site's event log read as queue events: the bridge from what call control and the agent
desk write (``queue.*``, ``agent.*``, ``call.*`` kinds, see docs/calls.md and docs/acd.md) to
the Asterisk ``queue_log`` verbs the KPI engine, the wallboard and the alerts read.

``to_queue_events`` maps one event-log row (kind, payload, time) and is shared by the live feed
(``on_event`` callbacks) and the readers of the database, so a report rebuilt from the log and
the live board count the same things.

| event-log kind | queue verb |
| --- | --- |
| ``queue.enter`` | ``ENTERQUEUE`` (``caller_id`` = caller) |
| ``queue.connect`` | ``CONNECT`` (``wait``, ``ring`` from ``wait_s``, ``ring_s``) |
| ``queue.complete`` | ``COMPLETECALLER`` when the caller hung up, ``TRANSFER`` when transferred, else ``COMPLETEAGENT`` (``talk`` from ``talk_s``) |
| ``queue.abandon`` | ``ABANDON``; with ``overflow``: ``EXITEMPTY`` (no agents) or ``EXITWITHTIMEOUT`` |
| ``queue.ring_no_answer`` | ``RINGNOANSWER`` |
| ``call.hold`` / ``call.resume`` | ``HOLD`` / ``UNHOLD`` |
| ``agent.login`` / ``agent.logout`` | ``AGENTLOGIN`` / ``AGENTLOGOFF`` |
| ``agent.pause`` / ``agent.unpause`` | ``PAUSE`` / ``UNPAUSE`` (``reason``) |
| ``agent.wrapup_start`` / ``agent.wrapup_end`` | ``WRAPUPSTART`` / ``WRAPUPEND`` |
| ``agent.disposition`` | ``DISPOSITION`` (``code``) |

Component availability (uptime per component, docs/kpis.md) comes from ``component.up`` /
``component.down`` rows {component, detail} through ``to_component_event`` and
``component_events_from_db``; the appliance writes them for ``appliance``, ``trunk`` and
``cloud-link`` on each change of state (``appliance.app.ComponentLog``).

``call.record`` (the summary row of a finished call), ``call.transfer`` and every other kind
give no queue event: their facts are carried by the queue events of the same call (a
transferred call's talk ends with its ``queue.complete``, ``ended_by`` ``transferred``). As in ``queue_log``,
only ``ENTERQUEUE`` carries the caller, so an exported ``queue_log`` reads back identically.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import sqlite_utils

from appliance.reporting.events import ComponentEvent, EventError, QueueEvent, QueueVerb

#: Event-log kinds that give queue events; the database readers fetch only these.
QUEUE_KINDS = (
    "queue.enter", "queue.connect", "queue.complete", "queue.abandon", "queue.ring_no_answer",
    "call.hold", "call.resume", "agent.login", "agent.logout", "agent.pause", "agent.unpause",
    "agent.wrapup_start", "agent.wrapup_end", "agent.disposition",
)
#: Event-log kinds that say a component of the site (``appliance``, ``sip``, ``trunk``,
#: ``cloud-link``, ...) came up or went down.
COMPONENT_KINDS = ("component.up", "component.down")
#: Longest component name accepted.
MAX_COMPONENT_CHARS = 64
#: Rows fetched per database round trip while reading the log.
BATCH_ROWS = 20_000

# ``queue.complete`` carries the call's end reason (appliance.calls.leg.EndReason values): the
# caller's own hang-up is COMPLETECALLER, a transfer TRANSFER, anything else the agent's side.
_COMPLETE_BY = {"caller-hung-up": QueueVerb.COMPLETECALLER,
                "cancelled": QueueVerb.COMPLETECALLER,
                "transferred": QueueVerb.TRANSFER}
# The router's overflow reasons (appliance.acd.model.OverflowReason): an empty queue is
# Asterisk's EXITEMPTY, every other rule a timeout-like exit.
_OVERFLOW_EMPTY = "no-agents"


def _text(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    return "" if value is None else str(value)


def _seconds(payload: Mapping[str, Any], key: str) -> float | None:
    value = payload.get(key)
    if value is None or isinstance(value, bool):
        return None
    if not isinstance(value, (int, float)):
        raise EventError(f"{key} must be a number of seconds, got {value!r}")
    return float(value)


def _data(**values: object) -> dict[str, object]:
    return {k: v for k, v in values.items() if v is not None and v != ""}


def _enter(payload: Mapping[str, Any], at: float, site: str) -> list[QueueEvent]:
    caller = _text(payload, "caller")
    return [QueueEvent(at, _text(payload, "call_id"), _text(payload, "queue"), "", caller,
                       QueueVerb.ENTERQUEUE, _data(caller_id=caller), site)]


def _connect(payload: Mapping[str, Any], at: float, site: str) -> list[QueueEvent]:
    return [QueueEvent(at, _text(payload, "call_id"), _text(payload, "queue"),
                       _text(payload, "agent"), "", QueueVerb.CONNECT,
                       _data(wait=_seconds(payload, "wait_s"), ring=_seconds(payload, "ring_s")),
                       site)]


def complete_verb(ended_by: object) -> QueueVerb:
    """The verb of a ``queue.complete`` row with this ``ended_by``."""
    return _COMPLETE_BY.get(str(ended_by), QueueVerb.COMPLETEAGENT)


def abandon_verb(overflow: object) -> QueueVerb:
    """The verb of a ``queue.abandon`` row with this ``overflow`` (None: the caller hung up)."""
    if overflow is None:
        return QueueVerb.ABANDON
    return QueueVerb.EXITEMPTY if overflow == _OVERFLOW_EMPTY else QueueVerb.EXITWITHTIMEOUT


def _complete(payload: Mapping[str, Any], at: float, site: str) -> list[QueueEvent]:
    verb = complete_verb(payload.get("ended_by"))
    talk = _seconds(payload, "talk_s")
    data = (_data(extension=_text(payload, "target"), talk=talk) if verb is QueueVerb.TRANSFER
            else _data(talk=talk))
    return [QueueEvent(at, _text(payload, "call_id"), _text(payload, "queue"),
                       _text(payload, "agent"), "", verb, data, site)]


def _abandon(payload: Mapping[str, Any], at: float, site: str) -> list[QueueEvent]:
    verb = abandon_verb(payload.get("overflow"))
    return [QueueEvent(at, _text(payload, "call_id"), _text(payload, "queue"), "", "", verb,
                       _data(wait=_seconds(payload, "wait_s")), site)]


def _call_verb(verb: QueueVerb) -> Callable[[Mapping[str, Any], float, str], list[QueueEvent]]:
    def convert(payload: Mapping[str, Any], at: float, site: str) -> list[QueueEvent]:
        return [QueueEvent(at, _text(payload, "call_id"), _text(payload, "queue"),
                           _text(payload, "agent"), "", verb, {}, site)]
    return convert


def _agent_verb(verb: QueueVerb,
                field: str | None = None) -> Callable[[Mapping[str, Any], float, str],
                                                      list[QueueEvent]]:
    def convert(payload: Mapping[str, Any], at: float, site: str) -> list[QueueEvent]:
        agent = _text(payload, "agent")
        if not agent:
            raise EventError(f"{verb.value}: the payload names no agent")
        data = _data(**{field: _text(payload, field)}) if field else {}
        return [QueueEvent(at, _text(payload, "call_id"), _text(payload, "queue"), agent, "",
                           verb, data, site)]
    return convert


_CONVERTERS: Mapping[str, Callable[[Mapping[str, Any], float, str], list[QueueEvent]]] = {
    "queue.enter": _enter,
    "queue.connect": _connect,
    "queue.complete": _complete,
    "queue.abandon": _abandon,
    "queue.ring_no_answer": _call_verb(QueueVerb.RINGNOANSWER),
    "call.hold": _call_verb(QueueVerb.HOLD),
    "call.resume": _call_verb(QueueVerb.UNHOLD),
    "agent.login": _agent_verb(QueueVerb.AGENTLOGIN),
    "agent.logout": _agent_verb(QueueVerb.AGENTLOGOFF),
    "agent.pause": _agent_verb(QueueVerb.PAUSE, "reason"),
    "agent.unpause": _agent_verb(QueueVerb.UNPAUSE),
    "agent.wrapup_start": _agent_verb(QueueVerb.WRAPUPSTART),
    "agent.wrapup_end": _agent_verb(QueueVerb.WRAPUPEND),
    "agent.disposition": _agent_verb(QueueVerb.DISPOSITION, "code"),
}
assert set(_CONVERTERS) == set(QUEUE_KINDS)


def to_queue_events(kind: str, payload: Mapping[str, Any], at: float, *,
                    site: str = "") -> list[QueueEvent]:
    """The queue events of one event-log row; ``[]`` for kinds that carry none.

    Raises ``EventError`` naming the field when a queue or agent row is malformed (payload
    not a mapping, a wait that is not a number, an agent event without an agent).
    """
    convert = _CONVERTERS.get(kind)
    if convert is None:
        return []
    if not isinstance(payload, Mapping):
        raise EventError(f"{kind}: payload must be a JSON object, got {type(payload).__name__}")
    return convert(payload, at, site)


def queue_events_from_db(db: sqlite_utils.Database, since: float | None = None,
                         until: float | None = None) -> Iterator[QueueEvent]:
    """Every queue event of the site's log with ``since <= at < until``, in time order.

    Call control writes a call's events when the call ends, so the log is in time order per
    call only; the rows are read ordered by time (ties in log order). A malformed row raises
    ``EventError`` carrying its seq.
    """
    placeholders = ",".join("?" * len(QUEUE_KINDS))
    low = float("-inf") if since is None else float(since)
    high = float("inf") if until is None else float(until)
    after: tuple[float, int] = (low, -1)
    while True:
        rows = db.conn.execute(
            f"SELECT seq, site_id, kind, occurred_at, payload FROM events "
            f"WHERE kind IN ({placeholders}) AND occurred_at >= ? AND "
            f"(occurred_at > ? OR seq > ?) AND occurred_at < ? "
            f"ORDER BY occurred_at, seq LIMIT ?",
            (*QUEUE_KINDS, after[0], after[0], after[1], high, BATCH_ROWS)).fetchall()
        for seq, site, kind, at, text in rows:
            yield from _row_events(seq, site, kind, at, text)
        if len(rows) < BATCH_ROWS:
            return
        after = (float(rows[-1][3]), int(rows[-1][0]))


def _row_events(seq: int, site: str, kind: str, at: float, text: str) -> list[QueueEvent]:
    try:
        return to_queue_events(kind, json.loads(text), float(at), site=str(site))
    except (EventError, ValueError) as exc:
        raise EventError(f"event seq {seq} ({kind}): {exc}") from None


def queue_events_after(db: sqlite_utils.Database, after_seq: int,
                       limit: int = BATCH_ROWS) -> tuple[list[tuple[int, QueueEvent]], int]:
    """Queue events of rows with seq above ``after_seq`` in log order, at most ``limit`` rows
    read: ``([(seq, event), ...], last seq read)``. For consumers that follow the log."""
    rows = db.conn.execute(
        "SELECT seq, site_id, kind, occurred_at, payload FROM events WHERE seq > ? "
        "ORDER BY seq LIMIT ?", (after_seq, limit)).fetchall()
    out: list[tuple[int, QueueEvent]] = []
    for seq, site, kind, at, text in rows:
        if kind in _CONVERTERS:
            out.extend((int(seq), e) for e in _row_events(seq, site, kind, at, text))
    return out, int(rows[-1][0]) if rows else after_seq


def to_component_event(kind: str, payload: Mapping[str, Any], at: float, *,
                       site: str = "") -> ComponentEvent | None:
    """The ComponentEvent of a ``component.up`` / ``component.down`` row; None for other
    kinds. Raises ``EventError`` naming the field when the row is malformed."""
    if kind not in COMPONENT_KINDS:
        return None
    if not isinstance(payload, Mapping):
        raise EventError(f"{kind}: payload must be a JSON object, got {type(payload).__name__}")
    component = payload.get("component")
    if not isinstance(component, str) or not 0 < len(component) <= MAX_COMPONENT_CHARS:
        raise EventError(f"{kind}: component must be a name of 1 to {MAX_COMPONENT_CHARS} "
                         f"characters, got {component!r}")
    return ComponentEvent(float(at), component, kind == "component.up", site)


def component_events_from_db(db: sqlite_utils.Database, since: float | None = None,
                             until: float | None = None) -> list[ComponentEvent]:
    """Every component event of the site's log with ``since <= at < until``, in time order
    (they are few: one per start, stop or change of state)."""
    low = float("-inf") if since is None else float(since)
    high = float("inf") if until is None else float(until)
    rows = db.conn.execute(
        "SELECT seq, site_id, kind, occurred_at, payload FROM events WHERE kind IN (?, ?) "
        "AND occurred_at >= ? AND occurred_at < ? ORDER BY occurred_at, seq",
        (*COMPONENT_KINDS, low, high)).fetchall()
    out = []
    for seq, site, kind, at, text in rows:
        try:
            event = to_component_event(kind, json.loads(text), float(at), site=str(site))
        except (EventError, ValueError) as exc:
            raise EventError(f"event seq {seq} ({kind}): {exc}") from None
        if event is not None:
            out.append(event)
    return out
