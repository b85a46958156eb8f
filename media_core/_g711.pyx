# cython: language_level=3
"""ITU-T G.711 mu-law and A-law, table driven.

The tables are computed once at import from the segment definitions of G.711 (Tables 1 and 2):
mu-law codes the top 14 bits of a 16-bit sample, A-law the top 13, as in G.711 and in CPython's
audioop, so both agree bit for bit on every input.
"""
from libc.stdint cimport int16_t, int32_t, uint8_t, uint16_t
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

import sys

cimport numpy as cnp

cnp.import_array()

cdef bint _LITTLE_ENDIAN = sys.byteorder == "little"

cdef uint8_t _ULAW_ENC[16384]     # index: (s >> 2) & 0x3FFF
cdef uint8_t _ALAW_ENC[8192]      # index: (s >> 3) & 0x1FFF
cdef int16_t _ULAW_DEC[256]
cdef int16_t _ALAW_DEC[256]
cdef uint8_t _ULAW_TO_ALAW[256]
cdef uint8_t _ALAW_TO_ULAW[256]


cdef uint8_t _ulaw_compute(int32_t x) noexcept nogil:
    # G.711 Table 2 (mu-law): x is 14-bit two's complement; bias 33, 8 segments, bits inverted.
    cdef int32_t mask, seg
    if x < 0:
        x = -x
        mask = 0x7F
    else:
        mask = 0xFF
    if x > 8159:
        x = 8159
    x += 33
    seg = 0
    while seg < 8 and x > (0x40 << seg) - 1:
        seg += 1
    if seg >= 8:
        return <uint8_t>(0x7F ^ mask)
    return <uint8_t>(((seg << 4) | ((x >> (seg + 1)) & 0x0F)) ^ mask)


cdef uint8_t _alaw_compute(int32_t x) noexcept nogil:
    # G.711 Table 1 (A-law): x is a 13-bit two's complement value; even bits inverted (0x55).
    cdef int32_t mask, seg, aval
    if x >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        x = -x - 1
    seg = 0
    while seg < 8 and x > (0x20 << seg) - 1:
        seg += 1
    if seg >= 8:
        return <uint8_t>(0x7F ^ mask)
    aval = seg << 4
    if seg < 2:
        aval |= (x >> 1) & 0x0F
    else:
        aval |= (x >> seg) & 0x0F
    return <uint8_t>(aval ^ mask)


cdef int16_t _ulaw_expand(uint8_t code) noexcept nogil:
    cdef int32_t u = (~code) & 0xFF
    cdef int32_t t = (((u & 0x0F) << 3) + 0x84) << ((u & 0x70) >> 4)
    if u & 0x80:
        return <int16_t>(0x84 - t)
    return <int16_t>(t - 0x84)


cdef int16_t _alaw_expand(uint8_t code) noexcept nogil:
    cdef int32_t a = code ^ 0x55
    cdef int32_t t = (a & 0x0F) << 4
    cdef int32_t seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    else:
        t = (t + 0x108) << (seg - 1)
    if a & 0x80:
        return <int16_t>t
    return <int16_t>(-t)


cdef void _build_tables() noexcept nogil:
    cdef int32_t i
    for i in range(16384):
        # the index is the low 14 bits of s >> 2: sign-extend it back
        _ULAW_ENC[i] = _ulaw_compute(i - 16384 if i >= 8192 else i)
    for i in range(8192):
        _ALAW_ENC[i] = _alaw_compute(i - 8192 if i >= 4096 else i)
    for i in range(256):
        _ULAW_DEC[i] = _ulaw_expand(<uint8_t>i)
        _ALAW_DEC[i] = _alaw_expand(<uint8_t>i)
    for i in range(256):
        _ULAW_TO_ALAW[i] = alaw_enc(_ULAW_DEC[i])
        _ALAW_TO_ULAW[i] = ulaw_enc(_ALAW_DEC[i])


_build_tables()


cdef inline void _dec_buf(const int16_t* table, const uint8_t* src, int16_t* dst,
                          Py_ssize_t n) noexcept nogil:
    # four lookups before four stores: a store to dst never stalls the next table load
    cdef Py_ssize_t i = 0
    cdef int16_t a, b, c, d
    while i + 4 <= n:
        a = table[src[i]]
        b = table[src[i + 1]]
        c = table[src[i + 2]]
        d = table[src[i + 3]]
        dst[i] = a
        dst[i + 1] = b
        dst[i + 2] = c
        dst[i + 3] = d
        i += 4
    while i < n:
        dst[i] = table[src[i]]
        i += 1


cdef inline void _enc_buf(const uint8_t* table, int shift, const int16_t* src, uint8_t* dst,
                          Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef uint8_t a, b, c, d
    while i + 4 <= n:
        a = table[(<uint16_t>src[i]) >> shift]
        b = table[(<uint16_t>src[i + 1]) >> shift]
        c = table[(<uint16_t>src[i + 2]) >> shift]
        d = table[(<uint16_t>src[i + 3]) >> shift]
        dst[i] = a
        dst[i + 1] = b
        dst[i + 2] = c
        dst[i + 3] = d
        i += 4
    while i < n:
        dst[i] = table[(<uint16_t>src[i]) >> shift]
        i += 1


cdef uint8_t ulaw_enc(int16_t s) noexcept nogil:
    return _ULAW_ENC[(<uint16_t>s) >> 2]


cdef int16_t ulaw_dec(uint8_t c) noexcept nogil:
    return _ULAW_DEC[c]


cdef uint8_t alaw_enc(int16_t s) noexcept nogil:
    return _ALAW_ENC[(<uint16_t>s) >> 3]


cdef int16_t alaw_dec(uint8_t c) noexcept nogil:
    return _ALAW_DEC[c]


cdef uint8_t ulaw_enc_sample(int16_t s) noexcept nogil:
    return _ULAW_ENC[(<uint16_t>s) >> 2]


cdef int16_t ulaw_dec_sample(uint8_t c) noexcept nogil:
    return _ULAW_DEC[c]


cdef uint8_t alaw_enc_sample(int16_t s) noexcept nogil:
    return _ALAW_ENC[(<uint16_t>s) >> 3]


cdef int16_t alaw_dec_sample(uint8_t c) noexcept nogil:
    return _ALAW_DEC[c]


cdef void ulaw_enc_buf(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    _enc_buf(_ULAW_ENC, 2, src, dst, n)


cdef void ulaw_dec_buf(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil:
    _dec_buf(_ULAW_DEC, src, dst, n)


cdef void alaw_enc_buf(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    _enc_buf(_ALAW_ENC, 3, src, dst, n)


cdef void alaw_dec_buf(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil:
    _dec_buf(_ALAW_DEC, src, dst, n)


cdef void ulaw_to_alaw_buf(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _ULAW_TO_ALAW[src[i]]


cdef void alaw_to_ulaw_buf(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = _ALAW_TO_ULAW[src[i]]


# ---- Python-level entry points (wrapped by media_core.g711) ----


def encode(samples, bint alaw) -> bytes:
    """Encode int16 samples (contiguous numpy int16, or bytes of int16 little-endian) to codes."""
    cdef const int16_t[::1] view
    cdef const int16_t* src
    cdef Py_ssize_t n
    if type(samples) is bytes and _LITTLE_ENDIAN:
        # the per-frame path: no buffer protocol, no numpy
        n = PyBytes_GET_SIZE(samples)
        if n & 1:
            raise ValueError(f"16-bit PCM needs an even number of bytes, got {n}")
        n >>= 1
        src = <const int16_t*>PyBytes_AS_STRING(samples)
    else:
        view = samples
        n = view.shape[0]
        src = &view[0] if n else NULL
    if n == 0:
        return b""
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    with nogil:
        if alaw:
            alaw_enc_buf(src, dst, n)
        else:
            ulaw_enc_buf(src, dst, n)
    return out


def decode(codes, bint alaw):
    """Decode G.711 codes (bytes or a uint8 buffer) to a new int16 numpy array."""
    cdef const uint8_t[::1] view
    cdef const uint8_t* src
    cdef Py_ssize_t n
    cdef cnp.npy_intp dims[1]
    if type(codes) is bytes:
        n = PyBytes_GET_SIZE(codes)
        src = <const uint8_t*>PyBytes_AS_STRING(codes)
    else:
        view = codes
        n = view.shape[0]
        src = &view[0] if n else NULL
    dims[0] = n
    out = cnp.PyArray_SimpleNew(1, dims, cnp.NPY_INT16)
    cdef int16_t* dst = <int16_t*>cnp.PyArray_DATA(out)
    if n:
        with nogil:
            if alaw:
                alaw_dec_buf(src, dst, n)
            else:
                ulaw_dec_buf(src, dst, n)
    return out


def transcode(const uint8_t[::1] codes, bint to_alaw) -> bytes:
    """Convert mu-law codes to A-law (``to_alaw``) or A-law codes to mu-law."""
    cdef Py_ssize_t n = codes.shape[0]
    if n == 0:
        return b""
    out = PyBytes_FromStringAndSize(NULL, n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    with nogil:
        if to_alaw:
            ulaw_to_alaw_buf(&codes[0], dst, n)
        else:
            alaw_to_ulaw_buf(&codes[0], dst, n)
    return out
