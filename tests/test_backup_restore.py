"""Backup to the cloud and restore onto a new machine, end to end on 127.0.0.1.

The cloud is a real CloudServer (TLS, mutual TLS, SQLite store) on a thread of this process;
the site is made by `edgecc init`, its edge agent and `edgecc restore` are real processes, the
restored appliance is started and a SIP phone (SIPp) registers with its password. Every wait
is bounded and waits for a condition; assertions are on what the databases and files hold.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from proto.build import ensure_generated

ensure_generated()

from peers import agent_phone, call_record, sipp, sipp_failed  # noqa: E402
from test_register_peers import Site  # noqa: E402
from test_register_peers import start as start_appliance  # noqa: E402
from test_register_peers import stop as stop_appliance  # noqa: E402

from appliance import eventlog  # noqa: E402
from appliance.restore import RestoreError, restore_from_cloud  # noqa: E402
from appliance.store import open_site_db  # noqa: E402
from cloud_bridge.backups import issue_restore_token  # noqa: E402
from cloud_bridge.server import CloudConfig, CloudServer, read_site_reports  # noqa: E402
from cloud_bridge.store import EventRecord  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EDGECC = str(Path(sys.executable).parent / "edgecc")
WAIT = 60.0  # bound on every wait for an event; never decides a pass by itself
SITE = "demo"  # the id `edgecc init --demo` gives
T = TypeVar("T")
FAST_LINK = {
    "reconnect": {"initial_ms": 100, "max_ms": 1000},
    "poll_interval_s": 0.05,
    "state_interval_s": 0.1,
}


def wait_for(condition: Callable[[], T], what: str, timeout: float = WAIT) -> T:
    """Poll ``condition`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)  # polling interval of a bounded wait


class Cloud:
    """A CloudServer serving on an event loop thread of its own."""

    def __init__(self, data_dir: Path, **options: Any) -> None:
        self.data_dir = data_dir
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: CloudServer = self.call(self._start(data_dir, options))

    async def _start(self, data_dir: Path, options: dict[str, Any]) -> CloudServer:
        server = CloudServer(CloudConfig(data_dir=data_dir, grpc_port=0, enrol_port=0,
                                         config_poll_s=0.1, **options))
        await server.start()
        return server

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(WAIT)

    def on_worker(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.call(self.server.run(functools.partial(function, *args, **kwargs)))

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.link_port}"

    def token(self, site_id: str = SITE) -> str:
        return self.call(self.server.issue_token(site_id, 600))

    def complete_backups(self, site_id: str = SITE) -> list[Any]:
        return [b for b in self.on_worker(self.server.store.backups, site_id) if b.complete]

    def restore_token(self, site_id: str = SITE, backup_id: str | None = None) -> str:
        return self.on_worker(issue_restore_token, self.server.backups, self.server.ca, site_id,
                              ttl=600, backup_id=backup_id)

    def report(self, site_id: str = SITE) -> dict[str, Any]:
        return read_site_reports(self.data_dir).get(site_id, {})

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Cloud]:
    c = Cloud(tmp_path / "cloud")
    try:
        yield c
    finally:
        c.close()


def edgecc(*args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGECC, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, stdin=subprocess.DEVNULL)


class Agent:
    """``edgecc edge-agent`` for one site directory, as a process of its own."""

    def __init__(self, site_dir: Path) -> None:
        self.site_dir = site_dir
        self.log = site_dir.parent / f"{site_dir.name}-agent.log"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "--site-dir", str(self.site_dir)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True,
            )

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            self.process.wait(WAIT)
            self.process = None


def configure(site_dir: Path, **backup: Any) -> None:
    file = site_dir / "cloud.yaml"
    data = yaml.safe_load(file.read_text())
    data["cloud"].update(FAST_LINK)
    data["backup"] = {"interval_s": 0, "poll_s": 0.1, **backup}
    file.write_text(yaml.safe_dump(data))


def make_site(tmp_path: Path, cloud: Cloud, calls: int = 30) -> Path:
    """A demo site with call records, events and a recording, enrolled with the cloud."""
    site = tmp_path / "site"
    done = edgecc("init", "--demo", "--site-dir", str(site), "--sip-port", "0",
                  "--http-port", "0", "--agents", "2")
    assert done.returncode == 0, done.stderr
    db = open_site_db(site / "edgecc.db")
    eventlog.bind_site(db, SITE)
    with db.conn:
        for n in range(calls):
            db.conn.execute(
                "INSERT INTO call_records (call_id, sip_call_id, caller, dialled, queue, agent, "
                "started_at, answered_at, ended_at, end_reason, legs) VALUES "
                "(?, ?, '+33100000000', '3000', 'support', '1001', ?, ?, ?, 'caller-hangup', "
                "'[]')",
                (f"c{n}", f"sip-{n}@x", 1000.0 + n, 1001.0 + n, 1060.0 + n),
            )
    for n in range(calls):
        eventlog.append(db, "call.record", {"call_id": f"c{n}"}, occurred_at=1060.0 + n)
    db.conn.close()
    (site / "recordings").mkdir(exist_ok=True)
    (site / "recordings" / "c1.rec").write_bytes(os.urandom(300_000))  # stands for ciphertext
    enrolled = edgecc("edge-agent", "enrol", "--site-dir", str(site), "--cloud", cloud.address,
                      "--enrol-port", str(cloud.server.enrol_port), "--token", cloud.token(),
                      "--ca-cert", str(cloud.data_dir / "ca" / "ca.crt"))
    assert enrolled.returncode == 0, enrolled.stderr
    configure(site)
    # The carrier (SIPp) calls from 127.0.0.2 when the restored site serves a call.
    site_file = site / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    data.setdefault("trunk", {})["allowed_sources"] = ["127.0.0.2/32"]
    site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return site


def rows(database: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(database) as conn:
        return conn.execute(sql).fetchall()


CALLS = "SELECT * FROM call_records ORDER BY call_id"
EVENTS = "SELECT seq, kind, payload, occurred_at FROM events ORDER BY seq"


def backed_up(tmp_path: Path, cloud: Cloud) -> tuple[Path, Agent, str]:
    """A site whose agent made one backup on the cloud's request."""
    site = make_site(tmp_path, cloud)
    agent = Agent(site)
    agent.start()
    wait_for(lambda: SITE in cloud.server.linked_sites(), "the site's link")
    assert cloud.call(cloud.server.request_backup(SITE, "test"))
    backups = wait_for(cloud.complete_backups, "a complete backup")
    return site, agent, backups[0].backup_id


def restore(cloud: Cloud, token: str, target: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return edgecc("restore", "--from-cloud", cloud.address, "--enrol-port",
                  str(cloud.server.enrol_port), "--token", token, "--site-dir", str(target),
                  *extra, timeout=120)


def in_process(cloud: Cloud, token: str, target: Path, **options: Any) -> Any:
    """``restore_from_cloud`` in this process (the refusals need no process of their own)."""
    return restore_from_cloud(cloud.address, token, target,
                              enrol_port=cloud.server.enrol_port, **options)


def _sip_stack_missing() -> str | None:
    for name in ("media_core.sip", "appliance.sip.service"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:
            return name
    return None


def serve_a_call(new: Path, tmp_path: Path) -> dict[str, Any]:
    """Start the appliance of ``new``; agent 1001's phone (pjsua2) registers with the password
    it had before and logs in; a carrier call (SIPp) goes through the IVR ("1") to the queue
    and the agent answers. Returns the call record."""
    credentials = json.loads((new / "demo-credentials.json").read_text())
    site = Site(new, credentials["realm"],
                {a["user"]: a["password"] for a in credentials["accounts"]}, new / "edgecc.db")
    running = start_appliance(site, "restored-appliance.log")
    try:
        mark = len(running.log_text())
        with agent_phone(tmp_path, site, running, "answer", talk=1.0) as phone:
            result = sipp(tmp_path, running, "trunk_call", keys={"hangup": "agent"})
            assert result.returncode == 0, sipp_failed(result, running)
            phone.wait("answered")
            phone.wait("disconnected")
        return call_record(site, running, mark)
    finally:
        stop_appliance(running.proc)


# ------------------------------------------------------------------------------------ tests


def test_hello_backup_on_request_and_restore_onto_a_new_machine(
    tmp_path: Path, cloud: Cloud
) -> None:
    site, agent, backup_id = backed_up(tmp_path, cloud)
    try:
        hello = wait_for(lambda: cloud.report().get("hello"), "the site's Hello")
        assert hello["last_seq"] == 30 and hello["config_version"] == 0
        # The site records the confirmed backup; its next Hello names it.
        done = wait_for(lambda: rows(site / "edgecc.db", "SELECT backup_id, reason FROM "
                                     "edge_backups WHERE completed_at IS NOT NULL"),
                        "the site's record of the backup")
        assert done == [(backup_id, "cloud: test")]
        # Life goes on after the backup: five more events reach the cloud.
        db = open_site_db(site / "edgecc.db")
        for n in range(5):
            eventlog.append(db, "queue.enter", {"n": n}, occurred_at=2000.0 + n)
        db.conn.close()
        wait_for(lambda: cloud.on_worker(cloud.server.store.acked_seq, SITE) == 35,
                 "the cloud holding seq 35")
        agent.stop()
        agent.start()
        wait_for(lambda: (cloud.report().get("hello") or {}).get("last_backup_id") == backup_id,
                 "a Hello naming the backup")
    finally:
        agent.stop()
    # The old machine's last messages: 36 and 37 never arrived, 38 and 39 did and are held
    # beyond that gap. 36 and 37 are lost with the old machine.
    held = cloud.on_worker(cloud.server.store.ingest, [
        EventRecord(SITE, seq, "queue.enter", b'{"held":%d}' % seq, 2000.0 + seq)
        for seq in (38, 39)], time.time(), window=100_000)
    assert (held.acked_seq, held.stored) == (35, 2)

    new = tmp_path / "new-machine" / "site"
    # The token from `edgecc cloud restore-token` (its own process and store connection).
    issued = subprocess.run(
        [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(cloud.data_dir),
         "restore-token", "--site", SITE, "--ttl", "600"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert issued.returncode == 0, issued.stderr
    assert "carries the site key" in issued.stderr
    token = issued.stdout.strip()
    result = restore(cloud, token, new, "--progress")
    assert result.returncode == 0, result.stderr
    assert "100.0%" in result.stderr and backup_id in result.stdout
    assert "(seq 31 to 39); new events continue at seq 40" in result.stdout
    assert "4 of those seqs are above the cloud's acknowledgement" in result.stdout
    assert rows(new / "edgecc.db", CALLS) == rows(site / "edgecc.db", CALLS)
    backed_up_events = [r for r in rows(site / "edgecc.db", EVENTS) if r[0] <= 30]
    assert [r for r in rows(new / "edgecc.db", EVENTS) if r[0] <= 30] == backed_up_events
    assert len(rows(new / "edgecc.db", CALLS)) == 30
    for name in ("site.yaml", "site.key", "demo-credentials.json", "tls/sip.key",
                 "recordings/c1.rec"):
        assert (new / name).read_bytes() == (site / name).read_bytes(), name
    assert (new / "site.key").stat().st_mode & 0o777 == 0o600
    # The new machine has a certificate of its own for the same site.
    assert (new / "cloud" / "site.crt").read_bytes() != (site / "cloud" / "site.crt").read_bytes()
    assert yaml.safe_load((new / "cloud.yaml").read_text())["cloud"]["address"] == cloud.address
    assert not list(new.parent.glob(".*restore*"))  # scratch removed

    missing = _sip_stack_missing()
    if missing is not None or shutil.which("sipp") is None:
        pytest.skip(f"SIP stack ({missing}) or SIPp missing: the restored site's call not run")
    pytest.importorskip("pjsua2")
    # The restored site serves calls with the same agents, queues and records, and its events
    # reach the cloud above the old machine's: none is lost as a "duplicate" of seq 31-35.
    new_agent = Agent(new)
    new_agent.start()
    try:
        record = serve_a_call(new, tmp_path)
        assert (record["queue"], record["agent"]) == ("support", "1001")
        assert record["ivr_trace"] == ["welcome", "support"]
        calls = rows(new / "edgecc.db", CALLS)
        assert len(calls) == 31 and [c for c in calls if c[0] != record["call_id"]] == rows(
            site / "edgecc.db", CALLS)
        local = rows(new / "edgecc.db", EVENTS)
        # 36-39 are the restore's placeholders (no outbox row: sent as withheld placeholders),
        # then the new machine's own events, above everything the cloud holds.
        assert [(r[0], r[1]) for r in local if 30 < r[0] < 40] == [
            (seq, "site.restore.gap") for seq in range(36, 40)]
        assert [r[0] for r in local if r[0] > 30][4] == 40
        call_events = [(seq, kind, json.loads(payload)) for seq, kind, payload, _ in local
                       if json.loads(payload).get("call_id") == record["call_id"]]
        assert [e[1] for e in call_events] == ["queue.enter", "queue.connect",
                                               "queue.complete", "call.record"]
        last = local[-1][0]
        wait_for(lambda: cloud.on_worker(cloud.server.store.acked_seq, SITE) >= last,
                 f"the cloud acknowledging the restored site's seq {last}")
        stored = cloud.on_worker(cloud.server.store.events, SITE, limit=10_000)
        assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
        in_cloud = {e.seq: (e.kind, json.loads(e.payload)) for e in stored}
        # The old machine's events after the backup are kept, the new machine's are stored.
        assert [in_cloud[n] for n in range(31, 36)] == [
            ("queue.enter", {"n": n}) for n in range(5)]
        # The gap is filled with placeholders and the ack passed it; the held events are kept.
        assert [in_cloud[n] for n in (36, 37)] == [
            ("edgecc.withheld", {"kind": "site.restore.gap", "withheld": True})] * 2
        assert [in_cloud[n] for n in (38, 39)] == [("queue.enter", {"held": n}) for n in (38, 39)]
        for seq, kind, payload, _ in local:
            if seq >= 40 or seq <= 30:
                assert in_cloud[seq] == (kind, json.loads(payload)), seq
        for seq, kind, payload in call_events:
            assert in_cloud[seq] == (kind, payload)
    finally:
        new_agent.stop()
    # A correctly restored log is not mistaken for a re-created one.
    assert "ack_beyond_log" not in new_agent.log.read_text()


def test_tampered_truncated_or_spent_restores_are_refused_and_leave_new_empty(
    tmp_path: Path, cloud: Cloud
) -> None:
    from edge_agent.backup import upload_file
    from edge_agent.channel import pb_grpc, secure_channel
    from edge_agent.config import load_edge_config

    site, agent, backup_id = backed_up(tmp_path, cloud)
    agent.stop()
    good = cloud.server.backups.final_path(SITE, backup_id).read_bytes()

    # A bundle with one byte changed, uploaded by the site itself: the cloud's SHA-256 matches
    # what it received, so only the bundle's own authentication can refuse it.
    tampered = bytearray(good)
    tampered[len(good) // 2] ^= 0x40
    (tmp_path / "tampered.bundle").write_bytes(bytes(tampered))
    cut = good[: len(good) - 1000]
    (tmp_path / "cut.bundle").write_bytes(cut)
    config = load_edge_config(site)
    with secure_channel(config.cloud.address, config.cloud, config.ca_cert.read_bytes(),
                        config.key.read_bytes(), config.certificate.read_bytes()) as channel:
        stub = pb_grpc.BridgeStub(channel)
        upload_file(stub, tmp_path / "tampered.bundle", "tampered-1")
        upload_file(stub, tmp_path / "cut.bundle", "cut-1")

    for bad_id, why in (("tampered-1", "fails authentication"), ("cut-1", "cut short")):
        new = tmp_path / f"new-{bad_id}"
        new.mkdir()
        with pytest.raises(RestoreError, match=why):
            in_process(cloud, cloud.restore_token(backup_id=backup_id), new, backup_id=bad_id)
        assert list(new.iterdir()) == []
        assert not list(tmp_path.glob(".*restore*"))

    # Damage on the cloud's disk after the upload: the download's SHA-256 check refuses it.
    stored = cloud.server.backups.final_path(SITE, backup_id)
    stored.write_bytes(good[:-100] + bytes([good[-100] ^ 1]) + good[-99:])
    new = tmp_path / "new-disk"
    with pytest.raises(RestoreError, match="SHA-256"):
        in_process(cloud, cloud.restore_token(backup_id=backup_id), new)
    assert not new.exists()

    # A spent or damaged token: refused before anything is written.
    stored.write_bytes(good)
    token = cloud.restore_token(backup_id=backup_id)
    assert in_process(cloud, token, tmp_path / "ok").backup_id == backup_id
    with pytest.raises(RestoreError, match="already used"):
        in_process(cloud, token, tmp_path / "spent")
    assert not (tmp_path / "spent").exists()
    with pytest.raises(RestoreError, match="damaged"):
        in_process(cloud, token[:-30], tmp_path / "damaged")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    # The command line: exit 1 and the reason on standard error.
    refused = restore(cloud, cloud.restore_token(backup_id=backup_id), busy)
    assert refused.returncode == 1 and "not an empty directory" in refused.stderr
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]


def test_scheduled_backups_follow_the_interval_and_cloud_retention(
    tmp_path: Path, cloud: Cloud
) -> None:
    cloud.server.backups.keep = 2
    site = make_site(tmp_path, cloud, calls=3)
    configure(site, interval_s=0.5, first_after_s=0)
    agent = Agent(site)
    agent.start()
    try:
        completed = wait_for(
            lambda: len(rows(site / "edgecc.db", "SELECT 1 FROM edge_backups WHERE "
                             "completed_at IS NOT NULL")) >= 3 or None,
            "three scheduled backups",
        )
        assert completed
    finally:
        agent.stop()
    kept = cloud.complete_backups()
    assert len(kept) == 2  # retention: the newest two
    newest = rows(site / "edgecc.db", "SELECT backup_id FROM edge_backups WHERE completed_at "
                  "IS NOT NULL ORDER BY completed_at DESC LIMIT 2")
    assert {b.backup_id for b in kept} == {b for (b,) in newest}
    files = sorted(p.name for p in (cloud.data_dir / "backups" / SITE).iterdir())
    assert files == sorted(f"{b.backup_id}.bak" for b in kept)
    assert not list((site / ".edgecc-backup").glob("*.bundle"))  # local bundles removed

