"""Benchmark: G.711 encode/decode throughput against CPython's audioop, and how many 8 kHz
streams one core can run the in-band DTMF detector on in real time.

Both codecs get the same input bytes in the same run, alternating, median of 5 rounds.
Last line: one JSON object (see BENCHMARKS.md).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from media_core import dtmf, g711  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # noqa: E402  (the peer: deprecated, in the standard library on 3.11)

ROUNDS = 5
BIG = 1 << 16                     # samples per call in the throughput runs (8 s of audio)
FRAME = 160                       # one 20 ms frame at 8 kHz: the media engine's unit


def rate(fn: Callable[[], object], samples_per_call: int, min_seconds: float = 0.2) -> float:
    """Samples per second of fn, timed over at least min_seconds of calls (thread CPU time)."""
    calls, start = 0, time.thread_time()
    while True:
        fn()
        calls += 1
        elapsed = time.thread_time() - start
        if elapsed >= min_seconds:
            return calls * samples_per_call / elapsed


def compare(ours: Callable[[], object], peer: Callable[[], object], n: int) -> tuple[float, float]:
    a, b = [], []
    for _ in range(ROUNDS):                       # alternate so drift hits both alike
        a.append(rate(ours, n))
        b.append(rate(peer, n))
    return statistics.median(a), statistics.median(b)


def dtmf_streams_per_core() -> dict[str, float]:
    """Real-time 8 kHz streams per core: seconds of audio analysed per CPU second."""
    rng = np.random.default_rng(1)
    seconds = 60
    x = rng.normal(0, 1000, seconds * 8000)        # noise with a few digits in it
    t = np.arange(400) / 8000
    for k in range(0, seconds * 8000 - 400, 8000):
        x[k : k + 400] += 6000 * (np.sin(2 * np.pi * 770 * t) + np.sin(2 * np.pi * 1336 * t))
    pcm = np.clip(np.rint(x), -32768, 32767).astype(np.int16)
    frames = [pcm[i : i + FRAME] for i in range(0, len(pcm), FRAME)]
    whole, framed = [], []
    for _ in range(3):
        det = dtmf.DtmfDetector()
        start = time.thread_time()
        digits = det.feed(pcm)
        whole.append(seconds / (time.thread_time() - start))
        assert digits == "5" * seconds, digits     # the benchmark measured a working detector
        det = dtmf.DtmfDetector()
        start = time.thread_time()
        for f in frames:
            det.feed(f)
        framed.append(seconds / (time.thread_time() - start))
    return {
        "dtmf_streams_per_core": round(statistics.median(whole)),
        "dtmf_streams_per_core_python_20ms_frames": round(statistics.median(framed)),
    }


def main() -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32768, BIG, dtype=np.int16)
    pcm_bytes = pcm.astype("<i2").tobytes()
    codes = bytes(rng.integers(0, 256, BIG, dtype=np.uint8))
    frame_bytes, frame_codes = pcm_bytes[: 2 * FRAME], codes[:FRAME]
    # same results first: a fast wrong codec measures nothing
    assert g711.ulaw_encode(pcm_bytes) == audioop.lin2ulaw(pcm_bytes, 2)
    assert g711.alaw_encode(pcm_bytes) == audioop.lin2alaw(pcm_bytes, 2)
    assert g711.ulaw_decode(codes).astype("<i2").tobytes() == audioop.ulaw2lin(codes, 2)

    results: dict[str, tuple[float, float]] = {
        "ulaw_encode": compare(lambda: g711.ulaw_encode(pcm_bytes),
                               lambda: audioop.lin2ulaw(pcm_bytes, 2), BIG),
        "ulaw_decode": compare(lambda: g711.ulaw_decode(codes),
                               lambda: audioop.ulaw2lin(codes, 2), BIG),
        "alaw_encode": compare(lambda: g711.alaw_encode(pcm_bytes),
                               lambda: audioop.lin2alaw(pcm_bytes, 2), BIG),
        "alaw_decode": compare(lambda: g711.alaw_decode(codes),
                               lambda: audioop.alaw2lin(codes, 2), BIG),
        "ulaw_encode_20ms_frame": compare(lambda: g711.ulaw_encode(frame_bytes),
                                          lambda: audioop.lin2ulaw(frame_bytes, 2), FRAME),
        "ulaw_decode_20ms_frame": compare(lambda: g711.ulaw_decode(frame_codes),
                                          lambda: audioop.ulaw2lin(frame_codes, 2), FRAME),
    }
    detail: dict[str, float | str] = {}
    for name, (ours, peer) in results.items():
        print(f"{name:24s} edgecc {ours / 1e6:9.1f} M samples/s   audioop {peer / 1e6:9.1f} "
              f"M samples/s   x{ours / peer:.2f}")
        detail[f"{name}_samples_per_s"] = round(ours)
        detail[f"{name}_audioop_samples_per_s"] = round(peer)
        detail[f"{name}_ratio"] = round(ours / peer, 2)
    streams = dtmf_streams_per_core()
    print(f"DTMF detector: {streams['dtmf_streams_per_core']} real-time 8 kHz streams per core "
          f"({streams['dtmf_streams_per_core_python_20ms_frames']} fed frame by frame from Python)")
    detail.update(streams)
    detail["rounds"] = ROUNDS
    detail["buffer_samples"] = BIG
    ours, peer = results["ulaw_encode"]
    print(json.dumps({
        "bench": "codec",
        "value": round(ours),
        "unit": "samples/s",
        "peer": "audioop (CPython 3.11)",
        "peer_value": round(peer),
        "ratio": round(ours / peer, 2),
        "detail": detail,
    }))


if __name__ == "__main__":
    main()
