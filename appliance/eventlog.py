"""The site's append-only event log and its outbox to the cloud.

Every event gets ``seq``, strictly increasing per site and never handed out twice; the cloud
keeps one copy per ``(site_id, seq)`` and acknowledges the highest contiguous ``seq`` it stored
(docs/cloud.md, "Ingest semantics"). An event appended with its outbox row is owed to the cloud
until acknowledged; the edge agent relays the outbox and deletes acknowledged rows.

``append`` joins the caller's open transaction, so a call record, its queue events and their
outbox rows commit together::

    with eventlog.transaction(db):
        db.conn.execute("INSERT INTO call_records ...")
        eventlog.append(db, "queue.enter", {...}, occurred_at=now)
        eventlog.append(db, "call.record", {...}, occurred_at=now)

Outside a transaction ``append`` commits on its own.

Every ``seq`` reaches the cloud, because its acknowledgement cannot pass a gap: an event without
an outbox row (appended with ``with_outbox=False``, or whose row the quota policy dropped) is
read back as *withheld* and the edge agent sends a placeholder for it.

Priorities: kinds of call records, queue and agent events are ``ESSENTIAL`` and never dropped;
``stats.*`` samples are ``DROPPABLE`` by default; everything else is ``NORMAL`` (kept).
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from appliance.dbwriter import atomic, in_batch

MAX_PAYLOAD_BYTES = 256 * 1024
"""Largest payload (UTF-8 JSON); the cloud refuses anything bigger (docs/cloud.md, limits)."""
MAX_KIND_CHARS = 64

ESSENTIAL, NORMAL, DROPPABLE = 0, 1, 2
"""Outbox priorities: lower is more important; only ``DROPPABLE`` and above may be dropped."""

ESSENTIAL_PREFIXES = ("call.", "queue.", "agent.", "callback.", "voicemail.")
"""Call records, queue, agent, queued-callback and voicemail events: never dropped, whatever
the caller asks."""
DROPPABLE_PREFIXES = ("stats.",)

_KIND = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$")


class EventLogError(Exception):
    """The caller misused the event log (bad kind, payload, site id); nothing was written."""


@dataclass(frozen=True)
class PendingEvent:
    """One event the cloud has not acknowledged yet, as the relay sends it."""

    seq: int
    """Position in the site's log."""
    site_id: str
    """Site the event belongs to."""
    kind: str
    """What happened, e.g. ``queue.enter``."""
    occurred_at: float
    """When it happened, seconds since the epoch."""
    payload: bytes
    """UTF-8 JSON as stored."""
    withheld: bool
    """No outbox row: only a placeholder is sent for this seq, never the payload."""
    enqueued_at: float | None
    """When its outbox row was written (None when withheld)."""


@dataclass(frozen=True)
class LinkState:
    """The edge agent's last word on the link, for the appliance to show."""

    state: str
    """``online``, ``degraded`` or ``offline``."""
    since: float
    """When the link entered this state."""
    acked_seq: int
    """Highest seq the cloud acknowledged."""
    lag_events: int
    """Events appended but not acknowledged."""
    lag_seconds: float
    """Age of the oldest unacknowledged event (0 when none)."""
    detail: str
    """Why, in words (empty when online and nothing to say)."""
    outbox_bytes: int
    """Payload bytes still owed to the cloud."""
    dropped_events: int
    """Outbox rows given up by the quota policy since the site began."""
    dropped_bytes: int
    """Their payload bytes."""
    updated_at: float
    """When the edge agent last wrote this row."""


def default_priority(kind: str) -> int:
    """The outbox priority of a kind when the caller does not choose one."""
    if kind.startswith(ESSENTIAL_PREFIXES):
        return ESSENTIAL
    if kind.startswith(DROPPABLE_PREFIXES):
        return DROPPABLE
    return NORMAL


def check_kind(kind: str) -> str:
    """Return ``kind`` when it is a valid event kind, else raise EventLogError."""
    if not isinstance(kind, str) or not 1 <= len(kind) <= MAX_KIND_CHARS or not _KIND.match(kind):
        raise EventLogError(
            f"event kind must be 1 to {MAX_KIND_CHARS} characters of lower-case words joined "
            f"by dots (e.g. queue.enter), got {kind!r}"
        )
    return kind


def encode_payload(payload: Any) -> str:
    """The stored JSON text of a payload; EventLogError when it is not JSON or too big."""
    try:
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EventLogError(f"event payload is not JSON-serialisable: {exc}") from None
    size = len(text.encode("utf-8"))
    if size > MAX_PAYLOAD_BYTES:
        raise EventLogError(
            f"event payload of {size} bytes is over the {MAX_PAYLOAD_BYTES}-byte limit"
        )
    return text


@contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """A write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error.

    IMMEDIATE takes the write lock at once, so a concurrent writer (the edge agent's short
    bookkeeping transactions) waits on the busy timeout instead of failing an upgrade.

    Inside a ``DatabaseWriter`` job (``appliance.dbwriter``) it is a savepoint of the batch's
    transaction instead: all or nothing as well, committed (durable) with the batch.
    """
    conn = db.conn
    if in_batch(conn):
        with atomic(conn):
            yield conn
        return
    if conn.in_transaction:
        raise EventLogError("a transaction is already open on this connection")
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def bind_site(db: sqlite_utils.Database, site_id: str) -> None:
    """Record which site this log belongs to; refuse to change it once events exist."""
    if not site_id:
        raise EventLogError("site id must not be empty")
    conn = db.conn
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN IMMEDIATE")
    try:
        _bind(conn, site_id)
    except BaseException:
        if own:
            conn.execute("ROLLBACK")
        raise
    if own:
        conn.execute("COMMIT")


def _bind(conn: sqlite3.Connection, site_id: str) -> str:
    row = conn.execute("SELECT site_id FROM event_site WHERE id = 1").fetchone()
    if row is None:
        conn.execute("INSERT INTO event_site (id, site_id) VALUES (1, ?)", (site_id,))
        return site_id
    if row[0] != site_id:
        has_events = conn.execute("SELECT 1 FROM events LIMIT 1").fetchone() is not None
        if has_events:
            raise EventLogError(
                f"this event log belongs to site {row[0]!r}, not {site_id!r}: the cloud keys "
                "events on (site, seq), so a site's log cannot change hands"
            )
        conn.execute("UPDATE event_site SET site_id = ? WHERE id = 1", (site_id,))
    return site_id


def bound_site(db: sqlite_utils.Database) -> str | None:
    """The site this log belongs to, or None before the first ``bind_site``."""
    row = db.conn.execute("SELECT site_id FROM event_site WHERE id = 1").fetchone()
    return None if row is None else str(row[0])


def append(
    db: sqlite_utils.Database,
    kind: str,
    payload: Any,
    *,
    occurred_at: float,
    with_outbox: bool = True,
    priority: int | None = None,
    site_id: str | None = None,
    now: float | None = None,
) -> int:
    """Append one event (and its outbox row) and return its seq.

    Joins the connection's open transaction if there is one (the caller commits); otherwise
    commits on its own. ``site_id`` defaults to the site bound with ``bind_site`` (and binds it
    when none is). ``priority`` defaults to ``default_priority(kind)``; call, queue and agent
    kinds are always ``ESSENTIAL``. ``now`` stamps the outbox row (default: the wall clock).
    Raises EventLogError, having written nothing, for a bad kind, payload or site id.
    """
    check_kind(kind)
    text = encode_payload(payload)
    if priority is None:
        priority = default_priority(kind)
    elif kind.startswith(ESSENTIAL_PREFIXES) and priority != ESSENTIAL:
        raise EventLogError(f"{kind} events are essential and cannot take priority {priority}")
    elif priority < ESSENTIAL:
        raise EventLogError(f"priority must be >= {ESSENTIAL}, got {priority}")
    conn = db.conn
    own = not conn.in_transaction
    if own:
        conn.execute("BEGIN IMMEDIATE")
    try:
        site = _site_for_append(conn, site_id)
        cursor = conn.execute(
            "INSERT INTO events (site_id, kind, occurred_at, payload) VALUES (?, ?, ?, ?)",
            (site, kind, float(occurred_at), text),
        )
        seq = int(cursor.lastrowid or 0)
        if with_outbox:
            conn.execute(
                "INSERT INTO outbox (seq, priority, enqueued_at, bytes) VALUES (?, ?, ?, ?)",
                (seq, priority, time.time() if now is None else now, len(text.encode("utf-8"))),
            )
    except BaseException:
        if own:
            conn.execute("ROLLBACK")
        raise
    if own:
        conn.execute("COMMIT")
    return seq


def _site_for_append(conn: sqlite3.Connection, site_id: str | None) -> str:
    row = conn.execute("SELECT site_id FROM event_site WHERE id = 1").fetchone()
    if site_id is None:
        if row is None:
            raise EventLogError(
                "no site bound to this event log: call bind_site(db, site_id) first"
            )
        return str(row[0])
    if row is None or row[0] != site_id:
        return _bind(conn, site_id)
    return site_id


def read_pending(db: sqlite_utils.Database, after_seq: int, limit: int) -> list[PendingEvent]:
    """Up to ``limit`` events with seq above ``after_seq``, in seq order.

    Events without an outbox row come back ``withheld``: the relay sends a placeholder so the
    cloud's contiguous acknowledgement can pass them.
    """
    if limit < 1:
        raise EventLogError(f"limit must be at least 1, got {limit}")
    rows = db.conn.execute(
        "SELECT e.seq, e.site_id, e.kind, e.occurred_at, e.payload, o.seq, o.enqueued_at "
        "FROM events AS e LEFT JOIN outbox AS o ON o.seq = e.seq "
        "WHERE e.seq > ? ORDER BY e.seq LIMIT ?",
        (after_seq, limit),
    ).fetchall()
    return [
        PendingEvent(
            seq=int(seq), site_id=str(site), kind=str(kind), occurred_at=float(occurred),
            payload=str(payload).encode("utf-8"), withheld=queued is None,
            enqueued_at=None if enqueued is None else float(enqueued),
        )
        for seq, site, kind, occurred, payload, queued, enqueued in rows
    ]


def acknowledge(db: sqlite_utils.Database, upto_seq: int) -> int:
    """Delete the outbox rows with seq up to ``upto_seq`` (acknowledged); return how many."""
    with _own_transaction(db.conn) as conn:
        cursor = conn.execute("DELETE FROM outbox WHERE seq <= ?", (upto_seq,))
    return int(cursor.rowcount)


def outbox_bytes(db: sqlite_utils.Database) -> int:
    """Payload bytes of every row still in the outbox."""
    row = db.conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM outbox").fetchone()
    return int(row[0])


def last_seq(db: sqlite_utils.Database) -> int:
    """The highest seq ever appended (0 for an empty log)."""
    row = db.conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
    return int(row[0])


def drop_for_quota(db: sqlite_utils.Database, quota_bytes: int) -> tuple[int, int]:
    """Drop droppable outbox rows until the outbox fits ``quota_bytes``; return (rows, bytes).

    Lowest priority first, oldest first within a priority. Rows below ``DROPPABLE`` are never
    dropped, so the outbox may stay over quota when only essential events remain.
    """
    dropped_rows = dropped_bytes = 0
    with _own_transaction(db.conn) as conn:
        total = int(conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM outbox").fetchone()[0])
        if total <= quota_bytes:
            return 0, 0
        candidates = conn.execute(
            "SELECT seq, bytes FROM outbox WHERE priority >= ? ORDER BY priority DESC, seq",
            (DROPPABLE,),
        ).fetchall()
        doomed: list[int] = []
        for seq, size in candidates:
            if total <= quota_bytes:
                break
            doomed.append(int(seq))
            total -= int(size)
            dropped_bytes += int(size)
        for start in range(0, len(doomed), 500):
            part = doomed[start : start + 500]
            conn.execute(
                f"DELETE FROM outbox WHERE seq IN ({','.join('?' * len(part))})", part
            )
        dropped_rows = len(doomed)
    return dropped_rows, dropped_bytes


def write_link_state(db: sqlite_utils.Database, state: LinkState) -> None:
    """Replace the link state row (the edge agent's bookkeeping)."""
    with _own_transaction(db.conn) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO link_state (id, state, since, acked_seq, lag_events, "
            "lag_seconds, detail, outbox_bytes, dropped_events, dropped_bytes, updated_at) "
            "VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (state.state, state.since, state.acked_seq, state.lag_events, state.lag_seconds,
             state.detail, state.outbox_bytes, state.dropped_events, state.dropped_bytes,
             state.updated_at),
        )


def read_link_state(db: sqlite_utils.Database) -> LinkState | None:
    """The link state last written by the edge agent, or None when it never ran."""
    row = db.conn.execute(
        "SELECT state, since, acked_seq, lag_events, lag_seconds, detail, outbox_bytes, "
        "dropped_events, dropped_bytes, updated_at FROM link_state WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    return LinkState(str(row[0]), float(row[1]), int(row[2]), int(row[3]), float(row[4]),
                     str(row[5]), int(row[6]), int(row[7]), int(row[8]), float(row[9]))


@contextmanager
def _own_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """Join an open transaction, or run a short IMMEDIATE one of our own."""
    if conn.in_transaction:
        yield conn
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
