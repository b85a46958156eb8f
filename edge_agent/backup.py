"""Backups of the site: make a bundle, upload it resumably, keep the record in the site database.

``BackupWorker`` runs on a thread of its own next to the relay: every ``backup.interval_s``
(counted from the last backup the cloud confirmed) and whenever the cloud sends a
BackupRequest. One backup at a time; a request that arrives during a backup is served by a
new one right after.

The upload (``upload_file``) is resumable: it starts at the offset the cloud says it has
committed (BackupStatus) and keeps at most one chunk in flight, so a connection cut re-sends
at most the one chunk the cloud had not committed. The last chunk carries the SHA-256 of the
whole bundle; the cloud keeps the backup only when it matches.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import sqlite_utils
import yaml

from appliance.log import kv
from appliance.recording.crypto import SiteKeyError, load_site_key
from edge_agent.bundle import SCRATCH_DIRS, BundleError, make_bundle
from edge_agent.channel import pb
from edge_agent.config import SITE_FILE, EdgeConfig

log = logging.getLogger("edgecc.edge_agent")

BACKUP_DIR = SCRATCH_DIRS[0]
"""Where bundles wait for their upload, inside the site directory (mode 0700)."""
STATUS_TIMEOUT_S = 30.0
"""Bound on one BackupStatus call (it waits for the channel to reconnect)."""
UPLOAD_TIMEOUT_S = 600.0
"""Deadline of one UploadBackup stream: one that outlives it is cut like any other and resumes
from the cloud's committed offset (1 MiB chunks; a slow link goes on in the next stream)."""


class UploadError(Exception):
    """The cloud refused the upload for good (not a connection problem)."""


@dataclass(frozen=True)
class UploadResult:
    """What one ``upload_file`` achieved."""

    backup_id: str
    size: int
    sha256: bytes
    attempts: int
    """Upload streams opened (1 when nothing was cut)."""
    sent_bytes: int
    """Data bytes handed to gRPC, re-sent ones included."""


def file_sha256(path: Path) -> bytes:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1024 * 1024):
            digest.update(block)
    return digest.digest()


def _committed(stub: Any, backup_id: str, timeout: float) -> tuple[int, bool, bytes]:
    """(committed offset, complete, sha256) the cloud holds for ``backup_id``."""
    reply = stub.BackupStatus(pb.BackupStatusRequest(backup_id=backup_id), timeout=timeout,
                              wait_for_ready=True)
    complete = reply.state == pb.BackupStatusResponse.COMPLETE
    return int(reply.committed), complete, bytes(reply.sha256)


def upload_file(
    stub: Any, path: Path | str, backup_id: str, *, chunk_bytes: int = 1024 * 1024,
    stop: threading.Event | None = None, max_attempts: int = 100,
    retry_initial_s: float = 0.2, retry_max_s: float = 30.0,
    on_chunk: Callable[[int, int], None] | None = None,
    upload_timeout_s: float = UPLOAD_TIMEOUT_S,
) -> UploadResult:
    """Upload ``path`` as backup ``backup_id``, resuming from what the cloud committed.

    Connection problems are retried (exponential backoff, at most ``max_attempts`` streams);
    a refusal (bad id, too large, SHA-256 mismatch twice) raises UploadError. ``on_chunk``
    is called with (offset, size) before each chunk is handed to gRPC. Every stream has the
    deadline ``upload_timeout_s``; one that passes it is a cut, resumed like the others.
    """
    stop = stop or threading.Event()
    file = Path(path)
    size = file.stat().st_size
    sha256 = file_sha256(file)
    sent = 0
    delay = retry_initial_s
    digest_failures = 0
    progress = -1
    for attempt in range(1, max_attempts + 1):
        if stop.is_set():
            raise UploadError("stopped")
        counter = [0]
        try:
            committed, complete, stored = _committed(stub, backup_id, STATUS_TIMEOUT_S)
            if committed > progress:
                # A cut after progress is retried promptly; only a stuck upload backs off.
                delay, progress = retry_initial_s, committed
            if complete:
                if stored != sha256:
                    raise UploadError(
                        f"the cloud holds backup {backup_id} with another SHA-256"
                    )
                return UploadResult(backup_id, size, sha256, attempt, sent)
            if committed > size:
                raise UploadError(f"the cloud committed {committed} bytes of a {size}-byte file")
            receipt = stub.UploadBackup(
                _chunks(stub, file, backup_id, committed, size, sha256, chunk_bytes, stop,
                        counter, on_chunk),
                timeout=upload_timeout_s, wait_for_ready=True,
            )
            if receipt.complete:
                if bytes(receipt.sha256) != sha256:
                    raise UploadError(f"the cloud stored backup {backup_id} with another SHA-256")
                return UploadResult(backup_id, size, sha256, attempt, sent + counter[0])
            log.info(kv(event="backup_upload_paused", backup=backup_id,
                        committed=receipt.committed, sent=counter[0]))
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.DATA_LOSS:
                # The cloud discarded the upload; the file is ours and unchanged: once more.
                digest_failures += 1
                if digest_failures > 1:
                    raise UploadError(f"SHA-256 refused twice: {exc.details()}") from None
            elif code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                          grpc.StatusCode.ALREADY_EXISTS):
                raise UploadError(f"{code.name}: {exc.details()}") from None
            else:
                log.info(kv(event="backup_upload_cut", backup=backup_id, attempt=attempt,
                            code=code.name))
        finally:
            sent += counter[0]
        if stop.wait(delay):
            raise UploadError("stopped")
        delay = min(delay * 2, retry_max_s)
    raise UploadError(f"backup {backup_id} not uploaded after {max_attempts} attempts")


def _chunks(
    stub: Any, file: Path, backup_id: str, start: int, size: int, sha256: bytes,
    chunk_bytes: int, stop: threading.Event, counter: list[int],
    on_chunk: Callable[[int, int], None] | None,
) -> Iterator[Any]:
    """The request stream: chunks from ``start``, each only once the previous one is committed.

    UploadBackup answers only at the end, so BackupStatus tells when a chunk is durable; with
    one chunk in flight a cut costs at most that chunk.
    """
    offset = start
    with open(file, "rb") as handle:
        handle.seek(offset)
        while True:
            if offset > start:
                # Wait (bounded) until the cloud committed what we sent.
                deadline = time.monotonic() + STATUS_TIMEOUT_S
                try:
                    while _committed(stub, backup_id, STATUS_TIMEOUT_S)[0] < offset:
                        if stop.wait(0.002) or time.monotonic() > deadline:
                            return
                except grpc.RpcError:
                    return  # the link is gone: the upload call ends and is retried
            data = handle.read(min(chunk_bytes, size - offset))
            end = offset + len(data)
            last = end >= size
            if on_chunk is not None:
                on_chunk(offset, len(data))
            counter[0] += len(data)
            yield pb.BackupChunk(backup_id=backup_id, offset=offset, data=data, final=last,
                                 sha256=sha256 if last else b"")
            if last:
                return
            offset = end


# ---------------------------------------------------------------- the site's record


@dataclass(frozen=True)
class BackupRecord:
    """One row of ``edge_backups``."""

    backup_id: str
    reason: str
    started_at: float
    completed_at: float | None
    size: int | None
    sha256: str | None
    error: str | None


def last_backup(db: sqlite_utils.Database) -> BackupRecord | None:
    """The newest backup the cloud confirmed, or None (also when the table does not exist)."""
    try:
        row = db.execute(
            "SELECT backup_id, reason, started_at, completed_at, size, sha256, error "
            "FROM edge_backups WHERE completed_at IS NOT NULL ORDER BY completed_at DESC LIMIT 1"
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    return BackupRecord(*row) if row else None


def _record(db: sqlite_utils.Database, sql: str, args: tuple[Any, ...]) -> None:
    try:
        with db.conn:
            db.conn.execute(sql, args)
    except sqlite3.OperationalError as exc:
        log.warning(kv(event="backup_not_recorded", error=exc))


def site_key_path(site_dir: Path) -> Path:
    """``storage.site_key`` of site.yaml (default ``site.key``), resolved."""
    try:
        data = yaml.safe_load((site_dir / SITE_FILE).read_text(encoding="utf-8")) or {}
        name = ((data.get("storage") or {}).get("site_key")) or "site.key"
    except (OSError, yaml.YAMLError, AttributeError):
        name = "site.key"
    path = Path(str(name))
    return path if path.is_absolute() else site_dir / path


def new_backup_id(site_id: str, now: float) -> str:
    """A unique, sortable backup id: site, UTC time, random suffix."""
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{site_id[:36]}-{stamp}-{secrets.token_hex(3)}"


class BackupWorker:
    """Makes and uploads the site's backups on its own thread (scheduled and on request)."""

    def __init__(
        self, config: EdgeConfig, stub: Any, ca_pem: bytes, *, stop: threading.Event,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.settings = config.backup
        self.stub = stub
        self.ca_pem = ca_pem
        self.stop = stop
        self.clock = clock
        self._requests: queue.Queue[str] = queue.Queue(maxsize=16)
        self._thread = threading.Thread(target=self._run, name="backup", daemon=True)
        self._db: sqlite_utils.Database | None = None
        self._started = clock()
        self._retry_at = 0.0
        self._retry_delay = self.settings.retry_after_s

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the thread after ``stop`` was set."""
        self._thread.join(timeout)

    def request(self, reason: str) -> None:
        """Ask for a backup as soon as possible (never blocks; extra requests coalesce)."""
        with contextlib.suppress(queue.Full):
            self._requests.put_nowait(reason)

    def _open(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(str(self.config.database), timeout=5.0, check_same_thread=False)
        conn.execute("PRAGMA synchronous=FULL")
        return sqlite_utils.Database(conn)

    def _run(self) -> None:
        try:
            self._db = self._open()
        except sqlite3.Error as exc:
            log.error(kv(event="backup_worker_failed", error=exc))
            return
        try:
            # An upload interrupted by a restart of the agent is finished first.
            for leftover in self._leftovers():
                self._upload_leftover(leftover)
            while not self.stop.is_set():
                reason = self._next_reason()
                if reason is None:
                    continue
                # Coalesce requests queued meanwhile: one backup answers them all.
                while not self._requests.empty():
                    self._requests.get_nowait()
                self.run_once(reason)
        finally:
            self._db.conn.close()

    def _next_reason(self) -> str | None:
        interval = self.settings.interval_s
        wait = self.settings.poll_s
        if interval > 0:
            assert self._db is not None
            last = last_backup(self._db)
            if last is not None and last.completed_at is not None:
                due = last.completed_at + interval
            else:
                due = self._started + self.settings.first_after_s
            # A failed attempt is not repeated at once: it waits its (doubling) retry delay.
            due = max(due, self._retry_at)
            left = due - self.clock()
            if left <= 0:
                return "scheduled"
            wait = min(wait, left)
        try:
            return self._requests.get(timeout=wait)
        except queue.Empty:
            return None

    def _leftovers(self) -> list[Path]:
        directory = self.config.site_dir / BACKUP_DIR
        if not directory.is_dir():
            return []
        return sorted(directory.glob("*.bundle"))

    def _upload_leftover(self, path: Path) -> None:
        backup_id = path.name.removesuffix(".bundle")
        try:
            result = upload_file(self.stub, path, backup_id, chunk_bytes=self.settings.chunk_bytes,
                                 stop=self.stop)
        except (UploadError, OSError) as exc:
            log.warning(kv(event="backup_leftover_dropped", backup=backup_id, error=exc))
            if not self.stop.is_set():
                path.unlink(missing_ok=True)
            return
        self._completed(result)
        path.unlink(missing_ok=True)

    def run_once(self, reason: str) -> UploadResult | None:
        """Make one bundle and upload it; None (logged and recorded) when that failed."""
        assert self._db is not None
        now = self.clock()
        backup_id = new_backup_id(self.config.site_id, now)
        directory = self.config.site_dir / BACKUP_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / f"{backup_id}.bundle"
        _record(self._db, "INSERT INTO edge_backups (backup_id, reason, started_at) "
                "VALUES (?, ?, ?)", (backup_id, reason, now))
        log.info(kv(event="backup_started", backup=backup_id, reason=reason))
        try:
            site_key = load_site_key(self.config.site_dir,
                                     str(site_key_path(self.config.site_dir)))
            make_bundle(self.config.site_dir, self.config.database, path,
                        site_id=self.config.site_id, backup_id=backup_id, site_key=site_key,
                        ca_certificate_pem=self.ca_pem, now=now)
            result = upload_file(self.stub, path, backup_id,
                                 chunk_bytes=self.settings.chunk_bytes, stop=self.stop)
        except (SiteKeyError, BundleError, UploadError, OSError) as exc:
            self._retry_at = self.clock() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2,
                                    max(self.settings.interval_s, self.settings.retry_after_s))
            log.error(kv(event="backup_failed", backup=backup_id, error=exc,
                         retry_in_s=round(self._retry_at - self.clock(), 1)))
            _record(self._db, "UPDATE edge_backups SET error = ? WHERE backup_id = ?",
                    (str(exc)[:500], backup_id))
            if not self.stop.is_set():
                path.unlink(missing_ok=True)
            return None
        self._completed(result)
        path.unlink(missing_ok=True)
        return result

    def _completed(self, result: UploadResult) -> None:
        assert self._db is not None
        now = self.clock()
        self._retry_at = 0.0
        self._retry_delay = self.settings.retry_after_s
        _record(
            self._db,
            "INSERT INTO edge_backups (backup_id, reason, started_at, completed_at, size, sha256)"
            " VALUES (?, 'resumed', ?, ?, ?, ?) ON CONFLICT (backup_id) DO UPDATE SET "
            "completed_at = excluded.completed_at, size = excluded.size, "
            "sha256 = excluded.sha256, error = NULL",
            (result.backup_id, now, now, result.size, result.sha256.hex()),
        )
        log.info(kv(event="backup_stored", backup=result.backup_id, size=result.size,
                    attempts=result.attempts, sha256=result.sha256.hex()))


__all__ = ["BACKUP_DIR", "BackupRecord", "BackupWorker", "UploadError", "UploadResult",
           "file_sha256", "last_backup", "new_backup_id", "site_key_path", "upload_file"]
