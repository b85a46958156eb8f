"""The central IT console and ``push-config`` against a real ``edgecc cloud`` process.

A site enrols and links over real gRPC/TLS; headless Chromium (Debian ``chromium``) loads the
console page; ``push-config`` runs as the CLI does while the server runs.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_cloud_cli import cloud_cli
from test_cloud_link import Link

from cloud_bridge.ca import make_site_key_and_csr, verify_config_signature
from cloud_bridge.store import open_store
from proto import bridge_pb2 as pb
from proto import bridge_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
WAIT = 20.0  # bound on every wait for an event; never decides a pass by itself
CHROMIUM = Path("/usr/bin/chromium")
STARTED = re.compile(
    r"^edgecc cloud listening link=127\.0\.0\.1:(\d+) enrol=127\.0\.0\.1:(\d+) "
    r"http=(http://127\.0\.0\.1:\d+/) "
)


@dataclass
class RunningCloud:
    data_dir: Path
    process: subprocess.Popen[str]
    link_port: int
    enrol_port: int
    console: str

    @property
    def ca_pem(self) -> bytes:
        return (self.data_dir / "ca" / "ca.crt").read_bytes()


def first_line(process: subprocess.Popen[str]) -> str:
    """The first stdout line, read on a thread so that the wait is bounded."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()))  # type: ignore[union-attr]
    reader.start()
    reader.join(WAIT)
    assert lines, "no start-up line"
    return lines[0]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[RunningCloud]:
    data_dir = tmp_path / "cloud"
    process = subprocess.Popen(
        [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(data_dir),
         "--grpc-port", "0", "--enrol-port", "0", "--http-port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = first_line(process)
        match = STARTED.match(line)
        assert match, line
        yield RunningCloud(data_dir, process, int(match[1]), int(match[2]), match[3])
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(WAIT)


@dataclass
class EnrolledSite:
    site_id: str
    key_pem: bytes
    cert_pem: bytes


def enrol(cloud: RunningCloud, site_id: str) -> EnrolledSite:
    token = cloud_cli("--data-dir", str(cloud.data_dir), "token", "--site", site_id)
    assert token.returncode == 0, token.stderr
    key_pem, csr_pem = make_site_key_and_csr(site_id)
    credentials = grpc.ssl_channel_credentials(cloud.ca_pem)
    with grpc.secure_channel(f"127.0.0.1:{cloud.enrol_port}", credentials) as channel:
        reply = pb_grpc.EnrolmentStub(channel).Enrol(
            pb.EnrolRequest(token=token.stdout.strip(), csr_pem=csr_pem), timeout=WAIT
        )
    return EnrolledSite(reply.site_id, key_pem, reply.certificate_pem)


def link_channel(cloud: RunningCloud, site: EnrolledSite) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(cloud.ca_pem, site.key_pem, site.cert_pem)
    return grpc.secure_channel(f"127.0.0.1:{cloud.link_port}", credentials)


def send_event(link: Link, site_id: str, seq: int, kind: str, occurred_at: float) -> None:
    event = pb.Event(site_id=site_id, seq=seq, kind=kind, payload=b"{}")
    event.occurred_at.FromNanoseconds(int(occurred_at * 1e9))
    link.send(pb.SiteMessage(event=event))


def get(url: str) -> tuple[str, dict[str, str]]:
    with urllib.request.urlopen(url, timeout=WAIT) as response:
        return response.read().decode("utf-8"), dict(response.headers)


def api_site(cloud: RunningCloud, site_id: str) -> dict[str, Any]:
    body, _ = get(cloud.console + "api/sites")
    return next(s for s in json.loads(body)["sites"] if s["site_id"] == site_id)


# ------------------------------------------------------------------- Chromium


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once; a missing browser fails the test (Debian ``chromium``)."""
    if not CHROMIUM.exists():
        pytest.fail("headless Chromium not found at /usr/bin/chromium: install the Debian "
                    "package `chromium` (apt-get install -y chromium)", pytrace=False)
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    result = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class SiteRows(HTMLParser):
    """The console's rows: site id -> {cell class: text}; and the alerts, if shown."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.alerts: list[str] | None = None
        self.tags: set[str] = set()
        self._site: str | None = None
        self._cell: str | None = None
        self._in_alerts = False
        self._alert: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        attributes = dict(attrs)
        if tag == "section" and attributes.get("id") == "alerts":
            self._in_alerts = True
            self.alerts = []
        elif tag == "li" and self._in_alerts:
            self._alert = []
        elif tag == "tr" and attributes.get("data-site"):
            self._site = attributes["data-site"]
            self.rows[self._site] = {}
        elif tag == "td" and self._site is not None:
            self._cell = (attributes.get("class") or "").split()[-1]
            self.rows[self._site][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._in_alerts = False
        elif tag == "li" and self._alert is not None and self.alerts is not None:
            self.alerts.append("".join(self._alert))
            self._alert = None
        elif tag == "td":
            self._cell = None
        elif tag == "tr":
            self._site = None

    def handle_data(self, data: str) -> None:
        if self._alert is not None:
            self._alert.append(data)
        if self._site is not None and self._cell is not None:
            self.rows[self._site][self._cell] += data


def parse_console(html: str) -> SiteRows:
    parser = SiteRows()
    parser.feed(html)
    return parser


def png_pixels(data: bytes) -> np.ndarray:
    """Decode an 8-bit RGB/RGBA PNG (what Chromium writes) with zlib; PNG spec §9 filters."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    position, idat, header = 8, b"", b""
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        position += 12 + length
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.uint8)
    previous = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 2:  # Up
            row = (line + previous) & 0xFF
        elif kind == 1:  # Sub: a running sum per channel
            row = np.cumsum(line.reshape(width, channels), axis=0).reshape(stride) & 0xFF
        else:  # Average (3) or Paeth (4): each byte depends on the one before it
            row = np.zeros(stride, dtype=np.int32)
            for x in range(stride):
                a = row[x - channels] if x >= channels else 0
                b = previous[x]
                if kind == 3:
                    row[x] = (line[x] + (a + b) // 2) & 0xFF
                else:
                    c = previous[x - channels] if x >= channels else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    predictor = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                    row[x] = (line[x] + predictor) & 0xFF
        out[y] = row
        previous = row
    return out.reshape(height, width, channels)


# ------------------------------------------------------------------- tests


def test_console_shows_link_lag_backups_kinds_and_alerts(running: RunningCloud,
                                                         tmp_path: Path) -> None:
    site = enrol(running, "paris-1")
    enrol(running, "lyon-2")  # enrolled, never linked
    before = api_site(running, "paris-1")
    assert (before["connected"], before["acked_seq"], before["alerts"]) == (False, 0, [])
    assert before["link_state"] == "never linked"

    hostile = "<img src=x onerror=alert(1)>"
    occurred = time.time() - 30  # the events reach the cloud at least 30 s late
    with link_channel(running, site) as channel:
        link = Link(channel)
        assert link.wait_ack(0) == [0]
        for seq, kind in ((1, "queue.enter"), (2, "queue.enter"), (3, "call.end"),
                          (5, "agent.login"), (6, hostile)):
            send_event(link, "paris-1", seq, kind, occurred)
        assert link.wait_ack(3)[-1] == 3  # 4 is missing: 5 and 6 are held
        body = b"encrypted backup"
        receipt = pb_grpc.BridgeStub(channel).UploadBackup(iter([pb.BackupChunk(
            backup_id="nightly-1", offset=0, data=body, final=True,
            sha256=hashlib.sha256(body).digest(),
        )]), timeout=WAIT)
        assert receipt.complete

        paris = api_site(running, "paris-1")
        assert paris["connected"] is True
        assert paris["link_state"] == "degraded"  # linked, but the ack is stuck at a gap
        assert (paris["acked_seq"], paris["newest_seq"], paris["lag_events"],
                paris["held_events"]) == (3, 6, 3, 2)
        assert paris["lag_seconds"] >= 30
        assert paris["events_by_kind"] == {"queue.enter": 2, "call.end": 1, "agent.login": 1,
                                           hostile: 1}
        assert paris["last_backup"]["backup_id"] == "nightly-1"
        assert paris["last_backup"]["size"] == len(body)
        assert paris["alerts"] == ["2 events held behind a gap after seq 3"]

        dom = chromium(tmp_path, "--dump-dom", running.console).stdout
        page = parse_console(dom)
        row = page.rows["paris-1"]
        assert row["link"] == "degraded"
        assert (row["ack"], row["lag-events"], row["held"]) == ("3", "3", "2")
        assert float(row["lag-seconds"]) >= 30
        assert "nightly-1" in row["backup"]
        assert "call.end: 1" in row["kinds"] and "queue.enter: 2" in row["kinds"]
        assert hostile + ": 1" in row["kinds"]  # shown as text ...
        assert "img" not in page.tags  # ... never as markup
        assert page.rows["lyon-2"]["link"] == "never linked"
        assert page.alerts == ["paris-1: 2 events held behind a gap after seq 3"]

        send_event(link, "paris-1", 4, "queue.leave", occurred)
        assert link.wait_ack(6)[-1] == 6
        html, headers = get(running.console)
        assert "default-src 'none'" in headers["content-security-policy"]
        page = parse_console(html)
        assert page.alerts is None  # nothing to say: no alerts section at all
        assert (page.rows["paris-1"]["lag-events"], page.rows["paris-1"]["held"]) == ("0", "0")
        assert page.rows["paris-1"]["link"] == "online"

        shot = tmp_path / "console.png"
        chromium(tmp_path, "--window-size=1280,400", f"--screenshot={shot}", running.console)
        pixels = png_pixels(shot.read_bytes())
        assert pixels.shape[:2] == (400, 1280)
        assert float(pixels[..., :3].std()) > 5.0  # text and table, not a blank page
        link.finish()

    after = api_site(running, "paris-1")
    assert after["connected"] is False and after["link_state"] == "offline"
    assert after["link_since"] >= paris["link_since"]


def test_push_config_reaches_a_live_link_and_bad_files_change_nothing(
    running: RunningCloud, tmp_path: Path
) -> None:
    site = enrol(running, "paris-1")
    data_dir = str(running.data_dir)
    good = tmp_path / "site.yaml"
    good.write_text("site: {id: paris-1, name: Paris}\nsip: {udp_port: 5070}\n")
    with link_channel(running, site) as channel:
        link = Link(channel)
        assert link.wait_ack(0) == [0]
        pushed = cloud_cli("--data-dir", data_dir, "push-config", "--site", "paris-1",
                           "--file", str(good))
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.startswith("site=paris-1 version=1 ")
        config = link.recv().config  # sent by the running server, which watches the store
        assert (config.version, config.yaml) == (1, good.read_bytes())
        assert verify_config_signature(running.ca_pem, "paris-1", 1, config.yaml,
                                       config.signature)

        refusals = {
            "site: {id: lyon-2}\n": "site.id is 'lyon-2'",
            "site:\n  id: [paris-1\n": "line 3",
            "- just\n- a list\n": "expected a mapping",
            "x" * (256 * 1024 + 1): "byte limit",
        }
        for text, words in refusals.items():
            bad = tmp_path / "bad.yaml"
            bad.write_text(text)
            refused = cloud_cli("--data-dir", data_dir, "push-config", "--site", "paris-1",
                                "--file", str(bad))
            assert refused.returncode == 2 and words in refused.stderr, refused.stderr
        missing = cloud_cli("--data-dir", data_dir, "push-config", "--site", "paris-1",
                            "--file", str(tmp_path / "nope.yaml"))
        assert missing.returncode == 2 and "nope.yaml" in missing.stderr
        no_ca = cloud_cli("--data-dir", str(tmp_path / "empty"), "push-config", "--site",
                          "paris-1", "--file", str(good))
        assert no_ca.returncode == 2 and "no CA" in no_ca.stderr
        assert not (tmp_path / "empty" / "ca").exists()  # never a new CA behind the sites' back

        good.write_text("site: {id: paris-1, name: Paris Nord}\n")
        again = cloud_cli("--data-dir", data_dir, "push-config", "--site", "paris-1",
                          "--file", str(good))
        assert again.returncode == 0 and " version=2 " in again.stdout
        assert link.recv().config.version == 2  # the refused files took no version
        link.finish()
    store = open_store(str(running.data_dir / "cloud.db"))
    try:
        assert store.config_versions() == {"paris-1": 2}
    finally:
        store.close()


def test_console_port_in_use_is_an_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(tmp_path / "cloud"),
             "--grpc-port", "0", "--enrol-port", "0", "--http-port", str(port)],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port} (console)" in result.stderr


class KpiRows(HTMLParser):
    """The console's KPI table: site id (or "All sites") -> {cell class: text}."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self._site: str | None = None
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "tr" and attributes.get("data-kpi-site"):
            self._site = attributes["data-kpi-site"]
            self.rows[self._site] = {}
        elif tag == "td" and self._site is not None:
            self._cell = (attributes.get("class") or "").split()[-1]
            self.rows[self._site][self._cell] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._site = None
        elif tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._site is not None and self._cell is not None:
            self.rows[self._site][self._cell] += data


def test_console_shows_queue_kpis_per_site_and_for_all_sites(running: RunningCloud,
                                                             tmp_path: Path) -> None:
    now = time.time()
    calls = {
        # paris-1: answered in 10 s, answered in 40 s, abandoned after 30 s.
        "paris-1": [("queue.connect", {"call_id": "p1", "wait_s": 10}),
                    ("queue.connect", {"call_id": "p2", "wait_s": 40}),
                    ("queue.abandon", {"call_id": "p3", "wait_s": 30})],
        # lyon-2: answered in 4 s, one short abandon (2 s: not offered), one still waiting.
        "lyon-2": [("queue.connect", {"call_id": "l1", "wait_s": 4}),
                   ("queue.abandon", {"call_id": "l2", "wait_s": 2}),
                   ("queue.enter", {"call_id": "l3"})],
    }
    for site_id, events in calls.items():
        site = enrol(running, site_id)
        with link_channel(running, site) as channel:
            link = Link(channel)
            assert link.wait_ack(0) == [0]
            for seq, (kind, payload) in enumerate(events, start=1):
                event = pb.Event(site_id=site_id, seq=seq, kind=kind,
                                 payload=json.dumps(payload).encode())
                event.occurred_at.FromNanoseconds(int((now - 60) * 1e9))
                link.send(pb.SiteMessage(event=event))
            assert link.wait_ack(len(events))[-1] == len(events)
            link.finish()
    body, _ = get(running.console + "api/sites")
    answer = json.loads(body)
    paris = next(s for s in answer["sites"] if s["site_id"] == "paris-1")["kpis"]
    assert (paris["offered"], paris["answered"], paris["abandoned"]) == (3, 2, 1)
    assert paris["service_level"] == pytest.approx(1 / 3)
    assert paris["asa"] == pytest.approx(25.0)
    everyone = answer["all_sites_kpis"]
    assert (everyone["offered"], everyone["answered"], everyone["short_abandoned"],
            everyone["waiting"]) == (5, 3, 1, 1)
    assert everyone["service_level"] == pytest.approx(2 / 4)
    assert everyone["asa"] == pytest.approx(54 / 3)

    kpis = KpiRows()
    kpis.feed(chromium(tmp_path, "--dump-dom", running.console).stdout)
    assert set(kpis.rows) == {"paris-1", "lyon-2", "All sites"}
    assert (kpis.rows["paris-1"]["offered"], kpis.rows["paris-1"]["service-level"],
            kpis.rows["paris-1"]["asa"]) == ("3", "33.3%", "25.0")
    assert (kpis.rows["lyon-2"]["offered"], kpis.rows["lyon-2"]["waiting"],
            kpis.rows["lyon-2"]["service-level"]) == ("2", "1", "100.0%")
    assert (kpis.rows["All sites"]["offered"], kpis.rows["All sites"]["asa"]) == ("5", "18.0")


def test_console_shows_the_running_config_version_and_a_refused_push(running: RunningCloud
                                                                      ) -> None:
    site = enrol(running, "nice-3")
    with link_channel(running, site) as channel:
        link = Link(channel)
        link.send(pb.SiteMessage(hello=pb.Hello(site_id="nice-3", config_version=4,
                                                agent_version="edgecc test")))
        link.send(pb.SiteMessage(config_applied=pb.ConfigApplied(
            version=5, ok=False, error="site.yaml:3: sip.udp_port: expected a port")))
        assert link.wait_ack(0) == [0]

        deadline = time.monotonic() + WAIT
        view = api_site(running, "nice-3")
        while not view["config_refused"] and time.monotonic() < deadline:
            time.sleep(0.05)  # polling interval of a bounded wait for the server's write
            view = api_site(running, "nice-3")
        link.finish()
    assert view["config_version"] == 4
    assert view["config_refused"] == "version 5: site.yaml:3: sip.udp_port: expected a port"
    assert any("config version 5" in alert for alert in view["alerts"])
