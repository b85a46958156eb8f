"""Interval KPI report of a month of a 200-agent site: the persisted rollup against one plain
SQL query over the same SQLite file.

A site database (the real schema, ``appliance.store.open_site_db``) gets a month of event-log
rows as call control and the agent desk write them: 200 agents, 10 queues, about 2 M calls
(``queue.enter``, ``queue.connect``/``queue.abandon``, ``queue.complete``, ``call.record``,
``agent.disposition``) and the agents' logins and pauses, ≈10 M rows, inserted with
``executemany``. The rollup (``appliance.reporting.rollup.QueueRollup``) is built once, as the
appliance does while events arrive (its cost is in ``detail.rollup_build_s``); then, three
times, another hour of events is appended and a fresh rollup object makes the interval report
(per queue, per 30 minutes: offered, answered, abandoned, short abandons, timed out, service
level, ASA, average and longest wait, abandonment rate, handled, AHT, mean patience), folding
in that tail. The peer is the same aggregation as ONE plain SQL query run by the ``sqlite3``
module on the same file; both must give the same counts. The live snapshot
(``LiveBoard.snapshot``) is timed after feeding it the last day. Prints one JSON line last
(/work/shared/BENCHMARKS.md); ``value`` is seconds (smaller is better).

``EDGECC_BENCH_KPI_EVENTS`` sets the number of rows (default 10,000,000).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance import eventlog  # noqa: E402
from appliance.reporting.from_log import queue_events_from_db  # noqa: E402
from appliance.reporting.kpi import KpiConfig, LiveBoard  # noqa: E402
from appliance.reporting.rollup import QueueRollup  # noqa: E402
from appliance.store import open_site_db  # noqa: E402

EVENTS = int(os.environ.get("EDGECC_BENCH_KPI_EVENTS", "10000000"))
AGENTS = 200
QUEUES = [f"q{i}" for i in range(10)]
DAYS = 30
START = 1_761_955_200.0  # 2025-11-01 00:00 UTC
REPEATS = 3
TAIL_SECONDS = 3600.0
ROWS_PER_CALL = 4.8  # mean rows a call writes in this mix
BATCH = 100_000

REFERENCE_SQL = """
WITH e AS (
    SELECT kind, occurred_at AS at, json_extract(payload, '$.call_id') AS cid,
           json_extract(payload, '$.queue') AS q,
           json_extract(payload, '$.overflow') IS NOT NULL AS overflow
    FROM events
    WHERE kind IN ('queue.enter', 'queue.connect', 'queue.abandon', 'queue.complete')
), c AS (
    SELECT max(CASE WHEN kind = 'queue.enter' THEN q END) AS q,
           min(CASE WHEN kind = 'queue.enter' THEN at END) AS entered,
           min(CASE WHEN kind = 'queue.connect' THEN at END) AS answered,
           min(CASE WHEN kind = 'queue.abandon' THEN at END) AS left_at,
           max(CASE WHEN kind = 'queue.abandon' THEN overflow END) AS exited,
           min(CASE WHEN kind = 'queue.complete' THEN at END) AS ended
    FROM e GROUP BY cid
), w AS (
    SELECT q, CAST(entered AS INTEGER) - CAST(entered AS INTEGER) % :interval AS iv,
           answered, ended, max(0.0, coalesce(answered, left_at) - entered) AS wait,
           CASE WHEN answered IS NOT NULL THEN 'answered'
                WHEN left_at IS NULL THEN 'waiting'
                WHEN exited THEN 'timed_out'
                WHEN max(0.0, left_at - entered) < :short THEN 'short'
                ELSE 'abandoned' END AS fate
    FROM c WHERE entered IS NOT NULL
), r AS (
    SELECT iv, q,
           sum(fate != 'short') AS offered,
           sum(fate = 'answered') AS answered,
           sum(fate = 'abandoned') AS abandoned,
           sum(fate = 'short') AS short_abandoned,
           sum(fate = 'timed_out') AS timed_out,
           sum(fate = 'waiting') AS waiting,
           sum(fate = 'answered' AND wait <= :sl) AS answered_within,
           sum(fate = 'abandoned' AND wait <= :sl) AS abandoned_within,
           sum(CASE WHEN fate = 'answered' THEN wait END) AS answered_wait,
           sum(CASE WHEN fate IN ('answered', 'abandoned', 'timed_out') THEN wait END)
               AS left_wait,
           max(CASE WHEN fate IN ('answered', 'abandoned', 'timed_out') THEN wait END)
               AS longest_wait,
           sum(CASE WHEN fate != 'waiting' THEN wait END) AS all_wait,
           sum(fate IN ('abandoned', 'short')) AS all_abandons,
           sum(fate = 'answered' AND ended IS NOT NULL) AS handled,
           sum(CASE WHEN fate = 'answered' THEN ended - answered END) AS handle
    FROM w GROUP BY iv, q
)
SELECT iv, q, offered, answered, abandoned, short_abandoned, timed_out, waiting,
       answered_within * 1.0 / nullif(answered + abandoned + timed_out, 0) AS service_level,
       answered_wait / nullif(answered, 0) AS asa,
       left_wait / nullif(answered + abandoned + timed_out, 0) AS average_wait,
       longest_wait,
       abandoned * 1.0 / nullif(answered + abandoned + timed_out, 0) AS abandon_rate,
       handled, handle / nullif(handled, 0) AS aht,
       all_wait / nullif(all_abandons, 0) AS mean_patience
FROM r ORDER BY iv, q
"""
COMPARED = ("offered", "answered", "abandoned", "short_abandoned", "timed_out", "waiting",
            "handled")


def _payload(**values: object) -> str:
    return json.dumps(values, separators=(",", ":"), sort_keys=True)


def generate(db_path: Path, rows_wanted: int, start: float, seconds: float, seed: int,
             first_call: int) -> int:
    """Append about ``rows_wanted`` event rows covering ``seconds`` from ``start``; return the
    number of calls made. Rows go straight to the events table with executemany."""
    rng = random.Random(seed)
    calls = max(1, int(rows_wanted / ROWS_PER_CALL))
    gap = seconds / calls
    conn = sqlite3.connect(str(db_path))
    conn.execute("PRAGMA synchronous=OFF")
    insert = "INSERT INTO events (site_id, kind, occurred_at, payload) VALUES ('bench', ?, ?, ?)"
    batch: list[tuple[str, float, str]] = []
    days = max(1, int(seconds // 86400))
    for day in range(days):  # each agent logs in, pauses for lunch, logs out, every day
        base = start + day * 86400
        for a in range(AGENTS):
            agent = str(1000 + a)
            login = base + 6 * 3600 + (a % 12) * 900
            batch.append(("agent.login", login, _payload(agent=agent, actor=agent,
                                                         source="phone")))
            batch.append(("agent.pause", login + 4 * 3600, _payload(
                agent=agent, reason="lunch", actor=agent, source="phone")))
            batch.append(("agent.unpause", login + 5 * 3600, _payload(
                agent=agent, actor=agent, source="phone")))
            batch.append(("agent.logout", login + 9 * 3600, _payload(
                agent=agent, actor=agent, source="phone")))
    at = start
    # Payloads as call control writes them, formatted directly (json.dumps per row would
    # dominate the generation time).
    for n in range(first_call, first_call + calls):
        at += rng.expovariate(1 / gap)
        cid, queue = f"c{n:09d}", QUEUES[n % len(QUEUES)]
        caller = f"+3361{rng.randrange(10**6):06d}"
        wait = round(rng.expovariate(1 / 25), 3)
        batch.append(("queue.enter", at, f'{{"call_id":"{cid}","caller":"{caller}",'
                      f'"dialled":"100","priority":0,"queue":"{queue}"}}'))
        fate = rng.random()
        if fate < 0.9:
            agent = 1000 + rng.randrange(AGENTS)
            talk = round(rng.expovariate(1 / 220), 3)
            end = at + wait + talk
            batch.append(("queue.connect", at + wait, f'{{"agent":"{agent}","call_id":"{cid}",'
                          f'"queue":"{queue}","ring_s":2.0,"wait_s":{wait}}}'))
            batch.append(("queue.complete", end, f'{{"agent":"{agent}","call_id":"{cid}",'
                          f'"ended_by":"caller-hung-up","queue":"{queue}","talk_s":{talk}}}'))
            batch.append(("agent.disposition", end + 5, f'{{"agent":"{agent}",'
                          f'"call_id":"{cid}","code":"sale"}}'))
        else:
            overflow = ',"overflow":"timeout"' if fate > 0.98 else ""
            end = at + wait
            batch.append(("queue.abandon", end, f'{{"call_id":"{cid}","caller":"{caller}"'
                          f'{overflow},"queue":"{queue}","wait_s":{wait}}}'))
        batch.append(("call.record", end, f'{{"call_id":"{cid}","caller":"{caller}",'
                      f'"end_reason":"caller-hung-up","legs":[],"queue":"{queue}"}}'))
        if len(batch) >= BATCH:
            with conn:
                conn.executemany(insert, batch)
            batch.clear()
    with conn:
        conn.executemany(insert, batch)
    conn.close()
    return calls


def reference(db_path: Path, config: KpiConfig) -> tuple[float, list[tuple]]:
    conn = sqlite3.connect(str(db_path))
    began = time.perf_counter()
    rows = conn.execute(REFERENCE_SQL, {"interval": config.interval, "sl":
                                        config.service_level_threshold,
                                        "short": config.short_abandon}).fetchall()
    took = time.perf_counter() - began
    conn.close()
    return took, rows


def main() -> int:
    config = KpiConfig(interval=1800)
    work = Path(tempfile.mkdtemp(prefix="edgecc-bench-kpi-"))
    try:
        db_path = work / "edgecc.db"
        db = open_site_db(db_path)
        eventlog.bind_site(db, "bench")
        began = time.perf_counter()
        month = DAYS * 86400.0
        calls = generate(db_path, EVENTS, START, month, seed=1, first_call=0)
        rows = eventlog.last_seq(db)
        generate_s = time.perf_counter() - began
        print(f"generated {rows} rows ({calls} calls) in {generate_s:.1f} s", flush=True)

        began = time.perf_counter()
        QueueRollup(db, config).catch_up()
        build_s = time.perf_counter() - began
        print(f"rollup built in {build_s:.1f} s", flush=True)

        ours: list[float] = []
        theirs: list[float] = []
        tail_rows: list[int] = []
        end = START + month
        next_call = calls
        report_rows: list = []
        reference_rows: list[tuple] = []
        per_hour = int(EVENTS / (DAYS * 24))
        for rep in range(REPEATS):
            before = eventlog.last_seq(db)
            next_call += generate(db_path, per_hour, end, TAIL_SECONDS, seed=100 + rep,
                                  first_call=next_call)
            end += TAIL_SECONDS
            tail_rows.append(eventlog.last_seq(db) - before)
            began = time.perf_counter()
            report_rows = QueueRollup(db, config).report()
            ours.append(time.perf_counter() - began)
            took, reference_rows = reference(db_path, config)
            theirs.append(took)
            print(f"rep {rep}: rollup report {ours[-1]:.3f} s over a tail of {tail_rows[-1]} "
                  f"rows; plain SQL {took:.2f} s", flush=True)

        # The benchmark's own correctness: both give the same counts for every cell.
        got = {(r.interval_start, r.key): tuple(getattr(r, f) for f in COMPARED)
               for r in report_rows}
        want = {(int(r[0]), r[1]): tuple(int(v) for v in r[2:8]) + (int(r[13]),)
                for r in reference_rows}
        mismatched = sum(1 for k in set(got) | set(want) if got.get(k) != want.get(k))
        if mismatched:
            print(f"MISMATCH: {mismatched} cells differ between rollup and plain SQL")
        wait_gap = max((abs((r.longest_wait or 0) - (w[11] or 0))
                        for r, w in zip(report_rows, reference_rows, strict=False)), default=0)

        board = LiveBoard(config)
        for event in queue_events_from_db(db, since=end - 86400):
            board.apply(event)
        snaps = []
        for _ in range(200):
            began = time.perf_counter()
            board.snapshot(end)
            snaps.append(time.perf_counter() - began)
        snaps.sort()
        db.conn.close()
        value, peer = statistics.median(ours), statistics.median(theirs)
        print(json.dumps({
            "bench": "kpi", "value": round(value, 4), "unit": "s per interval report",
            "peer": f"one plain SQL query, sqlite3 {sqlite3.sqlite_version}",
            "peer_value": round(peer, 3), "ratio": round(value / peer, 4),
            "detail": {
                "events": rows, "calls": calls, "cells": len(report_rows),
                "mismatched_cells": mismatched, "longest_wait_max_diff_s": round(wait_gap, 6),
                "generate_s": round(generate_s, 1), "rollup_build_s": round(build_s, 1),
                "tail_rows": tail_rows, "report_runs_s": [round(x, 4) for x in ours],
                "sql_runs_s": [round(x, 3) for x in theirs],
                "live_snapshot_ms_p50": round(snaps[len(snaps) // 2] * 1000, 3),
                "live_snapshot_ms_p99": round(snaps[int(len(snaps) * 0.99)] * 1000, 3),
                "db_mb": round(db_path.stat().st_size / 2**20),
            },
        }))
        return 1 if mismatched else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
