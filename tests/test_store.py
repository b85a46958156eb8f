"""The site database on real files: WAL, synchronous=FULL, numbered transactional migrations."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.store import (
    MIGRATIONS,
    Migration,
    MigrationError,
    apply_migrations,
    audit,
    open_site_db,
    schema_version,
)


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def test_fresh_database_has_schema_wal_and_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert schema_version(db) == len(MIGRATIONS)
        columns = {c.name: c for c in db["sip_bindings"].columns}
        assert list(columns) == [
            "aor", "contact", "expires_at", "call_id", "cseq", "q", "received", "transport",
            "instance", "user_agent",
        ]
        assert db["sip_bindings"].pks == ["aor", "contact"]
        assert [c.name for c in db["audit_log"].columns] == [
            "id", "at", "actor", "action", "detail", "prev_hash", "hash"]
    finally:
        db.close()
    assert {"sip_bindings", "audit_log", "schema_migrations"} <= _tables(path)


def test_reopen_keeps_rows_and_applies_nothing_twice(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    db["sip_bindings"].insert(
        {"aor": "1001", "contact": "sip:1001@127.0.0.1:5070", "expires_at": 1e9, "cseq": 7}
    )
    row_id = audit(db, "cli", "init", "demo site")
    db.close()

    db = open_site_db(path)
    try:
        assert apply_migrations(db, MIGRATIONS) == []
        assert db.execute("SELECT COUNT(*) FROM schema_migrations").fetchone()[0] == len(MIGRATIONS)
        assert db["sip_bindings"].get(("1001", "sip:1001@127.0.0.1:5070"))["cseq"] == 7
        assert db["audit_log"].get(row_id)["action"] == "init"
    finally:
        db.close()


def test_failing_migration_rolls_back_whole_and_keeps_earlier(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    broken = Migration(
        len(MIGRATIONS) + 1,
        "half good",
        ("CREATE TABLE queue_events (id INTEGER PRIMARY KEY)", "CREATE TABLE broken (("),
    )
    with pytest.raises(MigrationError) as caught:
        open_site_db(path, migrations=(*MIGRATIONS, broken))
    assert caught.value.migration is broken
    assert "half good" in str(caught.value)

    tables = _tables(path)
    assert "sip_bindings" in tables  # earlier migrations stay committed
    assert "queue_events" not in tables  # the failing one left nothing behind
    db = open_site_db(path)
    try:
        assert schema_version(db) == len(MIGRATIONS)
    finally:
        db.close()


def test_new_migration_applies_once_on_existing_database(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    open_site_db(path).close()
    extra = Migration(len(MIGRATIONS) + 1, "queue events", ("CREATE TABLE queue_events (id)",))
    db = open_site_db(path, migrations=(*MIGRATIONS, extra))
    try:
        assert schema_version(db) == extra.number
        assert apply_migrations(db, (*MIGRATIONS, extra)) == []
    finally:
        db.close()


def test_second_connection_sees_migrations_applied_by_first(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    first = open_site_db(path)
    second = open_site_db(path)
    try:
        assert apply_migrations(second, MIGRATIONS) == []
        first["audit_log"].insert({"at": 1.0, "actor": "a", "action": "x"})
        assert second.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0] == 1
    finally:
        first.close()
        second.close()


def test_gaps_in_numbering_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without gaps"):
        open_site_db(tmp_path / "x.db", migrations=(Migration(2, "two", ("SELECT 1",)),))


def test_two_processes_opening_a_new_database_at_once_apply_each_migration_once(
    tmp_path: Path,
) -> None:
    path = tmp_path / "edgecc.db"
    code = (
        "import sys; from appliance.store import open_site_db; "
        "open_site_db(sys.argv[1]).close(); print('ok')"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], results
    with sqlite3.connect(path) as conn:
        numbers = [n for (n,) in conn.execute("SELECT number FROM schema_migrations")]
    assert numbers == [m.number for m in MIGRATIONS]
