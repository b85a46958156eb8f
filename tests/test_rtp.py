"""RTP packets (RFC 3550 §5, RFC 8285) and receiver statistics (RFC 3550 Appendix A).

Vectors live in tests/vectors/rtp (written by make_vectors.py from the RFC layouts, or copied
out of SIPp's shipped captures); each is parsed, every field asserted, serialized and compared
byte for byte.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_core._rtp import rewrite_header, write_header
from media_core.rtp import (
    ExtensionElement,
    ReceptionStats,
    RtpPacket,
    RtpParseError,
    is_rtcp,
    parse_extension_elements,
    rtt_from_report,
)

VECTORS = Path(__file__).parent / "vectors" / "rtp"


def vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def round_trip(data: bytes) -> RtpPacket:
    packet = RtpPacket.parse(data)
    assert packet.to_bytes() == data
    return packet


# RFC 3550 §5.1: fixed header only; RFC 3551 PT 0 (PCMU), 160 samples of mu-law silence.
def test_vector_fixed_header_pcmu() -> None:
    p = round_trip(vector("rtp_pcmu.bin"))
    assert p.version == 2
    assert p.payload_type == 0
    assert p.marker is False
    assert p.sequence_number == 0x1234
    assert p.timestamp == 0x89ABCDEF
    assert p.ssrc == 0xDEADBEEF
    assert p.csrc == ()
    assert p.extension_profile is None and p.extension == b""
    assert p.padding == 0
    assert p.payload == b"\xff" * 160


# RFC 3550 §5.1 (CSRC list, P bit) + §5.3.1 header extension in RFC 8285 §4.2 one-byte form.
def test_vector_csrc_extension_padding() -> None:
    p = round_trip(vector("rtp_csrc_ext_pad.bin"))
    assert p.payload_type == 96
    assert p.marker is True
    assert p.sequence_number == 65535
    assert p.timestamp == 0xFFFFFF60
    assert p.ssrc == 0x01020304
    assert p.csrc == (0x11111111, 0x22222222)
    assert p.extension_profile == 0xBEDE
    assert p.extension == bytes([0x10, 0x85, 0x32, 0xAA, 0xBB, 0xCC, 0, 0])
    assert p.extension_elements() == [
        ExtensionElement(1, b"\x85"),
        ExtensionElement(3, b"\xaa\xbb\xcc"),
    ]
    assert p.padding == 4
    assert p.payload == b"\x01\x02\x03\x04\x05"


# RFC 8285 §4.3: two-byte header extension (profile 0x100X), a zero-length element included.
def test_vector_two_byte_extension() -> None:
    p = round_trip(vector("rtp_two_byte_ext.bin"))
    assert (p.payload_type, p.sequence_number, p.timestamp, p.ssrc) == (8, 1, 160, 7)
    assert p.extension_profile == 0x1000
    assert p.extension_elements() == [ExtensionElement(7, b""), ExtensionElement(200, b"hello")]
    assert p.payload == b"\xd5" * 160
    assert p.padding == 0 and p.csrc == ()


# RFC 4733 §2.3: a telephone-event end packet (event 5, E=1, volume 10, duration 800).
def test_vector_telephone_event() -> None:
    p = round_trip(vector("rtp_telephone_event_end.bin"))
    assert (p.payload_type, p.sequence_number, p.timestamp, p.ssrc) == (101, 42, 8000, 99)
    assert p.payload == bytes([5, 0x8A, 0x03, 0x20])


# Captured: the first packet of SIPp's g711a.pcap (sip-tester), PCMA with the marker bit.
def test_vector_sipp_capture_g711a() -> None:
    p = round_trip(vector("sipp_g711a_first.bin"))
    assert p.payload_type == 8
    assert p.marker is True
    assert p.sequence_number == 0xE6FD
    assert p.timestamp == 0xF0
    assert p.ssrc == 0xDEE0EE8F
    assert p.csrc == () and p.extension_profile is None and p.padding == 0
    assert len(p.payload) == 240  # 30 ms at 8 kHz


# Captured: SIPp's dtmf_2833_1.pcap, start (M=1, duration 0) and end (E=1) of digit 1.
def test_vector_sipp_capture_dtmf() -> None:
    start = round_trip(vector("sipp_dtmf_start.bin"))
    end = round_trip(vector("sipp_dtmf_end.bin"))
    assert (start.payload_type, start.marker, start.sequence_number) == (101, True, 0x1F30)
    assert start.timestamp == end.timestamp == 0x33E0
    assert start.ssrc == end.ssrc == 0x0E05384E
    assert start.payload == bytes([1, 0x0A, 0, 0])
    assert (end.marker, end.sequence_number) == (False, 0x1F37)
    assert end.payload == bytes([1, 0x8A, 0x08, 0xC0])


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (VECTORS / "bad").glob("rtp_*.bin"))
)
def test_malformed_vectors_raise(name: str) -> None:
    with pytest.raises(RtpParseError):
        RtpPacket.parse(vector(f"bad/{name}"))


def test_malformed_reasons_are_specific() -> None:
    with pytest.raises(RtpParseError, match="version"):
        RtpPacket.parse(vector("bad/rtp_version1.bin"))
    with pytest.raises(RtpParseError, match="padding"):
        RtpPacket.parse(vector("bad/rtp_padding_too_big.bin"))
    with pytest.raises(RtpParseError, match="extension"):
        RtpPacket.parse(vector("bad/rtp_ext_beyond.bin"))
    with pytest.raises(RtpParseError, match="shorter"):
        RtpPacket.parse(b"")


def test_rtcp_on_the_rtp_path_is_refused() -> None:
    # RFC 5761 §4: second byte 192..223 is RTCP; an RR must not parse as RTP.
    rr = struct.pack("!BBHI", 0x80, 201, 1, 1)
    assert is_rtcp(rr)
    assert not is_rtcp(vector("rtp_pcmu.bin"))
    with pytest.raises(RtpParseError, match="RTCP"):
        RtpPacket.parse(rr)


def test_serializer_refuses_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        RtpPacket(128, 0, 0, 0).to_bytes()
    with pytest.raises(ValueError):
        RtpPacket(0, 0, 0, 0, csrc=tuple(range(16))).to_bytes()
    with pytest.raises(ValueError):
        RtpPacket(0, 0, 0, 0, extension_profile=0xBEDE, extension=b"abc").to_bytes()
    with pytest.raises(ValueError):
        RtpPacket(0, 0, 0, 0, padding=256).to_bytes()


def test_extension_elements_overrun_raises() -> None:
    with pytest.raises(RtpParseError):
        parse_extension_elements(0xBEDE, bytes([0x13, 1, 2, 0]))  # id 1 says 4 bytes
    with pytest.raises(RtpParseError):
        parse_extension_elements(0x1000, bytes([5, 9, 1, 2]))
    # §4.2: id 15 stops processing; an unknown profile is one opaque element
    assert parse_extension_elements(0xBEDE, bytes([0x10, 7, 0xF0, 0])) == [
        ExtensionElement(1, b"\x07")
    ]
    assert parse_extension_elements(0x1234, b"abcd") == [ExtensionElement(0, b"abcd")]


def test_c_writers_match_the_parser() -> None:
    hdr = write_header(0, True, 70000, 1 << 33, 0xCAFEBABE)
    p = RtpPacket.parse(hdr)
    assert (p.payload_type, p.marker, p.sequence_number) == (0, True, 70000 & 0xFFFF)
    assert (p.timestamp, p.ssrc, p.payload) == (0, 0xCAFEBABE, b"")
    buf = bytearray(vector("rtp_csrc_ext_pad.bin"))
    rewrite_header(buf, seq=7, timestamp=8, ssrc=9, marker=False, payload_type=0)
    q = RtpPacket.parse(bytes(buf))
    original = RtpPacket.parse(vector("rtp_csrc_ext_pad.bin"))
    assert (q.sequence_number, q.timestamp, q.ssrc, q.marker, q.payload_type) == (7, 8, 9, False, 0)
    assert (q.csrc, q.extension, q.payload, q.padding) == (
        original.csrc, original.extension, original.payload, original.padding)
    with pytest.raises(RtpParseError):
        rewrite_header(bytearray(5), seq=1)


# Any bytes either parse or raise RtpParseError (STYLE.md item 17).
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_fuzz_any_bytes(data: bytes) -> None:
    try:
        p = RtpPacket.parse(data)
    except RtpParseError:
        return
    assert p.to_bytes() == data or p.padding  # padding bytes other than the count are not kept


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=12, max_size=80), st.integers(0, 79), st.integers(0, 255))
def test_fuzz_mutated_vector(tail: bytes, pos: int, value: int) -> None:
    data = bytearray(vector("rtp_csrc_ext_pad.bin") + tail)
    data[pos % len(data)] = value
    with contextlib.suppress(RtpParseError):
        RtpPacket.parse(bytes(data))


@settings(max_examples=200, deadline=None)
@given(
    pt=st.integers(0, 127), seq=st.integers(0, 0xFFFF), ts=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF), marker=st.booleans(),
    csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15),
    ext=st.one_of(st.none(), st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=12))),
    payload=st.binary(max_size=40), padding=st.integers(0, 255),
)
def test_serialize_parse_property(pt, seq, ts, ssrc, marker, csrc, ext, payload, padding) -> None:
    profile, ext_data = (None, b"") if ext is None else (ext[0], ext[1] + bytes(-len(ext[1]) % 4))
    packet = RtpPacket(pt, seq, ts, ssrc, payload, marker, tuple(csrc), profile, ext_data, padding)
    data = packet.to_bytes()
    if pt >= 64 and marker and 192 <= data[1] <= 223:
        with pytest.raises(RtpParseError):
            RtpPacket.parse(data)  # RFC 5761 §4: looks like RTCP
        return
    assert RtpPacket.parse(data) == packet


# ---------------------------------------------------------------- receiver statistics


def feed(stats: ReceptionStats, seqs, *, step: int = 160, jitter=None) -> list[bool]:
    out = []
    for i, seq in enumerate(seqs):
        ts = (seq & 0xFFFF) * step
        arrival = ts + (jitter[i] if jitter else 0)
        out.append(stats.update(seq & 0xFFFF, ts, arrival))
    return out


def test_probation_then_counting() -> None:
    # A.1: MIN_SEQUENTIAL = 2; the first packet only starts probation.
    s = ReceptionStats()
    assert feed(s, [1000]) == [False]
    assert not s.valid and s.expected == 0
    assert feed(s, [1001, 1002]) == [True, True]
    assert s.valid
    assert s.base_seq == 1001
    assert (s.received, s.expected, s.lost) == (2, 2, 0)


def test_probation_restarts_on_a_gap() -> None:
    s = ReceptionStats()
    assert feed(s, [10, 12, 13]) == [False, False, True]  # 12 breaks probation, 13 ends it
    assert s.base_seq == 13


def test_loss_and_fraction_lost() -> None:
    # A.3: expected = extended max - base + 1; fraction = lost_interval * 256 / expected_interval
    s = ReceptionStats()
    seqs = [x for x in range(1000, 1100) if not 1050 <= x < 1060]
    feed(s, seqs)
    assert (s.expected, s.received, s.lost) == (99, 89, 10)
    ssrc, fraction, cumulative, highest, _jitter, lsr, dlsr = s.report(0x42, 0)
    assert (ssrc, fraction, cumulative, highest, lsr, dlsr) == (0x42, (10 << 8) // 99, 10, 1099, 0, 0)
    # next interval: nothing lost, so fraction 0 while the cumulative count stays
    feed(s, range(1100, 1150))
    _, fraction, cumulative, highest, *_ = s.report(0x42, 0)
    assert (fraction, cumulative, highest) == (0, 10, 1149)


def test_sequence_wrap_counts_cycles() -> None:
    s = ReceptionStats()
    feed(s, range(65530, 65536 + 11))
    assert s.cycles == 1
    assert s.extended_max_seq == 65536 + 10
    assert s.expected == 65536 + 10 - 65531 + 1
    assert s.lost == 0


def test_duplicates_make_loss_negative_and_misorder_is_counted() -> None:
    s = ReceptionStats()
    feed(s, [1, 2, 3, 4, 4, 4, 3])
    assert s.received == 6  # probation packet excluded, duplicates included (A.3)
    assert s.lost == -3
    assert s.report(1, 0)[2] == -3


def test_restart_after_big_jump() -> None:
    # A.1: one packet far away is refused; a second sequential one means a restart.
    s = ReceptionStats()
    feed(s, range(100, 110))
    assert feed(s, [30000]) == [False]
    assert s.invalid == 2  # the probation packet and this one
    assert feed(s, [30001]) == [True]
    assert s.base_seq == 30001 and s.expected == 1


def test_interarrival_jitter_matches_a8() -> None:
    # A.8 / §6.4.1: J += (|D(i-1,i)| - J) / 16, D from relative transit times.
    transit = [0, 40, 10, 300, 0, 80, 80, 20, 0, 160, 5]
    s = ReceptionStats()
    feed(s, range(500, 500 + len(transit)), jitter=transit)
    expected = 0.0
    for prev, cur in zip(transit[1:], transit[2:], strict=False):  # first packet is probation
        expected += (abs(cur - prev) - expected) / 16
    assert s.jitter == pytest.approx(expected)
    assert s.report(1, 0)[4] == int(expected)


def test_rtt_from_lsr_dlsr() -> None:
    # §6.4.1 example: A=0xb710:8000 (46864.500 s), LSR=0xb705:2000 (46853.125 s),
    # DLSR=0x0005:4000 (5.250 s) -> RTT = 6.125 s
    assert rtt_from_report(0xB7108000, 0xB7052000, 0x00054000) == pytest.approx(6.125)
    assert rtt_from_report(0xB7108000, 0, 0x00054000) is None  # no SR received yet
    assert rtt_from_report(0x00010000, 0x00020000, 0) is None  # negative: clocks disagree


def test_report_carries_lsr_and_dlsr() -> None:
    s = ReceptionStats()
    feed(s, range(10))
    s.sr_received(0xB7052000, 0xB7060000)
    block = s.report(7, 0xB70B4000)
    assert block[5] == 0xB7052000
    assert block[6] == 0xB70B4000 - 0xB7060000


@pytest.mark.long
@settings(max_examples=20000, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_any_bytes_long(data: bytes) -> None:
    with contextlib.suppress(RtpParseError):
        RtpPacket.parse(data)
