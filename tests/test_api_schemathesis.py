"""Property-based run of schemathesis against the served /openapi.json.

Every operation of the schema gets generated requests, valid ones and invalid ones, each with a
fresh admin token; every answer must be documented by the schema (status, content type, headers,
body shape) and none may be a 5xx. Examples per operation are bounded, so the whole run takes
tens of seconds.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from test_api_server import ApiServer
from test_register_peers import EDGECC

from appliance.api import Role
from appliance.api.calls import RecordingAccess
from appliance.config import parse_site_yaml
from appliance.config_edit import SiteEditor
from appliance.recording import RecordingStore
from appliance.store import open_site_db

EXAMPLES_PER_OPERATION = 40
LONG_EXAMPLES_PER_OPERATION = 300
UNAVAILABLE_EXAMPLES = 15
CONFIG_WRITE_EXAMPLES = 6
OPERATIONS = {"POST /api/login", "POST /api/logout", "GET /api/me", "GET /api/wfm/staff",
              "GET /api/kpi/live", "GET /api/config/accounts", "GET /api/audit", "GET /health",
              "GET /api/config/site", "POST /api/config/flows/check", "GET /api/calls",
              "POST /api/calls/{call_id}/hangup", "POST /api/calls/{call_id}/hold",
              "POST /api/calls/{call_id}/resume", "POST /api/calls/{call_id}/transfer",
              "POST /api/calls/{call_id}/recording/pause",
              "POST /api/calls/{call_id}/recording/resume", "POST /api/calls/dial",
              "POST /api/calls/{call_id}/consult", "POST /api/calls/{call_id}/consult/cancel",
              "POST /api/calls/{call_id}/transfer/complete",
              "POST /api/supervise", "GET /api/recordings",
              "GET /api/recordings/{recording_id}/audio", "GET /api/config/desk",
              "GET /api/alerts", "GET /api/kpi/report", "GET /api/callbacks",
              "DELETE /api/callbacks/{call_id}",
              "GET /api/agents", "GET /api/agents/{agent}", "POST /api/agents/{agent}/login",
              "POST /api/agents/{agent}/logout", "POST /api/agents/{agent}/pause",
              "POST /api/agents/{agent}/unpause", "POST /api/agents/{agent}/disposition",
              "GET /api/config/version", "GET /api/config/queues", "POST /api/config/queues",
              "GET /api/config/queues/{name}", "PUT /api/config/queues/{name}",
              "DELETE /api/config/queues/{name}", "GET /api/config/agents",
              "POST /api/config/agents", "GET /api/config/agents/{user}",
              "PUT /api/config/agents/{user}", "DELETE /api/config/agents/{user}",
              "POST /api/config/agents/{user}/password", "GET /api/config/skills",
              "POST /api/config/skills", "PUT /api/config/skills/{name}",
              "DELETE /api/config/skills/{name}", "GET /api/config/flows",
              "PUT /api/config/flows", "GET /api/config/flows/{name}",
              "DELETE /api/config/flows/{name}"}
# Configuration changes need If-Match naming the installed version, which a generator cannot
# know: a schema-valid change is rightly refused (412, 428) unless it guessed the version.
CONFIG_WRITES = {op for op in OPERATIONS
                 if op.startswith(("POST /api/config/", "PUT /api/config/", "DELETE /api/config/"))
                 and op != "POST /api/config/flows/check"}
# Call control and the agent desk do not run in this harness: these answer 503 (documented)
# once a request passes validation and the role check (test_api_calls.py covers them).
WITHOUT_SERVICE = {op for op in OPERATIONS
                   if any(part in op for part in ("/api/calls", "/api/callbacks",
                                                  "/api/supervise", "/api/agents"))}
# A string over its maxLength in characters may be over the 64 KiB body limit in bytes (two
# bytes a character in UTF-8): 413 Content Too Large is then the right refusal, as good as 422.
CONFIG = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {
    "expected-statuses": ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422",
                          "428", "429", "5xx"]}}})
# Invalid requests exist for every operation with parameters, a body or a security header.
WITH_INPUT = OPERATIONS - {"GET /health"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    directory = Path(tmp_path_factory.mktemp("site"))
    server = ApiServer(directory)
    (directory / "site.key").write_bytes(os.urandom(32))
    (directory / "site.key").chmod(0o600)  # as edgecc init makes it
    recordings = RecordingAccess(RecordingStore(open_site_db(server.db_path),
                                                directory / "recordings",
                                                (directory / "site.key").read_bytes()))
    server.context.recordings = recordings
    # The site database is the server's (a KPI report reads its event log).
    server.context.site = parse_site_yaml("site: {id: demo}\nsip: {tls_port: null}\n",
                                          site_dir=directory)
    server.context.alerts = list
    # A demo site whose configuration the generated requests may change.
    subprocess.run([str(EDGECC), "init", "--demo", "--site-dir", str(directory / "site"),
                    "--agents", "2", "--sip-port", "0", "--no-tls", "--http-port", "0"],
                   check=True, capture_output=True, timeout=60)
    server.context.site_editor = SiteEditor(directory / "site", server.db_path)
    try:
        server.add("ada", Role.ADMIN)
        yield server
    finally:
        server.close()
        recordings.close()


def _runner(served: ApiServer, operation: schemathesis.APIOperation, mode: GenerationMode,
            statuses: dict[str, set[int]], examples: int, derandomize: bool):  # type: ignore[no-untyped-def]
    label = f"{operation.method.upper()} {operation.path}"
    # Staffing limits the offered traffic (calls × aht / interval) and refuses targets no
    # staffing meets; a KPI report needs until after since and a span of at most 31 days:
    # rules across parameters that OpenAPI cannot state, so a schema-valid request may
    # rightly get 422 there.
    excluded = ([schemathesis.checks.positive_data_acceptance]
                if operation.path in ("/api/wfm/staff", "/api/kpi/report") else [])
    if label in CONFIG_WRITES:
        excluded = [schemathesis.checks.positive_data_acceptance]
        if examples == EXAMPLES_PER_OPERATION and mode is GenerationMode.POSITIVE:
            examples = CONFIG_WRITE_EXAMPLES  # quick run: each accepted change is fsynced
    unavailable = label in WITHOUT_SERVICE
    if unavailable:
        excluded += [schemathesis.checks.not_a_server_error,
                     schemathesis.checks.positive_data_acceptance]

    if unavailable:  # only validation and the role gate to exercise: fewer cases do
        examples = min(examples, UNAVAILABLE_EXAMPLES)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        # A fresh token per case: a generated logout must not end the others' session. An
        # invalid case whose mutation is the missing Authorization header is sent without it.
        headers = {}
        if mode is GenerationMode.POSITIVE or "Authorization" in (case.headers or {}):
            token, _ = served.users.issue_token(served.accounts["ada"].user_id)
            headers["Authorization"] = f"Bearer {token}"
        if mode is GenerationMode.POSITIVE and label in CONFIG_WRITES:
            # The installed version, so generated changes reach validation and installation.
            headers["If-Match"] = f'"{served.context.site_editor.version()}"'
        response = case.call_and_validate(headers=headers, excluded_checks=excluded)
        assert response.status_code < 500 or (unavailable and response.status_code == 503)
        statuses.setdefault(label, set()).add(response.status_code)

    return run


def _conformance(served: ApiServer, mode: GenerationMode, examples: int,
                 derandomize: bool) -> None:
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", config=CONFIG)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == OPERATIONS
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        try:
            _runner(served, operation, mode, statuses, examples, derandomize)()
        except Unsatisfiable:
            # No parameters, body or security header: there is no invalid request to make.
            assert mode is GenerationMode.NEGATIVE and operation.path == "/health"
    expected = OPERATIONS if mode is GenerationMode.POSITIVE else WITH_INPUT
    print({label: sorted(codes) for label, codes in sorted(statuses.items())})
    assert set(statuses) == expected  # every operation was really called
    if mode is GenerationMode.NEGATIVE:  # a missing or mangled token was among the cases
        assert all(401 in statuses[label] for label in expected - {"POST /api/login"})


MODES = pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                ids=["valid", "invalid"])


@pytest.mark.timeout(240)
@MODES
def test_api_conforms_to_its_schema(served: ApiServer, mode: GenerationMode) -> None:
    # Derandomized: the same cases every run, so `make test` is repeatable.
    _conformance(served, mode, EXAMPLES_PER_OPERATION, derandomize=True)


@pytest.mark.long
@MODES
def test_api_conforms_to_its_schema_long(served: ApiServer, mode: GenerationMode) -> None:
    _conformance(served, mode, LONG_EXAMPLES_PER_OPERATION, derandomize=False)
