"""RTCP compound packets (RFC 3550 §6): SR, RR, SDES, BYE, APP, and XR (RFC 3611) with the
VoIP metrics report block (§4.7). Other packet types pass through as `UnknownRtcp`.

`parse_compound` checks the framing of every packet (version, length, padding) and the
layout of the types it knows; anything inconsistent raises `RtcpParseError`, a `ValueError`.
Serialization is exact: a parsed packet serializes back to the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from media_core._rtp import RtpParseError, rtt_from_report

__all__ = [
    "App",
    "Bye",
    "ReceiverReport",
    "ReportBlock",
    "RtcpPacket",
    "RtcpParseError",
    "SdesChunk",
    "SenderReport",
    "SourceDescription",
    "UnknownRtcp",
    "VoipMetrics",
    "XrBlock",
    "XrPacket",
    "ntp_middle",
    "ntp_timestamp",
    "parse_compound",
    "serialize_compound",
]

PT_SR, PT_RR, PT_SDES, PT_BYE, PT_APP, PT_XR = 200, 201, 202, 203, 204, 207
SDES_CNAME, SDES_NAME, SDES_PRIV = 1, 2, 8
XR_VOIP_METRICS = 7
MAX_COUNT = 31
NTP_UNIX_OFFSET = 2_208_988_800  # seconds from 1900-01-01 to 1970-01-01


class RtcpParseError(RtpParseError):
    """An RTCP compound packet is truncated or malformed."""


def ntp_timestamp(unix_seconds: float) -> int:
    """The 64-bit NTP timestamp (RFC 3550 §4) of a Unix time."""
    secs = int(unix_seconds)
    frac = int((unix_seconds - secs) * (1 << 32)) & 0xFFFFFFFF
    return (((secs + NTP_UNIX_OFFSET) & 0xFFFFFFFF) << 32) | frac


def ntp_middle(ntp: int) -> int:
    """The middle 32 bits of a 64-bit NTP timestamp (the LSR / DLSR unit, 1/65536 s)."""
    return (ntp >> 16) & 0xFFFFFFFF


@dataclass(frozen=True)
class ReportBlock:
    """One reception report block (RFC 3550 §6.4.1)."""

    ssrc: int
    """Source this block reports on."""
    fraction_lost: int = 0
    """Loss since the previous report, 8-bit fixed point (lost/expected * 256)."""
    cumulative_lost: int = 0
    """Packets lost since the start, 24-bit signed (duplicates can make it negative)."""
    highest_seq: int = 0
    """Extended highest sequence number received (cycles << 16 | max_seq)."""
    jitter: int = 0
    """Interarrival jitter in timestamp units (§6.4.1, A.8)."""
    lsr: int = 0
    """Middle 32 bits of the NTP time of the last SR from that source, 0 if none."""
    dlsr: int = 0
    """Delay since that SR in 1/65536 s."""

    def rtt(self, arrival_ntp_middle: int) -> float | None:
        """Round-trip time in seconds, seen by the sender of the SR this block answers."""
        return rtt_from_report(arrival_ntp_middle, self.lsr, self.dlsr)

    def _pack(self) -> bytes:
        if not -0x800000 <= self.cumulative_lost <= 0x7FFFFF:
            raise ValueError(f"cumulative_lost out of 24-bit range: {self.cumulative_lost}")
        return struct.pack(
            "!IIIIII",
            self.ssrc,
            (self.fraction_lost << 24) | (self.cumulative_lost & 0xFFFFFF),
            self.highest_seq,
            self.jitter,
            self.lsr,
            self.dlsr,
        )

    @classmethod
    def _unpack(cls, data: bytes, pos: int) -> ReportBlock:
        ssrc, word, highest, jitter, lsr, dlsr = struct.unpack_from("!IIIIII", data, pos)
        lost = word & 0xFFFFFF
        if lost & 0x800000:
            lost -= 1 << 24
        return cls(ssrc, word >> 24, lost, highest, jitter, lsr, dlsr)


@dataclass(frozen=True)
class SenderReport:
    """SR (RFC 3550 §6.4.1)."""

    ssrc: int
    """Sender."""
    ntp_timestamp: int
    """64-bit NTP wallclock time of this report."""
    rtp_timestamp: int
    """RTP timestamp of the same instant."""
    packet_count: int
    """Packets sent since the start."""
    octet_count: int
    """Payload octets sent since the start."""
    reports: tuple[ReportBlock, ...] = ()
    """Reception report blocks, at most 31."""
    extension: bytes = b""
    """Profile-specific extension (§6.4.1), a multiple of 4 bytes."""
    padding: int = 0
    """Padding bytes, count included (only on the last packet of a compound)."""

    @property
    def ntp_middle(self) -> int:
        """The value a receiver echoes as LSR."""
        return ntp_middle(self.ntp_timestamp)


@dataclass(frozen=True)
class ReceiverReport:
    """RR (RFC 3550 §6.4.2)."""

    ssrc: int
    """Reporter."""
    reports: tuple[ReportBlock, ...] = ()
    """Reception report blocks, at most 31."""
    extension: bytes = b""
    """Profile-specific extension, a multiple of 4 bytes."""
    padding: int = 0
    """Padding bytes, count included."""


@dataclass(frozen=True)
class SdesChunk:
    """One SDES chunk: a source and its items (RFC 3550 §6.5)."""

    ssrc: int
    """Source (or CSRC) described."""
    items: tuple[tuple[int, bytes], ...] = ()
    """(type, value) pairs: 1 CNAME, 2 NAME, 3 EMAIL, 4 PHONE, 5 LOC, 6 TOOL, 7 NOTE, 8 PRIV."""

    @property
    def cname(self) -> str | None:
        """The CNAME item as text, if present."""
        for kind, value in self.items:
            if kind == SDES_CNAME:
                return value.decode("utf-8", "replace")
        return None


@dataclass(frozen=True)
class SourceDescription:
    """SDES (RFC 3550 §6.5)."""

    chunks: tuple[SdesChunk, ...] = ()
    """At most 31 chunks."""
    padding: int = 0
    """Padding bytes, count included."""


@dataclass(frozen=True)
class Bye:
    """BYE (RFC 3550 §6.6)."""

    ssrcs: tuple[int, ...] = ()
    """Sources leaving, at most 31."""
    reason: bytes | None = None
    """Reason for leaving (UTF-8 text, at most 255 bytes), None when absent."""
    padding: int = 0
    """Padding bytes, count included."""


@dataclass(frozen=True)
class App:
    """APP (RFC 3550 §6.7), carried through untouched."""

    subtype: int
    """5-bit subtype."""
    ssrc: int
    """Source."""
    name: bytes
    """Four ASCII characters."""
    data: bytes = b""
    """Application data, a multiple of 4 bytes."""
    padding: int = 0
    """Padding bytes, count included."""


@dataclass(frozen=True)
class VoipMetrics:
    """XR VoIP metrics report block (RFC 3611 §4.7). Values are the raw field codes."""

    ssrc: int
    """Source the metrics describe."""
    loss_rate: int = 0
    """Packets lost in the network, fraction * 256."""
    discard_rate: int = 0
    """Packets discarded (late, early, overrun) by the jitter buffer, fraction * 256."""
    burst_density: int = 0
    """Lost or discarded packets within bursts, fraction * 256."""
    gap_density: int = 0
    """Lost or discarded packets within gaps, fraction * 256."""
    burst_duration: int = 0
    """Mean burst duration, ms."""
    gap_duration: int = 0
    """Mean gap duration, ms."""
    round_trip_delay: int = 0
    """Most recent RTCP round-trip delay, ms."""
    end_system_delay: int = 0
    """Most recent end system delay (jitter buffer, codec, PLC), ms."""
    signal_level: int = 127
    """Voice signal level, dBm0, signed; 127 = unavailable."""
    noise_level: int = 127
    """Silent-period noise level, dBm0, signed; 127 = unavailable."""
    rerl: int = 127
    """Residual echo return loss, dB; 127 = unavailable."""
    gmin: int = 16
    """Gap threshold (packets) used for the burst/gap split; 16 recommended."""
    r_factor: int = 127
    """R factor (ITU-T G.107) of the call; 127 = unavailable."""
    ext_r_factor: int = 127
    """External R factor; 127 = unavailable."""
    mos_lq: int = 127
    """Listening quality MOS * 10; 127 = unavailable."""
    mos_cq: int = 127
    """Conversational quality MOS * 10; 127 = unavailable."""
    rx_config: int = 0
    """PLC (2 bits) | JBA (2 bits) | JB rate (4 bits)."""
    jb_nominal: int = 0
    """Jitter buffer nominal delay, ms."""
    jb_maximum: int = 0
    """Jitter buffer maximum delay at the moment, ms."""
    jb_abs_max: int = 0
    """Jitter buffer absolute maximum delay, ms."""

    block_type = XR_VOIP_METRICS

    @classmethod
    def from_measurements(
        cls,
        ssrc: int,
        *,
        expected: int,
        lost: int,
        discarded: int,
        round_trip_ms: float | None = None,
        end_system_delay_ms: float = 0.0,
        jb_nominal_ms: float = 0.0,
        jb_maximum_ms: float = 0.0,
        jb_abs_max_ms: float = 0.0,
        r_factor: float | None = None,
        mos_lq: float | None = None,
        mos_cq: float | None = None,
        plc: int = 3,
        adaptive: bool = True,
    ) -> VoipMetrics:
        """Encodes measured values into the §4.7 fields (rates * 256, MOS * 10, 127 when a
        value is unknown; out-of-range values are clamped to their field)."""

        def rate(n: int) -> int:
            return 0 if expected <= 0 else max(0, min(255, (n << 8) // expected))

        def ms(v: float) -> int:
            return max(0, min(0xFFFF, round(v)))

        def opt(v: float | None, scale: float, hi: int) -> int:
            return 127 if v is None else max(0, min(hi, round(v * scale)))

        return cls(
            ssrc=ssrc, loss_rate=rate(lost), discard_rate=rate(discarded),
            round_trip_delay=0 if round_trip_ms is None else ms(round_trip_ms),
            end_system_delay=ms(end_system_delay_ms), r_factor=opt(r_factor, 1, 100),
            mos_lq=opt(mos_lq, 10, 50), mos_cq=opt(mos_cq, 10, 50),
            rx_config=((plc & 3) << 6) | ((3 if adaptive else 2) << 4),
            jb_nominal=ms(jb_nominal_ms), jb_maximum=ms(jb_maximum_ms),
            jb_abs_max=ms(jb_abs_max_ms),
        )  # fmt: skip

    @property
    def plc(self) -> int:
        """0 unspecified, 1 disabled, 2 enhanced, 3 standard (§4.7.7)."""
        return self.rx_config >> 6

    @property
    def jitter_buffer_adaptive(self) -> int:
        """JBA: 0 unknown, 1 reserved, 2 non-adaptive, 3 adaptive."""
        return (self.rx_config >> 4) & 3

    @property
    def jitter_buffer_rate(self) -> int:
        """JB rate, 0..15."""
        return self.rx_config & 0x0F

    def _pack(self) -> bytes:
        return struct.pack(
            "!BBHIBBBBHHHHbbBBBBBBBBHHH",
            XR_VOIP_METRICS, 0, 8, self.ssrc,
            self.loss_rate, self.discard_rate, self.burst_density, self.gap_density,
            self.burst_duration, self.gap_duration, self.round_trip_delay, self.end_system_delay,
            self.signal_level, self.noise_level, self.rerl, self.gmin,
            self.r_factor, self.ext_r_factor, self.mos_lq, self.mos_cq,
            self.rx_config, 0, self.jb_nominal, self.jb_maximum, self.jb_abs_max,
        )  # fmt: skip

    @classmethod
    def _unpack(cls, block: bytes) -> VoipMetrics:
        f = struct.unpack("!BBHIBBBBHHHHbbBBBBBBBBHHH", block)
        return cls(*f[3:21], *f[22:25])  # skip BT/reserved/length and the reserved after RX


@dataclass(frozen=True)
class XrBlock:
    """An XR report block of a type carried through untouched (RFC 3611 §3)."""

    block_type: int
    """BT."""
    type_specific: int
    """The 8 type-specific bits."""
    data: bytes
    """Block contents after its 4-byte header, a multiple of 4 bytes."""

    def _pack(self) -> bytes:
        return struct.pack("!BBH", self.block_type, self.type_specific, len(self.data) // 4)\
            + self.data


@dataclass(frozen=True)
class XrPacket:
    """XR (RFC 3611 §2)."""

    ssrc: int
    """Originator."""
    blocks: tuple[VoipMetrics | XrBlock, ...] = ()
    """Report blocks."""
    padding: int = 0
    """Padding bytes, count included."""


@dataclass(frozen=True)
class UnknownRtcp:
    """An RTCP packet of a type not decoded here (e.g. RFC 4585 feedback), kept as bytes."""

    packet_type: int
    """PT."""
    count: int
    """The 5-bit count/subtype field."""
    body: bytes
    """Everything after the 4-byte header, padding excluded."""
    padding: int = 0
    """Padding bytes, count included."""


RtcpPacket = (
    SenderReport | ReceiverReport | SourceDescription | Bye | App | XrPacket | UnknownRtcp
)


def _err(msg: str) -> RtcpParseError:
    return RtcpParseError(msg)


def _reports(body: bytes, pos: int, count: int) -> tuple[ReportBlock, ...]:
    return tuple(ReportBlock._unpack(body, pos + 24 * i) for i in range(count))


def _parse_sdes(body: bytes, count: int) -> SourceDescription:
    chunks = []
    pos = 0
    for _ in range(count):
        if pos + 4 > len(body):
            raise _err("SDES chunk truncated")
        (ssrc,) = struct.unpack_from("!I", body, pos)
        pos += 4
        items = []
        while True:
            if pos >= len(body):
                raise _err("SDES chunk has no terminating null item")
            kind = body[pos]
            if kind == 0:
                # §6.5: the null item, then zero bytes up to the next 32-bit boundary
                pos = (pos + 4) & ~3
                if pos > len(body):
                    raise _err("SDES chunk padding truncated")
                break
            if pos + 2 > len(body):
                raise _err("SDES item header truncated")
            length = body[pos + 1]
            if pos + 2 + length > len(body):
                raise _err("SDES item runs past the packet")
            items.append((kind, bytes(body[pos + 2 : pos + 2 + length])))
            pos += 2 + length
        chunks.append(SdesChunk(ssrc, tuple(items)))
    if pos != len(body):
        raise _err("SDES packet longer than its chunks")
    return SourceDescription(tuple(chunks))


def _parse_bye(body: bytes, count: int) -> Bye:
    if 4 * count > len(body):
        raise _err("BYE source list truncated")
    ssrcs = struct.unpack_from(f"!{count}I", body, 0)
    pos = 4 * count
    reason = None
    if pos < len(body):
        length = body[pos]
        if pos + 1 + length > len(body):
            raise _err("BYE reason runs past the packet")
        reason = bytes(body[pos + 1 : pos + 1 + length])
        if any(body[pos + 1 + length :]):
            raise _err("BYE reason padding is not zero")
    return Bye(tuple(ssrcs), reason)


def _parse_xr(body: bytes) -> XrPacket:
    if len(body) < 4:
        raise _err("XR packet without SSRC")
    (ssrc,) = struct.unpack_from("!I", body, 0)
    pos = 4
    blocks: list[VoipMetrics | XrBlock] = []
    while pos < len(body):
        if pos + 4 > len(body):
            raise _err("XR block header truncated")
        bt, specific, words = struct.unpack_from("!BBH", body, pos)
        end = pos + 4 + 4 * words
        if end > len(body):
            raise _err("XR block runs past the packet")
        if bt == XR_VOIP_METRICS:
            if words != 8:
                raise _err(f"XR VoIP metrics block length {words}, expected 8")
            blocks.append(VoipMetrics._unpack(body[pos:end]))
        else:
            blocks.append(XrBlock(bt, specific, bytes(body[pos + 4 : end])))
        pos = end
    return XrPacket(ssrc, tuple(blocks))


def _parse_one(pt: int, count: int, body: bytes) -> RtcpPacket:
    if pt == PT_SR:
        if len(body) < 24 + 24 * count:
            raise _err("SR shorter than its report blocks")
        ssrc, ntp_hi, ntp_lo, rtp_ts, packets, octets = struct.unpack_from("!IIIIII", body, 0)
        return SenderReport(ssrc, (ntp_hi << 32) | ntp_lo, rtp_ts, packets, octets,
                            _reports(body, 24, count), bytes(body[24 + 24 * count :]))
    if pt == PT_RR:
        if len(body) < 4 + 24 * count:
            raise _err("RR shorter than its report blocks")
        (ssrc,) = struct.unpack_from("!I", body, 0)
        return ReceiverReport(ssrc, _reports(body, 4, count), bytes(body[4 + 24 * count :]))
    if pt == PT_SDES:
        return _parse_sdes(body, count)
    if pt == PT_BYE:
        return _parse_bye(body, count)
    if pt == PT_APP:
        if len(body) < 8:
            raise _err("APP shorter than SSRC and name")
        (ssrc,) = struct.unpack_from("!I", body, 0)
        return App(count, ssrc, bytes(body[4:8]), bytes(body[8:]))
    if pt == PT_XR:
        return _parse_xr(body)
    return UnknownRtcp(pt, count, bytes(body))


def parse_compound(
    data: bytes | bytearray | memoryview, *, require_report_first: bool = False
) -> list[RtcpPacket]:
    """Parses a compound RTCP packet (RFC 3550 §6.1, validity checks of A.2).

    The packet lengths must add up to the datagram exactly, and only the last packet may be
    padded. With require_report_first, the first packet must be SR or RR (plain RFC 3550; off
    by default because RFC 5506 reduced-size RTCP allows otherwise).
    """
    raw = bytes(data)
    if len(raw) < 4:
        raise _err("RTCP datagram shorter than one header")
    packets: list[RtcpPacket] = []
    pos = 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise _err("RTCP header truncated")
        b0, pt, words = struct.unpack_from("!BBH", raw, pos)
        if b0 >> 6 != 2:
            raise _err("RTCP version is not 2")
        end = pos + 4 + 4 * words
        if end > len(raw):
            raise _err("RTCP length runs past the datagram")
        padding = 0
        body_end = end
        if b0 & 0x20:
            if end != len(raw):
                raise _err("RTCP padding on a packet that is not the last of the compound")
            padding = raw[end - 1]
            if padding == 0 or padding > 4 * words:
                raise _err("RTCP padding count is zero or larger than the packet")
            body_end = end - padding
        if not packets and require_report_first and pt not in (PT_SR, PT_RR):
            raise _err("compound RTCP does not start with SR or RR")
        if not 192 <= pt <= 223:
            raise _err(f"packet type {pt} is not RTCP")
        packet = _parse_one(pt, b0 & 0x1F, raw[pos + 4 : body_end])
        if padding:
            packet = _with_padding(packet, padding)
        packets.append(packet)
        pos = end
    return packets


def _with_padding(packet: RtcpPacket, padding: int) -> RtcpPacket:
    return replace(packet, padding=padding)


def _items_bytes(chunk: SdesChunk) -> bytes:
    out = bytearray(struct.pack("!I", chunk.ssrc))
    for kind, value in chunk.items:
        if not 1 <= kind <= 255 or len(value) > 255:
            raise ValueError("SDES item type must be 1..255 and value at most 255 bytes")
        out += bytes([kind, len(value)]) + value
    out += b"\x00"  # null item
    out += bytes(-len(out) % 4)
    return bytes(out)


def _body(packet: RtcpPacket) -> tuple[int, int, bytes]:
    if isinstance(packet, SenderReport):
        body = struct.pack(
            "!IIIIII", packet.ssrc, packet.ntp_timestamp >> 32, packet.ntp_timestamp & 0xFFFFFFFF,
            packet.rtp_timestamp, packet.packet_count, packet.octet_count,
        )  # fmt: skip
        body += b"".join(r._pack() for r in packet.reports) + packet.extension
        return PT_SR, len(packet.reports), body
    if isinstance(packet, ReceiverReport):
        body = struct.pack("!I", packet.ssrc)
        body += b"".join(r._pack() for r in packet.reports) + packet.extension
        return PT_RR, len(packet.reports), body
    if isinstance(packet, SourceDescription):
        return PT_SDES, len(packet.chunks), b"".join(_items_bytes(c) for c in packet.chunks)
    if isinstance(packet, Bye):
        body = b"".join(struct.pack("!I", s) for s in packet.ssrcs)
        if packet.reason is not None:
            if len(packet.reason) > 255:
                raise ValueError("BYE reason longer than 255 bytes")
            body += bytes([len(packet.reason)]) + packet.reason
            body += bytes(-len(body) % 4)
        return PT_BYE, len(packet.ssrcs), body
    if isinstance(packet, App):
        if len(packet.name) != 4:
            raise ValueError("APP name must be 4 bytes")
        return PT_APP, packet.subtype, struct.pack("!I", packet.ssrc) + packet.name + packet.data
    if isinstance(packet, XrPacket):
        body = struct.pack("!I", packet.ssrc) + b"".join(b._pack() for b in packet.blocks)
        return PT_XR, 0, body
    if isinstance(packet, UnknownRtcp):
        return packet.packet_type, packet.count, packet.body
    raise TypeError(f"not an RTCP packet: {type(packet).__name__}")


def serialize_compound(packets: Iterable[RtcpPacket]) -> bytes:
    """Serializes packets into one compound datagram; raises ValueError on fields that do not
    fit (more than 31 items of a count, bodies not a multiple of 4 bytes, padding not last)."""
    items: Sequence[RtcpPacket] = list(packets)
    out = bytearray()
    for index, packet in enumerate(items):
        pt, count, body = _body(packet)
        if not 0 <= count <= MAX_COUNT:
            raise ValueError(f"RTCP count field out of range: {count}")
        padding = packet.padding
        if padding and index != len(items) - 1:
            raise ValueError("only the last packet of a compound may be padded")
        if padding:
            body += bytes(padding - 1) + bytes([padding])
        if len(body) % 4:
            raise ValueError("RTCP packet (body and padding) is not a multiple of 4 bytes")
        b0 = 0x80 | (0x20 if padding else 0) | count
        out += struct.pack("!BBH", b0, pt, len(body) // 4) + body
    return bytes(out)
