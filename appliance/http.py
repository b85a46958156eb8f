"""The appliance's HTTP API: FastAPI served by uvicorn inside the appliance's own event loop.

``GET /health`` (no login) and FastAPI's ``/openapi.json`` (and ``/docs``), plus, when an
``ApiContext`` is given, the ``/api`` routes and the ``/api/events`` WebSocket (docs/api.md),
and with ``web`` the browser pages of ``appliance/web`` under ``/`` (docs/web.md).
uvicorn's signal handling is switched off: the appliance owns SIGTERM/SIGINT and stops the server
itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from starlette.staticfiles import StaticFiles

from appliance.log import kv

if TYPE_CHECKING:
    from appliance.api import ApiContext

log = logging.getLogger("edgecc.http")

WEB_DIR = Path(__file__).resolve().parent / "web"
"""The pages (static HTML, CSS and JavaScript, no build step, nothing from a CDN)."""

_SHUTDOWN_GRACE_S = 1.0


class Endpoint(BaseModel):
    """A bound listener."""

    host: str
    port: int


class Health(BaseModel):
    """Answer of ``GET /health``."""

    status: str
    """"ok" while the appliance runs."""
    site: str
    """The site id."""
    sip: dict[str, Endpoint]
    """SIP listeners actually bound, by transport ("udp", "tcp", "tls")."""
    uptime_s: float
    """Seconds since the appliance finished starting."""
    trunk: str | None = None
    """The carrier trunk's keep-alive state (``up``, ``down``, ``unknown``); null: no carrier
    is configured."""
    link: str | None = None
    """The cloud link as the edge agent reports it (``online``, ``degraded``, ``offline``);
    null: no edge agent has reported yet."""
    config_version: int = 0
    """The config version pushed by the cloud that this run loaded (0: none)."""
    config_installed: int = 0
    """The newest pushed version the edge agent installed; above ``config_version`` it takes
    effect at the appliance's next start."""


@dataclass(frozen=True)
class HealthSource:
    """What /health reports, read at request time."""

    site_id: str
    sip_addresses: Callable[[], dict[str, tuple[str, int]]]
    uptime_s: Callable[[], float]
    trunk_state: Callable[[], str] | None = None
    config_version: int = 0
    """The pushed config version loaded at start."""
    config_installed: Callable[[], int] | None = None
    """The newest pushed version installed since (read at request time, off the loop)."""
    link_state: Callable[[], str | None] | None = None
    """The cloud link's state as last read from the edge agent's row."""


def build_http_app(health: HealthSource, api: ApiContext | None = None, *,
                   web: bool = False) -> FastAPI:
    """The FastAPI application of the appliance; with ``api``, the ``/api`` routes too; with
    ``web``, the pages under ``/``."""
    app = FastAPI(title="edgecc appliance", version="0.1.0")
    if api is not None:
        from appliance.api import install_api

        install_api(app, api)

    @app.get("/health", response_model=Health, summary="Liveness and bound addresses")
    async def get_health() -> Health:
        sip = {
            transport.lower(): Endpoint(host=host, port=port)
            for transport, (host, port) in health.sip_addresses().items()
        }
        installed = (await asyncio.to_thread(health.config_installed)
                     if health.config_installed else health.config_version)
        return Health(status="ok", site=health.site_id, sip=sip,
                      uptime_s=round(health.uptime_s(), 3),
                      trunk=health.trunk_state() if health.trunk_state else None,
                      config_version=health.config_version, config_installed=installed,
                      link=health.link_state() if health.link_state else None)

    if web:
        # Mounted last: every API route above takes precedence over a file of the same name.
        app.mount("/", _Pages(directory=WEB_DIR, html=True), name="web")
    return app


class _Pages(StaticFiles):
    """The static pages, sent with headers that keep them to this origin."""

    async def get_response(self, path: str, scope: Any) -> Any:
        response = await super().get_response(path, scope)
        # Everything is served from here: no inline script, no third-party origin, no framing.
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
            "frame-ancestors 'none'")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-cache"
        return response


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers, reporting when it is accepting."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:  # uvicorn >= 0.29
        yield

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        return None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=128)
    sock.setblocking(False)
    return sock


class HttpServer:
    """A running HTTP server; build with :meth:`start`, stop with :meth:`close`."""

    def __init__(self, server: _EmbeddedServer, task: asyncio.Task[None], address: tuple[str, int]):
        self._server = server
        self.task = task
        """The serving task; it ends when the server stops (or fails)."""
        self.address = address
        """(host, port) actually bound."""

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @classmethod
    async def start(cls, app: Any, host: str, port: int) -> HttpServer:
        """Bind ``host:port`` (0 = any free port) and serve ``app``; raise OSError on bind."""
        try:
            sock = _listen(host, port)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"http.port {host}:{port}: {reason}") from exc
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
        )
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not server.ready.is_set():
            ready.cancel()
            sock.close()
            exc = task.exception() if not task.cancelled() else None
            raise OSError(f"HTTP server failed to start: {exc!r}")
        bound = sock.getsockname()
        log.info(kv(event="http_started", host=bound[0], port=bound[1]))
        return cls(server, task, (bound[0], bound[1]))

    async def close(self) -> None:
        """Stop accepting, let open requests finish (bounded), and return."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=_SHUTDOWN_GRACE_S + 1.0)
        except TimeoutError:
            self._server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        log.info(kv(event="http_stopped"))
