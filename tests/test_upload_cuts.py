"""A backup upload cut 20 times at random byte counts still ends whole and re-sends little.

The cut is real: a TCP relay on 127.0.0.1 between the uploader and the cloud closes both
sockets after a random number of client bytes on each of its first 20 connections (TLS and
HTTP/2 die mid-frame). The uploader resumes from the cloud's committed offset each time.
Seeded, bounded in cuts and time.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from proto.build import ensure_generated

ensure_generated()

from cloud_bridge.ca import make_site_key_and_csr  # noqa: E402
from edge_agent.backup import upload_file  # noqa: E402
from edge_agent.channel import pb, pb_grpc, secure_channel  # noqa: E402
from edge_agent.config import CloudSection  # noqa: E402

CUTS = 20
CHUNK = 64 * 1024
SIZE = 6 * 1024 * 1024 + 12345
WAIT = 60.0


class CuttingRelay:
    """Relays TCP to ``target``; connection i (i < len(cuts)) is closed after cuts[i] bytes up."""

    def __init__(self, target: tuple[str, int], cuts: list[int]) -> None:
        self.target = target
        self.cuts = list(cuts)
        self.done_cuts = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        index = 0
        while not self._stopped.is_set() and index < 500:  # bounded
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=WAIT)
            budget = self.cuts[index] if index < len(self.cuts) else None
            index += 1
            with self._lock:
                self._sockets += [client, upstream]
            state = {"left": budget}
            for source, sink, up in ((client, upstream, True), (upstream, client, False)):
                thread = threading.Thread(target=self._pump, args=(source, sink, up, state, client,
                                                                   upstream), daemon=True)
                thread.start()
                self._threads.append(thread)

    def _pump(self, source: socket.socket, sink: socket.socket, up: bool, state: dict,
              client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if up and state["left"] is not None:
                    if len(data) >= state["left"]:
                        sink.sendall(data[: state["left"]])
                        with self._lock:
                            self.done_cuts += 1
                        break  # the cut: both sockets close below, mid-stream
                    state["left"] -= len(data)
                sink.sendall(data)
        except OSError:
            pass
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self._stopped.set()
        self.listener.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def cloud(tmp_path: Path):  # type: ignore[no-untyped-def]
    from test_backup_restore import Cloud

    c = Cloud(tmp_path / "cloud")
    try:
        yield c
    finally:
        c.close()


def _enrol(cloud, site_id: str) -> tuple[bytes, Any]:  # type: ignore[no-untyped-def]
    """(site key PEM, EnrolReply) for ``site_id``."""
    token = cloud.token(site_id)
    key_pem, csr_pem = make_site_key_and_csr(site_id)
    with secure_channel(f"127.0.0.1:{cloud.server.enrol_port}", CloudSection(address="x:1"),
                        cloud.server.ca.certificate_pem) as channel:
        reply = pb_grpc.EnrolmentStub(channel).Enrol(
            pb.EnrolRequest(token=token, csr_pem=csr_pem), timeout=WAIT)
    return key_pem, reply


def test_an_upload_cut_twenty_times_ends_with_the_right_sha256(
    tmp_path: Path, cloud  # type: ignore[no-untyped-def]
) -> None:
    rng = random.Random(7)
    key_pem, reply = _enrol(cloud, "paris-1")
    bundle = tmp_path / "bundle"
    bundle.write_bytes(rng.randbytes(SIZE))
    # Each connection dies after 1 KiB (inside the TLS handshake) to 400 KiB of upload.
    relay = CuttingRelay(("127.0.0.1", cloud.server.link_port),
                         [rng.randint(1024, 400 * 1024) for _ in range(CUTS)])
    section = CloudSection(address=f"127.0.0.1:{relay.port}",
                           reconnect={"initial_ms": 50, "max_ms": 200})
    try:
        with secure_channel(section.address, section, reply.ca_certificate_pem, key_pem,
                            reply.certificate_pem) as channel:
            result = upload_file(pb_grpc.BridgeStub(channel), bundle, "cut-20", chunk_bytes=CHUNK,
                                 retry_initial_s=0.05, retry_max_s=0.5, max_attempts=200)
    finally:
        relay.close()
    assert relay.done_cuts == CUTS  # every planned cut happened during the upload
    expected = hashlib.sha256(bundle.read_bytes()).digest()
    assert result.sha256 == expected and result.size == SIZE
    stored = cloud.server.backups.final_path("paris-1", "cut-20")
    assert hashlib.sha256(stored.read_bytes()).digest() == expected
    record = cloud.on_worker(cloud.server.store.backup, "paris-1", "cut-20")
    assert record.complete and record.sha256 == expected
    # At most one chunk in flight: each cut costs at most one chunk sent again.
    resent = result.sent_bytes - SIZE
    print(f"cuts={relay.done_cuts} attempts={result.attempts} resent={resent} bytes")
    assert 0 <= resent <= CUTS * CHUNK
    assert not os.path.exists(cloud.server.backups.part_path("paris-1", "cut-20"))


def test_an_upload_stream_past_its_deadline_resumes_from_the_committed_offset(
    tmp_path: Path, cloud  # type: ignore[no-untyped-def]
) -> None:
    """UploadBackup has a deadline like every call: a stream that stops carrying chunks is
    ended by it, and the next stream resumes where the cloud's commit stands."""
    key_pem, reply = _enrol(cloud, "lyon-1")
    bundle = tmp_path / "bundle"
    bundle.write_bytes(random.Random(11).randbytes(4 * CHUNK + 777))
    stalled, next_stream = threading.Event(), threading.Event()
    offsets: list[int] = []

    def on_chunk(offset: int, _size: int) -> None:
        offsets.append(offset)
        if offset == 2 * CHUNK and not stalled.is_set():
            # The first stream stops here (a link that carries nothing more) until the next
            # stream sends its first chunk: only the deadline can end it.
            stalled.set()
            next_stream.wait(WAIT)
        elif stalled.is_set():
            next_stream.set()

    section = CloudSection(address=f"127.0.0.1:{cloud.server.link_port}")
    with secure_channel(section.address, section, reply.ca_certificate_pem, key_pem,
                        reply.certificate_pem) as channel:
        result = upload_file(pb_grpc.BridgeStub(channel), bundle, "deadline-1",
                             chunk_bytes=CHUNK, retry_initial_s=0.05, upload_timeout_s=1.0,
                             on_chunk=on_chunk)
    assert stalled.is_set() and next_stream.is_set()
    assert result.attempts == 2  # the stalled stream, then one that finished
    assert result.sha256 == hashlib.sha256(bundle.read_bytes()).digest()
    # The second stream began at the committed offset: what the first sent, at most one chunk
    # less (the one in flight at the deadline).
    second = offsets[offsets.index(2 * CHUNK) + 1]
    assert CHUNK <= second <= 2 * CHUNK, offsets
