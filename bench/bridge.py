"""Bridge throughput: events/s from the site's outbox to a durable commit in the cloud.

The project: a real ``edgecc cloud`` process (SQLite, WAL, ``synchronous=FULL``) and a real
``edgecc edge-agent`` process enrolled with a one-time token, linked by gRPC over mutual TLS on
127.0.0.1. A backlog of queue/call events is appended to the site's event log while the agent
is stopped; the agent is started and the clock runs from the cloud's first acknowledgement to
the acknowledgement of the last event (every event is then committed with ``synchronous=FULL``).

The peer (the physical reference): the raw batched insert rate of the same SQLite settings
(WAL, ``synchronous=FULL``) on the same disk, same table, key and rows (the payloads exactly as
the site encodes them), batches of the cloud's ingest size, one ``BEGIN IMMEDIATE`` transaction
each, rows prepared before the clock starts. It is warmed up once, then measured with the same
event count as the project, interleaved with it (alternating which goes first), so a busy
moment of the shared disk or CPU hits both; the ratio is of the medians.

Then a 1,000,000-event backlog is drained once and timed (goal < 60 s).

Prints one JSON line last (BENCHMARKS.md). No arguments needed; ``--events N`` and
``--backlog N`` change the sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from proto.build import ensure_generated  # noqa: E402

ensure_generated()

import yaml  # noqa: E402

from appliance import eventlog  # noqa: E402
from appliance.store import open_site_db  # noqa: E402
from cloud_bridge.server import CloudConfig  # noqa: E402

SITE = "bench-1"
WAIT_S = 30.0
STARTED = re.compile(r"^edgecc cloud listening link=127\.0\.0\.1:(\d+) enrol=127\.0\.0\.1:(\d+) ")
INGEST_BATCH = CloudConfig.ingest_batch  # events per cloud transaction
REPEATS = 5  # median of five interleaved pairs: one disk hiccup moves neither median
DEADLINE_S = 280.0  # the whole benchmark stays under 5 minutes


def payload(n: int) -> dict[str, Any]:
    """A queue event about the size the call path writes (~200 bytes of JSON)."""
    return {"call_id": f"c{n:09d}@bench", "queue": "support", "agent": f"agent{n % 50}",
            "caller": "+33140000000", "position": n % 7, "wait_s": round((n % 90) / 3, 2)}


class Cloud:
    """``edgecc cloud`` in a process of its own."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        with open(data_dir.parent / "cloud.log", "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(data_dir),
                 "--grpc-port", "0", "--http-port", "0"],
                cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
            )
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.process.stdout.readline()),  # type: ignore[union-attr]
                                  daemon=True)
        reader.start()
        reader.join(WAIT_S)
        match = STARTED.match(lines[0]) if lines else None
        if not match:
            self.stop()
            raise RuntimeError(f"the cloud did not start: {lines}")
        self.link_port, self.enrol_port = int(match[1]), int(match[2])
        self.conn = sqlite3.connect(data_dir / "cloud.db", timeout=10)

    def token(self) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(self.data_dir), "token",
             "--site", SITE], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S,
            check=True,
        )
        return out.stdout.strip()

    def acked(self) -> int:
        row = self.conn.execute("SELECT acked_seq FROM sites WHERE site_id = ?", (SITE,)).fetchone()
        return int(row[0]) if row else 0

    def stop(self) -> None:
        if getattr(self, "conn", None) is not None:
            self.conn.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def make_site(site_dir: Path, cloud: Cloud) -> None:
    """A site directory with its event log, enrolled with a one-time token."""
    site_dir.mkdir(parents=True)
    (site_dir / "site.yaml").write_text(f"site: {{id: {SITE}}}\nstorage: {{database: edgecc.db}}\n")
    db = open_site_db(site_dir / "edgecc.db")
    eventlog.bind_site(db, SITE)
    db.conn.close()
    subprocess.run(
        [sys.executable, "-m", "edge_agent", "enrol", "--site-dir", str(site_dir),
         "--cloud", f"127.0.0.1:{cloud.link_port}", "--enrol-port", str(cloud.enrol_port),
         "--token", cloud.token(), "--ca-cert", str(cloud.data_dir / "ca" / "ca.crt")],
        cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S, check=True,
    )
    file = site_dir / "cloud.yaml"
    data = yaml.safe_load(file.read_text())
    # Production defaults for batching and window; only the first reconnect is quicker.
    data["cloud"].update({"reconnect": {"initial_ms": 100, "max_ms": 1000}})
    file.write_text(yaml.safe_dump(data))


def fill_backlog(site_dir: Path, count: int) -> None:
    """Append ``count`` events with their outbox rows, 10,000 per transaction.

    The rows are exactly what ``eventlog.append`` writes (kind checked, payload encoded by the
    log's own encoder, ESSENTIAL priority), inserted with ``executemany`` so that preparing a
    1 M backlog takes seconds rather than minutes.
    """
    db = open_site_db(site_dir / "edgecc.db")
    kinds = tuple(eventlog.check_kind(k) for k in
                  ("queue.enter", "queue.connect", "queue.complete", "call.record"))
    now = time.time()
    conn = db.conn
    first = eventlog.last_seq(db) + 1
    for start in range(first, first + count, 10_000):
        seqs = range(start, min(start + 10_000, first + count))
        texts = [eventlog.encode_payload(payload(n)) for n in seqs]
        with eventlog.transaction(db):
            conn.executemany(
                "INSERT INTO events (seq, site_id, kind, occurred_at, payload)"
                " VALUES (?, ?, ?, ?, ?)",
                [(n, SITE, kinds[n % 4], now, t) for n, t in zip(seqs, texts, strict=True)],
            )
            conn.executemany(
                "INSERT INTO outbox (seq, priority, enqueued_at, bytes) VALUES (?, ?, ?, ?)",
                [(n, eventlog.ESSENTIAL, now, len(t.encode())) for n, t in
                 zip(seqs, texts, strict=True)],
            )
    db.conn.close()


def drain(site_dir: Path, cloud: Cloud, count: int, limit_s: float) -> dict[str, float]:
    """Start the edge agent and time the backlog until the cloud acknowledged all of it."""
    with open(site_dir / "edge-agent.log", "ab") as log:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "--site-dir", str(site_dir)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
        )
    started = time.monotonic()
    try:
        first_at = first_acked = None
        while True:
            acked = cloud.acked()
            now = time.monotonic()
            if first_at is None and acked > 0:
                first_at, first_acked = now, acked
            if acked >= count:
                break
            if now - started > limit_s:
                raise RuntimeError(f"drain not done in {limit_s:.0f} s: {acked}/{count} acked")
            time.sleep(0.005)  # polling interval of a bounded wait
        end = time.monotonic()
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(10)
    assert first_at is not None and first_acked is not None
    streamed = count - first_acked
    span = max(end - first_at, 1e-6)
    return {"rate": streamed / span, "from_start_s": end - started, "linked_after_s":
            first_at - started}


def project_run(work: Path, count: int, limit_s: float) -> dict[str, float]:
    """One fresh cloud and site; ``count`` events drained; the rates."""
    cloud = Cloud(work / "cloud")
    try:
        make_site(work / "site", cloud)
        fill_backlog(work / "site", count)
        result = drain(work / "site", cloud, count, limit_s)
        stored = cloud.conn.execute(
            "SELECT COUNT(*), MIN(seq), MAX(seq) FROM events WHERE site_id = ?", (SITE,)
        ).fetchone()
        if tuple(stored) != (count, 1, count):
            raise RuntimeError(f"cloud holds {stored}, expected {count} events 1..{count}")
        return result
    finally:
        cloud.stop()
        shutil.rmtree(work, ignore_errors=True)


def raw_run(work: Path, count: int) -> float:
    """Events/s of plain batched inserts: same SQLite settings, table and batch size."""
    work.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(work / "raw.db", isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE events (site_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL,"
            " payload BLOB NOT NULL, occurred_at REAL NOT NULL, received_at REAL NOT NULL,"
            " PRIMARY KEY (site_id, seq)) WITHOUT ROWID"
        )
        kinds = ("queue.enter", "queue.connect", "queue.complete", "call.record")
        now = time.time()
        values = [v for n in range(1, count + 1) for v in (
            SITE, n, kinds[n % 4], eventlog.encode_payload(payload(n)).encode(), now, now)]
        # The fastest plain way: one multi-row INSERT per batch (as the cloud writes), the
        # parameters flattened before the clock starts.
        batches = [(f"INSERT INTO events VALUES {', '.join(['(?, ?, ?, ?, ?, ?)'] * size)}",
                    values[at * 6:(at + size) * 6])
                   for at in range(0, count, INGEST_BATCH)
                   for size in [min(INGEST_BATCH, count - at)]]
        started = time.perf_counter()
        for sql, params in batches:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(sql, params)
            conn.execute("COMMIT")
        return count / (time.perf_counter() - started)
    finally:
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    """Run the benchmark; print the JSON line last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per measured run")
    parser.add_argument("--backlog", type=int, default=1_000_000, help="backlog drained once")
    args = parser.parse_args()
    began = time.monotonic()
    base = Path(tempfile.mkdtemp(prefix="edgecc-bench-bridge-", dir="/var/tmp"))
    rates: list[float] = []
    raws: list[float] = []
    try:
        raw_run(base / "warm-up", min(args.events, 50_000))  # disk, page cache, code paths
        for i in range(REPEATS):
            # Interleaved, each going first in turn: load on the shared box hits both alike.
            if i % 2 == 0:
                raws.append(raw_run(base / f"raw{i}", args.events))
            run = project_run(base / f"run{i}", args.events, limit_s=120)
            rates.append(run["rate"])
            if i % 2 == 1:
                raws.append(raw_run(base / f"raw{i}", args.events))
            print(f"run={i} project_events_per_s={run['rate']:.0f} raw_events_per_s="
                  f"{raws[-1]:.0f} linked_after_s={run['linked_after_s']:.2f}", flush=True)
        backlog: dict[str, Any] = {"events": args.backlog}
        left = DEADLINE_S - (time.monotonic() - began)
        fill_start = time.monotonic()
        cloud = Cloud(base / "backlog" / "cloud")
        try:
            make_site(base / "backlog" / "site", cloud)
            fill_backlog(base / "backlog" / "site", args.backlog)
            backlog["fill_s"] = round(time.monotonic() - fill_start, 1)
            left -= time.monotonic() - fill_start
            try:
                done = drain(base / "backlog" / "site", cloud, args.backlog,
                             limit_s=max(10.0, left))
                backlog["drain_s"] = round(done["from_start_s"], 1)
                backlog["drain_rate"] = round(done["rate"])
            except RuntimeError as exc:
                backlog["drain_s"] = None
                backlog["error"] = str(exc)
        finally:
            cloud.stop()
        print(f"backlog={json.dumps(backlog)}", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    value = statistics.median(rates)
    peer = statistics.median(raws)
    line = {
        "bench": "bridge", "value": round(value), "unit": "events/s",
        "peer": f"raw SQLite {sqlite3.sqlite_version} batched insert, WAL, synchronous=FULL",
        "peer_value": round(peer), "ratio": round(value / peer, 3),
        "detail": {"events_per_run": args.events, "runs": [round(r) for r in rates],
                   "raw_runs": [round(r) for r in raws], "batch": INGEST_BATCH,
                   "backlog": backlog, "cpus": os.cpu_count()},
    }
    print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
