"""One-time passwords for two-factor logins: HOTP (RFC 4226) and TOTP (RFC 6238).

Authenticator apps read the shared secret from an ``otpauth://totp/...`` URI (shown as a QR
code or typed in as base32). The defaults are those every app supports: SHA-1, 6 digits, 30 s.

At rest the secret is sealed (:func:`seal_secret`): AES-256-GCM under a key derived from the
site key with HKDF-SHA-256 (RFC 5869), with the user id as associated data, so a sealed secret
copied to another user's row does not open, and a database copied without ``site.key`` yields
no secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import struct
from urllib.parse import quote, urlencode

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SECRET_BYTES = 20
"""RFC 4226 §4 R6: at least 128 bits, 160 recommended (the HMAC-SHA-1 output length)."""
STEP_S = 30
"""RFC 6238 §5.2: the recommended time step X."""
DIGITS = 6
DRIFT_STEPS = 1
"""Steps accepted either side of now (RFC 6238 §5.2: at most one step of network delay and
clock drift is the recommended allowance)."""

_DIGESTS = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256, "SHA512": hashlib.sha512}


def new_secret() -> bytes:
    """A fresh random shared secret."""
    return secrets.token_bytes(SECRET_BYTES)


def secret_to_base32(secret: bytes) -> str:
    """The secret as authenticator apps take it: base32 without padding."""
    return base64.b32encode(secret).decode("ascii").rstrip("=")


def secret_from_base32(text: str) -> bytes:
    """Inverse of :func:`secret_to_base32` (spaces and case ignored); ValueError when invalid."""
    clean = text.replace(" ", "").upper()
    try:
        return base64.b32decode(clean + "=" * (-len(clean) % 8))
    except ValueError as exc:  # binascii.Error is a ValueError
        raise ValueError("not a base32 TOTP secret") from exc


def hotp(secret: bytes, counter: int, *, digits: int = DIGITS, algorithm: str = "SHA1") -> str:
    """RFC 4226 §5.3 HOTP value of ``counter`` as a zero-padded decimal string."""
    if not 6 <= digits <= 10:
        raise ValueError(f"digits must be from 6 to 10, got {digits}")
    if not 0 <= counter < 2**64:
        raise ValueError(f"counter must fit 8 bytes, got {counter}")
    mac = hmac.new(secret, struct.pack(">Q", counter), _DIGESTS[algorithm]).digest()
    # §5.3 dynamic truncation: the low nibble of the last byte picks 4 bytes, top bit masked.
    offset = mac[-1] & 0x0F
    code = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(code % 10**digits).zfill(digits)


def time_step(now: float, *, step: int = STEP_S, t0: int = 0) -> int:
    """RFC 6238 §4.2 T = floor((unix time − T0) / X)."""
    return math.floor((now - t0) / step)


def totp(secret: bytes, now: float, *, digits: int = DIGITS, step: int = STEP_S,
         algorithm: str = "SHA1") -> str:
    """RFC 6238 TOTP value at ``now`` (Unix seconds)."""
    return hotp(secret, time_step(now, step=step), digits=digits, algorithm=algorithm)


def match_step(secret: bytes, code: str, now: float, *, after_step: int | None = None,
               drift: int = DRIFT_STEPS, digits: int = DIGITS, step: int = STEP_S) -> int | None:
    """The time step whose code is ``code`` within ``drift`` steps of ``now``, or None.

    Steps at or before ``after_step`` (the last one used) are refused: RFC 6238 §5.2 requires
    that a code is accepted once only.
    """
    if len(code) != digits or not code.isascii() or not code.isdigit():
        return None
    current = time_step(now, step=step)
    found = None
    for candidate in range(current - drift, current + drift + 1):
        if after_step is not None and candidate <= after_step:
            continue
        # Compare every candidate, in constant time, so timing tells nothing about which matched.
        if hmac.compare_digest(hotp(secret, candidate, digits=digits), code) and found is None:
            found = candidate
    return found


def otpauth_uri(secret: bytes, account: str, issuer: str = "edgecc") -> str:
    """The ``otpauth://totp/ISSUER:ACCOUNT?secret=...`` URI authenticator apps import."""
    label = quote(f"{issuer}:{account}", safe=":@")
    query = urlencode({"secret": secret_to_base32(secret), "issuer": issuer,
                       "algorithm": "SHA1", "digits": DIGITS, "period": STEP_S})
    return f"otpauth://totp/{label}?{query}"


# --------------------------------------------------------------------------- secrets at rest

SEALED_PREFIX = "v1$"
"""Marks a sealed secret; base32 (a plain secret) never contains ``$``."""
_SEAL_INFO = b"edgecc totp secret v1"
_NONCE_BYTES = 12
SITE_KEY_BYTES = 32


class SecretSealError(ValueError):
    """A sealed secret that does not open with this key and user id (tampered, moved, or a
    different site key)."""


def secret_key(site_key: bytes) -> bytes:
    """The AES-256 key for TOTP secrets: HKDF-SHA-256 of the site key (RFC 5869 §2), so the
    site key itself never encrypts anything but recording keys."""
    if len(site_key) != SITE_KEY_BYTES:
        raise ValueError(f"site key must be {SITE_KEY_BYTES} bytes, got {len(site_key)}")
    return HKDF(algorithm=SHA256(), length=32, salt=None, info=_SEAL_INFO).derive(site_key)


def _seal_ad(user_id: int) -> bytes:
    return _SEAL_INFO + b"\x00" + str(int(user_id)).encode("ascii")


def is_sealed(stored: str) -> bool:
    """Whether a stored secret is sealed (else it is plain base32 from before sealing)."""
    return stored.startswith(SEALED_PREFIX)


def seal_secret(key: bytes, user_id: int, secret: bytes) -> str:
    """``secret`` encrypted for storage in user ``user_id``'s row (``key`` from
    :func:`secret_key`): ``v1$`` + base64url(nonce ‖ ciphertext ‖ tag)."""
    nonce = secrets.token_bytes(_NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, secret, _seal_ad(user_id))
    return SEALED_PREFIX + base64.urlsafe_b64encode(nonce + sealed).decode("ascii")


def open_secret(key: bytes, user_id: int, stored: str) -> bytes:
    """Inverse of :func:`seal_secret`; SecretSealError when it does not open."""
    if not is_sealed(stored):
        raise SecretSealError("not a sealed TOTP secret")
    try:
        raw = base64.urlsafe_b64decode(stored[len(SEALED_PREFIX):].encode("ascii"))
    except ValueError as exc:
        raise SecretSealError("sealed TOTP secret is not base64") from exc
    if len(raw) < _NONCE_BYTES + 16:
        raise SecretSealError("sealed TOTP secret is too short")
    try:
        return AESGCM(key).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _seal_ad(user_id))
    except InvalidTag:
        raise SecretSealError(f"the TOTP secret of user {user_id} does not open with this "
                              "site key") from None
