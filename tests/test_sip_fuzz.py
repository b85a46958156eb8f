"""Fuzzing the SIP codec with one invariant: any input either parses or raises
RemoteProtocolError; nothing else escapes (model: h11 fuzz/afl-server.py).

Inputs are the RFC 4475 / RFC 5118 vectors and two ordinary messages, mutated by byte flips,
truncation, insertion, deletion and line duplication, plus plain random bytes. What parses must
also serialize and parse again to the same fields. The ``long`` variants run many more examples
(``make test-long``).
"""

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_sip_vectors import FILES, wire_bytes

from media_core.sip import (
    LocalProtocolError,
    RemoteProtocolError,
    SipMessage,
    StreamFramer,
    check_request,
    parse_message,
    parse_name_addr,
    parse_uri,
    parse_via,
)

ORDINARY = [
    b"INVITE sip:1001@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1;rport\r\n"
    b"Max-Forwards: 70\r\nFrom: \"Caller\" <sip:555@192.0.2.10>;tag=a\r\nTo: <sip:1001@pbx>\r\n"
    b"Call-ID: c1\r\nCSeq: 1 INVITE\r\nContact: <sip:555@192.0.2.10>\r\n"
    b"Content-Type: application/sdp\r\nContent-Length: 10\r\n\r\nv=0\r\ns=-\r\n",
    b"SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK1;received=192.0.2.99\r\n"
    b"From: <sip:555@pbx>;tag=a\r\nTo: <sip:1001@pbx>;tag=b\r\nCall-ID: c1\r\n"
    b"CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n",
]
SEEDS = [wire_bytes(name) for name in FILES] + ORDINARY
TOKENS = [b"\r\n", b"\n", b"\r", b":", b";", b",", b"<", b">", b'"', b"\\", b"%", b"%4", b"[",
          b"]", b" ", b"\t", b"@", b"\x00", b"\xff", b"\xc3", b"=", b"?", b"/", b"*",
          b"99999999999999999999", b"-1", b"SIP/2.0", b"\r\n\r\n", b"\r\n ", b"Content-Length: 3\r\n",
          b"l: 99999\r\n", b"Via: SIP/2.0/UDP [::1]:5060;branch=z9hG4bK;rport\r\n",
          b"Contact: *\r\n", b"CSeq: 4294967296 INVITE\r\n", b"Max-Forwards: 0\r\n"]
ALLOW = frozenset(("ACK", "BYE", "CANCEL", "INVITE", "OPTIONS", "REGISTER"))
VIEWS = ("vias", "top_via", "branch", "call_id", "cseq", "from_", "to", "contacts",
         "max_forwards", "expires")

mutation = st.tuples(
    st.sampled_from(("flip", "truncate", "insert", "delete", "duplicate_line", "token")),
    st.integers(min_value=0, max_value=1 << 16),
    st.binary(min_size=1, max_size=6),
    st.sampled_from(TOKENS),
)


def mutate(data: bytes, ops: list[tuple[str, int, bytes, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, blob, token in ops:
        at = pos % (len(buf) + 1)
        if op == "flip" and buf:
            buf[at % len(buf)] ^= blob[0] or 1
        elif op == "truncate":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = blob
        elif op == "delete":
            del buf[at:at + len(blob)]
        elif op == "duplicate_line":
            start = buf.rfind(b"\n", 0, at) + 1
            end = buf.find(b"\n", at)
            end = len(buf) if end < 0 else end + 1
            buf[end:end] = buf[start:end]
        elif op == "token":
            buf[at:at] = token
    return bytes(buf)


def _comparable(m: SipMessage) -> tuple:
    headers = [h for h in m.headers if h[0] != "Content-Length"]
    return (m.is_request, m.method, m.uri, m.status, m.reason, headers, m.body)


def exercise(data: bytes) -> None:
    """Parse, read every view, check, serialize and parse again; only RemoteProtocolError."""
    try:
        msg = parse_message(data)
    except RemoteProtocolError as exc:
        assert isinstance(exc.status, int) and 400 <= exc.status <= 599
        assert exc.droppable or exc.message is not None
        return
    for view in VIEWS:
        with contextlib.suppress(RemoteProtocolError):
            getattr(msg, view)
    if msg.is_request:
        with contextlib.suppress(RemoteProtocolError):
            check_request(msg, allow=ALLOW)
    elif not 100 <= msg.status <= 699:
        raise AssertionError(f"status {msg.status} parsed")
    again = parse_message(msg.to_bytes())
    assert _comparable(again) == _comparable(msg)


def frame(stream: bytes, cuts: list[int]) -> None:
    """Feed a stream in pieces; only RemoteProtocolError, and misuse only after a fatal one."""
    framer = StreamFramer()
    failed = False
    edges = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for a, b in zip(edges, edges[1:], strict=False):
        try:
            framer.feed(stream[a:b])
            for _ in range(64):
                try:
                    if framer.next_message() is None:
                        break
                except RemoteProtocolError:
                    failed = True
        except LocalProtocolError:
            assert failed
            return
        except RemoteProtocolError:
            failed = True


FAST = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
LONG = settings(max_examples=60000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _mutated_vectors(data: st.DataObject) -> bytes:
    seed = data.draw(st.sampled_from(SEEDS))
    return mutate(seed, data.draw(st.lists(mutation, max_size=6)))


@FAST
@given(st.data())
def test_fuzz_mutated_vectors(data: st.DataObject) -> None:
    exercise(_mutated_vectors(data))


@FAST
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    exercise(data)
    exercise(b"INVITE sip:a@b SIP/2.0\r\n" + data)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.data())
def test_fuzz_stream_framing(data: st.DataObject) -> None:
    parts = data.draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=4))
    stream = mutate(b"\r\n\r\n".join(parts), data.draw(st.lists(mutation, max_size=3)))
    frame(stream, data.draw(st.lists(st.integers(min_value=0), max_size=8)))


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.data())
def test_stream_framing_matches_datagram_parsing(data: st.DataObject) -> None:
    """Well-framed messages come out of any chunking exactly as parse_message reads them."""
    parts = data.draw(st.lists(st.sampled_from(ORDINARY), min_size=1, max_size=5))
    stream = b"".join(parts)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(stream)), max_size=10))))
    framer = StreamFramer()
    got = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        framer.feed(stream[a:b])
        while (msg := framer.next_message()) is not None:
            got.append(_comparable(msg))
    assert got == [_comparable(parse_message(p)) for p in parts]


text_inputs = st.one_of(
    st.text(max_size=80),
    st.text(alphabet='sip:@<>";=,[]?&%.:0123456789abcdef \t\\*/+-_', max_size=80),
)


@FAST
@given(text_inputs)
def test_fuzz_structured_parsers(text: str) -> None:
    for parse in (parse_uri, parse_name_addr, parse_via):
        try:
            value = parse(text)
        except RemoteProtocolError:
            continue
        assert parse(str(value)) == value


@pytest.mark.long
@LONG
@given(st.data())
def test_fuzz_mutated_vectors_long(data: st.DataObject) -> None:
    exercise(_mutated_vectors(data))


@pytest.mark.long
@LONG
@given(st.binary(max_size=4000))
def test_fuzz_random_bytes_long(data: bytes) -> None:
    exercise(data)


@pytest.mark.long
@settings(max_examples=20000, deadline=None)
@given(st.data())
def test_fuzz_stream_framing_long(data: st.DataObject) -> None:
    parts = data.draw(st.lists(st.sampled_from(SEEDS), min_size=1, max_size=8))
    stream = mutate(b"".join(parts), data.draw(st.lists(mutation, max_size=8)))
    frame(stream, data.draw(st.lists(st.integers(min_value=0), max_size=20)))
