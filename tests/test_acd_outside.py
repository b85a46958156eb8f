"""Calls the router did not route (docs/routing.md §6, "Busy outside the queues"), checked on both
routers: they count against the agent's interaction cap while they last, end with no wrap-up and
no statistic, and bad input is refused with the state unchanged."""

from __future__ import annotations

import pytest

from appliance.acd.model import (
    AgentConfig,
    AgentLogin,
    AgentLogout,
    CallEnded,
    CallerJoin,
    LocalProtocolError,
    Member,
    Offer,
    OfferAccepted,
    OutsideCallEnded,
    OutsideCallStarted,
    QueueConfig,
    RouterConfig,
    Strategy,
)
from appliance.acd.reference import ReferenceRouter
from appliance.acd.router import COMPILED, Router

IMPLEMENTATIONS = [
    pytest.param(ReferenceRouter, id="reference"),
    pytest.param(Router, id="compiled",
                 marks=pytest.mark.skipif(not COMPILED, reason="extension not built")),
]


@pytest.fixture(params=IMPLEMENTATIONS)
def make(request):
    """Build a router of the implementation under test; every agent logged in at 0."""
    cls = request.param

    def build(members, caps=None, **queue_kw):
        caps = caps or {}
        cfg = RouterConfig(
            queues=(QueueConfig("q", tuple(Member(a) for a in members), **queue_kw),),
            agents=tuple(AgentConfig(a, max_interactions=caps.get(a, 1)) for a in members))
        r = cls(cfg)
        for a in members:
            assert r.handle(AgentLogin(a), 0.0) == []
        return r

    return build


def test_agent_on_an_outside_call_is_not_offered_until_it_ends(make):
    r = make(["a0"])
    assert r.handle(OutsideCallStarted("a0", "out1", 1.0), 1.0) == []
    assert r.agent_view("a0").outside == 1
    assert r.handle(CallerJoin("c1", "q"), 2.0) == []
    assert r.caller_view("c1").state == "waiting"
    assert r.next_timer() is None  # nothing to retry: the end of the call is an input
    assert r.handle(OutsideCallEnded("a0", "out1", 30.0), 30.0) == [Offer("c1", ("a0",), "q")]
    assert r.agent_view("a0").outside == 0


def test_caller_goes_to_a_free_colleague_instead(make):
    r = make(["a0", "a1"], strategy=Strategy.LINEAR)
    r.handle(OutsideCallStarted("a0", "out1", 1.0), 1.0)
    assert r.handle(CallerJoin("c1", "q"), 2.0) == [Offer("c1", ("a1",), "q")]


def test_multi_interaction_agent_below_the_cap_is_still_offered(make):
    r = make(["m"], caps={"m": 2})
    r.handle(OutsideCallStarted("m", "out1", 1.0), 1.0)
    assert r.handle(CallerJoin("c1", "q"), 2.0) == [Offer("c1", ("m",), "q")]
    r.handle(OfferAccepted("c1", "m"), 3.0)
    # One queue call + one outside call = the cap of 2.
    assert r.handle(CallerJoin("c2", "q"), 4.0) == []
    assert r.handle(OutsideCallEnded("m", "out1", 5.0), 5.0) == [Offer("c2", ("m",), "q")]


def test_two_outside_calls_fill_a_cap_of_two(make):
    r = make(["m"], caps={"m": 2})
    r.handle(OutsideCallStarted("m", "out1", 1.0), 1.0)
    r.handle(OutsideCallStarted("m", "out2", 1.0), 1.0)
    assert r.handle(CallerJoin("c1", "q"), 2.0) == []
    assert r.handle(OutsideCallEnded("m", "out2", 3.0), 3.0) == [Offer("c1", ("m",), "q")]


def test_outside_call_ends_with_no_wrap_up_and_no_statistics(make):
    r = make(["a0"], wrap_up=30.0)
    before = r.snapshot()
    r.handle(OutsideCallStarted("a0", "out1", 5.0), 5.0)
    r.handle(OutsideCallEnded("a0", "out1", 60.0), 60.0)
    view = r.agent_view("a0")
    assert (view.in_wrap_up, view.interactions, view.outside, view.idle_since) == (
        False, 0, 0, 0.0)
    after = r.snapshot()
    assert after["queues"] == before["queues"]  # no handle-time sample, no talk time, no call
    assert r.next_timer() is None
    # A queue call's wrap-up still runs as usual.
    assert r.handle(CallerJoin("c1", "q"), 61.0) == [Offer("c1", ("a0",), "q")]
    r.handle(OfferAccepted("c1", "a0"), 62.0)
    r.handle(CallEnded("c1", "a0"), 70.0)
    assert r.agent_view("a0").in_wrap_up and r.next_timer() == 100.0


def test_outside_call_started_over_the_cap_leaves_the_ringing_offer(make):
    """The agent dials while a queue call rings: the offer keeps ringing (they may still
    answer it), and no further offer comes until both are over."""
    r = make(["m"], caps={"m": 2})
    assert r.handle(CallerJoin("c1", "q"), 1.0) == [Offer("c1", ("m",), "q")]
    assert r.handle(OutsideCallStarted("m", "out1", 2.0), 2.0) == []
    assert r.handle(OutsideCallStarted("m", "out2", 2.0), 2.0) == []
    assert r.caller_view("c1").offered_to == ("m",)
    assert r.handle(CallerJoin("c2", "q"), 3.0) == []
    r.handle(OfferAccepted("c1", "m"), 4.0)
    assert r.handle(OutsideCallEnded("m", "out1", 5.0), 5.0) == []  # 1 + 1 = cap
    assert r.handle(OutsideCallEnded("m", "out2", 6.0), 6.0) == [Offer("c2", ("m",), "q")]


def test_outside_calls_last_across_logout_and_login(make):
    r = make(["a0"])
    r.handle(AgentLogout("a0"), 1.0)
    r.handle(OutsideCallStarted("a0", "out1", 2.0), 2.0)  # dialling while logged out
    r.handle(AgentLogin("a0"), 3.0)
    assert r.handle(CallerJoin("c1", "q"), 4.0) == []
    assert r.handle(OutsideCallEnded("a0", "out1", 9.0), 9.0) == [Offer("c1", ("a0",), "q")]


def test_same_call_may_be_outside_for_two_agents(make):
    """An internal call: the agent who dialled and the colleague rung share the call id."""
    r = make(["a0", "a1"])
    r.handle(OutsideCallStarted("a0", "int1", 1.0), 1.0)
    r.handle(OutsideCallStarted("a1", "int1", 1.0), 1.0)
    assert r.snapshot()["outside"] == (("a0", "int1"), ("a1", "int1"))
    r.handle(OutsideCallEnded("a1", "int1", 2.0), 2.0)
    assert r.snapshot()["outside"] == (("a0", "int1"),)


@pytest.mark.parametrize("event", [
    OutsideCallStarted("nobody", "out9", 2.0),  # unknown agent
    OutsideCallStarted("a0", "out1", 2.0),  # duplicate
    OutsideCallStarted("a0", "", 2.0),
    OutsideCallStarted("a0", 7, 2.0),  # type: ignore[arg-type]
    OutsideCallStarted("a0", "out9", 2.5),  # after now
    OutsideCallStarted("a0", "out9", float("nan")),
    OutsideCallStarted("a0", "out9", "2"),  # type: ignore[arg-type]
    OutsideCallEnded("a0", "never", 2.0),  # unknown call
    OutsideCallEnded("a1", "out1", 2.0),  # another agent's call
    OutsideCallEnded("nobody", "out1", 2.0),
    OutsideCallEnded("a0", "out1", 3.0),  # after now
])
def test_bad_outside_input_is_refused_and_changes_nothing(make, event):
    r = make(["a0", "a1"])
    r.handle(OutsideCallStarted("a0", "out1", 1.0), 1.0)
    before = r.snapshot()
    with pytest.raises(LocalProtocolError):
        r.handle(event, 2.0)
    assert r.snapshot() == before
    # Still usable: the real end is accepted.
    assert r.handle(OutsideCallEnded("a0", "out1", 2.0), 2.0) == []
