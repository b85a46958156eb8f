"""The composition root of ``edgecc appliance``: builds every service, starts and stops them.

Start order: config -> site database -> component log -> guard -> digest authenticator ->
binding store -> registrar -> SIP service -> carrier trunk -> webhooks -> alerts -> live feed ->
agent desk -> call control -> API (users, recordings) -> HTTP server (API and web pages). Stop
order is the reverse. The component log writes ``component.up`` / ``component.down`` rows (the
appliance, the trunk, the cloud link) whenever one changes state: uptime per component.
Services get what they need as constructor arguments; nothing here is global. Call control and
the desk report each event to one ``LiveFeed`` as it happens: the hub (``/api/events``), the
wallboard (``/api/kpi/live``), the alert rules and the screen-pop webhook. One asyncio loop
(uvloop when installed) runs everything; SIGTERM and SIGINT stop the appliance cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import logging
import math
import os
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import sqlite_utils

from appliance import eventlog
from appliance.acd.desk import desk_from_config
from appliance.api import ApiContext, Hub, Role, UserStore
from appliance.api.calls import RecordingAccess
from appliance.calls.control import start_call_control
from appliance.config import ConfigError, SiteConfig, load_site
from appliance.dbwriter import DatabaseWriter, WriterError
from appliance.http import HealthSource, HttpServer, build_http_app
from appliance.log import kv
from appliance.recording.crypto import load_site_key
from appliance.reporting.alerts import Alert, AlertEngine, rules_from_config
from appliance.reporting.from_log import to_queue_events
from appliance.reporting.kpi import LiveBoard
from appliance.sip.digest import DigestAuthenticator
from appliance.sip.guard import Guard
from appliance.sip.registrar import BindingStore, Registrar
from appliance.sip.service import SipService
from appliance.sip.trunk import TrunkLink, TrunkState, TrunkStateChanged
from appliance.store import audit, open_site_db, running_config_version
from appliance.webhooks import Poster, ScreenPop, WebhookRouter
from edge_agent.config import link_report_stale_after_s

log = logging.getLogger("edgecc.appliance")

STOP_BUDGET_S = 1.5
"""Total time the services get to stop; the process must be gone within 2 s of SIGTERM."""

_TRANSPORT_ORDER = ("UDP", "TCP", "TLS")

SUPERVISOR_TOPICS = ("queue.enter", "queue.abandon", "queue.ring_no_answer", "alert",
                     "security", "call.record")
"""Topics (prefixes) only supervisors and admins receive: callers waiting and leaving, alerts,
security events,
call records. An agent's desk sees the rest (its call being answered and completed)."""
SCREEN_POP_KINDS = frozenset({"call.offered", "call.ringing"})
"""Events posted as a ``screen.pop`` webhook."""


class LiveFeed:
    """Where every live event goes: the hub (topic = kind) and, as queue events, the wallboard.

    Called on the event loop by call control and the agent desk (``on_event``) for each event
    as it happens, so ``/api/kpi/live`` and ``/api/events`` are current at once. A bad event is
    logged and counted; it never reaches back into the call that produced it."""

    def __init__(self, hub: Hub, board: LiveBoard, *, site: str = "",
                 alerts: AlertLoop | None = None, screen_pop: ScreenPop | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.hub = hub
        self.board = board
        self.site = site
        self.alerts = alerts
        self.screen_pop = screen_pop
        self._clock = clock
        self.delivered = 0
        """Events published."""
        self.rejected = 0
        """Events that could not be published or applied (logged)."""

    def __call__(self, kind: str, payload: Mapping[str, Any]) -> None:
        """Publish ``kind`` with ``payload`` and feed the wallboard; never raises."""
        data = dict(payload)
        at = data.get("at")
        if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at):
            at = data["at"] = self._clock()
        audience = (Role.SUPERVISOR if kind.startswith(SUPERVISOR_TOPICS) else Role.AGENT)
        try:
            self.hub.publish(kind, data, audience=audience)
            self.delivered += 1
        except (TypeError, ValueError) as exc:
            self.rejected += 1
            log.error(kv(event="live_event_rejected", kind=kind, error=str(exc)))
        try:
            for event in to_queue_events(kind, data, float(at), site=self.site):
                self.board.apply(event)
        except Exception as exc:  # an odd event must not stop the next ones
            self.rejected += 1
            log.error(kv(event="live_board_rejected", kind=kind, error=repr(exc)))
        if self.screen_pop is not None and kind in SCREEN_POP_KINDS:
            self.screen_pop.offered(data)  # never blocks, never raises
        if self.alerts is not None:
            self.alerts.feed(kind, data, float(at))


class LinkWatch:
    """Reads the edge agent's link-state row (``eventlog.read_link_state``) every
    ``interval_s`` and, when the state changes, hands a ``link.state`` event {state, since,
    lag_events, lag_seconds, detail} to the live feed: the wallboard shows it and the
    ``link_down`` alert rule hears it; ``on_state`` (the ``ComponentLog``) gets the state too.
    No row (no edge agent yet): nothing is said.

    The agent rewrites its row every ``state_interval_s``; a row older than ``stale_after()``
    seconds (``edge_agent.config.link_report_stale_after_s``) is the last word of an agent that
    is no longer running (killed, crashed, hung), so the link counts as offline from the row's
    ``updated_at`` whatever the row says."""

    def __init__(self, feed: Callable[[str, Mapping[str, Any]], None], database: os.PathLike[str] | str,
                 *, interval_s: float = 1.0,
                 on_state: Callable[[eventlog.LinkState], None] | None = None,
                 stale_after: Callable[[], float] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.feed = feed
        self.on_state = on_state
        self.database = str(database)
        self.interval_s = interval_s
        self._stale_after = stale_after or functools.partial(link_report_stale_after_s, None)
        self._clock = clock
        self.stale_after_s = self._stale_after()
        """Age of the agent's row beyond which the agent counts as gone."""
        self.current: eventlog.LinkState | None = None
        """The last state read."""
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="link-watch")

    async def _run(self) -> None:
        said: tuple[str, float] | None = None
        while True:
            try:
                state = await asyncio.to_thread(self._read)
            except Exception as exc:  # the next read may work; the appliance goes on
                log.warning(kv(event="link_state_unreadable", error=repr(exc)))
                state = None
            if state is not None:
                self.current = state
                if said != (state.state, state.since):
                    said = (state.state, state.since)
                    self.feed("link.state", {
                        "state": state.state, "since": state.since,
                        "lag_events": state.lag_events, "lag_seconds": state.lag_seconds,
                        "detail": state.detail})
                    if self.on_state is not None:
                        try:
                            self.on_state(state)
                        except Exception:
                            log.exception(kv(event="link_state_consumer_failed"))
            await asyncio.sleep(self.interval_s)

    def _read(self) -> eventlog.LinkState | None:
        """Worker thread: the agent's row, as believed (``_believed``), or None."""
        with _read_only(self.database) as conn:
            state = eventlog.read_link_state(sqlite_utils.Database(conn))
        return None if state is None else self._believed(state)

    def _believed(self, state: eventlog.LinkState) -> eventlog.LinkState:
        """The row as read, or offline since its ``updated_at`` when the agent went silent
        (worker thread: a silent agent's ``cloud.yaml`` is read again each time)."""
        age = self._clock() - state.updated_at
        if age <= self.stale_after_s or state.state == "offline":
            return state
        self.stale_after_s = self._stale_after()  # cloud.yaml may have changed since
        if age <= self.stale_after_s:
            return state
        return dataclasses.replace(
            state, state="offline", since=state.updated_at,
            detail=(f"edge agent silent for {age:.0f} s (its last report: {state.state}); "
                    "is it running?"))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


#: The link states (``eventlog.LinkState.state``) in which the cloud link counts as up.
LINK_UP_STATES = frozenset({"online", "degraded"})
AUDIT_ANCHOR_S = 60.0
"""How often the audit chain's head is looked at (and sent when it moved)."""
AUDIT_ANCHOR_REFRESH_S = 3600.0
"""The head is sent at least this often, moved or not."""


class ComponentLog:
    """Writes ``component.up`` / ``component.down`` {component, detail} event-log rows, the
    source of the uptime-per-component KPI (docs/kpis.md), only when a component's state
    changes: the appliance itself at start and stop, the carrier trunk as its OPTIONS
    keep-alives see it, the cloud link as the edge agent reports it.

    Times are wall-clock seconds and never go back per component (a state first seen with an
    older ``since`` is dated no earlier than this log's start or the component's last row), so
    the KPI engine reads the rows in order. Rows are committed by a ``DatabaseWriter`` of their
    own; a row that cannot be written is logged, never raised."""

    def __init__(self, db: sqlite_utils.Database, *, clock: Callable[[], float] = time.time
                 ) -> None:
        self._clock = clock
        self._writer = DatabaseWriter(db, name="components")
        self._started = clock()
        self.states: dict[str, bool] = {}
        """Component -> up, as last written."""
        self._last: dict[str, float] = {}
        self._stopped = False

    def recover(self) -> list[str]:
        """At start: components the log last showed up (the appliance stopped without saying
        so, e.g. killed) are written down at the last event the log holds, the best evidence
        of when the site stopped. Returns those components."""
        def job(conn: sqlite3.Connection, _db: sqlite_utils.Database) -> list[str]:
            rows = conn.execute(
                "SELECT kind, payload, occurred_at FROM events WHERE seq IN (SELECT max(seq) "
                "FROM events WHERE kind IN ('component.up', 'component.down') "
                "GROUP BY json_extract(payload, '$.component'))").fetchall()
            up = [(json.loads(p)["component"], at) for k, p, at in rows
                  if k == "component.up"]
            if not up:
                return []
            last = conn.execute("SELECT max(occurred_at) FROM events").fetchone()[0]
            for component, since in up:
                at = min(max(float(last), float(since)), self._started)
                eventlog.append(_db, "component.down", {
                    "component": component, "detail": "stopped without a clean shutdown"},
                    occurred_at=at)
            return [c for c, _ in up]

        try:
            lost = self._writer.write("component recovery", job).result(10)
        except Exception as exc:
            log.error(kv(event="component_recovery_failed", error=repr(exc)))
            return []
        for component in lost:
            log.warning(kv(event="component_unclean_stop", component=component))
        return lost

    def set(self, component: str, up: bool, *, at: float | None = None,
            detail: str = "") -> None:
        """Record that ``component`` is up (or down) since ``at`` (default now); nothing when
        it already was, or after ``stop()``."""
        if self._stopped or self.states.get(component) is up:
            return
        self.states[component] = up
        when = self._clock() if at is None else at
        when = max(when, self._started, self._last.get(component, -math.inf))
        self._last[component] = when
        kind = "component.up" if up else "component.down"
        log.info(kv(event=kind.replace(".", "_"), component=component, detail=detail or None))
        try:
            future = self._writer.submit(eventlog.append, self._writer.db, kind,
                                         {"component": component, "detail": detail},
                                         occurred_at=when)
        except WriterError as exc:
            log.error(kv(event="component_write_failed", component=component, error=str(exc)))
            return
        future.add_done_callback(functools.partial(_log_failure, "component_write_failed"))

    def stop(self, detail: str = "appliance stopped") -> None:
        """Every component still up goes down now (with the appliance stopped, the site has
        neither its trunk nor its cloud link). Later changes are not written: the services
        still stopping say nothing more."""
        for component, up in list(self.states.items()):
            if up:
                self.set(component, False, detail=detail)
        self._stopped = True

    def on_trunk(self, change: Any) -> None:
        """``TrunkLink``'s ``on_change``: the keep-alive state up/down (unknown says
        nothing)."""
        after = getattr(change, "after", None)
        if isinstance(change, TrunkStateChanged) and after is not TrunkState.UNKNOWN:
            self.set("trunk", after is TrunkState.UP, detail=change.reason)

    def on_link(self, state: eventlog.LinkState) -> None:
        """A link state read from the edge agent's row: online or degraded is up."""
        self.set("cloud-link", state.state in LINK_UP_STATES, at=state.since,
                 detail=state.detail or state.state)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the rows set so far are committed."""
        return self._writer.flush(timeout)

    def close(self, timeout: float = 1.0) -> None:
        """Let the last rows commit (at most ``timeout`` seconds), then stop the writer."""
        self._writer.close(timeout)


class AlertLoop:
    """Runs the sans-IO ``AlertEngine`` on the loop: fed every live event, evaluated once per
    pass of the loop that fed it (a burst of events costs one evaluation) and at its
    ``next_timer()``. Each alert raised or cleared becomes an event-log row (``alert.raised`` /
    ``alert.cleared``, committed by the alerts' ``DatabaseWriter``), a hub event (topic
    ``alert``, supervisors), a webhook post and, through the hub, the wallboard's banner."""

    def __init__(self, engine: AlertEngine, hub: Hub, db: sqlite_utils.Database, *,
                 poster: Poster | None = None, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.hub = hub
        self.poster = poster
        self._clock = clock
        self._writer = DatabaseWriter(db, name="alerts")
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None  # the next_timer() the armed timer is for
        self._tick_due = False  # a tick is scheduled for this pass of the loop
        self.ticks = 0
        """Evaluations of the rules since start."""

    def feed(self, kind: str, payload: Mapping[str, Any], at: float) -> None:
        """Take one event; the rules are evaluated once, after the events of this loop pass
        (never raises)."""
        if kind.startswith("alert"):
            return  # our own output
        self.engine.feed(kind, payload, at)
        if self._tick_due:
            return
        self._tick_due = True
        try:
            asyncio.get_running_loop().call_soon(self.tick)
        except RuntimeError:  # no loop (a caller outside the appliance): evaluate now
            self.tick()

    def tick(self) -> None:
        """Evaluate the rules now and re-arm the timer when its due time moved."""
        self._tick_due = False
        self.ticks += 1
        try:
            for alert in self.engine.tick(self._clock()):
                self._publish(alert)
        except Exception:
            log.exception(kv(event="alerts_failed"))
        self._arm()

    def _on_timer(self) -> None:
        self._timer = self._timer_due = None
        self.tick()

    def active(self) -> list[dict[str, Any]]:
        """The alerts raised and not cleared."""
        return [a.as_dict() for a in self.engine.active()]

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the event-log rows of the alerts published so far are committed."""
        return self._writer.flush(timeout)

    def _publish(self, alert: Alert) -> None:
        kind = "alert.raised" if alert.cleared_at is None else "alert.cleared"
        data = alert.as_dict()
        log.info(kv(event=kind.replace(".", "_"), rule=alert.rule, key=alert.key,
                    severity=alert.severity.value))
        self.hub.publish("alert", {**data, "state": kind.split(".")[1]},
                         audience=Role.SUPERVISOR)
        if self.poster is not None:
            self.poster.post(kind, data)
        at = alert.raised_at if alert.cleared_at is None else alert.cleared_at
        try:
            future = self._writer.submit(eventlog.append, self._writer.db, kind, data,
                                         occurred_at=at)
        except WriterError as exc:  # stopped or stuck: shown live, not logged to the cloud
            log.error(kv(event="alert_write_failed", rule=alert.rule, error=str(exc)))
            return
        future.add_done_callback(functools.partial(_log_failure, "alert_write_failed"))

    def _arm(self) -> None:
        when = self.engine.next_timer()
        if self._timer is not None and when == self._timer_due:
            return  # armed for that time already
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_due = None
        if when is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the caller ticks by hand
            return
        delay = max(0.0, when - self._clock())
        self._timer = loop.call_at(loop.time() + delay, self._on_timer)
        self._timer_due = when

    def close(self, timeout: float = 1.0) -> None:
        """Stop the timer and let the last writes commit (at most ``timeout`` seconds)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writer.close(timeout)


class AuditAnchor:
    """Sends the head of the audit chain (its last row's id and hash) towards the cloud as an
    ``audit.head`` event (essential: the outbox never drops it) whenever the head has moved, at
    most every ``interval_s``, and at least every ``refresh_s`` even when it has not (so the
    cloud finds the newest one near the end of a site's events). That copy outside the site is
    what exposes a rewrite of the whole chain by someone who can write the database: give the
    hash ``edgecc cloud audit-head SITE`` prints to ``edgecc audit verify --expect-head``
    (docs/security.md). Events are committed by a ``DatabaseWriter`` of its own."""

    def __init__(self, db: sqlite_utils.Database, *, interval_s: float = AUDIT_ANCHOR_S,
                 refresh_s: float = AUDIT_ANCHOR_REFRESH_S,
                 clock: Callable[[], float] = time.time) -> None:
        self._writer = DatabaseWriter(db, name="audit-anchor")
        self.interval_s = interval_s
        self.refresh_s = refresh_s
        self._clock = clock
        self.sent: tuple[int, str] | None = None
        """The head last committed as an ``audit.head`` event (id, hash)."""
        self._sent_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    def anchor(self) -> tuple[int, str] | None:
        """Write an ``audit.head`` event now if the head moved since the last one (or
        ``refresh_s`` passed); return the head written, or None. Blocks until committed."""
        now = self._clock()
        sent, sent_at = self.sent, self._sent_at

        def job(conn: sqlite3.Connection, db: sqlite_utils.Database) -> tuple[int, str] | None:
            row = conn.execute("SELECT head_id, head_hash FROM audit_chain WHERE id = 1"
                               ).fetchone()
            if row is None or row[1] is None:
                return None  # no chained row yet
            head = (int(row[0]), str(row[1]))
            if head == sent and now - sent_at < self.refresh_s:
                return None
            eventlog.append(db, "audit.head", {"id": head[0], "hash": head[1]},
                            occurred_at=now, priority=eventlog.ESSENTIAL)
            return head

        head = self._writer.write("audit anchor", job).result(30)
        if head is not None:
            self.sent, self._sent_at = head, now
            log.info(kv(event="audit_anchored", id=head[0], hash=head[1][:16]))
        return head

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.anchor)
            except Exception as exc:
                log.error(kv(event="audit_anchor_failed", error=repr(exc)))
            await asyncio.sleep(self.interval_s)

    async def stop(self) -> None:
        """Send the last head (the ``stop`` row's) and stop the writer."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

        def last() -> None:
            try:
                self.anchor()
            except Exception as exc:
                log.error(kv(event="audit_anchor_failed", error=repr(exc)))
            self._writer.close()

        await asyncio.to_thread(last)


def _log_failure(event: str, future: Future[Any]) -> None:
    if future.cancelled():
        log.error(kv(event=event, error="cancelled at stop"))
        return
    exc = future.exception()
    if exc is not None:
        log.error(kv(event=event, error=repr(exc)))


@dataclass
class Appliance:
    """The running services of one site, in start order."""

    config: SiteConfig
    db: sqlite_utils.Database
    guard: Guard
    auth: DigestAuthenticator
    bindings: BindingStore
    registrar: Registrar
    sip: SipService
    http: HttpServer
    started_at: float = field(default_factory=time.monotonic)
    _stack: list[tuple[str, Callable[[], Any]]] = field(default_factory=list, repr=False)
    api: ApiContext | None = None
    components: ComponentLog | None = None

    @classmethod
    async def start(cls, config: SiteConfig) -> Appliance:
        """Build and start every service; on failure, stop what was started and re-raise."""
        stack: list[tuple[str, Callable[[], Any]]] = []
        try:
            db = open_site_db(config.storage.database)
            stack.append(("database", db.close))
            eventlog.bind_site(db, config.site.id)
            # Uptime per component: component.up/down rows on each change of state.
            components_db = open_site_db(config.storage.database)
            stack.append(("components-db", components_db.close))
            components = ComponentLog(components_db)
            stack.append(("components", components.close))
            await asyncio.to_thread(components.recover)
            # The audit chain's head, sent to the cloud (a copy the site cannot rewrite).
            anchor_db = open_site_db(config.storage.database)
            stack.append(("audit-anchor-db", anchor_db.close))
            anchor = AuditAnchor(anchor_db)
            stack.append(("audit-anchor", anchor.stop))
            guard = Guard(config.guard)
            # A fresh nonce secret per run: nonces from before a restart answer stale=true,
            # and phones retry at once (RFC 7616 §3.3).
            auth = DigestAuthenticator(
                config.sip.realm,
                config.sip.accounts_by_user,
                nonce_ttl=config.sip.registrar.nonce_ttl,
                secret=os.urandom(32),
            )
            bindings = BindingStore(db)
            stack.append(("bindings", lambda: asyncio.to_thread(bindings.close, timeout=1.0)))
            registrar = Registrar(config, bindings, auth, guard)
            sip = await SipService.start(config, registrar=registrar, guard=guard)
            stack.append(("sip", sip.close))
            # Registration to the carrier and OPTIONS keep-alive (none without trunk.carrier).
            trunk = await TrunkLink.start(config, sip, database=str(config.storage.database),
                                          on_change=components.on_trunk)
            if trunk is not None:
                stack.append(("trunk", trunk.stop))
            hub, board = Hub(), LiveBoard()
            # Webhooks (alerts, screen pops) and the alert rules; their own db connection.
            webhooks = WebhookRouter(config.webhooks, site=config.site.id)
            await webhooks.start()
            stack.append(("webhooks", webhooks.close))
            alerts_db = open_site_db(config.storage.database)
            stack.append(("alerts-db", alerts_db.close))
            alerts = AlertLoop(AlertEngine(rules_from_config(config.alerts)), hub, alerts_db,
                               poster=webhooks)
            stack.append(("alerts", alerts.close))
            feed = LiveFeed(hub, board, site=config.site.id, alerts=alerts,
                            screen_pop=ScreenPop(webhooks))
            # Security events for the alerts' security rule and the live stream: SIP guard
            # bans (on the loop) and refused API logins (from the API's worker threads).
            guard.on_ban = lambda source, until, failures: feed("security.ban", {
                "source": source.host, "transport": source.transport, "until": until,
                "failures": failures})
            loop = asyncio.get_running_loop()

            def on_security(kind: str, data: dict[str, Any]) -> None:
                loop.call_soon_threadsafe(feed, kind, data)

            # The cloud link as the edge agent reports it: wallboard, /health, link_down alert.
            link = LinkWatch(feed, config.storage.database, on_state=components.on_link,
                             stale_after=functools.partial(link_report_stale_after_s,
                                                           config.site_dir))
            link.start()
            stack.append(("link-watch", link.stop))
            # The agents' own choices (login, pause, logout), persisted and audited; on the
            # loop, through a connection of its own (the binding store writes from a thread).
            desk_db = open_site_db(config.storage.database)
            stack.append(("desk", desk_db.close))
            desk, _codes = desk_from_config(desk_db, config, on_event=feed)
            # Stopped before its connection closes: commits the desk changes still queued.
            stack.append(("desk-writer", lambda: asyncio.to_thread(desk.close)))
            # Call control: media engine, IVR, ACD and the B2BUA on the SIP service.
            calls = await start_call_control(config, sip, registrar=registrar, auth=auth,
                                             guard=guard, on_event=feed, desk=desk)
            stack.append(("calls", calls.stop))
            started_at = time.monotonic()
            health = HealthSource(
                site_id=config.site.id,
                sip_addresses=lambda: dict(sip.addresses),
                uptime_s=lambda: time.monotonic() - started_at,
                trunk_state=None if trunk is None else (lambda link=trunk: link.state.value),
                config_version=running_config_version(db),
                config_installed=lambda: _installed_config(config.storage.database),
                link_state=lambda: link.current.state if link.current is not None else None,
            )
            # The API keeps its own connection, used from worker threads, off the loop.
            site_key = config.storage.site_key
            users = UserStore.open(config.storage.database,
                                   site_key=load_site_key(site_key.parent, site_key.name))
            stack.append(("api", users.close))
            recordings = RecordingAccess.open(config)
            stack.append(("recordings", recordings.close))
            accounts = tuple((a.user, a.display_name) for a in config.sip.accounts)
            api = ApiContext(users=users, hub=hub, board=board, sip_accounts=lambda: accounts,
                             calls=calls, recordings=recordings, site=config,
                             alerts=alerts.active, on_security=on_security)
            http = await HttpServer.start(build_http_app(health, api, web=True),
                                          config.http.bind, config.http.port)
            stack.append(("http", http.close))
        except BaseException:
            await _stop_all(stack)
            raise
        audit(db, "appliance", "start", kv(site=config.site.id, pid=os.getpid()))
        anchor.start()  # (after the start row: its head is the first sent)
        components.set("appliance", True, detail="started")
        return cls(config, db, guard, auth, bindings, registrar, sip, http, started_at, stack,
                   api=api, components=components)

    def startup_line(self) -> str:
        """``edgecc appliance site=ID sip=udp:H:P,tcp:H:P,tls:H:P http=URL`` (bound ports)."""
        order = {t: i for i, t in enumerate(_TRANSPORT_ORDER)}
        sip = ",".join(
            f"{transport.lower()}:{_hostport(host, port)}"
            for transport, (host, port) in sorted(
                self.sip.addresses.items(), key=lambda item: order.get(item[0].upper(), 99)
            )
        )
        return f"edgecc appliance site={self.config.site.id} sip={sip} http={self.http.url}"

    async def close(self) -> None:
        """Stop every service in reverse start order, each bounded in time."""
        with contextlib.suppress(Exception):
            audit(self.db, "appliance", "stop", kv(site=self.config.site.id, pid=os.getpid()))
        if self.components is not None:
            self.components.stop()  # committed when its writer stops, before the database
        stack, self._stack = self._stack, []
        await _stop_all(stack)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _stop_all(stack: list[tuple[str, Callable[[], Any]]]) -> None:
    deadline = time.monotonic() + STOP_BUDGET_S
    for name, stop in reversed(stack):
        remaining = max(0.05, deadline - time.monotonic())
        try:
            result = stop()
            if inspect.isawaitable(result):
                await asyncio.wait_for(_as_coroutine(result), timeout=remaining)
        except TimeoutError:
            log.warning(kv(event="stop_timeout", service=name, budget_s=round(remaining, 2)))
        except Exception:
            log.exception(kv(event="stop_failed", service=name))


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


RESTART = 75
"""``serve``'s answer when a pushed config waits to be loaded: the caller starts the
appliance again (``edgecc appliance`` re-executes itself, same PID)."""
CONFIG_POLL_S = 2.0
"""How often the appliance looks for a config version the edge agent installed."""


async def _await_pushed_config(appliance: Appliance, loaded: int, site_dir: Path | None,
                               restart: asyncio.Event) -> None:
    """Set ``restart`` once the edge agent has installed a newer pushed config that validates
    and no call is up (a call in progress is never cut for a config change)."""
    database = appliance.config.storage.database
    waiting_for: int | None = None
    while True:
        await asyncio.sleep(CONFIG_POLL_S)
        try:
            installed = await asyncio.to_thread(_installed_config, database)
            if installed <= loaded:
                continue
            if waiting_for != installed:
                if site_dir is not None:
                    await asyncio.to_thread(load_site, site_dir)  # the edge agent checked it
                waiting_for = installed
                log.info(kv(event="config_pending", version=installed, running=loaded))
            calls = appliance.api.calls if appliance.api is not None else None
            if calls is not None and calls.active_calls():
                continue
            log.info(kv(event="config_apply", version=installed, running=loaded))
            restart.set()
            return
        except ConfigError as exc:
            log.error(kv(event="config_pending_invalid", error=str(exc).splitlines()[0]))
            loaded = max(loaded, installed)  # keep running the current one; say it once
        except Exception as exc:
            log.warning(kv(event="config_watch_failed", error=repr(exc)))


async def serve(config: SiteConfig, out: TextIO, *, site_dir: Path | None = None) -> int:
    """Run the appliance until SIGTERM/SIGINT; print the start-up line to ``out``. Returns
    RESTART when a config pushed by the cloud is installed and waits to be loaded."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        try:
            appliance = await Appliance.start(config)
        except Exception as exc:
            log.error(kv(event="start_failed", error=repr(exc)))
            print(f"edgecc appliance: cannot start: {exc}", file=sys.stderr, flush=True)
            return 1
        # Everything built at start-up lives as long as the process: keep it out of the cyclic
        # garbage collector's scans (measured 8-15% less CPU per SIP request under load).
        gc.freeze()
        out.write(appliance.startup_line() + "\n")
        out.flush()
        log.info(kv(event="started", site=config.site.id, pid=os.getpid()))
        stopped = asyncio.create_task(stop.wait())
        restart = asyncio.Event()
        watch = asyncio.create_task(_await_pushed_config(
            appliance, running_config_version(appliance.db), site_dir, restart))
        restarting = asyncio.create_task(restart.wait())
        await asyncio.wait({stopped, restarting, appliance.http.task},
                           return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if restart.is_set() and not stop.is_set():
            code = RESTART
        elif not stop.is_set():
            log.error(kv(event="http_server_ended", detail="stopping the appliance"))
            code = 1
        for task in (stopped, restarting, watch):
            task.cancel()
        log.info(kv(event="stopping", site=config.site.id))
        await appliance.close()
        log.info(kv(event="stopped", site=config.site.id))
        return code
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def run(config: SiteConfig, out: TextIO = sys.stdout, *, site_dir: Path | None = None) -> int:
    """Run the appliance in a new event loop (uvloop when installed) and return the exit code
    (RESTART: start again to load a pushed config)."""
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(serve(config, out, site_dir=site_dir))


@contextlib.contextmanager
def _read_only(database: os.PathLike[str] | str) -> Iterator[sqlite3.Connection]:
    """A short-lived read-only connection to the site database, for reads off the loop of
    rows other processes write (the edge agent's link state and installed configs)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=2.0)
    try:
        yield conn
    finally:
        conn.close()


def _installed_config(database: os.PathLike[str] | str) -> int:
    """The newest pushed config the edge agent installed."""
    with _read_only(database) as conn:
        return running_config_version(conn)
