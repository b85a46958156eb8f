"""The ``/api/config`` routes that change the site: queues, agents, skills and IVR flows.

Admins write, supervisors read. Every write names the config version it was based on
(``If-Match``, the ``ETag`` of a read), is validated whole as the appliance validates
site.yaml at start, and is installed as the next version (``appliance.config_edit``); the
appliance loads it once no call is up. See docs/api.md, "Configuration".
"""

import logging
import re
import threading
from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import BaseModel, Field

from appliance.api import ApiContext
from appliance.api.auth import require
from appliance.api.errors import ApiError, responses
from appliance.api.middleware import note
from appliance.api.users import Principal, Role
from appliance.config import QueueName, QueueSettings, SkillLevel, SkillName, ha1
from appliance.config_edit import Change, ConfigEditError, Installed, SiteEditor
from appliance.log import kv

log = logging.getLogger("edgecc.api")

MAX_FLOW_CHARS = 60_000
"""Largest flow upload (under the API's 64 KiB body limit)."""

AgentUser = Annotated[str, Field(pattern=r"^[A-Za-z0-9._+-]{1,64}$",
                                 description="SIP user, usually the extension")]
_READ = (401, 403, 404, 503)
_WRITE = (400, 401, 403, 404, 409, 412, 413, 422, 428, 503)


# ------------------------------------------------------------------------------ models


class VersionOut(BaseModel):
    """The config versions: installed (what edits are based on) and running."""

    version: int
    """The installed version; send it back as ``If-Match``."""
    running: int | None
    """The version the appliance is running; below ``version`` until it has restarted
    with the new one (it does so once no call is up)."""


class QueueList(BaseModel):
    """The queues of the installed config."""

    version: int
    queues: list[QueueSettings]


class QueueOut(BaseModel):
    """One queue of the installed config."""

    version: int
    queue: QueueSettings


class AgentIn(BaseModel):
    """An agent's account: who, role and skills (no password: see the password route)."""

    model_config = {"extra": "forbid"}

    display_name: Annotated[str | None, Field(max_length=128)] = None
    role: Literal["agent", "supervisor"] = "agent"
    skills: dict[SkillName, SkillLevel] = Field(default_factory=dict)
    """Skill name -> level 1 (novice) to 10 (expert)."""
    queues: list[QueueName] | None = None
    """The queues the agent answers (as a member, appended last); None: unchanged."""


class PasswordIn(BaseModel):
    """A SIP password, stored only as digest HA1 values."""

    model_config = {"extra": "forbid"}

    password: Annotated[str, Field(min_length=8, max_length=128)]


class AgentCreate(AgentIn):
    """A new agent, with the SIP password of its phone (stored as HA1, never returned)."""

    user: AgentUser
    password: Annotated[str, Field(min_length=8, max_length=128)]


class AgentOut(BaseModel):
    """An agent as configured (no HA1, no password)."""

    user: str
    display_name: str | None
    role: str
    skills: dict[str, int]
    queues: list[str]


class AgentList(BaseModel):
    """The agents of the installed config."""

    version: int
    agents: list[AgentOut]


class AgentOne(BaseModel):
    """One agent of the installed config."""

    version: int
    agent: AgentOut


class SkillIn(BaseModel):
    """A skill's description."""

    model_config = {"extra": "forbid"}

    description: Annotated[str | None, Field(max_length=256)] = None


class SkillCreate(SkillIn):
    """A new skill."""

    name: SkillName


class SkillOut(BaseModel):
    """A skill, who has it and which queues require it."""

    name: str
    description: str | None
    agents: dict[str, int]
    """Agent -> level."""
    queues: dict[str, int]
    """Queue -> lowest level required."""


class SkillList(BaseModel):
    """The skills of the installed config."""

    version: int
    skills: list[SkillOut]


class FlowUpload(BaseModel):
    """A flow file (``flows:`` YAML as in docs/ivr.md): each flow in it is added or
    replaces the flow of the same name; the site's other flows stay."""

    model_config = {"extra": "forbid"}

    yaml: Annotated[str, Field(min_length=1, max_length=MAX_FLOW_CHARS)]


class FlowProblem(BaseModel):
    """One problem of an upload, with its line in the uploaded text."""

    line: int | None
    flow: str | None
    node: str | None
    message: str


class FlowList(BaseModel):
    """The IVR flows of the installed config and the numbers (DIDs) that start them."""

    version: int
    flows: list[str]
    dids: dict[str, str]


class FlowOut(BaseModel):
    """One flow as YAML text (a ``flows:`` document holding just it)."""

    version: int
    name: str
    yaml: str


class FlowsChanged(BaseModel):
    """The flows an upload added or replaced."""

    version: int
    flows: list[str]


class Deleted(BaseModel):
    """A deletion installed."""

    version: int
    deleted: str


# ------------------------------------------------------------------------------ helpers


def _if_match(value: str | None) -> int | None:
    """The version named by an ``If-Match`` header (``"7"``, ``W/"7"`` or ``7``)."""
    if value is None:
        return None
    found = re.fullmatch(r'\s*(?:W/)?"?(\d{1,18})"?\s*', value)
    if found is None:
        raise ApiError(400, 'If-Match: expected the config version as an ETag, e.g. "7"',
                       "If-Match")
    return int(found.group(1))


def _body_field(key: str | None) -> str | None:
    """The body member a site.yaml key stands for: the edited queue's, agent's or skill's
    own keys lose their place in the file (``queues[2].members[0]`` -> ``members[0]``)."""
    if key is None:
        return None
    return re.sub(r"^(?:queues|sip\.accounts|skills)\[\d+\]\.", "", key)


def _etag(response: Response, version: int) -> None:
    response.headers["ETag"] = f'"{version}"'


def _find(items: list[dict[str, Any]], key: str, name: str) -> int | None:
    return next((i for i, item in enumerate(items) if str(item.get(key)) == name), None)


def _agent_out(data: dict[str, Any], account: dict[str, Any]) -> AgentOut:
    user = str(account["user"])
    return AgentOut(user=user, display_name=account.get("display_name"),
                    role=account.get("role", "agent"), skills=dict(account.get("skills") or {}),
                    queues=[q["name"] for q in data.get("queues") or []
                            if user in [str(m) for m in q.get("members") or ()]])


def _flows_of(data: dict[str, Any]) -> dict[str, Any]:
    flows = (data.get("ivr") or {}).get("flows") or {}
    if isinstance(flows, str):
        raise ConfigEditError(409, f"ivr.flows names the file {flows!r}: the API edits flows "
                                   "kept in site.yaml only; edit that file instead", "ivr.flows")
    return flows


def _flows_routing_to(data: dict[str, Any], queue: str) -> list[str]:
    """Flows with a node that sends callers to ``queue``."""
    try:
        flows = _flows_of(data)
    except ConfigEditError:
        return []
    found = []
    for name, flow in flows.items():
        nodes = (flow or {}).get("nodes") or {} if isinstance(flow, dict) else {}
        if any(isinstance(n, dict) and str(n.get("queue")) == queue for n in nodes.values()):
            found.append(str(name))
    return found


# ------------------------------------------------------------------------------ routes


def build_site_config_router(ctx: ApiContext) -> APIRouter:
    """The configuration-changing routes bound to ``ctx``."""
    router = APIRouter(prefix="/api/config", tags=["config"])
    supervisor = require(ctx.users, Role.SUPERVISOR)
    admin = require(ctx.users, Role.ADMIN)
    Reader = Annotated[Principal, Depends(supervisor)]
    Writer = Annotated[Principal, Depends(admin)]
    IfMatch = Annotated[str | None, Header(alias="If-Match",
                                           description="the config version (ETag) read")]

    made: list[SiteEditor] = []
    making = threading.Lock()

    def editor() -> SiteEditor:
        if ctx.site_editor is not None:
            return ctx.site_editor
        site = ctx.site
        if site is None or site.site_dir is None:
            raise ApiError(503, "the site configuration is not editable here")
        with making:  # one editor, so its lock orders this appliance's changes
            if not made:
                made.append(SiteEditor(site.site_dir, site.storage.database))
            return made[0]

    def read() -> tuple[int, dict[str, Any]]:
        try:
            return editor().read()
        except ConfigEditError as exc:
            raise ApiError(exc.status, exc.message, exc.field) from None

    def write(request: Request, response: Response, principal: Principal, if_match: str | None,
              change: Callable[[dict[str, Any]], Change]) -> Installed:
        expected = _if_match(if_match)
        try:
            done = editor().edit(expected, principal.name, change)
        except ConfigEditError as exc:
            raise ApiError(exc.status, exc.message, _body_field(exc.field)) from None
        c = done.change
        note(request, action=f"config_{c.kind}_{c.op}", name=c.name, version=done.version)
        log.info(kv(event="config_changed", kind=c.kind, name=c.name, op=c.op,
                    version=done.version, by=principal.name))
        try:
            ctx.hub.publish_threadsafe("config.changed", {
                "version": done.version, "kind": c.kind, "name": c.name, "op": c.op,
                "by": principal.name}, audience=Role.SUPERVISOR)
        except (TypeError, ValueError) as exc:
            log.error(kv(event="config_event_failed", error=str(exc)))
        _etag(response, done.version)
        return done

    # -------------------------------------------------------------- version

    @router.get("/version", response_model=VersionOut, summary="Installed and running config "
                "versions (supervisors, admins)", responses=responses(*_READ))
    def get_version(principal: Reader, response: Response) -> VersionOut:
        version = editor().version()
        _etag(response, version)
        return VersionOut(version=version, running=ctx.running_version)

    # -------------------------------------------------------------- queues

    @router.get("/queues", response_model=QueueList, summary="The queues (supervisors, admins)",
                responses=responses(*_READ, 422))
    def list_queues(principal: Reader, response: Response) -> QueueList:
        version, data = read()
        _etag(response, version)
        return QueueList(version=version, queues=[QueueSettings.model_validate(q)
                                                  for q in data.get("queues") or []])

    @router.get("/queues/{name}", response_model=QueueOut, summary="One queue (supervisors, "
                "admins)", responses=responses(*_READ, 422))
    def get_queue(name: Annotated[str, Path(max_length=64)], principal: Reader,
                  response: Response) -> QueueOut:
        version, data = read()
        queues = data.get("queues") or []
        index = _find(queues, "name", name)
        if index is None:
            raise ApiError(404, f"no queue {name!r}", "name")
        _etag(response, version)
        return QueueOut(version=version, queue=QueueSettings.model_validate(queues[index]))

    @router.post("/queues", response_model=QueueOut, status_code=201,
                 summary="Create a queue (admins)", responses=responses(*_WRITE))
    def create_queue(body: QueueSettings, request: Request, response: Response,
                     principal: Writer, if_match: IfMatch = None) -> QueueOut:
        def change(data: dict[str, Any]) -> Change:
            queues = data.setdefault("queues", []) or []
            data["queues"] = queues
            if _find(queues, "name", body.name) is not None:
                raise ConfigEditError(409, f"queue {body.name!r} exists; replace it with PUT",
                                      "name")
            after = body.model_dump(mode="json")
            queues.append(after)
            return Change("queue", body.name, "create", None, after)

        done = write(request, response, principal, if_match, change)
        return QueueOut(version=done.version, queue=body)

    @router.put("/queues/{name}", response_model=QueueOut, summary="Replace a queue (admins)",
                responses=responses(*_WRITE))
    def replace_queue(name: Annotated[str, Path(max_length=64)], body: QueueSettings,
                      request: Request, response: Response, principal: Writer,
                      if_match: IfMatch = None) -> QueueOut:
        if body.name != name:
            raise ApiError(422, f"name: expected the queue's name {name!r} (renaming is "
                                "create + delete)", "name")

        def change(data: dict[str, Any]) -> Change:
            queues = data.get("queues") or []
            index = _find(queues, "name", name)
            if index is None:
                raise ConfigEditError(404, f"no queue {name!r}; create it with POST", "name")
            before, after = queues[index], body.model_dump(mode="json")
            queues[index] = after
            return Change("queue", name, "replace", before, after)

        done = write(request, response, principal, if_match, change)
        return QueueOut(version=done.version, queue=body)

    @router.delete("/queues/{name}", response_model=Deleted, summary="Delete a queue (admins); "
                   "refused while an IVR flow routes to it", responses=responses(*_WRITE))
    def delete_queue(name: Annotated[str, Path(max_length=64)], request: Request,
                     response: Response, principal: Writer, if_match: IfMatch = None) -> Deleted:
        def change(data: dict[str, Any]) -> Change:
            queues = data.get("queues") or []
            index = _find(queues, "name", name)
            if index is None:
                raise ConfigEditError(404, f"no queue {name!r}", "name")
            routing = _flows_routing_to(data, name)
            if routing:
                raise ConfigEditError(409, f"IVR flow {', '.join(map(repr, routing))} routes "
                                           f"callers to queue {name!r}: change the flow first",
                                      "name")
            before = queues.pop(index)
            return Change("queue", name, "delete", before, None)

        done = write(request, response, principal, if_match, change)
        return Deleted(version=done.version, deleted=name)

    # -------------------------------------------------------------- agents

    def accounts_of(data: dict[str, Any]) -> list[dict[str, Any]]:
        sip = data.setdefault("sip", {}) or {}
        data["sip"] = sip
        accounts = sip.setdefault("accounts", []) or []
        sip["accounts"] = accounts
        return accounts

    def set_queues(data: dict[str, Any], user: str, wanted: list[str] | None) -> None:
        queues = data.get("queues") or []
        if wanted is not None:
            known = {str(q.get("name")) for q in queues}
            for position, name in enumerate(wanted):
                if name not in known:
                    raise ConfigEditError(422, f"queues[{position}]: no queue {name!r}",
                                          f"queues[{position}]")
        for q in queues:
            members = [str(m) for m in q.get("members") or ()]
            if wanted is None:
                if user in members:  # deleting the agent: out of every queue
                    q["members"] = [m for m in members if m != user]
                continue
            if q["name"] in wanted and user not in members:
                q["members"] = [*members, user]
            elif q["name"] not in wanted and user in members:
                q["members"] = [m for m in members if m != user]

    @router.get("/agents", response_model=AgentList, summary="The agents (supervisors, admins)",
                responses=responses(*_READ))
    def list_agents(principal: Reader, response: Response) -> AgentList:
        version, data = read()
        _etag(response, version)
        return AgentList(version=version, agents=[_agent_out(data, a) for a in
                                                  (data.get("sip") or {}).get("accounts") or []])

    @router.get("/agents/{user}", response_model=AgentOne, summary="One agent (supervisors, "
                "admins)", responses=responses(*_READ, 422))
    def get_agent(user: Annotated[str, Path(max_length=64)], principal: Reader,
                  response: Response) -> AgentOne:
        version, data = read()
        accounts = (data.get("sip") or {}).get("accounts") or []
        index = _find(accounts, "user", user)
        if index is None:
            raise ApiError(404, f"no agent {user!r}", "user")
        _etag(response, version)
        return AgentOne(version=version, agent=_agent_out(data, accounts[index]))

    @router.post("/agents", response_model=AgentOne, status_code=201,
                 summary="Create an agent with its SIP password (admins)",
                 responses=responses(*_WRITE))
    def create_agent(body: AgentCreate, request: Request, response: Response,
                     principal: Writer, if_match: IfMatch = None) -> AgentOne:
        def change(data: dict[str, Any]) -> Change:
            accounts = accounts_of(data)
            if _find(accounts, "user", body.user) is not None:
                raise ConfigEditError(409, f"agent {body.user!r} exists; replace it with PUT",
                                      "user")
            realm = str((data.get("sip") or {}).get("realm") or "edgecc.local")
            md5, sha256 = ha1(body.user, realm, body.password)
            account: dict[str, Any] = {"user": body.user, "display_name": body.display_name,
                                       "ha1_md5": md5, "ha1_sha256": sha256, "role": body.role}
            if body.skills:
                account["skills"] = dict(body.skills)
            accounts.append(account)
            set_queues(data, body.user, body.queues or [])
            after = _agent_out(data, account).model_dump()
            return Change("agent", body.user, "create", None, after)

        done = write(request, response, principal, if_match, change)
        return AgentOne(version=done.version, agent=AgentOut(**done.change.after))

    @router.put("/agents/{user}", response_model=AgentOne, summary="Replace an agent's name, "
                "role, skills and queues (admins); the password stays",
                responses=responses(*_WRITE))
    def replace_agent(user: Annotated[str, Path(max_length=64)], body: AgentIn,
                      request: Request, response: Response, principal: Writer,
                      if_match: IfMatch = None) -> AgentOne:
        def change(data: dict[str, Any]) -> Change:
            accounts = accounts_of(data)
            index = _find(accounts, "user", user)
            if index is None:
                raise ConfigEditError(404, f"no agent {user!r}; create it with POST", "user")
            account = accounts[index]
            before = _agent_out(data, account).model_dump()
            account["display_name"] = body.display_name
            account["role"] = body.role
            account.pop("skills", None)
            if body.skills:
                account["skills"] = dict(body.skills)
            set_queues(data, user, body.queues if body.queues is not None else
                       before["queues"])
            return Change("agent", user, "replace", before, _agent_out(data, account).model_dump())

        done = write(request, response, principal, if_match, change)
        return AgentOne(version=done.version, agent=AgentOut(**done.change.after))

    @router.post("/agents/{user}/password", response_model=VersionOut,
                 summary="Set an agent's SIP password (admins); stored as HA1 only",
                 responses=responses(*_WRITE))
    def reset_password(user: Annotated[str, Path(max_length=64)], body: PasswordIn,
                       request: Request, response: Response, principal: Writer,
                       if_match: IfMatch = None) -> VersionOut:
        def change(data: dict[str, Any]) -> Change:
            accounts = accounts_of(data)
            index = _find(accounts, "user", user)
            if index is None:
                raise ConfigEditError(404, f"no agent {user!r}", "user")
            realm = str((data.get("sip") or {}).get("realm") or "edgecc.local")
            account = accounts[index]
            account["ha1_md5"], account["ha1_sha256"] = ha1(user, realm, body.password)
            return Change("agent", user, "password", None, None)

        done = write(request, response, principal, if_match, change)
        return VersionOut(version=done.version, running=ctx.running_version)

    @router.delete("/agents/{user}", response_model=Deleted, summary="Delete an agent (admins); "
                   "it leaves every queue and its phone can no longer register",
                   responses=responses(*_WRITE))
    def delete_agent(user: Annotated[str, Path(max_length=64)], request: Request,
                     response: Response, principal: Writer, if_match: IfMatch = None) -> Deleted:
        def change(data: dict[str, Any]) -> Change:
            accounts = accounts_of(data)
            index = _find(accounts, "user", user)
            if index is None:
                raise ConfigEditError(404, f"no agent {user!r}", "user")
            before = _agent_out(data, accounts[index]).model_dump()
            accounts.pop(index)
            set_queues(data, user, None)
            return Change("agent", user, "delete", before, None)

        done = write(request, response, principal, if_match, change)
        return Deleted(version=done.version, deleted=user)

    # -------------------------------------------------------------- skills

    def skills_out(data: dict[str, Any]) -> list[SkillOut]:
        accounts = (data.get("sip") or {}).get("accounts") or []
        queues = data.get("queues") or []
        return [SkillOut(
            name=s["name"], description=s.get("description"),
            agents={str(a["user"]): int(a["skills"][s["name"]]) for a in accounts
                    if s["name"] in (a.get("skills") or {})},
            queues={str(q["name"]): int(q["required_skills"][s["name"]]) for q in queues
                    if s["name"] in (q.get("required_skills") or {})})
            for s in data.get("skills") or []]

    @router.get("/skills", response_model=SkillList, summary="The skills, who has them and "
                "which queues require them (supervisors, admins)", responses=responses(*_READ))
    def list_skills(principal: Reader, response: Response) -> SkillList:
        version, data = read()
        _etag(response, version)
        return SkillList(version=version, skills=skills_out(data))

    @router.post("/skills", response_model=SkillList, status_code=201,
                 summary="Create a skill (admins)", responses=responses(*_WRITE))
    def create_skill(body: SkillCreate, request: Request, response: Response,
                     principal: Writer, if_match: IfMatch = None) -> SkillList:
        def change(data: dict[str, Any]) -> Change:
            skills = data.get("skills") or []
            data["skills"] = skills
            if _find(skills, "name", body.name) is not None:
                raise ConfigEditError(409, f"skill {body.name!r} exists", "name")
            after = {"name": body.name, "description": body.description}
            skills.append(after)
            return Change("skill", body.name, "create", None, after)

        done = write(request, response, principal, if_match, change)
        return SkillList(version=done.version, skills=[
            s for s in skills_out({"skills": [done.change.after]})])

    @router.put("/skills/{name}", response_model=SkillList, summary="Describe a skill "
                "(admins)", responses=responses(*_WRITE))
    def replace_skill(name: Annotated[str, Path(max_length=64)], body: SkillIn,
                      request: Request, response: Response, principal: Writer,
                      if_match: IfMatch = None) -> SkillList:
        def change(data: dict[str, Any]) -> Change:
            skills = data.get("skills") or []
            index = _find(skills, "name", name)
            if index is None:
                raise ConfigEditError(404, f"no skill {name!r}", "name")
            before = dict(skills[index])
            skills[index] = {"name": name, "description": body.description}
            return Change("skill", name, "replace", before, skills[index])

        done = write(request, response, principal, if_match, change)
        return SkillList(version=done.version, skills=skills_out({"skills": [done.change.after]}))

    @router.delete("/skills/{name}", response_model=Deleted, summary="Delete a skill no agent "
                   "has and no queue requires (admins)", responses=responses(*_WRITE))
    def delete_skill(name: Annotated[str, Path(max_length=64)], request: Request,
                     response: Response, principal: Writer, if_match: IfMatch = None) -> Deleted:
        def change(data: dict[str, Any]) -> Change:
            skills = data.get("skills") or []
            index = _find(skills, "name", name)
            if index is None:
                raise ConfigEditError(404, f"no skill {name!r}", "name")
            used = skills_out({**data, "skills": [skills[index]]})[0]
            users = [f"agent {a}" for a in used.agents] + [f"queue {q}" for q in used.queues]
            if users:
                raise ConfigEditError(409, f"skill {name!r} is used by {', '.join(users)}: "
                                           "remove it there first", "name")
            before = skills.pop(index)
            return Change("skill", name, "delete", before, None)

        done = write(request, response, principal, if_match, change)
        return Deleted(version=done.version, deleted=name)

    # -------------------------------------------------------------- IVR flows

    @router.get("/flows", response_model=FlowList, summary="The IVR flows and DIDs "
                "(supervisors, admins)", responses=responses(*_READ, 409))
    def list_flows(principal: Reader, response: Response) -> FlowList:
        version, data = read()
        ivr = data.get("ivr") or {}
        flows = ivr.get("flows") or {}
        _etag(response, version)
        return FlowList(version=version,
                        flows=[flows] if isinstance(flows, str) else sorted(map(str, flows)),
                        dids={str(k): str(v) for k, v in (ivr.get("dids") or {}).items()})

    @router.get("/flows/{name}", response_model=FlowOut, summary="One IVR flow as YAML "
                "(supervisors, admins)", responses=responses(*_READ, 409, 422))
    def get_flow(name: Annotated[str, Path(max_length=64)], principal: Reader,
                 response: Response) -> FlowOut:
        import yaml

        version, data = read()
        try:
            flows = _flows_of(data)
        except ConfigEditError as exc:
            raise ApiError(exc.status, exc.message, exc.field) from None
        if name not in flows:
            raise ApiError(404, f"no flow {name!r}", "name")
        _etag(response, version)
        return FlowOut(version=version, name=name, yaml=yaml.safe_dump(
            {"flows": {name: flows[name]}}, sort_keys=False, allow_unicode=True))

    @router.put("/flows", response_model=FlowsChanged, summary="Upload IVR flows (admins): "
                "each flow of the file is added or replaced; problems name line and key",
                responses=responses(*_WRITE))
    def upload_flows(body: FlowUpload, request: Request, response: Response,
                     principal: Writer, if_match: IfMatch = None) -> FlowsChanged:
        from appliance.api.routes import _check_flows

        site = ctx.site
        if site is None:
            raise ApiError(503, "the site configuration is not available here")
        _, data = read()
        queues = [QueueSettings.model_validate(q) for q in data.get("queues") or []]
        # Checked on its own first, so each problem names its line in the uploaded text.
        check = _check_flows(site.model_copy(update={"queues": tuple(queues)}), body.yaml)
        if not check.valid:
            said = []
            for problem in check.problems:
                where = ".".join(p for p in ("flows", problem.flow, problem.node) if p)
                line = f"line {problem.line}: " if problem.line is not None else ""
                said.append(f"{line}{where}: {problem.message}")
            first = check.problems[0]
            raise ApiError(422, "; ".join(said), ".".join(
                p for p in ("flows", first.flow, first.node) if p))
        import yaml

        uploaded = (yaml.safe_load(body.yaml) or {}).get("flows") or {}
        if not isinstance(uploaded, dict) or not uploaded:
            raise ApiError(422, "yaml: expected a flows: mapping with at least one flow", "yaml")

        def change(data: dict[str, Any]) -> Change:
            ivr = data.get("ivr") or {}
            data["ivr"] = ivr
            flows = ivr.get("flows") or {}
            if isinstance(flows, str):
                _flows_of(data)  # raises: the flows are kept in a file of their own
            before = {n: flows[n] for n in uploaded if n in flows}
            flows.update(uploaded)
            ivr["flows"] = flows
            return Change("flow", ", ".join(sorted(uploaded)), "replace" if before else "create",
                          before or None, uploaded)

        done = write(request, response, principal, if_match, change)
        return FlowsChanged(version=done.version, flows=sorted(uploaded))

    @router.delete("/flows/{name}", response_model=Deleted, summary="Delete an IVR flow no "
                   "number routes to (admins)", responses=responses(*_WRITE))
    def delete_flow(name: Annotated[str, Path(max_length=64)], request: Request,
                    response: Response, principal: Writer, if_match: IfMatch = None) -> Deleted:
        def change(data: dict[str, Any]) -> Change:
            ivr = data.get("ivr") or {}
            flows = _flows_of(data)
            if name not in flows:
                raise ConfigEditError(404, f"no flow {name!r}", "name")
            dids = [str(d) for d, f in (ivr.get("dids") or {}).items() if str(f) == name]
            if dids:
                raise ConfigEditError(409, f"number {', '.join(dids)} routes to flow {name!r} "
                                           "(ivr.dids): change that first", "name")
            before = flows.pop(name)
            return Change("flow", name, "delete", before, None)

        done = write(request, response, principal, if_match, change)
        return Deleted(version=done.version, deleted=name)

    return router
