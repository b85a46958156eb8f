"""The appliance's HTTP API for supervisors, admins, agents and integrators.

``install_api(app, context)`` adds the ``/api`` routes, the ``/api/events`` WebSocket, the
error shape and the audit middleware to the appliance's FastAPI application. See docs/api.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastapi import FastAPI

from appliance.api.hub import Hub
from appliance.api.users import LoginPolicy, Role, UserStore
from appliance.reporting.kpi import LiveBoard

__all__ = ["ApiContext", "Hub", "LoginPolicy", "Role", "UserStore", "install_api"]


@dataclass
class ApiContext:
    """What the API reads and writes, built by the composition root."""

    users: UserStore
    """API users, tokens and the audit log (its own database connection)."""
    hub: Hub
    """Live events for ``/api/events``."""
    board: LiveBoard
    """The wallboard state behind ``/api/kpi/live``; touched on the event loop only."""
    sip_accounts: Callable[[], Sequence[tuple[str, str | None]]] = field(default=lambda: ())
    """(user, display name) of every SIP account, for ``/api/config/accounts``."""
    heartbeat_s: float = 15.0
    """Seconds between WebSocket heartbeats (and token re-checks)."""
    clock: Callable[[], float] = time.time
    """Unix time, for snapshots."""


def install_api(app: FastAPI, context: ApiContext) -> None:
    """Add the API to ``app``."""
    from appliance.api.errors import install_error_handlers
    from appliance.api.events import build_events_router
    from appliance.api.middleware import ApiMiddleware
    from appliance.api.routes import build_api_router

    install_error_handlers(app)
    app.include_router(build_api_router(context))
    app.include_router(build_events_router(context))
    app.add_middleware(ApiMiddleware, users=context.users)
