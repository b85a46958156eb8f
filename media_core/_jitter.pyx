# cython: language_level=3
"""Compiled jitter buffer core: playout timeline, adaptive target delay and G.711 Appendix I
style concealment. Declarations in _jitter.pxd; media_core.jitter is the Python face."""

from libc.math cimport floor as c_floor
from libc.math cimport sqrt
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memmove, memset

from media_core._g711 cimport alaw_dec_buf, alaw_enc_buf, ulaw_dec_buf, ulaw_enc_buf

cdef int64_t TS_BASE = 1099511627776  # 2^40: extended timestamps start here, staying positive
cdef double INF = 1e300


cdef int jb_init(jb_t* jb, int codec, int clock_rate, int frame_samples, int max_packets,
                 double max_delay, double start, double floor, double cap,
                 double margin) noexcept nogil:
    cdef int n = 1
    memset(jb, 0, sizeof(jb_t))
    if frame_samples <= 0 or frame_samples > JB_MAX_FRAME or max_packets <= 0 \
            or max_packets > 4096 or clock_rate <= 0:
        return -1
    while n < max_packets:
        n <<= 1
    jb.codec = codec
    jb.clock_rate = clock_rate
    jb.frame_samples = frame_samples
    jb.frame_bytes = frame_samples * (2 if codec == JB_CODEC_L16 else 1)
    jb.nslots = n
    jb.max_packets = max_packets
    jb.max_delay = max_delay
    jb.start = start
    jb.floor = floor
    jb.cap = cap
    jb.margin = margin
    jb.bucket_len = 0.1
    jb.target = start
    jb.slot_ts = <int64_t*>malloc(n * sizeof(int64_t))
    jb.slot_arrival = <double*>malloc(n * sizeof(double))
    jb.slot_payload = <uint8_t*>malloc(n * jb.frame_bytes)
    if jb.slot_ts == NULL or jb.slot_arrival == NULL or jb.slot_payload == NULL:
        jb_free(jb)
        return -1
    _reset(jb)
    return 0


cdef void jb_free(jb_t* jb) noexcept nogil:
    free(jb.slot_ts)
    free(jb.slot_arrival)
    free(jb.slot_payload)
    jb.slot_ts = NULL
    jb.slot_arrival = NULL
    jb.slot_payload = NULL


cdef void _reset(jb_t* jb) noexcept nogil:
    # Forget the timeline and the delay history; keep counters and the concealment history.
    cdef int i
    for i in range(jb.nslots):
        jb.slot_ts[i] = -1
    jb.count = 0
    jb.started = 0
    jb.playing = 0
    jb.overflow_run = 0
    for i in range(JB_MIN_BUCKETS):
        jb.dmin_idx[i] = -1
    for i in range(JB_BUCKETS):
        jb.peak_idx[i] = -1
    jb.target = jb.start
    jb.since_adjust = 0


cdef inline int _slot(const jb_t* jb, int64_t ext) noexcept nogil:
    return <int>((ext // jb.frame_samples) & (jb.nslots - 1))


cdef inline int64_t _extend(const jb_t* jb, uint32_t ts) noexcept nogil:
    # Unwrap the 32-bit timestamp next to the playout point (RFC 3550 §5.1 wraps modulo 2^32).
    cdef int64_t ref = jb.play_ts
    return ref + <int32_t>(ts - <uint32_t>ref)


cdef void _update_target(jb_t* jb, double now) noexcept nogil:
    # Target = the largest jitter seen in the last JB_BUCKETS * bucket_len seconds plus a
    # margin: it rises with the first late-ish packet and falls only once a spike leaves the
    # window.
    cdef int64_t b = <int64_t>c_floor(now / jb.bucket_len)
    cdef double peak = -1.0, t
    cdef int i
    for i in range(JB_BUCKETS):
        if jb.peak_idx[i] > b - JB_BUCKETS and jb.peak_val[i] > peak:
            peak = jb.peak_val[i]
    if peak < 0:
        return
    jb.peak = peak
    t = peak + jb.margin
    if now - jb.first_arrival < JB_BUCKETS * jb.bucket_len and t < jb.start:
        t = jb.start  # not enough history yet to go below the starting delay
    if t < jb.floor:
        t = jb.floor
    if t > jb.cap:
        t = jb.cap
    jb.target = t


cdef void _observe(jb_t* jb, double d, double now) noexcept nogil:
    # d = arrival - ts / rate: the transit time up to a constant.
    cdef int64_t b = <int64_t>c_floor(now / (4 * jb.bucket_len))
    cdef int k = <int>(b % JB_MIN_BUCKETS)
    cdef int i
    cdef double m = INF, j
    if jb.dmin_idx[k] != b:
        jb.dmin_idx[k] = b
        jb.dmin_val[k] = d
    elif d < jb.dmin_val[k]:
        jb.dmin_val[k] = d
    for i in range(JB_MIN_BUCKETS):
        if jb.dmin_idx[i] > b - JB_MIN_BUCKETS and jb.dmin_val[i] < m:
            m = jb.dmin_val[i]
    jb.d_min = m
    j = d - m
    b = <int64_t>c_floor(now / jb.bucket_len)
    k = <int>(b % JB_BUCKETS)
    if jb.peak_idx[k] != b:
        jb.peak_idx[k] = b
        jb.peak_val[k] = j
    elif j > jb.peak_val[k]:
        jb.peak_val[k] = j
    _update_target(jb, now)


cdef int _start(jb_t* jb, int64_t ext, double now) noexcept nogil:
    jb.started = 1
    jb.play_ts = ext
    jb.first_arrival = now
    jb.start_at = now + jb.start
    return 0


cdef int jb_put(jb_t* jb, uint32_t ts, const uint8_t* payload, Py_ssize_t n,
                double now) noexcept nogil:
    # A packet may carry several frames (ptime 40 or 60 ms against 20 ms frames): each is
    # filed on its own; the result is the first frame's, or JB_RESYNC if any caused one.
    cdef Py_ssize_t frames, i
    cdef int result, r
    if n <= 0 or n % jb.frame_bytes != 0 or n // jb.frame_bytes > JB_MAX_FRAMES_PER_PACKET:
        jb.stats.invalid += 1
        return JB_INVALID
    frames = n // jb.frame_bytes
    result = _put_frame(jb, ts, payload, now, 1)
    for i in range(1, frames):
        # only the packet's first frame feeds the delay estimate: the others were not sent
        # later than it, and would read as arriving early
        r = _put_frame(jb, <uint32_t>(ts + i * jb.frame_samples), payload + i * jb.frame_bytes,
                       now, 0)
        if r == JB_RESYNC:
            result = r
    return result


cdef int _put_frame(jb_t* jb, uint32_t ts, const uint8_t* payload, double now,
                    int observe) noexcept nogil:
    cdef int64_t ext, off
    cdef int64_t window
    cdef int s
    cdef bint on_grid
    cdef int result = JB_ACCEPTED
    if not jb.started:
        jb.play_ts = TS_BASE + ts
        _start(jb, jb.play_ts, now)
    ext = _extend(jb, ts)
    off = ext - jb.play_ts
    window = <int64_t>jb.nslots * jb.frame_samples
    if off < 0 and not jb.playing and -off < window and off % jb.frame_samples == 0:
        # reordered before playout began: start earlier instead of calling it late
        if jb.count + (-off) // jb.frame_samples <= jb.max_packets:
            jb.play_ts = ext
            off = 0
    on_grid = off % jb.frame_samples == 0
    if on_grid and -window < off < 0:
        jb.overflow_run = 0
        jb.stats.late += 1
        if observe:
            _observe(jb, now - <double>ext / jb.clock_rate, now)
        return JB_LATE
    if (not on_grid or off < 0 or off >= window
            or <double>off / jb.clock_rate >= jb.max_delay):
        jb.overflow_run += 1
        if jb.overflow_run < 3:
            jb.stats.overflow += 1
            return JB_OVERFLOW
        # three in a row off the timeline: the sender jumped (restart, new SSRC); follow it
        _reset(jb)
        jb.stats.resyncs += 1
        jb.play_ts = TS_BASE + ts
        _start(jb, jb.play_ts, now)
        ext = jb.play_ts
        result = JB_RESYNC
    elif jb.count >= jb.max_packets and jb.slot_ts[_slot(jb, ext)] != ext:
        jb.stats.overflow += 1
        return JB_OVERFLOW
    jb.overflow_run = 0
    s = _slot(jb, ext)
    if jb.slot_ts[s] == ext:
        jb.stats.duplicates += 1
        return JB_DUPLICATE
    if jb.slot_ts[s] == -1:
        jb.count += 1
    jb.slot_ts[s] = ext
    jb.slot_arrival[s] = now
    memcpy(jb.slot_payload + <Py_ssize_t>s * jb.frame_bytes, payload, jb.frame_bytes)
    jb.stats.received += 1
    if observe:
        _observe(jb, now - <double>ext / jb.clock_rate, now)
    return result


cdef void _decode(const jb_t* jb, const uint8_t* src, int16_t* dst) noexcept nogil:
    cdef int i
    if jb.codec == JB_CODEC_PCMU:
        ulaw_dec_buf(src, dst, jb.frame_samples)
    elif jb.codec == JB_CODEC_PCMA:
        alaw_dec_buf(src, dst, jb.frame_samples)
    else:
        for i in range(jb.frame_samples):
            dst[i] = <int16_t>((src[2 * i] << 8) | src[2 * i + 1])


cdef void _encode(const jb_t* jb, const int16_t* src, uint8_t* dst) noexcept nogil:
    cdef int i
    if jb.codec == JB_CODEC_PCMU:
        ulaw_enc_buf(src, dst, jb.frame_samples)
    elif jb.codec == JB_CODEC_PCMA:
        alaw_enc_buf(src, dst, jb.frame_samples)
    else:
        for i in range(jb.frame_samples):
            dst[2 * i] = <uint8_t>((<uint16_t>src[i]) >> 8)
            dst[2 * i + 1] = <uint8_t>((<uint16_t>src[i]) & 0xFF)


cdef void _push_history(jb_t* jb, const int16_t* pcm) noexcept nogil:
    cdef int n = jb.frame_samples
    if n >= JB_HIST:
        memcpy(jb.hist, pcm + n - JB_HIST, JB_HIST * sizeof(int16_t))
    else:
        memmove(jb.hist, jb.hist + n, (JB_HIST - n) * sizeof(int16_t))
        memcpy(jb.hist + JB_HIST - n, pcm, n * sizeof(int16_t))
    jb.hist_fill = min(JB_HIST, jb.hist_fill + n)


# ------------------------------------------------- concealment (ITU-T G.711 Appendix I)

cdef int _find_pitch(const int16_t* h) noexcept nogil:
    # App. I §I.2.2: peak of the normalised cross-correlation of the newest 20 ms with the
    # history at lags of 5..15 ms; coarse pass on every other sample, then a fine pass.
    cdef int ref = JB_HIST - 160
    cdef int p, i, best = JB_PITCH_MIN, lo, hi
    cdef double c, e, score, best_score = -INF
    p = JB_PITCH_MIN
    while p <= JB_PITCH_MAX:
        c = 0.0
        e = 1.0
        i = 0
        while i < 160:
            c += <double>h[ref + i] * h[ref + i - p]
            e += <double>h[ref + i - p] * h[ref + i - p]
            i += 2
        score = c / sqrt(e)
        if score > best_score:
            best_score = score
            best = p
        p += 2
    lo = best - 1 if best > JB_PITCH_MIN else best
    hi = best + 1 if best < JB_PITCH_MAX else best
    best_score = -INF
    for p in range(lo, hi + 1):
        c = 0.0
        e = 1.0
        for i in range(160):
            c += <double>h[ref + i] * h[ref + i - p]
            e += <double>h[ref + i - p] * h[ref + i - p]
        score = c / sqrt(e)
        if score > best_score:
            best_score = score
            best = p
    return best


cdef inline double _template(const jb_t* jb, int periods, int k) noexcept nogil:
    # The last `periods` pitch periods of the frozen history, looped. The last quarter period
    # is overlap-added with the quarter period that precedes the loop so that its end runs
    # smoothly into its start (App. I §I.2.3).
    cdef int length = periods * jb.pitch
    cdef int q = jb.pitch // 4
    cdef double v = jb.phist[JB_HIST - length + k]
    cdef double w
    cdef int i
    if k >= length - q:
        i = k - (length - q)
        w = (i + 1.0) / (q + 1.0)
        v = v * (1.0 - w) + jb.phist[JB_HIST - length - q + i] * w
    return v


cdef double _synth(const jb_t* jb, int t) noexcept nogil:
    # Sample t of the synthetic signal since the loss began (8 kHz units):
    # one period for the first 10 ms, two up to 20 ms, then three (App. I §I.2.4), with a
    # quarter-period cross-fade at each change; full level for 10 ms, then -20 % per 10 ms,
    # reaching silence at 60 ms (§I.2.5).
    cdef int periods, switch_at, q = jb.pitch // 4
    cdef double v, old, gain, w
    if t >= 480:
        return 0.0
    if t < 80:
        periods = 1
        switch_at = 0
    elif t < 160:
        periods = 2
        switch_at = 80
    else:
        periods = 3
        switch_at = 160
    v = _template(jb, periods, t % (periods * jb.pitch))
    if periods > 1 and t - switch_at < q:
        old = _template(jb, periods - 1, t % ((periods - 1) * jb.pitch))
        w = (t - switch_at + 1.0) / (q + 1.0)
        v = old * (1.0 - w) + v * w
    gain = 1.0 if t < 80 else 1.0 - 0.2 * (t - 80) / 80.0
    return v * gain


cdef inline int16_t _clip(double v) noexcept nogil:
    if v > 32767.0:
        return 32767
    if v < -32768.0:
        return -32768
    return <int16_t>(v + 0.5 if v >= 0 else v - 0.5)


cdef int _conceal(jb_t* jb, int16_t* out) noexcept nogil:
    cdef int i, n = jb.frame_samples
    cdef int faded
    if jb.lost_samples == 0:
        memcpy(jb.phist, jb.hist, JB_HIST * sizeof(int16_t))
        jb.pitch = _find_pitch(jb.phist)
    faded = jb.lost_samples >= 480
    for i in range(n):
        out[i] = _clip(_synth(jb, jb.lost_samples + i))
    jb.lost_samples += n
    if jb.lost_samples > 1 << 30:
        jb.lost_samples = 1 << 30
    return JB_SILENCE if faded else JB_CONCEALED


cdef void _prepare_recovery(jb_t* jb) noexcept nogil:
    # App. I §I.2.6: fade from the synthetic signal into the first good frame over a quarter
    # period plus 4 ms per extra 10 ms lost, at most 10 ms.
    cdef int blocks = (jb.lost_samples + 79) // 80
    cdef int n = jb.pitch // 4 + 32 * (blocks - 1 if blocks > 1 else 0)
    cdef int i
    if n > 80:
        n = 80
    if n > jb.frame_samples:
        n = jb.frame_samples
    for i in range(n):
        jb.xfade[i] = _clip(_synth(jb, jb.lost_samples + i))
    jb.xfade_len = n
    jb.lost_samples = 0


cdef int jb_get(jb_t* jb, double now, int16_t* pcm, uint8_t* payload) noexcept nogil:
    cdef int n = jb.frame_samples
    cdef int s, kind, i, touched = 0
    cdef bint present
    cdef double half = 0.5 * n / jb.clock_rate
    cdef double cur, w
    if not jb.playing:
        if not jb.started or now < jb.start_at:
            memset(pcm, 0, n * sizeof(int16_t))
            _push_history(jb, pcm)
            if payload != NULL:
                _encode(jb, pcm, payload)
            jb.stats.silence += 1
            return JB_SILENCE
        jb.playing = 1
    _update_target(jb, now)
    cur = now - <double>jb.play_ts / jb.clock_rate - jb.d_min
    jb.last_delay = cur
    jb.since_adjust += 1
    s = _slot(jb, jb.play_ts)
    present = jb.slot_ts[s] == jb.play_ts
    if cur < jb.target - half or (not present and cur < jb.target and jb.peak > 2 * half):
        # Grow: play a synthetic frame and hold the timeline, so the packet due keeps its
        # slot. Below the band this is how the delay rises; inside it, a missing packet on a
        # jittery path is most likely late rather than lost, and it gets this frame's time
        # (the frame would have been concealed anyway).
        jb.since_adjust = 0
        jb.over_count = 0
        jb.stats.stretched += 1
        kind = _conceal(jb, pcm)
        if kind == JB_CONCEALED:
            jb.stats.concealed += 1
        else:
            jb.stats.silence += 1
        _push_history(jb, pcm)
        if payload != NULL:
            _encode(jb, pcm, payload)
        return kind
    if cur > jb.target + 1.5 * half:
        # the band is 1.25 frames wide, so some whole-frame position always lies inside it
        jb.over_count += 1
        if jb.since_adjust >= 3 and (not present or cur > jb.target + 3 * half
                                     or jb.over_count >= 10):
            # Shrink, at most one frame in three: skip the frame due now. A missing one costs
            # nothing, so a present one goes only when far above the band or after 10 frames.
            jb.since_adjust = 0
            jb.over_count = 0
            jb.stats.dropped += 1
            if present:
                if jb.lost_samples == 0 and jb.xfade_len == 0:
                    _decode(jb, jb.slot_payload + <Py_ssize_t>s * jb.frame_bytes, jb.pcm)
                    memcpy(jb.xfade, jb.pcm, 80 * sizeof(int16_t))
                    jb.xfade_len = 80 if n >= 80 else n
                jb.slot_ts[s] = -1
                jb.count -= 1
            jb.play_ts += n
    else:
        jb.over_count = 0
    s = _slot(jb, jb.play_ts)
    if jb.slot_ts[s] == jb.play_ts:
        _decode(jb, jb.slot_payload + <Py_ssize_t>s * jb.frame_bytes, pcm)
        jb.stats.buffer_time_sum += now - jb.slot_arrival[s]
        if jb.lost_samples:
            _prepare_recovery(jb)
        if jb.xfade_len:
            for i in range(jb.xfade_len):
                w = (i + 1.0) / (jb.xfade_len + 1.0)
                pcm[i] = _clip(jb.xfade[i] * (1.0 - w) + pcm[i] * w)
            jb.xfade_len = 0
            touched = 1
        if payload != NULL:
            if touched:
                _encode(jb, pcm, payload)
            else:
                memcpy(payload, jb.slot_payload + <Py_ssize_t>s * jb.frame_bytes, jb.frame_bytes)
        jb.slot_ts[s] = -1
        jb.count -= 1
        jb.stats.normal += 1
        kind = JB_NORMAL
    else:
        jb.stats.missing += 1
        jb.xfade_len = 0
        kind = _conceal(jb, pcm)
        if kind == JB_CONCEALED:
            jb.stats.concealed += 1
        else:
            jb.stats.silence += 1
        if payload != NULL:
            _encode(jb, pcm, payload)
    jb.play_ts += n
    _push_history(jb, pcm)
    return kind


# ------------------------------------------------------------------ Python wrapper

cdef class JitterCore:
    """Python handle on one jb_t; see media_core.jitter.JitterBuffer."""
    cdef jb_t jb

    def __cinit__(self, int codec, int clock_rate, int frame_samples, int max_packets,
                  double max_delay, double start, double floor, double cap, double margin,
                  double window=1.0):
        if jb_init(&self.jb, codec, clock_rate, frame_samples, max_packets, max_delay, start,
                   floor, cap, margin) < 0 or window <= 0:
            raise ValueError("invalid jitter buffer parameters")
        self.jb.bucket_len = window / JB_BUCKETS

    def __dealloc__(self):
        jb_free(&self.jb)

    def put(self, long long timestamp, const uint8_t[::1] payload, double now) -> int:
        cdef Py_ssize_t n = payload.shape[0]
        cdef uint8_t dummy = 0
        return jb_put(&self.jb, <uint32_t>(timestamp & 0xFFFFFFFF),
                      &payload[0] if n else &dummy, n, now)

    def get(self, double now, int16_t[::1] pcm, uint8_t[::1] payload) -> int:
        if pcm.shape[0] < self.jb.frame_samples or payload.shape[0] < self.jb.frame_bytes:
            raise ValueError("output buffers shorter than one frame")
        return jb_get(&self.jb, now, &pcm[0], &payload[0])

    @property
    def frame_bytes(self) -> int:
        return self.jb.frame_bytes

    @property
    def target(self) -> float:
        return self.jb.target

    @property
    def delay(self) -> float:
        return self.jb.last_delay

    @property
    def buffered(self) -> int:
        return self.jb.count

    @property
    def playing(self) -> bool:
        return bool(self.jb.playing)

    def stats(self) -> dict:
        s = self.jb.stats
        return {
            "received": s.received, "duplicates": s.duplicates, "late": s.late,
            "overflow": s.overflow, "invalid": s.invalid, "resyncs": s.resyncs,
            "normal": s.normal, "missing": s.missing, "concealed": s.concealed,
            "silence": s.silence, "stretched": s.stretched, "dropped": s.dropped,
            "buffer_time_sum": s.buffer_time_sum,
        }
