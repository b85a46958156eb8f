"""``edgecc wfm``: called as a function and as a real subprocess of the venv's Python."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from test_forecast import synthetic_history
from test_kpi import WORKED_EXAMPLE

from appliance.reporting.cli import add_wfm_parser, wfm_main

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv").exists() else sys.executable
CLASSIC = ["staff", "--calls", "100", "--aht", "180", "--interval", "1800", "--sl", "0.8",
           "--threshold", "20"]
SVG = "{http://www.w3.org/2000/svg}"


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "appliance.reporting.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_staff_classic_example_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert wfm_main(CLASSIC) == 0
    out = capsys.readouterr().out
    assert "agents             14\n" in out
    assert "service level      88.8% answered within 20 s (target 80%)" in out
    assert "ASA                7.8 s" in out
    assert "occupancy          71.4%" in out
    assert "Erlang A" not in out


def test_staff_json_with_patience_and_shrinkage(capsys: pytest.CaptureFixture[str]) -> None:
    assert wfm_main([*CLASSIC, "--shrinkage", "0.3", "--patience", "120", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["agents"], result["scheduled"]) == (14, 20)
    assert result["traffic"] == pytest.approx(10.0)
    assert result["service_level"] == pytest.approx(0.88835, abs=1e-5)
    assert result["asa"] == pytest.approx(7.836, abs=1e-3)
    assert result["occupancy"] == pytest.approx(10 / 14)
    erlang_a = result["erlang_a"]
    # Impatient callers relieve the queue: fewer agents meet the same target.
    assert erlang_a["agents"] == 12 and erlang_a["scheduled"] == 18
    assert erlang_a["service_level"] >= 0.8 and 0 < erlang_a["prob_abandon"] < 0.2
    assert erlang_a["with_erlang_c_agents"]["service_level"] > result["service_level"]


def test_staff_asa_target_adds_agents(capsys: pytest.CaptureFixture[str]) -> None:
    assert wfm_main([*CLASSIC, "--asa", "5", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["agents"] == 15


@pytest.mark.parametrize(("flag", "value"), [
    ("--calls", "many"), ("--calls", "-3"), ("--aht", "0"), ("--aht", "inf"),
    ("--interval", "-1800"), ("--sl", "1.5"), ("--sl", "0"), ("--threshold", "-1"),
    ("--asa", "nan"), ("--shrinkage", "1"), ("--patience", "-5"),
    ("--max-occupancy", "2"),
])
def test_staff_bad_input_names_the_flag_and_exits_2(
        flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    args = [a for a in CLASSIC]
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert wfm_main(args) == 2
    captured = capsys.readouterr()
    assert f"argument {flag}:" in captured.err
    assert captured.out == ""


def test_staff_missing_flag_and_huge_traffic(capsys: pytest.CaptureFixture[str]) -> None:
    assert wfm_main(["staff", "--aht", "180"]) == 2
    assert "--calls" in capsys.readouterr().err
    assert wfm_main(["staff", "--calls", "1e12", "--aht", "180"]) == 2
    err = capsys.readouterr().err
    assert "--calls" in err and "Erlangs" in err
    assert wfm_main([]) == 2


def test_subprocess_staff_and_bad_flag() -> None:
    done = run_module(*CLASSIC, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["agents"] == 14
    bad = run_module("staff", "--calls", "100", "--aht", "180", "--sl", "80")
    assert bad.returncode == 2
    assert "argument --sl:" in bad.stderr and bad.stdout == ""


def test_hooks_into_the_edgecc_parser(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="edgecc")
    commands = parser.add_subparsers(dest="command", required=True)
    add_wfm_parser(commands)
    args = parser.parse_args(["wfm", *CLASSIC, "--json"])
    assert args.handler(args) == 0
    assert json.loads(capsys.readouterr().out)["agents"] == 14


# --------------------------------------------------------------------------------------------
# kpi


def test_kpi_report_of_the_worked_example(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "queue_log"
    log.write_text(WORKED_EXAMPLE)
    assert wfm_main(["kpi", "--queue-log", str(log), "--site", "paris", "--fcr-window", "1800",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    [row] = result["rows"]
    assert (row["key"], row["offered"], row["answered"]) == ("sales", 7, 4)
    assert row["service_level"] == pytest.approx(2 / 7)
    assert row["aht"] == pytest.approx(177.5)
    assert wfm_main(["kpi", "--queue-log", str(log), "--scope", "agent", "--totals"]) == 0
    out = capsys.readouterr().out
    assert "a1" in out and "a2" in out and "total" in out


def test_kpi_bad_log_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "queue_log"
    log.write_text(WORKED_EXAMPLE + "1793612500|c9|sales|NONE|WARP|1\n")
    assert wfm_main(["kpi", "--queue-log", str(log)]) == 1
    err = capsys.readouterr().err
    assert "line 36" in err and "WARP" in err
    assert wfm_main(["kpi", "--queue-log", str(tmp_path / "missing")]) == 1
    assert "--queue-log" in capsys.readouterr().err
    assert wfm_main(["kpi", "--queue-log", str(log), "--interval", "600"]) == 2
    assert "argument --interval" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# forecast


def test_forecast_from_csv_history_writes_svgs(tmp_path: Path) -> None:
    history = tmp_path / "history.csv"
    history.write_text("interval_start,calls\n" + "".join(
        f"{s},{c:g}\n" for s, c in sorted(synthetic_history(3).items())))
    out = tmp_path / "svg"
    done = run_module("forecast", "--history", str(history), "--aht", "180", "--svg-dir",
                      str(out), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert 0 < result["holdout"]["wape"] < 0.3
    assert len(result["plan"]) == 336
    busiest = max(result["plan"], key=lambda p: p["calls"])
    assert busiest["required"] > 0 and busiest["service_level"] >= 0.8
    for name in ("forecast.svg", "staffing.svg"):
        assert ET.parse(out / name).getroot().tag == f"{SVG}svg"


def simulated_queue_log(days: int) -> str:
    """One agent, 09:00-17:00, a call every 10 minutes answered after 10 s, 100 s of talk."""
    start = 1788739200  # Monday 00:00 UTC
    lines = []
    for day in range(days):
        base = start + day * 86400
        lines.append(f"{base + 9 * 3600}|NONE|NONE|a1|AGENTLOGIN|PJSIP/a1")
        for n in range(48):
            at, call = base + 9 * 3600 + n * 600, f"d{day}c{n}"
            lines += [f"{at}|{call}|sales|NONE|ENTERQUEUE||+33{n}|1",
                      f"{at + 10}|{call}|sales|a1|CONNECT|10|x|1",
                      f"{at + 110}|{call}|sales|a1|COMPLETECALLER|10|100|1"]
        lines.append(f"{base + 17 * 3600}|NONE|NONE|a1|AGENTLOGOFF|PJSIP/a1|28800")
    return "\n".join(lines) + "\n"


def test_forecast_from_a_queue_log_compares_required_and_logged_in(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "queue_log"
    log.write_text(simulated_queue_log(15))
    assert wfm_main(["forecast", "--queue-log", str(log), "--interval", "3600",
                     "--svg-dir", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["aht"] == pytest.approx(100.0)  # taken from the log
    # Every weekday has the same pattern: the hold-out week is forecast exactly.
    assert result["holdout"]["wape"] == pytest.approx(0.0, abs=1e-9)
    nine = [p for p in result["plan"] if p["calls"] > 0]
    assert len(nine) == 7 * 8 and all(p["calls"] == pytest.approx(6.0) for p in nine)
    root = ET.parse(tmp_path / "staffing-last-week.svg").getroot()
    names = [p.get("data-series") for p in root.iter(f"{SVG}polyline")]
    assert "logged in" in names and "required" in names


def test_forecast_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = tmp_path / "history.csv"
    history.write_text("interval_start,calls\n1788739200,x\n")
    assert wfm_main(["forecast", "--history", str(history), "--aht", "180"]) == 1
    assert "line 2" in capsys.readouterr().err
    history.write_text("1788739200,3\n")
    assert wfm_main(["forecast", "--history", str(history)]) == 2
    assert "--aht" in capsys.readouterr().err
    assert wfm_main(["forecast", "--history", str(history), "--aht", "180"]) == 1
    assert "one week" in capsys.readouterr().err
    history.write_text("".join(f"{s},{c:g}\n" for s, c in synthetic_history(1).items()))
    assert wfm_main(["forecast", "--history", str(history), "--aht", "180",
                     "--timezone", "Nowhere/Land"]) == 1
    assert "--timezone" in capsys.readouterr().err
    assert wfm_main(["forecast", "--aht", "180"]) == 2
    assert "--queue-log" in capsys.readouterr().err


def test_forecast_staffs_with_erlang_a_from_the_patience_the_log_shows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every fourth caller of the simulated log hangs up after 40 s instead of being answered:
    # total wait (36 calls x 10 s + 12 x 40 s a day) / 12 abandons = 70 s of mean patience.
    lines = []
    for line in simulated_queue_log(15).splitlines():
        at, call, queue, agent, verb, *rest = line.split("|")
        if call.startswith("d") and int(call.split("c")[1]) % 4 == 0:
            if verb == "CONNECT":
                lines.append(f"{int(at) + 30}|{call}|{queue}|NONE|ABANDON|1|1|40")
                continue
            if verb == "COMPLETECALLER":
                continue
        lines.append(line)
    log = tmp_path / "queue_log"
    log.write_text("\n".join(lines) + "\n")
    assert wfm_main(["forecast", "--queue-log", str(log), "--interval", "3600", "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert (measured["model"], measured["patience_from"]) == ("erlang-a", "measured")
    assert measured["patience"] == pytest.approx((36 * 10 + 12 * 40) / 12)
    # A patience given wins; a log without abandons staffs with Erlang C.
    assert wfm_main(["forecast", "--queue-log", str(log), "--interval", "3600", "--json",
                     "--patience", "300"]) == 0
    given = json.loads(capsys.readouterr().out)
    assert (given["model"], given["patience"], given["patience_from"]) == (
        "erlang-a", 300.0, "--patience")
    # Callers who wait longer before giving up need fewer agents for the same target.
    busiest = max(range(len(given["plan"])), key=lambda i: given["plan"][i]["calls"])
    assert given["plan"][busiest]["required"] <= measured["plan"][busiest]["required"]
    plain = tmp_path / "plain_log"
    plain.write_text(simulated_queue_log(15))
    assert wfm_main(["forecast", "--queue-log", str(plain), "--interval", "3600",
                     "--json"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert (without["model"], without["patience"]) == ("erlang-c", None)
    assert wfm_main(["forecast", "--queue-log", str(log), "--interval", "3600"]) == 0
    assert "Erlang A, caller patience 70 s (measured from the abandons)" in (
        capsys.readouterr().out)
