"""The ``/api/agents`` routes: every agent's state, and log in / log out / pause / unpause /
disposition through the agent desk.

Admins and supervisors act on any agent; an API user of role ``agent`` only on the extension
they are linked to (``UserStore.link_agent``). Each change goes to the desk (its row, audit row
and ``agent.*`` event in one transaction, with the caller as actor and their address as source),
then the desk's router inputs go to the running router through ``DeskService.apply``.

Handlers are ``async``: the desk and the router live on the event loop's thread.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field

from appliance.acd.desk import MAX_CALL_ID_CHARS, DeskError, DeskService, RouterInput
from appliance.api.auth import require
from appliance.api.errors import ApiError, responses
from appliance.api.middleware import note
from appliance.api.users import Principal, Role, UserStore
from appliance.log import kv

log = logging.getLogger("edgecc.api.agents")

AGENT_PATTERN = r"^[A-Za-z0-9._+-]{1,64}$"
"""An agent id: the user of a SIP account (as in ``site.yaml`` ``sip.accounts``)."""

_AUTH_ERRORS = (401, 403)
COMMIT_WAIT_S = 10.0
"""Longest an answer waits for its change to be committed by the desk's writer."""

AgentId = Annotated[str, Path(pattern=AGENT_PATTERN, description="agent extension")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PauseRequest(_Body):
    """Why the agent pauses."""

    reason: Annotated[str | None, Field(max_length=64, description="pause reason code or name "
                                        "(site.yaml agents.pause_reasons); null: none")] = None


class DispositionRequest(_Body):
    """The outcome of a call."""

    call_id: Annotated[str, Field(min_length=1, max_length=MAX_CALL_ID_CHARS)]
    code: Annotated[str, Field(min_length=1, max_length=64,
                               description="disposition code or name (agents.dispositions)")]


class AgentOut(BaseModel):
    """An agent as a supervisor sees them."""

    agent: str
    state: Literal["logged-out", "available", "ringing", "on-call", "wrap-up", "paused"]
    """Operational state: on-call, ringing or wrap-up when the router says so, else presence."""
    presence: Literal["logged-out", "available", "paused"]
    """What the agent chose."""
    reason: str | None
    """Pause reason name (``auto-pause`` when the router paused them)."""
    since: float
    """Unix time of the last presence change (0 when never)."""
    actor: str
    """Who made it."""
    source: str
    """From where."""
    calls: int
    ringing: int
    missed: int
    """Consecutive offers that rang out."""
    in_sync: bool
    """Whether the router's presence matches the desk's."""
    outside: int = 0
    """Calls outside the queues in progress (click-to-dial, outbound, a transfer to the
    agent): while there is one, ``state`` is ``on-call`` whatever the presence."""


class AgentsOut(BaseModel):
    """Every configured agent, in configuration order."""

    agents: list[AgentOut]


def _source(request: Request) -> str:
    client = request.client
    return f"{client.host}:{client.port}" if client else "unknown"


def build_agents_router(desk_provider: Callable[[], DeskService | None],
                        users: UserStore, *, clock: Callable[[], float] = time.time
                        ) -> APIRouter:
    """The ``/api/agents`` routes. ``desk_provider()`` returns the running DeskService (None
    while the appliance has none: 503); ``clock`` gives the Unix time of changes."""
    router = APIRouter(prefix="/api/agents", tags=["agents"])
    any_role = require(users, Role.AGENT)
    supervisor = require(users, Role.SUPERVISOR)

    def service() -> DeskService:
        found = desk_provider()
        if found is None:
            raise ApiError(503, "the agent desk is not running")
        return found

    def check_own(principal: Principal, agent: str) -> None:
        if principal.role.allows(Role.SUPERVISOR):
            return
        own = users.agent_of(principal.user_id)
        if own is None:
            raise ApiError(403, f"user {principal.name} is not linked to an agent extension")
        if own != agent:
            raise ApiError(403, f"an agent may only act on their own extension ({own})",
                           "agent")

    def view(svc: DeskService, agent: str) -> AgentOut:
        try:
            routing = svc.router_view(agent)
            shown = svc.desk.view(agent, routing)
        except DeskError as exc:
            raise _api_error(exc) from None
        outside = getattr(routing, "outside", 0) if routing is not None else 0
        if outside and shown["state"] not in ("on-call", "ringing"):
            # A call outside the queues keeps the agent busy though the router offers
            # nothing: never shown as available (or paused, or in wrap-up) while on it.
            shown["state"] = "on-call"
        return AgentOut(**shown, outside=outside)

    async def act(request: Request, principal: Principal, agent: str, action: str,
                  change: Callable[[DeskService, float, str, str], Any]) -> AgentOut:
        check_own(principal, agent)
        svc = service()
        actor, source = f"api:{principal.name}", _source(request)
        note(request, action=f"agent.{action}", agent=agent)
        try:
            inputs = change(svc, clock(), actor, source)
        except DeskError as exc:
            raise _api_error(exc) from None
        if inputs:
            try:
                svc.apply(inputs)
            except Exception as exc:
                # The change is recorded; the router refused it (it was out of step with the
                # desk). The answer shows in_sync false; the log says why.
                log.error(kv(event="agent_desk_apply_failed", agent=agent, action=action,
                             error=repr(exc)))
        await _committed(svc, agent, action)
        return view(svc, agent)

    @router.get("", response_model=AgentsOut, summary="Every agent's state (supervisors)",
                responses=responses(*_AUTH_ERRORS, 422, 503))
    async def list_agents(principal: Annotated[Principal, Depends(supervisor)]) -> AgentsOut:
        svc = service()
        return AgentsOut(agents=[view(svc, a) for a in svc.desk.agents])

    @router.get("/{agent}", response_model=AgentOut, summary="One agent's state",
                responses=responses(*_AUTH_ERRORS, 404, 422, 503))
    async def get_agent(agent: AgentId,
                        principal: Annotated[Principal, Depends(any_role)]) -> AgentOut:
        check_own(principal, agent)
        return view(service(), agent)

    @router.post("/{agent}/login", response_model=AgentOut, summary="Log the agent in",
                 responses=responses(400, *_AUTH_ERRORS, 404, 409, 413, 422, 503))
    async def login(agent: AgentId, request: Request,
                    principal: Annotated[Principal, Depends(any_role)]) -> AgentOut:
        return await act(request, principal, agent, "login",
                   lambda s, now, actor, src: s.desk.login(agent, now, actor=actor, source=src))

    @router.post("/{agent}/logout", response_model=AgentOut, summary="Log the agent out",
                 responses=responses(400, *_AUTH_ERRORS, 404, 409, 413, 422, 503))
    async def logout(agent: AgentId, request: Request,
                     principal: Annotated[Principal, Depends(any_role)]) -> AgentOut:
        return await act(request, principal, agent, "logout",
                   lambda s, now, actor, src: s.desk.logout(agent, now, actor=actor, source=src))

    @router.post("/{agent}/pause", response_model=AgentOut,
                 summary="Pause the agent, with a reason",
                 responses=responses(400, *_AUTH_ERRORS, 404, 409, 413, 422, 503))
    async def pause(agent: AgentId, request: Request,
                    principal: Annotated[Principal, Depends(any_role)],
                    body: Annotated[PauseRequest | None, Body()] = None) -> AgentOut:
        reason = body.reason if body is not None else None
        return await act(request, principal, agent, "pause",
                   lambda s, now, actor, src: s.desk.pause(agent, reason, now, actor=actor,
                                                           source=src))

    @router.post("/{agent}/unpause", response_model=AgentOut, summary="Make the agent ready",
                 responses=responses(400, *_AUTH_ERRORS, 404, 409, 413, 422, 503))
    async def unpause(agent: AgentId, request: Request,
                      principal: Annotated[Principal, Depends(any_role)]) -> AgentOut:
        def ready(s: DeskService, now: float, actor: str, src: str) -> list[RouterInput]:
            view = s.router_view(agent)
            return s.desk.unpause(agent, now, actor=actor, source=src,
                                  in_wrap_up=view is not None and view.in_wrap_up)

        return await act(request, principal, agent, "unpause", ready)

    @router.post("/{agent}/disposition", response_model=AgentOut,
                 summary="Record the outcome of a call",
                 responses=responses(400, *_AUTH_ERRORS, 404, 413, 422, 503))
    async def disposition(agent: AgentId, body: DispositionRequest, request: Request,
                          principal: Annotated[Principal, Depends(any_role)]) -> AgentOut:
        note(request, call_id=body.call_id)
        return await act(request, principal, agent, "disposition",
                   lambda s, now, actor, src: s.desk.disposition(
                       agent, body.call_id, body.code, now, actor=actor, source=src))

    return router


async def _committed(svc: DeskService, agent: str, action: str) -> None:
    """Answer only once the change's rows are committed (durable): a client that reads the
    database or the audit log after the answer finds them. 503 when the commit failed or
    took longer than COMMIT_WAIT_S (the change is in effect; its rows may be missing)."""
    written = getattr(svc.desk, "written", lambda: None)()
    if written is None:
        return
    try:
        # Shielded: a timeout or a client gone must not cancel the change's write.
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(written)), COMMIT_WAIT_S)
    except Exception as exc:
        log.error(kv(event="agent_desk_commit_failed", agent=agent, action=action,
                     error=repr(exc)))
        raise ApiError(503, f"the {action} of agent {agent} is in effect but could not be "
                       "recorded in the site database; see the appliance log") from None


def _api_error(exc: DeskError) -> ApiError:
    # A bad input (400 in the desk) is a bad request member here: 422 naming the member, as
    # every other API validation error.
    status = 422 if exc.status == 400 else exc.status
    return ApiError(status, f"{exc.field}: {exc.message}" if status == 422 and exc.field
                    else exc.message, exc.field)
