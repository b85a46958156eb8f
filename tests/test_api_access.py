"""Every /api endpoint with every kind of caller: no token, an expired token, a revoked token,
and a token of each role. Roles are ordered agent < supervisor < admin.

The table is checked against the application's own OpenAPI document: a route added without a
row here fails ``test_every_route_has_a_row``. (The WebSocket ``/api/events`` is not in the
document; test_api_events.py covers it with every role.)"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_api_server import ApiServer

from appliance.api import Role
from appliance.api.calls import RecordingAccess
from appliance.config import parse_site_yaml
from appliance.config_edit import SiteEditor
from appliance.recording import RecordingStore
from appliance.store import open_site_db

# (method, path, lowest role allowed, status when allowed)
ENDPOINTS = [
    ("GET", "/api/me", Role.AGENT, 200),
    ("GET", "/api/wfm/staff?calls=100&aht=180&interval=1800&sl=0.8&threshold=20", Role.AGENT,
     200),
    ("GET", "/api/kpi/live", Role.SUPERVISOR, 200),
    ("GET", "/api/kpi/report?since=0&until=3600", Role.SUPERVISOR, 200),
    ("GET", "/api/config/accounts", Role.ADMIN, 200),
    ("GET", "/api/audit?limit=5", Role.ADMIN, 200),
    ("POST", "/api/logout", Role.AGENT, 204),
    ("GET", "/api/config/site", Role.ADMIN, 200),
    ("POST", "/api/config/flows/check", Role.ADMIN, 200),
    # Call control is not running here: allowed callers get 503 (test_api_calls.py).
    ("GET", "/api/calls", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/hangup", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/hold", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/resume", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/transfer", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/recording/pause", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/recording/resume", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/consult", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/transfer/complete", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/c1/consult/cancel", Role.SUPERVISOR, 503),
    ("GET", "/api/callbacks", Role.SUPERVISOR, 503),
    ("DELETE", "/api/callbacks/c1", Role.SUPERVISOR, 503),
    ("POST", "/api/calls/dial", Role.SUPERVISOR, 503),
    ("POST", "/api/supervise", Role.SUPERVISOR, 503),
    ("GET", "/api/agents", Role.SUPERVISOR, 503),
    # An agent acts on its own extension (alex is linked to 1001); the desk is not running
    # here: allowed callers get 503 (test_api_agents.py runs one).
    ("GET", "/api/agents/1001", Role.AGENT, 503),
    ("POST", "/api/agents/1001/login", Role.AGENT, 503),
    ("POST", "/api/agents/1001/logout", Role.AGENT, 503),
    ("POST", "/api/agents/1001/pause", Role.AGENT, 503),
    ("POST", "/api/agents/1001/unpause", Role.AGENT, 503),
    ("POST", "/api/agents/1001/disposition", Role.AGENT, 503),
    ("GET", "/api/alerts", Role.SUPERVISOR, 200),
    ("GET", "/api/config/desk", Role.AGENT, 200),
    ("GET", "/api/recordings?caller=%2B331", Role.SUPERVISOR, 200),
    ("GET", "/api/recordings/r1/audio", Role.SUPERVISOR, 404),
    # Configuration changes (test_api_config.py): supervisors read, admins write; a write
    # without If-Match gets 428 once the role gate is passed.
    ("GET", "/api/config/version", Role.SUPERVISOR, 200),
    ("GET", "/api/config/queues", Role.SUPERVISOR, 200),
    ("GET", "/api/config/queues/sales", Role.SUPERVISOR, 404),
    ("POST", "/api/config/queues", Role.ADMIN, 428),
    ("PUT", "/api/config/queues/sales", Role.ADMIN, 428),
    ("DELETE", "/api/config/queues/sales", Role.ADMIN, 428),
    ("GET", "/api/config/agents", Role.SUPERVISOR, 200),
    ("GET", "/api/config/agents/1001", Role.SUPERVISOR, 404),
    ("POST", "/api/config/agents", Role.ADMIN, 428),
    ("PUT", "/api/config/agents/1001", Role.ADMIN, 428),
    ("DELETE", "/api/config/agents/1001", Role.ADMIN, 428),
    ("POST", "/api/config/agents/1001/password", Role.ADMIN, 428),
    ("GET", "/api/config/skills", Role.SUPERVISOR, 200),
    ("POST", "/api/config/skills", Role.ADMIN, 428),
    ("PUT", "/api/config/skills/french", Role.ADMIN, 428),
    ("DELETE", "/api/config/skills/french", Role.ADMIN, 428),
    ("GET", "/api/config/flows", Role.SUPERVISOR, 200),
    ("GET", "/api/config/flows/main", Role.SUPERVISOR, 404),
    ("PUT", "/api/config/flows", Role.ADMIN, 428),
    ("DELETE", "/api/config/flows/main", Role.ADMIN, 428),
]
# Routes anyone may call, without a token (answer, status without one).
PUBLIC = [
    ("POST", "/api/login", 401),  # wrong credentials: 401 with the error shape
    ("GET", "/health", 200),
]
BODIES = {
    "/api/login": {"name": "nobody", "password": "wrong"},
    "/api/calls/c1/consult": {"target": "1002"},
    "/api/agents/1001/pause": {"reason": "1"},
    "/api/agents/1001/disposition": {"call_id": "c-1", "code": "1"},
    "/api/config/flows/check": {"yaml": "flows: {}"},
    "/api/calls/c1/transfer": {"target": "1002"},
    "/api/calls/dial": {"agent": "1001", "number": "+15551234"},
    "/api/supervise": {"agent": "1001", "mode": "listen"},
    "/api/config/queues": {"name": "sales"},
    "/api/config/queues/sales": {"name": "sales"},
    "/api/config/agents": {"user": "1003", "password": "phone-secret"},
    "/api/config/agents/1001": {"display_name": "Agent 1001"},
    "/api/config/agents/1001/password": {"password": "phone-secret"},
    "/api/config/skills": {"name": "french"},
    "/api/config/skills/french": {"description": "French"},
    "/api/config/flows": {"yaml": "flows:\n  f:\n    start: h\n    nodes:\n      h: {type: hangup}\n"},
}
CALLERS = ["none", "expired", "revoked", "agent", "supervisor", "admin"]
NAMES = {Role.AGENT: "alex", Role.SUPERVISOR: "sam", Role.ADMIN: "ada"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    directory = Path(tmp_path_factory.mktemp("site"))
    server = ApiServer(directory)
    (directory / "site.key").write_bytes(os.urandom(32))
    (directory / "site.key").chmod(0o600)  # as edgecc init makes it
    recordings = RecordingAccess(RecordingStore(open_site_db(server.db_path),
                                                directory / "recordings",
                                                (directory / "site.key").read_bytes()))
    server.context.recordings = recordings
    server.context.site = parse_site_yaml("site: {id: demo}\nsip: {tls_port: null}\n",
                                          site_dir=directory)
    server.context.alerts = list
    (directory / "site.yaml").write_text("site: {id: demo}\n")
    server.context.site_editor = SiteEditor(directory, server.db_path)
    try:
        for role, name in NAMES.items():
            server.add(name, role)
        server.users.link_agent("alex", "1001")
        # Real logins, one per role (TOTP for admin and supervisor).
        server.tokens = {role: server.token(name) for role, name in NAMES.items()}
        yield server
    finally:
        server.close()
        recordings.close()


def _token_for(api: ApiServer, caller: str, method: str, path: str) -> str | None:
    if caller == "none":
        return None
    if caller == "expired":
        account = api.accounts["alex"]
        token, _ = api.users.issue_token(
            account.user_id, now=api.clock() - api.users.policy.token_ttl - 1)
        return token
    if caller == "revoked":
        token, _ = api.users.issue_token(api.accounts["ada"].user_id)
        assert api.request("POST", "/api/logout", token=token).status == 204
        return token
    role = Role(caller)
    if method == "POST" and path == "/api/logout":  # it ends the session: give it its own
        return api.users.issue_token(api.accounts[NAMES[role]].user_id)[0]
    return api.tokens[role]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path", "needed", "ok"), ENDPOINTS,
                         ids=[f"{m} {p.split('?')[0]}" for m, p, _, _ in ENDPOINTS])
def test_access(api: ApiServer, method: str, path: str, needed: Role, ok: int,
                caller: str) -> None:
    token = _token_for(api, caller, method, path)
    reply = api.request(method, path, BODIES.get(path), token=token)
    if caller in ("none", "expired", "revoked"):
        assert reply.status == 401, reply.body
        assert reply.headers["www-authenticate"].startswith("Bearer")
        assert set(reply.body) == {"error", "field"}
    elif Role(caller).allows(needed):
        assert reply.status == ok, reply.body
    else:
        assert reply.status == 403, reply.body
        assert reply.body["error"].startswith(f"this needs the {needed.value} role")


def _route_of(method: str, path: str, routes: set[tuple[str, str]]) -> tuple[str, str]:
    """The templated route (``/api/calls/{call_id}/hold``) a concrete request goes to: a
    literal route before a templated one, as the application matches them."""
    path = path.split("?")[0]
    def pattern(template: str) -> str:
        return "".join("[^/]+" if part.startswith("{") else re.escape(part)
                       for part in re.split(r"(\{[^/}]+\})", template))

    found = [(m, t) for m, t in routes if m == method and re.fullmatch(pattern(t), path)]
    assert found, f"{method} {path} matches no route of the OpenAPI document"
    return min(found, key=lambda route: route[1].count("{"))


def test_every_route_has_a_row(api: ApiServer) -> None:
    spec = api.request("GET", "/openapi.json").body
    routes = {(method.upper(), path) for path, operations in spec["paths"].items()
              for method in operations}
    covered = {_route_of(m, p, routes) for m, p, _, _ in ENDPOINTS}
    covered |= {_route_of(m, p, routes) for m, p, _ in PUBLIC}
    missing = sorted(routes - covered)
    assert not missing, f"routes without a row in ENDPOINTS or PUBLIC: {missing}"


@pytest.mark.parametrize(("method", "path", "ok"), PUBLIC, ids=[f"{m} {p}" for m, p, _ in PUBLIC])
def test_public_routes_answer_without_a_token(api: ApiServer, method: str, path: str,
                                              ok: int) -> None:
    reply = api.request(method, path, BODIES.get(path))
    assert reply.status == ok, reply.body
    if ok >= 400:
        assert set(reply.body) == {"error", "field"}


@pytest.mark.parametrize("suffix", ["", "/login", "/logout", "/pause", "/unpause",
                                    "/disposition"])
def test_an_agent_may_not_act_on_another_extension(api: ApiServer, suffix: str) -> None:
    method = "GET" if suffix == "" else "POST"
    body = BODIES.get(f"/api/agents/1001{suffix}")
    reply = api.request(method, f"/api/agents/1002{suffix}", body, token=api.tokens[Role.AGENT])
    assert reply.status == 403, reply.body
    assert "own extension (1001)" in reply.body["error"]
    # A supervisor passes the role gate (the desk is not running here).
    reply = api.request(method, f"/api/agents/1002{suffix}", body,
                        token=api.tokens[Role.SUPERVISOR])
    assert reply.status == 503, reply.body


@pytest.mark.parametrize("role", list(Role))
def test_each_role_logs_in_and_sees_itself(api: ApiServer, role: Role) -> None:
    me = api.request("GET", "/api/me", token=api.tokens[role])
    assert me.status == 200
    assert me.body["name"] == NAMES[role] and me.body["role"] == role.value
    assert me.body["two_factor"] is role.needs_two_factor
    assert me.body["token_expires_at"] == pytest.approx(
        api.clock() + api.users.policy.token_ttl, abs=5)


def test_a_token_is_no_substitute_for_credentials_at_login(api: ApiServer) -> None:
    reply = api.request("POST", "/api/login", token=api.tokens[Role.ADMIN])
    assert reply.status == 422 and reply.body["field"] == "body"


def test_accounts_never_show_secrets(api: ApiServer) -> None:
    reply = api.request("GET", "/api/config/accounts", token=api.tokens[Role.ADMIN])
    assert reply.body["sip_accounts"] == [{"user": "1001", "display_name": "Agent 1001"},
                                          {"user": "1002", "display_name": None}]
    assert {u["name"]: u["role"] for u in reply.body["api_users"]} == {
        "ada": "admin", "alex": "agent", "sam": "supervisor"}
    text = json.dumps(reply.body).lower()
    assert "ha1" not in text and "scrypt" not in text and "secret" not in text
    for account in api.accounts.values():
        if account.secret:
            from appliance.api.totp import secret_to_base32

            assert secret_to_base32(account.secret).lower() not in text


def test_live_board_is_empty_until_calls_flow(api: ApiServer) -> None:
    reply = api.request("GET", "/api/kpi/live", token=api.tokens[Role.SUPERVISOR])
    assert reply.body["queues"] == [] and reply.body["agents"] == {}
    assert reply.body["at"] == api.clock()
    assert set(reply.body["agents_by_state"]) == {
        "logged-out", "available", "paused", "on-call", "on-hold", "wrap-up"}
    assert not any(reply.body["agents_by_state"].values())


def test_live_board_shows_applied_events(api: ApiServer) -> None:
    from appliance.reporting.events import QueueEvent, QueueVerb

    now = api.clock()
    events = [QueueEvent(now - 30, "c1", "sales", "", "+3311", QueueVerb.ENTERQUEUE, {}),
              QueueEvent(now - 20, "", "sales", "a1", "", QueueVerb.AGENTLOGIN, {})]
    for event in events:
        api.call_soon(lambda e=event: api.board.apply(e))
    reply = api.request("GET", "/api/kpi/live", token=api.tokens[Role.ADMIN])
    assert reply.status == 200
    [queue] = reply.body["queues"]
    assert queue["queue"] == "sales" and queue["waiting"] == 1
    assert queue["longest_wait"] == pytest.approx(30)
    assert reply.body["agents"] == {"a1": "available"}


def test_audit_lists_recent_rows_newest_first_and_pages(api: ApiServer) -> None:
    token = api.tokens[Role.ADMIN]
    rows = api.request("GET", "/api/audit?limit=3", token=token).body["rows"]
    assert len(rows) == 3 and rows[0]["id"] > rows[1]["id"] > rows[2]["id"]
    older = api.request("GET", f"/api/audit?limit=3&before={rows[-1]['id']}",
                        token=token).body["rows"]
    assert all(r["id"] < rows[-1]["id"] for r in older)
    assert api.request("GET", "/api/audit?limit=0", token=token).body["field"] == "limit"
