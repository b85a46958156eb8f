"""ITU-T G.711 PCM: mu-law (PCMU) and A-law (PCMA) encode and decode.

Bit-exact with G.711 on every 16-bit input and every code. Samples are 16-bit signed linear PCM,
given as a numpy ``int16`` array or as little-endian ``bytes``; codes are ``bytes``, one per sample.
"""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt

from media_core import _g711

_LE = sys.byteorder == "little"
Samples = npt.NDArray[np.int16] | bytes | bytearray | memoryview
Codes = bytes | bytearray | memoryview | npt.NDArray[np.uint8]

__all__ = [
    "alaw_decode",
    "alaw_encode",
    "alaw_to_ulaw",
    "ulaw_decode",
    "ulaw_encode",
    "ulaw_to_alaw",
]


def _as_samples(samples: Samples) -> npt.NDArray[np.int16] | bytes:
    if type(samples) is bytes and _LE:
        return samples                     # the C side reads int16 LE bytes directly
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.int16:
            raise TypeError(f"samples must be int16, got dtype={samples.dtype}")
        if samples.ndim != 1:
            raise ValueError(f"samples must be one-dimensional, got shape={samples.shape}")
        return np.ascontiguousarray(samples)
    if isinstance(samples, bytes | bytearray | memoryview):
        raw = memoryview(samples).cast("B")
        if len(raw) % 2:
            raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(raw)}")
        return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False)
    raise TypeError(f"samples must be an int16 numpy array or bytes, got {type(samples).__name__}")


def _as_codes(data: Codes) -> bytes | memoryview | npt.NDArray[np.uint8]:
    if type(data) is bytes:
        return data
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8 or data.ndim != 1:
            raise TypeError(f"codes must be a 1-D uint8 array, got {data.dtype} {data.shape}")
        return np.ascontiguousarray(data)
    if isinstance(data, bytes | bytearray | memoryview):
        return memoryview(data).cast("B")
    raise TypeError(f"codes must be bytes, got {type(data).__name__}")


def ulaw_encode(samples: Samples) -> bytes:
    """Mu-law codes (G.711 Table 2) for 16-bit linear samples."""
    if type(samples) is bytes and _LE:      # the per-frame fast path
        return _g711.encode(samples, False)
    return _g711.encode(_as_samples(samples), False)


def ulaw_decode(data: Codes) -> npt.NDArray[np.int16]:
    """16-bit linear samples for mu-law codes."""
    if type(data) is bytes and _LE:      # the per-frame fast path
        return _g711.decode(data, False)
    return _g711.decode(_as_codes(data), False)


def alaw_encode(samples: Samples) -> bytes:
    """A-law codes (G.711 Table 1) for 16-bit linear samples."""
    if type(samples) is bytes and _LE:      # the per-frame fast path
        return _g711.encode(samples, True)
    return _g711.encode(_as_samples(samples), True)


def alaw_decode(data: Codes) -> npt.NDArray[np.int16]:
    """16-bit linear samples for A-law codes."""
    if type(data) is bytes and _LE:      # the per-frame fast path
        return _g711.decode(data, True)
    return _g711.decode(_as_codes(data), True)


def ulaw_to_alaw(data: Codes) -> bytes:
    """A-law codes for the same samples as the given mu-law codes."""
    return _g711.transcode(_as_codes(data), True)


def alaw_to_ulaw(data: Codes) -> bytes:
    """Mu-law codes for the same samples as the given A-law codes."""
    return _g711.transcode(_as_codes(data), False)
