"""The outbox relay: the edge agent's main loop.

One SiteLink stream at a time over one channel. On each new stream the agent waits for the
cloud's first Ack and sends every event above it, in seq order, at most ``max_in_flight``
events and ``window_bytes`` payload bytes ahead of the acknowledgements, a page of ``batch``
events per EventBatch message when the cloud takes them; each Ack (the highest of those queued)
deletes the outbox rows up to it and records it in ``link_state`` in one short transaction.
Nothing is deleted before the cloud acknowledged it, so a crash of either side loses nothing;
what was sent but not acknowledged is sent again and the cloud absorbs the duplicate
(docs/cloud.md, "Ingest semantics").

A stream that owes the agent an answer (events in flight, or the Hello unanswered) and brings
nothing for ``silence_s`` is ended and counted lost since the cloud was last heard: a path that
black-holes traffic never fails the stream by itself. The cloud repeats its Ack while a link is
quiet, so a live cloud is never silent that long.

Every stream opens with a Hello (the site's last seq, running config version and newest
confirmed backup). Commands from the cloud: a ConfigVersion is verified and applied (or refused)
by ``edge_agent.config_apply`` and answered with ConfigApplied; a BackupRequest wakes the
backup worker (``edge_agent.backup``), which also backs up on its own schedule.

The agent's own connection to the site database writes only outbox deletions, the
``link_state`` row and its own ``edge_*`` tables, each in a short transaction with a busy
timeout, so the appliance never waits long on it.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import sqlite_utils
from cryptography import x509

from appliance import eventlog
from appliance.log import kv
from appliance.store import schema_version
from edge_agent.backup import BackupWorker, last_backup
from edge_agent.channel import (
    WITHHELD_KIND,
    EventBatcher,
    column_messages,
    event_message,
    pb,
    pb_grpc,
    secure_channel,
    withheld_payload,
)
from edge_agent.config import EdgeConfig
from edge_agent.config_apply import apply_config, running_config_version
from edge_agent.link_state import LinkMonitor, Observation, State

log = logging.getLogger("edgecc.edge_agent")

BUSY_TIMEOUT_S = 5.0
"""How long a write of ours waits for the appliance's lock before trying again later."""
SCHEMA_NEEDED = 2
"""Migration that created the event log, outbox and link_state."""
AGENT_VERSION = "edgecc-edge-agent 0.1"
OUTBOX_SCAN_SPACING = 20.0
"""The outbox is summed again no sooner than this many times the last sum's duration."""
ACK_RECORD_INTERVAL_S = 0.1
"""While events are in flight, acks are recorded (outbox rows deleted, fsynced) at most this
often: the cloud acknowledges every batch, and one site transaction per batch would halve the
relay's rate."""


class AgentError(Exception):
    """The agent cannot run with these files (missing certificate, wrong site); exit 1."""


@dataclass
class _Counters:
    acked_seq: int = 0
    dropped_events: int = 0
    dropped_bytes: int = 0


class _Stream:
    """One SiteLink call: a queue feeds the request side, a thread drains the response side."""

    def __init__(self, stub: Any, deadline_s: float) -> None:
        self.outgoing: queue.Queue[Any] = queue.Queue()
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        # wait_for_ready: the call waits for the channel, which reconnects with its backoff.
        self.call = stub.SiteLink(self._requests(), wait_for_ready=True, timeout=deadline_s)
        self._reader = threading.Thread(target=self._read, name="site-link-reader", daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[Any]:
        while True:
            message = self.outgoing.get()
            if message is None:
                return
            yield message

    def _read(self) -> None:
        try:
            for message in self.call:
                self.inbox.put(("message", message))
        except grpc.RpcError as exc:
            self.inbox.put(("error", exc))
        else:
            self.inbox.put(("end", None))

    def send(self, message: Any) -> None:
        self.outgoing.put(message)

    def close(self) -> None:
        self.call.cancel()
        self.outgoing.put(None)
        self._reader.join(5.0)


class EdgeAgent:
    """Relays the site's outbox to the cloud and keeps ``link_state`` up to date."""

    def __init__(
        self, config: EdgeConfig, *, stop: threading.Event | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.stop = stop or threading.Event()
        self.clock = clock
        self.cloud = config.cloud
        try:
            self._ca = config.ca_cert.read_bytes()
            self._key = config.key.read_bytes()
            self._cert = config.certificate.read_bytes()
        except OSError as exc:
            raise AgentError(
                f"cannot read the site's credentials ({exc}); enrol first: `edgecc edge-agent "
                f"enrol --site-dir {config.site_dir} ...`"
            ) from None
        common = x509.load_pem_x509_certificate(self._cert).subject.get_attributes_for_oid(
            x509.NameOID.COMMON_NAME
        )
        self.site_id = str(common[0].value) if common else ""
        if self.site_id != config.site_id:
            raise AgentError(
                f"the certificate is for site {self.site_id!r} but site.yaml says "
                f"{config.site_id!r}: enrol again with a token for {config.site_id!r}"
            )
        self.monitor = LinkMonitor(
            degraded_after_s=self.cloud.degraded_after_s,
            offline_after_s=self.cloud.offline_after_s, now=clock(),
        )
        self.db: sqlite_utils.Database | None = None
        self.counters = _Counters()
        self._high_water = 0  # highest ack ever seen: rows at or below it were shipped before
        self._linked = False
        self._lost_at: float | None = None
        self._reason = "not connected yet"
        self._renew = False  # the last stream ended at its deadline: open the next at once
        self._problem = ""
        self._next_state_at = 0.0
        self._state_written: State | None = None
        self._acks_beyond_log = False
        self._last_seen: tuple[Any, ...] = ()
        self._batches = False  # the cloud's first Ack of the stream says it takes EventBatch
        self._columns = False  # ... and EventColumns
        self._sent: collections.deque[tuple[int, int]] = collections.deque()  # (seq, bytes)
        self._sent_bytes = 0
        self._recorded_ack = 0  # the ack whose outbox rows are deleted and noted in link_state
        self._ack_recorded_at = 0.0
        self._outbox_sum: int | None = None  # see _outbox_bytes
        self._outbox_sum_due = 0.0
        self.backups: BackupWorker | None = None

    # ------------------------------------------------------------------ database

    def _open_db(self) -> sqlite_utils.Database | None:
        """Our own connection, once the appliance created the schema; None until then."""
        path = self.config.database
        if not path.exists():
            self._reason = f"site database {path} does not exist yet"
            return None
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        db = sqlite_utils.Database(conn)
        try:
            # The appliance chose WAL (kept in the file); acks we record must survive power loss.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            version = schema_version(db)
        except sqlite3.Error as exc:
            conn.close()
            self._reason = f"site database {path} unreadable: {exc}"
            return None
        if version < SCHEMA_NEEDED:
            conn.close()
            self._reason = f"site database {path} has no event log yet (start the appliance)"
            return None
        return db

    def _restore_counters(self, db: sqlite_utils.Database) -> None:
        saved = eventlog.read_link_state(db)
        if saved is not None:
            self.counters = _Counters(saved.acked_seq, saved.dropped_events, saved.dropped_bytes)
            self._high_water = saved.acked_seq
            self._recorded_ack = saved.acked_seq
        bound = eventlog.bound_site(db)
        if bound is not None and bound != self.site_id:
            raise AgentError(
                f"the site database's event log belongs to site {bound!r}, the certificate to "
                f"{self.site_id!r}"
            )

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        """Relay until ``stop`` is set. Raises AgentError for a misconfigured site."""
        log.info(kv(event="edge_agent_started", site=self.site_id, cloud=self.cloud.address,
                    database=self.config.database))
        while self.db is None and not self.stop.is_set():
            self.db = self._open_db()
            if self.db is None:
                log.warning(kv(event="waiting_for_database", reason=self._reason))
                self.stop.wait(2.0)
        if self.db is None:
            return
        self._restore_counters(self.db)
        channel = secure_channel(self.cloud.address, self.cloud, self._ca, self._key, self._cert)
        stub = pb_grpc.BridgeStub(channel)
        delay = self.cloud.reconnect.initial_ms / 1000.0
        self.backups = BackupWorker(self.config, stub, self._ca, stop=self.stop, clock=self.clock)
        self.backups.start()
        try:
            while not self.stop.is_set():
                started = self.clock()
                linked = self._session(stub)
                if self.stop.is_set():
                    break
                if self._renew:  # the stream reached its deadline: no backoff
                    self._renew = False
                    continue
                # Streams that fail at once (refused, revoked) must not spin: back off too.
                if linked and self.clock() - started > delay:
                    delay = self.cloud.reconnect.initial_ms / 1000.0
                wait = delay * random.uniform(0.8, 1.2)
                delay = min(delay * 1.6, self.cloud.reconnect.max_ms / 1000.0)
                self._idle(wait)
        finally:
            self._linked = False
            self._reason = "edge agent stopped"
            self._lost_at = None
            self._tick(force=True)
            self.stop.set()  # the backup worker stops with us
            self.backups.join(10.0)
            channel.close()
            self.db.conn.close()
            log.info(kv(event="edge_agent_stopped", site=self.site_id))

    def _idle(self, seconds: float) -> None:
        """Wait before the next stream, keeping the state fresh."""
        until = self.clock() + seconds
        while not self.stop.is_set():
            left = until - self.clock()
            if left <= 0:
                return
            self._tick()
            self.stop.wait(min(left, self.cloud.poll_interval_s))

    def _session(self, stub: Any) -> bool:
        """One SiteLink stream until it ends; True when it was linked (got its first Ack)."""
        stream = _Stream(stub, self.cloud.stream_deadline_s)
        opened = self.clock()
        sent_upto: int | None = None  # None until the first Ack says where to resume
        was_linked = False
        self._sent.clear()
        self._sent_bytes = 0
        try:
            stream.send(self._hello())
            heard_at = self.clock()  # the Hello is owed an Ack from here
            while not self.stop.is_set():
                try:
                    kind, item = stream.inbox.get(timeout=self.cloud.poll_interval_s)
                except queue.Empty:
                    kind, item = "idle", None
                if kind == "message":
                    heard_at = self.clock()
                    body = item.WhichOneof("body")
                    if body == "ack":
                        # Acks queued right behind this one supersede it: one transaction
                        # (and one fsync) records the highest.
                        seq = max(item.ack.seq, _queued_acks(stream))
                        first = sent_upto is None
                        if sent_upto is None:
                            sent_upto = seq
                            self._batches = item.ack.batches
                            self._columns = item.ack.columns
                            was_linked = self._linked = True
                            self._lost_at = None
                            self._reason = ""
                            log.info(kv(event="link_up", site=self.site_id, ack=seq,
                                        batches=self._batches, columns=self._columns))
                        if first or seq != self.counters.acked_seq:  # not a heartbeat
                            self._on_ack(seq, force=first)
                        else:  # the cloud's repeated Ack: answer, so it hears us too
                            stream.send(pb.SiteMessage(heartbeat=pb.Heartbeat(acked_seq=seq)))
                        # Held events of ours the cloud already had: no need to send them again.
                        sent_upto = max(sent_upto, seq)
                    elif body == "config":
                        stream.send(self._apply_config(item.config))
                    elif body == "backup_request":
                        request = item.backup_request
                        log.info(kv(event="backup_requested", site=self.site_id,
                                    request=request.request_id, reason=request.reason))
                        if self.backups is not None:
                            self.backups.request(f"cloud: {request.reason or request.request_id}")
                    else:
                        log.info(kv(event="command_ignored", site=self.site_id, body=body))
                elif kind in ("error", "end"):
                    if (was_linked and item is not None
                            and item.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                            and self.clock() - opened >= self.cloud.stream_deadline_s * 0.9):
                        # The stream's own deadline, not a fault: a new one at once, from the
                        # last ack; the link is not counted lost meanwhile.
                        log.info(kv(event="link_renewed", site=self.site_id,
                                    ack=self.counters.acked_seq))
                        self._renew = True
                        return was_linked
                    self._link_lost(item)
                    return was_linked
                # Liveness: a path that swallows everything (sockets open, nothing forwarded)
                # never fails the stream, and gRPC's keepalive may not see it either. The cloud
                # answers every Hello and batch, and repeats its Ack while a link is quiet, so
                # a stream that owes us an answer and stays silent is dead.
                owed = sent_upto is None or sent_upto > self.counters.acked_seq
                silent = self.clock() - heard_at
                if owed and silent >= self.cloud.silence_s:
                    self._link_lost(None, reason=(
                        f"nothing from the cloud for {silent:.0f} s "
                        f"(silence_s {self.cloud.silence_s:g})"), at=heard_at)
                    return was_linked
                if sent_upto is not None:
                    sent_upto = self._feed(stream, sent_upto)
                self._record_ack()  # an ack held back by the interval, once due
                self._tick()
        finally:
            stream.close()
            self._record_ack(force=True)
        return was_linked

    def _hello(self) -> Any:
        """What the site has, for the cloud to record and to decide what to send."""
        db = self._require_db()
        hello = pb.Hello(site_id=self.site_id, agent_version=AGENT_VERSION)
        try:
            hello.last_seq = eventlog.last_seq(db)
            hello.config_version = running_config_version(db)
            backup = last_backup(db)
        except sqlite3.OperationalError as exc:
            log.warning(kv(event="hello_incomplete", site=self.site_id, error=exc))
            return pb.SiteMessage(hello=hello)
        if backup is not None and backup.completed_at is not None:
            hello.last_backup_id = backup.backup_id
            hello.last_backup_at.FromNanoseconds(int(backup.completed_at * 1e9))
        return pb.SiteMessage(hello=hello)

    def _apply_config(self, config: Any) -> Any:
        """Apply a pushed ConfigVersion (or refuse it) and return the ConfigApplied answer."""
        result = apply_config(
            self.config.site_dir, self._require_db(), ca_pem=self._ca, site_id=self.site_id,
            version=config.version, text=config.yaml, signature=config.signature,
            now=self.clock(),
        )
        return pb.SiteMessage(config_applied=pb.ConfigApplied(
            version=result.version, ok=result.ok, error=result.error
        ))

    def _link_lost(
        self, error: grpc.RpcError | None, *, reason: str | None = None, at: float | None = None
    ) -> None:
        if reason is None:
            reason = ("the cloud ended the stream" if error is None
                      else f"{error.code().name}: {error.details()}")
        if self._linked:
            # A silent link was lost when the cloud was last heard, not when it was noticed.
            self._lost_at = self.clock() if at is None else at
        self._linked = False
        self._reason = reason
        log.warning(kv(event="link_down", site=self.site_id, reason=reason))

    # ------------------------------------------------------------------ acks and sending

    def _on_ack(self, seq: int, *, force: bool = False) -> None:
        """Take the cloud's ack ``seq``: move the window, record it (``_record_ack``)."""
        db = self._require_db()
        last = _highest_assigned_seq(db)
        if seq > last:
            # The cloud holds more of this site than the log: a re-created site database would
            # see its new events absorbed as duplicates. Say so loudly. (`edgecc restore` moves
            # the log's counter past the cloud's ack, so a restored site is not flagged.)
            self._acks_beyond_log = True
            log.error(kv(event="ack_beyond_log", site=self.site_id, ack=seq, last_seq=last))
        else:
            self._acks_beyond_log = False
        if seq < self.counters.acked_seq:
            log.error(kv(event="ack_went_back", site=self.site_id, ack=seq,
                         previous=self.counters.acked_seq))
        while self._sent and self._sent[0][0] <= seq:
            self._sent_bytes -= self._sent.popleft()[1]
        # The window moves at once; the outbox rows go when the ack is recorded (below).
        self.counters.acked_seq = seq
        self._high_water = max(self._high_water, seq)
        self._record_ack(force=force)

    def _record_ack(self, *, force: bool = False) -> None:
        """Delete the acknowledged outbox rows and note the ack in ``link_state``.

        One transaction (and fsync) per ``ACK_RECORD_INTERVAL_S`` while events are in flight,
        at once when none are or when ``force``d (an ack already recorded is not written again).
        Deleting late is safe: the rows only wait, and after a crash they are sent again and the
        cloud absorbs them; deleting early never happens. Busy beyond the timeout: the rows stay
        and a later ack deletes them.
        """
        seq = self.counters.acked_seq
        now = self.clock()
        if seq == self._recorded_ack or (
                not force and self._sent and now - self._ack_recorded_at < ACK_RECORD_INTERVAL_S):
            return
        db = self._require_db()
        try:
            with eventlog.transaction(db):
                # One range delete (the outbox's key is seq) and the ack's own fields of the
                # state row: summing the whole outbox here made each Ack cost O(backlog);
                # _tick rewrites the full row at the state interval.
                deleted = eventlog.acknowledge(db, seq)
                eventlog.write_link_state(
                    db, self._ack_snapshot(db, seq, eventlog.last_seq(db))
                )
        except sqlite3.OperationalError as exc:
            log.warning(kv(event="ack_not_recorded", site=self.site_id, ack=seq, error=exc))
            return
        self._recorded_ack, self._ack_recorded_at = seq, now
        if deleted:
            log.debug(kv(event="acked", site=self.site_id, ack=seq, deleted=deleted))

    def _feed(self, stream: _Stream, sent_upto: int) -> int:
        """Send events above ``sent_upto`` while the window allows; return the new mark.

        The window is bounded in events (``max_in_flight``) and in payload bytes
        (``window_bytes``); the outbox is read in pages of ``batch`` events by seq range, and a
        cloud that takes EventBatch messages gets each page as one or a few messages.
        """
        if self._columns:
            return self._feed_columns(stream, sent_upto)
        db = self._require_db()
        cloud = self.cloud
        batcher = EventBatcher(self.site_id) if self._batches else None
        try:
            while (sent_upto - self.counters.acked_seq < cloud.max_in_flight
                   and self._sent_bytes < cloud.window_bytes):
                room = cloud.max_in_flight - (sent_upto - self.counters.acked_seq)
                try:
                    page = eventlog.read_pending(db, sent_upto, min(cloud.batch, room))
                except sqlite3.OperationalError as exc:
                    log.warning(kv(event="outbox_unreadable", site=self.site_id, error=exc))
                    return sent_upto
                if not page:
                    return sent_upto
                for event in page:
                    if event.site_id != self.site_id:
                        self._problem = (
                            f"event {event.seq} belongs to site {event.site_id!r}, not "
                            f"{self.site_id!r}; relay stopped there"
                        )
                        return sent_upto
                    # Rows at or below an ack ever received were shipped before; the cloud
                    # asks again only after losing them, so they go in full.
                    withheld = event.withheld and event.seq > self._high_water
                    if not withheld and not _sendable(event):
                        withheld = True
                        log.error(kv(event="event_withheld", site=self.site_id, seq=event.seq,
                                     reason="over the bridge's limits"))
                    if batcher is None:
                        stream.send(event_message(event, withheld=withheld,
                                                  site_id=self.site_id))
                        self._note_sent(event.seq, len(event.payload))
                    else:
                        full = batcher.add(event, withheld=withheld)
                        if full is not None:
                            stream.send(full)
                            self._note_sent(batcher.last_seq, batcher.bytes)
                    sent_upto = event.seq
                if batcher is not None:
                    # A page is sent whole: the cloud commits and acknowledges per message.
                    size, last = batcher.bytes, batcher.last_seq
                    rest = batcher.flush()
                    if rest is not None:
                        stream.send(rest)
                        self._note_sent(last, size)
        finally:
            if batcher is not None:
                size, last = batcher.bytes, batcher.last_seq
                rest = batcher.flush()
                if rest is not None:  # a page cut short (foreign event): what was read goes
                    stream.send(rest)
                    self._note_sent(last, size)
        return sent_upto

    def _feed_columns(self, stream: _Stream, sent_upto: int) -> int:
        """``_feed`` for a cloud that takes EventColumns: each page of the outbox goes up as
        columns (one message per ``BATCH_MESSAGE_BYTES`` of payloads), built from the rows as
        SQLite returns them, without an object per event.
        """
        db = self._require_db()
        cloud = self.cloud
        while (sent_upto - self.counters.acked_seq < cloud.max_in_flight
               and self._sent_bytes < cloud.window_bytes):
            room = cloud.max_in_flight - (sent_upto - self.counters.acked_seq)
            try:
                rows = db.conn.execute(_PAGE_SQL, (sent_upto, min(cloud.batch, room))).fetchall()
            except sqlite3.OperationalError as exc:
                log.warning(kv(event="outbox_unreadable", site=self.site_id, error=exc))
                return sent_upto
            if not rows:
                return sent_upto
            seqs, sites, kinds, occurred, payloads, unqueued = (list(c) for c in zip(*rows, strict=True))
            foreign = sites.count(self.site_id) != len(sites)
            if foreign:
                cut = next(i for i, site in enumerate(sites) if site != self.site_id)
                self._problem = (
                    f"event {seqs[cut]} belongs to site {sites[cut]!r}, not "
                    f"{self.site_id!r}; relay stopped there"
                )
                if not cut:
                    return sent_upto
                del seqs[cut:], kinds[cut:], occurred[cut:], payloads[cut:], unqueued[cut:]
            if any(unqueued) or not _columns_sendable(kinds, payloads):
                self._withhold(seqs, kinds, payloads, unqueued)
            for message, last, size in column_messages(self.site_id, seqs, kinds, payloads,
                                                       occurred):
                stream.send(message)
                self._note_sent(last, size)
            sent_upto = seqs[-1]
            if foreign:
                return sent_upto
        return sent_upto

    def _withhold(
        self, seqs: list[int], kinds: list[str], payloads: list[bytes], unqueued: list[int]
    ) -> None:
        """Put placeholders in the columns where ``_feed`` would send one (in place)."""
        for index, seq in enumerate(seqs):
            # Rows at or below an ack ever received were shipped before; the cloud asks again
            # only after losing them, so they go in full.
            hide = bool(unqueued[index]) and seq > self._high_water
            kind, payload = kinds[index], payloads[index]
            if not hide and not (1 <= len(kind) <= eventlog.MAX_KIND_CHARS
                                 and len(payload) <= eventlog.MAX_PAYLOAD_BYTES):
                hide = True
                log.error(kv(event="event_withheld", site=self.site_id, seq=seq,
                             reason="over the bridge's limits"))
            if hide:
                kinds[index], payloads[index] = WITHHELD_KIND, withheld_payload(kind)

    def _note_sent(self, seq: int, size: int) -> None:
        """Count ``size`` payload bytes in flight until ``seq`` is acknowledged."""
        self._sent.append((seq, size))
        self._sent_bytes += size

    def _ack_snapshot(self, db: sqlite_utils.Database, seq: int, last: int) -> eventlog.LinkState:
        """The state row with what an Ack changes (the rest as last written by _tick)."""
        previous = eventlog.read_link_state(db)
        if previous is None:
            return self._snapshot(db)
        return dataclasses.replace(previous, acked_seq=seq, lag_events=max(0, last - seq),
                                   updated_at=self.clock())

    # ------------------------------------------------------------------ quota and state

    def _tick(self, *, force: bool = False) -> None:
        """Apply the quota policy and write link_state when due or changed."""
        now = self.clock()
        # The outbox is summed and the row written at the state interval, or at once when the
        # link changed: a large backlog is not scanned on every poll.
        seen = (self._linked, self._lost_at, self._reason, self._problem, self._acks_beyond_log)
        if not force and seen == self._last_seen and now < self._next_state_at:
            return
        self._last_seen = seen
        db = self._require_db()
        quota_problem = ""
        try:
            lag_seconds = self._lag_seconds(db, now)
            held = self._outbox_bytes(db, force=force)
            if held > self.cloud.outbox_quota_bytes:
                before = (self.counters.dropped_events, self.counters.dropped_bytes)
                try:
                    # The drop and its count commit together: a crash cannot lose the count.
                    with eventlog.transaction(db):
                        dropped, dropped_bytes = eventlog.drop_for_quota(
                            db, self.cloud.outbox_quota_bytes
                        )
                        self.counters.dropped_events += dropped
                        self.counters.dropped_bytes += dropped_bytes
                        eventlog.write_link_state(db, self._snapshot(db, now=now, held=None))
                except BaseException:
                    self.counters.dropped_events, self.counters.dropped_bytes = before
                    raise
                if dropped:
                    log.warning(kv(event="outbox_dropped", site=self.site_id, events=dropped,
                                   bytes=dropped_bytes, quota=self.cloud.outbox_quota_bytes))
                    force = True
                    held = self._outbox_bytes(db, force=True)
        except sqlite3.OperationalError as exc:
            log.warning(kv(event="quota_check_failed", site=self.site_id, error=exc))
            return
        if held > self.cloud.outbox_quota_bytes:
            quota_problem = (
                f"outbox holds {held} bytes, over its quota of {self.cloud.outbox_quota_bytes}, "
                "and only events that are never dropped are left"
            )
        problem = self._problem or quota_problem
        if self._acks_beyond_log:
            problem = problem or (
                f"the cloud acknowledged seq {self.counters.acked_seq} beyond this site's log: "
                "was the site database restored or re-created?"
            )
        change = self.monitor.observe(
            Observation(linked=self._linked, lost_at=self._lost_at, lag_seconds=lag_seconds,
                        problem=problem, reason=self._reason),
            now,
        )
        if change.changed:
            log.info(kv(event="link_state", site=self.site_id, state=change.state.value,
                        detail=change.detail))
        if not (force or change.changed or now >= self._next_state_at):
            return
        try:
            eventlog.write_link_state(db, self._snapshot(db, detail=change.detail, now=now,
                                                         held=held))
        except sqlite3.OperationalError as exc:
            log.warning(kv(event="link_state_not_written", site=self.site_id, error=exc))
            return
        self._next_state_at = now + self.cloud.state_interval_s

    def _lag_seconds(self, db: sqlite_utils.Database, now: float) -> float:
        pending = eventlog.read_pending(db, self.counters.acked_seq, 1)
        if not pending:
            return 0.0
        first = pending[0]
        since = first.enqueued_at if first.enqueued_at is not None else first.occurred_at
        return max(0.0, now - since)

    def _outbox_bytes(self, db: sqlite_utils.Database, *, force: bool = False) -> int:
        """The outbox's payload bytes, summed again when forced or when the last sum is old.

        The sum reads the whole outbox (no running total is kept): with a backlog of a million
        events it takes a noticeable share of a core, so it is repeated only after
        ``OUTBOX_SCAN_SPACING`` times its own duration (at most 1/20 of the agent's time) and the
        state interval in between reuses it. The quota is enforced on a sum at most that old.
        """
        now = time.monotonic()
        if force or self._outbox_sum is None or now >= self._outbox_sum_due:
            self._outbox_sum = eventlog.outbox_bytes(db)
            self._outbox_sum_due = now + (time.monotonic() - now) * OUTBOX_SCAN_SPACING
        return self._outbox_sum

    def _snapshot(
        self, db: sqlite_utils.Database, *, detail: str | None = None, now: float | None = None,
        held: int | None = None,
    ) -> eventlog.LinkState:
        now = self.clock() if now is None else now
        acked = self.counters.acked_seq
        if detail is None:
            previous = eventlog.read_link_state(db)
            detail = previous.detail if previous is not None else ""
        return eventlog.LinkState(
            state=self.monitor.state.value, since=self.monitor.since, acked_seq=acked,
            lag_events=max(0, eventlog.last_seq(db) - acked),
            lag_seconds=self._lag_seconds(db, now), detail=detail,
            outbox_bytes=eventlog.outbox_bytes(db) if held is None else held,
            dropped_events=self.counters.dropped_events,
            dropped_bytes=self.counters.dropped_bytes, updated_at=now,
        )

    def _require_db(self) -> sqlite_utils.Database:
        assert self.db is not None
        return self.db


def _queued_acks(stream: _Stream) -> int:
    """Take the Acks waiting at the head of the stream's inbox; return the highest (0: none)."""
    highest = 0
    while True:
        with stream.inbox.mutex:
            pending = stream.inbox.queue
            if not (pending and pending[0][0] == "message"
                    and pending[0][1].WhichOneof("body") == "ack"):
                return highest
        kind, item = stream.inbox.get_nowait()  # only this thread takes from the inbox
        highest = max(highest, item.ack.seq)


_PAGE_SQL = (
    # eventlog.read_pending's page as plain columns: the payload as bytes straight from SQLite,
    # and 1 where the event has no outbox row (withheld).
    "SELECT e.seq, e.site_id, e.kind, e.occurred_at, CAST(e.payload AS BLOB), o.seq IS NULL "
    "FROM events AS e LEFT JOIN outbox AS o ON o.seq = e.seq "
    "WHERE e.seq > ? ORDER BY e.seq LIMIT ?"
)


def _highest_assigned_seq(db: sqlite_utils.Database) -> int:
    """The highest seq the event log has given out: its newest event, or the AUTOINCREMENT
    counter when that is higher (a restored log continues above the cloud's events)."""
    row = db.conn.execute(
        "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events), 0),"
        " COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))"
    ).fetchone()
    return int(row[0])


def _columns_sendable(kinds: list[str], payloads: list[bytes]) -> bool:
    """Every event of the page within the cloud's limits (checked in C, column by column)."""
    sizes = list(map(len, kinds))
    return (min(sizes) >= 1 and max(sizes) <= eventlog.MAX_KIND_CHARS
            and max(map(len, payloads)) <= eventlog.MAX_PAYLOAD_BYTES)


def _sendable(event: eventlog.PendingEvent) -> bool:
    """Within the cloud's limits (an invalid event would end the stream on every retry)."""
    return 1 <= len(event.kind) <= eventlog.MAX_KIND_CHARS and (
        len(event.payload) <= eventlog.MAX_PAYLOAD_BYTES
    )


__all__ = ["AgentError", "EdgeAgent", "pb"]
