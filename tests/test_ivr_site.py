"""What the IVR takes from the site and hands to the call path: load-time checks of http,
voicemail and declared variables (naming file and line), the customer list in site.yaml, and the
priority and tier that reach RouteToQueue."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from appliance.config import ConfigError, load_site
from appliance.ivr import (
    DigitPressed,
    FlowError,
    FlowRun,
    Hangup,
    HttpLookup,
    HttpResult,
    OfferCallback,
    Play,
    PromptFinished,
    RouteToQueue,
    StartCollect,
    StartTimer,
    StopPlayback,
    Voicemail,
    load_flows,
)
from appliance.ivr.lookup import listed_customer

NOW = 1_000_000.0


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def problems_of(tmp_path: Path, text: str, **kw: object) -> tuple[str, list]:  # type: ignore[type-arg]
    text = textwrap.dedent(text)
    path = tmp_path / "flows.yaml"
    path.write_text(text)
    with pytest.raises(FlowError) as info:
        load_flows(path, **kw)  # type: ignore[arg-type]
    for p in info.value.problems:
        assert p.file == str(path) and f"{path}:{p.line}:" in str(info.value)
    return text, list(info.value.problems)


HTTP_FLOW = """\
    flows:
      main:
        start: lookup
        nodes:
          lookup:
            type: http
            url: http://127.0.0.1:9/crm
            map:
              {mapping}
            next: q
            {fallback}
          q: {{type: queue, queue: sales, priority: 3}}
          sorry: {{type: hangup}}
        variables: [customer_name]
"""


def http_flow(mapping: str = "priority: customer.priority",
              fallback: str = "on_failure: sorry") -> str:
    return HTTP_FLOW.format(mapping=mapping, fallback=fallback)


def test_http_node_without_a_fallback(tmp_path: Path) -> None:
    text, problems = problems_of(tmp_path, http_flow(fallback=""))
    (p,) = [p for p in problems if "on_failure is required" in p.message]
    # A missing key is reported at the node's first line.
    assert p.node == "lookup" and p.line == line_of(text, "type: http")


@pytest.mark.parametrize(("mapping", "message"), [
    ("priorty: customer.priority", "unknown variable 'priorty'"),
    ("caller: customer.number", "'caller' is set by the call itself"),
    ("http_error: x", "'http_error' is set by the call itself"),
])
def test_mapping_to_an_unknown_or_reserved_variable(
    tmp_path: Path, mapping: str, message: str,
) -> None:
    text, problems = problems_of(tmp_path, http_flow(mapping=mapping))
    (p,) = problems
    assert message in p.message and p.line == line_of(text, mapping) and p.node == "lookup"


@pytest.mark.parametrize("mapping", [
    "priority: customer.priority", "tier: customer.tier", "customer_name: customer.name",
])
def test_mapping_to_known_variables_loads(tmp_path: Path, mapping: str) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(textwrap.dedent(http_flow(mapping=mapping)))
    assert load_flows(path)["main"].nodes["lookup"].map  # type: ignore[attr-defined]


def test_variables_written_by_set_and_collect_nodes_are_known(tmp_path: Path) -> None:
    path = tmp_path / "flows.yaml"
    path.write_text(textwrap.dedent("""\
        flows:
          main:
            start: ask
            nodes:
              ask: {type: collect, variable: account, next: mark, on_failure: bye}
              mark: {type: set, variables: {segment: unknown}, next: lookup}
              lookup:
                type: http
                url: https://crm.example.com/x
                map: {account: customer.account, segment: customer.segment}
                next: bye
                on_failure: bye
              bye: {type: hangup}
        """))
    assert load_flows(path)


@pytest.mark.parametrize(("node_yaml", "needle", "message"), [
    ("{type: http, url: ftp://crm/x, next: a, on_failure: a}", "x:", "http:// or https://"),
    ("{type: http, url: 'http://crm x/', next: a, on_failure: a}", "x:", "http:// or https://"),
    ("{type: http, url: http://crm/, method: PUT, next: a, on_failure: a}", "x:",
     "method must be GET or POST"),
    ("{type: http, url: http://crm/, headers: {Host: evil}, next: a, on_failure: a}", "x:",
     "'Host' is not a header name"),
    ("{type: voicemail, mailbox: m, max_seconds: 2}", "x:", "max_seconds must be"),
    ("{type: voicemail, mailbox: m, queue: nowhere}", "x:", "unknown queue 'nowhere'"),
])
def test_node_field_errors_name_the_line(
    tmp_path: Path, node_yaml: str, needle: str, message: str,
) -> None:
    text, problems = problems_of(tmp_path, f"""\
        flows:
          main:
            start: x
            nodes:
              a: {{type: hangup}}
              x: {node_yaml}
        """, queues={"sales"})
    assert any(message in p.message and p.line == line_of(text, needle) and p.node == "x"
               for p in problems), problems


def test_bad_declared_variables(tmp_path: Path) -> None:
    text, problems = problems_of(tmp_path, """\
        flows:
          main:
            start: a
            variables: [ok_name, Bad-Name]
            nodes:
              a: {type: hangup}
        """)
    (p,) = problems
    assert "'Bad-Name' is not a variable name" in p.message and p.line == line_of(text, "variables")


# --------------------------------------------------------------------------- running


def loaded(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    path = tmp_path / "flows.yaml"
    path.write_text(textwrap.dedent(text))
    return load_flows(path, queues={"sales"})["main"]


@pytest.mark.parametrize(("answer", "priority", "tier"), [
    ({"customer": {"priority": 9, "tier": "gold"}}, 9, "gold"),
    ({"customer": {"priority": 1000, "tier": "x"}}, 100, "x"),      # clamped to 0-100
    ({"customer": {"priority": -5}}, 0, None),
    ({"customer": {"priority": "high"}}, 3, None),                 # not a number: node default
    ({"customer": {"priority": 7.9}}, 7, None),
    ({}, 3, None),                                                  # nothing known
])
def test_lookup_priority_and_tier_reach_route_to_queue(
    tmp_path: Path, answer: dict, priority: int, tier: str | None,  # type: ignore[type-arg]
) -> None:
    flow = loaded(tmp_path, http_flow(mapping="{priority: customer.priority, tier: customer.tier}"))
    run = FlowRun(flow, NOW, "+4915112345", dialled="+4930555")
    lookup, timer = run.take_actions()
    assert isinstance(lookup, HttpLookup) and timer == StartTimer(NOW + 2.0)
    assert lookup.payload["dialled"] == "+4930555" and lookup.method == "POST"
    (route,) = run.handle(HttpResult(lookup.request_id, 200, answer), NOW + 0.1)
    assert isinstance(route, RouteToQueue)
    assert (route.queue, route.priority, route.tier) == ("sales", priority, tier)


def test_listed_customer_skips_the_lookup(tmp_path: Path) -> None:
    flow = loaded(tmp_path, http_flow())
    customer = listed_customer({"+4915112345": {"priority": 80, "tier": "platinum"}},
                               "+4915112345")
    run = FlowRun(flow, NOW, "+4915112345", customer=customer)
    (route,) = run.take_actions()          # no HttpLookup at all
    assert isinstance(route, RouteToQueue)
    assert (route.priority, route.tier) == (80, "platinum")
    assert route.variables["customer_source"] == "list"
    assert run.trace == ["lookup", "q"]
    # Someone else is looked up as usual.
    other = FlowRun(flow, NOW, "+4917000000",
                    customer=listed_customer({"+4915112345": {"priority": 80}}, "+4917000000"))
    assert isinstance(other.take_actions()[0], HttpLookup)


def test_listed_customer_without_any_http_node(tmp_path: Path) -> None:
    flow = loaded(tmp_path, """\
        flows:
          main:
            start: q
            nodes:
              q: {type: queue, queue: sales, priority: 3}
        """)
    run = FlowRun(flow, NOW, "+49", customer={"priority": 50, "tier": None})
    (route,) = run.take_actions()
    assert isinstance(route, RouteToQueue) and (route.priority, route.tier) == (50, None)


def test_voicemail_carries_its_settings(tmp_path: Path) -> None:
    flow = loaded(tmp_path, """\
        flows:
          main:
            start: vm
            nodes:
              vm: {type: voicemail, mailbox: sales-box, prompt: leave_message, max_seconds: 90,
                   queue: sales}
        """)
    (action,) = FlowRun(flow, NOW, "+4915112345", dialled="+4930555").take_actions()
    assert action == Voicemail("sales-box", "leave_message", 90, "sales",
                               {"caller": "+4915112345", "dialled": "+4930555"})


# --------------------------------------------------------------------------- site.yaml


def write_site(tmp_path: Path, text: str) -> Path:
    site = tmp_path / "site"
    site.mkdir(parents=True)
    (site / "site.yaml").write_text(textwrap.dedent(text))
    return site


def test_customer_list_loads_from_site_yaml(tmp_path: Path) -> None:
    site = write_site(tmp_path, """\
        ivr:
          lookup_concurrency: 4
          customers:
            "+4915112345": {priority: 80, tier: platinum}
            "004930555": {tier: silver}
        sip: {tls_port: null}
        """)
    config = load_site(site)
    assert config.ivr.lookup_concurrency == 4
    assert listed_customer(config.ivr.customers, "+4915112345") == {
        "priority": 80, "tier": "platinum"}
    assert listed_customer(config.ivr.customers, "004930555") == {"priority": 0, "tier": "silver"}
    assert listed_customer(config.ivr.customers, "+49999") is None
    assert load_site(write_site(tmp_path / "empty", "sip: {tls_port: null}\n")).ivr.customers == {}


@pytest.mark.parametrize(("entry", "needle"), [
    ('"+4915112345": {priority: 101}', "priority"),
    ('"+4915112345": {tier: "gold tier"}', "tier"),
    ('"+4915112345": {colour: red}', "colour"),
    ('"call-me": {priority: 1}', "call-me"),
])
def test_bad_customer_entries_name_the_line(tmp_path: Path, entry: str, needle: str) -> None:
    text = f"""\
ivr:
  customers:
    "+4911111111": {{priority: 1}}
    {entry}
sip: {{tls_port: null}}
"""
    site = write_site(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_site(site)
    message = str(info.value)
    assert len(info.value.issues) == 1, message
    assert f"{site / 'site.yaml'}:4" in message and needle in message, message


# --------------------------------------------------------------------------- call back

CALLBACK_FLOW = """\
    flows:
      main:
        start: offer
        nodes:
          offer:
            type: callback
            prompt: offer_callback
            queue: sales
            confirm_prompt: confirm_number
            number_prompt: enter_number
            number_min_digits: 6
            number_max_digits: 12
            on_decline: q
            next: bye
          q: {type: queue, queue: sales}
          bye: {type: hangup}
"""


def callback_run(tmp_path: Path, caller: str = "+4915112345") -> FlowRun:
    run = FlowRun(loaded(tmp_path, CALLBACK_FLOW), NOW, caller)
    assert run.take_actions() == [StartCollect(1), Play("offer_callback", True)]
    return run


def test_callback_confirms_the_callers_number(tmp_path: Path) -> None:
    run = callback_run(tmp_path)
    # Accepting during the offer prompt stops it and asks to confirm.
    assert run.handle(DigitPressed("1"), NOW + 1) == [
        StopPlayback(), StartCollect(1), Play("confirm_number", True)]
    assert run.handle(PromptFinished(), NOW + 3) == [StartTimer(NOW + 8)]
    offer, hangup = run.handle(DigitPressed("1"), NOW + 4)
    assert isinstance(offer, OfferCallback) and (offer.queue, offer.number) == (
        "sales", "+4915112345")
    assert hangup == Hangup() and run.trace == ["offer", "bye"]


def test_callback_to_another_number(tmp_path: Path) -> None:
    run = callback_run(tmp_path)
    run.handle(DigitPressed("1"), NOW + 1)
    assert run.handle(DigitPressed("2"), NOW + 2) == [
        StopPlayback(), StartCollect(12, "#"), Play("enter_number", True)]
    run.handle(PromptFinished(), NOW + 3)
    for i, digit in enumerate("0301*234567"):      # "*" is not part of a number
        run.handle(DigitPressed(digit), NOW + 4 + i * 0.5)
    offer, _ = run.handle(DigitPressed("#"), NOW + 10)
    assert isinstance(offer, OfferCallback) and offer.number == "0301234567"
    assert offer.variables["callback_number"] == "0301234567"


def test_callback_number_ends_after_the_inter_digit_pause_or_max_digits(tmp_path: Path) -> None:
    run = callback_run(tmp_path)
    run.handle(DigitPressed("1"), NOW)
    run.handle(DigitPressed("2"), NOW)
    for digit in "030123":
        run.handle(DigitPressed(digit), NOW + 1)
    assert run.next_timer() == NOW + 4                 # 3 s after the last digit
    offer, _ = run.handle_timer(NOW + 4)
    assert isinstance(offer, OfferCallback) and offer.number == "030123"
    run = callback_run(tmp_path)
    run.handle(DigitPressed("1"), NOW)
    run.handle(DigitPressed("2"), NOW)
    actions: list[object] = []
    for digit in "123456789012":
        actions = run.handle(DigitPressed(digit), NOW + 1)
    assert isinstance(actions[0], OfferCallback) and actions[0].number == "123456789012"


@pytest.mark.parametrize(("digits", "reason"), [
    ("1" "9", "invalid"),            # neither confirm nor change
    ("1" "2" "123#", "invalid"),      # fewer than number_min_digits
])
def test_callback_bad_entries_decline(tmp_path: Path, digits: str, reason: str) -> None:
    run = callback_run(tmp_path)
    actions: list[object] = []
    for digit in digits:
        actions = run.handle(DigitPressed(digit), NOW + 1)
    assert isinstance(actions[-1], RouteToQueue) and run.variables["ivr_failure"] == reason
    assert not any(isinstance(a, OfferCallback) for a in actions)


def test_callback_confirm_timeout_declines(tmp_path: Path) -> None:
    run = callback_run(tmp_path)
    run.handle(DigitPressed("1"), NOW)
    run.handle(PromptFinished(), NOW + 1)
    (route,) = run.handle_timer(NOW + 6)
    assert isinstance(route, RouteToQueue) and run.variables["ivr_failure"] == "timeout"


def test_withheld_number_is_asked_for(tmp_path: Path) -> None:
    run = callback_run(tmp_path, caller="anonymous")
    assert run.handle(DigitPressed("1"), NOW) == [
        StopPlayback(), StartCollect(12, "#"), Play("enter_number", True)]
    (tmp_path / "plain").mkdir()
    plain = loaded(tmp_path / "plain", """\
        flows:
          main:
            start: offer
            nodes:
              offer: {type: callback, prompt: p, queue: sales, on_decline: q}
              q: {type: queue, queue: sales}
        """)
    run = FlowRun(plain, NOW, "anonymous")
    run.take_actions()
    stop, route = run.handle(DigitPressed("1"), NOW)
    assert stop == StopPlayback() and isinstance(route, RouteToQueue)
    assert run.variables["ivr_failure"] == "no-number"


@pytest.mark.parametrize(("extra", "message"), [
    ("confirm_digit: 2", "change_digit must differ"),
    ("number_min_digits: 9, number_max_digits: 4", "number_min_digits 9 is above"),
    ("change_digit: x", "change_digit must be one DTMF digit"),
])
def test_callback_field_errors(tmp_path: Path, extra: str, message: str) -> None:
    text, problems = problems_of(tmp_path, f"""\
        flows:
          main:
            start: x
            nodes:
              a: {{type: hangup}}
              x: {{type: callback, prompt: p, queue: sales, on_decline: a, {extra}}}
        """)
    assert any(message in p.message and p.line == line_of(text, "x:") for p in problems), problems


def test_callback_prompts_are_checked(tmp_path: Path) -> None:
    text, problems = problems_of(tmp_path, CALLBACK_FLOW, prompts={"offer_callback"})
    assert {(p.message.split(" ")[0], p.line) for p in problems} == {
        ("confirm_prompt", line_of(text, "confirm_prompt")),
        ("number_prompt", line_of(text, "number_prompt"))}
