# Structures of the media engine shared between its parts (control side and engine thread).
# Nothing here holds a Python object: the engine thread runs without the GIL.

from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport FILE

from media_core._dtmf cimport dtmf_state
from media_core._rtp cimport rtp_stats_t, te_receiver_t
from media_core.cengine cimport (
    epoll_event,
    iovec,
    mmsghdr,
    pthread_mutex_t,
    pthread_t,
    sockaddr_storage,
    socklen_t,
)

cdef enum:
    FRAME = 160              # samples per 20 ms frame at 8 kHz (G.711, RFC 3551 §4.5.14)
    FIFO_CAP = 1600          # PCM samples buffered per tapped leg (200 ms); older ones dropped
    PKT_MAX = 1500           # largest datagram accepted; longer ones are counted and dropped
    BATCH = 64               # datagrams per recvmmsg / sendmmsg call
    MAX_SRC = 3              # mix sources per leg (barge: the other two parties)
    CMD_CAP = 4096           # queued commands; a full queue is an error for the caller
    EVT_CAP = 16384          # queued events; on overflow events are counted as lost
    REC_HOLD = 640           # PCM samples held per side while a timestamp jump is confirmed
    REC_HOLD_PKTS = 8        # packets held likewise

# Leg.latch
cdef enum:
    LATCH_NONE = 0           # no far end known: nothing is sent
    LATCH_EXPECTED = 1       # address from SDP, replaced by the first packet's source
    LATCH_LOCKED = 2         # learnt from packets (symmetric RTP, RFC 4961)

# Engine command opcodes
cdef enum:
    CMD_ADD = 1
    CMD_REMOTE = 2
    CMD_CODEC = 3
    CMD_BRIDGE = 4
    CMD_UNBRIDGE = 5
    CMD_MIX = 6
    CMD_PLAY = 7
    CMD_STOP_PLAY = 8
    CMD_REC_START = 9
    CMD_REC_PAUSE = 10
    CMD_REC_RESUME = 11
    CMD_REC_STOP = 12
    CMD_TIMEOUT = 13
    CMD_INBAND = 14
    CMD_RELEASE = 15

# Event kinds
cdef enum:
    EV_DIGIT = 1             # a: digit char, b: 0 = RFC 4733, 1 = in-band; x: duration (ts units)
    EV_TIMEOUT = 2           # x: idle ns
    EV_PLAY_DONE = 3         # a: play id, b: 1 completed / 0 stopped or replaced
    EV_RELEASED = 4
    EV_RECORD_DONE = 5       # a: recording id, x: stereo frames written
    EV_LOST = 6              # a: events lost because the queue was full

ctypedef struct Cmd:
    int32_t op
    int32_t leg
    int32_t i[4]
    int64_t l
    void* ptr
    sockaddr_storage addr
    socklen_t addr_len
    sockaddr_storage addr2
    socklen_t addr2_len

ctypedef struct Event:
    int32_t kind
    int32_t leg
    int32_t a
    int32_t b
    int64_t x
    int64_t t_ns

ctypedef struct RecChannel:
    # One side of a recording, placed by RTP timestamp (RFC 3550 §5.1): recording position =
    # timestamp relative to the side's first packet + offset, both in 8 kHz samples.
    int32_t anchored         # the first packet of the stream has been seen
    uint32_t ssrc
    uint16_t last_seq        # highest sequence number seen (RFC 3550 A.1, 16-bit wrap)
    uint32_t last_ts         # highest timestamp seen (32-bit wrap)
    int64_t last_rel         # last_ts relative to the first packet, extended past wraps
    int64_t offset           # position = rel + offset
    int64_t floor            # least lateness (samples) seen in the current drift period
    int64_t floor_end_ns     # end of the drift period
    # packets far later than their place (a timestamp jump back, or a sender that stopped
    # without advancing its clock): held until the jump is confirmed, then placed again
    int32_t jumping          # in a run of such packets, since jump_since_ns
    int64_t jump_since_ns
    int32_t nheld
    int32_t held_fill
    int64_t held_rel[REC_HOLD_PKTS]
    int64_t held_pos[REC_HOLD_PKTS]      # arrival positions
    int32_t held_len[REC_HOLD_PKTS]
    int32_t held_muted[REC_HOLD_PKTS]    # arrived while the recording was paused
    int16_t held_pcm[REC_HOLD]

ctypedef struct Recording:
    FILE* f
    char* vbuf               # stdio buffer (REC_BUF bytes, see record_start)
    int16_t* ring            # caller's ring_size samples then the agent's; zero where no audio
    int32_t id
    int32_t legs[2]          # caller (left channel), agent (right channel); -1 when gone
    int32_t ring_size        # a power of two, > delay + the early bound + a few frames
    int32_t paused
    int32_t error
    int64_t pos              # next position to write (samples)
    uint64_t frames          # stereo frames written to the file
    int64_t start_ns         # position 0 of the recording (monotonic clock)
    int64_t delay            # a position is written once it is this old (samples)
    int64_t max_end          # end of the latest audio placed (samples)
    int64_t mute_from        # positions [mute_from, mute_to) are written as silence (pause)
    int64_t mute_to
    RecChannel ch[2]
    int16_t buf[2 * FRAME]

ctypedef struct Leg:
    int32_t slot
    int32_t active
    int32_t rtp_fd
    int32_t rtcp_fd
    int32_t family
    int32_t local_port
    int32_t dense_index      # position in Engine.dense
    # far end (RFC 4961 symmetric RTP latching)
    int32_t latch
    int32_t connected        # rtp_fd is connect()ed to the latched far end
    sockaddr_storage remote
    socklen_t remote_len
    int32_t rtcp_latch
    sockaddr_storage rtcp_remote
    socklen_t rtcp_remote_len
    # codec
    int32_t pt               # 0 PCMU or 8 PCMA (RFC 3551 static payload types)
    int32_t te_pt            # RFC 4733 telephone-event payload type, -1 none
    # what this leg sends: the input of `peer` (relay) or the mix of src[0..nsrc-1]
    int32_t peer
    int32_t nsrc
    int32_t src[3]
    int32_t listeners        # legs whose mix uses this leg's input
    # outgoing stream continuity (RFC 3550 §5.1: one SSRC, seq +1, ts in sampling clock)
    uint32_t out_ssrc
    uint16_t out_seq
    uint32_t out_ts
    int64_t out_last_ns
    uint64_t out_key
    int32_t out_started
    int32_t out_marker
    uint16_t seq_off
    uint32_t ts_off
    # receive side
    uint32_t in_ssrc
    int32_t in_have_ssrc
    int64_t last_rx_ns
    int64_t timeout_ns
    int32_t timed_out
    uint64_t rx_packets
    uint64_t rx_bytes
    uint64_t tx_packets
    uint64_t tx_bytes
    uint64_t rx_foreign      # from an address other than the latched one
    uint64_t rx_invalid      # not RTP, or an unknown payload type
    uint64_t tx_errors
    uint64_t rec_late        # packets (partly) too late for their place in the recording
    uint64_t rec_resyncs     # recording timeline realigned (new stream, jump, drift)
    rtp_stats_t stats
    te_receiver_t te
    int32_t inband
    dtmf_state dtmf
    # RTCP (RFC 3550 §6)
    int64_t next_rtcp_ns
    uint64_t rtcp_rx
    uint64_t rtcp_tx
    int32_t remote_fraction_lost   # from the far end's reports on our stream, -1 none
    int32_t remote_cum_lost
    uint32_t remote_jitter
    int64_t rtt_us
    # prompt
    int16_t* play_buf
    int64_t play_len
    int64_t play_pos
    int32_t play_id
    # PCM taps (recorder, mixes)
    Recording* rec
    int32_t fifo_head
    int32_t fifo_count
    int32_t fifo_primed
    int16_t fifo[1600]
    int16_t cur[160]

ctypedef struct EngineState:
    int32_t epfd
    int32_t cmd_fd           # eventfd: control side -> engine
    int32_t evt_fd           # eventfd: engine -> asyncio (loop.add_reader)
    int stop
    int32_t tid
    int running
    pthread_t thread
    int32_t max_legs
    Leg** legs
    int32_t* dense
    int32_t ndense
    int32_t max_recs
    Recording** recs
    # command queue (brief mutex, never held while waiting on the other thread)
    pthread_mutex_t cmd_lock
    Cmd* cmds
    int32_t cmd_head
    int32_t cmd_count
    # event queue
    pthread_mutex_t evt_lock
    Event* evts
    int32_t evt_head
    int32_t evt_count
    int32_t evt_lost
    int32_t evt_signal
    int32_t tick_users
    int32_t nrecs
    uint64_t evt_lost_total
    # batch buffers
    uint8_t* rx_buf
    mmsghdr rx_msgs[64]
    iovec rx_iov[64]
    sockaddr_storage rx_addr[64]
    mmsghdr tx_msgs[64]
    iovec tx_iov[64]
    uint8_t tx_buf[1500]
    epoll_event ep_events[256]
    # clock
    int64_t next_tick_ns
    uint64_t tick_no
    int64_t next_house_ns
    int32_t house_pos        # rotating cursor of the housekeeping passes
    uint64_t loops
    int64_t tick_max_ns      # longest tick seen, start to end (diagnostics)
    int32_t tick_active      # a tick is in progress (see tick_step)
    int32_t tick_phase
    int32_t tick_pos
    int64_t tick_now         # when the tick in progress started
    int64_t coalesce_ns      # after a wake-up that moved packets, let more queue this long
    int64_t rec_delay        # recordings' reorder/lateness window (samples)
    int16_t dec_ulaw[256]
    int16_t dec_alaw[256]
