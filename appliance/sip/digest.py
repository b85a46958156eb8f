"""HTTP Digest authentication for SIP (RFC 3261 §22, RFC 7616 semantics, RFC 8760 algorithms).

The challenge offers SHA-256 first and MD5 second, both with ``qop="auth"`` (RFC 8760 §2.4:
a UAS lists its preferred algorithm first; RFC 3261 §22.4 keeps MD5 for older phones).

Nonces are stateless-verifiable: each one carries the time it was issued, a serial number and a
keyed MAC over both, so any nonce this authenticator made can be checked without storing it, and
a nonce older than ``nonce_ttl`` is stale. The only per-nonce state is the highest nonce-count seen
(RFC 7616 §3.4: a repeated or lower ``nc`` is a replay), kept in a bounded table.

Accounts hold HA1 values only (``H(user:realm:password)`` for MD5 and SHA-256), never a
password. A request naming an unknown user is checked against a secret per-user stand-in HA1,
so its failure takes the same path and gives the same answer as a wrong password.

This module is sans-IO: time is passed in as ``now`` (seconds, any monotonic origin).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "ALGORITHMS",
    "AuthResult",
    "Credentials",
    "DigestAuthenticator",
    "HasHa1",
    "MD5_FIRST_USER_AGENTS",
    "answer_challenge",
    "authorization_from_ha1",
    "compute_ha1",
    "parse_challenge",
    "parse_credentials",
]

#: Algorithms offered, in order of preference (RFC 8760 §2.4).
ALGORITHMS: tuple[str, ...] = ("SHA-256", "MD5")

#: User-Agent substrings (case-insensitive) of clients that answer only the first challenge
#: and support only MD5 there, so they fail outright when SHA-256 comes first. They get MD5
#: first; the offer is otherwise the same. SIPp 3.6 (``[authentication]``) is one.
MD5_FIRST_USER_AGENTS: tuple[str, ...] = ("sipp",)

_HASHES = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}

# Bounds on what a peer can make us hold or parse.
_MAX_AUTH_HEADER = 4096
_MAX_AUTH_PARAMS = 32
_MAX_NC_ENTRIES = 200_000

_NONCE_SERIAL = 6
_NONCE_MAC = 12
_NONCE_LEN = 8 + _NONCE_SERIAL + _NONCE_MAC

_PARAM = r'\s*([A-Za-z0-9_.!%*+`\'~-]+)\s*=\s*("[^"\\]*(?:\\.[^"\\]*)*"|[^\s,"]*)\s*'
_PARAM_RE = re.compile(_PARAM + r"(?:,|$)")
_QUOTED_PAIR_RE = re.compile(r"\\(.)")


def compute_ha1(user: str, realm: str, password: str, algorithm: str = "MD5") -> str:
    """Return HA1 = H(user:realm:password) as lower-case hex (RFC 7616 §3.4.2)."""
    try:
        digest = _HASHES[algorithm.upper()]
    except KeyError:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}") from None
    return digest(f"{user}:{realm}:{password}".encode()).hexdigest()


class HasHa1(Protocol):
    """What the authenticator needs from an account: its two HA1 values (hex)."""

    ha1_md5: str
    ha1_sha256: str


@dataclass(frozen=True)
class AuthResult:
    """The outcome of checking a request's digest credentials."""

    user: str | None
    """The authenticated user, or None when authentication did not succeed."""
    stale: bool
    """True when the response was right but the nonce had expired (re-challenge with stale=true)."""
    reason: str
    """Short machine-friendly reason: "ok", "no credentials", "stale nonce", "bad response", ..."""
    attempted: bool = False
    """True when the request carried Digest credentials for this realm that failed to verify:
    a guessed password, an unknown user, a replay. The guard counts these as failures."""

    @property
    def ok(self) -> bool:
        """True when the request is authenticated."""
        return self.user is not None


@dataclass(frozen=True)
class Credentials:
    """The parameters of one ``Digest`` Authorization header (RFC 7616 §3.4)."""

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    algorithm: str
    qop: str | None
    nc: str | None
    cnonce: str | None
    opaque: str | None


def parse_credentials(value: str) -> Credentials | None:
    """Parse a ``Digest`` credentials header value.

    Returns None when the scheme is not Digest. Raises ValueError when it is Digest but the
    parameters are malformed or a required one is missing.
    """
    if len(value) > _MAX_AUTH_HEADER:
        raise ValueError("credentials too long")
    text = value.strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() != "digest":
        return None
    params = _auth_params(rest.strip(), "digest")
    for required in ("username", "realm", "nonce", "uri", "response"):
        if required not in params:
            raise ValueError(f"digest parameter {required} missing")
    return Credentials(
        username=params["username"],
        realm=params["realm"],
        nonce=params["nonce"],
        uri=params["uri"],
        response=params["response"].lower(),
        algorithm=params.get("algorithm", "MD5"),
        qop=params.get("qop"),
        nc=params.get("nc"),
        cnonce=params.get("cnonce"),
        opaque=params.get("opaque"),
    )


class DigestAuthenticator:
    """Challenges requests and verifies their digest responses for one realm."""

    def __init__(
        self,
        realm: str,
        accounts: Mapping[str, HasHa1],
        *,
        nonce_ttl: float,
        secret: bytes,
        max_tracked_nonces: int = _MAX_NC_ENTRIES,
        md5_first_user_agents: tuple[str, ...] = MD5_FIRST_USER_AGENTS,
    ) -> None:
        if not secret:
            raise ValueError("secret must not be empty")
        if nonce_ttl <= 0:
            raise ValueError("nonce_ttl must be positive")
        self.realm = realm
        self.accounts = accounts
        self.nonce_ttl = float(nonce_ttl)
        self._secret = bytes(secret)
        self._mac_key = hmac.new(self._secret, b"nonce:" + realm.encode(), hashlib.sha256).digest()
        self._max_tracked = max_tracked_nonces
        # nonce -> (issued_ms, highest nc seen), in order of first use.
        self._nc_seen: OrderedDict[str, tuple[int, int]] = OrderedDict()
        # Nonces issued at or before this time whose nc entry was evicted: stale, never replayable.
        self._evicted_up_to_ms = -1
        self._realm_q = _quote(realm)
        # Nonces differ by a serial number from a random start; the HMAC over it makes them
        # unpredictable without the secret, and os.urandom per challenge is slow on VMs.
        self._serial = int.from_bytes(os.urandom(_NONCE_SERIAL), "big")
        self.md5_first_user_agents = tuple(ua.lower() for ua in md5_first_user_agents if ua)

    # -- nonces -----------------------------------------------------------------------------

    @classmethod
    def from_site(cls, config: Any, *, secret: bytes | None = None) -> DigestAuthenticator:
        """Build the authenticator of a ``SiteConfig`` (random secret unless given).

        With a random secret per start, nonces from before a restart fail verification and
        phones simply get a ``stale=true`` challenge.
        """
        sip = config.sip
        return cls(
            sip.realm,
            {account.user: account for account in sip.accounts},
            nonce_ttl=float(sip.registrar.nonce_ttl),
            secret=secret if secret is not None else os.urandom(32),
        )

    def make_nonce(self, now: float) -> str:
        """Return a fresh nonce stamped with ``now``."""
        self._serial = (self._serial + 1) % (1 << (8 * _NONCE_SERIAL))
        head = struct.pack(">q", int(now * 1000)) + self._serial.to_bytes(_NONCE_SERIAL, "big")
        mac = self._nonce_mac(head)
        return base64.urlsafe_b64encode(head + mac).decode().rstrip("=")

    def _nonce_mac(self, head: bytes) -> bytes:
        # Keyed BLAKE2b is a MAC by design (RFC 7693 §2.5) and, unlike OpenSSL's HMAC here,
        # costs about a microsecond: it runs twice per registration.
        return hashlib.blake2b(head, key=self._mac_key, digest_size=_NONCE_MAC).digest()

    def _nonce_issued_ms(self, nonce: str) -> int | None:
        """The issue time (ms) of a nonce we made, or None if it is not ours."""
        if len(nonce) != 35:  # base64 of _NONCE_LEN bytes without padding
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=")
        except (ValueError, TypeError):
            return None
        if len(raw) != _NONCE_LEN:
            return None
        head, mac = raw[:-_NONCE_MAC], raw[-_NONCE_MAC:]
        good = self._nonce_mac(head)
        if not hmac.compare_digest(mac, good):
            return None
        return struct.unpack(">q", head[:8])[0]

    # -- challenge --------------------------------------------------------------------------

    def challenge(
        self, request: Any = None, now: float = 0.0, *, stale: bool = False, proxy: bool = False
    ) -> list[tuple[str, str]]:
        """Return the challenge headers: SHA-256 first, then MD5, same nonce, ``qop="auth"``.

        The answer never depends on the user named in the request, so every user (known or
        not) sees the same shape. Only a User-Agent listed in ``md5_first_user_agents`` gets
        the two in the other order. ``proxy`` selects Proxy-Authenticate (407) over
        WWW-Authenticate (401).
        """
        name = "Proxy-Authenticate" if proxy else "WWW-Authenticate"
        nonce = self.make_nonce(now)
        tail = ", stale=true" if stale else ""
        order = ALGORITHMS
        if self.md5_first_user_agents and request is not None:
            ua = request.get("User-Agent")
            if ua and any(needle in ua.lower() for needle in self.md5_first_user_agents):
                order = ALGORITHMS[::-1]
        return [
            (
                name,
                f'Digest realm={self._realm_q}, nonce="{nonce}", algorithm={alg}, qop="auth"{tail}',
            )
            for alg in order
        ]

    # -- verification -----------------------------------------------------------------------

    def _pick_credentials(self, request: Any, proxy: bool) -> tuple[Credentials | None, bool]:
        """Return (credentials for our realm, malformed-seen)."""
        header = "Proxy-Authorization" if proxy else "Authorization"
        malformed = False
        for name, value in request.headers:
            # The codec gives header names in their canonical form.
            if name != header:
                continue
            try:
                creds = parse_credentials(value)
            except ValueError:
                malformed = True
                continue
            if creds is not None and creds.realm == self.realm:
                return creds, False
            if creds is not None:
                continue  # credentials for another realm: not ours to judge (RFC 3261 §22.3)
        return None, malformed

    def verify(self, request: Any, now: float, *, proxy: bool = False) -> AuthResult:
        """Check the request's Digest credentials against the accounts."""
        creds, malformed = self._pick_credentials(request, proxy)
        if creds is None:
            if malformed:
                return AuthResult(None, False, "malformed credentials", attempted=True)
            return AuthResult(None, False, "no credentials")
        return self.verify_credentials(creds, request.method or "", request.uri or "", now)

    def verify_credentials(
        self, creds: Credentials, method: str, request_uri: str, now: float
    ) -> AuthResult:
        """Check parsed credentials for a request with this method and Request-URI."""
        algorithm = creds.algorithm.upper()
        digest = _HASHES.get(algorithm)
        if digest is None:
            return AuthResult(None, False, "unsupported algorithm", attempted=True)
        # Only qop=auth is offered; a response without qop would make nc replay checks
        # impossible (RFC 7616 §3.4 makes qop mandatory).
        if creds.qop is None or creds.qop.lower() != "auth" or not creds.cnonce or not creds.nc:
            return AuthResult(None, False, "qop missing", attempted=True)
        if len(creds.nc) != 8:
            return AuthResult(None, False, "bad nonce count", attempted=True)
        try:
            nc = int(creds.nc, 16)
        except ValueError:
            return AuthResult(None, False, "bad nonce count", attempted=True)
        # RFC 7616 §3.4.6 / RFC 2617 §3.2.2.5: the digest-uri must be the Request-URI.
        if creds.uri != request_uri:
            return AuthResult(None, False, "uri mismatch", attempted=True)

        account = self.accounts.get(creds.username)
        if account is not None:
            ha1 = account.ha1_sha256 if algorithm == "SHA-256" else account.ha1_md5
        else:
            # Same work, same outcome as a wrong password: nothing to enumerate.
            ha1 = self._standin_ha1(creds.username, algorithm)
        ha2 = digest(f"{method}:{creds.uri}".encode()).hexdigest()
        expected = digest(
            f"{ha1}:{creds.nonce}:{creds.nc}:{creds.cnonce}:{creds.qop}:{ha2}".encode()
        ).hexdigest()
        correct = hmac.compare_digest(expected, creds.response)
        if not correct or account is None:
            return AuthResult(None, False, "bad response", attempted=True)

        issued_ms = self._nonce_issued_ms(creds.nonce)
        now_ms = int(now * 1000)
        # A nonce that is not ours (e.g. made before a restart with another secret), from the
        # future, or too old: the password was right, so ask again with stale=true (RFC 7616
        # §3.3) and the phone retries without prompting anyone.
        if (
            issued_ms is None
            or issued_ms > now_ms
            or now_ms - issued_ms > self.nonce_ttl * 1000
            or (issued_ms <= self._evicted_up_to_ms and creds.nonce not in self._nc_seen)
        ):
            return AuthResult(None, True, "stale nonce")
        seen = self._nc_seen.get(creds.nonce)
        if seen is not None and nc <= seen[1]:
            return AuthResult(None, False, "nonce count replay", attempted=True)
        self._nc_seen[creds.nonce] = (issued_ms, nc)
        if seen is None:
            self._prune(now_ms)
        return AuthResult(creds.username, False, "ok")

    def _standin_ha1(self, user: str, algorithm: str) -> str:
        mac = hmac.new(self._secret, f"standin:{algorithm}:{user}".encode(), hashlib.sha256)
        return mac.hexdigest()[: 64 if algorithm == "SHA-256" else 32]

    def _prune(self, now_ms: int) -> None:
        """Forget nc entries of expired nonces; evict the oldest past the table bound."""
        ttl_ms = self.nonce_ttl * 1000
        table = self._nc_seen
        while table:
            nonce, (issued_ms, _) = next(iter(table.items()))
            if now_ms - issued_ms > ttl_ms:
                table.popitem(last=False)
            elif len(table) > self._max_tracked:
                table.popitem(last=False)
                self._evicted_up_to_ms = max(self._evicted_up_to_ms, issued_ms)
            else:
                break

    @property
    def tracked_nonces(self) -> int:
        """How many nonces have a nonce-count entry (bounded by ``max_tracked_nonces``)."""
        return len(self._nc_seen)


def parse_challenge(value: str) -> dict[str, str]:
    """Parse a ``Digest`` WWW-/Proxy-Authenticate value into its parameters (names lower-case).

    Raises ValueError when it is not a well-formed Digest challenge.
    """
    scheme, _, rest = value.strip().partition(" ")
    if scheme.lower() != "digest":
        raise ValueError("not a Digest challenge")
    params = _auth_params(rest.strip(), "challenge")
    if "realm" not in params or "nonce" not in params:
        raise ValueError("challenge without realm or nonce")
    return params


def answer_challenge(
    challenge: str,
    *,
    method: str,
    uri: str,
    username: str,
    password: str,
    nc: int = 1,
    cnonce: str | None = None,
) -> str:
    """Build the Authorization value answering one Digest challenge with ``qop=auth``.

    This is the client side for a test phone; the appliance itself holds HA1 only and uses
    ``authorization_from_ha1``.
    """
    params = parse_challenge(challenge)
    algorithm = params.get("algorithm", "MD5")
    if algorithm.upper() not in _HASHES:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    ha1 = compute_ha1(username, params["realm"], password, algorithm)
    return authorization_from_ha1(
        params, method=method, uri=uri, username=username, ha1=ha1, nc=nc, cnonce=cnonce
    )


def authorization_from_ha1(
    params: Mapping[str, str],
    *,
    method: str,
    uri: str,
    username: str,
    ha1: str,
    nc: int = 1,
    cnonce: str | None = None,
) -> str:
    """The Authorization value for a parsed challenge (``parse_challenge``), from HA1.

    RFC 7616 §3.4: with ``qop="auth"`` offered the answer carries qop, nc and cnonce; a
    challenge without qop (RFC 2069 style, still sent by some carriers) gets the plain
    ``H(HA1:nonce:HA2)``. ``opaque`` is echoed when given (RFC 7616 §3.4).
    """
    algorithm = params.get("algorithm", "MD5")
    digest = _HASHES.get(algorithm.upper())
    if digest is None:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    nonce = params["nonce"]
    ha2 = digest(f"{method}:{uri}".encode()).hexdigest()
    qops = [q.strip().lower() for q in params.get("qop", "").split(",") if q.strip()]
    parts = [
        f"Digest username={_quote(username)}",
        f"realm={_quote(params['realm'])}",
        f"nonce={_quote(nonce)}",
        f"uri={_quote(uri)}",
    ]
    if "auth" in qops:
        cnonce = cnonce or base64.urlsafe_b64encode(os.urandom(12)).decode()
        nc_text = f"{nc:08x}"
        response = digest(f"{ha1}:{nonce}:{nc_text}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        parts += [f'response="{response}"', f"algorithm={algorithm}", "qop=auth",
                  f"nc={nc_text}", f'cnonce="{cnonce}"']
    elif qops:
        raise ValueError(f"no supported qop in {params.get('qop')!r}")
    else:
        response = digest(f"{ha1}:{nonce}:{ha2}".encode()).hexdigest()
        parts += [f'response="{response}"', f"algorithm={algorithm}"]
    if "opaque" in params:
        parts.append(f"opaque={_quote(params['opaque'])}")
    return ", ".join(parts)


def _auth_params(text: str, what: str) -> dict[str, str]:
    """``name=value, name="quoted"`` pairs (RFC 7235 §2.1 auth-param); ValueError if bad."""
    if not text:
        return {}
    # One C-level pass: ``split`` yields [gap, name, value, gap, name, value, ..., tail]; the
    # list is well-formed exactly when every pair is followed by "," or the end, that is when
    # no gap or tail is left between them.
    parts = _PARAM_RE.split(text)
    if len(parts) < 3 or any(parts[0::3]):
        raise ValueError(f"malformed {what} parameters")
    names = parts[1::3]
    if len(names) > _MAX_AUTH_PARAMS:
        raise ValueError(f"too many {what} parameters")
    params: dict[str, str] = {}
    for name, raw in zip(names, parts[2::3], strict=True):
        name = name.lower()
        if raw[:1] == '"':
            raw = raw[1:-1]
            if "\\" in raw:
                raw = _QUOTED_PAIR_RE.sub(r"\1", raw)
        if name in params:
            raise ValueError(f"repeated {what} parameter {name}")
        params[name] = raw
    return params


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
