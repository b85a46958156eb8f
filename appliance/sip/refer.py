"""Transfer signalling: REFER (RFC 3515), Replaces (RFC 3891), Referred-By (RFC 3892).

Sans-IO helpers on top of the codec. Parsing raises ``RemoteProtocolError`` with the status to
answer (400 for a malformed or missing header, 489 for a NOTIFY of another event package);
building returns header lists and bodies for ``DialogLayer.request`` / ``answer``.

Flows they serve:

* A phone transfers a call through us: it sends REFER on its dialog. We answer 202 Accepted,
  then NOTIFY ``100 Trying`` (subscription active), and a final NOTIFY with the outcome
  (``200 OK``, ``503 Service Unavailable``, ...) that terminates the implicit subscription
  (RFC 3515 §2.4.4-§2.4.7).
* Attended transfer: the Refer-To URI carries a ``Replaces`` header naming the dialog the new
  INVITE replaces (RFC 3891 §3); ``replaces_verdict`` says whether that INVITE may proceed.
"""

from __future__ import annotations

from dataclasses import dataclass

from media_core.sip import (
    LocalProtocolError,
    NameAddr,
    RemoteProtocolError,
    SipMessage,
    SipUri,
    parse_name_addr,
    reason_phrase,
)

__all__ = [
    "SIPFRAG_TYPE",
    "ReferProgress",
    "ReferRequest",
    "ReferTo",
    "ReferredBy",
    "Replaces",
    "SipFrag",
    "SubscriptionState",
    "parse_refer",
    "parse_refer_notify",
    "parse_refer_to",
    "parse_referred_by",
    "parse_replaces",
    "parse_sipfrag",
    "parse_subscription_state",
    "refer_headers",
    "refer_notify",
    "replaces_verdict",
    "sipfrag",
]

SIPFRAG_TYPE = "message/sipfrag;version=2.0"
"""RFC 3515 §2.4.5 / RFC 3420: the body type of REFER's NOTIFYs."""
MAX_SIPFRAG_BYTES = 8192
"""A NOTIFY body beyond this is refused (every buffer has a limit)."""
DEFAULT_SUBSCRIPTION_SECONDS = 60


def _bad(reason: str) -> RemoteProtocolError:
    return RemoteProtocolError(400, reason)


# -- Replaces (RFC 3891 §6.1) ----------------------------------------------------------------


@dataclass(frozen=True)
class Replaces:
    """``Replaces: callid;to-tag=..;from-tag=..[;early-only]`` (RFC 3891 §6.1)."""

    call_id: str
    """Call-ID of the dialog to replace."""
    to_tag: str
    """Matched against the receiver's local tag (§3)."""
    from_tag: str
    """Matched against the receiver's remote tag (§3)."""
    early_only: bool = False
    """Replace only an early dialog (§3: a confirmed one answers 486)."""

    def __str__(self) -> str:
        text = f"{self.call_id};to-tag={self.to_tag};from-tag={self.from_tag}"
        return text + (";early-only" if self.early_only else "")


def parse_replaces(value: str) -> Replaces:
    """Parse a Replaces header value (or the unescaped ``Replaces`` URI header)."""
    parts = [p.strip() for p in value.split(";")]
    call_id = parts[0]
    if not call_id or any(c.isspace() for c in call_id):
        raise _bad("Malformed Replaces call-id")
    tags: dict[str, list[str]] = {"to-tag": [], "from-tag": []}
    early = False
    for part in parts[1:]:
        name, eq, val = part.partition("=")
        name = name.strip().lower()
        if not name:
            raise _bad("Empty Replaces parameter")
        if name in tags:
            if not eq or not val.strip():
                raise _bad(f"Replaces {name} without a value")
            tags[name].append(val.strip())
        elif name == "early-only":
            early = True
        # other generic-params are allowed and ignored (§6.1)
    if len(tags["to-tag"]) != 1 or len(tags["from-tag"]) != 1:
        # §6.1: exactly one to-tag and exactly one from-tag.
        raise _bad("Replaces needs exactly one to-tag and one from-tag")
    return Replaces(call_id, tags["to-tag"][0], tags["from-tag"][0], early)


def replaces_verdict(replaces: Replaces, dialog: object | None) -> int | None:
    """RFC 3891 §3: None when an INVITE with ``replaces`` may replace ``dialog``, else the
    status to answer it with.

    ``dialog`` is the ``appliance.sip.dialog.Dialog`` that ``DialogLayer`` finds for
    ``DialogId(call_id, local_tag=to_tag, remote_tag=from_tag)``, or None when there is none
    (481). An ended dialog gives 603; a confirmed one with ``early-only`` gives 486; an early
    dialog this UA did not initiate gives 481.
    """
    if dialog is None:
        return 481
    state = getattr(getattr(dialog, "state", None), "value", None)
    if state == "terminated":
        return 603
    if state == "confirmed" and replaces.early_only:
        return 486
    if state == "early" and not getattr(dialog, "is_uac", False):
        return 481
    return None


# -- Refer-To (RFC 3515 §2.1) and Referred-By (RFC 3892 §3) -----------------------------------


@dataclass(frozen=True)
class ReferTo:
    """The target of a REFER."""

    address: NameAddr
    """The whole name-addr as received."""
    target: SipUri
    """The URI to INVITE, without its embedded headers."""
    replaces: Replaces | None
    """The embedded ``Replaces`` header (attended transfer), if any."""
    headers: dict[str, str]
    """Every embedded header (unescaped), ``Replaces`` included."""


def parse_refer_to(value: str) -> ReferTo:
    """Parse a Refer-To value; the Replaces header inside the URI is parsed too."""
    try:
        address = parse_name_addr(value)
    except RemoteProtocolError as exc:
        raise _bad(f"Malformed Refer-To: {exc.reason}") from exc
    uri = address.uri
    if uri.scheme not in ("sip", "sips", "tel"):
        raise RemoteProtocolError(416, "Unsupported Refer-To URI Scheme")
    headers = dict(uri.headers)
    replaces = None
    for name, text in headers.items():
        if name.lower() == "replaces":
            replaces = parse_replaces(text)
    target = SipUri(uri.scheme, uri.user, uri.password, uri.host, uri.port, dict(uri.params))
    return ReferTo(address, target, replaces, headers)


@dataclass(frozen=True)
class ReferredBy:
    """``Referred-By: name-addr;cid=...`` (RFC 3892 §3)."""

    address: NameAddr
    """Who asked for the transfer."""
    cid: str | None
    """Content-ID of a signed token, when given (unquoted)."""


def parse_referred_by(value: str) -> ReferredBy:
    """Parse a Referred-By value."""
    try:
        address = parse_name_addr(value)
    except RemoteProtocolError as exc:
        raise _bad(f"Malformed Referred-By: {exc.reason}") from exc
    cid = address.params.get("cid")
    if cid is not None and len(cid) >= 2 and cid[0] == cid[-1] == '"':
        cid = cid[1:-1]
    return ReferredBy(address, cid)


@dataclass(frozen=True)
class ReferRequest:
    """What a received REFER asks for."""

    refer_to: ReferTo
    """The target (with Replaces for attended transfer)."""
    referred_by: ReferredBy | None
    """Who referred, when given."""
    event_id: str
    """``id`` for the NOTIFYs' Event header: the REFER's CSeq number (RFC 3515 §2.4.6)."""


def parse_refer(request: SipMessage) -> ReferRequest:
    """RFC 3515 §2.4.1: a REFER carries exactly one Refer-To (else 400)."""
    if request.method != "REFER":
        raise LocalProtocolError(f"parse_refer got a {request.method}")
    values = [v for n, v in request.headers if n.lower() in ("refer-to", "r")]
    if len(values) != 1:
        raise _bad("REFER needs exactly one Refer-To")
    referred = request.get("Referred-By")
    return ReferRequest(parse_refer_to(values[0]),
                        parse_referred_by(referred) if referred else None,
                        str(request.cseq[0]))


def refer_headers(target: SipUri | str, *, replaces: Replaces | None = None,
                  referred_by: str | None = None) -> list[tuple[str, str]]:
    """Headers for a REFER we send: Refer-To (Replaces escaped into the URI) and Referred-By."""
    uri = target if isinstance(target, SipUri) else parse_name_addr(target).uri
    headers = dict(uri.headers)
    if replaces is not None:
        headers["Replaces"] = str(replaces)
    refer_uri = SipUri(uri.scheme, uri.user, uri.password, uri.host, uri.port,
                       dict(uri.params), headers)
    out = [("Refer-To", f"<{refer_uri}>")]
    if referred_by:
        out.append(("Referred-By", referred_by))
    return out


# -- NOTIFY with message/sipfrag (RFC 3515 §2.4.4-§2.4.7, RFC 3420) -------------------------


def sipfrag(status: int, reason: str | None = None) -> bytes:
    """A sipfrag body with just the status line (RFC 3515 §2.4.5), e.g. ``SIP/2.0 200 OK``."""
    if not 100 <= status <= 699:
        raise LocalProtocolError(f"status {status} is not a SIP response code")
    text = (reason or reason_phrase(status)).replace("\r", " ").replace("\n", " ")
    return f"SIP/2.0 {status} {text}\r\n".encode()


@dataclass(frozen=True)
class SipFrag:
    """The status line of a sipfrag body."""

    status: int
    """Status code of the referred request."""
    reason: str
    """Its reason phrase."""


def parse_sipfrag(body: bytes) -> SipFrag:
    """Read the status line of a message/sipfrag body (400 when it is not one)."""
    if len(body) > MAX_SIPFRAG_BYTES:
        raise RemoteProtocolError(413, "Sipfrag Too Large")
    line = body.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "replace")
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if version != "SIP/2.0" or len(code) != 3 or not code.isdigit() or int(code) < 100:
        raise _bad("Body is not a sipfrag status line")
    return SipFrag(int(code), reason.strip())


@dataclass(frozen=True)
class SubscriptionState:
    """``Subscription-State`` (RFC 6665 §8.2.3)."""

    state: str
    """``active``, ``pending`` or ``terminated``."""
    expires: int | None = None
    """Seconds left (active/pending)."""
    reason: str | None = None
    """Why it ended (terminated): ``noresource``, ``timeout``, ``rejected``, ..."""

    def __str__(self) -> str:
        text = self.state
        if self.expires is not None:
            text += f";expires={self.expires}"
        if self.reason is not None:
            text += f";reason={self.reason}"
        return text

    @property
    def terminated(self) -> bool:
        return self.state == "terminated"


def parse_subscription_state(value: str) -> SubscriptionState:
    """Parse a Subscription-State value (400 when malformed)."""
    parts = [p.strip() for p in value.split(";")]
    state = parts[0].lower()
    if not state or not all(c.isalnum() or c in "-._!%*+`'~" for c in state):
        raise _bad("Malformed Subscription-State")
    expires = reason = None
    for part in parts[1:]:
        name, _, val = part.partition("=")
        name, val = name.strip().lower(), val.strip()
        if name == "expires":
            if not val.isdigit():
                raise _bad("Malformed Subscription-State expires")
            expires = int(val)
        elif name == "reason":
            reason = val.lower()
    return SubscriptionState(state, expires, reason)


def refer_notify(status: int, *, event_id: str, reason: str | None = None,
                 expires: int = DEFAULT_SUBSCRIPTION_SECONDS
                 ) -> tuple[list[tuple[str, str]], bytes]:
    """Headers and body of the NOTIFY reporting a referred request's ``status``.

    1xx keeps the implicit subscription active; a final status terminates it with
    ``reason=noresource`` (RFC 3515 §2.4.7). Pass to ``DialogLayer.request(dialog, "NOTIFY",
    headers=..., body=...)``.
    """
    if status < 200:
        state = SubscriptionState("active", expires=expires)
    else:
        state = SubscriptionState("terminated", reason="noresource")
    headers = [
        ("Event", f"refer;id={event_id}"),
        ("Subscription-State", str(state)),
        ("Content-Type", SIPFRAG_TYPE),
    ]
    return headers, sipfrag(status, reason)


@dataclass(frozen=True)
class ReferProgress:
    """What a NOTIFY for our REFER reports."""

    status: int
    """Status of the request the transferee sent."""
    reason: str
    """Its reason phrase."""
    subscription: SubscriptionState
    """The subscription's state (terminated with the final report)."""
    event_id: str | None
    """The Event header's ``id``."""


def parse_refer_notify(request: SipMessage) -> ReferProgress:
    """Read a NOTIFY for a REFER we sent (489 for another event package, 400 if malformed)."""
    event = request.get("Event") or ""
    package, *params = [p.strip() for p in event.split(";")]
    if package.lower() != "refer":
        raise RemoteProtocolError(489, "Bad Event", headers=(("Allow-Events", "refer"),))
    event_id = None
    for param in params:
        name, _, val = param.partition("=")
        if name.strip().lower() == "id":
            event_id = val.strip()
    state_value = request.get("Subscription-State")
    if not state_value:
        raise _bad("NOTIFY without Subscription-State")
    content_type = (request.get("Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "message/sipfrag":
        raise RemoteProtocolError(415, "Unsupported Media Type",
                                  headers=(("Accept", "message/sipfrag"),))
    frag = parse_sipfrag(request.body)
    return ReferProgress(frag.status, frag.reason, parse_subscription_state(state_value),
                         event_id)
