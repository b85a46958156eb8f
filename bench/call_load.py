"""Carrier calls through the IVR into a queue and onto agents' phones, against Kamailio as a proxy.

The appliance runs a site of AGENTS agents (``edgecc init``'s starter: DID +15550100, flow
``main`` where "1" goes to the recorded queue ``support``). SIPp plays the agents' phones: one
SIPp registers every agent from one address, then a SIPp UAS on that address answers each
INVITE (180, 200 with PCMA) and talks (SIPp's g711a.pcap, RTP) until the BYE
(bench/sipp/agent_uas.xml). SIPp plays the carrier (bench/sipp/caller.xml): INVITE, the IVR's
183, the digit "1" as RFC 4733 events, the agent's answer, talk, BYE.

Two figures for the appliance:

- **calls/s into the IVR** (the value): short calls (no talk) at rising rates, RATE_STEP_S
  seconds each. A step passes when every call ended, fewer than 0.1 % failed, and all were
  placed at no less than 90 % of the offered rate (a server that falls behind makes SIPp late).
  The best passing rate of a ramp; median of REPEATS ramps.
- **concurrent recorded calls**: TALK_S-second calls with RTP both ways, each step holding N
  calls at once (placed at FILL_RATE/s). A step passes with fewer than 0.1 % failed calls and
  less than 0.5 % RTP loss, where the loss is what the appliance's media engine counted on its
  legs (written into each call record's legs). One ramp (the peer has no media).

The peer, in the same run: the identical SIPp caller and agents through Kamailio as a
transaction-stateful, record-routing proxy (bench/kamailio_proxy.cfg; no IVR, no queue, no
media), the signalling ceiling of this machine; same rate ramps, alternating with the
appliance's.

Nothing is pinned: the appliance, Kamailio and the SIPp generators share the machine's cores,
as they would on a 2-core box. Each step records the server's CPU (all threads, and its first
thread: the appliance's event loop), the generators' (the callers' SIPp runs and the agents'
SIPp), the kernel's (system, irq and softirq time of the machine: loopback delivery) and the
machine's. ``detail.rate_bound_by`` says what was busy at the best step of the best ramp,
``detail.next_step_bound_by`` what stopped that ramp one step higher, and the ``*_by_rate``
figures give the median per offered rate (CPU per call is comparable there from run to run,
where the best rate is not).

Run from the repository root: ``.venv/bin/python bench/call_load.py [--quick]``. Everything
runs on free ports of 127.0.0.1 and is stopped at the end; the last line is the JSON result.
``--rate N [--seconds S] [--repeat K] [--profile out.txt]`` runs short calls at one rate
against the appliance alone instead and prints one JSON line per run with the CPU per call of
each of its threads (and a py-spy profile of the last run): the before/after figure for a
change, run from each tree (a ``git worktree`` of the base commit with its built modules).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.acd.desk import desk_from_config  # noqa: E402
from appliance.config import ha1, load_site  # noqa: E402
from appliance.site_init import DEMO_DID, SiteSpec, create_site  # noqa: E402
from appliance.store import open_site_db  # noqa: E402
from bench.sip_register import (  # noqa: E402
    Peer,
    _answers,
    _last_error_line,
    _read_line,
    children_of,
    cpu_seconds,
    free_udp_port,
    kamailio_version,
)

REGISTER_SCENARIO = ROOT / "tests" / "sipp" / "register_digest.xml"
AGENT_SCENARIO = ROOT / "bench" / "sipp" / "agent_uas.xml"
CALLER_SCENARIO = ROOT / "bench" / "sipp" / "caller.xml"
KAMAILIO_CFG = ROOT / "bench" / "kamailio_proxy.cfg"
REALM = "edgecc.local"
AGENTS = 800
RATE_STEPS = (25, 50, 100, 150, 200, 250, 300, 350, 400, 500, 600)
RATE_STEP_S = 5.0
CONCURRENT_STEPS = (100, 250, 500, 650, 800)
TALK_LOOPS = 4
"""Talk = loops x 7 s of RTP each way (~28 s)."""
FILL_RATE = 40
REPEATS = 3
MAX_FAILED = 0.001
MAX_RTP_LOSS_PCT = 0.5
SIPP_MEASURED_RC = (0, 1)
SIPP_FLAGS = ("-nostdin", "-nd", "-buff_size", "4194304", "-max_recv_loops", "10000",
              "-max_sched_loops", "10000", "-fd", "60")


class Appliance(Peer):
    """``edgecc appliance`` on a starter site with AGENTS agents, the bench source exempted."""

    def __init__(self, workdir: Path) -> None:
        self.name = "edgecc"
        self.site_dir = workdir / "site"
        spec = SiteSpec(realm=REALM, sip_port=0, tls_port=None, http_port=0, agents=AGENTS,
                        rtp_ports=(20000, 29999))
        create_site(self.site_dir, spec)
        data = yaml.safe_load((self.site_dir / "site.yaml").read_text())
        # Passwords SIPp's [authentication] keyword takes as they are (it reads a leading "0x"
        # as hex, which some generated passwords have).
        self.passwords = {a["user"]: f"pw{a['user']}" for a in data["sip"]["accounts"]}
        for account in data["sip"]["accounts"]:
            md5, sha256 = ha1(account["user"], REALM, self.passwords[account["user"]])
            account.update(ha1_md5=md5, ha1_sha256=sha256)
        # The generators are single sources sending hundreds of requests per second.
        data["guard"]["exempt_sources"] = ["127.0.0.0/8"]
        (self.site_dir / "site.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        self.database = self.site_dir / data.get("storage", {}).get("database", "edgecc.db")
        # Agents take calls once logged in (the agent desk, docs/routing.md): log every one in
        # as their *70 would; the appliance restores that presence at start.
        config = load_site(self.site_dir)
        db = open_site_db(config.storage.database)
        try:
            desk, _codes = desk_from_config(db, config)
            for agent in self.passwords:
                desk.login(agent, time.time(), actor="bench", source="bench/call_load.py")
            desk.close()  # committed before the appliance reads them
        finally:
            db.close()
        self.log = open(workdir / "appliance.log", "ab")  # noqa: SIM115
        # ``-m`` from the repository root runs this tree's code (also in a git worktree).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "appliance", "--site-dir", str(self.site_dir)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT,
        )
        line = _read_line(self.proc, 60.0)
        m = re.search(r"udp:127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"appliance did not start: {line!r}")
        self.port = int(m.group(1))


class Kamailio(Peer):
    """Kamailio with bench/kamailio_proxy.cfg, relaying every call to the agents' SIPp."""

    def __init__(self, workdir: Path, agents_port: int) -> None:
        self.name = "kamailio"
        self.port = free_udp_port()
        self.log = open(workdir / "kamailio.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["kamailio", "-DD", "-E", "-f", str(KAMAILIO_CFG), "-l", f"udp:127.0.0.1:{self.port}",
             "-A", f'AGENTS="sip:127.0.0.1:{agents_port}"', "-P", str(workdir / "kamailio.pid"),
             "-w", str(workdir), "-Y", str(workdir), "-m", "256", "-M", "16"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
        )
        if not _answers(self.port, 15.0):
            self.stop()
            raise RuntimeError("kamailio did not answer")

    def pids(self) -> list[int]:
        return children_of(self.proc.pid)


class AgentPhones:
    """Every agent registered from one address, then a SIPp UAS answering there."""

    def __init__(self, workdir: Path, appliance: Appliance) -> None:
        self.port = free_udp_port()
        users = workdir / "agents.csv"
        users.write_text("SEQUENTIAL\n" + "".join(
            f"{u};{REALM};[authentication username={u} password={p}]\n"
            for u, p in appliance.passwords.items()))
        reg = subprocess.run(
            ["sipp", f"127.0.0.1:{appliance.port}", "-sf", str(REGISTER_SCENARIO), "-inf",
             str(users), "-i", "127.0.0.1", "-p", str(self.port), "-r", "200",
             "-m", str(len(appliance.passwords)), "-l", "400", "-recv_timeout", "5000",
             "-timeout", "60s", "-mp", str(free_udp_port()), "-trace_err", *SIPP_FLAGS],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, timeout=90,
        )
        if reg.returncode != 0:
            raise RuntimeError("agents did not all register: "
                               + _last_error_line(reg.stderr.decode(errors="replace")))
        self.log = open(workdir / "agents.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(AGENT_SCENARIO), "-i", "127.0.0.1", "-p", str(self.port),
             "-mi", "127.0.0.1", "-mp", str(free_udp_port()), "-l", "5000", *SIPP_FLAGS],
            cwd=workdir, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log,
        )
        time.sleep(0.5)   # SIPp prints nothing when it is ready; a bind error ends it at once
        if self.proc.poll() is not None:
            raise RuntimeError(f"agents' SIPp exited: rc={self.proc.returncode}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def machine_busy() -> tuple[int, int, int]:
    """(busy, total, kernel) jiffies of the whole machine (/proc/stat); kernel is system +
    irq + softirq time (the loopback's packets are delivered in softirq)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields), fields[2] + fields[5] + fields[6]


def children_cpu_seconds() -> float:
    """CPU time of this process's waited-for children (the caller SIPp runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cores_now() -> int:
    return os.cpu_count() or 1


def run_calls(peer: Peer, workdir: Path, *, rate: float, calls: int, limit: int, loops: int,
              timeout_s: float, agents: AgentPhones) -> dict:
    """One SIPp caller run; its figures, the peer's CPU and the machine's."""
    stat = workdir / f"stat-{peer.name}-{time.monotonic_ns()}.csv"
    cmd = ["sipp", f"127.0.0.1:{peer.port}", "-sf", str(CALLER_SCENARIO), "-s", DEMO_DID,
           "-key", "loops", str(loops), "-i", "127.0.0.1", "-p", str(free_udp_port()),
           "-mi", "127.0.0.1", "-mp", str(free_udp_port()),
           "-r", str(rate), "-m", str(calls), "-l", str(limit),
           "-recv_timeout", "20000", "-timeout", f"{int(timeout_s)}s",
           "-trace_stat", "-stf", str(stat), *SIPP_FLAGS]
    cpu0, busy0, t0 = cpu_seconds(peer.pids()), machine_busy(), time.monotonic()
    gen0, callers0 = cpu_seconds([agents.proc.pid]), children_cpu_seconds()
    loop0 = thread_cpu(peer.proc.pid).get("main", 0.0)
    try:
        proc = subprocess.run(cmd, cwd=workdir, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout_s + 30)
        rc: int | None = proc.returncode
        stderr = proc.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:
        rc, stderr = None, (exc.stderr or b"").decode(errors="replace") + "\nsipp timed out"
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(peer.pids()) - cpu0
    loop_cpu = thread_cpu(peer.proc.pid).get("main", 0.0) - loop0
    busy1 = machine_busy()
    ok = failed = 0
    if stat.exists():
        rows = list(csv.reader(stat.read_text().splitlines(), delimiter=";"))
        if len(rows) >= 2:
            header, last = rows[0], rows[-1]
            ok = int(last[header.index("SuccessfulCall(C)")])
            failed = int(last[header.index("FailedCall(C)")])
    return {
        "ok": ok, "failed": failed, "calls": calls, "elapsed_s": round(elapsed, 2),
        "void": rc not in SIPP_MEASURED_RC or ok + failed == 0,
        "sipp_error": _last_error_line(stderr) if rc not in SIPP_MEASURED_RC else "",
        "peer_cpu_pct": round(100 * cpu / elapsed, 1),
        "peer_cpu_ms_per_call": round(1000 * cpu / ok, 2) if ok else None,
        # The first thread: the appliance's event loop (Kamailio's main process, idle).
        "peer_main_thread_cpu_pct": round(100 * loop_cpu / elapsed, 1),
        "agents_sipp_cpu_pct": round(100 * (cpu_seconds([agents.proc.pid]) - gen0) / elapsed, 1),
        "callers_sipp_cpu_pct": round(100 * (children_cpu_seconds() - callers0) / elapsed, 1),
        "machine_busy_pct": round(100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]), 1),
        # Kernel time in percent of one core (the machine's jiffies count every core).
        "kernel_cpu_pct": round(100 * cores_now() * (busy1[2] - busy0[2])
                                / max(1, busy1[1] - busy0[1]), 1),
    }


def rate_ramp(peer: Peer, workdir: Path, agents: AgentPhones, steps: tuple[int, ...]) -> dict:
    """Highest rate of short calls with every call ended, < 0.1 % failed, placed in time."""
    best, at_best, misses, runs = 0, None, 0, []
    for rate in steps:
        calls = int(rate * RATE_STEP_S)
        step = run_calls(peer, workdir, rate=rate, calls=calls, limit=max(200, rate * 10),
                         loops=0, timeout_s=RATE_STEP_S * 4 + 20, agents=agents)
        in_time = calls / step["elapsed_s"] >= 0.9 * rate if step["elapsed_s"] else False
        # SIPp's elapsed time includes each call's final 4 s timewait.
        in_time = in_time or step["elapsed_s"] <= RATE_STEP_S / 0.9 + 4.5
        passed = (not step["void"] and step["ok"] + step["failed"] == calls
                  and step["failed"] <= MAX_FAILED * calls and in_time)
        step.update(rate=rate, passed=passed)
        runs.append(step)
        print(f"{peer.name:9s} rate={rate:4d}/s ok={step['ok']} failed={step['failed']} "
              f"elapsed={step['elapsed_s']}s cpu={step['peer_cpu_pct']}% "
              f"loop={step['peer_main_thread_cpu_pct']}% "
              f"callers={step['callers_sipp_cpu_pct']}% agents={step['agents_sipp_cpu_pct']}% "
              f"kernel={step['kernel_cpu_pct']}% machine={step['machine_busy_pct']}% "
              f"{'pass' if passed else 'FAIL'}", flush=True)
        if step["void"]:
            print(f"{peer.name:9s} void: {step['sipp_error']}", flush=True)
            break
        if not passed:
            misses += 1
            # Two failed steps in a row end the ramp, but not before it has tried 300/s.
            if misses >= 2 and rate >= 300:
                break
            continue
        misses, best, at_best = 0, rate, step
    return {"best": best, "at_best": at_best, "steps": runs,
            "first_failed": next((r for r in runs if r["rate"] > best and not r["passed"]),
                                 None)}


def rtp_loss(database: Path, since_rowid: int) -> tuple[float | None, int]:
    """Packets lost over expected on every engine leg of the calls recorded after since_rowid,
    in percent, from the legs' media figures in the call records (None when not recorded)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT legs FROM call_records WHERE rowid > ?",
                            (since_rowid,)).fetchall()
    finally:
        conn.close()
    lost = received = 0
    seen = False
    for (legs,) in rows:
        for leg in json.loads(legs or "[]"):
            media = leg.get("media") or {}
            if "lost" in media and "rx_packets" in media:
                seen = True
                lost += max(0, int(media["lost"]))
                received += int(media["rx_packets"])
    if not seen:
        return None, len(rows)
    return (100.0 * lost / (lost + received) if lost + received else 0.0), len(rows)


def last_record_rowid(database: Path) -> int:
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT coalesce(max(rowid), 0) FROM call_records").fetchone()[0]
    finally:
        conn.close()


def concurrency_ramp(app: Appliance, workdir: Path, agents: AgentPhones,
                     steps: tuple[int, ...], loops: int) -> dict:
    """Most calls held at once, recorded, with RTP both ways: < 0.1 % failed, < 0.5 % loss."""
    best, at_best, runs = 0, None, []
    for n in steps:
        since = last_record_rowid(app.database)
        step = run_calls(app, workdir, rate=FILL_RATE, calls=n, limit=n, loops=loops,
                         timeout_s=n / FILL_RATE + loops * 7 + 60, agents=agents)
        deadline = time.monotonic() + 30
        loss, records = rtp_loss(app.database, since)
        while records < step["ok"] and time.monotonic() < deadline:
            time.sleep(0.5)   # the call records of the last calls are written as they end
            loss, records = rtp_loss(app.database, since)
        passed = (not step["void"] and step["failed"] <= MAX_FAILED * n
                  and step["ok"] + step["failed"] == n
                  and (loss is None or loss < MAX_RTP_LOSS_PCT))
        step.update(concurrent=n, rtp_loss_pct=None if loss is None else round(loss, 4),
                    call_records=records, passed=passed)
        runs.append(step)
        print(f"edgecc    concurrent={n:4d} ok={step['ok']} failed={step['failed']} "
              f"rtp_loss={step['rtp_loss_pct']}% cpu={step['peer_cpu_pct']}% "
              f"machine={step['machine_busy_pct']}% {'pass' if passed else 'FAIL'}", flush=True)
        if not passed:
            break
        best, at_best = n, step
    return {"best": best, "at_best": at_best, "steps": runs}


def per_rate(ramps: list[dict], field: str) -> dict[str, float]:
    """The median of one step figure per offered rate, over the ramps' clean steps."""
    values: dict[int, list[float]] = {}
    for ramp in ramps:
        for step in ramp["steps"]:
            if not step["void"] and step["failed"] == 0 and step.get(field) is not None:
                values.setdefault(step["rate"], []).append(step[field])
    return {str(rate): round(statistics.median(v), 2) for rate, v in sorted(values.items())}


def bound_by(step: dict | None, peer_cores: float) -> str:
    """What bounded a step: the whole machine (and who used it), the server's event loop, or
    neither (calls late or failed with CPU to spare)."""
    if not step:
        return "nothing passed"
    shares = (f"server {step['peer_cpu_pct']}% of a core (event loop "
              f"{step.get('peer_main_thread_cpu_pct')}%), generators' SIPp "
              f"{round(step['agents_sipp_cpu_pct'] + step.get('callers_sipp_cpu_pct', 0.0), 1)}%"
              f", kernel {step.get('kernel_cpu_pct')}%")
    if step["machine_busy_pct"] >= 90:
        return (f"the machine's {peer_cores:.0f} cores (busy {step['machine_busy_pct']}%: "
                f"{shares}; the rest other processes)")
    if step.get("peer_main_thread_cpu_pct", 0.0) >= 90 or step["peer_cpu_pct"] >= 90:
        return f"the server's event loop (one core: {shares})"
    return (f"no CPU full: calls late or failed with CPU to spare, or none (machine "
            f"{step['machine_busy_pct']}%: {shares})")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of a process, by ``comm`` name and thread id (/proc); the
    main thread's also split in user and system time."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        key = "main" if task.name == str(pid) else f"{name}-{task.name}"
        out[key] = (int(fields[11]) + int(fields[12])) / tick
        if key == "main":
            out["main-user"], out["main-system"] = int(fields[11]) / tick, int(fields[12]) / tick
    return out


def fixed_rate(args: argparse.Namespace) -> int:
    """Short calls at one rate against the appliance alone; one JSON line per run."""
    workdir = Path(tempfile.mkdtemp(prefix="edgecc-bench-calls-"))
    parts: list = []
    spy = None
    try:
        app = Appliance(workdir)
        parts.append(app)
        agents = AgentPhones(workdir, app)
        parts.append(agents)
        for run in range(max(1, args.repeat)):
            if args.profile and run == args.repeat - 1:
                spy = subprocess.Popen(
                    [str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                     str(app.proc.pid), "--duration", str(int(args.seconds)), "--rate", "250",
                     "--output", args.profile, "--nonblocking", "--threads", "--gil",
                     *(["--format", "raw"] if args.profile.endswith(".txt") else [])],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            calls = int(args.rate * args.seconds)
            threads0 = thread_cpu(app.proc.pid)
            step = run_calls(app, workdir, rate=args.rate, calls=calls,
                             limit=max(200, args.rate * 10), loops=0,
                             timeout_s=args.seconds * 4 + 20, agents=agents)
            step["rate"] = args.rate
            threads1 = thread_cpu(app.proc.pid)
            step["thread_cpu_ms_per_call"] = {
                name: round(1000 * (cpu - threads0.get(name, 0.0)) / max(1, step["ok"]), 2)
                for name, cpu in sorted(threads1.items(), key=lambda kv: -kv[1])
                if cpu - threads0.get(name, 0.0) > 0.05}
            print(json.dumps(step), flush=True)
        if spy is not None:
            spy.wait(args.seconds + 60)
    finally:
        if spy is not None and spy.poll() is None:
            spy.kill()
            spy.wait()
        for part in reversed(parts):
            part.stop()
        if args.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="one ramp each, fewer steps, 100 concurrent calls only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    ap.add_argument("--rate", type=int, default=0, metavar="N",
                    help="instead of the ramps: short calls at N/s for --seconds against the "
                         "appliance alone, and its CPU per call (for before/after comparisons)")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the --rate run")
    ap.add_argument("--repeat", type=int, default=1, help="--rate runs, back to back")
    ap.add_argument("--profile", metavar="SVG",
                    help="with --rate: py-spy record the appliance during the last run")
    args = ap.parse_args()
    if args.rate:
        return fixed_rate(args)
    repeats = 1 if args.quick else REPEATS
    rate_steps = RATE_STEPS[:4] if args.quick else RATE_STEPS
    conc_steps = CONCURRENT_STEPS[:1] if args.quick else CONCURRENT_STEPS
    cores = len(os.sched_getaffinity(0))
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="edgecc-bench-calls-"))
    results: dict[str, list[dict]] = {"edgecc": [], "kamailio": []}
    concurrent: dict = {}
    parts: list = []
    try:
        app = Appliance(workdir)
        parts.append(app)
        agents = AgentPhones(workdir, app)
        parts.append(agents)
        kam = Kamailio(workdir, agents.port)
        parts.append(kam)
        for rep in range(repeats):
            for peer in ((app, kam) if rep % 2 == 0 else (kam, app)):
                results[peer.name].append(rate_ramp(peer, workdir, agents, rate_steps))
        concurrent = concurrency_ramp(app, workdir, agents, conc_steps, TALK_LOOPS)
        for part in parts:
            if part.proc.poll() is not None:
                raise RuntimeError(f"{type(part).__name__} exited during the bench")
    except BaseException:
        for part in reversed(parts):
            part.stop()
        print(f"failed: logs kept in {workdir}", file=sys.stderr)
        raise
    for part in reversed(parts):
        part.stop()
    if args.keep:
        print(f"logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str) -> float | None:
        vals = [r["best"] for r in results[name]]
        return float(statistics.median(vals)) if vals else None

    ours, theirs = median("edgecc"), median("kamailio")
    best_runs = [r for r in results["edgecc"] if r["best"] == max(
        (x["best"] for x in results["edgecc"]), default=0)]
    at_best = best_runs[0]["at_best"] if best_runs else None
    first_failed = best_runs[0].get("first_failed") if best_runs else None
    conc_best = concurrent.get("at_best")
    detail = {
        "runs_edgecc": [r["best"] for r in results["edgecc"]],
        "runs_kamailio": [r["best"] for r in results["kamailio"]],
        "edgecc_cpu_ms_per_short_call": at_best and at_best["peer_cpu_ms_per_call"],
        "edgecc_cpu_pct_at_best_rate": at_best and at_best["peer_cpu_pct"],
        # Per rate, the median over the ramps of steps with no failed call: comparable from
        # run to run where the best rate is not (CPU per call includes SIPp's 4 s timewait).
        "edgecc_cpu_ms_per_call_by_rate": per_rate(results["edgecc"], "peer_cpu_ms_per_call"),
        "kamailio_cpu_ms_per_call_by_rate": per_rate(results["kamailio"],
                                                     "peer_cpu_ms_per_call"),
        "edgecc_loop_cpu_pct_by_rate": per_rate(results["edgecc"], "peer_main_thread_cpu_pct"),
        "machine_busy_pct_by_rate": per_rate(results["edgecc"], "machine_busy_pct"),
        "rate_bound_by": bound_by(at_best, cores),
        # The step above the best of that ramp: what stopped the ramp there.
        "next_step_bound_by": (f"{first_failed['rate']}/s: {first_failed['ok']} ok, "
                               f"{first_failed['failed']} failed, {first_failed['elapsed_s']} s; "
                               + bound_by(first_failed, cores)) if first_failed else None,
        "callers_sipp_cpu_pct_by_rate": per_rate(results["edgecc"], "callers_sipp_cpu_pct"),
        "kernel_cpu_pct_by_rate": per_rate(results["edgecc"], "kernel_cpu_pct"),
        "concurrent_recorded_calls": concurrent.get("best"),
        "concurrent_rtp_loss_pct": conc_best and conc_best["rtp_loss_pct"],
        "concurrent_cpu_ms_per_call": conc_best and conc_best["peer_cpu_ms_per_call"],
        "concurrent_cpu_pct": conc_best and conc_best["peer_cpu_pct"],
        "concurrent_bound_by": bound_by(conc_best, cores),
        "concurrent_steps": [{k: s.get(k) for k in ("concurrent", "ok", "failed", "rtp_loss_pct",
                                                     "peer_cpu_pct", "machine_busy_pct",
                                                     "passed")}
                             for s in concurrent.get("steps", [])],
        "talk_s": TALK_LOOPS * 7,
        "agents": AGENTS,
        "rate_steps": list(rate_steps),
        "rate_step_s": RATE_STEP_S,
        "cores": cores,
        "peer_note": "Kamailio relays the same SIPp calls statefully (record-route), no IVR, "
                     "no queue, no media",
        "bench_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps({
        "bench": "call_load",
        "value": ours,
        "unit": "calls/s",
        "peer": f"{kamailio_version()} (stateful proxy)",
        "peer_value": theirs,
        "ratio": round(ours / theirs, 3) if ours and theirs else None,
        "detail": detail,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
