"""Backups of the sites on the cloud's disk: resumable uploads, SHA-256 check, retention.

Layout: ``ROOT/<site_id>/<backup_id>.part`` while uploading, ``ROOT/<site_id>/<backup_id>.bak``
once complete. The store records each backup and its committed offset: a chunk is first written
and fsynced, then its end becomes the committed offset. On resume the partial file is cut back
to the committed offset, so bytes written but never committed (a crash between the two steps)
are overwritten, never trusted.

The content is opaque: sites encrypt their backups before upload. The one thing the cloud
reads is a bundle's header, for ``issue_restore_token``: the site key sealed for the cloud CA
(docs/backups.md, "Trust model").
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_bridge.store import BackupRecord, CloudStore, make_token

if TYPE_CHECKING:
    from cloud_bridge.ca import CertificateAuthority

CHUNK_LIMIT = 1024 * 1024
"""Largest piece of data one chunk may carry (1 MiB)."""

BACKUP_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

_HASH_BLOCK = 1024 * 1024


class BackupError(Exception):
    """A backup operation was refused; ``kind`` says why, for the RPC layer to map."""

    INVALID = "invalid"
    OFFSET = "offset"
    EXISTS = "exists"
    DIGEST = "digest"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"

    def __init__(self, kind: str, message: str, *, committed: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.committed = committed


def check_backup_id(backup_id: str) -> str:
    """Return ``backup_id`` if valid, else raise BackupError(INVALID)."""
    if not BACKUP_ID_RE.match(backup_id):
        raise BackupError(
            BackupError.INVALID,
            f"invalid backup id {backup_id!r}: 1-64 of A-Z a-z 0-9 . _ -, starting with a "
            "letter or digit",
        )
    return backup_id


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BackupStore:
    """The backup files of every site and their records in the cloud store.

    Blocking; the server runs it on the store's worker thread. ``keep`` complete backups per
    site are kept (oldest deleted first); one backup is at most ``max_bytes``.
    """

    def __init__(
        self,
        root: Path | str,
        store: CloudStore,
        *,
        keep: int = 7,
        max_bytes: int = 64 * 1024**3,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.store = store
        self.keep = keep
        self.max_bytes = max_bytes
        self._clock = clock or time.time
        self._progress = threading.Condition()
        self._committed: dict[tuple[str, str], int] = {}

    def _dir(self, site_id: str) -> Path:
        return self.root / site_id

    def part_path(self, site_id: str, backup_id: str) -> Path:
        """Where an upload in progress is written."""
        return self._dir(site_id) / f"{backup_id}.part"

    def final_path(self, site_id: str, backup_id: str) -> Path:
        """Where a complete backup lives."""
        return self._dir(site_id) / f"{backup_id}.bak"

    # ------------------------------------------------------------ upload

    def status(self, site_id: str, backup_id: str) -> BackupRecord | None:
        """The record of a backup (partial or complete), or None."""
        return self.store.backup(site_id, check_backup_id(backup_id))

    def write_chunk(self, site_id: str, backup_id: str, offset: int, data: bytes) -> int:
        """Append ``data`` at ``offset``, which must be the committed offset; return the new one.

        An empty ``data`` only checks the offset (and creates the record).
        """
        check_backup_id(backup_id)
        if len(data) > CHUNK_LIMIT:
            raise BackupError(
                BackupError.TOO_LARGE, f"chunk of {len(data)} bytes over the {CHUNK_LIMIT} limit"
            )
        now = self._clock()
        record = self.store.backup(site_id, backup_id)
        if record is not None and record.complete:
            raise BackupError(
                BackupError.EXISTS, f"backup {backup_id} is already complete",
                committed=record.committed,
            )
        if record is None:
            record = self.store.begin_backup(site_id, backup_id, now)
        if offset != record.committed:
            raise BackupError(
                BackupError.OFFSET,
                f"chunk at offset {offset}, expected the committed offset {record.committed}",
                committed=record.committed,
            )
        end = offset + len(data)
        if end > self.max_bytes:
            raise BackupError(
                BackupError.TOO_LARGE, f"backup over the {self.max_bytes}-byte limit",
                committed=record.committed,
            )
        path = self.part_path(site_id, backup_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            # Anything past the committed offset was never acknowledged: drop it.
            os.ftruncate(fd, offset)
            if data:
                os.pwrite(fd, data, offset)
                os.fsync(fd)
        finally:
            os.close(fd)
        if data:
            self.store.commit_backup_offset(site_id, backup_id, end, now)
            with self._progress:
                self._committed[(site_id, backup_id)] = end
                self._progress.notify_all()
        return end

    def finish(self, site_id: str, backup_id: str, sha256: bytes) -> BackupRecord:
        """Check the SHA-256 of the whole upload and make it a complete backup.

        On a mismatch the partial upload is discarded (its bytes cannot be trusted) and
        BackupError(DIGEST) raised; the site uploads again from offset 0.
        """
        check_backup_id(backup_id)
        record = self.store.backup(site_id, backup_id)
        if record is None:
            raise BackupError(BackupError.NOT_FOUND, f"no upload of backup {backup_id}")
        if record.complete:
            raise BackupError(
                BackupError.EXISTS, f"backup {backup_id} is already complete",
                committed=record.committed,
            )
        if len(sha256) != 32:
            raise BackupError(BackupError.INVALID, "the final chunk must carry a 32-byte SHA-256")
        path = self.part_path(site_id, backup_id)
        digest = hashlib.sha256()
        if not path.exists():
            raise BackupError(BackupError.NOT_FOUND, f"partial file of backup {backup_id} is gone")
        # The complete backup is exactly the committed bytes.
        os.truncate(path, record.committed)
        with open(path, "rb") as handle:
            remaining = record.committed
            while remaining:
                block = handle.read(min(_HASH_BLOCK, remaining))
                if not block:
                    break
                digest.update(block)
                remaining -= len(block)
        if remaining or digest.digest() != sha256:
            path.unlink(missing_ok=True)
            self.store.delete_backup(site_id, backup_id)
            with self._progress:
                self._committed.pop((site_id, backup_id), None)
            raise BackupError(
                BackupError.DIGEST,
                f"SHA-256 mismatch for backup {backup_id}: got {digest.hexdigest()}, "
                f"expected {sha256.hex()}; upload discarded, start again at offset 0",
                committed=0,
            )
        final = self.final_path(site_id, backup_id)
        os.replace(path, final)
        with self._progress:
            self._committed.pop((site_id, backup_id), None)
        _fsync_dir(final.parent)
        self.store.complete_backup(site_id, backup_id, record.committed, sha256, self._clock())
        self.apply_retention(site_id)
        done = self.store.backup(site_id, backup_id)
        assert done is not None
        return done

    def wait_for_committed(
        self, site_id: str, backup_id: str, offset: int, timeout: float
    ) -> bool:
        """Block until an upload through this object commits ``offset``; False on timeout.

        Safe from any thread: it reads progress kept in memory, never the database.
        """
        key = (site_id, backup_id)
        with self._progress:
            return self._progress.wait_for(
                lambda: self._committed.get(key, -1) >= offset, timeout
            )

    # ------------------------------------------------------------ retention

    def apply_retention(self, site_id: str) -> list[str]:
        """Delete the complete backups of a site beyond the newest ``keep``; return their ids."""
        complete = [b for b in self.store.backups(site_id) if b.complete]
        removed: list[str] = []
        for old in complete[self.keep :]:
            self.final_path(site_id, old.backup_id).unlink(missing_ok=True)
            self.store.delete_backup(site_id, old.backup_id)
            removed.append(old.backup_id)
        return removed

    # ------------------------------------------------------------ restore

    def read(self, site_id: str, backup_id: str, offset: int = 0) -> Iterator[tuple[int, bytes]]:
        """(offset, data) chunks of at most CHUNK_LIMIT bytes of a complete backup."""
        check_backup_id(backup_id)
        record = self.store.backup(site_id, backup_id)
        if record is None or not record.complete:
            raise BackupError(BackupError.NOT_FOUND, f"no complete backup {backup_id}")
        if offset > record.committed:
            raise BackupError(
                BackupError.OFFSET,
                f"offset {offset} past the end of backup {backup_id} ({record.committed} bytes)",
            )
        return self._chunks(self.final_path(site_id, backup_id), offset, record.committed)

    @staticmethod
    def _chunks(path: Path, offset: int, size: int) -> Iterator[tuple[int, bytes]]:
        with open(path, "rb") as handle:
            handle.seek(offset)
            while offset < size:
                data = handle.read(min(CHUNK_LIMIT, size - offset))
                if not data:
                    raise BackupError(BackupError.NOT_FOUND, f"{path.name} is shorter than recorded")
                yield offset, data
                offset += len(data)


# ---------------------------------------------------------------- restore tokens

RESTORE_TOKEN_TTL_S = 24 * 3600


def issue_restore_token(
    backups: BackupStore, ca: CertificateAuthority, site_id: str, *,
    ttl: float = RESTORE_TOKEN_TTL_S, backup_id: str | None = None, now: float | None = None,
) -> str:
    """A restore token for ``edgecc restore --from-cloud``: enrolment token + site key + CA.

    Takes the site key from the escrow of ``backup_id`` (default: the newest complete backup),
    opened with the CA's private key, and stores a one-time enrolment token for the site
    valid ``ttl`` seconds. Raises BackupError(NOT_FOUND) when there is no such backup, and
    ``edge_agent.bundle.TamperedBundle`` when its escrow does not open.
    """
    from edge_agent.bundle import RestoreToken, escrow_of  # the bundle format's one home

    now = time.time() if now is None else now
    complete = [b for b in backups.store.backups(site_id) if b.complete]
    if backup_id is not None:
        complete = [b for b in complete if b.backup_id == check_backup_id(backup_id)]
    if not complete:
        which = f"backup {backup_id}" if backup_id else "complete backup"
        raise BackupError(BackupError.NOT_FOUND, f"site {site_id} has no {which} to restore")
    record = complete[0]  # newest first
    header = escrow_of(backups.final_path(site_id, record.backup_id))
    if header.site_id != site_id:
        raise BackupError(
            BackupError.INVALID,
            f"backup {record.backup_id} is a bundle of site {header.site_id!r}, not {site_id!r}",
        )
    site_key = ca.open_escrow(header.escrow, site_id)
    token = make_token()
    backups.store.add_token(site_id, token, now + ttl, now)
    return RestoreToken(token, site_id, site_key, ca.certificate_pem,
                        backup_id if backup_id else "").encode()


def restore_token_command(
    data_dir: Path | str, site_id: str, *, ttl: float = RESTORE_TOKEN_TTL_S,
    backup_id: str | None = None, db_url: str | None = None,
) -> str:
    """``edgecc cloud restore-token SITE``: open the data directory, issue, close."""
    from cloud_bridge.ca import CertificateAuthority
    from cloud_bridge.store import open_store

    directory = Path(data_dir)
    if not (directory / "ca" / "ca.key").exists():
        raise BackupError(BackupError.NOT_FOUND, f"{directory}: no cloud CA here (ca/ca.key)")
    ca = CertificateAuthority.load_or_create(directory / "ca")
    store = open_store(db_url or str(directory / "cloud.db"), data_dir=directory)
    try:
        backups = BackupStore(directory / "backups", store)
        return issue_restore_token(backups, ca, site_id, ttl=ttl, backup_id=backup_id)
    finally:
        store.close()
