"""RTCP compound packets (RFC 3550 §6) and XR VoIP metrics (RFC 3611 §4.7).

Each vector file (tests/vectors/rtp, laid out by make_vectors.py from the RFC figures) is
parsed, every field asserted, serialized back and compared byte for byte.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_core._rtp import write_receiver_report, write_sender_report
from media_core.rtcp import (
    App,
    Bye,
    ReceiverReport,
    ReportBlock,
    RtcpParseError,
    SdesChunk,
    SenderReport,
    SourceDescription,
    UnknownRtcp,
    VoipMetrics,
    XrBlock,
    XrPacket,
    ntp_middle,
    ntp_timestamp,
    parse_compound,
    serialize_compound,
)
from media_core.rtp import ReceptionStats, RtpParseError

VECTORS = Path(__file__).parent / "vectors" / "rtp"


def round_trip(name: str) -> list:
    data = (VECTORS / name).read_bytes()
    packets = parse_compound(data, require_report_first=True)
    assert serialize_compound(packets) == data
    return packets


# RFC 3550 §6.4.1 SR with one report block + §6.5 SDES CNAME: the minimal compound packet.
def test_vector_sr_sdes() -> None:
    sr, sdes = round_trip("rtcp_sr_sdes.bin")
    assert sr == SenderReport(
        ssrc=0xDEADBEEF,
        ntp_timestamp=(0xE9A2C3D4 << 32) | 0x80000000,
        rtp_timestamp=0x89ABCDEF,
        packet_count=1500,
        octet_count=240000,
        reports=(ReportBlock(0x0BADCAFE, 0x19, 37, 0x0001FFFF, 120, 0xC3D48000, 0x00018000),),
    )
    assert sr.ntp_middle == 0xC3D48000
    assert sr.extension == b"" and sr.padding == 0
    assert sdes == SourceDescription((SdesChunk(0xDEADBEEF, ((1, b"agent@edgecc"),)),))
    assert sdes.chunks[0].cname == "agent@edgecc"


# RFC 3550 §6.4.2 RR (two blocks: negative cumulative loss, and every field at its maximum),
# §6.5 SDES with CNAME, NAME and PRIV over two chunks, §6.6 BYE with a reason.
def test_vector_rr_sdes_bye() -> None:
    rr, sdes, bye = round_trip("rtcp_rr_sdes_bye.bin")
    assert rr == ReceiverReport(
        0x01020304,
        (
            ReportBlock(0xAAAA0001, 0, -3, 70000, 8, 0, 0),
            ReportBlock(0xAAAA0002, 255, 0x7FFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 1, 65536),
        ),
    )
    assert sdes.chunks == (
        SdesChunk(0x01020304, ((1, b"u@h"), (2, b"Queue Sales"), (8, b"\x03abcXYZ"))),
        SdesChunk(0x05060708, ((1, b"x"),)),
    )
    assert bye == Bye((0x01020304, 0x05060708), b"call closed")


# RFC 3550 §6.7 APP passthrough, with padding on the last packet of the compound (§6.4.1 P).
def test_vector_app_padded() -> None:
    rr, app = round_trip("rtcp_rr_app_padded.bin")
    assert rr == ReceiverReport(0x01020304)
    assert app == App(5, 0x01020304, b"EDGE", b"\x00\x01\x02\x03", padding=8)


# RFC 3611 §4.7 VoIP metrics block and §4.4 receiver reference time block (kept as bytes).
def test_vector_xr_voip_metrics() -> None:
    rr, xr = round_trip("rtcp_rr_xr_voip.bin")
    assert rr == ReceiverReport(0x01020304)
    assert isinstance(xr, XrPacket) and xr.ssrc == 0x01020304
    voip, rrt = xr.blocks
    assert voip == VoipMetrics(
        ssrc=0x0BADCAFE, loss_rate=13, discard_rate=3, burst_density=64, gap_density=2,
        burst_duration=120, gap_duration=4800, round_trip_delay=45, end_system_delay=85,
        signal_level=-20, noise_level=-62, rerl=127, gmin=16, r_factor=88, ext_r_factor=127,
        mos_lq=41, mos_cq=40, rx_config=0xF4, jb_nominal=60, jb_maximum=200, jb_abs_max=1000,
    )  # fmt: skip
    assert (voip.plc, voip.jitter_buffer_adaptive, voip.jitter_buffer_rate) == (3, 3, 4)
    assert rrt == XrBlock(4, 0, struct.pack("!II", 0xE9A2C3D4, 0x80000000))


# RFC 4585 §6.2.1 generic NACK: a type not decoded here passes through untouched.
def test_vector_unknown_type_passthrough() -> None:
    rr, nack = round_trip("rtcp_rr_nack.bin")
    assert rr == ReceiverReport(0x01020304)
    assert nack == UnknownRtcp(205, 1, struct.pack("!IIHH", 0x01020304, 0x0BADCAFE, 100, 5))


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (VECTORS / "bad").glob("rtcp_*.bin"))
)
def test_malformed_vectors_raise(name: str) -> None:
    with pytest.raises(RtcpParseError):
        parse_compound((VECTORS / "bad" / name).read_bytes())


def test_rtcp_parse_error_is_a_value_error() -> None:
    assert issubclass(RtcpParseError, RtpParseError)
    assert issubclass(RtcpParseError, ValueError)
    with pytest.raises(ValueError, match="shorter"):
        parse_compound(b"\x80\xc9")


def test_report_first_is_optional() -> None:
    # RFC 5506 reduced-size RTCP: a lone SDES is accepted unless asked otherwise.
    data = serialize_compound([SourceDescription((SdesChunk(1, ((1, b"a"),)),))])
    assert len(parse_compound(data)) == 1
    with pytest.raises(RtcpParseError, match="SR or RR"):
        parse_compound(data, require_report_first=True)


def test_serializer_refuses_bad_fields() -> None:
    with pytest.raises(ValueError):
        serialize_compound([ReceiverReport(1, tuple(ReportBlock(i) for i in range(32)))])
    with pytest.raises(ValueError):
        serialize_compound([ReceiverReport(1, (ReportBlock(1, cumulative_lost=1 << 23),))])
    with pytest.raises(ValueError):
        serialize_compound([App(1, 1, b"TOOLONG")])
    with pytest.raises(ValueError):
        serialize_compound([ReceiverReport(1, padding=4), ReceiverReport(2)])
    with pytest.raises(ValueError):
        serialize_compound([Bye((1,), b"x" * 256)])
    with pytest.raises(ValueError):
        serialize_compound([ReceiverReport(1, extension=b"abc")])


def test_c_writers_produce_what_the_parser_reads() -> None:
    blocks = ((0xAAAA, 25, -7, 0x10005, 33, 0xB7052000, 0x54000),)
    rr = parse_compound(write_receiver_report(0x1234, blocks))
    assert rr == [ReceiverReport(0x1234, (ReportBlock(*blocks[0]),))]
    ntp = ntp_timestamp(1_700_000_000.25)
    sr = parse_compound(write_sender_report(0x1234, ntp, 555, 10, 1600, blocks))
    assert sr == [SenderReport(0x1234, ntp, 555, 10, 1600, (ReportBlock(*blocks[0]),))]
    assert parse_compound(write_receiver_report(9)) == [ReceiverReport(9)]


def test_stats_report_into_rr_and_rtt_back() -> None:
    # A receiver builds an RR from its statistics; the sender of the SR computes the RTT.
    stats = ReceptionStats()
    for seq in range(20):
        if seq != 10:
            stats.update(seq, seq * 160, seq * 160)
    sr_ntp = ntp_timestamp(1000.0)
    stats.sr_received(ntp_middle(sr_ntp), ntp_middle(ntp_timestamp(1000.05)))
    block = stats.report(0xBEEF, ntp_middle(ntp_timestamp(1000.30)))
    rr = parse_compound(write_receiver_report(0x1, (block,)))[0]
    assert rr.reports[0].cumulative_lost == 1
    assert rr.reports[0].highest_seq == 19
    rtt = rr.reports[0].rtt(ntp_middle(ntp_timestamp(1000.40)))
    assert rtt == pytest.approx(0.40 - 0.25, abs=1e-3)


def test_ntp_helpers() -> None:
    ntp = ntp_timestamp(0.5)
    assert ntp >> 32 == 2_208_988_800
    assert ntp & 0xFFFFFFFF == 1 << 31
    assert ntp_middle(ntp) == ((2_208_988_800 & 0xFFFF) << 16) | 0x8000


# Any bytes either parse or raise RtcpParseError (STYLE.md item 17).
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=160))
def test_fuzz_any_bytes(data: bytes) -> None:
    with contextlib.suppress(RtcpParseError):
        parse_compound(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(p.name for p in VECTORS.glob("rtcp_*.bin"))),
       st.integers(0, 200), st.integers(0, 255))
def test_fuzz_mutated_vectors(name: str, pos: int, value: int) -> None:
    data = bytearray((VECTORS / name).read_bytes())
    data[pos % len(data)] = value
    try:
        packets = parse_compound(bytes(data))
    except RtcpParseError:
        return
    serialize_compound(packets)  # whatever parsed must serialize again


u32 = st.integers(0, 0xFFFFFFFF)
blocks = st.lists(
    st.builds(ReportBlock, u32, st.integers(0, 255), st.integers(-0x800000, 0x7FFFFF), u32, u32,
              u32, u32),
    max_size=3,
).map(tuple)
rtcp_packets = st.one_of(
    st.builds(SenderReport, u32, st.integers(0, (1 << 64) - 1), u32, u32, u32, blocks),
    st.builds(ReceiverReport, u32, blocks),
    st.builds(
        SourceDescription,
        st.lists(st.builds(SdesChunk, u32, st.lists(
            st.tuples(st.integers(1, 8), st.binary(max_size=20)), max_size=3).map(tuple)),
            max_size=3).map(tuple),
    ),
    st.builds(Bye, st.lists(u32, max_size=3).map(tuple), st.one_of(st.none(),
                                                                    st.binary(max_size=30))),
    st.builds(App, st.integers(0, 31), u32, st.binary(min_size=4, max_size=4),
              st.binary(max_size=3).map(lambda b: b * 4)),
    st.builds(XrPacket, u32, st.lists(st.builds(VoipMetrics, u32, st.integers(0, 255),
                                                signal_level=st.integers(-128, 127)),
                                      max_size=2).map(tuple)),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(rtcp_packets, min_size=1, max_size=4))
def test_serialize_parse_property(packets: list) -> None:
    assert parse_compound(serialize_compound(packets)) == packets


def test_voip_metrics_from_measurements() -> None:
    # RFC 3611 §4.7.1: rates are fractions * 256; §4.7.5 MOS * 10; 127 = unavailable.
    m = VoipMetrics.from_measurements(
        7, expected=1000, lost=25, discarded=8, round_trip_ms=48.4, end_system_delay_ms=75,
        jb_nominal_ms=60, jb_maximum_ms=120, jb_abs_max_ms=200, r_factor=86.6, mos_lq=4.12,
    )
    assert (m.loss_rate, m.discard_rate) == (6, 2)
    assert (m.round_trip_delay, m.end_system_delay) == (48, 75)
    assert (m.r_factor, m.mos_lq, m.mos_cq, m.ext_r_factor) == (87, 41, 127, 127)
    assert (m.plc, m.jitter_buffer_adaptive) == (3, 3)
    assert (m.jb_nominal, m.jb_maximum, m.jb_abs_max) == (60, 120, 200)
    data = serialize_compound([XrPacket(1, (m,))])
    assert parse_compound(data) == [XrPacket(1, (m,))]
    assert VoipMetrics.from_measurements(1, expected=0, lost=5, discarded=0).loss_rate == 0
    assert VoipMetrics.from_measurements(1, expected=10, lost=50, discarded=0).loss_rate == 255


@pytest.mark.long
@settings(max_examples=20000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_any_bytes_long(data: bytes) -> None:
    with contextlib.suppress(RtcpParseError):
        parse_compound(data)
