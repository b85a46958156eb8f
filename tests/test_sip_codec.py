"""SIP codec behaviour: header access, URIs, name-addrs, Vias, limits, building messages, the
RFC 3261 §8.2 UAS checks and stream framing (fed whole, byte by byte and with trailing bytes)."""

import pytest

from media_core.sip import (
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
    split_auth_params,
)

SDP = (b"v=0\r\no=agent 1 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
       b"m=audio 49170 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n")


def invite(body: bytes = SDP, extra: bytes = b"", content_length: bytes | None = None) -> bytes:
    cl = str(len(body)).encode() if content_length is None else content_length
    return (b"INVITE sip:1001@192.0.2.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK74bf9;rport\r\n"
            b"Max-Forwards: 70\r\n"
            b'From: "Queue caller" <sip:5551234@192.0.2.10>;tag=9fxced76sl\r\n'
            b"To: <sip:1001@192.0.2.1>\r\n"
            b"Call-ID: 3848276298220188511@192.0.2.10\r\n"
            b"CSeq: 1 INVITE\r\n"
            b"Contact: <sip:5551234@192.0.2.10:5062>\r\n"
            b"Content-Type: application/sdp\r\n" + extra +
            b"Content-Length: " + cl + b"\r\n\r\n" + body)


def options(call_id: str = "opt-1", extra: bytes = b"") -> bytes:
    return (b"OPTIONS sip:192.0.2.1 SIP/2.0\r\n"
            b"Via: SIP/2.0/TCP 192.0.2.10:5062;branch=z9hG4bK-" + call_id.encode() + b"\r\n"
            b"Max-Forwards: 70\r\nFrom: <sip:probe@192.0.2.10>;tag=1\r\n"
            b"To: <sip:192.0.2.1>\r\nCall-ID: " + call_id.encode() + b"\r\n"
            b"CSeq: 7 OPTIONS\r\n" + extra + b"Content-Length: 0\r\n\r\n")


# -- header fields ---------------------------------------------------------------------------

COMPACT = {"i": "Call-ID", "m": "Contact", "e": "Content-Encoding", "l": "Content-Length",
           "c": "Content-Type", "f": "From", "s": "Subject", "k": "Supported", "t": "To",
           "v": "Via", "o": "Event", "u": "Allow-Events", "r": "Refer-To", "b": "Referred-By",
           "x": "Session-Expires", "y": "Identity", "a": "Accept-Contact",
           "j": "Reject-Contact", "d": "Request-Disposition", "n": "Identity-Info"}


@pytest.mark.parametrize(("short", "long"), sorted(COMPACT.items()))
def test_compact_forms_become_canonical_names(short: str, long: str) -> None:
    value = "0" if long == "Content-Length" else "x-value"
    for spelling in (short, short.upper()):
        raw = b"OPTIONS sip:a@b SIP/2.0\r\n%s: %s\r\n\r\n" % (spelling.encode(), value.encode())
        msg = parse_message(raw)
        assert msg.headers == [(long, value)]
        assert msg.get(short) == msg.get(long) == msg.get(long.upper()) == value
    assert canonical_name(short) == long


def test_long_names_in_any_case_become_canonical() -> None:
    msg = parse_message(b"OPTIONS sip:a@b SIP/2.0\r\ncall-id: 1\r\nCSEQ: 1 OPTIONS\r\n"
                        b"www-authenticate: Digest realm=\"x\"\r\nX-Queue-Id: sales\r\n\r\n")
    assert [n for n, _ in msg.headers] == ["Call-ID", "CSeq", "WWW-Authenticate", "X-Queue-Id"]
    assert msg.get("x-queue-id") == "sales"
    assert msg.get("Missing") is None and msg.get_all("Missing") == []


def test_folding_and_white_space_are_unfolded() -> None:
    msg = parse_message(b"OPTIONS sip:a@b SIP/2.0\r\nSubject:   first\r\n\t second  \r\n"
                        b"   third\r\nTo :\r\n <sip:a@b>\r\n\r\n")
    assert msg.headers == [("Subject", "first second third"), ("To", "<sip:a@b>")]


def test_get_all_splits_lists_but_not_inside_quotes_or_brackets() -> None:
    msg = parse_message(
        b"OPTIONS sip:a@b SIP/2.0\r\n"
        b'Contact: "Agent, Sales" <sip:a@b;x=1,2>, <sip:c@d>;q=0.5\r\n'
        b"Contact: sip:e@f\r\n"
        b'WWW-Authenticate: Digest realm="edgecc", nonce="n1", qop="auth"\r\n'
        b"Allow: INVITE,ACK , BYE,,\r\n"
        b"Date: Sat, 13 Nov 2010 23:29:00 GMT\r\n\r\n")
    assert msg.get_all("Contact") == [
        '"Agent, Sales" <sip:a@b;x=1,2>', "<sip:c@d>;q=0.5", "sip:e@f"]
    assert msg.get_all("Allow") == ["INVITE", "ACK", "BYE"]
    assert msg.get_all("WWW-Authenticate") == ['Digest realm="edgecc", nonce="n1", qop="auth"']
    assert msg.get_all("Date") == ["Sat, 13 Nov 2010 23:29:00 GMT"]
    assert [c.display for c in msg.contacts] == ["Agent, Sales", None, None]
    assert msg.contacts[1].params == {"q": "0.5"}


def test_set_add_remove_keep_order_and_refresh_views() -> None:
    msg = parse_message(invite())
    assert msg.top_via.host == "192.0.2.10"
    msg.add("v", "SIP/2.0/TCP 198.51.100.7;branch=z9hG4bKx")
    assert [v.host for v in msg.vias] == ["192.0.2.10", "198.51.100.7"]
    msg.set("Via", "SIP/2.0/UDP 203.0.113.5;branch=z9hG4bKy")
    assert [v.host for v in msg.vias] == ["203.0.113.5"]
    assert [n for n, _ in msg.headers][:2] == ["Via", "Max-Forwards"]
    msg.set("X-Queue", "support")
    assert msg.headers[-1] == ("X-Queue", "support")
    msg.remove("x-queue")
    msg.remove("Contact")
    assert msg.get("X-Queue") is None and msg.contacts == []
    with pytest.raises(LocalProtocolError):
        msg.add("Subject", "evil\r\nVia: injected")
    with pytest.raises(LocalProtocolError):
        msg.set("Bad Name", "x")


def test_to_bytes_writes_a_correct_content_length() -> None:
    msg = parse_message(invite())
    msg.body = b"v=0\r\n"
    wire = msg.to_bytes()
    assert b"Content-Length: 5\r\n\r\nv=0\r\n" in wire
    assert wire.count(b"Content-Length") == 1
    assert parse_message(wire).body == b"v=0\r\n"
    msg.remove("Content-Length")
    assert b"Content-Length: 5\r\n" in msg.to_bytes()


def test_datagram_content_length_rules() -> None:
    # RFC 3261 §18.3: extra octets are discarded, a short body is an error, and without
    # Content-Length the body runs to the end of the datagram.
    assert parse_message(invite() + b"trailing junk").body == SDP
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(invite(content_length=str(len(SDP) + 1).encode()))
    assert err.value.status == 400 and not err.value.droppable
    assert err.value.message.call_id == "3848276298220188511@192.0.2.10"
    no_cl = invite().replace(b"Content-Length: %d\r\n" % len(SDP), b"")
    assert parse_message(no_cl).body == SDP
    assert parse_message(b"\r\n\r\n" + invite()).method == "INVITE"   # RFC 3261 §7.5


@pytest.mark.parametrize(("line", "status"), [
    (b"INVITE sip:a@b SIP/2.0", None),
    (b"invite sip:a@b sip/2.0", None),
    (b"INVITE sip:a@b SIP/3.1", 505),
    (b"INVITE sip:a@b HTTP/1.1", 400),
    (b"INVITE  sip:a@b SIP/2.0", 400),
    (b"INVITE sip:a@b", 400),
    (b"INV<TE sip:a@b SIP/2.0", 400),
    (b"SIP/2.0 180 Ringing", None),
    (b"SIP/2.0 99 Low", "drop"),
    (b"SIP/2.0 700 High", "drop"),
    (b"SIP/2.0 2000 OK", "drop"),
    (b"SIP/3.0 200 OK", "drop"),
])
def test_start_lines(line: bytes, status: object) -> None:
    raw = line + b"\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nCSeq: 1 INVITE\r\n\r\n"
    if status is None:
        msg = parse_message(raw)
        assert msg.version == "SIP/2.0"
        return
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(raw)
    if status == "drop":
        assert err.value.droppable
    else:
        assert err.value.status == status and not err.value.droppable
        assert err.value.message.get("Via") == "SIP/2.0/UDP h;branch=z9hG4bK1"


def test_malformed_header_line_is_answered_not_lost() -> None:
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(invite(extra=b"No colon here\r\n"))
    assert err.value.status == 400 and not err.value.droppable
    assert err.value.message.branch == "z9hG4bK74bf9"
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(invite(extra=b"Subject: a\rb\r\n"))
    assert err.value.status == 400


def test_bare_lf_line_ends_are_tolerated() -> None:
    msg = parse_message(invite().replace(b"\r\n", b"\n").replace(SDP.replace(b"\r\n", b"\n"),
                                                                 SDP))
    assert msg.method == "INVITE" and msg.body == SDP


def test_response_fields() -> None:
    msg = parse_message(b"SIP/2.0 486 Busy Here\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\n"
                        b"CSeq: 3 INVITE\r\nContent-Length: 0\r\n\r\n")
    assert (msg.is_request, msg.status, msg.reason, msg.method) == (False, 486, "Busy Here", None)
    assert msg.cseq == (3, "INVITE")
    with pytest.raises(LocalProtocolError):
        _ = msg.request_uri
    with pytest.raises(LocalProtocolError):
        check_request(msg)


# -- limits ----------------------------------------------------------------------------------

def test_too_many_headers_is_513() -> None:
    raw = invite(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(20)))
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(raw, Limits(max_headers=25))
    assert err.value.status == 513 and err.value.droppable
    assert parse_message(raw, Limits(max_headers=40)).get("X-H19") == "v"


def test_too_long_line_is_513() -> None:
    raw = invite(extra=b"Subject: " + b"x" * 300 + b"\r\n")
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(raw, Limits(max_line_bytes=200))
    assert err.value.status == 513
    with pytest.raises(RemoteProtocolError):
        parse_message(b"OPTIONS sip:" + b"a" * 300 + b" SIP/2.0\r\n\r\n",
                      Limits(max_line_bytes=200))


def test_too_many_vias_is_513_with_the_request_kept() -> None:
    vias = b"".join(b"Via: SIP/2.0/UDP p%d.example.com;branch=z9hG4bK%d\r\n" % (i, i)
                    for i in range(5))
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(invite().replace(b"Max-Forwards", vias + b"Max-Forwards"),
                      Limits(max_vias=4))
    assert err.value.status == 513 and not err.value.droppable
    # The same limit holds for Via entries in one comma-separated field.
    listed = invite().replace(b"rport\r\n", b"rport, SIP/2.0/UDP a, SIP/2.0/UDP b\r\n")
    msg = parse_message(listed, Limits(max_vias=2))
    with pytest.raises(RemoteProtocolError) as err:
        _ = msg.vias
    assert err.value.status == 513


def test_too_large_body_is_413_and_header_section_513() -> None:
    big = invite(body=b"x" * 2000)
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(big, Limits(max_message_bytes=1500))
    assert err.value.status == 413 and err.value.message.method == "INVITE"
    with pytest.raises(RemoteProtocolError) as err:
        parse_message(invite(extra=b"Subject: " + b"y" * 1500 + b"\r\n"),
                      Limits(max_message_bytes=1000))
    assert err.value.status == 513 and err.value.droppable


# -- URIs, name-addrs, Vias ------------------------------------------------------------------

def test_parse_uri_parts() -> None:
    u = parse_uri("sips:agent%201001:secret@[2001:db8::7]:5061;transport=tls;LR?subject=hi%20there&x=1")
    assert (u.scheme, u.user, u.password, u.host, u.port) == (
        "sips", "agent 1001", "secret", "[2001:db8::7]", 5061)
    assert u.params == {"transport": "tls", "lr": None}
    assert u.headers == {"subject": "hi there", "x": "1"}
    assert parse_uri(str(u)) == u
    assert str(parse_uri("sip:queue@pbx.example.com")) == "sip:queue@pbx.example.com"
    tel = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert (tel.scheme, tel.user, tel.params) == ("tel", "+1-201-555-0123",
                                                   {"phone-context": "example.com"})
    assert str(tel) == "tel:+1-201-555-0123;phone-context=example.com"
    urn = parse_uri("urn:service:sos")
    assert (urn.scheme, urn.opaque, str(urn)) == ("urn", "service:sos", "urn:service:sos")


@pytest.mark.parametrize("text", [
    "", "sip:", "sip:a@", "sip:a@b:99999", "sip:a@b:x", "<sip:a@b>", "sip:a b@c", "1sip:a",
    "sip:a@[::1", "sip:a@[zz::1]", "sip:a%zz@b", "sip:a@b;;x", "sip:a@b?", "sip:@b",
])
def test_parse_uri_refuses_garbage(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        parse_uri(text)
    assert err.value.status == 400


def test_name_addr_forms() -> None:
    na = parse_name_addr('"Agent \\"Ann\\"" <sip:1001@pbx>;tag=abc;expires=60')
    assert na.display == 'Agent "Ann"' and na.tag == "abc" and na.params["expires"] == "60"
    assert parse_name_addr(str(na)) == na
    bare = parse_name_addr("sip:1001@pbx;tag=x")
    assert bare.display is None and bare.tag == "x" and bare.uri.params == {}
    assert parse_name_addr("Ann Smith <sip:a@b>").display == "Ann Smith"
    star = parse_name_addr("*")
    assert star.is_wildcard and str(star) == "*"
    inst = parse_name_addr('<sip:a@b>;+sip.instance="<urn:uuid:00000000-0000-1000>"')
    assert inst.params["+sip.instance"] == '"<urn:uuid:00000000-0000-1000>"'
    built = NameAddr(SipUri("sip", user="1001", host="pbx"), display="Ann", params={"tag": "t"})
    assert str(built) == '"Ann" <sip:1001@pbx>;tag=t'


@pytest.mark.parametrize("text", [
    '"open <sip:a@b>', "Ann, Smith <sip:a@b>", "< sip:a@b>", "<sip:a@b", "sip:a@b?x=y",
    "<sip:a@b> junk", "<sip:a@b>;=x", "<sip:a@b>;t=", "",
])
def test_name_addr_refuses_garbage(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_name_addr(text)


def test_via_parameters() -> None:
    v = parse_via("SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK1;rport;received=198.51.100.1")
    assert (v.protocol, v.transport, v.host, v.port) == ("SIP/2.0", "UDP", "192.0.2.10", 5062)
    assert (v.branch, v.rport, v.received) == ("z9hG4bK1", "", "198.51.100.1")
    assert parse_via(str(v)) == v
    assert parse_via("SIP/2.0/TCP h;rport=5070").rport == "5070"
    assert parse_via("SIP/2.0/TCP h").rport is None and parse_via("SIP/2.0/TCP h").branch is None
    v6 = parse_via("SIP/2.0/TLS [2001:db8::1]:5061;branch=z9hG4bK2")
    assert (v6.host, v6.port, v6.sent_by) == ("[2001:db8::1]", 5061, "[2001:db8::1]:5061")
    assert str(Via("TCP", "h", 5060, {"branch": "z9hG4bKq"})) == "SIP/2.0/TCP h:5060;branch=z9hG4bKq"


@pytest.mark.parametrize("text", [
    "SIP/2.0 h", "SIP/2.0/UDP", "SIP/2.0/UDP h;", "SIP/2.0/UDP h:0x1", "SIP/2.0/UDP h;a=\"x",
    "SIP/2.0/UDP h;branch=a b",
])
def test_via_refuses_garbage(text: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_via(text)


# -- RFC 3261 §8.2 checks --------------------------------------------------------------------

def test_check_request_passes_a_good_invite() -> None:
    check_request(parse_message(invite()))
    check_request(parse_message(invite(extra=b"Accept: application/*\r\n")))
    check_request(parse_message(invite(extra=b"Require: timer\r\n")),
                  supported=frozenset({"timer"}))
    tel = parse_message(invite().replace(b"sip:1001@192.0.2.1 SIP", b"tel:+15551001 SIP"))
    check_request(tel)


@pytest.mark.parametrize(("extra", "status", "headers"), [
    (b"Max-Forwards: 1\r\n", 400, ()),
    (b"Require: 100rel, timer\r\n", 420, (("Unsupported", "100rel, timer"),)),
    (b"Accept: text/plain\r\n", 406, ()),
    (b"Content-Encoding: gzip\r\n", 415, (("Accept-Encoding", "identity"),)),
    (b"Date: Sat, 13 Nov 2010 23:29:00 PST\r\n", 400, ()),
])
def test_check_request_refusals(extra: bytes, status: int, headers: tuple) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        check_request(parse_message(invite(extra=extra)))
    assert err.value.status == status and err.value.headers == headers
    assert not err.value.droppable and err.value.message is not None


def test_check_request_max_forwards_zero() -> None:
    with pytest.raises(RemoteProtocolError) as err:
        check_request(parse_message(invite().replace(b"Max-Forwards: 70", b"Max-Forwards: 0")))
    assert err.value.status == 483
    check_request(parse_message(options().replace(b"Max-Forwards: 70", b"Max-Forwards: 0")))


def test_check_request_methods_and_media() -> None:
    msg = parse_message(options())
    with pytest.raises(RemoteProtocolError) as err:
        check_request(msg, allow=frozenset({"INVITE", "BYE"}))
    assert (err.value.status, err.value.headers) == (405, (("Allow", "BYE, INVITE"),))
    odd = parse_message(options().replace(b"OPTIONS", b"FROBNICATE"))
    with pytest.raises(RemoteProtocolError) as err:
        check_request(odd, allow=frozenset({"INVITE"}))
    assert err.value.status == 501
    with pytest.raises(RemoteProtocolError) as err:
        check_request(parse_message(invite().replace(b"Content-Type: application/sdp\r\n", b"")))
    assert err.value.status == 400
    with pytest.raises(RemoteProtocolError) as err:
        check_request(parse_message(invite().replace(b"Via: SIP/2.0/UDP 192.0.2.10:5062;"
                                                     b"branch=z9hG4bK74bf9;rport\r\n", b"")))
    assert err.value.status == 400 and err.value.droppable


# -- building messages -----------------------------------------------------------------------

def test_build_response_copies_the_dialog_fields() -> None:
    req = parse_message(invite().replace(b"Max-Forwards", b"Via: SIP/2.0/UDP p2;branch=z9hG4bK2"
                                         b"\r\nMax-Forwards"))
    resp = build_response(req, 180, to_tag="agent-7", headers=[("Contact", "<sip:1001@pbx>")])
    assert resp.reason == "Ringing" and not resp.is_request
    assert resp.get_all("Via") == req.get_all("Via")
    assert resp.to.tag == "agent-7" and resp.from_ == req.from_
    assert resp.get("Call-ID") == req.get("Call-ID") and resp.cseq == (1, "INVITE")
    assert resp.get("Max-Forwards") is None and resp.get("Contact") == "<sip:1001@pbx>"
    wire = resp.to_bytes()
    assert wire.startswith(b"SIP/2.0 180 Ringing\r\n") and wire.endswith(b"Content-Length: 0\r\n\r\n")
    again = build_response(parse_message(resp.to_bytes().replace(b"SIP/2.0 180 Ringing",
                                                                 b"BYE sip:x@y SIP/2.0")), 200,
                           to_tag="other")
    assert again.to.tag == "agent-7"
    assert build_response(req, 299).reason == "OK"
    with pytest.raises(LocalProtocolError):
        build_response(req, 99)


def test_build_request_round_trips() -> None:
    req = build_request("OPTIONS", SipUri("sip", host="192.0.2.1", port=5062), headers=[
        ("v", f"SIP/2.0/UDP 127.0.0.1:5070;branch={new_branch()}"),
        ("Max-Forwards", "70"), ("f", f"<sip:probe@edgecc>;tag={new_tag()}"),
        ("t", "<sip:192.0.2.1>"), ("i", "probe-1"), ("CSeq", "1 OPTIONS")], body=b"")
    back = parse_message(req.to_bytes())
    check_request(back)
    assert back.uri == "sip:192.0.2.1:5062" and back.headers[0][0] == "Via"
    assert back.branch.startswith("z9hG4bK") and len(back.branch) > 16
    with pytest.raises(LocalProtocolError):
        build_request("BAD METHOD", "sip:a@b", headers=[])
    assert SipMessage(method="BYE", uri="sip:a@b", headers=[("CSeq", "2 BYE")]).cseq == (2, "BYE")


def test_branches_and_tags_are_fresh() -> None:
    branches = {new_branch() for _ in range(200)}
    tags = {new_tag() for _ in range(200)}
    assert len(branches) == 200 and len(tags) == 200
    assert all(b.startswith("z9hG4bK") for b in branches)
    assert all(len(t) >= 8 for t in tags)


# -- stream framing (fed whole, byte by byte, with trailing bytes) ---------------------------

def drain(framer: StreamFramer) -> list[SipMessage]:
    out = []
    while (msg := framer.next_message()) is not None:
        out.append(msg)
    return out


STREAM = invite() + options("o1") + invite(body=b"") + options("o2")


def _call_ids(msgs: list[SipMessage]) -> list[str]:
    return [m.call_id for m in msgs]


EXPECTED = ["3848276298220188511@192.0.2.10", "o1", "3848276298220188511@192.0.2.10", "o2"]


def test_stream_whole() -> None:
    framer = StreamFramer()
    framer.feed(STREAM)
    msgs = drain(framer)
    assert _call_ids(msgs) == EXPECTED and msgs[0].body == SDP and msgs[2].body == b""
    assert framer.buffered == 0


def test_stream_byte_by_byte() -> None:
    framer = StreamFramer()
    msgs = []
    for i in range(len(STREAM)):
        framer.feed(STREAM[i:i + 1])
        msgs.extend(drain(framer))
    assert _call_ids(msgs) == EXPECTED and msgs[0].body == SDP


def test_stream_with_trailing_bytes() -> None:
    framer = StreamFramer()
    framer.feed(STREAM + invite()[:50])
    assert _call_ids(drain(framer)) == EXPECTED
    assert framer.buffered == 50
    framer.feed(invite()[50:])
    assert drain(framer)[0].body == SDP
    framer.feed(b"GARBAGE LINE\r\n\r\n" + options("after"))
    with pytest.raises(RemoteProtocolError) as err:
        framer.next_message()
    assert err.value.droppable      # no Via to answer to
    assert framer.next_message().call_id == "after"


@pytest.mark.parametrize("chunk", [1, 3, 10_000])
def test_stream_keepalives(chunk: int) -> None:
    framer = StreamFramer()
    data = b"\r\n\r\n" + options("a") + b"\r\n\r\n\r\n\r\n" + b"\r\n" + options("b")
    msgs = []
    for i in range(0, len(data), chunk):
        framer.feed(data[i:i + chunk])
        msgs.extend(drain(framer))
    assert _call_ids(msgs) == ["a", "b"]
    assert framer.keepalive_pings == 3
    framer.feed(b"\r\n")
    assert framer.next_message() is None
    framer.feed(b"\r\n")
    assert framer.next_message() is None and framer.keepalive_pings == 4


def test_stream_bad_message_does_not_lose_the_next_one() -> None:
    framer = StreamFramer()
    framer.feed(invite().replace(b"SIP/2.0\r\n", b"SIP/2.1\r\n", 1) + options("next"))
    with pytest.raises(RemoteProtocolError) as err:
        framer.next_message()
    assert err.value.status == 505 and err.value.message.body == SDP
    assert framer.next_message().call_id == "next"


def test_stream_content_length_beyond_limit_is_clean() -> None:
    framer = StreamFramer(Limits(max_message_bytes=4096))
    framer.feed(invite(body=b"", content_length=b"1000000"))
    with pytest.raises(RemoteProtocolError) as err:
        framer.next_message()
    assert err.value.status == 413 and err.value.message.method == "INVITE"
    with pytest.raises(LocalProtocolError):
        framer.next_message()
    with pytest.raises(LocalProtocolError):
        framer.feed(b"more")


def test_stream_unframeable_and_oversized() -> None:
    bad = StreamFramer()
    bad.feed(invite(content_length=b"-5"))
    with pytest.raises(RemoteProtocolError) as err:
        bad.next_message()
    assert err.value.status == 400 and err.value.droppable
    endless = StreamFramer(Limits(max_message_bytes=2048))
    with pytest.raises(RemoteProtocolError) as err:
        for _ in range(100):
            endless.feed(b"X-Header: " + b"z" * 60 + b"\r\n")
            assert endless.next_message() is None
    assert err.value.status == 513
    small = StreamFramer(Limits(max_message_bytes=1000), max_buffer_bytes=1500)
    with pytest.raises(RemoteProtocolError) as err:
        small.feed(b"x" * 2000)
    assert err.value.status == 513


def test_stream_without_content_length_has_no_body() -> None:
    framer = StreamFramer()
    framer.feed(options("x").replace(b"Content-Length: 0\r\n", b"") + options("y"))
    assert _call_ids(drain(framer)) == ["x", "y"]


@pytest.mark.parametrize(
    ("text", "pairs"),
    [
        ("", []),
        ('realm="r, with comma", nonce=abc', [("realm", "r, with comma"), ("nonce", "abc")]),
        ('Username = "a\\"b" ,QOP=auth,', [("username", 'a"b'), ("qop", "auth")]),
        ('uri="sip:x\nsip:y"', [("uri", "sip:x\nsip:y")]),  # a raw line feed may be quoted
        ("a=", [("a", "")]),
    ],
)
def test_auth_params_are_split_names_lowered_values_unquoted(text, pairs) -> None:
    # RFC 7235 §2.1 auth-param lists as Authorization and WWW-Authenticate carry them.
    assert split_auth_params(text) == pairs


@pytest.mark.parametrize(
    "text",
    [" ", "a=b c=d", "a=b,,c=d", 'a="unclosed', 'a="x"y', "=b", "a b=c", 'a="x\\\ny"', "a=b, "],
)
def test_malformed_auth_params_give_none(text) -> None:
    assert split_auth_params(text) is None
