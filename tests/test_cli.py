"""The real ``edgecc`` console script, run as a subprocess: init, appliance, doctor."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pty
import random
import re
import selectors
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.config import load_site
from appliance.doctor import ClockSample, Level, check_clock, check_tls
from appliance.site_init import make_certificate
from appliance.store import MIGRATIONS, open_site_db

EDGECC = str(Path(sys.executable).parent / "edgecc")
SIPP_REGISTER = Path(__file__).parent / "sipp" / "register_digest.xml"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0  # generous: the appliance aims at 2 s, timings never decide a test


def edgecc(*args: str, stdin: int | None = subprocess.DEVNULL) -> subprocess.CompletedProcess:
    return subprocess.run(
        [EDGECC, *args], stdin=stdin, capture_output=True, text=True, timeout=60
    )


def _port_free(port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_sip_ports() -> int:
    """A port P free for UDP and TCP, with P+1 free for TCP (TLS)."""
    for _ in range(50):
        port = free_tcp_port()
        if port < 65535 and _port_free(port, socket.SOCK_DGRAM) and _port_free(
            port + 1, socket.SOCK_STREAM
        ):
            return port
    raise RuntimeError("no free SIP port pair found")


def rtp_range() -> str:
    # Below the kernel's ephemeral range, so other tests' port-0 sockets never land in it.
    low = random.randrange(10000, 19000, 2)
    return f"{low}-{low + 199}"


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every file below ``directory`` with mode, size, mtime and content hash."""
    result = {}
    for path in sorted(directory.rglob("*")):
        info = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        result[str(path.relative_to(directory))] = (
            stat.S_IMODE(info.st_mode), info.st_size, info.st_mtime_ns, digest,
        )
    return result


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def init_demo(site: Path, *extra: str) -> subprocess.CompletedProcess:
    result = edgecc(
        "init", "--demo", "--site-dir", str(site), "--sip-port", str(free_sip_ports()),
        "--http-port", str(free_tcp_port()), "--rtp-ports", rtp_range(), *extra,
    )
    assert result.returncode == 0, result.stderr
    return result


# --------------------------------------------------------------------------- init


def test_init_demo_writes_a_complete_private_site(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    result = init_demo(site, "--agents", "5")
    assert "demo-credentials.json" in result.stdout

    for name in ("site.yaml", "site.key", "demo-credentials.json", "tls/sip.key"):
        assert mode_of(site / name) == 0o600, name
    assert (site / "site.key").stat().st_size == 32
    assert not list(site.rglob(".*.tmp-*"))

    credentials = json.loads((site / "demo-credentials.json").read_text())
    config = load_site(site)
    assert credentials["realm"] == config.sip.realm == "edgecc.local"
    assert credentials["sip"]["address"] == "127.0.0.1"
    assert credentials["sip"]["ports"] == {
        "udp": config.sip.udp_port, "tcp": config.sip.tcp_port, "tls": config.sip.tls_port,
    }
    assert credentials["trunk"]["allowed_sources"] == ["127.0.0.1/32"]
    users = [a["user"] for a in credentials["accounts"]]
    assert users == ["1001", "1002", "1003", "1004", "1005"]

    text = (site / "site.yaml").read_text()
    accounts = config.sip.accounts_by_user
    for account in credentials["accounts"]:
        password = account["password"]
        assert len(password) >= 12
        assert password not in text
        material = f"{account['user']}:{config.sip.realm}:{password}".encode()
        assert accounts[account["user"]].ha1_md5 == hashlib.md5(material).hexdigest()
        assert accounts[account["user"]].ha1_sha256 == hashlib.sha256(material).hexdigest()
    assert "password" not in text.lower().replace("passwords are never stored", "")

    cert = x509.load_pem_x509_certificate((site / "tls/sip.crt").read_bytes())
    key = serialization.load_pem_private_key((site / "tls/sip.key").read_bytes(), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_init_demo_defaults_to_twenty_agents(tmp_path: Path) -> None:
    init_demo(tmp_path / "demo")
    users = [a.user for a in load_site(tmp_path / "demo").sip.accounts]
    assert users == [str(n) for n in range(1001, 1021)]


def test_init_refuses_to_overwrite_unless_forced_and_force_keeps_site_key(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init_demo(site)
    before = snapshot(site)

    again = edgecc("init", "--demo", "--site-dir", str(site))
    assert again.returncode == 1
    assert "already holds a site" in again.stderr and "--force" in again.stderr
    assert snapshot(site) == before

    old_passwords = (site / "demo-credentials.json").read_text()
    forced = init_demo(site, "--force")
    assert "kept" in forced.stdout
    after = snapshot(site)
    assert after["site.key"] == before["site.key"]  # recordings stay decryptable
    assert after["tls/sip.key"][3] != before["tls/sip.key"][3]
    assert (site / "demo-credentials.json").read_text() != old_passwords


def test_init_without_demo_and_without_a_terminal_names_missing_flags(tmp_path: Path) -> None:
    site = tmp_path / "paris"
    result = edgecc("init", "--site-dir", str(site), "--realm", "paris.example.com")
    assert result.returncode == 2
    assert "missing --site-id, --bind" in result.stderr
    assert "not a terminal" in result.stderr
    assert not site.exists()


def test_init_from_flags(tmp_path: Path) -> None:
    site = tmp_path / "paris"
    result = edgecc(
        "init", "--site-dir", str(site), "--site-id", "paris-1", "--realm", "paris.example.com",
        "--bind", "127.0.0.1", "--timezone", "Europe/Paris", "--sip-port", "5070", "--no-tls",
        "--agents", "2", "--first-extension", "2001", "--trunk-source", "192.0.2.0/24",
    )
    assert result.returncode == 0, result.stderr
    config = load_site(site)
    assert (config.site.id, config.site.timezone, config.sip.realm) == (
        "paris-1", "Europe/Paris", "paris.example.com",
    )
    assert config.sip.tls_port is None and not (site / "tls").exists()
    assert [a.user for a in config.sip.accounts] == ["2001", "2002"]
    assert config.trunk.allowed_sources == ("192.0.2.0/24",)
    assert mode_of(site / "initial-credentials.json") == 0o600
    assert not (site / "demo-credentials.json").exists()


def test_init_asks_on_a_terminal(tmp_path: Path) -> None:
    site = tmp_path / "lyon"
    controller, terminal = pty.openpty()
    try:
        # Answers typed ahead: an id, then Enter twice to take the suggested realm and bind.
        os.write(controller, b"lyon-2\n\n\n")
        proc = subprocess.Popen(
            [EDGECC, "init", "--site-dir", str(site)], stdin=terminal,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 0, err
    assert "Site id" in out and "SIP realm [lyon-2.edgecc.local]" in out
    config = load_site(site)
    assert (config.site.id, config.sip.realm, config.sip.bind) == (
        "lyon-2", "lyon-2.edgecc.local", "127.0.0.1",
    )


def test_init_options_that_make_an_invalid_site_write_nothing(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    result = edgecc("init", "--demo", "--site-dir", str(site), "--sip-port", "20010")
    assert result.returncode == 2
    assert "sip.udp_port: expected a port outside media.rtp_ports" in result.stderr
    assert not site.exists()
    bad = edgecc("init", "--demo", "--site-dir", str(site), "--rtp-ports", "9-5")
    assert bad.returncode == 2 and "LOW-HIGH" in bad.stderr
    assert not site.exists()


# --------------------------------------------------------------------------- appliance


def _sip_stack_missing() -> str | None:
    for name in ("media_core.sip", "appliance.sip.service"):
        try:
            if importlib.util.find_spec(name) is None:
                return name
        except ModuleNotFoundError:
            return name
    return None


needs_sip_stack = pytest.mark.skipif(
    _sip_stack_missing() is not None, reason=f"SIP stack not built yet: {_sip_stack_missing()}"
)

STARTUP = re.compile(
    r"^edgecc appliance site=(?P<site>\S+) sip=(?P<sip>\S+) http=(?P<http>http://\S+)$"
)


@pytest.fixture
def ephemeral_site(tmp_path: Path) -> Path:
    site = tmp_path / "demo"
    result = edgecc(
        "init", "--demo", "--site-dir", str(site), "--sip-port", "0", "--http-port", "0",
        "--agents", "2",
    )
    assert result.returncode == 0, result.stderr
    return site


@pytest.fixture
def appliance_process(ephemeral_site: Path) -> Iterator[subprocess.Popen]:
    proc = subprocess.Popen(
        [EDGECC, "appliance", "--site-dir", str(ephemeral_site)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
        proc.stdout.close()
        proc.stderr.close()


def read_startup_line(proc: subprocess.Popen) -> str:
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout=START_TIMEOUT_S):
            pytest.fail("no start-up line within the timeout")
    line = proc.stdout.readline().rstrip("\n")
    if not line:
        pytest.fail(f"appliance exited ({proc.wait(timeout=5)}): {proc.stderr.read()}")
    return line


@needs_sip_stack
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_appliance_prints_line_answers_health_and_stops_on_signal(
    appliance_process: subprocess.Popen, ephemeral_site: Path, signum: int
) -> None:
    line = read_startup_line(appliance_process)
    match = STARTUP.match(line)
    assert match, line
    assert match["site"] == "demo"
    sip = {}
    for part in match["sip"].split(","):
        transport, host, port = part.split(":")
        sip[transport] = {"host": host, "port": int(port)}
    assert set(sip) == {"udp", "tcp", "tls"}
    assert all(entry["port"] > 0 for entry in sip.values())  # port 0 became real ports

    with urllib.request.urlopen(match["http"] + "/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["site"] == "demo"
    assert health["sip"] == sip
    assert health["uptime_s"] >= 0
    with urllib.request.urlopen(match["http"] + "/openapi.json", timeout=10) as response:
        assert "/health" in json.loads(response.read())["paths"]
    with socket.create_connection(("127.0.0.1", sip["tcp"]["port"]), timeout=5):
        pass  # the SIP TCP listener really accepts

    sent = time.monotonic()
    appliance_process.send_signal(signum)
    code = appliance_process.wait(timeout=STOP_TIMEOUT_S)
    print(f"stopped {time.monotonic() - sent:.2f} s after {signal.Signals(signum).name}")
    assert code == 0, appliance_process.stderr.read()
    assert appliance_process.stdout.read() == ""  # exactly one line on stdout

    with sqlite3.connect(ephemeral_site / "edgecc.db") as conn:
        actions = [a for (a,) in conn.execute("SELECT action FROM audit_log ORDER BY id")]
    assert actions == ["start", "stop"]


@needs_sip_stack
@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian sip-tester) not installed")
def test_a_phone_registers_with_the_demo_credentials(
    appliance_process: subprocess.Popen, ephemeral_site: Path, tmp_path: Path
) -> None:
    """The README's path: demo-credentials.json -> a real SIP UA (SIPp) registers over UDP."""
    match = STARTUP.match(read_startup_line(appliance_process))
    assert match
    udp = next(p for p in match["sip"].split(",") if p.startswith("udp:"))
    _, host, port = udp.split(":")
    credentials = json.loads((ephemeral_site / "demo-credentials.json").read_text())
    account = credentials["accounts"][0]
    users = tmp_path / "users.csv"
    # SIPp puts the server address in the digest uri, so the domain is host:port.
    users.write_text(
        f"SEQUENTIAL\n{account['user']};{host}:{port};"
        f"[authentication username={account['auth_user']} password=\"{account['password']}\"]\n"
    )
    result = subprocess.run(
        ["sipp", "-sf", str(SIPP_REGISTER), "-inf", str(users), "-m", "1", "-i", "127.0.0.1",
         "-p", "0", f"{host}:{port}", "-nostdin", "-timeout", "20", "-timeout_error"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    appliance_process.send_signal(signal.SIGTERM)
    assert appliance_process.wait(timeout=STOP_TIMEOUT_S) == 0
    with sqlite3.connect(ephemeral_site / "edgecc.db") as conn:
        rows = conn.execute("SELECT aor, transport FROM sip_bindings").fetchall()
    assert rows == [(f"sip:{account['user']}@{credentials['realm']}", "UDP")]


@needs_sip_stack
def test_appliance_reports_a_port_in_use(ephemeral_site: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        text = (ephemeral_site / "site.yaml").read_text()
        (ephemeral_site / "site.yaml").write_text(
            re.sub(r"(?m)^http:\n  bind: 127.0.0.1\n  port: 0$",
                   f"http:\n  bind: 127.0.0.1\n  port: {port}", text)
        )
        assert load_site(ephemeral_site).http.port == port
        result = edgecc("appliance", "--site-dir", str(ephemeral_site))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "in use" in result.stderr
    assert result.stdout == ""


def test_appliance_refuses_invalid_site_and_changes_nothing(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init_demo(site)
    text = (site / "site.yaml").read_text()
    assert "\n  database: edgecc.db\n" in text
    text = text.replace("\n  database: edgecc.db\n", "\n  databse: other.db\n")  # a typo
    (site / "site.yaml").write_text(text)
    line = text.splitlines().index("  databse: other.db") + 1
    before = snapshot(site)

    result = edgecc("appliance", "--site-dir", str(site))
    assert result.returncode == 2
    assert "refusing to start, nothing was changed" in result.stderr
    assert f"site.yaml:{line}: storage.databse: unknown key" in result.stderr
    assert result.stdout == ""
    assert snapshot(site) == before
    assert not (site / "edgecc.db").exists()


# --------------------------------------------------------------------------- doctor


def test_doctor_passes_a_fresh_demo_site(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init_demo(site)
    result = edgecc("doctor", "--site-dir", str(site))
    assert result.returncode == 0, result.stdout
    assert "doctor: all checks passed" in result.stdout
    for check in ("config:", "ports:", "permissions:", "disk:", "clock:", "tls:"):
        assert check in result.stdout
    assert "FAIL" not in result.stdout and "WARN" not in result.stdout
    assert "edgecc.db does not exist yet" in result.stdout

    open_site_db(site / "edgecc.db").close()
    again = edgecc("doctor", "--site-dir", str(site))
    assert again.returncode == 0, again.stdout
    latest = max(m.number for m in MIGRATIONS)
    assert f"edgecc.db passes quick_check (schema {latest})" in again.stdout

    (site / "edgecc.db").write_bytes(b"not a database" * 100)
    broken = edgecc("doctor", "--site-dir", str(site))
    assert broken.returncode == 1
    assert f"FAIL  database: cannot read {site / 'edgecc.db'}" in broken.stdout


def test_doctor_names_a_readable_key_and_a_busy_port_with_fixes(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        result = edgecc(
            "init", "--demo", "--site-dir", str(site), "--sip-port", str(port),
            "--tls-port", str(free_tcp_port()), "--http-port", str(free_tcp_port()),
            "--rtp-ports", rtp_range(),
        )
        assert result.returncode == 0, result.stderr
        os.chmod(site / "tls/sip.key", 0o644)
        report = edgecc("doctor", "--site-dir", str(site))
    assert report.returncode == 1
    out = report.stdout
    assert f"FAIL  ports: sip.udp_port 127.0.0.1:{port}/udp cannot be bound" in out
    assert f"ss -lunp 'sport = :{port}'" in out
    assert f"FAIL  permissions: {site / 'tls/sip.key'} is readable" in out
    assert f"fix: chmod 600 {site / 'tls/sip.key'}" in out
    assert "doctor: 2 problem(s): 2 failure(s), 0 warning(s)" in out


def test_doctor_reports_an_invalid_config_by_line(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init_demo(site)
    text = (site / "site.yaml").read_text().replace("  realm: edgecc.local", "  realm: [x]")
    (site / "site.yaml").write_text(text)
    line = text.splitlines().index("  realm: [x]") + 1
    report = edgecc("doctor", "--site-dir", str(site))
    assert report.returncode == 1
    assert f"FAIL  config: {site / 'site.yaml'}:{line}: sip.realm: expected a string" in report.stdout
    assert f"fix: edit line {line} of {site / 'site.yaml'}" in report.stdout


def test_doctor_clock_reports_ntp_state_without_failing_when_unknown(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init_demo(site)
    config = load_site(site)
    started = ClockSample.now()

    unknown = check_clock(config, started, timedatectl=lambda: (None, "timedatectl missing"))
    assert [f.level for f in unknown if "NTP" in f.message] == [Level.INFO]
    assert not any(f.level.is_problem for f in unknown)

    unsynced = check_clock(config, started, timedatectl=lambda: ("no", "timedatectl"))
    problems = [f for f in unsynced if f.level.is_problem]
    assert [f.message for f in problems] == ["NTP not synchronized"]
    assert "timedatectl set-ntp true" in problems[0].fix

    stepped = ClockSample(started.wall - 30.0, started.mono)  # the wall clock jumped 30 s
    jumps = check_clock(config, stepped, timedatectl=lambda: ("yes", "timedatectl"))
    assert any(f.level is Level.WARN and "moved +30" in f.message for f in jumps)


def test_doctor_tls_warns_before_expiry_and_fails_on_a_foreign_key(tmp_path: Path) -> None:
    site = tmp_path / "demo"
    init_demo(site)
    config = load_site(site)
    assert [f.level for f in check_tls(config)] == [Level.OK]

    cert, key = make_certificate("edgecc.local", (), days=10)
    (site / "tls/sip.crt").write_bytes(cert)
    (site / "tls/sip.key").write_bytes(key)
    findings = check_tls(config)
    assert [f.level for f in findings] == [Level.WARN]
    assert "expires in" in findings[0].message and "openssl req -x509" in findings[0].fix

    other_cert, _ = make_certificate("edgecc.local", ())
    (site / "tls/sip.crt").write_bytes(other_cert)
    assert any(
        f.level is Level.FAIL and "is not the key of" in f.message for f in check_tls(config)
    )
