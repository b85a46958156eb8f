# cython: language_level=3
"""In-band DTMF detection: generalized Goertzel on 8 kHz audio, checked against ITU-T Q.24.

Analysis: Goertzel filters for the 8 frequencies of Q.23 run over sub-blocks of 34 samples;
three consecutive sub-blocks combine (phase-corrected) into the DFT of a 102-sample window
(12.75 ms; the 73 Hz spacing of the low group falls near the first null of its kernel),
evaluated every sub-block (hop 4.25 ms). For the strongest tone of each group:
  - a joint least-squares fit of the two tones removes the leakage of each into the other's
    measurement (up to +-2 dB of twist error for the closest pair, 941/1209 Hz, otherwise);
  - the phase advance of the fitted tones between consecutive windows gives each tone's exact
    frequency offset, which also corrects its level for the window's kernel loss.
A window is valid for a digit when both tones are above the minimum level, within the twist
limits, hold at least 80 % of the window's power, each dominates its group, and both are within
a coarse frequency limit. A digit is reported after ``on_windows`` valid windows in a row (one
odd window tolerated) whose averaged frequency offsets are within ``max_deviation``: 6 windows
need about 32 ms of tone, between the 23 ms that Q.24 rejects and the 40 ms it accepts, and
2.5 % lies between the 1.5 % it accepts and the 3.5 % it rejects. A digit ends after
``off_windows`` windows without it, so a 10 ms drop-out does not repeat it and a 40 ms pause does.
"""
from libc.math cimport M_PI, atan2, cos, fabs, sin, sqrt
from libc.stdint cimport int16_t

import numpy as np

cdef double _FREQ[DTMF_TONES]
cdef double _COEF[DTMF_TONES]        # 2 cos(w): the Goertzel recurrence
cdef double _EW_RE[DTMF_TONES]       # e^{-jw}
cdef double _EW_IM[DTMF_TONES]
cdef double _EOUT_RE[DTMF_TONES]     # e^{-jw(M-1)}: output phase reference at sub-block start
cdef double _EOUT_IM[DTMF_TONES]
cdef double _ROT_RE[DTMF_SUBS][DTMF_TONES]   # e^{-jw i M}: sub-block i inside the window
cdef double _ROT_IM[DTMF_SUBS][DTMF_TONES]
cdef char _DIGITS[4][4]
# Inverse Gram matrices of the least-squares fit of a row tone and a column tone (cos and sin of
# each) over one window, per (row, column) pair: removes the leakage of each tone into the other's
# measurement, which otherwise moves the measured twist by up to +-2 dB for the closest pairs.
cdef double _GINV[4][4][4][4]

_keys = (b"123A", b"456B", b"789C", b"*0#D")     # Q.23 keypad: rows low group, columns high


cdef void _build() noexcept nogil:
    cdef int t, i
    cdef double w
    cdef double freqs[8]
    freqs[0] = 697.0
    freqs[1] = 770.0
    freqs[2] = 852.0
    freqs[3] = 941.0
    freqs[4] = 1209.0
    freqs[5] = 1336.0
    freqs[6] = 1477.0
    freqs[7] = 1633.0
    for t in range(DTMF_TONES):
        _FREQ[t] = freqs[t]
        w = 2.0 * M_PI * freqs[t] / DTMF_RATE
        _COEF[t] = 2.0 * cos(w)
        _EW_RE[t] = cos(w)
        _EW_IM[t] = -sin(w)
        _EOUT_RE[t] = cos(w * (DTMF_SUB - 1))
        _EOUT_IM[t] = -sin(w * (DTMF_SUB - 1))
        for i in range(DTMF_SUBS):
            _ROT_RE[i][t] = cos(w * i * DTMF_SUB)
            _ROT_IM[i][t] = -sin(w * i * DTMF_SUB)


_build()


def _build_gram() -> None:
    n = np.arange(DTMF_SUB * DTMF_SUBS, dtype=np.float64)
    for r in range(4):
        for c in range(4):
            wr = 2.0 * np.pi * _FREQ[r] / DTMF_RATE
            wc = 2.0 * np.pi * _FREQ[4 + c] / DTMF_RATE
            basis = np.array([np.cos(wr * n), np.sin(wr * n), np.cos(wc * n), np.sin(wc * n)])
            ginv = np.linalg.inv(basis @ basis.T)
            for i in range(4):
                for j in range(4):
                    _GINV[r][c][i][j] = ginv[i, j]


_build_gram()
for _r in range(4):
    for _c in range(4):
        _DIGITS[_r][_c] = _keys[_r][_c]


cdef inline double _db_to_ratio(double db) noexcept nogil:
    return 10.0 ** (db / 10.0)


cdef void dtmf_init(dtmf_state* st) noexcept nogil:
    # 0 dBm0 is a sine 3.14 dB below the G.711 overload point (G.711 section 4), in int16 units
    # a mean power of 32767^2 / 2 / 10^0.314 = 2.6e8.
    st.cfg.min_tone_power = 2.6e8 * _db_to_ratio(-36.0)
    # Q.24 (North American values): accept 4 dB forward (high group stronger) and 8 dB reverse
    # twist; the limits below leave room for the level error of an off-nominal tone.
    st.cfg.max_fwd_twist = _db_to_ratio(6.0)
    st.cfg.max_rev_twist = _db_to_ratio(11.0)
    st.cfg.min_tone_ratio = 0.8
    st.cfg.min_group_ratio = _db_to_ratio(3.0)
    st.cfg.max_deviation = 0.025
    st.cfg.on_windows = 6
    st.cfg.off_windows = 7
    st.cfg.max_gap_windows = 1
    dtmf_reset(st)


cdef void dtmf_reset(dtmf_state* st) noexcept nogil:
    cdef int t, i
    for t in range(DTMF_TONES):
        st.s1[t] = 0.0
        st.s2[t] = 0.0
        st.win_re[t] = 0.0
        st.win_im[t] = 0.0
        for i in range(DTMF_SUBS):
            st.sub_re[i][t] = 0.0
            st.sub_im[i][t] = 0.0
    for i in range(DTMF_SUBS):
        st.sub_pow[i] = 0.0
    st.sub_power = 0.0
    st.fill = 0
    st.nsub = 0
    st.cand = 0
    st.cand_windows = 0
    st.cand_gap = 0
    st.adv_re[0] = st.adv_re[1] = 0.0
    st.adv_im[0] = st.adv_im[1] = 0.0
    st.current = 0
    st.missing = 0
    st.current_start = 0
    st.samples = 0
    st.pending_head = 0
    st.pending_count = 0
    st.overflow = 0
    st.last_check = DTMF_CHECK_OK


cdef inline void _push(dtmf_state* st, char digit) noexcept nogil:
    if st.pending_count >= DTMF_PENDING:
        st.overflow += 1
        return
    st.pending[(st.pending_head + st.pending_count) % DTMF_PENDING] = digit
    st.pending_count += 1


cdef char dtmf_pop(dtmf_state* st) noexcept nogil:
    cdef char d
    if st.pending_count == 0:
        return 0
    d = st.pending[st.pending_head]
    st.pending_head = (st.pending_head + 1) % DTMF_PENDING
    st.pending_count -= 1
    return d


cdef char dtmf_current(const dtmf_state* st) noexcept nogil:
    return st.current


cdef inline double _deviation(double re, double im, int tone) noexcept nogil:
    # phase advance per hop -> frequency offset, as a fraction of nominal
    return fabs(atan2(im, re)) * DTMF_RATE / (2.0 * M_PI * DTMF_SUB) / _FREQ[tone]


cdef inline double _dirichlet2(double re, double im) noexcept nogil:
    # |D(df)|^2 for a window of W samples, df from the phase advance per hop, limited to 5 %
    # of the lowest tone (about where the coarse frequency check rejects anyway)
    cdef double df = atan2(im, re) * DTMF_RATE / (2.0 * M_PI * DTMF_SUB)
    cdef double x, d
    if df > 35.0:
        df = 35.0
    elif df < -35.0:
        df = -35.0
    x = M_PI * df / DTMF_RATE
    if fabs(x) < 1e-9:
        return 1.0
    d = sin(x * DTMF_SUB * DTMF_SUBS) / (DTMF_SUB * DTMF_SUBS * sin(x))
    return d * d


cdef inline void _fit(int r, int c, const double* re, const double* im, double* out) noexcept nogil:
    # least squares: out = G^-1 p with projections p = (Re X_r, -Im X_r, Re X_c, -Im X_c)
    cdef double proj[4]
    cdef int i, k
    proj[0] = re[r]
    proj[1] = -im[r]
    proj[2] = re[c]
    proj[3] = -im[c]
    for i in range(4):
        out[i] = 0.0
        for k in range(4):
            out[i] += _GINV[r][c - 4][i][k] * proj[k]


cdef void _window(dtmf_state* st) noexcept nogil:
    """Evaluate the window that ends with the sub-block just completed."""
    cdef double re[DTMF_TONES]
    cdef double im[DTMF_TONES]
    cdef double pw[DTMF_TONES]
    cdef double fit[4]
    cdef double prev[4]
    cdef double fadv_re[2]
    cdef double fadv_im[2]
    cdef double p_row, p_col
    cdef double total = 0.0, a_re, a_im, x_re, x_im, scale
    cdef int t, i, k, r = 0, c = 4
    cdef char digit = 0
    cdef bint first = st.nsub <= DTMF_SUBS
    # window DFT: sub-block DFTs re-referenced to the window start (oldest first)
    for t in range(DTMF_TONES):
        re[t] = 0.0
        im[t] = 0.0
    for i in range(DTMF_SUBS):
        k = <int>((st.nsub - DTMF_SUBS + i) % DTMF_SUBS)
        total += st.sub_pow[k]
        for t in range(DTMF_TONES):
            x_re = st.sub_re[k][t]
            x_im = st.sub_im[k][t]
            re[t] += x_re * _ROT_RE[i][t] - x_im * _ROT_IM[i][t]
            im[t] += x_re * _ROT_IM[i][t] + x_im * _ROT_RE[i][t]
    # mean power of a tone of amplitude A filling the window: A^2/2 = 2|X|^2 / W^2
    scale = 2.0 / (<double>(DTMF_SUB * DTMF_SUBS) * (DTMF_SUB * DTMF_SUBS))
    for t in range(DTMF_TONES):
        pw[t] = (re[t] * re[t] + im[t] * im[t]) * scale
    total /= DTMF_SUB * DTMF_SUBS
    for t in range(1, 4):
        if pw[t] > pw[r]:
            r = t
    for t in range(5, 8):
        if pw[t] > pw[c]:
            c = t
    # joint least-squares amplitudes of the two tones, in this window and (for the phase
    # advance) in the previous one
    _fit(r, c, re, im, fit)
    _fit(r, c, st.win_re, st.win_im, prev)
    p_row = 0.5 * (fit[0] * fit[0] + fit[1] * fit[1])
    p_col = 0.5 * (fit[2] * fit[2] + fit[3] * fit[3])
    for i in range(2):
        # phasor a - jb of this window times the conjugate of the previous one, less the
        # nominal advance e^{jwM}
        t = r if i == 0 else c
        a_re = fit[2 * i] * prev[2 * i] + fit[2 * i + 1] * prev[2 * i + 1]
        a_im = -fit[2 * i + 1] * prev[2 * i] + fit[2 * i] * prev[2 * i + 1]
        fadv_re[i] = a_re * _ROT_RE[1][t] - a_im * _ROT_IM[1][t]
        fadv_im[i] = a_re * _ROT_IM[1][t] + a_im * _ROT_RE[1][t]
    for t in range(DTMF_TONES):
        st.win_re[t] = re[t]
        st.win_im[t] = im[t]
    # an off-nominal tone loses power in the window DFT (Dirichlet kernel); undo that with the
    # offset measured from the phase advance, so twist and share are measured on the true levels
    p_row /= _dirichlet2(fadv_re[0], fadv_im[0])
    p_col /= _dirichlet2(fadv_re[1], fadv_im[1])
    st.last_check = DTMF_CHECK_OK
    if first or p_row < st.cfg.min_tone_power or p_col < st.cfg.min_tone_power:
        st.last_check = DTMF_CHECK_LEVEL
    elif p_col > p_row * st.cfg.max_fwd_twist or p_row > p_col * st.cfg.max_rev_twist:
        st.last_check = DTMF_CHECK_TWIST
    elif p_row + p_col < total * st.cfg.min_tone_ratio:
        st.last_check = DTMF_CHECK_RATIO
    else:
        for t in range(4):
            if t != r and pw[t] * st.cfg.min_group_ratio > pw[r]:
                st.last_check = DTMF_CHECK_GROUP
        for t in range(4, 8):
            if t != c and pw[t] * st.cfg.min_group_ratio > pw[c]:
                st.last_check = DTMF_CHECK_GROUP
        # coarse per-window frequency check; the fine one is on the average below
        if st.last_check == DTMF_CHECK_OK and (
                _deviation(fadv_re[0], fadv_im[0], r) > 2.0 * st.cfg.max_deviation
                or _deviation(fadv_re[1], fadv_im[1], c) > 2.0 * st.cfg.max_deviation):
            st.last_check = DTMF_CHECK_FREQUENCY
    if st.last_check == DTMF_CHECK_OK:
        digit = _DIGITS[r][c - 4]
    # the run of the candidate digit survives one odd window (noise, a level dip); a second one
    # in a row ends it
    if digit != 0 and digit == st.cand:
        st.cand_windows += 1
        st.cand_gap = 0
    elif st.cand != 0 and st.cand_gap < st.cfg.max_gap_windows:
        st.cand_gap += 1
    elif digit != 0:
        st.cand = digit
        st.cand_windows = 1
        st.cand_gap = 0
        st.adv_re[0] = st.adv_im[0] = st.adv_re[1] = st.adv_im[1] = 0.0
    else:
        st.cand = 0
        st.cand_windows = 0
        st.cand_gap = 0
    if digit != 0 and digit == st.cand:
        for i in range(2):
            a_re = sqrt(fadv_re[i] * fadv_re[i] + fadv_im[i] * fadv_im[i]) + 1e-30
            st.adv_re[i] += fadv_re[i] / a_re
            st.adv_im[i] += fadv_im[i] / a_re
    if st.current != 0:
        if digit == st.current:
            st.missing = 0
        else:
            st.missing += 1
            if st.missing >= st.cfg.off_windows:
                st.current = 0
                st.missing = 0
    if (st.current == 0 and st.cand != 0 and st.cand_windows >= st.cfg.on_windows
            and st.cand_gap == 0
            and _deviation(st.adv_re[0], st.adv_im[0], r) <= st.cfg.max_deviation
            and _deviation(st.adv_re[1], st.adv_im[1], c) <= st.cfg.max_deviation):
        st.current = st.cand
        st.missing = 0
        st.current_start = st.samples - (st.cand_windows + DTMF_SUBS - 1) * DTMF_SUB
        _push(st, st.current)


cdef char dtmf_feed(dtmf_state* st, const int16_t* samples, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef int t, k
    cdef double x, s, s1_re
    for i in range(n):
        x = samples[i]
        st.sub_power += x * x
        for t in range(DTMF_TONES):
            s = x + _COEF[t] * st.s1[t] - st.s2[t]
            st.s2[t] = st.s1[t]
            st.s1[t] = s
        st.fill += 1
        st.samples += 1
        if st.fill == DTMF_SUB:
            k = <int>(st.nsub % DTMF_SUBS)
            for t in range(DTMF_TONES):
                # X = e^{-jw(M-1)} (s1 - e^{-jw} s2): the DFT term with origin at sub-block start
                s1_re = st.s1[t] - _EW_RE[t] * st.s2[t]
                s = -_EW_IM[t] * st.s2[t]
                st.sub_re[k][t] = s1_re * _EOUT_RE[t] - s * _EOUT_IM[t]
                st.sub_im[k][t] = s1_re * _EOUT_IM[t] + s * _EOUT_RE[t]
                st.s1[t] = 0.0
                st.s2[t] = 0.0
            st.sub_pow[k] = st.sub_power
            st.sub_power = 0.0
            st.fill = 0
            st.nsub += 1
            if st.nsub >= DTMF_SUBS:
                _window(st)
    return dtmf_pop(st)


# ---- Python-level streaming detector (wrapped by media_core.dtmf) ----

cdef class Detector:
    """Streaming detector over 8 kHz int16 samples; see media_core.dtmf.DtmfDetector."""
    cdef dtmf_state st

    def __cinit__(self):
        dtmf_init(&self.st)

    def configure(self, *, min_level_dbm0=None, max_fwd_twist_db=None, max_rev_twist_db=None,
                  max_deviation=None, on_windows=None, off_windows=None, max_gap_windows=None,
                  min_tone_ratio=None, min_group_ratio_db=None):
        if min_level_dbm0 is not None:
            self.st.cfg.min_tone_power = 2.6e8 * _db_to_ratio(min_level_dbm0)
        if max_fwd_twist_db is not None:
            self.st.cfg.max_fwd_twist = _db_to_ratio(max_fwd_twist_db)
        if max_rev_twist_db is not None:
            self.st.cfg.max_rev_twist = _db_to_ratio(max_rev_twist_db)
        if max_deviation is not None:
            self.st.cfg.max_deviation = max_deviation
        if on_windows is not None:
            self.st.cfg.on_windows = on_windows
        if off_windows is not None:
            self.st.cfg.off_windows = off_windows
        if max_gap_windows is not None:
            self.st.cfg.max_gap_windows = max_gap_windows
        if min_tone_ratio is not None:
            self.st.cfg.min_tone_ratio = min_tone_ratio
        if min_group_ratio_db is not None:
            self.st.cfg.min_group_ratio = _db_to_ratio(min_group_ratio_db)

    def feed(self, const int16_t[::1] samples) -> bytes:
        """Digits completed by these samples, in order."""
        cdef Py_ssize_t n = samples.shape[0], done = 0, step
        cdef char d
        out = bytearray()
        while done < n:
            step = min(n - done, 160)
            with nogil:
                d = dtmf_feed(&self.st, &samples[done], step)
            done += step
            while d != 0:
                out.append(<unsigned char>d)
                d = dtmf_pop(&self.st)
        return bytes(out)

    def trace(self, const int16_t[::1] samples) -> list:
        """(check, candidate) after each analysis window of these samples: for diagnostics."""
        cdef Py_ssize_t n = samples.shape[0], done = 0, step
        out = []
        while done < n:
            step = min(n - done, DTMF_SUB - self.st.fill)
            dtmf_feed(&self.st, &samples[done], step)
            done += step
            if self.st.fill == 0 and self.st.nsub >= DTMF_SUBS:
                out.append((self.st.last_check, chr(self.st.cand) if self.st.cand else ""))
        return out

    def reset(self) -> None:
        dtmf_reset(&self.st)

    @property
    def current(self) -> str:
        return chr(self.st.current) if self.st.current else ""

    @property
    def samples(self) -> int:
        return self.st.samples

    @property
    def overflow(self) -> int:
        return self.st.overflow
