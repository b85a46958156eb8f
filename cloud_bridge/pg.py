"""``CloudStore`` on PostgreSQL, for a cloud that serves many sites or runs several processes.

Opened by ``open_store("postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME[?options]")`` through
psycopg 3. The semantics are those of ``SqliteCloudStore``, made safe for several writers:

- ``UNIQUE (site_id, seq)`` (the primary key of ``events``) makes ingest idempotent:
  ``INSERT ... ON CONFLICT DO NOTHING`` absorbs duplicates, the first copy wins;
- a batch runs in one transaction that first locks the site's row (``SELECT ... FOR UPDATE``),
  so two processes ingesting for one site cannot both move its ack from the same start;
- the ack is the highest contiguous seq stored, and only moves forward;
- migrations are numbered, each in one transaction under an advisory lock, so processes that
  start together apply each migration once;
- an Ack promises the site it may forget the event, so a session whose server default is
  ``synchronous_commit = off`` is switched to ``local`` (commit waits for the local WAL flush).

Every method is blocking; the server calls them from its one worker thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cloud_bridge.store import (
    BackupRecord,
    ConfigRecord,
    EventRecord,
    IngestResult,
    SignConfig,
    SiteActivity,
    SiteSummary,
    StoreError,
    TokenRejected,
    token_digest,
)

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise StoreError(
        "PostgreSQL stores need psycopg 3: pip install 'psycopg[binary]>=3.1'"
    ) from exc

log = logging.getLogger("edgecc.cloud.store")

_CONNECT_TIMEOUT_S = 10
_ACK_SCAN = 4096
# pg_advisory_xact_lock key of the migrations ("edgecc" in ASCII).
_MIGRATION_LOCK = 0x656467656363

_MIGRATIONS: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (
        1,
        "sites, tokens, certificates, events, backups, configs",
        (
            """CREATE TABLE sites (
                site_id TEXT PRIMARY KEY,
                created_at DOUBLE PRECISION NOT NULL,
                last_seen_at DOUBLE PRECISION,
                acked_seq BIGINT NOT NULL DEFAULT 0
            )""",
            """CREATE TABLE enrol_tokens (
                digest TEXT PRIMARY KEY,
                site_id TEXT NOT NULL REFERENCES sites(site_id),
                created_at DOUBLE PRECISION NOT NULL,
                expires_at DOUBLE PRECISION NOT NULL,
                used_at DOUBLE PRECISION
            )""",
            """CREATE TABLE certificates (
                serial TEXT PRIMARY KEY,
                site_id TEXT NOT NULL REFERENCES sites(site_id),
                issued_at DOUBLE PRECISION NOT NULL,
                not_after DOUBLE PRECISION NOT NULL,
                revoked_at DOUBLE PRECISION
            )""",
            "CREATE INDEX certificates_site ON certificates (site_id, issued_at)",
            # (site_id, seq) is the idempotency key of ingest.
            """CREATE TABLE events (
                site_id TEXT NOT NULL,
                seq BIGINT NOT NULL,
                kind TEXT NOT NULL,
                payload BYTEA NOT NULL,
                occurred_at DOUBLE PRECISION NOT NULL,
                received_at DOUBLE PRECISION NOT NULL,
                CONSTRAINT events_site_seq UNIQUE (site_id, seq)
            )""",
            """CREATE TABLE backups (
                site_id TEXT NOT NULL,
                backup_id TEXT NOT NULL,
                complete BOOLEAN NOT NULL DEFAULT FALSE,
                committed BIGINT NOT NULL DEFAULT 0,
                sha256 BYTEA,
                started_at DOUBLE PRECISION NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL,
                completed_at DOUBLE PRECISION,
                PRIMARY KEY (site_id, backup_id)
            )""",
            """CREATE TABLE configs (
                site_id TEXT NOT NULL,
                version BIGINT NOT NULL,
                yaml BYTEA NOT NULL,
                signature BYTEA NOT NULL,
                created_at DOUBLE PRECISION NOT NULL,
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
                count BIGINT NOT NULL,
                PRIMARY KEY (site_id, kind)
            )""",
            """INSERT INTO event_counts (site_id, kind, count)
               SELECT site_id, kind, COUNT(*) FROM events GROUP BY site_id, kind""",
        ),
    ),
)


def redact(url: str) -> str:
    """``url`` without its password (user part or ``password=`` option), for logs and errors."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    except ValueError:
        return url.split("://", 1)[0] + "://***"
    query = "&".join(
        "password=***" if item.split("=", 1)[0] == "password" else item
        for item in parts.query.split("&")
    ) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class PostgresCloudStore:
    """``CloudStore`` on a PostgreSQL database (one connection, autocommit between calls)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.location = redact(url)
        """Where the store lives, printable (no password)."""
        self._closed = False
        self._in_transaction = False
        conn = self._connect()
        try:
            self._migrate(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(
                f"cannot use the PostgreSQL store {self.location}: {_reason(exc)}"
            ) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _connect(self) -> psycopg.Connection[Any]:
        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self.url:
            options["connect_timeout"] = _CONNECT_TIMEOUT_S
        try:
            conn = psycopg.connect(self.url, **options)
        except psycopg.Error as exc:
            raise StoreError(
                f"cannot open the PostgreSQL store {self.location}: {_reason(exc)}"
            ) from None
        except ValueError as exc:  # e.g. a URL that does not parse
            raise StoreError(f"bad PostgreSQL URL {self.location}: {exc}") from None
        try:
            # An Ack lets the site delete the event: its commit must have reached the disk.
            if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":  # type: ignore[index]
                conn.execute("SET synchronous_commit = local")
            if conn.execute("SHOW fsync").fetchone()[0] == "off":  # type: ignore[index]
                log.warning("event=store_not_durable reason=fsync_off db=%s", self.location)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def _db(self) -> psycopg.Connection[Any]:
        """The connection; a new one when the server went away (the failed call still failed)."""
        # ``closed`` covers a broken connection and one closed after a failed reconnect.
        if self._conn.closed and not self._closed:
            log.warning("event=store_reconnect db=%s", self.location)
            self._conn.close()
            self._conn = self._connect()
        return self._conn

    @staticmethod
    def _migrate(conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            # Two processes starting at once: the second waits here, then finds the work done.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "number INTEGER PRIMARY KEY, name TEXT NOT NULL,"
                " applied_at DOUBLE PRECISION NOT NULL)"
            )
        for number, name, statements in _MIGRATIONS:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                done = conn.execute(
                    "SELECT 1 FROM schema_migrations WHERE number = %s", (number,)
                ).fetchone()
                if done is None:
                    for statement in statements:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                        (number, name, time.time()),
                    )

    def close(self) -> None:
        """Close the connection."""
        self._closed = True
        self._conn.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction; a lost connection is replaced before it starts, never inside."""
        with self._db.transaction():
            self._in_transaction = True
            try:
                yield
            finally:
                self._in_transaction = False

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        conn = self._conn if self._in_transaction else self._db
        return conn.execute(sql, args)  # type: ignore[arg-type]

    # ---------------------------------------------------------- sites

    def _ensure_site(self, site_id: str, now: float) -> None:
        self._execute(
            "INSERT INTO sites (site_id, created_at) VALUES (%s, %s) ON CONFLICT DO NOTHING",
            (site_id, now),
        )

    def touch_site(self, site_id: str, now: float) -> None:
        """Note link activity of a site."""
        with self._transaction():
            self._ensure_site(site_id, now)
            self._execute(
                "UPDATE sites SET last_seen_at = %s WHERE site_id = %s", (now, site_id)
            )

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
                " VALUES (%s, %s, %s, %s)",
                (token_digest(token), site_id, now, expires_at),
            )

    def redeem_token(self, token: str, now: float) -> str:
        """Use up ``token`` and return its site id; raise TokenRejected otherwise."""
        digest = token_digest(token)
        with self._transaction():
            # One UPDATE with every condition: two racing redeemers cannot both win.
            won = self._execute(
                "UPDATE enrol_tokens SET used_at = %s"
                " WHERE digest = %s AND used_at IS NULL AND expires_at > %s RETURNING site_id",
                (now, digest, now),
            ).fetchone()
            row = None if won else self._execute(
                "SELECT used_at FROM enrol_tokens WHERE digest = %s", (digest,)
            ).fetchone()
        if won is not None:
            return str(won[0])
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
                " VALUES (%s, %s, %s, %s)",
                (str(serial), site_id, now, not_after),
            )

    def revoke_certificate(self, serial: int, now: float) -> bool:
        """Revoke by serial (known or not); False when it was already revoked."""
        with self._transaction():
            updated = self._execute(
                "UPDATE certificates SET revoked_at = %s"
                " WHERE serial = %s AND revoked_at IS NULL",
                (now, str(serial)),
            ).rowcount
            if updated:
                return True
            # A serial we never recorded (e.g. lost database): still refuse it from now on.
            self._ensure_site("_unknown", now)
            inserted = self._execute(
                "INSERT INTO certificates (serial, site_id, issued_at, not_after, revoked_at)"
                " VALUES (%s, '_unknown', %s, 0, %s) ON CONFLICT (serial) DO NOTHING",
                (str(serial), now, now),
            ).rowcount
        return inserted == 1

    def is_revoked(self, serial: int) -> bool:
        """True when the serial is on the revocation list."""
        row = self._execute(
            "SELECT 1 FROM certificates WHERE serial = %s AND revoked_at IS NOT NULL",
            (str(serial),),
        ).fetchone()
        return row is not None

    def certificates(self, site_id: str) -> list[tuple[int, float, float | None]]:
        """(serial, not_after, revoked_at) of a site's certificates, newest first."""
        rows = self._execute(
            "SELECT serial, not_after, revoked_at FROM certificates WHERE site_id = %s"
            " ORDER BY issued_at DESC",
            (site_id,),
        ).fetchall()
        return [(int(r[0]), r[1], r[2]) for r in rows]

    # ---------------------------------------------------------- ingest

    def ingest(self, events: Sequence[EventRecord], now: float, *, window: int) -> IngestResult:
        """Store a batch of one site's events exactly once; return the new ack.

        Events more than ``window`` past the current ack are not stored (refused).
        """
        if not events:
            raise StoreError("empty batch")
        site_id = events[0].site_id
        if any(e.site_id != site_id for e in events):
            raise StoreError("a batch holds the events of one site")
        with self._transaction():
            self._ensure_site(site_id, now)
            # The row lock orders concurrent batches of one site (another cloud process).
            acked = int(self._execute(
                "SELECT acked_seq FROM sites WHERE site_id = %s FOR UPDATE", (site_id,)
            ).fetchone()[0])  # type: ignore[index]
            fresh = [e for e in events if acked < e.seq <= acked + window]
            refused = sum(1 for e in events if e.seq > acked + window)
            inserted: list[tuple[int, str]] = []
            if fresh:
                # One statement per batch; duplicates inside the batch or already stored
                # are absorbed by the unique key, the first copy wins.
                inserted = self._execute(
                    "INSERT INTO events (site_id, seq, kind, payload, occurred_at, received_at)"
                    " SELECT %s, t.seq, t.kind, t.payload, t.occurred_at, %s"
                    " FROM unnest(%s::bigint[], %s::text[], %s::bytea[],"
                    " %s::double precision[]) WITH ORDINALITY"
                    " AS t(seq, kind, payload, occurred_at, n)"
                    " ORDER BY t.n"
                    " ON CONFLICT ON CONSTRAINT events_site_seq DO NOTHING RETURNING seq, kind",
                    (site_id, now, [e.seq for e in fresh], [e.kind for e in fresh],
                     [e.payload for e in fresh], [e.occurred_at for e in fresh]),
                ).fetchall()
            for kind, count in Counter(kind for _, kind in inserted).items():
                self._execute(
                    "INSERT INTO event_counts (site_id, kind, count) VALUES (%s, %s, %s)"
                    " ON CONFLICT (site_id, kind)"
                    " DO UPDATE SET count = event_counts.count + EXCLUDED.count",
                    (site_id, kind, count),
                )
            # The usual batch continues the log without a gap: the ack moves to its end at
            # once (each of its seqs is stored now, inserted or held before), then walks on.
            seqs = {e.seq for e in fresh}
            start = acked
            if seqs and min(seqs) == acked + 1 and max(seqs) - acked == len(seqs):
                start = max(seqs)
            new_ack = self._advance(site_id, start)
            self._execute(
                "UPDATE sites SET acked_seq = %s, last_seen_at = %s WHERE site_id = %s",
                (new_ack, now, site_id),
            )
        stored = len(inserted)
        return IngestResult(new_ack, stored, len(events) - stored - refused, refused)

    def _advance(self, site_id: str, acked: int) -> int:
        """Walk forward from ``acked`` while the next seq is stored."""
        while True:
            seqs = self._execute(
                "SELECT seq FROM events WHERE site_id = %s AND seq > %s ORDER BY seq LIMIT %s",
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
        row = self._execute(
            "SELECT acked_seq FROM sites WHERE site_id = %s", (site_id,)
        ).fetchone()
        return int(row[0]) if row else 0

    def events(self, site_id: str, *, after: int = 0, limit: int = 1000) -> list[EventRecord]:
        """Stored events of a site in seq order, from ``after + 1`` (held ones included)."""
        rows = self._execute(
            "SELECT seq, kind, payload, occurred_at FROM events"
            " WHERE site_id = %s AND seq > %s ORDER BY seq LIMIT %s",
            (site_id, after, limit),
        ).fetchall()
        return [EventRecord(site_id, int(r[0]), r[1], bytes(r[2]), r[3]) for r in rows]

    def queue_events(
        self, since: float, until: float, site_id: str | None = None
    ) -> list[EventRecord]:
        """Queue events (``queue.*``) that occurred in ``[since, until)``, by time, for KPIs."""
        where, args = ("AND site_id = %s", (site_id,)) if site_id else ("", ())
        rows = self._execute(
            "SELECT site_id, seq, kind, payload, occurred_at FROM events"
            " WHERE kind LIKE 'queue.%%' AND occurred_at >= %s"
            f" AND occurred_at < %s {where} ORDER BY occurred_at, site_id, seq",
            (since, until, *args),
        ).fetchall()
        return [EventRecord(r[0], int(r[1]), r[2], bytes(r[3]), r[4]) for r in rows]

    # ---------------------------------------------------------- backups

    _BACKUP_COLUMNS = "site_id, backup_id, complete, committed, sha256, started_at, completed_at"

    @staticmethod
    def _backup_record(row: Sequence[Any]) -> BackupRecord:
        return BackupRecord(
            site_id=row[0], backup_id=row[1], complete=bool(row[2]), committed=int(row[3]),
            sha256=bytes(row[4]) if row[4] is not None else None, started_at=float(row[5]),
            completed_at=float(row[6]) if row[6] is not None else None,
        )

    def backup(self, site_id: str, backup_id: str) -> BackupRecord | None:
        """The record of one backup, or None."""
        row = self._execute(
            f"SELECT {self._BACKUP_COLUMNS} FROM backups WHERE site_id = %s AND backup_id = %s",
            (site_id, backup_id),
        ).fetchone()
        return self._backup_record(row) if row else None

    def begin_backup(self, site_id: str, backup_id: str, now: float) -> BackupRecord:
        """Create a partial backup record (committed 0) unless one exists; return it."""
        with self._transaction():
            self._ensure_site(site_id, now)
            self._execute(
                "INSERT INTO backups (site_id, backup_id, started_at, updated_at)"
                " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                (site_id, backup_id, now, now),
            )
        record = self.backup(site_id, backup_id)
        assert record is not None
        return record

    def commit_backup_offset(self, site_id: str, backup_id: str, committed: int, now: float) -> None:
        """Move a partial backup's committed offset."""
        self._execute(
            "UPDATE backups SET committed = %s, updated_at = %s"
            " WHERE site_id = %s AND backup_id = %s AND NOT complete",
            (committed, now, site_id, backup_id),
        )

    def complete_backup(
        self, site_id: str, backup_id: str, size: int, sha256: bytes, now: float
    ) -> None:
        """Mark a backup complete."""
        self._execute(
            "UPDATE backups SET complete = TRUE, committed = %s, sha256 = %s, updated_at = %s,"
            " completed_at = %s WHERE site_id = %s AND backup_id = %s",
            (size, sha256, now, now, site_id, backup_id),
        )

    def delete_backup(self, site_id: str, backup_id: str) -> None:
        """Forget a backup record."""
        self._execute(
            "DELETE FROM backups WHERE site_id = %s AND backup_id = %s", (site_id, backup_id)
        )

    def backups(self, site_id: str | None = None) -> list[BackupRecord]:
        """Backups, newest first (complete by completion time, then partial ones)."""
        where, args = ("WHERE site_id = %s", (site_id,)) if site_id else ("", ())
        rows = self._execute(
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
        with self._transaction():
            self._ensure_site(site_id, now)
            # The site row lock makes concurrent pushes take consecutive versions.
            self._execute("SELECT 1 FROM sites WHERE site_id = %s FOR UPDATE", (site_id,))
            row = self._execute(
                "SELECT COALESCE(MAX(version), 0) FROM configs WHERE site_id = %s", (site_id,)
            ).fetchone()
            version = int(row[0]) + 1  # type: ignore[index]
            signature = signature_for(site_id, version, yaml)
            self._execute(
                "INSERT INTO configs VALUES (%s, %s, %s, %s, %s)",
                (site_id, version, yaml, signature, now),
            )
        return ConfigRecord(site_id, version, yaml, signature, now)

    def latest_config(self, site_id: str) -> ConfigRecord | None:
        """The newest config version of a site."""
        row = self._execute(
            "SELECT version, yaml, signature, created_at FROM configs WHERE site_id = %s"
            " ORDER BY version DESC LIMIT 1",
            (site_id,),
        ).fetchone()
        if row is None:
            return None
        return ConfigRecord(site_id, int(row[0]), bytes(row[1]), bytes(row[2]), float(row[3]))

    def config_versions(self) -> dict[str, int]:
        """The newest config version of every site that has one."""
        rows = self._execute("SELECT site_id, MAX(version) FROM configs GROUP BY site_id")
        return {r[0]: int(r[1]) for r in rows.fetchall()}


def _reason(exc: BaseException) -> str:
    """The first line of a driver error (its detail lines may quote the query)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
