"""``edgecc demo``: the whole hybrid as real child processes, started and stopped together.

The demo site is made with free ports (SIP and HTTP on 0); the demo's cloud listens on free
ports too. The test waits for the ready line, checks that an event written to the site's log
reaches the cloud's database through the enrolled edge agent, that the console answers, then
sends SIGTERM and checks that every child is gone. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import sqlite3
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from appliance import eventlog
from appliance.store import open_site_db

ROOT = Path(__file__).resolve().parent.parent
EDGECC = ROOT / ".venv" / "bin" / "edgecc"
WAIT = 90.0
READY = re.compile(r"^edgecc demo ready site=(\S+) console=(\S+) cloud=(\S+) ")
pytestmark = pytest.mark.timeout(240)


def _lines(process: subprocess.Popen[bytes], until: re.Pattern[str], timeout: float) -> list[str]:
    """Lines of ``process``'s stdout up to one matching ``until`` (bounded)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    buffer, lines = b"", []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no line matching {until.pattern!r} in {timeout} s: {lines}")
        ready, _, _ = select.select([process.stdout], [], [], left)
        chunk = os.read(process.stdout.fileno(), 4096) if ready else b""
        if ready and not chunk:
            raise AssertionError(f"edgecc demo ended ({process.wait()}): {lines}")
        buffer += chunk
        while b"\n" in buffer:
            raw, _, buffer = buffer.partition(b"\n")
            lines.append(raw.decode(errors="replace"))
            if until.search(lines[-1]):
                return lines


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        if re.search(rf"^PPid:\s+{pid}$", status, re.MULTILINE):
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


def _wait_for(condition, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)  # polling interval of a bounded wait


@pytest.fixture
def site_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "demo-site"
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=120,
    )
    return directory


def test_demo_runs_the_whole_hybrid_and_stops_it_all(site_dir: Path) -> None:
    demo = subprocess.Popen([str(EDGECC), "demo", "--site-dir", str(site_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        lines = _lines(demo, READY, WAIT)
        ready = READY.search(lines[-1])
        assert ready is not None
        site_id, console, link = ready.groups()
        assert any(line.startswith("edgecc cloud listening ") for line in lines)
        assert any(line.startswith("edgecc edge-agent site=") for line in lines)
        assert any("enrolled site=" in line for line in lines)  # a one-time token was used
        children = _children(demo.pid)
        assert len(children) == 3  # cloud, appliance, edge agent
        # The appliance's side writes an event; it must reach the cloud through the agent.
        database = site_dir / yaml.safe_load((site_dir / "site.yaml").read_text())[
            "storage"]["database"]
        db = open_site_db(database)
        try:
            seq = eventlog.append(db, "queue.enter", {"call_id": "demo-1", "queue": "support"},
                                  occurred_at=time.time())
        finally:
            db.conn.close()
        cloud_db = site_dir / "cloud" / "server" / "cloud.db"

        def acked() -> int:
            conn = sqlite3.connect(cloud_db, timeout=10)
            try:
                row = conn.execute("SELECT acked_seq FROM sites WHERE site_id = ?",
                                   (site_id,)).fetchone()
            finally:
                conn.close()
            return int(row[0]) if row else 0

        _wait_for(lambda: acked() >= seq, "the event reaching the cloud")
        # The appliance shows the link as the edge agent reports it (wallboard, /health).
        http = next(re.search(r" http=(\S+)", line)[1] for line in lines
                    if line.startswith("edgecc appliance "))

        def link_state() -> str | None:
            with urllib.request.urlopen(f"{http}/health", timeout=10) as answer:
                return json.loads(answer.read())["link"]

        assert _wait_for(lambda: link_state() == "online", "the appliance seeing the link")
        with urllib.request.urlopen(f"{console.rstrip('/')}/api/sites", timeout=10) as answer:
            sites = json.loads(answer.read())["sites"]
        assert [s["site_id"] for s in sites] == [site_id] and sites[0]["connected"] is True
        assert link.startswith("127.0.0.1:")
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        code = demo.wait(30)
        stderr = demo.stderr.read().decode(errors="replace") if demo.stderr else ""
    assert code == 0, stderr
    assert children and not [pid for pid in children if _alive(pid)]


def test_a_site_that_cannot_start_stops_everything_with_a_clear_error(site_dir: Path) -> None:
    (site_dir / "site.yaml").write_text("site: {id: demo}\nsip: {bogus_key: 1}\n")
    done = subprocess.run([str(EDGECC), "demo", "--site-dir", str(site_dir)],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 1
    assert "appliance did not start" in done.stderr
    assert "bogus_key" in done.stderr  # the appliance's own error, passed on


@pytest.mark.skipif(not Path("/usr/bin/sipp").exists(), reason="sipp (sip-tester) missing")
def test_demo_with_simulation_makes_calls_and_stops_them_too(site_dir: Path) -> None:
    pytest.importorskip("pjsua2")
    demo = subprocess.Popen([str(EDGECC), "demo", "--site-dir", str(site_dir), "--simulate",
                             "--agents", "1", "--calls-per-minute", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    children: list[int] = []
    try:
        lines = _lines(demo, READY, WAIT)
        assert any(line.startswith("simulating agents=1 calls_per_minute=20") for line in lines)
        children = _children(demo.pid)
        assert len(children) == 4  # cloud, appliance, edge agent, simulation
        database = site_dir / yaml.safe_load((site_dir / "site.yaml").read_text())[
            "storage"]["database"]

        def answered_calls() -> int:
            conn = sqlite3.connect(database, timeout=10)
            try:
                return conn.execute("SELECT count(*) FROM call_records WHERE agent IS NOT NULL"
                                    " AND answered_at IS NOT NULL").fetchone()[0]
            finally:
                conn.close()

        _wait_for(lambda: answered_calls() >= 1, "a simulated call answered by an agent", 120)
    finally:
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        code = demo.wait(30)
        stderr = demo.stderr.read().decode(errors="replace") if demo.stderr else ""
    assert code == 0, stderr
    assert children and not [pid for pid in children if _alive(pid)]
