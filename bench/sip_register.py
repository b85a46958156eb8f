"""REGISTER with digest: the appliance's registrar against Kamailio 5.6, in one run.

The same SIPp scenario (tests/sipp/register_digest.xml: REGISTER, 401, REGISTER with MD5
credentials, 200) runs against each peer in rate steps of two seconds. A step passes when every
registration was answered, fewer than 0.1 % of them failed, and the server kept up: all of them
done at no less than 90 % of the offered rate, that is within step / 0.9 (about 111 % of the
step's length, SIPp's start included). A server that falls behind queues the rest and finishes
late, so the achieved rate is the fair overload signal for both peers; a looser bound (125 %)
would credit a server with a rate it only 80 % sustained. The same rule applies to both peers.
A step that failed only on time (all answered, none failed) is run once more before it counts
(one may be a stall of the shared machine); a ramp ends after two failing steps in a row. The
appliance is restarted before each of its ramps, so every ramp starts with no server
transactions held (RFC 3261 Timer J keeps each one 32 s). The value is the highest passing
rate, one registration (two REGISTER transactions) counted once, median of three alternating
ramps. Both sides hold HA1 only; the appliance writes its bindings to the site database,
Kamailio keeps them in usrloc memory (db_mode 0).

A step where SIPp did not run (exit code other than 0 or 1, or no registration attempted) is
void, not a measurement: it is run once more on a fresh local port, and if still void the
ramp is void. A ramp cut short by the bench's time budget is void too. Void ramps are left
out of the medians and listed in ``detail.void`` with SIPp's error line.

Same cores for both: the appliance is one process with one event loop, Kamailio forks
``children`` UDP workers (bench/kamailio.cfg). On a machine with two or more cores both servers
are pinned to the same single core (``taskset``), and SIPp to another, so the figures compare
what each does with one core; ``detail.pinning`` says which. ``detail`` also gives each side's
CPU per registration (user + system, all its processes and threads) at its best step.

Run from the repository root: ``.venv/bin/python bench/sip_register.py``. Everything runs on
free ports of 127.0.0.1 and is stopped at the end; the last line printed is the JSON result.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from appliance.config import ha1  # noqa: E402
from appliance.site_init import SiteSpec, create_site  # noqa: E402

SCENARIO = ROOT / "tests" / "sipp" / "register_digest.xml"
KAMAILIO_CFG = ROOT / "bench" / "kamailio.cfg"
REALM = "edgecc.local"
ACCOUNTS = 500
STEPS = (500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 7000, 8000, 10000, 12000)
STEP_SECONDS = 2.0
WARMUP_RATE = 250
REPEATS = 3
MAX_FAILURE_RATIO = 0.001
BENCH_BUDGET_S = 270.0
# SIPp exit codes (sipp -h): 0 all calls successful, 1 at least one failed. Anything else (97
# internal exit, 99 no call processed, 255/254 fatal or bind error) means it did not measure.
SIPP_MEASURED_RC = (0, 1)


def _pinning() -> tuple[list[str], list[str], dict]:
    """taskset prefixes (servers, SIPp) and what they mean; no pinning on one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2 or shutil.which("taskset") is None:
        return [], [], {"servers": "unpinned", "sipp": "unpinned"}
    server, load = cores[-1], cores[0]
    return (
        ["taskset", "-c", str(server)],
        ["taskset", "-c", str(load)],
        {"servers": f"core {server} (both)", "sipp": f"core {load}"},
    )


SERVER_PIN, SIPP_PIN, PINNING = _pinning()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (Linux /proc)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def children_of(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out += [int(p) for p in task.read_text().split()]
    return out


class Peer:
    name: str
    port: int
    proc: subprocess.Popen
    log: BinaryIO | None = None

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # A restarted peer must not leave its pipe and log descriptors behind.
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.log is not None:
            self.log.close()
            self.log = None


class Appliance(Peer):
    """``edgecc appliance`` on a site with ACCOUNTS agents and the bench source exempted."""

    def __init__(self, workdir: Path, passwords: dict[str, str]) -> None:
        self.name = "edgecc"
        self.workdir = workdir
        self.site_dir = workdir / "site"
        spec = SiteSpec(
            realm=REALM, sip_port=0, tls_port=None, http_port=0, agents=0, rtp_ports=(40000, 40999)
        )
        create_site(self.site_dir, spec)
        data = yaml.safe_load((self.site_dir / "site.yaml").read_text())
        data["sip"]["accounts"] = [
            {"user": u, "ha1_md5": ha1(u, REALM, p)[0], "ha1_sha256": ha1(u, REALM, p)[1]}
            for u, p in passwords.items()
        ]
        # The load generator is one source sending thousands of requests per second.
        data["guard"]["exempt_sources"] = ["127.0.0.0/8"]
        (self.site_dir / "site.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
        self.start()

    def start(self) -> None:
        """Start (or restart) the appliance; each ramp begins with no transactions held."""
        edgecc = Path(sys.executable).parent / "edgecc"
        self.log = open(self.workdir / "appliance.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*SERVER_PIN, str(edgecc), "appliance", "--site-dir", str(self.site_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log,
            cwd=ROOT,
        )
        line = _read_line(self.proc, 30.0)
        m = re.search(r"udp:127\.0\.0\.1:(\d+)", line)
        if not m:
            self.stop()
            raise RuntimeError(f"appliance did not start: {line!r}")
        self.port = int(m.group(1))


class Kamailio(Peer):
    """Kamailio 5.6 with bench/kamailio.cfg and a db_text subscriber table."""

    def __init__(self, workdir: Path, passwords: dict[str, str]) -> None:
        self.name = "kamailio"
        db = workdir / "kamdb"
        db.mkdir()
        (db / "version").write_text(
            "id(int,auto) table_name(string) table_version(int) \n"
            "0:version:1\n0:subscriber:7\n0:location:9\n"
        )
        rows = [
            "id(int,auto) username(string) domain(string) password(string) "
            "ha1(string) ha1b(string) "
        ]
        for i, (user, password) in enumerate(passwords.items(), 1):
            rows.append(f"{i}:{user}:{REALM}:-:{ha1(user, REALM, password)[0]}:-")
        (db / "subscriber").write_text("\n".join(rows) + "\n")
        self.port = free_udp_port()
        self.log = open(workdir / "kamailio.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                *SERVER_PIN,
                "kamailio",
                "-DD",
                "-E",
                "-f",
                str(KAMAILIO_CFG),
                "-l",
                f"udp:127.0.0.1:{self.port}",
                "-A",
                f'DBURL="text://{db}"',
                "-P",
                str(workdir / "kamailio.pid"),
                "-w",
                str(workdir),
                "-Y",
                str(workdir),
                "-m",
                "256",
                "-M",
                "16",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        if not _answers(self.port, 15.0):
            self.stop()
            raise RuntimeError("kamailio did not answer")

    def pids(self) -> list[int]:
        return children_of(self.proc.pid)


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while time.monotonic() < deadline and b"\n" not in buf:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    return buf.decode(errors="replace").splitlines()[0] if buf else ""


def _answers(port: int, timeout: float) -> bool:
    """True once something answers an OPTIONS on 127.0.0.1:port (bounded)."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        lport = s.getsockname()[1]
        n = 0
        while time.monotonic() < deadline:
            n += 1
            msg = (
                f"OPTIONS sip:127.0.0.1:{port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{lport};branch=z9hG4bKprobe{n}\r\n"
                "Max-Forwards: 70\r\nTo: <sip:probe@127.0.0.1>\r\n"
                f"From: <sip:probe@127.0.0.1>;tag=p{n}\r\nCall-ID: probe{n}\r\n"
                "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n"
            )
            s.sendto(msg.encode(), ("127.0.0.1", port))
            ready, _, _ = select.select([s], [], [], 0.5)
            if ready:
                return True
    return False


def run_step(peer: Peer, rate: int, users_csv: Path, ports: dict[str, int], workdir: Path) -> dict:
    """One SIPp run at ``rate`` registrations/s for STEP_SECONDS, judged as the module says.

    SIPp keeps one local port per peer so that each account keeps one contact. A void run (SIPp
    did not measure, e.g. that port was taken meanwhile) is repeated once on a fresh port; a run
    that failed only on time is repeated once as it was. The result says ``void`` if SIPp never
    ran, and ``tries`` how many runs it took.
    """
    step = _sipp_step(peer, rate, users_csv, ports[peer.name], workdir)
    tries = 1
    if step["late_only"]:
        step = _sipp_step(peer, rate, users_csv, ports[peer.name], workdir)
        tries += 1
    if step["void"]:
        print(
            f"{peer.name:9s} rate={rate:5d}/s void: sipp rc={step['sipp_rc']} "
            f"{step['sipp_error']!r}; again on a fresh port",
            flush=True,
        )
        ports[peer.name] = free_udp_port()
        step = _sipp_step(peer, rate, users_csv, ports[peer.name], workdir)
        tries += 1
    step["tries"] = tries
    return step


def _sipp_step(peer: Peer, rate: int, users_csv: Path, sipp_port: int, workdir: Path) -> dict:
    calls = int(rate * STEP_SECONDS)
    stat = workdir / f"stat-{peer.name}-{rate}-{time.monotonic_ns()}.csv"
    cmd = [
        *SIPP_PIN,
        "sipp",
        f"127.0.0.1:{peer.port}",
        "-sf",
        str(SCENARIO),
        "-inf",
        str(users_csv),
        "-i",
        "127.0.0.1",
        "-p",
        str(sipp_port),
        "-r",
        str(rate),
        "-rp",
        "1000",
        "-m",
        str(calls),
        "-l",
        str(max(100, rate * 2)),
        "-recv_timeout",
        "4000",
        "-timeout",
        f"{int(STEP_SECONDS * 4 + 10)}s",
        "-nostdin",
        "-nd",
        "-buff_size",
        "4194304",
        "-trace_stat",
        "-stf",
        str(stat),
        "-fd",
        "60",
        "-max_recv_loops",
        "10000",
        "-max_sched_loops",
        "10000",
    ]
    cpu0 = cpu_seconds(peer.pids())
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=STEP_SECONDS * 4 + 20,
            cwd=workdir,
        )
        rc: int | None = proc.returncode
        stderr = proc.stderr.decode(errors="replace")
    except subprocess.TimeoutExpired as exc:  # run() has killed and reaped it
        rc = None
        stderr = (exc.stderr or b"").decode(errors="replace") + "\nsipp did not exit in time"
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(peer.pids()) - cpu0
    ok = failed = created = 0
    if stat.exists():
        rows = list(csv.reader(stat.read_text().splitlines(), delimiter=";"))
        if len(rows) >= 2:
            header, last = rows[0], rows[-1]
            ok = int(last[header.index("SuccessfulCall(C)")])
            failed = int(last[header.index("FailedCall(C)")])
            if "TotalCallCreated" in header:
                created = int(last[header.index("TotalCallCreated")])
    done = ok + failed
    void = rc not in SIPP_MEASURED_RC or max(created, done) == 0
    # Sustained: every registration done at >= 90 % of the offered rate (the module docstring).
    in_time = calls / elapsed >= 0.9 * rate
    answered = done == calls and failed <= MAX_FAILURE_RATIO * calls
    return {
        "rate": rate,
        "ok": ok,
        "failed": failed,
        "calls": calls,
        "elapsed_s": round(elapsed, 2),
        "cpu_pct": round(100 * cpu / elapsed, 1),
        "cpu_us_per_registration": round(1e6 * cpu / ok, 1) if ok else None,
        "passed": not void and answered and in_time,
        "late_only": not void and answered and failed == 0 and not in_time,
        "void": void,
        "sipp_rc": rc,
        "sipp_error": _last_error_line(stderr) if void else "",
    }


def _last_error_line(stderr: str) -> str:
    """SIPp's last stderr line, without its timestamp prefix, bounded in length."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if not lines:
        return ""
    # SIPp prefixes errors with "date<TAB>time<TAB>epoch: ".
    return re.sub(r"^\S+\t\S+\t[\d.]+:\s*", "", lines[-1])[:300]


def ramp(
    peer: Peer, users_csv: Path, ports: dict[str, int], workdir: Path, deadline: float
) -> dict:
    """Highest passing rate of one ramp; ``void`` (with the reason) if it measured nothing."""
    best = 0
    cpu_at_best = None
    us_at_best = None
    steps = []
    misses = 0
    void = ""
    # Warm-up, not counted: the first REGISTERs after a start meet cold caches and new rows.
    warm = run_step(peer, WARMUP_RATE, users_csv, ports, workdir)
    if warm["void"]:
        void = f"warm-up: sipp rc={warm['sipp_rc']} {warm['sipp_error']}"
    for rate in STEPS if not void else ():
        if time.monotonic() + STEP_SECONDS * 3 > deadline:
            void = f"bench time budget reached before rate {rate}"
            break
        step = run_step(peer, rate, users_csv, ports, workdir)
        steps.append(step)
        verdict = "VOID" if step["void"] else "pass" if step["passed"] else "FAIL"
        print(
            f"{peer.name:9s} rate={rate:5d}/s ok={step['ok']} failed={step['failed']} "
            f"elapsed={step['elapsed_s']}s cpu={step['cpu_pct']}% "
            f"cpu/reg={step['cpu_us_per_registration']}us runs={step['tries']} {verdict}",
            flush=True,
        )
        if step["void"]:
            void = f"rate {rate}: sipp rc={step['sipp_rc']} {step['sipp_error']}"
            break
        if not step["passed"]:
            # Two failing steps in a row end the ramp (a lone one may still be a stall).
            misses += 1
            if misses == 2:
                break
            continue
        misses = 0
        best, cpu_at_best, us_at_best = rate, step["cpu_pct"], step["cpu_us_per_registration"]
    if void:
        print(f"{peer.name:9s} ramp void: {void}", flush=True)
    return {
        "best": None if void else best,
        "cpu_pct": None if void else cpu_at_best,
        "cpu_us": None if void else us_at_best,
        "void": void,
        "steps": steps,
    }


def kamailio_children() -> int | None:
    m = re.search(r"^children=(\d+)", KAMAILIO_CFG.read_text(), re.MULTILINE)
    return int(m.group(1)) if m else None


def kamailio_version() -> str:
    out = subprocess.run(["kamailio", "-v"], capture_output=True, text=True).stdout
    m = re.search(r"kamailio (\d+\.\d+\.\d+)", out)
    return f"kamailio {m.group(1)}" if m else "kamailio"


def main() -> int:
    started = time.monotonic()
    deadline = started + BENCH_BUDGET_S
    workdir = Path(tempfile.mkdtemp(prefix="edgecc-bench-register-"))
    passwords = {str(1001 + i): f"pw{1001 + i}x{i * 7919 % 10007}" for i in range(ACCOUNTS)}
    users_csv = workdir / "users.csv"
    users_csv.write_text(
        "SEQUENTIAL\n"
        + "".join(
            # Quoted: SIPp would read an unquoted password beginning with "0x" as hex bytes.
            f'{u};{REALM};[authentication username={u} password="{p}"]\n'
            for u, p in passwords.items()
        )
    )
    peers: list[Peer] = []
    results: dict[str, list[dict]] = {"edgecc": [], "kamailio": []}
    try:
        peers.append(Appliance(workdir, passwords))
        peers.append(Kamailio(workdir, passwords))
        ports = {p.name: free_udp_port() for p in peers}
        for rep in range(REPEATS):
            order = peers if rep % 2 == 0 else peers[::-1]
            for peer in order:
                if isinstance(peer, Appliance) and rep > 0:
                    peer.stop()
                    peer.start()
                results[peer.name].append(ramp(peer, users_csv, ports, workdir, deadline))
        for peer in peers:
            if peer.proc.poll() is not None:
                raise RuntimeError(f"{peer.name} exited during the bench")
    finally:
        for peer in peers:
            peer.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str) -> float | None:
        valid = [r["best"] for r in results[name] if not r["void"]]
        return float(statistics.median(valid)) if valid else None

    ours = median("edgecc")
    theirs = median("kamailio")
    detail = {
        "runs_edgecc": [r["best"] for r in results["edgecc"]],
        "runs_kamailio": [r["best"] for r in results["kamailio"]],
        "cpu_pct_edgecc": [r["cpu_pct"] for r in results["edgecc"]],
        "cpu_pct_kamailio": [r["cpu_pct"] for r in results["kamailio"]],
        "cpu_us_per_registration_edgecc": [r["cpu_us"] for r in results["edgecc"]],
        "cpu_us_per_registration_kamailio": [r["cpu_us"] for r in results["kamailio"]],
        "pinning": PINNING,
        "kamailio_children": kamailio_children(),
        "edgecc_processes": "1 (one event loop + the bindings writer thread)",
        "steps": list(STEPS),
        "step_s": STEP_SECONDS,
        "accounts": ACCOUNTS,
        "max_failure_pct": MAX_FAILURE_RATIO * 100,
        "registration": "REGISTER, 401, REGISTER+digest MD5, 200 (counted once)",
        "valid_runs": {n: sum(not r["void"] for r in rs) for n, rs in results.items()},
        "void": [
            {"peer": n, "repetition": i + 1, "reason": r["void"]}
            for n, rs in results.items()
            for i, r in enumerate(rs)
            if r["void"]
        ],
        "bench_s": round(time.monotonic() - started, 1),
    }
    print(
        json.dumps(
            {
                "bench": "sip_register",
                "value": ours,
                "unit": "REGISTER/s",
                "peer": kamailio_version(),
                "peer_value": theirs,
                "ratio": round(ours / theirs, 3) if ours is not None and theirs else None,
                "detail": detail,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
