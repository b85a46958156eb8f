"""Call control's outbound part: an agent's phone, or click-to-dial from the API, calls a number
through the carrier trunk (dial rules per role, RFC 3261 §22.2 digest answered from the trunk's
HA1) or another agent's extension."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
import uuid
from typing import Any

from appliance.calls import CallControlError
from appliance.calls.leg import (
    Direction,
    EndReason,
    Leg,
    LegAction,
    LegInput,
    LegState,
    Party,
    response_input,
)
from appliance.calls.model import (
    CAPABILITIES,
    DIAL_REFUSALS,
    MAX_CALLS,
    SDP_HEADERS,
    AgentLeg,
    Call,
    InternalDial,
    destination,
    http_status,
    relay_status,
)
from appliance.ivr import runner as ivr
from appliance.ivr.lookup import listed_customer
from appliance.log import kv
from appliance.sip.dialog import (
    AckReceived,
    DialogId,
    IncomingCall,
    InDialogRequest,
)
from appliance.sip.source import Source
from appliance.sip.transaction import TransactionKey
from media_core import sdp
from media_core.engine import (
    EngineError,
)
from media_core.sip import SipMessage, build_response, new_tag

log = logging.getLogger("edgecc.calls")

def _retry_fields(challenged: SipMessage) -> dict[str, Any]:
    """What the INVITE answering a challenge keeps of the challenged one (RFC 3261 §8.1.3.5:
    the same Call-ID, To and From, CSeq one higher), read from the 401/407 that echoes it."""
    return {"call_id": challenged.call_id, "from_tag": challenged.from_.tag,
            "cseq": challenged.cseq[0] + 1}


class OutboundCalls:
    """The outbound calls of ``CallControl`` (a part of it: the state lives there)."""

    def _admit_agent_call(self, request: SipMessage, agent: str) -> SipMessage | None:
        """An authenticated agent's INVITE: the dial rules decide (docs/calls.md, "Dial
        rules"); a refusal is the response, None lets the INVITE through."""
        from appliance.calls.dialling import check_dial

        dialled = request.request_uri.user or ""
        refusal = self._feature_code(request, agent, dialled)
        if refusal is not False:
            return refusal  # type: ignore[return-value]
        if dialled in self.config.sip.accounts_by_user and dialled != agent:
            # Another agent's extension: rung directly (no dial rules, no carrier).
            if not self.registrar.lookup(dialled, self.service.clock()):
                log.info(kv(event="call_refused", reason="agent-unavailable", agent=agent,
                            dialled=dialled))
                return build_response(request, 480, "Agent Unavailable", to_tag=new_tag())
            if len(self._agent_invites) >= MAX_CALLS:
                self._agent_invites.clear()
            self._agent_invites[request.call_id] = (agent, InternalDial(dialled))
            return None
        if self.config.trunk.carrier is None:
            log.info(kv(event="call_refused", reason="no-outbound-route", agent=agent))
            return build_response(request, 403, "No Outbound Route", to_tag=new_tag())
        account = self.config.sip.accounts_by_user.get(agent)
        role = getattr(account, "role", "agent")
        live = sum(1 for c in self.calls.values()
                   if c.direction == "outbound" and c.caller == agent and c.ended_at is None)
        decision = check_dial(self.config.dialling, role, dialled, live)
        if not decision.allowed:
            log.info(kv(event="call_refused", reason=decision.reason, agent=agent, role=role,
                        dialled=dialled))
            phrase = DIAL_REFUSALS.get(decision.reason, "Forbidden")
            return build_response(request, decision.status, phrase, to_tag=new_tag())
        if len(self._agent_invites) >= MAX_CALLS:
            self._agent_invites.clear()  # never grows without bound; the phones retry
        self._agent_invites[request.call_id] = (agent, decision)
        return None

    def _outgoing(self, event: IncomingCall, agent: str, decision: Any) -> None:
        """An agent's admitted INVITE: answer its offer with an engine leg, dial the carrier
        with a second one; the agent's phone hears ringing until the carrier answers."""
        signalling = self._signalling()
        request = event.request
        now = time.time()
        if len(self.calls) >= MAX_CALLS:
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        # Late offer (RFC 3261 §13.2.1): no description in the INVITE; our offer goes in the
        # 200 when the far end answers and the phone's answer comes in the ACK.
        late = not request.body
        offer: sdp.SessionDescription | None = None
        if not late:
            try:
                offer = sdp.parse(request.body)
            except sdp.SdpError as exc:
                log.info(kv(event="call_refused", reason="bad-sdp", agent=agent,
                            detail=str(exc)))
                signalling.answer(event.key, 400, reason="Bad Session Description")
                return
        try:
            near = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="call_refused", reason="no-media-ports", error=str(exc)))
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, near.rtp_port,
                                   rtcp_port=near.rtcp_port)
        negotiated: sdp.Negotiated | None = None
        try:
            if offer is not None:
                negotiated = session.answer(offer)
        except sdp.NotAcceptable as exc:
            log.info(kv(event="call_refused", reason="no-common-codec", agent=agent,
                        detail=exc.reason))
            self._release_media(near.leg)
            signalling.answer(event.key, 488)
            return
        try:
            far = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="call_refused", reason="no-media-ports", error=str(exc)))
            self._release_media(near.leg)
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        if negotiated is not None:
            self._apply_media(near.leg, negotiated)
            description = negotiated.sdp.to_bytes()
        else:
            description = session.offer().to_bytes()
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:agent", Direction.INBOUND, Party.AGENT, now)
        call = Call(call_id, request.call_id, agent, decision.number, "", event.key,
                    event.dialog, leg, near.leg, session, description, now,
                    agent=agent, direction="outbound", record_outbound=decision.record,
                    internal=getattr(decision, "internal", False))
        if late:
            self._await_answer(event.dialog, call, None, initial=True)
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[near.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        far_session = sdp.MediaSession(CAPABILITIES, self.media_host, far.rtp_port,
                                       rtcp_port=far.rtcp_port)
        if call.internal:
            far_leg = AgentLeg(decision.number, Leg(f"{call_id}:{decision.number}",
                                                    Direction.OUTBOUND, Party.AGENT, now),
                               far.leg, far_session, offered=False)
        else:
            # The far party is the customer: "caller" in the leg's words.
            far_leg = AgentLeg(agent, Leg(f"{call_id}:carrier", Direction.OUTBOUND,
                                          Party.CALLER, now), far.leg, far_session,
                               offered=False, number=decision.number)
        call.agents[far_leg.leg.leg_id] = far_leg
        call.offered_at = now
        call.events.append(("call.dial", {
            "call_id": call_id, "agent": agent, "number": decision.number}, now))
        log.info(kv(event="call_dialling", call=call_id, agent=agent, number=decision.number,
                    sip_call_id=request.call_id))
        self._emit("call.dialling", {"call_id": call_id, "agent": agent,
                                     "number": decision.number}, now)
        far_leg.leg.handle(LegInput.DIAL, now)
        if call.internal:
            self._dial_extension(call, far_leg)
        else:
            self._dial_carrier(call, far_leg)

    def _dial_extension(self, call: Call, far_leg: AgentLeg) -> None:
        """INVITE to the dialled agent's registered phone (its answers are handled like the
        carrier's: 180 to the calling phone, 200 bridges)."""
        bindings = self.registrar.lookup(far_leg.agent, self.service.clock())
        if not bindings:
            self._carrier_failed(call, far_leg, 480)
            return
        realm = self.config.sip.realm
        key = self._signalling().invite(
            from_party=f"<sip:{call.caller}@{realm}>", to_party=f"<sip:{far_leg.agent}@{realm}>",
            request_uri=bindings[0].contact, destination=destination(bindings[0]),
            body=far_leg.session.offer().to_bytes())
        far_leg.key = key
        self._by_invite[key] = (call, far_leg)

    def dial(self, agent: str, number: str, *, by: str) -> str:
        """Click-to-dial: ring ``agent``'s phone; when answered, call ``number`` through the
        carrier under the dial rules (the agent hears it ring). Returns the call id. 403 dial
        rule or no carrier; 404 unknown agent; 400 not a number; 409 the phone is not
        registered or has too many calls."""
        from appliance.calls.dialling import check_dial

        account = self.config.sip.accounts_by_user.get(agent)
        if account is None:
            raise CallControlError(404, f"no SIP account {agent!r}")
        if self.config.trunk.carrier is None:
            raise CallControlError(403, "no outbound route (trunk.carrier is not set)")
        live = sum(1 for c in self.calls.values()
                   if c.direction == "outbound" and c.caller == agent and c.ended_at is None)
        decision = check_dial(self.config.dialling, account.role, number, live)
        if not decision.allowed:
            raise CallControlError(http_status(decision.status),
                                   f"dial rules: {decision.reason}")
        bindings = self.registrar.lookup(agent, self.service.clock())
        if not bindings:
            raise CallControlError(409, f"agent {agent}'s phone is not registered")
        try:
            near = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            raise CallControlError(503, f"no media ports: {exc}") from exc
        now = time.time()
        session = sdp.MediaSession(CAPABILITIES, self.media_host, near.rtp_port,
                                   rtcp_port=near.rtcp_port)
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:agent", Direction.OUTBOUND, Party.AGENT, now)
        leg.handle(LegInput.DIAL, now)
        realm = self.config.sip.realm
        binding = bindings[0]
        key = self._signalling().invite(
            from_party=f'"{decision.number}" <sip:{decision.number}@{realm}>',
            to_party=f"<sip:{agent}@{realm}>", request_uri=binding.contact,
            destination=destination(binding), body=session.offer().to_bytes())
        call = Call(call_id, "", agent, decision.number, "", key, DialogId("", "", ""), leg,
                    near.leg, session, b"", now, agent=agent, direction="outbound",
                    record_outbound=decision.record, click_to_dial=True)
        call.ended_by = None
        self.calls[call_id] = call
        self._by_invite[key] = (call, None)
        self._by_media[near.leg] = call
        self._audit(by, "call.dial", kv(agent=agent, number=decision.number))
        log.info(kv(event="click_to_dial", call=call_id, agent=agent, number=decision.number,
                    by=by))
        self._emit("call.dialling", {"call_id": call_id, "agent": agent,
                                     "number": decision.number}, now)
        return call_id

    def _click_response(self, call: Call, response: SipMessage,
                        dialog: DialogId | None) -> None:
        """The agent's phone answered (or not) our click-to-dial INVITE."""
        status = response.status or 0
        now = time.time()
        if dialog is not None and 200 <= status < 300:
            call.dialog = dialog
            call.sip_call_id = dialog.call_id
            self._by_dialog[dialog] = (call, None)
        inp = response_input(status, response.body)
        if not call.leg.can_take(inp):
            return
        actions = call.leg.handle(inp, now, code=status)
        if status >= 300:
            call.end_reason = "agent-unavailable"
            call.end_code = status
            self._caller_gone(call, call.end_reason)
            return
        if inp is not LegInput.RX_2XX:
            return
        if LegAction.SEND_BYE in actions or call.ended_at is not None:
            if dialog is not None:
                self._signalling().hangup(dialog)
            return
        try:
            negotiated = call.session.receive_answer(sdp.parse(response.body))
            far = self.engine.allocate_leg(self.media_host)
        except (sdp.SdpError, EngineError, OSError) as exc:
            log.info(kv(event="click_to_dial_failed", call=call.call_id, detail=str(exc)))
            call.end_reason = "system"
            self._hangup_caller(call, EndReason.SYSTEM)
            return
        self._apply_media(call.media, negotiated)
        far_session = sdp.MediaSession(CAPABILITIES, self.media_host, far.rtp_port,
                                       rtcp_port=far.rtcp_port)
        far_leg = AgentLeg(call.caller, Leg(f"{call.call_id}:carrier", Direction.OUTBOUND,
                                            Party.CALLER, now), far.leg, far_session,
                           offered=False, number=call.dialled)
        call.agents[far_leg.leg.leg_id] = far_leg
        call.offered_at = now
        call.events.append(("call.dial", {"call_id": call.call_id, "agent": call.caller,
                                          "number": call.dialled}, now))
        far_leg.leg.handle(LegInput.DIAL, now)
        self._dial_carrier(call, far_leg)

    def _dial_carrier(self, call: Call, far_leg: AgentLeg,
                      authorization: tuple[str, str] | None = None,
                      challenged: SipMessage | None = None) -> None:
        """INVITE to ``trunk.carrier``; after the ``challenged`` INVITE's 401/407, again with
        ``authorization``, the same Call-ID and From tag and CSeq + 1 (RFC 3261 §22.2,
        §8.1.3.5)."""
        carrier = self.config.trunk.carrier
        assert carrier is not None  # admission refused the call otherwise
        host = f"[{carrier.host}]" if ":" in carrier.host else carrier.host
        suffix = "" if carrier.transport == "UDP" else f";transport={carrier.transport.lower()}"
        number = far_leg.number or call.dialled
        uri = f"sip:{number}@{host}:{carrier.port}{suffix}"
        auth = self.config.trunk.auth
        from_user = auth.user if auth is not None else call.caller
        try:
            ipaddress.ip_address(carrier.host)
            destination: Source | None = Source(carrier.transport, carrier.host, carrier.port)
        except ValueError:
            destination = None  # a host name: the layer resolves the URI
        key = self._signalling().invite(
            from_party=f"<sip:{from_user}@{host}>", to_party=f"<sip:{number}@{host}>",
            request_uri=uri, destination=destination,
            headers=[authorization] if authorization is not None else [],
            body=far_leg.session.offer().to_bytes(),
            **(_retry_fields(challenged) if challenged is not None else {}))
        far_leg.key = key
        self._by_invite[key] = (call, far_leg)

    def _carrier_response(self, call: Call, far_leg: AgentLeg, key: TransactionKey,
                          response: SipMessage, dialog: DialogId | None) -> None:
        status = response.status or 0
        now = time.time()
        if key != far_leg.key:
            return  # the challenged INVITE's late responses
        if status in (401, 407) and call.ended_at is None and self._answer_challenge(
                call, far_leg, response):
            return
        if dialog is not None and (far_leg.dialog is None or 200 <= status < 300):
            far_leg.dialog = dialog
            self._by_dialog[dialog] = (call, far_leg)
        if status >= 300:
            self._carrier_failed(call, far_leg, status)
            return
        leg = far_leg.leg
        inp = response_input(status, response.body)
        if not leg.can_take(inp):
            return
        was_early = leg.state is LegState.EARLY
        actions = leg.handle(inp, now, code=status)
        if inp in (LegInput.RX_180, LegInput.RX_183):
            self._carrier_progress(call, far_leg, response, inp, now)
        if inp is not LegInput.RX_2XX:
            return
        if LegAction.SEND_BYE in actions or call.ended_at is not None:
            if dialog is not None:
                self._signalling().hangup(dialog)
            if leg.state is not LegState.TERMINATING and leg.can_take(LegInput.HANGUP):
                leg.handle(LegInput.HANGUP, now, reason=EndReason.AGENT_HUNG_UP)
            return
        try:
            # After early media the 2xx may leave the answer out: the 183's stands (RFC 3261
            # §13.2.1, the same answer in both).
            if response.body or not was_early:
                negotiated = far_leg.session.receive_answer(sdp.parse(response.body))
                self._apply_media(far_leg.media, negotiated)
        except sdp.SdpError as exc:
            log.info(kv(event="carrier_answer_unusable", call=call.call_id, detail=str(exc)))
            call.end_reason = "carrier-answer-unusable"
            self._hangup_agent(call, far_leg, EndReason.SYSTEM)
            self._hangup_caller(call, EndReason.SYSTEM, code=488)
            return
        if call.ivr_transfer is far_leg:
            self._ivr_transfer_answered(call, far_leg, now)
            return
        if far_leg.transfer:
            self._transfer_answered(call, far_leg, now)
            return
        call.connected = far_leg
        if call.agent:
            self._last_call[call.agent] = call.call_id
        call.answered_at = now
        self.engine.bridge(call.media, far_leg.media)
        self._arm_media_timeout(call.media, far_leg.media)
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        call.events.append(("call.connect", {
            "call_id": call.call_id, "agent": call.agent, "number": call.dialled,
            "ring_s": round(now - far_leg.leg.started_at, 3)}, now))
        call.recording_decision = "always" if call.record_outbound else "never"
        if call.record_outbound and self.recordings is not None:
            self._start_recording(call, far_leg.media, call.media, now)
        log.info(kv(event="call_connected", call=call.call_id, agent=call.agent,
                    direction="outbound", recording=call.recording is not None))

    def _carrier_progress(self, call: Call, far_leg: AgentLeg, response: SipMessage,
                          inp: LegInput, now: float) -> None:
        """A 180/183 from the carrier. A 183 with a description is early media (RFC 3960):
        the carrier's leg takes that answer and is bridged to the agent's phone at once, which
        gets a 183 with our description, so the agent hears the carrier's ringback and
        announcements; a 180 (or a 183 we cannot use) gives the phone a 180 and it plays its
        own ringback (RFC 3261 §21.1.2). A transfer's carrier leg: see ``_transfer_progress``."""
        if self._transfer_progress(call, far_leg, response, inp):
            return
        early = False
        if inp is LegInput.RX_183:
            # Only an outbound call's own leg is bridged early.
            early = self._take_early_answer(
                call, far_leg, response,
                bridge=call.direction == "outbound" and call.connected is None
                and not far_leg.transfer and call.ivr_transfer is not far_leg)
        if call.direction != "outbound":
            return
        # A phone that sent no offer cannot take ours in an unreliable 183 (no PRACK): 180.
        if early and call.dialog not in self._late_offers and (
                call.leg.can_take(LegInput.EARLY_MEDIA)):
            call.leg.handle(LegInput.EARLY_MEDIA, now)
            self._signalling().answer(call.key, 183, headers=SDP_HEADERS, body=call.answer_sdp)
            log.info(kv(event="early_media", call=call.call_id, agent=call.agent or ""))
        elif call.leg.can_take(LegInput.RING):
            call.leg.handle(LegInput.RING, now)
            self._signalling().answer(call.key, 180)

    def _take_early_answer(self, call: Call, far_leg: AgentLeg, response: SipMessage, *,
                           bridge: bool) -> bool:
        """A carrier 183's description answers the far leg's offer (whoever the leg is for: a
        2xx after it may leave the answer out); with ``bridge``, the leg is then bridged to the
        call's own leg so its early media is heard. True when bridged."""
        try:
            self._apply_media(far_leg.media, far_leg.session.receive_answer(
                sdp.parse(response.body)))
            if bridge:
                self.engine.bridge(call.media, far_leg.media)
            return bridge
        except (sdp.SdpError, EngineError) as exc:
            log.info(kv(event="early_media_unusable", call=call.call_id, detail=str(exc)))
            return False

    def _answer_challenge(self, call: Call, far_leg: AgentLeg, response: SipMessage) -> bool:
        """Answer the carrier's 401/407 once with ``trunk.auth`` (RFC 3261 §22.2); False when
        it cannot be answered (no credentials, a second challenge, another realm)."""
        from appliance.calls.dialling import trunk_authorization

        auth = self.config.trunk.auth
        status = response.status
        name = "WWW-Authenticate" if status == 401 else "Proxy-Authenticate"
        challenge = response.get(name)
        if auth is None or call.trunk_auth_sent or not challenge:
            log.info(kv(event="carrier_auth_failed", call=call.call_id, status=status,
                        reason="no-credentials" if auth is None else "challenged-again"))
            return False
        carrier = self.config.trunk.carrier
        assert carrier is not None
        host = f"[{carrier.host}]" if ":" in carrier.host else carrier.host
        suffix = "" if carrier.transport == "UDP" else f";transport={carrier.transport.lower()}"
        uri = f"sip:{far_leg.number or call.dialled}@{host}:{carrier.port}{suffix}"
        try:
            value = trunk_authorization(challenge, auth, method="INVITE", uri=uri)
        except (ValueError, KeyError) as exc:
            log.info(kv(event="carrier_auth_failed", call=call.call_id, status=status,
                        reason="unanswerable", detail=str(exc)))
            return False
        call.trunk_auth_sent = True
        if far_leg.key is not None:
            self._by_invite.pop(far_leg.key, None)
        log.info(kv(event="carrier_challenge_answered", call=call.call_id, status=status))
        # The INVITE again, carrying the credentials; the leg stays INVITING. Sent on the next
        # turn of the loop, after the transaction layer's ACK of the 401/407 (§17.1.1.3).
        asyncio.get_running_loop().call_soon(self._retry_carrier, call, far_leg, (
            "Authorization" if status == 401 else "Proxy-Authorization", value), response)
        return True

    def _retry_carrier(self, call: Call, far_leg: AgentLeg, authorization: tuple[str, str],
                       challenged: SipMessage) -> None:
        if call.ended_at is not None or call.finishing or (
                far_leg.leg.state in (LegState.ENDED, LegState.TERMINATING)):
            return  # the call ended while the challenge was being answered
        try:
            self._dial_carrier(call, far_leg, authorization, challenged)
        except Exception:
            log.exception(kv(event="call_internal_error", where="carrier_retry"))

    def _carrier_failed(self, call: Call, far_leg: AgentLeg, status: int) -> None:
        leg = far_leg.leg
        now = time.time()
        inp = response_input(status)
        if leg.can_take(inp):
            leg.handle(inp, now, code=status)
        elif leg.state is not LegState.ENDED and leg.can_take(LegInput.TIMEOUT):
            leg.handle(LegInput.TIMEOUT, now)
        log.info(kv(event="carrier_leg_ended", call=call.call_id, status=status,
                    reason=leg.end_reason.value if leg.end_reason else ""))
        self._agent_leg_over(call, far_leg)
        if call.ivr_transfer is far_leg:
            self._ivr_transfer_over(call, far_leg, status)
            self._maybe_finish(call)
            return
        if far_leg.transfer:
            if call.transfer is not None and call.transfer["to"] is far_leg:
                self._transfer_failed(call, status)
            self._maybe_finish(call)
            return
        if call.ended_at is None:
            call.end_reason = "carrier-busy" if status in (486, 600) else "carrier-rejected"
            call.end_code = status
            self._hangup_caller(call, EndReason.REJECTED, code=relay_status(status))
        self._maybe_finish(call)

    # -- late offer (RFC 3261 §13.2.1, RFC 3264 §5) --------------------------------------------

    def _await_answer(self, dialog: DialogId, call: Call, agent_leg: AgentLeg | None, *,
                      initial: bool) -> None:
        pending = self._late_offers
        if len(pending) >= MAX_CALLS:  # bounded: forget the calls that have ended
            for stale in [d for d, v in pending.items() if v[0].finishing]:
                del pending[stale]
        pending[dialog] = (call, agent_leg, initial)

    def _late_offer_call(self, event: IncomingCall, caller: str, dialled: str,
                         flow_name: str) -> None:
        """A carrier INVITE without a description: our offer goes in a 200 at once, the ACK
        brings the caller's answer and the IVR starts then. An unreliable 183 cannot carry an
        offer the caller could answer before the 2xx (§13.2.1; no PRACK), so such a call is
        answered before the IVR instead of running it as early media."""
        signalling = self._signalling()
        request = event.request
        now = time.time()
        try:
            address = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="call_refused", reason="no-media-ports", error=str(exc)))
            signalling.answer(event.key, 503, headers=[("Retry-After", "5")])
            return
        session = sdp.MediaSession(CAPABILITIES, self.media_host, address.rtp_port,
                                   rtcp_port=address.rtcp_port)
        offer = session.offer().to_bytes()
        call_id = uuid.uuid4().hex
        leg = Leg(f"{call_id}:caller", Direction.INBOUND, Party.CALLER, now)
        call = Call(call_id, request.call_id, caller, dialled, flow_name, event.key,
                    event.dialog, leg, address.leg, session, offer, now)
        self.calls[call_id] = call
        self._by_invite[event.key] = (call, None)
        self._by_dialog[event.dialog] = (call, None)
        self._by_media[address.leg] = call
        leg.handle(LegInput.INVITE_RECEIVED, now)
        leg.handle(LegInput.ANSWER, now)
        self._await_answer(event.dialog, call, None, initial=True)
        signalling.answer(event.key, 200, headers=SDP_HEADERS, body=offer)
        log.info(kv(event="call_started", call=call_id, caller=caller, dialled=dialled,
                    flow=flow_name, offer="late", sip_call_id=request.call_id))
        self._emit_offered(call, listed_customer(self.config.ivr.customers, caller), now)

    def _reoffer(self, event: InDialogRequest, call: Call, agent_leg: AgentLeg | None) -> None:
        """A re-INVITE without a description (RFC 3264 §5, e.g. a session refresh): we offer
        in the 200, the ACK answers."""
        session = agent_leg.session if agent_leg is not None else call.session
        self._await_answer(event.dialog, call, agent_leg, initial=False)
        self._signalling().answer(event.key, 200, headers=SDP_HEADERS,
                                  body=session.offer().to_bytes())

    def _ack_received(self, event: AckReceived) -> None:
        """The ACK of our 2xx: the call's own leg is connected; when the 2xx carried our
        offer, the ACK's answer sets the media (the IVR of a late-offer carrier call starts)
        or, unusable, ends the call."""
        now = time.time()
        entry = self._by_dialog.get(event.dialog)
        if entry is not None and entry[1] is None and entry[0].leg.can_take(LegInput.ACK):
            entry[0].leg.handle(LegInput.ACK, now)
        pending = self._late_offers.pop(event.dialog, None)
        if pending is None:
            return
        call, agent_leg, initial = pending
        if call.finishing or call.ended_at is not None:
            return
        session = agent_leg.session if agent_leg is not None else call.session
        media = agent_leg.media if agent_leg is not None else call.media
        body = event.request.body
        try:
            if not body:
                raise sdp.NotAcceptable("the ACK carries no answer (RFC 3261 §13.2.1)")
            try:
                described = sdp.parse(body)
            except sdp.SdpError as exc:
                raise sdp.NotAcceptable(f"the ACK's answer is unreadable: {exc}") from exc
            negotiated = session.receive_answer(described)
            self._apply_media(media, negotiated)
        except (sdp.SdpError, EngineError) as exc:
            self._late_answer_refused(call, agent_leg, event.dialog, str(exc))
            return
        log.info(kv(event="late_offer_answered", call=call.call_id,
                    leg=(agent_leg.leg if agent_leg is not None else call.leg).leg_id,
                    codec=negotiated.codec.name, initial=initial))
        if initial and call.direction == "inbound" and call.run is None:
            call.run = ivr.FlowRun(self.flows[call.flow_name], now, call.caller,
                                   dialled=call.dialled,
                                   customer=listed_customer(self.config.ivr.customers,
                                                            call.caller))
            self._ivr_actions(call, call.run.take_actions())

    def _late_answer_refused(self, call: Call, agent_leg: AgentLeg | None, dialog: DialogId,
                             detail: str) -> None:
        """No common codec (or no usable answer) in the ACK: BYE that leg with a Reason
        (RFC 3326 §2: the 488 the offer would have got) and end the call; the record says
        ``no-common-codec``."""
        now = time.time()
        log.info(kv(event="call_refused", reason="no-common-codec", call=call.call_id,
                    offer="late", detail=detail))
        if call.ended_at is None:
            call.end_reason = "no-common-codec"
            call.end_code = 488
        leg = agent_leg.leg if agent_leg is not None else call.leg
        if leg.can_take(LegInput.HANGUP):
            actions = leg.handle(LegInput.HANGUP, now, code=488, reason=EndReason.SYSTEM)
            if LegAction.SEND_BYE in actions:
                text = detail.replace('"', "'").replace("\\", "/")[:120]
                with contextlib.suppress(Exception):
                    self._signalling().request(dialog, "BYE", headers=[
                        ("Reason", f'SIP ;cause=488 ;text="{text}"')])
        if agent_leg is None:
            self._caller_gone(call, "no-common-codec")
        else:
            self._hangup_caller(call, EndReason.SYSTEM)
