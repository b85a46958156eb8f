"""SIP transports over real sockets on loopback: UDP, TCP framing, keep-alives, limits."""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Awaitable, Callable

import pytest

from appliance.sip import transport as transport_module
from appliance.sip.source import Source
from appliance.sip.transport import (  # DatagramBatch, pack_address: the compiled UDP helper
    UDP_BUFFER_BYTES,
    DatagramBatch,
    SipTransports,
    pack_address,
    response_destination,
    stamp_via,
)
from media_core.sip import Limits, RemoteProtocolError, parse_message

WAIT = 10.0  # bound on every wait for an event; never decides a pass by itself


def run_async(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


def options(branch: str = "z9hG4bKt1", via: str = "SIP/2.0/UDP 192.0.2.1:5070", *,
            call_id: str = "c1", body: bytes = b"", rport: bool = True) -> bytes:
    head = (
        "OPTIONS sip:edgecc.local SIP/2.0\r\n"
        f"Via: {via};branch={branch}{';rport' if rport else ''}\r\n"
        "Max-Forwards: 70\r\n"
        "From: <sip:1001@edgecc.local>;tag=a1\r\n"
        "To: <sip:edgecc.local>\r\n"
        f"Call-ID: {call_id}\r\n"
        "CSeq: 1 OPTIONS\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Recorder:
    """Collects what the transports deliver and lets a test wait for it."""

    def __init__(self) -> None:
        self.messages: asyncio.Queue = asyncio.Queue()
        self.malformed: asyncio.Queue = asyncio.Queue()
        self.failed: asyncio.Queue = asyncio.Queue()

    def on_message(self, message, source: Source) -> None:
        self.messages.put_nowait((message, source))

    def on_malformed(self, data: bytes, error: RemoteProtocolError, source: Source) -> None:
        self.malformed.put_nowait((data, error, source))

    def on_send_failed(self, destination: Source, exc: BaseException) -> None:
        self.failed.put_nowait((destination, exc))

    async def next(self, queue: str = "messages"):
        return await asyncio.wait_for(getattr(self, queue).get(), WAIT)


async def started(rec: Recorder, bind: str = "127.0.0.1", **kwargs) -> SipTransports:
    transports = SipTransports(
        on_message=rec.on_message, on_malformed=rec.on_malformed,
        on_send_failed=rec.on_send_failed, **kwargs,
    )
    await transports.start(bind, udp_port=0, tcp_port=0)
    return transports


class UdpPeer(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data: bytes, addr) -> None:
        self.received.put_nowait((data, addr))


async def udp_peer(host: str = "127.0.0.1"):
    loop = asyncio.get_running_loop()
    transport, peer = await loop.create_datagram_endpoint(UdpPeer, local_addr=(host, 0))
    return transport, peer


# -- Via stamping and response routing (RFC 3261 §18.2, RFC 3581) ----------------------------

def test_stamp_via_fills_rport_and_received() -> None:
    msg = parse_message(options(via="SIP/2.0/UDP 10.0.0.5:5070"))
    stamp_via(msg, Source("UDP", "203.0.113.9", 40123))
    via = msg.top_via
    assert via.received == "203.0.113.9" and via.rport == "40123"
    assert via.branch == "z9hG4bKt1" and via.host == "10.0.0.5" and via.port == 5070
    # The stamped Via survives serialization and is what a response copies.
    again = parse_message(msg.to_bytes())
    assert again.top_via.rport == "40123" and again.top_via.received == "203.0.113.9"


def test_stamp_via_received_only_when_host_differs() -> None:
    msg = parse_message(options(via="SIP/2.0/UDP 10.0.0.5:5070", rport=False))
    stamp_via(msg, Source("UDP", "203.0.113.9", 5070))
    assert msg.top_via.received == "203.0.113.9" and msg.top_via.rport is None
    same = parse_message(options(via="SIP/2.0/UDP 203.0.113.9:5070", rport=False))
    before = same.to_bytes()
    stamp_via(same, Source("UDP", "203.0.113.9", 5070))
    assert same.to_bytes() == before


def test_stamp_via_touches_only_the_top_via() -> None:
    text = options(via="SIP/2.0/UDP 10.0.0.5:5070").replace(
        b"Max-Forwards", b"Via: SIP/2.0/UDP 10.0.0.6;branch=z9hG4bKlower\r\nMax-Forwards")
    msg = parse_message(text)
    stamp_via(msg, Source("UDP", "203.0.113.9", 4000))
    assert [v.branch for v in msg.vias] == ["z9hG4bKt1", "z9hG4bKlower"]
    assert msg.vias[1].received is None


def test_response_destination_rules() -> None:
    src = Source("UDP", "203.0.113.9", 40123)
    with_rport = parse_message(options(via="SIP/2.0/UDP 10.0.0.5:5070"))
    assert response_destination(with_rport, src) == src
    without = parse_message(options(via="SIP/2.0/UDP 10.0.0.5:5070", rport=False))
    assert response_destination(without, src) == Source("UDP", "203.0.113.9", 5070)
    no_port = parse_message(options(via="SIP/2.0/UDP 10.0.0.5", rport=False))
    assert response_destination(no_port, src) == Source("UDP", "203.0.113.9", 5060)
    tcp = Source("TCP", "203.0.113.9", 40123)
    assert response_destination(without, tcp) == tcp


# -- UDP -------------------------------------------------------------------------------------

@run_async
async def test_udp_delivers_with_source_and_ignores_stray_crlf() -> None:
    rec = Recorder()
    transports = await started(rec)
    transport, peer = await udp_peer()
    try:
        dest = transports.addresses["UDP"]
        transport.sendto(b"\r\n\r\n", dest)
        transport.sendto(options(), dest)
        message, source = await rec.next()
        assert source == Source("UDP", "127.0.0.1", transport.get_extra_info("sockname")[1])
        assert message.method == "OPTIONS" and message.top_via.rport == str(source.port)
        assert rec.messages.empty() and rec.malformed.empty()
        transports.send(b"pong", source)
        data, _ = await asyncio.wait_for(peer.received.get(), WAIT)
        assert data == b"pong"
    finally:
        transport.close()
        await transports.close()


@run_async
async def test_udp_garbage_goes_to_malformed_and_transport_lives() -> None:
    rec = Recorder()
    transports = await started(rec)
    transport, _ = await udp_peer()
    try:
        dest = transports.addresses["UDP"]
        transport.sendto(b"OPTIONS sip:x SIP/2.0\r\nVia: nonsense\r\n\r\n", dest)
        data, error, source = await rec.next("malformed")
        assert isinstance(error, RemoteProtocolError) and data.startswith(b"OPTIONS")
        transport.sendto(options(), dest)
        message, _ = await rec.next()
        assert message.method == "OPTIONS"
    finally:
        transport.close()
        await transports.close()


# -- TCP -------------------------------------------------------------------------------------

@run_async
async def test_tcp_framing_byte_by_byte_and_batched() -> None:
    rec = Recorder()
    transports = await started(rec)
    host, port = transports.addresses["TCP"]
    reader, writer = await asyncio.open_connection(host, port)
    try:
        body = b"v=0\r\n"
        first = options(branch="z9hG4bKa", call_id="c-a", body=body)
        for i in range(len(first)):
            writer.write(first[i:i + 1])
            await writer.drain()
        message, source = await rec.next()
        assert message.call_id == "c-a" and message.body == body
        assert source.transport == "TCP"
        # Two messages and a keep-alive in one segment, then one split across three.
        writer.write(options(branch="z9hG4bKb", call_id="c-b") + b"\r\n\r\n"
                     + options(branch="z9hG4bKc", call_id="c-c"))
        third = options(branch="z9hG4bKd", call_id="c-d", body=b"x" * 300)
        writer.write(third[:50])
        await writer.drain()
        assert [(await rec.next())[0].call_id for _ in range(2)] == ["c-b", "c-c"]
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
        writer.write(third[50:200])
        await writer.drain()
        writer.write(third[200:])
        got = (await rec.next())[0]
        assert got.call_id == "c-d" and got.body == b"x" * 300
        assert transports.connection_count("TCP") == 1
    finally:
        writer.close()
        await transports.close()


@run_async
async def test_tcp_keepalive_ping_gets_pong() -> None:
    rec = Recorder()
    transports = await started(rec)
    reader, writer = await asyncio.open_connection(*transports.addresses["TCP"])
    try:
        for _ in range(3):
            writer.write(b"\r\n\r\n")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
        assert rec.messages.empty()
    finally:
        writer.close()
        await transports.close()


@run_async
async def test_tcp_oversized_message_closes_only_that_connection() -> None:
    rec = Recorder()
    transports = await started(rec, limits=Limits(max_message_bytes=4096))
    addr = transports.addresses["TCP"]
    good_r, good_w = await asyncio.open_connection(*addr)
    bad_r, bad_w = await asyncio.open_connection(*addr)
    try:
        good_w.write(b"\r\n\r\n")
        await good_w.drain()
        assert await asyncio.wait_for(good_r.readexactly(2), WAIT) == b"\r\n"
        huge = options(call_id="huge", body=b"y" * 200_000)
        bad_w.write(huge)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(bad_r.readexactly(1 << 20), WAIT)  # EOF: closed by us
        _, error, source = await rec.next("malformed")
        assert error.status == 413 and source.transport == "TCP"
        assert rec.messages.empty()  # nothing of the oversized message got through
        good_w.write(options(call_id="still-here"))
        message, _ = await rec.next()
        assert message.call_id == "still-here"
        assert transports.connection_count("TCP") == 1
    finally:
        good_w.close()
        bad_w.close()
        await transports.close()


@run_async
async def test_idle_connections_are_closed() -> None:
    rec = Recorder()
    transports = await started(rec, idle_timeout=0.2)
    reader, writer = await asyncio.open_connection(*transports.addresses["TCP"])
    try:
        assert await asyncio.wait_for(reader.read(), WAIT) == b""  # EOF from the sweeper
        for _ in range(100):
            if transports.connection_count() == 0:
                break
            await asyncio.sleep(0.01)  # let connection_lost run
        assert transports.connection_count() == 0
    finally:
        writer.close()
        await transports.close()


@run_async
async def test_connection_limit_refuses_extra_connections() -> None:
    rec = Recorder()
    transports = await started(rec, max_connections=1)
    addr = transports.addresses["TCP"]
    r1, w1 = await asyncio.open_connection(*addr)
    w1.write(b"\r\n\r\n")
    assert await asyncio.wait_for(r1.readexactly(2), WAIT) == b"\r\n"
    r2, w2 = await asyncio.open_connection(*addr)
    try:
        assert await asyncio.wait_for(r2.read(), WAIT) == b""
        w1.write(options(call_id="first"))
        assert (await rec.next())[0].call_id == "first"
    finally:
        w1.close()
        w2.close()
        await transports.close()


@run_async
async def test_send_over_existing_and_new_tcp_connections() -> None:
    rec = Recorder()
    transports = await started(rec)
    reader, writer = await asyncio.open_connection(*transports.addresses["TCP"])
    # A phone listening for TCP (as when a request must be sent to a registered contact).
    phone_got: asyncio.Queue = asyncio.Queue()

    async def phone(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        phone_got.put_nowait(await r.readexactly(5))
        w.close()

    server = await asyncio.start_server(phone, "127.0.0.1", 0)
    try:
        writer.write(options(call_id="hello"))
        _, source = await rec.next()
        transports.send(b"reply", source)
        assert await asyncio.wait_for(reader.readexactly(5), WAIT) == b"reply"
        phone_port = server.sockets[0].getsockname()[1]
        transports.send(b"hello", Source("TCP", "127.0.0.1", phone_port))
        assert await asyncio.wait_for(phone_got.get(), WAIT) == b"hello"
        # Nobody listens on a closed port: the failure is reported, nothing raised.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        transports.send(b"x", Source("TCP", "127.0.0.1", dead))
        destination, exc = await rec.next("failed")
        assert destination.port == dead and isinstance(exc, OSError)
    finally:
        writer.close()
        server.close()
        await transports.close()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback on this host")
@run_async
async def test_ipv6_udp_and_tcp() -> None:
    rec = Recorder()
    transports = await started(rec, bind="::1")
    transport, peer = await udp_peer("::1")
    try:
        assert transports.addresses["UDP"][0] == "::1"
        transport.sendto(options(via="SIP/2.0/UDP [2001:db8::1]:5070"),
                         transports.addresses["UDP"])
        message, source = await rec.next()
        assert source.host == "::1" and message.top_via.received == "::1"
        reader, writer = await asyncio.open_connection(*transports.addresses["TCP"])
        writer.write(b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
        writer.close()
    finally:
        transport.close()
        await transports.close()


@run_async
async def test_failed_start_releases_what_it_bound() -> None:
    rec = Recorder()
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        transports = SipTransports(on_message=rec.on_message, on_malformed=rec.on_malformed)
        with pytest.raises(OSError):
            await transports.start("127.0.0.1", udp_port=0, tcp_port=taken.getsockname()[1])
        # The UDP socket bound before the TCP bind failed is closed again.
        udp_port = transports.addresses["UDP"][1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", udp_port))
        with pytest.raises(ValueError):
            await SipTransports(on_message=rec.on_message, on_malformed=rec.on_malformed).start(
                "127.0.0.1", udp_port=None, tcp_port=None, tls_port=0)
    finally:
        taken.close()


def _kernel_max(name: str) -> int | None:
    try:
        with open(f"/proc/sys/net/core/{name}") as f:
            return int(f.read())
    except OSError:
        return None


@run_async
async def test_udp_socket_buffers_are_raised_within_the_system_max() -> None:
    rec = Recorder()
    transports = await started(rec, udp_buffer_bytes=UDP_BUFFER_BYTES)
    try:
        rcvbuf, sndbuf = transports.udp_socket_buffers()
        for got, limit in ((rcvbuf, _kernel_max("rmem_max")), (sndbuf, _kernel_max("wmem_max"))):
            if limit is None:
                continue
            # Linux reports twice what it granted (bookkeeping overhead), capped by the max.
            assert got >= 2 * min(UDP_BUFFER_BYTES, limit)
    finally:
        await transports.close()
    assert transports.udp_socket_buffers() is None


@run_async
async def test_udp_burst_is_delivered_whole_and_in_order() -> None:
    rec = Recorder()
    transports = await started(rec)
    dest = transports.addresses["UDP"]
    burst = 300
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind(("127.0.0.1", 0))
            # Sent back to back before the loop gets to read any: the socket buffer holds them
            # and each wake-up of the reader takes several.
            for n in range(burst):
                phone.sendto(options(branch=f"z9hG4bKburst{n}", call_id=f"burst-{n}"), dest)
            got = [(await rec.next())[0].call_id for _ in range(burst)]
        assert got == [f"burst-{n}" for n in range(burst)]
        assert rec.malformed.empty()
    finally:
        await transports.close()


@run_async
async def test_udp_send_to_an_unreachable_port_keeps_the_socket_serving() -> None:
    rec = Recorder()
    transports = await started(rec)
    transport, peer = await udp_peer()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as gone:
            gone.bind(("127.0.0.1", 0))
            dead = Source("UDP", "127.0.0.1", gone.getsockname()[1])
        for _ in range(3):
            transports.send(b"nobody listens", dead)  # ICMP port unreachable comes back
        transport.sendto(options(call_id="after"), transports.addresses["UDP"])
        message, source = await rec.next()
        assert message.call_id == "after"
        transports.send(b"pong", source)
        data, _ = await asyncio.wait_for(peer.received.get(), WAIT)
        assert data == b"pong"
        assert rec.failed.empty()
    finally:
        transport.close()
        await transports.close()


@run_async
async def test_udp_answers_sent_during_a_batch_all_arrive_in_order() -> None:
    # Every message of a burst is answered from inside the read batch; the answers are held
    # until the batch is handled and then go out together, in the order they were sent.
    replies: list[Source] = []
    transports: SipTransports | None = None

    def on_message(message, source: Source) -> None:
        assert transports is not None
        replies.append(source)
        transports.send(f"answer {message.call_id}".encode(), source)

    transports = SipTransports(on_message=on_message, on_malformed=lambda *a: None)
    await transports.start("127.0.0.1", udp_port=0, tcp_port=None)
    burst = 300
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
            phone.bind(("127.0.0.1", 0))
            phone.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            phone.setblocking(False)
            dest = transports.addresses["UDP"]
            for n in range(burst):
                phone.sendto(options(branch=f"z9hG4bKb{n}", call_id=f"b-{n}"), dest)
            loop = asyncio.get_running_loop()
            got = [await asyncio.wait_for(loop.sock_recv(phone, 2048), WAIT)
                   for _ in range(burst)]
            phone_address = Source("UDP", "127.0.0.1", phone.getsockname()[1])
        assert got == [f"answer b-{n}".encode() for n in range(burst)]
        # One Source object per peer address, reused for every datagram from it.
        assert len({id(s) for s in replies}) == 1
        assert replies[0] == phone_address
    finally:
        await transports.close()


@run_async
async def test_udp_send_to_a_host_name_and_to_a_bad_address() -> None:
    rec = Recorder()
    transports = await started(rec)
    transport, peer = await udp_peer()
    try:
        port = transport.get_extra_info("sockname")[1]
        transports.send(b"by name", Source("UDP", "localhost", port))
        transports.send(b"nowhere", Source("UDP", "no-such-host.invalid", port))
        transports.send(b"wrong family", Source("UDP", "::1", port))
        transports.send(b"by address", Source("UDP", "127.0.0.1", port))
        first, _ = await asyncio.wait_for(peer.received.get(), WAIT)
        second, _ = await asyncio.wait_for(peer.received.get(), WAIT)
        assert {first, second} == {b"by name", b"by address"}
        assert rec.failed.empty()
    finally:
        transport.close()
        await transports.close()


def test_datagram_batch_send_stops_at_a_full_socket_and_resumes() -> None:
    # A Unix datagram pair says "full" (EAGAIN) once the reader's queue is full, which a UDP
    # socket on loopback never does: the batch must report where it stopped, and nothing of
    # the queue may be lost or reordered when it goes on from there.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        left.setblocking(False)
        right.setblocking(False)
        io = DatagramBatch(left.fileno(), 8, 2048, lambda host, port: (host, port))
        queue = [(f"datagram {n:05d}".encode(), b"") for n in range(5000)]
        got: list[bytes] = []
        start = stops = 0
        for _ in range(5000):
            start, failed, err = io.send(queue, start)
            assert (failed, err) == (0, 0)
            if start == len(queue):
                break
            stops += 1
            while True:  # drain, as the peer would
                try:
                    got.append(right.recv(2048))
                except BlockingIOError:
                    break
        while True:
            try:
                got.append(right.recv(2048))
            except BlockingIOError:
                break
        assert stops > 0  # the socket did fill up
        assert got == [data for data, _ in queue]


def test_datagram_batch_receive_and_addresses() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        server.bind(("127.0.0.1", 0))
        server.setblocking(False)
        phone.bind(("127.0.0.1", 0))
        io = DatagramBatch(server.fileno(), 4, 64, lambda host, port: ("peer", host, port))
        assert io.receive() == []  # nothing waiting
        for n in range(6):
            phone.sendto(b"x" * (10 * n) + b"!" * 100, server.getsockname())
        first, second = io.receive(), io.receive()
        assert [len(d) for d, _ in first] == [64] * 4  # cut at max_datagram, as recvfrom does
        assert len(second) == 2
        peer = ("peer", "127.0.0.1", phone.getsockname()[1])
        assert all(p == peer for _, p in first + second)
        assert first[0][1] is second[1][1]  # one object per address
        name = pack_address(socket.AF_INET, phone.getsockname())
        assert io.send([(b"back", name)]) == (1, 0, 0)
        assert phone.recv(64) == b"back"
    with pytest.raises(ValueError):
        pack_address(socket.AF_INET, ("localhost", 5060))
    with pytest.raises(ValueError):
        pack_address(socket.AF_INET, ("127.0.0.1", 70000))
    with pytest.raises(ValueError):
        pack_address(socket.AF_INET6, ("127.0.0.1", 5060))
    with pytest.raises(ValueError):
        DatagramBatch(0, 0, 64, tuple)
    assert len(pack_address(socket.AF_INET6, ("::1", 5060, 0, 0))) == 28


@run_async
async def test_udp_queue_waits_for_a_full_socket_in_order_and_stays_bounded() -> None:
    # UDP on loopback never reports a full socket, a Unix datagram pair does: drive the UDP
    # sender over one to see the queue wait for the writer callback, in order, and stay bounded.
    rec = Recorder()
    transports = SipTransports(on_message=rec.on_message, on_malformed=rec.on_malformed)
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    left.setblocking(False)
    right.setblocking(False)
    sender = transport_module._Datagrams(transports, left)
    sender._addresses[("peer", 1)] = b""  # the pair is connected: no address on each send
    loop = asyncio.get_running_loop()
    try:
        sent = [f"datagram {n:04d}".encode() for n in range(2000)]
        for data in sent:
            sender.send(data, "peer", 1)
        assert sender._queue, "the pair filled up and the rest waits"
        got = [await asyncio.wait_for(loop.sock_recv(right, 64), WAIT) for _ in sent]
        assert got == sent
        assert not sender._queue and sender._queued_bytes == 0

        # With nobody reading, what is queued stops at the backlog limit; the rest is dropped.
        big = b"x" * 60000
        for _ in range(2 * transport_module._SEND_BACKLOG_BYTES // len(big)):
            sender.send(big, "peer", 1)
        assert 0 < sender._queued_bytes <= transport_module._SEND_BACKLOG_BYTES
    finally:
        sender.close()
        right.close()
    assert sender.closed.done()


class _CountingBatch:
    """The transport's real DatagramBatch, with each ``send`` call's datagrams noted."""

    def __init__(self, io: DatagramBatch) -> None:
        self.io = io
        self.calls: list[int] = []

    def send(self, queue: list, start: int = 0) -> tuple:
        self.calls.append(len(queue) - start)
        return self.io.send(queue, start)

    def receive(self) -> list:
        return self.io.receive()


@run_async
async def test_udp_sends_of_one_loop_turn_go_out_in_one_call_in_order() -> None:
    # Sends made outside a read batch (timers, media events, tasks) by several callbacks of
    # one loop turn leave together at the end of the turn, in the order they were made; a
    # datagram the kernel refuses (port 0) is dropped alone.
    rec = Recorder()
    transports = await started(rec)
    transport, peer = await udp_peer()
    udp = transports._udp
    assert udp is not None
    counting = _CountingBatch(udp._io)
    udp._io = counting
    loop = asyncio.get_running_loop()
    try:
        port = transport.get_extra_info("sockname")[1]
        dest = Source("UDP", "127.0.0.1", port)
        order = [b"one", b"two", b"refused", b"three", b"four"]

        def send(data: bytes) -> None:
            transports.send(data, Source("UDP", "127.0.0.1", 0) if data == b"refused" else dest)

        for data in order:
            loop.call_soon(send, data)
        got = [(await asyncio.wait_for(peer.received.get(), WAIT))[0] for _ in range(4)]
        assert got == [b"one", b"two", b"three", b"four"]
        assert counting.calls == [5]
        assert not udp._queue and udp._queued_bytes == 0

        # The next turn's send is a call of its own.
        transports.send(b"five", dest)
        assert (await asyncio.wait_for(peer.received.get(), WAIT))[0] == b"five"
        assert counting.calls == [5, 1]
    finally:
        transport.close()
        await transports.close()


@run_async
async def test_udp_send_then_close_in_the_same_turn_sends_nothing_and_raises_nothing() -> None:
    rec = Recorder()
    transports = await started(rec)
    transport, peer = await udp_peer()
    try:
        port = transport.get_extra_info("sockname")[1]
        transports.send(b"late", Source("UDP", "127.0.0.1", port))
        await transports.close()
        await asyncio.sleep(0)  # the turn the flush would have run in
        assert peer.received.empty()
    finally:
        transport.close()
