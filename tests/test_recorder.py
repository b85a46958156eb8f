"""Stereo call recording: channel layout, alignment with gaps and skew, pause, periodic header
updates, and survival of a SIGKILL (repair at the next start)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from media_core import recorder

RATE = 8000
ROOT = Path(__file__).resolve().parent.parent


def sine(freq: float, start: int, n: int, amplitude: float = 8000.0) -> np.ndarray:
    """Samples start..start+n of a sine that began at sample 0 (so any stretch can be checked)."""
    t = np.arange(start, start + n) / RATE
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, RATE)
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / RATE)[np.argmax(spectrum)])


def test_caller_left_agent_right(tmp_path: Path) -> None:
    path = tmp_path / "call.wav"
    with recorder.StereoRecorder(path) as rec:
        for k in range(150):                       # 3 s of 20 ms frames, agent sent as bytes
            rec.feed("caller", sine(440, k * 160, 160))
            rec.feed("agent", sine(1000, k * 160, 160).astype("<i2").tobytes())
    left, right = read(path)
    assert len(left) == 3 * RATE
    assert np.array_equal(left, sine(440, 0, 3 * RATE))
    assert np.array_equal(right, sine(1000, 0, 3 * RATE))
    assert peak_hz(left) == pytest.approx(440, abs=1)
    assert peak_hz(right) == pytest.approx(1000, abs=1)


def test_header_is_updated_while_recording(tmp_path: Path) -> None:
    path = tmp_path / "live.wav"
    rec = recorder.StereoRecorder(path, header_interval=1.0)
    for k in range(125):                           # 2.5 s
        rec.feed("caller", sine(440, k * 160, 160))
        rec.feed("agent", sine(1000, k * 160, 160))
    # another reader opens the file mid-call: it plays at least all but the last second
    left, right = read(path)
    assert rec.written == 125 * 160
    assert rec.written - RATE <= len(left) <= rec.written
    assert np.array_equal(left, sine(440, 0, len(left)))
    rec.close()
    assert len(read(path)[0]) == 125 * 160


def test_gap_in_one_side_is_silence_and_channels_stay_aligned(tmp_path: Path) -> None:
    path = tmp_path / "gap.wav"
    with recorder.StereoRecorder(path) as rec:
        for k in range(100):                       # 2 s; the agent's packets 40..59 never come
            rec.feed("caller", sine(440, k * 160, 160), position=k * 160)
            if not 40 <= k < 60:
                rec.feed("agent", sine(1000, k * 160, 160), position=k * 160)
    left, right = read(path)
    assert len(left) == len(right) == 100 * 160
    assert np.array_equal(left, sine(440, 0, 100 * 160))
    assert not right[40 * 160 : 60 * 160].any()
    assert np.array_equal(right[60 * 160 :], sine(1000, 60 * 160, 40 * 160))
    assert np.array_equal(right[: 40 * 160], sine(1000, 0, 40 * 160))


def test_silent_side_is_filled_so_the_file_keeps_growing(tmp_path: Path) -> None:
    path = tmp_path / "oneway.wav"
    rec = recorder.StereoRecorder(path, max_skew=1.0)
    for k in range(200):                           # 4 s of caller only (one-way audio)
        rec.feed("caller", sine(440, k * 160, 160))
    assert rec.written >= 200 * 160 - RATE         # lags the live side by at most max_skew
    rec.close()
    left, right = read(path)
    assert len(left) == 200 * 160
    assert not right.any()


def test_late_audio_is_dropped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "late.wav"
    with recorder.StereoRecorder(path) as rec:
        rec.feed("caller", sine(440, 0, 320), position=0)
        rec.feed("caller", np.full(160, 7, np.int16), position=160)   # overlaps: dropped
        rec.feed("agent", sine(1000, 0, 320), position=0)
        assert rec.late_samples == 160
    left, _ = read(path)
    assert np.array_equal(left, sine(440, 0, 320))


def test_absurd_position_jump_is_taken_as_contiguous(tmp_path: Path) -> None:
    # a broken RTP timestamp must not write an hour of silence
    path = tmp_path / "jump.wav"
    with recorder.StereoRecorder(path, max_gap=2.0, fsync=True) as rec:
        rec.feed("caller", sine(440, 0, 160), position=0)
        rec.feed("caller", sine(440, 160, 160), position=3600 * RATE)
        rec.feed("agent", sine(1000, 0, 320), position=0)
        assert rec.resyncs == 1
    left, _ = read(path)
    assert np.array_equal(left, sine(440, 0, 320))


def test_pause_and_resume_record_silence_in_place(tmp_path: Path) -> None:
    path = tmp_path / "pause.wav"
    with recorder.StereoRecorder(path) as rec:
        for k in range(150):
            if k == 50:
                rec.pause()
            if k == 100:
                rec.resume()
            rec.feed("caller", sine(440, k * 160, 160))
            rec.feed("agent", sine(1000, k * 160, 160))
        rec.silence(800)                           # on hold: no media, time goes on
    left, right = read(path)
    assert len(left) == 150 * 160 + 800
    assert not left[50 * 160 : 100 * 160].any() and not right[50 * 160 : 100 * 160].any()
    assert np.array_equal(left[100 * 160 : 150 * 160], sine(440, 100 * 160, 50 * 160))
    assert np.array_equal(right[: 50 * 160], sine(1000, 0, 50 * 160))
    assert not left[150 * 160 :].any()


WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from media_core.recorder import StereoRecorder

    def sine(freq, start, n):
        t = np.arange(start, start + n) / 8000
        return np.rint(8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)

    rec = StereoRecorder(sys.argv[1], header_interval=1.0)
    caller = agent = shown = 0
    while caller < 8000 * 600:                     # bounded: 10 minutes of audio at most
        rec.feed("caller", sine(440, caller, 160)); caller += 160
        while agent + 240 <= caller:               # the agent's stream comes in 30 ms packets
            rec.feed("agent", sine(1000, agent, 240)); agent += 240
        if rec.written // 8000 > shown:            # each new second of audio in the file
            shown = rec.written // 8000
            print(rec.written, flush=True)
    """
)


def test_recording_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "killed.wav"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        reported, deadline = 0, time.monotonic() + 60
        while reported < 5 * RATE and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "the writer stopped before being killed"
            reported = int(line)
        assert reported >= 5 * RATE
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        proc.stdout.close()
    length = path.stat().st_size
    in_file = (length - 44) // 4
    # unrepaired, the header already covers all but the last second written
    left, _ = read(path)
    assert len(left) >= in_file - RATE - 240
    result = recorder.repair(path)
    assert result.frames == in_file and result.rate == RATE
    assert result.dropped_bytes == (length - 44) % 4
    left, right = read(path)
    assert len(left) == in_file >= reported
    # the right content on each channel, sample for sample and by spectrum, second by second
    assert np.array_equal(left, sine(440, 0, len(left)))
    aligned = len(right) - len(right) % 240 - 240      # the agent's last packet may be absent
    assert np.array_equal(right[:aligned], sine(1000, 0, aligned))
    for s in range(len(left) // RATE):
        assert peak_hz(left[s * RATE : (s + 1) * RATE]) == pytest.approx(440, abs=1)
        assert peak_hz(right[s * RATE : (s + 1) * RATE]) == pytest.approx(1000, abs=1)
    # repairing again changes nothing
    assert recorder.repair(path).repaired is False


def test_repair_fixes_sizes_and_torn_frame(tmp_path: Path) -> None:
    path = tmp_path / "torn.wav"
    with recorder.StereoRecorder(path) as rec:
        rec.feed("caller", sine(440, 0, 800))
        rec.feed("agent", sine(1000, 0, 800))
    assert recorder.repair(path).repaired is False
    raw = path.read_bytes()
    # killed before the first header update (sizes 0) and in the middle of a frame
    path.write_bytes(raw[:4] + b"\0\0\0\0" + raw[8:40] + b"\0\0\0\0" + raw[44:] + b"\x01\x02\x03")
    result = recorder.repair(path)
    assert result.repaired and result.frames == 800 and result.dropped_bytes == 3
    assert path.read_bytes() == raw


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    text = tmp_path / "notes.wav"
    text.write_bytes(b"not a recording at all")
    with pytest.raises(recorder.RecordingError, match="not a RIFF/WAVE"):
        recorder.repair(text)
    assert text.read_bytes() == b"not a recording at all"      # untouched
    path = tmp_path / "r.wav"
    rec = recorder.StereoRecorder(path)
    with pytest.raises(FileExistsError):
        recorder.StereoRecorder(path)                           # never overwrites a recording
    with pytest.raises(ValueError, match="side"):
        rec.feed("supervisor", np.zeros(160, np.int16))
    with pytest.raises(TypeError, match="int16"):
        rec.feed("caller", np.zeros(160, np.float32))
    with pytest.raises(ValueError, match="even number"):
        rec.feed("caller", b"\x00")
    rec.close()
    with pytest.raises(recorder.RecordingError, match="closed"):
        rec.feed("caller", np.zeros(160, np.int16))
    with pytest.raises(recorder.RecordingError, match="rate"):
        recorder.StereoRecorder(tmp_path / "x.wav", rate=44100)
