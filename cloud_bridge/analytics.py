"""Cross-site contact-center KPIs from the queue events the sites sent up.

Each site's call control writes ``queue.enter`` {call_id, queue, caller, ...} when a caller
joins a queue, then ``queue.connect`` {call_id, queue, agent, wait_s, ring_s} when an agent
answers, or ``queue.abandon`` {call_id, queue, caller, wait_s[, overflow]} when the caller
leaves unanswered (``overflow`` set: the queue's own rule sent the caller away). The cloud
never imports the appliance, so the counting is done here from the stored events, with the
site's definitions (docs/kpis.md):

- a call belongs to the interval in which it entered the queue (the answer or abandon time
  minus its wait);
- **offered**: calls that entered, short abandons (hung up within ``short_abandon`` seconds)
  left out;
- **answered**, **abandoned** (after the short-abandon threshold), **timed out** (overflow),
  **waiting** (no outcome yet);
- **service level** = answered within ``service_level_threshold`` / (answered + abandoned +
  timed out); **ASA** = total wait of answered calls / answered.

Rows come per site and for all sites together (site ``*``), per interval and for the whole
period (``interval_start`` None). Events the site withheld or could not parse are skipped and
counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from cloud_bridge.store import CloudStore, EventRecord

ALL_SITES = "*"
INTERVALS = (900, 1800, 3600)


@dataclass(frozen=True)
class KpiSettings:
    """How the cloud counts; the defaults are the site's."""

    interval: int = 1800
    """Interval length in seconds: 900, 1800 or 3600."""
    service_level_threshold: float = 20.0
    """A caller answered within this many seconds counts as served in time."""
    short_abandon: float = 5.0
    """Callers hanging up within this many seconds are left out of every figure."""

    def __post_init__(self) -> None:
        if self.interval not in INTERVALS:
            raise ValueError(f"interval must be one of {INTERVALS} seconds, got {self.interval}")
        for name in ("service_level_threshold", "short_abandon"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be 0 or more seconds, got {value}")

    def interval_start(self, at: float) -> int:
        """Start (Unix seconds, UTC boundaries) of the interval holding ``at``."""
        whole = math.floor(at)
        return whole - whole % self.interval


@dataclass(frozen=True)
class KpiRow:
    """The KPIs of one site (or all sites) over one interval (or the whole period)."""

    site_id: str
    """Site id, or ``*`` for all sites together."""
    interval_start: int | None
    """Unix start of the interval; None for the whole period asked."""
    offered: int
    """Calls that entered a queue, short abandons left out."""
    answered: int
    """Calls an agent answered."""
    abandoned: int
    """Callers who hung up while waiting, after the short-abandon threshold."""
    short_abandoned: int
    """Callers who hung up within the short-abandon threshold (not in ``offered``)."""
    timed_out: int
    """Callers sent away unanswered by the queue's own rule (overflow)."""
    waiting: int
    """Calls with no outcome in the events received so far."""
    answered_within: int
    """Answered within the service-level threshold."""
    service_level: float | None
    """answered_within / (answered + abandoned + timed_out); None when nobody left."""
    asa: float | None
    """Average speed of answer in seconds; None when nothing was answered."""

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {
            "site_id": self.site_id, "interval_start": self.interval_start,
            "offered": self.offered, "answered": self.answered, "abandoned": self.abandoned,
            "short_abandoned": self.short_abandoned, "timed_out": self.timed_out,
            "waiting": self.waiting, "answered_within": self.answered_within,
            "service_level": self.service_level, "asa": self.asa,
        }


@dataclass(frozen=True)
class KpiReport:
    """KPI rows and what was left out."""

    since: float
    """Start of the period (Unix seconds)."""
    until: float
    """End of the period, exclusive."""
    settings: KpiSettings
    """How it was counted."""
    rows: list[KpiRow]
    """Per site then ``*``; within each, the whole period first, then intervals in order."""
    skipped: int = 0
    """Queue events that could not be used (withheld, not JSON, no call id)."""

    def total(self, site_id: str = ALL_SITES) -> KpiRow | None:
        """The whole-period row of a site (``*``: all sites)."""
        for row in self.rows:
            if row.site_id == site_id and row.interval_start is None:
                return row
        return None


@dataclass
class _Call:
    entered_at: float | None = None
    outcome: str | None = None  # "answered" | "abandoned" | "timed_out"
    wait: float | None = None


@dataclass
class _Tally:
    offered: int = 0
    answered: int = 0
    abandoned: int = 0
    short_abandoned: int = 0
    timed_out: int = 0
    waiting: int = 0
    answered_within: int = 0
    answered_wait: float = 0.0
    sites: set[str] = field(default_factory=set)

    def add(self, call: _Call, settings: KpiSettings) -> None:
        wait = call.wait or 0.0
        if call.outcome == "abandoned" and wait < settings.short_abandon:
            self.short_abandoned += 1
            return
        self.offered += 1
        if call.outcome == "answered":
            self.answered += 1
            self.answered_wait += wait
            self.answered_within += wait <= settings.service_level_threshold
        elif call.outcome == "abandoned":
            self.abandoned += 1
        elif call.outcome == "timed_out":
            self.timed_out += 1
        else:
            self.waiting += 1

    def row(self, site_id: str, interval_start: int | None) -> KpiRow:
        left = self.answered + self.abandoned + self.timed_out
        return KpiRow(
            site_id=site_id, interval_start=interval_start, offered=self.offered,
            answered=self.answered, abandoned=self.abandoned,
            short_abandoned=self.short_abandoned, timed_out=self.timed_out,
            waiting=self.waiting, answered_within=self.answered_within,
            service_level=self.answered_within / left if left else None,
            asa=self.answered_wait / self.answered if self.answered else None,
        )


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value >= 0 else None


def kpis_from_events(
    events: Iterable[EventRecord], since: float, until: float,
    settings: KpiSettings | None = None,
) -> KpiReport:
    """Count the KPIs of the calls that entered a queue in ``[since, until)``.

    ``events`` are ``queue.*`` events of any sites, in any order; give them up to the time the
    outcomes are wanted (a call's outcome may come after ``until``).
    """
    settings = settings or KpiSettings()
    calls: dict[tuple[str, str], _Call] = {}
    skipped = 0
    for event in events:
        if event.kind not in ("queue.enter", "queue.connect", "queue.abandon"):
            continue
        try:
            payload = json.loads(event.payload)
        except (ValueError, UnicodeDecodeError):
            skipped += 1
            continue
        call_id = payload.get("call_id") if isinstance(payload, dict) else None
        if not isinstance(call_id, str) or not call_id:
            skipped += 1
            continue
        call = calls.setdefault((event.site_id, call_id), _Call())
        if event.kind == "queue.enter":
            call.entered_at = event.occurred_at
            continue
        wait = _number(payload.get("wait_s"))
        if wait is None:
            skipped += 1
            continue
        call.wait = wait
        # The site's clock gave both times: the entry is the outcome minus the wait.
        call.entered_at = event.occurred_at - wait
        if event.kind == "queue.connect":
            call.outcome = "answered"
        else:
            call.outcome = "timed_out" if payload.get("overflow") else "abandoned"
    tallies: dict[tuple[str, int | None], _Tally] = {}
    for (site_id, _), call in calls.items():
        if call.entered_at is None or not since <= call.entered_at < until:
            continue
        start = settings.interval_start(call.entered_at)
        for key in ((site_id, None), (site_id, start), (ALL_SITES, None), (ALL_SITES, start)):
            tallies.setdefault(key, _Tally()).add(call, settings)
    tallies.setdefault((ALL_SITES, None), _Tally())
    order = sorted(tallies, key=lambda k: (k[0] == ALL_SITES, k[0], k[1] is not None, k[1] or 0))
    rows = [tallies[key].row(*key) for key in order]
    return KpiReport(since, until, settings, rows, skipped)


OUTCOME_GRACE_S = 4 * 3600.0
"""How long after the period answers and abandons are still read (a caller waits at most
this long in any sane queue)."""


def cross_site_kpis(
    store: CloudStore, since: float, until: float, settings: KpiSettings | None = None,
    *, site_id: str | None = None,
) -> KpiReport:
    """The KPIs of every site (or one) and of all sites together, from the store's events."""
    if until <= since:
        raise ValueError(f"the period must not be empty: since={since} until={until}")
    events = store.queue_events(since, until + OUTCOME_GRACE_S, site_id)
    return kpis_from_events(events, since, until, settings)
