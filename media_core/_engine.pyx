# cython: language_level=3
"""The media engine core: one native thread that owns every RTP/RTCP socket and moves packets
without the GIL (epoll + recvmmsg/sendmmsg), plus the control-side API that queues commands to
it and drains its events. The asyncio façade is media_core.engine.MediaEngine."""

from collections import deque

from libc.errno cimport EADDRINUSE, EAGAIN, errno
from libc.stdint cimport (
    INT64_MAX,
    int16_t,
    int32_t,
    int64_t,
    uint8_t,
    uint16_t,
    uint32_t,
    uint64_t,
)
from libc.stdio cimport FILE, SEEK_SET, _IOFBF, fclose, fflush, fopen, fseek, fwrite, setvbuf
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.unistd cimport close, read, write

from media_core._dtmf cimport dtmf_feed, dtmf_init
from media_core._g711 cimport (
    alaw_dec_buf,
    alaw_enc_buf,
    alaw_to_ulaw_buf,
    ulaw_dec_buf,
    ulaw_enc_buf,
    ulaw_to_alaw_buf,
)
from media_core._mixer cimport mix_accumulate, mix_clear, mix_saturate
from media_core._rtp cimport (
    rtcp_report_block_t,
    rtcp_rtt,
    rtcp_write_rr,
    rtcp_write_sr,
    rtp_header_t,
    rtp_is_rtcp,
    rtp_parse_header,
    rtp_stats_init,
    rtp_stats_lost,
    rtp_stats_report,
    rtp_stats_sr_received,
    rtp_stats_update,
    rtp_write_marker,
    rtp_write_payload_type,
    rtp_write_header,
    rtp_write_seq,
    rtp_write_ssrc,
    rtp_write_timestamp,
    te_digit_t,
    te_receiver_feed,
    te_receiver_init,
    te_receiver_poll,
)
from media_core.cengine cimport *


cdef int64_t TICK_NS = 20_000_000          # 20 ms packetization (RFC 3551 §4.5.14 default)
cdef int64_t HOUSE_NS = 50_000_000         # timeouts, RTCP, RFC 4733 end detection
cdef int64_t RTCP_NS = 5_000_000_000       # RFC 3550 §6.2 minimum interval
cdef int RTCP_PER_PASS = 16                # x 5 passes per 50 ms: 1,600 reports/s at most
cdef int HOUSE_PASSES = 5
cdef int64_t TICK_SLICE_NS = 100_000       # longest run of tick work between socket reads
cdef uint64_t KEY_PLAY = 1ULL << 62
cdef uint64_t KEY_MIX = 1ULL << 61
cdef int TOS_EF = 0xb8                     # DSCP EF (46) << 2, RFC 3246 / RFC 4594
cdef int SOCKBUF = 1 << 20
cdef int REC_FLUSH_TICKS = 50                # one write(2) per recording per second
cdef int REC_BUF = 40960                     # > 50 ticks x 640 bytes
# Recording timeline (each side placed by RTP timestamp, RFC 3550 §5.1), in 8 kHz samples
cdef int64_t REC_EARLY = 1600                # 200 ms ahead of its arrival: the side is realigned
cdef int64_t REC_JUMP = 1600                 # 200 ms behind: held until the jump is confirmed
cdef int64_t REC_CONFIRM_NS = 40_000_000     # a jump must last this long to be followed
cdef int64_t REC_DRIFT_NS = 2_000_000_000    # drift period: its least lateness is checked
cdef int REC_MAX_DROPOUT = 3000              # RFC 3550 A.1: larger sequence jumps restart
cdef int REC_MAX_MISORDER = 100
cdef int REC_CATCHUP = 8                     # frames one recording writes per tick at most
REC_DELAY_MIN_MS = 60                        # recording window bounds (Engine recording_delay_ms)
REC_DELAY_MAX_MS = 500

# ---------------------------------------------------------------------------------------------
# small helpers (engine thread)


cdef inline uint32_t ntp_middle(uint64_t ntp) noexcept nogil:
    return <uint32_t>((ntp >> 16) & 0xFFFFFFFFULL)


cdef inline uint64_t ntp_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    # RFC 3550 §4: seconds since 1900 in the high word, fraction in the low word
    return ((<uint64_t>ts.tv_sec + 2208988800ULL) << 32) | \
        ((<uint64_t>ts.tv_nsec << 32) // 1000000000ULL)


cdef inline bint same_addr(sockaddr_storage* a, sockaddr_storage* b) noexcept nogil:
    cdef sockaddr_in* a4
    cdef sockaddr_in* b4
    cdef sockaddr_in6* a6
    cdef sockaddr_in6* b6
    if a.ss_family != b.ss_family:
        return False
    if a.ss_family == AF_INET:
        a4 = <sockaddr_in*>a
        b4 = <sockaddr_in*>b
        return a4.sin_port == b4.sin_port and a4.sin_addr.s_addr == b4.sin_addr.s_addr
    a6 = <sockaddr_in6*>a
    b6 = <sockaddr_in6*>b
    return a6.sin6_port == b6.sin6_port and \
        memcmp(a6.sin6_addr.s6_addr, b6.sin6_addr.s6_addr, 16) == 0


cdef inline void addr_with_port(sockaddr_storage* dst, sockaddr_storage* src, int port) noexcept nogil:
    memcpy(dst, src, sizeof(sockaddr_storage))
    if src.ss_family == AF_INET:
        (<sockaddr_in*>dst).sin_port = htons(<uint16_t>port)
    else:
        (<sockaddr_in6*>dst).sin6_port = htons(<uint16_t>port)


cdef inline void set_port(sockaddr_storage* a, int port) noexcept nogil:
    if a.ss_family == AF_INET:
        (<sockaddr_in*>a).sin_port = htons(<uint16_t>port)
    else:
        (<sockaddr_in6*>a).sin6_port = htons(<uint16_t>port)


cdef inline int addr_port(sockaddr_storage* a) noexcept nogil:
    if a.ss_family == AF_INET:
        return ntohs((<sockaddr_in*>a).sin_port)
    return ntohs((<sockaddr_in6*>a).sin6_port)


cdef inline socklen_t addr_len(sockaddr_storage* a) noexcept nogil:
    return sizeof(sockaddr_in) if a.ss_family == AF_INET else sizeof(sockaddr_in6)


cdef void push_event(EngineState* e, int kind, int leg, int a, int b, int64_t x) noexcept nogil:
    cdef Event* ev
    pthread_mutex_lock(&e.evt_lock)
    if e.evt_count >= EVT_CAP:
        e.evt_lost += 1
        e.evt_lost_total += 1
    else:
        if e.evt_lost and e.evt_count < EVT_CAP - 1:
            ev = &e.evts[(e.evt_head + e.evt_count) % EVT_CAP]
            ev.kind = EV_LOST
            ev.leg = -1
            ev.a = e.evt_lost
            ev.b = 0
            ev.x = 0
            ev.t_ns = engine_now_ns()
            e.evt_count += 1
            e.evt_lost = 0
        ev = &e.evts[(e.evt_head + e.evt_count) % EVT_CAP]
        ev.kind = kind
        ev.leg = leg
        ev.a = a
        ev.b = b
        ev.x = x
        ev.t_ns = engine_now_ns()
        e.evt_count += 1
    pthread_mutex_unlock(&e.evt_lock)
    e.evt_signal = 1


cdef inline void signal_fd(int fd) noexcept nogil:
    cdef uint64_t one = 1
    write(fd, &one, 8)


cdef inline void drain_fd(int fd) noexcept nogil:
    cdef uint64_t v
    read(fd, &v, 8)


# ---------------------------------------------------------------------------------------------
# outgoing stream: one SSRC and continuous seq/ts whatever feeds it (RFC 3550 §5.1, §8.2)


cdef inline void out_header(Leg* o, uint8_t* pkt, uint64_t key, uint16_t in_seq, uint32_t in_ts,
                            int64_t now) noexcept nogil:
    cdef uint16_t seq
    cdef uint32_t ts
    cdef int64_t adv
    if o.out_key != key:
        # a new source feeds this leg: continue where the previous one left off, advancing
        # the timestamp by the wall time elapsed so the receiver's playout stays right
        if o.out_started:
            adv = ((now - o.out_last_ns) * 8) // 1000000
            if adv < FRAME:
                adv = FRAME
            o.seq_off = <uint16_t>(<uint16_t>(o.out_seq + 1) - in_seq)
            o.ts_off = <uint32_t>(o.out_ts + <uint32_t>adv - in_ts)
        else:
            o.seq_off = <uint16_t>(engine_random32() - in_seq)
            o.ts_off = <uint32_t>(engine_random32() - in_ts)
        o.out_key = key
        o.out_marker = 1
    seq = <uint16_t>(in_seq + o.seq_off)
    ts = <uint32_t>(in_ts + o.ts_off)
    if not o.out_started or <int16_t>(seq - o.out_seq) > 0:
        o.out_seq = seq
        o.out_ts = ts
        o.out_last_ns = now
        o.out_started = 1
    rtp_write_seq(pkt, seq)
    rtp_write_timestamp(pkt, ts)
    rtp_write_ssrc(pkt, o.out_ssrc)
    if o.out_marker:
        rtp_write_marker(pkt, 1)
        o.out_marker = 0


cdef inline void send_one(Leg* o, uint8_t* pkt, Py_ssize_t n) noexcept nogil:
    if o.latch == LATCH_NONE:
        return
    if sendto(o.rtp_fd, pkt, n, 0, NULL if o.connected else <sockaddr*>&o.remote,
              0 if o.connected else o.remote_len) == n:
        o.tx_packets += 1
        o.tx_bytes += n
    else:
        o.tx_errors += 1


cdef inline void encode(int pt, const int16_t* pcm, uint8_t* out, Py_ssize_t n) noexcept nogil:
    if pt == 8:
        alaw_enc_buf(pcm, out, n)
    else:
        ulaw_enc_buf(pcm, out, n)


# ---------------------------------------------------------------------------------------------
# PCM taps for mixes: each leg that feeds a mix queues its decoded input; the tick takes a frame


cdef inline void fifo_push(Leg* g, const int16_t* pcm, int n) noexcept nogil:
    cdef int i, pos
    if n > FIFO_CAP:
        pcm += n - FIFO_CAP
        n = FIFO_CAP
    if g.fifo_count + n > FIFO_CAP:
        # the sender runs ahead of our clock: drop the oldest samples (bounded buffer)
        i = g.fifo_count + n - FIFO_CAP
        g.fifo_head = (g.fifo_head + i) % FIFO_CAP
        g.fifo_count -= i
    pos = (g.fifo_head + g.fifo_count) % FIFO_CAP
    i = FIFO_CAP - pos if FIFO_CAP - pos < n else n
    memcpy(&g.fifo[pos], pcm, i * 2)
    if i < n:
        memcpy(g.fifo, pcm + i, (n - i) * 2)
    g.fifo_count += n


cdef inline void fifo_pop(Leg* g) noexcept nogil:
    cdef int i, take
    if not g.fifo_primed:
        # one frame of slack absorbs arrival jitter against the engine's clock
        if g.fifo_count >= 2 * FRAME:
            g.fifo_primed = 1
        else:
            memset(g.cur, 0, FRAME * 2)
            return
    take = FRAME if g.fifo_count >= FRAME else g.fifo_count
    i = FIFO_CAP - g.fifo_head if FIFO_CAP - g.fifo_head < take else take
    memcpy(g.cur, &g.fifo[g.fifo_head], i * 2)
    if i < take:
        memcpy(&g.cur[i], g.fifo, (take - i) * 2)
    g.fifo_head = (g.fifo_head + take) % FIFO_CAP
    g.fifo_count -= take
    if take < FRAME:
        memset(&g.cur[take], 0, (FRAME - take) * 2)
        g.fifo_primed = 0


# ---------------------------------------------------------------------------------------------
# recordings: each side's audio goes to the place its RTP timestamp gives it (RFC 3550 §5.1),
# on a timeline that keeps wall time; a position is written once it is r.delay old, so late
# and reordered packets still land where they belong


cdef inline int64_t rec_position(Recording* r, int64_t now) noexcept nogil:
    """Position of the clock time now on the recording's timeline (8 kHz samples)."""
    return ((now - r.start_ns) * 8) // 1000000


cdef int rec_ring_size(int64_t delay) noexcept nogil:
    """Ring samples per side: the window, how far ahead a side may run, and a few frames."""
    cdef int size = 1024
    while size < delay + REC_EARLY + 6 * FRAME:
        size *= 2
    return size


cdef void rec_init(Recording* r, int64_t start_ns, int64_t delay, int16_t* ring,
                   int ring_size) noexcept nogil:
    """Timeline at position 0 at start_ns; ring holds 2 x ring_size zeroed samples."""
    cdef int c
    r.start_ns = start_ns
    r.delay = delay
    r.pos = 0
    r.max_end = 0
    r.mute_from = 0
    r.mute_to = 0
    r.ring_size = ring_size
    r.ring = ring
    for c in range(2):
        r.ch[c].anchored = 0
        rec_drop_held(&r.ch[c])


cdef int rec_store(Recording* r, int c, int64_t at, const int16_t* pcm, int n) noexcept nogil:
    """Copies n samples to positions [at, at + n) of the side; returns how many did not fit
    (already written, or beyond the ring)."""
    cdef int64_t lo = at, hi = at + n, limit = r.pos + r.ring_size
    cdef int idx, first, count
    cdef int16_t* ring = r.ring + c * r.ring_size
    if lo < r.pos:
        lo = r.pos
    if hi > limit:
        hi = limit
    if lo >= hi:
        return n
    count = <int>(hi - lo)
    idx = <int>(lo & (r.ring_size - 1))
    first = r.ring_size - idx if r.ring_size - idx < count else count
    memcpy(&ring[idx], pcm + (lo - at), first * 2)
    if first < count:
        memcpy(ring, pcm + (lo - at) + first, (count - first) * 2)
    if hi > r.max_end:
        r.max_end = hi
    return n - count


cdef inline void rec_drop_held(RecChannel* ch) noexcept nogil:
    ch.nheld = 0
    ch.held_fill = 0
    ch.jumping = 0


cdef inline void rec_new_period(RecChannel* ch, int64_t now) noexcept nogil:
    ch.floor = INT64_MAX
    ch.floor_end_ns = now + REC_DRIFT_NS


cdef void rec_anchor(RecChannel* ch, uint16_t seq, uint32_t ts, uint32_t ssrc, int64_t pos_now,
                     int64_t now, uint64_t* late) noexcept nogil:
    """The stream's first packet (or a new stream's) goes where it arrived."""
    if ch.nheld:
        late[0] += ch.nheld
    ch.anchored = 1
    ch.ssrc = ssrc
    ch.last_seq = seq
    ch.last_ts = ts
    ch.last_rel = 0
    ch.offset = pos_now
    rec_drop_held(ch)
    rec_new_period(ch, now)


cdef void rec_hold(Recording* r, int c, uint32_t ts, int64_t rel, int64_t pos_now,
                   const int16_t* pcm, int n, bint muted, int64_t now, uint64_t* resyncs,
                   uint64_t* late) noexcept nogil:
    """A packet far later than its place: hold it. Packets that stay that late for
    REC_CONFIRM_NS are a jump (the sender's timestamps went back, or it stopped without
    advancing its clock, against RFC 3550 §5.1): the side is realigned on the least late of
    them and they are all placed. A run that ends sooner was only late packets (a stall, whose
    burst may also overflow the hold: those are late too)."""
    cdef RecChannel* ch = &r.ch[c]
    cdef int i, off = 0
    cdef int64_t best = pos_now - rel
    cdef bint fits = ch.nheld < REC_HOLD_PKTS and n <= REC_HOLD - ch.held_fill
    if not ch.jumping:
        ch.jumping = 1
        ch.jump_since_ns = now
    if fits:
        i = ch.nheld
        ch.held_rel[i] = rel
        ch.held_pos[i] = pos_now
        ch.held_len[i] = n
        ch.held_muted[i] = muted
        memcpy(&ch.held_pcm[ch.held_fill], pcm, n * 2)
        ch.held_fill += n
        ch.nheld += 1
    if now - ch.jump_since_ns < REC_CONFIRM_NS:
        if not fits:
            late[0] += 1
        return
    # confirmed: follow the jump
    for i in range(ch.nheld):
        if ch.held_pos[i] - ch.held_rel[i] < best:
            best = ch.held_pos[i] - ch.held_rel[i]
    ch.offset = best
    resyncs[0] += 1
    for i in range(ch.nheld):
        if not ch.held_muted[i] and rec_store(r, c, ch.held_rel[i] + best, &ch.held_pcm[off],
                                              ch.held_len[i]) > 0:
            late[0] += 1
        off += ch.held_len[i]
    rec_drop_held(ch)
    ch.last_ts = ts
    ch.last_rel = rel
    rec_new_period(ch, now)
    if not fits and not muted and rec_store(r, c, rel + best, pcm, n) > 0:
        late[0] += 1


cdef void rec_place(Recording* r, int c, uint16_t seq, uint32_t ts, uint32_t ssrc,
                    const int16_t* pcm, int n, int64_t now, uint64_t* resyncs,
                    uint64_t* late) noexcept nogil:
    """Places one packet's PCM (arrived at now) on side c of the recording. resyncs and late
    count realignments and packets (partly) too late for their place."""
    cdef RecChannel* ch = &r.ch[c]
    cdef int64_t pos_now = rec_position(r, now)
    cdef int64_t rel, lateness
    cdef int32_t dts
    cdef int dseq
    cdef bint muted = r.paused
    if n <= 0:
        return
    if ch.anchored and ch.ssrc == ssrc:
        dseq = <int16_t>(seq - ch.last_seq)
        if dseq > REC_MAX_DROPOUT or dseq < -REC_MAX_MISORDER:
            # RFC 3550 A.1: a large jump in sequence numbers is a restarted source
            rec_anchor(ch, seq, ts, ssrc, pos_now, now, late)
            resyncs[0] += 1
            rel = 0
        else:
            if dseq > 0:
                ch.last_seq = seq
            # 32-bit timestamps wrap: the signed distance to the highest one seen says where
            dts = <int32_t>(ts - ch.last_ts)
            rel = ch.last_rel + dts
            if dts > 0:
                ch.last_ts = ts
                ch.last_rel = rel
    else:
        if ch.anchored:
            resyncs[0] += 1          # a new SSRC is a new stream (re-INVITE, transfer)
        rec_anchor(ch, seq, ts, ssrc, pos_now, now, late)
        rel = 0
    lateness = pos_now - (rel + ch.offset)
    if lateness > REC_JUMP:
        rec_hold(r, c, ts, rel, pos_now, pcm, n, muted, now, resyncs, late)
        return
    if ch.jumping:
        # the run of very late packets ended: they were late (a stall), not a jump
        late[0] += ch.nheld
        rec_drop_held(ch)
    if lateness < -REC_EARLY:
        # far ahead of its arrival: the sender's clock jumped or runs fast; follow it (the
        # audio already placed ahead is overwritten: that much is dropped)
        ch.offset = pos_now - rel
        resyncs[0] += 1
        rec_new_period(ch, now)
    elif lateness < ch.floor:
        ch.floor = lateness
    if not muted and rec_store(r, c, rel + ch.offset, pcm, n) > 0:
        late[0] += 1
    if now >= ch.floor_end_ns:
        if ch.floor != INT64_MAX and ch.floor > r.delay // 2:
            # every packet of the period came late: the sender's clock runs slow against ours.
            # Realign before the lateness reaches the window (inserts that much silence).
            ch.offset += ch.floor
            resyncs[0] += 1
        rec_new_period(ch, now)


cdef void rec_pause(Recording* r, int64_t now) noexcept nogil:
    """From now on, silence. A pause whose predecessor is not yet written out extends it
    (more is masked, never less)."""
    if r.paused:
        return
    if r.mute_to <= r.pos:
        r.mute_from = rec_position(r, now)
    r.mute_to = INT64_MAX
    r.paused = 1


cdef void rec_resume(Recording* r, int64_t now) noexcept nogil:
    if not r.paused:
        return
    r.mute_to = rec_position(r, now)
    r.paused = 0


cdef inline int64_t rec_due(Recording* r, int64_t now) noexcept nogil:
    """Frames whose positions are at least r.delay old at now."""
    cdef int64_t n = (rec_position(r, now) - r.delay - r.pos) // FRAME
    return n if n > 0 else 0


cdef void rec_take_frame(Recording* r, int16_t* out) noexcept nogil:
    """The stereo frame at r.pos (caller left, agent right); its ring places become silence
    for the next time round. Muted (paused) positions are written as silence."""
    cdef int c, j, idx, first
    cdef int16_t side[2][FRAME]
    cdef int16_t* ring
    cdef int64_t lo, hi
    idx = <int>(r.pos & (r.ring_size - 1))
    first = r.ring_size - idx if r.ring_size - idx < FRAME else FRAME
    for c in range(2):
        # block copies: the ring was written a window ago and is no longer in cache
        ring = r.ring + c * r.ring_size
        memcpy(side[c], &ring[idx], first * 2)
        memset(&ring[idx], 0, first * 2)
        if first < FRAME:
            memcpy(&side[c][first], ring, (FRAME - first) * 2)
            memset(ring, 0, (FRAME - first) * 2)
    for j in range(FRAME):
        out[2 * j] = side[0][j]
        out[2 * j + 1] = side[1][j]
    lo = r.mute_from if r.mute_from > r.pos else r.pos
    hi = r.mute_to if r.mute_to < r.pos + FRAME else r.pos + FRAME
    if lo < hi:
        memset(&out[2 * (lo - r.pos)], 0, (hi - lo) * 4)
    r.pos += FRAME


cdef inline void rec_prefetch(Recording* r) noexcept nogil:
    """Asks for the ring lines the next rec_take_frame reads (written a window ago, so out
    of cache by now), so that the tick does not wait for each of them in turn."""
    cdef int idx = <int>(r.pos & (r.ring_size - 1))
    cdef int k
    for k in range(0, FRAME + 32, 32):
        engine_prefetch(r.ring + idx + k)
        engine_prefetch(r.ring + r.ring_size + idx + k)


cdef inline int64_t rec_end(Recording* r, int64_t now) noexcept nogil:
    """Where the recording ends if it stops at now: its wall time, or the last audio placed
    if that is later; never beyond the ring."""
    cdef int64_t end = rec_position(r, now)
    if r.max_end > end:
        end = r.max_end
    if end > r.pos + r.ring_size:
        end = r.pos + r.ring_size
    return end


# ---------------------------------------------------------------------------------------------
# receive paths


cdef void handle_rtcp(EngineState* e, Leg* g, uint8_t* p, Py_ssize_t n, sockaddr_storage* src,
                      int64_t now) noexcept nogil:
    """Reads SR/RR (RFC 3550 §6.4): the far end's LSR and its view of our stream."""
    cdef Py_ssize_t off = 0, plen
    cdef int pt, rc, i
    cdef uint8_t* b
    cdef uint32_t ntp_mid, lsr, dlsr
    cdef int64_t rtt
    g.rtcp_rx += 1
    if g.rtcp_latch != LATCH_LOCKED:
        memcpy(&g.rtcp_remote, src, sizeof(sockaddr_storage))
        g.rtcp_remote_len = addr_len(src)
        g.rtcp_latch = LATCH_LOCKED
    while off + 4 <= n:
        b = p + off
        if (b[0] >> 6) != 2:
            return
        rc = b[0] & 0x1f
        pt = b[1]
        plen = ((<Py_ssize_t>b[2] << 8) | b[3]) * 4 + 4
        if off + plen > n:
            return
        i = 8
        if pt == 200 and plen >= 28:
            ntp_mid = (<uint32_t>b[10] << 24) | (<uint32_t>b[11] << 16) | \
                (<uint32_t>b[12] << 8) | b[13]
            rtp_stats_sr_received(&g.stats, ntp_mid, ntp_middle(ntp_now()))
            i = 28
        if (pt == 200 or pt == 201) and rc > 0 and i + 24 <= plen:
            # the first report block is the far end's view of what we send
            g.remote_fraction_lost = b[i + 4]
            g.remote_cum_lost = ((<int32_t>b[i + 5] << 16) | (b[i + 6] << 8) | b[i + 7])
            g.remote_jitter = (<uint32_t>b[i + 12] << 24) | (<uint32_t>b[i + 13] << 16) | \
                (<uint32_t>b[i + 14] << 8) | b[i + 15]
            lsr = (<uint32_t>b[i + 16] << 24) | (<uint32_t>b[i + 17] << 16) | \
                (<uint32_t>b[i + 18] << 8) | b[i + 19]
            dlsr = (<uint32_t>b[i + 20] << 24) | (<uint32_t>b[i + 21] << 16) | \
                (<uint32_t>b[i + 22] << 8) | b[i + 23]
            rtt = rtcp_rtt(ntp_middle(ntp_now()), lsr, dlsr)
            if rtt >= 0:
                g.rtt_us = (rtt * 1000000) >> 16
        off += plen


cdef void send_rtcp(EngineState* e, Leg* g, int64_t now, bint bye=False) noexcept nogil:
    cdef rtcp_report_block_t blk
    cdef int nblk = 0
    cdef Py_ssize_t n
    cdef uint64_t ntp
    cdef uint8_t buf[128]
    if g.latch == LATCH_NONE:
        return
    if g.rtcp_latch == LATCH_NONE:
        addr_with_port(&g.rtcp_remote, &g.remote, addr_port(&g.remote) + 1)
        g.rtcp_remote_len = g.remote_len
        g.rtcp_latch = LATCH_EXPECTED
    ntp = ntp_now()
    if g.in_have_ssrc and g.stats.received > 0:
        rtp_stats_report(&g.stats, g.in_ssrc, ntp_middle(ntp), &blk)
        nblk = 1
    if g.tx_packets > 0:
        n = rtcp_write_sr(buf, sizeof(buf), g.out_ssrc, ntp,
                          <uint32_t>(g.out_ts + ((now - g.out_last_ns) * 8) // 1000000),
                          <uint32_t>g.tx_packets, <uint32_t>(g.tx_bytes - 12 * g.tx_packets),
                          &blk, nblk)
    else:
        n = rtcp_write_rr(buf, sizeof(buf), g.out_ssrc, &blk, nblk)
    if bye and 0 < n <= <Py_ssize_t>sizeof(buf) - 8:
        # RFC 3550 §6.6: the leg is leaving; BYE closes the compound packet
        buf[n] = 0x81
        buf[n + 1] = 203
        buf[n + 2] = 0
        buf[n + 3] = 1
        buf[n + 4] = (g.out_ssrc >> 24) & 0xFF
        buf[n + 5] = (g.out_ssrc >> 16) & 0xFF
        buf[n + 6] = (g.out_ssrc >> 8) & 0xFF
        buf[n + 7] = g.out_ssrc & 0xFF
        n += 8
    if n > 0 and sendto(g.rtcp_fd, buf, n, 0, <sockaddr*>&g.rtcp_remote,
                        g.rtcp_remote_len) == n:
        g.rtcp_tx += 1


cdef inline void report_digit(EngineState* e, Leg* g, te_digit_t* d) noexcept nogil:
    # RFC 4733 §3.2 event codes 0-15 are the DTMF digits
    cdef const char* names = b"0123456789*#ABCD"
    if d.event < 16:
        push_event(e, EV_DIGIT, g.slot, names[d.event], 0, d.duration)


cdef void handle_rtp_batch(EngineState* e, Leg* g, int count, int64_t now) noexcept nogil:
    cdef int k, nd, i, ntx = 0, code
    cdef uint8_t* p
    cdef Py_ssize_t n, plen
    cdef rtp_header_t h
    cdef Leg* t = NULL
    cdef te_digit_t digits[2]
    cdef int16_t pcm[PKT_MAX]
    cdef bint have_pcm
    cdef uint32_t arrival = <uint32_t>((now * 8) // 1000000)
    if g.peer >= 0:
        t = e.legs[g.peer]
        if t != NULL and (not t.active or t.nsrc >= 2 or t.play_buf != NULL
                          or t.latch == LATCH_NONE):
            t = NULL
    for k in range(count):
        p = e.rx_buf + k * PKT_MAX
        n = e.rx_msgs[k].msg_len
        if n > PKT_MAX or (e.rx_msgs[k].msg_hdr.msg_flags & MSG_TRUNC):
            g.rx_invalid += 1
            continue
        if rtp_is_rtcp(p, n):
            # RTP/RTCP multiplexed on one port (RFC 5761)
            handle_rtcp(e, g, p, n, &e.rx_addr[k], now)
            continue
        if rtp_parse_header(p, n, &h) != 0:
            g.rx_invalid += 1
            continue
        # symmetric RTP (RFC 4961): the far end is where its packets come from
        if g.latch != LATCH_LOCKED:
            memcpy(&g.remote, &e.rx_addr[k], sizeof(sockaddr_storage))
            g.remote_len = e.rx_msgs[k].msg_hdr.msg_namelen
            g.latch = LATCH_LOCKED
            # A connected socket skips the route lookup on send and gets the kernel's early
            # demux on receive; it also drops other sources in the kernel (they are not
            # counted in rx_foreign then).
            if connect(g.rtp_fd, <sockaddr*>&g.remote, g.remote_len) == 0:
                g.connected = 1
        elif not same_addr(&g.remote, &e.rx_addr[k]):
            g.rx_foreign += 1
            continue
        if not g.in_have_ssrc or h.ssrc != g.in_ssrc:
            g.in_ssrc = h.ssrc
            g.in_have_ssrc = 1
            rtp_stats_init(&g.stats)
        g.rx_packets += 1
        g.rx_bytes += n
        g.last_rx_ns = now
        g.timed_out = 0
        rtp_stats_update(&g.stats, h.seq, h.timestamp, arrival)
        plen = h.payload_length
        if h.payload_type == g.te_pt and g.te_pt >= 0:
            nd = te_receiver_feed(&g.te, h.timestamp, h.marker, p + h.payload_offset, plen,
                                  now * 1e-9, digits)
            for i in range(nd):
                report_digit(e, g, &digits[i])
            if t == NULL or t.te_pt < 0:
                continue
            rtp_write_payload_type(p, <uint8_t>t.te_pt)
        elif h.payload_type == 0 or h.payload_type == 8:
            have_pcm = False
            if g.inband or g.rec != NULL or g.listeners > 0:
                if h.payload_type == 8:
                    alaw_dec_buf(p + h.payload_offset, pcm, plen)
                else:
                    ulaw_dec_buf(p + h.payload_offset, pcm, plen)
                have_pcm = True
            if have_pcm and g.inband:
                code = dtmf_feed(&g.dtmf, pcm, plen)
                while code != 0:
                    push_event(e, EV_DIGIT, g.slot, code, 1, 0)
                    code = dtmf_feed(&g.dtmf, pcm, 0)
            if have_pcm and g.listeners > 0:
                fifo_push(g, pcm, <int>plen)
            if have_pcm and g.rec != NULL:
                for i in range(2):
                    if g.rec.legs[i] == g.slot:
                        rec_place(g.rec, i, h.seq, h.timestamp, h.ssrc, pcm, <int>plen, now,
                                  &g.rec_resyncs, &g.rec_late)
            if t == NULL:
                continue
            if t.pt != h.payload_type:
                # the two legs negotiated different laws: transcode in place (G.711 A <-> u)
                if h.payload_type == 0:
                    ulaw_to_alaw_buf(p + h.payload_offset, p + h.payload_offset, plen)
                else:
                    alaw_to_ulaw_buf(p + h.payload_offset, p + h.payload_offset, plen)
                rtp_write_payload_type(p, <uint8_t>t.pt)
        else:
            # comfort noise and other payloads pass through unchanged when relaying
            if t == NULL:
                continue
        out_header(t, p, (<uint64_t>g.slot << 32) | h.ssrc, h.seq, h.timestamp, now)
        e.tx_iov[ntx].iov_base = p
        e.tx_iov[ntx].iov_len = n
        if t.connected:
            e.tx_msgs[ntx].msg_hdr.msg_name = NULL
            e.tx_msgs[ntx].msg_hdr.msg_namelen = 0
        else:
            e.tx_msgs[ntx].msg_hdr.msg_name = &t.remote
            e.tx_msgs[ntx].msg_hdr.msg_namelen = t.remote_len
        e.tx_msgs[ntx].msg_hdr.msg_iov = &e.tx_iov[ntx]
        e.tx_msgs[ntx].msg_hdr.msg_iovlen = 1
        e.tx_msgs[ntx].msg_hdr.msg_control = NULL
        e.tx_msgs[ntx].msg_hdr.msg_controllen = 0
        e.tx_msgs[ntx].msg_hdr.msg_flags = 0
        ntx += 1
        t.tx_bytes += n
    if ntx:
        k = sendmmsg(t.rtp_fd, e.tx_msgs, ntx, MSG_DONTWAIT)
        if k < 0:
            k = 0
        t.tx_packets += k
        if k < ntx:
            t.tx_errors += ntx - k


cdef int receive(EngineState* e, int fd) noexcept nogil:
    cdef int i, n
    for i in range(BATCH):
        e.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
        e.rx_msgs[i].msg_hdr.msg_flags = 0
    n = recvmmsg(fd, e.rx_msgs, BATCH, MSG_DONTWAIT, NULL)
    return n


# ---------------------------------------------------------------------------------------------
# the 20 ms tick: prompts, mixes (monitor/whisper/barge) and recordings


cdef inline void rec_write_frame(Recording* r) noexcept nogil:
    rec_take_frame(r, r.buf)
    if fwrite(r.buf, 4, FRAME, r.f) != FRAME:
        r.error = 1
    else:
        r.frames += FRAME


cdef int record_tick(EngineState* e, Recording* r) noexcept nogil:
    """Writes the frames that became due (one a tick, more to catch up after a stall);
    returns how many."""
    cdef int64_t n = rec_due(r, e.tick_now)
    cdef int k
    if n > REC_CATCHUP:
        n = REC_CATCHUP
    for k in range(n):
        rec_write_frame(r)
    if (e.tick_no + <uint64_t>r.id) % REC_FLUSH_TICKS == 0:
        # each recording writes once a second, at its own tick: the disk work is spread
        # evenly instead of landing on one tick (the stdio buffer never fills before)
        fflush(r.f)
    return <int>n


cdef void send_frame(EngineState* e, Leg* g, int64_t now) noexcept nogil:
    """The leg's next generated packet: a prompt frame, or its mix."""
    cdef int j, n
    cdef Leg* s
    cdef int32_t acc[FRAME]
    cdef int16_t frame[FRAME]
    cdef uint8_t pkt[12 + FRAME]
    if g.play_buf != NULL:
        n = FRAME
        if g.play_len - g.play_pos < n:
            n = <int>(g.play_len - g.play_pos)
        memcpy(frame, g.play_buf + g.play_pos, n * 2)
        if n < FRAME:
            memset(&frame[n], 0, (FRAME - n) * 2)
        g.play_pos += n
        rtp_write_header(pkt, sizeof(pkt), <uint8_t>g.pt, 0, 0, 0, 0)
        encode(g.pt, frame, pkt + 12, FRAME)
        out_header(g, pkt, KEY_PLAY | <uint32_t>g.play_id,
                   <uint16_t>(g.play_pos // FRAME), <uint32_t>g.play_pos, now)
        send_one(g, pkt, sizeof(pkt))
        if g.play_pos >= g.play_len:
            free(g.play_buf)
            g.play_buf = NULL
            push_event(e, EV_PLAY_DONE, g.slot, g.play_id, 1, 0)
            recount_listeners(e)
    elif g.nsrc >= 2:
        mix_clear(acc, FRAME)
        for j in range(g.nsrc):
            s = e.legs[g.src[j]] if g.src[j] >= 0 else NULL
            if s != NULL:
                mix_accumulate(acc, s.cur, FRAME)
        mix_saturate(frame, acc, FRAME)
        rtp_write_header(pkt, sizeof(pkt), <uint8_t>g.pt, 0, 0, 0, 0)
        encode(g.pt, frame, pkt + 12, FRAME)
        out_header(g, pkt, KEY_MIX, <uint16_t>e.tick_no, <uint32_t>(e.tick_no * FRAME), now)
        send_one(g, pkt, sizeof(pkt))


cdef bint tick_step(EngineState* e) noexcept nogil:
    """Advances the current tick by at most TICK_SLICE_NS of work, so packets waiting in the
    sockets are never held up for long; returns True when the tick is complete. The tick's
    phases run in order: take a frame from every tapped leg, write recordings, send prompts
    and mixes. Commands wait until the tick is complete (the leg list must not change)."""
    cdef int64_t stop = engine_now_ns() + TICK_SLICE_NS
    cdef Leg* g
    cdef Recording* r
    cdef int work = 0
    while e.tick_phase < 3:
        if e.tick_phase == 0:
            while e.tick_pos < e.ndense:
                g = e.legs[e.dense[e.tick_pos]]
                e.tick_pos += 1
                if g.listeners > 0:
                    fifo_pop(g)
                    work += 1
                    if work % 64 == 0 and engine_now_ns() > stop:
                        return False
        elif e.tick_phase == 1:
            while e.tick_pos < e.max_recs:
                r = e.recs[e.tick_pos]
                e.tick_pos += 1
                if r != NULL and r.f != NULL:
                    # one recording ahead, ask for its ring; two ahead, for its header
                    if e.tick_pos < e.max_recs and e.recs[e.tick_pos] != NULL:
                        rec_prefetch(e.recs[e.tick_pos])
                    if e.tick_pos + 1 < e.max_recs and e.recs[e.tick_pos + 1] != NULL:
                        engine_prefetch(e.recs[e.tick_pos + 1])
                    work += 1 + 4 * record_tick(e, r)
                    if work % 64 == 0 and engine_now_ns() > stop:
                        return False
        else:
            while e.tick_pos < e.ndense:
                g = e.legs[e.dense[e.tick_pos]]
                e.tick_pos += 1
                if g.play_buf != NULL or g.nsrc >= 2:
                    send_frame(e, g, e.tick_now)
                    work += 8
                    if work % 64 == 0 and engine_now_ns() > stop:
                        return False
        e.tick_phase += 1
        e.tick_pos = 0
    return True


cdef inline bint needs_tick(EngineState* e) noexcept nogil:
    return e.tick_users > 0 or e.nrecs > 0


cdef void housekeeping(EngineState* e, int64_t now) noexcept nogil:
    """One of HOUSE_PASSES passes: together they visit every leg once per HOUSE_NS."""
    cdef int i, n, reports = 0
    cdef Leg* g
    cdef te_digit_t d
    n = (e.ndense + HOUSE_PASSES - 1) // HOUSE_PASSES
    for i in range(n):
        if e.ndense == 0:
            return
        if e.house_pos >= e.ndense:
            e.house_pos = 0
        g = e.legs[e.dense[e.house_pos]]
        e.house_pos += 1
        if g.timeout_ns > 0 and not g.timed_out and now - g.last_rx_ns > g.timeout_ns:
            g.timed_out = 1
            push_event(e, EV_TIMEOUT, g.slot, 0, 0, now - g.last_rx_ns)
        if g.te_pt >= 0 and te_receiver_poll(&g.te, now * 1e-9, &d):
            report_digit(e, g, &d)
        if now >= g.next_rtcp_ns and reports < RTCP_PER_PASS:
            # a bounded number per pass, so reports never hold packets up for long
            reports += 1
            send_rtcp(e, g, now)
            # RFC 3550 §6.3.1: randomise the interval over [0.5, 1.5] of its value
            g.next_rtcp_ns = now + RTCP_NS // 2 + <int64_t>(engine_random32() % <uint32_t>(RTCP_NS // 1000)) * 1000


# ---------------------------------------------------------------------------------------------
# commands


cdef void recount_listeners(EngineState* e) noexcept nogil:
    """Recomputes which legs feed a mix and whether the 20 ms tick has work (after changes)."""
    cdef int i, j, users = 0
    cdef Leg* g
    for i in range(e.ndense):
        e.legs[e.dense[i]].listeners = 0
    for i in range(e.ndense):
        g = e.legs[e.dense[i]]
        if g.nsrc >= 2:
            for j in range(g.nsrc):
                if g.src[j] >= 0 and e.legs[g.src[j]] != NULL:
                    e.legs[g.src[j]].listeners += 1
    for i in range(e.ndense):
        g = e.legs[e.dense[i]]
        if g.play_buf != NULL or g.nsrc >= 2 or g.listeners > 0 or g.rec != NULL:
            users += 1
    e.tick_users = users


cdef void finish_recording(EngineState* e, Recording* r) noexcept nogil:
    cdef uint32_t v
    cdef uint64_t data
    cdef int i
    cdef int64_t end = rec_end(r, engine_now_ns())
    # what is still inside the window goes out too: the file is as long as the call
    while r.pos < end:
        rec_write_frame(r)
    data = r.frames * 4
    # RFC 2361 / RIFF: patch the chunk sizes now that the length is known
    if data > 0xFFFFFFF0ULL - 36:
        data = 0xFFFFFFF0ULL - 36
    v = <uint32_t>(36 + data)
    fseek(r.f, 4, SEEK_SET)
    fwrite(&v, 4, 1, r.f)
    v = <uint32_t>data
    fseek(r.f, 40, SEEK_SET)
    fwrite(&v, 4, 1, r.f)
    if fclose(r.f) != 0:
        r.error = 1
    r.f = NULL
    free(r.vbuf)
    r.vbuf = NULL
    free(r.ring)
    r.ring = NULL
    for i in range(2):
        if r.legs[i] >= 0 and e.legs[r.legs[i]] != NULL:
            e.legs[r.legs[i]].rec = NULL
    e.recs[r.id] = NULL
    e.nrecs -= 1
    push_event(e, EV_RECORD_DONE, -1, r.id, r.error, <int64_t>r.frames)
    free(r)
    recount_listeners(e)


cdef void release_leg(EngineState* e, Leg* g) noexcept nogil:
    cdef int i, j, last
    cdef Leg* o
    cdef Recording* r
    epoll_ctl(e.epfd, EPOLL_CTL_DEL, g.rtp_fd, NULL)
    epoll_ctl(e.epfd, EPOLL_CTL_DEL, g.rtcp_fd, NULL)
    if g.latch != LATCH_NONE:
        send_rtcp(e, g, engine_now_ns(), True)
    close(g.rtp_fd)
    close(g.rtcp_fd)
    g.rtp_fd = -1
    g.rtcp_fd = -1
    if g.play_buf != NULL:
        free(g.play_buf)
        g.play_buf = NULL
        push_event(e, EV_PLAY_DONE, g.slot, g.play_id, 0, 0)
    for i in range(e.ndense):
        o = e.legs[e.dense[i]]
        if o.peer == g.slot:
            o.peer = -1
        for j in range(o.nsrc):
            if o.src[j] == g.slot:
                o.src[j] = -1
    if g.rec != NULL:
        r = g.rec
        for i in range(2):
            if r.legs[i] == g.slot:
                r.legs[i] = -1
        g.rec = NULL
        if r.legs[0] < 0 and r.legs[1] < 0:
            finish_recording(e, r)
    # remove from the dense list
    last = e.dense[e.ndense - 1]
    e.dense[g.dense_index] = last
    e.legs[last].dense_index = g.dense_index
    e.ndense -= 1
    e.legs[g.slot] = NULL
    g.active = 0
    recount_listeners(e)
    push_event(e, EV_RELEASED, g.slot, 0, 0, 0)


cdef void run_command(EngineState* e, Cmd* c, int64_t now) noexcept nogil:
    cdef Leg* g = NULL
    cdef Leg* o
    cdef Recording* r
    cdef epoll_event ev
    cdef sockaddr_storage unspec
    cdef int i
    if c.op == CMD_ADD:
        g = <Leg*>c.ptr
        e.legs[g.slot] = g
        g.dense_index = e.ndense
        e.dense[e.ndense] = g.slot
        e.ndense += 1
        g.active = 1
        g.last_rx_ns = now
        # spread the legs' reports over the interval (RFC 3550 §6.3.1 randomisation)
        g.next_rtcp_ns = now + <int64_t>(engine_random32() % <uint32_t>(RTCP_NS // 1000)) * 1000
        # edge-triggered: the ready list is not re-polled after every wake-up
        ev.events = EPOLLIN | EPOLLET
        ev.data.u64 = (<uint64_t>g.slot) << 1
        epoll_ctl(e.epfd, EPOLL_CTL_ADD, g.rtp_fd, &ev)
        ev.data.u64 = ((<uint64_t>g.slot) << 1) | 1
        epoll_ctl(e.epfd, EPOLL_CTL_ADD, g.rtcp_fd, &ev)
        return
    if c.op == CMD_REC_PAUSE or c.op == CMD_REC_RESUME or c.op == CMD_REC_STOP:
        r = e.recs[c.i[0]] if 0 <= c.i[0] < e.max_recs else NULL
        if r == NULL:
            return
        if c.op == CMD_REC_STOP:
            finish_recording(e, r)
        elif c.op == CMD_REC_PAUSE:
            rec_pause(r, now)
        else:
            rec_resume(r, now)
        return
    if c.op == CMD_REC_START:
        r = <Recording*>c.ptr
        r.start_ns = now
        e.recs[r.id] = r
        e.nrecs += 1
        for i in range(2):
            o = e.legs[r.legs[i]] if r.legs[i] >= 0 else NULL
            if o == NULL:
                r.legs[i] = -1
            else:
                if o.rec != NULL and o.rec != r:
                    # one recording per leg: the newer one takes the tap
                    if o.rec.legs[0] == o.slot:
                        o.rec.legs[0] = -1
                    if o.rec.legs[1] == o.slot:
                        o.rec.legs[1] = -1
                o.rec = r
        recount_listeners(e)
        return
    if 0 <= c.leg < e.max_legs:
        g = e.legs[c.leg]
    if g == NULL:
        if c.op == CMD_PLAY:
            free(c.ptr)
            push_event(e, EV_PLAY_DONE, c.leg, c.i[0], 0, 0)
        return
    if c.op == CMD_REMOTE:
        if g.connected:
            # re-INVITE: forget the latched far end, learn it again
            memset(&unspec, 0, sizeof(unspec))
            unspec.ss_family = AF_UNSPEC
            connect(g.rtp_fd, <sockaddr*>&unspec, sizeof(sockaddr_storage))
            g.connected = 0
        memcpy(&g.remote, &c.addr, sizeof(sockaddr_storage))
        g.remote_len = c.addr_len
        g.latch = LATCH_EXPECTED
        memcpy(&g.rtcp_remote, &c.addr2, sizeof(sockaddr_storage))
        g.rtcp_remote_len = c.addr2_len
        g.rtcp_latch = LATCH_EXPECTED
    elif c.op == CMD_CODEC:
        g.pt = c.i[0]
        g.te_pt = c.i[1]
    elif c.op == CMD_BRIDGE:
        o = e.legs[c.i[0]] if 0 <= c.i[0] < e.max_legs else NULL
        if o != NULL:
            g.peer = o.slot
            o.peer = g.slot
    elif c.op == CMD_UNBRIDGE:
        if g.peer >= 0 and e.legs[g.peer] != NULL and e.legs[g.peer].peer == g.slot:
            e.legs[g.peer].peer = -1
        g.peer = -1
    elif c.op == CMD_MIX:
        g.nsrc = 0
        for i in range(c.i[3]):
            if 0 <= c.i[i] < e.max_legs and e.legs[c.i[i]] != NULL and c.i[i] != g.slot:
                g.src[g.nsrc] = c.i[i]
                g.nsrc += 1
        recount_listeners(e)
    elif c.op == CMD_PLAY:
        if g.play_buf != NULL:
            free(g.play_buf)
            push_event(e, EV_PLAY_DONE, g.slot, g.play_id, 0, 0)
        g.play_buf = <int16_t*>c.ptr
        g.play_len = c.l
        g.play_pos = 0
        g.play_id = c.i[0]
        recount_listeners(e)
    elif c.op == CMD_STOP_PLAY:
        if g.play_buf != NULL:
            free(g.play_buf)
            g.play_buf = NULL
            push_event(e, EV_PLAY_DONE, g.slot, g.play_id, 0, 0)
            recount_listeners(e)
    elif c.op == CMD_TIMEOUT:
        g.timeout_ns = c.l
        g.timed_out = 0
    elif c.op == CMD_INBAND:
        g.inband = c.i[0]
        dtmf_init(&g.dtmf)
    elif c.op == CMD_RELEASE:
        release_leg(e, g)


cdef void run_commands(EngineState* e, int64_t now) noexcept nogil:
    cdef Cmd local[64]
    cdef int n, i
    drain_fd(e.cmd_fd)
    while True:
        pthread_mutex_lock(&e.cmd_lock)
        n = e.cmd_count if e.cmd_count < 64 else 64
        for i in range(n):
            memcpy(&local[i], &e.cmds[(e.cmd_head + i) % CMD_CAP], sizeof(Cmd))
        e.cmd_head = (e.cmd_head + n) % CMD_CAP
        e.cmd_count -= n
        pthread_mutex_unlock(&e.cmd_lock)
        if n == 0:
            return
        for i in range(n):
            run_command(e, &local[i], now)


# ---------------------------------------------------------------------------------------------
# the engine thread


cdef void* engine_main(void* arg) noexcept nogil:
    cdef EngineState* e = <EngineState*>arg
    cdef int n, i, timeout_ms, got, slot, errors
    cdef int64_t now, due
    cdef uint64_t tag
    cdef Leg* g
    cdef bint ticking
    cdef int64_t woke = 0
    cdef int moved
    cdef bint cmds_waiting = False
    e.tid = engine_gettid()
    now = engine_now_ns()
    e.next_tick_ns = now + TICK_NS
    e.next_house_ns = now + HOUSE_NS
    engine_store_flag(&e.running, 1)
    while not engine_load_flag(&e.stop):
        now = engine_now_ns()
        ticking = needs_tick(e)
        due = e.next_house_ns
        if ticking and e.next_tick_ns < due:
            due = e.next_tick_ns
        timeout_ms = 0
        if due > now and not e.tick_active:
            timeout_ms = <int>((due - now + 999999) // 1000000)
        n = epoll_wait(e.epfd, e.ep_events, 256, timeout_ms)
        now = engine_now_ns()
        woke = now
        moved = 0
        e.loops += 1
        for i in range(n):
            tag = e.ep_events[i].data.u64
            if tag == 0xFFFFFFFFFFFFFFFFULL:
                if e.tick_active:
                    cmds_waiting = True
                else:
                    run_commands(e, now)
                continue
            slot = <int>(tag >> 1)
            g = e.legs[slot]
            if g == NULL:
                continue
            # edge-triggered: read until the socket is empty (a short batch says so)
            errors = 0
            while True:
                got = receive(e, g.rtcp_fd if tag & 1 else g.rtp_fd)
                if got < 0:
                    if errno == EAGAIN or errors >= 4:
                        break
                    # an ICMP error reported on the connected socket; datagrams may follow
                    errors += 1
                    continue
                if tag & 1:
                    for slot in range(got):
                        if e.rx_msgs[slot].msg_len <= PKT_MAX:
                            handle_rtcp(e, g, e.rx_buf + slot * PKT_MAX,
                                        e.rx_msgs[slot].msg_len, &e.rx_addr[slot], now)
                else:
                    handle_rtp_batch(e, g, got, now)
                    moved += got
                if got < BATCH or e.legs[g.slot] != g:
                    break
        if not e.tick_active and ticking and now >= e.next_tick_ns:
            e.tick_no += 1
            e.tick_now = now
            e.tick_phase = 0
            e.tick_pos = 0
            e.tick_active = 1
            e.next_tick_ns += TICK_NS
            if now - e.next_tick_ns > 50 * TICK_NS:
                # stalled for over a second: give up the lost time rather than burst through it
                # (up to that, ticks run back to back so recordings keep wall time)
                e.next_tick_ns = now + TICK_NS
        elif not ticking and not e.tick_active:
            e.next_tick_ns = now + TICK_NS
        if e.tick_active and tick_step(e):
            e.tick_active = 0
            due = engine_now_ns() - e.tick_now
            if due > e.tick_max_ns:
                e.tick_max_ns = due
        if cmds_waiting and not e.tick_active:
            cmds_waiting = False
            run_commands(e, engine_now_ns())
        if now >= e.next_house_ns:
            housekeeping(e, now)
            e.next_house_ns = now + HOUSE_NS // HOUSE_PASSES
        if e.evt_signal:
            e.evt_signal = 0
            signal_fd(e.evt_fd)
        if moved and e.coalesce_ns > 0:
            # Packets are flowing: let the next ones queue in the sockets for a moment so one
            # wake-up serves many of them (the cost per packet is mostly wake-ups and syscalls).
            # Bounded: adds at most coalesce_ns to a packet's stay.
            engine_sleep_until_ns(woke + e.coalesce_ns)
    engine_store_flag(&e.running, 0)
    return NULL


# ---------------------------------------------------------------------------------------------
# control side (called from the asyncio thread with the GIL; never waits on the engine)


class EngineError(Exception):
    """The engine refused a command (bad argument, no free port, queue full)."""


cdef int fill_addr(str host, int port, sockaddr_storage* out, socklen_t* out_len) except -1:
    cdef bytes h = host.encode()
    cdef sockaddr_in* a4 = <sockaddr_in*>out
    cdef sockaddr_in6* a6 = <sockaddr_in6*>out
    if not 0 <= port <= 65535:
        raise EngineError(f"port out of range: {port}")
    memset(out, 0, sizeof(sockaddr_storage))
    if inet_pton(AF_INET, h, &a4.sin_addr) == 1:
        a4.sin_family = AF_INET
        a4.sin_port = htons(<uint16_t>port)
        out_len[0] = sizeof(sockaddr_in)
        return 0
    if inet_pton(AF_INET6, h, &a6.sin6_addr) == 1:
        a6.sin6_family = AF_INET6
        a6.sin6_port = htons(<uint16_t>port)
        out_len[0] = sizeof(sockaddr_in6)
        return 0
    raise EngineError(f"not an IP address: {host!r}")


cdef int open_udp(int family, sockaddr_storage* addr, socklen_t alen) noexcept nogil:
    """Bound, non-blocking, DSCP EF marked UDP socket, or -errno."""
    cdef int fd = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    cdef int err
    if fd < 0:
        return -errno
    if family == AF_INET:
        setsockopt(fd, IPPROTO_IP, IP_TOS, &TOS_EF, sizeof(int))
    else:
        setsockopt(fd, IPPROTO_IPV6, IPV6_TCLASS, &TOS_EF, sizeof(int))
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &SOCKBUF, sizeof(int))
    if bind(fd, <sockaddr*>addr, alen) != 0:
        err = errno
        close(fd)
        return -err
    return fd


cdef class Engine:
    """Owns the native engine thread, its legs (port pairs) and its two queues."""

    cdef EngineState* e
    cdef Leg** owned          # leg memory, freed here once the engine confirms the release
    cdef readonly int port_min
    cdef readonly int port_max
    cdef int next_port
    cdef set ports
    cdef dict leg_ports
    cdef object free_slots    # collections.deque: released ids go to the back
    cdef list free_recs
    cdef object rec_paths
    cdef bint wakes_deferred  # commands wake the thread only at wake() (one per loop turn)
    cdef bint wake_pending    # a command found the ring empty since the last wake

    def __cinit__(self, int port_min=20000, int port_max=29999, int max_legs=4096,
                  int max_recordings=1024, int coalesce_us=0, int recording_delay_ms=100):
        cdef epoll_event ev
        cdef int i
        if port_min < 1024 or port_max > 65535 or port_max - port_min < 1:
            raise EngineError(f"bad RTP port range {port_min}-{port_max}")
        if not 1 <= max_legs <= 65536 or not 1 <= max_recordings <= 65536:
            raise EngineError("max_legs and max_recordings must be within 1..65536")
        if not REC_DELAY_MIN_MS <= recording_delay_ms <= REC_DELAY_MAX_MS:
            raise EngineError(f"recording_delay_ms must be within "
                              f"{REC_DELAY_MIN_MS}..{REC_DELAY_MAX_MS}: {recording_delay_ms}")
        self.e = <EngineState*>calloc(1, sizeof(EngineState))
        if self.e == NULL:
            raise MemoryError()
        self.port_min = port_min + (port_min & 1)     # RTP on even ports (RFC 3550 §11)
        self.port_max = port_max
        self.next_port = self.port_min
        self.ports = set()
        self.leg_ports = {}
        # First in, first out: an id released now comes back only after every other free one,
        # so an id held a little too long by the control side (maps cleaned up after an await)
        # does not already name another call's leg.
        self.free_slots = deque(range(max_legs))
        self.free_recs = list(range(max_recordings - 1, -1, -1))
        self.rec_paths = {}
        e = self.e
        e.epfd = -1
        e.cmd_fd = -1
        e.evt_fd = -1
        e.max_legs = max_legs
        e.max_recs = max_recordings
        if not 0 <= coalesce_us <= 1000:
            raise EngineError("coalesce_us must be within 0..1000")
        e.coalesce_ns = coalesce_us * 1000
        e.rec_delay = recording_delay_ms * 8
        e.legs = <Leg**>calloc(max_legs, sizeof(Leg*))
        self.owned = <Leg**>calloc(max_legs, sizeof(Leg*))
        e.dense = <int32_t*>calloc(max_legs, sizeof(int32_t))
        e.recs = <Recording**>calloc(max_recordings, sizeof(Recording*))
        e.cmds = <Cmd*>calloc(CMD_CAP, sizeof(Cmd))
        e.evts = <Event*>calloc(EVT_CAP, sizeof(Event))
        e.rx_buf = <uint8_t*>malloc(BATCH * PKT_MAX)
        if (e.legs == NULL or self.owned == NULL or e.dense == NULL or e.recs == NULL or e.cmds == NULL
                or e.evts == NULL or e.rx_buf == NULL):
            raise MemoryError()
        for i in range(BATCH):
            e.rx_iov[i].iov_base = e.rx_buf + i * PKT_MAX
            e.rx_iov[i].iov_len = PKT_MAX
            e.rx_msgs[i].msg_hdr.msg_name = &e.rx_addr[i]
            e.rx_msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_storage)
            e.rx_msgs[i].msg_hdr.msg_iov = &e.rx_iov[i]
            e.rx_msgs[i].msg_hdr.msg_iovlen = 1
        pthread_mutex_init(&e.cmd_lock, NULL)
        pthread_mutex_init(&e.evt_lock, NULL)
        e.epfd = epoll_create1(EPOLL_CLOEXEC)
        e.cmd_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        e.evt_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if e.epfd < 0 or e.cmd_fd < 0 or e.evt_fd < 0:
            raise OSError(errno, "epoll/eventfd")
        ev.events = EPOLLIN
        ev.data.u64 = 0xFFFFFFFFFFFFFFFFULL
        epoll_ctl(e.epfd, EPOLL_CTL_ADD, e.cmd_fd, &ev)

    def __dealloc__(self):
        if self.e != NULL:
            self._shutdown()
            free(self.e)
            self.e = NULL

    cdef void _shutdown(self) noexcept:
        cdef EngineState* e = self.e
        cdef int i
        cdef Leg* g
        if e.thread != 0:
            engine_store_flag(&e.stop, 1)
            signal_fd(e.cmd_fd)
            with nogil:
                pthread_join(e.thread, NULL)
            e.thread = 0
        # run what is still queued (releases), then release every leg left
        run_commands(e, engine_now_ns())
        for i in range(e.max_recs):
            if e.recs != NULL and e.recs[i] != NULL:
                finish_recording(e, e.recs[i])
        if e.legs != NULL:
            for i in range(e.max_legs):
                g = e.legs[i]
                if g != NULL:
                    release_leg(e, g)
        if self.owned != NULL:
            for i in range(e.max_legs):
                free(self.owned[i])
            free(self.owned)
            self.owned = NULL
        for fd in (e.epfd, e.cmd_fd, e.evt_fd):
            if fd >= 0:
                close(fd)
        e.epfd = e.cmd_fd = e.evt_fd = -1
        free(e.legs)
        free(e.dense)
        free(e.recs)
        free(e.cmds)
        free(e.evts)
        free(e.rx_buf)
        e.legs = NULL
        e.dense = NULL
        e.recs = NULL
        e.cmds = NULL
        e.evts = NULL
        e.rx_buf = NULL
        pthread_mutex_destroy(&e.cmd_lock)
        pthread_mutex_destroy(&e.evt_lock)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread."""
        if self.e.thread != 0:
            raise EngineError("engine already started")
        if self.e.epfd < 0:
            raise EngineError("engine closed")
        if pthread_create(&self.e.thread, NULL, engine_main, self.e) != 0:
            self.e.thread = 0
            raise EngineError("cannot start the engine thread")

    def close(self) -> None:
        """Stop the thread, close every socket and free every leg."""
        if self.e != NULL and self.e.epfd >= 0:
            self._shutdown()

    @property
    def thread_id(self) -> int:
        """Kernel thread id of the engine thread (0 before it runs)."""
        return self.e.tid if engine_load_flag(&self.e.running) else 0

    @property
    def event_fd(self) -> int:
        """eventfd readable when events wait (for loop.add_reader)."""
        return self.e.evt_fd

    @property
    def legs_active(self) -> int:
        """Legs allocated and not yet confirmed released."""
        return len(self.leg_ports)

    @property
    def leg_bytes(self) -> int:
        """Memory of one leg's state (bytes)."""
        return sizeof(Leg)

    @property
    def recording_bytes(self) -> int:
        """Memory of one recording's state and timeline ring, its stdio buffer excluded
        (bytes)."""
        return sizeof(Recording) + 2 * rec_ring_size(self.e.rec_delay) * sizeof(int16_t)

    @property
    def recording_delay_ms(self) -> int:
        """How old a position of a recording is before it is written (reorder window)."""
        return self.e.rec_delay // 8

    @property
    def tick_max_us(self) -> float:
        """Longest 20 ms tick so far (prompts, mixes, recordings), in microseconds."""
        return self.e.tick_max_ns / 1000.0

    @property
    def events_lost(self) -> int:
        """Events dropped because the event queue was full."""
        return self.e.evt_lost_total

    # -- command queue -----------------------------------------------------------------------

    cdef int _post(self, Cmd* c) except -1:
        cdef EngineState* e = self.e
        cdef bint full = False
        cdef bint was_empty = False
        if e.epfd < 0:
            raise EngineError("engine closed")
        # The GIL stays held: the engine thread holds cmd_lock only to copy commands out and
        # never takes the GIL, while giving the GIL up here would let another Python thread
        # in and make the loop wait for it back on every command.
        pthread_mutex_lock(&e.cmd_lock)
        if e.cmd_count >= CMD_CAP:
            full = True
        else:
            was_empty = e.cmd_count == 0
            memcpy(&e.cmds[(e.cmd_head + e.cmd_count) % CMD_CAP], c, sizeof(Cmd))
            e.cmd_count += 1
        pthread_mutex_unlock(&e.cmd_lock)
        if full:
            raise EngineError("engine command queue full")
        # Only the command that finds the ring empty wakes the engine: run_commands takes
        # commands until it sees the ring empty under the lock, so the ones queued behind it
        # are run by the same wake-up. With wakes deferred that write waits for wake(), so
        # the commands of a whole loop turn cost one write and one wake-up of the thread.
        if was_empty:
            if self.wakes_deferred:
                self.wake_pending = True
            else:
                signal_fd(e.cmd_fd)
        return 0

    def defer_wakes(self, bint deferred) -> None:
        """With True, queued commands wait for ``wake()`` (called once per event-loop turn)
        instead of waking the engine thread one by one; False wakes it at once again."""
        self.wakes_deferred = deferred
        if not deferred:
            self.wake()

    def wake(self) -> None:
        """Wake the engine thread for the commands queued since the last wake, if any."""
        if self.wake_pending and self.e != NULL and self.e.epfd >= 0:
            self.wake_pending = False
            signal_fd(self.e.cmd_fd)

    cdef int _leg(self, int leg) except -1:
        if leg not in self.leg_ports:
            raise EngineError(f"no such leg: {leg}")
        return 0

    def allocate(self, str host="127.0.0.1") -> tuple:
        """Open an RTP/RTCP port pair (even/odd) on host; returns (leg, rtp_port)."""
        cdef sockaddr_storage addr
        cdef socklen_t alen
        cdef int span = (self.port_max - self.port_min + 1) // 2
        cdef int tries, port, rtp_fd = -1, rtcp_fd = -1, slot
        cdef Leg* g
        fill_addr(host, 0, &addr, &alen)
        if not self.free_slots:
            raise EngineError("no free leg slot")
        for tries in range(span):
            port = self.next_port
            self.next_port += 2
            if self.next_port + 1 > self.port_max:
                self.next_port = self.port_min
            if port in self.ports:
                continue
            set_port(&addr, port)
            rtp_fd = open_udp(addr.ss_family, &addr, alen)
            if rtp_fd == -EADDRINUSE:
                continue
            if rtp_fd < 0:
                raise OSError(-rtp_fd, "RTP socket")
            set_port(&addr, port + 1)
            rtcp_fd = open_udp(addr.ss_family, &addr, alen)
            if rtcp_fd < 0:
                close(rtp_fd)
                if rtcp_fd == -EADDRINUSE:
                    continue
                raise OSError(-rtcp_fd, "RTCP socket")
            break
        else:
            raise EngineError(f"no free RTP port pair in {self.port_min}-{self.port_max}")
        g = <Leg*>calloc(1, sizeof(Leg))
        if g == NULL:
            close(rtp_fd)
            close(rtcp_fd)
            raise MemoryError()
        slot = self.free_slots.popleft()
        self.owned[slot] = g
        g.slot = slot
        g.rtp_fd = rtp_fd
        g.rtcp_fd = rtcp_fd
        g.family = addr.ss_family
        g.local_port = port
        g.pt = 0
        g.te_pt = 101
        g.peer = -1
        g.out_ssrc = engine_random32()
        g.remote_fraction_lost = -1
        rtp_stats_init(&g.stats)
        te_receiver_init(&g.te, 0.2)
        dtmf_init(&g.dtmf)
        self.ports.add(port)
        self.leg_ports[slot] = port
        cdef Cmd c
        memset(&c, 0, sizeof(Cmd))
        c.op = CMD_ADD
        c.leg = slot
        c.ptr = g
        try:
            self._post(&c)
        except BaseException:
            close(rtp_fd)
            close(rtcp_fd)
            self._forget(slot)
            raise
        return slot, port

    cdef void _forget(self, int slot):
        free(self.owned[slot])
        self.owned[slot] = NULL
        port = self.leg_ports.pop(slot, None)
        self.ports.discard(port)
        self.free_slots.append(slot)

    cdef int _simple(self, int op, int leg, int a=0, int b=0, int c2=0, int d=0,
                     int64_t l=0) except -1:
        cdef Cmd c
        self._leg(leg)
        memset(&c, 0, sizeof(Cmd))
        c.op = op
        c.leg = leg
        c.i[0] = a
        c.i[1] = b
        c.i[2] = c2
        c.i[3] = d
        c.l = l
        return self._post(&c)

    def set_remote(self, int leg, str host, int port, rtcp_port=None) -> None:
        """Far end from SDP (RFC 4566 c=/m=); the first packet received still wins (RFC 4961)."""
        cdef Cmd c
        self._leg(leg)
        memset(&c, 0, sizeof(Cmd))
        c.op = CMD_REMOTE
        c.leg = leg
        fill_addr(host, port, &c.addr, &c.addr_len)
        fill_addr(host, port + 1 if rtcp_port is None else rtcp_port, &c.addr2, &c.addr2_len)
        self._post(&c)

    def set_codec(self, int leg, int payload_type, int telephone_event_pt=101) -> None:
        """G.711 law of the leg (0 PCMU, 8 PCMA) and its RFC 4733 payload type (-1 none)."""
        if payload_type not in (0, 8):
            raise EngineError(f"unsupported payload type {payload_type}: PCMU (0) or PCMA (8)")
        if not (telephone_event_pt == -1 or 96 <= telephone_event_pt <= 127):
            raise EngineError(f"telephone-event payload type must be dynamic: {telephone_event_pt}")
        self._simple(CMD_CODEC, leg, payload_type, telephone_event_pt)

    def bridge(self, int leg_a, int leg_b) -> None:
        """Relay each leg's input to the other."""
        self._leg(leg_b)
        if leg_a == leg_b:
            raise EngineError("cannot bridge a leg to itself")
        self._simple(CMD_BRIDGE, leg_a, leg_b)

    def unbridge(self, int leg) -> None:
        """Stop relaying between the leg and its peer."""
        self._simple(CMD_UNBRIDGE, leg)

    def set_mix(self, int leg, sources) -> None:
        """Send the leg the mix of these legs' input instead of its peer's (fewer than 2: relay)."""
        src = [int(s) for s in sources]
        if len(src) > MAX_SRC:
            raise EngineError(f"at most {MAX_SRC} mix sources")
        for s in src:
            self._leg(s)
        src += [-1] * (MAX_SRC - len(src))
        n = sum(1 for s in src if s >= 0)
        self._simple(CMD_MIX, leg, src[0], src[1], src[2], n if n >= 2 else 0)

    def play(self, int leg, pcm, int play_id) -> None:
        """Send 8 kHz int16 PCM as RTP at 20 ms pacing, replacing what the leg sends."""
        cdef const int16_t[::1] view
        cdef Cmd c
        cdef int16_t* buf
        self._leg(leg)
        mv = memoryview(pcm)
        if mv.format != "h":
            mv = mv.cast("B").cast("h")
        view = mv
        if view.shape[0] == 0:
            raise EngineError("empty prompt")
        if view.shape[0] > 8000 * 3600:
            raise EngineError("prompt longer than one hour")
        buf = <int16_t*>malloc(view.shape[0] * 2)
        if buf == NULL:
            raise MemoryError()
        memcpy(buf, &view[0], view.shape[0] * 2)
        memset(&c, 0, sizeof(Cmd))
        c.op = CMD_PLAY
        c.leg = leg
        c.i[0] = play_id
        c.l = view.shape[0]
        c.ptr = buf
        try:
            self._post(&c)
        except BaseException:
            free(buf)
            raise

    def stop_play(self, int leg) -> None:
        """Stop the prompt; the leg's usual source resumes."""
        self._simple(CMD_STOP_PLAY, leg)

    def set_timeout(self, int leg, double seconds) -> None:
        """Report an inactivity timeout after this long without RTP (0 disables)."""
        if seconds < 0:
            raise EngineError("timeout must be >= 0")
        self._simple(CMD_TIMEOUT, leg, 0, 0, 0, 0, <int64_t>(seconds * 1e9))

    def set_inband_dtmf(self, int leg, bint enabled) -> None:
        """Detect DTMF tones in the leg's audio (ITU-T Q.23/Q.24)."""
        self._simple(CMD_INBAND, leg, 1 if enabled else 0)

    def release(self, int leg) -> None:
        """Close the leg's ports; EV_RELEASED confirms it."""
        self._simple(CMD_RELEASE, leg)

    # -- recordings ---------------------------------------------------------------------------

    def record_start(self, str path, int caller_leg, int agent_leg) -> int:
        """Start a stereo 8 kHz WAV (caller left, agent right); returns the recording id."""
        cdef Recording* r
        cdef Cmd c
        cdef bytes p = path.encode()
        cdef FILE* f
        cdef int16_t* ring
        cdef int ring_size
        # RIFF/WAVE header, sizes patched when the recording ends
        cdef bytes header = (b"RIFF" + b"\0\0\0\0" + b"WAVEfmt " + (16).to_bytes(4, "little")
                             + (1).to_bytes(2, "little") + (2).to_bytes(2, "little")
                             + (8000).to_bytes(4, "little") + (32000).to_bytes(4, "little")
                             + (4).to_bytes(2, "little") + (16).to_bytes(2, "little")
                             + b"data" + b"\0\0\0\0")
        for leg in (caller_leg, agent_leg):
            if leg >= 0:
                self._leg(leg)
        if not self.free_recs:
            raise EngineError("too many recordings")
        f = fopen(p, b"wbe")     # e: O_CLOEXEC
        if f == NULL:
            raise OSError(errno, f"cannot open recording {path!r}")
        if fwrite(<char*>header, 1, 44, f) != 44:
            fclose(f)
            raise OSError(errno, f"cannot write recording {path!r}")
        r = <Recording*>calloc(1, sizeof(Recording))
        ring_size = rec_ring_size(self.e.rec_delay)
        ring = <int16_t*>calloc(2 * ring_size, sizeof(int16_t))
        if r == NULL or ring == NULL:
            fclose(f)
            free(r)
            free(ring)
            raise MemoryError()
        rec_init(r, 0, self.e.rec_delay, ring, ring_size)   # the engine sets the start time
        r.f = f
        r.id = self.free_recs.pop()
        # holds more than one flush period of audio: the tick decides when it is written
        r.vbuf = <char*>malloc(REC_BUF)
        if r.vbuf != NULL:
            setvbuf(f, r.vbuf, _IOFBF, REC_BUF)
        r.legs[0] = caller_leg
        r.legs[1] = agent_leg
        memset(&c, 0, sizeof(Cmd))
        c.op = CMD_REC_START
        c.ptr = r
        try:
            self._post(&c)
        except BaseException:
            fclose(f)
            self.free_recs.append(r.id)
            free(r.vbuf)
            free(ring)
            free(r)
            raise
        self.rec_paths[r.id] = path
        return r.id

    def _rec(self, int rec_id, int op) -> None:
        cdef Cmd c
        if rec_id not in self.rec_paths:
            raise EngineError(f"no such recording: {rec_id}")
        memset(&c, 0, sizeof(Cmd))
        c.op = op
        c.i[0] = rec_id
        self._post(&c)

    def record_pause(self, int rec_id) -> None:
        """Write silence instead of audio until resumed (PCI DSS pause)."""
        self._rec(rec_id, CMD_REC_PAUSE)

    def record_resume(self, int rec_id) -> None:
        """Resume writing audio."""
        self._rec(rec_id, CMD_REC_RESUME)

    def record_stop(self, int rec_id) -> None:
        """Finish the WAV; EV_RECORD_DONE confirms it."""
        self._rec(rec_id, CMD_REC_STOP)

    # -- events and statistics ----------------------------------------------------------------

    def drain(self) -> list:
        """Events waiting, oldest first, as (kind, leg, a, b, x, t_ns) tuples."""
        cdef EngineState* e = self.e
        cdef Event* tmp
        cdef int n, i
        cdef Event ev
        cdef list out = []
        if e.evt_fd < 0:
            return out
        drain_fd(e.evt_fd)
        while True:
            tmp = <Event*>malloc(1024 * sizeof(Event))
            if tmp == NULL:
                raise MemoryError()
            with nogil:
                pthread_mutex_lock(&e.evt_lock)
                n = e.evt_count if e.evt_count < 1024 else 1024
                for i in range(n):
                    tmp[i] = e.evts[(e.evt_head + i) % EVT_CAP]
                e.evt_head = (e.evt_head + n) % EVT_CAP
                e.evt_count -= n
                pthread_mutex_unlock(&e.evt_lock)
            for i in range(n):
                ev = tmp[i]
                out.append((ev.kind, ev.leg, ev.a, ev.b, ev.x, ev.t_ns))
                if ev.kind == EV_RELEASED:
                    # the engine forgot the leg: its memory and ports are ours again
                    self._reap(ev.leg)
                elif ev.kind == EV_RECORD_DONE:
                    self.rec_paths.pop(ev.a, None)
                    self.free_recs.append(ev.a)
            free(tmp)
            if n < 1024:
                return out

    cdef void _reap(self, int slot):
        self._forget(slot)

    def socket_fds(self, int leg) -> tuple:
        """(rtp_fd, rtcp_fd) of a leg, for inspection only (the engine owns them)."""
        self._leg(leg)
        return self.owned[leg].rtp_fd, self.owned[leg].rtcp_fd

    def stats(self, int leg) -> dict:
        """Counters of one leg (read without stopping the engine; values may be a packet old)."""
        cdef EngineState* e = self.e
        cdef Leg* g
        self._leg(leg)
        g = self.owned[leg]
        lost = rtp_stats_lost(&g.stats)
        expected = g.stats.received + (lost if lost > 0 else 0)
        return {
            "rtp_port": g.local_port,
            "rx_packets": g.rx_packets,
            "rx_bytes": g.rx_bytes,
            "tx_packets": g.tx_packets,
            "tx_bytes": g.tx_bytes,
            "tx_errors": g.tx_errors,
            "rec_late": g.rec_late,
            "rec_resyncs": g.rec_resyncs,
            "rx_foreign": g.rx_foreign,
            "rx_invalid": g.rx_invalid,
            "lost": lost,
            "loss_pct": (100.0 * lost / expected) if expected > 0 and lost > 0 else 0.0,
            "jitter_ms": g.stats.jitter / 8.0,
            "rtcp_rx": g.rtcp_rx,
            "rtcp_tx": g.rtcp_tx,
            "remote_fraction_lost": g.remote_fraction_lost,
            "remote_jitter_ms": g.remote_jitter / 8.0,
            "rtt_ms": g.rtt_us / 1000.0 if g.rtt_us > 0 else None,
            "latched": g.latch == LATCH_LOCKED,
            "remote_port": addr_port(&g.remote) if g.latch != LATCH_NONE else None,
        }


cdef class RecordingTimeline:
    """A recording's timeline without sockets, threads or files: each side's packets go in
    with their arrival time, stereo frames (caller left, agent right) come out as the clock
    passes. The engine's recordings run this same code; here the times are chosen by the
    caller, so placement can be checked exactly."""

    cdef Recording* r
    cdef uint64_t resyncs_[2]
    cdef uint64_t late_[2]

    def __cinit__(self, int delay_ms=100, int64_t start_ns=0):
        cdef int size
        cdef int16_t* ring
        if not REC_DELAY_MIN_MS <= delay_ms <= REC_DELAY_MAX_MS:
            raise EngineError(f"delay_ms must be within {REC_DELAY_MIN_MS}..{REC_DELAY_MAX_MS}")
        size = rec_ring_size(delay_ms * 8)
        self.r = <Recording*>calloc(1, sizeof(Recording))
        ring = <int16_t*>calloc(2 * size, sizeof(int16_t))
        if self.r == NULL or ring == NULL:
            free(self.r)
            free(ring)
            self.r = NULL
            raise MemoryError()
        rec_init(self.r, start_ns, delay_ms * 8, ring, size)

    def __dealloc__(self):
        if self.r != NULL:
            free(self.r.ring)
            free(self.r)
            self.r = NULL

    def feed(self, int side, int seq, long long timestamp, long long ssrc, pcm,
             int64_t now_ns) -> None:
        """One RTP packet's decoded PCM (int16) for side 0 (caller) or 1 (agent), arrived at
        now_ns (same clock as start_ns)."""
        cdef const int16_t[::1] view
        if side not in (0, 1):
            raise EngineError(f"side must be 0 (caller) or 1 (agent): {side}")
        mv = memoryview(pcm)
        if mv.format != "h":
            mv = mv.cast("B").cast("h")
        view = mv
        if not 0 < view.shape[0] <= PKT_MAX:
            raise EngineError(f"a packet holds 1..{PKT_MAX} samples: {view.shape[0]}")
        rec_place(self.r, side, <uint16_t>(seq & 0xFFFF), <uint32_t>(timestamp & 0xFFFFFFFF),
                  <uint32_t>(ssrc & 0xFFFFFFFF), &view[0], <int>view.shape[0], now_ns,
                  &self.resyncs_[side], &self.late_[side])

    def pause(self, int64_t now_ns) -> None:
        """Silence from now_ns on (PCI DSS pause)."""
        rec_pause(self.r, now_ns)

    def resume(self, int64_t now_ns) -> None:
        """Audio again from now_ns on."""
        rec_resume(self.r, now_ns)

    def take(self, int64_t now_ns) -> bytes:
        """The stereo frames due at now_ns (int16 little-endian, interleaved), as the engine's
        tick would write them."""
        return self._take(rec_due(self.r, now_ns))

    def finish(self, int64_t now_ns) -> bytes:
        """Everything left when the recording stops at now_ns."""
        return self._take((rec_end(self.r, now_ns) - self.r.pos + FRAME - 1) // FRAME)

    cdef bytes _take(self, int64_t frames):
        cdef bytearray out = bytearray(max(frames, 0) * FRAME * 4)
        cdef int64_t k
        cdef char* p = out
        for k in range(max(frames, 0)):
            rec_take_frame(self.r, <int16_t*>(p + k * FRAME * 4))
        return bytes(out)

    @property
    def position(self) -> int:
        """Samples per side taken so far."""
        return self.r.pos

    def resyncs(self, int side) -> int:
        """Times the side was realigned to wall time (new stream, jump, drift)."""
        return self.resyncs_[side & 1]

    def late(self, int side) -> int:
        """Packets of the side that came (partly) too late for their place."""
        return self.late_[side & 1]
