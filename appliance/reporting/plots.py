"""Charts as plain SVG text: forecast against actual calls, and required against logged-in
agents. No plotting library is needed; any browser shows the result."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape
from zoneinfo import ZoneInfo

from appliance.reporting.forecast import IntervalPlan

WIDTH, HEIGHT = 960, 360
_LEFT, _RIGHT, _TOP, _BOTTOM = 60, 20, 40, 50
#: Most points drawn per series; longer series are refused rather than drawn unreadably.
MAX_POINTS = 20_000


@dataclass(frozen=True)
class Series:
    """One line of a chart."""

    name: str
    """Legend text."""
    values: Sequence[float | None]
    """One value per x position; None leaves a gap."""
    color: str
    """SVG colour."""
    step: bool = False
    """Draw as steps (a value holds for its whole interval), e.g. agent counts."""
    dashed: bool = False
    """Draw dashed, so a line lying on another one stays visible."""


def line_chart(title: str, starts: Sequence[int], series: Sequence[Series], *,
               y_label: str = "", timezone: str = "UTC") -> str:
    """An SVG line chart of ``series`` over the intervals starting at ``starts``; the
    x labels are local times in ``timezone``."""
    zone = ZoneInfo(timezone)
    if not starts:
        raise ValueError("a chart needs at least one interval")
    if len(starts) > MAX_POINTS:
        raise ValueError(f"a chart takes at most {MAX_POINTS} intervals, got {len(starts)}")
    for line in series:
        if len(line.values) != len(starts):
            raise ValueError(f"series {line.name!r} has {len(line.values)} values for "
                             f"{len(starts)} intervals")
    finite = [v for line in series for v in line.values if v is not None and math.isfinite(v)]
    top = _nice_ceiling(max(finite, default=1.0))
    plot_w, plot_h = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    count = len(starts)

    def x(i: float) -> float:
        return _LEFT + plot_w * i / count

    def y(v: float) -> float:
        return _TOP + plot_h * (1 - v / top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
           f'<title>{escape(title)}</title>',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH / 2:.0f}" y="20" text-anchor="middle" font-size="14">'
           f'{escape(title)}</text>']
    for k in range(5):  # horizontal grid and y ticks
        value = top * k / 4
        out.append(f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(value):.1f}" '
                   f'y2="{y(value):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{_LEFT - 6}" y="{y(value) + 4:.1f}" text-anchor="end">'
                   f'{_fmt(value)}</text>')
    if y_label:
        out.append(f'<text x="14" y="{_TOP + plot_h / 2:.0f}" text-anchor="middle" '
                   f'transform="rotate(-90 14 {_TOP + plot_h / 2:.0f})">{escape(y_label)}</text>')
    for i, label in _x_ticks(starts, zone):
        out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{_TOP}" '
                   f'y2="{HEIGHT - _BOTTOM}" stroke="#eee"/>')
        out.append(f'<text x="{x(i):.1f}" y="{HEIGHT - _BOTTOM + 16}" text-anchor="middle">'
                   f'{label}</text>')
    out.append(f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}" '
               f'stroke="#333"/>')
    for n, line in enumerate(series):
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        for points in _runs(line, x, y):
            out.append(f'<polyline fill="none" stroke="{escape(line.color)}" stroke-width="1.5"'
                       f'{dash} data-series="{escape(line.name)}" points="{points}"/>')
        lx = _LEFT + 10 + 160 * n
        out.append(f'<rect x="{lx}" y="{HEIGHT - 18}" width="12" height="4" '
                   f'fill="{escape(line.color)}"/>')
        out.append(f'<text x="{lx + 16}" y="{HEIGHT - 12}">{escape(line.name)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _x_ticks(starts: Sequence[int], zone: ZoneInfo) -> list[tuple[int, str]]:
    """(index, label) of the x ticks: local midnights when the chart spans days, else about
    eight evenly spaced times."""
    local = [dt.datetime.fromtimestamp(s, zone) for s in starts]
    midnights = [i for i, t in enumerate(local) if t.hour == 0 and t.minute == 0]
    if 2 <= len(midnights) <= 16:
        return [(i, local[i].strftime("%a %d %b")) for i in midnights]
    every = max(1, math.ceil(len(starts) / 8))
    return [(i, local[i].strftime("%a %H:%M")) for i in range(0, len(starts), every)]


def _runs(line: Series, x: Callable[[float], float],
          y: Callable[[float], float]) -> list[str]:
    """Point lists of the unbroken runs of a series."""
    runs: list[str] = []
    current: list[str] = []
    for i, value in enumerate(line.values):
        if value is None or not math.isfinite(value):
            if current:
                runs.append(" ".join(current))
            current = []
            continue
        if line.step:
            current.append(f"{x(i):.1f},{y(value):.1f} {x(i + 1):.1f},{y(value):.1f}")
        else:
            current.append(f"{x(i + 0.5):.1f},{y(value):.1f}")
    if current:
        runs.append(" ".join(current))
    return runs


def _nice_ceiling(value: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``value``."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def forecast_chart(starts: Sequence[int], forecast: Sequence[float],
                   actual: Sequence[float | None], *, timezone: str = "UTC",
                   title: str = "Offered calls: forecast and actual") -> str:
    """SVG of forecast against actual offered calls per interval."""
    return line_chart(title, starts, [Series("forecast", forecast, "#1f77b4"),
                                      Series("actual", actual, "#d62728")],
                      y_label="calls per interval", timezone=timezone)


def staffing_chart(plan: Sequence[IntervalPlan], *, timezone: str = "UTC",
                   title: str = "Agents: required and logged in") -> str:
    """SVG of required and scheduled agents, and logged-in agents where known."""
    series = [Series("required", [p.required for p in plan], "#2ca02c", step=True),
              Series("scheduled", [p.scheduled for p in plan], "#9467bd", step=True)]
    if any(p.logged_in is not None for p in plan):
        series.append(Series("logged in", [p.logged_in for p in plan], "#ff7f0e", step=True,
                             dashed=True))
    return line_chart(title, [p.start for p in plan], series, y_label="agents",
                      timezone=timezone)
