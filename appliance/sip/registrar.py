"""The SIP registrar (RFC 3261 §10.3) and its persistent binding store.

``Registrar.handle_register`` turns one REGISTER into its response: it checks the To address,
authenticates with digest (``appliance.sip.digest``), authorizes the user for that address of
record, validates every Contact and expiry, applies the RFC 3261 §10.3 step 7 Call-ID/CSeq
ordering, and commits all binding changes or none.

Bindings live in memory for lookups and are written behind to the site database's
``sip_bindings`` table by ``BindingStore`` on a thread of its own, so SQLite never runs on the
event loop (a phone re-registers anyway if the last few milliseconds are lost to a power cut).
Expiry times are kept in the caller's ``now`` clock in memory and as wall-clock time in the
database, so bindings survive a restart.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

from appliance.sip.digest import AuthResult, DigestAuthenticator
from appliance.sip.guard import Guard
from appliance.sip.source import Source
from media_core.sip import RemoteProtocolError, SipMessage, build_response

__all__ = ["Binding", "BindingStore", "Registrar", "contact_key"]

log = logging.getLogger("edgecc.sip.registrar")

TABLE = "sip_bindings"
_COLUMNS = (
    "aor",
    "contact",
    "expires_at",
    "call_id",
    "cseq",
    "q",
    "received",
    "transport",
    "instance",
    "user_agent",
)
# RFC 3261 §20.19: expires is delta-seconds, up to 2**32 - 1.
_MAX_DELTA = 2**32 - 1
_PRUNE_INTERVAL = 30.0
_TAGS_PER_READ = 256
_MAX_CONTACTS = 10
# Rows per statement in the writer: one multi-row statement is one sqlite3_step, and every
# step releases and re-takes the GIL, a hand-off the event loop thread then waits for.
_ROWS_PER_STATEMENT = 500


@dataclass(frozen=True)
class Binding:
    """One registered contact of an address of record."""

    aor: str
    """Address of record, canonical ``sip:user@realm``."""
    contact: str
    """The Contact URI as the phone registered it (where to send its calls)."""
    expires_at: float
    """When the binding ends, on the registrar's ``now`` clock."""
    call_id: str
    """Call-ID of the REGISTER that last refreshed it (RFC 3261 §10.3 step 7)."""
    cseq: int
    """CSeq number of that REGISTER."""
    q: float | None = None
    """Contact preference 0..1, None when not given."""
    received: str | None = None
    """``host:port`` the REGISTER came from (the phone's address behind NAT)."""
    transport: str | None = None
    """Transport the REGISTER came over ("UDP", "TCP", "TLS")."""
    instance: str | None = None
    """``+sip.instance`` of the phone (RFC 5626), if given."""
    user_agent: str | None = None
    """User-Agent of the phone, for the admin's eyes."""
    key: str = field(default="", compare=False, repr=False)
    """The key this contact compares by (``contact_key``); computed when not given."""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", contact_key(self.contact))

    def expires_in(self, now: float) -> int:
        """Whole seconds left at ``now`` (0 once expired)."""
        left = self.expires_at - now
        return int(left + 0.5) if left > 0 else 0


_CONTACT_KEYS: dict[str, str] = {}
"""``contact_key`` results: phones re-register the same Contact over and over."""
_MAX_CONTACT_KEYS = 8192


def contact_key(uri: str) -> str:
    """A comparison key for Contact URIs, close to RFC 3261 §19.1.4.

    Scheme and host compare case-insensitively, user and password case-sensitively; URI
    parameters compare by name case-insensitively and in any order.
    """
    key = _CONTACT_KEYS.get(uri)
    if key is None:
        key = _contact_key(uri)
        if len(_CONTACT_KEYS) >= _MAX_CONTACT_KEYS:
            _CONTACT_KEYS.clear()  # bounded: a flood of distinct Contacts only costs re-work
        _CONTACT_KEYS[uri] = key
    return key


def _contact_key(uri: str) -> str:
    text = uri.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    head, _, rest = text.partition(";")
    params = rest.split(";") if rest else []
    scheme, _, tail = head.partition(":")
    userinfo, at, hostport = tail.rpartition("@")
    if not at:
        userinfo, hostport = "", tail
    norm_params = sorted(
        (p.partition("=")[0].lower() + ("=" + p.partition("=")[2] if "=" in p else ""))
        for p in params
        if p
    )
    return f"{scheme.lower()}:{userinfo}{at}{hostport.lower()};" + ";".join(norm_params)


class _Refused(Exception):
    """A REGISTER this registrar answers with an error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class BindingStore:
    """Bindings in memory, written behind to the ``sip_bindings`` table of the site database.

    ``db`` is the site database (a ``sqlite_utils.Database`` from
    ``appliance.store.open_site_db``, or the file's path); the table must exist. Reads and
    writes from the event loop touch memory only; a writer thread with its own connection
    commits the changes, coalesced per binding, at most every ``flush_interval`` seconds
    (``flush`` and ``close`` cut that wait short). A change is on disk within about
    ``flush_interval`` of being made; what a power cut loses in that window the phones restore
    by re-registering.
    Expired rows are dropped when loaded. Call ``close`` to write everything and stop.
    """

    def __init__(
        self,
        db: Any,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        flush_interval: float = 0.5,
    ) -> None:
        self.path = _database_path(db)
        self._wall_clock = wall_clock
        self._flush_interval = flush_interval
        self._by_aor: dict[str, dict[str, Binding]] = {}
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self._pending: dict[tuple[str, str], tuple[Any, ...] | None] = {}
        self._generation = 0
        self._written_generation = 0
        self._wake = threading.Event()
        self._hurry = threading.Event()  # set by flush/close: write now, not after the interval
        self._stopping = False
        self._error: BaseException | None = None
        self.writes = 0
        """Rows written (upserted or deleted) so far."""
        now = clock()
        self._load(now)
        self._thread = threading.Thread(target=self._run, name="sip-bindings-writer", daemon=True)
        self._thread.start()

    # -- memory side (event loop) -----------------------------------------------------------

    def bindings(self, aor: str) -> list[Binding]:
        """All bindings held for ``aor``, expired or not."""
        held = self._by_aor.get(aor)
        return list(held.values()) if held else []

    def aors(self) -> list[str]:
        """Every address of record with at least one binding held."""
        return list(self._by_aor)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_aor.values())

    def apply(
        self, aor: str, upserts: Iterable[Binding], removals: Iterable[Binding], now: float
    ) -> None:
        """Replace/add ``upserts`` and drop ``removals`` for ``aor`` (memory now, disk soon)."""
        held = self._by_aor.setdefault(aor, {})
        writes: list[tuple[tuple[str, str], tuple[Any, ...] | None]] = []
        for b in removals:
            if held.pop(b.key, None) is not None:
                writes.append(((aor, b.contact), None))
        for b in upserts:
            old = held.get(b.key)
            if old is not None and old.contact != b.contact:
                writes.append(((aor, old.contact), None))
            held[b.key] = b
            writes.append(((aor, b.contact), self._row(b, now)))
        if not held:
            del self._by_aor[aor]
        if writes:
            self._queue(writes)

    def prune(self, now: float) -> int:
        """Drop expired bindings; return how many."""
        writes = []
        for aor in list(self._by_aor):
            held = self._by_aor[aor]
            for key in [k for k, b in held.items() if b.expires_at <= now]:
                writes.append(((aor, held.pop(key).contact), None))
            if not held:
                del self._by_aor[aor]
        if writes:
            self._queue(writes)
        return len(writes)

    # -- disk side --------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Block until every change made so far is committed (raises TimeoutError)."""
        with self._lock:
            target = self._generation
            self._hurry.set()
            self._wake.set()
            if not self._written.wait_for(
                lambda: self._written_generation >= target or self._error is not None, timeout
            ):
                raise TimeoutError("sip bindings not written in time")
            if self._error is not None:
                raise RuntimeError("sip bindings writer failed") from self._error

    def close(self, timeout: float = 10.0) -> None:
        """Write what is pending and stop the writer thread."""
        if not self._thread.is_alive():
            return
        with self._lock:
            self._stopping = True
        self._hurry.set()
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("sip bindings writer did not stop")

    def _row(self, b: Binding, now: float) -> tuple[Any, ...]:
        wall_expiry = self._wall_clock() + (b.expires_at - now)
        return (
            b.aor,
            b.contact,
            wall_expiry,
            b.call_id,
            b.cseq,
            b.q,
            b.received,
            b.transport,
            b.instance,
            b.user_agent,
        )

    def _queue(self, writes: list[tuple[tuple[str, str], tuple[Any, ...] | None]]) -> None:
        with self._lock:
            if self._stopping:
                raise RuntimeError("binding store is closed")
            self._pending.update(writes)
            self._generation += 1
        if not self._wake.is_set():
            self._wake.set()

    def _connect(self) -> sqlite_utils.Database:
        db = sqlite_utils.Database(sqlite3.connect(self.path, timeout=30.0))
        # The site database is in WAL mode already (open_site_db); FULL makes commits durable.
        db.execute("PRAGMA synchronous=FULL")
        return db

    def _load(self, now: float) -> None:
        db = self._connect()
        try:
            if not db[TABLE].exists():
                raise ValueError(
                    f"{self.path} has no {TABLE} table: open it with appliance.store.open_site_db "
                    "first, which applies the migrations"
                )
            rows = list(db.query(f"SELECT {', '.join(_COLUMNS)} FROM {TABLE}"))
        finally:
            db.close()
        wall = self._wall_clock()
        expired = []
        for r in rows:
            left = r["expires_at"] - wall
            if left <= 0:
                expired.append(((r["aor"], r["contact"]), None))
                continue
            b = Binding(
                aor=r["aor"],
                contact=r["contact"],
                expires_at=now + left,
                call_id=r["call_id"] or "",
                cseq=int(r["cseq"] or 0),
                q=r["q"],
                received=r["received"],
                transport=r["transport"],
                instance=r["instance"],
                user_agent=r["user_agent"],
            )
            self._by_aor.setdefault(b.aor, {})[b.key] = b
        if expired:
            self._pending.update(expired)
            self._generation += 1
            self._wake.set()

    def _run(self) -> None:
        db = self._connect()
        conn = db.conn
        row_marks = f"({', '.join('?' * len(_COLUMNS))})"
        upsert = f"INSERT OR REPLACE INTO {TABLE} ({', '.join(_COLUMNS)}) VALUES "
        delete = f"DELETE FROM {TABLE} WHERE aor = ? AND contact = ?"
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                with self._lock:
                    batch, self._pending = self._pending, {}
                    generation = self._generation
                    stopping = self._stopping
                if batch:
                    rows = [row for row in batch.values() if row is not None]
                    gone = [key for key, row in batch.items() if row is None]
                    # Plain executemany in one transaction: this is the hot path of a
                    # registration storm, where per-row ORM calls would hold the GIL.
                    with conn:
                        if gone:
                            conn.executemany(delete, gone)
                        for i in range(0, len(rows), _ROWS_PER_STATEMENT):
                            chunk = rows[i:i + _ROWS_PER_STATEMENT]
                            conn.execute(
                                upsert + ", ".join([row_marks] * len(chunk)),
                                [value for row in chunk for value in row],
                            )
                    self.writes += len(batch)
                with self._lock:
                    self._written_generation = generation
                    self._written.notify_all()
                    if stopping and not self._pending:
                        return
                # Coalesce a storm into a few commits per second rather than one per REGISTER
                # (and a binding refreshed meanwhile into one row).
                if self._hurry.wait(self._flush_interval):
                    self._hurry.clear()
        except BaseException as exc:  # surfaced by flush(); the loop side keeps serving
            log.error("event=sip_bindings_write_failed error=%s", type(exc).__name__)
            with self._lock:
                self._error = exc
                self._written.notify_all()
        finally:
            db.close()


def _database_path(db: Any) -> str:
    if isinstance(db, str | Path):
        return str(db)
    conn = getattr(db, "conn", db)
    for _, name, path in conn.execute("PRAGMA database_list").fetchall():
        if name == "main" and path:
            return path
    raise ValueError("binding store needs a database file, not an in-memory database")


class Registrar:
    """Answers REGISTER requests for the accounts of one realm (RFC 3261 §10.3)."""

    def __init__(
        self,
        config: Any,
        bindings: BindingStore,
        auth: DigestAuthenticator,
        guard: Guard | None,
        *,
        max_contacts: int = _MAX_CONTACTS,
    ) -> None:
        reg = config.sip.registrar
        self.realm: str = config.sip.realm
        self.min_expires = int(reg.min_expires)
        self.max_expires = int(reg.max_expires)
        self.default_expires = int(reg.default_expires)
        if not 0 < self.min_expires <= self.default_expires <= self.max_expires:
            raise ValueError("registrar: need 0 < min_expires <= default_expires <= max_expires")
        self.max_contacts = int(getattr(reg, "max_contacts", max_contacts))
        self.store = bindings
        self.auth = auth
        self.guard = guard
        self._next_prune: float | None = None
        # To tags (RFC 3261 §19.3: unique, cryptographically random, >= 32 bits): 48 random
        # bits each, cut from one os.urandom read per _TAGS_PER_READ responses (a read per
        # response is slow on virtual machines).
        self._tags = ""
        self._tag_at = 0
        self.stats: dict[str, int] = {"registered": 0, "challenged": 0, "failed": 0, "refused": 0}

    # -- public -----------------------------------------------------------------------------

    def aor(self, user: str) -> str:
        """The canonical address of record of ``user``."""
        return f"sip:{user}@{self.realm}"

    def lookup(self, aor_user: str, now: float) -> list[Binding]:
        """Current bindings of ``aor_user``, best first (highest q, then most recent)."""
        live = [b for b in self.store.bindings(self.aor(aor_user)) if b.expires_at > now]
        live.sort(key=lambda b: (-(b.q if b.q is not None else 1.0), -b.expires_at))
        return live

    def next_timer(self) -> float | None:
        """When expired bindings are next pruned."""
        return self._next_prune

    def handle_timer(self, now: float) -> None:
        """Prune expired bindings."""
        self.store.prune(now)
        self._next_prune = now + _PRUNE_INTERVAL

    def handle_register(self, request: SipMessage, source: Source, now: float) -> SipMessage:
        """Process one REGISTER and return the response to send."""
        if self._next_prune is None or now >= self._next_prune:
            self.handle_timer(now)
        try:
            return self._register(request, source, now)
        except _Refused as exc:
            return self._reply(request, exc.status, exc.reason)
        except RemoteProtocolError as exc:
            # A header the codec parses lazily (To, Contact, CSeq...) is malformed.
            self.stats["refused"] += 1
            try:
                return build_response(
                    request, exc.status, exc.reason, headers=exc.headers, to_tag=self._new_tag()
                )
            except Exception:
                raise exc from None  # too broken to answer here: the service's error path

    # -- steps ------------------------------------------------------------------------------

    def _reply(
        self, request: SipMessage, status: int, reason: str | None = None, headers=()
    ) -> SipMessage:
        if status >= 300:
            self.stats["refused" if status != 401 else "challenged"] += 1
        return build_response(request, status, reason, headers=headers, to_tag=self._new_tag())

    def _new_tag(self) -> str:
        at = self._tag_at
        if at >= len(self._tags):
            self._tags = os.urandom(6 * _TAGS_PER_READ).hex()
            at = 0
        self._tag_at = at + 12
        return self._tags[at:at + 12]

    def _register(self, request: SipMessage, source: Source, now: float) -> SipMessage:
        # The address of record must be a SIP URI (RFC 3261 §10.3 step 5); checked before
        # authentication so that it says nothing about which users exist.
        to_uri = request.to.uri
        if to_uri.scheme.lower() not in ("sip", "sips") or not to_uri.user:
            return self._reply(request, 400, "To Must Be A SIP URI Of A User")

        # Step 3: authenticate.
        result: AuthResult = self.auth.verify(request, now)
        if not result.ok:
            if result.attempted:
                self.stats["failed"] += 1
                if self.guard is not None:
                    self.guard.auth_failed(source, now)
                log.info(
                    "event=sip_auth_failed source=%s transport=%s reason=%s",
                    source.host,
                    source.transport,
                    result.reason.replace(" ", "_"),
                )
            return self._reply(
                request, 401, None, self.auth.challenge(request, now, stale=result.stale)
            )
        if self.guard is not None:
            self.guard.auth_succeeded(source, now)

        # Step 4: the authenticated user may only change its own bindings.
        if to_uri.user != result.user:
            return self._reply(request, 403, "Forbidden")
        aor = self.aor(result.user)

        call_id = request.call_id
        cseq = request.cseq[0]
        header_expires = self._header_expires(request)

        raw_contacts = request.get_all("Contact")  # items come stripped
        held = {b.key: b for b in self.store.bindings(aor) if b.expires_at > now}

        # Step 6: "Contact: *" removes every binding, only with Expires: 0 and alone.
        if "*" in raw_contacts:
            if len(raw_contacts) != 1 or header_expires != 0:
                return self._reply(request, 400, "Wildcard Contact Needs Expires 0 Alone")
            for b in held.values():
                if b.call_id == call_id and cseq <= b.cseq:
                    return self._reply(request, 500, "Out Of Order CSeq")
            self.store.apply(aor, (), list(held.values()), now)
            self.stats["registered"] += 1
            log.debug("event=sip_unregister_all aor=%s removed=%d", aor, len(held))
            return self._reply(request, 200)

        if len(raw_contacts) > self.max_contacts:
            return self._reply(request, 403, "Too Many Contacts")
        upserts: dict[str, Binding] = {}
        removals: list[Binding] = []
        user_agent = request.get("User-Agent")
        received = f"{source.host}:{source.port}"
        for contact in request.contacts:
            uri = contact.uri
            if uri.scheme.lower() not in ("sip", "sips"):
                return self._reply(request, 400, "Contact Must Be A SIP URI")
            expires = self._contact_expires(contact.params, header_expires)
            # RFC 3261 §10.3 step 6: a positive interval below our minimum is refused.
            if 0 < expires < self.min_expires:
                return self._reply(
                    request, 423, "Interval Too Brief", [("Min-Expires", str(self.min_expires))]
                )
            expires = min(expires, self.max_expires)
            q = _q_value(_param(contact.params, "q"))
            contact_text = str(uri)
            key = contact_key(contact_text)
            old = held.get(key)
            # Step 7: the same Call-ID must come with a higher CSeq than the binding's.
            if old is not None and old.call_id == call_id and cseq <= old.cseq:
                return self._reply(request, 500, "Out Of Order CSeq")
            if expires == 0:
                upserts.pop(key, None)
                if old is not None:
                    removals.append(old)
                continue
            instance = _param(contact.params, "+sip.instance")
            upserts[key] = Binding(
                aor=aor,
                contact=contact_text,
                expires_at=now + expires,
                call_id=call_id,
                cseq=cseq,
                q=q,
                received=received,
                transport=source.transport,
                instance=instance.strip('"') if instance else None,
                user_agent=user_agent[:200] if user_agent else None,
                key=key,
            )

        removed_keys = {b.key for b in removals}
        after = {k: b for k, b in held.items() if k not in removed_keys}
        after.update(upserts)
        if len(after) > self.max_contacts:
            return self._reply(request, 403, "Too Many Contacts")
        # Step 7 (end): all updates are committed together, or none.
        if upserts or removals:
            self.store.apply(aor, upserts.values(), removals, now)
        self.stats["registered"] += 1
        log.debug("event=sip_register aor=%s source=%s contacts=%d", aor, source.host, len(after))
        # Step 8: the 200 lists every current binding with its remaining time.
        headers = [("Contact", _contact_value(b, now)) for b in after.values()]
        return self._reply(request, 200, None, headers)

    def _header_expires(self, request: SipMessage) -> int | None:
        raw = request.get("Expires")
        if raw is None:
            return None
        return _delta_seconds(raw, "Expires")

    def _contact_expires(self, params: dict[str, str | None], header: int | None) -> int:
        raw = _param(params, "expires")
        if raw is not None:
            return _delta_seconds(raw, "Contact expires")
        if header is not None:
            return header
        return self.default_expires


def _param(params: dict[str, str | None], name: str) -> str | None:
    """A header parameter by case-insensitive name (RFC 3261 §7.3.1)."""
    if name in params:
        return params[name]
    for key, value in params.items():
        if key.lower() == name:
            return value
    return None


def _delta_seconds(raw: str, what: str) -> int:
    text = raw.strip()
    if not text.isdigit() or not text.isascii():
        raise _Refused(400, f"Bad {what}")
    # RFC 3261 §10.2.1.1: larger than 2**32-1 means 2**32-1; then capped by max_expires.
    return min(int(text[:12]), _MAX_DELTA)


def _q_value(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        q = float(raw)
    except ValueError:
        raise _Refused(400, "Bad Contact q") from None
    if not 0.0 <= q <= 1.0:
        raise _Refused(400, "Bad Contact q")
    return q


def _contact_value(b: Binding, now: float) -> str:
    value = f"<{b.contact}>;expires={b.expires_in(now)}"
    if b.q is not None:
        value += f";q={b.q:g}"
    if b.instance:
        value += f';+sip.instance="{b.instance}"'
    return value
