# N-party mixing of 16-bit linear frames with saturation: the C-level API shared with the media
# engine by ``cimport``. Sums are kept in 32 bits and clipped to int16 once, at the end, so the
# order of the parties never changes the result. No function needs the GIL.
from libc.stdint cimport int16_t, int32_t


cdef inline int16_t sat16(int32_t v) noexcept nogil:
    """Clip a 32-bit sum to the int16 range."""
    if v > 32767:
        return 32767
    if v < -32768:
        return -32768
    return <int16_t>v


# dst[i] = sat(a[i] + b[i]); dst may be a or b.
cdef void mix_add_sat(int16_t* dst, const int16_t* a, const int16_t* b, Py_ssize_t n) noexcept nogil
# acc[i] = 0
cdef void mix_clear(int32_t* acc, Py_ssize_t n) noexcept nogil
# acc[i] += src[i]
cdef void mix_accumulate(int32_t* acc, const int16_t* src, Py_ssize_t n) noexcept nogil
# dst[i] = sat(acc[i])
cdef void mix_saturate(int16_t* dst, const int32_t* acc, Py_ssize_t n) noexcept nogil
# dst[i] = sat(acc[i] - own[i]): what one conference party hears ("all but self"); own may be NULL.
cdef void mix_minus(int16_t* dst, const int32_t* acc, const int16_t* own, Py_ssize_t n) noexcept nogil
# dst[i] = sat(src[i] * gain_q12 / 4096): a gain in Q12 fixed point (4096 = 0 dB).
cdef void mix_gain(int16_t* dst, const int16_t* src, int32_t gain_q12, Py_ssize_t n) noexcept nogil
