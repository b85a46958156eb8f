"""Call control's transfers: blind and attended transfer from agents' phones (REFER, RFC 3515;
Replaces, RFC 3891) and from the API, and the IVR's transfer node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import Any

from appliance.acd import model as acd
from appliance.calls import CallControlError
from appliance.calls.leg import (
    Direction,
    EndReason,
    Leg,
    LegAction,
    LegInput,
    LegState,
    Party,
)
from appliance.calls.model import (
    CAPABILITIES,
    DIAL_REFUSALS,
    SDP_HEADERS,
    AgentLeg,
    Call,
    http_status,
)
from appliance.ivr import runner as ivr
from appliance.log import kv
from appliance.sip.dialog import (
    DialogId,
    InDialogRequest,
)
from media_core import sdp
from media_core.engine import (
    EngineError,
)
from media_core.sip import SipMessage

log = logging.getLogger("edgecc.calls")

TRANSFER_RING_TIMEOUT = 30.0
"""Seconds a number (or an agent, for a call without a queue) may ring for a transfer once
the transferring agent hung up; an agent's phone rings for the queue's ``ring_timeout``."""


class Transfers:
    """The transfers of ``CallControl`` (a part of it: the state lives there)."""

    def _ivr_transfer(self, call: Call, action: ivr.Transfer) -> None:
        """A ``transfer`` node: ring an agent's extension, or a number through the carrier
        under the dial rules of the node's role; the caller hears the hold music meanwhile
        (docs/ivr.md, "transfer")."""
        from appliance.calls.dialling import check_dial

        call.prompts.clear()
        if call.playing is not None:
            call.playing = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)
        if call.ivr_timer is not None:
            call.ivr_timer.cancel()
            call.ivr_timer = None
        target = action.number
        if target.startswith(("sip:", "sips:")):
            target = target.split(":", 1)[1].split("@", 1)[0].split(";", 1)[0]
        leg: AgentLeg | None = None
        status = 480
        if target in self.config.sip.accounts_by_user:
            leg = self._offer(call, target, transfer=True)  # None: not registered
        elif self.config.trunk.carrier is None:
            status = 404
        else:
            decision = check_dial(self.config.dialling, action.role, target, 0)
            if decision.allowed:
                leg = self._dial_transfer_target(call, target)
            else:
                status = decision.status
                log.info(kv(event="ivr_transfer_refused", call=call.call_id, target=target,
                            reason=decision.reason))
        log.info(kv(event="ivr_transfer", call=call.call_id, target=target,
                    ringing=leg is not None))
        if leg is None:
            self._ivr_transfer_over(call, None, status, "refused")
            return
        call.ivr_transfer = leg
        call.ivr_transfer_timer = asyncio.get_running_loop().call_later(
            action.timeout, self._ivr_transfer_timeout, call, leg)
        self._queue_music(call)

    def _transfer_progress(self, call: Call, far_leg: AgentLeg, response: SipMessage,
                           inp: LegInput) -> bool:
        """A 180/183 from the carrier leg of an IVR ``transfer`` node or a blind transfer: the
        caller hears the far end's early media (RFC 3960: a 183 with a description, bridged
        at once: ringback, announcements), else local ringback instead of the music. False
        when ``far_leg`` rings for no such transfer (a consultation keeps the caller on hold)."""
        transfer = call.transfer
        blind = transfer is not None and transfer["to"] is far_leg and (
            not transfer.get("consult") or transfer.get("from_gone"))
        if call.direction != "inbound" or not (blind or call.ivr_transfer is far_leg):
            return False
        if call.ended_at is not None or call.connected is far_leg:
            return True
        if inp is LegInput.RX_183 and self._take_early_answer(call, far_leg, response,
                                                              bridge=True):
            call.queue_play = call.hold_play = None
            with contextlib.suppress(EngineError):
                self.engine.stop_play(call.media)  # the bridged far end is heard
            log.info(kv(event="early_media", call=call.call_id, target=far_leg.number,
                        kind="ivr-transfer" if call.ivr_transfer is far_leg else "transfer"))
            return True
        if far_leg.leg.state is LegState.EARLY:
            return True  # the early media goes on (RFC 3960 §3: a later 180 changes nothing)
        from appliance.calls.callbacks import RINGBACK

        # A 180 (or a 183 we cannot use): ringback from us, from its start (a 180 repeated
        # each minute, RFC 3261 §13.3.1.1, restarts it), replacing the music.
        log.info(kv(event="transfer_ringback", call=call.call_id, target=far_leg.number))
        with contextlib.suppress(EngineError):
            ringback = self.engine.play(call.media, RINGBACK)
            if call.ivr_transfer is far_leg:
                call.queue_play = ringback  # when it ends the music comes back
            else:
                call.hold_play = ringback
        return True

    def _ivr_transfer_timeout(self, call: Call, leg: AgentLeg) -> None:
        call.ivr_transfer_timer = None
        if call.ivr_transfer is leg:
            self._hangup_agent(call, leg, EndReason.NO_ANSWER)  # CANCEL; its 487 ends it

    def _ivr_transfer_answered(self, call: Call, leg: AgentLeg, now: float) -> None:
        """The IVR's transfer target answered: bridge and answer the caller; the flow ends."""
        self._ivr_transfer_over(call, leg, 200, "answered")
        call.connected = leg
        if leg.number is None:
            call.agent = leg.agent
            self._last_call[leg.agent] = call.call_id
        call.answered_at = call.talk_started = now
        self.engine.bridge(call.media, leg.media)
        self._arm_media_timeout(call.media, leg.media)
        if call.leg.can_take(LegInput.ANSWER):
            call.leg.handle(LegInput.ANSWER, now)
            self._signalling().answer(call.key, 200, headers=SDP_HEADERS, body=call.answer_sdp)
        payload = {"call_id": call.call_id, "by": f"ivr:{call.flow_name}",
                   "target": leg.number or leg.agent, "kind": "blind", "from_agent": None}
        self._log_event(call, "call.transfer", payload, now)
        log.info(kv(event="call_transferred", call=call.call_id, by=payload["by"],
                    target=payload["target"]))
        self._feed_ivr(call, ivr.TransferResult("answered"))

    def _ivr_transfer_over(self, call: Call, leg: AgentLeg | None, status: int,
                           outcome: str | None = None) -> None:
        """The IVR's transfer ends ringing: answered (the caller), or failed (the flow goes
        on at the node's ``on_failure`` with ``transfer_result`` busy / no-answer / refused)."""
        if call.ivr_transfer_timer is not None:
            call.ivr_transfer_timer.cancel()
            call.ivr_transfer_timer = None
        call.ivr_transfer = None
        self._stop_queue_music(call)
        if outcome == "answered" or call.ended_at is not None:
            return
        if outcome is None:
            outcome = ("busy" if status in (486, 600) else
                       "no-answer" if status in (408, 480, 487) else "refused")
        log.info(kv(event="ivr_transfer_failed", call=call.call_id, outcome=outcome,
                    status=status))
        self._feed_ivr(call, ivr.TransferResult(outcome, status))

    def _refer(self, event: InDialogRequest, call: Call, agent_leg: AgentLeg | None) -> None:
        """A REFER from the connected agent's phone: blind transfer to another agent."""
        from appliance.sip.refer import parse_refer, refer_notify
        from media_core.sip import RemoteProtocolError

        signalling = self._signalling()
        if agent_leg is None or agent_leg is not call.connected or call.direction != "inbound":
            signalling.answer(event.key, 403, reason="Transfer Not Allowed")
            return
        try:
            request = parse_refer(event.request)
        except RemoteProtocolError as exc:
            signalling.answer(event.key, exc.status, reason=exc.reason)
            return
        if request.refer_to.replaces is not None:
            self._attended_transfer(event, call, agent_leg, request)
            return
        target = request.refer_to.target.user or ""
        refusal = self._transfer_refusal(call, target)
        if refusal is not None:
            log.info(kv(event="transfer_refused", call=call.call_id, target=target,
                        status=refusal[0]))
            signalling.answer(event.key, refusal[0], reason=refusal[1])
            return
        signalling.answer(event.key, 202)  # RFC 3515 §2.4.2
        if agent_leg.leg.can_take(LegInput.REFER):
            agent_leg.leg.handle(LegInput.REFER, time.time())
        notify = (agent_leg.dialog, request.event_id)
        headers, body = refer_notify(100, event_id=request.event_id)
        with contextlib.suppress(Exception):
            signalling.request(agent_leg.dialog, "NOTIFY", headers=headers, body=body)
        self._begin_transfer(call, target, by=agent_leg.agent, notify=notify)

    def _attended_transfer(self, event: InDialogRequest, call: Call, agent_leg: AgentLeg,
                           request: Any) -> None:
        """REFER with ``Replaces`` (RFC 3891, RFC 5589 §7) from the connected agent's phone,
        naming its own answered call to another agent or to a number through the carrier:
        the customer is bridged to that party at once (both legs are ours, no new INVITE is needed), and the transferring phone's
        two dialogs are ended (NOTIFY 200, then BYE on each)."""
        from appliance.sip.refer import refer_notify

        signalling = self._signalling()
        replaces = request.refer_to.replaces
        consult: Call | None = None
        # §3: to-tag is the recipient's local tag, from-tag its remote tag; the reverse is
        # accepted too (a phone naming the dialog from its own side).
        for local, remote in ((replaces.to_tag, replaces.from_tag),
                              (replaces.from_tag, replaces.to_tag)):
            entry = self._by_dialog.get(DialogId(replaces.call_id, local, remote))
            if entry is not None and entry[1] is None:
                consult = entry[0]
                break
        refusal: tuple[int, str] | None = None
        if call.transfer is not None:
            refusal = 491, "Transfer In Progress"
        elif consult is None or consult.ended_at is not None or consult.finishing:
            refusal = 481, "Replaced Dialog Not Found"  # RFC 3891 §3
        elif consult.direction != "outbound" or consult.caller != agent_leg.agent:
            # The phone's own call: to a colleague's extension, or a number via the carrier.
            refusal = 403, "Transfer Not Allowed"
        elif consult.connected is None:
            refusal = 486, "Consultation Not Answered"  # early dialogs are not replaced
        if refusal is not None:
            log.info(kv(event="transfer_refused", call=call.call_id, kind="attended",
                        status=refusal[0]))
            signalling.answer(event.key, refusal[0], reason=refusal[1])
            return
        assert consult is not None and consult.connected is not None
        now = time.time()
        signalling.answer(event.key, 202)  # RFC 3515 §2.4.2
        if agent_leg.leg.can_take(LegInput.REFER):
            agent_leg.leg.handle(LegInput.REFER, now)
        notify = (agent_leg.dialog, request.event_id)
        headers, body = refer_notify(100, event_id=request.event_id)
        with contextlib.suppress(Exception):
            signalling.request(agent_leg.dialog, "NOTIFY", headers=headers, body=body)
        # The consulted agent's leg moves from the consultation into the customer's call.
        target = consult.connected
        consult.connected = None
        consult.agents.pop(target.leg.leg_id, None)
        target.transfer = True
        call.agents[target.leg.leg_id] = target
        if target.dialog is not None:
            self._by_dialog[target.dialog] = (call, target)
        if target.key is not None:
            self._by_invite[target.key] = (call, target)
        with contextlib.suppress(EngineError):
            self.engine.unbridge(target.media)
        if call.hold_started is not None:
            self._close_hold(call, now)
        call.transfer = {"from": agent_leg, "to": target, "target": target.number or target.agent,
                         "by": agent_leg.agent, "kind": "attended", "notify": notify,
                         "started_at": now, "replaced": consult.call_id}
        log.info(kv(event="transfer_started", call=call.call_id, by=agent_leg.agent,
                    target=target.number or target.agent, kind="attended",
                    consultation=consult.call_id))
        self._transfer_answered(call, target, now)
        # RFC 5589 §7: the transferor's consultation ends too.
        consult.end_reason = "transferred"
        self._hangup_caller(consult, EndReason.TRANSFERRED)

    def _transfer_refusal(self, call: Call, target: str) -> tuple[int, str] | None:
        if call.connected is None or call.ended_at is not None:
            return 409, "Call Not Connected"
        if call.transfer is not None:
            return 491, "Transfer In Progress"
        if target == call.agent:
            return 404, "Unknown Transfer Target"
        if target not in self.config.sip.accounts_by_user:
            return self._external_refusal(call, target)
        if not self.registrar.lookup(target, self.service.clock()):
            return 480, "Transfer Target Unavailable"
        return None

    def _external_refusal(self, call: Call, number: str) -> tuple[int, str] | None:
        """A transfer to a number through the carrier, under the transferring agent's dial
        rules (docs/calls.md, "Dial rules")."""
        from appliance.calls.dialling import check_dial

        if self.config.trunk.carrier is None:
            return 404, "Unknown Transfer Target"
        account = self.config.sip.accounts_by_user.get(call.agent or "")
        decision = check_dial(self.config.dialling, getattr(account, "role", "agent"),
                              number, 0)
        if not decision.allowed:
            return decision.status, DIAL_REFUSALS.get(decision.reason, "Forbidden")
        return None

    def _begin_transfer(self, call: Call, target: str, *, by: str,
                        notify: tuple[Any, str] | None) -> None:
        assert call.connected is not None
        now = time.time()
        customer = self._customer_media(call)
        with contextlib.suppress(EngineError):
            self.engine.unbridge(customer)
        call.transfer = {"from": call.connected, "to": None, "target": target, "by": by,
                         "kind": "blind", "notify": notify, "started_at": now}
        call.hold_play = self.engine.play(customer, self.hold_music)
        log.info(kv(event="transfer_started", call=call.call_id, by=by, target=target))
        if target in self.config.sip.accounts_by_user:
            new_leg = self._offer(call, target, transfer=True)
        else:
            new_leg = self._dial_transfer_target(call, target)
        if new_leg is None:
            self._transfer_failed(call, 480)
            return
        call.transfer["to"] = new_leg

    def _dial_transfer_target(self, call: Call, dialled: str) -> AgentLeg | None:
        """A carrier leg for a transfer to an external number (the dial rules passed)."""
        from appliance.calls.dialling import normalize_number

        try:
            far = self.engine.allocate_leg(self.media_host)
        except (EngineError, OSError) as exc:
            log.error(kv(event="transfer_leg_failed", call=call.call_id, error=str(exc)))
            return None
        now = time.time()
        session = sdp.MediaSession(CAPABILITIES, self.media_host, far.rtp_port,
                                   rtcp_port=far.rtcp_port)
        n = len(call.agents) + len(call.finished_agents) + 1
        # The number takes the agent's place: party "agent" in the leg's words.
        far_leg = AgentLeg(call.agent or "", Leg(f"{call.call_id}:carrier:{n}",
                                                 Direction.OUTBOUND, Party.AGENT, now),
                           far.leg, session, offered=False, transfer=True,
                           number=normalize_number(dialled))
        call.agents[far_leg.leg.leg_id] = far_leg
        call.trunk_auth_sent = False
        far_leg.leg.handle(LegInput.DIAL, now)
        self._dial_carrier(call, far_leg)
        return far_leg

    def _transfer_answered(self, call: Call, new_leg: AgentLeg, now: float) -> None:
        """The target answered: bridge the customer to them, release the transferring
        agent (NOTIFY 200 then BYE), tell the router that agent's call ended."""
        from appliance.sip.refer import refer_notify

        transfer = call.transfer
        if transfer is None or transfer["to"] is not new_leg:
            self._hangup_agent(call, new_leg, EndReason.SYSTEM)
            return
        if transfer.get("consult") and not transfer.get("from_gone"):
            self._consult_answered(call, new_leg, now)
            return
        if transfer.get("consult") and call.hold_started is not None:
            # The agent hung up while the consultation rang: the caller goes to the target
            # (RFC 5589 §6.1 spirit: hanging up completes the transfer).
            self._close_hold(call, now)
        old: AgentLeg = transfer["from"]
        call.transfer = None
        _cancel_ring_timer(transfer)
        call.hold_play = None
        with contextlib.suppress(EngineError):
            self.engine.stop_play(call.media)
            self.engine.bridge(call.media, new_leg.media)
        self._arm_media_timeout(new_leg.media)
        call.connected = new_leg
        if new_leg.number is None:
            call.agent = new_leg.agent
            self._last_call[new_leg.agent] = call.call_id
        signalling = self._signalling()
        if transfer["notify"] is not None and not transfer.get("from_gone"):
            dialog, event_id = transfer["notify"]
            headers, body = refer_notify(200, event_id=event_id)
            with contextlib.suppress(Exception):
                signalling.request(dialog, "NOTIFY", headers=headers, body=body)
        if old.leg.can_take(LegInput.TRANSFER_DONE):
            actions = old.leg.handle(LegInput.TRANSFER_DONE, now)
            if LegAction.SEND_BYE in actions and old.dialog is not None:
                signalling.hangup(old.dialog)
        else:
            self._hangup_agent(call, old, EndReason.TRANSFERRED)
        if self.router is not None:
            with contextlib.suppress(acd.LocalProtocolError):
                self._route(self.router.handle(acd.CallEnded(call.call_id, old.agent),
                                               self._router_clock()))
        payload = {"call_id": call.call_id, "by": transfer["by"], "target": transfer["target"],
                   "kind": transfer["kind"], "from_agent": old.agent}
        # The first agent's talk ends here (queue_log TRANSFER); the target's starts.
        call.events.append(("queue.complete", {
            "call_id": call.call_id, "queue": call.queue, "agent": old.agent,
            "talk_s": round(now - (call.talk_started or call.answered_at or now), 3),
            "ended_by": "transferred"}, now))
        call.talk_started = now
        self._log_event(call, "call.transfer", payload, now)
        log.info(kv(event="call_transferred", call=call.call_id, by=transfer["by"],
                    target=transfer["target"]))
        if old.leg.state is LegState.ENDED:
            self._agent_leg_over(call, old)

    def _transfer_failed(self, call: Call, status: int) -> None:
        """The target did not answer: NOTIFY the failure, bridge the agent back (or end the
        call when the transferring agent has gone)."""
        from appliance.sip.refer import refer_notify

        transfer = call.transfer
        if transfer is None:
            return
        call.transfer = None
        _cancel_ring_timer(transfer)
        old: AgentLeg = transfer["from"]
        log.info(kv(event="transfer_failed", call=call.call_id, target=transfer["target"],
                    status=status))
        if call.ended_at is not None:
            return
        if transfer.get("consult") and not (
                transfer.get("from_gone") or old.leg.state is LegState.ENDED):
            # The consultation failed (busy, no answer): the agent has the caller back.
            self._emit("call.consult", {"call_id": call.call_id, "by": transfer["by"],
                                        "target": transfer["target"], "state": "failed",
                                        "status": status}, time.time())
            if call.hold_started is not None:
                self._end_hold(call, transfer["by"])
            return
        call.hold_play = None
        if transfer.get("from_gone") or old.leg.state is LegState.ENDED:
            # Nobody left to take the caller back: their queue does, else the call ends.
            if not self._requeue_after_transfer(call, old):
                call.end_reason = "transfer-failed"
                self._hangup_caller(call, EndReason.SYSTEM)
            return
        if transfer["notify"] is not None:
            dialog, event_id = transfer["notify"]
            headers, body = refer_notify(status if status >= 300 else 503, event_id=event_id)
            with contextlib.suppress(Exception):
                self._signalling().request(dialog, "NOTIFY", headers=headers, body=body)
        if old.leg.can_take(LegInput.TRANSFER_FAILED):
            old.leg.handle(LegInput.TRANSFER_FAILED, time.time())
        with contextlib.suppress(EngineError):
            self.engine.stop_play(call.media)
            self.engine.bridge(call.media, old.media)

    def transfer(self, call_id: str, target: str, *, by: str) -> None:
        """Blind transfer from the API: ring agent ``target``; when they answer the customer is
        theirs and the agent's phone is hung up. 404 unknown call or target; 409 not
        connected, target not registered, or a transfer already in progress."""
        call = self._live_call(call_id)
        if call.direction != "inbound":
            raise CallControlError(409, f"call {call_id} is not a queue call")
        refusal = self._transfer_refusal(call, target)
        if refusal is not None:
            raise CallControlError(http_status(refusal[0]), refusal[1])
        self._audit(by, "call.transfer", kv(call=call_id, target=target))
        self._begin_transfer(call, target, by=by, notify=None)

    # -- attended transfer from the API (RFC 5589 §7, carried out by us) -------------------------

    def consult(self, call_id: str, target: str, *, by: str) -> None:
        """Attended transfer, first step: the caller is put on hold (hold music) and a
        consultation rings ``target`` (another agent's extension, or a number through the
        carrier under the connected agent's dial rules); when it answers, the agent and the
        target talk. 404 unknown call or target; 409 not connected, a transfer or
        consultation in progress, target not registered; 403 dial rule."""
        call = self._live_call(call_id)
        if call.direction != "inbound":
            raise CallControlError(409, f"call {call_id} is not a queue call")
        refusal = self._transfer_refusal(call, target)
        if refusal is not None:
            raise CallControlError(http_status(refusal[0]), refusal[1])
        assert call.connected is not None
        self._audit(by, "call.consult", kv(call=call_id, target=target))
        now = time.time()
        if call.hold_started is None:
            self._start_hold(call, by)
        call.transfer = {"from": call.connected, "to": None, "target": target, "by": by,
                         "kind": "attended", "notify": None, "started_at": now,
                         "consult": True, "answered": False}
        if target in self.config.sip.accounts_by_user:
            new_leg = self._offer(call, target, transfer=True)
        else:
            new_leg = self._dial_transfer_target(call, target)
        if new_leg is None:
            call.transfer = None
            self._end_hold(call, by)
            raise CallControlError(409, f"the consultation to {target} could not be placed")
        call.transfer["to"] = new_leg
        log.info(kv(event="consult_started", call=call_id, by=by, target=target))
        self._emit("call.consult", {"call_id": call_id, "by": by, "target": target,
                                    "state": "ringing"}, now)

    def _consult_answered(self, call: Call, target: AgentLeg, now: float) -> None:
        """The consultation answered: the agent and the target hear each other; the caller
        stays on hold."""
        assert call.transfer is not None
        call.transfer["answered"] = True
        agent_media = call.transfer["from"].media
        with contextlib.suppress(EngineError):
            self.engine.bridge(agent_media, target.media)
        self._arm_media_timeout(target.media)
        log.info(kv(event="consult_answered", call=call.call_id, target=call.transfer["target"]))
        self._emit("call.consult", {"call_id": call.call_id, "by": call.transfer["by"],
                                    "target": call.transfer["target"], "state": "answered"},
                   now)

    def _consultation(self, call_id: str) -> tuple[Call, dict[str, Any]]:
        call = self._live_call(call_id)
        transfer = call.transfer
        if transfer is None or not transfer.get("consult"):
            raise CallControlError(409, f"call {call_id} has no consultation in progress")
        return call, transfer

    def complete_transfer(self, call_id: str, *, by: str) -> None:
        """Attended transfer, last step: the caller is bridged to the answered consultation's
        target and the agent's phone is released (BYE); the record's agent leg ends
        ``transferred``, event ``call.transfer`` kind ``attended``. 404 unknown call; 409 no
        consultation, or one not answered yet."""
        call, transfer = self._consultation(call_id)
        if not transfer.get("answered"):
            raise CallControlError(409, f"the consultation of call {call_id} is not answered")
        self._audit(by, "call.transfer", kv(call=call_id, target=transfer["target"],
                                            kind="attended"))
        now = time.time()
        transfer["consult"] = False
        transfer["by"] = by
        with contextlib.suppress(EngineError):
            self.engine.unbridge(transfer["from"].media)
        if call.hold_started is not None:
            self._close_hold(call, now)
        self._transfer_answered(call, transfer["to"], now)

    def cancel_consult(self, call_id: str, *, by: str) -> None:
        """Give up the consultation: the target's leg is hung up (CANCEL while it rings, BYE
        once answered) and the agent has the caller back, off hold. 404 unknown call; 409 no
        consultation in progress."""
        call, transfer = self._consultation(call_id)
        self._audit(by, "call.consult_cancelled", kv(call=call_id, target=transfer["target"]))
        target: AgentLeg | None = transfer["to"]
        if target is not None:
            with contextlib.suppress(EngineError):
                self.engine.unbridge(target.media)
            self._hangup_agent(call, target, EndReason.SYSTEM)
        log.info(kv(event="consult_cancelled", call=call_id, by=by, target=transfer["target"]))
        self._emit("call.consult", {"call_id": call_id, "by": by, "target": transfer["target"],
                                    "state": "cancelled"}, time.time())
        if transfer.get("from_gone"):
            self._transfer_failed(call, 487)  # the agent has gone: back to the queue
            return
        call.transfer = None
        _cancel_ring_timer(transfer)
        if call.hold_started is not None:
            self._end_hold(call, by)

    # -- a party of the transfer hangs up (docs/calls.md, "Transfer") --------------------------

    def _transfer_party_gone(self, call: Call, agent_leg: AgentLeg) -> None:
        """The transferring agent, or an answered consultation's target, hung up while the
        transfer was in progress (the leg has ended)."""
        transfer = call.transfer
        assert transfer is not None
        now = time.time()
        if agent_leg is transfer["to"]:
            self._consult_target_gone(call, agent_leg, now)
            return
        transfer["from_gone"] = True
        target: AgentLeg | None = transfer["to"]
        if transfer.get("consult") and transfer.get("answered") and target is not None:
            # Transfer on hang-up (RFC 5589 §6.1 spirit, what PBXs do): the agent introduced
            # the caller and left, so the caller goes to the target at once.
            log.info(kv(event="consult_completed", call=call.call_id, by=agent_leg.agent,
                        target=transfer["target"], cause="agent-hung-up"))
            transfer["consult"] = False
            with contextlib.suppress(EngineError):
                self.engine.unbridge(agent_leg.media)
            if call.hold_started is not None:
                self._close_hold(call, now)
            self._transfer_answered(call, target, now)
            return
        if transfer.get("consult"):
            # Still ringing: a blind transfer now; unanswered, the caller goes back to the queue.
            transfer["kind"] = "blind"
            self._emit("call.consult", {"call_id": call.call_id, "by": transfer["by"],
                                        "target": transfer["target"], "state": "blind"}, now)
        if target is not None and transfer.get("ring_timer") is None:
            settings = self.queues.get(call.queue or "")
            timeout = (settings.ring_timeout if settings is not None and target.number is None
                       else TRANSFER_RING_TIMEOUT)
            transfer["ring_timer"] = asyncio.get_running_loop().call_later(
                timeout, self._transfer_ring_timeout, call, target)
        log.info(kv(event="transferring_agent_gone", call=call.call_id, agent=agent_leg.agent,
                    target=transfer["target"], kind=transfer["kind"]))
        self._maybe_finish(call)

    def _transfer_ring_timeout(self, call: Call, target: AgentLeg) -> None:
        if call.transfer is not None and call.transfer["to"] is target:
            call.transfer["ring_timer"] = None
            self._hangup_agent(call, target, EndReason.NO_ANSWER)  # CANCEL; its 487 fails it

    def _consult_target_gone(self, call: Call, target: AgentLeg, now: float) -> None:
        """The answered consultation's target hung up: the agent has the caller back."""
        transfer = call.transfer
        assert transfer is not None
        call.transfer = None
        _cancel_ring_timer(transfer)
        agent: AgentLeg = transfer["from"]
        with contextlib.suppress(EngineError):
            self.engine.unbridge(agent.media)
        log.info(kv(event="consult_ended", call=call.call_id, target=transfer["target"],
                    cause="target-hung-up"))
        self._emit("call.consult", {"call_id": call.call_id, "by": transfer["by"],
                                    "target": transfer["target"], "state": "ended"}, now)
        self._agent_leg_over(call, target)
        if call.hold_started is not None:
            self._end_hold(call, target.number or target.agent)

    def _requeue_after_transfer(self, call: Call, old: AgentLeg) -> bool:
        """The transfer failed after the transferring agent left: the caller goes back to
        the call's queue with their priority. False when there is no queue to go back to."""
        if (self.router is None or call.queue not in self.queues or call.ended_at is not None
                or call.direction != "inbound"):
            return False
        now = time.time()
        if call.hold_started is not None:
            self._close_hold(call, now)
        call.hold_play = None
        with contextlib.suppress(EngineError):
            self.engine.stop_play(call.media)
            self.engine.unbridge(call.media)
        was_connected = call.connected is old
        if was_connected:
            # The agent's talk ended when they left (queue_log TRANSFER); wrap-up starts.
            call.events.append(("queue.complete", {
                "call_id": call.call_id, "queue": call.queue, "agent": old.agent,
                "talk_s": round(now - (call.talk_started or call.answered_at or now), 3),
                "ended_by": "transferred"}, now))
            call.connected = None
            self._set_aside_recording(call, old.agent, now)
            self._agent_leg_over(call, old)
        log.info(kv(event="caller_requeued", call=call.call_id, queue=call.queue,
                    priority=call.priority))
        self._enter_queue(call, ivr.RouteToQueue(call.queue, call.priority, None, {}),
                          keep_place=True)
        if was_connected:
            # The agent's router call ends once the caller is back at their place: the agent
            # it frees finds them there, ahead of those who joined during the transfer.
            with contextlib.suppress(acd.LocalProtocolError):
                self._route(self.router.handle(acd.CallEnded(call.call_id, old.agent),
                                               self._router_clock()))
        return True

    def _set_aside_recording(self, call: Call, agent: str, now: float) -> None:
        """A requeued caller's recording so far becomes a recording of its own (the next
        agent's talk starts another): stopped, encrypted into the store, then removed."""
        if call.recording is None or call.recording_path is None:
            return
        try:
            done = self.engine.record_stop(call.recording)
        except EngineError as exc:
            log.error(kv(event="recording_stop_failed", call=call.call_id, error=repr(exc)))
            return
        # Out of the way of the next agent's recording (same name); the engine finishes this
        # one through the handle it holds.
        path = f"{call.recording_path}.part-{int(now * 1000)}"
        try:
            os.replace(call.recording_path, path)
        except OSError as exc:
            log.error(kv(event="recording_set_aside_failed", call=call.call_id, error=repr(exc)))
            path = call.recording_path
        started = call.recording_started or now
        call.recording = call.recording_path = call.recording_started = None

        async def store() -> None:
            try:
                finished = await asyncio.wait_for(done, 3.0)
                if finished.ok:
                    await asyncio.get_running_loop().run_in_executor(
                        self._db_thread, lambda: self.recordings.import_wav(
                            path, call_id=call.call_id, caller=call.caller,
                            started_at=started, ended_at=time.time(), agent=agent,
                            queue=call.queue))
            except Exception:
                log.exception(kv(event="recording_import_failed", call=call.call_id))
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)  # never leave plaintext audio behind

        task = asyncio.get_running_loop().create_task(store())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _cancel_ring_timer(transfer: dict[str, Any]) -> None:
    timer = transfer.get("ring_timer")
    if timer is not None:
        timer.cancel()
        transfer["ring_timer"] = None
