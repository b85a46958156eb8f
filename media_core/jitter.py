"""Adaptive jitter buffer with packet-loss concealment (sans-IO: `now` is passed in).

`put(packet, now)` files an RTP packet by timestamp; `get(now)`, called once per frame by the
playout clock, returns the next 20 ms frame and how it was made: from its packet (NORMAL), by
concealment (CONCEALED, ITU-T G.711 Appendix I style waveform repetition) or as SILENCE. The
target delay follows the largest jitter of the last second plus a margin, between a floor and a
cap; the playout delay moves toward it one frame at a time (fast up, at most one frame in three
down). The per-packet path is compiled (`media_core._jitter`).

`make_trace` and `replay` build seeded network traces and play them through a buffer; the
tests and docs/media-packets.md quote their results.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from media_core._jitter import JitterCore
from media_core.rtp import RtpPacket

__all__ = [
    "Frame",
    "FrameKind",
    "JitterBuffer",
    "JitterStats",
    "PutResult",
    "ReplayResult",
    "Segment",
    "TracePacket",
    "make_trace",
    "replay",
]

CODECS = {"l16": 0, "pcmu": 1, "pcma": 2}


class FrameKind(enum.IntEnum):
    """How a played frame was made."""

    NORMAL = 0
    """From its RTP packet."""
    CONCEALED = 1
    """Synthesised by PLC (a lost or late packet, or a frame inserted to grow the delay)."""
    SILENCE = 2
    """Silence: before playout starts, or after the concealment faded out (60 ms)."""


class PutResult(enum.IntEnum):
    """What put() did with a packet."""

    ACCEPTED = 0
    DUPLICATE = 1
    LATE = 2
    """Its frame was already played (or concealed): discarded and counted."""
    OVERFLOW = 3
    """Beyond the size bound (packets or ms): discarded and counted."""
    INVALID = 4
    """Payload is not a whole number of frames (1 to 6)."""
    RESYNC = 5
    """The stream jumped (three packets in a row off the timeline): playout restarted."""


class Frame(NamedTuple):
    """One frame of playout."""

    data: bytes | npt.NDArray[np.int16]
    """G.711 payload bytes, or int16 samples (L16, or output="samples")."""
    kind: FrameKind
    """NORMAL, CONCEALED or SILENCE."""


@dataclass(frozen=True)
class JitterStats:
    """Counters of one buffer."""

    received: int
    """Frames accepted (a packet of 40 ms carries two 20 ms frames)."""
    duplicates: int
    """Packets dropped as duplicates."""
    late: int
    """Packets discarded because their frame had been played already."""
    lost: int
    """Frames due with no packet that never came late either (network loss as seen here)."""
    missing: int
    """Frames due with no packet at playout time (lost + late ones)."""
    concealed: int
    """Frames synthesised by PLC."""
    silence: int
    """Frames of silence."""
    normal: int
    """Frames played from their packets."""
    stretched: int
    """Frames inserted to grow the delay."""
    dropped: int
    """Frames skipped to shrink the delay."""
    overflow: int
    """Packets beyond the size bound."""
    invalid: int
    """Packets whose payload was not a whole number of frames."""
    resyncs: int
    """Times the buffer restarted on a jumped stream."""
    target_ms: float
    """Current target delay beyond the fastest packets, ms."""
    delay_ms: float
    """Current playout delay beyond the fastest packets, ms (at the last get)."""
    mean_buffer_ms: float
    """Mean time a played packet waited in the buffer, ms."""


class JitterBuffer:
    """Reorders, de-duplicates and delays RTP audio for smooth playout; conceals losses."""

    def __init__(
        self,
        *,
        codec: str = "pcmu",
        clock_rate: int = 8000,
        frame_ms: int = 20,
        start_ms: float = 40.0,
        floor_ms: float = 20.0,
        cap_ms: float = 200.0,
        margin_ms: float = 12.0,
        window_ms: float = 1000.0,
        max_packets: int = 50,
        max_ms: float = 1000.0,
        output: str | None = None,
    ) -> None:
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
        if not 0 < floor_ms <= start_ms <= cap_ms:
            raise ValueError("need 0 < floor_ms <= start_ms <= cap_ms")
        if cap_ms >= max_ms:
            raise ValueError("max_ms must exceed cap_ms")
        self.codec = codec
        self.clock_rate = clock_rate
        self.frame_samples = clock_rate * frame_ms // 1000
        self.frame_period = frame_ms / 1000.0
        self.output = output or ("samples" if codec == "l16" else "payload")
        if self.output not in ("samples", "payload"):
            raise ValueError("output must be 'samples' or 'payload'")
        self._core = JitterCore(
            CODECS[codec], clock_rate, self.frame_samples, max_packets, max_ms / 1000.0,
            start_ms / 1000.0, floor_ms / 1000.0, cap_ms / 1000.0, margin_ms / 1000.0,
            window_ms / 1000.0,
        )  # fmt: skip
        self._pcm = np.zeros(self.frame_samples, dtype=np.int16)
        self._payload = bytearray(self._core.frame_bytes)
        self._last_get: float | None = None

    def put(self, packet: RtpPacket | tuple[int, int, bytes], now: float) -> PutResult:
        """Files a packet (an RtpPacket or (seq, timestamp, payload)) that arrived at `now`."""
        if isinstance(packet, RtpPacket):
            ts, payload = packet.timestamp, packet.payload
        else:
            _seq, ts, payload = packet
        return PutResult(self._core.put(ts, payload, now))

    def get(self, now: float) -> Frame:
        """The frame to play at `now`; call once per frame period."""
        self._last_get = now
        kind = FrameKind(self._core.get(now, self._pcm, self._payload))
        if self.output == "samples":
            return Frame(self._pcm.copy(), kind)
        return Frame(bytes(self._payload), kind)

    def next_timer(self) -> float | None:
        """When get() is next due (one frame after the last), or None before the first."""
        return None if self._last_get is None else self._last_get + self.frame_period

    @property
    def target_ms(self) -> float:
        """Current target delay, ms."""
        return self._core.target * 1000.0

    @property
    def delay_ms(self) -> float:
        """Current playout delay beyond the fastest packets, ms."""
        return self._core.delay * 1000.0

    @property
    def buffered(self) -> int:
        """Packets waiting."""
        return self._core.buffered

    @property
    def stats(self) -> JitterStats:
        """A snapshot of the counters."""
        s = self._core.stats()
        normal = s["normal"]
        return JitterStats(
            received=s["received"], duplicates=s["duplicates"], late=s["late"],
            lost=max(0, s["missing"] - s["late"]), missing=s["missing"],
            concealed=s["concealed"], silence=s["silence"], normal=normal,
            stretched=s["stretched"], dropped=s["dropped"], overflow=s["overflow"],
            invalid=s["invalid"], resyncs=s["resyncs"], target_ms=self.target_ms,
            delay_ms=self.delay_ms,
            mean_buffer_ms=1000.0 * s["buffer_time_sum"] / normal if normal else 0.0,
        )  # fmt: skip


# ------------------------------------------------------------------- synthetic traces


@dataclass(frozen=True)
class Segment:
    """A stretch of network conditions in a synthetic trace."""

    duration: float
    """Seconds."""
    jitter_ms: float
    """Mean of the random part of the one-way delay, ms."""
    loss: float = 0.0
    """Probability that a packet is lost, 0..1."""


@dataclass(frozen=True)
class TracePacket:
    """One packet of a trace."""

    seq: int
    """RTP sequence number."""
    timestamp: int
    """RTP timestamp."""
    sent: float
    """Send time, s."""
    arrival: float | None
    """Arrival time, s, or None when lost."""


def make_trace(
    segments: Sequence[Segment],
    *,
    seed: int,
    base_delay_ms: float = 30.0,
    frame_ms: int = 20,
    clock_rate: int = 8000,
    distribution: str = "gamma",
    shape: float = 4.0,
) -> list[TracePacket]:
    """A seeded trace: one packet per frame, delay = base + X where X has mean `jitter_ms`.

    `gamma`: X ~ Gamma(shape, jitter/shape) (shape 4: sd = mean/2, a moderate tail).
    `pareto`: X ~ Lomax(alpha=shape) scaled to the same mean (heavy tail; shape > 1).
    Packets are independent, so high jitter also reorders them.
    """
    if distribution not in ("gamma", "pareto"):
        raise ValueError("distribution must be 'gamma' or 'pareto'")
    rng = np.random.default_rng(seed)
    out: list[TracePacket] = []
    t = 0.0
    seq = int(rng.integers(0, 65536))
    ts = int(rng.integers(0, 1 << 32))
    step = clock_rate * frame_ms // 1000
    period = frame_ms / 1000.0
    for seg in segments:
        count = int(round(seg.duration / period))
        mean = seg.jitter_ms / 1000.0
        if distribution == "gamma":
            extra = rng.gamma(shape, mean / shape, count) if mean > 0 else np.zeros(count)
        else:
            extra = rng.pareto(shape, count) * mean * (shape - 1)
        lost = rng.random(count) < seg.loss
        for i in range(count):
            arrival = None if lost[i] else t + base_delay_ms / 1000.0 + float(extra[i])
            out.append(TracePacket(seq, ts, t, arrival))
            seq = (seq + 1) & 0xFFFF
            ts = (ts + step) & 0xFFFFFFFF
            t += period
    return out


@dataclass(frozen=True)
class ReplayResult:
    """What a buffer made of a trace."""

    sent: int
    """Packets in the trace."""
    arrived: int
    """Packets not lost by the network."""
    late: int
    """Packets the buffer discarded as late."""
    late_pct: float
    """late / arrived, percent."""
    mean_buffer_ms: float
    """Mean time played packets waited in the buffer (delay added by the buffer), ms."""
    stats: JitterStats
    """Final counters."""
    timeline: list[tuple[float, float, float, int]]
    """(time, target_ms, delay_ms, cumulative late) at every get."""


def replay(
    trace: Sequence[TracePacket],
    buffer: JitterBuffer,
    *,
    payload: Callable[[TracePacket], bytes] | None = None,
    duration_extra: float = 0.5,
) -> ReplayResult:
    """Plays a trace through a buffer: packets are put at their arrival times and get() runs
    every frame period from the first send time, in time order."""
    if not trace:
        raise ValueError("empty trace")
    frame_len = buffer.frame_samples * (2 if buffer.codec == "l16" else 1)
    silent = b"\xff" * frame_len if buffer.codec == "pcmu" else b"\xd5" * frame_len
    if buffer.codec == "l16":
        silent = bytes(frame_len)
    make = payload or (lambda _p: silent)
    arrivals = sorted((p for p in trace if p.arrival is not None), key=lambda p: p.arrival)
    end = max(trace[-1].sent, arrivals[-1].arrival if arrivals else 0.0) + duration_extra
    timeline: list[tuple[float, float, float, int]] = []
    i = 0
    ticks = math.ceil((end - trace[0].sent) / buffer.frame_period)
    for k in range(ticks):
        now = trace[0].sent + k * buffer.frame_period
        while i < len(arrivals) and arrivals[i].arrival <= now:  # type: ignore[operator]
            p = arrivals[i]
            buffer.put((p.seq, p.timestamp, make(p)), p.arrival)  # type: ignore[arg-type]
            i += 1
        buffer.get(now)
        timeline.append((now, buffer.target_ms, buffer.delay_ms, buffer._core.stats()["late"]))
    stats = buffer.stats
    return ReplayResult(
        sent=len(trace),
        arrived=len(arrivals),
        late=stats.late,
        late_pct=100.0 * stats.late / len(arrivals) if arrivals else 0.0,
        mean_buffer_ms=stats.mean_buffer_ms,
        stats=stats,
        timeline=timeline,
    )
