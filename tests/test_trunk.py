"""The carrier trunk: registration with digest from HA1, and the OPTIONS keep-alive.

The sans-IO monitor is driven by hand (time is a parameter); its digest answers are checked by
the appliance's own ``DigestAuthenticator`` acting as the carrier. The adapter is then run on a
real SIP service against SIPp playing the carrier (REGISTER answered 401 then 200; OPTIONS
answered 200, or never).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from appliance.config import TrunkConfig, ha1, parse_site_yaml
from appliance.doctor import Level, check_trunk
from appliance.sip.digest import DigestAuthenticator
from appliance.sip.guard import Guard
from appliance.sip.registrar import BindingStore, Registrar
from appliance.sip.service import SipService
from appliance.sip.source import Source
from appliance.sip.trunk import (
    TRANSITIONS,
    Probe,
    RegistrationChanged,
    RegistrationState,
    SendRequest,
    TrunkLink,
    TrunkMonitor,
    TrunkState,
    TrunkStateChanged,
    read_trunk_status,
)
from appliance.store import open_site_db
from media_core.sip import build_response, parse_message

CARRIER_REALM = "carrier.test"
USER = "site42"
PASSWORD = "trunk-secret-9"
LOCAL = Source("UDP", "127.0.0.1", 5099)
WAIT = 20.0  # bound on every wait for an event; never decides a pass by itself


def trunk_config(**overrides) -> TrunkConfig:
    md5, sha256 = ha1(USER, CARRIER_REALM, PASSWORD)
    data = {
        "carrier": {"host": "127.0.0.1", "port": 5098},
        "auth": {"user": USER, "realm": CARRIER_REALM, "ha1_md5": md5, "ha1_sha256": sha256},
        "register": True,
    }
    data.update(overrides)
    return TrunkConfig.model_validate(data)


class Account:
    def __init__(self) -> None:
        self.ha1_md5, self.ha1_sha256 = ha1(USER, CARRIER_REALM, PASSWORD)


def carrier_auth() -> DigestAuthenticator:
    return DigestAuthenticator(CARRIER_REALM, {USER: Account()}, nonce_ttl=300,
                               secret=b"carrier-secret", md5_first_user_agents=())


def sent(outputs, kind: str):
    requests = [o.request for o in outputs if isinstance(o, SendRequest) and o.kind == kind]
    assert len(requests) == 1, outputs
    # What goes on the wire parses back (the carrier sees exactly this).
    return parse_message(requests[0].to_bytes())


def of_type(outputs, cls):
    return [o for o in outputs if isinstance(o, cls)]


# -- keep-alive state table -----------------------------------------------------------------

def test_state_table_covers_every_pair():
    assert set(TRANSITIONS) == {(s, p) for s in TrunkState for p in Probe}


def test_options_up_then_down_after_n_failures_then_up_again():
    monitor = TrunkMonitor(trunk_config(register=False, options_interval=30, options_failures=3),
                           local=LOCAL, now=0.0)
    assert monitor.state is TrunkState.UNKNOWN
    assert monitor.next_timer() == 0.0
    options = sent(monitor.handle_timer(0.0), "options")
    assert options.method == "OPTIONS" and options.uri == "sip:127.0.0.1:5098"
    assert options.top_via.host == "127.0.0.1" and options.top_via.port == 5099
    assert monitor.handle_timer(0.0) == []  # one keep-alive out at a time
    changes = monitor.response("options", build_response(options, 200), 0.1)
    assert of_type(changes, TrunkStateChanged) == [
        TrunkStateChanged(TrunkState.UNKNOWN, TrunkState.UP, "200", 0.1)]
    assert monitor.next_timer() == 30.0
    now = 30.0
    for failure in range(1, 4):
        sent(monitor.handle_timer(now), "options")
        changes = monitor.failure("options", "timeout", now + 32)
        now = monitor.next_timer()
        if failure < 3:
            assert changes == [] and monitor.state is TrunkState.UP
    assert of_type(changes, TrunkStateChanged)[0].after is TrunkState.DOWN
    assert monitor.failures == 3
    # A 503 is not an answer that brings it back; a 404 is (the carrier is there).
    options = sent(monitor.handle_timer(now), "options")
    assert monitor.response("options", build_response(options, 503), now) == []
    assert monitor.state is TrunkState.DOWN
    options = sent(monitor.handle_timer(monitor.next_timer()), "options")
    changes = monitor.response("options", build_response(options, 404), monitor.next_timer() or 0)
    assert monitor.state is TrunkState.UP and monitor.failures == 0
    assert of_type(changes, TrunkStateChanged)[0].reason == "404"


def test_options_disabled_leaves_state_unknown_and_sends_nothing():
    monitor = TrunkMonitor(trunk_config(register=False, options_interval=None),
                           local=LOCAL, now=0.0)
    assert monitor.next_timer() is None
    assert monitor.handle_timer(1000.0) == []
    assert monitor.state is TrunkState.UNKNOWN
    assert monitor.registration is RegistrationState.DISABLED


# -- registration ---------------------------------------------------------------------------

def register_once(monitor: TrunkMonitor, auth: DigestAuthenticator, now: float, *,
                  grant: str | None = "120"):
    """REGISTER, 401 from the carrier, REGISTER with credentials verified by the carrier."""
    first = sent(monitor.handle_timer(now), "register")
    assert first.get("Authorization") is None or auth.verify(first, now).ok
    challenge = build_response(first, 401, headers=auth.challenge(first, now))
    assert monitor.response("register", challenge, now) == []
    assert monitor.next_timer() == now
    second = sent(monitor.handle_timer(now), "register")
    result = auth.verify(second, now)
    assert result.ok, result
    assert second.call_id == first.call_id and second.cseq[0] == first.cseq[0] + 1
    headers = [("Contact", f"<{second.contacts[0].uri}>;expires={grant}")] if grant else []
    return second, monitor.response("register", build_response(second, 200, headers=headers),
                                    now)


def test_register_answers_the_challenge_with_sha256_and_refreshes_before_expiry():
    monitor = TrunkMonitor(trunk_config(options_interval=None), local=LOCAL, now=0.0)
    auth = carrier_auth()
    second, changes = register_once(monitor, auth, 0.0)
    assert 'algorithm=SHA-256' in second.get("Authorization")
    assert second.get("Expires") == "600"
    assert second.contacts[0].uri.user == USER and second.contacts[0].uri.port == 5099
    assert second.to.uri.user == USER and second.to.uri.host == CARRIER_REALM
    [change] = of_type(changes, RegistrationChanged)
    assert change.after is RegistrationState.REGISTERED and change.expires_in == 120
    assert monitor.registered_until == 120.0
    assert monitor.next_timer() == 60.0  # granted 120 s: refreshed at half of it
    # The refresh reuses the challenge (nc 2) and the carrier accepts it without a new 401.
    refresh = sent(monitor.handle_timer(60.0), "register")
    assert "nc=00000002" in refresh.get("Authorization")
    assert auth.verify(refresh, 60.0).ok
    monitor.response("register", build_response(refresh, 200, headers=[
        ("Contact", f"<{refresh.contacts[0].uri}>;expires=3600")]), 60.0)
    assert monitor.registration is RegistrationState.REGISTERED
    assert monitor.next_timer() == 60.0 + 3600 - 60


def test_register_uses_md5_when_no_sha256_ha1_is_configured():
    config = trunk_config(options_interval=None)
    auth_cfg = config.auth.model_copy(update={"ha1_sha256": None})
    monitor = TrunkMonitor(config.model_copy(update={"auth": auth_cfg}), local=LOCAL, now=5.0)
    second, _ = register_once(monitor, carrier_auth(), 5.0, grant=None)
    assert "algorithm=MD5" in second.get("Authorization")
    assert monitor.registered_until == 5.0 + 600  # no expires granted: the one asked for


def test_wrong_credentials_fail_and_back_off_doubling_to_the_ceiling():
    config = trunk_config(options_interval=None)
    wrong = config.auth.model_copy(update={"ha1_md5": "0" * 32, "ha1_sha256": "0" * 64})
    monitor = TrunkMonitor(config.model_copy(update={"auth": wrong}), local=LOCAL, now=0.0,
                           backoff_first=30, backoff_max=100)
    auth = carrier_auth()
    now = 0.0
    waits = []
    for _ in range(4):
        first = sent(monitor.handle_timer(now), "register")
        if first.get("Authorization") is None:
            monitor.response("register", build_response(
                first, 401, headers=auth.challenge(first, now)), now)
            first = sent(monitor.handle_timer(now), "register")
        assert not auth.verify(first, now).ok
        changes = monitor.response("register", build_response(
            first, 401, headers=auth.challenge(first, now)), now)
        [change] = of_type(changes, RegistrationChanged)
        assert change.after is RegistrationState.FAILED
        assert change.reason == "credentials refused"
        waits.append(monitor.next_timer() - now)
        now = monitor.next_timer()
    assert waits == [30, 60, 100, 100]


def test_423_asks_again_with_min_expires_and_503_retry_after_is_honoured():
    monitor = TrunkMonitor(trunk_config(options_interval=None, register_expires=60),
                           local=LOCAL, now=0.0)
    first = sent(monitor.handle_timer(0.0), "register")
    monitor.response("register", build_response(first, 423, headers=[("Min-Expires", "300")]),
                     0.0)
    assert monitor.next_timer() == 0.0
    again = sent(monitor.handle_timer(0.0), "register")
    assert again.get("Expires") == "300"
    changes = monitor.response("register", build_response(
        again, 503, headers=[("Retry-After", "120 (maintenance)")]), 1.0)
    assert of_type(changes, RegistrationChanged)[0].retry_in == 120
    assert monitor.next_timer() == 121.0


def test_timeout_fails_the_registration_and_a_garbled_challenge_is_a_failure():
    monitor = TrunkMonitor(trunk_config(options_interval=None), local=LOCAL, now=0.0)
    sent(monitor.handle_timer(0.0), "register")
    changes = monitor.failure("register", "timeout", 32.0)
    assert of_type(changes, RegistrationChanged)[0].reason == "timeout"
    assert monitor.registration is RegistrationState.FAILED
    request = sent(monitor.handle_timer(monitor.next_timer()), "register")
    bad = build_response(request, 401, headers=[("WWW-Authenticate", "Basic realm=x")])
    changes = monitor.response("register", bad, 70.0)
    assert "without a usable digest challenge" in of_type(changes, RegistrationChanged)[0].reason


def test_register_true_needs_carrier_and_auth_with_the_line_named(tmp_path):
    with pytest.raises(Exception, match=r"trunk.register.*expected carrier and auth"):
        parse_site_yaml("trunk:\n  register: true\n", site_dir=tmp_path)


# -- real SIP service against SIPp as the carrier ------------------------------------------

def run_async(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 90))

    return wrapper


UAS_REGISTER = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="carrier: REGISTER 401 then 200, then OPTIONS 200">
  <recv request="REGISTER"/>
  <send><![CDATA[
SIP/2.0 401 Unauthorized
[last_Via:]
[last_From:]
[last_To:];tag=[pid]carrier[call_number]
[last_Call-ID:]
[last_CSeq:]
WWW-Authenticate: Digest realm="{realm}", nonce="n0nce[call_number]x", algorithm=MD5, qop="auth"
Content-Length: 0

]]></send>
  <recv request="REGISTER" crlf="true">
    <action>
      <verifyauth assign_to="authvalid" username="{user}" password="{password}"/>
    </action>
  </recv>
  <nop condexec="authvalid" condexec_inverse="true">
    <action><error message="bad credentials"/></action>
  </nop>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]carrier[call_number]
[last_Call-ID:]
[last_CSeq:]
[last_Contact:];expires=3600
Content-Length: 0

]]></send>
</scenario>
"""

UAS_OPTIONS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="carrier: OPTIONS answered 200">
  <recv request="OPTIONS"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:];tag=[pid]carrier[call_number]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
</scenario>
"""

UAS_SILENT = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="carrier: OPTIONS never answered">
  <recv request="OPTIONS"/>
</scenario>
"""


def free_udp_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Carrier:
    """SIPp as the carrier's UAS, on a free port, stopped by the fixture."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, scenario: str, *, calls: int) -> int:
        port = free_udp_port()
        path = self.workdir / f"uas-{port}.xml"
        path.write_text(scenario.format(realm=CARRIER_REALM, user=USER, password=PASSWORD))
        proc = subprocess.Popen(
            ["sipp", "-sf", str(path), "-i", "127.0.0.1", "-p", str(port), "-m", str(calls),
             "-nostdin", "-nd", "-trace_err", "-timeout", "60s"],
            cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        self.procs.append(proc)
        return port

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            if proc.stderr is not None:
                proc.stderr.close()


@pytest.fixture
def carrier(tmp_path):
    if shutil.which("sipp") is None:
        pytest.skip("sipp is not installed")
    c = Carrier(tmp_path)
    yield c
    c.stop()


async def start_site(directory: Path, trunk_yaml: str):
    text = (
        "sip:\n  bind: 127.0.0.1\n  udp_port: 0\n  tcp_port: 0\n  tls_port: null\n"
        "  realm: edgecc.test\n"
        "  timers: {t1: 0.02, t2: 0.2, t4: 0.5}\n"
        "http: {port: 0}\n"
        f"trunk:\n{trunk_yaml}"
    )
    config = parse_site_yaml(text, site_dir=directory)
    db = open_site_db(directory / "edgecc.db")
    store = BindingStore(db)
    guard = Guard(config.guard)
    registrar = Registrar(config, store, DigestAuthenticator.from_site(config), guard)
    service = await SipService.start(config, registrar=registrar, guard=guard)
    return config, service, store, str(directory / "edgecc.db")


def trunk_yaml(port: int, **extra) -> str:
    md5, sha256 = ha1(USER, CARRIER_REALM, PASSWORD)
    lines = [
        f"  carrier: {{host: 127.0.0.1, port: {port}}}",
        f"  auth: {{user: {USER}, realm: {CARRIER_REALM}, ha1_md5: '{md5}', "
        f"ha1_sha256: '{sha256}'}}",
    ] + [f"  {k}: {v}" for k, v in extra.items()]
    return "\n".join(lines) + "\n"


async def wait_for(changes: asyncio.Queue, predicate) -> object:
    deadline = time.monotonic() + WAIT
    while True:
        change = await asyncio.wait_for(changes.get(), max(0.01, deadline - time.monotonic()))
        if predicate(change):
            return change


@run_async
async def test_registers_with_sipp_as_carrier_and_doctor_reads_the_status(tmp_path, carrier):
    port = carrier.start(UAS_REGISTER, calls=1)
    config, service, store, database = await start_site(
        tmp_path, trunk_yaml(port, register="true", options_interval="null"))
    changes: asyncio.Queue = asyncio.Queue()
    link = await TrunkLink.start(config, service, database=database, on_change=changes.put_nowait)
    try:
        change = await wait_for(changes, lambda c: isinstance(c, RegistrationChanged)
                                and c.after is not RegistrationState.REGISTERING)
        assert change.after is RegistrationState.REGISTERED, change
        assert change.expires_in == 3600
        assert link.monitor.next_timer() == pytest.approx(link.monitor.registered_until - 60)
        await link.stop()
        status = read_trunk_status(database)
        assert status["registration"] == "registered" and status["state"] == "unknown"
        findings = check_trunk(config)
        assert [f.level for f in findings] == [Level.OK], findings
        assert "registered" in findings[0].message
    finally:
        await link.stop()
        await service.close()
        store.close()
    assert carrier.procs[0].wait(10) == 0  # SIPp verified the digest and saw the call through


@run_async
async def test_options_up_with_sipp_answering_then_down_when_it_stays_silent(tmp_path, carrier):
    port = carrier.start(UAS_OPTIONS, calls=1)
    config, service, store, database = await start_site(
        tmp_path, trunk_yaml(port, options_interval="0.3", options_failures=2))
    changes: asyncio.Queue = asyncio.Queue()
    link = await TrunkLink.start(config, service, database=database, on_change=changes.put_nowait)
    try:
        change = await wait_for(changes, lambda c: isinstance(c, TrunkStateChanged))
        assert (change.before, change.after) == (TrunkState.UNKNOWN, TrunkState.UP)
        assert link.state is TrunkState.UP
        # SIPp answered its one OPTIONS and exits; the next ones time out (Timer F = 64*T1).
        change = await wait_for(changes, lambda c: isinstance(c, TrunkStateChanged))
        assert (change.before, change.after) == (TrunkState.UP, TrunkState.DOWN)
        assert change.reason == "timeout" and link.monitor.failures == 2
        await link.stop()
        assert read_trunk_status(database)["state"] == "down"
        [finding] = check_trunk(config)
        assert finding.level is Level.FAIL and "down" in finding.message
    finally:
        await link.stop()
        await service.close()
        store.close()


@run_async
async def test_silent_carrier_goes_from_unknown_to_down(tmp_path, carrier):
    port = carrier.start(UAS_SILENT, calls=5)
    config, service, store, database = await start_site(
        tmp_path, trunk_yaml(port, options_interval="0.2", options_failures=2))
    changes: asyncio.Queue = asyncio.Queue()
    link = await TrunkLink.start(config, service, on_change=changes.put_nowait)
    try:
        change = await wait_for(changes, lambda c: isinstance(c, TrunkStateChanged))
        assert (change.before, change.after) == (TrunkState.UNKNOWN, TrunkState.DOWN)
    finally:
        await link.stop()
        await service.close()
        store.close()


@run_async
async def test_service_routes_client_events_to_the_transactions_own_hook(tmp_path):
    """``send_request(on_event=...)``: that transaction's events go to its hook (not to
    ``on_transaction_event``), until it terminates; a hook that raises breaks nothing."""
    import socket

    from appliance.sip.transaction import TransactionTerminated
    from media_core.sip import build_request, new_branch

    config, service, store, _ = await start_site(tmp_path, "  options_interval: null\n")
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.setblocking(False)
    loop = asyncio.get_running_loop()
    general, own = [], asyncio.Queue()
    service.on_transaction_event = general.append
    host, port = service.addresses["UDP"]

    def options() -> object:
        return build_request("OPTIONS", f"sip:{peer.getsockname()[0]}:{peer.getsockname()[1]}",
                             headers=[("Via", f"SIP/2.0/UDP {host}:{port};branch={new_branch()}"),
                                      ("From", "<sip:a@edgecc.test>;tag=1"),
                                      ("To", "<sip:b@edgecc.test>"), ("Call-ID", new_branch()),
                                      ("CSeq", "1 OPTIONS"), ("Max-Forwards", "70")])

    def broken(event) -> None:
        own.put_nowait(event)
        raise RuntimeError("owner bug")

    try:
        destination = Source("UDP", *peer.getsockname())
        for hook in (own.put_nowait, broken):
            key = service.send_request(options(), destination, on_event=hook)
            data = await asyncio.wait_for(loop.sock_recv(peer, 65536), WAIT)
            answer = build_response(parse_message(data), 200, to_tag="t1").to_bytes()
            await loop.sock_sendto(peer, answer, (host, port))
            event = await asyncio.wait_for(own.get(), WAIT)
            assert event.key == key and event.response.status == 200
            # Timer K (T4 = 0.5 s here) ends it; the hook hears that too, then is dropped.
            event = await asyncio.wait_for(own.get(), WAIT)
            assert isinstance(event, TransactionTerminated) and event.key == key
            assert key not in service._client_hooks
        assert general == []
    finally:
        peer.close()
        await service.close()
        store.close()
