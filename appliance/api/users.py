"""API users, logins and bearer tokens, kept in the site database.

Three roles, each allowed what the one below it is: ``agent`` < ``supervisor`` < ``admin``.
Passwords are stored as scrypt hashes; admins and supervisors also need a TOTP code (RFC 6238).
A login returns a random 256-bit bearer token, stored only as its SHA-256 with an expiry; the
role is fixed in the token when it is issued. Repeated failures lock the user for a while.

The store owns its own connection to the site database and serialises its use with a lock, so
it can be called from worker threads while the event loop keeps its own connection.

TOTP secrets are stored sealed with a key derived from the site key (``totp.seal_secret``).
Secrets stored plain (before sealing existed) are sealed when a store with the site key opens
the database: migrations are SQL and never hold the key, and sealing them all at once, rather
than at each user's next login, leaves none plain for a user who rarely logs in.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.api import passwords, totp
from appliance.log import kv
from appliance.recording.crypto import SiteKeyError, load_site_key
from appliance.store import audit, open_site_db

log = logging.getLogger("edgecc.api.users")

NAME_PATTERN = r"^[A-Za-z0-9._@-]{1,64}$"
_NAME_RE = re.compile(NAME_PATTERN)
TOKEN_BYTES = 32
"""256 random bits: guessing is hopeless, so a plain SHA-256 is enough to store it."""


class Role(enum.Enum):
    """What an API user may do; each role may do everything the roles below it may."""

    AGENT = "agent"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the order agent < supervisor < admin."""
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """Whether this role may do what ``needed`` may."""
        return self.rank >= needed.rank

    @property
    def needs_two_factor(self) -> bool:
        """Admins and supervisors log in with a TOTP code as well as a password."""
        return self is not Role.AGENT


_RANK = {Role.AGENT: 0, Role.SUPERVISOR: 1, Role.ADMIN: 2}


@dataclass(frozen=True)
class LoginPolicy:
    """Token lifetime and lockout rules."""

    token_ttl: float = 900.0
    """Seconds a bearer token is valid after login."""
    max_failures: int = 5
    """Failed logins of one user within ``failure_window`` that lock it."""
    failure_window: float = 300.0
    """Seconds over which failures are counted."""
    lockout: float = 900.0
    """Seconds a locked user cannot log in, even with the right password."""
    max_tokens_per_user: int = 20
    """Live tokens one user may hold; a new login beyond it revokes the oldest."""


class UserError(ValueError):
    """A user cannot be created as asked; ``field`` names the offending input."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class ApiUser:
    """An API user as shown to admins (no secrets)."""

    id: int
    """Row id."""
    name: str
    """Login name."""
    display_name: str | None
    """Name shown in the UI."""
    role: Role
    """What the user may do."""
    two_factor: bool
    """Whether a TOTP secret is enrolled."""
    locked_until: float | None
    """Unix time until which logins are refused, when locked."""
    created_at: float
    """Unix time of creation."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the holder of a valid token."""

    user_id: int
    """Row id of the user."""
    name: str
    """Login name."""
    role: Role
    """Role fixed in the token at login."""
    token_hash: str
    """SHA-256 (hex) of the bearer token, the key to revoke it."""
    expires_at: float
    """Unix time the token stops working."""


class LoginOutcome(enum.Enum):
    """How a login attempt ended."""

    OK = "ok"
    INVALID = "invalid"
    LOCKED = "locked"


@dataclass(frozen=True)
class LoginResult:
    """The answer to one login attempt."""

    outcome: LoginOutcome
    """OK, INVALID (wrong name, password or code: never told apart) or LOCKED."""
    reason: str
    """Why, for the audit log only (never sent to the client)."""
    token: str | None = None
    """The bearer token when OK; it exists nowhere else."""
    principal: Principal | None = None
    """The token's holder when OK."""
    retry_after: float | None = None
    """Seconds until a locked user may try again."""


def token_digest(token: str) -> str:
    """How a bearer token is stored and looked up."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


_BESIDE_DATABASE: Any = object()


class UserStore:
    """API users, tokens and the audit log rows the API writes."""

    def __init__(self, db: sqlite_utils.Database, *, policy: LoginPolicy | None = None,
                 clock: Callable[[], float] = time.time, owns_db: bool = False,
                 site_key: bytes | None = None) -> None:
        """``site_key`` seals TOTP secrets; without it they are stored plain (and sealed ones
        cannot be read: those users cannot log in until the store has the key)."""
        self.policy = policy or LoginPolicy()
        self.clock = clock
        self._db = db
        self._conn: sqlite3.Connection = db.conn
        self._lock = threading.Lock()
        self._owns_db = owns_db
        self._secret_key = None if site_key is None else totp.secret_key(site_key)
        if self._secret_key is None:
            log.warning(kv(event="totp_secrets_plain", reason="no_site_key"))
        else:
            self.seal_plain_secrets()

    @classmethod
    def open(cls, path: Path | str, *, site_key: bytes | None = _BESIDE_DATABASE,
             **kwargs: Any) -> UserStore:
        """A store on its own connection to the site database at ``path`` (migrated).

        By default the site key is ``site.key`` in the database's directory (the site layout
        ``edgecc init`` makes), when it exists; pass ``site_key`` to give it (or None for none).
        Raises SiteKeyError for a key file that exists but is unusable (wrong size, readable by
        others)."""
        if site_key is _BESIDE_DATABASE:
            site_key = _key_beside(Path(path))
        db = open_site_db(path)
        try:
            return cls(db, owns_db=True, site_key=site_key, **kwargs)
        except BaseException:
            db.conn.close()
            raise

    @property
    def seals_secrets(self) -> bool:
        """Whether TOTP secrets are sealed with the site key (the store has it)."""
        return self._secret_key is not None

    def seal_plain_secrets(self) -> int:
        """Seal every TOTP secret still stored plain, in one transaction; return how many.

        The old plain text is overwritten in the database file (``secure_delete``, then a WAL
        checkpoint), though copies made before (backups) keep it."""
        key = self._secret_key
        if key is None:
            raise SiteKeyError("no site key: TOTP secrets cannot be sealed")
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, totp_secret FROM api_users WHERE totp_secret IS NOT NULL "
                "AND totp_secret NOT LIKE ?", (totp.SEALED_PREFIX + "%",)).fetchall()
            if not rows:
                return 0
            sealed = 0
            previous = self._conn.execute("PRAGMA secure_delete").fetchone()[0]
            self._conn.execute("PRAGMA secure_delete = ON")
            try:
                with self._write():
                    for user_id, plain in rows:
                        try:
                            totp.secret_from_base32(plain)
                        except ValueError:
                            # Unusable anyway (that user cannot log in); never block the rest.
                            log.error(kv(event="totp_secret_unreadable", user_id=user_id,
                                         reason="not_base32"))
                            continue
                        # Conditional: another store may have sealed it since the read.
                        sealed += self._conn.execute(
                            "UPDATE api_users SET totp_secret = ? WHERE id = ? AND "
                            "totp_secret = ?",
                            (totp.seal_secret(key, user_id, totp.secret_from_base32(plain)),
                             user_id, plain)).rowcount
                # The WAL keeps the old pages until a checkpoint copies the new ones back;
                # with readers busy it may not finish, and the next checkpoint does it.
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                self._conn.execute(f"PRAGMA secure_delete = {int(previous)}")
        log.info(kv(event="totp_secrets_sealed", count=sealed))
        return sealed

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        # A write transaction that takes the lock at once (called with self._lock held).
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def _secret(self, user_id: int, stored: str) -> bytes | None:
        # The plain secret of a user, or None when it cannot be read here (logged).
        if not totp.is_sealed(stored):
            try:
                return totp.secret_from_base32(stored)
            except ValueError:
                log.error(kv(event="totp_secret_unreadable", user_id=user_id,
                             reason="not_base32"))
                return None
        if self._secret_key is None:
            log.error(kv(event="totp_secret_unreadable", user_id=user_id, reason="no_site_key"))
            return None
        try:
            return totp.open_secret(self._secret_key, user_id, stored)
        except totp.SecretSealError:
            log.error(kv(event="totp_secret_unreadable", user_id=user_id, reason="does_not_open"))
            return None

    def _stored_secret(self, user_id: int, secret: bytes) -> str:
        if self._secret_key is None:
            return totp.secret_to_base32(secret)
        return totp.seal_secret(self._secret_key, user_id, secret)

    def close(self) -> None:
        """Close the connection when the store opened it."""
        if self._owns_db:
            with self._lock:
                self._conn.close()

    # ------------------------------------------------------------------ users

    def add_user(self, name: str, role: Role | str, password: str,
                 display_name: str | None = None) -> tuple[ApiUser, bytes | None]:
        """Create a user; return it and its new TOTP secret (None for agents).

        Raises UserError (bad name, role or password, or the name is taken)."""
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise UserError("name must be 1 to 64 letters, digits or . _ @ -", "name")
        try:
            role = Role(role)
        except ValueError:
            raise UserError(f"role must be one of {', '.join(r.value for r in Role)}, "
                            f"got {role!r}", "role") from None
        if display_name is not None and (len(display_name) > 128
                                         or not display_name.isprintable()):
            raise UserError("display name must be at most 128 printable characters",
                            "display_name")
        try:
            passwords.check_policy(password)
        except passwords.PasswordPolicyError as exc:
            raise UserError(str(exc), "password") from None
        secret = totp.new_secret() if role.needs_two_factor else None
        stored = passwords.hash_password(password)
        now = self.clock()
        with self._lock:
            try:
                with self._write():
                    # The id is the sealed secret's associated data, so it is chosen first
                    # (what SQLite would pick: one more than the largest), under the lock.
                    user_id = int(self._conn.execute(
                        "SELECT COALESCE(MAX(id), 0) + 1 FROM api_users").fetchone()[0])
                    self._conn.execute(
                        "INSERT INTO api_users (id, name, display_name, role, password_hash, "
                        "totp_secret, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (user_id, name, display_name, role.value, stored,
                         self._stored_secret(user_id, secret) if secret else None, now))
            except sqlite3.IntegrityError:
                raise UserError(f"a user named {name!r} already exists", "name") from None
        user = ApiUser(user_id, name, display_name, role, secret is not None, None, now)
        return user, secret

    def users(self) -> list[ApiUser]:
        """Every user, by name."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, name, display_name, role, totp_secret IS NOT NULL, locked_until, "
                "created_at FROM api_users ORDER BY name").fetchall()
        now = self.clock()
        return [ApiUser(r[0], r[1], r[2], Role(r[3]), bool(r[4]),
                        r[5] if r[5] is not None and r[5] > now else None, r[6]) for r in rows]

    # ------------------------------------------------------------------ login

    def login(self, name: str, password: str, code: str | None, source: str) -> LoginResult:
        """Check a name, password and (for admins and supervisors) TOTP code; issue a token.

        Slow on purpose (one scrypt), and as slow for an unknown name as for a wrong password.
        """
        now = self.clock()
        with self._lock:
            row = self._conn.execute(
                "SELECT id, role, password_hash, totp_secret, totp_last_step, locked_until "
                "FROM api_users WHERE name = ?", (name,)).fetchone()
        if row is None:
            passwords.burn_verify(password)
            return LoginResult(LoginOutcome.INVALID, "unknown user")
        user_id, role_text, stored, secret_text, last_step, locked_until = row
        role = Role(role_text)
        if locked_until is not None and now < locked_until:
            # No password check while locked: a locked account is no oracle for guesses.
            return LoginResult(LoginOutcome.LOCKED, "locked", retry_after=locked_until - now)
        if not passwords.verify_password(password, stored):
            return self._failed(user_id, now, "bad password")
        step = None
        if role.needs_two_factor or secret_text is not None:
            if secret_text is None or code is None:
                return self._failed(user_id, now, "code missing")
            secret = self._secret(user_id, secret_text)
            if secret is None:
                # Not the user's fault and no guess: no failure counted, no lockout.
                return LoginResult(LoginOutcome.INVALID, "totp secret unreadable here")
            step = totp.match_step(secret, code, now, after_step=last_step)
            if step is None:
                return self._failed(user_id, now, "bad or reused code")
        token = secrets.token_urlsafe(TOKEN_BYTES)
        digest = token_digest(token)
        expires_at = now + self.policy.token_ttl
        with self._lock, self._conn:
            if step is not None:
                # Conditional, so two logins racing with the same code cannot both pass.
                updated = self._conn.execute(
                    "UPDATE api_users SET totp_last_step = ? WHERE id = ? AND "
                    "(totp_last_step IS NULL OR totp_last_step < ?)", (step, user_id, step))
                if updated.rowcount != 1:
                    return LoginResult(LoginOutcome.INVALID, "reused code")
            self._conn.execute(
                "UPDATE api_users SET failures = 0, failures_since = NULL, locked_until = NULL "
                "WHERE id = ?", (user_id,))
            self._insert_token(digest, user_id, role, now, expires_at, source)
        principal = Principal(user_id, name, role, digest, expires_at)
        return LoginResult(LoginOutcome.OK, "ok", token, principal)

    def _failed(self, user_id: int, now: float, reason: str) -> LoginResult:
        policy = self.policy
        with self._lock, self._conn:
            failures, since = self._conn.execute(
                "SELECT failures, failures_since FROM api_users WHERE id = ?",
                (user_id,)).fetchone()
            if since is None or now - since > policy.failure_window:
                failures, since = 0, now
            failures += 1
            if failures >= policy.max_failures:
                self._conn.execute(
                    "UPDATE api_users SET failures = 0, failures_since = NULL, "
                    "locked_until = ? WHERE id = ?", (now + policy.lockout, user_id))
                # Locking ends every session of the user too: someone is guessing.
                self._conn.execute("DELETE FROM api_tokens WHERE user_id = ?", (user_id,))
                return LoginResult(LoginOutcome.INVALID, f"{reason}; user locked")
            self._conn.execute(
                "UPDATE api_users SET failures = ?, failures_since = ? WHERE id = ?",
                (failures, since, user_id))
        return LoginResult(LoginOutcome.INVALID, reason)

    # ------------------------------------------------------------------ tokens

    def issue_token(self, user_id: int, *, now: float | None = None,
                    source: str = "") -> tuple[str, Principal]:
        """A new token for user ``user_id`` issued at ``now`` (default: the clock), with the
        user's current role; for logins and tests. KeyError when there is no such user."""
        now = self.clock() if now is None else now
        token = secrets.token_urlsafe(TOKEN_BYTES)
        digest = token_digest(token)
        with self._lock, self._conn:
            row = self._conn.execute("SELECT name, role FROM api_users WHERE id = ?",
                                     (user_id,)).fetchone()
            if row is None:
                raise KeyError(user_id)
            role = Role(row[1])
            self._insert_token(digest, user_id, role, now, now + self.policy.token_ttl, source)
        return token, Principal(user_id, row[0], role, digest, now + self.policy.token_ttl)

    def _insert_token(self, digest: str, user_id: int, role: Role, now: float,
                      expires_at: float, source: str) -> None:
        # Called with the lock held, inside a transaction.
        self._conn.execute("DELETE FROM api_tokens WHERE expires_at <= ?", (now,))
        self._conn.execute(
            "DELETE FROM api_tokens WHERE token_hash IN (SELECT token_hash FROM api_tokens "
            "WHERE user_id = ? ORDER BY issued_at DESC, rowid DESC LIMIT -1 OFFSET ?)",
            (user_id, self.policy.max_tokens_per_user - 1))
        self._conn.execute(
            "INSERT INTO api_tokens (token_hash, user_id, role, issued_at, expires_at, source) "
            "VALUES (?, ?, ?, ?, ?, ?)", (digest, user_id, role.value, now, expires_at, source))

    def resolve(self, token: str) -> Principal | None:
        """The holder of ``token`` if it exists and has not expired, else None."""
        if not token or len(token) > 256:
            return None
        digest = token_digest(token)
        now = self.clock()
        with self._lock:
            row = self._conn.execute(
                "SELECT t.user_id, u.name, t.role, t.expires_at FROM api_tokens t "
                "JOIN api_users u ON u.id = t.user_id WHERE t.token_hash = ?",
                (digest,)).fetchone()
        if row is None or now >= row[3]:
            return None
        return Principal(row[0], row[1], Role(row[2]), digest, row[3])

    def revoke(self, token_hash: str) -> bool:
        """End the session of one token; whether it existed."""
        with self._lock, self._conn:
            cursor = self._conn.execute("DELETE FROM api_tokens WHERE token_hash = ?",
                                        (token_hash,))
        return cursor.rowcount == 1

    # ------------------------------------------------------------------ agent link

    def link_agent(self, name: str, agent: str | None) -> None:
        """Link the API user ``name`` to the agent extension (SIP account user) they act for,
        or unlink with None. Raises UserError for an unknown user or an extension already
        linked to another user."""
        if agent is not None and (not isinstance(agent, str)
                                  or not re.fullmatch(r"[A-Za-z0-9._+-]{1,64}", agent)):
            raise UserError("agent must be a SIP account user (1 to 64 letters, digits or "
                            "._+-)", "agent")
        with self._lock:
            try:
                with self._conn:
                    cursor = self._conn.execute("UPDATE api_users SET agent = ? WHERE name = ?",
                                                (agent, name))
            except sqlite3.IntegrityError:
                raise UserError(f"agent {agent!r} is already linked to another user",
                                "agent") from None
        if cursor.rowcount != 1:
            raise UserError(f"no user named {name!r}", "name")

    def agent_of(self, user_id: int) -> str | None:
        """The agent extension user ``user_id`` is linked to, or None."""
        with self._lock:
            row = self._conn.execute("SELECT agent FROM api_users WHERE id = ?",
                                     (user_id,)).fetchone()
        return None if row is None else row[0]

    # ------------------------------------------------------------------ audit

    def audit(self, actor: str, action: str, **detail: Any) -> int:
        """Append an audit row (``detail`` rendered as key=value); return its id."""
        with self._lock:
            return audit(self._db, actor, action, kv(**detail))

    def audit_rows(self, limit: int = 100, before: int | None = None) -> list[dict[str, Any]]:
        """The most recent audit rows, newest first; with ``before``, those older than it."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, at, actor, action, detail FROM audit_log WHERE id < ? "
                "ORDER BY id DESC LIMIT ?", (before if before is not None else 2**62, limit),
            ).fetchall()
        return [{"id": r[0], "at": r[1], "actor": r[2], "action": r[3], "detail": r[4] or ""}
                for r in rows]


def _key_beside(database: Path) -> bytes | None:
    # The site key in the database's directory, or None when there is none there.
    try:
        return load_site_key(database.parent)
    except SiteKeyError:
        if (database.parent / "site.key").exists():
            raise
        return None
