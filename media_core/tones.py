"""Call-progress tones: dial, ringback, busy and congestion, per country.

Frequencies and cadences follow the national values collected in ITU-T E.180 Supplement 2
("Various tones used in national networks"). A tone is a sum of sine components ("350+440")
or one carrier amplitude-modulated by a low frequency ("400*25"), switched by a cadence of
on/off times in milliseconds that repeats (an empty cadence is continuous).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = ["COUNTRIES", "KINDS", "ToneGenerator", "ToneSpec", "render", "tone_spec"]

RATE = 8000
FRAME = 160                       # 20 ms at 8 kHz
MODULATION_DEPTH = 0.85           # "f*m" tones: depth of the amplitude modulation
# 0 dBm0: the sine 3.14 dB below the G.711 overload point (G.711 §4), in int16 units
DBM0_AMPLITUDE = 32767 * 10 ** (-3.14 / 20)
MAX_RENDER_SECONDS = 600


@dataclass(frozen=True)
class ToneSpec:
    """One call-progress tone of one country."""

    frequencies: tuple[float, ...]
    """Sine components in Hz (summed), or the carrier when ``modulation_hz`` is set."""
    modulation_hz: float | None
    """Amplitude-modulation frequency in Hz ("400*25"), or None."""
    cadence_ms: tuple[int, ...]
    """Alternating on/off durations in ms, repeated; () for a continuous tone."""

    @classmethod
    def parse(cls, freqs: str, cadence: tuple[int, ...] = ()) -> ToneSpec:
        """From E.180 notation: "350+440" (sum) or "400*25" (modulated)."""
        if "*" in freqs:
            carrier, mod = freqs.split("*")
            return cls((float(carrier),), float(mod), cadence)
        return cls(tuple(float(f) for f in freqs.split("+")), None, cadence)

    @property
    def period_ms(self) -> int:
        """Length of one cadence cycle (0 for a continuous tone)."""
        return sum(self.cadence_ms)


_C = ToneSpec.parse
# country -> kind -> spec (ITU-T E.180 Suppl. 2; ISO 3166 alpha-2 country codes)
_TABLE: dict[str, dict[str, ToneSpec]] = {
    "us": {
        "dial": _C("350+440"),
        "ringback": _C("440+480", (2000, 4000)),
        "busy": _C("480+620", (500, 500)),
        "congestion": _C("480+620", (250, 250)),
    },
    "ca": {
        "dial": _C("350+440"),
        "ringback": _C("440+480", (2000, 4000)),
        "busy": _C("480+620", (500, 500)),
        "congestion": _C("480+620", (250, 250)),
    },
    "uk": {
        "dial": _C("350+440"),
        "ringback": _C("400+450", (400, 200, 400, 2000)),
        "busy": _C("400", (375, 375)),
        "congestion": _C("400", (400, 350, 225, 525)),
    },
    "de": {
        "dial": _C("425"),
        "ringback": _C("425", (1000, 4000)),
        "busy": _C("425", (480, 480)),
        "congestion": _C("425", (240, 240)),
    },
    "fr": {
        "dial": _C("440"),
        "ringback": _C("440", (1500, 3500)),
        "busy": _C("440", (500, 500)),
        "congestion": _C("440", (250, 250)),
    },
    "it": {
        "dial": _C("425", (200, 200, 600, 1000)),
        "ringback": _C("425", (1000, 4000)),
        "busy": _C("425", (500, 500)),
        "congestion": _C("425", (200, 200)),
    },
    "es": {
        "dial": _C("425"),
        "ringback": _C("425", (1500, 3000)),
        "busy": _C("425", (200, 200)),
        "congestion": _C("425", (200, 200, 200, 200, 200, 600)),
    },
    "nl": {
        "dial": _C("425"),
        "ringback": _C("425", (1000, 4000)),
        "busy": _C("425", (500, 500)),
        "congestion": _C("425", (250, 250)),
    },
    "in": {
        "dial": _C("400*25"),
        "ringback": _C("400*25", (400, 200, 400, 2000)),
        "busy": _C("400", (750, 750)),
        "congestion": _C("400", (250, 250)),
    },
    "au": {
        "dial": _C("425*25"),
        "ringback": _C("400*17", (400, 200, 400, 2000)),
        "busy": _C("425", (375, 375)),
        "congestion": _C("425", (375, 375)),
    },
    "jp": {
        "dial": _C("400"),
        "ringback": _C("400*16", (1000, 2000)),
        "busy": _C("400", (500, 500)),
        "congestion": _C("400", (500, 500)),
    },
    "br": {
        "dial": _C("425"),
        "ringback": _C("425", (1000, 4000)),
        "busy": _C("425", (250, 250)),
        "congestion": _C("425", (250, 250, 750, 250)),
    },
}

COUNTRIES = tuple(sorted(_TABLE))
KINDS = ("dial", "ringback", "busy", "congestion")


def tone_spec(country: str, kind: str) -> ToneSpec:
    """The spec of a tone; ValueError names the known countries/kinds."""
    table = _TABLE.get(country.lower())
    if table is None:
        raise ValueError(f"unknown country {country!r}; known: {', '.join(COUNTRIES)}")
    if kind not in table:
        raise ValueError(f"unknown tone {kind!r}; known: {', '.join(KINDS)}")
    return table[kind]


class ToneGenerator:
    """Endless 8 kHz samples of one tone, phase-continuous across reads."""

    def __init__(self, country: str, kind: str, level_dbm0: float = -13.0) -> None:
        if not -60.0 <= level_dbm0 <= 0.0:
            raise ValueError(f"level {level_dbm0} dBm0 outside -60..0 dBm0")
        self.spec = tone_spec(country, kind)
        # each component gets an equal share of the power level (E.180 gives tone levels as
        # the total; -13 dBm0 is typical)
        n = len(self.spec.frequencies)
        self._amplitude = DBM0_AMPLITUDE * 10 ** (level_dbm0 / 20) / np.sqrt(n)
        if self.spec.modulation_hz is not None:
            # mean power of (1 + d cos) sin is (1 + d^2/2) / 2: keep the level the same
            self._amplitude /= np.sqrt(1 + MODULATION_DEPTH**2 / 2)
        self._position = 0          # samples produced so far
        self._gate = self._build_gate()

    def _build_gate(self) -> npt.NDArray[np.float64]:
        if not self.spec.cadence_ms:
            return np.ones(1)
        gate = [
            np.full(ms * RATE // 1000, 1.0 if i % 2 == 0 else 0.0)
            for i, ms in enumerate(self.spec.cadence_ms)
        ]
        return np.concatenate(gate)

    def read(self, n: int) -> npt.NDArray[np.int16]:
        """The next n samples."""
        if not 0 <= n <= MAX_RENDER_SECONDS * RATE:
            raise ValueError(f"n={n} samples outside 0..{MAX_RENDER_SECONDS * RATE}")
        t = (self._position + np.arange(n)) / RATE
        x = np.zeros(n)
        for f in self.spec.frequencies:
            x += np.sin(2 * np.pi * f * t)
        if self.spec.modulation_hz is not None:
            x *= 1 + MODULATION_DEPTH * np.cos(2 * np.pi * self.spec.modulation_hz * t)
        x *= self._amplitude * self._gate[(self._position + np.arange(n)) % len(self._gate)]
        self._position += n
        return np.clip(np.rint(x), -32768, 32767).astype(np.int16)

    def frames(self) -> Iterator[npt.NDArray[np.int16]]:
        """Endless 20 ms frames."""
        while True:
            yield self.read(FRAME)


def render(country: str, kind: str, seconds: float, level_dbm0: float = -13.0) -> npt.NDArray[np.int16]:
    """The first ``seconds`` of a tone, as 8 kHz int16 samples."""
    return ToneGenerator(country, kind, level_dbm0).read(round(seconds * RATE))
