"""The recordings of a site: encrypted files, their index in the site database, retention,
erasure and export of one caller's recordings.

Files live under the recordings directory as ``YYYY/MM/DD/<id>.ecr`` (see ``crypto`` for the
format); their plaintext is a stereo 16-bit WAV stream (caller left, agent right). The table
``recordings`` indexes them and holds each file's wrapped data key, which exists nowhere else:
retention and erasure destroy it (with SQLite's ``secure_delete`` on and the WAL checkpointed) so
the file, and any copy of it, can no longer be decrypted. Erasure and export write ``audit_log``
rows in the same transaction as their effect.

All methods block on SQLite and the file system: call them from a worker thread, never on the
event loop. Their writes are all-or-nothing and join a transaction already open (a savepoint:
e.g. a ``DatabaseWriter`` batch, where a call's recording and its record commit together). ``now`` is passed in; nothing here reads a clock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlite_utils

from appliance import audit as audit_chain
from appliance.dbwriter import atomic
from appliance.recording.crypto import (
    DEFAULT_SEGMENT_BYTES,
    IncompleteRecording,
    RecordingCryptoError,
    SegmentReader,
    SegmentWriter,
    TamperedRecording,
    new_data_key,
    seal_incomplete,
    unwrap_key,
    wrap_key,
)

__all__ = [
    "ActiveRecording",
    "ErasureReport",
    "ExportReport",
    "RecordingErased",
    "RecordingInfo",
    "RecordingStore",
    "UnknownRecording",
    "ensure_schema",
    "wav_header",
]

log = logging.getLogger("edgecc.recording")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS recordings (
        id TEXT PRIMARY KEY,
        call_id TEXT NOT NULL,
        caller TEXT,
        agent TEXT,
        queue TEXT,
        started_at REAL NOT NULL,
        ended_at REAL,
        path TEXT NOT NULL,
        wrapped_key BLOB,
        legal_hold INTEGER NOT NULL DEFAULT 0,
        erased_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS recordings_caller ON recordings (caller)",
    "CREATE INDEX IF NOT EXISTS recordings_started_at ON recordings (started_at)",
    """CREATE TABLE IF NOT EXISTS audit_log (
        id INTEGER PRIMARY KEY,
        at REAL NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT
    )""",
)


def ensure_schema(db: sqlite_utils.Database) -> None:
    """Create the ``recordings`` and ``audit_log`` tables if they do not exist (one transaction)."""
    conn = db.conn
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in SCHEMA:
            conn.execute(statement)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


class UnknownRecording(KeyError):
    """No recording with this id in the index."""


class RecordingErased(RecordingCryptoError):
    """The recording's key was destroyed (retention or erasure): it cannot be read."""


@dataclass(frozen=True)
class RecordingInfo:
    """One row of the index, without its key."""

    id: str
    call_id: str
    caller: str | None
    agent: str | None
    queue: str | None
    started_at: float
    ended_at: float | None
    path: str
    """Relative to the recordings directory."""
    legal_hold: bool
    erased_at: float | None


@dataclass(frozen=True)
class ErasureReport:
    """What ``erase_caller`` did."""

    erased: tuple[str, ...]
    """Recording ids whose keys were destroyed."""
    held: tuple[str, ...]
    """Recording ids kept because they are under legal hold."""
    audit_id: int


@dataclass(frozen=True)
class ExportReport:
    """What ``export_caller`` wrote."""

    directory: Path
    manifest: Path
    exported: tuple[str, ...]
    """Ids written as WAV files (an incomplete one is exported up to its last whole segment)."""
    failed: tuple[str, ...]
    """Ids that could not be read (tampered, missing file); the manifest says why."""
    audit_id: int


_COLUMNS = "id, call_id, caller, agent, queue, started_at, ended_at, path, legal_hold, erased_at"


def wav_header(rate: int, channels: int, data_bytes: int = 0xFFFFFFFF) -> bytes:
    """A 44-byte PCM16 WAV header; the default sizes mean 'still being written'."""
    block = 2 * channels
    riff = 0xFFFFFFFF if data_bytes == 0xFFFFFFFF else 36 + data_bytes
    return (
        b"RIFF" + struct.pack("<I", riff) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )


def _fix_wav_sizes(data: bytes) -> bytes:
    """Set the RIFF and data sizes from the actual length; drop a torn last sample frame."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return data
    pos, block = 12, 1
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if chunk_id == b"fmt " and pos + 24 <= len(data):
            block = max(1, struct.unpack_from("<H", data, pos + 20)[0])
        if chunk_id == b"data":
            body = len(data) - pos - 8
            body -= body % block
            out = bytearray(data[: pos + 8 + body])
            struct.pack_into("<I", out, 4, len(out) - 8)
            struct.pack_into("<I", out, pos + 4, body)
            return bytes(out)
        pos += 8 + size + (size & 1)
    return data


class ActiveRecording:
    """A recording being written: append PCM as it comes, ``close`` when the call ends."""

    def __init__(self, store: RecordingStore, info: RecordingInfo, writer: SegmentWriter) -> None:
        self._store = store
        self.info = info
        self.id = info.id
        self._writer = writer

    def write(self, pcm: bytes | bytearray | memoryview) -> None:
        """Append interleaved 16-bit PCM (caller left, agent right)."""
        self._writer.write(pcm)

    def close(self, ended_at: float) -> None:
        """Seal the final segment and record the end time."""
        if self._writer.closed:
            return
        self._writer.close()
        self._store._finish(self.id, ended_at)

    @property
    def closed(self) -> bool:
        return self._writer.closed


class RecordingStore:
    """The site's recordings: see the module docstring."""

    def __init__(
        self,
        db: sqlite_utils.Database,
        directory: str | Path,
        site_key: bytes,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = False,
    ) -> None:
        if len(site_key) != 32:
            raise ValueError("site key must be 32 bytes")
        self.db = db
        self.directory = Path(directory)
        self._site_key = site_key
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._active: set[str] = set()
        ensure_schema(db)

    # -- writing -----------------------------------------------------------------------------

    def start(
        self,
        *,
        call_id: str,
        caller: str | None,
        started_at: float,
        agent: str | None = None,
        queue: str | None = None,
        rate: int = 8000,
        channels: int = 2,
        recording_id: str | None = None,
        header: bool = True,
    ) -> ActiveRecording:
        """Open a new encrypted recording and index it; its WAV header is written at once
        (``header=False``: the caller writes a whole WAV file, header included)."""
        rid = recording_id or uuid.uuid4().hex
        day = datetime.fromtimestamp(started_at, UTC)
        relative = f"{day:%Y/%m/%d}/{rid}.ecr"
        path = self.directory / relative
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        data_key = new_data_key()
        wrapped = wrap_key(self._site_key, data_key, rid)
        writer = SegmentWriter.create(
            path, data_key, rid, segment_bytes=self._segment_bytes, fsync=self._fsync
        )
        try:
            with atomic(self.db.conn):
                self.db.conn.execute(
                    "INSERT INTO recordings (id, call_id, caller, agent, queue, started_at, path,"
                    " wrapped_key, legal_hold) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0)",
                    (rid, call_id, caller, agent, queue, started_at, relative, wrapped),
                )
        except BaseException:
            writer.abandon()
            path.unlink(missing_ok=True)
            raise
        if header:
            writer.write(wav_header(rate, channels))
        self._active.add(rid)
        log.info("recording_started recording=%s call_id=%s", rid, call_id)
        return ActiveRecording(self, self.get(rid), writer)

    def import_wav(
        self,
        source: str | Path,
        *,
        call_id: str,
        caller: str | None,
        started_at: float,
        ended_at: float,
        agent: str | None = None,
        queue: str | None = None,
        remove_source: bool = True,
    ) -> str:
        """Encrypt a finished plaintext WAV (e.g. the media engine's recorder output) into the
        store and return its recording id; the plaintext is removed unless told otherwise."""
        source = Path(source)
        with open(source, "rb") as f:
            if f.read(12)[8:12] != b"WAVE":
                raise ValueError(f"{source} is not a WAV file")
            f.seek(0)
            rec = self.start(call_id=call_id, caller=caller, started_at=started_at, agent=agent,
                             queue=queue, header=False)
            try:
                while chunk := f.read(1 << 16):
                    rec.write(chunk)
            except BaseException:
                rec._writer.abandon()
                self._active.discard(rec.id)
                raise
            rec.close(ended_at)
        if remove_source:
            source.unlink()
        return rec.id

    def _finish(self, rid: str, ended_at: float) -> None:
        self._active.discard(rid)
        with atomic(self.db.conn):
            self.db.conn.execute("UPDATE recordings SET ended_at = ? WHERE id = ?", (ended_at, rid))
        log.info("recording_finished recording=%s", rid)

    def recover(self, now: float) -> list[str]:
        """Seal recordings a crashed process left open (run at start); return their ids.

        Each keeps every whole segment its writer completed; only the torn tail is dropped.
        """
        rows = self.db.conn.execute(
            "SELECT id FROM recordings WHERE ended_at IS NULL AND erased_at IS NULL"
        ).fetchall()
        sealed = []
        for (rid,) in rows:
            if rid in self._active:
                continue
            path = self.path_of(rid)
            try:
                kept = seal_incomplete(path, self._data_key(rid), rid)
            except FileNotFoundError:
                # Crashed before its header reached the disk: nothing to keep, close the row.
                self._finish(rid, now)
                log.error("recording_recover_missing recording=%s path=%s", rid, path)
                continue
            except (RecordingCryptoError, OSError) as exc:
                log.error("recording_recover_failed recording=%s error=%s", rid, exc)
                continue
            self._finish(rid, now)
            log.warning("recording_recovered recording=%s kept_bytes=%d", rid, kept)
            sealed.append(rid)
        return sealed

    # -- reading -----------------------------------------------------------------------------

    def get(self, rid: str) -> RecordingInfo:
        row = self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM recordings WHERE id = ?", (rid,)
        ).fetchone()
        if row is None:
            raise UnknownRecording(rid)
        return _info(row)

    def by_caller(self, caller: str) -> list[RecordingInfo]:
        rows = self.db.conn.execute(
            f"SELECT {_COLUMNS} FROM recordings WHERE caller = ? ORDER BY started_at, id",
            (caller,),
        ).fetchall()
        return [_info(r) for r in rows]

    def path_of(self, rid: str) -> Path:
        return self.directory / self.get(rid).path

    def _data_key(self, rid: str) -> bytes:
        row = self.db.conn.execute(
            "SELECT wrapped_key FROM recordings WHERE id = ?", (rid,)
        ).fetchone()
        if row is None:
            raise UnknownRecording(rid)
        if row[0] is None:
            raise RecordingErased(f"recording {rid} was erased: its key no longer exists")
        return unwrap_key(self._site_key, bytes(row[0]), rid)

    def open_reader(self, rid: str) -> SegmentReader:
        """An authenticated reader of the plaintext WAV stream."""
        return SegmentReader.open(self.path_of(rid), self._data_key(rid), rid)

    def read_wav(self, rid: str, *, allow_incomplete: bool = False) -> bytes:
        """The recording as a WAV file with correct sizes.

        Raises TamperedRecording; IncompleteRecording for a file without its final segment
        unless ``allow_incomplete``, in which case the complete segments are returned.
        """
        chunks: list[bytes] = []
        with self.open_reader(rid) as reader:
            try:
                for chunk in reader:
                    chunks.append(chunk)
            except IncompleteRecording:
                if not allow_incomplete:
                    raise
        return _fix_wav_sizes(b"".join(chunks))

    # -- policy ------------------------------------------------------------------------------

    def set_legal_hold(self, rid: str, on: bool, *, actor: str, now: float) -> None:
        self.get(rid)
        with atomic(self.db.conn):
            self.db.conn.execute("UPDATE recordings SET legal_hold = ? WHERE id = ?", (int(on), rid))
            _audit(self.db, now, actor, "recording_legal_hold", f"recording={rid} on={int(on)}")

    def apply_retention(
        self, *, now: float, max_age: float, actor: str = "retention"
    ) -> list[str]:
        """Destroy recordings that ended more than ``max_age`` seconds ago, except held ones."""
        cutoff = now - max_age
        rows = self.db.conn.execute(
            "SELECT id FROM recordings WHERE erased_at IS NULL AND legal_hold = 0"
            " AND COALESCE(ended_at, started_at) < ? ORDER BY started_at",
            (cutoff,),
        ).fetchall()
        ids = [r[0] for r in rows if r[0] not in self._active]
        if ids:
            detail = f"max_age_s={max_age:g} recordings={len(ids)} ids={','.join(ids)}"
            self._destroy(ids, now=now, actor=actor, action="recording_retention", detail=detail,
                          clear_caller=False)
        return ids

    def erase_caller(
        self, caller: str, *, actor: str, now: float, include_held: bool = False
    ) -> ErasureReport:
        """Erase every recording of one caller number by destroying their keys.

        Recordings under legal hold are kept (and listed) unless ``include_held``. The caller
        number is removed from the erased rows too; the audit row names it only by a hash.
        """
        rows = [r for r in self.by_caller(caller) if r.erased_at is None]
        held = tuple(r.id for r in rows if r.legal_hold and not include_held)
        erased = tuple(r.id for r in rows if r.id not in held)
        detail = (
            f"caller_sha256={_digest(caller)} recordings={len(erased)} held={len(held)}"
            f" ids={','.join(erased)}"
        )
        audit_id = self._destroy(list(erased), now=now, actor=actor, action="recording_erasure",
                                 detail=detail, clear_caller=True)
        return ErasureReport(erased, held, audit_id)

    def _destroy(
        self, ids: list[str], *, now: float, actor: str, action: str, detail: str,
        clear_caller: bool,
    ) -> int:
        conn = self.db.conn
        paths = [self.path_of(rid) for rid in ids]
        # Overwrite freed pages so the old wrapped keys do not linger in the database file.
        previous = conn.execute("PRAGMA secure_delete").fetchone()[0]
        conn.execute("PRAGMA secure_delete=ON")
        try:
            with conn:
                for rid in ids:
                    conn.execute(
                        "UPDATE recordings SET wrapped_key = NULL, erased_at = ?"
                        + (", caller = NULL" if clear_caller else "") + " WHERE id = ?",
                        (now, rid),
                    )
                    if clear_caller:
                        # A voicemail's index row names the caller and what the flow learnt.
                        conn.execute(
                            "UPDATE voicemail_messages SET caller = NULL, variables = '{}'"
                            " WHERE recording_id = ?", (rid,))
                audit_id = _audit(self.db, now, actor, action, detail)
            # The WAL still holds the pages with the keys until a checkpoint copies them back.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.execute(f"PRAGMA secure_delete={int(previous)}")
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("%s actor=%s recordings=%d", action, actor, len(ids))
        return audit_id

    def export_caller(
        self, caller: str, destination: str | Path, *, actor: str, now: float
    ) -> ExportReport:
        """Write every readable recording of ``caller`` as WAV plus ``manifest.json`` (GDPR
        access). ``destination`` must not exist or be empty."""
        dest = Path(destination)
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        if any(dest.iterdir()):
            raise FileExistsError(f"export directory {dest} is not empty")
        entries = []
        exported: list[str] = []
        failed: list[str] = []
        for info in self.by_caller(caller):
            entry: dict[str, object] = asdict(info)
            del entry["path"]
            if info.erased_at is not None:
                entry["status"] = "erased"
                entries.append(entry)
                continue
            try:
                complete = True
                try:
                    wav = self.read_wav(info.id)
                except IncompleteRecording:
                    complete = False
                    wav = self.read_wav(info.id, allow_incomplete=True)
            except (TamperedRecording, RecordingCryptoError, OSError) as exc:
                entry["status"] = "unreadable"
                entry["error"] = str(exc)
                failed.append(info.id)
                log.error("recording_export_failed recording=%s error=%s", info.id, exc)
                entries.append(entry)
                continue
            name = f"{info.id}.wav"
            _write_private(dest / name, wav)
            entry.update(status="exported" if complete else "incomplete", file=name,
                         bytes=len(wav), sha256=hashlib.sha256(wav).hexdigest())
            exported.append(info.id)
            entries.append(entry)
        manifest = {
            "caller": caller,
            "exported_at": datetime.fromtimestamp(now, UTC).isoformat(),
            "recordings": entries,
        }
        manifest_path = dest / "manifest.json"
        _write_private(manifest_path, json.dumps(manifest, indent=2, sort_keys=True).encode())
        with atomic(self.db.conn):
            audit_id = _audit(
                self.db, now, actor, "recording_export",
                f"caller_sha256={_digest(caller)} exported={len(exported)} failed={len(failed)}",
            )
        return ExportReport(dest, manifest_path, tuple(exported), tuple(failed), audit_id)


def _info(row: tuple[object, ...]) -> RecordingInfo:
    rid, call_id, caller, agent, queue, started, ended, path, hold, erased = row
    return RecordingInfo(
        str(rid), str(call_id), caller, agent, queue, float(started),  # type: ignore[arg-type]
        None if ended is None else float(ended), str(path), bool(hold),  # type: ignore[arg-type]
        None if erased is None else float(erased),  # type: ignore[arg-type]
    )


def _audit(db: sqlite_utils.Database, now: float, actor: str, action: str, detail: str) -> int:
    # Inside the caller's transaction: the effect and its audit row commit together.
    return audit_chain.record(db.conn, now, actor, action, detail)


def _digest(caller: str) -> str:
    return hashlib.sha256(caller.encode("utf-8")).hexdigest()[:16]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
