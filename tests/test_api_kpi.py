"""KPI queries over the API (``GET /api/kpi/report``): the interval report computed from the
site's event log, per queue, agent or site, with component uptime, checked against figures
worked out by hand from docs/kpis.md's formulas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from test_api_server import ApiServer

from appliance import eventlog
from appliance.api import Role
from appliance.config import parse_site_yaml
from appliance.store import open_site_db

T0 = 1_699_999_200.0  # an interval boundary (1800 s, UTC)
SPAN = f"since={T0:.0f}&until={T0 + 3600:.0f}"

# (at, kind, payload): the event log as call control, the desk and the appliance write it.
LOG = [
    (T0, "component.up", {"component": "appliance"}),
    (T0 + 1, "agent.login", {"agent": "a1"}),
    # c1: answered after 15 s (within the 20 s threshold), 120 s of talk.
    (T0 + 10, "queue.enter", {"call_id": "c1", "queue": "sales", "caller": "+3311"}),
    (T0 + 25, "queue.connect", {"call_id": "c1", "queue": "sales", "agent": "a1",
                                "wait_s": 15.0, "ring_s": 2.0}),
    (T0 + 145, "queue.complete", {"call_id": "c1", "queue": "sales", "agent": "a1",
                                  "talk_s": 120.0, "ended_by": "caller-hung-up"}),
    # c2: hung up after 12 s: abandoned, within the threshold.
    (T0 + 100, "queue.enter", {"call_id": "c2", "queue": "sales", "caller": "+3322"}),
    (T0 + 112, "queue.abandon", {"call_id": "c2", "queue": "sales", "wait_s": 12.0}),
    # c3: hung up after 3 s: a short abandon, in no figure but its own.
    (T0 + 200, "queue.enter", {"call_id": "c3", "queue": "sales", "caller": "+3333"}),
    (T0 + 203, "queue.abandon", {"call_id": "c3", "queue": "sales", "wait_s": 3.0}),
    # c4, next interval: answered after 5 s, 60 s of talk.
    (T0 + 1900, "queue.enter", {"call_id": "c4", "queue": "sales", "caller": "+3344"}),
    (T0 + 1905, "queue.connect", {"call_id": "c4", "queue": "sales", "agent": "a1",
                                  "wait_s": 5.0}),
    (T0 + 1965, "queue.complete", {"call_id": "c4", "queue": "sales", "agent": "a1",
                                   "talk_s": 60.0, "ended_by": "agent-hung-up"}),
    # The appliance was down for 300 s in the second interval.
    (T0 + 3000, "component.down", {"component": "appliance"}),
    (T0 + 3300, "component.up", {"component": "appliance"}),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    directory = Path(tmp_path_factory.mktemp("kpi-site"))
    server = ApiServer(directory)
    try:
        db = open_site_db(server.db_path)
        try:
            for at, kind, payload in LOG:
                eventlog.append(db, kind, payload, occurred_at=at, site_id="demo")
        finally:
            db.conn.close()
        server.context.site = parse_site_yaml("site: {id: demo}\nsip: {tls_port: null}\n",
                                              site_dir=directory)
        server.add("sam", Role.SUPERVISOR)
        server.add("alex", Role.AGENT)
        server.tokens = {Role.SUPERVISOR: server.token("sam"), Role.AGENT: server.token("alex")}
        yield server
    finally:
        server.close()


def _report(api: ApiServer, query: str) -> dict:
    reply = api.request("GET", f"/api/kpi/report?{query}", token=api.tokens[Role.SUPERVISOR])
    assert reply.status == 200, reply.body
    return reply.body


def test_interval_rows_per_queue_match_the_formulas(api: ApiServer) -> None:
    body = _report(api, f"{SPAN}&interval=1800&scope=queue")
    assert (body["interval"], body["service_level_threshold"], body["anomalies"]) == (1800, 20, 0)
    first, second = body["rows"]
    assert (first["key"], first["interval_start"], second["interval_start"]) == (
        "sales", T0, T0 + 1800)
    assert {k: first[k] for k in ("offered", "answered", "abandoned", "short_abandoned",
                                  "answered_within", "abandoned_within")} == {
        "offered": 2, "answered": 1, "abandoned": 1, "short_abandoned": 1,
        "answered_within": 1, "abandoned_within": 1}
    # Service level both ways: 1 / (1 + 1) with the abandon, 1 / (2 - 1) without it.
    assert first["service_level"] == pytest.approx(0.5)
    assert first["service_level_excluding_abandons"] == pytest.approx(1.0)
    assert first["asa"] == pytest.approx(15.0)
    assert first["average_wait"] == pytest.approx(13.5)
    assert first["longest_wait"] == pytest.approx(15.0)
    assert first["abandon_rate"] == pytest.approx(0.5)
    assert (first["handled"], first["aht"]) == (1, pytest.approx(120.0))
    assert (second["offered"], second["answered"], second["asa"], second["aht"]) == (
        1, 1, pytest.approx(5.0), pytest.approx(60.0))


def test_totals_agent_and_site_cuts(api: ApiServer) -> None:
    [total] = _report(api, f"{SPAN}&scope=queue&totals=true")["rows"]
    assert total["interval_start"] is None
    assert (total["offered"], total["answered"]) == (3, 2)
    assert total["service_level"] == pytest.approx(2 / 3)
    assert total["asa"] == pytest.approx(10.0)
    agent = _report(api, f"{SPAN}&scope=agent&key=a1&totals=true")["rows"]
    assert [(r["key"], r["handled"]) for r in agent] == [("a1", 2)]
    assert agent[0]["logged_in"] == pytest.approx(3599.0)  # from T0 + 1 to the report's end
    site = _report(api, f"{SPAN}&scope=site&totals=true")["rows"]
    assert [(r["key"], r["offered"]) for r in site] == [("demo", 3)]
    assert _report(api, f"{SPAN}&scope=queue&key=nosuch")["rows"] == []
    # 15-minute intervals: c1..c3 in the first, c4 in the third.
    rows = _report(api, f"{SPAN}&interval=900&scope=queue")["rows"]
    assert [(r["interval_start"], r["offered"]) for r in rows] == [(T0, 2), (T0 + 1800, 1)]


def test_uptime_per_component_from_the_log(api: ApiServer) -> None:
    body = _report(api, f"{SPAN}&interval=1800")
    assert [(u["component"], u["interval_start"], u["up"], u["down"], u["outages"])
            for u in body["uptime"]] == [("appliance", T0, 1800.0, 0.0, 0),
                                         ("appliance", T0 + 1800, 1500.0, 300.0, 1)]
    [total] = _report(api, f"{SPAN}&totals=true")["uptime"]
    assert total["uptime"] == pytest.approx(3300 / 3600)
    assert total["longest_outage"] == pytest.approx(300.0)


@pytest.mark.parametrize(("query", "field"), [
    (f"{SPAN}&interval=1000", "interval"),
    (f"{SPAN}&scope=team", "scope"),
    (f"since={T0:.0f}&until={T0:.0f}", "until"),
    (f"since={T0 - 8 * 86400:.0f}&until={T0:.0f}", "since"),
    ("until=5", "since"),
    (f"{SPAN}&threshold=-1", "threshold"),
])
def test_bad_queries_name_the_field(api: ApiServer, query: str, field: str) -> None:
    reply = api.request("GET", f"/api/kpi/report?{query}", token=api.tokens[Role.SUPERVISOR])
    assert reply.status == 422 and reply.body["field"] == field, reply.body
    assert reply.body["error"].startswith(f"{field}")


def test_agents_may_not_query_kpis(api: ApiServer) -> None:
    reply = api.request("GET", f"/api/kpi/report?{SPAN}", token=api.tokens[Role.AGENT])
    assert reply.status == 403
