"""The ``/api`` HTTP routes: login and logout, the caller's identity, staffing, the live
wallboard, accounts, the site's queues, IVR flow checks and the audit trail."""

import logging
import math
import tempfile
import threading
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from appliance.api import ApiContext
from appliance.api.auth import check_query, require
from appliance.api.errors import ApiError, responses
from appliance.api.middleware import note
from appliance.api.users import NAME_PATTERN, LoginOutcome, Principal, Role
from appliance.config import SiteConfig
from appliance.reporting.erlang import ErlangA, StaffingError, offered_traffic, required_agents
from appliance.reporting.kpi import INTERVALS, AgentState, KpiConfig, KpiRow, UptimeRow

API_MAX_TRAFFIC = 5000.0
"""Largest offered load (Erlangs) the API sizes for; beyond it use ``edgecc wfm staff``.
A bound on the work one request may cause."""
API_MAX_PATIENCE_LOAD = 20_000.0
"""Largest traffic × patience / AHT accepted with ``patience``: the Erlang A sums take that
many terms per evaluation, so this bounds one request to about a second of work."""
LOGINS_AT_ONCE = 4
"""scrypt costs 32 MiB per verification: more concurrent logins wait."""
STAFFING_AT_ONCE = 2
"""Staffing searches run at once (CPU-bound); more wait, so logins and reads keep flowing."""

KPI_MAX_SPAN_S = 7 * 86400
"""Longest period one KPI report covers: a bound on the work one request causes (the report
reads every queue event of the period, about 10 s per day of a 200-agent site)."""
KPI_REPORTS_AT_ONCE = 1
"""KPI reports computed at once (CPU and I/O bound); more wait."""

MAX_FLOW_CHARS = 60_000
"""Largest flow file checked (under the API's 64 KiB body limit)."""

_AUTH_ERRORS = (401, 403)

log = logging.getLogger("edgecc.api")


# ------------------------------------------------------------------------------ models


class LoginRequest(BaseModel):
    """Credentials for ``POST /api/login``."""

    name: Annotated[str, Field(pattern=NAME_PATTERN, description="login name")]
    password: Annotated[str, Field(min_length=1, max_length=1024)]
    totp: Annotated[str | None, Field(pattern=r"^[0-9]{6}$",
                                      description="current TOTP code (admins, supervisors)")] = None


class TokenResponse(BaseModel):
    """A new session."""

    token: str
    """Send it as ``Authorization: Bearer TOKEN``."""
    token_type: Literal["bearer"] = "bearer"
    name: str
    role: Literal["admin", "supervisor", "agent"]
    expires_at: float
    """Unix time the token stops working."""


class Me(BaseModel):
    """The caller."""

    name: str
    display_name: str | None
    role: Literal["admin", "supervisor", "agent"]
    two_factor: bool
    token_expires_at: float
    agent: str | None = None
    """The agent extension this user acts for (None: not linked)."""


class ErlangAFigures(BaseModel):
    """Erlang A (callers abandon) figures at the recommended staffing."""

    prob_abandon: float
    service_level_excluding_abandons: float
    average_wait: float


class StaffAnswer(BaseModel):
    """Fewest agents meeting the targets in one interval."""

    model: Literal["erlang-c", "erlang-a"]
    traffic: float
    """Offered load, Erlangs."""
    agents: int
    """Agents needed on the phones."""
    scheduled: int
    """Agents to schedule once shrinkage is added."""
    service_level: float
    asa: float
    occupancy: float
    prob_wait: float
    erlang_a: ErlangAFigures | None = None


class LiveQueueOut(BaseModel):
    """One queue on the wallboard."""

    queue: str
    waiting: int
    longest_wait: float
    offered: int
    answered: int
    abandoned: int
    answered_within: int
    service_level: float | None
    agents_by_state: dict[str, int] = Field(default_factory=dict)
    """The queue's members (site.yaml) by state; empty when the members are not known."""


class LiveOut(BaseModel):
    """The wallboard now; empty until calls flow."""

    at: float
    queues: list[LiveQueueOut]
    agents_by_state: dict[str, int]
    agents: dict[str, str]


class KpiReportOut(BaseModel):
    """KPIs computed from the event log (docs/kpis.md has every formula)."""

    since: float
    until: float
    interval: int
    """Interval length, seconds."""
    service_level_threshold: float
    short_abandon: float
    rows: list[KpiRow]
    """Per interval (oldest first), or for the whole period with ``totals``; ratios are null
    when their denominator is zero."""
    uptime: list[UptimeRow]
    """Availability per component (from ``component.up`` / ``component.down`` rows)."""
    anomalies: int
    """Events that fit no transition and were skipped."""


class AlertOut(BaseModel):
    """An alert raised and not yet cleared."""

    rule: str
    key: str
    severity: Literal["info", "warning", "critical"]
    message: str
    raised_at: float
    cleared_at: float | None


class AlertsOut(BaseModel):
    """The active alerts."""

    alerts: list[AlertOut]


class SipAccountOut(BaseModel):
    """A SIP account (no HA1)."""

    user: str
    display_name: str | None


class ApiUserOut(BaseModel):
    """An API user (no password hash, no TOTP secret)."""

    name: str
    display_name: str | None
    role: Literal["admin", "supervisor", "agent"]
    two_factor: bool
    locked_until: float | None


class AccountsOut(BaseModel):
    """Who can use the site."""

    sip_accounts: list[SipAccountOut]
    api_users: list[ApiUserOut]


class QueueOut(BaseModel):
    """A queue as configured."""

    name: str
    members: list[str]
    strategy: str
    ring_timeout: float
    wrap_up: float
    max_wait: float | None
    record: bool


class AgentOut(BaseModel):
    """A SIP account and the queues it answers."""

    user: str
    display_name: str | None
    role: str
    queues: list[str]


class SiteOut(BaseModel):
    """The running site's call routing."""

    site: str
    name: str
    queues: list[QueueOut]
    agents: list[AgentOut]
    dids: dict[str, str]


class DeskCodesOut(BaseModel):
    """What an agent may choose: pause reasons and dispositions (code -> name)."""

    pause_reasons: dict[str, str]
    dispositions: dict[str, str]


class FlowCheckIn(BaseModel):
    """An IVR flow file to check (``flows:`` YAML as in docs/ivr.md)."""

    yaml: Annotated[str, Field(min_length=1, max_length=MAX_FLOW_CHARS)]


class FlowProblemOut(BaseModel):
    """One problem found, with its line in the uploaded text."""

    line: int | None
    flow: str | None
    node: str | None
    message: str


class FlowCheckOut(BaseModel):
    """The result of a check: the flows it defines, or every problem."""

    valid: bool
    flows: list[str]
    problems: list[FlowProblemOut]


class AuditRow(BaseModel):
    """One row of the audit log."""

    id: int
    at: float
    actor: str
    action: str
    detail: str


class AuditOut(BaseModel):
    """Audit rows, newest first."""

    rows: list[AuditRow]


# ------------------------------------------------------------------------------ routes


def _finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


_STAFF_FIELDS = {"calls": "calls", "aht": "aht", "interval": "interval", "service_level": "sl",
                 "threshold": "threshold", "asa": "asa", "shrinkage": "shrinkage",
                 "patience": "patience", "max_occupancy": "max_occupancy",
                 "offered": "calls"}


def _staffing_field(message: str) -> str | None:
    first = message.split(" ", 1)[0]
    return _STAFF_FIELDS.get(first)


def build_api_router(ctx: ApiContext) -> APIRouter:
    """The ``/api`` routes bound to ``ctx``."""
    users = ctx.users
    router = APIRouter(prefix="/api")
    any_role = require(users, Role.AGENT)
    supervisor = require(users, Role.SUPERVISOR)
    admin = require(users, Role.ADMIN)
    login_slots = threading.BoundedSemaphore(LOGINS_AT_ONCE)
    staffing_slots = threading.BoundedSemaphore(STAFFING_AT_ONCE)
    kpi_slots = threading.BoundedSemaphore(KPI_REPORTS_AT_ONCE)

    @router.post("/login", response_model=TokenResponse, tags=["auth"],
                 summary="Log in with name, password and (admins, supervisors) TOTP code",
                 responses=responses(400, 401, 413, 422, 429))
    def login(body: LoginRequest, request: Request) -> TokenResponse:
        check_query(request)
        client = request.client
        source = f"{client.host}:{client.port}" if client else "unknown"
        with login_slots:
            result = users.login(body.name, body.password, body.totp, source)
        note(request, actor=body.name, action=f"login_{result.outcome.value}",
             reason=result.reason)
        if result.outcome is not LoginOutcome.OK and ctx.on_security is not None:
            try:
                ctx.on_security("security.login_failed", {
                    "name": body.name, "source": source, "outcome": result.outcome.value})
            except Exception:
                log.exception("event=on_security_failed")
        if result.outcome is LoginOutcome.LOCKED:
            retry = math.ceil(result.retry_after or 1)
            raise ApiError(429, f"too many failed logins for this user; try again in {retry} s",
                           headers={"Retry-After": str(retry)})
        if result.outcome is not LoginOutcome.OK or result.principal is None:
            raise ApiError(401, "wrong name, password or code")
        p = result.principal
        assert result.token is not None
        return TokenResponse(token=result.token, name=p.name, role=p.role.value,
                             expires_at=p.expires_at)

    @router.post("/logout", status_code=204, tags=["auth"], summary="End this token's session",
                 responses=responses(400, *_AUTH_ERRORS, 413))
    def logout(request: Request, principal: Annotated[Principal, Depends(any_role)]) -> Response:
        users.revoke(principal.token_hash)
        note(request, action="logout")
        return Response(status_code=204)

    @router.get("/me", response_model=Me, tags=["auth"], summary="The caller",
                responses=responses(*_AUTH_ERRORS))
    def me(principal: Annotated[Principal, Depends(any_role)]) -> Me:
        found = next((u for u in users.users() if u.id == principal.user_id), None)
        return Me(name=principal.name, display_name=found.display_name if found else None,
                  role=principal.role.value, two_factor=bool(found and found.two_factor),
                  token_expires_at=principal.expires_at, agent=users.agent_of(principal.user_id))

    @router.get("/wfm/staff", response_model=StaffAnswer, tags=["wfm"],
                summary="Agents needed for an interval (Erlang C, or Erlang A with patience)",
                responses=responses(*_AUTH_ERRORS, 422))
    def wfm_staff(
        principal: Annotated[Principal, Depends(any_role)],
        calls: Annotated[float, Query(ge=0, le=10_000_000, allow_inf_nan=False,
                                      description="calls offered in the interval")],
        aht: Annotated[float, Query(gt=0, le=86400, allow_inf_nan=False,
                                    description="average handle time, seconds")],
        interval: Annotated[float, Query(gt=0, le=86400, allow_inf_nan=False)] = 1800,
        sl: Annotated[float, Query(gt=0, lt=1, description="service-level target")] = 0.8,
        threshold: Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False)] = 20,
        asa: Annotated[float | None, Query(gt=0, allow_inf_nan=False)] = None,
        shrinkage: Annotated[float, Query(ge=0, lt=1)] = 0,
        patience: Annotated[float | None, Query(ge=1, le=86400, allow_inf_nan=False)] = None,
        # At least 5 %: the occupancy cap alone then asks for at most 20 × traffic agents.
        max_occupancy: Annotated[float | None, Query(ge=0.05, le=1)] = None,
    ) -> StaffAnswer:
        try:
            traffic = offered_traffic(calls, aht, interval)
            if traffic > API_MAX_TRAFFIC:
                raise ApiError(422, f"calls: offered traffic {traffic:.0f} Erlangs is above "
                               f"the API's limit of {API_MAX_TRAFFIC:.0f}", "calls")
            if patience is not None and traffic * patience / aht > API_MAX_PATIENCE_LOAD:
                raise ApiError(422, f"patience: traffic × patience / aht is "
                               f"{traffic * patience / aht:.0f}, above the API's limit of "
                               f"{API_MAX_PATIENCE_LOAD:.0f}; use `edgecc wfm staff`",
                               "patience")
            with staffing_slots:
                plan = required_agents(calls, aht, interval, service_level=sl,
                                       threshold=threshold, asa=asa,
                                       max_occupancy=max_occupancy, shrinkage=shrinkage,
                                       patience=patience)
        except StaffingError as exc:
            raise ApiError(422, str(exc), _staffing_field(str(exc))) from None
        except (ArithmeticError, ValueError) as exc:
            # Figures so extreme the model's arithmetic gives up: the input's fault, not ours.
            raise ApiError(422, f"no staffing can be computed for these figures ({exc})",
                           None) from None
        extra = None
        if isinstance(plan.erlang_a, ErlangA):
            extra = ErlangAFigures(
                prob_abandon=_finite(plan.erlang_a.prob_abandon),
                service_level_excluding_abandons=_finite(
                    plan.erlang_a.service_level_excluding_abandons),
                average_wait=_finite(plan.erlang_a.average_wait))
        return StaffAnswer(model="erlang-a" if patience else "erlang-c", traffic=plan.traffic,
                           agents=plan.agents, scheduled=plan.scheduled,
                           service_level=_finite(plan.service_level), asa=_finite(plan.asa),
                           occupancy=_finite(plan.occupancy), prob_wait=_finite(plan.prob_wait),
                           erlang_a=extra)

    @router.get("/kpi/live", response_model=LiveOut, tags=["kpi"],
                summary="The live wallboard (supervisors and admins)",
                responses=responses(*_AUTH_ERRORS))
    async def kpi_live(principal: Annotated[Principal, Depends(supervisor)]) -> LiveOut:
        # async: the board is only ever touched on the event loop's thread.
        snap = ctx.board.snapshot(ctx.clock())
        # Every configured queue has a tile, with or without calls yet.
        members = {q.name: q.members for q in ctx.site.queues} if ctx.site is not None else {}
        seen = {q.queue: q for q in snap.queues}
        states = [state.value for state in AgentState]
        queues = []
        for name in sorted(set(seen) | set(members)):
            q = seen.get(name)
            by_state = dict.fromkeys(states, 0) if name in members else {}
            for agent in members.get(name, ()):
                by_state[snap.agents.get(agent, AgentState.LOGGED_OUT).value] += 1
            queues.append(LiveQueueOut(
                queue=name, waiting=q.waiting if q else 0,
                longest_wait=q.longest_wait if q else 0.0, offered=q.offered if q else 0,
                answered=q.answered if q else 0, abandoned=q.abandoned if q else 0,
                answered_within=q.answered_within if q else 0,
                service_level=q.service_level if q else None, agents_by_state=by_state))
        return LiveOut(
            at=snap.at,
            queues=queues,
            agents_by_state={state.value: n for state, n in snap.agents_by_state.items()},
            agents={agent: state.value for agent, state in snap.agents.items()})

    @router.get("/kpi/report", response_model=KpiReportOut, tags=["kpi"],
                summary="KPIs per interval and queue, agent or site from the event log "
                        "(supervisors and admins)",
                responses=responses(*_AUTH_ERRORS, 422, 503))
    def kpi_report(
        principal: Annotated[Principal, Depends(supervisor)],
        since: Annotated[float, Query(ge=0, le=1e11, allow_inf_nan=False,
                                      description="Unix time, inclusive")],
        until: Annotated[float | None, Query(ge=0, le=1e11, allow_inf_nan=False,
                                             description="Unix time, exclusive (default "
                                                         "now)")] = None,
        interval: Annotated[int, Query(ge=900, le=3600, json_schema_extra={
            "enum": list(INTERVALS)}, description="interval length, seconds")] = 1800,
        scope: Literal["queue", "agent", "site"] = "queue",
        key: Annotated[str | None, Query(min_length=1, max_length=64,
                                         description="one queue, agent or site")] = None,
        totals: Annotated[bool, Query(description="the whole period instead of "
                                                  "intervals")] = False,
        threshold: Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False,
                                          description="service-level threshold, s")] = 20,
        short_abandon: Annotated[float, Query(ge=0, le=3600, allow_inf_nan=False)] = 5,
    ) -> KpiReportOut:
        if interval not in INTERVALS:
            raise ApiError(422, f"interval: expected one of {', '.join(map(str, INTERVALS))} "
                                f"seconds, got {interval}", "interval")
        site = ctx.site
        if site is None:
            raise ApiError(503, "the site database is not available here")
        end = ctx.clock() if until is None else until
        if end <= since:
            raise ApiError(422, "until: expected a time after since", "until")
        if end - since > KPI_MAX_SPAN_S:
            raise ApiError(422, f"since: a report covers at most {KPI_MAX_SPAN_S // 86400} "
                                "days; ask for several", "since")
        config = KpiConfig(interval=interval, service_level_threshold=threshold,
                           short_abandon=short_abandon)
        with kpi_slots:
            report = _kpi_report(site, config, since, end)
        rows = [r for r in (report.totals if totals else report.intervals)
                if r.scope == scope and (key is None or r.key == key)]
        uptime = [u for u in report.uptime if (u.interval_start is None) == totals]
        return KpiReportOut(since=since, until=end, interval=interval,
                            service_level_threshold=threshold, short_abandon=short_abandon,
                            rows=rows, uptime=uptime, anomalies=report.anomalies)

    @router.get("/alerts", response_model=AlertsOut, tags=["kpi"],
                summary="Alerts active now (supervisors and admins)",
                responses=responses(*_AUTH_ERRORS, 503))
    async def active_alerts(principal: Annotated[Principal, Depends(supervisor)]) -> AlertsOut:
        # async: the alert engine lives on the event loop's thread.
        if ctx.alerts is None:
            raise ApiError(503, "alerts are not evaluated on this appliance")
        return AlertsOut(alerts=[AlertOut(**a) for a in ctx.alerts()])

    @router.get("/config/accounts", response_model=AccountsOut, tags=["config"],
                summary="SIP accounts and API users (admins)",
                responses=responses(*_AUTH_ERRORS))
    def config_accounts(principal: Annotated[Principal, Depends(admin)]) -> AccountsOut:
        return AccountsOut(
            sip_accounts=[SipAccountOut(user=u, display_name=d) for u, d in ctx.sip_accounts()],
            api_users=[ApiUserOut(name=u.name, display_name=u.display_name, role=u.role.value,
                                  two_factor=u.two_factor, locked_until=u.locked_until)
                       for u in users.users()])

    @router.get("/config/site", response_model=SiteOut, tags=["config"],
                summary="The site's queues, agents and numbers (admins)",
                responses=responses(*_AUTH_ERRORS, 503))
    def config_site(principal: Annotated[Principal, Depends(admin)]) -> SiteOut:
        site = ctx.site
        if site is None:
            raise ApiError(503, "the site configuration is not available here")
        answers: dict[str, list[str]] = {}
        for q in site.queues:
            for member in q.members:
                answers.setdefault(member, []).append(q.name)
        return SiteOut(
            site=site.site.id, name=site.site.name,
            queues=[QueueOut(name=q.name, members=list(q.members), strategy=q.strategy,
                             ring_timeout=q.ring_timeout, wrap_up=float(q.wrap_up),
                             max_wait=q.max_wait, record=bool(q.record)) for q in site.queues],
            agents=[AgentOut(user=a.user, display_name=a.display_name, role=a.role,
                             queues=answers.get(a.user, [])) for a in site.sip.accounts],
            dids=dict(site.ivr.dids))

    @router.get("/config/desk", response_model=DeskCodesOut, tags=["config"],
                summary="Pause reasons and dispositions of this site (any role)",
                responses=responses(*_AUTH_ERRORS, 503))
    def config_desk(principal: Annotated[Principal, Depends(any_role)]) -> DeskCodesOut:
        site = ctx.site
        if site is None:
            raise ApiError(503, "the site configuration is not available here")
        return DeskCodesOut(pause_reasons=dict(site.agents.pause_reasons),
                            dispositions=dict(site.agents.dispositions))

    @router.post("/config/flows/check", response_model=FlowCheckOut, tags=["config"],
                 summary="Check an IVR flow file against this site's prompts and queues "
                         "(admins)", responses=responses(400, *_AUTH_ERRORS, 413, 422, 503))
    def check_flows(body: FlowCheckIn, request: Request,
                    principal: Annotated[Principal, Depends(admin)]) -> FlowCheckOut:
        site = ctx.site
        if site is None:
            raise ApiError(503, "the site configuration is not available here")
        note(request, action="flows_check")
        return _check_flows(site, body.yaml)

    @router.get("/audit", response_model=AuditOut, tags=["config"],
                summary="Recent audit log rows, newest first (admins)",
                responses=responses(*_AUTH_ERRORS, 422))
    def audit_log(
        principal: Annotated[Principal, Depends(admin)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        before: Annotated[int | None, Query(ge=1, le=2**62,
                                            description="only rows with a smaller id")] = None,
    ) -> AuditOut:
        return AuditOut(rows=[AuditRow(**row) for row in users.audit_rows(limit, before)])

    return router


def _kpi_report(site: SiteConfig, config: KpiConfig, since: float, until: float) -> Any:
    """``compute_kpis`` over the site's event log in [since, until), read through a
    read-only connection of its own; the report ends at ``until``."""
    import sqlite3

    import sqlite_utils

    from appliance.reporting.events import EventError
    from appliance.reporting.from_log import component_events_from_db, queue_events_from_db
    from appliance.reporting.kpi import compute_kpis

    try:
        conn = sqlite3.connect(f"file:{site.storage.database}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise ApiError(503, f"the site database cannot be read: {exc}") from None
    try:
        db = sqlite_utils.Database(conn)
        events: list[Any] = list(queue_events_from_db(db, since, until))
        events += component_events_from_db(db, since, until)
    except sqlite3.Error as exc:
        raise ApiError(503, f"the site database cannot be read: {exc}") from None
    except EventError as exc:
        raise ApiError(503, f"the event log holds a row the report cannot read: {exc}"
                       ) from None
    finally:
        conn.close()
    return compute_kpis(events, config, end=until)


def _check_flows(site: SiteConfig, text: str) -> FlowCheckOut:
    """Validate ``text`` as a flow file with the site's prompts and queues; nothing is kept."""
    from appliance.ivr.flow import FlowError, load_flows

    shipped = Path(__file__).resolve().parent.parent / "data" / "prompts"
    prompts = {p.stem for p in Path(site.ivr.prompts or shipped).glob("*.wav")}
    with tempfile.TemporaryDirectory(prefix="edgecc-flows-") as scratch:
        path = Path(scratch) / "upload.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            flows = load_flows(path, prompts=prompts, queues=[q.name for q in site.queues],
                               file="upload.yaml")
        except FlowError as exc:
            return FlowCheckOut(valid=False, flows=[], problems=[
                FlowProblemOut(line=p.line, flow=p.flow, node=p.node, message=p.message)
                for p in exc.problems])
    return FlowCheckOut(valid=True, flows=sorted(flows), problems=[])
