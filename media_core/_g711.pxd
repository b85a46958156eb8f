# ITU-T G.711 PCM companding: the C-level API shared with the media engine by ``cimport``.
# Bit-exact with G.711 (and with CPython's audioop): mu-law quantises the top 14 bits of a
# 16-bit sample, A-law the top 13 bits. Every function is table driven and needs no GIL.
from libc.stdint cimport int16_t, uint8_t

# One sample.
cdef uint8_t ulaw_enc(int16_t s) noexcept nogil
cdef int16_t ulaw_dec(uint8_t c) noexcept nogil
cdef uint8_t alaw_enc(int16_t s) noexcept nogil
cdef int16_t alaw_dec(uint8_t c) noexcept nogil

# The same under the names of the interface contract.
cdef uint8_t ulaw_enc_sample(int16_t s) noexcept nogil
cdef int16_t ulaw_dec_sample(uint8_t c) noexcept nogil
cdef uint8_t alaw_enc_sample(int16_t s) noexcept nogil
cdef int16_t alaw_dec_sample(uint8_t c) noexcept nogil

# Buffers of n samples / n codes (one code per sample).
cdef void ulaw_enc_buf(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
cdef void ulaw_dec_buf(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil
cdef void alaw_enc_buf(const int16_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
cdef void alaw_dec_buf(const uint8_t* src, int16_t* dst, Py_ssize_t n) noexcept nogil

# Code-to-code transcoding (decode then re-encode, one table lookup per code): legs of one
# bridge that negotiated different laws.
cdef void ulaw_to_alaw_buf(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
cdef void alaw_to_ulaw_buf(const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil
