"""The audit chain's head sent to the cloud (``appliance.app.AuditAnchor``), and what that copy
proves: the site's events go to a real cloud store, ``edgecc cloud audit-head`` prints the head
the cloud holds, and ``edgecc audit verify --expect-head`` with it passes on the honest chain
and fails once someone who can write the site's database rewrote the whole chain.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from test_audit_chain import edgecc, fill, rewritten_chain, site, template_site  # noqa: F401 (fixtures)

from appliance import eventlog
from appliance.app import AuditAnchor
from appliance.audit import verify
from appliance.store import open_site_db
from cloud_bridge.store import EventColumns, SqliteCloudStore

T0 = 1_790_000_000.0
SITE = "anchor-site"


def anchored(path: Path) -> list[tuple[dict, int]]:
    """The site's ``audit.head`` events (payload, outbox priority), in order."""
    db = open_site_db(path)
    try:
        return [(json.loads(p), prio) for p, prio in db.conn.execute(
            "SELECT e.payload, o.priority FROM events e JOIN outbox o ON o.seq = e.seq "
            "WHERE e.kind = 'audit.head' ORDER BY e.seq")]
    finally:
        db.close()


@pytest.fixture
def site_db(tmp_path: Path):  # type: ignore[no-untyped-def]
    db = open_site_db(tmp_path / "edgecc.db")
    eventlog.bind_site(db, SITE)
    yield db
    db.close()


def test_the_head_is_sent_when_it_moves_and_at_least_every_refresh(site_db, tmp_path) -> None:
    path = tmp_path / "edgecc.db"
    now = [T0]
    anchor = AuditAnchor(open_site_db(path), refresh_s=3600, clock=lambda: now[0])
    try:
        assert anchor.anchor() is None  # no audit row yet: nothing to send
        fill(site_db, 3)
        head = verify(site_db.conn)
        assert anchor.anchor() == (3, head.head_hash)
        now[0] = T0 + 60
        assert anchor.anchor() is None  # not moved, refresh not due
        now[0] = T0 + 3600
        assert anchor.anchor() == (3, head.head_hash)  # not moved, but an hour has passed
        fill(site_db, 1)
        assert anchor.anchor() == (4, verify(site_db.conn).head_hash)
    finally:
        anchor._writer.close()
    sent = anchored(path)
    assert [(p["id"], prio) for p, prio in sent] == [(3, eventlog.ESSENTIAL)] * 2 + [
        (4, eventlog.ESSENTIAL)]
    assert sent[0][0]["hash"] == head.head_hash


def test_the_clouds_copy_exposes_a_rewritten_chain(site: Path, tmp_path) -> None:  # noqa: F811
    path = site / "edgecc.db"
    site_db = open_site_db(path)
    eventlog.bind_site(site_db, SITE)
    fill(site_db, 5)
    anchor = AuditAnchor(open_site_db(path))
    try:
        head_id, sent = anchor.anchor() or (0, "")
    finally:
        anchor._writer.close()
    # The site's events reach the cloud (the edge agent's part: tests/test_edge_agent.py).
    rows = site_db.conn.execute(
        "SELECT seq, kind, payload, occurred_at FROM events ORDER BY seq").fetchall()
    site_db.close()
    data = tmp_path / "cloud"
    store = SqliteCloudStore(data / "cloud.db")
    try:
        store.ingest(EventColumns(SITE, [r[0] for r in rows], [r[1] for r in rows],
                                  [r[2].encode() for r in rows], [r[3] for r in rows]),
                     time.time(), window=10_000)
    finally:
        store.close()
    shown = edgecc("cloud", "audit-head", SITE, "--data-dir", str(data))
    assert shown.returncode == 0, shown.stderr
    assert f"site={SITE} id={head_id} hash={sent} " in shown.stdout
    missing = edgecc("cloud", "audit-head", "other-site", "--data-dir", str(data))
    assert missing.returncode == 1 and "no audit head from site other-site" in missing.stderr
    bad = edgecc("cloud", "audit-head", "Not A Site!", "--data-dir", str(data))
    assert bad.returncode == 2 and "site" in bad.stderr

    # The honest chain holds the cloud's head.
    ok = edgecc("audit", "verify", "--site-dir", str(site), "--expect-head", sent)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Someone who can write the file rewrites every row from the first and the head: the
    # chain is consistent in itself, and only the cloud's copy of the head says otherwise.
    rewritten_chain(path).close()
    alone = edgecc("audit", "verify", "--site-dir", str(site))
    assert alone.returncode == 0, alone.stdout  # nothing on site can tell
    caught = edgecc("audit", "verify", "--site-dir", str(site), "--expect-head", sent)
    assert caught.returncode == 1 and "rewritten" in caught.stdout, caught.stdout
