"""Graph checks of IVR flows, run at load time by ``load_flows``.

- every next-node reference names a node of the same flow, and ``start`` exists;
- every node is reachable from ``start``;
- every cycle passes through a node that waits for the caller (menu, collect, callback): a
  cycle without one would spin without end;
- every prompt exists (when the prompt directory or the set of prompt names is given);
- every queue exists (when the set of queue names is given).
Each problem names the file and the line of the offending node (or of its key).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from appliance.ivr.flow import INPUT_KINDS, CallbackNode, Flow, FlowProblem, Node, QueueNode

__all__ = ["available_prompts", "validate_flows"]

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
        if (
            queues is not None and isinstance(node, QueueNode | CallbackNode)
            and node.queue not in queues
        ):
            known = ", ".join(sorted(queues)) or "none"
            yield problem(node, "queue", f"unknown queue {node.queue!r} (known: {known})")
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
