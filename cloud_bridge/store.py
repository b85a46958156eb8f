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

import hashlib
import secrets
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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

    def ingest(self, events: Sequence[EventRecord], now: float, *, window: int) -> IngestResult:
        """Store a batch of one site's events exactly once; return the new ack."""
        ...

    def acked_seq(self, site_id: str) -> int:
        """Highest contiguous seq stored for the site (0 when none)."""
        ...

    def events(self, site_id: str, *, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Stored events of a site in seq order, from ``after + 1``."""
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

    def add_config(self, site_id: str, yaml: bytes, signature_for: SignConfig, now: float) -> ConfigRecord:
        """Store the next config version of a site, signed by ``signature_for(version)``."""
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


class SqliteCloudStore:
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

    def _write(self) -> _Transaction:
        return _Transaction(self._conn)

    def close(self) -> None:
        """Close the connection."""
        self._conn.close()

    # ---------------------------------------------------------- sites

    def _ensure_site(self, site_id: str, now: float) -> None:
        self._conn.execute(
            "INSERT OR IGNORE INTO sites (site_id, created_at) VALUES (?, ?)", (site_id, now)
        )

    def touch_site(self, site_id: str, now: float) -> None:
        """Note link activity of a site."""
        with self._write():
            self._ensure_site(site_id, now)
            self._conn.execute(
                "UPDATE sites SET last_seen_at = ? WHERE site_id = ?", (now, site_id)
            )

    def sites(self) -> list[SiteSummary]:
        """Every known site, by id."""
        rows = self._conn.execute(
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
            SiteSummary(r[0], r[1], r[2], r[3], r[4], int(r[5]) if r[5] else None, r[6])
            for r in rows
        ]

    def activity(self) -> list[SiteActivity]:
        """Newest seq, the acknowledged event's timing and event counts of every site."""
        rows = self._conn.execute(
            """SELECT s.site_id,
                      (SELECT MAX(seq) FROM events e WHERE e.site_id = s.site_id),
                      a.occurred_at, a.received_at
                 FROM sites s
                 LEFT JOIN events a ON a.site_id = s.site_id AND a.seq = s.acked_seq
                ORDER BY s.site_id"""
        ).fetchall()
        counts: dict[str, dict[str, int]] = {}
        for site_id, kind, count in self._conn.execute(
            "SELECT site_id, kind, count FROM event_counts ORDER BY site_id, kind"
        ):
            counts.setdefault(site_id, {})[kind] = int(count)
        return [
            SiteActivity(r[0], int(r[1] or 0), r[2], r[3], counts.get(r[0], {})) for r in rows
        ]

    # ---------------------------------------------------------- enrolment

    def add_token(self, site_id: str, token: str, expires_at: float, now: float) -> None:
        """Record a one-time enrolment token for ``site_id`` (only its hash is kept)."""
        with self._write():
            self._ensure_site(site_id, now)
            self._conn.execute(
                "INSERT INTO enrol_tokens (digest, site_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (token_digest(token), site_id, now, expires_at),
            )

    def redeem_token(self, token: str, now: float) -> str:
        """Use up ``token`` and return its site id; raise TokenRejected otherwise."""
        digest = token_digest(token)
        with self._write():
            # One UPDATE with every condition: two racing redeemers cannot both win.
            cursor = self._conn.execute(
                "UPDATE enrol_tokens SET used_at = ?"
                " WHERE digest = ? AND used_at IS NULL AND expires_at > ?",
                (now, digest, now),
            )
            row = self._conn.execute(
                "SELECT site_id, used_at, expires_at FROM enrol_tokens WHERE digest = ?",
                (digest,),
            ).fetchone()
        if cursor.rowcount == 1:
            return str(row[0])
        if row is None:
            raise TokenRejected("unknown")
        if row[1] is not None:
            raise TokenRejected("already used")
        raise TokenRejected("expired")

    def record_certificate(self, site_id: str, serial: int, not_after: float, now: float) -> None:
        """Remember a certificate issued to a site."""
        with self._write():
            self._ensure_site(site_id, now)
            self._conn.execute(
                "INSERT INTO certificates (serial, site_id, issued_at, not_after)"
                " VALUES (?, ?, ?, ?)",
                (str(serial), site_id, now, not_after),
            )

    def revoke_certificate(self, serial: int, now: float) -> bool:
        """Revoke by serial (known or not); False when it was already revoked."""
        with self._write():
            row = self._conn.execute(
                "SELECT revoked_at FROM certificates WHERE serial = ?", (str(serial),)
            ).fetchone()
            if row is not None and row[0] is not None:
                return False
            if row is None:
                # A serial we never recorded (e.g. lost database): still refuse it from now on.
                self._ensure_site("_unknown", now)
                self._conn.execute(
                    "INSERT INTO certificates (serial, site_id, issued_at, not_after, revoked_at)"
                    " VALUES (?, '_unknown', ?, 0, ?)",
                    (str(serial), now, now),
                )
            else:
                self._conn.execute(
                    "UPDATE certificates SET revoked_at = ? WHERE serial = ?", (now, str(serial))
                )
        return True

    def is_revoked(self, serial: int) -> bool:
        """True when the serial is on the revocation list."""
        row = self._conn.execute(
            "SELECT 1 FROM certificates WHERE serial = ? AND revoked_at IS NOT NULL",
            (str(serial),),
        ).fetchone()
        return row is not None

    def certificates(self, site_id: str) -> list[tuple[int, float, float | None]]:
        """(serial, not_after, revoked_at) of a site's certificates, newest first."""
        rows = self._conn.execute(
            "SELECT serial, not_after, revoked_at FROM certificates WHERE site_id = ?"
            " ORDER BY issued_at DESC",
            (site_id,),
        ).fetchall()
        return [(int(r[0]), r[1], r[2]) for r in rows]

    # ---------------------------------------------------------- ingest

    def ingest(self, events: Sequence[EventRecord], now: float, *, window: int) -> IngestResult:
        """Store a batch of one site's events exactly once; return the new ack.

        Events more than ``window`` past the current ack are not stored (refused): a site
        cannot fill the database with events held behind a gap it never fills.
        """
        if not events:
            raise StoreError("empty batch")
        site_id = events[0].site_id
        if any(e.site_id != site_id for e in events):
            raise StoreError("a batch holds the events of one site")
        with self._write():
            self._ensure_site(site_id, now)
            acked = self._conn.execute(
                "SELECT acked_seq FROM sites WHERE site_id = ?", (site_id,)
            ).fetchone()[0]
            # The first copy of a seq wins, within the batch and against what is stored.
            fresh: dict[int, EventRecord] = {}
            refused = 0
            for event in events:
                if event.seq <= acked:
                    continue
                if event.seq > acked + window:
                    refused += 1
                    continue
                fresh.setdefault(event.seq, event)
            # The usual batch continues the log without a gap: after it every seq up to its
            # end is stored (inserted now or held before), so the ack moves there at once.
            start = acked
            if fresh:
                low, high = min(fresh), max(fresh)
                if low == acked + 1 and high - acked == len(fresh):
                    start = high
                # Held events (beyond a gap) are the only ones above the ack already stored:
                # one range read finds them, so the insert is one statement for the batch.
                for (seq,) in self._conn.execute(
                    "SELECT seq FROM events WHERE site_id = ? AND seq BETWEEN ? AND ?",
                    (site_id, low, high),
                ):
                    fresh.pop(seq, None)
            self._conn.executemany(
                "INSERT INTO events (site_id, seq, kind, payload, occurred_at, received_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (site_id, seq) DO NOTHING",
                [(site_id, e.seq, e.kind, e.payload, e.occurred_at, now)
                 for e in fresh.values()],
            )
            stored = len(fresh)
            duplicates = len(events) - stored - refused
            kinds = Counter(e.kind for e in fresh.values())
            for kind, count in kinds.items():
                self._conn.execute(
                    "INSERT INTO event_counts (site_id, kind, count) VALUES (?, ?, ?)"
                    " ON CONFLICT (site_id, kind) DO UPDATE SET count = count + excluded.count",
                    (site_id, kind, count),
                )
            new_ack = self._advance(site_id, start)
            self._conn.execute(
                "UPDATE sites SET acked_seq = ?, last_seen_at = ? WHERE site_id = ?",
                (new_ack, now, site_id),
            )
        return IngestResult(new_ack, stored, duplicates, refused)

    def _advance(self, site_id: str, acked: int) -> int:
        """Walk forward from ``acked`` while the next seq is stored."""
        while True:
            seqs = self._conn.execute(
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
        row = self._conn.execute(
            "SELECT acked_seq FROM sites WHERE site_id = ?", (site_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def events(self, site_id: str, *, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Stored events of a site in seq order, from ``after + 1`` (held ones included)."""
        rows = self._conn.execute(
            "SELECT seq, kind, payload, occurred_at FROM events"
            " WHERE site_id = ? AND seq > ? ORDER BY seq LIMIT ?",
            (site_id, after, limit),
        ).fetchall()
        return [EventRecord(site_id, r[0], r[1], bytes(r[2]), r[3]) for r in rows]

    def queue_events(
        self, since: float, until: float, site_id: str | None = None
    ) -> list[EventRecord]:
        """Queue events (``queue.*``) that occurred in ``[since, until)``, by time, for KPIs."""
        where, args = ("AND site_id = ?", (site_id,)) if site_id else ("", ())
        # Range on kind: 'queue.' <= kind < 'queue/' ('/' follows '.') is every queue.* kind.
        rows = self._conn.execute(
            "SELECT site_id, seq, kind, payload, occurred_at FROM events"
            " WHERE kind >= 'queue.' AND kind < 'queue/' AND occurred_at >= ?"
            f" AND occurred_at < ? {where} ORDER BY occurred_at, site_id, seq",
            (since, until, *args),
        ).fetchall()
        return [EventRecord(r[0], r[1], r[2], bytes(r[3]), r[4]) for r in rows]

    # ---------------------------------------------------------- backups

    @staticmethod
    def _backup_record(row: Sequence[object]) -> BackupRecord:
        return BackupRecord(
            site_id=str(row[0]), backup_id=str(row[1]), complete=bool(row[2]),
            committed=int(row[3]),  # type: ignore[call-overload]
            sha256=bytes(row[4]) if row[4] is not None else None,  # type: ignore[call-overload]
            started_at=float(row[5]),  # type: ignore[arg-type]
            completed_at=float(row[6]) if row[6] is not None else None,  # type: ignore[arg-type]
        )

    _BACKUP_COLUMNS = "site_id, backup_id, complete, committed, sha256, started_at, completed_at"

    def backup(self, site_id: str, backup_id: str) -> BackupRecord | None:
        """The record of one backup, or None."""
        row = self._conn.execute(
            f"SELECT {self._BACKUP_COLUMNS} FROM backups WHERE site_id = ? AND backup_id = ?",
            (site_id, backup_id),
        ).fetchone()
        return self._backup_record(row) if row else None

    def begin_backup(self, site_id: str, backup_id: str, now: float) -> BackupRecord:
        """Create a partial backup record (committed 0) unless one exists; return it."""
        with self._write():
            self._ensure_site(site_id, now)
            self._conn.execute(
                "INSERT OR IGNORE INTO backups (site_id, backup_id, started_at, updated_at)"
                " VALUES (?, ?, ?, ?)",
                (site_id, backup_id, now, now),
            )
        record = self.backup(site_id, backup_id)
        assert record is not None
        return record

    def commit_backup_offset(self, site_id: str, backup_id: str, committed: int, now: float) -> None:
        """Move a partial backup's committed offset."""
        with self._write():
            self._conn.execute(
                "UPDATE backups SET committed = ?, updated_at = ?"
                " WHERE site_id = ? AND backup_id = ? AND complete = 0",
                (committed, now, site_id, backup_id),
            )

    def complete_backup(
        self, site_id: str, backup_id: str, size: int, sha256: bytes, now: float
    ) -> None:
        """Mark a backup complete."""
        with self._write():
            self._conn.execute(
                "UPDATE backups SET complete = 1, committed = ?, sha256 = ?, updated_at = ?,"
                " completed_at = ? WHERE site_id = ? AND backup_id = ?",
                (size, sha256, now, now, site_id, backup_id),
            )

    def delete_backup(self, site_id: str, backup_id: str) -> None:
        """Forget a backup record."""
        with self._write():
            self._conn.execute(
                "DELETE FROM backups WHERE site_id = ? AND backup_id = ?", (site_id, backup_id)
            )

    def backups(self, site_id: str | None = None) -> list[BackupRecord]:
        """Backups, newest first (complete by completion time, then partial ones)."""
        where, args = ("WHERE site_id = ?", (site_id,)) if site_id else ("", ())
        rows = self._conn.execute(
            f"SELECT {self._BACKUP_COLUMNS} FROM backups {where}"
            " ORDER BY complete DESC, COALESCE(completed_at, started_at) DESC, backup_id DESC",
            args,
        ).fetchall()
        return [self._backup_record(r) for r in rows]

    # ---------------------------------------------------------- configs

    def add_config(
        self, site_id: str, yaml: bytes, signature_for: SignConfig, now: float
    ) -> ConfigRecord:
        """Store the next config version of a site, signed by ``signature_for``."""
        with self._write():
            self._ensure_site(site_id, now)
            row = self._conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM configs WHERE site_id = ?", (site_id,)
            ).fetchone()
            version = int(row[0]) + 1
            signature = signature_for(site_id, version, yaml)
            self._conn.execute(
                "INSERT INTO configs VALUES (?, ?, ?, ?, ?)",
                (site_id, version, yaml, signature, now),
            )
        return ConfigRecord(site_id, version, yaml, signature, now)

    def latest_config(self, site_id: str) -> ConfigRecord | None:
        """The newest config version of a site."""
        row = self._conn.execute(
            "SELECT version, yaml, signature, created_at FROM configs WHERE site_id = ?"
            " ORDER BY version DESC LIMIT 1",
            (site_id,),
        ).fetchone()
        if row is None:
            return None
        return ConfigRecord(site_id, int(row[0]), bytes(row[1]), bytes(row[2]), float(row[3]))

    def config_versions(self) -> dict[str, int]:
        """The newest config version of every site that has one."""
        rows = self._conn.execute("SELECT site_id, MAX(version) FROM configs GROUP BY site_id")
        return {r[0]: int(r[1]) for r in rows}


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
