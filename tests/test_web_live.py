"""The wallboard, live, in a real browser: a carrier call placed by SIPp shows on a supervisor's
wallboard (headless Chromium) within 2 s of its INVITE, then moves through the queue to an
agent's phone (pjsua2, logged in with *70 at the agent desk) and off the board; the page's
pixels are checked from a screenshot.

The INVITE's time is SIPp's own trace of the message it sent; the row's time is taken in the
page by a MutationObserver (same machine, same wall clock). Every other wait is on a DOM
condition with a bounded timeout.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import re
import shutil
import time
from collections.abc import Iterator

import numpy as np
import pytest
from peers import (
    CALLER,
    Carrier,
    HttpPeer,
    HttpRequest,
    agent_phone,
    free_port,
    http_peer,
    sipp,
    sipp_failed,
)
from test_web_pages import HEIGHT, WIDTH, Browser, WebSite, close_web_site, log_in, png_pixels
from test_web_pages import start_web_site as start_site

APPEAR_WITHIN_S = 2.0
OUTSIDE_NUMBER = "15551230000"  # the dial rules of this site allow it without a "+"
pytestmark = [
    pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium missing"),
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(150),
]

# Records, in the page, when each call row first appears (ms since the epoch).
WATCH_ROWS = """
window.firstSeen = {};
new MutationObserver(() => {
  for (const row of document.querySelectorAll('#calls tr[data-call-id]')) {
    if (!(row.dataset.callId in window.firstSeen)) window.firstSeen[row.dataset.callId] = Date.now();
  }
}).observe(document.getElementById('calls'), {childList: true, subtree: true});
true
"""


@pytest.fixture(scope="module")
def carrier_port() -> int:
    return free_port()


CRM_KEY = b"crm-signing-key-0123456789"


def _refuse_first_attempt(path: str, headers: dict[str, str], body: bytes,
                          before: list[HttpRequest]) -> tuple[int, bytes]:
    """A CRM's screen-pop endpoint that answers the first attempt of each delivery 503 (the
    appliance must try again) and the next 204."""
    delivery = headers.get("x-edgecc-delivery")
    return (204 if any(r.headers.get("x-edgecc-delivery") == delivery for r in before)
            else 503), b""


@pytest.fixture(scope="module")
def crm() -> Iterator[HttpPeer]:
    with http_peer(_refuse_first_attempt) as peer:
        yield peer


@pytest.fixture(scope="module")
def site(tmp_path_factory, carrier_port, crm) -> Iterator[WebSite]:
    directory = tmp_path_factory.mktemp("web-live-site")

    def quick(data: dict) -> None:
        # Screen pops go to the CRM receiver, signed, retried quickly.
        key = directory / "crm.key"
        key.write_bytes(CRM_KEY)
        key.chmod(0o600)
        data["webhooks"] = [{"url": f"http://127.0.0.1:{crm.port}/pop", "secret_file": "crm.key",
                             "kinds": ["screen.pop"], "backoff": 0.05, "retries": 3}]
        data["queues"][0]["record"] = False
        # The carrier (SIPp) calls from 127.0.0.2; the agents' phones are on 127.0.0.1.
        # Calls out go to the carrier's SIPp on carrier_port (no OPTIONS keep-alive: its
        # scenario expects an INVITE first).
        data.setdefault("trunk", {}).update(
            allowed_sources=["127.0.0.2/32"], options_interval=None,
            carrier={"host": "127.0.0.1", "port": carrier_port})

    running = start_site(directory, edit=quick)
    try:
        yield running
    finally:
        close_web_site(running)


def invite_sent_at(messages: str) -> float:
    """Unix time SIPp sent its first INVITE, from its ``-trace_msg`` file (local time)."""
    found = re.search(r"-{5,} (\d{4}-\d\d-\d\d)\s+(\d\d:\d\d:\d\d\.\d+)\s*\n[^\n]*message sent"
                      r"[^\n]*\n\s*\nINVITE ", messages)
    assert found is not None, messages[:2000]
    return dt.datetime.fromisoformat(f"{found.group(1)} {found.group(2)}").timestamp()


def test_a_carrier_call_shows_on_the_wallboard_within_two_seconds(site: WebSite, tmp_path
                                                                   ) -> None:
    browser = Browser(tmp_path / "profile")
    try:
        log_in(browser, site, "sue")
        browser.wait_for("location.pathname === '/wallboard.html'", "the wallboard")
        browser.wait_for("document.getElementById('live').textContent === 'live'",
                         "the live event stream")
        with agent_phone(tmp_path, site, site, "answer", talk=3.0) as agent, \
                concurrent.futures.ThreadPoolExecutor(1) as pool:
            # Watched from now on: the agent's own *70 login call is behind us.
            assert browser.eval(WATCH_ROWS) is True
            # The login (*70, at the desk) shows live in the queue's tile.
            tile = "document.querySelector('.tile[data-queue=support]')"
            assert browser.wait_for(
                f"{tile}.querySelector('[data-figure=agents] [data-state=available]')"
                ".textContent", "1001 available in the support tile") == "available 1"
            carrier = pool.submit(sipp, tmp_path, site, "trunk_call", keys={"hangup": "agent"})
            call_id = browser.wait_for("Object.keys(window.firstSeen)[0]", "a call row", 20)
            row = f"document.querySelector('#calls tr[data-call-id=\"{call_id}\"]')"
            assert browser.eval(f"{row}.children[0].textContent") == CALLER
            # Through the menu ("1") into the queue, rung at 1001's phone and answered: the
            # row follows live (call.ringing, queue.connect), while the call lasts.
            browser.wait_for(f"{row} && {row}.children[4].textContent === 'connected' && "
                             f"{row}.children[3].textContent === '1001'",
                             "the call connected to 1001", 30)
            agent.wait("answered")
            # The queue's tile shows its member on the call, live.
            assert browser.wait_for(
                f"{tile}.querySelector('[data-figure=agents] [data-state=on-call]')"
                ".textContent", "1001 on call in the support tile") == "on-call 1"
            agent.wait("disconnected")
            result = carrier.result(timeout=60)
            assert result.returncode == 0, sipp_failed(result, site)
        # Measured from the INVITE SIPp sent to the row in the page's DOM.
        seen_ms = browser.eval(f"window.firstSeen[{call_id!r}]")
        delay = seen_ms / 1000 - invite_sent_at(result.messages)
        assert -0.05 < delay < APPEAR_WITHIN_S, f"row shown {delay:.3f} s after the INVITE"
        # The call leaves the board; the queue's figures count it once, answered.
        browser.wait_for(f"{row} === null", "the call off the board", 20)
        figures = browser.wait_for(
            f"{tile}.querySelector('.figure.muted span').textContent === '1 / 0' && "
            f"{tile}.querySelector('[data-figure=waiting]').textContent", "one answered call")
        assert figures == "0"
        assert browser.eval("document.getElementById('call-count').textContent") == "0"
        shot = browser.screenshot()
        tile_box = browser.eval(f"(r => [r.x, r.y, r.width, r.height])"
                                f"({tile}.getBoundingClientRect())")
    finally:
        browser.close()

    # The screenshot: the page's size, not blank, and the tile is drawn (not one colour).
    pixels = png_pixels(shot)
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    rgb = pixels[:, :, :3].astype(np.int32)
    assert rgb.std() > 10, "blank screenshot"
    x, y, w, h = (int(round(v)) for v in tile_box)
    assert w > 100 and h > 80 and y + h <= HEIGHT and x + w <= WIDTH, tile_box
    region = rgb[y:y + h, x:x + w].reshape(-1, 3)
    colours = np.unique(region, axis=0)
    assert len(colours) > 8, f"tile region has {len(colours)} colours"
    # Its top border is the service-level colour: green (answered within the threshold).
    border = rgb[y + 2, x + w // 2]
    assert border[1] > border[0] and border[1] > border[2], border


def test_a_supervisor_holds_resumes_and_hangs_up_a_live_call_by_api(site: WebSite, crm,
                                                                      tmp_path) -> None:
    token = site.token("sue")
    status, body = site.api("POST", "/api/calls/no-such-call/hangup", token=token)
    assert status == 404 and "no-such-call" in body["error"]
    # The agent's own desk is open while the call comes in: current call and screen pop.
    desk = Browser(tmp_path / "desk-profile")
    try:
        log_in(desk, site, "alex")
        desk.wait_for("location.pathname === '/agent.html' && "
                      "document.getElementById('live').textContent === 'live'", "the desk")
        call_id = _held_call(site, desk, token, tmp_path)
    finally:
        desk.close()
    _check_screen_pops(crm, call_id)


def _check_screen_pops(crm: HttpPeer, call_id: str) -> None:
    """The CRM got the call's screen pop at the offer and again when 1001's phone rang, each
    signed, each refused once and delivered again with the same delivery id."""
    import hmac

    from appliance.webhooks import sign

    def delivered(match) -> HttpRequest:
        """The first screen pop accepted (204) whose payload satisfies ``match``."""
        return crm.wait(lambda r: r.status == 204 and match(r.json()["payload"]))[0]

    offered = delivered(lambda p: p["call_id"] == call_id and p["agent"] is None)
    ringing = delivered(lambda p: p["call_id"] == call_id and p["agent"] == "1001")
    for accepted in (offered, ringing):
        event = accepted.json()
        pop = event["payload"]
        assert (event["kind"], pop["caller"], pop["dialled"], pop["flow"]) == (
            "screen.pop", CALLER, "+15550100", "main"), event
        attempts = [r for r in crm.requests
                    if r.headers["x-edgecc-delivery"] == accepted.headers["x-edgecc-delivery"]]
        assert [r.status for r in attempts] == [503, 204]
        for r in attempts:
            assert hmac.compare_digest(r.headers["x-edgecc-signature"],
                                       sign(CRM_KEY, r.headers["x-edgecc-timestamp"], r.body))
    assert ringing.json()["payload"]["queue"] == "support"


def _held_call(site: WebSite, desk: Browser, token: str, tmp_path) -> str:
    with agent_phone(tmp_path, site, site, "answer", talk=60.0) as agent, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        carrier = pool.submit(sipp, tmp_path, site, "trunk_call", keys={"hangup": "agent"})
        agent.wait("answered")
        # Rang (call.ringing), then answered (queue.connect): "on call".
        shown = desk.wait_for("document.getElementById('call').textContent.startsWith('on call')"
                              " && document.getElementById('call').textContent",
                              "the current call")
        assert shown == f"on call — {CALLER} via support"
        pop = desk.wait_for("[...document.querySelectorAll('#screen-pop dt')].map("
                            "dt => dt.textContent + '=' + dt.nextSibling.textContent)",
                            "the screen pop")
        assert {"caller=" + CALLER, "dialled=+15550100", "flow=main"} <= set(pop), pop

        def connected() -> list[dict]:
            status, body = site.api("GET", "/api/calls", token=token)
            assert status == 200, body
            return [c for c in body["calls"] if c["state"] == "connected"]

        deadline = time.monotonic() + 15
        while not connected():
            assert time.monotonic() < deadline, "the call never showed as connected"
            time.sleep(0.1)
        [call] = connected()
        assert (call["caller"], call["agent"], call["queue"], call["held"]) == (
            CALLER, "1001", "support", False)
        path = f"/api/calls/{call['call_id']}"
        assert site.api("POST", f"{path}/hold", token=token) == (200, {"ok": True})
        assert connected()[0]["held"] is True
        status, body = site.api("POST", f"{path}/hold", token=token)
        assert status == 409, body  # already held: refused, nothing changes
        assert site.api("POST", f"{path}/resume", token=token) == (200, {"ok": True})
        assert connected()[0]["held"] is False
        assert site.api("POST", f"{path}/hangup", token=token) == (200, {"ok": True})
        agent.wait("disconnected")
        result = carrier.result(timeout=60)
        assert result.returncode == 0, sipp_failed(result, site)
    desk.wait_for("document.getElementById('call').textContent === 'No call.'", "the call gone")
    # The outcome of the last call, from the desk.
    desk.eval("document.getElementById('disposition').value = '1'")
    desk.click("#do-disposition")
    assert desk.wait_for("document.getElementById('disposition-result').textContent",
                         "the disposition saved") == "Saved."
    # Each action is in the audit log with who did it.
    rows = site.users.audit_rows(200) if site.users else []
    actions = [r["action"] for r in rows if call["call_id"] in r["detail"]]
    assert {"call_hold", "call_resume", "call_hangup"} <= set(actions), actions
    assert all(r["actor"] == "api:sue" for r in rows if call["call_id"] in r["detail"]
               and r["action"].startswith("call_"))
    return str(call["call_id"])


def test_the_desk_shows_an_agent_on_an_outside_call_as_on_a_call(site: WebSite, carrier_port,
                                                                  tmp_path) -> None:
    # The agent dials out from their phone (a call outside the queues): the router offers
    # them nothing meanwhile, and the desk says so instead of showing them available.
    token = site.token("sue")
    desk = Browser(tmp_path / "desk-profile")
    carrier = Carrier(tmp_path, "callback_customer", calls=1, port=carrier_port)
    try:
        log_in(desk, site, "alex")
        desk.wait_for("location.pathname === '/agent.html' && "
                      "document.getElementById('live').textContent === 'live'", "the desk")
        status, body = site.api("POST", "/api/agents/1001/login", token=token)
        assert status in (200, 409), body  # 409: still logged in from an earlier test
        state = "document.getElementById('state').dataset.state"
        desk.wait_for(f"{state} === 'available'", "available before the call")
        with agent_phone(tmp_path, site, site, f"dial:{OUTSIDE_NUMBER}", talk=5.0) as agent:
            agent.wait("answered", timeout=30)
            desk.wait_for(f"{state} === 'on-call'", "on a call while dialled out")
            assert desk.eval("document.getElementById('reason').textContent") == (
                "(outside call)")
            status, view = site.api("GET", "/api/agents/1001", token=token)
            assert status == 200 and (view["state"], view["presence"], view["outside"]) == (
                "on-call", "available", 1), view
            shot = png_pixels(desk.screenshot())
            assert shot.shape[:2] == (HEIGHT, WIDTH) and shot[..., :3].std() > 10
            agent.wait("closed", timeout=30)
        desk.wait_for(f"{state} === 'available'", "available once the call is over")
        assert desk.eval("document.getElementById('reason').textContent") == ""
        assert carrier.finish() == 0, carrier.text()[-3000:] + site.log_text()[-3000:]
    finally:
        carrier.close()
        desk.close()


def test_click_to_dial_over_the_api_rings_the_agent_then_the_number(site: WebSite,
                                                                     carrier_port,
                                                                     tmp_path) -> None:
    # A supervisor clicks to dial for agent 1001: the phone rings, then the customer (SIPp
    # as the carrier) is called; the call shows in /api/calls as outbound, the agent's view
    # as on a call outside the queues; the request is audited.
    token = site.token("sue")
    status, body = site.api("POST", "/api/calls/dial",
                            {"agent": "1001", "number": "+442071234567"}, token=token)
    assert status == 403, body  # a dial rule (international) refuses before anything rings
    carrier = Carrier(tmp_path, "callback_customer", calls=1, port=carrier_port)
    try:
        with agent_phone(tmp_path, site, site, "idle") as agent:
            status, body = site.api("POST", "/api/calls/dial",
                                    {"agent": "1001", "number": OUTSIDE_NUMBER}, token=token)
            assert status == 200, body
            call_id = body["call_id"]
            assert OUTSIDE_NUMBER in agent.next("incoming", timeout=30)["remote"]
            agent.command("answer")
            agent.next("answered", timeout=30)

            def outbound() -> list[dict]:
                status, listed = site.api("GET", "/api/calls", token=token)
                assert status == 200, listed
                return [c for c in listed["calls"] if c["call_id"] == call_id
                        and c["state"] == "connected"]

            deadline = time.monotonic() + 15
            while not outbound():
                assert time.monotonic() < deadline, "the dialled call never connected"
                time.sleep(0.1)
            [call] = outbound()
            assert (call["agent"], call.get("direction")) == ("1001", "outbound"), call
            status, view = site.api("GET", "/api/agents/1001", token=token)
            assert status == 200 and (view["state"], view["outside"]) == ("on-call", 1), view
            assert site.api("POST", f"/api/calls/{call_id}/hangup", token=token) == (
                200, {"ok": True})
            agent.next("disconnected", timeout=30)
        assert carrier.finish() == 0, carrier.text()[-3000:] + site.log_text()[-3000:]
    finally:
        carrier.close()
    assert site.users is not None
    actions = {(r["actor"], r["action"]) for r in site.users.audit_rows(300)
               if call_id in r["detail"]}
    assert {("api:sue", "call_dial"), ("api:sue", "call_hangup")} <= actions, actions
