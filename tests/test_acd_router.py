"""ACD routing rules, checked on both routers: the pure-Python reference and the compiled core."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from appliance.acd.model import (
    AUTO_PAUSE_REASON,
    AgentConfig,
    AgentLogin,
    AgentLogout,
    AgentPause,
    AgentUnpause,
    Announce,
    AnnounceRequest,
    AutoPause,
    CallbackOutcome,
    CallbackRequested,
    CallbackResult,
    CallEnded,
    CallerAbandon,
    CallerJoin,
    CancelOffer,
    ConfigError,
    DialCallback,
    EmptyRule,
    LocalProtocolError,
    Member,
    Offer,
    OfferAccepted,
    OfferRejected,
    OfferTimeout,
    Overflow,
    OverflowReason,
    QueueConfig,
    RelaxStep,
    RouterConfig,
    Strategy,
    WrapUpEnded,
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
    """Build a router of the implementation under test from queues and agents."""
    cls = request.param

    def build(queues, agents, **kw):
        return cls(RouterConfig(queues=tuple(queues), agents=tuple(agents), **kw))

    return build


def agents(*ids: str, **kw) -> list[AgentConfig]:
    return [AgentConfig(a, **kw) for a in ids]


def queue(name: str, *members: str, **kw) -> QueueConfig:
    return QueueConfig(name, tuple(Member(m) for m in members), **kw)


def login_all(r, ids, now=0.0, step=0.0):
    for i, a in enumerate(ids):
        assert r.handle(AgentLogin(a), now + i * step) == []


def serve(r, call, q, now, *, talk=0.0):
    """Join ``call``, answer it at whoever it is offered to, end it after ``talk`` seconds;
    returns the agent."""
    out = r.handle(CallerJoin(call, q), now)
    assert len(out) == 1 and isinstance(out[0], Offer), out
    agent = out[0].agents[0]
    assert r.handle(OfferAccepted(call, agent), now) == []
    r.handle(CallEnded(call, agent), now + talk)
    return agent


# ------------------------------------------------------------------------------ strategies

def test_linear_takes_the_first_free_member_in_order(make):
    r = make([queue("q", "a2", "a0", "a1", strategy=Strategy.LINEAR)], agents("a0", "a1", "a2"))
    login_all(r, ["a0", "a1", "a2"])
    assert r.handle(CallerJoin("c1", "q"), 1) == [Offer("c1", ("a2",), "q")]
    assert r.handle(CallerJoin("c2", "q"), 1) == [Offer("c2", ("a0",), "q")]
    r.handle(OfferAccepted("c1", "a2"), 2)
    r.handle(CallEnded("c1", "a2"), 3)
    assert r.handle(CallerJoin("c3", "q"), 4) == [Offer("c3", ("a2",), "q")]


def test_ring_all_rings_everyone_and_cancels_the_rest(make):
    r = make([queue("q", "a0", "a1", "a2", strategy=Strategy.RING_ALL)], agents("a0", "a1", "a2"))
    login_all(r, ["a0", "a1", "a2"])
    assert r.handle(CallerJoin("c1", "q"), 1) == [Offer("c1", ("a0", "a1", "a2"), "q")]
    assert r.handle(OfferRejected("c1", "a0"), 2) == []
    assert r.caller_view("c1").offered_to == ("a1", "a2")
    assert r.handle(OfferAccepted("c1", "a2"), 3) == [CancelOffer("c1", ("a1",))]
    assert r.agent_view("a2").interactions == 1
    assert r.agent_view("a1").ringing == 0


def test_longest_idle_takes_the_agent_free_the_longest(make):
    r = make([queue("q", "a0", "a1", "a2", strategy=Strategy.LONGEST_IDLE)],
             agents("a0", "a1", "a2"))
    login_all(r, ["a2", "a0", "a1"], step=1.0)  # a2 idle since 0, a0 since 1, a1 since 2
    order = [serve(r, f"c{i}", "q", 10.0 + i) for i in range(4)]
    assert order == ["a2", "a0", "a1", "a2"]


def test_fewest_calls_counts_calls_per_queue(make):
    r = make([queue("q", "a0", "a1", "a2", strategy=Strategy.FEWEST_CALLS)],
             agents("a0", "a1", "a2"))
    login_all(r, ["a0", "a1", "a2"])
    order = [serve(r, f"c{i}", "q", float(i)) for i in range(6)]
    assert order == ["a0", "a1", "a2", "a0", "a1", "a2"]
    r.handle(AgentLogout("a0"), 10)
    serve(r, "c6", "q", 11)  # a1 now has 3, a2 has 2
    r.handle(AgentLogin("a0"), 12)
    assert serve(r, "c7", "q", 13) == "a0"  # 2 calls, ties with a2, earlier member


def test_least_talk_time_takes_the_agent_who_talked_least(make):
    r = make([queue("q", "a0", "a1", "a2", strategy=Strategy.LEAST_TALK_TIME)],
             agents("a0", "a1", "a2"))
    login_all(r, ["a0", "a1", "a2"])
    assert serve(r, "c0", "q", 0, talk=100) == "a0"
    assert serve(r, "c1", "q", 200, talk=10) == "a1"
    assert serve(r, "c2", "q", 300, talk=50) == "a2"
    assert serve(r, "c3", "q", 400) == "a1"  # 10 s
    assert serve(r, "c4", "q", 500, talk=45) == "a1"  # still 10 s after the 0 s call
    assert serve(r, "c5", "q", 600) == "a2"  # 50 < 55 < 100


def test_round_robin_remembers_where_it_stopped_and_wraps(make):
    r = make([queue("q", "a0", "a1", "a2", "a3", strategy=Strategy.ROUND_ROBIN_MEMORY)],
             agents("a0", "a1", "a2", "a3"))
    login_all(r, ["a0", "a1", "a2", "a3"])
    assert [serve(r, f"c{i}", "q", float(i)) for i in range(5)] == ["a0", "a1", "a2", "a3", "a0"]
    # a2 busy: after a0 comes a1, then a3 (skipping a2), then wrap to a0
    r.handle(AgentPause("a2", "lunch"), 10)
    assert [serve(r, f"d{i}", "q", 11.0 + i) for i in range(3)] == ["a1", "a3", "a0"]


def test_random_is_reproducible_from_the_seed_and_reaches_everyone(make):
    ids = ["a0", "a1", "a2", "a3"]

    def picks(seed):
        r = make([queue("q", *ids, strategy=Strategy.RANDOM)], agents(*ids), seed=seed)
        login_all(r, ids)
        return [serve(r, f"c{i}", "q", float(i)) for i in range(80)]

    first = picks(7)
    assert first == picks(7)
    assert first != picks(8)
    counts = Counter(first)
    assert set(counts) == set(ids)
    assert min(counts.values()) >= 8  # 80 draws over 4 agents: none starved


def test_weighted_random_follows_the_weights(make):
    q = QueueConfig("q", (Member("light", weight=1), Member("heavy", weight=9)),
                    strategy=Strategy.WEIGHTED_RANDOM)
    r = make([q], agents("light", "heavy"), seed=42)
    login_all(r, ["light", "heavy"])
    counts = Counter(serve(r, f"c{i}", "q", float(i)) for i in range(500))
    assert 0.82 <= counts["heavy"] / 500 <= 0.97
    assert counts["light"] > 0


def test_penalty_tiers_are_tried_lowest_first(make):
    q = QueueConfig("q", (Member("backup", penalty=2), Member("front", penalty=0)),
                    strategy=Strategy.RING_ALL)
    r = make([q], agents("backup", "front"))
    login_all(r, ["backup", "front"])
    assert r.handle(CallerJoin("c1", "q"), 1) == [Offer("c1", ("front",), "q")]
    assert r.handle(CallerJoin("c2", "q"), 1) == [Offer("c2", ("backup",), "q")]


# ------------------------------------------------------------------------------ skills, priority

def test_skill_requirements_relax_step_by_step_while_place_is_kept(make):
    q = queue("q", "expert", "junior", "generalist",
              required_skills=(("billing", 8), ("en", 5)),
              relax_steps=(RelaxStep(10.0, lower_by=4), RelaxStep(20.0, drop=("billing",))))
    r = make([q], [AgentConfig("expert", skills=(("billing", 9), ("en", 9))),
                   AgentConfig("junior", skills=(("billing", 4), ("en", 9))),
                   AgentConfig("generalist", skills=(("en", 3),))])
    login_all(r, ["junior", "generalist"])
    assert r.handle(CallerJoin("c1", "q"), 0) == []
    assert r.handle(CallerJoin("c2", "q"), 5) == []
    assert r.next_timer() == 10.0
    # c1 has waited 10 s: billing >= 4 and en >= 1 now; c2 (5 s) still needs billing 8
    assert r.handle_timer(10.0) == [Offer("c1", ("junior",), "q")]
    assert r.waiting("q") == ("c1", "c2")  # relaxing did not move anyone
    r.handle(OfferAccepted("c1", "junior"), 11)
    assert r.next_timer() == 15.0
    assert r.handle_timer(15.0) == []  # c2 at its first step: billing 4 still needed
    assert r.next_timer() == 25.0
    assert r.handle_timer(25.0) == [Offer("c2", ("generalist",), "q")]  # billing dropped


def test_skills_are_not_relaxed_before_their_time(make):
    q = queue("q", "junior", required_skills=(("billing", 8),),
              relax_steps=(RelaxStep(30.0, lower_by=5),))
    r = make([q], [AgentConfig("junior", skills=(("billing", 3),))])
    login_all(r, ["junior"])
    r.handle(CallerJoin("c1", "q"), 0)
    assert r.handle_timer(29.5) == []
    assert r.handle_timer(30.0) == [Offer("c1", ("junior",), "q")]


def test_higher_priority_is_served_first(make):
    r = make([queue("q", "a0")], agents("a0"))
    r.handle(CallerJoin("plain", "q", priority=0), 0)
    r.handle(CallerJoin("vip", "q", priority=5), 10)
    assert r.waiting("q") == ("vip", "plain")
    assert (r.position("vip"), r.position("plain")) == (1, 2)
    assert r.handle(AgentLogin("a0"), 20) == [Offer("vip", ("a0",), "q")]


def test_agent_in_several_queues_takes_the_longest_waiting_caller(make):
    r = make([queue("sales", "shared", "s_only"), queue("support", "shared")],
             agents("shared", "s_only"))
    r.handle(CallerJoin("support-early", "support"), 0)
    r.handle(CallerJoin("sales-late", "sales"), 5)
    assert r.handle(AgentLogin("shared"), 10) == [Offer("support-early", ("shared",), "support")]
    # the sales-only agent can still take the sales caller
    assert r.handle(AgentLogin("s_only"), 11) == [Offer("sales-late", ("s_only",), "sales")]


def test_cross_queue_order_is_priority_then_time(make):
    r = make([queue("sales", "shared"), queue("support", "shared")], agents("shared"))
    r.handle(CallerJoin("old", "support"), 0)
    r.handle(CallerJoin("gold", "sales", priority=1), 50)
    assert r.handle(AgentLogin("shared"), 60) == [Offer("gold", ("shared",), "sales")]


# ------------------------------------------------------------------------------ callbacks, rejoin

def test_callback_keeps_its_place_and_dials_exactly_once(make):
    r = make([queue("q", "a0", "a1", callback_retries=1, callback_retry_interval=30.0)],
             agents("a0", "a1"))
    r.handle(CallerJoin("c1", "q"), 0)
    r.handle(CallerJoin("c2", "q"), 1)
    assert r.handle(CallbackRequested("c1", "+15550100"), 2) == []
    assert r.waiting("q") == ("c1", "c2") and r.position("c1") == 1
    assert r.handle(AgentLogin("a0"), 3) == [DialCallback("c1", "a0", "q", "+15550100", 1)]
    # nothing re-dials while the attempt is in progress
    assert r.handle_timer(100) == []
    assert r.handle(AnnounceRequest("c1"), 100) == [Announce("c1", 1, 180.0)]
    assert r.handle(AgentLogin("a1"), 101) == [Offer("c2", ("a1",), "q")]
    # a failure frees the agent; the retry waits for its interval
    assert r.handle(CallbackResult("c1", answered=False), 110) == []
    assert r.caller_view("c1").state == "callback-retry"
    assert r.next_timer() == 116.0  # c2's ring timeout comes first
    r.handle(OfferAccepted("c2", "a1"), 111)
    assert r.next_timer() == 140.0
    assert r.handle_timer(139.0) == []
    assert r.handle_timer(140.0) == [DialCallback("c1", "a0", "q", "+15550100", 2)]
    assert r.handle(CallbackResult("c1", answered=False), 150) == [
        CallbackOutcome("c1", "q", False, 2)]
    assert r.waiting("q") == ()
    with pytest.raises(LocalProtocolError):
        r.handle(CallbackResult("c1", answered=True), 151)


def test_answered_callback_connects_the_reserved_agent(make):
    r = make([queue("q", "a0", wrap_up=0.0)], agents("a0"))
    login_all(r, ["a0"])
    assert r.handle(CallerJoin("c1", "q"), 0) == [Offer("c1", ("a0",), "q")]
    assert r.handle(CallbackRequested("c1", "+1555"), 1) == [
        CancelOffer("c1", ("a0",)), DialCallback("c1", "a0", "q", "+1555", 1)]
    assert r.handle(CallbackResult("c1", answered=True), 5) == [
        CallbackOutcome("c1", "q", True, 1)]
    assert r.agent_view("a0").interactions == 1
    r.handle(CallEnded("c1", "a0"), 65)
    assert r.agent_view("a0").interactions == 0


def test_caller_who_abandons_and_calls_again_rejoins_at_their_old_place(make):
    r = make([queue("q", "a0", rejoin_window=60.0), queue("other", "a0", rejoin_window=60.0)],
             agents("a0"))
    r.handle(CallerJoin("c1", "q", caller_number="5551001"), 0)
    r.handle(CallerJoin("c2", "q", caller_number="5551002"), 5)
    r.handle(CallerAbandon("c1"), 10)
    assert r.waiting("q") == ("c2",)
    r.handle(CallerJoin("c1-again", "q", caller_number="5551001"), 40)
    assert r.waiting("q") == ("c1-again", "c2")
    assert r.caller_view("c1-again").place_time == 0.0
    # outside the window, or another queue: a new place
    r.handle(CallerAbandon("c2"), 50)
    r.handle(CallerJoin("c2-late", "q", caller_number="5551002"), 111)
    r.handle(CallerJoin("c2-other", "other", caller_number="5551002"), 112)
    assert r.waiting("q") == ("c1-again", "c2-late")
    assert r.caller_view("c2-late").place_time == 111.0


def test_caller_sent_back_to_the_queue_keeps_their_place_among_their_priority(make):
    r = make([queue("q", "a0")], agents("a0"))
    for call, at in (("early", 0), ("mid", 10), ("late", 20)):
        r.handle(CallerJoin(call, "q"), at)
    r.handle(CallerJoin("vip", "q", priority=1), 25)
    # first queued at 5, sent back at 30: ahead of those who joined after 5, behind the rest
    assert r.handle(CallerJoin("back", "q", place_time=5.0), 30) == []
    assert r.waiting("q") == ("vip", "early", "back", "mid", "late")
    assert r.position("back") == 3
    assert r.caller_view("back").place_time == 5.0
    # the same place as a waiting caller: who joined first goes first
    r.handle(CallerJoin("tie", "q", place_time=10), 31)
    assert r.waiting("q") == ("vip", "early", "back", "mid", "tie", "late")
    # a place given as now is an ordinary join
    r.handle(CallerJoin("now", "q", place_time=32.0), 32)
    assert r.waiting("q")[-1] == "now"
    assert [d.call for d in r.handle(AgentLogin("a0"), 40)] == ["vip"]
    r.handle(OfferAccepted("vip", "a0"), 41)
    assert r.handle(CallEnded("vip", "a0"), 42) == [Offer("early", ("a0",), "q")]
    r.handle(OfferAccepted("early", "a0"), 43)
    assert r.handle(CallEnded("early", "a0"), 44) == [Offer("back", ("a0",), "q")]


def test_sent_back_caller_relaxes_skills_from_their_place_but_times_out_from_the_join(make):
    q = queue("q", "junior", required_skills=(("billing", 8),),
              relax_steps=(RelaxStep(10.0, lower_by=4),), max_wait=60.0)
    r = make([q], [AgentConfig("junior", skills=(("billing", 4),))])
    r.handle(CallerJoin("back", "q", place_time=25.0), 30)
    assert r.next_timer() == 35.0  # place 25 + 10 s, not the join + 10 s
    assert r.handle(AgentLogin("junior"), 31) == []  # billing 8 still needed
    assert r.handle_timer(35.0) == [Offer("back", ("junior",), "q")]
    r.handle(OfferRejected("back", "junior"), 36)
    r.handle(AgentLogout("junior"), 36)
    assert r.next_timer() == 90.0  # max_wait from the join at 30, not from the place at 25
    assert r.handle_timer(89.0) == []
    assert r.handle_timer(90.0) == [Overflow("back", "q", OverflowReason.TIMEOUT, "")]


def test_a_given_place_wins_over_a_remembered_one_which_stays(make):
    r = make([queue("q", "a0", rejoin_window=60.0)], agents("a0"))
    r.handle(CallerJoin("c1", "q", caller_number="5551001"), 0)
    r.handle(CallerAbandon("c1"), 5)
    r.handle(CallerJoin("c1-back", "q", caller_number="5551001", place_time=8.0), 10)
    assert r.caller_view("c1-back").place_time == 8.0
    assert len(r.snapshot()["rejoin"]) == 1
    r.handle(CallerJoin("c1-again", "q", caller_number="5551001"), 20)
    assert r.caller_view("c1-again").place_time == 0.0
    assert r.waiting("q") == ("c1-again", "c1-back")
    assert r.snapshot()["rejoin"] == ()


# ------------------------------------------------------------------------------ agents

def test_wrap_up_is_honoured_across_all_the_agents_queues(make):
    r = make([queue("a", "x", wrap_up=30.0), queue("b", "x", wrap_up=0.0)], agents("x"))
    login_all(r, ["x"])
    serve(r, "c1", "a", 0, talk=10)
    assert r.agent_view("x").in_wrap_up
    assert r.handle(CallerJoin("c2", "b"), 15) == []
    assert r.next_timer() == 40.0
    assert r.handle_timer(39.0) == []
    assert r.handle_timer(40.0) == [Offer("c2", ("x",), "b")]


def test_wrap_up_can_end_early(make):
    r = make([queue("a", "x", wrap_up=30.0)], agents("x"))
    login_all(r, ["x"])
    serve(r, "c1", "a", 0, talk=10)
    r.handle(CallerJoin("c2", "a"), 12)
    assert r.handle(WrapUpEnded("x"), 20) == [Offer("c2", ("x",), "a")]
    with pytest.raises(LocalProtocolError, match="not in wrap-up"):
        r.handle(WrapUpEnded("x"), 21)


def test_ring_timeout_moves_the_call_to_the_next_agent(make):
    r = make([queue("q", "a0", "a1", strategy=Strategy.LINEAR, ring_timeout=15.0)],
             agents("a0", "a1"))
    login_all(r, ["a0", "a1"])
    assert r.handle(CallerJoin("c1", "q"), 0) == [Offer("c1", ("a0",), "q")]
    assert r.next_timer() == 15.0
    assert r.handle_timer(15.0) == [CancelOffer("c1", ("a0",)), Offer("c1", ("a1",), "q")]
    # the phone itself giving up counts the same, without a cancel
    assert r.handle(OfferTimeout("c1", "a1"), 20) == [Offer("c1", ("a0",), "q")]
    assert r.agent_view("a0").missed == 1 and r.agent_view("a1").missed == 1


def test_agent_is_paused_after_consecutive_missed_offers(make):
    r = make([queue("q", "a0", "a1", strategy=Strategy.LINEAR, ring_timeout=10.0)],
             agents("a0", "a1"), auto_pause_after=2)
    login_all(r, ["a0"])
    r.handle(CallerJoin("c1", "q"), 0)
    assert r.handle_timer(10.0) == [CancelOffer("c1", ("a0",)), Offer("c1", ("a0",), "q")]
    assert r.handle_timer(20.0) == [CancelOffer("c1", ("a0",)), AutoPause("a0", 2)]
    view = r.agent_view("a0")
    assert (view.presence, view.pause_reason) == ("paused", AUTO_PAUSE_REASON)
    assert r.handle(AgentLogin("a1"), 21) == [Offer("c1", ("a1",), "q")]
    assert r.handle(OfferAccepted("c1", "a1"), 22) == []
    r.handle(AgentUnpause("a0"), 30)
    assert r.agent_view("a0").missed == 0


def test_answering_resets_the_missed_count(make):
    r = make([queue("q", "a0", ring_timeout=10.0)], agents("a0"), auto_pause_after=2)
    login_all(r, ["a0"])
    r.handle(CallerJoin("c1", "q"), 0)
    r.handle_timer(10.0)
    r.handle(OfferAccepted("c1", "a0"), 11)
    assert r.agent_view("a0").missed == 0


def test_concurrent_interactions_are_capped_per_agent(make):
    r = make([queue("q", "multi")], [AgentConfig("multi", max_interactions=2)])
    login_all(r, ["multi"])
    assert r.handle(CallerJoin("c1", "q"), 0) == [Offer("c1", ("multi",), "q")]
    assert r.handle(CallerJoin("c2", "q"), 1) == [Offer("c2", ("multi",), "q")]
    assert r.handle(CallerJoin("c3", "q"), 2) == []
    r.handle(OfferAccepted("c1", "multi"), 3)
    r.handle(OfferAccepted("c2", "multi"), 3)
    assert r.handle(CallEnded("c1", "multi"), 10) == [Offer("c3", ("multi",), "q")]


def test_logout_withdraws_ringing_offers(make):
    r = make([queue("q", "a0", "a1", strategy=Strategy.LINEAR)], agents("a0", "a1"))
    login_all(r, ["a0"])
    r.handle(CallerJoin("c1", "q"), 0)
    r.handle(AgentLogin("a1"), 1)
    assert r.handle(AgentLogout("a0"), 2) == [CancelOffer("c1", ("a0",)), Offer("c1", ("a1",), "q")]


# ------------------------------------------------------------------------------ overflow, queries

def test_overflow_on_wait_timeout(make):
    r = make([queue("q", "a0", max_wait=60.0, overflow_target="voicemail")], agents("a0"))
    r.handle(CallerJoin("c1", "q"), 0)
    assert r.next_timer() == 60.0
    assert r.handle_timer(60.0) == [Overflow("c1", "q", OverflowReason.TIMEOUT, "voicemail")]
    assert r.waiting("q") == () and r.next_timer() is None


def test_overflow_of_a_ringing_caller_cancels_the_offer(make):
    r = make([queue("q", "a0", max_wait=10.0, ring_timeout=30.0, overflow_target="vm")],
             agents("a0"))
    login_all(r, ["a0"])
    r.handle(CallerJoin("c1", "q"), 0)
    assert r.handle_timer(10.0) == [CancelOffer("c1", ("a0",)),
                                    Overflow("c1", "q", OverflowReason.TIMEOUT, "vm")]
    assert r.agent_view("a0").ringing == 0


def test_overflow_on_maximum_length(make):
    r = make([queue("q", "a0", max_length=2, overflow_target="other")], agents("a0"))
    r.handle(CallerJoin("c1", "q"), 0)
    r.handle(CallerJoin("c2", "q"), 0)
    assert r.handle(CallerJoin("c3", "q"), 0) == [
        Overflow("c3", "q", OverflowReason.MAX_LENGTH, "other")]
    assert r.waiting("q") == ("c1", "c2")


def test_join_empty_refuses_callers_when_nobody_is_staffed(make):
    r = make([queue("q", "a0", join_empty=EmptyRule.UNSTAFFED, overflow_target="vm")],
             agents("a0"))
    assert r.handle(CallerJoin("c1", "q"), 0) == [
        Overflow("c1", "q", OverflowReason.NO_AGENTS, "vm")]
    r.handle(AgentLogin("a0"), 1)
    r.handle(AgentPause("a0", "break"), 2)
    assert r.handle(CallerJoin("c2", "q"), 3) == []  # paused counts as staffed here


def test_leave_empty_sends_waiting_callers_out_when_the_last_agent_goes(make):
    r = make([queue("q", "a0", "a1", leave_empty=EmptyRule.UNAVAILABLE, overflow_target="vm")],
             agents("a0", "a1", max_interactions=1))
    login_all(r, ["a0", "a1"])
    serve(r, "busy0", "q", 0, talk=0)
    r.handle(CallerJoin("x", "q"), 1)
    r.handle(OfferAccepted("x", "a0"), 1)
    r.handle(CallerJoin("y", "q"), 2)
    r.handle(OfferAccepted("y", "a1"), 2)
    r.handle(CallerJoin("c1", "q"), 3)
    r.handle(CallerJoin("c2", "q", priority=1), 4)
    assert r.handle(AgentPause("a0"), 5) == []
    assert r.handle(AgentLogout("a1"), 6) == [
        Overflow("c2", "q", OverflowReason.NO_AGENTS, "vm"),
        Overflow("c1", "q", OverflowReason.NO_AGENTS, "vm")]


def test_overflow_when_the_estimated_wait_is_too_long(make):
    r = make([queue("q", "a0", default_handle_time=100.0, max_estimated_wait=250.0,
                    overflow_target="cb")], agents("a0"))
    login_all(r, ["a0"])
    r.handle(CallerJoin("c0", "q"), 0)  # offered: still counts as ahead
    r.handle(CallerJoin("c1", "q"), 0)
    assert r.queue_estimated_wait("q") == 300.0
    assert r.handle(CallerJoin("c2", "q"), 0) == [
        Overflow("c2", "q", OverflowReason.ESTIMATED_WAIT, "cb")]
    assert r.handle(CallerJoin("vip", "q", priority=3), 0) == []  # position 1: 100 s


def test_position_and_estimated_wait_follow_handle_times_and_staffing(make):
    r = make([queue("q", "a0", "a1", default_handle_time=200.0, wrap_up=10.0)],
             agents("a0", "a1"), handle_time_samples=2)
    assert r.handle(CallerJoin("c1", "q"), 0) == []
    assert r.estimated_wait("c1") == math.inf  # nobody staffed
    assert r.handle(AgentLogin("a0"), 1) == [Offer("c1", ("a0",), "q")]
    r.handle(OfferAccepted("c1", "a0"), 1)
    r.handle(CallEnded("c1", "a0"), 51)  # 50 s talk + 10 s wrap-up = 60
    r.handle(CallerJoin("c2", "q"), 52)
    r.handle(CallerJoin("c3", "q"), 53)
    assert r.estimated_wait("c3") == 60.0 * 2 / 1
    r.handle(AgentLogin("a1"), 54)  # c2 offered to a1
    assert r.handle(AnnounceRequest("c3"), 55) == [Announce("c3", 2, 60.0 * 2 / 2)]
    r.handle(OfferAccepted("c2", "a1"), 56)
    r.handle(CallEnded("c2", "a1"), 176)  # 120 + 10 = 130; average (60 + 130) / 2 = 95
    assert r.position("c3") == 1
    assert r.estimated_wait("c3") == 95.0 / 2


# ------------------------------------------------------------------------------ misuse, config

@pytest.mark.parametrize("event", [
    AgentLogin("nobody"),
    AgentUnpause("a0"),  # logged out
    CallerJoin("c1", "no-such-queue"),
    CallerJoin("dup", "q"),
    CallerJoin("", "q"),
    CallerJoin("c9", "q", priority=2**40),
    CallerJoin("c9", "q", priority="high"),
    CallerJoin("c9", "q", place_time=2.5),  # after now
    CallerJoin("c9", "q", place_time=math.nan),
    CallerJoin("c9", "q", place_time=-math.inf),
    CallerJoin("c9", "q", place_time=True),
    CallerJoin("c9", "q", place_time="1"),
    CallerJoin("c9", "q", place_time=-(10**400)),
    OfferAccepted("dup", "a0"),  # ringing at a1, not a0
    OfferAccepted("ghost", "a0"),
    CallEnded("dup", "a0"),  # still ringing, not connected
    CallbackResult("dup", answered=True),  # not a callback
    CallbackRequested("dup", ""),
    WrapUpEnded("a0"),
    "not an event",
])
def test_misuse_is_refused_and_changes_nothing(make, event):
    r = make([queue("q", "a0", "a1", strategy=Strategy.LINEAR)], agents("a0", "a1"))
    r.handle(CallerJoin("dup", "q"), 0)
    r.handle(AgentLogin("a1"), 1)
    r.handle(AgentLogout("a1"), 1)
    r.handle(AgentLogin("a1"), 1)
    before = r.snapshot()
    with pytest.raises(LocalProtocolError):
        r.handle(event, 2)
    assert r.snapshot() == before


def test_time_never_runs_backwards(make):
    r = make([queue("q", "a0")], agents("a0"))
    r.handle(AgentLogin("a0"), 10)
    for bad in (9.9, math.nan, math.inf, "10"):
        with pytest.raises(LocalProtocolError):
            r.handle_timer(bad)
    assert r.handle_timer(10) == []


@pytest.mark.parametrize(("queues", "agent_list", "message"), [
    ([queue("q", "ghost")], agents("a0"), "unknown agent 'ghost'"),
    ([queue("q", "a0"), queue("q", "a0")], agents("a0"), "defined twice"),
    ([queue("q", "a0", required_skills=(("en", 11),))], agents("a0"), "outside 1-10"),
    ([queue("q", "a0")], [AgentConfig("a0", skills=(("en", 0),))], "outside 1-10"),
    ([queue("q", "a0", ring_timeout=0)], agents("a0"), "ring_timeout"),
    ([queue("q", "a0", relax_steps=(RelaxStep(20), RelaxStep(10)))], agents("a0"),
     "increasing order"),
    ([QueueConfig("q", (Member("a0", weight=0),))], agents("a0"), "weight"),
    ([queue("q", "a0")], [AgentConfig("a0", max_interactions=0)], "max_interactions"),
])
def test_bad_configuration_names_what_is_wrong(make, queues, agent_list, message):
    with pytest.raises(ConfigError, match=message):
        make(queues, agent_list)


def test_idle_router_has_no_timer(make):
    r = make([queue("q", "a0")], agents("a0"))
    assert r.next_timer() is None
    r.handle(AgentLogin("a0"), 0)
    assert r.next_timer() is None


def test_cancelling_a_callback_being_dialled_frees_the_agent(make):
    r = make([queue("q", "a0")], agents("a0"))
    r.handle(CallerJoin("c1", "q"), 0)
    r.handle(CallbackRequested("c1", "+1555"), 1)
    r.handle(CallerJoin("c2", "q"), 2)
    assert r.handle(AgentLogin("a0"), 3) == [DialCallback("c1", "a0", "q", "+1555", 1)]
    assert r.handle(CallerAbandon("c1"), 4) == [Offer("c2", ("a0",), "q")]
    with pytest.raises(LocalProtocolError):
        r.handle(CallbackResult("c1", answered=True), 5)


def test_remembered_abandoned_callers_are_bounded(make):
    r = make([queue("q", "a0", rejoin_window=600.0)], agents("a0"), max_rejoin_memory=1)
    r.handle(CallerJoin("first", "q", caller_number="5551001"), 0)
    r.handle(CallerJoin("second", "q", caller_number="5551002"), 1)
    r.handle(CallerAbandon("first"), 2)
    r.handle(CallerAbandon("second"), 3)  # pushes "first" out of memory
    assert len(r.snapshot()["rejoin"]) == 1
    r.handle(CallerJoin("first-again", "q", caller_number="5551001"), 4)
    r.handle(CallerJoin("second-again", "q", caller_number="5551002"), 5)
    assert r.waiting("q") == ("second-again", "first-again")


def test_ring_all_times_out_everyone_at_once(make):
    r = make([queue("q", "a0", "a1", strategy=Strategy.RING_ALL, ring_timeout=10.0)],
             agents("a0", "a1"), auto_pause_after=1)
    login_all(r, ["a0", "a1"])
    r.handle(CallerJoin("c1", "q"), 0)
    assert r.handle_timer(10.0) == [CancelOffer("c1", ("a0", "a1")), AutoPause("a0", 1),
                                    AutoPause("a1", 1)]
    assert r.caller_view("c1").state == "waiting"


def test_facade_uses_the_compiled_core_when_built():
    try:
        from appliance.acd._router import Router as compiled
    except ImportError:
        pytest.skip("extension not built")
    assert COMPILED and Router is compiled


# ------------------------------------------------------------------------------ issue 5 §1, rule by rule

def test_longest_idle_counts_from_the_end_of_wrap_up_and_not_from_a_pause(make):
    r = make([queue("q", "a0", "a1", wrap_up=30.0)], agents("a0", "a1"))
    login_all(r, ["a0", "a1"])  # both idle since 0: a tie goes to the member listed first
    assert r.handle(CallerJoin("c1", "q"), 1) == [Offer("c1", ("a0",), "q")]
    r.handle(OfferAccepted("c1", "a0"), 1)
    assert r.handle(CallerJoin("c2", "q"), 2) == [Offer("c2", ("a1",), "q")]
    r.handle(OfferAccepted("c2", "a1"), 2)
    r.handle(CallEnded("c2", "a1"), 5)  # a1 wraps up until 35
    r.handle(CallEnded("c1", "a0"), 11)  # a0 wraps up until 41
    r.handle(WrapUpEnded("a0"), 20)  # a0 ends early: idle since 20
    assert r.agent_view("a0").idle_since == 20.0
    assert r.handle_timer(35.0) == []
    assert r.agent_view("a1").idle_since == 35.0  # the planned end, by the timer
    # a break does not make a0 "idle longer" or "idle shorter"
    r.handle(AgentPause("a0", "break"), 40)
    r.handle(AgentUnpause("a0"), 90)
    assert r.agent_view("a0").idle_since == 20.0
    assert r.handle(CallerJoin("c3", "q"), 100) == [Offer("c3", ("a0",), "q")]  # 20 < 35


def test_a_call_ending_while_another_is_in_progress_leaves_idle_since(make):
    r = make([queue("q", "multi")], [AgentConfig("multi", max_interactions=2)])
    login_all(r, ["multi"])
    r.handle(CallerJoin("c1", "q"), 1)
    r.handle(OfferAccepted("c1", "multi"), 1)
    r.handle(CallerJoin("c2", "q"), 2)
    r.handle(OfferAccepted("c2", "multi"), 2)
    r.handle(CallEnded("c1", "multi"), 10)  # c2 still in progress: not idle
    assert r.agent_view("multi").idle_since == 0.0
    r.handle(CallEnded("c2", "multi"), 20)
    assert r.agent_view("multi").idle_since == 20.0


def test_wrap_up_of_two_queues_keeps_the_later_end(make):
    r = make([queue("long", "x", wrap_up=30.0), queue("short", "x", wrap_up=5.0)],
             [AgentConfig("x", max_interactions=2)])
    login_all(r, ["x"])
    for call, q in (("c1", "long"), ("c2", "short")):
        assert r.handle(CallerJoin(call, q), 1) == [Offer(call, ("x",), q)]
        r.handle(OfferAccepted(call, "x"), 1)
    r.handle(CallEnded("c1", "x"), 10)  # wrap-up of "long" until 40
    r.handle(CallerJoin("c3", "short"), 11)  # in wrap-up: no offer from any queue
    r.handle(CallEnded("c2", "x"), 12)  # "short" would end at 17: the later end stays
    assert r.next_timer() == 40.0
    assert r.handle_timer(17.0) == []
    assert r.handle_timer(40.0) == [Offer("c3", ("x",), "short")]
    # the other way round: the later wrap-up replaces the earlier one
    r.handle(OfferAccepted("c3", "x"), 41)
    r.handle(CallerJoin("c4", "long"), 42)
    r.handle(OfferAccepted("c4", "x"), 42)
    r.handle(CallEnded("c3", "x"), 50)  # until 55
    r.handle(CallEnded("c4", "x"), 51)  # until 81
    assert r.next_timer() == 81.0
    assert r.agent_view("x").idle_since == 40.0


def test_declining_is_not_a_missed_offer(make):
    r = make([queue("q", "a0", ring_timeout=10.0)], agents("a0"), auto_pause_after=1)
    login_all(r, ["a0"])
    r.handle(CallerJoin("c1", "q"), 0)
    # a0 is the only agent: the tried list is cleared and a0 is offered again
    assert r.handle(OfferRejected("c1", "a0"), 1) == [Offer("c1", ("a0",), "q")]
    assert r.agent_view("a0").missed == 0 and r.agent_view("a0").presence == "ready"
    assert r.handle(OfferTimeout("c1", "a0"), 2) == [AutoPause("a0", 1)]


def test_caller_further_back_is_served_when_the_front_has_no_eligible_agent(make):
    q = queue("q", "en_only", required_skills=(("fr", 5),))
    r = make([q, queue("plain", "en_only")],
             [AgentConfig("en_only", skills=(("en", 9),))])
    r.handle(CallerJoin("needs-fr", "q"), 0)
    r.handle(CallerJoin("anyone", "plain"), 5)
    assert r.handle(AgentLogin("en_only"), 10) == [Offer("anyone", ("en_only",), "plain")]
    assert r.waiting("q") == ("needs-fr",)


def test_a_relax_step_drops_first_then_lowers_the_rest(make):
    q = queue("q", "a0", required_skills=(("en", 8), ("fr", 9)),
              relax_steps=(RelaxStep(10.0, lower_by=3, drop=("fr",)),))
    r = make([q], [AgentConfig("a0", skills=(("en", 5),))])  # lacks fr: level 0
    login_all(r, ["a0"])
    assert r.handle(CallerJoin("c1", "q"), 0) == []
    assert r.handle_timer(9.99) == []
    assert r.handle_timer(10.0) == [Offer("c1", ("a0",), "q")]  # fr dropped, en 8 - 3 = 5


def test_rejoined_caller_relaxes_from_their_old_place(make):
    q = queue("q", "junior", required_skills=(("billing", 8),),
              relax_steps=(RelaxStep(30.0, lower_by=4),), rejoin_window=60.0)
    r = make([q], [AgentConfig("junior", skills=(("billing", 4),))])
    login_all(r, ["junior"])
    r.handle(CallerJoin("c1", "q", caller_number="5551001"), 0)
    r.handle(CallerAbandon("c1"), 20)
    r.handle(CallerJoin("c1-again", "q", caller_number="5551001"), 25)
    assert r.next_timer() == 30.0  # old place 0 + 30 s, not 25 + 30 s
    assert r.handle_timer(30.0) == [Offer("c1-again", ("junior",), "q")]


def test_join_empty_unavailable_counts_paused_as_missing_but_not_busy(make):
    r = make([queue("q", "a0", "a1", join_empty=EmptyRule.UNAVAILABLE, overflow_target="vm")],
             agents("a0", "a1"))
    login_all(r, ["a0", "a1"])
    r.handle(AgentPause("a1", "break"), 0)
    serve_out = r.handle(CallerJoin("c0", "q"), 1)
    assert serve_out == [Offer("c0", ("a0",), "q")]
    r.handle(OfferAccepted("c0", "a0"), 1)
    assert r.handle(CallerJoin("c1", "q"), 2) == []  # a0 is talking: the queue is not empty
    r.handle(AgentPause("a0", "break"), 3)
    assert r.handle(CallerJoin("c2", "q"), 4) == [
        Overflow("c2", "q", OverflowReason.NO_AGENTS, "vm")]


def test_leave_empty_keeps_queued_callbacks(make):
    r = make([queue("q", "a0", leave_empty=EmptyRule.UNSTAFFED, overflow_target="vm")],
             agents("a0", "a1"))
    login_all(r, ["a0"])
    serve(r, "busy", "q", 0, talk=0)
    r.handle(CallerJoin("x", "q"), 1)
    r.handle(OfferAccepted("x", "a0"), 1)
    r.handle(CallerJoin("cb", "q"), 2)
    r.handle(CallbackRequested("cb", "+15550100"), 3)
    r.handle(CallerJoin("voice", "q"), 4)
    assert r.handle(AgentPause("a0", "break"), 5) == []  # paused is still staffed here
    assert r.handle(AgentLogout("a0"), 6) == [Overflow("voice", "q", OverflowReason.NO_AGENTS,
                                                       "vm")]
    assert r.waiting("q") == ("cb",)


def test_callback_under_ring_all_reserves_one_agent_only(make):
    r = make([queue("q", "a0", "a1", strategy=Strategy.RING_ALL)], agents("a0", "a1"))
    login_all(r, ["a0", "a1"])
    assert r.handle(CallerJoin("cb", "q"), 1) == [Offer("cb", ("a0", "a1"), "q")]
    # the caller asks for a callback while ringing everyone: one agent is reserved, once
    assert r.handle(CallbackRequested("cb", "+15550100"), 2) == [
        CancelOffer("cb", ("a0", "a1")), DialCallback("cb", "a0", "q", "+15550100", 1)]
    assert r.handle(CallerJoin("voice", "q"), 3) == [Offer("voice", ("a1",), "q")]
    assert r.handle_timer(200.0) == [CancelOffer("voice", ("a1",)), Offer("voice", ("a1",), "q")]
    assert r.caller_view("cb").offered_to == ("a0",)


def test_outside_calls_count_against_the_cap_without_wrap_up_or_statistics(make):
    from appliance.acd.model import OutsideCallEnded, OutsideCallStarted
    r = make([queue("q", "single", "double", strategy=Strategy.LINEAR, wrap_up=30.0)],
             [AgentConfig("single"), AgentConfig("double", max_interactions=2)])
    login_all(r, ["single", "double"])
    r.handle(OutsideCallStarted("single", "out-1", 1.0), 1)
    r.handle(OutsideCallStarted("double", "out-2", 1.0), 1)
    # single (cap 1) is busy outside the queues; double (cap 2) still has room
    assert r.handle(CallerJoin("c1", "q"), 2) == [Offer("c1", ("double",), "q")]
    assert r.handle(CallerJoin("c2", "q"), 3) == []
    assert r.handle(OutsideCallEnded("single", "out-1", 4.0), 4) == [
        Offer("c2", ("single",), "q")]
    view = r.agent_view("single")
    assert (view.in_wrap_up, view.idle_since, view.outside) == (False, 0.0, 0)
    assert r.snapshot()["queues"][0][2] == ()  # no handle-time sample from an outside call
    for bad in (OutsideCallEnded("single", "out-1", 5.0),  # already ended
                OutsideCallStarted("double", "out-2", 5.0),  # already started
                OutsideCallStarted("single", "", 5.0),
                OutsideCallStarted("single", "out-3", 6.0)):  # after now
        before = r.snapshot()
        with pytest.raises(LocalProtocolError):
            r.handle(bad, 5)
        assert r.snapshot() == before


def test_logout_withdraws_every_ringing_offer_in_the_global_order(make):
    r = make([queue("q", "multi", "a1", strategy=Strategy.LINEAR)],
             [AgentConfig("multi", max_interactions=2), AgentConfig("a1")])
    login_all(r, ["multi"])
    r.handle(CallerJoin("plain", "q"), 1)
    r.handle(CallerJoin("vip", "q", priority=1), 2)  # ahead of "plain" in the order
    assert r.agent_view("multi").ringing == 2
    r.handle(AgentLogin("a1"), 3)
    assert r.handle(AgentLogout("multi"), 4) == [
        CancelOffer("vip", ("multi",)), CancelOffer("plain", ("multi",)),
        Offer("vip", ("a1",), "q")]
    assert r.agent_view("multi").ringing == 0 and r.agent_view("multi").missed == 0


def test_a_dropped_router_frees_its_callers(make):
    """The compiled router keeps its objects out of the cycle collector (they hold no reference
    back to a caller); a router dropped with callers waiting, ringing and reserved must free
    them all the same."""
    import gc
    import tracemalloc

    def busy_router() -> None:
        r = make([queue("q", "a0", "a1", strategy=Strategy.RING_ALL, max_wait=500.0,
                        rejoin_window=60.0)],
                 [AgentConfig("a0", max_interactions=2), AgentConfig("a1")])
        login_all(r, ["a0", "a1"])
        for i in range(60):
            r.handle(CallerJoin(f"c{i}", "q", caller_number=f"555{i}", priority=i % 3), 1.0)
        r.handle(OfferRejected("c0", "a1"), 2.0)
        r.handle(CallbackRequested("c10", "+15550100"), 2.0)
        r.handle(CallerAbandon("c20"), 2.0)
        r.handle_timer(30.0)

    busy_router()
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(40):
            busy_router()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"{grown} bytes kept by 40 dropped routers"
