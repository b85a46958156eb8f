"""The appliance's database writer (appliance/dbwriter.py): group commit in order, a failing job
alone rolled back, durability when the future resolves, bounded queue, close() flushing.

Every test uses a real SQLite file (WAL, synchronous=FULL, the site's migrations) and reads
what was committed through a second connection, as another process would.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import eventlog
from appliance.dbwriter import DatabaseWriter, WriterClosed, WriterFull, atomic, in_batch
from appliance.store import open_site_db


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    path = tmp_path / "site.db"
    db = open_site_db(path)
    db.conn.execute("CREATE TABLE jobs (n INTEGER PRIMARY KEY, note TEXT)")
    db.conn.execute("CREATE TABLE parents (id INTEGER PRIMARY KEY)")
    db.conn.execute("CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES "
                    "parents (id) DEFERRABLE INITIALLY DEFERRED)")
    eventlog.bind_site(db, "demo")
    db.close()
    return path


@pytest.fixture
def writer(db_path: Path) -> Iterator[DatabaseWriter]:
    w = DatabaseWriter(open_site_db(db_path), name="test", limit=1000)
    yield w
    w.close(10)
    w.db.close()


def committed(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def insert(n: int, note: str = "") -> Any:
    def job(conn: sqlite3.Connection, _db: Any) -> int:
        conn.execute("INSERT INTO jobs (n, note) VALUES (?, ?)", (n, note))
        return n
    return job


class Gate:
    """A job that holds the writer (its batch open) until released, so that the next jobs
    queue up behind it and go in one batch."""

    def __init__(self, writer: DatabaseWriter) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.future = writer.write("gate", self._job)
        assert self.started.wait(10)

    def _job(self, _conn: sqlite3.Connection, _db: Any) -> None:
        self.started.set()
        assert self.release.wait(15)


def test_jobs_queued_together_commit_in_one_batch_in_order(writer: DatabaseWriter,
                                                           db_path: Path) -> None:
    gate = Gate(writer)
    futures = [writer.write(f"job {n}", insert(n)) for n in range(100)]
    assert writer.pending == 101
    # Held by the gate: nothing of them is committed, nothing resolved.
    assert committed(db_path, "SELECT COUNT(*) FROM jobs") == [(0,)]
    assert not any(f.done() for f in futures)
    gate.release.set()
    assert [f.result(10) for f in futures] == list(range(100))
    assert committed(db_path, "SELECT n FROM jobs ORDER BY rowid") == [(n,) for n in range(100)]
    assert writer.flush(10) and writer.pending == 0
    # The gate's batch, then one batch for the hundred that waited behind it.
    assert (writer.batches, writer.committed, writer.failed) == (2, 101, 0)


def test_a_failing_job_is_rolled_back_alone_and_reports_its_error(writer: DatabaseWriter,
                                                                  db_path: Path) -> None:
    def half_then_fail(conn: sqlite3.Connection, _db: Any) -> None:
        conn.execute("INSERT INTO jobs (n, note) VALUES (2, 'half')")
        raise ValueError("customer record refused")

    gate = Gate(writer)
    first = writer.write("first", insert(1))
    failing = writer.write("failing", half_then_fail)
    duplicate = writer.write("duplicate", insert(1, "again"))  # a constraint error
    last = writer.write("last", insert(3))
    gate.release.set()
    assert first.result(10) == 1 and last.result(10) == 3
    with pytest.raises(ValueError, match="customer record refused"):
        failing.result(10)
    with pytest.raises(sqlite3.IntegrityError):
        duplicate.result(10)
    assert committed(db_path, "SELECT n, note FROM jobs ORDER BY n") == [(1, ""), (3, "")]
    assert (writer.batches, writer.committed, writer.failed) == (2, 3, 2)


def test_a_batch_that_cannot_commit_fails_every_job_and_the_next_goes_on(
        writer: DatabaseWriter, db_path: Path, caplog: Any) -> None:
    def orphan(conn: sqlite3.Connection, _db: Any) -> None:
        # A deferred foreign key is checked at COMMIT: the whole batch's commit fails.
        conn.execute("INSERT INTO children (id, parent) VALUES (1, 99)")

    gate = Gate(writer)
    before = writer.write("before", insert(1))
    bad = writer.write("orphan", orphan)
    gate.release.set()
    for future in (before, bad):
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            future.result(10)
    assert "event=test_batch_failed" in caplog.text
    assert committed(db_path, "SELECT COUNT(*) FROM jobs") == [(0,)]
    assert writer.write("after", insert(2)).result(10) == 2
    assert committed(db_path, "SELECT n FROM jobs") == [(2,)]


def test_a_resolved_future_means_committed_on_disk(writer: DatabaseWriter,
                                                   db_path: Path) -> None:
    for n in range(20):
        writer.write(f"job {n}", insert(n)).result(10)
        # Read through another connection at once: no flush, no wait.
        assert committed(db_path, f"SELECT n FROM jobs WHERE n = {n}") == [(n,)]


def test_executor_jobs_join_the_batch_through_eventlog_transaction(
        writer: DatabaseWriter, db_path: Path) -> None:
    db = writer.db

    def record(call_id: str) -> int:
        # Code written for a transaction of its own: inside a job it is a savepoint.
        assert in_batch(db.conn)
        with eventlog.transaction(db) as conn:
            conn.execute("INSERT INTO jobs (n, note) VALUES (?, ?)", (len(call_id), call_id))
            return eventlog.append(db, "call.record", {"call_id": call_id}, occurred_at=1.0)

    def broken(call_id: str) -> int:
        with eventlog.transaction(db):
            eventlog.append(db, "call.record", {"call_id": call_id}, occurred_at=1.0)
            raise RuntimeError("after the event")

    async def scenario() -> tuple[int, BaseException | None]:
        loop = asyncio.get_running_loop()
        seq = await loop.run_in_executor(writer, record, "c-1")
        try:
            await loop.run_in_executor(writer, broken, "c-22")
        except RuntimeError as exc:
            return seq, exc
        return seq, None

    seq, error = asyncio.run(scenario())
    assert isinstance(error, RuntimeError)
    assert committed(db_path, "SELECT seq, kind FROM events") == [(seq, "call.record")]
    assert committed(db_path, "SELECT n, note FROM jobs") == [(3, "c-1")]
    assert not in_batch(writer.db.conn)  # only on the writer's thread, during a job


def test_a_job_that_rolls_back_the_batch_itself_loses_nothing_else(
        writer: DatabaseWriter, db_path: Path, caplog: Any) -> None:
    def rude(conn: sqlite3.Connection, _db: Any) -> None:
        conn.execute("ROLLBACK")  # not allowed: the batch's earlier jobs went with it
        raise RuntimeError("gave up")

    gate = Gate(writer)
    futures = [writer.write("one", insert(1)), writer.write("rude", rude),
               writer.write("two", insert(2))]
    gate.release.set()
    assert futures[0].result(10) == 1 and futures[2].result(10) == 2
    with pytest.raises(RuntimeError, match="gave up"):
        futures[1].result(10)
    assert committed(db_path, "SELECT n FROM jobs ORDER BY n") == [(1,), (2,)]
    assert "event=test_job_ended_transaction" in caplog.text and "change=rude" in caplog.text


def test_atomic_outside_a_writer_is_a_transaction_of_its_own(db_path: Path) -> None:
    db = open_site_db(db_path)
    try:
        with pytest.raises(ZeroDivisionError), atomic(db.conn) as conn:
            conn.execute("INSERT INTO jobs (n) VALUES (1)")
            1 / 0  # noqa: B018
        with atomic(db.conn) as conn:
            conn.execute("INSERT INTO jobs (n) VALUES (2)")
        assert not db.conn.in_transaction
        assert committed(db_path, "SELECT n FROM jobs") == [(2,)]
    finally:
        db.close()


def test_close_flushes_what_is_queued_and_then_refuses(writer: DatabaseWriter,
                                                       db_path: Path) -> None:
    gate = Gate(writer)
    futures = [writer.write(f"job {n}", insert(n)) for n in range(10)]
    result: dict[str, bool] = {}
    closing = threading.Thread(target=lambda: result.setdefault("done", writer.close(10)))
    closing.start()
    assert committed(db_path, "SELECT COUNT(*) FROM jobs") == [(0,)]  # close() is waiting
    gate.release.set()
    closing.join(15)
    assert not closing.is_alive() and result == {"done": True}
    assert all(f.done() and f.exception() is None for f in futures)
    assert committed(db_path, "SELECT COUNT(*) FROM jobs") == [(10,)]
    with pytest.raises(WriterClosed, match="stopped"):
        writer.write("late", insert(99))
    with pytest.raises(WriterClosed):
        writer.submit(print, "late")


def test_a_full_queue_refuses_at_once_and_queues_nothing(db_path: Path) -> None:
    writer = DatabaseWriter(open_site_db(db_path), name="test", limit=3)
    try:
        gate = Gate(writer)
        kept = [writer.write("a", insert(1)), writer.write("b", insert(2))]
        with pytest.raises(WriterFull, match="3 test writes are waiting"):
            writer.write("c", insert(3))
        assert writer.pending == 3
        gate.release.set()
        assert [f.result(10) for f in kept] == [1, 2]
        assert writer.write("c", insert(3)).result(10) == 3  # room again
        assert committed(db_path, "SELECT n FROM jobs ORDER BY n") == [(1,), (2,), (3,)]
    finally:
        writer.close(10)
        writer.db.close()


def test_a_close_that_times_out_cancels_only_what_waited(db_path: Path, caplog: Any) -> None:
    writer = DatabaseWriter(open_site_db(db_path), name="test")
    gate = Gate(writer)
    waiting = writer.write("waiting", insert(1))
    assert writer.close(0.1) is False
    assert "event=test_stop_unflushed" in caplog.text and "pending=2" in caplog.text
    assert waiting.cancelled()
    gate.release.set()
    assert writer.join(10) and gate.future.result(0) is None
    assert committed(db_path, "SELECT COUNT(*) FROM jobs") == [(0,)]
    writer.db.close()


def test_bad_arguments_are_refused(db_path: Path) -> None:
    db = open_site_db(db_path)
    try:
        with pytest.raises(ValueError, match="at least 1"):
            DatabaseWriter(db, limit=0)
    finally:
        db.close()


def test_many_threads_handing_over_at_once_keep_each_ones_order(writer: DatabaseWriter,
                                                               db_path: Path) -> None:
    writer.limit = 10_000

    def hand_over(base: int) -> list[concurrent.futures.Future[Any]]:
        return [writer.write("job", insert(base + n)) for n in range(200)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        batches = list(pool.map(hand_over, (0, 1000, 2000, 3000)))
    assert writer.flush(30)
    assert all(f.exception() is None for futures in batches for f in futures)
    rows = [n for (n,) in committed(db_path, "SELECT n FROM jobs ORDER BY rowid")]
    assert len(rows) == 800
    for base in (0, 1000, 2000, 3000):
        assert [n for n in rows if base <= n < base + 1000] == list(range(base, base + 200))
    assert writer.batches < 800  # grouped
