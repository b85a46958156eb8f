"""The appliance's database writer: one thread per connection that commits the jobs handed to it
in groups (group commit), in the order they were handed over.

Why: with ``synchronous=FULL`` every commit is an fsync of the WAL. A call writes a few small
transactions (its trace in ``calls_in_progress``, its record and events, an audit row); at a
few hundred calls per second one transaction each costs more than the writes themselves. The
writer takes every job waiting when it gets to run and commits them in ONE transaction, so the
cost of a commit is shared by however many jobs arrived meanwhile; under light load a batch is
one job and nothing waits.

Rules:

- A job is ``job(conn, db)`` (``write``) or any callable with arguments (``submit``, the
  ``concurrent.futures.Executor`` protocol, so ``loop.run_in_executor(writer, fn, ...)`` works).
  It runs on the writer's thread inside the batch's transaction, in a savepoint of its own:
  a job that raises is rolled back alone, its future carries the exception, and the other
  jobs of the batch commit as if it had never run.
- Inside a job, ``eventlog.transaction`` and ``atomic`` become nested savepoints and
  ``eventlog.append`` joins the batch: code written for a transaction of its own runs unchanged.
  A job must not COMMIT or ROLLBACK itself; one that does is caught (its earlier neighbours are
  run again if they were rolled back with it) and logged.
- Durability: a job's future resolves (result or exception) only after the batch's COMMIT
  returned, i.e. after the fsync. A crash (or power loss) loses the jobs whose futures had not
  resolved yet, each one whole: never part of a job, never a later job without an earlier one.
- A failed COMMIT (disk full, I/O error) fails every job of that batch with the error, rolled
  back; the writer goes on with the next batch.
- At most ``limit`` jobs wait (queued or running); beyond that ``write``/``submit`` raise
  ``WriterFull`` at once, before anything is queued. After ``close()`` they raise
  ``WriterClosed``.
- ``flush()`` waits for everything handed over so far; ``close()`` flushes (bounded), then stops
  the thread. Jobs still queued when a bounded close gives up are cancelled (their futures say
  so) and logged.
"""

from __future__ import annotations

import concurrent.futures
import logging
import sqlite3
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import sqlite_utils

from appliance.log import kv

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "MAX_BATCH", "MAX_PENDING", "DatabaseWriter", "Job",
           "WriterClosed", "WriterError", "WriterFull", "atomic", "in_batch",
           "own_connection"]

log = logging.getLogger("edgecc.dbwriter")

MAX_PENDING = 10_000
"""Jobs handed over and not finished beyond which a writer refuses more: the database is stuck
(disk full, locked) and memory must not grow without bound."""
MAX_BATCH = 512
"""Most jobs committed in one transaction (bounds how long one batch holds the write lock)."""
DEFAULT_CLOSE_TIMEOUT = 10.0
"""Seconds ``close()`` waits for the queued jobs to commit."""

T = TypeVar("T")
Job = Callable[[sqlite3.Connection, sqlite_utils.Database], Any]
"""``job(conn, db)``: one unit of work run inside the batch's transaction."""

_JOB_SAVEPOINT = "edgecc_job"
_NESTED_SAVEPOINT = "edgecc_nested"
_local = threading.local()


class WriterError(Exception):
    """The writer cannot take a job; nothing was queued."""


class WriterFull(WriterError):
    """Too many jobs are waiting for the database (``limit``)."""


class WriterClosed(WriterError):
    """The writer is stopped (``close()`` was called)."""


def in_batch(conn: sqlite3.Connection) -> bool:
    """True when the calling thread is running a writer job on ``conn`` (its transaction is the
    batch's: join it with a savepoint, never commit it)."""
    return getattr(_local, "conn", None) is conn


@contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """All-or-nothing writes: a savepoint inside an open transaction (a writer batch, or the
    caller's own), else a ``BEGIN IMMEDIATE`` transaction committed at the end."""
    if conn.in_transaction:
        conn.execute(f"SAVEPOINT {_NESTED_SAVEPOINT}")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute(f"ROLLBACK TO {_NESTED_SAVEPOINT}")
                conn.execute(f"RELEASE {_NESTED_SAVEPOINT}")
            raise
        conn.execute(f"RELEASE {_NESTED_SAVEPOINT}")
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def own_connection(db: sqlite_utils.Database) -> sqlite_utils.Database:
    """A new connection to ``db``'s file (migrated, same pragmas); ``db`` itself for an
    in-memory database, which has no file to open twice."""
    from appliance.store import open_site_db

    row = db.conn.execute("PRAGMA database_list").fetchone()
    path = row[2] if row is not None else ""
    if not path:
        return db
    return open_site_db(path)


@dataclass
class _Queued:
    what: str
    call: Callable[[], Any]
    future: concurrent.futures.Future[Any]
    outcome: tuple[bool, Any] | None = field(default=None)
    """(ok, value or exception) once run in the current attempt; None when not run yet."""


class DatabaseWriter(concurrent.futures.Executor):
    """One thread that commits jobs on ``db`` in groups, in order (see the module docstring).

    ``db`` is used by this thread only from now on (or, with ``own_connection=True``, a new
    connection to the same file is opened and closed by ``close()``). ``name`` prefixes the
    log events (``<name>_write_failed``, ``<name>_stop_unflushed``).
    """

    def __init__(self, db: sqlite_utils.Database, *, name: str = "db",
                 limit: int = MAX_PENDING, max_batch: int = MAX_BATCH,
                 own_connection: bool = False) -> None:
        if limit < 1 or max_batch < 1:
            raise ValueError(f"limit and max_batch must be at least 1, got {limit}, {max_batch}")
        self.db = _own(db) if own_connection else db
        self._owns_db = self.db is not db
        self.name = name
        self.limit = limit
        self.max_batch = max_batch
        self._queue: deque[_Queued] = deque()
        self._cond = threading.Condition()
        self._pending = 0
        self._handed = 0
        self._finished = 0
        self._closed = False
        self._stopping = False
        self.committed = 0
        """Jobs committed since start."""
        self.failed = 0
        """Jobs that raised (rolled back alone) or whose batch failed to commit."""
        self.batches = 0
        """Transactions committed since start."""
        self._thread = threading.Thread(target=self._loop, name=f"edgecc-{name}-writer",
                                        daemon=True)
        self._thread.start()

    # -- handing over ------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Jobs handed over and not finished (committed or failed) yet."""
        return self._pending

    def check_room(self) -> None:
        """Raise ``WriterClosed`` / ``WriterFull`` when a job could not be taken now."""
        if self._closed:
            raise WriterClosed(f"the {self.name} writer is stopped")
        if self._pending >= self.limit:
            raise WriterFull(f"{self._pending} {self.name} writes are waiting for the "
                             "database; try again shortly")

    def write(self, what: str, job: Job) -> concurrent.futures.Future[Any]:
        """Queue ``job(conn, db)`` after every earlier job; ``what`` names it in logs. The
        future resolves with its result once committed (or with its exception)."""
        db = self.db
        return self._put(what, lambda: job(db.conn, db))

    def submit(self, fn: Callable[..., T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[T]:
        """``Executor.submit``: run ``fn(*args, **kwargs)`` as a job (it reaches the database
        through its own reference to this writer's ``db``)."""
        what = getattr(fn, "__qualname__", type(fn).__name__)
        return self._put(what, lambda: fn(*args, **kwargs))

    def _put(self, what: str, call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cond:
            self.check_room()
            self._pending += 1
            self._handed += 1
            self._queue.append(_Queued(what, call, future))
            self._cond.notify()
        return future

    # -- waiting and stopping ----------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every job handed over so far is finished; False when ``timeout`` seconds
        passed first."""
        with self._cond:
            target = self._handed
            return self._cond.wait_for(lambda: self._finished >= target, timeout)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """Take no more jobs, wait up to ``timeout`` s for the queued ones, stop the thread and
        close the writer's own connection. False (and logged) when some were still waiting:
        those not started are cancelled; the batch in progress still commits."""
        with self._cond:
            self._closed = True
        done = self.flush(timeout)
        with self._cond:
            if not done:
                log.error(kv(event=f"{self.name}_stop_unflushed", pending=self._pending))
                while self._queue:
                    item = self._queue.popleft()
                    item.future.cancel()
                    self._done(1)
            self._stopping = True
            self._cond.notify_all()
        if done:
            self._thread.join()
            if self._owns_db:
                self.db.close()
        return done

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """``Executor.shutdown``: ``close()`` (without a time limit when ``wait``)."""
        if cancel_futures:
            self.close(0)
        else:
            self.close(DEFAULT_CLOSE_TIMEOUT if not wait else 365 * 86400.0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread to end after ``close()``; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _done(self, count: int) -> None:
        # Under self._cond.
        self._pending -= count
        self._finished += count
        self._cond.notify_all()

    # -- the thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._stopping)
                if not self._queue:
                    return
                count = min(len(self._queue), self.max_batch)
                batch = [self._queue.popleft() for _ in range(count)]
            batch = [item for item in batch if item.future.set_running_or_notify_cancel()]
            try:
                self._commit_batch(batch)
            except BaseException as exc:  # never leave a future unresolved
                log.exception(kv(event=f"{self.name}_writer_error"))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
            finally:
                with self._cond:
                    self._done(count)

    def _commit_batch(self, batch: list[_Queued]) -> None:
        todo = batch
        while todo:
            todo = self._attempt(todo)

    def _attempt(self, todo: list[_Queued]) -> list[_Queued]:
        """Run ``todo`` in one transaction; returns the jobs to run again in a new one (only
        when a job ended the transaction itself)."""
        conn = self.db.conn
        try:
            if conn.in_transaction:  # left open by someone else: not ours to commit
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")
        except Exception as exc:
            self._fail(todo, exc)
            return []
        ran: list[_Queued] = []
        _local.conn = conn
        try:
            for index, item in enumerate(todo):
                conn.execute(f"SAVEPOINT {_JOB_SAVEPOINT}")
                try:
                    value = item.call()
                except BaseException as exc:
                    if conn.in_transaction:
                        conn.execute(f"ROLLBACK TO {_JOB_SAVEPOINT}")
                        conn.execute(f"RELEASE {_JOB_SAVEPOINT}")
                    item.outcome = (False, exc)
                    log.error(kv(event=f"{self.name}_write_failed", change=item.what,
                                 error=repr(exc)))
                else:
                    if conn.in_transaction:
                        conn.execute(f"RELEASE {_JOB_SAVEPOINT}")
                    item.outcome = (True, value)
                ran.append(item)
                if not conn.in_transaction:
                    return self._transaction_ended(ran, todo[index + 1:])
        finally:
            _local.conn = None
        try:
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._fail(ran, exc)
            return []
        self.batches += 1
        self._resolve(ran)
        return []

    def _transaction_ended(self, ran: list[_Queued], rest: list[_Queued]) -> list[_Queued]:
        """The last job of ``ran`` committed or rolled back the batch itself. A job that
        returned committed it (its neighbours before it are durable); one that raised rolled it
        back, so the jobs before it that had succeeded are run again."""
        culprit = ran[-1]
        log.error(kv(event=f"{self.name}_job_ended_transaction", change=culprit.what))
        assert culprit.outcome is not None
        if culprit.outcome[0]:
            self.batches += 1
            self._resolve(ran)
            return rest
        again = [item for item in ran[:-1] if item.outcome is not None and item.outcome[0]]
        self._resolve([item for item in ran if item not in again])
        for item in again:
            item.outcome = None
        return again + rest

    def _resolve(self, items: list[_Queued]) -> None:
        for item in items:
            assert item.outcome is not None
            ok, value = item.outcome
            if ok:
                self.committed += 1
                item.future.set_result(value)
            else:
                self.failed += 1
                item.future.set_exception(value)

    def _fail(self, items: list[_Queued], exc: BaseException) -> None:
        """The batch did not commit: every job fails (a job that raised keeps its own error)."""
        log.error(kv(event=f"{self.name}_batch_failed", jobs=len(items), error=repr(exc)))
        for item in items:
            self.failed += 1
            own = item.outcome is not None and not item.outcome[0]
            item.future.set_exception(item.outcome[1] if own else exc)  # type: ignore[index]


def _own(db: sqlite_utils.Database) -> sqlite_utils.Database:
    return own_connection(db)
