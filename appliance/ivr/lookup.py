"""The IVR's CRM look-up: carries out an ``ivr.HttpLookup`` and answers with ``ivr.HttpResult``.

``CrmLookup.lookup(action)`` asks the customer's web service about the caller over HTTP/1.1
(RFC 9112), one connection per look-up with ``Connection: close`` (the same client shape as
``appliance.webhooks``): a ``POST`` with the JSON body ``{"caller", "dialled", "variables"}``,
or a ``GET`` with ``caller`` and ``dialled`` in the query. Everything (waiting for a free slot,
connecting, sending, reading) must finish within the node's timeout, and the answer must be a
2xx JSON object of at most ``max_body_bytes``. Any failure (timeout, refused connection, another
status, a body that is not JSON or not an object, too big, a broken response) is an HttpResult
with ``error`` set, which sends the flow to the node's fallback; the failure is logged
``key=value`` with the reason and the service's host, never the body, the query or the headers
(they carry customer data and API keys).

At most ``max_concurrent`` look-ups run at once on the site; a look-up that finds no free slot
before its timeout fails with ``busy``. The runner maps the fields of the answer into flow
variables (``HttpNode.map``), including ``priority`` and ``tier``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httptools

from appliance.ivr.runner import HttpLookup, HttpResult
from appliance.log import kv

__all__ = ["CrmLookup", "LookupStats", "listed_customer"]

log = logging.getLogger("edgecc.ivr.lookup")

MAX_BODY_BYTES = 64 * 1024
"""Default limit of an answer's body; a CRM record for one caller is far smaller."""
MAX_HEADER_BYTES = 16 * 1024
"""Status line and headers of an answer, in all."""
MAX_REQUEST_BYTES = 64 * 1024
"""A request larger than this (many or long flow variables) is not sent."""
READ_CHUNK = 16 * 1024


class _LookupFailed(Exception):
    """One look-up failed; the message is the reason that goes to the log and the flow."""


@dataclass
class LookupStats:
    """Counters since start, for health pages and tests."""

    started: int = 0
    succeeded: int = 0
    failed: int = 0
    busy: int = 0
    """Failed because every slot was taken until the timeout."""
    in_flight: int = 0
    most_in_flight: int = 0
    """The highest number of look-ups that held a slot at once."""


class _Response:
    """httptools callbacks: status, Content-Length, body within its limit."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.headers_done = False
        self.complete = False
        self.content_length: int | None = None
        self.chunked = False
        self.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length":
            try:
                self.content_length = int(value)
            except ValueError:
                raise _LookupFailed("bad-content-length") from None
            if self.content_length > self.max_body:
                raise _LookupFailed("too-big")
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self.chunked = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, data: bytes) -> None:
        if len(self.body) + len(data) > self.max_body:
            raise _LookupFailed("too-big")
        self.body += data

    def on_message_complete(self) -> None:
        self.complete = True


class CrmLookup:
    """Runs the IVR's HTTP look-ups for the whole site, a bounded number at a time."""

    def __init__(self, *, max_concurrent: int = 8, max_body_bytes: int = MAX_BODY_BYTES,
                 user_agent: str = "edgecc-ivr",
                 ssl_context: ssl.SSLContext | None = None) -> None:
        """``ssl_context`` verifies https services (default: the system's CAs, hostname
        checked); give one that trusts a private CA for a CRM inside the customer's network."""
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
        self.max_concurrent = max_concurrent
        self.max_body_bytes = max_body_bytes
        self.user_agent = user_agent
        self.ssl_context = ssl_context
        self.stats = LookupStats()
        self._slots = asyncio.Semaphore(max_concurrent)
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def submit(self, action: HttpLookup, done: Callable[[HttpResult], None],
               *, call: str = "") -> asyncio.Task[None]:
        """Start ``action`` on the running loop; ``done(result)`` is called with its answer
        (never when the task is cancelled, e.g. because the caller hung up). Cancel the
        returned task when the call ends. An exception raised by ``done`` is logged."""
        task = asyncio.get_running_loop().create_task(self._run(action, done, call),
                                                      name=f"ivr-lookup-{call}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self) -> None:
        """Cancel the look-ups still running and wait for them to end."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, action: HttpLookup, done: Callable[[HttpResult], None],
                   call: str) -> None:
        result = await self.lookup(action, call=call)
        try:
            done(result)
        except Exception:
            log.exception(kv(event="ivr_lookup_callback_failed", call=call))

    async def lookup(self, action: HttpLookup, *, call: str = "") -> HttpResult:
        """Carry out ``action``; never raises (but for cancellation): a failure is an
        HttpResult with ``error`` set."""
        started = time.monotonic()
        self.stats.started += 1
        parts = urlsplit(action.url)
        host = parts.hostname or ""
        holding = False
        try:
            if self._closed:
                raise _LookupFailed("closed")
            async with asyncio.timeout(action.timeout):
                await self._slots.acquire()
                holding = True
                self.stats.in_flight += 1
                self.stats.most_in_flight = max(self.stats.most_in_flight, self.stats.in_flight)
                status, body = await self._exchange(action)
        except TimeoutError:
            if not holding:
                self.stats.busy += 1
                return self._failed(action, call, host, started, "busy")
            return self._failed(action, call, host, started, "timeout")
        except _LookupFailed as exc:
            return self._failed(action, call, host, started, str(exc))
        except ssl.SSLError as exc:
            return self._failed(action, call, host, started, f"tls-{exc.reason or 'error'}")
        except ConnectionRefusedError:
            return self._failed(action, call, host, started, "connection-refused")
        except OSError as exc:
            return self._failed(action, call, host, started,
                                f"network-{exc.strerror or type(exc).__name__}")
        finally:
            if holding:
                self.stats.in_flight -= 1
                self._slots.release()
        if not 200 <= status < 300:
            return self._failed(action, call, host, started, f"status {status}", status)
        try:
            decoded = json.loads(body)
        except (ValueError, RecursionError):
            return self._failed(action, call, host, started, "bad-json", status)
        if not isinstance(decoded, dict):
            return self._failed(action, call, host, started, "not-a-json-object", status)
        self.stats.succeeded += 1
        log.info(kv(event="ivr_lookup", call=call, host=host, status=status,
                    ms=round((time.monotonic() - started) * 1000)))
        return HttpResult(action.request_id, status, decoded)

    def _failed(self, action: HttpLookup, call: str, host: str, started: float, reason: str,
                status: int | None = None) -> HttpResult:
        self.stats.failed += 1
        log.warning(kv(event="ivr_lookup_failed", call=call, host=host, reason=reason,
                       ms=round((time.monotonic() - started) * 1000)))
        return HttpResult(action.request_id, status, None, reason)

    async def _exchange(self, action: HttpLookup) -> tuple[int, bytes]:
        request, host, port, tls = self._request(action)
        context = (self.ssl_context or ssl.create_default_context()) if tls else None
        reader, writer = await asyncio.open_connection(
            host, port, ssl=context, server_hostname=host if tls else None,
            limit=READ_CHUNK)
        try:
            writer.write(request)
            await writer.drain()
            return await self._read(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def _request(self, action: HttpLookup) -> tuple[bytes, str, int, bool]:
        parts = urlsplit(action.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _LookupFailed("bad-url")
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError:
            raise _LookupFailed("bad-url") from None
        target = parts.path or "/"
        query = parts.query
        body = b""
        method = action.method.upper()
        if method == "GET":
            extra = urlencode({k: str(action.payload.get(k) or "") for k in ("caller", "dialled")})
            query = f"{query}&{extra}" if query else extra
        elif method == "POST":
            body = json.dumps(action.payload, separators=(",", ":"), default=str).encode()
        else:
            raise _LookupFailed("bad-method")
        if query:
            target = f"{target}?{query}"
        authority = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port:
            authority = f"{authority}:{parts.port}"
        lines = [f"{method} {target} HTTP/1.1", f"Host: {authority}",
                 "Accept: application/json", "Connection: close",
                 f"User-Agent: {self.user_agent}"]
        if method == "POST":
            lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in _safe_headers(action.headers)]
        try:
            head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            raise _LookupFailed("bad-header") from None
        if len(head) + len(body) > MAX_REQUEST_BYTES:
            raise _LookupFailed("request-too-big")
        return head + body, parts.hostname, port, tls

    async def _read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        response = _Response(self.max_body_bytes)
        parser = httptools.HttpResponseParser(response)
        received = 0
        while not response.complete:
            data = await reader.read(READ_CHUNK)
            if not data:
                break
            received += len(data)
            if not response.headers_done and received > MAX_HEADER_BYTES:
                raise _LookupFailed("headers-too-big")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, _LookupFailed):
                    raise cause from None
                raise _LookupFailed("bad-http") from None
            except _LookupFailed:
                raise
        if not response.headers_done:
            raise _LookupFailed("no-answer" if received == 0 else "bad-http")
        if not response.complete and (response.content_length is not None or response.chunked):
            raise _LookupFailed("truncated")
        # RFC 9112 §6.3 item 8: without a length the body runs until the connection closes.
        return parser.get_status_code(), bytes(response.body)


def listed_customer(customers: Mapping[str, Any], caller: str) -> dict[str, Any] | None:
    """The caller's entry in the site's customer list (``ivr.customers``) as the ``customer``
    argument of FlowRun, or None. Numbers match exactly as written in the list."""
    entry = customers.get(caller)
    if entry is None:
        return None
    if isinstance(entry, Mapping):
        return {"priority": entry.get("priority"), "tier": entry.get("tier")}
    return {"priority": getattr(entry, "priority", None), "tier": getattr(entry, "tier", None)}


def _safe_headers(headers: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Headers from the node, checked again here (a flow built in code skips the loader)."""
    out = []
    for name, value in headers.items():
        text = str(value)
        if any(c in f"{name}{text}" for c in "\r\n\0") or not name or ":" in name:
            raise _LookupFailed("bad-header")
        out.append((name, text))
    return out
