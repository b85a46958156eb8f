"""Recordings at rest: AES-256-GCM in authenticated segments, keys wrapped by the site key.

Each recording has its own random 32-byte data key. The key is stored only *wrapped*: encrypted
with AES-256-GCM under the site key (``site.key``), with the recording id as associated data, so a
wrapped key moved to another recording does not unwrap. Destroying the wrapped key makes the file
(and every copy of it, backups included) unreadable.

File layout (all integers little-endian)::

    header   magic "EDGECCR1" | version u8 = 1 | 3 zero bytes | segment_bytes u32 | nonce prefix 7 B | 0
    segment  length u32 (ciphertext + 16-byte tag) | AES-GCM ciphertext+tag     (repeated)

Segment *i* is sealed with nonce = prefix ‖ i (u32) ‖ final (u8) and associated data = header ‖
recording id ‖ i ‖ final. The last segment, and only it, has final = 1 (it may be empty). This is
the STREAM construction (Hoang, Reyhanitabar, Rogaway, Vizár 2015): reordering, swapping,
dropping or duplicating segments, appending after the end, or moving a file to another recording
id all fail authentication; a file cut short has no final segment and is reported as incomplete.
A writer that crashes loses at most the segment it was filling.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DEFAULT_SEGMENT_BYTES",
    "KEY_BYTES",
    "IncompleteRecording",
    "KeyUnwrapError",
    "RecordingCryptoError",
    "SegmentReader",
    "SegmentWriter",
    "SiteKeyError",
    "TamperedRecording",
    "load_site_key",
    "new_data_key",
    "seal_incomplete",
    "unwrap_key",
    "wrap_key",
]

KEY_BYTES = 32
MAGIC = b"EDGECCR1"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sB3xI7sx")
HEADER_BYTES = _HEADER.size            # 24
_LEN = struct.Struct("<I")
TAG_BYTES = 16
DEFAULT_SEGMENT_BYTES = 32000
"""One second of 8 kHz 16-bit stereo: a crash loses at most this much audio."""
MAX_SEGMENT_BYTES = 1 << 20
"""Largest segment a reader accepts (its buffer limit)."""
_WRAP_VERSION = 1
_WRAP_CONTEXT = b"edgecc recording data key v1\x00"


class RecordingCryptoError(Exception):
    """Base of the errors of this module."""


class TamperedRecording(RecordingCryptoError):
    """The file was modified, reordered, or does not belong to this recording id and key."""


class IncompleteRecording(TamperedRecording):
    """The file ends before its final segment: the writer crashed, or the file was cut short.

    ``segments`` complete segments (``plaintext_bytes`` bytes) were authentic and have been
    delivered; a torn last segment of ``torn_bytes`` bytes was dropped.
    """

    def __init__(self, message: str, segments: int, plaintext_bytes: int, torn_bytes: int) -> None:
        super().__init__(message)
        self.segments = segments
        self.plaintext_bytes = plaintext_bytes
        self.torn_bytes = torn_bytes


class KeyUnwrapError(RecordingCryptoError):
    """A wrapped data key that does not open with this site key and recording id."""


class SiteKeyError(RecordingCryptoError):
    """The site key file is missing, of the wrong size, or readable by others."""


def load_site_key(site_dir: str | Path, name: str = "site.key") -> bytes:
    """Read the 32-byte site key (created by ``edgecc init``); refuse one others can read."""
    path = Path(site_dir) / name
    try:
        info = path.stat()
    except FileNotFoundError:
        raise SiteKeyError(
            f"site key {path} is missing: restore it from the site's backup "
            "(recordings cannot be decrypted without it)"
        ) from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SiteKeyError(f"site key {path} is readable by group/others: chmod 600 {path}")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SiteKeyError(f"site key {path} is {len(key)} bytes, expected {KEY_BYTES}")
    return key


def new_data_key() -> bytes:
    """A fresh random AES-256 key for one recording."""
    return AESGCM.generate_key(bit_length=256)


def _wrap_ad(recording_id: str) -> bytes:
    return _WRAP_CONTEXT + recording_id.encode("utf-8")


def wrap_key(site_key: bytes, data_key: bytes, recording_id: str) -> bytes:
    """Encrypt ``data_key`` under the site key, bound to ``recording_id`` (61 bytes)."""
    _check_key(site_key, "site key")
    _check_key(data_key, "data key")
    nonce = os.urandom(12)
    sealed = AESGCM(site_key).encrypt(nonce, data_key, _wrap_ad(recording_id))
    return bytes([_WRAP_VERSION]) + nonce + sealed


def unwrap_key(site_key: bytes, wrapped: bytes, recording_id: str) -> bytes:
    """The data key of ``recording_id``; KeyUnwrapError if it is not the key wrapped for it."""
    _check_key(site_key, "site key")
    if len(wrapped) != 1 + 12 + KEY_BYTES + TAG_BYTES or wrapped[0] != _WRAP_VERSION:
        raise KeyUnwrapError(f"recording {recording_id}: wrapped key has an unknown format")
    try:
        return AESGCM(site_key).decrypt(wrapped[1:13], wrapped[13:], _wrap_ad(recording_id))
    except InvalidTag:
        raise KeyUnwrapError(
            f"recording {recording_id}: wrapped key does not open with this site key"
        ) from None


def _check_key(key: bytes, what: str) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes, got {len(key)}")


def _segment_ad(header: bytes, recording_id: str, index: int, final: bool) -> bytes:
    rid = recording_id.encode("utf-8")
    return header + struct.pack("<H", len(rid)) + rid + struct.pack("<IB", index, final)


def _nonce(prefix: bytes, index: int, final: bool) -> bytes:
    return prefix + struct.pack("<IB", index, final)


class SegmentWriter:
    """Appends plaintext to an encrypted recording file, one sealed segment per ``segment_bytes``.

    Full segments go to the OS as soon as they fill (``fsync=True`` also forces them to disk).
    ``close()`` seals what is buffered as the final segment; without it the file reads as
    incomplete. Not thread-safe.
    """

    def __init__(
        self,
        file: BinaryIO,
        data_key: bytes,
        recording_id: str,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        fsync: bool = False,
    ) -> None:
        _check_key(data_key, "data key")
        if not 1 <= segment_bytes <= MAX_SEGMENT_BYTES:
            raise ValueError(f"segment_bytes must be 1..{MAX_SEGMENT_BYTES}, got {segment_bytes}")
        self._file = file
        self._aead = AESGCM(data_key)
        self._id = recording_id
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._prefix = os.urandom(7)
        self._header = _HEADER.pack(MAGIC, FORMAT_VERSION, segment_bytes, self._prefix)
        self._buffer = bytearray()
        self._index = 0
        self.closed = False
        self.plaintext_bytes = 0
        file.write(self._header)
        self._flush()

    @classmethod
    def create(
        cls, path: str | Path, data_key: bytes, recording_id: str, **kwargs: object
    ) -> SegmentWriter:
        """Create ``path`` (it must not exist) and write its header."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        return cls(os.fdopen(fd, "wb"), data_key, recording_id, **kwargs)  # type: ignore[arg-type]

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append plaintext; every full segment is sealed and written now."""
        if self.closed:
            raise ValueError(f"recording {self._id}: write after close")
        self._buffer += data
        self.plaintext_bytes += len(data)
        while len(self._buffer) >= self._segment_bytes:
            # A segment that exactly ends the data is still non-final: close() adds the final one.
            chunk = bytes(self._buffer[: self._segment_bytes])
            del self._buffer[: self._segment_bytes]
            self._seal(chunk, final=False)

    def close(self) -> None:
        """Seal the buffered rest as the final segment and close the file."""
        if self.closed:
            return
        self._seal(bytes(self._buffer), final=True)
        self._buffer.clear()
        self.closed = True
        self._file.close()

    def abandon(self) -> None:
        """Close the file without a final segment (what a crash leaves, for tests and aborts)."""
        self.closed = True
        self._file.close()

    def _seal(self, chunk: bytes, *, final: bool) -> None:
        if self._index > 0xFFFFFFFF:
            raise ValueError(f"recording {self._id}: too many segments")
        sealed = self._aead.encrypt(
            _nonce(self._prefix, self._index, final), chunk,
            _segment_ad(self._header, self._id, self._index, final),
        )
        self._file.write(_LEN.pack(len(sealed)) + sealed)
        self._index += 1
        self._flush()

    def _flush(self) -> None:
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())


class SegmentReader:
    """Reads and authenticates an encrypted recording, segment by segment.

    Iterating yields plaintext chunks, each authenticated before it is yielded. A modified file
    raises TamperedRecording; a file without its final segment raises IncompleteRecording after
    every complete segment has been yielded.
    """

    def __init__(self, file: BinaryIO, data_key: bytes, recording_id: str) -> None:
        _check_key(data_key, "data key")
        self._file = file
        self._aead = AESGCM(data_key)
        self._id = recording_id
        header = file.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES:
            raise IncompleteRecording(
                f"recording {recording_id}: file ends inside its header", 0, 0, len(header)
            )
        magic, version, segment_bytes, prefix = _HEADER.unpack(header)
        if magic != MAGIC or version != FORMAT_VERSION or header[-1] != 0:
            raise TamperedRecording(f"recording {recording_id}: not an edgecc recording (v1)")
        if not 1 <= segment_bytes <= MAX_SEGMENT_BYTES:
            raise TamperedRecording(f"recording {recording_id}: bad segment size {segment_bytes}")
        self._header = header
        self._prefix = prefix
        self.segment_bytes = segment_bytes
        self.segments = 0
        """Complete segments read so far."""
        self.plaintext_bytes = 0
        self.complete = False
        """True once the final segment has been authenticated."""
        self.end_offset = HEADER_BYTES
        """File offset just past the last authentic segment."""

    @classmethod
    def open(cls, path: str | Path, data_key: bytes, recording_id: str) -> SegmentReader:
        return cls(open(path, "rb"), data_key, recording_id)  # noqa: SIM115 - closed by close()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        limit = self.segment_bytes + TAG_BYTES
        while not self.complete:
            raw_len = self._file.read(_LEN.size)
            if len(raw_len) < _LEN.size:
                self._incomplete(len(raw_len))
            (length,) = _LEN.unpack(raw_len)
            if not TAG_BYTES <= length <= limit:
                raise TamperedRecording(
                    f"recording {self._id}: segment {self.segments} claims {length} bytes "
                    f"(at most {limit})"
                )
            sealed = self._file.read(length)
            if len(sealed) < length:
                self._incomplete(_LEN.size + len(sealed))
            index = self.segments
            chunk = self._open(sealed, index, final=False)
            if chunk is None:
                chunk = self._open(sealed, index, final=True)
                if chunk is None:
                    raise TamperedRecording(
                        f"recording {self._id}: segment {index} at offset {self.end_offset} "
                        "fails authentication (modified, reordered, or another recording's)"
                    )
                self.complete = True
            elif length - TAG_BYTES != self.segment_bytes:
                raise TamperedRecording(f"recording {self._id}: short non-final segment {index}")
            self.segments += 1
            self.plaintext_bytes += len(chunk)
            self.end_offset += _LEN.size + length
            yield chunk
        if self._file.read(1):
            raise TamperedRecording(f"recording {self._id}: data after the final segment")

    def read_all(self) -> bytes:
        """The whole plaintext; raises like iteration does."""
        return b"".join(self)

    def _open(self, sealed: bytes, index: int, *, final: bool) -> bytes | None:
        try:
            return self._aead.decrypt(
                _nonce(self._prefix, index, final), sealed,
                _segment_ad(self._header, self._id, index, final),
            )
        except InvalidTag:
            return None

    def _incomplete(self, torn: int) -> None:
        raise IncompleteRecording(
            f"recording {self._id}: no final segment after {self.segments} complete segments "
            f"({self.plaintext_bytes} bytes; {torn} torn bytes dropped): the writer stopped "
            "(crash) or the file was cut short",
            self.segments, self.plaintext_bytes, torn,
        )


def seal_incomplete(path: str | Path, data_key: bytes, recording_id: str) -> int:
    """Make a crashed writer's file whole: drop its torn tail, append an empty final segment.

    Returns the number of plaintext bytes kept. Raises TamperedRecording if an earlier segment
    does not authenticate; a complete file is left as it is.
    """
    with SegmentReader.open(path, data_key, recording_id) as reader:
        try:
            for _ in reader:
                pass
            return reader.plaintext_bytes
        except IncompleteRecording:
            pass
        index, end, kept, header = reader.segments, reader.end_offset, reader.plaintext_bytes, (
            reader._header
        )
        prefix = reader._prefix
    sealed = AESGCM(data_key).encrypt(
        _nonce(prefix, index, True), b"", _segment_ad(header, recording_id, index, True)
    )
    with open(path, "r+b") as f:
        f.truncate(end)
        f.seek(end)
        f.write(_LEN.pack(len(sealed)) + sealed)
        f.flush()
        os.fsync(f.fileno())
    return kept

