# C-level RTP/RTCP helpers for the GIL-free media engine (RFC 3550, RFC 4733).
#
# Stable interface: other extensions `cimport` these names. Every function here is
# `noexcept nogil`, touches no Python object and reports errors by return value.
# Byte order on the wire is network order; the structs hold host-order values.

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

# rtp_header_t.error / return codes of rtp_parse_header (0 = ok).
cdef enum:
    RTP_OK = 0
    RTP_ERR_SHORT = 1            # fewer than 12 bytes, or CSRC list beyond the buffer
    RTP_ERR_VERSION = 2          # V != 2 (RFC 3550 §5.1)
    RTP_ERR_EXTENSION = 3        # header extension beyond the buffer (§5.3.1)
    RTP_ERR_PADDING = 4          # padding count 0 or larger than the payload (§5.1 P bit)
    RTP_ERR_RTCP = 5             # reserved for callers that refuse RTCP types (RFC 5761 §4);
                                 # rtp_parse_header itself never returns it

# Size limits. RTP_MAX_CSRC is fixed by the 4-bit CC field.
cdef enum:
    RTP_HEADER_MIN = 12
    RTP_MAX_CSRC = 15

ctypedef struct rtp_header_t:
    uint8_t version
    uint8_t padding            # P bit
    uint8_t extension          # X bit
    uint8_t csrc_count
    uint8_t marker
    uint8_t payload_type
    uint16_t seq
    uint32_t timestamp
    uint32_t ssrc
    uint32_t csrc[15]
    uint16_t ext_profile       # "defined by profile" 16 bits (0xBEDE: RFC 8285 one-byte form)
    Py_ssize_t ext_offset      # offset of the extension data (after its 4-byte header)
    Py_ssize_t ext_length      # bytes of extension data (length field * 4)
    Py_ssize_t payload_offset  # offset of the payload = total header length
    Py_ssize_t payload_length  # bytes of payload, padding excluded
    uint8_t padding_length     # trailing padding bytes, count byte included
    int error                  # RTP_OK or RTP_ERR_*

# Parses the fixed header, CSRC list, extension and padding of buf[0:n] into *out.
# Returns 0, or -1 with out.error set. Never reads past buf[n-1].
cdef int rtp_parse_header(const uint8_t* buf, Py_ssize_t n, rtp_header_t* out) noexcept nogil

# In-place rewriting for relaying (buf must hold at least 12 bytes of RTP header).
cdef void rtp_write_seq(uint8_t* buf, uint16_t seq) noexcept nogil
cdef void rtp_write_timestamp(uint8_t* buf, uint32_t ts) noexcept nogil
cdef void rtp_write_ssrc(uint8_t* buf, uint32_t ssrc) noexcept nogil
cdef void rtp_write_marker(uint8_t* buf, int marker) noexcept nogil
cdef void rtp_write_payload_type(uint8_t* buf, uint8_t pt) noexcept nogil

# Writes a 12-byte header (V=2, no padding/extension/CSRC). Returns 12, or -1 if cap < 12.
cdef Py_ssize_t rtp_write_header(uint8_t* buf, Py_ssize_t cap, uint8_t pt, int marker,
                                 uint16_t seq, uint32_t ts, uint32_t ssrc) noexcept nogil

# 1 when the datagram looks like RTCP rather than RTP (RFC 5761 §4: PT 192..223), else 0.
cdef int rtp_is_rtcp(const uint8_t* buf, Py_ssize_t n) noexcept nogil

# --- Receiver statistics, RFC 3550 Appendix A.1 (validation), A.3 (loss), A.8 (jitter) ---

cdef enum:
    RTP_MAX_DROPOUT = 3000       # A.1 suggested values
    RTP_MAX_MISORDER = 100
    RTP_MIN_SEQUENTIAL = 2
    RTP_SEQ_MOD = 65536

ctypedef struct rtp_stats_t:
    uint16_t max_seq           # highest seq number seen
    uint32_t cycles            # shifted count of seq number cycles (A.1: count << 16)
    uint32_t base_seq          # base seq number
    uint32_t bad_seq           # last 'bad' seq number + 1
    uint32_t probation         # sequential packets till source is valid
    uint32_t received          # packets received (duplicates included, A.3)
    uint32_t expected_prior    # expected at last report (A.3 interval)
    uint32_t received_prior    # received at last report
    uint32_t transit           # relative transit time of the previous packet (A.8)
    double jitter              # estimated interarrival jitter, timestamp units (A.8 / §6.4.1)
    int started                # 0 until the first packet (then probation runs)
    int have_transit           # 0 until the first valid packet sets `transit`
    uint64_t invalid           # packets refused by A.1 validation (probation, big jumps)
    uint32_t lsr               # middle 32 bits of the last SR's NTP time (§6.4.1 LSR)
    uint32_t lsr_arrival       # when that SR arrived, NTP middle 32 bits (1/65536 s)
    int have_lsr

ctypedef struct rtcp_report_block_t:  # one reception report block (RFC 3550 §6.4.1)
    uint32_t ssrc
    uint8_t fraction_lost      # 8-bit fixed point, since the previous report
    int32_t cumulative_lost    # 24-bit signed, clamped
    uint32_t highest_seq       # extended highest sequence number received
    uint32_t jitter            # interarrival jitter, timestamp units
    uint32_t lsr
    uint32_t dlsr              # delay since last SR, 1/65536 s

cdef void rtp_stats_init(rtp_stats_t* s) noexcept nogil
# Counts one packet of the source. arrival is the arrival time in RTP timestamp units
# (may wrap). Returns 1 if the packet was counted (source valid), 0 if A.1 refused it.
cdef int rtp_stats_update(rtp_stats_t* s, uint16_t seq, uint32_t ts,
                          uint32_t arrival_ts_units) noexcept nogil
cdef uint32_t rtp_stats_extended_max(const rtp_stats_t* s) noexcept nogil
cdef uint32_t rtp_stats_expected(const rtp_stats_t* s) noexcept nogil
cdef int64_t rtp_stats_lost(const rtp_stats_t* s) noexcept nogil
# Records an SR from this source (for LSR/DLSR in our next report).
cdef void rtp_stats_sr_received(rtp_stats_t* s, uint32_t ntp_middle,
                                uint32_t arrival_ntp_middle) noexcept nogil
# Fills a report block and starts a new fraction-lost interval (A.3).
cdef void rtp_stats_report(rtp_stats_t* s, uint32_t ssrc, uint32_t now_ntp_middle,
                           rtcp_report_block_t* out) noexcept nogil

# Round-trip time (§6.4.1): arrival - LSR - DLSR in 1/65536 s; -1 when LSR is 0 or negative.
cdef int64_t rtcp_rtt(uint32_t arrival_ntp_middle, uint32_t lsr, uint32_t dlsr) noexcept nogil

# Writes an RR / SR with up to 31 report blocks. Returns bytes written, or -1 if cap is short.
cdef Py_ssize_t rtcp_write_rr(uint8_t* buf, Py_ssize_t cap, uint32_t ssrc,
                              const rtcp_report_block_t* blocks, int count) noexcept nogil
cdef Py_ssize_t rtcp_write_sr(uint8_t* buf, Py_ssize_t cap, uint32_t ssrc, uint64_t ntp,
                              uint32_t rtp_ts, uint32_t packets, uint32_t octets,
                              const rtcp_report_block_t* blocks, int count) noexcept nogil

# --- RFC 4733 telephone-events ---

ctypedef struct te_payload_t:  # §2.3 payload format
    uint8_t event
    uint8_t end
    uint8_t volume             # 0..63, -dBm0
    uint16_t duration          # timestamp units

# Parses the first 4 bytes. Returns 0, or -1 when n < 4.
cdef int te_parse(const uint8_t* payload, Py_ssize_t n, te_payload_t* out) noexcept nogil
cdef void te_write(uint8_t* out, uint8_t event, int end, uint8_t volume,
                   uint16_t duration) noexcept nogil

# te_digit_t.reason: why the event was reported as finished.
cdef enum:
    TE_END_BIT = 1             # an E=1 packet arrived (§2.5.1.4)
    TE_NEW_EVENT = 2           # a later event started before any end packet (§2.5.2.2)
    TE_TIMEOUT = 3             # no packet of the event for timeout seconds

ctypedef struct te_digit_t:    # one finished event, reported exactly once
    uint8_t event
    uint8_t volume
    uint8_t reason
    uint32_t timestamp         # RTP timestamp of the event (its identity, §2.5.1.2)
    uint32_t duration          # longest duration seen, timestamp units

cdef enum:
    TE_RECENT = 16             # finished timestamps remembered against redundancy/reordering

ctypedef struct te_receiver_t:
    double timeout             # seconds without a packet before an open event ends
    int active                 # an event is open
    uint8_t cur_event
    uint8_t cur_volume
    uint32_t cur_ts            # timestamp of the open segment
    uint32_t cur_first_ts      # timestamp of the event's first segment (its identity)
    uint32_t cur_duration      # duration within the open segment
    uint32_t cur_base          # summed duration of earlier segments (§2.5.1.3 long events)
    double last_seen           # `now` of the last packet of the open event
    int have_last              # a finished event exists (last_ts is valid)
    uint32_t last_ts           # newest finished event timestamp
    uint32_t recent[16]        # ring of finished event timestamps
    int recent_count
    int recent_pos

cdef void te_receiver_init(te_receiver_t* r, double timeout) noexcept nogil
# Feeds one telephone-event RTP packet. Writes up to 2 finished events into out[0..1]
# and returns how many, or -1 when the payload is shorter than 4 bytes.
cdef int te_receiver_feed(te_receiver_t* r, uint32_t ts, int marker, const uint8_t* payload,
                          Py_ssize_t n, double now, te_digit_t* out) noexcept nogil
# Ends an open event whose timeout passed. Returns 1 with *out filled, else 0.
cdef int te_receiver_poll(te_receiver_t* r, double now, te_digit_t* out) noexcept nogil
# When te_receiver_poll next needs to run, or -1.0 when no event is open.
cdef double te_receiver_next_timer(const te_receiver_t* r) noexcept nogil
