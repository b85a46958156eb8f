"""SDP (RFC 4566) parsing and serialization, and offer/answer (RFC 3264).

Descriptions come from real peers where one is installed (SIPp's built-in scenarios, a pjsua2
endpoint's actual offer), from the RFC 5118 / RFC 4475 vector files, and from the examples of
RFC 3264 §10. Well-formed vectors round-trip byte for byte.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_core import sdp
from media_core.sdp import (
    Capabilities,
    Direction,
    MediaSession,
    NotAcceptable,
    SdpError,
    answer,
    build_offer,
    parse,
    parse_answer,
)

VECTORS = Path(__file__).parent / "vectors" / "sip"
CAPS = Capabilities()


def crlf(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode()


def sip_body(path: Path) -> bytes:
    """The SDP body of a vector file (RFC 5118's files use bare LF), with CRLF line ends."""
    raw = path.read_bytes().replace(b"\r\n", b"\n")
    return raw.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")


def round_trip(data: bytes) -> sdp.SessionDescription:
    desc = parse(data)
    assert desc.to_bytes() == data
    return desc


# RFC 5118 §4.6 (ipv6-in-sdp): IPv6 in o= and c=, two streams.
def test_rfc5118_ipv6_in_sdp() -> None:
    d = round_trip(sip_body(VECTORS / "rfc5118" / "ipv6-in-sdp"))
    assert d.origin.username == "assistant"
    assert d.origin.session_id == "971731711378798081"
    assert d.origin.version == 0
    assert (d.origin.addrtype, d.origin.address) == ("IP6", "2001:db8::20")
    assert d.session_name == "Live video feed for today's meeting"
    assert d.connection == sdp.Connection("IN", "IP6", "2001:db8::20")
    assert d.times == (("3338481189 3370017201", ()),)
    audio, video = d.media
    assert (audio.media, audio.port, audio.proto, audio.formats) == ("audio", 6000, "RTP/AVP", ("2",))
    assert audio.codecs == (sdp.Codec(2, "G726-32", 8000),)
    assert (video.media, video.port, video.formats) == ("video", 6024, ("107",))
    assert video.codecs[0].name == "H263-1998" and video.codecs[0].clock_rate == 90000
    # No common codec (G726-32 only): 488.
    with pytest.raises(NotAcceptable) as info:
        answer(d, CAPS, "2001:db8::10", 7000)
    assert info.value.status == 488 and "G726-32" in str(info.value)


# RFC 5118 §4.7 (mult-ip-in-sdp): an IPv4 audio stream and an IPv6 video stream, empty s=.
def test_rfc5118_mult_ip_in_sdp() -> None:
    d = round_trip(sip_body(VECTORS / "rfc5118" / "mult-ip-in-sdp"))
    assert d.origin == sdp.Origin("bob", "280744730", 28977631, "IN", "IP4", "host.example.com")
    assert d.session_name == ""
    assert d.connection is None
    audio, video = d.media
    assert audio.connection == sdp.Connection("IN", "IP4", "192.0.2.1")
    assert video.connection == sdp.Connection("IN", "IP6", "2001:db8::1")
    result = answer(d, CAPS, "192.0.2.200", 30000, session_id="42")
    assert (result.remote_address, result.remote_port) == ("192.0.2.1", 22334)
    assert [c.name for c in result.codecs] == ["PCMU"]
    assert result.telephone_event_pt is None   # not offered
    a_audio, a_video = result.sdp.media
    assert a_audio.port == 30000 and a_audio.formats == ("0",)
    assert a_video.port == 0 and a_video.media == "video"   # RFC 3264 §6: rejected, kept
    assert parse(result.sdp.to_bytes()) == result.sdp


# RFC 5118 §4.5 (ipv4-mapped-ipv6) in SDP.
def test_rfc5118_ipv4_mapped_ipv6() -> None:
    d = round_trip(sip_body(VECTORS / "rfc5118" / "ipv4-mapped-ipv6"))
    assert d.connection is not None and d.connection.address == "::ffff:192.0.2.2"


# RFC 4475 §3.3.15 (sdp01): PCMU + QCELP audio, LPC video; body parses, we take PCMU only.
def test_rfc4475_sdp01_answer() -> None:
    d = round_trip(sip_body(VECTORS / "rfc4475" / "sdp01.dat"))
    assert d.media[0].formats == ("0", "12")
    result = answer(d, CAPS, "127.0.0.1", 20000)
    assert result.sdp.media[0].formats == ("0",)
    assert result.sdp.media[1].port == 0


RFC3264_10_1_OFFER = crlf("""
    v=0
    o=alice 2890844526 2890844526 IN IP4 host.anywhere.com
    s=
    c=IN IP4 host.anywhere.com
    t=0 0
    m=audio 49170 RTP/AVP 0
    a=rtpmap:0 PCMU/8000
    m=video 51372 RTP/AVP 31
    a=rtpmap:31 H261/90000
    m=video 53000 RTP/AVP 32
    a=rtpmap:32 MPV/90000
""")


# RFC 3264 §10.1: audio accepted, both video streams rejected by us (audio-only site).
def test_rfc3264_basic_exchange() -> None:
    offer = round_trip(RFC3264_10_1_OFFER)
    result = answer(offer, CAPS, "192.0.2.7", 49920, session_id="2890844730", version=0)
    text = result.sdp.to_bytes().decode()
    assert text == (
        "v=0\r\no=edgecc 2890844730 0 IN IP4 192.0.2.7\r\ns=-\r\nc=IN IP4 192.0.2.7\r\n"
        "t=0 0\r\nm=audio 49920 RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=ptime:20\r\n"
        "a=sendrecv\r\nm=video 0 RTP/AVP 31\r\nm=video 0 RTP/AVP 32\r\n"
    )
    assert result.remote_address == "host.anywhere.com"
    assert result.direction is Direction.SENDRECV and not result.on_hold


# RFC 3264 §10.2: one-of-N codec selection offered inactive; the answer stays inactive.
def test_rfc3264_inactive_offer_stays_inactive() -> None:
    offer = parse(crlf("""
        v=0
        o=alice 2890844526 2890844526 IN IP4 host.anywhere.com
        s=
        c=IN IP4 host.anywhere.com
        t=0 0
        m=audio 62986 RTP/AVP 0 4 18
        a=rtpmap:0 PCMU/8000
        a=rtpmap:4 G723/8000
        a=rtpmap:18 G729/8000
        a=inactive
    """))
    result = answer(offer, CAPS, "127.0.0.1", 20000)
    assert result.direction is Direction.INACTIVE
    assert result.sdp.media[0].direction is Direction.INACTIVE
    assert result.on_hold


def _sipp_sdp(scenario: str) -> bytes:
    out = subprocess.run(["sipp", "-sd", scenario], capture_output=True, text=True, timeout=20)
    match = re.search(r"(v=0\n.*?)\n\s*\n?\s*\]\]>", out.stdout, re.S)
    assert match, f"no SDP in sipp's {scenario} scenario"
    body = "\n".join(line.strip() for line in match.group(1).splitlines() if line.strip())
    for placeholder, value in {
        "[local_ip_type]": "4", "[media_ip_type]": "4", "[local_ip]": "127.0.0.1",
        "[media_ip]": "127.0.0.1", "[media_port]": "6000", "[auto_media_port]": "6002",
    }.items():
        body = body.replace(placeholder, value)
    return (body + "\n").replace("\n", "\r\n").encode()


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")
def test_sipp_uac_offer() -> None:
    d = round_trip(_sipp_sdp("uac"))
    result = answer(d, CAPS, "127.0.0.1", 20000)
    assert result.codec == sdp.PCMU
    assert result.remote_port == 6000
    assert result.telephone_event_pt is None


@pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp not installed")
def test_sipp_uac_pcap_offer_telephone_event() -> None:
    d = round_trip(_sipp_sdp("uac_pcap"))
    assert d.media[0].codecs[1].fmtp == "0-11,16"
    result = answer(d, CAPS, "127.0.0.1", 20000)
    assert result.codec == sdp.PCMA
    assert result.telephone_event_pt == 101
    assert result.sdp.media[0].formats == ("8", "101")
    # RFC 4733 §7.1.1: the events we answer are those both sides handle.
    assert "101 0-11,16" in result.sdp.media[0].attribute_values("fmtp")


PJSUA_OFFER = r"""
import os, socket, sys
import pjsua2 as pj
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind(("127.0.0.1", 0)); sock.settimeout(45)
ep = pj.Endpoint(); ep.libCreate()
cfg = pj.EpConfig(); cfg.logConfig.level = 0; cfg.logConfig.consoleLevel = 0
ep.libInit(cfg)
tc = pj.TransportConfig(); tc.port = 0; tc.boundAddress = "127.0.0.1"
ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tc)
ep.audDevManager().setNullDev()
ep.libStart()
acc = pj.Account(); ac = pj.AccountConfig(); ac.idUri = "sip:agent@127.0.0.1"
# Free RTP ports (the default 4000 may be taken by another test), on loopback only.
ac.mediaConfig.transportConfig.port = 0
ac.mediaConfig.transportConfig.boundAddress = "127.0.0.1"
acc.create(ac)
call = pj.Call(acc)
try:
    call.makeCall("sip:ivr@127.0.0.1:%d" % sock.getsockname()[1], pj.CallOpParam(True))
except pj.Error as exc:
    sys.stderr.write("makeCall: %s\n" % exc.info())
    os._exit(3)
data, _ = sock.recvfrom(65535)
sys.stdout.buffer.write(b"SDP>" + data.split(b"\r\n\r\n", 1)[1])
sys.stdout.flush()
os._exit(0)
"""


def test_pjsua2_real_offer() -> None:
    pytest.importorskip("pjsua2")
    proc = subprocess.run([sys.executable, "-c", PJSUA_OFFER], capture_output=True, timeout=90)
    assert proc.returncode == 0 and b"SDP>" in proc.stdout, (
        f"pjsua2 exited {proc.returncode}: {proc.stderr[-2000:].decode(errors='replace')}"
    )
    body = proc.stdout.split(b"SDP>", 1)[1]
    d = round_trip(body)
    assert d.session_name == "pjmedia"
    audio = d.media[0]
    assert audio.rtcp is not None and audio.rtcp[0] == audio.port + 1
    result = answer(d, CAPS, "127.0.0.1", 20000)
    # pjsua prefers speex/iLBC/GSM first; among ours its order is PCMU, PCMA, G722.
    assert [c.name for c in result.codecs] == ["PCMU", "PCMA", "G722"]
    # Three telephone-event rates offered: the 8000 Hz one matches our audio clock.
    te = [c for c in audio.codecs if c.name == "telephone-event" and c.clock_rate == 8000][0]
    assert result.telephone_event_pt == te.payload_type
    assert result.sdp.media[0].formats == ("0", "8", "9", str(te.payload_type))
    assert result.remote_rtcp == audio.rtcp
    assert (result.remote_address, result.remote_port) == ("127.0.0.1", audio.port)


PHONE_OFFER = (
    "v=0\n"
    "o=- 1 1 IN IP4 10.0.0.5 \n"
    "s=\n"
    "c=IN IP4 10.0.0.5\n"
    "t=0 0\n"
    "\n"
    "m=audio 5004 RTP/AVP 18 8 0 98\n"
    "a=rtpmap:98 Telephone-Event/8000\n"
    "a=fmtp:98 0-15\n"
    "a=rtpmap:8 pcma/8000\n"
    "a=rtpmap:100 unused/8000\n"
    "a=ptime:30\n"
)


def test_tolerates_common_phone_quirks() -> None:
    d = parse(PHONE_OFFER.encode())   # bare LF, trailing blank, blank line, names in any case
    result = answer(d, CAPS, "10.0.0.1", 20000)
    assert [c.payload_type for c in result.codecs] == [8, 0]   # offerer's order, G.729 dropped
    assert result.telephone_event_pt == 98
    assert result.remote_ptime == 30
    assert "98 0-15" in result.sdp.media[0].attribute_values("fmtp")


def test_dynamic_payload_type_for_static_codec_is_kept() -> None:
    d = parse(crlf("""
        v=0
        o=- 7 7 IN IP4 192.0.2.1
        s=-
        c=IN IP4 192.0.2.1
        t=0 0
        m=audio 4000 RTP/AVP 96 101
        a=rtpmap:96 PCMA/8000
        a=rtpmap:101 telephone-event/8000
    """))
    result = answer(d, CAPS, "192.0.2.2", 4002)
    assert result.codec.payload_type == 96 and result.codec.name == "PCMA"
    assert result.sdp.media[0].formats == ("96", "101")
    # No fmtp offered means events 0-15 (RFC 4733 §7.1.1).
    assert "101 0-15" in result.sdp.media[0].attribute_values("fmtp")


HOLD_TEMPLATE = """
    v=0
    o=phone 55 {version} IN IP4 192.0.2.9
    s=-
    c=IN IP4 {address}
    t=0 0
    m=audio 4000 RTP/AVP 0 101
    a=rtpmap:0 PCMU/8000
    a=rtpmap:101 telephone-event/8000
    a=fmtp:101 0-16
    {direction}
"""


@pytest.mark.parametrize(
    ("address", "direction", "ours", "held"),
    [
        ("192.0.2.9", "a=sendrecv", Direction.SENDRECV, False),
        ("192.0.2.9", "a=sendonly", Direction.RECVONLY, True),     # RFC 3264 §8.4
        ("192.0.2.9", "a=recvonly", Direction.SENDONLY, False),
        ("192.0.2.9", "a=inactive", Direction.INACTIVE, True),
        ("0.0.0.0", "a=sendrecv", Direction.RECVONLY, True),       # RFC 2543 hold
        ("0.0.0.0", "a=recvonly", Direction.INACTIVE, True),
    ],
)
def test_direction_mirrored_and_hold_detected(
    address: str, direction: str, ours: Direction, held: bool
) -> None:
    offer = parse(crlf(HOLD_TEMPLATE.format(version=2, address=address, direction=direction)))
    result = answer(offer, CAPS, "192.0.2.1", 20000)
    assert result.direction is ours
    assert result.sdp.media[0].direction is ours
    assert result.on_hold is held


def test_session_level_direction_applies_to_media() -> None:
    text = HOLD_TEMPLATE.format(version=2, address="192.0.2.9", direction="")
    text = text.replace("t=0 0", "t=0 0\n    a=sendonly")
    result = answer(parse(crlf(text)), CAPS, "192.0.2.1", 20000)
    assert result.direction is Direction.RECVONLY and result.on_hold


def test_our_offer_and_their_answer() -> None:
    offer = build_offer(CAPS, "::1", 20000, session_id="99", rtcp_port=20001)
    text = offer.to_bytes().decode()
    assert text == (
        "v=0\r\no=edgecc 99 0 IN IP6 ::1\r\ns=-\r\nc=IN IP6 ::1\r\nt=0 0\r\n"
        "m=audio 20000 RTP/AVP 0 8 9 101\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:8 PCMA/8000\r\n"
        "a=rtpmap:9 G722/8000\r\na=rtpmap:101 telephone-event/8000\r\na=fmtp:101 0-16\r\n"
        "a=ptime:20\r\na=rtcp:20001 IN IP6 ::1\r\na=sendrecv\r\n"
    )
    # The peer answers with our own answer logic (PCMA only): consistent both ways.
    peer_caps = Capabilities(codecs=(sdp.PCMA,))
    their = answer(parse(offer.to_bytes()), peer_caps, "::1", 30000).sdp
    agreed = parse_answer(offer, parse(their.to_bytes()))
    assert agreed.codec.name == "PCMA" and agreed.telephone_event_pt == 101
    assert (agreed.remote_address, agreed.remote_port) == ("::1", 30000)


def test_answer_that_does_not_fit_the_offer_is_refused() -> None:
    offer = build_offer(CAPS, "127.0.0.1", 20000)
    bad_codec = parse(crlf("""
        v=0
        o=x 1 1 IN IP4 127.0.0.1
        s=-
        c=IN IP4 127.0.0.1
        t=0 0
        m=audio 30000 RTP/AVP 18
    """))
    with pytest.raises(SdpError, match="G729"):
        parse_answer(offer, bad_codec)
    rejected = parse(crlf("""
        v=0
        o=x 1 1 IN IP4 127.0.0.1
        s=-
        t=0 0
        m=audio 0 RTP/AVP 0
    """))
    with pytest.raises(NotAcceptable):
        parse_answer(offer, rejected)
    two = replace_media_count(bad_codec)
    with pytest.raises(SdpError, match="m= lines"):
        parse_answer(offer, two)


def replace_media_count(d: sdp.SessionDescription) -> sdp.SessionDescription:
    from dataclasses import replace

    return replace(d, media=d.media * 2)


def test_media_session_versions_for_hold_and_resume() -> None:
    session = MediaSession(CAPS, "127.0.0.1", 20000, session_id="1000")
    first = session.offer()
    assert first.origin.version == 0
    assert session.offer().origin.version == 0          # unchanged re-offer keeps the version
    held = session.hold()
    assert held.origin.version == 1
    assert held.media[0].direction is Direction.SENDONLY
    assert held.origin.session_id == "1000"
    resumed = session.resume()
    assert resumed.origin.version == 2
    assert resumed.media[0].direction is Direction.SENDRECV
    # The peer answers our hold with recvonly: we send only, they are held.
    peer_answer = answer(parse(held.to_bytes()), CAPS, "127.0.0.2", 30000).sdp
    assert peer_answer.media[0].direction is Direction.RECVONLY


def test_media_session_answers_re_offer_with_new_version() -> None:
    session = MediaSession(CAPS, "127.0.0.1", 20000, session_id="7")
    offer = parse(crlf(HOLD_TEMPLATE.format(version=1, address="192.0.2.9", direction="")))
    assert session.answer(offer).sdp.origin.version == 0
    assert session.answer(offer).sdp.origin.version == 0
    hold = parse(crlf(HOLD_TEMPLATE.format(version=2, address="192.0.2.9", direction="a=sendonly")))
    held = session.answer(hold)
    assert held.sdp.origin.version == 1 and held.direction is Direction.RECVONLY
    with pytest.raises(SdpError, match="not sent an offer"):
        session.receive_answer(offer)


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("", None, "empty"),
        ("v=1\r\n", 1, "v=0"),
        ("v=0\r\ns=-\r\n", 1, "no o="),
        ("v=0\r\no=- x 1 IN IP4 1.2.3.4\r\n", 2, "decimal"),
        ("v=0\r\no=- 1 1 IN IP4\r\n", 2, "o= needs"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 2001:db8::1\r\n", 3, "IPv4"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP6 2001:db8:::1\r\n", 3, "IPv6"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP6 [2001:db8::1]\r\n", 3, "IPv6"),
        ("v=0\r\no=- 1 1 ATM NSAP 1.2.3.4\r\n", 2, "network type"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio x RTP/AVP 0\r\n", 4,
         "bad port"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0 200\r\n",
         4, "0-127"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP\r\n", 4,
         "m= needs"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\n"
         "a=rtpmap:0 PCMU\r\n", 5, "rtpmap"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0\r\n", 4, "no c="),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\n"
         "a=rtcp:x\r\n", 5, "rtcp"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\n"
         "a=rtcp:4001 IN IP4\r\n", 5, "rtcp"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nx=foo\r\n", 3, "unknown line type"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nc=IN IP4 1.2.3.4\r\nm=audio 4000 RTP/AVP 0\r\n"
         "t=0 0\r\n", 5, "not allowed inside"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nhello\r\n", 3, "type>=<value"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nb=AS\r\n", 3, "b= needs"),
        ("v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\nt=now\r\n", 3, "t= needs"),
    ],
)
def test_bad_sdp_names_the_line(text: str, line: int | None, message: str) -> None:
    with pytest.raises(SdpError, match=message) as info:
        parse(text.encode())
    assert info.value.line == line
    assert isinstance(info.value, ValueError)


def test_bad_utf8_and_size_limit() -> None:
    with pytest.raises(SdpError) as info:
        parse(b"v=0\r\no=- 1 1 IN IP4 1.2.3.4\r\ns=\xff\r\n")
    assert info.value.line == 3
    with pytest.raises(SdpError, match="limit"):
        parse(b"v=0\r\n" + b"a=x\r\n" * 20000)


def test_parse_three_ways_whole_truncated_and_garbage() -> None:
    body = round_trip(RFC3264_10_1_OFFER).to_bytes()
    # Cut anywhere: either a shorter valid description or a clean SdpError, never anything else.
    outcomes = set()
    for cut in range(len(body)):
        try:
            d = parse(body[:cut])
        except SdpError:
            outcomes.add("error")
        else:
            assert parse(d.to_bytes()) == d
            outcomes.add("parsed")
    assert outcomes == {"error", "parsed"}
    with pytest.raises(SdpError):
        parse(body + b"garbage\r\n")


def test_secure_or_feedback_profiles_only_is_488() -> None:
    offer = parse(crlf("""
        v=0
        o=- 1 1 IN IP4 192.0.2.1
        s=-
        c=IN IP4 192.0.2.1
        t=0 0
        m=audio 4000 RTP/SAVP 0 8
        a=crypto:1 AES_CM_128_HMAC_SHA1_80 inline:WVNfX19zZW1jdGwgKCkgewkyMjA7fQp9CnVubGVz
    """))
    with pytest.raises(NotAcceptable) as info:
        answer(offer, CAPS, "192.0.2.2", 4002)
    assert info.value.status == 488


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_any_bytes_parse_or_sdp_error(data: bytes) -> None:
    try:
        d = parse(data)
    except SdpError:
        return
    assert parse(d.to_bytes()) == d


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_offer(data: st.DataObject) -> None:
    body = bytearray(RFC3264_10_1_OFFER)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(body) - 1))
        body[pos] = data.draw(st.integers(0, 255))
    try:
        d = parse(bytes(body))
    except SdpError:
        return
    assert parse(d.to_bytes()) == d
    try:
        result = answer(d, CAPS, "127.0.0.1", 20000)
    except NotAcceptable:
        return
    assert parse(result.sdp.to_bytes()) == result.sdp
