"""In-band DTMF detection against the reception limits of ITU-T Q.24 (with the North
American values where administrations differ): frequency deviation, duration, twist, noise,
inter-digit pause, and talk-off on ten minutes of synthetic speech."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_core import dtmf

RATE = 8000
DIGITS = "123A456B789C*0#D"
# ITU-T Q.23: low group (rows) and high group (columns) of the keypad
ROWS = (697.0, 770.0, 852.0, 941.0)
COLS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")
# 0 dBm0: the sine 3.14 dB below the G.711 overload point (full scale)
DBM0_AMPLITUDE = 32767 * 10 ** (-3.14 / 20)
SPEECH_TEXTS = Path(__file__).parent / "vectors" / "speech" / "texts.txt"


def freqs(digit: str) -> tuple[float, float]:
    for r, row in enumerate(KEYPAD):
        if digit in row:
            return ROWS[r], COLS[row.index(digit)]
    raise KeyError(digit)


class Signal:
    """Builds test signals: tones at a level in dBm0 per tone, silences, white noise."""

    def __init__(self, seed: int, rate: int = RATE) -> None:
        self.rng = np.random.default_rng(seed)
        self.rate = rate

    def tone(
        self, digit: str, ms: float, *, level: float = -10.0, deviation: float = 0.0,
        twist_db: float = 0.0,
    ) -> np.ndarray:
        """twist_db > 0: high group stronger (forward twist); < 0: low group stronger."""
        low, high = freqs(digit)
        t = np.arange(round(ms * self.rate / 1000)) / self.rate
        a = DBM0_AMPLITUDE * 10 ** (level / 20)
        a_low, a_high = a * 10 ** (-twist_db / 40), a * 10 ** (twist_db / 40)
        p1, p2 = self.rng.uniform(0, 2 * np.pi, 2)
        return a_low * np.sin(2 * np.pi * low * (1 + deviation) * t + p1) + a_high * np.sin(
            2 * np.pi * high * (1 + deviation) * t + p2
        )

    def silence(self, ms: float) -> np.ndarray:
        return np.zeros(round(ms * self.rate / 1000))

    def keyed(self, digits: str, on_ms: float = 50, off_ms: float = 50, **tone) -> np.ndarray:
        parts = [self.silence(100)]
        for d in digits:
            parts += [self.tone(d, on_ms, **tone), self.silence(off_ms)]
        parts.append(self.silence(100))
        return np.concatenate(parts)

    def pcm(self, x: np.ndarray, snr_db: float | None = None) -> np.ndarray:
        """int16 samples; snr_db adds white noise at that ratio to the mean power of the tones
        (measured where the signal is on)."""
        if snr_db is not None:
            power = np.mean(x[x != 0] ** 2)
            x = x + self.rng.normal(0, np.sqrt(power / 10 ** (snr_db / 10)), len(x))
        return np.clip(np.rint(x), -32768, 32767).astype(np.int16)


@pytest.fixture
def sig() -> Signal:
    return Signal(seed=24)


def test_all_sixteen_digits(sig: Signal) -> None:
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS))) == DIGITS


def test_stream_fed_whole_sample_by_sample_and_in_odd_chunks(sig: Signal) -> None:
    pcm = sig.pcm(sig.keyed("159#D0"), snr_db=30)
    one = dtmf.DtmfDetector()
    assert "".join(one.feed(pcm[i : i + 1]) for i in range(len(pcm))) == "159#D0"
    odd = dtmf.DtmfDetector()
    cuts = np.cumsum(sig.rng.integers(1, 400, size=len(pcm) // 100))
    chunks = np.split(pcm, cuts[cuts < len(pcm)])
    assert "".join(odd.feed(c) for c in chunks) == "159#D0"
    assert odd.samples == len(pcm)
    # bytes (int16 little-endian) work the same
    assert dtmf.detect(pcm.astype("<i2").tobytes()) == "159#D0"


@pytest.mark.parametrize("deviation", [-0.015, 0.015])
def test_accepts_frequency_deviation_of_1_5_percent(sig: Signal, deviation: float) -> None:
    # Q.24: frequency tolerance, operation: <= 1.5 %
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, deviation=deviation), snr_db=30)) == DIGITS


@pytest.mark.parametrize("deviation", [-0.035, 0.035, -0.05, 0.05])
def test_rejects_frequency_deviation_of_3_5_percent(sig: Signal, deviation: float) -> None:
    # Q.24: frequency tolerance, non-operation: >= 3.5 %
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, on_ms=100, deviation=deviation))) == ""


def test_accepts_40_ms_tones_with_40_ms_pauses(sig: Signal) -> None:
    # Q.24: tone duration, operation: >= 40 ms; pause of 40 ms between digits
    pcm = sig.pcm(sig.keyed(DIGITS * 2, on_ms=40, off_ms=40), snr_db=30)
    assert dtmf.detect(pcm) == DIGITS * 2


@pytest.mark.parametrize("ms", [10, 20, 23])
def test_rejects_tones_of_23_ms_or_less(sig: Signal, ms: float) -> None:
    # Q.24: tone duration, non-operation: <= 23 ms
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, on_ms=ms, off_ms=60))) == ""


@pytest.mark.parametrize("twist_db", [4.0, -8.0])
def test_accepts_twist_4_db_forward_and_8_db_reverse(sig: Signal, twist_db: float) -> None:
    # Q.24: maximum twist 4 dB (high group stronger) / 8 dB (low group stronger)
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, twist_db=twist_db), snr_db=30)) == DIGITS


@pytest.mark.parametrize("twist_db", [10.0, -14.0])
def test_rejects_twist_well_beyond_the_limits(sig: Signal, twist_db: float) -> None:
    # the detector's own limits are 6 dB forward and 11 dB reverse
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, twist_db=twist_db))) == ""


def test_detects_at_15_db_snr_in_white_noise(sig: Signal) -> None:
    for _ in range(3):
        assert dtmf.detect(sig.pcm(sig.keyed(DIGITS), snr_db=15)) == DIGITS


@pytest.mark.parametrize("deviation", [-0.015, 0.015])
@pytest.mark.parametrize("twist_db", [4.0, -8.0])
def test_worst_case_combined(sig: Signal, deviation: float, twist_db: float) -> None:
    # every acceptance limit at once: 40 ms tones and pauses, 1.5 % off, full twist, 15 dB SNR
    x = sig.keyed(DIGITS, on_ms=40, off_ms=40, deviation=deviation, twist_db=twist_db)
    assert dtmf.detect(sig.pcm(x, snr_db=15)) == DIGITS


def test_level_range(sig: Signal) -> None:
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, level=-30.0))) == DIGITS
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, level=0.0))) == DIGITS
    assert dtmf.detect(sig.pcm(sig.keyed(DIGITS, level=-45.0))) == ""


def test_pause_and_interruption_handling(sig: Signal) -> None:
    # the same key pressed twice with a 40 ms pause gives two digits
    x = np.concatenate([sig.tone("5", 60), sig.silence(40), sig.tone("5", 60), sig.silence(60)])
    assert dtmf.detect(sig.pcm(x, snr_db=20)) == "55"
    # a 10 ms drop-out inside one key press does not repeat the digit
    x = np.concatenate([sig.tone("7", 60), sig.silence(10), sig.tone("7", 60), sig.silence(60)])
    assert dtmf.detect(sig.pcm(x, snr_db=20)) == "7"
    # a key held for two seconds is one digit
    assert dtmf.detect(sig.pcm(sig.keyed("8", on_ms=2000))) == "8"
    # a change of key without a pause gives both digits
    x = np.concatenate([sig.tone("1", 80), sig.tone("2", 80), sig.silence(60)])
    assert dtmf.detect(sig.pcm(x)) == "12"


def test_current_digit_while_key_held(sig: Signal) -> None:
    det = dtmf.DtmfDetector()
    assert det.feed(sig.pcm(sig.tone("9", 200))) == "9"
    assert det.current == "9"
    assert det.feed(sig.pcm(sig.silence(100))) == ""
    assert det.current == ""
    det.reset()
    assert det.samples == 0


def test_16_khz_input(sig: Signal) -> None:
    wide = Signal(seed=5, rate=16000)
    assert dtmf.detect(wide.pcm(wide.keyed(DIGITS)), rate=16000) == DIGITS


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="int16"):
        dtmf.detect(np.zeros(100, dtype=np.float64))
    with pytest.raises(ValueError, match="even number of bytes"):
        dtmf.detect(b"\x00\x00\x00")
    with pytest.raises(ValueError, match="8000 or 16000"):
        dtmf.detect(np.zeros(100, dtype=np.int16), rate=44100)


# ---- talk-off: ten minutes of speech must not give a single digit ----


def _speech_lines() -> list[tuple[str, str]]:
    lines = []
    for line in SPEECH_TEXTS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            lang, text = line.split("|", 1)
            lines.append((lang, text))
    return lines


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    """Ten minutes of 8 kHz speech from espeak-ng: several languages, voices, pitches and
    speeds, cached under the temporary directory by the hash of the texts and tool versions."""
    espeak, sox = shutil.which("espeak-ng"), shutil.which("sox")
    assert espeak and sox, "espeak-ng and sox are needed (make sysdeps installs them)"
    version = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(SPEECH_TEXTS.read_bytes() + version.encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"edgecc-speech-{key}.raw"
    if cache.exists():
        return np.fromfile(cache, dtype="<i2").astype(np.int16)
    variants = ["", "+f2", "+m3", "+f4", "+klatt", "+m7", "+f1", "+croak"]
    chunks, total, i = [], 0, 0
    lines = _speech_lines()
    while total < 600 * RATE:
        for lang, text in lines:
            voice = lang + variants[i % len(variants)]
            pitch, speed = (i * 37) % 100, 130 + (i * 29) % 110
            wav = subprocess.run(
                [espeak, "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", text],
                capture_output=True, check=True, timeout=60,
            ).stdout
            raw = subprocess.run(
                [sox, "-t", "wav", "-", "-t", "raw", "-e", "signed-integer", "-b", "16",
                 "-c", "1", "-r", str(RATE), "-"],
                input=wav, capture_output=True, check=True, timeout=60,
            ).stdout
            chunk = np.frombuffer(raw, dtype="<i2")
            chunks.append(chunk)
            total += len(chunk)
            i += 1
    samples = np.concatenate(chunks).astype(np.int16)
    tmp = cache.with_suffix(f".{i}.tmp")
    samples.astype("<i2").tofile(tmp)
    tmp.replace(cache)
    return samples


@pytest.mark.parametrize("gain", [0.25, 1.0, 4.0])
def test_no_digit_in_ten_minutes_of_speech(speech: np.ndarray, gain: float) -> None:
    assert len(speech) >= 600 * RATE
    assert np.sqrt(np.mean(speech.astype(np.float64) ** 2)) > 500   # real audio, not silence
    loud = np.clip(speech.astype(np.float64) * gain, -32768, 32767).astype(np.int16)
    assert dtmf.detect(loud) == ""


def test_digits_between_phrases_of_speech_are_found(speech: np.ndarray, sig: Signal) -> None:
    # the talk-off test above means something only if the detector hears digits in that audio
    parts = []
    for k, d in enumerate(DIGITS):
        parts += [speech[k * 4000 : (k + 1) * 4000], sig.pcm(sig.tone(d, 60)), np.zeros(400, np.int16)]
    assert dtmf.detect(np.concatenate(parts)) == DIGITS


# ---- any audio, any chunking: the same digits ----


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), cuts=st.lists(st.integers(0, 4000), max_size=12))
def test_chunking_never_changes_the_result(seed: int, cuts: list[int]) -> None:
    rng = np.random.default_rng(seed)
    s = Signal(seed)
    digits = "".join(rng.choice(list(DIGITS), size=3))
    on_ms, off_ms = float(rng.integers(20, 80)), float(rng.integers(20, 80))
    x = s.pcm(s.keyed(digits, on_ms=on_ms, off_ms=off_ms), snr_db=float(rng.uniform(5, 40)))
    noise = rng.integers(-32768, 32768, size=500, dtype=np.int16)      # garbage at the end
    x = np.concatenate([x, noise])
    whole = dtmf.detect(x)
    det = dtmf.DtmfDetector()
    parts = np.split(x, sorted(c for c in cuts if c < len(x)))
    assert "".join(det.feed(p) for p in parts) == whole
    assert set(whole) <= set(DIGITS)
