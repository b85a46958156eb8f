"""Call control, recordings and admin routes of the API, served for real.

Recordings are made by the real store (encrypted with a site key in the test's directory) and
read back through ``GET /api/recordings`` and ``/api/recordings/{id}/audio``: the download is
the decrypted WAV, every download (and every refusal) leaves an audit row. Call-control routes
with no call control running answer 503 with a message; their refusals keep their status (the
full call path, with phones, is in test_web_live.py). Admin routes list the site's queues and
check uploaded IVR flows, naming each problem's line.
"""

from __future__ import annotations

import io
import os
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_api_server import ApiServer

from appliance.api import Role
from appliance.api.calls import RecordingAccess
from appliance.config import parse_site_yaml
from appliance.recording import RecordingStore
from appliance.store import open_site_db

NAMES = {Role.AGENT: "alex", Role.SUPERVISOR: "sam", Role.ADMIN: "ada"}
T0 = 1_700_000_000.0
HA1 = "ha1_md5: \"" + "0" * 32 + "\", ha1_sha256: \"" + "0" * 64 + "\""
SITE_YAML = f"""
site: {{id: demo}}
sip:
  accounts:
    - {{user: "1001", display_name: Agent 1001, {HA1}}}
    - {{user: "1002", {HA1}}}
    - {{user: "2001", role: supervisor, {HA1}}}
queues:
  - {{name: support, members: ["1001", "1002"], ring_timeout: 12, wrap_up: 5}}
  - {{name: sales, members: ["1002"], strategy: ring-all, record: false}}
ivr:
  dids: {{"+15550100": main}}
"""


def _wav(path: Path, seconds: float, freq: float) -> bytes:
    t = np.arange(int(8000 * seconds)) / 8000
    left = (8000 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    right = (4000 * np.sin(2 * np.pi * 2 * freq * t)).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.column_stack([left, right]).tobytes())
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    directory = Path(tmp_path_factory.mktemp("site"))
    (directory / "site.key").write_bytes(os.urandom(32))
    (directory / "site.key").chmod(0o600)  # as edgecc init makes it
    server = ApiServer(directory)
    db = open_site_db(server.db_path)
    store = RecordingStore(db, directory / "recordings", (directory / "site.key").read_bytes())
    server.wavs = {}
    for i, (caller, agent, queue) in enumerate([("+331", "1001", "support"),
                                                ("+331", "1002", "sales"),
                                                ("+442", "1001", "support")]):
        source = directory / f"source-{i}.wav"
        plain = _wav(source, 0.5 + i * 0.25, 300 + 100 * i)
        rid = store.import_wav(source, call_id=f"call-{i}", caller=caller, agent=agent,
                               queue=queue, started_at=T0 + 60 * i, ended_at=T0 + 60 * i + 30)
        server.wavs[rid] = plain
    db.close()
    recordings = RecordingAccess(RecordingStore(open_site_db(server.db_path),
                                                directory / "recordings",
                                                (directory / "site.key").read_bytes()))
    server.context.recordings = recordings
    server.context.site = parse_site_yaml(SITE_YAML)
    try:
        for role, name in NAMES.items():
            server.add(name, role)
        server.tokens = {role: server.token(name) for role, name in NAMES.items()}
        yield server
    finally:
        server.close()
        recordings.close()


def _download(api: ApiServer, rid: str, token: str) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"{api.url}/api/recordings/{rid}/audio")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def _audit(api: ApiServer, action: str) -> list[dict]:
    return [r for r in api.users.audit_rows(1000) if r["action"] == action]


def test_recordings_are_found_by_caller_agent_queue_and_time(api: ApiServer) -> None:
    token = api.tokens[Role.SUPERVISOR]

    def ids(query: str) -> list[str]:
        reply = api.request("GET", f"/api/recordings{query}", token=token)
        assert reply.status == 200, reply.body
        return [r["call_id"] for r in reply.body["recordings"]]

    assert ids("") == ["call-0", "call-1", "call-2"]
    assert ids("?caller=%2B331") == ["call-0", "call-1"]
    assert ids("?agent=1001") == ["call-0", "call-2"]
    assert ids("?queue=sales") == ["call-1"]
    assert ids(f"?since={T0 + 60}") == ["call-1", "call-2"]
    assert ids(f"?since={T0}&until={T0 + 60}") == ["call-0"]
    assert ids("?caller=%2B331&agent=1001") == ["call-0"]
    assert ids("?limit=1") == ["call-0"]
    assert ids("?caller=%2B999") == []
    first = api.request("GET", "/api/recordings", token=token).body["recordings"][0]
    assert set(first) == {"id", "call_id", "caller", "agent", "queue", "started_at", "ended_at",
                          "legal_hold", "erased"}
    assert (first["started_at"], first["ended_at"], first["erased"]) == (T0, T0 + 30, False)
    bad = api.request("GET", "/api/recordings?since=later", token=token)
    assert bad.status == 422 and bad.body["field"] == "since"
    assert api.request("GET", "/api/recordings?limit=0", token=token).body["field"] == "limit"


def test_download_is_the_decrypted_wav_and_is_audited(api: ApiServer) -> None:
    rid, plain = next(iter(api.wavs.items()))
    before = len(_audit(api, "recording_download"))
    status, headers, body = _download(api, rid, api.tokens[Role.ADMIN])
    assert status == 200
    assert headers["content-type"] == "audio/wav"
    assert headers["cache-control"] == "no-store"
    assert body == plain  # byte for byte what was recorded
    rows = _audit(api, "recording_download")
    assert len(rows) == before + 1
    assert rows[0]["actor"] == "api:ada"
    assert f"recording={rid}" in rows[0]["detail"] and "call=call-0" in rows[0]["detail"]


def test_agents_may_not_search_or_download(api: ApiServer) -> None:
    rid = next(iter(api.wavs))
    before = len(_audit(api, "recording_download"))
    for path in ("/api/recordings", f"/api/recordings/{rid}/audio"):
        reply = api.request("GET", path, token=api.tokens[Role.AGENT])
        assert reply.status == 403, reply.body
    assert len(_audit(api, "recording_download")) == before


def test_unknown_tampered_and_erased_recordings_are_refused_clearly(api: ApiServer,
                                                                    tmp_path: Path) -> None:
    token = api.tokens[Role.SUPERVISOR]
    reply = api.request("GET", "/api/recordings/nope/audio", token=token)
    assert reply.status == 404 and reply.body["error"] == "no recording nope"
    # A second store on the same files: flip one byte of a copy's ciphertext.
    store = api.context.recordings.store
    rid = list(api.wavs)[1]
    path = store.path_of(rid)
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-20] + bytes([original[-20] ^ 1]) + original[-19:])
        reply = api.request("GET", f"/api/recordings/{rid}/audio", token=token)
        assert reply.status == 409
        assert "failed its integrity check" in reply.body["error"]
        assert any(rid in r["detail"] and "reason=integrity" in r["detail"]
                   for r in _audit(api, "recording_download_refused"))
    finally:
        path.write_bytes(original)
    assert _download(api, rid, token)[0] == 200
    # Erasure destroys the key: the download says so.
    erased = list(api.wavs)[2]
    db = open_site_db(api.db_path)
    try:
        other = RecordingStore(db, store.directory, b"\0" * 32)
        other.erase_caller("+442", actor="test", now=T0 + 1000)
    finally:
        db.close()
    reply = api.request("GET", f"/api/recordings/{erased}/audio", token=token)
    assert reply.status == 409 and "erased" in reply.body["error"]
    found = api.request("GET", f"/api/recordings?agent=1001&since={T0 + 100}",
                        token=token).body["recordings"]
    assert [(r["id"], r["erased"]) for r in found] == [(erased, True)]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("GET", "/api/calls", None),
    ("POST", "/api/calls/c1/hangup", None),
    ("POST", "/api/calls/c1/hold", None),
    ("POST", "/api/calls/c1/resume", None),
    ("POST", "/api/calls/c1/transfer", {"target": "1002"}),
    ("POST", "/api/calls/c1/recording/pause", None),
    ("POST", "/api/calls/c1/recording/resume", None),
    ("POST", "/api/calls/dial", {"agent": "1001", "number": "+15551234"}),
    ("POST", "/api/supervise", {"agent": "1001", "mode": "listen"}),
])
def test_call_routes_without_call_control_say_so(api: ApiServer, method, path, body) -> None:
    reply = api.request(method, path, body, token=api.tokens[Role.ADMIN])
    assert reply.status == 503, reply.body
    assert reply.body["error"] == "call control is not running on this appliance"


class _Refusing:
    """Stands in for call control only to check how refusals map (no call path here)."""

    def __init__(self, status: int) -> None:
        self.status = status

    def hangup(self, call_id: str, *, by: str) -> None:
        from appliance.calls import CallControlError

        raise CallControlError(self.status, f"call {call_id} refused by {by}")


@pytest.mark.parametrize("status", [403, 404, 409])
def test_call_control_refusals_keep_status_and_message(api: ApiServer, status: int) -> None:
    api.context.calls = _Refusing(status)
    try:
        reply = api.request("POST", "/api/calls/c9/hangup", token=api.tokens[Role.SUPERVISOR])
    finally:
        api.context.calls = None
    assert reply.status == status
    assert reply.body == {"error": "call c9 refused by sam", "field": None}


def test_bad_call_requests_name_the_field(api: ApiServer) -> None:
    token = api.tokens[Role.SUPERVISOR]
    reply = api.request("POST", "/api/calls/c1/transfer", {"target": "not a number!"},
                        token=token)
    assert reply.status == 422 and reply.body["field"] == "target"
    reply = api.request("POST", "/api/supervise", {"agent": "1001", "mode": "shout"},
                        token=token)
    assert reply.status == 422 and reply.body["field"] == "mode"
    reply = api.request("POST", "/api/calls/dial", {"agent": "1001"}, token=token)
    assert reply.status == 422 and reply.body["error"] == "number: required"


def test_admin_sees_queues_agents_and_their_queues(api: ApiServer) -> None:
    reply = api.request("GET", "/api/config/site", token=api.tokens[Role.ADMIN])
    assert reply.status == 200, reply.body
    body = reply.body
    assert body["site"] == "demo" and body["dids"] == {"+15550100": "main"}
    assert [(q["name"], q["members"], q["strategy"], q["record"]) for q in body["queues"]] == [
        ("support", ["1001", "1002"], "longest-idle", True),
        ("sales", ["1002"], "ring-all", False)]
    assert {a["user"]: (a["role"], a["queues"]) for a in body["agents"]} == {
        "1001": ("agent", ["support"]), "1002": ("agent", ["support", "sales"]),
        "2001": ("supervisor", [])}
    assert "ha1" not in str(body)


def test_every_role_reads_the_pause_reasons_and_dispositions(api: ApiServer) -> None:
    for role in Role:
        reply = api.request("GET", "/api/config/desk", token=api.tokens[role])
        assert reply.status == 200, reply.body
        assert reply.body == {"pause_reasons": {"1": "break", "2": "lunch", "3": "training"},
                              "dispositions": {"1": "resolved", "2": "follow-up",
                                               "3": "escalated"}}


def test_flow_check_lists_every_problem_with_its_line(api: ApiServer) -> None:
    token = api.tokens[Role.ADMIN]
    good = ("flows:\n  main:\n    start: welcome\n    nodes:\n"
            "      welcome: {type: menu, prompt: welcome, options: {'1': q}, on_failure: bye}\n"
            "      q: {type: queue, queue: support}\n"
            "      bye: {type: hangup}\n")
    reply = api.request("POST", "/api/config/flows/check", {"yaml": good}, token=token)
    assert reply.status == 200, reply.body
    assert reply.body == {"valid": True, "flows": ["main"], "problems": []}
    bad = good.replace("prompt: welcome", "prompt: welcom").replace("queue: support",
                                                                    "queue: suport")
    reply = api.request("POST", "/api/config/flows/check", {"yaml": bad}, token=token)
    assert reply.status == 200 and reply.body["valid"] is False
    problems = {(p["line"], p["node"]) for p in reply.body["problems"]}
    assert problems == {(5, "welcome"), (6, "q")}
    text = " ".join(p["message"] for p in reply.body["problems"])
    assert "welcom" in text and "suport" in text
    reply = api.request("POST", "/api/config/flows/check", {"yaml": "flows: [unclosed"},
                        token=token)
    assert reply.body["valid"] is False and reply.body["problems"][0]["line"] == 1
    assert "not valid YAML" in reply.body["problems"][0]["message"]
    assert any(r["actor"] == "api:ada" for r in _audit(api, "flows_check"))
    reply = api.request("POST", "/api/config/flows/check", {"yaml": good},
                        token=api.tokens[Role.SUPERVISOR])
    assert reply.status == 403


def test_every_configured_queue_has_a_tile_with_its_members_by_state(api: ApiServer) -> None:
    from appliance.reporting.events import QueueEvent, QueueVerb

    token = api.tokens[Role.SUPERVISOR]
    before = api.request("GET", "/api/kpi/live", token=token).body["queues"]
    assert [(q["queue"], q["waiting"], q["service_level"]) for q in before] == [
        ("sales", 0, None), ("support", 0, None)]
    assert before[1]["agents_by_state"]["logged-out"] == 2
    now = api.clock()
    for event in (QueueEvent(now - 5, "", "", "1002", "", QueueVerb.AGENTLOGIN, {}),
                  QueueEvent(now - 4, "", "", "1002", "", QueueVerb.PAUSE, {"reason": "lunch"}),
                  QueueEvent(now - 3, "", "", "1001", "", QueueVerb.AGENTLOGIN, {}),
                  QueueEvent(now - 2, "k1", "sales", "", "+1", QueueVerb.ENTERQUEUE, {})):
        api.call_soon(lambda e=event: api.board.apply(e))
    after = {q["queue"]: q for q in
             api.request("GET", "/api/kpi/live", token=token).body["queues"]}
    assert after["sales"]["waiting"] == 1
    assert {k: v for k, v in after["sales"]["agents_by_state"].items() if v} == {"paused": 1}
    assert {k: v for k, v in after["support"]["agents_by_state"].items() if v} == {
        "available": 1, "paused": 1}
