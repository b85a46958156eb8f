"""IVR flows: loading and validation (errors name file and line), and the sans-IO runner.

Time is driven by hand: every event carries ``now``; timers fire only through handle_timer.
"""

from __future__ import annotations

import datetime as dt
import textwrap
from dataclasses import replace
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from appliance.ivr import (
    CallerHungUp,
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
    Transfer,
    Voicemail,
    load_flows,
)
from appliance.ivr.runner import LocalProtocolError, TimerFired

EXAMPLE = textwrap.dedent("""\
    flows:
      main:
        start: hours
        nodes:
          hours:
            type: schedule
            timezone: Europe/Berlin
            hours:
              mon-fri: "08:00-17:00"
              sat: ["09:00-12:00", "13:00-15:00"]
            holidays: [2026-12-25, "2026-12-26"]
            open: welcome
            closed: closed_message
            holiday: holiday_message
          welcome:
            type: play
            prompt: welcome
            next: lookup
          lookup:
            type: http
            url: https://crm.example.com/ivr/lookup
            timeout: 2
            map:
              priority: customer.priority
              tier: customer.tier
              customer_name: customer.name
            next: main_menu
            on_failure: main_menu
          main_menu:
            type: menu
            prompt: main_menu
            options:
              1: sales
              2: account
              3: callback
              0: operator
            timeout: 5
            retries: 3
            invalid_prompt: invalid_choice
            timeout_prompt: no_input
            on_failure: sales
          account:
            type: collect
            prompt: enter_account
            variable: account
            min_digits: 4
            max_digits: 8
            terminator: "#"
            timeout: 6
            inter_digit_timeout: 3
            retries: 2
            invalid_prompt: invalid_account
            next: vip
            on_failure: sales
          vip:
            type: set
            variables: {priority: 7, tier: gold}
            next: support
          sales:
            type: queue
            queue: sales
            priority: 1
          support:
            type: queue
            queue: support
          callback:
            type: callback
            prompt: offer_callback
            queue: sales
            accept_digit: 1
            on_decline: sales
            next: goodbye
          goodbye:
            type: play
            prompt: goodbye
            next: bye
          bye:
            type: hangup
          operator:
            type: transfer
            number: "+4930123456"
          closed_message:
            type: play
            prompt: closed
            next: mailbox
          holiday_message:
            type: play
            prompt: holiday
            next: bye
          mailbox:
            type: voicemail
            mailbox: sales
            prompt: leave_message
        variables: [customer_name]
""")
PROMPTS = {"welcome", "main_menu", "invalid_choice", "no_input", "enter_account",
           "invalid_account", "offer_callback", "goodbye", "closed", "holiday", "leave_message"}
QUEUES = {"sales", "support"}
BERLIN = ZoneInfo("Europe/Berlin")


def at(year: int, month: int, day: int, hour: int, minute: int = 0, tz: ZoneInfo = BERLIN) -> float:
    return dt.datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


OPEN = at(2026, 11, 25, 10)          # a Wednesday, 10:00 in Berlin


@pytest.fixture
def flows(tmp_path: Path):  # type: ignore[no-untyped-def]
    path = tmp_path / "ivr.yaml"
    path.write_text(EXAMPLE)
    return load_flows(path, prompts=PROMPTS, queues=QUEUES)


def run_to_menu(flows, now: float = OPEN, body: object = None) -> FlowRun:  # type: ignore[no-untyped-def]
    run = FlowRun(flows["main"], now, "+4915112345")
    assert run.take_actions() == [Play("welcome", False)]
    actions = run.handle(PromptFinished("welcome"), now)
    lookup = actions[0]
    assert isinstance(lookup, HttpLookup) and lookup.payload == {
        "caller": "+4915112345", "dialled": "", "variables": {"caller": "+4915112345",
                                                             "dialled": ""}}
    result = HttpResult(lookup.request_id, 200, body if body is not None else {"customer": {}})
    actions = run.handle(result, now + 0.1)
    assert actions == [StartCollect(1), Play("main_menu", True)]
    return run


# --------------------------------------------------------------------------- loading


def test_example_loads_from_file_site_yaml_and_mapping(tmp_path: Path, flows) -> None:  # type: ignore[no-untyped-def]
    main = flows["main"]
    assert main.start == "hours" and len(main.nodes) == 15
    assert main.nodes["main_menu"].options == {"1": "sales", "2": "account", "3": "callback",
                                               "0": "operator"}
    assert main.nodes["hours"].line == 5
    site = tmp_path / "site.yaml"
    site.write_text("site: {id: demo}\nivr:\n" + textwrap.indent(EXAMPLE, "  "))
    from_site = load_flows(site, prompts=PROMPTS, queues=QUEUES)
    assert from_site["main"].nodes.keys() == main.nodes.keys()
    assert from_site["main"].nodes["hours"].line == 7
    import yaml

    plain = yaml.safe_load(EXAMPLE)
    from_mapping = load_flows({"ivr": plain}, queues=QUEUES)
    assert from_mapping["main"].nodes["hours"].line is None
    assert from_mapping["main"].nodes["main_menu"] == replace(main.nodes["main_menu"], line=None)


def test_prompt_directory(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    for name in PROMPTS - {"holiday"}:
        (prompts / f"{name}.wav").write_bytes(b"RIFF")
    path = tmp_path / "ivr.yaml"
    path.write_text(EXAMPLE)
    with pytest.raises(FlowError) as info:
        load_flows(path, prompts=prompts, queues=QUEUES)
    (problem,) = info.value.problems
    assert problem.file == str(path) and problem.node == "holiday_message"
    assert problem.line == EXAMPLE.splitlines().index("        prompt: holiday") + 1
    assert "'holiday' is not a prompt" in str(info.value)
    (prompts / "holiday.wav").write_bytes(b"RIFF")
    assert load_flows(path, prompts=prompts, queues=QUEUES)


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def load_text(tmp_path: Path, text: str, **kw: object):  # type: ignore[no-untyped-def]
    path = tmp_path / "flows.yaml"
    path.write_text(textwrap.dedent(text))
    return path, load_flows(path, **kw)  # type: ignore[arg-type]


def problems_of(tmp_path: Path, text: str, **kw: object) -> tuple[str, list]:  # type: ignore[type-arg]
    text = textwrap.dedent(text)
    path = tmp_path / "flows.yaml"
    path.write_text(text)
    with pytest.raises(FlowError) as info:
        load_flows(path, **kw)  # type: ignore[arg-type]
    for p in info.value.problems:
        assert p.file == str(path)
        assert f"{path}:{p.line}:" in str(info.value)
    return text, list(info.value.problems)


def test_unknown_next_node(tmp_path: Path) -> None:
    text, (p,) = problems_of(tmp_path, """\
        flows:
          main:
            start: a
            nodes:
              a: {type: play, prompt: hi, next: b}
              b:
                type: menu
                prompt: m
                options: {1: a, 2: nowhere}
                on_failure: a
        """)
    assert p.node == "b" and p.line == line_of(text, "options:")
    assert "options.2 refers to unknown node 'nowhere'" in p.message


def test_unknown_start_node(tmp_path: Path) -> None:
    text, problems = problems_of(tmp_path, """\
        flows:
          main:
            start: missing
            nodes:
              a: {type: hangup}
        """)
    assert any("start node 'missing' does not exist" in p.message and p.line == 2
               for p in problems)


def test_unreachable_node(tmp_path: Path) -> None:
    text, (p,) = problems_of(tmp_path, """\
        flows:
          main:
            start: a
            nodes:
              a: {type: hangup}
              orphan:
                type: play
                prompt: x
                next: a
        """)
    assert p.node == "orphan" and p.line == line_of(text, "orphan:")
    assert "unreachable" in p.message


def test_loop_without_input(tmp_path: Path) -> None:
    text, (p,) = problems_of(tmp_path, """\
        flows:
          main:
            start: a
            nodes:
              a: {type: play, prompt: hi, next: b}
              b: {type: set, variables: {x: 1}, next: c}
              c:
                type: schedule
                hours: {mon-sun: "00:00-24:00"}
                open: a
                closed: d
              d: {type: hangup}
        """)
    assert p.node == "a" and p.line == line_of(text, "a: {type")
    assert "loop without caller input through a, b, c" in p.message


def test_loop_through_a_menu_is_fine(tmp_path: Path) -> None:
    _, flows = load_text(tmp_path, """\
        flows:
          main:
            start: a
            nodes:
              a: {type: play, prompt: hi, next: m}
              m: {type: menu, prompt: m, options: {9: a, 1: q}, on_failure: a}
              q: {type: queue, queue: sales}
        """, queues={"sales"})
    assert set(flows["main"].nodes) == {"a", "m", "q"}


def test_self_loop_without_input(tmp_path: Path) -> None:
    text, (p,) = problems_of(tmp_path, """\
        flows:
          main:
            start: s
            nodes:
              s: {type: set, variables: {x: 1}, next: s}
        """)
    assert p.node == "s" and "loop without caller input" in p.message


def test_unknown_queue(tmp_path: Path) -> None:
    text, problems = problems_of(tmp_path, """\
        flows:
          main:
            start: cb
            nodes:
              cb:
                type: callback
                prompt: offer
                queue: billing
                on_decline: q
              q:
                type: queue
                queue: salez
        """, queues={"sales", "support"})
    by_node = {p.node: p for p in problems}
    assert by_node["q"].line == line_of(text, "queue: salez")
    assert "unknown queue 'salez' (known: sales, support)" in by_node["q"].message
    assert by_node["cb"].line == line_of(text, "queue: billing")


@pytest.mark.parametrize(
    ("node_yaml", "needle", "message"),
    [
        ("{type: dance}", "type: dance", "unknown node type 'dance'"),
        ("{type: play, next: a}", "x:", "prompt is required"),
        ("{type: menu, prompt: m, options: {1: a}}", "x:", "needs on_failure"),
        ("{type: menu, prompt: m, options: {x: a}, on_failure: a}", "x:", "one DTMF digit"),
        ("{type: menu, prompt: m, options: {1: a}, on_failure: a, retries: 0}", "x:",
         "retries must be"),
        ("{type: collect, variable: v, next: a, on_failure: a, min_digits: 5, max_digits: 2}",
         "x:", "above max_digits"),
        ("{type: schedule, timezone: Mars/Olympus, hours: {mon: '08:00-17:00'}, open: a, "
         "closed: a}", "x:", "unknown time zone 'Mars/Olympus'"),
        ("{type: schedule, hours: {mon: '17:00-08:00'}, open: a, closed: a}", "x:",
         "not a time range"),
        ("{type: schedule, hours: {someday: '08:00-17:00'}, open: a, closed: a}", "x:",
         "not a weekday"),
        ("{type: schedule, hours: {mon: '08:00-17:00'}, holidays: [2026-13-01], open: a, "
         "closed: a}", "x:", "not a date"),
        ("{type: http, url: ftp://x, next: a, on_failure: a}", "x:", "http:// or https://"),
        ("{type: transfer, number: call me}", "x:", "number must be digits"),
        ("{type: hangup, colour: red}", "x:", "unknown key 'colour'"),
        ("{type: collect, variable: pin, next: a, on_failure: a, secret: 'yes'}", "x:",
         "secret must be true or false, got 'yes'"),
    ],
)
def test_node_field_errors_name_the_line(
    tmp_path: Path, node_yaml: str, needle: str, message: str
) -> None:
    text, problems = problems_of(tmp_path, f"""\
        flows:
          main:
            start: x
            nodes:
              a: {{type: hangup}}
              x: {node_yaml}
        """)
    assert any(message in p.message and p.line == line_of(text, needle) and p.node == "x"
               for p in problems), problems


def test_yaml_errors_name_the_line(tmp_path: Path) -> None:
    _, (p,) = problems_of(tmp_path, """\
        flows:
          main:
            start: a
            nodes:
              a: {type: hangup}
              a: {type: hangup}
        """)
    assert p.line == 6 and "duplicate key 'a'" in p.message
    _, (p,) = problems_of(tmp_path, "flows:\n  main: [\n")
    assert p.line is not None and "not valid YAML" in p.message
    _, (p,) = problems_of(tmp_path, "nothing: here\n")
    assert "flows" in p.message


# --------------------------------------------------------------------------- running


def test_play_http_menu_to_queue_with_priority_and_tier(flows) -> None:  # type: ignore[no-untyped-def]
    body = {"customer": {"priority": 9, "tier": "platinum", "name": "Ada", "extra": [1]}}
    run = run_to_menu(flows, body=body)
    assert run.variables["tier"] == "platinum"
    assert run.handle(PromptFinished("main_menu"), OPEN + 3) == [StartTimer(OPEN + 8)]
    assert run.next_timer() == OPEN + 8
    (route,) = run.handle(DigitPressed("1"), OPEN + 4)
    assert isinstance(route, RouteToQueue)
    assert (route.queue, route.priority, route.tier) == ("sales", 9, "platinum")
    assert route.variables["customer_name"] == "Ada" and route.variables["menu_choice"] == "1"
    assert run.finished and run.next_timer() is None
    assert run.trace == ["hours", "welcome", "lookup", "main_menu", "sales"]
    assert run.handle(DigitPressed("2"), OPEN + 5) == []     # ignored once finished


def test_http_lookup_times_out_to_fallback(flows) -> None:  # type: ignore[no-untyped-def]
    run = FlowRun(flows["main"], OPEN, "+4915112345")
    run.take_actions()
    lookup, timer = run.handle(PromptFinished(), OPEN + 1)
    assert isinstance(lookup, HttpLookup) and lookup.timeout == 2.0
    assert timer == StartTimer(OPEN + 3)
    assert run.handle_timer(OPEN + 2.9) == []                # too early: nothing
    actions = run.handle_timer(OPEN + 3)
    assert actions == [StartCollect(1), Play("main_menu", True)]
    assert run.variables["http_error"] == "timeout"
    # The late answer is ignored; the menu goes on.
    assert run.handle(HttpResult(lookup.request_id, 200, {"customer": {"priority": 1}}),
                      OPEN + 4) == []
    assert "priority" not in run.variables
    run.handle(PromptFinished(), OPEN + 5)
    (route,) = run.handle(DigitPressed("1"), OPEN + 6)
    assert isinstance(route, RouteToQueue) and route.priority == 1 and route.tier is None


@pytest.mark.parametrize(
    "result",
    [HttpResult(1, 500, {"customer": {}}), HttpResult(1, None, None, "connection refused"),
     HttpResult(1, 200, ["not", "an", "object"])],
)
def test_http_failures_take_the_fallback(flows, result: HttpResult) -> None:  # type: ignore[no-untyped-def]
    run = FlowRun(flows["main"], OPEN, "+4915112345")
    run.take_actions()
    run.handle(PromptFinished(), OPEN)
    assert run.handle(result, OPEN + 1) == [StartCollect(1), Play("main_menu", True)]
    assert run.node.id == "main_menu" and run.variables["http_error"]


def test_menu_invalid_digits_then_on_failure(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    run.handle(PromptFinished(), OPEN + 1)
    assert run.handle(DigitPressed("7"), OPEN + 2) == [
        StartCollect(1), Play("invalid_choice", True), Play("main_menu", True)]
    assert run.next_timer() is None                          # no timer while prompts play
    assert run.handle(PromptFinished(), OPEN + 3) == []      # one of two prompts done
    assert run.handle(PromptFinished(), OPEN + 4) == [StartTimer(OPEN + 9)]
    # Barge-in: a digit during the replayed prompts stops them and counts.
    run.handle(DigitPressed("8"), OPEN + 5)
    actions = run.handle(DigitPressed("9"), OPEN + 5.5)
    assert actions[0] == StopPlayback()
    route = actions[-1]
    assert isinstance(route, RouteToQueue) and route.queue == "sales"
    assert route.variables["ivr_failure"] == "invalid"


def test_menu_timeouts_then_on_failure(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    now = OPEN + 1
    run.handle(PromptFinished(), now)
    for attempt in (1, 2):
        deadline = run.next_timer()
        assert deadline == now + 5
        actions = run.handle_timer(deadline)
        assert actions == [StartCollect(1), Play("no_input", True), Play("main_menu", True)]
        now = deadline + 1
        run.handle(PromptFinished(), now)
        run.handle(PromptFinished(), now)
        assert attempt in (1, 2)
    (route,) = run.handle_timer(run.next_timer())  # type: ignore[arg-type]
    assert isinstance(route, RouteToQueue) and route.variables["ivr_failure"] == "timeout"


def test_menu_transfer_to_operator(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    assert run.handle(DigitPressed("0"), OPEN + 1) == [StopPlayback(), Transfer("+4930123456")]
    assert run.result == Transfer("+4930123456")


def test_collect_with_terminator_then_set_variables(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    actions = run.handle(DigitPressed("2"), OPEN + 1)
    assert actions == [StopPlayback(), StartCollect(8, "#"), Play("enter_account", True)]
    assert run.handle(PromptFinished(), OPEN + 2) == [StartTimer(OPEN + 8)]
    for i, d in enumerate("12345"):
        assert run.handle(DigitPressed(d), OPEN + 3 + i) == [StartTimer(OPEN + 6 + i)]
    (route,) = run.handle(DigitPressed("#"), OPEN + 9)
    assert isinstance(route, RouteToQueue)
    assert route.variables["account"] == "12345"
    assert (route.queue, route.priority, route.tier) == ("support", 7, "gold")  # from the set node


def test_a_secret_collect_is_used_by_the_flow_but_never_leaves_it(tmp_path: Path) -> None:
    # The PIN goes to the flow's own check (the http look-up) and nowhere else: not in the
    # queue's variables (the screen pop and the agent's desk read those), nor a callback's.
    _, flows = load_text(tmp_path, """\
        flows:
          main:
            start: pin
            nodes:
              pin: {type: collect, variable: pin, secret: true, next: check, on_failure: bye}
              check: {type: http, url: "https://crm.example.com/pin", next: account,
                      on_failure: bye}
              account: {type: collect, variable: account, next: offer, on_failure: bye}
              offer: {type: callback, prompt: offer_callback, queue: sales, on_decline: sales,
                      next: bye}
              sales: {type: queue, queue: sales}
              bye: {type: hangup}
        """)
    assert flows["main"].secrets == {"pin"}
    run = FlowRun(flows["main"], OPEN, "+4915112345")
    assert run.take_actions() == [StartCollect(16, "#"), StartTimer(OPEN + 5)]
    for d in "9317":
        run.handle(DigitPressed(d), OPEN + 1)
    (lookup,) = run.handle(DigitPressed("#"), OPEN + 1)[:1]
    assert isinstance(lookup, HttpLookup) and lookup.payload["variables"]["pin"] == "9317"
    assert run.handle(HttpResult(lookup.request_id, 200, {}), OPEN + 2) == [
        StartCollect(16, "#"), StartTimer(OPEN + 7)]
    for d in "42":
        run.handle(DigitPressed(d), OPEN + 3)
    run.handle(DigitPressed("#"), OPEN + 3)  # to the callback offer
    assert run.variables["pin"] == "9317" and run.shared_variables()["account"] == "42"
    assert "pin" not in run.shared_variables()
    run.handle(PromptFinished("offer_callback"), OPEN + 4)
    actions = run.handle(DigitPressed("2"), OPEN + 5)  # declines the callback: to the queue
    (route,) = [a for a in actions if isinstance(a, RouteToQueue)]
    assert route.variables["account"] == "42" and "pin" not in route.variables
    assert "9317" not in repr(route)


def test_collect_max_digits_and_inter_digit_timeout(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    run.handle(DigitPressed("2"), OPEN + 1)
    run.handle(PromptFinished(), OPEN + 2)
    for d in "1234567":
        run.handle(DigitPressed(d), OPEN + 3)
    (route,) = run.handle(DigitPressed("8"), OPEN + 3)
    assert route.variables["account"] == "12345678"          # type: ignore[union-attr]
    run = run_to_menu(flows)
    run.handle(DigitPressed("2"), OPEN + 1)
    run.handle(PromptFinished(), OPEN + 2)
    for d in "9876":
        run.handle(DigitPressed(d), OPEN + 3)
    (route,) = run.handle_timer(OPEN + 6)                     # 3 s after the last digit
    assert route.variables["account"] == "9876"               # type: ignore[union-attr]


def test_collect_too_few_digits_retries_then_fails(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    run.handle(DigitPressed("2"), OPEN + 1)
    run.handle(PromptFinished(), OPEN + 2)
    run.handle(DigitPressed("1"), OPEN + 3)
    actions = run.handle(DigitPressed("#"), OPEN + 4)
    assert actions == [StartCollect(8, "#"), Play("invalid_account", True),
                       Play("enter_account", True)]
    run.handle(PromptFinished(), OPEN + 5)
    run.handle(PromptFinished(), OPEN + 6)
    (route,) = run.handle_timer(OPEN + 12)                    # no digit at all: second failure
    assert isinstance(route, RouteToQueue) and route.queue == "sales"
    assert "account" not in route.variables


def test_callback_accept_and_decline(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    assert run.handle(DigitPressed("3"), OPEN + 1)[-1] == Play("offer_callback", True)
    run.handle(PromptFinished(), OPEN + 2)
    actions = run.handle(DigitPressed("1"), OPEN + 3)
    assert isinstance(actions[0], OfferCallback)
    assert (actions[0].queue, actions[0].number) == ("sales", "+4915112345")
    assert actions[1] == Play("goodbye", False)
    assert run.handle(DigitPressed("5"), OPEN + 4) == []     # announcements ignore digits
    assert run.handle(PromptFinished(), OPEN + 5) == [Hangup()]
    run = run_to_menu(flows)
    run.handle(DigitPressed("3"), OPEN + 1)
    run.handle(PromptFinished(), OPEN + 2)
    (route,) = run.handle_timer(OPEN + 7)
    assert isinstance(route, RouteToQueue) and route.queue == "sales"


@pytest.mark.parametrize(
    ("now", "first"),
    [
        (at(2026, 11, 25, 10), "welcome"),            # Wednesday in hours
        (at(2026, 11, 25, 17), "closed"),             # end is exclusive
        (at(2026, 11, 25, 7, 59), "closed"),
        (at(2026, 11, 28, 12, 30), "closed"),         # Saturday lunch break
        (at(2026, 11, 28, 13, 30), "welcome"),
        (at(2026, 11, 29, 10), "closed"),             # Sunday
        (at(2026, 12, 25, 10), "holiday"),            # a Friday, but a holiday
        (at(2026, 12, 26, 10), "holiday"),
    ],
)
def test_schedule_open_closed_holiday(flows, now: float, first: str) -> None:  # type: ignore[no-untyped-def]
    run = FlowRun(flows["main"], now, "+4915112345")
    assert run.take_actions() == [Play(first, False)]


def test_schedule_follows_dst_in_its_time_zone(flows) -> None:  # type: ignore[no-untyped-def]
    utc = ZoneInfo("UTC")
    # Europe/Berlin leaves CET (UTC+1) for CEST (UTC+2) on 2026-03-29.
    cases = [
        (at(2026, 3, 27, 6, 30, utc), "closed"),      # Fri 07:30 CET
        (at(2026, 3, 27, 7, 30, utc), "welcome"),     # Fri 08:30 CET
        (at(2026, 3, 30, 6, 30, utc), "welcome"),     # Mon 08:30 CEST: same UTC time, now open
        (at(2026, 3, 30, 15, 30, utc), "closed"),     # Mon 17:30 CEST
        (at(2026, 3, 27, 15, 30, utc), "welcome"),    # Fri 16:30 CET
    ]
    for now, first in cases:
        run = FlowRun(flows["main"], now, "+49")
        assert run.take_actions() == [Play(first, False)], dt.datetime.fromtimestamp(now, utc)


def test_closed_goes_to_voicemail(flows) -> None:  # type: ignore[no-untyped-def]
    night = at(2026, 11, 25, 22)
    run = FlowRun(flows["main"], night, "+4915112345")
    assert run.take_actions() == [Play("closed", False)]
    assert run.handle(PromptFinished(), night + 4) == [Voicemail(
        "sales", "leave_message", variables={"caller": "+4915112345", "dialled": ""})]
    assert run.finished


def test_caller_hangs_up_and_bad_events(flows) -> None:  # type: ignore[no-untyped-def]
    run = run_to_menu(flows)
    assert run.handle(CallerHungUp(), OPEN + 1) == []
    assert run.finished and run.next_timer() is None and run.result is None
    with pytest.raises(LocalProtocolError):
        run.handle("1", OPEN + 2)  # type: ignore[arg-type]
    assert run.handle(TimerFired(), OPEN + 3) == []


def test_runtime_loop_guard(tmp_path: Path) -> None:
    # Validation refuses such a flow; a flow built in code is still stopped by the step budget.
    from appliance.ivr.flow import Flow, SetNode

    flow = Flow("loop", "s", {"s": SetNode("s", None, variables={}, next="s")})
    run = FlowRun(flow, 0.0, "+1")
    assert run.take_actions() == [Hangup("loop")]


def test_example_in_docs_loads(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parent.parent / "docs" / "ivr.md").read_text()
    example = doc.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "ivr.yaml"
    path.write_text(example)
    flows = load_flows(path, prompts=PROMPTS, queues=QUEUES)
    run = FlowRun(flows["main"], at(2026, 11, 25, 22), "+4915112345")
    assert run.take_actions() == [Play("closed", False)]


def test_missing_file_and_missing_prompt_directory(tmp_path: Path) -> None:
    with pytest.raises(FlowError, match="cannot read"):
        load_flows(tmp_path / "absent.yaml")
    path = tmp_path / "ivr.yaml"
    path.write_text(EXAMPLE)
    with pytest.raises(FlowError, match="prompt directory .* does not exist"):
        load_flows(path, prompts=tmp_path / "no-prompts")
