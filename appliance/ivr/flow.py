"""IVR flows: the model and its loader.

A flow is a graph of named nodes starting at ``start``. ``load_flows(source)`` reads the flows
from a YAML file (standalone, or the ``ivr`` section of ``site.yaml``) or from a mapping, checks
every node's fields, then runs the graph checks of ``appliance.ivr.validate``. Every problem is
reported at once in a FlowError, each naming the file and line of the offending node or key.
See docs/ivr.md for the syntax.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "INPUT_KINDS",
    "NODE_KINDS",
    "TERMINAL_KINDS",
    "CallbackNode",
    "CollectNode",
    "Flow",
    "FlowError",
    "FlowProblem",
    "HangupNode",
    "HttpNode",
    "MenuNode",
    "Node",
    "PlayNode",
    "QueueNode",
    "ScheduleNode",
    "SetNode",
    "TransferNode",
    "VoicemailNode",
    "load_flows",
]

MAX_NODES = 1000
"""Nodes per flow; a larger flow is refused (every buffer has a limit)."""
MAX_DIGITS = 64
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


# --------------------------------------------------------------------------- errors


@dataclass(frozen=True)
class FlowProblem:
    """One problem in the flow definitions."""

    file: str
    line: int | None
    """1-based line of the node or key, None for a mapping built in code."""
    flow: str | None
    node: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        what = " ".join(
            part for part in (
                f"flow {self.flow!r}" if self.flow else "", f"node {self.node!r}" if self.node else ""
            ) if part
        )
        return f"{where}: {what + ': ' if what else ''}{self.message}"


class FlowError(ValueError):
    """The IVR flows are invalid; ``problems`` lists every one found."""

    def __init__(self, problems: Iterable[FlowProblem]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: (p.file, p.line or 0, p.message)))
        count = len(self.problems)
        super().__init__(
            "\n".join([f"invalid IVR flows ({count} problem{'s' if count != 1 else ''}):",
                       *(f"  {p}" for p in self.problems)])
        )


# --------------------------------------------------------------------------- YAML with lines


class _Marked(dict[str, Any]):
    """A mapping that remembers the line of itself and of each key."""

    line: int | None = None
    key_lines: dict[str, int]


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings are ``_Marked`` and which refuses duplicate keys."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Marked:
    loader.flatten_mapping(node)
    out = _Marked()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        key = str(key) if isinstance(key, int | float | bool) else key
        if not isinstance(key, str):
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be text", key_node.start_mark
            )
        if key in out:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        out.key_lines[key] = key_node.start_mark.line + 1
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# Dates stay text: the schedule checks them itself and names the line of a bad one.
def _construct_text(loader: _LineLoader, node: yaml.ScalarNode) -> str:
    return str(loader.construct_scalar(node))


_LineLoader.add_constructor("tag:yaml.org,2002:timestamp", _construct_text)


def _line_of(mapping: Mapping[str, Any], key: str | None = None) -> int | None:
    if key is not None:
        lines = getattr(mapping, "key_lines", None)
        if lines and key in lines:
            return int(lines[key])
    return getattr(mapping, "line", None)


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Node:
    """Fields every node has."""

    id: str
    """The node's name in its flow."""
    line: int | None
    """Line of the node in its file (None when built from a plain mapping)."""
    key_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    """Lines of the node's keys, to point at the exact field in messages."""

    kind = "node"

    def exits(self) -> list[tuple[str, str]]:
        """(field, target node) pairs of every way out of this node."""
        return []

    def prompts(self) -> list[tuple[str, str]]:
        """(field, prompt name) pairs of every prompt the node plays."""
        return []

    def line_for(self, key: str) -> int | None:
        return self.key_lines.get(key, self.line)


def _opt(*pairs: tuple[str, str | None]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if v]


@dataclass(frozen=True)
class PlayNode(Node):
    """Play one prompt, then go on."""

    prompt: str = ""
    next: str = ""
    kind = "play"

    def exits(self) -> list[tuple[str, str]]:
        return [("next", self.next)]

    def prompts(self) -> list[tuple[str, str]]:
        return [("prompt", self.prompt)]


@dataclass(frozen=True)
class MenuNode(Node):
    """Play a prompt and branch on one digit; retry on an invalid digit or no input."""

    prompt: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    """Digit -> next node."""
    timeout: float = 5.0
    """Seconds to wait for a digit once the prompt has finished."""
    retries: int = 3
    """Attempts in all before giving up."""
    invalid_prompt: str | None = None
    timeout_prompt: str | None = None
    on_invalid: str | None = None
    """Where to go when the last attempt got an invalid digit (default ``on_failure``)."""
    on_timeout: str | None = None
    """Where to go when the last attempt got no digit (default ``on_failure``)."""
    on_failure: str | None = None
    kind = "menu"

    @property
    def invalid_exit(self) -> str:
        return self.on_invalid or self.on_failure or ""

    @property
    def timeout_exit(self) -> str:
        return self.on_timeout or self.on_failure or ""

    def exits(self) -> list[tuple[str, str]]:
        return [(f"options.{d}", n) for d, n in self.options.items()] + _opt(
            ("on_invalid", self.on_invalid), ("on_timeout", self.on_timeout),
            ("on_failure", self.on_failure),
        )

    def prompts(self) -> list[tuple[str, str]]:
        return _opt(("prompt", self.prompt), ("invalid_prompt", self.invalid_prompt),
                    ("timeout_prompt", self.timeout_prompt))


@dataclass(frozen=True)
class CollectNode(Node):
    """Collect several digits into a variable."""

    variable: str = ""
    next: str = ""
    prompt: str | None = None
    min_digits: int = 1
    max_digits: int = 16
    terminator: str | None = "#"
    """Digit that ends the input early (not stored); None for none."""
    timeout: float = 5.0
    """Seconds to wait for the first digit once the prompt has finished."""
    inter_digit_timeout: float = 3.0
    retries: int = 3
    invalid_prompt: str | None = None
    on_failure: str = ""
    secret: bool = False
    """A PIN or card number: the variable is used inside the flow (conditions, ``http``
    look-ups) but never leaves it — not in the screen pop, the agent's desk, a callback or
    voicemail row, nor the log (see ``Flow.secrets``)."""
    kind = "collect"

    def exits(self) -> list[tuple[str, str]]:
        return _opt(("next", self.next), ("on_failure", self.on_failure))

    def prompts(self) -> list[tuple[str, str]]:
        return _opt(("prompt", self.prompt), ("invalid_prompt", self.invalid_prompt))


@dataclass(frozen=True)
class ScheduleNode(Node):
    """Branch on business hours in a time zone, with holidays."""

    timezone: str = "UTC"
    hours: Mapping[int, tuple[tuple[dt.time, dt.time | None], ...]] = field(default_factory=dict)
    """Weekday (0 = Monday) -> open intervals [start, end); end None means midnight."""
    holidays: frozenset[dt.date] = frozenset()
    open: str = ""
    closed: str = ""
    holiday: str | None = None
    """Where to go on a holiday (default ``closed``)."""
    kind = "schedule"

    def exits(self) -> list[tuple[str, str]]:
        return _opt(("open", self.open), ("closed", self.closed), ("holiday", self.holiday))

    def is_open(self, now: float) -> tuple[bool, bool]:
        """(open, holiday) at the epoch time ``now``, judged in the node's time zone."""
        local = dt.datetime.fromtimestamp(now, zoneinfo.ZoneInfo(self.timezone))
        if local.date() in self.holidays:
            return False, True
        clock = local.time().replace(tzinfo=None)
        for start, end in self.hours.get(local.weekday(), ()):
            if start <= clock and (end is None or clock < end):
                return True, False
        return False, False


@dataclass(frozen=True)
class SetNode(Node):
    """Set variables, then go on."""

    variables: Mapping[str, str] = field(default_factory=dict)
    next: str = ""
    kind = "set"

    def exits(self) -> list[tuple[str, str]]:
        return [("next", self.next)]


@dataclass(frozen=True)
class HttpNode(Node):
    """Ask a web service about the caller; map fields of its JSON answer to variables."""

    url: str = ""
    next: str = ""
    on_failure: str = ""
    """Fallback when the service fails, answers badly or does not answer in time."""
    timeout: float = 2.0
    map: Mapping[str, str] = field(default_factory=dict)
    """Variable -> dotted path in the JSON answer (``priority: customer.priority``)."""
    method: str = "POST"
    """``POST`` (a JSON body) or ``GET`` (the caller and dialled number in the query)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """Extra request headers (an API key, for instance)."""
    kind = "http"

    def exits(self) -> list[tuple[str, str]]:
        return [("next", self.next), ("on_failure", self.on_failure)]


@dataclass(frozen=True)
class QueueNode(Node):
    """Hand the call to an ACD queue (ends the flow)."""

    queue: str = ""
    priority: int = 0
    """Default priority; the variable ``priority`` overrides it."""
    kind = "queue"


@dataclass(frozen=True)
class VoicemailNode(Node):
    """Take a voice message (ends the flow)."""

    mailbox: str = ""
    prompt: str | None = None
    """Greeting played before the beep."""
    max_seconds: int = 120
    """Longest message recorded."""
    queue: str | None = None
    """Queue the mailbox belongs to (its agents handle the messages), if any."""
    kind = "voicemail"

    def prompts(self) -> list[tuple[str, str]]:
        return _opt(("prompt", self.prompt))


@dataclass(frozen=True)
class CallbackNode(Node):
    """Offer a call back instead of waiting: a digit accepts, anything else declines."""

    queue: str = ""
    prompt: str = ""
    accept_digit: str = "1"
    timeout: float = 5.0
    on_decline: str = ""
    next: str | None = None
    """After accepting (default: hang up)."""
    confirm_prompt: str | None = None
    """Asks the caller to confirm the number to call back (``confirm_digit``) or to enter
    another one (``change_digit``); None: the caller's own number is taken as it is."""
    confirm_digit: str = "1"
    change_digit: str = "2"
    number_prompt: str | None = None
    """Asks for the number to call back; needed to change it, or when the caller's number is
    withheld. Without ``confirm_prompt`` every caller is asked."""
    number_min_digits: int = 3
    number_max_digits: int = 15
    """E.164 numbers have at most 15 digits (ITU-T E.164 §6)."""
    kind = "callback"

    def exits(self) -> list[tuple[str, str]]:
        return _opt(("on_decline", self.on_decline), ("next", self.next))

    def prompts(self) -> list[tuple[str, str]]:
        return _opt(("prompt", self.prompt), ("confirm_prompt", self.confirm_prompt),
                    ("number_prompt", self.number_prompt))


@dataclass(frozen=True)
class TransferNode(Node):
    """Transfer the call to an agent's extension or a number through the trunk; the flow ends
    when it is answered, and goes on at ``on_failure`` when it is not."""

    number: str = ""
    role: str = "agent"
    """Dial rules (``dialling.roles``) a number through the trunk is checked against."""
    timeout: float = 30.0
    """Seconds the target may ring before it counts as no answer."""
    on_failure: str | None = None
    """Node after busy / no answer / refused (the variable ``transfer_result`` says which);
    None: the call ends."""
    kind = "transfer"

    def exits(self) -> list[tuple[str, str]]:
        return _opt(("on_failure", self.on_failure))


@dataclass(frozen=True)
class HangupNode(Node):
    """End the call."""

    kind = "hangup"


NODE_KINDS: dict[str, type[Node]] = {
    cls.kind: cls
    for cls in (PlayNode, MenuNode, CollectNode, ScheduleNode, SetNode, HttpNode, QueueNode,
                VoicemailNode, CallbackNode, TransferNode, HangupNode)
}
INPUT_KINDS = frozenset({"menu", "collect", "callback"})
"""Nodes that wait for the caller's input (a cycle must pass through one)."""
TERMINAL_KINDS = frozenset({"queue", "voicemail", "transfer", "hangup"})


@dataclass(frozen=True)
class Flow:
    """One IVR flow."""

    name: str
    start: str
    nodes: Mapping[str, Node]
    file: str = "<mapping>"
    line: int | None = None
    variables: frozenset[str] = frozenset()
    """Variables the flow declares (``variables:``), besides the built-in ones."""
    variable_lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)
    secrets: frozenset[str] = frozenset()
    """Variables a ``collect`` node marked ``secret`` writes: kept inside the flow."""

    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]


# --------------------------------------------------------------------------- loading


def load_flows(
    source: str | Path | Mapping[str, Any],
    *,
    prompts: Iterable[str] | Path | None = None,
    queues: Iterable[str] | None = None,
    file: str | None = None,
) -> dict[str, Flow]:
    """Load and validate the flows of a YAML file or a mapping.

    ``source`` is a path (a flow file, or ``site.yaml`` whose ``ivr`` section is used) or the
    mapping itself (``{"flows": {...}}`` or ``{"ivr": {"flows": {...}}}``). ``prompts`` (a
    directory or a set of names) and ``queues`` enable the missing-prompt and unknown-queue
    checks. Raises FlowError listing every problem with its file and line.
    """
    from appliance.ivr.validate import validate_flows

    if isinstance(source, str | Path):
        path = Path(source)
        name = file or str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FlowError([FlowProblem(name, None, None, None, f"cannot read: {exc}")]) from None
        try:
            document = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = mark.line + 1 if mark is not None else None
            raise FlowError([FlowProblem(name, line, None, None, f"not valid YAML: {exc}")]) from None
    else:
        name = file or "<mapping>"
        document = source
    problems: list[FlowProblem] = []
    flows = _build(document, name, problems)
    if not problems:
        problems.extend(validate_flows(flows, prompts=prompts, queues=queues))
    if problems:
        raise FlowError(problems)
    return flows


class _Fields:
    """Reads one node's fields, recording problems with their lines."""

    def __init__(self, raw: Mapping[str, Any], file: str, flow: str, node: str | None,
                 problems: list[FlowProblem]) -> None:
        self.raw = raw
        self.file = file
        self.flow = flow
        self.node = node
        self.problems = problems
        self.used: set[str] = set()

    def problem(self, key: str | None, message: str) -> None:
        self.problems.append(
            FlowProblem(self.file, _line_of(self.raw, key), self.flow, self.node, message)
        )

    def text(self, key: str, *, required: bool = False, default: str | None = None) -> str | None:
        self.used.add(key)
        value = self.raw.get(key)
        if value is None:
            if required:
                self.problem(None, f"{key} is required")
            return default
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.problem(key, f"{key} must be text, got {type(value).__name__}")
            return default
        return str(value)

    def number(self, key: str, default: float, *, low: float, high: float) -> float:
        self.used.add(key)
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
            self.problem(key, f"{key} must be a number from {low:g} to {high:g}, got {value!r}")
            return default
        return float(value)

    def integer(self, key: str, default: int, *, low: int, high: int) -> int:
        self.used.add(key)
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.problem(key, f"{key} must be a whole number from {low} to {high}, got {value!r}")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        self.used.add(key)
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.problem(key, f"{key} must be true or false, got {value!r}")
            return default
        return value

    def mapping(self, key: str, *, required: bool = False) -> Mapping[str, Any]:
        self.used.add(key)
        value = self.raw.get(key)
        if value is None:
            if required:
                self.problem(None, f"{key} is required")
            return {}
        if not isinstance(value, Mapping):
            self.problem(key, f"{key} must be a mapping")
            return {}
        return value

    def finish(self, allowed: Iterable[str]) -> None:
        for key in self.raw:
            if key not in self.used and key not in allowed:
                self.problem(key, f"unknown key {key!r} for a {self.raw.get('type')} node")


_DIGIT = re.compile(r"[0-9*#A-D]")
_RANGE = re.compile(r"(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})")


_VARIABLE = re.compile(r"[a-z][a-z0-9_]{0,62}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,64}")  # RFC 9110 §5.6.2 token
_HEADERS_SET_BY_THE_CLIENT = frozenset(
    {"host", "content-length", "content-type", "connection", "transfer-encoding", "accept"})


def _declared_variables(f: _Fields) -> dict[str, int]:
    """The flow's ``variables:`` list: name -> line."""
    f.used.add("variables")
    raw = f.raw.get("variables")
    if raw is None:
        return {}
    line = _line_of(f.raw, "variables") or 0
    if not isinstance(raw, list):
        f.problem("variables", "variables must be a list of variable names")
        return {}
    out: dict[str, int] = {}
    for name in raw:
        if not isinstance(name, str) or not _VARIABLE.fullmatch(name):
            f.problem("variables", f"{name!r} is not a variable name (a-z, 0-9, _)")
        else:
            out[name] = line
    return out


def _digit(f: _Fields, key: str, value: str | None) -> str | None:
    if value is not None and not _DIGIT.fullmatch(value):
        f.problem(key, f"{key} must be one DTMF digit (0-9 * # A-D), got {value!r}")
        return None
    return value


def _build(document: Any, file: str, problems: list[FlowProblem]) -> dict[str, Flow]:
    if not isinstance(document, Mapping):
        problems.append(FlowProblem(file, None, None, None, "expected a mapping with 'flows'"))
        return {}
    section = document.get("ivr", document) if "flows" not in document else document
    if not isinstance(section, Mapping) or not isinstance(section.get("flows"), Mapping):
        problems.append(FlowProblem(file, _line_of(section if isinstance(section, Mapping)
                                                   else document), None, None,
                                    "expected 'flows:' (a mapping of flow names to flows)"))
        return {}
    flows: dict[str, Flow] = {}
    raw_flows = section["flows"]
    for flow_name, raw_flow in raw_flows.items():
        line = _line_of(raw_flows, flow_name)
        if not isinstance(raw_flow, Mapping):
            problems.append(FlowProblem(file, line, flow_name, None, "a flow must be a mapping"))
            continue
        f = _Fields(raw_flow, file, flow_name, None, problems)
        start = f.text("start", required=True)
        raw_nodes = f.mapping("nodes", required=True)
        declared = _declared_variables(f)
        f.finish(())
        if len(raw_nodes) > MAX_NODES:
            f.problem("nodes", f"more than {MAX_NODES} nodes")
            continue
        nodes = {}
        for node_id, raw_node in raw_nodes.items():
            node = _build_node(str(node_id), raw_node, file, flow_name,
                               _line_of(raw_nodes, node_id), problems)
            if node is not None:
                nodes[str(node_id)] = node
        secrets = frozenset(n.variable for n in nodes.values()
                            if isinstance(n, CollectNode) and n.secret)
        flows[flow_name] = Flow(flow_name, start or "", nodes, file, line,
                                variables=frozenset(declared), variable_lines=declared,
                                secrets=secrets)
    return flows


def _build_node(node_id: str, raw: Any, file: str, flow: str, line: int | None,
                problems: list[FlowProblem]) -> Node | None:
    if not isinstance(raw, Mapping):
        problems.append(FlowProblem(file, line, flow, node_id, "a node must be a mapping"))
        return None
    f = _Fields(raw, file, flow, node_id, problems)
    kind = f.text("type", required=True)
    if kind is None:
        return None
    if kind not in NODE_KINDS:
        f.problem("type", f"unknown node type {kind!r} (one of {', '.join(NODE_KINDS)})")
        return None
    common: dict[str, Any] = {"id": node_id, "line": line or _line_of(raw),
                              "key_lines": dict(getattr(raw, "key_lines", {}))}
    node: Node
    if kind == "play":
        node = PlayNode(**common, prompt=f.text("prompt", required=True) or "",
                        next=f.text("next", required=True) or "")
    elif kind == "menu":
        options: dict[str, str] = {}
        raw_options = f.mapping("options", required=True)
        for digit, target in raw_options.items():
            d = _digit(f, "options", str(digit))
            if d is not None and isinstance(target, str):
                options[d] = target
            elif d is not None:
                f.problem("options", f"option {digit} must name a node")
        node = MenuNode(
            **common, prompt=f.text("prompt", required=True) or "", options=options,
            timeout=f.number("timeout", 5.0, low=0.5, high=120),
            retries=f.integer("retries", 3, low=1, high=10),
            invalid_prompt=f.text("invalid_prompt"), timeout_prompt=f.text("timeout_prompt"),
            on_invalid=f.text("on_invalid"), on_timeout=f.text("on_timeout"),
            on_failure=f.text("on_failure"),
        )
        if not node.invalid_exit or not node.timeout_exit:
            f.problem(None, "a menu needs on_failure (or both on_invalid and on_timeout)")
    elif kind == "collect":
        min_digits = f.integer("min_digits", 1, low=1, high=MAX_DIGITS)
        max_digits = f.integer("max_digits", 16, low=1, high=MAX_DIGITS)
        if min_digits > max_digits:
            f.problem("min_digits", f"min_digits {min_digits} is above max_digits {max_digits}")
        terminator = _digit(f, "terminator", f.text("terminator", default="#"))
        node = CollectNode(
            **common, variable=f.text("variable", required=True) or "",
            next=f.text("next", required=True) or "", prompt=f.text("prompt"),
            min_digits=min_digits, max_digits=max_digits, terminator=terminator,
            timeout=f.number("timeout", 5.0, low=0.5, high=120),
            inter_digit_timeout=f.number("inter_digit_timeout", 3.0, low=0.5, high=60),
            retries=f.integer("retries", 3, low=1, high=10),
            secret=f.flag("secret", False),
            invalid_prompt=f.text("invalid_prompt"),
            on_failure=f.text("on_failure", required=True) or "",
        )
    elif kind == "schedule":
        node = _build_schedule(f, common)
    elif kind == "set":
        variables = {}
        for key, value in f.mapping("variables", required=True).items():
            if isinstance(value, Mapping | list) or value is None:
                f.problem("variables", f"variable {key} must be a plain value")
            else:
                variables[str(key)] = str(value)
        node = SetNode(**common, variables=variables, next=f.text("next", required=True) or "")
    elif kind == "http":
        url = f.text("url", required=True) or ""
        if url and not re.fullmatch(r"https?://[^/\s?#@]+(?:[/?#]\S*)?", url):
            f.problem("url", f"url must be http:// or https://, got {url!r}")
        mapping = {}
        raw_map = f.mapping("map")
        for var, path in raw_map.items():
            # Point problems about one entry at its own line.
            common["key_lines"][f"map.{var}"] = _line_of(raw_map, var) or _line_of(raw, "map")
            if not isinstance(path, str) or not path:
                f.problem("map", f"map.{var} must be a dotted field path such as customer.tier")
            else:
                mapping[str(var)] = path
        method = (f.text("method", default="POST") or "POST").upper()
        if method not in ("GET", "POST"):
            f.problem("method", f"method must be GET or POST, got {method!r}")
        headers = {}
        for name, value in f.mapping("headers").items():
            if not _HEADER_NAME.fullmatch(str(name)) or (
                    str(name).lower() in _HEADERS_SET_BY_THE_CLIENT):
                f.problem("headers", f"{name!r} is not a header name the lookup may set")
            elif not isinstance(value, str | int) or isinstance(value, bool) or any(
                    c in str(value) for c in "\r\n\0"):
                f.problem("headers", f"header {name} must be one line of text")
            else:
                headers[str(name)] = str(value)
        node = HttpNode(**common, url=url, next=f.text("next", required=True) or "",
                        on_failure=f.text("on_failure", required=True) or "",
                        timeout=f.number("timeout", 2.0, low=0.1, high=30), map=mapping,
                        method=method if method in ("GET", "POST") else "POST", headers=headers)
    elif kind == "queue":
        node = QueueNode(**common, queue=f.text("queue", required=True) or "",
                         priority=f.integer("priority", 0, low=0, high=100))
    elif kind == "voicemail":
        node = VoicemailNode(**common, mailbox=f.text("mailbox", required=True) or "",
                             prompt=f.text("prompt"),
                             max_seconds=f.integer("max_seconds", 120, low=5, high=3600),
                             queue=f.text("queue"))
    elif kind == "callback":
        callback = CallbackNode(
            **common, queue=f.text("queue", required=True) or "",
            prompt=f.text("prompt", required=True) or "",
            accept_digit=_digit(f, "accept_digit", f.text("accept_digit", default="1")) or "1",
            timeout=f.number("timeout", 5.0, low=0.5, high=120),
            on_decline=f.text("on_decline", required=True) or "", next=f.text("next"),
            confirm_prompt=f.text("confirm_prompt"),
            confirm_digit=_digit(f, "confirm_digit", f.text("confirm_digit", default="1")) or "1",
            change_digit=_digit(f, "change_digit", f.text("change_digit", default="2")) or "2",
            number_prompt=f.text("number_prompt"),
            number_min_digits=f.integer("number_min_digits", 3, low=1, high=32),
            number_max_digits=f.integer("number_max_digits", 15, low=1, high=32),
        )
        if callback.confirm_digit == callback.change_digit:
            f.problem("change_digit", "change_digit must differ from confirm_digit")
        if callback.number_min_digits > callback.number_max_digits:
            f.problem("number_min_digits", f"number_min_digits {callback.number_min_digits} is "
                      f"above number_max_digits {callback.number_max_digits}")
        node = callback
    elif kind == "transfer":
        number = f.text("number", required=True) or ""
        if number and not re.fullmatch(r"\+?[0-9*#]{1,32}|sips?:\S+", number):
            f.problem("number", f"number must be digits (E.164 +...) or a sip: URI, got {number!r}")
        role = f.text("role", default="agent") or "agent"
        if role not in ("agent", "supervisor"):
            f.problem("role", f"role must be agent or supervisor, got {role!r}")
        node = TransferNode(**common, number=number, role=role,
                            timeout=f.number("timeout", 30.0, low=2, high=300),
                            on_failure=f.text("on_failure"))
    else:
        node = HangupNode(**common)
    f.finish(("type",))
    return node


def _build_schedule(f: _Fields, common: dict[str, Any]) -> ScheduleNode:
    tz = f.text("timezone", default="UTC") or "UTC"
    try:
        zoneinfo.ZoneInfo(tz)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        f.problem("timezone", f"unknown time zone {tz!r} (an IANA name such as Europe/Berlin)")
        tz = "UTC"
    hours: dict[int, list[tuple[dt.time, dt.time | None]]] = {}
    for days_text, ranges in f.mapping("hours", required=True).items():
        days = _weekdays(str(days_text))
        if days is None:
            f.problem("hours", f"{days_text!r} is not a weekday or range such as mon-fri")
            continue
        for text in [ranges] if isinstance(ranges, str) else (ranges or []):
            interval = _interval(text) if isinstance(text, str) else None
            if interval is None:
                f.problem("hours", f"{days_text}: {text!r} is not a time range such as 08:00-17:30")
                continue
            for day in days:
                hours.setdefault(day, []).append(interval)
    holidays = set()
    raw_holidays = f.raw.get("holidays") or []
    f.used.add("holidays")
    if not isinstance(raw_holidays, list):
        f.problem("holidays", "holidays must be a list of dates (YYYY-MM-DD)")
        raw_holidays = []
    for value in raw_holidays:
        if isinstance(value, dt.date):
            holidays.add(value)
            continue
        try:
            holidays.add(dt.date.fromisoformat(str(value)))
        except ValueError:
            f.problem("holidays", f"{value!r} is not a date (YYYY-MM-DD)")
    return ScheduleNode(
        **common, timezone=tz, hours={d: tuple(sorted(r, key=lambda i: i[0]))
                                      for d, r in hours.items()},
        holidays=frozenset(holidays), open=f.text("open", required=True) or "",
        closed=f.text("closed", required=True) or "", holiday=f.text("holiday"),
    )


def _weekdays(text: str) -> list[int] | None:
    out: list[int] = []
    for part in text.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in WEEKDAYS or (last and last not in WEEKDAYS):
            return None
        a, b = WEEKDAYS.index(first), WEEKDAYS.index(last or first)
        out.extend(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return out


def _interval(text: str) -> tuple[dt.time, dt.time | None] | None:
    match = _RANGE.fullmatch(text.strip())
    if not match:
        return None
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
        return None
    start = dt.time(h1, m1)
    end = None if h2 == 24 else dt.time(h2, m2)
    if end is not None and end <= start:
        return None
    return start, end
