"""RFC 4733 telephone-events: the sender's packet schedule and a receiver that reports every
event exactly once through redundancy, loss and reordering."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from media_core.rtp import RtpPacket, RtpParseError
from media_core.telephone_event import (
    EndReason,
    TelephoneEventReceiver,
    TelephoneEventSender,
    event_code,
    event_payload,
    parse_event_payload,
)

VECTORS = Path(__file__).parent / "vectors" / "rtp"


def send_digits(digits: str, *, gap: float = 0.2, duration: float = 0.1,
                seed_ts: int = 1000) -> list[tuple[float, RtpPacket]]:
    """(send time, packet) for each digit, driven through next_timer()/poll()."""
    sender = TelephoneEventSender(ssrc=0x1234, seq=65530)
    out: list[tuple[float, RtpPacket]] = []
    now = 0.0
    for i, digit in enumerate(digits):
        ts = seed_ts + round(i * (duration + gap) * 8000)
        out += [(now, p) for p in sender.start(digit, timestamp=ts, now=now, duration=duration)]
        while (t := sender.next_timer()) is not None:
            out += [(t, p) for p in sender.poll(t)]
        now = out[-1][0] + gap
    return out


def receive_all(packets, *, receiver=None) -> list:
    rx = receiver or TelephoneEventReceiver()
    events = []
    last = 0.0
    for t, p in packets:
        events += rx.receive(p, t)
        last = t
    events += rx.handle_timer(last + 10.0)
    return events


def test_sender_schedule() -> None:
    # §2.5.1: start packet with M, updates every 50 ms with growing duration, all with the
    # event's timestamp, then three end packets; consecutive sequence numbers across a wrap.
    sent = send_digits("5", duration=0.12)
    times = [t for t, _ in sent]
    packets = [p for _, p in sent]
    fields = [parse_event_payload(p.payload) for p in packets]
    assert times == pytest.approx([0.0, 0.05, 0.10, 0.12, 0.12, 0.12])
    assert [p.marker for p in packets] == [True] + [False] * 5
    assert {p.timestamp for p in packets} == {1000}
    assert {p.payload_type for p in packets} == {101}
    assert [p.sequence_number for p in packets] == [65530, 65531, 65532, 65533, 65534, 65535]
    assert fields == [(5, False, 10, 0), (5, False, 10, 400), (5, False, 10, 800)] + [
        (5, True, 10, 960)
    ] * 3


def test_sender_refuses_overlap_and_bad_values() -> None:
    sender = TelephoneEventSender(ssrc=1)
    sender.start("1", timestamp=0, now=0.0)
    assert sender.busy
    with pytest.raises(ValueError):
        sender.start("2", timestamp=800, now=0.01)
    with pytest.raises(ValueError):
        TelephoneEventSender(ssrc=1).start("x", timestamp=0, now=0.0)
    with pytest.raises(ValueError):
        TelephoneEventSender(ssrc=1).start("1", timestamp=0, now=0.0, duration=9.0)
    with pytest.raises(ValueError):
        event_payload(1, end=False, volume=64, duration=0)
    assert TelephoneEventSender(ssrc=1).poll(0.0) == []


def test_digit_codes() -> None:
    assert [event_code(d) for d in "0123456789*#ABCD"] == list(range(16))
    assert event_code("a") == 12


def test_each_digit_once_with_redundant_end_packets() -> None:
    events = receive_all(send_digits("1234*#"))
    assert "".join(e.digit for e in events) == "1234*#"
    assert all(e.reason is EndReason.END_BIT for e in events)
    assert all(e.duration == 800 and e.volume == 10 for e in events)


def test_same_digit_twice_is_two_events() -> None:
    events = receive_all(send_digits("55"))
    assert [e.digit for e in events] == ["5", "5"]
    assert events[0].timestamp != events[1].timestamp


def test_lost_start_packet_still_one_digit() -> None:
    sent = [(t, p) for t, p in send_digits("7") if not p.marker]
    events = receive_all(sent)
    assert [(e.digit, e.reason) for e in events] == [("7", EndReason.END_BIT)]


def test_only_end_packets_arrive() -> None:
    sent = [(t, p) for t, p in send_digits("8") if parse_event_payload(p.payload)[1]]
    events = receive_all(sent)
    assert [(e.digit, e.duration) for e in events] == [("8", 800)]


def test_lost_end_packets_ended_by_next_event() -> None:
    sent = send_digits("12")
    first_ts = sent[0][1].timestamp
    kept = [(t, p) for t, p in sent
            if not (p.timestamp == first_ts and parse_event_payload(p.payload)[1])]
    rx = TelephoneEventReceiver(timeout=5.0)  # long timeout: the new event must end it
    events = []
    for t, p in kept:
        events += rx.receive(p, t)
    assert [(e.digit, e.reason) for e in events] == [
        ("1", EndReason.NEW_EVENT), ("2", EndReason.END_BIT)]


def test_lost_end_packets_ended_by_timeout() -> None:
    sent = [(t, p) for t, p in send_digits("9") if not parse_event_payload(p.payload)[1]]
    rx = TelephoneEventReceiver(timeout=0.25)
    events = []
    for t, p in sent:
        events += rx.receive(p, t)
    assert events == []
    deadline = rx.next_timer()
    assert deadline == pytest.approx(sent[-1][0] + 0.25)
    assert rx.handle_timer(deadline - 0.01) == []
    events = rx.handle_timer(deadline)
    assert [(e.digit, e.reason, e.duration) for e in events] == [("9", EndReason.TIMEOUT, 400)]
    assert rx.next_timer() is None
    # the end packets turning up afterwards do not repeat the digit
    late = [p for _, p in send_digits("9") if parse_event_payload(p.payload)[1]]
    assert [e for p in late for e in rx.receive(p, deadline + 0.1)] == []


def test_reordering_within_and_across_events() -> None:
    sent = send_digits("147")
    shuffled = []
    for ts in sorted({p.timestamp for _, p in sent}):
        group = [x for x in sent if x[1].timestamp == ts]
        random.Random(ts).shuffle(group)
        shuffled += group
    # swap the last packet of "1" behind the first packet of "4"
    idx = max(i for i, (_, p) in enumerate(shuffled) if p.timestamp == sent[0][1].timestamp)
    shuffled[idx], shuffled[idx + 1] = shuffled[idx + 1], shuffled[idx]
    events = receive_all(shuffled)
    assert "".join(e.digit for e in events) == "147"


def test_packet_of_an_older_event_after_a_newer_one_is_ignored() -> None:
    sent = send_digits("12")
    rx = TelephoneEventReceiver()
    events = []
    for t, p in sent:
        events += rx.receive(p, t)
    stale = next(p for _, p in sent if p.timestamp == sent[0][1].timestamp and not p.marker)
    assert rx.receive(stale, 5.0) == []
    assert [e.digit for e in events] == ["1", "2"]


def test_long_event_segments_are_one_digit() -> None:
    # §2.5.1.3: an event longer than 0xFFFF units continues in a segment at ts + 0xFFFF.
    def pkt(seq, ts, end, duration, marker=False):
        return RtpPacket(101, seq, ts, 1, event_payload(3, end=end, volume=5, duration=duration),
                         marker)
    rx = TelephoneEventReceiver(timeout=10.0)  # the updates in between are left out
    events = rx.receive(pkt(0, 100, False, 0, True), 0.0)
    events += rx.receive(pkt(1, 100, False, 0xFFFF), 8.0)
    events += rx.receive(pkt(2, 100 + 0xFFFF, False, 400), 8.05)
    events += rx.receive(pkt(3, 100 + 0xFFFF, True, 800), 8.1)
    events += rx.receive(pkt(4, 100, False, 0xFFFF), 8.2)  # late copy from the first segment
    assert [(e.digit, e.duration, e.timestamp) for e in events] == [("3", 0xFFFF + 800, 100)]


def test_other_payload_types_ignored_and_short_payload_refused() -> None:
    rx = TelephoneEventReceiver(payload_type=101)
    assert rx.receive(RtpPacket(0, 1, 1, 1, b"\xff" * 160), 0.0) == []
    with pytest.raises(RtpParseError):
        rx.receive(RtpPacket(101, 1, 1, 1, b"\x01\x02"), 0.0)
    with pytest.raises(RtpParseError):
        parse_event_payload(b"\x01")
    # the refused packet changed nothing
    assert rx.next_timer() is None


def test_sipp_capture_digit() -> None:
    # Real capture from SIPp's dtmf_2833_1.pcap: 7 updates, then the end packet three times
    # with the same sequence number.
    data = (VECTORS / "sipp_dtmf_2833_1.records").read_bytes()
    records = []
    pos = 0
    while pos < len(data):
        usec, length = struct.unpack_from("!IH", data, pos)
        records.append((usec / 1e6, RtpPacket.parse(data[pos + 6 : pos + 6 + length])))
        pos += 6 + length
    assert len(records) == 10
    events = receive_all(records)
    assert [(e.digit, e.duration, e.reason) for e in events] == [("1", 0x08C0, EndReason.END_BIT)]


@settings(max_examples=150, deadline=None)
@given(
    digits=st.text(alphabet="0123456789*#", min_size=1, max_size=5),
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0.0, 0.6),
    reorder=st.booleans(),
)
def test_any_loss_pattern_reports_each_surviving_digit_once(digits, seed, loss, reorder) -> None:
    rng = random.Random(seed)
    sent = send_digits(digits)
    kept = [(t, p) for t, p in sent if rng.random() >= loss]
    if reorder:  # neighbours swap, as a network reorders
        for i in range(len(kept) - 1):
            if rng.random() < 0.3:
                kept[i], kept[i + 1] = (kept[i + 1][0], kept[i][1]), (kept[i][0], kept[i + 1][1])
    survivors = {p.timestamp for _, p in kept}
    expected = [p.timestamp for _, p in sent if p.marker and p.timestamp in survivors]
    events = receive_all(kept)
    reported = [e.timestamp for e in events]
    assert len(reported) == len(set(reported))  # never twice
    assert set(reported) <= set(expected)
    if not reorder:
        assert reported == expected  # every surviving digit, in order
