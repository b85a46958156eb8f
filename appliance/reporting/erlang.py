"""Queueing models for staffing: Erlang B, Erlang C (M/M/N) and Erlang A (M/M/N+M).

Traffic is offered load in Erlangs, ``A = calls × AHT / interval``. Every function works with
floats only and never forms ``A**N`` or ``N!``: Erlang B comes from its recursion

    B(0) = 1,   B(n) = A·B(n−1) / (n + A·B(n−1))

which stays in [0, 1] for any ``A`` and ``N`` (ITU-T E.501 / Jagerman 1974), and Erlang C and
Erlang A are written in terms of B.

Erlang A (Palm 1946; Garnett, Mandelbaum & Reiman 2002, "Designing a call center with impatient
customers") adds exponential caller patience with mean ``patience`` seconds. With
``x = N·μ/θ`` and ``y = λ/θ`` (μ = 1/AHT, θ = 1/patience) and

    A(x, y) = Σ_{k≥0} y^k / ((x+1)(x+2)…(x+k))

it gives P(wait > 0) = A·B / (1 + (A−1)·B), P(abandon | wait > 0) = 1/(ρ·A) + 1 − 1/ρ with
ρ = λ/(N·μ), and the offered wait V (the wait a caller would have with infinite patience)
P(V > t) = P(V > 0) · γ(x, y·e^{−θt}) / γ(x, y), γ the lower incomplete gamma function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Largest offered load accepted, in Erlangs; the searches below are linear in the agents.
MAX_TRAFFIC = 100_000.0
#: Panels of the Simpson rule used for the Erlang A integrals over the threshold.
_SIMPSON_PANELS = 2000


class StaffingError(ValueError):
    """The staffing question has no answer (bad input, or a target no staffing can meet);
    the message names the parameter."""


# --------------------------------------------------------------------------------------------
# Erlang B and C


def erlang_b(traffic: float, agents: int) -> float:
    """Blocking probability of an M/M/N/N system (Erlang B) with ``traffic`` Erlangs."""
    _check_traffic(traffic)
    if agents < 0:
        raise StaffingError(f"agents must be 0 or more, got {agents}")
    blocking = 1.0
    for n in range(1, agents + 1):
        blocking = traffic * blocking / (n + traffic * blocking)
    return blocking


def erlang_c(traffic: float, agents: int) -> float:
    """Probability that a caller waits in an M/M/N queue (Erlang C); 1 when ``agents`` cannot
    carry the traffic (the queue grows without bound)."""
    _check_traffic(traffic)
    if agents <= traffic:
        return 1.0
    return _c_from_b(traffic, agents, erlang_b(traffic, agents))


def _c_from_b(traffic: float, agents: int, blocking: float) -> float:
    # C = N·B / (N − A·(1 − B)), exact identity between Erlang B and C for N > A.
    return agents * blocking / (agents - traffic * (1.0 - blocking))


@dataclass(frozen=True)
class ErlangC:
    """What an M/M/N queue (no abandonment) gives with a number of agents."""

    agents: int
    """Agents answering calls (on the phones, after shrinkage)."""
    traffic: float
    """Offered load in Erlangs."""
    prob_wait: float
    """Share of callers who wait at all (Erlang C)."""
    service_level: float
    """Share of callers answered within the threshold."""
    asa: float
    """Average speed of answer over all callers, seconds (inf when the queue is unstable)."""
    occupancy: float
    """Share of the agents' time spent handling calls (traffic / agents, at most 1)."""


def erlang_c_figures(traffic: float, agents: int, aht: float, threshold: float) -> ErlangC:
    """Service level, ASA and occupancy of ``agents`` agents for ``traffic`` Erlangs, with an
    average handle time ``aht`` and a service-level ``threshold`` (both seconds)."""
    _check_traffic(traffic)
    _check_positive("aht", aht)
    if threshold < 0:
        raise StaffingError(f"threshold must be 0 or more seconds, got {threshold}")
    return _figures(traffic, agents, aht, threshold, erlang_b(traffic, agents))


def _figures(traffic: float, agents: int, aht: float, threshold: float,
             blocking: float) -> ErlangC:
    if agents <= traffic:
        return ErlangC(agents, traffic, 1.0, 0.0, math.inf, 1.0 if agents else 0.0)
    prob_wait = _c_from_b(traffic, agents, blocking)
    # Waiting time of M/M/N: P(W > t) = C·exp(−(N − A)·t / AHT).
    service_level = 1.0 - prob_wait * math.exp(-(agents - traffic) * threshold / aht)
    asa = prob_wait * aht / (agents - traffic)
    return ErlangC(agents, traffic, prob_wait, service_level, asa, traffic / agents)


# --------------------------------------------------------------------------------------------
# Erlang A


@dataclass(frozen=True)
class ErlangA:
    """What an M/M/N+M queue (callers abandon after an exponential patience) gives."""

    agents: int
    """Agents answering calls."""
    traffic: float
    """Offered load in Erlangs."""
    prob_wait: float
    """Share of callers who find every agent busy."""
    prob_abandon: float
    """Share of callers who hang up before an agent answers."""
    service_level: float
    """Callers answered within the threshold, over all callers."""
    service_level_excluding_abandons: float
    """Callers answered within the threshold, over all callers but those who abandoned
    within the threshold."""
    asa: float
    """Average wait of the answered callers, seconds."""
    average_wait: float
    """Average time in queue over all callers (answered or not), seconds."""
    occupancy: float
    """Share of the agents' time spent handling calls: carried load / agents."""


def erlang_a_figures(traffic: float, agents: int, aht: float, threshold: float,
                     patience: float) -> ErlangA:
    """Figures of the Erlang A (Palm) model: ``traffic`` Erlangs, ``agents`` agents, handle time
    ``aht``, service-level ``threshold`` and mean caller ``patience``, all in seconds."""
    _check_traffic(traffic)
    _check_positive("aht", aht)
    _check_positive("patience", patience)
    if threshold < 0:
        raise StaffingError(f"threshold must be 0 or more seconds, got {threshold}")
    return _erlang_a(traffic, agents, aht, threshold, patience, erlang_b(traffic, agents))


def _erlang_a(traffic: float, agents: int, aht: float, threshold: float, patience: float,
              blocking: float) -> ErlangA:
    if traffic == 0:
        return ErlangA(agents, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)
    mu, theta = 1.0 / aht, 1.0 / patience
    lam = traffic * mu
    if agents == 0:
        # Nobody answers: every caller waits for exactly their patience and leaves.
        return ErlangA(0, traffic, 1.0, 1.0, 0.0, 0.0, math.inf, patience, 0.0)
    x, y = agents * mu / theta, lam / theta
    log_a = _log_garnett_a(x, y)
    big_a = math.exp(min(log_a, 700.0))
    # P(W > 0) = A·B / (1 + (A − 1)·B), rewritten so that a huge A does not overflow.
    if log_a > 700.0:
        prob_wait = 1.0 / (1.0 + (1.0 - blocking) / (blocking * big_a)) if blocking else 1.0
    else:
        prob_wait = big_a * blocking / (1.0 + (big_a - 1.0) * blocking)
    rho = lam / (agents * mu)
    ab_given_wait = 1.0 / (rho * big_a) + 1.0 - 1.0 / rho
    ab_given_wait = min(max(ab_given_wait, 0.0), 1.0)
    prob_abandon = prob_wait * ab_given_wait
    average_wait = prob_abandon / theta  # Little's law on the queue: θ·E[Q] = λ·P(Ab)
    served_within, abandoned_within = _erlang_a_integrals(x, y, theta, prob_wait, threshold,
                                                          log_a)
    served = 1.0 - prob_abandon
    asa = _served_mean_wait(x, y, theta, prob_wait, log_a) / served if served > 0 else math.inf
    excl = 1.0 - abandoned_within
    return ErlangA(
        agents=agents, traffic=traffic, prob_wait=prob_wait, prob_abandon=prob_abandon,
        service_level=served_within,
        service_level_excluding_abandons=served_within / excl if excl > 0 else 0.0,
        asa=asa, average_wait=average_wait,
        occupancy=min(1.0, traffic * served / agents),
    )


def _log_garnett_a(x: float, y: float) -> float:
    """log A(x, y), A(x, y) = Σ_k y^k / Π_{j=1..k}(x + j), summed with rescaling."""
    if y > x + 12.0 * math.sqrt(x) + 50.0:
        # Far past the peak of the integrand, γ(x, y) = Γ(x)·(1 − Q(x, y)) with Q below
        # 1e-30, and A = x·e^y·y^{−x}·γ(x, y) (DLMF 8.2.1); the series would need ~y terms.
        return math.log(x) + y - x * math.log(y) + math.lgamma(x)
    log_scale, total, term = 0.0, 1.0, 1.0
    k = 0
    while True:
        k += 1
        term *= y / (x + k)
        total += term
        if total > 1e250:
            log_scale += math.log(total)
            term /= total
            total = 1.0
        if term < total * 1e-17 and x + k > y:
            break
    return log_scale + math.log(total)


def _log_lower_gamma(x: float, z: float) -> float:
    """log γ(x, z), the lower incomplete gamma function, for x > 0, z ≥ 0."""
    if z <= 0.0:
        return -math.inf
    # γ(x, z) = z^x·e^{−z} / x · A(x, z)   (series of A above, DLMF 8.7.1).
    return x * math.log(z) - z - math.log(x) + _log_garnett_a(x, z)


def _offered_wait_density(s: np.ndarray, x: float, y: float, theta: float, prob_wait: float,
                          log_gamma_xy: float) -> np.ndarray:
    # −d/ds P(V > s) with P(V > s) = P(V>0)·γ(x, y·e^{−θs})/γ(x, y), z = y·e^{−θs}.
    log_z = math.log(y) - theta * s
    return prob_wait * theta * np.exp(x * log_z - np.exp(log_z) - log_gamma_xy)


def _simpson(values: np.ndarray, h: float) -> float:
    weights = np.full(values.shape, 2.0)
    weights[1::2] = 4.0
    weights[0] = weights[-1] = 1.0
    return float(np.dot(weights, values) * h / 3.0)


def _erlang_a_integrals(x: float, y: float, theta: float, prob_wait: float, threshold: float,
                        log_a: float) -> tuple[float, float]:
    """(P(answered within t), P(abandoned within t)) for threshold t."""
    log_gamma_xy = x * math.log(y) - y - math.log(x) + log_a
    immediate = 1.0 - prob_wait
    if threshold == 0 or prob_wait == 0:
        return immediate, 0.0
    s = np.linspace(0.0, threshold, _SIMPSON_PANELS + 1)
    density = _offered_wait_density(s, x, y, theta, prob_wait, log_gamma_xy)
    # Answered at s: the offered wait is s and the patience outlasts it.
    served_late = _simpson(np.exp(-theta * s) * density, threshold / _SIMPSON_PANELS)
    # Abandoned by t = ∫ θe^{−θs}·P(V>s) ds; by parts that is
    # P(V>0) − e^{−θt}·P(V>t) − ∫ e^{−θs} f_V(s) ds, which needs P(V>s) at t only.
    survival_t = prob_wait * math.exp(
        _log_lower_gamma(x, y * math.exp(-theta * threshold)) - log_gamma_xy)
    abandoned = prob_wait - math.exp(-theta * threshold) * survival_t - served_late
    return immediate + served_late, min(max(abandoned, 0.0), 1.0)


def _served_mean_wait(x: float, y: float, theta: float, prob_wait: float, log_a: float) -> float:
    """E[V·e^{−θV}]: total wait of answered callers per offered caller."""
    if prob_wait == 0:
        return 0.0
    log_gamma_xy = x * math.log(y) - y - math.log(x) + log_a
    # P(V > s) stays near P(V>0) until y·e^{−θs} falls to about x (when ρ > 1), then decays at
    # a rate between N·μ − λ and N·μ; double the horizon until the tail left out is negligible.
    horizon = max(0.0, math.log(y / x)) / theta + 1.0 / (theta * x)
    while math.exp(_log_lower_gamma(x, y * math.exp(-theta * horizon)) - log_gamma_xy) > 1e-15:
        horizon *= 2.0
    s = np.linspace(0.0, horizon, 8 * _SIMPSON_PANELS + 1)
    density = _offered_wait_density(s, x, y, theta, prob_wait, log_gamma_xy)
    return _simpson(s * np.exp(-theta * s) * density, horizon / (8 * _SIMPSON_PANELS))


# --------------------------------------------------------------------------------------------
# Staffing


@dataclass(frozen=True)
class Staffing:
    """The smallest number of agents meeting the targets of one interval, and what it gives."""

    agents: int
    """Agents needed on the phones."""
    scheduled: int
    """Agents to schedule once shrinkage (breaks, training, absence) is added."""
    traffic: float
    """Offered load, Erlangs."""
    service_level: float
    """Share of callers answered within the threshold with ``agents`` agents."""
    asa: float
    """Average speed of answer, seconds."""
    occupancy: float
    """Share of the agents' time spent handling calls."""
    prob_wait: float
    """Share of callers who wait at all."""
    erlang_a: ErlangA | None = None
    """Erlang A figures when a caller patience was given (then ``agents`` is sized on them)."""


def offered_traffic(calls: float, aht: float, interval: float) -> float:
    """Offered load in Erlangs of ``calls`` calls of ``aht`` seconds in ``interval`` seconds."""
    if calls < 0 or not math.isfinite(calls):
        raise StaffingError(f"calls must be a finite number, 0 or more, got {calls}")
    _check_positive("aht", aht)
    _check_positive("interval", interval)
    traffic = calls * aht / interval
    _check_traffic(traffic)
    return traffic


def scheduled_agents(agents: int, shrinkage: float) -> int:
    """Agents to schedule so that ``agents`` remain on the phones after ``shrinkage``, the
    share of paid time not spent available for calls."""
    if not 0 <= shrinkage < 1:
        raise StaffingError(f"shrinkage must be from 0 up to (not including) 1, got {shrinkage}")
    # The small tolerance keeps 14 / (1 − 0.3) = 20.000000000000004 at 20.
    return math.ceil(agents / (1.0 - shrinkage) - 1e-9)


def required_agents(calls: float, aht: float, interval: float, *, service_level: float = 0.8,
                    threshold: float = 20.0, asa: float | None = None,
                    max_occupancy: float | None = None, shrinkage: float = 0.0,
                    patience: float | None = None) -> Staffing:
    """Fewest agents such that, in one interval of ``interval`` seconds with ``calls`` calls of
    average handle time ``aht``: at least ``service_level`` of callers are answered within
    ``threshold`` seconds, the ASA is at most ``asa`` (when given) and occupancy at most
    ``max_occupancy`` (when given). Erlang C, or Erlang A when a mean ``patience`` is given."""
    traffic = offered_traffic(calls, aht, interval)
    if not 0 < service_level < 1:
        raise StaffingError(f"service_level must be above 0 and below 1, got {service_level}")
    if threshold < 0 or not math.isfinite(threshold):
        raise StaffingError(f"threshold must be 0 or more seconds, got {threshold}")
    if asa is not None:
        _check_positive("asa", asa)
    if max_occupancy is not None and not 0 < max_occupancy <= 1:
        raise StaffingError(f"max_occupancy must be above 0 and at most 1, got {max_occupancy}")
    if max_occupancy is not None and traffic / max_occupancy > MAX_TRAFFIC:
        # The occupancy cap alone would need more agents than any search here covers.
        raise StaffingError(
            f"max_occupancy {max_occupancy} would need more than {MAX_TRAFFIC:,.0f} agents for "
            f"{traffic:.2f} Erlangs; raise it")
    if patience is not None:
        _check_positive("patience", patience)
    scheduled_agents(0, shrinkage)  # validates shrinkage before any work
    if traffic == 0:
        return Staffing(0, 0, 0.0, 1.0, 0.0, 0.0, 0.0,
                        _erlang_a(0.0, 0, aht, threshold, patience, 1.0) if patience else None)
    if patience is None:
        return _staff_erlang_c(traffic, aht, service_level, threshold, asa, max_occupancy,
                               shrinkage)
    return _staff_erlang_a(traffic, aht, service_level, threshold, asa, max_occupancy,
                           shrinkage, patience)


def _staff_erlang_c(traffic: float, aht: float, target: float, threshold: float,
                    asa: float | None, max_occupancy: float | None,
                    shrinkage: float) -> Staffing:
    # Walk N upwards from the first stable staffing, carrying the Erlang B recursion along,
    # so the whole search costs O(N) rather than O(N²).
    agents = math.floor(traffic) + 1
    blocking = erlang_b(traffic, agents)
    limit = agents + 10 * math.ceil(math.sqrt(traffic) + 10) + 1000
    while agents <= limit:
        fig = _figures(traffic, agents, aht, threshold, blocking)
        if (fig.service_level >= target and (asa is None or fig.asa <= asa)
                and (max_occupancy is None or fig.occupancy <= max_occupancy)):
            return Staffing(agents, scheduled_agents(agents, shrinkage), traffic,
                            fig.service_level, fig.asa, fig.occupancy, fig.prob_wait)
        agents += 1
        blocking = traffic * blocking / (agents + traffic * blocking)
    if max_occupancy is not None:
        agents = max(agents, math.ceil(traffic / max_occupancy))
        fig = erlang_c_figures(traffic, agents, aht, threshold)
        return Staffing(agents, scheduled_agents(agents, shrinkage), traffic,
                        fig.service_level, fig.asa, fig.occupancy, fig.prob_wait)
    raise StaffingError("the targets cannot be met: service level or ASA target too strict")


def _staff_erlang_a(traffic: float, aht: float, target: float, threshold: float,
                    asa: float | None, max_occupancy: float | None, shrinkage: float,
                    patience: float) -> Staffing:
    def meets(n: int) -> ErlangA | None:
        fig = _erlang_a(traffic, n, aht, threshold, patience, erlang_b(traffic, n))
        if (fig.service_level >= target and (asa is None or fig.asa <= asa)
                and (max_occupancy is None or fig.occupancy <= max_occupancy)):
            return fig
        return None

    # Every measure improves with N, so bisect between nobody and an ample upper bound
    # (Erlang C staffing with extra room always meets the Erlang A targets when finite).
    high = math.floor(traffic) + 1
    while meets(high) is None:
        high = high * 2 + 1
        if high > 4 * MAX_TRAFFIC:
            raise StaffingError("the targets cannot be met: service level or ASA too strict")
    low = 0  # meets(0) is false: nobody answers
    while high - low > 1:
        mid = (low + high) // 2
        if meets(mid) is None:
            low = mid
        else:
            high = mid
    fig = meets(high)
    assert fig is not None
    return Staffing(high, scheduled_agents(high, shrinkage), traffic, fig.service_level,
                    fig.asa, fig.occupancy, fig.prob_wait, erlang_a=fig)


def _check_traffic(traffic: float) -> None:
    if not 0 <= traffic <= MAX_TRAFFIC or math.isnan(traffic):
        raise StaffingError(f"offered traffic must be from 0 to {MAX_TRAFFIC:.0f} Erlangs, "
                            f"got {traffic}")


def _check_positive(name: str, value: float) -> None:
    if not value > 0 or not math.isfinite(value):
        raise StaffingError(f"{name} must be a positive number of seconds, got {value}")
