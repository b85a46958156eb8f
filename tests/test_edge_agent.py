"""The edge agent as a real process against a real cloud process, TLS on 127.0.0.1.

Both sides keep real SQLite files; every wait polls a database or a process with a bound, and
the assertions are on what the databases hold.
"""

from __future__ import annotations

import json
import os
import re
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

import grpc  # noqa: E402

from appliance import eventlog  # noqa: E402
from appliance.store import open_site_db  # noqa: E402
from edge_agent.link_state import TRANSITIONS, Input, LinkMonitor, Observation, State  # noqa: E402
from proto import bridge_pb2 as pb  # noqa: E402
from proto import bridge_pb2_grpc as pb_grpc  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # bound on every wait; never decides a pass by itself
STARTED = re.compile(r"^edgecc cloud listening link=127\.0\.0\.1:(\d+) enrol=127\.0\.0\.1:(\d+) ")
SITE = "paris-1"
T = TypeVar("T")

# Settings that make the link react in test time; the defaults are for production.
FAST_LINK = {
    "reconnect": {"initial_ms": 100, "max_ms": 1000},
    "poll_interval_s": 0.05,
    "state_interval_s": 0.1,
    "offline_after_s": 3.0,
    "degraded_after_s": 60.0,
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


# ------------------------------------------------------------------- the cloud


class CloudProcess:
    """``edgecc cloud`` in a process of its own; it can be killed and started again."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.log = data_dir.parent / "cloud.log"
        self.link_port = 0
        self.enrol_port = 0
        self.console = ""
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            self._spawn(log)

    def _spawn(self, log: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(self.data_dir),
             "--grpc-port", str(self.link_port), "--enrol-port", str(self.enrol_port),
             # Any free console port: a fixed one would clash with another cloud under test.
             "--http-port", "0"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
        )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()))  # type: ignore[union-attr]
        reader.start()
        reader.join(WAIT)
        match = STARTED.match(lines[0]) if lines else None
        assert match, f"cloud did not start: {lines}"
        self.link_port, self.enrol_port = int(match[1]), int(match[2])
        console = re.search(r" http=(\S+) ", lines[0])
        self.console = console[1].rstrip("/") if console else ""

    def sites(self) -> dict[str, dict[str, Any]]:
        """The console's ``/api/sites`` rows by site id."""
        import urllib.request

        with urllib.request.urlopen(f"{self.console}/api/sites", timeout=WAIT) as answer:
            return {s["site_id"]: s for s in json.loads(answer.read())["sites"]}

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL: no goodbye to the sites
            self.process.wait(WAIT)
        self.process = None

    def token(self, site_id: str) -> str:
        from cloud_bridge.store import make_token, open_store

        store = open_store(str(self.data_dir / "cloud.db"), data_dir=self.data_dir)
        try:
            token = make_token()
            now = time.time()
            store.add_token(site_id, token, now + 600, now)
        finally:
            store.close()
        return token

    def _query(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.data_dir / "cloud.db", timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def events(self, site_id: str = SITE) -> list[tuple[int, str, bytes]]:
        return [(int(s), str(k), bytes(p)) for s, k, p in self._query(
            "SELECT seq, kind, payload FROM events WHERE site_id = ? ORDER BY seq", site_id)]

    def acked(self, site_id: str = SITE) -> int:
        rows = self._query("SELECT acked_seq FROM sites WHERE site_id = ?", site_id)
        return int(rows[0][0]) if rows else 0


# ------------------------------------------------------------------- the site


class Site:
    """A site directory with its database (the appliance's side) and an edge agent process."""

    def __init__(self, site_dir: Path, cloud: CloudProcess) -> None:
        self.dir = site_dir
        self.cloud = cloud
        site_dir.mkdir(parents=True, exist_ok=True)
        (site_dir / "site.yaml").write_text(
            f"site: {{id: {SITE}}}\nstorage: {{database: edgecc.db}}\n"
        )
        self.db = open_site_db(site_dir / "edgecc.db")
        eventlog.bind_site(self.db, SITE)
        self.agent: subprocess.Popen[str] | None = None
        self.agent_log = site_dir / "edge-agent.log"

    def enrol(self, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", "enrol", "--site-dir", str(self.dir),
             "--cloud", f"127.0.0.1:{self.cloud.link_port}",
             "--enrol-port", str(self.cloud.enrol_port), "--token", token,
             "--ca-cert", str(self.cloud.data_dir / "ca" / "ca.crt"), *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=WAIT,
        )

    def configure(self, **settings: Any) -> None:
        file = self.dir / "cloud.yaml"
        data = yaml.safe_load(file.read_text())
        data["cloud"].update(FAST_LINK)
        data["cloud"].update(settings)
        file.write_text(yaml.safe_dump(data))

    def start_agent(self) -> None:
        with open(self.agent_log, "a") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "edge_agent", "--site-dir", str(self.dir)],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True,
            )

    def kill_agent(self, sig: int = signal.SIGKILL) -> int | None:
        if self.agent is None:
            return None
        if self.agent.poll() is None:
            self.agent.send_signal(sig)
        code = self.agent.wait(WAIT)
        self.agent = None
        return code

    def append(self, kind: str, payload: Any, **options: Any) -> int:
        return eventlog.append(self.db, kind, payload, occurred_at=time.time(), **options)

    def outbox(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT seq FROM outbox ORDER BY seq").fetchall()]

    def link(self) -> eventlog.LinkState | None:
        return eventlog.read_link_state(self.db)

    def state_is(self, state: str, **where: Callable[[Any], bool]) -> eventlog.LinkState | None:
        now = self.link()
        if now is None or now.state != state:
            return None
        return now if all(check(getattr(now, key)) for key, check in where.items()) else None

    def close(self) -> None:
        self.kill_agent()
        self.db.conn.close()


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[CloudProcess]:
    process = CloudProcess(tmp_path / "cloud")
    process.start()
    try:
        yield process
    finally:
        process.kill()


@pytest.fixture
def site(tmp_path: Path, cloud: CloudProcess) -> Iterator[Site]:
    s = Site(tmp_path / "site", cloud)
    done = s.enrol(cloud.token(SITE))
    assert done.returncode == 0, done.stderr
    s.configure()
    try:
        yield s
    finally:
        s.close()
        if s.agent_log.exists():
            sys.stderr.write(s.agent_log.read_text()[-4000:])


class Writer:
    """The appliance appending call records and queue events while the link does its work."""

    def __init__(self, site_dir: Path, limit: int) -> None:
        self.db = open_site_db(site_dir / "edgecc.db")
        self.limit = limit
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set() and n < self.limit:
                with eventlog.transaction(self.db):
                    for kind in ("queue.enter", "queue.leave", "call.record"):
                        n += 1
                        eventlog.append(self.db, kind, {"call": f"c{n}", "pad": "x" * 200},
                                        occurred_at=time.time())
        except BaseException as exc:  # e.g. "database is locked": the agent held it too long
            self.errors.append(exc)

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        self.db.conn.close()
        assert self.errors == [], "the appliance's writes were disturbed"


def _check_delivered_once_in_order(site: Site, cloud: CloudProcess) -> None:
    last = eventlog.last_seq(site.db)
    stored = cloud.events()
    assert [seq for seq, _, _ in stored] == list(range(1, last + 1))  # once each, no gap
    local = {p.seq: p for p in eventlog.read_pending(site.db, 0, last + 1)}
    assert all(kind == local[seq].kind and payload == local[seq].payload
               for seq, kind, payload in stored)


def _never_deleted_unacked(site: Site, cloud: CloudProcess) -> bool:
    """Every outbox row the cloud has not acknowledged is still there (read site, then cloud)."""
    # One statement, one snapshot: the appliance keeps appending meanwhile.
    lowest, last = site.db.execute(
        "SELECT (SELECT MIN(seq) FROM outbox), (SELECT COALESCE(MAX(seq), 0) FROM events)"
    ).fetchone()
    deleted_upto = lowest - 1 if lowest is not None else last
    assert deleted_upto <= cloud.acked(), "an outbox row went before the cloud acknowledged it"
    return True


# ------------------------------------------------------------------- tests


def test_enrolment_with_a_one_time_token(tmp_path: Path, cloud: CloudProcess) -> None:
    s = Site(tmp_path / "site", cloud)
    try:
        token = cloud.token(SITE)
        done = s.enrol(token)
        assert done.returncode == 0, done.stderr
        assert f"enrolled site '{SITE}'" in done.stdout
        key, cert = s.dir / "cloud" / "site.key", s.dir / "cloud" / "site.crt"
        assert key.stat().st_mode & 0o777 == 0o600
        assert cert.stat().st_mode & 0o777 == 0o600
        assert (s.dir / "cloud" / "ca.crt").read_bytes() == (
            cloud.data_dir / "ca" / "ca.crt").read_bytes()
        assert yaml.safe_load((s.dir / "cloud.yaml").read_text())["cloud"]["address"] == (
            f"127.0.0.1:{cloud.link_port}")
        assert token not in done.stdout + done.stderr  # never logged
        before = {p: p.read_bytes() for p in (key, cert)}

        again = s.enrol(token)
        assert again.returncode == 1 and "already enrolled" in again.stderr
        spent = s.enrol(token, "--force")
        assert spent.returncode == 1 and "already used" in spent.stderr
        other = s.enrol(cloud.token("lyon-2"), "--force")
        assert other.returncode == 1 and "issued for site 'lyon-2'" in other.stderr
        bogus = s.enrol("ecc1_never-issued", "--force")
        assert bogus.returncode == 1 and "unknown" in bogus.stderr
        assert {p: p.read_bytes() for p in (key, cert)} == before  # refusals wrote nothing

        # The certificate opens the link: an event goes through.
        s.configure()
        s.append("call.record", {"call": "c1"})
        s.start_agent()
        wait_for(lambda: cloud.acked() == 1, "the first event acknowledged")
    finally:
        s.close()


def test_events_appended_while_the_cloud_is_down_arrive_once_in_order(
    site: Site, cloud: CloudProcess
) -> None:
    cloud.kill()
    site.start_agent()
    for i in range(1, 301):
        site.append("queue.enter" if i % 3 else "call.record", {"call": f"c{i}"})
    down = wait_for(lambda: site.state_is("offline", lag_events=lambda n: n == 300,
                                          lag_seconds=lambda s: s > 0),
                    "offline with 300 events of lag")
    assert "unreachable" in down.detail
    assert site.outbox() == list(range(1, 301))

    cloud.start()
    wait_for(lambda: site.state_is("online", lag_events=lambda n: n == 0,
                                   acked_seq=lambda n: n == 300),
             "online with nothing left to send")
    assert site.outbox() == []
    _check_delivered_once_in_order(site, cloud)
    assert cloud.acked() == 300


def test_a_stream_at_its_deadline_is_renewed_without_losing_the_link(
    site: Site, cloud: CloudProcess
) -> None:
    """SiteLink has a deadline like every call: the stream that reaches it is replaced at once
    from the last ack, nothing lost or sent twice, and the link never leaves online."""
    site.configure(stream_deadline_s=1.0)
    site.start_agent()

    def renewals() -> int:
        return site.agent_log.read_text().count("event=link_renewed")

    total = 0
    for round_ in range(2):  # events on each of several streams
        with eventlog.transaction(site.db):
            for i in range(100):
                site.append("queue.enter", {"n": total + i})
        total += 100
        wait_for(lambda t=total: cloud.acked() == t, f"{total} events acknowledged")
        wait_for(lambda r=round_: renewals() > r, f"stream {round_ + 1} at its deadline")
    wait_for(lambda: site.outbox() == [], "the outbox emptied")
    text = site.agent_log.read_text()  # before the agent's stop says offline
    assert site.kill_agent(signal.SIGTERM) == 0
    assert "event=link_down" not in text
    states = re.findall(r"event=link_state \S+ state=(\w+)", text)
    assert states == ["online"], states  # offline at start, then online throughout
    _check_delivered_once_in_order(site, cloud)


def test_kill_9_of_the_agent_mid_stream_loses_and_duplicates_nothing(
    site: Site, cloud: CloudProcess
) -> None:
    writer = Writer(site.dir, limit=6000)
    try:
        site.start_agent()
        wait_for(lambda: _never_deleted_unacked(site, cloud) and cloud.acked() >= 300,
                 "part of the stream acknowledged")
        # A burst just before the kill, so the agent surely dies with work in hand.
        with eventlog.transaction(site.db):
            for i in range(300):
                site.append("queue.enter", {"burst": i})
        assert site.kill_agent() == -signal.SIGKILL
        acked_at_kill = cloud.acked()
        assert eventlog.last_seq(site.db) > acked_at_kill  # it died with work in hand
        site.start_agent()
        # The writer may be done by now: resuming is any progress past the kill's ack.
        wait_for(lambda: _never_deleted_unacked(site, cloud) and cloud.acked()
                 > acked_at_kill, "the restarted agent resuming")
    finally:
        writer.finish()
    last = eventlog.last_seq(site.db)
    wait_for(lambda: cloud.acked() == last, f"all {last} events acknowledged")
    wait_for(lambda: site.outbox() == [], "the outbox emptied")
    _check_delivered_once_in_order(site, cloud)
    assert site.kill_agent(signal.SIGTERM) == 0
    assert site.state_is("offline", detail=lambda d: "stopped" in d)


def test_a_cloud_restart_mid_stream_loses_and_duplicates_nothing(
    site: Site, cloud: CloudProcess
) -> None:
    writer = Writer(site.dir, limit=3000)
    try:
        site.start_agent()
        wait_for(lambda: site.state_is("online") and cloud.acked() >= 300, "linked, streaming")
        cloud.kill()
        lost = wait_for(lambda: site.state_is("degraded"), "degraded once the link is lost")
        assert "reconnecting" in lost.detail
        # The writer may already have been fully acknowledged: the appliance goes on writing.
        site.append("call.record", {"call": "while-offline"})
        wait_for(lambda: site.state_is("offline", lag_events=lambda n: n > 0), "offline")
        cloud.start()
        wait_for(lambda: site.state_is("online"), "online again")
    finally:
        writer.finish()
    last = eventlog.last_seq(site.db)
    wait_for(lambda: site.state_is("online", acked_seq=lambda n: n == last,
                                   lag_events=lambda n: n == 0), "caught up")
    assert site.outbox() == []
    _check_delivered_once_in_order(site, cloud)


def test_a_cloud_that_lost_acknowledged_events_gets_them_again_in_full(
    site: Site, cloud: CloudProcess
) -> None:
    for i in range(1, 21):
        site.append("call.record", {"call": f"c{i}"})
    site.start_agent()
    wait_for(lambda: site.state_is("online", acked_seq=lambda n: n == 20), "all acknowledged")
    assert site.outbox() == []
    # The cloud comes back from an older copy of its database: it has only events 1-5.
    cloud.kill()
    conn = sqlite3.connect(cloud.data_dir / "cloud.db")
    with conn:
        conn.execute("DELETE FROM events WHERE site_id = ? AND seq > 5", (SITE,))
        conn.execute("UPDATE sites SET acked_seq = 5 WHERE site_id = ?", (SITE,))
    conn.close()
    cloud.start()
    wait_for(lambda: cloud.acked() == 20, "the lost events sent again")
    _check_delivered_once_in_order(site, cloud)  # in full, from the site's own log


def test_quota_drops_only_droppable_kinds_and_the_ack_still_passes_them(
    site: Site, cloud: CloudProcess
) -> None:
    cloud.kill()
    quota = 25_000  # the call records and queue events alone fit; not with the samples
    site.configure(outbox_quota_bytes=quota)
    kinds = {}
    for i in range(40):
        kind = ("call.record", "queue.enter", "stats.sample", "stats.sample")[i % 4]
        kinds[site.append(kind, {"i": i, "pad": "x" * 990})] = kind
    site.append("queue.enter", {"i": "local"}, with_outbox=False)  # kept on site only
    assert eventlog.outbox_bytes(site.db) > quota
    site.start_agent()
    state = wait_for(lambda: site.state_is("offline", dropped_events=lambda n: n > 0),
                     "the quota policy at work")
    kept = set(site.outbox())
    assert {seq for seq, kind in kinds.items() if kind in ("call.record", "queue.enter")} <= kept
    dropped = {seq for seq in kinds if seq not in kept}
    assert dropped and all(kinds[seq] == "stats.sample" for seq in dropped)
    assert state.dropped_events == len(dropped)
    assert state.outbox_bytes == eventlog.outbox_bytes(site.db) <= quota
    # Oldest samples go first.
    samples = sorted(seq for seq, kind in kinds.items() if kind == "stats.sample")
    assert sorted(dropped) == samples[: len(dropped)]

    cloud.start()
    wait_for(lambda: cloud.acked() == 41, "the ack passing the dropped and local-only events")
    stored = {seq: (kind, payload) for seq, kind, payload in cloud.events()}
    assert sorted(stored) == list(range(1, 42))
    for seq, (kind, payload) in stored.items():
        if seq in dropped or seq == 41:
            assert kind == "edgecc.withheld"
            assert json.loads(payload)["withheld"] is True
        else:
            assert kind == kinds[seq] and json.loads(payload)["pad"] == "x" * 990
    wait_for(lambda: site.outbox() == [], "the outbox emptied")


def test_over_quota_with_only_essential_events_keeps_them_all(
    site: Site, cloud: CloudProcess
) -> None:
    cloud.kill()
    site.configure(outbox_quota_bytes=1024)
    for i in range(10):
        site.append("call.record", {"i": i, "pad": "x" * 500})
    site.start_agent()
    state = wait_for(lambda: site.state_is("offline", detail=lambda d: "quota" in d),
                     "the quota problem reported")
    assert state.dropped_events == 0
    assert site.outbox() == list(range(1, 11))


def test_an_event_that_cannot_be_sent_stops_the_relay_without_a_gap(
    site: Site, cloud: CloudProcess
) -> None:
    for i in range(1, 7):
        if i == 3:
            # Written behind the event log's back for another site: the cloud would refuse it.
            with eventlog.transaction(site.db):
                site.db.conn.execute(
                    "INSERT INTO events (site_id, kind, occurred_at, payload) "
                    "VALUES ('lyon-2', 'queue.enter', 0, '{}')"
                )
                site.db.conn.execute(
                    "INSERT INTO outbox (seq, priority, enqueued_at, bytes) VALUES (3, 0, 0, 2)"
                )
        else:
            site.append("queue.enter", {"i": i})
    site.start_agent()
    state = wait_for(lambda: site.state_is("degraded", detail=lambda d: "event 3" in d),
                     "the relay stopping at event 3")
    assert "lyon-2" in state.detail
    # The state is written as the relay stops, maybe before the cloud's Ack of 1-2 arrives.
    wait_for(lambda: cloud.acked() == 2, "the events before the gap acknowledged")
    assert [s for s, _, _ in cloud.events()] == [1, 2]
    # The ack of 2 may be applied just after the state was written: wait for it, then check
    # that nothing past the gap is given up.
    wait_for(lambda: site.outbox()[:1] == [3], "the acknowledged rows to be deleted")
    assert site.outbox() == [3, 4, 5, 6]


def test_a_held_gap_at_the_cloud_is_filled_before_anything_is_deleted(
    site: Site, cloud: CloudProcess
) -> None:
    for i in range(1, 7):
        site.append("queue.enter", {"i": i})
    # Events 4-6 reach the cloud first (as if an earlier link had sent them out of order):
    # the cloud stores and holds them, its ack stays at 0.
    pending = {p.seq: p for p in eventlog.read_pending(site.db, 0, 10)}
    creds = grpc.ssl_channel_credentials(
        (site.dir / "cloud" / "ca.crt").read_bytes(),
        (site.dir / "cloud" / "site.key").read_bytes(),
        (site.dir / "cloud" / "site.crt").read_bytes(),
    )
    with grpc.secure_channel(f"127.0.0.1:{cloud.link_port}", creds) as channel:
        def messages() -> Iterator[Any]:
            for seq in (4, 5, 6):
                event = pb.Event(site_id=SITE, seq=seq, kind=pending[seq].kind,
                                 payload=pending[seq].payload)
                yield pb.SiteMessage(event=event)

        replies = list(pb_grpc.BridgeStub(channel).SiteLink(messages(), timeout=WAIT))
    assert [r.ack.seq for r in replies if r.WhichOneof("body") == "ack"][-1] == 0
    assert [s for s, _, _ in cloud.events()] == [4, 5, 6]
    assert site.outbox() == [1, 2, 3, 4, 5, 6]

    site.start_agent()
    wait_for(lambda: cloud.acked() == 6, "the gap filled and acknowledged")
    wait_for(lambda: site.outbox() == [], "the outbox emptied")
    _check_delivered_once_in_order(site, cloud)


def test_bad_configuration_is_refused_clearly(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "site.yaml").write_text("site: {id: paris-1}\n")
    run = [sys.executable, "-m", "edge_agent", "--site-dir", str(site_dir)]
    missing = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert missing.returncode == 2 and "enrol the site first" in missing.stderr
    (site_dir / "cloud.yaml").write_text("cloud: {address: 'x:1', outbox_quota: 5}\n")
    unknown = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert unknown.returncode == 2 and "cloud.outbox_quota" in unknown.stderr
    (site_dir / "cloud.yaml").write_text("cloud: {address: '127.0.0.1:1'}\n")
    unenrolled = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=WAIT)
    assert unenrolled.returncode == 1 and "enrol first" in unenrolled.stderr
    assert sorted(os.listdir(site_dir)) == ["cloud.yaml", "site.yaml"]


def test_link_settings_keep_the_issue_bounds(tmp_path: Path) -> None:
    """Backoff capped at 60 s, keepalive 30 s / 10 s, a deadline on the stream; the appliance's
    staleness bound for the agent's row follows the agent's own state interval."""
    from pydantic import ValidationError

    from edge_agent.channel import channel_options
    from edge_agent.config import CloudSection, link_report_stale_after_s

    section = CloudSection(address="x:1")
    options = dict(channel_options(section))
    assert options["grpc.max_reconnect_backoff_ms"] == 60_000
    assert (options["grpc.keepalive_time_ms"], options["grpc.keepalive_timeout_ms"]) == (
        30_000, 10_000)
    assert 0 < section.stream_deadline_s <= 86_400
    with pytest.raises(ValidationError, match="max_ms"):
        CloudSection(address="x:1", reconnect={"max_ms": 120_000})
    assert link_report_stale_after_s(tmp_path) == 10.0  # not enrolled: the default interval
    (tmp_path / "cloud.yaml").write_text("cloud: {address: 'x:1', state_interval_s: 0.5}\n")
    assert link_report_stale_after_s(tmp_path) == 5.0
    (tmp_path / "cloud.yaml").write_text("cloud: {address: 'x:1', state_interval_s: 0.05}\n")
    assert link_report_stale_after_s(tmp_path) == 2.0  # never below the floor
    (tmp_path / "cloud.yaml").write_text("cloud: [not, a, mapping\n")
    assert link_report_stale_after_s(tmp_path) == 10.0


def test_link_state_table_is_complete_and_driven_by_time_given() -> None:
    assert set(TRANSITIONS) == {(s, i) for s in State for i in Input}
    monitor = LinkMonitor(degraded_after_s=60, offline_after_s=30, now=1000.0)
    steps = [
        (1000.0, Observation(False, None, 5.0), State.OFFLINE, "unreachable"),
        (1001.0, Observation(True, None, 0.0), State.ONLINE, ""),
        (1070.0, Observation(True, None, 61.0), State.DEGRADED, "61 s old"),
        (1071.0, Observation(True, None, 1.0), State.ONLINE, ""),
        (1080.0, Observation(False, 1080.0, 9.0, reason="UNAVAILABLE: x"), State.DEGRADED,
         "reconnecting: UNAVAILABLE: x"),
        (1109.0, Observation(False, 1080.0, 38.0), State.DEGRADED, "reconnecting"),
        (1110.0, Observation(False, 1080.0, 39.0), State.OFFLINE, "unreachable"),
        # A blip while offline stays offline.
        (1120.0, Observation(False, 1119.0, 49.0), State.OFFLINE, "reconnecting"),
        (1121.0, Observation(True, None, 50.0, problem="outbox over quota"), State.DEGRADED,
         "quota"),
    ]
    for now, seen, state, words in steps:
        change = monitor.observe(seen, now)
        assert change.state is state, (now, change)
        assert words in change.detail
    assert monitor.since == 1121.0


# ------------------------------------------------------------------- event batches


def test_event_batches_stay_under_the_message_limit() -> None:
    from edge_agent.channel import BATCH_MESSAGE_BYTES, MAX_MESSAGE_BYTES, EventBatcher

    def pending(seq: int, size: int, withheld: bool = False) -> eventlog.PendingEvent:
        return eventlog.PendingEvent(seq=seq, site_id=SITE, kind="call.record",
                                     occurred_at=1_700_000_000.5, payload=b"x" * size,
                                     withheld=withheld, enqueued_at=None)

    batcher = EventBatcher(SITE)
    sent = []
    biggest = eventlog.MAX_PAYLOAD_BYTES
    for seq, size in enumerate([1000] * 3 + [biggest] * 5 + [10], start=1):
        full = batcher.add(pending(seq, size), withheld=False)
        if full is not None:
            sent.append(full)
    assert batcher.add(pending(10, 50, withheld=True), withheld=True) is None
    sent.append(batcher.flush())
    assert batcher.flush() is None
    seqs = [[e.seq for e in m.events.events] for m in sent]
    assert [s for group in seqs for s in group] == list(range(1, 11))  # in order, once each
    assert len(sent) > 1
    for message in sent:
        assert message.ByteSize() <= MAX_MESSAGE_BYTES
        payloads = [len(e.payload) for e in message.events.events]
        assert sum(payloads[:-1]) < BATCH_MESSAGE_BYTES  # closed once the limit is reached
    last = sent[-1].events.events[-1]
    assert last.kind == "edgecc.withheld" and b"x" not in last.payload  # never the content
    assert last.occurred_at.seconds == 1_700_000_000 and last.occurred_at.nanos == 500_000_000


def test_event_columns_stay_under_the_message_limit() -> None:
    from edge_agent.channel import BATCH_MESSAGE_BYTES, MAX_MESSAGE_BYTES, column_messages

    biggest = eventlog.MAX_PAYLOAD_BYTES
    sizes = [1000] * 3 + [biggest] * 5 + [10] * 2000
    seqs = list(range(1, len(sizes) + 1))
    payloads = [bytes([65 + seq % 26]) * size for seq, size in zip(seqs, sizes, strict=True)]
    kinds = ["call.record"] * len(seqs)
    occurred = [1_700_000_000.5 + seq for seq in seqs]
    sent = list(column_messages(SITE, seqs, kinds, payloads, occurred))
    assert len(sent) > 1
    got: list[tuple[int, str, bytes, float]] = []
    for message, last, size in sent:
        columns = message.columns
        assert message.ByteSize() <= MAX_MESSAGE_BYTES
        assert columns.site_id == SITE and columns.seqs[-1] == last
        assert size == sum(len(p) for p in columns.payloads)
        assert sum(len(p) for p in columns.payloads[:-1]) < BATCH_MESSAGE_BYTES
        got.extend(zip(columns.seqs, columns.kinds, columns.payloads, columns.occurred_at,
                       strict=True))
    # Every event once, in order, each field as given (the time to the microsecond and below).
    assert got == list(zip(seqs, kinds, payloads, occurred, strict=True))
    assert list(column_messages(SITE, [], [], [], [])) == []
