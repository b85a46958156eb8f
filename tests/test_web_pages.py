"""The appliance's web pages in a real browser: headless Chromium (Debian ``chromium``) driven
over the Chrome DevTools Protocol, against ``edgecc appliance`` running a demo site.

The checks read the page's DOM (``Runtime.evaluate``) and its pixels (``Page.captureScreenshot``,
decoded here); every wait is on a DOM condition with a bounded timeout. ``Browser`` and
``WebSite`` are shared with test_web_live.py.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import re
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_register_peers import EDGECC, read_line, stop

from appliance.api import Role, UserStore, totp

CHROMIUM = shutil.which("chromium")
PASSWORD = "correct horse battery"
WIDTH, HEIGHT = 1280, 900
START_TIMEOUT_S = 30.0
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium missing"),
    pytest.mark.timeout(120),
]


# --------------------------------------------------------------------------- the browser


class CdpError(RuntimeError):
    """Chromium answered a DevTools command with an error, or a page script threw."""


class Browser:
    """One headless Chromium (own profile, own process) with one page, over its DevTools
    WebSocket. Commands are synchronous; events are kept until asked for."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--disable-background-networking", "--disable-extensions", "--no-first-run",
             "--disable-dev-shm-usage", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []
        try:
            port_file = profile / "DevToolsActivePort"
            deadline = time.monotonic() + START_TIMEOUT_S
            # Chromium writes the port it bound once it listens; nothing else tells us.
            while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start: "
                                       f"{self.proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.05)
            port, path = port_file.read_text().split()[:2]
            # Entered as a context manager (and left in close()): the connection's life.
            self.ws = connect(f"ws://127.0.0.1:{port}{path}", max_size=64 * 1024 * 1024,
                              open_timeout=10).__enter__()
            target = self.send("Target.createTarget", url="about:blank", page=False)
            attached = self.send("Target.attachToTarget", targetId=target["targetId"],
                                 flatten=True, page=False)
            self.session = attached["sessionId"]
            self.send("Page.enable")
            self.send("Runtime.enable")
            self.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                      deviceScaleFactor=1, mobile=False)
        except BaseException:
            self.close()
            raise

    def send(self, method: str, *, page: bool = True, timeout: float = 20.0,
             **params: Any) -> dict[str, Any]:
        """Send one command (to the page's session unless ``page`` is False), return its
        result."""
        ident = next(self._ids)
        message: dict[str, Any] = {"id": ident, "method": method, "params": params}
        if page:
            message["sessionId"] = self.session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if reply.get("id") == ident:
                if "error" in reply:
                    raise CdpError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict[str, Any]:
        """The first kept or coming event named ``method`` (it is removed from the kept ones)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} within {timeout} s")
            with contextlib.suppress(TimeoutError):
                self.events.append(json.loads(self.ws.recv(timeout=left)))

    def goto(self, url: str) -> None:
        """Load ``url`` and wait for its load event."""
        self.events = [e for e in self.events if e["method"] != "Page.loadEventFired"]
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise CdpError(f"{expression[:80]!r} threw: "
                           f"{result['exceptionDetails'].get('exception', {}).get('description')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 10.0) -> Any:
        """Wait (bounded) until ``expression`` is truthy in the page; return its value. While
        the page is still loading the expression may throw: that counts as not yet."""
        deadline = time.monotonic() + timeout
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return null; }} }})()"
        while True:
            value = self.eval(guarded)
            if value:
                return value
            if time.monotonic() > deadline:
                body = self.eval("document.body ? document.body.innerText.slice(0, 1500) : ''")
                pytest.fail(f"timed out waiting for {what}; page {self.eval('location.href')} "
                            f"says:\n{body}")
            time.sleep(0.05)

    def click(self, selector: str) -> None:
        self.eval(f"document.querySelector({json.dumps(selector)}).click()")

    def fill(self, selector: str, value: str) -> None:
        self.eval(f"(e => {{ e.value = {json.dumps(value)}; "
                  f"e.dispatchEvent(new Event('change')); }})"
                  f"(document.querySelector({json.dumps(selector)}))")

    def screenshot(self) -> bytes:
        """The page as PNG."""
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", page=False, timeout=5)
        with contextlib.suppress(Exception):
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def png_pixels(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG (what Chromium writes) as an (h, w, c) array;
    PNG specification §11.2.2 (IHDR), §9 (filters)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    channels = 3 if colour == 2 else 4
    stride = width * channels
    raw = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, stride + 1)
    out = np.zeros((height, stride), dtype=np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        above = out[y - 1] if y else np.zeros(stride, dtype=np.int32)
        if kind == 0:
            out[y] = line
        elif kind == 2:
            out[y] = (line + above) & 0xFF
        else:  # 1 sub, 3 average, 4 Paeth: depend on the left pixel, byte by byte
            row = np.zeros(stride, dtype=np.int32)
            for x in range(stride):
                left = row[x - channels] if x >= channels else 0
                up = above[x]
                if kind == 1:
                    row[x] = (line[x] + left) & 0xFF
                elif kind == 3:
                    row[x] = (line[x] + (left + up) // 2) & 0xFF
                else:
                    corner = above[x - channels] if x >= channels else 0
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                    row[x] = (line[x] + pred) & 0xFF
            out[y] = row
    return out.reshape(height, width, channels).astype(np.uint8)


# --------------------------------------------------------------------------- the appliance


@dataclass
class WebSite:
    """A demo site running under ``edgecc appliance``, with API users of every role."""

    directory: Path
    proc: subprocess.Popen
    url: str
    sip_port: int
    log: Path
    passwords: dict[str, str]
    realm: str
    secrets: dict[str, bytes] = field(default_factory=dict)
    users: UserStore | None = None

    @property
    def port(self) -> int:  # the SIP port, as the SIPp/pjsua helpers expect
        return self.sip_port

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def code(self, name: str) -> str:
        """A TOTP code of ``name`` for the current 30 s step (each is accepted once)."""
        return totp.totp(self.secrets[name], time.time())

    def token(self, name: str) -> str:
        """An API token for ``name`` issued straight from the user store (no login)."""
        assert self.users is not None
        user = next(u for u in self.users.users() if u.name == name)
        return self.users.issue_token(user.id)[0]

    def api(self, method: str, path: str, body: Any = None, *, token: str) -> tuple[int, Any]:
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            self.url + path, method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {token}",
                     **({"Content-Type": "application/json"} if body is not None else {})})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def api_if_match(self, method: str, path: str, body: Any, *, token: str,
                     version: int) -> tuple[int, Any]:
        """A configuration change based on config ``version`` (its If-Match)."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            self.url + path, method=method, data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json",
                     "If-Match": f'"{version}"'})
        try:
            with urllib.request.urlopen(request, timeout=20) as reply:
                return reply.status, json.loads(reply.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")


USERS = {"ada": Role.ADMIN, "sam": Role.SUPERVISOR, "sue": Role.SUPERVISOR, "alex": Role.AGENT}


def start_web_site(directory: Path, edit: Any = None) -> WebSite:
    """``edgecc init --demo`` (two agents) with the users of ``USERS``, then the appliance."""
    import yaml

    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60)
    site_file = directory / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    if edit is not None:
        edit(data)
        site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    creds = json.loads((directory / "demo-credentials.json").read_text())
    users = UserStore.open(directory / "edgecc.db")
    secrets = {}
    for name, role in USERS.items():
        _, secret = users.add_user(name, role, PASSWORD, display_name=name.title())
        if secret is not None:
            secrets[name] = secret
    users.link_agent("alex", "1001")
    log = directory / "appliance.log"
    with open(log, "ab") as err:
        proc = subprocess.Popen([str(EDGECC), "appliance", "--site-dir", str(directory)],
                                stdout=subprocess.PIPE, stderr=err, cwd=directory)
    line = read_line(proc, START_TIMEOUT_S)
    sip = re.search(r"sip=\S*udp:127\.0\.0\.1:(\d+)", line)
    http = re.search(r"http=(\S+)", line)
    if sip is None or http is None:
        stop(proc)
        users.close()
        pytest.fail(f"appliance did not start: {line!r}\n{log.read_text(errors='replace')}")
    return WebSite(directory, proc, http.group(1), int(sip.group(1)), log,
                   {a["user"]: a["password"] for a in creds["accounts"]}, data["sip"]["realm"],
                   secrets, users)


def close_web_site(site: WebSite) -> None:
    stop(site.proc)
    if site.users is not None:
        site.users.close()


def free_port_pair() -> int:
    """A port free for both UDP and TCP on 127.0.0.1, outside the media ports (SIP listens on
    both transports)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        if not 20000 <= port <= 29999:
            return port
    raise RuntimeError("no free port")


def fixed_ports(data: dict) -> None:
    """Fixed SIP and HTTP ports: the appliance keeps them across the restarts that load
    configuration changes (with port 0 each start would bind new ones)."""
    data["sip"]["udp_port"] = data["sip"]["tcp_port"] = free_port_pair()
    data["http"]["port"] = free_port_pair()


def running_version(site: WebSite) -> int:
    """The config version the appliance runs (/health), -1 while it is restarting."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(site.url + "/health", timeout=10) as reply:
            return int(json.loads(reply.read())["config_version"])
    except (urllib.error.URLError, ConnectionError):
        return -1


def wait_until_running(site: WebSite, version: int, within: float = 60.0) -> None:
    """Read the start-up lines of the restarts until the appliance runs ``version`` (same
    process, same ports)."""
    deadline = time.monotonic() + within
    while running_version(site) != version:
        line = read_line(site.proc, max(0.0, deadline - time.monotonic()))
        assert line, f"the appliance did not load version {version}:\n{site.log_text()[-3000:]}"
        assert re.search(rf"sip=\S*udp:127\.0\.0\.1:{site.sip_port}\b", line), line
        assert site.proc.poll() is None


def log_in(browser: Browser, site: WebSite, name: str, password: str = PASSWORD) -> None:
    """Fill and send the login form (with a fresh TOTP code for admins and supervisors)."""
    browser.goto(site.url + "/")
    browser.wait_for("document.getElementById('login') !== null", "the login form")
    browser.fill("#name", name)
    browser.fill("#password", password)
    if name in site.secrets:
        browser.fill("#totp", site.code(name))
    browser.click("#submit")


def open_as(browser: Browser, site: WebSite, name: str, page: str) -> None:
    """Open ``page`` with a session of ``name`` put in the tab as the login page would (a
    token from the user store): for a second login of an admin or supervisor within the 30 s
    their TOTP code is valid, which the API rightly refuses as a replay."""
    browser.goto(site.url + "/")
    role = USERS[name].value
    session = {"token": site.token(name), "name": name, "role": role,
               "expires_at": time.time() + 3600}
    browser.eval(f"sessionStorage.setItem('edgecc.session', {json.dumps(json.dumps(session))})")
    browser.goto(site.url + "/" + page)


# --------------------------------------------------------------------------- tests


PAUSE_ALERT_S = 1.0
"""agent_paused fires this soon here, so the banner test need not wait long."""


def _quick_pause_alert(data: dict) -> None:
    data.setdefault("alerts", {})["agent_paused"] = {"above": PAUSE_ALERT_S, "clear_after": 0}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[WebSite]:
    running = start_web_site(tmp_path_factory.mktemp("web-site"), edit=_quick_pause_alert)
    try:
        yield running
    finally:
        close_web_site(running)


@pytest.fixture
def browser(tmp_path) -> Iterator[Browser]:
    opened = Browser(tmp_path / "profile")
    try:
        yield opened
    finally:
        opened.close()


def test_pages_are_served_from_the_appliance_itself(site: WebSite, browser: Browser) -> None:
    browser.goto(site.url + "/")
    assert browser.eval("document.title") == "edgecc — log in"
    # Every script and stylesheet comes from the appliance: no CDN, no inline script.
    sources = browser.eval("[...document.querySelectorAll('script,link[rel=stylesheet]')]"
                           ".map(e => e.src || e.href)")
    assert sources and all(s.startswith(site.url + "/") for s in sources), sources
    assert browser.eval("[...document.scripts].every(s => s.src)")
    for page in ("wallboard.html", "agent.html", "admin.html", "app.js", "style.css"):
        status = browser.eval(f"fetch('/{page}').then(r => r.status)")
        assert status == 200, page
    headers = browser.eval("fetch('/').then(r => r.headers.get('content-security-policy'))")
    assert "default-src 'self'" in headers
    # The API keeps its own answers next to the pages.
    assert browser.eval("fetch('/api/me').then(r => r.status)") == 401
    assert browser.eval("fetch('/health').then(r => r.json()).then(j => [j.status, j.trunk])"
                        ) == ["ok", None]  # no carrier configured


def test_login_refuses_a_wrong_password_then_logs_in_with_totp(site: WebSite,
                                                                browser: Browser) -> None:
    log_in(browser, site, "sam", password="not the password")
    assert browser.wait_for("document.getElementById('error').textContent",
                            "the error message") == "wrong name, password or code"
    assert browser.eval("location.pathname") == "/"
    # Straight to a page without a session: back to the login.
    browser.goto(site.url + "/wallboard.html")
    browser.wait_for("location.pathname === '/index.html'", "the redirect to the login page")
    log_in(browser, site, "sam")
    browser.wait_for("location.pathname === '/wallboard.html'", "the wallboard")
    assert browser.wait_for("document.getElementById('live').textContent === 'live' && "
                            "document.getElementById('who').textContent",
                            "the live event stream") == "sam (supervisor)"
    # A supervisor sees the wallboard links but not the admin page's.
    assert browser.eval("document.querySelector('a[href=\"admin.html\"]').hidden") is True
    states = browser.wait_for("[...document.querySelectorAll('#states [data-state]')]"
                              ".map(e => e.dataset.state)", "the agent states")
    assert set(states) == {"logged-out", "available", "paused", "on-call", "on-hold",
                           "wrap-up"}
    browser.click("#logout")
    browser.wait_for("location.pathname === '/index.html'", "the login page after logout")
    assert browser.eval("sessionStorage.getItem('edgecc.session')") is None


def test_an_agents_state_changes_by_a_click(site: WebSite, browser: Browser) -> None:
    log_in(browser, site, "alex")  # an agent: no TOTP
    browser.wait_for("location.pathname === '/agent.html'", "the agent desk")
    browser.wait_for("document.getElementById('agent').value === '1001'",
                     "the linked extension")
    browser.wait_for("document.querySelectorAll('#pause-reason option').length === 3",
                     "the pause reasons")
    # The state shown, once no request of the page is in flight (its buttons are enabled
    # again): the live event of a change may show it before the click's own answer is in.
    state = ("!document.getElementById('do-pause').disabled && "
             "document.getElementById('state').dataset.state")
    browser.wait_for(f"{state} === 'logged-out'", "the agent logged out at first")
    token = site.token("sue")

    def presence() -> tuple[str, str | None]:
        status, body = site.api("GET", "/api/agents/1001", token=token)
        assert status == 200, body
        return body["presence"], body["reason"]

    browser.click("#do-login")
    browser.wait_for(f"{state} === 'available'", "available after the login click")
    assert presence() == ("available", None)
    browser.eval("document.getElementById('pause-reason').value = '2'")
    browser.click("#do-pause")
    browser.wait_for(f"{state} === 'paused'", "paused after the pause click")
    assert browser.eval("document.getElementById('reason').textContent") == "(lunch)"
    assert presence() == ("paused", "lunch")
    browser.click("#do-unpause")
    browser.wait_for(f"{state} === 'available'", "available after unpausing")
    browser.click("#do-logout")
    browser.wait_for(f"{state} === 'logged-out'", "logged out after the click")
    assert presence() == ("logged-out", None)
    # Pausing while logged out is refused by the desk; the page shows why.
    browser.click("#do-pause")
    message = browser.wait_for("document.getElementById('error').textContent",
                               "the refusal")
    assert "logged" in message
    # An agent may not act on another extension: the field is read-only for them.
    assert browser.eval("document.getElementById('agent').readOnly") is True


def test_an_alert_shows_on_the_wallboard_banner_and_clears(site: WebSite,
                                                            browser: Browser) -> None:
    # An agent paused longer than alerts.agent_paused.above: the alert goes to the event log,
    # /api/alerts and the live stream, and the wallboard's banner shows it until it clears.
    log_in(browser, site, "sue")  # (sam's code of this 30 s step may be spent already)
    browser.wait_for("location.pathname === '/wallboard.html' && "
                     "document.getElementById('live').textContent === 'live'", "the wallboard")
    banner = "document.getElementById('alerts')"
    assert browser.eval(f"{banner}.classList.contains('on')") is False
    # The chart has a line per queue, in the colour its legend names.
    colour = browser.wait_for("(e => e && e.dataset.colour)(document.querySelector("
                              "'#chart-legend [data-queue=support]'))", "the chart's legend")
    red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    # (A line needs two samples: the page samples every second.)
    browser.wait_for(f"""(() => {{
        const c = document.getElementById('chart'), d = c.getContext('2d')
            .getImageData(0, 0, c.width, c.height).data;
        let n = 0;
        for (let i = 0; i < d.length; i += 4)
            if (Math.abs(d[i] - {red}) + Math.abs(d[i + 1] - {green})
                + Math.abs(d[i + 2] - {blue}) < 30) n++;
        return n > 20; }})()""", "the support line drawn")
    token = site.token("sue")
    status, body = site.api("POST", "/api/agents/1002/login", token=token)
    assert status in (200, 409), body
    status, body = site.api("POST", "/api/agents/1002/pause", {"reason": "1"}, token=token)
    assert status == 200, body
    shown = browser.wait_for(f"{banner}.classList.contains('on') && {banner}.textContent",
                             "the alert banner")
    assert "1002" in shown, shown
    status, active = site.api("GET", "/api/alerts", token=token)
    assert status == 200 and [a["rule"] for a in active["alerts"]] == ["agent_paused"], active
    pixels = png_pixels(browser.screenshot())
    box = browser.eval(f"(r => [r.top, r.bottom, r.left, r.right])({banner}"
                       ".getBoundingClientRect())")
    top, bottom, left, right = (int(v) for v in box)
    assert bottom > top and right > left
    strip = pixels[top:bottom, left:right, :3].astype(int)
    assert strip.std() > 10, "the banner is drawn blank"  # text on the banner's colour
    status, body = site.api("POST", "/api/agents/1002/unpause", token=token)
    assert status == 200, body
    browser.wait_for(f"!{banner}.classList.contains('on')", "the banner cleared", timeout=20)
    import sqlite3

    def logged() -> list[str]:
        conn = sqlite3.connect(f"file:{site.directory / 'edgecc.db'}?mode=ro", uri=True,
                               timeout=5)
        try:
            return [k for (k,) in conn.execute(
                "SELECT kind FROM events WHERE kind LIKE 'alert.%' ORDER BY seq")]
        finally:
            conn.close()

    # The rows are written by a worker thread: wait (bounded) for both.
    deadline = time.monotonic() + 10
    while (kinds := logged())[-2:] != ["alert.raised", "alert.cleared"]:
        assert time.monotonic() < deadline, kinds
        time.sleep(0.1)
    site.api("POST", "/api/agents/1002/logout", token=token)


def test_the_wallboard_shows_the_cloud_link_as_the_edge_agent_reports_it(
        site: WebSite, browser: Browser) -> None:
    # The edge agent's link-state row (edge_agent/relay.py writes it every state interval):
    # online, then offline; then an "online" row the agent stopped renewing (a dead agent),
    # which the wallboard must show as offline, not believe.
    import sqlite_utils

    from appliance import eventlog

    def agent_reports(state: str, updated_at: float) -> None:
        db = sqlite_utils.Database(site.directory / "edgecc.db")
        try:
            eventlog.write_link_state(db, eventlog.LinkState(
                state, updated_at - 1, 0, 0, 0.0, "", 0, 0, 0, updated_at))
        finally:
            db.close()

    open_as(browser, site, "sue", "wallboard.html")  # (sue logged in by the form just before)
    browser.wait_for("document.getElementById('live').textContent === 'live'", "the wallboard")
    pill = "document.getElementById('link')"
    agent_reports("online", time.time())
    browser.wait_for(f"{pill}.textContent === 'cloud: online' && "
                     f"{pill}.classList.contains('available')", "the link shown online")
    agent_reports("offline", time.time())
    browser.wait_for(f"{pill}.textContent === 'cloud: offline' && "
                     f"{pill}.classList.contains('offline')", "the link shown offline")
    agent_reports("online", time.time())
    browser.wait_for(f"{pill}.textContent === 'cloud: online'", "the link online again")
    agent_reports("online", time.time() - 3600)  # the agent's last word, an hour ago
    browser.wait_for(f"{pill}.textContent === 'cloud: offline'", "a silent agent's link offline")
    status, health = site.api("GET", "/health", token=site.token("sue"))
    assert status == 200 and health["link"] == "offline", health


def test_admin_sees_queues_and_agents_and_flow_errors_by_line(site: WebSite, browser: Browser,
                                                              tmp_path: Path) -> None:
    log_in(browser, site, "ada")
    browser.wait_for("location.pathname === '/wallboard.html'", "the wallboard")
    browser.goto(site.url + "/admin.html")
    browser.wait_for("document.querySelector('#queues tr[data-queue=support]') !== null",
                     "the support queue")
    members = browser.eval("document.querySelector('#queues tr[data-queue=support]')"
                           ".children[2].textContent")
    assert members == "1001, 1002"
    assert browser.eval("[...document.querySelectorAll('#agents tr')].map(r => "
                        "r.dataset.agent + ':' + r.children[3].textContent)") == [
        "1001:support", "1002:support"]
    assert browser.wait_for("document.getElementById('health').dataset.status",
                            "the health line") == "ok"
    flows = tmp_path / "flows.yaml"
    flows.write_text("flows:\n  main:\n    start: hello\n    nodes:\n"
                     "      hello: {type: play, prompt: no-such-prompt, next: q}\n"
                     "      q: {type: queue, queue: no-such-queue}\n")
    node = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", nodeId=node, selector="#flow-file")["nodeId"]
    browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(flows)])
    browser.click("#flow-check")
    problems = browser.wait_for("[...document.querySelectorAll('#flow-problems li')]"
                                ".map(li => li.textContent)", "the flow problems")
    assert len(problems) == 2, problems
    assert problems[0].startswith("line 5: flow main node hello: ")
    assert "no-such-prompt" in problems[0]
    assert problems[1].startswith("line 6: flow main node q: ") and "no-such-queue" in (
        problems[1])
    assert browser.eval("document.getElementById('flow-result').textContent") == (
        "2 problem(s):")


@pytest.fixture(scope="module")
def editable_site(tmp_path_factory) -> Iterator[WebSite]:
    running = start_web_site(tmp_path_factory.mktemp("web-admin-site"), edit=fixed_ports)
    try:
        yield running
    finally:
        close_web_site(running)


def test_admin_changes_queues_agents_skills_and_flows_with_errors_shown(
        editable_site: WebSite, browser: Browser, tmp_path: Path) -> None:
    site = editable_site
    log_in(browser, site, "ada")
    browser.wait_for("location.pathname === '/wallboard.html'", "the wallboard")
    browser.goto(site.url + "/admin.html")
    browser.wait_for("document.querySelector('#queues tr[data-queue=support]') !== null",
                     "the support queue")
    version = "document.getElementById('config-version').dataset.version"
    assert browser.wait_for(version, "the config version") == "0"
    error = "document.getElementById('{}').textContent"

    def submit(form: str) -> None:
        browser.eval(f"document.getElementById({json.dumps(form)}).requestSubmit()")

    # A queue with an unknown member is refused: the message names the member, the field is
    # marked, nothing is written.
    browser.fill("#q-name", "sales")
    browser.fill("#q-members", "1001, 1009")
    submit("queue-form")
    message = browser.wait_for(error.format("queue-error"), "the queue refusal")
    assert message.startswith("queues[1].members[1]: ") and "1009" in message
    assert browser.eval("document.getElementById('q-members').getAttribute('aria-invalid')"
                        ) == "true"
    assert browser.eval(version) == "0" and running_version(site) == 0
    browser.fill("#q-members", "1001")
    submit("queue-form")
    browser.wait_for(f"{version} === '1'", "version 1")
    assert browser.wait_for("document.querySelector('#queues tr[data-queue=sales]')"
                            " && document.querySelector('#queues tr[data-queue=sales]')"
                            ".children[2].textContent", "the sales row") == "1001"
    wait_until_running(site, 1)

    # An agent with a skill the site does not have: refused, naming the skill.
    browser.fill("#a-user", "1003")
    browser.fill("#a-name", "Agent 1003")
    browser.fill("#a-queues", "sales")
    browser.fill("#a-skills", "french:5")
    browser.fill("#a-password", "new-phone-secret")
    submit("agent-form")
    message = browser.wait_for(error.format("agent-error"), "the agent refusal")
    assert "skills.french" in message and "french" in message
    assert browser.eval("document.getElementById('a-skills').getAttribute('aria-invalid')"
                        ) == "true"
    assert browser.eval("document.getElementById('a-password').value") == ""
    # The skill added, the agent saved.
    browser.fill("#s-name", "french")
    browser.fill("#s-description", "French speakers")
    submit("skill-form")
    browser.wait_for(f"{version} === '2'", "version 2")
    wait_until_running(site, 2)
    browser.fill("#a-password", "new-phone-secret")
    submit("agent-form")
    browser.wait_for(f"{version} === '3'", "version 3")
    row = "document.querySelector('#agents tr[data-agent=\"1003\"]')"
    assert browser.wait_for(f"{row} && [...{row}.children].slice(0, 5).map(c => c.textContent)",
                            "the new agent's row") == [
        "1003", "Agent 1003", "agent", "sales", "french:5"]
    assert browser.wait_for("document.querySelector('#skills tr[data-skill=french]')"
                            ".children[2].textContent", "the skill's agents") == "1003:5"
    assert "new-phone-secret" not in (site.directory / "site.yaml").read_text()
    wait_until_running(site, 3)

    # Deleting the queue the IVR routes to is refused (two clicks: delete, confirm).
    delete = ("document.querySelector('#queues tr[data-queue=support]')"
              ".querySelector('button:last-child')")
    browser.eval(f"{delete}.click()")
    assert browser.eval(f"{delete}.textContent") == "Confirm delete"
    browser.eval(f"{delete}.click()")
    message = browser.wait_for(error.format("queue-error"), "the delete refusal")
    assert "'main'" in message and "support" in message

    # A flow file with problems is not installed; each problem shows with its line and key.
    flows = tmp_path / "flows.yaml"
    flows.write_text("flows:\n  sales_line:\n    start: hello\n    nodes:\n"
                     "      hello: {type: play, prompt: no-such-prompt, next: q}\n"
                     "      q: {type: queue, queue: no-such-queue}\n")
    node = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", nodeId=node, selector="#flow-file")["nodeId"]
    browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(flows)])
    browser.click("#flow-install")
    problems = browser.wait_for("document.querySelectorAll('#flow-problems li').length === 2 &&"
                                " [...document.querySelectorAll('#flow-problems li')]"
                                ".map(li => li.textContent)", "the flow problems")
    assert problems[0].startswith("line 5: flows.sales_line.hello: ")
    assert problems[1].startswith("line 6: flows.sales_line.q: ")
    assert browser.eval(version) == "3"
    flows.write_text("flows:\n  sales_line:\n    start: q\n    nodes:\n"
                     "      q: {type: queue, queue: sales}\n")
    browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(flows)])
    browser.click("#flow-install")
    assert browser.wait_for("document.getElementById('flow-result').textContent.startsWith("
                            "'Installed') && document.getElementById('flow-result').textContent",
                            "the installed flows") == "Installed flows sales_line as version 4."
    assert browser.wait_for("document.getElementById('flow-list').textContent === "
                            "'main, sales_line'", "the flow list")
    wait_until_running(site, 4)


def test_admin_sets_a_queues_overflow_relaxation_penalties_and_weights(
        editable_site: WebSite, browser: Browser) -> None:
    site = editable_site
    admin = site.token("ada")
    open_as(browser, site, "ada", "admin.html")
    browser.wait_for("document.querySelector('#queues tr[data-queue=support]') !== null",
                     "the support queue")
    version = "document.getElementById('config-version').dataset.version"
    start = int(browser.wait_for(version, "the config version"))
    error = "document.getElementById('queue-error').textContent"

    def submit() -> None:
        browser.eval("document.getElementById('queue-form').requestSubmit()")

    def invalid(selector: str) -> str | None:
        return browser.eval(f"document.querySelector({json.dumps(selector)})"
                            ".getAttribute('aria-invalid')")

    def refused(selector: str, what: str) -> str:
        browser.eval("document.getElementById('queue-error').textContent = ''")
        submit()
        message = browser.wait_for(f"{error} && document.querySelector("
                                   f"{json.dumps(selector)}).getAttribute('aria-invalid') "
                                   f"=== 'true' && {error}", what)
        assert browser.eval(version) == str(start)  # nothing written
        return message

    browser.fill("#q-name", "overflowq")
    browser.fill("#q-members", "1001, 1002")
    # A penalty for someone who is not a member: refused, naming the member's key.
    browser.fill("#q-penalties", "1009:5")
    message = refused("#q-penalties", "the penalty refusal")
    assert re.match(r"queues\[\d+\]\.penalties\.1009: expected a member", message), message
    # A relaxation step dropping a skill the queue does not require.
    browser.fill("#q-penalties", "1002:5")
    browser.fill("#q-relax", "30:1:french")
    message = refused("#q-relax", "the relaxation refusal")
    assert message.startswith("relax.0.drop: ") and "french" in message
    assert invalid("#q-penalties") is None  # only the field at fault is marked
    # An overflow target that is no queue.
    browser.fill("#q-relax", "30:1")
    browser.eval("document.getElementById('q-join-empty').value = 'unstaffed'")
    browser.fill("#q-overflow", "nowhere")
    message = refused("#q-overflow", "the overflow refusal")
    assert re.match(r"queues\[\d+\]\.overflow: ", message) and "nowhere" in message, message

    browser.fill("#q-overflow", "support")
    browser.eval("document.getElementById('q-leave-empty').value = 'unavailable'")
    browser.fill("#q-max-length", "5")
    browser.fill("#q-max-est-wait", "120")
    browser.fill("#q-rejoin", "60")
    browser.fill("#q-weights", "1001:3, 1002:1")
    submit()
    browser.wait_for(f"{version} === '{start + 1}'", "the queue saved")
    wait_until_running(site, start + 1)
    status, body = site.api("GET", "/api/config/queues/overflowq", token=admin)
    assert status == 200, body
    queue = body["queue"]
    assert {k: queue[k] for k in ("members", "penalties", "weights", "max_length",
                                  "max_estimated_wait", "join_empty", "leave_empty",
                                  "overflow", "rejoin_window", "relax")} == {
        "members": ["1001", "1002"], "penalties": {"1002": 5}, "weights": {"1001": 3, "1002": 1},
        "max_length": 5, "max_estimated_wait": 120.0, "join_empty": "unstaffed",
        "leave_empty": "unavailable", "overflow": "support", "rejoin_window": 60.0,
        "relax": [{"after": 30.0, "lower_by": 1, "drop": []}]}
    row = "document.querySelector('#queues tr[data-queue=overflowq]')"
    assert browser.wait_for(f"{row} && {row}.children[8].textContent", "the overflow column") == (
        "over 5 waiting, est. wait over 120 s, join unstaffed, leave unavailable → support")

    # A key the form has no input for (set through the API) survives an edit in the page.
    queue["announce_every"] = 45.0
    status, body = site.api_if_match("PUT", "/api/config/queues/overflowq", queue,
                                     token=admin, version=start + 1)
    assert status == 200, body
    wait_until_running(site, start + 2)
    browser.goto(site.url + "/admin.html")
    browser.wait_for(f"{version} === '{start + 2}' && {row} !== null", "the list again")
    browser.eval(f"{row}.querySelector('button').click()")  # Edit
    assert browser.wait_for("document.getElementById('q-penalties').value", "the form filled"
                            ) == "1002:5"
    assert browser.eval("[document.getElementById('q-relax').value, "
                        "document.getElementById('q-join-empty').value, "
                        "document.getElementById('q-overflow').value]") == [
        "30:1", "unstaffed", "support"]
    browser.fill("#q-max-length", "7")
    submit()
    browser.wait_for(f"{version} === '{start + 3}'", "the edit saved")
    wait_until_running(site, start + 3)
    queue = site.api("GET", "/api/config/queues/overflowq", token=admin)[1]["queue"]
    assert (queue["max_length"], queue["announce_every"], queue["penalties"]) == (
        7, 45.0, {"1002": 5})
