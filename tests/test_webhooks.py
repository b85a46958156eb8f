"""Webhooks over real HTTP to a small asyncio HTTP server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from appliance.webhooks import ScreenPop, WebhookConfigError, WebhookSender, sign

pytestmark = pytest.mark.timeout(30)
SECRET = b"s3cret-for-tests"


def on_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop."""
    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())
    return run


class Receiver:
    """An HTTP/1.1 server that records each POST and answers from a script of statuses
    (the last one repeats); ``None`` in the script means: read the request, never answer."""

    def __init__(self, script: list[int | None]) -> None:
        self.script = list(script)
        self.requests: asyncio.Queue[tuple[dict[str, str], bytes]] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0
        self._hung: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in self._hung:
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        assert lines[0].startswith("POST /hook HTTP/1.1")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        body = await reader.readexactly(int(headers["content-length"]))
        status = self.script.pop(0) if len(self.script) > 1 else self.script[0]
        await self.requests.put((headers, body))
        if status is None:
            self._hung.append(writer)
            return
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    async def next(self) -> tuple[dict[str, str], bytes]:
        return await asyncio.wait_for(self.requests.get(), 10)


@contextlib.asynccontextmanager
async def running(script: list[int | None], **options: object
                  ) -> AsyncIterator[tuple[Receiver, WebhookSender]]:
    receiver = Receiver(script)
    await receiver.start()
    settings: dict[str, object] = {"secret": SECRET, "timeout_s": 2.0, "retries": 3,
                                   "backoff_s": 0.01}
    settings.update(options)
    sender = WebhookSender(f"http://127.0.0.1:{receiver.port}/hook", site="paris",
                           **settings)  # type: ignore[arg-type]
    await sender.start()
    try:
        yield receiver, sender
    finally:
        await sender.close(drain_s=0.5)
        await receiver.stop()


@on_loop
async def test_delivery_is_signed_and_verifiable() -> None:
    async with running([200]) as (receiver, sender):
        sender.post("alert.raised", {"rule": "calls_waiting", "queue": "sales"})
        headers, body = await receiver.next()
        assert await sender.flush(5)
    stamp = headers["x-edgecc-timestamp"]
    assert abs(int(stamp) - time.time()) < 60
    expected = sign(SECRET, stamp, body)
    assert hmac.compare_digest(headers["x-edgecc-signature"], expected)
    assert sign(b"other", stamp, body) != expected
    event = json.loads(body)
    assert event["kind"] == headers["x-edgecc-event"] == "alert.raised"
    assert event["id"] == headers["x-edgecc-delivery"] and event["site"] == "paris"
    assert event["payload"] == {"rule": "calls_waiting", "queue": "sales"}
    assert headers["content-type"] == "application/json"
    assert sender.stats.delivered == 1 and sender.stats.attempts == 1


@on_loop
async def test_server_errors_are_retried_with_the_same_delivery_id() -> None:
    async with running([500, 503, 200]) as (receiver, sender):
        sender.post("screen.pop", {"caller": "+331"})
        seen = [await receiver.next() for _ in range(3)]
        assert await sender.flush(5)
    assert len({h["x-edgecc-delivery"] for h, _ in seen}) == 1
    assert len({b for _, b in seen}) == 1
    assert (sender.stats.delivered, sender.stats.attempts, sender.stats.failed) == (1, 3, 0)


@on_loop
async def test_gives_up_after_the_retries_and_on_a_final_4xx() -> None:
    async with running([500], retries=2) as (receiver, sender):
        sender.post("a", {})
        assert await sender.flush(5)
        assert receiver.requests.qsize() == 3  # first try + 2 retries
        assert (sender.stats.failed, sender.stats.delivered) == (1, 0)
    async with running([400]) as (receiver, sender):
        sender.post("b", {})
        sender.post("c", {})
        assert await sender.flush(5)
        assert receiver.requests.qsize() == 2  # not retried
        assert sender.stats.failed == 2
    async with running([429, 200]) as (receiver, sender):
        sender.post("d", {})
        assert await sender.flush(5)
        assert sender.stats.delivered == 1 and sender.stats.attempts == 2


@on_loop
async def test_timeouts_and_refused_connections_are_retried() -> None:
    async with running([None, 204], timeout_s=0.3) as (receiver, sender):
        sender.post("slow", {})
        assert await sender.flush(10)
        assert receiver.requests.qsize() == 2
        assert sender.stats.delivered == 1
    # Nothing listens on the port of a server that stopped.
    receiver = Receiver([200])
    await receiver.start()
    port = receiver.port
    await receiver.stop()
    sender = WebhookSender(f"http://127.0.0.1:{port}/hook", secret=None, retries=2,
                           backoff_s=0.01)
    await sender.start()
    sender.post("x", {})
    assert await sender.flush(10)
    await sender.close()
    assert (sender.stats.attempts, sender.stats.failed) == (3, 1)


@on_loop
async def test_a_full_queue_drops_and_counts_never_blocks() -> None:
    async with running([None], timeout_s=5, queue_limit=3) as (receiver, sender):
        for i in range(10):
            sender.post("burst", {"i": i})  # returns at once, even with the receiver stuck
        await receiver.next()
        assert (sender.stats.queued, sender.stats.dropped) == (3, 7)
    # close() gave up the one in flight and the two queued: counted too, nothing raised.
    assert (sender.stats.dropped, sender.stats.delivered, sender.stats.failed) == (10, 0, 0)


@on_loop
async def test_bad_events_are_dropped_not_raised() -> None:
    async with running([200]) as (receiver, sender):
        sender.post("nan", {"x": float("nan")})
        sender.post("object", {"x": object()})
        sender.post("huge", {"x": "a" * 300_000})
        sender.post("fine", {"x": 1})
        headers, _ = await receiver.next()
        assert headers["x-edgecc-event"] == "fine"
        assert sender.stats.dropped == 3
    sender.post("after-close", {})
    assert sender.stats.dropped == 4


def test_bad_settings_are_refused() -> None:
    with pytest.raises(WebhookConfigError, match="http"):
        WebhookSender("ftp://example.com/x", secret=None)
    with pytest.raises(WebhookConfigError):
        WebhookSender("http://127.0.0.1/x", secret=None, queue_limit=0)


@on_loop
async def test_screen_pop_carries_the_ivr_facts() -> None:
    async with running([200]) as (receiver, sender):
        ScreenPop(sender).offered({"call_id": "c1", "caller": "+331", "dialled": "100",
                                   "queue": "sales", "agent": "1001", "priority": 5,
                                   "tier": "gold", "variables": {"account": "42"},
                                   "secret_stuff": "not sent"})
        headers, body = await receiver.next()
    assert headers["x-edgecc-event"] == "screen.pop"
    assert json.loads(body)["payload"] == {
        "call_id": "c1", "caller": "+331", "dialled": "100", "queue": "sales",
        "agent": "1001", "priority": 5, "tier": "gold", "flow": None,
        "variables": {"account": "42"}}


@on_loop
async def test_router_sends_each_kind_to_the_urls_that_asked() -> None:
    import tempfile
    from pathlib import Path

    from appliance.config import parse_site_yaml
    from appliance.webhooks import WebhookRouter

    alerts_only, everything = Receiver([200]), Receiver([200])
    await alerts_only.start()
    await everything.start()
    with tempfile.TemporaryDirectory() as directory:
        key = Path(directory) / "hook.key"
        key.write_bytes(b"0123456789abcdef-signing\n")
        key.chmod(0o600)
        config = parse_site_yaml(
            "sip: {tls_port: null}\nwebhooks:\n"
            f"  - url: http://127.0.0.1:{alerts_only.port}/hook\n"
            "    kinds: [alert.raised]\n    secret_file: hook.key\n    backoff: 0.01\n"
            f"  - url: http://127.0.0.1:{everything.port}/hook\n"
            "    kinds: [alert.raised, screen.pop]\n", site_dir=directory)
        router = WebhookRouter(config.webhooks, site="paris")
    await router.start()
    try:
        ScreenPop(router).offered({"call_id": "c1", "caller": "+331"})
        router.post("alert.raised", {"rule": "calls_waiting"})
        router.post("call.ended", {"call_id": "c1"})  # nobody asked for it
        first, _ = await everything.next()
        second, _ = await everything.next()
        signed, body = await alerts_only.next()
        assert [first["x-edgecc-event"], second["x-edgecc-event"]] == ["screen.pop",
                                                                         "alert.raised"]
        assert "x-edgecc-signature" not in first
        assert signed["x-edgecc-signature"] == sign(b"0123456789abcdef-signing",
                                                    signed["x-edgecc-timestamp"], body)
        for _, sender in router.routes:
            assert await sender.flush(5)
        assert alerts_only.requests.empty() and everything.requests.empty()
    finally:
        await router.close(0.5)
        await alerts_only.stop()
        await everything.stop()


def test_secret_files_are_checked(tmp_path) -> None:
    from appliance.webhooks import load_secret

    with pytest.raises(WebhookConfigError, match="No such file"):
        load_secret(tmp_path / "missing")
    loose = tmp_path / "loose"
    loose.write_bytes(b"0123456789abcdef")
    loose.chmod(0o644)
    with pytest.raises(WebhookConfigError, match="chmod 600"):
        load_secret(loose)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(WebhookConfigError, match="16 bytes"):
        load_secret(short)


class _Collected:
    """A Poster that keeps what it is given."""

    def __init__(self) -> None:
        self.posted: list[tuple[str, dict]] = []

    def post(self, kind: str, payload: dict) -> None:
        self.posted.append((kind, payload))


def test_the_pop_at_ringing_carries_the_facts_of_the_offer() -> None:
    sink = _Collected()
    pop = ScreenPop(sink, calls=2)
    pop.offered({"call_id": "c1", "caller": "+331", "dialled": "100", "flow": "main",
                 "at": 1.0})
    pop.offered({"call_id": "c1", "agent": "1001", "queue": "sales"})  # call.ringing
    assert [p for _, p in sink.posted] == [
        {"call_id": "c1", "caller": "+331", "dialled": "100", "queue": None, "agent": None,
         "priority": None, "tier": None, "flow": "main", "variables": {}},
        {"call_id": "c1", "caller": "+331", "dialled": "100", "queue": "sales",
         "agent": "1001", "priority": None, "tier": None, "flow": "main", "variables": {}}]
    # Bounded: the oldest call is forgotten first; a ringing without its offer still pops.
    pop.offered({"call_id": "c2", "caller": "+332"})
    pop.offered({"call_id": "c3", "caller": "+333"})
    pop.offered({"call_id": "c1", "agent": "1002"})
    assert sink.posted[-1][1]["caller"] is None and sink.posted[-1][1]["agent"] == "1002"
    with pytest.raises(ValueError):
        ScreenPop(sink, calls=0)
