"""Applying a config version pushed by the cloud: verify, stage, validate, swap, or refuse.

The order (docs/backups.md, "Config push"):

1. the ECDSA signature of the cloud CA over ``proto.config_signing_payload`` must verify with
   the CA certificate the site received at enrolment, for this site and this version;
2. the version must be newer than the running one (the same version again is answered ok,
   so a lost ConfigApplied does not turn into a refusal);
3. the YAML is written into a *staging copy* of the site (a scratch directory whose entries
   link to the site's files, with the new ``site.yaml``) and validated there with
   ``appliance.config.load_site``, exactly as the appliance reads it at start, with the paths
   it names resolved;
4. only then, under the database's write lock (``BEGIN IMMEDIATE``, the lock a local API edit
   takes too), the version is checked again, the running ``site.yaml`` is kept as
   ``site.yaml.prev``, the new file is moved into place with one ``rename`` (atomic: a crash
   leaves the old or the new file, never half) and the ``edge_config`` row is written; the
   lock is released by the commit.

Every outcome is a row of ``edge_config``; the running version is the highest row with
ok = 1. The appliance reads ``site.yaml`` when it starts: a new version takes effect at its
next start (it has no reload).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils
import yaml

from appliance.config import ConfigError, load_site
from appliance.log import kv
from appliance.store import running_config_version
from edge_agent.bundle import SCRATCH_DIRS
from edge_agent.config import SITE_FILE
from edge_agent.enrol import write_atomic
from proto import verify_config_signature

log = logging.getLogger("edgecc.edge_agent")

STAGING_DIR = SCRATCH_DIRS[1]
PREVIOUS_FILE = "site.yaml.prev"
MAX_CONFIG_BYTES = 256 * 1024
"""Largest site.yaml accepted (the cloud's push-config limit)."""


@dataclass(frozen=True)
class ConfigResult:
    """What became of one pushed version (sent back as ConfigApplied)."""

    version: int
    ok: bool
    error: str = ""


def _applied_digest(db: sqlite_utils.Database, version: int) -> str | None:
    try:
        row = db.execute(
            "SELECT sha256 FROM edge_config WHERE version = ? AND ok = 1", (version,)
        ).fetchone()
    except sqlite3.OperationalError:
        return None
    return str(row[0]) if row else None


def apply_config(
    site_dir: Path | str, db: sqlite_utils.Database, *, ca_pem: bytes, site_id: str,
    version: int, text: bytes, signature: bytes, now: float,
) -> ConfigResult:
    """Verify and apply one pushed ``site.yaml``; never raises for a bad push (ok = False).

    The version check, the file swap and the ``edge_config`` row are one ``BEGIN IMMEDIATE``
    transaction: a local edit (``appliance.config_edit``, which takes the same lock) cannot
    install a version between the check and the row, so two writers never both take the same
    version number nor leave a row that describes another file."""
    directory = Path(site_dir)
    digest = hashlib.sha256(text).hexdigest()
    # Everything slow (signature, YAML, the staged validation) runs before the lock; only the
    # version check is repeated under it.
    result = _check(directory, db, ca_pem, site_id, version, text, signature, digest)
    conn = db.conn
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        result = ConfigResult(version, False, f"cannot lock the site database, try again: "
                                              f"{exc}")
        log.warning(kv(event="config_refused", site=site_id, version=version,
                       error=result.error))
        return result
    running_text = _read_or_none(directory / SITE_FILE)
    swapped = False
    try:
        if result.ok:
            result = _swap_locked(directory, db, version, text, digest)
            swapped = result.ok and _read_or_none(directory / SITE_FILE) != running_text
        conn.execute(
            "INSERT INTO edge_config (version, received_at, ok, error, sha256) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (version) DO UPDATE SET "
            "received_at = excluded.received_at, ok = MAX(ok, excluded.ok), "
            "error = CASE WHEN ok = 1 THEN error ELSE excluded.error END, "
            "sha256 = CASE WHEN ok = 1 THEN sha256 ELSE excluded.sha256 END",
            (version, now, int(result.ok), result.error[:2000], digest),
        )
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        log.warning(kv(event="config_result_not_recorded", version=version, error=exc))
        if swapped:
            # No row, no version: the file goes back to what the database still says runs.
            _restore(directory, running_text)
            result = ConfigResult(version, False, f"the version could not be recorded: {exc}")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if swapped:
            _restore(directory, running_text)
        raise
    log.info(kv(event="config_applied" if result.ok else "config_refused", site=site_id,
                version=version, error=result.error or None))
    return result


def _check(
    directory: Path, db: sqlite_utils.Database, ca_pem: bytes, site_id: str, version: int,
    text: bytes, signature: bytes, digest: str,
) -> ConfigResult:
    """Every check of a push but the swap; ok when it may be installed."""
    if len(text) > MAX_CONFIG_BYTES:
        return ConfigResult(version, False, f"config of {len(text)} bytes over {MAX_CONFIG_BYTES}")
    try:
        signed = verify_config_signature(ca_pem, site_id, version, text, signature)
    except ValueError as exc:
        signed, reason = False, str(exc)
    else:
        reason = "the signature does not verify with the cloud CA for this site and version"
    if not signed:
        return ConfigResult(version, False, reason)
    refused = _version_refusal(db, version, digest)
    if refused is not None:
        return refused
    try:
        data = yaml.safe_load(text.decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        return ConfigResult(version, False, f"not valid YAML: {exc}")
    pushed_id = ((data or {}).get("site") or {}).get("id") if isinstance(data, dict) else None
    if pushed_id != site_id:
        return ConfigResult(version, False,
                            f"site.id is {pushed_id!r}, this site is {site_id!r}")
    problem = _validate_staged(directory, text)
    if problem:
        return ConfigResult(version, False, problem)
    return ConfigResult(version, True)


def _version_refusal(db: sqlite_utils.Database, version: int,
                     digest: str) -> ConfigResult | None:
    """None when ``version`` is newer than the running one; else the answer (ok when this
    very text is the running version: sent again because our answer was lost)."""
    running = running_config_version(db)
    if version == running and _applied_digest(db, version) == digest:
        return ConfigResult(version, True)
    if version <= running:
        return ConfigResult(version, False, f"version {version} is not newer than the running "
                                            f"version {running}")
    return None


def _swap_locked(directory: Path, db: sqlite_utils.Database, version: int, text: bytes,
                 digest: str) -> ConfigResult:
    """Inside the write transaction: check the version again, then swap the file in."""
    refused = _version_refusal(db, version, digest)
    if refused is not None:
        return ConfigResult(version, refused.ok, "" if refused.ok else refused.error)
    try:
        install_site_file(directory, text)
    except OSError as exc:
        return ConfigResult(version, False, f"cannot write {directory / SITE_FILE}: {exc}")
    return ConfigResult(version, True)


def _validate_staged(directory: Path, text: bytes) -> str:
    """Validate ``text`` as the site.yaml of a staging copy of the site; '' when valid."""
    staging = directory / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700)
    try:
        for entry in directory.iterdir():
            if entry.name in (SITE_FILE, PREVIOUS_FILE) or entry.name in SCRATCH_DIRS:
                continue
            # Links, not copies: the site's files (keys, database) stay where they are.
            (staging / entry.name).symlink_to(entry.resolve())
        (staging / SITE_FILE).write_bytes(text)
        try:
            load_site(staging)
        except ConfigError as exc:
            return f"invalid site.yaml: {exc}"
        return ""
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def _restore(directory: Path, text: bytes | None) -> None:
    """Put the running site.yaml back after a swap whose version row was not committed."""
    if text is None:
        return
    try:
        current = directory / SITE_FILE
        write_atomic(current, text, current.stat().st_mode & 0o777)
    except OSError as exc:
        log.error(kv(event="config_restore_failed", error=exc))


def install_site_file(directory: Path, text: bytes) -> None:
    """Keep the running file as site.yaml.prev, then rename the new one into place."""
    current = directory / SITE_FILE
    previous = directory / PREVIOUS_FILE
    mode = current.stat().st_mode & 0o777 if current.exists() else 0o600
    if current.exists():
        write_atomic(previous, current.read_bytes(), mode)
    write_atomic(current, text, mode)


__all__ = ["ConfigResult", "PREVIOUS_FILE", "apply_config", "install_site_file",
           "running_config_version"]
