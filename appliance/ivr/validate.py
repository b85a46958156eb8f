"""Graph checks of IVR flows, run at load time by ``load_flows``.

- every next-node reference names a node of the same flow, and ``start`` exists;
- every node is reachable from ``start``;
- every cycle passes through a node that waits for the caller (menu, collect, callback): a
  cycle without one would spin without end;
- every prompt exists (when the prompt directory or the set of prompt names is given);
- every queue exists (when the set of queue names is given);
- every variable an ``http`` node maps its answer to is known: a built-in one the call path
  acts on (``priority``, ``tier``), one the flow declares in ``variables:``, or one a ``set`` or
  ``collect`` node of the flow writes. The variables the call itself sets (``caller``,
  ``dialled``, ...) cannot be overwritten.
Each problem names the file and the line of the offending node (or of its key).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from appliance.ivr.flow import (
    INPUT_KINDS,
    CallbackNode,
    CollectNode,
    Flow,
    FlowProblem,
    HttpNode,
    Node,
    QueueNode,
    SetNode,
    VoicemailNode,
)

__all__ = ["MAPPABLE_VARIABLES", "RESERVED_VARIABLES", "available_prompts", "validate_flows"]

MAPPABLE_VARIABLES = frozenset({"priority", "tier"})
"""Built-in variables a lookup may set: the queue priority and the customer tier."""
RESERVED_VARIABLES = frozenset(
    {"caller", "dialled", "menu_choice", "ivr_failure", "http_error", "customer_source",
     "transfer_result"})
"""Variables the runner sets itself; a lookup may not overwrite them."""

PROMPT_SUFFIXES = (".wav", ".ul", ".ulaw", ".al", ".alaw", ".sln", ".raw")


def available_prompts(directory: Path) -> set[str]:
    """Prompt names in a directory: file names without a known audio suffix (and with)."""
    names: set[str] = set()
    if directory.is_dir():
        for path in directory.rglob("*"):
            if path.is_file():
                relative = path.relative_to(directory).as_posix()
                names.add(relative)
                if path.suffix.lower() in PROMPT_SUFFIXES:
                    names.add(relative[: -len(path.suffix)])
    return names


def validate_flows(
    flows: Mapping[str, Flow],
    *,
    prompts: Iterable[str] | Path | None = None,
    queues: Iterable[str] | None = None,
) -> list[FlowProblem]:
    """Every problem found in ``flows`` (empty when they are sound)."""
    prompt_names: set[str] | None = None
    prompt_where = ""
    if isinstance(prompts, Path):
        prompt_names = available_prompts(prompts)
        prompt_where = f" in {prompts}"
        if not prompts.is_dir():
            first = next(iter(flows.values()), None)
            return [FlowProblem(first.file if first else "<flows>", None, None, None,
                                f"prompt directory {prompts} does not exist")]
    elif prompts is not None:
        prompt_names = set(prompts)
    queue_names = set(queues) if queues is not None else None
    problems: list[FlowProblem] = []
    for flow in flows.values():
        problems.extend(_check_flow(flow, prompt_names, prompt_where, queue_names))
    return problems


def _check_flow(
    flow: Flow, prompts: set[str] | None, prompt_where: str, queues: set[str] | None
) -> Iterator[FlowProblem]:
    def problem(node: Node | None, key: str | None, message: str) -> FlowProblem:
        line = flow.line if node is None else (node.line_for(key) if key else node.line)
        return FlowProblem(flow.file, line, flow.name, node.id if node else None, message)

    nodes = flow.nodes
    known = set(MAPPABLE_VARIABLES) | set(flow.variables)
    for node in nodes.values():
        if isinstance(node, SetNode):
            known.update(node.variables)
        elif isinstance(node, CollectNode):
            known.add(node.variable)
    known -= RESERVED_VARIABLES
    if flow.start not in nodes:
        yield problem(None, None, f"start node {flow.start!r} does not exist")
    for node in nodes.values():
        for key, target in node.exits():
            if target not in nodes:
                yield problem(node, key.split(".")[0], f"{key} refers to unknown node {target!r}")
        if prompts is not None:
            for key, name in node.prompts():
                if name not in prompts:
                    yield problem(node, key, f"{key} {name!r} is not a prompt{prompt_where}")
        if isinstance(node, HttpNode):
            for variable in node.map:
                if variable in RESERVED_VARIABLES:
                    yield problem(node, f"map.{variable}",
                                  f"map.{variable}: {variable!r} is set by the call itself")
                elif variable not in known:
                    yield problem(node, f"map.{variable}",
                                  f"map.{variable}: unknown variable {variable!r} (declare it "
                                  "in the flow's variables:, or use priority or tier)")
        if (
            queues is not None and isinstance(node, QueueNode | CallbackNode | VoicemailNode)
            and node.queue is not None and node.queue not in queues
        ):
            names = ", ".join(sorted(queues)) or "none"
            yield problem(node, "queue", f"unknown queue {node.queue!r} (known: {names})")
    if flow.start in nodes:
        reached = _reachable(flow)
        for node in nodes.values():
            if node.id not in reached:
                yield problem(node, None, f"unreachable from start node {flow.start!r}")
    for cycle in _cycles_without_input(flow):
        first = min(cycle, key=lambda n: (nodes[n].line or 0, n))
        members = ", ".join(sorted(cycle, key=lambda n: (nodes[n].line or 0, n)))
        yield problem(nodes[first], None,
                      f"loop without caller input through {members}: "
                      "add a menu or collect node to it")


def _reachable(flow: Flow) -> set[str]:
    seen = {flow.start}
    stack = [flow.start]
    while stack:
        node = flow.nodes[stack.pop()]
        for _, target in node.exits():
            if target in flow.nodes and target not in seen:
                seen.add(target)
                stack.append(target)
    return seen


def _cycles_without_input(flow: Flow) -> list[list[str]]:
    """Strongly connected components of the graph of non-input nodes that contain a cycle
    (Tarjan's algorithm, iterative so a long flow cannot exhaust the stack)."""
    graph = {
        nid: [t for _, t in node.exits() if t in flow.nodes and flow.nodes[t].kind not in INPUT_KINDS]
        for nid, node in flow.nodes.items() if node.kind not in INPUT_KINDS
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            successors = graph[node]
            if i < len(successors):
                work.append((node, i + 1))
                nxt = successors[i]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    out.append(component[::-1])
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return out
