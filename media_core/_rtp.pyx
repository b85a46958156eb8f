# cython: language_level=3
"""Compiled RTP core: header parsing and rewriting, RFC 3550 receiver statistics and the
RFC 4733 telephone-event receiver. C functions are declared in _rtp.pxd (nogil, for the media
engine); the Python classes below wrap them for media_core.rtp and media_core.telephone_event."""

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memset


class RtpParseError(ValueError):
    """An RTP or RTCP packet is truncated or malformed (the peer sent garbage)."""


_ERRORS = {
    RTP_ERR_SHORT: "packet shorter than its RTP header and CSRC list",
    RTP_ERR_VERSION: "RTP version is not 2",
    RTP_ERR_EXTENSION: "header extension runs past the end of the packet",
    RTP_ERR_PADDING: "padding count is zero or larger than the payload",
    RTP_ERR_RTCP: "packet type is RTCP (RFC 5761 §4), not RTP",
}


cdef inline uint16_t _be16(const uint8_t* p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint32_t _be32(const uint8_t* p) noexcept nogil:
    return ((<uint32_t>p[0]) << 24) | ((<uint32_t>p[1]) << 16) | ((<uint32_t>p[2]) << 8) | p[3]


cdef inline void _put16(uint8_t* p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>(v & 0xFF)


cdef inline void _put32(uint8_t* p, uint32_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 24)
    p[1] = <uint8_t>((v >> 16) & 0xFF)
    p[2] = <uint8_t>((v >> 8) & 0xFF)
    p[3] = <uint8_t>(v & 0xFF)


# ---------------------------------------------------------------- RTP header (RFC 3550 §5.1)

cdef int rtp_parse_header(const uint8_t* buf, Py_ssize_t n, rtp_header_t* out) noexcept nogil:
    cdef Py_ssize_t pos, end
    cdef int i
    cdef uint8_t pad
    memset(out, 0, sizeof(rtp_header_t))
    if n < RTP_HEADER_MIN:
        out.error = RTP_ERR_SHORT
        return -1
    out.version = buf[0] >> 6
    if out.version != 2:
        out.error = RTP_ERR_VERSION
        return -1
    out.padding = (buf[0] >> 5) & 1
    out.extension = (buf[0] >> 4) & 1
    out.csrc_count = buf[0] & 0x0F
    out.marker = buf[1] >> 7
    out.payload_type = buf[1] & 0x7F
    out.seq = _be16(buf + 2)
    out.timestamp = _be32(buf + 4)
    out.ssrc = _be32(buf + 8)
    pos = RTP_HEADER_MIN + 4 * out.csrc_count
    if pos > n:
        out.error = RTP_ERR_SHORT
        return -1
    for i in range(out.csrc_count):
        out.csrc[i] = _be32(buf + RTP_HEADER_MIN + 4 * i)
    if out.extension:
        # §5.3.1: 16-bit profile field, 16-bit length in 32-bit words (header excluded).
        if pos + 4 > n:
            out.error = RTP_ERR_EXTENSION
            return -1
        out.ext_profile = _be16(buf + pos)
        out.ext_length = 4 * <Py_ssize_t>_be16(buf + pos + 2)
        out.ext_offset = pos + 4
        pos = out.ext_offset + out.ext_length
        if pos > n:
            out.error = RTP_ERR_EXTENSION
            return -1
    end = n
    if out.padding:
        # §5.1: the last octet counts the padding octets, itself included.
        if end <= pos:
            out.error = RTP_ERR_PADDING
            return -1
        pad = buf[n - 1]
        if pad == 0 or pad > end - pos:
            out.error = RTP_ERR_PADDING
            return -1
        out.padding_length = pad
        end -= pad
    out.payload_offset = pos
    out.payload_length = end - pos
    return 0


cdef void rtp_write_seq(uint8_t* buf, uint16_t seq) noexcept nogil:
    _put16(buf + 2, seq)


cdef void rtp_write_timestamp(uint8_t* buf, uint32_t ts) noexcept nogil:
    _put32(buf + 4, ts)


cdef void rtp_write_ssrc(uint8_t* buf, uint32_t ssrc) noexcept nogil:
    _put32(buf + 8, ssrc)


cdef void rtp_write_marker(uint8_t* buf, int marker) noexcept nogil:
    buf[1] = (buf[1] & 0x7F) | (0x80 if marker else 0)


cdef void rtp_write_payload_type(uint8_t* buf, uint8_t pt) noexcept nogil:
    buf[1] = (buf[1] & 0x80) | (pt & 0x7F)


cdef Py_ssize_t rtp_write_header(uint8_t* buf, Py_ssize_t cap, uint8_t pt, int marker,
                                 uint16_t seq, uint32_t ts, uint32_t ssrc) noexcept nogil:
    if cap < RTP_HEADER_MIN:
        return -1
    buf[0] = 0x80
    buf[1] = (pt & 0x7F) | (0x80 if marker else 0)
    _put16(buf + 2, seq)
    _put32(buf + 4, ts)
    _put32(buf + 8, ssrc)
    return RTP_HEADER_MIN


cdef int rtp_is_rtcp(const uint8_t* buf, Py_ssize_t n) noexcept nogil:
    return 1 if n >= 2 and 192 <= buf[1] <= 223 else 0


# ------------------------------------------- receiver statistics (RFC 3550 A.1, A.3, A.8)

cdef void rtp_stats_init(rtp_stats_t* s) noexcept nogil:
    memset(s, 0, sizeof(rtp_stats_t))


cdef inline void _init_seq(rtp_stats_t* s, uint16_t seq) noexcept nogil:
    # A.1 init_seq()
    s.base_seq = seq
    s.max_seq = seq
    s.bad_seq = RTP_SEQ_MOD + 1  # so seq == bad_seq is false
    s.cycles = 0
    s.received = 0
    s.received_prior = 0
    s.expected_prior = 0


cdef int _update_seq(rtp_stats_t* s, uint16_t seq) noexcept nogil:
    # A.1 update_seq(); 16-bit arithmetic so that probation survives a wrap.
    cdef uint16_t udelta = <uint16_t>(seq - s.max_seq)
    if s.probation:
        if seq == <uint16_t>(s.max_seq + 1):
            s.probation -= 1
            s.max_seq = seq
            if s.probation == 0:
                _init_seq(s, seq)
                s.received += 1
                return 1
        else:
            s.probation = RTP_MIN_SEQUENTIAL - 1
            s.max_seq = seq
        return 0
    elif udelta < RTP_MAX_DROPOUT:
        # in order, with permissible gap
        if seq < s.max_seq:
            s.cycles += RTP_SEQ_MOD  # sequence number wrapped
        s.max_seq = seq
    elif udelta <= RTP_SEQ_MOD - RTP_MAX_MISORDER:
        # the sequence number made a very large jump
        if seq == s.bad_seq:
            # two sequential packets: assume the other side restarted without telling us
            _init_seq(s, seq)
        else:
            s.bad_seq = (seq + 1) & (RTP_SEQ_MOD - 1)
            return 0
    # else: duplicate or reordered packet, counted as received (A.3)
    s.received += 1
    return 1


cdef int rtp_stats_update(rtp_stats_t* s, uint16_t seq, uint32_t ts,
                          uint32_t arrival_ts_units) noexcept nogil:
    cdef uint32_t transit
    cdef int32_t d
    if not s.started:
        # A.1: a new source starts on probation
        _init_seq(s, seq)
        s.max_seq = <uint16_t>(seq - 1)
        s.probation = RTP_MIN_SEQUENTIAL
        s.started = 1
    if not _update_seq(s, seq):
        s.invalid += 1
        return 0
    # A.8: D(i-1, i) from relative transit times, J += (|D| - J) / 16
    transit = arrival_ts_units - ts
    if s.have_transit:
        d = <int32_t>(transit - s.transit)
        if d < 0:
            d = -d
        s.jitter += (<double>d - s.jitter) / 16.0
    s.transit = transit
    s.have_transit = 1
    return 1


cdef uint32_t rtp_stats_extended_max(const rtp_stats_t* s) noexcept nogil:
    return s.cycles + s.max_seq


cdef uint32_t rtp_stats_expected(const rtp_stats_t* s) noexcept nogil:
    # A.3: expected = extended_max - base_seq + 1 (0 while the source is on probation)
    if not s.started or s.probation:
        return 0
    return s.cycles + s.max_seq - s.base_seq + 1


cdef int64_t rtp_stats_lost(const rtp_stats_t* s) noexcept nogil:
    return <int64_t>rtp_stats_expected(s) - <int64_t>s.received


cdef void rtp_stats_sr_received(rtp_stats_t* s, uint32_t ntp_middle,
                                uint32_t arrival_ntp_middle) noexcept nogil:
    s.lsr = ntp_middle
    s.lsr_arrival = arrival_ntp_middle
    s.have_lsr = 1


cdef void rtp_stats_report(rtp_stats_t* s, uint32_t ssrc, uint32_t now_ntp_middle,
                           rtcp_report_block_t* out) noexcept nogil:
    cdef uint32_t expected = rtp_stats_expected(s)
    cdef int64_t lost = <int64_t>expected - <int64_t>s.received
    cdef uint32_t expected_interval, received_interval
    cdef int64_t lost_interval
    out.ssrc = ssrc
    # §6.4.1: cumulative lost is a 24-bit signed field; clamp rather than wrap.
    if lost > 0x7FFFFF:
        lost = 0x7FFFFF
    elif lost < -0x800000:
        lost = -0x800000
    out.cumulative_lost = <int32_t>lost
    # A.3: fraction lost over the interval since the previous report
    if expected == 0:
        out.fraction_lost = 0
    else:
        expected_interval = expected - s.expected_prior
        received_interval = s.received - s.received_prior
        lost_interval = <int64_t>expected_interval - <int64_t>received_interval
        if expected_interval == 0 or lost_interval <= 0:
            out.fraction_lost = 0
        else:
            out.fraction_lost = <uint8_t>((lost_interval << 8) // expected_interval)
        s.expected_prior = expected
        s.received_prior = s.received
    out.highest_seq = rtp_stats_extended_max(s) if expected else 0
    out.jitter = <uint32_t>s.jitter
    if s.have_lsr:
        out.lsr = s.lsr
        out.dlsr = now_ntp_middle - s.lsr_arrival
    else:
        out.lsr = 0
        out.dlsr = 0


cdef int64_t rtcp_rtt(uint32_t arrival_ntp_middle, uint32_t lsr, uint32_t dlsr) noexcept nogil:
    # §6.4.1: RTT = A - LSR - DLSR, all in 1/65536 s, modulo 2^32
    cdef int32_t rtt
    if lsr == 0:
        return -1
    rtt = <int32_t>(arrival_ntp_middle - lsr - dlsr)
    if rtt < 0:
        return -1
    return rtt


cdef void _write_block(uint8_t* p, const rtcp_report_block_t* b) noexcept nogil:
    _put32(p, b.ssrc)
    _put32(p + 4, ((<uint32_t>b.fraction_lost) << 24) | ((<uint32_t>b.cumulative_lost) & 0xFFFFFF))
    _put32(p + 8, b.highest_seq)
    _put32(p + 12, b.jitter)
    _put32(p + 16, b.lsr)
    _put32(p + 20, b.dlsr)


cdef Py_ssize_t rtcp_write_rr(uint8_t* buf, Py_ssize_t cap, uint32_t ssrc,
                              const rtcp_report_block_t* blocks, int count) noexcept nogil:
    cdef Py_ssize_t size = 8 + 24 * <Py_ssize_t>count
    cdef int i
    if count < 0 or count > 31 or cap < size:
        return -1
    buf[0] = 0x80 | count
    buf[1] = 201
    _put16(buf + 2, <uint16_t>(size // 4 - 1))
    _put32(buf + 4, ssrc)
    for i in range(count):
        _write_block(buf + 8 + 24 * i, &blocks[i])
    return size


cdef Py_ssize_t rtcp_write_sr(uint8_t* buf, Py_ssize_t cap, uint32_t ssrc, uint64_t ntp,
                              uint32_t rtp_ts, uint32_t packets, uint32_t octets,
                              const rtcp_report_block_t* blocks, int count) noexcept nogil:
    cdef Py_ssize_t size = 28 + 24 * <Py_ssize_t>count
    cdef int i
    if count < 0 or count > 31 or cap < size:
        return -1
    buf[0] = 0x80 | count
    buf[1] = 200
    _put16(buf + 2, <uint16_t>(size // 4 - 1))
    _put32(buf + 4, ssrc)
    _put32(buf + 8, <uint32_t>(ntp >> 32))
    _put32(buf + 12, <uint32_t>(ntp & 0xFFFFFFFFU))
    _put32(buf + 16, rtp_ts)
    _put32(buf + 20, packets)
    _put32(buf + 24, octets)
    for i in range(count):
        _write_block(buf + 28 + 24 * i, &blocks[i])
    return size


# ------------------------------------------------------ RFC 4733 telephone-events

cdef int te_parse(const uint8_t* payload, Py_ssize_t n, te_payload_t* out) noexcept nogil:
    if n < 4:
        return -1
    out.event = payload[0]
    out.end = payload[1] >> 7
    out.volume = payload[1] & 0x3F
    out.duration = _be16(payload + 2)
    return 0


cdef void te_write(uint8_t* out, uint8_t event, int end, uint8_t volume,
                   uint16_t duration) noexcept nogil:
    out[0] = event
    out[1] = (0x80 if end else 0) | (volume & 0x3F)
    _put16(out + 2, duration)


cdef void te_receiver_init(te_receiver_t* r, double timeout) noexcept nogil:
    memset(r, 0, sizeof(te_receiver_t))
    r.timeout = timeout


cdef inline void _remember(te_receiver_t* r, uint32_t ts) noexcept nogil:
    r.recent[r.recent_pos] = ts
    r.recent_pos = (r.recent_pos + 1) % TE_RECENT
    if r.recent_count < TE_RECENT:
        r.recent_count += 1


cdef inline int _is_recent(const te_receiver_t* r, uint32_t ts) noexcept nogil:
    cdef int i
    for i in range(r.recent_count):
        if r.recent[i] == ts:
            return 1
    return 0


cdef void _finish(te_receiver_t* r, uint8_t reason, te_digit_t* out) noexcept nogil:
    out.event = r.cur_event
    out.volume = r.cur_volume
    out.reason = reason
    out.timestamp = r.cur_first_ts
    out.duration = r.cur_base + r.cur_duration
    _remember(r, r.cur_ts)
    if not r.have_last or <int32_t>(r.cur_ts - r.last_ts) > 0:
        r.last_ts = r.cur_ts
    r.have_last = 1
    r.active = 0


cdef int te_receiver_feed(te_receiver_t* r, uint32_t ts, int marker, const uint8_t* payload,
                          Py_ssize_t n, double now, te_digit_t* out) noexcept nogil:
    cdef te_payload_t p
    cdef int count = 0
    if te_parse(payload, n, &p) < 0:
        return -1
    if r.active and now - r.last_seen >= r.timeout:
        _finish(r, TE_TIMEOUT, &out[count])
        count += 1
    # §2.5.1.4 redundant end packets and late copies of a finished event: already reported.
    if _is_recent(r, ts):
        return count
    # A packet older than the newest finished event was reordered past it: too late to report
    # in order, and reporting it now would reorder the digits.
    if r.have_last and <int32_t>(ts - r.last_ts) < 0:
        return count
    if r.active:
        if ts == r.cur_ts:
            if p.duration > r.cur_duration:
                r.cur_duration = p.duration
            r.cur_volume = p.volume
            r.last_seen = now
            if p.end:
                _finish(r, TE_END_BIT, &out[count])
                count += 1
            return count
        if <int32_t>(ts - r.cur_ts) < 0:
            return count  # an older event surfacing after a newer one: ignore, as above
        if (not marker and p.event == r.cur_event and r.cur_duration >= 0xFF00
                and ts - r.cur_ts == r.cur_duration):
            # §2.5.1.3: a long event continues in a new segment at ts + 0xFFFF
            _remember(r, r.cur_ts)
            r.cur_base += r.cur_duration
            r.cur_ts = ts
            r.cur_duration = p.duration
            r.last_seen = now
            if p.end:
                _finish(r, TE_END_BIT, &out[count])
                count += 1
            return count
        # §2.5.2.2: a new event ends the previous one even if its end packets were lost
        _finish(r, TE_NEW_EVENT, &out[count])
        count += 1
    r.active = 1
    r.cur_event = p.event
    r.cur_volume = p.volume
    r.cur_ts = ts
    r.cur_first_ts = ts
    r.cur_duration = p.duration
    r.cur_base = 0
    r.last_seen = now
    if p.end:
        # start packet lost and only an end packet arrived: still one digit
        _finish(r, TE_END_BIT, &out[count])
        count += 1
    return count


cdef int te_receiver_poll(te_receiver_t* r, double now, te_digit_t* out) noexcept nogil:
    if r.active and now - r.last_seen >= r.timeout:
        _finish(r, TE_TIMEOUT, out)
        return 1
    return 0


cdef double te_receiver_next_timer(const te_receiver_t* r) noexcept nogil:
    if not r.active:
        return -1.0
    return r.last_seen + r.timeout


# ------------------------------------------------------------------ Python wrappers

def parse_header(const uint8_t[::1] data):
    """Parses an RTP packet. Returns (version, padding, extension, marker, payload_type, seq,
    timestamp, ssrc, csrcs, ext_profile, ext_offset, ext_length, payload_offset,
    payload_length, padding_length); raises RtpParseError."""
    cdef rtp_header_t h
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        raise RtpParseError(_ERRORS[RTP_ERR_SHORT])
    if n >= 2 and (data[0] >> 6) == 2 and rtp_is_rtcp(&data[0], n):
        raise RtpParseError(_ERRORS[RTP_ERR_RTCP])
    if rtp_parse_header(&data[0], n, &h) < 0:
        raise RtpParseError(_ERRORS[h.error])
    csrcs = tuple(h.csrc[i] for i in range(h.csrc_count))
    return (h.version, h.padding, h.extension, h.marker, h.payload_type, h.seq, h.timestamp,
            h.ssrc, csrcs, h.ext_profile if h.extension else None, h.ext_offset, h.ext_length,
            h.payload_offset, h.payload_length, h.padding_length)


def is_rtcp(const uint8_t[::1] data) -> bool:
    """True when the datagram carries an RTCP packet type (RFC 5761 §4 demultiplexing)."""
    if data.shape[0] < 2:
        return False
    return bool(rtp_is_rtcp(&data[0], data.shape[0]))


def rtt_from_report(uint32_t arrival_ntp_middle, uint32_t lsr, uint32_t dlsr):
    """Round-trip time in seconds from a report block's LSR/DLSR (RFC 3550 §6.4.1), or None
    when the block carries no LSR or the result is negative."""
    cdef int64_t v = rtcp_rtt(arrival_ntp_middle, lsr, dlsr)
    if v < 0:
        return None
    return v / 65536.0


cdef class ReceptionStats:
    """Statistics of one received RTP source (RFC 3550 A.1 validation, A.3 loss, A.8 jitter)."""
    cdef rtp_stats_t s

    def __cinit__(self):
        rtp_stats_init(&self.s)

    def update(self, int seq, long long timestamp, long long arrival) -> bool:
        """Counts one packet; arrival is in RTP timestamp units. False if A.1 refused it."""
        return bool(rtp_stats_update(&self.s, <uint16_t>(seq & 0xFFFF),
                                     <uint32_t>(timestamp & 0xFFFFFFFF),
                                     <uint32_t>(arrival & 0xFFFFFFFF)))

    def sr_received(self, long long ntp_middle, long long arrival_ntp_middle) -> None:
        """Notes a sender report of the source for LSR/DLSR (§6.4.1)."""
        rtp_stats_sr_received(&self.s, <uint32_t>(ntp_middle & 0xFFFFFFFF),
                              <uint32_t>(arrival_ntp_middle & 0xFFFFFFFF))

    def report(self, long long ssrc, long long now_ntp_middle):
        """(ssrc, fraction_lost, cumulative_lost, highest_seq, jitter, lsr, dlsr) for a report
        block; starts a new fraction-lost interval."""
        cdef rtcp_report_block_t b
        rtp_stats_report(&self.s, <uint32_t>(ssrc & 0xFFFFFFFF),
                         <uint32_t>(now_ntp_middle & 0xFFFFFFFF), &b)
        return (b.ssrc, b.fraction_lost, b.cumulative_lost, b.highest_seq, b.jitter, b.lsr,
                b.dlsr)

    @property
    def valid(self) -> bool:
        return bool(self.s.started and not self.s.probation)

    @property
    def received(self) -> int:
        return self.s.received

    @property
    def expected(self) -> int:
        return rtp_stats_expected(&self.s)

    @property
    def lost(self) -> int:
        return rtp_stats_lost(&self.s)

    @property
    def extended_max_seq(self) -> int:
        return rtp_stats_extended_max(&self.s)

    @property
    def base_seq(self) -> int:
        return self.s.base_seq

    @property
    def cycles(self) -> int:
        return self.s.cycles >> 16

    @property
    def jitter(self) -> float:
        return self.s.jitter

    @property
    def invalid(self) -> int:
        return self.s.invalid


cdef class TelephoneEventCore:
    """RFC 4733 receiver core; feed() and poll() return lists of
    (event, volume, reason, timestamp, duration) tuples, each event exactly once."""
    cdef te_receiver_t r

    def __cinit__(self, double timeout=0.25):
        te_receiver_init(&self.r, timeout)

    def feed(self, long long timestamp, bint marker, const uint8_t[::1] payload, double now):
        cdef te_digit_t out[2]
        cdef int n, i
        if payload.shape[0] < 4:
            raise RtpParseError("telephone-event payload shorter than 4 bytes")
        n = te_receiver_feed(&self.r, <uint32_t>(timestamp & 0xFFFFFFFF), marker,
                             &payload[0], payload.shape[0], now, out)
        return [(out[i].event, out[i].volume, out[i].reason, out[i].timestamp, out[i].duration)
                for i in range(n)]

    def poll(self, double now):
        cdef te_digit_t out
        if te_receiver_poll(&self.r, now, &out):
            return [(out.event, out.volume, out.reason, out.timestamp, out.duration)]
        return []

    def next_timer(self):
        cdef double t = te_receiver_next_timer(&self.r)
        return None if t < 0 else t

    @property
    def active(self) -> bool:
        return bool(self.r.active)


# ------------------------------------- Python access to the nogil writers (tests, tools)

def write_header(int payload_type, bint marker, long long seq, long long timestamp,
                 long long ssrc) -> bytes:
    """A 12-byte RTP header written by rtp_write_header."""
    cdef uint8_t buf[12]
    rtp_write_header(buf, 12, <uint8_t>(payload_type & 0x7F), marker, <uint16_t>(seq & 0xFFFF),
                     <uint32_t>(timestamp & 0xFFFFFFFF), <uint32_t>(ssrc & 0xFFFFFFFF))
    return bytes(buf[:12])


def rewrite_header(uint8_t[::1] packet, seq=None, timestamp=None, ssrc=None, marker=None,
                   payload_type=None) -> None:
    """Rewrites fields of an RTP packet in place with the rtp_write_* helpers."""
    if packet.shape[0] < RTP_HEADER_MIN:
        raise RtpParseError(_ERRORS[RTP_ERR_SHORT])
    if seq is not None:
        rtp_write_seq(&packet[0], <uint16_t>(seq & 0xFFFF))
    if timestamp is not None:
        rtp_write_timestamp(&packet[0], <uint32_t>(timestamp & 0xFFFFFFFF))
    if ssrc is not None:
        rtp_write_ssrc(&packet[0], <uint32_t>(ssrc & 0xFFFFFFFF))
    if marker is not None:
        rtp_write_marker(&packet[0], 1 if marker else 0)
    if payload_type is not None:
        rtp_write_payload_type(&packet[0], <uint8_t>(payload_type & 0x7F))


cdef int _blocks_from(blocks, rtcp_report_block_t* out) except -1:
    cdef int i = 0
    if len(blocks) > 31:
        raise ValueError("at most 31 report blocks")
    for b in blocks:
        out[i].ssrc = b[0]
        out[i].fraction_lost = b[1]
        out[i].cumulative_lost = b[2]
        out[i].highest_seq = b[3]
        out[i].jitter = b[4]
        out[i].lsr = b[5]
        out[i].dlsr = b[6]
        i += 1
    return i


def write_receiver_report(long long ssrc, blocks=()) -> bytes:
    """An RR written by rtcp_write_rr; blocks are (ssrc, fraction_lost, cumulative_lost,
    highest_seq, jitter, lsr, dlsr) tuples."""
    cdef rtcp_report_block_t b[31]
    cdef uint8_t buf[8 + 24 * 31]
    cdef int count = _blocks_from(blocks, b)
    cdef Py_ssize_t n = rtcp_write_rr(buf, sizeof(buf), <uint32_t>(ssrc & 0xFFFFFFFF), b, count)
    return bytes(buf[:n])


def write_sender_report(long long ssrc, unsigned long long ntp, long long rtp_timestamp,
                        long long packets, long long octets, blocks=()) -> bytes:
    """An SR written by rtcp_write_sr."""
    cdef rtcp_report_block_t b[31]
    cdef uint8_t buf[28 + 24 * 31]
    cdef int count = _blocks_from(blocks, b)
    cdef Py_ssize_t n = rtcp_write_sr(buf, sizeof(buf), <uint32_t>(ssrc & 0xFFFFFFFF), ntp,
                                      <uint32_t>(rtp_timestamp & 0xFFFFFFFF),
                                      <uint32_t>(packets & 0xFFFFFFFF),
                                      <uint32_t>(octets & 0xFFFFFFFF), b, count)
    return bytes(buf[:n])
