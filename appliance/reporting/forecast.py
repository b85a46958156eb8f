"""Forecast of offered calls per interval, its hold-out error, and the staffing that follows.

The model is multiplicative: calls(interval) = level × profile[day of week, interval of day].
Both are updated by exponential smoothing as history is read in time order (Holt–Winters
without trend, the season being one week, level in error-correction form):

    profile[slot] ← γ·(y / level) + (1 − γ)·profile[slot]
    level         ← level + α·(y − level·profile[slot])      (both with the values before y)

The profile is started from the average of the first two weeks and kept at a mean of 1 over
the week, so ``level`` reads as the average calls per interval. Details in ``docs/wfm.md``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from appliance.reporting.erlang import required_agents
from appliance.reporting.kpi import INTERVALS, KpiReport

WEEK = 7 * 86400
#: Largest history accepted, intervals (a year of 15-minute intervals).
MAX_HISTORY = 366 * 96


class ForecastError(ValueError):
    """The history or a parameter cannot give a forecast; the message says which and why."""


Slot = tuple[int, int]
"""(day of week with Monday = 0, interval of the local day counted from 0)."""


def slot_of(start: int, interval: int, zone: ZoneInfo) -> Slot:
    """The weekly slot of the interval starting at epoch ``start``, in local time."""
    local = dt.datetime.fromtimestamp(start, zone)
    seconds = local.hour * 3600 + local.minute * 60 + local.second
    return local.weekday(), seconds // interval


@dataclass(frozen=True)
class ForecastModel:
    """A fitted level and weekly profile."""

    interval: int
    """Interval length, seconds."""
    timezone: str
    """IANA zone the day of week and the interval of day are taken in."""
    level: float
    """Average offered calls per interval at the end of the history."""
    profile: Mapping[Slot, float]
    """Multiplicative factor of each weekly slot; mean 1 over the slots seen."""
    last_start: int
    """Start of the last interval of the history."""

    def predict(self, start: int) -> float:
        """Expected offered calls in the interval starting at ``start``."""
        factor = self.profile.get(slot_of(start, self.interval, ZoneInfo(self.timezone)), 0.0)
        return self.level * factor

    def next_intervals(self, count: int) -> list[tuple[int, float]]:
        """(start, expected calls) of the ``count`` intervals after the history."""
        return [(start, self.predict(start)) for start in
                range(self.last_start + self.interval, self.last_start + (count + 1)
                      * self.interval, self.interval)]


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ForecastError(f"unknown time zone {name!r}") from None


def _series(history: Mapping[int, float], interval: int) -> list[tuple[int, float]]:
    """The history as a gap-free series: missing intervals between the first and the last
    are intervals without calls."""
    if interval not in INTERVALS:
        raise ForecastError(f"interval must be one of {INTERVALS} seconds, got {interval}")
    if not history:
        raise ForecastError("history is empty")
    for start, calls in history.items():
        if start % 60:
            raise ForecastError(f"interval start {start} is not on a minute boundary")
        if not (calls >= 0 and math.isfinite(calls)):
            raise ForecastError(f"calls of the interval starting {start} must be a finite "
                                f"number, 0 or more, got {calls}")
    first, last = min(history), max(history)
    if (last - first) // interval + 1 > MAX_HISTORY:
        raise ForecastError(f"history longer than {MAX_HISTORY} intervals")
    starts = range(first, last + 1, interval)
    if any((s - first) % interval for s in history):
        raise ForecastError(f"interval starts are not {interval} s apart")
    return [(s, float(history.get(s, 0.0))) for s in starts]


def fit(history: Mapping[int, float], interval: int, *, timezone: str = "UTC",
        alpha: float = 0.02, gamma: float = 0.3) -> ForecastModel:
    """Fit level and weekly profile to ``history`` (interval start → offered calls), which must
    cover at least one week."""
    if not 0 < alpha <= 1 or not 0 < gamma <= 1:
        raise ForecastError(f"alpha and gamma must be in (0, 1], got {alpha}, {gamma}")
    zone = _zone(timezone)
    series = _series(history, interval)
    per_week = WEEK // interval
    if len(series) < per_week:
        raise ForecastError(f"history covers {len(series)} intervals; one week "
                            f"({per_week}) is needed at least")
    # Start from the mean of up to two weeks so one odd day does not set the profile.
    head = series[:min(len(series), 2 * per_week)]
    sums: dict[Slot, list[float]] = {}
    for start, calls in head:
        sums.setdefault(slot_of(start, interval, zone), []).append(calls)
    level = sum(c for _, c in head) / len(head)
    if level == 0:
        raise ForecastError("the first week of history has no calls at all")
    profile = {slot: (sum(v) / len(v)) / level for slot, v in sums.items()}
    for start, calls in series[len(head):]:
        slot = slot_of(start, interval, zone)
        factor = profile.get(slot)
        if factor is None:  # a slot first seen now (a DST change): start it from this value
            profile[slot] = calls / level if level > 0 else 1.0
            continue
        # Error-correction form weighted by the slot's factor: the textbook
        # α·(y/profile) + (1 − α)·level divides Poisson counts by a noisy profile, and
        # E[1/profile] > 1/E[profile] pushes the level up (by 25 % on the test history).
        previous = level
        level = max(0.0, level + alpha * (calls - level * factor))
        if previous > 0:
            # Against the level before this count, which the count has not moved yet.
            profile[slot] = gamma * (calls / previous) + (1 - gamma) * factor
    mean = sum(profile.values()) / len(profile)
    if mean > 0:
        profile = {slot: f / mean for slot, f in profile.items()}
        level *= mean
    return ForecastModel(interval, timezone, level, profile, series[-1][0])


# --------------------------------------------------------------------------------------------
# Error measures and the hold-out test


def mape(actual: Sequence[float], forecast: Sequence[float]) -> float | None:
    """Mean absolute percentage error over the intervals with calls (an interval without
    calls has no percentage error); None when no interval had calls."""
    _same_length(actual, forecast)
    errors = [abs(a - f) / a for a, f in zip(actual, forecast, strict=True) if a > 0]
    return sum(errors) / len(errors) if errors else None


def wape(actual: Sequence[float], forecast: Sequence[float]) -> float | None:
    """Weighted absolute percentage error: Σ|actual − forecast| / Σ actual; None when there
    were no calls."""
    _same_length(actual, forecast)
    total = sum(actual)
    if total <= 0:
        return None
    return sum(abs(a - f) for a, f in zip(actual, forecast, strict=True)) / total


def _same_length(actual: Sequence[float], forecast: Sequence[float]) -> None:
    if len(actual) != len(forecast):
        raise ForecastError(f"{len(actual)} actual values against {len(forecast)} forecast")


@dataclass(frozen=True)
class Backtest:
    """The forecast of the last week of history made from the weeks before it."""

    model: ForecastModel
    """Fitted on the history without its last week."""
    starts: tuple[int, ...]
    """Interval starts of the hold-out week."""
    actual: tuple[float, ...]
    """Offered calls of the hold-out week."""
    forecast: tuple[float, ...]
    """What the model expected for them."""
    mape: float | None
    """Mean absolute percentage error over the hold-out intervals with calls."""
    wape: float | None
    """Weighted absolute percentage error over the hold-out week."""


def backtest(history: Mapping[int, float], interval: int, *, timezone: str = "UTC",
             alpha: float = 0.02, gamma: float = 0.3) -> Backtest:
    """Hold out the last week of ``history``, fit on the rest (one week at least), and measure
    the error of the forecast on the held-out week."""
    series = _series(history, interval)
    per_week = WEEK // interval
    if len(series) < 2 * per_week:
        raise ForecastError(f"history covers {len(series)} intervals; two weeks "
                            f"({2 * per_week}) are needed for a hold-out week")
    train, held = series[:-per_week], series[-per_week:]
    model = fit(dict(train), interval, timezone=timezone, alpha=alpha, gamma=gamma)
    starts = tuple(s for s, _ in held)
    actual = tuple(c for _, c in held)
    predicted = tuple(model.predict(s) for s in starts)
    return Backtest(model, starts, actual, predicted, mape(actual, predicted),
                    wape(actual, predicted))


# --------------------------------------------------------------------------------------------
# From KPI reports, and on to staffing


def offered_history(report: KpiReport, *, queue: str | None = None) -> dict[int, float]:
    """Offered calls per interval from a KPI report: one queue, or every queue summed."""
    history: dict[int, float] = {}
    for row in report.intervals:
        if row.scope == "queue" and (queue is None or row.key == queue):
            assert row.interval_start is not None
            # Short abandons are left out of "offered"; they still reached the queue and are
            # part of the load to forecast.
            history[row.interval_start] = (history.get(row.interval_start, 0.0) + row.offered
                                           + row.short_abandoned)
    return history


def logged_in_agents(report: KpiReport, *, site: str | None = None) -> dict[int, float]:
    """Average agents logged in per interval (agent-seconds / interval length)."""
    agents: dict[int, float] = {}
    for row in report.intervals:
        if row.scope == "site" and (site is None or row.key == site):
            assert row.interval_start is not None
            agents[row.interval_start] = (agents.get(row.interval_start, 0.0)
                                          + row.logged_in / report.config.interval)
    return agents


@dataclass(frozen=True)
class IntervalPlan:
    """Staffing of one interval."""

    start: int
    """Interval start, epoch seconds."""
    calls: float
    """Forecast offered calls."""
    required: int
    """Agents needed on the phones for the targets."""
    scheduled: int
    """Agents to schedule once shrinkage is added."""
    service_level: float
    """Service level expected with ``required`` agents."""
    asa: float
    """ASA expected with ``required`` agents, seconds."""
    occupancy: float
    """Occupancy expected with ``required`` agents."""
    logged_in: float | None
    """Average agents actually logged in, when known."""


def staffing_plan(forecast: Iterable[tuple[int, float]], *, aht: float, interval: int,
                  service_level: float = 0.8, threshold: float = 20.0,
                  asa: float | None = None, shrinkage: float = 0.0,
                  patience: float | None = None,
                  logged_in: Mapping[int, float] | None = None) -> list[IntervalPlan]:
    """Required agents per forecast interval (Erlang C, or Erlang A with ``patience``), next
    to the agents logged in when ``logged_in`` is given."""
    plan = []
    for start, calls in forecast:
        staffing = required_agents(calls, aht, interval, service_level=service_level,
                                   threshold=threshold, asa=asa, shrinkage=shrinkage,
                                   patience=patience)
        plan.append(IntervalPlan(start, calls, staffing.agents, staffing.scheduled,
                                 staffing.service_level, staffing.asa, staffing.occupancy,
                                 None if logged_in is None else logged_in.get(start, 0.0)))
    return plan
