"""``edgecc cloud`` as a real process: start-up line, SIGTERM, and the console commands."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from proto.build import ensure_generated

ensure_generated()

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from cloud_bridge import cli  # noqa: E402
from cloud_bridge.ca import make_site_key_and_csr  # noqa: E402
from proto import bridge_pb2 as pb  # noqa: E402
from proto import bridge_pb2_grpc as pb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  # bound on every wait for an event; never decides a pass by itself
STARTED = re.compile(r"^edgecc cloud listening link=127\.0\.0\.1:(\d+) enrol=127\.0\.0\.1:(\d+) ")


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


def cloud_cli(*args: str) -> Result:
    """Run ``edgecc cloud ARGS`` in this process (the server under test is another process)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(args))
        except SystemExit as exc:  # argparse refusals
            status = int(exc.code or 0)
    return Result(status, out.getvalue(), err.getvalue())


def _first_line(process: subprocess.Popen[str]) -> str:
    """The first stdout line, read on a thread so that the wait is bounded."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(WAIT)
    assert lines, "no start-up line"
    return lines[0]


@pytest.fixture
def running(tmp_path) -> Iterator[tuple[Path, subprocess.Popen[str], int, int]]:
    data_dir = tmp_path / "cloud"
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(data_dir),
         "--grpc-port", "0", "--enrol-port", "0", "--http-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _first_line(process)
        match = STARTED.match(line)
        assert match, line
        yield data_dir, process, int(match[1]), int(match[2])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(WAIT)


def test_serves_enrols_and_stops_on_sigterm(running) -> None:
    data_dir, process, link_port, enrol_port = running
    ca_pem = (data_dir / "ca" / "ca.crt").read_bytes()
    token = cloud_cli("--data-dir", str(data_dir), "token", "--site", "paris-1")
    assert token.returncode == 0, token.stderr
    assert "site=paris-1" in token.stderr and "single use" in token.stderr
    key_pem, csr_pem = make_site_key_and_csr("paris-1")
    credentials = grpc.ssl_channel_credentials(ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{enrol_port}", credentials) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                           timeout=WAIT)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reply = pb_grpc.EnrolmentStub(channel).Enrol(
            pb.EnrolRequest(token=token.stdout.strip(), csr_pem=csr_pem), timeout=WAIT
        )
    assert reply.site_id == "paris-1"
    link = grpc.ssl_channel_credentials(ca_pem, key_pem, reply.certificate_pem)
    link_channel = grpc.secure_channel(f"127.0.0.1:{link_port}", link)
    stop_sending = threading.Event()

    def quiet_site() -> Iterator[pb.SiteMessage]:
        stop_sending.wait(WAIT)
        yield from ()

    try:
        stub = pb_grpc.BridgeStub(link_channel)
        status = stub.BackupStatus(pb.BackupStatusRequest(backup_id="b1"), timeout=WAIT)
        assert status.state == pb.BackupStatusResponse.ABSENT
        # A site link stays open through what follows, until the server stops.
        stream = stub.SiteLink(quiet_site(), timeout=WAIT)
        assert next(stream).ack.seq == 0

        sites = cloud_cli("--data-dir", str(data_dir), "sites")
        assert sites.returncode == 0
        row = next(line for line in sites.stdout.splitlines() if line.startswith("paris-1 "))
        from cryptography import x509

        serial = x509.load_pem_x509_certificate(reply.certificate_pem).serial_number
        assert f"{serial:x}" in row
        backups = cloud_cli("backups", "--data-dir", str(data_dir), "--site", "paris-1")
        assert (backups.returncode, backups.stdout.strip()) == (0, "no backups")

        revoked = cloud_cli("--data-dir", str(data_dir), "revoke", "--serial", f"{serial:x}")
        assert revoked.stdout.strip() == f"serial={serial:x} revoked"
        with pytest.raises(grpc.RpcError) as refused:
            stub.BackupStatus(pb.BackupStatusRequest(backup_id="b1"), timeout=WAIT)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

        process.send_signal(signal.SIGTERM)
        assert process.wait(WAIT) == 0
        with pytest.raises(grpc.RpcError) as closed:
            next(stream)  # the open link was closed by the server
        assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop_sending.set()
        link_channel.close()
    assert "event=stopped" in process.stderr.read()  # type: ignore[union-attr]


def test_bad_input_gets_a_clear_error(tmp_path) -> None:
    bad_site = cloud_cli("--data-dir", str(tmp_path), "token", "--site", "Paris 1")
    assert bad_site.returncode == 2 and "invalid site id" in bad_site.stderr
    no_dir = cloud_cli("sites")
    assert no_dir.returncode == 2 and "--data-dir is required" in no_dir.stderr
    postgres = cloud_cli("--data-dir", str(tmp_path), "--db", "postgresql://db/edgecc", "sites")
    assert postgres.returncode == 2 and "PostgreSQL" in postgres.stderr
    serve_pg = cloud_cli("--data-dir", str(tmp_path), "--db", "postgresql://db/x")
    assert serve_pg.returncode == 1 and "PostgreSQL" in serve_pg.stderr
    no_ca = cloud_cli("--data-dir", str(tmp_path / "empty"), "restore-token", "--site", "paris")
    assert no_ca.returncode == 1 and "no cloud CA" in no_ca.stderr and no_ca.stdout == ""


def test_port_in_use_is_reported(running) -> None:
    data_dir, _, link_port, _ = running
    second = subprocess.run(
        [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(data_dir.parent / "other"),
         "--grpc-port", str(link_port), "--enrol-port", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
    )
    assert second.returncode == 1
    assert "cannot listen" in second.stderr
