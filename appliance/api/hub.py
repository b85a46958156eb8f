"""An in-process publish/subscribe hub for live events (queue, agent, call, health).

Parts of the appliance publish on the event loop; each WebSocket client holds a subscription
with a bounded queue. A subscriber too slow to keep up is cut off rather than let its queue grow:
it gets ``overflowed`` and the WebSocket ends it, so one stuck browser never costs memory.
Events are serialised to JSON once, when published, and shared by every subscriber; an event
published while nobody is subscribed is only counted (nobody can receive it, so it is neither
serialised nor checked), except ``call.offered``, kept for agents whose phone rings later.

Agents see their own calls only: a subscriber below the supervisor role gets no
``call.offered`` as such, no event naming another agent, and no event of a call that was
never offered to it. When a call rings at its agent (an event naming the agent and the call),
the call's ``call.offered`` is delivered first, so the desk still has the caller's details.
Supervisors and admins get everything.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from appliance.api.users import Role

DEFAULT_QUEUE_LIMIT = 1000
TOPIC_MAX_CHARS = 64
OFFERED_MEMORY = 2000
"""``call.offered`` events kept for agents whose phone rings later (oldest dropped first)."""
CALLS_PER_AGENT = 64
"""Calls an agent's subscription remembers as its own (oldest dropped first)."""


@dataclass(frozen=True)
class HubEvent:
    """One published event."""

    seq: int
    """Position in the hub's stream since start, from 1."""
    topic: str
    """What it is about: ``queue``, ``agent``, ``call``, ``health`` ..."""
    at: float
    """Unix time of publication."""
    audience: Role
    """Lowest role that receives it."""
    data: Mapping[str, Any]
    """What was published."""
    agent: str | None = None
    """The agent the event names (its ``agent`` member), if any."""
    call_id: str | None = None
    """The call the event is about (its ``call_id`` member), if any."""

    @cached_property
    def message(self) -> str:
        """The JSON text sent to WebSocket clients (``type``, ``seq``, ``topic``, ``at``,
        ``data``); made once, on first use. TypeError/ValueError for data that is not JSON."""
        return json.dumps({"type": "event", "seq": self.seq, "topic": self.topic,
                           "at": self.at, "data": self.data},
                          allow_nan=False, separators=(",", ":"))


class Subscription:
    """One subscriber's bounded queue of events; get them with :meth:`get`."""

    def __init__(self, hub: Hub, role: Role, limit: int, agent: str | None = None) -> None:
        self.role = role
        """Events whose audience is above this role are not delivered."""
        self.agent = agent
        """The agent this subscriber acts for; below the supervisor role only its own calls
        and its own agent events are delivered (none when None)."""
        self.overflowed = False
        """True once an event was lost because the queue was full; then nothing more comes."""
        self._hub = hub
        self._queue: asyncio.Queue[HubEvent] = asyncio.Queue(limit)
        self._scoped = not role.allows(Role.SUPERVISOR)
        self._calls: OrderedDict[str, None] = OrderedDict()

    def _offer(self, event: HubEvent) -> None:
        if self.overflowed or not self.role.allows(event.audience):
            return
        if self._scoped and not self._mine(event):
            return
        self._put(event)

    def _put(self, event: HubEvent) -> None:
        if self.overflowed:
            return
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self._hub.unsubscribe(self)

    def _mine(self, event: HubEvent) -> bool:
        """Whether an agent-role subscriber may see ``event`` (its own agent and calls)."""
        if event.topic == "call.offered":
            return False  # every caller's number: delivered once the call rings here
        if event.agent is not None:
            if event.agent != self.agent:
                return False
            if event.call_id is not None and event.call_id not in self._calls:
                self._calls[event.call_id] = None
                if len(self._calls) > CALLS_PER_AGENT:
                    self._calls.popitem(last=False)
                offered = self._hub._offered.get(event.call_id)
                if offered is not None:
                    self._put(offered)
            return True
        if event.call_id is not None:
            return event.call_id in self._calls
        return True

    async def get(self, timeout: float) -> HubEvent | None:
        """The next event, or None when none came within ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    def pending(self) -> int:
        """Events queued and not yet taken."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop receiving events."""
        self._hub.unsubscribe(self)


class Hub:
    """Publish events to every subscriber; call :meth:`publish` on the event loop's thread
    (from another thread use :meth:`publish_threadsafe`)."""

    def __init__(self, *, clock: Callable[[], float] = time.time,
                 queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        self._clock = clock
        self._limit = queue_limit
        self._subscribers: set[Subscription] = set()
        self._seq = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._offered: OrderedDict[str, HubEvent] = OrderedDict()

    @property
    def subscribers(self) -> int:
        """Current number of subscriptions."""
        return len(self._subscribers)

    def subscribe(self, role: Role, agent: str | None = None) -> Subscription:
        """A new subscription receiving events meant for ``role`` (below supervisor: only
        those of ``agent`` and its calls); call on the loop."""
        self._loop = asyncio.get_running_loop()
        subscription = Subscription(self, role, self._limit, agent)
        self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Stop delivering to ``subscription`` (no error if already gone)."""
        self._subscribers.discard(subscription)

    def publish(self, topic: str, data: Mapping[str, Any], *,
                audience: Role = Role.AGENT) -> HubEvent:
        """Deliver an event to every subscriber whose role reaches ``audience``.

        ``data`` must be JSON-serialisable (TypeError/ValueError otherwise, nothing sent);
        it is checked when someone is subscribed (or for ``call.offered``), since only then is
        it serialised."""
        if not topic or len(topic) > TOPIC_MAX_CHARS:
            raise ValueError(f"topic must be 1 to {TOPIC_MAX_CHARS} characters, got {topic!r}")
        at = self._clock()
        agent, call_id = data.get("agent"), data.get("call_id")
        event = HubEvent(self._seq + 1, topic, at, audience, data,
                         agent if isinstance(agent, str) else None,
                         call_id if isinstance(call_id, str) else None)
        if self._subscribers or topic == "call.offered":
            event.message  # noqa: B018 -- serialised (and checked) now: raises, nothing sent
        self._seq += 1
        if event.call_id is not None:
            if topic == "call.offered":
                self._offered[event.call_id] = event
                if len(self._offered) > OFFERED_MEMORY:
                    self._offered.popitem(last=False)
            elif topic == "call.ended":
                self._offered.pop(event.call_id, None)
        for subscription in list(self._subscribers):
            subscription._offer(event)
        return event

    def publish_threadsafe(self, topic: str, data: Mapping[str, Any], *,
                           audience: Role = Role.AGENT) -> None:
        """:meth:`publish` from a thread other than the loop's (dropped when nobody has
        subscribed yet, since then there is no loop and nobody to tell)."""
        json.dumps(data, allow_nan=False)  # bad data fails here, in the caller's thread
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        loop.call_soon_threadsafe(lambda: self.publish(topic, data, audience=audience))
