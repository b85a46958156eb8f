"""Real peers for the call tests: pjsua2 agents' phones, SIPp carriers, and the appliance.

The appliance runs either as ``edgecc appliance`` in its own process (``test_register_peers``)
or in this process on a loop of its own (``LiveAppliance``), when a test drives call control's
API and watches its ``on_event`` callback. Phones and carriers are always processes of their
own. Every wait is bounded and waits on an event, never on a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from test_register_peers import EDGECC, Running, Site, read_line

ROOT = Path(__file__).resolve().parent.parent
SIPP_DIR = ROOT / "tests" / "sipp"
DID = "+15550100"
CALLER = "+15557654321"


def make_site(directory: Path, agents: int = 2, edit: Callable[[dict], None] | None = None
              ) -> Site:
    """``edgecc init --demo`` on free ports; the carrier calls from 127.0.0.2 (the phones are
    on 127.0.0.1); ``edit`` may change site.yaml's data further."""
    import yaml

    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", str(agents),
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    site_file = directory / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    data.setdefault("trunk", {})["allowed_sources"] = ["127.0.0.2/32"]
    if edit is not None:
        edit(data)
    site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    creds = json.loads((directory / "demo-credentials.json").read_text())
    passwords = {a["user"]: a["password"] for a in creds["accounts"]}
    return Site(directory, creds["realm"], passwords, directory / "edgecc.db")


def query(site: Site, sql: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{site.database}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_for(condition, timeout: float, what: str, running: Running | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = running.log_text()[-3000:] if running is not None else ""
            pytest.fail(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.05)


def log_lines(running: Running, event: str, since: int = 0) -> list[dict[str, str]]:
    """The appliance's log lines with ``event=EVENT`` (after byte offset ``since``)."""
    out = []
    for line in running.log_text()[since:].splitlines():
        if f" event={event} " in line + " ":
            out.append(dict(re.findall(r'(\w+)=("[^"]*"|\S+)', line)))
    return out


def free_port(kind: int = socket.SOCK_DGRAM, even: bool = False) -> int:
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not even or port % 2 == 0 and port < 65534:
            return port
    raise RuntimeError("no free port")


# --------------------------------------------------------------------------- the agent's phone

AGENT_SCRIPT = textwrap.dedent(
    r"""
    import json, queue, sys, threading, time
    import pjsua2 as pj

    user, password, realm, port, logfile, mode, talk, record = sys.argv[1:9]
    events = queue.Queue()

    def say(**kw):
        print(json.dumps(kw), flush=True)

    class Call(pj.Call):
        commanded = False  # dialled on the test's command (a feature code): not "the call"

        def onCallState(self, prm):
            info = self.getInfo()
            events.put(("state", info.state, info.lastStatusCode, self.commanded))

        def onCallMediaState(self, prm):
            info = self.getInfo()
            for i, media in enumerate(info.media):
                if (media.type == pj.PJMEDIA_TYPE_AUDIO
                        and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE):
                    audio = self.getAudioMedia(i)
                    tone.startTransmit(audio)
                    if self.commanded:
                        continue  # a dialled code: not what the phone's recording is about
                    audio.startTransmit(recorder)
                    events.put(("media",))

    class Account(pj.Account):
        def onRegState(self, prm):
            events.put(("reg", prm.code))

        def onIncomingCall(self, prm):
            call = Call(self, prm.callId)
            calls.append(call)
            op = pj.CallOpParam()
            op.statusCode = 180
            call.answer(op)
            events.put(("incoming", call.getInfo().remoteUri))
            if mode == "answer":
                op = pj.CallOpParam()
                op.statusCode = 200
                call.answer(op)

    def read_commands():
        # "dial NUMBER" / "quit" from the test, one a line.
        for line in sys.stdin:
            events.put(("cmd", line.strip()))

    threading.Thread(target=read_commands, daemon=True).start()
    calls = []
    ep = pj.Endpoint()
    ep.libCreate()
    cfg = pj.EpConfig()
    cfg.logConfig.level = 4
    cfg.logConfig.consoleLevel = 0
    cfg.logConfig.filename = logfile
    cfg.uaConfig.userAgent = "pjsua2-edgecc-agent"
    ep.libInit(cfg)
    ep.audDevManager().setNullDev()
    tcfg = pj.TransportConfig()
    # "trunk:NUMBER": the carrier's caller, from 127.0.0.2 (the test site's trunk source).
    trunk = mode.startswith("trunk:")
    tcfg.boundAddress = "127.0.0.2" if trunk else "127.0.0.1"
    tcfg.port = 0
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()
    tone = pj.ToneGenerator()
    tone.createToneGenerator()
    desc = pj.ToneDesc()
    # The caller sends 1000 Hz, 1002 660 Hz, 1003 880 Hz, every other phone 440 Hz.
    desc.freq1, desc.freq2, desc.on_msec, desc.off_msec, desc.volume = (
        1000 if trunk else {"1002": 660, "1003": 880}.get(user, 440)), 0, 1000, 0, 0
    tones = pj.ToneDescVector()
    tones.append(desc)
    tone.play(tones, True)
    recorder = pj.AudioMediaRecorder()
    recorder.createRecorder(record)

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{user}@{realm}"
    acfg.regConfig.registrarUri = "" if trunk else f"sip:127.0.0.1:{port}"
    acfg.regConfig.timeoutSec = 300
    acfg.regConfig.retryIntervalSec = 0
    acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, user, 0, password))
    acc = Account()
    acc.create(acfg)
    if trunk:
        call = Call(acc)
        calls.append(call)
        # "trunk:NUMBER/DIGITS": the menu choice sent on media (default "1").
        number, _, choice = mode[6:].partition("/")
        call.makeCall(f"sip:{number}@127.0.0.1:{port}", pj.CallOpParam(True))
        say(event="dialled", number=number)

    deadline = time.monotonic() + 90
    hangup_at = None
    snippet = None  # (recorder, until): "record PATH SECONDS" in progress
    dtmf_sent = False
    try:
        while True:
            wait = deadline - time.monotonic()
            if hangup_at is not None:
                wait = min(wait, hangup_at - time.monotonic())
            if snippet is not None:
                wait = min(wait, snippet[1] - time.monotonic())
            try:
                event = events.get(timeout=max(0.0, wait))
            except queue.Empty:
                if snippet is not None and time.monotonic() >= snippet[1]:
                    try:
                        calls[-1].getAudioMedia(-1).stopTransmit(snippet[0])
                    except pj.Error:
                        pass  # the stream is already gone: the file holds what was heard
                    snippet = None
                    say(event="recorded")
                    continue
                if hangup_at is not None and time.monotonic() >= hangup_at:
                    hangup_at = None
                    say(event="hanging_up")
                    calls[-1].hangup(pj.CallOpParam())
                    continue
                say(event="timeout")
                break
            if event[0] == "cmd":
                if event[1] == "quit":
                    break
                if event[1] == "hold":
                    calls[-1].setHold(pj.CallOpParam())
                    say(event="holding")
                elif event[1] == "unhold":
                    op = pj.CallOpParam(True)  # default settings: one audio stream
                    op.opt.flag = pj.PJSUA_CALL_UNHOLD
                    calls[-1].reinvite(op)
                    say(event="unholding")
                elif event[1] == "answer":
                    op = pj.CallOpParam(True)
                    op.statusCode = 200
                    calls[-1].answer(op)
                elif event[1] == "hangup":
                    calls[-1].hangup(pj.CallOpParam())
                    say(event="hanging_up")
                elif event[1].startswith("dtmf "):
                    calls[-1].dialDtmf(event[1][5:])  # RFC 4733 events by default
                    say(event="dtmf_sent", digits=event[1][5:])
                elif event[1].startswith("xfer "):
                    # Blind transfer (RFC 3515): REFER to the target.
                    calls[-1].xfer(f"sip:{event[1][5:]}@127.0.0.1:{port}", pj.CallOpParam(True))
                    say(event="transferring", target=event[1][5:])
                elif event[1] == "attxfer":
                    # Attended transfer (RFC 5589 §7): REFER on the first call with Replaces
                    # naming the last one (the consultation the test dialled).
                    calls[-2].xferReplaces(calls[-1], pj.CallOpParam(True))
                    say(event="transferring", kind="attended")
                elif event[1].startswith("record "):
                    # What this phone hears for SECONDS, into PATH (a WAV).
                    _, path, seconds = event[1].split()
                    rec = pj.AudioMediaRecorder()
                    rec.createRecorder(path)
                    snippet = (rec, time.monotonic() + float(seconds))
                    try:
                        calls[-1].getAudioMedia(-1).startTransmit(rec)
                    except pj.Error:
                        pass  # no audio stream yet: the "media" event below connects it
                if event[1].startswith("dial "):
                    call = Call(acc)
                    call.commanded = True
                    calls.append(call)
                    call.makeCall(f"sip:{event[1][5:]}@127.0.0.1:{port}", pj.CallOpParam(True))
                    say(event="dialled", number=event[1][5:])
            elif event[0] == "reg":
                say(event="registered", code=event[1])
                if mode.startswith("dial:") and event[1] == 200 and not calls:
                    # The agent dials out: digest is answered with the account's credentials.
                    call = Call(acc)
                    calls.append(call)
                    call.makeCall(f"sip:{mode[5:]}@127.0.0.1:{port}", pj.CallOpParam(True))
                    say(event="dialled", number=mode[5:])
            elif event[0] == "incoming":
                say(event="incoming", remote=event[1])
            elif event[0] == "media":
                say(event="media")
                if snippet is not None:
                    # The stream was renewed (a 200 after early media, a re-INVITE): keep
                    # recording what the phone hears from the new one.
                    calls[-1].getAudioMedia(-1).startTransmit(snippet[0])
                if trunk and not dtmf_sent:
                    dtmf_sent = True
                    calls[-1].dialDtmf(choice or "1")  # the IVR's menu choice (RFC 4733)
                if mode != "ring" and float(talk) > 0 and hangup_at is None:
                    # The agent talks this long, then hangs up (the peer's behaviour).
                    hangup_at = time.monotonic() + float(talk)
            elif event[0] == "state":
                say(event="state", state=int(event[1]), code=int(event[2]))
                if event[1] == pj.PJSIP_INV_STATE_CONFIRMED:
                    say(event="answered")
                if event[1] == pj.PJSIP_INV_STATE_DISCONNECTED:
                    say(event="disconnected", code=int(event[2]))
                    if mode != "idle" and not event[3]:
                        break
    finally:
        del recorder
        acc.shutdown()
        ep.libDestroy()
        say(event="closed")
    """
)


class Agent:
    """pjsua2 as an agent's SIP phone, in a process of its own (one Endpoint per process)."""

    def __init__(self, tmp: Path, site: Site, port: int, user: str, mode: str,
                 talk: float = 0.0) -> None:
        self.log = tmp / f"pjsua-{user}.log"
        self.recording = tmp / f"agent-{user}.wav"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", AGENT_SCRIPT, user, site.passwords.get(user, ""), site.realm,
             str(port), str(self.log), mode, str(talk), str(self.recording)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.seen: list[dict] = []
        self._cursor = 0

    def command(self, line: str) -> None:
        """Tell the phone to ``dial NUMBER`` or ``quit`` (mode ``idle``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def next(self, event: str, timeout: float = 30.0) -> dict:
        """The first ``event`` said after the one the previous ``next`` returned."""
        deadline = time.monotonic() + timeout
        while True:
            for index in range(self._cursor, len(self.seen)):
                if self.seen[index]["event"] == event:
                    self._cursor = index + 1
                    return self.seen[index]
            line = read_line(self.proc, max(0.0, deadline - time.monotonic()))
            if line.startswith("{"):
                self.seen.append(json.loads(line))
            elif not line:
                pytest.fail(f"agent phone never said {event!r} again; said {self.seen}")

    def wait(self, event: str, timeout: float = 30.0) -> dict:
        """The next line of the script that is ``event`` (earlier ones are kept in ``seen``)."""
        for item in self.seen:
            if item["event"] == event:
                return item
        deadline = time.monotonic() + timeout
        while True:
            line = read_line(self.proc, max(0.0, deadline - time.monotonic()))
            if line.startswith("{"):
                item = json.loads(line)
                self.seen.append(item)
                if item["event"] == event:
                    return item
            elif not line:
                self.close()
                pytest.fail(f"agent phone never said {event!r}; said {self.seen}; "
                            f"{self.proc.stderr.read().decode()[-2000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.command("quit")
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def agent_phone(tmp: Path, site: Site, running: Running, mode: str, talk: float = 0.0,
                user: str = "1001", *, login: bool = True) -> Iterator[Agent]:
    """A registered pjsua2 phone of ``user`` in ``mode``, logged in first (``*70``) unless
    ``login`` is false, the mode dials at once, or the phone is ``idle``."""
    pytest.importorskip("pjsua2")
    mark = len(running.log_text())
    agent = Agent(tmp, site, running.port, user, mode, talk)
    try:
        assert agent.wait("registered")["code"] == 200
        if mode.startswith("dial:") or mode == "idle" or not login:
            yield agent  # the phone dials at once; it may be gone before any login
            return
        # With an agent desk the agent logs in with *70 (403: already logged in); without
        # one, registered agents are logged in (and *70 is no number: 484).
        agent.command("dial *70")
        status = agent.next("disconnected")["code"]

        def logged_in() -> bool:
            if status == 403:
                return True
            return any(e["agent"] == user for e in log_lines(running, "agent_login", mark)) \
                or any(e["agent"] == user and e.get("after") == "available"
                       for e in log_lines(running, "agent_presence", mark))

        wait_for(logged_in, 15, f"agent {user} logged in", running)
        agent.seen.clear()  # the test's own waits start after the login call
        agent._cursor = 0
        yield agent
    finally:
        agent.close()
        if agent.proc.returncode is None:
            agent.proc.kill()


# --------------------------------------------------------------------------- the carrier


def sipp(tmp: Path, running: Running, scenario: str, *, keys: dict[str, str] | None = None,
         service: str = DID, timeout: float = 60, host: str = "127.0.0.2"
         ) -> subprocess.CompletedProcess:
    messages = tmp / f"{scenario}-{time.monotonic_ns()}.messages"
    command = [
        "sipp", f"127.0.0.1:{running.port}", "-sf", str(SIPP_DIR / f"{scenario}.xml"),
        "-s", service, "-m", "1", "-l", "1", "-i", host, "-p", str(free_port()),
        "-mi", host, "-mp", str(free_port(even=True)), "-nostdin",
        "-timeout", f"{int(timeout)}s", "-timeout_error", "-trace_msg",
        "-message_file", str(messages), "-trace_err", "-error_file", str(tmp / "sipp.err"),
    ]
    for name, value in (keys or {}).items():
        command += ["-key", name, value]
    result = subprocess.run(command, capture_output=True, timeout=timeout + 15, cwd=tmp)
    result.messages = messages.read_text(errors="replace") if messages.exists() else ""  # type: ignore[attr-defined]
    return result


def sipp_failed(result: subprocess.CompletedProcess, running: Running) -> str:
    return (f"sipp exit {result.returncode}\n{result.stdout.decode(errors='replace')[-1500:]}\n"
            f"{result.stderr.decode(errors='replace')[-1500:]}\n"
            f"{getattr(result, 'messages', '')[-4000:]}\n--- appliance ---\n"
            f"{running.log_text()[-4000:]}")


def call_record(site: Site, running: Running, since: int) -> dict:
    """The call record of the call that ended after log offset ``since``."""
    line = wait_for(lambda: log_lines(running, "call_ended", since), 30, "the call record",
                    running)[0]
    rows = query(site, "SELECT * FROM call_records WHERE call_id = ?", (line["call"],))
    assert len(rows) == 1
    names = [r[1] for r in query(site, "PRAGMA table_info(call_records)")]
    record = dict(zip(names, rows[0], strict=True))
    record["legs"] = json.loads(record["legs"])
    record["ivr_trace"] = json.loads(record["ivr_trace"])
    record["log"] = line
    return record


def events_of(site: Site, call_id: str) -> list[tuple[int, str, float, dict]]:
    rows = query(site, "SELECT e.seq, e.kind, e.occurred_at, e.payload, o.seq FROM events e "
                       "LEFT JOIN outbox o ON o.seq = e.seq ORDER BY e.seq")
    out = []
    for seq, kind, at, payload, outbox in rows:
        data = json.loads(payload)
        if data.get("call_id") == call_id:
            assert outbox == seq, f"event {seq} {kind} has no outbox row"
            out.append((seq, kind, at, data))
    return out


def channel_rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if pcm.size else 0.0


def decrypt_recording(site: Site, recording_id: str) -> np.ndarray:
    """The recording's stereo samples (frames x 2), decrypted with the site key."""
    from appliance.recording import RecordingStore, load_site_key
    from appliance.store import open_site_db

    db = open_site_db(site.database)
    try:
        store = RecordingStore(db, site.directory / "recordings", load_site_key(site.directory))
        wav = store.read_wav(recording_id)
    finally:
        db.close()
    assert wav[:4] == b"RIFF" and wav[8:12] == b"WAVE"
    channels, rate, bits = int.from_bytes(wav[22:24], "little"), int.from_bytes(
        wav[24:28], "little"), int.from_bytes(wav[34:36], "little")
    assert (channels, rate, bits) == (2, 8000, 16)
    return np.frombuffer(wav[44:], dtype="<i2").reshape(-1, 2)




# --------------------------------------------------------------------------- in-process appliance


class LiveAppliance:
    """The appliance's SIP service, registrar and call control on a loop in a thread of this
    process, so a test can call ``CallService`` methods and see ``on_event``.

    Log lines go to ``log`` in the appliance's key=value format (``log_text``), so the helpers
    written for ``edgecc appliance`` work unchanged; ``port`` is the SIP UDP port.
    """

    def __init__(self, site: Site, log_name: str = "live.log", *, desk: bool = False) -> None:
        self.site = site
        self.with_desk = desk
        self.desk: Any = None
        self.log = site.directory / log_name
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.changed = threading.Condition()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="live-appliance",
                                       daemon=True)
        self.port = 0
        self.calls: Any = None
        self._closers: list[Any] = []
        self._handler: logging.Handler | None = None

    def start(self) -> LiveAppliance:
        from appliance.log import _KeyValueFormatter

        self._handler = logging.FileHandler(self.log)
        self._handler.setFormatter(_KeyValueFormatter())
        edgecc = logging.getLogger("edgecc")
        edgecc.addHandler(self._handler)
        edgecc.setLevel(logging.INFO)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    async def _start(self) -> None:
        import os

        from appliance import eventlog
        from appliance.calls.control import start_call_control
        from appliance.config import load_site
        from appliance.sip.digest import DigestAuthenticator
        from appliance.sip.guard import Guard
        from appliance.sip.registrar import BindingStore, Registrar
        from appliance.sip.service import SipService
        from appliance.store import open_site_db

        config = load_site(self.site.directory)
        db = open_site_db(config.storage.database)
        self._closers.append(db.close)
        eventlog.bind_site(db, config.site.id)
        guard = Guard(config.guard)
        auth = DigestAuthenticator(config.sip.realm, config.sip.accounts_by_user,
                                   nonce_ttl=config.sip.registrar.nonce_ttl,
                                   secret=os.urandom(32))
        bindings = BindingStore(db)
        self._closers.append(lambda: asyncio.to_thread(bindings.close, timeout=1.0))
        registrar = Registrar(config, bindings, auth, guard)
        sip = await SipService.start(config, registrar=registrar, guard=guard)
        self._closers.append(sip.close)
        self.port = sip.addresses["UDP"][1]
        extra: dict[str, Any] = {}
        if self.with_desk:
            from appliance.acd.desk import desk_from_config

            desk_db = open_site_db(config.storage.database)
            self._closers.append(desk_db.close)
            self.desk = desk_from_config(desk_db, config, on_event=self._on_event)[0]
            self._closers.append(lambda: asyncio.to_thread(self.desk.close))
            extra["desk"] = self.desk
        self.calls = await start_call_control(config, sip, registrar=registrar, auth=auth,
                                              guard=guard, on_event=self._on_event, **extra)
        self._closers.append(self.calls.stop)

    fail_kinds: frozenset[str] = frozenset()
    """Event kinds whose callback raises after recording them (a broken consumer)."""

    def _on_event(self, kind: str, payload: dict[str, Any]) -> None:
        with self.changed:
            self.events.append((kind, payload))
            self.changed.notify_all()
        if kind in self.fail_kinds:
            raise RuntimeError(f"consumer of {kind} failed")

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` on the appliance's loop and return its result (or raise its error)."""
        async def call() -> Any:
            return fn(*args, **kwargs)
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def wait_event(self, kind: str, timeout: float = 20.0,
                   match: Callable[[dict[str, Any]], bool] = lambda p: True) -> dict[str, Any]:
        """The first ``on_event`` payload of ``kind`` that ``match``es (bounded wait)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for seen, payload in self.events:
                    if seen == kind and match(payload):
                        return payload
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {kind} event in {timeout} s; saw "
                                f"{[k for k, _ in self.events]}\n{self.log_text()[-3000:]}")
                self.changed.wait(left)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close(self) -> None:
        """Stop everything (once; a second call does nothing)."""
        if not self.thread.is_alive():
            return

        async def stop_all() -> None:
            for closer in reversed(self._closers):
                result = closer()
                if asyncio.iscoroutine(result):
                    await result
        try:
            if self.thread.is_alive():
                asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if self._handler is not None:
                logging.getLogger("edgecc").removeHandler(self._handler)
                self._handler.close()


class Carrier:
    """SIPp as the carrier's server (a UAS scenario from tests/sipp) on a free port."""

    def __init__(self, tmp: Path, scenario: str, *, calls: int = 1, timeout: float = 60,
                 host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port()
        self.messages = tmp / f"{scenario}-{time.monotonic_ns()}.messages"
        self.proc = subprocess.Popen(
            ["sipp", "-sf", str(SIPP_DIR / f"{scenario}.xml"), "-m", str(calls),
             "-i", host, "-p", str(self.port), "-mi", host,
             "-mp", str(free_port(even=True)), "-nostdin", "-timeout", f"{int(timeout)}s",
             "-timeout_error", "-trace_msg", "-message_file", str(self.messages),
             "-trace_err", "-error_file", str(tmp / "sipp-uas.err")],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp)
        self.timeout = timeout

    def finish(self) -> int:
        """Wait for the scenario to end (bounded) and return SIPp's exit code."""
        try:
            return self.proc.wait(self.timeout + 15)
        except subprocess.TimeoutExpired:
            self.close()
            return -1

    def text(self) -> str:
        return self.messages.read_text(errors="replace") if self.messages.exists() else ""

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@contextlib.contextmanager
def carrier_for(tmp: Path, running: Running, port: int, scenario: str, calls: int = 1
                ) -> Iterator[Carrier]:
    """SIPp as the carrier on ``port`` playing ``scenario`` ``calls`` times (``Carrier``) for
    the block; a block that ends without an error must leave the scenario passed (SIPp's exit
    0), and SIPp is gone either way."""
    carrier = Carrier(tmp, scenario, calls=calls, port=port)
    try:
        yield carrier
        assert carrier.finish() == 0, carrier.text()[-3000:] + running.log_text()[-3000:]
    finally:
        carrier.close()


# --------------------------------------------------------------------------- shared call set-up

TRUNK_USER, TRUNK_REALM, TRUNK_PASSWORD = "site-trunk", "carrier.test", "trunk-secret"
"""The digest account SIPp-as-carrier challenges for (tests/sipp/carrier_uas_retry.xml)."""


def with_carrier(data: dict, carrier_port: int) -> None:
    """site.yaml data: calls to numbers go to SIPp on 127.0.0.1:``carrier_port``, whose
    challenge is answered from the trunk account's HA1."""
    import hashlib

    ha1 = hashlib.md5(f"{TRUNK_USER}:{TRUNK_REALM}:{TRUNK_PASSWORD}".encode()).hexdigest()
    data["trunk"].update(carrier={"host": "127.0.0.1", "port": carrier_port},
                         auth={"user": TRUNK_USER, "realm": TRUNK_REALM, "ha1_md5": ha1})


@contextlib.contextmanager
def live_site(directory: Path, edit: Callable[[dict], None] | None = None, *,
              agents: int = 2, **options: Any) -> Iterator[LiveAppliance]:
    """A demo site (``make_site`` with ``agents`` and ``edit``) served by a ``LiveAppliance``
    (``options``: ``desk``, ``log_name``) until the block ends: the body of the call tests'
    module fixtures."""
    pytest.importorskip("pjsua2")
    appliance = LiveAppliance(make_site(directory, agents, edit=edit), **options).start()
    try:
        yield appliance
    finally:
        appliance.close()


@contextlib.contextmanager
def trunk_caller(tmp: Path, live: LiveAppliance, menu: str = "") -> Iterator[tuple[Agent, str]]:
    """A pjsua2 caller from the carrier (127.0.0.2) dialling the demo DID (pressing ``menu``,
    default "1"), with the id of the call it made; hung up and gone when the block ends."""
    with live.changed:
        seen = {p["call_id"] for k, p in live.events if k == "call.offered"}
    caller = Agent(tmp, live.site, live.port, "carrier",
                   f"trunk:{DID}/{menu}" if menu else f"trunk:{DID}")
    try:
        call_id = live.wait_event("call.offered",
                                  match=lambda p: p["call_id"] not in seen)["call_id"]
        yield caller, call_id
    finally:
        caller.close()
        if caller.proc.returncode is None:
            caller.proc.kill()


class ConnectedCall(NamedTuple):
    """A carrier caller talking to an agent, as every transfer test starts: the answering
    agent's phone (1001), another agent's registered phone for the transfer (None when not
    asked for), the carrier's caller (pjsua2 from 127.0.0.2) and call control's call id."""

    agent: Agent
    colleague: Agent | None
    caller: Agent
    call_id: str


@contextlib.contextmanager
def connected_call(tmp: Path, live: LiveAppliance, *, agent_mode: str = "answer",
                   colleague: str | None = "1002", colleague_mode: str = "answer"
                   ) -> Iterator[ConnectedCall]:
    """The shared start of the transfer tests: agent 1001's phone (``agent_mode`` "answer",
    or "idle": answered on command) and ``colleague``'s phone registered, then a carrier
    caller queued to 1001, answered on both sides; every phone gone when the block ends."""
    with contextlib.ExitStack() as stack:
        agent = stack.enter_context(agent_phone(tmp, live.site, live, agent_mode, user="1001"))
        other = None if colleague is None else stack.enter_context(
            agent_phone(tmp, live.site, live, colleague_mode, user=colleague))
        caller, call_id = stack.enter_context(trunk_caller(tmp, live))
        if agent_mode == "idle":
            agent.next("incoming")
            agent.command("answer")
        agent.next("answered")
        caller.next("answered")
        yield ConnectedCall(agent, other, caller, call_id)


def hears(phone: Agent, path: Path, seconds: float = 2.0) -> tuple[np.ndarray, int]:
    """What ``phone`` hears for ``seconds`` (samples, rate); at least half of it recorded."""
    phone.command(f"record {path} {seconds}")
    phone.next("recorded", timeout=seconds + 15)
    samples, rate = read_heard(path)
    assert samples.size > rate * seconds * 0.5, (samples.size, rate)
    return samples, rate


def write_tone_pcap(path: Path, hz: float, seconds: float) -> None:
    """A libpcap file of RTP (RFC 3550 §5.1, PCMA payload type 8 per RFC 3551 §6) carrying a
    sine tone in 20 ms packets, paced by the packets' capture times (SIPp replays by them)."""
    import struct

    from media_core.g711 import alaw_encode

    t = np.arange(int(seconds * 8000)) / 8000
    payload = alaw_encode((0.3 * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16))
    loopback = socket.inet_aton("127.0.0.1")
    with open(path, "wb") as out:
        # Global header: magic, version 2.4, UTC offset, accuracy, snap length, Ethernet.
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(len(payload) // 160):
            rtp = struct.pack("!BBHII", 0x80, 8, i, i * 160, 0x5EED) + payload[
                i * 160:(i + 1) * 160]
            udp = struct.pack("!HHHH", 40000, 40002, 8 + len(rtp), 0) + rtp
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0,
                             loopback, loopback) + udp
            frame = b"\x00" * 12 + b"\x08\x00" + ip
            usec = i * 20_000
            out.write(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame),
                                  len(frame)) + frame)


def read_heard(path: Path) -> tuple[np.ndarray, int]:
    """Samples and rate of a WAV a phone wrote (mono 16-bit; the header's sizes may be stale
    when the phone was still writing, so the data is read to the end of the file)."""
    data = path.read_bytes()
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE", path
    rate = int.from_bytes(data[24:28], "little")
    start = data.find(b"data") + 8
    return np.frombuffer(data[start:len(data) - (len(data) - start) % 2], dtype="<i2"), rate


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency of ``samples``."""
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(samples.size)))
    spectrum[:int(60 * samples.size / rate)] = 0  # ignore DC and hum
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[int(np.argmax(spectrum))])


class HttpRequest(NamedTuple):
    """One POST an ``HttpPeer`` received, and the status it answered."""

    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


Answer = Callable[[str, dict[str, str], bytes, list[HttpRequest]], tuple[int, bytes]]
"""(path, headers, body, the requests received before) -> (status, JSON body or b"")."""


class HttpPeer:
    """A web service on 127.0.0.1 the appliance talks to (a CRM's look-up, a screen-pop or
    webhook receiver): answers each POST through ``answer`` (204 without one) and keeps every
    request, in order."""

    def __init__(self, answer: Answer | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests: list[HttpRequest] = []
        self.changed = threading.Condition()
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server hook's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with peer.changed:
                    status, reply = (answer(self.path, headers, body, list(peer.requests))
                                     if answer is not None else (204, b""))
                    peer.requests.append(HttpRequest(self.path, headers, body, status))
                    peer.changed.notify_all()
                self.send_response(status)
                if reply:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, match: Callable[[HttpRequest], bool], timeout: float = 20.0
             ) -> list[HttpRequest]:
        """Every request ``match`` accepts, once there is one (bounded wait)."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                found = [r for r in self.requests if match(r)]
                if found:
                    return found
                left = deadline - time.monotonic()
                assert left > 0, f"no matching request among {len(self.requests)}"
                self.changed.wait(left)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@contextlib.contextmanager
def http_peer(answer: Answer | None = None) -> Iterator[HttpPeer]:
    """An ``HttpPeer`` for the length of a ``with`` block (or a fixture)."""
    peer = HttpPeer(answer)
    try:
        yield peer
    finally:
        peer.close()
