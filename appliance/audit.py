"""The audit log as a hash chain: every row commits to the one before it.

Each row of ``audit_log`` carries ``prev_hash`` (the ``hash`` of the row before it in id order,
:data:`GENESIS` for the first) and ``hash`` = SHA-256 over the canonical encoding of
``(prev_hash, id, at, actor, action, detail)`` (:func:`canonical`). Editing, deleting, inserting
or reordering rows breaks the chain at the first row touched; :func:`verify` walks it and names
that row. ``audit_chain`` keeps the head (last id and hash), written with every row, so cutting
rows off the end is found too.

What this does not do: anyone who can write the database file can recompute the whole chain from
the row they changed onwards. The head hash kept *outside* the database (``--expect-head``, a
backup's copy, the cloud) is what makes such a rewrite visible. See docs/security.md.

Every writer of audit rows goes through :func:`append`, inside its own write transaction
(``BEGIN IMMEDIATE``): the previous hash is read under the write lock, so writers on several
connections are serialised by SQLite and the chain never forks. A unique index on ``prev_hash``
refuses a fork even from a writer that bypasses the lock.

Rows written before the chain existed (before migration 10) are chained, in id order, by the
first :func:`append` after it; until then :func:`verify` counts them as ``legacy``.
"""

from __future__ import annotations

import argparse
import hashlib
import sqlite3
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

__all__ = [
    "GENESIS",
    "AuditChainError",
    "ChainReport",
    "add_parser",
    "append",
    "canonical",
    "record",
    "row_hash",
    "verify",
]

GENESIS = "0" * 64
"""The ``prev_hash`` of the first chained row."""
_DOMAIN = b"edgecc audit v1\x00"
_ID_AT = struct.Struct(">qd")
_LEN = struct.Struct(">I")


class AuditChainError(Exception):
    """An audit row cannot be appended: no write transaction, or the chain tables are missing."""


@dataclass(frozen=True)
class ChainReport:
    """The outcome of walking the chain."""

    ok: bool
    """Whether every row is intact and the head matches."""
    rows: int
    """Rows read (chained and legacy)."""
    legacy: int
    """Rows written before the chain existed and not chained yet (not protected)."""
    head_id: int | None
    """Id of the last chained row, when the walk got there."""
    head_hash: str | None
    """Its hash: keep it outside the site to detect a rewrite of the whole chain."""
    bad_id: int | None = None
    """The first row found broken (or the row after which rows are missing)."""
    problem: str = ""
    """What is wrong there, in words."""


def canonical(prev_hash: str, row_id: int, at: float, actor: str, action: str,
              detail: str | None) -> bytes:
    """The bytes a row's hash covers: fixed-width id and time, length-prefixed UTF-8 texts, and
    a marker telling a NULL detail from an empty one (no two rows encode alike)."""
    parts = [_DOMAIN, bytes.fromhex(prev_hash), _ID_AT.pack(row_id, float(at))]
    for text in (actor, action):
        data = text.encode("utf-8")
        parts += [_LEN.pack(len(data)), data]
    if detail is None:
        parts.append(b"\x00")
    else:
        data = detail.encode("utf-8")
        parts += [b"\x01", _LEN.pack(len(data)), data]
    return b"".join(parts)


def row_hash(prev_hash: str, row_id: int, at: float, actor: str, action: str,
             detail: str | None) -> str:
    """SHA-256 (hex) of :func:`canonical`."""
    return hashlib.sha256(canonical(prev_hash, row_id, at, actor, action, detail)).hexdigest()


def append(conn: sqlite3.Connection, at: float, actor: str, action: str,
           detail: str | None = "") -> int:
    """Append one chained row inside the caller's open write transaction; return its id.

    The transaction should have been opened with ``BEGIN IMMEDIATE`` (as
    ``appliance.eventlog.transaction`` and ``appliance.store.audit`` do) so the head read here
    cannot go stale before the insert. Raises AuditChainError when no transaction is open.
    """
    if not conn.in_transaction:
        raise AuditChainError("audit rows are appended inside a write transaction "
                              "(BEGIN IMMEDIATE), none is open")
    state = conn.execute("SELECT legacy_last_id, head_id, head_hash FROM audit_chain "
                         "WHERE id = 1").fetchone()
    if state is None:
        raise AuditChainError("audit_chain is missing: the database is not migrated")
    legacy_last_id, head_id, head_hash = state
    if head_hash is None:
        head_id, head_hash = _chain_legacy(conn, int(legacy_last_id))
    row_id = int(conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM audit_log").fetchone()[0])
    digest = row_hash(head_hash, row_id, at, actor, action, detail)
    conn.execute("INSERT INTO audit_log (id, at, actor, action, detail, prev_hash, hash) "
                 "VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (row_id, at, actor, action, detail, head_hash, digest))
    conn.execute("UPDATE audit_chain SET head_id = ?, head_hash = ? WHERE id = 1",
                 (row_id, digest))
    return row_id


def record(conn: sqlite3.Connection, at: float, actor: str, action: str,
           detail: str | None = "") -> int:
    """Append one chained row: inside the caller's open transaction (joining it, not
    committing it) when there is one that already writes, else in a ``BEGIN IMMEDIATE``
    transaction of its own, committed here. Return its id."""
    if conn.in_transaction:
        return append(conn, at, actor, action, detail)
    conn.execute("BEGIN IMMEDIATE")
    try:
        row_id = append(conn, at, actor, action, detail)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return row_id


def _chain_legacy(conn: sqlite3.Connection, legacy_last_id: int) -> tuple[int | None, str]:
    # Once, at the first append after migration 10: rows older than the chain, in id order.
    prev, last = GENESIS, None
    rows = conn.execute("SELECT id, at, actor, action, detail FROM audit_log WHERE id <= ? "
                        "ORDER BY id", (legacy_last_id,)).fetchall()
    for row_id, at, actor, action, detail in rows:
        digest = row_hash(prev, row_id, at, actor, action, detail)
        conn.execute("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE id = ?",
                     (prev, digest, row_id))
        prev, last = digest, row_id
    return last, prev


def verify(conn: sqlite3.Connection, *, expect_head: str | None = None) -> ChainReport:
    """Walk the whole chain in id order and report the first broken row.

    ``expect_head`` is a head hash recorded earlier outside the site: the chain must still
    contain it (a rewrite of the whole chain from before that row is then found too).
    """
    state = conn.execute("SELECT legacy_last_id, head_id, head_hash FROM audit_chain "
                         "WHERE id = 1").fetchone()
    legacy_last_id, stored_head_id, stored_head_hash = state
    rows = conn.execute("SELECT id, at, actor, action, detail, prev_hash, hash FROM audit_log "
                        "ORDER BY id")
    return _walk(rows, int(legacy_last_id), stored_head_id, stored_head_hash, expect_head)


def _walk(rows: Iterable[tuple[int, float, str, str, str | None, str | None, str | None]],
          legacy_last_id: int, stored_head_id: int | None, stored_head_hash: str | None,
          expect_head: str | None) -> ChainReport:
    count = legacy = 0
    prev: str | None = GENESIS
    last_id: int | None = None
    seen_expected = expect_head is None

    def broken(row_id: int | None, problem: str) -> ChainReport:
        return ChainReport(False, count, legacy, last_id, prev, row_id, problem)

    for row_id, at, actor, action, detail, prev_hash, digest in rows:
        count += 1
        if digest is None:
            if row_id <= legacy_last_id and prev == GENESIS and last_id is None:
                legacy += 1  # older than the chain, not chained yet: not protected
                continue
            return broken(row_id, "row is not chained (written without appliance.audit.append, "
                          "or inserted by hand)")
        if legacy:
            return broken(row_id, "chained row follows rows that are not chained")
        if prev_hash != prev:
            what = "the first row" if last_id is None else f"row {last_id}"
            return broken(row_id, f"does not follow {what}: rows were deleted, inserted or "
                          "reordered before it")
        if row_hash(prev_hash, row_id, at, actor, action, detail) != digest:
            return broken(row_id, "contents do not match its hash: the row was edited")
        prev, last_id = digest, row_id
        seen_expected = seen_expected or digest == expect_head
    if last_id != stored_head_id or (last_id is not None and prev != stored_head_hash):
        return broken(stored_head_id if stored_head_id is not None else last_id,
                      f"the chain ends at row {last_id} but its head says row {stored_head_id}: "
                      "rows were cut off the end (or the head was changed)")
    if not seen_expected:
        return broken(None, "the expected head hash is not in the chain: the chain was rewritten")
    return ChainReport(True, count, legacy, last_id, None if last_id is None else prev)


# --------------------------------------------------------------------------- command line

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2


def add_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``edgecc audit verify`` to the ``edgecc`` command line."""
    audit = commands.add_parser("audit", help="check the site's hash-chained audit log")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "verify", help="walk the audit chain; exit 1 at the first broken row",
        description="Read the audit log (read-only) and check every row's hash and link. "
        "Prints the row count and the head hash; keep the head hash somewhere else and pass "
        "it back with --expect-head to detect a rewrite of the whole chain.")
    check.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    check.add_argument("--expect-head", metavar="HASH",
                       help="a head hash printed by an earlier verify; it must still be there")
    check.set_defaults(handler=_cmd_verify)
    return audit


def _cmd_verify(args: argparse.Namespace, out: TextIO | None = None,
                err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    from appliance.config import ConfigError, load_site

    try:
        config = load_site(args.site_dir)
    except ConfigError as exc:
        print(f"edgecc audit verify: invalid site configuration\n{exc}", file=err)
        return EXIT_USAGE
    path = Path(config.storage.database)
    if not path.exists():
        print(f"edgecc audit verify: no site database at {path}", file=err)
        return EXIT_PROBLEM
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        print(f"edgecc audit verify: cannot open {path}: {exc}", file=err)
        return EXIT_PROBLEM
    try:
        has_chain = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                 "name = 'audit_chain'").fetchone()
        if has_chain is None:
            print(f"edgecc audit verify: {path} has no audit chain yet (schema before migration "
                  "10): start the appliance once to migrate it", file=err)
            return EXIT_PROBLEM
        report = verify(conn, expect_head=args.expect_head)
    except sqlite3.Error as exc:
        print(f"edgecc audit verify: cannot read {path}: {exc}", file=err)
        return EXIT_PROBLEM
    finally:
        conn.close()
    if not report.ok:
        where = f"row {report.bad_id}" if report.bad_id is not None else "chain"
        print(f"audit chain BROKEN at {where}: {report.problem} "
              f"(rows read={report.rows}, last good row={report.head_id})", file=out)
        return EXIT_PROBLEM
    note = f", {report.legacy} older rows not chained yet" if report.legacy else ""
    print(f"audit chain ok: {report.rows} rows{note}; head row={report.head_id} "
          f"hash={report.head_hash}", file=out)
    return EXIT_OK
