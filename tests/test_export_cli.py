"""``edgecc export queue-log`` and ``edgecc recordings export`` against a real site directory,
its SQLite database and its encrypted recording store."""

from __future__ import annotations

import io
import time
import wave
from pathlib import Path

import pytest

from appliance import eventlog
from appliance.api import totp
from appliance.api.users import UserStore
from appliance.cli import main
from appliance.config import load_site
from appliance.recording import RecordingStore, load_site_key
from appliance.reporting.events import QueueVerb, read_queue_log
from appliance.reporting.from_log import queue_events_from_db
from appliance.site_init import SiteSpec, create_site
from appliance.store import open_site_db

T0 = 1_764_061_200.0
PASSWORD = "correct horse battery staple 42"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    create_site(tmp_path / "site", SiteSpec(agents=1, tls_port=None))
    return tmp_path / "site"


def site_db(site: Path):
    db = open_site_db(load_site(site).storage.database)
    eventlog.bind_site(db, load_site(site).site.id)
    return db


def fill_log(site: Path) -> None:
    db = site_db(site)
    try:
        with eventlog.transaction(db):
            for i in range(6):
                at = T0 + i * 600
                cid = f"c{i}"
                eventlog.append(db, "queue.enter", {"call_id": cid, "queue": "sales",
                                                    "caller": f"+33{i}"}, occurred_at=at)
                eventlog.append(db, "queue.connect", {"call_id": cid, "queue": "sales",
                                                      "agent": "1001", "wait_s": 7.5},
                                occurred_at=at + 7.5)
                eventlog.append(db, "queue.complete", {"call_id": cid, "queue": "sales",
                                                       "agent": "1001", "talk_s": 90,
                                                       "ended_by": "agent-hung-up"},
                                occurred_at=at + 97.5)
                eventlog.append(db, "call.record", {"call_id": cid}, occurred_at=at + 97.5)
        eventlog.append(db, "agent.pause", {"agent": "1001", "reason": "lunch"},
                        occurred_at=T0 + 4000)
    finally:
        db.conn.close()


# ------------------------------------------------------------------------------ queue_log


def test_queue_log_export_reads_back_identically(site: Path, tmp_path: Path) -> None:
    fill_log(site)
    out = tmp_path / "queue_log"
    assert main(["export", "queue-log", "--site-dir", str(site), "--out", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 6 * 3 + 1
    assert lines[0] == f"{int(T0)}|c0|sales|NONE|ENTERQUEUE||+330"
    db = site_db(site)
    try:
        expected = [e for e in queue_events_from_db(db)]
    finally:
        db.conn.close()
    assert list(read_queue_log(lines, site=load_site(site).site.id)) == expected
    # And `edgecc wfm kpi` reads it.
    assert main(["wfm", "kpi", "--queue-log", str(out), "--scope", "queue", "--json"]) == 0


def test_kpi_report_from_the_site_log(site: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import json

    fill_log(site)
    assert main(["wfm", "kpi", "--site-dir", str(site), "--scope", "queue", "--json"]) == 0
    from_site = json.loads(capsys.readouterr().out)
    out = tmp_path / "queue_log"
    assert main(["export", "queue-log", "--site-dir", str(site), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["wfm", "kpi", "--queue-log", str(out), "--site", load_site(site).site.id,
                 "--scope", "queue", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_site
    assert from_site["anomalies"] == 0
    assert sum(r["answered"] for r in from_site["rows"]) == 6
    assert main(["wfm", "kpi", "--site-dir", str(site), "--since", str(T0 + 1800),
                 "--json"]) == 0
    later = json.loads(capsys.readouterr().out)
    assert sum(r["answered"] for r in later["rows"]) == 3  # c3, c4, c5
    assert main(["wfm", "kpi", "--queue-log", str(out), "--since", str(T0)]) == 2


def test_queue_log_window_to_stdout(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fill_log(site)
    assert main(["export", "queue-log", "--site-dir", str(site),
                 "--since", "2025-11-25T09:10:00", "--until", str(T0 + 1800)]) == 0
    events = list(read_queue_log(capsys.readouterr().out.splitlines()))
    assert [(e.call_id, e.verb) for e in events] == [
        ("c1", QueueVerb.ENTERQUEUE), ("c1", QueueVerb.CONNECT), ("c1", QueueVerb.COMPLETEAGENT),
        ("c2", QueueVerb.ENTERQUEUE), ("c2", QueueVerb.CONNECT), ("c2", QueueVerb.COMPLETEAGENT)]


def test_queue_log_refuses_bad_input_and_loses_nothing(site: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    fill_log(site)
    out = tmp_path / "existing"
    out.write_text("keep me\n")
    assert main(["export", "queue-log", "--site-dir", str(site), "--out", str(out)]) == 2
    assert out.read_text() == "keep me\n"
    with pytest.raises(SystemExit) as exit_:
        main(["export", "queue-log", "--site-dir", str(site), "--since", "yesterday-ish"])
    assert exit_.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err
    db = site_db(site)
    eventlog.append(db, "queue.connect", {"call_id": "x", "wait_s": "late"},
                    occurred_at=T0 + 5000)
    db.conn.close()
    fresh = tmp_path / "fresh"
    assert main(["export", "queue-log", "--site-dir", str(site), "--out", str(fresh)]) == 1
    assert "wait_s" in capsys.readouterr().err
    assert not fresh.exists()
    assert list(tmp_path.glob(".queue_log-*")) == []


# ------------------------------------------------------------------------------ recordings


def make_recording(site: Path, tmp_path: Path) -> tuple[str, bytes]:
    config = load_site(site)
    source = tmp_path / "call.wav"
    frames = bytes(range(256)) * 64
    with wave.open(str(source), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(frames)
    db = open_site_db(config.storage.database)
    key = config.storage.site_key
    store = RecordingStore(db, config.storage.recordings, load_site_key(key.parent, key.name))
    rid = store.import_wav(source, call_id="call-1", caller="+3311", started_at=T0,
                           ended_at=T0 + 2, agent="1001", queue="sales")
    db.conn.close()
    return rid, frames


def add_user(site: Path, name: str, role: str) -> bytes | None:
    users = UserStore.open(load_site(site).storage.database)
    try:
        return users.add_user(name, role, PASSWORD)[1]
    finally:
        users.close()


def audit_rows(site: Path) -> list[tuple[str, str, str]]:
    db = open_site_db(load_site(site).storage.database)
    try:
        return [tuple(r) for r in db.conn.execute(
            "SELECT actor, action, detail FROM audit_log ORDER BY id")]
    finally:
        db.conn.close()


def export(site: Path, rid: str, out: Path, user: str, stdin: str,
           monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return main(["recordings", "export", rid, "--site-dir", str(site), "--out", str(out),
                 "--user", user])


def test_supervisor_exports_a_recording(site: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    rid, frames = make_recording(site, tmp_path)
    secret = add_user(site, "sup", "supervisor")
    assert secret is not None
    out = tmp_path / "out.wav"
    code = totp.totp(secret, time.time())
    assert export(site, rid, out, "sup", f"{PASSWORD}\n{code}\n", monkeypatch) == 0
    with wave.open(str(out), "rb") as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 8000)
        assert w.readframes(w.getnframes()) == frames
    assert out.stat().st_mode & 0o777 == 0o600
    actor, action, detail = audit_rows(site)[-1]
    assert (actor, action) == ("cli:sup", "recording_download")
    assert f"recording={rid}" in detail and "call=call-1" in detail
    # The login's token does not outlive the command.
    db = open_site_db(load_site(site).storage.database)
    assert db.conn.execute("SELECT COUNT(*) FROM api_tokens").fetchone()[0] == 0
    db.conn.close()


def test_wrong_password_agent_role_and_missing_code_are_refused(
        site: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rid, _ = make_recording(site, tmp_path)
    add_user(site, "sup", "supervisor")
    add_user(site, "ann", "agent")
    out = tmp_path / "out.wav"
    assert export(site, rid, out, "sup", "not the password\n123456\n", monkeypatch) == 1
    assert export(site, rid, out, "sup", f"{PASSWORD}\n", monkeypatch) == 1  # no TOTP code
    assert export(site, rid, out, "ann", f"{PASSWORD}\n", monkeypatch) == 1
    assert export(site, rid, out, "nobody", f"{PASSWORD}\n", monkeypatch) == 1
    assert not out.exists()
    refused = [(a, d) for a, act, d in audit_rows(site) if act == "recording_download_refused"]
    assert [a for a, _ in refused] == ["cli:sup", "cli:sup", "cli:ann", "cli:nobody"]
    assert "reason=role" in refused[2][1]
    assert not any(act == "recording_download" for _, act, _ in audit_rows(site))


def test_a_tampered_recording_fails_loudly(site: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rid, _ = make_recording(site, tmp_path)
    secret = add_user(site, "boss", "admin")
    assert secret is not None
    config = load_site(site)
    (path,) = [p for p in Path(config.storage.recordings).rglob("*") if p.is_file()]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    out = tmp_path / "out.wav"
    code = totp.totp(secret, time.time())
    assert export(site, rid, out, "boss", f"{PASSWORD}\n{code}\n", monkeypatch) == 1
    assert "integrity" in capsys.readouterr().err
    assert not out.exists()
    actor, action, detail = audit_rows(site)[-1]
    assert (actor, action) == ("cli:boss", "recording_download_refused")
    assert "reason=integrity" in detail


def test_export_refuses_an_existing_file(site: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rid, _ = make_recording(site, tmp_path)
    out = tmp_path / "out.wav"
    out.write_bytes(b"mine")
    assert export(site, rid, out, "sup", f"{PASSWORD}\n", monkeypatch) == 2
    assert out.read_bytes() == b"mine"
