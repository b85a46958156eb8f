"""Changing the site's configuration from the API: one versioned, validated, audited write.

``site.yaml`` stays the one source of truth. An edit is made to a copy of the installed file's
data, the whole new file is validated exactly as the appliance validates it at start
(``appliance.config.load_site`` in a staging copy of the site, then the call path's flow,
prompt and DID checks), and only then installed the way a config pushed by the cloud is: the
running file kept as ``site.yaml.prev`` and the new one renamed into place
(``edge_agent.config_apply``), with a new row in ``edge_config``. The appliance then loads the
new version through its restart-when-idle path (``appliance.app``: no call is ever cut).

Versions: the installed version is ``appliance.store.running_config_version`` (the highest
``edge_config`` row with ok = 1); an edit must name the version it was based on (HTTP
``If-Match``) and gets the next one. A config pushed by the cloud must carry a higher number
than any local edit (docs/api.md, "Configuration").
"""

from __future__ import annotations

import copy
import hashlib
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils
import yaml

from appliance import eventlog
from appliance.config import SITE_FILE, ConfigError, SiteConfig, format_key_path, load_site
from appliance.log import kv
from appliance.store import audit, running_config_version
from edge_agent.config_apply import install_site_file

MAX_SITE_BYTES = 256 * 1024
"""Largest site.yaml an edit may produce (the same limit as a pushed config)."""
SUMMARY_CHARS = 600
"""Audit before/after summaries are cut to this length."""
SECRET_KEYS = frozenset({"ha1_md5", "ha1_sha256", "password", "secret", "token"})
"""Keys never written into an audit summary or an event."""


class ConfigEditError(Exception):
    """An edit refused: HTTP-like ``status`` (404, 409, 412, 422), a message for a person and
    the field at fault (the body member, or a site.yaml key path)."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


@dataclass(frozen=True)
class Change:
    """What one edit did, for the audit log and the ``config.changed`` event."""

    kind: str
    """``queue``, ``agent``, ``skill`` or ``flow``."""
    name: str
    """The queue, agent, skill or flow changed."""
    op: str
    """``create``, ``replace``, ``delete`` or ``password``."""
    before: Any = None
    """The object before (secrets removed); None when created."""
    after: Any = None
    """The object after (secrets removed); None when deleted."""


@dataclass(frozen=True)
class Installed:
    """The outcome of an accepted edit."""

    version: int
    """The new config version."""
    change: Change
    config: SiteConfig
    """The new configuration as validated."""


def without_secrets(value: Any) -> Any:
    """``value`` with every secret-bearing key removed, at any depth."""
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if k not in SECRET_KEYS}
    if isinstance(value, list | tuple):
        return [without_secrets(v) for v in value]
    return value


def summary(value: Any) -> str:
    """A short one-line rendering of ``value`` without secrets, for the audit log."""
    if value is None:
        return "-"
    text = yaml.safe_dump(without_secrets(value), default_flow_style=True, sort_keys=False,
                          width=10_000).strip()
    return text if len(text) <= SUMMARY_CHARS else text[:SUMMARY_CHARS - 1] + "…"


class SiteEditor:
    """Reads the installed ``site.yaml`` and installs edits of it, one at a time."""

    def __init__(self, site_dir: Path | str, database: Path | str, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.site_dir = Path(site_dir)
        self.database = Path(database)
        self._clock = clock
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ reading

    def _connect(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(self.database, timeout=5.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 5000")
        return sqlite_utils.Database(conn)

    def version(self) -> int:
        """The installed config version (what ``If-Match`` must name)."""
        db = self._connect()
        try:
            return running_config_version(db)
        finally:
            db.close()

    def read(self) -> tuple[int, dict[str, Any]]:
        """(installed version, the installed site.yaml as data)."""
        with self._lock:
            return self.version(), self._data()

    def _data(self) -> dict[str, Any]:
        text = (self.site_dir / SITE_FILE).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigEditError(409, f"{SITE_FILE} is not a mapping; fix it by hand")
        return data

    # ------------------------------------------------------------------ writing

    def edit(self, expected: int | None, actor: str,
             change: Callable[[dict[str, Any]], Change]) -> Installed:
        """Apply ``change`` (which edits the data in place and says what it did) to the
        installed config of version ``expected``, validate the whole result and install it
        as the next version; raise ConfigEditError (nothing written) when refused."""
        if expected is None:
            raise ConfigEditError(428, "If-Match with the config version is required "
                                       "(the ETag of a GET)", "If-Match")
        with self._lock:
            db = self._connect()
            try:
                return self._edit(db, expected, actor, change)
            finally:
                db.close()

    def _edit(self, db: sqlite_utils.Database, expected: int, actor: str,
              change: Callable[[dict[str, Any]], Change]) -> Installed:
        self._check_version(db, expected)
        data = copy.deepcopy(self._data())
        done = change(data)
        text = render(data)
        # Validated before the write transaction: other writers of the site database (the
        # desk, the event log) are held up only for the write itself.
        config = validate(self.site_dir, text)
        conn = db.conn
        # IMMEDIATE: the version cannot move between this check and the commit (a push the
        # edge agent installs meanwhile waits, then finds itself not newer).
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._check_version(db, expected)
            new_version = version + 1
            digest = hashlib.sha256(text.encode()).hexdigest()
            # The same row a pushed version gets; who made it is in the audit row below.
            conn.execute("INSERT INTO edge_config (version, received_at, ok, error, sha256) "
                         "VALUES (?, ?, 1, '', ?)", (new_version, self._clock(), digest))
            install_site_file(self.site_dir, text.encode())
            # In the event log too, so the cloud hears of the new version (outbox).
            eventlog.append(db, "config.changed", {
                "version": new_version, "kind": done.kind, "name": done.name, "op": done.op,
                "by": actor}, occurred_at=self._clock(), site_id=config.site.id)
            audit(db, actor, "config_change", kv(
                kind=done.kind, name=done.name, op=done.op, version=new_version,
                before=summary(done.before), after=summary(done.after)))
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Installed(new_version, done, config)

    @staticmethod
    def _check_version(db: sqlite_utils.Database, expected: int) -> int:
        version = running_config_version(db)
        if expected != version:
            raise ConfigEditError(412, f"the config is at version {version}, not {expected}: "
                                       "reload and apply the change again", "If-Match")
        return version


def render(data: dict[str, Any]) -> str:
    """The site.yaml text for ``data`` (a header line, keys in their order)."""
    text = ("# edgecc site configuration, written through the API (docs/api.md); every key\n"
            "# is described in docs/config.md. The previous version is site.yaml.prev.\n"
            + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    if len(text.encode()) > MAX_SITE_BYTES:
        raise ConfigEditError(422, f"the site configuration would be {len(text.encode())} "
                                   f"bytes, over {MAX_SITE_BYTES}")
    return text


def validate(site_dir: Path, text: str) -> SiteConfig:
    """Validate ``text`` as the site.yaml of ``site_dir`` the way the appliance does at start;
    raise ConfigEditError(422) naming the key of the first problem."""
    from appliance.calls.control import load_call_path
    from appliance.ivr.flow import FlowError

    scratch = Path(tempfile.mkdtemp(prefix="edgecc-config-edit-"))
    try:
        for entry in site_dir.iterdir():
            if entry.name != SITE_FILE and not entry.name.startswith("."):
                # Links, not copies: paths in the file resolve to the site's own files.
                (scratch / entry.name).symlink_to(entry.resolve())
        (scratch / SITE_FILE).write_text(text, encoding="utf-8")
        try:
            config = load_site(scratch)
        except ConfigError as exc:
            first = exc.issues[0]
            raise ConfigEditError(422, f"{first.key}: {first.expected}", first.key) from None
        try:
            load_call_path(config)
        except FlowError as exc:
            first = exc.problems[0]
            where = ".".join(p for p in ("ivr.flows", first.flow, first.node) if p)
            raise ConfigEditError(422, f"{where}: {first.message}", where) from None
        except ValueError as exc:
            key = str(exc).split(":", 1)[0]
            raise ConfigEditError(422, str(exc), key if " " not in key else None) from None
        return config
    finally:
        shutil.rmtree(scratch, ignore_errors=True)




def key_path(path: tuple[str | int, ...]) -> str:
    """``("queues", 0, "name")`` as ``queues[0].name``."""
    return format_key_path(path)


__all__ = ["Change", "ConfigEditError", "Installed", "SiteEditor", "render", "summary",
           "validate", "without_secrets"]
