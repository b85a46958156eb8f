"""Benchmark: SIP message parsing per core, against httptools (C llhttp) in the same run.

The project side parses a typical INVITE with SDP and its 200 OK alternately into SipMessage
objects whose header fields are readable as (name, value) strings. The peer parses an HTTP/1.1
request of the same size with httptools, collecting every header into a Python list through
its callbacks (the parser is reused, as on a keep-alive connection). Rounds alternate project
and peer; the median of the rounds is reported. Rates are per CPU second of the benchmark's
own thread (the box is shared, so wall time would measure the neighbours); single-threaded,
so that is per core. Wall-clock rates are in ``detail`` for comparison.
"""

import json
import statistics
import time

import httptools

from media_core.sip import parse_message

ROUNDS = 7
ROUND_SECONDS = 0.5

SDP = (b"v=0\r\n"
       b"o=agent1001 2890844526 2890844526 IN IP4 192.0.2.10\r\n"
       b"s=-\r\n"
       b"c=IN IP4 192.0.2.10\r\n"
       b"t=0 0\r\n"
       b"m=audio 49170 RTP/AVP 0 8 101\r\n"
       b"a=rtpmap:0 PCMU/8000\r\n"
       b"a=rtpmap:8 PCMA/8000\r\n"
       b"a=rtpmap:101 telephone-event/8000\r\n"
       b"a=fmtp:101 0-16\r\n"
       b"a=ptime:20\r\n"
       b"a=sendrecv\r\n")

INVITE = (b"INVITE sip:1001@192.0.2.1:5060 SIP/2.0\r\n"
          b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
          b"Max-Forwards: 70\r\n"
          b"From: \"Queue caller\" <sip:5551234@192.0.2.10>;tag=1928301774\r\n"
          b"To: <sip:1001@192.0.2.1>\r\n"
          b"Call-ID: a84b4c76e66710@192.0.2.10\r\n"
          b"CSeq: 314159 INVITE\r\n"
          b"Contact: <sip:5551234@192.0.2.10:5060>\r\n"
          b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY\r\n"
          b"Supported: replaces, timer\r\n"
          b"User-Agent: edgecc-bench/1.0\r\n"
          b"Content-Type: application/sdp\r\n"
          b"Content-Length: %d\r\n\r\n" % len(SDP)) + SDP

ANSWER = SDP.replace(b"agent1001", b"agent2002").replace(b"192.0.2.10", b"192.0.2.1")
OK_200 = (b"SIP/2.0 200 OK\r\n"
          b"Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport=5060;"
          b"received=192.0.2.10\r\n"
          b"From: \"Queue caller\" <sip:5551234@192.0.2.10>;tag=1928301774\r\n"
          b"To: <sip:1001@192.0.2.1>;tag=a6c85cf\r\n"
          b"Call-ID: a84b4c76e66710@192.0.2.10\r\n"
          b"CSeq: 314159 INVITE\r\n"
          b"Contact: <sip:1001@192.0.2.1:5060>\r\n"
          b"Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY\r\n"
          b"Supported: replaces, timer\r\n"
          b"Server: edgecc/0.1\r\n"
          b"Content-Type: application/sdp\r\n"
          b"Content-Length: %d\r\n\r\n" % len(ANSWER)) + ANSWER

HTTP_BODY = SDP
HTTP_REQUEST = (b"POST /api/v1/queues/support/calls HTTP/1.1\r\n"
                b"Host: 192.0.2.1:8080\r\n"
                b"User-Agent: edgecc-bench/1.0\r\n"
                b"Accept: application/json\r\n"
                b"Accept-Encoding: identity\r\n"
                b"Connection: keep-alive\r\n"
                b"X-Call-Id: a84b4c76e66710@192.0.2.10\r\n"
                b"X-From: \"Queue caller\" <sip:5551234@192.0.2.10>;tag=1928301774\r\n"
                b"X-To: <sip:1001@192.0.2.1>\r\n"
                b"X-Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds;rport\r\n"
                b"X-Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, REFER, NOTIFY\r\n"
                b"Content-Type: application/sdp\r\n"
                b"Content-Length: %d\r\n\r\n" % len(HTTP_BODY)) + HTTP_BODY


def sip_round(seconds: float) -> tuple[float, float, int]:
    """(messages per CPU second, per wall second) parsing INVITE and 200 OK alternately,
    and the header count seen."""
    parse = parse_message
    inv, ok = INVITE, OK_200
    count = 0
    wall = time.perf_counter()
    start = time.thread_time()
    while True:
        for _ in range(2000):
            parse(inv)
            parse(ok)
        count += 4000
        now = time.thread_time()
        if now - start >= seconds:
            break
    wall = time.perf_counter() - wall
    headers = len(parse(inv).headers) + len(parse(ok).headers)
    return count / (now - start), count / wall, headers


class _Collector:
    """httptools callbacks that keep every header, as an application would."""

    def __init__(self, decode: bool) -> None:
        self.headers: list = []
        self.url = b""
        self.body = b""
        self.complete = 0
        if decode:
            self.on_header = self._on_header_str

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def _on_header_str(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_body(self, body: bytes) -> None:
        self.body = body

    def on_message_complete(self) -> None:
        self.complete += 1


def http_round(seconds: float, decode: bool) -> tuple[float, float, int]:
    """(requests per CPU second, per wall second) through one reused httptools parser
    collecting headers into a list, and the header count seen."""
    sink = _Collector(decode)
    parser = httptools.HttpRequestParser(sink)
    feed = parser.feed_data
    req = HTTP_REQUEST
    count = 0
    wall = time.perf_counter()
    start = time.thread_time()
    while True:
        for _ in range(2000):
            sink.headers = []
            feed(req)
        count += 2000
        now = time.thread_time()
        if now - start >= seconds:
            break
    wall = time.perf_counter() - wall
    if sink.complete != count or sink.body != HTTP_BODY:
        raise RuntimeError("httptools did not parse every request")
    return count / (now - start), count / wall, len(sink.headers)


def main() -> None:
    for raw in (INVITE, OK_200):
        msg = parse_message(raw)
        assert msg.body and msg.get("Call-ID") == "a84b4c76e66710@192.0.2.10"
    sip_rates, http_rates, http_str_rates, sip_wall, http_wall = [], [], [], [], []
    sip_headers = http_headers = 0
    for r in range(ROUNDS):
        rate, wall_rate, sip_headers = sip_round(ROUND_SECONDS)
        sip_rates.append(rate)
        sip_wall.append(wall_rate)
        peer, peer_wall, http_headers = http_round(ROUND_SECONDS, decode=False)
        http_rates.append(peer)
        http_wall.append(peer_wall)
        peer_str, _, _ = http_round(ROUND_SECONDS, decode=True)
        http_str_rates.append(peer_str)
        print(f"round {r + 1}: sip {rate:,.0f} msg/s  httptools {peer:,.0f} req/s  "
              f"httptools+str {peer_str:,.0f} req/s")
    value = statistics.median(sip_rates)
    peer_value = statistics.median(http_rates)
    result = {
        "bench": "sip_parse",
        "value": round(value, 1),
        "unit": "messages/s",
        "peer": f"httptools {httptools.__version__} (llhttp)",
        "peer_value": round(peer_value, 1),
        "ratio": round(value / peer_value, 3),
        "detail": {
            "rounds": ROUNDS,
            "sip_rounds": [round(x) for x in sip_rates],
            "httptools_rounds": [round(x) for x in http_rates],
            "clock": "thread CPU time",
            "sip_wall_median": round(statistics.median(sip_wall), 1),
            "httptools_wall_median": round(statistics.median(http_wall), 1),
            "httptools_str_headers_median": round(statistics.median(http_str_rates), 1),
            "ratio_vs_httptools_str_headers": round(
                value / statistics.median(http_str_rates), 3),
            "invite_bytes": len(INVITE),
            "ok_200_bytes": len(OK_200),
            "http_request_bytes": len(HTTP_REQUEST),
            "sip_headers_per_pair": sip_headers,
            "http_headers_per_request": http_headers,
            "per_core": True,
            "goal_messages_per_s": 250000,
            "goal_ratio": 0.75,
        },
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
