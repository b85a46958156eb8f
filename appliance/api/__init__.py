"""The appliance's HTTP API for supervisors, admins, agents and integrators.

``install_api(app, context)`` adds the ``/api`` routes, the ``/api/events`` WebSocket, the
error shape and the audit middleware to the appliance's FastAPI application. See docs/api.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from appliance.api.hub import Hub
from appliance.api.users import LoginPolicy, Role, UserStore
from appliance.reporting.kpi import LiveBoard

if TYPE_CHECKING:
    from appliance.api.calls import RecordingAccess
    from appliance.config import SiteConfig
    from appliance.config_edit import SiteEditor

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
    calls: Any = None
    """Call control's ``CallService`` (``appliance.calls.control``); None: the call-control
    routes answer 503."""
    recordings: RecordingAccess | None = None
    """Recording search and download; None: those routes answer 503."""
    site: SiteConfig | None = None
    """The running site's configuration, for the admin pages (queues, agents)."""
    on_security: Callable[[str, dict[str, Any]], None] | None = None
    """Told of security events (``security.login_failed``); called from worker threads."""
    alerts: Callable[[], list[dict[str, Any]]] | None = None
    """The alerts active now (``Alert.as_dict()``), for ``/api/alerts``; None: 503."""
    site_editor: SiteEditor | None = None
    """Writes configuration changes (``/api/config/queues`` ...); None: one is made for
    ``site.site_dir`` (no directory: those routes answer 503)."""
    running_version: int | None = None
    """The config version this run loaded; None: read from the database at install."""


def install_api(app: FastAPI, context: ApiContext) -> None:
    """Add the API to ``app``."""
    from appliance.api.agents import build_agents_router
    from appliance.api.calls import build_calls_router
    from appliance.api.errors import install_error_handlers
    from appliance.api.events import build_events_router
    from appliance.api.middleware import ApiMiddleware
    from appliance.api.routes import build_api_router
    from appliance.api.siteconfig import build_site_config_router

    if context.running_version is None and context.site is not None:
        context.running_version = _loaded_version(context.site)
    install_error_handlers(app)
    app.include_router(build_api_router(context))
    app.include_router(build_site_config_router(context))
    app.include_router(build_calls_router(context))
    app.include_router(build_agents_router(lambda: _desk_service(context), context.users,
                                           clock=context.clock))
    app.include_router(build_events_router(context))
    app.add_middleware(ApiMiddleware, users=context.users)


def _desk_service(context: ApiContext) -> Any:
    """Call control as the desk's ``DeskService`` when it runs with a desk, else None."""
    calls = context.calls
    return calls if calls is not None and getattr(calls, "desk", None) is not None else None


def _loaded_version(site: SiteConfig) -> int | None:
    """The installed config version when the API is built, which is at start: the one this
    run loaded (None when the database cannot be read)."""
    import sqlite3

    from appliance.store import running_config_version

    try:
        conn = sqlite3.connect(f"file:{site.storage.database}?mode=ro", uri=True, timeout=2.0)
    except sqlite3.Error:
        return None
    try:
        return running_config_version(conn)
    except sqlite3.Error:
        return None
    finally:
        conn.close()
