"""Routing decisions per second and decision latency: the compiled ACD router against the
pure-Python reference, at the size of a large site.

50 queues, 2,000 agents (each in 5 queues), 20 skills: every queue requires two skills, relaxed
in two steps (minimums lowered by 3 after 30 s, the second skill dropped after 90 s); all eight
strategies are in use. 10,000 callers wait and every agent is busy. Each cycle, as the appliance
would drive it: a call ends, the router offers the freed agent the first caller in the global
order they may take, the agent answers, a new caller joins and the adapter asks for the next
timer; when that time has come by the next cycle (a caller's relaxation step, most cycles), the
cycle starts with ``handle_timer``, as the adapter's timer would.

A *decision* is an ``Offer`` (or ``DialCallback``) the router returns: one agent-to-caller
choice. The cycle's other router calls (the answer, the join that finds every agent busy, the
timer) are router time but count as no decision, so the figure is decisions per second of all
the router's time. Only the router calls are timed (time.perf_counter_ns around each ``handle``,
``next_timer`` and ``handle_timer``), not the driver building events. The box is shared: a
cycle in which the kernel took the CPU away (the thread's involuntary context switches,
getrusage, read outside the timed calls) has someone else's milliseconds in its router time.
The headline rate counts every cycle all the same (the conservative figure); the rate and p99
over the cycles nobody preempted are in ``detail`` (``compiled_quiet_cycles``,
``p99_cycle_ms``) with the share of cycles set aside. The
reference's calls last milliseconds, long enough to be preempted in most cycles and long enough
for the thread's CPU clock (time.thread_time_ns, which stops while another process runs): its
calls are timed with that clock, over every cycle.

Both routers run the same seeded cycles in the same process (the reference fewer of them);
their decisions and next timers must be identical on the cycles both ran. The router's state
size is measured twice: the tracemalloc peak while the router is built and loaded (Python
objects only) and the growth of the process's resident memory over the same steps (everything,
C arrays included). Prints one JSON line last (/work/shared/BENCHMARKS.md).
"""

from __future__ import annotations

import gc
import json
import random
import resource
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.acd import model as m  # noqa: E402
from appliance.acd.reference import ReferenceRouter  # noqa: E402
from appliance.acd.router import COMPILED, Router  # noqa: E402

N_QUEUES = 50
N_AGENTS = 2000
QUEUES_PER_AGENT = 5
N_WAITING = 10_000
SKILLS = tuple(f"skill{i:02d}" for i in range(20))
EXTRA_SKILLS = 3  # skills an agent has beyond those of their queues
REPEATS = 5
CYCLES_REFERENCE = 300
CYCLES_COMPILED = 20_000
STEP = 0.05  # seconds of site time per cycle


def site(seed: int = 1) -> m.RouterConfig:
    """The site: queue qi needs its primary skill at 2-7 and a secondary one at 1-4."""
    rnd = random.Random(seed)
    primary = [SKILLS[qi % len(SKILLS)] for qi in range(N_QUEUES)]
    secondary = [SKILLS[(qi * 7 + 3) % len(SKILLS)] for qi in range(N_QUEUES)]
    if any(p == s for p, s in zip(primary, secondary, strict=True)):
        raise SystemExit("site: a queue's two skills coincide")
    members: list[list[m.Member]] = [[] for _ in range(N_QUEUES)]
    agents = []
    for i in range(N_AGENTS):
        agent = f"agent{i:04d}"
        levels: dict[str, int] = {}
        for qi in rnd.sample(range(N_QUEUES), QUEUES_PER_AGENT):
            members[qi].append(m.Member(agent, penalty=rnd.choice((0, 0, 1)),
                                        weight=rnd.randint(1, 5)))
            levels[primary[qi]] = rnd.randint(1, 10)
        for skill in rnd.sample(SKILLS, EXTRA_SKILLS):
            levels.setdefault(skill, rnd.randint(1, 10))
        agents.append(m.AgentConfig(agent, skills=tuple(sorted(levels.items()))))
    strategies = list(m.Strategy)
    queues = [
        m.QueueConfig(
            f"queue{qi:02d}",
            tuple(members[qi]),
            strategy=strategies[qi % len(strategies)],
            required_skills=((primary[qi], 2 + qi % 6), (secondary[qi], 1 + qi % 4)),
            relax_steps=(m.RelaxStep(30.0, lower_by=3),
                         m.RelaxStep(90.0, drop=(secondary[qi],))),
            ring_timeout=20.0,
            max_wait=3600.0,
        )
        for qi in range(N_QUEUES)
    ]
    return m.RouterConfig(queues=tuple(queues), agents=tuple(agents), seed=seed,
                          max_waiting=N_WAITING * 2)


class Driver:
    """Plays the appliance: answers every offer at once, ends calls, brings new callers."""

    def __init__(self, router_cls: type, config: m.RouterConfig, seed: int,
                 clock=time.perf_counter_ns) -> None:
        self.r = router_cls(config)
        self.clock = clock
        self.rnd = random.Random(seed)
        self.queues = [q.name for q in config.queues]
        self.busy: list[tuple[str, str]] = []  # (agent, call) in progress
        self.now = 0.0
        self.calls = 0
        self.trace: list[object] = []  # decisions and next timers, for the comparison
        self.tracing = True  # off once past the cycles compared (the trace would only grow)
        self.offers = 0
        self.cycle_ns: list[int] = []
        self.cycle_offers: list[int] = []
        self.due: float | None = None  # what next_timer() last said
        self.preempted: list[bool] = []
        for _ in range(N_WAITING):  # the queue built up over the last 500 s: a steady state
            self.now += STEP
            self.apply(self.new_caller())
        for a in config.agents:
            self.apply(m.AgentLogin(a.agent))
        for _ in range(len(self.busy)):
            self.apply(self.new_caller())  # back to N_WAITING callers (all agents busy)
        self.trace.clear()
        self.offers = 0
        self.due = self.r.next_timer()

    def new_caller(self) -> m.CallerJoin:
        self.calls += 1
        return m.CallerJoin(f"call{self.calls}", self.rnd.choice(self.queues),
                            priority=self.rnd.choice((0, 0, 0, 1)))

    def apply(self, event: object | None) -> int:
        """Feed one event (None: run the timers), answer its offers; returns the nanoseconds
        spent in the router."""
        start = self.clock()
        out = self.r.handle_timer(self.now) if event is None else self.r.handle(event, self.now)
        spent = self.clock() - start
        if self.tracing:
            self.trace.extend(out)
        for d in out:
            if isinstance(d, m.Offer):
                self.offers += 1
                agent = d.agents[0]
                accepted = m.OfferAccepted(d.call, agent)
                start = self.clock()
                more = self.r.handle(accepted, self.now)
                spent += self.clock() - start
                if self.tracing:
                    self.trace.extend(more)
                self.busy.append((agent, d.call))
        return spent

    def cycle(self) -> None:
        self.now += STEP
        offers = self.offers
        switches = resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw
        spent = 0
        if self.due is not None and self.due <= self.now:
            spent += self.apply(None)  # the timer the adapter armed at next_timer() went off
        if self.busy:
            i = self.rnd.randrange(len(self.busy))
            self.busy[i], self.busy[-1] = self.busy[-1], self.busy[i]
            agent, call = self.busy.pop()
            spent += self.apply(m.CallEnded(call, agent))
        spent += self.apply(self.new_caller())
        start = self.clock()
        due = self.r.next_timer()
        spent += self.clock() - start
        if self.tracing:
            self.trace.append(("next_timer", due))
        self.due = due
        self.cycle_ns.append(spent)
        self.cycle_offers.append(self.offers - offers)
        self.preempted.append(
            resource.getrusage(resource.RUSAGE_THREAD).ru_nivcsw != switches)


def run(router_cls: type, config: m.RouterConfig, cycles: int, *,
        cpu_clock: bool = False) -> dict[str, object]:
    """One run: decisions per second of router time, p99 cycle latency, and the trace.
    ``cpu_clock``: time the router calls with the thread's CPU clock and keep every cycle."""
    driver = Driver(router_cls, config, seed=7,
                    clock=time.thread_time_ns if cpu_clock else time.perf_counter_ns)
    cpu = time.process_time()
    for i in range(cycles):
        driver.tracing = i < CYCLES_REFERENCE
        driver.cycle()
    cpu = time.process_time() - cpu
    if driver.offers == 0:
        raise SystemExit("no offers made: the benchmark is not routing")
    kept = [(ns, n) for ns, n, out in zip(driver.cycle_ns, driver.cycle_offers,
                                          driver.preempted, strict=True)
            if cpu_clock or not out]
    if len(kept) < max(100, cycles // 10):
        raise SystemExit(f"{cycles - len(kept)} of {cycles} cycles preempted: box too busy")

    def p(ordered: list[int], q: float) -> float:
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))] / 1e6

    every = sorted(driver.cycle_ns)
    quiet = sorted(ns for ns, _ in kept)
    return {
        "rate": sum(n for _, n in kept) / (sum(quiet) / 1e9),
        "rate_all_cycles": driver.offers / (sum(every) / 1e9),
        "rate_cpu_with_driver": driver.offers / cpu,
        "p50_ms": p(quiet, 0.5),
        "p99_ms": p(quiet, 0.99),
        "p99_all_cycles_ms": p(every, 0.99),
        "preempted_share": 1 - len(kept) / cycles,
        "offers": driver.offers,
        "trace": driver.trace,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def state_size(config: m.RouterConfig) -> dict[str, float]:
    """Memory of the compiled router built and loaded (10,000 callers, every agent busy)."""
    gc.collect()
    rss = _rss_bytes()
    driver = Driver(Router, config, seed=7)
    rss_delta = _rss_bytes() - rss
    del driver
    gc.collect()
    tracemalloc.start()
    driver = Driver(Router, config, seed=7)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del driver
    return {"tracemalloc_peak_mb": round(peak / 2**20, 1), "rss_delta_mb": round(rss_delta / 2**20, 1)}


def main() -> None:
    if not COMPILED:
        raise SystemExit("compiled ACD router not built: make build")
    config = site()
    memory = state_size(config)
    print(f"state: {memory}")
    fast_runs, ref_runs = [], []
    for rep in range(REPEATS):
        ref = run(ReferenceRouter, config, CYCLES_REFERENCE, cpu_clock=True)
        fast = run(Router, config, CYCLES_COMPILED)
        n = len(ref["trace"])
        if fast["trace"][:n] != ref["trace"]:
            raise SystemExit("compiled and reference routers decided differently")
        ref_runs.append(ref)
        fast_runs.append(fast)
        print(f"run={rep} compiled={fast['rate']:,.0f}/s p99={fast['p99_ms']:.3f}ms "
              f"(every cycle {fast['rate_all_cycles']:,.0f}/s p99 "
              f"{fast['p99_all_cycles_ms']:.3f}ms, {fast['preempted_share']:.1%} preempted) "
              f"reference={ref['rate']:,.0f}/s p99={ref['p99_ms']:.3f}ms "
              f"offers_compared={ref['offers']}")

    def med(runs: list[dict[str, object]], key: str) -> float:
        return statistics.median(float(r[key]) for r in runs)

    value = med(fast_runs, "rate_all_cycles")
    peer = med(ref_runs, "rate")
    print(json.dumps({
        "bench": "acd_route",
        "value": round(value, 1),
        "unit": "routing decisions/s (router time)",
        "peer": "edgecc reference router (CPython)",
        "peer_value": round(peer, 1),
        "ratio": round(value / peer, 2),
        "detail": {
            "queues": N_QUEUES, "agents": N_AGENTS, "waiting_calls": N_WAITING,
            "queues_per_agent": QUEUES_PER_AGENT, "skills": len(SKILLS),
            "relax_steps": "30 s lower_by 3, 90 s drop the second skill",
            "repeats": REPEATS, "cycles": {"compiled": CYCLES_COMPILED,
                                           "reference": CYCLES_REFERENCE},
            "cycle": "handle_timer if due -> call ends -> offer -> answer -> new caller joins"
                     " -> next_timer",
            "decision": "an Offer or DialCallback returned by the router",
            "clock": "perf_counter_ns around the router calls only, every cycle;"
                     " reference: thread_time_ns",
            "compiled_quiet_cycles": round(med(fast_runs, "rate"), 1),
            "p99_all_cycles_ms": round(med(fast_runs, "p99_all_cycles_ms"), 4),
            "preempted_share": round(med(fast_runs, "preempted_share"), 4),
            "reference_all_cycles": round(med(ref_runs, "rate_all_cycles"), 1),
            "p50_cycle_ms": round(med(fast_runs, "p50_ms"), 4),
            "p99_cycle_ms": round(med(fast_runs, "p99_ms"), 4),
            "reference_p99_cycle_ms": round(med(ref_runs, "p99_ms"), 3),
            "compiled_runs": [round(float(r["rate_all_cycles"]), 1) for r in fast_runs],
            "reference_runs": [round(float(r["rate"]), 1) for r in ref_runs],
            "compiled_cpu_with_driver": round(med(fast_runs, "rate_cpu_with_driver"), 1),
            "state": memory,
            "python": sys.version.split()[0],
        },
    }))


if __name__ == "__main__":
    main()
