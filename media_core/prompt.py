"""Prompt playback: read a WAV prompt, bring it to 8 kHz and cut it into 20 ms frames.

Prompts are mono 16-bit PCM WAV at 8 kHz or 16 kHz. 16 kHz is brought to 8 kHz by a
windowed-sinc (Kaiser) low-pass FIR and decimation by 2, so nothing above the 4 kHz Nyquist
limit of G.711 folds back into the band (ITU-T G.712 passband 300-3400 Hz kept flat).
"""

from __future__ import annotations

import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "FRAME_MS",
    "MAX_PROMPT_SECONDS",
    "PromptFormatError",
    "decimate_16k_to_8k",
    "frames",
    "load_prompt",
]

FRAME_MS = 20
MAX_PROMPT_SECONDS = 600          # a prompt is read whole: bound what that can cost
RATE = 8000
_TAPS = 127                       # odd: linear phase with an integer delay of 63 samples
_CUTOFF_HZ = 3700.0               # middle of the 3400-4000 Hz transition band
_KAISER_BETA = 5.65               # about 60 dB stop-band attenuation (Kaiser's formula)


class PromptFormatError(ValueError):
    """The prompt file is not a mono 16-bit PCM WAV at 8 or 16 kHz."""


def _lowpass_16k() -> npt.NDArray[np.float64]:
    n = np.arange(_TAPS) - (_TAPS - 1) / 2
    h = 2 * _CUTOFF_HZ / 16000 * np.sinc(2 * _CUTOFF_HZ / 16000 * n) * np.kaiser(_TAPS, _KAISER_BETA)
    return h / h.sum()                 # unity gain at DC


_LOWPASS_16K = _lowpass_16k()


def decimate_16k_to_8k(samples: npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    """16 kHz int16 samples low-pass filtered and decimated to 8 kHz (same duration)."""
    if samples.dtype != np.int16 or samples.ndim != 1:
        raise TypeError("samples must be a one-dimensional int16 array")
    if samples.size == 0:
        return samples.copy()
    # "same"-length convolution keeps the filter's group delay out of the output
    y = np.convolve(samples.astype(np.float64), _LOWPASS_16K, mode="same")[::2]
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


def load_prompt(path: str | Path) -> npt.NDArray[np.int16]:
    """The prompt's samples at 8 kHz; PromptFormatError names what is wrong with the file."""
    path = Path(path)
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate, count = (
                wav.getnchannels(), wav.getsampwidth(), wav.getframerate(), wav.getnframes()
            )
            if channels != 1:
                raise PromptFormatError(f"{path}: {channels} channels, prompts must be mono")
            if width != 2:
                raise PromptFormatError(f"{path}: {8 * width}-bit samples, prompts must be 16-bit")
            if rate not in (8000, 16000):
                raise PromptFormatError(f"{path}: {rate} Hz, prompts must be 8000 or 16000 Hz")
            if count > MAX_PROMPT_SECONDS * rate:
                raise PromptFormatError(
                    f"{path}: {count / rate:.0f} s long, prompts are limited to "
                    f"{MAX_PROMPT_SECONDS} s"
                )
            raw = wav.readframes(count)
    except wave.Error as exc:          # not RIFF/WAVE, or not PCM (e.g. mu-law, ADPCM)
        raise PromptFormatError(f"{path}: not a PCM WAV file ({exc})") from exc
    except EOFError as exc:
        raise PromptFormatError(f"{path}: truncated WAV header") from exc
    if len(raw) % 2:
        raw = raw[:-1]                 # a torn last sample: drop it, keep the rest
    samples = np.frombuffer(raw, dtype="<i2").astype(np.int16)
    return decimate_16k_to_8k(samples) if rate == 16000 else samples


def frames(
    source: str | Path | npt.NDArray[np.int16], frame_ms: int = FRAME_MS
) -> Iterator[npt.NDArray[np.int16]]:
    """20 ms frames (160 samples at 8 kHz) of a prompt file or of 8 kHz samples; the last
    frame is padded with silence."""
    if frame_ms <= 0 or (RATE * frame_ms) % 1000:
        raise ValueError(f"frame_ms={frame_ms} is not a whole number of 8 kHz samples")
    samples = source if isinstance(source, np.ndarray) else load_prompt(source)
    size = RATE * frame_ms // 1000
    for start in range(0, len(samples), size):
        frame = samples[start : start + size]
        if len(frame) < size:
            frame = np.concatenate([frame, np.zeros(size - len(frame), dtype=np.int16)])
        yield frame
