"""The live event hub and the /api/events WebSocket, with a real client over 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_api_server import ApiServer
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from appliance.api import Hub, LoginPolicy, Role

WAIT_S = 10.0


# ------------------------------------------------------------------------------ hub


def test_subscriber_receives_what_its_role_may_see() -> None:
    async def scenario() -> None:
        hub = Hub(clock=lambda: 1000.0)
        agent, supervisor = hub.subscribe(Role.AGENT, "a1"), hub.subscribe(Role.SUPERVISOR)
        hub.publish("queue", {"queue": "sales", "waiting": 3}, audience=Role.SUPERVISOR)
        hub.publish("agent", {"agent": "a1", "state": "available"})
        got = await supervisor.get(WAIT_S)
        assert got is not None and got.seq == 1 and got.topic == "queue"
        assert json.loads(got.message) == {"type": "event", "seq": 1, "topic": "queue",
                                           "at": 1000.0,
                                           "data": {"queue": "sales", "waiting": 3}}
        assert (await supervisor.get(WAIT_S)).seq == 2  # type: ignore[union-attr]
        only = await agent.get(WAIT_S)
        assert only is not None and only.seq == 2  # the supervisor-only event never came
        assert await agent.get(0.01) is None
        agent.close()
        assert hub.subscribers == 1

    asyncio.run(scenario())


def test_an_agent_sees_only_the_calls_offered_to_it() -> None:
    async def scenario() -> None:
        hub = Hub(clock=lambda: 1000.0)
        mine, other = hub.subscribe(Role.AGENT, "1001"), hub.subscribe(Role.AGENT, "1002")
        unlinked, boss = hub.subscribe(Role.AGENT), hub.subscribe(Role.SUPERVISOR)
        hub.publish("call.offered", {"call_id": "c1", "caller": "+15550111", "flow": "main"})
        hub.publish("call.offered", {"call_id": "c2", "caller": "+15550122", "flow": "main"})
        hub.publish("call.ringing", {"call_id": "c1", "agent": "1001", "queue": "support"})
        hub.publish("call.hold", {"call_id": "c1", "by": "1001"})
        hub.publish("call.hold", {"call_id": "c2", "by": "sam"})
        hub.publish("agent.pause", {"agent": "1002", "reason": "lunch"})
        hub.publish("link.state", {"state": "online"})
        hub.publish("call.ended", {"call_id": "c1", "end_reason": "caller"})

        async def drain(sub) -> list[tuple[str, str | None]]:
            got = []
            while (event := await sub.get(0.01)) is not None:
                got.append((event.topic, json.loads(event.message)["data"].get("call_id")))
            return got

        # 1001's phone rang for c1: its offer (the caller's number) comes just before.
        assert await drain(mine) == [("call.offered", "c1"), ("call.ringing", "c1"),
                                     ("call.hold", "c1"), ("link.state", None),
                                     ("call.ended", "c1")]
        # 1002 never hears of c1 or c2 (nor of the other callers' numbers).
        assert await drain(other) == [("agent.pause", None), ("link.state", None)]
        assert await drain(unlinked) == [("link.state", None)]
        assert len(await drain(boss)) == 8  # supervisors see everything

    asyncio.run(scenario())


def test_slow_subscriber_is_cut_off_not_buffered_without_limit() -> None:
    async def scenario() -> None:
        hub = Hub(queue_limit=3)
        slow, fast = hub.subscribe(Role.ADMIN), hub.subscribe(Role.ADMIN)
        for n in range(3):
            hub.publish("tick", {"n": n})
            assert (await fast.get(WAIT_S)) is not None
        hub.publish("tick", {"n": 3})
        assert slow.overflowed and slow.pending() == 3 and hub.subscribers == 1
        assert not fast.overflowed and (await fast.get(WAIT_S)).seq == 4  # type: ignore[union-attr]

    asyncio.run(scenario())


def test_publishing_bad_data_sends_nothing() -> None:
    async def scenario() -> None:
        hub = Hub()
        sub = hub.subscribe(Role.AGENT)
        with pytest.raises(TypeError):
            hub.publish("queue", {"when": object()})
        with pytest.raises(ValueError):
            hub.publish("queue", {"x": float("nan")})
        with pytest.raises(ValueError):
            hub.publish("", {})
        assert sub.pending() == 0
        assert hub.publish("queue", {"ok": True}).seq == 1  # the sequence has no holes

    asyncio.run(scenario())


def test_publish_from_another_thread() -> None:
    async def scenario() -> None:
        hub = Hub()
        sub = hub.subscribe(Role.AGENT)
        with pytest.raises(TypeError):  # refused in the publishing thread, nothing sent
            await asyncio.to_thread(hub.publish_threadsafe, "health", {"x": object()})
        await asyncio.to_thread(hub.publish_threadsafe, "health", {"sip": "up"})
        got = await sub.get(WAIT_S)
        assert got is not None and got.topic == "health"

    asyncio.run(scenario())


# ------------------------------------------------------------------------------ WebSocket


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    server = ApiServer(tmp_path, policy=LoginPolicy(token_ttl=600), heartbeat_s=0.3)
    try:
        server.add("ada", Role.ADMIN)
        server.add("sam", Role.SUPERVISOR)
        server.add("alex", Role.AGENT)
        server.users.link_agent("alex", "1001")
        yield server
    finally:
        server.close()


def ws_url(api: ApiServer, query: str = "") -> str:
    return api.url.replace("http://", "ws://") + "/api/events" + query


def token_of(api: ApiServer, name: str) -> str:
    return api.users.issue_token(api.accounts[name].user_id)[0]


def recv(ws: ClientConnection) -> dict:
    return json.loads(ws.recv(timeout=WAIT_S))


def recv_until(ws: ClientConnection, kind: str) -> dict:
    for _ in range(50):  # heartbeats may come first
        message = recv(ws)
        if message["type"] == kind:
            return message
    raise AssertionError(f"no {kind} message")


def closed_code(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        for _ in range(50):
            ws.recv(timeout=WAIT_S)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


@pytest.mark.parametrize("name", ["alex", "sam", "ada"])
def test_each_role_streams_events_meant_for_it(api: ApiServer, name: str) -> None:
    role = api.accounts[name].role
    with connect(ws_url(api, f"?token={token_of(api, name)}"), open_timeout=WAIT_S) as ws:
        hello = recv(ws)
        assert hello == {"type": "hello", "name": name, "role": role.value,
                         "heartbeat_s": 0.3, "expires_at": pytest.approx(api.clock() + 600)}
        api.call_soon(lambda: api.hub.publish("queue", {"waiting": 2},
                                              audience=Role.SUPERVISOR))
        api.call_soon(lambda: api.hub.publish("agent", {"agent": "1001"}))
        first = recv_until(ws, "event")
        if role.allows(Role.SUPERVISOR):
            assert (first["topic"], first["data"]) == ("queue", {"waiting": 2})
            first = recv_until(ws, "event")
        assert (first["topic"], first["data"], first["seq"]) == ("agent", {"agent": "1001"}, 2)


def test_an_agents_stream_carries_its_own_calls_only(api: ApiServer) -> None:
    with connect(ws_url(api, f"?token={token_of(api, 'alex')}"), open_timeout=WAIT_S) as ws:
        assert recv(ws)["type"] == "hello"
        for topic, data in [
                ("call.offered", {"call_id": "theirs", "caller": "+15550199"}),
                ("call.offered", {"call_id": "ours", "caller": "+15550111"}),
                ("call.ringing", {"call_id": "theirs", "agent": "1002", "queue": "support"}),
                ("call.ringing", {"call_id": "ours", "agent": "1001", "queue": "support"}),
                ("call.ended", {"call_id": "theirs", "end_reason": "agent"}),
                ("call.ended", {"call_id": "ours", "end_reason": "caller"})]:
            api.call_soon(lambda t=topic, d=data: api.hub.publish(t, d))
        got = [recv_until(ws, "event") for _ in range(3)]
        assert [(e["topic"], e["data"]["call_id"]) for e in got] == [
            ("call.offered", "ours"), ("call.ringing", "ours"), ("call.ended", "ours")]
        assert got[0]["data"]["caller"] == "+15550111"
        # Nothing of the other call follows: the next message is a heartbeat.
        assert recv(ws)["type"] == "heartbeat"


def test_token_in_the_first_message_and_heartbeats(api: ApiServer) -> None:
    with connect(ws_url(api), open_timeout=WAIT_S) as ws:
        ws.send(json.dumps({"token": token_of(api, "alex")}))
        assert recv(ws)["type"] == "hello"
        beat = recv_until(ws, "heartbeat")
        assert beat["at"] == api.clock()
        ws.send("ignored chatter")  # the client may talk; the stream goes on
        assert recv_until(ws, "heartbeat")["type"] == "heartbeat"


@pytest.mark.parametrize("query,first", [
    ("?token=not-a-token", None),
    ("", json.dumps({"not_token": 1})),
    ("", "not json"),
    ("", json.dumps({"token": 42})),
    ("", json.dumps({"token": "made-up"})),
])
def test_no_valid_token_no_stream(api: ApiServer, query: str, first: str | None) -> None:
    with connect(ws_url(api, query), open_timeout=WAIT_S) as ws:
        if first is not None:
            ws.send(first)
        error = recv(ws)
        assert error["type"] == "error" and error["field"] == "token"
        assert closed_code(ws) == 4401
    assert api.call_soon(lambda: api.hub.subscribers) == 0


def test_expired_token_ends_the_stream(api: ApiServer) -> None:
    expired = api.users.issue_token(api.accounts["alex"].user_id, now=api.clock() - 601)[0]
    with connect(ws_url(api, f"?token={expired}"), open_timeout=WAIT_S) as ws:
        assert recv(ws)["type"] == "error"
        assert closed_code(ws) == 4401
    with connect(ws_url(api, f"?token={token_of(api, 'alex')}"), open_timeout=WAIT_S) as ws:
        assert recv(ws)["type"] == "hello"
        api.clock.advance(601)
        bye = recv_until(ws, "bye")
        assert "expired" in bye["reason"]
        assert closed_code(ws) == 4401


def test_logout_ends_the_stream(api: ApiServer) -> None:
    token = token_of(api, "sam")
    with connect(ws_url(api, f"?token={token}"), open_timeout=WAIT_S) as ws:
        assert recv(ws)["type"] == "hello"
        assert api.request("POST", "/api/logout", token=token).status == 204
        assert recv_until(ws, "bye")["reason"] == "token expired or revoked"
        assert closed_code(ws) == 4401


def test_subscription_ends_with_the_client(api: ApiServer) -> None:
    with connect(ws_url(api, f"?token={token_of(api, 'alex')}"), open_timeout=WAIT_S) as ws:
        assert recv(ws)["type"] == "hello"
        assert api.call_soon(lambda: api.hub.subscribers) == 1
    for _ in range(100):  # the server notices the close within a heartbeat or so
        if api.call_soon(lambda: api.hub.subscribers) == 0:
            break
        api.on_loop(asyncio.sleep(0.05))
    assert api.call_soon(lambda: api.hub.subscribers) == 0
