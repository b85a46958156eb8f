"""Security events reach the alerts: refused API logins on a running appliance raise the
``security`` alert (and its event-log row) once the burst threshold is met."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from test_web_pages import WebSite, close_web_site, start_web_site

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[WebSite]:
    def burst_of_three(data: dict) -> None:
        data.setdefault("alerts", {})["security"] = {"count": 3, "window": 300}

    running = start_web_site(tmp_path_factory.mktemp("security-site"), edit=burst_of_three)
    try:
        yield running
    finally:
        close_web_site(running)


def _bad_login(site: WebSite, name: str) -> int:
    request = urllib.request.Request(
        site.url + "/api/login", method="POST",
        data=json.dumps({"name": name, "password": "not the password"}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as reply:
            return reply.status
    except urllib.error.HTTPError as error:
        return error.code


def _security_alerts(site: WebSite, token: str) -> list[dict]:
    status, body = site.api("GET", "/api/alerts", token=token)
    assert status == 200, body
    return [a for a in body["alerts"] if a["rule"] == "security"]


def test_refused_logins_raise_the_security_alert(site: WebSite) -> None:
    token = site.token("sue")
    for _ in range(2):
        assert _bad_login(site, "mallory") == 401
    assert _security_alerts(site, token) == []  # below the threshold
    assert _bad_login(site, "mallory") == 401
    deadline = time.monotonic() + 10
    raised = _security_alerts(site, token)
    while not raised and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval of a bounded wait (the event crosses threads)
        raised = _security_alerts(site, token)
    assert len(raised) == 1 and "3 bans or failed logins" in raised[0]["message"]

    def logged() -> list[str]:
        with sqlite3.connect(site.directory / "edgecc.db") as conn:
            return [p for (p,) in conn.execute(
                "SELECT payload FROM events WHERE kind = 'alert.raised'")]

    deadline = time.monotonic() + 10
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any('"security"' in payload for payload in logged())
