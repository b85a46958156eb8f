"""The hash-chained audit log: every kind of tampering is found, writers never fork the chain,
rows older than the chain are chained once, and ``edgecc audit verify`` says where it broke."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import eventlog
from appliance.audit import (
    GENESIS,
    AuditChainError,
    append,
    canonical,
    record,
    row_hash,
    verify,
)
from appliance.store import MIGRATIONS, audit, open_site_db

EDGECC = str(Path(sys.executable).parent / "edgecc")
THREAD_TIMEOUT_S = 60.0


def edgecc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([EDGECC, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def db(tmp_path: Path) -> Iterator:
    database = open_site_db(tmp_path / "edgecc.db")
    yield database
    database.conn.close()


def fill(db, count: int) -> list[int]:
    return [audit(db, f"api:user{i % 3}", "config.change", f"n={i} note=é\n") for i in
            range(count)]


def attacker(path: Path) -> sqlite3.Connection:
    """Someone with write access to the file: drops the append-only triggers first."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("DROP TRIGGER audit_log_no_update")
    conn.execute("DROP TRIGGER audit_log_no_delete")
    return conn


def rewritten_chain(path: Path) -> sqlite3.Connection:
    """The attacker edits the first row, then recomputes every hash from it on and the head
    (SHA-256 has no key): the chain is consistent in itself again. Returns their connection."""
    conn = attacker(path)
    conn.execute("DROP INDEX audit_log_prev_hash")
    conn.execute("UPDATE audit_log SET detail = 'n=0 (rewritten)' WHERE id = 1")
    prev = GENESIS
    for row_id, at, actor, action, detail in conn.execute(
            "SELECT id, at, actor, action, detail FROM audit_log ORDER BY id").fetchall():
        digest = row_hash(prev, row_id, at, actor, action, detail)
        conn.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE id = ?",
                     (prev, digest, row_id))
        prev = digest
    conn.execute("UPDATE audit_chain SET head_hash = ?", (prev,))
    return conn


# --------------------------------------------------------------------------- the chain


def test_each_row_hashes_its_predecessor_and_its_fields(db) -> None:
    ids = fill(db, 4)
    assert ids == [1, 2, 3, 4]
    rows = db.execute("SELECT id, at, actor, action, detail, prev_hash, hash FROM audit_log "
                      "ORDER BY id").fetchall()
    prev = GENESIS
    for row_id, at, actor, action, detail, prev_hash, digest in rows:
        assert prev_hash == prev
        # The documented encoding, rebuilt by hand: domain, prev, id, at, texts with lengths.
        texts = b"".join(struct.pack(">I", len(t.encode())) + t.encode() for t in (actor, action))
        body = (b"edgecc audit v1\x00" + bytes.fromhex(prev) + struct.pack(">qd", row_id, at)
                + texts + b"\x01" + struct.pack(">I", len(detail.encode())) + detail.encode())
        assert digest == hashlib.sha256(body).hexdigest()
        prev = digest
    report = verify(db.conn)
    assert (report.ok, report.rows, report.legacy, report.head_id, report.head_hash) == (
        True, 4, 0, 4, prev)


def test_field_boundaries_and_null_detail_change_the_hash() -> None:
    base = row_hash(GENESIS, 1, 1.5, "ab", "c", "")
    assert base != row_hash(GENESIS, 1, 1.5, "a", "bc", "")
    assert base != row_hash(GENESIS, 1, 1.5, "ab", "c", None)
    assert base != row_hash(GENESIS, 2, 1.5, "ab", "c", "")
    assert base != row_hash(GENESIS, 1, 1.5000001, "ab", "c", "")
    assert canonical(GENESIS, 1, 1.5, "ab", "c", None).endswith(b"\x00")


def test_an_empty_log_verifies(db) -> None:
    report = verify(db.conn)
    assert (report.ok, report.rows, report.head_id, report.head_hash) == (True, 0, None, None)


def test_rows_cannot_be_changed_or_removed_through_sql(db) -> None:
    fill(db, 2)
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.conn.execute("UPDATE audit_log SET detail = 'x' WHERE id = 1")
    db.conn.rollback()
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.conn.execute("DELETE FROM audit_log WHERE id = 2")
    db.conn.rollback()
    assert verify(db.conn).ok


def test_append_needs_a_transaction_and_a_rollback_leaves_no_trace(db) -> None:
    fill(db, 1)
    with pytest.raises(AuditChainError, match="transaction"):
        append(db.conn, 1.0, "x", "y", "")
    head = verify(db.conn).head_hash
    with pytest.raises(RuntimeError), eventlog.transaction(db) as conn:
        append(conn, 2.0, "acd", "agent.login", "agent=1001")
        raise RuntimeError("the desk row failed")
    assert verify(db.conn).head_hash == head
    with eventlog.transaction(db) as conn:
        assert append(conn, 3.0, "acd", "agent.login", "agent=1001") == 2
    report = verify(db.conn)
    assert report.ok and report.rows == 2


def test_record_joins_a_writing_transaction_or_commits_its_own(db) -> None:
    assert record(db.conn, 1.0, "retention", "recording_export", "n=0") == 1
    assert not db.conn.in_transaction
    with pytest.raises(RuntimeError), db.conn:  # like the recording store's `with conn:`
        db.conn.execute("INSERT INTO event_site (id, site_id) VALUES (1, 'paris-1')")
        record(db.conn, 2.0, "retention", "recording_erased", "n=1")
        raise RuntimeError("the erasure failed")
    report = verify(db.conn)
    assert report.ok and report.rows == 1  # the row went with the rolled back change


def test_a_fork_is_refused_by_the_database(db) -> None:
    fill(db, 1)
    first_prev = db.execute("SELECT prev_hash FROM audit_log WHERE id = 1").fetchone()[0]
    with pytest.raises(sqlite3.IntegrityError):
        db.conn.execute("INSERT INTO audit_log (at, actor, action, detail, prev_hash, hash) "
                        "VALUES (1, 'x', 'y', '', ?, ?)", (first_prev, "f" * 64))
    db.conn.rollback()


# --------------------------------------------------------------------------- tampering


def tampered(tmp_path: Path, change: str, *params: object, rows: int = 6):
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    fill(db, rows)
    db.conn.close()
    conn = attacker(path)
    conn.execute(change, params)
    report = verify(conn)
    conn.close()
    return report


def test_an_edited_row_is_found(tmp_path: Path) -> None:
    report = tampered(tmp_path, "UPDATE audit_log SET actor = 'api:someone-else' WHERE id = 3")
    assert not report.ok and report.bad_id == 3 and "edited" in report.problem
    assert report.head_id == 2  # the last row that was still good


def test_an_edited_time_is_found(tmp_path: Path) -> None:
    report = tampered(tmp_path, "UPDATE audit_log SET at = at - 3600 WHERE id = 5")
    assert not report.ok and report.bad_id == 5 and "edited" in report.problem


def test_a_deleted_row_is_found(tmp_path: Path) -> None:
    report = tampered(tmp_path, "DELETE FROM audit_log WHERE id = 4")
    assert not report.ok and report.bad_id == 5 and "deleted" in report.problem


def test_deleting_the_first_row_is_found(tmp_path: Path) -> None:
    report = tampered(tmp_path, "DELETE FROM audit_log WHERE id = 1")
    assert not report.ok and report.bad_id == 2


def test_rows_cut_off_the_end_are_found(tmp_path: Path) -> None:
    report = tampered(tmp_path, "DELETE FROM audit_log WHERE id >= 5")
    assert not report.ok and report.bad_id == 6 and "cut off" in report.problem


def test_an_inserted_row_is_found(tmp_path: Path) -> None:
    # A plausible row slipped in between 2 and 3, even with a hash that chains from row 2.
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    fill(db, 4)
    db.conn.close()
    conn = attacker(path)
    prev = conn.execute("SELECT hash FROM audit_log WHERE id = 2").fetchone()[0]
    conn.execute("DROP INDEX audit_log_prev_hash")
    conn.execute("UPDATE audit_log SET id = id + 10 WHERE id >= 3")
    forged = row_hash(prev, 3, 5.0, "api:ada", "user.delete", "name=bob")
    conn.execute("INSERT INTO audit_log VALUES (3, 5.0, 'api:ada', 'user.delete', 'name=bob', "
                 "?, ?)", (prev, forged))
    report = verify(conn)
    conn.close()
    assert not report.ok and report.bad_id == 13  # the old row 3 no longer follows
    assert report.head_id == 3


def test_an_unchained_row_is_found(tmp_path: Path) -> None:
    report = tampered(tmp_path, "INSERT INTO audit_log (at, actor, action, detail) "
                      "VALUES (9, 'api:x', 'y', '')")
    assert not report.ok and report.bad_id == 7 and "not chained" in report.problem


def test_reordered_rows_are_found(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    fill(db, 5)
    db.conn.close()
    conn = attacker(path)
    conn.execute("UPDATE audit_log SET id = -id WHERE id IN (2, 3)")
    conn.execute("UPDATE audit_log SET id = 5 + id WHERE id IN (-2, -3)")  # 2 <-> 3
    report = verify(conn)
    conn.close()
    assert not report.ok and report.bad_id == 2


def test_a_rewritten_chain_is_found_only_against_a_head_kept_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    fill(db, 5)
    kept = verify(db.conn).head_hash
    db.conn.close()
    conn = rewritten_chain(path)
    assert verify(conn).ok  # the honest limit: a full rewrite is consistent in itself
    report = verify(conn, expect_head=kept)
    conn.close()
    assert not report.ok and "rewritten" in report.problem


def test_a_head_still_in_a_grown_chain_verifies(db) -> None:
    fill(db, 3)
    kept = verify(db.conn).head_hash
    fill(db, 3)
    assert verify(db.conn, expect_head=kept).ok


# --------------------------------------------------------------------------- older rows


def test_rows_older_than_the_chain_are_chained_in_id_order_by_the_first_append(
        tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    old = open_site_db(path, migrations=MIGRATIONS[:9])
    with old.conn:
        old.conn.executemany("INSERT INTO audit_log (at, actor, action, detail) "
                             "VALUES (?, 'appliance', 'start', ?)",
                             [(float(i), f"n={i}") for i in range(5)])
        old.conn.execute("INSERT INTO audit_log (at, actor, action) VALUES (9, 'acd', 'call')")
    old.conn.close()
    db = open_site_db(path)
    try:
        report = verify(db.conn)
        assert (report.ok, report.rows, report.legacy) == (True, 6, 6)
        assert audit(db, "appliance", "start", "after=upgrade") == 7
        report = verify(db.conn)
        assert (report.ok, report.rows, report.legacy, report.head_id) == (True, 7, 0, 7)
        first = db.execute("SELECT prev_hash FROM audit_log WHERE id = 1").fetchone()[0]
        assert first == GENESIS
        # From now on those rows are protected like any other.
        conn = attacker(path)
        conn.execute("UPDATE audit_log SET detail = '' WHERE id = 6")
        report = verify(conn)
        conn.close()
        assert not report.ok and report.bad_id == 6
    finally:
        db.conn.close()


# --------------------------------------------------------------------------- concurrency


def test_writers_on_several_connections_and_threads_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    per_writer = 150
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def with_store_audit(name: str) -> None:
        db = open_site_db(path)
        try:
            barrier.wait(THREAD_TIMEOUT_S)
            for i in range(per_writer):
                audit(db, name, "write", f"i={i}")
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.conn.close()

    def in_own_transactions(name: str) -> None:
        # Like the agent desk: the audit row commits with an event in one transaction.
        db = open_site_db(path)
        try:
            eventlog.bind_site(db, "paris-1")
            barrier.wait(THREAD_TIMEOUT_S)
            for i in range(per_writer):
                with eventlog.transaction(db) as conn:
                    append(conn, float(i), name, "agent.login", f"i={i}")
                    eventlog.append(db, "agent.login", {"i": i}, occurred_at=float(i))
        except BaseException as exc:
            errors.append(exc)
        finally:
            db.conn.close()

    open_site_db(path).conn.close()
    threads = [threading.Thread(target=with_store_audit, args=("api",)),
               threading.Thread(target=with_store_audit, args=("cli",)),
               threading.Thread(target=in_own_transactions, args=("desk",))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(THREAD_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    db = open_site_db(path)
    try:
        report = verify(db.conn)
        assert (report.ok, report.rows, report.head_id) == (True, 3 * per_writer, 3 * per_writer)
        by_actor = dict(db.execute("SELECT actor, COUNT(*) FROM audit_log GROUP BY actor"))
        assert by_actor == {"api": per_writer, "cli": per_writer, "desk": per_writer}
    finally:
        db.conn.close()


# --------------------------------------------------------------------------- edgecc audit verify


@pytest.fixture(scope="module")
def template_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("template") / "site"
    result = edgecc("init", "--demo", "--site-dir", str(site), "--sip-port", "0",
                    "--http-port", "0", "--agents", "1")
    assert result.returncode == 0, result.stderr
    return site


@pytest.fixture
def site(template_site: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "site"
    shutil.copytree(template_site, copy)
    return copy


def test_verify_command_ok_then_broken(site: Path) -> None:
    db = open_site_db(site / "edgecc.db")
    fill(db, 5)
    db.conn.close()
    ok = edgecc("audit", "verify", "--site-dir", str(site))
    assert ok.returncode == 0, ok.stderr
    assert "audit chain ok: 5 rows" in ok.stdout
    head = ok.stdout.split("hash=")[1].split()[0]
    assert len(head) == 64

    conn = attacker(site / "edgecc.db")
    conn.execute("UPDATE audit_log SET action = 'nothing' WHERE id = 4")
    conn.close()
    broken = edgecc("audit", "verify", "--site-dir", str(site), "--expect-head", head)
    assert broken.returncode == 1
    assert "BROKEN at row 4" in broken.stdout and "edited" in broken.stdout


def test_verify_command_does_not_change_the_database(site: Path) -> None:
    db = open_site_db(site / "edgecc.db")
    fill(db, 2)
    db.conn.close()
    before = (site / "edgecc.db").read_bytes()
    assert edgecc("audit", "verify", "--site-dir", str(site)).returncode == 0
    assert (site / "edgecc.db").read_bytes() == before


def test_verify_command_on_a_site_without_a_database_or_config(site: Path,
                                                              tmp_path: Path) -> None:
    for name in ("edgecc.db", "edgecc.db-wal", "edgecc.db-shm"):
        (site / name).unlink(missing_ok=True)
    missing = edgecc("audit", "verify", "--site-dir", str(site))
    assert missing.returncode == 1 and "no site database" in missing.stderr
    assert not (site / "edgecc.db").exists()
    nothing = edgecc("audit", "verify", "--site-dir", str(tmp_path / "nowhere"))
    assert nothing.returncode == 2


# --------------------------------------------------------------------------- size


@pytest.mark.long
def test_verify_walks_a_hundred_thousand_rows(db) -> None:
    with eventlog.transaction(db) as conn:
        for i in range(100_000):
            append(conn, float(i), "api:ada", "config.change", f"n={i}")
    report = verify(db.conn)
    assert report.ok and report.rows == 100_000
