"""Voice quality: the ITU-T G.107 E-model (transmission rating R) and MOS.

``r_factor``/``mos`` rate a G.711 call from what RTP/RTCP can measure: packet loss, its burst
ratio and the one-way mouth-to-ear delay. Every other parameter keeps its G.107 default
(Table 1), which gives Ro = 94.77, Is = 1.41 and R = 93.2 for a perfect short call.
The equipment impairment of G.711 comes from ITU-T G.113 Appendix I: Ie = 0, packet-loss
robustness Bpl = 25.1 with packet-loss concealment and 4.3 without.
Section numbers below are those of G.107 clause 7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["EModel", "G711_BPL_NO_PLC", "G711_BPL_PLC", "G711_IE", "mos", "mos_from_r", "r_factor"]

G711_IE = 0.0
G711_BPL_PLC = 25.1
G711_BPL_NO_PLC = 4.3


@dataclass(frozen=True)
class EModel:
    """G.107 input parameters; defaults are G.107 Table 1 (delays in ms, levels in dB)."""

    slr: float = 8.0          # send loudness rating
    rlr: float = 2.0          # receive loudness rating
    stmr: float = 15.0        # sidetone masking rating
    lstr: float = 18.0        # listener sidetone rating
    ds: float = 3.0           # D-value of telephone, send side
    dr: float = 3.0           # D-value of telephone, receive side
    telr: float = 65.0        # talker echo loudness rating
    wepl: float = 110.0       # weighted echo path loss
    t: float = 0.0            # mean one-way delay of the echo path
    tr: float = 0.0           # round-trip delay in a 4-wire loop
    ta: float = 0.0           # absolute (mouth-to-ear) delay
    qdu: float = 1.0          # number of quantization distortion units
    ie: float = 0.0           # equipment impairment factor
    bpl: float = 1.0          # packet-loss robustness factor
    ppl: float = 0.0          # random packet-loss probability, percent
    burst_r: float = 1.0      # burst ratio
    nc: float = -70.0         # circuit noise referred to the 0 dBr point, dBm0p
    nfor: float = -64.0       # noise floor at the receive side, dBmp
    ps: float = 35.0          # room noise at the send side, dB(A)
    pr: float = 35.0          # room noise at the receive side, dB(A)
    a: float = 0.0            # advantage factor

    # §7.2: basic signal-to-noise ratio Ro
    def noise(self) -> float:
        """No: total noise power, dBm0p."""
        olr = self.slr + self.rlr
        nos = self.ps - self.slr - self.ds - 100 + 0.004 * (self.ps - olr - self.ds - 14) ** 2
        pre = self.pr + 10 * math.log10(1 + 10 ** ((10 - self.lstr) / 10))
        nor = self.rlr - 121 + pre + 0.008 * (pre - 35) ** 2
        nfo = self.nfor + self.rlr
        return 10 * math.log10(
            10 ** (self.nc / 10) + 10 ** (nos / 10) + 10 ** (nor / 10) + 10 ** (nfo / 10)
        )

    def ro(self) -> float:
        """Ro = 15 - 1.5 (SLR + No)."""
        return 15 - 1.5 * (self.slr + self.noise())

    # §7.3: simultaneous impairment factor Is
    def _stmro(self) -> float:
        return -10 * math.log10(
            10 ** (-self.stmr / 10) + math.exp(-self.t / 4) * 10 ** (-self.telr / 10)
        )

    def _ist(self) -> float:
        s = self._stmro()
        return (
            12 * (1 + ((s - 13) / 6) ** 8) ** (1 / 8)
            - 28 * (1 + ((s + 1) / 19.4) ** 35) ** (1 / 35)
            - 13 * (1 + ((s - 3) / 33) ** 13) ** (1 / 13)
            + 29
        )

    def is_(self) -> float:
        """Is = Iolr + Ist + Iq."""
        olr = self.slr + self.rlr
        xolr = olr + 0.2 * (64 + self.noise() - self.rlr)
        iolr = 20 * ((1 + (xolr / 8) ** 8) ** (1 / 8) - xolr / 8)
        q = 37 - 15 * math.log10(self.qdu)
        g = 1.07 + 0.258 * q + 0.0602 * q**2
        y = (self.ro() - 100) / 15 + 46 / 8.4 - g / 9
        z = 46 / 30 - g / 40
        iq = 15 * math.log10(1 + 10**y + 10**z)
        return iolr + self._ist() + iq

    # §7.4: delay impairment factor Id
    def idte(self) -> float:
        """Talker echo impairment."""
        no = self.noise()
        roe = -1.5 * (no - self.rlr)
        terv = (
            self.telr
            - 40 * math.log10((1 + self.t / 10) / (1 + self.t / 150))
            + 6 * math.exp(-0.3 * self.t**2)
        )
        if self.stmr < 9:
            terv += self._ist() / 2
        re = 80 + 2.5 * (terv - 14)
        return ((roe - re) / 2 + math.sqrt((roe - re) ** 2 / 4 + 100) - 1) * (1 - math.exp(-self.t))

    def idle(self) -> float:
        """Listener echo impairment."""
        rle = 10.5 * (self.wepl + 7) * (self.tr + 1) ** -0.25
        ro = self.ro()
        return (ro - rle) / 2 + math.sqrt((ro - rle) ** 2 / 4 + 169)

    def idd(self) -> float:
        """Impairment of a too-long absolute delay Ta: none up to 100 ms."""
        if self.ta <= 100:
            return 0.0
        x = math.log10(self.ta / 100) / math.log10(2)
        return 25 * ((1 + x**6) ** (1 / 6) - 3 * (1 + (x / 3) ** 6) ** (1 / 6) + 2)

    def id(self) -> float:
        """Id = Idte + Idle + Idd."""
        return self.idte() + self.idle() + self.idd()

    # §7.5: effective equipment impairment factor
    def ie_eff(self) -> float:
        """Ie,eff = Ie + (95 - Ie) Ppl / (Ppl / BurstR + Bpl)."""
        return self.ie + (95 - self.ie) * self.ppl / (self.ppl / self.burst_r + self.bpl)

    def r(self) -> float:
        """R = Ro - Is - Id - Ie,eff + A."""
        return self.ro() - self.is_() - self.id() - self.ie_eff() + self.a


def mos_from_r(r: float) -> float:
    """G.107 Annex B: estimated conversational MOS (MOS_CQE) from R, in [1, 4.5]."""
    if r <= 0:
        return 1.0
    if r >= 100:
        return 4.5
    return max(1.0, 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6)


def _g711_call(loss_pct: float, delay_ms: float, plc: bool, burst_ratio: float) -> EModel:
    if not 0 <= loss_pct <= 100:
        raise ValueError(f"loss_pct={loss_pct}: a percentage between 0 and 100")
    if not 0 <= delay_ms < 60_000:
        raise ValueError(f"delay_ms={delay_ms}: a one-way delay of 0 ms to 60 s")
    if not burst_ratio > 0:
        raise ValueError(f"burst_ratio={burst_ratio}: must be positive (1 = random loss)")
    # one-way delay Ta; with no other knowledge the echo paths follow it (T = Ta, Tr = 2 Ta)
    return EModel(
        t=delay_ms,
        tr=2 * delay_ms,
        ta=delay_ms,
        ie=G711_IE,
        bpl=G711_BPL_PLC if plc else G711_BPL_NO_PLC,
        ppl=loss_pct,
        burst_r=burst_ratio,
    )


def r_factor(
    loss_pct: float, delay_ms: float, plc: bool = True, burst_ratio: float = 1.0
) -> float:
    """G.107 transmission rating R of a G.711 call with this packet loss (percent), one-way
    mouth-to-ear delay (ms), concealment and burst ratio; other parameters at their defaults."""
    return _g711_call(loss_pct, delay_ms, plc, burst_ratio).r()


def mos(loss_pct: float, delay_ms: float, plc: bool = True, burst_ratio: float = 1.0) -> float:
    """Estimated MOS (G.107 Annex B) of a G.711 call; see ``r_factor``."""
    return mos_from_r(r_factor(loss_pct, delay_ms, plc, burst_ratio))
