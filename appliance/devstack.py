"""``edgecc demo``: the whole hybrid on one machine — a local cloud, the edge agent, the appliance.

    edgecc demo --site-dir demo-site [--cloud-port 0] [--console-port 0]
                [--simulate [--agents N] [--calls-per-minute M]]

1. creates the demo site (``edgecc init --demo``) when ``SITE_DIR/site.yaml`` is missing;
2. starts the local cloud as a child process, its data under ``SITE_DIR/cloud/server/``;
3. enrols the site with a one-time token from that cloud (once; later runs reuse the
   certificate while the cloud's CA is the same, and only point ``cloud.yaml`` at the port);
4. starts the appliance and the edge agent as child processes;
5. with ``--simulate``, starts ``edgecc simulate`` against the appliance (simulated agents
   answering simulated callers, at a gentle rate) so the wallboard moves; its end (after
   ``SIMULATE_S``) leaves the rest running;
6. prints where each listens (the console URL too) and the log files;
7. on SIGTERM or SIGINT stops every child (SIGTERM, then SIGKILL for any still running after
   ``STOP_GRACE_S``), all within 2 s, and exits 0. A child that dies on its own stops the rest
   and the exit status is 1.

Nothing here imports the cloud or the edge agent: they are separate programs, started as the
operator would start them (the appliance and the cloud meet only through ``proto/``).
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

STOP_GRACE_S = 1.5
"""SIGTERM to SIGKILL; the whole stop stays under 2 s."""
START_TIMEOUT_S = 60.0
"""Longest wait for a child's start-up line."""
CLOUD_LINE = re.compile(
    r"^edgecc cloud listening link=(?P<link>\S+) enrol=\S+:(?P<enrol>\d+) (?:http=(?P<http>\S+) )?"
)
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
SIMULATE_S = 8 * 3600
"""How long ``--simulate`` keeps placing calls."""
APPLIANCE_SIP = re.compile(r" sip=udp:(?P<hostport>[^,\s]+)")


class DemoError(Exception):
    """The demo cannot start (a child failed to start, enrolment refused)."""


@dataclass
class Child:
    """One child process and where its logs go."""

    name: str
    """``cloud``, ``appliance`` or ``edge-agent``."""
    process: subprocess.Popen[bytes]
    """The running process."""
    log: Path
    """Its standard error."""
    pending: bytes = field(default=b"")
    """Standard output read but not yet split into lines."""
    optional: bool = False
    """Its end does not stop the demo (the simulation)."""


def _edgecc(*args: str) -> list[str]:
    """The command line of an ``edgecc`` sub-command run with this interpreter."""
    return [sys.executable, "-c", "import sys; from appliance.cli import main; "
            "sys.exit(main(sys.argv[1:]))", *args]


class DemoStack:
    """Starts the cloud, the appliance and the edge agent of one site; stops them together."""

    def __init__(self, site_dir: Path, *, cloud_port: int = 0, console_port: int = 0,
                 simulate: tuple[int, float] | None = None, out: TextIO = sys.stdout) -> None:
        self.site_dir = site_dir.resolve()
        self.cloud_dir = self.site_dir / "cloud" / "server"
        self.log_dir = self.site_dir / "logs"
        self.cloud_port = cloud_port
        self.console_port = console_port
        self.simulate = simulate
        """(agents, calls per minute) for ``edgecc simulate``, or None."""
        self.out = out
        self.children: list[Child] = []
        self.stopping = threading.Event()
        """Set by a signal: a start in progress gives up at its next step."""

    # ------------------------------------------------------------ children

    def _spawn(self, name: str, argv: list[str]) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as err:
            process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                       stdin=subprocess.DEVNULL, cwd=self.site_dir)
        child = Child(name, process, log)
        self.children.append(child)
        return child

    def _first_line(self, child: Child, timeout: float = START_TIMEOUT_S) -> str:
        """The child's start-up line; DemoError when it exits or stays silent."""
        assert child.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in child.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([child.process.stdout], [], [], min(0.2, max(0.0, left)))
            if self.stopping.is_set():
                raise DemoError("stopped while starting")
            if not ready and left > 0:
                continue
            chunk = os.read(child.process.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                tail = child.log.read_text(errors="replace")[-2000:] if child.log.exists() else ""
                raise DemoError(f"{child.name} did not start (see {child.log}):\n{tail}")
            child.pending += chunk
        line, _, child.pending = child.pending.partition(b"\n")
        # Anything the child prints later is passed on, so its pipe never fills up.
        threading.Thread(target=self._forward, args=(child,), daemon=True).start()
        return line.decode(errors="replace")

    def _forward(self, child: Child) -> None:
        stream = child.process.stdout
        assert stream is not None
        for raw in iter(stream.readline, b""):
            self._say(f"[{child.name}] {raw.decode(errors='replace').rstrip()}")

    def _say(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (OSError, ValueError):  # stdout closed: keep running
            pass

    # ------------------------------------------------------------ steps

    def ensure_site(self) -> None:
        """Create the demo site when there is none."""
        if (self.site_dir / "site.yaml").exists():
            return
        done = subprocess.run(_edgecc("init", "--demo", "--site-dir", str(self.site_dir)),
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise DemoError(f"edgecc init --demo failed:\n{done.stderr.strip()}")
        self._say(done.stdout.strip())

    def start_cloud(self) -> tuple[str, int, str | None]:
        """Start the local cloud; return (link address, enrol port, console URL)."""
        child = self._spawn("cloud", [
            sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(self.cloud_dir),
            "--grpc-port", str(self.cloud_port), "--http-port", str(self.console_port),
        ])
        line = self._first_line(child)
        match = CLOUD_LINE.match(line)
        if match is None:
            raise DemoError(f"unexpected start-up line of the cloud: {line!r}")
        self._say(line)
        return match["link"], int(match["enrol"]), match["http"]

    def _site_id(self) -> str:
        try:
            data = yaml.safe_load((self.site_dir / "site.yaml").read_text(encoding="utf-8"))
            return str(data["site"]["id"])
        except (OSError, yaml.YAMLError, TypeError, KeyError) as exc:
            raise DemoError(f"{self.site_dir / 'site.yaml'} has no site.id: {exc}") from None

    def enrol(self, link: str, enrol_port: int) -> None:
        """Enrol the site with a one-time token, unless its certificate is from this cloud."""
        ca = self.cloud_dir / "ca" / "ca.crt"
        ours = self.site_dir / "cloud" / "ca.crt"
        enrolled = (self.site_dir / "cloud" / "site.crt").exists() and ours.exists() and (
            ours.read_bytes() == ca.read_bytes())
        if not enrolled:
            token = subprocess.run(
                [sys.executable, "-m", "cloud_bridge.cli", "--data-dir", str(self.cloud_dir),
                 "token", "--site", self._site_id(), "--ttl", "600"],
                capture_output=True, text=True, timeout=60,
            )
            if token.returncode != 0:
                raise DemoError(f"no enrolment token: {token.stderr.strip()}")
            done = subprocess.run(
                [sys.executable, "-m", "edge_agent", "enrol", "--site-dir", str(self.site_dir),
                 "--cloud", link, "--enrol-port", str(enrol_port), "--token",
                 token.stdout.strip(), "--ca-cert", str(ca), "--force"],
                capture_output=True, text=True, timeout=60,
            )
            if done.returncode != 0:
                raise DemoError(f"enrolment refused: {done.stderr.strip()}")
            self._say(f"enrolled site={self._site_id()} with a one-time token")
        # The cloud may listen on another port than last time: point the agent at it.
        file = self.site_dir / "cloud.yaml"
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        data.setdefault("cloud", {})["address"] = link
        temporary = file.with_suffix(".yaml.tmp")
        temporary.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        os.replace(temporary, file)

    def start_appliance(self) -> str:
        """Start the appliance; return its start-up line."""
        child = self._spawn("appliance", _edgecc("appliance", "--site-dir", str(self.site_dir)))
        line = self._first_line(child)
        self._say(line)
        return line

    def start_edge_agent(self) -> str:
        """Start the edge agent; return its start-up line."""
        child = self._spawn("edge-agent",
                            [sys.executable, "-m", "edge_agent", "--site-dir", str(self.site_dir)])
        line = self._first_line(child)
        self._say(line)
        return line

    def start_simulation(self, appliance_line: str) -> None:
        """Start ``edgecc simulate`` against the appliance of ``appliance_line``."""
        assert self.simulate is not None
        match = APPLIANCE_SIP.search(appliance_line)
        if match is None:
            raise DemoError(f"no UDP SIP address in the appliance's line: {appliance_line!r}")
        agents, per_minute = self.simulate
        child = self._spawn("simulate", _edgecc(
            "simulate", "--site-dir", str(self.site_dir), "--sip", match["hostport"],
            "--agents", str(agents), "--calls-per-minute", f"{per_minute:g}",
            "--duration", f"{SIMULATE_S:g}"))
        child.optional = True
        threading.Thread(target=self._forward, args=(child,), daemon=True).start()
        self._say(f"simulating agents={agents} calls_per_minute={per_minute:g} "
                  f"(log {child.log})")

    def start(self) -> None:
        """Every step in order; on failure what was started is stopped again."""
        try:
            self.ensure_site()
            link, enrol_port, console = self.start_cloud()
            self.enrol(link, enrol_port)
            appliance = self.start_appliance()
            self.start_edge_agent()
            if self.simulate is not None:
                self.start_simulation(appliance)
        except BaseException:
            self.stop()
            raise
        logs = ", ".join(str(c.log) for c in self.children)
        self._say(f"edgecc demo ready site={self._site_id()} console={console or '-'} "
                  f"cloud={link} logs={logs}")
        self._say("stop with Ctrl-C (SIGINT) or SIGTERM")

    def stop(self) -> None:
        """SIGTERM every child, SIGKILL those still running after STOP_GRACE_S; reap all."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(self.children):
            try:
                child.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)
                self._say(f"{child.name} did not stop in {STOP_GRACE_S} s: killed")
        self.children.clear()

    def wait(self, stop: threading.Event) -> int:
        """Until ``stop`` is set (0) or a child exits on its own (1)."""
        while not stop.wait(0.2):
            for child in list(self.children):
                code = child.process.poll()
                if code is not None and child.optional:
                    self._say(f"{child.name} ended with status {code} (see {child.log})")
                    self.children.remove(child)
                elif code is not None:
                    self._say(f"{child.name} exited with status {code} (see {child.log}); "
                              "stopping the demo")
                    return EXIT_PROBLEM
        return EXIT_OK


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``edgecc`` parser; ``args.handler(args)`` runs it."""
    demo = commands.add_parser(
        "demo", help="run the whole hybrid locally: cloud, edge agent and appliance",
        description="Creates the demo site when missing, starts a local cloud (data under "
        "SITE_DIR/cloud/server), enrols the site, starts the appliance and the edge agent, "
        "and stops them all on SIGTERM/SIGINT.",
    )
    demo.add_argument("--site-dir", type=Path, required=True, help="directory of the site")
    demo.add_argument("--cloud-port", type=int, default=0,
                      help="the local cloud's link port (default 0: any free port)")
    demo.add_argument("--console-port", type=int, default=0,
                      help="the cloud console's web port (default 0: any free port)")
    demo.add_argument("--simulate", action="store_true",
                      help="also run `edgecc simulate`: simulated agents take simulated calls")
    demo.add_argument("--agents", type=int, default=3,
                      help="simulated agents with --simulate (default 3)")
    demo.add_argument("--calls-per-minute", type=float, default=2.0,
                      help="simulated callers per minute with --simulate (default 2)")
    demo.set_defaults(handler=run_demo)
    return demo


def run_demo(args: argparse.Namespace, *, out: TextIO = sys.stdout) -> int:
    """Run the demo stack until SIGTERM/SIGINT; return the exit status."""
    simulate = (args.agents, args.calls_per_minute) if getattr(args, "simulate", False) else None
    stack = DemoStack(args.site_dir, cloud_port=args.cloud_port,
                      console_port=args.console_port, simulate=simulate, out=out)
    stop = stack.stopping
    previous: dict[int, Callable[..., Any] | int | None] = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            stack.start()
        except DemoError as exc:
            if stop.is_set():
                return EXIT_OK
            print(f"edgecc demo: {exc}", file=sys.stderr)
            return EXIT_PROBLEM
        return stack.wait(stop)
    finally:
        stack.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
