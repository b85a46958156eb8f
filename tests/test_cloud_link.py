"""The cloud server over real gRPC, TLS on 127.0.0.1, free ports, a real SQLite file or
PostgreSQL database (every test that takes ``cloud_store_backend`` runs on both).

The server runs on its own event loop thread; the tests are sites speaking through the
ordinary (synchronous) gRPC client, as an edge agent would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import conftest_pg
import pytest
from conftest_pg import StoreBackend

from proto.build import ensure_generated

ensure_generated()

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (  # noqa: E402
    ProtoReflectionDescriptorDatabase,
)

from cloud_bridge.ca import (  # noqa: E402
    CertificateAuthority,
    make_site_key_and_csr,
    verify_config_signature,
)
from cloud_bridge.server import CloudConfig, CloudServer  # noqa: E402
from proto import bridge_pb2 as pb  # noqa: E402
from proto import bridge_pb2_grpc as pb_grpc  # noqa: E402

WAIT = 20.0  # bound on every wait for an event; never decides a pass by itself
MiB = 1024 * 1024

cloud_store_backend = conftest_pg.cloud_store_backend
postgres_server = conftest_pg.postgres_server


# ------------------------------------------------------------------- harness


class Cloud:
    """A CloudServer serving on an event loop thread of its own."""

    def __init__(self, data_dir: Any, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: CloudServer = self.call(self._start(data_dir, options))

    async def _start(self, data_dir: Any, options: dict[str, Any]) -> CloudServer:
        server = CloudServer(CloudConfig(data_dir=data_dir, grpc_port=0, enrol_port=0, **options))
        await server.start()
        return server

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def store(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a store method on the server's worker thread."""
        bound = functools.partial(getattr(self.server.store, method), *args, **kwargs)
        return self.call(self.server.run(bound))

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()

    @property
    def ca_pem(self) -> bytes:
        return self.server.ca.certificate_pem

    def enrol_channel(self) -> grpc.Channel:
        return grpc.secure_channel(
            f"127.0.0.1:{self.server.enrol_port}", grpc.ssl_channel_credentials(self.ca_pem)
        )

    def link_channel(self, key_pem: bytes | None, cert_pem: bytes | None) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca_pem, key_pem, cert_pem)
        return grpc.secure_channel(f"127.0.0.1:{self.server.link_port}", credentials)


@dataclass
class Site:
    """What a site holds after enrolment."""

    site_id: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes
    serial: int


@pytest.fixture
def cloud(tmp_path, cloud_store_backend: StoreBackend) -> Iterator[Cloud]:
    c = Cloud(tmp_path / "cloud", db_url=cloud_store_backend.url)
    yield c
    c.close()


def enrol(cloud: Cloud, site_id: str) -> Site:
    token = cloud.call(cloud.server.issue_token(site_id, 600))
    key_pem, csr_pem = make_site_key_and_csr(site_id)
    with cloud.enrol_channel() as channel:
        reply = pb_grpc.EnrolmentStub(channel).Enrol(
            pb.EnrolRequest(token=token, csr_pem=csr_pem), timeout=WAIT
        )
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(reply.certificate_pem).serial_number
    return Site(reply.site_id, key_pem, reply.certificate_pem, reply.ca_certificate_pem, serial)


@pytest.fixture
def paris(cloud: Cloud) -> Site:
    return enrol(cloud, "paris-1")


class Link:
    """A SiteLink stream seen from the site: send messages, receive what the cloud sends."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._out: queue.Queue[Any] = queue.Queue()
        self.received: queue.Queue[Any] = queue.Queue()
        self.call = pb_grpc.BridgeStub(channel).SiteLink(self._requests())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[Any]:
        while True:
            message = self._out.get()
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                self.received.put(message)
        except grpc.RpcError as exc:
            self.received.put(exc)
        else:
            self.received.put(None)

    def send(self, message: Any) -> None:
        self._out.put(message)

    def event(self, seq: int, site_id: str = "paris-1", payload: bytes | None = None) -> None:
        stamp = pb.Event(
            site_id=site_id, seq=seq, kind="queue.enter",
            payload=payload if payload is not None else f"call {seq}".encode(),
        )
        stamp.occurred_at.FromSeconds(1_700_000_000 + seq)
        self.send(pb.SiteMessage(event=stamp))

    def recv(self) -> Any:
        return self.received.get(timeout=WAIT)

    def wait_ack(self, seq: int) -> list[int]:
        """Acks received until one equals ``seq``."""
        acks: list[int] = []
        while not acks or acks[-1] != seq:
            message = self.recv()
            assert isinstance(message, pb.CloudMessage), message
            if message.WhichOneof("body") == "ack":
                acks.append(message.ack.seq)
        return acks

    def finish(self) -> list[Any]:
        """Half-close and collect everything the cloud sends until the stream ends."""
        self._out.put(None)
        messages: list[Any] = []
        while True:
            message = self.recv()
            if message is None:
                return messages
            assert isinstance(message, pb.CloudMessage), message
            messages.append(message)

    def error(self) -> grpc.RpcError:
        """The error the stream ended with (skipping messages before it)."""
        while True:
            message = self.recv()
            if isinstance(message, grpc.RpcError):
                return message
            assert message is not None, "stream ended without an error"

    def cancel(self) -> None:
        self.call.cancel()
        self._out.put(None)
        self._reader.join(WAIT)


def open_link(cloud: Cloud, site: Site) -> tuple[grpc.Channel, Link]:
    channel = cloud.link_channel(site.key_pem, site.cert_pem)
    return channel, Link(channel)


def acks(messages: list[Any]) -> list[int]:
    return [m.ack.seq for m in messages if m.WhichOneof("body") == "ack"]


def stored_seqs(cloud: Cloud, site_id: str) -> list[int]:
    return [e.seq for e in cloud.store("events", site_id)]


# ------------------------------------------------------------------- enrolment


def test_enrol_token_works_once(cloud: Cloud) -> None:
    token = cloud.call(cloud.server.issue_token("paris-1", 600))
    key_pem, csr_pem = make_site_key_and_csr("paris-1")
    with cloud.enrol_channel() as channel:
        stub = pb_grpc.EnrolmentStub(channel)
        reply = stub.Enrol(pb.EnrolRequest(token=token, csr_pem=csr_pem), timeout=WAIT)
        assert reply.site_id == "paris-1"
        assert reply.ca_certificate_pem == cloud.ca_pem
        site = cloud.server.ca.check_site_certificate(reply.certificate_pem)
        assert site.site_id == "paris-1"
        assert reply.not_after.ToSeconds() == pytest.approx(site.not_after.timestamp(), abs=1)
        with pytest.raises(grpc.RpcError) as second:
            stub.Enrol(pb.EnrolRequest(token=token, csr_pem=csr_pem), timeout=WAIT)
    assert second.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already used" in second.value.details()
    assert cloud.store("certificates", "paris-1")[0][0] == site.serial


def test_expired_and_unknown_tokens_refused(cloud: Cloud) -> None:
    # A token that expired a minute ago (written with the server's store, as the CLI would).
    expired = "ecc1_expired-token-for-test-0123456789"
    now = cloud.server.clock()
    cloud.store("add_token", "paris-1", expired, now - 60, now - 3600)
    _, csr_pem = make_site_key_and_csr("paris-1")
    with cloud.enrol_channel() as channel:
        stub = pb_grpc.EnrolmentStub(channel)
        for token, reason in ((expired, "expired"), ("ecc1_never-issued", "unknown")):
            with pytest.raises(grpc.RpcError) as refused:
                stub.Enrol(pb.EnrolRequest(token=token, csr_pem=csr_pem), timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert reason in refused.value.details()
    assert cloud.store("certificates", "paris-1") == []


def test_bad_csr_refused_without_spending_the_token(cloud: Cloud) -> None:
    token = cloud.call(cloud.server.issue_token("paris-1", 600))
    with cloud.enrol_channel() as channel:
        stub = pb_grpc.EnrolmentStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            stub.Enrol(pb.EnrolRequest(token=token, csr_pem=b"not a csr"), timeout=WAIT)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, csr_pem = make_site_key_and_csr("paris-1")
        assert stub.Enrol(pb.EnrolRequest(token=token, csr_pem=csr_pem), timeout=WAIT).site_id


# ------------------------------------------------------------------- mutual TLS


def _status(cloud: Cloud, channel: grpc.Channel) -> Any:
    with channel:
        return pb_grpc.BridgeStub(channel).BackupStatus(
            pb.BackupStatusRequest(backup_id="nightly"), timeout=WAIT
        )


def test_mtls_accepts_an_enrolled_site(cloud: Cloud, paris: Site) -> None:
    reply = _status(cloud, cloud.link_channel(paris.key_pem, paris.cert_pem))
    assert reply.state == pb.BackupStatusResponse.ABSENT


def test_mtls_refuses_no_client_certificate(cloud: Cloud, paris: Site) -> None:
    with pytest.raises(grpc.RpcError) as at_tls:
        _status(cloud, cloud.link_channel(None, None))
    assert at_tls.value.code() == grpc.StatusCode.UNAVAILABLE  # handshake refused
    # The enrol port does not ask for a certificate; the Bridge methods refuse there.
    with pytest.raises(grpc.RpcError) as at_rpc:
        _status(cloud, cloud.enrol_channel())
    assert at_rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with cloud.enrol_channel() as channel:
        link = Link(channel)
        link.event(1)
        assert link.error().code() == grpc.StatusCode.UNAUTHENTICATED
    assert stored_seqs(cloud, "paris-1") == []


def test_mtls_refuses_a_certificate_of_another_ca(cloud: Cloud, paris: Site) -> None:
    key_pem, csr_pem = make_site_key_and_csr("paris-1")
    foreign = CertificateAuthority.create().issue_site_certificate(csr_pem, "paris-1")
    with pytest.raises(grpc.RpcError) as refused:
        _status(cloud, cloud.link_channel(key_pem, foreign.pem))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_an_expired_certificate(cloud: Cloud, paris: Site) -> None:
    key_pem, csr_pem = make_site_key_and_csr("paris-1")
    now = dt.datetime.now(dt.UTC)
    old = cloud.server.ca.issue_site_certificate(
        csr_pem, "paris-1", not_before=now - dt.timedelta(days=30),
        not_after=now - dt.timedelta(days=1),
    )
    with pytest.raises(grpc.RpcError) as refused:
        _status(cloud, cloud.link_channel(key_pem, old.pem))
    assert refused.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)


def test_mtls_refuses_a_revoked_certificate(cloud: Cloud, paris: Site) -> None:
    assert cloud.call(cloud.server.revoke(paris.serial))
    with pytest.raises(grpc.RpcError) as refused:
        _status(cloud, cloud.link_channel(paris.key_pem, paris.cert_pem))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "revoked" in refused.value.details()
    # A new enrolment gives the site a new, valid certificate.
    renewed = enrol(cloud, "paris-1")
    assert _status(cloud, cloud.link_channel(renewed.key_pem, renewed.cert_pem)).backup_id


def test_revocation_closes_a_live_link(cloud: Cloud, paris: Site) -> None:
    channel, link = open_link(cloud, paris)
    with channel:
        assert link.wait_ack(0) == [0]
        link.event(1)
        assert link.wait_ack(1)[-1] == 1
        # Revoked in the store behind the server's back (as `edgecc cloud revoke` does).
        cloud.store("revoke_certificate", paris.serial, cloud.server.clock())
        link.event(2)
        error = link.error()
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stored_seqs(cloud, "paris-1") == [1]


def test_events_must_be_the_certificate_sites_own(cloud: Cloud, paris: Site) -> None:
    enrol(cloud, "lyon-2")
    channel, link = open_link(cloud, paris)
    with channel:
        link.event(1)
        link.event(2)
        link.event(3, site_id="lyon-2")
        link.event(4)
        error = link.error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "lyon-2" in error.details()
    assert stored_seqs(cloud, "paris-1") == [1, 2]  # what came before is kept
    assert stored_seqs(cloud, "lyon-2") == []


def test_malformed_events_get_a_clear_error(cloud: Cloud, paris: Site) -> None:
    for bad, words in (
        (lambda link: link.event(0), "seq starts at 1"),
        (lambda link: link.event(1, payload=b"x" * (256 * 1024 + 1)), "payload"),
        (lambda link: link.send(pb.SiteMessage()), "empty message"),
    ):
        channel, link = open_link(cloud, paris)
        with channel:
            bad(link)
            error = link.error()
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in error.details()
    assert stored_seqs(cloud, "paris-1") == []


# ------------------------------------------------------------------- ingest


def test_ack_is_held_below_a_gap(cloud: Cloud, paris: Site) -> None:
    channel, link = open_link(cloud, paris)
    with channel:
        for seq in (1, 2, 4, 5):
            link.event(seq)
        seen = acks(link.finish())
    assert seen[0] == 0 and seen[-1] == 2 and max(seen) == 2
    assert stored_seqs(cloud, "paris-1") == [1, 2, 4, 5]
    assert cloud.store("sites")[0].held_events == 2

    channel, link = open_link(cloud, paris)
    with channel:
        assert link.wait_ack(2) == [2]  # a new link starts by saying where to resume
        link.event(3)
        assert link.wait_ack(5)[-1] == 5  # the gap filled: the held events count at once
        link.event(6)
        assert link.wait_ack(6)[-1] == 6
        link.finish()
    assert cloud.store("sites")[0].held_events == 0


def test_events_stored_once_under_replays_reordering_and_reconnects(
    cloud: Cloud, paris: Site
) -> None:
    total = 120
    outbox = {seq: f"call record {seq}".encode() for seq in range(1, total + 1)}
    rng = random.Random(2024)
    for attempt in range(4):
        channel, link = open_link(cloud, paris)
        with channel:
            first = link.recv()
            assert first.WhichOneof("body") == "ack"
            pending = [seq for seq in outbox if seq > first.ack.seq]
            sending = pending + rng.sample(pending, min(len(pending), 25))  # replays
            rng.shuffle(sending)
            if attempt < 3:
                # The link breaks part-way: the site never learns what got through.
                for seq in sending[: len(sending) // 2]:
                    link.event(seq, payload=outbox[seq])
                link.cancel()
            else:
                for seq in sending:
                    link.event(seq, payload=outbox[seq])
                assert acks(link.finish())[-1] == total
    events = cloud.store("events", "paris-1", limit=10_000)
    assert [e.seq for e in events] == list(range(1, total + 1))
    assert all(e.payload == outbox[e.seq] for e in events)
    assert all(e.occurred_at == 1_700_000_000 + e.seq for e in events)
    assert cloud.store("acked_seq", "paris-1") == total


def test_a_new_link_replaces_the_old_one(cloud: Cloud, paris: Site) -> None:
    old_channel, old = open_link(cloud, paris)
    # The old link must be registered before the new one opens; otherwise the server may see
    # the two streams in either order.
    assert old.wait_ack(0) == [0]
    new_channel, new = open_link(cloud, paris)
    with old_channel, new_channel:
        assert new.wait_ack(0) == [0]
        assert old.error().code() == grpc.StatusCode.ABORTED
        new.event(1)
        assert new.wait_ack(1)[-1] == 1
        new.finish()


# ------------------------------------------------------------------- commands


def test_config_versions_are_signed_and_pushed(cloud: Cloud, paris: Site) -> None:
    first = cloud.call(cloud.server.push_config("paris-1", b"site: {id: paris-1}\n"))
    assert first.version == 1
    channel, link = open_link(cloud, paris)
    with channel:
        assert link.wait_ack(0) == [0]
        link.send(pb.SiteMessage(hello=pb.Hello(site_id="paris-1", config_version=0)))
        config = link.recv().config
        assert (config.version, config.yaml) == (1, b"site: {id: paris-1}\n")
        assert verify_config_signature(
            paris.ca_pem, "paris-1", config.version, config.yaml, config.signature
        )
        cloud.call(cloud.server.push_config("paris-1", b"site: {id: paris-1, name: P}\n"))
        live = link.recv().config
        assert live.version == 2
        assert verify_config_signature(paris.ca_pem, "paris-1", 2, live.yaml, live.signature)
        assert not verify_config_signature(paris.ca_pem, "paris-1", 1, live.yaml, live.signature)
        assert cloud.call(cloud.server.request_backup("paris-1", "before upgrade"))
        assert link.recv().backup_request.reason == "before upgrade"
        link.send(pb.SiteMessage(config_applied=pb.ConfigApplied(version=2, ok=True)))
        link.finish()
    # A site that already has the newest version is not sent it again.
    channel, link = open_link(cloud, paris)
    with channel:
        assert link.wait_ack(0) == [0]
        link.send(pb.SiteMessage(hello=pb.Hello(site_id="paris-1", config_version=2)))
        link.event(1)
        assert link.recv().WhichOneof("body") == "ack"
        link.finish()
    assert not cloud.call(cloud.server.request_backup("paris-1"))  # not linked any more


def test_a_push_is_numbered_above_a_version_the_site_made_itself(cloud: Cloud,
                                                                  paris: Site) -> None:
    cloud.call(cloud.server.push_config("paris-1", b"site: {id: paris-1}\n"))
    # An admin changed the site through its API twice: the site now runs version 3.
    channel, link = open_link(cloud, paris)
    with channel:
        assert link.wait_ack(0) == [0]
        link.send(pb.SiteMessage(hello=pb.Hello(site_id="paris-1", config_version=3)))
        link.event(1)
        assert link.recv().WhichOneof("body") == "ack"  # the Hello was taken; nothing sent down
        pushed = cloud.call(cloud.server.push_config("paris-1", b"site: {id: paris-1, name: P}\n"))
        assert pushed.version == 4
        assert link.recv().config.version == 4
        link.finish()
    # Offline, the site's last report still counts.
    channel, link = open_link(cloud, paris)
    with channel:
        assert link.wait_ack(1) == [1]
        link.send(pb.SiteMessage(hello=pb.Hello(site_id="paris-1", config_version=9)))
        link.event(2)
        assert link.recv().WhichOneof("body") == "ack"
        link.finish()
    assert cloud.call(cloud.server.push_config("paris-1", b"site: {id: paris-1}\n")).version == 10


# ------------------------------------------------------------------- backups


def _chunk(backup_id: str, offset: int, data: bytes, **extra: Any) -> Any:
    return pb.BackupChunk(backup_id=backup_id, offset=offset, data=data, **extra)


def test_backup_upload_resumes_after_interruption(cloud: Cloud, paris: Site) -> None:
    data = os.urandom(3 * MiB + 12_345)
    digest = hashlib.sha256(data).digest()
    release = threading.Event()

    def first_attempt() -> Iterator[Any]:
        for offset in range(0, 3 * MiB, MiB):
            yield _chunk("nightly-1", offset, data[offset : offset + MiB])
        release.wait(WAIT)  # the connection breaks here: the call is cancelled below

    with cloud.link_channel(paris.key_pem, paris.cert_pem) as channel:
        stub = pb_grpc.BridgeStub(channel)
        upload = stub.UploadBackup.future(first_attempt())
        assert cloud.server.backups.wait_for_committed("paris-1", "nightly-1", 3 * MiB, WAIT)
        upload.cancel()
        release.set()

        status = stub.BackupStatus(pb.BackupStatusRequest(backup_id="nightly-1"), timeout=WAIT)
        assert (status.state, status.committed) == (pb.BackupStatusResponse.PARTIAL, 3 * MiB)

        # Starting anywhere but the committed offset is refused, with the offset to use.
        with pytest.raises(grpc.RpcError) as wrong:
            stub.UploadBackup(iter([_chunk("nightly-1", 0, data[:10])]), timeout=WAIT)
        assert wrong.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert ("committed-offset", str(3 * MiB)) in wrong.value.trailing_metadata()

        receipt = stub.UploadBackup(
            iter([_chunk("nightly-1", 3 * MiB, data[3 * MiB :], final=True, sha256=digest)]),
            timeout=WAIT,
        )
        assert (receipt.complete, receipt.committed, receipt.sha256) == (True, len(data), digest)

        chunks = list(stub.Restore(pb.RestoreRequest(backup_id="nightly-1"), timeout=WAIT))
        assert all(len(c.data) <= MiB for c in chunks)
        assert b"".join(c.data for c in chunks) == data
        assert [c.final for c in chunks] == [False] * (len(chunks) - 1) + [True]
        assert chunks[-1].sha256 == digest
        tail = list(stub.Restore(pb.RestoreRequest(backup_id="nightly-1", offset=len(data) - 5)))
        assert b"".join(c.data for c in tail) == data[-5:]

        listed = stub.ListBackups(pb.ListBackupsRequest(), timeout=WAIT).backups
        assert [(b.backup_id, b.size, b.sha256) for b in listed] == [
            ("nightly-1", len(data), digest)
        ]
        with pytest.raises(grpc.RpcError) as again:
            stub.UploadBackup(iter([_chunk("nightly-1", len(data), b"")]), timeout=WAIT)
        assert again.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_backup_sha256_mismatch_refused(cloud: Cloud, paris: Site) -> None:
    data = os.urandom(100_000)
    with cloud.link_channel(paris.key_pem, paris.cert_pem) as channel:
        stub = pb_grpc.BridgeStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            stub.UploadBackup(
                iter([_chunk("b1", 0, data[:50_000]),
                      _chunk("b1", 50_000, data[50_000:], final=True,
                             sha256=hashlib.sha256(data + b"x").digest())]),
                timeout=WAIT,
            )
        assert bad.value.code() == grpc.StatusCode.DATA_LOSS
        status = stub.BackupStatus(pb.BackupStatusRequest(backup_id="b1"), timeout=WAIT)
        assert status.state == pb.BackupStatusResponse.ABSENT
        with pytest.raises(grpc.RpcError) as missing:
            list(stub.Restore(pb.RestoreRequest(backup_id="b1"), timeout=WAIT))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as big:
            stub.UploadBackup(iter([_chunk("b2", 0, b"\0" * (MiB + 1))]), timeout=WAIT)
        assert big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as bad_id:
            stub.UploadBackup(iter([_chunk("../b3", 0, b"x")]), timeout=WAIT)
        assert bad_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_site_sees_only_its_own_backups(cloud: Cloud, paris: Site) -> None:
    lyon = enrol(cloud, "lyon-2")
    body = b"paris backup"
    with cloud.link_channel(paris.key_pem, paris.cert_pem) as channel:
        pb_grpc.BridgeStub(channel).UploadBackup(
            iter([_chunk("b1", 0, body, final=True, sha256=hashlib.sha256(body).digest())]),
            timeout=WAIT,
        )
    with cloud.link_channel(lyon.key_pem, lyon.cert_pem) as channel:
        stub = pb_grpc.BridgeStub(channel)
        assert list(stub.ListBackups(pb.ListBackupsRequest(), timeout=WAIT).backups) == []
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Restore(pb.RestoreRequest(backup_id="b1"), timeout=WAIT))
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------- health, reflection


def test_health_serving_on_both_ports(cloud: Cloud, paris: Site) -> None:
    for channel in (cloud.enrol_channel(), cloud.link_channel(paris.key_pem, paris.cert_pem)):
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "edgecc.bridge.v1.Bridge", "edgecc.bridge.v1.Enrolment"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=WAIT)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as unknown:
                stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=WAIT)
            assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_services(cloud: Cloud) -> None:
    with cloud.enrol_channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"edgecc.bridge.v1.Bridge", "edgecc.bridge.v1.Enrolment",
                "grpc.health.v1.Health"} <= services
        from google.protobuf.descriptor_pool import DescriptorPool

        pool = DescriptorPool(database)
        bridge = pool.FindServiceByName("edgecc.bridge.v1.Bridge")
        assert {m.name for m in bridge.methods} == {
            "SiteLink", "UploadBackup", "BackupStatus", "ListBackups", "Restore"
        }
        assert bridge.methods_by_name["SiteLink"].client_streaming


def test_racing_enrolments_with_one_token_issue_one_certificate(cloud: Cloud) -> None:
    token = cloud.call(cloud.server.issue_token("paris-1", 600))
    outcomes: list[Any] = []
    start = threading.Barrier(4)

    def attempt() -> None:
        _, csr_pem = make_site_key_and_csr("paris-1")
        with cloud.enrol_channel() as channel:
            stub = pb_grpc.EnrolmentStub(channel)
            start.wait(WAIT)
            try:
                outcomes.append(stub.Enrol(pb.EnrolRequest(token=token, csr_pem=csr_pem),
                                           timeout=WAIT))
            except grpc.RpcError as exc:
                outcomes.append(exc.code())

    threads = [threading.Thread(target=attempt) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert len(outcomes) == 4
    assert sum(isinstance(o, pb.EnrolResponse) for o in outcomes) == 1
    assert outcomes.count(grpc.StatusCode.UNAUTHENTICATED) == 3
    assert len(cloud.store("certificates", "paris-1")) == 1


def test_a_restarted_cloud_keeps_its_ca_acks_and_backups(
    tmp_path, cloud_store_backend: StoreBackend
) -> None:
    first = Cloud(tmp_path / "cloud", db_url=cloud_store_backend.url)
    try:
        site = enrol(first, "paris-1")
        channel, link = open_link(first, site)
        with channel:
            for seq in (1, 2, 3, 5):
                link.event(seq)
            link.finish()
        body = b"backup before restart"
        with first.link_channel(site.key_pem, site.cert_pem) as channel:
            pb_grpc.BridgeStub(channel).UploadBackup(
                iter([_chunk("b1", 0, body, final=True, sha256=hashlib.sha256(body).digest())]),
                timeout=WAIT,
            )
    finally:
        first.close()
    second = Cloud(tmp_path / "cloud", db_url=cloud_store_backend.url)
    try:
        assert second.ca_pem == site.ca_pem  # the site's certificate is still good
        channel, link = open_link(second, site)
        with channel:
            assert link.wait_ack(3) == [3]
            link.event(4)
            assert link.wait_ack(5)[-1] == 5
            link.finish()
            restored = pb_grpc.BridgeStub(channel).Restore(pb.RestoreRequest(backup_id="b1"))
            assert b"".join(c.data for c in restored) == body
    finally:
        second.close()


# ------------------------------------------------------------------- batches and heartbeats


def _batch(seqs: list[int], site_id: str = "paris-1") -> Any:
    message = pb.SiteMessage()
    message.events.SetInParent()  # present even when empty
    for seq in seqs:
        event = message.events.events.add(site_id=site_id, seq=seq, kind="queue.enter",
                                          payload=f"call {seq}".encode())
        event.occurred_at.FromSeconds(1_700_000_000 + seq)
    return message


def test_event_batches_are_stored_like_single_events(cloud: Cloud, paris: Site) -> None:
    channel, link = open_link(cloud, paris)
    with channel:
        first = link.recv()
        assert first.ack.seq == 0 and first.ack.batches  # the cloud says it takes batches
        link.send(_batch(list(range(1, 41)) + list(range(1, 11))))  # replays inside a batch
        link.event(41)  # single events still work, interleaved
        link.send(_batch(list(range(42, 61))))
        assert link.wait_ack(60)[-1] == 60
        link.finish()
    events = cloud.store("events", "paris-1", limit=1000)
    assert [e.seq for e in events] == list(range(1, 61))
    assert all(e.payload == f"call {e.seq}".encode() for e in events)
    assert all(e.occurred_at == 1_700_000_000 + e.seq for e in events)


def test_a_bad_event_in_a_batch_ends_the_link_after_the_good_ones(
    cloud: Cloud, paris: Site
) -> None:
    channel, link = open_link(cloud, paris)
    with channel:
        message = _batch([1, 2, 3])
        message.events.events[2].kind = ""
        link.send(message)
        error = link.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event 3: kind" in error.details()
    assert stored_seqs(cloud, "paris-1") == [1, 2]  # the good ones before it are kept

    channel, link = open_link(cloud, paris)
    with channel:
        link.send(_batch([]))
        error = link.error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "empty event batch" in error.details()

    channel, link = open_link(cloud, paris)
    with channel:
        link.send(_batch([4], site_id="lyon-2"))
        error = link.error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stored_seqs(cloud, "paris-1") == [1, 2]


def test_batch_ingest_counts_duplicates_and_walks_over_held_events(
    cloud: Cloud, paris: Site
) -> None:
    from cloud_bridge.store import EventRecord

    def records(seqs: list[int]) -> list[EventRecord]:
        return [EventRecord("paris-1", s, "queue.enter", b"p%d" % s, 1.0) for s in seqs]

    held = cloud.store("ingest", records([6, 7]), 10.0, window=100)
    assert (held.acked_seq, held.stored, held.duplicates, held.refused) == (0, 2, 0, 0)
    # Contiguous from the ack, then on over the held 6 and 7; 7 again and 3 twice absorbed.
    result = cloud.store("ingest", records([1, 2, 3, 3, 4, 5, 7, 500]), 11.0, window=100)
    assert (result.acked_seq, result.stored, result.duplicates, result.refused) == (7, 5, 2, 1)
    again = cloud.store("ingest", records([2, 8]), 12.0, window=100)
    assert (again.acked_seq, again.stored, again.duplicates) == (8, 1, 1)
    # A gap-free batch whose end meets held events: the ack walks on over them.
    cloud.store("ingest", records([11, 12]), 13.0, window=100)
    joined = cloud.store("ingest", records([9, 10]), 14.0, window=100)
    assert (joined.acked_seq, joined.stored, joined.duplicates) == (12, 2, 0)
    assert stored_seqs(cloud, "paris-1") == list(range(1, 13))
    assert [e.payload for e in cloud.store("events", "paris-1")] == [b"p%d" % s
                                                                    for s in range(1, 13)]


def _columns(seqs: list[int], site_id: str = "paris-1") -> Any:
    message = pb.SiteMessage()
    columns = message.columns
    columns.SetInParent()  # present even when empty
    columns.site_id = site_id
    columns.seqs.extend(seqs)
    columns.kinds.extend(["queue.enter"] * len(seqs))
    columns.payloads.extend(f"call {seq}".encode() for seq in seqs)
    columns.occurred_at.extend(1_700_000_000.25 + seq for seq in seqs)
    return message


def test_event_columns_are_stored_like_single_events(cloud: Cloud, paris: Site) -> None:
    channel, link = open_link(cloud, paris)
    with channel:
        first = link.recv()
        assert first.ack.seq == 0 and first.ack.columns  # the cloud says it takes columns
        link.send(_columns([3, 1, 2] + list(range(4, 41)) + [1, 2]))  # out of order, replays
        link.event(41)  # single events and batches still work, interleaved
        link.send(_batch(list(range(42, 51))))
        link.send(_columns(list(range(51, 61))))
        assert link.wait_ack(60)[-1] == 60
        link.finish()
    events = cloud.store("events", "paris-1", limit=1000)
    assert [e.seq for e in events] == list(range(1, 61))
    assert all(e.payload == f"call {e.seq}".encode() for e in events)
    assert all(e.occurred_at == 1_700_000_000.25 + e.seq for e in events if e.seq != 41
               and not 42 <= e.seq <= 50)
    counts = {view.site_id: view.events_by_kind for view in cloud.call(cloud.server.site_views())}
    assert counts["paris-1"] == {"queue.enter": 60}  # replays are not counted twice


@pytest.mark.parametrize(
    ("edit", "code", "words", "kept"),
    [
        (lambda c: c.kinds.__setitem__(2, ""), grpc.StatusCode.INVALID_ARGUMENT,
         "event 3: kind", [1, 2]),
        (lambda c: c.kinds.__setitem__(1, "k" * 65), grpc.StatusCode.INVALID_ARGUMENT,
         "event 2: kind", [1]),
        (lambda c: c.payloads.__setitem__(3, b"x" * (256 * 1024 + 1)),
         grpc.StatusCode.INVALID_ARGUMENT, "event 4: payload", [1, 2, 3]),
        (lambda c: c.seqs.__setitem__(0, 0), grpc.StatusCode.INVALID_ARGUMENT,
         "seq starts at 1", []),
        (lambda c: c.occurred_at.__delitem__(3), grpc.StatusCode.INVALID_ARGUMENT,
         "different lengths", []),
        (lambda c: [c.ClearField(f) for f in ("seqs", "kinds", "payloads", "occurred_at")],
         grpc.StatusCode.INVALID_ARGUMENT, "empty event batch", []),
        (lambda c: setattr(c, "site_id", "lyon-2"), grpc.StatusCode.PERMISSION_DENIED,
         "lyon-2", []),
    ],
    ids=["empty-kind", "long-kind", "big-payload", "seq-0", "lengths", "empty", "other-site"],
)
def test_a_bad_event_in_columns_ends_the_link_after_the_good_ones(
    cloud: Cloud, paris: Site, edit: Any, code: grpc.StatusCode, words: str, kept: list[int]
) -> None:
    message = _columns([1, 2, 3, 4])
    edit(message.columns)
    channel, link = open_link(cloud, paris)
    with channel:
        link.send(message)
        error = link.error()
    assert error.code() == code
    assert words in error.details()
    assert stored_seqs(cloud, "paris-1") == kept  # the good ones before it are kept
    assert cloud.store("acked_seq", "paris-1") == len(kept)


def test_the_first_ack_says_the_newest_seq_held_beyond_a_gap(cloud: Cloud, paris: Site) -> None:
    channel, link = open_link(cloud, paris)
    with channel:
        first = link.recv()
        assert (first.ack.seq, first.ack.newest_seq) == (0, 0)
        link.send(_columns([1, 2, 5, 6]))  # 3 and 4 missing: 5 and 6 held
        assert link.wait_ack(2)[-1] == 2
        link.finish()
    channel, link = open_link(cloud, paris)
    with channel:
        first = link.recv()
        assert (first.ack.seq, first.ack.newest_seq) == (2, 6)  # where a restore continues
        link.finish()


def test_column_ingest_admits_the_usual_batch_whole_and_checks_the_rest(
    cloud: Cloud, paris: Site
) -> None:
    from cloud_bridge.store import EventColumns, StoreError

    def columns(seqs: list[int]) -> EventColumns:
        return EventColumns("paris-1", seqs, ["queue.enter"] * len(seqs),
                            [b"c%d" % s for s in seqs], [1.0] * len(seqs))

    usual = cloud.store("ingest", columns([2, 1, 3]), 10.0, window=100)  # a permuted range
    assert (usual.acked_seq, usual.stored, usual.duplicates, usual.refused) == (3, 3, 0, 0)
    # Same size as the range 4..6 but not it: a replay of 3 and a gap at 5.
    mixed = cloud.store("ingest", columns([3, 4, 6]), 11.0, window=100)
    assert (mixed.acked_seq, mixed.stored, mixed.duplicates) == (4, 2, 1)
    beyond = cloud.store("ingest", columns([5, 5, 7, 300]), 12.0, window=100)
    assert (beyond.acked_seq, beyond.stored, beyond.duplicates, beyond.refused) == (7, 2, 1, 1)
    assert stored_seqs(cloud, "paris-1") == list(range(1, 8))
    with pytest.raises(StoreError, match="differ in length"):
        EventColumns("paris-1", [8, 9], ["queue.enter"], [b"", b""], [1.0, 1.0])
    with pytest.raises(StoreError, match="empty batch"):
        cloud.store("ingest", columns([]), 13.0, window=100)
    assert cloud.store("acked_seq", "paris-1") == 7  # nothing lost or moved by the refusals


def test_a_quiet_link_hears_the_ack_again(tmp_path) -> None:
    quiet = Cloud(tmp_path / "quiet", heartbeat_s=0.2, site_silence_s=2.0)
    try:
        site = enrol(quiet, "paris-1")
        channel, link = open_link(quiet, site)
        with channel:
            link.event(1)
            assert link.wait_ack(1)[-1] == 1
            # Nothing sent any more: the cloud repeats its Ack (the site's liveness signal),
            # and a site that answers each with a Heartbeat keeps its link past site_silence_s.
            repeats = []
            for _ in range(15):  # 15 x heartbeat_s: past site_silence_s
                repeats.append(link.recv())
                link.send(pb.SiteMessage(heartbeat=pb.Heartbeat(acked_seq=1)))
            assert [m.ack.seq for m in repeats] == [1] * 15
            assert quiet.server.link_states()["paris-1"].connected
            link.finish()
        # A site that stops answering (behind a dead path) has its link ended.
        channel, link = open_link(quiet, site)
        with channel:
            assert link.wait_ack(1) == [1]
            ended = link.error()
            assert ended.code() == grpc.StatusCode.UNAVAILABLE
            assert "site silent" in (ended.details() or "")
        # The link's end is recorded as the handler returns, right after the status is sent.
        deadline = time.monotonic() + WAIT
        while quiet.server.link_states()["paris-1"].connected:
            assert time.monotonic() < deadline, "the ended link still counted connected"
            threading.Event().wait(0.01)  # polling interval of a bounded wait
    finally:
        quiet.close()
