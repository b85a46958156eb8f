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
import struct
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from media_core.sip import split_auth_params

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

_MAX_HA2_ENTRIES = 1024


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


_NO_CREDENTIALS = AuthResult(None, False, "no credentials")
_MALFORMED = AuthResult(None, False, "malformed credentials", attempted=True)
_BAD_RESPONSE = AuthResult(None, False, "bad response", attempted=True)
_STALE = AuthResult(None, True, "stale nonce")
_REPLAY = AuthResult(None, False, "nonce count replay", attempted=True)


class Credentials(NamedTuple):
    """The parameters of one ``Digest`` Authorization header (RFC 7616 §3.4).

    Immutable; a named tuple because one is made for every authenticated request.
    """

    username: str
    realm: str
    nonce: str
    uri: str
    response: str
    """Lower-case hex, as compared."""
    algorithm: str
    """As sent; "MD5" when absent (RFC 7616 §3.4)."""
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
    get = params.get
    try:
        return Credentials(
            params["username"],
            params["realm"],
            params["nonce"],
            params["uri"],
            params["response"].lower(),
            get("algorithm", "MD5"),
            get("qop"),
            get("nc"),
            get("cnonce"),
            get("opaque"),
        )
    except KeyError:
        for required in ("username", "realm", "nonce", "uri", "response"):
            if required not in params:
                raise ValueError(f"digest parameter {required} missing") from None
        raise


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
        # Keyed BLAKE2b spends a whole block on the key: do that once and copy the state.
        self._mac_state = hashlib.blake2b(key=self._mac_key, digest_size=_NONCE_MAC)
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
        # The challenge values around the nonce, made once: (prefix, suffix per algorithm) for
        # each order and stale flag.
        self._challenge_prefix = f"Digest realm={self._realm_q}, nonce=\""
        self._challenge_suffixes = {
            (order, stale): tuple(
                f'", algorithm={alg}, qop="auth"' + (", stale=true" if stale else "")
                for alg in order
            )
            for order in (ALGORITHMS, ALGORITHMS[::-1])
            for stale in (False, True)
        }
        self._ok: dict[str, AuthResult] = {}
        self._md5_first: dict[str, bool] = {}  # User-Agent -> listed in md5_first_user_agents
        # H(method:digest-uri) per (algorithm, method, uri): phones of a site send a handful.
        self._ha2: dict[tuple[str, str, str], str] = {}

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
        # Lower-case hex: made and read back by one C call each (base64 costs microseconds).
        return (head + mac).hex()

    def _nonce_mac(self, head: bytes) -> bytes:
        # Keyed BLAKE2b is a MAC by design (RFC 7693 §2.5) and, unlike OpenSSL's HMAC here,
        # costs about a microsecond: it runs twice per registration.
        mac = self._mac_state.copy()
        mac.update(head)
        return mac.digest()

    def _nonce_issued_ms(self, nonce: str) -> int | None:
        """The issue time (ms) of a nonce we made, or None if it is not ours."""
        if len(nonce) != 2 * _NONCE_LEN:
            return None
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            return None
        if raw.hex() != nonce:  # one spelling per nonce: the nonce-count table is keyed by it
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
        head = self._challenge_prefix + self.make_nonce(now)
        order = ALGORITHMS
        if self.md5_first_user_agents and request is not None:
            ua = request.get("User-Agent")
            if ua and self._wants_md5_first(ua):
                order = ALGORITHMS[::-1]
        first, second = self._challenge_suffixes[order, stale]
        return [(name, head + first), (name, head + second)]

    def _wants_md5_first(self, user_agent: str) -> bool:
        listed = self._md5_first.get(user_agent)
        if listed is None:
            lowered = user_agent.lower()
            listed = any(needle in lowered for needle in self.md5_first_user_agents)
            if len(self._md5_first) >= 256:
                self._md5_first.clear()  # bounded: a flood of User-Agents only costs re-work
            self._md5_first[user_agent] = listed
        return listed

    # -- verification -----------------------------------------------------------------------

    def _pick_credentials(self, request: Any, proxy: bool) -> tuple[Credentials | None, bool]:
        """Return (credentials for our realm, malformed-seen)."""
        header = "Proxy-Authorization" if proxy else "Authorization"
        malformed = False
        for value in request.get_all(header):  # one value per field line: never split
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
            return _MALFORMED if malformed else _NO_CREDENTIALS
        return self.verify_credentials(creds, request.method or "", request.uri or "", now)

    def verify_credentials(
        self, creds: Credentials, method: str, request_uri: str, now: float
    ) -> AuthResult:
        """Check parsed credentials for a request with this method and Request-URI."""
        username, _, nonce, uri, response, algorithm, qop, nc_text, cnonce, _ = creds
        algorithm = algorithm.upper()
        digest = _HASHES.get(algorithm)
        if digest is None:
            return AuthResult(None, False, "unsupported algorithm", attempted=True)
        # Only qop=auth is offered; a response without qop would make nc replay checks
        # impossible (RFC 7616 §3.4 makes qop mandatory).
        if qop is None or qop.lower() != "auth" or not cnonce or not nc_text:
            return AuthResult(None, False, "qop missing", attempted=True)
        if len(nc_text) != 8:
            return AuthResult(None, False, "bad nonce count", attempted=True)
        try:
            nc = int(nc_text, 16)
        except ValueError:
            return AuthResult(None, False, "bad nonce count", attempted=True)
        # RFC 7616 §3.4.6 / RFC 2617 §3.2.2.5: the digest-uri must be the Request-URI.
        if uri != request_uri:
            return AuthResult(None, False, "uri mismatch", attempted=True)

        account = self.accounts.get(username)
        if account is not None:
            ha1 = account.ha1_sha256 if algorithm == "SHA-256" else account.ha1_md5
        else:
            # Same work, same outcome as a wrong password: nothing to enumerate.
            ha1 = self._standin_ha1(username, algorithm)
        ha2_key = (algorithm, method, uri)
        ha2 = self._ha2.get(ha2_key)
        if ha2 is None:
            ha2 = digest(f"{method}:{uri}".encode()).hexdigest()
            if len(self._ha2) >= _MAX_HA2_ENTRIES:
                self._ha2.clear()  # bounded: odd digest-uris only cost re-work
            self._ha2[ha2_key] = ha2
        expected = digest(f"{ha1}:{nonce}:{nc_text}:{cnonce}:{qop}:{ha2}".encode()).hexdigest()
        if not hmac.compare_digest(expected, response) or account is None:
            return _BAD_RESPONSE

        issued_ms = self._nonce_issued_ms(nonce)
        now_ms = int(now * 1000)
        seen_table = self._nc_seen
        # A nonce that is not ours (e.g. made before a restart with another secret), from the
        # future, or too old: the password was right, so ask again with stale=true (RFC 7616
        # §3.3) and the phone retries without prompting anyone.
        if (
            issued_ms is None
            or issued_ms > now_ms
            or now_ms - issued_ms > self.nonce_ttl * 1000
            or (issued_ms <= self._evicted_up_to_ms and nonce not in seen_table)
        ):
            return _STALE
        seen = seen_table.get(nonce)
        if seen is not None and nc <= seen[1]:
            return _REPLAY
        seen_table[nonce] = (issued_ms, nc)
        if seen is None:
            self._prune(now_ms)
        ok = self._ok.get(username)
        if ok is None:  # one per account (only accounts get here): results are immutable
            ok = self._ok[username] = AuthResult(username, False, "ok")
        return ok

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
    pairs = split_auth_params(text)  # the codec's C loop: names lower-cased, values unquoted
    if pairs is None:
        raise ValueError(f"malformed {what} parameters")
    if len(pairs) > _MAX_AUTH_PARAMS:
        raise ValueError(f"too many {what} parameters")
    params = dict(pairs)
    if len(params) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise ValueError(f"repeated {what} parameter {name}")
            seen.add(name)
    return params


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
