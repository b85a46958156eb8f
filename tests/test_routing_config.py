"""Skills and their relaxation written in site.yaml reach the ACD router call control builds."""

from __future__ import annotations

import pytest

from appliance.acd.model import AgentLogin, CallerJoin, Offer
from appliance.calls.control import build_router
from appliance.config import ConfigError, parse_site_yaml

MD5 = "0123456789abcdef0123456789abcdef"
SHA = "0123456789abcdef" * 4


def _site(queue_extra: str) -> str:
    return f"""\
site: {{id: lyon-1, name: "Lyon", timezone: Europe/Paris}}
sip:
  bind: 127.0.0.1
  realm: lyon.example.com
  accounts:
    - {{user: "1001", ha1_md5: {MD5}, ha1_sha256: {SHA}, skills: {{french: 3}}}}
    - {{user: "1002", ha1_md5: {MD5}, ha1_sha256: {SHA}, skills: {{french: 8}}}}
skills: [{{name: french}}, {{name: billing}}]
queues:
  - name: support
    members: ["1001", "1002"]
    strategy: linear
{queue_extra}
"""


def test_required_levels_and_relaxation_from_site_yaml_decide_the_offer() -> None:
    config = parse_site_yaml(_site("    required_skills: {french: 6}\n"
                                   "    relax: [{after: 10, lower_by: 4}]"))
    router = build_router(config)
    for agent in ("1001", "1002"):
        router.handle(AgentLogin(agent), 0.0)
    # 1001 comes first in member order, but only 1002 has french >= 6.
    assert router.handle(CallerJoin("c1", "support"), 1.0) == [Offer("c1", ("1002",), "support")]
    # 1002 is now ringing: c2 waits until its requirement falls to french >= 2 at 10 s.
    assert router.handle(CallerJoin("c2", "support"), 2.0) == []
    assert router.next_timer() == 12.0
    assert router.handle_timer(12.0) == [Offer("c2", ("1001",), "support")]


def test_without_skills_every_member_is_eligible() -> None:
    router = build_router(parse_site_yaml(_site("")))
    router.handle(AgentLogin("1001"), 0.0)
    assert router.handle(CallerJoin("c1", "support"), 1.0) == [Offer("c1", ("1001",), "support")]


@pytest.mark.parametrize(("relax", "key", "expected"), [
    ("[{after: 20}, {after: 10}]", "queues[0].relax[1].after", "more than the step before"),
    ("[{after: 10, drop: [billing]}]", "queues[0].relax[0].drop", "a skill this queue requires"),
    ("[{after: 10, lower_by: 12}]", "queues[0].relax[0].lower_by", "a number <= 9"),
])
def test_a_bad_relaxation_step_is_refused_naming_its_key(relax: str, key: str,
                                                         expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(_site(f"    required_skills: {{french: 6}}\n    relax: {relax}"))
    message = str(caught.value)
    assert key in message and expected in message, message


def test_overflow_rules_from_site_yaml_reach_the_router() -> None:
    config = parse_site_yaml(_site("    max_length: 1\n    overflow: backup\n"
                                   "    rejoin_window: 60\n"
                                   "  - {name: backup, members: ['1001']}"))
    router = build_router(config)
    assert router.handle(CallerJoin("c1", "support"), 1.0) == []  # nobody logged in: waits
    [moved] = router.handle(CallerJoin("c2", "support"), 2.0)
    assert (type(moved).__name__, moved.reason.value, moved.target) == (
        "Overflow", "max-length", "backup")
    support = next(q for q in router.config.queues if q.name == "support")
    assert support.rejoin_window == 60.0


@pytest.mark.parametrize(("extra", "key", "expected"), [
    ("    overflow: nowhere", "queues[0].overflow", "another queue's name"),
    ("    overflow: support", "queues[0].overflow", "another queue's name"),
    ("    join_empty: sometimes", "queues[0].join_empty", "never"),
    ("    max_length: 0", "queues[0].max_length", ">= 1"),
])
def test_a_bad_overflow_rule_is_refused_naming_its_key(extra: str, key: str,
                                                       expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(_site(extra))
    message = str(caught.value)
    assert key in message and expected in message, message


def test_member_penalties_from_site_yaml_make_tiers() -> None:
    config = parse_site_yaml(_site("    penalties: {'1001': 2}\n    weights: {'1002': 5}"))
    support = config.queues[0]
    router = build_router(config)
    for agent in ("1001", "1002"):
        router.handle(AgentLogin(agent), 0.0)
    # linear order puts 1001 first, but its penalty puts it behind 1002.
    assert router.handle(CallerJoin("c1", "support"), 1.0) == [Offer("c1", ("1002",), "support")]
    assert router.handle(CallerJoin("c2", "support"), 1.0) == [Offer("c2", ("1001",), "support")]
    members = next(q for q in router.config.queues if q.name == "support").members
    assert [(m.agent, m.penalty, m.weight) for m in members] == [("1001", 2, 1), ("1002", 0, 5)]
    assert support.weights == {"1002": 5}


def test_a_penalty_for_someone_not_in_the_queue_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(_site("    penalties: {'1003': 1}"))
    assert "queues[0].penalties.1003: expected a member of this queue" in str(caught.value)


def test_an_agent_may_be_given_more_than_one_interaction() -> None:
    text = _site("").replace("skills: {french: 8}}", "skills: {french: 8}, max_interactions: 2}")
    router = build_router(parse_site_yaml(text))
    router.handle(AgentLogin("1002"), 0.0)
    assert router.handle(CallerJoin("c1", "support"), 1.0) == [Offer("c1", ("1002",), "support")]
    assert router.handle(CallerJoin("c2", "support"), 1.0) == [Offer("c2", ("1002",), "support")]
    assert router.handle(CallerJoin("c3", "support"), 1.0) == []  # at the cap: waits
