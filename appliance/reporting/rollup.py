"""Per-interval queue KPIs kept as persisted rollups of the event log, so an interval report
reads a few rows per queue and interval plus the events appended since, never the whole log.

``QueueRollup(db, config)`` follows the log by seq (``catch_up``): each call adds its share to
the row of the interval it **entered the queue** in (docs/kpis.md, "Rules of attribution")
once, when it leaves the queue (answered, abandoned, timed out), and once more when its talk
ends (handle time). Every figure of a row is a sum or a maximum, so adding late shares is
exact. Calls not finished yet live in ``kpi_rollup_open``; a report counts the ones still
waiting as ``waiting``. Rollup rows, open calls and the seq they reflect are written in one
transaction, so a crash loses nothing and counts nothing twice.

The figures equal ``KpiEngine``'s queue rows with two exceptions, both documented in
docs/kpis.md: first-contact resolution (a property of pairs of calls, left to ``KpiEngine``)
is not rolled up, and wrap-up time is not (the log writes no wrap-up per call yet).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import sqlite_utils

from appliance import eventlog
from appliance.reporting.events import EventError, QueueVerb
from appliance.reporting.from_log import abandon_verb, complete_verb
from appliance.reporting.kpi import KpiConfig, KpiRow, _Tally

_EXITS = frozenset({QueueVerb.EXITWITHTIMEOUT, QueueVerb.EXITEMPTY, QueueVerb.EXITWITHKEY})
_ENDS = frozenset({QueueVerb.COMPLETECALLER, QueueVerb.COMPLETEAGENT, QueueVerb.TRANSFER})
_SUMS = ("offered", "answered", "abandoned", "short_abandoned", "timed_out", "answered_within",
         "abandoned_within", "answered_wait", "left_wait", "all_wait", "all_abandons", "handled",
         "talk", "hold", "ring_no_answer")
#: Log rows passed between two commits of a long catch-up.
FLUSH_ROWS = 1_000_000
#: Log rows (by seq) read per query.
READ_ROWS = 100_000
#: The kinds the rollup reads, with their verb (queue.complete and queue.abandon depend on the
#: payload: appliance.reporting.from_log decides).
_KIND_VERBS = {"queue.enter": QueueVerb.ENTERQUEUE, "queue.connect": QueueVerb.CONNECT,
               "queue.complete": None, "queue.abandon": None,
               "queue.ring_no_answer": QueueVerb.RINGNOANSWER, "call.hold": QueueVerb.HOLD,
               "call.resume": QueueVerb.UNHOLD}
_READ = (
    "SELECT seq, kind, occurred_at, json_extract(payload, '$.call_id'), "
    "json_extract(payload, '$.queue'), json_extract(payload, '$.wait_s'), "
    "json_extract(payload, '$.ended_by'), json_extract(payload, '$.overflow') "
    "FROM events WHERE seq > ? AND seq <= ? AND kind IN ("
    + ", ".join(f"'{k}'" for k in _KIND_VERBS) + ") ORDER BY seq")


def _verb(kind: str, ended_by: object, overflow: object) -> QueueVerb:
    verb = _KIND_VERBS[kind]
    if verb is not None:
        return verb
    return complete_verb(ended_by) if kind == "queue.complete" else abandon_verb(overflow)


class RollupError(Exception):
    """The rollup cannot follow the log (too many open calls, a concurrent writer)."""


@dataclass
class _Open:
    queue: str
    entered_at: float
    answered_at: float | None = None
    hold_started: float | None = None
    hold: float = 0.0
    rings: int = 0


@dataclass
class _Share:
    """Additive figures of one (interval, queue) cell."""

    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    short_abandoned: int = 0
    timed_out: int = 0
    answered_within: int = 0
    abandoned_within: int = 0
    answered_wait: float = 0.0
    left_wait: float = 0.0
    all_wait: float = 0.0
    all_abandons: int = 0
    handled: int = 0
    talk: float = 0.0
    hold: float = 0.0
    ring_no_answer: int = 0
    longest_wait: float | None = None


def config_key(config: KpiConfig) -> str:
    """The rollup's identity: shares depend on interval, thresholds and the local offset."""
    return (f"{config.interval}:{config.service_level_threshold:g}:"
            f"{config.short_abandon:g}:{config.utc_offset}")


class QueueRollup:
    """Persisted per-interval queue figures of one site database (see the module docstring)."""

    def __init__(self, db: sqlite_utils.Database, config: KpiConfig | None = None, *,
                 max_open: int = 200_000) -> None:
        self.db = db
        self.config = config or KpiConfig()
        self.key = config_key(self.config)
        self.max_open = max_open
        self._loaded = False
        self._seq = 0
        self._open: dict[str, _Open] = {}
        self._shares: dict[tuple[int, str], _Share] = {}

    # ------------------------------------------------------------------------- following

    def _load(self) -> None:
        conn = self.db.conn
        row = conn.execute("SELECT last_seq FROM kpi_rollup_state WHERE config = ?",
                           (self.key,)).fetchone()
        self._seq = 0 if row is None else int(row[0])
        self._open = {key: _Open(**json.loads(text)) for key, text in conn.execute(
            "SELECT call_key, state FROM kpi_rollup_open WHERE config = ?", (self.key,))}
        self._shares = {}
        self._loaded = True

    @property
    def last_seq(self) -> int:
        """The highest event-log seq the persisted rollup reflects."""
        if not self._loaded:
            self._load()
        return self._seq

    def catch_up(self) -> int:
        """Fold every event appended since the last call into the rollup; return the number of
        log rows passed. Raises ``RollupError`` (nothing written) when another process moved
        the rollup meanwhile or too many calls are open, ``EventError`` for a malformed row."""
        if not self._loaded:
            self._load()
        started = self._seq
        last = eventlog.last_seq(self.db)
        try:
            while self._seq < last:
                upto = min(last, self._seq + READ_ROWS)
                # The fields are pulled out by SQLite's JSON functions: no Python JSON parsing
                # and no event objects on this path, which folds months of log at once.
                rows = self.db.conn.execute(_READ, (self._seq, upto)).fetchall()
                for seq, kind, at, call_id, queue, wait, ended_by, overflow in rows:
                    verb = _verb(kind, ended_by, overflow)
                    if wait is not None and (not isinstance(wait, (int, float))
                                             or isinstance(wait, bool)):
                        raise EventError(f"event seq {seq} ({kind}): wait_s must be a number "
                                         f"of seconds, got {wait!r}")
                    self._apply(verb, "" if call_id is None else str(call_id),
                                "" if queue is None else str(queue), float(at), wait)
                self._seq = upto
                if self._seq - started >= FLUSH_ROWS:
                    self._flush(started)
                    started = self._seq
            if self._seq != started:
                self._flush(started)
        except BaseException:
            self._loaded = False  # memory is ahead of the database: reload next time
            raise
        return last - started if last > started else 0

    def _flush(self, started: int) -> None:
        conn = self.db.conn
        cols = ", ".join(_SUMS)
        sets = ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUMS)
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute("SELECT last_seq FROM kpi_rollup_state WHERE config = ?",
                               (self.key,)).fetchone()
            if (0 if row is None else int(row[0])) != started:
                raise RollupError("another process moved the KPI rollup; reload and retry")
            conn.executemany(
                f"INSERT INTO kpi_rollup (config, interval_start, queue, {cols}, longest_wait) "
                f"VALUES (?, ?, ?, {', '.join('?' * len(_SUMS))}, ?) "
                f"ON CONFLICT (config, interval_start, queue) DO UPDATE SET {sets}, "
                "longest_wait = CASE WHEN longest_wait IS NULL THEN excluded.longest_wait "
                "WHEN excluded.longest_wait IS NULL THEN longest_wait "
                "ELSE max(longest_wait, excluded.longest_wait) END",
                [(self.key, start, queue, *(getattr(s, c) for c in _SUMS), s.longest_wait)
                 for (start, queue), s in self._shares.items()])
            conn.execute("DELETE FROM kpi_rollup_open WHERE config = ?", (self.key,))
            conn.executemany(
                "INSERT INTO kpi_rollup_open (config, call_key, state) VALUES (?, ?, ?)",
                [(self.key, k, json.dumps(asdict(c))) for k, c in self._open.items()])
            conn.execute(
                "INSERT INTO kpi_rollup_state (config, last_seq, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (config) DO UPDATE SET last_seq = excluded.last_seq, "
                "updated_at = excluded.updated_at", (self.key, self._seq, time.time()))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self._shares = {}

    def _share(self, call: _Open) -> _Share:
        cell = (self.config.interval_start(call.entered_at), call.queue)
        share = self._shares.get(cell)
        if share is None:
            share = self._shares[cell] = _Share()
        return share

    def _apply(self, verb: QueueVerb, key: str, queue: str, at: float,
               wait: float | None) -> None:
        if verb is QueueVerb.ENTERQUEUE:
            old = self._open.get(key)
            if old is not None and old.answered_at is None:
                # Entered again without leaving: the first attempt stays waiting, as in
                # KpiEngine, under a key of its own.
                self._open[f"{key}\x00{old.entered_at!r}"] = old
            self._open[key] = _Open(queue, at)
            if len(self._open) > self.max_open:
                raise RollupError(f"more than {self.max_open} open calls in the KPI rollup; "
                                  "calls whose end was lost are still counted")
            return
        call = self._open.get(key) if key else None
        leaving = verb is QueueVerb.CONNECT or verb is QueueVerb.ABANDON or verb in _EXITS
        if call is None:
            if not leaving or not key:
                return
            # The log starts mid-call: date the entry back by the wait the event carries.
            call = _Open(queue, at - (wait or 0.0))
            self._open[key] = call
        if leaving:
            if call.answered_at is not None:
                return  # answered twice, or an exit after the answer: an anomaly
            self._leave(call, verb, at)
            if verb is QueueVerb.CONNECT:
                call.answered_at = at
            else:
                del self._open[key]
        elif verb in _ENDS:
            if call.answered_at is None:
                return
            if call.hold_started is not None:
                call.hold += at - call.hold_started
            share = self._share(call)
            share.handled += 1
            share.talk += at - call.answered_at - call.hold
            share.hold += call.hold
            del self._open[key]
        elif verb is QueueVerb.HOLD:
            if call.answered_at is not None and call.hold_started is None:
                call.hold_started = at
        elif verb is QueueVerb.UNHOLD:
            if call.hold_started is not None:
                call.hold += at - call.hold_started
                call.hold_started = None
        elif verb is QueueVerb.RINGNOANSWER:
            call.rings += 1

    def _leave(self, call: _Open, verb: QueueVerb, at: float) -> None:
        cfg, share = self.config, self._share(call)
        wait = max(0.0, at - call.entered_at)
        share.all_wait += wait
        if verb is QueueVerb.ABANDON:
            share.all_abandons += 1
            if wait < cfg.short_abandon:
                share.short_abandoned += 1
                return
        share.offered += 1
        share.ring_no_answer += call.rings
        within = wait <= cfg.service_level_threshold
        if verb is QueueVerb.CONNECT:
            share.answered += 1
            share.answered_wait += wait
            share.answered_within += within
        elif verb is QueueVerb.ABANDON:
            share.abandoned += 1
            share.abandoned_within += within
        else:
            share.timed_out += 1
        share.left_wait += wait
        share.longest_wait = wait if share.longest_wait is None else max(share.longest_wait,
                                                                         wait)

    # ------------------------------------------------------------------------- reporting

    def report(self, since: float | None = None, until: float | None = None, *,
               catch_up: bool = True) -> list[KpiRow]:
        """Queue rows (scope "queue") of the intervals from the one containing ``since`` to
        those starting before ``until``, sorted by interval then queue; the log's tail is folded in first unless ``catch_up`` is false.
        ``fcr``, ``wrap_up`` and agent time are empty/zero (see the module docstring)."""
        if catch_up:
            self.catch_up()
        elif not self._loaded:
            self._load()
        low = -2**62 if since is None else self.config.interval_start(since)
        high = 2**62 if until is None else until
        cols = ", ".join(_SUMS)
        tallies: dict[tuple[int, str], _Tally] = {}
        for row in self.db.conn.execute(
                f"SELECT interval_start, queue, {cols}, longest_wait FROM kpi_rollup "
                "WHERE config = ? AND interval_start >= ? AND interval_start < ?",
                (self.key, low, high)):
            tally = tallies[(int(row[0]), str(row[1]))] = _Tally()
            for name, value in zip(_SUMS, row[2:], strict=False):
                setattr(tally, name, value)
            tally.longest_wait = row[-1]
        for call in self._open.values():
            start = self.config.interval_start(call.entered_at)
            if call.answered_at is None and low <= start < high:
                tally = tallies.setdefault((start, call.queue), _Tally())
                tally.offered += 1
                tally.waiting += 1
                tally.ring_no_answer += call.rings
        return [tallies[k].row("queue", k[1], k[0]) for k in sorted(tallies)]


__all__ = ["FLUSH_ROWS", "EventError", "QueueRollup", "RollupError", "config_key"]
