"""Password hashing for API users: scrypt (RFC 7914), parameters stored with each hash.

The stored form is ``scrypt$N$r$p$SALT$HASH`` (salt and hash in unpadded base64), so the cost can
be raised later while old hashes still verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# RFC 7914 §2: N = 2^15 with r = 8 costs 32 MiB and tens of milliseconds per guess; p = 1.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MIN_PASSWORD_CHARS = 10
MAX_PASSWORD_CHARS = 1024


class PasswordPolicyError(ValueError):
    """The password is not acceptable; the message says why."""


def check_policy(password: str) -> None:
    """Raise PasswordPolicyError unless ``password`` is long enough and printable."""
    if len(password) < MIN_PASSWORD_CHARS:
        raise PasswordPolicyError(f"password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise PasswordPolicyError(f"password must have at most {MAX_PASSWORD_CHARS} characters")
    if any(not ch.isprintable() for ch in password):
        raise PasswordPolicyError("password must not contain control characters")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p,
                          maxmem=256 * r * n + (1 << 20), dklen=HASH_BYTES)


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """The stored form of ``password`` with a fresh random salt."""
    salt = secrets.token_bytes(SALT_BYTES)
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(_scrypt(password, salt, n, r, p))}"


def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison)."""
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), int(n), int(r), int(p))
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


_DUMMY: list[str] = []


def burn_verify(password: str) -> None:
    """Spend the time of one verification without a user, so an unknown name answers as slowly
    as a wrong password."""
    if not _DUMMY:
        _DUMMY.append(hash_password(secrets.token_urlsafe(16)))
    verify_password(password, _DUMMY[0])
