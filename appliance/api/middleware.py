"""ASGI middleware of the API: the audit trail and the request body limit.

Every state-changing request (any method but GET, HEAD, OPTIONS) leaves one ``audit_log`` row:
who (the token's user, or the name tried at login, or ``anonymous``), when, from where (the
client's address), what (method, path, or the handler's own action name) and the status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from appliance.api.users import UserStore
from appliance.log import kv

log = logging.getLogger("edgecc.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_BODY_BYTES = 64 * 1024
"""Largest request body accepted; every API body is a few hundred bytes."""
AUDIT_KEY = "edgecc.audit"


def note(request: Request, **fields: Any) -> None:
    """Add to the audit row of this request (``actor``, ``action`` and detail fields)."""
    record = request.scope.get(AUDIT_KEY)
    if record is not None:
        record.update(fields)


class ApiMiddleware:
    """Audit every state-changing request; refuse bodies over MAX_BODY_BYTES (413) and bodies
    of unknown length (411)."""

    def __init__(self, app: ASGIApp, users: UserStore) -> None:
        self.app = app
        self.users = users

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _body_refusal(scope)
        method = scope["method"]
        audited = method in SAFE_METHODS
        record: dict[str, Any] = {}
        status = 500

        async def send_audited(message: Message) -> None:
            nonlocal status, audited
            if message["type"] == "http.response.start" and not audited:
                # Written before the first byte of the answer goes out: a client that saw
                # the answer can rely on the row being there.
                status = message["status"]
                audited = True
                await self._audit(scope, record, status)
            await send(message)

        if not audited:
            scope[AUDIT_KEY] = record
        try:
            if refusal is not None:
                await _send_error(send_audited, *refusal)
            else:
                await self.app(scope, receive, send_audited)
        finally:
            if not audited:
                await self._audit(scope, record, status)

    async def _audit(self, scope: Scope, record: dict[str, Any], status: int) -> None:
        client = scope.get("client")
        source = f"{client[0]}:{client[1]}" if client else "unknown"
        actor = str(record.pop("actor", "anonymous"))
        action = str(record.pop("action", "http"))
        detail = {"method": scope["method"], "path": scope["path"], "status": status,
                  "source": source, **record}
        try:
            await asyncio.to_thread(self.users.audit, f"api:{actor}", action, **detail)
        except Exception as exc:  # the response is gone; never lose the fact silently
            log.error(kv(event="audit_failed", action=action, error=repr(exc)))


def _body_refusal(scope: Scope) -> tuple[int, str] | None:
    length = None
    chunked = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        try:
            if int(length) > MAX_BODY_BYTES:
                return 413, f"request body larger than {MAX_BODY_BYTES} bytes"
        except ValueError:
            return 400, "Content-Length is not a number"
    elif chunked:
        return 411, "send the body with a Content-Length"
    return None


async def _send_error(send: Send, status: int, message: str) -> None:
    from appliance.api.errors import error_response

    response = error_response(status, message)
    await send({"type": "http.response.start", "status": status,
                "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
