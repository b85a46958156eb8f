"""SDP (RFC 4566) and the offer/answer model (RFC 3264) for G.711/G.722 audio calls.

``parse(data)`` turns a session description into a ``SessionDescription``; ``to_bytes()`` writes
it back (CRLF line ends, RFC 4566 field order) so a well-formed description round-trips byte for
byte. Bad input raises ``SdpError`` (a ``ValueError``) naming the line.

Strict where a mistake would break media: the version line, the origin, every ``m=`` field,
connection addresses (``IN IP4``/``IN IP6``, RFC 5118 §3.1 / §3.2 examples), payload types and
``rtpmap`` syntax, and a connection address for every active stream (RFC 4566 §5.7). Tolerant of
what phones commonly send: bare LF line ends, trailing blanks, blank lines, a missing or empty
``s=`` or ``t=`` line, codec names in any case, ``rtpmap``/``fmtp`` for payload types that are
not in the ``m=`` line (ignored).

Offer/answer: ``answer(offer, capabilities, ...)`` builds our answer (codecs in the offerer's order
among ours, the offerer's telephone-event payload type, direction mirrored, RFC 2543 hold with
``c=0.0.0.0`` understood) or raises ``NotAcceptable`` (answer 488). ``MediaSession`` keeps our side
of one call's descriptions: the ``o=`` version increments for each changed offer (RFC 3264 §8),
which is what hold (``sendonly``, §8.4) and resume re-offers need.

Per call, the same few lines come again and again (our codec set, a carrier's rtpmaps, a
handful of addresses): their checks, the codec lists of an offer and the lines of our own
offers and answers for a codec set are kept in small bounded caches, so a call costs the
parse of its lines and no more.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum

__all__ = [
    "G722",
    "PCMA",
    "PCMU",
    "Capabilities",
    "Codec",
    "Connection",
    "Direction",
    "MediaDescription",
    "MediaSession",
    "Negotiated",
    "NotAcceptable",
    "Origin",
    "SdpError",
    "SessionDescription",
    "answer",
    "build_offer",
    "parse",
    "parse_answer",
]

MAX_SDP_BYTES = 65536
_CACHE = 512
"""Entries per cache of repeated lines (addresses, rtpmaps, codec lists, our own offers)."""
"""A larger body is refused before parsing (every buffer has a limit)."""
MAX_LINES = 1024
MAX_MEDIA = 16


class SdpError(ValueError):
    """A session description that cannot be used; ``line`` is 1-based (None: the whole body)."""

    status = 400

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(f"SDP line {line}: {message}" if line is not None else f"SDP: {message}")
        self.line = line
        self.reason = message


class NotAcceptable(SdpError):
    """Nothing in the offer is acceptable (no common codec): answer 488 (RFC 3261 §13.3.1.1)."""

    status = 488


class Direction(StrEnum):
    """RFC 3264 §5.1 stream directions, seen from the side that wrote the description."""

    SENDRECV = "sendrecv"
    SENDONLY = "sendonly"
    RECVONLY = "recvonly"
    INACTIVE = "inactive"

    @property
    def sends(self) -> bool:
        return self in (Direction.SENDRECV, Direction.SENDONLY)

    @property
    def receives(self) -> bool:
        return self in (Direction.SENDRECV, Direction.RECVONLY)

    @classmethod
    def of(cls, sends: bool, receives: bool) -> Direction:
        if sends and receives:
            return cls.SENDRECV
        if sends:
            return cls.SENDONLY
        if receives:
            return cls.RECVONLY
        return cls.INACTIVE

    def mirrored(self) -> Direction:
        """The direction an answerer takes for this offered direction (RFC 3264 §6.1)."""
        return Direction.of(self.receives, self.sends)


_DIRECTIONS = frozenset(d.value for d in Direction)


@dataclass(frozen=True)
class Codec:
    """One RTP payload format (RFC 4566 §6 ``rtpmap``)."""

    payload_type: int
    """RTP payload type, 0-127."""
    name: str
    """Encoding name as written (compare with ``key``)."""
    clock_rate: int
    """RTP clock rate in Hz (8000 for G.722 too, RFC 3551 §4.5.2)."""
    channels: int | None = None
    """Channel count when given in the rtpmap."""
    fmtp: str | None = None
    """Format parameters (``a=fmtp``), verbatim."""

    @property
    def key(self) -> tuple[str, int]:
        """What identifies the format regardless of payload type number."""
        return (self.name.lower(), self.clock_rate)

    def rtpmap(self) -> str:
        text = f"{self.payload_type} {self.name}/{self.clock_rate}"
        return text + (f"/{self.channels}" if self.channels else "")


PCMU = Codec(0, "PCMU", 8000)
PCMA = Codec(8, "PCMA", 8000)
G722 = Codec(9, "G722", 8000)

# RFC 3551 §6 table 4: static audio payload types a peer may use without rtpmap.
_STATIC = {
    0: Codec(0, "PCMU", 8000),
    3: Codec(3, "GSM", 8000),
    4: Codec(4, "G723", 8000),
    5: Codec(5, "DVI4", 8000),
    6: Codec(6, "DVI4", 16000),
    7: Codec(7, "LPC", 8000),
    8: Codec(8, "PCMA", 8000),
    9: Codec(9, "G722", 8000),
    10: Codec(10, "L16", 44100, 2),
    11: Codec(11, "L16", 44100),
    12: Codec(12, "QCELP", 8000),
    13: Codec(13, "CN", 8000),
    15: Codec(15, "G728", 8000),
    18: Codec(18, "G729", 8000),
}


@dataclass(frozen=True)
class Origin:
    """``o=`` (RFC 4566 §5.2)."""

    username: str
    session_id: str
    """Kept as text: phones send numbers larger than 64 bits."""
    version: int
    nettype: str
    addrtype: str
    address: str

    def line(self) -> str:
        return (
            f"{self.username} {self.session_id} {self.version} "
            f"{self.nettype} {self.addrtype} {self.address}"
        )


@dataclass(frozen=True)
class Connection:
    """``c=`` (RFC 4566 §5.7); ``address`` may carry ``/ttl[/count]`` for multicast."""

    nettype: str
    addrtype: str
    address: str

    @property
    def host(self) -> str:
        """The address without multicast TTL or count."""
        return self.address.split("/", 1)[0]

    @property
    def is_hold(self) -> bool:
        """RFC 2543 hold (still sent by older phones, RFC 3264 §8.4): c=IN IP4 0.0.0.0."""
        return self.host in ("0.0.0.0", "::")

    def line(self) -> str:
        return f"{self.nettype} {self.addrtype} {self.address}"

    @classmethod
    def for_address(cls, address: str) -> Connection:
        return _connection_for(address)


@functools.lru_cache(maxsize=_CACHE)
def _connection_for(address: str) -> Connection:
    ip = ipaddress.ip_address(address)
    return Connection("IN", "IP6" if ip.version == 6 else "IP4", str(ip))


@dataclass(frozen=True)
class MediaDescription:
    """One ``m=`` section with its ``i c b k a`` lines."""

    media: str
    """``audio``, ``video``, ..."""
    port: int
    """0 means the stream is rejected or disabled (RFC 3264 §5.1)."""
    proto: str
    """``RTP/AVP`` and friends."""
    formats: tuple[str, ...]
    """Format list; payload type numbers for RTP."""
    port_count: int | None = None
    information: str | None = None
    connection: Connection | None = None
    bandwidths: tuple[str, ...] = ()
    key: str | None = None
    attributes: tuple[tuple[str, str | None], ...] = ()
    """Every ``a=`` line in order as (name, value or None for a flag)."""

    def attribute(self, name: str) -> str | None:
        for key, value in self.attributes:
            if key == name:
                return value if value is not None else ""
        return None

    def attribute_values(self, name: str) -> list[str]:
        return [v or "" for k, v in self.attributes if k == name]

    @property
    def is_rtp(self) -> bool:
        return self.proto.upper().startswith("RTP/")

    @property
    def direction(self) -> Direction | None:
        """The direction attribute written in this section, if any."""
        for key, value in self.attributes:
            if value is None and key in _DIRECTIONS:
                return Direction(key)
        return None

    @property
    def ptime(self) -> int | None:
        value = self.attribute("ptime")
        try:
            return int(float(value)) if value else None
        except ValueError:
            return None

    @property
    def rtcp(self) -> tuple[int, str | None] | None:
        """RFC 3605 ``a=rtcp``: (port, address or None)."""
        value = self.attribute("rtcp")
        if not value:
            return None
        parts = value.split()
        if not parts or not parts[0].isdigit():
            return None
        return int(parts[0]), parts[3] if len(parts) >= 4 else None

    @property
    def codecs(self) -> tuple[Codec, ...]:
        """Payload formats in the order of the ``m=`` line, with their rtpmap and fmtp."""
        if not self.is_rtp:
            return ()
        return _codecs_of(self.formats, self.attributes)

    def with_attributes(self, attributes: Iterable[tuple[str, str | None]]) -> MediaDescription:
        return replace(self, attributes=tuple(attributes))


@functools.lru_cache(maxsize=_CACHE)
def _codecs_of(formats: tuple[str, ...],
               attributes: tuple[tuple[str, str | None], ...]) -> tuple[Codec, ...]:
    """The codecs of an RTP ``m=`` section's formats with its rtpmap and fmtp attributes."""
    maps: dict[int, Codec] = {}
    fmtps: dict[int, str] = {}
    for key, value in attributes:
        if key == "rtpmap" and value:
            try:
                codec = _parse_rtpmap(value, None)
            except SdpError:
                continue
            maps.setdefault(codec.payload_type, codec)
        elif key == "fmtp" and value:
            pt, _, params = value.partition(" ")
            if pt.isdigit():
                fmtps.setdefault(int(pt), params.strip())
    out = []
    for fmt in formats:
        number = int(fmt)
        found = maps.get(number) or _STATIC.get(number)
        if found is None:
            continue  # dynamic type without rtpmap: unusable, RFC 4566 §6 requires one
        out.append(Codec(found.payload_type, found.name, found.clock_rate, found.channels,
                         fmtps.get(number)))
    return tuple(out)


@dataclass(frozen=True)
class SessionDescription:
    """A whole session description (RFC 4566 §5)."""

    origin: Origin
    session_name: str = "-"
    information: str | None = None
    uri: str | None = None
    emails: tuple[str, ...] = ()
    phones: tuple[str, ...] = ()
    connection: Connection | None = None
    bandwidths: tuple[str, ...] = ()
    times: tuple[tuple[str, tuple[str, ...]], ...] = (("0 0", ()),)
    """Each ``t=`` value with its ``r=`` lines."""
    zone: str | None = None
    key: str | None = None
    attributes: tuple[tuple[str, str | None], ...] = ()
    media: tuple[MediaDescription, ...] = ()

    def connection_for(self, media: MediaDescription) -> Connection | None:
        """Media-level ``c=`` overrides the session's (RFC 4566 §5.7)."""
        return media.connection or self.connection

    def direction_for(self, media: MediaDescription) -> Direction:
        """Media-level direction, else session-level, else sendrecv (RFC 3264 §5.1)."""
        if media.direction is not None:
            return media.direction
        for key, value in self.attributes:
            if value is None and key in _DIRECTIONS:
                return Direction(key)
        return Direction.SENDRECV

    def to_bytes(self) -> bytes:
        return "".join(f"{t}={v}\r\n" for t, v in self.lines()).encode("utf-8")

    def lines(self) -> Iterator[tuple[str, str]]:
        yield "v", "0"
        yield "o", self.origin.line()
        yield "s", self.session_name
        if self.information is not None:
            yield "i", self.information
        if self.uri is not None:
            yield "u", self.uri
        for email in self.emails:
            yield "e", email
        for phone in self.phones:
            yield "p", phone
        if self.connection is not None:
            yield "c", self.connection.line()
        for bw in self.bandwidths:
            yield "b", bw
        for timing, repeats in self.times:
            yield "t", timing
            for r in repeats:
                yield "r", r
        if self.zone is not None:
            yield "z", self.zone
        if self.key is not None:
            yield "k", self.key
        yield from _attribute_lines(self.attributes)
        for m in self.media:
            port = f"{m.port}/{m.port_count}" if m.port_count is not None else str(m.port)
            yield "m", " ".join((m.media, port, m.proto, *m.formats))
            if m.information is not None:
                yield "i", m.information
            if m.connection is not None:
                yield "c", m.connection.line()
            for bw in m.bandwidths:
                yield "b", bw
            if m.key is not None:
                yield "k", m.key
            yield from _attribute_lines(m.attributes)


def _attribute_lines(attributes: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, str]]:
    for name, value in attributes:
        yield "a", name if value is None else f"{name}:{value}"


# ---------------------------------------------------------------------------------------------
# Parsing

def parse(data: bytes | str) -> SessionDescription:
    """Parse one session description; raise SdpError naming the offending line."""
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > MAX_SDP_BYTES:
            raise SdpError(f"body of {len(raw)} bytes exceeds the {MAX_SDP_BYTES} byte limit")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise SdpError("not UTF-8 text (RFC 4566 §5)", line) from None
    else:
        text = data
        if len(text) > MAX_SDP_BYTES:
            raise SdpError(f"body of {len(text)} characters exceeds the {MAX_SDP_BYTES} limit")
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        raise SdpError(f"{len(lines)} lines exceed the {MAX_LINES} line limit")
    return _Parser().run(lines)


@dataclass
class _MediaDraft:
    media: str
    port: int
    proto: str
    formats: tuple[str, ...]
    port_count: int | None
    line: int
    information: str | None = None
    connection: Connection | None = None
    bandwidths: list[str] = field(default_factory=list)
    key: str | None = None
    attributes: list[tuple[str, str | None]] = field(default_factory=list)


class _Parser:
    def __init__(self) -> None:
        self.origin: Origin | None = None
        self.session_name: str | None = None
        self.information: str | None = None
        self.uri: str | None = None
        self.emails: list[str] = []
        self.phones: list[str] = []
        self.connection: Connection | None = None
        self.bandwidths: list[str] = []
        self.times: list[tuple[str, list[str]]] = []
        self.zone: str | None = None
        self.key: str | None = None
        self.attributes: list[tuple[str, str | None]] = []
        self.media: list[_MediaDraft] = []

    def run(self, lines: list[str]) -> SessionDescription:
        numbered = []
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip("\r").rstrip(" \t")   # tolerate trailing blanks (common)
            if line:
                numbered.append((number, line))
        if not numbered:
            raise SdpError("empty session description")
        first_no, first = numbered[0]
        if first != "v=0":
            raise SdpError(f"must start with v=0, got {first[:40]!r}", first_no)
        for number, line in numbered[1:]:
            if len(line) < 2 or line[1] != "=" or not line[0].islower():
                raise SdpError(f"not a <type>=<value> line: {line[:40]!r}", number)
            kind, value = line[0], line[2:]
            if kind == "m":
                self._media_line(value, number)
            elif self.media:
                self._media_field(kind, value, number)
            else:
                self._session_field(kind, value, number)
        if self.origin is None:
            raise SdpError("no o= line (RFC 4566 §5.2)", first_no)
        return self._build(self.origin)

    def _session_field(self, kind: str, value: str, number: int) -> None:
        if kind == "o":
            if self.origin is not None:
                raise SdpError("second o= line", number)
            self.origin = _parse_origin(value, number)
        elif kind == "s":
            self.session_name = value
        elif kind == "i":
            self.information = value
        elif kind == "u":
            self.uri = value
        elif kind == "e":
            self.emails.append(value)
        elif kind == "p":
            self.phones.append(value)
        elif kind == "c":
            if self.connection is not None:
                raise SdpError("second session-level c= line", number)
            self.connection = _parse_connection(value, number)
        elif kind == "b":
            self.bandwidths.append(_check_bandwidth(value, number))
        elif kind == "t":
            parts = value.split()
            if len(parts) != 2 or not all(p.isdigit() for p in parts):
                raise SdpError(f"t= needs two decimal times, got {value!r}", number)
            self.times.append((value, []))
        elif kind == "r":
            if not self.times:
                raise SdpError("r= without a preceding t=", number)
            self.times[-1][1].append(value)
        elif kind == "z":
            self.zone = value
        elif kind == "k":
            self.key = value
        elif kind == "a":
            self.attributes.append(_parse_attribute(value, number))
        elif kind == "v":
            raise SdpError("second v= line", number)
        else:
            # RFC 4566 §5: an unknown type letter makes the whole description unusable.
            raise SdpError(f"unknown line type {kind}= (RFC 4566 §5)", number)

    def _media_line(self, value: str, number: int) -> None:
        if len(self.media) >= MAX_MEDIA:
            raise SdpError(f"more than {MAX_MEDIA} media descriptions", number)
        parts = value.split()
        if len(parts) < 4:
            raise SdpError(f"m= needs <media> <port> <proto> <fmt>..., got {value!r}", number)
        media, port_text, proto, *formats = parts
        port_str, _, count_str = port_text.partition("/")
        if not port_str.isdigit() or int(port_str) > 65535 or (count_str and not count_str.isdigit()):
            raise SdpError(f"bad port {port_text!r} in m= line", number)
        if proto.upper().startswith("RTP/"):
            for fmt in formats:
                if not fmt.isdigit() or int(fmt) > 127:
                    raise SdpError(f"RTP payload type {fmt!r} is not 0-127 (RFC 3551 §3)", number)
        self.media.append(_MediaDraft(
            media, int(port_str), proto, tuple(formats), int(count_str) if count_str else None,
            number,
        ))

    def _media_field(self, kind: str, value: str, number: int) -> None:
        m = self.media[-1]
        if kind == "i":
            m.information = value
        elif kind == "c":
            # RFC 4566 §5.7 allows several c= (layered multicast); the first one is used.
            connection = _parse_connection(value, number)
            if m.connection is None:
                m.connection = connection
        elif kind == "b":
            m.bandwidths.append(_check_bandwidth(value, number))
        elif kind == "k":
            m.key = value
        elif kind == "a":
            attribute = _parse_attribute(value, number)
            if attribute[0] == "rtcp":
                # RFC 3605 §2.1: a=rtcp:<port> [<nettype> <addrtype> <address>]
                parts = (attribute[1] or "").split()
                if not parts or not parts[0].isdigit() or int(parts[0]) > 65535 or len(parts) not in (1, 4):
                    raise SdpError(f"bad a=rtcp {attribute[1]!r} (RFC 3605)", number)
                if len(parts) == 4:
                    _check_address(parts[1], parts[2], parts[3], number)
            if attribute[0] == "rtpmap" and m.media == "audio" and m.proto.upper().startswith("RTP/"):
                # Audio is what we negotiate; a broken rtpmap elsewhere (RFC 4475 §3.3.15's
                # "31 LPC" on video) only makes that format unusable.
                _parse_rtpmap(attribute[1] or "", number)
            m.attributes.append(attribute)
        else:
            raise SdpError(f"{kind}= is not allowed inside a media description", number)

    def _build(self, origin: Origin) -> SessionDescription:
        media = []
        for m in self.media:
            if m.port != 0 and m.connection is None and self.connection is None:
                raise SdpError(
                    f"{m.media} stream has no c= line and there is no session-level one "
                    "(RFC 4566 §5.7)", m.line,
                )
            media.append(MediaDescription(
                m.media, m.port, m.proto, m.formats, m.port_count, m.information, m.connection,
                tuple(m.bandwidths), m.key, tuple(m.attributes),
            ))
        return SessionDescription(
            origin=origin,
            # Tolerated: phones that leave out s= (RFC 4566 §5.3 wants at least "-").
            session_name=self.session_name if self.session_name is not None else "-",
            information=self.information,
            uri=self.uri,
            emails=tuple(self.emails),
            phones=tuple(self.phones),
            connection=self.connection,
            bandwidths=tuple(self.bandwidths),
            times=tuple((t, tuple(r)) for t, r in self.times) or (("0 0", ()),),
            zone=self.zone,
            key=self.key,
            attributes=tuple(self.attributes),
            media=tuple(media),
        )


def _parse_origin(value: str, number: int) -> Origin:
    parts = value.split()
    if len(parts) != 6:
        raise SdpError(
            "o= needs <username> <sess-id> <sess-version> <nettype> <addrtype> <address>", number
        )
    username, sess_id, version, nettype, addrtype, address = parts
    if not sess_id.isdigit() or not version.isdigit():
        raise SdpError(f"o= session id and version must be decimal, got {value!r}", number)
    _check_address(nettype, addrtype, address, number, origin=True)
    return Origin(username, sess_id, int(version), nettype, addrtype, address)


def _parse_connection(value: str, number: int) -> Connection:
    parts = value.split()
    if len(parts) != 3:
        raise SdpError(f"c= needs <nettype> <addrtype> <address>, got {value!r}", number)
    nettype, addrtype, address = parts
    _check_address(nettype, addrtype, address, number)
    return Connection(nettype, addrtype, address)


def _check_address(nettype: str, addrtype: str, address: str, number: int, *, origin: bool = False) -> None:
    error = _address_error(nettype, addrtype, address, origin)
    if error is not None:
        raise SdpError(error, number)


@functools.lru_cache(maxsize=_CACHE)
def _address_error(nettype: str, addrtype: str, address: str, origin: bool) -> str | None:
    """What is wrong with a c=/o= address, or None when it is good (RFC 4566 §5.7)."""
    if nettype != "IN":
        return f"network type {nettype!r} is not IN"
    host = address.split("/", 1)[0]
    if addrtype == "IP4":
        try:
            ipaddress.IPv4Address(host)
            return None
        except ValueError:
            pass
        if ":" in host:
            return f"{host!r} is not an IPv4 address (addrtype IP4)"
    elif addrtype == "IP6":
        try:
            ipaddress.IPv6Address(host)
            return None
        except ValueError:
            pass
        if host.count(":") >= 2 or host.startswith("["):
            # RFC 4566 §5.7: IP6 literals are written without brackets.
            return f"{host!r} is not a valid IPv6 address (addrtype IP6)"
    else:
        return f"address type {addrtype!r} is neither IP4 nor IP6"
    # RFC 4566 §5.7 also allows a fully qualified domain name.
    labels = host.split(".")
    if origin and host == "-":
        return None
    if not host or any(not label or len(label) > 63 for label in labels) or not all(
        c.isalnum() or c in "-." for c in host
    ):
        return f"{host!r} is not an address or domain name"
    return None


def _check_bandwidth(value: str, number: int) -> str:
    bwtype, sep, amount = value.partition(":")
    if not sep or not bwtype or not amount.isdigit():
        raise SdpError(f"b= needs <bwtype>:<bandwidth>, got {value!r}", number)
    return value


def _parse_attribute(value: str, number: int) -> tuple[str, str | None]:
    name, sep, rest = value.partition(":")
    if not name or " " in name:
        raise SdpError(f"bad attribute {value!r}", number)
    return (name, rest if sep else None)


def _parse_rtpmap(value: str, number: int | None) -> Codec:
    codec = _rtpmap_codec(value)
    if codec is None:
        raise SdpError(f"bad rtpmap {value!r}", number)
    return codec


@functools.lru_cache(maxsize=_CACHE)
def _rtpmap_codec(value: str) -> Codec | None:
    # RFC 4566 §6: a=rtpmap:<payload type> <encoding name>/<clock rate>[/<encoding parameters>]
    pt, _, encoding = value.strip().partition(" ")
    parts = encoding.strip().split("/")
    if (
        not pt.isdigit() or int(pt) > 127 or len(parts) not in (2, 3) or not parts[0]
        or not parts[1].isdigit() or (len(parts) == 3 and not parts[2].isdigit())
    ):
        return None
    return Codec(int(pt), parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None)


# ---------------------------------------------------------------------------------------------
# Offer / answer (RFC 3264)


@dataclass(frozen=True)
class Capabilities:
    """What we can send and receive."""

    codecs: tuple[Codec, ...] = (PCMU, PCMA, G722)
    """Audio codecs in our order of preference (used for our own offers)."""
    telephone_event: bool = True
    """Offer/accept RFC 4733 telephone-event."""
    telephone_event_pt: int = 101
    """Payload type we use in our own offers."""
    telephone_events: str = "0-16"
    """Events we handle (RFC 4733 §7.1.1): DTMF 0-9 * # A-D and flash."""
    ptime: int | None = 20
    """Packetization we send, ms (RFC 4566 §6)."""


@dataclass(frozen=True)
class Negotiated:
    """The result of one offer/answer exchange, seen from our side."""

    sdp: SessionDescription
    """The answer we built (or the answer we received, for our own offer)."""
    codec: Codec
    """The codec to send with (the first common one)."""
    codecs: tuple[Codec, ...]
    """Every common codec, in the order of the answer."""
    telephone_event_pt: int | None
    """Payload type for RFC 4733 events, None when not negotiated."""
    remote_address: str
    """Where to send RTP (0.0.0.0 on RFC 2543 hold)."""
    remote_port: int
    remote_rtcp: tuple[int, str | None] | None
    """RFC 3605 a=rtcp of the peer, if given."""
    remote_ptime: int | None
    direction: Direction
    """Our direction for the stream."""
    on_hold: bool
    """The peer does not want to receive media from us (sendonly, inactive or c=0.0.0.0)."""
    media_index: int
    """Index of the audio m= line used."""


def _effective_direction(sdp: SessionDescription, media: MediaDescription) -> Direction:
    direction = sdp.direction_for(media)
    conn = sdp.connection_for(media)
    if conn is not None and conn.is_hold:
        # RFC 3264 §8.4: c=0.0.0.0 is the RFC 2543 way to say "do not send to me".
        direction = Direction.of(direction.sends, False)
    return direction


def _parse_events(fmtp: str | None) -> set[int]:
    if not fmtp:
        return set(range(16))  # RFC 4733 §7.1.1: absent fmtp means events 0-15
    events: set[int] = set()
    for part in fmtp.replace(" ", "").split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            events.update(range(int(low), int(high or low) + 1))
    return events


def _format_events(events: set[int]) -> str:
    ranges: list[list[int]] = []
    for e in sorted(events):
        if ranges and ranges[-1][1] == e - 1:
            ranges[-1][1] = e
        else:
            ranges.append([e, e])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def _is_telephone_event(codec: Codec) -> bool:
    return codec.name.lower() == "telephone-event"


_AudioPlan = tuple[tuple[Codec, ...], int | None, tuple[str, ...], tuple[tuple[str, str | None], ...]]
"""(common codecs, telephone-event payload type, answer formats, answer attributes up to ptime)."""


@functools.lru_cache(maxsize=_CACHE)
def _audio_plan(formats: tuple[str, ...], attributes: tuple[tuple[str, str | None], ...],
                capabilities: Capabilities) -> _AudioPlan | None:
    """How we answer one offered RTP/AVP audio section, None without a common codec: the same
    for every offer with these formats and attributes, whatever its port and address."""
    ours = {c.key: c for c in capabilities.codecs}
    offered = _codecs_of(formats, attributes)
    common = [c for c in offered if c.key in ours]  # offerer's order of preference
    if not common:
        return None
    event = None
    if capabilities.telephone_event:
        # RFC 4733 §2.4.1: the event clock must match the audio codec's (8000 for ours).
        event = next(
            (c for c in offered if _is_telephone_event(c) and c.clock_rate == 8000), None
        )
    answer_formats = [c.payload_type for c in common]
    answer_attributes: list[tuple[str, str | None]] = []
    for c in common:
        # Keep the offerer's payload type numbers (RFC 3264 §6.1).
        answer_attributes.append(
            ("rtpmap", f"{c.payload_type} {ours[c.key].name}/{c.clock_rate}"))
        if c.fmtp:
            answer_attributes.append(("fmtp", f"{c.payload_type} {c.fmtp}"))
    event_pt = None
    if event is not None:
        events = _parse_events(event.fmtp) & _parse_events(capabilities.telephone_events)
        if events:
            event_pt = event.payload_type
            answer_formats.append(event_pt)
            answer_attributes.append(("rtpmap", f"{event_pt} telephone-event/8000"))
            answer_attributes.append(("fmtp", f"{event_pt} {_format_events(events)}"))
    if capabilities.ptime:
        answer_attributes.append(("ptime", str(capabilities.ptime)))
    return (tuple(common), event_pt, tuple(str(f) for f in answer_formats),
            tuple(answer_attributes))


def answer(
    offer: SessionDescription,
    capabilities: Capabilities,
    address: str,
    port: int,
    *,
    session_id: str | None = None,
    version: int = 0,
    local_direction: Direction = Direction.SENDRECV,
    rtcp_port: int | None = None,
    username: str = "edgecc",
) -> Negotiated:
    """Answer ``offer`` with our capabilities at ``address``:``port`` (RFC 3264 §6).

    The first RTP/AVP audio stream with a common codec is accepted; every other stream is
    rejected with port 0 (§6: the answer has as many m= lines as the offer). Raises
    NotAcceptable (488) when no audio stream has a common codec.
    """
    chosen: tuple[int, _AudioPlan] | None = None
    for index, m in enumerate(offer.media):
        if m.media != "audio" or m.port == 0 or m.proto.upper() != "RTP/AVP":
            continue
        try:
            plan = _audio_plan(m.formats, m.attributes, capabilities)
        except TypeError:  # capabilities built with lists: not hashable, so not cached
            plan = _audio_plan.__wrapped__(m.formats, m.attributes, capabilities)
        if plan is not None:
            chosen = (index, plan)
            break
    if chosen is None:
        codecs = ", ".join(f"{c.name}/{c.clock_rate}" for m in offer.media for c in m.codecs)
        raise NotAcceptable(f"no common audio codec (offered: {codecs or 'none'})")
    index, (common, event_pt, formats, plan_attributes) = chosen
    offered_media = offer.media[index]
    offered_direction = _effective_direction(offer, offered_media)
    wanted = offered_direction.mirrored()
    ours_direction = Direction.of(
        wanted.sends and local_direction.sends, wanted.receives and local_direction.receives
    )
    connection = Connection.for_address(address)
    attributes = list(plan_attributes)
    if rtcp_port is not None:
        attributes.append(("rtcp", f"{rtcp_port} {connection.line()}"))
    attributes.append((ours_direction.value, None))
    media = []
    for i, m in enumerate(offer.media):
        if i == index:
            media.append(MediaDescription(
                "audio", port, offered_media.proto, formats, attributes=tuple(attributes),
            ))
        else:
            # RFC 3264 §6: a rejected stream keeps its media and proto, port 0, one format.
            media.append(MediaDescription(m.media, 0, m.proto, m.formats[:1]))
    sdp = SessionDescription(
        origin=Origin(
            username, session_id or _new_session_id(), version, "IN", connection.addrtype,
            connection.address,
        ),
        connection=connection,
        media=tuple(media),
    )
    remote = offer.connection_for(offered_media)
    assert remote is not None  # the parser guarantees a connection for active streams
    return Negotiated(
        sdp=sdp,
        codec=common[0],
        codecs=tuple(common),
        telephone_event_pt=event_pt,
        remote_address=remote.host,
        remote_port=offered_media.port,
        remote_rtcp=offered_media.rtcp,
        remote_ptime=offered_media.ptime,
        direction=ours_direction,
        on_hold=not offered_direction.receives,
        media_index=index,
    )


def build_offer(
    capabilities: Capabilities,
    address: str,
    port: int,
    *,
    session_id: str | None = None,
    version: int = 0,
    direction: Direction = Direction.SENDRECV,
    rtcp_port: int | None = None,
    username: str = "edgecc",
) -> SessionDescription:
    """Our offer: one audio stream with our codecs in preference order (RFC 3264 §5)."""
    connection = Connection.for_address(address)
    try:
        formats, offer_attributes = _offer_lines(capabilities)
    except TypeError:  # capabilities built with lists: not hashable, so not cached
        formats, offer_attributes = _offer_lines.__wrapped__(capabilities)
    attributes = list(offer_attributes)
    if rtcp_port is not None:
        attributes.append(("rtcp", f"{rtcp_port} {connection.line()}"))
    attributes.append((direction.value, None))
    return SessionDescription(
        origin=Origin(
            username, session_id or _new_session_id(), version, "IN", connection.addrtype,
            connection.address,
        ),
        connection=connection,
        media=(MediaDescription("audio", port, "RTP/AVP", formats,
                                attributes=tuple(attributes)),),
    )


@functools.lru_cache(maxsize=_CACHE)
def _offer_lines(capabilities: Capabilities) -> tuple[tuple[str, ...],
                                                     tuple[tuple[str, str | None], ...]]:
    """The formats and the attributes up to ptime of our offers for one codec set."""
    formats = [str(c.payload_type) for c in capabilities.codecs]
    attributes: list[tuple[str, str | None]] = [("rtpmap", c.rtpmap()) for c in capabilities.codecs]
    if capabilities.telephone_event:
        pt = capabilities.telephone_event_pt
        formats.append(str(pt))
        attributes.append(("rtpmap", f"{pt} telephone-event/8000"))
        attributes.append(("fmtp", f"{pt} {capabilities.telephone_events}"))
    if capabilities.ptime:
        attributes.append(("ptime", str(capabilities.ptime)))
    return tuple(formats), tuple(attributes)


def parse_answer(offer: SessionDescription, answer_sdp: SessionDescription) -> Negotiated:
    """Check an answer to our ``offer`` and say what was agreed (RFC 3264 §7).

    Raises SdpError when the answer does not fit the offer (a different number of m= lines,
    codecs we did not offer), NotAcceptable when it rejects the audio stream.
    """
    if len(answer_sdp.media) != len(offer.media):
        raise SdpError(
            f"answer has {len(answer_sdp.media)} m= lines, the offer had {len(offer.media)} "
            "(RFC 3264 §6)"
        )
    for index, (ours, theirs) in enumerate(zip(offer.media, answer_sdp.media, strict=True)):
        if ours.media != "audio" or ours.port == 0:
            continue
        if theirs.port == 0:
            raise NotAcceptable("the answer rejected the audio stream (port 0)")
        offered = {c.key: c for c in ours.codecs}
        common: list[Codec] = []
        event_pt = None
        for c in theirs.codecs:
            if _is_telephone_event(c):
                event_pt = c.payload_type
            elif c.key in offered:
                common.append(c)
            else:
                raise SdpError(f"answer names codec {c.name}/{c.clock_rate}, which we did not offer")
        if not common:
            raise NotAcceptable("the answer has no codec of the offer")
        direction = _effective_direction(answer_sdp, theirs)
        remote = answer_sdp.connection_for(theirs)
        assert remote is not None
        return Negotiated(
            sdp=answer_sdp, codec=common[0], codecs=tuple(common), telephone_event_pt=event_pt,
            remote_address=remote.host, remote_port=theirs.port, remote_rtcp=theirs.rtcp,
            remote_ptime=theirs.ptime, direction=direction.mirrored(),
            on_hold=not direction.receives, media_index=index,
        )
    raise NotAcceptable("the offer has no audio stream")


_SESSION_IDS = random.Random()  # seeded from the OS; ids need to be unique, not secret


def _new_session_id() -> str:
    # RFC 4566 §5.2 suggests an NTP timestamp; any number unique per session will do.
    return str(_SESSION_IDS.randrange(10**9, 2**62))


@dataclass
class MediaSession:
    """Our side of one call's media descriptions across re-INVITEs (RFC 3264 §8).

    The same ``o=`` session id is used for every description of the call; its version goes up
    by one each time a description we send differs from the previous one, and stays when it is
    the same (§8: a re-offer that changes nothing keeps the version).
    """

    capabilities: Capabilities
    address: str
    port: int
    rtcp_port: int | None = None
    username: str = "edgecc"
    session_id: str = field(default_factory=_new_session_id)
    version: int = 0
    direction: Direction = Direction.SENDRECV
    """What we want locally: SENDONLY while we hold the other side."""
    _last: SessionDescription | None = None
    _offer: SessionDescription | None = None

    def _stamp(self, sdp: SessionDescription) -> SessionDescription:
        if self._last is not None:
            same_body = replace(sdp, origin=self._last.origin) == self._last
            if not same_body:
                self.version += 1
        if sdp.origin.version != self.version:
            sdp = replace(sdp, origin=replace(sdp.origin, version=self.version))
        self._last = sdp
        return sdp

    def offer(self) -> SessionDescription:
        """A new offer (initial, or a re-offer reflecting ``direction``)."""
        sdp = build_offer(
            self.capabilities, self.address, self.port, session_id=self.session_id,
            version=self.version, direction=self.direction, rtcp_port=self.rtcp_port,
            username=self.username,
        )
        self._offer = self._stamp(sdp)
        return self._offer

    def hold(self) -> SessionDescription:
        """Re-offer putting the peer on hold (RFC 3264 §8.4: sendonly)."""
        self.direction = Direction.SENDONLY
        return self.offer()

    def resume(self) -> SessionDescription:
        """Re-offer taking the peer off hold."""
        self.direction = Direction.SENDRECV
        return self.offer()

    def answer(self, offer: SessionDescription) -> Negotiated:
        """Answer the peer's (re-)offer; raises NotAcceptable (488)."""
        result = answer(
            offer, self.capabilities, self.address, self.port, session_id=self.session_id,
            version=self.version, local_direction=self.direction, rtcp_port=self.rtcp_port,
            username=self.username,
        )
        stamped = self._stamp(result.sdp)
        return result if stamped is result.sdp else replace(result, sdp=stamped)

    def receive_answer(self, answer_sdp: SessionDescription) -> Negotiated:
        """The peer's answer to our last offer."""
        if self._offer is None:
            raise SdpError("an answer arrived but we have not sent an offer")
        return parse_answer(self._offer, answer_sdp)
