"""Real phones register with a real appliance: pjsua2, SIPp under load, and a brute-forcer.

A demo site (``edgecc init --demo``) runs as ``edgecc appliance`` on free ports of 127.0.0.1.
Bindings are checked in the site database, opened read-only. The load generator's address
(127.0.0.1) is in ``guard.exempt_sources``, as a site would list its SBC or test rig; the
brute-force source (127.0.0.2) and an ordinary phone (127.0.0.3) are not.

SIPp reads an unquoted ``[authentication ... password=0x...]`` value as hex-encoded bytes, so a
random demo password that happens to begin with "0x" (one account in 3,844) used to be sent
as other bytes and refused with 401. Passwords are quoted in the -inf file, and the site's last
account always has such a password, so the load test covers it every run.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from appliance.config import ha1
from appliance.sip.digest import answer_challenge
from media_core.sip import parse_message

ROOT = Path(__file__).resolve().parent.parent
EDGECC = Path(sys.executable).parent / "edgecc"
SCENARIO = ROOT / "tests" / "sipp" / "register_digest.xml"
AGENTS = 300
START_TIMEOUT = 30.0
HEX_LOOKING_PASSWORD = "0x5B07F6c0ffee42"
"""The last account's password: SIPp would decode it as hex unless quoted."""

needs_sipp = pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing")


# --------------------------------------------------------------------------- the appliance


@dataclass
class Site:
    directory: Path
    realm: str
    passwords: dict[str, str]
    database: Path


@dataclass
class Running:
    proc: subprocess.Popen
    port: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def make_site(directory: Path, agents: int = AGENTS) -> Site:
    subprocess.run(
        [
            str(EDGECC),
            "init",
            "--demo",
            "--site-dir",
            str(directory),
            "--agents",
            str(agents),
            "--sip-port",
            "0",
            "--no-tls",
            "--http-port",
            "0",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    site_file = directory / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    # The load generator may send far more than the per-source rate limit.
    data["guard"]["exempt_sources"] = ["127.0.0.1/32"]
    creds = json.loads((directory / "demo-credentials.json").read_text())
    passwords = {a["user"]: a["password"] for a in creds["accounts"]}
    last = data["sip"]["accounts"][-1]
    last["ha1_md5"], last["ha1_sha256"] = ha1(last["user"], data["sip"]["realm"],
                                              HEX_LOOKING_PASSWORD)
    passwords[last["user"]] = HEX_LOOKING_PASSWORD
    site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    database = directory / data.get("storage", {}).get("database", "edgecc.db")
    return Site(directory, data["sip"]["realm"], passwords, database)


def start(site: Site, log_name: str = "appliance.log") -> Running:
    log = site.directory / log_name
    with open(log, "ab") as err:
        proc = subprocess.Popen(
            [str(EDGECC), "appliance", "--site-dir", str(site.directory)],
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=site.directory,
        )
    line = read_line(proc, START_TIMEOUT)
    m = re.search(r"sip=\S*udp:127\.0\.0\.1:(\d+)", line)
    if m is None:
        stop(proc)
        pytest.fail(f"appliance did not start: {line!r}\n{log.read_text(errors='replace')}")
    return Running(proc, int(m.group(1)), log)


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


_pending: dict[int, bytes] = {}


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line ``proc`` writes to stdout, or "" after ``timeout`` (or at its end)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = _pending.pop(proc.pid, b"")
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    _pending[proc.pid] = rest
    return line.decode(errors="replace")


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``condition`` until it is truthy (bounded); the binding writer commits behind."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def bindings(site: Site) -> list[tuple[str, str, float]]:
    """(aor, contact, expires_at) rows of the site database, read-only."""
    if not site.database.exists():
        return []
    conn = sqlite3.connect(f"file:{site.database}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(
            "SELECT aor, contact, expires_at FROM sip_bindings ORDER BY aor, contact"
        ).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return make_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="module")
def appliance(site: Site) -> Iterator[Running]:
    running = start(site)
    try:
        yield running
    finally:
        stop(running.proc)


# --------------------------------------------------------------------------- a raw UDP phone


class RawPhone:
    """A minimal UDP SIP client on its own loopback address, for exact control of requests."""

    def __init__(self, host: str, server_port: int, realm: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.server = ("127.0.0.1", server_port)
        self.realm = realm
        self.cseq = 0
        self.call_id = f"{uuid.uuid4().hex}@{host}"

    def close(self) -> None:
        self.sock.close()

    def send(self, method: str, user: str, extra: tuple[str, ...] = (), *, ua: str = "RawPhone"):
        branch, data = self.build(method, user, extra, ua=ua)
        self.sock.sendto(data, self.server)
        return branch

    def build(
        self, method: str, user: str, extra: tuple[str, ...] = (), *, ua: str = "RawPhone",
        branch: str | None = None,
    ) -> tuple[str, bytes]:
        """The next request (CSeq + 1) and its branch, a new one unless given; not sent."""
        self.cseq += 1
        branch = branch or f"z9hG4bK{uuid.uuid4().hex[:16]}"
        text = "\r\n".join(
            [
                f"{method} sip:{self.realm} SIP/2.0",
                f"Via: SIP/2.0/UDP {self.host}:{self.port};rport;branch={branch}",
                "Max-Forwards: 70",
                f"To: <sip:{user}@{self.realm}>",
                f"From: <sip:{user}@{self.realm}>;tag=t{self.cseq}",
                f"Call-ID: {self.call_id}",
                f"CSeq: {self.cseq} {method}",
                f"User-Agent: {ua}",
                *extra,
                "Content-Length: 0",
                "",
                "",
            ]
        )
        return branch, text.encode()

    def finals(self, count: int, timeout: float) -> list:
        """The next ``count`` final responses, in arrival order (fewer after ``timeout``)."""
        deadline = time.monotonic() + timeout
        found: list = []
        while len(found) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                break
            msg = parse_message(self.sock.recv(65535))
            if msg.status is not None and msg.status >= 200:
                found.append(msg)
        return found

    def response(self, branch: str, timeout: float):
        """The final response to ``branch``, or None when nothing comes within ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            msg = parse_message(self.sock.recv(65535))
            if msg.branch == branch and msg.status is not None and msg.status >= 200:
                return msg

    def register(
        self, user: str, password: str, *, expires: int = 600, contact=True, timeout: float = 5.0
    ):
        """REGISTER, answer the first challenge, return (first, final) responses."""
        extra = (f"Contact: <sip:{user}@{self.host}:{self.port}>", f"Expires: {expires}")
        extra = extra if contact else ()
        first = self.response(self.send("REGISTER", user, extra), timeout)
        if first is None or first.status != 401:
            return first, None
        challenge = next(v for n, v in first.headers if n == "WWW-Authenticate")
        auth = answer_challenge(
            challenge,
            method="REGISTER",
            uri=f"sip:{self.realm}",
            username=user,
            password=password,
        )
        final = self.response(
            self.send("REGISTER", user, (*extra, f"Authorization: {auth}")), timeout
        )
        return first, final


@contextlib.contextmanager
def raw_phone(host: str, running: Running, site: Site) -> Iterator[RawPhone]:
    phone = RawPhone(host, running.port, site.realm)
    try:
        yield phone
    finally:
        phone.close()


# --------------------------------------------------------------------------- pjsua2

PJSUA_SCRIPT = textwrap.dedent(
    r"""
    import json, queue, sys
    import pjsua2 as pj

    user, password, realm, port, logfile = sys.argv[1:6]
    events = queue.Queue()

    def say(**kw):
        print(json.dumps(kw), flush=True)

    class Account(pj.Account):
        def onRegState(self, prm):
            info = self.getInfo()
            events.put((prm.code, info.regIsActive, info.regExpiresSec))

    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = 5
    cfg.logConfig.consoleLevel = 0
    cfg.logConfig.filename = logfile
    cfg.uaConfig.userAgent = "pjsua2-edgecc-test"
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    tcfg = pj.TransportConfig()
    tcfg.boundAddress = "127.0.0.1"
    tcfg.port = 0
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{user}@{realm}"
    acfg.regConfig.registrarUri = f"sip:127.0.0.1:{port}"
    acfg.regConfig.timeoutSec = 300
    acfg.regConfig.retryIntervalSec = 0
    acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, user, 0, password))
    acc = Account()
    acc.create(acfg)

    def next_state():
        try:
            code, active, expires = events.get(timeout=15)
        except queue.Empty:
            say(event="timeout")
            raise SystemExit(2)
        return code, active, expires

    try:
        code, active, expires = next_state()
        say(event="registered", code=code, active=active, expires=expires)
        sys.stdin.readline()
        acc.setRegistration(True)
        code, active, expires = next_state()
        say(event="reregistered", code=code, active=active, expires=expires)
        sys.stdin.readline()
        acc.setRegistration(False)
        code, active, expires = next_state()
        say(event="unregistered", code=code, active=active)
        sys.stdin.readline()
    finally:
        acc.shutdown()
        ep.libDestroy()
    """
)


class Pjsua:
    """One pjsua2 endpoint in its own process (one Endpoint per process)."""

    def __init__(self, tmp: Path, user: str, password: str, realm: str, port: int) -> None:
        self.log = tmp / f"pjsua-{user}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PJSUA_SCRIPT, user, password, realm, str(port), str(self.log)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    def event(self, timeout: float = 20.0) -> dict:
        """The next JSON line of the script (pjlib prints a banner before its log is set)."""
        deadline = time.monotonic() + timeout
        while True:
            line = read_line(self.proc, max(0.0, deadline - time.monotonic()))
            if line.startswith("{"):
                return json.loads(line)
            if not line:
                self.close()
                pytest.fail(f"pjsua2 said nothing: {self.proc.stderr.read().decode()[-2000:]}")

    def proceed(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def test_pjsua2_registers_reregisters_and_unregisters(site, appliance, tmp_path) -> None:
    pytest.importorskip("pjsua2")
    user = "1001"
    aor = f"sip:{user}@{site.realm}"
    phone = Pjsua(tmp_path, user, site.passwords[user], site.realm, appliance.port)
    try:
        first = phone.event()
        assert (first["event"], first["code"], first["active"]) == ("registered", 200, True)
        assert 0 < first["expires"] <= 300
        rows = wait_for(lambda: [r for r in bindings(site) if r[0] == aor], 10, "pjsua2's binding")
        assert len(rows) == 1 and rows[0][1].startswith(f"sip:{user}@127.0.0.1:")
        assert 250 < rows[0][2] - time.time() <= 300
        phone.proceed()
        again = phone.event()
        assert (again["event"], again["code"], again["active"]) == ("reregistered", 200, True)
        assert [r[1] for r in bindings(site) if r[0] == aor] == [rows[0][1]]
        phone.proceed()
        gone = phone.event()
        assert (gone["event"], gone["code"], gone["active"]) == ("unregistered", 200, False)
        wait_for(lambda: not [r for r in bindings(site) if r[0] == aor], 10, "the unbinding")
        phone.proceed()
    finally:
        phone.close()
    log = phone.log.read_text(errors="replace")
    # pjsip 2.15 answers the first challenge it supports: SHA-256 (RFC 8760).
    used = re.findall(r"Authorization: Digest [^\r\n]*algorithm=([\w-]+)", log)
    assert used and set(used) == {"SHA-256"}, used[:3]


# --------------------------------------------------------------------------- SIPp under load


def sipp_authentication(user: str, password: str) -> str:
    """SIPp's ``[authentication]`` keyword for an -inf field, the password quoted.

    Unquoted, SIPp 3.6 decodes a value beginning with "0x" as hex bytes; quoted, it takes the
    characters as they are (a backslash escapes the next one).
    """
    quoted = password.replace("\\", "\\\\").replace('"', '\\"')
    return f'[authentication username={user} password="{quoted}"]'


def users_csv(site: Site, path: Path, users: list[str], password=None) -> Path:
    with path.open("w", newline="") as f:
        f.write("SEQUENTIAL\n")
        for user in users:
            pw = password or site.passwords[user]
            f.write(f"{user};{site.realm};{sipp_authentication(user, pw)}\n")
    return path


def run_sipp(
    running: Running,
    csv_file: Path,
    tmp: Path,
    *,
    calls: int,
    rate: int,
    local_ip: str = "127.0.0.1",
    timeout: float = 60.0,
) -> tuple[int, int, int]:
    stat = tmp / f"sipp-{local_ip}-{calls}.csv"
    proc = subprocess.run(
        [
            "sipp",
            f"127.0.0.1:{running.port}",
            "-sf",
            str(SCENARIO),
            "-inf",
            str(csv_file),
            "-i",
            local_ip,
            "-p",
            "0",
            "-m",
            str(calls),
            "-r",
            str(rate),
            "-l",
            str(rate * 2),
            "-recv_timeout",
            "10000",
            "-timeout",
            f"{int(timeout)}s",
            "-nostdin",
            "-nd",
            "-buff_size",
            "4194304",
            "-trace_err",
            "-error_file",
            str(tmp / f"sipp-{local_ip}-{calls}-errors.log"),
            "-trace_stat",
            "-stf",
            str(stat),
            "-fd",
            "60",
        ],
        capture_output=True,
        timeout=timeout + 15,
        cwd=tmp,
    )
    rows = list(csv.reader(stat.read_text().splitlines(), delimiter=";"))
    header, last = rows[0], rows[-1]
    ok = int(last[header.index("SuccessfulCall(C)")])
    failed = int(last[header.index("FailedCall(C)")])
    return proc.returncode, ok, failed


@needs_sipp
def test_sipp_registers_hundreds_of_accounts_under_load(site, appliance, tmp_path) -> None:
    users = sorted(site.passwords)[:AGENTS]
    csv_file = users_csv(site, tmp_path / "users.csv", users)
    rc, ok, failed = run_sipp(appliance, csv_file, tmp_path, calls=2 * len(users), rate=200)
    errors = tmp_path / f"sipp-127.0.0.1-{2 * len(users)}-errors.log"
    detail = errors.read_text(errors="replace")[-3000:] if errors.exists() else ""
    assert (rc, ok, failed) == (0, 2 * len(users), 0), detail
    aors = wait_for(
        lambda: {r[0] for r in bindings(site)} >= {f"sip:{u}@{site.realm}" for u in users},
        15,
        "every account's binding",
    )
    assert aors


@needs_sipp
def test_brute_force_source_is_banned_while_others_keep_registering(
    site, appliance, tmp_path
) -> None:
    victim = "1002"
    with (
        raw_phone("127.0.0.2", appliance, site) as attacker,
        raw_phone("127.0.0.3", appliance, site) as phone,
    ):
        for attempt in range(5):
            first, final = attacker.register(victim, f"guess-{attempt}")
            assert first is not None and first.status == 401
            assert final is not None and final.status == 401, attempt
        # Banned: nothing answers, not even the right password.
        silent = attacker.response(attacker.send("OPTIONS", victim), 1.5)
        assert silent is None
        first, final = attacker.register(victim, site.passwords[victim], timeout=1.5)
        assert first is None
        # Another source, not exempt, registers normally during the ban ...
        _, ok = phone.register("1003", site.passwords["1003"])
        assert ok is not None and ok.status == 200
        # ... and so does the load generator.
        csv_file = users_csv(site, tmp_path / "after.csv", sorted(site.passwords)[:50])
        assert run_sipp(appliance, csv_file, tmp_path, calls=50, rate=100) == (0, 50, 0)
    log = appliance.log_text()
    assert re.search(r"event=sip_guard_ban source=127\.0\.0\.2 ", log), log[-3000:]
    assert "guess-" not in log and site.passwords[victim] not in log


@needs_sipp
def test_scanner_user_agent_gets_no_answer(site, appliance) -> None:
    with raw_phone("127.0.0.4", appliance, site) as scanner:
        assert scanner.response(scanner.send("OPTIONS", "100", ua="friendly-scanner"), 1.5) is None
        answered = scanner.response(scanner.send("OPTIONS", "100", ua="Yealink T46U"), 5)
        assert answered is not None and answered.status == 200


def test_authenticated_register_repeated_while_the_appliance_stalls(site, appliance) -> None:
    """A phone's retransmission is the same transaction, a replayed nonce count is not.

    The appliance is stopped (SIGSTOP) while three REGISTERs wait in its socket, then read in
    one batch: the authenticated REGISTER, its retransmission with the same branch but (as
    SIPp re-sends it) a new nc and cnonce, and the first credentials again under a new branch.
    RFC 3261 §17.2.3 makes the second one a retransmission, answered with the first 200 byte
    for byte; RFC 7616 §3.4 makes the third a nonce-count replay, refused with a new
    challenge that is not stale.
    """
    user = "1004"
    with raw_phone("127.0.0.6", appliance, site) as phone:
        extra = (f"Contact: <sip:{user}@{phone.host}:{phone.port}>", "Expires: 600")
        challenged = phone.response(phone.send("REGISTER", user, extra), 5.0)
        assert challenged is not None and challenged.status == 401
        challenge = challenged.get_all("WWW-Authenticate")[0]

        def credentials(nc: int, cnonce: str) -> str:
            value = answer_challenge(challenge, method="REGISTER", uri=f"sip:{site.realm}",
                                     username=user, password=site.passwords[user], nc=nc,
                                     cnonce=cnonce)
            return f"Authorization: {value}"

        branch, first = phone.build("REGISTER", user, (*extra, credentials(1, "c1")))
        phone.cseq -= 1  # the retransmission repeats CSeq and branch
        _, again = phone.build("REGISTER", user, (*extra, credentials(2, "c2")), branch=branch)
        replay_branch, replay = phone.build("REGISTER", user, (*extra, credentials(1, "c1")))
        appliance.proc.send_signal(signal.SIGSTOP)
        try:
            for data in (first, again, replay):
                phone.sock.sendto(data, phone.server)
        finally:
            appliance.proc.send_signal(signal.SIGCONT)
        answers = phone.finals(3, 10.0)
    by_branch: dict[str, list] = {}
    for msg in answers:
        by_branch.setdefault(msg.branch, []).append(msg)
    ok, ok_again = by_branch[branch]
    assert ok.status == 200 and ok.to_bytes() == ok_again.to_bytes()
    [refused] = by_branch[replay_branch]
    assert refused.status == 401
    assert all("stale" not in v.lower() for v in refused.get_all("WWW-Authenticate"))


def test_bindings_survive_a_restart(tmp_path) -> None:
    site = make_site(tmp_path / "site", agents=3)
    running = start(site)
    try:
        with raw_phone("127.0.0.5", running, site) as phone:
            _, ok = phone.register("1001", site.passwords["1001"], expires=900)
            assert ok is not None and ok.status == 200
            contact = f"sip:1001@127.0.0.5:{phone.port}"
            wait_for(lambda: bindings(site), 10, "the binding row")
    finally:
        assert stop(running.proc) == 0
    assert [r[1] for r in bindings(site)] == [contact]
    again = start(site, "appliance-2.log")
    try:
        # A query REGISTER (no Contact) lists what the restarted registrar holds.
        with raw_phone("127.0.0.5", again, site) as phone:
            _, listed = phone.register("1001", site.passwords["1001"], contact=False)
            assert listed is not None and listed.status == 200
            [held] = listed.contacts
            assert str(held.uri) == contact
            assert 800 < int(held.params["expires"]) <= 900
    finally:
        stop(again.proc)
