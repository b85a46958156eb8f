"""Call control and recordings over the API (docs/api.md, *Call control*).

Supervisors and admins list the calls in progress and act on them (hang up, hold, resume,
blind and attended transfer, click-to-dial, pause and resume the recording,
listen/whisper/barge), list and withdraw queued callbacks, search
the recordings and download one decrypted (every download leaves an audit row). Call control's
refusals (``CallControlError``: 404 unknown call or agent, 409 not possible now, 403 dial rule)
come back with their status and message. Agents' states and dispositions are the agent desk's
routes (``appliance.api.agents``).
"""

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as PathParam
from pydantic import BaseModel, Field

from appliance.api import ApiContext
from appliance.api.auth import require
from appliance.api.errors import ApiError, responses
from appliance.api.middleware import note
from appliance.api.users import Principal, Role
from appliance.config import SiteConfig
from appliance.recording.crypto import RecordingCryptoError, load_site_key
from appliance.recording.store import RecordingErased, RecordingStore, UnknownRecording
from appliance.store import open_site_db

CALL_ID = r"^[A-Za-z0-9._:@+-]{1,128}$"
AGENT = r"^[A-Za-z0-9._+-]{1,64}$"
NUMBER = r"^\+?[0-9*#]{1,32}$"
TARGET = r"^[A-Za-z0-9.*#+_-]{1,64}$"
MAX_SEARCH = 500
"""Most recordings one search returns."""
_AUTH = (401, 403)
_UNAVAILABLE = 503


# ------------------------------------------------------------------------------ models


class CallOut(BaseModel):
    """A call in progress."""

    call_id: str
    caller: str | None = None
    dialled: str | None = None
    queue: str | None = None
    agent: str | None = None
    state: str
    """Where the call is: ``ivr``, ``queued``, ``ringing``, ``connected`` ..."""
    since: float | None = None
    """Unix time the call entered its present state."""
    held: bool = False
    recording_paused: bool = False
    direction: str | None = None
    """``inbound`` (from the trunk), ``outbound`` (click-to-dial) ..., as call control says."""


class CallsOut(BaseModel):
    """The calls in progress."""

    calls: list[CallOut]


class TransferIn(BaseModel):
    """A blind transfer."""

    target: Annotated[str, Field(pattern=TARGET, description="agent, extension or number")]


class DialIn(BaseModel):
    """Click-to-dial: the agent's phone rings, then the number is called."""

    agent: Annotated[str, Field(pattern=AGENT)]
    number: Annotated[str, Field(pattern=NUMBER)]


class DialOut(BaseModel):
    """The new call."""

    call_id: str


class SuperviseIn(BaseModel):
    """Join an agent's call from the supervisor's phone."""

    agent: Annotated[str, Field(pattern=AGENT, description="the agent whose call to join")]
    mode: Literal["listen", "whisper", "barge"]
    phone: Annotated[str | None, Field(pattern=AGENT, description="the supervisor's SIP "
                                       "account (default: the caller's login name)")] = None


class Done(BaseModel):
    """The action was taken."""

    ok: Literal[True] = True


class CallbackOut(BaseModel):
    """A queued callback still to be made."""

    call_id: str
    """The request's id (the id of the call that asked for it)."""
    queue: str
    number: str
    """The number to call back."""
    caller: str | None = None
    """The requesting call's caller number."""
    priority: int
    requested_at: float
    """Unix time of the request."""
    place_at: float | None = None
    """Unix time the request holds its place in the queue from."""
    attempts: int
    """Dial attempts made so far."""
    state: str
    """``callback-waiting``, ``callback-dialling`` (an agent's phone or the customer is being
    rung: cannot be cancelled) or ``callback-retry`` (waiting for its next attempt)."""
    agent: str | None = None
    """The agent reserved while dialling."""
    position: int | None = None
    """1-based place in its queue."""


class CallbacksOut(BaseModel):
    """The pending callbacks, oldest place first."""

    callbacks: list[CallbackOut]


class RecordingOut(BaseModel):
    """One recording (no key)."""

    id: str
    call_id: str
    caller: str | None
    agent: str | None
    queue: str | None
    started_at: float
    ended_at: float | None
    legal_hold: bool
    erased: bool


class RecordingsOut(BaseModel):
    """Recordings found, oldest first."""

    recordings: list[RecordingOut]


# ------------------------------------------------------------------------------ recordings


class RecordingAccess:
    """The API's read side of the recording store: a connection of its own, used by worker
    threads one at a time."""

    def __init__(self, store: RecordingStore, *, owns_db: bool = True) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._owns_db = owns_db

    @classmethod
    def open(cls, config: SiteConfig) -> "RecordingAccess":
        """Open the site database and key of ``config``."""
        key = config.storage.site_key
        db = open_site_db(config.storage.database)
        try:
            store = RecordingStore(db, config.storage.recordings,
                                   load_site_key(Path(key).parent, Path(key).name))
        except BaseException:
            db.close()
            raise
        return cls(store)

    def close(self) -> None:
        """Close the connection (when opened here)."""
        if self._owns_db:
            with self._lock:
                self.store.db.close()

    def search(self, *, caller: str | None = None, agent: str | None = None,
               queue: str | None = None, since: float | None = None,
               until: float | None = None, limit: int = 100) -> list[RecordingOut]:
        """Recordings matching every given filter (start time in [since, until)), oldest
        first, at most ``limit``."""
        where: list[str] = []
        args: list[str | float] = []
        for column, value in (("caller", caller), ("agent", agent), ("queue", queue)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("started_at >= ?")
            args.append(since)
        if until is not None:
            where.append("started_at < ?")
            args.append(until)
        sql = ("SELECT id, call_id, caller, agent, queue, started_at, ended_at, legal_hold, "
               "wrapped_key IS NULL FROM recordings"
               + (" WHERE " + " AND ".join(where) if where else "")
               + " ORDER BY started_at, id LIMIT ?")
        with self._lock:
            rows = self.store.db.conn.execute(sql, (*args, limit)).fetchall()
        return [RecordingOut(id=r[0], call_id=r[1], caller=r[2], agent=r[3], queue=r[4],
                             started_at=r[5], ended_at=r[6], legal_hold=bool(r[7]),
                             erased=bool(r[8])) for r in rows]

    def wav(self, rid: str) -> tuple[bytes, str]:
        """The decrypted WAV of ``rid`` and its call id; UnknownRecording, RecordingErased,
        RecordingCryptoError (tampered or incomplete)."""
        with self._lock:
            info = self.store.get(rid)
            return self.store.read_wav(rid), info.call_id


# ------------------------------------------------------------------------------ routes


def _refusal(exc: Exception) -> ApiError | None:
    """A call-control or desk refusal (``status``, ``message``) as the API's error."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and 400 <= status < 500:
        return ApiError(status, str(getattr(exc, "message", exc)))
    return None


def _service(ctx: ApiContext, what: str) -> Any:
    if ctx.calls is None:
        raise ApiError(_UNAVAILABLE, "call control is not running on this appliance")
    return ctx.calls


def _act(service: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    action: Callable[..., Any] | None = getattr(service, method, None)
    if action is None:
        raise ApiError(_UNAVAILABLE, f"call control here cannot {method.replace('_', ' ')}")
    try:
        return action(*args, **kwargs)
    except Exception as exc:
        refusal = _refusal(exc)
        if refusal is None:
            raise
        raise refusal from None


def build_calls_router(ctx: ApiContext) -> APIRouter:
    """The call-control and recording routes bound to ``ctx``."""
    router = APIRouter(prefix="/api")
    supervisor = require(ctx.users, Role.SUPERVISOR)
    refusals = responses(400, *_AUTH, 404, 409, 413, 422, _UNAVAILABLE)
    CallId = Annotated[str, PathParam(pattern=CALL_ID, description="the call's id")]

    @router.get("/calls", response_model=CallsOut, tags=["calls"],
                summary="Calls in progress (supervisors, admins)",
                responses=responses(*_AUTH, _UNAVAILABLE))
    async def list_calls(principal: Annotated[Principal, Depends(supervisor)]) -> CallsOut:
        # async: call control lives on the event loop's thread.
        calls = _act(_service(ctx, "calls"), "active_calls")
        return CallsOut(calls=[CallOut(**{k: v for k, v in c.items()
                                          if k in CallOut.model_fields}) for c in calls])

    def _call_action(method: str, summary: str) -> None:
        @router.post(f"/calls/{{call_id}}/{method.replace('_', '/')}", response_model=Done,
                     tags=["calls"], summary=summary, responses=refusals,
                     name=f"call_{method}")
        async def action(call_id: CallId, request: Request,
                         principal: Annotated[Principal, Depends(supervisor)]) -> Done:
            note(request, action=f"call_{method}", call=call_id)
            name = {"recording_pause": "pause_recording",
                    "recording_resume": "resume_recording"}.get(method, method)
            _act(_service(ctx, "calls"), name, call_id, by=principal.name)
            return Done()

    _call_action("hangup", "Hang up a call")
    _call_action("hold", "Put the caller on hold")
    _call_action("resume", "Take the caller off hold")
    _call_action("recording_pause", "Pause the call's recording (e.g. card details)")
    _call_action("recording_resume", "Resume the call's recording")

    @router.post("/calls/{call_id}/transfer", response_model=Done, tags=["calls"],
                 summary="Blind transfer to an agent, extension or number", responses=refusals)
    async def transfer(call_id: CallId, body: TransferIn, request: Request,
                       principal: Annotated[Principal, Depends(supervisor)]) -> Done:
        note(request, action="call_transfer", call=call_id, target=body.target)
        _act(_service(ctx, "calls"), "transfer", call_id, body.target, by=principal.name)
        return Done()

    @router.post("/calls/{call_id}/consult", response_model=Done, tags=["calls"],
                 summary="Attended transfer: hold the caller and ring the target",
                 responses=refusals)
    async def consult(call_id: CallId, body: TransferIn, request: Request,
                      principal: Annotated[Principal, Depends(supervisor)]) -> Done:
        note(request, action="call_consult", call=call_id, target=body.target)
        _act(_service(ctx, "calls"), "consult", call_id, body.target, by=principal.name)
        return Done()

    @router.post("/calls/{call_id}/transfer/complete", response_model=Done, tags=["calls"],
                 summary="Attended transfer: bridge the caller to the consulted target",
                 responses=refusals)
    async def complete_transfer(call_id: CallId, request: Request,
                                principal: Annotated[Principal, Depends(supervisor)]) -> Done:
        note(request, action="call_transfer_complete", call=call_id)
        _act(_service(ctx, "calls"), "complete_transfer", call_id, by=principal.name)
        return Done()

    @router.post("/calls/{call_id}/consult/cancel", response_model=Done, tags=["calls"],
                 summary="Attended transfer: give up the consultation, back to the caller",
                 responses=refusals)
    async def cancel_consult(call_id: CallId, request: Request,
                             principal: Annotated[Principal, Depends(supervisor)]) -> Done:
        note(request, action="call_consult_cancel", call=call_id)
        _act(_service(ctx, "calls"), "cancel_consult", call_id, by=principal.name)
        return Done()

    @router.post("/calls/dial", response_model=DialOut, tags=["calls"],
                 summary="Click-to-dial: ring the agent, then call the number",
                 responses=responses(400, *_AUTH, 404, 409, 413, 422, _UNAVAILABLE))
    async def dial(body: DialIn, request: Request,
                   principal: Annotated[Principal, Depends(supervisor)]) -> DialOut:
        note(request, action="call_dial", agent=body.agent)
        call_id = _act(_service(ctx, "calls"), "dial", body.agent, body.number,
                       by=principal.name)
        note(request, call=call_id)
        return DialOut(call_id=str(call_id))

    @router.post("/supervise", response_model=Done, tags=["calls"],
                 summary="Listen to, whisper to or barge into an agent's call",
                 responses=refusals)
    async def supervise(body: SuperviseIn, request: Request,
                        principal: Annotated[Principal, Depends(supervisor)]) -> Done:
        phone = body.phone or principal.name
        note(request, action=f"supervise_{body.mode}", agent=body.agent, phone=phone)
        _act(_service(ctx, "calls"), "supervise", phone, body.agent, body.mode,
             by=principal.name)
        return Done()

    @router.get("/callbacks", response_model=CallbacksOut, tags=["calls"],
                summary="Queued callbacks still to be made (supervisors, admins)",
                responses=responses(*_AUTH, _UNAVAILABLE))
    async def list_callbacks(principal: Annotated[Principal, Depends(supervisor)]
                             ) -> CallbacksOut:
        # async: call control lives on the event loop's thread.
        pending = _act(_service(ctx, "calls"), "pending_callbacks")
        return CallbacksOut(callbacks=[
            CallbackOut(**{k: v for k, v in c.items() if k in CallbackOut.model_fields})
            for c in pending])

    @router.delete("/callbacks/{call_id}", response_model=Done, tags=["calls"],
                   summary="Withdraw a pending callback (audited); 409 while it is dialled",
                   responses=responses(*_AUTH, 404, 409, 422, _UNAVAILABLE))
    async def cancel_callback(call_id: CallId, request: Request,
                              principal: Annotated[Principal, Depends(supervisor)]) -> Done:
        note(request, action="callback_cancel", call=call_id)
        _act(_service(ctx, "calls"), "cancel_callback", call_id, by=principal.name)
        return Done()

    @router.get("/recordings", response_model=RecordingsOut, tags=["recordings"],
                summary="Search recordings by caller, agent, queue and time (supervisors, "
                        "admins)", responses=responses(*_AUTH, 422, _UNAVAILABLE))
    def search(
        principal: Annotated[Principal, Depends(supervisor)],
        caller: Annotated[str | None, Query(max_length=64)] = None,
        agent: Annotated[str | None, Query(max_length=64)] = None,
        queue: Annotated[str | None, Query(max_length=64)] = None,
        since: Annotated[float | None, Query(ge=0, le=1e11, allow_inf_nan=False,
                                             description="Unix time, inclusive")] = None,
        until: Annotated[float | None, Query(ge=0, le=1e11, allow_inf_nan=False,
                                             description="Unix time, exclusive")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_SEARCH)] = 100,
    ) -> RecordingsOut:
        if ctx.recordings is None:
            raise ApiError(_UNAVAILABLE, "recordings are not available on this appliance")
        return RecordingsOut(recordings=ctx.recordings.search(
            caller=caller, agent=agent, queue=queue, since=since, until=until, limit=limit))

    @router.get("/recordings/{recording_id}/audio", tags=["recordings"],
                summary="Download a recording, decrypted, as WAV (supervisors, admins; "
                        "audited)",
                response_class=Response,
                responses={200: {"content": {"audio/wav": {}},
                                 "description": "The stereo WAV (caller left, agent right)"},
                           **responses(*_AUTH, 404, 409, 422, _UNAVAILABLE)})
    def download(recording_id: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_-]{1,64}$")],
                 request: Request,
                 principal: Annotated[Principal, Depends(supervisor)]) -> Response:
        if ctx.recordings is None:
            raise ApiError(_UNAVAILABLE, "recordings are not available on this appliance")
        client = request.client
        source = f"{client.host}:{client.port}" if client else "unknown"
        try:
            wav, call_id = ctx.recordings.wav(recording_id)
        except UnknownRecording:
            raise ApiError(404, f"no recording {recording_id}") from None
        except RecordingErased as exc:
            ctx.users.audit(f"api:{principal.name}", "recording_download_refused",
                            recording=recording_id, reason="erased", source=source)
            raise ApiError(409, str(exc)) from None
        except RecordingCryptoError as exc:
            ctx.users.audit(f"api:{principal.name}", "recording_download_refused",
                            recording=recording_id, reason="integrity", source=source)
            raise ApiError(409, f"recording {recording_id} failed its integrity check: "
                           f"{type(exc).__name__}") from None
        # Written before the audio leaves: no download without its row.
        ctx.users.audit(f"api:{principal.name}", "recording_download", recording=recording_id,
                        call=call_id, bytes=len(wav), source=source)
        return Response(wav, media_type="audio/wav", headers={
            "Content-Disposition": f'attachment; filename="{recording_id}.wav"',
            "Cache-Control": "no-store"})

    return router
