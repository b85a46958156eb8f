"""The central IT console: one web page and its JSON, served by the cloud process.

- ``GET /`` — every site: link state and since when, ack, lag in events and seconds, events
  held behind a gap, last backup, events stored per kind, certificate; an alerts section when
  there is anything to say; queue KPIs of the last 24 h per site and for all sites
  (``cloud_bridge.analytics``).
- ``GET /api/sites`` — the same as JSON, with each site's queue KPIs of the last 24 h and
  ``all_sites_kpis``.

The page is rendered on the server with escaped f-strings (no script, no external resource),
refreshes itself every 10 s, and is sent with a Content-Security-Policy that forbids anything
else. The console has no login: it listens on 127.0.0.1 by default; put an authenticating
reverse proxy in front of it to reach it from elsewhere.

What the lag means: the cloud knows what it received, not what the site still holds, so
``lag_events`` is the newest seq received minus the ack (events past a gap, held or missing),
and ``lag_seconds`` is how late the acknowledged event arrived (stored at minus occurred at).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import html
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from cloud_bridge.analytics import cross_site_kpis
from cloud_bridge.store import CloudStore

log = logging.getLogger("edgecc.cloud.console")

CERTIFICATE_WARNING_S = 30 * 24 * 3600
"""A certificate this close to its end raises an alert."""
REFRESH_S = 10
KPI_WINDOW_S = 24 * 3600
"""The console's KPIs count the calls that entered a queue this long ago at most."""
_SHUTDOWN_GRACE_S = 1.0
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class LinkState:
    """A site's link as the running server knows it."""

    connected: bool
    """A SiteLink stream is open."""
    since: float | None
    """When it opened or closed (None: not seen since this process started)."""


@dataclass(frozen=True)
class LastBackup:
    """The newest complete backup of a site."""

    backup_id: str
    """Site-chosen id."""
    size: int
    """Bytes."""
    completed_at: float | None
    """When it became complete."""


@dataclass(frozen=True)
class SiteView:
    """One row of the console."""

    site_id: str
    """Site id."""
    connected: bool
    """A SiteLink stream is open now."""
    link_since: float | None
    """When the link opened or closed; the site's last activity when unknown."""
    acked_seq: int
    """Highest contiguous seq stored."""
    newest_seq: int
    """Highest seq received."""
    lag_events: int
    """Events received or missing past the ack (newest seq minus ack)."""
    lag_seconds: float | None
    """How late the acknowledged event arrived (stored at minus occurred at, at least 0)."""
    held_events: int
    """Events stored beyond a gap."""
    last_seen_at: float | None
    """Last event or link activity."""
    last_backup: LastBackup | None
    """Newest complete backup."""
    events_by_kind: Mapping[str, int]
    """Stored events per kind."""
    certificate_serial: str | None
    """Serial (hex) of the newest certificate."""
    certificate_not_after: float | None
    """Its end of validity."""
    alerts: tuple[str, ...]
    """What central IT should look at."""
    config_version: int | None = None
    """The config version the site runs (its last Hello), None before any Hello."""
    config_refused: str | None = None
    """The last pushed version the site refused, with its validation error, if the last
    outcome was a refusal."""
    kpis: Mapping[str, Any] | None = None
    """Queue KPIs of the calls that entered a queue in the last ``KPI_WINDOW_S`` (offered,
    answered, abandoned, short_abandoned, timed_out, waiting, answered_within,
    service_level, asa; see ``cloud_bridge.analytics``); None when the store has none."""
    link_state: str = "offline"
    """``online`` (linked, nothing held), ``degraded`` (linked, events held behind a gap: the
    ack cannot move), ``offline`` (no link: closed, or silent until the cloud's keepalive
    ended it) or ``never linked``."""


def link_state_of(connected: bool, ever_linked: bool, held_events: int) -> str:
    """The console's link state of a site (``SiteView.link_state``)."""
    if connected:
        return "degraded" if held_events else "online"
    return "offline" if ever_linked else "never linked"


def site_views(store: CloudStore, links: Mapping[str, LinkState], now: float,
               reports: Mapping[str, Mapping[str, Any]] | None = None) -> list[SiteView]:
    """Every site's row, from the store, the live links and what each site last said (its
    Hello and ConfigApplied, ``server.read_site_reports``); blocking: run on the worker."""
    activity = {a.site_id: a for a in store.activity()}
    last_backups: dict[str, LastBackup] = {}
    for record in store.backups():  # newest first
        if record.complete and record.site_id not in last_backups:
            last_backups[record.site_id] = LastBackup(
                record.backup_id, record.committed, record.completed_at
            )
    try:
        report = cross_site_kpis(store, now - KPI_WINDOW_S, now)
        kpis = {r.site_id: r.as_dict() for r in report.rows if r.interval_start is None}
    except Exception as exc:  # the page must show even when the KPIs cannot be counted
        log.warning("event=console_kpis_failed error=%r", exc)
        kpis = {}
    views = []
    for site in store.sites():
        if site.site_id == "_unknown":  # holder of revoked serials never issued here
            continue
        act = activity.get(site.site_id)
        link = links.get(site.site_id, LinkState(False, None))
        newest = max(act.newest_seq if act else 0, site.acked_seq)
        lag_seconds = None
        if act and act.acked_received_at is not None and act.acked_occurred_at is not None:
            # Clocks of site and cloud differ a little: never show a negative delay.
            lag_seconds = round(max(0.0, act.acked_received_at - act.acked_occurred_at), 3)
        alerts = []
        if site.held_events:
            alerts.append(f"{site.held_events} events held behind a gap after seq "
                          f"{site.acked_seq}")
        said = (reports or {}).get(site.site_id, {})
        hello, applied = said.get("hello") or {}, said.get("config_applied") or {}
        refused = None
        if applied and not applied.get("ok", True):
            refused = f"version {applied.get('version')}: {applied.get('error') or 'refused'}"
            alerts.append(f"config {refused}")
        if site.certificate_not_after is not None:
            left = site.certificate_not_after - now
            if left <= 0:
                alerts.append("certificate expired: enrol the site again")
            elif left <= CERTIFICATE_WARNING_S:
                alerts.append(f"certificate expires in {int(left // 86400)} days: "
                              "enrol the site again")
        views.append(SiteView(
            site_id=site.site_id,
            connected=link.connected,
            link_since=link.since if link.since is not None else site.last_seen_at,
            acked_seq=site.acked_seq,
            newest_seq=newest,
            lag_events=newest - site.acked_seq,
            lag_seconds=lag_seconds,
            held_events=site.held_events,
            last_seen_at=site.last_seen_at,
            last_backup=last_backups.get(site.site_id),
            events_by_kind=dict(act.events_by_kind) if act else {},
            certificate_serial=(f"{site.certificate_serial:x}"
                                if site.certificate_serial is not None else None),
            certificate_not_after=site.certificate_not_after,
            alerts=tuple(alerts),
            config_version=hello.get("config_version"),
            config_refused=refused,
            kpis=kpis.get(site.site_id),
            link_state=link_state_of(link.connected, link.since is not None
                                     or site.last_seen_at is not None, site.held_events),
        ))
    return views


def all_sites_kpis(views: list[SiteView]) -> dict[str, Any]:
    """The KPIs of every site together, from the per-site figures."""
    total: dict[str, Any] = dict.fromkeys(_KPI_COUNTS, 0)
    answered_wait = 0.0
    for view in views:
        if view.kpis is None:
            continue
        for key in _KPI_COUNTS:
            total[key] += int(view.kpis.get(key) or 0)
        answered_wait += float(view.kpis.get("asa") or 0.0) * int(view.kpis.get("answered") or 0)
    left = total["answered"] + total["abandoned"] + total["timed_out"]
    total["service_level"] = total["answered_within"] / left if left else None
    total["asa"] = answered_wait / total["answered"] if total["answered"] else None
    return total


_KPI_COUNTS = ("offered", "answered", "abandoned", "short_abandoned", "timed_out", "waiting",
               "answered_within")


# ------------------------------------------------------------------- rendering


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2330;background:#f6f7f9}
h1{font-size:1.4rem;margin:0 0 .2rem}
p.meta{color:#5b6475;margin:0 0 1rem}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border:1px solid #d5d9e0;padding:.35rem .55rem;text-align:left;vertical-align:top}
th{background:#e9ecf1}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.up{color:#0b7a2e;font-weight:600}.down{color:#b3261e;font-weight:600}
.warn{color:#8a5a00;font-weight:600}
section#alerts{background:#fff4e5;border:1px solid #f0b35a;padding:.5rem 1rem;margin:0 0 1rem}
ul.kinds{margin:0;padding-left:1rem}
td.site-id,td.link,td.since,td.backup,td.kinds{white-space:nowrap}
"""


def render_page(views: list[SiteView], now: float) -> str:
    """The console page (every value escaped)."""
    alerts = [(v.site_id, a) for v in views for a in v.alerts]
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f'<meta http-equiv="refresh" content="{REFRESH_S}">',
        "<title>edgecc cloud console</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>edgecc cloud console</h1>",
        f'<p class="meta">{len(views)} sites, {sum(v.connected for v in views)} linked '
        f"&middot; {_e(_when(now))}</p>",
    ]
    if alerts:
        parts.append('<section id="alerts"><h2>Alerts</h2><ul>')
        parts += [f'<li data-site="{_e(s)}"><b>{_e(s)}</b>: {_e(a)}</li>' for s, a in alerts]
        parts.append("</ul></section>")
    parts.append(
        '<table id="sites"><thead><tr><th>Site</th><th>Link</th><th>Since</th><th>Ack</th>'
        "<th>Lag (events)</th><th>Lag (s)</th><th>Held</th><th>Last backup</th>"
        "<th>Events by kind</th><th>Config</th><th>Certificate</th></tr></thead><tbody>"
    )
    if not views:
        parts.append('<tr><td colspan="11">No site yet: issue an enrolment token with '
                     "<code>edgecc cloud token --site ID</code>.</td></tr>")
    for v in views:
        look = {"online": "up", "degraded": "warn"}.get(v.link_state, "down")
        state = f'<span class="{look}">{_e(v.link_state)}</span>'
        backup = "-"
        if v.last_backup is not None:
            backup = (f"{_e(v.last_backup.backup_id)}<br>{v.last_backup.size} bytes, "
                      f"{_e(_when(v.last_backup.completed_at))}")
        kinds = "-"
        if v.events_by_kind:
            kinds = '<ul class="kinds">' + "".join(
                f'<li data-kind="{_e(k)}">{_e(k)}: <span class="count">{n}</span></li>'
                for k, n in sorted(v.events_by_kind.items())
            ) + "</ul>"
        certificate = "-"
        if v.certificate_serial is not None:
            certificate = (f"{_e(v.certificate_serial)}<br>until "
                           f"{_e(_when(v.certificate_not_after))}")
        lag_s = "-" if v.lag_seconds is None else f"{v.lag_seconds:.1f}"
        parts.append(
            f'<tr class="site" data-site="{_e(v.site_id)}">'
            f'<td class="site-id">{_e(v.site_id)}</td>'
            f'<td class="link">{state}</td>'
            f'<td class="since">{_e(_when(v.link_since))}</td>'
            f'<td class="num ack">{v.acked_seq}</td>'
            f'<td class="num lag-events">{v.lag_events}</td>'
            f'<td class="num lag-seconds">{lag_s}</td>'
            f'<td class="num held">{v.held_events}</td>'
            f'<td class="backup">{backup}</td>'
            f'<td class="kinds">{kinds}</td>'
            f'<td class="config">{_e(str(v.config_version) if v.config_version is not None else "-")}</td>'
            f'<td class="certificate">{certificate}</td></tr>'
        )
    parts.append("</tbody></table>")
    parts.append(
        f"<h2>Queue KPIs, last {KPI_WINDOW_S // 3600} h</h2>"
        '<table id="kpis"><thead><tr><th>Site</th><th>Offered</th><th>Answered</th>'
        "<th>Abandoned</th><th>Timed out</th><th>Waiting</th><th>Service level</th>"
        "<th>ASA (s)</th></tr></thead><tbody>"
    )
    rows = [(v.site_id, v.kpis) for v in views if v.kpis is not None]
    rows.append(("All sites", all_sites_kpis(views)))
    for site_id, k in rows:
        level = "-" if k["service_level"] is None else f"{k['service_level'] * 100:.1f}%"
        asa = "-" if k["asa"] is None else f"{k['asa']:.1f}"
        parts.append(
            f'<tr class="kpi" data-kpi-site="{_e(site_id)}"><td class="site-id">{_e(site_id)}</td>'
            f'<td class="num offered">{k["offered"]}</td>'
            f'<td class="num answered">{k["answered"]}</td>'
            f'<td class="num abandoned">{k["abandoned"]}</td>'
            f'<td class="num timed-out">{k["timed_out"]}</td>'
            f'<td class="num waiting">{k["waiting"]}</td>'
            f'<td class="num service-level">{level}</td>'
            f'<td class="num asa">{asa}</td></tr>'
        )
    parts.append("</tbody></table></body></html>")
    return "".join(parts)


def build_console_app(
    views: Callable[[], Awaitable[list[SiteView]]], clock: Callable[[], float]
) -> Starlette:
    """The console's web application; ``views`` reads the rows (off the event loop)."""

    async def page(request: Request) -> Response:
        rows = await views()
        return HTMLResponse(render_page(rows, clock()), headers=_HEADERS)

    async def api_sites(request: Request) -> Response:
        rows = await views()
        body = {"generated_at": clock(), "sites": [dataclasses.asdict(v) for v in rows],
                "all_sites_kpis": all_sites_kpis(rows)}
        return JSONResponse(body, headers=_HEADERS)

    return Starlette(routes=[
        Route("/", page, methods=["GET"]),
        Route("/api/sites", api_sites, methods=["GET"]),
    ])


# ------------------------------------------------------------------- serving


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers (the cloud owns SIGTERM/SIGINT)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


class ConsoleServer:
    """The console's HTTP listener inside the cloud's event loop."""

    def __init__(self, server: _EmbeddedServer, task: asyncio.Task[None],
                 address: tuple[str, int]) -> None:
        self._server = server
        self._task = task
        self.address = address
        """(host, port) actually bound."""

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8090/``."""
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    @classmethod
    async def start(cls, app: Any, host: str, port: int) -> ConsoleServer:
        """Bind ``host:port`` (0 = any free port) and serve; raise OSError when it cannot."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            sock = socket.create_server((host, port), family=family, backlog=128)
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise OSError(exc.errno, f"cannot listen on {host}:{port} (console): {reason}") from None
        sock.setblocking(False)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                server_header=False,
                                timeout_graceful_shutdown=_SHUTDOWN_GRACE_S)
        server = _EmbeddedServer(config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="console")
        ready = asyncio.create_task(server.ready.wait())
        await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not server.ready.is_set():
            ready.cancel()
            sock.close()
            error = task.exception() if not task.cancelled() else None
            raise OSError(f"console failed to start: {error!r}")
        bound = sock.getsockname()
        log.info("event=console_started host=%s port=%d", bound[0], bound[1])
        return cls(server, task, (bound[0], bound[1]))

    async def close(self) -> None:
        """Stop accepting, let open requests finish (bounded)."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout=_SHUTDOWN_GRACE_S + 1.0)
        except TimeoutError:
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        log.info("event=console_stopped")
