"""Forecast on seeded synthetic history with a known weekly seasonality, hold-out error,
staffing plan and the SVG charts."""

from __future__ import annotations

import datetime as dt
import math
import xml.etree.ElementTree as ET
from zoneinfo import ZoneInfo

import numpy as np
import pytest
from test_kpi import T0, example_report

from appliance.reporting.forecast import (
    ForecastError,
    backtest,
    fit,
    logged_in_agents,
    mape,
    offered_history,
    slot_of,
    staffing_plan,
    wape,
)
from appliance.reporting.plots import Series, forecast_chart, line_chart, staffing_chart

START = 1788739200  # Monday 2026-09-07 00:00:00 UTC
HALF_HOUR = 1800
DAY_FACTOR = (1.2, 1.1, 1.0, 1.0, 0.9, 0.5, 0.3)


def true_rate(start: int) -> float:
    """Expected calls per half hour: level × day-of-week × a two-hump day, nights closed."""
    day = (start - START) // 86400 % 7
    hour = (start % 86400) / 3600
    if not 7 <= hour < 21:
        return 0.0
    shape = (math.exp(-(((hour - 10.5) / 1.5) ** 2)) + 0.8 * math.exp(-(((hour - 15) / 2) ** 2))
             + 0.1)
    return 60.0 * DAY_FACTOR[day] * shape


def synthetic_history(weeks: int, seed: int = 11) -> dict[int, float]:
    rng = np.random.default_rng(seed)
    starts = range(START, START + weeks * 7 * 86400, HALF_HOUR)
    return {s: float(rng.poisson(true_rate(s))) for s in starts}


def test_the_forecast_recovers_the_weekly_seasonality() -> None:
    history = synthetic_history(5)
    model = fit(history, HALF_HOUR)
    week6 = range(START + 5 * 7 * 86400, START + 6 * 7 * 86400, HALF_HOUR)
    truth = [true_rate(s) for s in week6]
    predicted = [model.predict(s) for s in week6]
    # Against the true rate (not the noisy counts) the error is within 10 %; the noise of a
    # profile learnt from five weeks of Poisson counts alone is about 7 %.
    assert wape(truth, predicted) < 0.10
    assert sum(predicted) == pytest.approx(sum(truth), rel=0.06)
    # Closed hours are forecast as closed, and the day factors come back.
    assert all(p < 0.5 for p, t in zip(predicted, truth, strict=True) if t == 0)
    per_day = [sum(predicted[d * 48:(d + 1) * 48]) for d in range(7)]
    true_day = [sum(truth[d * 48:(d + 1) * 48]) for d in range(7)]
    for got, want in zip(per_day, true_day, strict=True):
        assert got == pytest.approx(want, rel=0.08)
    # The busiest slot is a 10:00-11:00 half hour of Monday or Tuesday.
    best = max(model.profile, key=model.profile.get)
    assert best[0] in (0, 1) and best[1] in (20, 21)


def test_seasonality_beats_a_flat_forecast() -> None:
    result = backtest(synthetic_history(6), HALF_HOUR)
    flat = [sum(result.actual) / len(result.actual)] * len(result.actual)
    assert result.wape < 0.5 * wape(result.actual, flat)


def test_hold_out_error_is_computed_on_the_last_week() -> None:
    history = synthetic_history(6, seed=5)
    result = backtest(history, HALF_HOUR)
    last_week = sorted(history)[-336:]
    assert result.starts == tuple(last_week)
    assert result.actual == tuple(history[s] for s in last_week)
    trained = fit({s: c for s, c in history.items() if s < last_week[0]}, HALF_HOUR)
    assert result.forecast == pytest.approx([trained.predict(s) for s in last_week])
    # MAPE and WAPE by their definitions, written out again here.
    pct = [abs(a - f) / a for a, f in zip(result.actual, result.forecast, strict=True) if a]
    assert result.mape == pytest.approx(sum(pct) / len(pct))
    num = sum(abs(a - f) for a, f in zip(result.actual, result.forecast, strict=True))
    assert result.wape == pytest.approx(num / sum(result.actual))


def test_mape_and_wape_small_example() -> None:
    actual, forecast = [10.0, 0.0, 20.0], [12.0, 3.0, 15.0]
    assert mape(actual, forecast) == pytest.approx((2 / 10 + 5 / 20) / 2)
    assert wape(actual, forecast) == pytest.approx((2 + 3 + 5) / 30)
    assert mape([0.0], [1.0]) is None and wape([0.0], [1.0]) is None
    with pytest.raises(ForecastError, match="3 actual values against 2"):
        wape(actual, forecast[:2])


def test_missing_intervals_count_as_no_calls() -> None:
    history = synthetic_history(2)
    last = max(history)
    sparse = {s: c for s, c in history.items() if c > 0 or s == last}
    assert len(sparse) < len(history) - 100
    full, holes = fit(history, HALF_HOUR), fit(sparse, HALF_HOUR)
    assert holes.last_start == full.last_start
    assert holes.level == pytest.approx(full.level, rel=1e-12)
    assert holes.profile == pytest.approx(full.profile, rel=1e-12, abs=1e-15)


def test_local_time_slots_follow_daylight_saving() -> None:
    # Summer time ends in Paris on 2026-10-25: 09:00 local is 07:00 UTC on the Saturday
    # before and 08:00 UTC on the Monday after.
    paris = ZoneInfo("Europe/Paris")
    saturday_7utc = int(dt.datetime(2026, 10, 24, 7, tzinfo=dt.UTC).timestamp())
    monday_8utc = int(dt.datetime(2026, 10, 26, 8, tzinfo=dt.UTC).timestamp())
    assert slot_of(saturday_7utc, 3600, paris) == (5, 9)
    assert slot_of(monday_8utc, 3600, paris) == (0, 9)
    # Ten weeks across the change: the day has 25 hours once, nothing breaks.
    history = {START + 3600 * k: 5.0 for k in range(24 * 7 * 10)}
    model = fit(history, 3600, timezone="Europe/Paris")
    assert model.predict(model.last_start + 3600) == pytest.approx(5.0)


@pytest.mark.parametrize(("history", "interval", "kwargs", "message"), [
    ({}, 1800, {}, "empty"),
    ({START: 1.0}, 1800, {}, "one week"),
    ({START: 1.0}, 600, {}, "interval must be one of"),
    ({START: -1.0}, 1800, {}, "finite number"),
    ({START: float("nan")}, 1800, {}, "finite number"),
    ({START: 1.0, START + 900: 1.0}, 1800, {}, "apart"),
    ({START: 1.0}, 1800, {"timezone": "Mars/Olympus"}, "time zone"),
    ({START: 1.0}, 1800, {"alpha": 0}, "alpha"),
])
def test_bad_history_names_the_problem(history: dict, interval: int, kwargs: dict,
                                       message: str) -> None:
    with pytest.raises(ForecastError, match=message):
        fit(history, interval, **kwargs)


def test_backtest_needs_two_weeks() -> None:
    with pytest.raises(ForecastError, match="two weeks"):
        backtest(synthetic_history(1), HALF_HOUR)


def test_history_and_logged_in_agents_from_a_kpi_report() -> None:
    report = example_report()
    assert offered_history(report) == {T0: 8.0}  # 7 offered + 1 short abandon
    assert offered_history(report, queue="other") == {}
    agents = logged_in_agents(report)
    assert agents == {T0: pytest.approx(2.0), T0 + 1800: pytest.approx(600 / 1800)}


def test_staffing_plan_against_logged_in_agents() -> None:
    plan = staffing_plan([(T0, 100.0), (T0 + 1800, 0.0), (T0 + 3600, 50.0)], aht=180,
                         interval=1800, shrinkage=0.3, logged_in={T0: 16.0})
    assert [p.required for p in plan] == [14, 0, 8]
    assert [p.scheduled for p in plan] == [20, 0, 12]
    assert [p.logged_in for p in plan] == [16.0, 0.0, 0.0]
    assert all(p.service_level >= 0.8 for p in plan)


# --------------------------------------------------------------------------------------------
# SVG


def parse_svg(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def test_forecast_chart_draws_both_series() -> None:
    result = backtest(synthetic_history(3), HALF_HOUR)
    root = parse_svg(forecast_chart(result.starts, result.forecast, result.actual))
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert [line.get("data-series") for line in lines] == ["forecast", "actual"]
    for line in lines:
        points = line.get("points").split()
        assert len(points) == 336
        ys = [float(p.split(",")[1]) for p in points]
        assert all(40 <= v <= 310 for v in ys)  # inside the plot area


def test_staffing_chart_steps_and_gaps() -> None:
    plan = staffing_plan([(T0 + 1800 * i, 20.0 * i) for i in range(6)], aht=180, interval=1800,
                         logged_in={T0: 1.0})
    root = parse_svg(staffing_chart(plan))
    names = [p.get("data-series") for p in root.iter("{http://www.w3.org/2000/svg}polyline")]
    assert names == ["required", "scheduled", "logged in"]
    # A gap (None) splits a line into separate runs.
    root = parse_svg(line_chart("t", [0, 1800, 3600], [Series("s", [1.0, None, 2.0], "red")]))
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2


def test_chart_text_is_escaped_and_bad_input_refused() -> None:
    root = parse_svg(line_chart('Queue "<sales> & co"', [0], [Series("a<b", [1.0], "red")]))
    assert root.find("{http://www.w3.org/2000/svg}title").text == 'Queue "<sales> & co"'
    with pytest.raises(ValueError, match="2 values for 1 intervals"):
        line_chart("t", [0], [Series("s", [1.0, 2.0], "red")])
    with pytest.raises(ValueError, match="at least one interval"):
        line_chart("t", [], [])
