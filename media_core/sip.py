"""SIP message codec (RFC 3261 §7, §20, §25): the public API of the compiled ``_sip`` core.

Sans-IO: :func:`parse_message` reads one datagram, :class:`StreamFramer` cuts a TCP/TLS byte
stream by Content-Length, :func:`check_request` makes the RFC 3261 §8.2 UAS checks, and
:func:`build_response` / :func:`build_request` / :meth:`SipMessage.to_bytes` write messages.
Peer garbage raises :class:`RemoteProtocolError` (with the status to answer), misuse of the API
:class:`LocalProtocolError`.
"""

from media_core._sip import (
    KNOWN_METHODS,
    REASON_PHRASES,
    Limits,
    LocalProtocolError,
    NameAddr,
    RemoteProtocolError,
    SipMessage,
    SipUri,
    StreamFramer,
    Via,
    build_request,
    build_response,
    canonical_name,
    check_request,
    new_branch,
    new_tag,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
    reason_phrase,
    split_auth_params,
)

__all__ = [
    "KNOWN_METHODS",
    "REASON_PHRASES",
    "Limits",
    "LocalProtocolError",
    "NameAddr",
    "RemoteProtocolError",
    "SipMessage",
    "SipUri",
    "StreamFramer",
    "Via",
    "build_request",
    "build_response",
    "canonical_name",
    "check_request",
    "new_branch",
    "new_tag",
    "parse_message",
    "parse_name_addr",
    "parse_uri",
    "parse_via",
    "reason_phrase",
    "split_auth_params",
]
