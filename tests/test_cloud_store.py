"""The cloud's store (on SQLite and on a real PostgreSQL), backup store and CA."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket

import conftest_pg
import pytest
from conftest_pg import StoreBackend

from cloud_bridge.backups import CHUNK_LIMIT, BackupError, BackupStore
from cloud_bridge.ca import (
    CertificateAuthority,
    CertificateError,
    make_site_key_and_csr,
    verify_config_signature,
)
from cloud_bridge.store import (
    CloudStore,
    EventRecord,
    StoreError,
    TokenRejected,
    make_token,
    open_store,
)
from proto import config_signing_payload

# Every test that takes ``cloud_store_backend`` runs on SQLite and on PostgreSQL.
cloud_store_backend = conftest_pg.cloud_store_backend
postgres_server = conftest_pg.postgres_server


def _event(seq: int, site: str = "paris-1") -> EventRecord:
    return EventRecord(site, seq, "queue.enter", f"payload {seq}".encode(), 1_700_000_000.0 + seq)


@pytest.fixture
def store(cloud_store_backend: StoreBackend):
    s = cloud_store_backend.open()
    yield s
    s.close()


def _column(backend: StoreBackend, sql: str) -> list[object]:
    """The first column of a query, read with a connection of its own (not the store's)."""
    if backend.name == "sqlite":
        import sqlite3

        with contextlib.closing(sqlite3.connect(backend.url)) as conn:
            return [r[0] for r in conn.execute(sql)]
    import psycopg

    with psycopg.connect(backend.url) as conn:
        return [r[0] for r in conn.execute(sql)]


# ------------------------------------------------------------------- ingest


def test_ingest_absorbs_duplicates_and_acks_contiguous(store: CloudStore) -> None:
    first = store.ingest([_event(1), _event(2), _event(3)], 10.0, window=1000)
    assert (first.acked_seq, first.stored, first.duplicates) == (3, 3, 0)
    again = store.ingest([_event(2), _event(3), _event(4)], 11.0, window=1000)
    assert (again.acked_seq, again.stored, again.duplicates) == (4, 1, 2)
    assert [e.seq for e in store.events("paris-1")] == [1, 2, 3, 4]
    assert store.events("paris-1")[1].payload == b"payload 2"


def test_gap_is_held_until_filled(store: CloudStore) -> None:
    assert store.ingest([_event(1), _event(2)], 1.0, window=1000).acked_seq == 2
    held = store.ingest([_event(4), _event(5), _event(7)], 2.0, window=1000)
    assert (held.acked_seq, held.stored) == (2, 3)
    assert store.sites()[0].held_events == 3
    # A duplicate of a held event changes nothing.
    assert store.ingest([_event(5)], 3.0, window=1000).duplicates == 1
    filled = store.ingest([_event(3)], 4.0, window=1000)
    assert filled.acked_seq == 5  # 6 is still missing
    assert store.ingest([_event(6)], 5.0, window=1000).acked_seq == 7
    assert [e.seq for e in store.events("paris-1")] == list(range(1, 8))


def test_any_order_gives_the_same_log(cloud_store_backend: StoreBackend) -> None:
    rng = random.Random(7)
    seqs = list(range(1, 201))
    deliveries = seqs + rng.sample(seqs, 60)  # every event, plus 60 replays
    rng.shuffle(deliveries)
    s = cloud_store_backend.open()
    try:
        acks = []
        for start in range(0, len(deliveries), 17):
            acks.append(
                s.ingest([_event(q) for q in deliveries[start : start + 17]], 1.0, window=1000)
                .acked_seq
            )
        assert acks == sorted(acks)  # the ack never moves back
        assert acks[-1] == 200
        assert [e.seq for e in s.events("paris-1", limit=1000)] == seqs
    finally:
        s.close()


def test_events_beyond_the_window_are_refused_not_stored(store: CloudStore) -> None:
    result = store.ingest([_event(1), _event(50), _event(11)], 1.0, window=10)
    assert (result.acked_seq, result.stored, result.refused) == (1, 1, 2)
    assert [e.seq for e in store.events("paris-1")] == [1]


def test_sites_are_kept_apart_and_survive_reopen(cloud_store_backend: StoreBackend) -> None:
    s = cloud_store_backend.open()
    s.ingest([_event(1, "paris-1"), _event(2, "paris-1")], 1.0, window=100)
    s.ingest([_event(1, "lyon-2")], 1.0, window=100)
    with pytest.raises(StoreError):
        s.ingest([_event(3, "paris-1"), _event(2, "lyon-2")], 1.0, window=100)
    s.close()
    s = cloud_store_backend.open()
    try:
        assert s.acked_seq("paris-1") == 2
        assert s.acked_seq("lyon-2") == 1
        assert s.acked_seq("nowhere") == 0
        assert {x.site_id for x in s.sites()} == {"paris-1", "lyon-2"}
    finally:
        s.close()


def test_tokens_single_use_and_expiry(
    store: CloudStore, cloud_store_backend: StoreBackend
) -> None:
    token, old = make_token(), make_token()
    store.add_token("paris-1", token, expires_at=100.0, now=0.0)
    store.add_token("paris-1", old, expires_at=5.0, now=0.0)
    assert store.redeem_token(token, now=1.0) == "paris-1"
    with pytest.raises(TokenRejected) as used:
        store.redeem_token(token, now=2.0)
    assert used.value.reason == "already used"
    with pytest.raises(TokenRejected) as expired:
        store.redeem_token(old, now=6.0)
    assert expired.value.reason == "expired"
    with pytest.raises(TokenRejected) as unknown:
        store.redeem_token(make_token(), now=1.0)
    assert unknown.value.reason == "unknown"
    # Only the digest is stored.
    digests = _column(cloud_store_backend, "SELECT digest FROM enrol_tokens")
    assert len(digests) == 2
    assert all(token not in str(d) for d in digests)


def test_revocation_by_serial(store: CloudStore) -> None:
    store.record_certificate("paris-1", 0xABC, 2e9, 1.0)
    assert not store.is_revoked(0xABC)
    assert store.revoke_certificate(0xABC, 2.0)
    assert store.is_revoked(0xABC)
    assert not store.revoke_certificate(0xABC, 3.0)
    assert store.revoke_certificate(0xDEF, 3.0)  # unknown serials can be revoked too
    assert store.is_revoked(0xDEF)


def test_open_store_urls(tmp_path) -> None:
    s = open_store("sqlite:cloud.db", data_dir=tmp_path)
    assert s.path == tmp_path / "cloud.db"
    s.close()
    s = open_store(f"sqlite://{tmp_path / 'abs.db'}")
    assert s.path == tmp_path / "abs.db"
    s.close()
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(StoreError, match="PostgreSQL") as unreachable:
            open_store(f"postgresql://edgecc:s3cret@127.0.0.1:{port}/edgecc?connect_timeout=5")
    assert "s3cret" not in str(unreachable.value)
    with pytest.raises(StoreError, match="scheme"):
        open_store("mysql://localhost/x")


# ------------------------------------------------------------------- backups


def test_backup_resume_drops_uncommitted_tail(tmp_path, store: CloudStore) -> None:
    backups = BackupStore(tmp_path / "b", store, keep=2)
    data = os.urandom(3000)
    assert backups.write_chunk("paris-1", "nightly-1", 0, data[:1000]) == 1000
    # Bytes written after the last commit (a crash between write and commit) are not trusted.
    with open(backups.part_path("paris-1", "nightly-1"), "ab") as handle:
        handle.write(b"garbage")
    with pytest.raises(BackupError) as wrong:
        backups.write_chunk("paris-1", "nightly-1", 1007, data[1000:])
    assert wrong.value.kind == BackupError.OFFSET and wrong.value.committed == 1000
    assert backups.write_chunk("paris-1", "nightly-1", 1000, data[1000:]) == 3000
    record = backups.finish("paris-1", "nightly-1", hashlib.sha256(data).digest())
    assert record.complete and record.committed == 3000
    assert backups.final_path("paris-1", "nightly-1").read_bytes() == data
    assert b"".join(d for _, d in backups.read("paris-1", "nightly-1")) == data
    assert b"".join(d for _, d in backups.read("paris-1", "nightly-1", 2500)) == data[2500:]


def test_backup_limits_and_ids(tmp_path, store: CloudStore) -> None:
    backups = BackupStore(tmp_path / "b", store, keep=2, max_bytes=CHUNK_LIMIT + 10)
    with pytest.raises(BackupError) as big:
        backups.write_chunk("paris-1", "x", 0, b"\0" * (CHUNK_LIMIT + 1))
    assert big.value.kind == BackupError.TOO_LARGE
    backups.write_chunk("paris-1", "x", 0, b"\0" * CHUNK_LIMIT)
    with pytest.raises(BackupError) as total:
        backups.write_chunk("paris-1", "x", CHUNK_LIMIT, b"\0" * 11)
    assert total.value.kind == BackupError.TOO_LARGE
    for bad in ("", "../etc", ".hidden", "a/b", "x" * 65):
        with pytest.raises(BackupError) as invalid:
            backups.write_chunk("paris-1", bad, 0, b"")
        assert invalid.value.kind == BackupError.INVALID
    assert not (tmp_path / "etc").exists()


def test_backup_digest_mismatch_discards_upload(tmp_path, store: CloudStore) -> None:
    backups = BackupStore(tmp_path / "b", store)
    backups.write_chunk("paris-1", "b1", 0, b"hello")
    with pytest.raises(BackupError) as bad:
        backups.finish("paris-1", "b1", hashlib.sha256(b"hellO").digest())
    assert bad.value.kind == BackupError.DIGEST
    assert store.backup("paris-1", "b1") is None
    assert not backups.part_path("paris-1", "b1").exists()


def test_backup_retention_keeps_newest(tmp_path, store: CloudStore) -> None:
    now = [100.0]
    backups = BackupStore(tmp_path / "b", store, keep=2, clock=lambda: now[0])
    for n in range(4):
        now[0] += 10
        body = f"backup {n}".encode()
        backups.write_chunk("paris-1", f"b{n}", 0, body)
        backups.finish("paris-1", f"b{n}", hashlib.sha256(body).digest())
    now[0] += 10
    backups.write_chunk("lyon-2", "b0", 0, b"other site")
    backups.finish("lyon-2", "b0", hashlib.sha256(b"other site").digest())
    assert [b.backup_id for b in store.backups("paris-1")] == ["b3", "b2"]
    assert sorted(p.name for p in (tmp_path / "b" / "paris-1").iterdir()) == ["b2.bak", "b3.bak"]
    assert [b.backup_id for b in store.backups("lyon-2")] == ["b0"]
    with pytest.raises(BackupError) as gone:
        backups.read("paris-1", "b0")
    assert gone.value.kind == BackupError.NOT_FOUND


# ------------------------------------------------------------------- CA


def test_ca_issues_and_checks_site_certificates(tmp_path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert oct((tmp_path / "ca" / "ca.key").stat().st_mode & 0o777) == "0o600"
    again = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert again.certificate_pem == ca.certificate_pem
    _, csr = make_site_key_and_csr("someone-else")
    issued = ca.issue_site_certificate(csr, "paris-1")
    site = ca.check_site_certificate(issued.pem)
    assert (site.site_id, site.serial) == ("paris-1", issued.serial)  # the CA names the site
    other = CertificateAuthority.create()
    with pytest.raises(CertificateError, match="this cloud's CA"):
        ca.check_site_certificate(other.issue_site_certificate(csr, "paris-1").pem)
    with pytest.raises(CertificateError):
        ca.issue_site_certificate(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "paris-1")
    with pytest.raises(ValueError):
        ca.issue_site_certificate(csr, "Paris 1")


def test_config_signature_binds_site_and_version(tmp_path) -> None:
    ca = CertificateAuthority.create()
    yaml = b"site: {id: paris-1}\n"
    signature = ca.sign_config("paris-1", 3, yaml)
    pem = ca.certificate_pem
    assert verify_config_signature(pem, "paris-1", 3, yaml, signature)
    assert not verify_config_signature(pem, "paris-1", 4, yaml, signature)
    assert not verify_config_signature(pem, "lyon-2", 3, yaml, signature)
    assert not verify_config_signature(pem, "paris-1", 3, yaml + b"#", signature)
    assert not verify_config_signature(
        CertificateAuthority.create().certificate_pem, "paris-1", 3, yaml, signature
    )
    assert config_signing_payload("a", 1, b"x") != config_signing_payload("a", 1, b"y")


def test_ca_check_refuses_certificates_out_of_their_validity(tmp_path) -> None:
    import datetime as dt

    ca = CertificateAuthority.create()
    _, csr = make_site_key_and_csr("paris-1")
    now = dt.datetime.now(dt.UTC)
    issued = ca.issue_site_certificate(
        csr, "paris-1", not_before=now, not_after=now + dt.timedelta(days=1)
    )
    assert ca.check_site_certificate(issued.pem, now=now + dt.timedelta(hours=1)).site_id
    with pytest.raises(CertificateError, match="expired"):
        ca.check_site_certificate(issued.pem, now=now + dt.timedelta(days=2))
    with pytest.raises(CertificateError, match="not yet valid"):
        ca.check_site_certificate(issued.pem, now=now - dt.timedelta(hours=1))
