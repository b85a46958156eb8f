"""``edgecc restore``: make a new machine the site again from its newest backup in the cloud.

    edgecc restore --from-cloud HOST:PORT --token TOKEN --site-dir NEW [--backup ID]
                   [--enrol-port N] [--progress]

The token comes from ``edgecc cloud restore-token SITE`` (docs/backups.md). Steps: enrol this
machine for the site (a certificate of its own), download the backup (newest, or ``--backup``)
resuming after a cut, check its size and SHA-256, open and verify the bundle with the site key
the token carries, and only then move the restored site into NEW. Everything happens in a
private scratch directory next to NEW: a refused, tampered or cut bundle leaves NEW as it was
(absent or empty). Exit status: 0 restored; 1 refused (token, cloud, bundle); 2 bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import secrets
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
BUNDLE_FILE = "bundle"
MAX_DOWNLOAD_ATTEMPTS = 20


class RestoreError(Exception):
    """The restore was refused or failed; NEW is unchanged."""


@dataclass(frozen=True)
class Restored:
    """What a restore produced."""

    site_id: str
    site_dir: Path
    backup_id: str
    size: int
    sha256: str
    cloud_seq: int
    """Highest seq of the site's event log the cloud holds (the log continues above it)."""
    restored_seq: int
    """Highest seq in the restored log: the cloud holds cloud_seq - restored_seq newer events."""
    placeholders: int = 0
    """Seqs above the cloud's ack (a gap, then events it holds beyond it) written into the
    restored log as placeholders, so that the ack can pass them (see ``_continue_log_after``)."""


class Progress:
    """A one-line progress bar on a stream (standard error), redrawn at most every 0.1 s."""

    def __init__(self, stream: TextIO | None, total: int, label: str) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.label = label
        self._drawn = 0.0

    def update(self, done: int, *, force: bool = False) -> None:
        """Show ``done`` bytes of the total."""
        if self.stream is None:
            return
        now = time.monotonic()
        if not force and now - self._drawn < 0.1:
            return
        self._drawn = now
        share = min(done / self.total, 1.0)
        bar = "#" * int(share * 30)
        self.stream.write(f"\r{self.label} [{bar:<30}] {share * 100:5.1f}% "
                          f"{done / 1e6:.1f}/{self.total / 1e6:.1f} MB")
        self.stream.flush()

    def done(self) -> None:
        """End the line."""
        if self.stream is not None:
            self.update(self.total, force=True)
            self.stream.write("\n")
            self.stream.flush()


def _split_address(address: str) -> tuple[str, int]:
    host, _, port_text = address.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RestoreError(f"--from-cloud must be HOST:PORT of the cloud's link port, got "
                           f"{address!r}")
    return host, int(port_text)


def _check_target(site_dir: Path) -> None:
    if site_dir.exists() and (not site_dir.is_dir() or any(site_dir.iterdir())):
        raise RestoreError(f"{site_dir} exists and is not an empty directory: restore into a "
                           "new or empty directory")


def restore_from_cloud(
    address: str, token_text: str, site_dir: Path | str, *, backup_id: str | None = None,
    enrol_port: int | None = None, progress: TextIO | None = None, timeout: float = 60.0,
) -> Restored:
    """Restore the site the token names into ``site_dir``; RestoreError leaves it unchanged."""
    from edge_agent.bundle import RestoreToken, TamperedBundle, unpack_bundle
    from edge_agent.channel import pb, pb_grpc, secure_channel
    from edge_agent.config import CloudSection, EdgeConfigError, read_site
    from edge_agent.enrol import EnrolmentError, request_certificate, write_credentials

    try:
        token = RestoreToken.decode(token_text)
    except ValueError as exc:
        raise RestoreError(str(exc)) from None
    host, link_port = _split_address(address)
    target = Path(site_dir)
    _check_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Same file system as NEW, so the last step is one rename.
    scratch = target.parent / f".{target.name}.restore-{secrets.token_hex(4)}"
    scratch.mkdir(mode=0o700)
    try:
        try:
            key_pem, reply, _ = request_certificate(
                host, enrol_port or link_port + 1, token.ca_certificate_pem,
                site_id=token.site_id, token=token.enrol_token, address=address,
                timeout=timeout,
            )
        except EnrolmentError as exc:
            raise RestoreError(str(exc)) from None
        section = CloudSection(address=address)
        with secure_channel(address, section, reply.ca_certificate_pem, key_pem,
                            reply.certificate_pem) as channel:
            stub = pb_grpc.BridgeStub(channel)
            chosen = backup_id or token.backup_id or None
            info = _choose_backup(stub, pb, chosen, timeout)
            bundle = scratch / BUNDLE_FILE
            _download(stub, pb, info, bundle, Progress(progress, info.size, "restore"), timeout)
            acked_seq, cloud_seq = _cloud_acked_seq(stub, pb, timeout)
        unpacked = scratch / "unpacked"
        try:
            unpack_bundle(bundle, token.site_key, unpacked, site_id=token.site_id)
        except TamperedBundle as exc:
            raise RestoreError(f"backup {info.backup_id} refused: {exc}") from None
        bundle.unlink()
        site = unpacked / "site"
        try:
            site_id, database = read_site(site)
        except EdgeConfigError as exc:
            raise RestoreError(f"the backup's site.yaml is unusable: {exc}") from None
        if site_id != token.site_id:
            raise RestoreError(f"the backup is of site {site_id!r}, the token of "
                               f"{token.site_id!r}")
        database.parent.mkdir(parents=True, exist_ok=True)
        os.replace(unpacked / "database" / "site.db", database)
        restored_seq = _continue_log_after(database, token.site_id, acked_seq, cloud_seq)
        # This machine's own cloud identity, then the site moves into place in one rename.
        write_credentials(site, key_pem, reply.certificate_pem, reply.ca_certificate_pem,
                          address)
        # rename(2) replaces an empty directory: NEW is never absent or half-filled.
        os.replace(site, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return Restored(token.site_id, target, info.backup_id, info.size, info.sha256.hex(),
                    max(cloud_seq, restored_seq), restored_seq,
                    max(0, cloud_seq - max(acked_seq, restored_seq)))


def _cloud_acked_seq(stub: Any, pb: Any, timeout: float) -> tuple[int, int]:
    """How far the cloud holds the site's event log: ``(ack, newest seq stored)``, from the
    first message of a SiteLink (its Ack; a cloud that does not say its newest seq: the ack).

    The stream carries nothing from us and ends at once (it does replace a live link of the old
    machine, which reconnects).
    """
    import grpc

    call = stub.SiteLink(iter(()), timeout=timeout)
    try:
        first = next(call)
    except (grpc.RpcError, StopIteration) as exc:
        raise RestoreError(f"cannot ask the cloud how far it holds the site's events: {exc}") from None
    finally:
        call.cancel()
    if first.WhichOneof("body") != "ack":
        raise RestoreError("the cloud's link did not start with an acknowledgement")
    return int(first.ack.seq), max(int(first.ack.seq), int(first.ack.newest_seq))


GAP_KIND = "site.restore.gap"
"""Kind of the placeholder events a restore writes where the cloud has no contiguous log."""


def _continue_log_after(database: Path, site_id: str, acked_seq: int, cloud_seq: int) -> int:
    """Make the restored log's next seq follow what the cloud holds; return the restored max.

    The events written after the backup are in the cloud, not in the backup: new events must
    not reuse their seqs (the cloud would drop them as duplicates). The log's AUTOINCREMENT
    counter moves past them; the seqs in between stay a gap in the local log only.

    The cloud's ack is its highest *contiguous* seq; it may hold events beyond a gap
    (``cloud_seq`` is its newest). The events of that gap were lost with the old machine, and
    the ack would never pass it: each seq above the ack (and above the backup) becomes a
    placeholder event without an outbox row, which the edge agent sends as a withheld
    placeholder. The cloud keeps what it holds (first copy wins) and fills the gap, so its ack
    reaches ``cloud_seq`` and the new machine's events are acknowledged after it.
    """
    import json
    import sqlite3

    conn = sqlite3.connect(database)
    try:
        with conn:
            row = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
            restored = int(row[0])
            first_gap = max(acked_seq, restored) + 1
            if cloud_seq >= first_gap:
                payload = json.dumps({"restored": True}, separators=(",", ":"))
                conn.executemany(
                    "INSERT INTO events (seq, site_id, kind, occurred_at, payload)"
                    " VALUES (?, ?, ?, ?, ?)",
                    ((seq, site_id, GAP_KIND, time.time(), payload)
                     for seq in range(first_gap, cloud_seq + 1)),
                )
            if cloud_seq > restored:
                counter = conn.execute(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'events'"
                ).fetchone()
                if counter is None:
                    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)",
                                 (cloud_seq,))
                elif int(counter[0]) < cloud_seq:
                    conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'events'",
                                 (cloud_seq,))
    except sqlite3.Error as exc:
        raise RestoreError(f"the backup's database is unusable: {exc}") from None
    finally:
        conn.close()
    return restored


def _choose_backup(stub: Any, pb: Any, backup_id: str | None, timeout: float) -> Any:
    import grpc

    try:
        listing = stub.ListBackups(pb.ListBackupsRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        raise RestoreError(f"cannot list the site's backups: {exc.code().name} "
                           f"{exc.details()}") from None
    backups = list(listing.backups)  # newest first
    if backup_id:
        backups = [b for b in backups if b.backup_id == backup_id]
    if not backups:
        which = f"backup {backup_id!r}" if backup_id else "complete backup"
        raise RestoreError(f"the cloud holds no {which} of this site")
    return backups[0]


def _download(stub: Any, pb: Any, info: Any, path: Path, progress: Progress,
              timeout: float) -> None:
    """Fetch a backup into ``path``, resuming from what was received; check size and SHA-256."""
    import grpc

    offset = 0
    digest = hashlib.sha256()
    expected: bytes = bytes(info.sha256)
    with open(path, "wb") as handle:
        for _attempt in range(MAX_DOWNLOAD_ATTEMPTS):
            try:
                for chunk in stub.Restore(
                    pb.RestoreRequest(backup_id=info.backup_id, offset=offset),
                    timeout=timeout * 10, wait_for_ready=True,
                ):
                    if chunk.offset != offset or offset + len(chunk.data) > info.size:
                        raise RestoreError(f"the cloud sent bytes at {chunk.offset}, expected "
                                           f"{offset}")
                    handle.write(chunk.data)
                    digest.update(chunk.data)
                    offset += len(chunk.data)
                    progress.update(offset)
                    if chunk.final:
                        expected = bytes(chunk.sha256) or expected
                        break
                if offset == info.size:
                    break
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED,
                                  grpc.StatusCode.UNAUTHENTICATED):
                    raise RestoreError(f"download refused: {exc.code().name} "
                                       f"{exc.details()}") from None
                continue  # cut: resume at ``offset``
        else:
            raise RestoreError(f"download of {info.backup_id} cut {MAX_DOWNLOAD_ATTEMPTS} times")
        handle.flush()
        os.fsync(handle.fileno())
    progress.done()
    if offset != info.size or digest.digest() != expected:
        raise RestoreError(f"backup {info.backup_id}: SHA-256 or size mismatch after download "
                           f"({offset} of {info.size} bytes)")


# ---------------------------------------------------------------- command line


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``restore`` to an ``add_subparsers()`` object; ``args.handler(args)`` runs it."""
    restore = commands.add_parser(
        "restore", help="make this machine the site again from its backup in the cloud",
        description="Enrols this machine for the site with a token from `edgecc cloud "
        "restore-token SITE`, downloads the newest backup (or --backup), verifies it and "
        "unpacks it into --site-dir, which must be new or empty. See docs/backups.md.",
    )
    restore.add_argument("--from-cloud", required=True, metavar="HOST:PORT",
                         help="the cloud's link port")
    restore.add_argument("--token", required=True, help="restore token (a secret)")
    restore.add_argument("--site-dir", type=Path, required=True,
                         help="new or empty directory for the restored site")
    restore.add_argument("--backup", default=None, metavar="ID", help="this backup, not the newest")
    restore.add_argument("--enrol-port", type=int, default=None,
                         help="the cloud's enrolment port (default: link port + 1)")
    restore.add_argument("--progress", action="store_true",
                         help="draw the progress bar even when standard error is not a terminal")
    restore.set_defaults(handler=_cmd_restore)
    return restore


def _cmd_restore(args: argparse.Namespace) -> int:
    show = args.progress or sys.stderr.isatty()
    try:
        done = restore_from_cloud(
            args.from_cloud, args.token, args.site_dir, backup_id=args.backup,
            enrol_port=args.enrol_port, progress=sys.stderr if show else None,
        )
    except RestoreError as exc:
        print(f"edgecc restore: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    print(f"restored site {done.site_id!r} from backup {done.backup_id} ({done.size} bytes, "
          f"sha256 {done.sha256}) into {done.site_dir}; start it with: edgecc appliance "
          f"--site-dir {done.site_dir} (check its ports first: docs/backups.md)")
    if done.cloud_seq > done.restored_seq:
        print(f"the cloud holds {done.cloud_seq - done.restored_seq} events of the site newer "
              f"than the backup (seq {done.restored_seq + 1} to {done.cloud_seq}); new events "
              f"continue at seq {done.cloud_seq + 1}")
    if done.placeholders:
        print(f"{done.placeholders} of those seqs are above the cloud's acknowledgement (a gap "
              f"it never received, lost with the old machine, and what it holds beyond): they "
              f"go up as placeholders so that its acknowledgement can pass them")
    return EXIT_OK


__all__ = ["Progress", "RestoreError", "Restored", "add_parser", "restore_from_cloud"]
