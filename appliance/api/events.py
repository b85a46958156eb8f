"""``/api/events``: a WebSocket streaming live events and heartbeats to any logged-in role.

The token comes as ``?token=...`` or, so it stays out of URLs and logs, as the first message
``{"token": "..."}`` within AUTH_TIMEOUT_S. The server then sends ``hello``, a ``heartbeat``
every ``heartbeat_s`` seconds, and every hub event the role may see. The token is checked again
at each heartbeat; when it has expired or was revoked the server says ``bye`` and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from appliance.api import ApiContext
from appliance.api.users import Principal, Role
from appliance.log import kv

log = logging.getLogger("edgecc.api")

AUTH_TIMEOUT_S = 5.0
MAX_CLIENT_MESSAGE_BYTES = 4096
# Application close codes (RFC 6455 §7.4.2: 4000-4999 are private use).
CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_SLOW = 4408
CLOSE_BAD_MESSAGE = 4400


def _dumps(message: dict[str, object]) -> str:
    return json.dumps(message, allow_nan=False, separators=(",", ":"))


def build_events_router(ctx: ApiContext) -> APIRouter:
    """The WebSocket route bound to ``ctx``."""
    router = APIRouter()

    @router.websocket("/api/events")
    async def events(websocket: WebSocket) -> None:
        await websocket.accept()
        principal = await _authenticate(ctx, websocket)
        if principal is None:
            return
        # Below supervisor, only the events of the agent this user acts for (hub.py).
        agent = (None if principal.role.allows(Role.SUPERVISOR) else
                 await asyncio.to_thread(ctx.users.agent_of, principal.user_id))
        subscription = ctx.hub.subscribe(principal.role, agent)
        reader = asyncio.create_task(_drain_client(websocket))
        try:
            await websocket.send_text(_dumps({
                "type": "hello", "name": principal.name, "role": principal.role.value,
                "heartbeat_s": ctx.heartbeat_s, "expires_at": principal.expires_at}))
            while not reader.done():
                getter = asyncio.ensure_future(subscription.get(ctx.heartbeat_s))
                await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    break
                event = getter.result()
                if subscription.overflowed:
                    await websocket.send_text(_dumps({"type": "bye", "reason": "too slow: "
                                                      "events were lost; reconnect"}))
                    await websocket.close(CLOSE_TOO_SLOW)
                    break
                if event is not None:
                    await websocket.send_text(event.message)
                    continue
                if await asyncio.to_thread(ctx.users.resolve, _token(websocket)) is None:
                    await websocket.send_text(_dumps({"type": "bye",
                                                      "reason": "token expired or revoked"}))
                    await websocket.close(CLOSE_UNAUTHORIZED)
                    break
                await websocket.send_text(_dumps({"type": "heartbeat", "at": ctx.clock()}))
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the client went away mid-send
        finally:
            subscription.close()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    return router


def _token(websocket: WebSocket) -> str:
    return str(websocket.scope.get("edgecc.token", ""))


async def _authenticate(ctx: ApiContext, websocket: WebSocket) -> Principal | None:
    token = websocket.query_params.get("token")
    if token is None:
        try:
            text = await asyncio.wait_for(websocket.receive_text(), AUTH_TIMEOUT_S)
        except (TimeoutError, WebSocketDisconnect, RuntimeError, KeyError):
            await _refuse(websocket, "send {\"token\": ...} first", CLOSE_UNAUTHORIZED)
            return None
        try:
            first = json.loads(text) if len(text) <= MAX_CLIENT_MESSAGE_BYTES else None
            token = first.get("token") if isinstance(first, dict) else None
        except ValueError:
            token = None
        if not isinstance(token, str):
            await _refuse(websocket, "the first message must be {\"token\": \"...\"}",
                          CLOSE_UNAUTHORIZED)
            return None
    principal = await asyncio.to_thread(ctx.users.resolve, token)
    if principal is None:
        await _refuse(websocket, "the token is invalid, expired or revoked", CLOSE_UNAUTHORIZED)
        return None
    websocket.scope["edgecc.token"] = token
    client = websocket.client
    log.info(kv(event="events_subscribed", user=principal.name, role=principal.role.value,
                source=f"{client.host}:{client.port}" if client else "unknown"))
    return principal


async def _refuse(websocket: WebSocket, reason: str, code: int) -> None:
    with contextlib.suppress(Exception):
        await websocket.send_text(_dumps({"type": "error", "error": reason, "field": "token"}))
        await websocket.close(code)


async def _drain_client(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
