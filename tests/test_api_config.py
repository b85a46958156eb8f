"""Queues, agents, skills and IVR flows changed through the API (``/api/config``), against a
real demo site (``edgecc init --demo``) and the API served for real.

Each change is checked where it lands: the site.yaml on disk (and site.yaml.prev), the
``edge_config`` version row, the audit log and the ``config.changed`` event; each refusal
is checked to leave all of them untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_api_server import ApiServer, Reply
from test_register_peers import EDGECC

from appliance.api import Role
from appliance.config import ConfigError, load_site, parse_site_yaml

WAIT_S = 10.0
SIP_PASSWORD = "phone-secret-1003"
FLOW_TO_SALES = ("flows:\n  sales_line:\n    start: q\n    nodes:\n"
                 "      q: {type: queue, queue: sales}\n")


@pytest.fixture(scope="module")
def demo_template(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("demo-template") / "site"
    subprocess.run([str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
                    "--sip-port", "0", "--no-tls", "--http-port", "0"],
                   check=True, capture_output=True, timeout=60)
    return directory


class ConfigApi:
    """An API server on a copy of the demo site, with an admin, a supervisor and an agent."""

    def __init__(self, server: ApiServer, directory: Path) -> None:
        self.server = server
        self.directory = directory
        # Issued straight from the user store: logins are tested elsewhere (and cost scrypt).
        self.tokens = {name: server.users.issue_token(server.accounts[name].user_id)[0]
                       for name in ("ada", "sam", "alex")}

    def call(self, method: str, path: str, body: Any = None, *, who: str = "ada",
             version: int | str | None = None) -> Reply:
        headers = {} if version is None else {"If-Match": f'"{version}"' if isinstance(
            version, int) else version}
        return self.server.request(method, "/api/config" + path, body,
                                   token=self.tokens[who], headers=headers)

    def version(self) -> int:
        reply = self.call("GET", "/version")
        assert reply.status == 200, reply.body
        assert reply.headers["etag"] == f'"{reply.body["version"]}"'
        return reply.body["version"]

    def site_text(self) -> str:
        return (self.directory / "site.yaml").read_text()

    def site(self) -> dict[str, Any]:
        return yaml.safe_load(self.site_text())

    def version_rows(self) -> list[tuple[int, int, str]]:
        with sqlite3.connect(self.directory / "edgecc.db") as conn:
            return conn.execute("SELECT version, ok, sha256 FROM edge_config "
                                "ORDER BY version").fetchall()

    def changes(self) -> list[str]:
        return [r["detail"] for r in self.server.audit_rows() if r["action"] == "config_change"]


@pytest.fixture
def api(demo_template: Path, tmp_path: Path) -> Iterator[ConfigApi]:
    directory = tmp_path / "site"
    shutil.copytree(demo_template, directory)
    server = ApiServer(directory)
    try:
        server.context.site = load_site(directory)
        server.add("ada", Role.ADMIN)
        server.add("sam", Role.SUPERVISOR)
        server.add("alex", Role.AGENT)
        yield ConfigApi(server, directory)
    finally:
        server.close()


def assert_untouched(api: ConfigApi, text: str, version: int) -> None:
    assert api.site_text() == text
    assert api.version() == version
    assert len(api.version_rows()) == version


# ------------------------------------------------------------------------------ queues


def test_a_queue_is_created_replaced_and_deleted_as_new_versions(api: ConfigApi) -> None:
    original = api.site_text()
    assert api.version() == 0
    listed = api.call("GET", "/queues", who="sam")  # supervisors read
    assert listed.status == 200 and [q["name"] for q in listed.body["queues"]] == ["support"]
    assert listed.headers["etag"] == '"0"'

    created = api.call("POST", "/queues", {"name": "sales", "members": ["1002"],
                                           "strategy": "ring-all", "wrap_up": 5,
                                           "record": 50}, version=0)
    assert created.status == 201, created.body
    assert created.body["version"] == 1 and created.headers["etag"] == '"1"'
    # On disk: the new file validates as the appliance reads it; the old one is kept.
    assert (api.directory / "site.yaml.prev").read_text() == original
    config = load_site(api.directory)
    sales = next(q for q in config.queues if q.name == "sales")
    assert (sales.members, sales.strategy, sales.wrap_up, sales.record) == (
        ("1002",), "ring-all", 5, 50)
    rows = api.version_rows()
    assert [(v, ok) for v, ok, _ in rows] == [(1, 1)]
    assert rows[0][2] == hashlib.sha256(api.site_text().encode()).hexdigest()

    replaced = api.call("PUT", "/queues/sales", {"name": "sales", "members": ["1001", "1002"],
                                                 "max_wait": 90.0}, version=1)
    assert replaced.status == 200 and replaced.body["version"] == 2, replaced.body
    got = api.call("GET", "/queues/sales")
    assert got.body["queue"]["members"] == ["1001", "1002"] and got.body["queue"]["max_wait"] == 90

    deleted = api.call("DELETE", "/queues/sales", version=2)
    assert deleted.status == 200 and deleted.body == {"version": 3, "deleted": "sales"}
    assert [q["name"] for q in api.site()["queues"]] == ["support"]
    assert api.call("GET", "/queues/sales").status == 404
    # Each change is audited with who, what, before and after.
    changes = api.changes()
    assert len(changes) == 3
    assert "kind=queue" in changes[0] and "op=create" in changes[0] and "before=-" in changes[0]
    assert "op=replace" in changes[1] and "1001" in changes[1] and "version=2" in changes[1]
    assert "op=delete" in changes[2] and "after=-" in changes[2]
    assert all(r["actor"] == "ada" for r in api.server.audit_rows()
               if r["action"] == "config_change")


def test_an_invalid_queue_is_refused_naming_the_field_and_nothing_is_written(
        api: ConfigApi) -> None:
    text = api.site_text()
    unknown_member = api.call("POST", "/queues", {"name": "sales", "members": ["1009"]},
                              version=0)
    assert unknown_member.status == 422
    assert unknown_member.body["field"] == "members[0]"
    assert "1009" in unknown_member.body["error"]
    bad_strategy = api.call("POST", "/queues", {"name": "sales", "strategy": "fastest"},
                            version=0)
    assert bad_strategy.status == 422 and bad_strategy.body["field"] == "strategy"
    bad_name = api.call("POST", "/queues", {"name": "Sales Team"}, version=0)
    assert bad_name.status == 422 and bad_name.body["field"] == "name"
    extra = api.call("POST", "/queues", {"name": "sales", "colour": "red"}, version=0)
    assert extra.status == 422 and extra.body["field"] == "colour"
    duplicate = api.call("POST", "/queues", {"name": "support"}, version=0)
    assert duplicate.status == 409 and duplicate.body["field"] == "name"
    renamed = api.call("PUT", "/queues/support", {"name": "other"}, version=0)
    assert renamed.status == 422 and renamed.body["field"] == "name"
    missing = api.call("PUT", "/queues/nope", {"name": "nope"}, version=0)
    assert missing.status == 404
    assert_untouched(api, text, 0)
    assert api.changes() == []


def test_a_queue_an_ivr_flow_routes_to_cannot_be_deleted(api: ConfigApi) -> None:
    text = api.site_text()
    refused = api.call("DELETE", "/queues/support", version=0)
    assert refused.status == 409
    assert "'main'" in refused.body["error"] and "support" in refused.body["error"]
    assert_untouched(api, text, 0)


def test_if_match_guards_against_overwriting_another_admins_change(api: ConfigApi) -> None:
    text = api.site_text()
    missing = api.call("POST", "/queues", {"name": "sales"})
    assert missing.status == 428 and missing.body["field"] == "If-Match"
    garbage = api.call("POST", "/queues", {"name": "sales"}, version="yesterday")
    assert garbage.status == 400 and garbage.body["field"] == "If-Match"
    stale = api.call("POST", "/queues", {"name": "sales"}, version=7)
    assert stale.status == 412 and "version 0" in stale.body["error"]
    assert_untouched(api, text, 0)
    # Two admins change the same version at once: exactly one change is installed.
    results: list[Reply] = []
    start = threading.Barrier(2)

    def admin(name: str) -> None:
        start.wait(WAIT_S)
        results.append(api.call("POST", "/queues", {"name": name}, version=0))

    threads = [threading.Thread(target=admin, args=(n,)) for n in ("sales", "billing")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 3)
    assert sorted(r.status for r in results) == [201, 412], [r.body for r in results]
    assert api.version() == 1
    assert len([q for q in api.site()["queues"] if q["name"] in ("sales", "billing")]) == 1
    # A weak ETag form of the current version is accepted.
    assert api.call("POST", "/queues", {"name": "later"}, version='W/"1"').status == 201


def test_roles_supervisors_read_only_agents_nothing(api: ConfigApi) -> None:
    for path in ("/version", "/queues", "/agents", "/skills", "/flows"):
        assert api.call("GET", path, who="sam").status == 200, path
        assert api.call("GET", path, who="alex").status == 403, path
    for method, path, body in [("POST", "/queues", {"name": "x"}),
                               ("DELETE", "/queues/support", None),
                               ("POST", "/skills", {"name": "x"}),
                               ("PUT", "/flows", {"yaml": FLOW_TO_SALES})]:
        assert api.call(method, path, body, who="sam", version=0).status == 403
    assert api.version_rows() == []


# ------------------------------------------------------------------------------ agents


def test_an_agent_is_created_with_an_ha1_only_and_deleted_out_of_every_queue(
        api: ConfigApi) -> None:
    assert api.call("POST", "/skills", {"name": "french", "description": "French speakers"},
                    version=0).status == 201
    created = api.call("POST", "/agents", {
        "user": "1003", "display_name": "Agent 1003", "password": SIP_PASSWORD,
        "skills": {"french": 7}, "queues": ["support"]}, version=1)
    assert created.status == 201, created.body
    assert created.body["agent"] == {"user": "1003", "display_name": "Agent 1003",
                                     "role": "agent", "skills": {"french": 7},
                                     "queues": ["support"]}
    text = api.site_text()
    assert SIP_PASSWORD not in text
    realm = api.site()["sip"]["realm"]
    account = load_site(api.directory).sip.accounts_by_user["1003"]
    assert account.ha1_md5 == hashlib.md5(f"1003:{realm}:{SIP_PASSWORD}".encode()).hexdigest()
    assert account.ha1_sha256 == hashlib.sha256(
        f"1003:{realm}:{SIP_PASSWORD}".encode()).hexdigest()
    assert load_site(api.directory).queues[0].members == ("1001", "1002", "1003")
    # The password is in no answer, no audit row, no event; the HA1 neither.
    listed = api.call("GET", "/agents", who="sam")
    dumped = json.dumps(listed.body) + json.dumps(api.server.audit_rows())
    assert SIP_PASSWORD not in dumped and account.ha1_md5 not in dumped
    assert "ha1" not in dumped

    # A password reset changes only the HA1.
    reset = api.call("POST", "/agents/1003/password", {"password": "another-secret"},
                     version=2)
    assert reset.status == 200 and reset.body["version"] == 3
    again = load_site(api.directory).sip.accounts_by_user["1003"]
    assert again.ha1_md5 == hashlib.md5(f"1003:{realm}:another-secret".encode()).hexdigest()
    assert "another-secret" not in json.dumps(api.server.audit_rows())

    # Replacing keeps the password, moves the agent between queues.
    assert api.call("POST", "/queues", {"name": "sales"}, version=3).status == 201
    moved = api.call("PUT", "/agents/1003", {"display_name": "Agent 1003", "role": "supervisor",
                                             "skills": {"french": 9}, "queues": ["sales"]},
                     version=4)
    assert moved.status == 200, moved.body
    assert moved.body["agent"]["queues"] == ["sales"] and moved.body["agent"]["role"] == (
        "supervisor")
    after = load_site(api.directory)
    assert after.sip.accounts_by_user["1003"].ha1_md5 == again.ha1_md5
    assert after.sip.accounts_by_user["1003"].skills == {"french": 9}

    deleted = api.call("DELETE", "/agents/1003", version=5)
    assert deleted.status == 200 and deleted.body["version"] == 6
    final = load_site(api.directory)
    assert "1003" not in final.sip.accounts_by_user
    assert all("1003" not in q.members for q in final.queues)
    assert api.call("GET", "/agents/1003").status == 404


def test_bad_agent_input_is_refused_and_nothing_is_written(api: ConfigApi) -> None:
    text = api.site_text()
    base = {"user": "1003", "password": SIP_PASSWORD}
    for body, status, field in [
        ({**base, "password": "short"}, 422, "password"),
        ({"user": "1003"}, 422, "password"),
        ({**base, "user": "no spaces"}, 422, "user"),
        ({**base, "skills": {"french": 3}}, 422, "skills.french"),  # not a defined skill
        ({**base, "skills": {"french": 11}}, 422, "skills.french"),
        ({**base, "queues": ["nope"]}, 422, "queues[0]"),
        ({**base, "user": "1001"}, 409, "user"),
        ({**base, "role": "boss"}, 422, "role"),
    ]:
        reply = api.call("POST", "/agents", body, version=0)
        assert (reply.status, reply.body["field"]) == (status, field), (body, reply.body)
        assert SIP_PASSWORD not in json.dumps(reply.body)
    raw = api.server.request("POST", "/api/config/agents", raw=b"{not json",
                             token=api.tokens["ada"],
                             headers={"If-Match": '"0"', "Content-Type": "application/json"})
    assert raw.status in (400, 422)
    assert_untouched(api, text, 0)
    assert SIP_PASSWORD not in json.dumps(api.server.audit_rows())


# ------------------------------------------------------------------------------ skills


def test_skills_in_use_cannot_be_deleted(api: ConfigApi) -> None:
    assert api.call("POST", "/skills", {"name": "billing"}, version=0).status == 201
    queue = {"name": "invoices", "members": ["1001"], "required_skills": {"billing": 4}}
    assert api.call("POST", "/queues", queue, version=1).status == 201
    listed = api.call("GET", "/skills", who="sam")
    assert listed.body["skills"] == [{"name": "billing", "description": None, "agents": {},
                                      "queues": {"invoices": 4}}]
    text = api.site_text()
    refused = api.call("DELETE", "/skills/billing", version=2)
    assert refused.status == 409 and "queue invoices" in refused.body["error"]
    assert api.call("POST", "/skills", {"name": "billing"}, version=2).status == 409
    assert_untouched(api, text, 2)
    described = api.call("PUT", "/skills/billing", {"description": "Invoices"}, version=2)
    assert described.status == 200 and described.body["version"] == 3
    queue["required_skills"] = {}
    assert api.call("PUT", "/queues/invoices", queue, version=3).status == 200
    assert api.call("DELETE", "/skills/billing", version=4).status == 200
    assert load_site(api.directory).skills == ()


def test_site_yaml_skills_are_checked_at_load(api: ConfigApi) -> None:
    data = api.site()
    data["sip"]["accounts"][0]["skills"] = {"spanish": 5}
    with pytest.raises(ConfigError) as refused:
        parse_site_yaml(yaml.safe_dump(data))
    assert refused.value.issues[0].key == "sip.accounts[0].skills.spanish"
    data["skills"] = [{"name": "spanish"}, {"name": "spanish"}]
    with pytest.raises(ConfigError) as twice:
        parse_site_yaml(yaml.safe_dump(data))
    assert twice.value.issues[0].key == "skills[1].name"
    data["skills"] = [{"name": "spanish"}]
    data["sip"]["accounts"][0]["skills"] = {"spanish": 0}
    with pytest.raises(ConfigError) as low:
        parse_site_yaml(yaml.safe_dump(data))
    assert low.value.issues[0].key == "sip.accounts[0].skills.spanish"


# ------------------------------------------------------------------------------ IVR flows


def test_flows_upload_names_line_and_key_of_each_problem_and_writes_nothing(
        api: ConfigApi) -> None:
    text = api.site_text()
    bad = ("flows:\n  sales_line:\n    start: hello\n    nodes:\n"
           "      hello: {type: play, prompt: no-such-prompt, next: q}\n"
           "      q: {type: queue, queue: no-such-queue}\n")
    refused = api.call("PUT", "/flows", {"yaml": bad}, version=0)
    assert refused.status == 422
    first, second = refused.body["error"].split("; ")
    assert first.startswith("line 5: flows.sales_line.hello: ") and "no-such-prompt" in first
    assert second.startswith("line 6: flows.sales_line.q: ") and "no-such-queue" in second
    assert refused.body["field"] == "flows.sales_line.hello"
    not_yaml = api.call("PUT", "/flows", {"yaml": "flows: [unclosed"}, version=0)
    assert not_yaml.status == 422 and "line" in not_yaml.body["error"]
    empty = api.call("PUT", "/flows", {"yaml": "flows: {}"}, version=0)
    assert empty.status == 422 and empty.body["field"] == "yaml"
    assert_untouched(api, text, 0)


def test_flows_are_uploaded_read_back_and_deleted(api: ConfigApi) -> None:
    assert api.call("POST", "/queues", {"name": "sales", "members": ["1002"]},
                    version=0).status == 201
    uploaded = api.call("PUT", "/flows", {"yaml": FLOW_TO_SALES}, version=1)
    assert uploaded.status == 200 and uploaded.body == {"version": 2, "flows": ["sales_line"]}
    listed = api.call("GET", "/flows", who="sam")
    assert listed.body["flows"] == ["main", "sales_line"]
    assert listed.body["dids"] == {"+15550100": "main"}
    one = api.call("GET", "/flows/sales_line")
    assert yaml.safe_load(one.body["yaml"]) == yaml.safe_load(FLOW_TO_SALES)
    # The sales queue now has a flow routing to it.
    refused = api.call("DELETE", "/queues/sales", version=2)
    assert refused.status == 409 and "'sales_line'" in refused.body["error"]
    # A flow a number routes to stays.
    kept = api.call("DELETE", "/flows/main", version=2)
    assert kept.status == 409 and "+15550100" in kept.body["error"]
    assert api.call("DELETE", "/flows/sales_line", version=2).status == 200
    assert api.call("DELETE", "/queues/sales", version=3).status == 200
    assert api.call("GET", "/flows/sales_line").status == 404


# ------------------------------------------------------------------------------ event


def test_each_change_is_announced_to_supervisors_as_config_changed(api: ConfigApi) -> None:
    server = api.server
    subs = server.call_soon(lambda: (server.hub.subscribe(Role.SUPERVISOR),
                                     server.hub.subscribe(Role.AGENT, "1001")))
    assert api.call("POST", "/queues", {"name": "sales"}, version=0).status == 201
    event = server.on_loop(subs[0].get(WAIT_S))
    assert event is not None and event.topic == "config.changed"
    assert json.loads(event.message)["data"] == {"version": 1, "kind": "queue",
                                                 "name": "sales", "op": "create", "by": "ada"}
    assert server.on_loop(subs[1].get(0.2)) is None  # agents are not told
    # The event log has it too, with an outbox row: the cloud hears of the new version.
    with sqlite3.connect(api.directory / "edgecc.db") as conn:
        rows = conn.execute("SELECT e.kind, e.payload, o.seq FROM events e LEFT JOIN outbox o "
                            "ON o.seq = e.seq WHERE e.kind = 'config.changed'").fetchall()
    assert len(rows) == 1 and rows[0][2] is not None
    assert json.loads(rows[0][1])["version"] == 1
    assert server.on_loop(asyncio.sleep(0, result=True))


def test_flows_kept_in_a_file_of_their_own_are_not_edited_through_the_api(
        api: ConfigApi) -> None:
    data = api.site()
    (api.directory / "flows.yaml").write_text(yaml.safe_dump({"flows": data["ivr"]["flows"]}))
    data["ivr"]["flows"] = "flows.yaml"
    (api.directory / "site.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    text = api.site_text()
    assert api.call("GET", "/flows").body["flows"] == ["flows.yaml"]
    for method, path, body in [("GET", "/flows/main", None),
                               ("PUT", "/flows", {"yaml": FLOW_TO_SALES.replace(
                                   "queue: sales", "queue: support")}),
                               ("DELETE", "/flows/main", None)]:
        reply = api.call(method, path, body, version=0)
        assert reply.status == 409 and "flows.yaml" in reply.body["error"], (path, reply.body)
    assert_untouched(api, text, 0)
    # Queues and agents are still edited; the flow file is left alone.
    assert api.call("POST", "/queues", {"name": "sales"}, version=0).status == 201
    assert load_site(api.directory).ivr.flows == "flows.yaml"
