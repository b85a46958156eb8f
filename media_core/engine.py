"""The media engine, controlled from asyncio.

One native thread (``media_core._engine``) owns every RTP/RTCP socket and moves, mixes, records
and inspects packets without the GIL. This façade queues commands to it (never waiting on the
thread) and turns its events into frozen dataclasses on an :class:`asyncio.Queue`, woken by an
eventfd registered with ``loop.add_reader``. The commands of one event-loop turn wake the
thread once, at the end of the turn (``call_soon``), not once each.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

from media_core._engine import Engine, EngineError, RecordingTimeline

__all__ = [
    "DigitReceived",
    "EngineError",
    "EventsLost",
    "LegAddress",
    "LegReleased",
    "LegStats",
    "MediaEngine",
    "MediaEvent",
    "MediaTimeout",
    "PromptFinished",
    "RecordingFinished",
    "RecordingTimeline",
]

log = logging.getLogger(__name__)

# Event kinds of media_core/_engine.pxd
_EV_DIGIT, _EV_TIMEOUT, _EV_PLAY_DONE, _EV_RELEASED, _EV_RECORD_DONE, _EV_LOST = 1, 2, 3, 4, 5, 6
_CODECS = {"PCMU": 0, "PCMA": 8}
EVENT_QUEUE_LIMIT = 65536


@dataclass(frozen=True)
class LegAddress:
    """Where a leg receives media (for the SDP answer)."""

    leg: int
    """Engine leg id."""
    host: str
    """Local address the ports are bound to."""
    rtp_port: int
    """Even RTP port (RFC 3550 §11)."""
    rtcp_port: int
    """Odd RTCP port, rtp_port + 1."""


@dataclass(frozen=True)
class DigitReceived:
    """A DTMF digit reached the engine on a leg."""

    leg: int
    """Leg the digit arrived on."""
    digit: str
    """'0'-'9', '*', '#', 'A'-'D'."""
    method: str
    """'rfc4733' (telephone-event packets) or 'inband' (tones in the audio)."""
    duration_ms: float
    """Event duration for RFC 4733 (0 for in-band)."""


@dataclass(frozen=True)
class MediaTimeout:
    """No RTP arrived on a leg for longer than its inactivity timeout."""

    leg: int
    """The silent leg."""
    idle_seconds: float
    """Time since the last packet."""


@dataclass(frozen=True)
class PromptFinished:
    """A prompt stopped playing on a leg."""

    leg: int
    """Leg that played it."""
    prompt_id: int
    """Id returned by :meth:`MediaEngine.play`."""
    completed: bool
    """True when played to the end, False when stopped, replaced or the leg released."""


@dataclass(frozen=True)
class LegReleased:
    """The engine closed a leg's ports; its id may be reused."""

    leg: int
    """The released leg."""


@dataclass(frozen=True)
class RecordingFinished:
    """A recording's WAV file is complete and closed."""

    recording_id: int
    """Id returned by :meth:`MediaEngine.record_start`."""
    path: str
    """The WAV file."""
    frames: int
    """Stereo frames (samples per channel) written."""
    ok: bool
    """False when a write failed (disk full)."""


@dataclass(frozen=True)
class EventsLost:
    """The engine's event queue overflowed and dropped events."""

    count: int
    """How many were dropped."""


MediaEvent = (
    DigitReceived | MediaTimeout | PromptFinished | LegReleased | RecordingFinished | EventsLost
)


@dataclass(frozen=True)
class LegStats:
    """Per-leg counters (RFC 3550 §6.4 receiver figures) and the estimated MOS."""

    rx_packets: int
    """RTP packets received from the far end."""
    rx_bytes: int
    """Their bytes, headers included."""
    tx_packets: int
    """RTP packets sent to the far end."""
    tx_bytes: int
    """Their bytes."""
    lost: int
    """Packets lost on the way in (RFC 3550 A.3 cumulative)."""
    loss_pct: float
    """Lost over expected, in percent."""
    jitter_ms: float
    """Interarrival jitter (RFC 3550 A.8)."""
    rtcp_rx: int
    """RTCP packets received."""
    rtcp_tx: int
    """RTCP reports sent."""
    rtt_ms: float | None
    """Round trip from the far end's reports (RFC 3550 §6.4.1), None until known."""
    latched: bool
    """The far end was learnt from its packets (symmetric RTP)."""
    rx_foreign: int
    """Packets dropped because they came from another address than the latched one."""
    mos: float | None
    """ITU-T G.107 E-model MOS from loss and delay, None when media_core.quality is absent."""
    recording_late: int = 0
    """Packets that reached the recorder after their place in the file was written."""
    recording_resyncs: int = 0
    """Times the recorder realigned this leg's RTP timestamps to wall time (new stream, a jump,
    clock drift)."""


class MediaEngine:
    """GIL-free RTP engine owning port pairs from ``port_range``, driven from one asyncio loop."""

    def __init__(
        self,
        port_range: tuple[int, int] = (20000, 29999),
        *,
        host: str = "127.0.0.1",
        max_legs: int = 4096,
        max_recordings: int = 1024,
        recording_delay_ms: int = 100,
    ) -> None:
        self._core = Engine(port_range[0], port_range[1], max_legs, max_recordings,
                            recording_delay_ms=recording_delay_ms)
        self._host = host
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events: asyncio.Queue[MediaEvent] = asyncio.Queue(EVENT_QUEUE_LIMIT)
        self._released: dict[int, asyncio.Future[None]] = {}
        self._recordings: dict[int, tuple[str, asyncio.Future[RecordingFinished]]] = {}
        self._next_prompt = 1
        self.events_dropped = 0
        self._wake_armed = False

    @classmethod
    def from_range(cls, rtp_ports: str, **kwargs: object) -> MediaEngine:
        """Build from a config range such as ``"20000-29999"`` (site.yaml media.rtp_ports)."""
        try:
            low, high = (int(p) for p in rtp_ports.split("-", 1))
        except ValueError as exc:
            raise EngineError(f"rtp_ports must look like 20000-29999, got {rtp_ports!r}") from exc
        return cls((low, high), **kwargs)  # type: ignore[arg-type]

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine thread and listen for its events on the running loop."""
        self._loop = asyncio.get_running_loop()
        self._core.defer_wakes(True)
        self._core.start()
        self._core.wake()  # commands queued before the start
        self._loop.add_reader(self._core.event_fd, self._on_events)

    async def close(self) -> None:
        """Stop the thread and release every port; pending waits are cancelled."""
        if self._loop is not None:
            self._loop.remove_reader(self._core.event_fd)
        self._core.close()
        for fut in self._released.values():
            if not fut.done():
                fut.cancel()
        for _, fut in self._recordings.values():
            if not fut.done():
                fut.cancel()

    def _posted(self) -> None:
        """A command was queued: wake the engine at the end of this loop turn."""
        if not self._wake_armed and self._loop is not None:
            self._wake_armed = True
            self._loop.call_soon(self._wake)

    def _wake(self) -> None:
        self._wake_armed = False
        try:
            self._core.wake()
        except Exception:  # the engine is closing: nothing waits for these commands
            log.debug("event=media_wake_failed")

    @property
    def thread_id(self) -> int:
        """Kernel thread id of the engine thread (for pinning and CPU accounting)."""
        return self._core.thread_id

    @property
    def legs_active(self) -> int:
        """Legs allocated and not yet released."""
        return self._core.legs_active

    @property
    def recording_delay_ms(self) -> int:
        """Age at which a recording's audio is written: packets later than that, or reordered
        further, miss their place."""
        return self._core.recording_delay_ms

    @property
    def bytes_per_call(self) -> int:
        """Engine memory of one recorded two-leg call: two legs, one recording with its timeline
        ring, its stdio buffer (40 KiB)."""
        return 2 * self._core.leg_bytes + self._core.recording_bytes + 40960

    # -- legs ------------------------------------------------------------------------------------

    def allocate_leg(self, host: str | None = None) -> LegAddress:
        """Open an even/odd RTP/RTCP port pair, DSCP EF marked."""
        leg, port = self._core.allocate(host or self._host)
        self._posted()
        return LegAddress(leg, host or self._host, port, port + 1)

    def set_remote(self, leg: int, host: str, port: int, rtcp_port: int | None = None) -> None:
        """Expected far end from SDP; the first packet received replaces it (symmetric RTP)."""
        self._core.set_remote(leg, host, port, rtcp_port)
        self._posted()

    def set_codec(self, leg: int, codec: str | int = "PCMU", telephone_event_pt: int = 101) -> None:
        """The leg's G.711 law ("PCMU"/"PCMA" or 0/8) and RFC 4733 payload type (-1: none)."""
        pt = _CODECS.get(codec, codec) if isinstance(codec, str) else codec
        if not isinstance(pt, int):
            raise EngineError(f"unsupported codec {codec!r}: PCMU or PCMA")
        self._core.set_codec(leg, pt, telephone_event_pt)
        self._posted()

    def set_timeout(self, leg: int, seconds: float) -> None:
        """Emit :class:`MediaTimeout` after this long without RTP (0 disables)."""
        self._core.set_timeout(leg, seconds)
        self._posted()

    def detect_inband_dtmf(self, leg: int, enabled: bool = True) -> None:
        """Report DTMF tones found in the leg's audio as :class:`DigitReceived`."""
        self._core.set_inband_dtmf(leg, enabled)
        self._posted()

    def release(self, leg: int) -> asyncio.Future[None]:
        """Close the leg's ports; the future completes when the engine confirms it."""
        if leg in self._released:
            return self._released[leg]
        fut = self._future()
        self._core.release(leg)
        self._posted()
        self._released[leg] = fut
        return fut

    def stats(self, leg: int) -> LegStats:
        """Current counters of a leg, with MOS from media_core.quality."""
        s = self._core.stats(leg)
        rtt = s["rtt_ms"]
        return LegStats(
            rx_packets=s["rx_packets"],
            rx_bytes=s["rx_bytes"],
            tx_packets=s["tx_packets"],
            tx_bytes=s["tx_bytes"],
            lost=max(0, s["lost"]),
            loss_pct=s["loss_pct"],
            jitter_ms=s["jitter_ms"],
            rtcp_rx=s["rtcp_rx"],
            rtcp_tx=s["rtcp_tx"],
            rtt_ms=rtt,
            latched=s["latched"],
            rx_foreign=s["rx_foreign"],
            mos=_mos(s["loss_pct"], (rtt or 0.0) / 2 + s["jitter_ms"] * 2 + 20.0),
            recording_late=s["rec_late"],
            recording_resyncs=s["rec_resyncs"],
        )

    # -- media -----------------------------------------------------------------------------------

    def bridge(self, caller: int, agent: int) -> None:
        """Relay the two legs to each other (passthrough, or A/u-law transcoding)."""
        self._core.bridge(caller, agent)
        self._posted()

    def unbridge(self, leg: int) -> None:
        """Stop relaying between the leg and its peer."""
        self._core.unbridge(leg)
        self._posted()

    def play(self, leg: int, pcm: object) -> int:
        """Play 8 kHz int16 PCM on the leg at 20 ms pacing; returns the prompt id."""
        prompt_id = self._next_prompt
        self._next_prompt = (self._next_prompt + 1) & 0x7FFFFFFF or 1
        self._core.play(leg, pcm, prompt_id)
        self._posted()
        return prompt_id

    def stop_play(self, leg: int) -> None:
        """Stop the leg's prompt; the bridged far end is heard again."""
        self._core.stop_play(leg)
        self._posted()

    def monitor(self, supervisor: int, caller: int, agent: int) -> None:
        """The supervisor hears caller and agent; nobody hears the supervisor."""
        try:
            self._core.set_mix(supervisor, [caller, agent])
            self._core.set_mix(agent, [])
            self._core.set_mix(caller, [])
        finally:
            self._posted()

    def whisper(self, supervisor: int, caller: int, agent: int) -> None:
        """The agent hears caller and supervisor; the caller hears only the agent."""
        try:
            self._core.set_mix(supervisor, [caller, agent])
            self._core.set_mix(agent, [caller, supervisor])
            self._core.set_mix(caller, [])
        finally:
            self._posted()

    def barge(self, supervisor: int, caller: int, agent: int) -> None:
        """Three-way: each party hears the other two."""
        try:
            self._core.set_mix(supervisor, [caller, agent])
            self._core.set_mix(agent, [caller, supervisor])
            self._core.set_mix(caller, [agent, supervisor])
        finally:
            self._posted()

    def stop_listening(self, supervisor: int, caller: int, agent: int) -> None:
        """End monitor/whisper/barge: caller and agent hear each other only."""
        try:
            for leg in (supervisor, caller, agent):
                self._core.set_mix(leg, [])
        finally:
            self._posted()

    # -- recording -------------------------------------------------------------------------------

    def record_start(self, path: str, caller: int, agent: int) -> int:
        """Record the call as stereo WAV (caller left, agent right); returns the recording id."""
        rec = self._core.record_start(path, caller, agent)
        self._posted()
        self._recordings[rec] = (path, self._future())
        return rec

    def record_pause(self, recording_id: int) -> None:
        """Write silence instead of the call's audio (card numbers being read)."""
        self._core.record_pause(recording_id)
        self._posted()

    def record_resume(self, recording_id: int) -> None:
        """Record the call's audio again."""
        self._core.record_resume(recording_id)
        self._posted()

    def record_stop(self, recording_id: int) -> asyncio.Future[RecordingFinished]:
        """Close the WAV; the future completes with :class:`RecordingFinished`."""
        self._core.record_stop(recording_id)
        self._posted()
        return self._recordings[recording_id][1]

    # -- events ----------------------------------------------------------------------------------

    def _future(self) -> asyncio.Future:
        loop = self._loop or asyncio.get_event_loop()
        return loop.create_future()

    def _on_events(self) -> None:
        for kind, leg, a, b, x, _t in self._core.drain():
            event: MediaEvent
            if kind == _EV_DIGIT:
                event = DigitReceived(leg, chr(a), "inband" if b else "rfc4733", x / 8.0)
            elif kind == _EV_TIMEOUT:
                event = MediaTimeout(leg, x / 1e9)
            elif kind == _EV_PLAY_DONE:
                event = PromptFinished(leg, a, bool(b))
            elif kind == _EV_RELEASED:
                event = LegReleased(leg)
                fut = self._released.pop(leg, None)
                if fut is not None and not fut.done():
                    fut.set_result(None)
            elif kind == _EV_RECORD_DONE:
                path, rfut = self._recordings.pop(a, ("", None))
                event = RecordingFinished(a, path, x, not b)
                if rfut is not None and not rfut.done():
                    rfut.set_result(event)
            elif kind == _EV_LOST:
                event = EventsLost(a)
                log.warning("event=media_events_lost count=%d", a)
            else:
                continue
            try:
                self.events.put_nowait(event)
            except asyncio.QueueFull:
                self.events_dropped += 1


def _mos(loss_pct: float, delay_ms: float) -> float | None:
    try:
        from media_core import quality
    except ImportError:
        return None
    return float(quality.mos(loss_pct, delay_ms))


def legs_of(addresses: Iterable[LegAddress]) -> list[int]:
    """Leg ids of several addresses (convenience for bulk release)."""
    return [a.leg for a in addresses]
