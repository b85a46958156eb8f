"""The cloud's database: sites, enrolment tokens, certificates, events, backups, configs.

``CloudStore`` is the interface the server uses; ``SqliteCloudStore`` implements it on one SQLite
file (WAL, ``synchronous=FULL``: an acknowledged event survives power loss), and
``cloud_bridge.pg.PostgresCloudStore`` on PostgreSQL. ``open_store(url)`` picks the implementation
by URL.

Every method is blocking and short; the server calls them from one worker thread, never from
its event loop.

Ingest: ``(site_id, seq)`` is the primary key of ``events``; a duplicate is absorbed by
``INSERT OR IGNORE``. The acknowledgement of a site is the highest ``seq`` such that every seq
from 1 to it is stored; it only moves forward, past held events once a gap is filled.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from itertools import chain, repeat
from pathlib import Path
from typing import Any, Protocol

import sqlite_utils

# ------------------------------------------------------------------- records


@dataclass(frozen=True)
class EventRecord:
    """One event of a site's log."""

    site_id: str
    """The site that produced it."""
    seq: int
    """Position in the site's log, from 1."""
    kind: str
    """What happened, e.g. ``queue.enter``."""
    payload: bytes
    """Opaque content."""
    occurred_at: float
    """When it happened at the site (Unix seconds)."""


@dataclass(frozen=True)
class EventColumns:
    """A batch of one site's events, one sequence per field: event ``i`` is
    ``(seqs[i], kinds[i], payloads[i], occurred_at[i])``.

    The form ingest works on: a batch is checked and inserted without an object per event.
    """

    site_id: str
    seqs: Sequence[int]
    kinds: Sequence[str]
    payloads: Sequence[bytes]
    occurred_at: Sequence[float]

    def __post_init__(self) -> None:
        count = len(self.seqs)
        if not (len(self.kinds) == len(self.payloads) == len(self.occurred_at) == count):
            raise StoreError("the columns of an event batch differ in length")

    def __len__(self) -> int:
        return len(self.seqs)

    @classmethod
    def from_records(cls, events: Sequence[EventRecord]) -> EventColumns:
        """The columns of ``events``, which must all belong to one site."""
        if not events:
            raise StoreError("empty batch")
        site_id = events[0].site_id
        if any(e.site_id != site_id for e in events):
            raise StoreError("a batch holds the events of one site")
        return cls(site_id, [e.seq for e in events], [e.kind for e in events],
                   [e.payload for e in events], [e.occurred_at for e in events])

    def rows(self, now: float) -> Iterable[tuple[str, int, str, bytes, float, float]]:
        """``(site_id, seq, kind, payload, occurred_at, received_at)`` per event, lazily."""
        return zip(repeat(self.site_id), self.seqs, self.kinds, self.payloads,
                   self.occurred_at, repeat(now))

    def subset(self, keep: Iterable[int]) -> EventColumns:
        """The events at the positions ``keep``, in that order."""
        index = list(keep)
        return EventColumns(self.site_id, [self.seqs[i] for i in index],
                            [self.kinds[i] for i in index], [self.payloads[i] for i in index],
                            [self.occurred_at[i] for i in index])


@dataclass(frozen=True)
class Admission:
    """Which events of a batch a store inserts, given the site's ack (see ``admit``)."""

    fresh: EventColumns
    """Above the ack and within the window, the first copy of each seq, in batch order."""
    refused: int
    """Beyond the window: not stored."""
    contiguous_to: int
    """The ack once ``fresh`` is stored, before walking over held events: the batch's end
    when it continues the log without a gap (every seq up to it is then stored), else the
    current ack."""


def admit(batch: EventColumns, acked: int, window: int) -> Admission:
    """Decide what of ``batch`` to insert for a site acknowledged up to ``acked``.

    Store-independent half of ingest (docs/cloud.md, "Ingest semantics"): events at or below
    the ack are duplicates, events more than ``window`` past it are refused, the first copy of
    a seq wins. The usual batch, exactly the seqs ``acked+1 .. acked+n`` in order, is admitted
    whole without looking at each event.
    """
    seqs = batch.seqs
    count = len(seqs)
    if not count:
        raise StoreError("empty batch")
    first, last = seqs[0], seqs[-1]
    # n distinct integers spanning exactly n values are that range; the C-level checks keep
    # the common case free of per-event Python work.
    if (first == acked + 1 and last == acked + count and count <= window
            and len(set(seqs)) == count):
        return Admission(batch, 0, last)
    keep: dict[int, int] = {}
    refused = 0
    for index, seq in enumerate(seqs):
        if seq <= acked:
            continue
        if seq > acked + window:
            refused += 1
            continue
        keep.setdefault(seq, index)
    fresh = batch.subset(keep.values())
    contiguous_to = acked
    if keep:
        low, high = min(keep), max(keep)
        if low == acked + 1 and high - acked == len(keep):
            contiguous_to = high
    return Admission(fresh, refused, contiguous_to)


def as_columns(events: Sequence[EventRecord] | EventColumns) -> EventColumns:
    """``events`` as columns (a StoreError for an empty batch or one of several sites)."""
    if isinstance(events, EventColumns):
        if not len(events):
            raise StoreError("empty batch")
        return events
    return EventColumns.from_records(events)


@dataclass(frozen=True)
class IngestResult:
    """What one batch of events did to the store."""

    acked_seq: int
    """Highest contiguous seq stored after the batch."""
    stored: int
    """Events newly stored."""
    duplicates: int
    """Events already present, absorbed."""
    refused: int
    """Events beyond the reorder window, not stored (the site sends them again later)."""


@dataclass(frozen=True)
class SiteSummary:
    """A site as the console lists it."""

    site_id: str
    """Site id."""
    created_at: float
    """When the site first appeared (token or event)."""
    last_seen_at: float | None
    """Last event or link activity."""
    acked_seq: int
    """Highest contiguous seq stored."""
    held_events: int
    """Events stored beyond a gap."""
    certificate_serial: int | None
    """Serial of the newest certificate issued, if any."""
    certificate_not_after: float | None
    """End of that certificate's validity."""


@dataclass(frozen=True)
class SiteActivity:
    """What the console shows of a site's event flow."""

    site_id: str
    """Site id."""
    newest_seq: int
    """Highest seq stored, held events included (0 when none)."""
    acked_occurred_at: float | None
    """When the acknowledged event (seq = ack) happened at the site."""
    acked_received_at: float | None
    """When the cloud stored it."""
    events_by_kind: Mapping[str, int] = field(default_factory=dict)
    """Stored events per kind."""


@dataclass(frozen=True)
class BackupRecord:
    """A backup of a site, partial (upload in progress) or complete."""

    site_id: str
    """Owner site."""
    backup_id: str
    """Site-chosen id."""
    complete: bool
    """True once the SHA-256 matched and the file is in place."""
    committed: int
    """Bytes durably written."""
    sha256: bytes | None
    """SHA-256 of the whole backup (complete only)."""
    started_at: float
    """When the first chunk arrived."""
    completed_at: float | None
    """When it became complete."""


@dataclass(frozen=True)
class ConfigRecord:
    """One signed version of a site's config."""

    site_id: str
    """Site."""
    version: int
    """Strictly increasing per site, from 1."""
    yaml: bytes
    """The whole site.yaml."""
    signature: bytes
    """CA signature over ``proto.config_signing_payload``."""
    created_at: float
    """When it was stored."""


class TokenRejected(Exception):
    """An enrolment token is unknown, already used or expired; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"enrolment token {reason}")
        self.reason = reason


class StoreError(Exception):
    """The store cannot be opened or used as asked."""


# ------------------------------------------------------------------- interface


class CloudStore(Protocol):
    """What the cloud server needs from its database."""

    location: str
    """Where the store lives, printable (a path, or a URL without its password)."""

    def add_token(self, site_id: str, token: str, expires_at: float, now: float) -> None:
        """Record a one-time enrolment token for ``site_id`` (only its hash is kept)."""
        ...

    def redeem_token(self, token: str, now: float) -> str:
        """Use up ``token`` and return its site id; raise TokenRejected otherwise."""
        ...

    def record_certificate(self, site_id: str, serial: int, not_after: float, now: float) -> None:
        """Remember a certificate issued to a site."""
        ...

    def revoke_certificate(self, serial: int, now: float) -> bool:
        """Revoke by serial; False when the serial was already revoked."""
        ...

    def is_revoked(self, serial: int) -> bool:
        """True when the serial is on the revocation list."""
        ...

    def certificates(self, site_id: str) -> list[tuple[int, float, float | None]]:
        """(serial, not_after, revoked_at) of a site's certificates, newest first."""
        ...

    def ingest(
        self, events: Sequence[EventRecord] | EventColumns, now: float, *, window: int
    ) -> IngestResult:
        """Store a batch of one site's events exactly once; return the new ack."""
        ...

    def acked_seq(self, site_id: str) -> int:
        """Highest contiguous seq stored for the site (0 when none)."""
        ...

    def newest_seq(self, site_id: str) -> int:
        """Highest seq stored for the site, held events included (0 when none)."""
        ...

    def events(self, site_id: str, *, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Stored events of a site in seq order, from ``after + 1``."""
        ...

    def latest_event(self, site_id: str, kind: str) -> EventRecord | None:
        """The stored event of ``kind`` with the highest seq for the site, or None."""
        ...

    def queue_events(
        self, since: float, until: float, site_id: str | None = None
    ) -> list[EventRecord]:
        """Queue events (``queue.*``) that occurred in ``[since, until)``, by time, for KPIs."""
        ...

    def touch_site(self, site_id: str, now: float) -> None:
        """Note link activity of a site."""
        ...

    def sites(self) -> list[SiteSummary]:
        """Every known site."""
        ...

    def activity(self) -> list[SiteActivity]:
        """Newest seq, the acknowledged event's timing and event counts of every site."""
        ...

    def backup(self, site_id: str, backup_id: str) -> BackupRecord | None:
        """The record of one backup, or None."""
        ...

    def begin_backup(self, site_id: str, backup_id: str, now: float) -> BackupRecord:
        """Create a partial backup record (committed 0) unless one exists; return it."""
        ...

    def commit_backup_offset(self, site_id: str, backup_id: str, committed: int, now: float) -> None:
        """Move a partial backup's committed offset."""
        ...

    def complete_backup(
        self, site_id: str, backup_id: str, size: int, sha256: bytes, now: float
    ) -> None:
        """Mark a backup complete."""
        ...

    def delete_backup(self, site_id: str, backup_id: str) -> None:
        """Forget a backup record."""
        ...

    def backups(self, site_id: str | None = None) -> list[BackupRecord]:
        """Backups, newest first; complete and partial."""
        ...

    def add_config(self, site_id: str, yaml: bytes, signature_for: SignConfig, now: float,
                   *, above: int = 0) -> ConfigRecord:
        """Store the next config version of a site (above every stored one and above
        ``above``, the version the site last said it runs), signed by ``signature_for``."""
        ...

    def latest_config(self, site_id: str) -> ConfigRecord | None:
        """The newest config version of a site."""
        ...

    def config_versions(self) -> dict[str, int]:
        """The newest config version of every site that has one."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...


class SignConfig(Protocol):
    """Signs a config once its version number is known."""

    def __call__(self, site_id: str, version: int, yaml: bytes) -> bytes: ...


TOKEN_PREFIX = "ecc1_"


def make_token() -> str:
    """A new enrolment token: a prefix to recognise it and 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """What the store keeps of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------- SQLite

_MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "sites, tokens, certificates, events, backups, configs",
        (
            """CREATE TABLE sites (
                site_id TEXT PRIMARY KEY,
                created_at REAL NOT NULL,
                last_seen_at REAL,
                acked_seq INTEGER NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE enrol_tokens (
                digest TEXT PRIMARY KEY,
                site_id TEXT NOT NULL REFERENCES sites(site_id),
                created_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                used_at REAL
            )""",
            """CREATE TABLE certificates (
                serial TEXT PRIMARY KEY,
                site_id TEXT NOT NULL REFERENCES sites(site_id),
                issued_at REAL NOT NULL,
                not_after REAL NOT NULL,
                revoked_at REAL
            )""",
            "CREATE INDEX certificates_site ON certificates (site_id, issued_at)",
            # (site_id, seq) is the idempotency key of ingest.
            """CREATE TABLE events (
                site_id TEXT NOT NULL,
                seq INTEGER NOT NULL,
                kind TEXT NOT NULL,
                payload BLOB NOT NULL,
                occurred_at REAL NOT NULL,
                received_at REAL NOT NULL,
                PRIMARY KEY (site_id, seq)
            ) WITHOUT ROWID""",
            """CREATE TABLE backups (
                site_id TEXT NOT NULL,
                backup_id TEXT NOT NULL,
                complete INTEGER NOT NULL DEFAULT 0,
                committed INTEGER NOT NULL DEFAULT 0,
                sha256 BLOB,
                started_at REAL NOT NULL,
                updated_at REAL NOT NULL,
                completed_at REAL,
                PRIMARY KEY (site_id, backup_id)
            )""",
            """CREATE TABLE configs (
                site_id TEXT NOT NULL,
                version INTEGER NOT NULL,
                yaml BLOB NOT NULL,
                signature BLOB NOT NULL,
                created_at REAL NOT NULL,
                PRIMARY KEY (site_id, version)
            )""",
        ),
    ),
    (
        2,
        "event counts per site and kind",
        (
            """CREATE TABLE event_counts (
                site_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                count INTEGER NOT NULL,
                PRIMARY KEY (site_id, kind)
            ) WITHOUT ROWID""",
            """INSERT INTO event_counts (site_id, kind, count)
               SELECT site_id, kind, COUNT(*) FROM events GROUP BY site_id, kind""",
        ),
    ),
)

_BUSY_TIMEOUT_S = 10.0
_ACK_SCAN = 4096


class SqlCloudStore:
    """The ``CloudStore`` methods both databases share, in SQL both understand.

    Statements use ``?`` placeholders (``_execute`` of PostgreSQL translates them). A subclass
    gives the connection (``_execute``, ``_transaction``, ``close``) and what differs:
    ``_ROW_LOCK`` (how a transaction locks a site's row), ``_QUEUE_KINDS`` (the condition that
    selects ``queue.*`` events) and ``_insert_events`` (one statement for a batch).
    """

    location: str
    """Where the store lives, printable (no password)."""
    _ROW_LOCK = ""
    """Appended to the SELECT of a site's row inside a transaction that changes it."""
    _QUEUE_KINDS = "kind LIKE 'queue.%'"

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        """Run one statement; a cursor (``fetchone``, ``fetchall``, ``rowcount``)."""
        raise NotImplementedError

    def _transaction(self) -> AbstractContextManager[None]:
        """One transaction: committed when the block ends, rolled back on any exception."""
        raise NotImplementedError

    def _insert_events(self, fresh: EventColumns, now: float) -> Sequence[str]:
        """Insert ``fresh`` (above the ack, one copy per seq) except events already held;
        return the kinds of those inserted. Inside ``ingest``'s transaction."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the database."""
        raise NotImplementedError

    # ---------------------------------------------------------- sites

    def _ensure_site(self, site_id: str, now: float) -> None:
        self._execute(
            "INSERT INTO sites (site_id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (site_id, now),
        )

    def touch_site(self, site_id: str, now: float) -> None:
        """Note link activity of a site."""
        with self._transaction():
            self._ensure_site(site_id, now)
            self._execute("UPDATE sites SET last_seen_at = ? WHERE site_id = ?", (now, site_id))

    def sites(self) -> list[SiteSummary]:
        """Every known site, by id."""
        rows = self._execute(
            """SELECT s.site_id, s.created_at, s.last_seen_at, s.acked_seq,
                      (SELECT COUNT(*) FROM events e
                        WHERE e.site_id = s.site_id AND e.seq > s.acked_seq),
                      c.serial, c.not_after
                 FROM sites s
                 LEFT JOIN certificates c ON c.serial = (
                      SELECT serial FROM certificates WHERE site_id = s.site_id
                       ORDER BY issued_at DESC LIMIT 1)
                ORDER BY s.site_id"""
        ).fetchall()
        return [
            SiteSummary(r[0], r[1], r[2], int(r[3]), int(r[4]),
                        int(r[5]) if r[5] else None, r[6])
            for r in rows
        ]

    def activity(self) -> list[SiteActivity]:
        """Newest seq, the acknowledged event's timing and event counts of every site."""
        rows = self._execute(
            """SELECT s.site_id,
                      (SELECT MAX(seq) FROM events e WHERE e.site_id = s.site_id),
                      a.occurred_at, a.received_at
                 FROM sites s
                 LEFT JOIN events a ON a.site_id = s.site_id AND a.seq = s.acked_seq
                ORDER BY s.site_id"""
        ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for site_id, kind, count in self._execute(
            "SELECT site_id, kind, count FROM event_counts ORDER BY site_id, kind"
        ).fetchall():
            counts.setdefault(site_id, {})[kind] = int(count)
        return [
            SiteActivity(r[0], int(r[1] or 0), r[2], r[3], counts.get(r[0], {})) for r in rows
        ]

    # ---------------------------------------------------------- enrolment

    def add_token(self, site_id: str, token: str, expires_at: float, now: float) -> None:
        """Record a one-time enrolment token for ``site_id`` (only its hash is kept)."""
        with self._transaction():
            self._ensure_site(site_id, now)
            self._execute(
                "INSERT INTO enrol_tokens (digest, site_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (token_digest(token), site_id, now, expires_at),
            )

    def redeem_token(self, token: str, now: float) -> str:
        """Use up ``token`` and return its site id; raise TokenRejected otherwise."""
        digest = token_digest(token)
        with self._transaction():
            # One UPDATE with every condition: two racing redeemers cannot both win.
            won = self._execute(
                "UPDATE enrol_tokens SET used_at = ?"
                " WHERE digest = ? AND used_at IS NULL AND expires_at > ? RETURNING site_id",
                (now, digest, now),
            ).fetchall()
            row = None if won else self._execute(
                "SELECT used_at FROM enrol_tokens WHERE digest = ?", (digest,)
            ).fetchone()
        if won:
            return str(won[0][0])
        if row is None:
            raise TokenRejected("unknown")
        if row[0] is not None:
            raise TokenRejected("already used")
        raise TokenRejected("expired")

    def record_certificate(self, site_id: str, serial: int, not_after: float, now: float) -> None:
        """Remember a certificate issued to a site."""
        with self._transaction():
            self._ensure_site(site_id, now)
            self._execute(
                "INSERT INTO certificates (serial, site_id, issued_at, not_after)"
                " VALUES (?, ?, ?, ?)",
                (str(serial), site_id, now, not_after),
            )

    def revoke_certificate(self, serial: int, now: float) -> bool:
        """Revoke by serial (known or not); False when it was already revoked."""
        with self._transaction():
            updated = self._execute(
                "UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                (now, str(serial)),
            ).rowcount
            if updated:
                return True
            # A serial we never recorded (e.g. lost database): still refuse it from now on.
            self._ensure_site("_unknown", now)
            inserted = self._execute(
                "INSERT INTO certificates (serial, site_id, issued_at, not_after, revoked_at)"
                " VALUES (?, '_unknown', ?, 0, ?) ON CONFLICT (serial) DO NOTHING",
                (str(serial), now, now),
            ).rowcount
        return inserted == 1

    def is_revoked(self, serial: int) -> bool:
        """True when the serial is on the revocation list."""
        row = self._execute(
            "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL",
            (str(serial),),
        ).fetchone()
        return row is not None

    def certificates(self, site_id: str) -> list[tuple[int, float, float | None]]:
        """(serial, not_after, revoked_at) of a site's certificates, newest first."""
        rows = self._execute(
            "SELECT serial, not_after, revoked_at FROM certificates WHERE site_id = ?"
            " ORDER BY issued_at DESC",
            (site_id,),
        ).fetchall()
        return [(int(r[0]), r[1], r[2]) for r in rows]

    # ---------------------------------------------------------- ingest

    def ingest(
        self, events: Sequence[EventRecord] | EventColumns, now: float, *, window: int
    ) -> IngestResult:
        """Store a batch of one site's events exactly once; return the new ack.

        Events more than ``window`` past the current ack are not stored (refused): a site
        cannot fill the database with events held behind a gap it never fills.
        """
        batch = as_columns(events)
        site_id = batch.site_id
        with self._transaction():
            self._ensure_site(site_id, now)
            # Locked (PostgreSQL) or in the one writer's transaction (SQLite): batches of one
            # site, from this process or another, are ordered and the ack only moves forward.
            acked = int(self._execute(
                f"SELECT acked_seq FROM sites WHERE site_id = ?{self._ROW_LOCK}", (site_id,)
            ).fetchone()[0])
            plan = admit(batch, acked, window)
            inserted = self._insert_events(plan.fresh, now) if len(plan.fresh) else ()
            for kind, count in Counter(inserted).items():
                self._execute(
                    "INSERT INTO event_counts (site_id, kind, count) VALUES (?, ?, ?)"
                    " ON CONFLICT (site_id, kind)"
                    " DO UPDATE SET count = event_counts.count + excluded.count",
                    (site_id, kind, count),
                )
            new_ack = self._advance(site_id, plan.contiguous_to)
            self._execute(
                "UPDATE sites SET acked_seq = ?, last_seen_at = ? WHERE site_id = ?",
                (new_ack, now, site_id),
            )
        stored = len(inserted)
        return IngestResult(new_ack, stored, len(batch) - stored - plan.refused, plan.refused)

    def _advance(self, site_id: str, acked: int) -> int:
        """Walk forward from ``acked`` while the next seq is stored."""
        while True:
            seqs = self._execute(
                "SELECT seq FROM events WHERE site_id = ? AND seq > ? ORDER BY seq LIMIT ?",
                (site_id, acked, _ACK_SCAN),
            ).fetchall()
            for (seq,) in seqs:
                if seq != acked + 1:
                    return acked
                acked = seq
            if len(seqs) < _ACK_SCAN:
                return acked

    def acked_seq(self, site_id: str) -> int:
        """Highest contiguous seq stored for the site (0 when none)."""
        row = self._execute("SELECT acked_seq FROM sites WHERE site_id = ?", (site_id,)).fetchone()
        return int(row[0]) if row else 0

    def newest_seq(self, site_id: str) -> int:
        """Highest seq stored for the site, held events included (0 when none)."""
        row = self._execute(
            "SELECT COALESCE(MAX(seq), 0) FROM events WHERE site_id = ?", (site_id,)
        ).fetchone()
        return int(row[0])

    def events(self, site_id: str, *, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Stored events of a site in seq order, from ``after + 1`` (held ones included)."""
        rows = self._execute(
            "SELECT seq, kind, payload, occurred_at FROM events"
            " WHERE site_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (site_id, after, limit),
        ).fetchall()
        return [EventRecord(site_id, int(r[0]), r[1], bytes(r[2]), r[3]) for r in rows]

    def latest_event(self, site_id: str, kind: str) -> EventRecord | None:
        """The stored event of ``kind`` with the highest seq for the site, or None. Walks the
        site's events back from the newest (kinds that recur, like ``audit.head``, are found
        near the end)."""
        row = self._execute(
            "SELECT seq, kind, payload, occurred_at FROM events"
            " WHERE site_id = ? AND kind = ? ORDER BY seq DESC LIMIT 1",
            (site_id, kind),
        ).fetchone()
        return None if row is None else EventRecord(site_id, int(row[0]), row[1],
                                                    bytes(row[2]), row[3])

    def queue_events(
        self, since: float, until: float, site_id: str | None = None
    ) -> list[EventRecord]:
        """Queue events (``queue.*``) that occurred in ``[since, until)``, by time, for KPIs."""
        where, args = ("AND site_id = ?", (site_id,)) if site_id else ("", ())
        rows = self._execute(
            "SELECT site_id, seq, kind, payload, occurred_at FROM events"
            f" WHERE {self._QUEUE_KINDS} AND occurred_at >= ?"
            f" AND occurred_at < ? {where} ORDER BY occurred_at, site_id, seq",
            (since, until, *args),
        ).fetchall()
        return [EventRecord(r[0], int(r[1]), r[2], bytes(r[3]), r[4]) for r in rows]

    # ---------------------------------------------------------- backups

    _BACKUP_COLUMNS = "site_id, backup_id, complete, committed, sha256, started_at, completed_at"

    @staticmethod
    def _backup_record(row: Sequence[Any]) -> BackupRecord:
        return BackupRecord(
            site_id=str(row[0]), backup_id=str(row[1]), complete=bool(row[2]),
            committed=int(row[3]), sha256=bytes(row[4]) if row[4] is not None else None,
            started_at=float(row[5]),
            completed_at=float(row[6]) if row[6] is not None else None,
        )

    def backup(self, site_id: str, backup_id: str) -> BackupRecord | None:
        """The record of one backup, or None."""
        row = self._execute(
            f"SELECT {self._BACKUP_COLUMNS} FROM backups WHERE site_id = ? AND backup_id = ?",
            (site_id, backup_id),
        ).fetchone()
        return self._backup_record(row) if row else None

    def begin_backup(self, site_id: str, backup_id: str, now: float) -> BackupRecord:
        """Create a partial backup record (committed 0) unless one exists; return it."""
        with self._transaction():
            self._ensure_site(site_id, now)
            self._execute(
                "INSERT INTO backups (site_id, backup_id, started_at, updated_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (site_id, backup_id, now, now),
            )
        record = self.backup(site_id, backup_id)
        assert record is not None
        return record

    def commit_backup_offset(self, site_id: str, backup_id: str, committed: int, now: float) -> None:
        """Move a partial backup's committed offset."""
        with self._transaction():
            self._execute(
                "UPDATE backups SET committed = ?, updated_at = ?"
                " WHERE site_id = ? AND backup_id = ? AND NOT complete",
                (committed, now, site_id, backup_id),
            )

    def complete_backup(
        self, site_id: str, backup_id: str, size: int, sha256: bytes, now: float
    ) -> None:
        """Mark a backup complete."""
        with self._transaction():
            self._execute(
                "UPDATE backups SET complete = TRUE, committed = ?, sha256 = ?, updated_at = ?,"
                " completed_at = ? WHERE site_id = ? AND backup_id = ?",
                (size, sha256, now, now, site_id, backup_id),
            )

    def delete_backup(self, site_id: str, backup_id: str) -> None:
        """Forget a backup record."""
        with self._transaction():
            self._execute(
                "DELETE FROM backups WHERE site_id = ? AND backup_id = ?", (site_id, backup_id)
            )

    def backups(self, site_id: str | None = None) -> list[BackupRecord]:
        """Backups, newest first (complete by completion time, then partial ones)."""
        where, args = ("WHERE site_id = ?", (site_id,)) if site_id else ("", ())
        rows = self._execute(
            f"SELECT {self._BACKUP_COLUMNS} FROM backups {where}"
            " ORDER BY complete DESC, COALESCE(completed_at, started_at) DESC, backup_id DESC",
            args,
        ).fetchall()
        return [self._backup_record(r) for r in rows]

    # ---------------------------------------------------------- configs

    def add_config(
        self, site_id: str, yaml: bytes, signature_for: SignConfig, now: float,
        *, above: int = 0,
    ) -> ConfigRecord:
        """Store the next config version of a site, signed by ``signature_for``: above every
        stored version and above ``above`` (the version the site reported running, which an
        edit made on site through its API may have raised)."""
        with self._transaction():
            self._ensure_site(site_id, now)
            # Under the site's row lock, concurrent pushes take consecutive versions.
            self._execute(f"SELECT 1 FROM sites WHERE site_id = ?{self._ROW_LOCK}", (site_id,))
            row = self._execute(
                "SELECT COALESCE(MAX(version), 0) FROM configs WHERE site_id = ?", (site_id,)
            ).fetchone()
            version = max(int(row[0]), above) + 1
            signature = signature_for(site_id, version, yaml)
            self._execute(
                "INSERT INTO configs VALUES (?, ?, ?, ?, ?)",
                (site_id, version, yaml, signature, now),
            )
        return ConfigRecord(site_id, version, yaml, signature, now)

    def latest_config(self, site_id: str) -> ConfigRecord | None:
        """The newest config version of a site."""
        row = self._execute(
            "SELECT version, yaml, signature, created_at FROM configs WHERE site_id = ?"
            " ORDER BY version DESC LIMIT 1",
            (site_id,),
        ).fetchone()
        if row is None:
            return None
        return ConfigRecord(site_id, int(row[0]), bytes(row[1]), bytes(row[2]), float(row[3]))

    def config_versions(self) -> dict[str, int]:
        """The newest config version of every site that has one."""
        rows = self._execute(
            "SELECT site_id, MAX(version) FROM configs GROUP BY site_id"
        ).fetchall()
        return {r[0]: int(r[1]) for r in rows}


class SqliteCloudStore(SqlCloudStore):
    """``CloudStore`` on one SQLite file.

    The connection may be used from any one thread at a time (``check_same_thread`` is off);
    the server gives it a single worker thread.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.location = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            str(self.path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False,
            isolation_level=None,
        )
        try:
            self.db = sqlite_utils.Database(conn)
            self.db.enable_wal()
            # An Ack promises the site it may forget the event: it must survive power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _migrate(self) -> None:
        conn = self.db.conn
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "number INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
        for number, name, statements in _MIGRATIONS:
            # IMMEDIATE takes the write lock first: two processes opening at once apply it once.
            conn.execute("BEGIN IMMEDIATE")
            try:
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE number = ?", (number,)
                ).fetchone()
                if done is None:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                        (number, name, time.time()),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # Range on kind: 'queue.' <= kind < 'queue/' ('/' follows '.') is every queue.* kind, and
    # SQLite compares text byte by byte (LIKE would not use the index's order).
    _QUEUE_KINDS = "kind >= 'queue.' AND kind < 'queue/'"

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self._conn.execute(sql, args)

    def _transaction(self) -> _Transaction:
        # BEGIN IMMEDIATE takes the database's one write lock: the writer's row lock.
        return _Transaction(self._conn)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    def _insert_events(self, fresh: EventColumns, now: float) -> Sequence[str]:
        # Held events (beyond a gap) are the only ones above the ack already stored: one range
        # read finds them, so the insert is one statement for the batch.
        held = {seq for (seq,) in self._conn.execute(
            "SELECT seq FROM events WHERE site_id = ? AND seq BETWEEN ? AND ?",
            (fresh.site_id, min(fresh.seqs), max(fresh.seqs)),
        )}
        if held:
            fresh = fresh.subset(i for i, seq in enumerate(fresh.seqs) if seq not in held)
        # Many rows per statement: one step of SQLite's VM per chunk instead of one per row
        # (executemany), and one release of the interpreter lock, which the gRPC loop wants
        # meanwhile (docs/cloud.md, "Benchmark").
        rows = list(fresh.rows(now))
        for at in range(0, len(rows), _ROWS_PER_INSERT):
            chunk = rows[at:at + _ROWS_PER_INSERT]
            self._conn.execute(_insert_events_sql(len(chunk)), list(chain.from_iterable(chunk)))
        return fresh.kinds


_ROWS_PER_INSERT = 500
"""Rows per INSERT statement: 3,000 parameters, well under SQLite's 32,766."""


@functools.lru_cache(maxsize=8)
def _insert_events_sql(rows: int) -> str:
    """``INSERT`` of ``rows`` events (six values each), duplicates of a key left alone."""
    return ("INSERT INTO events (site_id, seq, kind, payload, occurred_at, received_at) VALUES "
            + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows) + " ON CONFLICT (site_id, seq) DO NOTHING")


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, or ``ROLLBACK`` on any exception."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def open_store(url: str, *, data_dir: Path | None = None) -> CloudStore:
    """Open the store named by ``url``; raise StoreError when it cannot be opened.

    ``postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME[?OPTIONS]`` (or ``postgres://``) opens
    ``PostgresCloudStore``; ``sqlite:///abs/path.db``, ``sqlite:relative.db`` (relative to
    ``data_dir``) or a plain path open ``SqliteCloudStore``.
    """
    if url.startswith(("postgresql://", "postgres://")):
        # Imported here: psycopg is needed only by clouds that use PostgreSQL.
        from cloud_bridge.pg import PostgresCloudStore

        return PostgresCloudStore(url)
    if url.startswith("sqlite://"):
        path = Path(url.removeprefix("sqlite://"))
    elif url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:"))
    elif "://" in url:
        raise StoreError(f"unknown database URL scheme in {url.split('://', 1)[0]!r}")
    else:
        path = Path(url)
    if not path.is_absolute() and data_dir is not None:
        path = data_dir / path
    return SqliteCloudStore(path)


def events_of(store: CloudStore, site_id: str) -> Iterable[EventRecord]:
    """Every stored event of a site, in seq order, read in pages."""
    after = 0
    while True:
        page = store.events(site_id, after=after, limit=1000)
        if not page:
            return
        yield from page
        after = page[-1].seq
