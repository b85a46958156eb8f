"""Config push applied: verified, staged, validated, swapped atomically, or refused.

A real site from `edgecc init`, a real cloud CA, a real site database. The last test runs the
whole path: `CloudServer.push_config` -> the edge agent process -> ConfigApplied recorded by
the cloud.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proto.build import ensure_generated

ensure_generated()

from appliance.config import load_site  # noqa: E402
from appliance.store import open_site_db  # noqa: E402
from cloud_bridge.ca import CertificateAuthority  # noqa: E402
from edge_agent.config_apply import (  # noqa: E402
    PREVIOUS_FILE,
    STAGING_DIR,
    apply_config,
    running_config_version,
)

SITE = "demo"
RACE_ROUNDS = 6
"""Push-against-edit races run (each a few hundred ms)."""
EDGECC = str(Path(sys.executable).parent / "edgecc")


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "site"
    done = subprocess.run([EDGECC, "init", "--demo", "--site-dir", str(directory), "--sip-port",
                           "0", "--http-port", "0", "--agents", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    open_site_db(directory / "edgecc.db").conn.close()
    return directory


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


def _renamed(site: Path, name: str) -> bytes:
    text = (site / "site.yaml").read_text()
    assert "name: Demo site\n" in text
    return text.replace("name: Demo site\n", f"name: {name}\n").encode()


def _apply(site: Path, ca: CertificateAuthority, version: int, text: bytes, *,
           signature: bytes | None = None, signed_for: str = SITE) -> tuple[bool, str]:
    db = open_site_db(site / "edgecc.db")
    try:
        result = apply_config(
            site, db, ca_pem=ca.certificate_pem, site_id=SITE, version=version, text=text,
            signature=signature if signature is not None else ca.sign_config(signed_for,
                                                                             version, text),
            now=1000.0 + version,
        )
        assert result.version == version
        return result.ok, result.error
    finally:
        db.conn.close()


def _running(site: Path) -> int:
    db = open_site_db(site / "edgecc.db")
    try:
        return running_config_version(db)
    finally:
        db.conn.close()


def test_a_signed_valid_config_is_swapped_in_keeping_the_previous(
    site: Path, ca: CertificateAuthority
) -> None:
    before = (site / "site.yaml").read_bytes()
    mode = (site / "site.yaml").stat().st_mode & 0o777
    new = _renamed(site, "Demo site v1")
    assert _apply(site, ca, 1, new) == (True, "")
    assert (site / "site.yaml").read_bytes() == new
    assert (site / PREVIOUS_FILE).read_bytes() == before
    assert (site / "site.yaml").stat().st_mode & 0o777 == mode  # stays private (HA1 inside)
    assert load_site(site).site.name == "Demo site v1"
    assert _running(site) == 1
    assert not (site / STAGING_DIR).exists()
    # The same version again (its answer was lost): still ok, nothing changes.
    assert _apply(site, ca, 1, new) == (True, "")
    assert (site / PREVIOUS_FILE).read_bytes() == before


@pytest.mark.parametrize("case", ["bad_signature", "other_site", "not_yaml", "other_site_id",
                                  "invalid_value", "missing_file", "older"])
def test_a_bad_push_is_refused_and_changes_nothing(
    site: Path, ca: CertificateAuthority, case: str
) -> None:
    assert _apply(site, ca, 5, _renamed(site, "Demo site v5"))[0]
    before = (site / "site.yaml").read_bytes()
    text = before.replace(b"Demo site v5", b"Demo site v6")
    signature: bytes | None = None
    signed_for = SITE
    version = 6
    expected = ""
    if case == "bad_signature":
        signature = ca.sign_config(SITE, 6, text)[:-2] + b"\0\0"
        expected = "signature"
    elif case == "other_site":
        signed_for = "lyon-2"
        expected = "signature"
    elif case == "not_yaml":
        text = b"site: [unclosed\n"
        expected = "not valid YAML"
    elif case == "other_site_id":
        text = before.replace(b"id: demo", b"id: lyon-2")
        expected = "site.id"
    elif case == "invalid_value":
        text = before.replace(b"udp_port: 0", b"udp_port: not-a-port")
        expected = "udp_port"
    elif case == "missing_file":
        text = before.replace(b"cert: tls/sip.crt", b"cert: tls/missing.crt")
        expected = "invalid site.yaml"
    elif case == "older":
        version = 4
        expected = "not newer"
    ok, error = _apply(site, ca, version, text, signature=signature, signed_for=signed_for)
    assert not ok and expected in error, error
    assert (site / "site.yaml").read_bytes() == before
    assert _running(site) == 5
    assert not (site / STAGING_DIR).exists()
    with open_site_db(site / "edgecc.db").conn as conn:
        recorded = conn.execute("SELECT ok, error FROM edge_config WHERE version = ?",
                                (version,)).fetchone()
    if case == "older":
        assert recorded[0] == 0 and "not newer" in recorded[1]
    else:
        assert recorded == (0, error)


def test_pushed_through_the_link_and_recorded_by_the_cloud(tmp_path: Path) -> None:
    from test_backup_restore import Agent, Cloud, make_site, wait_for

    cloud = Cloud(tmp_path / "cloud")
    agent: Agent | None = None
    try:
        site = make_site(tmp_path, cloud, calls=1)
        agent = Agent(site)
        agent.start()
        wait_for(lambda: SITE in cloud.server.linked_sites(), "the site's link")
        good = _renamed(site, "Pushed name")
        record = cloud.call(cloud.server.push_config(SITE, good))
        applied = wait_for(lambda: cloud.report().get("config_applied"), "ConfigApplied")
        assert applied["version"] == record.version and applied["ok"] is True
        assert (site / "site.yaml").read_bytes() == good

        bad = good.replace(b"udp_port: 0", b"udp_port: 99999")
        second = cloud.call(cloud.server.push_config(SITE, bad))
        refused = wait_for(
            lambda: (cloud.report().get("config_applied") or {}).get("version") == second.version
            and cloud.report()["config_applied"], "the refusal")
        assert refused["ok"] is False and "udp_port" in refused["error"]
        assert (site / "site.yaml").read_bytes() == good

        # The next Hello says which version runs.
        agent.stop()
        agent.start()
        wait_for(lambda: (cloud.report().get("hello") or {}).get("config_version")
                 == record.version and cloud.report()["hello"]["at"] > refused["at"],
                 "a Hello with the running version")
    finally:
        if agent is not None:
            agent.stop()
        cloud.close()


def test_the_running_appliance_loads_a_pushed_config_when_no_call_is_up(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    import json
    import re
    import selectors
    import urllib.request

    site = tmp_path / "site"
    done = subprocess.run([EDGECC, "init", "--demo", "--site-dir", str(site), "--sip-port", "0",
                           "--http-port", "0", "--no-tls", "--agents", "2"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert _apply(site, ca, 1, _renamed(site, "Demo site v1")) == (True, "")
    log = tmp_path / "appliance.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([EDGECC, "appliance", "--site-dir", str(site)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                text=True)

    def startup_url() -> str:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=60), "no start-up line"
        found = re.search(r"http=(\S+)", proc.stdout.readline())
        assert found is not None, log.read_text()
        return found.group(1)

    def health(url: str) -> tuple[int, int]:
        with urllib.request.urlopen(url + "/health", timeout=10) as answer:
            body = json.loads(answer.read())
        return body["config_version"], body["config_installed"]

    try:
        first = startup_url()
        assert health(first) == (1, 1)
        # Version 2 is installed while the appliance runs, with no call up: it reloads itself
        # (the same process, a new start-up line) and runs version 2.
        v2 = (site / "site.yaml").read_bytes().replace(b"Demo site v1", b"Demo site v2")
        assert _apply(site, ca, 2, v2) == (True, "")
        second = startup_url()
        assert proc.poll() is None
        assert health(second) == (2, 2)
        text = log.read_text()
        assert "event=config_apply version=2 running=1" in text
        assert text.count("event=started ") == 2 and text.count("event=stopped ") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_a_pushed_config_waits_for_the_last_call_to_end(tmp_path: Path, monkeypatch) -> None:
    import asyncio
    from types import SimpleNamespace

    from appliance import app

    database = tmp_path / "edgecc.db"
    db = open_site_db(database)
    db.execute("INSERT INTO edge_config (version, received_at, ok, error, sha256) "
               "VALUES (2, 1.0, 1, '', 'x')")
    db.conn.commit()
    db.conn.close()
    monkeypatch.setattr(app, "CONFIG_POLL_S", 0.01)

    class Calls:
        def __init__(self) -> None:
            self.live = [{"call_id": "c1"}]
            self.asked = 0
            self.asked_thrice = asyncio.Event()

        def active_calls(self) -> list[dict]:
            self.asked += 1
            if self.asked >= 3:
                self.asked_thrice.set()
            return self.live

    async def scenario() -> None:
        calls = Calls()
        appliance = SimpleNamespace(config=SimpleNamespace(storage=SimpleNamespace(
            database=database)), api=SimpleNamespace(calls=calls))
        restart = asyncio.Event()
        watch = asyncio.create_task(app._await_pushed_config(appliance, 1, None, restart))
        await asyncio.wait_for(calls.asked_thrice.wait(), 10)
        assert not restart.is_set()  # a call is up: version 2 waits
        calls.live = []
        await asyncio.wait_for(restart.wait(), 10)
        await asyncio.wait_for(watch, 10)

    asyncio.run(scenario())


# --------------------------------------------------------------------------------------------
# A cloud push and a local API edit at the same instant (appliance.config_edit): one version
# number, one winner, and the edge_config row always describes the file on disk.


def _rename_site_edit(name: str):
    from appliance.config_edit import Change

    def change(data: dict) -> Change:
        data["site"]["name"] = name
        return Change("site", "name", "replace", None, name)

    return change


def _installed_matches_its_row(site: Path) -> int:
    import hashlib
    import sqlite3

    conn = sqlite3.connect(site / "edgecc.db")
    try:
        version = running_config_version(conn)
        [(digest,)] = conn.execute(
            "SELECT sha256 FROM edge_config WHERE version = ? AND ok = 1", (version,)).fetchall()
    finally:
        conn.close()
    assert hashlib.sha256((site / "site.yaml").read_bytes()).hexdigest() == digest
    return version


def test_a_push_validated_while_an_edit_installs_is_refused_not_swapped_over(
    site: Path, ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import edge_agent.config_apply as config_apply
    from appliance.config_edit import SiteEditor

    pushed = _renamed(site, "Pushed")
    editor = SiteEditor(site, site / "edgecc.db")
    edited = threading.Event()
    real_validate = config_apply._validate_staged

    def validate_then_let_the_edit_in(directory: Path, text: bytes) -> str:
        problem = real_validate(directory, text)
        # The push has checked the version (0) and validated; the API edit installs version 1
        # now, before the push reaches its swap.
        worker = threading.Thread(target=lambda: (
            editor.edit(0, "api:ada", _rename_site_edit("Edited")), edited.set()))
        worker.start()
        worker.join(30)
        assert edited.is_set()
        return problem

    monkeypatch.setattr(config_apply, "_validate_staged", validate_then_let_the_edit_in)
    ok, error = _apply(site, ca, 1, pushed)
    assert (ok, error) == (False, "version 1 is not newer than the running version 1")
    assert load_site(site).site.name == "Edited"
    assert _installed_matches_its_row(site) == 1


def test_push_and_edit_racing_in_two_threads_leave_one_consistent_version(
    site: Path, ca: CertificateAuthority
) -> None:
    from appliance.config_edit import SiteEditor

    editor = SiteEditor(site, site / "edgecc.db")
    for round_ in range(RACE_ROUNDS):
        version = _running(site)
        push_ok, edit_answer = _race(site, ca, editor, version, round_)
        edit_ok = edit_answer == version + 1
        # Exactly one of them installed version + 1; the other was refused cleanly.
        assert push_ok != edit_ok, (push_ok, edit_answer)
        if not edit_ok:
            assert edit_answer == 412
        assert _installed_matches_its_row(site) == version + 1
        name = load_site(site).site.name
        assert name == (f"Pushed {round_}" if push_ok else f"Edited {round_}")


def _race(site: Path, ca: CertificateAuthority, editor, version: int,
          round_: int) -> tuple[bool, int]:
    """A push of version + 1 and an API edit based on ``version``, released together:
    (the push's ok, the edit's new version or refusal status)."""
    import threading

    from appliance.config_edit import ConfigEditError

    start = threading.Barrier(2, timeout=30)
    pushed = _renamed_any(site, f"Pushed {round_}")
    outcome: dict[str, object] = {}

    def push() -> None:
        start.wait()
        outcome["push"] = _apply(site, ca, version + 1, pushed)[0]

    def edit() -> None:
        start.wait()
        try:
            outcome["edit"] = editor.edit(version, "api:ada",
                                          _rename_site_edit(f"Edited {round_}")).version
        except ConfigEditError as exc:
            outcome["edit"] = exc.status

    threads = [threading.Thread(target=push), threading.Thread(target=edit)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(t.is_alive() for t in threads)
    return bool(outcome["push"]), int(outcome["edit"])  # type: ignore[call-overload]


def _renamed_any(site: Path, name: str) -> bytes:
    import yaml

    data = yaml.safe_load((site / "site.yaml").read_text())
    data["site"]["name"] = name
    return yaml.safe_dump(data, sort_keys=False).encode()


def test_a_version_row_that_cannot_be_written_puts_the_running_file_back(
    site: Path, ca: CertificateAuthority
) -> None:
    import sqlite3

    before = (site / "site.yaml").read_bytes()
    conn = sqlite3.connect(site / "edgecc.db")
    with conn:
        conn.execute("CREATE TRIGGER refuse_versions BEFORE INSERT ON edge_config "
                     "BEGIN SELECT RAISE(ABORT, 'disk trouble'); END")
    conn.close()
    ok, error = _apply(site, ca, 1, _renamed(site, "Never recorded"))
    assert not ok and "could not be recorded" in error and "disk trouble" in error
    # The swap was undone: the file is the one the database says runs.
    assert (site / "site.yaml").read_bytes() == before
    assert _running(site) == 0
