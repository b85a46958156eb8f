"""HOTP (RFC 4226) and TOTP (RFC 6238) against the RFCs' own test vectors."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from appliance.api import totp

# RFC 4226 Appendix D: secret "12345678901234567890", counters 0..9, 6 digits.
HOTP_SECRET = b"12345678901234567890"
HOTP_VECTORS = ["755224", "287082", "359152", "969429", "338314",
                "254676", "287922", "162583", "399871", "520489"]

# RFC 6238 Appendix B: 8 digits, X = 30, T0 = 0. The seed is the ASCII digits "1234567890"
# repeated to 20 bytes for SHA-1, 32 for SHA-256 and 64 for SHA-512 (the reference code's seeds).
SEEDS = {"SHA1": b"12345678901234567890",
         "SHA256": b"12345678901234567890123456789012",
         "SHA512": b"1234567890123456789012345678901234567890123456789012345678901234"}
TOTP_VECTORS = [  # (time, T as hex, SHA1, SHA256, SHA512)
    (59, "0000000000000001", "94287082", "46119246", "90693936"),
    (1111111109, "00000000023523EC", "07081804", "68084774", "25091201"),
    (1111111111, "00000000023523ED", "14050471", "67062674", "99943326"),
    (1234567890, "000000000273EF07", "89005924", "91819424", "93441116"),
    (2000000000, "0000000003F940AA", "69279037", "90698825", "38618901"),
    (20000000000, "0000000027BC86AA", "65353130", "77737706", "47863826"),
]


@pytest.mark.parametrize(("counter", "expected"), list(enumerate(HOTP_VECTORS)))
def test_hotp_rfc4226_appendix_d(counter: int, expected: str) -> None:
    assert totp.hotp(HOTP_SECRET, counter) == expected


@pytest.mark.parametrize(("at", "step_hex", *SEEDS), TOTP_VECTORS)
def test_totp_rfc6238_appendix_b(at: int, step_hex: str, SHA1: str, SHA256: str,
                                 SHA512: str) -> None:
    assert totp.time_step(at) == int(step_hex, 16)
    for algorithm, expected in (("SHA1", SHA1), ("SHA256", SHA256), ("SHA512", SHA512)):
        assert totp.totp(SEEDS[algorithm], at, digits=8, algorithm=algorithm) == expected


def test_match_step_accepts_one_step_of_drift_once() -> None:
    secret = totp.new_secret()
    now = 1_700_000_015.0
    step = totp.time_step(now)
    for offset in (-1, 0, 1):
        code = totp.hotp(secret, step + offset)
        assert totp.match_step(secret, code, now) == step + offset
        # Already used (or an earlier step used): refused.
        assert totp.match_step(secret, code, now, after_step=step + offset) is None
    assert totp.match_step(secret, totp.hotp(secret, step + 2), now) is None
    assert totp.match_step(secret, totp.hotp(secret, step - 2), now) is None
    for garbage in ("", "12345", "1234567", "12a456", "١٢٣٤٥٦"):
        assert totp.match_step(secret, garbage, now) is None


def test_secret_round_trips_through_base32_and_the_uri() -> None:
    secret = totp.new_secret()
    assert len(secret) == totp.SECRET_BYTES
    text = totp.secret_to_base32(secret)
    assert "=" not in text and totp.secret_from_base32(text.lower()) == secret
    uri = urlsplit(totp.otpauth_uri(secret, "ada@paris"))
    assert (uri.scheme, uri.netloc, uri.path) == ("otpauth", "totp", "/edgecc:ada@paris")
    query = parse_qs(uri.query)
    assert query["secret"] == [text] and query["issuer"] == ["edgecc"]
    assert query["digits"] == ["6"] and query["period"] == ["30"]
    with pytest.raises(ValueError):
        totp.secret_from_base32("not base32!")


def test_bad_parameters_are_api_misuse() -> None:
    with pytest.raises(ValueError):
        totp.hotp(HOTP_SECRET, -1)
    with pytest.raises(ValueError):
        totp.hotp(HOTP_SECRET, 0, digits=5)


# --------------------------------------------------------------------------- sealing at rest


def test_sealed_secrets_open_only_with_the_same_key_and_user() -> None:
    site_key = bytes(range(32))
    key = totp.secret_key(site_key)
    assert key != site_key and len(key) == 32
    assert totp.secret_key(site_key) == key  # derived, not random
    secret = totp.new_secret()
    sealed = totp.seal_secret(key, 7, secret)
    assert totp.is_sealed(sealed) and not totp.is_sealed(totp.secret_to_base32(secret))
    assert totp.seal_secret(key, 7, secret) != sealed  # a fresh nonce each time
    assert totp.open_secret(key, 7, sealed) == secret
    with pytest.raises(totp.SecretSealError):
        totp.open_secret(key, 8, sealed)  # moved to another user's row
    with pytest.raises(totp.SecretSealError):
        totp.open_secret(totp.secret_key(bytes(32)), 7, sealed)  # another site's key
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    for bad in (flipped, sealed[:10], totp.SEALED_PREFIX + "!!!", "JBSWY3DPEHPK3PXP"):
        with pytest.raises(totp.SecretSealError):
            totp.open_secret(key, 7, bad)
    with pytest.raises(ValueError, match="32 bytes"):
        totp.secret_key(b"short")
