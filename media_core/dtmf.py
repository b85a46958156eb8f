"""In-band DTMF detection (ITU-T Q.23 tones, Q.24 reception limits).

A generalized Goertzel filter bank with a least-squares two-tone fit and a phase-advance
frequency estimate; see ``media_core/_dtmf.pyx`` for the analysis and ``docs/media-dsp.md`` for
the limits it meets. The same detector runs inside the media engine without the GIL through the
C functions declared in ``media_core/_dtmf.pxd``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from media_core import _dtmf
from media_core.prompt import decimate_16k_to_8k

__all__ = ["DIGITS", "DtmfDetector", "detect"]

DIGITS = "123A456B789C*0#D"
_RATES = (8000, 16000)

Samples = npt.NDArray[np.int16] | bytes | bytearray | memoryview


def _as_int16(samples: Samples) -> npt.NDArray[np.int16]:
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise TypeError(
                f"samples must be a one-dimensional int16 array, got {samples.dtype} "
                f"{samples.shape}"
            )
        return np.ascontiguousarray(samples)
    if isinstance(samples, bytes | bytearray | memoryview):
        raw = memoryview(samples).cast("B")
        if len(raw) % 2:
            raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False)
    raise TypeError(f"samples must be an int16 numpy array or bytes, got {type(samples).__name__}")


class DtmfDetector:
    """Streaming detector for one 8 kHz channel: feed samples in any chunk sizes, get the
    digits whose tones they complete. A digit is reported once per key press."""

    def __init__(
        self,
        *,
        min_level_dbm0: float = -36.0,
        max_fwd_twist_db: float = 6.0,
        max_rev_twist_db: float = 11.0,
    ) -> None:
        self._core = _dtmf.Detector()
        self._core.configure(
            min_level_dbm0=min_level_dbm0,
            max_fwd_twist_db=max_fwd_twist_db,
            max_rev_twist_db=max_rev_twist_db,
        )

    def feed(self, samples: Samples) -> str:
        """Digits completed by these 8 kHz samples, in order ("" when none)."""
        return self._core.feed(_as_int16(samples)).decode("ascii")

    def reset(self) -> None:
        """Forget the signal so far (a new call on the same channel)."""
        self._core.reset()

    @property
    def current(self) -> str:
        """The digit whose tone is on now (already reported), or ""."""
        return self._core.current

    @property
    def samples(self) -> int:
        """Samples fed since creation or the last reset."""
        return self._core.samples


def detect(samples: Samples, rate: int = 8000) -> str:
    """Every DTMF digit in a recording, in order. 16 kHz input is low-passed to 8 kHz first."""
    if rate not in _RATES:
        raise ValueError(f"rate={rate}: DTMF detection takes 8000 or 16000 Hz samples")
    pcm = _as_int16(samples)
    if rate == 16000:
        pcm = decimate_16k_to_8k(pcm)
    return DtmfDetector().feed(pcm)
