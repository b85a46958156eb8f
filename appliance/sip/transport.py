"""asyncio SIP transports: UDP, TCP and TLS listeners (RFC 3261 §18, RFC 3581, RFC 5626 §3.5.1).

The transports only frame, parse and deliver: every received message goes to ``on_message``
with the ``Source`` it came from, every message that cannot be parsed to ``on_malformed``.
Requests get ``received``/``rport`` stamped on their top Via (RFC 3261 §18.2.1, RFC 3581 §4)
before they are delivered. ``send(data, destination)`` writes to a UDP peer, or to the open
stream connection of a TCP/TLS peer (opening one when none is open).

Limits: one ``StreamFramer`` per connection (its buffer limit comes from the codec's
``Limits``), a cap on queued outgoing bytes per connection (``stream_buffer_bytes``), a cap on
open connections, and idle connections closed after ``idle_timeout``. A connection that breaks a
limit is closed alone; the others carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.sip._udp import DatagramBatch, pack_address
from appliance.sip.source import Source
from media_core.sip import (
    Limits,
    LocalProtocolError,
    RemoteProtocolError,
    SipMessage,
    StreamFramer,
    parse_message,
)

__all__ = [
    "SipTransports",
    "response_destination",
    "server_ssl_context",
    "stamp_via",
]

log = logging.getLogger("edgecc.sip.transport")

STREAM_TRANSPORTS = frozenset({"TCP", "TLS"})
DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "TLS": 5061}
UDP_BUFFER_BYTES = 4 * 1024 * 1024
"""SO_RCVBUF/SO_SNDBUF asked for on the UDP socket (the kernel caps it at its rmem/wmem_max):
a registration storm arrives in bursts, and a datagram dropped by a full buffer costs the phone
a 500 ms retransmission (RFC 3261 Timer E)."""
_CRLF = b"\r\n"
_KEEPALIVE_BYTES = b"\r\n \t\0"
_RECV_BATCH = 64  # datagrams read per wake-up before the loop serves anything else
_RECV_ERRORS = 8  # socket errors (ICMP reports) skipped per wake-up before giving way
_MAX_DATAGRAM = 65536
_SEND_BACKLOG_BYTES = 4 * 1024 * 1024  # queued while the socket is full; beyond it, dropped
_MAX_SOURCES = 4096  # cached Source objects (one per peer address)

OnMessage = Callable[[SipMessage, Source], None]
OnMalformed = Callable[[bytes, RemoteProtocolError, Source], None]
OnSendFailed = Callable[[Source, BaseException], None]


def server_ssl_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS server context for SIP over TLS (RFC 3261 §26.3.1: TLS 1.2 or newer)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


def stamp_via(message: SipMessage, source: Source) -> None:
    """Add ``received`` (and fill ``rport``) on the top Via of a received request.

    RFC 3261 §18.2.1: ``received`` when sent-by is not the packet's source address.
    RFC 3581 §4: when the client asked with an empty ``rport``, set ``rport`` to the source
    port and always add ``received``. Raises ``RemoteProtocolError`` for a missing Via.
    """
    via = message.top_via  # parsed once, kept by the message for the layers after this one
    asked_rport = via.rport is not None
    if not asked_rport and via.host.strip("[]").lower() == source.host.lower():
        return
    vias = message.get_all("Via")
    params = dict(via.params)
    params["received"] = source.host
    if asked_rport:
        params["rport"] = str(source.port)
    sent_by = via.host if via.port is None else f"{via.host}:{via.port}"
    top = f"{via.protocol}/{via.transport} {sent_by}" + "".join(
        f";{k}" if v is None else f";{k}={v}" for k, v in params.items()
    )
    # RFC 3261 §7.3.1: the Via entries may share one field line; ``set`` keeps them in order at
    # the place of the first Via and keeps the codec's parsed views in step.
    message.set("Via", ", ".join([top, *vias[1:]]))


def response_destination(request: SipMessage, source: Source) -> Source:
    """Where responses to ``request`` go (RFC 3261 §18.2.2, RFC 3581 §4).

    Streams: back over the connection the request came on. UDP: to the source address, and to
    the source port when the client asked for ``rport``, else to the sent-by port.
    """
    if source.transport in STREAM_TRANSPORTS:
        return source
    via = request.top_via
    if via.rport is not None:
        return source
    return Source(source.transport, source.host, via.port or DEFAULT_PORTS["UDP"])


def _peer(transport: asyncio.BaseTransport) -> tuple[str, int]:
    addr = transport.get_extra_info("peername")
    return str(addr[0]), int(addr[1])


class _Datagrams:
    """The UDP socket, read and written in batches straight from the event loop's selector.

    Each wake-up reads up to ``_RECV_BATCH`` datagrams with one ``recvmmsg`` (asyncio's datagram
    transport reads one per loop iteration). What the batch's messages send is queued and goes
    out with one ``sendmmsg`` once the batch is handled; what is sent outside a batch (timers,
    media events, call control's tasks) goes out with one ``sendmmsg`` at the end of the event
    loop's turn (``call_soon``), in the order it was sent. Datagrams wait longer only while the
    socket is full, up to ``_SEND_BACKLOG_BYTES``.
    """

    def __init__(self, owner: SipTransports, sock: socket.socket) -> None:
        self.owner = owner
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.closed = self.loop.create_future()
        self._io = DatagramBatch(sock.fileno(), _RECV_BATCH, _MAX_DATAGRAM,
                                 functools.partial(Source, "UDP"), _MAX_SOURCES)
        self._addresses: dict[tuple[str, int], bytes] = {}
        self._queue: list[tuple[bytes, bytes]] = []
        self._queued_bytes = 0
        self._reading = False
        self._writer_armed = False
        self._flush_handle: asyncio.Handle | None = None
        self.loop.add_reader(sock.fileno(), self._read_ready)

    def _read_ready(self) -> None:
        deliver = self.owner.deliver_datagram
        sock = self.sock
        self._reading = True
        try:
            for _ in range(_RECV_ERRORS):
                try:
                    batch = self._io.receive()
                except OSError as exc:
                    # ICMP errors for earlier sends (e.g. port unreachable); the socket stays
                    # usable and the datagrams behind the error are read on the next try.
                    log.debug("event=sip_udp_error error=%s", exc.__class__.__name__)
                    continue
                for data, source in batch:
                    # RFC 5626 §3.5.1 keep-alives belong to streams; phones still send bare
                    # CRLFs on UDP.
                    if data[:1] in _KEEPALIVE_BYTES and not data.strip(_KEEPALIVE_BYTES):
                        continue
                    deliver(data, source)
                    if sock.fileno() < 0:
                        return  # closed by what the message caused
                return
        finally:
            self._reading = False
            if self._queue and not self._writer_armed and self._flush_handle is None:
                self._flush()

    def send(self, data: bytes, host: str, port: int) -> None:
        name = self._addresses.get((host, port))
        if name is None:
            name = self._address(host, port)
            if name is None:
                return
        if type(data) is not bytes:
            data = bytes(data)
        # UDP may lose a datagram; what matters is that the queue stays bounded (the
        # transaction layer retransmits what needs to arrive, RFC 3261 §17).
        if self._queued_bytes + len(data) > _SEND_BACKLOG_BYTES:
            log.debug("event=sip_udp_send_dropped bytes=%d", len(data))
            return
        self._queue.append((data, name))
        self._queued_bytes += len(data)
        if not self._reading and not self._writer_armed and self._flush_handle is None:
            # Callbacks run in this turn after this one may send too: one sendmmsg for all.
            self._flush_handle = self.loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._flush_handle = None
        if self._queue and not self._writer_armed:
            self._flush()

    def _address(self, host: str, port: int) -> bytes | None:
        """The packed socket address of a destination; numeric ones are cached."""
        family = self.sock.family
        try:
            name = pack_address(family, (host, port))
        except ValueError:
            name = None
        if name is not None:
            if len(self._addresses) >= _MAX_SOURCES:
                self._addresses.clear()
            self._addresses[(host, port)] = name
            return name
        try:  # a host name: resolved as sendto() would, for this send only
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_DGRAM)
            return pack_address(family, infos[0][4])
        except (OSError, ValueError, IndexError) as exc:
            log.debug("event=sip_udp_error error=%s", exc.__class__.__name__)
            return None

    def _flush(self) -> None:
        queue = self._queue
        fd = self.sock.fileno()
        if fd < 0:
            return
        sent, failed, err = self._io.send(queue)
        if failed:
            log.debug("event=sip_udp_error error=%s dropped=%d",
                      OSError(err, "").__class__.__name__, failed)
        if sent >= len(queue):
            queue.clear()
            self._queued_bytes = 0
            if self._writer_armed:
                self.loop.remove_writer(fd)
                self._writer_armed = False
            return
        del queue[:sent]
        self._queued_bytes = sum(len(data) for data, _ in queue)
        if not self._writer_armed:
            self.loop.add_writer(fd, self._flush)
            self._writer_armed = True

    def close(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.loop.remove_writer(self.sock.fileno())
            self.sock.close()
        self._queue.clear()
        self._queued_bytes = 0
        self._writer_armed = False
        if not self.closed.done():
            self.closed.set_result(None)


async def _udp_socket(bind: str, port: int, buffer_bytes: int) -> socket.socket:
    """A bound, non-blocking UDP socket with large kernel buffers (IPv4 or IPv6)."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        bind, port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP
    )
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, option, buffer_bytes)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class _Stream(asyncio.Protocol):
    """One TCP or TLS connection."""

    def __init__(self, owner: SipTransports, name: str) -> None:
        self.owner = owner
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.framer = StreamFramer(owner.limits, max_buffer_bytes=owner.stream_buffer_bytes)
        self.source: Source | None = None
        self.last_active = owner.clock()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        host, port = _peer(transport)
        self.source = Source(self.name, host, port)
        if not self.owner.adopt(self):
            log.warning("event=sip_connection_refused transport=%s source=%s reason=too_many",
                        self.name, host)
            transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.forget(self)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        assert self.source is not None and self.transport is not None
        self.last_active = self.owner.clock()
        pings = self.framer.keepalive_pings
        try:
            self.framer.feed(data)
        except RemoteProtocolError as exc:
            self.fail(data, exc)
            return
        while not self.transport.is_closing():
            try:
                message = self.framer.next_message()
            except RemoteProtocolError as exc:
                # A message with bad content: answered (or dropped), the stream goes on...
                self.owner.on_malformed(data, exc, self.source)
                continue
            except LocalProtocolError:
                # ...unless the framer lost the message boundaries with it (a body over the
                # size limit, a bad Content-Length) and refuses further use: the answer went
                # out above, now this connection goes (RFC 3261 §18.3).
                self.close_quietly("unframeable")
                return
            except Exception:  # a codec bug must cost this connection only
                log.exception("event=sip_internal_error where=framer transport=%s", self.name)
                self.close_quietly("internal_error")
                return
            if message is None:
                break
            self.owner.deliver(message, self.source)
        # RFC 5626 §4.4.1: answer every CRLFCRLF ping with one CRLF pong.
        for _ in range(self.framer.keepalive_pings - pings):
            self.write(_CRLF)

    def write(self, data: bytes) -> bool:
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        transport.write(data)
        self.last_active = self.owner.clock()
        if transport.get_write_buffer_size() > self.owner.stream_buffer_bytes:
            # The peer stopped reading: drop the connection rather than queue without bound.
            log.warning("event=sip_connection_closed transport=%s source=%s reason=write_backlog",
                        self.name, self.source.host if self.source else "")
            transport.abort()
            return False
        return True

    def fail(self, data: bytes, exc: RemoteProtocolError) -> None:
        """Report the error (the owner answers what can be answered), close this connection."""
        assert self.source is not None
        self.owner.on_malformed(data, exc, self.source)
        self.close_quietly(exc.reason.replace(" ", "_"))

    def close_quietly(self, reason: str) -> None:
        """Close this connection alone; queued bytes (an error answer) are flushed first."""
        assert self.source is not None and self.transport is not None
        log.info("event=sip_connection_closed transport=%s source=%s:%d reason=%s",
                 self.name, self.source.host, self.source.port, reason)
        self.transport.close()


class SipTransports:
    """The UDP, TCP and TLS listeners of one SIP endpoint, and its stream connections."""

    def __init__(
        self,
        *,
        on_message: OnMessage,
        on_malformed: OnMalformed,
        on_send_failed: OnSendFailed | None = None,
        limits: Limits | None = None,
        stream_buffer_bytes: int = 262144,
        idle_timeout: float = 300.0,
        max_connections: int = 4096,
        client_ssl: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.monotonic,
        udp_buffer_bytes: int = UDP_BUFFER_BYTES,
    ) -> None:
        self.on_message = on_message
        self.on_malformed = on_malformed
        self.on_send_failed = on_send_failed
        self.limits = limits or Limits()
        self.stream_buffer_bytes = stream_buffer_bytes
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.client_ssl = client_ssl
        self.clock = clock
        self.udp_buffer_bytes = udp_buffer_bytes
        self.addresses: dict[str, tuple[str, int]] = {}
        """Bound address per transport name, ports resolved (``{"UDP": ("127.0.0.1", 5060)}``)."""
        self._udp: _Datagrams | None = None
        self._udp_closed: asyncio.Future[None] | None = None
        self._servers: list[asyncio.base_events.Server] = []
        self._streams: dict[Source, _Stream] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    # -- life cycle --------------------------------------------------------------------------

    async def start(
        self,
        bind: str,
        *,
        udp_port: int | None,
        tcp_port: int | None,
        tls_port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Bind the listeners; ``None`` leaves a transport off, ``0`` takes a free port."""
        try:
            if udp_port is not None:
                sock = await _udp_socket(bind, udp_port, self.udp_buffer_bytes)
                self._udp = _Datagrams(self, sock)
                self._udp_closed = self._udp.closed
                self.addresses["UDP"] = _local(sock)
                log.info("event=sip_udp_buffers rcvbuf=%d sndbuf=%d",
                         sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                         sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
            if tcp_port is not None:
                await self._listen("TCP", bind, tcp_port, None)
            if tls_port is not None:
                if ssl_context is None:
                    raise ValueError("TLS listener needs an ssl context")
                await self._listen("TLS", bind, tls_port, ssl_context)
        except BaseException:
            await self.close()
            raise
        self._arm_sweeper()
        log.info("event=sip_listening %s",
                 " ".join(f"{k.lower()}={h}:{p}" for k, (h, p) in self.addresses.items()))

    async def _listen(
        self, name: str, bind: str, port: int, context: ssl.SSLContext | None
    ) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: _Stream(self, name), bind, port, ssl=context, reuse_address=True,
            ssl_handshake_timeout=10.0 if context is not None else None,
        )
        self._servers.append(server)
        self.addresses[name] = _local(server.sockets[0])

    async def close(self) -> None:
        """Stop listening and close every connection."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._pending):
            task.cancel()
        for server in self._servers:
            server.close()
        streams = list(self._streams.values())
        for stream in streams:
            if stream.transport is not None:
                stream.transport.abort()
        if self._udp is not None:
            self._udp.close()
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5.0)
        waits = [s.closed for s in streams]
        if self._udp_closed is not None:
            waits.append(self._udp_closed)
        if waits:  # sockets are released when these resolve, not when close() is called
            await asyncio.wait(waits, timeout=5.0)

    # -- receiving ---------------------------------------------------------------------------

    def deliver_datagram(self, data: bytes, source: Source) -> None:
        try:
            message = parse_message(data, self.limits)
        except RemoteProtocolError as exc:
            self.on_malformed(data, exc, source)
            return
        except Exception:  # a codec bug must cost this datagram only
            log.exception("event=sip_internal_error where=parser transport=UDP")
            return
        self.deliver(message, source)

    def deliver(self, message: SipMessage, source: Source) -> None:
        if message.is_request:
            try:
                stamp_via(message, source)
            except RemoteProtocolError as exc:
                self.on_malformed(message.to_bytes(), exc, source)
                return
        self.on_message(message, source)

    # -- connections -------------------------------------------------------------------------

    def adopt(self, stream: _Stream) -> bool:
        assert stream.source is not None
        if self._closing or len(self._streams) >= self.max_connections:
            return False
        old = self._streams.get(stream.source)
        if old is not None and old.transport is not None:
            old.transport.close()
        self._streams[stream.source] = stream
        return True

    def forget(self, stream: _Stream) -> None:
        if stream.source is not None and self._streams.get(stream.source) is stream:
            del self._streams[stream.source]

    def has_connection(self, destination: Source) -> bool:
        """True when a stream connection to ``destination`` is open."""
        stream = self._streams.get(destination)
        return stream is not None and stream.transport is not None and (
            not stream.transport.is_closing())

    def udp_socket_buffers(self) -> tuple[int, int] | None:
        """(SO_RCVBUF, SO_SNDBUF) of the UDP socket as the kernel reports them, or None."""
        if self._udp is None or self._udp.sock.fileno() < 0:
            return None
        sock = self._udp.sock
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF),
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    def connection_count(self, transport: str | None = None) -> int:
        """Open stream connections (of one transport, or all)."""
        return sum(1 for s in self._streams if transport is None or s.transport == transport)

    def _arm_sweeper(self) -> None:
        if self._closing or not self._servers:
            return
        period = max(0.05, min(self.idle_timeout / 4, 30.0))
        self._sweeper = asyncio.get_running_loop().call_later(period, self._sweep)

    def _sweep(self) -> None:
        now = self.clock()
        for stream in list(self._streams.values()):
            if now - stream.last_active >= self.idle_timeout and stream.transport is not None:
                log.info("event=sip_connection_closed transport=%s source=%s:%d reason=idle",
                         stream.name, stream.source.host, stream.source.port)
                stream.transport.close()
        self._arm_sweeper()

    # -- sending -----------------------------------------------------------------------------

    def send(self, data: bytes, destination: Source) -> None:
        """Send ``data`` to ``destination``; failures are reported to ``on_send_failed``."""
        name = destination.transport.upper()
        if self._closing:
            return
        if name == "UDP":
            if self._udp is None:
                self._failed(destination, OSError("UDP transport not started"))
                return
            self._udp.send(data, destination.host, destination.port)
            return
        if name not in STREAM_TRANSPORTS:
            self._failed(destination, OSError(f"unsupported transport {name}"))
            return
        stream = self._streams.get(Source(name, destination.host, destination.port))
        if stream is not None and stream.write(data):
            return
        task = asyncio.get_running_loop().create_task(self._connect_and_send(data, destination))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _connect_and_send(self, data: bytes, destination: Source) -> None:
        name = destination.transport.upper()
        context: ssl.SSLContext | None = None
        if name == "TLS":
            context = self.client_ssl or ssl.create_default_context()
        loop = asyncio.get_running_loop()
        try:
            _, stream = await asyncio.wait_for(
                loop.create_connection(
                    lambda: _Stream(self, name), destination.host, destination.port,
                    ssl=context,
                ),
                timeout=10.0,
            )
        except (TimeoutError, OSError, ssl.SSLError) as exc:
            self._failed(destination, exc)
            return
        if not stream.write(data):
            self._failed(destination, OSError("connection closed"))

    def _failed(self, destination: Source, exc: BaseException) -> None:
        log.info("event=sip_send_failed transport=%s destination=%s:%d error=%s",
                 destination.transport, destination.host, destination.port,
                 exc.__class__.__name__)
        if self.on_send_failed is not None:
            self.on_send_failed(destination, exc)


def _local(endpoint: Any) -> tuple[str, int]:
    sock = endpoint.get_extra_info("socket") if hasattr(endpoint, "get_extra_info") else endpoint
    addr = sock.getsockname()
    return str(addr[0]), int(addr[1])
