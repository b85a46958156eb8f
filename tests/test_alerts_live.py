"""Every alert rule end to end on a running ``edgecc appliance``, and uptime per component.

Real parts only: the appliance in its own process, SIPp as the carrier's callers (from
127.0.0.2), the API for the agents' desk and refused logins, the edge agent's ``link_state``
row written as the edge agent writes it, a real HTTP webhook receiver, a real WebSocket
subscriber (``/api/events``, a supervisor) and a UDP "carrier" that answers the trunk's OPTIONS
keep-alives. Thresholds are tight so that each rule fires within a second or two of its cause.

For each rule the test asserts the four outputs of an alert (docs/alerts.md): the event-log row
``alert.raised``, the WebSocket message (topic ``alert``, the live source of the wallboard's
banner), the webhook post, and ``/api/alerts`` (what the banner shows on load) while the alert
is active. The browser rendering of the banner itself is tested once, in test_web_pages.py.
"""

from __future__ import annotations

import json
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlite_utils
from peers import HttpPeer, free_port
from test_web_pages import WebSite, close_web_site, start_web_site

from appliance import eventlog
from media_core.sip import RemoteProtocolError, build_response, parse_message

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(shutil.which("sipp") is None, reason="needs SIPp")]

ROOT = Path(__file__).resolve().parent.parent
DID = "+15550100"
WAIT_S = 20.0
"""Bound of every wait for an effect (a loaded 2-core box; they come within seconds)."""


# --------------------------------------------------------------------------- real receivers


class Collected:
    """Things received on another thread, waited for with a bounded wait."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.changed = threading.Condition()

    def add(self, item: dict[str, Any]) -> None:
        with self.changed:
            self.items.append(item)
            self.changed.notify_all()

    def wait(self, match: Callable[[dict[str, Any]], bool], what: str,
             timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for item in self.items:
                    if match(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {what} within {timeout} s; got {self.items[-10:]}")
                self.changed.wait(left)


class OptionsCarrier:
    """The carrier as the trunk's keep-alives see it: answers each OPTIONS with ``status``
    (200 up; 503 says it cannot serve us, RFC 3261 §21.5.4), parsed and built with the
    project's SIP codec, on a UDP socket of 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.status = 200
        self.answered = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            try:
                request = parse_message(data)
            except RemoteProtocolError:
                continue
            if request.is_request and request.method == "OPTIONS":
                self.sock.sendto(build_response(request, self.status).to_bytes(), peer)
                self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close()


def websocket_stream(site: WebSite, token: str, into: Collected) -> Callable[[], None]:
    """Subscribe to ``/api/events`` with ``token`` on a thread; every message goes ``into``.
    Returns the function that ends the subscription."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    url = site.url.replace("http://", "ws://") + "/api/events?token=" + token
    opened: dict[str, Any] = {}
    ready = threading.Event()

    def read() -> None:
        try:
            with connect(url, open_timeout=WAIT_S) as ws:
                opened["ws"] = ws
                opened["hello"] = json.loads(ws.recv(timeout=WAIT_S))
                ready.set()
                for message in ws:
                    into.add(json.loads(message))
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            opened.setdefault("error", exc)
        finally:
            ready.set()

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert ready.wait(WAIT_S) and "hello" in opened, opened
    hello = opened["hello"]
    assert hello["type"] == "hello" and hello["role"] == "supervisor", hello

    def close() -> None:
        opened["ws"].close()
        thread.join(5)
    return close


# --------------------------------------------------------------------------- the site


ALERTS = {
    "service_level": {"target": 0.8, "threshold": 20, "window": 600, "min_calls": 1,
                      "clear_after": 120},
    "calls_waiting": {"above": 1, "clear_after": 120},
    "longest_wait": {"above": 1, "clear_after": 120},
    "agent_paused": {"above": 0.5, "clear_after": 120},
    "long_call": {"above": 1},
    "link_down": {"after": 0.5, "clear_after": 120},
    "security": {"count": 2, "window": 300, "clear_after": 120},
}
"""Tight thresholds: each rule fires within a second or two of its cause, and (but for
long_call, whose alert ends with the call) stays active for the rest of the module."""
MAX_WAIT_S = 6.0
"""Callers leave the queue by its timeout after this long: the service level's misses."""


@dataclass
class Live:
    site: WebSite
    hooks: HttpPeer
    carrier: OptionsCarrier
    stream: Collected
    token: str
    started_at: float
    tmp: Path
    triggered: set[str] = field(default_factory=set)
    callers: subprocess.Popen | None = None


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    hooks, carrier = HttpPeer(), OptionsCarrier()
    directory = tmp_path_factory.mktemp("alerts-live")

    def edit(data: dict) -> None:
        data["alerts"] = ALERTS
        data["webhooks"] = [{"url": f"{hooks.url}/edgecc", "kinds": ["alert.raised", "alert.cleared"],
                             "retries": 2, "backoff": 0.2}]
        data["trunk"] = {"allowed_sources": ["127.0.0.2/32"],
                         "carrier": {"host": "127.0.0.1", "port": carrier.port},
                         "options_interval": 0.3, "options_failures": 1}
        data["queues"][0]["max_wait"] = MAX_WAIT_S

    started_at = time.time()
    site = start_web_site(directory, edit=edit)
    stream = Collected()
    token = site.token("sue")
    end_stream = websocket_stream(site, token, stream)
    running = Live(site, hooks, carrier, stream, token, started_at, directory)
    try:
        yield running
    finally:
        end_stream()
        if running.callers is not None and running.callers.poll() is None:
            running.callers.kill()
            running.callers.wait(5)
        close_web_site(site)
        hooks.close()
        carrier.close()


def rows(live: Live, kinds: tuple[str, ...]) -> list[tuple[str, float, dict]]:
    marks = ",".join("?" * len(kinds))
    conn = sqlite3.connect(f"file:{live.site.directory / 'edgecc.db'}?mode=ro", uri=True,
                           timeout=5)
    try:
        return [(k, at, json.loads(p)) for k, at, p in conn.execute(
            f"SELECT kind, occurred_at, payload FROM events WHERE kind IN ({marks}) "
            "ORDER BY seq", kinds)]
    finally:
        conn.close()


def wait_rows(live: Live, kinds: tuple[str, ...], match: Callable[[str, dict], bool],
              what: str) -> tuple[str, float, dict]:
    deadline = time.monotonic() + WAIT_S
    while True:
        found = [r for r in rows(live, kinds) if match(r[0], r[2])]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} in the event log within {WAIT_S} s: "
                        f"{rows(live, kinds)}\n{live.site.log_text()[-3000:]}")
        time.sleep(0.05)  # polling interval of a bounded wait (another process writes)


def write_link_state(live: Live, state: str, since: float, detail: str = "") -> None:
    """The edge agent's link-state row, as it writes it."""
    db = sqlite_utils.Database(live.site.directory / "edgecc.db")
    try:
        eventlog.write_link_state(db, eventlog.LinkState(
            state, since, 0, 3 if state == "offline" else 0, 0.0, detail, 0, 0, 0,
            time.time()))
    finally:
        db.close()


# --------------------------------------------------------------------------- causes


def queue_callers(live: Live) -> None:
    """Two carrier calls at once into the demo queue with nobody logged in: two callers wait
    (calls_waiting > 1), longer than 1 s (longest_wait, long_call), then leave by the queue's
    timeout, unanswered (service level 0 % of 2 calls)."""
    if live.callers is not None:
        return
    port = live.site.sip_port
    live.callers = subprocess.Popen(
        ["sipp", f"127.0.0.1:{port}", "-sf", str(ROOT / "tests" / "sipp" / "trunk_call.xml"),
         "-s", DID, "-m", "2", "-l", "2", "-r", "10", "-i", "127.0.0.2",
         "-p", str(free_port()), "-mi", "127.0.0.2", "-mp", str(free_port(even=True)),
         "-nostdin", "-timeout", "30s", "-key", "hangup", "caller"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        cwd=live.tmp)


def paused_agent(live: Live) -> None:
    for path, body in (("/api/agents/1002/login", None),
                       ("/api/agents/1002/pause", {"reason": "1"})):
        status, reply = live.site.api("POST", path, body, token=live.token)
        assert status in (200, 409) if path.endswith("login") else status == 200, reply


def link_offline(live: Live) -> None:
    write_link_state(live, "offline", time.time() - 5, "cloud unreachable")


def refused_logins(live: Live) -> None:
    import urllib.error
    import urllib.request

    for _ in range(2):
        request = urllib.request.Request(
            live.site.url + "/api/login", method="POST",
            data=json.dumps({"name": "mallory", "password": "not the password"}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=WAIT_S)
        assert refused.value.code == 401


CAUSES: dict[str, tuple[Callable[[Live], None], str]] = {
    "service_level": (queue_callers, "support"),
    "calls_waiting": (queue_callers, "support"),
    "longest_wait": (queue_callers, "support"),
    "long_call": (queue_callers, ""),  # the key is the call id
    "agent_paused": (paused_agent, "1002"),
    "link_down": (link_offline, "cloud"),
    "security": (refused_logins, "site"),
}


@pytest.mark.parametrize("rule", list(CAUSES))
def test_each_rule_reaches_the_log_the_websocket_the_webhook_and_the_banner(
        live: Live, rule: str) -> None:
    cause, key = CAUSES[rule]
    if cause.__name__ not in live.triggered:
        live.triggered.add(cause.__name__)
        cause(live)

    def ours(data: dict) -> bool:
        return data.get("rule") == rule and (not key or data.get("key") == key)

    # 1. The event log (the cloud and later reports see it).
    _, at, logged = wait_rows(live, ("alert.raised",), lambda _k, d: ours(d),
                              f"alert.raised row of {rule}")
    assert logged["cleared_at"] is None and logged["raised_at"] == at
    assert logged["severity"] in ("info", "warning", "critical") and logged["message"]
    # 2. The WebSocket: the live source of the wallboard's banner (it shows `message`).
    shown = live.stream.wait(lambda m: m.get("type") == "event" and m.get("topic") == "alert"
                             and ours(m["data"]) and m["data"]["state"] == "raised",
                             f"the {rule} alert on the WebSocket")
    assert shown["data"]["message"] == logged["message"]
    assert shown["data"]["key"] == logged["key"]
    # 3. The webhook, signed for its kind, with the site and the alert.
    post = live.hooks.wait(lambda r: r.headers.get("x-edgecc-event") == "alert.raised"
                           and ours(r.json()["payload"]))[0].json()
    assert post["kind"] == "alert.raised" and post["site"]
    assert post["payload"] == logged
    # 4. The banner's data on load: /api/alerts, while the alert is active.
    if rule == "long_call":
        # Active only while the call lasts (it ends with the queue's timeout): its end
        # clears it, on the stream the banner follows.
        live.stream.wait(lambda m: m.get("topic") == "alert" and ours(m["data"])
                         and m["data"]["state"] == "cleared", "the long_call alert cleared")
        return
    status, body = live.site.api("GET", "/api/alerts", token=live.token)
    assert status == 200, body
    active = [a for a in body["alerts"] if ours(a)]
    assert [a["message"] for a in active] == [logged["message"]], body


def test_components_go_up_and_down_in_the_log_and_the_uptime_report(live: Live) -> None:
    # The appliance said it started; the trunk is up once the carrier answers its OPTIONS.
    wait_rows(live, ("component.up",), lambda _k, d: d["component"] == "appliance",
              "the appliance up")
    wait_rows(live, ("component.up",), lambda _k, d: d["component"] == "trunk",
              "the trunk up")
    # The carrier cannot serve us: trunk down; it answers again: up again.
    live.carrier.status = 503
    wait_rows(live, ("component.down",), lambda _k, d: d["component"] == "trunk",
              "the trunk down")
    live.carrier.status = 200

    def trunk_rows() -> list[str]:
        return [k for k, _, d in rows(live, ("component.up", "component.down"))
                if d["component"] == "trunk"]
    deadline = time.monotonic() + WAIT_S
    while trunk_rows()[-1:] != ["component.up"] or len(trunk_rows()) < 3:
        assert time.monotonic() < deadline, trunk_rows()
        time.sleep(0.05)  # polling interval of a bounded wait
    # The cloud link as the edge agent reports it: online, then offline.
    write_link_state(live, "online", time.time())
    wait_rows(live, ("component.up",), lambda _k, d: d["component"] == "cloud-link",
              "the cloud link up")
    write_link_state(live, "offline", time.time(), "cloud unreachable")
    wait_rows(live, ("component.down",), lambda _k, d: d["component"] == "cloud-link",
              "the cloud link down")
    assert trunk_rows() == ["component.up", "component.down", "component.up"]  # changes only

    # The KPI report computes uptime from these rows.
    since = int(live.started_at) - 1
    query = urllib.parse.urlencode({"since": since, "totals": "true"})
    status, report = live.site.api("GET", f"/api/kpi/report?{query}", token=live.token)
    assert status == 200, report
    uptime = {u["component"]: u for u in report["uptime"]}
    assert {"appliance", "trunk", "cloud-link"} <= set(uptime), uptime
    assert uptime["appliance"]["outages"] == 0 and uptime["appliance"]["down"] == 0
    assert uptime["appliance"]["up"] > 0 and uptime["appliance"]["uptime"] == 1.0
    trunk = uptime["trunk"]
    assert trunk["outages"] == 1 and trunk["down"] > 0 and trunk["up"] > 0
    assert 0 < trunk["uptime"] < 1
    assert trunk["longest_outage"] == pytest.approx(trunk["down"])
    link = uptime["cloud-link"]
    downs = [d for _, _, d in rows(live, ("component.down",)) if d["component"] == "cloud-link"]
    assert link["outages"] == len(downs) >= 1 and 0 <= link["uptime"] < 1


def test_a_clean_stop_takes_every_component_down(live: Live) -> None:
    # (Last in the module: it stops the appliance.)
    up_before = {d["component"] for k, _, d in rows(live, ("component.up",))}
    assert {"appliance", "trunk"} <= up_before
    from test_register_peers import stop

    assert stop(live.site.proc) == 0
    last: dict[str, str] = {}
    for kind, _, data in rows(live, ("component.up", "component.down")):
        last[data["component"]] = kind
    assert last == {c: "component.down" for c in last}, last
    [(_, _, appliance)] = [r for r in rows(live, ("component.down",))
                           if r[2]["component"] == "appliance"]
    assert appliance["detail"] == "appliance stopped"
