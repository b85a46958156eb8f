"""RFC 4475 (SIP torture tests) and RFC 5118 (IPv6 torture tests) at codec level.

Every file under tests/vectors/sip/ gets the verdict that verdicts.json records for it (see its
"_about" entry and README.md there). A message that parses is checked field by field and must
survive serialize -> parse with every field equal; a message that is refused with a response
must still yield a response built from what was read.
"""

import json
import re
from pathlib import Path

import pytest

from media_core.sip import (
    RemoteProtocolError,
    SipMessage,
    build_response,
    check_request,
    parse_message,
)

VECTORS = Path(__file__).parent / "vectors" / "sip"
VERDICTS = json.loads((VECTORS / "verdicts.json").read_text())
B2BUA_METHODS = frozenset(("ACK", "BYE", "CANCEL", "INVITE", "OPTIONS", "REGISTER"))
FILES = sorted(k for k in VERDICTS if not k.startswith("_"))


def wire_bytes(name: str) -> bytes:
    """The file as it goes on the wire (verdicts.json "_about.wire_bytes")."""
    data = (VECTORS / name).read_bytes()
    if not name.startswith("rfc5118/"):
        return data
    lines = data.replace(b"\r\n", b"\n")
    if b"\n\n" not in lines:
        return lines.replace(b"\n", b"\r\n")
    head, body = lines.split(b"\n\n", 1)
    body = body.replace(b"\n", b"\r\n")
    head = re.sub(rb"(?mi)^(content-length|l)[ \t]*:[ \t]*\d+",
                  lambda m: m.group(1) + b": " + str(len(body)).encode(), head)
    return head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + body


def codec_verdict(data: bytes) -> tuple[object, SipMessage | None, RemoteProtocolError | None]:
    try:
        msg = parse_message(data)
        if msg.is_request:
            check_request(msg, allow=B2BUA_METHODS)
    except RemoteProtocolError as exc:
        return ("drop" if exc.droppable else exc.status), None, exc
    return "ok", msg, None


def test_every_vector_file_has_a_verdict() -> None:
    on_disk = {f"{d.name}/{p.name}" for d in VECTORS.iterdir() if d.is_dir() for p in d.iterdir()}
    assert on_disk == set(FILES)
    assert len(FILES) == 62
    for name in FILES:
        entry = VERDICTS[name]
        assert entry["verdict"] in ("ok", "drop") or 400 <= entry["verdict"] <= 599, name
        wire = entry["wire"]
        statuses = wire if isinstance(wire, list) else [wire]
        assert wire == "drop" or all(100 <= s <= 699 for s in statuses), name


@pytest.mark.parametrize("name", FILES)
def test_vector_verdict(name: str) -> None:
    verdict, msg, exc = codec_verdict(wire_bytes(name))
    assert verdict == VERDICTS[name]["verdict"], exc and exc.reason


def _fields(m: SipMessage) -> tuple:
    # to_bytes always writes a correct Content-Length, so that field is compared apart.
    headers = [h for h in m.headers if h[0] != "Content-Length"]
    base = (m.is_request, m.method, m.uri, m.status, m.reason, m.version, headers, m.body)
    views = (m.vias, m.call_id, m.cseq, m.from_, m.to, m.contacts)
    return base + views + ((m.request_uri,) if m.is_request else ())


@pytest.mark.parametrize("name", [n for n in FILES if VERDICTS[n]["verdict"] == "ok"])
def test_valid_vector_round_trips(name: str) -> None:
    msg = parse_message(wire_bytes(name))
    again = parse_message(msg.to_bytes())
    assert _fields(again) == _fields(msg)
    assert again.to_bytes() == msg.to_bytes()
    assert again.get("Content-Length") == str(len(msg.body))


@pytest.mark.parametrize(
    "name", [n for n in FILES if isinstance(VERDICTS[n]["verdict"], int)])
def test_refused_vector_still_gets_a_response(name: str) -> None:
    _, _, exc = codec_verdict(wire_bytes(name))
    assert exc is not None and exc.message is not None
    resp = build_response(exc.message, exc.status, headers=exc.headers, to_tag="srv1")
    wire = resp.to_bytes()
    assert wire.startswith(b"SIP/2.0 %d " % VERDICTS[name]["verdict"])
    assert resp.get_all("Via") == exc.message.get_all("Via")
    assert resp.get("Call-ID") == exc.message.get("Call-ID")
    assert resp.get("CSeq") == exc.message.get("CSeq")
    for via in exc.message.get_all("Via"):
        assert via.encode() in wire


def _load(name: str) -> SipMessage:
    return parse_message(wire_bytes(name))


# RFC 4475 §3.1.1.1
def test_wsinv_fields() -> None:
    m = _load("rfc4475/wsinv.dat")
    assert m.method == "INVITE"
    assert m.uri == "sip:vivekg@chair-dnrc.example.com;unknownparam"
    assert m.request_uri.params == {"unknownparam": None}
    assert m.max_forwards == 68
    assert m.cseq == (9, "INVITE")
    assert m.call_id == "wsinv.ndaksdj@192.0.2.1"
    assert [(v.transport, v.host, v.branch) for v in m.vias] == [
        ("UDP", "192.0.2.2", "390skdjuw"),
        ("TCP", "spindle.example.com", "z9hG4bK9ikj8"),
        ("UDP", "192.168.255.111", "z9hG4bK30239"),
    ]
    assert all(v.protocol == "SIP/2.0" for v in m.vias)
    assert m.branch == "390skdjuw"
    assert str(m.to.uri) == "sip:vivekg@chair-dnrc.example.com" and m.to.tag == "1918181833n"
    assert m.from_.display == 'J Rosenberg \\"' and m.from_.tag == "98asjd8"
    assert str(m.from_.uri) == "sip:jdrosen@example.com"
    (contact,) = m.contacts
    assert contact.display == 'Quoted string ""'
    assert contact.params == {"newparam": "newvalue", "secondparam": None, "q": "0.33"}
    assert m.get("s") == "" and m.get("Subject") == ""
    assert m.get("NewFangledHeader") == "newfangled value continued newfangled value"
    assert m.get("UnknownHeaderWithUnusualValue") == ";;,,;;,;"
    assert m.get("Route") == "<sip:services.example.com;lr;unknownwith=value;unknown-no-value>"
    assert len(m.body) == 150 and m.body.startswith(b"v=0\r\n")


# RFC 4475 §3.1.1.2
def test_intmeth_fields() -> None:
    m = _load("rfc4475/intmeth.dat")
    assert m.method == "!interesting-Method0123456789_*+`.%indeed'~"
    ruri = m.request_uri
    assert ruri.user == "1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*"
    assert ruri.password == "&it+has=1,weird!*pas$wo~d_too.(doesn't-it)"
    assert ruri.host == "example.com"
    assert m.to.display == "BEL:\x07 NUL:\x00 DEL:\x7f"
    assert m.from_.display == "token1~` token2'+_ token3*%!.-"
    assert m.from_.tag == "_token~1'+`*%!-."
    assert m.from_.params["fromparam''~+*_!.-%"] == '"\u0440\u0430\u0431\u043e\u0442\u0430\u044e\u0449\u0438\u0439"'
    assert m.call_id == "intmeth.word%ZK-!.*_+'@word`~)(><:\\/\"][?}{"
    assert m.get("extensionHeader-!.%*+_`'~") == "\ufeff\u5927\u505c\u96fb"
    assert m.cseq == (139122385, m.method)
    assert m.max_forwards == 255


# RFC 4475 §3.1.1.3 and §3.1.1.4
def test_escaped_users() -> None:
    m = _load("rfc4475/esc01.dat")
    assert m.request_uri.user == "sips:user@example.com"
    assert m.request_uri.host == "example.net"
    assert m.to.uri.user == "user"
    assert m.from_.uri.user == "I have spaces"
    (contact,) = m.contacts
    assert contact.uri.user == "caller"
    assert contact.uri.params == {"lr": None, "name": "value%41"}
    assert m.get("Content-Type") == "application/sdp"
    assert str(m.request_uri) == "sip:sips%3Auser%40example.com@example.net"
    n = _load("rfc4475/escnull.dat")
    assert n.to.uri.user == "null-\x00-null"
    assert [c.uri.user for c in n.contacts] == ["\x00", "\x00\x00"]
    assert str(n.contacts[1].uri) == "sip:%00%00@host5.example.com"


# RFC 4475 §3.1.1.5
def test_esc02_method_and_headers() -> None:
    m = _load("rfc4475/esc02.dat")
    assert m.method == "RE%47IST%45R" and m.cseq == (29344, "RE%47IST%45R")
    assert [str(c.uri) for c in m.contacts] == [
        "sip:alias1@host1.example.com", "sip:alias3@host3.example.com"]
    assert m.get("C%6Fntact") == "<sip:alias2@host2.example.com>"
    assert m.to.display == "%Z%45"
    assert m.branch == "z9hG4bK209%fzsnel234"


# RFC 4475 §3.1.1.6 to §3.1.1.10
def test_valid_oddities() -> None:
    assert _load("rfc4475/lwsdisp.dat").from_.display == "caller"
    long = _load("rfc4475/longreq.dat")
    assert len(long.vias) == 34
    assert long.vias[0].host == "sip33.example.com" and long.vias[-1].received == "192.0.2.5"
    assert long.to.uri.port == 6000
    long_name = "very" + "long" * 25 + "parameternamewithnovalue"
    assert long.to.uri.params[long_name] is None
    assert long.to.uri.params["unknownparam1"] == "very" + "long" * 20 + "value"
    dbl = _load("rfc4475/dblreq.dat")
    assert dbl.method == "REGISTER" and dbl.body == b""
    assert dbl.call_id == "dblreq.0ha0isndaksdj99sdfafnl3lk233412"
    semi = _load("rfc4475/semiuri.dat")
    assert semi.request_uri.user == "user;par=u@example.net"
    assert semi.request_uri.host == "example.com" and semi.request_uri.params == {}
    assert semi.get_all("Accept") == [
        "application/sdp", "application/pkcs7-mime", "multipart/mixed", "multipart/signed",
        "message/sip", "message/sipfrag"]
    t = _load("rfc4475/transports.dat")
    assert [v.transport for v in t.vias] == ["UDP", "SCTP", "TLS", "UNKNOWN", "TCP"]


# RFC 4475 §3.1.1.11: multipart bodies pass through unchanged.
def test_mpart01_body_is_byte_exact() -> None:
    raw = (VECTORS / "rfc4475/mpart01.dat").read_bytes()
    m = parse_message(raw)
    assert len(m.body) == 553 and raw.endswith(m.body)
    assert m.top_via.rport == "" and m.top_via.port == 5070
    assert m.get("Content-Type") == "multipart/mixed;boundary=7a9cbec02ceef655"
    assert parse_message(m.to_bytes()).body == m.body


# RFC 4475 §3.1.1.12 and §3.1.1.13
def test_reason_phrases() -> None:
    u = _load("rfc4475/unreason.dat")
    assert not u.is_request and u.status == 200
    assert u.reason.startswith("= 2**3 * 5**2 \u043d\u043e ")
    n = _load("rfc4475/noreason.dat")
    assert n.status == 100 and n.reason == ""


# RFC 4475 §3.3
def test_application_layer_fields() -> None:
    bext, _, exc = codec_verdict(wire_bytes("rfc4475/bext01.dat"))
    assert exc.headers == (("Unsupported", "nothingSupportsThis, nothingSupportsThisEither"),)
    msg = _load("rfc4475/bext01.dat")
    check_request(msg, supported=frozenset(("nothingSupportsThis", "nothingSupportsThisEither")))
    _, _, exc = codec_verdict(wire_bytes("rfc4475/invut.dat"))
    assert exc.headers == (("Accept", "application/sdp"),)
    unk = _load("rfc4475/unksm2.dat")
    assert unk.to.uri.scheme == "isbn" and unk.to.uri.opaque == "2983792873"
    assert str(unk.from_.uri) == "http://www.example.com"
    assert unk.contacts[0].uri.scheme == "name"
    c1 = _load("rfc4475/cparam01.dat").contacts[0]
    assert c1.params == {"unknownparam": None} and c1.uri.params == {}
    c2 = _load("rfc4475/cparam02.dat").contacts[0]
    assert c2.params == {} and c2.uri.params == {"unknownparam": None}
    reg = _load("rfc4475/regescrt.dat").contacts[0]
    assert reg.uri.headers == {"Route": "<sip:sip.example.com>"}
    assert str(reg.uri) == "sip:user@example.com?Route=%3Csip:sip.example.com%3E"
    assert _load("rfc4475/zeromf.dat").max_forwards == 0
    bcast = _load("rfc4475/bcast.dat")
    assert [v.host for v in bcast.vias] == ["192.0.2.198", "255.255.255.255"]
    bad = _load("rfc4475/badbranch.dat")
    assert bad.branch == "z9hG4bK"
    old = _load("rfc4475/inv2543.dat")
    assert old.branch is None and old.from_.tag is None and old.max_forwards is None
    assert old.body.endswith(b"m=audio 49217 RTP/AVP 0\r\n")


# RFC 5118: IPv6 references keep their brackets in ``host``.
def test_ipv6_hosts() -> None:
    good = _load("rfc5118/ipv6-good")
    assert good.request_uri.host == "[2001:db8::10]" and good.request_uri.port is None
    assert good.top_via.host == "[2001:db8::9:1]"
    assert good.contacts[0].uri.host == "[2001:db8::1]"
    amb = _load("rfc5118/port-ambiguous").request_uri
    assert (amb.host, amb.port) == ("[2001:db8::10:5070]", None)
    unamb = _load("rfc5118/port-unambiguous").request_uri
    assert (unamb.host, unamb.port) == ("[2001:db8::10]", 5070)
    multi = _load("rfc5118/mult-ip-in-header")
    assert [(v.host, v.port) for v in multi.vias] == [
        ("[2001:db8::9:1]", 6050), ("192.0.2.1", None), ("[2001:db8::9:255]", None)]
    assert multi.vias[2].received == "192.0.2.200"
    assert _load("rfc5118/via-received-param-no-delim").top_via.received == "2001:db8::9:255"
    assert _load("rfc5118/via-received-param-with-delim").top_via.received == "[2001:db8::9:255]"
    mapped = _load("rfc5118/ipv4-mapped-ipv6")
    assert mapped.top_via.host == "[::ffff:192.0.2.10]" and mapped.top_via.port == 19823
    assert mapped.contacts[0].display == "T. desk phone"
    three = _load("rfc5118/ipv6-bug-abnf-3-colons")
    assert three.request_uri.host == "[2001:db8:::192.0.2.1]"
    sdp = _load("rfc5118/ipv6-in-sdp")
    assert b"c=IN IP6 2001:db8::20\r\n" in sdp.body
