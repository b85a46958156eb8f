"""The SIP service end to end over real sockets: UDP, TCP and TLS on 127.0.0.1.

The registrar, digest authenticator and guard are the real ones, on a real site database.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import re
import shutil
import ssl
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import SiteConfig, ha1, parse_site_yaml
from appliance.sip.digest import DigestAuthenticator, answer_challenge
from appliance.sip.guard import Guard
from appliance.sip.registrar import BindingStore, Registrar
from appliance.sip.service import ALLOW, SipService, error_response_bytes
from appliance.sip.source import Source
from appliance.sip.transaction import ResponseReceived, State, TransactionLayer, TransportFailed
from appliance.store import open_site_db
from media_core.sip import RemoteProtocolError, build_response, parse_message

WAIT = 10.0  # bound on every wait for an event; never decides a pass by itself
REALM = "edgecc.test"
PASSWORD = "pw-1001-secret"


def run_async(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 90))

    return wrapper


# -- site -----------------------------------------------------------------------------------

def write_self_signed(directory: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgecc.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("edgecc.test")]), False)
        .sign(key, hashes.SHA256())
    )
    (directory / "tls").mkdir()
    (directory / "tls" / "sip.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls" / "sip.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def site_config(directory: Path, *, limits: str = "{max_message_bytes: 8192}",
                **guard) -> SiteConfig:
    write_self_signed(directory)
    md5, sha256 = ha1("1001", REALM, PASSWORD)
    guard_yaml = "".join(f"  {k}: {v}\n" for k, v in guard.items())
    text = (
        "sip:\n"
        "  bind: 127.0.0.1\n"
        "  udp_port: 0\n"
        "  tcp_port: 0\n"
        "  tls_port: 0\n"
        f"  realm: {REALM}\n"
        f"  limits: {limits}\n"
        "  accounts:\n"
        f"    - {{user: '1001', ha1_md5: '{md5}', ha1_sha256: '{sha256}'}}\n"
        "http: {port: 0}\n"
        + ("guard:\n" + guard_yaml if guard_yaml else "")
    )
    return parse_site_yaml(text, site_dir=directory)


class CountingRegistrar:
    """The real registrar, counting how often the service hands it a REGISTER."""

    def __init__(self, inner: Registrar) -> None:
        self.inner = inner
        self.auth = inner.auth
        self.calls = 0

    def handle_register(self, request, source, now):
        self.calls += 1
        return self.inner.handle_register(request, source, now)


class Appliance:
    def __init__(self, service: SipService, registrar: CountingRegistrar,
                 store: BindingStore) -> None:
        self.service = service
        self.registrar = registrar
        self.store = store

    async def close(self) -> None:
        await self.service.close()
        self.store.close()


async def start_appliance(directory: Path, **kwargs) -> Appliance:
    guard_settings = kwargs.pop("guard", {})
    config = site_config(directory, limits=kwargs.pop("limits", "{max_message_bytes: 8192}"),
                         **guard_settings)
    store = BindingStore(open_site_db(directory / "edgecc.db"))
    guard = Guard(config.guard)
    auth = DigestAuthenticator.from_site(config)
    registrar = CountingRegistrar(Registrar(config, store, auth, guard))
    service = await SipService.start(config, registrar=registrar, guard=guard, **kwargs)
    return Appliance(service, registrar, store)


# -- phones ---------------------------------------------------------------------------------

def request(method: str, transport: str, local: tuple[str, int], *, branch: str | None = None,
            call_id: str | None = None, extra: str = "", uri: str = f"sip:{REALM}",
            rport: bool = True, cseq: int = 1, via_port: int | None = None,
            to: str = f"<sip:{REALM}>", max_forwards: int = 70, body: bytes = b"") -> bytes:
    branch = branch or f"z9hG4bK{uuid.uuid4().hex[:12]}"
    call_id = call_id or uuid.uuid4().hex
    via = f"SIP/2.0/{transport} {local[0]}:{via_port or local[1]};branch={branch}"
    head = (
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via}{';rport' if rport else ''}\r\n"
        f"Max-Forwards: {max_forwards}\r\n"
        f"From: <sip:1001@{REALM}>;tag=ph1\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {method}\r\n"
        f"{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def register(transport: str, local, **kwargs) -> bytes:
    extra = kwargs.pop("extra", "")
    contact = f"Contact: <sip:1001@{local[0]}:{local[1]};transport={transport.lower()}>\r\n"
    return request("REGISTER", transport, local, uri=f"sip:{REALM}",
                   to=f"<sip:1001@{REALM}>", extra=contact + "Expires: 600\r\n" + extra,
                   **kwargs)


class UdpPhone(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.put_nowait(data)

    @property
    def local(self) -> tuple[str, int]:
        return self.transport.get_extra_info("sockname")[:2]

    async def response(self):
        return parse_message(await asyncio.wait_for(self.received.get(), WAIT))

    async def response_to(self, call_id: str, cseq: tuple[int, str]):
        """The next response for (Call-ID, CSeq), passing over retransmissions of others."""
        for _ in range(50):
            raw = await asyncio.wait_for(self.received.get(), WAIT)
            try:
                resp = parse_message(raw)
                if resp.call_id == call_id and resp.cseq == cseq:
                    return resp
            except RemoteProtocolError:  # e.g. a 400 that copies a broken header
                resp = raw
            self.others.append(resp)
        raise AssertionError("no response for that request")

    others: list


async def udp_phone() -> UdpPhone:
    loop = asyncio.get_running_loop()
    _, phone = await loop.create_datagram_endpoint(UdpPhone, local_addr=("127.0.0.1", 0))
    phone.others = []
    return phone


class StreamPhone:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @property
    def local(self) -> tuple[str, int]:
        return self.writer.get_extra_info("sockname")[:2]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def raw_response(self) -> bytes:
        async def read_one() -> bytes:
            head = await self.reader.readuntil(b"\r\n\r\n")
            while head.startswith(b"\r\n"):  # keep-alive pongs ahead of a message
                head = head[2:]
            length = re.search(rb"(?im)^(?:content-length|l)\s*:\s*(\d+)", head)
            body = await self.reader.readexactly(int(length.group(1)) if length else 0)
            return head + body

        return await asyncio.wait_for(read_one(), WAIT)

    async def response(self):
        return parse_message(await self.raw_response())

    def close(self) -> None:
        self.writer.close()


async def stream_phone(app: Appliance, transport: str) -> StreamPhone:
    host, port = app.service.addresses[transport]
    context = None
    if transport == "TLS":
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the test's self-signed certificate
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    return StreamPhone(reader, writer)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    return tmp_path


# -- tests ----------------------------------------------------------------------------------

@run_async
async def test_options_on_every_transport(site: Path) -> None:
    app = await start_appliance(site)
    try:
        assert set(app.service.addresses) == {"UDP", "TCP", "TLS"}
        assert all(port > 0 for _, port in app.service.addresses.values())
        phone = await udp_phone()
        phone.transport.sendto(request("OPTIONS", "UDP", phone.local),
                               app.service.addresses["UDP"])
        responses = [await phone.response()]
        phone.transport.close()
        for name in ("TCP", "TLS"):
            conn = await stream_phone(app, name)
            await conn.send(request("OPTIONS", name, conn.local))
            responses.append(await conn.response())
            conn.close()
        for resp in responses:
            assert resp.status == 200 and resp.cseq == (1, "OPTIONS")
            assert set(re.split(r"\s*,\s*", resp.get("Allow"))) == set(ALLOW)
            assert resp.get("Accept") == "application/sdp"
            assert resp.get("Supported") is not None
            assert resp.to.tag
    finally:
        await app.close()


@run_async
async def test_udp_rport_and_received(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    listener = await udp_phone()  # the port named in Via when the phone does not ask rport
    try:
        server = app.service.addresses["UDP"]
        phone.transport.sendto(request("OPTIONS", "UDP", ("192.0.2.50", 5099)), server)
        resp = await phone.response()
        via = resp.top_via
        assert via.received == "127.0.0.1" and via.rport == str(phone.local[1])
        assert via.host == "192.0.2.50" and via.port == 5099
        # Without rport the response goes to the sent-by port at the source address.
        phone.transport.sendto(
            request("OPTIONS", "UDP", phone.local, via_port=listener.local[1], rport=False),
            server)
        resp = await listener.response()
        assert resp.status == 200 and resp.top_via.rport is None
        assert phone.received.empty()
    finally:
        phone.transport.close()
        listener.transport.close()
        await app.close()


@run_async
async def test_retransmitted_register_is_absorbed_then_registration_succeeds(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    try:
        server = app.service.addresses["UDP"]
        first = register("UDP", phone.local, branch="z9hG4bKreg1", call_id="reg-1")
        phone.transport.sendto(first, server)
        challenge = await phone.response()
        assert challenge.status == 401
        phone.transport.sendto(first, server)  # retransmission: same branch, same everything
        again = await phone.response()
        assert again.to_bytes() == challenge.to_bytes()
        assert app.registrar.calls == 1
        # Answer the challenge in a new transaction (CSeq 2): the registrar accepts it.
        www = challenge.get_all("WWW-Authenticate")[0]
        auth = answer_challenge(www, method="REGISTER", uri=f"sip:{REALM}",
                                username="1001", password=PASSWORD)
        phone.transport.sendto(register("UDP", phone.local, call_id="reg-1", cseq=2,
                                        extra=f"Authorization: {auth}\r\n"), server)
        ok = await phone.response()
        assert ok.status == 200 and ok.contacts
        assert app.registrar.calls == 2
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_malformed_gets_400_and_service_stays_up(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    try:
        server = app.service.addresses["UDP"]
        bad = request("OPTIONS", "UDP", phone.local).replace(b"CSeq: 1 OPTIONS", b"CSeq: one")
        phone.transport.sendto(bad, server)
        raw = await asyncio.wait_for(phone.received.get(), WAIT)
        # The answer copies the (broken) CSeq as sent, so it is checked as text.
        assert raw.startswith(b"SIP/2.0 400 ")
        assert b"\r\nCSeq: one\r\n" in raw and b";rport=" in raw and b";tag=" in raw
        # Garbage with nothing to answer to is dropped; the next request is served.
        phone.transport.sendto(b"\x16\x03\x01garbage\r\n\r\n", server)
        phone.transport.sendto(request("OPTIONS", "UDP", phone.local, call_id="after"), server)
        resp = await phone.response()
        assert resp.status == 200 and resp.call_id == "after"
        assert app.service.stats["malformed"] == 2
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_method_dispatch(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    try:
        server = app.service.addresses["UDP"]

        async def ask(method: str, call_id: str, cseq: int = 1, **kwargs):
            phone.transport.sendto(
                request(method, "UDP", phone.local, call_id=call_id, cseq=cseq, **kwargs), server)
            return await phone.response_to(call_id, (cseq, method))

        assert (await ask("FOO", "d1")).status == 501
        not_allowed = await ask("SUBSCRIBE", "d2")
        assert not_allowed.status == 405 and "REGISTER" in not_allowed.get("Allow")
        assert (await ask("BYE", "d3", to=f"<sip:{REALM}>;tag=x")).status == 481
        assert (await ask("CANCEL", "d4")).status == 481
        assert (await ask("REGISTER", "d5", max_forwards=0,
                          to=f"<sip:1001@{REALM}>")).status == 483
        # INVITE: challenged, then (authenticated) 480 until call control exists. Each final
        # is ACKed with the INVITE's branch, which stops the retransmissions (timer G).
        uri = f"sip:1002@{REALM}"
        challenge = await ask("INVITE", "inv-1", uri=uri, branch="z9hG4bKinv1")
        assert challenge.status == 401
        phone.transport.sendto(request("ACK", "UDP", phone.local, branch="z9hG4bKinv1",
                                       call_id="inv-1", uri=uri,
                                       to=f"<sip:{REALM}>;tag={challenge.to.tag}"), server)
        www = challenge.get_all("WWW-Authenticate")[0]
        auth = answer_challenge(www, method="INVITE", uri=uri, username="1001",
                                password=PASSWORD)
        unavailable = await ask("INVITE", "inv-1", cseq=2, uri=uri, branch="z9hG4bKinv2",
                                extra=f"Authorization: {auth}\r\n")
        assert unavailable.status == 480
        phone.transport.sendto(request("ACK", "UDP", phone.local, branch="z9hG4bKinv2",
                                       call_id="inv-1", cseq=2, uri=uri,
                                       to=f"<sip:{REALM}>;tag={unavailable.to.tag}"), server)
        # A CANCEL for an INVITE that already has its final answer: 200, no effect.
        cancelled = await ask("CANCEL", "inv-1", cseq=2, uri=uri, branch="z9hG4bKinv2")
        assert cancelled.status == 200
        # Nothing ever answered an ACK; whatever else arrived were retransmitted finals.
        assert all(r.cseq[1] == "INVITE" and r.status >= 400 for r in phone.others)
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_cancel_of_a_pending_invite_gets_200_and_487(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    try:
        uri = f"sip:1002@{REALM}"
        invite = parse_message(request("INVITE", "UDP", phone.local, call_id="pend",
                                       branch="z9hG4bKpend", uri=uri))
        # An INVITE that call control is still working on: its transaction is in Proceeding.
        source = Source("UDP", *phone.local)
        app.service.layer.receive_request(invite, source, app.service.clock())
        phone.transport.sendto(request("CANCEL", "UDP", phone.local, call_id="pend",
                                       branch="z9hG4bKpend", uri=uri),
                               app.service.addresses["UDP"])
        got = {(r.cseq[1], r.status) for r in [await phone.response(), await phone.response()]}
        assert got == {("INVITE", 487), ("CANCEL", 200)}
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_client_transaction_and_stray_response(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    events: list = []
    answered = asyncio.Event()

    def on_event(event) -> None:
        events.append(event)
        if isinstance(event, ResponseReceived):
            answered.set()

    app.service.on_transaction_event = on_event
    try:
        host, port = app.service.addresses["UDP"]
        ping = parse_message(request("OPTIONS", "UDP", (host, port), call_id="out-1",
                                     uri=f"sip:1001@{phone.local[0]}:{phone.local[1]}"))
        key = app.service.send_request(ping, Source("UDP", *phone.local))
        got = parse_message(await asyncio.wait_for(phone.received.get(), WAIT))
        assert got.method == "OPTIONS" and got.call_id == "out-1"
        # A response nobody asked for is dropped; the real one reaches the transaction user.
        stray = build_response(parse_message(request("OPTIONS", "UDP", phone.local)), 200,
                               to_tag="s1")
        phone.transport.sendto(stray.to_bytes(), (host, port))
        phone.transport.sendto(build_response(got, 200, to_tag="p1").to_bytes(), (host, port))
        await asyncio.wait_for(answered.wait(), WAIT)
        received = [e for e in events if isinstance(e, ResponseReceived)]
        assert [(e.key, e.response.call_id) for e in received] == [(key, "out-1")]
        assert app.service.stats["responses"] == 2
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_guard_dropped_requests_get_no_response(site: Path) -> None:
    app = await start_appliance(site)
    phone = await udp_phone()
    try:
        server = app.service.addresses["UDP"]
        scanner = request("OPTIONS", "UDP", phone.local, call_id="scan",
                          extra="User-Agent: friendly-scanner\r\n")
        phone.transport.sendto(scanner, server)
        phone.transport.sendto(request("OPTIONS", "UDP", phone.local, call_id="real"), server)
        resp = await phone.response()
        assert resp.call_id == "real"  # the scanner's came first and got nothing
        assert app.service.stats["dropped"] == 1
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_tcp_register_split_across_segments(site: Path) -> None:
    app = await start_appliance(site)
    conn = await stream_phone(app, "TCP")
    try:
        data = register("TCP", conn.local)
        for piece in (data[:7], data[7:60], data[60:61], data[61:]):
            await conn.send(piece)
        assert (await conn.response()).status == 401
        assert app.registrar.calls == 1
    finally:
        conn.close()
        await app.close()


@pytest.mark.parametrize("transport", ["TCP", "TLS"])
@run_async
async def test_crlf_keepalive_answered(site: Path, transport: str) -> None:
    app = await start_appliance(site)
    conn = await stream_phone(app, transport)
    try:
        await conn.send(b"\r\n\r\n")
        assert await asyncio.wait_for(conn.reader.readexactly(2), WAIT) == b"\r\n"
        await conn.send(request("OPTIONS", transport, conn.local))
        assert (await conn.response()).status == 200
    finally:
        conn.close()
        await app.close()


@run_async
async def test_oversized_message_closes_only_its_connection(site: Path) -> None:
    app = await start_appliance(site)  # max_message_bytes: 8192
    good = await stream_phone(app, "TCP")
    bad = await stream_phone(app, "TCP")
    try:
        await good.send(b"\r\n\r\n")
        assert await asyncio.wait_for(good.reader.readexactly(2), WAIT) == b"\r\n"
        await bad.send(request("OPTIONS", "TCP", bad.local, call_id="big", body=b"z" * 100_000))
        try:
            rest = await asyncio.wait_for(bad.reader.read(), WAIT)  # to EOF: we closed it
        except ConnectionResetError:
            rest = None  # closed with the peer's unread bytes still queued: RST, not FIN
        if rest is not None:  # the 413 was flushed before the close
            assert rest.startswith(b"SIP/2.0 413 ") and b"Call-ID: big\r\n" in rest
        await wait_until(lambda: app.service.transports.connection_count("TCP") == 1)
        assert app.service.stats["malformed"] == 1
        await good.send(request("OPTIONS", "TCP", good.local, call_id="ok"))
        resp = await good.response()
        assert resp.status == 200 and resp.call_id == "ok"
    finally:
        good.close()
        bad.close()
        await app.close()


def test_error_response_scraping() -> None:
    raw = (b"OPTIONS sip:x SIP/2.0\r\nv: SIP/2.0/UDP 10.0.0.1;branch=z9hG4bK1\r\n"
           b"f: <sip:a@x>;tag=1\r\nt: <sip:x>\r\ni: abc\r\nCSeq: 7 OPTIONS\r\n"
           b"Max-Forwards: many\r\n\r\n")
    resp = parse_message(error_response_bytes(raw, 400, "Bad Max-Forwards",
                                              [("Warning", '399 x "bad"')]))
    assert resp.status == 400 and resp.reason == "Bad Max-Forwards"
    assert resp.cseq == (7, "OPTIONS") and resp.get("Warning") == '399 x "bad"'
    assert resp.get("Max-Forwards") is None  # only the §8.2 fields are copied
    assert resp.call_id == "abc" and resp.top_via.branch == "z9hG4bK1" and resp.to.tag
    assert error_response_bytes(b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP x\r\n\r\n", 400, "x") is None
    assert error_response_bytes(b"OPTIONS sip:x SIP/2.0\r\nTo: <sip:x>\r\n\r\n", 400, "x") is None
    assert error_response_bytes(b"\x00\x01\x02", 400, "x") is None


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll a condition of the event loop's own state, bounded by WAIT."""
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


@run_async
async def test_tcp_response_after_connection_loss_goes_to_sent_by_port(site: Path) -> None:
    app = await start_appliance(site)
    delivered: asyncio.Queue = asyncio.Queue()

    async def phone_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        delivered.put_nowait(await StreamPhone(reader, writer).response())
        writer.close()

    listener = await asyncio.start_server(phone_listener, "127.0.0.1", 0)
    listen_port = listener.sockets[0].getsockname()[1]
    try:
        invite = request("INVITE", "TCP", ("127.0.0.1", listen_port), rport=False,
                         branch="z9hG4bKlost", uri=f"sip:1002@{REALM}")
        first = await stream_phone(app, "TCP")
        await first.send(invite)
        challenge = await first.response()
        assert challenge.status == 401
        first.close()
        await wait_until(lambda: app.service.transports.connection_count("TCP") == 0)
        # The INVITE is retransmitted on a new connection; the transaction re-sends its final
        # response, and with the original connection gone it goes to the sent-by port.
        second = await stream_phone(app, "TCP")
        await second.send(invite)
        resent = await asyncio.wait_for(delivered.get(), WAIT)
        assert resent.to_bytes() == challenge.to_bytes()
        second.close()
    finally:
        listener.close()
        await app.close()


# -- RFC 4475 / RFC 5118 torture vectors on the wire ---------------------------------------

VECTORS = Path(__file__).parent / "vectors" / "sip"


def wire_bytes(name: str) -> bytes:
    """The vector as sent (vectors/sip/verdicts.json ``_about.wire_bytes``)."""
    data = (VECTORS / name).read_bytes()
    if not name.startswith("rfc5118/"):
        return data
    data = re.sub(rb"(?<!\r)\n", b"\r\n", data)
    head, sep, body = data.partition(b"\r\n\r\n")
    head = re.sub(rb"(?im)^(content-length|l)\s*:\s*\d+", b"Content-Length: %d" % len(body), head)
    return head + sep + body


def _verdicts() -> dict:
    import json

    table = json.loads((VECTORS / "verdicts.json").read_text())
    table.pop("_about")
    return table


@run_async
async def test_torture_vectors_get_their_wire_answer(site: Path) -> None:
    """Every RFC 4475/5118 message gets the answer a registrar/B2BUA owes it, or none.

    Vectors arrive over a real socket (UDP, or TCP when their top Via says TCP/TLS). Their Vias
    name hosts and ports we do not own, so the service's UDP sends are observed at the
    transport's ``send`` and only those for the test's own socket go on the wire.
    """
    # longreq.dat has 34 Vias: above the site default of 32, so this site allows 70 (the
    # Max-Forwards a request starts with, RFC 3261 §8.1.1.6).
    app = await start_appliance(site, guard={"exempt_sources": "['127.0.0.1/32']"},
                                limits="{max_message_bytes: 65535, max_vias: 70}")
    phone = await udp_phone()
    sent: list[tuple[bytes, Source]] = []
    real_send = app.service.transports.send

    def observe(data: bytes, destination: Source) -> None:
        sent.append((data, destination))
        if destination.transport != "UDP" or destination.port == phone.local[1]:
            real_send(data, destination)

    app.service.transports.send = observe
    server = app.service.addresses["UDP"]
    failures = []
    try:
        for n, (name, verdict) in enumerate(sorted(_verdicts().items())):
            data = wire_bytes(name)
            marker = f"marker-{n}"
            top_via = re.search(rb"(?im)^(?:via|v)\s*:\s*SIP/2\.0/(\w+)", data)
            stream = top_via is not None and top_via.group(1).upper() in (b"TCP", b"TLS")
            del sent[:]
            # The RFCs' vectors reuse branches (e.g. z9hG4bKas3-111 in most of RFC 5118): sent
            # back to back they would be retransmissions of one transaction. Each is judged as
            # a transaction of its own.
            app.service.layer = TransactionLayer(app.service.timers)
            if stream:
                conn = await stream_phone(app, "TCP")
                await conn.send(data + request("OPTIONS", "TCP", conn.local, call_id=marker))
                answers = []
                while marker.encode() not in (raw := await conn.raw_response()):
                    answers.append(int(raw.split(b" ", 2)[1]))
                conn.close()
            else:
                phone.transport.sendto(data, server)
                phone.transport.sendto(request("OPTIONS", "UDP", phone.local, call_id=marker),
                                       server)
                await phone.response_to(marker, (1, "OPTIONS"))
                answers = [int(d.split(b" ", 2)[1]) for d, _ in sent
                           if marker.encode() not in d]
            # Whatever happened, no INVITE is left waiting for an answer that never comes.
            assert not [tx for tx in app.service.layer.transactions()
                        if tx.state is State.PROCEEDING], name
            wanted = verdict["wire"]
            if wanted == "drop":
                ok = answers == []
            else:
                allowed = wanted if isinstance(wanted, list) else [wanted]
                # One answer per request (two for dblreq's pair over TCP is not expected:
                # only UDP carries it); retransmissions of the same answer are fine.
                ok = bool(answers) and set(answers) <= set(allowed)
            if not ok:
                failures.append(f"{name}: wanted {wanted}, got {answers}")
        assert not failures, "\n".join(failures)
    finally:
        phone.transport.close()
        await app.close()


# -- SIPp as the phone ----------------------------------------------------------------------

SIPP_OPTIONS = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="options ping">
  <send retrans="500">
    <![CDATA[

      OPTIONS sip:[remote_ip]:[remote_port] SIP/2.0
      Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch];rport
      From: <sip:sipp@[local_ip]>;tag=[pid]SIPp[call_number]
      To: <sip:[remote_ip]:[remote_port]>
      Call-ID: [call_id]
      CSeq: 1 OPTIONS
      Max-Forwards: 70
      Accept: application/sdp
      Content-Length: 0

    ]]>
  </send>
  <recv response="200"/>
</scenario>
"""


@pytest.mark.skipif(shutil.which("sipp") is None, reason="SIPp (Debian sip-tester) missing")
@pytest.mark.parametrize("transport", ["UDP", "TCP"])
@run_async
async def test_sipp_options_pings(site: Path, transport: str) -> None:
    """SIPp, an independent SIP implementation, gets 200 for each of 50 OPTIONS."""
    app = await start_appliance(site)
    scenario = site / "options.xml"
    scenario.write_text(SIPP_OPTIONS)
    host, port = app.service.addresses[transport]
    # No -p: SIPp takes a free local port itself (and moves its media/control ports up when
    # another SIPp holds them).
    proc = await asyncio.create_subprocess_exec(
        "sipp", f"{host}:{port}", "-sf", str(scenario), "-m", "50", "-r", "40",
        "-t", "u1" if transport == "UDP" else "t1", "-i", "127.0.0.1",
        "-nostdin", "-timeout", "30s", "-timeout_error", "-trace_err",
        cwd=site, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        errors = "".join(p.read_text(errors="replace") for p in site.glob("*_errors.log"))
        assert proc.returncode == 0, (proc.returncode, errors[-2000:],
                                      out.decode(errors="replace")[-1500:])
        assert app.service.stats["requests"] >= 50
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await app.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600) | st.builds(
    lambda a, b: a + b, st.sampled_from([b"OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\n",
                                         b"INVITE sip:x SIP/2.0\r\nv: ", b"SIP/2.0 200 OK\r\n"]),
    st.binary(max_size=300)))
def test_error_response_scraping_never_raises(data: bytes) -> None:
    """Any bytes give None or one well-formed error response (no header injection)."""
    out = error_response_bytes(data, 400, "Bad\r\nInjected: 1")
    if out is not None:
        assert out.startswith(b"SIP/2.0 400 Bad Injected: 1\r\n")
        assert out.endswith(b"\r\nContent-Length: 0\r\n\r\n")
        head = out[:-4].split(b"\r\n")
        assert all(b"\n" not in line and b"\r" not in line for line in head)
        assert not any(line.startswith(b"Injected") for line in head)


# -- fuzz: mutated torture vectors never hurt the service -----------------------------------

def mutations(seed: int, count: int):
    """Seeded mutations of the vector corpus: byte flips, cuts, splices, CRLF noise."""
    import random

    rng = random.Random(seed)
    corpus = [wire_bytes(name) for name in sorted(_verdicts())]
    for _ in range(count):
        data = bytearray(rng.choice(corpus))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(5)
            at = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                del data[at:at + rng.randint(1, 40)]
            elif op == 2:
                data[at:at] = rng.choice([b"\r\n", b"\r\n\r\n", b",", b";", b":", b"\x00", b" "])
            elif op == 3:
                other = rng.choice(corpus)
                cut = rng.randrange(len(other))
                data[at:] = other[cut:]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        yield bytes(data)


async def _fuzz(site: Path, count: int, caplog) -> None:
    app = await start_appliance(site, guard={"exempt_sources": "['127.0.0.1/32']"},
                                limits="{max_message_bytes: 65535, max_vias: 70}")
    phone = await udp_phone()
    conn = await stream_phone(app, "TCP")
    server = app.service.addresses["UDP"]
    try:
        for i, data in enumerate(mutations(seed=4475, count=count)):
            phone.transport.sendto(data, server)
            if i % 4 == 0:
                conn.writer.write(data)
            if i % 50 == 49:  # stay in step: the service answers a plain OPTIONS in between
                marker = f"fuzz-{i}"
                phone.transport.sendto(
                    request("OPTIONS", "UDP", phone.local, call_id=marker), server)
                await phone.response_to(marker, (1, "OPTIONS"))
        # Still serving on every transport, nothing left waiting, no internal error.
        phone.transport.sendto(request("OPTIONS", "UDP", phone.local, call_id="end"), server)
        assert (await phone.response_to("end", (1, "OPTIONS"))).status == 200
        fresh = await stream_phone(app, "TCP")
        await fresh.send(request("OPTIONS", "TCP", fresh.local, call_id="end-tcp"))
        assert (await fresh.response()).status == 200
        fresh.close()
        assert not [tx for tx in app.service.layer.transactions()
                    if tx.state is State.PROCEEDING]
        assert not [r for r in caplog.records if "internal_error" in r.getMessage()]
        assert app.service.stats["malformed"] > 0
    finally:
        conn.close()
        phone.transport.close()
        await app.close()


def test_fuzzed_messages_leave_the_service_healthy(site: Path, caplog) -> None:
    asyncio.run(asyncio.wait_for(_fuzz(site, 400, caplog), 120))


@pytest.mark.long
def test_fuzzed_messages_soak(site: Path, caplog) -> None:
    asyncio.run(asyncio.wait_for(_fuzz(site, 20000, caplog), 600))


@run_async
async def test_full_transaction_table_answers_503(site: Path) -> None:
    app = await start_appliance(site)
    app.service.layer.max_transactions = 1
    phone = await udp_phone()
    try:
        server = app.service.addresses["UDP"]
        phone.transport.sendto(register("UDP", phone.local, call_id="t1"), server)
        assert (await phone.response_to("t1", (1, "REGISTER"))).status == 401
        # That transaction is held (timer J) and fills the table: the next one is refused.
        phone.transport.sendto(register("UDP", phone.local, call_id="t2"), server)
        busy = await phone.response_to("t2", (1, "REGISTER"))
        assert busy.status == 503 and busy.get("Retry-After") == "5"
        assert app.registrar.calls == 1 and len(app.service.layer) == 1
    finally:
        phone.transport.close()
        await app.close()


@run_async
async def test_client_transaction_over_dead_tcp_reports_transport_failure(site: Path) -> None:
    import socket

    app = await start_appliance(site)
    failed = asyncio.Event()
    events: list = []

    def on_event(event) -> None:
        events.append(event)
        if isinstance(event, TransportFailed):
            failed.set()

    app.service.on_transaction_event = on_event
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # closed again: nobody listens there
    try:
        host, port = app.service.addresses["TCP"]
        ping = parse_message(request("OPTIONS", "TCP", (host, port), call_id="dead",
                                     uri=f"sip:1001@127.0.0.1:{dead};transport=tcp"))
        key = app.service.send_request(ping, Source("TCP", "127.0.0.1", dead))
        await asyncio.wait_for(failed.wait(), WAIT)
        assert [type(e).__name__ for e in events] == ["TransportFailed", "TransactionTerminated"]
        assert all(e.key == key for e in events) and key not in app.service.layer
    finally:
        await app.close()


@run_async
async def test_held_register_answers_retransmissions_until_timer_j_even_when_full(
        site: Path) -> None:
    from appliance.sip.transaction import TimerConfig, TransactionTerminated

    app = await start_appliance(site)
    # Short timers (J = 64*T1 = 0.64 s) and room for one transaction only.
    app.service.layer = TransactionLayer(TimerConfig(t1=0.01, t2=0.04, t4=0.05),
                                         max_transactions=1)
    ended = asyncio.Event()
    app.service.on_transaction_event = (
        lambda ev: ended.set() if isinstance(ev, TransactionTerminated) else None)
    phone = await udp_phone()
    try:
        server = app.service.addresses["UDP"]
        first = register("UDP", phone.local, branch="z9hG4bKheld1", call_id="held-1")
        phone.transport.sendto(first, server)
        challenge = await phone.response_to("held-1", (1, "REGISTER"))
        assert challenge.status == 401 and app.service.layer.completed == 1
        # The table is full: a new request is refused with 503...
        phone.transport.sendto(register("UDP", phone.local, call_id="held-2"), server)
        busy = await phone.response_to("held-2", (1, "REGISTER"))
        assert busy.status == 503
        # ...while the held one still answers its retransmission, byte for byte.
        phone.transport.sendto(first, server)
        again = await phone.response_to("held-1", (1, "REGISTER"))
        assert again.to_bytes() == challenge.to_bytes() and app.registrar.calls == 1
        # Timer J ends it (the event reaches the transaction user); then there is room.
        await asyncio.wait_for(ended.wait(), WAIT)
        assert len(app.service.layer) == 0
        phone.transport.sendto(register("UDP", phone.local, call_id="held-3"), server)
        assert (await phone.response_to("held-3", (1, "REGISTER"))).status == 401
        assert app.registrar.calls == 2
    finally:
        phone.transport.close()
        await app.close()
