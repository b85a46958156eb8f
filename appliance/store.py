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
    Migration(
        5,
        "edge agent backups and config versions",
        (
            # Written by the edge agent only (docs/backups.md). One row per backup attempt;
            # completed_at is set when the cloud confirmed the whole upload and its SHA-256.
            """CREATE TABLE edge_backups (
                backup_id TEXT PRIMARY KEY,
                reason TEXT NOT NULL,
                started_at REAL NOT NULL,
                completed_at REAL,
                size INTEGER,
                sha256 TEXT,
                error TEXT
            )""",
            # Every config version the cloud pushed and what became of it; the running version
            # is the highest with ok = 1.
            """CREATE TABLE edge_config (
                version INTEGER PRIMARY KEY,
                received_at REAL NOT NULL,
                ok INTEGER NOT NULL CHECK (ok IN (0, 1)),
                error TEXT NOT NULL DEFAULT '',
                sha256 TEXT NOT NULL
            )""",
        ),
    ),
    Migration(
        6,
        "agent desk and api user agent link",
        (
            # The presence each agent chose, one row per agent (docs/routing.md, "Agent
            # states"); written with its audit row and agent.* event in one transaction.
            """CREATE TABLE agent_desk (
                agent TEXT PRIMARY KEY,
                presence TEXT NOT NULL CHECK (presence IN ('logged-out', 'available', 'paused')),
                reason TEXT,
                since REAL NOT NULL,
                actor TEXT NOT NULL,
                source TEXT NOT NULL
            )""",
            # The agent extension (SIP account user) an API user of role agent acts for.
            "ALTER TABLE api_users ADD COLUMN agent TEXT",
            "CREATE UNIQUE INDEX api_users_agent ON api_users (agent) WHERE agent IS NOT NULL",
        ),
    ),
    Migration(
        7,
        "kpi rollups and alerts",
        (
            # Per-interval queue figures folded from the event log (docs/kpis.md, "Where
            # reports come from"); config is the KPI settings they were counted with.
            """CREATE TABLE kpi_rollup (
                config TEXT NOT NULL,
                interval_start INTEGER NOT NULL,
                queue TEXT NOT NULL,
                offered INTEGER NOT NULL DEFAULT 0,
                answered INTEGER NOT NULL DEFAULT 0,
                abandoned INTEGER NOT NULL DEFAULT 0,
                short_abandoned INTEGER NOT NULL DEFAULT 0,
                timed_out INTEGER NOT NULL DEFAULT 0,
                answered_within INTEGER NOT NULL DEFAULT 0,
                abandoned_within INTEGER NOT NULL DEFAULT 0,
                answered_wait REAL NOT NULL DEFAULT 0,
                left_wait REAL NOT NULL DEFAULT 0,
                all_wait REAL NOT NULL DEFAULT 0,
                all_abandons INTEGER NOT NULL DEFAULT 0,
                handled INTEGER NOT NULL DEFAULT 0,
                talk REAL NOT NULL DEFAULT 0,
                hold REAL NOT NULL DEFAULT 0,
                ring_no_answer INTEGER NOT NULL DEFAULT 0,
                longest_wait REAL,
                PRIMARY KEY (config, interval_start, queue)
            )""",
            # Calls the rollup has seen enter but not finish, and the seq it reflects.
            """CREATE TABLE kpi_rollup_open (
                config TEXT NOT NULL,
                call_key TEXT NOT NULL,
                state TEXT NOT NULL CHECK (json_valid(state)),
                PRIMARY KEY (config, call_key)
            )""",
            """CREATE TABLE kpi_rollup_state (
                config TEXT PRIMARY KEY,
                last_seq INTEGER NOT NULL,
                updated_at REAL NOT NULL
            )""",
            # Reports and exports read the log by time.
            "CREATE INDEX events_occurred_at ON events (occurred_at)",
        ),
    ),
    Migration(
        8,
        "call records: direction, holds, who ended the call, recording decision",
        (
            # docs/calls.md: inbound (carrier -> agent) or outbound (agent -> carrier).
            "ALTER TABLE call_records ADD COLUMN direction TEXT NOT NULL DEFAULT 'inbound'"
            " CHECK (direction IN ('inbound', 'outbound'))",
            # JSON list of [start, end] hold periods (end null while held at the end).
            "ALTER TABLE call_records ADD COLUMN holds TEXT NOT NULL DEFAULT '[]'"
            " CHECK (json_valid(holds))",
            # The API user who ended the call, when it was ended through the API.
            "ALTER TABLE call_records ADD COLUMN ended_by TEXT",
            # Why the call was or was not recorded (the queue's policy and its draw).
            "ALTER TABLE call_records ADD COLUMN recording_decision TEXT",
        ),
    ),
    Migration(
        9,
        "trunk status: the carrier's keep-alive state and registration, for edgecc doctor",
        (
            # One row per carrier, replaced by appliance.sip.trunk on every outcome.
            "CREATE TABLE trunk_status (carrier TEXT PRIMARY KEY, state TEXT NOT NULL"
            " CHECK (state IN ('unknown', 'up', 'down')), state_since REAL NOT NULL,"
            " failures INTEGER NOT NULL, registration TEXT NOT NULL, registered_until REAL,"
            " reason TEXT NOT NULL, options_interval REAL, updated_at REAL NOT NULL)",
        ),
    ),
    Migration(
        10,
        "audit log hash chain",
        (
            # appliance/audit.py: hash = SHA-256(prev_hash, id, at, actor, action, detail).
            "ALTER TABLE audit_log ADD COLUMN prev_hash TEXT",
            "ALTER TABLE audit_log ADD COLUMN hash TEXT",
            # Two rows naming the same predecessor would be a fork: refused outright.
            "CREATE UNIQUE INDEX audit_log_prev_hash ON audit_log (prev_hash)",
            # The head (written with every row, so a cut-off tail is found) and the last row
            # older than the chain; SQL cannot hash, so appliance.audit.append chains those
            # rows, in id order, in the transaction of the first row appended after this.
            "CREATE TABLE audit_chain (id INTEGER PRIMARY KEY CHECK (id = 1),"
            " legacy_last_id INTEGER NOT NULL, head_id INTEGER, head_hash TEXT)",
            "INSERT INTO audit_chain (id, legacy_last_id)"
            " SELECT 1, COALESCE(MAX(id), 0) FROM audit_log",
            # Append-only: a chained row is never changed or removed by the appliance.
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log"
            " WHEN OLD.hash IS NOT NULL"
            " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
        ),
    ),
    Migration(
        11,
        "queued callbacks (pending ones survive a restart), the attempt's request, voicemail",
        (
            # appliance/calls/callbacks.py: one row per request, its id the requesting call's.
            "CREATE TABLE callback_requests (call_id TEXT PRIMARY KEY, queue TEXT NOT NULL,"
            " number TEXT NOT NULL, caller TEXT NOT NULL, priority INTEGER NOT NULL,"
            " requested_at REAL NOT NULL, place_at REAL NOT NULL, state TEXT NOT NULL"
            " CHECK (state IN ('waiting', 'dialling', 'answered', 'failed', 'cancelled')),"
            " attempts INTEGER NOT NULL, variables TEXT NOT NULL, updated_at REAL NOT NULL)",
            "CREATE INDEX callback_requests_pending ON callback_requests (state, place_at)",
            # Call records gain the direction "callback" (SQLite cannot change a CHECK: the
            # table is rebuilt, rows kept) and name the request an attempt dials for.
            """CREATE TABLE call_records_next (
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
                legs TEXT NOT NULL CHECK (json_valid(legs)),
                direction TEXT NOT NULL DEFAULT 'inbound'
                    CHECK (direction IN ('inbound', 'outbound', 'callback')),
                holds TEXT NOT NULL DEFAULT '[]' CHECK (json_valid(holds)),
                ended_by TEXT,
                recording_decision TEXT,
                callback_of TEXT
            )""",
            "INSERT INTO call_records_next (call_id, sip_call_id, caller, dialled, flow, queue,"
            " agent, started_at, offered_at, answered_at, ended_at, end_reason, end_code,"
            " recording_id, ivr_trace, legs, direction, holds, ended_by, recording_decision)"
            " SELECT call_id, sip_call_id, caller, dialled, flow, queue, agent, started_at,"
            " offered_at, answered_at, ended_at, end_reason, end_code, recording_id, ivr_trace,"
            " legs, direction, holds, ended_by, recording_decision FROM call_records",
            "DROP TABLE call_records",
            "ALTER TABLE call_records_next RENAME TO call_records",
            "CREATE INDEX call_records_started_at ON call_records (started_at)",
            "CREATE INDEX call_records_agent ON call_records (agent, started_at)",
            "CREATE INDEX call_records_callback_of ON call_records (callback_of)"
            " WHERE callback_of IS NOT NULL",
            # appliance/calls/voicemail.py: which recordings are voice messages, and for whom.
            "CREATE TABLE voicemail_messages (recording_id TEXT PRIMARY KEY,"
            " call_id TEXT NOT NULL, mailbox TEXT NOT NULL, queue TEXT, caller TEXT,"
            " variables TEXT NOT NULL CHECK (json_valid(variables)), duration_s REAL NOT NULL,"
            " left_at REAL NOT NULL)",
            "CREATE INDEX voicemail_messages_mailbox ON voicemail_messages (mailbox, left_at)",
        ),
    ),
    Migration(
        12,
        "calls the router held for each agent, as the desk's watchdog last saw them",
        (
            # appliance/acd/desk.py: cleared (and audited) at the next start, since no call
            # outlives the process that carried it.
            "CREATE TABLE agent_desk_calls (agent TEXT NOT NULL, call_id TEXT NOT NULL,"
            " kind TEXT NOT NULL CHECK (kind IN ('on-call', 'ringing', 'dialling')),"
            " since REAL NOT NULL, PRIMARY KEY (agent, call_id))",
        ),
    ),
    Migration(
        13,
        "calls in progress, so that a crash leaves a trace the next start records",
        (
            # appliance/calls/control.py: a row from a call's start until its record is
            # written (in the record's transaction); rows found at start were interrupted.
            "CREATE TABLE calls_in_progress (call_id TEXT PRIMARY KEY, sip_call_id TEXT NOT NULL,"
            " caller TEXT, dialled TEXT, flow TEXT, direction TEXT NOT NULL,"
            " started_at REAL NOT NULL, queue TEXT, agent TEXT, answered_at REAL)",
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
    """Append one row to the hash-chained audit log (``appliance.audit``), commit, return its id.

    Inside a transaction the caller opened, the row joins it and commits it (as it always did);
    otherwise it gets its own ``BEGIN IMMEDIATE`` transaction.
    """
    from appliance.audit import append

    conn = db.conn
    own = not conn.in_transaction
    if own:
        # IMMEDIATE: the chain head is read under the write lock, so writers never fork it.
        conn.execute("BEGIN IMMEDIATE")
    try:
        row_id = append(conn, time.time(), actor, action, detail)
    except BaseException:
        # As ``with conn:`` always did here: a failed audit row rolls the transaction back.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return row_id


def _check_sequence(migrations: Sequence[Migration]) -> None:
    numbers = sorted(m.number for m in migrations)
    if numbers != list(range(1, len(numbers) + 1)):
        raise ValueError(f"migrations must be numbered 1..N without gaps, got {numbers}")


def running_config_version(db: sqlite_utils.Database | sqlite3.Connection) -> int:
    """The newest config version pushed by the cloud and installed by the edge agent (table
    ``edge_config``, docs/backups.md); 0 when none was, or before that table exists."""
    try:
        row = db.execute("SELECT MAX(version) FROM edge_config WHERE ok = 1").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0] or 0)
