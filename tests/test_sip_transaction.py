"""RFC 3261 §17 transactions driven by a hand-held clock.

Every retransmission and timeout instant is checked exactly against RFC 3261 §17 / Table 4
(T1=0.5 s, T2=4 s, T4=5 s) and RFC 6026 (timers L and M).
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.sip.source import Source
from appliance.sip.transaction import (
    INITIAL,
    TRANSITIONS,
    AckReceived,
    Input,
    Kind,
    LocalProtocolError,
    RequestReceived,
    ResponseReceived,
    State,
    StrayResponse,
    Timer,
    TimerConfig,
    Transaction,
    TransactionKey,
    TransactionLayer,
    TransactionTableFull,
    TransactionTerminated,
    TransactionTimeout,
    Transmit,
    TransportFailed,
    server_key,
)

UDP_PEER = Source("UDP", "127.0.0.1", 5070)
TCP_PEER = Source("TCP", "127.0.0.1", 5070)
_counter = itertools.count(1)


# -- messages ------------------------------------------------------------------------------

def _parse(text: str):
    from media_core.sip import parse_message

    return parse_message(text.encode())


def request(
    method: str = "INVITE",
    *,
    branch: str | None = None,
    via_host: str = "192.0.2.10",
    via_port: int = 5070,
    transport: str = "UDP",
    cseq: int = 1,
    cseq_method: str | None = None,
    call_id: str = "call-1@192.0.2.10",
    from_tag: str = "ft1",
    to_tag: str | None = None,
    uri: str = "sip:1001@edgecc.local",
):
    """A request as the codec parses it off the wire."""
    if branch is None:
        branch = f"z9hG4bK-{next(_counter)}"
    via = f"SIP/2.0/{transport} {via_host}:{via_port}" + (f";branch={branch}" if branch else "")
    to = "<sip:1001@edgecc.local>" + (f";tag={to_tag}" if to_tag else "")
    return _parse(
        f"{method} {uri} SIP/2.0\r\n"
        f"Via: {via}\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:1002@edgecc.local>;tag={from_tag}\r\n"
        f"To: {to}\r\n"
        f"Call-ID: {call_id}\r\n"
        f"CSeq: {cseq} {cseq_method or method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )


def response(req, status: int, *, to_tag: str | None = "tt1", cseq_method: str | None = None):
    """A response to ``req`` as the codec builds it (and the peer would send it)."""
    from media_core.sip import build_response

    resp = build_response(req, status, to_tag=to_tag if status > 100 else None)
    if cseq_method:
        resp.set("CSeq", f"{req.cseq[0]} {cseq_method}")
    return _parse(resp.to_bytes().decode())


def ack_for(req, resp):
    """The ACK a peer sends for a non-2xx final (same branch as the INVITE, §17.1.1.3)."""
    return request(
        "ACK",
        branch=req.branch or "",
        via_host=req.top_via.host,
        via_port=req.top_via.port,
        transport=req.top_via.transport,
        cseq=req.cseq[0],
        call_id=req.call_id,
        from_tag=req.from_.tag,
        to_tag=resp.to.tag,
        uri=req.uri,
    )


# -- helpers -------------------------------------------------------------------------------

def drive(layer: TransactionLayer, until: float) -> list[tuple[float, object]]:
    """Run the layer's timers up to ``until`` like an adapter would: (instant, event) pairs."""
    seen: list[tuple[float, object]] = []
    for _ in range(10_000):
        deadline = layer.next_timer()
        if deadline is None or deadline > until:
            return seen
        seen += [(deadline, ev) for ev in layer.handle_timer(deadline)]
    raise AssertionError("timers never settle")


def instants(seen, kind, **match) -> list[float]:
    return [
        round(t, 6)
        for t, ev in seen
        if isinstance(ev, kind) and all(getattr(ev, k) == v for k, v in match.items())
    ]


def only(events, kind):
    found = [ev for ev in events if isinstance(ev, kind)]
    assert len(found) == 1, events
    return found[0]


# -- client INVITE (§17.1.1) ---------------------------------------------------------------

def test_invite_client_udp_timer_a_doubles_until_timer_b() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key, events = layer.send_request(inv, UDP_PEER, 0.0)
    first = only(events, Transmit)
    assert first.data == inv.to_bytes() and first.destination == UDP_PEER
    assert not first.retransmission
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == [0.5, 1.5, 3.5, 7.5, 15.5, 31.5]
    assert all(ev.retransmission and ev.data == first.data for _, ev in seen
               if isinstance(ev, Transmit))
    assert instants(seen, TransactionTimeout, timer=Timer.B) == [32.0]
    assert instants(seen, TransactionTerminated, key=key) == [32.0]
    assert len(layer) == 0 and layer.next_timer() is None


def test_invite_client_tcp_sends_once_and_times_out_with_b() -> None:
    layer = TransactionLayer()
    layer.send_request(request("INVITE", transport="TCP"), TCP_PEER, 10.0)
    seen = drive(layer, 200.0)
    assert instants(seen, Transmit) == []
    assert instants(seen, TransactionTimeout) == [42.0]


def test_invite_client_provisional_stops_retransmission_and_b() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key, _ = layer.send_request(inv, UDP_PEER, 0.0)
    assert [t for t, _ in drive(layer, 1.0)] == [0.5]
    events = layer.receive_response(response(inv, 180), UDP_PEER, 1.0)
    assert only(events, ResponseReceived).response.status == 180
    assert layer.get(key).state is State.PROCEEDING
    assert layer.next_timer() is None  # neither A nor B in Proceeding (timer C is a proxy's)


def test_invite_client_failure_sends_ack_absorbs_retransmission_then_timer_d() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key, _ = layer.send_request(inv, UDP_PEER, 0.0)
    busy = response(inv, 486)
    events = layer.receive_response(busy, UDP_PEER, 0.2)
    assert only(events, ResponseReceived).response.status == 486
    ack = only(events, Transmit)
    assert ack.message.method == "ACK" and not ack.retransmission
    # §17.1.1.3: same branch, Call-ID, From, CSeq number, R-URI; To from the response.
    assert ack.message.branch == inv.branch
    assert ack.message.cseq == (inv.cseq[0], "ACK")
    assert ack.message.to.tag == busy.to.tag and ack.message.uri == inv.uri
    # The retransmitted 486 gets the same ACK again and is not passed up.
    again = layer.receive_response(busy, UDP_PEER, 1.0)
    assert [type(ev) for ev in again] == [Transmit]
    assert again[0].data == ack.data and again[0].retransmission
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == []  # Timer A is gone in Completed
    assert instants(seen, TransactionTerminated, key=key) == [32.2]  # D = 32 s on UDP


def test_invite_client_failure_over_tcp_terminates_at_once() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", transport="TCP")
    key, _ = layer.send_request(inv, TCP_PEER, 0.0)
    events = layer.receive_response(response(inv, 603), TCP_PEER, 0.2)
    assert [type(ev) for ev in events] == [ResponseReceived, Transmit, TransactionTerminated]
    assert key not in layer


def test_invite_client_2xx_accepted_passes_every_2xx_until_timer_m() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key, _ = layer.send_request(inv, UDP_PEER, 0.0)
    ok = response(inv, 200)
    assert only(layer.receive_response(ok, UDP_PEER, 0.1), ResponseReceived)
    assert layer.get(key).state is State.ACCEPTED
    # RFC 6026 §7.2: retransmitted 2xx go to the TU (which re-sends its ACK), no ACK from here.
    events = layer.receive_response(ok, UDP_PEER, 2.0)
    assert [type(ev) for ev in events] == [ResponseReceived]
    assert layer.receive_response(response(inv, 486), UDP_PEER, 2.5) == []
    seen = drive(layer, 100.0)
    assert instants(seen, TransactionTerminated) == [32.1]
    assert layer.receive_response(ok, UDP_PEER, 40.0) == [StrayResponse(ok, UDP_PEER)]


# -- client non-INVITE (§17.1.2) -----------------------------------------------------------

def test_non_invite_client_timer_e_caps_at_t2_then_timer_f() -> None:
    layer = TransactionLayer()
    key, _ = layer.send_request(request("OPTIONS"), UDP_PEER, 0.0)
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert instants(seen, TransactionTimeout, timer=Timer.F) == [32.0]
    assert key not in layer


def test_non_invite_client_proceeding_retransmits_every_t2() -> None:
    layer = TransactionLayer()
    req = request("REGISTER")
    key, _ = layer.send_request(req, UDP_PEER, 0.0)
    assert only(layer.receive_response(response(req, 100), UDP_PEER, 0.2), ResponseReceived)
    assert layer.get(key).state is State.PROCEEDING
    seen = drive(layer, 100.0)
    # The E armed in Trying still fires at 0.5; from then on it is reset to T2 (§17.1.2.2).
    assert instants(seen, Transmit) == [0.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5]
    assert instants(seen, TransactionTimeout, timer=Timer.F) == [32.0]


def test_non_invite_client_final_then_timer_k() -> None:
    layer = TransactionLayer()
    req = request("OPTIONS")
    key, _ = layer.send_request(req, UDP_PEER, 0.0)
    ok = response(req, 200)
    assert only(layer.receive_response(ok, UDP_PEER, 0.7), ResponseReceived)
    assert layer.receive_response(ok, UDP_PEER, 1.0) == []  # absorbed in Completed
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == []
    assert instants(seen, TransactionTerminated) == [5.7]  # K = T4


def test_non_invite_client_final_over_tcp_terminates_at_once() -> None:
    layer = TransactionLayer()
    req = request("OPTIONS", transport="TCP")
    key, _ = layer.send_request(req, TCP_PEER, 0.0)
    events = layer.receive_response(response(req, 404), TCP_PEER, 0.7)
    assert [type(ev) for ev in events] == [ResponseReceived, TransactionTerminated]


def test_client_transport_error_reported_and_terminates() -> None:
    layer = TransactionLayer()
    key, _ = layer.send_request(request("OPTIONS"), UDP_PEER, 0.0)
    events = layer.transport_error(key, 0.1)
    assert events == [TransportFailed(key), TransactionTerminated(key)]
    assert layer.transport_error(key, 0.2) == []


# -- server INVITE (§17.2.1) ---------------------------------------------------------------

def test_invite_server_trying_then_failure_timer_g_and_h() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    events = layer.receive_request(inv, UDP_PEER, 0.0)
    received = only(events, RequestReceived)
    key = received.key
    assert received.request is inv and received.source == UDP_PEER
    # §17.2.1: the TU is silent for 200 ms, so the transaction sends 100 Trying itself.
    seen = drive(layer, 0.5)
    trying = only([ev for _, ev in seen], Transmit)
    assert trying.message.status == 100 and instants(seen, Transmit) == [0.2]
    # A retransmitted INVITE is absorbed: the 100 goes out again, the TU hears nothing.
    again = layer.receive_request(inv, UDP_PEER, 0.6)
    assert [type(ev) for ev in again] == [Transmit] and again[0].data == trying.data
    busy = response(inv, 486)
    sent = only(layer.respond(key, busy, 1.0), Transmit)
    assert sent.data == busy.to_bytes() and sent.destination == UDP_PEER
    seen = drive(layer, 100.0)
    # G doubles from T1 and is capped at T2; H = 64*T1 after the final response.
    assert instants(seen, Transmit) == [1.5, 2.5, 4.5, 8.5, 12.5, 16.5, 20.5, 24.5, 28.5, 32.5]
    assert instants(seen, TransactionTimeout, timer=Timer.H) == [33.0]
    assert key not in layer


def test_invite_server_ack_confirms_absorbs_and_timer_i() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    busy = response(inv, 486)
    layer.respond(key, response(inv, 180), 0.05)
    layer.respond(key, busy, 0.1)
    assert instants(drive(layer, 2.0), Transmit) == [0.6, 1.6]
    ack = ack_for(inv, busy)
    assert layer.receive_request(ack, UDP_PEER, 2.0) == []
    assert layer.get(key).state is State.CONFIRMED
    assert layer.receive_request(ack, UDP_PEER, 3.0) == []  # ACK retransmission absorbed
    assert layer.receive_request(inv, UDP_PEER, 3.5) == []  # INVITE too, nothing resent
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == []
    assert instants(seen, TransactionTerminated) == [7.0]  # I = T4 after the ACK


def test_invite_server_provisional_replaces_automatic_trying() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    ringing = only(layer.respond(key, response(inv, 180), 0.1), Transmit)
    assert layer.next_timer() is None
    again = layer.receive_request(inv, UDP_PEER, 0.3)
    assert [ev.data for ev in again] == [ringing.data]


def test_invite_server_tcp_no_g_and_ack_terminates_at_once() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", transport="TCP")
    key = only(layer.receive_request(inv, TCP_PEER, 0.0), RequestReceived).key
    busy = response(inv, 486)
    layer.respond(key, busy, 1.0)
    assert layer.next_timer() == 33.0  # only H
    events = layer.receive_request(ack_for(inv, busy), TCP_PEER, 2.0)
    assert events == [TransactionTerminated(key)]


def test_invite_server_tcp_timer_h_without_ack() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", transport="TCP")
    key = only(layer.receive_request(inv, TCP_PEER, 0.0), RequestReceived).key
    layer.respond(key, response(inv, 500), 1.0)
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == []
    assert instants(seen, TransactionTimeout, timer=Timer.H) == [33.0]


def test_invite_server_2xx_accepted_absorbs_invite_until_timer_l() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    ok = response(inv, 200)
    layer.respond(key, ok, 0.1)
    assert layer.get(key).state is State.ACCEPTED
    assert layer.receive_request(inv, UDP_PEER, 0.6) == []  # RFC 6026: absorbed
    # The TU retransmits its 2xx through the transaction (RFC 6026 §8.5).
    resent = only(layer.respond(key, ok, 0.6), Transmit)
    assert resent.data == ok.to_bytes()
    # An ACK for the 2xx carries a new branch: it matches nothing and goes to the TU.
    ack = request("ACK", cseq=1, to_tag="tt1")
    assert layer.receive_request(ack, UDP_PEER, 0.7) == [RequestReceived(None, ack, UDP_PEER)]
    seen = drive(layer, 100.0)
    assert instants(seen, TransactionTerminated) == [32.1]  # L = 64*T1
    with pytest.raises(LocalProtocolError):
        layer.respond(key, ok, 40.0)


# -- server non-INVITE (§17.2.2) -----------------------------------------------------------

def test_non_invite_server_absorbs_and_resends_final_until_timer_j() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    events = layer.receive_request(reg, UDP_PEER, 0.0)
    key = only(events, RequestReceived).key
    assert layer.next_timer() is None  # no automatic 100 for non-INVITE
    assert layer.receive_request(reg, UDP_PEER, 0.5) == []  # Trying: absorbed, TU not told
    ok = response(reg, 200)
    sent = only(layer.respond(key, ok, 1.0), Transmit)
    for t in (1.5, 2.5, 20.0):
        again = layer.receive_request(reg, UDP_PEER, t)
        assert [(ev.data, ev.retransmission) for ev in again] == [(sent.data, True)]
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == []  # no timer G for non-INVITE
    assert instants(seen, TransactionTerminated) == [33.0]  # J = 64*T1
    # After J the same request is new again.
    assert only(layer.receive_request(reg, UDP_PEER, 40.0), RequestReceived)


def test_non_invite_server_provisional_resent_on_retransmission() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    key = only(layer.receive_request(reg, UDP_PEER, 0.0), RequestReceived).key
    trying = only(layer.respond(key, response(reg, 100), 0.1), Transmit)
    assert [ev.data for ev in layer.receive_request(reg, UDP_PEER, 0.5)] == [trying.data]


def test_non_invite_server_tcp_terminates_with_final() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER", transport="TCP")
    key = only(layer.receive_request(reg, TCP_PEER, 0.0), RequestReceived).key
    events = layer.respond(key, response(reg, 200), 0.1)
    assert [type(ev) for ev in events] == [Transmit, TransactionTerminated]


def test_second_final_response_is_local_error() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    key = only(layer.receive_request(reg, UDP_PEER, 0.0), RequestReceived).key
    layer.respond(key, response(reg, 200), 0.1)
    with pytest.raises(LocalProtocolError):
        layer.respond(key, response(reg, 500), 0.2)
    # The misuse lost nothing: the first final is still what retransmissions get.
    again = layer.receive_request(reg, UDP_PEER, 0.3)
    assert [ev.message.status for ev in again] == [200]


def test_reply_to_overrides_source() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    dest = Source("UDP", "198.51.100.7", 40000)
    key = only(layer.receive_request(reg, UDP_PEER, 0.0, reply_to=dest), RequestReceived).key
    assert only(layer.respond(key, response(reg, 200), 0.1), Transmit).destination == dest


# -- matching (§17.1.3, §17.2.3) -----------------------------------------------------------

def test_server_matching_uses_branch_sent_by_and_method() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", branch="z9hG4bKsame")
    k1 = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    other_host = request("INVITE", branch="z9hG4bKsame", via_host="192.0.2.99")
    k2 = only(layer.receive_request(other_host, UDP_PEER, 0.0), RequestReceived).key
    cancel = request("CANCEL", branch="z9hG4bKsame")
    k3 = only(layer.receive_request(cancel, UDP_PEER, 0.0), RequestReceived).key
    assert len({k1, k2, k3}) == 3 and len(layer) == 3
    assert k3.method == "CANCEL"
    assert layer.find_invite(cancel) == k1
    assert layer.find_invite(request("CANCEL", branch="z9hG4bKother")) is None


def test_ack_with_invite_branch_matches_invite_transaction() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    busy = response(inv, 486)
    layer.respond(key, busy, 0.1)
    ack = ack_for(inv, busy)
    assert layer.receive_request(ack, UDP_PEER, 0.2) == []
    assert layer.get(key).state is State.CONFIRMED


def test_response_matching_uses_branch_and_cseq_method() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", branch="z9hG4bKc1")
    key, _ = layer.send_request(inv, UDP_PEER, 0.0)
    wrong_method = response(inv, 200, cseq_method="CANCEL")
    assert layer.receive_response(wrong_method, UDP_PEER, 0.1) == [
        StrayResponse(wrong_method, UDP_PEER)
    ]
    stranger = response(request("INVITE"), 200)
    assert isinstance(layer.receive_response(stranger, UDP_PEER, 0.1)[0], StrayResponse)
    assert layer.get(key).state is State.CALLING
    # Client CANCEL shares the INVITE's branch but is its own transaction.
    cancel = request("CANCEL", branch="z9hG4bKc1")
    ckey, _ = layer.send_request(cancel, UDP_PEER, 0.2)
    assert ckey != key
    assert only(layer.receive_response(response(cancel, 200), UDP_PEER, 0.3),
                ResponseReceived).key == ckey
    assert layer.get(key).state is State.CALLING


def test_rfc2543_peer_matched_without_magic_cookie() -> None:
    layer = TransactionLayer()
    inv = request("INVITE", branch="")
    key = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    assert key.branch == "" and key.legacy
    busy = response(inv, 486, to_tag="x9")
    sent = only(layer.respond(key, busy, 0.1), Transmit)
    # Retransmission: same R-URI, tags, Call-ID, CSeq and Via.
    assert [ev.data for ev in layer.receive_request(inv, UDP_PEER, 0.2)] == [sent.data]
    # The ACK carries our To tag and matches through it.
    assert layer.receive_request(ack_for(inv, busy), UDP_PEER, 0.3) == []
    assert layer.get(key).state is State.CONFIRMED
    # A different CSeq is a different transaction.
    other = request("INVITE", branch="", cseq=2)
    assert only(layer.receive_request(other, UDP_PEER, 0.4), RequestReceived).key != key
    # Once the transaction has ended, its ACK matches nothing and goes to the TU.
    drive(layer, 10.0)
    assert key not in layer
    late_ack = ack_for(inv, busy)
    assert layer.receive_request(late_ack, UDP_PEER, 10.0) == [
        RequestReceived(None, late_ack, UDP_PEER)
    ]


def test_old_style_branch_without_cookie_uses_rfc2543_rules() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER", branch="abc123")
    key = only(layer.receive_request(reg, UDP_PEER, 0.0), RequestReceived).key
    assert key.branch == ""
    assert layer.receive_request(reg, UDP_PEER, 0.1) == []


# -- misuse, limits, table ------------------------------------------------------------------

def test_api_misuse_is_local_error() -> None:
    layer = TransactionLayer()
    with pytest.raises(LocalProtocolError):
        layer.send_request(request("OPTIONS", branch="old-style"), UDP_PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(request("ACK"), UDP_PEER, 0.0)
    req = request("OPTIONS")
    layer.send_request(req, UDP_PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.send_request(req, UDP_PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.respond(TransactionKey(True, "OPTIONS", "z9hG4bKnone", "x:1"), req, 0.0)
    with pytest.raises(LocalProtocolError):
        TimerConfig(t1=5.0, t2=4.0)
    assert len(layer) == 1  # the refused calls left the table as it was


def test_transaction_table_limit() -> None:
    layer = TransactionLayer(max_transactions=2)
    layer.receive_request(request("OPTIONS"), UDP_PEER, 0.0)
    layer.receive_request(request("OPTIONS"), UDP_PEER, 0.0)
    with pytest.raises(TransactionTableFull):
        layer.receive_request(request("OPTIONS"), UDP_PEER, 0.0)
    assert len(layer) == 2


def test_custom_timer_config_scales_every_timer() -> None:
    layer = TransactionLayer(TimerConfig(t1=0.1, t2=0.4, t4=1.0))
    layer.send_request(request("OPTIONS"), UDP_PEER, 0.0)
    seen = drive(layer, 100.0)
    assert instants(seen, Transmit) == [0.1, 0.3, 0.7, 1.1, 1.5, 1.9, 2.3, 2.7, 3.1, 3.5,
                                        3.9, 4.3, 4.7, 5.1, 5.5, 5.9, 6.3]
    assert instants(seen, TransactionTimeout) == [6.4]


def test_late_wakeup_keeps_exact_schedule() -> None:
    layer = TransactionLayer()
    layer.send_request(request("INVITE"), UDP_PEER, 0.0)
    events = layer.handle_timer(10.0)  # the adapter overslept
    assert len([ev for ev in events if isinstance(ev, Transmit)]) == 4  # 0.5 1.5 3.5 7.5
    assert layer.next_timer() == 15.5


def test_layer_orders_timers_across_transactions() -> None:
    layer = TransactionLayer()
    k1, _ = layer.send_request(request("OPTIONS"), UDP_PEER, 0.0)
    k2, _ = layer.send_request(request("OPTIONS"), UDP_PEER, 0.2)
    seen = drive(layer, 2.0)
    assert [(t, ev.key) for t, ev in seen] == [(0.5, k1), (0.7, k2), (1.5, k1), (1.7, k2)]


NETWORK_INPUTS = {
    Kind.INVITE_CLIENT: (Input.RX_1XX, Input.RX_2XX, Input.RX_FINAL, Input.TRANSPORT_ERROR),
    Kind.NON_INVITE_CLIENT: (Input.RX_1XX, Input.RX_2XX, Input.RX_FINAL, Input.TRANSPORT_ERROR),
    Kind.INVITE_SERVER: (Input.REQUEST, Input.ACK, Input.TRANSPORT_ERROR),
    Kind.NON_INVITE_SERVER: (Input.REQUEST, Input.TRANSPORT_ERROR),
}


@pytest.mark.parametrize("kind", list(Kind))
def test_every_network_input_is_in_every_live_state(kind: Kind) -> None:
    states = {INITIAL[kind][1]} | {nxt for _, nxt in TRANSITIONS[kind].values()}
    for state in states - {State.TERMINATED}:
        for inp in NETWORK_INPUTS[kind]:
            assert (state, inp) in TRANSITIONS[kind], (kind, state, inp)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    transport=st.sampled_from(["UDP", "TCP"]),
    steps=st.lists(st.tuples(st.integers(0, 3), st.floats(0.0, 40.0)), max_size=25),
)
def test_network_never_causes_local_error(kind: Kind, transport: str, steps) -> None:
    """Any sequence of network inputs and clock jumps is handled without LocalProtocolError."""
    peer = Source(transport, "127.0.0.1", 5070)
    method = "INVITE" if kind in (Kind.INVITE_CLIENT, Kind.INVITE_SERVER) else "OPTIONS"
    req = request(method, transport=transport)
    statuses = {0: 180, 1: 200, 2: 486, 3: 100}
    tx = Transaction(kind, TransactionKey(kind.name.endswith("SERVER"), method, req.branch),
                     req, peer)
    now = 0.0
    tx.start(now)
    for choice, dt in steps:
        if tx.state is State.TERMINATED:
            break
        now += dt
        tx.handle_timer(now)
        if tx.state is State.TERMINATED:
            break
        inputs = NETWORK_INPUTS[kind]
        inp = inputs[choice % len(inputs)]
        if inp in (Input.RX_1XX, Input.RX_2XX, Input.RX_FINAL):
            tx.receive_response(response(req, statuses[choice]), now)
        elif inp is Input.ACK:
            tx.feed(inp, now, ack_for(req, response(req, 486)))
        else:
            tx.feed(inp, now, req)
        if kind is Kind.INVITE_SERVER and tx.state is State.PROCEEDING and choice == 3:
            tx.send_response(response(req, 486), now)
        deadline = tx.next_timer()
        assert deadline is None or deadline >= now


def test_events_are_frozen() -> None:
    ev = TransactionTerminated(TransactionKey(False, "OPTIONS", "z9hG4bK1"))
    with pytest.raises(AttributeError):
        ev.key = None  # type: ignore[misc]
    assert AckReceived.__dataclass_params__.frozen


def test_abandon_ends_an_unanswerable_server_transaction() -> None:
    layer = TransactionLayer()
    inv = request("INVITE")
    key = only(layer.receive_request(inv, UDP_PEER, 0.0), RequestReceived).key
    assert layer.abandon(key) == [TransactionTerminated(key)]
    assert key not in layer and layer.next_timer() is None
    assert drive(layer, 10.0) == []  # no automatic 100 from a transaction that is gone
    with pytest.raises(LocalProtocolError):
        layer.abandon(key)
    ckey, _ = layer.send_request(request("OPTIONS"), UDP_PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.abandon(ckey)  # client transactions end by their own timers


# -- completed non-INVITE server transactions held compactly (§17.2.2) ----------------------

def test_completed_non_invite_is_held_compactly_until_timer_j() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    reply_to = Source("UDP", "198.51.100.7", 40000)
    key = only(layer.receive_request(reg, UDP_PEER, 0.0, reply_to=reply_to), RequestReceived).key
    sent = only(layer.respond(key, response(reg, 401), 1.0), Transmit)
    # Only the response bytes are kept: no machine, but the key is still matched and counted.
    assert layer.get(key) is None and key in layer and len(layer) == 1 and layer.completed == 1
    for t in (1.2, 16.0, 32.9):
        again = only(layer.receive_request(reg, UDP_PEER, t), Transmit)
        assert (again.key, again.data, again.destination, again.retransmission) == (
            key, sent.data, reply_to, True)
        assert again.message.status == 401 and again.message.to.tag == sent.message.to.tag
    assert layer.next_timer() == 33.0
    seen = drive(layer, 100.0)
    assert [(t, type(ev)) for t, ev in seen] == [(33.0, TransactionTerminated)]
    assert key not in layer and len(layer) == 0 and layer.completed == 0
    assert layer.next_timer() is None


def test_completed_store_ends_in_deadline_order_across_live_timers() -> None:
    layer = TransactionLayer()
    regs = [request("REGISTER") for _ in range(3)]
    keys = [only(layer.receive_request(r, UDP_PEER, 0.0), RequestReceived).key for r in regs]
    # Answered out of clock order (a hand clock may go back): J still ends each one at its
    # own 64*T1 after its answer.
    for reg, key, t in zip(regs, keys, (5.0, 1.0, 3.0), strict=True):
        layer.respond(key, response(reg, 200), t)
    client, _ = layer.send_request(request("OPTIONS"), UDP_PEER, 3.0)  # timer F at 35.0
    seen = drive(layer, 100.0)
    ended = [(round(t, 6), ev.key) for t, ev in seen if isinstance(ev, TransactionTerminated)]
    assert ended == [(33.0, keys[1]), (35.0, keys[2]), (35.0, client), (37.0, keys[0])]
    assert instants(seen, TransactionTimeout) == [35.0]


def test_completed_store_takes_transport_error_and_abandon() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    key = only(layer.receive_request(reg, UDP_PEER, 0.0), RequestReceived).key
    layer.respond(key, response(reg, 200), 0.1)
    # (COMPLETED, TRANSPORT_ERROR) of Figure 8: the transaction ends at once.
    assert layer.transport_error(key, 0.2) == [TransportFailed(key), TransactionTerminated(key)]
    assert key not in layer and layer.next_timer() is None
    assert layer.transport_error(key, 0.3) == []
    other = request("REGISTER")
    key2 = only(layer.receive_request(other, UDP_PEER, 1.0), RequestReceived).key
    layer.respond(key2, response(other, 200), 1.1)
    assert layer.abandon(key2) == [TransactionTerminated(key2)] and len(layer) == 0
    with pytest.raises(LocalProtocolError):
        layer.abandon(key2)


def test_table_is_sized_for_timer_j_at_5000_requests_per_second() -> None:
    layer = TransactionLayer()
    assert layer.max_transactions >= 5000 * 64 * layer.config.t1
    layer = TransactionLayer(max_transactions=2)
    reg = request("REGISTER")
    key = only(layer.receive_request(reg, UDP_PEER, 0.0), RequestReceived).key
    sent = only(layer.respond(key, response(reg, 200), 0.0), Transmit)
    layer.receive_request(request("OPTIONS"), UDP_PEER, 0.0)  # live, unanswered
    # Full (one completed + one live): a new request is refused...
    with pytest.raises(TransactionTableFull):
        layer.receive_request(request("REGISTER"), UDP_PEER, 1.0)
    # ...but a retransmission is still answered from what is held, and the count is unchanged.
    assert only(layer.receive_request(reg, UDP_PEER, 1.0), Transmit).data == sent.data
    assert len(layer) == 2
    # Timer J makes room again: refusal only while the table is really full.
    drive(layer, 32.0)
    assert len(layer) == 1
    assert only(layer.receive_request(request("REGISTER"), UDP_PEER, 32.0), RequestReceived)


def test_reliable_non_invite_is_never_held_compactly() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER", transport="TCP")
    key = only(layer.receive_request(reg, TCP_PEER, 0.0), RequestReceived).key
    layer.respond(key, response(reg, 200), 0.1)
    assert layer.completed == 0 and key not in layer  # J is zero on TCP (§17.2.2)


def test_answer_at_once_ends_as_receive_then_respond_does() -> None:
    layer = TransactionLayer()
    reg = request("REGISTER")
    reply_to = Source("UDP", "198.51.100.7", 40000)
    key = server_key(reg)
    data = response(reg, 401).to_bytes()
    layer.answer_at_once(key, data, reply_to, 1.0)
    # Completed (§17.2.2): retransmissions get the same bytes until timer J = 64*T1.
    assert layer.get(key) is None and key in layer and layer.completed == 1
    again = only(layer.receive_request(reg, UDP_PEER, 20.0), Transmit)
    assert (again.key, again.data, again.destination, again.retransmission) == (
        key, data, reply_to, True)
    assert layer.next_timer() == 33.0
    assert [(t, type(ev)) for t, ev in drive(layer, 100.0)] == [(33.0, TransactionTerminated)]
    assert key not in layer and len(layer) == 0


def test_answer_at_once_refuses_what_it_cannot_hold() -> None:
    layer = TransactionLayer(max_transactions=1)
    reg = request("REGISTER")
    key = server_key(reg)
    layer.answer_at_once(key, b"SIP/2.0 200 OK\r\n\r\n", UDP_PEER, 0.0)
    with pytest.raises(LocalProtocolError):
        layer.answer_at_once(key, b"", UDP_PEER, 0.0)  # already held
    with pytest.raises(TransactionTableFull):
        layer.answer_at_once(server_key(request("REGISTER")), b"", UDP_PEER, 0.0)
    layer = TransactionLayer()
    with pytest.raises(LocalProtocolError):  # J is zero on streams: nothing to hold
        layer.answer_at_once(server_key(reg), b"", TCP_PEER, 0.0)
    with pytest.raises(LocalProtocolError):  # INVITE server transactions need the machine
        layer.answer_at_once(server_key(request("INVITE")), b"", UDP_PEER, 0.0)
    assert len(layer) == 0
