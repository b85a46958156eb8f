"""The ``/api`` HTTP routes: login and logout, the caller's identity, staffing, the live
wallboard, accounts and the audit trail."""

import math
import threading
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from appliance.api import ApiContext
from appliance.api.auth import check_query, require
from appliance.api.errors import ApiError, responses
from appliance.api.middleware import note
from appliance.api.users import NAME_PATTERN, LoginOutcome, Principal, Role
from appliance.reporting.erlang import ErlangA, StaffingError, offered_traffic, required_agents

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

_AUTH_ERRORS = (401, 403)


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


class LiveOut(BaseModel):
    """The wallboard now; empty until calls flow."""

    at: float
    queues: list[LiveQueueOut]
    agents_by_state: dict[str, int]
    agents: dict[str, str]


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
                  token_expires_at=principal.expires_at)

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
        return LiveOut(
            at=snap.at,
            queues=[LiveQueueOut(queue=q.queue, waiting=q.waiting, longest_wait=q.longest_wait,
                                 offered=q.offered, answered=q.answered, abandoned=q.abandoned,
                                 answered_within=q.answered_within,
                                 service_level=q.service_level) for q in snap.queues],
            agents_by_state={state.value: n for state, n in snap.agents_by_state.items()},
            agents={agent: state.value for agent, state in snap.agents.items()})

    @router.get("/config/accounts", response_model=AccountsOut, tags=["config"],
                summary="SIP accounts and API users (admins)",
                responses=responses(*_AUTH_ERRORS))
    def config_accounts(principal: Annotated[Principal, Depends(admin)]) -> AccountsOut:
        return AccountsOut(
            sip_accounts=[SipAccountOut(user=u, display_name=d) for u, d in ctx.sip_accounts()],
            api_users=[ApiUserOut(name=u.name, display_name=u.display_name, role=u.role.value,
                                  two_factor=u.two_factor, locked_until=u.locked_until)
                       for u in users.users()])

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
