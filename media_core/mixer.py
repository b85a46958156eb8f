"""N-party audio mixing of 16-bit frames with saturation.

Sums are formed in 32 bits and clipped to the int16 range once, so the result does not depend
on the order of the parties. ``mix_all_but_self`` gives each conference party the sum of the
others (a party never hears itself). The media engine uses the same C functions
(``media_core/_mixer.pxd``) without the GIL.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from media_core import _mixer

__all__ = ["MAX_PARTIES", "gain", "mix", "mix_all_but_self"]

MAX_PARTIES = 256          # a conference bridge's hard limit on inputs per mix
Frame = npt.NDArray[np.int16]


def _stack(frames: Sequence[Frame] | npt.NDArray[np.int16]) -> npt.NDArray[np.int16]:
    if len(frames) > MAX_PARTIES:
        raise ValueError(f"{len(frames)} parties: a mix takes at most {MAX_PARTIES}")
    if isinstance(frames, np.ndarray):
        if frames.ndim != 2 or frames.dtype != np.int16:
            raise TypeError(
                f"frames must be a (parties, samples) int16 array, got {frames.dtype} {frames.shape}"
            )
        return np.ascontiguousarray(frames)
    if not frames:
        raise ValueError("no frames to mix")
    for i, f in enumerate(frames):
        if not isinstance(f, np.ndarray) or f.dtype != np.int16 or f.ndim != 1:
            raise TypeError(f"frame {i} is not a one-dimensional int16 array")
    lengths = {len(f) for f in frames}
    if len(lengths) != 1:
        raise ValueError(f"frames differ in length: {sorted(lengths)}")
    return np.ascontiguousarray(np.stack(frames))


def mix(frames: Sequence[Frame] | npt.NDArray[np.int16]) -> Frame:
    """The saturated sum of equal-length int16 frames."""
    return _mixer.mix(_stack(frames))


def mix_all_but_self(frames: Sequence[Frame] | npt.NDArray[np.int16]) -> list[Frame]:
    """For each party, the saturated sum of every other party's frame."""
    return list(_mixer.mix_all_but_self(_stack(frames)))


def gain(frame: Frame, db: float) -> Frame:
    """The frame amplified (db > 0) or attenuated (db < 0), saturated to int16."""
    if not isinstance(frame, np.ndarray) or frame.dtype != np.int16 or frame.ndim != 1:
        raise TypeError("frame must be a one-dimensional int16 array")
    if not -96.0 <= db <= 24.0:
        raise ValueError(f"gain {db} dB outside -96..+24 dB")
    return _mixer.gain(np.ascontiguousarray(frame), round(4096 * 10 ** (db / 20)))
