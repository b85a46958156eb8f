"""The site database: one SQLite file, WAL, ``synchronous=FULL``, numbered migrations.

``open_site_db(path)`` opens (creating if needed) the database and brings its schema up to date.
Each migration runs in its own ``BEGIN IMMEDIATE`` transaction together with the row that records
it in ``schema_migrations``: it is applied whole or not at all, and a second opener (another
process racing at start-up) waits for the lock and then finds it already applied.

Migrations are plain SQL statements run through the connection, never sqlite-utils' table
helpers, so no helper can commit half a migration behind our back.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils


@dataclass(frozen=True)
class Migration:
    """One numbered schema change."""

    number: int
    """Position in the sequence, starting at 1, never reused."""
    name: str
    """Short description kept in ``schema_migrations``."""
    statements: tuple[str, ...]
    """SQL statements, run in order inside one transaction."""


class MigrationError(Exception):
    """A migration failed; its transaction was rolled back and later ones were not tried."""

    def __init__(self, migration: Migration, cause: BaseException) -> None:
        super().__init__(f"migration {migration.number} ({migration.name}) failed: {cause}")
        self.migration = migration
        self.__cause__ = cause


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "sip bindings and audit log",
        (
            # RFC 3261 §10.3: a binding is keyed by address-of-record and contact URI.
            """CREATE TABLE sip_bindings (
                aor TEXT NOT NULL,
                contact TEXT NOT NULL,
                expires_at REAL NOT NULL,
                call_id TEXT,
                cseq INTEGER,
                q REAL,
                received TEXT,
                transport TEXT,
                instance TEXT,
                user_agent TEXT,
                PRIMARY KEY (aor, contact)
            )""",
            "CREATE INDEX sip_bindings_expires_at ON sip_bindings (expires_at)",
            """CREATE TABLE audit_log (
                id INTEGER PRIMARY KEY,
                at REAL NOT NULL,
                actor TEXT NOT NULL,
                action TEXT NOT NULL,
                detail TEXT
            )""",
        ),
    ),
    Migration(
        2,
        "event log, outbox and link state",
        (
            # The append-only event log. AUTOINCREMENT: a seq is never handed out twice, even
            # if rows were ever removed; the cloud keys events on (site_id, seq).
            """CREATE TABLE events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                site_id TEXT NOT NULL,
                kind TEXT NOT NULL,
                occurred_at REAL NOT NULL,
                payload TEXT NOT NULL CHECK (json_valid(payload))
            )""",
            """CREATE TRIGGER events_append_only_update BEFORE UPDATE ON events
               BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
            """CREATE TRIGGER events_append_only_delete BEFORE DELETE ON events
               BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
            # The site this log belongs to: one row, set once.
            """CREATE TABLE event_site (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                site_id TEXT NOT NULL
            )""",
            # What the edge agent still owes the cloud; a row goes when the cloud acknowledged
            # its seq, or (droppable kinds only) when the quota policy gave up its body.
            """CREATE TABLE outbox (
                seq INTEGER PRIMARY KEY REFERENCES events (seq),
                priority INTEGER NOT NULL,
                enqueued_at REAL NOT NULL,
                bytes INTEGER NOT NULL
            )""",
            "CREATE INDEX outbox_drop_order ON outbox (priority, seq)",
            """CREATE TABLE link_state (
                id INTEGER PRIMARY KEY CHECK (id = 1),
                state TEXT NOT NULL CHECK (state IN ('online', 'degraded', 'offline')),
                since REAL NOT NULL,
                acked_seq INTEGER NOT NULL DEFAULT 0,
                lag_events INTEGER NOT NULL DEFAULT 0,
                lag_seconds REAL NOT NULL DEFAULT 0,
                detail TEXT NOT NULL DEFAULT '',
                outbox_bytes INTEGER NOT NULL DEFAULT 0,
                dropped_events INTEGER NOT NULL DEFAULT 0,
                dropped_bytes INTEGER NOT NULL DEFAULT 0,
                updated_at REAL NOT NULL
            )""",
        ),
    ),
    Migration(
        3,
        "api users and tokens",
        (
            # Passwords as scrypt hashes (RFC 7914); admins and supervisors must have a TOTP
            # secret (RFC 6238); totp_last_step refuses a code used once already (§5.2).
            """CREATE TABLE api_users (
                id INTEGER PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                display_name TEXT,
                role TEXT NOT NULL CHECK (role IN ('admin', 'supervisor', 'agent')),
                password_hash TEXT NOT NULL,
                totp_secret TEXT,
                totp_last_step INTEGER,
                failures INTEGER NOT NULL DEFAULT 0,
                failures_since REAL,
                locked_until REAL,
                created_at REAL NOT NULL,
                CHECK (role = 'agent' OR totp_secret IS NOT NULL)
            )""",
            # Bearer tokens are stored as their SHA-256 only; the role is fixed at login.
            """CREATE TABLE api_tokens (
                token_hash TEXT PRIMARY KEY,
                user_id INTEGER NOT NULL REFERENCES api_users (id) ON DELETE CASCADE,
                role TEXT NOT NULL CHECK (role IN ('admin', 'supervisor', 'agent')),
                issued_at REAL NOT NULL,
                expires_at REAL NOT NULL,
                source TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX api_tokens_expires_at ON api_tokens (expires_at)",
            "CREATE INDEX api_tokens_user_id ON api_tokens (user_id)",
        ),
    ),
    Migration(
        4,
        "call records",
        (
            # One row per call, written with its queue events and call.record event in one
            # transaction (docs/calls.md). Times are seconds since the epoch; legs is JSON.
            """CREATE TABLE call_records (
                call_id TEXT PRIMARY KEY,
                sip_call_id TEXT NOT NULL,
                caller TEXT,
                dialled TEXT,
                flow TEXT,
                queue TEXT,
                agent TEXT,
                started_at REAL NOT NULL,
                offered_at REAL,
                answered_at REAL,
                ended_at REAL NOT NULL,
                end_reason TEXT NOT NULL,
                end_code INTEGER,
                recording_id TEXT,
                ivr_trace TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(ivr_trace)),
                legs TEXT NOT NULL CHECK (json_valid(legs))
            )""",
            "CREATE INDEX call_records_started_at ON call_records (started_at)",
            "CREATE INDEX call_records_agent ON call_records (agent, started_at)",
        ),
    ),
)

_BUSY_TIMEOUT_S = 10.0


def open_site_db(
    path: Path | str, *, migrations: Sequence[Migration] = MIGRATIONS
) -> sqlite_utils.Database:
    """Open the site database at ``path`` and apply pending migrations.

    The connection may be handed to one worker thread at a time (``check_same_thread`` is off so
    that blocking writes can run off the event loop). Raises MigrationError when a migration
    fails; the database is then left at the last migration that succeeded.
    """
    _check_sequence(migrations)
    conn = sqlite3.connect(str(path), timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
    try:
        db = sqlite_utils.Database(conn)
        db.enable_wal()
        # Committed call records and events must survive power loss, not just a crash.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        apply_migrations(db, migrations)
    except BaseException:
        conn.close()
        raise
    return db


def apply_migrations(db: sqlite_utils.Database, migrations: Sequence[Migration]) -> list[int]:
    """Apply the migrations not yet recorded; return the numbers applied now."""
    _check_sequence(migrations)
    conn = db.conn
    db.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "number INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied_now: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.number):
        # IMMEDIATE takes the write lock before the check, so two openers cannot both apply it.
        conn.execute("BEGIN IMMEDIATE")
        try:
            done = conn.execute(
                "SELECT 1 FROM schema_migrations WHERE number = ?", (migration.number,)
            ).fetchone()
            if done is None:
                for statement in migration.statements:
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations (number, name, applied_at) VALUES (?, ?, ?)",
                    (migration.number, migration.name, time.time()),
                )
                applied_now.append(migration.number)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise MigrationError(migration, exc) from exc
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return applied_now


def schema_version(db: sqlite_utils.Database) -> int:
    """The highest migration number applied (0 for an empty database)."""
    if "schema_migrations" not in db.table_names():
        return 0
    row = db.execute("SELECT MAX(number) FROM schema_migrations").fetchone()
    return int(row[0] or 0)


def audit(db: sqlite_utils.Database, actor: str, action: str, detail: str = "") -> int:
    """Append one row to the audit log and return its id."""
    with db.conn:
        cursor = db.conn.execute(
            "INSERT INTO audit_log (at, actor, action, detail) VALUES (?, ?, ?, ?)",
            (time.time(), actor, action, detail),
        )
    return int(cursor.lastrowid or 0)


def _check_sequence(migrations: Sequence[Migration]) -> None:
    numbers = sorted(m.number for m in migrations)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"migrations must be numbered 1..N without gaps, got {numbers}")
