"""Alert rules raise and clear with a fake clock (appliance.reporting.alerts)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.reporting.alerts import (
    AgentPausedRule,
    Alert,
    AlertEngine,
    AlertRules,
    CallsWaitingRule,
    LinkDownRule,
    LongCallRule,
    LongestWaitRule,
    SecurityRule,
    ServiceLevelRule,
    Severity,
)

T0 = 1_764_061_200.0
OFF = AlertRules(service_level=None, calls_waiting=None, longest_wait=None, agent_paused=None,
                 long_call=None, link_down=None, security=None)


def only(**rules: object) -> AlertEngine:
    return AlertEngine(AlertRules(**{**{f: None for f in OFF.__dataclass_fields__}, **rules}))


def keys(alerts: list[Alert]) -> list[tuple[str, str, bool]]:
    return [(a.rule, a.key, a.cleared_at is None) for a in alerts]


def enter(engine: AlertEngine, cid: str, at: float, queue: str = "sales") -> None:
    engine.feed("queue.enter", {"call_id": cid, "queue": queue, "caller": "+331"}, at)


def connect(engine: AlertEngine, cid: str, at: float, queue: str = "sales") -> None:
    engine.feed("queue.connect", {"call_id": cid, "queue": queue, "agent": "1001"}, at)


def test_calls_waiting_raises_above_the_limit_holds_in_the_band_and_clears() -> None:
    rule = CallsWaitingRule(above=3, clear_below=2, clear_after_s=30)
    engine = only(calls_waiting=rule)
    for i in range(3):
        enter(engine, f"c{i}", T0 + i)
        enter(engine, f"s{i}", T0 + i, queue="support")
    assert engine.tick(T0 + 3) == []  # 3 waiting is not above 3
    enter(engine, "c3", T0 + 4)
    (raised,) = engine.tick(T0 + 5)
    assert (raised.rule, raised.key, raised.severity) == ("calls_waiting", "sales",
                                                          Severity.WARNING)
    assert raised.raised_at == T0 + 5 and raised.cleared_at is None
    assert "4 callers waiting, limit 3" in raised.message
    assert engine.tick(T0 + 6) == []  # raised once only
    assert engine.active() == [raised]
    # Hold: 2 waiting is under the limit but not under clear_below.
    connect(engine, "c0", T0 + 7)
    engine.feed("queue.abandon", {"call_id": "c1", "queue": "sales", "wait_s": 8}, T0 + 8)
    assert engine.tick(T0 + 100) == [] and engine.next_timer() is None
    # Back to normal (1 waiting) for 20 s, then 2 again: the wait starts over.
    connect(engine, "c2", T0 + 110)
    assert engine.tick(T0 + 110) == []
    assert engine.next_timer() == pytest.approx(T0 + 140)
    enter(engine, "c4", T0 + 130)
    assert engine.tick(T0 + 130) == [] and engine.next_timer() is None
    connect(engine, "c4", T0 + 150)
    assert engine.tick(T0 + 150) == []
    assert engine.tick(T0 + 179) == []
    # Clear: back to normal for clear_after_s without a break.
    (cleared,) = engine.tick(engine.next_timer())
    assert cleared == Alert("calls_waiting", "sales", Severity.WARNING, raised.message, T0 + 5,
                            cleared.cleared_at)
    assert cleared.cleared_at == pytest.approx(T0 + 180)
    assert engine.active() == []


def test_calls_waiting_defaults_leave_a_band() -> None:
    assert CallsWaitingRule(above=10).clear_level == 8
    assert CallsWaitingRule(above=0).clear_level == 1
    engine = only(calls_waiting=CallsWaitingRule(above=10))
    for i in range(11):
        enter(engine, f"c{i}", T0)
    assert keys(engine.tick(T0)) == [("calls_waiting", "sales", True)]
    for i in range(3):  # 8 waiting: under the limit, not under 8
        connect(engine, f"c{i}", T0 + 1)
    assert engine.tick(T0 + 1000) == []
    connect(engine, "c3", T0 + 1001)  # 7 waiting
    assert engine.tick(T0 + 1001) == []
    assert keys(engine.tick(T0 + 1031)) == [("calls_waiting", "sales", False)]


def test_three_waiting_at_a_limit_of_two_raises() -> None:
    engine = only(calls_waiting=CallsWaitingRule(above=2))
    for i in range(3):
        enter(engine, f"c{i}", T0)
    assert keys(engine.tick(T0 + 1)) == [("calls_waiting", "sales", True)]
    engine2 = only(calls_waiting=CallsWaitingRule(above=3))
    for i in range(3):
        enter(engine2, f"c{i}", T0)
    assert engine2.tick(T0 + 1) == []


def test_longest_wait_follows_the_clock_and_clears_under_its_band() -> None:
    engine = only(longest_wait=LongestWaitRule(above_s=120, clear_below_s=60,
                                               clear_after_s=10))
    enter(engine, "c1", T0)
    enter(engine, "c2", T0 + 60)
    assert engine.tick(T0 + 120) == []
    timer = engine.next_timer()
    assert timer is not None and T0 + 120 < timer < T0 + 120.001
    assert keys(engine.tick(timer)) == [("longest_wait", "sales", True)]
    # c1 answered: c2 has waited 70 s, under the limit but not under 60 s: held.
    connect(engine, "c1", T0 + 130)
    assert engine.tick(T0 + 131) == []
    assert engine.tick(T0 + 200) == []  # c2 at 140 s: over the limit, still the same alert
    connect(engine, "c2", T0 + 210)
    enter(engine, "c3", T0 + 210)
    assert engine.tick(T0 + 210) == []  # c3 at 0 s: back to normal, 10 s to go
    assert keys(engine.tick(T0 + 220)) == [("longest_wait", "sales", False)]
    assert engine.tick(T0 + 330) == []  # c3 at 120 s: not over yet
    assert keys(engine.tick(T0 + 331)) == [("longest_wait", "sales", True)]
    assert LongestWaitRule(above_s=120).clear_level == 96


def test_service_level_over_a_sliding_window() -> None:
    rule = ServiceLevelRule(target=0.8, threshold_s=20, window_s=1800, min_calls=4,
                            clear_above=0.85, clear_after_s=60)
    engine = only(service_level=rule)
    waits = [5, 10, 30, 40]  # 2 of 4 within 20 s: 50 %
    for i, wait in enumerate(waits):
        enter(engine, f"c{i}", T0 + i * 60)
        connect(engine, f"c{i}", T0 + i * 60 + wait)
    (raised,) = engine.tick(T0 + 300)
    assert (raised.rule, raised.key) == ("service_level", "sales")
    assert "50%" in raised.message and "target 80%" in raised.message
    # A short abandon counts nowhere.
    enter(engine, "s", T0 + 400)
    engine.feed("queue.abandon", {"call_id": "s", "queue": "sales"}, T0 + 402)
    # Eight quick answers bring it to 10 / 12 = 83 %: over target, under clear_above: held.
    for i in range(8):
        enter(engine, f"q{i}", T0 + 500 + i)
        connect(engine, f"q{i}", T0 + 505 + i)
    assert engine.tick(T0 + 600) == [] and len(engine.active()) == 1
    # Two more: 12 / 14 = 86 %, back to normal; cleared 60 s later.
    for i in range(2):
        enter(engine, f"r{i}", T0 + 700)
        connect(engine, f"r{i}", T0 + 701)
    assert engine.tick(T0 + 701) == []
    assert engine.next_timer() == pytest.approx(T0 + 761)
    assert keys(engine.tick(T0 + 761)) == [("service_level", "sales", False)]
    # The window forgets the four first calls; the next one to age out is q0.
    assert engine.tick(T0 + 2300) == []
    assert engine.next_timer() == pytest.approx(T0 + 505 + 1800)
    # Four slow answers against the ten quick ones left: 10 / 14 = 71 %.
    for i in range(4):
        enter(engine, f"z{i}", T0 + 2200)
        connect(engine, f"z{i}", T0 + 2290)
    assert keys(engine.tick(T0 + 2301)) == [("service_level", "sales", True)]
    assert ServiceLevelRule(target=0.8).clear_level == pytest.approx(0.85)
    assert ServiceLevelRule(target=0.99).clear_level == 1.0


def test_service_level_needs_enough_calls() -> None:
    engine = only(service_level=ServiceLevelRule(min_calls=10))
    for i in range(9):
        enter(engine, f"c{i}", T0 + i)
        connect(engine, f"c{i}", T0 + i + 100)
    assert engine.tick(T0 + 200) == []


def test_agent_paused_too_long_holds_over_a_short_unpause() -> None:
    engine = only(agent_paused=AgentPausedRule(above_s=900, clear_after_s=30))
    engine.feed("agent.login", {"agent": "1001"}, T0)
    engine.feed("agent.pause", {"agent": "1001", "reason": "lunch"}, T0 + 10)
    engine.feed("agent.pause", {"agent": "1002", "reason": "break"}, T0 + 20)
    assert engine.tick(T0 + 910) == []
    assert keys(engine.tick(T0 + 911)) == [("agent_paused", "1001", True)]
    assert keys(engine.tick(T0 + 921)) == [("agent_paused", "1002", True)]
    # 1001 unpauses for 10 s and pauses again: the same pause goes on, the banner stays.
    engine.feed("agent.unpause", {"agent": "1001"}, T0 + 1000)
    assert engine.tick(T0 + 1000) == []
    engine.feed("agent.pause", {"agent": "1001", "reason": "break"}, T0 + 1010)
    assert engine.tick(T0 + 1010) == []
    assert engine.tick(T0 + 1100) == [] and len(engine.active()) == 2
    # Unpaused (or logged out) for 30 s: cleared.
    engine.feed("agent.unpause", {"agent": "1001"}, T0 + 1200)
    engine.feed("agent.logout", {"agent": "1002"}, T0 + 1200)
    assert engine.tick(T0 + 1200) == []
    assert engine.tick(T0 + 1229) == []
    assert sorted(keys(engine.tick(T0 + 1230))) == [("agent_paused", "1001", False),
                                                   ("agent_paused", "1002", False)]
    # A pause well after that is a new one: 900 s again before any alert.
    engine.feed("agent.pause", {"agent": "1001", "reason": "break"}, T0 + 1300)
    assert engine.tick(T0 + 2200) == []
    assert keys(engine.tick(T0 + 2201)) == [("agent_paused", "1001", True)]


def test_long_calls_from_offer_to_end() -> None:
    engine = only(long_call=LongCallRule(above_s=3600))
    engine.feed("call.offered", {"call_id": "c1", "caller": "+331", "dialled": "100"}, T0)
    enter(engine, "c2", T0 + 100)
    connect(engine, "c2", T0 + 110)
    assert keys(engine.tick(T0 + 3601)) == [("long_call", "c1", True)]
    assert keys(engine.tick(T0 + 3701)) == [("long_call", "c2", True)]
    assert engine.tick(T0 + 3900) == []  # held while the calls last
    # A call's end is final: cleared at once (no hysteresis).
    engine.feed("call.ended", {"call_id": "c1", "end_reason": "caller-hung-up"}, T0 + 4000)
    engine.feed("queue.complete", {"call_id": "c2", "queue": "sales", "agent": "1001",
                                   "ended_by": "agent-hung-up"}, T0 + 4000)
    assert sorted(keys(engine.tick(T0 + 4001))) == [("long_call", "c1", False),
                                                   ("long_call", "c2", False)]


def test_cloud_link_down_after_a_grace_period_and_flaps_held() -> None:
    engine = only(link_down=LinkDownRule(after_s=60, clear_after_s=30))
    engine.feed("link.state", {"state": "online", "since": T0}, T0)
    engine.feed("link.state", {"state": "offline", "since": T0 + 100}, T0 + 100)
    engine.feed("link.state", {"state": "offline", "since": T0 + 100}, T0 + 130)  # repeated
    assert engine.tick(T0 + 160) == []
    (raised,) = engine.tick(T0 + 161)
    assert (raised.rule, raised.key, raised.severity) == ("link_down", "cloud",
                                                          Severity.CRITICAL)
    # Up for 10 s, then down again: the same outage, the banner stays.
    engine.feed("link.state", {"state": "online", "since": T0 + 200}, T0 + 200)
    assert engine.tick(T0 + 200) == []
    engine.feed("link.state", {"state": "offline", "since": T0 + 210}, T0 + 210)
    assert engine.tick(T0 + 240) == [] and engine.active() == [raised]
    # Degraded counts as up: cleared after 30 s of it.
    engine.feed("link.state", {"state": "degraded", "since": T0 + 300}, T0 + 300)
    assert engine.tick(T0 + 300) == []
    assert engine.tick(T0 + 329) == []
    assert keys(engine.tick(T0 + 330)) == [("link_down", "cloud", False)]
    # Down again long after: a new outage, 60 s before the alert.
    engine.feed("link.state", {"state": "offline", "since": T0 + 500}, T0 + 500)
    assert engine.tick(T0 + 560) == []
    assert keys(engine.tick(T0 + 561)) == [("link_down", "cloud", True)]


def test_security_burst_holds_until_the_window_calms_down() -> None:
    engine = only(security=SecurityRule(count=3, window_s=300, clear_below=2,
                                        clear_after_s=30))
    engine.feed("security.ban", {"host": "192.0.2.7"}, T0)
    engine.feed("security.login_failed", {"user": "admin"}, T0 + 100)
    assert engine.tick(T0 + 101) == []
    engine.feed("security.login_failed", {"user": "admin"}, T0 + 200)
    assert keys(engine.tick(T0 + 201)) == [("security", "site", True)]
    assert engine.next_timer() == pytest.approx(T0 + 300)
    assert engine.tick(T0 + 301) == []  # the ban aged out: 2 left, not under 2
    assert engine.next_timer() == pytest.approx(T0 + 400)
    assert engine.tick(T0 + 401) == []  # 1 left: back to normal, 30 s to go
    assert keys(engine.tick(T0 + 431)) == [("security", "site", False)]
    assert SecurityRule(count=5).clear_level == 2


@pytest.mark.parametrize(("make", "message"), [
    (lambda: CallsWaitingRule(above=3, clear_below=5), "clear_below"),
    (lambda: CallsWaitingRule(above=3, clear_below=0), "clear_below"),
    (lambda: LongestWaitRule(above_s=60, clear_below_s=90), "clear_below_s"),
    (lambda: ServiceLevelRule(target=0.8, clear_above=0.7), "clear_above"),
    (lambda: SecurityRule(count=3, clear_below=4), "clear_below"),
    (lambda: LinkDownRule(clear_after_s=-1), "clear_after_s"),
    (lambda: AgentPausedRule(clear_after_s=float("nan")), "clear_after_s"),
])
def test_clear_thresholds_on_the_wrong_side_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_without_hysteresis_alerts_clear_at_once() -> None:
    engine = only(calls_waiting=CallsWaitingRule(above=1, clear_below=2, clear_after_s=0))
    enter(engine, "c1", T0)
    enter(engine, "c2", T0)
    assert keys(engine.tick(T0)) == [("calls_waiting", "sales", True)]
    connect(engine, "c1", T0 + 1)
    assert keys(engine.tick(T0 + 1)) == [("calls_waiting", "sales", False)]


def test_bad_payloads_are_counted_not_raised() -> None:
    engine = AlertEngine()
    engine.feed("queue.connect", {"call_id": "c", "wait_s": "soon"}, T0)
    engine.feed("agent.pause", {"reason": "no agent"}, T0)
    engine.feed("link.state", {"no": "state"}, T0)
    engine.feed("link.state", {"state": "offline", "since": "yesterday"}, T0)
    assert engine.ignored == 4
    assert engine.tick(T0 + 1) == [] and engine.next_timer() is None


def test_rules_off_raise_nothing() -> None:
    engine = AlertEngine(OFF)
    for i in range(50):
        enter(engine, f"c{i}", T0)
    engine.feed("security.ban", {}, T0)
    assert engine.tick(T0 + 10_000) == [] and engine.next_timer() is None


def test_tracking_is_bounded() -> None:
    engine = AlertEngine(max_tracked=10)
    for i in range(20):
        enter(engine, f"c{i}", T0)
    assert engine.ignored == 10
    assert Alert("r", "k", Severity.INFO, "m", T0).as_dict() == {
        "rule": "r", "key": "k", "severity": "info", "message": "m", "raised_at": T0,
        "cleared_at": None}


def test_rules_come_from_site_yaml(tmp_path) -> None:
    from appliance.config import ConfigError, parse_site_yaml
    from appliance.reporting.alerts import rules_from_config

    config = parse_site_yaml("sip: {tls_port: null}\nalerts:\n  calls_waiting: {above: 1}\n"
                             "  security: null\n  agent_paused: {above: 60}\n",
                             site_dir=tmp_path)
    rules = rules_from_config(config.alerts)
    assert rules.security is None and rules.calls_waiting == CallsWaitingRule(above=1)
    assert rules.agent_paused == AgentPausedRule(above_s=60.0)
    assert rules.service_level == ServiceLevelRule()  # defaults when not written
    assert rules.longest_wait == LongestWaitRule()
    assert rules.link_down == LinkDownRule() and rules.long_call == LongCallRule()
    engine = AlertEngine(rules)
    enter(engine, "c1", T0)
    enter(engine, "c2", T0)
    for _ in range(10):
        engine.feed("security.ban", {}, T0)
    assert keys(engine.tick(T0 + 1)) == [("calls_waiting", "sales", True)]
    with pytest.raises(ConfigError, match="alerts.calls_waiting.above"):
        parse_site_yaml("sip: {tls_port: null}\nalerts:\n  calls_waiting: {above: -1}\n",
                        site_dir=tmp_path)


def test_hysteresis_keys_come_from_site_yaml(tmp_path) -> None:
    from appliance.config import ConfigError, parse_site_yaml
    from appliance.reporting.alerts import rules_from_config

    config = parse_site_yaml(
        "sip: {tls_port: null}\nalerts:\n"
        "  service_level: {target: 0.9, clear_above: 0.95, clear_after: 120}\n"
        "  calls_waiting: {above: 5, clear_below: 3, clear_after: 0}\n"
        "  longest_wait: {above: 60, clear_below: 30, clear_after: 15}\n"
        "  agent_paused: {clear_after: 45}\n"
        "  link_down: {after: 30, clear_after: 90}\n"
        "  security: {count: 4, clear_below: 1, clear_after: 600}\n", site_dir=tmp_path)
    rules = rules_from_config(config.alerts)
    assert rules.service_level == ServiceLevelRule(target=0.9, clear_above=0.95,
                                                   clear_after_s=120.0)
    assert rules.calls_waiting == CallsWaitingRule(above=5, clear_below=3, clear_after_s=0)
    assert rules.longest_wait == LongestWaitRule(above_s=60.0, clear_below_s=30.0,
                                                 clear_after_s=15)
    assert rules.agent_paused == AgentPausedRule(above_s=900.0, clear_after_s=45)
    assert rules.link_down == LinkDownRule(after_s=30.0, clear_after_s=90)
    assert rules.security == SecurityRule(count=4, clear_below=1, clear_after_s=600)
    for text, where in [
        ("calls_waiting: {above: 5, clear_below: 7}", "alerts.calls_waiting.clear_below"),
        ("longest_wait: {above: 60, clear_below: 61}", "alerts.longest_wait.clear_below"),
        ("service_level: {target: 0.9, clear_above: 0.5}", "alerts.service_level.clear_above"),
        ("security: {count: 2, clear_below: 3}", "alerts.security.clear_below"),
        ("link_down: {clear_after: -5}", "alerts.link_down.clear_after"),
    ]:
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            parse_site_yaml(f"sip: {{tls_port: null}}\nalerts:\n  {text}\n", site_dir=tmp_path)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["offer", "enter", "connect", "end", "tick"]),
                          st.integers(0, 7), st.integers(0, 50)), max_size=60))
def test_call_timers_match_a_scan_of_every_call(steps: list[tuple[str, int, int]]) -> None:
    # The engine keeps the oldest live call and waiting caller at hand rather than scanning
    # them all at every event: its long-call alerts and next_timer() must be what a scan of
    # every call gives, whatever the order of offers, queue events and ends.
    engine = only(long_call=LongCallRule(above_s=20),
                  longest_wait=LongestWaitRule(above_s=15, clear_below_s=10, clear_after_s=0))
    started: dict[str, float] = {}
    waiting: dict[str, float] = {}
    now = T0
    for action, n, dt in steps:
        now += dt
        cid = f"c{n}"
        if action == "offer":
            engine.feed("call.offered", {"call_id": cid, "caller": "+1", "dialled": "1"}, now)
            started.setdefault(cid, now)
        elif action == "enter":
            enter(engine, cid, now)
            waiting[cid] = now
            started.setdefault(cid, now)
        elif action == "connect":
            connect(engine, cid, now)
            waiting.pop(cid, None)
        elif action == "end":
            engine.feed("call.ended", {"call_id": cid, "end_reason": "x"}, now)
            started.pop(cid, None)
        else:
            engine.tick(now)
            long_calls = {a.key for a in engine.active() if a.rule == "long_call"}
            assert long_calls == {c for c, at in started.items() if now - at > 20}
        times = [min(waiting.values()) + 15] if waiting else []
        times += [min(started.values()) + 20] if started else []
        due = engine.next_timer()
        if not engine.active():
            assert due == (math.nextafter(min(times), math.inf) if times else None)
