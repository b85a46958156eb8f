"""A configuration change made through the API is in force afterwards, on a running
``edgecc appliance``: the appliance loads the new version once no call is up (it restarts
itself in place, same PID, same ports), then a new agent registers and takes a carrier call
in a new queue that an uploaded IVR flow routes to, and a deleted agent's phone can no longer
register. Phones are pjsua2 and a raw SIP client; the carrier is SIPp.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from peers import agent_phone, sipp, sipp_failed
from test_register_peers import RawPhone
from test_web_pages import WebSite, close_web_site, fixed_ports, start_web_site, wait_until_running

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(180),
]

NEW_PASSWORD = "new-agent-phone-1003"
SALES_MENU = """flows:
  main:
    start: welcome
    nodes:
      welcome:
        type: menu
        prompt: welcome
        options: {'1': sales}
        timeout: 5
        retries: 3
        on_failure: bye
      sales: {type: queue, queue: sales}
      bye: {type: hangup}
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[WebSite]:
    def edit(data: dict) -> None:
        fixed_ports(data)  # kept across the restart that loads a change
        data["queues"][0]["record"] = False
        data.setdefault("trunk", {})["allowed_sources"] = ["127.0.0.2/32"]

    running = start_web_site(tmp_path_factory.mktemp("config-live") / "site", edit=edit)
    try:
        yield running
    finally:
        close_web_site(running)


def api(site: WebSite, method: str, path: str, body: Any = None, *, token: str,
        if_match: int | None = None, within: float = 30.0) -> tuple[int, Any]:
    """One API request, retried (bounded) while the appliance is restarting to load a
    change: its HTTP port is closed for a moment then."""
    deadline = time.monotonic() + within
    while True:
        request = urllib.request.Request(
            site.url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                     **({"If-Match": f'"{if_match}"'} if if_match is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def change(site: WebSite, token: str, method: str, path: str, body: Any = None) -> int:
    """Make a change based on the installed version; return the new version."""
    status, now = api(site, "GET", "/api/config/version", token=token)
    assert status == 200, now
    status, answer = api(site, method, path, body, token=token, if_match=now["version"])
    assert status in (200, 201), answer
    assert answer["version"] == now["version"] + 1
    return answer["version"]


def test_changes_made_through_the_api_are_in_force_after_the_appliance_loads_them(
        site: WebSite, tmp_path) -> None:
    token = site.token("ada")
    phone = RawPhone("127.0.0.9", site.sip_port, site.realm)
    try:
        _, before = phone.register("1002", site.passwords["1002"])
        assert before is not None and before.status == 200
    finally:
        phone.close()
    pid = site.proc.pid

    change(site, token, "POST", "/api/config/agents", {
        "user": "1003", "display_name": "Agent 1003", "password": NEW_PASSWORD})
    change(site, token, "POST", "/api/config/queues", {
        "name": "sales", "members": ["1003"], "record": False, "ring_timeout": 20.0})
    change(site, token, "PUT", "/api/config/flows", {"yaml": SALES_MENU})
    final = change(site, token, "DELETE", "/api/config/agents/1002")
    wait_until_running(site, final)
    assert site.proc.pid == pid and site.proc.poll() is None
    status, agents = api(site, "GET", "/api/config/site", token=token)
    assert status == 200 and [a["user"] for a in agents["agents"]] == ["1001", "1003"]
    assert "event=config_apply" in site.log_text()

    # The deleted agent's phone is refused; the new one registers with its new password.
    phone = RawPhone("127.0.0.9", site.sip_port, site.realm)
    try:
        first, final_answer = phone.register("1002", site.passwords["1002"])
        assert first is not None
        assert first.status != 200 and (final_answer is None or final_answer.status != 200)
        _, wrong = phone.register("1003", "not-the-password")
        assert wrong is not None and wrong.status != 200
    finally:
        phone.close()

    # The new queue takes a carrier call through the new menu, to the new agent.
    site.passwords["1003"] = NEW_PASSWORD
    with agent_phone(tmp_path, site, site, "answer", talk=2.0, user="1003") as agent:
        result = sipp(tmp_path, site, "trunk_call", keys={"hangup": "agent"})
        assert result.returncode == 0, sipp_failed(result, site)
        assert agent.wait("answered")
    # The event log says where the call went: the new queue, to the new agent.
    with sqlite3.connect(f"file:{site.directory / 'edgecc.db'}?mode=ro", uri=True) as conn:
        connects = [json.loads(p) for (p,) in conn.execute(
            "SELECT payload FROM events WHERE kind = 'queue.connect'")]
    assert [(c["queue"], c["agent"]) for c in connects] == [("sales", "1003")], connects
