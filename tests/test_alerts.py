"""Alert rules raise and clear with a fake clock (appliance.reporting.alerts)."""

from __future__ import annotations

import pytest

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


def test_calls_waiting_raises_above_the_limit_and_clears() -> None:
    engine = only(calls_waiting=CallsWaitingRule(above=3))
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
    connect(engine, "c0", T0 + 7)
    engine.feed("queue.abandon", {"call_id": "c1", "queue": "sales", "wait_s": 8}, T0 + 8)
    (cleared,) = engine.tick(T0 + 9)
    assert cleared == Alert("calls_waiting", "sales", Severity.WARNING, raised.message, T0 + 5,
                            T0 + 9)
    assert engine.active() == []


def test_three_waiting_at_a_limit_of_two_raises() -> None:
    engine = only(calls_waiting=CallsWaitingRule(above=2))
    for i in range(3):
        enter(engine, f"c{i}", T0)
    assert keys(engine.tick(T0 + 1)) == [("calls_waiting", "sales", True)]
    engine2 = only(calls_waiting=CallsWaitingRule(above=3))
    for i in range(3):
        enter(engine2, f"c{i}", T0)
    assert engine2.tick(T0 + 1) == []


def test_longest_wait_follows_the_clock() -> None:
    engine = only(longest_wait=LongestWaitRule(above_s=120))
    enter(engine, "c1", T0)
    enter(engine, "c2", T0 + 60)
    assert engine.tick(T0 + 120) == []
    timer = engine.next_timer()
    assert timer is not None and T0 + 120 < timer < T0 + 120.001
    assert keys(engine.tick(timer)) == [("longest_wait", "sales", True)]
    connect(engine, "c1", T0 + 130)  # c2 has waited 70 s: below the limit
    assert keys(engine.tick(T0 + 131)) == [("longest_wait", "sales", False)]
    assert keys(engine.tick(T0 + 181)) == [("longest_wait", "sales", True)]  # c2 at 121 s


def test_service_level_over_a_sliding_window() -> None:
    rule = ServiceLevelRule(target=0.8, threshold_s=20, window_s=1800, min_calls=4)
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
    # Eight quick answers bring it to 10 / 12 = 83 %.
    for i in range(8):
        enter(engine, f"q{i}", T0 + 500 + i)
        connect(engine, f"q{i}", T0 + 505 + i)
    assert keys(engine.tick(T0 + 600)) == [("service_level", "sales", False)]
    # The window forgets the four first calls; the next one to age out is q0.
    assert engine.tick(T0 + 2300) == []
    assert engine.next_timer() == pytest.approx(T0 + 505 + 1800)
    # Three slow answers against the eight quick ones left: 8 / 11 = 73 %.
    for i in range(3):
        enter(engine, f"z{i}", T0 + 2200)
        connect(engine, f"z{i}", T0 + 2290)
    assert keys(engine.tick(T0 + 2301)) == [("service_level", "sales", True)]


def test_service_level_needs_enough_calls() -> None:
    engine = only(service_level=ServiceLevelRule(min_calls=10))
    for i in range(9):
        enter(engine, f"c{i}", T0 + i)
        connect(engine, f"c{i}", T0 + i + 100)
    assert engine.tick(T0 + 200) == []


def test_agent_paused_too_long() -> None:
    engine = only(agent_paused=AgentPausedRule(above_s=900))
    engine.feed("agent.login", {"agent": "1001"}, T0)
    engine.feed("agent.pause", {"agent": "1001", "reason": "lunch"}, T0 + 10)
    engine.feed("agent.pause", {"agent": "1002", "reason": "break"}, T0 + 20)
    assert engine.tick(T0 + 910) == []
    assert keys(engine.tick(T0 + 911)) == [("agent_paused", "1001", True)]
    assert keys(engine.tick(T0 + 921)) == [("agent_paused", "1002", True)]
    engine.feed("agent.unpause", {"agent": "1001"}, T0 + 1000)
    engine.feed("agent.logout", {"agent": "1002"}, T0 + 1000)
    assert sorted(keys(engine.tick(T0 + 1001))) == [("agent_paused", "1001", False),
                                                   ("agent_paused", "1002", False)]


def test_long_calls_from_offer_to_end() -> None:
    engine = only(long_call=LongCallRule(above_s=3600))
    engine.feed("call.offered", {"call_id": "c1", "caller": "+331", "dialled": "100"}, T0)
    enter(engine, "c2", T0 + 100)
    connect(engine, "c2", T0 + 110)
    assert keys(engine.tick(T0 + 3601)) == [("long_call", "c1", True)]
    assert keys(engine.tick(T0 + 3701)) == [("long_call", "c2", True)]
    engine.feed("call.ended", {"call_id": "c1", "end_reason": "caller-hung-up"}, T0 + 4000)
    engine.feed("queue.complete", {"call_id": "c2", "queue": "sales", "agent": "1001",
                                   "ended_by": "agent-hung-up"}, T0 + 4000)
    assert sorted(keys(engine.tick(T0 + 4001))) == [("long_call", "c1", False),
                                                   ("long_call", "c2", False)]


def test_cloud_link_down_after_a_grace_period() -> None:
    engine = only(link_down=LinkDownRule(after_s=60))
    engine.feed("link.state", {"state": "online", "since": T0}, T0)
    engine.feed("link.state", {"state": "offline", "since": T0 + 100}, T0 + 100)
    engine.feed("link.state", {"state": "offline", "since": T0 + 100}, T0 + 130)  # repeated
    assert engine.tick(T0 + 160) == []
    (raised,) = engine.tick(T0 + 161)
    assert (raised.rule, raised.key, raised.severity) == ("link_down", "cloud",
                                                          Severity.CRITICAL)
    engine.feed("link.state", {"state": "degraded", "since": T0 + 200}, T0 + 200)
    assert keys(engine.tick(T0 + 201)) == [("link_down", "cloud", False)]


def test_security_burst() -> None:
    engine = only(security=SecurityRule(count=3, window_s=300))
    engine.feed("security.ban", {"host": "192.0.2.7"}, T0)
    engine.feed("security.login_failed", {"user": "admin"}, T0 + 100)
    assert engine.tick(T0 + 101) == []
    engine.feed("security.login_failed", {"user": "admin"}, T0 + 200)
    assert keys(engine.tick(T0 + 201)) == [("security", "site", True)]
    assert engine.next_timer() == pytest.approx(T0 + 300)
    assert keys(engine.tick(T0 + 301)) == [("security", "site", False)]  # the ban aged out


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
    engine = AlertEngine(rules)
    enter(engine, "c1", T0)
    enter(engine, "c2", T0)
    for _ in range(10):
        engine.feed("security.ban", {}, T0)
    assert keys(engine.tick(T0 + 1)) == [("calls_waiting", "sales", True)]
    with pytest.raises(ConfigError, match="alerts.calls_waiting.above"):
        parse_site_yaml("sip: {tls_port: null}\nalerts:\n  calls_waiting: {above: -1}\n",
                        site_dir=tmp_path)
