"""The G.107 E-model against a step-by-step transcription of the recommendation's formulas and
its published anchor points (G.107 §7; G.113 Appendix I for G.711's Ie and Bpl)."""

from __future__ import annotations

import math

import pytest

from media_core import quality


def reference_r(ppl: float, ta: float, bpl: float, burst_r: float) -> dict[str, float]:
    """G.107 §7 with Table 1 defaults, written out flat, one equation per line; T = Ta and
    Tr = 2 Ta. Returns every intermediate value."""
    slr, rlr, stmr, lstr, ds = 8.0, 2.0, 15.0, 18.0, 3.0
    telr, wepl, qdu, ie, a = 65.0, 110.0, 1.0, 0.0, 0.0
    nc, nfor, ps, pr = -70.0, -64.0, 35.0, 35.0
    t, tr = ta, 2 * ta
    v: dict[str, float] = {}
    # §7.2 basic signal-to-noise ratio
    olr = slr + rlr
    nos = ps - slr - ds - 100 + 0.004 * (ps - olr - ds - 14) ** 2
    pre = pr + 10 * math.log10(1 + 10 ** ((10 - lstr) / 10))
    nor = rlr - 121 + pre + 0.008 * (pre - 35) ** 2
    nfo = nfor + rlr
    no = 10 * math.log10(10 ** (nc / 10) + 10 ** (nos / 10) + 10 ** (nor / 10) + 10 ** (nfo / 10))
    v["Ro"] = ro = 15 - 1.5 * (slr + no)
    # §7.3 simultaneous impairments
    xolr = olr + 0.2 * (64 + no - rlr)
    iolr = 20 * ((1 + (xolr / 8) ** 8) ** (1 / 8) - xolr / 8)
    stmro = -10 * math.log10(10 ** (-stmr / 10) + math.exp(-t / 4) * 10 ** (-telr / 10))
    ist = (
        12 * (1 + ((stmro - 13) / 6) ** 8) ** (1 / 8)
        - 28 * (1 + ((stmro + 1) / 19.4) ** 35) ** (1 / 35)
        - 13 * (1 + ((stmro - 3) / 33) ** 13) ** (1 / 13)
        + 29
    )
    q = 37 - 15 * math.log10(qdu)
    g = 1.07 + 0.258 * q + 0.0602 * q * q
    y = (ro - 100) / 15 + 46 / 8.4 - g / 9
    z = 46 / 30 - g / 40
    iq = 15 * math.log10(1 + 10**y + 10**z)
    v["Is"] = iolr + ist + iq
    # §7.4 delay impairments: talker echo, listener echo, absolute delay
    roe = -1.5 * (no - rlr)
    terv = telr - 40 * math.log10((1 + t / 10) / (1 + t / 150)) + 6 * math.exp(-0.3 * t * t)
    re = 80 + 2.5 * (terv - 14)
    v["Idte"] = ((roe - re) / 2 + math.sqrt((roe - re) ** 2 / 4 + 100) - 1) * (1 - math.exp(-t))
    rle = 10.5 * (wepl + 7) * (tr + 1) ** -0.25
    v["Idle"] = (ro - rle) / 2 + math.sqrt((ro - rle) ** 2 / 4 + 169)
    if ta <= 100:
        v["Idd"] = 0.0
    else:
        x = math.log10(ta / 100) / math.log10(2)
        v["Idd"] = 25 * ((1 + x**6) ** (1 / 6) - 3 * (1 + (x / 3) ** 6) ** (1 / 6) + 2)
    # §7.5 effective equipment impairment
    v["Ie_eff"] = ie + (95 - ie) * ppl / (ppl / burst_r + bpl)
    v["R"] = v["Ro"] - v["Is"] - (v["Idte"] + v["Idle"] + v["Idd"]) - v["Ie_eff"] + a
    return v


def reference_mos(r: float) -> float:
    # G.107 Annex B
    if r < 0:
        return 1.0
    if r > 100:
        return 4.5
    return 1 + 0.035 * r + r * (r - 60) * (100 - r) * 7e-6


def test_default_parameters_give_the_published_values() -> None:
    # G.107: the default values of its Table 1 give Ro = 94.77, Is = 1.41 and R = 93.2
    model = quality.EModel()
    assert model.ro() == pytest.approx(94.77, abs=0.005)
    assert model.is_() == pytest.approx(1.41, abs=0.005)
    assert model.r() == pytest.approx(93.2, abs=0.05)
    assert quality.r_factor(0, 0) == pytest.approx(93.2, abs=0.05)
    assert quality.mos(0, 0) == pytest.approx(4.41, abs=0.005)
    ref = reference_r(0, 0, 25.1, 1.0)
    assert ref["Ro"] == pytest.approx(94.77, abs=0.005)
    assert ref["Is"] == pytest.approx(1.41, abs=0.005)


def test_mos_mapping_anchor_points() -> None:
    assert quality.mos_from_r(93.2) == pytest.approx(4.41, abs=0.005)
    assert quality.mos_from_r(80) == pytest.approx(1 + 2.8 + 80 * 20 * 20 * 7e-6)
    assert quality.mos_from_r(50) == pytest.approx(2.575)
    assert quality.mos_from_r(100) == 4.5
    assert quality.mos_from_r(120) == 4.5
    assert quality.mos_from_r(0) == 1.0
    assert quality.mos_from_r(-10) == 1.0
    for r in range(1, 100):
        assert quality.mos_from_r(r) == pytest.approx(max(1.0, reference_mos(r)))


def test_component_anchor_points() -> None:
    # Idd at Ta = 200 ms: X = 1, 25 * (2^(1/6) - 3 (1 + 3^-6)^(1/6) + 2)
    assert quality.EModel(ta=200).idd() == pytest.approx(3.0444, abs=1e-4)
    assert quality.EModel(ta=100).idd() == 0.0
    # G.711 with PLC (Bpl 25.1), 2 % random loss: Ie,eff = 95 * 2 / 27.1
    assert quality.EModel(ppl=2, bpl=25.1).ie_eff() == pytest.approx(7.0111, abs=1e-4)
    # the same loss in bursts (BurstR 2) hurts more: 95 * 2 / (1 + 25.1)
    assert quality.EModel(ppl=2, bpl=25.1, burst_r=2).ie_eff() == pytest.approx(7.2797, abs=1e-4)


@pytest.mark.parametrize(
    ("loss", "delay", "plc", "burst"),
    [
        (0.0, 0.0, True, 1.0),
        (0.0, 20.0, True, 1.0),
        (1.0, 80.0, True, 1.0),
        (2.0, 150.0, True, 1.0),
        (2.0, 150.0, False, 1.0),
        (5.0, 200.0, True, 1.5),
        (10.0, 300.0, True, 2.0),
        (3.0, 400.0, False, 1.0),
        (0.5, 600.0, True, 3.0),
    ],
)
def test_r_and_mos_match_the_step_by_step_reference(loss, delay, plc, burst) -> None:
    ref = reference_r(loss, delay, 25.1 if plc else 4.3, burst)
    model = quality.EModel(t=delay, tr=2 * delay, ta=delay, bpl=25.1 if plc else 4.3,
                           ppl=loss, burst_r=burst)
    assert model.idte() == pytest.approx(ref["Idte"], abs=1e-9)
    assert model.idle() == pytest.approx(ref["Idle"], abs=1e-9)
    assert model.idd() == pytest.approx(ref["Idd"], abs=1e-9)
    assert model.ie_eff() == pytest.approx(ref["Ie_eff"], abs=1e-9)
    assert quality.r_factor(loss, delay, plc, burst) == pytest.approx(ref["R"], abs=1e-9)
    assert quality.mos(loss, delay, plc, burst) == pytest.approx(
        max(1.0, reference_mos(ref["R"])), abs=1e-9
    )


def test_quality_falls_with_loss_delay_and_burstiness() -> None:
    assert quality.mos(1, 50) > quality.mos(3, 50) > quality.mos(10, 50)
    assert quality.mos(1, 50) > quality.mos(1, 200) > quality.mos(1, 400)
    assert quality.mos(2, 50, plc=True) > quality.mos(2, 50, plc=False)
    assert quality.mos(2, 50, burst_ratio=1.0) > quality.mos(2, 50, burst_ratio=3.0)
    assert 1.0 <= quality.mos(100, 5000, plc=False) <= 1.5


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="loss_pct"):
        quality.mos(-1, 0)
    with pytest.raises(ValueError, match="loss_pct"):
        quality.r_factor(101, 0)
    with pytest.raises(ValueError, match="delay_ms"):
        quality.mos(1, -5)
    with pytest.raises(ValueError, match="burst_ratio"):
        quality.mos(1, 10, burst_ratio=0)
