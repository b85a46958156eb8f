"""Cross-site KPIs counted by the cloud from ingested queue events, on SQLite and PostgreSQL.

The events are shaped as the site's call control writes them (queue.enter, queue.connect with
wait_s, queue.abandon with wait_s and overflow) and go in through the store's real ingest.
Expected figures are worked out by hand in the comments.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import conftest_pg
import pytest
from conftest_pg import StoreBackend

from cloud_bridge.analytics import ALL_SITES, KpiSettings, cross_site_kpis, kpis_from_events
from cloud_bridge.store import CloudStore, EventRecord

cloud_store_backend = conftest_pg.cloud_store_backend
postgres_server = conftest_pg.postgres_server

ROOT = Path(__file__).resolve().parent.parent
T0 = 1_699_999_200  # a half-hour boundary (UTC)


def _calls() -> dict[str, list[tuple[str, float, dict]]]:
    """(kind, occurred_at, payload) per site, in the order the sites write them."""
    return {
        "paris-1": [
            ("queue.enter", T0 + 10, {"call_id": "c1", "queue": "support"}),
            ("queue.connect", T0 + 25, {"call_id": "c1", "agent": "1001", "wait_s": 15.0}),
            ("queue.enter", T0 + 100, {"call_id": "c2", "queue": "support"}),
            ("queue.connect", T0 + 130, {"call_id": "c2", "agent": "1002", "wait_s": 30.0}),
            ("queue.enter", T0 + 200, {"call_id": "c3", "queue": "support"}),
            ("queue.abandon", T0 + 203, {"call_id": "c3", "wait_s": 3.0}),  # short abandon
            ("queue.enter", T0 + 300, {"call_id": "c4", "queue": "sales"}),
            ("queue.abandon", T0 + 340, {"call_id": "c4", "wait_s": 40.0}),
            ("call.record", T0 + 341, {"call_id": "c4"}),  # not a queue event
            ("queue.enter", T0 + 1805, {"call_id": "c5", "queue": "support"}),
            ("queue.connect", T0 + 1810, {"call_id": "c5", "agent": "1001", "wait_s": 5.0}),
            ("queue.enter", T0 + 1900, {"call_id": "c6", "queue": "support"}),  # still waiting
        ],
        "lyon-2": [
            ("queue.enter", T0 + 50, {"call_id": "d1", "queue": "support"}),
            ("queue.enter", T0 + 60, {"call_id": "d2", "queue": "support"}),
            ("queue.connect", T0 + 70, {"call_id": "d2", "agent": "2001", "wait_s": 10.0}),
            ("queue.abandon", T0 + 110, {"call_id": "d1", "wait_s": 60.0, "overflow": "timeout"}),
        ],
    }


def _ingest(store: CloudStore) -> None:
    for site, events in _calls().items():
        records = [EventRecord(site, seq, kind, json.dumps(payload).encode(), at)
                   for seq, (kind, at, payload) in enumerate(events, start=1)]
        # A payload that is not JSON: counted as skipped, never a crash.
        records.append(EventRecord(site, len(records) + 1, "queue.enter", b"\xff{", T0 + 5))
        # The placeholder of a withheld event is not a queue event.
        records.append(EventRecord(site, len(records) + 1, "edgecc.withheld",
                                   b'{"kind":"queue.enter","withheld":true}', T0 + 6))
        result = store.ingest(records, T0 + 4000, window=1000)
        assert result.acked_seq == len(records)


@pytest.fixture
def store(cloud_store_backend: StoreBackend):
    s = cloud_store_backend.open()
    yield s
    s.close()


def _row(report, site: str, start: int | None):
    rows = [r for r in report.rows if r.site_id == site and r.interval_start == start]
    assert len(rows) == 1, f"one row for {site} {start}, got {rows}"
    return rows[0]


def test_kpis_per_site_per_interval_and_all_sites(store: CloudStore) -> None:
    _ingest(store)
    report = cross_site_kpis(store, T0, T0 + 3600, KpiSettings(interval=1800))
    assert report.skipped == 2  # one bad payload per site

    paris = _row(report, "paris-1", None)
    # c1, c2, c4, c5, c6 offered (c3 is a short abandon); c1 (15 s) and c5 (5 s) within 20 s.
    assert (paris.offered, paris.answered, paris.abandoned, paris.short_abandoned,
            paris.timed_out, paris.waiting, paris.answered_within) == (5, 3, 1, 1, 0, 1, 2)
    assert paris.service_level == pytest.approx(2 / 4)
    assert paris.asa == pytest.approx((15 + 30 + 5) / 3)

    first = _row(report, "paris-1", T0)
    assert (first.offered, first.answered, first.abandoned, first.waiting) == (3, 2, 1, 0)
    assert first.service_level == pytest.approx(1 / 3)
    assert first.asa == pytest.approx(22.5)
    second = _row(report, "paris-1", T0 + 1800)
    assert (second.offered, second.answered, second.waiting) == (2, 1, 1)
    assert second.service_level == 1.0 and second.asa == pytest.approx(5.0)

    lyon = _row(report, "lyon-2", None)
    assert (lyon.offered, lyon.answered, lyon.timed_out, lyon.answered_within) == (2, 1, 1, 1)
    assert lyon.service_level == pytest.approx(0.5) and lyon.asa == pytest.approx(10.0)

    everyone = report.total(ALL_SITES)
    assert everyone is not None
    assert (everyone.offered, everyone.answered, everyone.abandoned, everyone.timed_out,
            everyone.short_abandoned, everyone.waiting) == (7, 4, 1, 1, 1, 1)
    assert everyone.service_level == pytest.approx(3 / 6)
    assert everyone.asa == pytest.approx((15 + 30 + 5 + 10) / 4)
    both_first = _row(report, ALL_SITES, T0)
    assert both_first.offered == 5 and both_first.service_level == pytest.approx(2 / 5)
    # Sites in order, all sites last; within each, the total then the intervals.
    assert [(r.site_id, r.interval_start) for r in report.rows] == [
        ("lyon-2", None), ("lyon-2", T0), ("paris-1", None), ("paris-1", T0),
        ("paris-1", T0 + 1800), (ALL_SITES, None), (ALL_SITES, T0), (ALL_SITES, T0 + 1800)]


def test_period_site_filter_and_settings(store: CloudStore) -> None:
    _ingest(store)
    later = cross_site_kpis(store, T0 + 1800, T0 + 3600)
    assert [(r.site_id, r.interval_start, r.offered) for r in later.rows] == [
        ("paris-1", None, 2), ("paris-1", T0 + 1800, 2), (ALL_SITES, None, 2),
        (ALL_SITES, T0 + 1800, 2)]
    lyon = cross_site_kpis(store, T0, T0 + 3600, site_id="lyon-2")
    assert {r.site_id for r in lyon.rows} == {"lyon-2", ALL_SITES}
    # A 40 s threshold puts c2 (30 s) inside the service level; hourly intervals merge.
    wide = cross_site_kpis(store, T0, T0 + 3600, KpiSettings(interval=3600,
                                                              service_level_threshold=40))
    paris = wide.total("paris-1")
    assert paris is not None and paris.answered_within == 3
    assert [r.interval_start for r in wide.rows if r.site_id == "paris-1"] == [None, T0]
    empty = cross_site_kpis(store, T0 + 7200, T0 + 9000)
    assert [(r.site_id, r.offered, r.service_level, r.asa) for r in empty.rows] == [
        (ALL_SITES, 0, None, None)]
    with pytest.raises(ValueError, match="must not be empty"):
        cross_site_kpis(store, T0, T0)
    with pytest.raises(ValueError, match="interval"):
        KpiSettings(interval=600)


def test_events_in_any_order_give_the_same_figures() -> None:
    records = [EventRecord(site, seq, kind, json.dumps(p).encode(), at)
               for site, events in _calls().items()
               for seq, (kind, at, p) in enumerate(events, start=1)]
    forward = kpis_from_events(records, T0, T0 + 3600)
    backward = kpis_from_events(list(reversed(records)), T0, T0 + 3600)
    assert forward.rows == backward.rows


def _cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(data_dir), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_edgecc_cloud_kpis_command(cloud_store_backend: StoreBackend, tmp_path: Path) -> None:
    store = cloud_store_backend.open()
    try:
        _ingest(store)
    finally:
        store.close()
    db = ["--db", cloud_store_backend.url]
    done = _cli(tmp_path, "kpis", *db, "--since", str(T0), "--until", "2023-11-14T22:40:00",
                "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    total = [r for r in out["rows"] if r["site_id"] == ALL_SITES and r["interval_start"] is None]
    assert total[0]["offered"] == 7 and total[0]["service_level"] == pytest.approx(0.5)
    table = _cli(tmp_path, "kpis", *db, "--since", str(T0), "--until", str(T0 + 3600),
                 "--site", "paris-1")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[1].split()[:3] == ["SITE", "INTERVAL", "OFFERED"]
    assert lines[2].split()[:8] == ["paris-1", "total", "5", "3", "1", "0", "1", "50.0%"]
    # Bad input: a clear error, exit status 2.
    bad = _cli(tmp_path, "kpis", *db, "--since", "yesterday")
    assert bad.returncode == 2 and "ISO date/time" in bad.stderr
    backwards = _cli(tmp_path, "kpis", *db, "--since", str(T0 + 10), "--until", str(T0))
    assert backwards.returncode == 2 and "must be after" in backwards.stderr
