"""Outgoing webhooks: the appliance POSTs events (alerts, screen pops, call events) as JSON to
an integrator's URL, signed, retried, never in the way of a call.

``WebhookSender.post(kind, payload)`` only puts the event in a bounded queue and returns; one
task delivers the queue in order over HTTP/1.1 (RFC 9112), a new connection per delivery with
``Connection: close``. A delivery that fails on the network, times out, or gets 408, 429 or a
5xx is tried again after ``backoff_s``, doubling each time (with up to 10 % jitter so many
sites do not retry in step), ``retries`` times at most; any other 4xx is final. When the queue
is full the new event is dropped: drops and deliveries given up are counted and logged, never
raised.

Each request carries::

    Content-Type: application/json
    X-Edgecc-Event: <kind>
    X-Edgecc-Delivery: <id, the same on every retry of one event: the receiver's idempotency key>
    X-Edgecc-Timestamp: <unix seconds of this attempt>
    X-Edgecc-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>   (with a secret)

and the body ``{"id", "kind", "site", "at", "payload"}``. The receiver recomputes the HMAC
over the timestamp and the raw body, compares in constant time and refuses an old timestamp,
so a captured request cannot be replayed later (docs/alerts.md, "Webhooks").
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from appliance.log import kv

log = logging.getLogger("edgecc.webhooks")

MAX_BODY_BYTES = 256 * 1024
"""Largest request body; a bigger event is dropped (and counted), never sent in part."""
MAX_RESPONSE_LINE = 8192
"""Longest status line read back; the rest of the answer is not needed."""
MAX_BACKOFF_S = 60.0
_RETRIED_STATUS = frozenset({408, 429})


class WebhookConfigError(ValueError):
    """The webhook URL or settings cannot work (the message says which)."""


@dataclass(frozen=True)
class _Delivery:
    id: str
    kind: str
    body: bytes


@dataclass
class WebhookStats:
    """What a sender did since it started."""

    queued: int = 0
    """Events accepted by ``post``."""
    delivered: int = 0
    """Events the receiver answered with 2xx."""
    attempts: int = 0
    """HTTP requests made (first tries and retries)."""
    failed: int = 0
    """Events given up after the last retry or a final 4xx."""
    dropped: int = 0
    """Events refused by ``post`` (queue full, closed, not JSON, too big)."""


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    """The ``X-Edgecc-Signature`` value of a request (receivers use it to check one)."""
    mac = hmac.new(secret, timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


class WebhookSender:
    """Delivers posted events to one URL (see the module docstring)."""

    def __init__(self, url: str, *, secret: bytes | None, timeout_s: float = 2.0,
                 retries: int = 5, backoff_s: float = 0.5, queue_limit: int = 10000,
                 site: str = "") -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookConfigError(f"webhook url must be http:// or https://HOST/..., "
                                     f"got {url!r}")
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or queue_limit < 1:
            raise WebhookConfigError("timeout_s and queue_limit must be positive, retries and "
                                     "backoff_s not negative")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = parts.scheme == "https"
        self._target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._secret = secret
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.site = site
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue(maxsize=queue_limit)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.stats = WebhookStats()

    async def start(self) -> None:
        """Start delivering (on the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self, drain_s: float = 2.0) -> None:
        """Stop: deliver what is queued for at most ``drain_s`` seconds, then give up the rest
        (counted as dropped)."""
        self._closed = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), drain_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self.stats.dropped += 1

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued event is delivered or given up; False on timeout."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            return False
        return True

    def post(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Queue one event for delivery; never blocks, never raises."""
        try:
            if self._closed:
                raise _Drop("sender closed")
            delivery_id = uuid.uuid4().hex
            data = json.dumps({"id": delivery_id, "kind": kind, "site": self.site,
                               "at": time.time(), "payload": payload}, separators=(",", ":"),
                              allow_nan=False).encode("utf-8")
            if len(data) > MAX_BODY_BYTES:
                raise _Drop(f"body of {len(data)} bytes over {MAX_BODY_BYTES}")
            self._queue.put_nowait(_Delivery(delivery_id, kind, data))
            self.stats.queued += 1
        except asyncio.QueueFull:
            self._dropped(kind, "queue full")
        except (_Drop, TypeError, ValueError) as exc:
            self._dropped(kind, str(exc))

    def _dropped(self, kind: str, why: str) -> None:
        self.stats.dropped += 1
        log.warning(kv(event="webhook_dropped", kind=kind, reason=why,
                       dropped=self.stats.dropped))

    async def _run(self) -> None:
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except asyncio.CancelledError:
                self.stats.dropped += 1  # closed while this one was still being tried
                raise
            except Exception:  # never let one event stop the others
                log.exception(kv(event="webhook_failed", kind=delivery.kind, id=delivery.id))
                self.stats.failed += 1
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: _Delivery) -> None:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            self.stats.attempts += 1
            try:
                status = await asyncio.wait_for(self._request(delivery), self.timeout_s)
                why = f"status {status}"
            except (OSError, TimeoutError, ValueError) as exc:
                status, why = None, type(exc).__name__
            if status is not None and 200 <= status < 300:
                self.stats.delivered += 1
                return
            final = status is not None and status < 500 and status not in _RETRIED_STATUS
            if final or attempt == self.retries:
                self.stats.failed += 1
                log.error(kv(event="webhook_gave_up", kind=delivery.kind, id=delivery.id,
                             attempts=attempt + 1, reason=why))
                return
            log.info(kv(event="webhook_retry", kind=delivery.kind, id=delivery.id,
                        attempt=attempt + 1, reason=why))
            await asyncio.sleep(delay * (1 + random.random() / 10))  # backoff, not a wait
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def _request(self, delivery: _Delivery) -> int:
        context = ssl.create_default_context() if self._tls else None
        reader, writer = await asyncio.open_connection(self._host, self._port, ssl=context)
        try:
            stamp = str(int(time.time()))
            host = self._host if ":" not in self._host else f"[{self._host}]"
            lines = [f"POST {self._target} HTTP/1.1", f"Host: {host}:{self._port}",
                     "Content-Type: application/json", f"Content-Length: {len(delivery.body)}",
                     "Connection: close", "User-Agent: edgecc-webhooks",
                     f"X-Edgecc-Event: {delivery.kind}", f"X-Edgecc-Delivery: {delivery.id}",
                     f"X-Edgecc-Timestamp: {stamp}"]
            if self._secret is not None:
                lines.append(f"X-Edgecc-Signature: {sign(self._secret, stamp, delivery.body)}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + delivery.body)
            await writer.drain()
            status_line = await reader.readuntil(b"\r\n")
            if len(status_line) > MAX_RESPONSE_LINE:
                raise ValueError("status line too long")
            # RFC 9112 §4: status-line = HTTP-version SP status-code SP [ reason-phrase ]
            version, _, rest = status_line.decode("latin-1").partition(" ")
            if not version.startswith("HTTP/1.") or len(rest) < 3 or not rest[:3].isdigit():
                raise ValueError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
            return int(rest[:3])
        except asyncio.IncompleteReadError as exc:
            raise ValueError("connection closed before a status line") from exc
        except asyncio.LimitOverrunError as exc:
            raise ValueError("status line too long") from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)


class _Drop(Exception):
    pass


class Poster(Protocol):
    """Anything events can be posted to (a sender, a router of senders)."""

    def post(self, kind: str, payload: Mapping[str, Any]) -> None: ...


class WebhookTargetSettings(Protocol):
    """What ``site.yaml``'s ``webhooks:`` entries give (``appliance.config.WebhookTarget``)."""

    url: str
    secret_file: Path | None
    kinds: tuple[str, ...]
    timeout: float
    retries: int
    backoff: float
    queue_limit: int


def load_secret(path: Path) -> bytes:
    """The signing key in ``path`` (surrounding whitespace removed); WebhookConfigError when
    the file is missing, empty or readable by others."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes().strip()
    except OSError as exc:
        raise WebhookConfigError(f"webhook secret_file {path}: {exc.strerror}") from None
    if mode & 0o077:
        raise WebhookConfigError(f"webhook secret_file {path} must not be readable by group or "
                                 f"others (chmod 600)")
    if len(data) < 16:
        raise WebhookConfigError(f"webhook secret_file {path} must hold at least 16 bytes")
    return data


class WebhookRouter:
    """One sender per configured URL; ``post`` hands each event to the URLs that asked for
    its kind."""

    def __init__(self, targets: Iterable[WebhookTargetSettings], *, site: str = "") -> None:
        self.routes: list[tuple[frozenset[str], WebhookSender]] = []
        for target in targets:
            secret = None if target.secret_file is None else load_secret(target.secret_file)
            sender = WebhookSender(target.url, secret=secret, timeout_s=target.timeout,
                                   retries=target.retries, backoff_s=target.backoff,
                                   queue_limit=target.queue_limit, site=site)
            self.routes.append((frozenset(target.kinds), sender))

    async def start(self) -> None:
        """Start every sender."""
        for _, sender in self.routes:
            await sender.start()

    async def close(self, drain_s: float = 2.0) -> None:
        """Close every sender (see ``WebhookSender.close``)."""
        for _, sender in self.routes:
            await sender.close(drain_s)

    def post(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Queue the event for every URL that takes ``kind``; never blocks, never raises."""
        for kinds, sender in self.routes:
            if kind in kinds:
                sender.post(kind, payload)


SCREEN_POP_FIELDS = ("call_id", "caller", "dialled", "queue", "agent", "priority", "tier",
                     "flow")


SCREEN_POP_CALLS = 10_000
"""Offered calls whose facts are kept for their later ``call.ringing`` (oldest forgotten)."""


class ScreenPop:
    """Posts a ``screen.pop`` for each offered call: who calls, what they dialled, what the
    IVR learnt (variables, priority, tier), and the queue and agent once known.

    ``call.ringing`` names only the call, agent and queue: the facts of the call's earlier
    offer (caller, dialled number, flow, ...) are kept, bounded, and sent with it, so the pop
    the CRM gets when an agent's phone rings says who is calling."""

    def __init__(self, sender: Poster, *, calls: int = SCREEN_POP_CALLS) -> None:
        if calls < 1:
            raise ValueError(f"calls must be at least 1, got {calls}")
        self.sender = sender
        self._limit = calls
        self._known: OrderedDict[str, dict[str, Any]] = OrderedDict()

    @staticmethod
    def payload(call: Mapping[str, Any]) -> dict[str, Any]:
        """The screen-pop body of a call (fields missing from ``call`` are null)."""
        body: dict[str, Any] = {name: call.get(name) for name in SCREEN_POP_FIELDS}
        variables = call.get("variables")
        body["variables"] = dict(variables) if isinstance(variables, Mapping) else {}
        return body

    def offered(self, call: Mapping[str, Any]) -> None:
        """A call was offered (``call.offered``) or rang an agent (``call.ringing``)."""
        call_id = call.get("call_id")
        if isinstance(call_id, str) and call_id:
            known = self._known.pop(call_id, {})
            # What this event says wins; what it leaves out (null or absent) is kept.
            merged = {**known, **{k: v for k, v in call.items() if v is not None}}
            self._known[call_id] = merged
            while len(self._known) > self._limit:
                self._known.popitem(last=False)
            call = merged
        self.sender.post("screen.pop", self.payload(call))
