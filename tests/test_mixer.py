"""N-party mixing: saturation to int16, conference "all but self", gain; against int64 numpy."""

from __future__ import annotations

import numpy as np
import pytest

from media_core import mixer


def reference_mix(frames: np.ndarray) -> np.ndarray:
    return np.clip(frames.astype(np.int64).sum(axis=0), -32768, 32767).astype(np.int16)


def test_mix_matches_wide_sum_then_clip() -> None:
    rng = np.random.default_rng(7)
    for parties in (1, 2, 3, 5, 16):
        frames = rng.integers(-32768, 32768, size=(parties, 160), dtype=np.int16)
        assert np.array_equal(mixer.mix(frames), reference_mix(frames))
        assert np.array_equal(mixer.mix(list(frames)), reference_mix(frames))


def test_saturation_at_both_ends_and_no_wraparound() -> None:
    loud = np.full(160, 30000, dtype=np.int16)
    out = mixer.mix([loud, loud])
    assert (out == 32767).all()
    assert (mixer.mix([-loud, -loud]) == -32768).all()
    # the order of parties never matters: clipping happens once, on the total
    a, b, c = loud, loud, np.full(160, -30000, dtype=np.int16)
    assert (mixer.mix([a, b, c]) == 30000).all()
    assert (mixer.mix([c, a, b]) == 30000).all()


def test_mix_all_but_self() -> None:
    rng = np.random.default_rng(8)
    frames = rng.integers(-20000, 20000, size=(4, 160), dtype=np.int16)
    heard = mixer.mix_all_but_self(frames)
    assert len(heard) == 4
    for i in range(4):
        others = np.delete(frames, i, axis=0)
        assert np.array_equal(heard[i], reference_mix(others))
    # a party that talks alone hears silence, the others hear it
    quiet = np.zeros((3, 160), dtype=np.int16)
    quiet[1] = 1000
    heard = mixer.mix_all_but_self(quiet)
    assert not heard[1].any()
    assert (heard[0] == 1000).all() and (heard[2] == 1000).all()


def test_gain() -> None:
    frame = np.array([1000, -1000, 20000, -20000, 0], dtype=np.int16)
    assert list(mixer.gain(frame, 0.0)) == list(frame)
    assert list(mixer.gain(frame, 6.0206)) == [2000, -2000, 32767, -32768, 0]
    assert list(mixer.gain(frame, -6.0206)) == [500, -500, 10000, -10000, 0]


def test_bad_input_is_a_clear_error() -> None:
    f = np.zeros(160, dtype=np.int16)
    with pytest.raises(ValueError, match="differ in length"):
        mixer.mix([f, np.zeros(80, dtype=np.int16)])
    with pytest.raises(TypeError, match="int16"):
        mixer.mix([f, np.zeros(160, dtype=np.float32)])
    with pytest.raises(ValueError, match="no frames"):
        mixer.mix([])
    with pytest.raises(ValueError, match="at most"):
        mixer.mix([f] * (mixer.MAX_PARTIES + 1))
    with pytest.raises(ValueError, match="gain"):
        mixer.gain(f, 40.0)
