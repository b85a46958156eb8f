"""Routing decisions per second: the compiled ACD router against the pure-Python reference.

A site of 50 queues and 500 agents (each agent in 5 queues, skill levels 1-10, queues with
skill minimums relaxed after 30 s, all eight strategies in use) holds 2,000 waiting callers with
every agent busy. Each cycle, as the appliance would drive it: a call ends, the router offers the
freed agent the first caller in the global order they may take, the agent answers, a new caller
joins, and the adapter asks for the next timer. Both routers run the same seeded cycles in the
same process; their decisions must be identical. Prints one JSON line last
(/work/shared/BENCHMARKS.md).
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.acd import model as m  # noqa: E402
from appliance.acd.reference import ReferenceRouter  # noqa: E402
from appliance.acd.router import COMPILED, Router  # noqa: E402

N_QUEUES = 50
N_AGENTS = 500
QUEUES_PER_AGENT = 5
N_WAITING = 2000
SKILLS = ("en", "fr", "de", "billing", "tech", "sales")
REPEATS = 5
CYCLES_REFERENCE = 1000
CYCLES_COMPILED = 20000


def site(seed: int = 1) -> m.RouterConfig:
    rnd = random.Random(seed)
    agents = [m.AgentConfig(f"agent{i:03d}",
                            skills=tuple((s, rnd.randint(1, 10)) for s in SKILLS))
              for i in range(N_AGENTS)]
    members: list[list[m.Member]] = [[] for _ in range(N_QUEUES)]
    for a in agents:
        for qi in rnd.sample(range(N_QUEUES), QUEUES_PER_AGENT):
            members[qi].append(m.Member(a.agent, penalty=rnd.choice((0, 0, 1)),
                                        weight=rnd.randint(1, 5)))
    strategies = list(m.Strategy)
    queues = [
        m.QueueConfig(
            f"queue{qi:02d}",
            tuple(members[qi]),
            strategy=strategies[qi % len(strategies)],
            required_skills=((SKILLS[qi % len(SKILLS)], 1 + qi % 7),),
            relax_steps=(m.RelaxStep(30.0, lower_by=3),),
            ring_timeout=20.0,
            max_wait=3600.0,
        )
        for qi in range(N_QUEUES)
    ]
    return m.RouterConfig(queues=tuple(queues), agents=tuple(agents), seed=seed,
                          max_waiting=N_WAITING * 2)


class Driver:
    """Plays the appliance: answers every offer at once, ends calls, brings new callers."""

    def __init__(self, router_cls: type, config: m.RouterConfig, seed: int) -> None:
        self.r = router_cls(config)
        self.rnd = random.Random(seed)
        self.queues = [q.name for q in config.queues]
        self.busy: list[tuple[str, str]] = []  # (agent, call) in progress
        self.now = 0.0
        self.calls = 0
        self.decisions: list[object] = []
        for _ in range(N_WAITING):
            self.join()
        for a in config.agents:
            self.apply(m.AgentLogin(a.agent))
        for _ in range(len(self.busy)):
            self.join()  # back to N_WAITING callers (all agents busy)
        self.decisions.clear()

    def join(self) -> None:
        self.calls += 1
        self.apply(m.CallerJoin(f"call{self.calls}", self.rnd.choice(self.queues),
                                priority=self.rnd.choice((0, 0, 0, 1))))

    def apply(self, event: object) -> None:
        out = self.r.handle(event, self.now)
        self.decisions.extend(out)
        for d in out:
            if isinstance(d, m.Offer):
                agent = d.agents[0]
                self.decisions.extend(self.r.handle(m.OfferAccepted(d.call, agent), self.now))
                self.busy.append((agent, d.call))

    def cycle(self) -> None:
        self.now += 0.05
        if self.busy:
            i = self.rnd.randrange(len(self.busy))
            self.busy[i], self.busy[-1] = self.busy[-1], self.busy[i]
            agent, call = self.busy.pop()
            self.apply(m.CallEnded(call, agent))
        self.join()
        self.r.next_timer()


def run(router_cls: type, config: m.RouterConfig, cycles: int) -> tuple[float, list[object]]:
    """Decisions per CPU second of this process (the box is shared: CPU time is what the
    router itself spends, wall time would count other processes' turns too)."""
    driver = Driver(router_cls, config, seed=7)
    start = time.process_time()
    for _ in range(cycles):
        driver.cycle()
    elapsed = time.process_time() - start
    offers = sum(1 for d in driver.decisions if isinstance(d, m.Offer))
    if offers == 0:
        raise SystemExit("no offers made: the benchmark is not routing")
    return offers / elapsed, driver.decisions


def main() -> None:
    if not COMPILED:
        raise SystemExit("compiled ACD router not built: make build")
    config = site()
    fast_rates, ref_rates = [], []
    for rep in range(REPEATS):
        ref_rate, ref_decisions = run(ReferenceRouter, config, CYCLES_REFERENCE)
        fast_rate, fast_decisions = run(Router, config, CYCLES_COMPILED)
        if fast_decisions[: len(ref_decisions)] != ref_decisions:
            raise SystemExit("compiled and reference routers decided differently")
        ref_rates.append(ref_rate)
        fast_rates.append(fast_rate)
        print(f"run={rep} compiled={fast_rate:,.0f}/s reference={ref_rate:,.0f}/s "
              f"offers_checked={sum(isinstance(d, m.Offer) for d in ref_decisions)}")
    value = statistics.median(fast_rates)
    peer = statistics.median(ref_rates)
    print(json.dumps({
        "bench": "acd_route",
        "value": round(value, 1),
        "unit": "routing decisions/s (CPU)",
        "peer": "edgecc reference router (CPython)",
        "peer_value": round(peer, 1),
        "ratio": round(value / peer, 2),
        "detail": {
            "queues": N_QUEUES, "agents": N_AGENTS, "waiting_calls": N_WAITING,
            "queues_per_agent": QUEUES_PER_AGENT, "repeats": REPEATS,
            "cycle": "call ends -> offer -> answer -> new caller joins -> next_timer",
            "compiled_runs": [round(x, 1) for x in fast_rates],
            "reference_runs": [round(x, 1) for x in ref_rates],
            "clock": "process CPU time",
            "python": sys.version.split()[0],
        },
    }))


if __name__ == "__main__":
    main()
