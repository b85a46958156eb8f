"""RFC 4733 telephone-events (DTMF over RTP): a sans-IO sender and receiver.

The sender emits the start packet (M bit), continuation packets every `interval` seconds
with a growing duration, then the end packet (E bit) three times (§2.5.1.4), all with the
timestamp of the event's start (§2.5.1.2). The receiver reports each event exactly once,
whatever the network did: redundant end packets, a lost start packet, lost end packets (the
event ends when the next one starts or after `timeout` seconds without a packet of it) and
reordering. Its core is `_rtp.pxd`'s `te_receiver_*`, which the media engine calls without the
GIL.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from media_core._rtp import RtpParseError, TelephoneEventCore
from media_core.rtp import RtpPacket

__all__ = [
    "DIGITS",
    "EndReason",
    "TelephoneEvent",
    "TelephoneEventReceiver",
    "TelephoneEventSender",
    "event_code",
    "event_payload",
    "parse_event_payload",
]

# §3.2 Table 1: DTMF named events 0-15.
DIGITS = "0123456789*#ABCD"
MAX_DURATION = 0xFFFF


def event_code(digit: str) -> int:
    """The event code of a DTMF digit ('0'-'9', '*', '#', 'A'-'D')."""
    index = DIGITS.find(digit.upper()) if len(digit) == 1 else -1
    if index < 0:
        raise ValueError(f"not a DTMF digit: {digit!r}")
    return index


def event_payload(event: int, *, end: bool, volume: int, duration: int) -> bytes:
    """The 4-byte payload of §2.3."""
    if not 0 <= event <= 255 or not 0 <= volume <= 63 or not 0 <= duration <= MAX_DURATION:
        raise ValueError("event 0..255, volume 0..63, duration 0..65535")
    return bytes([event, (0x80 if end else 0) | volume, duration >> 8, duration & 0xFF])


def parse_event_payload(payload: bytes) -> tuple[int, bool, int, int]:
    """(event, end, volume, duration) of a §2.3 payload; RtpParseError when too short."""
    if len(payload) < 4:
        raise RtpParseError("telephone-event payload shorter than 4 bytes")
    return payload[0], bool(payload[1] & 0x80), payload[1] & 0x3F, (payload[2] << 8) | payload[3]


class EndReason(enum.IntEnum):
    """Why the receiver considered an event finished."""

    END_BIT = 1
    """An end packet arrived."""
    NEW_EVENT = 2
    """A later event started first (every end packet lost)."""
    TIMEOUT = 3
    """No packet of the event for the receiver's timeout."""


@dataclass(frozen=True)
class TelephoneEvent:
    """One received event, reported once."""

    event: int
    """Event code (0-15 DTMF, §3.2)."""
    volume: int
    """Power level, -dBm0 (0..63)."""
    timestamp: int
    """RTP timestamp of the event's start, its identity."""
    duration: int
    """Longest duration seen, timestamp units."""
    reason: EndReason
    """How the end was detected."""

    @property
    def digit(self) -> str | None:
        """The DTMF digit, or None for other events."""
        return DIGITS[self.event] if self.event < len(DIGITS) else None


class TelephoneEventReceiver:
    """Turns telephone-event RTP packets into `TelephoneEvent`s, each exactly once."""

    def __init__(self, *, payload_type: int = 101, timeout: float = 0.25) -> None:
        self.payload_type = payload_type
        self._core = TelephoneEventCore(timeout)

    def receive(self, packet: RtpPacket, now: float) -> list[TelephoneEvent]:
        """Feeds one RTP packet of the event payload type; returns finished events.
        Raises RtpParseError when its payload is shorter than 4 bytes."""
        if packet.payload_type != self.payload_type:
            return []
        found = self._core.feed(packet.timestamp, packet.marker, packet.payload, now)
        return [self._event(t) for t in found]

    def handle_timer(self, now: float) -> list[TelephoneEvent]:
        """Ends an event whose packets stopped (all end packets lost)."""
        return [self._event(t) for t in self._core.poll(now)]

    def next_timer(self) -> float | None:
        """When handle_timer next needs to run, or None."""
        return self._core.next_timer()

    @staticmethod
    def _event(t: tuple[int, int, int, int, int]) -> TelephoneEvent:
        event, volume, reason, timestamp, duration = t
        return TelephoneEvent(event, volume, timestamp, duration, EndReason(reason))


@dataclass
class _Pending:
    event: int
    volume: int
    timestamp: int
    start: float
    total: int  # samples
    sent: int = 0  # continuation packets sent so far (start packet included)
    ends_sent: int = 0


class TelephoneEventSender:
    """Schedules the packets of RFC 4733 events (sans-IO: call poll(now) at next_timer()).

    `seq` is the next sequence number; it is shared with the audio of the same SSRC, so the
    caller may read and set it between events.
    """

    END_REPEATS = 3

    def __init__(
        self,
        *,
        ssrc: int,
        payload_type: int = 101,
        clock_rate: int = 8000,
        interval: float = 0.05,
        seq: int = 0,
    ) -> None:
        self.ssrc = ssrc
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.interval = interval
        self.seq = seq & 0xFFFF
        self._pending: _Pending | None = None

    @property
    def busy(self) -> bool:
        """An event is being sent."""
        return self._pending is not None

    def start(
        self, event: int | str, *, timestamp: int, now: float, duration: float = 0.1,
        volume: int = 10,
    ) -> list[RtpPacket]:
        """Starts an event (a digit or code) lasting `duration` seconds at RTP `timestamp`;
        returns the start packet. Raises ValueError while another event is being sent."""
        if self._pending is not None:
            raise ValueError("an event is already being sent")
        code = event_code(event) if isinstance(event, str) else event
        total = round(duration * self.clock_rate)
        if not 0 < total <= MAX_DURATION:
            raise ValueError(f"duration must be 1..{MAX_DURATION} timestamp units")
        event_payload(code, end=False, volume=volume, duration=0)  # validates the fields
        self._pending = _Pending(code, volume, timestamp & 0xFFFFFFFF, now, total)
        return self.poll(now)

    def next_timer(self) -> float | None:
        """When poll next has a packet to send, or None when idle."""
        p = self._pending
        if p is None:
            return None
        if p.sent * self.interval * self.clock_rate >= p.total:
            return p.start + p.total / self.clock_rate
        return p.start + p.sent * self.interval

    def poll(self, now: float) -> list[RtpPacket]:
        """The packets due at `now`."""
        p = self._pending
        out: list[RtpPacket] = []
        if p is None:
            return out
        step = round(self.interval * self.clock_rate)
        while p.sent * step < p.total and now >= p.start + p.sent * self.interval - 1e-9:
            # §2.5.1.2: the duration so far; the first packet (M bit) says 0
            out.append(self._packet(p, p.sent * step, end=False, marker=p.sent == 0))
            p.sent += 1
        if p.sent * step >= p.total and now >= p.start + p.total / self.clock_rate - 1e-9:
            # §2.5.1.4: the final packet, sent three times with the same timestamp
            while p.ends_sent < self.END_REPEATS:
                out.append(self._packet(p, p.total, end=True, marker=False))
                p.ends_sent += 1
            self._pending = None
        return out

    def _packet(self, p: _Pending, duration: int, *, end: bool, marker: bool) -> RtpPacket:
        packet = RtpPacket(
            payload_type=self.payload_type,
            sequence_number=self.seq,
            timestamp=p.timestamp,
            ssrc=self.ssrc,
            payload=event_payload(p.event, end=end, volume=p.volume, duration=duration),
            marker=marker,
        )
        self.seq = (self.seq + 1) & 0xFFFF
        return packet
