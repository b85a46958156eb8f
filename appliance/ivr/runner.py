"""Running one call through an IVR flow, sans-IO.

``FlowRun(flow, now, caller)`` walks the flow from its start node. It takes events (a digit,
a prompt that finished, a timer, an HTTP result, the caller hanging up) through
``handle(event, now)`` and answers with actions for the adapter to carry out (play a prompt,
start collecting digits, run an HTTP lookup, route to a queue, ...). It reads no clock and does
no I/O: the adapter arms one timer at ``next_timer()`` and calls ``handle_timer(now)``.

What the runner waits for is a table, ``_TRANSITIONS``: (waiting state, event type) -> handler.
An event the state does not expect (a digit during a plain announcement, an HTTP answer that came
after its timeout) is listed there as ignored; an event type that is not in the table at all is
API misuse (LocalProtocolError).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.ivr.flow import (
    CallbackNode,
    CollectNode,
    Flow,
    HangupNode,
    HttpNode,
    MenuNode,
    Node,
    PlayNode,
    QueueNode,
    ScheduleNode,
    SetNode,
    TransferNode,
    VoicemailNode,
)

__all__ = [
    "Action",
    "CallerHungUp",
    "DigitPressed",
    "Event",
    "FlowRun",
    "Hangup",
    "HttpLookup",
    "HttpResult",
    "LocalProtocolError",
    "OfferCallback",
    "Play",
    "PromptFinished",
    "RouteToQueue",
    "StartCollect",
    "StartTimer",
    "StopPlayback",
    "TimerFired",
    "Transfer",
    "TransferResult",
    "Voicemail",
]

MAX_STEPS_PER_EVENT = 256
"""Nodes entered without waiting for anything; beyond it the call is hung up (a loop that
validation should have refused)."""
MAX_TRACE = 1000
MAX_VARIABLE_CHARS = 256
"""A mapped value longer than this is cut (it ends up in events and the call record)."""
MIN_PRIORITY = 0
MAX_PRIORITY = 100
"""Queue priorities a flow may give (the same range as a queue node's ``priority``)."""


class LocalProtocolError(Exception):
    """The runner was used wrongly (an event it does not know)."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class DigitPressed:
    """The caller pressed a DTMF key (RFC 4733 or in-band)."""

    digit: str
    """One of 0-9 * # A-D."""


@dataclass(frozen=True)
class PromptFinished:
    """A prompt asked for with Play finished playing (or was stopped)."""

    prompt: str | None = None
    """Its name, when the adapter knows it."""


@dataclass(frozen=True)
class TimerFired:
    """The timer at ``next_timer()`` expired (``handle_timer`` builds this)."""


@dataclass(frozen=True)
class HttpResult:
    """The answer to an HttpLookup."""

    request_id: int
    """The HttpLookup's request_id."""
    status: int | None = None
    """HTTP status, None when no answer came (connection error)."""
    body: Any = None
    """Decoded JSON body."""
    error: str | None = None
    """Why the lookup failed, if it did."""


@dataclass(frozen=True)
class CallerHungUp:
    """The caller is gone."""


@dataclass(frozen=True)
class TransferResult:
    """The outcome of a ``Transfer``: answered, or why not."""

    outcome: str
    """``answered``, ``busy``, ``no-answer`` or ``refused``."""
    status: int = 0
    """The SIP status of a failure (0 when answered)."""


TRANSFER_OUTCOMES = ("answered", "busy", "no-answer", "refused")

Event = DigitPressed | PromptFinished | TimerFired | HttpResult | CallerHungUp | TransferResult


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class Play:
    """Play a prompt to the caller."""

    prompt: str
    """Prompt name (a file of the prompt directory)."""
    barge_in: bool = False
    """A digit may interrupt it (menus, digit collection)."""


@dataclass(frozen=True)
class StopPlayback:
    """Stop the prompts being played (the caller barged in)."""


@dataclass(frozen=True)
class StartCollect:
    """Report the caller's digits from now on."""

    max_digits: int
    """Digits wanted at most (1 for a menu)."""
    terminator: str | None = None
    """Digit that ends the input."""


@dataclass(frozen=True)
class StartTimer:
    """The runner's timer is (re)armed; ``next_timer()`` says the same."""

    at: float
    """When to call handle_timer, in the clock of ``now``."""


@dataclass(frozen=True)
class HttpLookup:
    """Ask a web service; answer with HttpResult(request_id, ...)."""

    request_id: int
    url: str
    payload: Mapping[str, Any]
    """What to send: ``{"caller", "dialled", "variables": {name: value}}``."""
    timeout: float
    """Seconds; the runner gives up after this and takes the fallback."""
    method: str = "POST"
    """``POST`` (payload as a JSON body) or ``GET`` (caller and dialled in the query)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra request headers from the node."""


@dataclass(frozen=True)
class RouteToQueue:
    """Hand the call to an ACD queue; the flow is over."""

    queue: str
    priority: int
    """Higher is served first (0-100): the variable ``priority`` (set by a lookup, the site's
    customer list or a ``set`` node), else the node's default. Goes to CallerJoin.priority."""
    tier: str | None
    """Customer tier from the variable ``tier`` (e.g. ``gold``), for the call record."""
    variables: Mapping[str, str]
    """Everything the flow learned (for skills, screen pop and the call record)."""


@dataclass(frozen=True)
class Transfer:
    """Ring ``number`` (an agent's extension, or a number through the trunk under the dial
    rules of ``role``) for at most ``timeout`` seconds; answer with ``TransferResult``."""

    number: str
    role: str = "agent"
    timeout: float = 30.0


@dataclass(frozen=True)
class Hangup:
    """End the call; the flow is over."""

    reason: str = "normal"


@dataclass(frozen=True)
class Voicemail:
    """Take a voice message for a mailbox; the flow is over."""

    mailbox: str
    prompt: str | None = None
    """Greeting played before the beep."""
    max_seconds: int = 120
    """Longest message to record."""
    queue: str | None = None
    """Queue the mailbox belongs to, if any."""
    variables: Mapping[str, str] = field(default_factory=dict)
    """Everything the flow learned (stored with the message)."""


@dataclass(frozen=True)
class OfferCallback:
    """The caller accepted a call back: schedule it."""

    queue: str
    number: str
    """The number to call back (the caller's)."""
    variables: Mapping[str, str]


Action = (
    Play | StopPlayback | StartCollect | StartTimer | HttpLookup | RouteToQueue | Transfer
    | Hangup | Voicemail | OfferCallback
)


# --------------------------------------------------------------------------- the runner


INTER_DIGIT_TIMEOUT = 3.0
"""Seconds between the digits of a call-back number before it counts as entered."""
_CALLABLE = re.compile(r"\+?[0-9]{3,32}")


def _callable(number: str) -> bool:
    """A number we could call back (not withheld, not a SIP name)."""
    return bool(_CALLABLE.fullmatch(number))


class _CallbackStep(enum.Enum):
    """Where a callback node is: the offer, the number's confirmation, entering a number."""

    OFFER = "offer"
    CONFIRM = "confirm"
    NUMBER = "number"


class Waiting(enum.Enum):
    """What the run waits for."""

    PROMPT = "prompt"    # prompts to finish (input nodes accept barge-in digits)
    INPUT = "input"      # digits, or the input timer
    HTTP = "http"        # an HttpResult, or its timeout
    TRANSFER = "transfer"  # a TransferResult
    DONE = "done"        # the flow ended


@dataclass
class FlowRun:
    """One call's walk through a flow; see the module docstring."""

    flow: Flow
    now: float
    caller: str
    variables: dict[str, str] = field(default_factory=dict)
    """Flow variables; ``caller`` and ``dialled`` are set from the start."""
    dialled: str = ""
    """The number the caller dialled."""
    customer: Mapping[str, Any] | None = None
    """The caller's entry in the site's customer list (``priority``, ``tier``), if listed:
    its values are set from the start and ``http`` nodes are passed without a lookup."""

    def __post_init__(self) -> None:
        self.variables = {"caller": self.caller, "dialled": self.dialled, **self.variables}
        if self.customer is not None:
            for key in ("priority", "tier"):
                if self.customer.get(key) is not None:
                    self.variables[key] = str(self.customer[key])
            self.variables["customer_source"] = "list"
        self.waiting = Waiting.PROMPT
        self.node: Node = self.flow.nodes[self.flow.start]
        self.trace: list[str] = []
        """Node ids entered, in order (the first MAX_TRACE)."""
        self.result: Action | None = None
        """The action that ended the flow."""
        self._out: list[Action] = []
        self._deadline: float | None = None
        self._pending_prompts = 0
        self._attempt = 1
        self._digits = ""
        self._request_id = 0
        self._callback_step = _CallbackStep.OFFER
        self._enter(self.flow.start, self.now)

    # -- adapter interface ---------------------------------------------------------------------

    def shared_variables(self) -> dict[str, str]:
        """The variables that may leave the flow (to a queue, the screen pop, a callback or
        voicemail row): all but the flow's ``secrets``. Only an ``http`` look-up, the flow's
        own check of a PIN for example, is sent every variable."""
        secrets = self.flow.secrets
        if not secrets:
            return dict(self.variables)
        return {k: v for k, v in self.variables.items() if k not in secrets}

    @property
    def finished(self) -> bool:
        return self.waiting is Waiting.DONE

    def take_actions(self) -> list[Action]:
        """Actions produced so far and not yet taken (the start's, after construction)."""
        out, self._out = self._out, []
        return out

    def next_timer(self) -> float | None:
        """When ``handle_timer`` must be called next, or None."""
        return self._deadline

    def handle_timer(self, now: float) -> list[Action]:
        """Call at or after ``next_timer()``; earlier calls do nothing."""
        if self._deadline is None or now < self._deadline:
            return []
        return self.handle(TimerFired(), now)

    def handle(self, event: Event, now: float) -> list[Action]:
        """Feed one event; return the actions it causes."""
        try:
            handler = _TRANSITIONS[(self.waiting, type(event))]
        except KeyError:
            raise LocalProtocolError(
                f"event {type(event).__name__} is not an IVR event (waiting={self.waiting.value})"
            ) from None
        self.now = now
        if isinstance(event, TimerFired):
            self._deadline = None
        handler(self, event, now)
        return self.take_actions()

    # -- walking ---------------------------------------------------------------------------

    def _enter(self, node_id: str, now: float) -> None:
        for _ in range(MAX_STEPS_PER_EVENT):
            node = self.flow.nodes[node_id]
            self.node = node
            self._deadline = None
            if len(self.trace) < MAX_TRACE:
                self.trace.append(node.id)
            following = self._run_node(node, now)
            if following is None:
                return
            node_id = following
        self._finish(Hangup("loop"))

    def _run_node(self, node: Node, now: float) -> str | None:
        """Start ``node``; return the next node when it completes at once, else None."""
        if isinstance(node, ScheduleNode):
            is_open, holiday = node.is_open(now)
            if holiday:
                return node.holiday or node.closed
            return node.open if is_open else node.closed
        if isinstance(node, SetNode):
            self.variables.update(node.variables)
            return node.next
        if isinstance(node, PlayNode):
            self._play([node.prompt], barge_in=False)
            return None
        if isinstance(node, MenuNode | CollectNode | CallbackNode):
            self._attempt = 1
            self._callback_step = _CallbackStep.OFFER
            self._start_input(node, [p for p in [node.prompt] if p])
            return None
        if isinstance(node, HttpNode):
            if self.customer is not None:
                return node.next  # the customer list answered already
            self._request_id += 1
            payload = {"caller": self.caller, "dialled": self.dialled,
                       "variables": dict(self.variables)}
            self._out.append(HttpLookup(self._request_id, node.url, payload, node.timeout,
                                        node.method, dict(node.headers)))
            self.waiting = Waiting.HTTP
            self._arm(now + node.timeout)
            return None
        if isinstance(node, QueueNode):
            self._finish(RouteToQueue(node.queue, self._priority(node),
                                      self.variables.get("tier") or None,
                                      self.shared_variables()))
        elif isinstance(node, TransferNode):
            # The flow waits for the outcome; ``result`` says what is ending it meanwhile.
            self.result = Transfer(node.number, node.role, node.timeout)
            self._out.append(self.result)
            self.waiting = Waiting.TRANSFER
        elif isinstance(node, VoicemailNode):
            self._finish(Voicemail(node.mailbox, node.prompt, node.max_seconds, node.queue,
                                   self.shared_variables()))
        elif isinstance(node, HangupNode):
            self._finish(Hangup())
        else:  # pragma: no cover - NODE_KINDS and this dispatch are kept in step
            raise LocalProtocolError(f"no runner for node kind {node.kind}")
        return None

    def _priority(self, node: QueueNode) -> int:
        text = self.variables.get("priority")
        if text is None:
            return node.priority
        try:
            value = float(text)
        except ValueError:
            return node.priority  # a CRM answering "high" does not break the call
        if value != value:  # NaN
            return node.priority
        return max(MIN_PRIORITY, min(MAX_PRIORITY, int(value)))

    def _finish(self, action: Action) -> None:
        self._deadline = None
        self.waiting = Waiting.DONE
        self.result = action
        self._out.append(action)

    def _arm(self, at: float) -> None:
        self._deadline = at
        self._out.append(StartTimer(at))

    def _play(self, prompts: list[str], *, barge_in: bool) -> None:
        self._pending_prompts = len(prompts)
        self._out.extend(Play(p, barge_in) for p in prompts)
        self.waiting = Waiting.PROMPT

    def _start_input(self, node: MenuNode | CollectNode | CallbackNode, prompts: list[str]) -> None:
        self._digits = ""
        if isinstance(node, CollectNode):
            self._out.append(StartCollect(node.max_digits, node.terminator))
        else:
            self._out.append(StartCollect(1))
        if prompts:
            self._play(prompts, barge_in=True)
        else:
            self._await_input(node)

    def _await_input(self, node: Node) -> None:
        self.waiting = Waiting.INPUT
        timeout = node.timeout if isinstance(node, MenuNode | CollectNode | CallbackNode) else 0
        self._arm(self.now + timeout)

    def _failed_attempt(self, node: MenuNode | CollectNode, reason: str) -> None:
        """An invalid entry or no entry: retry with the matching prompt, or leave."""
        if self._attempt >= node.retries:
            self.variables["ivr_failure"] = reason
            if isinstance(node, MenuNode):
                self._enter(node.timeout_exit if reason == "timeout" else node.invalid_exit,
                            self.now)
            else:
                self._enter(node.on_failure, self.now)
            return
        self._attempt += 1
        extra = node.timeout_prompt if isinstance(node, MenuNode) and reason == "timeout" else (
            node.invalid_prompt)
        self._start_input(node, [p for p in (extra, node.prompt) if p])

    # -- handlers (the values of _TRANSITIONS) ----------------------------------------------

    def _on_prompt_finished(self, event: PromptFinished, now: float) -> None:
        self._pending_prompts -= 1
        if self._pending_prompts > 0:
            return
        node = self.node
        if isinstance(node, PlayNode):
            self._enter(node.next, now)
        else:
            self._await_input(node)

    def _on_digit_during_prompt(self, event: DigitPressed, now: float) -> None:
        if not isinstance(self.node, MenuNode | CollectNode | CallbackNode):
            return  # announcements are not interruptible
        self._out.append(StopPlayback())
        self._pending_prompts = 0
        self.waiting = Waiting.INPUT
        self._on_digit(event, now)

    def _on_digit(self, event: DigitPressed, now: float) -> None:
        node = self.node
        digit = event.digit
        if isinstance(node, MenuNode):
            target = node.options.get(digit)
            if target is None:
                self._deadline = None
                self._failed_attempt(node, "invalid")
            else:
                self.variables["menu_choice"] = digit
                self._enter(target, now)
        elif isinstance(node, CollectNode):
            if node.terminator is not None and digit == node.terminator:
                self._end_collect(node)
                return
            self._digits += digit
            if len(self._digits) >= node.max_digits:
                self._end_collect(node)
            else:
                self._arm(now + node.inter_digit_timeout)
        elif isinstance(node, CallbackNode):
            self._on_callback_digit(node, digit, now)

    # -- call back: offer, then confirm the number or enter another --------------------------

    def _on_callback_digit(self, node: CallbackNode, digit: str, now: float) -> None:
        step = self._callback_step
        if step is _CallbackStep.OFFER:
            if digit != node.accept_digit:
                self._enter(node.on_decline, now)
            elif node.confirm_prompt is not None and _callable(self.caller):
                self._callback_ask(node, _CallbackStep.CONFIRM, node.confirm_prompt)
            elif node.number_prompt is not None:
                self._callback_ask(node, _CallbackStep.NUMBER, node.number_prompt)
            elif _callable(self.caller):
                self._callback_accepted(node, self.caller, now)
            else:
                self._callback_declined(node, "no-number", now)
        elif step is _CallbackStep.CONFIRM:
            if digit == node.confirm_digit:
                self._callback_accepted(node, self.caller, now)
            elif digit == node.change_digit and node.number_prompt is not None:
                self._callback_ask(node, _CallbackStep.NUMBER, node.number_prompt)
            else:
                self._callback_declined(node, "invalid", now)
        elif digit == "#":
            self._callback_number_done(node, now)
        elif digit.isdigit():
            self._digits += digit
            if len(self._digits) >= node.number_max_digits:
                self._callback_number_done(node, now)
            else:
                self._arm(now + INTER_DIGIT_TIMEOUT)
        # other keys (* A-D) are not part of a phone number: ignored

    def _callback_ask(self, node: CallbackNode, step: _CallbackStep, prompt: str) -> None:
        self._deadline = None
        self._callback_step = step
        self._digits = ""
        if step is _CallbackStep.NUMBER:
            self._out.append(StartCollect(node.number_max_digits, "#"))
        else:
            self._out.append(StartCollect(1))
        self._play([prompt], barge_in=True)

    def _callback_number_done(self, node: CallbackNode, now: float) -> None:
        self._deadline = None
        if len(self._digits) < node.number_min_digits:
            self._callback_declined(node, "invalid", now)
        else:
            self._callback_accepted(node, self._digits, now)

    def _callback_accepted(self, node: CallbackNode, number: str, now: float) -> None:
        self.variables["callback_number"] = number
        self._out.append(OfferCallback(node.queue, number, self.shared_variables()))
        if node.next:
            self._enter(node.next, now)
        else:
            self._finish(Hangup("callback"))

    def _callback_declined(self, node: CallbackNode, reason: str, now: float) -> None:
        self.variables["ivr_failure"] = reason
        self._enter(node.on_decline, now)

    def _end_collect(self, node: CollectNode) -> None:
        self._deadline = None
        if len(self._digits) < node.min_digits:
            self._failed_attempt(node, "invalid")
            return
        self.variables[node.variable] = self._digits
        self._enter(node.next, self.now)

    def _on_timer(self, event: TimerFired, now: float) -> None:
        node = self.node
        if self.waiting is Waiting.HTTP and isinstance(node, HttpNode):
            self.variables["http_error"] = "timeout"
            self._enter(node.on_failure, now)
        elif isinstance(node, CollectNode) and self._digits:
            self._end_collect(node)
        elif isinstance(node, MenuNode | CollectNode):
            self._failed_attempt(node, "timeout")
        elif isinstance(node, CallbackNode):
            if self._callback_step is _CallbackStep.NUMBER and self._digits:
                self._callback_number_done(node, now)
            elif self._callback_step is _CallbackStep.OFFER:
                self._enter(node.on_decline, now)
            else:
                self._callback_declined(node, "timeout", now)

    def _on_http_result(self, event: HttpResult, now: float) -> None:
        node = self.node
        if not isinstance(node, HttpNode) or event.request_id != self._request_id:
            return  # an answer to an earlier lookup
        self._deadline = None
        ok = event.error is None and event.status is not None and 200 <= event.status < 300
        if not ok or not isinstance(event.body, Mapping):
            self.variables["http_error"] = event.error or (
                f"status {event.status}" if not ok else "body is not a JSON object")
            self._enter(node.on_failure, now)
            return
        for variable, path in node.map.items():
            value = _lookup(event.body, path)
            if value is not None:
                self.variables[variable] = str(value)[:MAX_VARIABLE_CHARS]
        self.variables["customer_source"] = "crm"
        self._enter(node.next, now)

    def _on_transfer_result(self, event: TransferResult, now: float) -> None:
        node = self.node
        assert isinstance(node, TransferNode)
        if event.outcome == "answered":
            self.waiting = Waiting.DONE
            return
        self.result = None
        self.variables["transfer_result"] = event.outcome
        if node.on_failure is None:
            self._finish(Hangup("transfer-failed"))
            return
        self._enter(node.on_failure, now)

    def _on_hangup(self, event: CallerHungUp, now: float) -> None:
        self._deadline = None
        self.waiting = Waiting.DONE

    def _ignore(self, event: Event, now: float) -> None:
        return None


def _lookup(body: Mapping[str, Any], path: str) -> str | int | float | None:
    value: Any = body
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    if isinstance(value, bool):
        return str(value).lower()
    return value if isinstance(value, str | int | float) else None


_Handler = Callable[[FlowRun, Any, float], None]
_TRANSITIONS: dict[tuple[Waiting, type], _Handler] = {
    (Waiting.PROMPT, PromptFinished): FlowRun._on_prompt_finished,
    (Waiting.PROMPT, DigitPressed): FlowRun._on_digit_during_prompt,
    (Waiting.PROMPT, TimerFired): FlowRun._ignore,
    (Waiting.PROMPT, HttpResult): FlowRun._ignore,
    (Waiting.PROMPT, CallerHungUp): FlowRun._on_hangup,
    (Waiting.INPUT, DigitPressed): FlowRun._on_digit,
    (Waiting.INPUT, TimerFired): FlowRun._on_timer,
    (Waiting.INPUT, PromptFinished): FlowRun._ignore,   # a prompt stopped by barge-in
    (Waiting.INPUT, HttpResult): FlowRun._ignore,
    (Waiting.INPUT, CallerHungUp): FlowRun._on_hangup,
    (Waiting.HTTP, HttpResult): FlowRun._on_http_result,
    (Waiting.HTTP, TimerFired): FlowRun._on_timer,
    (Waiting.HTTP, DigitPressed): FlowRun._ignore,
    (Waiting.HTTP, PromptFinished): FlowRun._ignore,
    (Waiting.HTTP, CallerHungUp): FlowRun._on_hangup,
    (Waiting.TRANSFER, TransferResult): FlowRun._on_transfer_result,
    (Waiting.TRANSFER, DigitPressed): FlowRun._ignore,
    (Waiting.TRANSFER, PromptFinished): FlowRun._ignore,
    (Waiting.TRANSFER, TimerFired): FlowRun._ignore,
    (Waiting.TRANSFER, HttpResult): FlowRun._ignore,
    (Waiting.TRANSFER, CallerHungUp): FlowRun._on_hangup,
    (Waiting.DONE, TransferResult): FlowRun._ignore,
    (Waiting.PROMPT, TransferResult): FlowRun._ignore,
    (Waiting.INPUT, TransferResult): FlowRun._ignore,
    (Waiting.HTTP, TransferResult): FlowRun._ignore,
    (Waiting.DONE, DigitPressed): FlowRun._ignore,
    (Waiting.DONE, PromptFinished): FlowRun._ignore,
    (Waiting.DONE, TimerFired): FlowRun._ignore,
    (Waiting.DONE, HttpResult): FlowRun._ignore,
    (Waiting.DONE, CallerHungUp): FlowRun._ignore,
}
