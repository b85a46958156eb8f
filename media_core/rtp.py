"""RTP packets (RFC 3550 §5) and receiver statistics (RFC 3550 Appendix A).

`RtpPacket.parse` / `RtpPacket.to_bytes` round-trip every header field, the CSRC list, the
header extension (RFC 3550 §5.3.1, with RFC 8285 element access) and padding. Malformed input
raises `RtpParseError` (a `ValueError`). The compiled core lives in `media_core._rtp`, whose
`.pxd` gives the media engine the same parser and statistics without the GIL.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from media_core._rtp import (
    ReceptionStats,
    RtpParseError,
    is_rtcp,
    parse_header,
    rtt_from_report,
)
from media_core.rtcp import (
    App,
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpPacket,
    SdesChunk,
    SenderReport,
    SourceDescription,
    UnknownRtcp,
    VoipMetrics,
    XrBlock,
    XrPacket,
    ntp_middle,
    ntp_timestamp,
    parse_compound,
    serialize_compound,
)

__all__ = [
    "App",
    "Bye",
    "ExtensionElement",
    "ReceiverReport",
    "ReceptionStats",
    "ReportBlock",
    "RtcpPacket",
    "RtpPacket",
    "RtpParseError",
    "SdesChunk",
    "SenderReport",
    "SourceDescription",
    "UnknownRtcp",
    "VoipMetrics",
    "XrBlock",
    "XrPacket",
    "is_rtcp",
    "ntp_middle",
    "ntp_timestamp",
    "parse_compound",
    "parse_extension_elements",
    "rtt_from_report",
    "serialize_compound",
]

MAX_CSRC = 15


@dataclass(frozen=True)
class ExtensionElement:
    """One RFC 8285 header extension element."""

    id: int
    """Local identifier negotiated in SDP (1-14 one-byte form, 1-255 two-byte form)."""
    data: bytes
    """Element data."""


@dataclass(frozen=True)
class RtpPacket:
    """One RTP packet (RFC 3550 §5.1)."""

    payload_type: int
    """PT, 7 bits."""
    sequence_number: int
    """16-bit sequence number."""
    timestamp: int
    """32-bit RTP timestamp."""
    ssrc: int
    """Synchronization source."""
    payload: bytes = b""
    """Payload, padding excluded."""
    marker: bool = False
    """M bit (start of a talkspurt, start of an RFC 4733 event)."""
    csrc: tuple[int, ...] = ()
    """Contributing sources, at most 15."""
    extension_profile: int | None = None
    """16-bit profile field of the header extension, or None when X=0."""
    extension: bytes = b""
    """Header extension data, a multiple of 4 bytes, its 4-byte header excluded."""
    padding: int = 0
    """Trailing padding bytes, count byte included (0 = P bit clear)."""
    version: int = field(default=2, repr=False)
    """Always 2."""

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> RtpPacket:
        """Parses one datagram; raises RtpParseError when it is not a well-formed RTP packet."""
        raw = bytes(data)
        (version, _p, _x, marker, pt, seq, ts, ssrc, csrcs, ext_profile, ext_off, ext_len,
         pay_off, pay_len, pad_len) = parse_header(raw)
        return cls(
            payload_type=pt,
            sequence_number=seq,
            timestamp=ts,
            ssrc=ssrc,
            payload=raw[pay_off : pay_off + pay_len],
            marker=bool(marker),
            csrc=csrcs,
            extension_profile=ext_profile,
            extension=raw[ext_off : ext_off + ext_len] if ext_profile is not None else b"",
            padding=pad_len,
            version=version,
        )

    def to_bytes(self) -> bytes:
        """Serializes; raises ValueError when a field does not fit its width."""
        if not 0 <= self.payload_type <= 127:
            raise ValueError(f"payload_type out of range: {self.payload_type}")
        if len(self.csrc) > MAX_CSRC:
            raise ValueError(f"at most {MAX_CSRC} CSRCs, got {len(self.csrc)}")
        if len(self.extension) % 4 or len(self.extension) > 4 * 0xFFFF:
            raise ValueError("header extension must be a multiple of 4 bytes, <= 262140")
        if not 0 <= self.padding <= 255:
            raise ValueError(f"padding out of range: {self.padding}")
        has_ext = self.extension_profile is not None
        b0 = 0x80 | (0x20 if self.padding else 0) | (0x10 if has_ext else 0) | len(self.csrc)
        out = bytearray(
            struct.pack(
                "!BBHII",
                b0,
                (0x80 if self.marker else 0) | self.payload_type,
                self.sequence_number & 0xFFFF,
                self.timestamp & 0xFFFFFFFF,
                self.ssrc & 0xFFFFFFFF,
            )
        )
        for c in self.csrc:
            out += struct.pack("!I", c)
        if has_ext:
            out += struct.pack("!HH", self.extension_profile, len(self.extension) // 4)
            out += self.extension
        out += self.payload
        if self.padding:
            out += bytes(self.padding - 1) + bytes([self.padding])
        return bytes(out)

    def with_header(self, **changes: int | bool) -> RtpPacket:
        """A copy with some header fields changed (seq, ts, ssrc rewriting when relaying)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def extension_elements(self) -> list[ExtensionElement]:
        """The RFC 8285 elements of the header extension (one- or two-byte form)."""
        if self.extension_profile is None:
            return []
        return parse_extension_elements(self.extension_profile, self.extension)


def parse_extension_elements(profile: int, data: bytes) -> list[ExtensionElement]:
    """Splits RFC 8285 header extension data into elements; raises RtpParseError on overrun.

    Profile 0xBEDE is the one-byte form (§4.2), 0x100X the two-byte form (§4.3); any other
    profile is not RFC 8285 and yields one element with id 0 holding all the data.
    """
    elements: list[ExtensionElement] = []
    i = 0
    if profile == 0xBEDE:
        while i < len(data):
            b = data[i]
            if b == 0:  # padding byte
                i += 1
                continue
            ident, length = b >> 4, (b & 0x0F) + 1
            if ident == 15:  # §4.2: reserved id, stop processing
                break
            if i + 1 + length > len(data):
                raise RtpParseError("one-byte header extension element runs past the extension")
            elements.append(ExtensionElement(ident, bytes(data[i + 1 : i + 1 + length])))
            i += 1 + length
    elif profile & 0xFFF0 == 0x1000:
        while i < len(data):
            if data[i] == 0:
                i += 1
                continue
            if i + 2 > len(data):
                raise RtpParseError("two-byte header extension element header truncated")
            ident, length = data[i], data[i + 1]
            if i + 2 + length > len(data):
                raise RtpParseError("two-byte header extension element runs past the extension")
            elements.append(ExtensionElement(ident, bytes(data[i + 2 : i + 2 + length])))
            i += 2 + length
    else:
        elements.append(ExtensionElement(0, bytes(data)))
    return elements
