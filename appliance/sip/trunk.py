"""The carrier trunk: registration to the carrier and OPTIONS keep-alive.

``TrunkMonitor`` is the sans-IO core. It builds the requests the site sends to
``trunk.carrier`` and reads their outcomes:

- registration (RFC 3261 §10.2), when ``trunk.register`` is true: REGISTER with one Call-ID
  and a growing CSeq (§10.2.4), the carrier's 401/407 answered with a digest computed from the
  HA1 in ``trunk.auth`` (RFC 7616; SHA-256 preferred when the carrier offers it and its HA1 is
  configured, RFC 8760 §2.4), refreshed before the granted lifetime ends, 423 answered with the
  carrier's Min-Expires (§10.2.8), and every failure retried after a back-off that doubles up
  to a ceiling (a 503's Retry-After is honoured, RFC 3261 §21.5.4);
- keep-alive: an OPTIONS (RFC 3261 §11) every ``trunk.options_interval`` seconds; the trunk
  is ``up`` after an answer, ``down`` after ``trunk.options_failures`` failures in a row and
  ``unknown`` until the first outcome (or always, with keep-alives disabled).

Time is a parameter (``now``); ``next_timer()`` says when ``handle_timer`` must run.
``TrunkLink`` is the asyncio adapter: it sends through ``SipService.send_request``, arms the
timer, logs each change and records it in the site database (``trunk_status``) for
``edgecc doctor``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.sip.digest import authorization_from_ha1, parse_challenge
from appliance.sip.registrar import contact_key
from appliance.sip.source import Source
from appliance.sip.transaction import (
    Event,
    ResponseReceived,
    TransactionTimeout,
    TransportFailed,
)
from media_core.sip import (
    RemoteProtocolError,
    SipMessage,
    build_request,
    new_branch,
    new_tag,
)

__all__ = [
    "Probe",
    "RegistrationChanged",
    "RegistrationState",
    "SendRequest",
    "TrunkLink",
    "TrunkMonitor",
    "TrunkState",
    "TrunkStateChanged",
    "read_trunk_status",
]

log = logging.getLogger("edgecc.sip.trunk")

BACKOFF_FIRST = 30.0
"""Seconds before the first retry of a failed registration."""
BACKOFF_MAX = 900.0
"""Ceiling of the doubling back-off."""
REFRESH_MARGIN = 60.0
"""A registration is refreshed this long before it ends (half its lifetime when shorter)."""
STATUS_TABLE = "trunk_status"


class TrunkState(enum.Enum):
    """What the keep-alives say about the carrier."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Probe(enum.Enum):
    """Input of the keep-alive state table: the outcome of one OPTIONS."""

    ANSWERED = "answered"
    FAILED = "failed"
    """Failed, with fewer failures in a row than the limit."""
    FAILED_LIMIT = "failed-limit"
    """Failed, and the failures in a row reached ``options_failures``."""


# (state, probe) -> next state; every pair is listed.
TRANSITIONS: dict[tuple[TrunkState, Probe], TrunkState] = {
    (TrunkState.UNKNOWN, Probe.ANSWERED): TrunkState.UP,
    (TrunkState.UNKNOWN, Probe.FAILED): TrunkState.UNKNOWN,
    (TrunkState.UNKNOWN, Probe.FAILED_LIMIT): TrunkState.DOWN,
    (TrunkState.UP, Probe.ANSWERED): TrunkState.UP,
    (TrunkState.UP, Probe.FAILED): TrunkState.UP,
    (TrunkState.UP, Probe.FAILED_LIMIT): TrunkState.DOWN,
    (TrunkState.DOWN, Probe.ANSWERED): TrunkState.UP,
    (TrunkState.DOWN, Probe.FAILED): TrunkState.DOWN,
    (TrunkState.DOWN, Probe.FAILED_LIMIT): TrunkState.DOWN,
}


class RegistrationState(enum.Enum):
    """Where the site's registration with the carrier stands."""

    DISABLED = "disabled"
    """``trunk.register`` is false."""
    REGISTERING = "registering"
    """A REGISTER is out (first one, a refresh, or a retry)."""
    REGISTERED = "registered"
    FAILED = "failed"
    """The last attempt failed; the next one waits for the back-off."""


@dataclass(frozen=True)
class SendRequest:
    """Send ``request`` to the carrier in a client transaction."""

    kind: str
    """"register" or "options": where its outcome goes back to."""
    request: SipMessage
    """The request, Via and all."""


@dataclass(frozen=True)
class TrunkStateChanged:
    """The keep-alive state changed."""

    before: TrunkState
    """State before."""
    after: TrunkState
    """State now."""
    reason: str
    """The outcome that moved it ("200", "timeout", "503"...)."""
    at: float
    """When, on the monitor's clock."""


@dataclass(frozen=True)
class RegistrationChanged:
    """The registration state changed."""

    before: RegistrationState
    """State before."""
    after: RegistrationState
    """State now."""
    reason: str
    """Why ("200", "403", "timeout", "credentials refused"...)."""
    at: float
    """When, on the monitor's clock."""
    expires_in: int | None = None
    """Lifetime the carrier granted, seconds (registered only)."""
    retry_in: float | None = None
    """Seconds until the next attempt (failed only)."""


Output = SendRequest | TrunkStateChanged | RegistrationChanged


class TrunkMonitor:
    """Registration and keep-alive of one carrier trunk (sans-IO)."""

    def __init__(
        self,
        trunk: Any,
        *,
        local: Source,
        now: float,
        user_agent: str = "edgecc",
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        """``trunk`` is ``SiteConfig.trunk`` with a carrier; ``local`` is the address the
        carrier reaches the site at (Via sent-by and Contact)."""
        if trunk.carrier is None:
            raise ValueError("trunk monitor needs trunk.carrier")
        if trunk.registration and trunk.auth is None:
            raise ValueError("trunk registration needs trunk.auth")
        self.trunk = trunk
        self.carrier = trunk.carrier
        self.local = local
        self.user_agent = user_agent
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self.state = TrunkState.UNKNOWN
        """The keep-alive state: up, down or unknown."""
        self.state_since = now
        self.failures = 0
        """OPTIONS failed in a row."""
        self.registration = (
            RegistrationState.REGISTERING if trunk.registration else RegistrationState.DISABLED)
        self.registration_since = now
        self.registered_until: float | None = None
        """When the current registration ends (monitor clock), None when not registered."""
        self.last_reason = ""
        # Registration dialog-ish identity (RFC 3261 §10.2.4: same Call-ID, growing CSeq).
        self._call_id = f"{new_tag()}{new_tag()}@{local.host}"
        self._from_tag = new_tag()
        self._cseq = 0
        self._expires = int(trunk.register_expires)
        self._register_at: float | None = now if trunk.registration else None
        self._register_out = False
        self._answered_fresh = False  # a challenge of this attempt was answered already
        self._same_attempt = False  # the next REGISTER answers a challenge or a 423
        self._challenge: tuple[str, dict[str, str]] | None = None  # (header name, params)
        self._nc = 0
        self._backoff = 0.0
        interval = trunk.options_interval
        self._options_at: float | None = now if interval is not None else None
        self._options_out = False
        self._options_sent_at = now

    # -- time --------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must next run, or None."""
        due = [t for t in (self._register_at, self._options_at) if t is not None]
        return min(due) if due else None

    def handle_timer(self, now: float) -> list[Output]:
        """Send what is due: a registration (first, refresh, retry) and/or a keep-alive."""
        out: list[Output] = []
        if self._register_at is not None and self._register_at <= now and not self._register_out:
            self._register_at = None
            if not self._same_attempt:
                self._answered_fresh = False
            self._same_attempt = False
            if self.registration is not RegistrationState.REGISTERED:
                self._set_registration(RegistrationState.REGISTERING, "attempt", now, out)
            out.append(SendRequest("register", self._register_request()))
        if self._options_at is not None and self._options_at <= now and not self._options_out:
            self._options_at = None
            self._options_out = True
            self._options_sent_at = now
            out.append(SendRequest("options", self._options_request()))
        return out

    # -- outcomes ----------------------------------------------------------------------------

    def response(self, kind: str, response: SipMessage, now: float) -> list[Output]:
        """A final response to the request of ``kind``; provisional ones are ignored."""
        status = response.status
        if status < 200:
            return []
        if kind == "options":
            return self._options_done(_answered(status), str(status), now)
        return self._register_response(response, now)

    def failure(self, kind: str, reason: str, now: float) -> list[Output]:
        """The request of ``kind`` got no response ("timeout") or could not be sent."""
        if kind == "options":
            return self._options_done(False, reason, now)
        out: list[Output] = []
        self._register_failed(reason, now, out)
        return out

    def snapshot(self, now: float) -> dict[str, Any]:
        """The monitor's view for status displays (seconds relative to ``now``)."""
        return {
            "carrier": f"{self.carrier.host}:{self.carrier.port}",
            "state": self.state.value,
            "state_for_s": round(now - self.state_since, 1),
            "failures": self.failures,
            "registration": self.registration.value,
            "registered_for_s": (round(self.registered_until - now, 1)
                                 if self.registered_until is not None else None),
            "reason": self.last_reason,
        }

    # -- keep-alive --------------------------------------------------------------------------

    def _options_done(self, answered: bool, reason: str, now: float) -> list[Output]:
        out: list[Output] = []
        self._options_out = False
        if answered:
            self.failures = 0
            probe = Probe.ANSWERED
        else:
            self.failures += 1
            limit = self.trunk.options_failures
            probe = Probe.FAILED_LIMIT if self.failures >= limit else Probe.FAILED
        after = TRANSITIONS[(self.state, probe)]
        if after is not self.state:
            out.append(TrunkStateChanged(self.state, after, reason, now))
            self.state = after
            self.state_since = now
        self.last_reason = reason
        interval = self.trunk.options_interval
        if interval is not None:
            self._options_at = max(now, self._options_sent_at + interval)
        return out

    def _options_request(self) -> SipMessage:
        return self._request("OPTIONS", 1, call_id=f"{new_tag()}{new_tag()}@{self.local.host}",
                             from_tag=new_tag(), extra=[("Accept", "application/sdp")])

    # -- registration ------------------------------------------------------------------------

    def _register_request(self) -> SipMessage:
        self._register_out = True
        self._cseq += 1
        extra = [("Contact", f"<{self._contact_uri()}>"), ("Expires", str(self._expires))]
        if self._challenge is not None:
            header, params = self._challenge
            self._nc += 1
            extra.append((header, self._authorization(params)))
        return self._request("REGISTER", self._cseq, call_id=self._call_id,
                             from_tag=self._from_tag, extra=extra)

    def _register_response(self, response: SipMessage, now: float) -> list[Output]:
        out: list[Output] = []
        self._register_out = False
        status = response.status
        if status in (401, 407):
            self._answer_challenge(response, now, out)
        elif 200 <= status < 300:
            granted = self._granted_expires(response)
            self._backoff = 0.0
            self.registered_until = now + granted
            self._register_at = now + _refresh_after(granted)
            self._set_registration(RegistrationState.REGISTERED, str(status), now, out,
                                   expires_in=granted)
        elif status == 423:
            wanted = _int_header(response, "Min-Expires")
            if wanted is None or wanted <= self._expires or wanted > 86400:
                self._register_failed("423 without a usable Min-Expires", now, out)
            else:
                self._expires = wanted  # §10.2.8: ask again with at least Min-Expires
                self._same_attempt = True
                self._register_at = now
        else:
            retry_after = _int_header(response, "Retry-After") if status == 503 else None
            self._register_failed(str(status), now, out, retry_after=retry_after)
        return out

    def _answer_challenge(self, response: SipMessage, now: float, out: list[Output]) -> None:
        header = "Proxy-Authorization" if response.status == 407 else "Authorization"
        offers = []
        name = "Proxy-Authenticate" if response.status == 407 else "WWW-Authenticate"
        for value in _raw_values(response, name):
            with contextlib.suppress(ValueError):
                offers.append(parse_challenge(value))
        chosen = self._choose(offers)
        if chosen is None:
            self._register_failed(f"{response.status} without a usable digest challenge",
                                  now, out)
            return
        stale = chosen.get("stale", "").lower() == "true"
        if self._answered_fresh and not stale:
            # We answered this attempt's own challenge and were refused: wrong credentials.
            self._challenge = None
            self._register_failed("credentials refused", now, out)
            return
        self._challenge = (header, chosen)
        self._nc = 0
        self._answered_fresh = True
        self._same_attempt = True
        self._register_at = now  # answer at once (the caller runs handle_timer)

    def _choose(self, offers: list[dict[str, str]]) -> dict[str, str] | None:
        """SHA-256 when offered and its HA1 is configured, else MD5 (RFC 8760 §2.4)."""
        auth = self.trunk.auth
        by_alg: dict[str, dict[str, str]] = {}
        for params in offers:
            if auth.realm and params.get("realm") != auth.realm:
                continue  # HA1 is bound to its realm (RFC 7616 §3.4.2)
            by_alg.setdefault(params.get("algorithm", "MD5").upper(), params)
        if "SHA-256" in by_alg and auth.ha1_sha256:
            return by_alg["SHA-256"]
        return by_alg.get("MD5")

    def _authorization(self, params: dict[str, str]) -> str:
        auth = self.trunk.auth
        algorithm = params.get("algorithm", "MD5").upper()
        ha1 = auth.ha1_sha256 if algorithm == "SHA-256" else auth.ha1_md5
        return authorization_from_ha1(params, method="REGISTER", uri=self._request_uri(),
                                      username=auth.user, ha1=ha1.lower(), nc=self._nc)

    def _granted_expires(self, response: SipMessage) -> int:
        # §10.2.4: the 200 lists our binding with the lifetime granted; else Expires; else ours.
        ours = contact_key(self._contact_uri())
        with contextlib.suppress(RemoteProtocolError, ValueError):
            for contact in response.contacts:
                if contact_key(str(contact.uri)) == ours:
                    text = contact.params.get("expires")
                    if text is not None and text.strip().isdigit():
                        return max(1, int(text.strip()))
        header = _int_header(response, "Expires")
        if header is not None and header > 0:
            return header
        return self._expires

    def _register_failed(self, reason: str, now: float, out: list[Output], *,
                         retry_after: int | None = None) -> None:
        self._register_out = False
        self._backoff = (self.backoff_first if not self._backoff
                         else min(self._backoff * 2, self.backoff_max))
        wait = max(self._backoff, float(retry_after or 0))
        if self.registered_until is not None and self.registered_until > now:
            # Still registered for a while: try again before it ends if that comes first.
            wait = min(wait, max(1.0, (self.registered_until - now) / 2))
        else:
            self.registered_until = None
        self._register_at = now + wait
        self._set_registration(RegistrationState.FAILED, reason, now, out, retry_in=wait)

    def _set_registration(self, state: RegistrationState, reason: str, now: float,
                          out: list[Output], *, expires_in: int | None = None,
                          retry_in: float | None = None) -> None:
        self.last_reason = reason
        # A refresh is no change; a failure is reported each time (its reason and retry).
        if state is self.registration and state is not RegistrationState.FAILED:
            return
        out.append(RegistrationChanged(self.registration, state, reason, now,
                                       expires_in=expires_in, retry_in=retry_in))
        if state is not self.registration:
            self.registration_since = now
        self.registration = state

    # -- messages ----------------------------------------------------------------------------

    def _request_uri(self) -> str:
        carrier = self.carrier
        uri = f"sip:{carrier.host}:{carrier.port}"
        if carrier.transport != "UDP":
            uri += f";transport={carrier.transport.lower()}"
        return uri

    def _contact_uri(self) -> str:
        user = self.trunk.auth.user if self.trunk.auth is not None else "edgecc"
        uri = f"sip:{user}@{self.local.host}:{self.local.port}"
        if self.local.transport != "UDP":
            uri += f";transport={self.local.transport.lower()}"
        return uri

    def _request(self, method: str, cseq: int, *, call_id: str, from_tag: str,
                 extra: list[tuple[str, str]]) -> SipMessage:
        auth = self.trunk.auth
        user = auth.user if auth is not None else "edgecc"
        domain = auth.realm if auth is not None and method == "REGISTER" else self.carrier.host
        aor = f"sip:{user}@{domain}"
        local = self.local
        return build_request(method, self._request_uri(), headers=[
            ("Via", f"SIP/2.0/{local.transport} {local.host}:{local.port};"
                    f"branch={new_branch()};rport"),
            ("Max-Forwards", "70"),
            ("From", f"<{aor}>;tag={from_tag}"),
            ("To", f"<{aor}>"),
            ("Call-ID", call_id),
            ("CSeq", f"{cseq} {method}"),
            *extra,
            ("User-Agent", self.user_agent),
        ])


def _answered(status: int) -> bool:
    # Any answer shows the carrier is there; 5xx/6xx and 408 say it cannot serve us now.
    return status < 500 and status != 408


def _refresh_after(granted: int) -> float:
    return granted - REFRESH_MARGIN if granted > 2 * REFRESH_MARGIN else granted / 2


def _int_header(message: SipMessage, name: str) -> int | None:
    value = message.get(name)
    if value is None:
        return None
    text = value.split(";", 1)[0].split("(", 1)[0].strip()  # Retry-After may carry a comment
    return int(text) if text.isdigit() and len(text) <= 10 else None


def _raw_values(message: SipMessage, name: str) -> list[str]:
    # Challenges hold commas, so each field line is one challenge (RFC 7235 §4.1).
    return [value for header, value in message.headers if header == name]


# -------------------------------------------------------------------------------------------
# The asyncio adapter


class TrunkLink:
    """Runs a ``TrunkMonitor`` on the SIP service: sends, timers, logs, status row."""

    def __init__(self, monitor: TrunkMonitor, service: Any, destination: Source, *,
                 database: str | None = None,
                 on_change: Callable[[Output], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.monitor = monitor
        self.service = service
        self.destination = destination
        self.database = database
        self.on_change = on_change
        self.clock = clock
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self._row: dict[str, Any] | None = None  # the latest status, not yet written
        self._writer: asyncio.Task | None = None

    @property
    def state(self) -> TrunkState:
        """The keep-alive state (``TrunkMonitor.state``)."""
        return self.monitor.state

    @classmethod
    async def start(cls, config: Any, service: Any, *, database: str | None = None,
                    on_change: Callable[[Output], None] | None = None,
                    **monitor_options: Any) -> TrunkLink | None:
        """Start registration/keep-alive for ``config.trunk``; None when there is no carrier
        or nothing to do (no registration and keep-alives disabled)."""
        trunk = config.trunk
        if trunk.carrier is None or (not trunk.registration and trunk.options_interval is None):
            return None
        carrier = trunk.carrier
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(carrier.host, carrier.port, type=socket.SOCK_DGRAM)
        host = infos[0][4][0]
        destination = Source(carrier.transport, host, carrier.port)
        bound = service.addresses.get(carrier.transport)
        if bound is None:
            raise ValueError(f"no SIP {carrier.transport} listener for the trunk")
        local = Source(carrier.transport, _local_host(bound[0], host, carrier.port), bound[1])
        clock = getattr(service, "clock", time.monotonic)
        monitor = TrunkMonitor(trunk, local=local, now=clock(), **monitor_options)
        link = cls(monitor, service, destination, database=database, on_change=on_change,
                   clock=clock)
        log.info("event=trunk_start carrier=%s:%d register=%s options_interval=%s",
                 carrier.host, carrier.port, trunk.registration, trunk.options_interval)
        link._record()
        link._tick()
        return link

    async def stop(self) -> None:
        """Stop sending; the pending status write finishes."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)

    def _tick(self) -> None:
        self._timer = None
        if self._closed:
            return
        self._carry_out(self.monitor.handle_timer(self.clock()))

    def _on_event(self, kind: str, event: Event) -> None:
        if self._closed:
            return
        now = self.clock()
        if isinstance(event, ResponseReceived):
            outputs = self.monitor.response(kind, event.response, now)
        elif isinstance(event, TransactionTimeout):
            outputs = self.monitor.failure(kind, "timeout", now)
        elif isinstance(event, TransportFailed):
            outputs = self.monitor.failure(kind, "transport error", now)
        else:
            return
        self._carry_out(outputs)
        self._record()  # every outcome: doctor sees how fresh the status is

    def _carry_out(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, SendRequest):
                try:
                    self.service.send_request(
                        output.request, self.destination,
                        on_event=functools.partial(self._on_event, output.kind))
                except Exception:
                    log.exception("event=trunk_send_failed kind=%s", output.kind)
                    self._carry_out(self.monitor.failure(output.kind, "send failed",
                                                         self.clock()))
                continue
            if isinstance(output, TrunkStateChanged):
                log.info("event=trunk_state from=%s to=%s reason=%s carrier=%s:%d",
                         output.before.value, output.after.value, output.reason.replace(" ", "_"),
                         self.monitor.carrier.host, self.monitor.carrier.port)
            else:
                log.info("event=trunk_registration from=%s to=%s reason=%s expires_in=%s "
                         "retry_in=%s", output.before.value, output.after.value,
                         output.reason.replace(" ", "_"), output.expires_in,
                         None if output.retry_in is None else round(output.retry_in, 1))
            if self.on_change is not None:
                try:
                    self.on_change(output)
                except Exception:
                    log.exception("event=trunk_on_change_failed")
        self._arm()

    def _arm(self) -> None:
        if self._closed:
            return
        due = self.monitor.next_timer()
        if due is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, due - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)

    def _record(self) -> None:
        if self.database is None:
            return
        self._row = _status_row(self.monitor, self.clock())
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_latest())

    async def _write_latest(self) -> None:
        # One writer, off the loop, always the newest row: writes never land out of order.
        while self._row is not None and self.database is not None:
            row, self._row = self._row, None
            await asyncio.to_thread(_write_status, self.database, row)


def _local_host(bound: str, carrier_host: str, carrier_port: int) -> str:
    """The address the carrier sees: the listener's, or for a wildcard bind the source the
    kernel picks toward the carrier."""
    if bound not in ("0.0.0.0", "::"):
        return bound
    family = socket.AF_INET6 if ":" in carrier_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((carrier_host, carrier_port))  # UDP connect sends nothing
        return str(probe.getsockname()[0])


def _status_row(monitor: TrunkMonitor, now: float) -> dict[str, Any]:
    wall = time.time()
    registered_until = (None if monitor.registered_until is None
                        else wall + (monitor.registered_until - now))
    return {
        "carrier": f"{monitor.carrier.host}:{monitor.carrier.port}",
        "state": monitor.state.value,
        "state_since": wall - (now - monitor.state_since),
        "failures": monitor.failures,
        "registration": monitor.registration.value,
        "registered_until": registered_until,
        "reason": monitor.last_reason[:200],
        "options_interval": monitor.trunk.options_interval,
        "updated_at": wall,
    }


def _write_status(database: str, row: dict[str, Any]) -> None:
    conn = sqlite3.connect(database, timeout=10.0)
    try:
        with conn:
            conn.execute(f"DELETE FROM {STATUS_TABLE} WHERE carrier != ?", (row["carrier"],))
            conn.execute(
                f"INSERT OR REPLACE INTO {STATUS_TABLE} ({', '.join(row)}) "
                f"VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
    except sqlite3.Error as exc:
        log.warning("event=trunk_status_write_failed error=%s", type(exc).__name__)
    finally:
        conn.close()


def read_trunk_status(database: str) -> dict[str, Any] | None:
    """The last trunk status the appliance recorded, or None (read-only; for doctor)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5.0)
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute(f"SELECT * FROM {STATUS_TABLE} ORDER BY updated_at DESC").fetchone()
    except sqlite3.OperationalError:
        return None  # an older schema without the table
    finally:
        conn.close()
    return dict(row) if row is not None else None
