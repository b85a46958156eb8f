"""Erlang B/C/A against independent computations: exact rational closed forms, published table
values, and a direct numerical solution of the Erlang A birth–death chain."""

from __future__ import annotations

import csv
import math
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from appliance.reporting.erlang import (
    StaffingError,
    erlang_a_figures,
    erlang_b,
    erlang_c,
    erlang_c_figures,
    offered_traffic,
    required_agents,
    scheduled_agents,
)

# --------------------------------------------------------------------------------------------
# Erlang B and C against the closed forms with factorials, in exact rational arithmetic.


def exact_erlang_b(a: Fraction, n: int) -> Fraction:
    terms = [a**k / math.factorial(k) for k in range(n + 1)]
    return terms[n] / sum(terms)


def exact_erlang_c(a: Fraction, n: int) -> Fraction:
    top = a**n / math.factorial(n) * Fraction(n) / (n - a)
    return top / (sum(a**k / math.factorial(k) for k in range(n)) + top)


CASES = [(Fraction(10), n) for n in range(11, 25)] + [
    (Fraction(37, 4), 10), (Fraction(1, 3), 1), (Fraction(1, 3), 2), (Fraction(55), 60),
    (Fraction(55), 70), (Fraction(2), 3), (Fraction(123, 10), 15),
]


@pytest.mark.parametrize(("a", "n"), CASES)
def test_erlang_b_and_c_match_the_factorial_closed_forms(a: Fraction, n: int) -> None:
    assert erlang_b(float(a), n) == pytest.approx(float(exact_erlang_b(a, n)), rel=1e-12)
    assert erlang_c(float(a), n) == pytest.approx(float(exact_erlang_c(a, n)), rel=1e-12)


@pytest.mark.parametrize(("a", "n"), CASES)
def test_service_level_and_asa_follow_from_the_exact_erlang_c(a: Fraction, n: int) -> None:
    aht, threshold = 180.0, 20.0
    c = float(exact_erlang_c(a, n))
    fig = erlang_c_figures(float(a), n, aht, threshold)
    assert fig.prob_wait == pytest.approx(c, abs=1e-9)
    assert fig.service_level == pytest.approx(
        1 - c * math.exp(-(n - float(a)) * threshold / aht), abs=1e-9)
    assert fig.asa == pytest.approx(c * aht / (n - float(a)), rel=1e-9)
    assert fig.occupancy == pytest.approx(float(a) / n, rel=1e-12)


def test_large_traffic_is_stable_and_matches_a_log_space_closed_form() -> None:
    # 5,000 Erlangs: A^N/N! overflows a float by thousands of orders of magnitude.
    a, n = 5000.0, 5100
    logs = [k * math.log(a) - math.lgamma(k + 1) for k in range(n + 1)]
    top = max(logs)
    total = sum(math.exp(v - top) for v in logs)
    b = math.exp(logs[n] - top) / total
    assert erlang_b(a, n) == pytest.approx(b, rel=1e-9)
    c = n * b / (n - a * (1 - b))
    assert erlang_c(a, n) == pytest.approx(c, rel=1e-9)
    assert 0 < erlang_c(a, n) < 1


def test_the_classic_100_calls_per_half_hour_example() -> None:
    """100 calls in 30 minutes, AHT 3 minutes, 80 % answered within 20 s: the published answer
    is 14 agents with P(wait) 17.41 %, service level 88.8 %, ASA 7.8 s, occupancy 71.4 %;
    13 agents give 79.6 %, just short of the target."""
    assert offered_traffic(100, 180, 1800) == pytest.approx(10.0)
    plan = required_agents(100, 180, 1800, service_level=0.8, threshold=20)
    assert plan.agents == 14
    assert plan.prob_wait == pytest.approx(0.1741, abs=5e-5)
    assert plan.service_level == pytest.approx(0.888, abs=5e-4)
    assert plan.asa == pytest.approx(7.8, abs=0.05)
    assert plan.occupancy == pytest.approx(0.714, abs=5e-4)
    thirteen = erlang_c_figures(10.0, 13, 180, 20)
    assert thirteen.service_level == pytest.approx(0.7956, abs=5e-5)
    assert thirteen.prob_wait == pytest.approx(0.2853, abs=5e-5)


def test_staffing_is_the_smallest_meeting_every_target() -> None:
    for calls, aht, sl, threshold, asa in [(100, 180, 0.8, 20, None), (100, 180, 0.8, 20, 5.0),
                                           (350, 240, 0.9, 15, None), (7, 600, 0.95, 30, 10.0)]:
        plan = required_agents(calls, aht, 1800, service_level=sl, threshold=threshold, asa=asa)
        a = calls * aht / 1800
        below = erlang_c_figures(a, plan.agents - 1, aht, threshold)
        assert plan.service_level >= sl and (asa is None or plan.asa <= asa)
        assert below.service_level < sl or (asa is not None and below.asa > asa)
    # An ASA target stricter than the service level needs more agents: 14 agents give an ASA
    # of 7.8 s, 15 give 3.7 s, 16 give 1.7 s.
    assert required_agents(100, 180, 1800, asa=5.0).agents == 15
    assert required_agents(100, 180, 1800, asa=3.0).agents == 16


def test_shrinkage_and_occupancy_cap() -> None:
    plan = required_agents(100, 180, 1800, shrinkage=0.3)
    assert (plan.agents, plan.scheduled) == (14, 20)
    assert scheduled_agents(14, 0.35) == 22  # 14 / 0.65 = 21.5
    capped = required_agents(100, 180, 1800, max_occupancy=0.6)
    assert capped.agents == 17 and capped.occupancy <= 0.6


def test_zero_calls_need_no_agents() -> None:
    plan = required_agents(0, 180, 1800)
    assert plan.agents == 0 and plan.scheduled == 0 and plan.service_level == 1.0


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"calls": -1, "aht": 180, "interval": 1800}, "calls"),
    ({"calls": 10, "aht": 0, "interval": 1800}, "aht"),
    ({"calls": 10, "aht": 180, "interval": 0}, "interval"),
    ({"calls": 10, "aht": 180, "interval": 1800, "service_level": 1.5}, "service_level"),
    ({"calls": 10, "aht": 180, "interval": 1800, "service_level": 1.0}, "service_level"),
    ({"calls": 10, "aht": 180, "interval": 1800, "threshold": -1}, "threshold"),
    ({"calls": 10, "aht": 180, "interval": 1800, "asa": 0}, "asa"),
    ({"calls": 10, "aht": 180, "interval": 1800, "shrinkage": 1.0}, "shrinkage"),
    ({"calls": 10, "aht": 180, "interval": 1800, "patience": -3}, "patience"),
    ({"calls": 1e12, "aht": 180, "interval": 1800}, "traffic"),
])
def test_bad_input_names_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(StaffingError, match=name):
        required_agents(**kwargs)


# --------------------------------------------------------------------------------------------
# Erlang A against the birth–death chain, solved numerically and truncated far out.


def chain_solution(traffic: float, agents: int, aht: float, threshold: float,
                   patience: float, extra: int = 600) -> dict[str, float]:
    mu, theta = 1 / aht, 1 / patience
    lam = traffic * mu
    size = agents + extra
    death = np.array([min(n, agents) * mu + max(n - agents, 0) * theta for n in range(size + 1)])
    pi = np.empty(size + 1)
    pi[0] = 1.0
    for n in range(1, size + 1):  # detailed balance of the birth–death chain
        pi[n] = pi[n - 1] * lam / death[n]
    pi /= pi.sum()
    queue = np.maximum(np.arange(size + 1) - agents, 0)
    prob_abandon = theta * float(pi @ queue) / lam
    # A tagged caller (PASTA) with k callers ahead: k drops at rate N·μ + k·θ, the caller
    # abandons at rate θ, and is answered when k = 0 and the head is taken (rate N·μ).
    ahead = np.arange(extra + 1)
    down = agents * mu + ahead * theta
    rate = down + theta
    # First-step analysis: p_k = P(answered), m_k = E[wait; answered].
    p = np.empty(extra + 1)
    m = np.empty(extra + 1)
    for k in range(extra + 1):
        q = down[k] / rate[k]
        prev_p, prev_m = (1.0, 0.0) if k == 0 else (p[k - 1], m[k - 1])
        p[k] = q * prev_p
        m[k] = q * (prev_p / rate[k] + prev_m)
    waiting = pi[agents:]
    # Uniformization of the tagged chain up to the threshold.
    big = float(rate.max())
    steps = int(big * threshold + 12 * math.sqrt(big * threshold) + 60)
    served_by = np.zeros(extra + 1)
    abandoned_by = np.zeros(extra + 1)
    w_served = np.zeros(extra + 1)
    w_aband = np.zeros(extra + 1)
    log_weight = -big * threshold
    for step in range(steps + 1):
        if step:
            log_weight += math.log(big * threshold) - math.log(step)
            shifted_s = np.concatenate(([1.0], w_served[:-1]))
            shifted_a = np.concatenate(([0.0], w_aband[:-1]))
            w_served = (1 - rate / big) * w_served + down / big * shifted_s
            w_aband = (1 - rate / big) * w_aband + down / big * shifted_a + theta / big
        weight = math.exp(log_weight)
        served_by += weight * w_served
        abandoned_by += weight * w_aband
    answered_within = float(pi[:agents].sum() + waiting @ served_by)
    abandoned_within = float(waiting @ abandoned_by)
    return {
        "prob_wait": float(waiting.sum()),
        "prob_abandon": prob_abandon,
        "prob_abandon_first_step": float(waiting @ (1 - p)),
        "average_wait": float(pi @ queue) / lam,
        "asa": float(waiting @ m) / (1 - prob_abandon),
        "service_level": answered_within,
        "service_level_excluding_abandons": answered_within / (1 - abandoned_within),
    }


@pytest.mark.parametrize(("traffic", "agents", "aht", "threshold", "patience"), [
    (10.0, 12, 180.0, 20.0, 120.0),
    (10.0, 8, 180.0, 20.0, 120.0),     # overloaded: ρ > 1, only abandonment keeps it stable
    (10.0, 14, 180.0, 20.0, 600.0),
    (3.5, 4, 300.0, 30.0, 60.0),
    (25.0, 27, 240.0, 15.0, 200.0),
])
def test_erlang_a_matches_the_birth_death_chain(traffic: float, agents: int, aht: float,
                                                threshold: float, patience: float) -> None:
    chain = chain_solution(traffic, agents, aht, threshold, patience)
    assert chain["prob_abandon"] == pytest.approx(chain["prob_abandon_first_step"], rel=1e-9)
    fig = erlang_a_figures(traffic, agents, aht, threshold, patience)
    for name in ("prob_wait", "prob_abandon", "average_wait", "asa", "service_level",
                 "service_level_excluding_abandons"):
        assert getattr(fig, name) == pytest.approx(chain[name], rel=1e-6, abs=1e-9), name


def test_erlang_a_tends_to_erlang_c_when_callers_never_give_up() -> None:
    a = erlang_a_figures(10.0, 14, 180.0, 20.0, patience=1e9)
    c = erlang_c_figures(10.0, 14, 180.0, 20.0)
    assert a.prob_abandon < 1e-6
    assert a.prob_wait == pytest.approx(c.prob_wait, rel=1e-5)
    assert a.service_level == pytest.approx(c.service_level, rel=1e-5)
    assert a.asa == pytest.approx(c.asa, rel=1e-4)


def test_erlang_a_staffing_is_minimal_and_needs_fewer_agents_than_erlang_c() -> None:
    plan = required_agents(100, 180, 1800, service_level=0.8, threshold=20, patience=120)
    assert plan.erlang_a is not None
    below = erlang_a_figures(10.0, plan.agents - 1, 180, 20, 120)
    assert plan.erlang_a.service_level >= 0.8 > below.service_level
    assert plan.agents <= 14


def test_erlang_a_heavily_overloaded_matches_the_chain() -> None:
    # λ/θ = 400 is far beyond N·μ/θ = 50: A(x, y) comes from the complete gamma function there.
    chain = chain_solution(40.0, 5, 180.0, 20.0, 1800.0, extra=1500)
    fig = erlang_a_figures(40.0, 5, 180.0, 20.0, 1800.0)
    for name in ("prob_wait", "prob_abandon", "average_wait", "asa", "service_level"):
        assert getattr(fig, name) == pytest.approx(chain[name], rel=1e-6, abs=1e-9), name
    assert fig.prob_abandon == pytest.approx(1 - 5 / 40, rel=0.02)  # fluid limit 1 − 1/ρ


def test_an_occupancy_cap_that_needs_absurd_staffing_is_refused_quickly() -> None:
    # 5,000 Erlangs at 1e-9 occupancy would need 5e12 agents: a clear error, not a hang.
    with pytest.raises(StaffingError, match="max_occupancy"):
        required_agents(5000, 1, 1, max_occupancy=1e-9)
    with pytest.raises(StaffingError, match="max_occupancy"):
        required_agents(5000, 1, 1, max_occupancy=1e-9, patience=60)


# --------------------------------------------------------------------------------------------
# Published values (tests/vectors/erlang_published.csv; sources in erlang_published.md). Rows
# printed with 6 or more decimals are checked to 1e-6; shorter ones to half a unit of their last
# printed digit. Tables that print the traffic a group carries at a target (B or C, as in ITU-T
# E.520 dimensioning) are checked by bracketing: B and C grow with the traffic, so the target must
# lie between the model's value half a printed unit below and half a unit above the printed A.
# Rows noted "disagrees: exact value X" are misprints in their source: exact rational arithmetic
# must reject the printed value and accept X.

PUBLISHED = Path(__file__).parent / "vectors" / "erlang_published.csv"
KINDS = ("erlang_c", "service_level", "asa", "traffic_for_blocking", "traffic_for_wait")


def published_rows() -> list[dict[str, str]]:
    with PUBLISHED.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for number, row in enumerate(rows, start=2):
        if row["kind"] not in KINDS or not (row["source"] or "").strip() or row["note"] is None:
            raise ValueError(f"{PUBLISHED.name} line {number}: bad kind, no source or no note "
                             f"column: {row}")
    return rows


def _tolerance(row: dict[str, str]) -> float:
    decimals = int(row["decimals"])
    return 1e-6 if decimals >= 6 else 0.5 * 10.0**-decimals


def published_error(row: dict[str, str], published: float) -> float:
    """How far the model is from ``published`` for this row, in units of the row's tolerance
    (at most 1 passes)."""
    agents, tol = int(row["agents"]), _tolerance(row)
    kind = row["kind"]
    if kind in ("erlang_c", "service_level", "asa"):
        traffic = float(row["traffic"])
        if kind == "erlang_c":
            model = erlang_c(traffic, agents)
        elif kind == "asa":  # seconds
            model = erlang_c_figures(traffic, agents, float(row["aht_s"]), 0.0).asa
        else:
            model = erlang_c_figures(traffic, agents, float(row["aht_s"]),
                                     float(row["threshold_s"])).service_level
        return abs(model - published) / tol
    func = erlang_b if kind == "traffic_for_blocking" else erlang_c
    target = float(row["target"])
    # The 1e-12 absorbs the binary representation of a printed boundary such as 0.05.
    low = func(max(published - tol - 1e-12, 0.0), agents)
    high = func(published + tol + 1e-12, agents)
    return 0.0 if low <= target <= high else math.inf


def test_published_table_has_every_kind_and_enough_rows() -> None:
    rows = published_rows()
    assert len(rows) >= 200
    assert {row["kind"] for row in rows} >= {"erlang_c", "service_level", "asa",
                                             "traffic_for_blocking", "traffic_for_wait"}
    assert sum(int(row["decimals"]) >= 6 for row in rows) >= 18


def _row_id(row: dict[str, str]) -> str:
    return (f"{row['kind']}-A{row['traffic'] or row['published']}-N{row['agents']}"
            f"-{row['target'] or row['threshold_s']}")


def _misprint(row: dict[str, str]) -> bool:
    return row["note"].startswith("disagrees")


@pytest.mark.parametrize("row", [r for r in published_rows() if not _misprint(r)], ids=_row_id)
def test_erlang_matches_the_published_value(row: dict[str, str]) -> None:
    assert published_error(row, float(row["published"])) <= 1.0, row["source"]


def _exact_bracket(row: dict[str, str], printed: str) -> bool:
    """Whether the Erlang B target lies between exact B at the printed traffic ± half a unit."""
    half = Fraction(1, 2 * 10 ** int(row["decimals"]))
    agents, target = int(row["agents"]), Fraction(row["target"])
    return (exact_erlang_b(Fraction(printed) - half, agents) <= target
            <= exact_erlang_b(Fraction(printed) + half, agents))


@pytest.mark.parametrize("row", [r for r in published_rows() if _misprint(r)], ids=_row_id)
def test_a_misprinted_table_value_is_rejected_and_the_exact_value_accepted(
        row: dict[str, str]) -> None:
    assert row["kind"] == "traffic_for_blocking"
    exact = row["note"].split("exact value ")[1].split()[0]
    assert not _exact_bracket(row, row["published"])
    assert _exact_bracket(row, exact)
    assert published_error(row, float(row["published"])) > 1.0
    assert published_error(row, float(exact)) <= 1.0


def test_the_published_check_rejects_a_value_two_printed_units_off() -> None:
    # The comparison is sharp: moving any printed value by two units of its last digit (or by
    # 2e-6 for long values) makes it fail, so a drift in erlang.py of that size cannot pass.
    for row in (r for r in published_rows() if not _misprint(r)):
        value = float(row["published"])
        step = 2e-6 if int(row["decimals"]) >= 6 else 2 * 10.0**-int(row["decimals"])
        assert published_error(row, value + step) > 1.0, row
        if value - step >= 0:
            assert published_error(row, value - step) > 1.0, row


def test_a_published_row_without_a_source_is_refused(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "erlang_published.csv"
    bad.write_text("kind,traffic,agents,target,published,decimals,aht_s,threshold_s,source,note\n"
                   "erlang_c,10,14,,0.174132,6,,,,\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PUBLISHED", bad)
    with pytest.raises(ValueError, match="line 2"):
        published_rows()
