"""Call recording: a stereo WAV (caller left, agent right) written as the call goes.

The file is usable at every moment, not only after ``close``:
- audio is appended and flushed to the OS as soon as both sides of a stretch are known, so a
  killed process loses nothing that was written;
- the RIFF and data sizes in the header are rewritten every ``header_interval`` seconds of audio,
  so even a file nobody repairs plays up to that point;
- ``repair(path)`` (run at the next start) sets the sizes from the file length and drops a torn
  last sample frame.
The two sides arrive independently (two RTP streams). Each sample has a position (samples since
the start of the recording); a side that skips positions gets silence there, and a side that
lags more than ``max_skew`` seconds behind the other is filled with silence, so the channels
always stay aligned and buffering stays bounded. ``pause``/``resume`` record silence in place of
the audio (e.g. while a card number is read out), keeping the timeline.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

__all__ = ["RecordingError", "RepairResult", "StereoRecorder", "repair"]

log = logging.getLogger(__name__)

CALLER, AGENT = 0, 1
_SIDES = {"caller": CALLER, "agent": AGENT}
_HEADER = 44                      # canonical PCM WAV header: RIFF, fmt (16 bytes), data
_BLOCK = 4                        # two channels of 16 bits


class RecordingError(ValueError):
    """A recording file that cannot be written or repaired as asked."""


def _header(rate: int, data_bytes: int) -> bytes:
    return (
        b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, rate, rate * _BLOCK, _BLOCK, 16)
        + b"data" + struct.pack("<I", data_bytes)
    )


def _as_int16(samples: npt.NDArray[np.int16] | bytes | bytearray | memoryview) -> npt.NDArray[np.int16]:
    if isinstance(samples, np.ndarray):
        if samples.dtype != np.int16 or samples.ndim != 1:
            raise TypeError(f"samples must be a 1-D int16 array, got {samples.dtype} {samples.shape}")
        return samples
    raw = memoryview(samples).cast("B")
    if len(raw) % 2:
        raise ValueError(f"16-bit PCM needs an even number of bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype="<i2").astype(np.int16, copy=False)


class StereoRecorder:
    """Writes one call's stereo recording; see the module docstring."""

    def __init__(
        self,
        path: str | Path,
        rate: int = 8000,
        *,
        header_interval: float = 1.0,
        max_skew: float = 1.0,
        max_gap: float = 60.0,
        fsync: bool = False,
    ) -> None:
        if rate not in (8000, 16000):
            raise RecordingError(f"rate={rate}: recordings are 8000 or 16000 Hz")
        self.path = Path(path)
        self.rate = rate
        self._header_every = max(1, int(header_interval * rate))
        self._max_skew = max(1, int(max_skew * rate))
        self._max_gap = int(max_gap * rate)
        self._fsync = fsync
        # "x": never overwrite a recording; the file lives as long as the recorder
        self._file: BinaryIO | None = open(self.path, "xb")  # noqa: SIM115
        self._file.write(_header(rate, 0))
        self._file.flush()
        self.written = 0                   # sample frames in the file
        self._header_at = 0                # sample frames the header announces
        self._pending = [np.zeros(0, np.int16), np.zeros(0, np.int16)]  # from `written` on
        self.paused = False
        self.late_samples = 0              # arrived for positions already written: dropped
        self.resyncs = 0                   # position jumps beyond max_gap, taken as contiguous

    # ---- input ----

    def _end(self, side: int) -> int:
        return self.written + len(self._pending[side])

    def feed(
        self,
        side: str,
        samples: npt.NDArray[np.int16] | bytes,
        position: int | None = None,
    ) -> None:
        """Audio of one side ("caller" or "agent") starting at ``position`` (samples since the
        recording began; None: right after that side's previous audio)."""
        if self._file is None:
            raise RecordingError(f"{self.path}: recording is closed")
        if side not in _SIDES:
            raise ValueError(f"side={side!r}: 'caller' or 'agent'")
        s = _SIDES[side]
        pcm = _as_int16(samples)
        if self.paused:
            pcm = np.zeros(len(pcm), np.int16)
        end = self._end(s)
        if position is None:
            position = end
        if position > end:
            if position - end > self._max_gap:
                log.warning("recording_resync path=%s side=%s jump=%d", self.path, side, position - end)
                self.resyncs += 1
                position = end
            else:
                pcm = np.concatenate([np.zeros(position - end, np.int16), pcm])   # gap: silence
                position = end
        if position < end:
            # part of it falls where this side is already buffered or written: keep only the new
            overlap = end - position
            self.late_samples += min(overlap, len(pcm))
            pcm = pcm[overlap:]
        if len(pcm):
            self._pending[s] = np.concatenate([self._pending[s], pcm])
        self._commit()

    def silence(self, n: int) -> None:
        """n samples of silence on both sides (e.g. no media while on hold)."""
        if not 0 <= n <= self._max_gap:
            raise ValueError(f"n={n}: 0..{self._max_gap} samples")
        start = max(self._end(CALLER), self._end(AGENT))
        for side in _SIDES:
            self.feed(side, np.zeros(n, np.int16), start)

    def pause(self) -> None:
        """From now on, record silence instead of the audio."""
        self.paused = True

    def resume(self) -> None:
        """Record the audio again."""
        self.paused = False

    # ---- output ----

    def _commit(self, final: bool = False) -> None:
        ends = [self._end(CALLER), self._end(AGENT)]
        lead = max(ends)
        # a side lagging more than max_skew (or everything, when closing) becomes silence
        target = lead if final else lead - self._max_skew
        for s in (CALLER, AGENT):
            if ends[s] < target:
                self._pending[s] = np.concatenate(
                    [self._pending[s], np.zeros(target - ends[s], np.int16)]
                )
        n = min(len(self._pending[CALLER]), len(self._pending[AGENT]))
        if n == 0:
            return
        frames = np.empty((n, 2), dtype="<i2")
        frames[:, 0] = self._pending[CALLER][:n]
        frames[:, 1] = self._pending[AGENT][:n]
        self._pending = [self._pending[CALLER][n:], self._pending[AGENT][n:]]
        assert self._file is not None
        self._file.write(frames.tobytes())
        self._file.flush()                 # to the OS: a killed process loses nothing
        self.written += n
        if self.written - self._header_at >= self._header_every or final:
            self._write_header()

    def _write_header(self) -> None:
        assert self._file is not None
        f = self._file
        f.seek(0)
        f.write(_header(self.rate, self.written * _BLOCK))
        f.seek(0, os.SEEK_END)
        f.flush()
        if self._fsync:
            os.fsync(f.fileno())
        self._header_at = self.written

    def close(self) -> None:
        """Write what is buffered (the lagging side padded with silence) and the final header."""
        if self._file is None:
            return
        try:
            self._commit(final=True)
            self._write_header()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
            self._file = None

    @property
    def seconds(self) -> float:
        """Audio in the file so far."""
        return self.written / self.rate

    def __enter__(self) -> StereoRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RepairResult:
    """What ``repair`` found and did."""

    frames: int
    """Sample frames in the data chunk after repair."""
    rate: int
    """Sample rate from the fmt chunk."""
    repaired: bool
    """True when the header or the file length had to change."""
    dropped_bytes: int
    """Bytes of a torn last sample frame that were cut off."""


def repair(path: str | Path) -> RepairResult:
    """Make a recording cut short (process killed, power lost) a valid WAV again: RIFF and data
    sizes from the file length, a torn last frame removed. A file that is fine is left as is."""
    path = Path(path)
    with open(path, "r+b") as f:
        head = f.read(4096)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise RecordingError(f"{path}: not a RIFF/WAVE file")
        pos, fmt, data_at = 12, None, None
        while pos + 8 <= len(head):
            cid, size = head[pos : pos + 4], struct.unpack_from("<I", head, pos + 4)[0]
            if cid == b"fmt ":
                if size < 16 or pos + 8 + 16 > len(head):
                    raise RecordingError(f"{path}: fmt chunk too short")
                fmt = struct.unpack_from("<HHIIHH", head, pos + 8)
            elif cid == b"data":
                data_at = pos + 8
                break
            pos += 8 + size + (size & 1)
        if fmt is None or data_at is None:
            raise RecordingError(f"{path}: no fmt or data chunk in the first 4 KiB")
        tag, _channels, rate, _byte_rate, block, _bits = fmt
        if tag != 1 or block == 0:
            raise RecordingError(f"{path}: not PCM (format tag {tag})")
        length = f.seek(0, os.SEEK_END)
        data = length - data_at
        whole = data - data % block
        announced_riff = struct.unpack_from("<I", head, 4)[0]
        announced_data = struct.unpack_from("<I", head, data_at - 4)[0]
        changed = whole != data or announced_data != whole or announced_riff != data_at - 8 + whole
        if changed:
            if whole != data:
                f.truncate(data_at + whole)
            f.seek(4)
            f.write(struct.pack("<I", data_at - 8 + whole))
            f.seek(data_at - 4)
            f.write(struct.pack("<I", whole))
            f.flush()
            os.fsync(f.fileno())
            log.info("recording_repaired path=%s frames=%d dropped_bytes=%d",
                     path, whole // block, data - whole)
    return RepairResult(whole // block, rate, changed, data - whole)
