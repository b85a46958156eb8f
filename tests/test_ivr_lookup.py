"""The IVR's CRM look-up against a real HTTP server on 127.0.0.1, and a flow driven with its
answers: success, slow (timeout), 500, garbage, too big, refused port, the site-wide limit."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from appliance.ivr import FlowRun, HttpLookup, HttpResult, PromptFinished, RouteToQueue, load_flows
from appliance.ivr.lookup import CrmLookup
from appliance.site_init import make_certificate

pytestmark = pytest.mark.timeout(30)

SECRET_MARK = "s3cr3t-customer-data"


@dataclass
class Seen:
    """One request the server received."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class CrmServer:
    """A small HTTP/1.1 server whose answers depend on the path."""

    port: int = 0
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    """Set it to let the ``/slow`` requests answer."""
    holding: int = 0
    arrived: asyncio.Condition = field(default_factory=asyncio.Condition)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def wait_holding(self, count: int) -> None:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: self.holding >= count), 10)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")[:-2]
            method, target, _ = request_line.split(" ")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (line.partition(":") for line in header_lines)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Seen(method, target, headers, body))
            path = urlsplit(target).path
            if path == "/slow":
                async with self.arrived:
                    self.holding += 1
                    self.arrived.notify_all()
                await self.release.wait()
                path = "/ok"
            writer.write(self.answer(path))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def answer(self, path: str) -> bytes:
        def reply(status: str, body: bytes, extra: str = "") -> bytes:
            return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n{extra}Connection: close\r\n\r\n"
                    ).encode() + body
        if path == "/ok":
            return reply("200 OK", json.dumps({"customer": {
                "priority": 42, "tier": "gold", "name": SECRET_MARK}}).encode())
        if path == "/error":
            return reply("500 Internal Server Error", json.dumps({"error": SECRET_MARK}).encode())
        if path == "/garbage":
            return reply("200 OK", f"<html>{SECRET_MARK}".encode())
        if path == "/array":
            return reply("200 OK", b"[1, 2, 3]")
        if path == "/huge":
            return reply("200 OK", b'{"pad": "' + b"x" * 200_000 + b'"}')
        if path == "/huge-unsized":
            # No Content-Length: the body runs until the connection closes (RFC 9112 §6.3).
            return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
                    + b'{"pad": "' + b"x" * 200_000 + b'"}')
        if path == "/chunked":
            body = json.dumps({"customer": {"priority": 5}}).encode()
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
        if path == "/not-http":
            return b"SSH-2.0-OpenSSH_9.2\r\n\r\n"
        return reply("404 Not Found", b"{}")


@contextlib.asynccontextmanager
async def serving(tls: ssl.SSLContext | None = None) -> AsyncIterator[CrmServer]:
    state = CrmServer()
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=tls)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        state.release.set()
        server.close()
        await server.wait_closed()


def on_loop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop; a ``crm`` parameter gets a running CrmServer
    (the other parameters stay pytest fixtures and parameters)."""
    signature = inspect.signature(test)
    wants_crm = "crm" in signature.parameters

    async def body(*args: Any, **kwargs: Any) -> None:
        if not wants_crm:
            await test(*args, **kwargs)
            return
        async with serving() as crm:
            await test(*args, crm=crm, **kwargs)

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(body(*args, **kwargs))

    run.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for name, p in signature.parameters.items() if name != "crm"])
    return run


def refused_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def action(url: str, *, timeout: float = 5.0, method: str = "POST",
           headers: dict[str, str] | None = None) -> HttpLookup:
    return HttpLookup(7, url, {"caller": "+4915112345", "dialled": "+4930555",
                               "variables": {"caller": "+4915112345", "menu_choice": "2"}},
                      timeout, method, headers or {})


@on_loop
async def test_post_sends_caller_dialled_and_variables(crm: CrmServer) -> None:
    lookup = CrmLookup()
    result = await lookup.lookup(action(crm.url("/ok?src=ivr"), headers={"X-Api-Key": "k1"}))
    assert result == HttpResult(7, 200, {"customer": {"priority": 42, "tier": "gold",
                                                      "name": SECRET_MARK}})
    (seen,) = crm.requests
    assert (seen.method, seen.target) == ("POST", "/ok?src=ivr")
    assert seen.headers["x-api-key"] == "k1"
    assert seen.headers["host"] == f"127.0.0.1:{crm.port}"
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body) == {"caller": "+4915112345", "dialled": "+4930555",
                                     "variables": {"caller": "+4915112345", "menu_choice": "2"}}
    assert lookup.stats.succeeded == 1 and lookup.stats.in_flight == 0


@on_loop
async def test_get_puts_caller_and_dialled_in_the_query(crm: CrmServer) -> None:
    result = await CrmLookup().lookup(action(crm.url("/ok?src=ivr"), method="GET"))
    assert result.status == 200 and result.error is None
    (seen,) = crm.requests
    assert seen.method == "GET" and seen.body == b""
    assert parse_qs(urlsplit(seen.target).query) == {
        "src": ["ivr"], "caller": ["+4915112345"], "dialled": ["+4930555"]}


@on_loop
async def test_chunked_answer(crm: CrmServer) -> None:
    result = await CrmLookup().lookup(action(crm.url("/chunked")))
    assert result.body == {"customer": {"priority": 5}} and result.error is None


@pytest.mark.parametrize(("path", "reason", "status"), [
    ("/error", "status 500", 500),
    ("/garbage", "bad-json", 200),
    ("/array", "not-a-json-object", 200),
    ("/huge", "too-big", None),
    ("/huge-unsized", "too-big", None),
    ("/not-http", "bad-http", None),
])
@on_loop
async def test_bad_answers_fail_with_a_reason_and_never_log_the_body(
    crm: CrmServer, caplog: pytest.LogCaptureFixture, path: str, reason: str, status: int | None,
) -> None:
    lookup = CrmLookup(max_body_bytes=64 * 1024)
    with caplog.at_level(logging.INFO, logger="edgecc.ivr.lookup"):
        result = await lookup.lookup(action(crm.url(path), headers={"X-Api-Key": "key-xyz"}),
                                     call="c1")
    assert result == HttpResult(7, status, None, reason)
    assert lookup.stats.failed == 1 and lookup.stats.in_flight == 0
    (record,) = [r for r in caplog.records if "ivr_lookup_failed" in r.getMessage()]
    line = record.getMessage()
    assert f"reason={json.dumps(reason) if ' ' in reason else reason}" in line
    assert "call=c1" in line and "host=127.0.0.1" in line
    assert SECRET_MARK not in caplog.text and "key-xyz" not in caplog.text
    assert "4915112345" not in caplog.text


@on_loop
async def test_slow_service_times_out(crm: CrmServer) -> None:
    lookup = CrmLookup()
    result = await lookup.lookup(action(crm.url("/slow"), timeout=0.2))
    assert result == HttpResult(7, None, None, "timeout")
    assert len(crm.requests) == 1          # it was asked, and did not answer in time
    assert lookup.stats.in_flight == 0


@on_loop
async def test_https_verifies_the_service(tmp_path: Path) -> None:
    cert, key = make_certificate("crm.test", ["127.0.0.1"])
    (tmp_path / "crm.crt").write_bytes(cert)
    (tmp_path / "crm.key").write_bytes(key)
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(tmp_path / "crm.crt", tmp_path / "crm.key")
    async with serving(server_side) as crm:
        url = f"https://127.0.0.1:{crm.port}/ok"
        trusting = CrmLookup(ssl_context=ssl.create_default_context(cadata=cert.decode()))
        result = await trusting.lookup(action(url))
        assert result.status == 200 and result.body["customer"]["tier"] == "gold"  # type: ignore[index]
        # The system's CAs do not know this self-signed service: fallback, not a call failure.
        refused = await CrmLookup().lookup(action(url))
        assert refused.error is not None and refused.error.startswith("tls-"), refused
    assert len(crm.requests) == 1


@on_loop
async def test_refused_port() -> None:
    result = await CrmLookup().lookup(action(f"http://127.0.0.1:{refused_port()}/x"))
    assert result == HttpResult(7, None, None, "connection-refused")


@on_loop
async def test_bad_header_value_is_refused_before_sending(crm: CrmServer) -> None:
    result = await CrmLookup().lookup(action(crm.url("/ok"), headers={"X-A": "v\r\nX-B: 1"}))
    assert result.error == "bad-header" and crm.requests == []


@on_loop
async def test_site_wide_limit_holds_back_and_then_runs(crm: CrmServer) -> None:
    lookup = CrmLookup(max_concurrent=2)
    results: list[HttpResult] = []
    done = asyncio.Event()

    def collect(result: HttpResult) -> None:
        results.append(result)
        if len(results) == 3:
            done.set()

    for _ in range(3):
        lookup.submit(action(crm.url("/slow"), timeout=20), collect)
    await crm.wait_holding(2)
    # Two look-ups hold the two slots; the third waits for one.
    await asyncio.sleep(0)
    assert lookup.stats.in_flight == 2 and len(crm.requests) == 2
    crm.release.set()
    await asyncio.wait_for(done.wait(), 10)
    assert [r.status for r in results] == [200, 200, 200]
    assert lookup.stats.most_in_flight == 2 and len(crm.requests) == 3


@on_loop
async def test_no_free_slot_before_the_timeout_is_busy(crm: CrmServer) -> None:
    lookup = CrmLookup(max_concurrent=1)
    first: list[HttpResult] = []
    task = lookup.submit(action(crm.url("/slow"), timeout=20), first.append)
    await crm.wait_holding(1)
    result = await lookup.lookup(action(crm.url("/ok"), timeout=0.1))
    assert result.error == "busy" and lookup.stats.busy == 1
    crm.release.set()
    await asyncio.wait_for(task, 10)
    assert first[0].status == 200 and len(crm.requests) == 1


@on_loop
async def test_close_cancels_running_lookups(crm: CrmServer) -> None:
    lookup = CrmLookup()
    answered: list[HttpResult] = []
    task = lookup.submit(action(crm.url("/slow"), timeout=20), answered.append)
    await crm.wait_holding(1)
    await lookup.close()
    assert task.cancelled() and answered == []
    assert (await lookup.lookup(action(crm.url("/ok")))).error == "closed"


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        CrmLookup(max_concurrent=0)


# --------------------------------------------------------------------------- with a flow

FLOW = textwrap.dedent("""\
    flows:
      main:
        start: lookup
        variables: [customer_name]
        nodes:
          lookup:
            type: http
            url: {url}
            timeout: 1
            headers: {{X-Api-Key: abc}}
            map:
              priority: customer.priority
              tier: customer.tier
              customer_name: customer.name
            next: sales
            on_failure: sorry
          sorry: {{type: play, prompt: sorry, next: sales}}
          sales: {{type: queue, queue: sales, priority: 3}}
""")


async def drive(tmp_path: Path, url: str,
                run_lookup: Callable[[HttpLookup], Awaitable[HttpResult]]) -> FlowRun:
    path = tmp_path / "ivr.yaml"
    path.write_text(FLOW.format(url=url))
    flows = load_flows(path, prompts={"sorry"}, queues={"sales"})
    run = FlowRun(flows["main"], 1000.0, "+4915112345", dialled="+4930555")
    lookup, _timer = run.take_actions()
    assert isinstance(lookup, HttpLookup) and lookup.headers == {"X-Api-Key": "abc"}
    run.handle(await run_lookup(lookup), 1000.5)
    return run


@on_loop
async def test_flow_gets_priority_and_tier_from_the_crm(crm: CrmServer, tmp_path: Path) -> None:
    run = await drive(tmp_path, crm.url("/ok"), CrmLookup().lookup)
    route = run.result
    assert isinstance(route, RouteToQueue)
    assert (route.queue, route.priority, route.tier) == ("sales", 42, "gold")
    assert route.variables["customer_name"] == SECRET_MARK
    assert route.variables["customer_source"] == "crm"
    assert json.loads(crm.requests[0].body)["dialled"] == "+4930555"


@pytest.mark.parametrize("path", ["/error", "/garbage", "/huge"])
@on_loop
async def test_flow_takes_the_fallback_when_the_crm_fails(
    crm: CrmServer, tmp_path: Path, path: str,
) -> None:
    run = await drive(tmp_path, crm.url(path), CrmLookup(max_body_bytes=4096).lookup)
    assert run.node.id == "sorry" and run.variables["http_error"]
    run.handle(PromptFinished("sorry"), 1001)
    route = run.result
    assert isinstance(route, RouteToQueue) and (route.priority, route.tier) == (3, None)


@on_loop
async def test_flow_with_the_crm_down(tmp_path: Path) -> None:
    run = await drive(tmp_path, f"http://127.0.0.1:{refused_port()}/", CrmLookup().lookup)
    assert run.node.id == "sorry" and run.variables["http_error"] == "connection-refused"
