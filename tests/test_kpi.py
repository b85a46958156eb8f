"""KPIs from queue events: the worked example of docs/kpis.md, interval attribution, FCR,
uptime, the live board, queue_log round trip and bad input."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from appliance.reporting.events import (
    ComponentEvent,
    EventError,
    QueueEvent,
    QueueVerb,
    format_queue_log_line,
    parse_queue_log_line,
    read_queue_log,
)
from appliance.reporting.kpi import (
    AgentState,
    KpiConfig,
    KpiEngine,
    LiveBoard,
    compute_kpis,
)

T0 = 1793610000  # Monday 2026-11-02 09:00:00 UTC

# The worked example of docs/kpis.md, as Asterisk-style queue_log lines (site "paris").
WORKED_EXAMPLE = """\
1793610000|NONE|NONE|a1|AGENTLOGIN|PJSIP/a1
1793610000|NONE|NONE|a2|AGENTLOGIN|PJSIP/a2
1793610010|c1|sales|NONE|ENTERQUEUE||+3311|1
1793610020|c2|sales|NONE|ENTERQUEUE||+3322|2
1793610025|c1|sales|a1|CONNECT|15|c1-a1|3
1793610030|c3|sales|NONE|ENTERQUEUE||+3333|2
1793610033|c3|sales|NONE|ABANDON|2|2|3
1793610040|c4|sales|NONE|ENTERQUEUE||+3344|2
1793610050|c5|sales|NONE|ENTERQUEUE||+3355|3
1793610052|c4|sales|NONE|ABANDON|2|2|12
1793610060|c2|sales|a2|CONNECT|40|c2-a2|5
1793610100|c1|sales|a1|HOLD
1793610110|c5|sales|NONE|ABANDON|1|3|60
1793610130|c1|sales|a1|UNHOLD
1793610205|c1|sales|a1|COMPLETECALLER|15|180|1
1793610205|c1|sales|a1|WRAPUPSTART
1793610220|c1|sales|a1|DISPOSITION|billing
1793610235|c1|sales|a1|WRAPUPEND
1793610300|c2|sales|a2|COMPLETEAGENT|40|240|2
1793610400|c6|sales|NONE|ENTERQUEUE||+3311|1
1793610402|c6|sales|a2|RINGNOANSWER|2000
1793610405|c6|sales|a1|CONNECT|5|c6-a1|2
1793610525|c6|sales|a1|COMPLETECALLER|5|120|1
1793610525|c6|sales|a1|WRAPUPSTART
1793610530|c6|sales|a1|DISPOSITION|billing
1793610545|c6|sales|a1|WRAPUPEND
1793610600|c8|sales|NONE|ENTERQUEUE||+3377|1
1793610900|c8|sales|NONE|EXITWITHTIMEOUT|1|1|300
1793611000|NONE|NONE|a2|PAUSE|lunch
1793611300|NONE|NONE|a2|UNPAUSE|lunch
1793611700|c7|sales|NONE|ENTERQUEUE||+3366|1
1793611800|NONE|NONE|a1|AGENTLOGOFF|PJSIP/a1|1800
1793611830|c7|sales|a2|CONNECT|130|c7-a2|2
1793611950|c7|sales|a2|COMPLETECALLER|130|120|1
1793612400|NONE|NONE|a2|AGENTLOGOFF|PJSIP/a2|2400
"""
TRUNK = [ComponentEvent(T0, "trunk", True, "paris"),
         ComponentEvent(T0 + 600, "trunk", False, "paris"),
         ComponentEvent(T0 + 660, "trunk", True, "paris")]
CONFIG = KpiConfig(interval=1800, service_level_threshold=20, short_abandon=5, fcr_window=1800)


def example_events() -> list[QueueEvent]:
    return list(read_queue_log(WORKED_EXAMPLE.splitlines(), site="paris"))


def example_report(config: KpiConfig = CONFIG):
    return compute_kpis([*example_events(), *TRUNK], config, end=T0 + 2400)


def test_worked_example_queue_interval() -> None:
    report = example_report()
    assert report.anomalies == 0
    [first, second] = [r for r in report.rows("queue", "sales")] + [None]
    assert second is None  # c7 connects at 09:30:30 but entered at 09:28:20: one interval
    r = first
    assert r.interval_start == T0
    assert (r.offered, r.answered, r.abandoned, r.short_abandoned, r.timed_out) == (7, 4, 2, 1, 1)
    assert (r.answered_within, r.abandoned_within, r.waiting) == (2, 1, 0)
    assert r.service_level == pytest.approx(2 / 7)
    assert r.service_level_excluding_abandons == pytest.approx(2 / 6)
    assert r.asa == pytest.approx(190 / 4)
    assert r.average_wait == pytest.approx(562 / 7)
    assert r.longest_wait == 300
    assert r.abandon_rate == pytest.approx(2 / 7)
    assert (r.handled, r.talk, r.hold, r.wrap_up) == (4, 630, 30, 50)
    assert r.aht == pytest.approx(710 / 4)
    assert (r.fcr_resolved, r.fcr_repeated) == (2, 1)
    assert r.fcr == pytest.approx(2 / 3)
    assert r.mean_patience == pytest.approx(565 / 3)
    assert r.ring_no_answer == 1
    assert r.occupancy is None and r.logged_in == 0  # agent time belongs to no queue


def test_worked_example_agents_and_site() -> None:
    report = example_report()
    a1 = report.rows("agent", "a1")
    assert [r.interval_start for r in a1] == [T0]
    assert (a1[0].answered, a1[0].handled) == (2, 2)
    assert a1[0].asa == pytest.approx(10.0)
    assert a1[0].aht == pytest.approx(175.0)
    assert (a1[0].logged_in, a1[0].busy, a1[0].available, a1[0].paused) == (1800, 350, 1450, 0)
    assert a1[0].occupancy == pytest.approx(350 / 1800)
    assert a1[0].utilisation == pytest.approx(350 / 1800)
    a2_first, a2_second = report.rows("agent", "a2")
    assert (a2_first.answered, a2_first.aht, a2_first.ring_no_answer) == (2, 180.0, 1)
    assert (a2_first.logged_in, a2_first.busy, a2_first.paused, a2_first.available) == (
        1800, 240, 300, 1260)
    assert a2_first.occupancy == pytest.approx(240 / 1500)
    assert a2_first.utilisation == pytest.approx(240 / 1800)
    # The talk of c7 after 09:30 is agent time of the 09:30 interval ...
    assert a2_second.interval_start == T0 + 1800
    assert (a2_second.logged_in, a2_second.busy, a2_second.available) == (600, 120, 480)
    # ... while the call itself counts where it entered the queue.
    assert a2_second.answered == 0
    site = report.rows("site", "paris")[0]
    assert (site.logged_in, site.busy, site.available, site.paused) == (3600, 590, 2710, 300)
    assert site.occupancy == pytest.approx(590 / 3300)
    assert site.utilisation == pytest.approx(590 / 3600)
    assert site.offered == 7 and site.service_level == pytest.approx(2 / 7)


def test_worked_example_uptime() -> None:
    report = example_report()
    first, second, total = report.uptime
    assert (first.interval_start, first.up, first.down, first.outages) == (T0, 1740, 60, 1)
    assert first.uptime == pytest.approx(1740 / 1800) and first.longest_outage == 60
    assert (second.interval_start, second.up, second.down) == (T0 + 1800, 600, 0)
    assert total.interval_start is None and total.uptime == pytest.approx(2340 / 2400)


def test_uptime_counts_only_known_time_and_open_outages() -> None:
    events = [ComponentEvent(T0 + 100, "sip", False, "paris"),
              ComponentEvent(T0 + 400, "sip", True, "paris"),
              ComponentEvent(T0 + 500, "sip", True, "paris"),  # repeated state: no change
              ComponentEvent(T0 + 3000, "sip", False, "paris")]
    report = compute_kpis(events, CONFIG, end=T0 + 3600)
    first, second, total = report.uptime
    assert (first.up, first.down, first.outages, first.longest_outage) == (1400, 300, 1, 300)
    # The outage still open at the report's end is counted up to the end.
    assert (second.up, second.down, second.outages, second.longest_outage) == (1200, 600, 1, 600)
    assert total.uptime == pytest.approx(2600 / 3500) and total.outages == 2
    assert total.longest_outage == 600


def test_totals_equal_the_sum_of_intervals() -> None:
    report = example_report()
    for total in report.totals:
        parts = report.rows(total.scope, total.key)
        for name in ("offered", "answered", "abandoned", "handled", "logged_in", "busy"):
            assert getattr(total, name) == sum(getattr(p, name) for p in parts), name


def test_fcr_by_disposition_ignores_a_repeat_about_something_else() -> None:
    events = [replace(e, data={"code": "address-change"})
              if e.verb is QueueVerb.DISPOSITION and e.call_id == "c6" else e
              for e in example_events()]
    plain = compute_kpis(events, CONFIG, end=T0 + 2400).rows("queue", "sales")[0]
    assert (plain.fcr_resolved, plain.fcr_repeated) == (2, 1)
    by_code = compute_kpis(events, replace(CONFIG, fcr_same_disposition=True),
                           end=T0 + 2400).rows("queue", "sales")[0]
    assert (by_code.fcr_resolved, by_code.fcr_repeated) == (3, 0)


def test_a_transfer_to_another_queue_is_not_a_repeat_contact() -> None:
    events = []
    for e in example_events():
        if e.call_id == "c2" and e.verb is QueueVerb.COMPLETEAGENT:
            events.append(replace(e, verb=QueueVerb.TRANSFER, data={"extension": "billing"}))
            events += [
                QueueEvent(T0 + 301, "c2", "billing", "", "+3322", QueueVerb.ENTERQUEUE,
                           site="paris"),
                QueueEvent(T0 + 310, "c2", "billing", "a1", "", QueueVerb.CONNECT, site="paris"),
                QueueEvent(T0 + 390, "c2", "billing", "a1", "", QueueVerb.COMPLETECALLER,
                           site="paris"),
            ]
        else:
            events.append(e)
    report = compute_kpis(events, CONFIG, end=T0 + 2400)
    assert report.anomalies == 0
    sales = report.rows("queue", "sales")[0]
    assert (sales.answered, sales.fcr_resolved, sales.fcr_repeated) == (4, 2, 1)
    billing = report.rows("queue", "billing")[0]
    assert (billing.offered, billing.answered, billing.asa) == (1, 1, 9.0)
    assert (billing.fcr_resolved, billing.fcr_repeated) == (1, 0)


def test_fcr_is_undetermined_until_the_window_has_passed() -> None:
    early = compute_kpis(example_events(), CONFIG, end=T0 + 2400).rows("queue", "sales")[0]
    late = compute_kpis(example_events(), CONFIG, end=T0 + 1950 + 1800).rows("queue", "sales")[0]
    assert early.fcr_resolved + early.fcr_repeated == 3  # c7's window is still open
    assert late.fcr_resolved + late.fcr_repeated == 4


@pytest.mark.parametrize("interval", [900, 3600])
def test_other_interval_lengths(interval: int) -> None:
    report = example_report(replace(CONFIG, interval=interval))
    rows = report.rows("queue", "sales")
    assert sum(r.offered for r in rows) == 7
    if interval == 3600:
        [r] = rows
        assert r.service_level == pytest.approx(2 / 7)
        [a2] = report.rows("agent", "a2")
        assert a2.logged_in == 2400 and a2.busy == 360
    else:
        # c7 entered at 09:28:20, in the 09:15 quarter hour.
        assert [(r.interval_start - T0, r.offered) for r in rows] == [(0, 6), (900, 1)]


def test_utc_offset_moves_interval_boundaries() -> None:
    cfg = KpiConfig(interval=3600, utc_offset=5 * 3600 + 1800)  # e.g. India, +05:30
    assert cfg.interval_start(T0 + 10) == T0 - 1800
    assert cfg.interval_start(T0 + 1800) == T0 + 1800


def test_events_out_of_order_are_refused_and_change_nothing() -> None:
    engine = KpiEngine(CONFIG)
    events = example_events()
    for event in events[:10]:
        engine.feed(event)
    before = engine.report()
    with pytest.raises(EventError, match="time order"):
        engine.feed(replace(events[3], at=T0))
    assert engine.report() == before


def test_unsorted_batch_gives_the_same_report() -> None:
    events = example_events()
    shuffled = events[:]
    random.Random(7).shuffle(shuffled)
    # Equal times keep their order only in a stable sort of the original order.
    in_order = compute_kpis(events, CONFIG, end=T0 + 2400)
    ties_kept = sorted(shuffled, key=lambda e: (e.at, events.index(e)))
    assert compute_kpis(ties_kept, CONFIG, end=T0 + 2400) == in_order


def test_log_starting_mid_call_rebuilds_the_entry_from_the_wait() -> None:
    late = [e for e in example_events() if not (e.call_id == "c2" and
                                                e.verb is QueueVerb.ENTERQUEUE)]
    r = compute_kpis(late, CONFIG, end=T0 + 2400).rows("queue", "sales")[0]
    assert r.answered == 4 and r.asa == pytest.approx(190 / 4)


def test_anomalies_are_counted_not_fatal() -> None:
    events = example_events()
    bogus = [QueueEvent(T0 + 26, "c1", "sales", "a1", "", QueueVerb.CONNECT, site="paris"),
             QueueEvent(T0 + 27, "zz", "sales", "a9", "", QueueVerb.COMPLETECALLER,
                        site="paris")]
    report = compute_kpis(events + bogus, CONFIG, end=T0 + 2400)
    assert report.anomalies >= 2
    assert report.rows("queue", "sales")[0].answered == 4


def test_queue_log_round_trip() -> None:
    for line in WORKED_EXAMPLE.splitlines():
        event = parse_queue_log_line(line, site="paris")
        assert format_queue_log_line(event) == line
        assert parse_queue_log_line(format_queue_log_line(event), site="paris") == event


@pytest.mark.parametrize(("line", "message"), [
    ("1793610000|c1|sales", "at least 5 fields"),
    ("soon|c1|sales|NONE|ENTERQUEUE", "time field"),
    ("1793610000|c1|sales|NONE|TELEPORT", "unknown queue_log verb"),
    ("1793610000|c1|sales|a1|CONNECT|fifteen", "wait is not a number"),
    ("1793610000|c1|sales|a1|PAUSE|" + "x" * 5000, "longer than"),
])
def test_bad_queue_log_lines_name_the_problem(line: str, message: str) -> None:
    with pytest.raises(EventError, match=message):
        parse_queue_log_line(line)
    with pytest.raises(EventError, match="line 2"):
        list(read_queue_log(["1793610000|NONE|NONE|a1|AGENTLOGIN", line]))


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="interval"):
        KpiConfig(interval=600)
    with pytest.raises(ValueError, match="short_abandon"):
        KpiConfig(short_abandon=-1)


# --------------------------------------------------------------------------------------------
# Live board


def test_live_board_follows_the_worked_example() -> None:
    board = LiveBoard(CONFIG)
    events = example_events()
    for event in (e for e in events if e.at <= T0 + 45):
        board.apply(event)
    snap = board.snapshot(T0 + 45)
    [sales] = snap.queues
    assert (sales.waiting, sales.longest_wait) == (2, 25)  # c2 since +20, c4 since +40
    assert snap.agents == {"a1": AgentState.ON_CALL, "a2": AgentState.AVAILABLE}
    assert snap.agents_by_state[AgentState.ON_CALL] == 1
    for event in (e for e in events if T0 + 45 < e.at <= T0 + 1100):
        board.apply(event)
    snap = board.snapshot(T0 + 1100)
    assert snap.agents["a2"] is AgentState.PAUSED
    assert snap.queues[0].waiting == 0 and snap.queues[0].longest_wait == 0
    for event in (e for e in events if e.at > T0 + 1100):
        board.apply(event)
    snap = board.snapshot(T0 + 2400)
    q = snap.queues[0]
    assert (q.offered, q.answered, q.abandoned, q.answered_within) == (7, 4, 2, 2)
    assert q.service_level == pytest.approx(2 / 7)
    assert snap.agents_by_state[AgentState.LOGGED_OUT] == 2
    assert sum(snap.agents_by_state.values()) == 2


def simulated_day(seed: int, calls: int = 400) -> list[QueueEvent]:
    """A random but consistent event stream: 3 queues, 6 agents, abandons, holds, wrap-up."""
    rng = random.Random(seed)
    events: list[QueueEvent] = []
    free_at = {f"a{i}": T0 for i in range(6)}
    for agent in free_at:
        events.append(QueueEvent(T0, "", "", agent, "", QueueVerb.AGENTLOGIN, site="s"))
    at = T0
    for n in range(calls):
        at += rng.expovariate(1 / 40)
        call, queue = f"c{n}", rng.choice(["sales", "support", "billing"])
        caller = f"+33{rng.randrange(150)}"
        events.append(QueueEvent(at, call, queue, "", caller, QueueVerb.ENTERQUEUE, site="s"))
        agent = min(free_at, key=free_at.get)
        start = max(at, free_at[agent])
        patience = rng.expovariate(1 / 90)
        if start - at > patience:
            verb = QueueVerb.ABANDON if rng.random() < 0.8 else QueueVerb.EXITWITHTIMEOUT
            events.append(QueueEvent(at + patience, call, queue, "", "", verb, site="s"))
            continue
        talk = rng.expovariate(1 / 150)
        hold = rng.random() * talk / 4 if rng.random() < 0.3 else 0.0
        wrap = rng.expovariate(1 / 20)
        events.append(QueueEvent(start, call, queue, agent, "", QueueVerb.CONNECT, site="s"))
        if hold:
            events.append(QueueEvent(start + 1, call, queue, agent, "", QueueVerb.HOLD, site="s"))
            events.append(QueueEvent(start + 1 + hold, call, queue, agent, "", QueueVerb.UNHOLD,
                                     site="s"))
        end = start + 1 + hold + talk
        events.append(QueueEvent(end, call, queue, agent, "", QueueVerb.COMPLETECALLER, site="s"))
        events.append(QueueEvent(end, call, queue, agent, "", QueueVerb.WRAPUPSTART, site="s"))
        events.append(QueueEvent(end + wrap, call, queue, agent, "", QueueVerb.WRAPUPEND,
                                 site="s"))
        free_at[agent] = end + wrap
    return sorted(events, key=lambda e: e.at)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_live_board_agrees_with_the_engine_on_a_simulated_day(seed: int) -> None:
    events = simulated_day(seed)
    engine, board = KpiEngine(CONFIG), LiveBoard(CONFIG)
    for event in events:
        engine.feed(event)
        board.apply(event)
    report = engine.report()
    assert report.anomalies == 0 and board.anomalies == 0
    snap = board.snapshot(events[-1].at)
    totals = {r.key: r for r in report.totals if r.scope == "queue"}
    for q in snap.queues:
        t = totals[q.queue]
        assert (q.offered, q.answered, q.abandoned, q.answered_within) == (
            t.offered, t.answered, t.abandoned, t.answered_within)
        assert q.waiting == t.waiting
    site = [r for r in report.totals if r.scope == "site"][0]
    # Every handled second is agent busy time, and every agent second is one of the kinds.
    assert site.busy == pytest.approx(site.talk + site.hold + site.wrap_up)
    assert site.logged_in == pytest.approx(site.busy + site.available + site.paused)
    assert 0 < site.occupancy <= 1
    for row in report.intervals + report.totals:
        if row.service_level is not None:
            assert 0 <= row.service_level <= row.service_level_excluding_abandons <= 1
        if row.utilisation is not None and row.occupancy is not None:
            assert 0 <= row.utilisation <= row.occupancy <= 1
        if row.asa is not None:
            assert row.asa <= row.longest_wait
    for total in report.totals:
        parts = report.rows(total.scope, total.key)
        for name in ("offered", "answered", "abandoned", "short_abandoned", "timed_out",
                     "handled", "fcr_resolved", "fcr_repeated"):
            assert getattr(total, name) == sum(getattr(p, name) for p in parts), name
        for name in ("talk", "hold", "wrap_up", "logged_in", "busy", "available"):
            assert getattr(total, name) == pytest.approx(sum(getattr(p, name) for p in parts))


def test_live_board_longest_wait_after_callers_leave_out_of_order() -> None:
    board = LiveBoard(CONFIG)
    for i in range(1000):
        board.apply(QueueEvent(T0 + i, f"c{i}", "q", "", "", QueueVerb.ENTERQUEUE))
    # Callers leave from the middle and the front; the oldest remaining decides.
    for i in list(range(500, 1000, 2)) + list(range(0, 300)):
        board.apply(QueueEvent(T0 + 2000, f"c{i}", "q", "", "", QueueVerb.ABANDON))
    assert board.waiting("q") == 1000 - 250 - 300
    assert board.longest_wait("q", T0 + 2000) == 2000 - 300


def test_live_board_caller_moving_queue_and_waiting_limit() -> None:
    board = LiveBoard(CONFIG, max_waiting=3)
    board.apply(QueueEvent(T0, "c1", "sales", "", "", QueueVerb.ENTERQUEUE))
    board.apply(QueueEvent(T0 + 30, "c1", "support", "", "", QueueVerb.ENTERQUEUE))
    assert (board.waiting("sales"), board.waiting("support")) == (0, 1)
    assert board.longest_wait("support", T0 + 40) == 10
    board.apply(QueueEvent(T0 + 31, "c2", "sales", "", "", QueueVerb.ENTERQUEUE))
    board.apply(QueueEvent(T0 + 32, "c3", "sales", "", "", QueueVerb.ENTERQUEUE))
    with pytest.raises(EventError, match="more than 3 callers waiting"):
        board.apply(QueueEvent(T0 + 33, "c4", "sales", "", "", QueueVerb.ENTERQUEUE))
    assert board.waiting("sales") == 2  # the refused caller left nothing behind
    engine = KpiEngine(CONFIG, max_calls=2)
    engine.feed(QueueEvent(T0, "c1", "q", "", "", QueueVerb.ENTERQUEUE))
    engine.feed(QueueEvent(T0, "c2", "q", "", "", QueueVerb.ENTERQUEUE))
    with pytest.raises(EventError, match="more than 2 calls"):
        engine.feed(QueueEvent(T0, "c3", "q", "", "", QueueVerb.ENTERQUEUE))
    assert engine.report().rows("queue", "q")[0].waiting == 2
