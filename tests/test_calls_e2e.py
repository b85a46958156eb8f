"""A carrier call through the IVR and a queue to an agent's phone, with real SIP stacks.

``edgecc init --demo`` makes a site whose DID +15550100 runs the starter flow (welcome menu,
"1" -> queue ``support`` with every demo agent); ``edgecc appliance`` runs it on free ports.
The agent is pjsua2 (null audio device, its own process) registered as 1001: it rings, answers
and talks with a 440 Hz tone, or only rings. The carrier is SIPp (tests/sipp/trunk_*.xml):
G.711 A-law offer, "1" as RFC 4733 events from SIPp's dtmf_2833_1.pcap, speech from its
g711a.pcap. The checks read the site database (read-only), the appliance's log lines and the
decrypted recording. Every wait is bounded and waits on an event, never on a fixed sleep.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_register_peers import (
    EDGECC,
    Running,
    Site,
    read_line,
    stop,
)
from test_register_peers import start as start_appliance

ROOT = Path(__file__).resolve().parent.parent
SIPP_DIR = ROOT / "tests" / "sipp"
DID = "+15550100"
CALLER = "+15557654321"
pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(120),
]


# --------------------------------------------------------------------------- site and appliance


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    directory = tmp_path_factory.mktemp("calls-site")
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    creds = json.loads((directory / "demo-credentials.json").read_text())
    passwords = {a["user"]: a["password"] for a in creds["accounts"]}
    return Site(directory, creds["realm"], passwords, directory / "edgecc.db")


@pytest.fixture(scope="module")
def appliance(site: Site) -> Iterator[Running]:
    running = start_appliance(site, "calls.log")
    try:
        yield running
    finally:
        stop(running.proc)


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
    import json, queue, sys, time
    import pjsua2 as pj

    user, password, realm, port, logfile, mode, talk, record = sys.argv[1:9]
    events = queue.Queue()

    def say(**kw):
        print(json.dumps(kw), flush=True)

    class Call(pj.Call):
        def onCallState(self, prm):
            info = self.getInfo()
            events.put(("state", info.state, info.lastStatusCode))

        def onCallMediaState(self, prm):
            info = self.getInfo()
            for i, media in enumerate(info.media):
                if (media.type == pj.PJMEDIA_TYPE_AUDIO
                        and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE):
                    audio = self.getAudioMedia(i)
                    tone.startTransmit(audio)
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
    tcfg.boundAddress = "127.0.0.1"
    tcfg.port = 0
    ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
    ep.libStart()
    tone = pj.ToneGenerator()
    tone.createToneGenerator()
    desc = pj.ToneDesc()
    desc.freq1, desc.freq2, desc.on_msec, desc.off_msec, desc.volume = 440, 0, 1000, 0, 0
    tones = pj.ToneDescVector()
    tones.append(desc)
    tone.play(tones, True)
    recorder = pj.AudioMediaRecorder()
    recorder.createRecorder(record)

    acfg = pj.AccountConfig()
    acfg.idUri = f"sip:{user}@{realm}"
    acfg.regConfig.registrarUri = f"sip:127.0.0.1:{port}"
    acfg.regConfig.timeoutSec = 300
    acfg.regConfig.retryIntervalSec = 0
    acfg.sipConfig.authCreds.append(pj.AuthCredInfo("digest", realm, user, 0, password))
    acc = Account()
    acc.create(acfg)

    deadline = time.monotonic() + 90
    hangup_at = None
    try:
        while True:
            wait = deadline - time.monotonic()
            if hangup_at is not None:
                wait = min(wait, hangup_at - time.monotonic())
            try:
                event = events.get(timeout=max(0.0, wait))
            except queue.Empty:
                if hangup_at is not None and time.monotonic() >= hangup_at:
                    hangup_at = None
                    say(event="hanging_up")
                    calls[-1].hangup(pj.CallOpParam())
                    continue
                say(event="timeout")
                break
            if event[0] == "reg":
                say(event="registered", code=event[1])
            elif event[0] == "incoming":
                say(event="incoming", remote=event[1])
            elif event[0] == "media":
                say(event="media")
                if mode == "answer" and float(talk) > 0 and hangup_at is None:
                    # The agent talks this long, then hangs up (the peer's behaviour).
                    hangup_at = time.monotonic() + float(talk)
            elif event[0] == "state":
                say(event="state", state=int(event[1]), code=int(event[2]))
                if event[1] == pj.PJSIP_INV_STATE_CONFIRMED:
                    say(event="answered")
                if event[1] == pj.PJSIP_INV_STATE_DISCONNECTED:
                    say(event="disconnected", code=int(event[2]))
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
            [sys.executable, "-c", AGENT_SCRIPT, user, site.passwords[user], site.realm,
             str(port), str(self.log), mode, str(talk), str(self.recording)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        self.seen: list[dict] = []

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
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@contextlib.contextmanager
def agent_phone(tmp: Path, site: Site, running: Running, mode: str, talk: float = 0.0,
                user: str = "1001") -> Iterator[Agent]:
    pytest.importorskip("pjsua2")
    mark = len(running.log_text())
    agent = Agent(tmp, site, running.port, user, mode, talk)
    try:
        assert agent.wait("registered")["code"] == 200
        # Registered agents are logged in to the queues (presence follows the binding).
        wait_for(lambda: [e for e in log_lines(running, "agent_login", mark)
                          if e["agent"] == user], 15, f"agent {user} logged in", running)
        yield agent
    finally:
        agent.close()
        if agent.proc.returncode is None:
            agent.proc.kill()


# --------------------------------------------------------------------------- the carrier


def sipp(tmp: Path, running: Running, scenario: str, *, keys: dict[str, str] | None = None,
         service: str = DID, timeout: float = 60) -> subprocess.CompletedProcess:
    messages = tmp / f"{scenario}-{time.monotonic_ns()}.messages"
    command = [
        "sipp", f"127.0.0.1:{running.port}", "-sf", str(SIPP_DIR / f"{scenario}.xml"),
        "-s", service, "-m", "1", "-l", "1", "-i", "127.0.0.1", "-p", str(free_port()),
        "-mi", "127.0.0.1", "-mp", str(free_port(even=True)), "-nostdin",
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


# --------------------------------------------------------------------------- tests


def test_call_reaches_agent_is_recorded_and_written_down(site, appliance, tmp_path) -> None:
    mark = len(appliance.log_text())
    with agent_phone(tmp_path, site, appliance, "answer", talk=2.5) as agent:
        result = sipp(tmp_path, appliance, "trunk_call", keys={"hangup": "agent"})
        assert result.returncode == 0, sipp_failed(result, appliance)
        incoming = agent.wait("incoming")
        assert CALLER in incoming["remote"]
        agent.wait("answered")
        agent.wait("hanging_up")
        agent.wait("disconnected")
        agent.wait("closed")
    # The IVR heard "1" as RFC 4733 events on the caller's leg.
    digits = log_lines(appliance, "dtmf", mark)
    assert [(d["digit"], d["method"]) for d in digits] == [("1", "rfc4733")]
    record = call_record(site, appliance, mark)
    assert record["caller"] == CALLER and record["dialled"] == DID
    assert (record["flow"], record["queue"], record["agent"]) == ("main", "support", "1001")
    assert record["ivr_trace"] == ["welcome", "support"]
    assert record["end_reason"] == "agent-hung-up"
    assert (record["started_at"] <= record["offered_at"] <= record["answered_at"]
            <= record["ended_at"])
    caller_leg, agent_leg = record["legs"]
    assert (caller_leg["party"], caller_leg["direction"]) == ("caller", "inbound")
    assert (agent_leg["party"], agent_leg["direction"], agent_leg["agent"]) == (
        "agent", "outbound", "1001")
    assert agent_leg["end_reason"] == "agent-hung-up"
    assert agent_leg["answered_at"] is not None and caller_leg["answered_at"] is not None
    # Queue events and the call record, in order, each with its outbox row.
    events = events_of(site, record["call_id"])
    assert [e[1] for e in events] == ["queue.enter", "queue.connect", "queue.complete",
                                      "call.record"]
    times = [e[2] for e in events]
    assert times == sorted(times)
    assert events[1][3]["agent"] == "1001" and events[2][3]["ended_by"] == "agent-hung-up"
    assert events[3][3]["recording_id"] == record["recording_id"]
    # Stereo recording, encrypted at rest: the caller's speech on the left channel, the
    # agent's 440 Hz tone on the right.
    assert record["recording_id"]
    stereo = decrypt_recording(site, record["recording_id"])
    assert stereo.shape[0] > 8000  # over a second of call
    caller, agent_side = stereo[:, 0], stereo[:, 1]
    assert channel_rms(caller) > 100, channel_rms(caller)
    spectrum = np.abs(np.fft.rfft(agent_side.astype(np.float64)))
    freqs = np.fft.rfftfreq(agent_side.size, 1 / 8000)
    assert abs(freqs[int(np.argmax(spectrum))] - 440) < 10
    assert channel_rms(agent_side) > 100
    # The bridge carried the caller to the agent: the phone's own recording holds speech.
    with wave.open(str(agent.recording), "rb") as heard:
        samples = np.frombuffer(heard.readframes(heard.getnframes()), dtype="<i2")
    assert channel_rms(samples) > 100, channel_rms(samples)
    # No plaintext audio is left behind.
    assert not list((site.directory / "recordings").rglob("*.wav"))
    legs_after = int(record["log"]["legs_active"])
    assert legs_after == 0


def test_caller_hangs_up_after_talking(site, appliance, tmp_path) -> None:
    mark = len(appliance.log_text())
    with agent_phone(tmp_path, site, appliance, "answer", talk=0) as agent:
        result = sipp(tmp_path, appliance, "trunk_call", keys={"hangup": "caller"})
        assert result.returncode == 0, sipp_failed(result, appliance)
        agent.wait("answered")
        assert agent.wait("disconnected")
    record = call_record(site, appliance, mark)
    assert record["end_reason"] == "caller-hung-up"
    assert record["legs"][1]["end_reason"] == "caller-hung-up"
    kinds = [e[1] for e in events_of(site, record["call_id"])]
    assert kinds == ["queue.enter", "queue.connect", "queue.complete", "call.record"]
    assert int(record["log"]["legs_active"]) == 0


def test_cancel_while_agent_rings_cancels_the_agent_leg(site, appliance, tmp_path) -> None:
    mark = len(appliance.log_text())
    with agent_phone(tmp_path, site, appliance, "ring") as agent:
        result = sipp(tmp_path, appliance, "trunk_cancel")
        assert result.returncode == 0, sipp_failed(result, appliance)
        assert "SIP/2.0 487" in result.messages
        agent.wait("incoming")
        gone = agent.wait("disconnected")
        assert gone["code"] == 487  # the agent's INVITE was cancelled, never answered
        assert "answered" not in [e["event"] for e in agent.seen]
    record = call_record(site, appliance, mark)
    assert record["end_reason"] == "cancelled"
    assert record["answered_at"] is None and record["agent"] is None
    assert record["recording_id"] is None
    caller_leg, agent_leg = record["legs"]
    assert caller_leg["end_reason"] == "cancelled"
    assert agent_leg["end_reason"] == "caller-hung-up" and agent_leg["answered_at"] is None
    kinds = [e[1] for e in events_of(site, record["call_id"])]
    assert kinds == ["queue.enter", "queue.abandon", "call.record"]
    # Both engine legs were released: nothing dangles.
    assert int(record["log"]["legs_active"]) == 0


@pytest.mark.parametrize(
    ("service", "codec_pt", "codec_map", "status"),
    [
        (DID, "18", "18 G729/8000", 488),
        ("+15550199", "8", "8 PCMA/8000", 404),
    ],
    ids=["g729-only-488", "unknown-did-404"],
)
def test_refused_calls(site, appliance, tmp_path, service, codec_pt, codec_map, status) -> None:
    mark = len(appliance.log_text())
    result = sipp(tmp_path, appliance, "trunk_refused", service=service,
                  keys={"codec_pt": codec_pt, "codec_map": codec_map})
    assert result.returncode == 0, sipp_failed(result, appliance)
    finals = re.findall(r"^SIP/2.0 (\d{3})", result.messages, re.M)
    assert finals and finals[-1] == str(status), finals
    refused = log_lines(appliance, "call_refused", mark)
    assert [r["reason"] for r in refused] == [
        "no-common-codec" if status == 488 else "unknown-did"]
    # Refused before any call existed: no record, no engine leg left.
    assert not log_lines(appliance, "call_started", mark)


@pytest.fixture(scope="module")
def short_ring_appliance(tmp_path_factory) -> Iterator[tuple[Site, Running]]:
    """A second site whose queue rings each agent for 1.5 s, in member order (linear)."""
    import yaml

    directory = tmp_path_factory.mktemp("calls-ring-site")
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    site_file = directory / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    data["queues"][0].update(strategy="linear", ring_timeout=1.5, record=False)
    site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    creds = json.loads((directory / "demo-credentials.json").read_text())
    passwords = {a["user"]: a["password"] for a in creds["accounts"]}
    site = Site(directory, creds["realm"], passwords, directory / "edgecc.db")
    running = start_appliance(site, "calls.log")
    try:
        yield site, running
    finally:
        stop(running.proc)


def test_ring_timeout_offers_the_next_agent(short_ring_appliance, tmp_path) -> None:
    site, running = short_ring_appliance
    mark = len(running.log_text())
    with agent_phone(tmp_path, site, running, "ring", user="1001") as first, \
            agent_phone(tmp_path, site, running, "answer", talk=1.0, user="1002") as second:
        result = sipp(tmp_path, running, "trunk_call", keys={"hangup": "agent"})
        assert result.returncode == 0, sipp_failed(result, running)
        first.wait("incoming")
        assert first.wait("disconnected")["code"] == 487  # rang out: cancelled by us
        second.wait("answered")
        second.wait("disconnected")
    record = call_record(site, running, mark)
    assert record["agent"] == "1002" and record["end_reason"] == "agent-hung-up"
    assert record["recording_id"] is None  # this queue does not record
    caller_leg, rang_out, answered = record["legs"]
    assert rang_out["agent"] == "1001" and rang_out["end_reason"] == "no-answer"
    assert answered["agent"] == "1002" and answered["answered_at"] is not None
    assert rang_out["started_at"] < answered["started_at"]
    offers = [e["agent"] for e in log_lines(running, "agent_offered", mark)]
    assert offers == ["1001", "1002"]


def test_agent_invites_need_digest_and_have_no_outbound_route_yet(site, appliance) -> None:
    from test_register_peers import raw_phone

    from appliance.sip.digest import answer_challenge

    # 127.0.0.3 is not in trunk.allowed_sources: an INVITE from there is an agent's own call.
    with raw_phone("127.0.0.3", appliance, site) as phone:
        contact = (f"Contact: <sip:1002@{phone.host}:{phone.port}>",)
        first = phone.response(phone.send("INVITE", "1002", contact), 5)
        assert first is not None and first.status == 401
        challenge = next(v for n, v in first.headers if n == "WWW-Authenticate")
        wrong = answer_challenge(challenge, method="INVITE", uri=f"sip:{site.realm}",
                                 username="1002", password="not-the-password")
        refused = phone.response(phone.send("INVITE", "1002", (*contact,
                                                               f"Authorization: {wrong}")), 5)
        assert refused is not None and refused.status == 401
        auth = answer_challenge(challenge, method="INVITE", uri=f"sip:{site.realm}",
                                username="1002", password=site.passwords["1002"])
        final = phone.response(phone.send("INVITE", "1002", (*contact,
                                                             f"Authorization: {auth}")), 5)
    assert final is not None and (final.status, final.reason) == (403, "No Outbound Route")


# --------------------------------------------------------------------------- bad configuration


def test_bad_call_configuration_is_refused_with_clear_errors(tmp_path) -> None:
    import yaml

    from appliance.config import ConfigError, parse_site_yaml

    directory = tmp_path / "site"
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "2",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    site_file = directory / "site.yaml"
    good = site_file.read_text()
    data = yaml.safe_load(good)

    # Schema errors name the key path: an unknown member, a duplicate queue, a bad strategy.
    broken = json.loads(json.dumps(data))
    broken["queues"][0]["members"].append("4711")
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(yaml.safe_dump(broken, sort_keys=False))
    text = str(caught.value)
    assert "queues[0].members[2]: expected the user of a sip.accounts entry, got '4711'" in text
    broken = json.loads(json.dumps(data))
    broken["queues"].append({"name": "support"})
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(yaml.safe_dump(broken, sort_keys=False))
    assert "queues[1].name: expected a unique queue name, 'support' is already queues[0]" in (
        str(caught.value))

    broken = json.loads(json.dumps(data))
    broken["queues"][0]["strategy"] = "fastest"
    broken["ivr"]["dids"]["not a number"] = "main"
    with pytest.raises(ConfigError) as caught:
        parse_site_yaml(yaml.safe_dump(broken, sort_keys=False))
    assert "queues[0].strategy: expected one of ring-all" in str(caught.value)
    assert "ivr.dids: expected a dialled number" in str(caught.value)

    # Flow errors (unknown prompt, unknown queue) and a DID naming no flow stop the start,
    # each problem listed with its line; nothing is changed.
    broken = json.loads(json.dumps(data))
    nodes = broken["ivr"]["flows"]["main"]["nodes"]
    nodes["welcome"]["prompt"] = "welcom"
    nodes["support"]["queue"] = "suport"
    site_file.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = subprocess.run([str(EDGECC), "appliance", "--site-dir", str(directory)],
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    err = result.stderr.decode()
    assert "cannot start" in err and "unknown queue 'suport'" in err and "welcom" in err
    assert re.search(r"site\.yaml:\d+: flow 'main' node 'support'", err), err

    broken = json.loads(json.dumps(data))
    broken["ivr"]["dids"]["+15550111"] = "sales"
    site_file.write_text(yaml.safe_dump(broken, sort_keys=False))
    result = subprocess.run([str(EDGECC), "appliance", "--site-dir", str(directory)],
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    assert "ivr.dids: '+15550111' names flow 'sales', which is not defined" in (
        result.stderr.decode())
    assert not (directory / "recordings").exists()


def test_flows_from_a_file_and_prompts_from_a_directory(tmp_path) -> None:
    import yaml

    from appliance.calls.control import load_call_path
    from appliance.config import load_site
    from media_core.prompt import PromptFormatError

    directory = tmp_path / "site"
    subprocess.run(
        [str(EDGECC), "init", "--demo", "--site-dir", str(directory), "--agents", "1",
         "--sip-port", "0", "--no-tls", "--http-port", "0"],
        check=True, capture_output=True, timeout=60,
    )
    site_file = directory / "site.yaml"
    data = yaml.safe_load(site_file.read_text())
    (directory / "flows.yaml").write_text(yaml.safe_dump({"flows": data["ivr"]["flows"]}))
    prompts = directory / "prompts"
    prompts.mkdir()
    shipped = ROOT / "appliance" / "data" / "prompts"
    for name in ("welcome", "invalid", "no_input", "goodbye"):
        (prompts / f"{name}.wav").write_bytes((shipped / f"{name}.wav").read_bytes())
    data["ivr"]["flows"] = "flows.yaml"
    data["ivr"]["prompts"] = "prompts"
    site_file.write_text(yaml.safe_dump(data, sort_keys=False))
    flows, loaded = load_call_path(load_site(directory))
    assert list(flows) == ["main"] and sorted(loaded) == ["goodbye", "invalid", "no_input",
                                                         "welcome"]
    assert all(p.dtype == np.int16 and p.size > 8000 for p in loaded.values())
    # A prompt that is not 16-bit mono PCM is named, not half-loaded.
    (prompts / "welcome.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    with pytest.raises(PromptFormatError, match="welcome.wav"):
        load_call_path(load_site(directory))
