"""Call control's supervision: a supervisor listens to, whispers to or barges into an agent's
call, by feature code (``*80``-``*82``) or the API, through the engine's mixer."""

from __future__ import annotations

import contextlib
import logging
import time
import uuid

from appliance.calls import CallControlError
from appliance.calls.leg import (
    Direction,
    EndReason,
    Leg,
    LegInput,
    Party,
    response_input,
)
from appliance.calls.model import (
    CAPABILITIES,
    SDP_HEADERS,
    Call,
    destination,
)
from appliance.log import kv
from appliance.sip.dialog import (
    DialogId,
    IncomingCall,
)
from media_core import sdp
from media_core.engine import (
    EngineError,
)
from media_core.sip import SipMessage

log = logging.getLogger("edgecc.calls")

class Supervision:
    """Supervisor listen, whisper and barge for ``CallControl`` (a part of it: the state lives there)."""

    def _supervise_refusal(self, supervisor: str, agent: str) -> Call | tuple[int, str]:
        """The call ``agent`` is on, or why ``supervisor`` may not join it."""
        account = self.config.sip.accounts_by_user.get(supervisor)
        if getattr(account, "role", "agent") != "supervisor":
            return 403, "Supervisors Only"
        if agent not in self.config.sip.accounts_by_user:
            return 404, "Unknown Agent"
        for call in self.calls.values():
            if (call.agent == agent and call.connected is not None and call.ended_at is None
                    and call.direction in ("inbound", "outbound")):
                return call
        return 409, "Agent Not On A Call"

    def _supervision_legs(self, call: Call) -> tuple[int, int]:
        """(customer media, agent media) of a connected call."""
        assert call.connected is not None
        if call.direction == "outbound":
            return call.connected.media, call.media
        return call.media, call.connected.media

    def _supervisor_dialled(self, event: IncomingCall, supervisor: str, mode: str,
                            agent: str) -> None:
        """A supervisor's ``*80``/``*81``/``*82`` + agent: answer and join the agent's call."""
        signalling = self._signalling()
        target = self._supervise_refusal(supervisor, agent)
        if isinstance(target, tuple):
            signalling.answer(event.key, target[0], reason=target[1])
            return
        request = event.request
        now = time.time()
        try:
            offer = sdp.parse(request.body)
            address = self.engine.allocate_leg(self.media_host)
        except (sdp.SdpError, EngineError, OSError):
            signalling.answer(event.key, 488)
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        try:
            negotiated = session.answer(offer)
        except sdp.SdpError:
            self._release_media(address.leg)
            signalling.answer(event.key, 488)
            return
        self._apply_media(address.leg, negotiated)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:supervisor", Direction.INBOUND, Party.AGENT, now)
        call = Call(call_id, request.call_id, supervisor, agent, "", event.key, event.dialog,
                    leg, address.leg, session, negotiated.sdp.to_bytes(), now,
                    agent=supervisor, direction="supervise",
                    supervising=(mode, target.call_id))
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[address.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        leg.handle(LegInput.ANSWER, now)
        signalling.answer(event.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        self._join_supervisor(call, target, supervisor, f"sip:{supervisor}")

    def _join_supervisor(self, call: Call, target: Call, by: str, source: str) -> None:
        """Mix ``call`` (the supervisor's) into ``target`` and audit it: ``by`` is who asked
        (the supervisor's extension, or the API user), ``source`` from where (``sip:EXT`` for a
        feature code, ``api`` for ``supervise()``)."""
        assert call.supervising is not None
        mode = call.supervising[0]
        customer, agent_media = self._supervision_legs(target)
        join = {"listen": self.engine.monitor, "whisper": self.engine.whisper,
                "barge": self.engine.barge}[mode]
        join(call.media, customer, agent_media)
        target.supervisors.append(call)
        self._audit(by, f"call.{mode}", kv(call=target.call_id, agent=target.agent or "",
                                            supervisor=call.caller, source=source))
        log.info(kv(event="supervisor_joined", call=target.call_id, supervisor=call.caller,
                    agent=target.agent or "", mode=mode))
        self._emit("call.supervise", {"call_id": target.call_id, "supervisor": call.caller,
                                      "agent": target.agent, "mode": mode, "by": by,
                                      "source": source},
                   time.time())

    def _supervisor_gone(self, call: Call) -> None:
        """The supervisor's call ended: caller and agent hear each other only again."""
        if call.supervising is None:
            return
        target = self.calls.get(call.supervising[1])
        if target is None or call not in target.supervisors:
            return
        target.supervisors.remove(call)
        if target.connected is not None and target.ended_at is None:
            customer, agent_media = self._supervision_legs(target)
            with contextlib.suppress(EngineError):
                self.engine.stop_listening(call.media, customer, agent_media)
        log.info(kv(event="supervisor_left", call=target.call_id, supervisor=call.caller))

    def supervise(self, supervisor: str, agent: str, mode: str, *, by: str) -> str:
        """Ring ``supervisor``'s phone; when answered, join ``agent``'s current call in
        ``mode`` (listen, whisper, barge). Returns the supervisor's call id. 400 bad mode;
        403 not a supervisor; 404 unknown agent; 409 the agent is on no call or the
        supervisor's phone is not registered."""
        if mode not in ("listen", "whisper", "barge"):
            raise CallControlError(400, f"mode must be listen, whisper or barge, got {mode!r}")
        target = self._supervise_refusal(supervisor, agent)
        if isinstance(target, tuple):
            raise CallControlError(*target)
        bindings = self.registrar.lookup(supervisor, self.service.clock())
        if not bindings:
            raise CallControlError(409, f"supervisor {supervisor}'s phone is not registered")
        try:
            address = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            raise CallControlError(503, f"no media ports: {exc}") from exc
        now = time.time()
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:supervisor", Direction.OUTBOUND, Party.AGENT, now)
        realm = self.config.sip.realm
        binding = bindings[0]
        leg.handle(LegInput.DIAL, now)
        key = self._signalling().invite(
            from_party=f'"{mode} {agent}" <sip:edgecc@{realm}>',
            to_party=f"<sip:{supervisor}@{realm}>", request_uri=binding.contact,
            destination=destination(binding), body=session.offer().to_bytes())
        call = Call(call_id, "", supervisor, agent, "", key, DialogId("", "", ""), leg,
                    address.leg, session, b"", now, agent=supervisor, direction="supervise",
                    supervising=(mode, target.call_id))
        call.ended_by = by
        self.calls[call_id] = call
        self._by_invite[key] = (call, None)
        self._by_media[address.leg] = call
        log.info(kv(event="supervisor_ringing", supervisor=supervisor, agent=agent, mode=mode,
                    by=by))
        return call_id

    def _supervisor_response(self, call: Call, response: SipMessage,
                             dialog: DialogId | None) -> None:
        """Responses to the INVITE ringing a supervisor for ``supervise()``."""
        status = response.status or 0
        now = time.time()
        if dialog is not None and (200 <= status < 300 or call.dialog.call_id == ""):
            call.dialog = dialog
            self._by_dialog[dialog] = (call, None)
        inp = response_input(status, response.body)
        if not call.leg.can_take(inp):
            return
        call.leg.handle(inp, now, code=status)
        if status >= 300:
            call.end_reason = "supervisor-unavailable"
            self._caller_gone(call, call.end_reason)
            return
        if inp is not LegInput.RX_2XX:
            return
        assert call.supervising is not None
        target = self.calls.get(call.supervising[1])
        try:
            negotiated = call.session.receive_answer(sdp.parse(response.body))
        except sdp.SdpError:
            negotiated = None
        if target is None or target.connected is None or target.ended_at is not None \
                or negotiated is None:
            if dialog is not None:
                self._signalling().hangup(dialog)
            if call.leg.can_take(LegInput.HANGUP):
                call.leg.handle(LegInput.HANGUP, now, reason=EndReason.SYSTEM)
            return
        self._apply_media(call.media, negotiated)
        self._join_supervisor(call, target, call.ended_by or call.caller, "api")
