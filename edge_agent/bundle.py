"""Backup bundles: one encrypted, authenticated file holding everything a site needs to restart.

What goes in (a tar stream, docs/backups.md):

- an online copy of the site database, made with SQLite's backup API (consistent while the
  appliance writes; the WAL is not copied);
- every other file of the site directory: ``site.yaml`` and what it names (TLS certificate
  and key, the site key, prompts, flows) and the recordings directory, whose files are already
  encrypted and are copied as they are.

Left out: the database's own files (replaced by the online copy), the site's cloud identity
(``cloud/``: a restored machine enrols for itself), and this module's and the config push's
scratch directories.

File layout::

    magic "EDGECCB1" | header length u32 LE | header (JSON, UTF-8) | sealed body

The header names the site, the backup id, the time, a random salt, and ``escrow``: the site key
encrypted for the cloud CA's public key (ECIES: ephemeral ECDH P-256, HKDF-SHA256,
AES-256-GCM). The body is the tar stream sealed with the segmented AES-256-GCM STREAM format of
recordings (``appliance.recording.crypto``) under the *backup key* HKDF-SHA256(site key, salt,
"edgecc backup v1" + site id), with the SHA-256 of the outer header as the stream's associated
id: changing the header, reordering, dropping, duplicating or cutting segments, or appending
data all fail authentication, and a cut file is reported as incomplete.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import sqlite3
import struct
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from appliance.recording.crypto import (
    KEY_BYTES,
    IncompleteRecording,
    SegmentReader,
    SegmentWriter,
    TamperedRecording,
)

__all__ = [
    "BUNDLE_MAGIC",
    "BundleError",
    "BundleHeader",
    "RestoreToken",
    "SCRATCH_DIRS",
    "TamperedBundle",
    "backup_key",
    "escrow_of",
    "make_bundle",
    "open_escrow",
    "read_header",
    "seal_escrow",
    "unpack_bundle",
]

BUNDLE_MAGIC = b"EDGECCB1"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
"""Largest header a reader accepts (its buffer limit)."""
SEGMENT_BYTES = 256 * 1024
"""Plaintext per sealed segment of the body."""
DB_ENTRY = "database/site.db"
"""Where the online copy of the database sits in the tar stream."""
SITE_PREFIX = "site/"
SCRATCH_DIRS = (".edgecc-backup", ".edgecc-config-staging", ".edgecc-restore")
"""Working directories inside a site directory that never go into a bundle."""
EXCLUDED_DIRS = ("cloud",)
"""The site's cloud identity: a restored machine enrols with a certificate of its own."""
_BACKUP_INFO = b"edgecc backup v1\x00"
_ESCROW_INFO = b"edgecc backup escrow v1\x00"
_ESCROW_VERSION = 1
_POINT_BYTES = 65  # uncompressed P-256 point


class BundleError(Exception):
    """A bundle cannot be made or read (missing file, unreadable database, bad key)."""


class TamperedBundle(BundleError):
    """The bundle was modified, cut short, or does not open with this key; nothing was kept."""


@dataclass(frozen=True)
class BundleHeader:
    """The authenticated outer header of a bundle."""

    site_id: str
    backup_id: str
    created_at: float
    salt: bytes
    escrow: bytes
    """The site key sealed for the cloud CA (see ``seal_escrow``)."""
    raw: bytes
    """The header bytes as stored (its SHA-256 binds the body)."""

    @property
    def body_id(self) -> str:
        """The associated id of the sealed body: changes with any byte of the header."""
        return "backup:" + hashlib.sha256(self.raw).hexdigest()


# ---------------------------------------------------------------- keys


def backup_key(site_key: bytes, salt: bytes, site_id: str) -> bytes:
    """The AES-256 key of one bundle, derived from the site key (HKDF-SHA256, RFC 5869)."""
    if len(site_key) != KEY_BYTES:
        raise BundleError(f"the site key must be {KEY_BYTES} bytes, got {len(site_key)}")
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt,
        info=_BACKUP_INFO + site_id.encode("utf-8"),
    ).derive(site_key)


def _escrow_key(shared: bytes, ephemeral: bytes, site_id: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=ephemeral,
        info=_ESCROW_INFO + site_id.encode("utf-8"),
    ).derive(shared)


def seal_escrow(ca_certificate_pem: bytes, site_key: bytes, site_id: str) -> bytes:
    """The site key encrypted so that only the holder of the cloud CA's private key opens it.

    ECIES over P-256: an ephemeral key pair, ECDH with the CA's public key, HKDF-SHA256 bound to
    the site id, AES-256-GCM. Layout: version u8 | ephemeral point (65 B) | nonce (12 B) |
    ciphertext + tag.
    """
    public = x509.load_pem_x509_certificate(ca_certificate_pem).public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise BundleError("the cloud CA's key is not an EC key: cannot seal the escrow")
    ephemeral = ec.generate_private_key(public.curve)
    point = ephemeral.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key = _escrow_key(ephemeral.exchange(ec.ECDH(), public), point, site_id)
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, site_key, site_id.encode("utf-8"))
    return bytes([_ESCROW_VERSION]) + point + nonce + sealed


def open_escrow(private_key: ec.EllipticCurvePrivateKey, escrow: bytes, site_id: str) -> bytes:
    """The site key from ``seal_escrow``'s output; TamperedBundle when it does not open."""
    if len(escrow) != 1 + _POINT_BYTES + 12 + KEY_BYTES + 16 or escrow[0] != _ESCROW_VERSION:
        raise TamperedBundle("the bundle's escrow has an unknown format")
    point = escrow[1 : 1 + _POINT_BYTES]
    nonce = escrow[1 + _POINT_BYTES : 13 + _POINT_BYTES]
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, point)
        key = _escrow_key(private_key.exchange(ec.ECDH(), peer), point, site_id)
        return AESGCM(key).decrypt(nonce, escrow[13 + _POINT_BYTES :], site_id.encode("utf-8"))
    except Exception as exc:  # InvalidTag, or a point not on the curve
        raise TamperedBundle(f"the bundle's escrow does not open with this CA key ({exc!r})") from None


# ---------------------------------------------------------------- writing


class _SealingSink(io.RawIOBase):
    """A write-only file object feeding a SegmentWriter (tarfile writes into it)."""

    def __init__(self, writer: SegmentWriter) -> None:
        self._writer = writer

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        self._writer.write(data)
        return len(data)


def _header_bytes(site_id: str, backup_id: str, created_at: float, salt: bytes,
                  escrow: bytes) -> bytes:
    return json.dumps(
        {"format": FORMAT_VERSION, "site_id": site_id, "backup_id": backup_id,
         "created_at": created_at, "salt": base64.b64encode(salt).decode(),
         "escrow": base64.b64encode(escrow).decode()},
        sort_keys=True, separators=(",", ":"),
    ).encode()


def _site_files(site_dir: Path, database: Path) -> Iterator[Path]:
    """Files of the site directory that belong in a bundle, in a stable order."""
    skip_names = {database.name, f"{database.name}-wal", f"{database.name}-shm",
                  f"{database.name}-journal"}
    db_dir = database.parent.resolve()
    for root, dirs, files in os.walk(site_dir):
        here = Path(root)
        if here == site_dir:
            dirs[:] = [d for d in dirs if d not in SCRATCH_DIRS + EXCLUDED_DIRS]
        dirs.sort()
        for name in sorted(files):
            if here.resolve() == db_dir and name in skip_names:
                continue
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # a file being written atomically by someone else
            yield here / name


def make_bundle(
    site_dir: Path | str, database: Path | str, out: Path | str, *, site_id: str,
    backup_id: str, site_key: bytes, ca_certificate_pem: bytes, now: float | None = None,
) -> BundleHeader:
    """Write the bundle of a site to ``out`` (which must not exist); return its header.

    The database copy is made with SQLite's online backup API, so the appliance may keep
    writing. Raises BundleError (and leaves no ``out``) when something cannot be read.
    """
    directory = Path(site_dir)
    db_path = Path(database)
    target = Path(out)
    salt = os.urandom(16)
    escrow = seal_escrow(ca_certificate_pem, site_key, site_id)
    raw = _header_bytes(site_id, backup_id, time.time() if now is None else now, salt, escrow)
    header = _parse_header(raw)
    scratch = target.with_name(f".{target.name}.db")
    try:
        _online_copy(db_path, scratch)
        with open(target, "xb") as handle:
            handle.write(BUNDLE_MAGIC + struct.pack("<I", len(raw)) + raw)
            writer = SegmentWriter(handle, backup_key(site_key, salt, site_id), header.body_id,
                                   segment_bytes=SEGMENT_BYTES)
            with tarfile.open(fileobj=_SealingSink(writer), mode="w|",  # type: ignore[arg-type]
                              format=tarfile.PAX_FORMAT) as tar:
                tar.add(scratch, arcname=DB_ENTRY)
                for path in _site_files(directory, db_path):
                    relative = path.relative_to(directory).as_posix()
                    try:
                        tar.add(path, arcname=SITE_PREFIX + relative, recursive=False)
                    except FileNotFoundError:
                        continue  # removed while we walked (e.g. a temporary file)
            writer.close()  # seals the final segment and closes the file
        with open(target, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if isinstance(exc, OSError | sqlite3.Error):
            raise BundleError(f"cannot make the backup bundle: {exc}") from exc
        raise
    finally:
        scratch.unlink(missing_ok=True)
    return header


def _online_copy(database: Path, out: Path) -> None:
    """A consistent copy of a live SQLite database (the backup API copes with writers)."""
    if not database.exists():
        raise BundleError(f"site database {database} does not exist")
    out.unlink(missing_ok=True)
    source = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10.0)
    try:
        target = sqlite3.connect(str(out))
        try:
            source.backup(target, pages=1024)
        finally:
            target.close()
    finally:
        source.close()


# ---------------------------------------------------------------- reading


def _parse_header(raw: bytes) -> BundleHeader:
    try:
        data = json.loads(raw)
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {data.get('format')!r}")
        return BundleHeader(
            site_id=str(data["site_id"]), backup_id=str(data["backup_id"]),
            created_at=float(data["created_at"]), salt=base64.b64decode(data["salt"]),
            escrow=base64.b64decode(data["escrow"]), raw=raw,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TamperedBundle(f"not an edgecc backup bundle header: {exc}") from None


def read_header(handle: BinaryIO) -> BundleHeader:
    """Read and parse the outer header (not yet authenticated: the body check does that)."""
    start = handle.read(len(BUNDLE_MAGIC) + 4)
    if len(start) < len(BUNDLE_MAGIC) + 4 or start[: len(BUNDLE_MAGIC)] != BUNDLE_MAGIC:
        raise TamperedBundle("not an edgecc backup bundle (bad magic or cut short)")
    (length,) = struct.unpack("<I", start[len(BUNDLE_MAGIC) :])
    if not 0 < length <= MAX_HEADER_BYTES:
        raise TamperedBundle(f"bundle header of {length} bytes (at most {MAX_HEADER_BYTES})")
    raw = handle.read(length)
    if len(raw) < length:
        raise TamperedBundle("bundle cut short inside its header")
    return _parse_header(raw)


class _OpeningSource(io.RawIOBase):
    """A read-only file object over the authenticated plaintext of a SegmentReader."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        size = min(len(target), len(self._buffer))
        target[:size] = self._buffer[:size]
        self._buffer = self._buffer[size:]
        return size

    def drain(self) -> bool:
        """Read to the end (authenticating the rest); True when only tar's zero padding was left."""
        clean = not self._buffer.strip(b"\0")
        self._buffer = b""
        for chunk in self._chunks:
            clean = clean and not chunk.strip(b"\0")
        return clean


def unpack_bundle(
    bundle: Path | str, site_key: bytes, target: Path | str, *, site_id: str | None = None,
) -> BundleHeader:
    """Verify a bundle and unpack it into ``target`` (created; it must not exist).

    ``target`` receives ``site/`` (the site directory's files) and ``database/site.db`` (the
    database copy); the caller moves them into place once this returned. Raises
    TamperedBundle, with ``target`` removed, when any byte is wrong or missing.
    """
    out = Path(target)
    out.mkdir(mode=0o700)
    try:
        with open(bundle, "rb") as handle:
            header = read_header(handle)
            if site_id is not None and header.site_id != site_id:
                raise TamperedBundle(
                    f"the bundle is of site {header.site_id!r}, not {site_id!r}"
                )
            reader = SegmentReader(handle, backup_key(site_key, header.salt, header.site_id),
                                   header.body_id)
            source = _OpeningSource(iter(reader))
            with tarfile.open(fileobj=source, mode="r|") as tar:  # type: ignore[arg-type]
                for member in tar:
                    name = member.name
                    if name != DB_ENTRY and not name.startswith(SITE_PREFIX):
                        raise TamperedBundle(f"unexpected entry {name!r} in the bundle")
                    # The "data" filter refuses absolute paths, .., links out and devices.
                    tar.extract(member, out, filter="data")
            if not source.drain():
                raise TamperedBundle("data after the end of the bundle's archive")
            if not reader.complete:
                raise TamperedBundle("the bundle ends before its final segment (cut short)")
            if handle.read(1):
                raise TamperedBundle("bytes after the bundle's final segment")
    except IncompleteRecording as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise TamperedBundle(f"the bundle is cut short: {exc}") from None
    except TamperedRecording as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise TamperedBundle(f"the bundle fails authentication: {exc}") from None
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(out, ignore_errors=True)
        raise TamperedBundle(f"the bundle's archive is unreadable: {exc}") from None
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return header


def escrow_of(bundle: Path | str) -> BundleHeader:
    """The header of a bundle file (for the cloud, which never holds the key)."""
    with open(bundle, "rb") as handle:
        return read_header(handle)



# ---------------------------------------------------------------- restore tokens

RESTORE_TOKEN_PREFIX = "edgecc-restore-1."


@dataclass(frozen=True)
class RestoreToken:
    """What a new machine needs to become a site again, issued by the cloud.

    A secret: it carries a one-time enrolment token for the site, the site key (taken from the
    newest backup's escrow by the cloud CA) and the cloud CA certificate to trust.
    """

    enrol_token: str
    site_id: str
    site_key: bytes
    ca_certificate_pem: bytes
    backup_id: str = ""
    """The backup the token was made from ('' : the newest at restore time)."""

    def encode(self) -> str:
        """The text to hand to ``edgecc restore --token``."""
        ca = x509.load_pem_x509_certificate(self.ca_certificate_pem).public_bytes(
            serialization.Encoding.DER
        )
        body = json.dumps(
            {"t": self.enrol_token, "s": self.site_id, "b": self.backup_id,
             "k": base64.b64encode(self.site_key).decode(), "c": base64.b64encode(ca).decode()},
            separators=(",", ":"),
        ).encode()
        return RESTORE_TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> RestoreToken:
        """Parse a token; ValueError with a clear message when it is not one."""
        text = text.strip()
        if not text.startswith(RESTORE_TOKEN_PREFIX):
            raise ValueError("not an edgecc restore token (from `edgecc cloud restore-token`)")
        raw = text[len(RESTORE_TOKEN_PREFIX) :]
        try:
            body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
            ca = x509.load_der_x509_certificate(base64.b64decode(body["c"]))
            token = cls(
                enrol_token=str(body["t"]), site_id=str(body["s"]),
                site_key=base64.b64decode(body["k"]),
                ca_certificate_pem=ca.public_bytes(serialization.Encoding.PEM),
                backup_id=str(body.get("b", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"the restore token is damaged ({exc}); copy it again") from None
        if len(token.site_key) != KEY_BYTES:
            raise ValueError("the restore token is damaged (site key of the wrong size)")
        return token
