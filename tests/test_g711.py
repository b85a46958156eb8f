"""G.711 mu-law / A-law against CPython's audioop (same algorithm as ITU-T G.711) on every
16-bit input and every code."""

import warnings

import numpy as np
import pytest

from media_core import g711

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop  # the reference: deprecated, still in the standard library on 3.11

ALL_SAMPLES = np.arange(-32768, 32768, dtype=np.int16)
ALL_CODES = bytes(range(256))


@pytest.mark.parametrize(
    ("encode", "reference"),
    [(g711.ulaw_encode, audioop.lin2ulaw), (g711.alaw_encode, audioop.lin2alaw)],
    ids=["ulaw", "alaw"],
)
def test_encode_every_sample_matches_audioop(encode, reference) -> None:
    expected = reference(ALL_SAMPLES.tobytes(), 2)
    assert encode(ALL_SAMPLES) == expected
    # the same through the bytes (int16 little-endian) input path
    assert encode(ALL_SAMPLES.astype("<i2").tobytes()) == expected


@pytest.mark.parametrize(
    ("decode", "reference"),
    [(g711.ulaw_decode, audioop.ulaw2lin), (g711.alaw_decode, audioop.alaw2lin)],
    ids=["ulaw", "alaw"],
)
def test_decode_every_code_matches_audioop(decode, reference) -> None:
    out = decode(ALL_CODES)
    assert out.dtype == np.int16
    assert out.shape == (256,)
    assert out.astype("<i2").tobytes() == reference(ALL_CODES, 2)
    # numpy uint8 input gives the same
    assert np.array_equal(decode(np.frombuffer(ALL_CODES, dtype=np.uint8)), out)


def test_g711_anchor_codes() -> None:
    # G.711 Tables 1 and 2: zero, full scale and the sign bit of each law.
    z = np.array([0, 32767, -32768], dtype=np.int16)
    assert g711.ulaw_encode(z) == bytes([0xFF, 0x80, 0x00])
    assert g711.alaw_encode(z) == bytes([0xD5, 0xAA, 0x2A])
    assert list(g711.ulaw_decode(bytes([0xFF, 0x7F, 0x80, 0x00]))) == [0, 0, 32124, -32124]
    assert list(g711.alaw_decode(bytes([0xD5, 0x55, 0xAA, 0x2A]))) == [8, -8, 32256, -32256]


@pytest.mark.parametrize("law", ["ulaw", "alaw"])
def test_decode_then_encode_is_identity_on_codes(law) -> None:
    enc = getattr(g711, f"{law}_encode")
    dec = getattr(g711, f"{law}_decode")
    codes = enc(dec(ALL_CODES))
    expected = ALL_CODES
    if law == "ulaw":
        # mu-law has two zeros (0x7F = -0, 0xFF = +0); both decode to 0 which encodes as 0xFF
        expected = bytes(0xFF if c == 0x7F else c for c in ALL_CODES)
    assert codes == expected


def test_transcoding_matches_decode_then_encode() -> None:
    assert g711.ulaw_to_alaw(ALL_CODES) == audioop.lin2alaw(audioop.ulaw2lin(ALL_CODES, 2), 2)
    assert g711.alaw_to_ulaw(ALL_CODES) == audioop.lin2ulaw(audioop.alaw2lin(ALL_CODES, 2), 2)


def test_non_contiguous_and_empty_inputs() -> None:
    strided = ALL_SAMPLES[::7]
    assert g711.ulaw_encode(strided) == audioop.lin2ulaw(strided.tobytes(), 2)
    assert g711.ulaw_encode(b"") == b""
    assert g711.alaw_decode(b"").shape == (0,)


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="int16"):
        g711.ulaw_encode(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="even number of bytes"):
        g711.alaw_encode(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="one-dimensional"):
        g711.ulaw_encode(np.zeros((2, 2), dtype=np.int16))
    with pytest.raises(TypeError, match="codes must be"):
        g711.ulaw_decode("abc")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="samples must be"):
        g711.ulaw_encode([1, 2, 3])  # type: ignore[arg-type]
