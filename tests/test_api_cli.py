"""``edgecc users add|list``: the password comes from stdin, the TOTP secret is shown once."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from test_cli import EDGECC, STARTUP, STOP_TIMEOUT_S, needs_sip_stack, read_startup_line

from appliance.api import Role, UserStore, totp
from appliance.api.cli import main
from appliance.config import load_site
from appliance.site_init import SiteSpec, create_site

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "a long enough password"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    create_site(tmp_path / "site", SiteSpec(agents=1, tls_port=None))
    return tmp_path / "site"


def run_cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "appliance.api.cli", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_add_admin_prints_the_secret_once_and_it_logs_in(site: Path) -> None:
    done = run_cli("users", "add", "--site-dir", str(site), "--name", "ada", "--role", "admin",
                   "--display-name", "Ada L.", stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    secret_text = re.search(r"secret: ([A-Z2-7]+)", done.stdout)[1]  # type: ignore[index]
    uri = re.search(r"uri:\s+(\S+)", done.stdout)[1]  # type: ignore[index]
    assert parse_qs(urlsplit(uri).query)["secret"] == [secret_text]
    secret = totp.secret_from_base32(secret_text)

    store = UserStore.open(load_site(site).storage.database)
    try:
        [user] = store.users()
        assert (user.name, user.role, user.display_name, user.two_factor) == (
            "ada", Role.ADMIN, "Ada L.", True)
        assert store.login("ada", PASSWORD, None, "test").outcome.value == "invalid"
        ok = store.login("ada", PASSWORD, totp.totp(secret, time.time()), "test")
        assert ok.outcome.value == "ok" and ok.principal and ok.principal.role is Role.ADMIN
        actions = [(r["actor"].split(":")[0], r["action"]) for r in store.audit_rows()]
        assert ("cli", "api_user_added") in actions
    finally:
        store.close()

    listed = run_cli("users", "list", "--site-dir", str(site), stdin="")
    assert listed.returncode == 0
    assert listed.stdout.split("\t")[:3] == ["ada", "admin", "2fa"]
    assert secret_text not in listed.stdout


def test_agent_gets_no_secret(site: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PASSWORD + "\r\n"))
    assert main(["users", "add", "--site-dir", str(site), "--name", "alex",
                 "--role", "agent"]) == 0
    out = capsys.readouterr().out
    assert "created agent 'alex'" in out and "secret" not in out


@pytest.mark.parametrize(("args", "stdin", "code", "message"), [
    (["--name", "x", "--role", "agent"], "", 2, "no password on stdin"),
    (["--name", "x", "--role", "agent"], "short\n", 2, "at least 10 characters"),
    (["--name", "bad name", "--role", "agent"], PASSWORD + "\n", 2, "name must be"),
    (["--name", "x", "--role", "root"], PASSWORD + "\n", 2, "invalid choice"),
])
def test_bad_input_changes_nothing(site: Path, args: list[str], stdin: str, code: int,
                                   message: str) -> None:
    done = run_cli("users", "add", "--site-dir", str(site), *args, stdin=stdin)
    assert done.returncode == code and message in done.stderr, done.stderr
    listed = run_cli("users", "list", "--site-dir", str(site), stdin="")
    assert listed.stdout == ""


def test_existing_name_is_refused(site: Path) -> None:
    args = ("users", "add", "--site-dir", str(site), "--name", "sam", "--role", "supervisor")
    assert run_cli(*args, stdin=PASSWORD + "\n").returncode == 0
    again = run_cli(*args, stdin="another password!\n")
    assert again.returncode == 1 and "already exists" in again.stderr


def test_missing_site_is_a_clear_error(tmp_path: Path) -> None:
    done = run_cli("users", "list", "--site-dir", str(tmp_path / "nowhere"), stdin="")
    assert done.returncode == 1 and "site" in done.stderr


def _post_json(url: str, body: dict, token: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read() or b"null")


@needs_sip_stack
def test_the_appliance_serves_the_api(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init = subprocess.run([EDGECC, "init", "--demo", "--site-dir", str(site), "--sip-port", "0",
                           "--http-port", "0", "--agents", "2"], capture_output=True, text=True,
                          timeout=60)
    assert init.returncode == 0, init.stderr
    added = run_cli("users", "add", "--site-dir", str(site), "--name", "ada", "--role",
                    "admin", stdin=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    secret = totp.secret_from_base32(re.search(r"secret: ([A-Z2-7]+)", added.stdout)[1])  # type: ignore[index]

    proc = subprocess.Popen([EDGECC, "appliance", "--site-dir", str(site)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        match = STARTUP.match(read_startup_line(proc))
        assert match
        url = match["http"]
        status, session = _post_json(url + "/api/login", {
            "name": "ada", "password": PASSWORD, "totp": totp.totp(secret, time.time())})
        assert status == 200 and session["role"] == "admin"
        request = urllib.request.Request(url + "/api/config/accounts",
                                         headers={"Authorization": f"Bearer {session['token']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            accounts = json.loads(response.read())
        assert [a["user"] for a in accounts["sip_accounts"]] == ["1001", "1002"]
        assert [u["name"] for u in accounts["api_users"]] == ["ada"]
        assert _post_json(url + "/api/logout", {}, session["token"])[0] == 204
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=STOP_TIMEOUT_S) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    store = UserStore.open(load_site(site).storage.database)
    try:
        actions = [r["action"] for r in reversed(store.audit_rows())]
    finally:
        store.close()
    assert actions == ["api_user_added", "start", "login_ok", "logout", "stop"]
