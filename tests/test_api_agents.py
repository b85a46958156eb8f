"""``/api/agents`` served for real: a FastAPI app of its own (error shape, audit middleware and
the agents router) under uvicorn on a free 127.0.0.1 port, the site database in a file, the
desk's router inputs fed to a real ACD router on the server's loop."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from appliance.acd import model as m
from appliance.acd.desk import AgentDesk, RouterDeskService
from appliance.acd.reference import ReferenceRouter
from appliance.api import Role, UserStore
from appliance.api.agents import build_agents_router
from appliance.api.errors import install_error_handlers
from appliance.api.middleware import ApiMiddleware
from appliance.http import HttpServer
from appliance.store import open_site_db

PASSWORD = "correct horse battery"
AGENTS = ("1001", "1002")
NOW = 1_700_000_000.0
TIMEOUT_S = 15.0


@dataclass
class Reply:
    status: int
    body: Any


class AgentsApi:
    """The agents router on its own app, served by uvicorn in a loop of its own."""

    def __init__(self, site: Path, template: tuple[Path, dict[str, str]]) -> None:
        path = site / "edgecc.db"
        # Users, links and tokens come from a template file made once (scrypt is slow).
        shutil.copyfile(template[0], path)
        self.tokens = dict(template[1])
        self.users = UserStore.open(path, clock=lambda: NOW)
        self.desk = AgentDesk(open_site_db(path), agents=AGENTS, site_id="demo")
        self.router = ReferenceRouter(m.RouterConfig(
            queues=(m.QueueConfig("sales", tuple(m.Member(a) for a in AGENTS),
                                  strategy=m.Strategy.LINEAR),),
            agents=tuple(m.AgentConfig(a) for a in AGENTS)))
        self.decisions: list[Any] = []
        self.router_now = 0.0
        self.service: RouterDeskService | None = RouterDeskService(
            self.desk, self.router, clock=self.tick,
            on_decisions=self.decisions.extend)
        self.app = FastAPI()
        install_error_handlers(self.app)
        self.app.include_router(build_agents_router(lambda: self.service, self.users,
                                                    clock=lambda: NOW))
        self.app.add_middleware(ApiMiddleware, users=self.users)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.http = self.on_loop(HttpServer.start(self.app, "127.0.0.1", 0))
        except BaseException:
            self._stop_loop()
            raise

    def tick(self) -> float:
        """The router's clock: one second later at every read."""
        self.router_now += 1.0
        return self.router_now

    def on_loop(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(TIMEOUT_S)

    def call_soon(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return self.on_loop(run())

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                raw: bytes | None = None) -> Reply:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.http.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, text = response.status, response.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        return Reply(status, json.loads(text) if text else None)

    def as_(self, name: str, method: str, path: str, body: Any = None) -> Reply:
        return self.request(method, path, body, token=self.tokens[name])

    def count(self, table: str) -> int:
        assert self.desk.flush(10)  # the desk's writer commits behind the answers
        return int(self.call_soon(
            lambda: self.desk._db.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]))

    def audit(self) -> list[dict[str, Any]]:
        assert self.desk.flush(10)  # the desk's writer commits behind the answers
        return list(reversed(self.users.audit_rows(1000)))

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def close(self) -> None:
        try:
            self.on_loop(self.http.close())
        finally:
            self._stop_loop()
            self.users.close()
            self.desk.close()
            self.desk._db.conn.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A site database holding the API users: alex (agent, linked to 1001), bo (agent, not
    linked), sam (supervisor), ada (admin), and a token for each."""
    path = tmp_path_factory.mktemp("template") / "edgecc.db"
    users = UserStore.open(path, clock=lambda: NOW)
    tokens = {}
    try:
        for name, role, agent in (("alex", Role.AGENT, "1001"), ("bo", Role.AGENT, None),
                                  ("sam", Role.SUPERVISOR, None), ("ada", Role.ADMIN, None)):
            user, _ = users.add_user(name, role, PASSWORD)
            if agent is not None:
                users.link_agent(name, agent)
            tokens[name] = users.issue_token(user.id)[0]
    finally:
        users.close()  # the last connection: the WAL is checkpointed into the file
    return path, tokens


@pytest.fixture
def api(tmp_path: Path, template: tuple[Path, dict[str, str]]) -> Iterator[AgentsApi]:
    server = AgentsApi(tmp_path, template)
    try:
        yield server
    finally:
        server.close()


# (method, path suffix, body)
ACTIONS = [
    ("GET", "", None),
    ("POST", "/login", None),
    ("POST", "/pause", {"reason": "break"}),
    ("POST", "/unpause", None),
    ("POST", "/logout", None),
    ("POST", "/disposition", {"call_id": "c-1", "code": "1"}),
]


def test_every_endpoint_with_every_caller(api: AgentsApi) -> None:
    # Supervisors+ list everyone; agents may not.
    assert api.request("GET", "/api/agents").status == 401
    assert api.as_("alex", "GET", "/api/agents").status == 403
    assert api.as_("bo", "GET", "/api/agents").status == 403
    for who in ("sam", "ada"):
        reply = api.as_(who, "GET", "/api/agents")
        assert reply.status == 200
        assert [a["agent"] for a in reply.body["agents"]] == list(AGENTS)
    for method, suffix, body in ACTIONS:
        done = 0
        for agent, who, expected in (
                ("1001", None, 401), ("1002", "alex", 403), ("1001", "bo", 403),
                ("1001", "alex", 200), ("1002", "sam", 200), ("1001", "ada", 200)):
            token: str | None = api.tokens[who] if who else None
            reply = api.request(method, f"/api/agents/{agent}{suffix}", body, token=token)
            if expected == 200:
                # Allowed: done, or refused by the agent's presence (e.g. login twice).
                assert reply.status in (200, 409), (method, suffix, agent, who, reply.body)
                done += reply.status == 200
            else:
                assert reply.status == expected, (method, suffix, agent, who, reply.body)
                assert set(reply.body) == {"error", "field"}
        assert done >= 2, (method, suffix)
    assert "not linked" in api.as_("bo", "GET", "/api/agents/1001").body["error"]


def test_supervisor_pauses_an_agent_and_the_router_follows(api: AgentsApi) -> None:
    api.call_soon(lambda: api.router.handle(m.CallerJoin("c1", "sales"), api.tick()))
    reply = api.as_("sam", "POST", "/api/agents/1002/login")
    assert reply.status == 200
    assert reply.body["state"] == "ringing" and reply.body["presence"] == "available"
    assert api.decisions == [m.Offer("c1", ("1002",), "sales")]
    api.call_soon(lambda: api.router.handle(m.OfferAccepted("c1", "1002"), api.tick()))
    assert api.as_("sam", "GET", "/api/agents/1002").body["state"] == "on-call"
    reply = api.as_("sam", "POST", "/api/agents/1002/pause", {"reason": "2"})
    assert reply.status == 200
    body = reply.body
    assert body["presence"] == "paused" and body["reason"] == "lunch"
    assert body["state"] == "on-call" and body["in_sync"] is True
    assert body["actor"] == "api:sam" and body["source"].startswith("127.0.0.1:")
    assert body["since"] == NOW
    assert api.call_soon(lambda: api.router.agent_view("1002")).pause_reason == "lunch"
    # A pause without a body is a pause without a reason.
    reply = api.as_("sam", "POST", "/api/agents/1002/pause")
    assert reply.status == 200 and reply.body["reason"] is None
    assert api.as_("sam", "POST", "/api/agents/1002/unpause").body["presence"] == "available"
    assert api.as_("sam", "POST", "/api/agents/1002/logout").body["presence"] == "logged-out"
    assert api.call_soon(lambda: api.router.agent_view("1002")).presence == "logged-out"
    assert api.desk.flush(10)  # the desk's writer commits behind the answers
    kinds = [r[0] for r in api.call_soon(lambda: api.desk._db.conn.execute(
        "SELECT kind FROM events ORDER BY seq").fetchall())]
    assert kinds == ["agent.login", "agent.pause", "agent.pause", "agent.unpause",
                     "agent.logout"]


def test_an_agent_in_wrap_up_is_made_ready_early_and_it_is_audited(api: AgentsApi) -> None:
    # A queue with a long wrap-up: "ready" (/unpause) ends the agent's after-call work at once.
    api.router = ReferenceRouter(m.RouterConfig(
        queues=(m.QueueConfig("sales", tuple(m.Member(a) for a in AGENTS),
                              strategy=m.Strategy.LINEAR, wrap_up=600.0),),
        agents=tuple(m.AgentConfig(a) for a in AGENTS)))
    api.service = RouterDeskService(api.desk, api.router, clock=api.tick,
                                    on_decisions=api.decisions.extend)
    assert api.as_("alex", "POST", "/api/agents/1001/login").status == 200
    for event in (m.CallerJoin("c1", "sales"), m.OfferAccepted("c1", "1001"),
                  m.CallEnded("c1", "1001")):
        api.call_soon(lambda event=event: api.router.handle(event, api.tick()))
    assert api.as_("alex", "GET", "/api/agents/1001").body["state"] == "wrap-up"
    reply = api.as_("alex", "POST", "/api/agents/1001/unpause")
    assert reply.status == 200, reply.body
    assert (reply.body["state"], reply.body["presence"]) == ("available", "available")
    assert api.call_soon(lambda: api.router.agent_view("1001")).in_wrap_up is False
    # Ready already: nothing to end, refused, nothing written.
    assert api.as_("alex", "POST", "/api/agents/1001/unpause").status == 409
    ready = [r for r in api.audit() if r["action"] == "agent.ready"]
    assert [r["actor"] for r in ready] == ["api:alex"]
    assert "agent=1001" in ready[0]["detail"] and "source=127.0.0.1:" in ready[0]["detail"]
    kinds = [r[0] for r in api.call_soon(lambda: api.desk._db.conn.execute(
        "SELECT kind FROM events ORDER BY seq").fetchall())]
    assert kinds == ["agent.login", "agent.ready"]


def test_every_action_is_audited_with_actor_and_source(api: AgentsApi) -> None:
    assert api.as_("alex", "POST", "/api/agents/1001/login").status == 200
    assert api.as_("alex", "POST", "/api/agents/1001/disposition",
                   {"call_id": "call-9", "code": "resolved"}).status == 200
    rows = [r for r in api.audit() if r["actor"] == "api:alex"]
    # The desk's own rows (written with the change) and the middleware's (one per request).
    desk_rows = [r for r in rows if "method=" not in r["detail"]]
    http_rows = [r for r in rows if "method=POST" in r["detail"]]
    assert [r["action"] for r in desk_rows] == ["agent.login", "agent.disposition"]
    assert all("source=127.0.0.1:" in r["detail"] and "agent=1001" in r["detail"]
               for r in desk_rows)
    assert [r["action"] for r in http_rows] == ["agent.login", "agent.disposition"]
    assert all("status=200" in r["detail"] and "agent=1001" in r["detail"] for r in http_rows)
    assert "call_id=call-9" in http_rows[1]["detail"]


@pytest.mark.parametrize(("suffix", "body", "raw", "status", "field"), [
    ("/pause", {"reason": "nap"}, None, 422, "reason"),
    ("/pause", {"reason": "auto-pause"}, None, 422, "reason"),
    ("/pause", {"reasn": "1"}, None, 422, "reasn"),
    ("/pause", {"reason": 3}, None, 422, "reason"),
    ("/disposition", {"call_id": "c-1"}, None, 422, "code"),
    ("/disposition", {"call_id": "", "code": "1"}, None, 422, "call_id"),
    ("/disposition", {"call_id": "c-1", "code": "99"}, None, 422, "code"),
    ("/disposition", None, b"not json", 422, "*"),  # the JSON error's position
    ("/unpause", None, None, 409, None),
    ("/login", None, None, 409, None),
])
def test_bad_requests_name_the_field_and_write_nothing(api: AgentsApi, suffix: str, body: Any,
                                                       raw: bytes | None, status: int,
                                                       field: str | None) -> None:
    assert api.as_("sam", "POST", "/api/agents/1001/login").status == 200
    before = (api.count("agent_desk"), api.count("events"))
    reply = api.request("POST", f"/api/agents/1001{suffix}", body, raw=raw,
                        token=api.tokens["sam"])
    assert reply.status == status, reply.body
    assert reply.body["error"]
    assert reply.body["field"] == field if field != "*" else reply.body["field"] is not None
    if field and field != "*":
        assert reply.body["error"].startswith(field)
    assert (api.count("agent_desk"), api.count("events")) == before
    assert api.as_("sam", "GET", "/api/agents/1001").body["presence"] == "available"


def test_unknown_agent_and_bad_agent_ids(api: AgentsApi) -> None:
    reply = api.as_("sam", "POST", "/api/agents/9999/login")
    assert reply.status == 404 and reply.body["field"] == "agent"
    assert api.as_("sam", "GET", "/api/agents/9999").status == 404
    reply = api.as_("sam", "POST", "/api/agents/a%20b/login")
    assert reply.status == 422 and reply.body["field"] == "agent"
    assert api.count("events") == 0


def test_without_a_running_desk_the_routes_answer_503(api: AgentsApi) -> None:
    api.service = None
    assert api.as_("sam", "GET", "/api/agents").status == 503
    reply = api.as_("sam", "POST", "/api/agents/1001/login")
    assert reply.status == 503 and reply.body["error"] == "the agent desk is not running"


def test_an_agent_user_link_is_exclusive(api: AgentsApi) -> None:
    from appliance.api.users import UserError

    with pytest.raises(UserError) as err:
        api.users.link_agent("bo", "1001")
    assert err.value.field == "agent"
    with pytest.raises(UserError) as err:
        api.users.link_agent("nobody", "1002")
    assert err.value.field == "name"
    with pytest.raises(UserError):
        api.users.link_agent("bo", "10 02")
    api.users.link_agent("bo", "1002")
    assert api.as_("bo", "POST", "/api/agents/1002/login").status == 200
    api.users.link_agent("bo", None)
    assert api.as_("bo", "POST", "/api/agents/1002/logout").status == 403


def test_a_router_out_of_step_is_shown_not_hidden(api: AgentsApi) -> None:
    assert api.as_("sam", "POST", "/api/agents/1001/login").status == 200
    # Something logged the agent out of the router behind the desk's back.
    api.call_soon(lambda: api.router.handle(m.AgentLogout("1001"), api.tick()))
    assert api.as_("sam", "GET", "/api/agents/1001").body["in_sync"] is False
    reply = api.as_("sam", "POST", "/api/agents/1001/pause", {"reason": "break"})
    assert reply.status == 200
    assert reply.body["presence"] == "paused" and reply.body["in_sync"] is False
    assert api.count("events") == 2  # the desk's record is kept


# ---------------------------------------------------------------------------- schema


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory,
           template: tuple[Path, dict[str, str]]) -> Iterator[AgentsApi]:
    server = AgentsApi(Path(tmp_path_factory.mktemp("site")), template)
    try:
        yield server
    finally:
        server.close()


AGENT_OPERATIONS = {"GET /api/agents", "GET /api/agents/{agent}",
                    "POST /api/agents/{agent}/login", "POST /api/agents/{agent}/logout",
                    "POST /api/agents/{agent}/pause", "POST /api/agents/{agent}/unpause",
                    "POST /api/agents/{agent}/disposition"}


MODES = pytest.mark.parametrize("positive", [True, False], ids=["valid", "invalid"])


@pytest.mark.timeout(240)
@MODES
def test_routes_conform_to_their_schema(served: AgentsApi, positive: bool) -> None:
    # Derandomized: the same cases every run.
    conform(served, positive, examples=10, derandomize=True)


@pytest.mark.long
@MODES
def test_routes_conform_to_their_schema_long(served: AgentsApi, positive: bool) -> None:
    conform(served, positive, examples=200, derandomize=False)


def conform(served: AgentsApi, positive: bool, *, examples: int, derandomize: bool) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    mode = GenerationMode.POSITIVE if positive else GenerationMode.NEGATIVE
    schema = schemathesis.openapi.from_url(served.http.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == AGENT_OPERATIONS
    seen: dict[str, set[int]] = {}
    for operation in operations:
        # Schema-valid requests may rightly be refused by state (unknown agent 404, log in
        # twice 409): acceptance of valid data is not a property of these routes.
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            headers = {}
            if positive or "Authorization" in (case.headers or {}):
                headers["Authorization"] = f"Bearer {served.tokens['ada']}"
            response = case.call_and_validate(
                headers=headers,
                excluded_checks=[schemathesis.checks.positive_data_acceptance])
            assert response.status_code < 500
            seen.setdefault(f"{case.method.upper()} {case.path}", set()).add(
                response.status_code)

        run()
    assert set(seen) == AGENT_OPERATIONS


def test_an_agent_on_a_call_outside_the_queues_is_shown_on_a_call(api: AgentsApi) -> None:
    # Click-to-dial, an outbound call or a transfer to the agent: the router offers nothing
    # to them meanwhile, and the desk must not show them as available.
    assert api.as_("alex", "POST", "/api/agents/1001/login").status == 200
    api.call_soon(lambda: api.router.handle(m.OutsideCallStarted("1001", "out-1", api.router_now),
                                            api.tick()))
    reply = api.as_("alex", "GET", "/api/agents/1001")
    assert (reply.body["state"], reply.body["presence"], reply.body["outside"]) == (
        "on-call", "available", 1)
    # Paused while dialling out (agents often are): still on a call, the pause kept.
    assert api.as_("alex", "POST", "/api/agents/1001/pause", {"reason": "break"}).status == 200
    listed = {a["agent"]: a for a in api.as_("sam", "GET", "/api/agents").body["agents"]}
    assert (listed["1001"]["state"], listed["1001"]["presence"], listed["1001"]["outside"]) == (
        "on-call", "paused", 1)
    assert (listed["1002"]["state"], listed["1002"]["outside"]) == ("logged-out", 0)
    api.call_soon(lambda: api.router.handle(m.OutsideCallEnded("1001", "out-1", api.router_now),
                                            api.tick()))
    reply = api.as_("alex", "GET", "/api/agents/1001")
    assert (reply.body["state"], reply.body["outside"]) == ("paused", 0)
