"""``edgecc simulate`` against a running appliance: real SIP both ways (SIPp callers, pjsua2
agents). A short run places its calls, the agents log in with *70, answer and hang up, and the
appliance writes the call records; a long run stops at once on SIGTERM; bad figures are refused
with the option named and nothing started."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator

import pytest
from test_register_peers import EDGECC, read_line
from test_web_pages import WebSite, close_web_site, start_web_site

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(150),
]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[WebSite]:
    pytest.importorskip("pjsua2")

    def quick(data: dict) -> None:
        data["queues"][0]["record"] = False

    running = start_web_site(tmp_path_factory.mktemp("simulate-site"), edit=quick)
    try:
        yield running
    finally:
        close_web_site(running)


def simulate(site: WebSite, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(EDGECC), "simulate", "--site-dir", str(site.directory), "--sip",
         f"127.0.0.1:{site.sip_port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=site.directory)


def records(site: WebSite) -> list[tuple]:
    conn = sqlite3.connect(f"file:{site.directory / 'edgecc.db'}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute("SELECT agent, end_reason, caller FROM call_records "
                            "WHERE direction IS NOT 'outbound' OR direction IS NULL "
                            "ORDER BY started_at").fetchall()
    finally:
        conn.close()


def test_a_short_run_places_its_calls_and_agents_answer_them(site: WebSite) -> None:
    proc = simulate(site, "--agents", "2", "--calls-per-minute", "30", "--duration", "4",
                    "--talk", "1", "2", "--patience", "15")
    out, err = proc.communicate(timeout=120)
    text = out.decode()
    assert proc.returncode == 0, text + err.decode()
    assert "simulate agents=2 registered=2" in text
    assert "simulate calls=2 rate=30/min duration=4s" in text
    assert "simulate done placed=2 answered=2 stopped=at-end" in text, text
    answered = [r for r in records(site) if r[1] == "agent-hung-up"]
    assert len(answered) == 2, records(site)
    assert {r[0] for r in answered} <= {"1001", "1002"}
    assert all(r[2].startswith("+1555") for r in answered)


def test_sigterm_stops_a_long_run_at_once(site: WebSite) -> None:
    proc = simulate(site, "--agents", "1", "--calls-per-minute", "1", "--duration", "3600")
    try:
        lines = [read_line(proc, 60)]
        while not lines[-1].startswith("simulate calls="):
            lines.append(read_line(proc, 60))
            assert lines[-1], lines
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    assert "stopped=early" in out.decode()


@pytest.mark.parametrize(("args", "message"), [
    (["--agents", "0", "--calls-per-minute", "5"], "--agents: expected 1 to 50, got 0"),
    (["--agents", "1", "--calls-per-minute", "0"], "--calls-per-minute: expected more than 0"),
    (["--agents", "1", "--calls-per-minute", "5", "--duration", "-1"], "--duration"),
    (["--agents", "1", "--calls-per-minute", "5", "--talk", "9", "3"], "--talk needs"),
    (["--agents", "9", "--calls-per-minute", "5"], "--agents 9: the site has 2 agent"),
])
def test_bad_figures_are_refused_and_nothing_starts(site: WebSite, args, message) -> None:
    before = len(records(site))
    proc = simulate(site, *args)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode in (1, 2)
    assert message in err.decode(), err.decode()
    assert out == b""
    assert len(records(site)) == before
