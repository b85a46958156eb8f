# cython: language_level=3
"""Saturating N-party mixing of 16-bit frames (see _mixer.pxd for the C-level API)."""
from libc.stdint cimport int16_t, int32_t, int64_t
from libc.stdlib cimport free, malloc

import numpy as np


cdef void mix_add_sat(int16_t* dst, const int16_t* a, const int16_t* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = sat16(<int32_t>a[i] + <int32_t>b[i])


cdef void mix_clear(int32_t* acc, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] = 0


cdef void mix_accumulate(int32_t* acc, const int16_t* src, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        acc[i] += src[i]


cdef void mix_saturate(int16_t* dst, const int32_t* acc, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = sat16(acc[i])


cdef void mix_minus(int16_t* dst, const int32_t* acc, const int16_t* own, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if own == NULL:
        mix_saturate(dst, acc, n)
        return
    for i in range(n):
        dst[i] = sat16(acc[i] - own[i])


cdef void mix_gain(int16_t* dst, const int16_t* src, int32_t gain_q12, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    cdef int64_t v
    for i in range(n):
        v = (<int64_t>src[i] * gain_q12) >> 12
        if v > 32767:
            v = 32767
        elif v < -32768:
            v = -32768
        dst[i] = <int16_t>v


# ---- Python-level entry points (wrapped by media_core.mixer) ----

def mix(int16_t[:, ::1] frames):
    """Saturated sum of the rows of a (parties, samples) int16 array."""
    cdef Py_ssize_t parties = frames.shape[0], n = frames.shape[1], p
    out = np.zeros(n, dtype=np.int16)
    cdef int16_t[::1] dst = out
    cdef int32_t* acc
    if n == 0:
        return out
    acc = <int32_t*>malloc(n * sizeof(int32_t))
    if acc == NULL:
        raise MemoryError()
    with nogil:
        mix_clear(acc, n)
        for p in range(parties):
            mix_accumulate(acc, &frames[p, 0], n)
        mix_saturate(&dst[0], acc, n)
    free(acc)
    return out


def mix_all_but_self(int16_t[:, ::1] frames):
    """For each party (row), the saturated sum of every other row: what that party hears."""
    cdef Py_ssize_t parties = frames.shape[0], n = frames.shape[1], p
    out = np.zeros((parties, n), dtype=np.int16)
    cdef int16_t[:, ::1] dst = out
    cdef int32_t* acc
    if n == 0 or parties == 0:
        return out
    acc = <int32_t*>malloc(n * sizeof(int32_t))
    if acc == NULL:
        raise MemoryError()
    with nogil:
        mix_clear(acc, n)
        for p in range(parties):
            mix_accumulate(acc, &frames[p, 0], n)
        for p in range(parties):
            mix_minus(&dst[p, 0], acc, &frames[p, 0], n)
    free(acc)
    return out


def gain(int16_t[::1] frame, int32_t gain_q12):
    """The frame scaled by gain_q12 / 4096, saturated."""
    cdef Py_ssize_t n = frame.shape[0]
    out = np.empty(n, dtype=np.int16)
    cdef int16_t[::1] dst = out
    if n:
        with nogil:
            mix_gain(&dst[0], &frame[0], gain_q12, n)
    return out
