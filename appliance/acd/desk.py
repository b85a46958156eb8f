"""The agent desk: what each agent chose (logged in, paused with a reason, logged out), kept in
the site database, audited, and told to the ACD router.

Rules of this file:

- Presence is a table (``PRESENCE_TABLE``): ``(presence, action) -> (next presence, router
  input)``. A pair that is not in the table is refused with ``DeskError`` 409 and writes nothing.
- Every change is one SQLite transaction: the ``agent_desk`` row (current presence), an
  ``audit_log`` row (who, when, from where) and an event-log row (``agent.*``). Either all three
  are written or none. The changes are committed by one writer thread
  (``appliance.dbwriter.DatabaseWriter``, each change a savepoint of a group commit), in the
  order they were made, so a change never waits for an fsync on the caller's thread (the event
  loop): the in-memory copy and ``on_event`` change at once, the rows follow. ``flush()`` waits
  for them; ``close()`` flushes and stops the writer. A crash loses at most the changes not
  committed yet, each whole.
- The desk returns router inputs (``AgentLogin``, ``AgentPause``, ...); it never calls the router.
  The router keeps the operational state (ringing, on call, wrap-up); ``view()`` combines both.
- ``restore()`` returns the inputs that bring a fresh router back to the persisted presence.
- ``watchdog()`` clears what the router holds for an agent (an offer ringing, a callback being
  dialled, a call in progress) that no live call explains, once it has stayed unexplained for
  the grace period; it is audited with actor ``watchdog``. ``stray_callers()`` does the same for
  callers the router still queues whose call is gone.

Time is a parameter; no clock, socket or event loop. The writer thread has a connection of its
own to the database file given (the given connection is only read, at start).
See docs/routing.md ("Agent states") for what a supervisor sees.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import re
import sqlite3
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlite_utils

from appliance import audit as audit_chain
from appliance import eventlog
from appliance.acd.model import (
    AUTO_PAUSE_REASON,
    AgentLogin,
    AgentLogout,
    AgentPause,
    AgentUnpause,
    AgentView,
    CallbackResult,
    CallEnded,
    CallerAbandon,
    OfferRejected,
    WrapUpEnded,
)
from appliance.dbwriter import DatabaseWriter, WriterClosed, WriterError
from appliance.log import kv

log = logging.getLogger("edgecc.acd.desk")

RouterInput = AgentLogin | AgentLogout | AgentPause | AgentUnpause | CallEnded | OfferRejected \
    | CallbackResult | CallerAbandon | WrapUpEnded
"""What the desk asks the router to do."""

MAX_DIGITS = 32
"""Longest digit string ``parse_feature_code`` looks at; longer is refused (a bounded buffer)."""
MAX_CALL_ID_CHARS = 128
"""Longest call id a disposition accepts."""
DTMF_CHARACTERS = frozenset("0123456789*#ABCD")
"""RFC 4733 §3.2 events 0-15: the characters a phone can send."""
_CODE_RE = re.compile(r"^[0-9*#]{1,8}$")
_ARGUMENT_RE = re.compile(r"^[0-9]{1,16}$")

DEFAULT_PAUSE_REASONS: Mapping[str, str] = {"1": "break", "2": "lunch", "3": "training"}
"""Pause reason code -> name, when ``site.yaml`` gives none."""
DEFAULT_DISPOSITIONS: Mapping[str, str] = {"1": "resolved", "2": "follow-up", "3": "escalated"}
"""Disposition code -> name, when ``site.yaml`` gives none."""
DEFAULT_WATCHDOG_GRACE = 10.0
"""Seconds something the router holds must stay unexplained before the watchdog clears it."""
MAX_PENDING_WRITES = 10_000
"""Changes made but not committed yet beyond which the desk refuses more (503): the writer is
stuck (disk full, database locked) and memory must not grow without bound."""
DEFAULT_CLOSE_TIMEOUT = 10.0
"""Seconds ``close()`` waits for the last changes to commit."""


class DeskError(Exception):
    """A desk request that cannot be done; nothing was written.

    ``status``: 404 unknown agent, 409 not possible in the agent's current presence, 400 bad
    input (unknown reason or disposition, a feature code with garbage). ``field`` names the
    request member at fault, when one is.
    """

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


class Presence(enum.Enum):
    """What the agent chose."""

    LOGGED_OUT = "logged-out"
    AVAILABLE = "available"
    PAUSED = "paused"


class DisplayState(enum.Enum):
    """What a supervisor sees: the choice, overridden by what the router is doing with the
    agent (ringing, on a call, in wrap-up)."""

    LOGGED_OUT = "logged-out"
    AVAILABLE = "available"
    RINGING = "ringing"
    ON_CALL = "on-call"
    WRAP_UP = "wrap-up"
    PAUSED = "paused"


@dataclass(frozen=True)
class DeskChange:
    """One audited change of an agent's presence."""

    agent: str
    """Agent id (SIP account user)."""
    before: Presence
    """Presence before the change."""
    after: Presence
    """Presence after it."""
    reason: str | None
    """Pause reason name (None unless paused)."""
    actor: str
    """Who made it (``api:NAME``, ``phone:EXT``, ``router``, ...)."""
    source: str
    """From where (client address, SIP source, ``router``)."""
    at: float
    """Unix time of the change."""


@dataclass(frozen=True)
class FeatureCode:
    """A feature code the agent dialled (or sent as RFC 4733 digits during a call)."""

    action: str
    """``login``, ``logout``, ``pause``, ``unpause``, ``disposition``, ``listen``, ``whisper``,
    ``barge``, ``record-pause`` or ``record-resume``."""
    argument: str | None
    """Pause reason code, disposition code or supervised agent; None when not given."""


@dataclass(frozen=True)
class FeatureCodes:
    """The feature code of each action, and the arguments the coded actions accept."""

    login: str = "*70"
    """Log in."""
    logout: str = "*71"
    """Log out."""
    pause: str = "*72"
    """Pause; followed by an optional pause reason code."""
    unpause: str = "*73"
    """Become available again."""
    disposition: str = "*74"
    """Followed by a disposition code for the last call."""
    listen: str = "*80"
    """Followed by the agent to listen to."""
    whisper: str = "*81"
    """Followed by the agent to whisper to."""
    barge: str = "*82"
    """Followed by the agent whose call to join."""
    record_pause: str = "*1"
    """In a call: pause the recording."""
    record_resume: str = "*2"
    """In a call: resume the recording."""
    pause_reasons: tuple[str, ...] = tuple(DEFAULT_PAUSE_REASONS)
    """Pause reason codes ``pause`` accepts."""
    dispositions: tuple[str, ...] = tuple(DEFAULT_DISPOSITIONS)
    """Disposition codes ``disposition`` accepts."""

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for action, field_name in _ACTION_FIELDS:
            code = getattr(self, field_name)
            if not isinstance(code, str) or not _CODE_RE.match(code):
                raise DeskError(400, f"feature code for {action} must be 1 to 8 of 0-9 * #, "
                                f"got {code!r}", field_name)
            if code in seen:
                raise DeskError(400, f"feature code {code} is given to both {seen[code]} and "
                                f"{action}", field_name)
            seen[code] = action


# (action, FeatureCodes field); the actions whose code takes an argument after it.
_ACTION_FIELDS = (
    ("login", "login"), ("logout", "logout"), ("pause", "pause"), ("unpause", "unpause"),
    ("disposition", "disposition"), ("listen", "listen"), ("whisper", "whisper"),
    ("barge", "barge"), ("record-pause", "record_pause"), ("record-resume", "record_resume"),
)
_WITH_ARGUMENT = frozenset({"pause", "disposition", "listen", "whisper", "barge"})
_ARGUMENT_REQUIRED = frozenset({"disposition", "listen", "whisper", "barge"})

DEFAULT_CODES = FeatureCodes()


def parse_feature_code(digits: str, codes: FeatureCodes = DEFAULT_CODES) -> FeatureCode | None:
    """The feature code ``digits`` dial, or None when they start with no feature code.

    The longest code that starts ``digits`` wins (so ``*7`` and ``*72`` may both be codes).
    Only ``*`` starts the feature codes' space: anything else that starts with no code is None
    whatever it holds (an E.164 number such as ``+15551234`` is for the dial rules, not the
    desk). Raises DeskError 400 for a code followed by what it does not take: an argument
    after a code that takes none, an unknown pause reason or disposition, a missing argument,
    or characters that are not DTMF digits (or ``*`` followed by such characters).
    """
    if not isinstance(digits, str):
        raise DeskError(400, f"digits must be a string, got {type(digits).__name__}", "digits")
    # Codes are at most 8 characters (_CODE_RE): only the head is compared, whatever the length.
    matches = sorted(((getattr(codes, f), a) for a, f in _ACTION_FIELDS
                      if digits.startswith(getattr(codes, f))), key=lambda m: -len(m[0]))
    if not matches and not digits.startswith("*"):
        return None
    if len(digits) > MAX_DIGITS:
        raise DeskError(400, f"more than {MAX_DIGITS} digits", "digits")
    if not set(digits) <= DTMF_CHARACTERS:
        raise DeskError(400, f"{digits!r} holds characters that are not DTMF digits "
                        "(0-9 * # A-D)", "digits")
    if not matches:
        return None
    code, action = matches[0]
    rest = digits[len(code):]
    if action not in _WITH_ARGUMENT:
        if rest:
            raise DeskError(400, f"{code} ({action}) takes nothing after it, got {rest!r}",
                            "digits")
        return FeatureCode(action, None)
    if not rest:
        if action in _ARGUMENT_REQUIRED:
            raise DeskError(400, f"{code} ({action}) needs a code after it", "digits")
        return FeatureCode(action, None)
    if not _ARGUMENT_RE.match(rest):
        raise DeskError(400, f"{code} ({action}) must be followed by digits 0-9, got {rest!r}",
                        "digits")
    if action == "pause" and rest not in codes.pause_reasons:
        raise DeskError(400, f"unknown pause reason code {rest!r} (known: "
                        f"{', '.join(codes.pause_reasons) or 'none'})", "reason")
    if action == "disposition" and rest not in codes.dispositions:
        raise DeskError(400, f"unknown disposition code {rest!r} (known: "
                        f"{', '.join(codes.dispositions) or 'none'})", "code")
    return FeatureCode(action, rest)


# --------------------------------------------------------------------------------------------
# The presence table: (presence, action) -> (next presence, router input maker).
# auto-pause: the router paused the agent itself; it needs no input.

_InputMaker = Callable[[str, str], list[RouterInput]]

PRESENCE_TABLE: dict[tuple[Presence, str], tuple[Presence, _InputMaker]] = {
    (Presence.LOGGED_OUT, "login"): (Presence.AVAILABLE, lambda a, r: [AgentLogin(a)]),
    (Presence.AVAILABLE, "logout"): (Presence.LOGGED_OUT, lambda a, r: [AgentLogout(a)]),
    (Presence.PAUSED, "logout"): (Presence.LOGGED_OUT, lambda a, r: [AgentLogout(a)]),
    (Presence.AVAILABLE, "pause"): (Presence.PAUSED, lambda a, r: [AgentPause(a, r)]),
    # A new reason replaces the old one (the router's table allows it too).
    (Presence.PAUSED, "pause"): (Presence.PAUSED, lambda a, r: [AgentPause(a, r)]),
    (Presence.PAUSED, "unpause"): (Presence.AVAILABLE, lambda a, r: [AgentUnpause(a)]),
    (Presence.AVAILABLE, "auto-pause"): (Presence.PAUSED, lambda a, r: []),
}

_EVENT_KIND = {"login": "agent.login", "logout": "agent.logout", "pause": "agent.pause",
               "unpause": "agent.unpause", "auto-pause": "agent.pause"}

_WHY_NOT = {
    "login": "is already logged in",
    "logout": "is not logged in",
    "pause": "must be logged in to pause",
    "unpause": "is not paused",
    "auto-pause": "is not available",
}


@dataclass(frozen=True)
class _Row:
    presence: Presence
    reason: str | None
    since: float
    actor: str
    source: str


class DeskService(Protocol):
    """What the API needs from the running appliance: the desk, and a way to hand the desk's
    router inputs to the running router (call control implements it, on the event loop)."""

    @property
    def desk(self) -> AgentDesk:
        """The agent desk."""
        ...

    def apply(self, inputs: Sequence[RouterInput]) -> None:
        """Feed ``inputs`` to the running router now and carry out its decisions."""
        ...

    def router_view(self, agent: str) -> AgentView | None:
        """The router's view of ``agent`` (None when there is no router or agent)."""
        ...


class RouterDeskService:
    """A DeskService over a router object in this process: ``apply`` feeds the inputs with
    ``clock()`` (the router's monotonic time) and hands the router's decisions (a list, maybe
    empty) to ``on_decisions`` — for call control, its ``_route``."""

    def __init__(self, desk: AgentDesk, router: Any, clock: Callable[[], float],
                 on_decisions: Callable[[list[Any]], None] | None = None) -> None:
        self._desk = desk
        self.router = router
        self.clock = clock
        self.on_decisions = on_decisions

    @property
    def desk(self) -> AgentDesk:
        """The agent desk."""
        return self._desk

    def apply(self, inputs: Sequence[RouterInput]) -> None:
        """Feed every input to the router; decisions go to ``on_decisions``. Inputs for an
        agent the router does not know (an agent in no queue) are skipped: such an agent has a
        presence but nothing to route."""
        for item in inputs:
            agent = getattr(item, "agent", None)
            if agent is not None and self.router_view(agent) is None:
                log.debug(kv(event="agent_not_routed", agent=agent,
                             input=type(item).__name__))
                continue
            decisions = self.router.handle(item, self.clock())
            if self.on_decisions is not None:
                # Even when empty: the adapter re-arms its router timer after every input.
                self.on_decisions(decisions)

    def router_view(self, agent: str) -> AgentView | None:
        """The router's view of ``agent``, None when the router does not know them."""
        try:
            return self.router.agent_view(agent)  # type: ignore[no-any-return]
        except Exception:  # the router refuses unknown agents with LocalProtocolError
            return None


def router_calls(snapshot: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Per agent, the calls a router holds for them (``call -> "on-call" | "ringing" |
    "dialling"``), from ``router.snapshot()``; the watchdog's ``held`` argument."""
    held: dict[str, dict[str, str]] = {}
    for agent, call, _queue, _at in snapshot.get("interactions", ()):  # type: ignore[misc]
        held.setdefault(agent, {})[call] = "on-call"
    for caller in snapshot.get("callers", ()):  # type: ignore[union-attr]
        if caller.state == "offered":
            kind = "ringing"
        elif caller.state == "callback-dialling":
            kind = "dialling"
        else:
            continue
        for agent in caller.offered_to:
            held.setdefault(agent, {})[caller.call] = kind
    return held


Write = Callable[[sqlite3.Connection, sqlite_utils.Database], None]
"""One change's rows, written inside the transaction the writer opened."""


class AgentDesk:
    """The persistent, audited presence of every configured agent.

    Changes are checked, applied in memory and handed to ``on_event`` at once; their rows are
    committed by ``writer`` (``DatabaseWriter``) in order. ``max_pending`` bounds the changes
    waiting for the database (beyond it a change is refused with 503 and nothing changes).
    Call ``close()`` at stop so that the last changes are committed.
    """

    def __init__(self, db: sqlite_utils.Database, *, agents: Iterable[str],
                 pause_reasons: Mapping[str, str] = DEFAULT_PAUSE_REASONS,
                 dispositions: Mapping[str, str] = DEFAULT_DISPOSITIONS, site_id: str,
                 on_event: Callable[[str, dict[str, Any]], None] | None = None,
                 watchdog_grace: float = DEFAULT_WATCHDOG_GRACE,
                 max_pending: int = MAX_PENDING_WRITES) -> None:
        self._db = db
        self._agents = tuple(dict.fromkeys(agents))
        self.pause_reasons = dict(pause_reasons)
        self.dispositions = dict(dispositions)
        if AUTO_PAUSE_REASON in self.pause_reasons.values():
            raise DeskError(400, f"{AUTO_PAUSE_REASON!r} is the router's own pause reason",
                            "pause_reasons")
        self.site_id = site_id
        self.on_event = on_event
        self.watchdog_grace = watchdog_grace
        self._rows: dict[str, _Row] = {}
        self._suspects: dict[tuple[str, str], float] = {}
        self._strays: dict[str, float] = {}
        """Router callers no call explains -> when first seen so (``stray_callers``)."""
        self._held: dict[tuple[str, str], tuple[str, float]] = {}
        """(agent, call) -> (kind, since): what the router held at the last watchdog run, as
        persisted in ``agent_desk_calls``."""
        self._load()
        self.writer = DatabaseWriter(db, name="agent_desk", limit=max_pending,
                                     own_connection=True)
        """Commits the changes, in order and in groups, on a connection of its own, off the
        caller's thread (``appliance.dbwriter``)."""
        self._last_write: concurrent.futures.Future[Any] | None = None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every change made so far is committed; False after ``timeout`` s."""
        return self.writer.flush(timeout)

    def written(self) -> concurrent.futures.Future[Any] | None:
        """The commit of the last change made (None before any): it resolves once that change
        and every one before it are committed, with the change's exception if its transaction
        failed. A caller that must answer only after the rows are on disk (the API) waits for
        it right after making the change."""
        return self._last_write

    def _check_room(self) -> None:
        """DeskError 503 when the writer cannot take a change now (stopped, or too many
        waiting); checked before anything changes."""
        try:
            self.writer.check_room()
        except WriterClosed:
            raise DeskError(503, "the agent desk is stopped") from None
        except WriterError:
            raise DeskError(503, f"{self.writer.pending} desk changes are waiting for the "
                            "database; try again shortly") from None

    def _submit(self, what: str, write: Write) -> concurrent.futures.Future[Any]:
        """Hand one change's rows to the writer (DeskError 503 when it cannot take them); the
        future resolves once they are committed."""
        self._check_room()
        try:
            future = self.writer.write(what, write)
        except WriterError as exc:  # another thread filled it since the check
            raise DeskError(503, str(exc)) from None
        self._last_write = future
        return future

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> bool:
        """Commit what is queued (waiting up to ``timeout`` s) and stop the writer; changes
        are refused (503) from now on. The connection given at construction stays open (its
        owner closes it)."""
        return self.writer.close(timeout)

    # ------------------------------------------------------------------ reads

    @property
    def agents(self) -> tuple[str, ...]:
        """The configured agents, in configuration order."""
        return self._agents

    def presence(self, agent: str) -> Presence:
        """The agent's presence (404 DeskError for an unknown agent)."""
        return self._row(agent).presence

    def reason(self, agent: str) -> str | None:
        """The current pause reason name, None unless paused."""
        return self._row(agent).reason

    def view(self, agent: str, router_view: AgentView | None) -> dict[str, Any]:
        """What a supervisor sees of ``agent``: ``state`` (a DisplayState value) is the router's
        operational state when it has one (on-call, then ringing, then wrap-up), else the
        presence; plus the presence, reason, since (Unix time), who set it and from where."""
        row = self._row(agent)
        state = DisplayState(row.presence.value)
        view: dict[str, Any] = {
            "agent": agent, "state": state.value, "presence": row.presence.value,
            "reason": row.reason, "since": row.since, "actor": row.actor, "source": row.source,
            "calls": 0, "ringing": 0, "missed": 0, "in_sync": True,
        }
        if router_view is not None:
            if router_view.interactions > 0:
                state = DisplayState.ON_CALL
            elif router_view.ringing > 0:
                state = DisplayState.RINGING
            elif router_view.in_wrap_up:
                state = DisplayState.WRAP_UP
            view.update(state=state.value, calls=router_view.interactions,
                        ringing=router_view.ringing, missed=router_view.missed,
                        in_sync=_ROUTER_PRESENCE[row.presence] == router_view.presence)
        return view

    # ------------------------------------------------------------------ changes

    def restore(self, now: float) -> list[RouterInput]:
        """The inputs that bring a fresh router (everyone logged out) to the persisted presence:
        ``AgentLogin`` for everyone logged in, then ``AgentPause`` for the paused.

        Calls the watchdog last saw the router hold for an agent died with the process that
        carried them: each is cleared now, audited as ``agent.watchdog`` by actor ``watchdog``
        (source ``restart``), so no agent comes back on a call or ringing."""
        if self._held:
            stale = sorted(self._held.items())
            self._held = {}

            def write(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
                for (agent, call), (kind, since) in stale:
                    self._audit(conn, now, "watchdog", "agent.watchdog",
                                {"agent": agent, "call_id": call, "cleared": kind,
                                 "since": since, "source": "restart"})
                conn.execute("DELETE FROM agent_desk_calls")

            self._submit("agent.watchdog:restart", write)
            for (agent, call), (kind, _since) in stale:
                log.warning(kv(event="agent_watchdog_cleared", agent=agent, call=call,
                               cleared=kind, source="restart"))
        out: list[RouterInput] = []
        for agent in self._agents:
            row = self._rows[agent]
            if row.presence is Presence.LOGGED_OUT:
                continue
            out.append(AgentLogin(agent))
            if row.presence is Presence.PAUSED:
                out.append(AgentPause(agent, row.reason or ""))
        return out

    def login(self, agent: str, now: float, *, actor: str, source: str) -> list[RouterInput]:
        """Log ``agent`` in (available)."""
        return self._change(agent, "login", None, now, actor, source)

    def logout(self, agent: str, now: float, *, actor: str, source: str) -> list[RouterInput]:
        """Log ``agent`` out; their calls in progress continue."""
        return self._change(agent, "logout", None, now, actor, source)

    def pause(self, agent: str, reason: str | None, now: float, *, actor: str,
              source: str) -> list[RouterInput]:
        """Pause ``agent``; ``reason`` is a pause reason code or name (None: no reason)."""
        return self._change(agent, "pause", self._reason_name(reason), now, actor, source)

    def unpause(self, agent: str, now: float, *, actor: str, source: str,
                in_wrap_up: bool = False) -> list[RouterInput]:
        """Make ``agent`` ready: available again if paused, and done with after-call work early
        when ``in_wrap_up`` (the router's view; audited, and in the event log, as ``agent.ready``).
        Refused (409) when the agent is neither paused nor in wrap-up."""
        row = self._row(agent)
        if not in_wrap_up:
            return self._change(agent, "unpause", None, now, actor, source)
        if row.presence is Presence.LOGGED_OUT:
            raise DeskError(409, f"agent {agent} {_WHY_NOT['unpause']}")
        self._check_room()  # before either change: both are written, or neither
        inputs = (self._change(agent, "unpause", None, now, actor, source)
                  if row.presence is Presence.PAUSED else [])
        self._action("agent.ready", agent, {"agent": agent, "actor": actor, "source": source},
                     now, actor)
        log.info(kv(event="agent_ready", agent=agent, actor=actor, source=source))
        return [*inputs, WrapUpEnded(agent)]

    def auto_paused(self, agent: str, missed: int, now: float) -> None:
        """Record that the router paused ``agent`` after ``missed`` offers rang out."""
        self._change(agent, "auto-pause", AUTO_PAUSE_REASON, now, "router", "router",
                     extra={"missed": missed})

    def disposition(self, agent: str, call_id: str, code: str, now: float, *, actor: str,
                    source: str) -> None:
        """Record the disposition ``code`` (a code or its name) of call ``call_id``."""
        self._row(agent)
        if not isinstance(call_id, str) or not 1 <= len(call_id) <= MAX_CALL_ID_CHARS \
                or not call_id.isprintable():
            raise DeskError(400, f"call_id must be 1 to {MAX_CALL_ID_CHARS} printable "
                            "characters", "call_id")
        key = self._lookup(code, self.dispositions, "disposition", "code")
        payload = {"agent": agent, "call_id": call_id, "code": key,
                   "disposition": self.dispositions[key], "actor": actor, "source": source}
        self._action("agent.disposition", agent, payload, now, actor)
        log.info(kv(event="agent_disposition", agent=agent, call=call_id, code=key))

    def _action(self, kind: str, agent: str, payload: dict[str, Any], now: float,
                actor: str) -> None:
        """An audited action that changes no presence: its audit row and ``kind`` event in
        one transaction of the writer, then the live feed."""
        site_id = self.site_id

        def write(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
            self._audit(conn, now, actor, kind, payload)
            eventlog.append(db, kind, payload, occurred_at=now, site_id=site_id, now=now)

        self._submit(f"{kind}:{agent}", write)
        self._emit(kind, payload, now)

    def watchdog(self, router_views: Mapping[str, AgentView], live: Mapping[str, set[str]],
                 now: float, *, held: Mapping[str, Mapping[str, str]] | None = None
                 ) -> list[RouterInput]:
        """Inputs that clear what the router holds for an agent but no live call explains.

        ``live``: agent -> call ids call control knows for that agent. ``held``: agent ->
        {call: "on-call" | "ringing" | "dialling"} the router holds (``router_calls(router.
        snapshot())``); without it only the counts of ``router_views`` can be compared, and a
        mismatch is logged but not cleared. Something is cleared once it has been unexplained
        for ``watchdog_grace`` seconds: a call with ``CallEnded``, a ringing offer with
        ``OfferRejected`` (not counted as a missed offer, so it never auto-pauses anyone), a
        callback being dialled with a failed ``CallbackResult``. Each clearance is audited with
        actor ``watchdog``. What the router holds is kept in ``agent_desk_calls`` (written when
        it changes) for ``restore()`` to clear after a crash.
        """
        if held is None:
            for agent, view in router_views.items():
                known = len(live.get(agent, ()))
                if view.interactions + view.ringing > known:
                    log.warning(kv(event="agent_watchdog_mismatch", agent=agent,
                                   router=view.interactions + view.ringing, live=known))
            return []
        suspects: dict[tuple[str, str], float] = {}
        due: list[tuple[str, str, str]] = []
        holding: dict[tuple[str, str], str] = {}
        for agent in sorted(held):
            for call, kind in sorted(held[agent].items()):
                holding[(agent, call)] = kind
                if call in live.get(agent, ()):
                    continue
                first = self._suspects.get((agent, call), now)
                suspects[(agent, call)] = first
                if now - first >= self.watchdog_grace:
                    due.append((agent, call, kind))
        out: list[RouterInput] = []
        for agent, call, _kind in due:
            del holding[(agent, call)]
        # What the router holds now, kept for restore() after a crash; written when it changes.
        noted: dict[tuple[str, str], tuple[str, float]] = {}
        for key, kind in holding.items():
            old = self._held.get(key)
            noted[key] = (kind, old[1] if old is not None and old[0] == kind else now)
        if due or noted != self._held:
            self._check_room()
            cleared = tuple(due)
            gone = tuple(key for key in self._held if key not in noted)
            added = tuple((agent, call, kind, since) for (agent, call), (kind, since)
                          in noted.items() if self._held.get((agent, call)) != (kind, since))

            def write(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
                for agent, call, kind in cleared:
                    self._audit(conn, now, "watchdog", "agent.watchdog",
                                {"agent": agent, "call_id": call, "cleared": kind,
                                 "source": "watchdog"})
                conn.executemany("DELETE FROM agent_desk_calls WHERE agent = ? AND call_id = ?",
                                 gone)
                conn.executemany("INSERT OR REPLACE INTO agent_desk_calls (agent, call_id, "
                                 "kind, since) VALUES (?, ?, ?, ?)", added)

            self._submit("agent.watchdog", write)
            self._held = noted
            for agent, call, kind in due:
                suspects.pop((agent, call))
                log.warning(kv(event="agent_watchdog_cleared", agent=agent, call=call,
                               cleared=kind))
                if kind == "on-call":
                    out.append(CallEnded(call, agent))
                elif kind == "ringing":
                    out.append(OfferRejected(call, agent))
                else:
                    out.append(CallbackResult(call, False))
        self._suspects = suspects
        return out

    def stray_callers(self, queued: Iterable[str], known: Container[str], now: float
                      ) -> list[RouterInput]:
        """``CallerAbandon`` for each caller the router queues (waiting, ringing an agent or a
        queued callback) that call control no longer carries, once it has been so for
        ``watchdog_grace`` seconds in a row: a caller whose call is gone must neither stay
        ahead of the living nor keep ringing agents one after the other.

        ``queued``: the router's caller ids (``router.snapshot()["callers"]``); ``known``: the
        call ids and pending callback requests call control has. Each is audited as
        ``queue.watchdog`` by actor ``watchdog`` (source ``watchdog``)."""
        suspects: dict[str, float] = {}
        due: list[str] = []
        for call in queued:
            if call in known:
                continue
            first = self._strays.get(call, now)
            if now - first >= self.watchdog_grace:
                due.append(call)
            else:
                suspects[call] = first
        self._strays = suspects
        if not due:
            return []
        self._check_room()
        cleared = tuple(due)

        def write(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
            for call in cleared:
                self._audit(conn, now, "watchdog", "queue.watchdog",
                            {"call_id": call, "cleared": "queued", "source": "watchdog"})

        self._submit("queue.watchdog", write)
        for call in cleared:
            log.warning(kv(event="queue_watchdog_cleared", call=call))
        return [CallerAbandon(call) for call in cleared]

    # ------------------------------------------------------------------ inside

    def _load(self) -> None:
        rows = {r[0]: r for r in self._db.conn.execute(
            "SELECT agent, presence, reason, since, actor, source FROM agent_desk")}
        for agent in self._agents:
            r = rows.get(agent)
            if r is None:
                self._rows[agent] = _Row(Presence.LOGGED_OUT, None, 0.0, "", "")
            else:
                self._rows[agent] = _Row(Presence(r[1]), r[2], float(r[3]), r[4], r[5])
        gone = sorted(set(rows) - set(self._agents))
        if gone:
            log.info(kv(event="agent_desk_unconfigured", agents=",".join(gone)))
        self._held = {(agent, call): (kind, float(since)) for agent, call, kind, since in
                      self._db.conn.execute(
                          "SELECT agent, call_id, kind, since FROM agent_desk_calls")}

    def _row(self, agent: str) -> _Row:
        row = self._rows.get(agent) if isinstance(agent, str) else None
        if row is None:
            raise DeskError(404, f"unknown agent {agent!r}", "agent")
        return row

    def _reason_name(self, reason: str | None) -> str | None:
        if reason is None or reason == "":
            return None
        return self.pause_reasons[self._lookup(reason, self.pause_reasons, "pause reason",
                                               "reason")]

    @staticmethod
    def _lookup(value: object, table: Mapping[str, str], what: str, field: str) -> str:
        """The code of ``value``, given as a code or as its name."""
        if isinstance(value, str):
            if value in table:
                return value
            for code, name in table.items():
                if name == value:
                    return code
        known = ", ".join(f"{c} ({n})" for c, n in table.items()) or "none"
        raise DeskError(400, f"unknown {what} {value!r} (known: {known})", field)

    def _change(self, agent: str, action: str, reason: str | None, now: float, actor: str,
                source: str, extra: Mapping[str, Any] | None = None) -> list[RouterInput]:
        row = self._row(agent)
        step = PRESENCE_TABLE.get((row.presence, action))
        if step is None:
            raise DeskError(409, f"agent {agent} {_WHY_NOT[action]} (now {row.presence.value})")
        after, make_inputs = step
        new = _Row(after, reason if after is Presence.PAUSED else None, now, actor, source)
        kind = _EVENT_KIND[action]
        payload: dict[str, Any] = {"agent": agent, "actor": actor, "source": source}
        if kind == "agent.pause":
            payload["reason"] = new.reason
        payload.update(extra or {})
        site_id = self.site_id

        def write(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
            # The three rows of one change, in one transaction (the writer opened it).
            conn.execute(
                "INSERT INTO agent_desk (agent, presence, reason, since, actor, source) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (agent) DO UPDATE SET "
                "presence = excluded.presence, reason = excluded.reason, "
                "since = excluded.since, actor = excluded.actor, source = excluded.source",
                (agent, after.value, new.reason, now, actor, source))
            self._audit(conn, now, actor, kind,
                        {"agent": agent, "before": row.presence.value, "after": after.value,
                         "reason": new.reason or "", "source": source})
            eventlog.append(db, kind, payload, occurred_at=now, site_id=site_id, now=now)

        self._submit(f"{kind}:{agent}", write)
        self._rows[agent] = new
        change = DeskChange(agent, row.presence, after, new.reason, actor, source, now)
        log.info(kv(event="agent_presence", agent=agent, before=change.before.value,
                    after=change.after.value, reason=change.reason or "", actor=actor,
                    source=source))
        self._emit(kind, payload, now)
        return make_inputs(agent, new.reason or "")

    @staticmethod
    def _audit(conn: Any, now: float, actor: str, action: str,
               detail: Mapping[str, Any]) -> None:
        # Chained inside this transaction: the row commits with the desk row and the event.
        audit_chain.append(conn, now, actor, action, kv(**detail))

    def _emit(self, kind: str, payload: dict[str, Any], at: float) -> None:
        # At once, before the commit (like call control's live-first kinds): no ``seq`` yet.
        if self.on_event is None:
            return
        try:
            self.on_event(kind, {**payload, "at": at})
        except Exception:
            log.exception(kv(event="on_event_failed", kind=kind))


_ROUTER_PRESENCE = {Presence.LOGGED_OUT: "logged-out", Presence.AVAILABLE: "ready",
                    Presence.PAUSED: "paused"}


def desk_from_config(db: sqlite_utils.Database, config: Any,
                     on_event: Callable[[str, dict[str, Any]], None] | None = None
                     ) -> tuple[AgentDesk, FeatureCodes]:
    """The desk and feature codes of a ``SiteConfig``: every SIP account of role ``agent`` and
    every queue member is an agent; codes, pause reasons and dispositions come from its ``agents:`` section."""
    section = getattr(config, "agents", None)
    pause_reasons = dict(section.pause_reasons) if section else dict(DEFAULT_PAUSE_REASONS)
    dispositions = dict(section.dispositions) if section else dict(DEFAULT_DISPOSITIONS)
    codes_cfg = dict(section.feature_codes) if section else {}
    codes = FeatureCodes(**{k.replace("-", "_"): v for k, v in codes_cfg.items()},
                         pause_reasons=tuple(pause_reasons), dispositions=tuple(dispositions))
    agents = [a.user for a in config.sip.accounts if a.role == "agent"]
    agents += [m for q in config.queues for m in q.members]
    desk = AgentDesk(db, agents=agents, pause_reasons=pause_reasons, dispositions=dispositions,
                     site_id=config.site.id, on_event=on_event,
                     watchdog_grace=section.watchdog_grace if section
                     else DEFAULT_WATCHDOG_GRACE)
    return desk, codes
