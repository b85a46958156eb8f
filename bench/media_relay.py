"""Media relay benchmark: bridged G.711 calls per engine CPU core.

N concurrent bidirectional calls (172-byte RTP every 20 ms each way) go through a relay pinned
to one core, driven by a C load generator (bench/udp_load.c, compiled here) pinned to another.
For each relay the number of calls steps up until loss reaches 0.1% or the p99 one-way latency
through the relay reaches 1 ms; the value is the highest passing N divided by the relay's CPU
use (cores) at that N: calls per core. Relays, in the same run, alternating, three times:

- the edgecc media engine (media_core._engine), plain relaying;
- the same engine recording every call (stereo WAV, on /dev/shm so that the disk is not what is
  measured) and detecting in-band DTMF on every caller leg (RFC 4733 on every leg);
- rtpengine (Debian, userspace forwarding), driven by its ng control protocol;
- a plain C epoll + recvmmsg/sendmmsg relay (bench/plain_relay.c), the floor.

Usage: .venv/bin/python bench/media_relay.py [--quick] [--soak SECONDS [--soak-calls N]
       [--soak-dir DIR] [--soak-only]]
The soak records every call to WAV files on disk (in --soak-dir, by default a temporary
directory under the current one: ~32 KB/s per call, 19 GB for 1,000 calls over 10 minutes)
and then checks every file for gaps.
The last line printed is the JSON result (/work/shared/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from media_core._engine import Engine  # noqa: E402

STEPS = [400, 800, 950, 1100, 1300, 1500, 1700, 2000, 2400]
MAX_CALLS = STEPS[-1]
WARMUP_S = 0.5
MEASURE_S = 1.6
LOSS_LIMIT_PCT = 0.1
P99_LIMIT_US = 1000
ENGINE_PORTS = (20000, 20000 + 4 * MAX_CALLS + 3)     # RTP+RTCP per leg, two legs per call
RTPENGINE_PORTS = (2000, 2000 + 4 * MAX_CALLS + 99)
# below the kernel's ephemeral range (32768-60999), above ENGINE_PORTS; RTCP on +1
GEN_CALLER_PORT, GEN_AGENT_PORT = 31990, 31992
SOAK_CALLS = 1000
RT_PRIORITY = 10
USE_RT = True


# -- measurement helpers --------------------------------------------------------------------------


def cpu_ns_task(path: str) -> int:
    """CPU time of a task in ns (schedstat, or utime+stime from stat at clock-tick resolution)."""
    try:
        with open(f"{path}/schedstat") as f:
            return int(f.read().split()[0])
    except OSError:
        with open(f"{path}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def cpu_ns_process(pid: int) -> int:
    """CPU time of every thread of a process, ns."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError, ValueError):
            total += cpu_ns_task(f"/proc/{pid}/task/{tid}")
    return total


def realtime(pid: int = 0, *, threads: bool = False) -> None:
    """SCHED_FIFO for a relay or the generator: the box is shared, and other work must not sit
    between a packet and the relay (every relay gets the same treatment). Best effort."""
    param = os.sched_param(RT_PRIORITY)
    tids = [pid]
    if threads:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    for tid in tids:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(tid, os.SCHED_FIFO, param)


def pin(core: int, rt: bool) -> Callable[[], None]:
    def apply() -> None:
        os.sched_setaffinity(0, {core})
        if rt:
            realtime(0)
    return apply


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def compile_tools(tmp: Path) -> dict[str, Path]:
    """gcc -O2 the C load generator and plain relay into tmp."""
    out = {}
    for name, extra in (("udp_load", ["-pthread"]), ("plain_relay", [])):
        exe = tmp / name
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(ROOT / "bench" / f"{name}.c"),
                        *extra], check=True)
        out[name] = exe
    return out


def run_load(tools: dict[str, Path], targets: Path, calls: int, gen_core: int,
             cpu_reader: Callable[[], int], duration: float = MEASURE_S) -> dict:
    """One load step: returns the generator's figures plus the relay's CPU share."""
    proc = subprocess.Popen(
        [str(tools["udp_load"]), str(targets), str(WARMUP_S), str(duration), str(calls),
         str(GEN_CALLER_PORT), str(GEN_AGENT_PORT)],
        stdout=subprocess.PIPE, text=True,
        preexec_fn=pin(gen_core, USE_RT),
    )
    assert proc.stdout is not None
    cpu0 = cpu1 = t0 = t1 = 0.0
    result: dict = {}
    try:
        for line in proc.stdout:
            if line.startswith("START"):
                cpu0, t0 = cpu_reader(), time.monotonic()
            elif line.startswith("STOP"):
                cpu1, t1 = cpu_reader(), time.monotonic()
            elif line.startswith("END "):
                result = json.loads(line[4:])
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not result or t1 <= t0:
        raise RuntimeError(f"load generator failed (rc={proc.returncode})")
    result["cpu_cores"] = (cpu1 - cpu0) / 1e9 / (t1 - t0)
    result["ok"] = (result["loss_pct"] < LOSS_LIMIT_PCT and result["p99_us"] < P99_LIMIT_US
                    and result["corrupt"] == 0)
    result["calls_per_core"] = calls / max(result["cpu_cores"], 1e-6)
    return result


def ramp(name: str, tools: dict[str, Path], targets: Path, gen_core: int,
         cpu_reader: Callable[[], int], steps: list[int]) -> dict:
    """Steps N up until a step fails twice running (the box is shared: one stall of another
    process can spoil a p99 once); the best passing step decides."""
    best: dict | None = None
    last: dict = {}
    for calls in steps:
        for _attempt in range(2):
            last = run_load(tools, targets, calls, gen_core, cpu_reader)
            print(f"  {name:10s} N={calls:5d} loss={last['loss_pct']:.3f}% "
                  f"p50={last['p50_us']}us p99={last['p99_us']}us cpu={last['cpu_cores']:.2f} "
                  f"calls/core={last['calls_per_core']:.0f} "
                  f"sender_late={last['sender_late_us']}us {'ok' if last['ok'] else 'FAIL'}",
                  flush=True)
            if last["ok"]:
                break
        if not last["ok"]:
            break
        best = last
    return best or {**last, "calls_per_core": 0.0}


def write_targets(path: Path, pairs: list[tuple[int, int]]) -> None:
    path.write_text("".join(f"{a} {b}\n" for a, b in pairs))


# -- relays ---------------------------------------------------------------------------------------


class EngineRelay:
    """The edgecc engine in this process, its thread pinned to one core."""

    def __init__(self, core: int, record_dir: Path | None, calls: int = MAX_CALLS) -> None:
        self.rss_before = rss_bytes()
        self.core = Engine(ENGINE_PORTS[0], ENGINE_PORTS[1], 2 * MAX_CALLS + 8, MAX_CALLS + 8)
        self.core.start()
        deadline = time.monotonic() + 5
        while self.core.thread_id == 0 and time.monotonic() < deadline:
            time.sleep(0.001)   # the thread id is published when the thread runs
        os.sched_setaffinity(self.core.thread_id, {core})
        if USE_RT:
            realtime(self.core.thread_id)
        self.pairs = []
        for i in range(calls):
            a, pa = self.core.allocate("127.0.0.1")
            b, pb = self.core.allocate("127.0.0.1")
            self.core.bridge(a, b)
            if record_dir is not None:
                self.core.record_start(str(record_dir / f"call{i}.wav"), a, b)
                # in-band DTMF on the caller's leg (the IVR's digits); RFC 4733 digits are
                # watched on every leg anyway
                self.core.set_inband_dtmf(a, True)
            self.pairs.append((pa, pb))
        self.tid = self.core.thread_id

    def cpu(self) -> int:
        return cpu_ns_task(f"/proc/self/task/{self.tid}")

    def close(self) -> None:
        # memory of the process grown by the calls (legs, recordings, buffers touched by load)
        self.rss_per_call = (rss_bytes() - self.rss_before) / len(self.pairs)
        self.core.close()


class PlainRelay:
    def __init__(self, tools: dict[str, Path], core: int) -> None:
        pairs_file = tools["plain_relay"].parent / "plain_pairs.txt"
        self.proc = subprocess.Popen(
            [str(tools["plain_relay"]), str(MAX_CALLS), str(pairs_file)], stdout=subprocess.PIPE,
            text=True, preexec_fn=pin(core, USE_RT))
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "READY":
            self.close()
            raise RuntimeError("plain relay did not start")
        self.pairs = [(int(a), int(b)) for a, b in
                      (line.split() for line in pairs_file.read_text().splitlines())]

    def cpu(self) -> int:
        return cpu_ns_process(self.proc.pid)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def bencode(v: object) -> bytes:
    if isinstance(v, int):
        return b"i%de" % v
    if isinstance(v, str):
        v = v.encode()
    if isinstance(v, bytes):
        return b"%d:%s" % (len(v), v)
    if isinstance(v, list):
        return b"l" + b"".join(bencode(x) for x in v) + b"e"
    if isinstance(v, dict):
        return b"d" + b"".join(bencode(k) + bencode(v[k]) for k in sorted(v)) + b"e"
    raise TypeError(type(v))


def bdecode(data: bytes, i: int = 0) -> tuple[object, int]:
    c = data[i:i + 1]
    if c == b"i":
        end = data.index(b"e", i)
        return int(data[i + 1:end]), end + 1
    if c in (b"l", b"d"):
        i += 1
        items = []
        while data[i:i + 1] != b"e":
            item, i = bdecode(data, i)
            items.append(item)
        if c == b"l":
            return items, i + 1
        return {items[k]: items[k + 1] for k in range(0, len(items), 2)}, i + 1
    colon = data.index(b":", i)
    n = int(data[i:colon])
    return data[colon + 1:colon + 1 + n], colon + 1 + n


class RtpEngineRelay:
    """rtpengine (userspace), every call set up by ng offer/answer."""

    def __init__(self, core: int) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        ng_port = s.getsockname()[1]
        s.close()
        self.proc = subprocess.Popen(
            ["rtpengine", "--config-file=none", "--table=-1", "--interface=127.0.0.1",
             f"--listen-ng=127.0.0.1:{ng_port}", "--foreground", "--log-stderr",
             "--log-level=3", f"--port-min={RTPENGINE_PORTS[0]}",
             f"--port-max={RTPENGINE_PORTS[1]}", "--num-threads=1", "--timeout=600",
             "--delete-delay=0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=pin(core, False))
        self.ng = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ng.settimeout(0.5)
        self.ng_addr = ("127.0.0.1", ng_port)
        self._cookie = 0
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.command({"command": "ping"}).get(b"result") == b"pong":
                    break
            except TimeoutError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("rtpengine did not answer ng ping")
        self.pairs = []
        for i in range(MAX_CALLS):
            offer = self.command({"command": "offer", "call-id": f"bench-{i}",
                                  "from-tag": f"caller-{i}", "sdp": sdp(GEN_CALLER_PORT)})
            answer = self.command({"command": "answer", "call-id": f"bench-{i}",
                                   "from-tag": f"caller-{i}", "to-tag": f"agent-{i}",
                                   "sdp": sdp(GEN_AGENT_PORT)})
            # the caller sends to the port in the answer, the agent to the one in the offer
            self.pairs.append((sdp_port(answer), sdp_port(offer)))
        if USE_RT:
            realtime(self.proc.pid, threads=True)

    def command(self, body: dict) -> dict:
        self._cookie += 1
        cookie = b"c%d" % self._cookie
        self.ng.sendto(cookie + b" " + bencode(body), self.ng_addr)
        for _ in range(8):
            data, _addr = self.ng.recvfrom(65535)
            if data.startswith(cookie + b" "):
                reply, _ = bdecode(data, len(cookie) + 1)
                assert isinstance(reply, dict)
                if reply.get(b"result") == b"error":
                    raise RuntimeError(f"rtpengine: {reply.get(b'error-reason')!r}")
                return reply
        raise RuntimeError("rtpengine: no reply to our cookie")

    def cpu(self) -> int:
        return cpu_ns_process(self.proc.pid)

    def close(self) -> None:
        self.ng.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def sdp(port: int) -> str:
    return ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
            f"m=audio {port} RTP/AVP 0\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n")


def sdp_port(reply: dict) -> int:
    m = re.search(rb"m=audio (\d+) ", reply[b"sdp"])
    if not m:
        raise RuntimeError("rtpengine SDP without m=audio")
    return int(m.group(1))


def recording_gaps(rec_dir: Path, files: int) -> tuple[int, float]:
    """Runs of >= 20 ms of digital silence (what the recorder writes for missing audio) in
    either channel of the first `files` WAVs, after the first second and before the last; and
    the shortest file's length."""
    import wave

    import numpy as np

    gaps, shortest = 0, float("inf")
    for i in range(files):
        with wave.open(str(rec_dir / f"call{i}.wav")) as w:
            data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
        shortest = min(shortest, len(data) / 8000)
        body = data[8000:-8000]
        for ch in (0, 1):
            zero = np.concatenate([[0], (body[:, ch] == 0).astype(np.int8), [0]])
            edges = np.flatnonzero(np.diff(zero))
            gaps += int(np.sum((edges[1::2] - edges[::2]) >= 160))
    return gaps, shortest


def rtpengine_version() -> str:
    try:
        run = subprocess.run(["rtpengine", "--version"], capture_output=True, text=True)
        m = re.search(r"Version: (\d+\.\d+)", run.stdout + run.stderr)
        return f"rtpengine {m.group(1)}" if m else "rtpengine"
    except OSError:
        return "rtpengine (missing)"


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    global USE_RT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one repetition, fewer steps")
    ap.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                    help="also run the recording engine for this long and check every WAV "
                         "file for gaps")
    ap.add_argument("--soak-calls", type=int, default=SOAK_CALLS, metavar="N",
                    help=f"concurrent recorded calls in the soak (default {SOAK_CALLS})")
    ap.add_argument("--soak-dir", type=Path, default=Path.cwd(), metavar="DIR",
                    help="where the soak's WAV files go (a temporary directory is made in it)")
    ap.add_argument("--soak-only", action="store_true", help="skip the ramps, soak only")
    ap.add_argument("--no-rt", action="store_true", help="do not use SCHED_FIFO")
    args = ap.parse_args()
    USE_RT = not args.no_rt
    cores = sorted(os.sched_getaffinity(0))
    relay_core, gen_core = (cores[-1], cores[0]) if len(cores) > 1 else (cores[0], cores[0])
    reps = 0 if args.soak_only else 1 if args.quick else 3
    steps = STEPS[:5] if args.quick else STEPS
    have_rtpengine = shutil.which("rtpengine") is not None
    results: dict[str, list[dict]] = {"engine": [], "engine_rec": [], "plain": [], "rtpengine": []}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edgecc-bench-") as tmpdir:
        tmp = Path(tmpdir)
        tools = compile_tools(tmp)
        targets = tmp / "targets.txt"
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp
        for rep in range(reps):
            print(f"repetition {rep + 1}/{reps}", flush=True)
            for name in ("engine", "plain", "rtpengine", "engine_rec"):
                if name == "rtpengine" and not have_rtpengine:
                    continue
                rec_dir = None
                relay: EngineRelay | PlainRelay | RtpEngineRelay | None = None
                try:
                    if name == "engine_rec":
                        rec_dir = Path(tempfile.mkdtemp(prefix="edgecc-rec-", dir=shm))
                    if name.startswith("engine"):
                        relay = EngineRelay(relay_core, rec_dir)
                    elif name == "plain":
                        relay = PlainRelay(tools, relay_core)
                    else:
                        relay = RtpEngineRelay(relay_core)
                    write_targets(targets, relay.pairs)
                    results[name].append(ramp(name, tools, targets, gen_core, relay.cpu, steps))
                finally:
                    if relay is not None:
                        relay.close()
                    if rec_dir is not None:
                        shutil.rmtree(rec_dir, ignore_errors=True)
                if isinstance(relay, EngineRelay):
                    results[name][-1]["rss_bytes_per_call"] = relay.rss_per_call
        soak: dict = {}
        if args.soak > 0:
            rec_dir = Path(tempfile.mkdtemp(prefix="edgecc-soak-", dir=args.soak_dir))
            relay = EngineRelay(relay_core, rec_dir, args.soak_calls)
            try:
                write_targets(targets, relay.pairs)
                soak = run_load(tools, targets, args.soak_calls, gen_core, relay.cpu, args.soak)
                relay.close()           # finishes every WAV
                soak["wav_gaps"], soak["wav_seconds"] = recording_gaps(rec_dir, args.soak_calls)
                soak["wav_files_checked"] = args.soak_calls
                print(f"soak {args.soak:.0f}s: {soak}", flush=True)
            finally:
                relay.close()
                shutil.rmtree(rec_dir, ignore_errors=True)

    def med(name: str, key: str) -> float:
        vals = [r[key] for r in results[name] if key in r]
        return float(statistics.median(vals)) if vals else 0.0

    probe = Engine(ENGINE_PORTS[0], ENGINE_PORTS[1], 1, 1)
    # what the engine allocates per call: two legs, plus a recording and its 40 KiB buffer
    engine_bytes = (2 * probe.leg_bytes, 2 * probe.leg_bytes + probe.recording_bytes + 40960)
    probe.close()
    value = med("engine", "calls_per_core")
    if args.soak_only:
        value = soak.get("calls_per_core", 0.0)
    peer_value = med("rtpengine", "calls_per_core")
    plain_value = med("plain", "calls_per_core")
    detail = {
        "loss_pct": med("engine", "loss_pct"),
        "p99_added_ms": med("engine", "p99_us") / 1000,
        "calls_at_best": med("engine", "calls"),
        "engine_cpu_cores_at_best": round(med("engine", "cpu_cores"), 3),
        "with_recording_dtmf_calls_per_core": round(med("engine_rec", "calls_per_core"), 1),
        "with_recording_loss_pct": med("engine_rec", "loss_pct"),
        "with_recording_p99_added_ms": med("engine_rec", "p99_us") / 1000,
        # the first run's growth: later runs reuse memory the earlier ones freed
        "rss_bytes_per_call": round(results["engine"][0].get("rss_bytes_per_call", 0)
                                    if results["engine"] else 0),
        "rss_bytes_per_recorded_call": round(
            results["engine_rec"][0].get("rss_bytes_per_call", 0) if results["engine_rec"] else 0),
        "engine_bytes_per_call": engine_bytes[0],
        "engine_bytes_per_recorded_call": engine_bytes[1],
        "plain_c_relay_calls_per_core": round(plain_value, 1),
        "ratio_to_plain_c": round(value / plain_value, 3) if plain_value else None,
        "rtpengine_calls_per_core": round(peer_value, 1),
        "rtpengine_loss_pct": med("rtpengine", "loss_pct"),
        "rtpengine_p99_added_ms": med("rtpengine", "p99_us") / 1000,
        "soak": {k: soak[k] for k in ("calls", "calls_per_core", "cpu_cores", "loss_pct", "p99_us",
                                      "wav_gaps", "wav_seconds", "wav_files_checked")
                 if k in soak},
        "repetitions": reps,
        "steps": steps,
        "seconds": round(time.monotonic() - started, 1),
        "per_run": {k: [{f: r.get(f) for f in ("calls", "calls_per_core", "cpu_cores",
                                                "loss_pct", "p99_us")} for r in v]
                    for k, v in results.items()},
    }
    print(json.dumps({
        "bench": "media_relay",
        "value": round(value, 1),
        "unit": "calls/core",
        "peer": rtpengine_version(),
        "peer_value": round(peer_value, 1),
        "ratio": round(value / peer_value, 3) if peer_value else None,
        "detail": detail,
    }))


if __name__ == "__main__":
    main()
