"""The call-leg state table (appliance.calls.leg): every transition, every refused pair,
end reasons for call records, and the helpers that turn SIP into leg inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.calls.leg import (
    TRANSITIONS,
    Direction,
    EndReason,
    Leg,
    LegAction,
    LegInput,
    LegState,
    Party,
    is_hold_offer,
    response_input,
)
from media_core.sip import LocalProtocolError

A, I, S = LegAction, LegInput, LegState  # noqa: E741


def leg_in(state: LegState, direction: Direction, party: Party = Party.CALLER) -> Leg:
    leg = Leg("leg-1", direction, party, now=0.0)
    leg.state = state
    return leg


@pytest.mark.parametrize("direction", list(Direction))
def test_every_transition_in_the_table(direction: Direction) -> None:
    table = TRANSITIONS[direction]
    assert len(table) > 20
    for (state, inp), row in table.items():
        leg = leg_in(state, direction)
        if state is S.TERMINATING:
            # Reached only through a row that notes why the leg is ending.
            leg._pending = EndReason.SYSTEM
        actions = leg.handle(inp, 5.0, code=486)
        assert actions == row.actions, (state, inp)
        assert leg.state is row.next_state, (state, inp)
        if row.next_state is S.ENDED:
            assert leg.end_reason is not None and leg.ended_at == 5.0, (state, inp)
        else:
            assert leg.end_reason is None and leg.ended_at is None


@pytest.mark.parametrize("direction", list(Direction))
def test_pairs_not_in_the_table_raise_and_change_nothing(direction: Direction) -> None:
    table = TRANSITIONS[direction]
    refused = 0
    for state in LegState:
        for inp in LegInput:
            if (state, inp) in table:
                continue
            leg = leg_in(state, direction)
            assert not leg.can_take(inp)
            with pytest.raises(LocalProtocolError, match=inp.value):
                leg.handle(inp, 1.0)
            assert leg.state is state and leg.end_reason is None
            refused += 1
    assert refused > 100
    # ENDED takes nothing at all.
    assert not any(s is S.ENDED for s, _ in table)


def drive(leg: Leg, *steps) -> list[tuple[LegAction, ...]]:
    out = []
    for t, step in enumerate(steps, start=1):
        inp, kwargs = (step, {}) if isinstance(step, LegInput) else step
        out.append(leg.handle(inp, float(t), **kwargs))
    return out


def test_inbound_call_answered_held_resumed_caller_hangs_up() -> None:
    leg = Leg("in-1", Direction.INBOUND, Party.CALLER, now=0.0)
    out = drive(leg, I.INVITE_RECEIVED, I.RING, I.ANSWER, I.ACK, I.HOLD, I.RESUME, I.BYE)
    assert out == [
        (A.SEND_100,), (A.SEND_180,), (A.SEND_200, A.START_MEDIA), (),
        (A.ANSWER_REINVITE, A.HOLD_MEDIA), (A.ANSWER_REINVITE, A.RESUME_MEDIA),
        (A.ANSWER_BYE, A.STOP_MEDIA),
    ]
    record = leg.record()
    assert record.end_reason is EndReason.CALLER_HUNG_UP
    assert (record.answered_at, record.ended_at, record.end_code) == (3.0, 7.0, None)


def test_inbound_early_media_then_cancelled() -> None:
    leg = Leg("in-2", Direction.INBOUND, Party.CALLER, now=0.0)
    out = drive(leg, I.INVITE_RECEIVED, I.EARLY_MEDIA, I.CANCEL)
    assert out[-1] == (A.SEND_487, A.STOP_MEDIA)
    assert leg.end_reason is EndReason.CANCELLED and leg.answered_at is None


def test_inbound_rejected_and_no_answer() -> None:
    leg = Leg("in-3", Direction.INBOUND, Party.CALLER, now=0.0)
    drive(leg, I.INVITE_RECEIVED, (I.REJECT, {"code": 603}))
    assert (leg.end_reason, leg.end_code) == (EndReason.REJECTED, 603)
    leg = Leg("in-4", Direction.INBOUND, Party.CALLER, now=0.0)
    out = drive(leg, I.INVITE_RECEIVED, I.RING, (I.TIMEOUT, {"code": 480}))
    assert out[-1] == (A.SEND_FINAL,)
    assert (leg.end_reason, leg.end_code) == (EndReason.NO_ANSWER, 480)


def test_agent_hangs_up_so_the_caller_leg_is_ended_by_us() -> None:
    leg = Leg("in-5", Direction.INBOUND, Party.CALLER, now=0.0)
    out = drive(leg, I.INVITE_RECEIVED, I.ANSWER, I.ACK, I.HANGUP, I.BYE_ANSWERED)
    assert out[3] == (A.SEND_BYE, A.STOP_MEDIA)
    assert leg.state is S.ENDED and leg.end_reason is EndReason.AGENT_HUNG_UP


def test_hangup_before_ack_then_ack() -> None:
    leg = Leg("in-6", Direction.INBOUND, Party.CALLER, now=0.0)
    drive(leg, I.INVITE_RECEIVED, I.ANSWER, (I.HANGUP, {"reason": EndReason.SYSTEM}), I.ACK,
          I.BYE_ANSWERED)
    assert leg.end_reason is EndReason.SYSTEM


def test_outbound_agent_busy() -> None:
    leg = Leg("out-1", Direction.OUTBOUND, Party.AGENT, now=0.0)
    out = drive(leg, I.DIAL, I.RX_100, I.RX_180, (I.RX_BUSY, {"code": 486}))
    assert out[0] == (A.SEND_INVITE, A.START_RING_TIMER)
    assert out[-1] == (A.STOP_RING_TIMER,)
    assert (leg.end_reason, leg.end_code) == (EndReason.BUSY, 486)


def test_outbound_no_answer_is_cancelled_then_487() -> None:
    leg = Leg("out-2", Direction.OUTBOUND, Party.AGENT, now=0.0)
    out = drive(leg, I.DIAL, I.RX_180, I.TIMEOUT, I.RX_487)
    assert out[2] == (A.SEND_CANCEL,) and leg.state is S.ENDED
    assert leg.end_reason is EndReason.NO_ANSWER


def test_outbound_caller_abandons_while_agent_rings_and_2xx_crosses_cancel() -> None:
    leg = Leg("out-3", Direction.OUTBOUND, Party.AGENT, now=0.0)
    out = drive(leg, I.DIAL, I.RX_183, I.HANGUP, I.RX_2XX, I.BYE_ANSWERED)
    assert out[1] == (A.START_MEDIA,)
    assert out[2] == (A.STOP_RING_TIMER, A.SEND_CANCEL)
    assert out[3] == (A.SEND_ACK, A.SEND_BYE)  # §15: a 2xx after CANCEL is ACKed and ended
    assert leg.end_reason is EndReason.CALLER_HUNG_UP


def test_outbound_answered_then_agent_hangs_up() -> None:
    leg = Leg("out-4", Direction.OUTBOUND, Party.AGENT, now=0.0)
    out = drive(leg, I.DIAL, I.RX_180, I.RX_2XX, I.BYE)
    assert out[2] == (A.STOP_RING_TIMER, A.SEND_ACK, A.START_MEDIA)
    assert leg.end_reason is EndReason.AGENT_HUNG_UP and leg.answered_at == 3.0


def test_rtp_timeout_ends_a_connected_call_but_not_a_held_one() -> None:
    leg = Leg("in-7", Direction.INBOUND, Party.CALLER, now=0.0)
    drive(leg, I.INVITE_RECEIVED, I.ANSWER, I.ACK, I.LOCAL_HOLD)
    assert leg.handle(I.RTP_TIMEOUT, 9.0) == () and leg.state is S.HOLDING
    drive(leg, I.LOCAL_RESUME)
    assert leg.handle(I.RTP_TIMEOUT, 10.0) == (A.SEND_BYE, A.STOP_MEDIA)
    leg.handle(I.TIMEOUT, 42.0)  # the BYE got no answer
    assert leg.end_reason is EndReason.RTP_TIMEOUT and leg.ended_at == 42.0


def test_transfer_by_refer_then_the_phone_hangs_up() -> None:
    leg = Leg("out-5", Direction.OUTBOUND, Party.AGENT, now=0.0)
    out = drive(leg, I.DIAL, I.RX_2XX, I.HOLD, I.REFER, I.BYE)
    assert out[3] == (A.ACCEPT_REFER,)
    assert leg.end_reason is EndReason.TRANSFERRED
    failed = Leg("out-6", Direction.OUTBOUND, Party.AGENT, now=0.0)
    drive(failed, I.DIAL, I.RX_2XX, I.REFER)
    assert failed.handle(I.TRANSFER_FAILED, 4.0) == (A.NOTIFY_FAILURE,)
    assert failed.state is S.CONNECTED


def test_response_input() -> None:
    assert [response_input(s) for s in (100, 180, 181, 200, 202, 486, 600, 487, 404, 408)] == [
        I.RX_100, I.RX_180, I.RX_180, I.RX_2XX, I.RX_2XX, I.RX_BUSY, I.RX_BUSY, I.RX_487,
        I.RX_REJECT, I.RX_REJECT]
    assert response_input(183, b"v=0\r\n") is I.RX_183
    assert response_input(183) is I.RX_180  # 183 without a description: no early media


SDP = ("v=0\r\no=a 1 {v} IN IP4 192.0.2.1\r\ns=-\r\nc=IN IP4 {c}\r\nt=0 0\r\n"
       "m=audio 4000 RTP/AVP 0\r\n{a}")


@pytest.mark.parametrize(("connection", "attribute", "hold"), [
    ("192.0.2.1", "a=sendrecv\r\n", False),
    ("192.0.2.1", "", False),
    ("192.0.2.1", "a=recvonly\r\n", False),
    ("192.0.2.1", "a=sendonly\r\n", True),
    ("192.0.2.1", "a=inactive\r\n", True),
    ("0.0.0.0", "", True),  # RFC 2543 hold
])
def test_is_hold_offer(connection: str, attribute: str, hold: bool) -> None:
    body = SDP.format(v=2, c=connection, a=attribute).encode()
    assert is_hold_offer(body) is hold
    assert is_hold_offer(b"") is False


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(Direction)), st.sampled_from(list(Party)),
       st.lists(st.sampled_from(list(LegInput)), max_size=40))
def test_random_inputs_either_apply_or_raise(direction, party, inputs) -> None:
    """Over any input sequence: a refused input changes nothing, ENDED is final and carries a
    reason, and answered_at never follows ended_at."""
    leg = Leg("h", direction, party, now=0.0)
    for t, inp in enumerate(inputs, start=1):
        before = leg.state
        try:
            leg.handle(inp, float(t))
        except LocalProtocolError:
            assert leg.state is before
            continue
        if leg.state is S.ENDED:
            assert leg.end_reason is not None
            assert leg.answered_at is None or leg.answered_at <= leg.ended_at
    if leg.state is not S.ENDED:
        assert leg.end_reason is None
