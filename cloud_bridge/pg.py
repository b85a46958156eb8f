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
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cloud_bridge.store import (
    EventColumns,
    SqlCloudStore,
    StoreError,
)

try:
    import psycopg
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise StoreError(
        "PostgreSQL stores need psycopg 3: pip install 'psycopg[binary]>=3.1'"
    ) from exc

log = logging.getLogger("edgecc.cloud.store")

_CONNECT_TIMEOUT_S = 10
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


class PostgresCloudStore(SqlCloudStore):
    """``CloudStore`` on a PostgreSQL database (one connection, autocommit between calls)."""

    _ROW_LOCK = " FOR UPDATE"

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
        """Run a statement written with ``?`` placeholders (SqlCloudStore's SQL)."""
        conn = self._conn if self._in_transaction else self._db
        return conn.execute(_pg_sql(sql), tuple(args))  # type: ignore[arg-type]

    def _insert_events(self, fresh: EventColumns, now: float) -> Sequence[str]:
        # One statement per batch; events held before are absorbed by the unique key, and
        # RETURNING names the ones inserted.
        rows = self._execute(
            "INSERT INTO events (site_id, seq, kind, payload, occurred_at, received_at)"
            " SELECT ?, t.seq, t.kind, t.payload, t.occurred_at, ?"
            " FROM unnest(?::bigint[], ?::text[], ?::bytea[], ?::double precision[])"
            " WITH ORDINALITY AS t(seq, kind, payload, occurred_at, n)"
            " ORDER BY t.n"
            " ON CONFLICT ON CONSTRAINT events_site_seq DO NOTHING RETURNING kind",
            (fresh.site_id, now, list(fresh.seqs), list(fresh.kinds), list(fresh.payloads),
             list(fresh.occurred_at)),
        ).fetchall()
        return [kind for (kind,) in rows]


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """``sql`` with psycopg's placeholders: ``?`` becomes ``%s``, a literal ``%`` ``%%``."""
    return sql.replace("%", "%%").replace("?", "%s")


def _reason(exc: BaseException) -> str:
    """The first line of a driver error (its detail lines may quote the query)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
