"""``edgecc wfm``: staffing, KPI reports and forecasts from the command line.

    edgecc wfm staff --calls 100 --aht 180 --interval 1800 --sl 0.8 --threshold 20
    edgecc wfm kpi --queue-log /var/log/asterisk/queue_log --interval 1800 --scope queue
    edgecc wfm forecast --queue-log queue_log --svg-dir out/

Exit status: 0 success; 1 the input could not be read or gives no answer; 2 bad usage (the
message names the flag).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

from appliance.reporting.erlang import (
    MAX_TRAFFIC,
    ErlangA,
    StaffingError,
    erlang_a_figures,
    required_agents,
)
from appliance.reporting.events import EventError, QueueEvent, read_queue_log
from appliance.reporting.forecast import (
    ForecastError,
    backtest,
    fit,
    logged_in_agents,
    offered_history,
    staffing_plan,
)
from appliance.reporting.kpi import (
    INTERVALS,
    KpiConfig,
    KpiReport,
    KpiRow,
    compute_kpis,
    row_as_dict,
)
from appliance.reporting.plots import forecast_chart, staffing_chart

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
#: Largest input file read, bytes: a year of a busy site's queue_log fits well within it.
MAX_INPUT_BYTES = 2 * 1024**3


# --------------------------------------------------------------------------------------------
# Argument types: each error names what was expected; argparse adds the flag.


def _number(low: float, high: float = math.inf, *, low_open: bool = False,
            high_open: bool = False, what: str = "a number") -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if math.isnan(value) or too_low or too_high or math.isinf(value):
            lo = f"above {low:g}" if low_open else f"at least {low:g}"
            hi = "" if math.isinf(high) else (f" and below {high:g}" if high_open
                                               else f" and at most {high:g}")
            raise argparse.ArgumentTypeError(f"expected {what} {lo}{hi}, got {text}")
        return value

    return parse


def _interval(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value not in INTERVALS:
        raise argparse.ArgumentTypeError(
            f"expected one of {', '.join(map(str, INTERVALS))} seconds, got {value}")
    return value


def _any_interval(text: str) -> float:
    return _number(0, 7 * 86400, low_open=True, what="seconds")(text)


_SECONDS = _number(0, low_open=True, what="seconds")


def add_wfm_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``wfm`` and its commands to ``subparsers`` of the ``edgecc`` parser; the parsed
    namespace carries ``handler`` (namespace → exit status)."""
    wfm = subparsers.add_parser(
        "wfm", help="workforce management: staffing, KPIs, forecast",
        description="Erlang C / Erlang A staffing, KPI reports from a queue_log, forecasts.")
    _fill_wfm_parser(wfm)
    return wfm


def _fill_wfm_parser(wfm: argparse.ArgumentParser) -> None:
    commands = wfm.add_subparsers(dest="wfm_command", required=True, metavar="COMMAND")

    staff = commands.add_parser(
        "staff", help="agents needed for one interval (Erlang C; Erlang A with --patience)",
        description="Fewest agents that answer --sl of the callers within --threshold seconds "
        "(and meet --asa when given) for --calls calls of --aht seconds in --interval seconds.")
    staff.add_argument("--calls", type=_number(0, what="a number of calls"), required=True,
                       help="calls offered in the interval")
    staff.add_argument("--aht", type=_SECONDS, required=True,
                       help="average handle time (talk + hold + wrap-up), seconds")
    staff.add_argument("--interval", type=_any_interval, default=1800.0,
                       help="interval length, seconds (default 1800)")
    staff.add_argument("--sl", type=_number(0, 1, low_open=True, high_open=True,
                                            what="a fraction"), default=0.8,
                       help="service level target as a fraction, e.g. 0.8 (default 0.8)")
    staff.add_argument("--threshold", type=_number(0, what="seconds"), default=20.0,
                       help="service level threshold, seconds (default 20)")
    staff.add_argument("--asa", type=_SECONDS, help="ASA target, seconds (optional)")
    staff.add_argument("--max-occupancy", type=_number(0, 1, low_open=True, what="a fraction"),
                       help="occupancy cap as a fraction (optional)")
    staff.add_argument("--shrinkage", type=_number(0, 1, high_open=True, what="a fraction"),
                       default=0.0, help="share of paid time off the phones (default 0)")
    staff.add_argument("--patience", type=_SECONDS,
                       help="mean caller patience, seconds: adds Erlang A figures")
    staff.add_argument("--json", action="store_true", help="print JSON")
    staff.set_defaults(handler=_cmd_staff)

    kpi = commands.add_parser(
        "kpi", help="KPIs per interval from an Asterisk-style queue_log",
        description="Service level, ASA, waits, abandonment, AHT, FCR, occupancy and "
        "utilisation per interval and per queue, agent or site (docs/kpis.md).")
    _add_log_options(kpi)
    kpi.add_argument("--scope", choices=("queue", "agent", "site"), default="queue",
                     help="rows per queue, agent or site (default queue)")
    kpi.add_argument("--totals", action="store_true", help="whole period instead of intervals")
    kpi.add_argument("--threshold", type=_number(0, what="seconds"), default=20.0,
                     help="service level threshold, seconds (default 20)")
    kpi.add_argument("--short-abandon", type=_number(0, what="seconds"), default=5.0,
                     help="abandons within this many seconds are left out (default 5)")
    kpi.add_argument("--fcr-window", type=_SECONDS, default=72 * 3600.0,
                     help="repeat-contact window for FCR, seconds (default 259200, 72 h)")
    kpi.add_argument("--fcr-by-disposition", action="store_true",
                     help="only a repeat with the same disposition counts against FCR")
    kpi.add_argument("--json", action="store_true", help="print JSON")
    kpi.set_defaults(handler=_cmd_kpi)

    forecast = commands.add_parser(
        "forecast", help="forecast offered calls and the staffing they need",
        description="Fits a day-of-week × interval profile with a smoothed level to the "
        "history, reports the error on the last week held out, and plans the next intervals.")
    source = forecast.add_mutually_exclusive_group(required=True)
    source.add_argument("--queue-log", type=Path, help="history from a queue_log file")
    source.add_argument("--history", type=Path,
                        help="history from a CSV file with columns interval_start,calls")
    forecast.add_argument("--interval", type=_interval, default=1800,
                          help="interval length: 900, 1800 or 3600 s (default 1800)")
    forecast.add_argument("--site", default="", help="site id given to the events")
    forecast.add_argument("--queue", help="one queue only (default: all queues together)")
    forecast.add_argument("--timezone", default="UTC",
                          help="IANA zone of the site's days (default UTC)")
    forecast.add_argument("--horizon", type=_number(1, 4 * 7 * 96, what="intervals"),
                          default=None, help="intervals to forecast (default one week)")
    forecast.add_argument("--aht", type=_SECONDS,
                          help="handle time for staffing, seconds (default: from the queue_log)")
    forecast.add_argument("--sl", type=_number(0, 1, low_open=True, high_open=True,
                                               what="a fraction"), default=0.8,
                          help="service level target (default 0.8)")
    forecast.add_argument("--threshold", type=_number(0, what="seconds"), default=20.0,
                          help="service level threshold, seconds (default 20)")
    forecast.add_argument("--asa", type=_SECONDS, help="ASA target, seconds (optional)")
    forecast.add_argument("--shrinkage", type=_number(0, 1, high_open=True, what="a fraction"),
                          default=0.0, help="share of paid time off the phones (default 0)")
    forecast.add_argument("--patience", type=_SECONDS,
                          help="mean caller patience, seconds: Erlang A staffing (default "
                               "with --queue-log: measured from its abandons, when it has "
                               "some; else Erlang C)")
    forecast.add_argument("--svg-dir", type=Path,
                          help="write forecast.svg and staffing.svg here")
    forecast.add_argument("--json", action="store_true", help="print JSON")
    forecast.set_defaults(handler=_cmd_forecast)


def _add_log_options(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--queue-log", type=Path,
                        help="queue_log file (epoch|call|queue|agent|VERB|data...)")
    source.add_argument("--site-dir", type=Path,
                        help="the event log of this site's database instead of a queue_log")
    parser.add_argument("--since", type=_moment,
                        help="with --site-dir: first moment (epoch seconds or ISO 8601)")
    parser.add_argument("--until", type=_moment,
                        help="with --site-dir: end, excluded (epoch seconds or ISO 8601)")
    parser.add_argument("--site", default="", help="site id given to the events")
    parser.add_argument("--interval", type=_interval, default=1800,
                        help="interval length: 900, 1800 or 3600 s (default 1800)")
    parser.add_argument("--utc-offset", type=_number(-14 * 3600, 14 * 3600, what="seconds"),
                        default=0.0, help="site time east of UTC, seconds, for interval "
                        "boundaries (default 0)")


def build_wfm_parser() -> argparse.ArgumentParser:
    """The parser of ``edgecc wfm`` on its own."""
    parser = argparse.ArgumentParser(prog="edgecc wfm", description=(
        "Workforce management: Erlang C / Erlang A staffing, KPIs, forecasts."))
    _fill_wfm_parser(parser)
    return parser


def wfm_main(argv: Sequence[str] | None = None) -> int:
    """Run ``edgecc wfm`` with ``argv`` (the words after ``wfm``) and return the exit
    status."""
    try:
        args = build_wfm_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse has printed usage and the flag's error
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _fail(command: str, message: str, status: int) -> int:
    print(f"edgecc wfm {command}: {message}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------------------------
# staff


def _cmd_staff(args: argparse.Namespace) -> int:
    traffic = args.calls * args.aht / args.interval
    if traffic > MAX_TRAFFIC:
        return _fail("staff", f"--calls {args.calls:g} of --aht {args.aht:g} s in --interval "
                     f"{args.interval:g} s is {traffic:.0f} Erlangs; at most "
                     f"{MAX_TRAFFIC:.0f} are supported", EXIT_USAGE)
    try:
        plan = required_agents(args.calls, args.aht, args.interval, service_level=args.sl,
                               threshold=args.threshold, asa=args.asa,
                               max_occupancy=args.max_occupancy, shrinkage=args.shrinkage)
        with_patience = at_c = None
        if args.patience is not None:
            with_patience = required_agents(
                args.calls, args.aht, args.interval, service_level=args.sl,
                threshold=args.threshold, asa=args.asa, max_occupancy=args.max_occupancy,
                shrinkage=args.shrinkage, patience=args.patience)
            at_c = erlang_a_figures(traffic, plan.agents, args.aht, args.threshold,
                                    args.patience)
    except StaffingError as exc:
        return _fail("staff", str(exc), EXIT_PROBLEM)
    result: dict[str, object] = {
        "calls": args.calls, "aht": args.aht, "interval": args.interval,
        "traffic": plan.traffic, "agents": plan.agents, "scheduled": plan.scheduled,
        "service_level": plan.service_level, "threshold": args.threshold,
        "asa": _finite(plan.asa), "occupancy": plan.occupancy, "prob_wait": plan.prob_wait,
        "erlang_a": None,
    }
    if with_patience is not None and at_c is not None:
        fig = with_patience.erlang_a
        assert fig is not None
        result["erlang_a"] = {
            "patience": args.patience, "agents": with_patience.agents,
            "scheduled": with_patience.scheduled, **_erlang_a_dict(fig),
            "with_erlang_c_agents": _erlang_a_dict(at_c),
        }
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(f"offered traffic    {plan.traffic:.2f} Erlangs ({args.calls:g} calls of "
          f"{args.aht:g} s in {args.interval:g} s)")
    print(f"agents             {plan.agents}")
    if args.shrinkage:
        print(f"scheduled          {plan.scheduled} (with {args.shrinkage:.0%} shrinkage)")
    print(f"service level      {plan.service_level:.1%} answered within {args.threshold:g} s "
          f"(target {args.sl:.0%})")
    print(f"ASA                {_seconds(plan.asa)}")
    print(f"occupancy          {plan.occupancy:.1%}")
    print(f"callers who wait   {plan.prob_wait:.1%}")
    if with_patience is not None and at_c is not None:
        fig = with_patience.erlang_a
        assert fig is not None
        print(f"Erlang A, mean patience {args.patience:g} s:")
        print(f"  agents           {with_patience.agents}")
        if args.shrinkage:
            print(f"  scheduled        {with_patience.scheduled}")
        print(f"  service level    {fig.service_level:.1%} of all callers, "
              f"{fig.service_level_excluding_abandons:.1%} leaving out abandons within "
              f"{args.threshold:g} s")
        print(f"  ASA              {_seconds(fig.asa)}")
        print(f"  abandoned        {fig.prob_abandon:.1%}")
        print(f"  occupancy        {fig.occupancy:.1%}")
        print(f"  with {plan.agents} agents  service level {at_c.service_level:.1%}, ASA "
              f"{_seconds(at_c.asa)}, abandoned {at_c.prob_abandon:.1%}")
    return EXIT_OK


def _erlang_a_dict(fig: ErlangA) -> dict[str, object]:
    return {"service_level": fig.service_level,
            "service_level_excluding_abandons": fig.service_level_excluding_abandons,
            "asa": _finite(fig.asa), "average_wait": fig.average_wait,
            "prob_abandon": fig.prob_abandon, "prob_wait": fig.prob_wait,
            "occupancy": fig.occupancy}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if math.isfinite(value) else "unbounded"


# --------------------------------------------------------------------------------------------
# kpi


def _read_log(path: Path, site: str) -> list[QueueEvent]:
    size = path.stat().st_size
    if size > MAX_INPUT_BYTES:
        raise EventError(f"{path} is {size} bytes; at most {MAX_INPUT_BYTES} are read")
    with path.open(encoding="utf-8", errors="replace") as handle:
        return list(read_queue_log(handle, site=site))


class _SiteError(Exception):
    """The site's configuration or database cannot be read."""


def _site_events(site_dir: Path, since: float | None,
                 until: float | None) -> list[QueueEvent]:
    from appliance.config import ConfigError, load_site
    from appliance.reporting.from_log import queue_events_from_db
    from appliance.store import open_site_db

    try:
        config = load_site(site_dir)
    except ConfigError as exc:
        raise _SiteError(f"--site-dir: invalid site configuration\n{exc}") from None
    if not Path(config.storage.database).exists():
        raise _SiteError(f"--site-dir: no site database at {config.storage.database}")
    db = open_site_db(config.storage.database)
    try:
        return list(queue_events_from_db(db, since, until))
    except EventError as exc:
        raise _SiteError(f"--site-dir {site_dir}: {exc}") from None
    finally:
        db.conn.close()


def _cmd_kpi(args: argparse.Namespace) -> int:
    try:
        config = KpiConfig(interval=args.interval, service_level_threshold=args.threshold,
                           short_abandon=args.short_abandon, fcr_window=args.fcr_window,
                           fcr_same_disposition=args.fcr_by_disposition,
                           utc_offset=int(args.utc_offset))
    except ValueError as exc:
        return _fail("kpi", str(exc), EXIT_USAGE)
    if args.queue_log is not None and (args.since is not None or args.until is not None):
        return _fail("kpi", "--since and --until go with --site-dir (a queue_log is read "
                     "whole)", EXIT_USAGE)
    try:
        events = (_site_events(args.site_dir, args.since, args.until) if args.site_dir
                  else _read_log(args.queue_log, args.site))
    except _SiteError as exc:
        return _fail("kpi", str(exc), EXIT_PROBLEM)
    except OSError as exc:
        return _fail("kpi", f"--queue-log: cannot read {args.queue_log}: {exc.strerror}",
                     EXIT_PROBLEM)
    except EventError as exc:
        return _fail("kpi", f"--queue-log {args.queue_log}: {exc}", EXIT_PROBLEM)
    report = compute_kpis(events, config)
    rows = [r for r in (report.totals if args.totals else report.intervals)
            if r.scope == args.scope]
    if args.json:
        print(json.dumps({"config": asdict(config), "anomalies": report.anomalies,
                          "rows": [row_as_dict(r) for r in rows]}, indent=2))
        return EXIT_OK
    print(_kpi_table(rows, args.scope))
    if report.anomalies:
        print(f"{report.anomalies} event(s) fit no transition and were skipped")
    return EXIT_OK


def _kpi_table(rows: list[KpiRow], scope: str) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1%}"

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    head = (f"{'interval (UTC)':16} {scope:12} {'offered':>7} {'answ':>5} {'aband':>5} "
            f"{'SL':>6} {'SL-ex':>6} {'ASA':>5} {'AvgW':>5} {'MaxW':>5} {'Ab%':>6} "
            f"{'AHT':>5} {'FCR':>6} {'Occ':>6} {'Util':>6}")
    lines = [head]
    for r in rows:
        when = ("total" if r.interval_start is None else dt.datetime.fromtimestamp(
            r.interval_start, dt.UTC).strftime("%Y-%m-%d %H:%M"))
        lines.append(
            f"{when:16} {r.key[:12]:12} {r.offered:7d} {r.answered:5d} {r.abandoned:5d} "
            f"{pct(r.service_level):>6} {pct(r.service_level_excluding_abandons):>6} "
            f"{sec(r.asa):>5} {sec(r.average_wait):>5} {sec(r.longest_wait):>5} "
            f"{pct(r.abandon_rate):>6} {sec(r.aht):>5} {pct(r.fcr):>6} "
            f"{pct(r.occupancy):>6} {pct(r.utilisation):>6}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# forecast


def _read_history_csv(path: Path) -> dict[int, float]:
    history: dict[int, float] = {}
    with path.open(encoding="utf-8", newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or (number == 1 and not row[0].strip().lstrip("-").isdigit()):
                continue  # blank line, or the header
            if len(row) != 2:
                raise ForecastError(f"line {number}: expected interval_start,calls")
            try:
                history[int(row[0])] = float(row[1])
            except ValueError:
                raise ForecastError(f"line {number}: interval_start must be whole epoch "
                                    f"seconds and calls a number, got {row!r}") from None
    return history


def _measured_patience(report: KpiReport, queue: str | None) -> float | None:
    """Mean caller patience of the queue (or of the whole site) from its abandons (docs/kpis.md,
    ``mean_patience``); None when nobody abandoned, so Erlang A has nothing to go on."""
    if queue is not None:
        rows = [r for r in report.totals if r.scope == "queue" and r.key == queue]
    else:
        rows = [r for r in report.totals if r.scope == "site"]
    found = [r.mean_patience for r in rows if r.mean_patience is not None
             and r.abandoned + r.short_abandoned > 0]
    if len(found) != 1 or not (math.isfinite(found[0]) and found[0] > 0):
        return None  # no abandons (or several sites in one log: no single patience)
    return found[0]


def _cmd_forecast(args: argparse.Namespace) -> int:
    logged_in: dict[int, float] | None = None
    aht = args.aht
    patience, patience_from = args.patience, "--patience" if args.patience else None
    try:
        if args.queue_log is not None:
            source = f"--queue-log {args.queue_log}"
            report = compute_kpis(_read_log(args.queue_log, args.site),
                                  KpiConfig(interval=args.interval))
            history = offered_history(report, queue=args.queue)
            logged_in = logged_in_agents(report, site=args.site or None)
            if patience is None:
                # Erlang A where the log has abandonment data (callers do give up).
                patience = _measured_patience(report, args.queue)
                patience_from = "measured" if patience is not None else None
            if aht is None:
                handled = [r for r in report.totals if r.scope == "queue"
                           and (args.queue is None or r.key == args.queue) and r.handled]
                total = sum(r.handled for r in handled)
                if not total:
                    return _fail("forecast", "no handled call in the queue_log to take an "
                                 "AHT from: give --aht", EXIT_USAGE)
                aht = sum(r.talk + r.hold + r.wrap_up for r in handled) / total
        else:
            source = f"--history {args.history}"
            history = _read_history_csv(args.history)
            if aht is None:
                return _fail("forecast", "--aht is needed with --history", EXIT_USAGE)
    except OSError as exc:
        return _fail("forecast", f"cannot read the history: {exc}", EXIT_PROBLEM)
    except (EventError, ForecastError) as exc:
        return _fail("forecast", f"{source}: {exc}", EXIT_PROBLEM)
    try:
        model = fit(history, args.interval, timezone=args.timezone)
        check = None
        if history and (max(history) - min(history)) // args.interval + 1 >= 2 * 7 * 86400 // \
                args.interval:
            check = backtest(history, args.interval, timezone=args.timezone)
        horizon = int(args.horizon) if args.horizon else 7 * 86400 // args.interval
        ahead = model.next_intervals(horizon)
        plan = staffing_plan(ahead, aht=aht, interval=args.interval, service_level=args.sl,
                             threshold=args.threshold, asa=args.asa,
                             shrinkage=args.shrinkage, patience=patience)
        last_week = None
        if check is not None:
            last_week = staffing_plan(zip(check.starts, check.actual, strict=True), aht=aht,
                                      interval=args.interval, service_level=args.sl,
                                      threshold=args.threshold, asa=args.asa,
                                      shrinkage=args.shrinkage, patience=patience,
                                      logged_in=logged_in)
    except ForecastError as exc:
        message = str(exc)
        flag = "--timezone" if "time zone" in message else source
        return _fail("forecast", f"{flag}: {message}", EXIT_PROBLEM)
    except StaffingError as exc:
        return _fail("forecast", str(exc), EXIT_PROBLEM)
    written: list[str] = []
    if args.svg_dir is not None:
        try:
            args.svg_dir.mkdir(parents=True, exist_ok=True)
            if check is not None:
                path = args.svg_dir / "forecast.svg"
                path.write_text(forecast_chart(check.starts, check.forecast, check.actual,
                                               timezone=args.timezone,
                                               title="Last week: forecast and actual calls"))
                written.append(str(path))
            path = args.svg_dir / "staffing.svg"
            path.write_text(staffing_chart(plan, timezone=args.timezone,
                                           title="Next intervals: agents required"))
            written.append(str(path))
            if last_week is not None and logged_in is not None:
                path = args.svg_dir / "staffing-last-week.svg"
                path.write_text(staffing_chart(last_week, timezone=args.timezone,
                                               title="Last week: required and logged-in "
                                               "agents"))
                written.append(str(path))
        except OSError as exc:
            return _fail("forecast", f"--svg-dir: cannot write: {exc}", EXIT_PROBLEM)
    result = {
        "interval": args.interval, "aht": aht, "level": model.level,
        "model": "erlang-a" if patience is not None else "erlang-c",
        "patience": patience, "patience_from": patience_from,
        "holdout": None if check is None else {"mape": check.mape, "wape": check.wape},
        "plan": [{"start": p.start, "calls": p.calls, "required": p.required,
                  "scheduled": p.scheduled, "service_level": p.service_level,
                  "asa": _finite(p.asa), "occupancy": p.occupancy} for p in plan],
        "svg": written,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return EXIT_OK
    if check is None:
        print("hold-out week: not enough history (two weeks needed)")
    else:
        print(f"hold-out week: MAPE {_pct(check.mape)}, WAPE {_pct(check.wape)}")
    print(f"AHT used: {aht:.0f} s")
    if patience is None:
        print("staffing: Erlang C (no caller patience known)")
    else:
        print(f"staffing: Erlang A, caller patience {patience:.0f} s"
              f"{' (measured from the abandons)' if patience_from == 'measured' else ''}")
    print(f"{'interval (UTC)':16} {'calls':>7} {'agents':>6} {'sched':>6}")
    for p in plan:
        when = dt.datetime.fromtimestamp(p.start, dt.UTC).strftime("%Y-%m-%d %H:%M")
        print(f"{when:16} {p.calls:7.1f} {p.required:6d} {p.scheduled:6d}")
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# --------------------------------------------------------------------------------------------
# export queue-log: the site's event log as Asterisk queue_log lines


def _moment(text: str) -> float:
    """Epoch seconds, or an ISO 8601 date/time (UTC unless it names an offset)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected epoch seconds or an ISO 8601 time such as 2026-11-25T09:00, got "
            f"{text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` (with ``queue-log``) to the ``edgecc`` subcommands."""
    export = subparsers.add_parser(
        "export", help="export the site's event log (queue_log)",
        description="Export the site's history in formats other tools read.")
    commands = export.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    queue_log = commands.add_parser(
        "queue-log", help="the queue and agent events as Asterisk queue_log lines",
        description="Write the queue and agent events of the site's event log as Asterisk "
        "queue_log lines (epoch|call|queue|agent|VERB|data...), in time order; `edgecc wfm "
        "kpi --queue-log` and other queue_log tools read them.")
    queue_log.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    queue_log.add_argument("--since", type=_moment,
                           help="first moment (epoch seconds or ISO 8601, UTC by default)")
    queue_log.add_argument("--until", type=_moment, help="end, excluded (same forms)")
    queue_log.add_argument("--out", type=Path,
                           help="file to create (default: standard output); must not exist")
    queue_log.set_defaults(handler=_cmd_export_queue_log)
    return export


def _cmd_export_queue_log(args: argparse.Namespace) -> int:
    import contextlib
    import os
    import tempfile

    from appliance.config import ConfigError, load_site
    from appliance.reporting.events import format_queue_log_line
    from appliance.reporting.from_log import queue_events_from_db
    from appliance.store import open_site_db

    def fail(message: str, status: int) -> int:
        print(f"edgecc export queue-log: {message}", file=sys.stderr)
        return status

    if args.since is not None and args.until is not None and args.until <= args.since:
        return fail("--until must be after --since", EXIT_USAGE)
    if args.out is not None and args.out.exists():
        return fail(f"--out {args.out} exists; give a new file name", EXIT_USAGE)
    try:
        config = load_site(args.site_dir)
    except ConfigError as exc:
        return fail(f"invalid site configuration, nothing was read\n{exc}", EXIT_USAGE)
    if not Path(config.storage.database).exists():
        return fail(f"no site database at {config.storage.database}", EXIT_PROBLEM)
    db = open_site_db(config.storage.database)
    temp: Path | None = None
    lines = 0
    try:
        if args.out is None:
            sink = sys.stdout
        else:
            # Written beside the target and renamed at the end: never a half file.
            fd, name = tempfile.mkstemp(prefix=".queue_log-", dir=args.out.parent or ".")
            temp = Path(name)
            sink = os.fdopen(fd, "w", encoding="utf-8")
        with sink if args.out is not None else contextlib.nullcontext(sink):
            for event in queue_events_from_db(db, args.since, args.until):
                sink.write(format_queue_log_line(event) + "\n")
                lines += 1
        if temp is not None:
            os.link(temp, args.out)  # fails if --out appeared meanwhile: nothing replaced
    except EventError as exc:
        return fail(f"{exc}; export stopped" + ("" if args.out is None else
                                                ", nothing was written"), EXIT_PROBLEM)
    except OSError as exc:
        return fail(f"cannot write {args.out}: {exc.strerror}", EXIT_PROBLEM)
    finally:
        db.conn.close()
        if temp is not None:
            temp.unlink(missing_ok=True)
    if args.out is not None:
        print(f"wrote {lines} queue_log lines to {args.out}", file=sys.stderr)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(wfm_main(sys.argv[1:]))
