"""Queued callbacks over the API, live: ``edgecc appliance`` runs a demo site whose IVR offers a
callback; SIPp callers ask for one; a supervisor lists the pending requests
(``GET /api/callbacks``) and withdraws one from the wallboard (headless Chromium; the page
calls ``DELETE /api/callbacks/{id}``, audited); a request whose attempt is ringing the agent's
phone (pjsua2) cannot be withdrawn (409).

docs/api.md, *Callbacks*; docs/calls.md, "Queued callbacks", for the callback itself.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import pytest
from peers import agent_phone, free_port, sipp, sipp_failed
from test_web_pages import Browser, WebSite, close_web_site, log_in, start_web_site

CALLBACK_DID = "+15550199"
FIRST, SECOND = "+15550001111", "+15550002222"
WAIT_S = 20.0

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium missing"),
    pytest.mark.timeout(150),
]


def _callback_site(data: dict[str, Any]) -> None:
    # The carrier is never reached (no attempt is answered); OPTIONS off: nothing listens.
    data.setdefault("trunk", {}).update(
        allowed_sources=["127.0.0.2/32"], options_interval=None,
        carrier={"host": "127.0.0.1", "port": free_port()})
    queue = data["queues"][0]
    queue.update(members=["1001"], ring_timeout=15.0, record=False, callback_retries=0)
    data["ivr"]["dids"][CALLBACK_DID] = "callback"
    data["ivr"]["flows"]["callback"] = {"start": "offer", "nodes": {
        "offer": {"type": "callback", "queue": queue["name"], "prompt": "welcome",
                  "accept_digit": "1", "timeout": 10, "on_decline": "bye", "next": "bye"},
        "bye": {"type": "hangup"}}}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[WebSite]:
    running = start_web_site(tmp_path_factory.mktemp("api-callbacks-site"), edit=_callback_site)
    try:
        yield running
    finally:
        close_web_site(running)


def query(site: WebSite, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{site.directory / 'edgecc.db'}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _pending(site: WebSite, token: str) -> list[dict[str, Any]]:
    status, body = site.api("GET", "/api/callbacks", token=token)
    assert status == 200, body
    return body["callbacks"]


def _until(site: WebSite, token: str, check: Any, what: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + WAIT_S
    while True:
        pending = _pending(site, token)
        if check(pending):
            return pending
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {pending}"
        time.sleep(0.1)


def _ask(site: WebSite, tmp_path, caller: str) -> None:
    result = sipp(tmp_path, site, "callback_request", keys={"caller": caller},
                  service=CALLBACK_DID, timeout=40)
    assert result.returncode == 0, sipp_failed(result, site)


def test_supervisors_list_and_withdraw_pending_callbacks(site: WebSite, tmp_path) -> None:
    sue, alex = site.token("sue"), site.token("alex")
    assert _pending(site, sue) == []
    # Nobody is logged in: both requests wait, the first asked first.
    _ask(site, tmp_path, FIRST)
    _ask(site, tmp_path, SECOND)
    pending = _until(site, sue, lambda p: len(p) == 2, "two pending callbacks")
    assert [(p["number"], p["queue"], p["state"], p["attempts"], p["position"], p["agent"])
            for p in pending] == [(FIRST, "support", "callback-waiting", 0, 1, None),
                                  (SECOND, "support", "callback-waiting", 0, 2, None)]
    first, second = (p["call_id"] for p in pending)
    # Agents may neither list nor withdraw them.
    assert site.api("GET", "/api/callbacks", token=alex)[0] == 403
    assert site.api("DELETE", f"/api/callbacks/{second}", token=alex)[0] == 403
    # Unknown and malformed ids are refused clearly, naming what is wrong.
    status, body = site.api("DELETE", "/api/callbacks/no-such-request", token=sue)
    assert status == 404 and "no-such-request" in body["error"], body
    status, body = site.api("DELETE", "/api/callbacks/bad%20id", token=sue)
    assert status == 422 and body["field"] == "call_id", body

    # The wallboard lists both; the supervisor withdraws the second (Withdraw, Confirm).
    board = Browser(tmp_path / "wallboard-profile")
    try:
        log_in(board, site, "sam")
        rows = "[...document.querySelectorAll('#callbacks tr')].map(r => r.dataset.callback)"
        assert board.wait_for(f"{rows}.length === 2 && {rows}", "the callbacks") == [
            first, second]
        button = f"document.querySelector('#callbacks tr[data-callback=\"{second}\"] button')"
        board.eval(f"{button}.click()")
        board.wait_for(f"{button}.textContent === 'Confirm withdraw'", "the confirmation")
        board.eval(f"{button}.click()")
        assert board.wait_for(f"{rows}.length === 1 && {rows}", "the withdrawn row gone") == [
            first]
        assert board.eval("document.getElementById('callback-count').textContent") == "1"
    finally:
        board.close()
    assert [p["call_id"] for p in _pending(site, sue)] == [first]
    assert site.api("DELETE", f"/api/callbacks/{second}", token=sue)[0] == 404

    # The agent logs in: the first request is dialled, its phone rings first.
    with agent_phone(tmp_path, site, site, "idle") as agent:
        status, body = site.api("POST", "/api/agents/1001/login", token=sue)
        assert status == 200, body
        assert FIRST in agent.next("incoming", timeout=30)["remote"]
        pending = _until(site, sue, lambda p: p and p[0]["state"] == "callback-dialling",
                         "the first callback dialling")
        assert (pending[0]["call_id"], pending[0]["agent"]) == (first, "1001")
        # Being dialled: not withdrawn (hang that call up instead); nothing changes.
        status, body = site.api("DELETE", f"/api/callbacks/{first}", token=sue)
        assert status == 409 and "dialled" in body["error"], body
        # The agent declines the ringing attempt; with no retries left the request ends.
        agent.command("hangup")
        _until(site, sue, lambda p: p == [], "no pending callback")
    rows = dict(query(site, "SELECT call_id, state FROM callback_requests"))
    assert rows[second] == "cancelled" and rows[first] != "cancelled"
    cancelled = query(site, "SELECT payload FROM events WHERE kind = 'callback.cancelled'")
    assert len(cancelled) == 1 and second in cancelled[0][0] and '"by": "sam"' in (
        cancelled[0][0].replace('":"', '": "'))
    assert site.users is not None
    audited = {(r["actor"], r["action"]) for r in site.users.audit_rows(500)
               if second in r["detail"]}
    # The request (with its source) and call control's own row; the agent's refused
    # attempt is in the log too.
    assert {("api:sam", "callback_cancel"), ("sam", "callback.cancel")} <= audited, audited
    assert ("api:alex", "http") in audited, audited
    assert not {a for a in audited if a[0] == "api:alex" and a[1] != "http"}, audited
