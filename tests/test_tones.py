"""Call-progress tones (cadence, frequencies and level for every country and kind, continuity
across frames) and prompts (WAV reading, 16 kHz to 8 kHz, 20 ms frames, bad files)."""

from __future__ import annotations

import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from media_core import prompt, tones

RATE = 8000
DBM0_AMPLITUDE = 32767 * 10 ** (-3.14 / 20)


def test_required_countries_are_in_the_table() -> None:
    for country in ("us", "uk", "de", "fr", "in", "au"):
        for kind in ("dial", "ringback", "busy", "congestion"):
            tones.tone_spec(country, kind)


def expected_gate(spec: tones.ToneSpec, n: int) -> np.ndarray:
    """Per-sample on (True)/off from the cadence, built independently of the generator."""
    if not spec.cadence_ms:
        return np.ones(n, dtype=bool)
    edges = np.cumsum((0, *spec.cadence_ms))
    pos = (np.arange(n) * 1000 / RATE) % spec.period_ms
    on = np.zeros(n, dtype=bool)
    for i in range(0, len(spec.cadence_ms), 2):
        on |= (pos >= edges[i]) & (pos < edges[i + 1])
    return on


@pytest.mark.parametrize("country", tones.COUNTRIES)
@pytest.mark.parametrize("kind", tones.KINDS)
def test_cadence_frequencies_and_level(country: str, kind: str) -> None:
    spec = tones.tone_spec(country, kind)
    seconds = max(2 * spec.period_ms / 1000, 1.0)
    x = tones.render(country, kind, seconds, level_dbm0=-13.0).astype(np.float64)
    on = expected_gate(spec, len(x))
    # cadence: silent exactly where the cadence is off, sounding where it is on (10 ms blocks
    # that are wholly on or off; the modulated tones dip near zero, so look at block power)
    blocks = len(x) // 80
    seg = x[: blocks * 80].reshape(blocks, 80)
    gate = on[: blocks * 80].reshape(blocks, 80)
    off_blocks, on_blocks = ~gate.any(axis=1), gate.all(axis=1)
    assert off_blocks.any() == bool(spec.cadence_ms)
    assert not seg[off_blocks].any(), "sound in an off period"
    assert (np.mean(seg[on_blocks] ** 2, axis=1) > 1e3).all(), "silence in an on period"
    # level: mean power over the on periods is -13 dBm0 (within 0.3 dB)
    power = np.mean(x[on] ** 2)
    assert 10 * np.log10(power / (DBM0_AMPLITUDE**2 / 2)) == pytest.approx(-13.0, abs=0.3)
    # frequencies: the spectrum of the on samples peaks at the components (the carrier and
    # sidebands for a modulated tone) and has nothing well away from them
    # (one uninterrupted on period: the phase runs on through the off periods)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], on.astype(np.int8), [0]])))
    start, stop = max(zip(edges[::2], edges[1::2], strict=True), key=lambda se: se[1] - se[0])
    sound = x[start : min(stop, start + RATE)]
    spectrum = np.abs(np.fft.rfft(sound * np.hanning(len(sound)))) ** 2
    f = np.fft.rfftfreq(len(sound), 1 / RATE)
    wanted = list(spec.frequencies)
    if spec.modulation_hz:
        c, m = spec.frequencies[0], spec.modulation_hz
        wanted += [c - m, c + m]
    for w in spec.frequencies:
        near = spectrum[np.abs(f - w) <= 3 * RATE / len(sound)]
        assert near.max() > 0.1 * spectrum.max(), f"no component at {w} Hz"
    far = np.ones(len(f), dtype=bool)
    for w in wanted:
        far &= np.abs(f - w) > 15
    assert spectrum[far].sum() < 0.02 * spectrum.sum()


def test_frames_are_continuous_with_one_render() -> None:
    gen = tones.ToneGenerator("uk", "ringback")
    frames = [next(gen.frames()) for _ in range(200)]
    assert all(len(fr) == 160 for fr in frames)
    assert np.array_equal(np.concatenate(frames), tones.render("uk", "ringback", 4.0))


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown country 'xx'"):
        tones.tone_spec("xx", "busy")
    with pytest.raises(ValueError, match="unknown tone 'howler'"):
        tones.tone_spec("us", "howler")
    with pytest.raises(ValueError, match="dBm0"):
        tones.ToneGenerator("us", "dial", level_dbm0=6.0)
    with pytest.raises(ValueError, match="samples outside"):
        tones.ToneGenerator("us", "dial").read(-1)


# ---- prompts: WAV in, 8 kHz 20 ms frames out ----


def write_wav(path: Path, samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return path


def sine(freq: float, seconds: float, rate: int, amplitude: float = 10000.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)


def level_at(x: np.ndarray, freq: float, rate: int = 8000) -> float:
    """Amplitude of the component at freq (least squares over the middle of x)."""
    x = x[len(x) // 4 : 3 * len(x) // 4].astype(np.float64)
    t = np.arange(len(x)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)], axis=1)
    coef, *_ = np.linalg.lstsq(basis, x, rcond=None)
    return float(np.hypot(*coef))


def test_8k_prompt_frames(tmp_path: Path) -> None:
    samples = sine(440, 1.01, 8000)               # 8080 samples: 50 frames and a half
    frames = list(prompt.frames(write_wav(tmp_path / "p.wav", samples, 8000)))
    assert len(frames) == 51
    assert all(f.dtype == np.int16 and len(f) == 160 for f in frames)
    joined = np.concatenate(frames)
    assert np.array_equal(joined[: len(samples)], samples)
    assert not joined[len(samples) :].any()       # the last frame is padded with silence


def test_16k_prompt_is_low_passed_and_decimated(tmp_path: Path) -> None:
    # in band (1 kHz, 3.3 kHz): same amplitude; above 4 kHz: gone instead of folded back
    for freq, low, high in ((1000, 9950, 10050), (3300, 9800, 10200)):
        out = prompt.load_prompt(write_wav(tmp_path / f"{freq}.wav", sine(freq, 1.0, 16000), 16000))
        assert len(out) == 8000
        assert low < level_at(out, freq) < high
    five_k = sine(5000, 1.0, 16000)
    out = prompt.load_prompt(write_wav(tmp_path / "5k.wav", five_k, 16000))
    # 5 kHz would alias to 3 kHz; the low-pass leaves less than -55 dB of it
    assert level_at(out, 3000) < 10000 * 10 ** (-55 / 20)
    # while plain decimation would fold it back at full level: the check above can fail
    assert level_at(five_k[::2], 3000) > 9000


def test_bad_prompt_files_are_clear_errors(tmp_path: Path) -> None:
    cases = {
        "stereo": (write_wav(tmp_path / "s.wav", np.zeros(200, np.int16), 8000, channels=2), "mono"),
        "8bit": (write_wav(tmp_path / "b.wav", np.zeros(100, np.uint8), 8000, width=1), "16-bit"),
        "44k": (write_wav(tmp_path / "r.wav", np.zeros(100, np.int16), 44100), "8000 or 16000"),
    }
    text = tmp_path / "t.wav"
    text.write_text("this is not audio")
    cases["text"] = (text, "not a PCM WAV")
    ulaw = tmp_path / "u.wav"       # a valid mu-law WAV (format 7): not PCM
    fmt = struct.pack("<HHIIHH", 7, 1, 8000, 8000, 1, 8)
    ulaw.write_bytes(b"RIFF" + struct.pack("<I", 4 + 8 + 16 + 8 + 4) + b"WAVE" + b"fmt "
                     + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", 4) + b"\xff" * 4)
    cases["ulaw"] = (ulaw, "not a PCM WAV")
    huge = tmp_path / "h.wav"       # a header that claims more than the prompt limit
    fmt = struct.pack("<HHIIHH", 1, 1, 8000, 16000, 2, 16)
    size = 2 * 8000 * (prompt.MAX_PROMPT_SECONDS + 1)
    huge.write_bytes(b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt "
                     + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size) + b"\0" * 64)
    cases["huge"] = (huge, "limited to")
    for name, (path, message) in cases.items():
        with pytest.raises(prompt.PromptFormatError, match=message):
            prompt.load_prompt(path)
        assert path.exists(), name                 # nothing is lost: the file is untouched
    with pytest.raises(ValueError, match="frame_ms"):
        next(prompt.frames(np.zeros(10, np.int16), frame_ms=0))
