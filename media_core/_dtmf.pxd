# In-band DTMF detection (ITU-T Q.23 frequencies, Q.24 acceptance limits): the C-level API shared
# with the media engine by ``cimport``. One ``dtmf_state`` per 8 kHz stream; no function needs the
# GIL and the state holds no Python object, so it can live inside the engine's own structs.
from libc.stdint cimport int16_t

cdef enum:
    DTMF_RATE = 8000
    DTMF_SUB = 34           # samples per sub-block: the analysis hop (4.25 ms)
    DTMF_SUBS = 3           # sub-blocks per analysis window (102 samples, 12.75 ms)
    DTMF_TONES = 8          # 4 row (low group) + 4 column (high group) frequencies
    DTMF_PENDING = 16       # digits detected but not yet taken by the caller

cdef enum:
    DTMF_CHECK_OK = 0
    DTMF_CHECK_LEVEL = 1
    DTMF_CHECK_TWIST = 2
    DTMF_CHECK_RATIO = 3
    DTMF_CHECK_GROUP = 4
    DTMF_CHECK_FREQUENCY = 5

ctypedef struct dtmf_config:
    double min_tone_power   # mean power of the weaker tone, in (int16 units)^2
    double max_fwd_twist    # high group above low group, as a power ratio
    double max_rev_twist    # low group above high group, as a power ratio
    double min_tone_ratio   # share of the window's power held by the two tones
    double min_group_ratio  # strongest tone over the next one of its group, power ratio
    double max_deviation    # accepted frequency deviation, fraction of nominal
    int on_windows          # consecutive valid windows before a digit is reported
    int off_windows         # consecutive windows without it before the digit is over
    int max_gap_windows     # odd windows a candidate's run may contain (not in a row)

ctypedef struct dtmf_state:
    dtmf_config cfg
    # Goertzel recurrences of the sub-block being filled
    double s1[DTMF_TONES]
    double s2[DTMF_TONES]
    double sub_power        # sum of squares of the sub-block being filled
    int fill                # samples in the sub-block being filled
    # last DTMF_SUBS sub-block results, ring indexed by nsub % DTMF_SUBS
    double sub_re[DTMF_SUBS][DTMF_TONES]
    double sub_im[DTMF_SUBS][DTMF_TONES]
    double sub_pow[DTMF_SUBS]
    long long nsub          # sub-blocks completed
    # previous window's DFT (for the frequency estimate from the phase advance)
    double win_re[DTMF_TONES]
    double win_im[DTMF_TONES]
    # candidate digit and its accumulated phase advance (row, column)
    char cand
    int cand_windows
    int cand_gap             # odd windows in a row inside the candidate's run
    double adv_re[2]
    double adv_im[2]
    # digit being held (already reported) and the windows since it was last seen
    char current
    int missing
    long long current_start  # sample index where the current digit's run began
    long long samples        # samples fed so far
    # detected digits waiting for the caller
    char pending[DTMF_PENDING]
    int pending_head
    int pending_count
    int overflow             # digits dropped because pending was full
    int last_check           # why the last window was not valid (DTMF_CHECK_*), for diagnostics

# Default limits (Q.24 with margins); the state is usable after this.
cdef void dtmf_init(dtmf_state* st) noexcept nogil
# Forget the signal but keep the configuration.
cdef void dtmf_reset(dtmf_state* st) noexcept nogil
# Analyse n samples; returns a newly detected digit (b'0'..b'9', b'*', b'#', b'A'..b'D') or 0.
# Digits are returned in order, one per call: a call that completes two digits keeps the second,
# and the next call (even with n == 0) returns it.
cdef char dtmf_feed(dtmf_state* st, const int16_t* samples, Py_ssize_t n) noexcept nogil
# Next waiting digit or 0, without feeding samples.
cdef char dtmf_pop(dtmf_state* st) noexcept nogil
# The digit whose tone is on right now (reported already), or 0.
cdef char dtmf_current(const dtmf_state* st) noexcept nogil
