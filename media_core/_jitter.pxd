# Adaptive jitter buffer with G.711 Appendix I style packet-loss concealment.
# The per-packet path (jb_put / jb_get) needs no GIL, so the media engine may drive a buffer
# from its own thread through these declarations.

from libc.stdint cimport int16_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    JB_CODEC_L16 = 0           # RFC 3551 L16: big-endian 16-bit samples
    JB_CODEC_PCMU = 1
    JB_CODEC_PCMA = 2

# jb_put results
cdef enum:
    JB_ACCEPTED = 0
    JB_DUPLICATE = 1
    JB_LATE = 2                # its playout slot has already gone by
    JB_OVERFLOW = 3            # beyond the buffer's bound (packets / ms)
    JB_INVALID = 4             # payload is not a whole number of frames (1..6)
    JB_RESYNC = 5              # the stream jumped; the buffer restarted on this packet

# jb_get frame kinds
cdef enum:
    JB_NORMAL = 0
    JB_CONCEALED = 1
    JB_SILENCE = 2

cdef enum:
    JB_HIST = 390              # G.711 App. I history: 48.75 ms at 8 kHz (3 x 120 + 30)
    JB_PITCH_MIN = 40          # 200 Hz
    JB_PITCH_MAX = 120         # 66.7 Hz
    JB_BUCKETS = 10            # jitter peak window: JB_BUCKETS x bucket_len
    JB_MIN_BUCKETS = 8         # transit minimum window
    JB_MAX_FRAME = 480         # samples per frame at most (60 ms at 8 kHz)
    JB_MAX_FRAMES_PER_PACKET = 6

ctypedef struct jb_stats_t:
    uint64_t received          # frames accepted (a packet may carry several)
    uint64_t duplicates
    uint64_t late
    uint64_t overflow
    uint64_t invalid
    uint64_t resyncs
    uint64_t normal            # frames played from packets
    uint64_t missing           # frames due with no packet at playout time
    uint64_t concealed         # frames synthesised by PLC (losses and stretches)
    uint64_t silence           # frames of silence (before start, after the PLC fade)
    uint64_t stretched         # frames inserted to grow the delay
    uint64_t dropped           # frames skipped to shrink the delay
    double buffer_time_sum     # sum over normal frames of (play time - arrival time), s

ctypedef struct jb_t:
    int codec
    int clock_rate
    int frame_samples
    int frame_bytes
    int nslots                 # ring size, a power of two
    int max_packets
    double max_delay           # bound on buffered audio, s
    double floor, cap, start   # target delay bounds, s
    double margin              # added to the jitter peak, s
    double bucket_len          # s
    # ring of frames keyed by extended timestamp
    int64_t* slot_ts           # -1 = empty
    double* slot_arrival
    uint8_t* slot_payload
    int count
    # timeline
    int started                # a first packet arrived
    int playing                # playout has begun
    int64_t play_ts            # extended timestamp of the next frame to play
    double start_at            # when playout begins
    double first_arrival
    int overflow_run
    # delay estimation
    double dmin_val[8]
    int64_t dmin_idx[8]
    double peak_val[10]
    int64_t peak_idx[10]
    double target
    double d_min
    double last_delay          # P - d_min at the last get, s
    int since_adjust           # frames since the last drop/stretch
    int over_count             # consecutive frames played above the target band
    double peak                # largest jitter in the window, s
    # concealment
    int16_t hist[390]
    int hist_fill              # valid samples at the end of hist
    int16_t phist[390]         # history frozen at the start of a loss
    int pitch
    int lost_samples           # samples synthesised in the current loss (0 = not concealing)
    int16_t xfade[480]         # what to fade out of at the next real frame
    int xfade_len
    int16_t pcm[480]           # scratch
    jb_stats_t stats

cdef int jb_init(jb_t* jb, int codec, int clock_rate, int frame_samples, int max_packets,
                 double max_delay, double start, double floor, double cap,
                 double margin) noexcept nogil
cdef void jb_free(jb_t* jb) noexcept nogil
cdef int jb_put(jb_t* jb, uint32_t ts, const uint8_t* payload, Py_ssize_t n,
                double now) noexcept nogil
# Fills pcm[frame_samples] (and payload[frame_bytes] for G.711: the packet's own bytes when
# untouched, else re-encoded) and returns JB_NORMAL / JB_CONCEALED / JB_SILENCE.
cdef int jb_get(jb_t* jb, double now, int16_t* pcm, uint8_t* payload) noexcept nogil
