"""The media engine over real UDP on 127.0.0.1: relaying, transcoding, prompts, recording, DTMF,
timeouts, mixing, DSCP and leak-free release; the recording timeline (placement by RTP
timestamp) also with chosen arrival times."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest

from media_core import g711
from media_core.engine import (
    DigitReceived,
    EngineError,
    LegReleased,
    MediaEngine,
    MediaTimeout,
    PromptFinished,
    RecordingFinished,
    RecordingTimeline,
)

PORTS = (41000, 42999)
RATE = 8000
FRAME = 160
T = TypeVar("T")


def run(coro_fn: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(main())


def tone(freq: float, samples: int, amplitude: float = 8000.0, start: int = 0) -> np.ndarray:
    n = np.arange(start, start + samples)
    return (amplitude * np.sin(2 * np.pi * freq * n / RATE)).astype(np.int16)


def rtp(seq: int, ts: int, ssrc: int, payload: bytes, pt: int = 0, marker: bool = False) -> bytes:
    return struct.pack("!BBHII", 0x80, (0x80 if marker else 0) | pt, seq & 0xFFFF,
                       ts & 0xFFFFFFFF, ssrc) + payload


def header(data: bytes) -> tuple[int, int, int, int, bool]:
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    return b1 & 0x7F, seq, ts, ssrc, bool(b1 & 0x80)


class Phone:
    """A UDP endpoint standing in for a SIP phone's RTP stack."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(fam, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.seq = 1000
        self.ts = 5000

    def send(self, port: int, payload: bytes, pt: int = 0) -> None:
        self.sock.sendto(rtp(self.seq, self.ts, self.ssrc, payload, pt), (self.host, port))
        self.seq += 1
        self.ts += FRAME

    async def recv(self, timeout: float = 3.0) -> bytes:
        loop = asyncio.get_running_loop()
        data, _ = await asyncio.wait_for(loop.sock_recvfrom(self.sock, 2048), timeout)
        return data

    async def recv_n(self, n: int, timeout: float = 5.0) -> list[bytes]:
        return [await self.recv(timeout) for _ in range(n)]

    def close(self) -> None:
        self.sock.close()


async def next_event(engine: MediaEngine, kind: type[T], timeout: float = 5.0) -> T:
    """The next event of this kind (others are skipped)."""
    async def wait() -> T:
        while True:
            ev = await engine.events.get()
            if isinstance(ev, kind):
                return ev

    return await asyncio.wait_for(wait(), timeout)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Waits for a condition on engine state that no event announces (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.002)


async def paced(steps: int, send: Callable[[int], None]) -> None:
    """Calls send(i) every 20 ms, like a phone's packetization clock."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(steps):
        send(i)
        delay = start + (i + 1) * 0.02 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


def spectrum_peak_hz(samples: np.ndarray, freq: float) -> float:
    """Magnitude of the spectrum at freq relative to the strongest bin (0..1)."""
    x = samples.astype(np.float64)
    if not np.any(x):
        return 0.0
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    bins = np.fft.rfftfreq(len(x), 1 / RATE)
    near = np.abs(bins - freq) <= 15
    return float(mag[near].max() / mag.max())


async def bridged_pair(engine: MediaEngine, caller: Phone, agent: Phone,
                       codecs: tuple[str, str] = ("PCMU", "PCMU")) -> tuple[int, int, int, int]:
    a = engine.allocate_leg()
    b = engine.allocate_leg()
    engine.set_codec(a.leg, codecs[0])
    engine.set_codec(b.leg, codecs[1])
    engine.set_remote(a.leg, caller.host, caller.port)
    engine.set_remote(b.leg, agent.host, agent.port)
    engine.bridge(a.leg, b.leg)
    return a.leg, a.rtp_port, b.leg, b.rtp_port


async def started(**kwargs: object) -> MediaEngine:
    engine = MediaEngine(PORTS, **kwargs)  # type: ignore[arg-type]
    await engine.start()
    return engine


def test_bridge_relays_tone_bit_exact_with_one_continuous_stream() -> None:
    async def body() -> None:
        engine = await started()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            payloads = [g711.ulaw_encode(tone(440, FRAME, start=i * FRAME)) for i in range(30)]
            for p in payloads:
                caller.send(pa, p)
            got = await agent.recv_n(30)
            assert [g[12:] for g in got] == payloads
            hdrs = [header(g) for g in got]
            assert {h[3] for h in hdrs} == {hdrs[0][3]} and hdrs[0][3] != caller.ssrc
            assert [h[1] for h in hdrs] == [(hdrs[0][1] + i) & 0xFFFF for i in range(30)]
            assert [h[2] for h in hdrs] == [(hdrs[0][2] + FRAME * i) & 0xFFFFFFFF
                                            for i in range(30)]
            # and the other way
            agent.send(pb, payloads[0])
            back = await caller.recv()
            assert back[12:] == payloads[0]
            stats = engine.stats(a)
            assert stats.rx_packets == 30 and stats.lost == 0 and stats.mos is not None
            assert engine.stats(b).tx_packets == 30
        finally:
            await engine.close()
            caller.close()
            agent.close()

    run(body)


def test_transcodes_between_laws() -> None:
    async def body() -> None:
        engine = await started()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent, ("PCMU", "PCMA"))
            payload = g711.ulaw_encode(tone(1000, FRAME))
            caller.send(pa, payload)
            got = await agent.recv()
            assert header(got)[0] == 8
            assert got[12:] == g711.ulaw_to_alaw(payload)
            back = g711.alaw_encode(tone(300, FRAME))
            agent.send(pb, back, pt=8)
            got = await caller.recv()
            assert header(got)[0] == 0 and got[12:] == g711.alaw_to_ulaw(back)
        finally:
            await engine.close()
            caller.close()
            agent.close()

    run(body)


def test_symmetric_rtp_latches_to_the_real_source_and_drops_others() -> None:
    async def body() -> None:
        engine = await started()
        caller, agent, intruder = Phone(), Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            # SDP said another port: the first packet from the agent corrects it (RFC 4961)
            engine.set_remote(b, "127.0.0.1", 9)
            agent.send(pb, b"\xff" * FRAME)
            await caller.recv()
            caller.send(pa, b"\x01" * FRAME)
            assert (await agent.recv())[12:] == b"\x01" * FRAME
            intruder.send(pb, b"\x02" * FRAME)
            agent.send(pb, b"\x03" * FRAME)
            assert (await caller.recv())[12:] == b"\x03" * FRAME
            # the intruder's packet was neither relayed nor counted as the agent's
            assert engine.stats(b).rx_packets == 2
        finally:
            await engine.close()
            for p in (caller, agent, intruder):
                p.close()

    run(body)


def test_prompt_replaces_far_end_with_continuous_seq_ts_ssrc() -> None:
    async def body() -> None:
        engine = await started()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            for _ in range(5):
                caller.send(pa, b"\x11" * FRAME)
            before = await agent.recv_n(5)
            prompt = tone(600, FRAME * 4)
            prompt_id = engine.play(b, prompt)
            during = await agent.recv_n(4)
            done = await next_event(engine, PromptFinished)
            assert done == PromptFinished(b, prompt_id, True)
            for _ in range(3):
                caller.send(pa, b"\x22" * FRAME)
            after = await agent.recv_n(3)
            assert b"".join(d[12:] for d in during) == g711.ulaw_encode(prompt)
            hdrs = [header(d) for d in before + during + after]
            assert len({h[3] for h in hdrs}) == 1
            seqs = [h[1] for h in hdrs]
            assert seqs == [(seqs[0] + i) & 0xFFFF for i in range(len(seqs))]
            ts = [h[2] for h in hdrs]
            assert all(0 < (t2 - t1) % 2**32 < 8000 * 10 for t1, t2 in zip(ts, ts[1:], strict=False))
            assert hdrs[5][4] and hdrs[9][4]   # marker where the source changed
            # stop_play cuts a prompt short
            prompt_id = engine.play(b, tone(600, FRAME * 500))
            engine.stop_play(b)
            assert await next_event(engine, PromptFinished) == PromptFinished(b, prompt_id, False)
        finally:
            await engine.close()
            caller.close()
            agent.close()

    run(body)


def test_recording_puts_caller_left_and_agent_right(tmp_path: Path) -> None:
    async def body() -> None:
        engine = await started()
        caller, agent = Phone(), Phone()
        path = tmp_path / "call.wav"
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            rec = engine.record_start(str(path), a, b)
            steps = 40

            def send(i: int) -> None:
                caller.send(pa, g711.ulaw_encode(tone(440, FRAME, start=i * FRAME)))
                agent.send(pb, g711.ulaw_encode(tone(1000, FRAME, start=i * FRAME)))

            await paced(steps, send)
            done = await asyncio.wait_for(engine.record_stop(rec), 5)
            assert isinstance(done, RecordingFinished) and done.ok and done.path == str(path)
        finally:
            await engine.close()
            caller.close()
            agent.close()
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, RATE, 2)
            assert w.getnframes() == done.frames
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        # the file keeps time: no gap, about as long as the call
        assert steps * FRAME * 0.7 <= len(data) <= steps * FRAME * 1.6
        left, right = data[:, 0], data[:, 1]
        assert spectrum_peak_hz(left, 440) > 0.9 and spectrum_peak_hz(left, 1000) < 0.05
        assert spectrum_peak_hz(right, 1000) > 0.9 and spectrum_peak_hz(right, 440) < 0.05

    run(body)


def test_recording_pause_writes_silence_and_resume_writes_audio(tmp_path: Path) -> None:
    async def body() -> None:
        engine = await started()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            rec = engine.record_start(str(tmp_path / "paused.wav"), a, b)

            def send(i: int) -> None:
                if i == 15:
                    engine.record_pause(rec)
                elif i == 35:
                    engine.record_resume(rec)
                caller.send(pa, g711.ulaw_encode(tone(440, FRAME, start=i * FRAME)))

            await paced(50, send)
            assert (await asyncio.wait_for(engine.record_stop(rec), 5)).ok
        finally:
            await engine.close()
            caller.close()
            agent.close()

    run(body)
    with wave.open(str(tmp_path / "paused.wav")) as w:
        left = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)[:, 0]
    assert _zero_runs(left, FRAME * 12) == 1             # the pause, about 20 frames long
    nonzero = np.flatnonzero(left)
    gap_start = next(i for i in range(len(nonzero) - 1) if nonzero[i + 1] - nonzero[i] > FRAME * 12)
    assert spectrum_peak_hz(left[:nonzero[gap_start]], 440) > 0.9
    assert spectrum_peak_hz(left[nonzero[gap_start + 1]:], 440) > 0.9


def test_garbage_datagrams_are_counted_and_relaying_goes_on() -> None:
    async def body() -> None:
        engine = await started()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            for junk in (b"", b"\x80", b"\x40" + b"\x00" * 20, b"\x8f\x00" + b"\x00" * 10,
                         b"\x80\x00" + b"\x00" * 2000):
                caller.sock.sendto(junk, ("127.0.0.1", pa))
            caller.send(pa, b"\x55" * FRAME)
            assert (await agent.recv())[12:] == b"\x55" * FRAME
            stats = engine.stats(a)
            assert stats.rx_packets == 1
            assert engine._core.stats(a)["rx_invalid"] == 5
        finally:
            await engine.close()
            caller.close()
            agent.close()

    run(body)


def test_rfc4733_and_inband_digits_reach_the_event_queue() -> None:
    async def body() -> None:
        engine = await started()
        caller = Phone()
        try:
            leg = engine.allocate_leg()
            engine.set_codec(leg.leg, "PCMU", 101)
            engine.detect_inband_dtmf(leg.leg)
            # RFC 4733 §2.5.1: start (marker), updates, then three end packets, one timestamp
            ts = caller.ts
            for i, (end, dur) in enumerate([(0, 160), (0, 320), (0, 480), (1, 640), (1, 640),
                                             (1, 640)]):
                payload = struct.pack("!BBH", 7, (0x80 if end else 0) | 10, dur)
                caller.sock.sendto(rtp(caller.seq + i, ts, caller.ssrc, payload, 101, i == 0),
                                   ("127.0.0.1", leg.rtp_port))
            caller.seq += 6
            digit = await next_event(engine, DigitReceived)
            assert (digit.leg, digit.digit, digit.method) == (leg.leg, "7", "rfc4733")
            assert digit.duration_ms == 80.0
            # in-band: '5' is 770 Hz + 1336 Hz (ITU-T Q.23), 100 ms then silence
            pcm = np.concatenate([
                (tone(770, 800, 6000) + tone(1336, 800, 6000)).astype(np.int16),
                np.zeros(800, dtype=np.int16)])
            for i in range(0, len(pcm), FRAME):
                caller.send(leg.rtp_port, g711.ulaw_encode(pcm[i:i + FRAME]))
            digit = await next_event(engine, DigitReceived)
            assert (digit.leg, digit.digit, digit.method) == (leg.leg, "5", "inband")
        finally:
            await engine.close()
            caller.close()

    run(body)


def test_inactivity_timeout_fires_once() -> None:
    async def body() -> None:
        engine = await started()
        caller = Phone()
        try:
            quiet = engine.allocate_leg()
            engine.set_timeout(quiet.leg, 0.2)
            caller.send(quiet.rtp_port, b"\xff" * FRAME)
            ev = await next_event(engine, MediaTimeout, timeout=5)
            assert ev.leg == quiet.leg and ev.idle_seconds >= 0.2
            with pytest.raises(EngineError):
                engine.set_timeout(quiet.leg, -1)
        finally:
            await engine.close()
            caller.close()

    run(body)


# Who hears whom: caller 440 Hz, agent 1000 Hz, supervisor 1800 Hz.
LISTEN_MODES = {
    "monitor": {"caller": {1000}, "agent": {440}, "supervisor": {440, 1000}},
    "whisper": {"caller": {1000}, "agent": {440, 1800}, "supervisor": {440, 1000}},
    "barge": {"caller": {1000, 1800}, "agent": {440, 1800}, "supervisor": {440, 1000}},
}


@pytest.mark.parametrize("mode", sorted(LISTEN_MODES))
def test_supervisor_modes_reach_the_right_parties(mode: str) -> None:
    """Whisper: the agent's stream holds the supervisor's tone, the caller's does not."""
    freqs = {"caller": 440, "agent": 1000, "supervisor": 1800}

    async def body() -> dict[str, list[bytes]]:
        engine = await started()
        phones = {name: Phone() for name in freqs}
        heard: dict[str, list[bytes]] = {name: [] for name in freqs}
        try:
            a, pa, b, pb = await bridged_pair(engine, phones["caller"], phones["agent"])
            s = engine.allocate_leg()
            engine.set_remote(s.leg, "127.0.0.1", phones["supervisor"].port)
            getattr(engine, mode)(s.leg, a, b)
            ports = {"caller": pa, "agent": pb, "supervisor": s.rtp_port}
            steps = 30

            def send(i: int) -> None:
                for name, phone in phones.items():
                    phone.send(ports[name], g711.ulaw_encode(tone(freqs[name], FRAME, 6000,
                                                                  i * FRAME)))
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            heard[name].append(phone.sock.recv(2048))

            await paced(steps, send)
            for name, phone in phones.items():
                while len(heard[name]) < steps - 5:
                    heard[name].append(await phone.recv())
            return heard
        finally:
            await engine.close()
            for p in phones.values():
                p.close()

    heard = run(body)
    for name, expected in LISTEN_MODES[mode].items():
        pcm = g711.ulaw_decode(b"".join(d[12:] for d in heard[name][5:]))
        for other, freq in freqs.items():
            if freq in expected:
                assert spectrum_peak_hz(pcm, freq) > 0.3, (mode, name, other)
            else:
                assert spectrum_peak_hz(pcm, freq) < 0.02, (mode, name, other)


def _open_files() -> set[tuple[str, str]]:
    """This process's open descriptors with what each points at (a socket's inode, a path):
    a leak shows as a new pair, whatever other code closes meanwhile."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            out.add((fd, os.readlink(f"/proc/self/fd/{fd}")))
    return out


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousand_legs_leave_no_descriptor_or_memory_behind() -> None:
    async def cycle(engine: MediaEngine) -> None:
        legs = [engine.allocate_leg() for _ in range(1000)]
        assert len({leg.rtp_port for leg in legs}) == 1000
        assert all(leg.rtp_port % 2 == 0 for leg in legs)
        await asyncio.gather(*(engine.release(leg.leg) for leg in legs))

    async def body() -> None:
        before = _open_files()
        engine = MediaEngine((43000, 47999), max_legs=2000)
        await engine.start()
        try:
            await cycle(engine)          # warm the allocator
            rss = _rss_kib()
            warmed = _open_files()
            await cycle(engine)
            await cycle(engine)
            assert _open_files() - warmed == set()
            assert _rss_kib() - rss < 4096
            assert engine.legs_active == 0
        finally:
            await engine.close()
        assert _open_files() - before == set()

    run(body, timeout=60)


def test_released_leg_id_is_reused_last() -> None:
    """A leg id names one leg for as long as anything may still hold it: call control keys its
    maps by id and cleans them up after the release is confirmed, so the next allocations get
    the other free ids first (as ports go round)."""
    async def body() -> None:
        engine = MediaEngine(PORTS, max_legs=4)
        await engine.start()
        try:
            first = engine.allocate_leg().leg
            await engine.release(first)
            later = [engine.allocate_leg().leg for _ in range(3)]
            assert first not in later
            assert len(set(later)) == 3
            await engine.release(later[0])
            # the oldest free id comes next: the first leg's, then the one released just now
            assert engine.allocate_leg().leg == first
            assert engine.allocate_leg().leg == later[0]
            with pytest.raises(EngineError, match="no free leg slot"):
                engine.allocate_leg()
        finally:
            await engine.close()

    run(body)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_rtp_sockets_are_dscp_ef(host: str) -> None:
    async def body() -> None:
        engine = MediaEngine(PORTS, host=host)
        await engine.start()
        try:
            leg = engine.allocate_leg()
            for fd in engine._core.socket_fds(leg.leg):
                with socket.socket(fileno=os.dup(fd)) as s:
                    if host == "::1":
                        tclass = s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_TCLASS)
                        assert tclass == 0xB8
                    else:
                        assert s.getsockopt(socket.IPPROTO_IP, socket.IP_TOS) == 0xB8
                    assert s.getsockname()[1] in (leg.rtp_port, leg.rtcp_port)
        finally:
            await engine.close()

    run(body)


def test_rtcp_is_read_and_a_report_is_sent() -> None:
    async def body() -> None:
        engine = await started()
        phone = Phone()
        rtcp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rtcp.bind(("127.0.0.1", 0))
        rtcp.setblocking(False)
        try:
            leg = engine.allocate_leg()
            engine.set_remote(leg.leg, "127.0.0.1", phone.port, rtcp.getsockname()[1])
            for _ in range(3):
                phone.send(leg.rtp_port, b"\xff" * FRAME)
            # RFC 3550 §6.4.1 SR with one report block
            sr = struct.pack("!BBHIIIIII", 0x81, 200, 12, phone.ssrc, 0xE0000000, 0, 0, 3, 480)
            sr += struct.pack("!IIIIII", 0, 0, 0, 0, 0, 0)
            rtcp.sendto(sr, ("127.0.0.1", leg.rtcp_port))
            phone.send(leg.rtp_port, b"\xff" * FRAME)
            await until(lambda: engine.stats(leg.leg).rx_packets == 4
                        and engine.stats(leg.leg).rtcp_rx == 1)
            released = engine.release(leg.leg)
            await asyncio.wait_for(released, 5)
            loop = asyncio.get_running_loop()
            report = await asyncio.wait_for(loop.sock_recv(rtcp, 2048), 5)
            assert report[1] in (200, 201) and report[0] >> 6 == 2
            # the report block covers the phone's stream, and a BYE ends the compound packet
            assert struct.unpack("!I", report[8:12])[0] == phone.ssrc
            assert report[-7] == 203 and report[-8] == 0x81
        finally:
            await engine.close()
            phone.close()
            rtcp.close()

    run(body)


def test_bad_commands_are_refused_and_lose_nothing() -> None:
    async def body() -> None:
        engine = MediaEngine((48000, 48003))
        await engine.start()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            with pytest.raises(EngineError):
                engine.allocate_leg()                      # range holds two pairs
            with pytest.raises(EngineError):
                engine.set_codec(a, "G729")
            with pytest.raises(EngineError):
                engine.set_codec(a, 9)
            with pytest.raises(EngineError):
                engine.set_remote(a, "not-an-ip", 4000)
            with pytest.raises(EngineError):
                engine.bridge(a, 999)
            with pytest.raises(EngineError):
                engine.play(a, np.zeros(0, dtype=np.int16))
            with pytest.raises(EngineError):
                engine.stats(77)
            with pytest.raises(EngineError):
                engine.record_pause(5)
            with pytest.raises(OSError):
                engine.record_start("/nonexistent-dir/x.wav", a, b)
            caller.send(pa, b"\x42" * FRAME)
            assert (await agent.recv())[12:] == b"\x42" * FRAME
            await engine.release(a)
            assert engine.allocate_leg().rtp_port == 48000   # the port came back
            ev = await next_event(engine, LegReleased)
            assert ev.leg == a
        finally:
            await engine.close()
            caller.close()
            agent.close()
        with pytest.raises(EngineError):
            MediaEngine((30000, 20000))
        with pytest.raises(EngineError):
            MediaEngine.from_range("20000")

    run(body)


# -- the recording timeline with chosen arrival times (sans-IO) ---------------------------------
# Each side is placed by RTP timestamp (RFC 3550 §5.1) relative to its first packet, which goes
# where it arrived; a position is written once it is the window (100 ms here) old.

MS = 1_000_000
Arrival = tuple[int, int, int, int, int, np.ndarray]   # arrival ns, side, seq, ts, ssrc, PCM


def noise_frames(count: int, seed: int) -> list[np.ndarray]:
    """Distinct frames of PCM without a zero sample, so any silence in a recording is one the
    recorder wrote."""
    rng = np.random.default_rng(seed)
    mags = rng.integers(1, 8000, size=(count, FRAME))
    signs = rng.choice(np.array([-1, 1]), size=(count, FRAME))
    return [(m * sg).astype(np.int16) for m, sg in zip(mags, signs, strict=True)]


def stream(frames: list[np.ndarray], side: int, arrive_ns: Callable[[int], int], *,
           ssrc: int = 0x1234, seq0: int = 1000, ts0: int = 50000) -> list[Arrival]:
    """Packet i carries frames[i], timestamp ts0 + 160 i, and arrives at arrive_ns(i)."""
    return [(arrive_ns(i), side, (seq0 + i) & 0xFFFF, (ts0 + FRAME * i) & 0xFFFFFFFF, ssrc, f)
            for i, f in enumerate(frames)]


def drive(timeline: RecordingTimeline, arrivals: list[Arrival], end_ns: int) -> np.ndarray:
    """Feeds the packets at their arrival times and takes frames every 20 ms as the engine's
    tick does, then finishes at end_ns; returns the recording as (samples, 2)."""
    order = sorted(arrivals, key=lambda a: a[0])
    out, k, t = [], 0, 20 * MS
    while t <= end_ns:
        while k < len(order) and order[k][0] <= t:
            at, side, seq, ts, ssrc, pcm = order[k]
            timeline.feed(side, seq, ts, ssrc, pcm, at)
            k += 1
        out.append(timeline.take(t))
        t += 20 * MS
    for at, side, seq, ts, ssrc, pcm in order[k:]:
        timeline.feed(side, seq, ts, ssrc, pcm, at)
    out.append(timeline.finish(end_ns))
    return np.frombuffer(b"".join(out), dtype="<i2").reshape(-1, 2)


def placed(total: int, start: int, frames: list[np.ndarray]) -> np.ndarray:
    """A channel of `total` samples holding the frames back to back from `start`."""
    out = np.zeros(total, dtype=np.int16)
    audio = np.concatenate(frames)
    out[start:start + len(audio)] = audio
    return out


def test_timeline_places_late_and_reordered_packets_sample_exact() -> None:
    caller, agent = noise_frames(100, 1), noise_frames(100, 2)
    rng = np.random.default_rng(3)
    # the first packet is on time; the others up to the window (100 ms) late: heavily reordered
    late = [0] + [int(x) for x in rng.integers(0, 100 * MS, 99)]
    for i in range(3, 100, 10):
        late[i] = 100 * MS
    arrivals = stream(caller, 0, lambda i: i * 20 * MS + 1 * MS + late[i])
    arrivals += stream(agent, 1, lambda i: i * 20 * MS + 2 * MS + (i % 3) * 15 * MS,
                       ssrc=0x9999, seq0=65000, ts0=7)
    assert [a[2] for a in sorted(arrivals[:100])] != [a[2] for a in arrivals[:100]]  # reordered
    tl = RecordingTimeline(100)
    data = drive(tl, arrivals, 2100 * MS)
    assert len(data) == 2100 * 8                     # wall time
    # each side starts where its first packet arrived (1 ms, 2 ms): the sides stay aligned
    assert np.array_equal(data[:, 0], placed(len(data), 8, caller))
    assert np.array_equal(data[:, 1], placed(len(data), 16, agent))
    assert (tl.late(0), tl.late(1), tl.resyncs(0), tl.resyncs(1)) == (0, 0, 0, 0)


def test_timeline_packet_later_than_the_window_is_silence_and_counted() -> None:
    caller = noise_frames(30, 4)
    arrivals = stream(caller, 0, lambda i: i * 20 * MS + 1 * MS + (150 * MS if i == 10 else 0))
    tl = RecordingTimeline(100)
    data = drive(tl, arrivals, 700 * MS)
    expected = placed(len(data), 8, caller)
    expected[8 + 10 * FRAME:8 + 11 * FRAME] = 0        # its place was written before it came
    assert np.array_equal(data[:, 0], expected)
    assert not data[:, 1].any()
    assert (tl.late(0), tl.resyncs(0)) == (1, 0)


@pytest.mark.parametrize("advances_clock", [True, False])
def test_timeline_sender_silent_for_one_second_gives_one_second_of_silence(
        advances_clock: bool) -> None:
    """RFC 3550 §5.1: a sender's timestamps keep counting while it sends nothing. One that
    does not (resumes one frame on) is realigned once, on the packets' arrival, losing none."""
    first, second = noise_frames(50, 5), noise_frames(50, 6)
    arrivals = stream(first, 0, lambda i: i * 20 * MS + 1 * MS)
    arrivals += stream(second, 0, lambda i: (i + 100) * 20 * MS + 1 * MS, seq0=1050,
                       ts0=50000 + FRAME * (100 if advances_clock else 50))
    tl = RecordingTimeline(100)
    data = drive(tl, arrivals, 3100 * MS)
    silence = [np.zeros(RATE, dtype=np.int16)]
    assert np.array_equal(data[:, 0], placed(len(data), 8, first + silence + second))
    assert _zero_runs(data[8:8 + 3 * RATE, 0], 1) == 1
    assert (tl.late(0), tl.resyncs(0)) == (0, 0 if advances_clock else 1)


def test_timeline_sequence_and_timestamp_wrap() -> None:
    caller = noise_frames(100, 7)
    rng = np.random.default_rng(8)
    late = [0] + [int(x) for x in rng.integers(0, 60 * MS, 99)]
    arrivals = stream(caller, 0, lambda i: i * 20 * MS + 1 * MS + late[i], seq0=65500,
                      ts0=2**32 - FRAME * 30)
    tl = RecordingTimeline(100)
    data = drive(tl, arrivals, 2100 * MS)
    assert np.array_equal(data[:, 0], placed(len(data), 8, caller))
    assert (tl.late(0), tl.resyncs(0)) == (0, 0)


@pytest.mark.parametrize("period_us", [20100, 19900])
def test_timeline_clock_drift_does_not_accumulate(period_us: int) -> None:
    """The sender's 20 ms are 20.1 ms (slow clock) or 19.9 ms (fast) of ours: 300 ms apart
    after a minute. The side is realigned before a packet misses its place or runs 200 ms
    ahead; a slow sender gets silence inserted, a fast one audio dropped, nothing else."""
    count = 3000
    caller = noise_frames(count, 9)
    arrive = [i * period_us * 1000 + 1 * MS for i in range(count)]
    tl = RecordingTimeline(100)
    end = arrive[-1] + 20 * MS
    data = drive(tl, stream(caller, 0, lambda i: arrive[i]), end)
    left = data[:, 0]
    assert abs(len(left) - end * 8 // MS) <= 1600
    assert tl.late(0) == 0 and tl.resyncs(0) >= 1
    # where the last packet landed, against where it arrived: within the bound
    last = caller[-1]
    at = [i for i in np.flatnonzero(left == last[0]) if np.array_equal(left[i:i + FRAME], last)]
    assert len(at) == 1
    assert -1600 <= arrive[-1] * 8 // MS - at[0] <= 800
    body = left[8:at[0] + FRAME]
    if period_us > 20000:
        assert _zero_runs(body, 1) == tl.resyncs(0)        # one stretch of silence each
        assert _zero_runs(body, 400) == tl.resyncs(0)
    else:
        assert _zero_runs(body, 1) == 0                    # dropped, never a hole


@pytest.mark.parametrize("stall_ms", [250, 400])
def test_timeline_stalled_sender_loses_only_what_missed_the_window(stall_ms: int) -> None:
    """From packet 10 on the sender stalls, then sends what it owes at once: those whose place
    was written are lost (more than the hold takes), the rest land exactly; no realignment."""
    caller = noise_frames(60, 10)
    burst_ms = 10 * 20 + 1 + stall_ms
    last = 10 + stall_ms // 20
    arrivals = stream(caller, 0, lambda i: (burst_ms if 10 <= i <= last else i * 20 + 1) * MS)
    tl = RecordingTimeline(100)
    data = drive(tl, arrivals, 1300 * MS)
    # the tick before the burst had written the frames 100 ms old
    written = (burst_ms // 20 * 20 * 8 - 800) // FRAME * FRAME
    expected = placed(len(data), 8, caller)
    expected[8 + 10 * FRAME:written] = 0
    assert np.array_equal(data[:, 0], expected)
    assert (tl.late(0), tl.resyncs(0)) == ((written - 9) // FRAME - 9, 0)


def test_timeline_pause_masks_its_positions_on_both_sides() -> None:
    caller, agent = noise_frames(100, 11), noise_frames(100, 12)
    arrivals = stream(caller, 0, lambda i: i * 20 * MS + 1 * MS)
    arrivals += stream(agent, 1, lambda i: i * 20 * MS + 1 * MS, ssrc=5)
    tl = RecordingTimeline(100)
    order = sorted(arrivals, key=lambda a: a[0])
    out = []
    for t in range(20, 2101, 20):
        for at, side, seq, ts, ssrc, pcm in [a for a in order if (t - 20) * MS < a[0] <= t * MS]:
            tl.feed(side, seq, ts, ssrc, pcm, at)
        if t == 500:
            tl.pause(t * MS)
        elif t == 1000:
            tl.resume(t * MS)
        out.append(tl.take(t * MS))
    out.append(tl.finish(2100 * MS))
    data = np.frombuffer(b"".join(out), dtype="<i2").reshape(-1, 2)
    for side, frames in ((0, caller), (1, agent)):
        expected = placed(len(data), 8, frames)
        # 500 ms to 1000 ms; the packet that arrived during the pause (981 ms) is not kept,
        # though its last 8 samples fall after it: the pause masks more, never less
        expected[4000:8008] = 0
        assert np.array_equal(data[:, side], expected)


def test_timeline_new_stream_is_realigned_on_arrival() -> None:
    first, second = noise_frames(25, 13), noise_frames(25, 14)
    arrivals = stream(first, 0, lambda i: i * 20 * MS + 1 * MS)
    arrivals += stream(second, 0, lambda i: (i + 25) * 20 * MS + 1 * MS, ssrc=0xBEEF, seq0=3,
                       ts0=0xFFFFFF00)
    tl = RecordingTimeline(100)
    data = drive(tl, arrivals, 1100 * MS)
    assert np.array_equal(data[:, 0], placed(len(data), 8, first + second))
    assert (tl.late(0), tl.resyncs(0)) == (0, 1)


def test_timeline_refuses_bad_input() -> None:
    tl = RecordingTimeline(100)
    with pytest.raises(EngineError):
        tl.feed(2, 1, 0, 1, np.ones(FRAME, dtype=np.int16), 0)
    with pytest.raises(EngineError):
        tl.feed(0, 1, 0, 1, np.ones(0, dtype=np.int16), 0)
    with pytest.raises(EngineError):
        RecordingTimeline(10)
    with pytest.raises(EngineError):
        MediaEngine(PORTS, recording_delay_ms=5000)
    # nothing was placed by the refused calls
    tl.feed(0, 1, 0, 1, np.ones(FRAME, dtype=np.int16), 0)
    data = np.frombuffer(tl.finish(40 * MS), dtype="<i2").reshape(-1, 2)
    assert np.array_equal(data[:FRAME, 0], np.ones(FRAME)) and not data[FRAME:].any()


# -- the same over real UDP ---------------------------------------------------------------------


def noise_payloads(count: int, seed: int) -> list[bytes]:
    """G.711 u-law frames without the two codes that decode to 0."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 254, size=(count, FRAME))
    codes = np.where(codes >= 127, codes + 1, codes)          # skip 0x7F; 0xFF is never drawn
    return [bytes(c.astype(np.uint8)) for c in codes]


def recorded_run(channel: np.ndarray, audio: np.ndarray) -> int:
    """Where `audio` starts in the channel (it must be there exactly, with only silence
    around it); returns the start."""
    start = int(np.flatnonzero(channel)[0])
    assert np.array_equal(channel[start:start + len(audio)], audio)
    assert not channel[:start].any() and not channel[start + len(audio):].any()
    return start


def test_recording_places_late_and_reordered_packets_by_timestamp(tmp_path: Path) -> None:
    """Over UDP: every 6th caller packet 100 ms late, pairs swapped; the WAV holds the caller's
    audio in timestamp order, sample for sample, aligned with the agent's."""
    steps = 60
    caller_audio, agent_audio = noise_payloads(steps, 21), noise_payloads(steps, 22)
    path = tmp_path / "late.wav"

    async def body() -> tuple[dict[str, int], dict[str, int]]:
        engine = await started(recording_delay_ms=300)
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            rec = engine.record_start(str(path), a, b)
            packets = [rtp(caller.seq + i, caller.ts + FRAME * i, caller.ssrc, p)
                       for i, p in enumerate(caller_audio)]
            due: dict[int, list[bytes]] = {}
            for i, pkt in enumerate(packets):
                if i % 6 == 2:
                    step = i + 5                    # 100 ms late
                elif i % 6 == 4:
                    step = i + 1                    # after its successor
                elif i % 6 == 5:
                    step = i - 1
                else:
                    step = i
                due.setdefault(min(step, steps - 1), []).append(pkt)

            def send(i: int) -> None:
                for pkt in due.get(i, []):
                    caller.sock.sendto(pkt, ("127.0.0.1", pa))
                agent.send(pb, agent_audio[i])
                for phone in (caller, agent):
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            phone.sock.recv(2048)

            await paced(steps, send)
            assert (await asyncio.wait_for(engine.record_stop(rec), 5)).ok
            s = engine.stats(a)
            return ({"late": s.recording_late, "resyncs": s.recording_resyncs},
                    {"late": engine.stats(b).recording_late})
        finally:
            await engine.close()
            caller.close()
            agent.close()

    stats_a, stats_b = run(body)
    assert stats_a == {"late": 0, "resyncs": 0} and stats_b == {"late": 0}
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    left = recorded_run(data[:, 0], g711.ulaw_decode(b"".join(caller_audio)))
    right = recorded_run(data[:, 1], g711.ulaw_decode(b"".join(agent_audio)))
    assert abs(left - right) <= 2 * FRAME               # sent together, recorded together


def test_recording_keeps_a_real_silence(tmp_path: Path) -> None:
    """The caller sends 0.5 s, nothing for 1 s (its RTP clock running on, RFC 3550 §5.1),
    then 0.5 s: the left channel holds exactly 8,000 samples of silence between the two."""
    path = tmp_path / "silence.wav"
    first, second = noise_payloads(25, 23), noise_payloads(25, 24)

    async def body() -> None:
        engine = await started(recording_delay_ms=300)
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            rec = engine.record_start(str(path), a, b)

            def send(i: int) -> None:
                if i < 25:
                    caller.send(pa, first[i])
                elif i < 75:
                    caller.ts += FRAME                  # silent: the clock runs on
                else:
                    caller.send(pa, second[i - 75])
                with contextlib.suppress(BlockingIOError):
                    while True:
                        agent.sock.recv(2048)

            await paced(100, send)
            assert (await asyncio.wait_for(engine.record_stop(rec), 5)).ok
            assert engine.stats(a).recording_resyncs == 0
        finally:
            await engine.close()
            caller.close()
            agent.close()

    run(body)
    with wave.open(str(path)) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    audio = np.concatenate([g711.ulaw_decode(b"".join(first)), np.zeros(RATE, dtype=np.int16),
                            g711.ulaw_decode(b"".join(second))])
    recorded_run(data[:, 0], audio)
    assert not data[:, 1].any()


def _zero_runs(channel: np.ndarray, length: int) -> int:
    """Runs of at least `length` zero samples (what the recorder writes for missing audio)."""
    zero = np.concatenate([[0], (channel == 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(zero))
    return int(np.sum((edges[1::2] - edges[::2]) >= length))


@pytest.mark.long
@pytest.mark.timeout(1200)
def test_recording_soak_has_no_gaps(tmp_path: Path) -> None:
    seconds = float(os.environ.get("EDGECC_SOAK_SECONDS", "600"))
    steps = int(seconds * 50)

    stats: dict[str, tuple[int, int]] = {}

    async def body() -> float:
        engine = await started()
        caller, agent = Phone(), Phone()
        try:
            a, pa, b, pb = await bridged_pair(engine, caller, agent)
            loop = asyncio.get_running_loop()
            begin = loop.time()
            rec = engine.record_start(str(tmp_path / "soak.wav"), a, b)
            left = g711.ulaw_encode(tone(440, FRAME * 50))
            right = g711.ulaw_encode(tone(1000, FRAME * 50))

            def send(i: int) -> None:
                k = (i % 50) * FRAME
                caller.send(pa, left[k:k + FRAME])
                agent.send(pb, right[k:k + FRAME])
                for phone in (caller, agent):      # keep the phones' sockets drained
                    with contextlib.suppress(BlockingIOError):
                        while True:
                            phone.sock.recv(2048)

            await paced(steps, send)
            done = await asyncio.wait_for(engine.record_stop(rec), 10)
            assert done.ok
            for name, leg in (("caller", a), ("agent", b)):
                s = engine.stats(leg)
                stats[name] = (s.recording_late, s.recording_resyncs)
            return loop.time() - begin
        finally:
            await engine.close()
            caller.close()
            agent.close()

    elapsed = run(body, timeout=seconds + 120)
    with wave.open(str(tmp_path / "soak.wav")) as w:
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    # the file is as long as the call (the recorder keeps wall time) ...
    assert abs(len(data) / RATE - elapsed) < max(0.5, elapsed * 0.01)
    # ... and once the audio started, no 20 ms of it is missing on either side
    body_data = data[RATE // 10: -RATE // 10]
    # (late, resyncs) per leg say why, if not
    assert _zero_runs(body_data[:, 0], FRAME) == 0, stats
    assert _zero_runs(body_data[:, 1], FRAME) == 0, stats


def test_commands_of_one_loop_turn_run_after_one_wake() -> None:
    """Commands queued in one event-loop turn wait for the wake at the end of that turn (one
    eventfd write for all of them), and all run then, in order."""
    async def body() -> None:
        engine = await started()
        try:
            # One turn: a leg, its codec, a short prompt and a second one replacing it.
            leg = engine.allocate_leg().leg
            engine.set_codec(leg, "PCMU")
            first = engine.play(leg, tone(440, 8000))
            second = engine.play(leg, tone(440, 160))
            done = await next_event(engine, PromptFinished)
            assert (done.prompt_id, done.completed) == (first, False)  # replaced, in order
            done = await next_event(engine, PromptFinished)
            assert (done.prompt_id, done.completed) == (second, True)

            # Queued straight on the core (no end-of-turn wake armed): nothing runs until
            # wake(), which then runs it.
            engine._core.play(leg, tone(440, 160), 999)
            with pytest.raises(TimeoutError):
                await next_event(engine, PromptFinished, timeout=0.3)
            engine._core.wake()
            done = await next_event(engine, PromptFinished)
            assert done.prompt_id == 999
            await engine.release(leg)
        finally:
            await engine.close()

    run(body)
