"""The SIP guard: bans after failed authentication, per-source rate limit, scanner filter.

Time is a parameter: every test drives ``now`` by hand.
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import GuardConfig
from appliance.sip.guard import Guard, GuardVerdict
from appliance.sip.source import Source

ATTACKER = Source("UDP", "192.0.2.66", 5070)
PHONE = Source("UDP", "192.0.2.10", 5060)
ALLOW, DROP = GuardVerdict.ALLOW, GuardVerdict.DROP


class Req:
    """The one thing the guard reads from a request: its User-Agent header."""

    def __init__(self, user_agent: str | None = None) -> None:
        self.user_agent = user_agent

    def get(self, name: str) -> str | None:
        return self.user_agent if name.lower() == "user-agent" else None


def guard(**overrides) -> Guard:
    return Guard(GuardConfig(**overrides))


def test_defaults_are_on_and_match_the_documented_policy() -> None:
    g = guard()
    assert g.enabled
    assert (g.max_auth_failures, g.failure_window, g.ban_time) == (5, 60, 900)
    assert (g.rate_limit, g.rate_burst) == (50, 100)


def test_five_failures_within_the_window_ban_the_source_for_ban_time(caplog) -> None:
    g = guard()
    caplog.set_level(logging.INFO, logger="edgecc.sip.guard")
    for i in range(4):
        g.auth_failed(ATTACKER, 100.0 + i)
        assert g.admit(Req(), ATTACKER, 100.0 + i) is ALLOW
    g.auth_failed(ATTACKER, 104.0)
    assert g.admit(Req(), ATTACKER, 104.0) is DROP
    assert g.check(Req(), ATTACKER, 104.5).reason == "banned"
    # The same host from another port is the same source; other hosts are untouched.
    assert g.admit(Req(), Source("TCP", ATTACKER.host, 40000), 105.0) is DROP
    assert g.admit(Req(), PHONE, 105.0) is ALLOW
    assert g.admit(Req(), ATTACKER, 104.0 + 899.0) is DROP
    assert g.admit(Req(), ATTACKER, 104.0 + 900.0) is ALLOW
    bans = [r.getMessage() for r in caplog.records if "sip_guard_ban" in r.getMessage()]
    assert bans == [
        "event=sip_guard_ban source=192.0.2.66 transport=UDP failures=5 window_s=60 ban_s=900"
    ]


def test_each_new_ban_is_told_once_and_a_failing_listener_changes_nothing() -> None:
    g = guard()
    told: list[tuple[str, float, int]] = []
    g.on_ban = lambda source, until, failures: told.append((source.host, until, failures))
    for i in range(5):
        g.auth_failed(ATTACKER, 100.0 + i)
    g.auth_failed(ATTACKER, 106.0)  # already banned: no second ban
    assert told == [(ATTACKER.host, 104.0 + 900.0, 5)]

    def broken(*_: object) -> None:
        raise RuntimeError("listener down")

    g.on_ban = broken
    for i in range(5):
        g.auth_failed(PHONE, 200.0 + i)
    assert g.admit(Req(), PHONE, 205.0) is DROP  # banned all the same


def test_failures_spread_wider_than_the_window_do_not_ban() -> None:
    g = guard()
    for i in range(20):
        g.auth_failed(ATTACKER, i * 16.0)  # any 5 failures span 64 s > 60 s
        assert g.admit(Req(), ATTACKER, i * 16.0) is ALLOW
    g.auth_failed(ATTACKER, 19 * 16.0 + 1)  # now 5 within 49 s
    assert g.admit(Req(), ATTACKER, 19 * 16.0 + 1) is DROP


def test_success_does_not_reset_the_failure_count() -> None:
    g = guard()
    for i in range(4):
        g.auth_failed(ATTACKER, float(i))
    g.auth_succeeded(ATTACKER, 4.0)
    g.auth_failed(ATTACKER, 5.0)
    assert g.admit(Req(), ATTACKER, 5.0) is DROP


def test_limits_are_configurable() -> None:
    g = guard(max_auth_failures=2, failure_window=10, ban_time=30)
    g.auth_failed(ATTACKER, 0.0)
    assert g.admit(Req(), ATTACKER, 0.0) is ALLOW
    g.auth_failed(ATTACKER, 9.0)
    assert g.admit(Req(), ATTACKER, 9.0) is DROP
    assert g.next_timer() == 39.0
    assert g.bans(10.0) == {ATTACKER.host: 29.0}
    assert g.admit(Req(), ATTACKER, 39.0) is ALLOW
    assert g.bans(39.0) == {}


def test_token_bucket_allows_the_burst_then_the_rate() -> None:
    g = guard(rate_limit=10, rate_burst=20)
    verdicts = [g.admit(Req(), PHONE, 0.0) for _ in range(25)]
    assert verdicts.count(ALLOW) == 20 and verdicts[20:] == [DROP] * 5
    assert g.check(Req(), PHONE, 0.0).reason == "rate limited"
    # 0.5 s later, 5 tokens have come back.
    later = [g.admit(Req(), PHONE, 0.5) for _ in range(7)]
    assert later.count(ALLOW) == 5
    # Another source has its own bucket.
    assert g.admit(Req(), ATTACKER, 0.5) is ALLOW
    assert g.dropped["rate limited"] == 1 + 5 + 2


def test_scanner_user_agents_are_dropped_case_insensitively() -> None:
    g = guard()
    assert g.admit(Req("friendly-scanner"), ATTACKER, 0.0) is DROP
    assert g.admit(Req("SIPVicious 0.3.4"), ATTACKER, 0.0) is DROP
    assert g.check(Req("sipcli/v1.8"), ATTACKER, 0.0).reason == "scanner"
    assert g.admit(Req("Yealink SIP-T46U 108.86.0.45"), PHONE, 0.0) is ALLOW
    assert g.admit(Req(None), PHONE, 0.0) is ALLOW
    custom = guard(scanner_user_agents=["evil-dialer"])
    assert custom.admit(Req("Evil-Dialer 2"), ATTACKER, 0.0) is DROP
    assert custom.admit(Req("friendly-scanner"), ATTACKER, 0.0) is ALLOW


def test_exempt_sources_are_never_banned_or_limited() -> None:
    g = guard(exempt_sources=["192.0.2.0/28", "2001:db8::/32"], rate_limit=1, rate_burst=1)
    sbc = Source("UDP", "192.0.2.5", 5060)
    for i in range(50):
        g.auth_failed(sbc, float(i) * 0.01)
        assert g.admit(Req(), sbc, float(i) * 0.01) is ALLOW
    assert g.check(Req(), sbc, 1.0).reason == "exempt"
    assert g.admit(Req(), Source("TCP", "2001:db8::7", 5060), 1.0) is ALLOW
    assert g.admit(Req(), Source("TCP", "[2001:db8::7]", 5060), 1.0) is ALLOW
    outside = Source("UDP", "192.0.2.17", 5060)
    assert [g.admit(Req(), outside, 2.0) for _ in range(2)] == [ALLOW, DROP]


def test_disabled_guard_allows_everything() -> None:
    g = guard(enabled=False)
    for i in range(10):
        g.auth_failed(ATTACKER, float(i))
    assert g.admit(Req("friendly-scanner"), ATTACKER, 10.0) is ALLOW
    assert g.check(Req(), ATTACKER, 10.0).reason == "disabled"


def test_tables_stay_bounded_under_a_spray_of_sources() -> None:
    g = Guard(GuardConfig(), max_sources=100)
    for i in range(1000):
        src = Source("UDP", f"10.0.{i // 256}.{i % 256}", 5060)
        g.admit(Req(), src, 0.0)
        g.auth_failed(src, 0.0)
    assert len(g._buckets) <= 100
    assert len(g._failures) <= 100
    assert len(g._exempt_cache) <= 100


def test_prune_forgets_idle_state_and_expired_bans() -> None:
    g = guard(max_auth_failures=1, ban_time=10)
    g.auth_failed(ATTACKER, 0.0)
    g.admit(Req(), PHONE, 0.0)
    assert g.bans(0.0)
    g.prune(100.0)
    assert g.bans(100.0) == {} and not g._buckets and not g._failures
    assert g.next_timer() is None


def test_bad_guard_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        Guard(GuardConfig().model_copy(update={"rate_burst": 0}))
    with pytest.raises(ValueError):
        Guard(GuardConfig().model_copy(update={"exempt_sources": ("not-a-cidr",)}))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 3),  # which source
            st.sampled_from(["fail", "succeed", "admit"]),
            st.floats(0, 40, allow_nan=False),  # seconds since the previous step
        ),
        max_size=80,
    )
)
def test_bans_match_a_plain_reference_model(steps) -> None:
    """State x input: the guard agrees with a naive model of the ban rule at every step."""
    g = guard(
        max_auth_failures=3, failure_window=30, ban_time=100, rate_limit=1e6, rate_burst=10**6
    )
    sources = [Source("UDP", f"198.51.100.{i}", 5060) for i in range(4)]
    failures: dict[int, list[float]] = {i: [] for i in range(4)}
    banned_until: dict[int, float] = {}
    now = 0.0
    for who, op, dt in steps:
        now += dt
        banned = banned_until.get(who, -1.0) > now
        if op == "fail":
            g.auth_failed(sources[who], now)
            if not banned:
                failures[who].append(now)
                recent = [t for t in failures[who] if now - t <= 30]
                if len(recent) >= 3:
                    banned_until[who] = now + 100
                    failures[who] = []
        elif op == "succeed":
            g.auth_succeeded(sources[who], now)
        else:
            expected = DROP if banned else ALLOW
            assert g.admit(Req(), sources[who], now) is expected
