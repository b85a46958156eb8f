"""Recordings at rest: segment encryption, key wrapping, the index, retention, erasure, export.

Real files and a real site database (appliance.store.open_site_db); a real process killed with
SIGKILL mid-recording for the crash case.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils

from appliance.recording import (
    IncompleteRecording,
    KeyUnwrapError,
    RecordingErased,
    RecordingStore,
    SegmentReader,
    SegmentWriter,
    SiteKeyError,
    TamperedRecording,
    ensure_schema,
    load_site_key,
)
from appliance.recording.crypto import HEADER_BYTES, new_data_key, unwrap_key, wrap_key
from appliance.store import open_site_db

RID = "3f1c0d6e9a5b4c7d8e2f1a0b9c8d7e6f"
SEG = 64


def encrypt(data: bytes, key: bytes, rid: str = RID, seg: int = SEG) -> bytes:
    buf = io.BytesIO()
    writer = SegmentWriter(buf, key, rid, segment_bytes=seg)
    # Feed in uneven pieces so segment boundaries fall inside writes.
    for i in range(0, len(data), 37):
        writer.write(data[i:i + 37])
    buf.close = lambda: None  # type: ignore[method-assign]  # keep the bytes readable
    writer.close()
    return buf.getvalue()


def decrypt(blob: bytes, key: bytes, rid: str = RID) -> bytes:
    return SegmentReader(io.BytesIO(blob), key, rid).read_all()


def segment_offsets(blob: bytes) -> list[tuple[int, int]]:
    out, pos = [], HEADER_BYTES
    while pos < len(blob):
        length = int.from_bytes(blob[pos:pos + 4], "little")
        out.append((pos, 4 + length))
        pos += 4 + length
    return out


@pytest.fixture
def key() -> bytes:
    return new_data_key()


@pytest.mark.parametrize("size", [0, 1, SEG - 1, SEG, SEG + 1, 3 * SEG, 5 * SEG + 17])
def test_round_trip(key: bytes, size: int) -> None:
    data = os.urandom(size)
    blob = encrypt(data, key)
    assert size < 16 or data[:16] not in blob     # no plaintext in the file
    assert decrypt(blob, key) == data
    # One segment per full SEG bytes plus the final one (empty when the data ends on a boundary).
    assert len(segment_offsets(blob)) == size // SEG + 1


def test_every_flipped_bit_is_detected(key: bytes) -> None:
    data = os.urandom(2 * SEG + 10)
    blob = encrypt(data, key)
    for pos in range(len(blob)):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        delivered = bytearray()
        with pytest.raises(TamperedRecording):
            for chunk in SegmentReader(io.BytesIO(bytes(bad)), key, RID):
                delivered += chunk
        # Nothing unauthentic is ever handed out: only a prefix of the real plaintext.
        assert data.startswith(bytes(delivered))


def test_truncation_keeps_complete_segments_then_flags_the_tail(key: bytes) -> None:
    data = os.urandom(3 * SEG + 5)
    blob = encrypt(data, key)
    segments = segment_offsets(blob)
    final_start = segments[-1][0]
    for cut in range(len(blob)):
        reader = SegmentReader(io.BytesIO(blob[:cut]), key, RID) if cut >= HEADER_BYTES else None
        if reader is None:
            with pytest.raises(IncompleteRecording):
                SegmentReader(io.BytesIO(blob[:cut]), key, RID)
            continue
        got = bytearray()
        with pytest.raises(IncompleteRecording) as info:
            for chunk in reader:
                got += chunk
        whole = sum(1 for start, length in segments if start + length <= cut)
        assert info.value.segments == whole
        assert bytes(got) == data[: whole * SEG]
        assert cut < final_start + segments[-1][1]


def test_swapped_dropped_duplicated_segments_are_detected(key: bytes) -> None:
    data = os.urandom(3 * SEG + 5)
    blob = encrypt(data, key)
    parts = [blob[s:s + n] for s, n in segment_offsets(blob)]
    head = blob[:HEADER_BYTES]
    variants = {
        "swapped": head + parts[1] + parts[0] + b"".join(parts[2:]),
        "dropped": head + parts[0] + b"".join(parts[2:]),
        "duplicated": head + parts[0] + parts[0] + b"".join(parts[1:]),
        "final moved": head + parts[0] + parts[-1],
        "appended": blob + parts[-1],
    }
    for name, variant in variants.items():
        with pytest.raises(TamperedRecording):
            decrypt(variant, key)
        assert name  # each variant checked
    # A segment of another file (same key, another recording's header) does not fit either.
    other = encrypt(data, key)
    mixed = head + parts[0] + b"".join(p for p in [other[s:s + n] for s, n in
                                                 segment_offsets(other)][1:])
    with pytest.raises(TamperedRecording):
        decrypt(mixed, key)


def test_wrong_recording_id_or_key_is_refused(key: bytes) -> None:
    blob = encrypt(b"hello caller", key)
    with pytest.raises(TamperedRecording, match="fails authentication"):
        decrypt(blob, key, rid="another-recording")
    with pytest.raises(TamperedRecording):
        decrypt(blob, new_data_key())
    site = os.urandom(32)
    wrapped = wrap_key(site, key, RID)
    assert unwrap_key(site, wrapped, RID) == key
    with pytest.raises(KeyUnwrapError):
        unwrap_key(site, wrapped, "another-recording")      # key moved to another recording
    with pytest.raises(KeyUnwrapError):
        unwrap_key(os.urandom(32), wrapped, RID)            # another site's key
    with pytest.raises(KeyUnwrapError, match="format"):
        unwrap_key(site, wrapped[:-1], RID)


def test_site_key_file_checks(tmp_path: Path) -> None:
    with pytest.raises(SiteKeyError, match="missing"):
        load_site_key(tmp_path)
    path = tmp_path / "site.key"
    path.write_bytes(os.urandom(31))
    path.chmod(0o600)
    with pytest.raises(SiteKeyError, match="31 bytes"):
        load_site_key(tmp_path)
    path.write_bytes(os.urandom(32))
    path.chmod(0o644)
    with pytest.raises(SiteKeyError, match="chmod 600"):
        load_site_key(tmp_path)
    path.chmod(0o600)
    assert load_site_key(tmp_path) == path.read_bytes()


# ---- the store -------------------------------------------------------------------------------

T0 = 1_760_000_000.0
DAY = 86400.0


@pytest.fixture
def site(tmp_path: Path) -> tuple[sqlite_utils.Database, Path, bytes]:
    key = os.urandom(32)
    (tmp_path / "site.key").write_bytes(key)
    (tmp_path / "site.key").chmod(0o600)
    db = open_site_db(tmp_path / "edgecc.db")
    yield db, tmp_path, key
    db.conn.close()


def store_for(site: tuple[sqlite_utils.Database, Path, bytes], **kw: object) -> RecordingStore:
    db, directory, _ = site
    return RecordingStore(db, directory / "recordings", load_site_key(directory),
                          segment_bytes=3200, **kw)  # type: ignore[arg-type]


def stereo(seconds: float, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return rng.integers(-20000, 20000, size=int(8000 * seconds) * 2, dtype=np.int16).tobytes()


def record(store: RecordingStore, caller: str, started: float, pcm: bytes, **kw: object) -> str:
    rec = store.start(call_id=f"call-{started}", caller=caller, started_at=started,
                      agent="1001", queue="sales", **kw)  # type: ignore[arg-type]
    for i in range(0, len(pcm), 320):   # 20 ms stereo packets
        rec.write(pcm[i:i + 320])
    rec.close(ended_at=started + 60)
    return rec.id


def test_store_round_trip_as_wav(site) -> None:  # type: ignore[no-untyped-def]
    store = store_for(site)
    pcm = stereo(1.3, 1)
    rid = record(store, "+15550001", T0, pcm)
    info = store.get(rid)
    assert (info.caller, info.agent, info.queue, info.ended_at) == ("+15550001", "1001", "sales",
                                                                    T0 + 60)
    assert info.path.startswith("2025/10/09/")
    raw = store.path_of(rid).read_bytes()
    assert pcm[:320] not in raw
    with wave.open(io.BytesIO(store.read_wav(rid))) as w:
        assert (w.getnchannels(), w.getframerate(), w.getsampwidth()) == (2, 8000, 2)
        assert w.readframes(w.getnframes()) == pcm
    # The file only opens with this recording's row: the index holds the only wrapped key.
    assert info.id not in raw.decode("latin-1")


def test_ensure_schema_on_a_bare_database(tmp_path: Path) -> None:
    db = sqlite_utils.Database(tmp_path / "bare.db")
    ensure_schema(db)
    ensure_schema(db)   # idempotent
    assert {"recordings", "audit_log"} <= set(db.table_names())
    cols = [c.name for c in db["recordings"].columns]
    assert cols == ["id", "call_id", "caller", "agent", "queue", "started_at", "ended_at", "path",
                    "wrapped_key", "legal_hold", "erased_at"]


CRASH_WRITER = r"""
import os, sys
from pathlib import Path
from appliance.store import open_site_db
from appliance.recording import RecordingStore, load_site_key
site = Path(sys.argv[1])
store = RecordingStore(open_site_db(site / "edgecc.db"), site / "recordings",
                       load_site_key(site), segment_bytes=3200)
rec = store.start(call_id="crash", caller="+15550009", started_at=1760000000.0)
pcm = bytes(range(256)) * 40          # 10240 bytes: 3 full segments of 3200 and 640 over
rec.write(pcm)
print(rec.id, flush=True)
sys.stdin.read()                      # wait to be killed
"""


def test_crash_loses_at_most_the_last_segment(site) -> None:  # type: ignore[no-untyped-def]
    db, directory, _ = site
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_WRITER, str(directory)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        rid = proc.stdout.readline().strip()   # type: ignore[union-attr]
        assert rid, "writer did not start"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    store = store_for(site)
    header_and_pcm = 44 + 10240
    with pytest.raises(IncompleteRecording) as info:
        store.read_wav(rid)
    assert info.value.segments == 3
    partial = store.read_wav(rid, allow_incomplete=True)
    assert len(partial) == 3 * 3200                  # the WAV header is inside segment 0
    assert partial[44:] == (bytes(range(256)) * 40)[: 3 * 3200 - 44]
    assert header_and_pcm - len(partial) < 3200      # lost less than one segment
    assert store.recover(now=T0 + 100) == [rid]
    assert store.get(rid).ended_at == T0 + 100
    assert store.read_wav(rid) == partial           # now complete, same audio
    assert store.recover(now=T0 + 200) == []


def test_erasure_destroys_keys_everywhere(site) -> None:  # type: ignore[no-untyped-def]
    db, directory, _ = site
    store = store_for(site)
    caller = "+15550002"
    a = record(store, caller, T0, stereo(0.5, 2))
    b = record(store, caller, T0 + DAY, stereo(0.5, 3))
    held = record(store, caller, T0 + 2 * DAY, stereo(0.5, 4))
    other = record(store, "+15550003", T0, stereo(0.5, 5))
    store.set_legal_hold(held, True, actor="legal", now=T0 + 3 * DAY)
    # b is a voicemail message: its index row names the caller and the flow's variables.
    with db.conn:
        db.conn.execute("INSERT INTO voicemail_messages (recording_id, call_id, mailbox, caller,"
                        " variables, duration_s, left_at) VALUES (?, 'c-vm', 'sales', ?, ?, 3, ?)",
                        (b, caller, '{"account": "A-17"}', T0 + DAY))
    backup = store.path_of(a).read_bytes()           # a copy, as a backup would hold
    wrapped = [db.conn.execute("SELECT wrapped_key FROM recordings WHERE id=?", (r,)).fetchone()[0]
               for r in (a, b)]

    report = store.erase_caller(caller, actor="dpo", now=T0 + 4 * DAY)
    assert sorted(report.erased) == sorted([a, b]) and report.held == (held,)
    for rid in (a, b):
        with pytest.raises(RecordingErased):
            store.read_wav(rid)
        assert not (directory / "recordings" / store.get(rid).path).exists()
        assert store.get(rid).erased_at == T0 + 4 * DAY and store.get(rid).caller is None
    # The backup copy cannot be decrypted: no wrapped key is left in the database files.
    on_disk = b"".join(p.read_bytes() for p in directory.glob("edgecc.db*"))
    for w in wrapped:
        assert bytes(w) not in on_disk
    with pytest.raises(TamperedRecording):
        decrypt(backup, new_data_key(), a)
    assert db.conn.execute("SELECT caller, variables FROM voicemail_messages").fetchall() == [
        (None, "{}")]
    assert store.read_wav(held)                      # legal hold kept
    assert store.read_wav(other)                     # other callers untouched
    rows = db.conn.execute("SELECT actor, action, detail FROM audit_log "
                           "WHERE action LIKE 'recording_%' ORDER BY id").fetchall()
    assert [r[1] for r in rows] == ["recording_legal_hold", "recording_erasure"]
    assert rows[1][0] == "dpo" and "recordings=2 held=1" in rows[1][2]
    assert caller not in rows[1][2]                  # the audit row does not repeat the number
    assert store.erase_caller(caller, actor="dpo", now=T0 + 5 * DAY).erased == ()


def test_retention_skips_legal_hold(site) -> None:  # type: ignore[no-untyped-def]
    store = store_for(site)
    old = record(store, "+1", T0, stereo(0.1, 6))
    old_held = record(store, "+2", T0 + 1, stereo(0.1, 7))
    recent = record(store, "+3", T0 + 40 * DAY, stereo(0.1, 8))
    store.set_legal_hold(old_held, True, actor="legal", now=T0)
    now = T0 + 45 * DAY
    assert store.apply_retention(now=now, max_age=30 * DAY) == [old]
    with pytest.raises(RecordingErased):
        store.read_wav(old)
    assert store.get(old).caller == "+1"             # retention keeps the index row as it was
    assert store.read_wav(old_held) and store.read_wav(recent)
    assert store.apply_retention(now=now, max_age=30 * DAY) == []
    store.set_legal_hold(old_held, False, actor="legal", now=now)
    assert store.apply_retention(now=now, max_age=30 * DAY) == [old_held]


def test_export_of_one_caller(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    db, directory, _ = site
    store = store_for(site)
    caller = "+15550004"
    pcm1, pcm2 = stereo(0.7, 9), stereo(0.3, 10)
    r1 = record(store, caller, T0, pcm1)
    r2 = record(store, caller, T0 + 10, pcm2)
    bad = record(store, caller, T0 + 20, stereo(0.3, 11))
    record(store, "+15550005", T0, stereo(0.3, 12))
    path = store.path_of(bad)
    data = bytearray(path.read_bytes())
    data[HEADER_BYTES + 10] ^= 0xFF
    path.write_bytes(bytes(data))

    report = store.export_caller(caller, tmp_path / "export", actor="dpo", now=T0 + DAY)
    assert report.exported == (r1, r2) and report.failed == (bad,)
    manifest = json.loads(report.manifest.read_text())
    assert manifest["caller"] == caller
    entries = {e["id"]: e for e in manifest["recordings"]}
    assert set(entries) == {r1, r2, bad}
    assert entries[bad]["status"] == "unreadable" and "authentication" in entries[bad]["error"]
    for rid, pcm in ((r1, pcm1), (r2, pcm2)):
        e = entries[rid]
        assert e["status"] == "exported" and e["queue"] == "sales" and e["agent"] == "1001"
        with wave.open(str(report.directory / e["file"])) as w:
            assert w.readframes(w.getnframes()) == pcm
        assert "wrapped_key" not in e and "path" not in e
    assert sorted(p.name for p in report.directory.iterdir()) == sorted(
        ["manifest.json", f"{r1}.wav", f"{r2}.wav"])
    row = db.conn.execute("SELECT actor, action, detail FROM audit_log WHERE id=?",
                          (report.audit_id,)).fetchone()
    assert row[:2] == ("dpo", "recording_export") and "exported=2 failed=1" in row[2]
    with pytest.raises(FileExistsError):
        store.export_caller(caller, tmp_path / "export", actor="dpo", now=T0 + DAY)


def test_import_of_the_media_recorders_wav(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from media_core.recorder import StereoRecorder

    store = store_for(site)
    plain = tmp_path / "call.wav"
    caller_side = np.arange(8000, dtype=np.int16)
    agent_side = -np.arange(8000, dtype=np.int16)
    with StereoRecorder(plain) as rec:
        rec.feed("caller", caller_side)
        rec.feed("agent", agent_side)
    rid = store.import_wav(plain, call_id="c9", caller="+15550007", started_at=T0,
                           ended_at=T0 + 1)
    assert not plain.exists()
    with wave.open(io.BytesIO(store.read_wav(rid))) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, 2)
    assert np.array_equal(frames[:, 0], caller_side) and np.array_equal(frames[:, 1], agent_side)
    not_wav = tmp_path / "x.txt"
    not_wav.write_bytes(b"hello world, not audio")
    with pytest.raises(ValueError, match="not a WAV"):
        store.import_wav(not_wav, call_id="c10", caller="+1", started_at=T0, ended_at=T0)
    assert not_wav.exists()


def test_recover_closes_a_row_whose_file_never_reached_disk(site) -> None:  # type: ignore[no-untyped-def]
    store = store_for(site)
    rec = store.start(call_id="gone", caller="+1", started_at=T0)
    rec._writer.abandon()
    store.path_of(rec.id).unlink()
    fresh = store_for(site)                      # as after a restart
    assert fresh.recover(now=T0 + 5) == []
    assert fresh.get(rec.id).ended_at == T0 + 5
    with pytest.raises(FileNotFoundError):
        fresh.read_wav(rec.id)
