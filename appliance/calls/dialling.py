"""Dial rules for calls placed through the carrier trunk, and the trunk's digest answer.

Sans-IO: ``check_dial`` decides from the site's ``dialling:`` rules, the caller's account role
and how many outbound calls that phone already has; ``trunk_authorization`` answers a carrier's
401/407 challenge with the HA1 kept in ``trunk.auth`` (the password never reaches the site).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

from appliance.config import DiallingConfig, TrunkAuth
from appliance.sip.digest import parse_challenge

__all__ = ["DialDecision", "check_dial", "normalize_number", "trunk_authorization"]

_NUMBER = re.compile(r"^\+?[0-9]{1,32}$")
_VISUAL_SEPARATORS = re.compile(r"[\s().-]")


@dataclass(frozen=True)
class DialDecision:
    """What the dial rules say about one number."""

    allowed: bool
    """True when the call may go to the carrier."""
    status: int
    """The SIP status refusing it (403, 484, 486); 0 when allowed."""
    reason: str
    """The reason phrase / log reason (``international``, ``premium``, ``not-allowed``, ...)."""
    number: str
    """The number as sent to the carrier (visual separators removed)."""
    record: bool = False
    """Record the call (the role's policy)."""


def normalize_number(dialled: str) -> str:
    """The dialled string without visual separators (RFC 3966 §5.1.1: ``-``, ``.``, ``(``,
    ``)`` and spaces carry no meaning)."""
    return _VISUAL_SEPARATORS.sub("", dialled)


def _longest(number: str, prefixes: tuple[str, ...]) -> int:
    return max((len(p) for p in prefixes if number.startswith(p)), default=0)


def check_dial(rules: DiallingConfig, role: str, dialled: str, live_calls: int) -> DialDecision:
    """Apply ``rules`` for a phone of ``role`` that already has ``live_calls`` outbound calls."""
    number = normalize_number(dialled)
    if not _NUMBER.fullmatch(number):
        return DialDecision(False, 484, "address-incomplete", number)
    settings = rules.roles.get(role)  # type: ignore[call-overload]
    if settings is None:
        return DialDecision(False, 403, "role-may-not-dial", number)
    if _longest(number, rules.premium_prefixes) and not settings.premium:
        return DialDecision(False, 403, "premium", number)
    international = _longest(number, rules.international_prefixes)
    if international > _longest(number, rules.national_prefixes) and not settings.international:
        return DialDecision(False, 403, "international", number)
    if settings.allowed_prefixes and not _longest(number, settings.allowed_prefixes):
        return DialDecision(False, 403, "not-allowed", number)
    if live_calls >= settings.max_calls:
        return DialDecision(False, 486, "too-many-calls", number)
    return DialDecision(True, 0, "allowed", number, record=settings.record)


_HA1_HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def trunk_authorization(challenge: str, auth: TrunkAuth, *, method: str, uri: str,
                        nc: int = 1, cnonce: str | None = None) -> str:
    """The (Proxy-)Authorization value answering a carrier's Digest challenge (RFC 8760,
    RFC 7616 §3.4) from the stored HA1. Raises ValueError for a challenge we cannot answer:
    another realm (HA1 is bound to its realm), an algorithm we hold no HA1 for, or a
    malformed challenge."""
    params = parse_challenge(challenge)
    algorithm = params.get("algorithm", "MD5").upper()
    if params.get("realm") != auth.realm:
        raise ValueError(f"challenge realm {params.get('realm')!r} is not {auth.realm!r}")
    ha1 = auth.ha1_md5 if algorithm == "MD5" else (
        auth.ha1_sha256 if algorithm == "SHA-256" else None)
    if ha1 is None:
        raise ValueError(f"no HA1 for digest algorithm {algorithm!r}")
    digest = _HA1_HASHES[algorithm]
    nonce = params["nonce"]
    ha2 = digest(f"{method}:{uri}".encode()).hexdigest()
    qops = [q.strip() for q in params.get("qop", "").split(",") if q.strip()]
    fields = [f'username="{auth.user}"', f'realm="{auth.realm}"', f'nonce="{nonce}"',
              f'uri="{uri}"', f"algorithm={algorithm}"]
    if "auth" in qops:
        cnonce = cnonce or os.urandom(12).hex()
        nc_text = f"{nc:08x}"
        response = digest(
            f"{ha1.lower()}:{nonce}:{nc_text}:{cnonce}:auth:{ha2}".encode()).hexdigest()
        fields += [f'response="{response}"', "qop=auth", f"nc={nc_text}", f'cnonce="{cnonce}"']
    elif qops:
        raise ValueError(f"unsupported qop {params['qop']!r}")
    else:
        # RFC 2617 §3.2.2.1 without qop (older carriers).
        response = digest(f"{ha1.lower()}:{nonce}:{ha2}".encode()).hexdigest()
        fields.append(f'response="{response}"')
    if "opaque" in params:
        fields.append(f'opaque="{params["opaque"]}"')
    return "Digest " + ", ".join(fields)
