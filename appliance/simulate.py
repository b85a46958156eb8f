"""``edgecc simulate``: real SIP traffic against a running appliance, for demos and soak runs.

Agents are pjsua2 phones (one process each, null audio device) that register with their demo
password, log in at the agent desk with the login feature code (``*70``), answer each call after
ringing briefly and hang up after a random talk time. Callers are SIPp (the scenario shipped in
``appliance/data/sipp/caller.xml``) calling the site's first DID at the given rate: through the
IVR menu ("1") into the queue, waiting at most ``patience`` seconds. Everything is bounded: the
callers stop after ``duration`` seconds (then the calls in progress finish, within a grace
period), and SIGTERM or SIGINT stops everything at once. Only loopback addresses are used.

Exit status: 0 done, 1 could not run (no SIPp, no pjsua2, no agent registered), 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from appliance.config import ConfigError, SiteConfig, load_site

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
MAX_AGENTS = 50
"""Agents one run starts (a process each)."""
MAX_DURATION_S = 24 * 3600
MAX_CALLS_PER_MINUTE = 600.0
REGISTER_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SCENARIO = Path(__file__).resolve().parent / "data" / "sipp" / "caller.xml"
DEMO_CREDENTIALS = "demo-credentials.json"

# The agent's phone. pjsua2's callbacks run on its own thread: they only queue events; the
# main thread acts on them. One line of JSON on stdout per thing that happened.
AGENT_SCRIPT = r"""
import json, queue, random, sys, threading, time
import pjsua2 as pj

user, password, realm, target, host, talk_min, talk_max, seed, deadline_s = sys.argv[1:10]
rng = random.Random(int(seed))
events = queue.Queue()

def say(**kw):
    print(json.dumps(kw), flush=True)

class Call(pj.Call):
    def onCallState(self, prm):
        info = self.getInfo()
        events.put(("state", self, info.state, info.lastStatusCode))

class Account(pj.Account):
    def onRegState(self, prm):
        events.put(("reg", prm.code))

    def onIncomingCall(self, prm):
        events.put(("incoming", Call(self, prm.callId)))

def read_stdin():
    for line in sys.stdin:
        if line.strip() == "quit":
            break
    events.put(("quit",))

ep = pj.Endpoint()
ep.libCreate()
cfg = pj.EpConfig()
cfg.logConfig.level = 1
cfg.logConfig.consoleLevel = 0
cfg.uaConfig.userAgent = "edgecc-simulate-agent"
ep.libInit(cfg)
ep.audDevManager().setNullDev()
tcfg = pj.TransportConfig()
tcfg.boundAddress = host
tcfg.port = 0
ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
ep.libStart()
acfg = pj.AccountConfig()
acfg.idUri = f"sip:{user}@{realm}"
acfg.regConfig.registrarUri = f"sip:{target}"
acfg.regConfig.timeoutSec = 300
acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, user, 0, password))
acc = Account()
acc.create(acfg)
threading.Thread(target=read_stdin, daemon=True).start()

calls = []        # live pjsua2 calls (they must stay referenced)
timers = []       # (when, action, call)
logged_in = False
login = None      # the *70 call
deadline = time.monotonic() + float(deadline_s)
try:
    while time.monotonic() < deadline:
        timers.sort(key=lambda t: t[0])
        wait = deadline - time.monotonic()
        if timers:
            wait = min(wait, timers[0][0] - time.monotonic())
        try:
            event = events.get(timeout=max(0.0, wait))
        except queue.Empty:
            while timers and timers[0][0] <= time.monotonic():
                _, action, call = timers.pop(0)
                op = pj.CallOpParam()
                try:
                    if action == "answer":
                        op.statusCode = 200
                        call.answer(op)
                    else:
                        call.hangup(op)
                        say(event="hung_up")
                except pj.Error:
                    pass  # the caller left first
            continue
        kind = event[0]
        if kind == "quit":
            break
        if kind == "reg":
            say(event="registered", code=event[1])
            if event[1] == 200 and not logged_in:
                logged_in = True
                login = Call(acc)
                calls.append(login)
                login.makeCall(f"sip:*70@{target}", pj.CallOpParam(True))
        elif kind == "incoming":
            call = event[1]
            calls.append(call)
            op = pj.CallOpParam()
            op.statusCode = 180
            call.answer(op)
            say(event="ringing")
            timers.append((time.monotonic() + rng.uniform(0.3, 1.5), "answer", call))
        elif kind == "state" and event[2] == pj.PJSIP_INV_STATE_CONFIRMED:
            call = event[1]
            if call in calls and call is not login:
                say(event="answered")
                talk = rng.uniform(float(talk_min), float(talk_max))
                timers.append((time.monotonic() + talk, "hangup", call))
        elif kind == "state" and event[2] == pj.PJSIP_INV_STATE_DISCONNECTED:
            call = event[1]
            timers = [t for t in timers if t[2] is not call]
            if call in calls:
                calls.remove(call)
            say(event="ended", code=int(event[3]))
finally:
    for call in list(calls):
        try:
            call.hangup(pj.CallOpParam())
        except pj.Error:
            pass
    acc.shutdown()
    ep.libDestroy()
    say(event="closed")
"""


class SimulationError(Exception):
    """The simulation cannot run; the message says why and what to do."""


class PlanError(SimulationError):
    """The plan itself is wrong (a figure out of range): bad usage."""


@dataclass
class AgentPhone:
    """One simulated agent's process and what it said."""

    user: str
    proc: subprocess.Popen[bytes]
    said: dict[str, int] = field(default_factory=dict)
    _buffer: bytes = b""

    def poll(self) -> None:
        """Read whatever the phone said so far (never blocks)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                name = event.get("event", "")
                if name == "registered":
                    name = f"registered_{event.get('code')}"
                self.said[name] = self.said.get(name, 0) + 1


@dataclass(frozen=True)
class Plan:
    """What one run does."""

    site_dir: Path
    agents: int
    calls_per_minute: float
    duration_s: float
    talk_s: tuple[float, float] = (5.0, 20.0)
    patience_s: float = 60.0
    seed: int = 0
    target: str | None = None
    """SIP address of the appliance (HOST:PORT); default: site.yaml's bind and udp_port."""


def _host_outside(config: SiteConfig) -> str:
    """A loopback address outside ``trunk.allowed_sources``: the agents' phones."""
    networks = [ipaddress.ip_network(n, strict=False) for n in config.trunk.allowed_sources]
    for last in range(3, 255):
        host = ipaddress.ip_address(f"127.0.0.{last}")
        if not any(host in n for n in networks):
            return str(host)
    raise SimulationError("every 127.0.0.x address is a trunk source; leave one for agents")


def _carrier_host(config: SiteConfig) -> str:
    """A loopback address inside ``trunk.allowed_sources``: the callers (the carrier)."""
    for text in config.trunk.allowed_sources:
        network = ipaddress.ip_network(text, strict=False)
        if network.version == 4 and network.network_address.is_loopback:
            return str(next(iter(network.hosts()), network.network_address))
    raise SimulationError("trunk.allowed_sources has no 127.x address for the simulated carrier")


def _target(config: SiteConfig, given: str | None) -> str:
    if given:
        host, _, port_text = given.rpartition(":")
        if not port_text.isdigit() or not host:
            raise PlanError(f"--sip: expected HOST:PORT, got {given!r}")
        return given
    port = config.sip.udp_port
    if not port:
        raise SimulationError("site.yaml has sip.udp_port 0 (any free port): give the port the "
                              "appliance printed with --sip HOST:PORT")
    host = "127.0.0.1" if ipaddress.ip_address(config.sip.bind).is_unspecified else (
        config.sip.bind)
    return f"{host}:{port}"


def _free_udp_port(host: str, even: bool = False) -> int:
    import socket

    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if not even or (port % 2 == 0 and port < 65530):
            return port
    raise SimulationError("no free UDP port on " + host)


def prepare(plan: Plan) -> tuple[SiteConfig, dict[str, str], str, str]:
    """Check the plan against the site: (config, agent passwords, DID, target)."""
    if not 1 <= plan.agents <= MAX_AGENTS:
        raise PlanError(f"--agents: expected 1 to {MAX_AGENTS}, got {plan.agents}")
    if not 0 < plan.calls_per_minute <= MAX_CALLS_PER_MINUTE:
        raise PlanError(f"--calls-per-minute: expected more than 0 and at most "
                        f"{MAX_CALLS_PER_MINUTE:g}, got {plan.calls_per_minute:g}")
    if not 0 < plan.duration_s <= MAX_DURATION_S:
        raise PlanError(f"--duration: expected more than 0 and at most {MAX_DURATION_S} s, "
                        f"got {plan.duration_s:g}")
    low, high = plan.talk_s
    if not 0 < low <= high <= 3600 or not 1 <= plan.patience_s <= 3600:
        raise PlanError("--talk needs 0 < MIN <= MAX <= 3600 and --patience 1 to 3600")
    if shutil.which("sipp") is None:
        raise SimulationError("sipp is not installed (Debian: apt-get install sip-tester)")
    try:
        import pjsua2  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise SimulationError("pjsua2 is not installed (pip install pjsua2-python)") from None
    config = load_site(plan.site_dir)
    if not config.ivr.dids:
        raise SimulationError("site.yaml has no ivr.dids: nothing for the callers to dial")
    try:
        creds = json.loads((plan.site_dir / DEMO_CREDENTIALS).read_text())
        passwords = {a["user"]: a["password"] for a in creds["accounts"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SimulationError(f"the agents' passwords come from {DEMO_CREDENTIALS} of a site "
                              f"made with `edgecc init --demo` ({exc})") from None
    agents = [a.user for a in config.sip.accounts if a.role == "agent" and a.user in passwords]
    if len(agents) < plan.agents:
        raise SimulationError(f"--agents {plan.agents}: the site has {len(agents)} agent "
                              f"accounts with a demo password")
    chosen = {user: passwords[user] for user in agents[:plan.agents]}
    return config, chosen, next(iter(config.ivr.dids)), _target(config, plan.target)


def run(plan: Plan, out: TextIO = sys.stdout, stop: threading.Event | None = None) -> int:
    """Run the simulation; returns the exit status. ``stop`` ends it early (as SIGTERM does)."""
    stop = stop or threading.Event()
    try:
        config, passwords, did, target = prepare(plan)
    except (SimulationError, ConfigError) as exc:
        print(f"edgecc simulate: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, (ConfigError, PlanError)) else EXIT_PROBLEM
    rng = random.Random(plan.seed)
    agent_host, carrier_host = _host_outside(config), _carrier_host(config)
    calls = max(1, round(plan.calls_per_minute * plan.duration_s / 60))
    grace = plan.patience_s + plan.talk_s[1] + 15
    lifetime = plan.duration_s + grace + REGISTER_TIMEOUT_S
    phones: list[AgentPhone] = []
    sipp: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="edgecc-simulate-") as scratch:
        try:
            for user, password in passwords.items():
                proc = subprocess.Popen(
                    [sys.executable, "-c", AGENT_SCRIPT, user, password, config.sip.realm,
                     target, agent_host, str(plan.talk_s[0]), str(plan.talk_s[1]),
                     str(rng.randrange(1 << 30)), str(lifetime)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
                phones.append(AgentPhone(user, proc))
            registered = _wait_registered(phones, stop)
            print(f"simulate agents={len(phones)} registered={registered} target={target} "
                  f"did={did}", file=out, flush=True)
            if registered == 0:
                print("edgecc simulate: no agent could register; is the appliance running at "
                      f"{target}?", file=sys.stderr)
                return EXIT_PROBLEM
            scenario = Path(scratch) / "caller.xml"
            scenario.write_text(SCENARIO.read_text().replace(
                "[patience]", str(int(plan.patience_s * 1000))))
            sipp = subprocess.Popen(
                ["sipp", target, "-sf", str(scenario), "-s", did,
                 "-r", f"{plan.calls_per_minute:g}", "-rp", "60000", "-m", str(calls),
                 "-l", str(max(1, plan.agents * 4)), "-i", carrier_host,
                 "-p", str(_free_udp_port(carrier_host)), "-mi", carrier_host,
                 "-mp", str(_free_udp_port(carrier_host, even=True)), "-nostdin",
                 "-timeout", f"{int(plan.duration_s + grace)}s", "-trace_stat",
                 "-stf", str(Path(scratch) / "stat.csv")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=scratch)
            print(f"simulate calls={calls} rate={plan.calls_per_minute:g}/min "
                  f"duration={plan.duration_s:g}s", file=out, flush=True)
            deadline = time.monotonic() + plan.duration_s + grace
            while sipp.poll() is None and not stop.is_set() and time.monotonic() < deadline:
                stop.wait(0.5)
                for phone in phones:
                    phone.poll()
        finally:
            if sipp is not None and sipp.poll() is None:
                sipp.terminate()
                _reap(sipp)
            for phone in phones:
                with contextlib.suppress(OSError, ValueError):
                    assert phone.proc.stdin is not None
                    phone.proc.stdin.write(b"quit\n")
                    phone.proc.stdin.flush()
            for phone in phones:
                _reap(phone.proc)
                with contextlib.suppress(OSError, ValueError):
                    phone.poll()
        answered = sum(p.said.get("answered", 0) for p in phones)
        placed = _sipp_calls(Path(scratch) / "stat.csv")
        print(f"simulate done placed={placed if placed is not None else 'unknown'} "
              f"answered={answered} stopped={'early' if stop.is_set() else 'at-end'}",
              file=out, flush=True)
    return EXIT_OK


def _wait_registered(phones: list[AgentPhone], stop: threading.Event) -> int:
    deadline = time.monotonic() + REGISTER_TIMEOUT_S
    while time.monotonic() < deadline and not stop.is_set():
        for phone in phones:
            phone.poll()
        done = [p for p in phones if any(k.startswith("registered_") for k in p.said)
                or p.proc.poll() is not None]
        if len(done) == len(phones):
            break
        stop.wait(0.1)
    return sum(1 for p in phones if p.said.get("registered_200"))


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _sipp_calls(stat: Path) -> int | None:
    """Calls SIPp placed, from the last line of its statistics file."""
    try:
        lines = [line for line in stat.read_text().splitlines() if line.strip()]
        header, last = lines[0].split(";"), lines[-1].split(";")
        return int(last[header.index("OutgoingCall(C)")])
    except (OSError, ValueError, IndexError):
        return None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``simulate`` to the ``edgecc`` subcommands."""
    parser = subparsers.add_parser(
        "simulate", help="place simulated calls to simulated agents (SIPp, pjsua2)",
        description="Real SIP traffic against a running appliance of a demo site: agents "
        "(pjsua2) register, log in with *70, answer and hang up after a random talk time; "
        "callers (SIPp) dial the site's first DID at the given rate. Stops by itself, and "
        "on SIGTERM.")
    parser.add_argument("--site-dir", type=Path, required=True,
                        help="directory of a site made with `edgecc init --demo`")
    parser.add_argument("--agents", type=int, required=True, help=f"agents (1-{MAX_AGENTS})")
    parser.add_argument("--calls-per-minute", type=float, required=True,
                        help="callers per minute")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds during which callers call (default 60)")
    parser.add_argument("--talk", type=float, nargs=2, default=(5.0, 20.0),
                        metavar=("MIN", "MAX"), help="agents' talk time range, s (5 20)")
    parser.add_argument("--patience", type=float, default=60.0,
                        help="seconds a caller waits in queue before hanging up (60)")
    parser.add_argument("--sip", help="the appliance's SIP address HOST:PORT (default: from "
                        "site.yaml)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (talk times)")
    parser.set_defaults(handler=_cmd_simulate)
    return parser


def _cmd_simulate(args: argparse.Namespace) -> int:
    plan = Plan(args.site_dir, args.agents, args.calls_per_minute, args.duration,
                talk_s=tuple(args.talk), patience_s=args.patience, seed=args.seed,
                target=args.sip)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM,
                                                                     signal.SIGINT)}
    try:
        return run(plan, sys.stdout, stop)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
