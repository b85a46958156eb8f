"""RTP inactivity: a carrier that stops sending media is hung up, and so is the agent.

The site's ``media.rtp_timeout`` is 1.5 s; the carrier is SIPp (tests/sipp/trunk_silent.xml:
no RTP after the answer) and the agent pjsua2 (which keeps sending its tone). The appliance runs
in this process (``peers.LiveAppliance``).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from collections.abc import Iterator

import pytest
from peers import LiveAppliance, agent_phone, log_lines, make_site, query, sipp, sipp_failed

pytestmark = [
    pytest.mark.skipif(shutil.which("sipp") is None, reason="sipp (sip-tester) missing"),
    pytest.mark.timeout(90),
]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[LiveAppliance]:
    def edit(data: dict) -> None:
        data.setdefault("media", {})["rtp_timeout"] = 1.5
        data["queues"][0]["record"] = False

    site = make_site(tmp_path_factory.mktemp("calls-timeout-site"), edit=edit)
    appliance = LiveAppliance(site).start()
    try:
        yield appliance
    finally:
        appliance.close()


def test_silent_carrier_is_hung_up_with_the_agent(live, tmp_path) -> None:
    with agent_phone(tmp_path, live.site, live, "answer", user="1001") as agent, \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        carrier = pool.submit(sipp, tmp_path, live, "trunk_silent")
        call_id = live.wait_event("call.offered")["call_id"]
        agent.next("answered")
        ended = live.wait_event("call.ended", match=lambda p: p["call_id"] == call_id)
        result = carrier.result(60)
        assert result.returncode == 0, sipp_failed(result, live)  # it got our BYE
        agent.next("disconnected")
    assert ended["end_reason"] == "media-timeout"
    (end_reason, legs) = query(live.site, "SELECT end_reason, legs FROM call_records "
                                          "WHERE call_id = ?", (call_id,))[0]
    assert end_reason == "media-timeout"
    assert [leg["end_reason"] for leg in json.loads(legs)] == ["rtp-timeout", "rtp-timeout"]
    # One leg timed out (the silent carrier's; the agent kept talking), after the limit.
    (timeout,) = [e for e in log_lines(live, "media_timeout") if e["call"] == call_id]
    assert float(timeout["idle_s"]) >= 1.5
