"""The API served for real: uvicorn on a free 127.0.0.1 port, the site database in a file.

``ApiServer`` is shared by the other ``test_api_*`` modules. The tests here check what is common
to every route: the error shape, the body limits, the audit trail, and that /health and
/openapi.json still answer without a login.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.api import ApiContext, Hub, LoginPolicy, Role, UserStore, totp
from appliance.http import HealthSource, HttpServer, build_http_app
from appliance.reporting.kpi import LiveBoard

PASSWORD = "correct horse battery"
START_TIMEOUT_S = 15.0


class ManualClock:
    """Unix time that only moves when the test says so."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Account:
    name: str
    role: Role
    user_id: int
    secret: bytes | None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


class ApiServer:
    """The appliance's FastAPI app with the API, served by uvicorn in a loop of its own."""

    def __init__(self, site_dir: Path, *, policy: LoginPolicy | None = None,
                 heartbeat_s: float = 15.0, queue_limit: int = 1000) -> None:
        self.clock = ManualClock()
        self.db_path = site_dir / "edgecc.db"
        self.users = UserStore.open(self.db_path, policy=policy, clock=self.clock)
        self.hub = Hub(clock=self.clock, queue_limit=queue_limit)
        self.board = LiveBoard()
        self.context = ApiContext(
            users=self.users, hub=self.hub, board=self.board,
            sip_accounts=lambda: [("1001", "Agent 1001"), ("1002", None)],
            heartbeat_s=heartbeat_s, clock=self.clock)
        health = HealthSource("demo", lambda: {"UDP": ("127.0.0.1", 5999)}, lambda: 1.0)
        self.app = build_http_app(health, self.context)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="api-loop",
                                        daemon=True)
        self._thread.start()
        try:
            self.http: HttpServer = self.on_loop(HttpServer.start(self.app, "127.0.0.1", 0))
        except BaseException:
            self._stop_loop()
            self.users.close()
            raise
        self.url = self.http.url
        self.accounts: dict[str, Account] = {}
        self.tokens: dict[Role, str] = {}

    def on_loop(self, coroutine: Any, timeout: float = START_TIMEOUT_S) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop thread and return its result."""
        async def run() -> Any:
            return fn()

        return self.on_loop(run())

    def add(self, name: str, role: Role) -> Account:
        user, secret = self.users.add_user(name, role, PASSWORD, display_name=name.title())
        account = Account(name, role, user.id, secret)
        self.accounts[name] = account
        return account

    def code(self, name: str, offset_steps: int = 0) -> str:
        secret = self.accounts[name].secret
        assert secret is not None
        return totp.totp(secret, self.clock() + offset_steps * totp.STEP_S)

    def login(self, name: str, password: str = PASSWORD) -> Reply:
        account = self.accounts[name]
        body: dict[str, Any] = {"name": name, "password": password}
        if account.secret is not None:
            body["totp"] = self.code(name)
        return self.request("POST", "/api/login", body)

    def token(self, name: str) -> str:
        reply = self.login(name)
        assert reply.status == 200, reply.body
        return reply.body["token"]

    def request(self, method: str, path: str, body: Any = None, *, token: str | None = None,
                headers: dict[str, str] | None = None, raw: bytes | None = None) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None
                                             else None)
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None and raw is None:
            request.add_header("Content-Type", "application/json")
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, got_headers, text = response.status, dict(response.headers), \
                    response.read()
        except urllib.error.HTTPError as error:
            status, got_headers, text = error.code, dict(error.headers), error.read()
        return Reply(status, got_headers, json.loads(text) if text else None)

    def audit_rows(self) -> list[dict[str, Any]]:
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


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path)
    try:
        yield server
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------


def test_health_and_openapi_need_no_login(api: ApiServer) -> None:
    health = api.request("GET", "/health")
    assert health.status == 200 and health.body["site"] == "demo"
    assert health.body["sip"] == {"udp": {"host": "127.0.0.1", "port": 5999}}
    schema = api.request("GET", "/openapi.json").body
    assert {"/health", "/api/login", "/api/logout", "/api/me", "/api/wfm/staff",
            "/api/kpi/live", "/api/config/accounts", "/api/audit"} <= set(schema["paths"])
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
    assert "security" not in schema["paths"]["/api/login"]["post"]
    assert schema["paths"]["/api/me"]["get"]["security"] == [{"HTTPBearer": []}]


def test_validation_errors_name_the_field(api: ApiServer) -> None:
    api.add("alex", Role.AGENT)
    token = api.token("alex")
    missing = api.request("GET", "/api/wfm/staff?aht=180", token=token)
    assert missing.status == 422
    assert missing.body == {"error": "calls: required", "field": "calls"}
    bad = api.request("GET", "/api/wfm/staff?calls=100&aht=180&sl=80", token=token)
    assert bad.status == 422 and bad.body["field"] == "sl"
    assert set(bad.body) == {"error", "field"} and "sl" in bad.body["error"]
    nan = api.request("GET", "/api/wfm/staff?calls=nan&aht=180", token=token)
    assert nan.status == 422 and nan.body["field"] == "calls"
    huge = api.request("GET", "/api/wfm/staff?calls=1e9&aht=180", token=token)
    assert huge.status == 422 and huge.body["field"] == "calls"
    body = api.request("POST", "/api/login", {"name": "bad name!", "password": "x"})
    assert body.status == 422 and body.body["field"] == "name"
    code = api.request("POST", "/api/login", {"name": "alex", "password": "x", "totp": "12ab"})
    assert code.status == 422 and code.body["field"] == "totp"
    not_json = api.request("POST", "/api/login", raw=b"{nope",
                           headers={"Content-Type": "application/json"})
    assert not_json.status == 422 and not_json.body["field"] is not None


def test_staffing_matches_the_erlang_c_example(api: ApiServer) -> None:
    api.add("alex", Role.AGENT)
    reply = api.request("GET", "/api/wfm/staff?calls=100&aht=180&interval=1800&sl=0.8"
                        "&threshold=20&shrinkage=0.3", token=api.token("alex"))
    assert reply.status == 200, reply.body
    assert reply.body["model"] == "erlang-c"
    assert reply.body["agents"] == 14 and reply.body["scheduled"] == 20
    assert reply.body["traffic"] == pytest.approx(10.0)
    assert reply.body["service_level"] == pytest.approx(0.888, abs=1e-3)
    with_patience = api.request("GET", "/api/wfm/staff?calls=100&aht=180&patience=120",
                                token=api.token("alex"))
    assert with_patience.status == 200, with_patience.body
    assert with_patience.body["model"] == "erlang-a"
    assert with_patience.body["agents"] == 12
    assert 0 < with_patience.body["erlang_a"]["prob_abandon"] < 1


def test_unknown_path_and_method_take_the_error_shape(api: ApiServer) -> None:
    missing = api.request("GET", "/api/nothing-here")
    assert missing.status == 404 and set(missing.body) == {"error", "field"}
    wrong = api.request("DELETE", "/api/me")
    assert wrong.status == 405 and set(wrong.body) == {"error", "field"}
    assert "GET" in wrong.headers.get("allow", wrong.headers.get("Allow", ""))


def test_oversized_and_unsized_bodies_are_refused_and_audited(api: ApiServer) -> None:
    big = api.request("POST", "/api/login", raw=b"x" * (64 * 1024 + 1),
                      headers={"Content-Type": "application/json"})
    assert big.status == 413 and big.body["field"] is None
    rows = api.audit_rows()
    assert rows[-1]["actor"] == "api:anonymous" and "status=413" in rows[-1]["detail"]


def test_every_state_changing_request_is_audited_with_who_and_where(api: ApiServer) -> None:
    api.add("ada", Role.ADMIN)
    token = api.token("ada")
    assert api.request("GET", "/api/me", token=token).status == 200
    assert api.request("POST", "/api/login", {"name": "ada", "password": "wrong password"}
                       ).status == 401
    assert api.request("POST", "/api/logout", token=token).status == 204
    rows = api.audit_rows()
    assert [(r["actor"], r["action"]) for r in rows] == [
        ("api:ada", "login_ok"), ("api:ada", "login_invalid"), ("api:ada", "logout")]
    for row in rows:
        assert "source=127.0.0.1:" in row["detail"]
        assert row["at"] == pytest.approx(time.time(), abs=120)
    assert "reason=\"bad password\"" in rows[1]["detail"]
    assert "status=401" in rows[1]["detail"] and "status=204" in rows[2]["detail"]
    assert all(PASSWORD not in r["detail"] and "wrong password" not in r["detail"]
               for r in rows)
