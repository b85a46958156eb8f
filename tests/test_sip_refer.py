"""REFER (RFC 3515), Replaces (RFC 3891) and Referred-By (RFC 3892): the RFC examples parsed,
NOTIFY sipfrag bodies built and read back, and Replaces matched against real dialogs."""

from __future__ import annotations

import random

import pytest

from appliance.sip.dialog import (
    DialogConfig,
    DialogConfirmed,
    DialogEarly,
    DialogLayer,
    IncomingCall,
    SendRequest,
)
from appliance.sip.refer import (
    SIPFRAG_TYPE,
    Replaces,
    parse_refer,
    parse_refer_notify,
    parse_refer_to,
    parse_referred_by,
    parse_replaces,
    parse_sipfrag,
    parse_subscription_state,
    refer_headers,
    refer_notify,
    replaces_verdict,
    sipfrag,
)
from appliance.sip.source import Source
from appliance.sip.transaction import server_key
from media_core.sip import RemoteProtocolError, parse_message


def message(text: str, body: bytes = b"") -> object:
    head = text.replace("\n", "\r\n").rstrip("\r\n") + "\r\n"
    return parse_message(head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


# RFC 3891 §6.1 examples (the first folded over three lines as printed there).
REPLACES_FOLDED = message("""INVITE sip:bob@biloxi.example.com SIP/2.0
Via: SIP/2.0/UDP 192.0.2.4;branch=z9hG4bKrep1
From: <sip:alice@atlanta.example.com>;tag=a1
To: <sip:bob@biloxi.example.com>
Call-ID: new-call@atlanta.example.com
CSeq: 1 INVITE
Replaces: 98732@sip.example.com
          ;from-tag=r33th4x0r
          ;to-tag=ff87ff""")


def test_rfc3891_replaces_examples() -> None:
    replaces = parse_replaces(REPLACES_FOLDED.get("Replaces"))
    assert replaces == Replaces("98732@sip.example.com", "ff87ff", "r33th4x0r", False)
    early = parse_replaces("12adf2f34456gs5;to-tag=12345;from-tag=54321;early-only")
    assert early == Replaces("12adf2f34456gs5", "12345", "54321", True)
    assert parse_replaces(str(early)) == early  # round trip
    assert str(replaces) == "98732@sip.example.com;to-tag=ff87ff;from-tag=r33th4x0r"


@pytest.mark.parametrize("bad", [
    "", ";to-tag=1;from-tag=2", "abc;to-tag=1", "abc;from-tag=2",
    "abc;to-tag=1;to-tag=3;from-tag=2",
    "abc;to-tag=;from-tag=2", "abc def;to-tag=1;from-tag=2", "abc;;to-tag=1;from-tag=2",
])
def test_malformed_replaces_is_400(bad: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_replaces(bad)
    assert info.value.status == 400


def test_refer_to_with_embedded_replaces() -> None:
    # The escaped form of RFC 3891 §6.1 (Replaces carried in a Refer-To URI).
    value = ("<sips:bob@biloxi.example.com?Replaces=12345%40192.168.118.3%3Bto-tag%3D12345"
             "%3Bfrom-tag%3D5FFE-3994>")
    refer_to = parse_refer_to(value)
    assert str(refer_to.target) == "sips:bob@biloxi.example.com"
    assert refer_to.replaces == Replaces("12345@192.168.118.3", "12345", "5FFE-3994")
    # Built the other way round and parsed again: the same Replaces.
    (name, built), = refer_headers(refer_to.target, replaces=refer_to.replaces)
    assert name == "Refer-To" and "%3B" in built.upper() and ";to-tag" not in built
    assert parse_refer_to(built).replaces == refer_to.replaces


def test_rfc3515_refer_to_examples() -> None:
    plain = parse_refer_to("sip:alice@atlanta.example.com")  # §2.1, addr-spec
    assert (plain.target.user, plain.target.host, plain.replaces) == (
        "alice", "atlanta.example.com", None)
    subscribe = parse_refer_to("<sip:carol@cleveland.example.org;method=SUBSCRIBE>")
    assert subscribe.target.params == {"method": "SUBSCRIBE"}
    with pytest.raises(RemoteProtocolError) as info:
        parse_refer_to("http://www.ietf.org")  # §2.1 allows it; we can only INVITE sip/tel
    assert info.value.status == 416
    with pytest.raises(RemoteProtocolError) as info:
        parse_refer_to("<sip:bob@x?Replaces=abc%3Bto-tag%3D1>")  # Replaces without from-tag
    assert info.value.status == 400


def test_rfc3892_referred_by() -> None:
    referred = parse_referred_by(
        '<sip:referrer@referrer.example>;cid="20398823.2UWQFN309shb3@referrer.example"')
    assert referred.address.uri.user == "referrer"
    assert referred.cid == "20398823.2UWQFN309shb3@referrer.example"
    assert parse_referred_by("sip:a@b.example").cid is None
    with pytest.raises(RemoteProtocolError):
        parse_referred_by('"unterminated <sip:a@b>')


REFER = """REFER sip:b@atlanta.example.com SIP/2.0
Via: SIP/2.0/UDP agenta.atlanta.example.com;branch=z9hG4bK2293940223
To: <sip:b@atlanta.example.com>;tag=b1
From: <sip:a@atlanta.example.com>;tag=193402342
Call-ID: 898234234@agenta.atlanta.example.com
CSeq: 93809823 REFER
Max-Forwards: 70
{refer_to}Referred-By: <sip:a@atlanta.example.com>
Contact: <sip:a@atlanta.example.com>"""


def test_parse_refer_request() -> None:
    req = message(REFER.format(refer_to="Refer-To: <sip:c@atlanta.example.com>\n"))
    refer = parse_refer(req)
    assert str(refer.refer_to.target) == "sip:c@atlanta.example.com"
    assert refer.referred_by.address.uri.user == "a"
    assert refer.event_id == "93809823"
    compact = message(REFER.format(refer_to="r: <sip:c@atlanta.example.com>\n"))
    assert str(parse_refer(compact).refer_to.target) == "sip:c@atlanta.example.com"
    for refer_to in ("", "Refer-To: <sip:c@x>\nRefer-To: <sip:d@x>\n"):
        with pytest.raises(RemoteProtocolError) as info:
            parse_refer(message(REFER.format(refer_to=refer_to)))
        assert info.value.status == 400  # RFC 3515 §2.4.1: exactly one Refer-To


def test_sipfrag_bodies() -> None:
    assert sipfrag(100) == b"SIP/2.0 100 Trying\r\n"
    assert sipfrag(200) == b"SIP/2.0 200 OK\r\n"
    assert sipfrag(503) == b"SIP/2.0 503 Service Unavailable\r\n"
    assert parse_sipfrag(b"SIP/2.0 180 Ringing\r\nTo: x\r\n\r\n").status == 180
    for bad in (b"", b"hello", b"SIP/2.0 2000 OK\r\n", b"SIP/1.0 200 OK", b"SIP/2.0 099 X"):
        with pytest.raises(RemoteProtocolError):
            parse_sipfrag(bad)
    with pytest.raises(RemoteProtocolError) as info:
        parse_sipfrag(b"SIP/2.0 200 OK\r\n" + b"x" * 9000)
    assert info.value.status == 413


def test_subscription_state() -> None:
    active = parse_subscription_state("active;expires=60")
    assert (active.state, active.expires, active.terminated) == ("active", 60, False)
    ended = parse_subscription_state("terminated;reason=noresource")
    assert ended.terminated and ended.reason == "noresource"
    assert str(ended) == "terminated;reason=noresource"
    with pytest.raises(RemoteProtocolError):
        parse_subscription_state("active;expires=soon")


# -- with real dialogs ------------------------------------------------------------------------

def dialog_layer() -> DialogLayer:
    return DialogLayer(DialogConfig(contact="sip:edgecc@192.0.2.10", sent_by={
        "UDP": ("192.0.2.10", 5060)}), rng=random.Random(3))


PHONE = Source("UDP", "192.0.2.20", 5060)
INVITE = """INVITE sip:1001@192.0.2.10 SIP/2.0
Via: SIP/2.0/UDP 192.0.2.20;branch=z9hG4bK{branch}
From: <sip:caller@192.0.2.20>;tag=ph1
To: <sip:1001@192.0.2.10>
Call-ID: {call_id}
CSeq: 1 INVITE
Contact: <sip:caller@192.0.2.20>
Max-Forwards: 70"""


def test_notify_through_a_dialog_round_trips() -> None:
    dl = dialog_layer()
    inv = message(INVITE.format(branch="n1", call_id="n1@x"))
    call = next(o for o in dl.receive_request(server_key(inv), inv, PHONE, 0.0)
                if isinstance(o, IncomingCall))
    dl.answer(call.key, 200, 0.0)
    headers, body = refer_notify(100, event_id="93809823")
    _, out = dl.request(call.dialog, "NOTIFY", 1.0, headers=headers, body=body)
    sent = next(o for o in out if isinstance(o, SendRequest)).request
    wire = parse_message(sent.to_bytes())
    assert wire.get("Event") == "refer;id=93809823"
    assert wire.get("Subscription-State") == "active;expires=60"
    assert wire.get("Content-Type") == SIPFRAG_TYPE and wire.contacts
    progress = parse_refer_notify(wire)
    assert (progress.status, progress.reason, progress.event_id) == (100, "Trying", "93809823")
    assert not progress.subscription.terminated
    for status, reason in ((200, "OK"), (503, "Service Unavailable")):
        headers, body = refer_notify(status, event_id="93809823")
        _, out = dl.request(call.dialog, "NOTIFY", 2.0, headers=headers, body=body)
        wire = parse_message(next(o for o in out if isinstance(o, SendRequest)).request.to_bytes())
        progress = parse_refer_notify(wire)
        assert (progress.status, progress.reason) == (status, reason)
        assert str(progress.subscription) == "terminated;reason=noresource"


def test_notify_of_another_event_is_489() -> None:
    notify = message("""NOTIFY sip:a@x SIP/2.0
Via: SIP/2.0/UDP 192.0.2.20;branch=z9hG4bKev
From: <sip:b@x>;tag=1
To: <sip:a@x>;tag=2
Call-ID: ev@x
CSeq: 5 NOTIFY
Event: presence
Subscription-State: active
Content-Type: message/sipfrag""", b"SIP/2.0 200 OK\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        parse_refer_notify(notify)
    assert info.value.status == 489


def test_replaces_verdict_against_dialogs() -> None:
    dl = dialog_layer()
    # A confirmed dialog where we are the UAS.
    inv = message(INVITE.format(branch="c1", call_id="conf@x"))
    call = next(o for o in dl.receive_request(server_key(inv), inv, PHONE, 0.0)
                if isinstance(o, IncomingCall))
    dl.answer(call.key, 200, 0.0)
    confirmed = dl.get(call.dialog)
    replaces = Replaces("conf@x", to_tag=call.dialog.local_tag, from_tag="ph1")
    assert dl.get(call.dialog) is confirmed
    assert replaces_verdict(replaces, confirmed) is None
    early_only = Replaces("conf@x", call.dialog.local_tag, "ph1", early_only=True)
    assert replaces_verdict(early_only, confirmed) == 486
    assert replaces_verdict(replaces, None) == 481
    # An early dialog we did not initiate (we are its UAS): 481.
    inv2 = message(INVITE.format(branch="e1", call_id="early@x"))
    call2 = next(o for o in dl.receive_request(server_key(inv2), inv2, PHONE, 0.0)
                 if isinstance(o, IncomingCall))
    dl.answer(call2.key, 180, 0.0)
    assert replaces_verdict(early_only, dl.get(call2.dialog)) == 481
    # An early dialog we initiated (we are its UAC): may be replaced.
    key, out = dl.invite(0.0, from_party="<sip:q@edgecc.test>", to_party="<sip:1002@x>",
                         request_uri="sip:1002@192.0.2.30")
    sent = next(o for o in out if isinstance(o, SendRequest)).request
    ringing = message(
        "SIP/2.0 180 Ringing\n" + "".join(f"Via: {v}\n" for v in sent.get_all("Via"))
        + f"From: {sent.get('From')}\nTo: {sent.get('To')};tag=r9\nCall-ID: {sent.call_id}\n"
        f"CSeq: 1 INVITE\nContact: <sip:1002@192.0.2.30>")
    early = next(o for o in dl.receive_response(key, ringing, 0.1) if isinstance(o, DialogEarly))
    assert replaces_verdict(early_only, dl.get(early.dialog)) is None
    # Ended dialogs are looked up in ended(): 603.
    ack = message(INVITE.format(branch="c1ack", call_id="conf@x").replace(
        "INVITE sip", "ACK sip").replace("1 INVITE", "1 ACK").replace(
        "To: <sip:1001@192.0.2.10>", f"To: <sip:1001@192.0.2.10>;tag={call.dialog.local_tag}"))
    dl.receive_request(None, ack, PHONE, 0.5)
    dl.hangup(call.dialog, 1.0)
    assert replaces_verdict(replaces, dl.ended()[-1]) == 603
    assert not any(isinstance(o, DialogConfirmed) for o in out)
