"""Backup bundles: what goes in, that it comes back whole, and that any damage is refused.

Real files and a real SQLite database written to while the bundle is made; the cloud CA is a
real one (in memory). No network here: tests/test_backup_restore.py runs the whole path.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import pytest

from appliance import eventlog
from appliance.store import open_site_db
from cloud_bridge.ca import CertificateAuthority
from edge_agent.bundle import (
    RestoreToken,
    TamperedBundle,
    make_bundle,
    open_escrow,
    read_header,
    unpack_bundle,
)

SITE = "paris-1"


def _site(tmp_path: Path) -> tuple[Path, bytes]:
    site = tmp_path / "site"
    (site / "tls").mkdir(parents=True)
    (site / "site.yaml").write_text(f"site: {{id: {SITE}}}\nstorage: {{database: edgecc.db}}\n")
    key = os.urandom(32)
    (site / "site.key").write_bytes(key)
    os.chmod(site / "site.key", 0o600)
    (site / "tls" / "sip.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\nabc\n")
    (site / "recordings" / "2026").mkdir(parents=True)
    (site / "recordings" / "2026" / "r1.rec").write_bytes(os.urandom(700_000))
    (site / "cloud").mkdir()
    (site / "cloud" / "site.key").write_bytes(b"this machine's own link key")
    (site / ".edgecc-backup").mkdir()
    (site / ".edgecc-backup" / "old.bundle").write_bytes(b"x" * 100)
    db = open_site_db(site / "edgecc.db")
    eventlog.bind_site(db, SITE)
    for n in range(50):
        eventlog.append(db, "call.record", {"n": n}, occurred_at=1000.0 + n)
    db.conn.close()
    return site, key


def _files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def _bundle(tmp_path: Path, ca: CertificateAuthority) -> tuple[Path, Path, bytes]:
    site, key = _site(tmp_path)
    out = tmp_path / "b.bundle"
    make_bundle(site, site / "edgecc.db", out, site_id=SITE, backup_id="b1", site_key=key,
                ca_certificate_pem=ca.certificate_pem)
    return site, out, key


def test_round_trip_keeps_every_site_file_and_a_consistent_database(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    site, key = _site(tmp_path)
    db = open_site_db(site / "edgecc.db")
    stop = threading.Event()

    def keep_writing() -> None:  # the appliance goes on logging during the backup
        n = 0
        while not stop.is_set() and n < 2000:
            eventlog.append(db, "queue.enter", {"n": n}, occurred_at=2000.0 + n)
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        header = make_bundle(site, site / "edgecc.db", tmp_path / "b.bundle", site_id=SITE,
                             backup_id="b1", site_key=key, ca_certificate_pem=ca.certificate_pem)
    finally:
        stop.set()
        writer.join(30)
        db.conn.close()
    assert header.site_id == SITE and header.backup_id == "b1"
    out = tmp_path / "out"
    unpack_bundle(tmp_path / "b.bundle", key, out, site_id=SITE)

    restored = _files(out / "site")
    original = {k: v for k, v in _files(site).items()
                if not k.startswith(("cloud/", ".edgecc-backup/", "edgecc.db"))}
    assert restored == original  # site.yaml, keys, recordings byte for byte
    assert "cloud/site.key" not in restored and not any(k.startswith("edgecc.db") for k in restored)
    with sqlite3.connect(out / "database" / "site.db") as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        seqs = [s for (s,) in copy.execute("SELECT seq FROM events ORDER BY seq")]
    # A consistent snapshot: the first 50 plus a gap-free prefix of what was being written.
    assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) >= 50


@pytest.mark.parametrize("damage", ["cut_end", "cut_half", "cut_header", "flip_body",
                                    "flip_header", "append", "swap_segments"])
def test_a_damaged_bundle_is_refused_and_nothing_is_left(
    tmp_path: Path, ca: CertificateAuthority, damage: str
) -> None:
    _, bundle, key = _bundle(tmp_path, ca)
    data = bytearray(bundle.read_bytes())
    with open(bundle, "rb") as handle:
        header_end = handle.seek(0) + 12 + len(read_header(handle).raw)
    if damage == "cut_end":
        data = data[:-1]
    elif damage == "cut_half":
        data = data[: len(data) // 2]
    elif damage == "cut_header":
        data = data[: header_end - 5]
    elif damage == "flip_body":
        data[header_end + 5000] ^= 0x01
    elif damage == "flip_header":
        # Still valid JSON and the same length: only the authentication can notice.
        at = data.index(b'"created_at":') + len(b'"created_at":')
        data[at] = ord("9") if data[at] != ord("9") else ord("8")
    elif damage == "append":
        data += b"\0" * 64
    elif damage == "swap_segments":
        # Segments are 4-byte length + sealed data; swap the first two full ones.
        first = header_end + 24
        size = 4 + int.from_bytes(data[first : first + 4], "little")
        a, b = data[first : first + size], data[first + size : first + 2 * size]
        data[first : first + 2 * size] = b + a
    bundle.write_bytes(bytes(data))
    target = tmp_path / "out"
    with pytest.raises(TamperedBundle):
        unpack_bundle(bundle, key, target, site_id=SITE)
    assert not target.exists()


def test_another_key_or_site_is_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    _, bundle, key = _bundle(tmp_path, ca)
    with pytest.raises(TamperedBundle):
        unpack_bundle(bundle, os.urandom(32), tmp_path / "a")
    with pytest.raises(TamperedBundle, match="lyon-2"):
        unpack_bundle(bundle, key, tmp_path / "b", site_id="lyon-2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_escrow_opens_only_with_the_cloud_ca_and_for_its_site(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    _, bundle, key = _bundle(tmp_path, ca)
    with open(bundle, "rb") as handle:
        header = read_header(handle)
    assert ca.open_escrow(header.escrow, SITE) == key
    assert key not in bundle.read_bytes()
    with pytest.raises(TamperedBundle):
        ca.open_escrow(header.escrow, "lyon-2")
    with pytest.raises(TamperedBundle):
        CertificateAuthority.create().open_escrow(header.escrow, SITE)
    broken = bytearray(header.escrow)
    broken[-1] ^= 1
    with pytest.raises(TamperedBundle):
        open_escrow(ca._key, bytes(broken), SITE)


def test_restore_token_round_trip_and_damage(ca: CertificateAuthority) -> None:
    token = RestoreToken("ecc1_abc", SITE, os.urandom(32), ca.certificate_pem, "b1")
    text = token.encode()
    assert RestoreToken.decode(text) == token
    assert RestoreToken.decode(f"  {text}\n") == token  # pasted with whitespace
    with pytest.raises(ValueError, match="not an edgecc restore token"):
        RestoreToken.decode("ecc1_abc")
    with pytest.raises(ValueError, match="damaged"):
        RestoreToken.decode(text[:-20])


def test_a_missing_database_is_a_clear_error_and_leaves_no_file(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    from edge_agent.bundle import BundleError

    site, key = _site(tmp_path)
    out = tmp_path / "b.bundle"
    with pytest.raises(BundleError, match="does not exist"):
        make_bundle(site, site / "missing.db", out, site_id=SITE, backup_id="b1", site_key=key,
                    ca_certificate_pem=ca.certificate_pem)
    assert not out.exists()
